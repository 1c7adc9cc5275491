//! The device request signature, the same shape as WeChat Pay's own scheme:
//!
//! ```text
//! Authorization: AUTHINFOD-SHA256-RSA2048 device_id="..",timestamp="..",nonce="..",signature=".."
//! signature = base64(SHA256withRSA(device key, "METHOD\nPATH?QUERY\nTIMESTAMP\nNONCE\nBODY\n"))
//! ```
//!
//! Owns: the header's text form (format and a strict parser), the device signer and the pure
//! checks the proxy applies (signature, timestamp window). The signing string is
//! [`crypto::request_signing_string`], shared with WeChat Pay's scheme. The proxy keeps the nonce
//! cache; this module only defines the window.

use std::fmt;

use crate::crypto::{self, CryptoError, RsaVerifier, Signer};

/// The authentication scheme name.
pub const SCHEME: &str = "AUTHINFOD-SHA256-RSA2048";
/// How far a request's timestamp may be from the proxy's clock, in seconds.
pub const TIMESTAMP_WINDOW_SECS: i64 = 300;
/// Longest Authorization header accepted (a 4096-bit signature is 684 base64 characters).
pub const MAX_HEADER_LEN: usize = 2048;

/// The string a device signs: `METHOD\nPATH?QUERY\nTIMESTAMP\nNONCE\nBODY\n`, WeChat Pay's shape.
/// `path_and_query` is the request target as sent (`/v1/licence`, or `/v1/x?a=b`); a GET has an
/// empty body, so its string ends in `\n\n`.
pub use crate::crypto::request_signing_string as signing_string;

/// The parameters of an `AUTHINFOD-SHA256-RSA2048` Authorization header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    pub device_id: String,
    pub timestamp: i64,
    pub nonce: String,
    /// base64 signature.
    pub signature: String,
}

/// Why an Authorization header was refused before any key was looked at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("the Authorization header is missing")]
    Missing,
    #[error("the Authorization header is longer than {MAX_HEADER_LEN} bytes")]
    TooLong,
    #[error("the Authorization scheme is not {SCHEME}")]
    Scheme,
    #[error("the Authorization header is malformed: {0}")]
    Malformed(&'static str),
    #[error("the Authorization header repeats the parameter {0}")]
    Duplicate(String),
    #[error("the Authorization header has an unknown parameter {0}")]
    Unknown(String),
    #[error("the Authorization header lacks the parameter {0}")]
    Lacks(&'static str),
    #[error("the Authorization parameter {0} has a bad value")]
    BadValue(&'static str),
}

impl fmt::Display for Authorization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME} device_id=\"{}\",timestamp=\"{}\",nonce=\"{}\",signature=\"{}\"",
            self.device_id, self.timestamp, self.nonce, self.signature
        )
    }
}

impl Authorization {
    /// Parses the header value strictly: the scheme, then `key="value"` pairs separated by
    /// commas (optional spaces after a comma), each of the four keys exactly once, in any order.
    pub fn parse(header: &str) -> Result<Self, HeaderError> {
        if header.len() > MAX_HEADER_LEN {
            return Err(HeaderError::TooLong);
        }
        let rest = header
            .strip_prefix(SCHEME)
            .and_then(|r| r.strip_prefix(' '))
            .ok_or(HeaderError::Scheme)?;
        let (mut device_id, mut timestamp, mut nonce, mut signature) = (None, None, None, None);
        let mut rest = rest.trim_start();
        while !rest.is_empty() {
            let eq = rest
                .find('=')
                .ok_or(HeaderError::Malformed("expected key=\"value\""))?;
            let key = &rest[..eq];
            let after = rest[eq + 1..]
                .strip_prefix('"')
                .ok_or(HeaderError::Malformed("values must be quoted"))?;
            let close = after
                .find('"')
                .ok_or(HeaderError::Malformed("unterminated quoted value"))?;
            let value = &after[..close];
            rest = &after[close + 1..];
            if let Some(r) = rest.strip_prefix(',') {
                rest = r.trim_start_matches(' ');
                if rest.is_empty() {
                    return Err(HeaderError::Malformed("trailing comma"));
                }
            } else if !rest.is_empty() {
                return Err(HeaderError::Malformed(
                    "parameters must be separated by commas",
                ));
            }
            let slot = match key {
                "device_id" => &mut device_id,
                "timestamp" => &mut timestamp,
                "nonce" => &mut nonce,
                "signature" => &mut signature,
                other => return Err(HeaderError::Unknown(truncate(other))),
            };
            if slot.replace(value).is_some() {
                return Err(HeaderError::Duplicate(key.to_owned()));
            }
        }
        let device_id = device_id.ok_or(HeaderError::Lacks("device_id"))?;
        if !super::valid_device_id(device_id) {
            return Err(HeaderError::BadValue("device_id"));
        }
        let timestamp = timestamp.ok_or(HeaderError::Lacks("timestamp"))?;
        if timestamp.is_empty()
            || timestamp.len() > 12
            || !timestamp.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(HeaderError::BadValue("timestamp"));
        }
        let timestamp = timestamp
            .parse()
            .map_err(|_| HeaderError::BadValue("timestamp"))?;
        let nonce = nonce.ok_or(HeaderError::Lacks("nonce"))?;
        if !(16..=64).contains(&nonce.len()) || !nonce.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(HeaderError::BadValue("nonce"));
        }
        let signature = signature.ok_or(HeaderError::Lacks("signature"))?;
        if signature.is_empty()
            || !signature
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
        {
            return Err(HeaderError::BadValue("signature"));
        }
        Ok(Self {
            device_id: device_id.to_owned(),
            timestamp,
            nonce: nonce.to_owned(),
            signature: signature.to_owned(),
        })
    }

    /// True when the signature verifies over this request with `key`.
    pub fn verify(
        &self,
        key: &RsaVerifier,
        method: &str,
        path_and_query: &str,
        body: &[u8],
    ) -> bool {
        let message = signing_string(method, path_and_query, self.timestamp, &self.nonce, body);
        key.verify_base64(&message, &self.signature)
    }

    /// Seconds between the request's timestamp and `now` when outside the window, else `None`.
    pub fn skew(&self, now: i64) -> Option<i64> {
        let skew = self.timestamp.saturating_sub(now);
        (skew.abs() > TIMESTAMP_WINDOW_SECS).then_some(skew)
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(32).collect()
}

// === impl DeviceSigner ===

/// A terminal's signing identity: its device id and RSA key (a key file's, or a PKCS#11
/// token's).
#[derive(Debug)]
pub struct DeviceSigner {
    device_id: String,
    key: Signer,
}

impl DeviceSigner {
    pub fn new(device_id: String, key: impl Into<Signer>) -> Self {
        Self {
            device_id,
            key: key.into(),
        }
    }

    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    /// Signs a request with a fresh nonce and returns the Authorization header value.
    pub fn authorize(
        &self,
        method: &str,
        path_and_query: &str,
        timestamp: i64,
        body: &[u8],
    ) -> Result<String, CryptoError> {
        let nonce = crypto::nonce()?;
        self.authorize_with_nonce(method, path_and_query, timestamp, &nonce, body)
    }

    /// [`authorize`](Self::authorize) with a given nonce (known-answer tests).
    pub fn authorize_with_nonce(
        &self,
        method: &str,
        path_and_query: &str,
        timestamp: i64,
        nonce: &str,
        body: &[u8],
    ) -> Result<String, CryptoError> {
        let message = signing_string(method, path_and_query, timestamp, nonce, body);
        let signature = self.key.sign_base64(&message)?;
        Ok(Authorization {
            device_id: self.device_id.clone(),
            timestamp,
            nonce: nonce.to_owned(),
            signature,
        }
        .to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::RsaSigner;
    use proptest::prelude::*;

    fn key() -> &'static crypto::GeneratedKey {
        crypto::test_key(0)
    }

    fn signer() -> DeviceSigner {
        DeviceSigner::new(
            "T1001".into(),
            RsaSigner::from_pem(&key().private_pem, "k").expect("key"),
        )
    }

    #[test]
    fn signing_string_has_five_newline_terminated_lines() {
        let s = signing_string("POST", "/v1/authinfo", 1_700_000_000, "N0NCE", b"{\"a\":1}");
        assert_eq!(s, b"POST\n/v1/authinfo\n1700000000\nN0NCE\n{\"a\":1}\n");
        let get = signing_string("GET", "/v1/licence?x=1", 5, "N", b"");
        assert_eq!(get, b"GET\n/v1/licence?x=1\n5\nN\n\n");
    }

    /// Known answer: the signature equals what `openssl dgst -sha256 -sign` makes over the same
    /// signing string with the same key (PKCS#1 v1.5 is deterministic).
    #[test]
    fn signature_matches_openssl_dgst_sha256_sign() {
        let body = br#"{"raw_data":"RAW"}"#;
        let header = signer()
            .authorize_with_nonce(
                "POST",
                "/v1/authinfo",
                1_763_000_000,
                "ABCDEFGHIJKLMNOP0123",
                body,
            )
            .expect("sign");
        let parsed = Authorization::parse(&header).expect("parse");
        let message = signing_string(
            "POST",
            "/v1/authinfo",
            1_763_000_000,
            "ABCDEFGHIJKLMNOP0123",
            body,
        );
        assert_eq!(
            parsed.signature,
            base64::Engine::encode(
                &crypto::BASE64,
                crypto::openssl_sign(&key().private_pem, &message)
            )
        );
        assert!(parsed.verify(&key().public, "POST", "/v1/authinfo", body));
        assert!(!parsed.verify(&key().public, "POST", "/v1/authinfo", b"{}"));
        assert!(!parsed.verify(&key().public, "GET", "/v1/authinfo", body));
    }

    #[test]
    fn header_has_the_contract_shape() {
        let h = signer()
            .authorize_with_nonce("GET", "/v1/inspection", 42, "NONCENONCENONCE1", b"")
            .expect("sign");
        assert!(h.starts_with(
            "AUTHINFOD-SHA256-RSA2048 device_id=\"T1001\",timestamp=\"42\",nonce=\"NONCENONCENONCE1\",signature=\""
        ));
        assert!(h.ends_with('"'));
    }

    #[test]
    fn parser_accepts_any_order_and_spaces_after_commas() {
        let h = format!(
            "{SCHEME} signature=\"c2ln\", nonce=\"ABCDEFGHIJKLMNOP\",timestamp=\"10\", device_id=\"d1\""
        );
        let a = Authorization::parse(&h).expect("parse");
        assert_eq!(a.device_id, "d1");
        assert_eq!(a.timestamp, 10);
        assert_eq!(a.signature, "c2ln");
    }

    #[test]
    fn parser_refuses_bad_headers_with_a_reason() {
        let ok = "device_id=\"d\",timestamp=\"1\",nonce=\"ABCDEFGHIJKLMNOP\",signature=\"AA==\"";
        let cases: &[(&str, HeaderError)] = &[
            ("Bearer x", HeaderError::Scheme),
            (
                &format!("WECHATPAY2-SHA256-RSA2048 {ok}"),
                HeaderError::Scheme,
            ),
            (
                &format!("{SCHEME} {ok},device_id=\"e\""),
                HeaderError::Duplicate("device_id".into()),
            ),
            (
                &format!("{SCHEME} {ok},extra=\"1\""),
                HeaderError::Unknown("extra".into()),
            ),
            (
                &format!("{SCHEME} {ok},"),
                HeaderError::Malformed("trailing comma"),
            ),
            (
                &format!("{SCHEME} device_id=d"),
                HeaderError::Malformed("values must be quoted"),
            ),
            (
                &format!("{SCHEME} device_id=\"d\",timestamp=\"1\",nonce=\"ABCDEFGHIJKLMNOP\""),
                HeaderError::Lacks("signature"),
            ),
            (
                &format!(
                    "{SCHEME} device_id=\"d\",timestamp=\"-1\",nonce=\"ABCDEFGHIJKLMNOP\",signature=\"AA\""
                ),
                HeaderError::BadValue("timestamp"),
            ),
            (
                &format!(
                    "{SCHEME} device_id=\"d\",timestamp=\"1\",nonce=\"short\",signature=\"AA\""
                ),
                HeaderError::BadValue("nonce"),
            ),
            (
                &format!("{SCHEME} {}", "a".repeat(MAX_HEADER_LEN)),
                HeaderError::TooLong,
            ),
        ];
        for (header, want) in cases {
            assert_eq!(Authorization::parse(header).as_ref(), Err(want), "{header}");
        }
    }

    #[test]
    fn skew_is_reported_only_outside_the_window() {
        let a = |timestamp| Authorization {
            device_id: "d".into(),
            timestamp,
            nonce: "n".into(),
            signature: "s".into(),
        };
        assert_eq!(a(1000).skew(1300), None);
        assert_eq!(a(1000).skew(700), None);
        assert_eq!(a(1000).skew(1301), Some(-301));
        assert_eq!(a(1301).skew(1000), Some(301));
    }

    proptest! {
        /// Whatever bytes arrive, parsing returns a value or an error and never panics.
        #[test]
        fn parser_never_panics(s in ".{0,300}") {
            let _ = Authorization::parse(&s);
            let _ = Authorization::parse(&format!("{SCHEME} {s}"));
        }

        /// Formatting then parsing gives back the same parameters.
        #[test]
        fn format_parse_roundtrip(
            device_id in "[A-Za-z0-9._-]{1,64}",
            timestamp in 0i64..999_999_999_999,
            nonce in "[A-Z0-9]{16,64}",
            signature in "[A-Za-z0-9+/]{4,400}={0,2}",
        ) {
            let a = Authorization { device_id, timestamp, nonce, signature };
            prop_assert_eq!(Authorization::parse(&a.to_string()), Ok(a));
        }
    }
}
