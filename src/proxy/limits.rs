//! Request limits, checked before anything is forwarded: a token bucket per device and route
//! (a terminal's budget, sized from the daemon's schedule), and a ceiling per merchant and
//! platform on the calls terminals cause (so that one terminal, or a fleet gone wrong, cannot
//! spend the merchant's platform quota, and the fleet sync keeps its share of WeChat Pay's).
//!
//! Owns: the buckets' arithmetic (GCRA: one "theoretical arrival time" per bucket, exact and one
//! number to store), the keys, the policy that maps a route or platform to its bucket, and the
//! refusal log (one line per device per [`LOG_INTERVAL`], with the count it stands for). The
//! counts live behind [`RateLimitStore`]: [`MemoryLimits`] holds them in this process; a store
//! shared by replicas (Redis, `[cluster]`) implements the same one call. It must not answer
//! HTTP: the routes map [`Limited`] to their 429.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::sync::lock;

/// The shortest time between two log lines about one device's refused requests.
pub const LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Default burst of `POST /v1/authinfo` per device: an outage's first ten minutes of retries
/// (backoff 5 s doubling to 5 min: 7 attempts) plus the hourly refresh and a few forced ones.
pub const DEFAULT_AUTHINFO_BURST: u32 = 20;
/// Default refill of `POST /v1/authinfo` per device: one every 2 minutes (30 an hour), above
/// what a daemon retrying at its 5-minute backoff ceiling with full jitter sends on average
/// (one per 150 s) and 30 times its hourly refresh.
pub const DEFAULT_AUTHINFO_EVERY: Duration = Duration::from_secs(120);
/// Default burst of each health route (`/v1/inspection`, `/v1/alipay-binding`, `/v1/licence`)
/// per device: the daily check, its retries in a short outage, and restarts.
pub const DEFAULT_HEALTH_BURST: u32 = 10;
/// Default refill of each health route per device: one every 10 minutes (the checks run daily).
pub const DEFAULT_HEALTH_EVERY: Duration = Duration::from_secs(600);
/// Default ceiling of WeChat Pay calls a second for the merchant, the fleet sync's included:
/// terminals get what `fleet.requests_per_second` leaves (80 with the defaults).
pub const DEFAULT_WECHATPAY_PER_SECOND: u32 = 100;
/// Default ceiling of Alipay calls a second caused by terminals.
pub const DEFAULT_ALIPAY_PER_SECOND: u32 = 20;
/// Default ceiling of Alibaba Cloud calls a second caused by terminals.
pub const DEFAULT_ALIYUN_PER_SECOND: u32 = 20;

// === buckets and keys ===

/// A token bucket: holds up to `burst` requests, refilled with one every `every`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    pub burst: u32,
    pub every: Duration,
}

impl Bucket {
    /// `per_second` a second, with a burst of as many.
    pub fn per_second(per_second: u32) -> Self {
        let per_second = per_second.max(1);
        Self {
            burst: per_second,
            every: Duration::from_secs(1) / per_second,
        }
    }

    /// The requests an hour it admits when used steadily.
    pub fn per_hour(&self) -> f64 {
        3600.0 / self.every.as_secs_f64().max(f64::MIN_POSITIVE)
    }
}

/// The terminal routes that have a per-device bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LimitedRoute {
    Authinfo,
    Inspection,
    AlipayBinding,
    Licence,
}

impl LimitedRoute {
    pub const ALL: [Self; 4] = [
        Self::Authinfo,
        Self::Inspection,
        Self::AlipayBinding,
        Self::Licence,
    ];

    /// The route's path (the metric label).
    pub fn path(self) -> &'static str {
        match self {
            Self::Authinfo => crate::wire::ROUTE_AUTHINFO,
            Self::Inspection => crate::wire::ROUTE_INSPECTION,
            Self::AlipayBinding => crate::wire::ROUTE_ALIPAY_BINDING,
            Self::Licence => crate::wire::ROUTE_LICENCE,
        }
    }

    /// The route matched by the router, if it is one of these.
    pub fn of_path(path: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.path() == path)
    }
}

/// The platforms terminals cause calls to, each with its own ceiling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Platform {
    WechatPay,
    Alipay,
    Aliyun,
}

impl Platform {
    /// The platform's name in metrics, logs and error bodies.
    pub fn name(self) -> &'static str {
        match self {
            Self::WechatPay => "wechatpay",
            Self::Alipay => "alipay",
            Self::Aliyun => "aliyun",
        }
    }
}

/// What a bucket is kept for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LimitKey {
    /// One device's requests on one route.
    Device {
        device_id: String,
        route: LimitedRoute,
    },
    /// The merchant's calls to one platform caused by terminals.
    Merchant { platform: Platform },
}

impl std::fmt::Display for LimitKey {
    /// A stable text form, for a shared store's keys: `device/<id><route>`, `merchant/<platform>`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Device { device_id, route } => write!(f, "device/{device_id}{}", route.path()),
            Self::Merchant { platform } => write!(f, "merchant/{}", platform.name()),
        }
    }
}

/// A bucket's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    /// Empty: the next request fits after this long.
    Limited {
        retry_after: Duration,
    },
}

/// Why a store could not answer (a shared store that is down).
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("the shared limit store failed: {0}")]
    Shared(String),
}

/// What a [`RateLimitStore`] answers.
pub type LimitFuture<'a> = Pin<Box<dyn Future<Output = Result<Admission, LimitError>> + Send + 'a>>;

/// Where the buckets live: [`MemoryLimits`] for one proxy; a store shared by replicas (Redis,
/// `[cluster]`, issue 16) implements the same call, keyed by [`LimitKey`]'s text form, so that
/// replicas behind a load balancer share one budget per device and per merchant.
pub trait RateLimitStore: Send + Sync + std::fmt::Debug {
    /// Takes one request from the bucket `key` (shaped as `bucket`), or says how long until one
    /// fits. Atomic per key.
    fn take<'a>(&'a self, key: &'a LimitKey, bucket: Bucket) -> LimitFuture<'a>;
}

/// The GCRA step: a bucket whose next request is "due" at `tat` (theoretical arrival time)
/// admits one at `now` unless `tat` is more than `burst - 1` refills ahead; admitting moves
/// `tat` one refill on. Returns the new `tat`, or the wait.
pub fn gcra(tat: Option<Instant>, now: Instant, bucket: Bucket) -> Result<Instant, Duration> {
    let tat = tat.map_or(now, |t| t.max(now));
    let tolerance = bucket.every * bucket.burst.saturating_sub(1);
    let ahead = tat - now;
    if ahead > tolerance {
        return Err(ahead - tolerance);
    }
    Ok(tat + bucket.every)
}

/// The buckets in this process (tokio's clock, so tests can pause it). Keys come from
/// authenticated devices and configured platforms only, so the map is bounded by the registry.
#[derive(Debug, Default)]
pub struct MemoryLimits {
    tats: Mutex<HashMap<LimitKey, Instant>>,
}

impl RateLimitStore for MemoryLimits {
    fn take<'a>(&'a self, key: &'a LimitKey, bucket: Bucket) -> LimitFuture<'a> {
        let now = Instant::now();
        let mut tats = lock(&self.tats);
        let admission = match gcra(tats.get(key).copied(), now, bucket) {
            Ok(tat) => {
                tats.insert(key.clone(), tat);
                Admission::Admitted
            }
            Err(retry_after) => Admission::Limited { retry_after },
        };
        Box::pin(std::future::ready(Ok(admission)))
    }
}

/// The buckets in the replicas' Redis (`[cluster]`): one GCRA time per key on Redis's clock,
/// so a device's budget and the merchant's ceilings are shared by every replica.
#[derive(Debug)]
pub struct SharedLimits {
    cluster: Arc<crate::proxy::cluster::Cluster>,
}

impl SharedLimits {
    pub fn new(cluster: Arc<crate::proxy::cluster::Cluster>) -> Self {
        Self { cluster }
    }
}

impl RateLimitStore for SharedLimits {
    fn take<'a>(&'a self, key: &'a LimitKey, bucket: Bucket) -> LimitFuture<'a> {
        Box::pin(async move {
            let wait = self
                .cluster
                .gcra(&format!("limit:{key}"), bucket.every, bucket.burst)
                .await
                .map_err(|e| LimitError::Shared(e.to_string()))?;
            Ok(match wait {
                None => Admission::Admitted,
                Some(retry_after) => Admission::Limited { retry_after },
            })
        })
    }
}

// === the policy ===

/// The limits as configured (`[limits]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsConfig {
    /// `POST /v1/authinfo`, per device.
    pub authinfo: Bucket,
    /// Each health route, per device.
    pub health: Bucket,
    /// WeChat Pay calls a second for the merchant, the fleet sync's included.
    pub wechatpay_per_second: u32,
    pub alipay_per_second: u32,
    pub aliyun_per_second: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            authinfo: Bucket {
                burst: DEFAULT_AUTHINFO_BURST,
                every: DEFAULT_AUTHINFO_EVERY,
            },
            health: Bucket {
                burst: DEFAULT_HEALTH_BURST,
                every: DEFAULT_HEALTH_EVERY,
            },
            wechatpay_per_second: DEFAULT_WECHATPAY_PER_SECOND,
            alipay_per_second: DEFAULT_ALIPAY_PER_SECOND,
            aliyun_per_second: DEFAULT_ALIYUN_PER_SECOND,
        }
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Limited {
    /// The device spent its bucket on this route.
    Device {
        route: LimitedRoute,
        bucket: Bucket,
        retry_after: Duration,
    },
    /// Terminals together reached the merchant's ceiling on this platform.
    Merchant {
        platform: Platform,
        per_second: u32,
        retry_after: Duration,
    },
}

impl Limited {
    pub fn retry_after(&self) -> Duration {
        match self {
            Self::Device { retry_after, .. } | Self::Merchant { retry_after, .. } => *retry_after,
        }
    }
}

impl std::fmt::Display for Limited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Device { route, bucket, .. } => write!(
                f,
                "this device sent more than its limit on {}: {} at once, then one every {}",
                route.path(),
                bucket.burst,
                crate::units::format_duration(bucket.every)
            ),
            Self::Merchant {
                platform,
                per_second,
                ..
            } => write!(
                f,
                "the merchant's terminals together reached the ceiling of {per_second} {} calls a second",
                platform.name()
            ),
        }
    }
}

/// The limits of a running proxy: the policy, its store, and the refusal log.
#[derive(Debug)]
pub struct Limits {
    config: LimitsConfig,
    /// WeChat Pay calls a second left to terminals by the fleet sync.
    wechatpay_terminals: u32,
    store: Arc<dyn RateLimitStore>,
    log: Mutex<HashMap<String, RefusalLine>>,
}

/// One device's refusal log: when its last line was written and what was refused since.
#[derive(Debug)]
struct RefusalLine {
    logged_at: Instant,
    suppressed: u64,
}

impl Limits {
    /// `config` over `store`; `fleet_per_second` WeChat Pay calls a second are kept for the
    /// fleet sync (0 when it is off).
    pub fn new(
        config: LimitsConfig,
        fleet_per_second: u32,
        store: Arc<dyn RateLimitStore>,
    ) -> Self {
        let wechatpay_terminals = config
            .wechatpay_per_second
            .saturating_sub(fleet_per_second)
            .max(1);
        Self {
            config,
            wechatpay_terminals,
            store,
            log: Mutex::new(HashMap::new()),
        }
    }

    pub fn config(&self) -> &LimitsConfig {
        &self.config
    }

    /// The bucket of `route` for one device.
    pub fn device_bucket(&self, route: LimitedRoute) -> Bucket {
        match route {
            LimitedRoute::Authinfo => self.config.authinfo,
            _ => self.config.health,
        }
    }

    /// The ceiling on `platform` calls a second caused by terminals.
    pub fn merchant_per_second(&self, platform: Platform) -> u32 {
        match platform {
            Platform::WechatPay => self.wechatpay_terminals,
            Platform::Alipay => self.config.alipay_per_second,
            Platform::Aliyun => self.config.aliyun_per_second,
        }
    }

    /// Takes one request of `device_id` on `route`.
    pub async fn admit_device(&self, device_id: &str, route: LimitedRoute) -> Result<(), Limited> {
        let bucket = self.device_bucket(route);
        let key = LimitKey::Device {
            device_id: device_id.to_owned(),
            route,
        };
        match self.take(&key, bucket).await {
            Admission::Admitted => Ok(()),
            Admission::Limited { retry_after } => Err(Limited::Device {
                route,
                bucket,
                retry_after,
            }),
        }
    }

    /// Takes one terminal-caused call to `platform` from the merchant's ceiling.
    pub async fn admit_platform(&self, platform: Platform) -> Result<(), Limited> {
        let per_second = self.merchant_per_second(platform);
        let key = LimitKey::Merchant { platform };
        match self.take(&key, Bucket::per_second(per_second)).await {
            Admission::Admitted => Ok(()),
            Admission::Limited { retry_after } => Err(Limited::Merchant {
                platform,
                per_second,
                retry_after,
            }),
        }
    }

    /// A store that cannot answer admits the request (payments must not stop because the
    /// limit's store is down) and says so at error level.
    async fn take(&self, key: &LimitKey, bucket: Bucket) -> Admission {
        match self.store.take(key, bucket).await {
            Ok(admission) => admission,
            Err(error) => {
                tracing::error!(%error, key = %key, "rate limit unknown; admitting the request");
                Admission::Admitted
            }
        }
    }

    /// Whether to write a log line for a refusal of `device_id` now: the first refusal, then at
    /// most one per [`LOG_INTERVAL`]. Returns the refusals the line stands for (itself and
    /// those not logged since the last line).
    pub fn refusal_to_log(&self, device_id: &str) -> Option<u64> {
        let now = Instant::now();
        let mut log = lock(&self.log);
        let Some(line) = log.get_mut(device_id) else {
            log.insert(
                device_id.to_owned(),
                RefusalLine {
                    logged_at: now,
                    suppressed: 0,
                },
            );
            return Some(1);
        };
        line.suppressed += 1;
        if now.duration_since(line.logged_at) < LOG_INTERVAL {
            return None;
        }
        line.logged_at = now;
        Some(std::mem::take(&mut line.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(device: &str) -> LimitKey {
        LimitKey::Device {
            device_id: device.into(),
            route: LimitedRoute::Authinfo,
        }
    }

    async fn take(store: &MemoryLimits, key: &LimitKey, bucket: Bucket) -> Admission {
        store.take(key, bucket).await.expect("memory never fails")
    }

    /// A bucket of 3 refilled every 10 s admits 3 at once, then one per 10 s; a refusal says
    /// how long until the next fits, and other keys are not touched.
    #[tokio::test(start_paused = true)]
    async fn a_bucket_admits_its_burst_then_one_per_refill() {
        let store = MemoryLimits::default();
        let bucket = Bucket {
            burst: 3,
            every: Duration::from_secs(10),
        };
        let a = key("A");
        for _ in 0..3 {
            assert_eq!(take(&store, &a, bucket).await, Admission::Admitted);
        }
        assert_eq!(
            take(&store, &a, bucket).await,
            Admission::Limited {
                retry_after: Duration::from_secs(10)
            }
        );
        assert_eq!(take(&store, &key("B"), bucket).await, Admission::Admitted);
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(
            take(&store, &a, bucket).await,
            Admission::Limited {
                retry_after: Duration::from_secs(6)
            },
            "a refusal takes nothing"
        );
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(take(&store, &a, bucket).await, Admission::Admitted);
        assert!(matches!(
            take(&store, &a, bucket).await,
            Admission::Limited { .. }
        ));
        // Idle for long: full again, never more than the burst.
        tokio::time::advance(Duration::from_secs(3600)).await;
        let admitted = {
            let mut n = 0;
            while take(&store, &a, bucket).await == Admission::Admitted {
                n += 1;
            }
            n
        };
        assert_eq!(admitted, 3);
    }

    /// Over 10 simulated minutes of one request every 100 ms, the default authinfo bucket admits
    /// its burst plus one per refill since, and no more.
    #[tokio::test(start_paused = true)]
    async fn a_flood_gets_the_burst_plus_the_refills() {
        let store = MemoryLimits::default();
        let bucket = Bucket {
            burst: DEFAULT_AUTHINFO_BURST,
            every: DEFAULT_AUTHINFO_EVERY,
        };
        let a = key("A");
        let mut admitted = 0;
        for _ in 0..6000 {
            if take(&store, &a, bucket).await == Admission::Admitted {
                admitted += 1;
            }
            tokio::time::advance(Duration::from_millis(100)).await;
        }
        // The burst at once, then one each at 120, 240, 360 and 480 s.
        assert_eq!(admitted, 20 + 4, "{admitted}");
    }

    #[test]
    fn per_second_buckets_and_key_text() {
        let b = Bucket::per_second(80);
        assert_eq!(b.burst, 80);
        assert_eq!(b.every, Duration::from_micros(12_500));
        assert_eq!(Bucket::per_second(0).burst, 1, "never a zero bucket");
        assert_eq!(key("T-1").to_string(), "device/T-1/v1/authinfo");
        assert_eq!(
            LimitKey::Merchant {
                platform: Platform::WechatPay
            }
            .to_string(),
            "merchant/wechatpay"
        );
        assert_eq!(
            LimitedRoute::of_path("/v1/licence"),
            Some(LimitedRoute::Licence)
        );
        assert_eq!(LimitedRoute::of_path("/v1/nothing"), None);
        assert!((LimitsConfig::default().authinfo.per_hour() - 30.0).abs() < 1e-9);
    }

    /// The fleet sync keeps its share of WeChat Pay's ceiling; the terminals get the rest.
    #[tokio::test(start_paused = true)]
    async fn terminals_get_the_ceiling_less_the_fleet_syncs_share() {
        let limits = Limits::new(
            LimitsConfig {
                wechatpay_per_second: 25,
                ..LimitsConfig::default()
            },
            20,
            Arc::new(MemoryLimits::default()),
        );
        assert_eq!(limits.merchant_per_second(Platform::WechatPay), 5);
        let mut admitted = 0;
        while limits.admit_platform(Platform::WechatPay).await.is_ok() {
            admitted += 1;
        }
        assert_eq!(admitted, 5);
        let refused = limits
            .admit_platform(Platform::WechatPay)
            .await
            .expect_err("full");
        assert!(
            refused.retry_after() <= Duration::from_millis(200),
            "{refused:?}"
        );
        assert!(
            limits.admit_platform(Platform::Alipay).await.is_ok(),
            "its own ceiling"
        );
    }

    /// A device refused all the time is logged once per interval, each line counting the
    /// refusals since the last.
    #[tokio::test(start_paused = true)]
    async fn refusals_are_logged_once_per_device_per_interval() {
        let limits = Limits::new(
            LimitsConfig::default(),
            0,
            Arc::new(MemoryLimits::default()),
        );
        let mut lines = Vec::new();
        for _ in 0..1500 {
            if let Some(n) = limits.refusal_to_log("A") {
                lines.push(n);
            }
            tokio::time::advance(Duration::from_millis(100)).await;
        }
        assert_eq!(lines, [1, 600, 600], "at 0, 60 and 120 s");
        assert_eq!(limits.refusal_to_log("B"), Some(1), "another device");
    }
}
