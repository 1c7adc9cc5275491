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
//! - [`connect_proxy`]: not a platform: the merchant's egress proxy (HTTP `CONNECT`).
//! - [`netcut`]: not a platform: a relay that plays a network loss.

pub mod alipay;
pub mod aliyun;
pub mod connect_proxy;
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
use crate::sync::lock;

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
    /// Network jitter (WeChat Pay): a random delay of up to this much before the request counts
    /// as arrived (the way there: its [`Received::at`] and the device list's per-second count
    /// are taken after it), and another, drawn anew, before the answer leaves (the way back).
    pub latency_jitter: Option<Duration>,
    /// Answer with this HTTP status and the platform's error body for it (500 SYSTEM_ERROR,
    /// 429 FREQUENCY_LIMITED, ...) instead of the real answer.
    pub status: Option<u16>,
    /// With `status: Some(429)`, the `Retry-After` seconds to send.
    pub retry_after: Option<u64>,
    /// Sign the answer with a key that is not the platform's.
    pub bad_signature: bool,
    /// Send the answer without a signature (Alipay: no `sign`, whatever the answer).
    pub unsigned_answer: bool,
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

    /// Arms `fault` for `platform`'s next answer only (whatever its `count`).
    pub fn arm_once(&self, platform: Platform, fault: Fault) {
        self.set(
            platform,
            Fault {
                count: Some(1),
                ..fault
            },
        );
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

    /// What every simulated platform does first with a request: [`take`](Self::take) the fault
    /// that applies to `target` (none is the default, no fault) and sleep its `latency`.
    pub async fn take_and_delay(&self, platform: Platform, target: &str) -> Fault {
        let fault = self.take(platform, target).unwrap_or_default();
        if let Some(latency) = fault.latency {
            tokio::time::sleep(latency).await;
        }
        fault
    }
}

/// What the simulated platforms know: the merchant's devices and their facts.
#[derive(Debug, Clone, Default)]
pub struct World {
    /// WeChat Pay's device list, in listing order.
    pub wechat_devices: Vec<wechatpay_api::Device>,
    /// The most device-list requests WeChat Pay admits in any one second (counted on arrival;
    /// more are answered 429 FREQUENCY_LIMITED). `None`: the documented 20.
    pub wechat_list_requests_per_second: Option<usize>,
    /// The most rows a device-list page holds: a larger `limit` is answered with this many rows
    /// and says so in the page's `limit`. `None`: as asked (up to the documented 100). Lets a
    /// test page a fleet of a few hundred devices in many requests.
    pub wechat_list_page_cap: Option<u64>,
    /// Inspection results by device_sn.
    pub inspections: BTreeMap<String, wechatpay_api::DeviceInspection>,
    /// raw_data values WeChat Pay refuses (400 PARAM_ERROR), to simulate a bad face SDK blob.
    pub rejected_raw_data: Vec<String>,
    /// Alipay bindings by `biz_tid`, or by `supplier_id/device_sn` for SN lookups.
    pub alipay_bindings: BTreeMap<String, alipay_api::DeviceBinding>,
    /// Cloudauth licence records.
    pub licences: Vec<aliyun_api::DeviceInfo>,
    /// The largest page Cloudauth answers: a bigger `PageSize` is cut to this and the answer's
    /// `PageSize` says so. `None`: the documented maximum (100).
    pub cloudauth_page_size_cap: Option<usize>,
    /// Sign WeChat Pay's answers with the first platform certificate's key, named by its serial
    /// (platform-certificate mode), instead of the public key id.
    pub wechat_sign_with_certificate: bool,
    /// Seconds of validity the authinfo answer carries (`expires_in`), if any.
    pub authinfo_expires_in: Option<u64>,
    /// The merchant's limit on authinfo requests (counted on arrival, once signed correctly;
    /// more are answered 429 FREQUENCY_LIMITED), as WeChat Pay's per-merchant limits work:
    /// whichever terminal spends it, every terminal of the merchant is refused. `None`: no
    /// limit.
    pub authinfo_limit: Option<AuthinfoLimit>,
    /// The length of the authinfo values answered, when not the usual 65 characters: a large
    /// one makes an answer span several TLS records and TCP segments (the link tests cut the
    /// network in the middle of such a body).
    pub authinfo_len: Option<usize>,
    /// Faults armed before the first request is served (for tests whose client starts calling
    /// as soon as it starts, like the proxy's fleet sync).
    pub armed_faults: Vec<(Platform, Fault)>,
    /// How long WeChat Pay's window of 20 device-list requests lasts; `None` for the documented
    /// second. A test that must see the limit whatever the machine's speed stretches it.
    pub device_list_window: Option<Duration>,
}

/// At most `requests` authinfo requests of the merchant in any `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthinfoLimit {
    pub requests: usize,
    pub window: Duration,
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
    /// The merchant's APIv3 key (32 characters), which platform certificates are encrypted with.
    pub wechat_apiv3_key: String,
    /// The platform certificates WeChat Pay publishes at start (`GET /v3/certificates`); the
    /// first is for `wechat_platform_key`.
    pub wechat_platform_certificates: Vec<SandboxCertificate>,
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
    /// The merchant API certificate for that key (`apiclient_cert.pem`, as WeChat Pay issues
    /// it): its serial is [`SandboxKeys::wechat_merchant_serial`].
    pub wechat_merchant_certificate_pem: String,
    /// PKCS#8 PEM of the Alipay app key.
    pub alipay_app_private_pem: String,
    /// Alipay's public key, what the merchant verifies answers with.
    pub alipay_platform_public: RsaVerifier,
    /// WeChat Pay's public key, what the merchant verifies answers with.
    pub wechat_platform_public: RsaVerifier,
    pub aliyun_access_key_id: String,
    pub aliyun_access_key_secret: String,
    /// The APIv3 key, as the merchant set it in the console.
    pub wechat_apiv3_key: String,
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
        use crate::crypto::generate_rsa_key;
        Self::from_rsa_keys(
            &generate_rsa_key(2048)?,
            &generate_rsa_key(2048)?,
            &generate_rsa_key(2048)?,
            &generate_rsa_key(2048)?,
        )
    }

    /// A key set around four given RSA keys (tests reuse keys across labs: generating them is
    /// the slow part), with fresh random serials, key ids and AccessKey pair.
    pub fn from_rsa_keys(
        wechat_merchant: &crate::crypto::GeneratedKey,
        wechat_platform: &crate::crypto::GeneratedKey,
        alipay_app: &crate::crypto::GeneratedKey,
        alipay_platform: &crate::crypto::GeneratedKey,
    ) -> Result<(Self, MerchantSecrets), crate::crypto::CryptoError> {
        use crate::crypto::{hex, random_bytes};
        let signer = |pem: &str| RsaSigner::from_pem(pem, "a generated sandbox key");
        let aliyun_access_key_id = format!("LTAI{}", hex(&random_bytes(10)?));
        let aliyun_access_key_secret = hex(&random_bytes(15)?);
        let mchid = "1900000001";
        // 20 bytes as WeChat Pay's serials have; the first never zero, so the serial reads back
        // from the certificate with all 40 digits.
        let serial = certificate_serial()?;
        let certificate = issue_certificate(
            &wechat_merchant.private_pem,
            &serial,
            mchid,
            "sandbox merchant API certificate",
            None,
        )?;
        let now = crate::units::unix_now();
        let platform_certificate = SandboxCertificate::issue(
            &wechat_platform.private_pem,
            now - 30 * 86_400,
            now + 5 * 365 * 86_400,
        )?;
        let apiv3_key: String = random_bytes(32)?
            .iter()
            .map(|b| {
                char::from(
                    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                        [usize::from(*b) % 62],
                )
            })
            .collect();
        let keys = Self {
            wechat_mchid: mchid.to_owned(),
            wechat_merchant_serial: hex(&serial).to_uppercase(),
            wechat_merchant_public: wechat_merchant.public.clone(),
            wechat_platform_key: signer(&wechat_platform.private_pem)?,
            wechat_platform_key_id: format!("PUB_KEY_ID_{}", hex(&random_bytes(16)?)),
            wechat_apiv3_key: apiv3_key.clone(),
            wechat_platform_certificates: vec![platform_certificate],
            alipay_app_id: "2021000000000001".to_owned(),
            alipay_app_public: alipay_app.public.clone(),
            alipay_platform_key: signer(&alipay_platform.private_pem)?,
            aliyun_access_keys: BTreeMap::from([(
                aliyun_access_key_id.clone(),
                aliyun_access_key_secret.clone(),
            )]),
        };
        let secrets = MerchantSecrets {
            wechat_merchant_private_pem: wechat_merchant.private_pem.clone(),
            wechat_merchant_certificate_pem: certificate,
            alipay_app_private_pem: alipay_app.private_pem.clone(),
            alipay_platform_public: alipay_platform.public.clone(),
            wechat_platform_public: wechat_platform.public.clone(),
            aliyun_access_key_id,
            aliyun_access_key_secret,
            wechat_apiv3_key: apiv3_key,
        };
        Ok((keys, secrets))
    }
}

/// A random 20-byte certificate serial as WeChat Pay's are; the first byte never zero, so it
/// reads back (upper-case hex without leading zero bytes) with all 40 digits.
fn certificate_serial() -> Result<Vec<u8>, crate::crypto::CryptoError> {
    let mut serial = crate::crypto::random_bytes(20)?;
    serial[0] |= 0x40;
    Ok(serial)
}

/// A self-signed certificate for `key_pem` with `serial`, named `common_name` / `unit`, valid
/// over `validity` (Unix seconds; rcgen's default when `None`). The proxy reads only serials,
/// keys and validity, so self-signed does.
fn issue_certificate(
    key_pem: &str,
    serial: &[u8],
    common_name: &str,
    unit: &str,
    validity: Option<(i64, i64)>,
) -> Result<String, crate::crypto::CryptoError> {
    let generate = |e: rcgen::Error| crate::crypto::CryptoError::Generate(e.to_string());
    let key = rcgen::KeyPair::from_pem(key_pem).map_err(generate)?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(generate)?;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(serial));
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationalUnitName, unit);
    if let Some((not_before, not_after)) = validity {
        let at = |t| {
            time::OffsetDateTime::from_unix_timestamp(t)
                .map_err(|e| crate::crypto::CryptoError::Generate(e.to_string()))
        };
        params.not_before = at(not_before)?;
        params.not_after = at(not_after)?;
    }
    Ok(params.self_signed(&key).map_err(generate)?.pem())
}

/// A platform certificate the simulated WeChat Pay publishes (`GET /v3/certificates`) and may
/// sign its answers with.
#[derive(Debug, Clone)]
pub struct SandboxCertificate {
    /// Upper-case hex, as WeChat Pay names it in `Wechatpay-Serial`.
    pub serial: String,
    pub pem: String,
    /// Validity, Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
    signer: Arc<RsaSigner>,
}

impl SandboxCertificate {
    /// Issues a platform certificate for the RSA key `key_pem` (PKCS#8 PEM) with a fresh serial,
    /// valid from `not_before` to `not_after` (Unix seconds).
    pub fn issue(
        key_pem: &str,
        not_before: i64,
        not_after: i64,
    ) -> Result<Self, crate::crypto::CryptoError> {
        let serial = certificate_serial()?;
        let pem = issue_certificate(
            key_pem,
            &serial,
            "Tenpay.com Root CA (sandbox platform certificate)",
            "WeChat Pay sandbox",
            Some((not_before, not_after)),
        )?;
        Ok(Self {
            serial: crate::crypto::hex(&serial).to_uppercase(),
            pem,
            not_before,
            not_after,
            signer: Arc::new(RsaSigner::from_pem(key_pem, "a sandbox platform key")?),
        })
    }
}

/// The platform certificates WeChat Pay publishes now, and which one (if any) signs answers.
#[derive(Debug, Default)]
pub(crate) struct WechatCertificates {
    pub(crate) published: Vec<SandboxCertificate>,
    /// No longer published, but WeChat Pay still holds their keys and may sign with them.
    pub(crate) withdrawn: Vec<SandboxCertificate>,
    /// The serial of the certificate whose key signs answers; `None`: the public key
    /// (`wechat_platform_key` under `wechat_platform_key_id`).
    pub(crate) signing: Option<String>,
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
    /// Arrival times of the merchant's authinfo requests, for [`World::authinfo_limit`] (the
    /// sandbox serves one merchant).
    pub(crate) authinfo_window: Mutex<std::collections::VecDeque<tokio::time::Instant>>,
    pub(crate) wechat_certificates: Mutex<WechatCertificates>,
}

impl SandboxState {
    pub fn new(keys: SandboxKeys, mut world: World) -> Arc<Self> {
        let faults = Faults::default();
        for (platform, fault) in std::mem::take(&mut world.armed_faults) {
            faults.set(platform, fault);
        }
        let published = keys.wechat_platform_certificates.clone();
        let signing = published
            .first()
            .filter(|_| world.wechat_sign_with_certificate)
            .map(|c| c.serial.clone());
        Arc::new(Self {
            keys,
            world: Mutex::new(world),
            faults,
            received: Mutex::new(Vec::new()),
            list_window: Mutex::new(std::collections::VecDeque::new()),
            authinfo_window: Mutex::new(std::collections::VecDeque::new()),
            wechat_certificates: Mutex::new(WechatCertificates {
                published,
                withdrawn: Vec::new(),
                signing,
            }),
        })
    }

    // === WeChat Pay's platform certificates ===

    /// The platform certificates WeChat Pay publishes now.
    pub fn platform_certificates(&self) -> Vec<SandboxCertificate> {
        lock(&self.wechat_certificates).published.clone()
    }

    /// Publishes one more platform certificate (a rotation begins); returns its serial.
    pub fn publish_platform_certificate(&self, certificate: SandboxCertificate) -> String {
        let serial = certificate.serial.clone();
        lock(&self.wechat_certificates).published.push(certificate);
        serial
    }

    /// Stops publishing the certificate `serial` (a rotation ends); answers may still be signed
    /// with it ([`sign_with_certificate`](Self::sign_with_certificate)).
    pub fn withdraw_platform_certificate(&self, serial: &str) {
        let mut certificates = lock(&self.wechat_certificates);
        let (gone, kept) = std::mem::take(&mut certificates.published)
            .into_iter()
            .partition(|c| c.serial == serial);
        certificates.published = kept;
        certificates.withdrawn.extend::<Vec<_>>(gone);
    }

    /// Signs answers with the certificate `serial` from now on (`None`: the public key).
    pub fn sign_with_certificate(&self, serial: Option<&str>) {
        lock(&self.wechat_certificates).signing = serial.map(str::to_owned);
    }

    /// Signs `message` as WeChat Pay does now: the serial it names and the base64 signature.
    pub(crate) fn wechat_sign(
        &self,
        message: &[u8],
    ) -> Result<(String, String), crate::crypto::CryptoError> {
        let certificate = {
            let certificates = lock(&self.wechat_certificates);
            certificates.signing.as_ref().and_then(|serial| {
                certificates
                    .published
                    .iter()
                    .chain(&certificates.withdrawn)
                    .find(|c| &c.serial == serial)
                    .cloned()
            })
        };
        match certificate {
            Some(c) => Ok((c.serial.clone(), c.signer.sign_base64(message)?)),
            None => Ok((
                self.keys.wechat_platform_key_id.clone(),
                self.keys.wechat_platform_key.sign_base64(message)?,
            )),
        }
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
        use crate::crypto::test_key;
        let (keys, secrets) =
            SandboxKeys::from_rsa_keys(test_key(0), test_key(1), test_key(2), test_key(3))
                .expect("keys");
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
