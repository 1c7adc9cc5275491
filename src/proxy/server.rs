//! The terminal-facing routes and the admin routes.
//!
//! Owns: the route table (axum routes each path to its one method; any other method is a JSON
//! 405 with `Allow`, any other path a JSON 404), the checks every terminal route makes before it
//! forwards, in order body → authenticate → fleet → the device's bucket ([`Authenticated`]),
//! the merchant's ceiling right before each platform call ([`upstream`]), what each route sends to
//! its platform (filled from the signing device's registry entry, never from the request: a
//! device can only ask about itself), each request's span, counters and log line (`observe`),
//! and the one table from error to status, code and retryability ([`RequestError`]). It must not
//! sign or verify platform calls itself; the platform clients do.

use std::sync::Arc;

use axum::Json;
use axum::extract::{FromRequest, MatchedPath, Request, State};
use axum::handler::Handler;
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter, get, on};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tracing::Instrument as _;

use super::auth::{AuthError, NonceError, Nonces, verify};
use super::config::AdminToken;
use super::fleet::{Fleet, FleetStatus, SyncRefusal, SyncRefusalCode};
use super::limits::{Limited, LimitedRoute, Limits, Platform};
use super::metrics::ProxyMetrics;
use super::registry::{Device, SharedRegistry};
use super::terminals::doc::{TerminalDoc, TerminalsPage, TerminalsQuery};
use super::terminals::{FleetHealth, FleetView, ReportLimiter};
use crate::platform::alipay::AlipayClient;
use crate::platform::aliyun::{self, AliyunClient};
use crate::platform::wechatpay::{AuthinfoParams, WechatPayClient};
use crate::platform::{Failure, FailureClass};
use crate::units::unix_now;
use crate::wire::{self, ErrorBody, UpstreamDetail, codes};

/// Everything the routes use.
#[derive(Debug)]
pub struct App {
    pub registry: SharedRegistry,
    pub nonces: Nonces,
    /// The replicas' Redis (`[cluster]`), for `/healthz` and `/metrics`.
    pub cluster: Option<Arc<super::cluster::Cluster>>,
    pub fleet: Arc<Fleet>,
    pub fleet_enabled: bool,
    pub wechat: Arc<WechatPayClient>,
    pub sp_appid: String,
    pub alipay: Option<AlipayClient>,
    pub aliyun: Option<AliyunClient>,
    pub metrics: ProxyMetrics,
    /// Per-device buckets and per-merchant ceilings.
    pub limits: Limits,
    pub started: Instant,
    /// The fleet view: what each enrolled terminal reported, when it was seen and issued.
    pub health: Arc<FleetHealth>,
    /// Each terminal's report rate.
    pub reports: ReportLimiter,
    /// Required on every admin call when set.
    pub admin_token: Option<AdminToken>,
}

impl App {
    /// Every enrolled terminal judged now, with the fleet list when the fleet check is on (a
    /// large fleet's latest view, [`FleetHealth::view`]).
    pub async fn fleet_view(&self) -> Result<Arc<FleetView>, super::store::StoreError> {
        let registry = self.registry.current();
        let fleet = self.fleet_enabled.then(|| self.fleet.snapshot());
        self.health.view(&registry, fleet.as_ref()).await
    }
}

// === errors ===

/// Every error the proxy answers a terminal request with: the one table.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("WeChat Pay does not list device_sn {0} for this merchant")]
    NotInFleet(String),
    #[error("WeChat Pay lists device_sn {0} as not activated")]
    Inactivated(String),
    #[error("{0}")]
    NotConfigured(&'static str),
    #[error("no route {0}")]
    NotFound(String),
    /// `route` takes `allowed` alone.
    #[error("{method} is not allowed on {route}")]
    MethodNotAllowed {
        method: Method,
        route: String,
        allowed: Method,
    },
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("the body is larger than {0} bytes")]
    BodyTooLarge(usize),
    #[error("more reports than this proxy admits ([terminals] report_burst, report_refill)")]
    ReportRateLimited { retry_after: std::time::Duration },
    #[error("the fleet view's store failed: {0}")]
    Store(String),
    /// The replicas' Redis did not answer, so the request could not be checked (its nonce, its
    /// limits): refused, retryable.
    #[error("the proxy cannot check the request now ({0}); retry later")]
    ClusterUnavailable(String),
    /// A limit refused `device_id`'s request before anything was forwarded.
    #[error("{limited}; retry in {} s", whole_seconds(limited.retry_after()))]
    Limited { device_id: String, limited: Limited },
    #[error("{platform}: {}", failure.message.as_deref().unwrap_or("failed"))]
    Upstream {
        platform: &'static str,
        failure: Failure,
    },
}

impl RequestError {
    /// Status, code and retryability.
    pub fn classify(&self) -> (StatusCode, &'static str, bool) {
        use StatusCode as S;
        match self {
            Self::Auth(AuthError::Header(_)) => (S::UNAUTHORIZED, codes::BAD_AUTHORIZATION, false),
            Self::Auth(AuthError::UnknownDevice(_)) => {
                (S::UNAUTHORIZED, codes::UNKNOWN_DEVICE, false)
            }
            Self::Auth(AuthError::BadSignature(_)) => {
                (S::UNAUTHORIZED, codes::BAD_SIGNATURE, false)
            }
            Self::Auth(AuthError::Skewed { .. }) => (S::UNAUTHORIZED, codes::TIMESTAMP_SKEW, true),
            Self::Auth(AuthError::Replayed) => (S::UNAUTHORIZED, codes::REPLAYED_NONCE, false),
            Self::NotInFleet(_) => (S::FORBIDDEN, codes::DEVICE_NOT_IN_FLEET, false),
            Self::Inactivated(_) => (S::FORBIDDEN, codes::DEVICE_INACTIVATED, false),
            Self::NotConfigured(_) => (S::NOT_FOUND, codes::NOT_CONFIGURED, false),
            Self::NotFound(_) => (S::NOT_FOUND, codes::NOT_FOUND, false),
            Self::MethodNotAllowed { .. } => {
                (S::METHOD_NOT_ALLOWED, codes::METHOD_NOT_ALLOWED, false)
            }
            Self::BadRequest(_) => (S::BAD_REQUEST, codes::BAD_REQUEST, false),
            Self::BodyTooLarge(_) => (S::PAYLOAD_TOO_LARGE, codes::BODY_TOO_LARGE, false),
            Self::ReportRateLimited { .. } => {
                (S::TOO_MANY_REQUESTS, codes::REPORT_RATE_LIMITED, true)
            }
            Self::Store(_) => (S::SERVICE_UNAVAILABLE, codes::STORE_UNAVAILABLE, true),
            Self::ClusterUnavailable(_) => {
                (S::SERVICE_UNAVAILABLE, codes::CLUSTER_UNAVAILABLE, true)
            }
            Self::Limited {
                limited: Limited::Device { .. },
                ..
            } => (S::TOO_MANY_REQUESTS, codes::DEVICE_RATE_LIMITED, true),
            Self::Limited {
                limited: Limited::Merchant { .. },
                ..
            } => (S::TOO_MANY_REQUESTS, codes::MERCHANT_RATE_LIMITED, true),
            Self::Upstream { failure, .. } => match failure.class {
                FailureClass::Transport | FailureClass::ServerError => {
                    (S::BAD_GATEWAY, codes::UPSTREAM_UNAVAILABLE, true)
                }
                FailureClass::RateLimited => {
                    (S::TOO_MANY_REQUESTS, codes::UPSTREAM_RATE_LIMITED, true)
                }
                FailureClass::Rejected => {
                    (S::UNPROCESSABLE_ENTITY, codes::UPSTREAM_REJECTED, false)
                }
                FailureClass::BadSignature => (S::BAD_GATEWAY, codes::UPSTREAM_BAD_SIGNATURE, true),
                FailureClass::Malformed => (S::BAD_GATEWAY, codes::UPSTREAM_MALFORMED, true),
            },
        }
    }

    /// The error body.
    pub fn body(&self) -> ErrorBody {
        let (_, code, retryable) = self.classify();
        let (retry_after_seconds, upstream) = match self {
            Self::Upstream { failure, .. } => (
                failure.retry_after.map(|d| d.as_secs().max(1)),
                Some(UpstreamDetail {
                    status: failure.status,
                    code: failure.code.clone(),
                    message: failure.message.clone(),
                    request_id: failure.request_id.clone(),
                }),
            ),
            Self::ReportRateLimited { retry_after } => (Some(retry_after.as_secs().max(1)), None),
            Self::Limited { limited, .. } => (Some(whole_seconds(limited.retry_after())), None),
            // Spread over 15-45 s, so a fleet refused together does not come back together.
            Self::ClusterUnavailable(_) => (
                Some(CLUSTER_RETRY_MIN + (crate::crypto::random_unit() * 30.0) as u64),
                None,
            ),
            _ => (None, None),
        };
        ErrorBody {
            code: code.to_owned(),
            message: self.to_string(),
            retryable,
            retry_after_seconds,
            upstream,
        }
    }
}

impl IntoResponse for RequestError {
    /// The error body with its status (and `Retry-After`, `Allow` where they apply). The error
    /// itself rides along in the response's extensions for `observe` to count and log.
    fn into_response(self) -> Response {
        let (status, _, _) = self.classify();
        let body = self.body();
        let mut response = (status, Json(&body)).into_response();
        if let Some(secs) = body.retry_after_seconds
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        if let Self::MethodNotAllowed { allowed, .. } = &self
            && let Ok(v) = HeaderValue::from_str(allowed.as_str())
        {
            response.headers_mut().insert(header::ALLOW, v);
        }
        response.extensions_mut().insert(Arc::new(self));
        response
    }
}

/// The shortest `Retry-After` of a `CLUSTER_UNAVAILABLE` refusal (seconds; up to 30 more).
const CLUSTER_RETRY_MIN: u64 = 15;

/// `d` in whole seconds, rounded up and at least 1: what a client is told to wait.
fn whole_seconds(d: std::time::Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

// === the checks every terminal route makes ===

/// A terminal request signed by an enrolled device: its body read once (at most
/// [`wire::MAX_REQUEST_BODY`]) and its signature verified ([`authenticate`], which records the
/// nonce). The fleet view notes the device as seen; it also records `device_id` on the
/// request's span. Only the report route takes it alone: it forwards nothing to a platform, and
/// the merchant wants the health of a terminal WeChat Pay refuses too.
#[derive(Debug)]
pub struct Signed {
    /// The device that signed the request: the only device the route may ask about.
    pub device: Arc<Device>,
    /// The body, exactly as signed.
    pub body: Bytes,
    /// The route's per-device limit, when it has one.
    route: Option<LimitedRoute>,
}

impl FromRequest<Arc<App>> for Signed {
    type Rejection = RequestError;

    async fn from_request(request: Request, app: &Arc<App>) -> Result<Self, RequestError> {
        let (parts, body) = request.into_parts();
        let body = axum::body::to_bytes(body, wire::MAX_REQUEST_BODY)
            .await
            .map_err(|e| {
                let e = e.into_inner();
                if e.is::<http_body_util::LengthLimitError>() {
                    RequestError::BodyTooLarge(wire::MAX_REQUEST_BODY)
                } else {
                    RequestError::BadRequest(e.to_string())
                }
            })?;
        let path_and_query = parts
            .uri
            .path_and_query()
            .map_or(parts.uri.path(), |p| p.as_str());
        let authorization = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let now = unix_now();
        let (device, header) = verify(
            &app.registry.current(),
            authorization,
            parts.method.as_str(),
            path_and_query,
            &body,
            now,
        )?;
        app.nonces.record(&header, now).await.map_err(|e| match e {
            NonceError::Replayed => RequestError::Auth(AuthError::Replayed),
            e @ (NonceError::Unavailable(_) | NonceError::BeforeEpoch { .. }) => {
                RequestError::ClusterUnavailable(e.to_string())
            }
        })?;
        tracing::Span::current().record("device_id", device.device_id.as_str());
        app.health.seen(&device.device_id).await;
        let route = parts
            .extensions
            .get::<MatchedPath>()
            .and_then(|m| LimitedRoute::of_path(m.as_str()));
        Ok(Self {
            device,
            body,
            route,
        })
    }
}

/// A terminal request that passed the checks every platform route makes, in this order: those
/// of [`Signed`] (body, signature, nonce), WeChat Pay's fleet list, and the device's bucket for
/// the route ([`Limits::admit_device`]; only a request the device really signed spends its
/// budget, so nobody can spend another device's).
#[derive(Debug)]
pub struct Authenticated {
    /// The device that signed the request: the only device the route may ask about.
    pub device: Arc<Device>,
    /// The body, exactly as signed.
    pub body: Bytes,
}

impl FromRequest<Arc<App>> for Authenticated {
    type Rejection = RequestError;

    async fn from_request(request: Request, app: &Arc<App>) -> Result<Self, RequestError> {
        let Signed {
            device,
            body,
            route,
        } = Signed::from_request(request, app).await?;
        check_fleet(app, &device)?;
        if let Some(route) = route {
            app.limits
                .admit_device(&device.device_id, route)
                .await
                .map_err(|limited| RequestError::Limited {
                    device_id: device.device_id.clone(),
                    limited,
                })?;
        }
        Ok(Self { device, body })
    }
}

/// Refuses a device WeChat Pay lists as not activated, or does not list, when the fleet check is
/// enabled. Until a first list is synced every enrolled device passes (the check fails open).
fn check_fleet(app: &App, device: &Device) -> Result<(), RequestError> {
    if !app.fleet_enabled {
        return Ok(());
    }
    match app.fleet.status(&device.device_sn) {
        FleetStatus::Activated => Ok(()),
        FleetStatus::Inactivated => Err(RequestError::Inactivated(device.device_sn.clone())),
        FleetStatus::Unlisted => Err(RequestError::NotInFleet(device.device_sn.clone())),
        FleetStatus::Unknown => {
            tracing::debug!("no fleet list yet; not checking the device against it");
            Ok(())
        }
    }
}

// === the terminal routes ===

/// The routes terminals call.
pub fn terminal_router(app: Arc<App>) -> axum::Router {
    axum::Router::new()
        .route(wire::ROUTE_AUTHINFO, only(Method::POST, authinfo))
        .route(wire::ROUTE_INSPECTION, only(Method::GET, inspection))
        .route(
            wire::ROUTE_ALIPAY_BINDING,
            only(Method::GET, alipay_binding),
        )
        .route(wire::ROUTE_LICENCE, only(Method::GET, licence))
        .route(wire::ROUTE_REPORT, only(Method::POST, report))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(app.clone(), observe))
        .with_state(app)
}

/// `handler` for `method` alone; any other method gets the JSON 405 with `Allow: <method>`.
/// That includes HEAD, which axum's `get` would answer with the GET handler (so a HEAD would
/// reach a platform and spend the device's nonce for an answer without a body) and list in
/// `Allow`: the contract's routes take one method each.
fn only<H, T>(method: Method, handler: H) -> MethodRouter<Arc<App>>
where
    H: Handler<T, Arc<App>>,
    T: 'static,
{
    let allowed = method.clone();
    let refuse = move |method: Method, uri: Uri| async move {
        RequestError::MethodNotAllowed {
            method,
            route: uri.path().to_owned(),
            allowed,
        }
    };
    // `only` is given the contract's methods, GET and POST, and both are method filters.
    let filter = MethodFilter::try_from(method.clone()).expect("GET and POST are method filters");
    let router = on(filter, handler).fallback(refuse.clone());
    if method == Method::GET {
        router.head(refuse)
    } else {
        router
    }
}

async fn not_found(uri: Uri) -> RequestError {
    RequestError::NotFound(uri.path().chars().take(100).collect())
}

/// Around every terminal request, routed or not: its span (`route`, and `device_id` once
/// [`Authenticated`] records it), the request and authentication-failure counters, and one log
/// line with the outcome.
async fn observe(
    State(app): State<Arc<App>>,
    matched: Option<MatchedPath>,
    request: Request,
    next: Next,
) -> Response {
    // A route of the table or `other`: the metric label stays bounded whatever the path.
    let route = matched.as_ref().map_or("other", MatchedPath::as_str);
    // At WARN, the level of the refusal line: a filter that keeps refusals keeps their span.
    let span = tracing::warn_span!("request", route, device_id = tracing::field::Empty);
    let started = Instant::now();
    let mut response = next.run(request).instrument(span.clone()).await;
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let error = response.extensions_mut().remove::<Arc<RequestError>>();
    span.in_scope(|| count_and_log(&app, route, error.as_deref(), &response, elapsed_ms));
    response
}

/// Counts one terminal request by route and outcome and logs it (within its span).
fn count_and_log(
    app: &App,
    route: &str,
    error: Option<&RequestError>,
    response: &Response,
    elapsed_ms: u64,
) {
    let status = response.status().as_u16();
    let Some(error) = error else {
        if response.status().is_success() {
            app.metrics.count_request(route, status, "OK");
            tracing::info!(elapsed_ms, "served");
        } else {
            // Every refusal is a `RequestError`; an answer that is neither is the proxy's fault.
            app.metrics.count_request(route, status, codes::INTERNAL);
            tracing::error!(
                status = response.status().as_u16(),
                elapsed_ms,
                "answered an error that is not in the error table"
            );
        }
        return;
    };
    let body = error.body();
    app.metrics.count_request(route, status, &body.code);
    if let RequestError::Auth(_) = error {
        app.metrics.count_auth_failure(error.classify().1);
    }
    if let RequestError::Limited { device_id, limited } = error {
        let (limit, metric_route) = match limited {
            Limited::Device { route, .. } => ("device", route.path()),
            Limited::Merchant { .. } => (
                "merchant",
                LimitedRoute::of_path(route).map_or("other", LimitedRoute::path),
            ),
        };
        app.metrics.count_rate_limited(metric_route, limit);
        // One line per device per interval, however fast it is refused.
        if let Some(refused) = app.limits.refusal_to_log(device_id) {
            tracing::warn!(
                message_id = crate::events::TERMINAL_RATE_LIMITED,
                code = %body.code,
                error = %error,
                limit,
                refused_since_last_line = refused,
                elapsed_ms,
                "rate limited"
            );
        }
        return;
    }
    let upstream = body.upstream.as_ref();
    tracing::warn!(
        message_id = crate::events::TERMINAL_REFUSED,
        code = %body.code,
        error = %error,
        upstream_status = upstream.map(|u| u.status),
        upstream_code = upstream.and_then(|u| u.code.as_deref()),
        request_id = upstream.and_then(|u| u.request_id.as_deref()),
        elapsed_ms,
        "refused"
    );
}

// === platform calls ===

/// Makes a platform call for `device` within the merchant's ceiling ([`Limits::admit_platform`]:
/// refused, the call is never made), times it and counts its failure class.
async fn upstream<T, E>(
    app: &App,
    device: &Device,
    ceiling: Platform,
    call: impl std::future::Future<Output = Result<T, E>>,
    failure: impl Fn(&E) -> Failure,
) -> Result<T, RequestError> {
    let platform = ceiling.name();
    app.limits
        .admit_platform(ceiling)
        .await
        .map_err(|limited| RequestError::Limited {
            device_id: device.device_id.clone(),
            limited,
        })?;
    let started = Instant::now();
    let result = call.await;
    app.metrics.observe_upstream(platform, started.elapsed());
    result.map_err(|e| {
        let failure = failure(&e);
        app.metrics
            .count_upstream_failure(platform, class_name(failure.class));
        RequestError::Upstream { platform, failure }
    })
}

fn class_name(class: FailureClass) -> &'static str {
    match class {
        FailureClass::Transport => "transport",
        FailureClass::RateLimited => "rate_limited",
        FailureClass::ServerError => "server_error",
        FailureClass::Rejected => "rejected",
        FailureClass::BadSignature => "bad_signature",
        FailureClass::Malformed => "malformed",
    }
}

async fn authinfo(
    State(app): State<Arc<App>>,
    Authenticated { device, body }: Authenticated,
) -> Result<Json<wire::AuthinfoResponse>, RequestError> {
    let request = wire::AuthinfoRequest::from_body(&body).map_err(RequestError::BadRequest)?;
    let params = AuthinfoParams {
        sp_appid: app.sp_appid.clone(),
        sub_appid: device.sub_appid.clone(),
        sub_mchid: device.sub_mchid.clone(),
        device_id: device.authinfo_device_id.clone(),
        raw_data: request.raw_data,
        organization_id: device.organization_id.clone(),
    };
    let answer = upstream(
        &app,
        &device,
        Platform::WechatPay,
        app.wechat.offlineface_authinfo(&params),
        |e| e.failure(),
    )
    .await?;
    // A validity outside the sane range is a malformed answer, never passed on (the daemon
    // checks again). The range is the wire default for now; a `[wechatpay]` setting for it
    // belongs in the proxy's config.
    wire::check_expires_in(answer.expires_in, &wire::EXPIRES_IN_RANGE).map_err(|reason| {
        app.metrics.count_upstream_failure("wechatpay", "malformed");
        RequestError::Upstream {
            platform: "wechatpay",
            failure: Failure::local(FailureClass::Malformed, reason),
        }
    })?;
    app.health.issued(&device.device_id).await;
    Ok(Json(wire::AuthinfoResponse {
        authinfo: answer.authinfo,
        expires_in: answer.expires_in,
    }))
}

/// `POST /v1/report`: keeps the signing device's health report for the fleet view. Bounded: at
/// most [`super::terminals::MAX_REPORT_BODY`] bytes, texts checked ([`wire::Report::check`]),
/// and each device's rate ([`ReportLimiter`]).
async fn report(
    State(app): State<Arc<App>>,
    Signed { device, body, .. }: Signed,
) -> Result<Json<wire::ReportReceipt>, RequestError> {
    if body.len() > super::terminals::MAX_REPORT_BODY {
        return Err(RequestError::BodyTooLarge(
            super::terminals::MAX_REPORT_BODY,
        ));
    }
    app.reports
        .admit(&device.device_id)
        .map_err(|retry_after| RequestError::ReportRateLimited { retry_after })?;
    let report: wire::Report = serde_json::from_slice(&body)
        .map_err(|e| RequestError::BadRequest(format!("not a report: {e}")))?;
    report.check().map_err(RequestError::BadRequest)?;
    let received_at = app
        .health
        .report(&device.device_id, report)
        .await
        .map_err(|e| RequestError::Store(crate::error_chain(&e)))?;
    Ok(Json(wire::ReportReceipt {
        received_at: crate::units::rfc3339(received_at),
    }))
}

async fn inspection(
    State(app): State<Arc<App>>,
    Authenticated { device, .. }: Authenticated,
) -> Result<Json<wire::Inspection>, RequestError> {
    let i = upstream(
        &app,
        &device,
        Platform::WechatPay,
        app.wechat.device_inspection(&device.device_sn),
        |e| e.failure(),
    )
    .await?;
    let result = match i.result.as_str() {
        "SUCCESS" => wire::InspectionResult::Success,
        "WARN" => wire::InspectionResult::Warn,
        "FAIL" => wire::InspectionResult::Fail,
        other => {
            return Err(RequestError::Upstream {
                platform: "wechatpay",
                failure: Failure::local(
                    FailureClass::Malformed,
                    format!("unknown inspection result {other:?}"),
                ),
            });
        }
    };
    let some = |s: String| (!s.is_empty()).then_some(s);
    Ok(Json(wire::Inspection {
        device_sn: i.device_sn,
        result,
        errors: i.errors,
        warnings: i.warnings,
        inspect_time: i.inspect_time,
        app_version: some(i.app_version),
        camera_sn: some(i.camera_sn),
        wired_mac: some(i.wired_mac),
        wireless_mac: some(i.wireless_mac),
        bluetooth_mac: some(i.bluetooth_mac),
        imei: some(i.imei),
    }))
}

async fn alipay_binding(
    State(app): State<Arc<App>>,
    Authenticated { device, .. }: Authenticated,
) -> Result<Json<wire::AlipayBinding>, RequestError> {
    let client = app.alipay.as_ref().ok_or(RequestError::NotConfigured(
        "Alipay is not configured on this proxy",
    ))?;
    let query = device.alipay.as_ref().ok_or(RequestError::NotConfigured(
        "this device's registry entry has no [device.alipay] identity",
    ))?;
    let b = upstream(
        &app,
        &device,
        Platform::Alipay,
        client.device_query(query),
        |e| e.failure(),
    )
    .await?;
    Ok(Json(wire::AlipayBinding {
        merchant_type: b.merchant_type,
        pid: b.pid,
        shop_id: b.shop_id,
        smid: b.smid,
    }))
}

async fn licence(
    State(app): State<Arc<App>>,
    Authenticated { device, .. }: Authenticated,
) -> Result<Json<wire::Licence>, RequestError> {
    let client = app.aliyun.as_ref().ok_or(RequestError::NotConfigured(
        "Alibaba Cloud is not configured on this proxy",
    ))?;
    let (cloudauth_id, biz_type) = device.aliyun.as_ref().ok_or(RequestError::NotConfigured(
        "this device's registry entry has no [device.aliyun] identity",
    ))?;
    let info = upstream(
        &app,
        &device,
        Platform::Aliyun,
        client.find_device(cloudauth_id, biz_type.as_deref()),
        |e| e.failure(),
    )
    .await?;
    let day = |text: &str, field: &str| {
        aliyun::parse_day(text)
            .map(aliyun::format_day)
            .ok_or_else(|| RequestError::Upstream {
                platform: "aliyun",
                failure: Failure::local(
                    FailureClass::Malformed,
                    format!("{field} {text:?} is not YYYYMMDD"),
                ),
            })
    };
    Ok(Json(wire::Licence {
        begin_day: day(&info.begin_day, "BeginDay")?,
        expired_day: day(&info.expired_day, "ExpiredDay")?,
        device_id: info.device_id,
        user_device_id: info.user_device_id,
        biz_type: info.biz_type,
    }))
}

// === admin ===

/// The admin listener's routes (loopback by default; behind [`admin_auth`] when a token is
/// configured): `/healthz`, `/metrics`, `/fleet`, `POST /fleet/sync`, the fleet view's
/// `/terminals` and `/terminals/{device_id}`, and its dashboard at `/`.
pub fn admin_router(app: Arc<App>) -> axum::Router {
    axum::Router::new()
        .route("/", get(dashboard))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/fleet", get(fleet))
        .route("/fleet/sync", axum::routing::post(fleet_sync))
        .route("/terminals", get(terminals))
        .route("/terminals/{device_id}", get(terminal))
        .layer(middleware::from_fn_with_state(app.clone(), admin_auth))
        .with_state(app)
}

/// Why an admin call was refused.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "this admin listener needs its token: Authorization: Bearer <token>, or basic auth with the token as the password"
    )]
    Unauthorized,
    #[error("bad query: {0}")]
    BadQuery(String),
    #[error("no terminal {0} is enrolled")]
    UnknownTerminal(String),
    #[error("the fleet view's store failed: {0}")]
    Store(String),
    #[error("{0}")]
    Internal(String),
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            Self::Unauthorized => (StatusCode::UNAUTHORIZED, codes::UNAUTHORIZED),
            Self::BadQuery(_) => (StatusCode::BAD_REQUEST, codes::BAD_REQUEST),
            Self::UnknownTerminal(_) => (StatusCode::NOT_FOUND, codes::NOT_FOUND),
            Self::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, codes::STORE_UNAVAILABLE),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, codes::INTERNAL),
        };
        let body = ErrorBody {
            code: code.to_owned(),
            message: self.to_string(),
            retryable: matches!(self, Self::Store(_)),
            retry_after_seconds: None,
            upstream: None,
        };
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"authinfo-proxy\", charset=\"UTF-8\""),
            );
        }
        response
    }
}

impl From<super::store::StoreError> for AdminError {
    fn from(e: super::store::StoreError) -> Self {
        Self::Store(crate::error_chain(&e))
    }
}

/// With a configured token, admits only admin calls that carry it: `Bearer <token>`, or
/// `Basic` with any user and the token as the password (what a browser asks for the dashboard).
async fn admin_auth(
    State(app): State<Arc<App>>,
    request: Request,
    next: Next,
) -> Result<Response, AdminError> {
    let Some(token) = &app.admin_token else {
        return Ok(next.run(request).await);
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(admin_credential);
    if given.is_some_and(|g| token.matches(&g)) {
        Ok(next.run(request).await)
    } else {
        Err(AdminError::Unauthorized)
    }
}

/// The secret an `Authorization` header carries: a bearer token, or a basic password.
fn admin_credential(header: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let (scheme, rest) = header.trim().split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.trim().as_bytes().to_vec());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest.trim())
            .ok()?;
        let colon = decoded.iter().position(|b| *b == b':')?;
        return Some(decoded[colon + 1..].to_vec());
    }
    None
}

/// A query of the fleet view, or its error as JSON.
fn fleet_query(
    query: Result<axum::extract::Query<TerminalsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<TerminalsQuery, AdminError> {
    query
        .map(|q| q.0)
        .map_err(|e| AdminError::BadQuery(e.body_text()))
}

/// `GET /terminals`: the summary and one page of terminals, worst first, filtered by risk,
/// severity or `at_risk=true`.
async fn terminals(
    State(app): State<Arc<App>>,
    query: Result<axum::extract::Query<TerminalsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<TerminalsPage>, AdminError> {
    let query = fleet_query(query)?;
    let view = app.fleet_view().await?;
    Ok(Json(TerminalsPage::of(&view, &query)))
}

/// `GET /terminals/{device_id}`: one terminal, all it reported and its risks.
async fn terminal(
    State(app): State<Arc<App>>,
    axum::extract::Path(device_id): axum::extract::Path<String>,
) -> Result<Json<TerminalDoc>, AdminError> {
    let view = app.fleet_view().await?;
    let t = view
        .get(&device_id)
        .ok_or_else(|| AdminError::UnknownTerminal(device_id.chars().take(100).collect()))?;
    Ok(Json(TerminalDoc::of(t, view.now)))
}

/// `GET /`: the dashboard, with the same query as `/terminals` for its table. Its style and
/// script run under a per-page nonce; nothing else may (Content-Security-Policy).
async fn dashboard(
    State(app): State<Arc<App>>,
    query: Result<axum::extract::Query<TerminalsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, AdminError> {
    let mut query = fleet_query(query)?;
    query
        .per_page
        .get_or_insert(super::terminals::dashboard::DASHBOARD_PER_PAGE);
    let view = app.fleet_view().await?;
    let page = TerminalsPage::of(&view, &query);
    let nonce = crate::crypto::nonce().map_err(|e| AdminError::Internal(e.to_string()))?;
    let html = super::terminals::dashboard::render(&view, &page, &nonce);
    let csp = format!(
        "default-src 'none'; style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}'; img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    );
    let mut response = ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response();
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&csp) {
        headers.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    Ok(response)
}

/// The answer to `GET /healthz`: 200 while the proxy can serve terminals, 503 (with the
/// reason in `cluster`) while the replicas' Redis does not answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthzDoc {
    pub status: Health,
    pub version: String,
    pub uptime_seconds: u64,
    /// Devices enrolled in the registry.
    pub registry_devices: usize,
    pub fleet_enabled: bool,
    /// Devices in the last synced fleet list.
    pub fleet_devices: usize,
    /// When the fleet list was synced (RFC 3339); `null` before the first sync.
    pub fleet_synced_at: Option<String>,
    /// The replicas' Redis (`[cluster]`); absent for one proxy on its own store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterHealthDoc>,
}

/// What `/healthz` says of the replicas' Redis.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterHealthDoc {
    /// The URL, without its password.
    pub redis: String,
    /// Whether Redis answered this `/healthz`'s `PING`.
    pub redis_up: bool,
    /// Since when it answers, or has not answered (RFC 3339).
    pub since: String,
    /// Why it does not answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// This replica's name in the fleet-sync lease.
    pub replica: String,
    /// The replica holding the fleet-sync lease (`null`: none, or Redis does not answer).
    pub lease_holder: Option<String>,
}

/// What `/healthz` reports: the admin listener answers only while the proxy runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Ok,
    /// The replicas' Redis does not answer: terminal requests are refused (retryable).
    Unavailable,
}

async fn healthz(State(app): State<Arc<App>>) -> Response {
    let snapshot = app.fleet.snapshot();
    let cluster = match &app.cluster {
        None => None,
        Some(cluster) => {
            let up = cluster.ping().await.is_ok();
            let holder = if up {
                cluster.holder(super::fleet::LEASE).await.ok().flatten()
            } else {
                None
            };
            let (since, error) = match cluster.availability() {
                super::cluster::Availability::Up { since } => (since, None),
                super::cluster::Availability::Down { since, error } => (since, Some(error)),
            };
            Some(ClusterHealthDoc {
                redis: cluster.config().redacted_url.clone(),
                redis_up: up,
                since: crate::units::rfc3339(since),
                error,
                replica: cluster.replica().to_owned(),
                lease_holder: holder,
            })
        }
    };
    let up = cluster.as_ref().is_none_or(|c| c.redis_up);
    let doc = HealthzDoc {
        status: if up { Health::Ok } else { Health::Unavailable },
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_seconds: app.started.elapsed().as_secs(),
        registry_devices: app.registry.current().len(),
        fleet_enabled: app.fleet_enabled,
        fleet_devices: snapshot.devices.len(),
        fleet_synced_at: snapshot.synced_at.map(crate::units::rfc3339),
        cluster,
    };
    let status = if up {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(doc)).into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let snapshot = app.fleet.snapshot();
    let mut gauges = vec![
        (
            "authinfo_proxy_registry_devices",
            "Devices enrolled in the registry.",
            app.registry.current().len() as f64,
        ),
        (
            "authinfo_proxy_fleet_devices",
            "Devices in the last synced WeChat Pay fleet list.",
            snapshot.devices.len() as f64,
        ),
        (
            "authinfo_proxy_nonces",
            "Nonces this process remembers for replay detection (NaN: they are in Redis).",
            app.nonces.local_len().map_or(f64::NAN, |n| n as f64),
        ),
        (
            "authinfo_proxy_fleet_age_seconds",
            "Seconds since the fleet list was synced (NaN: not synced yet).",
            snapshot
                .synced_at
                .map_or(f64::NAN, |t| (unix_now() - t) as f64),
        ),
    ];
    if let Some(cluster) = &app.cluster {
        gauges.push((
            "authinfo_proxy_cluster_up",
            "1 while the replicas' Redis answered the last call, else 0.",
            f64::from(u8::from(matches!(
                cluster.availability(),
                super::cluster::Availability::Up { .. }
            ))),
        ));
    }
    let mut text = app.metrics.render(&gauges);
    match app.fleet_view().await {
        Ok(view) => text.push_str(&super::terminals::render_metrics(&view)),
        Err(error) => {
            tracing::warn!(error = %crate::error_chain(&error), "cannot judge the fleet for /metrics; its series are left out");
        }
    }
    (
        [(header::CONTENT_TYPE, crate::prometheus::CONTENT_TYPE)],
        text,
    )
        .into_response()
}

async fn fleet(State(app): State<Arc<App>>) -> Response {
    Json(&*app.fleet.snapshot()).into_response()
}

/// `POST /fleet/sync` (`devices --live` while the proxy runs): pages the list now, in this
/// proxy's pacing and daily budget, and answers with it; 429 when the budget is spent, 502 when
/// the sync failed (the cached list stays).
async fn fleet_sync(State(app): State<Arc<App>>) -> Response {
    match app.fleet.sync(&app.wechat).await {
        Ok(_) => Json(&*app.fleet.snapshot()).into_response(),
        Err(error) => {
            let refusal = SyncRefusal::from(&error);
            tracing::warn!(message_id = crate::events::FLEET_SYNC_FAILED, error = %refusal.message, "fleet sync asked on the admin listener failed");
            let status = match refusal.code {
                SyncRefusalCode::DailyBudgetSpent => StatusCode::TOO_MANY_REQUESTS,
                SyncRefusalCode::SyncFailed => StatusCode::BAD_GATEWAY,
                SyncRefusalCode::LeaseHeld => StatusCode::CONFLICT,
            };
            (status, Json(refusal)).into_response()
        }
    }
}
