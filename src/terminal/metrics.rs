//! Counters for `GET /metrics`, rendered in the Prometheus text format.
//!
//! Owns: the counters, their label sets ([`Denial`], [`Busy`], [`Closed`]) and the rendering.
//! The socket's counters are plain atomics in fixed tables, so counting a request takes no lock
//! (every request counts one). Gauges derived from state (authinfo age, runway) are computed at
//! render time by the caller, so nothing here can drift from the truth.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::doc::Route;
use crate::prometheus::Text;

/// Why a socket peer was denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Denial {
    /// Its uid and gid are on neither allow-list.
    NotAllowed,
    /// Its credentials (SO_PEERCRED) could not be read.
    NoCredentials,
}

/// Why the daemon answered 503 `BUSY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// Every slot was held by requests in progress.
    Connections,
    /// The peer's uid held its share of the slots, none idle.
    UidConnections,
    /// `max_waiting_requests` requests were already waiting.
    WaitingRequests,
}

/// Why the daemon closed a connection of its own accord.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// It sent nothing within `first_byte_timeout`.
    FirstByteTimeout,
    /// It had sent nothing yet and was the oldest such when the pending cap was reached.
    EvictedPending,
    /// It was the one idle the longest when a new request needed its slot.
    EvictedIdle,
    /// A denied peer's connection over `max_denied_connections`, closed unanswered.
    DeniedUnanswered,
}

impl Denial {
    const ALL: [Self; 2] = [Self::NotAllowed, Self::NoCredentials];
    fn label(self) -> &'static str {
        match self {
            Self::NotAllowed => "not_allowed",
            Self::NoCredentials => "no_credentials",
        }
    }
}

impl Busy {
    const ALL: [Self; 3] = [
        Self::Connections,
        Self::UidConnections,
        Self::WaitingRequests,
    ];
    fn label(self) -> &'static str {
        match self {
            Self::Connections => "connections",
            Self::UidConnections => "uid_connections",
            Self::WaitingRequests => "waiting_requests",
        }
    }
}

impl Closed {
    const ALL: [Self; 4] = [
        Self::FirstByteTimeout,
        Self::EvictedPending,
        Self::EvictedIdle,
        Self::DeniedUnanswered,
    ];
    fn label(self) -> &'static str {
        match self {
            Self::FirstByteTimeout => "first_byte_timeout",
            Self::EvictedPending => "evicted_pending",
            Self::EvictedIdle => "evicted_idle",
            Self::DeniedUnanswered => "denied_unanswered",
        }
    }
}

/// The statuses the socket API answers, each with its own counter per route; any other lands
/// in a locked map (never on the answers the API gives today).
const STATUSES: [u16; 13] = [
    200, 202, 304, 400, 403, 404, 405, 413, 431, 500, 502, 503, 504,
];
/// Routes plus one for paths that are none (`other`).
const ROUTES: usize = Route::ALL.len() + 1;

/// The daemon's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Socket requests by (route, status), `STATUSES` order; the last route is `other`.
    requests: [[AtomicU64; STATUSES.len()]; ROUTES],
    /// Socket requests with a status outside `STATUSES`.
    requests_other_status: Mutex<BTreeMap<(&'static str, u16), u64>>,
    /// Connections refused by the peer-credential check, by [`Denial`].
    peers_denied: [AtomicU64; Denial::ALL.len()],
    /// 503 `BUSY` answers, by [`Busy`].
    busy: [AtomicU64; Busy::ALL.len()],
    /// Connections the daemon closed itself, by [`Closed`].
    closed: [AtomicU64; Closed::ALL.len()],
    /// Connections holding a slot now.
    pub connections_open: AtomicU64,
    /// Connections accepted that have not sent a byte yet.
    pub connections_pending: AtomicU64,
    /// Requests waiting now (`?wait=`).
    pub requests_waiting: AtomicU64,
    /// Refresh attempts by outcome.
    refreshes: Mutex<BTreeMap<&'static str, u64>>,
    /// Health checks by (check, outcome).
    checks: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// Health reports to the proxy by outcome.
    reports: Mutex<BTreeMap<&'static str, u64>>,
}

fn route_index(route: Option<Route>) -> usize {
    route.map_or(Route::ALL.len(), |r| r as usize)
}

fn route_label(index: usize) -> &'static str {
    Route::ALL.get(index).map_or("other", |r| r.path())
}

impl Metrics {
    /// Counts one socket request answered with `status` (`route`: `None` for unknown paths).
    pub fn count_request(&self, route: Option<Route>, status: u16) {
        match STATUSES.iter().position(|s| *s == status) {
            Some(i) => {
                self.requests[route_index(route)][i].fetch_add(1, Ordering::Relaxed);
            }
            None => {
                let label = route_label(route_index(route));
                *crate::sync::lock(&self.requests_other_status)
                    .entry((label, status))
                    .or_default() += 1;
            }
        }
    }

    pub fn count_denial(&self, reason: Denial) {
        self.peers_denied[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_busy(&self, reason: Busy) {
        self.busy[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_closed(&self, reason: Closed) {
        self.closed[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Denied connections so far, for `reason`.
    pub fn denials(&self, reason: Denial) -> u64 {
        self.peers_denied[reason as usize].load(Ordering::Relaxed)
    }

    /// 503 `BUSY` answers so far, for `reason`.
    pub fn busy_answers(&self, reason: Busy) -> u64 {
        self.busy[reason as usize].load(Ordering::Relaxed)
    }

    /// Connections closed by the daemon so far, for `reason`.
    pub fn closed(&self, reason: Closed) -> u64 {
        self.closed[reason as usize].load(Ordering::Relaxed)
    }

    /// `outcome`: `ok`, `retryable_error`, `permanent_error`, `no_raw_data`.
    pub fn count_refresh(&self, outcome: &'static str) {
        *crate::sync::lock(&self.refreshes)
            .entry(outcome)
            .or_default() += 1;
    }

    /// `outcome`: `ok`, `error`, `not_configured`.
    pub fn count_check(&self, check: &'static str, outcome: &'static str) {
        *crate::sync::lock(&self.checks)
            .entry((check, outcome))
            .or_default() += 1;
    }

    /// `outcome`: `ok`, `error`.
    pub fn count_report(&self, outcome: &'static str) {
        *crate::sync::lock(&self.reports).entry(outcome).or_default() += 1;
    }

    /// Reports sent with `outcome`.
    pub fn reports(&self, outcome: &str) -> u64 {
        crate::sync::lock(&self.reports)
            .get(outcome)
            .copied()
            .unwrap_or(0)
    }

    pub fn refreshes(&self, outcome: &str) -> u64 {
        crate::sync::lock(&self.refreshes)
            .get(outcome)
            .copied()
            .unwrap_or(0)
    }

    /// The request counters that are not zero, in (route, status) order.
    fn request_samples(&self) -> Vec<((&'static str, u16), u64)> {
        let mut samples: Vec<_> = self
            .requests
            .iter()
            .enumerate()
            .flat_map(|(r, row)| {
                row.iter().zip(STATUSES).filter_map(move |(n, status)| {
                    let n = n.load(Ordering::Relaxed);
                    (n > 0).then_some(((route_label(r), status), n))
                })
            })
            .collect();
        samples.extend(
            crate::sync::lock(&self.requests_other_status)
                .iter()
                .map(|(k, n)| (*k, *n)),
        );
        samples.sort_unstable();
        samples
    }

    /// Renders the counters, the given gauges and the given counters kept elsewhere (the
    /// store's), each `(name, help, value)`.
    pub fn render(&self, gauges: &[(&str, &str, f64)], counters: &[(&str, &str, u64)]) -> String {
        let mut t = Text::default();
        t.build_info("authinfod", "Version of the running daemon.");
        t.gauges(gauges);
        for (name, help, value) in counters {
            t.single(name, "counter", help, value);
        }
        t.labelled(
            "authinfod_socket_requests_total",
            "counter",
            "Socket API requests by route and status.",
            &["route", "status"],
            self.request_samples(),
        );
        t.labelled(
            "authinfod_refresh_attempts_total",
            "counter",
            "Authinfo refresh attempts by outcome.",
            &["outcome"],
            crate::sync::lock(&self.refreshes).iter(),
        );
        t.labelled(
            "authinfod_health_checks_total",
            "counter",
            "Device health checks by check and outcome.",
            &["check", "outcome"],
            crate::sync::lock(&self.checks).iter(),
        );
        t.labelled(
            "authinfod_reports_total",
            "counter",
            "Health reports to the proxy's fleet view by outcome.",
            &["outcome"],
            crate::sync::lock(&self.reports).iter(),
        );
        t.labelled(
            "authinfod_socket_peers_denied_total",
            "counter",
            "Socket connections refused at accept by the peer-credential check, by reason.",
            &["reason"],
            Denial::ALL.map(|r| (r.label(), self.denials(r))),
        );
        t.labelled(
            "authinfod_socket_busy_total",
            "counter",
            "503 BUSY answers on the socket, by the limit that was reached.",
            &["reason"],
            Busy::ALL.map(|r| (r.label(), self.busy_answers(r))),
        );
        t.labelled(
            "authinfod_socket_connections_closed_total",
            "counter",
            "Socket connections the daemon closed of its own accord, by reason.",
            &["reason"],
            Closed::ALL.map(|r| (r.label(), self.closed(r))),
        );
        t.single(
            "authinfod_socket_connections_open",
            "gauge",
            "Socket connections holding a slot now.",
            self.connections_open.load(Ordering::Relaxed),
        );
        t.single(
            "authinfod_socket_connections_pending",
            "gauge",
            "Socket connections accepted that have not sent a byte yet.",
            self.connections_pending.load(Ordering::Relaxed),
        );
        t.single(
            "authinfod_socket_requests_waiting",
            "gauge",
            "Socket requests waiting now (?wait=).",
            self.requests_waiting.load(Ordering::Relaxed),
        );
        t.process();
        t.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_is_prometheus_text_with_labels() {
        let m = Metrics::default();
        m.count_request(Some(Route::Authinfo), 200);
        m.count_request(Some(Route::Authinfo), 200);
        m.count_request(None, 404);
        m.count_request(Some(Route::Status), 418);
        m.count_refresh("ok");
        m.count_denial(Denial::NotAllowed);
        m.count_busy(Busy::WaitingRequests);
        m.count_closed(Closed::FirstByteTimeout);
        let text = m.render(
            &[("authinfod_authinfo_age_seconds", "Age.", 12.0)],
            &[("authinfod_store_recoveries_total", "Repairs.", 3)],
        );
        for line in [
            "authinfod_socket_requests_total{route=\"/v1/authinfo\",status=\"200\"} 2",
            "authinfod_socket_requests_total{route=\"other\",status=\"404\"} 1",
            "authinfod_socket_requests_total{route=\"/v1/status\",status=\"418\"} 1",
            "authinfod_refresh_attempts_total{outcome=\"ok\"} 1",
            "authinfod_socket_peers_denied_total{reason=\"not_allowed\"} 1",
            "authinfod_socket_peers_denied_total{reason=\"no_credentials\"} 0",
            "authinfod_socket_busy_total{reason=\"waiting_requests\"} 1",
            "authinfod_socket_connections_closed_total{reason=\"first_byte_timeout\"} 1",
            "# TYPE authinfod_authinfo_age_seconds gauge\nauthinfod_authinfo_age_seconds 12",
            "# TYPE authinfod_store_recoveries_total counter\nauthinfod_store_recoveries_total 3",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert!(
            !text.contains("status=\"202\""),
            "zero requests are not listed"
        );
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').expect("name value");
            value.parse::<f64>().expect("numeric sample");
        }
    }
}
