//! The socket API as a pure function: [`handle`] takes a parsed request and the shared state and
//! returns a response. The server moves bytes; everything the face app and operators see is
//! decided here, testable without a socket.
//!
//! Owns: dispatch over the route table ([`Route`]), query parsing, ETag / If-None-Match /
//! long-poll, filling the typed documents of [`super::doc`], and the one table from error to
//! status and code ([`ApiError`]). It must not log secrets: the authinfo leaves only in the body
//! of `GET /v1/authinfo`.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::doc::{
    AuthinfoDoc, ErrorDoc, HealthzDoc, HeldState, RawDataBody, RefreshAccepted, RefreshDone, Route,
};
use super::state::{Freshness, Hold, Now, RefreshHeld, Served, State, whole_seconds_up};
use crate::units::rfc3339;
use crate::wire::MAX_RAW_DATA;

/// Longest `?wait=` accepted on `GET /v1/authinfo`, seconds.
pub const MAX_WAIT_SECS: u64 = 300;
/// Largest request body read from the socket.
pub const MAX_BODY: usize = 64 * 1024;

/// A request, as the server parsed it.
#[derive(Debug, Clone, Default)]
pub struct ApiRequest {
    pub method: http::Method,
    pub path: String,
    pub query: Option<String>,
    pub if_none_match: Option<String>,
    pub body: bytes::Bytes,
}

/// A response, for the server to write.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiResponse {
    pub status: u16,
    pub content_type: &'static str,
    pub etag: Option<String>,
    /// `Allow` on a 405.
    pub allow: Option<&'static str>,
    /// `Retry-After` (seconds): 1 on a 503 `BUSY`, the wait on a 429.
    pub retry_after: Option<u64>,
    pub body: bytes::Bytes,
}

impl ApiResponse {
    fn json<T: Serialize>(status: u16, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => Self {
                status,
                content_type: "application/json",
                etag: None,
                allow: None,
                retry_after: None,
                body: body.into(),
            },
            // The documents are plain structs of strings and numbers; should one ever fail to
            // encode, the client gets a 500 that says so, never an empty or partial answer.
            Err(e) => {
                tracing::error!(error = %e, "cannot encode an answer");
                Self {
                    status: 500,
                    content_type: "application/json",
                    etag: None,
                    allow: None,
                    retry_after: None,
                    body: bytes::Bytes::from_static(
                        br#"{"code":"INTERNAL","message":"the answer could not be encoded"}"#,
                    ),
                }
            }
        }
    }

    fn empty(status: u16) -> Self {
        Self {
            status,
            content_type: "application/json",
            etag: None,
            allow: None,
            retry_after: None,
            body: bytes::Bytes::new(),
        }
    }

    /// The body as JSON (tests).
    pub fn json_body(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Every error the API answers, and its status and code: the one table.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("no authinfo has been fetched yet")]
    NoAuthinfo,
    #[error("no route {0}")]
    NotFound(String),
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed {
        method: http::Method,
        path: String,
        allow: &'static str,
    },
    #[error("bad query: {0}")]
    BadQuery(String),
    #[error("bad body: {0}")]
    BadBody(String),
    #[error("the body is larger than {MAX_BODY} bytes")]
    BodyTooLarge,
    #[error("this peer (uid {uid}, gid {gid}) is not in the allow-list")]
    PeerDenied { uid: u32, gid: u32 },
    #[error("the daemon is at a connection limit; retry shortly")]
    Busy,
    #[error("the daemon is shutting down")]
    ShuttingDown,
    #[error("{message}")]
    RefreshFailed { code: String, message: String },
    #[error("the refresh did not finish within {0} s")]
    RefreshTimeout(u64),
    #[error(
        "no refresh started: {hold}; the next forced refresh is allowed in {}",
        crate::units::format_duration(Duration::from_secs(whole_seconds_up(*wait)))
    )]
    RefreshHeld { wait: Duration, hold: Hold },
    /// A bug: work on the blocking pool did not finish (it panicked).
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status and the stable code.
    pub fn status_and_code(&self) -> (u16, &'static str) {
        match self {
            Self::NoAuthinfo => (503, "NO_AUTHINFO"),
            Self::NotFound(_) => (404, "NOT_FOUND"),
            Self::MethodNotAllowed { .. } => (405, "METHOD_NOT_ALLOWED"),
            Self::BadQuery(_) => (400, "BAD_QUERY"),
            Self::BadBody(_) => (400, "BAD_BODY"),
            Self::BodyTooLarge => (413, "BODY_TOO_LARGE"),
            Self::PeerDenied { .. } => (403, "PEER_DENIED"),
            Self::Busy => (503, "BUSY"),
            Self::ShuttingDown => (503, "SHUTTING_DOWN"),
            Self::RefreshFailed { .. } => (502, "REFRESH_FAILED"),
            Self::RefreshTimeout(_) => (504, "REFRESH_TIMEOUT"),
            Self::RefreshHeld { .. } => (429, "REFRESH_RATE_LIMITED"),
            Self::Internal(_) => (500, "INTERNAL"),
        }
    }

    pub fn response(&self) -> ApiResponse {
        let (status, code) = self.status_and_code();
        let code = match self {
            Self::RefreshFailed { code, .. } => code.clone(),
            _ => code.to_owned(),
        };
        let retry_after = match self {
            Self::RefreshHeld { wait, .. } => Some(whole_seconds_up(*wait)),
            Self::Busy => Some(1),
            _ => None,
        };
        let mut response = ApiResponse::json(
            status,
            &ErrorDoc {
                code,
                message: self.to_string(),
                retry_after_seconds: retry_after,
            },
        );
        if let Self::MethodNotAllowed { allow, .. } = self {
            response.allow = Some(allow);
        }
        response.retry_after = retry_after;
        response
    }
}

/// Answers one request.
pub async fn handle(
    req: ApiRequest,
    state: &Arc<State>,
    shutdown: &CancellationToken,
) -> ApiResponse {
    let route = Route::from_path(&req.path);
    let response = route_request(req, state, shutdown)
        .await
        .unwrap_or_else(|e| e.response());
    state.metrics.count_request(route, response.status);
    response
}

/// Whether `req` asks to wait for its answer (`?wait=` with seconds on `GET /v1/authinfo`,
/// `?wait=true` on `POST /v1/refresh`): the server caps how many do at once.
pub fn waits(req: &ApiRequest) -> bool {
    let wait = query_param(req.query.as_deref(), "wait");
    match Route::from_path(&req.path) {
        Some(Route::Authinfo) => wait.is_some_and(|v| v != "0"),
        Some(Route::Refresh) => matches!(wait, Some("true" | "")),
        _ => false,
    }
}

async fn route_request(
    req: ApiRequest,
    state: &Arc<State>,
    shutdown: &CancellationToken,
) -> Result<ApiResponse, ApiError> {
    let Some(route) = Route::from_path(&req.path) else {
        return Err(ApiError::NotFound(req.path.chars().take(100).collect()));
    };
    if req.method != route.method() {
        return Err(ApiError::MethodNotAllowed {
            method: req.method.clone(),
            path: req.path.clone(),
            allow: route.allow(),
        });
    }
    match route {
        Route::Authinfo => get_authinfo(&req, state, shutdown).await,
        Route::RawData => put_raw_data(&req, state).await,
        Route::Refresh => post_refresh(&req, state, shutdown).await,
        Route::Status => Ok(ApiResponse::json(200, &state.status())),
        Route::Device => Ok(ApiResponse::json(200, &state.health().doc(state.now()))),
        Route::Healthz => Ok(healthz(state)),
        Route::Metrics => Ok(metrics(state)),
    }
}

/// The value of `key` in a query string (no percent-decoding: the keys and values here are
/// plain numbers and words).
fn query_param<'q>(query: Option<&'q str>, key: &str) -> Option<&'q str> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn authinfo_doc(served: &Served, state: &State, now: Now) -> AuthinfoDoc {
    AuthinfoDoc {
        authinfo: served.held.authinfo.clone(),
        fetched_at: rfc3339(served.held.fetched_at),
        expires_at: rfc3339(served.held.expires_at),
        age_seconds: served.age(now).seconds,
        state: served.freshness(now, state.config.refresh.interval),
    }
}

async fn get_authinfo(
    req: &ApiRequest,
    state: &Arc<State>,
    shutdown: &CancellationToken,
) -> Result<ApiResponse, ApiError> {
    let wait = match query_param(req.query.as_deref(), "wait") {
        None => None,
        Some(v) => match v.parse::<u64>() {
            Ok(secs) if secs <= MAX_WAIT_SECS => Some(Duration::from_secs(secs)),
            _ => {
                return Err(ApiError::BadQuery(format!(
                    "wait must be whole seconds from 0 to {MAX_WAIT_SECS}"
                )));
            }
        },
    };
    let known = req.if_none_match.as_deref().map(str::trim);
    // The answer is "unchanged" while the served ETag equals the one the client holds (or,
    // without If-None-Match, while nothing is held).
    let unchanged = |current: &Option<Arc<Served>>| match (current, known) {
        (None, _) => true,
        (Some(s), Some(tag)) => etag_matches(tag, &s.etag),
        (Some(_), None) => false,
    };
    if let Some(wait) = wait {
        let mut rx = state.watch_authinfo();
        let waits = unchanged(&rx.borrow());
        if waits {
            tokio::select! {
                _ = tokio::time::timeout(wait, rx.wait_for(|c| !unchanged(c))) => {}
                () = shutdown.cancelled() => {}
            }
        }
    }
    let current = state.current();
    match current {
        None => Err(ApiError::NoAuthinfo),
        Some(served) if known.is_some_and(|tag| etag_matches(tag, &served.etag)) => {
            let mut r = ApiResponse::empty(304);
            r.etag = Some(served.etag.clone());
            Ok(r)
        }
        Some(served) => {
            let mut r = authinfo_answer(&served, state);
            r.etag = Some(served.etag.clone());
            Ok(r)
        }
    }
}

thread_local! {
    /// The last `GET /v1/authinfo` answer this thread encoded, with what it was made of. The
    /// document changes only with a new authinfo or the next second (its age and state), and
    /// escaping the secret's few hundred characters into JSON was the largest part of a
    /// request's own work: the face app's polls reuse it (a clone of `Bytes`, no copy).
    static AUTHINFO_ANSWER: std::cell::RefCell<Option<(Arc<Served>, Now, ApiResponse)>> =
        const { std::cell::RefCell::new(None) };
}

/// The 200 answer for `served` now, encoded at most once per second per thread.
fn authinfo_answer(served: &Arc<Served>, state: &State) -> ApiResponse {
    let now = state.time();
    AUTHINFO_ANSWER.with_borrow_mut(|cached| {
        // Holding the `Arc` keeps its address from being reused by another authinfo.
        if let Some((s, at, answer)) = cached.as_ref()
            && Arc::ptr_eq(s, served)
            && *at == now
        {
            return answer.clone();
        }
        let answer = ApiResponse::json(200, &authinfo_doc(served, state, now));
        *cached = Some((served.clone(), now, answer.clone()));
        answer
    })
}

/// `If-None-Match` matching: `*`, or any listed tag equal to ours (weak prefixes ignored).
fn etag_matches(header: &str, etag: &str) -> bool {
    header.trim() == "*"
        || header
            .split(',')
            .map(|t| t.trim().trim_start_matches("W/"))
            .any(|t| t == etag)
}

async fn put_raw_data(req: &ApiRequest, state: &Arc<State>) -> Result<ApiResponse, ApiError> {
    let body: RawDataBody = crate::json::from_slice(&req.body)
        .map_err(|e| ApiError::BadBody(format!("expected {{\"raw_data\": \"...\"}}: {e}")))?;
    let value = body.raw_data.trim().to_owned();
    if value.is_empty() {
        return Err(ApiError::BadBody("raw_data is empty".into()));
    }
    if value.len() > MAX_RAW_DATA {
        return Err(ApiError::BadBody(format!(
            "raw_data is longer than {MAX_RAW_DATA} bytes"
        )));
    }
    let fingerprint = crate::crypto::secret_fingerprint(value.as_bytes());
    // Storing is a flushed write (fsync): on the blocking pool, so that a slow disk never
    // holds up a runtime thread that other requests (the face app's polls) are waiting for.
    let accepted = {
        let state = state.clone();
        tokio::task::spawn_blocking(move || state.accept_raw_data(value))
            .await
            .map_err(|e| ApiError::Internal(format!("the store write did not finish: {e}")))?
    };
    tracing::info!(
        message_id = crate::events::RAW_DATA_RECEIVED,
        raw_data_fingerprint = %fingerprint,
        refresh_triggered = accepted.refresh_triggered,
        refresh_deferred_seconds = accepted.refresh_deferred_seconds,
        persisted = accepted.persisted,
        "raw_data received"
    );
    Ok(ApiResponse::json(202, &accepted))
}

async fn post_refresh(
    req: &ApiRequest,
    state: &Arc<State>,
    shutdown: &CancellationToken,
) -> Result<ApiResponse, ApiError> {
    let wait = match query_param(req.query.as_deref(), "wait") {
        None | Some("false") => false,
        Some("true" | "") => true,
        Some(other) => {
            return Err(ApiError::BadQuery(format!(
                "wait must be true or false, not {other:?}"
            )));
        }
    };
    let seq = state
        .request_refresh()
        .map_err(|RefreshHeld { wait, hold }| ApiError::RefreshHeld { wait, hold })?;
    if !wait {
        return Ok(ApiResponse::json(202, &RefreshAccepted { accepted: true }));
    }
    // Bound the wait by what one attempt can take: the command, then the proxy call and its
    // one skew retry.
    let config = &state.config;
    let bound =
        config.refresh.raw_data_command_timeout + config.proxy.timeout * 2 + Duration::from_secs(5);
    let completion = tokio::select! {
        c = tokio::time::timeout(bound, state.wait_completion(seq)) => {
            c.map_err(|_| ApiError::RefreshTimeout(bound.as_secs()))?
        }
        () = shutdown.cancelled() => return Err(ApiError::ShuttingDown),
    };
    match completion.record.as_deref() {
        Some(r) if r.ok => {
            let current = state.current().ok_or(ApiError::NoAuthinfo)?;
            let doc = authinfo_doc(&current, state, state.time());
            Ok(ApiResponse::json(
                200,
                &RefreshDone {
                    ok: true,
                    fingerprint: current.fingerprint.clone(),
                    fetched_at: doc.fetched_at,
                    expires_at: doc.expires_at,
                    state: doc.state,
                },
            ))
        }
        Some(r) => Err(ApiError::RefreshFailed {
            code: r.code.clone().unwrap_or_else(|| "REFRESH_FAILED".into()),
            message: r
                .error
                .clone()
                .unwrap_or_else(|| "the refresh failed".into()),
        }),
        None => Err(ApiError::ShuttingDown),
    }
}

fn healthz(state: &State) -> ApiResponse {
    let freshness = state.freshness();
    let ok = matches!(freshness, Some(Freshness::Fresh | Freshness::Stale));
    ApiResponse::json(
        if ok { 200 } else { 503 },
        &HealthzDoc {
            status: if ok { "ok" } else { "no_valid_authinfo" }.into(),
            authinfo_state: HeldState::from(freshness),
        },
    )
}

fn metrics(state: &State) -> ApiResponse {
    ApiResponse {
        status: 200,
        content_type: crate::prometheus::CONTENT_TYPE,
        etag: None,
        allow: None,
        retry_after: None,
        body: metrics_page(state).into(),
    }
}

/// The metrics page (the socket's `/metrics`, the textfile, the loopback listener).
pub fn metrics_page(state: &State) -> String {
    let now = state.time();
    let current = state.current();
    let status = state.refresh_status().clone();
    let store = state.store.status();
    // Counts and Unix times as the f64 the text format carries (exact below 2^53).
    let seconds = |s: u64| s as f64;
    let unix = |t: i64| t as f64;
    let mut gauges = vec![
        (
            "authinfod_authinfo_present",
            "1 while an authinfo is held.",
            f64::from(u8::from(current.is_some())),
        ),
        (
            "authinfod_refresh_consecutive_failures",
            "Refresh failures since the last success.",
            f64::from(status.consecutive_failures),
        ),
        (
            "authinfod_uptime_seconds",
            "Seconds since the daemon started.",
            state.uptime().as_secs_f64(),
        ),
        (
            "authinfod_store_persisting",
            "1 while writes reach the disk; 0 while the store serves from memory only.",
            f64::from(u8::from(store.not_persisting.is_none())),
        ),
        (
            "authinfod_store_generation",
            "Generation of the store's last write.",
            seconds(store.generation),
        ),
    ];
    // Every gauge is always there (README, Metrics): NaN while what it measures is unknown, so
    // an alert on it sees "unknown", never a series that vanished.
    gauges.extend([
        (
            "authinfod_store_last_persist_timestamp_seconds",
            "Unix time of the last write that reached the disk (NaN: none since start).",
            store.last_persist_at.map_or(f64::NAN, unix),
        ),
        (
            "authinfod_authinfo_age_seconds",
            "Age of the held authinfo (NaN: none held, or its age cannot be told).",
            current
                .as_ref()
                .and_then(|s| s.age(now).seconds)
                .map_or(f64::NAN, seconds),
        ),
        (
            "authinfod_authinfo_runway_seconds",
            "Seconds until the held authinfo expires (offline runway; at most its validity; 0: none held).",
            current.as_ref().map_or(0.0, |s| seconds(s.runway(now))),
        ),
        (
            "authinfod_clock_skew_seconds",
            "The proxy's clock minus ours, from its last answer's Date (NaN: not learned yet).",
            state.clock_skew().map_or(f64::NAN, unix),
        ),
    ]);
    state.metrics.render(
        &gauges,
        &[(
            "authinfod_store_recoveries_total",
            "Damage to the store found and repaired since start.",
            store.recoveries,
        )],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::terminal::store::HeldAuthinfo;
    use crate::units::unix_now;

    fn state(dir: &std::path::Path) -> Arc<State> {
        crate::terminal::state::test_state(dir)
    }

    fn get(path: &str, query: Option<&str>, inm: Option<&str>) -> ApiRequest {
        ApiRequest {
            method: http::Method::GET,
            path: path.into(),
            query: query.map(str::to_owned),
            if_none_match: inm.map(str::to_owned),
            body: bytes::Bytes::new(),
        }
    }

    fn publish(state: &State, authinfo: &str, fetched_at: i64) -> Arc<Served> {
        state.publish(HeldAuthinfo {
            authinfo: authinfo.into(),
            fetched_at,
            expires_at: fetched_at + 7200,
            expires_in: None,
            proxy_fetched_at: None,
        })
    }

    #[tokio::test]
    async fn authinfo_is_503_before_the_first_success_then_200_with_etag_then_304() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = state(dir.path());
        let token = CancellationToken::new();
        let r = handle(get("/v1/authinfo", None, None), &state, &token).await;
        assert_eq!(r.status, 503);
        assert_eq!(r.json_body()["code"], "NO_AUTHINFO");
        let served = publish(&state, "AUTH", unix_now() - 10);
        let r = handle(get("/v1/authinfo", None, None), &state, &token).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.etag.as_deref(), Some(served.etag.as_str()));
        let doc: AuthinfoDoc = serde_json::from_slice(&r.body).expect("doc");
        assert_eq!(doc.authinfo, "AUTH");
        assert_eq!(doc.state, Freshness::Fresh);
        assert!(doc.age_seconds >= Some(10));
        let r = handle(
            get("/v1/authinfo", None, Some(&served.etag)),
            &state,
            &token,
        )
        .await;
        assert_eq!(r.status, 304);
        assert!(r.body.is_empty());
        let r = handle(get("/v1/authinfo", None, Some("\"other\"")), &state, &token).await;
        assert_eq!(r.status, 200);
    }

    #[tokio::test(start_paused = true)]
    async fn long_poll_wakes_on_change_and_times_out_with_304() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = state(dir.path());
        let token = CancellationToken::new();
        let first = publish(&state, "A", unix_now());
        let r = handle(
            get("/v1/authinfo", Some("wait=5"), Some(&first.etag)),
            &state,
            &token,
        )
        .await;
        assert_eq!(r.status, 304, "nothing changed within 5 s");
        let poll = {
            let (state, token, etag) = (state.clone(), token.clone(), first.etag.clone());
            tokio::spawn(async move {
                handle(
                    get("/v1/authinfo", Some("wait=60"), Some(&etag)),
                    &state,
                    &token,
                )
                .await
            })
        };
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!poll.is_finished());
        let second = publish(&state, "B", unix_now() + 1);
        let r = poll.await.expect("join");
        assert_eq!(r.status, 200);
        assert_eq!(r.etag.as_deref(), Some(second.etag.as_str()));
        assert_eq!(r.json_body()["authinfo"], "B");
    }

    #[tokio::test]
    async fn bad_queries_bodies_routes_and_methods_get_json_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = state(dir.path());
        let token = CancellationToken::new();
        let cases = [
            (
                get("/v1/authinfo", Some("wait=abc"), None),
                400,
                "BAD_QUERY",
            ),
            (
                get("/v1/authinfo", Some("wait=301"), None),
                400,
                "BAD_QUERY",
            ),
            (get("/nope", None, None), 404, "NOT_FOUND"),
            (get("/v1/raw-data", None, None), 405, "METHOD_NOT_ALLOWED"),
            (
                ApiRequest {
                    method: http::Method::PUT,
                    path: "/v1/raw-data".into(),
                    body: bytes::Bytes::from_static(b"{\"raw\":1}"),
                    ..ApiRequest::default()
                },
                400,
                "BAD_BODY",
            ),
            (
                ApiRequest {
                    method: http::Method::PUT,
                    path: "/v1/raw-data".into(),
                    body: bytes::Bytes::from_static(b"{\"raw_data\":\"  \"}"),
                    ..ApiRequest::default()
                },
                400,
                "BAD_BODY",
            ),
            (
                ApiRequest {
                    method: http::Method::POST,
                    path: "/v1/refresh".into(),
                    query: Some("wait=maybe".into()),
                    ..ApiRequest::default()
                },
                400,
                "BAD_QUERY",
            ),
        ];
        for (req, status, code) in cases {
            let label = format!("{} {}", req.method, req.path);
            let r = handle(req, &state, &token).await;
            assert_eq!(r.status, status, "{label}");
            assert_eq!(r.json_body()["code"], code, "{label}");
            assert!(
                r.json_body()["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty())
            );
        }
        let r = handle(get("/v1/raw-data", None, None), &state, &token).await;
        assert_eq!(r.allow, Some("PUT"));
    }

    #[tokio::test]
    async fn raw_data_is_stored_and_triggers_a_refresh_only_without_a_fresh_authinfo() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = state(dir.path());
        let token = CancellationToken::new();
        let put = |raw: &str| ApiRequest {
            method: http::Method::PUT,
            path: "/v1/raw-data".into(),
            body: serde_json::to_vec(&serde_json::json!({ "raw_data": raw }))
                .expect("json")
                .into(),
            ..ApiRequest::default()
        };
        let r = handle(put("R1"), &state, &token).await;
        assert_eq!(r.status, 202);
        assert_eq!(r.json_body()["refresh_triggered"], true);
        assert_eq!(state.store.raw_data().expect("stored").value, "R1");
        assert!(state.refresh_pending());
        state.begin_refresh();
        state.abandon_refresh();
        publish(&state, "A", unix_now());
        let r = handle(put("R2"), &state, &token).await;
        assert_eq!(r.json_body()["refresh_triggered"], false);
        assert!(!state.refresh_pending());
        assert_eq!(state.store.raw_data().expect("stored").value, "R2");
    }

    #[tokio::test]
    async fn healthz_follows_validity_and_metrics_are_prometheus_text() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = state(dir.path());
        let token = CancellationToken::new();
        assert_eq!(
            handle(get("/healthz", None, None), &state, &token)
                .await
                .status,
            503
        );
        publish(&state, "A", unix_now() - 5000);
        let r = handle(get("/healthz", None, None), &state, &token).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json_body()["authinfo_state"], "stale");
        publish(&state, "B", unix_now() - 8000);
        assert_eq!(
            handle(get("/healthz", None, None), &state, &token)
                .await
                .status,
            503
        );
        let m = handle(get("/metrics", None, None), &state, &token).await;
        assert_eq!(m.content_type, "text/plain; version=0.0.4; charset=utf-8");
        let text = String::from_utf8(m.body.to_vec()).expect("utf8");
        assert!(text.contains("authinfod_authinfo_present 1"), "{text}");
        assert!(
            text.contains("authinfod_socket_requests_total{route=\"/healthz\",status=\"503\"} 2"),
            "{text}"
        );
        assert!(
            !text.contains("\"B\""),
            "the secret never appears in metrics"
        );
    }

    #[test]
    fn etag_matching_handles_lists_weak_tags_and_star() {
        assert!(etag_matches("\"a\"", "\"a\""));
        assert!(etag_matches("\"x\", W/\"a\"", "\"a\""));
        assert!(etag_matches("*", "\"a\""));
        assert!(!etag_matches("\"b\"", "\"a\""));
        assert_eq!(query_param(Some("a=1&wait=5"), "wait"), Some("5"));
        assert_eq!(query_param(Some("wait"), "wait"), Some(""));
        assert_eq!(query_param(None, "wait"), None);
    }

    #[test]
    fn waiting_requests_are_the_long_polls_and_refresh_waits() {
        let post = |query: &str| ApiRequest {
            method: http::Method::POST,
            path: "/v1/refresh".into(),
            query: Some(query.into()),
            ..ApiRequest::default()
        };
        assert!(waits(&get("/v1/authinfo", Some("wait=30"), None)));
        assert!(!waits(&get("/v1/authinfo", Some("wait=0"), None)));
        assert!(!waits(&get("/v1/authinfo", None, None)));
        assert!(waits(&post("wait=true")));
        assert!(!waits(&post("wait=false")));
        assert!(!waits(&get("/v1/status", Some("wait=30"), None)));
    }
}
