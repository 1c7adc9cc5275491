//! The Unix socket server: binds the socket (a path with mode and group, or a Linux abstract
//! name), checks every connection's peer credentials, and runs HTTP/1.1 connections that call
//! [`api::handle`].
//!
//! Owns: the peer-credential check at accept, the transport limits (header buffer, body size,
//! first-byte and idle timeouts) and carrying out [`super::admission`]'s decisions (403 and 503
//! answers, closing evicted connections), rate-limited logs about them, half-closed clients,
//! graceful drain and removing the socket file at the end. It must not decide answers; the API
//! does.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use tokio::net::{UnixListener, UnixStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::admission::{Admission, LogThrottle, Pending, Slot};
use super::api::{self, ApiError, ApiRequest, ApiResponse};
use super::config::{SocketAddress, SocketConfig, SocketLimits};
use super::doc::Route;
use super::metrics::{Busy, Closed, Denial};
use super::state::{Heartbeats, State};

/// Largest buffered request head (hyper's minimum is 8 KiB).
const MAX_HEAD: usize = 16 * 1024;
/// How long in-flight requests may run after shutdown starts.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the accept loop reports in to the watchdog while idle (and logs the counts of
/// throttled lines whose interval ended).
const HEARTBEAT: Duration = Duration::from_secs(5);
/// One log line per peer per this long about its denials, and one about its 503s.
const LOG_INTERVAL: Duration = Duration::from_secs(60);
/// How long a connection answered without being served (403, 503) may take to read the answer.
const ANSWER_LINGER: Duration = Duration::from_secs(1);
/// Files the daemon keeps open besides socket connections (the store, the listener, logs).
const OTHER_FILES: usize = 64;

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
        let limits = state.config.socket.limits;
        raise_open_files_limit(&limits);
        let socket = Arc::new(Socket {
            admission: Admission::new(limits),
            denials: LogThrottle::new(LOG_INTERVAL),
            refusals: LogThrottle::new(LOG_INTERVAL),
            state,
            shutdown,
        });
        let beat = || {
            Heartbeats::beat(
                &socket.state.heartbeats.socket,
                Instant::now(),
                socket.state.started,
            );
            socket.log_counts(false);
        };
        let tick = crate::serve::Tick {
            every: HEARTBEAT,
            call: &beat,
        };
        let still_open = crate::serve::accept_loop(
            &self.listener,
            &socket.shutdown,
            Some(tick),
            DRAIN_TIMEOUT,
            |stream, _| socket.admit(stream),
        )
        .await;
        socket.log_counts(true);
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

// === admission and connections ===

/// What every connection task shares: the state, the admission table, the log throttles and
/// the shutdown trigger.
struct Socket {
    state: Arc<State>,
    admission: Arc<Admission>,
    /// Denied peers' log lines, by uid.
    denials: LogThrottle,
    /// 503 `BUSY` log lines, by uid.
    refusals: LogThrottle,
    shutdown: CancellationToken,
}

/// Who is on the other end of a connection.
enum Peer {
    Allowed { uid: u32 },
    Denied(Refused),
}

/// A denied peer, as its 403 and its log line name it.
struct Refused {
    reason: Denial,
    uid: u32,
    gid: u32,
    pid: Option<i32>,
}

impl Socket {
    /// Checks a connection's peer at accept, before it can take anything: a denied peer is
    /// answered 403 from its own small budget (or closed), never given a slot; an allowed one
    /// waits, holding no slot, for its first byte.
    fn admit(self: &Arc<Self>, stream: UnixStream) -> Option<crate::serve::Connection> {
        match self.peer(&stream) {
            Peer::Denied(refused) => {
                self.state.metrics.count_denial(refused.reason);
                self.log_denial(&refused);
                let Some(budget) = self.admission.try_deny() else {
                    self.state.metrics.count_closed(Closed::DeniedUnanswered);
                    return None;
                };
                let response = ApiError::PeerDenied {
                    uid: refused.uid,
                    gid: refused.gid,
                }
                .response();
                Some(Box::pin(async move {
                    answer_and_close(&stream, &response).await;
                    drop(budget);
                }))
            }
            Peer::Allowed { uid } => match peek_now(&stream) {
                // Its request is there already: straight to a slot.
                Arrived::Data => Some(Box::pin(self.clone().serve_in_slot(stream, uid))),
                Arrived::Nothing => {
                    let pending = self.admission.enter_pending(uid);
                    Some(Box::pin(self.clone().serve_silent(stream, uid, pending)))
                }
                Arrived::Closed => None,
            },
        }
    }

    fn peer(&self, stream: &UnixStream) -> Peer {
        match stream.peer_cred() {
            Ok(cred) => {
                let (uid, gid) = (cred.uid(), cred.gid());
                // The allow-list of now: a reload (SIGHUP) may have replaced it.
                if self.state.peers().allow(uid, gid) {
                    Peer::Allowed { uid }
                } else {
                    Peer::Denied(Refused {
                        reason: Denial::NotAllowed,
                        uid,
                        gid,
                        pid: cred.pid(),
                    })
                }
            }
            Err(error) => {
                tracing::debug!(%error, "cannot read socket peer credentials");
                Peer::Denied(Refused {
                    reason: Denial::NoCredentials,
                    uid: u32::MAX,
                    gid: u32::MAX,
                    pid: None,
                })
            }
        }
    }

    fn log_denial(&self, r: &Refused) {
        let Some(unlogged) = self.denials.event(r.uid, Instant::now()) else {
            return;
        };
        match r.reason {
            Denial::NotAllowed => tracing::warn!(
                message_id = crate::events::PEER_DENIED,
                peer_uid = r.uid,
                peer_gid = r.gid,
                peer_pid = r.pid,
                denied_unlogged = unlogged,
                interval_seconds = self.denials.interval().as_secs(),
                "socket peer denied: not in socket.allowed_uids or socket.allowed_gids (one line per peer per interval)"
            ),
            Denial::NoCredentials => tracing::warn!(
                message_id = crate::events::PEER_DENIED,
                denied_unlogged = unlogged,
                interval_seconds = self.denials.interval().as_secs(),
                "socket peer denied: its credentials cannot be read (one line per interval)"
            ),
        }
    }

    fn log_refusal(&self, uid: u32, reason: Busy) {
        let Some(unlogged) = self.refusals.event(uid, Instant::now()) else {
            return;
        };
        let limits = self.admission.limits();
        tracing::warn!(
            peer_uid = uid,
            limit = ?reason,
            max_connections = limits.max_connections,
            max_connections_per_uid = limits.max_connections_per_uid,
            max_waiting_requests = limits.max_waiting_requests,
            busy_unlogged = unlogged,
            interval_seconds = self.refusals.interval().as_secs(),
            "socket request answered 503 BUSY: at a connection limit (one line per peer per interval)"
        );
    }

    /// Logs the counts of denials and refusals not logged yet: those whose interval ended, or
    /// (at shutdown, `all`) every one.
    fn log_counts(&self, all: bool) {
        let now = Instant::now();
        let (denials, refusals) = if all {
            (self.denials.drain(), self.refusals.drain())
        } else {
            (self.denials.due(now), self.refusals.due(now))
        };
        for (uid, count) in denials {
            tracing::warn!(
                message_id = crate::events::PEER_DENIED,
                peer_uid = uid,
                denied = count,
                "socket peer denied again since its last line"
            );
        }
        for (uid, count) in refusals {
            tracing::warn!(
                peer_uid = uid,
                busy = count,
                "socket requests answered 503 BUSY since the last line"
            );
        }
    }

    /// A silent connection: waits, holding no slot, up to `first_byte_timeout` for its first
    /// byte, then is served like any other. Its own future stays small (the slot's part is
    /// boxed), since a flood can keep `max_pending_connections` of them open.
    async fn serve_silent(self: Arc<Self>, stream: UnixStream, uid: u32, pending: Pending) {
        let metrics = &self.state.metrics;
        let gauge = Gauge::up(&metrics.connections_pending);
        let timeout = self.admission.limits().first_byte_timeout;
        tokio::select! {
            biased;
            () = self.shutdown.cancelled() => return,
            () = pending.evicted() => {
                metrics.count_closed(Closed::EvictedPending);
                return;
            }
            first = tokio::time::timeout(timeout, first_byte(&stream)) => match first {
                Ok(true) => {}
                Ok(false) => return,
                Err(_) => {
                    metrics.count_closed(Closed::FirstByteTimeout);
                    return;
                }
            },
        }
        drop((gauge, pending));
        Box::pin(self.clone().serve_in_slot(stream, uid)).await;
    }

    /// A connection that has sent a byte: takes a slot (or answers 503 `BUSY`) and is served by
    /// hyper until it closes, times out, is evicted for a newer one, or the daemon stops.
    async fn serve_in_slot(self: Arc<Self>, stream: UnixStream, uid: u32) {
        let metrics = &self.state.metrics;
        let limits = *self.admission.limits();
        let slot = match self.admission.take_slot(uid) {
            Ok(slot) => slot,
            Err(reason) => {
                metrics.count_busy(reason);
                self.log_refusal(uid, reason);
                // Lingering 503s are bounded like silent connections; past that, closed at once.
                if let Some(_lingering) = self.admission.try_linger() {
                    answer_and_close(&stream, &ApiError::Busy.response()).await;
                }
                return;
            }
        };
        let _open = Gauge::up(&metrics.connections_open);
        let connection = Arc::new(Connection {
            socket: self.clone(),
            stream: Arc::new(stream),
            slot,
            uid,
        });
        let service = {
            let connection = connection.clone();
            hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                connection.slot.busy();
                connection.clone().answer(req)
            })
        };
        let http = crate::serve::Http1Limits {
            header_read_timeout: limits.idle_timeout,
            max_head: MAX_HEAD,
            keep_alive: true,
            half_close: true,
        };
        let io = SharedStream(connection.stream.clone());
        tokio::select! {
            () = crate::serve::http1(io, service, http, &self.shutdown) => {}
            () = connection.slot.evicted() => metrics.count_closed(Closed::EvictedIdle),
        }
    }
}

/// A connection holding a slot, as its requests see it.
struct Connection {
    socket: Arc<Socket>,
    stream: Arc<UnixStream>,
    slot: Slot,
    uid: u32,
}

/// The client went away while its request waited; hyper then closes the connection.
#[derive(Debug, thiserror::Error)]
#[error("the client hung up while its request waited")]
struct HungUp;

impl Connection {
    /// Answers one request (the slot is busy until it returns).
    async fn answer(
        self: Arc<Self>,
        req: hyper::Request<Incoming>,
    ) -> Result<hyper::Response<Full<bytes::Bytes>>, HungUp> {
        let socket = &self.socket;
        let state = &socket.state;
        let result = match read_request(req).await {
            Err(e) => Ok(e.response()),
            Ok(req) if api::waits(&req) => match socket.admission.try_wait() {
                None => {
                    state.metrics.count_busy(Busy::WaitingRequests);
                    socket.log_refusal(self.uid, Busy::WaitingRequests);
                    let r = ApiError::Busy.response();
                    state
                        .metrics
                        .count_request(Route::from_path(&req.path), r.status);
                    Ok(r)
                }
                Some(waiting) => {
                    let _gauge = Gauge::up(&state.metrics.requests_waiting);
                    // A waiting request is the one time the daemon is not reading: it watches
                    // for the client hanging up, so an abandoned long-poll does not keep its
                    // place for minutes.
                    let answer = tokio::select! {
                        biased;
                        r = api::handle(req, state, &socket.shutdown) => Ok(r),
                        () = hung_up(&self.stream) => Err(HungUp),
                    };
                    drop(waiting);
                    answer
                }
            },
            Ok(req) => Ok(api::handle(req, state, &socket.shutdown).await),
        };
        self.slot.idle();
        result.map(to_hyper)
    }
}

/// Counts one in a gauge while it lives.
struct Gauge<'a>(&'a AtomicU64);

impl<'a> Gauge<'a> {
    fn up(gauge: &'a AtomicU64) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        Self(gauge)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a connection has sent by the time it is accepted.
enum Arrived {
    Data,
    Nothing,
    Closed,
}

/// Looks, without waiting or taking anything, whether the client's first bytes are there.
fn peek_now(stream: &UnixStream) -> Arrived {
    use nix::sys::socket::{MsgFlags, recv};
    use std::os::fd::AsRawFd as _;
    let mut byte = [0u8; 1];
    match recv(
        stream.as_raw_fd(),
        &mut byte,
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
    ) {
        Ok(0) => Arrived::Closed,
        Ok(_) => Arrived::Data,
        Err(nix::errno::Errno::EAGAIN) => Arrived::Nothing,
        Err(_) => Arrived::Closed,
    }
}

/// Waits until the client has sent something (true) or closed without a byte (false). Tokio's
/// readiness may be a false positive (a new connection reads as readable), so a peek decides.
async fn first_byte(stream: &UnixStream) -> bool {
    matches!(peek(stream).await, Ok(n) if n > 0)
}

/// Resolves when the peer has closed its end entirely; stays pending while it only half-closed
/// (it still waits for its answer) or sent more (a pipelined request waits its turn).
async fn hung_up(stream: &UnixStream) {
    match peek(stream).await {
        Ok(0) if !peer_closed(stream) => std::future::pending().await,
        Ok(0) | Err(_) => {}
        Ok(_) => std::future::pending().await,
    }
}

/// Waits for the next byte without taking it: how many are there (at most 1), 0 at the end of
/// the client's input.
async fn peek(stream: &UnixStream) -> std::io::Result<usize> {
    use nix::sys::socket::{MsgFlags, recv};
    use std::os::fd::AsRawFd as _;
    loop {
        stream.readable().await?;
        let mut byte = [0u8; 1];
        // A peek that would block clears tokio's readiness, so the next wait is a real one.
        match stream.try_io(tokio::io::Interest::READABLE, || {
            recv(
                stream.as_raw_fd(),
                &mut byte,
                MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
            )
            .map_err(std::io::Error::from)
        }) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            result => return result,
        }
    }
}

/// Whether both directions of the connection are shut: on a Unix stream socket the peer's
/// close sets that (POLLHUP) at once, its `shutdown(SHUT_WR)` only ends our reading.
fn peer_closed(stream: &UnixStream) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd as _;
    let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLOUT)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)),
        Err(_) => true,
    }
}

/// Writes `response` as a whole HTTP/1.1 answer with `connection: close`, without reading the
/// request, then lets the client read it: ends our side and reads (discarding) until the client
/// closes or [`ANSWER_LINGER`] passes, so its request is not cut off by a reset.
async fn answer_and_close(stream: &UnixStream, response: &ApiResponse) {
    let status = http::StatusCode::from_u16(response.status)
        .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    let mut bytes = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: {}\r\ncontent-length: {}\r\ncache-control: no-store\r\n{}connection: close\r\n\r\n",
        status.as_str(),
        status.canonical_reason().unwrap_or(""),
        response.content_type,
        response.body.len(),
        response
            .retry_after
            .map(|secs| format!("retry-after: {secs}\r\n"))
            .unwrap_or_default(),
    )
    .into_bytes();
    bytes.extend_from_slice(&response.body);
    let _ = tokio::time::timeout(ANSWER_LINGER, async {
        let mut written = 0;
        while written < bytes.len() {
            stream.writable().await?;
            match stream.try_write(&bytes[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        shutdown_write(stream)?;
        let mut sink = [0u8; 1024];
        loop {
            stream.readable().await?;
            match stream.try_read(&mut sink) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    })
    .await;
}

fn shutdown_write(stream: &UnixStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    match nix::sys::socket::shutdown(stream.as_raw_fd(), nix::sys::socket::Shutdown::Write) {
        Ok(()) | Err(nix::errno::Errno::ENOTCONN) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// A Unix stream that the connection's requests can watch while hyper reads and writes it.
struct SharedStream(Arc<UnixStream>);

impl tokio::io::AsyncRead for SharedStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        loop {
            std::task::ready!(self.0.poll_read_ready(cx))?;
            match self.0.try_read_buf(buf) {
                Ok(_) => return std::task::Poll::Ready(Ok(())),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return std::task::Poll::Ready(Err(e)),
            }
        }
    }
}

impl tokio::io::AsyncWrite for SharedStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        loop {
            std::task::ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                result => return std::task::Poll::Ready(result),
            }
        }
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        loop {
            std::task::ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write_vectored(bufs) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                result => return std::task::Poll::Ready(result),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(shutdown_write(&self.0))
    }
}

/// Raises the soft limit on open files towards what the socket limits can hold open at once
/// (systemd and most shells start services at 1024), within the hard limit.
fn raise_open_files_limit(limits: &SocketLimits) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    // Silent connections, and as many 503 answers lingering for their clients.
    let needed = u64::try_from(
        2 * limits.max_pending_connections
            + limits.max_connections
            + limits.max_denied_connections
            + OTHER_FILES,
    )
    .unwrap_or(u64::MAX);
    let Ok((soft_limit, hard_limit)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    // `rlim_t` is 32 bits on 32-bit ARM glibc (armv7 terminals), 64 elsewhere.
    #[allow(clippy::useless_conversion)]
    let (soft, hard) = (u64::from(soft_limit), u64::from(hard_limit));
    if soft >= needed {
        return;
    }
    let raised = needed.min(hard);
    // At most the hard limit, so it fits the type the hard limit came in.
    #[allow(clippy::useless_conversion)]
    let new_soft = raised.try_into().unwrap_or(hard_limit);
    match setrlimit(Resource::RLIMIT_NOFILE, new_soft, hard_limit) {
        Ok(()) if raised >= needed => {
            tracing::info!(
                from = soft,
                to = raised,
                "raised the open files limit for the socket limits"
            );
        }
        Ok(()) => tracing::warn!(
            from = soft,
            to = raised,
            needed,
            "the hard open files limit is below what the socket limits can hold open; accepts may fail at it"
        ),
        Err(error) => tracing::warn!(%error, soft, needed, "cannot raise the open files limit"),
    }
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
    use http::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, ETAG, HeaderValue, RETRY_AFTER};
    let has_body = !r.body.is_empty();
    let mut response = hyper::Response::new(Full::new(r.body));
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
    if let Some(secs) = r.retry_after {
        headers.insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}
