//! Simulated WeChat Pay APIv3: `POST /v3/offlineface/authinfo`,
//! `GET /v3/iotmanage/device-inspections/{device_sn}` and `GET /v3/iotmanage/devices`.
//!
//! Owns: checking each request's `WECHATPAY2-SHA256-RSA2048` Authorization the way WeChat Pay
//! does (mchid, merchant certificate serial, a timestamp within 300 s, the signature over the
//! request target exactly as received and the raw body), answering from the [`super::World`]
//! with the documented bodies and error codes, the device list's 20 requests/second limit
//! (counted on arrival; lower in [`World::wechat_list_requests_per_second`]),
//! signing successful answers with the platform key (`Wechatpay-*` headers), a `Request-ID` on
//! every answer, and the injected [`Fault`]s. It must not call the client's signing or
//! verification code: the header parser and both signing strings are written again here, so a
//! client bug shows up as a refusal.

use std::sync::Arc;
use std::time::Duration;

use crate::units::unix_now;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, on};
use percent_encoding::percent_decode_str;
use serde::Deserialize;
use serde_json::json;

use super::{Fault, Platform, SandboxKeys, SandboxState, World, lock};
use crate::crypto::{self, CryptoError};

/// How far a request's timestamp may be from the sandbox's clock.
const REQUEST_WINDOW_SECS: i64 = 300;
/// The device list's per-second request limit.
const LIST_REQUESTS_PER_SECOND: usize = 20;
/// The device list's largest page.
const LIST_MAX_LIMIT: u64 = 100;
const INSPECTIONS_PREFIX: &str = "/v3/iotmanage/device-inspections/";

/// Why the simulator could not make an answer at all (answered as a 500 SYSTEM_ERROR).
#[derive(Debug, thiserror::Error)]
enum SimulatorError {
    #[error("signing the answer failed")]
    Crypto(#[from] CryptoError),
    #[error("the stray-key generation task failed")]
    Join(#[from] tokio::task::JoinError),
    #[error("{0} is not a valid header value")]
    Header(&'static str),
}

/// The simulator's routes: one per [`Endpoint`].
pub fn router(state: Arc<SandboxState>) -> Router {
    let mut router = Router::new();
    for endpoint in Endpoint::ALL {
        let (method, path) = endpoint.route();
        router = router.route(
            path,
            on(method, move |s, m, u, h, b| handle(endpoint, s, m, u, h, b)),
        );
    }
    router.with_state(state)
}

/// A received request, as the signature check needs it.
struct Received {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

#[derive(Clone, Copy)]
enum Endpoint {
    Authinfo,
    Inspection,
    Devices,
    Certificates,
}

impl Endpoint {
    const ALL: [Self; 4] = [
        Self::Authinfo,
        Self::Inspection,
        Self::Devices,
        Self::Certificates,
    ];

    /// Its method and path (in axum's syntax).
    fn route(self) -> (MethodFilter, &'static str) {
        match self {
            Self::Authinfo => (MethodFilter::POST, "/v3/offlineface/authinfo"),
            Self::Inspection => (
                MethodFilter::GET,
                "/v3/iotmanage/device-inspections/{device_sn}",
            ),
            Self::Devices => (MethodFilter::GET, "/v3/iotmanage/devices"),
            Self::Certificates => (MethodFilter::GET, "/v3/certificates"),
        }
    }
}

/// Every route reads the same parts and goes through [`serve`].
async fn handle(
    endpoint: Endpoint,
    State(state): State<Arc<SandboxState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request = Received {
        method,
        uri,
        headers,
        body,
    };
    serve(&state, &request, endpoint).await
}

/// Answers one request and stamps it with a `Request-ID`.
async fn serve(state: &SandboxState, request: &Received, endpoint: Endpoint) -> Response {
    let mut response = match answer(state, request, endpoint).await {
        Ok(response) => response,
        Err(error) => {
            tracing::error!(%error, "sandbox wechat pay could not answer");
            Refusal::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "SYSTEM_ERROR",
                "sandbox failure",
            )
            .into_response()
        }
    };
    // A request id only names the answer in logs; without randomness a fixed one will do.
    let request_id = crypto::random_bytes(16)
        .map(|b| crypto::hex(&b).to_ascii_uppercase())
        .unwrap_or_else(|_| "SANDBOX".to_owned());
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("Request-ID", value);
    }
    response
}

async fn answer(
    state: &SandboxState,
    request: &Received,
    endpoint: Endpoint,
) -> Result<Response, SimulatorError> {
    let target = request
        .uri
        .path_and_query()
        .map_or_else(|| request.uri.path(), |pq| pq.as_str());
    let fault = state
        .faults
        .take_and_delay(Platform::WechatPay, target)
        .await;
    // The way there: the request arrives (is recorded and counted) after it.
    jitter(fault.latency_jitter).await;
    let response = answer_arrived(state, request, endpoint, target, &fault).await;
    // The way back.
    jitter(fault.latency_jitter).await;
    response
}

/// Sleeps a random time from zero up to `bound`.
async fn jitter(bound: Option<Duration>) {
    if let Some(bound) = bound {
        tokio::time::sleep(bound.mul_f64(crypto::random_unit())).await;
    }
}

/// Answers a request that has just arrived.
async fn answer_arrived(
    state: &SandboxState,
    request: &Received,
    endpoint: Endpoint,
    target: &str,
    fault: &Fault,
) -> Result<Response, SimulatorError> {
    let checked = check_authorization(&state.keys, request, target, unix_now());
    state.record(
        Platform::WechatPay,
        format!("{} {target}", request.method),
        checked.is_ok(),
    );
    // The device list's frequency limit applies before the signature is looked at.
    let world = state.world();
    if matches!(endpoint, Endpoint::Devices) && !admit_list_request(state, &world) {
        return Ok(Refusal::new(
            StatusCode::TOO_MANY_REQUESTS,
            "FREQUENCY_LIMITED",
            "too many requests in one second",
        )
        .into_response());
    }
    if let Err(reason) = checked {
        return Ok(Refusal::new(StatusCode::UNAUTHORIZED, "SIGN_ERROR", reason).into_response());
    }
    // The merchant's authinfo limit counts signed requests (a rule "after the login check").
    if matches!(endpoint, Endpoint::Authinfo) && !admit_authinfo_request(state, &world) {
        return Ok(Refusal::new(
            StatusCode::TOO_MANY_REQUESTS,
            "FREQUENCY_LIMITED",
            "the merchant's authinfo requests are over the limit",
        )
        .into_response());
    }
    if let Some(status) = fault.status {
        return Ok(fault_refusal(status, fault.retry_after));
    }
    let result = match endpoint {
        Endpoint::Authinfo => answer_authinfo(&world, request),
        Endpoint::Inspection => answer_inspection(&world, request.uri.path()),
        Endpoint::Devices => answer_devices(&world, request.uri.query()),
        Endpoint::Certificates => answer_certificates(state),
    };
    match result {
        Ok(body) => {
            let body = if fault.malformed_body {
                b"<html><body>upstream busy</body></html>".to_vec()
            } else {
                body.to_string().into_bytes()
            };
            signed(state, body, fault).await
        }
        Err(refusal) => Ok(refusal.into_response()),
    }
}

// === request authentication ===

/// The parameters of a `WECHATPAY2-SHA256-RSA2048` Authorization header.
#[derive(Debug, PartialEq, Eq)]
struct Authorization<'a> {
    mchid: &'a str,
    nonce_str: &'a str,
    timestamp: &'a str,
    serial_no: &'a str,
    signature: &'a str,
}

/// Parses `WECHATPAY2-SHA256-RSA2048 k="v",k="v",...`: every one of the five keys exactly
/// once, in any order, optional spaces after commas, nothing else.
fn parse_authorization(header: &str) -> Result<Authorization<'_>, &'static str> {
    let mut rest = header
        .strip_prefix("WECHATPAY2-SHA256-RSA2048 ")
        .ok_or("the Authorization scheme is not WECHATPAY2-SHA256-RSA2048")?
        .trim_start();
    let mut fields: [(&str, Option<&str>); 5] = [
        ("mchid", None),
        ("nonce_str", None),
        ("timestamp", None),
        ("serial_no", None),
        ("signature", None),
    ];
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"").ok_or("expected key=\"value\"")?;
        let (value, after) = after.split_once('"').ok_or("unterminated value")?;
        let slot = fields
            .iter_mut()
            .find(|(name, _)| *name == key)
            .ok_or("unknown Authorization parameter")?;
        if slot.1.replace(value).is_some() {
            return Err("repeated Authorization parameter");
        }
        rest = match after.strip_prefix(',') {
            Some(next) if !next.trim_start().is_empty() => next.trim_start(),
            Some(_) => return Err("trailing comma"),
            None if after.is_empty() => after,
            None => return Err("parameters must be separated by commas"),
        };
    }
    let [mchid, nonce_str, timestamp, serial_no, signature] =
        fields.map(|(_, value)| value.filter(|v| !v.is_empty()));
    Ok(Authorization {
        mchid: mchid.ok_or("mchid is missing")?,
        nonce_str: nonce_str.ok_or("nonce_str is missing")?,
        timestamp: timestamp.ok_or("timestamp is missing")?,
        serial_no: serial_no.ok_or("serial_no is missing")?,
        signature: signature.ok_or("signature is missing")?,
    })
}

/// Checks a request the way WeChat Pay does; the error is the refusal's message.
fn check_authorization(
    keys: &SandboxKeys,
    request: &Received,
    target: &str,
    now: i64,
) -> Result<(), &'static str> {
    let header = request
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or("the Authorization header is missing")?
        .to_str()
        .map_err(|_| "the Authorization header is not text")?;
    let auth = parse_authorization(header)?;
    if auth.mchid != keys.wechat_mchid {
        return Err("mchid does not match the signing merchant");
    }
    if auth.serial_no != keys.wechat_merchant_serial {
        return Err("serial_no is not the merchant's API certificate");
    }
    let timestamp: i64 = auth
        .timestamp
        .parse()
        .map_err(|_| "timestamp is not a number")?;
    if (now - timestamp).abs() >= REQUEST_WINDOW_SECS {
        return Err("timestamp is more than 5 minutes away");
    }
    let mut message = Vec::new();
    for line in [
        request.method.as_str().as_bytes(),
        target.as_bytes(),
        auth.timestamp.as_bytes(),
        auth.nonce_str.as_bytes(),
        &request.body,
    ] {
        message.extend_from_slice(line);
        message.push(b'\n');
    }
    if keys
        .wechat_merchant_public
        .verify_base64(&message, auth.signature)
    {
        Ok(())
    } else {
        Err("the signature does not verify")
    }
}

/// Admits a device-list request when fewer than the world's limit (20) were admitted in the
/// last window (a second, or the world's stretched window).
fn admit_list_request(state: &SandboxState, world: &World) -> bool {
    let limit = world
        .wechat_list_requests_per_second
        .unwrap_or(LIST_REQUESTS_PER_SECOND);
    let now = tokio::time::Instant::now();
    let length = world.device_list_window.unwrap_or(Duration::from_secs(1));
    let mut window = lock(&state.list_window);
    while window
        .front()
        .is_some_and(|t| now.duration_since(*t) >= length)
    {
        window.pop_front();
    }
    if window.len() >= limit {
        return false;
    }
    window.push_back(now);
    true
}

/// Counts an authinfo request against [`World::authinfo_limit`]; false when it is over.
fn admit_authinfo_request(state: &SandboxState, world: &World) -> bool {
    let Some(limit) = world.authinfo_limit else {
        return true;
    };
    let now = tokio::time::Instant::now();
    let mut window = lock(&state.authinfo_window);
    while window
        .front()
        .is_some_and(|t| now.duration_since(*t) >= limit.window)
    {
        window.pop_front();
    }
    if window.len() >= limit.requests {
        return false;
    }
    window.push_back(now);
    true
}

// === answers ===

/// An error answer: `{"code","message"}` with its status.
struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl Refusal {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// 400 PARAM_ERROR.
    fn param(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "PARAM_ERROR", message)
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let body = json!({ "code": self.code, "message": self.message });
        (self.status, axum::Json(body)).into_response()
    }
}

/// The error answer an injected `status` fault stands for.
fn fault_refusal(status: u16, retry_after: Option<u64>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let code = match status.as_u16() {
        400 => "PARAM_ERROR",
        401 => "SIGN_ERROR",
        403 => "NO_AUTH",
        404 => "RESOURCE_NOT_EXISTS",
        429 => "FREQUENCY_LIMITED",
        500.. => "SYSTEM_ERROR",
        _ => "INVALID_REQUEST",
    };
    let mut response = Refusal::new(status, code, "injected fault").into_response();
    if status == StatusCode::TOO_MANY_REQUESTS
        && let Some(secs) = retry_after
    {
        response
            .headers_mut()
            .insert(axum::http::header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

/// The authinfo request body; every field optional so a missing one is a PARAM_ERROR.
/// `sub_appid` may be empty or absent, so it is not read.
#[derive(Deserialize)]
struct AuthinfoRequest {
    sp_appid: Option<String>,
    sub_mchid: Option<String>,
    device_id: Option<String>,
    raw_data: Option<String>,
    organization_id: Option<String>,
}

fn answer_authinfo(world: &World, request: &Received) -> Result<serde_json::Value, Refusal> {
    let json_body = request
        .headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json_body {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            "Content-Type must be application/json",
        ));
    }
    let body: AuthinfoRequest = serde_json::from_slice(&request.body)
        .map_err(|_| Refusal::param("the body is not valid JSON"))?;
    for (name, value) in [
        ("sp_appid", &body.sp_appid),
        ("sub_mchid", &body.sub_mchid),
        ("device_id", &body.device_id),
        ("raw_data", &body.raw_data),
        ("organization_id", &body.organization_id),
    ] {
        if value.as_deref().is_none_or(str::is_empty) {
            return Err(Refusal::param(format!("{name} is required")));
        }
    }
    if body
        .raw_data
        .as_ref()
        .is_some_and(|raw| world.rejected_raw_data.contains(raw))
    {
        return Err(Refusal::param("raw_data is invalid"));
    }
    let len = world.authinfo_len.unwrap_or(65);
    let authinfo = crypto::random_bytes(len.div_ceil(2).max(24))
        .map(|b| {
            let mut a = format!("SANDBOX-AUTHINFO-{}", crypto::hex(&b));
            a.truncate(len.max("SANDBOX-AUTHINFO-".len() + 1));
            a
        })
        .map_err(|_| {
            Refusal::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "SYSTEM_ERROR",
                "no randomness",
            )
        })?;
    let mut answer = json!({ "authinfo": authinfo });
    if let Some(expires_in) = world.authinfo_expires_in {
        answer["expires_in"] = json!(expires_in);
    }
    Ok(answer)
}

fn answer_inspection(world: &World, path: &str) -> Result<serde_json::Value, Refusal> {
    let device_sn = path
        .strip_prefix(INSPECTIONS_PREFIX)
        .and_then(|raw| percent_decode_str(raw).decode_utf8().ok())
        .ok_or_else(|| Refusal::param("device_sn is not valid"))?;
    if !(5..=200).contains(&device_sn.len())
        || !device_sn.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return Err(Refusal::param(
            "device_sn must be 5 to 200 letters and digits",
        ));
    }
    let inspection = world.inspections.get(device_sn.as_ref()).ok_or_else(|| {
        Refusal::new(
            StatusCode::NOT_FOUND,
            "RESOURCE_NOT_EXISTS",
            "no inspection for this device",
        )
    })?;
    Ok(json!(inspection))
}

fn answer_devices(world: &World, query: Option<&str>) -> Result<serde_json::Value, Refusal> {
    let (mut offset, mut limit) = (None, None);
    for pair in query.unwrap_or_default().split('&') {
        match pair.split_once('=') {
            Some(("offset", v)) => offset = v.parse::<u64>().ok(),
            Some(("limit", v)) => limit = v.parse::<u64>().ok(),
            _ => {}
        }
    }
    let (Some(offset), Some(limit)) = (offset, limit) else {
        return Err(Refusal::param("offset and limit are required in the query"));
    };
    if !(1..=LIST_MAX_LIMIT).contains(&limit) {
        return Err(Refusal::param("limit must be 1 to 100"));
    }
    let limit = limit.min(world.wechat_list_page_cap.unwrap_or(LIST_MAX_LIMIT));
    let total = world.wechat_devices.len() as u64;
    let start = offset.min(total);
    let end = offset.saturating_add(limit).min(total);
    // start <= end <= total = len, both from u64s no larger than a usize length.
    let data = &world.wechat_devices[start as usize..end as usize];
    let link = |at: u64| format!("/v3/iotmanage/devices?offset={at}&limit={limit}");
    let next = if end < total {
        link(end)
    } else {
        String::new()
    };
    let prev = if offset == 0 {
        String::new()
    } else {
        link(offset.saturating_sub(limit))
    };
    Ok(json!({
        "data": data,
        "offset": offset,
        "limit": limit,
        "total_count": total,
        "links": { "next": next, "prev": prev, "self": link(offset) },
    }))
}

/// `GET /v3/certificates`: every published platform certificate, each sealed with the
/// merchant's APIv3 key (AEAD_AES_256_GCM, a fresh 12-character nonce, associated data
/// `certificate`), its validity in Beijing time as WeChat Pay writes it.
fn answer_certificates(state: &SandboxState) -> Result<serde_json::Value, Refusal> {
    let failed = || {
        Refusal::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "SYSTEM_ERROR",
            "sandbox failure",
        )
    };
    let beijing = |t: i64| {
        time::OffsetDateTime::from_unix_timestamp(t)
            .ok()
            .and_then(|t| {
                t.to_offset(time::macros::offset!(+8))
                    .format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .ok_or_else(failed)
    };
    let mut data = Vec::new();
    for certificate in state.platform_certificates() {
        let nonce: String = crypto::nonce()
            .map_err(|_| failed())?
            .chars()
            .take(12)
            .collect();
        let ciphertext = seal_certificate(
            &state.keys.wechat_apiv3_key,
            &nonce,
            "certificate",
            &certificate.pem,
        )
        .map_err(|_| failed())?;
        data.push(json!({
            "serial_no": certificate.serial,
            "effective_time": beijing(certificate.not_before)?,
            "expire_time": beijing(certificate.not_after)?,
            "encrypt_certificate": {
                "algorithm": "AEAD_AES_256_GCM",
                "nonce": nonce,
                "associated_data": "certificate",
                "ciphertext": ciphertext,
            },
        }));
    }
    Ok(json!({ "data": data }))
}

/// Seals `plaintext` as WeChat Pay seals a platform certificate: AES-256-GCM with the 32-byte
/// `apiv3_key`, the 12-byte `nonce` and `associated_data`; base64 of ciphertext and tag. Written
/// here with ring directly, apart from the client's decryption.
pub fn seal_certificate(
    apiv3_key: &str,
    nonce: &str,
    associated_data: &str,
    plaintext: &str,
) -> Result<String, ring::error::Unspecified> {
    use ring::aead;
    let key = aead::LessSafeKey::new(aead::UnboundKey::new(
        &aead::AES_256_GCM,
        apiv3_key.as_bytes(),
    )?);
    let nonce = aead::Nonce::try_assume_unique_for_key(nonce.as_bytes())?;
    let mut in_out = plaintext.as_bytes().to_vec();
    key.seal_in_place_append_tag(
        nonce,
        aead::Aad::from(associated_data.as_bytes()),
        &mut in_out,
    )?;
    use base64::Engine as _;
    Ok(crate::crypto::BASE64.encode(in_out))
}

/// A 200 answer signed with the platform key over `TIMESTAMP\nNONCE\nBODY\n`, or with a stray
/// key or an old timestamp when the fault says so.
async fn signed(
    state: &SandboxState,
    body: Vec<u8>,
    fault: &Fault,
) -> Result<Response, SimulatorError> {
    let age = fault
        .stale_timestamp
        .map_or(0, |s| i64::try_from(s).unwrap_or(i64::MAX));
    let timestamp = unix_now().saturating_sub(age).to_string();
    let nonce = crypto::nonce()?;
    let mut message = Vec::with_capacity(body.len() + 64);
    for line in [timestamp.as_bytes(), nonce.as_bytes(), &body] {
        message.extend_from_slice(line);
        message.push(b'\n');
    }
    let (serial, mut signature) = state.wechat_sign(&message)?;
    // "Another key": the sandbox's Alipay platform key is a real RSA key that is not WeChat
    // Pay's, so the signature is well-formed and only the key is wrong (no key is generated
    // per answer: that took seconds under emulation).
    if fault.bad_signature {
        signature = state.keys.alipay_platform_key.sign_base64(&message)?;
    }
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    for (name, value) in [
        ("content-type", "application/json"),
        ("wechatpay-serial", serial.as_str()),
        ("wechatpay-timestamp", timestamp.as_str()),
        ("wechatpay-nonce", nonce.as_str()),
        ("wechatpay-signature", signature.as_str()),
    ] {
        let value = HeaderValue::from_str(value).map_err(|_| SimulatorError::Header(name))?;
        headers.insert(HeaderName::from_static(name), value);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use base64::Engine as _;
    use tokio::net::TcpListener;

    use crate::crypto::{BASE64, GeneratedKey, RsaSigner};
    use crate::platform::wechatpay::certificates::{ApiV3Key, Verification};
    use crate::platform::wechatpay::verify::SignatureError;
    use crate::platform::wechatpay::{
        AuthinfoParams, Device, DeviceInspection, MerchantSigner, PlatformKeys, WechatPayClient,
        WechatPayError,
    };
    use crate::platform::{Failure, FailureClass, http_client};
    use crate::sandbox::test_support::CALL_TIMEOUT;
    use crate::sandbox::{RunningSandbox, start};
    use crate::tls;

    const MCHID: &str = "1900000001";
    const MERCHANT_SERIAL: &str = "3775B6A45ACD588826D15E583A95F5DD12345678";
    const PLATFORM_KEY_ID: &str = "PUB_KEY_ID_0119000000012025000000000000";
    const DEVICES: usize = 253;
    const APIV3_KEY: &str = "SandboxApiV3Key00000000000000001";

    /// The merchant's key, WeChat Pay's and a stray one, from the test key pool.
    fn merchant() -> &'static GeneratedKey {
        crate::crypto::test_key(0)
    }

    fn platform() -> &'static GeneratedKey {
        crate::crypto::test_key(1)
    }

    fn stray() -> &'static GeneratedKey {
        crate::crypto::test_key(2)
    }

    fn signer_of(key: &GeneratedKey) -> RsaSigner {
        RsaSigner::from_pem(&key.private_pem, "test key").expect("key")
    }

    fn sandbox_keys(platform_key_id: &str) -> SandboxKeys {
        SandboxKeys {
            wechat_mchid: MCHID.into(),
            wechat_merchant_serial: MERCHANT_SERIAL.into(),
            wechat_merchant_public: merchant().public.clone(),
            wechat_platform_key: signer_of(platform()),
            wechat_platform_key_id: platform_key_id.into(),
            wechat_apiv3_key: APIV3_KEY.into(),
            wechat_platform_certificates: Vec::new(),
            alipay_app_id: "2021000000000001".into(),
            alipay_app_public: stray().public.clone(),
            alipay_platform_key: signer_of(stray()),
            aliyun_access_keys: BTreeMap::new(),
        }
    }

    fn device(i: usize) -> Device {
        Device {
            device_sn: Some(format!("SN{i:05}")),
            activation_status: Some("ACTIVATED".into()),
            mchid: Some(MCHID.into()),
            ..Device::default()
        }
    }

    fn inspection(device_sn: &str) -> DeviceInspection {
        DeviceInspection {
            device_sn: device_sn.into(),
            wired_mac: "00:00:00:00:00:01".into(),
            wireless_mac: String::new(),
            bluetooth_mac: String::new(),
            app_version: "1.26.100".into(),
            camera_sn: "IMIH-A100SPMV4C6001646".into(),
            imei: String::new(),
            result: "WARN".into(),
            errors: Vec::new(),
            warnings: vec!["already inspected".into()],
            inspect_time: "2025-05-20T13:29:35.120+08:00".into(),
        }
    }

    fn world() -> World {
        World {
            wechat_devices: (0..DEVICES).map(device).collect(),
            inspections: BTreeMap::from([("SN00001".to_owned(), inspection("SN00001"))]),
            rejected_raw_data: vec!["RAW-REJECTED".into()],
            authinfo_expires_in: Some(7200),
            ..World::default()
        }
    }

    fn params(raw_data: &str) -> AuthinfoParams {
        AuthinfoParams {
            sp_appid: "wx8888888888888888".into(),
            sub_appid: String::new(),
            sub_mchid: "1900000002".into(),
            device_id: "SN00001".into(),
            raw_data: raw_data.into(),
            organization_id: "ORG-1".into(),
        }
    }

    fn public_key_mode() -> PlatformKeys {
        let mut keys = PlatformKeys::new();
        keys.add_public_key(PLATFORM_KEY_ID, platform().public.clone());
        keys
    }

    /// A sandbox on 127.0.0.1 over real HTTPS, and the CA its certificate chains to.
    struct Harness {
        sandbox: RunningSandbox,
        ca_pem: String,
    }

    async fn start_sandbox(keys: SandboxKeys, world: World) -> Harness {
        let pki = tls::generate_pki("wechat pay sandbox ca", &["127.0.0.1"]).expect("pki");
        let server = tls::server_config_generated(&pki).expect("server tls");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let state = SandboxState::new(keys, world);
        let sandbox = start(listener, Some(Arc::new(server)), state).expect("start");
        Harness {
            sandbox,
            ca_pem: pki.ca_pem,
        }
    }

    impl Harness {
        fn http(&self, timeout: Duration) -> reqwest::Client {
            let tls = tls::client_config_pinned(&self.ca_pem, "sandbox ca").expect("client tls");
            http_client(tls, timeout).expect("http client")
        }

        fn client_as(
            &self,
            signer: MerchantSigner,
            keys: PlatformKeys,
            timeout: Duration,
        ) -> WechatPayClient {
            let base = self.sandbox.base_url.parse().expect("base url");
            WechatPayClient::new(base, signer, keys, self.http(timeout))
        }

        /// The client as the proxy builds it: the right merchant, public key mode.
        fn client(&self) -> WechatPayClient {
            let signer = MerchantSigner::new(MCHID, MERCHANT_SERIAL, signer_of(merchant()));
            self.client_as(signer, public_key_mode(), CALL_TIMEOUT)
        }

        fn arm(&self, fault: Fault) {
            self.sandbox.state.faults.set(Platform::WechatPay, fault);
        }

        /// Sends a request signed by the merchant over `signed_body` but carrying `sent_body`.
        async fn raw(
            &self,
            method: Method,
            target: &str,
            timestamp: i64,
            signed_body: &[u8],
            sent_body: &[u8],
        ) -> reqwest::Response {
            let nonce = crypto::nonce().expect("nonce");
            let authorization = MerchantSigner::new(MCHID, MERCHANT_SERIAL, signer_of(merchant()))
                .authorization(method.as_str(), target, timestamp, &nonce, signed_body)
                .expect("sign");
            self.http(CALL_TIMEOUT)
                .request(method, format!("{}{target}", self.sandbox.base_url))
                .header("Authorization", authorization)
                .header("Accept", "application/json")
                .header("Content-Type", "application/json")
                .body(sent_body.to_vec())
                .send()
                .await
                .expect("sandbox answers")
        }
    }

    fn failure_of<T: std::fmt::Debug>(result: Result<T, WechatPayError>) -> Failure {
        result.expect_err("the call must fail").failure()
    }

    /// `SandboxKeys::generate` gives a consistent set: the client signs with the generated
    /// merchant key and verifies with the generated platform key, on every endpoint.
    #[tokio::test]
    async fn client_and_sandbox_agree_on_all_three_calls() {
        let (keys, secrets) = SandboxKeys::generate().expect("sandbox keys");
        let mut platform_keys = PlatformKeys::new();
        platform_keys.add_public_key(
            keys.wechat_platform_key_id.clone(),
            keys.wechat_platform_key.public_key().expect("public"),
        );
        let signer = MerchantSigner::new(
            keys.wechat_mchid.clone(),
            keys.wechat_merchant_serial.clone(),
            RsaSigner::from_pem(&secrets.wechat_merchant_private_pem, "merchant").expect("key"),
        );
        let harness = start_sandbox(keys, world()).await;
        let client = harness.client_as(signer, platform_keys, CALL_TIMEOUT);

        let first = client
            .offlineface_authinfo(&params("RAW-1"))
            .await
            .expect("authinfo");
        let second = client
            .offlineface_authinfo(&params("RAW-1"))
            .await
            .expect("authinfo");
        assert!(first.authinfo.starts_with("SANDBOX-AUTHINFO-"), "{first:?}");
        assert_ne!(first.authinfo, second.authinfo);
        assert_eq!(first.expires_in, Some(7200));

        let got = client
            .device_inspection("SN00001")
            .await
            .expect("inspection");
        assert_eq!(got, inspection("SN00001"));

        let page = client.list_devices(10, 5).await.expect("devices");
        assert_eq!(page.data, (10..15).map(device).collect::<Vec<_>>());
        assert_eq!(
            (page.offset, page.limit, page.total_count),
            (10, 5, Some(DEVICES as u64))
        );
        let links = page.links.expect("links");
        assert_eq!(links.next, "/v3/iotmanage/devices?offset=15&limit=5");
        assert_eq!(links.prev, "/v3/iotmanage/devices?offset=5&limit=5");

        let received: Vec<_> = harness
            .sandbox
            .state
            .received()
            .into_iter()
            .map(|r| (r.request, r.signature_ok))
            .collect();
        assert_eq!(
            received,
            [
                ("POST /v3/offlineface/authinfo".to_owned(), true),
                ("POST /v3/offlineface/authinfo".to_owned(), true),
                (
                    "GET /v3/iotmanage/device-inspections/SN00001".to_owned(),
                    true
                ),
                (
                    "GET /v3/iotmanage/devices?offset=10&limit=5".to_owned(),
                    true
                ),
            ]
        );
        harness.sandbox.stop().await;
    }

    #[tokio::test]
    async fn paging_with_limit_100_collects_all_253_devices() {
        let harness = start_sandbox(sandbox_keys(PLATFORM_KEY_ID), world()).await;
        let client = harness.client();
        let mut collected = Vec::new();
        let mut offset = Some(0);
        while let Some(at) = offset {
            let page = client.list_devices(at, 100).await.expect("page");
            collected.extend(page.data.iter().cloned());
            offset = page.next_offset();
        }
        assert_eq!(collected, world().wechat_devices);
        assert_eq!(harness.sandbox.state.received_by(Platform::WechatPay), 3);
        harness.sandbox.stop().await;
    }

    /// OpenSSL checks the sandbox's answer signature over `TIMESTAMP\nNONCE\nBODY\n` with the
    /// platform public key, so the sandbox signs as the real platform does, independently of
    /// the client's verifier.
    #[tokio::test]
    async fn sandbox_answer_signature_verifies_with_openssl() {
        let harness = start_sandbox(sandbox_keys(PLATFORM_KEY_ID), world()).await;
        let target = "/v3/iotmanage/devices?offset=0&limit=2";
        let response = harness.raw(Method::GET, target, unix_now(), b"", b"").await;
        assert_eq!(response.status(), StatusCode::OK);
        let header = |name: &str| {
            response.headers()[name]
                .to_str()
                .expect("ascii header")
                .to_owned()
        };
        assert_eq!(header("Wechatpay-Serial"), PLATFORM_KEY_ID);
        assert!(!header("Request-ID").is_empty());
        let (timestamp, nonce) = (header("Wechatpay-Timestamp"), header("Wechatpay-Nonce"));
        let signature = BASE64
            .decode(header("Wechatpay-Signature"))
            .expect("base64 signature");
        let body = response.bytes().await.expect("body");

        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, data: &[u8]| {
            let path = dir.path().join(name);
            std::fs::write(&path, data).expect("write");
            path
        };
        let public = write("pub.pem", platform().public.to_pem().as_bytes());
        let sig = write("sig.bin", &signature);
        let openssl_verifies = |message: &[u8]| {
            let msg = write("msg", message);
            std::process::Command::new("openssl")
                .args(["dgst", "-sha256", "-verify"])
                .arg(&public)
                .arg("-signature")
                .arg(&sig)
                .arg(&msg)
                .output()
                .expect("openssl must be installed")
                .status
                .success()
        };
        let message = [
            timestamp.as_bytes(),
            b"\n",
            nonce.as_bytes(),
            b"\n",
            &body,
            b"\n",
        ]
        .concat();
        assert!(openssl_verifies(&message));
        let tampered = [
            timestamp.as_bytes(),
            b"\n",
            nonce.as_bytes(),
            b"\n",
            &body,
            b" \n",
        ]
        .concat();
        assert!(!openssl_verifies(&tampered));
        harness.sandbox.stop().await;
    }

    #[tokio::test]
    async fn requests_not_signed_by_the_merchant_are_refused_with_sign_error() {
        let harness = start_sandbox(sandbox_keys(PLATFORM_KEY_ID), world()).await;
        let wrong = [
            (
                "another key",
                MerchantSigner::new(MCHID, MERCHANT_SERIAL, signer_of(stray())),
            ),
            (
                "another serial",
                MerchantSigner::new(MCHID, "0123456789ABCDEF", signer_of(merchant())),
            ),
            (
                "another mchid",
                MerchantSigner::new("1900000009", MERCHANT_SERIAL, signer_of(merchant())),
            ),
        ];
        for (case, signer) in wrong {
            let client = harness.client_as(signer, public_key_mode(), CALL_TIMEOUT);
            let failure = failure_of(client.device_inspection("SN00001").await);
            assert_eq!(failure.class, FailureClass::Rejected, "{case}");
            assert_eq!(
                (failure.status, failure.code.as_deref()),
                (401, Some("SIGN_ERROR")),
                "{case}"
            );
            assert!(!failure.retryable(), "{case}");
            assert!(failure.request_id.is_some(), "{case}");
        }
        let body = serde_json::to_vec(&params("RAW-1")).expect("json");
        let mut swapped = body.clone();
        swapped.extend_from_slice(b" ");
        let response = harness
            .raw(
                Method::POST,
                "/v3/offlineface/authinfo",
                unix_now(),
                &body,
                &swapped,
            )
            .await;
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "body not covered"
        );
        let old = harness
            .raw(
                Method::POST,
                "/v3/offlineface/authinfo",
                unix_now() - 301,
                &body,
                &body,
            )
            .await;
        assert_eq!(
            old.status(),
            StatusCode::UNAUTHORIZED,
            "old timestamp accepted"
        );
        let received = harness.sandbox.state.received();
        assert_eq!(received.len(), 5);
        assert!(received.iter().all(|r| !r.signature_ok), "{received:?}");
        harness.sandbox.stop().await;
    }

    /// Each injected fault reaches the client as the failure class the proxy acts on, and
    /// the next call (the fault spent) succeeds.
    #[tokio::test]
    async fn injected_faults_reach_the_client_as_typed_failures() {
        let harness = start_sandbox(sandbox_keys(PLATFORM_KEY_ID), world()).await;
        let client = harness.client();
        let once = |arm: fn(&mut Fault)| {
            let mut fault = Fault {
                count: Some(1),
                ..Fault::default()
            };
            arm(&mut fault);
            fault
        };
        use FailureClass::{BadSignature, Malformed, RateLimited, ServerError};
        let cases = [
            (
                "500",
                once(|f| f.status = Some(500)),
                ServerError,
                Some("SYSTEM_ERROR"),
            ),
            (
                "503",
                once(|f| f.status = Some(503)),
                ServerError,
                Some("SYSTEM_ERROR"),
            ),
            (
                "429",
                once(|f| (f.status, f.retry_after) = (Some(429), Some(3))),
                RateLimited,
                Some("FREQUENCY_LIMITED"),
            ),
            (
                "bad signature",
                once(|f| f.bad_signature = true),
                BadSignature,
                None,
            ),
            (
                "stale",
                once(|f| f.stale_timestamp = Some(301)),
                BadSignature,
                None,
            ),
            (
                "malformed",
                once(|f| f.malformed_body = true),
                Malformed,
                None,
            ),
        ];
        for (case, fault, class, code) in cases {
            harness.arm(fault);
            let error = client.device_inspection("SN00001").await.expect_err(case);
            let failure = error.failure();
            assert_eq!(failure.class, class, "{case}: {error}");
            assert_eq!(failure.code.as_deref(), code, "{case}");
            assert!(failure.retryable(), "{case}");
            assert!(failure.request_id.is_some(), "{case}");
            if case == "429" {
                assert_eq!(failure.retry_after, Some(Duration::from_secs(3)));
            }
            if case == "stale" {
                assert!(
                    matches!(
                        error,
                        WechatPayError::BadSignature {
                            source: SignatureError::Stale { skew_secs: ..=-300 },
                            ..
                        }
                    ),
                    "{error:?}"
                );
            }
            client
                .device_inspection("SN00001")
                .await
                .unwrap_or_else(|e| panic!("after {case}: {e}"));
        }
        harness.sandbox.stop().await;
    }

    #[tokio::test]
    async fn latency_beyond_the_client_timeout_is_a_transport_failure() {
        let harness = start_sandbox(sandbox_keys(PLATFORM_KEY_ID), world()).await;
        let signer = MerchantSigner::new(MCHID, MERCHANT_SERIAL, signer_of(merchant()));
        let client = harness.client_as(signer, public_key_mode(), Duration::from_millis(300));
        harness.arm(Fault {
            latency: Some(Duration::from_secs(2)),
            count: Some(1),
            ..Fault::default()
        });
        let failure = failure_of(client.device_inspection("SN00001").await);
        assert_eq!(failure.class, FailureClass::Transport, "{failure:?}");
        assert_eq!(failure.status, 0);
        assert!(failure.retryable());
        harness.sandbox.stop().await;
    }

    /// 21 device-list calls: the sandbox admits at most 20 in its window. The window is
    /// stretched to an hour so that the 21 arrive within it however slow the machine is (under
    /// qemu 21 TLS handshakes take more than the documented second).
    #[tokio::test]
    async fn twenty_one_quick_list_calls_hit_frequency_limited() {
        let world = World {
            device_list_window: Some(Duration::from_secs(3600)),
            ..world()
        };
        let harness = start_sandbox(sandbox_keys(PLATFORM_KEY_ID), world).await;
        let client = Arc::new(harness.client());
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..21 {
            let client = client.clone();
            calls.spawn(async move { client.list_devices(i, 1).await });
        }
        let mut limited = 0;
        while let Some(joined) = calls.join_next().await {
            if let Err(error) = joined.expect("task") {
                let failure = error.failure();
                assert_eq!(failure.class, FailureClass::RateLimited, "{error}");
                assert_eq!(failure.code.as_deref(), Some("FREQUENCY_LIMITED"));
                limited += 1;
            }
        }
        assert!(limited >= 1, "no call was limited");
        assert_eq!(harness.sandbox.state.received_by(Platform::WechatPay), 21);
        harness.sandbox.stop().await;
    }

    /// With a merchant limit of 3 authinfo requests an hour, the fourth signed request is
    /// refused 429 FREQUENCY_LIMITED (retryable, rate limited); other calls are not.
    #[tokio::test]
    async fn the_merchants_authinfo_limit_refuses_requests_over_it() {
        let world = World {
            authinfo_limit: Some(crate::sandbox::AuthinfoLimit {
                requests: 3,
                window: Duration::from_secs(3600),
            }),
            ..world()
        };
        let harness = start_sandbox(sandbox_keys(PLATFORM_KEY_ID), world).await;
        let client = harness.client();
        for _ in 0..3 {
            client
                .offlineface_authinfo(&params("RAW-1"))
                .await
                .expect("within the limit");
        }
        let failure = failure_of(client.offlineface_authinfo(&params("RAW-1")).await);
        assert_eq!(failure.class, FailureClass::RateLimited, "{failure:?}");
        assert_eq!(
            (failure.status, failure.code.as_deref()),
            (429, Some("FREQUENCY_LIMITED"))
        );
        assert!(
            client.device_inspection("SN00001").await.is_ok(),
            "other calls are not limited"
        );
        harness.sandbox.stop().await;
    }

    /// Platform certificate mode: the sandbox names its key by a certificate serial, and a
    /// client holding that certificate verifies; one holding only a public key id does not.
    #[tokio::test]
    async fn platform_certificate_mode_verifies_sandbox_answers() {
        let key = rcgen::KeyPair::from_pem(&platform().private_pem).expect("rsa key for rcgen");
        let mut cert = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        cert.serial_number = Some(rcgen::SerialNumber::from_slice(&[
            0x5B, 0xE0, 0x3C, 0x1A, 0x5D, 0xE7, 0x0F, 0x5D, 0x9A, 0x11,
        ]));
        cert.distinguished_name.push(
            rcgen::DnType::CommonName,
            "Tenpay.com sandbox platform certificate",
        );
        let cert_pem = cert.self_signed(&key).expect("certificate").pem();
        let mut keys = PlatformKeys::new();
        let serials = keys
            .add_certificates_pem(&cert_pem, "wechatpay_platform.pem")
            .expect("load certificate");
        assert_eq!(serials, ["5BE03C1A5DE70F5D9A11"]);

        let harness = start_sandbox(sandbox_keys("5BE03C1A5DE70F5D9A11"), world()).await;
        let signer = MerchantSigner::new(MCHID, MERCHANT_SERIAL, signer_of(merchant()));
        let client = harness.client_as(signer, keys, CALL_TIMEOUT);
        let got = client.device_inspection("SN00001").await.expect("verified");
        assert_eq!(got.device_sn, "SN00001");

        let failure = failure_of(harness.client().device_inspection("SN00001").await);
        assert_eq!(failure.class, FailureClass::BadSignature);
        assert!(
            failure
                .message
                .is_some_and(|m| m.contains("5BE03C1A5DE70F5D9A11"))
        );
        harness.sandbox.stop().await;
    }

    /// A platform certificate for test key `key`, valid from a month ago for `days`.
    fn platform_certificate(key: &GeneratedKey, days: i64) -> crate::sandbox::SandboxCertificate {
        let now = unix_now();
        crate::sandbox::SandboxCertificate::issue(
            &key.private_pem,
            now - 30 * 86_400,
            now + days * 86_400,
        )
        .expect("certificate")
    }

    fn apiv3() -> ApiV3Key {
        ApiV3Key::from_text(APIV3_KEY).expect("key")
    }

    /// The sandbox serves its certificates encrypted with the APIv3 key; the client opens each,
    /// checks it is the certificate its entry names, and verifies the answer: the first time
    /// with the set itself (nothing trusted yet), then with a certificate it trusts.
    #[tokio::test]
    async fn certificates_download_decrypts_and_verifies_first_with_the_set_then_with_trust() {
        let mut keys = sandbox_keys(PLATFORM_KEY_ID);
        let current = platform_certificate(platform(), 365);
        keys.wechat_platform_certificates = vec![current.clone()];
        let world = World {
            wechat_sign_with_certificate: true,
            ..world()
        };
        let harness = start_sandbox(keys, world).await;
        let signer = || MerchantSigner::new(MCHID, MERCHANT_SERIAL, signer_of(merchant()));

        let first = harness.client_as(signer(), PlatformKeys::new(), CALL_TIMEOUT);
        let download = first
            .download_certificates(&apiv3())
            .await
            .expect("first use");
        assert_eq!(
            download.verification,
            Verification::FirstUse(current.serial.clone())
        );
        assert_eq!(download.certificates.len(), 1);
        let got = &download.certificates[0];
        assert_eq!(got.info.serial, current.serial);
        assert_eq!(got.pem, current.pem);
        assert_eq!(
            (got.info.not_before, got.info.not_after),
            (current.not_before, current.not_after)
        );
        assert!(download.request_id.is_some());

        let mut trusted = PlatformKeys::new();
        trusted.add_certificate(got.info.clone());
        let client = harness.client_as(signer(), trusted, CALL_TIMEOUT);
        let again = client
            .download_certificates(&apiv3())
            .await
            .expect("trusted");
        assert_eq!(
            again.verification,
            Verification::Trusted(current.serial.clone())
        );
        // The other calls verify with the downloaded certificate too.
        client
            .device_inspection("SN00001")
            .await
            .expect("verified by certificate");

        // A rotation: WeChat Pay publishes a new certificate and signs with it. A client that
        // trusts only the old one does not take an answer signed by a key it does not know.
        let next = harness
            .sandbox
            .state
            .publish_platform_certificate(platform_certificate(stray(), 5 * 365));
        harness.sandbox.state.sign_with_certificate(Some(&next));
        let failure = failure_of(client.download_certificates(&apiv3()).await);
        assert_eq!(failure.class, FailureClass::BadSignature);
        assert!(failure.message.is_some_and(|m| m.contains(&next)));
        // Signed with the old one (still trusted), the answer brings the new one in.
        harness
            .sandbox
            .state
            .sign_with_certificate(Some(&current.serial));
        let rotated = client
            .download_certificates(&apiv3())
            .await
            .expect("rotation");
        let serials: Vec<&str> = rotated
            .certificates
            .iter()
            .map(|c| c.info.serial.as_str())
            .collect();
        assert_eq!(serials, [current.serial.as_str(), next.as_str()]);
        harness.sandbox.stop().await;
    }

    /// A wrong APIv3 key opens nothing: a typed failure that names the key file, never a
    /// certificate taken on trust.
    #[tokio::test]
    async fn certificates_that_do_not_open_with_the_apiv3_key_are_refused() {
        let mut keys = sandbox_keys(PLATFORM_KEY_ID);
        keys.wechat_platform_certificates = vec![platform_certificate(platform(), 365)];
        let harness = start_sandbox(keys, world()).await;
        let wrong = ApiV3Key::from_text("SandboxApiV3Key00000000000000002").expect("key");
        let error = harness
            .client()
            .download_certificates(&wrong)
            .await
            .expect_err("wrong key");
        assert!(matches!(error, WechatPayError::Decrypt { .. }), "{error:?}");
        let failure = error.failure();
        assert_eq!(failure.class, FailureClass::BadSignature);
        assert!(
            failure
                .message
                .is_some_and(|m| m.contains("apiv3_key_file")),
            "{error}"
        );
        // In public key mode the answer is signed with the public key, which is trusted.
        let download = harness
            .client()
            .download_certificates(&apiv3())
            .await
            .expect("opens");
        assert_eq!(
            download.verification,
            Verification::Trusted(PLATFORM_KEY_ID.into())
        );
        harness.sandbox.stop().await;
    }

    #[tokio::test]
    async fn sandbox_refuses_bad_parameters_like_wechat_pay() {
        let harness = start_sandbox(sandbox_keys(PLATFORM_KEY_ID), world()).await;
        let client = harness.client();
        let refused = |result: Failure, status: u16, code: &str, case: &str| {
            assert_eq!(result.class, FailureClass::Rejected, "{case}");
            assert_eq!(
                (result.status, result.code.as_deref()),
                (status, Some(code)),
                "{case}"
            );
            assert!(result.request_id.is_some(), "{case}");
        };
        let mut no_device = params("RAW-1");
        no_device.device_id.clear();
        refused(
            failure_of(client.offlineface_authinfo(&no_device).await),
            400,
            "PARAM_ERROR",
            "empty device_id",
        );
        refused(
            failure_of(client.offlineface_authinfo(&params("RAW-REJECTED")).await),
            400,
            "PARAM_ERROR",
            "rejected raw_data",
        );
        for sn in ["SN1", "SN-00001", "SN00001/..", &"A".repeat(201)] {
            refused(
                failure_of(client.device_inspection(sn).await),
                400,
                "PARAM_ERROR",
                sn,
            );
        }
        refused(
            failure_of(client.device_inspection("SN99999").await),
            404,
            "RESOURCE_NOT_EXISTS",
            "unknown",
        );
        for limit in [0, 101] {
            refused(
                failure_of(client.list_devices(0, limit).await),
                400,
                "PARAM_ERROR",
                "limit",
            );
        }
        let no_limit = harness
            .raw(
                Method::GET,
                "/v3/iotmanage/devices?offset=0",
                unix_now(),
                b"",
                b"",
            )
            .await;
        assert_eq!(no_limit.status(), StatusCode::BAD_REQUEST);
        let received = harness.sandbox.state.received();
        assert!(
            received
                .iter()
                .any(|r| r.request == "GET /v3/iotmanage/device-inspections/SN%2D00001"),
            "{received:?}"
        );
        assert!(received.iter().all(|r| r.signature_ok), "{received:?}");
        harness.sandbox.stop().await;
    }

    #[test]
    fn authorization_parser_takes_any_order_and_spaces_after_commas() {
        let header = "WECHATPAY2-SHA256-RSA2048 signature=\"c2ln\", serial_no=\"AB\",timestamp=\"1\", nonce_str=\"N\",mchid=\"19\"";
        assert_eq!(
            parse_authorization(header),
            Ok(Authorization {
                mchid: "19",
                nonce_str: "N",
                timestamp: "1",
                serial_no: "AB",
                signature: "c2ln",
            })
        );
    }

    #[test]
    fn authorization_parser_refuses_malformed_headers() {
        let ok = "mchid=\"19\",nonce_str=\"N\",timestamp=\"1\",serial_no=\"AB\",signature=\"c2ln\"";
        let cases = [
            (format!("WECHATPAY2-SHA256-RSA2048 {ok},mchid=\"20\""), "repeated Authorization parameter"),
            (format!("WECHATPAY2-SHA256-RSA2048 {ok},mch_id=\"20\""), "unknown Authorization parameter"),
            (format!("WECHATPAY2-SHA256-RSA2048 {ok},"), "trailing comma"),
            (format!("WECHATPAY2-SHA256-RSA2048 {ok} x"), "parameters must be separated by commas"),
            (format!("Bearer {ok}"), "the Authorization scheme is not WECHATPAY2-SHA256-RSA2048"),
            (
                "WECHATPAY2-SHA256-RSA2048 mchid=\"19\",nonce_str=\"N\",timestamp=\"1\",serial_no=\"AB\"".to_owned(),
                "signature is missing",
            ),
            (
                "WECHATPAY2-SHA256-RSA2048 mchid=\"\",nonce_str=\"N\",timestamp=\"1\",serial_no=\"AB\",signature=\"s\"".to_owned(),
                "mchid is missing",
            ),
            ("WECHATPAY2-SHA256-RSA2048 mchid=19".to_owned(), "expected key=\"value\""),
        ];
        for (header, want) in cases {
            assert_eq!(parse_authorization(&header), Err(want), "{header}");
        }
    }

    proptest::proptest! {
        /// Whatever arrives in the header, the parser answers and never panics.
        #[test]
        fn authorization_parser_never_panics(s in ".{0,300}") {
            let _ = parse_authorization(&s);
            let _ = parse_authorization(&format!("WECHATPAY2-SHA256-RSA2048 {s}"));
        }
    }
}
