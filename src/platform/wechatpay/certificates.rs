//! WeChat Pay platform certificates: `GET /v3/certificates` and the APIv3 key that opens them.
//!
//! WeChat Pay answers with every platform certificate it may sign with, each encrypted with the
//! merchant's APIv3 key (set in the merchant console; 32 bytes) as AEAD_AES_256_GCM, with the
//! nonce and associated data given beside the ciphertext (`ciphertext` is base64 of the
//! encrypted bytes followed by the 16-byte tag). Owns: the APIv3 key, the decryption (ring), the
//! answer's shape, and which key the answer itself must verify with:
//!
//! - a key already trusted (configured, or downloaded before) when the answer names one;
//! - the first time (no platform certificate trusted yet), the decrypted set itself, as WeChat
//!   Pay's certificate downloader and SDKs do: a certificate that decrypts with the APIv3 key
//!   comes from someone who holds that key, that is WeChat Pay (or the merchant);
//! - otherwise the answer is refused: a signer that is neither trusted nor first is not taken.
//!
//! It must not keep certificates (the proxy's keeper does) and must not log the APIv3 key.

use std::fmt;

use base64::Engine as _;
use ring::aead;
use serde::Deserialize;

use super::client::{WechatPayClient, WechatPayError};
use super::verify::{
    CertificateInfo, HEADER_SERIAL, PlatformKeys, SignatureError, read_certificate_pem,
};
use crate::crypto::BASE64;

/// The one encryption WeChat Pay uses for platform certificates.
pub const ALGORITHM: &str = "AEAD_AES_256_GCM";
/// The endpoint.
pub const ENDPOINT: &str = "GET /v3/certificates";

/// Why a certificate could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecryptError {
    #[error("the APIv3 key must be 32 bytes (it is {0}): the key set in the merchant console")]
    KeyLength(usize),
    #[error("the nonce must be 12 bytes (it is {0})")]
    NonceLength(usize),
    #[error("the ciphertext is not valid base64")]
    Base64,
    #[error(
        "the ciphertext does not decrypt with the APIv3 key (a wrong apiv3_key_file, or an altered answer)"
    )]
    Open,
    #[error("algorithm {0:?} is not {ALGORITHM}")]
    Algorithm(String),
}

/// The merchant's APIv3 key. A secret: its `Debug` form shows nothing of it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiV3Key([u8; 32]);

impl fmt::Debug for ApiV3Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiV3Key(..)")
    }
}

impl ApiV3Key {
    /// The key as the merchant console shows it: 32 characters (surrounding whitespace, such as
    /// a file's last newline, is not part of it).
    pub fn from_text(text: &str) -> Result<Self, DecryptError> {
        let bytes = text.trim().as_bytes();
        <[u8; 32]>::try_from(bytes)
            .map(Self)
            .map_err(|_| DecryptError::KeyLength(bytes.len()))
    }

    /// Opens one AEAD_AES_256_GCM ciphertext (base64 of ciphertext + tag).
    pub fn decrypt(
        &self,
        nonce: &str,
        associated_data: &str,
        ciphertext_b64: &str,
    ) -> Result<Vec<u8>, DecryptError> {
        let nonce = aead::Nonce::try_assume_unique_for_key(nonce.as_bytes())
            .map_err(|_| DecryptError::NonceLength(nonce.len()))?;
        let mut in_out = BASE64
            .decode(ciphertext_b64.trim())
            .map_err(|_| DecryptError::Base64)?;
        // A 32-byte key is what AES-256 takes: `UnboundKey::new` fails only on another length.
        let key = aead::LessSafeKey::new(
            aead::UnboundKey::new(&aead::AES_256_GCM, &self.0).map_err(|_| DecryptError::Open)?,
        );
        let plain = key
            .open_in_place(
                nonce,
                aead::Aad::from(associated_data.as_bytes()),
                &mut in_out,
            )
            .map_err(|_| DecryptError::Open)?;
        Ok(plain.to_vec())
    }
}

// === the answer ===

/// `GET /v3/certificates` as WeChat Pay writes it.
#[derive(Debug, PartialEq, Eq, Deserialize)]
pub struct CertificatesAnswer {
    pub data: Vec<EncryptedCertificate>,
}

/// One entry of the answer.
#[derive(Debug, PartialEq, Eq, Deserialize)]
pub struct EncryptedCertificate {
    pub serial_no: String,
    /// RFC 3339.
    pub effective_time: String,
    /// RFC 3339.
    pub expire_time: String,
    pub encrypt_certificate: EncryptCertificate,
}

/// The encrypted certificate.
#[derive(Debug, PartialEq, Eq, Deserialize)]
pub struct EncryptCertificate {
    pub algorithm: String,
    pub nonce: String,
    pub associated_data: String,
    pub ciphertext: String,
}

/// A platform certificate as downloaded: what it says and its PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadedCertificate {
    pub info: CertificateInfo,
    pub pem: String,
}

/// Which key the answer verified with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verification {
    /// A key already trusted (configured or downloaded before), by its serial.
    Trusted(String),
    /// The first download: one of the certificates just decrypted, by its serial.
    FirstUse(String),
}

/// A verified download.
#[derive(Debug, Clone)]
pub struct Download {
    pub certificates: Vec<DownloadedCertificate>,
    pub verification: Verification,
    pub request_id: Option<String>,
}

/// Reads the body of a `GET /v3/certificates` answer (a JSON object). The error gives the
/// position and category only: serde_json's message may quote body values.
pub fn read_answer(body: &[u8]) -> Result<CertificatesAnswer, String> {
    crate::json::from_slice(body)
        .map_err(|e| format!("{:?} error at column {}", e.classify(), e.column()))
}

/// Decrypts every entry of an answer and checks each is the certificate its entry names.
pub fn open_answer(
    answer: &CertificatesAnswer,
    key: &ApiV3Key,
) -> Result<Vec<DownloadedCertificate>, String> {
    let mut out = Vec::with_capacity(answer.data.len());
    for entry in &answer.data {
        let e = &entry.encrypt_certificate;
        if e.algorithm != ALGORITHM {
            return Err(DecryptError::Algorithm(e.algorithm.clone()).to_string());
        }
        let plain = key
            .decrypt(&e.nonce, &e.associated_data, &e.ciphertext)
            .map_err(|err| format!("certificate {}: {err}", entry.serial_no))?;
        let pem = String::from_utf8(plain)
            .map_err(|_| format!("certificate {} is not PEM text", entry.serial_no))?;
        let what = format!("platform certificate {}", entry.serial_no);
        let info = read_certificate_pem(&pem, &what).map_err(|err| crate::error_chain(&err))?;
        if !info.serial.eq_ignore_ascii_case(&entry.serial_no) {
            return Err(format!(
                "the entry for {} holds certificate {}",
                entry.serial_no, info.serial
            ));
        }
        out.push(DownloadedCertificate { info, pem });
    }
    if out.is_empty() {
        return Err("the answer holds no certificate".to_owned());
    }
    Ok(out)
}

impl WechatPayClient {
    /// `GET /v3/certificates`: downloads, decrypts and verifies the platform certificates (see
    /// the module doc for the key the answer must verify with). The client's own keys are not
    /// changed; the caller decides what to keep.
    pub async fn download_certificates(&self, key: &ApiV3Key) -> Result<Download, WechatPayError> {
        let raw = self
            .send(
                reqwest::Method::GET,
                "/v3/certificates",
                None,
                None,
                ENDPOINT,
            )
            .await?;
        let malformed = |reason: String| WechatPayError::Malformed {
            endpoint: ENDPOINT,
            status: raw.status,
            request_id: raw.request_id.clone(),
            reason,
        };
        let answer = read_answer(&raw.body).map_err(malformed)?;
        let certificates = open_answer(&answer, key).map_err(|reason| WechatPayError::Decrypt {
            endpoint: ENDPOINT,
            status: raw.status,
            request_id: raw.request_id.clone(),
            reason,
        })?;
        let trusted = self.keys();
        let signer = raw
            .headers
            .get(HEADER_SERIAL)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .trim()
            .to_owned();
        let bad = |source| WechatPayError::BadSignature {
            endpoint: ENDPOINT,
            status: raw.status,
            request_id: raw.request_id.clone(),
            source,
        };
        let now = crate::units::unix_now();
        let verification = if trusted.contains(&signer) {
            trusted.verify(&raw.headers, &raw.body, now).map_err(bad)?;
            Verification::Trusted(signer)
        } else if !trusted.has_certificates() {
            let mut first = PlatformKeys::new();
            for c in &certificates {
                first.add_certificate(c.info.clone());
            }
            first.verify(&raw.headers, &raw.body, now).map_err(bad)?;
            Verification::FirstUse(signer)
        } else {
            return Err(bad(SignatureError::UnknownSerial { serial: signer }));
        };
        tracing::info!(
            request_id = raw.request_id.as_deref(),
            certificates = certificates.len(),
            verified_with = ?verification,
            "wechat pay platform certificates downloaded"
        );
        Ok(Download {
            certificates,
            verification,
            request_id: raw.request_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A known-answer vector derived with Python's `cryptography` (OpenSSL underneath), an
    /// implementation independent of ring:
    ///
    /// ```text
    /// AESGCM(b"AuthinfodTestApiV3Key0123456789a").encrypt(b"61f9c719728a", PLAIN, b"certificate")
    /// ```
    const KAT_KEY: &str = "AuthinfodTestApiV3Key0123456789a";
    const KAT_NONCE: &str = "61f9c719728a";
    const KAT_AAD: &str = "certificate";
    const KAT_PLAIN: &str =
        "-----BEGIN CERTIFICATE-----\nMIIBauthinfod-known-answer\n-----END CERTIFICATE-----\n";
    const KAT_CIPHERTEXT: &str = "qBasZb1hR5WabHlKA+k5XQccl8BPogi0MyG0dESexhoc7PsoTOSGUZCEX5P3SNsAHGyTRpnO7HJVSO/dRqYTfzla4iHp3Qg2prU50eIEXbhVR5EaDOGz2Q88gxSOS21cbA==";

    fn kat_key() -> ApiV3Key {
        ApiV3Key::from_text(KAT_KEY).expect("32 bytes")
    }

    #[test]
    fn aes_256_gcm_known_answer_decrypts() {
        let plain = kat_key()
            .decrypt(KAT_NONCE, KAT_AAD, KAT_CIPHERTEXT)
            .expect("decrypts");
        assert_eq!(plain, KAT_PLAIN.as_bytes());
    }

    /// Any change to the key, nonce, associated data, ciphertext or tag is refused (GCM
    /// authenticates all of them).
    #[test]
    fn aes_256_gcm_refuses_anything_altered() {
        let mut flipped = BASE64.decode(KAT_CIPHERTEXT).expect("b64");
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        let flipped = BASE64.encode(flipped);
        let other_key = ApiV3Key::from_text("AuthinfodTestApiV3Key0123456789b").expect("key");
        for (case, key, nonce, aad, ct) in [
            ("key", &other_key, KAT_NONCE, KAT_AAD, KAT_CIPHERTEXT),
            ("nonce", &kat_key(), "61f9c719728b", KAT_AAD, KAT_CIPHERTEXT),
            ("aad", &kat_key(), KAT_NONCE, "certificatf", KAT_CIPHERTEXT),
            ("tag", &kat_key(), KAT_NONCE, KAT_AAD, flipped.as_str()),
        ] {
            assert_eq!(
                key.decrypt(nonce, aad, ct),
                Err(DecryptError::Open),
                "{case}"
            );
        }
        assert_eq!(
            kat_key().decrypt("short", KAT_AAD, KAT_CIPHERTEXT),
            Err(DecryptError::NonceLength(5))
        );
        assert_eq!(
            kat_key().decrypt(KAT_NONCE, KAT_AAD, "!!"),
            Err(DecryptError::Base64)
        );
        assert_eq!(
            ApiV3Key::from_text("too short"),
            Err(DecryptError::KeyLength(9))
        );
        assert_eq!(
            ApiV3Key::from_text(&format!("{KAT_KEY}\n")).map(|_| ()),
            Ok(())
        );
        assert_eq!(format!("{:?}", kat_key()), "ApiV3Key(..)");
    }

    /// Python's `cryptography` (AESGCM), reading key, nonce, associated data and text as JSON.
    const PYTHON_AESGCM: &str = r#"
import base64, json, sys
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
i = json.loads(sys.stdin.read())
g = AESGCM(i['key'].encode())
if i['op'] == 'encrypt':
    print(base64.b64encode(g.encrypt(i['nonce'].encode(), i['text'].encode(), i['aad'].encode())).decode())
else:
    print(g.decrypt(i['nonce'].encode(), base64.b64decode(i['text']), i['aad'].encode()).decode(), end='')
"#;

    fn python(input: serde_json::Value) -> String {
        let out = crate::test_support::run_piped(
            "python3",
            &["-c", PYTHON_AESGCM],
            input.to_string().as_bytes(),
            "scripts/setup installs python3 and python3-cryptography",
        );
        String::from_utf8(out).expect("utf-8")
    }

    /// At test time, with a fresh key and text: what Python encrypts, ring opens; what the
    /// sandbox seals (ring), Python opens.
    #[test]
    fn aes_256_gcm_agrees_with_python_cryptography_both_ways() {
        let random = |n| {
            crate::crypto::random_bytes(n)
                .expect("random")
                .iter()
                .map(|b| char::from(b'a' + b % 26))
                .collect::<String>()
        };
        let (key_text, nonce) = (random(32), random(12));
        let key = ApiV3Key::from_text(&key_text).expect("key");
        let text = format!("-----BEGIN CERTIFICATE-----\n{}\n", random(200));
        let ciphertext = python(serde_json::json!({
            "op": "encrypt", "key": key_text, "nonce": nonce, "aad": "certificate", "text": text,
        }));
        assert_eq!(
            key.decrypt(&nonce, "certificate", &ciphertext)
                .expect("ring opens"),
            text.as_bytes()
        );
        let sealed =
            crate::sandbox::wechatpay::seal_certificate(&key_text, &nonce, "certificate", &text)
                .expect("seal");
        let opened = python(serde_json::json!({
            "op": "decrypt", "key": key_text, "nonce": nonce, "aad": "certificate", "text": sealed,
        }));
        assert_eq!(opened, text);
    }
}
