//! What the fuzz targets share: the framing their inputs are written in, serde_json's own view of
//! a JSON object for the differential checks, the fixture files configs may name, and a daemon
//! state to run the socket API against.
//!
//! Inputs that are more than one string are written as a small HTTP-like message, so that the
//! seed corpus can be real traffic written down as it was sent:
//!
//! ```text
//! FIRST LINE            (a status, a request line, a selector: what the target says)
//! Name: value           (zero or more header lines)
//!                       (an empty line)
//! BODY                  (every remaining byte)
//! ```
//!
//! A message without the empty line is all first line and headers, with an empty body.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use authinfod::terminal::api::ApiResponse;
use authinfod::terminal::doc::ErrorDoc;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

pub mod daemon;

/// Where the fixture files live that seeds name by absolute path (`ca_file`, `key_file`).
pub const FIXTURES: &str = "/tmp/authinfod-fuzz";

/// A message in the framing above.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message<'a> {
    pub first_line: &'a str,
    pub headers: Vec<(&'a str, &'a str)>,
    pub body: &'a [u8],
}

impl<'a> Message<'a> {
    /// Splits `data` into first line, headers and body; `None` when the head is not UTF-8.
    pub fn parse(data: &'a [u8]) -> Option<Self> {
        let (head, body) = match find(data, b"\n\n") {
            Some(i) => (&data[..i], &data[i + 2..]),
            None => (data, &data[data.len()..]),
        };
        let head = std::str::from_utf8(head).ok()?;
        let mut lines = head.split('\n');
        let first_line = lines.next().unwrap_or_default();
        let headers = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim(), value.trim()))
            .collect();
        Some(Self {
            first_line,
            headers,
            body,
        })
    }

    /// The first header named `name` (case-insensitively).
    pub fn header(&self, name: &str) -> Option<&'a str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }

    /// The headers as an `http::HeaderMap`, leaving out those http refuses.
    pub fn header_map(&self) -> http::HeaderMap {
        let mut map = http::HeaderMap::new();
        for (name, value) in &self.headers {
            if let (Ok(name), Ok(value)) = (
                http::HeaderName::from_bytes(name.as_bytes()),
                http::HeaderValue::from_str(value),
            ) {
                map.append(name, value);
            }
        }
        map
    }

    /// The first line read as an HTTP status (100-999); `None` otherwise.
    pub fn status(&self) -> Option<u16> {
        self.first_line
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|s| (100..1000).contains(s))
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

// === serde_json's view of an object ===

/// The members of a JSON object in the order written, each with its value's exact text, as
/// serde_json's streaming parser sees them. Unlike a `serde_json::Value` (which keeps the last
/// of two equal keys) this shows duplicates.
#[derive(Debug, Default)]
pub struct Members<'a>(pub Vec<(String, &'a RawValue)>);

impl<'a> Members<'a> {
    /// `text` read as one JSON object; `None` when it is anything else or not JSON.
    pub fn of(text: &'a str) -> Option<Self> {
        let mut de = serde_json::Deserializer::from_str(text);
        let members = (&mut de).deserialize_map(MembersVisitor).ok()?;
        de.end().ok()?;
        Some(members)
    }

    /// Every member named `key`.
    pub fn all(&self, key: &str) -> Vec<&'a RawValue> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| *v)
            .collect()
    }

    /// The one member named `key`: `Err` when there are several.
    pub fn one(&self, key: &str) -> Result<Option<&'a RawValue>, Repeated> {
        match self.all(key).as_slice() {
            [] => Ok(None),
            [v] => Ok(Some(*v)),
            _ => Err(Repeated),
        }
    }

    /// The member names, without repeats.
    pub fn names(&self) -> BTreeSet<&str> {
        self.0.iter().map(|(k, _)| k.as_str()).collect()
    }
}

/// An object names a member more than once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repeated;

struct MembersVisitor;

impl<'de> Visitor<'de> for MembersVisitor {
    type Value = Members<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut members = Vec::new();
        while let Some((key, value)) = map.next_entry::<String, &'de RawValue>()? {
            members.push((key, value));
        }
        Ok(Members(members))
    }
}

/// True when the document's first value opens an object: the contracts' documents are objects,
/// and `authinfod::json` refuses the rest (serde's derive alone would also read a struct
/// written as an array of its fields).
pub fn opens_object(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        == Some(&b'{')
}

/// True when `inner` is a slice of `outer`'s own bytes (not a copy).
pub fn is_slice_of(inner: &str, outer: &str) -> bool {
    let (start, end) = (
        outer.as_ptr() as usize,
        outer.as_ptr() as usize + outer.len(),
    );
    let at = inner.as_ptr() as usize;
    at >= start && at + inner.len() <= end
}

// === fixtures ===

/// The key every target signs with or enrolls: the RSA test key published in the official
/// WeChat Pay Go SDK (wechatpay-apiv3/wechatpay-go, `core/auth/signers/
/// sha256withrsa_signer_test.go`, also in `platform::wechatpay::sign`'s tests). A public test
/// fixture, not anyone's secret, labelled `TESTING KEY` as upstream so that secret scanners
/// leave it alone. Generating a key instead would cost every fuzzing process seconds.
pub struct TestKey {
    /// PKCS#8 PEM.
    pub private_pem: String,
    pub signer: authinfod::crypto::RsaSigner,
    pub public: authinfod::crypto::RsaVerifier,
}

/// The merchant APIv3 key the `wechatpay_certificates` target opens answers with, and its seeds
/// are sealed with (32 characters, as the merchant console sets it).
pub const APIV3_KEY: &str = "authinfod-fuzz-apiv3-key-0123456";

/// The [`TestKey`], parsed once.
pub fn test_key() -> &'static TestKey {
    static KEY: OnceLock<TestKey> = OnceLock::new();
    KEY.get_or_init(|| {
        let private_pem = include_str!("test-key.pem").replace("TESTING KEY", "PRIVATE KEY");
        let signer = authinfod::crypto::RsaSigner::from_pem(&private_pem, "the SDK test key")
            .expect("the SDK test key parses");
        let public = signer.public_key().expect("its public half");
        TestKey {
            private_pem,
            signer,
            public,
        }
    })
}

/// The fixture directory, made once per process: the proxy CA a daemon config's `ca_file`
/// names (`/tmp/authinfod-fuzz/proxy-ca.pem`). Files are written under a temporary name and
/// renamed, so parallel fuzzers never see half a file.
pub fn fixtures() -> &'static Path {
    static DONE: OnceLock<PathBuf> = OnceLock::new();
    DONE.get_or_init(|| {
        let dir = PathBuf::from(FIXTURES);
        std::fs::create_dir_all(&dir).expect("fixture directory");
        let pki = authinfod::tls::generate_pki("authinfod fuzz CA", &["127.0.0.1", "localhost"])
            .expect("a generated CA");
        write_fixture(&dir.join("proxy-ca.pem"), &pki.ca_pem, 0o644);
        dir
    })
}

/// Writes `text` to `path` with `mode`, atomically.
pub fn write_fixture(path: &Path, text: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, text).expect("write fixture");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).expect("chmod fixture");
    std::fs::rename(&tmp, path).expect("rename fixture");
}

/// A directory of this process's own for files written per input (and the daemon's sled
/// store): under `/dev/shm` where it exists, so that writes and fsyncs cost no disk I/O, else
/// under [`FIXTURES`]. `scripts/fuzz` removes them after a run.
pub fn scratch_dir(name: &str) -> &'static Path {
    static DIRS: OnceLock<std::sync::Mutex<Vec<(String, &'static Path)>>> = OnceLock::new();
    let dirs = DIRS.get_or_init(Default::default);
    let mut dirs = dirs
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, dir)) = dirs.iter().find(|(n, _)| n == name) {
        return dir;
    }
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() { shm } else { fixtures() };
    let dir: &'static Path = Box::leak(
        base.join(format!("authinfod-fuzz-{name}-{}", std::process::id()))
            .into_boxed_path(),
    );
    std::fs::create_dir_all(dir).expect("scratch directory");
    dirs.push((name.to_owned(), dir));
    dir
}

// === the socket API's documented answers ===

/// Every status `terminal::api::handle` may answer with (README, "The socket API"; 403 and the
/// busy 503 come from the server in front of it).
pub const API_STATUSES: &[u16] = &[200, 202, 304, 400, 404, 405, 413, 500, 502, 503, 504];

/// Every error code the socket API documents.
pub const API_CODES: &[&str] = &[
    "NO_AUTHINFO",
    "NOT_FOUND",
    "METHOD_NOT_ALLOWED",
    "BAD_QUERY",
    "BAD_BODY",
    "BODY_TOO_LARGE",
    "PEER_DENIED",
    "BUSY",
    "SHUTTING_DOWN",
    "STORE_FAILED",
    "REFRESH_FAILED",
    "REFRESH_TIMEOUT",
];

/// Checks one answer of the socket API against the contract: a documented status; JSON
/// whenever it says so (an [`ErrorDoc`] with a documented code and a message on every error but
/// the health check's 503, which is its own document); an empty body and an ETag on 304;
/// `Allow` on 405; and the held authinfo `secret` nowhere but in a 200 to `GET /v1/authinfo`
/// (unless the request itself carried it: an error may quote what it was sent; pass an empty
/// `secret` then).
pub fn check_api_response(method: &http::Method, path: &str, r: &ApiResponse, secret: &str) {
    assert!(
        API_STATUSES.contains(&r.status),
        "undocumented status {} for {method} {path}",
        r.status
    );
    let is_metrics = r.content_type.starts_with("text/plain");
    if is_metrics {
        assert_eq!(
            (method, path, r.status),
            (&http::Method::GET, "/metrics", 200),
            "only GET /metrics answers text"
        );
    } else {
        assert_eq!(r.content_type, "application/json");
    }
    if r.status == 304 {
        assert!(r.body.is_empty(), "a 304 has no body");
        assert!(r.etag.is_some(), "a 304 carries the ETag");
    } else if !is_metrics {
        let value: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_else(|e| {
            panic!(
                "{method} {path} answered {} with a body that is not JSON ({e}): {:?}",
                r.status,
                String::from_utf8_lossy(&r.body)
            )
        });
        assert!(value.is_object(), "every JSON answer is an object");
    }
    if r.status >= 400 && !(path == "/healthz" && r.status == 503) {
        let doc: ErrorDoc = serde_json::from_slice(&r.body).unwrap_or_else(|e| {
            panic!(
                "{method} {path}: error {} without an error document ({e})",
                r.status
            )
        });
        assert!(
            API_CODES.contains(&doc.code.as_str()),
            "undocumented code {:?}",
            doc.code
        );
        assert!(!doc.message.is_empty(), "every error has a message");
    }
    assert_eq!(r.allow.is_some(), r.status == 405, "Allow exactly on 405");
    let shows_secret = !secret.is_empty() && find(&r.body, secret.as_bytes()).is_some();
    let may_show = method == http::Method::GET && path == "/v1/authinfo" && r.status == 200;
    assert!(
        !shows_secret || may_show,
        "{method} {path} ({}) shows the authinfo",
        r.status
    );
}

/// A single-threaded runtime on tokio's paused clock: long polls and timeouts of the API end as
/// soon as nothing else can happen, so one input never waits in real time.
pub fn paused_runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("runtime")
    })
}

// === config problems ===

/// Checks the problems of a config (or registry) that does not validate: at least one, each
/// `field: reason` with a reason. The field is one of the file's own names (lower case, `_`,
/// `.`, and the further bytes in `extra`) or, for an `unknown field`, the key as the file wrote
/// it: a TOML dotted key (array indices `[n]` aside) that parses back, with no control
/// character, so that a problem stays one unambiguous line.
pub fn check_problems(problems: &[String], extra: &[u8]) {
    assert!(!problems.is_empty(), "invalid without a problem");
    for p in problems {
        if let Some(field) = p.strip_suffix(": unknown field") {
            assert!(!field.chars().any(char::is_control), "{p:?}");
            let mut key = String::new();
            let mut rest = field;
            while let Some(open) = rest.find('[') {
                let (before, after) = rest.split_at(open);
                let Some(close) = after.find(']') else { break };
                if !after[1..close].bytes().all(|b| b.is_ascii_digit()) {
                    break;
                }
                key.push_str(before);
                rest = &after[close + 1..];
            }
            key.push_str(rest);
            assert!(
                toml::from_str::<toml::Table>(&format!("{key} = 1")).is_ok(),
                "an unknown field not named as a TOML key: {p:?}"
            );
            continue;
        }
        let (field, reason) = p.split_once(": ").unwrap_or_else(|| panic!("{p:?}"));
        assert!(
            !field.is_empty()
                && field
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b"_.".contains(&b) || extra.contains(&b)),
            "problem without a field: {p:?}"
        );
        assert!(!reason.is_empty(), "{p:?}");
    }
}
