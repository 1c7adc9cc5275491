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
use super::state::StatusDoc;

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
    pub fn json(&self) -> Result<serde_json::Value, ClientError> {
        serde_json::from_slice(&self.body).map_err(|e| ClientError::Malformed(e.to_string()))
    }

    /// Turns a non-2xx answer into [`ClientError::Refused`].
    pub fn ok(self) -> Result<Self, ClientError> {
        if (200..300).contains(&self.status) {
            return Ok(self);
        }
        let body: serde_json::Value = serde_json::from_slice(&self.body).unwrap_or_default();
        Err(ClientError::Refused {
            status: self.status,
            code: body["code"].as_str().unwrap_or("").to_owned(),
            message: body["message"].as_str().map_or_else(
                || String::from_utf8_lossy(&self.body).into_owned(),
                str::to_owned,
            ),
        })
    }
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
fn ago(seconds: i64) -> String {
    let d = crate::units::format_duration(Duration::from_secs(seconds.unsigned_abs()));
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
        ago(doc.uptime_seconds as i64)
    );
    match (&a.fingerprint, a.age_seconds, a.runway_seconds) {
        (Some(fp), Some(age), Some(runway)) => {
            let _ = writeln!(
                out,
                "authinfo  {} (fingerprint {fp}), fetched {} ago, {} ({}, {})",
                a.state.to_uppercase(),
                ago(age as i64),
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
    let mut line = format!("refresh   every {}", ago(r.interval_seconds as i64));
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
        let _ = write!(line, "; next in {}", ago(n));
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
    if let Some(checks) = doc.device.as_object() {
        for (name, check) in checks {
            let state = check["state"].as_str().unwrap_or("?");
            let detail = match state {
                "ok" => describe_check(name, &check["value"]),
                "error" => format!("ERROR: {}", check["last_error"].as_str().unwrap_or("?")),
                "not_configured" => "not configured".to_owned(),
                _ => "not fetched yet".to_owned(),
            };
            let stale_error = match (state, check["last_error"].as_str()) {
                ("ok", Some(e)) => format!(" (last check failed: {e})"),
                _ => String::new(),
            };
            let fetched = check["fetched_at"]
                .as_str()
                .map(|t| format!(", fetched {t}"))
                .unwrap_or_default();
            let _ = writeln!(out, "health    {name}: {detail}{fetched}{stale_error}");
        }
    }
    out
}

fn describe_check(name: &str, value: &serde_json::Value) -> String {
    let s = |k: &str| value[k].as_str().unwrap_or("?").to_owned();
    match name {
        "inspection" => {
            let mut d = s("result");
            for key in ["errors", "warnings"] {
                if let Some(list) = value[key].as_array().filter(|l| !l.is_empty()) {
                    let items: Vec<&str> = list.iter().filter_map(|v| v.as_str()).collect();
                    let _ = write!(d, "; {key}: {}", items.join(", "));
                }
            }
            d
        }
        "alipay_binding" => format!(
            "{} merchant, pid {}, shop {}{}",
            s("merchant_type"),
            s("pid"),
            s("shop_id"),
            value["smid"]
                .as_str()
                .map(|m| format!(", smid {m}"))
                .unwrap_or_default()
        ),
        "licence" => {
            let days = value["days_left"].as_i64();
            format!(
                "valid {} to {}{}",
                s("begin_day"),
                s("expired_day"),
                days.map(|d| if d < 0 {
                    " (LAPSED)".to_owned()
                } else {
                    format!(" ({d} days left)")
                })
                .unwrap_or_default()
            )
        }
        _ => value.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ago_keeps_two_units() {
        assert_eq!(ago(4000), "1h6m");
        assert_eq!(ago(59), "59s");
        assert_eq!(ago(90061), "1d1h");
    }
}
