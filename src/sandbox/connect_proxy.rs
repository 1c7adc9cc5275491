//! A small HTTP forward proxy that only tunnels (`CONNECT host:port`), for tests and the demo:
//! what a merchant's egress proxy (Squid, an HTTP gateway) does for the proxy's HTTPS calls.
//!
//! Owns: reading the `CONNECT` request head, checking `Proxy-Authorization: Basic` when it is
//! given credentials (407 with `Proxy-Authenticate` otherwise, as Squid answers), recording every
//! tunnel it was asked for ([`Tunnel`]), and copying bytes both ways. It must not look into the
//! tunnel: the TLS session inside is the client's and the platform's.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::lock;

/// The longest request head the proxy reads.
const MAX_HEAD: usize = 8 * 1024;
/// How long a client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`ConnectProxy::stop`] waits for the tunnels to close (they close when they see the
/// shutdown).
const TUNNEL_DRAIN: Duration = Duration::from_secs(10);

/// One `CONNECT` the proxy was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tunnel {
    /// `host:port` as asked.
    pub target: String,
    /// The `Proxy-Authorization` header as sent, if any.
    pub proxy_authorization: Option<String>,
    /// Whether the proxy opened it (credentials good, target reachable).
    pub opened: bool,
}

/// A running CONNECT proxy.
#[derive(Debug)]
pub struct ConnectProxy {
    /// Where it listens: `http://{addr}` is the proxy URL.
    pub addr: SocketAddr,
    tunnels: Arc<Mutex<Vec<Tunnel>>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl ConnectProxy {
    /// Serves on `listener`; with `credentials` (`user`, `password`), only requests carrying
    /// them as `Proxy-Authorization: Basic` are tunnelled.
    pub fn start(
        listener: TcpListener,
        credentials: Option<(&str, &str)>,
    ) -> std::io::Result<Self> {
        Self::start_with_hosts(listener, credentials, HashMap::new())
    }

    /// [`start`](Self::start), resolving the host names in `hosts` itself (to those addresses):
    /// as an egress proxy resolves names the merchant's server cannot.
    pub fn start_with_hosts(
        listener: TcpListener,
        credentials: Option<(&str, &str)>,
        hosts: HashMap<String, IpAddr>,
    ) -> std::io::Result<Self> {
        let hosts = Arc::new(hosts);
        let addr = listener.local_addr()?;
        let expected = credentials.map(|(user, password)| {
            format!(
                "Basic {}",
                crate::crypto::BASE64.encode(format!("{user}:{password}"))
            )
        });
        let tunnels = Arc::new(Mutex::new(Vec::new()));
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let (log, token) = (tunnels.clone(), shutdown.clone());
        tracker.spawn(async move {
            crate::serve::accept_loop(&listener, &token, None, TUNNEL_DRAIN, |client, _| {
                let (log, expected, token) = (log.clone(), expected.clone(), token.clone());
                let hosts = hosts.clone();
                Some(Box::pin(async move {
                    tokio::select! {
                        () = token.cancelled() => {}
                        () = tunnel(client, expected.as_deref(), &hosts, &log) => {}
                    }
                }))
            })
            .await;
        });
        Ok(Self {
            addr,
            tunnels,
            shutdown,
            tracker,
        })
    }

    /// The proxy URL, with `credentials` in it when given.
    pub fn url(&self, credentials: Option<(&str, &str)>) -> String {
        match credentials {
            Some((user, password)) => format!("http://{user}:{password}@{}", self.addr),
            None => format!("http://{}", self.addr),
        }
    }

    /// Every tunnel asked for so far.
    pub fn tunnels(&self) -> Vec<Tunnel> {
        lock(&self.tunnels).clone()
    }

    /// Stops listening and closes every tunnel (waiting up to [`TUNNEL_DRAIN`] for them).
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// Serves one client connection: one `CONNECT`, then bytes both ways until either side closes.
async fn tunnel(
    mut client: TcpStream,
    expected: Option<&str>,
    hosts: &HashMap<String, IpAddr>,
    log: &Mutex<Vec<Tunnel>>,
) {
    let Ok(Ok(Some((head, rest)))) =
        tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut client)).await
    else {
        return;
    };
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (method, target) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let authorization = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("proxy-authorization"))
        .map(|(_, value)| value.trim().to_owned());
    if method != "CONNECT" || target.is_empty() {
        let _ = client
            .write_all(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await;
        return;
    }
    let mut record = Tunnel {
        target: target.to_owned(),
        proxy_authorization: authorization.clone(),
        opened: false,
    };
    if expected.is_some_and(|e| authorization.as_deref() != Some(e)) {
        lock(log).push(record);
        let _ = client
            .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"sandbox\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await;
        return;
    }
    let known = target
        .rsplit_once(':')
        .and_then(|(host, port)| Some(SocketAddr::new(*hosts.get(host)?, port.parse().ok()?)));
    let connected = match known {
        Some(addr) => TcpStream::connect(addr).await,
        None => TcpStream::connect(target).await,
    };
    let Ok(mut upstream) = connected else {
        lock(log).push(record);
        let _ = client
            .write_all(
                b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .await;
        return;
    };
    record.opened = true;
    lock(log).push(record);
    if client
        .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        .await
        .is_err()
        || upstream.write_all(&rest).await.is_err()
    {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

/// Reads up to the end of the request head; returns the head (without the blank line) and any
/// bytes the client sent after it. `None` when the client closes first or the head is too long.
async fn read_head(client: &mut TcpStream) -> std::io::Result<Option<(String, Vec<u8>)>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0; 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            buf.truncate(end);
            return Ok(Some((String::from_utf8_lossy(&buf).into_owned(), rest)));
        }
        if buf.len() > MAX_HEAD {
            return Ok(None);
        }
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
