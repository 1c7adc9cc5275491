//! The terminals' side of the proxy benches: keep-alive HTTPS connections to a proxy (or a
//! replica) that trust only the lab's proxy CA, as a terminal does, and one signed request on
//! them. Each bench uses what it needs of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use authinfod::wire::auth::DeviceSigner;
use authinfod::wire::{AuthinfoResponse, ErrorBody, ROUTE_AUTHINFO};
use bytes::Bytes;
use http::HeaderValue;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

/// Limits raised for a load, appended to the proxy's config: a terminal may send as many
/// requests as the run gives it, and the merchant's WeChat Pay ceiling (default 100/s, shared
/// by replicas in Redis) is above any rate two cores reach. A bench that sets them says so
/// ([`RAISED_LIMITS_NOTE`]).
pub const RAISED_LIMITS: &str =
    "[limits]\nauthinfo_burst = 100000\nauthinfo_every = \"1s\"\nwechatpay_per_second = 100000\n";
/// [`RAISED_LIMITS`] as the benches print it.
pub const RAISED_LIMITS_NOTE: &str = "limits.authinfo_burst = 100000, authinfo_every = 1s, wechatpay_per_second = 100000 (defaults 20, 120s, 100)";

/// Where a proxy listens and how to reach it.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub tls: tokio_rustls::TlsConnector,
}

impl Target {
    /// The proxy at `addr`, trusting only the CA in `ca_file` (the lab's `proxy-ca.pem`).
    pub fn pinned(addr: SocketAddr, ca_file: &Path) -> anyhow::Result<Self> {
        let ca = std::fs::read_to_string(ca_file)
            .with_context(|| format!("cannot read the proxy CA {}", ca_file.display()))?;
        let tls = authinfod::tls::client_config_pinned(&ca, "proxy-ca.pem")
            .context("cannot build the client TLS config")?;
        Ok(Self {
            addr,
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
        })
    }

    /// The same trust for another address (one replica of several).
    pub fn at(&self, addr: SocketAddr) -> Self {
        Self {
            addr,
            tls: self.tls.clone(),
        }
    }
}

pub type Sender = SendRequest<Full<Bytes>>;

/// Opens one keep-alive HTTPS connection; its driver runs as a task on the current runtime.
pub async fn connect(target: &Target) -> anyhow::Result<Sender> {
    let tcp = tokio::net::TcpStream::connect(target.addr)
        .await
        .with_context(|| format!("cannot connect to {}", target.addr))?;
    tcp.set_nodelay(true).context("cannot set TCP_NODELAY")?;
    let name = rustls_pki_types::ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into());
    let tls = target
        .tls
        .connect(name, tcp)
        .await
        .with_context(|| format!("TLS handshake with {} failed", target.addr))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .context("HTTP/1.1 handshake failed")?;
    tokio::spawn(conn);
    Ok(sender)
}

/// One signed request, ready to send.
pub struct Signed {
    pub authorization: HeaderValue,
    pub body: Bytes,
}

/// Signs `body` for `POST route` at `timestamp` with a fresh nonce.
pub fn sign(
    device: &DeviceSigner,
    route: &str,
    timestamp: i64,
    body: Bytes,
) -> anyhow::Result<Signed> {
    let nonce = authinfod::crypto::nonce()?;
    let header = device.authorize_with_nonce("POST", route, timestamp, &nonce, body.as_ref())?;
    Ok(Signed {
        authorization: HeaderValue::from_str(&header)
            .context("the Authorization header is not a valid header value")?,
        body,
    })
}

/// Sends `POST route` on a kept-alive connection: its status and the body read to the end.
pub async fn post(
    sender: &mut Sender,
    route: &str,
    signed: &Signed,
) -> anyhow::Result<(u16, Bytes)> {
    sender
        .ready()
        .await
        .context("the connection closed between requests")?;
    let request = hyper::Request::post(route)
        .header(HOST, "127.0.0.1")
        .header(CONTENT_TYPE, "application/json")
        .header(AUTHORIZATION, signed.authorization.clone())
        .body(Full::new(signed.body.clone()))
        .context("cannot build the request")?;
    let response = sender
        .send_request(request)
        .await
        .context("the request failed")?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .context("cannot read the answer")?
        .to_bytes();
    Ok((status, body))
}

/// The authinfo in a 200 answer's body, if there is one.
pub fn authinfo_of(body: &[u8]) -> Option<String> {
    serde_json::from_slice::<AuthinfoResponse>(body)
        .ok()
        .map(|answer| answer.authinfo)
        .filter(|a| !a.is_empty())
}

/// Sends one `POST /v1/authinfo` of `body` signed now by `device` and returns its authinfo;
/// anything but a 200 with an authinfo is a setup failure.
pub async fn check(target: &Target, device: &DeviceSigner, body: Bytes) -> anyhow::Result<String> {
    let mut sender = connect(target).await?;
    let signed = sign(device, ROUTE_AUTHINFO, authinfod::units::unix_now(), body)?;
    let (status, body) = post(&mut sender, ROUTE_AUTHINFO, &signed).await?;
    let text = String::from_utf8_lossy(&body);
    if status != 200 {
        bail!(
            "the check request at {} answered {status}: {text}",
            target.addr
        );
    }
    authinfo_of(&body).ok_or_else(|| {
        anyhow!(
            "the check request's 200 at {} carries no authinfo: {text}",
            target.addr
        )
    })
}

/// The proxy's error code in a refusal's body.
pub fn code_of(body: &[u8]) -> String {
    serde_json::from_slice::<ErrorBody>(body)
        .map_or_else(|_| "(no code)".to_owned(), |refusal| refusal.code)
}

/// What one connection saw in a timed run.
#[derive(Default)]
pub struct Tally {
    pub latencies: Vec<Duration>,
    /// The indices (of the run's requests) answered 200 with an authinfo.
    pub accepted: Vec<usize>,
    /// Answers other than a 200 with an authinfo, by what they were.
    pub failures: BTreeMap<String, usize>,
}

impl Tally {
    pub fn fail(&mut self, what: String) {
        *self.failures.entry(what).or_default() += 1;
    }
}

/// One connection's closed loop in a timed run of `POST /v1/authinfo`: takes the next place
/// from `next` (shared by the connections to one target), sends the request `request` gives for
/// it (its index and the request; `None` ends the run), and records the latency and the answer.
/// A transport error is counted and the connection reopened; when it cannot be, this connection
/// stops and the others take its share.
pub async fn drain<'a>(
    mut sender: Sender,
    target: &Target,
    next: &AtomicUsize,
    request: impl Fn(usize) -> Option<(usize, &'a Signed)>,
) -> Tally {
    let mut tally = Tally::default();
    while let Some((k, signed)) = request(next.fetch_add(1, Ordering::Relaxed)) {
        let start = Instant::now();
        match post(&mut sender, ROUTE_AUTHINFO, signed).await {
            Ok((200, body)) if authinfo_of(&body).is_some() => tally.accepted.push(k),
            Ok((200, _)) => tally.fail("200 without an authinfo".to_owned()),
            Ok((status, body)) => tally.fail(format!("{status} {}", code_of(&body))),
            Err(e) => {
                tally.fail(format!("transport: {e:#}"));
                tally.latencies.push(start.elapsed());
                match connect(target).await {
                    Ok(new) => sender = new,
                    Err(e) => {
                        tally.fail(format!("connection stopped: cannot reconnect: {e:#}"));
                        break;
                    }
                }
                continue;
            }
        }
        tally.latencies.push(start.elapsed());
    }
    tally
}
