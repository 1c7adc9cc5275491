//! Simulated WeChat Pay, Alipay and Alibaba Cloud, for tests and the demo.
//!
//! Owns: one HTTPS (or plain HTTP) server that answers the platform endpoints the proxy uses,
//! with their real request and response formats. It verifies the proxy's signatures with the
//! public halves of the configured keys exactly as the platforms do (and answers as they do when
//! a signature is bad), signs its answers with its own platform keys, and injects faults on
//! request ([`Faults`]). It must not share code paths with the clients it checks beyond the
//! primitives in [`crate::crypto`]: each simulator rebuilds its platform's signing string on its
//! own, so a bug in a client's signing code shows up as a refused request.
//!
//! - [`wechatpay`]: `/v3/offlineface/authinfo`, `/v3/iotmanage/device-inspections/{sn}`,
//!   `/v3/iotmanage/devices`.
//! - [`alipay`]: `/gateway.do` (`alipay.merchant.iot.device.query`).
//! - [`aliyun`]: `/` (`Action=DescribeDeviceInfo`, version 2019-03-07).

pub mod alipay;
pub mod aliyun;
pub mod netcut;
pub mod wechatpay;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::crypto::{RsaSigner, RsaVerifier};
use crate::platform::{alipay as alipay_api, aliyun as aliyun_api, wechatpay as wechatpay_api};

/// Which simulated platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Platform {
    WechatPay,
    Alipay,
    Aliyun,
}

/// A fault to inject into a platform's next answers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fault {
    /// Wait this long before answering.
    pub latency: Option<Duration>,
    /// Answer with this HTTP status and the platform's error body for it (500 SYSTEM_ERROR,
    /// 429 FREQUENCY_LIMITED, ...) instead of the real answer.
    pub status: Option<u16>,
    /// With `status: Some(429)`, the `Retry-After` seconds to send.
    pub retry_after: Option<u64>,
    /// Sign the answer with a key that is not the platform's.
    pub bad_signature: bool,
    /// Sign the answer with a timestamp this many seconds in the past (WeChat Pay).
    pub stale_timestamp: Option<u64>,
    /// Answer 200 with a body that is not the documented shape.
    pub malformed_body: bool,
    /// How many answers the fault applies to; `None` for every answer until cleared.
    pub count: Option<u32>,
    /// Apply only to requests whose target (`/path?query`) contains this; others pass untouched
    /// and do not count. Lets a test aim at one request of a sequence (the third page of a
    /// fleet sync, say) without racing the client to arm it just in time.
    pub target_contains: Option<String>,
}

/// The faults currently armed, per platform. Cheap to clone; all clones share state.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    armed: Arc<Mutex<HashMap<Platform, Fault>>>,
}

impl Faults {
    /// Arms `fault` for `platform`, replacing any armed one.
    pub fn set(&self, platform: Platform, fault: Fault) {
        lock(&self.armed).insert(platform, fault);
    }

    /// Disarms `platform`'s fault.
    pub fn clear(&self, platform: Platform) {
        lock(&self.armed).remove(&platform);
    }

    /// The fault that applies to the answer to `target` being made now, counting it down.
    pub fn take(&self, platform: Platform, target: &str) -> Option<Fault> {
        let mut armed = lock(&self.armed);
        let fault = armed.get_mut(&platform)?;
        if fault
            .target_contains
            .as_deref()
            .is_some_and(|part| !target.contains(part))
        {
            return None;
        }
        let taken = fault.clone();
        match &mut fault.count {
            Some(0) => {
                armed.remove(&platform);
                return None;
            }
            Some(1) => {
                armed.remove(&platform);
            }
            Some(n) => *n -= 1,
            None => {}
        }
        Some(taken)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding a sandbox lock only happens in a failing test; the data (faults,
    // counters) stays meaningful, so recover it rather than cascade the panic.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What the simulated platforms know: the merchant's devices and their facts.
#[derive(Debug, Clone, Default)]
pub struct World {
    /// WeChat Pay's device list, in listing order.
    pub wechat_devices: Vec<wechatpay_api::Device>,
    /// Inspection results by device_sn.
    pub inspections: BTreeMap<String, wechatpay_api::DeviceInspection>,
    /// raw_data values WeChat Pay refuses (400 PARAM_ERROR), to simulate a bad face SDK blob.
    pub rejected_raw_data: Vec<String>,
    /// Alipay bindings by `biz_tid`, or by `supplier_id/device_sn` for SN lookups.
    pub alipay_bindings: BTreeMap<String, alipay_api::DeviceBinding>,
    /// Cloudauth licence records.
    pub licences: Vec<aliyun_api::DeviceInfo>,
    /// Seconds of validity the authinfo answer carries (`expires_in`), if any.
    pub authinfo_expires_in: Option<u64>,
    /// The length of the authinfo values answered, when not the usual 65 characters: a large
    /// one makes an answer span several TLS records and TCP segments (the link tests cut the
    /// network in the middle of such a body).
    pub authinfo_len: Option<usize>,
    /// Faults armed before the first request is served (for tests whose client starts calling
    /// as soon as it starts, like the proxy's fleet sync).
    pub armed_faults: Vec<(Platform, Fault)>,
}

/// The keys the simulated platforms verify with and sign with.
pub struct SandboxKeys {
    /// WeChat Pay merchant id the merchant signs as.
    pub wechat_mchid: String,
    /// Serial of the merchant's API certificate (`serial_no` in its Authorization).
    pub wechat_merchant_serial: String,
    /// The merchant's public key: what WeChat Pay checks requests with.
    pub wechat_merchant_public: RsaVerifier,
    /// WeChat Pay's own signing key, and the id it is published under (`PUB_KEY_ID_...`).
    pub wechat_platform_key: RsaSigner,
    pub wechat_platform_key_id: String,
    /// Alipay app id, the app's public key (checks requests), Alipay's own key (signs answers).
    pub alipay_app_id: String,
    pub alipay_app_public: RsaVerifier,
    pub alipay_platform_key: RsaSigner,
    /// Alibaba Cloud AccessKey pairs the gateway accepts, id to secret.
    pub aliyun_access_keys: BTreeMap<String, String>,
}

impl std::fmt::Debug for SandboxKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxKeys")
            .field("wechat_mchid", &self.wechat_mchid)
            .field("wechat_platform_key_id", &self.wechat_platform_key_id)
            .field("alipay_app_id", &self.alipay_app_id)
            .finish_non_exhaustive()
    }
}

/// The merchant-side halves of a [`SandboxKeys::generate`]d set: what the proxy (or a test)
/// signs with. Secrets: never logged.
pub struct MerchantSecrets {
    /// PKCS#8 PEM of the WeChat Pay merchant API key.
    pub wechat_merchant_private_pem: String,
    /// PKCS#8 PEM of the Alipay app key.
    pub alipay_app_private_pem: String,
    /// Alipay's public key, what the merchant verifies answers with.
    pub alipay_platform_public: RsaVerifier,
    /// WeChat Pay's public key, what the merchant verifies answers with.
    pub wechat_platform_public: RsaVerifier,
    pub aliyun_access_key_id: String,
    pub aliyun_access_key_secret: String,
}

impl std::fmt::Debug for MerchantSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MerchantSecrets")
            .field("aliyun_access_key_id", &self.aliyun_access_key_id)
            .finish_non_exhaustive()
    }
}

impl SandboxKeys {
    /// A complete key set made on the spot (2048-bit RSA keys, a random AccessKey pair), and
    /// the merchant's halves of it. For tests and the demo.
    pub fn generate() -> Result<(Self, MerchantSecrets), crate::crypto::CryptoError> {
        use crate::crypto::{generate_rsa_key, hex, random_bytes};
        let signer = |pem: &str| RsaSigner::from_pem(pem, "a generated sandbox key");
        let wechat_merchant = generate_rsa_key(2048)?;
        let wechat_platform = generate_rsa_key(2048)?;
        let alipay_app = generate_rsa_key(2048)?;
        let alipay_platform = generate_rsa_key(2048)?;
        let aliyun_access_key_id = format!("LTAI{}", hex(&random_bytes(10)?));
        let aliyun_access_key_secret = hex(&random_bytes(15)?);
        let keys = Self {
            wechat_mchid: "1900000001".to_owned(),
            wechat_merchant_serial: hex(&random_bytes(20)?).to_uppercase(),
            wechat_merchant_public: wechat_merchant.public.clone(),
            wechat_platform_key: signer(&wechat_platform.private_pem)?,
            wechat_platform_key_id: format!("PUB_KEY_ID_{}", hex(&random_bytes(16)?)),
            alipay_app_id: "2021000000000001".to_owned(),
            alipay_app_public: alipay_app.public.clone(),
            alipay_platform_key: signer(&alipay_platform.private_pem)?,
            aliyun_access_keys: BTreeMap::from([(
                aliyun_access_key_id.clone(),
                aliyun_access_key_secret.clone(),
            )]),
        };
        let secrets = MerchantSecrets {
            wechat_merchant_private_pem: wechat_merchant.private_pem,
            alipay_app_private_pem: alipay_app.private_pem,
            alipay_platform_public: alipay_platform.public,
            wechat_platform_public: wechat_platform.public,
            aliyun_access_key_id,
            aliyun_access_key_secret,
        };
        Ok((keys, secrets))
    }
}

/// A request one of the simulators received, for tests to assert on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub platform: Platform,
    /// `METHOD path?query` as received.
    pub request: String,
    /// Whether its signature verified.
    pub signature_ok: bool,
    /// When it arrived (monotonic): tests time the gaps between requests where they arrive,
    /// not where a poller happens to notice them.
    pub at: tokio::time::Instant,
}

/// Shared state of the simulators.
#[derive(Debug)]
pub struct SandboxState {
    pub keys: SandboxKeys,
    pub world: Mutex<World>,
    pub faults: Faults,
    received: Mutex<Vec<Received>>,
    /// Request times of the WeChat Pay device list, for its 20 requests/second limit.
    pub(crate) list_window: Mutex<std::collections::VecDeque<tokio::time::Instant>>,
}

impl SandboxState {
    pub fn new(keys: SandboxKeys, mut world: World) -> Arc<Self> {
        let faults = Faults::default();
        for (platform, fault) in std::mem::take(&mut world.armed_faults) {
            faults.set(platform, fault);
        }
        Arc::new(Self {
            keys,
            world: Mutex::new(world),
            faults,
            received: Mutex::new(Vec::new()),
            list_window: Mutex::new(std::collections::VecDeque::new()),
        })
    }

    /// Records a received request.
    pub fn record(&self, platform: Platform, request: String, signature_ok: bool) {
        lock(&self.received).push(Received {
            platform,
            request,
            signature_ok,
            at: tokio::time::Instant::now(),
        });
    }

    /// Every request received so far.
    pub fn received(&self) -> Vec<Received> {
        lock(&self.received).clone()
    }

    /// Requests received by `platform` so far.
    pub fn received_by(&self, platform: Platform) -> usize {
        lock(&self.received)
            .iter()
            .filter(|r| r.platform == platform)
            .count()
    }

    /// A copy of the world, for reading.
    pub fn world(&self) -> World {
        lock(&self.world).clone()
    }

    /// Changes the world.
    pub fn update_world(&self, f: impl FnOnce(&mut World)) {
        f(&mut lock(&self.world));
    }
}

/// Decodes `application/x-www-form-urlencoded` text into pairs.
pub(crate) fn parse_form(text: &str) -> Vec<(String, String)> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(&s.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned()
    };
    text.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// The router answering all three platforms' endpoints.
pub fn router(state: Arc<SandboxState>) -> axum::Router {
    wechatpay::router(state.clone())
        .merge(alipay::router(state.clone()))
        .merge(aliyun::router(state))
}

/// A running sandbox.
#[derive(Debug)]
pub struct RunningSandbox {
    pub addr: SocketAddr,
    /// `https://127.0.0.1:port` (or `http://` when started without TLS).
    pub base_url: String,
    pub state: Arc<SandboxState>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl RunningSandbox {
    /// Stops the server and waits for it.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

/// Starts the sandbox on `listener`, over HTTPS when `tls` is given.
pub fn start(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    state: Arc<SandboxState>,
) -> std::io::Result<RunningSandbox> {
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let app = router(state.clone());
    let scheme = if tls.is_some() { "https" } else { "http" };
    let token = shutdown.clone();
    let task = match tls {
        Some(tls) => tokio::spawn(crate::tls::serve_https(listener, tls, app, token)),
        None => tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(token.cancelled_owned())
                .await;
        }),
    };
    Ok(RunningSandbox {
        addr,
        base_url: format!("{scheme}://{addr}"),
        state,
        shutdown,
        task,
    })
}

/// Starting a generated sandbox over real HTTPS on 127.0.0.1, for the simulators' tests.
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    /// The timeout of a client call whose answer a test checks: generous, so that a test run
    /// under qemu on a loaded machine never sees a timeout where it checks another outcome.
    /// Tests of timeouts use a latency far above a short timeout of their own.
    pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(60);

    /// A running HTTPS sandbox, a platform HTTP client that trusts it, and the merchant keys.
    pub(crate) struct TestSandbox {
        pub sandbox: RunningSandbox,
        pub secrets: MerchantSecrets,
        /// The sandbox CA, PEM, to build more clients with other timeouts.
        pub ca_pem: String,
    }

    impl TestSandbox {
        /// A platform client (`platform::http_client`) pinned to the sandbox CA.
        pub fn http(&self, timeout: Duration) -> reqwest::Client {
            let tls = crate::tls::client_config_pinned(&self.ca_pem, "sandbox ca").expect("tls");
            crate::platform::http_client(tls, timeout).expect("http client")
        }
    }

    /// Generates keys and a PKI, and starts the sandbox with `world` on an ephemeral port.
    pub(crate) async fn start_https(world: World) -> TestSandbox {
        let (keys, secrets) = SandboxKeys::generate().expect("keys");
        let pki = crate::tls::generate_pki("sandbox test ca", &["127.0.0.1"]).expect("pki");
        let server = crate::tls::server_config_generated(&pki).expect("server config");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let sandbox = start(
            listener,
            Some(Arc::new(server)),
            SandboxState::new(keys, world),
        )
        .expect("start");
        TestSandbox {
            sandbox,
            secrets,
            ca_pem: pki.ca_pem,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_decoding_handles_plus_and_percent() {
        assert_eq!(
            parse_form("a=x+y%2Bz&b=%E6%94%AF&c"),
            vec![
                ("a".to_owned(), "x y+z".to_owned()),
                ("b".to_owned(), "支".to_owned()),
                ("c".to_owned(), String::new()),
            ]
        );
    }

    #[test]
    fn counted_faults_expire_and_open_faults_stay() {
        let faults = Faults::default();
        faults.set(
            Platform::Alipay,
            Fault {
                status: Some(500),
                count: Some(2),
                ..Fault::default()
            },
        );
        assert!(faults.take(Platform::Alipay, "/").is_some());
        assert!(faults.take(Platform::Alipay, "/").is_some());
        assert!(faults.take(Platform::Alipay, "/").is_none());
        assert!(faults.take(Platform::WechatPay, "/").is_none());
        faults.set(Platform::Aliyun, Fault::default());
        for _ in 0..5 {
            assert!(faults.take(Platform::Aliyun, "/").is_some());
        }
        faults.clear(Platform::Aliyun);
        assert!(faults.take(Platform::Aliyun, "/").is_none());
        // Aimed at one target: others pass and do not count it down.
        faults.set(
            Platform::WechatPay,
            Fault {
                status: Some(429),
                count: Some(1),
                target_contains: Some("offset=200".into()),
                ..Fault::default()
            },
        );
        assert!(
            faults
                .take(Platform::WechatPay, "/v3/iotmanage/devices?offset=0")
                .is_none()
        );
        assert!(
            faults
                .take(Platform::WechatPay, "/v3/iotmanage/devices?offset=200")
                .is_some()
        );
        assert!(
            faults
                .take(Platform::WechatPay, "/v3/iotmanage/devices?offset=200")
                .is_none()
        );
    }
}
