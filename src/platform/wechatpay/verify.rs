//! Verification of WeChat Pay's answers.
//!
//! WeChat Pay signs each answer over `Wechatpay-Timestamp\nWechatpay-Nonce\nBODY\n` (the raw
//! body bytes) and names its key in `Wechatpay-Serial`: either a WeChat Pay public key
//! (`PUB_KEY_ID_...`, the current mode) or a platform certificate by its hex serial (the older
//! mode). Owns: the set of those keys ([`PlatformKeys`]), reading X.509 certificates, and the
//! check of one answer. It must not fetch keys or certificates (they come from the merchant's
//! configuration or from [`super::certificates`]), must not check
//! certificate chains (the merchant downloaded them from WeChat Pay over TLS), and must not
//! look at error answers, which WeChat Pay does not promise to sign.
//!
//! Two error enums live here because they happen at different times: [`KeysError`] when the
//! configuration is loaded, [`SignatureError`] per answer.

use std::collections::BTreeMap;

use x509_cert::der::{Decode as _, Encode as _};

use crate::crypto::{self, CryptoError, RsaVerifier};

/// How far an answer's timestamp may be from our clock: it is refused at 300 s or more.
pub const TIMESTAMP_WINDOW_SECS: i64 = 300;

/// The answer headers the signature lives in.
pub const HEADER_SERIAL: &str = "Wechatpay-Serial";
pub const HEADER_TIMESTAMP: &str = "Wechatpay-Timestamp";
pub const HEADER_NONCE: &str = "Wechatpay-Nonce";
pub const HEADER_SIGNATURE: &str = "Wechatpay-Signature";

/// The prefix of WeChat Pay public key ids.
pub const PUBLIC_KEY_ID_PREFIX: &str = "PUB_KEY_ID_";

/// Errors of loading the keys answers are verified with.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("{what}: cannot read the WeChat Pay public key")]
    PublicKey {
        what: String,
        #[source]
        source: CryptoError,
    },
    #[error("{what}: no CERTIFICATE block")]
    NoCertificate { what: String },
    #[error("{what}: certificate {index} is not a valid X.509 certificate: {reason}")]
    BadCertificate {
        what: String,
        index: usize,
        reason: String,
    },
    #[error("{what}: certificate {serial} does not hold a usable RSA key")]
    CertificateKey {
        what: String,
        serial: String,
        #[source]
        source: CryptoError,
    },
    #[error("{what}: cannot read the platform certificates")]
    Pem {
        what: String,
        #[source]
        source: CryptoError,
    },
}

/// Why one answer's signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the answer lacks the {0} header")]
    MissingHeader(&'static str),
    #[error("the answer's {0} header is not a valid value")]
    BadHeader(&'static str),
    #[error(
        "the answer's timestamp is {skew_secs} s away from our clock (limit {TIMESTAMP_WINDOW_SECS} s)"
    )]
    Stale { skew_secs: i64 },
    #[error("the answer is signed with key {serial}, which is not configured")]
    UnknownSerial { serial: String },
    #[error("platform certificate {serial} is not valid at this time")]
    CertificateNotValid { serial: String },
    #[error("the answer's signature does not verify with key {serial}")]
    Invalid { serial: String },
}

/// The message an answer's signature covers: `TIMESTAMP\nNONCE\nBODY\n`.
pub fn response_message(timestamp: &str, nonce: &str, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(timestamp.len() + nonce.len() + body.len() + 3);
    for line in [timestamp.as_bytes(), nonce.as_bytes(), body] {
        m.extend_from_slice(line);
        m.push(b'\n');
    }
    m
}

/// One key WeChat Pay may sign with.
#[derive(Debug, Clone)]
struct PlatformKey {
    key: RsaVerifier,
    /// For platform certificates, the validity period in Unix seconds.
    valid: Option<(i64, i64)>,
}

/// What this crate reads from an X.509 certificate (a platform certificate, or the merchant's
/// `apiclient_cert.pem`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    /// The serial as WeChat Pay prints it: upper-case hex, leading zero bytes dropped.
    pub serial: String,
    /// The certificate's RSA key.
    pub key: RsaVerifier,
    /// Validity, Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
}

/// The keys WeChat Pay signs its answers with, by the serial it names them with.
#[derive(Debug, Clone, Default)]
pub struct PlatformKeys {
    keys: BTreeMap<String, PlatformKey>,
}

impl PlatformKeys {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a WeChat Pay public key (public key mode) under its id (`PUB_KEY_ID_...`).
    pub fn add_public_key(&mut self, key_id: impl Into<String>, key: RsaVerifier) {
        self.keys
            .insert(key_id.into(), PlatformKey { key, valid: None });
    }

    /// Adds a WeChat Pay public key given as PEM (`pub_key.pem`).
    pub fn add_public_key_pem(
        &mut self,
        key_id: impl Into<String>,
        pem: &str,
        what: &str,
    ) -> Result<(), KeysError> {
        let key = RsaVerifier::from_pem(pem, what).map_err(|source| KeysError::PublicKey {
            what: what.to_owned(),
            source,
        })?;
        self.add_public_key(key_id, key);
        Ok(())
    }

    /// Adds every platform certificate in `pem` (platform certificate mode) and returns their
    /// serials as WeChat Pay names them: upper-case hex without leading zeros.
    pub fn add_certificates_pem(
        &mut self,
        pem: &str,
        what: &str,
    ) -> Result<Vec<String>, KeysError> {
        let certificates =
            crypto::pem_certificates(pem, what).map_err(|source| KeysError::Pem {
                what: what.to_owned(),
                source,
            })?;
        let mut serials = Vec::new();
        for (index, der) in certificates.iter().enumerate() {
            let info = read_certificate(der, what, index)?;
            serials.push(info.serial.clone());
            self.add_certificate(info);
        }
        if serials.is_empty() {
            return Err(KeysError::NoCertificate {
                what: what.to_owned(),
            });
        }
        Ok(serials)
    }

    /// Adds one platform certificate under its serial.
    pub fn add_certificate(&mut self, info: CertificateInfo) {
        self.keys.insert(
            info.serial,
            PlatformKey {
                key: info.key,
                valid: Some((info.not_before, info.not_after)),
            },
        );
    }

    /// True when `serial` names a configured key.
    pub fn contains(&self, serial: &str) -> bool {
        self.entry(serial).is_some()
    }

    /// True when at least one platform certificate (not only a public key) is configured.
    pub fn has_certificates(&self) -> bool {
        self.keys.values().any(|k| k.valid.is_some())
    }

    fn entry(&self, serial: &str) -> Option<&PlatformKey> {
        self.keys
            .get(serial)
            .or_else(|| self.keys.get(&serial.to_ascii_uppercase()))
    }

    /// True when no key is configured.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The serials of the configured keys.
    pub fn serials(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// Checks an answer's signature over its raw `body` at Unix time `now`: the four
    /// `Wechatpay-*` headers present, the timestamp less than [`TIMESTAMP_WINDOW_SECS`] away,
    /// the serial configured (and its certificate valid now), the signature good.
    pub fn verify(
        &self,
        headers: &http::HeaderMap,
        body: &[u8],
        now: i64,
    ) -> Result<(), SignatureError> {
        let serial = header(headers, HEADER_SERIAL)?;
        let timestamp = header(headers, HEADER_TIMESTAMP)?;
        let nonce = header(headers, HEADER_NONCE)?;
        let signature = header(headers, HEADER_SIGNATURE)?;
        let at: i64 = timestamp
            .parse()
            .map_err(|_| SignatureError::BadHeader(HEADER_TIMESTAMP))?;
        let skew_secs = at.saturating_sub(now);
        if skew_secs.saturating_abs() >= TIMESTAMP_WINDOW_SECS {
            return Err(SignatureError::Stale { skew_secs });
        }
        let entry = self
            .entry(serial)
            .ok_or_else(|| SignatureError::UnknownSerial {
                serial: serial.to_owned(),
            })?;
        if let Some((not_before, not_after)) = entry.valid
            && !(not_before..=not_after).contains(&now)
        {
            return Err(SignatureError::CertificateNotValid {
                serial: serial.to_owned(),
            });
        }
        let message = response_message(timestamp, nonce, body);
        if entry.key.verify_base64(&message, signature) {
            Ok(())
        } else {
            Err(SignatureError::Invalid {
                serial: serial.to_owned(),
            })
        }
    }
}

fn header<'h>(headers: &'h http::HeaderMap, name: &'static str) -> Result<&'h str, SignatureError> {
    let value = headers
        .get(name)
        .ok_or(SignatureError::MissingHeader(name))?
        .to_str()
        .map_err(|_| SignatureError::BadHeader(name))?
        .trim();
    if value.is_empty() {
        return Err(SignatureError::MissingHeader(name));
    }
    Ok(value)
}

/// Reads a certificate's serial (upper-case hex, leading zero bytes dropped, as WeChat Pay
/// prints it), its RSA key and its validity period. `index` numbers it in its file, for errors.
pub fn read_certificate(
    der: &[u8],
    what: &str,
    index: usize,
) -> Result<CertificateInfo, KeysError> {
    let bad = |reason: String| KeysError::BadCertificate {
        what: what.to_owned(),
        index,
        reason,
    };
    let cert = x509_cert::Certificate::from_der(der).map_err(|e| bad(e.to_string()))?;
    let tbs = &cert.tbs_certificate;
    let serial_bytes = tbs.serial_number.as_bytes();
    let first = serial_bytes
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(serial_bytes.len().saturating_sub(1));
    let serial = crypto::hex(&serial_bytes[first..]).to_ascii_uppercase();
    let spki = tbs
        .subject_public_key_info
        .to_der()
        .map_err(|e| bad(e.to_string()))?;
    let key = RsaVerifier::from_spki_der(&spki, &format!("{what} certificate {serial}")).map_err(
        |source| KeysError::CertificateKey {
            what: what.to_owned(),
            serial: serial.clone(),
            source,
        },
    )?;
    let unix = |t: x509_cert::time::Time| {
        i64::try_from(t.to_unix_duration().as_secs()).unwrap_or(i64::MAX)
    };
    Ok(CertificateInfo {
        serial,
        key,
        not_before: unix(tbs.validity.not_before),
        not_after: unix(tbs.validity.not_after),
    })
}

/// Reads the first certificate of a PEM file (`apiclient_cert.pem`: the merchant API
/// certificate, whose serial is the `serial_no` of every request).
pub fn read_certificate_pem(pem: &str, what: &str) -> Result<CertificateInfo, KeysError> {
    let certificates = crypto::pem_certificates(pem, what).map_err(|source| KeysError::Pem {
        what: what.to_owned(),
        source,
    })?;
    let der = certificates
        .first()
        .ok_or_else(|| KeysError::NoCertificate {
            what: what.to_owned(),
        })?;
    read_certificate(der, what, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{GeneratedKey, RsaSigner};

    const NOW: i64 = 1_763_000_000;
    const KEY_ID: &str = "PUB_KEY_ID_0114232134912410000000000000";
    const BODY: &[u8] = br#"{"authinfo":"A"}"#;

    fn platform() -> &'static GeneratedKey {
        crate::crypto::test_key(1)
    }

    fn signed_headers(serial: &str, timestamp: i64, body: &[u8]) -> http::HeaderMap {
        let nonce = "5K8264ILTKCH16CQ2502SI8ZNMTM67VS";
        let message = response_message(&timestamp.to_string(), nonce, body);
        let signature = RsaSigner::from_pem(&platform().private_pem, "platform")
            .expect("key")
            .sign_base64(&message)
            .expect("sign");
        let mut headers = http::HeaderMap::new();
        for (name, value) in [
            (HEADER_SERIAL, serial.to_owned()),
            (HEADER_TIMESTAMP, timestamp.to_string()),
            (HEADER_NONCE, nonce.to_owned()),
            (HEADER_SIGNATURE, signature),
        ] {
            headers.insert(name, value.parse().expect("header value"));
        }
        headers
    }

    fn public_key_mode() -> PlatformKeys {
        let mut keys = PlatformKeys::new();
        keys.add_public_key_pem(KEY_ID, &platform().public.to_pem(), "pub_key.pem")
            .expect("public key");
        keys
    }

    /// A self-signed certificate for the platform key, with the given serial and validity.
    fn certificate_pem(serial: &[u8], not_after_year: i32) -> String {
        let key = rcgen::KeyPair::from_pem(&platform().private_pem).expect("rsa key for rcgen");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.serial_number = Some(rcgen::SerialNumber::from_slice(serial));
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(not_after_year, 1, 1);
        params.self_signed(&key).expect("self-signed").pem()
    }

    #[test]
    fn response_message_is_three_newline_terminated_lines() {
        assert_eq!(
            response_message("1554209980", "N", b"{}"),
            b"1554209980\nN\n{}\n"
        );
        assert_eq!(response_message("1", "N", b""), b"1\nN\n\n");
    }

    #[test]
    fn answer_signed_with_the_public_key_verifies() {
        let keys = public_key_mode();
        assert_eq!(
            keys.verify(&signed_headers(KEY_ID, NOW, BODY), BODY, NOW),
            Ok(())
        );
    }

    #[test]
    fn timestamp_300_seconds_away_is_refused_and_299_accepted() {
        let keys = public_key_mode();
        for (signed_at, want) in [
            (NOW - 299, Ok(())),
            (NOW + 299, Ok(())),
            (NOW - 300, Err(SignatureError::Stale { skew_secs: -300 })),
            (NOW + 300, Err(SignatureError::Stale { skew_secs: 300 })),
            (NOW - 301, Err(SignatureError::Stale { skew_secs: -301 })),
        ] {
            let got = keys.verify(&signed_headers(KEY_ID, signed_at, BODY), BODY, NOW);
            assert_eq!(got, want, "signed at now{:+}", signed_at - NOW);
        }
    }

    #[test]
    fn each_missing_header_is_named() {
        let keys = public_key_mode();
        for name in [
            HEADER_SERIAL,
            HEADER_TIMESTAMP,
            HEADER_NONCE,
            HEADER_SIGNATURE,
        ] {
            let mut headers = signed_headers(KEY_ID, NOW, BODY);
            headers.remove(name);
            assert_eq!(
                keys.verify(&headers, BODY, NOW),
                Err(SignatureError::MissingHeader(name))
            );
        }
        let mut headers = signed_headers(KEY_ID, NOW, BODY);
        headers.insert(HEADER_TIMESTAMP, "soon".parse().expect("value"));
        assert_eq!(
            keys.verify(&headers, BODY, NOW),
            Err(SignatureError::BadHeader(HEADER_TIMESTAMP))
        );
    }

    #[test]
    fn unknown_serial_and_tampered_body_are_refused() {
        let keys = public_key_mode();
        let other = "PUB_KEY_ID_0000000000000000000000000001";
        assert_eq!(
            keys.verify(&signed_headers(other, NOW, BODY), BODY, NOW),
            Err(SignatureError::UnknownSerial {
                serial: other.into()
            })
        );
        assert_eq!(
            keys.verify(
                &signed_headers(KEY_ID, NOW, BODY),
                br#"{"authinfo":"B"}"#,
                NOW
            ),
            Err(SignatureError::Invalid {
                serial: KEY_ID.into()
            })
        );
    }

    /// Platform certificate mode: the serial is read as WeChat Pay prints it (upper-case hex,
    /// no sign byte even when the top bit is set) and the certificate's key verifies.
    #[test]
    fn platform_certificate_is_found_by_its_hex_serial() {
        let serial = [0x9F, 0x57, 0xF0, 0x9E, 0xFD, 0xC0, 0x96, 0xDE, 0x15, 0xEB];
        let mut keys = PlatformKeys::new();
        let serials = keys
            .add_certificates_pem(&certificate_pem(&serial, 2099), "wechatpay certificates")
            .expect("certificate");
        assert_eq!(serials, ["9F57F09EFDC096DE15EB"]);
        let headers = signed_headers("9F57F09EFDC096DE15EB", NOW, BODY);
        assert_eq!(keys.verify(&headers, BODY, NOW), Ok(()));
        assert_eq!(
            keys.verify(&headers, b"{}", NOW),
            Err(SignatureError::Invalid {
                serial: "9F57F09EFDC096DE15EB".into()
            })
        );
    }

    #[test]
    fn expired_platform_certificate_is_refused() {
        let mut keys = PlatformKeys::new();
        keys.add_certificates_pem(&certificate_pem(&[0x12, 0x34], 2021), "old certificate")
            .expect("certificate");
        assert_eq!(
            keys.verify(&signed_headers("1234", NOW, BODY), BODY, NOW),
            Err(SignatureError::CertificateNotValid {
                serial: "1234".into()
            })
        );
    }

    #[test]
    fn certificate_file_without_certificates_is_an_error() {
        let mut keys = PlatformKeys::new();
        let err = keys
            .add_certificates_pem(&platform().public.to_pem(), "platform_cert.pem")
            .expect_err("a file without certificates is refused");
        assert!(matches!(err, KeysError::NoCertificate { .. }), "{err}");
        assert!(err.to_string().contains("platform_cert.pem"), "{err}");
        assert!(keys.is_empty());
    }
}
