//! The merchant's fleet as WeChat Pay lists it (`GET /v3/iotmanage/devices`): paged sync within
//! the documented limits, a cache in the proxy's store that survives restarts, and the lookup
//! the routes use to refuse devices that are not listed or not activated.
//!
//! Owns: paging (limit 100, following `offset`/`total_count`), pacing (at most
//! `requests_per_second` in any one-second window, backing off on 429), the day's budget of
//! `requests_per_day` ([`DailyBudget`]: counted per merchant in the store, not per process, so
//! restarts, `devices --live` and the running proxy share it), the cache, and the sync schedule.
//! It must not decide what a refused device gets; the routes map [`FleetStatus`] to an answer.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub mod list;

pub use self::list::{
    FleetIndex, FleetSnapshot, FleetStatus, columns, display_width, is_activated, render_table,
};
use super::cluster::{Cluster, ClusterError};
use super::store::{Store, StoreError};
use crate::platform::FailureClass;
use crate::platform::wechatpay::{Device, MAX_PAGE_LIMIT, WechatPayClient, WechatPayError};
use crate::sync::{lock, read, write};
use crate::units::unix_now;

/// The most pages one sync reads (100 000 devices): a guard against a list that never ends.
const MAX_PAGES: u64 = 1000;
/// How often one page is retried after a 429 before the sync gives up.
const MAX_RATE_LIMITED_RETRIES: u32 = 6;

/// Why a sync failed.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("listing devices failed at offset {offset}")]
    List {
        offset: u64,
        #[source]
        source: Box<WechatPayError>,
    },
    #[error(
        "the daily budget of {limit} device-list requests is spent for {day} (Beijing time; it \
         is counted for the merchant, across restarts and `devices --live`)"
    )]
    DailyBudget { limit: u32, day: String },
    #[error("the device list did not end within {MAX_PAGES} pages")]
    TooManyPages,
    #[error("the replicas' Redis failed")]
    Cluster(#[from] ClusterError),
    #[error(
        "another replica ({}) holds the fleet-sync lease and pages the list; its list is shared through Redis",
        holder.as_deref().unwrap_or("unknown")
    )]
    LeaseHeld { holder: Option<String> },
    #[error("this replica lost the fleet-sync lease while paging; the replica that took it syncs")]
    LeaseLost,
}

/// Why the running proxy did not sync on an admin's `POST /fleet/sync` (the admin listener's
/// error body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRefusal {
    pub code: SyncRefusalCode,
    pub message: String,
}

/// The kinds of [`SyncRefusal`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SyncRefusalCode {
    /// The day's device-list budget is spent.
    DailyBudgetSpent,
    /// WeChat Pay or the store failed part-way; the cached list is unchanged.
    SyncFailed,
    /// Another replica holds the fleet-sync lease (`[cluster]`): it pages the list, and this
    /// replica takes its list from Redis.
    LeaseHeld,
}

impl std::fmt::Display for SyncRefusalCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::DailyBudgetSpent => "DAILY_BUDGET_SPENT",
            Self::LeaseHeld => "LEASE_HELD",
            Self::SyncFailed => "SYNC_FAILED",
        })
    }
}

impl From<&FleetError> for SyncRefusal {
    fn from(error: &FleetError) -> Self {
        Self {
            code: match error {
                FleetError::DailyBudget { .. } => SyncRefusalCode::DailyBudgetSpent,
                FleetError::LeaseHeld { .. } => SyncRefusalCode::LeaseHeld,
                _ => SyncRefusalCode::SyncFailed,
            },
            message: crate::error_chain(error),
        }
    }
}

// === the daily budget ===

/// Unix seconds now, or a test's clock.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(unix_now)
}

/// The calendar day (`YYYY-MM-DD`) of `unix` in Beijing time (UTC+8, no daylight saving): the
/// day WeChat Pay's daily limits are counted in.
pub fn beijing_day(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .map(|t| t.to_offset(time::macros::offset!(+8)).date())
        .map_or_else(|_| format!("@{unix}"), crate::platform::aliyun::format_day)
}

/// What a [`DailyBudget`] answers.
pub type BudgetFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, FleetError>> + Send + 'a>>;

/// The day's device-list budget of one merchant: WeChat Pay allows `requests_per_day` list
/// requests a day per merchant, whoever makes them, so the count must live where everything that
/// pages the list for the merchant sees it. Implemented by [`StoredBudget`] (the proxy's sled
/// store: one proxy, its restarts and `devices --live`) and [`MemoryBudget`] (tests); a store
/// shared by replicas (Redis, `[cluster]`) implements the same two calls.
pub trait DailyBudget: Send + Sync + std::fmt::Debug {
    /// Counts one request against today's `limit`, durably, before it is sent; refuses with
    /// [`FleetError::DailyBudget`] once `limit` were counted today.
    fn take(&self, limit: u32) -> BudgetFuture<'_, ()>;
    /// The requests counted today.
    fn used(&self) -> BudgetFuture<'_, u32>;
}

/// The budget kept in the proxy's store (one key per Beijing day, flushed on every request).
#[derive(Clone)]
pub struct StoredBudget {
    store: Store,
    clock: Clock,
}

impl std::fmt::Debug for StoredBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredBudget")
            .field("store", &self.store.path())
            .finish_non_exhaustive()
    }
}

impl StoredBudget {
    pub fn new(store: Store, clock: Clock) -> Self {
        Self { store, clock }
    }
}

impl DailyBudget for StoredBudget {
    fn take(&self, limit: u32) -> BudgetFuture<'_, ()> {
        Box::pin(async move {
            let day = beijing_day((self.clock)());
            let before = self.store.take_budget(&day, limit).await?;
            if before >= limit {
                return Err(FleetError::DailyBudget { limit, day });
            }
            Ok(())
        })
    }

    fn used(&self) -> BudgetFuture<'_, u32> {
        Box::pin(async move { Ok(self.store.budget_used(&beijing_day((self.clock)()))?) })
    }
}

/// The budget in the replicas' Redis (`[cluster]`): one count per Beijing day for the merchant,
/// whichever replica (or `devices --live`) pages.
#[derive(Clone)]
pub struct SharedBudget {
    cluster: Arc<Cluster>,
    clock: Clock,
}

impl std::fmt::Debug for SharedBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedBudget")
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

/// How long a day's count is kept in Redis (the day and the next, for a clock near midnight).
const BUDGET_TTL: Duration = Duration::from_secs(2 * 86_400);

impl SharedBudget {
    pub fn new(cluster: Arc<Cluster>, clock: Clock) -> Self {
        Self { cluster, clock }
    }
}

impl DailyBudget for SharedBudget {
    fn take(&self, limit: u32) -> BudgetFuture<'_, ()> {
        Box::pin(async move {
            let day = beijing_day((self.clock)());
            let before = self
                .cluster
                .take_count(&format!("budget:{day}"), limit, BUDGET_TTL)
                .await?;
            if before >= limit {
                return Err(FleetError::DailyBudget { limit, day });
            }
            Ok(())
        })
    }

    fn used(&self) -> BudgetFuture<'_, u32> {
        Box::pin(async move {
            let day = beijing_day((self.clock)());
            Ok(self.cluster.count(&format!("budget:{day}")).await?)
        })
    }
}

/// A budget in memory: this process only (tests).
pub struct MemoryBudget {
    today: Mutex<(String, u32)>,
    clock: Clock,
}

impl std::fmt::Debug for MemoryBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBudget")
            .field("today", &*lock(&self.today))
            .finish_non_exhaustive()
    }
}

impl MemoryBudget {
    pub fn new(clock: Clock) -> Self {
        Self {
            today: Mutex::new((String::new(), 0)),
            clock,
        }
    }
}

impl DailyBudget for MemoryBudget {
    fn take(&self, limit: u32) -> BudgetFuture<'_, ()> {
        let day = beijing_day((self.clock)());
        let mut today = lock(&self.today);
        if today.0 != day {
            *today = (day.clone(), 0);
        }
        let result = if today.1 >= limit {
            Err(FleetError::DailyBudget { limit, day })
        } else {
            today.1 += 1;
            Ok(())
        };
        Box::pin(std::future::ready(result))
    }

    fn used(&self) -> BudgetFuture<'_, u32> {
        let day = beijing_day((self.clock)());
        let today = lock(&self.today);
        let used = if today.0 == day { today.1 } else { 0 };
        Box::pin(std::future::ready(Ok(used)))
    }
}

// === pacing ===

/// How long after a request has completed it still counts against the per-second limit, beyond
/// the second itself: a margin for the platform's clock and for how long the answer took to come
/// back (the platform counts a request when it arrives, somewhere between our send and our
/// receipt of the answer).
const SECOND_WINDOW_MARGIN: Duration = Duration::from_millis(100);

/// Paces device-list requests: at most `per_second` in any one-second window *as the platform
/// counts them*, and `per_day` a day as counted by the [`DailyBudget`]. One limiter is shared by
/// every sync of this process.
///
/// A request is counted from the moment it is admitted until one second (plus
/// [`SECOND_WINDOW_MARGIN`]) after its answer came back ([`Permit`] is dropped). Whatever the
/// network delay does, the platform then never sees more than `per_second` arrivals in a second:
/// if it saw `per_second + 1` within one second, the last of them to be admitted was admitted
/// while the other `per_second` were in flight or had completed less than a second before
/// (their arrivals lie in that second, and each completes after it arrives), so the limiter was
/// full and could not have admitted it. Counting from the send instead (as before) let a slow
/// first request (TCP and TLS set-up) arrive late and land in the same second as its successors.
#[derive(Debug)]
pub struct RateLimiter {
    per_second: u32,
    per_day: u32,
    second: Mutex<SecondWindow>,
    budget: Arc<dyn DailyBudget>,
    /// Woken when a request completes (a slot may have opened).
    completed: tokio::sync::Notify,
    /// The replicas' pacing in Redis, when clustered: a request is also taken from one shared
    /// bucket, so replicas together stay within `per_second` (during a lease hand-over, say).
    shared_pace: Option<Arc<Cluster>>,
}

/// The per-second window: requests in flight and completion times of the last second.
#[derive(Debug, Default)]
struct SecondWindow {
    in_flight: u32,
    /// Completion times, oldest first.
    completed: VecDeque<Instant>,
}

/// One admitted request; counts as in flight until dropped, then for one more second.
#[derive(Debug)]
#[must_use = "the request counts as in flight until the permit is dropped"]
pub struct Permit<'a> {
    limiter: &'a RateLimiter,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut window = lock(&self.limiter.second);
        window.in_flight = window.in_flight.saturating_sub(1);
        window.completed.push_back(Instant::now());
        drop(window);
        self.limiter.completed.notify_waiters();
    }
}

impl RateLimiter {
    /// `per_second` in any second, `per_day` a day counted in `budget`.
    pub fn new(per_second: u32, per_day: u32, budget: Arc<dyn DailyBudget>) -> Self {
        Self {
            per_second: per_second.max(1),
            per_day: per_day.max(1),
            second: Mutex::new(SecondWindow::default()),
            budget,
            completed: tokio::sync::Notify::new(),
            shared_pace: None,
        }
    }

    /// Paces in the replicas' Redis too, on a bucket of one request every
    /// `(1 s + margin) / per_second`: at most `per_second` in any second across replicas.
    pub fn shared(mut self, cluster: Arc<Cluster>) -> Self {
        self.shared_pace = Some(cluster);
        self
    }

    /// The day's budget this limiter counts in.
    pub fn budget(&self) -> &dyn DailyBudget {
        &*self.budget
    }

    /// Waits until one more request fits in the per-second window, then counts it; hold the
    /// permit until the answer is in. The request is taken from the daily budget first, and
    /// the call fails at once when that is spent (waiting hours inside a sync helps nobody).
    pub async fn acquire(&self) -> Result<Permit<'_>, FleetError> {
        self.budget.take(self.per_day).await?;
        let hold = Duration::from_secs(1) + SECOND_WINDOW_MARGIN;
        if let Some(cluster) = &self.shared_pace {
            while let Some(wait) = cluster
                .gcra("fleet:pace", hold / self.per_second, 1)
                .await?
            {
                tokio::time::sleep(wait).await;
            }
        }
        loop {
            // Registered before the window is read, so a completion in between still wakes us.
            let completed = self.completed.notified();
            let wait = {
                let mut window = lock(&self.second);
                let now = Instant::now();
                while window
                    .completed
                    .front()
                    .is_some_and(|t| now.duration_since(*t) >= hold)
                {
                    window.completed.pop_front();
                }
                let counted = window.in_flight as usize + window.completed.len();
                if counted < self.per_second as usize {
                    window.in_flight += 1;
                    return Ok(Permit { limiter: self });
                }
                // Full: the oldest completion leaves the window, or a request in flight
                // completes, whichever comes first.
                window
                    .completed
                    .front()
                    .map(|t| hold.saturating_sub(now.duration_since(*t)))
            };
            match wait {
                Some(wait) => {
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = completed => {}
                    }
                }
                None => completed.await,
            }
        }
    }
}

/// The fleet: the last synced list in memory, cached in the proxy's store, and the pacing of
/// every request for it.
#[derive(Debug)]
pub struct Fleet {
    /// The list and the index derived from it, swapped together under one lock: a reader never
    /// sees a new index with an old list.
    current: RwLock<Arc<Indexed>>,
    store: Store,
    limiter: RateLimiter,
    /// One sync at a time (the schedule's and an admin's `POST /fleet/sync`): two would page
    /// the same list twice over, in one budget.
    syncing: tokio::sync::Mutex<()>,
    /// Syncs that succeeded, so a caller that waited for one knows it has a fresh list.
    synced: std::sync::atomic::AtomicU64,
    /// The replicas' Redis, when clustered: a sync needs the lease, and the list is shared.
    shared: Option<Arc<Cluster>>,
}

/// The name of the fleet-sync lease in Redis.
pub const LEASE: &str = "fleet:lease";
/// The name of the shared fleet list in Redis.
const SHARED_LIST: &str = "fleet:list";
/// When the shared list was synced (Unix seconds), written after it: replicas read this small
/// key every step and fetch the list (megabytes for a large fleet) only when it is newer.
const SHARED_SYNCED_AT: &str = "fleet:synced_at";

/// A synced list and its lookup by serial (activated or not).
#[derive(Debug, Default)]
struct Indexed {
    snapshot: Arc<FleetSnapshot>,
    by_sn: HashMap<String, bool>,
}

impl Indexed {
    fn new(snapshot: FleetSnapshot) -> Self {
        let by_sn = snapshot
            .devices
            .iter()
            .filter_map(|d| d.device_sn.clone().map(|sn| (sn, is_activated(d))))
            .collect();
        Self {
            snapshot: Arc::new(snapshot),
            by_sn,
        }
    }
}

impl Fleet {
    /// The fleet cached in `store` (an undecodable cache is ignored: the next sync replaces it),
    /// paced at `per_second`, with `per_day` counted in the store.
    pub fn new(store: Store, per_second: u32, per_day: u32) -> Result<Self, FleetError> {
        let budget = Arc::new(StoredBudget::new(store.clone(), system_clock()));
        Self::with_limiter(store, RateLimiter::new(per_second, per_day, budget))
    }

    /// The fleet cached in `store`, paced by `limiter` (tests give it their own budget).
    pub fn with_limiter(store: Store, limiter: RateLimiter) -> Result<Self, FleetError> {
        let snapshot = store.fleet()?.unwrap_or_default();
        let fleet = Self {
            current: RwLock::new(Arc::new(Indexed::default())),
            store,
            limiter,
            syncing: tokio::sync::Mutex::new(()),
            synced: std::sync::atomic::AtomicU64::new(0),
            shared: None,
        };
        fleet.install(snapshot);
        Ok(fleet)
    }

    /// The fleet of one replica among several (`[cluster]`): its list cached in `store` too (a
    /// replica that starts while Redis is down has its last list), the budget and the pacing in
    /// `cluster`, a sync only under the lease.
    pub fn clustered(
        store: Store,
        cluster: Arc<Cluster>,
        per_second: u32,
        per_day: u32,
    ) -> Result<Self, FleetError> {
        let budget = Arc::new(SharedBudget::new(cluster.clone(), system_clock()));
        let limiter = RateLimiter::new(per_second, per_day, budget).shared(cluster.clone());
        let mut fleet = Self::with_limiter(store, limiter)?;
        fleet.shared = Some(cluster);
        Ok(fleet)
    }

    /// [`Fleet::clustered`] with a cluster, else [`Fleet::new`].
    pub fn open(
        store: Store,
        cluster: Option<Arc<Cluster>>,
        per_second: u32,
        per_day: u32,
    ) -> Result<Self, FleetError> {
        match cluster {
            Some(cluster) => Self::clustered(store, cluster, per_second, per_day),
            None => Self::new(store, per_second, per_day),
        }
    }

    /// The replicas' Redis, when clustered.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.shared.as_ref()
    }

    /// Takes the list stored in Redis when it is newer than this replica's (a follower's step;
    /// the holder wrote it), given `shared_at`, what [`Self::shared_synced_at`] read this step.
    /// Returns whether it was taken.
    pub async fn adopt_shared(&self, shared_at: Option<i64>) -> Result<bool, FleetError> {
        let (Some(cluster), Some(at)) = (&self.shared, shared_at) else {
            return Ok(false);
        };
        if Some(at) <= self.snapshot().synced_at {
            return Ok(false);
        }
        let Some(bytes) = cluster.get(SHARED_LIST).await? else {
            return Ok(false);
        };
        let Ok(snapshot) = serde_json::from_slice::<FleetSnapshot>(&bytes) else {
            tracing::warn!(
                "the fleet list in redis does not decode; the lease holder's next sync replaces it"
            );
            return Ok(false);
        };
        if snapshot.synced_at <= self.snapshot().synced_at {
            return Ok(false);
        }
        self.store.save_fleet(&snapshot).await?;
        self.install(snapshot);
        Ok(true)
    }

    /// When the list in Redis was synced (`None`: there is none, as after Redis restarted
    /// empty).
    pub async fn shared_synced_at(&self) -> Result<Option<i64>, FleetError> {
        let Some(cluster) = &self.shared else {
            return Ok(self.snapshot().synced_at);
        };
        Ok(cluster
            .get(SHARED_SYNCED_AT)
            .await?
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|t| t.parse().ok()))
    }

    /// A fleet in a temporary store, with WeChat Pay's limits (tests).
    pub fn in_memory() -> Result<Self, FleetError> {
        Self::new(
            Store::temporary()?,
            crate::platform::wechatpay::LIST_REQUESTS_PER_SECOND,
            crate::platform::wechatpay::LIST_REQUESTS_PER_DAY,
        )
    }

    fn install(&self, snapshot: FleetSnapshot) {
        *write(&self.current) = Arc::new(Indexed::new(snapshot));
    }

    /// The last synced list.
    pub fn snapshot(&self) -> Arc<FleetSnapshot> {
        read(&self.current).snapshot.clone()
    }

    /// What the list says of `device_sn`.
    pub fn status(&self, device_sn: &str) -> FleetStatus {
        let current = read(&self.current).clone();
        if current.snapshot.synced_at.is_none() {
            return FleetStatus::Unknown;
        }
        match current.by_sn.get(device_sn) {
            Some(true) => FleetStatus::Activated,
            Some(false) => FleetStatus::Inactivated,
            None => FleetStatus::Unlisted,
        }
    }

    /// Pages through the whole list and, when every page arrived, replaces the cached one
    /// (store first, then memory). A failure part-way keeps the previous list. A call made while
    /// another sync runs waits for it and, when it succeeded, takes its list instead of paging
    /// again.
    pub async fn sync(&self, client: &WechatPayClient) -> Result<usize, FleetError> {
        use std::sync::atomic::Ordering;
        let succeeded_before = self.synced.load(Ordering::SeqCst);
        let _one_at_a_time = self.syncing.lock().await;
        if self.synced.load(Ordering::SeqCst) != succeeded_before {
            return Ok(self.snapshot().devices.len());
        }
        let devices = match &self.shared {
            None => fetch_all(client, &self.limiter).await?,
            Some(cluster) => under_lease(cluster, fetch_all(client, &self.limiter)).await?,
        };
        let snapshot = FleetSnapshot {
            synced_at: Some(unix_now()),
            devices,
        };
        if let Some(cluster) = &self.shared {
            let bytes = serde_json::to_vec(&snapshot).map_err(|e| StoreError::Encode {
                what: "fleet",
                reason: e.to_string(),
            })?;
            cluster.set(SHARED_LIST, &bytes).await?;
            let at = snapshot.synced_at.unwrap_or_default().to_string();
            cluster.set(SHARED_SYNCED_AT, at.as_bytes()).await?;
        }
        self.store.save_fleet(&snapshot).await?;
        let n = snapshot.devices.len();
        self.install(snapshot);
        self.synced.fetch_add(1, Ordering::SeqCst);
        Ok(n)
    }
}

/// Runs `paging` while this replica holds the fleet-sync lease: taken first (refused with
/// [`FleetError::LeaseHeld`] when another replica holds it), renewed every third of the lease
/// time, and `paging` abandoned with [`FleetError::LeaseLost`] when a renewal fails, so two
/// replicas never page the list at once for longer than a lease.
async fn under_lease<T>(
    cluster: &Cluster,
    paging: impl Future<Output = Result<T, FleetError>>,
) -> Result<T, FleetError> {
    if !cluster.lease(LEASE).await? {
        return Err(FleetError::LeaseHeld {
            holder: cluster.holder(LEASE).await.ok().flatten(),
        });
    }
    let renew = async {
        loop {
            tokio::time::sleep(cluster.config().lease / 3).await;
            match cluster.lease(LEASE).await {
                Ok(true) => {}
                Ok(false) | Err(_) => return,
            }
        }
    };
    tokio::select! {
        result = paging => result,
        () = renew => Err(FleetError::LeaseLost),
    }
}

/// Every page of the device list, paced by `limiter`, retrying a rate-limited page with backoff.
pub async fn fetch_all(
    client: &WechatPayClient,
    limiter: &RateLimiter,
) -> Result<Vec<Device>, FleetError> {
    let mut devices = Vec::new();
    let mut offset = 0;
    for _ in 0..MAX_PAGES {
        let mut retries = 0;
        let page = loop {
            let permit = limiter.acquire().await?;
            let answer = client.list_devices(offset, MAX_PAGE_LIMIT).await;
            drop(permit);
            match answer {
                Ok(page) => break page,
                Err(e)
                    if e.failure().class == FailureClass::RateLimited
                        && retries < MAX_RATE_LIMITED_RETRIES =>
                {
                    retries += 1;
                    let wait = e
                        .failure()
                        .retry_after
                        .unwrap_or(Duration::from_secs(1 << retries.min(5)));
                    tracing::warn!(
                        offset,
                        attempt = retries,
                        backoff_ms = wait.as_millis() as u64,
                        "device list rate-limited; backing off"
                    );
                    tokio::time::sleep(wait).await;
                }
                Err(source) => {
                    return Err(FleetError::List {
                        offset,
                        source: Box::new(source),
                    });
                }
            }
        };
        let next = page.next_offset();
        devices.extend(page.data);
        match next {
            Some(n) => offset = n,
            None => return Ok(devices),
        }
    }
    Err(FleetError::TooManyPages)
}

/// Syncs at start (unless the cache is younger than the interval) and then every interval
/// (up to 10 % early), retrying a failed sync with backoff, until `shutdown`.
pub async fn run_sync(
    fleet: Arc<Fleet>,
    client: Arc<WechatPayClient>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let schedule = sync_schedule(interval, 0.1);
    let age = fleet
        .snapshot()
        .synced_at
        .map(|t| Duration::from_secs(u64::try_from(unix_now() - t).unwrap_or(0)));
    let delay = match age {
        Some(age) if age < interval => interval - age,
        _ => Duration::ZERO,
    };
    super::periodic::repeat(
        schedule,
        delay,
        shutdown,
        crate::events::FLEET_SYNC_FAILED,
        "fleet sync failed; keeping the cached list",
        || async { sync_logged(&fleet, &client, None).await.map(|_| ()) },
    )
    .await;
}

/// The fleet sync's timing: every `interval` (with `jitter`), a failure retried from 30 s
/// doubling to at most 30 min (or the interval).
fn sync_schedule(interval: Duration, jitter: f64) -> crate::schedule::Schedule {
    crate::schedule::Schedule {
        interval,
        jitter,
        backoff_min: Duration::from_secs(30),
        backoff_max: interval.min(Duration::from_secs(1800)),
    }
}

/// One sync, logged with its size and time (and the replica that made it, with `[cluster]`).
async fn sync_logged(
    fleet: &Fleet,
    client: &WechatPayClient,
    replica: Option<&str>,
) -> Result<usize, FleetError> {
    let started = Instant::now();
    let n = fleet.sync(client).await?;
    tracing::info!(
        message_id = crate::events::FLEET_SYNCED,
        devices = n,
        elapsed_ms = started.elapsed().as_millis() as u64,
        replica,
        "{}",
        if replica.is_some() {
            "fleet synced from wechat pay and shared with the replicas"
        } else {
            "fleet synced from wechat pay"
        }
    );
    Ok(n)
}

/// The fleet sync of one replica among several: every third of the lease time it takes or
/// renews the lease; the holder syncs when the shared list is an interval old (or missing, as
/// after Redis restarted empty), retrying a failed sync with backoff; the others take the list
/// the holder stored. When the holder dies, its lease runs out and another replica takes it at
/// its next step (within the lease time). At shutdown the lease is given up.
pub async fn run_shared_sync(
    fleet: Arc<Fleet>,
    client: Arc<WechatPayClient>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let Some(cluster) = fleet.cluster().cloned() else {
        return run_sync(fleet, client, interval, shutdown).await;
    };
    let step_every = cluster.config().lease / 3;
    let mut backoff = crate::schedule::Backoff::new(sync_schedule(interval, 0.0));
    let mut retry_at: Option<Instant> = None;
    let mut held = false;
    let mut first = true;
    loop {
        if !first {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(step_every) => {}
            }
        }
        first = false;
        let step = async {
            let holds = cluster.lease(LEASE).await?;
            if holds != held {
                held = holds;
                tracing::info!(
                    replica = cluster.replica(),
                    holds,
                    "{}",
                    if holds {
                        "this replica holds the fleet-sync lease: it pages the device list"
                    } else {
                        "another replica holds the fleet-sync lease: this one takes its list"
                    }
                );
            }
            let shared_at = fleet.shared_synced_at().await?;
            let due = match shared_at {
                None => true,
                Some(at) => unix_now() - at >= interval.as_secs() as i64,
            };
            if holds && due && retry_at.is_none_or(|t| Instant::now() >= t) {
                sync_logged(&fleet, &client, Some(cluster.replica())).await?;
                return Ok::<bool, FleetError>(true);
            }
            if fleet.adopt_shared(shared_at).await? {
                tracing::info!(
                    devices = fleet.snapshot().devices.len(),
                    "fleet list taken from the replica holding the lease"
                );
            }
            Ok(false)
        };
        let result = tokio::select! {
            () = shutdown.cancelled() => break,
            r = step => r,
        };
        match result {
            Ok(true) => {
                backoff.succeeded(0.0);
                retry_at = None;
            }
            Ok(false) => {}
            Err(FleetError::Cluster(_)) => {
                // Logged once by the cluster when Redis stops answering; retried next step.
            }
            Err(error) => {
                let delay = backoff
                    .failed(None, crate::crypto::random_unit())
                    .max(Duration::from_secs(30));
                retry_at = Some(Instant::now() + delay);
                tracing::warn!(
                    message_id = crate::events::FLEET_SYNC_FAILED,
                    error = %crate::error_chain(&error),
                    attempt = backoff.failures(),
                    backoff_ms = delay.as_millis() as u64,
                    "fleet sync failed; keeping the cached list"
                );
            }
        }
    }
    if held && let Err(error) = cluster.release(LEASE).await {
        tracing::warn!(%error, "cannot give the fleet-sync lease up; another replica takes it when it runs out");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, Ordering};

    /// A limiter whose budget is in memory, on the system clock.
    fn limiter(per_second: u32, per_day: u32) -> RateLimiter {
        RateLimiter::new(
            per_second,
            per_day,
            Arc::new(MemoryBudget::new(system_clock())),
        )
    }

    /// A clock a test sets, and the [`Clock`] reading it.
    fn manual_clock(start: i64) -> (Arc<AtomicI64>, Clock) {
        let now = Arc::new(AtomicI64::new(start));
        let read = now.clone();
        (now, Arc::new(move || read.load(Ordering::SeqCst)))
    }

    #[tokio::test(start_paused = true)]
    async fn limiter_allows_n_per_sliding_second() {
        let limiter = limiter(20, 50_000);
        let start = Instant::now();
        for _ in 0..60 {
            drop(limiter.acquire().await.expect("budget"));
        }
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_secs(2),
            "60 requests at 20/s take at least 2 s: {elapsed:?}"
        );
        // Two full windows of a second plus the margin, and nothing more.
        assert!(
            elapsed <= 2 * (Duration::from_secs(1) + SECOND_WINDOW_MARGIN),
            "{elapsed:?}"
        );
    }

    /// Requests with jittered network delays, some slow (a first TCP + TLS set-up), arrive at
    /// a random point between their send and their answer: in no one-second window does the
    /// receiver count more than the limit.
    #[tokio::test(start_paused = true)]
    async fn the_receiver_never_counts_more_than_the_limit_in_a_second_whatever_the_delays() {
        let limiter = Arc::new(limiter(20, 50_000));
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let start = Instant::now();
        // A small deterministic generator: the same jitter every run.
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut tasks = Vec::new();
        for i in 0..200u64 {
            // Up to 400 ms out, 50 ms back; every 25th request is slow (1.5 s out).
            let out = if i % 25 == 0 { 1500 } else { next() % 400 };
            let back = next() % 50;
            let (limiter, arrivals) = (limiter.clone(), arrivals.clone());
            // Four syncs' worth of concurrent callers share the limiter.
            tasks.push(tokio::spawn(async move {
                let permit = limiter.acquire().await.expect("budget");
                tokio::time::sleep(Duration::from_millis(out)).await;
                lock(&arrivals).push(Instant::now());
                tokio::time::sleep(Duration::from_millis(back)).await;
                drop(permit);
            }));
        }
        for task in tasks {
            task.await.expect("join");
        }
        let mut seen = lock(&arrivals).clone();
        seen.sort();
        assert_eq!(seen.len(), 200);
        let worst = seen
            .iter()
            .enumerate()
            .map(|(i, t)| {
                seen[i..]
                    .iter()
                    .take_while(|u| **u - *t < Duration::from_secs(1))
                    .count()
            })
            .max()
            .expect("arrivals");
        assert!(worst <= 20, "{worst} arrivals within one second");
        // And the pacing is not needlessly slow: 200 requests in well under 200 / 20 * 2 s.
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{:?}",
            start.elapsed()
        );
    }

    /// Both budgets count per Beijing calendar day and refuse the request past the limit; the
    /// next Beijing day (16:00 UTC) starts afresh.
    #[tokio::test(start_paused = true)]
    async fn limiter_refuses_past_the_daily_budget_until_the_next_beijing_day() {
        // 2026-01-05 15:59:58 UTC = 23:59:58 in Beijing.
        let (now, clock) = manual_clock(1_767_628_798);
        let store = Store::temporary().expect("store");
        let budgets: [Arc<dyn DailyBudget>; 2] = [
            Arc::new(MemoryBudget::new(clock.clone())),
            Arc::new(StoredBudget::new(store, clock)),
        ];
        for budget in budgets {
            now.store(1_767_628_798, Ordering::SeqCst);
            let limiter = RateLimiter::new(20, 3, budget);
            for _ in 0..3 {
                drop(limiter.acquire().await.expect("budget"));
            }
            let refused = limiter.acquire().await.expect_err("the budget is spent");
            assert!(
                matches!(&refused, FleetError::DailyBudget { limit: 3, day } if day == "2026-01-05"),
                "{refused:?}"
            );
            assert_eq!(limiter.budget().used().await.expect("used"), 3);
            now.store(1_767_628_800, Ordering::SeqCst);
            drop(limiter.acquire().await.expect("the next Beijing day"));
            assert_eq!(limiter.budget().used().await.expect("used"), 1);
        }
    }

    #[test]
    fn beijing_day_turns_at_16_utc() {
        assert_eq!(beijing_day(1_767_628_799), "2026-01-05");
        assert_eq!(beijing_day(1_767_628_800), "2026-01-06");
        assert_eq!(beijing_day(0), "1970-01-01");
    }

    #[test]
    fn status_reads_the_list() {
        let fleet = Fleet::in_memory().expect("fleet");
        assert_eq!(fleet.status("SN1"), FleetStatus::Unknown);
        let device = |sn: &str, status: &str| Device {
            device_sn: Some(sn.into()),
            activation_status: Some(status.into()),
            ..Device::default()
        };
        fleet.install(FleetSnapshot {
            synced_at: Some(1),
            devices: vec![device("SN1", "ACTIVATED"), device("SN2", "INACTIVATED")],
        });
        assert_eq!(fleet.status("SN1"), FleetStatus::Activated);
        assert_eq!(fleet.status("SN2"), FleetStatus::Inactivated);
        assert_eq!(fleet.status("SN3"), FleetStatus::Unlisted);
    }
}
