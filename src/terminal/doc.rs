//! The documents of the socket API, as types: what the daemon answers and what its clients
//! (`authinfod status`, `get`, `refresh`, `put-raw-data`, the demo, tests) read back, and the one
//! table of routes.
//!
//! Owns: the JSON shape of every answer ([`AuthinfoDoc`], [`StatusDoc`], [`DeviceDoc`], the
//! refresh and raw-data answers, [`HealthzDoc`], [`ErrorDoc`]) and [`Route`]. It must not compute
//! anything: the API fills these from the state; clients only read them.

use serde::{Deserialize, Serialize};

use crate::wire;

// === routes ===

/// The socket API's routes: the one table the router, the `Allow` header and the metrics label
/// are read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Authinfo,
    RawData,
    Refresh,
    Status,
    Device,
    Healthz,
    Metrics,
}

impl Route {
    pub const ALL: [Route; 7] = [
        Route::Authinfo,
        Route::RawData,
        Route::Refresh,
        Route::Status,
        Route::Device,
        Route::Healthz,
        Route::Metrics,
    ];

    /// Its path.
    pub fn path(self) -> &'static str {
        match self {
            Route::Authinfo => "/v1/authinfo",
            Route::RawData => "/v1/raw-data",
            Route::Refresh => "/v1/refresh",
            Route::Status => "/v1/status",
            Route::Device => "/v1/device",
            Route::Healthz => "/healthz",
            Route::Metrics => "/metrics",
        }
    }

    /// The one method it answers.
    pub fn method(self) -> http::Method {
        match self {
            Route::RawData => http::Method::PUT,
            Route::Refresh => http::Method::POST,
            _ => http::Method::GET,
        }
    }

    /// The method as the `Allow` header names it.
    pub fn allow(self) -> &'static str {
        match self {
            Route::RawData => "PUT",
            Route::Refresh => "POST",
            _ => "GET",
        }
    }

    /// The route at `path`, if any.
    pub fn from_path(path: &str) -> Option<Route> {
        Self::ALL.into_iter().find(|r| r.path() == path)
    }

    /// The metrics label of a request path: its route's path, else `other` (bounded
    /// cardinality whatever clients send).
    pub fn label(path: &str) -> &'static str {
        Self::from_path(path).map_or("other", Route::path)
    }
}

// === GET /v1/authinfo ===

/// How usable the held authinfo is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Freshness {
    /// Younger than the refresh interval.
    Fresh,
    /// Older than the refresh interval (or of unknown age), still within its validity.
    Stale,
    /// Past its validity.
    Expired,
}

impl Freshness {
    /// Its spelling in the documents and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Freshness::Fresh => "fresh",
            Freshness::Stale => "stale",
            Freshness::Expired => "expired",
        }
    }
}

/// By which clock an authinfo's age is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgeBasis {
    /// The terminal's wall clock.
    LocalClock,
    /// The proxy's clock (its `Date`), both at the fetch and now: right even when the terminal's
    /// clock is not.
    ProxyClock,
    /// It cannot be told: the authinfo was fetched in the future of the terminal's clock (the
    /// clock was set back) and the proxy has not answered since.
    Unknown,
}

impl AgeBasis {
    pub fn as_str(self) -> &'static str {
        match self {
            AgeBasis::LocalClock => "local_clock",
            AgeBasis::ProxyClock => "proxy_clock",
            AgeBasis::Unknown => "unknown",
        }
    }
}

/// `GET /v1/authinfo`'s body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthinfoDoc {
    /// The secret itself, for the face SDK.
    pub authinfo: String,
    pub fetched_at: String,
    pub expires_at: String,
    /// `null` when the age cannot be told (see [`AgeBasis::Unknown`]); `state` is then `stale`
    /// at best.
    pub age_seconds: Option<u64>,
    pub state: Freshness,
}

// === PUT /v1/raw-data, POST /v1/refresh ===

/// `PUT /v1/raw-data`'s body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDataBody {
    pub raw_data: String,
}

/// `PUT /v1/raw-data`'s answer (202).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawDataAccepted {
    pub accepted: bool,
    /// Whether the new raw_data started a refresh (no fresh authinfo, or a permanent error
    /// was holding retries).
    pub refresh_triggered: bool,
    /// When the refresh it triggered waits for the forced-refresh limit: the seconds until it
    /// starts (it does, with the newest raw_data, without another request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_deferred_seconds: Option<u64>,
    /// Whether it reached the disk. `false` while the store is not persisting (full or
    /// read-only disk; see the status): it is used all the same, and written once the disk
    /// takes it.
    #[serde(default = "yes")]
    pub persisted: bool,
}

fn yes() -> bool {
    true
}

/// `POST /v1/refresh`'s answer without `?wait=true` (202).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshAccepted {
    pub accepted: bool,
}

/// `POST /v1/refresh?wait=true`'s answer when the refresh succeeded (200).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshDone {
    pub ok: bool,
    /// The new authinfo's fingerprint (first 8 hex of its SHA-256), never the value.
    pub fingerprint: String,
    pub fetched_at: String,
    pub expires_at: String,
    pub state: Freshness,
}

// === GET /healthz ===

/// `GET /healthz`'s body: 200 while a non-expired authinfo is held, else 503.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthzDoc {
    /// `ok` or `no_valid_authinfo`.
    pub status: String,
    pub authinfo_state: HeldState,
}

pub use crate::wire::HeldState;

impl From<Option<Freshness>> for HeldState {
    fn from(f: Option<Freshness>) -> Self {
        match f {
            Some(Freshness::Fresh) => HeldState::Fresh,
            Some(Freshness::Stale) => HeldState::Stale,
            Some(Freshness::Expired) => HeldState::Expired,
            None => HeldState::None,
        }
    }
}

// === errors ===

/// Every error answer: `{"code": "UPPER_SNAKE", "message": "..."}`, and with a 429 the seconds
/// to wait (also in `Retry-After`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDoc {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<u64>,
}

// === GET /v1/device ===

pub use crate::wire::CheckState;

/// One check in `GET /v1/device`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckDoc<T> {
    pub state: CheckState,
    pub value: Option<T>,
    pub fetched_at: Option<String>,
    pub age_seconds: Option<i64>,
    pub last_attempt_at: Option<String>,
    pub last_error: Option<String>,
    /// The last attempt's error code: the platform's when it answered (`DEVICE_NOT_EXIST`).
    #[serde(default)]
    pub last_error_code: Option<String>,
}

/// The licence as `GET /v1/device` shows it: the proxy's answer and the days left.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LicenceDoc {
    #[serde(flatten)]
    pub licence: wire::Licence,
    /// Days of validity left at the time of the answer (negative once lapsed), when the
    /// expiry date reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub days_left: Option<i64>,
}

/// `GET /v1/device`, and the `device` part of the status document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceDoc {
    pub inspection: CheckDoc<wire::Inspection>,
    pub alipay_binding: CheckDoc<wire::AlipayBinding>,
    pub licence: CheckDoc<LicenceDoc>,
}

// === GET /v1/status ===

/// `GET /v1/status`, the document `authinfod status` renders.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusDoc {
    pub version: String,
    pub device_id: String,
    pub uptime_seconds: u64,
    pub authinfo: AuthinfoStatus,
    pub refresh: RefreshDoc,
    pub raw_data: RawDataDoc,
    pub proxy: ProxyDoc,
    pub store: StoreDoc,
    pub device: DeviceDoc,
}

/// The authinfo part of the status document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthinfoStatus {
    pub state: HeldState,
    pub fingerprint: Option<String>,
    pub fetched_at: Option<String>,
    pub expires_at: Option<String>,
    pub age_seconds: Option<u64>,
    /// By which clock the age is told.
    pub age_basis: Option<AgeBasis>,
    /// Seconds of validity left: how long the terminal can work offline. Never more than the
    /// validity (with an unknown age, the whole validity: the most it can be).
    pub runway_seconds: Option<u64>,
    /// Whether `expires_at` comes from the platform (`true`) or the assumed validity.
    pub expiry_from_platform: Option<bool>,
}

/// The refresh part of the status document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// `refresh.min_forced_interval`: the shortest time between the starts of forced refreshes
    /// while a fresh authinfo is held.
    #[serde(default)]
    pub min_forced_interval_seconds: u64,
    /// Seconds until a forced refresh (`POST /v1/refresh`) is allowed; 0: now.
    #[serde(default)]
    pub forced_refresh_allowed_in_seconds: u64,
}

/// The raw_data part of the status document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawDataDoc {
    pub present: bool,
    pub received_at: Option<String>,
    /// First 8 hex of its SHA-256 (never the value).
    pub fingerprint: Option<String>,
    pub source: Option<String>,
    pub command_configured: bool,
}

/// The proxy part of the status document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyDoc {
    pub url: String,
    pub reachable: Option<bool>,
    pub clock_skew_seconds: Option<i64>,
}

/// The store's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreState {
    /// Everything held is on disk, and nothing was found damaged since start.
    Ok,
    /// Something was found damaged, deleted or rolled back since start and restored (see
    /// `last_recovery`); everything held is on disk.
    Recovered,
    /// Writes fail (see `not_persisting_reason`): what is held is served from memory only and
    /// is written as soon as the disk takes it.
    NotPersisting,
}

impl StoreState {
    pub fn as_str(self) -> &'static str {
        match self {
            StoreState::Ok => "ok",
            StoreState::Recovered => "recovered",
            StoreState::NotPersisting => "not_persisting",
        }
    }
}

/// One repair of the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryDoc {
    pub at: String,
    /// What was damaged, deleted or behind.
    pub damaged: String,
    /// `copy`, `sled`, `memory` (the running daemon's) or `nothing`.
    pub restored_from: String,
    /// What was restored (the authinfo by fingerprint).
    pub restored: String,
    /// Where a store that could not be opened was moved.
    pub moved_to: Option<String>,
}

/// The store part of the status document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreDoc {
    pub state: StoreState,
    pub not_persisting_reason: Option<String>,
    pub not_persisting_since: Option<String>,
    /// Repairs since start.
    pub recoveries: u64,
    pub last_recovery: Option<RecoveryDoc>,
    /// The generation of the last write: it grows with every write.
    pub generation: u64,
    /// When a write last reached the disk.
    pub last_persist_at: Option<String>,
    /// The state directory.
    pub path: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_one_table_of_paths_methods_and_labels() {
        for (i, route) in Route::ALL.into_iter().enumerate() {
            assert_eq!(Route::from_path(route.path()), Some(route));
            assert_eq!(Route::label(route.path()), route.path());
            // The metrics index their counters by `route as usize`.
            assert_eq!(route as usize, i);
        }
        assert_eq!(Route::from_path("/v1/authinfo/x"), None);
        assert_eq!(Route::label("/anything/else"), "other");
        assert_eq!(Route::RawData.method(), http::Method::PUT);
        assert_eq!(Route::Refresh.method(), http::Method::POST);
        assert_eq!(Route::Status.method(), http::Method::GET);
        for route in Route::ALL {
            assert_eq!(route.allow(), route.method().as_str());
        }
    }

    #[test]
    fn states_are_spelled_in_snake_case() {
        assert_eq!(
            serde_json::to_value(Freshness::Stale).expect("json"),
            "stale"
        );
        assert_eq!(serde_json::to_value(HeldState::None).expect("json"), "none");
        assert_eq!(
            serde_json::to_value(CheckState::NotConfigured).expect("json"),
            "not_configured"
        );
        for f in [Freshness::Fresh, Freshness::Stale, Freshness::Expired] {
            assert_eq!(HeldState::from(Some(f)).as_str(), f.as_str());
            assert_eq!(serde_json::to_value(f).expect("json"), f.as_str());
        }
        for b in [
            AgeBasis::LocalClock,
            AgeBasis::ProxyClock,
            AgeBasis::Unknown,
        ] {
            assert_eq!(serde_json::to_value(b).expect("json"), b.as_str());
        }
        for st in [
            StoreState::Ok,
            StoreState::Recovered,
            StoreState::NotPersisting,
        ] {
            assert_eq!(serde_json::to_value(st).expect("json"), st.as_str());
        }
        for c in [
            CheckState::Ok,
            CheckState::Error,
            CheckState::Pending,
            CheckState::NotConfigured,
        ] {
            assert_eq!(serde_json::to_value(c).expect("json"), c.as_str());
        }
    }
}
