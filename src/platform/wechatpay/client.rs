//! The WeChat Pay APIv3 HTTP client the proxy calls.
//!
//! Owns: building each request (URL, signed `Authorization`, headers), reading the answer,
//! verifying a successful answer's signature before its body is parsed, parsing error bodies
//! (`{"code","message","detail"}`), and turning every outcome into a [`WechatPayError`] that
//! knows its [`Failure`]. It must not retry, cache or pace calls (the proxy does, from the
//! failure class and the limits in [`super`]), and must not log keys, signatures, raw_data or
//! authinfo values; it logs each answer's `Request-ID`.

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
        /// The error body's `detail`, as sent.
        detail: Option<serde_json::Value>,
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
fn error_answer(
    endpoint: &'static str,
    status: u16,
    headers: &http::HeaderMap,
    body: &[u8],
) -> WechatPayError {
    let parsed: ErrorBody = serde_json::from_slice(body).unwrap_or_default();
    WechatPayError::Api {
        endpoint,
        status,
        code: parsed.code,
        message: parsed.message,
        detail: parsed.detail,
        request_id: request_id(headers),
        retry_after: crate::platform::retry_after(headers),
    }
}

/// A successful, verified answer.
struct Answer<T> {
    value: T,
    status: u16,
    request_id: Option<String>,
}

/// A 2xx answer as received, not yet verified.
pub(super) struct RawAnswer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: bytes::Bytes,
    pub request_id: Option<String>,
}

/// The device-list page as sent: every field optional.
#[derive(Deserialize)]
struct RawDevicePage {
    data: Option<Vec<Device>>,
    offset: Option<u64>,
    limit: Option<u64>,
    total_count: Option<u64>,
    links: Option<PageLinks>,
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
        const ENDPOINT: &str = "POST /v3/offlineface/authinfo";
        // Serialising a struct of `String` fields cannot fail: serde_json only fails on maps
        // with non-string keys or on a failing custom `Serialize`, and there are neither.
        let body = serde_json::to_vec(params).expect("AuthinfoParams serialises to JSON");
        let answer: Answer<Authinfo> = self
            .call(
                reqwest::Method::POST,
                "/v3/offlineface/authinfo",
                None,
                Some(body),
                ENDPOINT,
            )
            .await?;
        if answer.value.authinfo.is_empty() {
            return Err(WechatPayError::Malformed {
                endpoint: ENDPOINT,
                status: answer.status,
                request_id: answer.request_id,
                reason: "authinfo is empty".into(),
            });
        }
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
        const ENDPOINT: &str = "GET /v3/iotmanage/device-inspections/{device_sn}";
        let path = format!(
            "/v3/iotmanage/device-inspections/{}",
            utf8_percent_encode(device_sn, NON_ALPHANUMERIC)
        );
        let answer: Answer<DeviceInspection> = self
            .call(reqwest::Method::GET, &path, None, None, ENDPOINT)
            .await?;
        Ok(answer.value)
    }

    /// `GET /v3/iotmanage/devices?offset=..&limit=..`: one page of the merchant's devices.
    /// WeChat Pay allows `limit` up to [`super::MAX_PAGE_LIMIT`] and refuses more with
    /// PARAM_ERROR; pace calls to [`super::LIST_REQUESTS_PER_SECOND`].
    pub async fn list_devices(
        &self,
        offset: u64,
        limit: u64,
    ) -> Result<DevicePage, WechatPayError> {
        const ENDPOINT: &str = "GET /v3/iotmanage/devices";
        let query = format!("offset={offset}&limit={limit}");
        let answer: Answer<RawDevicePage> = self
            .call(
                reqwest::Method::GET,
                "/v3/iotmanage/devices",
                Some(&query),
                None,
                ENDPOINT,
            )
            .await?;
        let raw = answer.value;
        Ok(DevicePage {
            data: raw.data.unwrap_or_default(),
            offset: raw.offset.unwrap_or(offset),
            limit: raw.limit.unwrap_or(limit),
            total_count: raw.total_count,
            links: raw.links,
        })
    }

    /// Signs and sends one request, then reads, verifies and parses its answer.
    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        query: Option<&str>,
        body: Option<Vec<u8>>,
        endpoint: &'static str,
    ) -> Result<Answer<T>, WechatPayError> {
        let RawAnswer {
            status,
            headers,
            body,
            request_id,
        } = self.send(method, path, query, body, endpoint).await?;
        if let Err(source) = self.keys().verify(&headers, &body, unix_now()) {
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
        let value = serde_json::from_slice(&body).map_err(|e| {
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

    /// Signs and sends one request and reads its answer: a 2xx answer as received (not yet
    /// verified), any other as its [`WechatPayError::Api`].
    pub(super) async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        query: Option<&str>,
        body: Option<Vec<u8>>,
        endpoint: &'static str,
    ) -> Result<RawAnswer, WechatPayError> {
        let mut url = self.base_url.clone();
        url.set_path(&format!(
            "{}{path}",
            self.base_url.path().trim_end_matches('/')
        ));
        url.set_query(query);
        // Sign the target as the URL will send it, so that no normalisation can split the two.
        let target = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_owned(),
        };
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
            let error = error_answer(endpoint, status, &headers, &body);
            let failure = error.failure();
            tracing::warn!(
                endpoint,
                upstream_status = status,
                code = failure.code.as_deref(),
                request_id = failure.request_id.as_deref(),
                "wechat pay refused the request"
            );
            return Err(error);
        }
        Ok(RawAnswer {
            status,
            request_id: request_id(&headers),
            headers,
            body,
        })
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
