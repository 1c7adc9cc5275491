//! A complete local setup of the whole chain, made on the fly: sandbox platforms with their keys,
//! the merchant's key files, a proxy config and registry, a device key and a daemon config. The
//! demo, the integration tests and `authinfo-proxy sandbox` use it.
//!
//! Owns: generating every key and certificate (nothing is ever committed) and writing the config
//! files exactly as an operator would, so they are loaded through the real config parsers. It
//! must not bypass those parsers: what it writes is also documentation of a working setup.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::simulated::{self, MAX_SIMULATED_TERMINALS, SimulatedTerminal};

use crate::crypto::{self, CryptoError, GeneratedKey};
use crate::platform::alipay::DeviceBinding;
use crate::platform::aliyun::DeviceInfo;
use crate::platform::wechatpay::{Device, DeviceInspection};
use crate::sandbox::{self, RunningSandbox, SandboxKeys, SandboxState, World, netcut::NetCut};
use crate::tls::{GeneratedPki, generate_pki};

/// The demo terminal's id and WeChat Pay serial.
pub const DEVICE_ID: &str = "T-1001";
pub const DEVICE_SN: &str = "SANDBOX0000001001";
/// Its Alipay `biz_tid` and Cloudauth device id.
pub const BIZ_TID: &str = "01017sandboxbiztid1001";
pub const CLOUDAUTH_DEVICE_ID: &str = "wd.sandbox-1001";

/// A name the sandbox's certificate also holds that never resolves (`.invalid`, RFC 2606): a lab
/// whose platforms are named so ([`LabOptions::host`]) reaches them only through an egress
/// proxy that knows the name, which proves every call went through it.
pub const SANDBOX_ALIAS_HOST: &str = "platforms.sandbox.invalid";

/// The proxy's `upstream_timeout` in the lab. Generous on purpose: the lab also runs under qemu
/// on a loaded machine (10-20x slower RSA and TLS), and a test that checks a fault other than a
/// timeout must never see a timeout instead. Tests of timeouts use a server that never answers.
pub const LAB_UPSTREAM_TIMEOUT: &str = "30s";
/// The daemon's `[proxy] timeout` in the lab: above the proxy's own upstream timeout, so the
/// daemon hears the proxy's typed answer about a slow platform rather than timing out first.
pub const LAB_PROXY_TIMEOUT: &str = "60s";

/// Why the lab could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("key generation failed")]
    Crypto(#[from] CryptoError),
    #[error("certificate generation failed: {0}")]
    Certificate(String),
    #[error("cannot listen")]
    Listen(#[source] std::io::Error),
    #[error(transparent)]
    ProxyConfig(#[from] crate::proxy::config::ConfigError),
    #[error(transparent)]
    Proxy(#[from] crate::proxy::ProxyError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("{asked} simulated terminals asked for; at most {max}")]
    TooManyTerminals { asked: usize, max: usize },
    #[error("the key generation task failed")]
    KeyTask(#[source] tokio::task::JoinError),
}

/// A device as WeChat Pay's fleet list has it in the lab: a canteen terminal of the lab's
/// merchant, `status` (`ACTIVATED`, `INACTIVATED`).
fn listed(sn: String, status: &str) -> Device {
    Device {
        device_sn: Some(sn),
        device_category: Some("团餐设备".into()),
        device_category_code: Some("8".into()),
        device_class: Some("团餐机".into()),
        device_class_code: Some("107".into()),
        device_model: Some("FP-200".into()),
        app_scene: Some("离线模式".into()),
        app_scene_code: Some("3".into()),
        operating_system: Some("LINUX".into()),
        activation_status: Some(status.into()),
        mchid: Some("1900000001".into()),
        sub_mchid: Some("1900000002".into()),
        ..Device::default()
    }
}

/// What the simulated platforms know in the lab: the demo device, activated, with a passing
/// inspection, an Alipay binding and a licence `licence_days` from expiry, among `extra_devices`
/// other devices of the merchant.
pub fn world(extra_devices: usize, licence_days: i64) -> World {
    let today = time::OffsetDateTime::now_utc().date();
    let day = |d: time::Date| crate::platform::aliyun::format_day(d).replace('-', "");
    let mut devices = vec![listed(DEVICE_SN.into(), "ACTIVATED")];
    devices.extend((0..extra_devices).map(|i| {
        listed(
            format!("SANDBOX{:010}", 2000 + i),
            if i % 10 == 9 {
                "INACTIVATED"
            } else {
                "ACTIVATED"
            },
        )
    }));
    World {
        wechat_devices: devices,
        inspections: [(
            DEVICE_SN.to_owned(),
            DeviceInspection {
                device_sn: DEVICE_SN.into(),
                wired_mac: "00:16:3e:00:10:01".into(),
                wireless_mac: "00:16:3e:00:10:02".into(),
                bluetooth_mac: "00:16:3e:00:10:03".into(),
                app_version: "1.26.100".into(),
                camera_sn: "CAM-1001".into(),
                imei: "860000000001001".into(),
                result: "SUCCESS".into(),
                errors: Vec::new(),
                warnings: Vec::new(),
                inspect_time: "2026-01-05T09:30:00+08:00".into(),
            },
        )]
        .into(),
        rejected_raw_data: vec!["REJECTED-RAW-DATA".into()],
        alipay_bindings: [(
            BIZ_TID.to_owned(),
            DeviceBinding {
                merchant_type: "indirect".into(),
                pid: "2088101112139885".into(),
                shop_id: "2020081700502012300038796029".into(),
                smid: Some("2088101112139886".into()),
            },
        )]
        .into(),
        licences: vec![DeviceInfo {
            device_id: CLOUDAUTH_DEVICE_ID.into(),
            user_device_id: Some(DEVICE_ID.into()),
            biz_type: Some("FACE_PAY".into()),
            begin_day: day(today - time::Duration::days(365)),
            expired_day: day(today + time::Duration::days(licence_days)),
        }],
        ..World::default()
    }
}

fn write(path: &Path, text: &str, mode: u32) -> Result<(), LabError> {
    let err = |source| LabError::Write {
        path: path.to_owned(),
        source,
    };
    std::fs::write(path, text).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)
}

/// The RSA keys of a lab: the sandbox's four and the device's. Generating them is the slow part
/// of a lab; tests make one set and share it across their labs.
#[derive(Debug, Clone)]
pub struct LabKeys {
    pub wechat_merchant: GeneratedKey,
    pub wechat_platform: GeneratedKey,
    pub alipay_app: GeneratedKey,
    pub alipay_platform: GeneratedKey,
    pub device: GeneratedKey,
}

impl LabKeys {
    /// Five fresh RSA-2048 keys.
    pub fn generate() -> Result<Self, CryptoError> {
        let key = || crypto::generate_rsa_key(2048);
        Ok(Self {
            wechat_merchant: key()?,
            wechat_platform: key()?,
            alipay_app: key()?,
            alipay_platform: key()?,
            device: key()?,
        })
    }
}

/// What [`generate_keys`] returns: what the sandbox and the registry need. The private halves
/// the merchant and the device use are only in files.
pub struct GeneratedLab {
    pub sandbox_keys: SandboxKeys,
    pub sandbox_pki: GeneratedPki,
    pub device_public: crypto::RsaVerifier,
    pub aliyun_access_key_id: String,
    /// The CA of the proxy's certificate (also `proxy-ca.pem`): what its clients pin.
    pub proxy_ca_pem: String,
}

impl std::fmt::Debug for GeneratedLab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeneratedLab").finish_non_exhaustive()
    }
}

/// Generates every key and certificate and writes the merchant's and the device's files under
/// `dir`: the proxy's TLS pair and CA, the sandbox's CA, the WeChat Pay merchant key and platform
/// public key, the Alipay app key and Alipay public key, the Alibaba Cloud secret and the device
/// key. Private files are 0600.
pub fn generate_keys(dir: &Path) -> Result<GeneratedLab, LabError> {
    write_keys(dir, &LabKeys::generate()?)
}

/// [`generate_keys`] with given RSA keys (fresh certificates, serials and AccessKey still).
pub fn write_keys(dir: &Path, keys: &LabKeys) -> Result<GeneratedLab, LabError> {
    write_keys_for(dir, keys, None)
}

/// [`write_keys`], with the proxy's certificate also naming `proxy_host` (beside `127.0.0.1`
/// and `localhost`): for a proxy that terminals reach at another address.
pub fn write_keys_for(
    dir: &Path,
    keys: &LabKeys,
    proxy_host: Option<&str>,
) -> Result<GeneratedLab, LabError> {
    std::fs::create_dir_all(dir).map_err(|source| LabError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let (sandbox_keys, secrets) = SandboxKeys::from_rsa_keys(
        &keys.wechat_merchant,
        &keys.wechat_platform,
        &keys.alipay_app,
        &keys.alipay_platform,
    )?;
    let cert = |name: &str, extra: Option<&str>| {
        let mut hosts = vec!["127.0.0.1", "localhost", SANDBOX_ALIAS_HOST];
        hosts.extend(extra.filter(|h| !hosts.contains(h)));
        generate_pki(name, &hosts).map_err(|e| LabError::Certificate(e.to_string()))
    };
    let sandbox_pki = cert("authinfod sandbox platforms CA (generated)", None)?;
    let proxy_pki = cert("authinfod lab proxy CA (generated)", proxy_host)?;
    let device = &keys.device;
    let files: [(&str, &str, u32); 12] = [
        ("proxy-tls.crt", &proxy_pki.cert_pem, 0o644),
        ("proxy-tls.key", &proxy_pki.key_pem, 0o600),
        ("proxy-ca.pem", &proxy_pki.ca_pem, 0o644),
        ("sandbox-ca.pem", &sandbox_pki.ca_pem, 0o644),
        (
            "wechatpay-merchant.key",
            &secrets.wechat_merchant_private_pem,
            0o600,
        ),
        (
            "wechatpay-merchant-cert.pem",
            &secrets.wechat_merchant_certificate_pem,
            0o644,
        ),
        (
            "wechatpay-public.pem",
            &secrets.wechat_platform_public.to_pem(),
            0o644,
        ),
        ("wechatpay-apiv3.key", &secrets.wechat_apiv3_key, 0o600),
        ("alipay-app.key", &secrets.alipay_app_private_pem, 0o600),
        (
            "alipay-public.pem",
            &secrets.alipay_platform_public.to_pem(),
            0o644,
        ),
        ("aliyun-secret", &secrets.aliyun_access_key_secret, 0o600),
        ("device.key", &device.private_pem, 0o600),
    ];
    for (name, text, mode) in files {
        write(&dir.join(name), text, mode)?;
    }
    Ok(GeneratedLab {
        sandbox_keys,
        sandbox_pki,
        device_public: device.public.clone(),
        aliyun_access_key_id: secrets.aliyun_access_key_id,
        proxy_ca_pem: proxy_pki.ca_pem,
    })
}

/// The config files of a lab directory.
#[derive(Debug, Clone)]
pub struct LabFiles {
    pub dir: PathBuf,
}

impl LabFiles {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Writes the registry (`devices.toml`) enrolling the demo device with `device_public`.
    pub fn write_registry(&self, device_public: &crypto::RsaVerifier) -> Result<PathBuf, LabError> {
        self.write_registry_with(device_public, &[])
    }

    /// [`write_registry`](Self::write_registry), also enrolling `simulated` terminals.
    pub fn write_registry_with(
        &self,
        device_public: &crypto::RsaVerifier,
        simulated: &[SimulatedTerminal],
    ) -> Result<PathBuf, LabError> {
        let path = self.path("devices.toml");
        let mut text = format!(
            "# Devices enrolled with this proxy (made by the lab).\n[[device]]\ndevice_id = \"{DEVICE_ID}\"\npublic_key = \"\"\"\n{}\"\"\"\ndevice_sn = \"{DEVICE_SN}\"\nsub_mchid = \"1900000002\"\nsub_appid = \"wxsandboxsubapp0001\"\norganization_id = \"ORG-CANTEEN-01\"\n\n[device.alipay]\nbiz_tid = \"{BIZ_TID}\"\n\n[device.aliyun]\ndevice_id = \"{CLOUDAUTH_DEVICE_ID}\"\nbiz_type = \"FACE_PAY\"\n",
            device_public.to_pem()
        );
        for t in simulated {
            text.push_str(&format!(
                "\n# Simulated ({:?}).\n[[device]]\ndevice_id = \"{}\"\npublic_key = \"\"\"\n{}\"\"\"\ndevice_sn = \"{}\"\nsub_mchid = \"1900000002\"\nsub_appid = \"wxsandboxsubapp0001\"\norganization_id = \"ORG-CANTEEN-02\"\n",
                t.profile,
                t.device_id,
                t.key.public.to_pem(),
                t.device_sn
            ));
        }
        write(&path, &text, 0o644)?;
        Ok(path)
    }

    /// Writes `authinfo-proxy.toml` for a proxy as `spec` says: on its `listen` /
    /// `admin_listen`, its three platforms the sandbox at its `sandbox_url`, WeChat Pay's
    /// answers verified as its `verification` says, its merchant keys where its `keys` say,
    /// followed by its `extra` TOML.
    pub fn write_proxy_config(
        &self,
        generated: &GeneratedLab,
        spec: &ProxyConfigSpec<'_>,
    ) -> Result<PathBuf, LabError> {
        let ProxyConfigSpec {
            sandbox_url,
            listen,
            admin_listen,
            extra,
            verification,
            keys,
        } = *spec;
        let path = self.path("authinfo-proxy.toml");
        let k = &generated.sandbox_keys;
        let verification = match verification {
            WechatVerification::PublicKey => format!(
                "public_key_id = \"{}\"\npublic_key = \"wechatpay-public.pem\"",
                k.wechat_platform_key_id
            ),
            WechatVerification::DownloadedCertificates => "# Platform-certificate mode: downloaded (GET /v3/certificates) with the APIv3 key.\napiv3_key_file = \"wechatpay-apiv3.key\"".to_owned(),
        };
        write(
            &path,
            &format!(
                r#"# authinfo-proxy config for the sandbox (made by the lab). Relative paths are relative to this file.
listen = "{listen}"
admin_listen = "{admin_listen}"
tls_cert = "proxy-tls.crt"
tls_key = "proxy-tls.key"
registry = "devices.toml"
state_dir = "proxy-state"
upstream_timeout = "{upstream_timeout}"

[wechatpay]
base_url = "{sandbox_url}"
ca_file = "sandbox-ca.pem"
mchid = "{mchid}"
sp_appid = "wxsandboxspapp0001"
merchant_key = "{merchant_key}"
# The serial is read from the certificate (merchant_serial = "{serial}" would say the same).
merchant_certificate = "wechatpay-merchant-cert.pem"
{verification}

[alipay]
gateway = "{sandbox_url}/gateway.do"
ca_file = "sandbox-ca.pem"
app_id = "{app_id}"
app_private_key = "{app_private_key}"
alipay_public_key = "alipay-public.pem"

[aliyun]
endpoint = "{sandbox_url}"
ca_file = "sandbox-ca.pem"
access_key_id = "{ak}"
access_key_secret_file = "aliyun-secret"

{extra}
"#,
                mchid = k.wechat_mchid,
                serial = k.wechat_merchant_serial,
                app_id = k.alipay_app_id,
                ak = generated.aliyun_access_key_id,
                upstream_timeout = LAB_UPSTREAM_TIMEOUT,
                merchant_key = keys.wechat_merchant,
                app_private_key = keys.alipay_app,
            ),
            // 0600: `extra` may give an [upstream] http_proxy with a password, which makes the
            // file a secret (the proxy refuses it readable by others then).
            0o600,
        )?;
        Ok(path)
    }

    /// Writes `authinfod.toml` for a daemon talking to the proxy at `proxy_url`, with its socket
    /// and store under the lab directory, followed by `extra` TOML.
    pub fn write_daemon_config(&self, proxy_url: &str, extra: &str) -> Result<PathBuf, LabError> {
        let path = self.path("authinfod.toml");
        write(
            &path,
            &format!(
                "# authinfod config for the lab.\ndevice_id = \"{DEVICE_ID}\"\nkey_file = \"{key}\"\nstate_dir = \"{state}\"\n\n[proxy]\nurl = \"{proxy_url}\"\nca_file = \"{ca}\"\ntimeout = \"{LAB_PROXY_TIMEOUT}\"\n\n[socket]\npath = \"{socket}\"\n\n{extra}\n",
                key = self.path("device.key").display(),
                state = self.path("authinfod-state").display(),
                ca = self.path("proxy-ca.pem").display(),
                socket = self.path("authinfod.sock").display(),
            ),
            0o644,
        )?;
        Ok(path)
    }
}

/// Starts the simulated platforms over HTTPS on `listener`, knowing `world`.
pub fn start_sandbox(
    keys: SandboxKeys,
    pki: &GeneratedPki,
    listener: TcpListener,
    world: World,
) -> Result<RunningSandbox, LabError> {
    let tls = Arc::new(crate::tls::server_config_generated(pki)?);
    sandbox::start(listener, Some(tls), SandboxState::new(keys, world)).map_err(LabError::Listen)
}

/// What [`LabFiles::write_proxy_config`] writes a proxy config for: the sandbox's URL, and what
/// [`ProxyConfigSpec::new`] defaults (both listeners on a free loopback port, no extra TOML,
/// WeChat Pay's public key, the lab's key files).
#[derive(Debug, Clone, Copy)]
pub struct ProxyConfigSpec<'a> {
    pub sandbox_url: &'a str,
    pub listen: &'a str,
    pub admin_listen: &'a str,
    pub extra: &'a str,
    pub verification: WechatVerification,
    pub keys: MerchantKeys<'a>,
}

impl<'a> ProxyConfigSpec<'a> {
    /// A proxy of the sandbox at `sandbox_url`, with the defaults.
    pub fn new(sandbox_url: &'a str) -> Self {
        Self {
            sandbox_url,
            listen: "127.0.0.1:0",
            admin_listen: "127.0.0.1:0",
            extra: "",
            verification: WechatVerification::default(),
            keys: MerchantKeys::default(),
        }
    }
}

/// How the lab's proxy verifies WeChat Pay's answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WechatVerification {
    /// `public_key_id` + `public_key` (WeChat Pay public key mode).
    #[default]
    PublicKey,
    /// `apiv3_key_file`: the platform certificates are downloaded (and the sandbox must sign
    /// with one: [`World::wechat_sign_with_certificate`]).
    DownloadedCertificates,
}

/// Where the lab's proxy finds the merchant's two private keys: the key files the lab writes
/// (the default), or anything else the config accepts (a `pkcs11:` URI of a token the caller
/// put the same keys into).
#[derive(Debug, Clone, Copy)]
pub struct MerchantKeys<'a> {
    /// `[wechatpay] merchant_key`.
    pub wechat_merchant: &'a str,
    /// `[alipay] app_private_key`.
    pub alipay_app: &'a str,
}

impl Default for MerchantKeys<'_> {
    fn default() -> Self {
        Self {
            wechat_merchant: "wechatpay-merchant.key",
            alipay_app: "alipay-app.key",
        }
    }
}

/// What a lab is started with beyond its world.
#[derive(Debug, Clone, Default)]
pub struct LabOptions<'a> {
    /// TOML appended to the proxy's config (sections of its own).
    pub proxy_extra: &'a str,
    /// TOML appended to the daemon's config.
    pub daemon_extra: &'a str,
    /// The platforms' host name in the proxy's config; `None`: 127.0.0.1
    /// ([`SANDBOX_ALIAS_HOST`] behind an egress proxy).
    pub host: Option<&'a str>,
    /// The address the proxy and the relay in front of it listen on (and the proxy's
    /// certificate names), for a daemon that reaches the proxy from another network namespace
    /// or machine; `None`: 127.0.0.1. The sandbox stays on loopback.
    pub proxy_host: Option<IpAddr>,
    pub wechat: WechatVerification,
    /// Where the proxy's config says the merchant keys are.
    pub merchant_keys: MerchantKeys<'a>,
}

/// A running lab: sandbox, proxy, and a network cutter in front of the proxy. The daemon config
/// is written; starting the daemon is the caller's (the demo, a test).
#[derive(Debug)]
pub struct Lab {
    pub files: LabFiles,
    pub sandbox: RunningSandbox,
    pub proxy: crate::proxy::RunningProxy,
    /// The relay the daemon reaches the proxy through: `cut()` plays a network loss.
    pub net: NetCut,
    pub daemon_config: PathBuf,
    pub proxy_config: PathBuf,
    /// The device's public key, as enrolled.
    pub device_public: crypto::RsaVerifier,
}

impl Lab {
    /// Generates everything under `dir`, starts the sandbox (knowing `world`), the proxy (with
    /// `proxy_extra` TOML appended to its config) and the relay, and writes the daemon config
    /// (with `daemon_extra`). Everything listens on loopback.
    pub async fn start(
        dir: &Path,
        world: World,
        proxy_extra: &str,
        daemon_extra: &str,
    ) -> Result<Self, LabError> {
        Self::start_with_keys(dir, &LabKeys::generate()?, world, proxy_extra, daemon_extra).await
    }

    /// [`start`](Self::start) with given RSA keys.
    pub async fn start_with_keys(
        dir: &Path,
        keys: &LabKeys,
        world: World,
        proxy_extra: &str,
        daemon_extra: &str,
    ) -> Result<Self, LabError> {
        let options = LabOptions {
            proxy_extra,
            daemon_extra,
            ..LabOptions::default()
        };
        Self::start_with(dir, keys, world, &options).await
    }

    /// [`start_with_keys`](Self::start_with_keys) with every option.
    pub async fn start_with(
        dir: &Path,
        keys: &LabKeys,
        world: World,
        options: &LabOptions<'_>,
    ) -> Result<Self, LabError> {
        let LabOptions {
            proxy_extra,
            daemon_extra,
            host,
            proxy_host,
            wechat,
            merchant_keys,
        } = *options;
        let proxy_host = proxy_host.unwrap_or(IpAddr::from([127, 0, 0, 1]));
        let host = host.unwrap_or("127.0.0.1");
        let loopback = || async {
            TcpListener::bind("127.0.0.1:0")
                .await
                .map_err(LabError::Listen)
        };
        let generated = write_keys_for(dir, keys, Some(&proxy_host.to_string()))?;
        let files = LabFiles {
            dir: dir.to_owned(),
        };
        files.write_registry(&generated.device_public)?;
        let sandbox_listener = loopback().await?;
        let sandbox_url = format!(
            "https://{host}:{}",
            sandbox_listener
                .local_addr()
                .map_err(LabError::Listen)?
                .port()
        );
        let listen = SocketAddr::new(proxy_host, 0).to_string();
        let spec = ProxyConfigSpec {
            listen: &listen,
            extra: proxy_extra,
            verification: wechat,
            keys: merchant_keys,
            ..ProxyConfigSpec::new(&sandbox_url)
        };
        let proxy_config = files.write_proxy_config(&generated, &spec)?;
        let device_public = generated.device_public.clone();
        let sandbox = start_sandbox(
            generated.sandbox_keys,
            &generated.sandbox_pki,
            sandbox_listener,
            world,
        )?;
        // The lab's platforms are on loopback: no egress proxy or system store from the
        // environment applies (a test sets them in `proxy_extra` when it wants them).
        let config = crate::proxy::config::load_with_env(
            &proxy_config,
            &crate::proxy::config::no_environment,
        )?;
        let proxy = crate::proxy::start(config).await?;
        let relay = TcpListener::bind(SocketAddr::new(proxy_host, 0))
            .await
            .map_err(LabError::Listen)?;
        let net = NetCut::start(relay, proxy.addr).map_err(LabError::Listen)?;
        let daemon_config =
            files.write_daemon_config(&format!("https://{}", net.addr), daemon_extra)?;
        Ok(Self {
            files,
            sandbox,
            proxy,
            net,
            daemon_config,
            proxy_config,
            device_public,
        })
    }

    /// Stops the proxy and the sandbox.
    pub async fn stop(self) {
        self.proxy.stop().await;
        self.sandbox.stop().await;
    }
}

/// Default: where `authinfo-proxy sandbox` serves the simulated platforms.
pub const SANDBOX_LISTEN: &str = "127.0.0.1:8600";
/// Default: where the config `authinfo-proxy sandbox` writes makes the proxy listen.
pub const SANDBOX_PROXY_LISTEN: &str = "127.0.0.1:8443";
/// Default: extra devices in the simulated WeChat Pay fleet list of `authinfo-proxy sandbox`.
pub const SANDBOX_DEVICES: usize = 250;

/// What `authinfo-proxy sandbox` is started with.
#[derive(Debug, Clone)]
pub struct StandaloneOptions {
    /// Where the keys and configs are written (created if missing).
    pub dir: PathBuf,
    /// Where the simulated platforms listen.
    pub listen: String,
    /// Where the written config makes the proxy listen (and the simulated terminals reach it).
    pub proxy_listen: String,
    /// Where the written config puts the proxy's admin listener.
    pub admin_listen: String,
    /// Extra devices in the simulated WeChat Pay fleet list.
    pub devices: usize,
    /// The merchant's authinfo limit at simulated WeChat Pay.
    pub authinfo_limit: Option<crate::sandbox::AuthinfoLimit>,
    /// Terminals enrolled in the registry and reporting to the proxy once it runs, with
    /// assorted risks (at most [`MAX_SIMULATED_TERMINALS`]).
    pub simulate_terminals: usize,
    /// The lab's RSA keys; `None`: fresh ones (tests pass theirs).
    pub keys: Option<LabKeys>,
}

impl StandaloneOptions {
    /// The defaults of `authinfo-proxy sandbox --dir DIR`.
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            listen: SANDBOX_LISTEN.into(),
            proxy_listen: SANDBOX_PROXY_LISTEN.into(),
            admin_listen: crate::proxy::config::DEFAULT_ADMIN_LISTEN.into(),
            devices: SANDBOX_DEVICES,
            authinfo_limit: None,
            simulate_terminals: 0,
            keys: None,
        }
    }
}

/// A running `authinfo-proxy sandbox`: the simulated platforms, the files written for the proxy
/// and the terminal, and the simulated terminals' loop (when asked for).
pub struct StandaloneSandbox {
    pub sandbox_url: String,
    pub sandbox: RunningSandbox,
    pub files: LabFiles,
    pub proxy_config: PathBuf,
    pub daemon_config: PathBuf,
    /// Where the simulated terminals reach the proxy.
    pub proxy_url: String,
    pub admin_listen: String,
    /// How many terminals are simulated.
    pub simulated: usize,
    stop_simulator: CancellationToken,
    simulator: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for StandaloneSandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StandaloneSandbox")
            .field("dir", &self.files.dir)
            .field("simulated", &self.simulated)
            .finish_non_exhaustive()
    }
}

impl StandaloneSandbox {
    /// Generates a lab in `options.dir` (keys, a proxy config for a proxy on `proxy_listen`, the
    /// registry with the simulated terminals, a terminal config), serves the simulated
    /// platforms on `listen`, and starts the simulated terminals' loop.
    pub async fn start(options: &StandaloneOptions) -> Result<Self, LabError> {
        let n = options.simulate_terminals;
        if n > MAX_SIMULATED_TERMINALS {
            return Err(LabError::TooManyTerminals {
                asked: n,
                max: MAX_SIMULATED_TERMINALS,
            });
        }
        let listener = TcpListener::bind(&options.listen)
            .await
            .map_err(LabError::Listen)?;
        let sandbox_url = format!(
            "https://{}",
            listener.local_addr().map_err(LabError::Listen)?
        );
        // Terminals connect to the proxy at `proxy_listen`, so its certificate must name that
        // host (an unspecified address like 0.0.0.0 names nothing a terminal can connect to:
        // the simulated terminals use loopback then).
        let proxy_addr = options.proxy_listen.parse::<SocketAddr>().ok();
        let proxy_host = proxy_addr
            .map(|a| a.ip())
            .filter(|ip| !ip.is_unspecified())
            .map(|ip| ip.to_string());
        let proxy_url = match proxy_addr {
            Some(a) if a.ip().is_unspecified() => format!("https://127.0.0.1:{}", a.port()),
            _ => format!("https://{}", options.proxy_listen),
        };
        let keys = match &options.keys {
            Some(keys) => keys.clone(),
            None => LabKeys::generate()?,
        };
        let simulated = if n == 0 {
            Vec::new()
        } else {
            tracing::info!(
                terminals = n,
                "generating an RSA-2048 key for each simulated terminal"
            );
            tokio::task::spawn_blocking(move || simulated::generate(n))
                .await
                .map_err(LabError::KeyTask)??
        };
        let generated = write_keys_for(&options.dir, &keys, proxy_host.as_deref())?;
        let files = LabFiles {
            dir: options.dir.clone(),
        };
        files.write_registry_with(&generated.device_public, &simulated)?;
        let spec = ProxyConfigSpec {
            listen: &options.proxy_listen,
            admin_listen: &options.admin_listen,
            ..ProxyConfigSpec::new(&sandbox_url)
        };
        let proxy_config = files.write_proxy_config(&generated, &spec)?;
        let daemon_config =
            files.write_daemon_config(&format!("https://{}", options.proxy_listen), "")?;
        let mut world = World {
            authinfo_limit: options.authinfo_limit,
            ..world(options.devices, 45)
        };
        world
            .wechat_devices
            .extend(simulated.iter().map(|t| Device {
                sub_merchant_shortname: Some(CANTEENS[t.index % CANTEENS.len()].into()),
                ..listed(
                    t.device_sn.clone(),
                    if t.profile.activated() {
                        "ACTIVATED"
                    } else {
                        "INACTIVATED"
                    },
                )
            }));
        let tls = crate::tls::client_config_pinned(&generated.proxy_ca_pem, "proxy-ca.pem")?;
        let sandbox = start_sandbox(
            generated.sandbox_keys,
            &generated.sandbox_pki,
            listener,
            world,
        )?;
        let stop_simulator = CancellationToken::new();
        let simulator = (!simulated.is_empty()).then(|| {
            let (url, stop) = (proxy_url.clone(), stop_simulator.clone());
            tokio::spawn(async move {
                if let Err(error) =
                    simulated::run(simulated, &url, &tls, SIMULATED_TIMEOUT, stop).await
                {
                    tracing::error!(error = %crate::error_chain(&error), "the simulated terminals stopped");
                }
            })
        });
        Ok(Self {
            sandbox_url,
            sandbox,
            files,
            proxy_config,
            daemon_config,
            proxy_url,
            admin_listen: options.admin_listen.clone(),
            simulated: n,
            stop_simulator,
            simulator,
        })
    }

    /// What to run next, for people.
    pub fn next_steps(&self) -> String {
        let proxy = self.proxy_config.display();
        let mut out = format!(
            "Simulated WeChat Pay, Alipay and Alibaba Cloud at {}\nFresh keys, certificates and configs in {}:\n",
            self.sandbox_url,
            self.files.dir.display()
        );
        out.push_str(&format!(
            "  proxy:     authinfo-proxy serve --config {proxy}\n"
        ));
        out.push_str(&format!(
            "  terminal:  authinfod run --config {}\n",
            self.daemon_config.display()
        ));
        out.push_str(&format!(
            "  fleet:     authinfo-proxy devices --config {proxy}\n"
        ));
        out.push_str(&format!(
            "  terminals: authinfo-proxy terminals --config {proxy}   (dashboard: http://{}/)\n",
            self.admin_listen
        ));
        out.push_str(&format!(
            "  face app:  curl --unix-socket {} -X PUT -d '{{\"raw_data\":\"R\"}}' http://localhost/v1/raw-data\n",
            self.files.path("authinfod.sock").display()
        ));
        if self.simulated > 0 {
            out.push_str(&format!(
                "{} simulated terminals (SIM-001 to SIM-{:03}, assorted risks) report to the proxy at {} once it runs, every {}.\n",
                self.simulated,
                self.simulated,
                self.proxy_url,
                crate::units::format_duration(simulated::ROUND_EVERY)
            ));
        }
        out.push_str("Ctrl-C stops the sandbox.\n");
        out
    }

    /// Stops the simulated terminals and the platforms.
    pub async fn stop(self) {
        self.stop_simulator.cancel();
        if let Some(task) = self.simulator {
            let _ = task.await;
        }
        self.sandbox.stop().await;
    }
}

/// The short names WeChat Pay lists for the simulated terminals' sub-merchants.
const CANTEENS: [&str; 3] = ["一食堂", "二食堂", "教工餐厅"];
/// The simulated terminals' timeout of a call to the proxy.
const SIMULATED_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// `authinfo-proxy sandbox`: starts a [`StandaloneSandbox`], prints what to run next, and
/// serves until `shutdown`.
pub async fn run_standalone_sandbox(
    options: &StandaloneOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), LabError> {
    let sandbox = StandaloneSandbox::start(options).await?;
    print!("{}", sandbox.next_steps());
    shutdown.await;
    sandbox.stop().await;
    Ok(())
}
