//! The device health checks: the factory inspection (WeChat Pay), the Alipay binding and the
//! face SDK licence (Alibaba Cloud), fetched through the proxy at start, then every
//! `health.interval` less jitter, a failed check retried with backoff like authinfo (against
//! [`CHECK_RUNWAY`]). Nothing else asks for a check, except a restart: a check attempted less
//! than `refresh.min_forced_interval` before the start waits out the rest of it
//! ([`first_check_delay`]), so a daemon restarted in a loop cannot repeat the checks faster.
//!
//! Owns: the check loops, reading each answer into its typed value, and the log lines an
//! operator acts on (inspection WARN/FAIL, licence within 30 days at warning and within 7 days or
//! lapsed at error, an unbound device at warning). A check the proxy answers `NOT_CONFIGURED`
//! for shows as `not_configured`, not as an error. It depends on [`State`] one way: the data
//! (records, the document) lives in [`super::device`], which the state owns.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use super::device::{Check, CheckRecord, DeviceHealth, licence_days_left, today};
use super::proxy_client::{Disposition, Upstream, UpstreamError};
use super::state::State;
use crate::schedule::{Backoff, Schedule};
use crate::wire;

/// How a licence's remaining days are logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LicenceSeverity {
    Ok,
    /// Within 30 days of expiry: warning.
    Soon,
    /// Within 7 days, or lapsed: error.
    Urgent,
}

/// The severity of a licence with `days_left`.
pub fn licence_severity(days_left: i64) -> LicenceSeverity {
    if days_left <= 7 {
        LicenceSeverity::Urgent
    } else if days_left <= 30 {
        LicenceSeverity::Soon
    } else {
        LicenceSeverity::Ok
    }
}

/// The runway a failed check retries against ([`crate::schedule`]): a check holds no deadline
/// (its previous result stays shown, with its age, and nothing stops working while it is old),
/// so in an outage ([`crate::schedule::OUTAGE_FAILURES`]) a check waits as a refresh with an
/// hour of runway would, up to [`crate::schedule::RUNWAY_SHARE`] of an hour (48 min). A fleet's
/// checks failing through an outage then do not all come back within `backoff_max` of its end.
pub const CHECK_RUNWAY: Duration = Duration::from_secs(3600);

// === impl Checker ===

/// Runs the enabled health checks at start and then every `health.interval` (less jitter),
/// retrying a failed one with backoff.
pub struct Checker {
    state: Arc<State>,
    upstream: Arc<dyn Upstream>,
}

impl Checker {
    pub fn new(state: Arc<State>, upstream: Arc<dyn Upstream>) -> Self {
        Self { state, upstream }
    }

    /// Runs until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let enabled = self.state.health().enabled_checks();
        let mut tasks = Vec::new();
        for check in enabled {
            let (state, upstream, shutdown) =
                (self.state.clone(), self.upstream.clone(), shutdown.clone());
            tasks.push(tokio::spawn(async move {
                check_loop(check, state, upstream, shutdown).await;
            }));
        }
        for task in tasks {
            let _ = task.await;
        }
    }
}

/// How long after the start `check` is first run: at once, unless its last attempt (as stored,
/// at `last_attempt_at`) was less than `min_gap` before `now`; then the rest of `min_gap`. A
/// stored time ahead of the clock (the clock was set back) reads as unknown: at once.
pub fn first_check_delay(last_attempt_at: Option<i64>, now: i64, min_gap: Duration) -> Duration {
    let Some(age) = last_attempt_at.and_then(|at| u64::try_from(now - at).ok()) else {
        return Duration::ZERO;
    };
    min_gap.saturating_sub(Duration::from_secs(age))
}

async fn check_loop(
    check: Check,
    state: Arc<State>,
    upstream: Arc<dyn Upstream>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Schedule {
        interval: state.config.health.interval,
        ..state.config.refresh.schedule()
    });
    let first = first_check_delay(
        state.health().last_attempt_at(check),
        state.now(),
        state.config.refresh.min_forced_interval,
    );
    if !first.is_zero() {
        tracing::info!(
            check = check.name(),
            delay_ms = u64::try_from(first.as_millis()).unwrap_or(u64::MAX),
            "health check attempted just before this start; waiting out refresh.min_forced_interval"
        );
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(first) => {}
        }
    }
    loop {
        let unit = crate::crypto::random_unit();
        let delay = match check_once(check, &state, upstream.as_ref()).await {
            Ok(()) | Err(Disposition::Permanent) => backoff.succeeded(unit),
            Err(Disposition::Retry { after }) => {
                backoff.failed_with_runway(after, Some(CHECK_RUNWAY), unit)
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Fetches one check, stores and logs the result. A failure keeps the previous value and
/// records the error beside it.
pub async fn check_once(
    check: Check,
    state: &State,
    upstream: &dyn Upstream,
) -> Result<(), Disposition> {
    match check {
        Check::Inspection => {
            run_check(
                check,
                state,
                upstream,
                |h| &mut h.inspection,
                log_inspection,
            )
            .await
        }
        Check::AlipayBinding => {
            run_check(
                check,
                state,
                upstream,
                |h| &mut h.alipay_binding,
                log_binding,
            )
            .await
        }
        Check::Licence => run_check(check, state, upstream, |h| &mut h.licence, log_licence).await,
    }
}

/// One check of values of type `T`, kept in the record `slot` picks.
async fn run_check<T>(
    check: Check,
    state: &State,
    upstream: &dyn Upstream,
    slot: fn(&mut DeviceHealth) -> &mut CheckRecord<T>,
    log: fn(&T, i64),
) -> Result<(), Disposition>
where
    T: DeserializeOwned + Serialize + Clone,
{
    let now = state.now();
    let name = check.name();
    let result = upstream
        .fetch_health(check.route())
        .await
        .and_then(|value| {
            serde_json::from_value::<T>(value).map_err(|e| UpstreamError::Malformed {
                reason: format!("the {name} answer is not of the contract's shape: {e}"),
            })
        });
    let mut record = slot(&mut state.health()).clone();
    record.last_attempt_at = Some(now);
    let outcome = match result {
        Ok(value) => {
            log(&value, now);
            record.value = Some(value);
            record.fetched_at = Some(now);
            record.last_error = None;
            record.last_error_code = None;
            record.not_configured = false;
            state.metrics.count_check(name, "ok");
            Ok(())
        }
        Err(UpstreamError::Refused { body, .. }) if body.code == wire::codes::NOT_CONFIGURED => {
            tracing::info!(
                check = name,
                "health check not configured at the proxy for this device"
            );
            record.not_configured = true;
            record.last_error = None;
            record.last_error_code = None;
            state.metrics.count_check(name, "not_configured");
            Err(Disposition::Permanent)
        }
        Err(error) => {
            let text = crate::error_chain(&error);
            let upstream_code = match &error {
                UpstreamError::Refused { body, .. } => {
                    body.upstream.as_ref().and_then(|u| u.code.clone())
                }
                _ => None,
            };
            let unbound = check == Check::AlipayBinding
                && upstream_code.as_deref().is_some_and(alipay_unbound);
            if unbound {
                tracing::warn!(message_id = crate::events::ALIPAY_UNBOUND, check = name, error = %text, "the device is not bound in Alipay (or Alipay does not know it)");
            } else if record.last_error.is_none() {
                tracing::warn!(message_id = crate::events::HEALTH_CHECK_FAILED, check = name, code = %error.code(), error = %text, "health check failed; keeping the previous result");
            } else {
                // Already reported; status shows it. Keep the journal for news.
                tracing::debug!(check = name, code = %error.code(), error = %text, "health check failed again");
            }
            record.last_error = Some(text);
            record.last_error_code = Some(upstream_code.unwrap_or_else(|| error.code()));
            state.metrics.count_check(name, "error");
            Err(error.disposition())
        }
    };
    if let Err(error) = state.store.save_health(name, &record) {
        tracing::error!(check = name, error = %crate::error_chain(&error), "cannot store the health record");
    }
    *slot(&mut state.health()) = record;
    state.changed();
    // The proxy's fleet view hears of every check (the reporter coalesces).
    state.want_report();
    outcome
}

/// Whether Alipay's error code for the binding query says it does not know the device (not
/// bound): the log line here and the daemon's report both read it so.
pub fn alipay_unbound(code: &str) -> bool {
    let code = code.to_ascii_uppercase();
    code.contains("DEVICE_NOT_EXIST") || code.contains("RECORD_NOT_EXIST")
}

/// Logs a WARN/FAIL inspection at warning level.
fn log_inspection(i: &wire::Inspection, _now: i64) {
    let check = Check::Inspection.name();
    match i.result {
        wire::InspectionResult::Success => {
            tracing::info!(message_id = crate::events::INSPECTION_PASSED, check, result = "SUCCESS", inspect_time = %i.inspect_time, "factory inspection passed");
        }
        wire::InspectionResult::Warn | wire::InspectionResult::Fail => {
            let (result, what) = if i.result == wire::InspectionResult::Warn {
                ("WARN", "reported warnings")
            } else {
                ("FAIL", "FAILED")
            };
            tracing::warn!(message_id = crate::events::INSPECTION_WARNING,
                check,
                result,
                errors = ?i.errors,
                warnings = ?i.warnings,
                inspect_time = %i.inspect_time,
                "factory inspection {what}"
            )
        }
    }
}

fn log_binding(b: &wire::AlipayBinding, _now: i64) {
    let check = Check::AlipayBinding.name();
    tracing::info!(check, merchant_type = %b.merchant_type, pid = %b.pid, shop_id = %b.shop_id, "alipay binding fetched");
}

/// Logs a licence near or past expiry: within 30 days at warning, within 7 or lapsed at error.
fn log_licence(l: &wire::Licence, now: i64) {
    let check = Check::Licence.name();
    let Some(days_left) = licence_days_left(&l.expired_day, today(now)) else {
        tracing::warn!(check, expired_day = %l.expired_day, "licence expiry date is unreadable");
        return;
    };
    match licence_severity(days_left) {
        LicenceSeverity::Ok => {
            tracing::info!(message_id = crate::events::LICENCE_VALID, check, expired_day = %l.expired_day, days_left, "face SDK licence valid")
        }
        LicenceSeverity::Soon => {
            tracing::warn!(message_id = crate::events::LICENCE_EXPIRING, check, expired_day = %l.expired_day, days_left, "face SDK licence expires within 30 days")
        }
        LicenceSeverity::Urgent if days_left < 0 => {
            tracing::error!(message_id = crate::events::LICENCE_URGENT, check, expired_day = %l.expired_day, days_left, "face SDK licence has LAPSED")
        }
        LicenceSeverity::Urgent => {
            tracing::error!(message_id = crate::events::LICENCE_URGENT, check, expired_day = %l.expired_day, days_left, "face SDK licence expires within 7 days")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::terminal::proxy_client::fake::{FakeUpstream, Running};
    use crate::terminal::state::lock;
    use tokio::time::Instant;

    #[test]
    fn a_restart_waits_out_the_gap_after_a_check_attempted_just_before() {
        let minute = Duration::from_secs(60);
        assert_eq!(first_check_delay(None, 1000, minute), Duration::ZERO);
        assert_eq!(
            first_check_delay(Some(990), 1000, minute),
            Duration::from_secs(50)
        );
        assert_eq!(first_check_delay(Some(940), 1000, minute), Duration::ZERO);
        assert_eq!(
            first_check_delay(Some(1100), 1000, minute),
            Duration::ZERO,
            "a record from the future (the clock was set back) does not hold the check"
        );
        assert_eq!(
            first_check_delay(Some(1000), 1000, Duration::ZERO),
            Duration::ZERO
        );
    }

    /// A daemon restarted 10 s after a licence check does not check again at start: it waits
    /// the rest of `refresh.min_forced_interval`, then checks.
    #[tokio::test(start_paused = true)]
    async fn a_check_attempted_just_before_a_restart_is_not_repeated_at_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = crate::terminal::config::test_config(dir.path());
        config.health.inspection = false;
        config.health.alipay_binding = false;
        let record = CheckRecord::<wire::Licence> {
            last_attempt_at: Some(crate::units::unix_now() - 10),
            last_error: Some("down".into()),
            ..CheckRecord::default()
        };
        let state = crate::terminal::state::test_state_with(config, |store| {
            store.save_health("licence", &record).expect("seed");
        });
        // Every health route answers with a licence.
        let upstream = FakeUpstream::health(serde_json::json!({
            "device_id": "wd.1", "begin_day": "2026-01-01", "expired_day": "2099-01-01"
        }));
        let running =
            Running::start(|stop| Checker::new(state.clone(), upstream.clone()).run(stop));
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs(45)).await;
        assert!(lock(&upstream.calls).is_empty(), "not at start");
        tokio::time::sleep(Duration::from_secs(20)).await;
        let calls = lock(&upstream.calls).clone();
        assert_eq!(calls.len(), 1, "{calls:?}");
        let at = calls[0].duration_since(start);
        assert!(
            at >= Duration::from_secs(49) && at <= Duration::from_secs(51),
            "{at:?}"
        );
        assert!(state.health().licence.value.is_some());
        running.stop().await;
    }

    #[test]
    fn licence_thresholds_are_30_and_7_days() {
        assert_eq!(licence_severity(31), LicenceSeverity::Ok);
        assert_eq!(licence_severity(30), LicenceSeverity::Soon);
        assert_eq!(licence_severity(8), LicenceSeverity::Soon);
        assert_eq!(licence_severity(7), LicenceSeverity::Urgent);
        assert_eq!(licence_severity(-5), LicenceSeverity::Urgent);
    }
}
