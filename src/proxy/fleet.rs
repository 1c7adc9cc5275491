//! The merchant's fleet as WeChat Pay lists it (`GET /v3/iotmanage/devices`): paged sync within
//! the documented limits, a sled cache that survives restarts, and the lookup the routes use to
//! refuse devices that are not listed or not activated.
//!
//! Owns: paging (limit 100, following `offset`/`total_count`), pacing (at most
//! `requests_per_second` in any one-second window and `requests_per_day` per day, backing off on
//! 429), the cache, and the sync schedule. It must not decide what a refused device gets; the
//! routes map [`FleetStatus`] to an answer.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::platform::FailureClass;
use crate::platform::wechatpay::{Device, MAX_PAGE_LIMIT, WechatPayClient, WechatPayError};
use crate::sync::{lock, read, write};
use crate::units::unix_now;

/// The most pages one sync reads (100 000 devices): a guard against a list that never ends.
const MAX_PAGES: u64 = 1000;
/// How often one page is retried after a 429 before the sync gives up.
const MAX_RATE_LIMITED_RETRIES: u32 = 6;

/// What the fleet list says of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FleetStatus {
    Activated,
    /// Listed, but not `ACTIVATED`.
    Inactivated,
    /// Not in the list.
    Unlisted,
    /// No list has ever been fetched.
    Unknown,
}

/// A synced list.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FleetSnapshot {
    /// Unix seconds of the sync; `None` before the first.
    pub synced_at: Option<i64>,
    pub devices: Vec<Device>,
}

/// Why a sync failed.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("cannot open the fleet cache at {path}")]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("the fleet cache failed")]
    Cache(#[source] sled::Error),
    #[error("listing devices failed at offset {offset}")]
    List {
        offset: u64,
        #[source]
        source: Box<WechatPayError>,
    },
    #[error("the daily budget of {0} device-list requests is spent")]
    DailyBudget(u32),
    #[error("the device list did not end within {MAX_PAGES} pages")]
    TooManyPages,
}

/// How long after a request has completed it still counts against the per-second limit, beyond
/// the second itself: a margin for the platform's clock and for how long the answer took to come
/// back (the platform counts a request when it arrives, somewhere between our send and our
/// receipt of the answer).
const SECOND_WINDOW_MARGIN: Duration = Duration::from_millis(100);

/// Paces device-list requests: at most `per_second` in any one-second window *as the platform
/// counts them*, and `per_day` in any sliding 24 hours. One limiter is shared by every sync of
/// this process.
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
    day: Mutex<VecDeque<Instant>>,
    /// Woken when a request completes (a slot may have opened).
    completed: tokio::sync::Notify,
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
    pub fn new(per_second: u32, per_day: u32) -> Self {
        Self {
            per_second: per_second.max(1),
            per_day: per_day.max(1),
            second: Mutex::new(SecondWindow::default()),
            day: Mutex::new(VecDeque::new()),
            completed: tokio::sync::Notify::new(),
        }
    }

    /// Waits until one more request fits in both windows, then counts it; hold the permit
    /// until the answer is in. Fails at once when the daily budget is spent (waiting hours
    /// inside a sync helps nobody).
    pub async fn acquire(&self) -> Result<Permit<'_>, FleetError> {
        {
            let mut day = lock(&self.day);
            let now = Instant::now();
            while day
                .front()
                .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(86400))
            {
                day.pop_front();
            }
            if day.len() >= self.per_day as usize {
                return Err(FleetError::DailyBudget(self.per_day));
            }
        }
        let hold = Duration::from_secs(1) + SECOND_WINDOW_MARGIN;
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
                    lock(&self.day).push_back(now);
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

/// The fleet: the last synced list in memory, cached in sled.
#[derive(Debug)]
pub struct Fleet {
    /// The list and the index derived from it, swapped together under one lock: a reader never
    /// sees a new index with an old list.
    current: RwLock<Arc<Indexed>>,
    cache: Option<sled::Db>,
}

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
            .filter_map(|d| {
                let activated = d.activation_status.as_deref() == Some("ACTIVATED");
                d.device_sn.clone().map(|sn| (sn, activated))
            })
            .collect();
        Self {
            snapshot: Arc::new(snapshot),
            by_sn,
        }
    }
}

const CACHE_KEY: &str = "fleet";

impl Fleet {
    /// Opens the cache under `state_dir/fleet` and loads the last synced list. An undecodable
    /// cache is ignored (the next sync replaces it).
    pub fn open(state_dir: &Path) -> Result<Self, FleetError> {
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(state_dir)
            .map_err(|e| FleetError::Open {
                path: state_dir.to_owned(),
                source: sled::Error::Io(e),
            })?;
        let path = state_dir.join("fleet");
        let db = sled::Config::new()
            .path(&path)
            .cache_capacity(4 * 1024 * 1024)
            .mode(sled::Mode::LowSpace)
            .flush_every_ms(None)
            .open()
            .map_err(|source| FleetError::Open { path, source })?;
        let snapshot = db
            .get(CACHE_KEY)
            .map_err(FleetError::Cache)?
            .and_then(|bytes| serde_json::from_slice::<FleetSnapshot>(&bytes).ok())
            .unwrap_or_default();
        let fleet = Self::in_memory();
        fleet.install(snapshot);
        Ok(Self {
            cache: Some(db),
            ..fleet
        })
    }

    /// A fleet without a cache (the `devices --live` command, tests).
    pub fn in_memory() -> Self {
        Self {
            current: RwLock::new(Arc::new(Indexed::default())),
            cache: None,
        }
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

    /// Pages through the whole list and, when every page arrived, replaces the cached one.
    /// A failure part-way keeps the previous list.
    pub async fn sync(
        &self,
        client: &WechatPayClient,
        limiter: &RateLimiter,
    ) -> Result<usize, FleetError> {
        let devices = fetch_all(client, limiter).await?;
        let snapshot = FleetSnapshot {
            synced_at: Some(unix_now()),
            devices,
        };
        if let Some(db) = &self.cache {
            let bytes = serde_json::to_vec(&snapshot)
                .map_err(|e| FleetError::Cache(sled::Error::Io(std::io::Error::other(e))))?;
            db.insert(CACHE_KEY, bytes).map_err(FleetError::Cache)?;
            db.flush_async().await.map_err(FleetError::Cache)?;
        }
        let n = snapshot.devices.len();
        self.install(snapshot);
        Ok(n)
    }
}

/// The fleet as a table for people (`authinfo-proxy devices`).
pub fn render_table(snapshot: &FleetSnapshot) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let cell = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let rows: Vec<[String; 8]> = snapshot
        .devices
        .iter()
        .map(|d| {
            [
                cell(&d.device_sn),
                cell(&d.device_category),
                cell(&d.device_class),
                cell(&d.device_model),
                cell(&d.app_scene),
                cell(&d.operating_system),
                cell(&d.activation_status),
                cell(&d.sub_mchid),
            ]
        })
        .collect();
    let header = [
        "DEVICE_SN",
        "CATEGORY",
        "CLASS",
        "MODEL",
        "SCENE",
        "OS",
        "ACTIVATION",
        "SUB_MCHID",
    ];
    let mut widths: Vec<usize> = header.iter().map(|h| display_width(h)).collect();
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(display_width(c));
        }
    }
    let line = |cells: &[String]| {
        let mut l = String::new();
        for (c, w) in cells.iter().zip(&widths) {
            let pad = w.saturating_sub(display_width(c));
            let _ = write!(l, "{c}{}  ", " ".repeat(pad));
        }
        l.trim_end().to_owned()
    };
    let _ = writeln!(out, "{}", line(&header.map(str::to_owned)));
    for row in &rows {
        let _ = writeln!(out, "{}", line(row));
    }
    let activated = snapshot
        .devices
        .iter()
        .filter(|d| d.activation_status.as_deref() == Some("ACTIVATED"))
        .count();
    let _ = writeln!(
        out,
        "{} device(s), {activated} activated; synced {}",
        snapshot.devices.len(),
        snapshot
            .synced_at
            .map_or_else(|| "never".into(), crate::units::rfc3339)
    );
    out
}

/// The terminal columns `text` takes: East Asian wide and fullwidth characters (the Chinese
/// names WeChat Pay gives device categories, classes and scenes) take two, others one.
fn display_width(text: &str) -> usize {
    text.chars()
        .map(|c| match u32::from(c) {
            0x1100..=0x115F
            | 0x2E80..=0x303E
            | 0x3041..=0x33FF
            | 0x3400..=0x4DBF
            | 0x4E00..=0x9FFF
            | 0xA000..=0xA4CF
            | 0xAC00..=0xD7A3
            | 0xF900..=0xFAFF
            | 0xFE30..=0xFE4F
            | 0xFF00..=0xFF60
            | 0xFFE0..=0xFFE6
            | 0x20000..=0x3FFFD => 2,
            _ => 1,
        })
        .sum()
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
    limiter: Arc<RateLimiter>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut backoff = crate::schedule::Backoff::new(crate::schedule::Schedule {
        interval,
        jitter: 0.1,
        backoff_min: Duration::from_secs(30),
        backoff_max: interval.min(Duration::from_secs(1800)),
    });
    let age = fleet
        .snapshot()
        .synced_at
        .map(|t| Duration::from_secs(u64::try_from(unix_now() - t).unwrap_or(0)));
    let mut delay = match age {
        Some(age) if age < interval => interval - age,
        _ => Duration::ZERO,
    };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        let started = Instant::now();
        let result = tokio::select! {
            () = shutdown.cancelled() => return,
            r = fleet.sync(&client, &limiter) => r,
        };
        let unit = crate::crypto::random_unit();
        delay = match result {
            Ok(n) => {
                tracing::info!(
                    message_id = crate::events::FLEET_SYNCED,
                    devices = n,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "fleet synced from wechat pay"
                );
                backoff.succeeded(unit)
            }
            Err(error) => {
                // Never sooner than the minimum: a sync is a burst of requests.
                let delay = backoff.failed(None, unit).max(backoff.schedule.backoff_min);
                tracing::warn!(message_id = crate::events::FLEET_SYNC_FAILED, error = %crate::error_chain(&error), attempt = backoff.failures(), backoff_ms = delay.as_millis() as u64, "fleet sync failed; keeping the cached list");
                delay
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn limiter_allows_n_per_sliding_second() {
        let limiter = RateLimiter::new(20, 50_000);
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
        let limiter = Arc::new(RateLimiter::new(20, 50_000));
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

    #[tokio::test(start_paused = true)]
    async fn limiter_refuses_past_the_daily_budget() {
        let limiter = RateLimiter::new(20, 3);
        for _ in 0..3 {
            drop(limiter.acquire().await.expect("budget"));
        }
        assert!(matches!(
            limiter.acquire().await,
            Err(FleetError::DailyBudget(3))
        ));
        tokio::time::advance(Duration::from_secs(86400)).await;
        drop(limiter.acquire().await.expect("a day later"));
    }

    #[test]
    fn table_has_a_header_a_row_per_device_and_a_summary() {
        let snapshot = FleetSnapshot {
            synced_at: Some(0),
            devices: vec![Device {
                device_sn: Some("SN1".into()),
                device_class: Some("团餐机".into()),
                activation_status: Some("ACTIVATED".into()),
                ..Device::default()
            }],
        };
        let table = render_table(&snapshot);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("DEVICE_SN"));
        assert!(
            lines[1].starts_with("SN1")
                && lines[1].contains("团餐机")
                && lines[1].contains("ACTIVATED")
        );
        assert_eq!(
            lines[2],
            "1 device(s), 1 activated; synced 1970-01-01T00:00:00Z"
        );
    }

    /// Chinese names take two terminal columns per character; the padding counts them so.
    #[test]
    fn table_columns_line_up_with_chinese_names() {
        let device = |sn: &str, class: &str| Device {
            device_sn: Some(sn.into()),
            device_class: Some(class.into()),
            activation_status: Some("ACTIVATED".into()),
            ..Device::default()
        };
        let snapshot = FleetSnapshot {
            synced_at: None,
            devices: vec![device("SN1", "团餐机"), device("SN2", "POS")],
        };
        let table = render_table(&snapshot);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "DEVICE_SN  CATEGORY  CLASS   MODEL  SCENE  OS  ACTIVATION  SUB_MCHID"
        );
        assert_eq!(
            lines[1],
            "SN1        -         团餐机  -      -      -   ACTIVATED   -"
        );
        assert_eq!(
            lines[2],
            "SN2        -         POS     -      -      -   ACTIVATED   -"
        );
        assert_eq!(display_width("团餐机"), 6);
        assert_eq!(display_width("FP-200"), 6);
    }

    #[test]
    fn status_reads_the_list() {
        let fleet = Fleet::in_memory();
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
