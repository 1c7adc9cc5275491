//! Counters for `GET /metrics`, rendered in the Prometheus text format.
//!
//! Owns: the counters and the rendering. Gauges derived from state (authinfo age, runway) are
//! computed at render time by the caller, so nothing here can drift from the truth.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// The daemon's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Socket requests by (route, status).
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    /// Connections refused by the peer-credential check.
    pub peers_denied: AtomicU64,
    /// Connections refused because the connection cap was reached.
    pub connections_over_cap: AtomicU64,
    /// Connections open now.
    pub connections_open: AtomicU64,
    /// Refresh attempts by outcome.
    refreshes: Mutex<BTreeMap<&'static str, u64>>,
    /// Health checks by (check, outcome).
    checks: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
}

impl Metrics {
    pub fn count_request(&self, route: &'static str, status: u16) {
        *super::state::lock(&self.requests)
            .entry((route, status))
            .or_default() += 1;
    }

    /// `outcome`: `ok`, `retryable_error`, `permanent_error`, `no_raw_data`.
    pub fn count_refresh(&self, outcome: &'static str) {
        *super::state::lock(&self.refreshes)
            .entry(outcome)
            .or_default() += 1;
    }

    /// `outcome`: `ok`, `error`, `not_configured`.
    pub fn count_check(&self, check: &'static str, outcome: &'static str) {
        *super::state::lock(&self.checks)
            .entry((check, outcome))
            .or_default() += 1;
    }

    pub fn refreshes(&self, outcome: &str) -> u64 {
        super::state::lock(&self.refreshes)
            .get(outcome)
            .copied()
            .unwrap_or(0)
    }

    /// Renders the counters and the given gauges.
    pub fn render(&self, gauges: &[(&str, &str, f64)]) -> String {
        let mut out = String::with_capacity(2048);
        let _ = writeln!(
            out,
            "# HELP authinfod_build_info Version of the running daemon.\n# TYPE authinfod_build_info gauge\nauthinfod_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        for (name, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP authinfod_socket_requests_total Socket API requests by route and status.\n# TYPE authinfod_socket_requests_total counter"
        );
        for ((route, status), n) in super::state::lock(&self.requests).iter() {
            let _ = writeln!(
                out,
                "authinfod_socket_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP authinfod_refresh_attempts_total Authinfo refresh attempts by outcome.\n# TYPE authinfod_refresh_attempts_total counter"
        );
        for (outcome, n) in super::state::lock(&self.refreshes).iter() {
            let _ = writeln!(
                out,
                "authinfod_refresh_attempts_total{{outcome=\"{outcome}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP authinfod_health_checks_total Device health checks by check and outcome.\n# TYPE authinfod_health_checks_total counter"
        );
        for ((check, outcome), n) in super::state::lock(&self.checks).iter() {
            let _ = writeln!(
                out,
                "authinfod_health_checks_total{{check=\"{check}\",outcome=\"{outcome}\"}} {n}"
            );
        }
        for (name, help, counter) in [
            (
                "authinfod_socket_peers_denied_total",
                "Socket connections refused by the peer-credential allow-list.",
                &self.peers_denied,
            ),
            (
                "authinfod_socket_connections_over_cap_total",
                "Socket connections refused because max_connections were open.",
                &self.connections_over_cap,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                counter.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP authinfod_socket_connections_open Socket connections open now.\n# TYPE authinfod_socket_connections_open gauge\nauthinfod_socket_connections_open {}",
            self.connections_open.load(Ordering::Relaxed)
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_is_prometheus_text_with_labels() {
        let m = Metrics::default();
        m.count_request("/v1/authinfo", 200);
        m.count_request("/v1/authinfo", 200);
        m.count_refresh("ok");
        let text = m.render(&[("authinfod_authinfo_age_seconds", "Age.", 12.0)]);
        assert!(
            text.contains(
                "authinfod_socket_requests_total{route=\"/v1/authinfo\",status=\"200\"} 2"
            )
        );
        assert!(text.contains("authinfod_refresh_attempts_total{outcome=\"ok\"} 1"));
        assert!(text.contains(
            "# TYPE authinfod_authinfo_age_seconds gauge\nauthinfod_authinfo_age_seconds 12"
        ));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').expect("name value");
            value.parse::<f64>().expect("numeric sample");
        }
    }
}
