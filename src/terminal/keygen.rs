//! `authinfod keygen`: makes the terminal's RSA-2048 device key, in a file or inside a PKCS#11
//! token (`--pkcs11 URI`), and prints what the merchant enrols in the proxy's registry.
//!
//! Owns: writing the private key safely (mode 0600 from creation, never over an existing key
//! unless forced, fsynced with its directory entry), and creating the key's missing parent
//! directories (0700: on a fresh terminal nothing else has made `/var/lib/authinfod` yet). It
//! must not print or log the private key, and never changes the mode of a directory that exists.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use crate::crypto::{self, CryptoError, RsaVerifier};

/// Modulus size of device keys.
pub const DEVICE_KEY_BITS: usize = 2048;

/// Mode of the directories keygen creates for the key: the daemon's state directory is 0700
/// (`StateDirectoryMode=0700` in the unit), and the key is the one secret in it.
pub const KEY_DIR_MODE: u32 = 0o700;

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
    #[error("cannot create the key's directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--pkcs11: the URI {0}")]
    Uri(#[from] crate::crypto::pkcs11::UriError),
    #[error(
        "--pkcs11: this build has no PKCS#11 support (built without the pkcs11 feature, as the static musl build is)"
    )]
    NoPkcs11,
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

impl KeygenError {
    /// True when the `--pkcs11` URI, or the token setup it names (module, token, PIN), is what
    /// needs fixing: exit 78, as for a config.
    pub fn is_config(&self) -> bool {
        match self {
            Self::Uri(_) | Self::NoPkcs11 => true,
            #[cfg(feature = "pkcs11")]
            Self::Crypto(CryptoError::Token(e)) => {
                !matches!(**e, crate::crypto::pkcs11::TokenError::Exists { .. })
            }
            _ => false,
        }
    }
}

/// Generates a key, writes it to `out` (0600), creating its missing parent directories (0700),
/// and returns its public half.
pub fn keygen(out: &Path, force: bool) -> Result<RsaVerifier, KeygenError> {
    let key = crypto::generate_rsa_key(DEVICE_KEY_BITS)?;
    let write_err = |source| KeygenError::Write {
        path: out.to_owned(),
        source,
    };
    // `--out device.key` has the parent "": the current directory, which exists.
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(dir) = parent {
        create_key_dir(dir)?;
    }
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
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(write_err)?;
    file.write_all(key.private_pem.as_bytes())
        .map_err(write_err)?;
    file.sync_all().map_err(write_err)?;
    // The key's directory entry is only durable once its directory is synced too.
    std::fs::File::open(parent.unwrap_or(Path::new(".")))
        .and_then(|d| d.sync_all())
        .map_err(write_err)?;
    Ok(key.public)
}

/// Generates the device key inside the PKCS#11 token `uri` names: RSA-2048, the private half
/// sensitive and not extractable (it never leaves the token), labelled and identified as the
/// URI says. `force` replaces a key of the same label or id. Returns the public half and the
/// URI (PIN hidden) the config's `key_file` takes, after opening the new key exactly as the
/// daemon will (token, PIN, mechanism and a test signature).
pub fn keygen_in_token(uri: &str, force: bool) -> Result<(RsaVerifier, String), KeygenError> {
    let uri = crate::crypto::pkcs11::Pkcs11Uri::parse(uri)?;
    in_token(&uri, force)
}

#[cfg(feature = "pkcs11")]
fn in_token(
    uri: &crate::crypto::pkcs11::Pkcs11Uri,
    force: bool,
) -> Result<(RsaVerifier, String), KeygenError> {
    let bits = u64::try_from(DEVICE_KEY_BITS).unwrap_or(2048);
    let key = crate::crypto::pkcs11::generate_key(uri, bits, force).map_err(CryptoError::from)?;
    Ok((key.public_key().clone(), uri.to_string()))
}

#[cfg(not(feature = "pkcs11"))]
fn in_token(
    _uri: &crate::crypto::pkcs11::Pkcs11Uri,
    _force: bool,
) -> Result<(RsaVerifier, String), KeygenError> {
    Err(KeygenError::NoPkcs11)
}

/// Creates `dir` and any missing ancestors with mode [`KEY_DIR_MODE`]; an existing directory is
/// left as it is.
fn create_key_dir(dir: &Path) -> Result<(), KeygenError> {
    if dir.is_dir() {
        return Ok(());
    }
    let err = |path: &Path, source| KeygenError::CreateDir {
        path: path.to_owned(),
        source,
    };
    // The ancestors that are missing, outermost first, so each gets the mode set explicitly
    // below (`DirBuilder::mode` is masked by the umask).
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|a| !a.as_os_str().is_empty() && !a.exists())
        .collect();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(KEY_DIR_MODE)
        .create(dir)
        .map_err(|e| err(dir, e))?;
    for created in missing.iter().rev() {
        std::fs::set_permissions(created, std::fs::Permissions::from_mode(KEY_DIR_MODE))
            .map_err(|e| err(created, e))?;
    }
    Ok(())
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
    use crate::test_support::mode_of as mode;

    #[test]
    fn keygen_writes_a_0600_key_ring_can_sign_with_and_refuses_to_overwrite() {
        let (_dir, path) = crate::test_support::temp_path("device.key");
        let public = keygen(&path, false).expect("keygen");
        assert_eq!(crate::test_support::mode_of(&path), 0o600);
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
        assert_eq!(crate::test_support::mode_of(&path), 0o600);
        let text = enrolment_text(&replaced, Some("T9"));
        assert!(text.contains("device_id = \"T9\""));
        assert!(text.contains(&replaced.fingerprint()));
        assert!(!text.contains("PRIVATE"));
    }

    /// The README's plain-binary install: nothing has made /var/lib/authinfod yet.
    #[test]
    fn keygen_creates_missing_parent_directories_0700() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("var/lib/authinfod");
        let path = state.join("device.key");
        let public = keygen(&path, false).expect("keygen into a missing directory");
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&dir.path().join("var/lib")), 0o700);
        assert_eq!(mode(&dir.path().join("var")), 0o700);
        assert_eq!(mode(&path), 0o600);
        let signer = crypto::RsaSigner::from_file(&path).expect("ring loads it");
        assert_eq!(signer.public_key().expect("pub"), public);
    }

    #[test]
    fn keygen_leaves_an_existing_directory_mode_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        std::fs::create_dir(&state).expect("mkdir");
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o750)).expect("chmod");
        keygen(&state.join("device.key"), false).expect("keygen");
        assert_eq!(mode(&state), 0o750);
    }

    #[test]
    fn keygen_names_a_parent_that_cannot_be_a_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").expect("write");
        let err = keygen(&file.join("device.key"), false).expect_err("parent is a file");
        assert!(
            matches!(&err, KeygenError::CreateDir { path, .. } if *path == file),
            "{err:?}"
        );
    }
}
