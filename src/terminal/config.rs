//! The daemon's configuration file (TOML): its raw serde shape, its defaults, and validation
//! into typed values before anything starts.
//!
//! Owns: every default (named constants below) and every check. Validation collects all
//! problems, so `authinfod check-config` lists every bad field at once (exit 78). It must not
//! open sockets or the store: it reads the config file, the CA file and the user database only.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config_file::Problems;
use crate::crypto::{KeySource, Signer};
use crate::units::HumanDuration;

/// Where `authinfod` looks for its config when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/authinfod/authinfod.toml";
/// Default state directory (systemd's `StateDirectory=authinfod`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/authinfod";
/// Default socket path (systemd's `RuntimeDirectory=authinfod`).
pub const DEFAULT_SOCKET_PATH: &str = "/run/authinfod/authinfod.sock";
/// Default socket file mode: owner and group read/write.
pub const DEFAULT_SOCKET_MODE: u32 = 0o660;
/// Default number of connection slots: connections of allowed peers that have sent their first
/// byte (reading a request, being answered, or idle between requests).
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
/// Default share of the slots one uid may hold, so that another allowed uid (the face app
/// beside root's tools) always finds the rest.
pub const DEFAULT_MAX_CONNECTIONS_PER_UID: usize = 32;
/// Default cap on connections of allowed peers that have not sent a byte yet; they hold no slot,
/// and the oldest is closed when a new one would go over the cap.
pub const DEFAULT_MAX_PENDING_CONNECTIONS: usize = 1024;
/// Default cap on requests waiting at once (`?wait=` on `GET /v1/authinfo` and `POST
/// /v1/refresh`); more get 503 `BUSY`, so waiting clients never take every slot.
pub const DEFAULT_MAX_WAITING_REQUESTS: usize = 16;
/// Default cap on denied peers' connections being answered 403 at once; beyond it they are
/// closed unanswered.
pub const DEFAULT_MAX_DENIED_CONNECTIONS: usize = 16;
/// Default time a connection may stay silent after it is accepted before it is closed.
pub const DEFAULT_FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(2);
/// Default time a client may take to send a request head, counted from its first byte or the
/// end of the previous answer (so also the keep-alive idle limit).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default refresh interval: WeChat Pay asks for a fresh authinfo at least hourly.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(3600);
/// Default jitter on the interval, as a fraction: refreshes come up to 10 % early.
pub const DEFAULT_JITTER: f64 = 0.10;
/// Default first retry bound after a failure.
pub const DEFAULT_BACKOFF_MIN: Duration = Duration::from_secs(5);
/// Default ceiling of the doubling, and of the retries of a terminal holding no valid authinfo
/// (or one less than `backoff_max / RUNWAY_SHARE`, 6 min 15 s, from expiry). In an outage
/// ([`crate::schedule::OUTAGE_FAILURES`]) a terminal holding one waits for a share of its
/// runway instead, at most one interval.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Default assumed validity of an authinfo when the platform gives no `expires_in`. WeChat
/// Pay documents none; two hours is twice the refresh interval, so the runway shown to an
/// operator errs on the short side.
pub const DEFAULT_ASSUMED_VALIDITY: Duration = Duration::from_secs(2 * 3600);
/// Default timeout of one call to the proxy.
pub const DEFAULT_PROXY_TIMEOUT: Duration = Duration::from_secs(15);
/// Default timeout of `raw_data_command`.
pub const DEFAULT_RAW_DATA_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Default log filter.
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// Default interval of the device health checks.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(86400);
/// Default shortest time between the starts of two fetches when the second is forced (`POST
/// /v1/refresh`, `authinfod refresh`, new raw_data) while a fresh authinfo is held: a face app
/// looping on refresh costs the merchant one platform call a minute, not one per loop. A shorter
/// `refresh.interval` lowers it to the interval.
pub const DEFAULT_MIN_FORCED_INTERVAL: Duration = Duration::from_secs(60);
/// Default interval of the store check (state directory still there, pending writes retried).
pub const DEFAULT_STORE_CHECK_INTERVAL: Duration = Duration::from_secs(30);

/// The config file as written. Unknown fields are not denied here: `parse` collects them as
/// problems beside the others (`config_file::parse_toml_lenient`).
#[derive(Debug, Deserialize)]
struct RawConfig {
    device_id: Option<String>,
    key_file: Option<String>,
    state_dir: Option<PathBuf>,
    log_level: Option<String>,
    proxy: Option<RawProxy>,
    #[serde(default)]
    socket: RawSocket,
    #[serde(default)]
    refresh: RawRefresh,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    store: RawStore,
}

#[derive(Debug, Default, Deserialize)]
struct RawMetrics {
    textfile: Option<PathBuf>,
    listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    check_interval: Option<HumanDuration>,
}

#[derive(Debug, Deserialize)]
struct RawProxy {
    url: Option<String>,
    ca_file: Option<PathBuf>,
    timeout: Option<HumanDuration>,
}

#[derive(Debug, Default, Deserialize)]
struct RawSocket {
    path: Option<String>,
    mode: Option<String>,
    group: Option<String>,
    allowed_uids: Option<Vec<IdOrName>>,
    allowed_gids: Option<Vec<IdOrName>>,
    max_connections: Option<usize>,
    max_connections_per_uid: Option<usize>,
    max_pending_connections: Option<usize>,
    max_waiting_requests: Option<usize>,
    max_denied_connections: Option<usize>,
    first_byte_timeout: Option<HumanDuration>,
    idle_timeout: Option<HumanDuration>,
}

#[derive(Debug, Default, Deserialize)]
struct RawRefresh {
    interval: Option<HumanDuration>,
    jitter: Option<f64>,
    backoff_min: Option<HumanDuration>,
    backoff_max: Option<HumanDuration>,
    assumed_validity: Option<HumanDuration>,
    raw_data_command: Option<Vec<String>>,
    raw_data_command_timeout: Option<HumanDuration>,
    min_forced_interval: Option<HumanDuration>,
    expires_in_min: Option<HumanDuration>,
    expires_in_max: Option<HumanDuration>,
}

#[derive(Debug, Default, Deserialize)]
struct RawHealth {
    interval: Option<HumanDuration>,
    inspection: Option<bool>,
    alipay_binding: Option<bool>,
    licence: Option<bool>,
}

/// A numeric id or a user/group name in an allow-list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum IdOrName {
    Id(u32),
    Name(String),
}

/// Where the socket lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketAddress {
    /// A filesystem path.
    Path(PathBuf),
    /// A Linux abstract name (written `@name`), for Android where no shared runtime dir exists.
    Abstract(String),
}

impl std::fmt::Display for SocketAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Path(p) => write!(f, "{}", p.display()),
            Self::Abstract(n) => write!(f, "@{n}"),
        }
    }
}

impl SocketAddress {
    /// Parses `@name` as abstract, anything else as an absolute path.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(name) = text.strip_prefix('@') {
            if name.is_empty() || name.len() > 100 {
                return Err("an abstract socket name needs 1 to 100 characters after @".into());
            }
            if !cfg!(any(target_os = "linux", target_os = "android")) {
                return Err("abstract socket names exist only on Linux and Android".into());
            }
            return Ok(Self::Abstract(name.to_owned()));
        }
        let path = PathBuf::from(text);
        if !path.is_absolute() {
            return Err(format!("{text:?} is not an absolute path (or @name)"));
        }
        if text.len() > 100 {
            return Err("socket paths are limited to 100 bytes by the kernel".into());
        }
        Ok(Self::Path(path))
    }
}

/// The proxy the daemon talks to.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// `https://host:port`, without a trailing slash.
    pub url: String,
    pub ca_file: PathBuf,
    /// TLS to the proxy, trusting exactly the CA bundle of `ca_file`: built once, at validation.
    pub tls: std::sync::Arc<rustls::ClientConfig>,
    pub timeout: Duration,
}

/// The Unix socket the face app talks to.
#[derive(Debug, Clone)]
pub struct SocketConfig {
    pub address: SocketAddress,
    pub mode: u32,
    /// Group given ownership of the socket file, resolved to a gid.
    pub group: Option<(String, u32)>,
    /// Peers whose uid is listed are served.
    pub allowed_uids: BTreeSet<u32>,
    /// Peers whose (primary) gid is listed are served.
    pub allowed_gids: BTreeSet<u32>,
    /// The admission limits (see [`SocketLimits`]).
    pub limits: SocketLimits,
}

/// Who gets a connection on the socket, and for how long (the defaults above say what each is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketLimits {
    pub max_connections: usize,
    pub max_connections_per_uid: usize,
    pub max_pending_connections: usize,
    pub max_waiting_requests: usize,
    pub max_denied_connections: usize,
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
}

impl Default for SocketLimits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_uid: DEFAULT_MAX_CONNECTIONS_PER_UID,
            max_pending_connections: DEFAULT_MAX_PENDING_CONNECTIONS,
            max_waiting_requests: DEFAULT_MAX_WAITING_REQUESTS,
            max_denied_connections: DEFAULT_MAX_DENIED_CONNECTIONS,
            first_byte_timeout: DEFAULT_FIRST_BYTE_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// The refresh schedule.
#[derive(Debug, Clone)]
pub struct RefreshConfig {
    pub interval: Duration,
    pub jitter: f64,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub assumed_validity: Duration,
    pub raw_data_command: Option<Vec<String>>,
    pub raw_data_command_timeout: Duration,
    /// A forced refresh starts at most this long after the previous start while a fresh
    /// authinfo is held; otherwise after the backoff ceiling of the failures so far, at most
    /// this. Zero turns the daemon's limit off (the proxy's per-device limits still apply).
    pub min_forced_interval: Duration,
    /// The `expires_in` (seconds) an answer may carry; outside it the answer is malformed.
    pub expires_in_range: std::ops::RangeInclusive<u64>,
}

impl RefreshConfig {
    /// The timing rules of the refresh loop, and of the forced-refresh limit's backoff.
    pub fn schedule(&self) -> crate::schedule::Schedule {
        crate::schedule::Schedule {
            interval: self.interval,
            jitter: self.jitter,
            backoff_min: self.backoff_min,
            backoff_max: self.backoff_max,
        }
    }
}

/// The store's upkeep.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// How often the store checks that its files are still there and retries pending writes.
    pub check_interval: Duration,
}

/// Which device health checks run, and how often.
#[derive(Debug, Clone)]
pub struct HealthConfig {
    pub interval: Duration,
    pub inspection: bool,
    pub alipay_binding: bool,
    pub licence: bool,
}

/// Where the metrics go besides the socket's `/metrics` (Prometheus cannot scrape a Unix
/// socket).
#[derive(Debug, Clone, Default)]
pub struct MetricsConfig {
    /// A file rewritten atomically for node_exporter's textfile collector, on every change and
    /// at least every [`TEXTFILE_EVERY`](super::exporter::TEXTFILE_EVERY).
    pub textfile: Option<PathBuf>,
    /// A loopback TCP address serving `GET /metrics` only.
    pub listen: Option<std::net::SocketAddr>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from (named in the start-up checks' errors).
    pub path: PathBuf,
    pub device_id: String,
    /// The device key: an absolute path to a PEM file, or a `pkcs11:` URI.
    pub key_file: KeySource,
    pub state_dir: PathBuf,
    /// The log filter (EnvFilter syntax) unless `$RUST_LOG` is set; reloaded on SIGHUP.
    pub log_level: String,
    pub proxy: ProxyConfig,
    pub socket: SocketConfig,
    pub refresh: RefreshConfig,
    pub health: HealthConfig,
    pub metrics: MetricsConfig,
    pub store: StoreConfig,
}

/// Why a config could not be used (shared with the proxy's files).
pub use crate::config_file::ConfigError;

/// What the daemon's config is called in errors.
const WHAT: &str = "authinfod config file";

/// Reads and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    parse(&crate::config_file::read(WHAT, path)?, path)
}

/// Validates config text; `path` names it in errors and anchors nothing else.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let mut problems = Problems::new(WHAT);
    let raw: RawConfig = crate::config_file::parse_toml_lenient(WHAT, text, path, &mut problems)?;
    let config = validate(raw, path, &mut problems);
    problems.finish(path, config)
}

fn validate(raw: RawConfig, path: &Path, problems: &mut Problems) -> Option<Config> {
    let device_id = match raw.device_id {
        Some(id) if crate::wire::valid_device_id(&id) => Some(id),
        Some(id) => {
            problems.push(
                "device_id",
                format_args!("{id:?} must be 1 to 64 of A-Z a-z 0-9 . _ -"),
            );
            None
        }
        None => {
            problems.push(
                "device_id",
                "missing (the id this terminal is enrolled under at the proxy)",
            );
            None
        }
    };
    let key_file = key_source(raw.key_file.as_deref(), problems);
    let state_dir = problems.absolute(
        "state_dir",
        raw.state_dir,
        Some(PathBuf::from(DEFAULT_STATE_DIR)),
    );
    let proxy = match raw.proxy {
        Some(p) => validate_proxy(p, problems),
        None => {
            problems.push("proxy", "missing section [proxy] with url and ca_file");
            None
        }
    };
    let socket = validate_socket(raw.socket, problems);
    let refresh = validate_refresh(raw.refresh, problems);
    let health = HealthConfig {
        interval: problems.positive(
            "health.interval",
            raw.health.interval,
            DEFAULT_HEALTH_INTERVAL,
        ),
        inspection: raw.health.inspection.unwrap_or(true),
        alipay_binding: raw.health.alipay_binding.unwrap_or(true),
        licence: raw.health.licence.unwrap_or(true),
    };
    let metrics = validate_metrics(raw.metrics, problems);
    let log_level = raw.log_level.unwrap_or_else(|| DEFAULT_LOG_LEVEL.into());
    if let Err(e) = crate::logging::check_filter(&log_level) {
        problems.push(
            "log_level",
            format_args!(
                "{log_level:?} is not a log filter like info or authinfod=debug,warn: {e}"
            ),
        );
    }
    let store = StoreConfig {
        check_interval: problems.positive(
            "store.check_interval",
            raw.store.check_interval,
            DEFAULT_STORE_CHECK_INTERVAL,
        ),
    };
    Some(Config {
        log_level,
        path: path.to_owned(),
        metrics: metrics?,
        device_id: device_id?,
        key_file: key_file?,
        state_dir: state_dir?,
        proxy: proxy?,
        socket: socket?,
        refresh: refresh?,
        health,
        store,
    })
}

fn validate_proxy(raw: RawProxy, problems: &mut Problems) -> Option<ProxyConfig> {
    let url = match raw.url {
        Some(u) => match check_https_url(&u) {
            Ok(u) => Some(u),
            Err(e) => {
                problems.push("proxy.url", format_args!("{e}"));
                None
            }
        },
        None => {
            problems.push("proxy.url", "missing");
            None
        }
    };
    let ca_file = problems.absolute("proxy.ca_file", raw.ca_file, None);
    let tls = ca_file.as_ref().and_then(|path| {
        let text = problems.read_file("proxy.ca_file", path)?;
        crate::tls::client_config_pinned(&text, &path.display().to_string())
            .map_err(|e| problems.push("proxy.ca_file", e))
            .ok()
    });
    let timeout = problems.positive("proxy.timeout", raw.timeout, DEFAULT_PROXY_TIMEOUT);
    Some(ProxyConfig {
        url: url?,
        ca_file: ca_file?,
        tls: std::sync::Arc::new(tls?),
        timeout,
    })
}

/// `key_file`: an absolute path, or a `pkcs11:` URI that parses.
fn key_source(text: Option<&str>, problems: &mut Problems) -> Option<KeySource> {
    let Some(text) = text else {
        problems.push("key_file", "missing");
        return None;
    };
    match KeySource::parse(text) {
        Ok(KeySource::File(path)) => problems
            .absolute("key_file", Some(path), None)
            .map(KeySource::File),
        Ok(source) => Some(source),
        Err(e) => {
            problems.push("key_file", format_args!("the pkcs11: URI {e}"));
            None
        }
    }
}

fn validate_metrics(raw: RawMetrics, problems: &mut Problems) -> Option<MetricsConfig> {
    let textfile = match raw.textfile {
        None => Some(None),
        Some(p) if p.is_absolute() && p.file_name().is_some() => Some(Some(p)),
        Some(p) => {
            problems.push(
                "metrics.textfile",
                format_args!("{} must be an absolute path to a file", p.display()),
            );
            None
        }
    };
    let listen = match raw.listen {
        None => Some(None),
        Some(text) => match text.parse::<std::net::SocketAddr>() {
            Ok(addr) if addr.ip().is_loopback() => Some(Some(addr)),
            Ok(_) => {
                problems.push(
                    "metrics.listen",
                    format_args!(
                        "{text:?} must be a loopback address (127.0.0.1:PORT or [::1]:PORT): the metrics have no authentication"
                    ),
                );
                None
            }
            Err(_) => {
                problems.push(
                    "metrics.listen",
                    format_args!("{text:?} is not an address like 127.0.0.1:9101"),
                );
                None
            }
        },
    };
    Some(MetricsConfig {
        textfile: textfile?,
        listen: listen?,
    })
}

/// Reads and validates the config file at `path` and checks what `run` checks at start beyond
/// the file itself, listing every problem of both kinds at once: the device key is private
/// (0600), readable and an RSA key, or for a `pkcs11:` URI the module loads, the token and the
/// key are there, the PIN works and a test signature verifies; the state directory is (or can
/// be made) a writable directory. `check-config` and `run` both start here, so the one predicts
/// the other. Returns the config and the key's signer.
pub fn load_for_run(path: &Path) -> Result<(Config, Signer), ConfigError> {
    let text = crate::config_file::read(WHAT, path)?;
    let mut problems = Problems::new(WHAT);
    let raw: RawConfig = crate::config_file::parse_toml_lenient(WHAT, &text, path, &mut problems)?;
    // The key and the state directory are checked even when other fields are wrong: every
    // problem at once. Their own shape problems are reported by `validate`.
    let key = raw
        .key_file
        .as_deref()
        .and_then(|t| KeySource::parse(t).ok())
        .filter(|k| k.file().is_none_or(Path::is_absolute));
    let state_dir = raw
        .state_dir
        .clone()
        .or_else(|| Some(PathBuf::from(DEFAULT_STATE_DIR)))
        .filter(|p| p.is_absolute());
    let config = validate(raw, path, &mut problems);
    let signer = check_files(key.as_ref(), state_dir.as_deref(), path, &mut problems);
    let both = config.zip(signer);
    problems.finish(path, both)
}

/// The start-up file checks of [`load_for_run`] for a config already loaded (the daemon
/// repeats them at start; tests and the demo load configs themselves).
pub fn preflight(config: &Config) -> Result<Signer, ConfigError> {
    let mut problems = Problems::new(WHAT);
    let signer = check_files(
        Some(&config.key_file),
        Some(&config.state_dir),
        &config.path,
        &mut problems,
    );
    problems.finish(&config.path, signer)
}

fn check_files(
    key: Option<&KeySource>,
    state_dir: Option<&Path>,
    config: &Path,
    problems: &mut Problems,
) -> Option<Signer> {
    if let Some(dir) = state_dir
        && let Err(e) = usable_state_dir(dir)
    {
        problems.push("state_dir", e);
    }
    problems.signer("key_file", key?, config, crate::crypto::RsaSigner::from_pem)
}

/// Whether `dir` is a directory this process can read (writing it is the store's to try), or
/// could be created as one (its nearest existing ancestor is a writable directory). Nothing is
/// created.
fn usable_state_dir(dir: &Path) -> Result<(), String> {
    use nix::unistd::{AccessFlags, access};
    let mut at = dir;
    loop {
        match std::fs::metadata(at) {
            // An existing state directory only needs to be readable: on a read-only or full
            // disk the daemon serves what it holds and says it is not persisting (README, How
            // it behaves).
            Ok(meta) if meta.is_dir() && at == dir => {
                return access(at, AccessFlags::R_OK | AccessFlags::X_OK)
                    .map_err(|e| format!("{} is not readable: {e}", dir.display()));
            }
            Ok(meta) if meta.is_dir() => {
                return access(at, AccessFlags::W_OK | AccessFlags::X_OK).map_err(|e| {
                    format!(
                        "{} does not exist and {} is not writable to create it: {e}",
                        dir.display(),
                        at.display()
                    )
                });
            }
            Ok(_) => return Err(format!("{} is not a directory", at.display())),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) =>
            {
                match at.parent() {
                    Some(parent) => at = parent,
                    None => return Err(format!("{} cannot be created", dir.display())),
                }
            }
            Err(e) => return Err(format!("cannot inspect {}: {e}", at.display())),
        }
    }
}

/// Accepts `https://host[:port][/]` only: no path, query or credentials (the request paths are
/// the contract's), since a terminal must never talk to its proxy in clear text.
pub fn check_https_url(text: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(text).map_err(|e| format!("{text:?} is not a URL: {e}"))?;
    if url.scheme() != "https" {
        return Err(format!("{text:?} must use https://"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{text:?} has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("{text:?} must not carry credentials"));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{text:?} must have no path, query or fragment"));
    }
    Ok(text.trim_end_matches('/').to_owned())
}

fn validate_socket(raw: RawSocket, problems: &mut Problems) -> Option<SocketConfig> {
    let limits = validate_limits(&raw, problems);
    let address = match SocketAddress::parse(raw.path.as_deref().unwrap_or(DEFAULT_SOCKET_PATH)) {
        Ok(a) => Some(a),
        Err(e) => {
            problems.push("socket.path", format_args!("{e}"));
            None
        }
    };
    let mode = match raw.mode.as_deref() {
        None => Some(DEFAULT_SOCKET_MODE),
        Some(m) => match u32::from_str_radix(m.trim_start_matches("0o"), 8) {
            Ok(mode) if mode <= 0o777 && mode & 0o007 == 0 => Some(mode),
            Ok(_) => {
                problems.push(
                    "socket.mode",
                    format_args!("{m:?} must not give others access (use 0660 or tighter)"),
                );
                None
            }
            Err(_) => {
                problems.push(
                    "socket.mode",
                    format_args!("{m:?} is not an octal mode like \"0660\""),
                );
                None
            }
        },
    };
    let group = raw
        .group
        .and_then(|name| match resolve_group(&IdOrName::Name(name.clone())) {
            Ok(gid) => Some((name, gid)),
            Err(e) => {
                problems.push("socket.group", format_args!("{e}"));
                None
            }
        });
    let own_uid = nix::unistd::Uid::current().as_raw();
    let allowed_uids = match raw.allowed_uids {
        None => Some(BTreeSet::from([0, own_uid])),
        Some(list) => resolve_all("socket.allowed_uids", &list, resolve_user, problems),
    };
    let allowed_gids = match raw.allowed_gids {
        None => Some(BTreeSet::new()),
        Some(list) => resolve_all("socket.allowed_gids", &list, resolve_group, problems),
    };
    Some(SocketConfig {
        address: address?,
        mode: mode?,
        group,
        allowed_uids: allowed_uids?,
        allowed_gids: allowed_gids?,
        limits,
    })
}

fn validate_limits(raw: &RawSocket, problems: &mut Problems) -> SocketLimits {
    fn count(
        problems: &mut Problems,
        field: &str,
        value: Option<usize>,
        default: usize,
        max: usize,
    ) -> usize {
        let value = value.unwrap_or(default);
        if !(1..=max).contains(&value) {
            problems.push(field, format_args!("must be 1 to {max}"));
        }
        value
    }
    let limits = SocketLimits {
        max_connections: count(
            problems,
            "socket.max_connections",
            raw.max_connections,
            DEFAULT_MAX_CONNECTIONS,
            4096,
        ),
        max_connections_per_uid: count(
            problems,
            "socket.max_connections_per_uid",
            raw.max_connections_per_uid,
            DEFAULT_MAX_CONNECTIONS_PER_UID,
            4096,
        ),
        max_pending_connections: count(
            problems,
            "socket.max_pending_connections",
            raw.max_pending_connections,
            DEFAULT_MAX_PENDING_CONNECTIONS,
            65536,
        ),
        max_waiting_requests: count(
            problems,
            "socket.max_waiting_requests",
            raw.max_waiting_requests,
            DEFAULT_MAX_WAITING_REQUESTS,
            4096,
        ),
        max_denied_connections: count(
            problems,
            "socket.max_denied_connections",
            raw.max_denied_connections,
            DEFAULT_MAX_DENIED_CONNECTIONS,
            4096,
        ),
        first_byte_timeout: problems.positive(
            "socket.first_byte_timeout",
            raw.first_byte_timeout,
            DEFAULT_FIRST_BYTE_TIMEOUT,
        ),
        idle_timeout: problems.positive(
            "socket.idle_timeout",
            raw.idle_timeout,
            DEFAULT_IDLE_TIMEOUT,
        ),
    };
    if limits.max_waiting_requests >= limits.max_connections {
        problems.push(
            "socket.max_waiting_requests",
            "must be less than socket.max_connections (waiting requests hold slots)",
        );
    }
    limits
}

fn resolve_all(
    field: &str,
    list: &[IdOrName],
    resolve: fn(&IdOrName) -> Result<u32, String>,
    problems: &mut Problems,
) -> Option<BTreeSet<u32>> {
    let mut ids = BTreeSet::new();
    let mut ok = true;
    for entry in list {
        match resolve(entry) {
            Ok(id) => {
                ids.insert(id);
            }
            Err(e) => {
                problems.push(field, e);
                ok = false;
            }
        }
    }
    ok.then_some(ids)
}

fn resolve_user(entry: &IdOrName) -> Result<u32, String> {
    resolve_id(entry, "user", "uids", |name| {
        nix::unistd::User::from_name(name).map(|user| user.map(|u| u.uid.as_raw()))
    })
}

fn resolve_group(entry: &IdOrName) -> Result<u32, String> {
    resolve_id(entry, "group", "gids", |name| {
        nix::unistd::Group::from_name(name).map(|group| group.map(|g| g.gid.as_raw()))
    })
}

/// A numeric id as it is, or the id of the `what` (user, group) named, looked up with `lookup`;
/// the errors say that numeric `ids` work everywhere.
fn resolve_id(
    entry: &IdOrName,
    what: &str,
    ids: &str,
    lookup: impl FnOnce(&str) -> nix::Result<Option<u32>>,
) -> Result<u32, String> {
    match entry {
        IdOrName::Id(id) => Ok(*id),
        IdOrName::Name(name) => match lookup(name) {
            Ok(Some(id)) => Ok(id),
            Ok(None) => Err(format!(
                "no {what} named {name:?} (numeric {ids} work everywhere)"
            )),
            Err(e) => Err(format!("cannot look up {what} {name:?}: {e}")),
        },
    }
}

fn validate_refresh(raw: RawRefresh, problems: &mut Problems) -> Option<RefreshConfig> {
    let interval = problems.positive("refresh.interval", raw.interval, DEFAULT_INTERVAL);
    let jitter = raw.jitter.unwrap_or(DEFAULT_JITTER);
    if !(0.0..=0.5).contains(&jitter) {
        problems.push(
            "refresh.jitter",
            format_args!("{jitter} must be between 0.0 and 0.5"),
        );
    }
    let backoff_min =
        problems.positive("refresh.backoff_min", raw.backoff_min, DEFAULT_BACKOFF_MIN);
    let backoff_max =
        problems.positive("refresh.backoff_max", raw.backoff_max, DEFAULT_BACKOFF_MAX);
    if backoff_max < backoff_min {
        problems.push(
            "refresh.backoff_max",
            "must not be less than refresh.backoff_min",
        );
    }
    let assumed_validity = problems.positive(
        "refresh.assumed_validity",
        raw.assumed_validity,
        DEFAULT_ASSUMED_VALIDITY,
    );
    let raw_data_command = match raw.raw_data_command {
        Some(cmd) if cmd.is_empty() || cmd[0].is_empty() => {
            problems.push(
                "refresh.raw_data_command",
                "needs a program, e.g. [\"/usr/bin/faceapp-rawdata\"]",
            );
            None
        }
        Some(cmd) if !Path::new(&cmd[0]).is_absolute() => {
            problems.push(
                "refresh.raw_data_command",
                format_args!("{:?} must be an absolute path", cmd[0]),
            );
            None
        }
        other => other,
    };
    let raw_data_command_timeout = problems.positive(
        "refresh.raw_data_command_timeout",
        raw.raw_data_command_timeout,
        DEFAULT_RAW_DATA_COMMAND_TIMEOUT,
    );
    // The default never exceeds a shorter interval; a value written above it is refused: a
    // forced refresh held past the next scheduled one would be no limit but a stall.
    let min_forced_interval = raw
        .min_forced_interval
        .map_or(DEFAULT_MIN_FORCED_INTERVAL.min(interval), |d| d.0);
    if !interval.is_zero() && min_forced_interval > interval {
        problems.push(
            "refresh.min_forced_interval",
            "must not be more than refresh.interval",
        );
    }
    let expires_in_min = raw
        .expires_in_min
        .map_or(crate::wire::MIN_EXPIRES_IN, |d| d.0.as_secs());
    let expires_in_max = raw
        .expires_in_max
        .map_or(crate::wire::MAX_EXPIRES_IN, |d| d.0.as_secs());
    if expires_in_min == 0 || expires_in_max < expires_in_min {
        problems.push(
            "refresh.expires_in_max",
            "refresh.expires_in_min must be at least 1s and expires_in_max not less than it",
        );
    }
    if !(expires_in_min..=expires_in_max).contains(&assumed_validity.as_secs()) {
        problems.push(
            "refresh.assumed_validity",
            "must lie between refresh.expires_in_min and refresh.expires_in_max",
        );
    }
    Some(RefreshConfig {
        interval,
        jitter,
        backoff_min,
        backoff_max,
        assumed_validity,
        raw_data_command,
        raw_data_command_timeout,
        min_forced_interval,
        expires_in_range: expires_in_min..=expires_in_max,
    })
}

/// The socket address a client command should use: `--socket`, else the config's, else the
/// default. Reads the config leniently (only `[socket] path`), so `authinfod status` works for
/// an operator who cannot read the key file.
pub fn client_socket(config_path: &Path) -> SocketAddress {
    #[derive(Deserialize)]
    struct Lenient {
        socket: Option<LenientSocket>,
    }
    #[derive(Deserialize)]
    struct LenientSocket {
        path: Option<String>,
    }
    std::fs::read_to_string(config_path)
        .ok()
        .and_then(|t| toml::from_str::<Lenient>(&t).ok())
        .and_then(|c| c.socket?.path)
        .and_then(|p| SocketAddress::parse(&p).ok())
        .unwrap_or_else(|| SocketAddress::Path(PathBuf::from(DEFAULT_SOCKET_PATH)))
}

/// A valid config rooted in `dir`, for unit tests (no files are read).
#[cfg(test)]
pub fn test_config(dir: &Path) -> Config {
    Config {
        path: dir.join("authinfod.toml"),
        device_id: "T-TEST".into(),
        key_file: KeySource::File(dir.join("device.key")),
        state_dir: dir.join("state"),
        log_level: DEFAULT_LOG_LEVEL.into(),
        proxy: ProxyConfig {
            url: "https://127.0.0.1:9".into(),
            ca_file: dir.join("ca.pem"),
            tls: std::sync::Arc::new(crate::tls::client_config_trusting_nothing()),
            timeout: DEFAULT_PROXY_TIMEOUT,
        },
        socket: SocketConfig {
            address: SocketAddress::Path(dir.join("authinfod.sock")),
            mode: DEFAULT_SOCKET_MODE,
            group: None,
            allowed_uids: BTreeSet::from([0, nix::unistd::Uid::current().as_raw()]),
            allowed_gids: BTreeSet::new(),
            limits: SocketLimits::default(),
        },
        refresh: RefreshConfig {
            interval: DEFAULT_INTERVAL,
            jitter: DEFAULT_JITTER,
            backoff_min: DEFAULT_BACKOFF_MIN,
            backoff_max: DEFAULT_BACKOFF_MAX,
            assumed_validity: DEFAULT_ASSUMED_VALIDITY,
            raw_data_command: None,
            raw_data_command_timeout: DEFAULT_RAW_DATA_COMMAND_TIMEOUT,
            min_forced_interval: DEFAULT_MIN_FORCED_INTERVAL,
            expires_in_range: crate::wire::EXPIRES_IN_RANGE,
        },
        health: HealthConfig {
            interval: DEFAULT_HEALTH_INTERVAL,
            inspection: true,
            alipay_binding: true,
            licence: true,
        },
        metrics: MetricsConfig::default(),
        store: StoreConfig {
            check_interval: DEFAULT_STORE_CHECK_INTERVAL,
        },
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[cfg(feature = "merchant")]
    fn ca_file(dir: &Path) -> PathBuf {
        let pki = crate::tls::generate_pki("t", &["localhost"]).expect("pki");
        let path = dir.join("ca.pem");
        std::fs::write(&path, pki.ca_pem).expect("write");
        path
    }

    #[test]
    #[cfg(feature = "merchant")]
    fn minimal_config_gets_the_documented_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = ca_file(dir.path());
        let text = format!(
            "device_id = \"T1\"\nkey_file = \"/var/lib/authinfod/device.key\"\n[proxy]\nurl = \"https://proxy.example:8443/\"\nca_file = \"{}\"\n",
            ca.display()
        );
        let c = parse(&text, Path::new("t.toml")).expect("valid");
        assert_eq!(c.proxy.url, "https://proxy.example:8443");
        assert_eq!(c.refresh.interval, DEFAULT_INTERVAL);
        assert_eq!(c.refresh.backoff_max, DEFAULT_BACKOFF_MAX);
        assert_eq!(c.refresh.min_forced_interval, DEFAULT_MIN_FORCED_INTERVAL);
        assert_eq!(c.socket.mode, 0o660);
        assert_eq!(
            c.socket.address,
            SocketAddress::Path(DEFAULT_SOCKET_PATH.into())
        );
        assert!(c.socket.allowed_uids.contains(&0));
        assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert!(c.health.inspection && c.health.alipay_binding && c.health.licence);
        assert_eq!(c.refresh.expires_in_range, crate::wire::EXPIRES_IN_RANGE);
        assert_eq!(c.store.check_interval, DEFAULT_STORE_CHECK_INTERVAL);
    }

    #[test]
    fn an_expires_in_range_that_excludes_the_assumed_validity_or_is_reversed_is_refused() {
        for refresh in [
            "expires_in_min = \"1h\"\nexpires_in_max = \"30m\"",
            "expires_in_max = \"1h\"",
            "expires_in_min = \"0s\"",
        ] {
            let text = format!(
                "device_id = \"T1\"\nkey_file = \"/k\"\n[proxy]\nurl = \"https://p\"\nca_file = \"/nonexistent\"\n[refresh]\n{refresh}\n"
            );
            let err = parse(&text, Path::new("t.toml")).unwrap_err();
            let ConfigError::Invalid { problems, .. } = &err else {
                panic!("expected Invalid, got {err}");
            };
            assert!(
                problems.iter().any(|p| p.starts_with("refresh.")),
                "{refresh}: {problems:#?}"
            );
        }
    }

    /// Found by the `daemon_config` fuzz target: `interval = "9999999999999999d"` validated, and
    /// the refresh loop would have panicked adding it to the clock (`Duration::mul_f64`
    /// overflowing). Every duration is now at most a year.
    #[test]
    #[cfg(feature = "merchant")]
    fn a_duration_past_a_year_is_a_problem_not_a_panic_in_the_refresh_loop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = ca_file(dir.path());
        let text = format!(
            "device_id = \"T1\"\nkey_file = \"/k\"\n[proxy]\nurl = \"https://p.example\"\nca_file = \"{}\"\ntimeout = \"366d\"\n[refresh]\ninterval = \"9999999999999999d\"\n",
            ca.display()
        );
        let err = parse(&text, Path::new("t.toml")).unwrap_err();
        let ConfigError::Invalid { problems, .. } = &err else {
            panic!("expected Invalid, got {err}");
        };
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("refresh.interval: ") && p.ends_with("is longer than 365d")),
            "{problems:#?}"
        );
        assert!(
            problems.iter().any(|p| p.starts_with("proxy.timeout: ")),
            "{problems:#?}"
        );
        let year = text
            .replace("9999999999999999d", "365d")
            .replace("366d", "1m");
        parse(&year, Path::new("t.toml")).expect("a year is allowed");
    }

    #[test]
    fn every_invalid_field_is_listed_not_just_the_first() {
        let text = r#"
device_id = "bad id"
key_file = "relative.key"
[proxy]
url = "http://proxy.example"
ca_file = "/nonexistent/ca.pem"
[socket]
path = "relative.sock"
mode = "0666"
allowed_uids = ["no-such-user-xyz", 1000]
[refresh]
interval = "0s"
jitter = 0.9
backoff_min = "10m"
backoff_max = "1m"
raw_data_command = ["rawdata"]
"#;
        let err = parse(text, Path::new("bad.toml")).unwrap_err();
        let ConfigError::Invalid { problems, .. } = &err else {
            panic!("expected Invalid, got {err}");
        };
        for field in [
            "device_id",
            "key_file",
            "proxy.url",
            "proxy.ca_file",
            "socket.path",
            "socket.mode",
            "socket.allowed_uids",
            "refresh.interval",
            "refresh.jitter",
            "refresh.backoff_max",
            "refresh.raw_data_command",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(field)),
                "{field} not reported in {problems:#?}"
            );
        }
        assert_eq!(problems.len(), 11, "{problems:#?}");
    }

    /// An unknown field is named, and does not hide the other problems of the file (the
    /// misspelt key_file is also "missing"; proxy.url is not https).
    #[test]
    fn unknown_fields_are_listed_beside_the_other_problems() {
        let err = parse(
            "device_id = \"a\"\nkey_fle = \"/k\"\n[proxy]\nurl = \"http://p\"\nca_fil = \"/c\"\n[sokcet]\n",
            Path::new("x.toml"),
        )
        .unwrap_err();
        let problems = err.problems();
        for expected in [
            "key_fle: unknown field",
            "proxy.ca_fil: unknown field",
            "sokcet: unknown field",
            "key_file: missing",
        ] {
            assert!(
                problems.iter().any(|p| p == expected),
                "{expected} in {problems:#?}"
            );
        }
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("proxy.url:") && p.contains("https")),
            "{problems:#?}"
        );
    }

    /// What `run` refuses at start, `preflight` (and so `check-config`) refuses too, naming
    /// each problem: a missing key, a key others can read, a file that is no key, a state
    /// directory that cannot be one.
    #[test]
    fn preflight_refuses_what_run_would_refuse() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = test_config(dir.path());
        let key_file = dir.path().join("device.key");
        let err = preflight(&config).unwrap_err();
        assert!(
            err.problems()
                .iter()
                .any(|p| p.starts_with("key_file: cannot read")),
            "{err}"
        );
        crate::test_support::write_file(&key_file, &crate::crypto::test_key(0).private_pem, 0o644);
        let err = preflight(&config).unwrap_err();
        assert!(err.to_string().contains("mode 644"), "{err}");
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let signer = preflight(&config).expect("a private RSA key and a creatable state dir");
        assert_eq!(
            signer.public_key().expect("public"),
            crate::crypto::test_key(0).public
        );
        std::fs::write(&key_file, "not a key").expect("write");
        let err = preflight(&config).unwrap_err();
        assert!(err.problems()[0].starts_with("key_file: "), "{err}");
        std::fs::write(&key_file, &crate::crypto::test_key(0).private_pem).expect("key");
        let file = dir.path().join("a-file");
        std::fs::write(&file, "").expect("write");
        config.state_dir = file.join("state");
        let err = preflight(&config).unwrap_err();
        assert_eq!(err.problems().len(), 1, "{err}");
        assert!(err.problems()[0].contains("is not a directory"), "{err}");
        assert!(
            err.to_string().contains("authinfod.toml"),
            "names the file: {err}"
        );
    }

    #[test]
    fn min_forced_interval_may_be_zero_but_not_above_the_interval() {
        let problems = |refresh: &str| {
            parse(&format!("[refresh]\n{refresh}\n"), Path::new("x.toml"))
                .unwrap_err()
                .problems()
                .iter()
                .filter(|p| p.starts_with("refresh."))
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(
            problems("interval = \"30m\"\nmin_forced_interval = \"1h\""),
            ["refresh.min_forced_interval: must not be more than refresh.interval"]
        );
        assert!(problems("min_forced_interval = \"0s\"").is_empty());
        let raw: RawRefresh = toml::from_str("interval = \"30s\"").expect("toml");
        let mut none = Problems::new(WHAT);
        let c = validate_refresh(raw, &mut none).expect("valid");
        assert!(none.is_empty());
        assert_eq!(
            c.min_forced_interval,
            Duration::from_secs(30),
            "the default follows a shorter interval"
        );
        assert!(problems("min_forced_interval = \"5m\"").is_empty());
    }

    #[test]
    fn bad_durations_are_parse_errors_naming_them() {
        let err = parse("[refresh]\ninterval = \"1 hour\"\n", Path::new("x.toml")).unwrap_err();
        assert!(err.to_string().contains("unknown unit"), "{err}");
    }

    /// Uncomments `# key = value` lines of an annotated example, so every documented optional
    /// field is checked too.
    pub(crate) fn uncomment(text: &str) -> String {
        text.lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest)
                    if rest
                        .split_once(" = ")
                        .is_some_and(|(k, _)| !k.contains(' ')) =>
                {
                    rest
                }
                // An optional section's header (`# [cluster]`), alone on its line.
                Some(rest)
                    if rest.starts_with('[')
                        && rest.ends_with(']')
                        && rest[1..rest.len() - 1]
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b == b'_') =>
                {
                    rest
                }
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The shipped example names only real fields: with every option uncommented, the only
    /// problems left are the files and names that exist on a terminal, not here.
    #[test]
    fn the_annotated_example_matches_the_config_schema() {
        let text = uncomment(include_str!("../../examples/authinfod.toml"));
        assert!(
            text.contains("\nraw_data_command = ["),
            "uncommenting works"
        );
        let err = parse(&text, Path::new("examples/authinfod.toml")).unwrap_err();
        let ConfigError::Invalid { problems, .. } = &err else {
            panic!("the example must parse: {err}");
        };
        for p in problems {
            assert!(
                p.starts_with("proxy.ca_file: cannot read")
                    || p.contains("no user named")
                    || p.contains("no group named")
                    || p.starts_with("refresh.raw_data_command"),
                "unexpected problem in the example: {p}"
            );
        }
    }

    #[test]
    fn abstract_names_and_numeric_ids_are_accepted() {
        assert_eq!(
            SocketAddress::parse("@authinfod"),
            Ok(SocketAddress::Abstract("authinfod".into()))
        );
        assert!(SocketAddress::parse("@").is_err());
        assert_eq!(resolve_user(&IdOrName::Id(10123)), Ok(10123));
        assert_eq!(resolve_user(&IdOrName::Name("root".into())), Ok(0));
        assert_eq!(resolve_group(&IdOrName::Name("root".into())), Ok(0));
    }

    #[test]
    fn proxy_url_must_be_bare_https() {
        assert!(check_https_url("https://p.example:8443").is_ok());
        assert!(check_https_url("http://p.example").is_err());
        assert!(check_https_url("https://u:p@p.example").is_err());
        assert!(check_https_url("https://p.example/api").is_err());
        assert!(check_https_url("not a url").is_err());
    }

    #[test]
    fn metrics_go_to_an_absolute_file_and_a_loopback_address_only() {
        let ok = |textfile: Option<&str>, listen: Option<&str>| {
            let mut problems = Problems::new("config file");
            let raw = RawMetrics {
                textfile: textfile.map(PathBuf::from),
                listen: listen.map(String::from),
            };
            let got = validate_metrics(raw, &mut problems);
            assert_eq!(got.is_some(), problems.is_empty(), "{problems:?}");
            got
        };
        let m = ok(
            Some("/var/lib/node_exporter/authinfod.prom"),
            Some("127.0.0.1:9101"),
        )
        .expect("valid");
        assert_eq!(m.listen, Some("127.0.0.1:9101".parse().expect("addr")));
        assert!(ok(None, Some("[::1]:9101")).is_some());
        assert!(
            ok(None, Some("0.0.0.0:9101")).is_none(),
            "no unauthenticated wide listener"
        );
        assert!(ok(None, Some("192.168.1.5:9101")).is_none());
        assert!(ok(None, Some("localhost")).is_none());
        assert!(ok(Some("relative.prom"), None).is_none());
        assert!(ok(Some("/"), None).is_none());
    }
}
