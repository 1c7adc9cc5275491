//! What the three configuration files (the daemon's, the proxy's, the proxy's device registry)
//! share: reading TOML into a raw serde shape, collecting every problem of a file instead of
//! stopping at the first, and the one error type they fail with.
//!
//! Owns: [`ConfigError`] (exit 78 at the binaries' edge), [`Problems`] (the collector and the
//! checks every file uses: required fields, positive durations, absolute paths, readable files,
//! private key files, signing keys in files or PKCS#11 tokens), and [`check_private_file`], the
//! one permission check for key and secret files. It must not know any file's fields: each
//! file's module validates its own shape.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::crypto::{CryptoError, KeySource, RsaSigner, Signer};
use crate::units::HumanDuration;

/// Why a configuration file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {what} {path}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path} is not valid TOML for it: {message}")]
    Parse {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("{what} {path} has {} invalid field(s):\n  - {}", problems.len(), problems.join("\n  - "))]
    Invalid {
        what: &'static str,
        path: PathBuf,
        problems: Vec<String>,
    },
}

impl ConfigError {
    /// The problems an invalid file has (empty for a file that could not be read or parsed).
    pub fn problems(&self) -> &[String] {
        match self {
            Self::Invalid { problems, .. } => problems,
            _ => &[],
        }
    }
}

/// Reads `path` (a `what`: "config file", "registry") as text.
pub fn read(what: &'static str, path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Parses TOML `text` of `path` into the raw shape `R`.
pub fn parse_toml<R: DeserializeOwned>(
    what: &'static str,
    text: &str,
    path: &Path,
) -> Result<R, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        what,
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// Parses TOML `text` of `path` into the raw shape `R`, collecting the fields `R` does not know
/// into `problems` (as `field: unknown field`) instead of stopping there, so that a typo does
/// not hide the file's other problems. `R` must not deny unknown fields itself.
pub fn parse_toml_lenient<R: DeserializeOwned>(
    what: &'static str,
    text: &str,
    path: &Path,
    problems: &mut Problems,
) -> Result<R, ConfigError> {
    let parse_error = |message: String| ConfigError::Parse {
        what,
        path: path.to_owned(),
        message,
    };
    let deserializer = toml::Deserializer::parse(text).map_err(|e| parse_error(e.to_string()))?;
    let mut unknown = Vec::new();
    let raw = serde_ignored::deserialize(deserializer, |field| unknown.push(dotted(&field)))
        .map_err(|e| parse_error(e.to_string()))?;
    for field in unknown {
        problems.push(&field, "unknown field");
    }
    Ok(raw)
}

/// A field's path as the file writes it, `section.field` or `device[2].field` (serde_ignored's
/// own rendering shows `?` for every optional section on the way). A key that is not a TOML
/// bare key (letters, digits, `_`, `-`) is written quoted as TOML would, so that a problem line
/// names it unambiguously and carries no control character (found by the `daemon_config` fuzz
/// target).
fn dotted(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path as P;
    match path {
        P::Root => String::new(),
        P::Seq { parent, index } => format!("{}[{index}]", dotted(parent)),
        P::Map { parent, key } => match dotted(parent) {
            p if p.is_empty() => toml_key(key),
            p => format!("{p}.{}", toml_key(key)),
        },
        P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
            dotted(parent)
        }
    }
}

/// Every problem found in one file, each as `field: what is wrong`.
#[derive(Debug)]
pub struct Problems {
    what: &'static str,
    list: Vec<String>,
}

impl Problems {
    /// A collector for a `what` ("config file", "registry").
    pub fn new(what: &'static str) -> Self {
        Self {
            what,
            list: Vec::new(),
        }
    }

    /// Records a problem of `field`.
    pub fn push(&mut self, field: &str, message: impl std::fmt::Display) {
        self.list.push(format!("{field}: {message}"));
    }

    /// Records a problem already phrased as `field: what is wrong`.
    pub fn push_line(&mut self, line: String) {
        self.list.push(line);
    }

    /// Whether nothing is wrong so far.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// `value`, or a "missing" problem.
    pub fn required<T>(&mut self, field: &str, value: Option<T>) -> Option<T> {
        if value.is_none() {
            self.push(field, "missing");
        }
        value
    }

    /// A duration that must be more than zero and at most a year (`default` when absent).
    pub fn positive(
        &mut self,
        field: &str,
        value: Option<HumanDuration>,
        default: Duration,
    ) -> Duration {
        let d = value.map_or(default, |h| h.0);
        if d.is_zero() {
            self.push(field, "must be more than zero");
        }
        self.at_most_a_year(field, d);
        d
    }

    /// Refuses a duration longer than [`crate::units::MAX_CONFIG_DURATION`].
    pub fn at_most_a_year(&mut self, field: &str, d: Duration) {
        use crate::units::{MAX_CONFIG_DURATION, format_duration};
        if d > MAX_CONFIG_DURATION {
            self.push(
                field,
                format_args!(
                    "{} is longer than {}",
                    format_duration(d),
                    format_duration(MAX_CONFIG_DURATION)
                ),
            );
        }
    }

    /// An absolute path (`default` when absent; a problem when neither is there).
    pub fn absolute(
        &mut self,
        field: &str,
        value: Option<PathBuf>,
        default: Option<PathBuf>,
    ) -> Option<PathBuf> {
        match value.or(default) {
            Some(p) if p.is_absolute() => Some(p),
            Some(p) => {
                self.push(
                    field,
                    format_args!("{} is not an absolute path", p.display()),
                );
                None
            }
            None => {
                self.push(field, "missing");
                None
            }
        }
    }

    /// The text of the file at `path`.
    pub fn read_file(&mut self, field: &str, path: &Path) -> Option<String> {
        match std::fs::read_to_string(path) {
            Ok(text) => Some(text),
            Err(e) => {
                self.push(field, format_args!("cannot read {}: {e}", path.display()));
                None
            }
        }
    }

    /// The text of a key or secret file at `path`, which must be readable by its owner only.
    pub fn read_private(&mut self, field: &str, path: &Path) -> Option<String> {
        if let Err(e) = check_private_file(path) {
            self.push(field, e);
            return None;
        }
        self.read_file(field, path)
    }

    /// The signing key `field` names: a key file (private, 0600, parsed by `parse` with the
    /// file's name), or a `pkcs11:` URI (its module loaded, the token, the PIN and the key
    /// checked with a test signature; without the `pkcs11` feature, a problem). `config` is the
    /// file `field` is in: a URI that carries its PIN (`pin-value`) makes that file a secret, so
    /// it must be private too.
    pub fn signer(
        &mut self,
        field: &str,
        source: &KeySource,
        config: &Path,
        parse: impl FnOnce(&str, &str) -> Result<RsaSigner, CryptoError>,
    ) -> Option<Signer> {
        match source {
            KeySource::File(path) => {
                let text = self.read_private(field, path)?;
                parse(&text, &path.display().to_string())
                    .map(Signer::from)
                    .map_err(|e| self.push(field, e))
                    .ok()
            }
            KeySource::Pkcs11(uri) => {
                if matches!(uri.pin, Some(crate::crypto::pkcs11::PinSource::Value(_)))
                    && let Err(e) = check_private_file(config)
                {
                    self.push(
                        field,
                        format_args!(
                            "the URI holds a PIN (pin-value), so the file is a secret: {e}"
                        ),
                    );
                    return None;
                }
                self.token_signer(field, uri)
            }
        }
    }

    #[cfg(feature = "pkcs11")]
    fn token_signer(
        &mut self,
        field: &str,
        uri: &crate::crypto::pkcs11::Pkcs11Uri,
    ) -> Option<Signer> {
        Signer::open_token(uri)
            .map_err(|e| self.push(field, crate::error_chain(&e)))
            .ok()
    }

    #[cfg(not(feature = "pkcs11"))]
    fn token_signer(
        &mut self,
        field: &str,
        _uri: &crate::crypto::pkcs11::Pkcs11Uri,
    ) -> Option<Signer> {
        self.push(
            field,
            "this build has no PKCS#11 support (built without the pkcs11 feature, as the static musl build is: it cannot load modules); use a key file or a glibc build",
        );
        None
    }

    /// The validated value when nothing is wrong; else every problem, naming `path`.
    pub fn finish<T>(self, path: &Path, value: Option<T>) -> Result<T, ConfigError> {
        match value {
            Some(v) if self.list.is_empty() => Ok(v),
            _ => Err(ConfigError::Invalid {
                what: self.what,
                path: path.to_owned(),
                // A shape error without a problem cannot happen (every `None` above records
                // one); should it, the file is still refused and says so.
                problems: if self.list.is_empty() {
                    vec!["the file is incomplete".into()]
                } else {
                    self.list
                },
            }),
        }
    }
}

/// Why a key or secret file may not be used.
#[derive(Debug, thiserror::Error)]
pub enum PrivateFileError {
    #[error("cannot read {path}")]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is readable by group or others (mode {mode:o}); run chmod 600 on it")]
    Exposed { path: PathBuf, mode: u32 },
}

/// Checks that a key or secret file exists, is readable, and that group and others have no
/// access to it: the one permission check for the device key, the merchant keys and secrets.
pub fn check_private_file(path: &Path) -> Result<(), PrivateFileError> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(path).map_err(|source| PrivateFileError::Unreadable {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(PrivateFileError::Exposed {
            path: path.to_owned(),
            mode,
        });
    }
    std::fs::File::open(path)
        .map(drop)
        .map_err(|source| PrivateFileError::Unreadable {
            path: path.to_owned(),
            source,
        })
}

/// `key` as a TOML key: bare when it can be, else a quoted string with TOML's escapes.
fn toml_key(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
    if bare {
        return key.to_owned();
    }
    let mut quoted = String::with_capacity(key.len() + 2);
    quoted.push('"');
    for c in key.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            c if c.is_control() => quoted.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    /// The static musl build has no PKCS#11: a `pkcs11:` URI is a problem that says so, not a
    /// path that cannot be read.
    #[cfg(not(feature = "pkcs11"))]
    #[test]
    fn a_pkcs11_uri_without_the_feature_is_a_problem_that_says_why() {
        let source =
            KeySource::parse("pkcs11:token=t;object=k?module-path=/usr/lib/softhsm/libsofthsm2.so")
                .expect("parses");
        let mut p = Problems::new("config file");
        let signer = p.signer(
            "key_file",
            &source,
            Path::new("/nonexistent.toml"),
            |_, _| unreachable!("not a file"),
        );
        assert!(signer.is_none());
        let err = p.finish::<()>(Path::new("/x.toml"), None).unwrap_err();
        assert!(
            err.problems()[0].starts_with("key_file: this build has no PKCS#11 support"),
            "{err}"
        );
    }

    /// A shape with one section `s` of no fields: every other key is unknown.
    #[derive(Debug, serde::Deserialize)]
    struct Shape {
        #[allow(dead_code)]
        s: Option<Empty>,
    }

    #[derive(Debug, serde::Deserialize)]
    struct Empty {}

    /// Found by the `daemon_config` fuzz target (`y-ciCence = true`): an unknown key is named as
    /// the file writes it, quoted when it is no bare key, so that `field: reason` stays one
    /// unambiguous line whatever the key holds; every name reads back as the same TOML key.
    #[test]
    fn unknown_keys_are_named_as_toml_keys() {
        for (text, field) in [
            ("y-ciCence = true\n", "y-ciCence"),
            ("\"a: b\" = 1\n", "\"a: b\""),
            ("\"x\\ny\\\"\\\\\" = 1\n", "\"x\\u000Ay\\\"\\\\\""),
            ("[s]\n\"\" = 1\n", "s.\"\""),
            ("\"été\" = 1\n", "\"été\""),
        ] {
            let mut problems = Problems::new("config file");
            let _: Shape =
                parse_toml_lenient("config file", text, Path::new("t.toml"), &mut problems)
                    .unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert_eq!(
                problems.list,
                [format!("{field}: unknown field")],
                "{text:?}"
            );
            let original: toml::Table = toml::from_str(text).expect("the input parses");
            let (key, _) = field.split_once('.').unwrap_or((field, ""));
            let again: toml::Table = toml::from_str(&format!("{field} = 1"))
                .unwrap_or_else(|e| panic!("{field} is no TOML key: {e}"));
            assert_eq!(
                again.keys().collect::<Vec<_>>(),
                original.keys().collect::<Vec<_>>(),
                "{text:?} ({key})"
            );
        }
    }

    #[test]
    fn every_problem_is_listed_and_the_file_named() {
        let mut p = Problems::new("config file");
        assert_eq!(p.required::<u8>("a", None), None);
        assert_eq!(
            p.positive(
                "b",
                Some(HumanDuration(Duration::ZERO)),
                Duration::from_secs(1)
            ),
            Duration::ZERO
        );
        assert_eq!(p.absolute("c", Some("relative".into()), None), None);
        assert_eq!(
            p.absolute("d", None, Some("/x".into())),
            Some(PathBuf::from("/x"))
        );
        let err = p.finish(Path::new("/etc/x.toml"), Some(())).unwrap_err();
        assert_eq!(
            err.problems(),
            [
                "a: missing",
                "b: must be more than zero",
                "c: relative is not an absolute path"
            ]
        );
        let text = err.to_string();
        assert!(
            text.starts_with("config file /etc/x.toml has 3 invalid field(s)"),
            "{text}"
        );
        assert!(
            Problems::new("registry")
                .finish(Path::new("r"), Some(7))
                .is_ok_and(|v| v == 7)
        );
    }

    #[test]
    fn private_files_are_owner_only_and_readable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("key");
        crate::test_support::write_file(&key, "secret", 0o600);
        check_private_file(&key).expect("0600 is fine");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let err = check_private_file(&key).unwrap_err();
        assert!(err.to_string().contains("mode 640"), "{err}");
        let err = check_private_file(&dir.path().join("missing")).unwrap_err();
        assert!(matches!(err, PrivateFileError::Unreadable { .. }), "{err}");
        let mut p = Problems::new("config file");
        assert_eq!(p.read_private("key_file", &key), None);
        assert!(!p.is_empty());
    }
}
