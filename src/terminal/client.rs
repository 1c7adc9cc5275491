//! The client commands (`status`, `get`, `refresh`, `put-raw-data`): HTTP/1.1 over the same
//! Unix socket the face app uses, so they see exactly what it sees.
//!
//! Owns: the request, and rendering the answers for people. It must not read the store or the
//! key: an operator needs only to be allowed on the socket.

use std::fmt::Write as _;
use std::time::Duration;

use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

use super::config::SocketAddress;
use super::doc::{
    AgeBasis, AuthinfoDoc, CheckDoc, CheckState, DeviceDoc, ErrorDoc, RawDataAccepted, RawDataBody,
    RefreshDone, Route, StatusDoc, StoreState,
};

/// How long a client command waits for the daemon (a `refresh --wait` waits for the refresh).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a client command failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to authinfod at {address} (is it running? is this user allowed?)")]
    Connect {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to authinfod failed")]
    Http(#[source] hyper::Error),
    #[error(
        "authinfod did not answer within {}",
        crate::units::format_duration(CLIENT_TIMEOUT)
    )]
    Timeout,
    #[error("authinfod answered {status}: {message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
        /// With a 429: the seconds until the daemon allows it (`retry_after_seconds`).
        retry_after_seconds: Option<u64>,
    },
    #[error("authinfod's answer is malformed: {0}")]
    Malformed(String),
}

/// An answer from the daemon.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Answer {
    /// The body as the document `T`.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, ClientError> {
        serde_json::from_slice(&self.body).map_err(|e| ClientError::Malformed(e.to_string()))
    }

    /// Turns a non-2xx answer into [`ClientError::Refused`].
    pub fn ok(self) -> Result<Self, ClientError> {
        if (200..300).contains(&self.status) {
            return Ok(self);
        }
        Err(match serde_json::from_slice::<ErrorDoc>(&self.body) {
            Ok(e) => ClientError::Refused {
                status: self.status,
                code: e.code,
                message: e.message,
                retry_after_seconds: e.retry_after_seconds,
            },
            Err(_) => ClientError::Refused {
                status: self.status,
                code: String::new(),
                message: String::from_utf8_lossy(&self.body).into_owned(),
                retry_after_seconds: None,
            },
        })
    }
}

// === the commands' requests ===

/// `GET /v1/status`.
pub async fn status(address: &SocketAddress) -> Result<StatusDoc, ClientError> {
    request(address, http::Method::GET, Route::Status.path(), None)
        .await?
        .ok()?
        .json()
}

/// `GET /v1/authinfo`: the held authinfo, or `None` before the first success (503).
pub async fn authinfo(address: &SocketAddress) -> Result<Option<AuthinfoDoc>, ClientError> {
    let answer = request(address, http::Method::GET, Route::Authinfo.path(), None).await?;
    if answer.status == 503 {
        return Ok(None);
    }
    answer.ok()?.json().map(Some)
}

/// `POST /v1/refresh?wait=true`: the new authinfo's summary, or the failure.
pub async fn refresh_and_wait(address: &SocketAddress) -> Result<RefreshDone, ClientError> {
    let path = format!("{}?wait=true", Route::Refresh.path());
    request(address, http::Method::POST, &path, None)
        .await?
        .ok()?
        .json()
}

/// `POST /v1/refresh`: asks for a refresh without waiting for it.
pub async fn request_refresh(address: &SocketAddress) -> Result<(), ClientError> {
    request(address, http::Method::POST, Route::Refresh.path(), None)
        .await?
        .ok()
        .map(drop)
}

/// `PUT /v1/raw-data`.
pub async fn put_raw_data(
    address: &SocketAddress,
    raw_data: &str,
) -> Result<RawDataAccepted, ClientError> {
    let body = serde_json::to_vec(&RawDataBody {
        raw_data: raw_data.to_owned(),
    })
    .map_err(|e| ClientError::Malformed(e.to_string()))?;
    request(
        address,
        http::Method::PUT,
        Route::RawData.path(),
        Some(body),
    )
    .await?
    .ok()?
    .json()
}

/// Connects to the daemon's socket.
pub async fn connect(address: &SocketAddress) -> Result<UnixStream, ClientError> {
    let err = |source| ClientError::Connect {
        address: address.to_string(),
        source,
    };
    match address {
        SocketAddress::Path(path) => UnixStream::connect(path).await.map_err(err),
        SocketAddress::Abstract(name) => {
            let std = connect_abstract(name).map_err(err)?;
            std.set_nonblocking(true).map_err(err)?;
            UnixStream::from_std(std).map_err(err)
        }
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn connect_abstract(name: &str) -> std::io::Result<std::os::unix::net::UnixStream> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt as _;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt as _;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    std::os::unix::net::UnixStream::connect_addr(&addr)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn connect_abstract(_name: &str) -> std::io::Result<std::os::unix::net::UnixStream> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "abstract sockets need Linux",
    ))
}

/// Sends one request and reads the whole answer.
pub async fn request(
    address: &SocketAddress,
    method: http::Method,
    path_and_query: &str,
    body: Option<Vec<u8>>,
) -> Result<Answer, ClientError> {
    let exchange = async {
        let stream = connect(address).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(ClientError::Http)?;
        let conn = tokio::spawn(conn);
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(http::header::HOST, "authinfod");
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(bytes::Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Malformed(e.to_string()))?;
        let response = sender.send_request(req).await.map_err(ClientError::Http)?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(ClientError::Http)?
            .to_bytes()
            .to_vec();
        conn.abort();
        Ok(Answer { status, body })
    };
    tokio::time::timeout(CLIENT_TIMEOUT, exchange)
        .await
        .map_err(|_| ClientError::Timeout)?
}

/// A duration in the largest two units, for people (`1h12m`, `4m5s`, `9s`).
fn ago(seconds: u64) -> String {
    let d = crate::units::format_duration(Duration::from_secs(seconds));
    let mut parts = 0;
    let mut out = String::new();
    for c in d.chars() {
        out.push(c);
        if c.is_ascii_alphabetic() {
            parts += 1;
            if parts == 2 {
                break;
            }
        }
    }
    out
}

/// Renders the status document for a person.
pub fn render_status(doc: &StatusDoc) -> String {
    let mut out = String::new();
    let a = &doc.authinfo;
    let _ = writeln!(
        out,
        "authinfod {} on device {}, up {}",
        doc.version,
        doc.device_id,
        ago(doc.uptime_seconds)
    );
    match (&a.fingerprint, a.runway_seconds) {
        (Some(fp), Some(runway)) => {
            let fetched = match (a.age_seconds, a.age_basis) {
                (Some(age), Some(AgeBasis::ProxyClock)) => {
                    format!("fetched {} ago by the proxy's clock", ago(age))
                }
                (Some(age), _) => format!("fetched {} ago", ago(age)),
                (None, _) => format!(
                    "fetched {} by a clock now set back: AGE UNKNOWN",
                    a.fetched_at.as_deref().unwrap_or("?")
                ),
            };
            let _ = writeln!(
                out,
                "authinfo  {} (fingerprint {fp}), {fetched}, {} ({}, {})",
                a.state.as_str().to_uppercase(),
                if runway > 0 {
                    format!("expires in {}", ago(runway))
                } else {
                    "EXPIRED".to_owned()
                },
                a.expires_at.as_deref().unwrap_or("?"),
                if a.expiry_from_platform == Some(true) {
                    "validity from the platform"
                } else {
                    "assumed validity"
                },
            );
        }
        _ => {
            let _ = writeln!(out, "authinfo  NONE: no authinfo has been fetched yet");
        }
    }
    let r = &doc.refresh;
    let mut line = format!("refresh   every {}", ago(r.interval_seconds));
    match (&r.last_attempt_ok, &r.last_attempt_at) {
        (Some(true), Some(at)) => {
            let _ = write!(line, "; last attempt ok at {at}");
        }
        (Some(false), Some(at)) => {
            let _ = write!(
                line,
                "; last attempt FAILED at {at}: {} ({}){}",
                r.last_error.as_deref().unwrap_or("?"),
                r.last_error_code.as_deref().unwrap_or("?"),
                if r.last_error_permanent {
                    ", not retrying until raw_data changes or the next interval"
                } else {
                    ""
                }
            );
        }
        _ => line.push_str("; no attempt yet"),
    }
    if r.consecutive_failures > 0 {
        let _ = write!(line, "; {} consecutive failure(s)", r.consecutive_failures);
    }
    if r.in_flight {
        line.push_str("; refreshing now");
    } else if let Some(w) = &r.waiting_for {
        let _ = write!(line, "; waiting for {w}");
    } else if let Some(n) = r.next_attempt_in_seconds {
        let _ = write!(line, "; next in {}", ago(n.unsigned_abs()));
    }
    if r.forced_refresh_allowed_in_seconds > 0 {
        let _ = write!(
            line,
            "; a forced refresh is allowed in {}",
            ago(r.forced_refresh_allowed_in_seconds)
        );
    }
    let _ = writeln!(out, "{line}");
    let raw = &doc.raw_data;
    let _ = writeln!(
        out,
        "raw_data  {}{}",
        if raw.present {
            format!(
                "present (from {}, received {})",
                raw.source.as_deref().unwrap_or("?"),
                raw.received_at.as_deref().unwrap_or("?")
            )
        } else {
            "MISSING: the face app must PUT /v1/raw-data".to_owned()
        },
        if raw.command_configured {
            "; raw_data_command configured"
        } else {
            ""
        }
    );
    let st = &doc.store;
    let mut line = match st.state {
        StoreState::NotPersisting => format!(
            "store     NOT PERSISTING since {}: {} (serving from memory)",
            st.not_persisting_since.as_deref().unwrap_or("?"),
            st.not_persisting_reason.as_deref().unwrap_or("?")
        ),
        StoreState::Recovered | StoreState::Ok => format!("store     {}", st.state.as_str()),
    };
    let _ = write!(
        line,
        "; generation {}, last written {}",
        st.generation,
        st.last_persist_at.as_deref().unwrap_or("not since start")
    );
    if let Some(r) = &st.last_recovery {
        let _ = write!(
            line,
            "; RECOVERED at {}: {}; restored {} ({} repair(s) since start)",
            r.at, r.damaged, r.restored, st.recoveries
        );
    }
    let _ = writeln!(out, "{line}");
    let p = &doc.proxy;
    let _ = writeln!(
        out,
        "proxy     {} {}{}",
        p.url,
        match p.reachable {
            Some(true) => "reachable",
            Some(false) => "UNREACHABLE",
            None => "not contacted yet",
        },
        p.clock_skew_seconds
            .map(|s| format!("; clock skew {s} s (proxy minus terminal)"))
            .unwrap_or_default()
    );
    render_device(&mut out, &doc.device);
    out
}

/// What `authinfod refresh` says when the daemon's forced-refresh limit refused it (429
/// `REFRESH_RATE_LIMITED`): the daemon's reason (which ends with the wait), and the time the
/// next forced refresh is allowed (`now` + the wait, UTC).
pub fn render_refresh_held(message: &str, retry_after_seconds: Option<u64>, now: i64) -> String {
    match retry_after_seconds.and_then(|s| i64::try_from(s).ok()) {
        Some(secs) => format!(
            "{message} (at {})",
            crate::units::rfc3339(now.saturating_add(secs))
        ),
        None => message.to_owned(),
    }
}

/// The health lines of the status summary.
fn render_device(out: &mut String, device: &DeviceDoc) {
    let i = &device.inspection;
    let inspection = i.value.as_ref().map(|v| {
        let mut d = v.result.as_str().to_owned();
        for (key, list) in [("errors", &v.errors), ("warnings", &v.warnings)] {
            if !list.is_empty() {
                let _ = write!(d, "; {key}: {}", list.join(", "));
            }
        }
        d
    });
    render_check(out, "inspection", i, inspection);
    let b = &device.alipay_binding;
    let binding = b.value.as_ref().map(|v| {
        format!(
            "{} merchant, pid {}, shop {}{}",
            v.merchant_type,
            v.pid,
            v.shop_id,
            v.smid
                .as_deref()
                .map(|m| format!(", smid {m}"))
                .unwrap_or_default()
        )
    });
    render_check(out, "alipay_binding", b, binding);
    let l = &device.licence;
    let licence = l.value.as_ref().map(|v| {
        format!(
            "valid {} to {}{}",
            v.licence.begin_day,
            v.licence.expired_day,
            v.days_left
                .map(|d| if d < 0 {
                    " (LAPSED)".to_owned()
                } else {
                    format!(" ({d} days left)")
                })
                .unwrap_or_default()
        )
    });
    render_check(out, "licence", l, licence);
}

fn render_check<T>(out: &mut String, name: &str, check: &CheckDoc<T>, value: Option<String>) {
    let detail = match check.state {
        CheckState::Ok => value.unwrap_or_else(|| "?".into()),
        CheckState::Error => format!("ERROR: {}", check.last_error.as_deref().unwrap_or("?")),
        CheckState::NotConfigured => "not configured".to_owned(),
        CheckState::Pending => "not fetched yet".to_owned(),
    };
    let stale_error = match (check.state, check.last_error.as_deref()) {
        (CheckState::Ok, Some(e)) => format!(" (last check failed: {e})"),
        _ => String::new(),
    };
    let fetched = check
        .fetched_at
        .as_deref()
        .map(|t| format!(", fetched {t}"))
        .unwrap_or_default();
    let _ = writeln!(out, "health    {name}: {detail}{fetched}{stale_error}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_refresh_says_when_the_next_is_allowed() {
        let text = render_refresh_held("the next forced refresh is allowed in 48s", Some(48), 0);
        assert_eq!(
            text,
            "the next forced refresh is allowed in 48s (at 1970-01-01T00:00:48Z)"
        );
        assert_eq!(render_refresh_held("m", None, 0), "m");
    }

    #[test]
    fn ago_keeps_two_units() {
        assert_eq!(ago(4000), "1h6m");
        assert_eq!(ago(0), "0s");
        assert_eq!(ago(59), "59s");
        assert_eq!(ago(90061), "1d1h");
    }
}
