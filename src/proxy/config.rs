//! The proxy's configuration file (TOML): raw shape, defaults, and validation into typed values,
//! keys loaded and checked, before anything listens.
//!
//! Owns: every default and check, including the rule that a private key or secret file readable
//! by group or others refuses to start (the file is named). Validation collects every problem.
//! It must not open sockets or call the platforms.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::terminals::risk::Thresholds;
use crate::config_file::Problems;
use crate::crypto::{KeySource, RsaSigner, RsaVerifier, Signer};
use crate::platform::aliyun::SignatureScheme;
use crate::platform::wechatpay::PlatformKeys;
use crate::platform::wechatpay::certificates::ApiV3Key;
use crate::platform::{Egress, Trust, Upstream};
use crate::proxy::limits::{Bucket, LimitsConfig};
use crate::units::HumanDuration;

/// Where `authinfo-proxy` looks for its config when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/authinfo-proxy/authinfo-proxy.toml";
/// Default HTTPS listen address for terminals.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8443";
/// Default admin listener (`/healthz`, `/metrics`, `/fleet`): loopback only.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9464";
/// Default state directory (the fleet cache).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/authinfo-proxy";
/// Default timeout of one platform call.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(10);
/// Default fleet sync period.
pub const DEFAULT_FLEET_INTERVAL: Duration = Duration::from_secs(3600);

/// The config file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    admin_listen: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    registry: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    upstream_timeout: Option<HumanDuration>,
    #[serde(default)]
    upstream: RawUpstream,
    wechatpay: Option<RawWechatPay>,
    #[serde(default)]
    fleet: RawFleet,
    #[serde(default)]
    limits: RawLimits,
    alipay: Option<RawAlipay>,
    aliyun: Option<RawAliyun>,
    admin_token_file: Option<PathBuf>,
    #[serde(default)]
    terminals: RawTerminals,
    cluster: Option<RawCluster>,
}

/// `[cluster]`: the replicas' shared Redis.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    redis_url: Option<String>,
    username: Option<String>,
    password_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    key_prefix: Option<String>,
    lease: Option<HumanDuration>,
    timeout: Option<HumanDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTerminals {
    authinfo_issued_within: Option<HumanDuration>,
    offline_after: Option<HumanDuration>,
    runway_below: Option<HumanDuration>,
    licence_warning_days: Option<i64>,
    licence_critical_days: Option<i64>,
    clock_skew_above: Option<HumanDuration>,
    report_burst: Option<u32>,
    report_refill: Option<HumanDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWechatPay {
    base_url: Option<String>,
    mchid: Option<String>,
    sp_appid: Option<String>,
    /// A key file, or a `pkcs11:` URI.
    merchant_key: Option<String>,
    merchant_serial: Option<String>,
    merchant_certificate: Option<PathBuf>,
    public_key_id: Option<String>,
    public_key: Option<PathBuf>,
    platform_certificates: Option<PathBuf>,
    apiv3_key_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    http_proxy: Option<String>,
    trust: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFleet {
    enabled: Option<bool>,
    sync_interval: Option<HumanDuration>,
    requests_per_second: Option<u32>,
    requests_per_day: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    authinfo_burst: Option<u32>,
    authinfo_every: Option<HumanDuration>,
    health_burst: Option<u32>,
    health_every: Option<HumanDuration>,
    wechatpay_per_second: Option<u32>,
    alipay_per_second: Option<u32>,
    aliyun_per_second: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlipay {
    gateway: Option<String>,
    app_id: Option<String>,
    /// A key file, or a `pkcs11:` URI.
    app_private_key: Option<String>,
    alipay_public_key: Option<PathBuf>,
    app_auth_token_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAliyun {
    endpoint: Option<String>,
    access_key_id: Option<String>,
    access_key_secret_file: Option<PathBuf>,
    signature: Option<String>,
    ca_file: Option<PathBuf>,
}

/// WeChat Pay settings, keys loaded.
#[derive(Debug)]
pub struct WechatPayConfig {
    pub base_url: reqwest::Url,
    pub mchid: String,
    pub sp_appid: String,
    /// The merchant API key: from a file, or inside a PKCS#11 token.
    pub merchant_key: Signer,
    pub merchant_serial: String,
    pub platform_keys: PlatformKeys,
    /// The APIv3 key: when given, platform certificates are downloaded and kept up to date.
    pub apiv3_key: Option<ApiV3Key>,
    /// Extra CA PEM trusted for `base_url` (the sandbox's).
    pub ca_pem: Option<String>,
}

/// Fleet sync settings.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub enabled: bool,
    pub sync_interval: Duration,
    pub requests_per_second: u32,
    pub requests_per_day: u32,
}

/// Alipay settings, keys loaded.
#[derive(Debug)]
pub struct AlipayConfig {
    pub gateway: String,
    pub app_id: String,
    /// The app private key: from a file, or inside a PKCS#11 token.
    pub app_key: Signer,
    pub alipay_public: RsaVerifier,
    pub app_auth_token: Option<String>,
    pub ca_pem: Option<String>,
}

/// Alibaba Cloud settings, secret loaded.
pub struct AliyunConfig {
    pub endpoint: String,
    pub access_key_id: String,
    pub access_key_secret: String,
    pub scheme: SignatureScheme,
    pub ca_pem: Option<String>,
}

impl std::fmt::Debug for AliyunConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AliyunConfig")
            .field("endpoint", &self.endpoint)
            .field("access_key_id", &self.access_key_id)
            .field("scheme", &self.scheme)
            .finish_non_exhaustive()
    }
}

/// The validated configuration.
#[derive(Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// The terminal listener's TLS: `tls_cert` (leaf first) with `tls_key`, built at validation.
    pub tls: Arc<rustls::ServerConfig>,
    pub registry: PathBuf,
    pub state_dir: PathBuf,
    pub upstream_timeout: Duration,
    /// How every platform call goes out: proxy and trusted roots.
    pub upstream: Upstream,
    pub wechatpay: WechatPayConfig,
    pub fleet: FleetConfig,
    /// Per-device buckets and per-merchant ceilings (`[limits]`).
    pub limits: LimitsConfig,
    pub alipay: Option<AlipayConfig>,
    pub aliyun: Option<AliyunConfig>,
    /// The admin listener's token (`admin_token_file`): when set, every admin call needs it
    /// (`Authorization: Bearer <token>`, or basic auth with it as the password). Required when
    /// the admin listener is not on loopback.
    pub admin_token: Option<AdminToken>,
    /// The fleet view's settings (`[terminals]`).
    pub terminals: TerminalsConfig,
    /// The replicas' shared Redis (`[cluster]`); `None`: one proxy on its own store.
    pub cluster: Option<super::cluster::ClusterConfig>,
}

/// `[terminals]`: the fleet view's risk thresholds and each terminal's report rate.
#[derive(Debug, Clone, Copy)]
pub struct TerminalsConfig {
    pub thresholds: Thresholds,
    /// Reports a terminal may send in a burst.
    pub report_burst: u32,
    /// One more report is admitted every this long once the burst is spent.
    pub report_refill: Duration,
}

/// The admin listener's token. Never logged or shown.
#[derive(Clone)]
pub struct AdminToken(String);

impl AdminToken {
    /// The shortest token accepted (a guessable token on a non-loopback listener is no wall).
    pub const MIN_LEN: usize = 16;

    pub fn new(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.len() < Self::MIN_LEN {
            return Err(format!(
                "the token must be at least {} characters",
                Self::MIN_LEN
            ));
        }
        if text
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == ':')
        {
            return Err("the token must not hold spaces, control characters or ':'".into());
        }
        Ok(Self(text.to_owned()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `given` is the token, in time independent of where they differ.
    pub fn matches(&self, given: &[u8]) -> bool {
        let mine = self.0.as_bytes();
        mine.len() == given.len()
            && mine
                .iter()
                .zip(given)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

impl Config {
    /// What an operator should hear about the configured keys at start (an extractable key in
    /// a token), each naming its field.
    pub fn key_warnings(&self) -> Vec<String> {
        let named = |field: &'static str, key: &Signer| {
            key.warnings()
                .into_iter()
                .map(move |w| format!("{field}: {w}"))
        };
        let mut warnings: Vec<String> =
            named("wechatpay.merchant_key", &self.wechatpay.merchant_key).collect();
        if let Some(alipay) = &self.alipay {
            warnings.extend(named("alipay.app_private_key", &alipay.app_key));
        }
        warnings
    }
}

/// Why a config could not be used (shared with the daemon's config and the registry).
pub use crate::config_file::ConfigError;

/// What the proxy's config is called in errors.
const WHAT: &str = "authinfo-proxy config file";

/// The environment variables the config reads, most preferred first: the egress proxy when
/// `[upstream] http_proxy` is not set (as curl reads them), the hosts it is not for, and where
/// `trust = "system"` finds the system's roots.
const PROXY_VARIABLES: [&str; 4] = ["https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"];
const NO_PROXY_VARIABLES: [&str; 2] = ["no_proxy", "NO_PROXY"];
const CERT_FILE_VARIABLE: &str = "SSL_CERT_FILE";
const CERT_DIR_VARIABLE: &str = "SSL_CERT_DIR";

/// Reads an environment variable (the process's, or a test's).
pub type Environment<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process's environment.
pub fn process_environment(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// No environment at all (the lab, whose platforms are on loopback: no egress proxy applies).
pub fn no_environment(_: &str) -> Option<String> {
    None
}

/// Reads and validates the config file at `path` in the process's environment. Relative file
/// paths in it are relative to the config file's directory.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    load_with_env(path, &process_environment)
}

/// [`load`] reading the environment through `env`.
pub fn load_with_env(path: &Path, env: Environment<'_>) -> Result<Config, ConfigError> {
    let text = crate::config_file::read(WHAT, path)?;
    let raw: RawConfig = crate::config_file::parse_toml(WHAT, &text, path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut v = Validator {
        path,
        base,
        env,
        problems: Problems::new(WHAT),
    };
    let config = v.config(raw);
    v.problems.finish(path, config)
}

/// The proxy config's checks: the shared problems collector, with paths relative to the file.
struct Validator<'a> {
    /// The config file itself.
    path: &'a Path,
    base: &'a Path,
    env: Environment<'a>,
    problems: Problems,
}

impl Validator<'_> {
    fn problem(&mut self, text: String) {
        self.problems.push_line(text);
    }

    fn path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.base.join(p)
        }
    }

    /// Refuses a duration longer than [`crate::units::MAX_CONFIG_DURATION`].
    fn at_most_a_year(&mut self, field: &str, d: Duration) {
        self.problems.at_most_a_year(field, d);
    }

    fn required<T>(&mut self, field: &str, value: Option<T>) -> Option<T> {
        self.problems.required(field, value)
    }

    /// Reads a file; `secret` files must not be readable by group or others.
    fn read(&mut self, field: &str, path: Option<PathBuf>, secret: bool) -> Option<String> {
        let path = self.required(field, path)?;
        let path = self.path(&path);
        if secret {
            self.problems.read_private(field, &path)
        } else {
            self.problems.read_file(field, &path)
        }
    }

    /// A private key field: a key file (relative to the config file, readable by its owner
    /// only, parsed by `parse`) or a `pkcs11:` URI (the token checked now).
    fn signer(
        &mut self,
        field: &str,
        value: Option<String>,
        parse: impl FnOnce(&str, &str) -> Result<RsaSigner, crate::crypto::CryptoError>,
    ) -> Option<Signer> {
        let text = self.required(field, value)?;
        let source = match KeySource::parse(&text) {
            Ok(KeySource::File(path)) => KeySource::File(self.path(&path)),
            Ok(source) => source,
            Err(e) => {
                self.problem(format!("{field}: the pkcs11: URI {e}"));
                return None;
            }
        };
        self.problems.signer(field, &source, self.path, parse)
    }

    fn read_optional(
        &mut self,
        field: &str,
        path: Option<PathBuf>,
        secret: bool,
    ) -> Option<Option<String>> {
        match path {
            None => Some(None),
            Some(p) => self.read(field, Some(p), secret).map(Some),
        }
    }

    fn addr(&mut self, field: &str, value: Option<String>, default: &str) -> Option<SocketAddr> {
        let text = value.unwrap_or_else(|| default.to_owned());
        match text.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.problem(format!(
                    "{field}: {text:?} is not an address like 0.0.0.0:8443"
                ));
                None
            }
        }
    }

    fn url(&mut self, field: &str, value: Option<String>, default: &str) -> Option<reqwest::Url> {
        let text = value.unwrap_or_else(|| default.to_owned());
        match reqwest::Url::parse(&text) {
            Ok(u) if u.scheme() == "https" || u.scheme() == "http" => Some(u),
            Ok(_) => {
                self.problem(format!("{field}: {text:?} must be an http(s) URL"));
                None
            }
            Err(e) => {
                self.problem(format!("{field}: {text:?} is not a URL: {e}"));
                None
            }
        }
    }

    fn config(&mut self, raw: RawConfig) -> Option<Config> {
        let listen = self.addr("listen", raw.listen, DEFAULT_LISTEN);
        let admin_listen = self.addr("admin_listen", raw.admin_listen, DEFAULT_ADMIN_LISTEN);
        let tls_cert_pem = self.read("tls_cert", raw.tls_cert, false);
        let tls_key_pem = self.read("tls_key", raw.tls_key, true);
        let tls = tls_cert_pem.zip(tls_key_pem).and_then(|(cert, key)| {
            crate::tls::server_config(&cert, &key, "tls_cert/tls_key")
                .map(Arc::new)
                .map_err(|e| self.problem(format!("tls_cert/tls_key: {e}")))
                .ok()
        });
        let registry = self
            .required("registry", raw.registry)
            .map(|p| self.path(&p));
        let state_dir = raw
            .state_dir
            .map_or_else(|| PathBuf::from(DEFAULT_STATE_DIR), |p| self.path(&p));
        let upstream_timeout = raw
            .upstream_timeout
            .map_or(DEFAULT_UPSTREAM_TIMEOUT, |d| d.0);
        if upstream_timeout.is_zero() {
            self.problem("upstream_timeout: must be more than zero".into());
        }
        self.at_most_a_year("upstream_timeout", upstream_timeout);
        let upstream = self.upstream(raw.upstream);
        let wechatpay = match raw.wechatpay {
            Some(w) => self.wechatpay(w),
            None => {
                self.problem("wechatpay: missing section [wechatpay]".into());
                None
            }
        };
        let fleet = self.fleet(raw.fleet);
        let limits = self.limits(raw.limits, &fleet);
        let alipay = match raw.alipay {
            Some(a) => self.alipay(a).map(Some),
            None => Some(None),
        };
        let aliyun = match raw.aliyun {
            Some(a) => self.aliyun(a).map(Some),
            None => Some(None),
        };
        let admin_token = self
            .read_optional("admin_token_file", raw.admin_token_file, true)
            .and_then(|text| match text.map(|t| AdminToken::new(&t)).transpose() {
                Ok(token) => Some(token),
                Err(e) => {
                    self.problem(format!("admin_token_file: {e}"));
                    None
                }
            });
        if let (Some(addr), Some(None)) = (admin_listen, &admin_token)
            && !addr.ip().is_loopback()
        {
            self.problem(format!(
                "admin_listen: {addr} is not loopback, so the admin listener (the fleet dashboard, /terminals, /metrics) needs admin_token_file"
            ));
        }
        let terminals = self.terminals(raw.terminals);
        let mchid = wechatpay
            .as_ref()
            .map_or("", |w| w.mchid.as_str())
            .to_owned();
        let cluster = match raw.cluster {
            Some(c) => self.cluster(c, &mchid).map(Some),
            None => Some(None),
        };
        Some(Config {
            listen: listen?,
            admin_listen: admin_listen?,
            tls: tls?,
            registry: registry?,
            state_dir,
            upstream_timeout,
            upstream: upstream?,
            wechatpay: wechatpay?,
            fleet,
            limits,
            alipay: alipay?,
            aliyun: aliyun?,
            admin_token: admin_token?,
            terminals: terminals?,
            cluster: cluster?,
        })
    }

    /// `[cluster]`: the URL (a password in it makes the config file a secret), the password
    /// file (mode 0600), the CA for `rediss://`, the key prefix (the merchant's by default), the
    /// lease and the timeout.
    fn cluster(&mut self, raw: RawCluster, mchid: &str) -> Option<super::cluster::ClusterConfig> {
        use super::cluster::{ClusterConfig, DEFAULT_LEASE, DEFAULT_TIMEOUT};
        let url = self.required("cluster.redis_url", raw.redis_url)?;
        if reqwest::Url::parse(&url).is_ok_and(|u| u.password().is_some())
            && let Err(e) = crate::config_file::check_private_file(self.path)
        {
            self.problem(format!(
                "cluster.redis_url: holds a password, so the config file is a secret: {e} (or move the password to cluster.password_file)"
            ));
        }
        let password = self
            .read_optional("cluster.password_file", raw.password_file, true)?
            .map(|p| p.trim().to_owned());
        if password.as_deref() == Some("") {
            self.problem("cluster.password_file: is empty".into());
        }
        let ca_pem = self.read_optional("cluster.ca_file", raw.ca_file, false)?;
        let prefix = raw
            .key_prefix
            .unwrap_or_else(|| format!("authinfo-proxy:{mchid}"));
        if prefix.is_empty() || prefix.chars().any(|c| c.is_whitespace() || c.is_control()) {
            self.problem(format!(
                "cluster.key_prefix: {prefix:?} must be non-empty, without spaces"
            ));
        }
        let lease = self
            .problems
            .positive("cluster.lease", raw.lease, DEFAULT_LEASE);
        if lease < Duration::from_secs(3) {
            self.problem(
                "cluster.lease: must be at least 3s (it is renewed every third of it)".into(),
            );
        }
        let timeout = self
            .problems
            .positive("cluster.timeout", raw.timeout, DEFAULT_TIMEOUT);
        if timeout >= lease {
            self.problem("cluster.timeout: must be shorter than cluster.lease".into());
        }
        match ClusterConfig::new(
            &url,
            raw.username.as_deref(),
            password.as_deref(),
            ca_pem,
            prefix,
            lease,
            timeout,
        ) {
            Ok(c) => Some(c),
            Err(e) => {
                self.problem(format!("cluster.redis_url: {e}"));
                None
            }
        }
    }

    /// `[terminals]`: the fleet view's thresholds.
    fn terminals(&mut self, raw: RawTerminals) -> Option<TerminalsConfig> {
        let d = Thresholds::default();
        let p = &mut self.problems;
        let t = Thresholds {
            authinfo_issued_within: p.positive(
                "terminals.authinfo_issued_within",
                raw.authinfo_issued_within,
                d.authinfo_issued_within,
            ),
            offline_after: p.positive(
                "terminals.offline_after",
                raw.offline_after,
                d.offline_after,
            ),
            runway_below: raw.runway_below.map_or(d.runway_below, |h| h.0),
            licence_warning_days: raw.licence_warning_days.unwrap_or(d.licence_warning_days),
            licence_critical_days: raw.licence_critical_days.unwrap_or(d.licence_critical_days),
            clock_skew_above: p.positive(
                "terminals.clock_skew_above",
                raw.clock_skew_above,
                d.clock_skew_above,
            ),
        };
        let mut ok = !t.authinfo_issued_within.is_zero()
            && !t.offline_after.is_zero()
            && !t.clock_skew_above.is_zero();
        if !(0..=3650).contains(&t.licence_critical_days) {
            self.problem("terminals.licence_critical_days: must be 0 to 3650".into());
            ok = false;
        }
        if !(t.licence_critical_days..=3650).contains(&t.licence_warning_days) {
            self.problem(
                "terminals.licence_warning_days: must be at least licence_critical_days and at most 3650"
                    .into(),
            );
            ok = false;
        }
        let report_burst = raw.report_burst.unwrap_or(super::terminals::REPORT_BURST);
        if report_burst == 0 {
            self.problem("terminals.report_burst: must be at least 1".into());
            ok = false;
        }
        let report_refill = self.problems.positive(
            "terminals.report_refill",
            raw.report_refill,
            super::terminals::REPORT_REFILL,
        );
        ok &= !report_refill.is_zero();
        ok.then_some(TerminalsConfig {
            thresholds: t,
            report_burst,
            report_refill,
        })
    }

    /// `[upstream]`: the egress proxy (configured, or from the environment) and the roots.
    fn upstream(&mut self, raw: RawUpstream) -> Option<Upstream> {
        let egress = match raw.http_proxy {
            // As git's http.proxy: an empty value means no proxy, whatever the environment says.
            Some(text) if text.is_empty() => Some(Egress::Direct),
            Some(text) => {
                let url = self.proxy_url("upstream.http_proxy", &text)?;
                if url.password().is_some()
                    && let Err(e) = crate::config_file::check_private_file(self.path)
                {
                    self.problem(format!(
                        "upstream.http_proxy: holds a password, so the config file is a secret: {e}"
                    ));
                }
                Some(Egress::Proxy {
                    url,
                    no_proxy: None,
                })
            }
            None => self.environment_proxy(),
        };
        let trust = match raw.trust.as_deref() {
            None | Some("webpki") => Some(Trust::Webpki),
            Some("system") => self
                .system_roots()
                .map(|roots| Trust::System(Arc::new(roots))),
            Some(other) => {
                self.problem(format!(
                    "upstream.trust: {other:?} must be \"webpki\" (the compiled-in Mozilla roots) or \"system\" (the operating system's store)"
                ));
                None
            }
        };
        Some(Upstream {
            egress: egress?,
            trust: trust?,
        })
    }

    /// The proxy the environment names (`https_proxy`, `HTTPS_PROXY`, `all_proxy`,
    /// `ALL_PROXY`, the first set), with `no_proxy`/`NO_PROXY`; direct when none is set.
    fn environment_proxy(&mut self) -> Option<Egress> {
        let env = self.env;
        let Some((name, value)) = PROXY_VARIABLES
            .iter()
            .find_map(|name| env(name).filter(|v| !v.is_empty()).map(|v| (*name, v)))
        else {
            return Some(Egress::Direct);
        };
        let url = self.proxy_url(&format!("{name} (environment)"), &value)?;
        let no_proxy = NO_PROXY_VARIABLES
            .iter()
            .find_map(|name| env(name).filter(|v| !v.trim().is_empty()));
        Some(Egress::Proxy { url, no_proxy })
    }

    /// An `http://[user:pass@]host:port` proxy URL.
    fn proxy_url(&mut self, field: &str, text: &str) -> Option<reqwest::Url> {
        let url = match reqwest::Url::parse(text) {
            Ok(url) => url,
            Err(e) => {
                self.problem(format!("{field}: not a URL like http://host:3128: {e}"));
                return None;
            }
        };
        // Never echo the text back: it may hold a password.
        let mut bad = Vec::new();
        if url.scheme() != "http" {
            bad.push("the scheme must be http (a CONNECT proxy)");
        }
        if url.host_str().is_none_or(str::is_empty) {
            bad.push("no host");
        }
        if url.port().is_none() {
            bad.push("give the port (http://host:3128)");
        }
        if !matches!(url.path(), "" | "/") || url.query().is_some() {
            bad.push("a proxy URL has no path or query");
        }
        if bad.is_empty() {
            Some(url)
        } else {
            self.problem(format!("{field}: {}", bad.join("; ")));
            None
        }
    }

    /// The operating system's roots: from `SSL_CERT_FILE` / `SSL_CERT_DIR` when set, else
    /// where OpenSSL keeps them on this system.
    fn system_roots(&mut self) -> Option<Vec<rustls::pki_types::CertificateDer<'static>>> {
        let file = (self.env)(CERT_FILE_VARIABLE).filter(|v| !v.is_empty());
        let dirs = (self.env)(CERT_DIR_VARIABLE).filter(|v| !v.is_empty());
        let (found, source) = if file.is_some() || dirs.is_some() {
            let mut found =
                rustls_native_certs::load_certs_from_paths(file.as_deref().map(Path::new), None);
            for dir in dirs
                .iter()
                .flat_map(|d| d.split(':'))
                .filter(|d| !d.is_empty())
            {
                let more = rustls_native_certs::load_certs_from_paths(None, Some(Path::new(dir)));
                found.certs.extend(more.certs);
                found.errors.extend(more.errors);
            }
            let source = [
                file.map(|f| format!("{CERT_FILE_VARIABLE}={f}")),
                dirs.map(|d| format!("{CERT_DIR_VARIABLE}={d}")),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(", ");
            (found, source)
        } else {
            (
                rustls_native_certs::load_native_certs(),
                "the system's certificate store".to_owned(),
            )
        };
        if found.certs.is_empty() {
            let errors: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
            self.problem(format!(
                "upstream.trust: \"system\", but no certificate was found in {source}{}: install ca-certificates, or set {CERT_FILE_VARIABLE}",
                if errors.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", errors.join("; "))
                }
            ));
            return None;
        }
        Some(found.certs)
    }

    fn wechatpay(&mut self, raw: RawWechatPay) -> Option<WechatPayConfig> {
        let base_url = self.url(
            "wechatpay.base_url",
            raw.base_url,
            crate::platform::wechatpay::DEFAULT_BASE_URL,
        );
        let mchid = self.required("wechatpay.mchid", raw.mchid);
        let sp_appid = self.required("wechatpay.sp_appid", raw.sp_appid);
        let merchant_key = self.signer("wechatpay.merchant_key", raw.merchant_key, |pem, _| {
            RsaSigner::from_pem(pem, "wechatpay.merchant_key")
        });
        let merchant_serial = self.merchant_serial(
            raw.merchant_serial,
            raw.merchant_certificate,
            merchant_key.as_ref(),
        );
        let mut platform_keys = PlatformKeys::new();
        match (raw.public_key_id, raw.public_key) {
            (Some(id), Some(path)) => {
                if !id.starts_with("PUB_KEY_ID_") {
                    self.problem(format!(
                        "wechatpay.public_key_id: {id:?} should start with PUB_KEY_ID_"
                    ));
                }
                if let Some(pem) = self.read("wechatpay.public_key", Some(path), false)
                    && let Err(e) =
                        platform_keys.add_public_key_pem(id, &pem, "wechatpay.public_key")
                {
                    self.problem(format!("wechatpay.public_key: {e}"));
                }
            }
            (None, None) => {}
            (Some(_), None) => self.problem(
                "wechatpay.public_key: missing (wechatpay.public_key_id is set; they go together)"
                    .into(),
            ),
            (None, Some(_)) => self.problem(
                "wechatpay.public_key_id: missing (wechatpay.public_key is set; they go together)"
                    .into(),
            ),
        }
        if let Some(path) = raw.platform_certificates
            && let Some(pem) = self.read("wechatpay.platform_certificates", Some(path), false)
            && let Err(e) =
                platform_keys.add_certificates_pem(&pem, "wechatpay.platform_certificates")
        {
            self.problem(format!("wechatpay.platform_certificates: {e}"));
        }
        let apiv3_key = self
            .read_optional("wechatpay.apiv3_key_file", raw.apiv3_key_file, true)
            .and_then(
                |text| match text.map(|t| ApiV3Key::from_text(&t)).transpose() {
                    Ok(key) => Some(key),
                    Err(e) => {
                        self.problem(format!("wechatpay.apiv3_key_file: {e}"));
                        None
                    }
                },
            );
        if platform_keys.is_empty() && matches!(apiv3_key, Some(None)) {
            self.problem(
                "wechatpay: no key to verify WeChat Pay's answers: set public_key_id + public_key, platform_certificates, or apiv3_key_file (to download the platform certificates)".into(),
            );
        }
        let ca_pem = self.read_optional("wechatpay.ca_file", raw.ca_file, false);
        Some(WechatPayConfig {
            base_url: base_url?,
            mchid: mchid?,
            sp_appid: sp_appid?,
            merchant_key: merchant_key?,
            merchant_serial: merchant_serial?,
            platform_keys,
            apiv3_key: apiv3_key?,
            ca_pem: ca_pem?,
        })
    }

    /// The merchant certificate's serial: `merchant_serial` as given, or read from
    /// `merchant_certificate` (`apiclient_cert.pem`), whose key must be `merchant_key`'s; both
    /// given must name the same serial.
    fn merchant_serial(
        &mut self,
        serial: Option<String>,
        certificate: Option<PathBuf>,
        merchant_key: Option<&Signer>,
    ) -> Option<String> {
        let Some(path) = certificate else {
            if serial.is_none() {
                self.problem(
                    "wechatpay.merchant_serial: missing (give it, or merchant_certificate to read it from)"
                        .into(),
                );
            }
            return serial;
        };
        let field = "wechatpay.merchant_certificate";
        let pem = self.read(field, Some(path), false)?;
        let info = crate::platform::wechatpay::verify::read_certificate_pem(&pem, field)
            .map_err(|e| self.problem(format!("{field}: {}", crate::error_chain(&e))))
            .ok()?;
        if let Some(key) = merchant_key
            && key.public_key().ok().as_ref() != Some(&info.key)
        {
            self.problem(format!(
                "{field}: certificate {} is not the certificate of wechatpay.merchant_key (another key)",
                info.serial
            ));
        }
        match serial {
            Some(given) if !given.eq_ignore_ascii_case(&info.serial) => {
                self.problem(format!(
                    "wechatpay.merchant_serial: {given:?} is not the serial of merchant_certificate ({})",
                    info.serial
                ));
                None
            }
            _ => Some(info.serial),
        }
    }

    fn fleet(&mut self, raw: RawFleet) -> FleetConfig {
        let per_second = raw
            .requests_per_second
            .unwrap_or(crate::platform::wechatpay::LIST_REQUESTS_PER_SECOND);
        if !(1..=crate::platform::wechatpay::LIST_REQUESTS_PER_SECOND).contains(&per_second) {
            self.problem(format!(
                "fleet.requests_per_second: {per_second} must be 1 to {} (WeChat Pay's limit)",
                crate::platform::wechatpay::LIST_REQUESTS_PER_SECOND
            ));
        }
        let per_day = raw
            .requests_per_day
            .unwrap_or(crate::platform::wechatpay::LIST_REQUESTS_PER_DAY);
        if !(1..=crate::platform::wechatpay::LIST_REQUESTS_PER_DAY).contains(&per_day) {
            self.problem(format!(
                "fleet.requests_per_day: {per_day} must be 1 to {} (WeChat Pay's limit)",
                crate::platform::wechatpay::LIST_REQUESTS_PER_DAY
            ));
        }
        let sync_interval = raw.sync_interval.map_or(DEFAULT_FLEET_INTERVAL, |d| d.0);
        if sync_interval < Duration::from_secs(60) {
            self.problem("fleet.sync_interval: must be at least 1m".into());
        }
        self.at_most_a_year("fleet.sync_interval", sync_interval);
        FleetConfig {
            enabled: raw.enabled.unwrap_or(true),
            sync_interval,
            requests_per_second: per_second,
            requests_per_day: per_day,
        }
    }

    /// `[limits]`: every bucket admits at least one request and refills; WeChat Pay's ceiling
    /// leaves the terminals something beyond the fleet sync's share.
    fn limits(&mut self, raw: RawLimits, fleet: &FleetConfig) -> LimitsConfig {
        use crate::proxy::limits as l;
        let mut bucket =
            |name: &str, burst: Option<u32>, every: Option<HumanDuration>, default: Bucket| {
                let bucket = Bucket {
                    burst: burst.unwrap_or(default.burst),
                    every: every.map_or(default.every, |d| d.0),
                };
                if bucket.burst == 0 {
                    self.problem(format!("limits.{name}_burst: must be at least 1"));
                }
                if bucket.every.is_zero() {
                    self.problem(format!("limits.{name}_every: must be more than zero"));
                }
                bucket
            };
        let defaults = LimitsConfig::default();
        let authinfo = bucket(
            "authinfo",
            raw.authinfo_burst,
            raw.authinfo_every,
            defaults.authinfo,
        );
        let health = bucket(
            "health",
            raw.health_burst,
            raw.health_every,
            defaults.health,
        );
        let mut per_second = |name: &str, value: Option<u32>, default: u32| {
            let n = value.unwrap_or(default);
            if n == 0 {
                self.problem(format!("limits.{name}: must be at least 1"));
            }
            n
        };
        let wechatpay_per_second = per_second(
            "wechatpay_per_second",
            raw.wechatpay_per_second,
            l::DEFAULT_WECHATPAY_PER_SECOND,
        );
        let alipay_per_second = per_second(
            "alipay_per_second",
            raw.alipay_per_second,
            l::DEFAULT_ALIPAY_PER_SECOND,
        );
        let aliyun_per_second = per_second(
            "aliyun_per_second",
            raw.aliyun_per_second,
            l::DEFAULT_ALIYUN_PER_SECOND,
        );
        if fleet.enabled && wechatpay_per_second <= fleet.requests_per_second {
            self.problem(format!(
                "limits.wechatpay_per_second: {wechatpay_per_second} must be more than fleet.requests_per_second ({}): the fleet sync's share is kept from it and terminals get the rest",
                fleet.requests_per_second
            ));
        }
        LimitsConfig {
            authinfo,
            health,
            wechatpay_per_second,
            alipay_per_second,
            aliyun_per_second,
        }
    }

    fn alipay(&mut self, raw: RawAlipay) -> Option<AlipayConfig> {
        let gateway = self
            .url(
                "alipay.gateway",
                raw.gateway,
                crate::platform::alipay::DEFAULT_GATEWAY,
            )
            .map(|u| u.to_string());
        let app_id = self.required("alipay.app_id", raw.app_id);
        let app_key = self.signer("alipay.app_private_key", raw.app_private_key, |text, _| {
            RsaSigner::from_pem_or_base64(text, "alipay.app_private_key")
        });
        let alipay_public = self
            .read("alipay.alipay_public_key", raw.alipay_public_key, false)
            .and_then(|text| {
                RsaVerifier::from_pem_or_base64(&text, "alipay.alipay_public_key")
                    .map_err(|e| self.problem(format!("alipay.alipay_public_key: {e}")))
                    .ok()
            });
        let app_auth_token = self
            .read_optional("alipay.app_auth_token_file", raw.app_auth_token_file, true)
            .map(|t| t.map(|t| t.trim().to_owned()));
        let ca_pem = self.read_optional("alipay.ca_file", raw.ca_file, false);
        Some(AlipayConfig {
            gateway: gateway?,
            app_id: app_id?,
            app_key: app_key?,
            alipay_public: alipay_public?,
            app_auth_token: app_auth_token?,
            ca_pem: ca_pem?,
        })
    }

    fn aliyun(&mut self, raw: RawAliyun) -> Option<AliyunConfig> {
        let endpoint = self
            .url(
                "aliyun.endpoint",
                raw.endpoint,
                crate::platform::aliyun::DEFAULT_ENDPOINT,
            )
            .map(|u| u.to_string());
        let access_key_id = self.required("aliyun.access_key_id", raw.access_key_id);
        let access_key_secret = self
            .read(
                "aliyun.access_key_secret_file",
                raw.access_key_secret_file,
                true,
            )
            .map(|s| s.trim().to_owned());
        let scheme = match raw.signature.as_deref() {
            None | Some("ACS3-HMAC-SHA256") => Some(SignatureScheme::Acs3HmacSha256),
            Some("HMAC-SHA1") => Some(SignatureScheme::RpcHmacSha1),
            Some(other) => {
                self.problem(format!(
                    "aliyun.signature: {other:?} must be ACS3-HMAC-SHA256 or HMAC-SHA1"
                ));
                None
            }
        };
        let ca_pem = self.read_optional("aliyun.ca_file", raw.ca_file, false);
        Some(AliyunConfig {
            endpoint: endpoint?,
            access_key_id: access_key_id?,
            access_key_secret: access_key_secret?,
            scheme: scheme?,
            ca_pem: ca_pem?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped example names only real fields, with every option uncommented.
    #[test]
    fn the_annotated_example_matches_the_config_schema() {
        let text = crate::terminal::config::tests::uncomment(include_str!(
            "../../examples/authinfo-proxy.toml"
        ));
        assert!(
            text.contains("\nplatform_certificates = "),
            "uncommenting works"
        );
        let raw: RawConfig =
            toml::from_str(&text).unwrap_or_else(|e| panic!("example does not parse: {e}"));
        let (Some(wechatpay), Some(alipay), Some(aliyun)) = (raw.wechatpay, raw.alipay, raw.aliyun)
        else {
            panic!("the example has [wechatpay], [alipay] and [aliyun]");
        };
        // Every field this issue added is documented there.
        assert!(raw.upstream.http_proxy.is_some() && raw.upstream.trust.is_some());
        let t = &raw.terminals;
        assert!(raw.admin_token_file.is_some() && t.authinfo_issued_within.is_some());
        assert!(t.offline_after.is_some() && t.runway_below.is_some());
        assert!(t.licence_warning_days.is_some() && t.licence_critical_days.is_some());
        assert!(t.clock_skew_above.is_some() && t.report_burst.is_some());
        assert!(t.report_refill.is_some());
        let c = raw.cluster.expect("the example has a commented [cluster]");
        assert!(c.redis_url.is_some() && c.username.is_some() && c.password_file.is_some());
        assert!(c.ca_file.is_some() && c.key_prefix.is_some());
        assert!(c.lease.is_some() && c.timeout.is_some());
        assert!(wechatpay.merchant_certificate.is_some() && wechatpay.apiv3_key_file.is_some());
        assert!(
            alipay.ca_file.is_some() && aliyun.ca_file.is_some() && wechatpay.ca_file.is_some()
        );
        let l = raw.limits;
        assert!(
            l.authinfo_burst.is_some()
                && l.authinfo_every.is_some()
                && l.health_burst.is_some()
                && l.health_every.is_some()
                && l.wechatpay_per_second.is_some()
                && l.alipay_per_second.is_some()
                && l.aliyun_per_second.is_some(),
            "every [limits] field is documented"
        );
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        crate::test_support::write_file(&path, text, 0o600);
        path
    }

    /// A merchant API certificate (`apiclient_cert.pem`) for test key `key` with `serial`.
    fn merchant_certificate(key: usize, serial: &[u8]) -> String {
        let pem = &crate::crypto::test_key(key).private_pem;
        let key = rcgen::KeyPair::from_pem(pem).expect("rsa key for rcgen");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.serial_number = Some(rcgen::SerialNumber::from_slice(serial));
        params.self_signed(&key).expect("certificate").pem()
    }

    fn validator(base: &Path) -> Validator<'_> {
        Validator {
            path: base,
            base,
            env: &no_environment,
            problems: Problems::new(WHAT),
        }
    }

    /// Every problem `v` collected.
    fn listed(v: Validator<'_>) -> Vec<String> {
        match v.problems.finish(Path::new("test.toml"), Some(())) {
            Ok(()) => Vec::new(),
            Err(e) => e.problems().to_vec(),
        }
    }

    fn merchant_key() -> Signer {
        RsaSigner::from_pem(&crate::crypto::test_key(0).private_pem, "k")
            .expect("key")
            .into()
    }

    /// `[limits]`: absent, the documented defaults; zero bursts, refills and ceilings, and a
    /// WeChat Pay ceiling that leaves terminals nothing beyond the fleet sync, are all listed.
    #[test]
    fn limits_default_as_documented_and_refuse_what_admits_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fleet = |v: &mut Validator<'_>| v.fleet(RawFleet::default());
        let mut v = validator(dir.path());
        let f = fleet(&mut v);
        assert_eq!(v.limits(RawLimits::default(), &f), LimitsConfig::default());
        assert!(v.problems.is_empty());
        let raw: RawLimits = toml::from_str(
            "authinfo_burst = 0\nhealth_every = \"0s\"\nwechatpay_per_second = 20\naliyun_per_second = 0",
        )
        .expect("toml");
        let mut v = validator(dir.path());
        let f = fleet(&mut v);
        let _ = v.limits(raw, &f);
        assert_eq!(
            listed(v),
            [
                "limits.authinfo_burst: must be at least 1",
                "limits.health_every: must be more than zero",
                "limits.aliyun_per_second: must be at least 1",
                "limits.wechatpay_per_second: 20 must be more than fleet.requests_per_second (20): the fleet sync's share is kept from it and terminals get the rest",
            ]
        );
    }

    const SERIAL: [u8; 20] = [
        0x51, 0x57, 0xF0, 0x9E, 0xFD, 0xC0, 0x96, 0xDE, 0x15, 0xEB, 0xE8, 0x1A, 0x47, 0x05, 0x7A,
        0x72, 0x32, 0xF1, 0xB8, 0xE1,
    ];

    #[test]
    fn merchant_serial_is_read_from_the_merchant_certificate_and_must_agree() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = write(
            dir.path(),
            "apiclient_cert.pem",
            &merchant_certificate(0, &SERIAL),
        );
        let mut v = validator(dir.path());
        let key = merchant_key();
        let want = "5157F09EFDC096DE15EBE81A47057A7232F1B8E1";
        assert_eq!(
            v.merchant_serial(None, Some(cert.clone()), Some(&key))
                .as_deref(),
            Some(want)
        );
        // Both given and agreeing (in any case): fine.
        assert_eq!(
            v.merchant_serial(Some(want.to_lowercase()), Some(cert.clone()), Some(&key))
                .as_deref(),
            Some(want)
        );
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        // Both given and disagreeing: named, with both serials.
        assert_eq!(
            v.merchant_serial(Some("0123456789ABCDEF".into()), Some(cert), Some(&key)),
            None
        );
        let problems = listed(v);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("wechatpay.merchant_serial:")
                && problems[0].contains("0123456789ABCDEF")
                && problems[0].contains(want),
            "{problems:?}"
        );
    }

    #[test]
    fn merchant_certificate_of_another_key_or_neither_field_is_a_problem() {
        let dir = tempfile::tempdir().expect("tempdir");
        let other = write(
            dir.path(),
            "other_cert.pem",
            &merchant_certificate(1, &SERIAL),
        );
        let not_a_cert = write(
            dir.path(),
            "key.pem",
            &crate::crypto::test_key(0).public.to_pem(),
        );
        let mut v = validator(dir.path());
        let key = merchant_key();
        v.merchant_serial(None, Some(other), Some(&key));
        v.merchant_serial(None, Some(not_a_cert), Some(&key));
        v.merchant_serial(None, None, Some(&key));
        let problems = listed(v);
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].contains("is not the certificate of wechatpay.merchant_key"));
        assert!(problems[1].starts_with("wechatpay.merchant_certificate:"));
        assert!(problems[1].contains("no CERTIFICATE block"), "{problems:?}");
        assert!(problems[2].starts_with("wechatpay.merchant_serial: missing"));
    }

    /// The Alipay console's bare base64 keys (PKCS#1 private, SPKI public) load as they are.
    #[test]
    fn alipay_keys_load_as_bare_base64() {
        use crate::crypto::BASE64;
        use base64::Engine as _;
        use rsa::pkcs1::EncodeRsaPrivateKey as _;
        use rsa::pkcs8::DecodePrivateKey as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let pkcs1 = rsa::RsaPrivateKey::from_pkcs8_pem(&crate::crypto::test_key(0).private_pem)
            .expect("pkcs8")
            .to_pkcs1_der()
            .expect("pkcs1");
        let public_der = {
            use rustls_pki_types::pem::PemObject as _;
            rustls_pki_types::SubjectPublicKeyInfoDer::from_pem_slice(
                crate::crypto::test_key(1).public.to_pem().as_bytes(),
            )
            .expect("pem")
            .as_ref()
            .to_vec()
        };
        let private = write(
            dir.path(),
            "app_private_key.txt",
            &BASE64.encode(pkcs1.as_bytes()),
        );
        let public = write(
            dir.path(),
            "alipay_public_key.txt",
            &(BASE64.encode(public_der) + "\n"),
        );
        let mut v = validator(dir.path());
        let alipay = v
            .alipay(RawAlipay {
                gateway: None,
                app_id: Some("2021000000000001".into()),
                app_private_key: Some(private.display().to_string()),
                alipay_public_key: Some(public),
                app_auth_token_file: None,
                ca_file: None,
            })
            .unwrap_or_else(|| panic!("{:?}", v.problems));
        assert_eq!(
            alipay.app_key.public_key().expect("public"),
            crate::crypto::test_key(0).public
        );
        assert_eq!(alipay.alipay_public, crate::crypto::test_key(1).public);
    }

    fn upstream_in(
        dir: &Path,
        raw: RawUpstream,
        env: &[(&str, &str)],
    ) -> (Option<Upstream>, Vec<String>) {
        let lookup = |name: &str| {
            env.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        };
        let config = dir.join("authinfo-proxy.toml");
        let mut v = Validator {
            path: &config,
            base: dir,
            env: &lookup,
            problems: Problems::new(WHAT),
        };
        let upstream = v.upstream(raw);
        (upstream, listed(v))
    }

    fn raw_upstream(http_proxy: Option<&str>, trust: Option<&str>) -> RawUpstream {
        RawUpstream {
            http_proxy: http_proxy.map(str::to_owned),
            trust: trust.map(str::to_owned),
        }
    }

    fn proxy_of(upstream: Option<Upstream>) -> (String, Option<String>) {
        match upstream.map(|u| u.egress) {
            Some(Egress::Proxy { url, no_proxy }) => (url.to_string(), no_proxy),
            other => panic!("not a proxy: {other:?}"),
        }
    }

    /// Without `http_proxy` the environment's proxy is used (lower case first, as curl), with
    /// its `NO_PROXY`; `http_proxy = ""` is no proxy whatever the environment; a configured
    /// proxy applies to every call (the environment's `NO_PROXY` is not read then).
    #[test]
    fn http_proxy_comes_from_the_config_or_the_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let env = [
            ("HTTPS_PROXY", "http://upper:3128"),
            ("https_proxy", "http://lower:3128"),
            ("ALL_PROXY", "http://all:3128"),
            ("NO_PROXY", "localhost,10.0.0.0/8"),
        ];
        let (upstream, problems) = upstream_in(dir.path(), raw_upstream(None, None), &env);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            proxy_of(upstream),
            (
                "http://lower:3128/".to_owned(),
                Some("localhost,10.0.0.0/8".to_owned())
            )
        );
        let (upstream, _) = upstream_in(dir.path(), raw_upstream(None, None), &env[2..]);
        assert_eq!(proxy_of(upstream).0, "http://all:3128/");
        let (upstream, _) = upstream_in(dir.path(), raw_upstream(Some(""), None), &env);
        assert_eq!(upstream.map(|u| u.egress), Some(Egress::Direct));
        let (upstream, _) = upstream_in(dir.path(), raw_upstream(None, None), &[]);
        assert_eq!(upstream.map(|u| u.egress), Some(Egress::Direct));
        let (upstream, problems) = upstream_in(
            dir.path(),
            raw_upstream(Some("http://squid.internal:3128"), None),
            &env,
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            proxy_of(upstream),
            ("http://squid.internal:3128/".to_owned(), None)
        );
    }

    #[test]
    fn bad_proxy_urls_are_named_without_echoing_a_password() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (text, want) in [
            ("https://u:hunter2@proxy:3128", "the scheme must be http"),
            ("http://u:hunter2@proxy", "give the port"),
            ("http://proxy:3128/path", "no path or query"),
            ("socks5://u:hunter2@proxy:1080", "the scheme must be http"),
            ("proxy:3128", "the scheme must be http"),
            ("not a url", "not a URL"),
        ] {
            let (upstream, problems) = upstream_in(dir.path(), raw_upstream(Some(text), None), &[]);
            assert!(upstream.is_none(), "{text}");
            assert_eq!(problems.len(), 1, "{text}: {problems:?}");
            assert!(
                problems[0].starts_with("upstream.http_proxy: ") && problems[0].contains(want),
                "{text}: {problems:?}"
            );
            assert!(!problems[0].contains("hunter2"), "{problems:?}");
        }
        let (_, problems) = upstream_in(
            dir.path(),
            raw_upstream(None, None),
            &[("HTTPS_PROXY", "proxy.internal")],
        );
        assert!(
            problems[0].starts_with("HTTPS_PROXY (environment): "),
            "{problems:?}"
        );
    }

    /// A password in `http_proxy` makes the config file a secret: refused readable by others.
    #[test]
    fn a_proxy_password_needs_a_private_config_file() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("authinfo-proxy.toml");
        crate::test_support::write_file(&config, "", 0o644);
        let with_password = raw_upstream(Some("http://u:hunter2@proxy:3128"), None);
        let (_, problems) = upstream_in(dir.path(), with_password, &[]);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("holds a password") && problems[0].contains("chmod 600"),
            "{problems:?}"
        );
        let (_, problems) = upstream_in(
            dir.path(),
            raw_upstream(Some("http://u@proxy:3128"), None),
            &[],
        );
        assert!(
            problems.is_empty(),
            "a user alone is no secret: {problems:?}"
        );
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let with_password = raw_upstream(Some("http://u:hunter2@proxy:3128"), None);
        let (_, problems) = upstream_in(dir.path(), with_password, &[]);
        assert!(problems.is_empty(), "{problems:?}");
    }

    /// `trust = "system"` reads the store `SSL_CERT_FILE` names; an empty store or an unknown
    /// value is a problem.
    #[test]
    fn system_trust_loads_the_named_store_and_refuses_an_empty_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = crate::tls::generate_pki("system store test ca", &["localhost"]).expect("pki");
        let store = dir.path().join("ca-bundle.crt");
        std::fs::write(&store, format!("{}{}", pki.ca_pem, pki.cert_pem)).expect("write");
        let store_text = store.display().to_string();
        let (upstream, problems) = upstream_in(
            dir.path(),
            raw_upstream(None, Some("system")),
            &[("SSL_CERT_FILE", &store_text)],
        );
        assert!(problems.is_empty(), "{problems:?}");
        match upstream.map(|u| u.trust) {
            Some(Trust::System(roots)) => assert_eq!(roots.len(), 2),
            other => panic!("{other:?}"),
        }
        let empty = dir.path().join("empty.crt");
        std::fs::write(&empty, "").expect("write");
        let empty_text = empty.display().to_string();
        let (upstream, problems) = upstream_in(
            dir.path(),
            raw_upstream(None, Some("system")),
            &[("SSL_CERT_FILE", &empty_text)],
        );
        assert!(upstream.is_none());
        assert!(
            problems[0].starts_with(
                "upstream.trust: \"system\", but no certificate was found in SSL_CERT_FILE="
            ),
            "{problems:?}"
        );
        let (_, problems) = upstream_in(dir.path(), raw_upstream(None, Some("mozilla")), &[]);
        assert!(problems[0].contains("\"webpki\""), "{problems:?}");
        let (upstream, _) = upstream_in(dir.path(), raw_upstream(None, None), &[]);
        assert_eq!(upstream.map(|u| u.trust), Some(Trust::Webpki));
    }

    /// Found by the `proxy_config` fuzz target: a public key without its id was reported as
    /// "wechatpay.public_key_id and wechatpay.public_key go together", a problem that named no
    /// field in the `field: reason` form every other problem has. The other problems stay
    /// listed beside it.
    #[test]
    fn a_public_key_without_its_id_names_the_missing_field() {
        let (_dir, path) = crate::test_support::temp_path("authinfo-proxy.toml");
        for (wechatpay, missing) in [
            (
                "public_key = \"pub.pem\"",
                "wechatpay.public_key_id: missing",
            ),
            (
                "public_key_id = \"PUB_KEY_ID_1\"",
                "wechatpay.public_key: missing",
            ),
        ] {
            std::fs::write(&path, format!("[wechatpay]\n{wechatpay}\n")).expect("write");
            let err = load(&path).unwrap_err();
            let ConfigError::Invalid { problems, .. } = &err else {
                panic!("expected Invalid, got {err}");
            };
            assert!(
                problems.iter().any(|p| p.starts_with(missing)),
                "{problems:#?}"
            );
            assert!(
                problems.iter().all(|p| p.split_once(": ").is_some()),
                "{problems:#?}"
            );
            assert!(problems.iter().any(|p| p.starts_with("wechatpay.mchid: ")));
        }
    }

    #[test]
    fn key_files_readable_by_others_are_refused_by_name() {
        use std::os::unix::fs::PermissionsExt as _;
        let (_dir, path) = crate::test_support::temp_path("apiclient_key.pem");
        crate::test_support::write_file(&path, "x", 0o640);
        let err = crate::config_file::check_private_file(&path)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("apiclient_key.pem") && err.contains("640"),
            "{err}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(crate::config_file::check_private_file(&path).is_ok());
    }
}
