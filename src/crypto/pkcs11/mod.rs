//! Private keys that stay inside a PKCS#11 token (an HSM, a smart card, a TPM 2.0 through
//! tpm2-pkcs11, SoftHSM2 to try): named by RFC 7512 URIs wherever a key file can be named.
//!
//! Owns: [`uri`] (the `pkcs11:` URI, pure, in every build) and, with the `pkcs11` feature,
//! `token` (loading the module, finding the token and the key, logging in, signing with
//! CKM_SHA256_RSA_PKCS, generating keys in the token, and reconnecting when a token comes back).
//! It must not read a private key out of a token: only public halves and attributes are read.

pub mod uri;

#[cfg(feature = "pkcs11")]
mod token;

#[cfg(feature = "pkcs11")]
pub use token::{TokenError, TokenSigner, generate_key};

pub use uri::{PinSource, Pkcs11Uri, UriError};

/// Whether this build can use PKCS#11 tokens (the `pkcs11` feature; the static musl build has
/// no dlopen, so it is built without).
pub const SUPPORTED: bool = cfg!(feature = "pkcs11");
