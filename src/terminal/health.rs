//! The device health checks: the factory inspection (WeChat Pay), the Alipay binding and the
//! face SDK licence (Alibaba Cloud), fetched through the proxy at start, then every
//! `health.interval` less jitter, a failed check retried with backoff like authinfo.
//!
//! Owns: the check loops, reading each answer into its typed value, and the log lines an
//! operator acts on (inspection WARN/FAIL, licence within 30 days at warning and within 7 days or
//! lapsed at error, an unbound device at warning). A check the proxy answers `NOT_CONFIGURED`
//! for shows as `not_configured`, not as an error. It depends on [`State`] one way: the data
//! (records, the document) lives in [`super::device`], which the state owns.

use std::sync::Arc;

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

async fn check_loop(
    check: Check,
    state: Arc<State>,
    upstream: Arc<dyn Upstream>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Schedule {
        interval: state.config.health.interval,
        jitter: state.config.refresh.jitter,
        backoff_min: state.config.refresh.backoff_min,
        backoff_max: state.config.refresh.backoff_max,
    });
    loop {
        let unit = crate::crypto::random_unit();
        let delay = match check_once(check, &state, upstream.as_ref()).await {
            Ok(()) | Err(Disposition::Permanent) => backoff.succeeded(unit),
            Err(Disposition::Retry { after }) => backoff.failed(after, unit),
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
        wire::InspectionResult::Warn => {
            tracing::warn!(message_id = crate::events::INSPECTION_WARNING,
                check,
                result = "WARN",
                errors = ?i.errors,
                warnings = ?i.warnings,
                inspect_time = %i.inspect_time,
                "factory inspection reported warnings"
            )
        }
        wire::InspectionResult::Fail => {
            tracing::warn!(message_id = crate::events::INSPECTION_WARNING,
                check,
                result = "FAIL",
                errors = ?i.errors,
                warnings = ?i.warnings,
                inspect_time = %i.inspect_time,
                "factory inspection FAILED"
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

    #[test]
    fn licence_thresholds_are_30_and_7_days() {
        assert_eq!(licence_severity(31), LicenceSeverity::Ok);
        assert_eq!(licence_severity(30), LicenceSeverity::Soon);
        assert_eq!(licence_severity(8), LicenceSeverity::Soon);
        assert_eq!(licence_severity(7), LicenceSeverity::Urgent);
        assert_eq!(licence_severity(-5), LicenceSeverity::Urgent);
    }
}
