//! Device health facts: the factory inspection (WeChat Pay), the Alipay binding and the face
//! SDK licence (Alibaba Cloud), each with when it was fetched and the last error beside it.
//!
//! Owns: the check loops (at start, then every `health.interval` less jitter, failed checks retried
//! with backoff like authinfo), the records kept in the store, the log lines an operator acts on
//! (inspection WARN/FAIL, licence within 30 days at warning and within 7 days or lapsed at error,
//! an unbound device at warning) and the view `GET /v1/device` and status serve. A check the
//! daemon's config disables, or the proxy answers `NOT_CONFIGURED` for, shows as
//! `not_configured`, not as an error.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::config::HealthConfig;
use super::proxy_client::{Disposition, Upstream, UpstreamError};
use super::state::{State, lock};
use super::store::Store;
use crate::schedule::Schedule;
use crate::units::rfc3339;
use crate::units::unix_now;
use crate::wire;

/// The three checks, by the names used in the store, the API and the logs.
pub const CHECKS: [&str; 3] = ["inspection", "alipay_binding", "licence"];

/// One check's stored record: the last good value and the last attempt's error.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CheckRecord {
    /// The last good answer (the wire type as JSON).
    #[serde(default)]
    pub value: Option<serde_json::Value>,
    /// Unix seconds when `value` was fetched.
    #[serde(default)]
    pub fetched_at: Option<i64>,
    /// Unix seconds of the last attempt.
    #[serde(default)]
    pub last_attempt_at: Option<i64>,
    /// The last attempt's error, when it failed.
    #[serde(default)]
    pub last_error: Option<String>,
    /// The proxy said this platform is not configured for the device.
    #[serde(default)]
    pub not_configured: bool,
}

/// The in-memory view of all checks.
#[derive(Debug, Clone, Default)]
pub struct HealthView {
    /// Per check: whether it is enabled in the daemon's config, and its record.
    pub checks: Vec<(&'static str, bool, CheckRecord)>,
}

impl HealthView {
    /// Loads the stored records for the checks `config` enables.
    pub fn load(store: &Store, config: &HealthConfig) -> Self {
        let enabled = |name: &str| match name {
            "inspection" => config.inspection,
            "alipay_binding" => config.alipay_binding,
            _ => config.licence,
        };
        Self {
            checks: CHECKS
                .iter()
                .map(|name| {
                    let record = store.health(name).ok().flatten().unwrap_or_default();
                    (*name, enabled(name), record)
                })
                .collect(),
        }
    }

    /// The record of `check`, mutable.
    pub fn record_mut(&mut self, check: &str) -> Option<&mut CheckRecord> {
        self.checks
            .iter_mut()
            .find(|(name, _, _)| *name == check)
            .map(|(_, _, r)| r)
    }

    /// The document `GET /v1/device` answers.
    pub fn to_json(&self, now: i64) -> serde_json::Value {
        let mut doc = serde_json::Map::new();
        for (name, enabled, record) in &self.checks {
            let state = if !enabled || record.not_configured {
                "not_configured"
            } else if record.value.is_some() {
                "ok"
            } else if record.last_error.is_some() {
                "error"
            } else {
                "pending"
            };
            let mut value = record.value.clone();
            if *name == "licence"
                && let Some(v) = value.as_mut().and_then(|v| v.as_object_mut())
                && let Some(days) = v
                    .get("expired_day")
                    .and_then(|d| d.as_str())
                    .and_then(|d| licence_days_left(d, today(now)))
            {
                v.insert("days_left".into(), days.into());
            }
            doc.insert(
                (*name).to_owned(),
                serde_json::json!({
                    "state": state,
                    "value": value,
                    "fetched_at": record.fetched_at.map(rfc3339),
                    "age_seconds": record.fetched_at.map(|t| (now - t).max(0)),
                    "last_attempt_at": record.last_attempt_at.map(rfc3339),
                    "last_error": record.last_error,
                }),
            );
        }
        serde_json::Value::Object(doc)
    }
}

// === impl Checker ===

/// How a licence's remaining days are logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LicenceSeverity {
    Ok,
    /// Within 30 days of expiry: warning.
    Soon,
    /// Within 7 days, or lapsed: error.
    Urgent,
}

/// Days left of validity on the licence at `today` (negative once lapsed).
pub fn licence_days_left(expired_day: &str, today: time::Date) -> Option<i64> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let expiry = time::Date::parse(expired_day, &format).ok()?;
    Some((expiry - today).whole_days())
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

fn today(now: i64) -> time::Date {
    time::OffsetDateTime::from_unix_timestamp(now)
        .map(|t| t.date())
        .unwrap_or(time::Date::MIN)
}

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
        let enabled: Vec<&'static str> = lock(&self.state.health)
            .checks
            .iter()
            .filter(|(_, enabled, _)| *enabled)
            .map(|(name, _, _)| *name)
            .collect();
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
    check: &'static str,
    state: Arc<State>,
    upstream: Arc<dyn Upstream>,
    shutdown: CancellationToken,
) {
    let schedule = Schedule {
        interval: state.config.health.interval,
        jitter: state.config.refresh.jitter,
        backoff_min: state.config.refresh.backoff_min,
        backoff_max: state.config.refresh.backoff_max,
    };
    let mut failures = 0u32;
    loop {
        let delay = match check_once(check, &state, upstream.as_ref()).await {
            Ok(()) => {
                failures = 0;
                schedule.next_interval(crate::crypto::random_unit())
            }
            Err(Disposition::Permanent) => {
                failures = 0;
                schedule.next_interval(crate::crypto::random_unit())
            }
            Err(Disposition::Retry { after }) => {
                failures = failures.saturating_add(1);
                schedule.retry_delay(failures, after, crate::crypto::random_unit())
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// The proxy route of a check.
fn route(check: &str) -> &'static str {
    match check {
        "inspection" => wire::ROUTE_INSPECTION,
        "alipay_binding" => wire::ROUTE_ALIPAY_BINDING,
        _ => wire::ROUTE_LICENCE,
    }
}

/// Fetches one check, stores and logs the result. A failure keeps the previous value and
/// records the error beside it.
pub async fn check_once(
    check: &'static str,
    state: &State,
    upstream: &dyn Upstream,
) -> Result<(), Disposition> {
    let now = unix_now();
    let result = upstream.fetch_health(route(check)).await.and_then(|value| {
        validate(check, &value)
            .map(|()| value)
            .map_err(|reason| UpstreamError::Malformed { reason })
    });
    let mut record = lock(&state.health)
        .record_mut(check)
        .map(|r| r.clone())
        .unwrap_or_default();
    record.last_attempt_at = Some(now);
    let outcome = match result {
        Ok(value) => {
            log_fact(check, &value, now);
            record.value = Some(value);
            record.fetched_at = Some(now);
            record.last_error = None;
            record.not_configured = false;
            state.metrics.count_check(check, "ok");
            Ok(())
        }
        Err(UpstreamError::Refused { body, .. }) if body.code == wire::codes::NOT_CONFIGURED => {
            tracing::info!(
                check,
                "health check not configured at the proxy for this device"
            );
            record.not_configured = true;
            record.last_error = None;
            state.metrics.count_check(check, "not_configured");
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
            let unbound = check == "alipay_binding"
                && upstream_code.as_deref().is_some_and(|c| {
                    let c = c.to_ascii_uppercase();
                    c.contains("DEVICE_NOT_EXIST") || c.contains("RECORD_NOT_EXIST")
                });
            if unbound {
                tracing::warn!(check, error = %text, "the device is not bound in Alipay (or Alipay does not know it)");
            } else if record.last_error.is_none() {
                tracing::warn!(check, code = %error.code(), error = %text, "health check failed; keeping the previous result");
            } else {
                // Already reported; status shows it. Keep the journal for news.
                tracing::debug!(check, code = %error.code(), error = %text, "health check failed again");
            }
            record.last_error = Some(text);
            state.metrics.count_check(check, "error");
            Err(error.disposition())
        }
    };
    if let Err(error) = state.store.save_health(check, &record) {
        tracing::error!(check, error = %crate::error_chain(&error), "cannot store the health record");
    }
    if let Some(slot) = lock(&state.health).record_mut(check) {
        *slot = record;
    }
    outcome
}

/// Checks that an answer has the wire shape of its check.
fn validate(check: &str, value: &serde_json::Value) -> Result<(), String> {
    let result = match check {
        "inspection" => serde_json::from_value::<wire::Inspection>(value.clone()).map(drop),
        "alipay_binding" => serde_json::from_value::<wire::AlipayBinding>(value.clone()).map(drop),
        _ => serde_json::from_value::<wire::Licence>(value.clone()).map(drop),
    };
    result.map_err(|e| format!("the {check} answer is not of the contract's shape: {e}"))
}

/// Logs what an operator must act on: a WARN/FAIL inspection, a licence near or past expiry.
fn log_fact(check: &str, value: &serde_json::Value, now: i64) {
    match check {
        "inspection" => {
            let Ok(i) = serde_json::from_value::<wire::Inspection>(value.clone()) else {
                return;
            };
            match i.result {
                wire::InspectionResult::Success => {
                    tracing::info!(check, result = "SUCCESS", inspect_time = %i.inspect_time, "factory inspection passed");
                }
                wire::InspectionResult::Warn => tracing::warn!(
                    check,
                    result = "WARN",
                    errors = ?i.errors,
                    warnings = ?i.warnings,
                    inspect_time = %i.inspect_time,
                    "factory inspection reported warnings"
                ),
                wire::InspectionResult::Fail => tracing::warn!(
                    check,
                    result = "FAIL",
                    errors = ?i.errors,
                    warnings = ?i.warnings,
                    inspect_time = %i.inspect_time,
                    "factory inspection FAILED"
                ),
            }
        }
        "licence" => {
            let Ok(l) = serde_json::from_value::<wire::Licence>(value.clone()) else {
                return;
            };
            let Some(days_left) = licence_days_left(&l.expired_day, today(now)) else {
                tracing::warn!(check, expired_day = %l.expired_day, "licence expiry date is unreadable");
                return;
            };
            match licence_severity(days_left) {
                LicenceSeverity::Ok => {
                    tracing::info!(check, expired_day = %l.expired_day, days_left, "face SDK licence valid")
                }
                LicenceSeverity::Soon => {
                    tracing::warn!(check, expired_day = %l.expired_day, days_left, "face SDK licence expires within 30 days")
                }
                LicenceSeverity::Urgent if days_left < 0 => {
                    tracing::error!(check, expired_day = %l.expired_day, days_left, "face SDK licence has LAPSED")
                }
                LicenceSeverity::Urgent => {
                    tracing::error!(check, expired_day = %l.expired_day, days_left, "face SDK licence expires within 7 days")
                }
            }
        }
        _ => {
            if let Ok(b) = serde_json::from_value::<wire::AlipayBinding>(value.clone()) {
                tracing::info!(check, merchant_type = %b.merchant_type, pid = %b.pid, shop_id = %b.shop_id, "alipay binding fetched");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn licence_thresholds_are_30_and_7_days() {
        let today = time::macros::date!(2026 - 11 - 23);
        assert_eq!(licence_days_left("2026-12-23", today), Some(30));
        assert_eq!(licence_days_left("2026-11-22", today), Some(-1));
        assert_eq!(licence_days_left("20261122", today), None);
        assert_eq!(licence_severity(31), LicenceSeverity::Ok);
        assert_eq!(licence_severity(30), LicenceSeverity::Soon);
        assert_eq!(licence_severity(8), LicenceSeverity::Soon);
        assert_eq!(licence_severity(7), LicenceSeverity::Urgent);
        assert_eq!(licence_severity(-5), LicenceSeverity::Urgent);
    }
}
