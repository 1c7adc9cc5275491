//! The daemon's client of the merchant's proxy: HTTPS with the proxy's CA pinned, every request
//! signed with the device key per the wire contract, answers checked before anyone sees them.
//!
//! Owns: transport, signing, learning the proxy's clock (the `Date` of every answer goes into the
//! shared [`PeerClock`]; requests are timestamped by it once known, and a 401 `TIMESTAMP_SKEW`
//! is retried once with the clock it carried), and the classification of failures into "retry
//! later" and "permanent". It must not touch the store or the schedule: the refresher decides
//! what a result means.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::crypto::CryptoError;
use crate::units::{PeerClock, WallClock};
use crate::wire::{self, AuthinfoRequest, AuthinfoResponse, ErrorBody, auth::DeviceSigner};

/// A boxed future, for the object-safe [`Upstream`] trait.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the daemon asks of its upstream. [`ProxyClient`] is the real one; tests of the
/// schedule use scripted ones.
pub trait Upstream: Send + Sync + 'static {
    fn fetch_authinfo<'a>(
        &'a self,
        raw_data: &'a str,
    ) -> BoxFuture<'a, Result<AuthinfoResponse, UpstreamError>>;

    /// `GET` one of the device health routes; the JSON answer as is.
    fn fetch_health<'a>(
        &'a self,
        route: &'static str,
    ) -> BoxFuture<'a, Result<serde_json::Value, UpstreamError>>;

    /// `POST /v1/report`: the terminal's health report for the merchant's fleet view.
    fn send_report<'a>(
        &'a self,
        report: &'a wire::Report,
    ) -> BoxFuture<'a, Result<wire::ReportReceipt, UpstreamError>>;
}

/// What to do about a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Try again after backing off (and after `after`, when the proxy said).
    Retry { after: Option<Duration> },
    /// Do not retry until something changes (new raw_data, config, next interval).
    Permanent,
}

/// Why a call to the proxy failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot reach the proxy at {url}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the proxy did not answer within {}", crate::units::format_duration(*timeout))]
    Timeout { timeout: Duration },
    #[error("the proxy answered {status} {}: {}", body.code, body.message)]
    Refused {
        status: u16,
        body: Box<ErrorBody>,
        retry_after: Option<Duration>,
    },
    #[error("the proxy's answer is malformed: {reason}")]
    Malformed { reason: String },
    #[error("the proxy answered an empty authinfo")]
    EmptyAuthinfo,
    #[error("cannot sign the request with the device key")]
    Sign(#[source] CryptoError),
}

impl UpstreamError {
    /// A short code for status and metrics.
    pub fn code(&self) -> String {
        match self {
            Self::Unreachable { .. } => "PROXY_UNREACHABLE".into(),
            Self::Timeout { .. } => "PROXY_TIMEOUT".into(),
            Self::Refused { body, .. } => body.code.clone(),
            Self::Malformed { .. } => "MALFORMED_ANSWER".into(),
            Self::EmptyAuthinfo => "EMPTY_AUTHINFO".into(),
            Self::Sign(e) if e.is_transient() => "TOKEN_UNAVAILABLE".into(),
            Self::Sign(_) => "SIGNING_FAILED".into(),
        }
    }

    /// Retry later, or stop until something changes. 429 and 5xx retry (honouring
    /// `Retry-After`); a 401 after the skew retry is permanent (unknown device, wrong key);
    /// other 4xx follow the proxy's `retryable` flag; transport trouble and malformed answers
    /// retry. A signature fails for good (a broken key) unless the key's PKCS#11 token is only
    /// away (unplugged): then it retries, and signing resumes when the token is back.
    pub fn disposition(&self) -> Disposition {
        match self {
            Self::Refused {
                status,
                body,
                retry_after,
            } => {
                let after = retry_after.or(body.retry_after_seconds.map(Duration::from_secs));
                if *status == 429 || *status >= 500 || (body.retryable && *status != 401) {
                    Disposition::Retry { after }
                } else if *status == 401 && body.code == wire::codes::TIMESTAMP_SKEW {
                    // Still skewed right after learning the offset: the clock is moving;
                    // the next attempt learns again.
                    Disposition::Retry { after }
                } else {
                    Disposition::Permanent
                }
            }
            Self::Sign(e) if e.is_transient() => Disposition::Retry { after: None },
            Self::Sign(_) => Disposition::Permanent,
            _ => Disposition::Retry { after: None },
        }
    }

    /// Whether the proxy answered at all.
    pub fn reached_proxy(&self) -> bool {
        matches!(
            self,
            Self::Refused { .. } | Self::Malformed { .. } | Self::EmptyAuthinfo
        )
    }
}

/// How long an idle connection to the proxy is kept for reuse: below the proxy's keep-alive
/// idle timeout (15 s, `tls::HEADER_READ_TIMEOUT`), so that the daemon never sends on a
/// connection the proxy is closing.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// The HTTP client of the proxy over `tls`.
fn http_client(
    tls: &rustls::ClientConfig,
    timeout: Duration,
) -> Result<reqwest::Client, crate::tls::TlsError> {
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls.clone())
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        // A pooled connection must be dropped well before the proxy closes it as idle
        // (it closes keep-alive connections after 15 s without a request): reusing one
        // at the moment the proxy closes it loses the request ("connection closed before
        // message completed"). Seen under emulation, where calls come 10-20 s apart.
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .https_only(true)
        .user_agent(concat!("authinfod/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| crate::tls::TlsError::BadCertificate {
            what: "http client".into(),
            reason: e.to_string(),
        })
}

/// The real upstream: the merchant's proxy over pinned HTTPS.
#[derive(Debug)]
pub struct ProxyClient {
    base_url: String,
    /// Replaced whole when the proxy's CA is reloaded; requests in flight keep the old one.
    http: std::sync::RwLock<reqwest::Client>,
    signer: DeviceSigner,
    timeout: Duration,
    /// The wall clock request timestamps are read from until the proxy's is known.
    clock: Arc<WallClock>,
    /// The proxy's clock, learned from the `Date` of its answers.
    proxy_clock: Arc<PeerClock>,
}

impl ProxyClient {
    /// A client of `base_url` (`https://host:port`) over `tls` (pinned to the proxy's CA).
    pub fn new(
        base_url: &str,
        tls: &rustls::ClientConfig,
        signer: DeviceSigner,
        timeout: Duration,
    ) -> Result<Self, crate::tls::TlsError> {
        Ok(Self {
            base_url: base_url.trim_end_matches('/').to_owned(),
            http: std::sync::RwLock::new(http_client(tls, timeout)?),
            signer,
            timeout,
            clock: Arc::default(),
            proxy_clock: Arc::default(),
        })
    }

    /// Trusts `tls` (a reloaded CA) for the requests that start from now on.
    pub fn set_tls(&self, tls: &rustls::ClientConfig) -> Result<(), crate::tls::TlsError> {
        let http = http_client(tls, self.timeout)?;
        *crate::sync::write(&self.http) = http;
        Ok(())
    }

    /// Reads the local time from `clock` (the daemon's) instead of the system's, and records
    /// what it learns of the proxy's clock in `proxy_clock` (shared with the daemon's state).
    pub fn with_clocks(mut self, clock: Arc<WallClock>, proxy_clock: Arc<PeerClock>) -> Self {
        self.clock = clock;
        self.proxy_clock = proxy_clock;
        self
    }

    /// `POST path` with `body` as JSON; the answer's bytes.
    async fn post_json(
        &self,
        path: &str,
        body: &impl serde::Serialize,
    ) -> Result<Vec<u8>, UpstreamError> {
        let body = serde_json::to_vec(body).map_err(|e| UpstreamError::Malformed {
            reason: e.to_string(),
        })?;
        self.call(reqwest::Method::POST, path, body).await
    }

    /// Sends a signed request; on a 401 `TIMESTAMP_SKEW` with a `Date`, learns the offset and
    /// sends once more.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<Vec<u8>, UpstreamError> {
        match self.send(&method, path, &body).await {
            Err(SendError::Skewed { proxy_date, .. }) => {
                tracing::warn!(
                    message_id = crate::events::CLOCK_SKEW_LEARNED,
                    clock_skew_seconds = proxy_date.saturating_sub(self.clock.now()),
                    "proxy refused our timestamp; learned its clock and retrying once"
                );
                self.send(&method, path, &body).await
            }
            other => other,
        }
        .map_err(SendError::into_error)
    }

    async fn send(
        &self,
        method: &reqwest::Method,
        path: &str,
        body: &[u8],
    ) -> Result<Vec<u8>, SendError> {
        let timestamp = self.proxy_clock.now().unwrap_or_else(|| self.clock.now());
        let authorization = self
            .signer
            .authorize(method.as_str(), path, timestamp, body)
            .map_err(|e| SendError::Other(UpstreamError::Sign(e)))?;
        let http = crate::sync::read(&self.http).clone();
        let mut request = http
            .request(method.clone(), format!("{}{path}", self.base_url))
            .header(reqwest::header::AUTHORIZATION, authorization)
            .header(reqwest::header::ACCEPT, "application/json");
        if !body.is_empty() {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_vec());
        }
        let response = request
            .send()
            .await
            .map_err(|e| SendError::Other(self.transport(e)))?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let proxy_date = headers
            .get(reqwest::header::DATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .and_then(|d| i64::try_from(d.as_secs()).ok());
        if let Some(date) = proxy_date {
            self.proxy_clock.observe(date);
        }
        let bytes = read_limited(response, wire::MAX_RESPONSE_BODY)
            .await
            .map_err(|e| SendError::Other(self.transport(e)))?
            .ok_or_else(|| {
                SendError::Other(UpstreamError::Malformed {
                    reason: format!("answer larger than {} bytes", wire::MAX_RESPONSE_BODY),
                })
            })?;
        if (200..300).contains(&status) {
            return Ok(bytes);
        }
        Err(match read_refusal(status, &headers, &bytes) {
            (error, Some(proxy_date)) => SendError::Skewed { proxy_date, error },
            (error, None) => SendError::Other(error),
        })
    }

    fn transport(&self, e: reqwest::Error) -> UpstreamError {
        if e.is_timeout() {
            UpstreamError::Timeout {
                timeout: self.timeout,
            }
        } else {
            UpstreamError::Unreachable {
                url: self.base_url.clone(),
                source: e,
            }
        }
    }
}

enum SendError {
    /// A 401 `TIMESTAMP_SKEW` that carried the proxy's `Date` (Unix seconds).
    Skewed {
        proxy_date: i64,
        error: UpstreamError,
    },
    Other(UpstreamError),
}

impl SendError {
    fn into_error(self) -> UpstreamError {
        match self {
            Self::Skewed { error, .. } | Self::Other(error) => error,
        }
    }
}

/// Reads a response body up to `limit` bytes; `None` when it is larger.
async fn read_limited(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Option<Vec<u8>>, reqwest::Error> {
    let mut out = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if out.len() + chunk.len() > limit {
            return Ok(None);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(Some(out))
}

/// What a non-2xx answer of the proxy says: its error (the body read as an [`ErrorBody`] when it
/// is one, else one made of the status and the body's first 200 bytes; a body with a blank code
/// is named `HTTP_<status>` too, so status never shows an empty code) and, for a 401
/// `TIMESTAMP_SKEW` that carries a `Date`, the proxy's clock in Unix seconds.
pub fn read_refusal(
    status: u16,
    headers: &http::HeaderMap,
    bytes: &[u8],
) -> (UpstreamError, Option<i64>) {
    let mut body: ErrorBody = crate::json::from_slice(bytes).unwrap_or_else(|_| ErrorBody {
        code: String::new(),
        message: String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned(),
        retryable: status == 429 || status >= 500,
        retry_after_seconds: None,
        upstream: None,
    });
    if body.code.trim().is_empty() {
        body.code = format!("HTTP_{status}");
    }
    let retry_after = headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let proxy_date = (status == 401 && body.code == wire::codes::TIMESTAMP_SKEW)
        .then(|| {
            headers
                .get(http::header::DATE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| httpdate::parse_http_date(v).ok())
        })
        .flatten()
        .map(|date| {
            date.duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64)
        });
    let error = UpstreamError::Refused {
        status,
        body: Box::new(body),
        retry_after,
    };
    (error, proxy_date)
}

/// Reads a 2xx answer of `POST /v1/authinfo`: well-formed, with an authinfo that is not empty.
pub fn read_authinfo(bytes: &[u8]) -> Result<AuthinfoResponse, UpstreamError> {
    let answer: AuthinfoResponse = parse(bytes)?;
    if answer.authinfo.trim().is_empty() {
        return Err(UpstreamError::EmptyAuthinfo);
    }
    Ok(answer)
}

fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, UpstreamError> {
    crate::json::from_slice(bytes).map_err(|e| UpstreamError::Malformed {
        reason: e.to_string(),
    })
}

impl Upstream for ProxyClient {
    fn fetch_authinfo<'a>(
        &'a self,
        raw_data: &'a str,
    ) -> BoxFuture<'a, Result<AuthinfoResponse, UpstreamError>> {
        Box::pin(async move {
            let request = AuthinfoRequest {
                raw_data: raw_data.to_owned(),
            };
            let bytes = self.post_json(wire::ROUTE_AUTHINFO, &request).await?;
            read_authinfo(&bytes)
        })
    }

    fn fetch_health<'a>(
        &'a self,
        route: &'static str,
    ) -> BoxFuture<'a, Result<serde_json::Value, UpstreamError>> {
        Box::pin(async move {
            let bytes = self.call(reqwest::Method::GET, route, Vec::new()).await?;
            parse(&bytes)
        })
    }

    fn send_report<'a>(
        &'a self,
        report: &'a wire::Report,
    ) -> BoxFuture<'a, Result<wire::ReportReceipt, UpstreamError>> {
        Box::pin(async move {
            let bytes = self.post_json(wire::ROUTE_REPORT, report).await?;
            parse(&bytes)
        })
    }
}

/// A scripted [`Upstream`] for the loops' unit tests (refresh, health checks, reports) on
/// tokio's paused clock: every call is recorded with the time it came and answered as told; a
/// call it has no answer for never answers, as a proxy that hangs.
#[cfg(test)]
pub(crate) mod fake {
    use super::*;
    use crate::terminal::state::lock;
    use std::collections::VecDeque;
    use std::sync::Mutex;
    use tokio::time::Instant;

    /// One answer to `fetch_authinfo`.
    pub(crate) enum Step {
        /// This authinfo, with no `expires_in`.
        Ok(&'static str),
        /// This HTTP status (retryable when 5xx or 429) and `Retry-After` seconds.
        Fail(u16, Option<u64>),
    }

    #[derive(Default)]
    pub(crate) struct FakeUpstream {
        /// Answers to `fetch_authinfo`, in order; once they are spent, calls never answer.
        pub steps: Mutex<VecDeque<Step>>,
        /// The answer to every `fetch_health`; `None`: they never answer.
        pub health: Option<serde_json::Value>,
        /// `send_report` answers 502 instead of a receipt.
        pub fail_reports: bool,
        /// When each `fetch_authinfo` and `fetch_health` came.
        pub calls: Mutex<Vec<Instant>>,
        /// Each report sent, with when it came.
        pub reports: Mutex<Vec<(Instant, wire::Report)>>,
    }

    impl FakeUpstream {
        /// Answers `fetch_authinfo` with `steps`, in order.
        pub(crate) fn authinfo(steps: impl IntoIterator<Item = Step>) -> Arc<Self> {
            Arc::new(Self {
                steps: Mutex::new(steps.into_iter().collect()),
                ..Self::default()
            })
        }

        /// Answers every `fetch_health` with `answer`.
        pub(crate) fn health(answer: serde_json::Value) -> Arc<Self> {
            Arc::new(Self {
                health: Some(answer),
                ..Self::default()
            })
        }

        /// Takes reports, answering each with a receipt, or with 502 when `fail`.
        pub(crate) fn reports(fail: bool) -> Arc<Self> {
            Arc::new(Self {
                fail_reports: fail,
                ..Self::default()
            })
        }
    }

    /// A loop (refresh, health checks, reports) running in a task until [`stop`](Self::stop).
    pub(crate) struct Running {
        shutdown: tokio_util::sync::CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    impl Running {
        /// Spawns `run(shutdown)`.
        pub(crate) fn start<F>(run: impl FnOnce(tokio_util::sync::CancellationToken) -> F) -> Self
        where
            F: Future<Output = ()> + Send + 'static,
        {
            let shutdown = tokio_util::sync::CancellationToken::new();
            let task = tokio::spawn(run(shutdown.clone()));
            Self { shutdown, task }
        }

        /// Cancels the loop and waits for it to end.
        pub(crate) async fn stop(self) {
            self.shutdown.cancel();
            self.task.await.expect("the loop ends on shutdown");
        }
    }

    fn refused(
        status: u16,
        code: String,
        message: &str,
        retry_after: Option<u64>,
    ) -> UpstreamError {
        UpstreamError::Refused {
            status,
            body: Box::new(ErrorBody {
                code,
                message: message.into(),
                retryable: status >= 500 || status == 429,
                retry_after_seconds: None,
                upstream: None,
            }),
            retry_after: retry_after.map(Duration::from_secs),
        }
    }

    impl Upstream for FakeUpstream {
        fn fetch_authinfo<'a>(
            &'a self,
            _raw_data: &'a str,
        ) -> BoxFuture<'a, Result<AuthinfoResponse, UpstreamError>> {
            Box::pin(async move {
                lock(&self.calls).push(Instant::now());
                let step = lock(&self.steps).pop_front();
                match step {
                    Some(Step::Ok(a)) => Ok(AuthinfoResponse {
                        authinfo: a.into(),
                        expires_in: None,
                    }),
                    Some(Step::Fail(status, retry_after)) => Err(refused(
                        status,
                        format!("HTTP_{status}"),
                        "scripted",
                        retry_after,
                    )),
                    None => std::future::pending().await,
                }
            })
        }

        fn fetch_health<'a>(
            &'a self,
            _route: &'static str,
        ) -> BoxFuture<'a, Result<serde_json::Value, UpstreamError>> {
            Box::pin(async move {
                lock(&self.calls).push(Instant::now());
                match &self.health {
                    Some(answer) => Ok(answer.clone()),
                    None => std::future::pending().await,
                }
            })
        }

        fn send_report<'a>(
            &'a self,
            report: &'a wire::Report,
        ) -> BoxFuture<'a, Result<wire::ReportReceipt, UpstreamError>> {
            Box::pin(async move {
                lock(&self.reports).push((Instant::now(), report.clone()));
                if self.fail_reports {
                    Err(refused(502, "UPSTREAM_UNAVAILABLE".into(), "down", None))
                } else {
                    Ok(wire::ReportReceipt {
                        received_at: "2026-01-01T00:00:00Z".into(),
                    })
                }
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(status: u16, code: &str, retryable: bool) -> UpstreamError {
        UpstreamError::Refused {
            status,
            body: Box::new(ErrorBody {
                code: code.into(),
                message: "m".into(),
                retryable,
                retry_after_seconds: None,
                upstream: None,
            }),
            retry_after: None,
        }
    }

    /// Found by the `proxy_request` fuzz target: an error body with `"code":""` left status and
    /// the journal with an empty error code.
    #[test]
    fn a_refusal_without_a_code_is_named_by_its_status() {
        let body = br#"{"code":"","message":"the req-es from t s)","retryable":true}"#;
        let (error, date) = read_refusal(401, &http::HeaderMap::new(), body);
        assert_eq!(error.code(), "HTTP_401");
        assert_eq!(date, None);
        let (error, _) = read_refusal(503, &http::HeaderMap::new(), b"<html>busy</html>");
        assert_eq!(error.code(), "HTTP_503");
        assert!(matches!(error.disposition(), Disposition::Retry { .. }));
        let (error, _) = read_refusal(
            422,
            &http::HeaderMap::new(),
            br#"{"code":"UPSTREAM_REJECTED","message":"m"}"#,
        );
        assert_eq!(error.code(), "UPSTREAM_REJECTED");
    }

    #[test]
    fn dispositions_follow_the_contract() {
        use Disposition::*;
        assert_eq!(
            refused(500, "X", false).disposition(),
            Retry { after: None }
        );
        assert_eq!(
            refused(502, "UPSTREAM_UNAVAILABLE", true).disposition(),
            Retry { after: None }
        );
        assert_eq!(refused(400, "BAD_REQUEST", false).disposition(), Permanent);
        assert_eq!(
            refused(403, "DEVICE_INACTIVATED", false).disposition(),
            Permanent
        );
        assert_eq!(
            refused(422, "UPSTREAM_REJECTED", false).disposition(),
            Permanent
        );
        assert_eq!(
            refused(401, "BAD_SIGNATURE", false).disposition(),
            Permanent
        );
        assert_eq!(
            refused(401, "TIMESTAMP_SKEW", false).disposition(),
            Retry { after: None }
        );
        let limited = UpstreamError::Refused {
            status: 429,
            body: Box::new(ErrorBody {
                code: "UPSTREAM_RATE_LIMITED".into(),
                message: "m".into(),
                retryable: true,
                retry_after_seconds: Some(7),
                upstream: None,
            }),
            retry_after: Some(Duration::from_secs(30)),
        };
        assert_eq!(
            limited.disposition(),
            Retry {
                after: Some(Duration::from_secs(30))
            },
            "the header wins over the body"
        );
        assert_eq!(
            UpstreamError::EmptyAuthinfo.disposition(),
            Retry { after: None }
        );
        assert!(
            !UpstreamError::Timeout {
                timeout: Duration::from_secs(1)
            }
            .reached_proxy()
        );
    }
}
