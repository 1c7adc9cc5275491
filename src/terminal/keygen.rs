//! `authinfod keygen`: makes the terminal's RSA-2048 device key and prints what the merchant
//! enrols in the proxy's registry.
//!
//! Owns: writing the private key safely (mode 0600 from creation, never over an existing key
//! unless forced, fsynced). It must not print or log the private key.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use crate::crypto::{self, CryptoError, RsaVerifier};

/// Modulus size of device keys.
pub const DEVICE_KEY_BITS: usize = 2048;

/// Why a key could not be made.
#[derive(Debug, thiserror::Error)]
pub enum KeygenError {
    #[error(
        "{path} already exists; pass --force to replace it (the old key's enrolment stops working)"
    )]
    Exists { path: PathBuf },
    #[error("cannot write the key to {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

/// Generates a key, writes it to `out` (0600) and returns its public half.
pub fn keygen(out: &Path, force: bool) -> Result<RsaVerifier, KeygenError> {
    let key = crypto::generate_rsa_key(DEVICE_KEY_BITS)?;
    let write_err = |source| KeygenError::Write {
        path: out.to_owned(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).mode(0o600);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options.open(out).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            KeygenError::Exists {
                path: out.to_owned(),
            }
        } else {
            write_err(e)
        }
    })?;
    // An existing file keeps its mode on truncation: tighten it explicitly.
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(write_err)?;
    file.write_all(key.private_pem.as_bytes())
        .map_err(write_err)?;
    file.sync_all().map_err(write_err)?;
    Ok(key.public)
}

/// The enrolment text printed after keygen: the public key, its fingerprint and a registry
/// entry to fill in.
pub fn enrolment_text(public: &RsaVerifier, device_id: Option<&str>) -> String {
    let id = device_id.unwrap_or("<device_id>");
    format!(
        "{pem}fingerprint: {fp}\n\n# Registry entry for the proxy (devices.toml); fill in the platform identities:\n[[device]]\ndevice_id = \"{id}\"\npublic_key = \"\"\"\n{pem}\"\"\"\ndevice_sn = \"<WeChat Pay device_sn>\"\nsub_mchid = \"<sub_mchid>\"\nsub_appid = \"<sub_appid>\"\norganization_id = \"<organization_id>\"\n",
        pem = public.to_pem(),
        fp = public.fingerprint(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    #[test]
    fn keygen_writes_a_0600_key_ring_can_sign_with_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("device.key");
        let public = keygen(&path, false).expect("keygen");
        assert_eq!(
            std::fs::metadata(&path).expect("meta").mode() & 0o777,
            0o600
        );
        let signer = crypto::RsaSigner::from_file(&path).expect("ring loads it");
        assert_eq!(signer.public_key().expect("pub"), public);
        let sig = signer.sign(b"m").expect("sign");
        assert!(public.verify(b"m", &sig));
        assert!(matches!(
            keygen(&path, false),
            Err(KeygenError::Exists { .. })
        ));
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .expect("chmod");
        let replaced = keygen(&path, true).expect("forced");
        assert_ne!(replaced, public);
        assert_eq!(
            std::fs::metadata(&path).expect("meta").mode() & 0o777,
            0o600
        );
        let text = enrolment_text(&replaced, Some("T9"));
        assert!(text.contains("device_id = \"T9\""));
        assert!(text.contains(&replaced.fingerprint()));
        assert!(!text.contains("PRIVATE"));
    }
}
