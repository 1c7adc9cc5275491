//! The proxy's counters and histograms for `/metrics` on the admin listener.
//!
//! Owns: the series and their Prometheus text rendering. Label values come from fixed sets
//! (the router's routes or `other`, codes, platforms), so cardinality stays bounded whatever
//! terminals send.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::prometheus::Text;
use crate::sync::lock;

/// Upper bounds (seconds) of the upstream latency histogram.
const BUCKETS: [f64; 10] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Debug, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// The proxy's metrics.
#[derive(Debug, Default)]
pub struct ProxyMetrics {
    /// Terminal requests by (route, HTTP status, outcome: the answer's code in lower case,
    /// `ok` for success).
    requests: Mutex<BTreeMap<(String, u16, String), u64>>,
    /// Refused authentications by reason code.
    auth_failures: Mutex<BTreeMap<&'static str, u64>>,
    /// Upstream call latency by platform.
    upstream: Mutex<BTreeMap<&'static str, Histogram>>,
    /// Upstream failures by (platform, class).
    upstream_failures: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// Requests refused by a limit, by (route, limit: `device` or `merchant`).
    rate_limited: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
}

impl ProxyMetrics {
    /// Counts a terminal request; `route` is a route the router matched, or `other`.
    /// `outcome` is the answer's code (`OK`, `BAD_SIGNATURE`): labelled in lower case, the one
    /// style of every `outcome` label on both binaries (README, Metrics).
    pub fn count_request(&self, route: &str, status: u16, outcome: &str) {
        *lock(&self.requests)
            .entry((route.to_owned(), status, outcome.to_ascii_lowercase()))
            .or_default() += 1;
    }

    pub fn count_auth_failure(&self, code: &'static str) {
        *lock(&self.auth_failures).entry(code).or_default() += 1;
    }

    pub fn observe_upstream(&self, platform: &'static str, elapsed: Duration) {
        let mut all = lock(&self.upstream);
        let h = all.entry(platform).or_default();
        let secs = elapsed.as_secs_f64();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += secs;
    }

    pub fn count_upstream_failure(&self, platform: &'static str, class: &'static str) {
        *lock(&self.upstream_failures)
            .entry((platform, class))
            .or_default() += 1;
    }

    /// Counts a request on `route` refused by the `limit` (`device` or `merchant`) before it
    /// was forwarded.
    pub fn count_rate_limited(&self, route: &'static str, limit: &'static str) {
        *lock(&self.rate_limited).entry((route, limit)).or_default() += 1;
    }

    /// How many requests on `route` the `limit` refused (tests).
    pub fn rate_limited(&self, route: &str, limit: &str) -> u64 {
        lock(&self.rate_limited)
            .iter()
            .filter(|((r, l), _)| *r == route && *l == limit)
            .map(|(_, n)| *n)
            .sum()
    }

    /// How many requests got `outcome` on `route` (tests).
    pub fn requests(&self, route: &str, outcome: &str) -> u64 {
        lock(&self.requests)
            .iter()
            .filter(|((r, _, o), _)| *r == route && o.eq_ignore_ascii_case(outcome))
            .map(|(_, n)| *n)
            .sum()
    }

    /// Renders every series, plus `gauges`.
    pub fn render(&self, gauges: &[(&str, &str, f64)]) -> String {
        let mut t = Text::default();
        t.build_info("authinfo_proxy", "Version of the running proxy.");
        t.gauges(gauges);
        t.labelled(
            "authinfo_proxy_requests_total",
            "counter",
            "Terminal requests by route, HTTP status and outcome (the answer's code, lower case).",
            &["route", "status", "outcome"],
            lock(&self.requests).iter(),
        );
        t.labelled(
            "authinfo_proxy_auth_failures_total",
            "counter",
            "Refused terminal authentications (signature, skew, replay, unknown device) by reason.",
            &["reason"],
            lock(&self.auth_failures)
                .iter()
                .map(|(code, n)| (code.to_ascii_lowercase(), *n)),
        );
        t.labelled(
            "authinfo_proxy_rate_limited_total",
            "counter",
            "Terminal requests refused before forwarding by a per-device bucket (limit=device) or the merchant's ceiling (limit=merchant), by route.",
            &["route", "limit"],
            lock(&self.rate_limited).iter(),
        );
        t.labelled(
            "authinfo_proxy_upstream_failures_total",
            "counter",
            "Platform call failures by platform and class.",
            &["platform", "class"],
            lock(&self.upstream_failures).iter(),
        );
        let name = "authinfo_proxy_upstream_seconds";
        t.family(name, "histogram", "Platform call latency.");
        for (platform, h) in lock(&self.upstream).iter() {
            let bucket = format!("{name}_bucket");
            for (bound, count) in BUCKETS.iter().zip(h.counts) {
                t.sample(&bucket, &[("platform", platform), ("le", bound)], count);
            }
            t.sample(&bucket, &[("platform", platform), ("le", &"+Inf")], h.count);
            t.sample(&format!("{name}_sum"), &[("platform", platform)], h.sum);
            t.sample(&format!("{name}_count"), &[("platform", platform)], h.count);
        }
        t.process();
        t.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = ProxyMetrics::default();
        m.observe_upstream("wechatpay", Duration::from_millis(20));
        m.observe_upstream("wechatpay", Duration::from_millis(700));
        let text = m.render(&[]);
        assert!(
            text.contains(
                "authinfo_proxy_upstream_seconds_bucket{platform=\"wechatpay\",le=\"0.025\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "authinfo_proxy_upstream_seconds_bucket{platform=\"wechatpay\",le=\"1\"} 2"
            ),
            "{text}"
        );
        assert!(text.contains("authinfo_proxy_upstream_seconds_count{platform=\"wechatpay\"} 2"));
    }
}
