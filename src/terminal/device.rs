//! The device health facts as data: the three checks (factory inspection, Alipay binding, face
//! SDK licence), each with its typed last good value, when it was fetched and the last error
//! beside it.
//!
//! Owns: [`Check`] (name, proxy route, and whether the config enables it), [`CheckRecord`] (the
//! stored shape), [`DeviceHealth`] (what [`super::state::State`] holds) and its document
//! [`DeviceDoc`]. It must not fetch, log or lock: the checker loop ([`super::health`]) does the
//! fetching and logging, the state owns the lock.

use serde::{Deserialize, Serialize};

use super::config::HealthConfig;
use super::doc::{CheckDoc, CheckState, DeviceDoc, LicenceDoc};
use crate::units::rfc3339;
use crate::wire;

/// One of the device health checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Check {
    /// WeChat Pay's factory inspection of the device.
    Inspection,
    /// The device's binding in Alipay.
    AlipayBinding,
    /// The offline face SDK licence (Alibaba Cloud).
    Licence,
}

impl Check {
    pub const ALL: [Check; 3] = [Check::Inspection, Check::AlipayBinding, Check::Licence];

    /// Its name in the store, the documents, the metrics and the logs.
    pub fn name(self) -> &'static str {
        match self {
            Check::Inspection => "inspection",
            Check::AlipayBinding => "alipay_binding",
            Check::Licence => "licence",
        }
    }

    /// The proxy route that answers it.
    pub fn route(self) -> &'static str {
        match self {
            Check::Inspection => wire::ROUTE_INSPECTION,
            Check::AlipayBinding => wire::ROUTE_ALIPAY_BINDING,
            Check::Licence => wire::ROUTE_LICENCE,
        }
    }

    /// Whether `config` runs it.
    pub fn enabled(self, config: &HealthConfig) -> bool {
        match self {
            Check::Inspection => config.inspection,
            Check::AlipayBinding => config.alipay_binding,
            Check::Licence => config.licence,
        }
    }
}

/// One check's stored record: the last good value and the last attempt's error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, bound(deserialize = "T: serde::de::DeserializeOwned"))]
pub struct CheckRecord<T> {
    /// The last good answer.
    pub value: Option<T>,
    /// Unix seconds when `value` was fetched.
    pub fetched_at: Option<i64>,
    /// Unix seconds of the last attempt.
    pub last_attempt_at: Option<i64>,
    /// The last attempt's error, when it failed.
    pub last_error: Option<String>,
    /// The last attempt's error code, when it failed: the platform's own (`DEVICE_NOT_EXIST`)
    /// when it answered, else the proxy's or the daemon's (`PROXY_UNREACHABLE`).
    pub last_error_code: Option<String>,
    /// The proxy said this platform is not configured for the device.
    pub not_configured: bool,
}

impl<T> Default for CheckRecord<T> {
    fn default() -> Self {
        Self {
            value: None,
            fetched_at: None,
            last_attempt_at: None,
            last_error: None,
            last_error_code: None,
            not_configured: false,
        }
    }
}

impl<T: Clone> CheckRecord<T> {
    fn doc<U>(&self, enabled: bool, now: i64, show: impl Fn(&T) -> U) -> CheckDoc<U> {
        let state = if !enabled || self.not_configured {
            CheckState::NotConfigured
        } else if self.value.is_some() {
            CheckState::Ok
        } else if self.last_error.is_some() {
            CheckState::Error
        } else {
            CheckState::Pending
        };
        CheckDoc {
            state,
            value: self.value.as_ref().map(show),
            fetched_at: self.fetched_at.map(rfc3339),
            age_seconds: self.fetched_at.map(|t| now.saturating_sub(t).max(0)),
            last_attempt_at: self.last_attempt_at.map(rfc3339),
            last_error: self.last_error.clone(),
            last_error_code: self.last_error_code.clone(),
        }
    }
}

/// The device's health: each check's record and whether the config runs it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceHealth {
    pub inspection: CheckRecord<wire::Inspection>,
    pub alipay_binding: CheckRecord<wire::AlipayBinding>,
    pub licence: CheckRecord<wire::Licence>,
    pub enabled: Enabled,
}

/// Which checks the config runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enabled {
    pub inspection: bool,
    pub alipay_binding: bool,
    pub licence: bool,
}

impl Default for Enabled {
    fn default() -> Self {
        Self {
            inspection: true,
            alipay_binding: true,
            licence: true,
        }
    }
}

impl Enabled {
    pub fn from_config(config: &HealthConfig) -> Self {
        Self {
            inspection: Check::Inspection.enabled(config),
            alipay_binding: Check::AlipayBinding.enabled(config),
            licence: Check::Licence.enabled(config),
        }
    }

    pub fn get(&self, check: Check) -> bool {
        match check {
            Check::Inspection => self.inspection,
            Check::AlipayBinding => self.alipay_binding,
            Check::Licence => self.licence,
        }
    }
}

impl DeviceHealth {
    /// The document `GET /v1/device` answers at `now`.
    pub fn doc(&self, now: i64) -> DeviceDoc {
        let e = &self.enabled;
        let today = today(now);
        DeviceDoc {
            inspection: self.inspection.doc(e.inspection, now, Clone::clone),
            alipay_binding: self.alipay_binding.doc(e.alipay_binding, now, Clone::clone),
            licence: self.licence.doc(e.licence, now, |l| LicenceDoc {
                days_left: licence_days_left(&l.expired_day, today),
                licence: l.clone(),
            }),
        }
    }

    /// When `check` was last attempted (Unix seconds), as the store recorded it.
    pub fn last_attempt_at(&self, check: Check) -> Option<i64> {
        match check {
            Check::Inspection => self.inspection.last_attempt_at,
            Check::AlipayBinding => self.alipay_binding.last_attempt_at,
            Check::Licence => self.licence.last_attempt_at,
        }
    }

    /// The checks the config runs.
    pub fn enabled_checks(&self) -> Vec<Check> {
        Check::ALL
            .into_iter()
            .filter(|c| self.enabled.get(*c))
            .collect()
    }
}

/// Days left of validity on the licence at `today` (negative once lapsed); `None` when the
/// date does not read as `YYYY-MM-DD`.
pub fn licence_days_left(expired_day: &str, today: time::Date) -> Option<i64> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let expiry = time::Date::parse(expired_day, &format).ok()?;
    Some((expiry - today).whole_days())
}

/// The UTC date of a Unix time (the earliest date for a time out of range).
pub fn today(now: i64) -> time::Date {
    time::OffsetDateTime::from_unix_timestamp(now)
        .map(|t| t.date())
        .unwrap_or(time::Date::MIN)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn licence(expired_day: &str) -> wire::Licence {
        wire::Licence {
            device_id: "wd.1".into(),
            user_device_id: None,
            biz_type: None,
            begin_day: "2026-01-01".into(),
            expired_day: expired_day.into(),
        }
    }

    #[test]
    fn the_document_shows_state_value_age_and_days_left() {
        let now = 1_795_000_000; // 2026-11-18
        let mut health = DeviceHealth::default();
        health.licence.value = Some(licence("2026-12-18"));
        health.licence.fetched_at = Some(now - 60);
        health.alipay_binding.last_error = Some("down".into());
        health.enabled.inspection = false;
        let doc = health.doc(now);
        assert_eq!(doc.inspection.state, CheckState::NotConfigured);
        assert_eq!(doc.alipay_binding.state, CheckState::Error);
        assert_eq!(doc.licence.state, CheckState::Ok);
        assert_eq!(doc.licence.age_seconds, Some(60));
        assert_eq!(
            doc.licence.value.as_ref().and_then(|l| l.days_left),
            Some(30)
        );
        let json = serde_json::to_value(&doc).expect("json");
        assert_eq!(json["licence"]["value"]["expired_day"], "2026-12-18");
        assert_eq!(json["licence"]["value"]["days_left"], 30);
        assert_eq!(json["alipay_binding"]["state"], "error");
        assert_eq!(
            health.enabled_checks(),
            [Check::AlipayBinding, Check::Licence]
        );
    }

    /// The stored shape is the one earlier versions wrote: a record of a check with its value
    /// as the wire type's JSON.
    #[test]
    fn records_read_what_earlier_versions_stored() {
        let stored = r#"{"value":{"device_id":"wd.1","begin_day":"2026-01-01","expired_day":"2027-01-01"},"fetched_at":5,"last_attempt_at":6,"last_error":null,"not_configured":false}"#;
        let record: CheckRecord<wire::Licence> = serde_json::from_str(stored).expect("record");
        assert_eq!(record.value, Some(licence("2027-01-01")));
        assert_eq!(record.fetched_at, Some(5));
        let empty: CheckRecord<wire::Inspection> = serde_json::from_str("{}").expect("empty");
        assert_eq!(empty, CheckRecord::default());
    }

    #[test]
    fn licence_days_left_counts_from_today() {
        let today = time::macros::date!(2026 - 11 - 23);
        assert_eq!(licence_days_left("2026-12-23", today), Some(30));
        assert_eq!(licence_days_left("2026-11-22", today), Some(-1));
        assert_eq!(licence_days_left("20261122", today), None);
    }
}
