//! Clients of the three platforms the proxy calls on the merchant's behalf.
//!
//! - [`wechatpay`]: WeChat Pay APIv3 (SHA256withRSA request signing, response verification).
//! - [`alipay`]: Alipay OpenAPI gateway (RSA2 sign content, response verification).
//! - [`aliyun`]: Alibaba Cloud RPC API (ACS3-HMAC-SHA256, or the v1 HMAC-SHA1 signature).
//!
//! Owns: each platform's signing rules, request and response formats and error shapes. It
//! must not know about terminals, devices' registry entries or the wire contract: the proxy
//! maps a [`Failure`] to its own error body. Every private-key operation goes through
//! [`crate::crypto::RsaSigner`] (ring).

pub mod alipay;
pub mod aliyun;
pub mod wechatpay;

use std::time::Duration;

/// What the proxy needs to know of any platform failure, whatever the platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub class: FailureClass,
    /// HTTP status the platform answered with; 0 when it never answered.
    pub status: u16,
    /// The platform's error code (`SYSTEM_ERROR`, `isv.invalid-signature`, ...).
    pub code: Option<String>,
    pub message: Option<String>,
    /// The platform's request id (`Request-ID`, `RequestId`, `trace_id`), for support tickets.
    pub request_id: Option<String>,
    /// `Retry-After` when the platform sent one.
    pub retry_after: Option<Duration>,
}

/// The kinds of platform failure, by what the caller should do about them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// Never got an answer: connection, TLS or timeout. Retry later.
    Transport,
    /// 429 or the platform's frequency-limit code. Retry after backing off.
    RateLimited,
    /// 5xx or the platform's system-busy code. Retry with the same parameters.
    ServerError,
    /// The platform refused the request as such (bad parameter, no permission, unknown
    /// device, our own signature refused). Retrying the same request will not help.
    Rejected,
    /// The answer's signature is missing, does not verify, or is outside the time window.
    BadSignature,
    /// The answer is not of the documented shape.
    Malformed,
}

impl Failure {
    /// True when the same request may succeed later.
    pub fn retryable(&self) -> bool {
        !matches!(self.class, FailureClass::Rejected)
    }

    /// A failure with only a class and a message (no platform answer).
    pub fn local(class: FailureClass, message: impl Into<String>) -> Self {
        Self {
            class,
            status: 0,
            code: None,
            message: Some(message.into()),
            request_id: None,
            retry_after: None,
        }
    }
}

/// Default timeout of one platform call, connection included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// An HTTP client for platform calls: the given TLS config (ring), a total timeout, no
/// redirects (a signed request must not be replayed elsewhere), no proxy from the environment.
pub fn http_client(
    tls: rustls::ClientConfig,
    timeout: Duration,
) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .user_agent(concat!("authinfo-proxy/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Parses a `Retry-After` header given in seconds (the HTTP-date form is rare on these APIs and
/// is read as absent).
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}
