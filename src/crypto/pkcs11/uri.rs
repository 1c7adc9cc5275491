//! RFC 7512 `pkcs11:` URIs: which module, which token, which key, and where the PIN is.
//!
//! Owns: parsing (strict percent-decoding, every attribute at most once, unknown attributes
//! refused rather than ignored, as RFC 7512 §2.3 asks of a consumer that cannot honour them) and
//! the form the URI is shown in (the PIN never: `pin-value` is shown as `(hidden)`). It is pure:
//! it must not read the PIN file or load the module ([`super::token`] does both).
//!
//! ```text
//! pkcs11:token=terminal;object=device?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/authinfod/pin
//! ```

use std::fmt;
use std::path::PathBuf;

/// The scheme, with its colon.
pub const SCHEME: &str = "pkcs11:";

/// Why a `pkcs11:` URI cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    #[error("does not start with pkcs11:")]
    Scheme,
    #[error("{attribute:?} has a bad percent-encoding (a % must be followed by two hex digits)")]
    Percent { attribute: String },
    #[error("{attribute} is not UTF-8 once decoded")]
    Utf8 { attribute: String },
    #[error("{segment:?} is not attribute=value")]
    Segment { segment: String },
    #[error("{attribute} is given twice")]
    Repeated { attribute: String },
    #[error(
        "{attribute} is not an attribute authinfod understands (RFC 7512: a URI with an attribute the reader cannot honour must not match anything)"
    )]
    Unknown { attribute: String },
    #[error("{attribute} belongs in the {belongs} part of the URI")]
    Misplaced {
        attribute: String,
        belongs: &'static str,
    },
    #[error("type={0} names no private key (leave type out, or type=private)")]
    Type(String),
    #[error("slot-id={0} is not a number")]
    SlotId(String),
    #[error(
        "no module-path: name the token's PKCS#11 module, e.g. ?module-path=/usr/lib/softhsm/libsofthsm2.so"
    )]
    NoModule,
    #[error("module-path={0} is not an absolute path")]
    RelativeModule(String),
    #[error(
        "module-name is not supported (modules are not searched for): give module-path instead"
    )]
    ModuleName,
    #[error("pin-source={0} must be file:/absolute/path (or an absolute path)")]
    PinSource(String),
    #[error("pin-source and pin-value are both given; keep one (pin-source outside tests)")]
    TwoPins,
}

/// Where the token's user PIN comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum PinSource {
    /// `pin-source=file:/path`: the PIN is the file's content without its trailing newline; the
    /// file must be private (0600).
    File(PathBuf),
    /// `pin-value=...`: the PIN in the URI itself, so in the config file. For tests only.
    Value(String),
}

impl fmt::Debug for PinSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => f.debug_tuple("File").field(path).finish(),
            Self::Value(_) => f.write_str("Value(hidden)"),
        }
    }
}

/// A parsed `pkcs11:` URI naming one private key. Every attribute that is set must match; what
/// is unset matches anything.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Pkcs11Uri {
    /// Token label (`CK_TOKEN_INFO.label`, trailing blanks ignored).
    pub token: Option<String>,
    pub manufacturer: Option<String>,
    pub serial: Option<String>,
    pub model: Option<String>,
    pub slot_id: Option<u64>,
    pub slot_description: Option<String>,
    pub slot_manufacturer: Option<String>,
    pub library_manufacturer: Option<String>,
    pub library_description: Option<String>,
    /// Object label (`CKA_LABEL`).
    pub object: Option<String>,
    /// Object id (`CKA_ID`), raw bytes.
    pub id: Option<Vec<u8>>,
    /// The PKCS#11 module (`module-path`), absolute.
    pub module_path: PathBuf,
    pub pin: Option<PinSource>,
}

impl fmt::Debug for Pkcs11Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pkcs11Uri({self})")
    }
}

/// The path attributes in the order RFC 7512 lists them (and the URI is shown in).
const PATH_ATTRIBUTES: &[&str] = &[
    "library-description",
    "library-manufacturer",
    "manufacturer",
    "model",
    "object",
    "serial",
    "slot-description",
    "slot-id",
    "slot-manufacturer",
    "token",
    "id",
    "type",
    "library-version",
];
const QUERY_ATTRIBUTES: &[&str] = &["module-path", "module-name", "pin-source", "pin-value"];

impl Pkcs11Uri {
    /// True when `text` is meant as a `pkcs11:` URI (rather than a file path).
    pub fn is_uri(text: &str) -> bool {
        text.get(..SCHEME.len())
            .is_some_and(|s| s.eq_ignore_ascii_case(SCHEME))
    }

    /// Parses a URI that names a private key and its module.
    pub fn parse(text: &str) -> Result<Self, UriError> {
        if !Self::is_uri(text) {
            return Err(UriError::Scheme);
        }
        let rest = &text[SCHEME.len()..];
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut uri = Self::default();
        let mut module_path = None;
        let mut seen = Vec::new();
        for (part, separator, allowed, other) in [
            (path, ';', PATH_ATTRIBUTES, ("query", QUERY_ATTRIBUTES)),
            (query, '&', QUERY_ATTRIBUTES, ("path", PATH_ATTRIBUTES)),
        ] {
            for segment in part.split(separator).filter(|s| !s.is_empty()) {
                let (name, raw) = segment.split_once('=').ok_or_else(|| UriError::Segment {
                    segment: segment.to_owned(),
                })?;
                if !allowed.contains(&name) {
                    return Err(if other.1.contains(&name) {
                        UriError::Misplaced {
                            attribute: name.to_owned(),
                            belongs: other.0,
                        }
                    } else {
                        UriError::Unknown {
                            attribute: name.to_owned(),
                        }
                    });
                }
                if seen.contains(&name) {
                    return Err(UriError::Repeated {
                        attribute: name.to_owned(),
                    });
                }
                seen.push(name);
                let bytes = percent_decode(raw).ok_or_else(|| UriError::Percent {
                    attribute: name.to_owned(),
                })?;
                if name == "id" {
                    uri.id = Some(bytes);
                    continue;
                }
                let value = String::from_utf8(bytes).map_err(|_| UriError::Utf8 {
                    attribute: name.to_owned(),
                })?;
                match name {
                    "token" => uri.token = Some(value),
                    "manufacturer" => uri.manufacturer = Some(value),
                    "serial" => uri.serial = Some(value),
                    "model" => uri.model = Some(value),
                    "object" => uri.object = Some(value),
                    "slot-description" => uri.slot_description = Some(value),
                    "slot-manufacturer" => uri.slot_manufacturer = Some(value),
                    "library-manufacturer" => uri.library_manufacturer = Some(value),
                    "library-description" => uri.library_description = Some(value),
                    "slot-id" => {
                        uri.slot_id = Some(value.parse().map_err(|_| UriError::SlotId(value))?)
                    }
                    "type" if value == "private" => {}
                    "type" => return Err(UriError::Type(value)),
                    "module-path" => module_path = Some(value),
                    "module-name" => return Err(UriError::ModuleName),
                    "pin-source" => uri.pin = Some(PinSource::File(pin_file(&value)?)),
                    "pin-value" if uri.pin.is_some() => return Err(UriError::TwoPins),
                    "pin-value" => uri.pin = Some(PinSource::Value(value)),
                    // library-version: matching it is not supported; refused, not ignored.
                    other => {
                        return Err(UriError::Unknown {
                            attribute: other.to_owned(),
                        });
                    }
                }
            }
        }
        if seen.contains(&"pin-source") && seen.contains(&"pin-value") {
            return Err(UriError::TwoPins);
        }
        let module_path = module_path.ok_or(UriError::NoModule)?;
        uri.module_path = PathBuf::from(&module_path);
        if !uri.module_path.is_absolute() {
            return Err(UriError::RelativeModule(module_path));
        }
        Ok(uri)
    }

    /// The token part, as an operator reads it: `token "terminal"` or `the only token`.
    pub fn token_description(&self) -> String {
        let mut parts = Vec::new();
        for (name, value) in [
            ("token", &self.token),
            ("manufacturer", &self.manufacturer),
            ("serial", &self.serial),
            ("model", &self.model),
            ("slot-description", &self.slot_description),
            ("slot-manufacturer", &self.slot_manufacturer),
        ] {
            if let Some(v) = value {
                parts.push(format!("{name}={v:?}"));
            }
        }
        if let Some(id) = self.slot_id {
            parts.push(format!("slot-id={id}"));
        }
        if parts.is_empty() {
            "any token".into()
        } else {
            format!("token with {}", parts.join(", "))
        }
    }

    /// The key part, as an operator reads it: `object="device", id=%01`.
    pub fn object_description(&self) -> String {
        let mut parts = Vec::new();
        if let Some(label) = &self.object {
            parts.push(format!("object={label:?}"));
        }
        if let Some(id) = &self.id {
            parts.push(format!("id={}", encode_bytes(id)));
        }
        if parts.is_empty() {
            "the token's one private key".into()
        } else {
            format!("private key {}", parts.join(", "))
        }
    }
}

/// The URI in RFC 7512 form, with `pin-value` hidden: safe for logs and error messages.
impl fmt::Display for Pkcs11Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut path = Vec::new();
        for (name, value) in [
            ("library-description", &self.library_description),
            ("library-manufacturer", &self.library_manufacturer),
            ("manufacturer", &self.manufacturer),
            ("model", &self.model),
            ("object", &self.object),
            ("serial", &self.serial),
            ("slot-description", &self.slot_description),
            ("slot-manufacturer", &self.slot_manufacturer),
            ("token", &self.token),
        ] {
            if let Some(v) = value {
                path.push(format!("{name}={}", encode(v, false)));
            }
        }
        if let Some(id) = self.slot_id {
            path.push(format!("slot-id={id}"));
        }
        if let Some(id) = &self.id {
            path.push(format!("id={}", encode_bytes(id)));
        }
        let mut query = vec![format!(
            "module-path={}",
            encode(&self.module_path.to_string_lossy(), true)
        )];
        match &self.pin {
            Some(PinSource::File(p)) => {
                let path = encode(&p.to_string_lossy(), true);
                // `file://` would start an authority: `//x` is written `file:////x`.
                let scheme = if path.starts_with("//") {
                    "file://"
                } else {
                    "file:"
                };
                query.push(format!("pin-source={scheme}{path}"));
            }
            Some(PinSource::Value(_)) => query.push("pin-value=(hidden)".into()),
            None => {}
        }
        write!(f, "{SCHEME}{}?{}", path.join(";"), query.join("&"))
    }
}

/// `file:/abs/path`, `file:///abs/path` or `/abs/path` to the path.
fn pin_file(value: &str) -> Result<PathBuf, UriError> {
    // `file:///abs` (an empty authority) or `file:/abs`; `file://host/...` is refused below.
    let path = if value.starts_with("file:///") {
        &value["file://".len()..]
    } else if value.starts_with("file://") {
        return Err(UriError::PinSource(value.to_owned()));
    } else {
        value.strip_prefix("file:").unwrap_or(value)
    };
    let path = PathBuf::from(path);
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(UriError::PinSource(value.to_owned()))
    }
}

/// Strict percent-decoding: `%` must be followed by two hex digits.
fn percent_decode(raw: &str) -> Option<Vec<u8>> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Percent-encodes what RFC 7512 does not allow as is in a path (`query` false) or query value.
fn encode(value: &str, query: bool) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        let plain = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b':'
                    | b'['
                    | b']'
                    | b'@'
                    | b'!'
                    | b'$'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b'='
            )
            || (query && matches!(b, b'/' | b'?' | b'|'));
        if plain {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Every byte percent-encoded, as ids are conventionally written (`%01%A2`).
pub fn encode_bytes(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("%{b:02X}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MODULE: &str = "module-path=/usr/lib/softhsm/libsofthsm2.so";

    #[test]
    fn a_typical_uri_parses_into_its_parts() {
        let uri = Pkcs11Uri::parse(&format!(
            "pkcs11:token=terminal;object=device;id=%01%a2?{MODULE}&pin-source=file:/etc/authinfod/pin"
        ))
        .expect("parses");
        assert_eq!(uri.token.as_deref(), Some("terminal"));
        assert_eq!(uri.object.as_deref(), Some("device"));
        assert_eq!(uri.id.as_deref(), Some(&[0x01, 0xa2][..]));
        assert_eq!(
            uri.module_path,
            PathBuf::from("/usr/lib/softhsm/libsofthsm2.so")
        );
        assert_eq!(uri.pin, Some(PinSource::File("/etc/authinfod/pin".into())));
        assert_eq!(
            uri.to_string(),
            "pkcs11:object=device;token=terminal;id=%01%A2?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/authinfod/pin"
        );
    }

    /// RFC 7512's own examples (§3) that name a private key, with the module added.
    #[test]
    fn the_rfc_examples_parse() {
        let uri = Pkcs11Uri::parse(&format!(
            "pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;manufacturer=Snake%20Oil,%20Inc.;model=1.0;object=my-certificate;type=private;id=%69%95%3E%5C%F4%BD%EC%91;serial=?pin-source=file:/etc/token_pin&{MODULE}"
        ))
        .expect("parses");
        assert_eq!(uri.token.as_deref(), Some("The Software PKCS#11 Softtoken"));
        assert_eq!(uri.manufacturer.as_deref(), Some("Snake Oil, Inc."));
        assert_eq!(uri.model.as_deref(), Some("1.0"));
        assert_eq!(uri.serial.as_deref(), Some(""));
        assert_eq!(
            uri.id.as_deref(),
            Some(&[0x69, 0x95, 0x3e, 0x5c, 0xf4, 0xbd, 0xec, 0x91][..])
        );
        let uri = Pkcs11Uri::parse(
            "pkcs11:object=my-sign-key;type=private?module-path=/mnt/libmypkcs11.so.1&pin-value=12%7C34",
        )
        .expect("parses");
        assert_eq!(uri.pin, Some(PinSource::Value("12|34".into())));
        assert_eq!(uri.module_path, PathBuf::from("/mnt/libmypkcs11.so.1"));
        let uri = Pkcs11Uri::parse(&format!(
            "pkcs11:token=Name%20with%20a%20small%20A%20with%20acute:%20%C3%A1;object=my-key?{MODULE}"
        ))
        .expect("parses");
        assert_eq!(
            uri.token.as_deref(),
            Some("Name with a small A with acute: á")
        );
        assert_eq!(
            uri.to_string(),
            "pkcs11:object=my-key;token=Name%20with%20a%20small%20A%20with%20acute:%20%C3%A1?module-path=/usr/lib/softhsm/libsofthsm2.so"
        );
    }

    #[test]
    fn the_pin_value_is_never_shown() {
        let uri = Pkcs11Uri::parse(&format!("pkcs11:object=k?{MODULE}&pin-value=s3cret"))
            .expect("parses");
        assert!(!uri.to_string().contains("s3cret"), "{uri}");
        assert!(!format!("{uri:?}").contains("s3cret"), "{uri:?}");
        assert!(uri.to_string().contains("pin-value=(hidden)"));
    }

    #[test]
    fn bad_uris_are_refused_with_the_reason() {
        let cases: &[(&str, UriError)] = &[
            ("/var/lib/authinfod/device.key", UriError::Scheme),
            (
                "pkcs11:object=a%2?module-path=/m.so",
                UriError::Percent {
                    attribute: "object".into(),
                },
            ),
            (
                "pkcs11:object=a%zz?module-path=/m.so",
                UriError::Percent {
                    attribute: "object".into(),
                },
            ),
            (
                "pkcs11:object=%ff?module-path=/m.so",
                UriError::Utf8 {
                    attribute: "object".into(),
                },
            ),
            (
                "pkcs11:object?module-path=/m.so",
                UriError::Segment {
                    segment: "object".into(),
                },
            ),
            (
                "pkcs11:object=a;object=b?module-path=/m.so",
                UriError::Repeated {
                    attribute: "object".into(),
                },
            ),
            (
                "pkcs11:x-vendor=1?module-path=/m.so",
                UriError::Unknown {
                    attribute: "x-vendor".into(),
                },
            ),
            (
                "pkcs11:object=a;module-path=/m.so",
                UriError::Misplaced {
                    attribute: "module-path".into(),
                    belongs: "query",
                },
            ),
            (
                "pkcs11:?object=a&module-path=/m.so",
                UriError::Misplaced {
                    attribute: "object".into(),
                    belongs: "path",
                },
            ),
            (
                "pkcs11:type=cert?module-path=/m.so",
                UriError::Type("cert".into()),
            ),
            (
                "pkcs11:slot-id=one?module-path=/m.so",
                UriError::SlotId("one".into()),
            ),
            ("pkcs11:object=a", UriError::NoModule),
            (
                "pkcs11:object=a?module-path=lib.so",
                UriError::RelativeModule("lib.so".into()),
            ),
            ("pkcs11:object=a?module-name=softhsm2", UriError::ModuleName),
            (
                "pkcs11:object=a?module-path=/m.so&pin-source=pin.txt",
                UriError::PinSource("pin.txt".into()),
            ),
            (
                "pkcs11:object=a?module-path=/m.so&pin-source=file://host/pin",
                UriError::PinSource("file://host/pin".into()),
            ),
            (
                "pkcs11:object=a?module-path=/m.so&pin-source=/p&pin-value=1",
                UriError::TwoPins,
            ),
            (
                "pkcs11:object=a?module-path=/m.so&pin-value=1&pin-source=/p",
                UriError::TwoPins,
            ),
            (
                "pkcs11:library-version=1?module-path=/m.so",
                UriError::Unknown {
                    attribute: "library-version".into(),
                },
            ),
        ];
        for (text, want) in cases {
            assert_eq!(Pkcs11Uri::parse(text).as_ref(), Err(want), "{text}");
        }
    }

    #[test]
    fn the_scheme_is_case_insensitive_and_paths_are_not_uris() {
        assert!(Pkcs11Uri::is_uri("PKCS11:object=a"));
        assert!(!Pkcs11Uri::is_uri("/etc/pkcs11:key"));
        assert!(!Pkcs11Uri::is_uri("pkcs1"));
        assert!(Pkcs11Uri::parse("PKCS11:object=a?module-path=/m.so").is_ok());
        let bare = Pkcs11Uri::parse("pkcs11:?pin-source=file:///etc/pin&module-path=/m.so")
            .expect("no path attributes: any token, its one key");
        assert_eq!(bare.pin, Some(PinSource::File("/etc/pin".into())));
        assert_eq!(bare.token_description(), "any token");
        assert_eq!(bare.object_description(), "the token's one private key");
    }

    proptest! {
        /// Whatever text arrives, parsing returns a value or an error and never panics.
        #[test]
        fn parsing_never_panics(s in ".{0,200}") {
            let _ = Pkcs11Uri::parse(&s);
            let _ = Pkcs11Uri::parse(&format!("pkcs11:{s}"));
        }

        /// Any label, serial and id survive being shown and parsed again.
        #[test]
        fn display_then_parse_round_trips(
            token in "\\PC{0,32}",
            object in "\\PC{0,32}",
            serial in "[ -~]{0,16}",
            id in proptest::collection::vec(any::<u8>(), 0..20),
            module in "/[ -~]{1,40}",
            pin in "/[ -~]{1,40}",
        ) {
            let uri = Pkcs11Uri {
                token: Some(token),
                object: Some(object),
                serial: Some(serial),
                id: Some(id),
                module_path: PathBuf::from(module),
                pin: Some(PinSource::File(PathBuf::from(pin))),
                ..Pkcs11Uri::default()
            };
            prop_assert_eq!(Pkcs11Uri::parse(&uri.to_string()), Ok(uri));
        }
    }
}
