//! RSA and hashing primitives shared by the wire contract and the platform clients.
//!
//! Owns: PEM decoding (with rustls-pki-types), RSA SHA256withRSA (PKCS#1 v1.5) signing with ring (constant-time),
//! verification with ring, RSA key generation and public-key parsing with the `rsa` crate,
//! fingerprints, nonces and base64; [`Signer`], the one signing key type every signature goes
//! through (a ring key, or with the `pkcs11` feature a key inside a PKCS#11 token, [`pkcs11`]),
//! and [`KeySource`], where a configured private key is (a file or a `pkcs11:` URI). It must not
//! sign with the `rsa` crate (RUSTSEC-2023-0071: its private-key operation is not
//! constant-time); the `rsa` crate only generates keys and parses public keys here.

pub mod pkcs11;

use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use ring::rand::SecureRandom as _;
use ring::signature;
use rsa::pkcs1::EncodeRsaPublicKey as _;
use rsa::pkcs8::{DecodePublicKey as _, EncodePrivateKey as _, EncodePublicKey as _};

/// Standard base64 with padding, the encoding every platform here uses for signatures.
pub const BASE64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Errors of key handling and signing.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("cannot read key file {path}")]
    ReadKey {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} is not PEM: {reason}")]
    NotPem { what: String, reason: &'static str },
    #[error(
        "{what} is not a usable RSA private key (PKCS#8 or PKCS#1, 2048 to 4096 bits): {reason}"
    )]
    BadPrivateKey { what: String, reason: String },
    #[error("{what} is not a usable RSA public key (SPKI or PKCS#1 PEM): {reason}")]
    BadPublicKey { what: String, reason: String },
    #[error("rsa signing failed")]
    Sign,
    #[error("rsa key generation failed: {0}")]
    Generate(String),
    #[error("the system random number generator failed")]
    Random,
    #[cfg(feature = "pkcs11")]
    #[error(transparent)]
    Token(Box<pkcs11::TokenError>),
}

#[cfg(feature = "pkcs11")]
impl From<pkcs11::TokenError> for CryptoError {
    fn from(e: pkcs11::TokenError) -> Self {
        Self::Token(Box::new(e))
    }
}

impl CryptoError {
    /// True when the same signature may succeed later with nothing changed: a PKCS#11 token
    /// that is away (unplugged) rather than refusing.
    pub fn is_transient(&self) -> bool {
        match self {
            #[cfg(feature = "pkcs11")]
            Self::Token(e) => e.is_transient(),
            _ => false,
        }
    }
}

// === PEM ===

/// The reason a PEM text did not decode, for [`CryptoError::NotPem`].
fn pem_reason(e: &rustls_pki_types::pem::Error) -> &'static str {
    use rustls_pki_types::pem::Error as E;
    match e {
        E::MissingSectionEnd { .. } => "a BEGIN line has no matching END line",
        E::IllegalSectionStart { .. } => "a BEGIN line is malformed",
        E::Base64Decode(_) => "a block is not valid base64",
        E::NoItemsFound => "no -----BEGIN ...----- block of the expected kind found",
        _ => "it cannot be read as PEM",
    }
}

/// The DER of every `CERTIFICATE` block in `text`, in order (other blocks are skipped; none
/// at all is for the caller to judge).
pub fn pem_certificates(text: &str, what: &str) -> Result<Vec<Vec<u8>>, CryptoError> {
    use rustls_pki_types::pem::PemObject as _;
    let certs = rustls_pki_types::CertificateDer::pem_slice_iter(text.as_bytes())
        .map(|c| c.map(|c| c.as_ref().to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CryptoError::NotPem {
            what: what.to_owned(),
            reason: pem_reason(&e),
        })?;
    Ok(certs)
}

/// One certificate's DER as a `CERTIFICATE` PEM block.
pub fn certificate_pem(der: &[u8]) -> String {
    use rsa::pkcs8::der::pem::{LineEnding, encode_string};
    // Encoding bytes as PEM cannot fail but for allocation; an empty string is refused by any
    // reader, never taken for a certificate.
    encode_string("CERTIFICATE", LineEnding::LF, der).unwrap_or_default()
}

/// True when `text` holds PEM armour (a `-----BEGIN ` line).
fn is_pem(text: &str) -> bool {
    text.contains("-----BEGIN ")
}

/// Decodes a key given as bare base64 (no PEM armour): whitespace and a byte-order mark are
/// ignored, anything else that is not base64 is an error.
fn bare_base64(text: &str, what: &str) -> Result<Vec<u8>, CryptoError> {
    let compact: String = text
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '\u{feff}')
        .collect();
    if compact.is_empty() {
        return Err(CryptoError::NotPem {
            what: what.to_owned(),
            reason: "the file is empty",
        });
    }
    BASE64
        .decode(compact.as_bytes())
        .map_err(|_| CryptoError::NotPem {
            what: what.to_owned(),
            reason: "neither a -----BEGIN ...----- block nor bare base64",
        })
}

// === impl RsaSigner ===

/// An RSA private key that signs SHA256withRSA (PKCS#1 v1.5) with ring.
pub struct RsaSigner {
    key: signature::RsaKeyPair,
    rng: ring::rand::SystemRandom,
}

impl fmt::Debug for RsaSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RsaSigner")
            .field("modulus_bits", &(self.key.public().modulus_len() * 8))
            .finish_non_exhaustive()
    }
}

impl RsaSigner {
    /// Parses a PEM private key: `PRIVATE KEY` (PKCS#8) or `RSA PRIVATE KEY` (PKCS#1).
    pub fn from_pem(pem: &str, what: &str) -> Result<Self, CryptoError> {
        use rustls_pki_types::PrivateKeyDer;
        use rustls_pki_types::pem::PemObject as _;
        let bad = |reason: String| CryptoError::BadPrivateKey {
            what: what.to_owned(),
            reason,
        };
        let der = PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| match e {
            rustls_pki_types::pem::Error::NoItemsFound => {
                bad("no PRIVATE KEY or RSA PRIVATE KEY block".into())
            }
            e => CryptoError::NotPem {
                what: what.to_owned(),
                reason: pem_reason(&e),
            },
        })?;
        let key = match &der {
            PrivateKeyDer::Pkcs8(k) => signature::RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
            PrivateKeyDer::Pkcs1(k) => signature::RsaKeyPair::from_der(k.secret_pkcs1_der()),
            _ => return Err(bad("not an RSA key (an EC key?)".into())),
        }
        .map_err(|e| bad(e.to_string()))?;
        Ok(Self {
            key,
            rng: ring::rand::SystemRandom::new(),
        })
    }

    /// Parses a private key as consoles hand it out: PEM (as [`from_pem`](Self::from_pem)), or
    /// bare base64 of the DER without armour (the Alipay key tool's and console's form), PKCS#8
    /// or PKCS#1, on one line or wrapped.
    pub fn from_pem_or_base64(text: &str, what: &str) -> Result<Self, CryptoError> {
        if is_pem(text) {
            return Self::from_pem(text, what);
        }
        let der = bare_base64(text, what)?;
        let key = signature::RsaKeyPair::from_pkcs8(&der)
            .or_else(|pkcs8| signature::RsaKeyPair::from_der(&der).map_err(|_| pkcs8))
            .map_err(|e| CryptoError::BadPrivateKey {
                what: what.to_owned(),
                reason: format!("bare base64, but neither PKCS#8 nor PKCS#1 DER: {e}"),
            })?;
        Ok(Self {
            key,
            rng: ring::rand::SystemRandom::new(),
        })
    }

    /// Reads and parses a PEM private key file.
    pub fn from_file(path: &Path) -> Result<Self, CryptoError> {
        let text = std::fs::read_to_string(path).map_err(|source| CryptoError::ReadKey {
            path: path.to_owned(),
            source,
        })?;
        Self::from_pem(&text, &path.display().to_string())
    }

    /// SHA256withRSA over `message`, raw signature bytes.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut sig = vec![0; self.key.public().modulus_len()];
        self.key
            .sign(&signature::RSA_PKCS1_SHA256, &self.rng, message, &mut sig)
            .map_err(|_| CryptoError::Sign)?;
        Ok(sig)
    }

    /// SHA256withRSA over `message`, base64.
    pub fn sign_base64(&self, message: &[u8]) -> Result<String, CryptoError> {
        Ok(BASE64.encode(self.sign(message)?))
    }

    /// The public half, for verification and fingerprints.
    pub fn public_key(&self) -> Result<RsaVerifier, CryptoError> {
        RsaVerifier::from_pkcs1_der(self.key.public().as_ref(), "the signer's public key")
    }
}

// === impl Signer ===

/// A private key that signs SHA256withRSA (PKCS#1 v1.5): in memory with ring, or inside a
/// PKCS#11 token (feature `pkcs11`), where the private half never leaves the token.
#[derive(Debug)]
// One per configured key, made at start and never moved in a hot path: its size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Signer {
    Software(RsaSigner),
    #[cfg(feature = "pkcs11")]
    Token(Box<pkcs11::TokenSigner>),
}

impl From<RsaSigner> for Signer {
    fn from(key: RsaSigner) -> Self {
        Self::Software(key)
    }
}

#[cfg(feature = "pkcs11")]
impl From<pkcs11::TokenSigner> for Signer {
    fn from(key: pkcs11::TokenSigner) -> Self {
        Self::Token(Box::new(key))
    }
}

impl Signer {
    /// Opens the key `source` names: a token key through its URI (the file case needs the
    /// caller's file checks and parser: see `config_file::Problems::signer`).
    #[cfg(feature = "pkcs11")]
    pub fn open_token(uri: &pkcs11::Pkcs11Uri) -> Result<Self, CryptoError> {
        Ok(Self::Token(Box::new(pkcs11::TokenSigner::open(uri)?)))
    }

    /// SHA256withRSA over `message`, raw signature bytes.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, CryptoError> {
        match self {
            Self::Software(key) => key.sign(message),
            // A token answers in milliseconds to seconds (a network HSM, a TPM, a token being
            // looked for again after it went away): on a multi-threaded runtime the worker is
            // handed over meanwhile, so other requests are not stalled behind the signature.
            #[cfg(feature = "pkcs11")]
            Self::Token(key) => {
                let multi_thread = tokio::runtime::Handle::try_current().is_ok_and(|h| {
                    h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
                });
                if multi_thread {
                    Ok(tokio::task::block_in_place(|| key.sign(message))?)
                } else {
                    Ok(key.sign(message)?)
                }
            }
        }
    }

    /// SHA256withRSA over `message`, base64.
    pub fn sign_base64(&self, message: &[u8]) -> Result<String, CryptoError> {
        Ok(BASE64.encode(self.sign(message)?))
    }

    /// The public half, for verification and fingerprints.
    pub fn public_key(&self) -> Result<RsaVerifier, CryptoError> {
        match self {
            Self::Software(key) => key.public_key(),
            #[cfg(feature = "pkcs11")]
            Self::Token(key) => Ok(key.public_key().clone()),
        }
    }

    /// What an operator should hear about the key at start (an extractable token key); empty
    /// for a key file.
    pub fn warnings(&self) -> Vec<String> {
        match self {
            Self::Software(_) => Vec::new(),
            #[cfg(feature = "pkcs11")]
            Self::Token(key) => key.warnings(),
        }
    }
}

// === impl KeySource ===

/// Where a configured private key is: a PEM file, or a key inside a PKCS#11 token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    File(PathBuf),
    Pkcs11(Box<pkcs11::Pkcs11Uri>),
}

impl KeySource {
    /// A `pkcs11:` URI (which must parse), else a file path.
    pub fn parse(text: &str) -> Result<Self, pkcs11::UriError> {
        if pkcs11::Pkcs11Uri::is_uri(text) {
            pkcs11::Pkcs11Uri::parse(text).map(|uri| Self::Pkcs11(Box::new(uri)))
        } else {
            Ok(Self::File(PathBuf::from(text)))
        }
    }

    /// The file, when the key is one.
    pub fn file(&self) -> Option<&Path> {
        match self {
            Self::File(path) => Some(path),
            Self::Pkcs11(_) => None,
        }
    }
}

/// The path, or the URI with its PIN hidden.
impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Pkcs11(uri) => write!(f, "{uri}"),
        }
    }
}

// === impl RsaVerifier ===

/// An RSA public key that verifies SHA256withRSA (PKCS#1 v1.5) signatures with ring.
#[derive(Clone, PartialEq, Eq)]
pub struct RsaVerifier {
    /// PKCS#1 `RSAPublicKey` DER, the form ring verifies with.
    pkcs1: Vec<u8>,
    /// SubjectPublicKeyInfo DER, the form fingerprints and PEM exports use.
    spki: Vec<u8>,
}

impl fmt::Debug for RsaVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RsaVerifier({})", self.fingerprint())
    }
}

impl RsaVerifier {
    /// Parses a PEM public key: `PUBLIC KEY` (SPKI) or `RSA PUBLIC KEY` (PKCS#1).
    pub fn from_pem(pem: &str, what: &str) -> Result<Self, CryptoError> {
        use rustls_pki_types::SubjectPublicKeyInfoDer;
        use rustls_pki_types::pem::PemObject as _;
        match SubjectPublicKeyInfoDer::from_pem_slice(pem.as_bytes()) {
            Ok(spki) => Self::from_spki_der(spki.as_ref(), what),
            // rustls-pki-types knows no `RSA PUBLIC KEY` label; the rsa crate reads PKCS#1.
            Err(rustls_pki_types::pem::Error::NoItemsFound)
                if pem.contains("-----BEGIN RSA PUBLIC KEY-----") =>
            {
                use rsa::pkcs1::DecodeRsaPublicKey as _;
                Self::from_parsed(rsa::RsaPublicKey::from_pkcs1_pem(pem.trim()), what)
            }
            Err(rustls_pki_types::pem::Error::NoItemsFound) => Err(CryptoError::BadPublicKey {
                what: what.to_owned(),
                reason: "no PUBLIC KEY or RSA PUBLIC KEY block".into(),
            }),
            Err(e) => Err(CryptoError::NotPem {
                what: what.to_owned(),
                reason: pem_reason(&e),
            }),
        }
    }

    /// Parses a public key as consoles hand it out: PEM (as [`from_pem`](Self::from_pem)), or
    /// bare base64 of the DER (the Alipay console's "支付宝公钥"), SubjectPublicKeyInfo or
    /// PKCS#1.
    pub fn from_pem_or_base64(text: &str, what: &str) -> Result<Self, CryptoError> {
        if is_pem(text) {
            return Self::from_pem(text, what);
        }
        let der = bare_base64(text, what)?;
        Self::from_spki_der(&der, what).or_else(|spki| {
            Self::from_pkcs1_der(&der, what).map_err(|_| match spki {
                CryptoError::BadPublicKey { what, reason } => CryptoError::BadPublicKey {
                    what,
                    reason: format!("bare base64, but neither SPKI nor PKCS#1 DER: {reason}"),
                },
                other => other,
            })
        })
    }

    /// Parses a DER SubjectPublicKeyInfo holding an RSA key.
    pub fn from_spki_der(der: &[u8], what: &str) -> Result<Self, CryptoError> {
        Self::from_parsed(rsa::RsaPublicKey::from_public_key_der(der), what)
    }

    /// Parses a DER PKCS#1 `RSAPublicKey`.
    pub fn from_pkcs1_der(der: &[u8], what: &str) -> Result<Self, CryptoError> {
        use rsa::pkcs1::DecodeRsaPublicKey as _;
        Self::from_parsed(rsa::RsaPublicKey::from_pkcs1_der(der), what)
    }

    /// An RSA public key from its modulus and public exponent (big-endian), as a PKCS#11 token
    /// shows them (CKA_MODULUS, CKA_PUBLIC_EXPONENT).
    pub fn from_modulus_exponent(n: &[u8], e: &[u8], what: &str) -> Result<Self, CryptoError> {
        let key = rsa::RsaPublicKey::new(
            rsa::BigUint::from_bytes_be(n),
            rsa::BigUint::from_bytes_be(e),
        );
        Self::from_parsed(key, what)
    }

    /// A key the rsa crate parsed, checked as [`from_rsa`](Self::from_rsa) does; its parse
    /// error as [`CryptoError::BadPublicKey`].
    fn from_parsed(
        parsed: Result<rsa::RsaPublicKey, impl fmt::Display>,
        what: &str,
    ) -> Result<Self, CryptoError> {
        let key = parsed.map_err(|e| CryptoError::BadPublicKey {
            what: what.to_owned(),
            reason: e.to_string(),
        })?;
        Self::from_rsa(&key, what)
    }

    fn from_rsa(key: &rsa::RsaPublicKey, what: &str) -> Result<Self, CryptoError> {
        use rsa::traits::PublicKeyParts as _;
        let bad = |reason: String| CryptoError::BadPublicKey {
            what: what.to_owned(),
            reason,
        };
        let bits = key.n().bits();
        if !(2048..=8192).contains(&bits) {
            return Err(bad(format!(
                "{bits}-bit modulus; 2048 to 8192 bits are accepted"
            )));
        }
        let pkcs1 = key.to_pkcs1_der().map_err(|e| bad(e.to_string()))?;
        let spki = key.to_public_key_der().map_err(|e| bad(e.to_string()))?;
        Ok(Self {
            pkcs1: pkcs1.as_bytes().to_vec(),
            spki: spki.as_bytes().to_vec(),
        })
    }

    /// True when `signature` is a valid SHA256withRSA signature of `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        signature::UnparsedPublicKey::new(&signature::RSA_PKCS1_2048_8192_SHA256, &self.pkcs1)
            .verify(message, signature)
            .is_ok()
    }

    /// Like [`verify`](Self::verify) with a base64 signature; bad base64 does not verify.
    pub fn verify_base64(&self, message: &[u8], signature_b64: &str) -> bool {
        BASE64
            .decode(signature_b64.trim().as_bytes())
            .is_ok_and(|sig| self.verify(message, &sig))
    }

    /// `SHA256:` and the hex SHA-256 of the SubjectPublicKeyInfo DER, the enrolment fingerprint.
    pub fn fingerprint(&self) -> String {
        format!("SHA256:{}", sha256_hex(&self.spki))
    }

    /// The key as a `PUBLIC KEY` (SPKI) PEM.
    pub fn to_pem(&self) -> String {
        use rsa::pkcs8::der::pem::{LineEnding, encode_string};
        // Encoding DER that we hold as PEM cannot fail but for allocation; an empty string
        // would be refused by any reader, never taken for a key.
        encode_string("PUBLIC KEY", LineEnding::LF, &self.spki).unwrap_or_default()
    }
}

// === key generation ===

/// A freshly generated RSA key pair, as PEM text.
#[derive(Clone)]
pub struct GeneratedKey {
    /// PKCS#8 `PRIVATE KEY` PEM. A secret: write it 0600, never log it.
    pub private_pem: String,
    pub public: RsaVerifier,
}

impl fmt::Debug for GeneratedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GeneratedKey")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

/// Generates an RSA key of `bits` bits with the `rsa` crate (generation is not a signing
/// operation, so RUSTSEC-2023-0071 does not apply) and checks that ring accepts it.
pub fn generate_rsa_key(bits: usize) -> Result<GeneratedKey, CryptoError> {
    let mut rng = rsa::rand_core::OsRng;
    let key = rsa::RsaPrivateKey::new(&mut rng, bits)
        .map_err(|e| CryptoError::Generate(e.to_string()))?;
    let private_pem = key
        .to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)
        .map_err(|e| CryptoError::Generate(e.to_string()))?
        .to_string();
    let public = RsaSigner::from_pem(&private_pem, "the generated key")?.public_key()?;
    Ok(GeneratedKey {
        private_pem,
        public,
    })
}

// === request signing strings ===

/// The string an APIv3-style request signature covers: `METHOD\nPATH?QUERY\nTIMESTAMP\nNONCE\nBODY\n`.
/// WeChat Pay's scheme ([`crate::platform::wechatpay::sign`]) and the device scheme that copies
/// its shape ([`crate::wire::auth`]) both sign it; each module re-exports it as
/// `signing_string`. `path_and_query` is the request target exactly as sent; a GET has an empty
/// body, so its string ends in `\n\n`.
pub fn request_signing_string(
    method: &str,
    path_and_query: &str,
    timestamp: i64,
    nonce: &str,
    body: &[u8],
) -> Vec<u8> {
    let timestamp = timestamp.to_string();
    let mut s = Vec::with_capacity(
        method.len() + path_and_query.len() + timestamp.len() + nonce.len() + body.len() + 5,
    );
    for line in [
        method.as_bytes(),
        path_and_query.as_bytes(),
        timestamp.as_bytes(),
        nonce.as_bytes(),
        body,
    ] {
        s.extend_from_slice(line);
        s.push(b'\n');
    }
    s
}

// === hashing and randomness ===

/// Lower-case hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// The first 8 hex digits of the SHA-256 of a secret: what logs carry instead of the secret.
pub fn secret_fingerprint(secret: &[u8]) -> String {
    let mut h = sha256_hex(secret);
    h.truncate(8);
    h
}

/// `n` random bytes from the operating system.
pub fn random_bytes(n: usize) -> Result<Vec<u8>, CryptoError> {
    let mut buf = vec![0; n];
    ring::rand::SystemRandom::new()
        .fill(&mut buf)
        .map_err(|_| CryptoError::Random)?;
    Ok(buf)
}

/// A random request nonce: 32 upper-case alphanumerics (WeChat Pay's own nonce_str shape).
pub fn nonce() -> Result<String, CryptoError> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let bytes = random_bytes(32)?;
    Ok(bytes
        .iter()
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect())
}

/// A uniformly distributed float in [0, 1) from the operating system's generator. Jitter and
/// backoff use it; a generator failure falls back to 0.5, the middle of the range.
pub fn random_unit() -> f64 {
    random_bytes(8)
        .ok()
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(|b| (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64)
        .unwrap_or(0.5)
}

/// RSA-2048 keys for the unit tests, made once per test binary: key generation is the slow part
/// of many tests, and a test needs distinct keys, not fresh ones. Key `i` is the same wherever it
/// is asked for; tests that need two different keys take two indexes.
#[cfg(test)]
pub(crate) fn test_key(i: usize) -> &'static GeneratedKey {
    use std::sync::OnceLock;
    const POOL: usize = 6;
    static KEYS: [OnceLock<GeneratedKey>; POOL] = [const { OnceLock::new() }; POOL];
    assert!(i < POOL, "the test key pool has {POOL} keys");
    KEYS[i].get_or_init(|| generate_rsa_key(2048).expect("keygen"))
}

/// What `openssl dgst -sha256 -sign` makes of `message` with the private key `private_pem`: the
/// independent SHA256withRSA the known-answer tests compare ring's signatures with (PKCS#1 v1.5
/// is deterministic).
#[cfg(test)]
pub(crate) fn openssl_sign(private_pem: &str, message: &[u8]) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&key_path, private_pem).expect("write key");
    let key_path = key_path.to_str().expect("a temporary path is UTF-8");
    crate::test_support::run_piped(
        "openssl",
        &["dgst", "-sha256", "-sign", key_path],
        message,
        "scripts/setup installs it",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> &'static GeneratedKey {
        test_key(0)
    }

    #[test]
    fn sign_then_verify_roundtrips_and_rejects_tampering() {
        let signer = RsaSigner::from_pem(&key().private_pem, "test").expect("parse");
        let sig = signer.sign_base64(b"hello").expect("sign");
        let public = RsaVerifier::from_pem(&key().public.to_pem(), "pub").expect("pub");
        assert!(public.verify_base64(b"hello", &sig));
        assert!(!public.verify_base64(b"hellO", &sig));
        assert!(!public.verify_base64(b"hello", "not base64!"));
        assert_eq!(signer.public_key().expect("pub"), public);
    }

    #[test]
    fn pkcs1_private_key_pem_is_accepted() {
        use rsa::pkcs1::EncodeRsaPrivateKey as _;
        use rsa::pkcs8::DecodePrivateKey as _;
        let k = rsa::RsaPrivateKey::from_pkcs8_pem(&key().private_pem).expect("pkcs8");
        let pem = k
            .to_pkcs1_pem(rsa::pkcs8::LineEnding::LF)
            .expect("pkcs1")
            .to_string();
        let signer = RsaSigner::from_pem(&pem, "pkcs1").expect("parse pkcs1");
        assert_eq!(signer.public_key().expect("pub"), key().public);
    }

    #[test]
    fn pem_errors_say_what_is_wrong() {
        let err = RsaSigner::from_pem("garbage", "device key").unwrap_err();
        assert!(err.to_string().contains("device key"), "{err}");
        let err = RsaSigner::from_pem("-----BEGIN PRIVATE KEY-----\nAAAA\n", "k").unwrap_err();
        assert!(err.to_string().contains("END"), "{err}");
        let err = RsaSigner::from_pem(
            "-----BEGIN PRIVATE KEY-----\n!!!\n-----END PRIVATE KEY-----\n",
            "k",
        )
        .unwrap_err();
        assert!(err.to_string().contains("base64"), "{err}");
        assert_eq!(
            pem_certificates(&key().public.to_pem(), "ca").ok(),
            Some(vec![])
        );
        let err = pem_certificates("-----BEGIN CERTIFICATE-----\n!!\n", "ca").unwrap_err();
        assert!(err.to_string().contains("ca"), "{err}");
        let pub_only = key().public.to_pem();
        let err = RsaSigner::from_pem(&pub_only, "k").unwrap_err();
        assert!(err.to_string().contains("PRIVATE KEY"), "{err}");
    }

    /// The DER inside one PEM block (tests).
    fn der_of(pem: &str) -> Vec<u8> {
        let (_, der) = rustls_pki_types::pem::from_buf(&mut pem.as_bytes())
            .expect("pem")
            .expect("one block");
        der
    }

    /// The Alipay console hands out keys as bare base64 (PKCS#8 or PKCS#1 private, SPKI
    /// public), on one line or wrapped; each is the same key as its PEM.
    #[test]
    fn bare_base64_keys_are_accepted_in_every_console_form() {
        use rsa::pkcs1::EncodeRsaPrivateKey as _;
        use rsa::pkcs8::DecodePrivateKey as _;
        let pkcs8 = der_of(&key().private_pem);
        let pkcs1 = rsa::RsaPrivateKey::from_pkcs8_der(&pkcs8)
            .expect("pkcs8")
            .to_pkcs1_der()
            .expect("pkcs1")
            .as_bytes()
            .to_vec();
        let one_line = |der: &[u8]| BASE64.encode(der);
        let wrapped = |der: &[u8]| {
            let b64 = BASE64.encode(der);
            let lines: Vec<&str> = b64
                .as_bytes()
                .chunks(64)
                .map(|c| std::str::from_utf8(c).expect("ascii"))
                .collect();
            format!("\u{feff}{}\r\n", lines.join("\r\n"))
        };
        for (form, text) in [
            ("pkcs8 one line", one_line(&pkcs8)),
            ("pkcs8 wrapped", wrapped(&pkcs8)),
            ("pkcs1 one line", one_line(&pkcs1)),
            ("pkcs1 wrapped", wrapped(&pkcs1)),
            ("pem", key().private_pem.clone()),
        ] {
            let signer = RsaSigner::from_pem_or_base64(&text, "app_private_key")
                .unwrap_or_else(|e| panic!("{form}: {e}"));
            assert_eq!(signer.public_key().expect("pub"), key().public, "{form}");
        }
        let spki = der_of(&key().public.to_pem());
        let pkcs1_public = rsa::RsaPublicKey::from_public_key_der(&spki)
            .expect("spki")
            .to_pkcs1_der()
            .expect("pkcs1")
            .as_bytes()
            .to_vec();
        for (form, text) in [
            ("spki one line", one_line(&spki)),
            ("spki wrapped", wrapped(&spki)),
            ("pkcs1 public", one_line(&pkcs1_public)),
            ("pem", key().public.to_pem()),
        ] {
            let public = RsaVerifier::from_pem_or_base64(&text, "alipay_public_key")
                .unwrap_or_else(|e| panic!("{form}: {e}"));
            assert_eq!(public, key().public, "{form}");
        }
    }

    #[test]
    fn bare_base64_that_is_no_key_is_refused_by_name() {
        let err = RsaSigner::from_pem_or_base64("not a key at all!", "alipay.app_private_key")
            .expect_err("refused");
        assert!(
            err.to_string().contains("alipay.app_private_key")
                && err.to_string().contains("bare base64"),
            "{err}"
        );
        let err =
            RsaSigner::from_pem_or_base64("AAAA", "alipay.app_private_key").expect_err("refused");
        assert!(
            err.to_string().contains("neither PKCS#8 nor PKCS#1"),
            "{err}"
        );
        // A public key where a private one is wanted.
        let spki = BASE64.encode(der_of(&key().public.to_pem()));
        assert!(RsaSigner::from_pem_or_base64(&spki, "k").is_err());
        let err = RsaVerifier::from_pem_or_base64("AAAA", "alipay.alipay_public_key")
            .expect_err("refused");
        assert!(err.to_string().contains("neither SPKI nor PKCS#1"), "{err}");
        assert!(RsaSigner::from_pem_or_base64(" \n", "k").is_err());
    }

    #[test]
    fn certificate_pem_round_trips() {
        let der = vec![0x30, 0x03, 0x02, 0x01, 0x07];
        let pem = certificate_pem(&der);
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----\n"), "{pem}");
        assert_eq!(pem_certificates(&pem, "bundle").expect("pem"), [der]);
    }

    #[test]
    fn small_keys_are_refused() {
        let mut rng = rsa::rand_core::OsRng;
        let small = rsa::RsaPrivateKey::new(&mut rng, 1024).expect("keygen");
        let der = small.to_public_key().to_public_key_der().expect("der");
        let err = RsaVerifier::from_spki_der(der.as_bytes(), "small").unwrap_err();
        assert!(err.to_string().contains("1024-bit"), "{err}");
    }

    #[test]
    fn fingerprint_is_sha256_of_spki() {
        use rustls_pki_types::pem::PemObject as _;
        let pem = key().public.to_pem();
        let der =
            rustls_pki_types::SubjectPublicKeyInfoDer::from_pem_slice(pem.as_bytes()).expect("pem");
        assert_eq!(
            key().public.fingerprint(),
            format!("SHA256:{}", sha256_hex(der.as_ref()))
        );
        assert_eq!(
            RsaVerifier::from_pem(&pem, "p").expect("round trip"),
            key().public
        );
        // PKCS#1 public keys (`RSA PUBLIC KEY`) read too.
        use rsa::pkcs1::EncodeRsaPublicKey as _;
        let pkcs1 = rsa::RsaPublicKey::from_public_key_der(der.as_ref())
            .expect("spki")
            .to_pkcs1_pem(rsa::pkcs8::LineEnding::LF)
            .expect("pkcs1");
        assert_eq!(
            RsaVerifier::from_pem(&pkcs1, "p").expect("pkcs1"),
            key().public
        );
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn nonces_differ_and_units_are_in_range() {
        let a = nonce().expect("nonce");
        assert_eq!(a.len(), 32);
        assert_ne!(a, nonce().expect("nonce"));
        for _ in 0..1000 {
            let u = random_unit();
            assert!((0.0..1.0).contains(&u));
        }
        assert_eq!(secret_fingerprint(b"abc"), "ba7816bf");
    }
}
