//! The daemon's health reports to the merchant's proxy (`POST /v1/report`), for its fleet view.
//!
//! Owns: when a report goes (soon after each refresh attempt and health check, the triggers of a
//! few seconds coalesced into one; at start; and at least every [`REPORT_INTERVAL`], up to
//! [`REPORT_JITTER`] early so a fleet spreads out), what it says ([`build`], from the status
//! document: never the authinfo, only its fingerprint), and that reporting can never affect
//! refreshing: it is its own task, one report in flight at a time and bounded by
//! [`REPORT_TIMEOUT`], never retried (the next report replaces a lost one, so nothing piles up),
//! a failure logged once when reports start failing and counted in the metrics. It must not
//! touch the store or the refresh schedule.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::doc::{CheckDoc, StatusDoc};
use super::health::alipay_unbound;
use super::proxy_client::{Upstream, UpstreamError};
use super::state::State;
use crate::wire::{
    BindingState, CheckState, Report, ReportReceipt, ReportedAuthinfo, ReportedCheck,
    ReportedRefresh, StoreHealth,
};

/// The longest a terminal goes without reporting while it runs.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(15 * 60);
/// How much earlier than [`REPORT_INTERVAL`] a periodic report may go (a fraction of it).
pub const REPORT_JITTER: f64 = 0.1;
/// How long after a trigger the report waits for more (a refresh and three health checks at
/// start make one report, not four).
pub const REPORT_SETTLE: Duration = Duration::from_secs(2);
/// The most one report may take, whatever the proxy client's own timeout.
pub const REPORT_TIMEOUT: Duration = Duration::from_secs(60);

/// The report the status document `status` makes at `now` (the daemon's wall clock).
pub fn build(status: &StatusDoc, now: i64) -> Report {
    let a = &status.authinfo;
    let r = &status.refresh;
    let d = &status.device;
    Report {
        version: status.version.clone(),
        sent_at: now,
        uptime_seconds: status.uptime_seconds,
        authinfo: ReportedAuthinfo {
            state: a.state,
            fingerprint: a.fingerprint.clone(),
            age_seconds: a.age_seconds,
            runway_seconds: a
                .runway_seconds
                .map(|r| i64::try_from(r).unwrap_or(i64::MAX)),
            expires_at: a.expires_at.clone(),
        },
        refresh: ReportedRefresh {
            last_attempt_ok: r.last_attempt_ok,
            last_error_code: r.last_error_code.clone(),
            last_error_permanent: r.last_error_permanent,
            consecutive_failures: r.consecutive_failures,
        },
        raw_data_present: status.raw_data.present,
        clock_skew_seconds: status.proxy.clock_skew_seconds,
        store: store_health(status),
        inspection: reported(&d.inspection, |i| Some(i.result)),
        alipay_binding: reported(&d.alipay_binding, |_| Some(BindingState::Bound)).with_binding(),
        licence: reported(&d.licence, |l| Some(l.licence.expired_day.clone())),
    }
}

/// The store's health as the report tells it. The status document does not carry it yet (issue
/// 9 adds its `store` part; map it here then), so the report says `unknown`.
fn store_health(_status: &StatusDoc) -> StoreHealth {
    StoreHealth::Unknown
}

/// One check of the status document as the report carries it.
fn reported<T, U>(check: &CheckDoc<T>, value: impl Fn(&T) -> Option<U>) -> ReportedCheck<U> {
    ReportedCheck {
        state: check.state,
        value: check.value.as_ref().and_then(value),
        age_seconds: check.age_seconds,
        last_error_code: check.last_error_code.clone(),
    }
}

impl ReportedCheck<BindingState> {
    /// The binding as Alipay last told it: unbound when the last answer said it does not know
    /// the device, whatever binding was held before.
    fn with_binding(mut self) -> Self {
        if self.last_error_code.as_deref().is_some_and(alipay_unbound) {
            self.value = Some(BindingState::Unbound);
        } else if self.state != CheckState::Ok {
            self.value = None;
        }
        self
    }
}

/// Sends the daemon's reports until shutdown.
pub struct Reporter {
    state: Arc<State>,
    upstream: Arc<dyn Upstream>,
    interval: Duration,
    settle: Duration,
    random: fn() -> f64,
}

impl Reporter {
    pub fn new(state: Arc<State>, upstream: Arc<dyn Upstream>) -> Self {
        Self {
            state,
            upstream,
            interval: REPORT_INTERVAL,
            settle: REPORT_SETTLE,
            random: crate::crypto::random_unit,
        }
    }

    /// Another period and settling time (tests, on tokio's paused clock).
    pub fn with_timing(mut self, interval: Duration, settle: Duration) -> Self {
        self.interval = interval;
        self.settle = settle;
        self
    }

    /// Builds and sends one report now.
    pub async fn report_once(&self) -> Result<ReportReceipt, UpstreamError> {
        let report = build(&self.state.status(), self.state.now());
        match tokio::time::timeout(REPORT_TIMEOUT, self.upstream.send_report(&report)).await {
            Ok(result) => result,
            Err(_) => Err(UpstreamError::Timeout {
                timeout: REPORT_TIMEOUT,
            }),
        }
    }

    /// Reports at start, after triggers and periodically, until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut failing = false;
        let mut next = Instant::now() + self.settle;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.state.report_requested() => {
                    // A trigger only ever brings the report forward: a stream of them cannot
                    // postpone it, and sends at most one per settling time.
                    next = next.min(Instant::now() + self.settle);
                    continue;
                }
                () = tokio::time::sleep_until(next) => {}
            }
            let result = tokio::select! {
                () = shutdown.cancelled() => break,
                result = self.report_once() => result,
            };
            match result {
                Ok(_) => {
                    self.state.metrics.count_report("ok");
                    if failing {
                        tracing::info!("health reports reach the proxy again");
                    } else {
                        tracing::debug!("health report sent");
                    }
                    failing = false;
                }
                Err(error) => {
                    self.state.metrics.count_report("error");
                    if failing {
                        tracing::debug!(code = %error.code(), error = %crate::error_chain(&error), "health report failed again");
                    } else {
                        tracing::warn!(code = %error.code(), error = %crate::error_chain(&error), "health report to the proxy failed; refreshing is not affected, the next report follows on schedule");
                    }
                    failing = true;
                }
            }
            next = Instant::now() + self.interval.mul_f64(1.0 - REPORT_JITTER * (self.random)());
        }
        tracing::info!("reporter stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::terminal::proxy_client::fake::{FakeUpstream, Running};
    use crate::terminal::state::lock;

    fn state(dir: &std::path::Path) -> Arc<State> {
        let config = crate::terminal::config::test_config(dir);
        let (store, _) = crate::terminal::store::Store::open(&config.state_dir).expect("store");
        State::new(
            config,
            store,
            Default::default(),
            Arc::default(),
            Arc::default(),
        )
    }

    /// A report at start; triggers within the settling time make one report; with no trigger,
    /// one report every interval (never later); failures neither retry nor stop the schedule.
    #[tokio::test(start_paused = true)]
    async fn reports_go_at_start_after_triggers_coalesced_and_every_interval() {
        for fail in [false, true] {
            let dir = tempfile::tempdir().expect("tempdir");
            let state = state(dir.path());
            let upstream = FakeUpstream::reports(fail);
            let start = Instant::now();
            let interval = Duration::from_secs(900);
            let reporter = Reporter::new(state.clone(), upstream.clone())
                .with_timing(interval, Duration::from_secs(2));
            let running = Running::start(|stop| reporter.run(stop));
            tokio::time::sleep(Duration::from_secs(10)).await;
            // Four triggers in a second: one report, two seconds after the first.
            for _ in 0..4 {
                state.want_report();
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
            // Then nothing for an hour: periodic reports only.
            tokio::time::sleep(Duration::from_secs(3600)).await;
            running.stop().await;
            let at: Vec<u64> = lock(&upstream.reports)
                .iter()
                .map(|(t, _)| t.duration_since(start).as_secs())
                .collect();
            assert_eq!(at[..2], [2, 12], "fail={fail}: {at:?}");
            let gaps: Vec<u64> = at.windows(2).skip(1).map(|w| w[1] - w[0]).collect();
            assert!(
                gaps.iter().all(|g| (810..=900).contains(g)),
                "fail={fail}: every 13.5 to 15 minutes: {at:?}"
            );
            assert_eq!(gaps.len(), 4, "fail={fail}: {at:?}");
            let outcome = if fail { "error" } else { "ok" };
            assert_eq!(state.metrics.reports(outcome), at.len() as u64);
        }
    }

    /// What the report carries, read from the status document: the fingerprint but never the
    /// authinfo, and an Alipay answer that does not know the device as unbound.
    #[test]
    fn the_report_carries_the_status_facts_and_no_secret() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = state(dir.path());
        let now = state.now();
        let served = state.publish(crate::terminal::store::HeldAuthinfo {
            authinfo: "THE-SECRET-AUTHINFO".into(),
            fetched_at: now - 600,
            expires_at: now + 6600,
            expires_in: Some(7200),
            proxy_fetched_at: None,
        });
        {
            let mut health = state.health();
            health.alipay_binding.last_error = Some("not found".into());
            health.alipay_binding.last_error_code = Some("ACQ.DEVICE_NOT_EXIST".into());
            health.licence.value = Some(crate::wire::Licence {
                device_id: "wd.1".into(),
                user_device_id: None,
                biz_type: None,
                begin_day: "2026-01-01".into(),
                expired_day: "2027-02-03".into(),
            });
            health.licence.fetched_at = Some(now - 30);
        }
        let report = build(&state.status(), now);
        assert_eq!(report.version, env!("CARGO_PKG_VERSION"));
        assert_eq!(report.sent_at, now);
        assert_eq!(
            report.authinfo.fingerprint.as_deref(),
            Some(&*served.fingerprint)
        );
        assert_eq!(report.authinfo.age_seconds, Some(600));
        assert_eq!(report.authinfo.runway_seconds, Some(6600));
        assert_eq!(report.alipay_binding.value, Some(BindingState::Unbound));
        assert_eq!(report.licence.value.as_deref(), Some("2027-02-03"));
        assert_eq!(report.licence.age_seconds, Some(30));
        assert_eq!(report.inspection.value, None);
        assert_eq!(report.store, StoreHealth::Unknown);
        let json = serde_json::to_string(&report).expect("json");
        assert!(!json.contains("THE-SECRET-AUTHINFO"), "{json}");
        assert_eq!(report.check(), Ok(()));
    }
}
