//! A fake authinfo-proxy: real HTTPS (a CA made at test time), and an independent check of every
//! request against the wire contract — the signing string rebuilt here, the signature verified
//! with the `rsa` crate (not ring, which signs), the timestamp against this proxy's clock, the
//! nonce against every nonce seen. Each request then gets the next scripted answer.

use std::collections::{HashSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use authinfod::tls::{GeneratedPki, generate_pki, server_config_generated};
use base64::Engine as _;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use rsa::pkcs8::DecodePublicKey as _;

/// What the fake proxy answers.
#[derive(Debug, Clone)]
pub enum Script {
    /// 200 with this authinfo (and `expires_in`).
    Authinfo(String, Option<u64>),
    /// This status with a contract error body (`retryable` from the status) and an optional
    /// `Retry-After`.
    Error(u16, &'static str, Option<u64>),
    /// 200 with this body as is.
    Raw(&'static str),
    /// Accept the connection and never answer.
    Hang,
    /// 200 with a JSON body (health routes).
    Json(serde_json::Value),
}

/// A request the fake proxy saw, and what its independent check made of it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub device_id: String,
    pub timestamp: i64,
    pub body: Vec<u8>,
    /// `None` when the request met the contract, else why not.
    pub violation: Option<String>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Answers to `POST /v1/authinfo`, in order.
    script: VecDeque<Script>,
    /// Answer when the script is empty.
    fallback: Option<Script>,
    /// Answers to the health routes, by path; `404 NOT_CONFIGURED` when absent.
    health: std::collections::HashMap<String, Script>,
    seen: Vec<Seen>,
    nonces: HashSet<String>,
    /// Added to the real clock: a proxy whose clock is ahead.
    clock_offset: i64,
}

/// A running fake proxy.
pub struct FakeProxy {
    pub addr: SocketAddr,
    pub url: String,
    pub pki: GeneratedPki,
    inner: Arc<Mutex<Inner>>,
}

impl FakeProxy {
    /// Starts a proxy that trusts `device_public_pem` for device `T-1001`.
    pub async fn start(device_public_pem: &str) -> Self {
        let pki = generate_pki("fake proxy test CA", &["127.0.0.1", "localhost"]).expect("pki");
        let tls = Arc::new(server_config_generated(&pki).expect("tls"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let inner = Arc::new(Mutex::new(Inner::default()));
        let key =
            rsa::RsaPublicKey::from_public_key_pem(device_public_pem).expect("device public key");
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let state = inner.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, state, key) = (acceptor.clone(), state.clone(), key.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req| {
                        let (state, key) = (state.clone(), key.clone());
                        async move { Ok::<_, Infallible>(answer(req, &state, &key).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            url: format!("https://127.0.0.1:{}", addr.port()),
            pki,
            inner,
        }
    }

    /// Queues answers to `POST /v1/authinfo`, in order.
    pub fn script(&self, answers: impl IntoIterator<Item = Script>) {
        self.lock().script.extend(answers);
    }

    /// The answer to `POST /v1/authinfo` once the queue is empty.
    pub fn fallback(&self, answer: Script) {
        self.lock().fallback = Some(answer);
    }

    /// The answer to a health route (`/v1/inspection`, ...), every time.
    pub fn health(&self, route: &str, answer: Script) {
        self.lock().health.insert(route.to_owned(), answer);
    }

    /// Sets this proxy's clock ahead of the real one.
    pub fn set_clock_offset(&self, seconds: i64) {
        self.lock().clock_offset = seconds;
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.lock().seen.clone()
    }

    /// Fails the test if any request broke the contract.
    pub fn assert_all_requests_valid(&self) {
        for s in self.seen() {
            assert!(
                s.violation.is_none(),
                "{} {}: {:?}",
                s.method,
                s.path,
                s.violation
            );
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("fake proxy lock")
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

/// The contract's Authorization header, parsed here without the library's parser.
fn parse_authorization(header: &str) -> Option<(String, String, String, String)> {
    let rest = header.strip_prefix("AUTHINFOD-SHA256-RSA2048 ")?;
    let mut fields = std::collections::HashMap::new();
    for part in rest.split(',') {
        let (k, v) = part.trim().split_once('=')?;
        fields.insert(
            k.to_owned(),
            v.strip_prefix('"')?.strip_suffix('"')?.to_owned(),
        );
    }
    Some((
        fields.remove("device_id")?,
        fields.remove("timestamp")?,
        fields.remove("nonce")?,
        fields.remove("signature")?,
    ))
}

/// Answers a request, every answer with a `Date` of the proxy's (offset) clock, as the real
/// proxy's server sends one with every answer.
async fn answer(
    req: hyper::Request<hyper::body::Incoming>,
    state: &Mutex<Inner>,
    key: &rsa::RsaPublicKey,
) -> hyper::Response<Full<bytes::Bytes>> {
    let mut response = answer_undated(req, state, key).await;
    let clock = now() + state.lock().expect("lock").clock_offset;
    let date = httpdate::fmt_http_date(
        std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(clock).expect("after 1970")),
    );
    response
        .headers_mut()
        .insert("date", date.parse().expect("date"));
    response
}

async fn answer_undated(
    req: hyper::Request<hyper::body::Incoming>,
    state: &Mutex<Inner>,
    key: &rsa::RsaPublicKey,
) -> hyper::Response<Full<bytes::Bytes>> {
    let method = req.method().as_str().to_owned();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    let clock = now() + state.lock().expect("lock").clock_offset;
    let mut seen = Seen {
        method: method.clone(),
        path: path.clone(),
        device_id: String::new(),
        timestamp: 0,
        body: body.clone(),
        violation: None,
    };
    let verdict = (|| {
        let (device_id, timestamp, nonce, signature) =
            parse_authorization(auth.as_deref().ok_or("no Authorization header")?)
                .ok_or("malformed Authorization header")?;
        seen.device_id = device_id.clone();
        let ts: i64 = timestamp.parse().map_err(|_| "timestamp is not a number")?;
        seen.timestamp = ts;
        if device_id != "T-1001" {
            return Err("unknown device");
        }
        let mut message = format!("{method}\n{path}\n{timestamp}\n{nonce}\n").into_bytes();
        message.extend_from_slice(&body);
        message.push(b'\n');
        let digest = <sha2::Sha256 as sha2::Digest>::digest(&message);
        let sig = base64::engine::general_purpose::STANDARD
            .decode(signature)
            .map_err(|_| "signature is not base64")?;
        key.verify(rsa::Pkcs1v15Sign::new::<sha2::Sha256>(), &digest, &sig)
            .map_err(|_| "signature does not verify")?;
        if (ts - clock).abs() > 300 {
            return Err("TIMESTAMP_SKEW");
        }
        if !state.lock().expect("lock").nonces.insert(nonce) {
            return Err("nonce replayed");
        }
        Ok(())
    })();
    let reply = match verdict {
        Err("TIMESTAMP_SKEW") => {
            // Not a contract violation: the proxy's answer to a skewed clock.
            state.lock().expect("lock").seen.push(seen);
            return error_response(401, "TIMESTAMP_SKEW", None);
        }
        Err(why) => {
            seen.violation = Some(why.to_owned());
            state.lock().expect("lock").seen.push(seen);
            return error_response(401, "BAD_SIGNATURE", None);
        }
        Ok(()) => {
            let mut inner = state.lock().expect("lock");
            inner.seen.push(seen);
            if path == "/v1/authinfo" {
                inner.script.pop_front().or_else(|| inner.fallback.clone())
            } else {
                Some(inner.health.get(&path).cloned().unwrap_or(Script::Error(
                    404,
                    "NOT_CONFIGURED",
                    None,
                )))
            }
        }
    };
    match reply {
        None => error_response(500, "NO_SCRIPT", None),
        Some(Script::Authinfo(authinfo, expires_in)) => json_response(
            200,
            serde_json::json!({ "authinfo": authinfo, "expires_in": expires_in }),
        ),
        Some(Script::Json(v)) => json_response(200, v),
        Some(Script::Error(status, code, retry_after)) => error_response(status, code, retry_after),
        Some(Script::Raw(text)) => hyper::Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(Full::new(bytes::Bytes::from_static(text.as_bytes())))
            .expect("response"),
        Some(Script::Hang) => std::future::pending().await,
    }
}

fn json_response(status: u16, v: serde_json::Value) -> hyper::Response<Full<bytes::Bytes>> {
    hyper::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from(v.to_string())))
        .expect("response")
}

fn error_response(
    status: u16,
    code: &str,
    retry_after: Option<u64>,
) -> hyper::Response<Full<bytes::Bytes>> {
    let mut r = json_response(
        status,
        serde_json::json!({
            "code": code,
            "message": format!("scripted {status}"),
            "retryable": status == 429 || status >= 500,
        }),
    );
    if let Some(s) = retry_after {
        r.headers_mut()
            .insert("retry-after", s.to_string().parse().expect("header"));
    }
    r
}
