//! The terminal-facing routes and the admin routes.
//!
//! Owns: routing, the order authenticate → fleet check → forward, what each route sends to its
//! platform (filled from the signing device's registry entry, never from the request: a device
//! can only ask about itself), and the one table from error to status, code and retryability
//! ([`ProxyError`]). It must not sign or verify platform calls itself; the platform clients do.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt as _, Limited};
use tokio::time::Instant;

use super::auth::{AuthError, NonceCache, authenticate};
use super::fleet::{Fleet, FleetStatus};
use super::metrics::ProxyMetrics;
use super::registry::{Device, SharedRegistry};
use crate::platform::alipay::AlipayClient;
use crate::platform::aliyun::{self, AliyunClient};
use crate::platform::wechatpay::{AuthinfoParams, WechatPayClient};
use crate::platform::{Failure, FailureClass};
use crate::units::unix_now;
use crate::wire::{self, ErrorBody, MAX_RAW_DATA, UpstreamDetail, codes};

/// Everything the routes use.
#[derive(Debug)]
pub struct App {
    pub registry: SharedRegistry,
    pub nonces: NonceCache,
    pub fleet: Arc<Fleet>,
    pub fleet_enabled: bool,
    pub wechat: Arc<WechatPayClient>,
    pub sp_appid: String,
    pub alipay: Option<AlipayClient>,
    pub aliyun: Option<AliyunClient>,
    pub metrics: ProxyMetrics,
    pub started: Instant,
}

/// Every error the proxy answers a terminal with: the one table.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
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
    #[error("{method} is not allowed on {route}")]
    MethodNotAllowed { method: Method, route: &'static str },
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("the body is larger than {} bytes", wire::MAX_REQUEST_BODY)]
    BodyTooLarge,
    #[error("{platform}: {}", failure.message.as_deref().unwrap_or("failed"))]
    Upstream {
        platform: &'static str,
        failure: Failure,
    },
}

impl ProxyError {
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
            Self::BodyTooLarge => (S::PAYLOAD_TOO_LARGE, codes::BODY_TOO_LARGE, false),
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

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        let (status, _, _) = self.classify();
        let body = self.body();
        let mut response = (status, axum::Json(&body)).into_response();
        if let Some(secs) = body.retry_after_seconds
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        if let Self::MethodNotAllowed { route, .. } = &self {
            let allow = if *route == wire::ROUTE_AUTHINFO {
                "POST"
            } else {
                "GET"
            };
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        response
    }
}

/// The routes terminals call.
pub fn terminal_router(app: Arc<App>) -> axum::Router {
    axum::Router::new().fallback(terminal).with_state(app)
}

/// The route a path names, with the method it takes.
fn route_of(path: &str) -> Option<(&'static str, Method)> {
    match path {
        wire::ROUTE_AUTHINFO => Some((wire::ROUTE_AUTHINFO, Method::POST)),
        wire::ROUTE_INSPECTION => Some((wire::ROUTE_INSPECTION, Method::GET)),
        wire::ROUTE_ALIPAY_BINDING => Some((wire::ROUTE_ALIPAY_BINDING, Method::GET)),
        wire::ROUTE_LICENCE => Some((wire::ROUTE_LICENCE, Method::GET)),
        _ => None,
    }
}

async fn terminal(State(app): State<Arc<App>>, req: Request<Body>) -> Response {
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let route = route_of(parts.uri.path()).map_or("other", |(r, _)| r);
    let mut device_id = None;
    let result = handle(
        &app,
        &parts.method,
        &parts.uri,
        &parts.headers,
        body,
        &mut device_id,
    )
    .await;
    let elapsed_ms = started.elapsed().as_millis() as u64;
    match result {
        Ok(response) => {
            app.metrics.count_request(route, "OK");
            tracing::info!(
                route,
                device_id = device_id.as_deref(),
                elapsed_ms,
                "served"
            );
            response
        }
        Err(error) => {
            let body = error.body();
            app.metrics.count_request(route, &body.code);
            if let ProxyError::Auth(_) = &error {
                app.metrics.count_auth_failure(error.classify().1);
            }
            let upstream = body.upstream.as_ref();
            tracing::warn!(
                route,
                device_id = device_id.as_deref(),
                code = %body.code,
                error = %error,
                upstream_status = upstream.map(|u| u.status),
                upstream_code = upstream.and_then(|u| u.code.as_deref()),
                request_id = upstream.and_then(|u| u.request_id.as_deref()),
                elapsed_ms,
                "refused"
            );
            error.into_response()
        }
    }
}

async fn handle(
    app: &App,
    method: &Method,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    body: Body,
    device_id: &mut Option<String>,
) -> Result<Response, ProxyError> {
    let (route, allowed) = route_of(uri.path())
        .ok_or_else(|| ProxyError::NotFound(uri.path().chars().take(100).collect()))?;
    if method != allowed {
        return Err(ProxyError::MethodNotAllowed {
            method: method.clone(),
            route,
        });
    }
    let body = read_body(body).await?;
    let path_and_query = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let registry = app.registry.current();
    let device = authenticate(
        &registry,
        &app.nonces,
        authorization,
        method.as_str(),
        path_and_query,
        &body,
        unix_now(),
    )?;
    *device_id = Some(device.device_id.clone());
    if app.fleet_enabled {
        match app.fleet.status(&device.device_sn) {
            FleetStatus::Activated => {}
            FleetStatus::Inactivated => {
                return Err(ProxyError::Inactivated(device.device_sn.clone()));
            }
            FleetStatus::Unlisted => return Err(ProxyError::NotInFleet(device.device_sn.clone())),
            FleetStatus::Unknown => {
                tracing::debug!(device_id = %device.device_id, "no fleet list yet; not checking the device against it");
            }
        }
    }
    let value = match route {
        wire::ROUTE_AUTHINFO => serde_json::to_value(authinfo(app, &device, &body).await?),
        wire::ROUTE_INSPECTION => serde_json::to_value(inspection(app, &device).await?),
        wire::ROUTE_ALIPAY_BINDING => serde_json::to_value(alipay_binding(app, &device).await?),
        _ => serde_json::to_value(licence(app, &device).await?),
    }
    .map_err(|e| ProxyError::BadRequest(e.to_string()))?;
    Ok(axum::Json(value).into_response())
}

async fn read_body(body: Body) -> Result<bytes::Bytes, ProxyError> {
    Limited::new(body, wire::MAX_REQUEST_BODY)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                ProxyError::BodyTooLarge
            } else {
                ProxyError::BadRequest(e.to_string())
            }
        })
}

/// Times a platform call and counts its failure class.
async fn upstream<T, E>(
    app: &App,
    platform: &'static str,
    call: impl std::future::Future<Output = Result<T, E>>,
    failure: impl Fn(&E) -> Failure,
) -> Result<T, ProxyError> {
    let started = Instant::now();
    let result = call.await;
    app.metrics.observe_upstream(platform, started.elapsed());
    result.map_err(|e| {
        let failure = failure(&e);
        app.metrics
            .count_upstream_failure(platform, class_name(failure.class));
        ProxyError::Upstream { platform, failure }
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
    app: &App,
    device: &Device,
    body: &[u8],
) -> Result<wire::AuthinfoResponse, ProxyError> {
    let request: wire::AuthinfoRequest = serde_json::from_slice(body)
        .map_err(|e| ProxyError::BadRequest(format!("expected {{\"raw_data\": \"...\"}}: {e}")))?;
    if request.raw_data.trim().is_empty() || request.raw_data.len() > MAX_RAW_DATA {
        return Err(ProxyError::BadRequest(format!(
            "raw_data must be 1 to {MAX_RAW_DATA} bytes"
        )));
    }
    let params = AuthinfoParams {
        sp_appid: app.sp_appid.clone(),
        sub_appid: device.sub_appid.clone(),
        sub_mchid: device.sub_mchid.clone(),
        device_id: device.authinfo_device_id.clone(),
        raw_data: request.raw_data,
        organization_id: device.organization_id.clone(),
    };
    let answer = upstream(
        app,
        "wechatpay",
        app.wechat.offlineface_authinfo(&params),
        |e| e.failure(),
    )
    .await?;
    // A validity outside the sane range is a malformed answer, never passed on (the daemon
    // checks again). The range is the wire default for now; a `[wechatpay]` setting for it
    // belongs in the proxy's config.
    wire::check_expires_in(answer.expires_in, &wire::EXPIRES_IN_RANGE).map_err(|reason| {
        app.metrics.count_upstream_failure("wechatpay", "malformed");
        ProxyError::Upstream {
            platform: "wechatpay",
            failure: Failure::local(FailureClass::Malformed, reason),
        }
    })?;
    Ok(wire::AuthinfoResponse {
        authinfo: answer.authinfo,
        expires_in: answer.expires_in,
    })
}

async fn inspection(app: &App, device: &Device) -> Result<wire::Inspection, ProxyError> {
    let i = upstream(
        app,
        "wechatpay",
        app.wechat.device_inspection(&device.device_sn),
        |e| e.failure(),
    )
    .await?;
    let result = match i.result.as_str() {
        "SUCCESS" => wire::InspectionResult::Success,
        "WARN" => wire::InspectionResult::Warn,
        "FAIL" => wire::InspectionResult::Fail,
        other => {
            return Err(ProxyError::Upstream {
                platform: "wechatpay",
                failure: Failure::local(
                    FailureClass::Malformed,
                    format!("unknown inspection result {other:?}"),
                ),
            });
        }
    };
    let some = |s: String| (!s.is_empty()).then_some(s);
    Ok(wire::Inspection {
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
    })
}

async fn alipay_binding(app: &App, device: &Device) -> Result<wire::AlipayBinding, ProxyError> {
    let client = app.alipay.as_ref().ok_or(ProxyError::NotConfigured(
        "Alipay is not configured on this proxy",
    ))?;
    let query = device.alipay.as_ref().ok_or(ProxyError::NotConfigured(
        "this device's registry entry has no [device.alipay] identity",
    ))?;
    let b = upstream(app, "alipay", client.device_query(query), |e| e.failure()).await?;
    Ok(wire::AlipayBinding {
        merchant_type: b.merchant_type,
        pid: b.pid,
        shop_id: b.shop_id,
        smid: b.smid,
    })
}

async fn licence(app: &App, device: &Device) -> Result<wire::Licence, ProxyError> {
    let client = app.aliyun.as_ref().ok_or(ProxyError::NotConfigured(
        "Alibaba Cloud is not configured on this proxy",
    ))?;
    let (cloudauth_id, biz_type) = device.aliyun.as_ref().ok_or(ProxyError::NotConfigured(
        "this device's registry entry has no [device.aliyun] identity",
    ))?;
    let info = upstream(
        app,
        "aliyun",
        client.find_device(cloudauth_id, biz_type.as_deref()),
        |e| e.failure(),
    )
    .await?;
    let day = |text: &str, field: &str| {
        aliyun::parse_day(text)
            .map(aliyun::format_day)
            .ok_or_else(|| ProxyError::Upstream {
                platform: "aliyun",
                failure: Failure::local(
                    FailureClass::Malformed,
                    format!("{field} {text:?} is not YYYYMMDD"),
                ),
            })
    };
    Ok(wire::Licence {
        begin_day: day(&info.begin_day, "BeginDay")?,
        expired_day: day(&info.expired_day, "ExpiredDay")?,
        device_id: info.device_id,
        user_device_id: info.user_device_id,
        biz_type: info.biz_type,
    })
}

// === admin ===

/// `/healthz`, `/metrics` and `/fleet`, for the admin listener (loopback by default).
pub fn admin_router(app: Arc<App>) -> axum::Router {
    axum::Router::new()
        .route("/healthz", axum::routing::get(healthz))
        .route("/metrics", axum::routing::get(metrics))
        .route("/fleet", axum::routing::get(fleet))
        .with_state(app)
}

async fn healthz(State(app): State<Arc<App>>) -> Response {
    let snapshot = app.fleet.snapshot();
    axum::Json(serde_json::json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": app.started.elapsed().as_secs(),
        "registry_devices": app.registry.current().len(),
        "fleet_enabled": app.fleet_enabled,
        "fleet_devices": snapshot.devices.len(),
        "fleet_synced_at": snapshot.synced_at.map(crate::units::rfc3339),
    }))
    .into_response()
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
            "Nonces remembered for replay detection.",
            app.nonces.len() as f64,
        ),
    ];
    if let Some(t) = snapshot.synced_at {
        gauges.push((
            "authinfo_proxy_fleet_age_seconds",
            "Seconds since the fleet list was synced.",
            (unix_now() - t) as f64,
        ));
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(&gauges),
    )
        .into_response()
}

async fn fleet(State(app): State<Arc<App>>) -> Response {
    axum::Json(&*app.fleet.snapshot()).into_response()
}
