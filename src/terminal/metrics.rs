//! Counters for `GET /metrics`, rendered in the Prometheus text format.
//!
//! Owns: the counters and the rendering. Gauges derived from state (authinfo age, runway) are
//! computed at render time by the caller, so nothing here can drift from the truth.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::prometheus::Text;

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
        *crate::sync::lock(&self.requests)
            .entry((route, status))
            .or_default() += 1;
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

    pub fn refreshes(&self, outcome: &str) -> u64 {
        crate::sync::lock(&self.refreshes)
            .get(outcome)
            .copied()
            .unwrap_or(0)
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
        let name = "authinfod_socket_requests_total";
        t.family(name, "counter", "Socket API requests by route and status.");
        for ((route, status), n) in crate::sync::lock(&self.requests).iter() {
            t.sample(name, &[("route", route), ("status", status)], n);
        }
        let name = "authinfod_refresh_attempts_total";
        t.family(name, "counter", "Authinfo refresh attempts by outcome.");
        for (outcome, n) in crate::sync::lock(&self.refreshes).iter() {
            t.sample(name, &[("outcome", outcome)], n);
        }
        let name = "authinfod_health_checks_total";
        t.family(
            name,
            "counter",
            "Device health checks by check and outcome.",
        );
        for ((check, outcome), n) in crate::sync::lock(&self.checks).iter() {
            t.sample(name, &[("check", check), ("outcome", outcome)], n);
        }
        t.single(
            "authinfod_socket_peers_denied_total",
            "counter",
            "Socket connections refused by the peer-credential allow-list.",
            self.peers_denied.load(Ordering::Relaxed),
        );
        t.single(
            "authinfod_socket_connections_over_cap_total",
            "counter",
            "Socket connections refused because max_connections were open.",
            self.connections_over_cap.load(Ordering::Relaxed),
        );
        t.single(
            "authinfod_socket_connections_open",
            "gauge",
            "Socket connections open now.",
            self.connections_open.load(Ordering::Relaxed),
        );
        t.finish()
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
        let text = m.render(
            &[("authinfod_authinfo_age_seconds", "Age.", 12.0)],
            &[("authinfod_store_recoveries_total", "Repairs.", 3)],
        );
        assert!(
            text.contains(
                "authinfod_socket_requests_total{route=\"/v1/authinfo\",status=\"200\"} 2"
            )
        );
        assert!(text.contains("authinfod_refresh_attempts_total{outcome=\"ok\"} 1"));
        assert!(text.contains(
            "# TYPE authinfod_store_recoveries_total counter\nauthinfod_store_recoveries_total 3"
        ));
        assert!(text.contains(
            "# TYPE authinfod_authinfo_age_seconds gauge\nauthinfod_authinfo_age_seconds 12"
        ));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').expect("name value");
            value.parse::<f64>().expect("numeric sample");
        }
    }
}
