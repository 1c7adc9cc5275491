//! The one accept, serve and drain loop: the daemon's Unix socket and the proxy's (and the
//! sandbox's) HTTPS listeners run their connections through it.
//!
//! Owns: accepting until shutdown (backing off briefly when accept fails, e.g. EMFILE), tracking
//! every connection task, driving one HTTP/1.1 connection with its limits and graceful shutdown
//! ([`http1`]), and the bounded drain at the end. It must not decide who is served: the caller's
//! `admit` sees each accepted connection first and returns the future that serves it, or `None`
//! to drop it.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A connection task, as `admit` hands it over.
pub type Connection = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// How long to wait after a failed accept (descriptors exhausted, ...) before the next one.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A listener the loop accepts from.
pub trait Listener {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    type Peer;
    fn accept(&self) -> impl Future<Output = std::io::Result<(Self::Io, Self::Peer)>> + Send;
}

impl Listener for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    type Peer = tokio::net::unix::SocketAddr;
    fn accept(&self) -> impl Future<Output = std::io::Result<(Self::Io, Self::Peer)>> + Send {
        tokio::net::UnixListener::accept(self)
    }
}

impl Listener for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    type Peer = std::net::SocketAddr;
    fn accept(&self) -> impl Future<Output = std::io::Result<(Self::Io, Self::Peer)>> + Send {
        tokio::net::TcpListener::accept(self)
    }
}

/// A periodic call while the loop runs (the daemon's watchdog heartbeat): it proves the accept
/// loop itself is alive, not just the runtime.
pub struct Tick<'a> {
    pub every: Duration,
    pub call: &'a (dyn Fn() + Sync),
}

/// Accepts from `listener` until `shutdown`, spawning what `admit` returns for each connection;
/// then waits up to `drain` for the open connections to finish (they see `shutdown` too) and
/// returns how many were still open.
pub async fn accept_loop<L: Listener>(
    listener: &L,
    shutdown: &CancellationToken,
    tick: Option<Tick<'_>>,
    drain: Duration,
    mut admit: impl FnMut(L::Io, L::Peer) -> Option<Connection>,
) -> usize {
    let tracker = TaskTracker::new();
    let mut ticker = tick.as_ref().map(|t| tokio::time::interval(t.every));
    loop {
        let next_tick = async {
            match ticker.as_mut() {
                Some(t) => t.tick().await,
                None => std::future::pending().await,
            }
        };
        let (io, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            _ = next_tick => {
                if let Some(t) = &tick {
                    (t.call)();
                }
                continue;
            }
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(error) => {
                    tracing::warn!(%error, "accept failed; retrying shortly");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        if let Some(connection) = admit(io, peer) {
            tracker.spawn(connection);
        }
    }
    tracker.close();
    if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
        return tracker.len();
    }
    0
}

/// The limits of one HTTP/1.1 connection.
#[derive(Debug, Clone, Copy)]
pub struct Http1Limits {
    /// How long a client may take to send a request head; also the keep-alive idle timeout
    /// (hyper starts it when it waits for the next request).
    pub header_read_timeout: Duration,
    /// Largest buffered request head.
    pub max_head: usize,
    /// Whether the connection may serve more than one request.
    pub keep_alive: bool,
    /// Whether a client that ends its sending side (`shutdown(SHUT_WR)`) after its request still
    /// gets the answer. Without it hyper takes the end of input for a hang-up and drops the
    /// request; with it, it stops reading while a request is answered, so it no longer notices
    /// a client that leaves (a server with long waits watches for that itself).
    pub half_close: bool,
}

/// Serves one HTTP/1.1 connection until it ends, or until `shutdown`, when it finishes the
/// request in flight and closes.
pub async fn http1<I, S, B>(io: I, service: S, limits: Http1Limits, shutdown: &CancellationToken)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<B>,
        > + Send,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_head)
        .keep_alive(limits.keep_alive)
        .half_close(limits.half_close);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(error) = result {
                tracing::debug!(%error, "connection ended with an error");
            }
        }
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
