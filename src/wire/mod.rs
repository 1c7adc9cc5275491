//! The terminal ⇄ proxy contract: routes, request and response bodies, error bodies, and the
//! device request signature ([`auth`]).
//!
//! Owns: everything both sides must agree on byte for byte. It must not do I/O: the terminal's
//! `ProxyClient` and the proxy's server move the bytes; this module only shapes and checks them.

pub mod auth;

use serde::{Deserialize, Serialize};

/// `POST`: fetch an authinfo for the signing device.
pub const ROUTE_AUTHINFO: &str = "/v1/authinfo";
/// `GET`: the signing device's factory inspection result.
pub const ROUTE_INSPECTION: &str = "/v1/inspection";
/// `GET`: the signing device's Alipay binding.
pub const ROUTE_ALIPAY_BINDING: &str = "/v1/alipay-binding";
/// `GET`: the signing device's offline face SDK licence.
pub const ROUTE_LICENCE: &str = "/v1/licence";
/// `POST`: the signing device's health report ([`Report`]) for the merchant's fleet view.
pub const ROUTE_REPORT: &str = "/v1/report";

/// Largest raw_data either side accepts (the face SDK's are a few KiB): the daemon from the face
/// app and its command, the proxy from a terminal.
pub const MAX_RAW_DATA: usize = 48 * 1024;
/// Largest request body the proxy accepts (raw_data is a few KiB).
pub const MAX_REQUEST_BODY: usize = 64 * 1024;
/// Largest response body the terminal reads from the proxy.
pub const MAX_RESPONSE_BODY: usize = 256 * 1024;

/// Body of `POST /v1/authinfo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthinfoRequest {
    /// The face SDK's raw_data (a secret: never logged).
    pub raw_data: String,
}

impl AuthinfoRequest {
    /// Reads the body of `POST /v1/authinfo` as the proxy takes it: exactly `{"raw_data"}`, with
    /// a raw_data of 1 to [`MAX_RAW_DATA`] bytes that is not all whitespace. The error is a
    /// sentence for the `BAD_REQUEST` answer.
    pub fn from_body(body: &[u8]) -> Result<Self, String> {
        let request: Self = crate::json::from_slice(body)
            .map_err(|e| format!("expected {{\"raw_data\": \"...\"}}: {e}"))?;
        if request.raw_data.trim().is_empty() || request.raw_data.len() > MAX_RAW_DATA {
            return Err(format!("raw_data must be 1 to {MAX_RAW_DATA} bytes"));
        }
        Ok(request)
    }
}

/// Answer to `POST /v1/authinfo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthinfoResponse {
    /// The authinfo for the face SDK (a secret: never logged).
    pub authinfo: String,
    /// Seconds of validity, when the platform said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in: Option<u64>,
}

/// Shortest validity an authinfo answer may carry (`expires_in`): anything shorter would be
/// stale before the next refresh could replace it, and 0 means expired on arrival.
pub const MIN_EXPIRES_IN: u64 = 60;
/// Longest validity an authinfo answer may carry: WeChat Pay asks for an hourly refresh, so a
/// week is far beyond anything plausible, and a larger value (2^64 - 1 has been seen from a
/// broken upstream) would overflow the arithmetic that turns it into an expiry time.
pub const MAX_EXPIRES_IN: u64 = 7 * 86400;
/// The `expires_in` both sides accept unless configured otherwise.
pub const EXPIRES_IN_RANGE: std::ops::RangeInclusive<u64> = MIN_EXPIRES_IN..=MAX_EXPIRES_IN;

/// Checks an answer's `expires_in` against `range`: the one check the proxy (on WeChat Pay's
/// answer) and the daemon (on the proxy's) both apply. `None` (no validity given) passes; the
/// daemon then assumes its configured validity. The error is a sentence for the malformed-answer
/// message.
pub fn check_expires_in(
    expires_in: Option<u64>,
    range: &std::ops::RangeInclusive<u64>,
) -> Result<(), String> {
    match expires_in {
        Some(secs) if !range.contains(&secs) => Err(format!(
            "expires_in {secs} is outside the accepted {} to {} seconds",
            range.start(),
            range.end()
        )),
        _ => Ok(()),
    }
}

/// Result of a factory inspection (`GET /v3/iotmanage/device-inspections/{device_sn}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum InspectionResult {
    Success,
    Warn,
    Fail,
}

impl InspectionResult {
    /// WeChat Pay's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "SUCCESS",
            Self::Warn => "WARN",
            Self::Fail => "FAIL",
        }
    }
}

/// Answer to `GET /v1/inspection`: WeChat Pay's inspection fields, passed through typed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inspection {
    pub device_sn: String,
    pub result: InspectionResult,
    #[serde(default)]
    pub errors: Vec<String>,
    #[serde(default)]
    pub warnings: Vec<String>,
    /// RFC 3339, as WeChat Pay wrote it.
    pub inspect_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub camera_sn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wired_mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireless_mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bluetooth_mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imei: Option<String>,
}

/// Answer to `GET /v1/alipay-binding`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlipayBinding {
    /// `direct` or `indirect`.
    pub merchant_type: String,
    pub pid: String,
    pub shop_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smid: Option<String>,
}

/// Answer to `GET /v1/licence`: the offline face SDK licence of the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Licence {
    /// Alibaba Cloud's device id (`wd....`).
    pub device_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_device_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub biz_type: Option<String>,
    /// First day of validity, `YYYY-MM-DD`.
    pub begin_day: String,
    /// Last day of validity, `YYYY-MM-DD`.
    pub expired_day: String,
}

/// The held authinfo's state, `none` when nothing is held (the daemon's status and its report).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeldState {
    Fresh,
    Stale,
    Expired,
    None,
}

impl HeldState {
    pub fn as_str(self) -> &'static str {
        match self {
            HeldState::Fresh => "fresh",
            HeldState::Stale => "stale",
            HeldState::Expired => "expired",
            HeldState::None => "none",
        }
    }
}

/// A health check's state (the daemon's documents and its report).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckState {
    /// A value is held (possibly with a newer failure beside it).
    Ok,
    /// No value yet, and the last attempt failed.
    Error,
    /// Not fetched yet.
    Pending,
    /// Disabled in the daemon's config, or the proxy does not configure it for this device.
    NotConfigured,
}

impl CheckState {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckState::Ok => "ok",
            CheckState::Error => "error",
            CheckState::Pending => "pending",
            CheckState::NotConfigured => "not_configured",
        }
    }
}

// === POST /v1/report ===

/// Longest text field a [`Report`] may carry (versions, fingerprints, codes, dates).
pub const MAX_REPORT_TEXT: usize = 128;

/// Body of `POST /v1/report`: what a terminal tells the merchant's fleet view about itself,
/// after each refresh attempt and health check and at least every 15 minutes. Never a secret:
/// the authinfo only by its fingerprint, no raw_data, no key.
///
/// Durations are as the terminal saw them when it sent the report (`age_seconds`,
/// `runway_seconds`): the proxy anchors them on the time it received the report, so a terminal
/// whose clock is wrong is still judged right. Unknown fields are ignored and new fields have
/// defaults, so proxies and terminals of different versions understand each other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The daemon's version (`CARGO_PKG_VERSION`).
    pub version: String,
    /// The terminal's wall clock when it sent the report (Unix seconds): the proxy compares it
    /// with its own.
    pub sent_at: i64,
    pub uptime_seconds: u64,
    pub authinfo: ReportedAuthinfo,
    pub refresh: ReportedRefresh,
    pub raw_data_present: bool,
    /// The proxy's clock minus the terminal's, as the daemon learned it (a 401 with `Date`).
    #[serde(default)]
    pub clock_skew_seconds: Option<i64>,
    /// Whether the daemon's store persists what it holds.
    #[serde(default)]
    pub store: StoreHealth,
    pub inspection: ReportedCheck<InspectionResult>,
    pub alipay_binding: ReportedCheck<BindingState>,
    /// The licence's last day of validity (`YYYY-MM-DD`).
    pub licence: ReportedCheck<String>,
}

/// The held authinfo in a [`Report`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportedAuthinfo {
    pub state: HeldState,
    /// First 8 hex of its SHA-256 (never the value).
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// Seconds since it was fetched.
    #[serde(default)]
    pub age_seconds: Option<u64>,
    /// Seconds of validity left.
    #[serde(default)]
    pub runway_seconds: Option<i64>,
    /// Its expiry (RFC 3339, the terminal's clock).
    #[serde(default)]
    pub expires_at: Option<String>,
}

/// The refresh loop in a [`Report`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReportedRefresh {
    pub last_attempt_ok: Option<bool>,
    /// The last attempt's error code (`PROXY_UNREACHABLE`, `UPSTREAM_REJECTED`, ...).
    pub last_error_code: Option<String>,
    pub last_error_permanent: bool,
    pub consecutive_failures: u32,
}

/// One device health check in a [`Report`]: its state, the held value, how old that value is
/// and the last attempt's error code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound(deserialize = "T: serde::de::DeserializeOwned"))]
pub struct ReportedCheck<T> {
    pub state: CheckState,
    #[serde(default = "no_value")]
    pub value: Option<T>,
    /// Seconds since the value was fetched.
    #[serde(default)]
    pub age_seconds: Option<i64>,
    #[serde(default)]
    pub last_error_code: Option<String>,
}

fn no_value<T>() -> Option<T> {
    None
}

/// What the Alipay binding check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BindingState {
    /// Alipay knows the device and its binding.
    Bound,
    /// Alipay does not know the device (not bound).
    Unbound,
}

impl BindingState {
    pub fn as_str(self) -> &'static str {
        match self {
            BindingState::Bound => "bound",
            BindingState::Unbound => "unbound",
        }
    }
}

/// The daemon's store as its report tells it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreHealth {
    /// Everything held is on disk.
    Ok,
    /// Damage was found and repaired since start; everything held is on disk.
    Recovered,
    /// Writes fail: what is held would not survive a restart.
    NotPersisting,
    /// The daemon does not say (older daemons).
    #[default]
    Unknown,
}

impl StoreHealth {
    pub fn as_str(self) -> &'static str {
        match self {
            StoreHealth::Ok => "ok",
            StoreHealth::Recovered => "recovered",
            StoreHealth::NotPersisting => "not_persisting",
            StoreHealth::Unknown => "unknown",
        }
    }
}

impl Report {
    /// The report of a healthy terminal running `version` at `sent_at`: a fresh authinfo of 10
    /// minutes, the health checks done, the licence valid until `licence_until`. For the
    /// sandbox's simulated terminals, tests and benchmarks, which change what they need.
    pub fn healthy(version: &str, sent_at: i64, licence_until: &str) -> Self {
        fn check<T>(value: T) -> ReportedCheck<T> {
            ReportedCheck {
                state: CheckState::Ok,
                value: Some(value),
                age_seconds: Some(600),
                last_error_code: None,
            }
        }
        Report {
            version: version.to_owned(),
            sent_at,
            uptime_seconds: 86_400,
            authinfo: ReportedAuthinfo {
                state: HeldState::Fresh,
                fingerprint: Some("0a1b2c3d".into()),
                age_seconds: Some(600),
                runway_seconds: Some(6_600),
                expires_at: None,
            },
            refresh: ReportedRefresh {
                last_attempt_ok: Some(true),
                last_error_code: None,
                last_error_permanent: false,
                consecutive_failures: 0,
            },
            raw_data_present: true,
            clock_skew_seconds: None,
            store: StoreHealth::Ok,
            inspection: check(InspectionResult::Success),
            alipay_binding: check(BindingState::Bound),
            licence: check(licence_until.to_owned()),
        }
    }

    /// Checks what a terminal may send: every text at most [`MAX_REPORT_TEXT`] bytes and free
    /// of control characters (they end up in tables, logs and pages). The error names the field.
    pub fn check(&self) -> Result<(), String> {
        let texts = [
            ("version", Some(&self.version)),
            ("authinfo.fingerprint", self.authinfo.fingerprint.as_ref()),
            ("authinfo.expires_at", self.authinfo.expires_at.as_ref()),
            (
                "refresh.last_error_code",
                self.refresh.last_error_code.as_ref(),
            ),
            (
                "inspection.last_error_code",
                self.inspection.last_error_code.as_ref(),
            ),
            (
                "alipay_binding.last_error_code",
                self.alipay_binding.last_error_code.as_ref(),
            ),
            ("licence.value", self.licence.value.as_ref()),
            (
                "licence.last_error_code",
                self.licence.last_error_code.as_ref(),
            ),
        ];
        for (field, text) in texts {
            let Some(text) = text else { continue };
            if text.len() > MAX_REPORT_TEXT {
                return Err(format!("{field} is longer than {MAX_REPORT_TEXT} bytes"));
            }
            if text.chars().any(char::is_control) {
                return Err(format!("{field} holds a control character"));
            }
        }
        if self.version.is_empty() {
            return Err("version is empty".into());
        }
        Ok(())
    }
}

/// Answer to `POST /v1/report`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportReceipt {
    /// When the proxy stored it (RFC 3339, the proxy's clock).
    pub received_at: String,
}

/// The platform's side of an upstream failure, passed to the terminal for its status page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamDetail {
    /// HTTP status the platform answered with (0 when it never answered).
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// Every error answer of the proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// One of the [`codes`].
    pub code: String,
    pub message: String,
    /// Whether the same request may succeed later.
    #[serde(default)]
    pub retryable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<UpstreamDetail>,
}

/// The proxy's error codes. The terminal keys its behaviour on the HTTP status and
/// `retryable`; the codes are for people and for the clock-skew rule.
pub mod codes {
    /// 401: the Authorization header is missing or not of the contract's shape.
    pub const BAD_AUTHORIZATION: &str = "BAD_AUTHORIZATION";
    /// 401: no enrolled device has that id.
    pub const UNKNOWN_DEVICE: &str = "UNKNOWN_DEVICE";
    /// 401: the signature does not verify with the enrolled key.
    pub const BAD_SIGNATURE: &str = "BAD_SIGNATURE";
    /// 401: the timestamp is more than 300 s from the proxy's clock; `Date` carries the proxy's.
    pub const TIMESTAMP_SKEW: &str = "TIMESTAMP_SKEW";
    /// 401: the nonce was already used within the window.
    pub const REPLAYED_NONCE: &str = "REPLAYED_NONCE";
    /// 403: WeChat Pay does not list the device for this merchant.
    pub const DEVICE_NOT_IN_FLEET: &str = "DEVICE_NOT_IN_FLEET";
    /// 403: WeChat Pay lists the device as INACTIVATED.
    pub const DEVICE_INACTIVATED: &str = "DEVICE_INACTIVATED";
    /// 404: the merchant or the device's registry entry does not configure this platform.
    pub const NOT_CONFIGURED: &str = "NOT_CONFIGURED";
    /// 404: no such route.
    pub const NOT_FOUND: &str = "NOT_FOUND";
    /// 400: the request body is not what the route takes.
    pub const BAD_REQUEST: &str = "BAD_REQUEST";
    /// 413: the request body is over [`super::MAX_REQUEST_BODY`] (a report: over the proxy's
    /// report limit).
    pub const BODY_TOO_LARGE: &str = "BODY_TOO_LARGE";
    /// 429: the terminal sends reports faster than the proxy admits; `Retry-After` says when.
    pub const REPORT_RATE_LIMITED: &str = "REPORT_RATE_LIMITED";
    /// 401 (admin listener): the admin token is missing or wrong.
    pub const UNAUTHORIZED: &str = "UNAUTHORIZED";
    /// 503: the proxy cannot keep the report now (its store failed); retryable.
    pub const STORE_UNAVAILABLE: &str = "STORE_UNAVAILABLE";
    /// 503: the proxy replicas' shared Redis does not answer, so the request cannot be checked
    /// (a nonce is never accepted unchecked); retryable, `Retry-After` says when.
    pub const CLUSTER_UNAVAILABLE: &str = "CLUSTER_UNAVAILABLE";
    /// 422: the platform refused the request as such (bad raw_data, unknown device there).
    pub const UPSTREAM_REJECTED: &str = "UPSTREAM_REJECTED";
    /// 429: the platform rate-limited the merchant.
    pub const UPSTREAM_RATE_LIMITED: &str = "UPSTREAM_RATE_LIMITED";
    /// 502: the platform failed (5xx) or could not be reached.
    pub const UPSTREAM_UNAVAILABLE: &str = "UPSTREAM_UNAVAILABLE";
    /// 502: the platform's answer did not verify.
    pub const UPSTREAM_BAD_SIGNATURE: &str = "UPSTREAM_BAD_SIGNATURE";
    /// 502: the platform's answer is not of the documented shape.
    pub const UPSTREAM_MALFORMED: &str = "UPSTREAM_MALFORMED";
    /// 429: this device sent more than its limit on the route (a token bucket per device and
    /// route); `Retry-After` says when the next fits. Nothing was forwarded.
    pub const DEVICE_RATE_LIMITED: &str = "DEVICE_RATE_LIMITED";
    /// 429: the merchant's terminals together reached the proxy's ceiling of calls a second to
    /// the platform; `Retry-After` says when. Nothing was forwarded.
    pub const MERCHANT_RATE_LIMITED: &str = "MERCHANT_RATE_LIMITED";
    /// 405: the route exists with another method.
    pub const METHOD_NOT_ALLOWED: &str = "METHOD_NOT_ALLOWED";
    /// 500: the proxy itself failed.
    pub const INTERNAL: &str = "INTERNAL";
}

/// Checks a device id: 1 to 64 of `A-Z a-z 0-9 . _ -`. Ids travel inside a quoted header
/// parameter and name registry entries, so nothing else is allowed.
pub fn valid_device_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_omits_absent_fields_and_reads_minimal_bodies() {
        let body = ErrorBody {
            code: codes::BAD_SIGNATURE.into(),
            message: "no".into(),
            retryable: false,
            retry_after_seconds: None,
            upstream: None,
        };
        let json = serde_json::to_string(&body).expect("json");
        assert_eq!(
            json,
            r#"{"code":"BAD_SIGNATURE","message":"no","retryable":false}"#
        );
        let back: ErrorBody =
            serde_json::from_str(r#"{"code":"X","message":"m"}"#).expect("minimal");
        assert!(!back.retryable);
    }

    #[test]
    fn inspection_result_uses_wechat_spelling() {
        let i: Inspection = serde_json::from_str(
            r#"{"device_sn":"A1","result":"WARN","warnings":["w"],"inspect_time":"2015-05-20T13:29:35.120+08:00","imei":"1"}"#,
        )
        .expect("parse");
        assert_eq!(i.result, InspectionResult::Warn);
        assert!(i.errors.is_empty());
        assert_eq!(i.imei.as_deref(), Some("1"));
    }

    fn report() -> Report {
        serde_json::from_str(
            r#"{"version":"0.1.0","sent_at":1,"uptime_seconds":5,
                "authinfo":{"state":"fresh","fingerprint":"0a1b2c3d","age_seconds":60,"runway_seconds":7000},
                "refresh":{"last_attempt_ok":true,"consecutive_failures":0},
                "raw_data_present":true,
                "inspection":{"state":"ok","value":"WARN","age_seconds":10},
                "alipay_binding":{"state":"error","last_error_code":"DEVICE_NOT_EXIST","value":"unbound"},
                "licence":{"state":"ok","value":"2027-01-01"},
                "a_field_of_a_newer_daemon":1}"#,
        )
        .expect("a report with an unknown field reads")
    }

    /// A report of an older daemon (no store, no skew) reads with defaults; a newer one's
    /// unknown fields are ignored.
    #[test]
    fn reports_read_across_versions() {
        let r = report();
        assert_eq!(r.store, StoreHealth::Unknown);
        assert_eq!(r.clock_skew_seconds, None);
        assert_eq!(r.inspection.value, Some(InspectionResult::Warn));
        assert_eq!(r.alipay_binding.value, Some(BindingState::Unbound));
        assert_eq!(r.check(), Ok(()));
        let back: Report =
            serde_json::from_slice(&serde_json::to_vec(&r).expect("json")).expect("round trip");
        assert_eq!(back, r);
    }

    #[test]
    fn report_texts_are_bounded_and_free_of_control_characters() {
        let mut r = report();
        r.version = "x".repeat(MAX_REPORT_TEXT + 1);
        assert!(r.check().unwrap_err().starts_with("version"));
        let mut r = report();
        r.refresh.last_error_code = Some("A\u{1b}[31mB".into());
        assert!(r.check().unwrap_err().contains("control character"));
        // Markup is not refused here: it is text, escaped wherever it is shown.
        let mut r = report();
        r.version = "<script>alert(1)</script>".into();
        assert_eq!(r.check(), Ok(()));
    }

    #[test]
    fn authinfo_request_body_takes_only_raw_data_within_bounds() {
        let ok = AuthinfoRequest::from_body(br#"{"raw_data":"R"}"#).expect("valid");
        assert_eq!(ok.raw_data, "R");
        for bad in [
            &br#"{"raw_data":"  "}"#[..],
            br#"{"raw_data":"R","extra":1}"#,
            br#"{"raw":"R"}"#,
            // Found by the `proxy_request` fuzz target: serde's derive alone takes an array.
            br#"["R"]"#,
            b"not json",
        ] {
            assert!(
                AuthinfoRequest::from_body(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = serde_json::to_vec(&AuthinfoRequest {
            raw_data: "x".repeat(MAX_RAW_DATA + 1),
        })
        .expect("json");
        assert!(AuthinfoRequest::from_body(&long).is_err());
    }

    #[test]
    fn expires_in_outside_the_range_is_refused_and_absent_passes() {
        for bad in [0, 59, 7 * 86400 + 1, 1 << 63, u64::MAX] {
            let err = check_expires_in(Some(bad), &EXPIRES_IN_RANGE).unwrap_err();
            assert!(err.contains(&bad.to_string()), "{err}");
        }
        for good in [60, 7200, 7 * 86400] {
            assert_eq!(check_expires_in(Some(good), &EXPIRES_IN_RANGE), Ok(()));
        }
        assert_eq!(check_expires_in(None, &EXPIRES_IN_RANGE), Ok(()));
        assert!(check_expires_in(Some(100), &(200..=300)).is_err());
    }

    #[test]
    fn device_ids_are_restricted_to_header_safe_characters() {
        assert!(valid_device_id("T-1001_a.b"));
        assert!(!valid_device_id(""));
        assert!(!valid_device_id("a\"b"));
        assert!(!valid_device_id("a b"));
        assert!(!valid_device_id(&"x".repeat(65)));
    }
}
