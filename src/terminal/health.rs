//! Device health facts: the factory inspection (WeChat Pay), the Alipay binding and the face
//! SDK licence (Alibaba Cloud), each with when it was fetched and the last error beside it.
//!
//! Owns: the records kept in the store and the view `GET /v1/device` and status serve.

use serde::{Deserialize, Serialize};

use super::config::HealthConfig;
use super::store::Store;
use crate::units::rfc3339;

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
            doc.insert(
                (*name).to_owned(),
                serde_json::json!({
                    "state": state,
                    "value": record.value,
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
