//! The proxy's configuration file (TOML): raw shape, defaults, and validation into typed values,
//! keys loaded and checked, before anything listens.
//!
//! Owns: every default and check, including the rule that a private key or secret file readable
//! by group or others refuses to start (the file is named). Validation collects every problem.
//! It must not open sockets or call the platforms.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::crypto::{RsaSigner, RsaVerifier};
use crate::platform::aliyun::SignatureScheme;
use crate::platform::wechatpay::PlatformKeys;
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
    wechatpay: Option<RawWechatPay>,
    #[serde(default)]
    fleet: RawFleet,
    alipay: Option<RawAlipay>,
    aliyun: Option<RawAliyun>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWechatPay {
    base_url: Option<String>,
    mchid: Option<String>,
    sp_appid: Option<String>,
    merchant_key: Option<PathBuf>,
    merchant_serial: Option<String>,
    public_key_id: Option<String>,
    public_key: Option<PathBuf>,
    platform_certificates: Option<PathBuf>,
    ca_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFleet {
    enabled: Option<bool>,
    sync_interval: Option<HumanDuration>,
    requests_per_second: Option<u32>,
    requests_per_day: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlipay {
    gateway: Option<String>,
    app_id: Option<String>,
    app_private_key: Option<PathBuf>,
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
    pub merchant_key: RsaSigner,
    pub merchant_serial: String,
    pub platform_keys: PlatformKeys,
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
    pub app_key: RsaSigner,
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
    pub tls_cert_pem: String,
    pub tls_key_pem: String,
    pub registry: PathBuf,
    pub state_dir: PathBuf,
    pub upstream_timeout: Duration,
    pub wechatpay: WechatPayConfig,
    pub fleet: FleetConfig,
    pub alipay: Option<AlipayConfig>,
    pub aliyun: Option<AliyunConfig>,
}

/// Why a config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML for authinfo-proxy: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path} has {} invalid field(s):\n  - {}", problems.len(), problems.join("\n  - "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

/// Reads and validates the config file at `path`. Relative file paths in it are relative to
/// the config file's directory.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let raw: RawConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut v = Validator {
        base,
        problems: Vec::new(),
    };
    let config = v.config(raw);
    match config {
        Some(c) if v.problems.is_empty() => Ok(c),
        _ => Err(ConfigError::Invalid {
            path: path.to_owned(),
            problems: v.problems,
        }),
    }
}

struct Validator<'a> {
    base: &'a Path,
    problems: Vec<String>,
}

impl Validator<'_> {
    fn problem(&mut self, text: String) {
        self.problems.push(text);
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
        if d > crate::units::MAX_CONFIG_DURATION {
            self.problem(format!(
                "{field}: {} is longer than {}",
                crate::units::format_duration(d),
                crate::units::format_duration(crate::units::MAX_CONFIG_DURATION)
            ));
        }
    }

    fn required<T>(&mut self, field: &str, value: Option<T>) -> Option<T> {
        if value.is_none() {
            self.problem(format!("{field}: missing"));
        }
        value
    }

    /// Reads a file; `secret` files must not be readable by group or others.
    fn read(&mut self, field: &str, path: Option<PathBuf>, secret: bool) -> Option<String> {
        let path = self.required(field, path)?;
        let path = self.path(&path);
        if secret && let Err(e) = check_private(&path) {
            self.problem(format!("{field}: {e}"));
            return None;
        }
        match std::fs::read_to_string(&path) {
            Ok(text) => Some(text),
            Err(e) => {
                self.problem(format!("{field}: cannot read {}: {e}", path.display()));
                None
            }
        }
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
        if let (Some(cert), Some(key)) = (&tls_cert_pem, &tls_key_pem)
            && let Err(e) = crate::tls::server_config(cert, key, "tls_cert/tls_key")
        {
            self.problem(format!("tls_cert/tls_key: {e}"));
        }
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
        let wechatpay = match raw.wechatpay {
            Some(w) => self.wechatpay(w),
            None => {
                self.problem("wechatpay: missing section [wechatpay]".into());
                None
            }
        };
        let fleet = self.fleet(raw.fleet);
        let alipay = match raw.alipay {
            Some(a) => self.alipay(a).map(Some),
            None => Some(None),
        };
        let aliyun = match raw.aliyun {
            Some(a) => self.aliyun(a).map(Some),
            None => Some(None),
        };
        Some(Config {
            listen: listen?,
            admin_listen: admin_listen?,
            tls_cert_pem: tls_cert_pem?,
            tls_key_pem: tls_key_pem?,
            registry: registry?,
            state_dir,
            upstream_timeout,
            wechatpay: wechatpay?,
            fleet,
            alipay: alipay?,
            aliyun: aliyun?,
        })
    }

    fn wechatpay(&mut self, raw: RawWechatPay) -> Option<WechatPayConfig> {
        let base_url = self.url(
            "wechatpay.base_url",
            raw.base_url,
            crate::platform::wechatpay::DEFAULT_BASE_URL,
        );
        let mchid = self.required("wechatpay.mchid", raw.mchid);
        let sp_appid = self.required("wechatpay.sp_appid", raw.sp_appid);
        let merchant_serial = self.required("wechatpay.merchant_serial", raw.merchant_serial);
        let merchant_key = self
            .read("wechatpay.merchant_key", raw.merchant_key, true)
            .and_then(|pem| {
                RsaSigner::from_pem(&pem, "wechatpay.merchant_key")
                    .map_err(|e| self.problem(format!("wechatpay.merchant_key: {e}")))
                    .ok()
            });
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
        if platform_keys.is_empty() {
            self.problem(
                "wechatpay: no key to verify WeChat Pay's answers: set public_key_id + public_key, or platform_certificates".into(),
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
            ca_pem: ca_pem?,
        })
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

    fn alipay(&mut self, raw: RawAlipay) -> Option<AlipayConfig> {
        let gateway = self
            .url(
                "alipay.gateway",
                raw.gateway,
                crate::platform::alipay::DEFAULT_GATEWAY,
            )
            .map(|u| u.to_string());
        let app_id = self.required("alipay.app_id", raw.app_id);
        let app_key = self
            .read("alipay.app_private_key", raw.app_private_key, true)
            .and_then(|pem| {
                RsaSigner::from_pem(&pem, "alipay.app_private_key")
                    .map_err(|e| self.problem(format!("alipay.app_private_key: {e}")))
                    .ok()
            });
        let alipay_public = self
            .read("alipay.alipay_public_key", raw.alipay_public_key, false)
            .and_then(|pem| {
                RsaVerifier::from_pem(&pem, "alipay.alipay_public_key")
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

/// Refuses a key or secret file that group or others can read.
pub fn check_private(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt as _;
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} is readable by group or others (mode {mode:o}); run chmod 600 on it",
            path.display()
        ));
    }
    Ok(())
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
        assert!(raw.alipay.is_some() && raw.aliyun.is_some() && raw.wechatpay.is_some());
    }

    /// Found by the `proxy_config` fuzz target: a public key without its id was reported as
    /// "wechatpay.public_key_id and wechatpay.public_key go together", a problem that named no
    /// field in the `field: reason` form every other problem has. The other problems stay
    /// listed beside it.
    #[test]
    fn a_public_key_without_its_id_names_the_missing_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("authinfo-proxy.toml");
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
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("apiclient_key.pem");
        std::fs::write(&path, "x").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let err = check_private(&path).unwrap_err();
        assert!(
            err.contains("apiclient_key.pem") && err.contains("640"),
            "{err}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(check_private(&path).is_ok());
    }
}
