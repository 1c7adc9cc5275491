//! The daemon's shared state: the authinfo being served, the refresh bookkeeping status reads,
//! the device health, the raw_data's metadata, metrics and liveness. One `Arc<State>` is handed
//! to the refresher, the health checker and the socket server.
//!
//! Owns: the in-memory truth and its invariants — the served authinfo changes only through
//! [`State::publish`] (after the store has it), refresh requests are single-flight
//! ([`State::request_refresh`]) and limited (a forced refresh starts at most once per
//! `refresh.min_forced_interval` while a fresh authinfo is held, else after the backoff:
//! [`forced_refresh_hold`]), and one finished attempt is applied whole, under one lock
//! ([`State::finish_refresh`]). It writes through the store's narrow API (raw_data, attempts,
//! health records) so that what it announces is what a restart finds; it never reads the store
//! after start, so answering status or `/v1/device` does no I/O.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::config::Config;
use super::device::{DeviceHealth, Enabled};
pub use super::doc::{AgeBasis, Freshness};
use super::doc::{
    AuthinfoStatus, HeldState, ProxyDoc, RawDataAccepted, RawDataDoc, RecoveryDoc, RefreshDoc,
    StatusDoc, StoreDoc, StoreState,
};
use super::metrics::Metrics;
use super::store::{AttemptRecord, HeldAuthinfo, RawData, Store, StoreError};
use crate::crypto;
use crate::schedule::Schedule;
pub use crate::sync::lock;
use crate::units::{PeerClock, WallClock, rfc3339};

/// What the daemon knows of the time now: its own wall clock, and the proxy's clock when an
/// answer has told it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Unix seconds on the local wall clock (which may be wrong, and may be set at any time).
    pub local: i64,
    /// Unix seconds on the proxy's clock, estimated from its last `Date`.
    pub proxy: Option<i64>,
}

/// How old a held authinfo is, and by which clock that is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Age {
    /// `None` when it cannot be told: fetched "in the future" of the local clock (the clock was
    /// set back) and no proxy time to tell by.
    pub seconds: Option<u64>,
    pub basis: AgeBasis,
}

/// An authinfo as served: the held record plus its derived ETag and log fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub held: HeldAuthinfo,
    /// Strong ETag, quoted: changes whenever a new authinfo is fetched.
    pub etag: String,
    /// First 8 hex of the authinfo's SHA-256, what logs carry.
    pub fingerprint: String,
}

impl Served {
    pub fn new(held: HeldAuthinfo) -> Self {
        let fingerprint = crypto::secret_fingerprint(held.authinfo.as_bytes());
        let mut tag =
            crypto::sha256_hex(format!("{}\n{}", held.fetched_at, held.authinfo).as_bytes());
        tag.truncate(20);
        Self {
            held,
            etag: format!("\"{tag}\""),
            fingerprint,
        }
    }

    /// Its age at `now`: by the proxy's clock when both its fetch and now are known on it (the
    /// local clock may have been wrong at the fetch, or changed since); else by the local clock,
    /// unless the fetch lies in the local clock's future (the clock was set back), which leaves
    /// the age unknown.
    pub fn age(&self, now: Now) -> Age {
        if let (Some(proxy_now), Some(fetched)) = (now.proxy, self.held.proxy_fetched_at) {
            return Age {
                // A second's rounding of the `Date` headers may make it negative: 0.
                seconds: Some(u64::try_from(proxy_now.saturating_sub(fetched)).unwrap_or(0)),
                basis: AgeBasis::ProxyClock,
            };
        }
        match u64::try_from(now.local.saturating_sub(self.held.fetched_at)) {
            Ok(seconds) => Age {
                seconds: Some(seconds),
                basis: AgeBasis::LocalClock,
            },
            Err(_) => Age {
                seconds: None,
                basis: AgeBasis::Unknown,
            },
        }
    }

    /// Its freshness at `now` for a refresh interval of `interval`. An authinfo of unknown age is
    /// `stale` at best: it may be older than it looks.
    pub fn freshness(&self, now: Now, interval: Duration) -> Freshness {
        match self.age(now).seconds {
            Some(age) if age >= self.held.validity() => Freshness::Expired,
            Some(age) if age >= interval.as_secs() => Freshness::Stale,
            Some(_) => Freshness::Fresh,
            None => Freshness::Stale,
        }
    }

    /// Seconds of validity left at `now`: never more than its validity, whatever the clocks say
    /// (an authinfo of unknown age is given its whole validity, the most it can have).
    pub fn runway(&self, now: Now) -> u64 {
        let validity = self.held.validity();
        self.age(now)
            .seconds
            .map_or(validity, |age| validity.saturating_sub(age))
    }
}

/// Why the refresh loop is idle instead of retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    /// No raw_data yet: the face app must push one.
    RawData,
    /// A permanent refusal: new raw_data may cure it, or the next interval retries.
    PermanentError,
}

impl Waiting {
    /// What status says the loop waits for.
    pub fn as_str(self) -> &'static str {
        match self {
            Waiting::RawData => "raw_data",
            Waiting::PermanentError => "new raw_data or the next interval",
        }
    }
}

/// The refresh bookkeeping that status reports.
#[derive(Debug, Clone, Default)]
pub struct RefreshStatus {
    /// A refresh is running now.
    pub in_flight: bool,
    /// A refresh was asked for and has not started yet.
    pub requested: bool,
    pub last_attempt: Option<Arc<AttemptRecord>>,
    /// When the next attempt is due (wall-clock estimate, for people).
    pub next_attempt_at: Option<i64>,
    pub consecutive_failures: u32,
    /// Whether the last call reached the proxy (an HTTP answer of any status counts).
    pub proxy_reachable: Option<bool>,
    /// Why the loop is idle instead of retrying, when it is.
    pub waiting_for: Option<Waiting>,
    /// When the last fetch started (monotonic): the forced-refresh limit counts from it.
    pub last_start: Option<Instant>,
    /// No forced refresh before this (monotonic): the last answer's `Retry-After`.
    pub retry_not_before: Option<Instant>,
}

/// Everything one finished refresh attempt tells, applied whole by [`State::finish_refresh`].
#[derive(Debug, Clone)]
pub struct AttemptReport {
    pub record: AttemptRecord,
    /// Whether the proxy answered; `None` when no call was made.
    pub proxy_reachable: Option<bool>,
    pub waiting_for: Option<Waiting>,
    pub consecutive_failures: u32,
    /// When the next attempt is due (wall clock), if one is scheduled.
    pub next_attempt_at: Option<i64>,
    /// The `Retry-After` the answer carried (the proxy's or the platform's rate limit).
    pub retry_after: Option<Duration>,
}

/// Why a forced refresh has to wait, as [`forced_refresh_hold`] finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// A fresh authinfo is held: one forced start per `refresh.min_forced_interval`.
    Fresh { min_interval: Duration },
    /// No fresh authinfo is held (none, stale, expired) or a permanent refusal holds the retries:
    /// the backoff ceiling after `failures` consecutive failures (at least one), at most
    /// `refresh.min_forced_interval`.
    Backoff { gap: Duration, failures: u32 },
    /// The last answer asked for this wait (`Retry-After`).
    RetryAfter,
}

impl std::fmt::Display for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::units::format_duration;
        match self {
            Hold::Fresh { min_interval } => write!(
                f,
                "a fresh authinfo is held, so a forced refresh starts at most once every {} (refresh.min_forced_interval)",
                format_duration(*min_interval)
            ),
            Hold::Backoff { gap, failures } => write!(
                f,
                "no fresh authinfo is held; after {failures} consecutive failure(s) a forced refresh waits {} after the last start (backoff)",
                format_duration(*gap)
            ),
            Hold::RetryAfter => f.write_str("the last answer asked to retry later (Retry-After)"),
        }
    }
}

/// A forced refresh refused by the limit: how long until one is allowed, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefreshHeld {
    pub wait: Duration,
    pub hold: Hold,
}

/// How long a forced refresh must wait at `now`, or `None` when it may start at once: one start
/// per `min_interval` after `last_start` while `fresh` (a fresh authinfo is held and no
/// permanent refusal holds the retries); otherwise the backoff ceiling after `failures` (at
/// least `schedule.backoff_min`), never more than `min_interval`; and never before
/// `retry_not_before`. A zero `min_interval` turns the limit off, `retry_not_before` included.
pub fn forced_refresh_hold(
    last_start: Option<Instant>,
    retry_not_before: Option<Instant>,
    now: Instant,
    fresh: bool,
    failures: u32,
    min_interval: Duration,
    schedule: &Schedule,
) -> Option<RefreshHeld> {
    if min_interval.is_zero() {
        return None;
    }
    let (gap, hold) = if fresh {
        (min_interval, Hold::Fresh { min_interval })
    } else {
        let failures = failures.max(1);
        let gap = schedule.backoff_ceiling(failures).min(min_interval);
        (gap, Hold::Backoff { gap, failures })
    };
    let by_gap = last_start
        .map(|t| (t + gap).saturating_duration_since(now))
        .filter(|w| !w.is_zero())
        .map(|wait| RefreshHeld { wait, hold });
    let by_retry_after = retry_not_before
        .map(|t| t.saturating_duration_since(now))
        .filter(|w| !w.is_zero())
        .map(|wait| RefreshHeld {
            wait,
            hold: Hold::RetryAfter,
        });
    match (by_gap, by_retry_after) {
        (Some(a), Some(b)) => Some(if b.wait > a.wait { b } else { a }),
        (a, b) => a.or(b),
    }
}

/// The outcome of one finished refresh, as waiters on `POST /v1/refresh?wait=true` see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// How many refreshes have finished since start.
    pub seq: u64,
    /// The attempt's record (the same one status shows); `None` when the loop stopped first.
    pub record: Option<Arc<AttemptRecord>>,
}

/// Heartbeats of the long-running loops for the systemd watchdog: milliseconds since the
/// daemon started, on the monotonic clock, of each loop's last report.
#[derive(Debug, Default)]
pub struct Heartbeats {
    pub refresh: AtomicU64,
    pub socket: AtomicU64,
}

impl Heartbeats {
    /// Records a beat at `now` in `slot`, as milliseconds since `origin`.
    pub fn beat(slot: &AtomicU64, now: Instant, origin: Instant) {
        let ms = u64::try_from(now.duration_since(origin).as_millis()).unwrap_or(u64::MAX);
        slot.store(ms, Ordering::Relaxed);
    }
}

/// What the store held at start, read once by [`State::load`].
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    pub authinfo: Option<HeldAuthinfo>,
    pub last_attempt: Option<AttemptRecord>,
    pub raw_data: Option<RawData>,
    pub health: DeviceHealth,
}

/// The raw_data's metadata, kept in memory for status (the value itself stays in the store).
#[derive(Debug, Clone, PartialEq, Eq)]
struct RawDataMeta {
    received_at: i64,
    source: String,
    fingerprint: String,
}

impl From<&RawData> for RawDataMeta {
    fn from(r: &RawData) -> Self {
        Self {
            received_at: r.received_at,
            source: r.source.clone(),
            fingerprint: crypto::secret_fingerprint(r.value.as_bytes()),
        }
    }
}

/// The shared state.
#[derive(Debug)]
pub struct State {
    pub config: Config,
    pub store: Store,
    authinfo: watch::Sender<Option<Arc<Served>>>,
    refresh: Mutex<RefreshStatus>,
    kick: Notify,
    /// Set when something the proxy's fleet view shows changed (a refresh attempt, a health
    /// check); the reporter waits on it. One stored permit: triggers coalesce.
    report_wanted: Notify,
    completions: watch::Sender<Completion>,
    health: Mutex<DeviceHealth>,
    raw_data: Mutex<Option<RawDataMeta>>,
    /// Bumped whenever something status shows changes (a new authinfo, a finished refresh, a
    /// health check, new raw_data): `STATUS=` and the metrics textfile follow it at once.
    changes: watch::Sender<u64>,
    pub metrics: Metrics,
    pub heartbeats: Heartbeats,
    /// Monotonic start time, the origin of heartbeats and uptime.
    pub started: Instant,
    clock: Arc<WallClock>,
    /// Who may use the socket: from `config.socket` at start, replaced by a reload.
    peers: RwLock<Arc<Peers>>,
    proxy_clock: Arc<PeerClock>,
}

/// The socket's allow-list: a peer is served when its uid or its primary gid is listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peers {
    pub uids: BTreeSet<u32>,
    pub gids: BTreeSet<u32>,
}

impl Peers {
    /// The allow-list `socket` configures.
    pub fn from_config(socket: &super::config::SocketConfig) -> Self {
        Self {
            uids: socket.allowed_uids.clone(),
            gids: socket.allowed_gids.clone(),
        }
    }

    /// Whether a peer with these credentials is served.
    pub fn allow(&self, uid: u32, gid: u32) -> bool {
        self.uids.contains(&uid) || self.gids.contains(&gid)
    }
}

impl State {
    /// Reads what `store` holds (an error is returned, never taken for "nothing stored") and
    /// makes the state serving it. `clock` is the wall clock; `proxy_clock` what the proxy client
    /// learns of the proxy's.
    pub fn load(
        config: Config,
        store: Store,
        clock: Arc<WallClock>,
        proxy_clock: Arc<PeerClock>,
    ) -> Result<Arc<Self>, StoreError> {
        let health = DeviceHealth {
            inspection: store.health("inspection")?.unwrap_or_default(),
            alipay_binding: store.health("alipay_binding")?.unwrap_or_default(),
            licence: store.health("licence")?.unwrap_or_default(),
            enabled: Enabled::default(),
        };
        let loaded = Loaded {
            authinfo: store.authinfo(),
            last_attempt: store.last_attempt(),
            raw_data: store.raw_data(),
            health,
        };
        Ok(Self::new(config, store, loaded, clock, proxy_clock))
    }

    /// State for `config` serving `loaded`.
    pub fn new(
        config: Config,
        store: Store,
        loaded: Loaded,
        clock: Arc<WallClock>,
        proxy_clock: Arc<PeerClock>,
    ) -> Arc<Self> {
        let mut health = loaded.health;
        health.enabled = Enabled::from_config(&config.health);
        Arc::new(Self {
            authinfo: watch::Sender::new(loaded.authinfo.map(|h| Arc::new(Served::new(h)))),
            refresh: Mutex::new(RefreshStatus {
                last_attempt: loaded.last_attempt.map(Arc::new),
                ..RefreshStatus::default()
            }),
            kick: Notify::new(),
            report_wanted: Notify::new(),
            completions: watch::Sender::new(Completion {
                seq: 0,
                record: None,
            }),
            health: Mutex::new(health),
            raw_data: Mutex::new(loaded.raw_data.as_ref().map(RawDataMeta::from)),
            changes: watch::Sender::new(0),
            metrics: Metrics::default(),
            heartbeats: Heartbeats::default(),
            started: Instant::now(),
            clock,
            peers: RwLock::new(Arc::new(Peers::from_config(&config.socket))),
            proxy_clock,
            config,
            store,
        })
    }

    /// Unix seconds now, on the daemon's wall clock.
    pub fn now(&self) -> i64 {
        self.clock.now()
    }

    /// The socket's allow-list now.
    pub fn peers(&self) -> Arc<Peers> {
        crate::sync::read(&self.peers).clone()
    }

    /// Replaces the socket's allow-list (a reload); connections already admitted keep going.
    pub fn set_peers(&self, peers: Peers) {
        *crate::sync::write(&self.peers) = Arc::new(peers);
    }

    /// The time now on both clocks the daemon knows.
    pub fn time(&self) -> Now {
        Now {
            local: self.clock.now(),
            proxy: self.proxy_clock.now(),
        }
    }

    /// The wall clock this state reads (tests move it).
    #[cfg(test)]
    pub fn wall_clock(&self) -> &WallClock {
        &self.clock
    }

    /// The proxy's clock minus ours, in seconds, once an answer has told it.
    pub fn clock_skew(&self) -> Option<i64> {
        let now = self.time();
        now.proxy.map(|p| p.saturating_sub(now.local))
    }

    // === the served authinfo ===

    /// The authinfo being served now.
    pub fn current(&self) -> Option<Arc<Served>> {
        self.authinfo.borrow().clone()
    }

    /// A receiver that wakes whenever a new authinfo is published (long-polls).
    pub fn watch_authinfo(&self) -> watch::Receiver<Option<Arc<Served>>> {
        self.authinfo.subscribe()
    }

    /// Serves `held` from now on. Call only after the store has it.
    pub fn publish(&self, held: HeldAuthinfo) -> Arc<Served> {
        let served = Arc::new(Served::new(held));
        self.authinfo.send_replace(Some(served.clone()));
        self.changed();
        served
    }

    // === change notification ===

    /// Says that something status shows has changed.
    pub fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that wakes on every [`changed`](Self::changed).
    pub fn watch_changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The served authinfo's freshness now (`None` when nothing is held).
    pub fn freshness(&self) -> Option<Freshness> {
        self.current()
            .map(|s| s.freshness(self.time(), self.config.refresh.interval))
    }

    // === raw_data ===

    /// Takes raw_data pushed by the face app and asks for a refresh when the held authinfo is
    /// not fresh (or a permanent error is holding retries, which new raw_data may cure). The
    /// raw_data is used from now on even when the store cannot persist it (the store logs why
    /// and status shows it); the answer says whether it reached the disk, and how long the
    /// forced-refresh limit holds the refresh it asked for back.
    pub fn accept_raw_data(&self, value: String) -> RawDataAccepted {
        let persisted = self
            .save_raw_data(RawData {
                value,
                received_at: self.now(),
                source: "socket".into(),
            })
            .is_ok();
        let held_fresh = self.freshness() == Some(Freshness::Fresh);
        let held_by_error = self
            .refresh_status()
            .last_attempt
            .as_ref()
            .is_some_and(|a| a.permanent);
        let triggered = !held_fresh || held_by_error;
        // The hold is read where the request is made, before the loop can start it: read
        // after, it would be the refresh just started holding itself.
        let deferred = if triggered {
            self.request_fresh_refresh()
        } else {
            None
        };
        RawDataAccepted {
            accepted: true,
            refresh_triggered: triggered,
            refresh_deferred_seconds: deferred.map(|h| whole_seconds_up(h.wait)),
            persisted,
        }
    }

    /// Stores `raw` as the newest raw_data and shows it in status. The store holds it from now
    /// on even when the write fails (the error says so; status shows the store not persisting).
    pub fn save_raw_data(&self, raw: RawData) -> Result<(), StoreError> {
        let saved = self.store.save_raw_data(&raw);
        *lock(&self.raw_data) = Some(RawDataMeta::from(&raw));
        self.changed();
        saved
    }

    // === device health ===

    /// The device health, locked (the checker updates it; the API reads it).
    pub fn health(&self) -> MutexGuard<'_, DeviceHealth> {
        lock(&self.health)
    }

    // === refresh requests (single-flight) ===

    /// The refresh bookkeeping, locked.
    pub fn refresh_status(&self) -> MutexGuard<'_, RefreshStatus> {
        lock(&self.refresh)
    }

    /// Asks for a forced refresh and returns the completion sequence number that will answer
    /// it. A refresh already running (or asked for and about to start) is joined, not doubled:
    /// its completion is the answer. Otherwise the limit applies ([`forced_refresh_hold`]): within
    /// it nothing starts and the caller is told how long to wait.
    pub fn request_refresh(&self) -> Result<u64, RefreshHeld> {
        let mut status = self.refresh_status();
        let seq = self.completions.borrow().seq;
        if status.in_flight {
            return Ok(seq + 1);
        }
        if let Some(held) = self.hold_of(&status, Instant::now()) {
            return Err(held);
        }
        status.requested = true;
        self.kick.notify_one();
        Ok(seq + 1)
    }

    /// Asks for a refresh that must use data newer than any refresh running now (new
    /// raw_data): it never joins a running one. It is never refused: within the limit it starts
    /// when the limit allows (the returned wait; `None` when the limit does not hold it now).
    pub fn request_fresh_refresh(&self) -> Option<RefreshHeld> {
        let mut status = self.refresh_status();
        status.requested = true;
        let held = self.hold_of(&status, Instant::now());
        drop(status);
        self.kick.notify_one();
        held
    }

    /// How long a forced refresh must wait now (`None`: it may start at once).
    pub fn forced_refresh_held(&self) -> Option<RefreshHeld> {
        self.hold_of(&self.refresh_status(), Instant::now())
    }

    /// When the refresh asked for may start (`None` when none is asked for): now, or when the
    /// limit allows. The loop sleeps until then.
    pub fn requested_refresh_at(&self, now: Instant) -> Option<Instant> {
        let status = self.refresh_status();
        if !status.requested {
            return None;
        }
        Some(
            now + self
                .hold_of(&status, now)
                .map_or(Duration::ZERO, |h| h.wait),
        )
    }

    /// The limit on forced refreshes, for the bookkeeping in `status`.
    fn hold_of(&self, status: &RefreshStatus, now: Instant) -> Option<RefreshHeld> {
        let permanent = status.last_attempt.as_ref().is_some_and(|a| a.permanent);
        let fresh = !permanent && self.freshness() == Some(Freshness::Fresh);
        let refresh = &self.config.refresh;
        forced_refresh_hold(
            status.last_start,
            status.retry_not_before,
            now,
            fresh,
            status.consecutive_failures,
            refresh.min_forced_interval,
            &refresh.schedule(),
        )
    }

    /// Waits until a refresh is requested.
    pub async fn refresh_requested(&self) {
        self.kick.notified().await;
    }

    /// Marks the start of a refresh: requests from now on join it. Returns whether one had
    /// been requested (as opposed to being due by schedule).
    pub fn begin_refresh(&self) -> bool {
        let mut status = self.refresh_status();
        status.in_flight = true;
        status.last_start = Some(Instant::now());
        std::mem::take(&mut status.requested)
    }

    /// Whether a refresh was requested and has not started (it may be waiting for the limit).
    pub fn refresh_pending(&self) -> bool {
        self.refresh_status().requested
    }

    /// Ends a refresh: records the attempt in the store (so status survives a restart),
    /// applies the whole report under one lock and wakes the waiters with the same record.
    pub fn finish_refresh(&self, report: AttemptReport) {
        if let Err(error) = self.store.save_attempt(&report.record) {
            tracing::error!(error = %crate::error_chain(&error), "cannot record the refresh attempt in the store");
        }
        let record = Arc::new(report.record);
        {
            let mut status = self.refresh_status();
            status.in_flight = false;
            status.last_attempt = Some(record.clone());
            if let Some(reached) = report.proxy_reachable {
                status.proxy_reachable = Some(reached);
            }
            status.waiting_for = report.waiting_for;
            status.consecutive_failures = report.consecutive_failures;
            status.next_attempt_at = report.next_attempt_at;
            // Capped at one interval, as the schedule caps it: a confused answer cannot hold
            // forced refreshes past the next scheduled one.
            status.retry_not_before = report
                .retry_after
                .map(|after| Instant::now() + after.min(self.config.refresh.interval));
        }
        self.completions.send_modify(|c| {
            c.seq += 1;
            c.record = Some(record);
        });
        self.changed();
        self.want_report();
    }

    // === reports to the proxy ===

    /// Asks the reporter to send a report soon (after a refresh attempt or a health check).
    /// Never blocks; asks made before the reporter looks again count once.
    pub fn want_report(&self) {
        self.report_wanted.notify_one();
    }

    /// Waits until a report is wanted.
    pub async fn report_requested(&self) {
        self.report_wanted.notified().await;
    }

    /// Ends a refresh that was cut short (shutdown): waiters are woken with no record.
    pub fn abandon_refresh(&self) {
        self.refresh_status().in_flight = false;
        self.completions.send_modify(|c| {
            c.seq += 1;
            c.record = None;
        });
    }

    /// Waits for the completion numbered `seq` (or a later one) and returns it.
    pub async fn wait_completion(&self, seq: u64) -> Completion {
        let mut rx = self.completions.subscribe();
        match rx.wait_for(|c| c.seq >= seq).await {
            Ok(c) => c.clone(),
            // The sender lives in `self`, so it cannot be dropped while we borrow `self`.
            Err(_) => self.completions.borrow().clone(),
        }
    }

    // === liveness ===

    /// Time since start, on the monotonic clock.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    // === status document ===

    /// The status document now.
    pub fn status(&self) -> StatusDoc {
        let now = self.time();
        let interval = self.config.refresh.interval;
        let current = self.current();
        let authinfo = match &current {
            None => AuthinfoStatus {
                state: HeldState::None,
                fingerprint: None,
                fetched_at: None,
                expires_at: None,
                age_seconds: None,
                age_basis: None,
                runway_seconds: None,
                expiry_from_platform: None,
            },
            Some(s) => {
                let age = s.age(now);
                AuthinfoStatus {
                    state: Some(s.freshness(now, interval)).into(),
                    fingerprint: Some(s.fingerprint.clone()),
                    fetched_at: Some(rfc3339(s.held.fetched_at)),
                    expires_at: Some(rfc3339(s.held.expires_at)),
                    age_seconds: age.seconds,
                    age_basis: Some(age.basis),
                    runway_seconds: Some(s.runway(now)),
                    expiry_from_platform: Some(s.held.expires_in.is_some()),
                }
            }
        };
        let raw = lock(&self.raw_data).clone();
        let r = self.refresh_status().clone();
        let last = r.last_attempt.as_deref();
        let local = now.local;
        StatusDoc {
            version: env!("CARGO_PKG_VERSION").into(),
            device_id: self.config.device_id.clone(),
            uptime_seconds: self.uptime().as_secs(),
            authinfo,
            refresh: RefreshDoc {
                interval_seconds: interval.as_secs(),
                in_flight: r.in_flight,
                last_attempt_at: last.map(|a| rfc3339(a.at)),
                last_attempt_ok: last.map(|a| a.ok),
                last_error_code: last.and_then(|a| a.code.clone()),
                last_error: last.and_then(|a| a.error.clone()),
                last_error_permanent: last.is_some_and(|a| a.permanent),
                // The held authinfo is the last success: it is only ever replaced by a newer one.
                last_success_at: current.as_ref().map(|s| rfc3339(s.held.fetched_at)),
                next_attempt_at: r.next_attempt_at.map(rfc3339),
                next_attempt_in_seconds: r.next_attempt_at.map(|t| t.saturating_sub(local).max(0)),
                consecutive_failures: r.consecutive_failures,
                waiting_for: r.waiting_for.map(|w| w.as_str().to_owned()),
                min_forced_interval_seconds: self.config.refresh.min_forced_interval.as_secs(),
                forced_refresh_allowed_in_seconds: self
                    .hold_of(&r, Instant::now())
                    .map_or(0, |h| whole_seconds_up(h.wait)),
            },
            raw_data: RawDataDoc {
                present: raw.is_some(),
                received_at: raw.as_ref().map(|r| rfc3339(r.received_at)),
                fingerprint: raw.as_ref().map(|r| r.fingerprint.clone()),
                source: raw.map(|r| r.source),
                command_configured: self.config.refresh.raw_data_command.is_some(),
            },
            proxy: ProxyDoc {
                url: self.config.proxy.url.clone(),
                reachable: r.proxy_reachable,
                clock_skew_seconds: self.clock_skew(),
            },
            store: self.store_doc(),
            device: self.health().doc(local),
        }
    }

    /// The store part of the status document.
    pub fn store_doc(&self) -> StoreDoc {
        let s = self.store.status();
        let state = match (&s.not_persisting, &s.last_recovery) {
            (Some(_), _) => StoreState::NotPersisting,
            (None, Some(_)) => StoreState::Recovered,
            (None, None) => StoreState::Ok,
        };
        StoreDoc {
            state,
            not_persisting_reason: s.not_persisting.as_ref().map(|n| n.reason.clone()),
            not_persisting_since: s.not_persisting.as_ref().map(|n| rfc3339(n.since)),
            recoveries: s.recoveries,
            last_recovery: s.last_recovery.map(|r| RecoveryDoc {
                at: rfc3339(r.at),
                damaged: r.damaged,
                restored_from: r.restored_from.as_str().to_owned(),
                restored: r.restored,
                moved_to: r.moved_to.map(|p| p.display().to_string()),
            }),
            generation: s.generation,
            last_persist_at: s.last_persist_at.map(rfc3339),
            path: self.store.state_dir().display().to_string(),
        }
    }
}

/// `d` in whole seconds, rounded up: what a client is told to wait (never 0 for a wait).
pub fn whole_seconds_up(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// A daemon state for unit tests: [`test_config`](super::config::test_config) in `dir`, a fresh
/// store and the system clock.
#[cfg(test)]
pub(crate) fn test_state(dir: &std::path::Path) -> Arc<State> {
    test_state_with(super::config::test_config(dir), |_| {})
}

/// [`test_state`] with `config`, loaded from a store `seed` wrote to first.
#[cfg(test)]
pub(crate) fn test_state_with(config: Config, seed: impl FnOnce(&Store)) -> Arc<State> {
    let (store, _) = Store::open(&config.state_dir).expect("store");
    seed(&store);
    State::load(config, store, Arc::default(), Arc::default()).expect("state")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served(fetched_at: i64, expires_at: i64) -> Served {
        Served::new(HeldAuthinfo {
            authinfo: "secret".into(),
            fetched_at,
            expires_at,
            expires_in: None,
            proxy_fetched_at: None,
        })
    }

    fn local(t: i64) -> Now {
        Now {
            local: t,
            proxy: None,
        }
    }

    #[test]
    fn freshness_follows_interval_then_validity() {
        let hour = Duration::from_secs(3600);
        let s = served(1000, 1000 + 7200);
        assert_eq!(s.freshness(local(1000), hour), Freshness::Fresh);
        assert_eq!(s.freshness(local(1000 + 3599), hour), Freshness::Fresh);
        assert_eq!(s.freshness(local(1000 + 3600), hour), Freshness::Stale);
        assert_eq!(s.freshness(local(1000 + 7200), hour), Freshness::Expired);
        assert_eq!(s.runway(local(1000 + 7000)), 200);
        assert_eq!(s.runway(local(1000 + 9000)), 0);
    }

    /// A clock set back before the fetch does not make an authinfo young: its age is unknown,
    /// it is stale at best, and its runway is at most its validity.
    #[test]
    fn a_fetch_in_the_local_clocks_future_is_of_unknown_age() {
        let hour = Duration::from_secs(3600);
        let s = served(100_000, 100_000 + 7200);
        let a_day_back = local(100_000 - 86_400);
        assert_eq!(
            s.age(a_day_back),
            Age {
                seconds: None,
                basis: AgeBasis::Unknown
            }
        );
        assert_eq!(s.freshness(a_day_back, hour), Freshness::Stale);
        assert_eq!(s.runway(a_day_back), 7200);
    }

    /// Once the proxy's clock is known, ages come from it, whatever the local clock says.
    #[test]
    fn the_proxys_clock_corrects_the_age() {
        let hour = Duration::from_secs(3600);
        let mut held = served(100_000, 100_000 + 7200).held;
        held.proxy_fetched_at = Some(500_000);
        let s = Served::new(held);
        for local_now in [0, 100_000 - 86_400, 100_000 + 86_400] {
            let now = Now {
                local: local_now,
                proxy: Some(500_000 + 600),
            };
            assert_eq!(
                s.age(now),
                Age {
                    seconds: Some(600),
                    basis: AgeBasis::ProxyClock
                }
            );
            assert_eq!(s.freshness(now, hour), Freshness::Fresh);
            assert_eq!(s.runway(now), 6600);
        }
        let later = Now {
            local: 0,
            proxy: Some(500_000 + 7200),
        };
        assert_eq!(s.freshness(later, hour), Freshness::Expired);
    }

    fn schedule() -> Schedule {
        crate::terminal::config::test_config(std::path::Path::new("/t"))
            .refresh
            .schedule()
    }

    /// While a fresh authinfo is held a forced refresh waits `min_interval` after the last
    /// start; without one it waits the backoff ceiling of the failures so far (5 s, 10 s, 20 s,
    /// ...), never more than `min_interval`; a `Retry-After` is a floor; zero turns it off.
    #[test]
    fn forced_refreshes_wait_the_interval_when_fresh_and_the_backoff_otherwise() {
        let s = schedule();
        let minute = Duration::from_secs(60);
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        let hold = |now, fresh, failures| {
            forced_refresh_hold(Some(t0), None, now, fresh, failures, minute, &s)
        };
        assert_eq!(
            forced_refresh_hold(None, None, t0, true, 0, minute, &s),
            None,
            "the first forced refresh starts at once"
        );
        assert_eq!(
            hold(at(15), true, 0),
            Some(RefreshHeld {
                wait: Duration::from_secs(45),
                hold: Hold::Fresh {
                    min_interval: minute
                }
            })
        );
        assert_eq!(hold(at(60), true, 0), None);
        let waits: Vec<Option<u64>> = (0..=6)
            .map(|failures| hold(at(1), false, failures).map(|h| h.wait.as_secs() + 1))
            .collect();
        assert_eq!(
            waits,
            [
                Some(5),
                Some(5),
                Some(10),
                Some(20),
                Some(40),
                Some(60),
                Some(60)
            ],
            "backoff ceilings (at least one failure's), capped at the interval"
        );
        assert_eq!(hold(at(5), false, 1), None);
        let after = forced_refresh_hold(Some(t0), Some(at(300)), at(70), true, 0, minute, &s);
        assert_eq!(
            after,
            Some(RefreshHeld {
                wait: Duration::from_secs(230),
                hold: Hold::RetryAfter
            })
        );
        assert_eq!(
            forced_refresh_hold(Some(t0), Some(at(300)), t0, true, 0, Duration::ZERO, &s),
            None,
            "zero turns the daemon's limit off, Retry-After included"
        );
        assert_eq!(whole_seconds_up(Duration::from_millis(1500)), 2);
        assert_eq!(whole_seconds_up(Duration::from_secs(3)), 3);
    }

    #[test]
    fn etag_changes_with_a_new_fetch_and_fingerprint_hides_the_secret() {
        let a = served(1, 100);
        let b = served(2, 100);
        assert_ne!(a.etag, b.etag);
        assert_eq!(a.etag, served(1, 100).etag);
        assert!(a.etag.starts_with('"') && a.etag.ends_with('"'));
        assert_eq!(a.fingerprint.len(), 8);
        assert!(!a.etag.contains("secret"));
    }
}
