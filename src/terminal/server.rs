//! The Unix socket server: binds the socket (a path with mode and group, or a Linux abstract
//! name), checks every connection's peer credentials, and runs HTTP/1.1 connections that call
//! [`api::handle`].
//!
//! Owns: transport limits (header buffer, body size, connection cap, idle and header timeouts),
//! peer-credential enforcement, graceful drain and removing the socket file at the end. It must
//! not decide answers; the API does.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use tokio::io::AsyncWriteExt as _;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::api::{self, ApiError, ApiRequest, ApiResponse};
use super::config::{SocketAddress, SocketConfig};
use super::state::{Heartbeats, State};

/// A client must send a request's headers within this long of the connection going idle; it
/// is also the keep-alive idle timeout (hyper starts it when it waits for the next request).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest buffered request head (hyper's minimum is 8 KiB).
const MAX_HEAD: usize = 16 * 1024;
/// How long in-flight requests may run after shutdown starts.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the accept loop reports in to the watchdog while idle.
const HEARTBEAT: Duration = Duration::from_secs(5);

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot bind the socket {address}")]
    Bind {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("another process is serving on {path}; refusing to take it over")]
    InUse { path: PathBuf },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("cannot set mode {mode:o} on {path}")]
    Mode {
        path: PathBuf,
        mode: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot give {path} to group {group}")]
    Group {
        path: PathBuf,
        group: String,
        #[source]
        source: std::io::Error,
    },
}

/// A bound socket, ready to serve.
#[derive(Debug)]
pub struct SocketServer {
    listener: UnixListener,
    address: SocketAddress,
}

impl SocketServer {
    /// Binds the configured socket. A stale socket file (nobody answering) is replaced; a live
    /// one, or a file that is not a socket, is an error.
    pub async fn bind(config: &SocketConfig) -> Result<Self, ServerError> {
        let listener = match &config.address {
            SocketAddress::Path(path) => bind_path(path, config).await?,
            SocketAddress::Abstract(name) => bind_abstract(name)?,
        };
        Ok(Self {
            listener,
            address: config.address.clone(),
        })
    }

    pub fn address(&self) -> &SocketAddress {
        &self.address
    }

    /// Serves until `shutdown` is cancelled, then drains and removes the socket file.
    pub async fn serve(self, state: Arc<State>, shutdown: CancellationToken) {
        let permits = Arc::new(Semaphore::new(state.config.socket.max_connections));
        let beat = || {
            Heartbeats::beat(
                &state.heartbeats.socket,
                tokio::time::Instant::now(),
                state.started,
            );
        };
        let tick = crate::serve::Tick {
            every: HEARTBEAT,
            call: &beat,
        };
        let still_open = crate::serve::accept_loop(
            &self.listener,
            &shutdown,
            Some(tick),
            DRAIN_TIMEOUT,
            |stream, _| -> Option<crate::serve::Connection> {
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    state
                        .metrics
                        .connections_over_cap
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        max_connections = state.config.socket.max_connections,
                        "socket connection refused: at the connection limit"
                    );
                    return Some(Box::pin(refuse_busy(stream)));
                };
                let (state, shutdown) = (state.clone(), shutdown.clone());
                Some(Box::pin(async move {
                    state
                        .metrics
                        .connections_open
                        .fetch_add(1, Ordering::Relaxed);
                    serve_connection(stream, &state, &shutdown).await;
                    state
                        .metrics
                        .connections_open
                        .fetch_sub(1, Ordering::Relaxed);
                    drop(permit);
                }))
            },
        )
        .await;
        if still_open > 0 {
            tracing::warn!(
                open = still_open,
                "socket connections still open after the drain timeout"
            );
        }
        if let SocketAddress::Path(path) = &self.address {
            let _ = std::fs::remove_file(path);
        }
        tracing::info!(socket = %self.address, "socket server stopped");
    }
}

async fn bind_path(
    path: &std::path::Path,
    config: &SocketConfig,
) -> Result<UnixListener, ServerError> {
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ServerError::NotASocket {
                path: path.to_owned(),
            });
        }
        if UnixStream::connect(path).await.is_ok() {
            return Err(ServerError::InUse {
                path: path.to_owned(),
            });
        }
        tracing::info!(socket = %path.display(), "removing a stale socket file");
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path).map_err(|source| ServerError::Bind {
        address: path.display().to_string(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(config.mode)).map_err(
        |source| ServerError::Mode {
            path: path.to_owned(),
            mode: config.mode,
            source,
        },
    )?;
    if let Some((group, gid)) = &config.group {
        std::os::unix::fs::chown(path, None, Some(*gid)).map_err(|source| ServerError::Group {
            path: path.to_owned(),
            group: group.clone(),
            source,
        })?;
    }
    Ok(listener)
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn bind_abstract(name: &str) -> Result<UnixListener, ServerError> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt as _;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt as _;
    let bind_err = |source| ServerError::Bind {
        address: format!("@{name}"),
        source,
    };
    let addr =
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).map_err(bind_err)?;
    let std_listener = std::os::unix::net::UnixListener::bind_addr(&addr).map_err(bind_err)?;
    std_listener.set_nonblocking(true).map_err(bind_err)?;
    UnixListener::from_std(std_listener).map_err(bind_err)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn bind_abstract(name: &str) -> Result<UnixListener, ServerError> {
    Err(ServerError::Bind {
        address: format!("@{name}"),
        source: std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "abstract sockets need Linux",
        ),
    })
}

/// Answers a connection over the cap with a 503 and closes it.
async fn refuse_busy(mut stream: UnixStream) {
    let body = ApiError::Busy.response().body;
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&body).await?;
        stream.shutdown().await
    })
    .await;
}

async fn serve_connection(stream: UnixStream, state: &Arc<State>, shutdown: &CancellationToken) {
    let denied = match stream.peer_cred() {
        Ok(cred) => {
            let (uid, gid) = (cred.uid(), cred.gid());
            let allowed = state.config.socket.allowed_uids.contains(&uid)
                || state.config.socket.allowed_gids.contains(&gid);
            if !allowed {
                state.metrics.peers_denied.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    message_id = crate::events::PEER_DENIED,
                    peer_uid = uid,
                    peer_gid = gid,
                    peer_pid = cred.pid(),
                    "socket peer denied: not in socket.allowed_uids or socket.allowed_gids"
                );
            }
            (!allowed).then_some((uid, gid))
        }
        Err(error) => {
            tracing::warn!(%error, "cannot read socket peer credentials; denying");
            Some((u32::MAX, u32::MAX))
        }
    };
    let service = {
        let (state, shutdown) = (state.clone(), shutdown.clone());
        hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let (state, shutdown) = (state.clone(), shutdown.clone());
            async move {
                let response = match denied {
                    Some((uid, gid)) => {
                        let r = ApiError::PeerDenied { uid, gid }.response();
                        state
                            .metrics
                            .count_request(super::doc::Route::label(req.uri().path()), r.status);
                        r
                    }
                    None => match read_request(req).await {
                        Ok(req) => api::handle(req, &state, &shutdown).await,
                        Err(e) => e.response(),
                    },
                };
                Ok::<_, Infallible>(to_hyper(response))
            }
        })
    };
    let limits = crate::serve::Http1Limits {
        header_read_timeout: HEADER_READ_TIMEOUT,
        max_head: MAX_HEAD,
        keep_alive: denied.is_none(),
    };
    crate::serve::http1(stream, service, limits, shutdown).await;
}

/// Reads a request's head and body (bounded) into an [`ApiRequest`].
async fn read_request(req: hyper::Request<Incoming>) -> Result<ApiRequest, ApiError> {
    let (parts, body) = req.into_parts();
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > api::MAX_BODY) {
        return Err(ApiError::BodyTooLarge);
    }
    let body = Limited::new(body, api::MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                ApiError::BodyTooLarge
            } else {
                ApiError::BadBody(e.to_string())
            }
        })?
        .to_bytes();
    Ok(ApiRequest {
        method: parts.method,
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        if_none_match: parts
            .headers
            .get(http::header::IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body,
    })
}

fn to_hyper(r: ApiResponse) -> hyper::Response<Full<bytes::Bytes>> {
    use http::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, ETAG, HeaderValue};
    let has_body = !r.body.is_empty();
    let mut response = hyper::Response::new(Full::new(bytes::Bytes::from(r.body)));
    *response.status_mut() =
        http::StatusCode::from_u16(r.status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if has_body {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(r.content_type));
    }
    // The ETag is made of hex digits and quotes, always a valid header value; should that
    // ever change, the answer goes out without the ETag rather than not at all.
    if let Some(etag) = r.etag.and_then(|e| HeaderValue::from_str(&e).ok()) {
        headers.insert(ETAG, etag);
    }
    if let Some(allow) = r.allow {
        headers.insert(ALLOW, HeaderValue::from_static(allow));
    }
    response
}
