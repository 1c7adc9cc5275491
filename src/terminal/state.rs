//! The daemon's shared state: the authinfo being served, the refresh bookkeeping status reads,
//! the device health view, metrics and liveness. One `Arc<State>` is handed to the refresher,
//! the health checker and the socket server.
//!
//! Owns: the in-memory truth and its invariants — the served authinfo changes only through
//! [`State::publish`] (after the store has it), and refresh requests are single-flight
//! ([`State::request_refresh`]). It must not do I/O.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::config::Config;
use super::health::HealthView;
use super::metrics::Metrics;
use super::store::{AttemptRecord, HeldAuthinfo, Store};
use crate::crypto;
use crate::units::{rfc3339, unix_now};

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

    /// Seconds since it was fetched (0 if the wall clock went back past the fetch).
    pub fn age(&self, now: i64) -> u64 {
        u64::try_from(now.saturating_sub(self.held.fetched_at)).unwrap_or(0)
    }

    /// Its freshness at `now` for a refresh interval of `interval`.
    pub fn freshness(&self, now: i64, interval: Duration) -> Freshness {
        if now >= self.held.expires_at {
            Freshness::Expired
        } else if self.age(now) >= interval.as_secs() {
            Freshness::Stale
        } else {
            Freshness::Fresh
        }
    }
}

/// How usable the held authinfo is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Freshness {
    /// Younger than the refresh interval.
    Fresh,
    /// Older than the refresh interval, still within its validity.
    Stale,
    /// Past its validity.
    Expired,
}

/// The refresh bookkeeping that status reports.
#[derive(Debug, Clone, Default)]
pub struct RefreshStatus {
    /// A refresh is running now.
    pub in_flight: bool,
    /// A refresh was asked for and has not started yet.
    pub requested: bool,
    pub last_attempt: Option<AttemptRecord>,
    /// Unix seconds of the last success.
    pub last_success_at: Option<i64>,
    /// When the next attempt is due (wall-clock estimate, for people).
    pub next_attempt_at: Option<i64>,
    pub consecutive_failures: u32,
    /// Whether the last call reached the proxy (an HTTP answer of any status counts).
    pub proxy_reachable: Option<bool>,
    /// The proxy's clock minus ours, in seconds, when learned from a 401.
    pub clock_skew_seconds: Option<i64>,
    /// Why the loop is idle instead of retrying, when it is (`raw_data`, `permanent_error`).
    pub waiting_for: Option<&'static str>,
}

/// The outcome of one finished refresh, as waiters on `POST /v1/refresh?wait=true` see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// How many refreshes have finished since start.
    pub seq: u64,
    pub record: Option<AttemptRecord>,
}

/// Unix-second heartbeats of the long-running loops, for the systemd watchdog.
#[derive(Debug, Default)]
pub struct Heartbeats {
    pub refresh: AtomicU64,
    pub socket: AtomicU64,
}

impl Heartbeats {
    pub fn beat(slot: &AtomicU64, now: Instant, origin: Instant) {
        slot.store(
            now.duration_since(origin).as_millis() as u64,
            Ordering::Relaxed,
        );
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
    pub health: Mutex<HealthView>,
    pub metrics: Metrics,
    pub heartbeats: Heartbeats,
    /// Monotonic start time, the origin of heartbeats and uptime.
    pub started: Instant,
}

impl State {
    /// State for `config`, serving whatever `store` holds.
    pub fn new(config: Config, store: Store, held: Option<HeldAuthinfo>) -> Arc<Self> {
        let last_attempt = store.last_attempt().ok().flatten();
        let last_success_at = held.as_ref().map(|h| h.fetched_at);
        let health = HealthView::load(&store, &config.health);
        Arc::new(Self {
            authinfo: watch::Sender::new(held.map(|h| Arc::new(Served::new(h)))),
            refresh: Mutex::new(RefreshStatus {
                last_attempt,
                last_success_at,
                ..RefreshStatus::default()
            }),
            kick: Notify::new(),
            completions: watch::Sender::new(Completion {
                seq: 0,
                record: None,
            }),
            health: Mutex::new(health),
            metrics: Metrics::default(),
            heartbeats: Heartbeats::default(),
            started: Instant::now(),
            config,
            store,
        })
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
            .map(|s| s.freshness(unix_now(), self.config.refresh.interval))
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

    /// Marks the end of a refresh and wakes its waiters.
    pub fn finish_refresh(&self, record: Option<AttemptRecord>) {
        self.refresh_status().in_flight = false;
        self.completions.send_modify(|c| {
            c.seq += 1;
            c.record = record;
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

    /// Milliseconds since start, on the monotonic clock.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }
}

/// Locks a mutex, recovering the data if a holder panicked: every field here stays meaningful
/// after a panic elsewhere, and a status page that keeps working is worth more than a cascade.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

// === status document ===

/// `GET /v1/status`, the document `authinfod status` renders.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct StatusDoc {
    pub version: String,
    pub device_id: String,
    pub uptime_seconds: u64,
    pub authinfo: AuthinfoStatus,
    pub refresh: RefreshDoc,
    pub raw_data: RawDataDoc,
    pub proxy: ProxyDoc,
    pub device: serde_json::Value,
}

/// The authinfo part of the status document.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct AuthinfoStatus {
    /// `fresh`, `stale`, `expired` or `none`.
    pub state: String,
    pub fingerprint: Option<String>,
    pub fetched_at: Option<String>,
    pub expires_at: Option<String>,
    pub age_seconds: Option<u64>,
    /// Seconds of validity left: how long the terminal can work offline.
    pub runway_seconds: Option<i64>,
    /// Whether `expires_at` comes from the platform (`true`) or the assumed validity.
    pub expiry_from_platform: Option<bool>,
}

/// The refresh part of the status document.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct RefreshDoc {
    pub interval_seconds: u64,
    pub in_flight: bool,
    pub last_attempt_at: Option<String>,
    pub last_attempt_ok: Option<bool>,
    pub last_error_code: Option<String>,
    pub last_error: Option<String>,
    pub last_error_permanent: bool,
    pub last_success_at: Option<String>,
    pub next_attempt_at: Option<String>,
    pub next_attempt_in_seconds: Option<i64>,
    pub consecutive_failures: u32,
    pub waiting_for: Option<String>,
}

/// The raw_data part of the status document.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct RawDataDoc {
    pub present: bool,
    pub received_at: Option<String>,
    pub source: Option<String>,
    pub command_configured: bool,
}

/// The proxy part of the status document.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct ProxyDoc {
    pub url: String,
    pub reachable: Option<bool>,
    pub clock_skew_seconds: Option<i64>,
}

impl State {
    /// The status document now.
    pub fn status(&self) -> StatusDoc {
        let now = unix_now();
        let interval = self.config.refresh.interval;
        let authinfo = match self.current() {
            None => AuthinfoStatus {
                state: "none".into(),
                fingerprint: None,
                fetched_at: None,
                expires_at: None,
                age_seconds: None,
                runway_seconds: None,
                expiry_from_platform: None,
            },
            Some(s) => AuthinfoStatus {
                state: freshness_name(s.freshness(now, interval)).into(),
                fingerprint: Some(s.fingerprint.clone()),
                fetched_at: Some(rfc3339(s.held.fetched_at)),
                expires_at: Some(rfc3339(s.held.expires_at)),
                age_seconds: Some(s.age(now)),
                runway_seconds: Some(s.held.expires_at.saturating_sub(now).max(0)),
                expiry_from_platform: Some(s.held.expires_in.is_some()),
            },
        };
        let raw = self.store.raw_data().ok().flatten();
        let r = self.refresh_status().clone();
        let last = r.last_attempt.as_ref();
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
                last_success_at: r.last_success_at.map(rfc3339),
                next_attempt_at: r.next_attempt_at.map(rfc3339),
                next_attempt_in_seconds: r.next_attempt_at.map(|t| (t - now).max(0)),
                consecutive_failures: r.consecutive_failures,
                waiting_for: r.waiting_for.map(str::to_owned),
            },
            raw_data: RawDataDoc {
                present: raw.is_some(),
                received_at: raw.as_ref().map(|r| rfc3339(r.received_at)),
                source: raw.map(|r| r.source),
                command_configured: self.config.refresh.raw_data_command.is_some(),
            },
            proxy: ProxyDoc {
                url: self.config.proxy.url.clone(),
                reachable: r.proxy_reachable,
                clock_skew_seconds: r.clock_skew_seconds,
            },
            device: lock(&self.health).to_json(now),
        }
    }
}

/// The status-document spelling of a freshness.
pub fn freshness_name(f: Freshness) -> &'static str {
    match f {
        Freshness::Fresh => "fresh",
        Freshness::Stale => "stale",
        Freshness::Expired => "expired",
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
        })
    }

    #[test]
    fn freshness_follows_interval_then_validity() {
        let hour = Duration::from_secs(3600);
        let s = served(1000, 1000 + 7200);
        assert_eq!(s.freshness(1000, hour), Freshness::Fresh);
        assert_eq!(s.freshness(1000 + 3599, hour), Freshness::Fresh);
        assert_eq!(s.freshness(1000 + 3600, hour), Freshness::Stale);
        assert_eq!(s.freshness(1000 + 7200, hour), Freshness::Expired);
        // A clock set back before the fetch reads as age 0, not a huge age.
        assert_eq!(s.age(0), 0);
        assert_eq!(s.freshness(0, hour), Freshness::Fresh);
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
