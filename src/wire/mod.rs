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
    /// 413: the request body is over [`super::MAX_REQUEST_BODY`].
    pub const BODY_TOO_LARGE: &str = "BODY_TOO_LARGE";
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
