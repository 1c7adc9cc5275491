//! The WeChat Pay APIv3 HTTP client the proxy calls.
//!
//! Owns: building each request (URL, signed `Authorization`, headers), reading the answer,
//! verifying a successful answer's signature before its body is parsed, parsing error bodies
//! (`{"code","message","detail"}`), and turning every outcome into a [`WechatPayError`] that
//! knows its [`Failure`]. It must not retry, cache or pace calls (the proxy does, from the
//! failure class and the limits in [`super`]), and must not log keys, signatures, raw_data or
//! authinfo values; it logs each answer's `Request-ID`.
//!
//! Reading is apart from the transport: [`read_answer`] and the readers per endpoint are pure
//! functions of the answer (status, headers, body), the keys and the clock, so tests and the
//! fuzz targets call them without a network.

use std::time::Duration;

use crate::units::unix_now;

use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::sign::MerchantSigner;
use super::verify::{PlatformKeys, SignatureError};
use super::{Authinfo, AuthinfoParams, Device, DeviceInspection, DevicePage, PageLinks};
use crate::crypto::{self, CryptoError};
use crate::platform::{Failure, FailureClass};

/// WeChat Pay's API host.
pub const DEFAULT_BASE_URL: &str = "https://api.mch.weixin.qq.com";

/// The `User-Agent` every request carries (WeChat Pay asks for one).
const USER_AGENT_VALUE: &str = concat!(
    "authinfo-proxy/",
    env!("CARGO_PKG_VERSION"),
    " (WechatPay-APIv3)"
);

/// The answer header carrying WeChat Pay's request id, to quote in support tickets.
pub const HEADER_REQUEST_ID: &str = "Request-ID";

/// The error code WeChat Pay answers when a frequency limit is hit.
pub const CODE_FREQUENCY_LIMITED: &str = "FREQUENCY_LIMITED";
/// The error code of a WeChat Pay internal error (retry with the same parameters).
pub const CODE_SYSTEM_ERROR: &str = "SYSTEM_ERROR";

/// A failed WeChat Pay call. `endpoint` names the API (`GET /v3/iotmanage/devices`).
#[derive(Debug, thiserror::Error)]
pub enum WechatPayError {
    #[error("could not sign the request to {endpoint}")]
    Sign {
        endpoint: &'static str,
        #[source]
        source: CryptoError,
    },
    #[error("no answer from WeChat Pay to {endpoint}")]
    Transport {
        endpoint: &'static str,
        #[source]
        source: reqwest::Error,
    },
    #[error(
        "WeChat Pay refused {endpoint}: HTTP {status} {}: {}",
        .code.as_deref().unwrap_or("(no code)"),
        .message.as_deref().unwrap_or("(no message)")
    )]
    Api {
        endpoint: &'static str,
        status: u16,
        code: Option<String>,
        message: Option<String>,
        /// The error body's `detail`, as sent (boxed: it is rarely there, and it would double
        /// the size of every `Result` carrying this error).
        detail: Option<Box<serde_json::Value>>,
        request_id: Option<String>,
        retry_after: Option<Duration>,
    },
    #[error("WeChat Pay's answer to {endpoint} failed verification")]
    BadSignature {
        endpoint: &'static str,
        status: u16,
        request_id: Option<String>,
        #[source]
        source: SignatureError,
    },
    #[error("WeChat Pay's answer to {endpoint} cannot be opened: {reason}")]
    Decrypt {
        endpoint: &'static str,
        status: u16,
        request_id: Option<String>,
        reason: String,
    },
    #[error("WeChat Pay's answer to {endpoint} is not of the documented shape: {reason}")]
    Malformed {
        endpoint: &'static str,
        status: u16,
        request_id: Option<String>,
        reason: String,
    },
}

/// The class of a WeChat Pay error answer: 429 or `FREQUENCY_LIMITED` is rate limiting, 5xx or
/// `SYSTEM_ERROR` a server error, anything else (PARAM_ERROR, INVALID_REQUEST, SIGN_ERROR,
/// NO_AUTH, RESOURCE_NOT_EXISTS, ...) a refusal that retrying will not change.
pub fn classify(status: u16, code: Option<&str>) -> FailureClass {
    if status == 429 || code == Some(CODE_FREQUENCY_LIMITED) {
        FailureClass::RateLimited
    } else if status >= 500 || code == Some(CODE_SYSTEM_ERROR) {
        FailureClass::ServerError
    } else {
        FailureClass::Rejected
    }
}

impl WechatPayError {
    /// What the proxy needs to know of this failure.
    pub fn failure(&self) -> Failure {
        match self {
            Self::Sign { .. } | Self::Transport { .. } => {
                Failure::local(FailureClass::Transport, crate::error_chain(self))
            }
            Self::Api {
                status,
                code,
                message,
                request_id,
                retry_after,
                ..
            } => Failure {
                class: classify(*status, code.as_deref()),
                status: *status,
                code: code.clone(),
                message: message.clone(),
                request_id: request_id.clone(),
                retry_after: *retry_after,
            },
            Self::BadSignature {
                status,
                request_id,
                source,
                ..
            } => Failure {
                class: FailureClass::BadSignature,
                status: *status,
                code: None,
                message: Some(source.to_string()),
                request_id: request_id.clone(),
                retry_after: None,
            },
            // An answer that does not open with the APIv3 key is not known to be WeChat Pay's.
            Self::Decrypt {
                status,
                request_id,
                reason,
                ..
            } => Failure {
                class: FailureClass::BadSignature,
                status: *status,
                code: None,
                message: Some(reason.clone()),
                request_id: request_id.clone(),
                retry_after: None,
            },
            Self::Malformed {
                status,
                request_id,
                reason,
                ..
            } => Failure {
                class: FailureClass::Malformed,
                status: *status,
                code: None,
                message: Some(reason.clone()),
                request_id: request_id.clone(),
                retry_after: None,
            },
        }
    }
}

/// The body of a WeChat Pay error answer. Every field is optional so that a gateway's own
/// error page still yields a typed error with its status.
#[derive(Debug, Default, Deserialize)]
struct ErrorBody {
    code: Option<String>,
    message: Option<String>,
    detail: Option<serde_json::Value>,
}

/// The `Request-ID` header of an answer.
fn request_id(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get(HEADER_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// The error an answer with a non-2xx `status` stands for. The body is read as
/// `{"code","message","detail"}` when it is one; anything else (a gateway's HTML page) leaves
/// code and message empty, and the status alone classifies it.
pub fn error_answer(
    endpoint: &'static str,
    status: u16,
    headers: &http::HeaderMap,
    body: &[u8],
) -> WechatPayError {
    let parsed: ErrorBody = crate::json::from_slice(body).unwrap_or_default();
    WechatPayError::Api {
        endpoint,
        status,
        code: parsed.code,
        message: parsed.message,
        detail: parsed.detail.map(Box::new),
        request_id: request_id(headers),
        retry_after: crate::platform::retry_after(headers),
    }
}

/// [`error_answer`], logged: what a non-2xx answer gives.
fn refused(
    endpoint: &'static str,
    status: u16,
    headers: &http::HeaderMap,
    body: &[u8],
) -> WechatPayError {
    let error = error_answer(endpoint, status, headers, body);
    let failure = error.failure();
    tracing::warn!(
        endpoint,
        upstream_status = status,
        code = failure.code.as_deref(),
        request_id = failure.request_id.as_deref(),
        "wechat pay refused the request"
    );
    error
}

/// A successful, verified answer.
#[derive(Debug)]
pub struct Answer<T> {
    pub value: T,
    pub status: u16,
    pub request_id: Option<String>,
}

/// A 2xx answer as received, not yet verified.
pub(super) struct RawAnswer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: bytes::Bytes,
    pub request_id: Option<String>,
}

/// The device-list page as sent: every field optional.
#[derive(Debug, Deserialize)]
pub struct RawDevicePage {
    data: Option<Vec<Device>>,
    offset: Option<u64>,
    limit: Option<u64>,
    total_count: Option<u64>,
    links: Option<PageLinks>,
}

impl RawDevicePage {
    /// The page, with what it leaves out taken from the request (`offset`, `limit`) or read as
    /// empty.
    pub fn into_page(self, offset: u64, limit: u64) -> DevicePage {
        DevicePage {
            data: self.data.unwrap_or_default(),
            offset: self.offset.unwrap_or(offset),
            limit: self.limit.unwrap_or(limit),
            total_count: self.total_count,
            links: self.links,
        }
    }
}

// === reading answers (pure: the transport is in `WechatPayClient::send`) ===

/// Reads one answer of `endpoint` as WeChat Pay sent it: a non-2xx `status` is its typed error
/// (the body read as `{"code","message","detail"}` when it is one); a 2xx answer must carry a
/// valid signature by one of `keys` within the time window around `now` before its body is
/// parsed as `T`.
pub fn read_answer<T: DeserializeOwned>(
    endpoint: &'static str,
    status: u16,
    headers: &http::HeaderMap,
    body: &[u8],
    keys: &PlatformKeys,
    now: i64,
) -> Result<Answer<T>, WechatPayError> {
    if !(200..300).contains(&status) {
        return Err(refused(endpoint, status, headers, body));
    }
    let request_id = request_id(headers);
    if let Err(source) = keys.verify(headers, body, now) {
        tracing::warn!(
            endpoint,
            upstream_status = status,
            request_id = request_id.as_deref(),
            error = %source,
            "wechat pay answer failed verification"
        );
        return Err(WechatPayError::BadSignature {
            endpoint,
            status,
            request_id,
            source,
        });
    }
    decode_answer(endpoint, status, request_id, body)
}

/// Parses the body of a 2xx answer whose signature has been verified ([`read_answer`] does
/// both) as `T`.
pub fn decode_answer<T: DeserializeOwned>(
    endpoint: &'static str,
    status: u16,
    request_id: Option<String>,
    body: &[u8],
) -> Result<Answer<T>, WechatPayError> {
    let value = crate::json::from_slice(body).map_err(|e| {
        // The position and category only: serde_json's message may quote body values.
        let reason = format!("{:?} error at line {} column {}", e.classify(), e.line(), e.column());
        tracing::warn!(endpoint, upstream_status = status, request_id = request_id.as_deref(), %reason, "wechat pay answer is malformed");
        WechatPayError::Malformed {
            endpoint,
            status,
            request_id: request_id.clone(),
            reason,
        }
    })?;
    tracing::debug!(
        endpoint,
        upstream_status = status,
        request_id = request_id.as_deref(),
        "wechat pay answered"
    );
    Ok(Answer {
        value,
        status,
        request_id,
    })
}

/// The endpoint name of `POST /v3/offlineface/authinfo` in errors.
const AUTHINFO_ENDPOINT: &str = "POST /v3/offlineface/authinfo";
/// The endpoint name of `GET /v3/iotmanage/device-inspections/{device_sn}` in errors.
const INSPECTION_ENDPOINT: &str = "GET /v3/iotmanage/device-inspections/{device_sn}";
/// The endpoint name of `GET /v3/iotmanage/devices` in errors.
const DEVICES_ENDPOINT: &str = "GET /v3/iotmanage/devices";

/// Reads an answer of `POST /v3/offlineface/authinfo` ([`read_answer`], then
/// [`check_authinfo`]).
pub fn read_authinfo(
    status: u16,
    headers: &http::HeaderMap,
    body: &[u8],
    keys: &PlatformKeys,
    now: i64,
) -> Result<Answer<Authinfo>, WechatPayError> {
    check_authinfo(read_answer(
        AUTHINFO_ENDPOINT,
        status,
        headers,
        body,
        keys,
        now,
    )?)
}

/// An authinfo answer is good only with an authinfo in it: an empty one is malformed.
pub fn check_authinfo(answer: Answer<Authinfo>) -> Result<Answer<Authinfo>, WechatPayError> {
    if answer.value.authinfo.is_empty() {
        return Err(WechatPayError::Malformed {
            endpoint: AUTHINFO_ENDPOINT,
            status: answer.status,
            request_id: answer.request_id,
            reason: "authinfo is empty".into(),
        });
    }
    Ok(answer)
}

/// Reads an answer of `GET /v3/iotmanage/device-inspections/{device_sn}` ([`read_answer`]).
pub fn read_inspection(
    status: u16,
    headers: &http::HeaderMap,
    body: &[u8],
    keys: &PlatformKeys,
    now: i64,
) -> Result<DeviceInspection, WechatPayError> {
    read_answer(INSPECTION_ENDPOINT, status, headers, body, keys, now).map(|a| a.value)
}

/// Reads an answer of `GET /v3/iotmanage/devices?offset=..&limit=..` ([`read_answer`], then
/// [`RawDevicePage::into_page`]).
pub fn read_device_page(
    status: u16,
    headers: &http::HeaderMap,
    body: &[u8],
    keys: &PlatformKeys,
    now: i64,
    offset: u64,
    limit: u64,
) -> Result<DevicePage, WechatPayError> {
    let raw: Answer<RawDevicePage> =
        read_answer(DEVICES_ENDPOINT, status, headers, body, keys, now)?;
    Ok(raw.value.into_page(offset, limit))
}

// === impl WechatPayClient ===

/// Signs requests with the merchant key, sends them and verifies WeChat Pay's answers.
#[derive(Debug)]
pub struct WechatPayClient {
    base_url: reqwest::Url,
    signer: MerchantSigner,
    /// Replaced whole when platform certificates are downloaded; readers take a snapshot.
    keys: std::sync::RwLock<std::sync::Arc<PlatformKeys>>,
    http: reqwest::Client,
}

impl WechatPayClient {
    /// `base_url` is [`DEFAULT_BASE_URL`] in production (a path prefix is kept); `http` comes
    /// from [`crate::platform::http_client`]; `keys` verify the answers.
    pub fn new(
        base_url: reqwest::Url,
        signer: MerchantSigner,
        keys: PlatformKeys,
        http: reqwest::Client,
    ) -> Self {
        Self {
            base_url,
            signer,
            keys: std::sync::RwLock::new(std::sync::Arc::new(keys)),
            http,
        }
    }

    /// The keys answers are verified with now.
    pub fn keys(&self) -> std::sync::Arc<PlatformKeys> {
        self.keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the keys answers are verified with (downloaded platform certificates).
    pub fn set_keys(&self, keys: PlatformKeys) {
        *self
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = std::sync::Arc::new(keys);
    }

    /// `POST /v3/offlineface/authinfo`: a fresh authinfo for the face SDK that made `raw_data`.
    pub async fn offlineface_authinfo(
        &self,
        params: &AuthinfoParams,
    ) -> Result<Authinfo, WechatPayError> {
        // Serialising a struct of `String` fields cannot fail: serde_json only fails on maps
        // with non-string keys or on a failing custom `Serialize`, and there are neither.
        let body = serde_json::to_vec(params).expect("AuthinfoParams serialises to JSON");
        let sent = self
            .send(
                reqwest::Method::POST,
                "/v3/offlineface/authinfo",
                None,
                Some(body),
                AUTHINFO_ENDPOINT,
            )
            .await?;
        let answer = read_authinfo(
            sent.status,
            &sent.headers,
            &sent.body,
            &self.keys(),
            unix_now(),
        )?;
        tracing::info!(
            request_id = answer.request_id.as_deref(),
            authinfo_fingerprint = %crypto::secret_fingerprint(answer.value.authinfo.as_bytes()),
            expires_in = answer.value.expires_in,
            "wechat pay issued an authinfo"
        );
        Ok(answer.value)
    }

    /// `GET /v3/iotmanage/device-inspections/{device_sn}`: the device's factory inspection.
    /// Every byte of `device_sn` but ASCII letters and digits is percent-encoded.
    pub async fn device_inspection(
        &self,
        device_sn: &str,
    ) -> Result<DeviceInspection, WechatPayError> {
        let path = format!(
            "/v3/iotmanage/device-inspections/{}",
            utf8_percent_encode(device_sn, NON_ALPHANUMERIC)
        );
        let sent = self
            .send(reqwest::Method::GET, &path, None, None, INSPECTION_ENDPOINT)
            .await?;
        read_inspection(
            sent.status,
            &sent.headers,
            &sent.body,
            &self.keys(),
            unix_now(),
        )
    }

    /// `GET /v3/iotmanage/devices?offset=..&limit=..`: one page of the merchant's devices.
    /// WeChat Pay allows `limit` up to [`super::MAX_PAGE_LIMIT`] and refuses more with
    /// PARAM_ERROR; pace calls to [`super::LIST_REQUESTS_PER_SECOND`].
    pub async fn list_devices(
        &self,
        offset: u64,
        limit: u64,
    ) -> Result<DevicePage, WechatPayError> {
        let query = format!("offset={offset}&limit={limit}");
        let sent = self
            .send(
                reqwest::Method::GET,
                "/v3/iotmanage/devices",
                Some(&query),
                None,
                DEVICES_ENDPOINT,
            )
            .await?;
        read_device_page(
            sent.status,
            &sent.headers,
            &sent.body,
            &self.keys(),
            unix_now(),
            offset,
            limit,
        )
    }

    /// Signs and sends one request and reads its whole answer: a 2xx answer as received (not
    /// yet verified), any other as its [`WechatPayError::Api`] ([`refused`]).
    pub(super) async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        query: Option<&str>,
        body: Option<Vec<u8>>,
        endpoint: &'static str,
    ) -> Result<RawAnswer, WechatPayError> {
        let url = request_url(&self.base_url, path, query);
        let target = signed_target(&url);
        let sign_error = |source| WechatPayError::Sign { endpoint, source };
        let nonce = crypto::nonce().map_err(sign_error)?;
        let authorization = self
            .signer
            .authorization(
                method.as_str(),
                &target,
                unix_now(),
                &nonce,
                body.as_deref().unwrap_or_default(),
            )
            .map_err(sign_error)?;
        let mut request = self
            .http
            .request(method, url)
            .header(AUTHORIZATION, authorization)
            .header(ACCEPT, "application/json")
            .header(USER_AGENT, USER_AGENT_VALUE);
        if let Some(body) = body {
            request = request.header(CONTENT_TYPE, "application/json").body(body);
        }
        let transport = |source| WechatPayError::Transport { endpoint, source };
        let response = request.send().await.map_err(transport)?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.bytes().await.map_err(transport)?;
        if !(200..300).contains(&status) {
            return Err(refused(endpoint, status, &headers, &body));
        }
        Ok(RawAnswer {
            status,
            request_id: request_id(&headers),
            headers,
            body,
        })
    }
}

/// The URL of `path` (and `query`) under `base_url`, whose own path is kept as a prefix.
pub fn request_url(base_url: &reqwest::Url, path: &str, query: Option<&str>) -> reqwest::Url {
    let mut url = base_url.clone();
    url.set_path(&format!("{}{path}", base_url.path().trim_end_matches('/')));
    url.set_query(query);
    url
}

/// The request target a request to `url` is signed over: its path and query exactly as the URL
/// will send them, so that no normalisation can split what is signed from what is sent.
pub fn signed_target(url: &reqwest::Url) -> String {
    match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> http::HeaderMap {
        let mut map = http::HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().expect("header value"));
        }
        map
    }

    #[test]
    fn error_answers_are_classified_by_status_and_code() {
        use FailureClass::*;
        let table: &[(u16, Option<&str>, FailureClass)] = &[
            (400, Some("PARAM_ERROR"), Rejected),
            (400, Some("INVALID_REQUEST"), Rejected),
            (401, Some("SIGN_ERROR"), Rejected),
            (403, Some("NO_AUTH"), Rejected),
            (404, Some("RESOURCE_NOT_EXISTS"), Rejected),
            (404, None, Rejected),
            (429, Some("FREQUENCY_LIMITED"), RateLimited),
            (429, None, RateLimited),
            (403, Some("FREQUENCY_LIMITED"), RateLimited),
            (500, Some("SYSTEM_ERROR"), ServerError),
            (503, None, ServerError),
            (502, None, ServerError),
            (400, Some("SYSTEM_ERROR"), ServerError),
        ];
        for (status, code, want) in table {
            assert_eq!(classify(*status, *code), *want, "{status} {code:?}");
        }
    }

    #[test]
    fn error_body_is_parsed_with_request_id_and_detail() {
        let body = br#"{"code":"PARAM_ERROR","message":"device_id is required","detail":{"field":"device_id"}}"#;
        let h = headers(&[("request-id", "08F78BB5AF0610D3021800")]);
        let error = error_answer("POST /v3/offlineface/authinfo", 400, &h, body);
        let WechatPayError::Api { detail, .. } = &error else {
            panic!("not an Api error: {error:?}");
        };
        assert_eq!(
            detail.as_ref().map(|d| d["field"].clone()),
            Some("device_id".into())
        );
        let failure = error.failure();
        assert_eq!(
            failure,
            Failure {
                class: FailureClass::Rejected,
                status: 400,
                code: Some("PARAM_ERROR".into()),
                message: Some("device_id is required".into()),
                request_id: Some("08F78BB5AF0610D3021800".into()),
                retry_after: None,
            }
        );
        assert!(!failure.retryable());
        assert!(error.to_string().contains("PARAM_ERROR"), "{error}");
    }

    #[test]
    fn rate_limited_answer_carries_retry_after() {
        let body = br#"{"code":"FREQUENCY_LIMITED","message":"slow down"}"#;
        let h = headers(&[("retry-after", "7"), ("request-id", "R1")]);
        let failure = error_answer("GET /v3/iotmanage/devices", 429, &h, body).failure();
        assert_eq!(failure.class, FailureClass::RateLimited);
        assert_eq!(failure.retry_after, Some(Duration::from_secs(7)));
        assert!(failure.retryable());
    }

    /// A load balancer's HTML page still gives a typed error, classified by its status.
    #[test]
    fn non_json_error_page_keeps_its_status() {
        let failure = error_answer(
            "GET /v3/iotmanage/devices",
            502,
            &http::HeaderMap::new(),
            b"<html>bad gateway</html>",
        )
        .failure();
        assert_eq!(failure.class, FailureClass::ServerError);
        assert!(failure.retryable());
        assert_eq!(
            (failure.status, failure.code, failure.request_id),
            (502, None, None)
        );
    }

    #[test]
    fn signature_and_shape_failures_keep_the_request_id() {
        let bad = WechatPayError::BadSignature {
            endpoint: "GET /v3/iotmanage/devices",
            status: 200,
            request_id: Some("R2".into()),
            source: SignatureError::Stale { skew_secs: -301 },
        }
        .failure();
        assert_eq!(bad.class, FailureClass::BadSignature);
        assert_eq!(bad.request_id.as_deref(), Some("R2"));
        assert!(
            bad.message.as_deref().is_some_and(|m| m.contains("-301")),
            "{bad:?}"
        );
        assert!(bad.retryable());
        let malformed = WechatPayError::Malformed {
            endpoint: "POST /v3/offlineface/authinfo",
            status: 200,
            request_id: Some("R3".into()),
            reason: "authinfo is empty".into(),
        }
        .failure();
        assert_eq!(malformed.class, FailureClass::Malformed);
        assert_eq!(malformed.request_id.as_deref(), Some("R3"));
    }
}
