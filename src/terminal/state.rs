//! The daemon's shared state: the authinfo being served, the refresh bookkeeping status reads,
//! the device health, the raw_data's metadata, metrics and liveness. One `Arc<State>` is handed
//! to the refresher, the health checker and the socket server.
//!
//! Owns: the in-memory truth and its invariants — the served authinfo changes only through
//! [`State::publish`] (after the store has it), refresh requests are single-flight
//! ([`State::request_refresh`]), and one finished attempt is applied whole, under one lock
//! ([`State::finish_refresh`]). It writes through the store's narrow API (raw_data, attempts,
//! health records) so that what it announces is what a restart finds; it never reads the store
//! after start, so answering status or `/v1/device` does no I/O.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
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
    completions: watch::Sender<Completion>,
    health: Mutex<DeviceHealth>,
    raw_data: Mutex<Option<RawDataMeta>>,
    pub metrics: Metrics,
    pub heartbeats: Heartbeats,
    /// Monotonic start time, the origin of heartbeats and uptime.
    pub started: Instant,
    clock: Arc<WallClock>,
    proxy_clock: Arc<PeerClock>,
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
            completions: watch::Sender::new(Completion {
                seq: 0,
                record: None,
            }),
            health: Mutex::new(health),
            raw_data: Mutex::new(loaded.raw_data.as_ref().map(RawDataMeta::from)),
            metrics: Metrics::default(),
            heartbeats: Heartbeats::default(),
            started: Instant::now(),
            clock,
            proxy_clock,
            config,
            store,
        })
    }

    /// Unix seconds now, on the daemon's wall clock.
    pub fn now(&self) -> i64 {
        self.clock.now()
    }

    /// The time now on both clocks the daemon knows.
    pub fn time(&self) -> Now {
        Now {
            local: self.clock.now(),
            proxy: self.proxy_clock.now(),
        }
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
        served
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
    /// and status shows it); the answer says whether it reached the disk.
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
        let refresh = !held_fresh || held_by_error;
        if refresh {
            self.request_fresh_refresh();
        }
        RawDataAccepted {
            accepted: true,
            refresh_triggered: refresh,
            persisted,
        }
    }

    /// Stores `raw` as the newest raw_data and shows it in status. The store holds it from now
    /// on even when the write fails (the error says so; status shows the store not persisting).
    pub fn save_raw_data(&self, raw: RawData) -> Result<(), StoreError> {
        let saved = self.store.save_raw_data(&raw);
        *lock(&self.raw_data) = Some(RawDataMeta::from(&raw));
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

    /// Asks for a refresh and returns the completion sequence number that will answer it.
    /// A refresh already running is joined, not doubled: its completion is the answer.
    pub fn request_refresh(&self) -> u64 {
        let mut status = self.refresh_status();
        let seq = self.completions.borrow().seq;
        if !status.in_flight {
            status.requested = true;
            self.kick.notify_one();
        }
        seq + 1
    }

    /// Asks for a refresh that must use data newer than any refresh running now (new
    /// raw_data): it never joins a running one.
    pub fn request_fresh_refresh(&self) {
        self.refresh_status().requested = true;
        self.kick.notify_one();
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
        std::mem::take(&mut status.requested)
    }

    /// Whether a refresh was requested and has not started.
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
        }
        self.completions.send_modify(|c| {
            c.seq += 1;
            c.record = Some(record);
        });
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
