//! Simulated Alibaba Cloud RPC gateway for Cloudauth: `GET`/`POST /` with
//! `Action=DescribeDeviceInfo`, `Version=2019-03-07`.
//!
//! Owns: routing the call (unknown action → 404 `InvalidAction.NotFound`, other version → 400
//! `InvalidVersion`), authenticating it with either ACS3-HMAC-SHA256 (`Authorization` header)
//! or RPC v1 HMAC-SHA1 (`Signature` parameter) against the world's AccessKeys (unknown id →
//! 404 `InvalidAccessKeyId.NotFound`, bad signature → 400 `SignatureDoesNotMatch`, a time more
//! than [`TIMESTAMP_WINDOW`] off → 400 `InvalidTimeStamp.Expired`), then filtering and paging the
//! world's licences. It must not use the client's signing code
//! ([`crate::platform::aliyun`]): both schemes and their RFC 3986 encoding are rebuilt here, so a
//! client bug shows up as `SignatureDoesNotMatch`.
//!
//! Faults: `latency` delays the answer; `status: 429` answers `Throttling.User` (with
//! `Retry-After` when set); 503 `ServiceUnavailable`; other 5xx `InternalError`;
//! `malformed_body` answers 200 with a cut-off body.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use time::OffsetDateTime;

use super::{Platform, SandboxState, World, parse_form};
use crate::crypto::{BASE64, sha256_hex};
use crate::platform::aliyun::DeviceInfo;

/// How far a request's timestamp may be from the gateway's clock.
pub const TIMESTAMP_WINDOW: Duration = Duration::from_secs(15 * 60);

const ACTION: &str = "DescribeDeviceInfo";
const VERSION: &str = "2019-03-07";
const ACS3: &str = "ACS3-HMAC-SHA256";
const DEFAULT_PAGE_SIZE: usize = 20;
const MAX_PAGE_SIZE: usize = 100;
/// Headers an ACS3 request must sign.
const ACS3_REQUIRED: [&str; 6] = [
    "host",
    "x-acs-action",
    "x-acs-content-sha256",
    "x-acs-date",
    "x-acs-signature-nonce",
    "x-acs-version",
];

/// The simulator's routes.
pub fn router(state: Arc<SandboxState>) -> axum::Router {
    axum::Router::new()
        .route("/", axum::routing::get(rpc).post(rpc))
        .with_state(state)
}

/// A refusal, as the gateway's error body.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn missing(name: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "MissingParameter",
            format!(
                "The input parameter \"{name}\" that is mandatory for processing this request is not supplied."
            ),
        )
    }

    fn incomplete(why: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "IncompleteSignature",
            format!("The request signature does not conform to Aliyun standards: {why}"),
        )
    }

    fn into_response(self, request_id: &str) -> Response {
        let body = serde_json::json!({
            "RequestId": request_id,
            "HostId": "cloudauth.aliyuncs.com",
            "Code": self.code,
            "Message": self.message,
        });
        (
            self.status,
            [
                (header::CONTENT_TYPE, "application/json;charset=utf-8"),
                (
                    header::HeaderName::from_static("x-acs-request-id"),
                    request_id,
                ),
            ],
            body.to_string(),
        )
            .into_response()
    }
}

/// A request as the gateway sees it.
struct Incoming<'a> {
    method: &'a Method,
    headers: &'a HeaderMap,
    /// Query-string parameters, decoded.
    query: Vec<(String, String)>,
    /// Form-body parameters, decoded (POST with a form body).
    form: Vec<(String, String)>,
    body: &'a [u8],
}

impl Incoming<'_> {
    fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .chain(&self.form)
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

async fn rpc(
    State(state): State<Arc<SandboxState>>,
    method: Method,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    let request_id = request_id();
    let target = match &query {
        Some(q) => format!("/?{q}"),
        None => "/".to_owned(),
    };
    let fault = state.faults.take_and_delay(Platform::Aliyun, &target).await;
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let incoming = Incoming {
        method: &method,
        headers: &headers,
        query: parse_form(query.as_deref().unwrap_or_default()),
        form: if is_form {
            parse_form(&String::from_utf8_lossy(&body))
        } else {
            Vec::new()
        },
        body: &body,
    };
    let checked = authenticate(&state, &incoming, OffsetDateTime::now_utc());
    state.record(
        Platform::Aliyun,
        format!("{method} /?{}", query.as_deref().unwrap_or_default()),
        checked.is_ok(),
    );
    if let Some(status) = fault.status {
        return fault_answer(status, fault.retry_after, &request_id);
    }
    if let Err(err) = checked {
        return err.into_response(&request_id);
    }
    let page = match describe(&state.world(), &incoming, &request_id) {
        Ok(page) => page,
        Err(err) => return err.into_response(&request_id),
    };
    let body = if fault.malformed_body {
        format!(r#"{{"RequestId":"{request_id}","TotalCount":"#)
    } else {
        page.to_string()
    };
    (
        [
            (header::CONTENT_TYPE, "application/json;charset=utf-8"),
            (
                header::HeaderName::from_static("x-acs-request-id"),
                request_id.as_str(),
            ),
        ],
        body,
    )
        .into_response()
}

fn fault_answer(status: u16, retry_after: Option<u64>, request_id: &str) -> Response {
    let (code, message) = match status {
        429 => (
            "Throttling.User",
            "Request was denied due to user flow control.",
        ),
        503 => (
            "ServiceUnavailable",
            "The request has failed due to a temporary failure of the server.",
        ),
        _ => (
            "InternalError",
            "The request processing has failed due to some unknown error, exception or failure.",
        ),
    };
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = ApiError::new(status, code, message).into_response(request_id);
    if let Some(seconds) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, seconds.into());
    }
    response
}

// === authentication ===

/// Routes and authenticates a request, the way the gateway does: API first, then the
/// AccessKey, the time and the signature.
fn authenticate(
    state: &SandboxState,
    req: &Incoming<'_>,
    now: OffsetDateTime,
) -> Result<(), ApiError> {
    let acs3 = req
        .header("authorization")
        .and_then(|a| a.strip_prefix(ACS3))
        .map(str::trim);
    let (action, version) = match acs3 {
        Some(_) => (req.header("x-acs-action"), req.header("x-acs-version")),
        None => (req.param("Action"), req.param("Version")),
    };
    let action = action.ok_or_else(|| ApiError::missing("Action"))?;
    let version = version.ok_or_else(|| ApiError::missing("Version"))?;
    if action != ACTION {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "InvalidAction.NotFound",
            format!("Specified api {action} is not found, please check your url and method."),
        ));
    }
    if version != VERSION {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "InvalidVersion",
            format!("Specified parameter Version {version} is not valid."),
        ));
    }
    match acs3 {
        Some(fields) => check_acs3(state, req, fields, now),
        None => check_rpc_v1(state, req, now),
    }
}

fn secret_of<'a>(state: &'a SandboxState, access_key_id: &str) -> Result<&'a str, ApiError> {
    state
        .keys
        .aliyun_access_keys
        .get(access_key_id)
        .map(String::as_str)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "InvalidAccessKeyId.NotFound",
                "Specified access key is not found.",
            )
        })
}

fn check_time(text: &str, now: OffsetDateTime) -> Result<(), ApiError> {
    let fmt = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    let at = time::PrimitiveDateTime::parse(text, &fmt)
        .map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "InvalidTimeStamp.Format",
                "Specified time stamp or date value is not well formatted.",
            )
        })?
        .assume_utc();
    if (now - at).unsigned_abs() > TIMESTAMP_WINDOW {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "InvalidTimeStamp.Expired",
            "Specified time stamp or date value is expired.",
        ));
    }
    Ok(())
}

fn mismatch(string_to_sign: &str) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "SignatureDoesNotMatch",
        format!(
            "Specified signature is not matched with our calculation. server string to sign is:{string_to_sign}"
        ),
    )
}

/// RFC 3986: unreserved characters kept, every other byte `%XX`.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Sorted `enc(k)=enc(v)` joined with `&`.
fn sorted_query<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let mut encoded: Vec<String> = pairs
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect();
    encoded.sort();
    encoded.join("&")
}

fn check_acs3(
    state: &SandboxState,
    req: &Incoming<'_>,
    fields: &str,
    now: OffsetDateTime,
) -> Result<(), ApiError> {
    let field = |name: &str| {
        fields
            .split(',')
            .filter_map(|f| f.trim().split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    };
    let (Some(credential), Some(signed_headers), Some(signature)) = (
        field("Credential"),
        field("SignedHeaders"),
        field("Signature"),
    ) else {
        return Err(ApiError::incomplete(
            "Authorization needs Credential, SignedHeaders and Signature",
        ));
    };
    let secret = secret_of(state, credential)?;
    let signed: Vec<&str> = signed_headers.split(';').collect();
    if let Some(unsigned) = ACS3_REQUIRED.iter().find(|h| !signed.contains(h)) {
        return Err(ApiError::incomplete(&format!("{unsigned} is not signed")));
    }
    if let Some(unsigned) = req
        .headers
        .keys()
        .map(|n| n.as_str())
        .find(|n| (n.starts_with("x-acs-") || *n == "content-type") && !signed.contains(n))
    {
        return Err(ApiError::incomplete(&format!("{unsigned} is not signed")));
    }
    let mut canonical_headers = String::new();
    for name in &signed {
        let value = req
            .header(name)
            .ok_or_else(|| ApiError::incomplete(&format!("signed header {name} is absent")))?;
        canonical_headers.push_str(&format!("{name}:{}\n", value.trim()));
    }
    check_time(req.header("x-acs-date").unwrap_or_default(), now)?;
    let canonical_request = [
        req.method.as_str(),
        "/",
        &sorted_query(req.query.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
        &canonical_headers,
        signed_headers,
        &sha256_hex(req.body),
    ]
    .join("\n");
    let string_to_sign = format!("{ACS3}\n{}", sha256_hex(canonical_request.as_bytes()));
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let tag = hex_decode(signature).ok_or_else(|| mismatch(&string_to_sign))?;
    ring::hmac::verify(&key, string_to_sign.as_bytes(), &tag).map_err(|_| mismatch(&string_to_sign))
}

fn check_rpc_v1(
    state: &SandboxState,
    req: &Incoming<'_>,
    now: OffsetDateTime,
) -> Result<(), ApiError> {
    let access_key_id = req
        .param("AccessKeyId")
        .ok_or_else(|| ApiError::missing("AccessKeyId"))?;
    let signature = req
        .param("Signature")
        .ok_or_else(|| ApiError::missing("Signature"))?;
    if req.param("SignatureMethod") != Some("HMAC-SHA1")
        || req.param("SignatureVersion") != Some("1.0")
    {
        return Err(ApiError::incomplete(
            "SignatureMethod must be HMAC-SHA1 and SignatureVersion 1.0",
        ));
    }
    if req.param("SignatureNonce").is_none() {
        return Err(ApiError::missing("SignatureNonce"));
    }
    let secret = secret_of(state, access_key_id)?;
    check_time(
        req.param("Timestamp")
            .ok_or_else(|| ApiError::missing("Timestamp"))?,
        now,
    )?;
    let query = sorted_query(
        req.query
            .iter()
            .chain(&req.form)
            .filter(|(k, _)| k != "Signature")
            .map(|(k, v)| (k.as_str(), v.as_str())),
    );
    let string_to_sign = format!("{}&{}&{}", req.method, encode("/"), encode(&query));
    let key = ring::hmac::Key::new(
        ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
        format!("{secret}&").as_bytes(),
    );
    let tag = BASE64
        .decode(signature)
        .map_err(|_| mismatch(&string_to_sign))?;
    ring::hmac::verify(&key, string_to_sign.as_bytes(), &tag).map_err(|_| mismatch(&string_to_sign))
}

fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

// === DescribeDeviceInfo ===

/// One page of the world's licences. With [`World::cloudauth_page_size_cap`] a larger
/// `PageSize` is cut to the cap, and the answer says so in its `PageSize` (pages are then counted
/// in the capped size).
fn describe(
    world: &World,
    req: &Incoming<'_>,
    request_id: &str,
) -> Result<serde_json::Value, ApiError> {
    let licences = &world.licences;
    let number = |name: &str, default: usize, max: usize| match req.param(name) {
        None | Some("") => Ok(default),
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "InvalidParameter",
                    format!("The parameter {name} is invalid: {text}"),
                )
            }),
    };
    let page_size = number("PageSize", DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)?
        .min(world.cloudauth_page_size_cap.unwrap_or(MAX_PAGE_SIZE));
    let current_page = number("CurrentPage", 1, usize::MAX)?;
    let wanted = |name: &str, value: Option<&str>| {
        req.param(name)
            .filter(|w| !w.is_empty())
            .is_none_or(|w| value == Some(w))
    };
    let matching: Vec<&DeviceInfo> = licences
        .iter()
        .filter(|l| {
            wanted("DeviceId", Some(&l.device_id))
                && wanted("BizType", l.biz_type.as_deref())
                && wanted("UserDeviceId", l.user_device_id.as_deref())
        })
        .collect();
    let page: Vec<&DeviceInfo> = matching
        .iter()
        .skip((current_page - 1).saturating_mul(page_size))
        .take(page_size)
        .copied()
        .collect();
    Ok(serde_json::json!({
        "RequestId": request_id,
        "PageSize": page_size,
        "CurrentPage": current_page,
        "TotalCount": matching.len(),
        "DeviceInfoList": { "DeviceInfo": page },
    }))
}

/// A request id shaped like the gateway's (`8-4-4-4-12` upper-case hex).
fn request_id() -> String {
    let hex = crate::crypto::random_bytes(16)
        .map(|b| crate::crypto::hex(&b).to_uppercase())
        .unwrap_or_else(|_| "0".repeat(32));
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::FailureClass;
    use crate::platform::aliyun::{
        AccessKey, AliyunClient, AliyunError, DeviceInfoQuery, FIND_PAGE_SIZE, SignatureScheme,
        Stamp,
    };
    use crate::sandbox::Fault;
    use crate::sandbox::test_support::{CALL_TIMEOUT, TestSandbox, start_https};
    use std::collections::BTreeMap;

    const SCHEMES: [SignatureScheme; 2] = [
        SignatureScheme::Acs3HmacSha256,
        SignatureScheme::RpcHmacSha1,
    ];

    fn licence(device_id: &str, biz_type: &str, expired_day: &str) -> DeviceInfo {
        DeviceInfo {
            device_id: device_id.into(),
            user_device_id: Some(format!("user-{device_id}")),
            biz_type: Some(biz_type.into()),
            begin_day: "20240101".into(),
            expired_day: expired_day.into(),
        }
    }

    fn world() -> World {
        World {
            licences: (1..=5)
                .map(|n| licence(&format!("wd.dev{n}"), "FACE_TEST", &format!("2027010{n}")))
                .collect(),
            ..World::default()
        }
    }

    fn client_with(
        t: &TestSandbox,
        scheme: SignatureScheme,
        key: AccessKey,
        timeout: Duration,
    ) -> AliyunClient {
        AliyunClient::new(&t.sandbox.base_url, key, scheme, t.http(timeout)).expect("client")
    }

    fn client(t: &TestSandbox, scheme: SignatureScheme) -> AliyunClient {
        let key = AccessKey::new(
            &t.secrets.aliyun_access_key_id,
            &t.secrets.aliyun_access_key_secret,
        );
        client_with(t, scheme, key, CALL_TIMEOUT)
    }

    #[tokio::test]
    async fn licences_page_across_pages_with_both_schemes() {
        let t = start_https(world()).await;
        for scheme in SCHEMES {
            let c = client(&t, scheme);
            let mut seen = Vec::new();
            for current_page in 1..=3 {
                let page = c
                    .describe_device_info(&DeviceInfoQuery {
                        page_size: Some(2),
                        current_page: Some(current_page),
                        ..DeviceInfoQuery::default()
                    })
                    .await
                    .unwrap_or_else(|e| panic!("{scheme:?}: {e}"));
                assert_eq!((page.total_count, page.page_size), (5, 2));
                assert_eq!(page.current_page, current_page);
                assert!(!page.request_id.is_empty());
                seen.extend(page.device_info_list.into_iter().map(|l| l.device_id));
            }
            let expected: Vec<String> = (1..=5).map(|n| format!("wd.dev{n}")).collect();
            assert_eq!(seen, expected, "{scheme:?}");
        }
        assert!(t.sandbox.state.received().iter().all(|r| r.signature_ok));
        assert_eq!(t.sandbox.state.received_by(Platform::Aliyun), 6);
    }

    /// With more matching records than one page holds, the latest licence is on page 2.
    #[tokio::test]
    async fn find_device_pages_through_to_the_latest_licence() {
        let mut w = world();
        let total = FIND_PAGE_SIZE as usize + 5;
        w.licences = (0..total)
            .map(|n| {
                let day = if n == total - 2 {
                    "20300101"
                } else {
                    "20260101"
                };
                licence("wd.target", &format!("BIZ{n}"), day)
            })
            .chain(w.licences)
            .collect();
        let t = start_https(w).await;
        for scheme in SCHEMES {
            let info = client(&t, scheme)
                .find_device("wd.target", None)
                .await
                .unwrap_or_else(|e| panic!("{scheme:?}: {e}"));
            assert_eq!(info.expired_day, "20300101", "{scheme:?}");
            assert_eq!(
                info.biz_type.as_deref(),
                Some(&*format!("BIZ{}", total - 2))
            );
        }
        assert_eq!(
            t.sandbox.state.received_by(Platform::Aliyun),
            4,
            "two pages each"
        );
        let one = client(&t, SignatureScheme::default())
            .find_device("wd.dev3", Some("FACE_TEST"))
            .await
            .expect("wd.dev3");
        assert_eq!(one.expiry_date(), Some(time::macros::date!(2027 - 01 - 03)));
    }

    /// A gateway that caps the page at 20 rows (and says `"PageSize":20`) to a request for 50:
    /// the client pages by the answer's size and finds the valid licence on page 3, where paging
    /// by the requested size would stop after page 1 with only lapsed records.
    #[tokio::test]
    async fn find_device_pages_by_the_page_size_the_answer_states() {
        let mut w = world();
        w.cloudauth_page_size_cap = Some(20);
        // 45 records of the device: 44 lapsed, the valid one 43rd (page 3 at 20 a page).
        w.licences = (0..45)
            .map(|n| {
                let day = if n == 42 { "20300101" } else { "20200101" };
                licence("wd.capped", &format!("BIZ{n}"), day)
            })
            .collect();
        let t = start_https(w).await;
        let c = client(&t, SignatureScheme::default());
        let first = c
            .describe_device_info(&DeviceInfoQuery {
                device_id: Some("wd.capped".into()),
                page_size: Some(FIND_PAGE_SIZE),
                current_page: Some(1),
                ..DeviceInfoQuery::default()
            })
            .await
            .expect("page 1");
        assert_eq!(
            (
                first.page_size,
                first.device_info_list.len(),
                first.total_count
            ),
            (20, 20, 45),
            "the sandbox caps the page and says so"
        );
        let info = c.find_device("wd.capped", None).await.expect("found");
        assert_eq!(info.expired_day, "20300101");
        assert_eq!(info.biz_type.as_deref(), Some("BIZ42"));
        let pages: Vec<String> = t
            .sandbox
            .state
            .received()
            .into_iter()
            .skip(1)
            .filter_map(|r| {
                r.request
                    .split(['?', '&'])
                    .find(|p| p.starts_with("CurrentPage="))
                    .map(str::to_owned)
            })
            .collect();
        assert_eq!(
            pages,
            ["CurrentPage=1", "CurrentPage=2", "CurrentPage=3"],
            "three pages of 20 cover 45 records, and no fourth is asked for"
        );
    }

    #[tokio::test]
    async fn absent_device_is_a_distinct_rejection() {
        let t = start_https(world()).await;
        let err = client(&t, SignatureScheme::default())
            .find_device("wd.unknown", None)
            .await
            .expect_err("the call must fail");
        assert!(
            matches!(err, AliyunError::DeviceNotListed { .. }),
            "{err:?}"
        );
        let failure = err.failure();
        assert_eq!(failure.class, FailureClass::Rejected);
        assert!(!failure.retryable());
        assert!(failure.request_id.is_some());
    }

    #[tokio::test]
    async fn wrong_secret_and_unknown_key_are_refused_and_not_retryable() {
        let t = start_https(world()).await;
        for scheme in SCHEMES {
            let wrong_secret = AccessKey::new(&t.secrets.aliyun_access_key_id, "not-the-secret");
            let err = client_with(&t, scheme, wrong_secret, CALL_TIMEOUT)
                .find_device("wd.dev1", None)
                .await
                .expect_err("the call must fail");
            let f = err.failure();
            assert_eq!(
                (f.class, f.status, f.code.as_deref()),
                (FailureClass::Rejected, 400, Some("SignatureDoesNotMatch")),
                "{scheme:?}"
            );
            assert!(!f.retryable());

            let unknown = AccessKey::new("LTAInobody", "x");
            let f = client_with(&t, scheme, unknown, CALL_TIMEOUT)
                .find_device("wd.dev1", None)
                .await
                .expect_err("the call must fail")
                .failure();
            assert_eq!(
                (f.class, f.status, f.code.as_deref()),
                (
                    FailureClass::Rejected,
                    404,
                    Some("InvalidAccessKeyId.NotFound")
                ),
                "{scheme:?}"
            );
        }
        assert!(t.sandbox.state.received().iter().all(|r| !r.signature_ok));
    }

    #[tokio::test]
    async fn stale_time_wrong_action_and_wrong_version_are_refused() {
        let t = start_https(world()).await;
        for scheme in SCHEMES {
            let c = client(&t, scheme);
            let stale = Stamp {
                time: OffsetDateTime::now_utc() - Duration::from_secs(3600),
                nonce: "stale".into(),
            };
            let f = c
                .describe_device_info_stamped(&DeviceInfoQuery::default(), &stale)
                .await
                .expect_err("the call must fail")
                .failure();
            assert_eq!(
                f.code.as_deref(),
                Some("InvalidTimeStamp.Expired"),
                "{scheme:?}"
            );
            assert_eq!(f.class, FailureClass::Rejected);

            let fresh = Stamp::fresh().expect("stamp");
            let f = c
                .call("DescribeNothing", "2019-03-07", &BTreeMap::new(), &fresh)
                .await
                .expect_err("the call must fail")
                .failure();
            assert_eq!(
                (f.status, f.code.as_deref()),
                (404, Some("InvalidAction.NotFound"))
            );
            let f = c
                .call(ACTION, "2020-01-01", &BTreeMap::new(), &fresh)
                .await
                .expect_err("the call must fail")
                .failure();
            assert_eq!((f.status, f.code.as_deref()), (400, Some("InvalidVersion")));
        }
    }

    /// Each fault turns into the typed error the proxy acts on, with the right retryability.
    #[tokio::test]
    async fn faults_map_to_typed_errors_and_retryability() {
        let t = start_https(world()).await;
        let arm = |fault: Fault| t.sandbox.state.faults.arm_once(Platform::Aliyun, fault);
        let c = client(&t, SignatureScheme::default());
        let find = || c.find_device("wd.dev1", None);

        for (status, code) in [(500, "InternalError"), (503, "ServiceUnavailable")] {
            arm(Fault {
                status: Some(status),
                ..Fault::default()
            });
            let f = find().await.expect_err("the call must fail").failure();
            assert_eq!(
                (f.class, f.code.as_deref()),
                (FailureClass::ServerError, Some(code))
            );
            assert!(f.retryable());
            assert!(f.request_id.is_some());
        }

        arm(Fault {
            status: Some(429),
            retry_after: Some(7),
            ..Fault::default()
        });
        let f = find().await.expect_err("the call must fail").failure();
        assert_eq!(
            (f.class, f.code.as_deref()),
            (FailureClass::RateLimited, Some("Throttling.User"))
        );
        assert_eq!(f.retry_after, Some(Duration::from_secs(7)));
        assert!(f.retryable());

        arm(Fault {
            malformed_body: true,
            ..Fault::default()
        });
        let f = find().await.expect_err("the call must fail").failure();
        assert_eq!(f.class, FailureClass::Malformed);

        arm(Fault {
            latency: Some(Duration::from_millis(1500)),
            ..Fault::default()
        });
        let key = AccessKey::new(
            &t.secrets.aliyun_access_key_id,
            &t.secrets.aliyun_access_key_secret,
        );
        let slow = client_with(
            &t,
            SignatureScheme::default(),
            key,
            Duration::from_millis(300),
        );
        let f = slow
            .find_device("wd.dev1", None)
            .await
            .expect_err("the call must fail")
            .failure();
        assert_eq!(f.class, FailureClass::Transport);
        assert!(f.retryable());

        find().await.expect("faults were one-shot");
    }

    #[test]
    fn encoding_and_hex_decoding_are_strict() {
        assert_eq!(encode("a b*~/"), "a%20b%2A~%2F");
        assert_eq!(hex_decode("0aFF"), Some(vec![0x0a, 0xff]));
        assert_eq!(hex_decode("0aF"), None);
        assert_eq!(hex_decode("zz"), None);
    }
}
