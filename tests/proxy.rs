//! The merchant's signing proxy over real TLS against the sandbox platforms: who it refuses
//! (and that a refusal never reaches a platform), what the daemon gets through it, the fleet
//! sync within WeChat Pay's limits, upstream faults as typed errors, registry reloads and
//! `authinfo-proxy check-config`.
//!
//! Requests to the proxy are made here on a hand-held HTTPS connection (rustls pinned to the lab's
//! proxy CA, hyper's HTTP/1.1 client), so the request target is sent byte for byte as signed.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use authinfod::crypto::{GeneratedKey, RsaSigner};
use authinfod::demo::lab::{self, DEVICE_ID, DEVICE_SN, Lab};
use authinfod::proxy::fleet::{self, FleetError, SyncRefusalCode};
use authinfod::proxy::{self as proxy_lib, ProxyError};
use authinfod::sandbox::{Fault, Platform, World};
use authinfod::terminal::doc::CheckState;
use authinfod::units::unix_now;
use authinfod::wire::auth::DeviceSigner;
use authinfod::wire::{ErrorBody, MAX_REQUEST_BODY, codes};
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use crate::support::logs::capture;
use crate::support::{
    Reply, TestDaemon, device_key, lab_proxy_config, wait_for_authinfo_and_health, wait_until,
};

/// Device B: enrolled by the tests that need a second terminal.
pub(crate) const DEVICE_B_ID: &str = "T-2002";
/// B's serial: the first extra device of `lab::world(n, ..)`, listed as ACTIVATED.
pub(crate) const DEVICE_B_SN: &str = "SANDBOX0000002000";
/// A serial WeChat Pay does not list for the merchant.
const UNLISTED_SN: &str = "SANDBOX0000009999";

// === the lab ===

/// Starts a lab in a fresh directory (the directory lives as long as the returned handle).
pub(crate) async fn start_lab(
    world: World,
    proxy_extra: &str,
    daemon_extra: &str,
) -> (Arc<tempfile::TempDir>, Lab) {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let lab = Lab::start_with_keys(
        dir.path(),
        crate::support::lab_keys(),
        world,
        proxy_extra,
        daemon_extra,
    )
    .await
    .unwrap_or_else(|e| panic!("lab: {}", authinfod::error_chain(&e)));
    (dir, lab)
}

/// A lab whose proxy has finished its first fleet sync, so that every later upstream call is
/// one a test caused.
pub(crate) async fn synced_lab(world: World, daemon_extra: &str) -> (Arc<tempfile::TempDir>, Lab) {
    synced_lab_with(world, "", daemon_extra).await
}

/// [`synced_lab`] with `proxy_extra` TOML in the proxy's config.
pub(crate) async fn synced_lab_with(
    world: World,
    proxy_extra: &str,
    daemon_extra: &str,
) -> (Arc<tempfile::TempDir>, Lab) {
    let (dir, lab) = start_lab(world, proxy_extra, daemon_extra).await;
    let fleet = lab.proxy.app.fleet.clone();
    wait_until("the proxy's first fleet sync is done", || {
        fleet.snapshot().synced_at.is_some()
    })
    .await;
    (dir, lab)
}

/// Every request the simulated platforms received so far, as `METHOD target`.
pub(crate) fn upstream_calls(lab: &Lab) -> Vec<String> {
    lab.sandbox
        .state
        .received()
        .into_iter()
        .map(|r| r.request)
        .collect()
}

/// The device-list requests WeChat Pay received so far.
fn list_calls(lab: &Lab) -> Vec<String> {
    upstream_calls(lab)
        .into_iter()
        .filter(|r| r.starts_with("GET /v3/iotmanage/devices?"))
        .collect()
}

/// The lab's demo terminal (device A), signing with the key the lab enrolled.
pub(crate) fn device_a(lab: &Lab) -> DeviceSigner {
    let key = RsaSigner::from_file(&lab.files.path("device.key")).expect("device key");
    DeviceSigner::new(DEVICE_ID.into(), key)
}

/// A signer for `device_id` with `key`.
pub(crate) fn signer(device_id: &str, key: &GeneratedKey) -> DeviceSigner {
    DeviceSigner::new(
        device_id.into(),
        RsaSigner::from_pem(&key.private_pem, "test key").expect("key"),
    )
}

/// Enrols device B (the shared test key, serial `sn`) by appending it to the lab's registry
/// file; the running proxy sees it after a reload.
pub(crate) fn append_device_b(lab: &Lab, sn: &str) -> DeviceSigner {
    use std::io::Write as _;
    let entry = format!(
        "\n[[device]]\ndevice_id = \"{DEVICE_B_ID}\"\npublic_key = \"\"\"\n{}\"\"\"\ndevice_sn = \"{sn}\"\nsub_mchid = \"1900000002\"\norganization_id = \"ORG-CANTEEN-02\"\n",
        device_key().public.to_pem()
    );
    std::fs::OpenOptions::new()
        .append(true)
        .open(lab.files.path("devices.toml"))
        .and_then(|mut f| f.write_all(entry.as_bytes()))
        .expect("append to the registry");
    signer(DEVICE_B_ID, device_key())
}

/// `Authorization` for `POST /v1/authinfo` with `body`, signed by `device` now.
fn authorization_for(device: &DeviceSigner, body: &[u8]) -> String {
    device
        .authorize("POST", "/v1/authinfo", unix_now(), body)
        .expect("sign")
}

pub(crate) fn authinfo_body(raw_data: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "raw_data": raw_data })).expect("json")
}

/// Parses a refusal and checks its status and code.
#[track_caller]
pub(crate) fn assert_refused(reply: &Reply, status: u16, code: &str) -> ErrorBody {
    let text = String::from_utf8_lossy(&reply.body).into_owned();
    let body: ErrorBody = serde_json::from_slice(&reply.body)
        .unwrap_or_else(|e| panic!("not an error body ({e}): {text}"));
    assert_eq!((reply.status, body.code.as_str()), (status, code), "{text}");
    assert!(
        reply.json().get("authinfo").is_none(),
        "a refusal carries no authinfo: {text}"
    );
    body
}

// === a connection to the proxy ===

/// One keep-alive HTTPS connection to the proxy, trusting only the lab's proxy CA.
pub(crate) struct ProxyConnection {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    /// Ends when the connection closes.
    task: tokio::task::JoinHandle<()>,
}

impl ProxyConnection {
    pub(crate) async fn open(lab: &Lab) -> Self {
        Self::open_to(lab, lab.proxy.addr).await
    }

    async fn open_to(lab: &Lab, addr: SocketAddr) -> Self {
        Self::open_at(&lab.files, addr).await
    }

    /// To the proxy (or a replica) at `addr`, trusting the proxy CA in `files`.
    pub(crate) async fn open_at(files: &lab::LabFiles, addr: SocketAddr) -> Self {
        let ca = std::fs::read_to_string(files.path("proxy-ca.pem")).expect("proxy CA");
        let tls = authinfod::tls::client_config_pinned(&ca, "proxy-ca.pem").expect("tls config");
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connect to the proxy");
        let name = rustls_pki_types::ServerName::IpAddress(
            std::net::IpAddr::V4(Ipv4Addr::LOCALHOST).into(),
        );
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await
            .expect("TLS handshake with the proxy");
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("HTTP handshake");
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        Self { sender, task }
    }

    /// Sends one request on this connection; `target` goes on the wire as given.
    pub(crate) async fn send(
        &mut self,
        method: &str,
        target: &str,
        authorization: Option<&str>,
        body: &[u8],
    ) -> Reply {
        self.sender
            .ready()
            .await
            .expect("the connection is still open");
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(target)
            .header("host", "127.0.0.1")
            .header("accept", "application/json");
        if let Some(a) = authorization {
            request = request.header("authorization", a);
        }
        if !body.is_empty() {
            request = request.header("content-type", "application/json");
        }
        let request = request
            .body(Full::new(Bytes::copy_from_slice(body)))
            .expect("request");
        let response = self
            .sender
            .send_request(request)
            .await
            .expect("the proxy answers");
        Reply::read(response).await
    }

    /// Sends a request signed by `device` at `timestamp`.
    pub(crate) async fn signed_at(
        &mut self,
        device: &DeviceSigner,
        timestamp: i64,
        method: &str,
        target: &str,
        body: &[u8],
    ) -> Reply {
        let authorization = device
            .authorize(method, target, timestamp, body)
            .expect("sign");
        self.send(method, target, Some(&authorization), body).await
    }

    /// Sends a request signed by `device` now.
    pub(crate) async fn signed(
        &mut self,
        device: &DeviceSigner,
        method: &str,
        target: &str,
        body: &[u8],
    ) -> Reply {
        self.signed_at(device, unix_now(), method, target, body)
            .await
    }

    fn is_open(&self) -> bool {
        !self.task.is_finished() && !self.sender.is_closed()
    }
}

// === security: who is refused, and nothing reaches a platform ===

#[tokio::test]
async fn unknown_device_gets_401_unknown_device_and_nothing_is_forwarded() {
    let (_dir, lab) = synced_lab(lab::world(0, 45), "").await;
    let stranger = signer("T-9999", device_key());
    let before = upstream_calls(&lab);
    let mut conn = ProxyConnection::open(&lab).await;
    let r = conn
        .signed(&stranger, "POST", "/v1/authinfo", &authinfo_body("RAW-1"))
        .await;
    let body = assert_refused(&r, 401, codes::UNKNOWN_DEVICE);
    assert!(!body.retryable);
    for route in ["/v1/inspection", "/v1/alipay-binding", "/v1/licence"] {
        let r = conn.signed(&stranger, "GET", route, b"").await;
        assert_refused(&r, 401, codes::UNKNOWN_DEVICE);
    }
    assert_eq!(upstream_calls(&lab), before, "nothing reached a platform");
    // The same connection and proxy serve the enrolled device: the refusals were about the
    // device, not the setup.
    let r = conn
        .signed(&device_a(&lab), "GET", "/v1/inspection", b"")
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    lab.stop().await;
}

#[tokio::test]
async fn wrong_key_or_a_body_changed_after_signing_gets_401_bad_signature_and_nothing_is_forwarded()
{
    let (_dir, lab) = synced_lab(lab::world(0, 45), "").await;
    let before = upstream_calls(&lab);
    let mut conn = ProxyConnection::open(&lab).await;

    // The enrolled id, signed with another key.
    let impostor = signer(DEVICE_ID, device_key());
    let r = conn
        .signed(&impostor, "POST", "/v1/authinfo", &authinfo_body("RAW-1"))
        .await;
    assert_refused(&r, 401, codes::BAD_SIGNATURE);
    let r = conn.signed(&impostor, "GET", "/v1/inspection", b"").await;
    assert_refused(&r, 401, codes::BAD_SIGNATURE);

    // The right key, but the body (or the target) is not what was signed.
    let a = device_a(&lab);
    let signed_body = authinfo_body("RAW-1");
    let post = a
        .authorize("POST", "/v1/authinfo", unix_now(), &signed_body)
        .expect("sign");
    let r = conn
        .send("POST", "/v1/authinfo", Some(&post), &authinfo_body("RAW-2"))
        .await;
    assert_refused(&r, 401, codes::BAD_SIGNATURE);
    let get = a
        .authorize("GET", "/v1/licence", unix_now(), b"")
        .expect("sign");
    let r = conn.send("GET", "/v1/inspection", Some(&get), b"").await;
    assert_refused(&r, 401, codes::BAD_SIGNATURE);
    assert_eq!(upstream_calls(&lab), before, "nothing reached a platform");

    // The same header with the body it was made for is served: a tampered copy neither
    // passes nor burns the nonce.
    let r = conn
        .send("POST", "/v1/authinfo", Some(&post), &signed_body)
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    lab.stop().await;
}

#[tokio::test]
async fn a_replayed_request_gets_401_replayed_nonce_and_reaches_the_platform_once() {
    let (_dir, lab) = synced_lab(lab::world(0, 45), "").await;
    let a = device_a(&lab);
    let before = lab.sandbox.state.received_by(Platform::WechatPay);
    let body = authinfo_body("RAW-1");
    let authorization = authorization_for(&a, &body);
    let mut conn = ProxyConnection::open(&lab).await;
    let first = conn
        .send("POST", "/v1/authinfo", Some(&authorization), &body)
        .await;
    assert_eq!(
        first.status,
        200,
        "{}",
        String::from_utf8_lossy(&first.body)
    );
    assert!(
        first.json()["authinfo"]
            .as_str()
            .is_some_and(|a| a.starts_with("SANDBOX-AUTHINFO-"))
    );
    // Byte for byte the same request, on the same and on a new connection.
    let again = conn
        .send("POST", "/v1/authinfo", Some(&authorization), &body)
        .await;
    let refusal = assert_refused(&again, 401, codes::REPLAYED_NONCE);
    assert!(!refusal.retryable);
    let mut other = ProxyConnection::open(&lab).await;
    let again = other
        .send("POST", "/v1/authinfo", Some(&authorization), &body)
        .await;
    assert_refused(&again, 401, codes::REPLAYED_NONCE);
    assert_eq!(
        lab.sandbox.state.received_by(Platform::WechatPay),
        before + 1,
        "only the first use was forwarded"
    );
    lab.stop().await;
}

#[tokio::test]
/// Through the real proxy, far from the window's edge (which `proxy::auth`'s unit test checks on
/// an injected clock), so that the time a request takes to arrive cannot change the outcome.
async fn a_skewed_timestamp_gets_401_timestamp_skew_with_the_proxy_date_and_a_small_skew_passes() {
    let (_dir, lab) = synced_lab(lab::world(0, 45), "").await;
    let a = device_a(&lab);
    let before = upstream_calls(&lab);
    let mut conn = ProxyConnection::open(&lab).await;
    for offset in [-400, 400] {
        let now = unix_now();
        let r = conn
            .signed_at(&a, now + offset, "GET", "/v1/inspection", b"")
            .await;
        let body = assert_refused(&r, 401, codes::TIMESTAMP_SKEW);
        assert!(body.retryable, "a skewed clock can be corrected: {offset}");
        let date = r
            .header("date")
            .unwrap_or_else(|| panic!("a TIMESTAMP_SKEW answer carries Date ({offset})"));
        let date = httpdate::parse_http_date(&date)
            .expect("an HTTP date")
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs() as i64;
        assert!(
            (now - 1..=unix_now()).contains(&date),
            "Date is the proxy's clock: {date}"
        );
    }
    assert_eq!(upstream_calls(&lab), before, "nothing reached a platform");
    for offset in [-200, 200] {
        let now = unix_now();
        let r = conn
            .signed_at(&a, now + offset, "GET", "/v1/inspection", b"")
            .await;
        assert_eq!(
            r.status,
            200,
            "{offset}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    lab.stop().await;
}

/// There is no parameter naming the device asked about: whatever A sends, the proxy asks
/// WeChat Pay about A's serial from the registry.
#[tokio::test]
async fn a_device_cannot_get_another_devices_inspection() {
    let mut world = lab::world(1, 45);
    let mut b_inspection = world.inspections[DEVICE_SN].clone();
    b_inspection.device_sn = DEVICE_B_SN.into();
    b_inspection.result = "FAIL".into();
    world.inspections.insert(DEVICE_B_SN.into(), b_inspection);
    let (_dir, lab) = synced_lab(world, "").await;
    append_device_b(&lab, DEVICE_B_SN);
    lab.proxy.reload_registry();
    assert!(lab.proxy.app.registry.current().get(DEVICE_B_ID).is_some());
    let a = device_a(&lab);
    let before = upstream_calls(&lab);
    let mut conn = ProxyConnection::open(&lab).await;

    for target in [
        format!("/v1/inspection?device_sn={DEVICE_B_SN}"),
        format!("/v1/inspection?device_id={DEVICE_B_ID}&device_sn={DEVICE_B_SN}"),
    ] {
        let r = conn.signed(&a, "GET", &target, b"").await;
        assert_eq!(
            r.status,
            200,
            "{target}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(
            r.json()["device_sn"],
            DEVICE_SN,
            "{target}: A's own inspection"
        );
        assert_eq!(r.json()["result"], "SUCCESS", "{target}");
    }
    // Another path shape is no route at all.
    let r = conn
        .signed(&a, "GET", &format!("/v1/inspection/{DEVICE_B_SN}"), b"")
        .await;
    assert_refused(&r, 404, codes::NOT_FOUND);
    // A cannot sign as B.
    let a_as_b = DeviceSigner::new(
        DEVICE_B_ID.into(),
        RsaSigner::from_file(&lab.files.path("device.key")).expect("device key"),
    );
    let r = conn.signed(&a_as_b, "GET", "/v1/inspection", b"").await;
    assert_refused(&r, 401, codes::BAD_SIGNATURE);

    let forwarded: Vec<String> = upstream_calls(&lab)[before.len()..].to_vec();
    assert_eq!(
        forwarded,
        vec![format!("GET /v3/iotmanage/device-inspections/{DEVICE_SN}"); 2],
        "only A's serial was ever asked about"
    );

    // Defence in depth: even a serial that tries to climb out of the path stays one
    // percent-encoded path segment on the wire, which WeChat Pay refuses.
    let failure = lab
        .proxy
        .app
        .wechat
        .device_inspection("../../v3/iotmanage/devices")
        .await
        .expect_err("refused")
        .failure();
    assert_eq!(
        (failure.status, failure.code.as_deref()),
        (400, Some("PARAM_ERROR"))
    );
    let last = upstream_calls(&lab).pop().expect("one more call");
    assert_eq!(
        last,
        "GET /v3/iotmanage/device-inspections/%2E%2E%2F%2E%2E%2Fv3%2Fiotmanage%2Fdevices"
    );
    lab.stop().await;
}

#[test]
fn a_registry_entry_whose_device_sn_tries_path_traversal_is_refused_at_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("devices.toml");
    for sn in [
        "../../v3/iotmanage/devices",
        "SANDBOX0001/../x",
        "SANDBOX%2F0001",
    ] {
        std::fs::write(
            &path,
            format!(
                "[[device]]\ndevice_id = \"T-1\"\npublic_key = \"\"\"\n{}\"\"\"\ndevice_sn = \"{sn}\"\nsub_mchid = \"1900000002\"\norganization_id = \"ORG\"\n",
                device_key().public.to_pem()
            ),
        )
        .expect("write");
        let err = authinfod::proxy::registry::Registry::load(&path)
            .expect_err("a device_sn that is not 5 to 200 letters and digits is refused");
        let text = err.to_string();
        assert!(
            text.contains("device[0] (T-1): device_sn must be"),
            "{sn}: {text}"
        );
    }
}

#[tokio::test]
async fn oversized_body_bad_authorization_unknown_route_and_wrong_method_are_refused_before_forwarding()
 {
    let (_dir, lab) = synced_lab(lab::world(0, 45), "").await;
    let a = device_a(&lab);
    let before = upstream_calls(&lab);
    let mut conn = ProxyConnection::open(&lab).await;

    // Missing and malformed Authorization.
    let body = authinfo_body("RAW-1");
    let r = conn.send("POST", "/v1/authinfo", None, &body).await;
    assert_refused(&r, 401, codes::BAD_AUTHORIZATION);
    let valid = authorization_for(&a, &body);
    let without_signature = valid
        .split(",signature=")
        .next()
        .expect("header")
        .to_owned();
    for header in [
        "Bearer abc".to_owned(),
        valid.replacen("AUTHINFOD-SHA256-RSA2048", "WECHATPAY2-SHA256-RSA2048", 1),
        without_signature,
        format!("{valid},device_id=\"{DEVICE_ID}\""),
        // Over the 2 KiB cap (trailing spaces would not do: HTTP strips them).
        format!("{valid},padding=\"{}\"", "p".repeat(2048)),
    ] {
        let r = conn
            .send("POST", "/v1/authinfo", Some(&header), &body)
            .await;
        assert_refused(&r, 401, codes::BAD_AUTHORIZATION);
    }

    // Unknown route, wrong method (with Allow), all signed.
    let r = conn.signed(&a, "GET", "/v1/secrets", b"").await;
    assert_refused(&r, 404, codes::NOT_FOUND);
    let r = conn.signed(&a, "GET", "/v3/iotmanage/devices", b"").await;
    assert_refused(&r, 404, codes::NOT_FOUND);
    let r = conn.signed(&a, "GET", "/v1/authinfo", b"").await;
    assert_refused(&r, 405, codes::METHOD_NOT_ALLOWED);
    assert_eq!(r.header("allow").as_deref(), Some("POST"));
    let r = conn.signed(&a, "DELETE", "/v1/inspection", b"").await;
    assert_refused(&r, 405, codes::METHOD_NOT_ALLOWED);
    assert_eq!(r.header("allow").as_deref(), Some("GET"));
    // HEAD is another method too (an answer without a body, for a platform call and a nonce).
    let r = conn.signed(&a, "HEAD", "/v1/licence", b"").await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow").as_deref(), Some("GET"));

    // 64 KiB is the limit: at it the body is read (and refused as a request: raw_data is
    // capped lower), one byte over it is 413, signed or not.
    let padding = MAX_REQUEST_BODY - authinfo_body("").len();
    let at_limit = authinfo_body(&"R".repeat(padding));
    assert_eq!(at_limit.len(), MAX_REQUEST_BODY);
    let r = conn.signed(&a, "POST", "/v1/authinfo", &at_limit).await;
    assert_refused(&r, 400, codes::BAD_REQUEST);
    let over = authinfo_body(&"R".repeat(padding + 1));
    let r = conn.signed(&a, "POST", "/v1/authinfo", &over).await;
    assert_refused(&r, 413, codes::BODY_TOO_LARGE);
    let mut fresh = ProxyConnection::open(&lab).await;
    let r = fresh
        .send("POST", "/v1/authinfo", None, &vec![b'x'; 100 * 1024])
        .await;
    assert_refused(&r, 413, codes::BODY_TOO_LARGE);

    assert_eq!(upstream_calls(&lab), before, "nothing reached a platform");
    lab.stop().await;
}

/// Each terminal request is one log line within the request's span: the route (`other` off the
/// route table), the device once it is authenticated (never the id an unverified header claims),
/// the outcome code, the platform's status and request id, and the time taken.
#[tokio::test]
async fn each_terminal_request_is_logged_with_its_route_device_and_outcome() {
    let (_dir, lab) = synced_lab(lab::world(0, 45), "").await;
    let (logs, _guard) = capture();
    let a = device_a(&lab);
    let mut conn = ProxyConnection::open(&lab).await;
    let r = conn.signed(&a, "GET", "/v1/inspection", b"").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = conn
        .signed(
            &signer(DEVICE_ID, device_key()),
            "POST",
            "/v1/authinfo",
            &authinfo_body("RAW-1"),
        )
        .await;
    assert_refused(&r, 401, codes::BAD_SIGNATURE);
    let r = conn.signed(&a, "GET", "/v1/secrets", b"").await;
    assert_refused(&r, 404, codes::NOT_FOUND);
    lab.sandbox.state.faults.set(
        Platform::WechatPay,
        Fault {
            status: Some(500),
            ..Fault::default()
        },
    );
    let r = conn.signed(&a, "GET", "/v1/inspection", b"").await;
    let refusal = assert_refused(&r, 502, codes::UPSTREAM_UNAVAILABLE);
    let request_id = refusal
        .upstream
        .and_then(|u| u.request_id)
        .expect("WeChat Pay's request id");

    let served = logs.lines_with("proxy::server: served ");
    let device = format!("device_id=\"{DEVICE_ID}\"");
    assert!(
        served.len() == 1
            && served[0].contains(" INFO ")
            && served[0].contains("route=\"/v1/inspection\"")
            && served[0].contains(&device)
            && served[0].contains("elapsed_ms="),
        "{served:#?}"
    );
    let refused = logs.lines_with("proxy::server: refused ");
    assert_eq!(refused.len(), 3, "{refused:#?}");
    assert!(refused.iter().all(|l| l.contains(" WARN ")), "{refused:#?}");
    assert!(
        refused[0].contains("route=\"/v1/authinfo\"")
            && refused[0].contains("code=BAD_SIGNATURE")
            && !refused[0].contains("device_id="),
        "{}",
        refused[0]
    );
    assert!(
        refused[1].contains("route=\"other\"") && refused[1].contains("code=NOT_FOUND"),
        "{}",
        refused[1]
    );
    assert!(
        refused[2].contains("route=\"/v1/inspection\"")
            && refused[2].contains(&device)
            && refused[2].contains("code=UPSTREAM_UNAVAILABLE")
            && refused[2].contains("upstream_status=500")
            && refused[2].contains(&format!("request_id=\"{request_id}\""))
            && refused[2].contains("elapsed_ms="),
        "{}",
        refused[2]
    );
    // The platform client's own line about the failure is within the span too.
    assert!(
        logs.lines_with("wechat pay refused the request")
            .iter()
            .any(|l| l.contains(&device) && l.contains("route=\"/v1/inspection\"")),
        "{}",
        logs.text()
    );
    lab.stop().await;
}

// === end to end: daemon → proxy → sandbox ===

#[tokio::test]
async fn daemon_gets_authinfo_and_inspection_through_the_proxy_over_real_tls() {
    let (dir, lab) = synced_lab(lab::world(0, 45), "").await;
    let before = upstream_calls(&lab).len();
    let daemon = TestDaemon::start_with_config(dir.clone(), &lab.daemon_config).await;
    assert_eq!(daemon.put_raw_data("RAW-1").await.status, 202);
    let state = daemon.state.clone();
    wait_until("the daemon holds an authinfo and the inspection", || {
        state.current().is_some() && state.status().device.inspection.state == CheckState::Ok
    })
    .await;

    let r = daemon.get("/v1/authinfo").await;
    assert_eq!(r.status, 200);
    let authinfo = r.json()["authinfo"].as_str().expect("authinfo").to_owned();
    assert!(
        authinfo.starts_with("SANDBOX-AUTHINFO-"),
        "issued by the sandbox"
    );
    let device = daemon.get("/v1/device").await.json();
    assert_eq!(device["inspection"]["value"]["device_sn"], DEVICE_SN);
    assert_eq!(device["inspection"]["value"]["result"], "SUCCESS");
    assert_eq!(device["inspection"]["value"]["camera_sn"], "CAM-1001");

    // WeChat Pay verified the merchant's signature on both calls. The sandbox answers
    // PARAM_ERROR when sp_appid, sub_mchid, device_id, raw_data or organization_id is missing
    // or empty, so the issued authinfo proves the proxy filled them (from its config and the
    // registry: the daemon sends only raw_data).
    let received = lab.sandbox.state.received();
    let wechat: Vec<(String, bool)> = received[before..]
        .iter()
        .filter(|r| r.platform == Platform::WechatPay)
        .map(|r| (r.request.clone(), r.signature_ok))
        .collect();
    assert!(
        wechat.contains(&("POST /v3/offlineface/authinfo".into(), true)),
        "{wechat:?}"
    );
    assert!(
        wechat.contains(&(
            format!("GET /v3/iotmanage/device-inspections/{DEVICE_SN}"),
            true
        )),
        "{wechat:?}"
    );
    assert!(received.iter().all(|r| r.signature_ok), "{received:?}");
    let status = daemon.status().await;
    assert_eq!(status["proxy"]["reachable"], true);
    assert_eq!(status["refresh"]["last_attempt_ok"], true);
    daemon.stop().await;
    lab.stop().await;
}

// === upstream faults ===

/// Each WeChat Pay fault reaches the daemon as its own code, retryable, and the held authinfo
/// stays; the proxy's error body names the platform's status and request id.
#[tokio::test]
async fn upstream_faults_reach_the_daemon_as_typed_retryable_errors_and_never_as_an_authinfo() {
    // Backoff far beyond the test, so that no background retry joins a refresh asked for here,
    // and no forced-refresh limit: the test forces one refresh per fault.
    let (dir, lab) = synced_lab(
        lab::world(0, 45),
        "[refresh]\nbackoff_min = \"24h\"\nbackoff_max = \"24h\"\nmin_forced_interval = \"0s\"\n",
    )
    .await;
    let daemon = TestDaemon::start_with_config(dir.clone(), &lab.daemon_config).await;
    assert_eq!(daemon.put_raw_data("RAW-1").await.status, 202);
    wait_for_authinfo_and_health(&daemon).await;
    let held = daemon.get("/v1/authinfo").await;
    let (held_authinfo, held_etag) = (held.json()["authinfo"].clone(), held.header("etag"));
    let a = device_a(&lab);
    let mut conn = ProxyConnection::open(&lab).await;

    let faults: [(&str, Fault, u16, &str); 5] = [
        (
            "500",
            Fault {
                status: Some(500),
                ..Fault::default()
            },
            502,
            codes::UPSTREAM_UNAVAILABLE,
        ),
        (
            "429 with Retry-After: 30",
            Fault {
                status: Some(429),
                retry_after: Some(30),
                ..Fault::default()
            },
            429,
            codes::UPSTREAM_RATE_LIMITED,
        ),
        (
            "bad signature",
            Fault {
                bad_signature: true,
                ..Fault::default()
            },
            502,
            codes::UPSTREAM_BAD_SIGNATURE,
        ),
        (
            "timestamp 301 s old",
            Fault {
                stale_timestamp: Some(301),
                ..Fault::default()
            },
            502,
            codes::UPSTREAM_BAD_SIGNATURE,
        ),
        (
            "malformed body",
            Fault {
                malformed_body: true,
                ..Fault::default()
            },
            502,
            codes::UPSTREAM_MALFORMED,
        ),
    ];
    for (case, fault, proxy_status, code) in faults {
        // Armed until replaced: any call in this case meets it.
        lab.sandbox
            .state
            .faults
            .set(Platform::WechatPay, fault.clone());

        // The proxy's own answer.
        let r = conn
            .signed(&a, "POST", "/v1/authinfo", &authinfo_body("RAW-1"))
            .await;
        let body = assert_refused(&r, proxy_status, code);
        assert!(body.retryable, "{case}");
        let upstream = body
            .upstream
            .unwrap_or_else(|| panic!("{case}: upstream detail"));
        let expected_status = fault.status.unwrap_or(200);
        assert_eq!(upstream.status, expected_status, "{case}");
        assert!(
            upstream
                .request_id
                .as_deref()
                .is_some_and(|id| id.len() == 32),
            "{case}: WeChat Pay's Request-ID is passed on: {upstream:?}"
        );
        if fault.status == Some(429) {
            assert_eq!(body.retry_after_seconds, Some(30), "{case}");
            assert_eq!(r.header("retry-after").as_deref(), Some("30"), "{case}");
        }

        // The daemon's.
        let r = daemon
            .request("POST", "/v1/refresh?wait=true", &[], None)
            .await;
        assert_eq!(
            r.status,
            502,
            "{case}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.json()["code"], code, "{case}");
        let status = daemon.status().await;
        assert_eq!(status["refresh"]["last_attempt_ok"], false, "{case}");
        assert_eq!(status["refresh"]["last_error_code"], code, "{case}");
        assert_eq!(
            status["refresh"]["last_error_permanent"], false,
            "{case} is retryable"
        );
        assert_eq!(status["proxy"]["reachable"], true, "{case}");
        let r = daemon.get("/v1/authinfo").await;
        assert_eq!(
            r.json()["authinfo"],
            held_authinfo,
            "{case}: authinfo unchanged"
        );
        assert_eq!(r.header("etag"), held_etag, "{case}");
    }
    lab.sandbox.state.faults.clear(Platform::WechatPay);

    // A raw_data WeChat Pay refuses is permanent: retrying the same request will not help.
    let r = conn
        .signed(
            &a,
            "POST",
            "/v1/authinfo",
            &authinfo_body("REJECTED-RAW-DATA"),
        )
        .await;
    let body = assert_refused(&r, 422, codes::UPSTREAM_REJECTED);
    assert!(!body.retryable);
    let upstream = body.upstream.expect("upstream detail");
    assert_eq!(
        (upstream.status, upstream.code.as_deref()),
        (400, Some("PARAM_ERROR"))
    );
    assert!(upstream.request_id.is_some());
    assert_eq!(daemon.put_raw_data("REJECTED-RAW-DATA").await.status, 202);
    let r = daemon
        .request("POST", "/v1/refresh?wait=true", &[], None)
        .await;
    assert_eq!(r.json()["code"], codes::UPSTREAM_REJECTED);
    let status = daemon.status().await;
    assert_eq!(status["refresh"]["last_error_permanent"], true);
    assert_eq!(
        daemon.get("/v1/authinfo").await.json()["authinfo"],
        held_authinfo
    );
    let stored = daemon.state.store.authinfo().expect("held");
    assert_eq!(
        serde_json::Value::from(stored.authinfo),
        held_authinfo,
        "the store was not touched either"
    );
    daemon.stop().await;
    lab.stop().await;
}

/// Alipay's "device not bound" refusal is permanent only when Alipay signed it: the same
/// refusal unsigned (what a man in the middle could send to stop a terminal's checks) is an
/// untrusted, retryable answer, as alipay-sdk-python treats it.
#[tokio::test]
async fn an_unsigned_alipay_refusal_is_not_trusted_and_stays_retryable() {
    let mut world = lab::world(0, 45);
    world.alipay_bindings.clear();
    let (_dir, lab) = synced_lab(world, "").await;
    let a = device_a(&lab);
    let mut conn = ProxyConnection::open(&lab).await;

    let r = conn.signed(&a, "GET", "/v1/alipay-binding", b"").await;
    let body = assert_refused(&r, 422, codes::UPSTREAM_REJECTED);
    assert!(!body.retryable, "a signed DEVICE_NOT_EXIST is permanent");
    assert_eq!(
        body.upstream.and_then(|u| u.code).as_deref(),
        Some("DEVICE_NOT_EXIST")
    );

    lab.sandbox.state.faults.set(
        Platform::Alipay,
        Fault {
            unsigned_answer: true,
            count: Some(1),
            ..Fault::default()
        },
    );
    let r = conn.signed(&a, "GET", "/v1/alipay-binding", b"").await;
    let body = assert_refused(&r, 502, codes::UPSTREAM_BAD_SIGNATURE);
    assert!(body.retryable, "an unsigned refusal is not taken as final");
    assert!(
        body.message.contains("no sign") && body.message.contains("unverified"),
        "{}",
        body.message
    );
    let sent: Vec<String> = upstream_calls(&lab)
        .into_iter()
        .filter(|c| c.starts_with("POST /gateway.do"))
        .collect();
    assert_eq!(sent.len(), 2, "{sent:?}");
    lab.stop().await;
}

// === fleet ===

/// When each device-list request arrived at the sandbox.
fn list_arrivals(lab: &Lab) -> Vec<Instant> {
    lab.sandbox
        .state
        .received()
        .into_iter()
        .filter(|r| r.request.starts_with("GET /v3/iotmanage/devices?"))
        .map(|r| r.at)
        .collect()
}

#[tokio::test]
async fn fleet_sync_pages_261_devices_within_the_configured_rate_and_lists_them() {
    let (_dir, lab) = synced_lab_with(
        lab::world(260, 45),
        "[fleet]\nrequests_per_second = 2\n",
        "",
    )
    .await;
    let fleet = lab.proxy.app.fleet.clone();
    // Two pages fit in one second; the third is sent only once the first answer is a second
    // old, so WeChat Pay (which counts arrivals) never sees three within a second.
    let pages = list_arrivals(&lab);
    assert!(
        pages[2] - pages[0] >= Duration::from_secs(1),
        "3 pages at 2 requests/second arrive over more than a second: {:?}",
        pages[2] - pages[0]
    );
    assert_eq!(
        list_calls(&lab),
        [0, 100, 200]
            .map(|o| format!("GET /v3/iotmanage/devices?offset={o}&limit=100"))
            .to_vec(),
        "three pages, none refused (a 429 would show as a repeated offset)"
    );
    let snapshot = fleet.snapshot();
    assert_eq!(snapshot.devices.len(), 261);
    let world = lab.sandbox.state.world();
    assert_eq!(
        snapshot.devices, world.wechat_devices,
        "every device, in order"
    );

    // The admin listener serves the same list, and the table shows it.
    let admin = authinfod::proxy::admin_fleet(lab.proxy.admin_addr, None)
        .await
        .expect("admin /fleet");
    assert_eq!(admin.devices, snapshot.devices);
    assert_eq!(admin.synced_at, snapshot.synced_at);
    let table = fleet::render_table(&admin);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines.len(),
        1 + 261 + 1,
        "header, one row per device, summary"
    );
    assert!(lines[0].starts_with("DEVICE_SN"));
    assert!(lines[1].starts_with(DEVICE_SN) && lines[1].contains("ACTIVATED"));
    assert!(lines[10].starts_with("SANDBOX0000002008"));
    assert!(lines[11].contains("INACTIVATED"), "{}", lines[11]);
    assert!(
        lines[262].starts_with("261 device(s), 235 activated; synced "),
        "{}",
        lines[262]
    );
    // In a terminal the columns line up under their headings, the Chinese names WeChat Pay
    // gives categories, classes and scenes (two columns per character) included.
    let header_columns = cell_columns(lines[0]);
    assert_eq!(header_columns.len(), 8);
    for line in &lines[1..262] {
        assert_eq!(cell_columns(line), header_columns, "{line}\n{}", lines[0]);
    }
    lab.stop().await;
}

/// The terminal columns where each cell of a table line starts (cells are separated by two or
/// more spaces; East Asian wide characters take two columns).
fn cell_columns(line: &str) -> Vec<usize> {
    let width = |c: char| match u32::from(c) {
        0x1100..=0x115F | 0x2E80..=0xA4CF | 0xAC00..=0xD7A3 | 0xF900..=0xFAFF | 0xFF00..=0xFF60 => {
            2
        }
        _ => 1,
    };
    let (mut columns, mut column, mut spaces) = (Vec::new(), 0, 2);
    for c in line.chars() {
        if c == ' ' {
            spaces += 1;
        } else {
            if spaces >= 2 {
                columns.push(column);
            }
            spaces = 0;
        }
        column += width(c);
    }
    columns
}

/// The most arrivals within any one second (a window `[t, t + 1 s)` opening at an arrival).
fn most_in_one_second(arrivals: &[Instant]) -> usize {
    let mut seen = arrivals.to_vec();
    seen.sort();
    (0..seen.len())
        .map(|i| {
            seen[i..]
                .iter()
                .take_while(|t| **t - seen[i] < Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// A few hundred devices in pages of 20 at 3 requests/second, with up to 400 ms of network
/// jitter each way: where the requests arrive (the sandbox, which counts like WeChat Pay and
/// admits 3 a second here), no one-second window ever holds more than 3, and nothing is refused.
/// A pacer that counted from the send would lose here: a request held up on the way arrives late
/// and lands in the same second as the ones sent a second after it.
#[tokio::test]
async fn fleet_sync_under_jittered_latency_never_gives_wechat_pay_more_than_the_limit_in_a_second()
{
    let mut world = lab::world(299, 45);
    world.wechat_list_page_cap = Some(20);
    world.wechat_list_requests_per_second = Some(3);
    world.armed_faults.push((
        Platform::WechatPay,
        Fault {
            latency_jitter: Some(Duration::from_millis(400)),
            target_contains: Some("/v3/iotmanage/devices?".into()),
            ..Fault::default()
        },
    ));
    let (_dir, lab) = synced_lab_with(world, "[fleet]\nrequests_per_second = 3\n", "").await;
    let fleet = lab.proxy.app.fleet.clone();
    assert_eq!(
        list_calls(&lab),
        (0..15)
            .map(|page| format!("GET /v3/iotmanage/devices?offset={}&limit=100", page * 20))
            .collect::<Vec<_>>(),
        "fifteen pages of 20, each asked for once: no 429 and no retry"
    );
    let arrivals = list_arrivals(&lab);
    let worst = most_in_one_second(&arrivals);
    assert!(
        worst <= 3,
        "{worst} device-list requests arrived within one second: {arrivals:?}"
    );
    assert_eq!(fleet.snapshot().devices.len(), 300);
    lab.stop().await;
}

#[tokio::test]
async fn fleet_sync_backs_off_on_a_429_and_still_completes() {
    // One 429 for the third page, armed before the proxy's first request.
    let mut world = lab::world(260, 45);
    world.armed_faults.push((
        Platform::WechatPay,
        Fault {
            status: Some(429),
            retry_after: Some(1),
            count: Some(1),
            target_contains: Some("offset=200".into()),
            ..Fault::default()
        },
    ));
    let (_dir, lab) = synced_lab_with(world, "[fleet]\nrequests_per_second = 2\n", "").await;
    let fleet = lab.proxy.app.fleet.clone();
    assert_eq!(
        list_calls(&lab),
        [0, 100, 200, 200]
            .map(|o| format!("GET /v3/iotmanage/devices?offset={o}&limit=100"))
            .to_vec(),
        "the rate-limited page is asked for again"
    );
    let pages = list_arrivals(&lab);
    assert!(
        pages[3] - pages[2] >= Duration::from_secs(1),
        "Retry-After: 1 was honoured between the refused page and its retry: {:?}",
        pages[3] - pages[2]
    );
    assert_eq!(fleet.snapshot().devices.len(), 261);
    lab.stop().await;
}

/// The day's device-list budget is the merchant's, kept in the proxy's store: `serve`'s
/// start-up sync, `devices --live` through the running proxy, `devices --live` with the proxy
/// stopped and a restarted proxy all count in it, and WeChat Pay never gets more than
/// `requests_per_day` (10 here, 3 pages a sync).
#[tokio::test]
async fn the_daily_device_list_budget_is_shared_by_serve_its_restarts_and_devices_live() {
    let mut world = lab::world(59, 45);
    world.wechat_list_page_cap = Some(20);
    let (_dir, lab) = synced_lab_with(world, "[fleet]\nrequests_per_day = 10\n", "").await;
    let load = || lab_proxy_config(&lab.files);
    assert_eq!(list_calls(&lab).len(), 3, "serve's start-up sync");

    // `devices --live` while the proxy runs: the proxy pages it, in its budget.
    let live = proxy_lib::fleet_live(load(), lab.proxy.admin_addr)
        .await
        .expect("devices --live through the admin listener");
    assert_eq!(live.devices.len(), 60);
    assert_eq!(list_calls(&lab).len(), 6);

    // With the proxy stopped, `devices --live` opens the store itself: same budget, and the
    // cache it leaves is what the next `serve` starts from.
    let Lab {
        proxy,
        sandbox,
        files,
        ..
    } = lab;
    let admin = proxy.admin_addr;
    proxy.stop().await;
    let offline = proxy_lib::fleet_live(lab_proxy_config(&files), admin)
        .await
        .expect("devices --live on the store");
    assert_eq!(offline.devices.len(), 60);
    let calls = |sandbox: &authinfod::sandbox::RunningSandbox| {
        sandbox
            .state
            .received()
            .iter()
            .filter(|r| r.request.starts_with("GET /v3/iotmanage/devices?"))
            .count()
    };
    assert_eq!(calls(&sandbox), 9);

    // A restarted proxy finds the count (and the fresh cache: no start-up sync).
    let restarted = proxy_lib::start(lab_proxy_config(&files))
        .await
        .expect("restart");
    assert_eq!(restarted.app.fleet.snapshot().synced_at, offline.synced_at);
    let refused = proxy_lib::fleet_live(lab_proxy_config(&files), restarted.admin_addr)
        .await
        .expect_err("the budget runs out on the second page");
    assert!(
        matches!(&refused, ProxyError::AdminRefused(r) if r.code == SyncRefusalCode::DailyBudgetSpent),
        "{refused:?}"
    );
    assert_eq!(calls(&sandbox), 10, "requests_per_day, and not one more");
    assert_eq!(
        restarted.app.fleet.snapshot().synced_at,
        offline.synced_at,
        "a sync cut short keeps the cached list"
    );

    // While it runs, its store is not opened a second time: an admin address where nothing
    // answers is an error naming both, not a second count.
    let nobody = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr");
    let busy = proxy_lib::fleet_live(lab_proxy_config(&files), nobody)
        .await
        .expect_err("the store is held");
    assert!(matches!(busy, ProxyError::StoreBusy { .. }), "{busy:?}");
    restarted.stop().await;

    // And with nothing running, the spent budget refuses before any request.
    let spent = proxy_lib::fleet_live(lab_proxy_config(&files), admin)
        .await
        .expect_err("spent");
    assert!(
        matches!(
            &spent,
            ProxyError::Fleet(FleetError::DailyBudget { limit: 10, .. })
        ),
        "{spent:?}"
    );
    assert_eq!(calls(&sandbox), 10);
    sandbox.stop().await;
}

/// `devices --live` while the proxy's own sync runs waits for it and takes its list: one
/// paging of the list, not two, out of the day's budget (whichever of the two starts first).
#[tokio::test]
async fn devices_live_during_a_sync_takes_that_sync_instead_of_paging_again() {
    let mut world = lab::world(59, 45);
    world.wechat_list_page_cap = Some(20);
    world.armed_faults.push((
        Platform::WechatPay,
        Fault {
            latency: Some(Duration::from_millis(500)),
            target_contains: Some("/v3/iotmanage/devices?".into()),
            ..Fault::default()
        },
    ));
    let (_dir, lab) = start_lab(world, "", "").await;
    let live = proxy_lib::fleet_live(lab_proxy_config(&lab.files), lab.proxy.admin_addr)
        .await
        .expect("devices --live");
    assert_eq!(live.devices.len(), 60);
    let fleet = lab.proxy.app.fleet.clone();
    wait_until("the start-up sync is done", || {
        fleet.snapshot().synced_at.is_some()
    })
    .await;
    assert_eq!(list_calls(&lab).len(), 3, "{:?}", list_calls(&lab));
    lab.stop().await;
}

#[tokio::test]
async fn inactivated_and_unlisted_devices_get_403_and_nothing_is_forwarded() {
    let (_dir, lab) = synced_lab(lab::world(0, 45), "").await;
    let a = device_a(&lab);
    let mut conn = ProxyConnection::open(&lab).await;
    let r = conn.signed(&a, "GET", "/v1/inspection", b"").await;
    assert_eq!(r.status, 200, "activated: served");

    // WeChat Pay now lists A as INACTIVATED; the next sync picks it up.
    lab.sandbox.state.update_world(|w| {
        w.wechat_devices[0].activation_status = Some("INACTIVATED".into());
    });
    let synced = lab
        .proxy
        .app
        .fleet
        .sync(&lab.proxy.app.wechat)
        .await
        .expect("sync");
    assert_eq!(synced, 1);
    // B is enrolled here but not in WeChat Pay's list.
    let b = append_device_b(&lab, UNLISTED_SN);
    lab.proxy.reload_registry();

    let before = upstream_calls(&lab);
    for (route, method, body) in [
        ("/v1/authinfo", "POST", authinfo_body("RAW-1")),
        ("/v1/inspection", "GET", Vec::new()),
        ("/v1/alipay-binding", "GET", Vec::new()),
        ("/v1/licence", "GET", Vec::new()),
    ] {
        let r = conn.signed(&a, method, route, &body).await;
        let refusal = assert_refused(&r, 403, codes::DEVICE_INACTIVATED);
        assert!(!refusal.retryable, "{route}");
        let r = conn.signed(&b, method, route, &body).await;
        let refusal = assert_refused(&r, 403, codes::DEVICE_NOT_IN_FLEET);
        assert!(!refusal.retryable, "{route}");
    }
    assert_eq!(upstream_calls(&lab), before, "nothing reached a platform");
    lab.stop().await;
}

// === registry reload ===

#[tokio::test]
async fn registry_reload_admits_a_new_device_without_dropping_open_connections() {
    let (_dir, lab) = synced_lab(lab::world(1, 45), "").await;
    let a = device_a(&lab);
    let mut conn = ProxyConnection::open(&lab).await;
    let r = conn.signed(&a, "GET", "/v1/licence", b"").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    let b = append_device_b(&lab, DEVICE_B_SN);
    let r = conn
        .signed(&b, "POST", "/v1/authinfo", &authinfo_body("RAW-B"))
        .await;
    assert_refused(&r, 401, codes::UNKNOWN_DEVICE);
    lab.proxy.reload_registry();

    assert!(conn.is_open(), "the reload kept the connection");
    let r = conn
        .signed(&b, "POST", "/v1/authinfo", &authinfo_body("RAW-B"))
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = conn.signed(&a, "GET", "/v1/licence", b"").await;
    assert_eq!(r.status, 200, "A still served");
    assert!(conn.is_open());
    lab.stop().await;
}

#[tokio::test]
async fn a_broken_registry_on_reload_keeps_the_previous_one() {
    let (_dir, lab) = synced_lab(lab::world(0, 45), "").await;
    let a = device_a(&lab);
    let path = lab.files.path("devices.toml");
    let good = std::fs::read_to_string(&path).expect("registry");
    let mut conn = ProxyConnection::open(&lab).await;
    let traversal = good.replace(
        &format!("device_sn = \"{DEVICE_SN}\""),
        "device_sn = \"../../v3/iotmanage/devices\"",
    );
    assert_ne!(traversal, good);
    for broken in [
        "[[device]]\nthis is not toml".to_owned(),
        "[[device]]\ndevice_id = \"T-1001\"\n".to_owned(),
        traversal,
    ] {
        std::fs::write(&path, &broken).expect("write");
        lab.proxy.reload_registry();
        let current = lab.proxy.app.registry.current();
        let kept = current
            .get(DEVICE_ID)
            .expect("the previous registry is kept");
        assert_eq!(kept.device_sn, DEVICE_SN);
        let r = conn.signed(&a, "GET", "/v1/inspection", b"").await;
        assert_eq!(r.status, 200, "A still served");
        assert_eq!(r.json()["device_sn"], DEVICE_SN);
    }
    lab.stop().await;
}

/// `authinfo-proxy serve` reloads on SIGHUP: [`authinfod::proxy::run`] is started here with the
/// lab's config and gets a real SIGHUP.
#[tokio::test]
async fn sighup_reloads_the_registry_of_a_running_proxy() {
    let (dir, lab) = synced_lab(lab::world(1, 45), "").await;
    let mut config = lab_proxy_config(&lab.files);
    let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = free.local_addr().expect("addr");
    drop(free);
    config.listen = addr;
    config.state_dir = dir.path().join("second-proxy-state");
    config.fleet.enabled = false;
    let stop = tokio_util::sync::CancellationToken::new();
    let token = stop.clone();
    let running = tokio::spawn(authinfod::proxy::run(config, async move {
        token.cancelled().await;
    }));
    let deadline = Instant::now() + crate::support::GENEROUS;
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "the proxy listens");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut conn = ProxyConnection::open_to(&lab, addr).await;
    let b = append_device_b(&lab, DEVICE_B_SN);
    let r = conn.signed(&b, "GET", "/v1/licence", b"").await;
    assert_refused(&r, 401, codes::UNKNOWN_DEVICE);
    // `run` installs its SIGHUP handler before it binds, so one signal sent once the proxy
    // answers reloads (with no handler yet, it would end this test process). The reload itself
    // runs on the proxy's task: poll until B is admitted.
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    loop {
        let r = conn
            .signed(&b, "POST", "/v1/authinfo", &authinfo_body("RAW-B"))
            .await;
        if r.status == 200 {
            break;
        }
        assert_refused(&r, 401, codes::UNKNOWN_DEVICE);
        assert!(Instant::now() < deadline, "SIGHUP reloaded the registry");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(conn.is_open(), "the reload kept the connection");
    let r = conn
        .signed(&device_a(&lab), "GET", "/v1/licence", b"")
        .await;
    assert_eq!(r.status, 200, "A still served");
    drop(conn);
    stop.cancel();
    running.await.expect("join").expect("run ends cleanly");
    lab.stop().await;
}

// === the admin listener ===

/// A plain HTTP/1.0 GET to the proxy's admin listener: (status line, body).
pub(crate) async fn admin_get(lab: &Lab, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(lab.proxy.admin_addr)
        .await
        .expect("connect to the admin listener");
    tcp.write_all(format!("GET {path} HTTP/1.0\r\nhost: admin\r\n\r\n").as_bytes())
        .await
        .expect("send");
    let mut text = String::new();
    tcp.read_to_string(&mut text)
        .await
        .expect("read the answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
    let status = head.lines().next().unwrap_or_default().to_owned();
    (status, body.to_owned())
}

/// `/healthz` and `/metrics` on the admin listener count what terminals and platforms did:
/// requests by route and outcome, refused authentications by reason, upstream latency and the
/// fleet's size.
#[tokio::test]
async fn admin_listener_reports_health_and_counts_requests_refusals_and_upstream_calls() {
    let (_dir, lab) = synced_lab(lab::world(4, 45), "").await;
    let mut conn = ProxyConnection::open(&lab).await;
    let r = conn
        .signed(
            &device_a(&lab),
            "POST",
            "/v1/authinfo",
            &authinfo_body("RAW-1"),
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let impostor = signer(DEVICE_ID, device_key());
    for _ in 0..2 {
        let r = conn
            .signed(&impostor, "POST", "/v1/authinfo", &authinfo_body("RAW-1"))
            .await;
        assert_refused(&r, 401, codes::BAD_SIGNATURE);
    }

    let (status, body) = admin_get(&lab, "/healthz").await;
    assert!(status.contains(" 200 "), "{status}");
    let health: serde_json::Value = serde_json::from_str(&body).expect("healthz is JSON");
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["registry_devices"], 1, "{health}");
    assert_eq!(health["fleet_enabled"], true, "{health}");
    assert_eq!(health["fleet_devices"], 5, "{health}");

    let (status, text) = admin_get(&lab, "/metrics").await;
    assert!(status.contains(" 200 "), "{status}");
    for line in [
        "authinfo_proxy_requests_total{route=\"/v1/authinfo\",status=\"200\",outcome=\"ok\"} 1",
        "authinfo_proxy_requests_total{route=\"/v1/authinfo\",status=\"401\",outcome=\"bad_signature\"} 2",
        "authinfo_proxy_auth_failures_total{reason=\"bad_signature\"} 2",
        "authinfo_proxy_registry_devices 1",
        "authinfo_proxy_fleet_devices 5",
        "# TYPE authinfo_proxy_upstream_seconds histogram",
        "# TYPE process_resident_memory_bytes gauge",
    ] {
        assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
    }
    // The one authinfo call a terminal caused (the fleet sync shows in the fleet gauges).
    let count = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("authinfo_proxy_upstream_seconds_count{platform=\"wechatpay\"} ")
        })
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no wechatpay latency count in\n{text}"));
    assert_eq!(count, 1, "timed WeChat Pay calls");
    assert!(
        text.contains(
            "authinfo_proxy_upstream_seconds_bucket{platform=\"wechatpay\",le=\"+Inf\"} "
        ),
        "{text}"
    );
    lab.stop().await;
}

// === check-config ===

#[test]
fn check_config_passes_the_lab_config_and_refuses_a_key_readable_by_others_by_name() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let generated = lab::write_keys(dir.path(), crate::support::lab_keys()).expect("keys");
    let files = lab::LabFiles {
        dir: dir.path().to_owned(),
    };
    files
        .write_registry(&generated.device_public)
        .expect("registry");
    let config = files
        .write_proxy_config(
            &generated,
            &lab::ProxyConfigSpec {
                listen: "127.0.0.1:8443",
                admin_listen: "127.0.0.1:9464",
                ..lab::ProxyConfigSpec::new("https://127.0.0.1:8600")
            },
        )
        .expect("config");
    let check = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_authinfo-proxy"))
            .arg("check-config")
            .arg(&config)
            .output()
            .expect("run authinfo-proxy")
    };
    let out = check();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("is valid") && stdout.contains("1 enrolled device(s)"),
        "{stdout}"
    );

    let key = files.path("wechatpay-merchant.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = check();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "EX_CONFIG: {stderr}");
    assert!(
        stderr.contains(&key.display().to_string()) && stderr.contains("644"),
        "the file is named: {stderr}"
    );
    assert!(stderr.contains("wechatpay.merchant_key"), "{stderr}");

    // The terminal listener's TLS is built at validation: a key that is not the certificate's
    // is refused by check-config, not first met when the proxy starts.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::copy(&key, files.path("proxy-tls.key")).expect("another private key");
    let out = check();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "EX_CONFIG: {stderr}");
    assert!(
        stderr.contains("tls_cert/tls_key") && !stderr.contains("wechatpay.merchant_key"),
        "only the TLS pair is named: {stderr}"
    );
}

// === limits: no terminal can burn the merchant's quota ===

/// WeChat Pay in these labs admits 10 authinfo requests of the merchant an hour, whoever sends
/// them, as its per-merchant limits do: the flooder's budget (5) and the other terminal's 4
/// fit, the flooder's first 10 alone do not leave the other one.
fn world_with_merchant_limit() -> World {
    World {
        authinfo_limit: Some(authinfod::sandbox::AuthinfoLimit {
            requests: 10,
            window: Duration::from_secs(3600),
        }),
        ..lab::world(1, 45)
    }
}

/// What one round of [`flood`] got: the flooder's and the other terminal's answers.
struct Flooded {
    flooder: Vec<Reply>,
    other: Vec<Reply>,
}

/// Device B, enrolled, signs 40 valid, distinct `POST /v1/authinfo` requests (each its own
/// nonce and signature); device A, another terminal, refreshes after every tenth.
async fn flood(lab: &Lab) -> Flooded {
    let b = append_device_b(lab, DEVICE_B_SN);
    lab.proxy.reload_registry();
    let a = device_a(lab);
    let mut conn = ProxyConnection::open(lab).await;
    let body = authinfo_body("RAW-1");
    let (mut flooder, mut other) = (Vec::new(), Vec::new());
    for i in 1..=40 {
        flooder.push(conn.signed(&b, "POST", "/v1/authinfo", &body).await);
        if i % 10 == 0 {
            other.push(conn.signed(&a, "POST", "/v1/authinfo", &body).await);
        }
    }
    Flooded { flooder, other }
}

fn authinfo_calls(lab: &Lab) -> usize {
    upstream_calls(lab)
        .iter()
        .filter(|r| r.as_str() == "POST /v3/offlineface/authinfo")
        .count()
}

/// A terminal signing a flood of valid, distinct requests gets its bucket (5 here), then 429
/// DEVICE_RATE_LIMITED with Retry-After, and nothing more of it reaches WeChat Pay; another
/// terminal keeps refreshing throughout. The flood is counted in `/metrics` by route and logged
/// once, not per request.
#[tokio::test]
async fn a_flooding_terminal_gets_429_after_its_budget_and_the_others_keep_refreshing() {
    let (_dir, lab) = synced_lab_with(
        world_with_merchant_limit(),
        "[limits]\nauthinfo_burst = 5\nauthinfo_every = \"1h\"\n",
        "",
    )
    .await;
    let (logs, _guard) = capture();
    let flooded = flood(&lab).await;

    let statuses: Vec<u16> = flooded.flooder.iter().map(|r| r.status).collect();
    assert_eq!(statuses[..5], [200; 5], "the bucket: {statuses:?}");
    for r in &flooded.flooder[5..] {
        let body = assert_refused(r, 429, codes::DEVICE_RATE_LIMITED);
        assert!(body.retryable);
        let after = body.retry_after_seconds.expect("retry_after_seconds");
        // One token an hour; the first came back an hour after the first request.
        assert!((3000..=3600).contains(&after), "{after}");
        assert_eq!(r.header("retry-after"), Some(after.to_string()));
        assert!(
            body.message.contains("5 at once, then one every 1h"),
            "{}",
            body.message
        );
    }
    for r in &flooded.other {
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert!(r.json()["authinfo"].as_str().is_some());
    }
    assert_eq!(
        authinfo_calls(&lab),
        5 + 4,
        "only the flooder's budget and the other's refreshes reached WeChat Pay"
    );

    let (_, metrics) = admin_get(&lab, "/metrics").await;
    assert!(
        metrics.contains(
            "authinfo_proxy_rate_limited_total{route=\"/v1/authinfo\",limit=\"device\"} 35"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "authinfo_proxy_requests_total{route=\"/v1/authinfo\",status=\"429\",outcome=\"device_rate_limited\"} 35"
        ),
        "{metrics}"
    );
    let lines = logs.lines_with("rate limited");
    assert_eq!(lines.len(), 1, "one line per device per minute: {lines:#?}");
    assert!(
        lines[0].contains(&format!("device_id=\"{DEVICE_B_ID}\""))
            && lines[0].contains("code=DEVICE_RATE_LIMITED")
            && lines[0].contains("refused_since_last_line=1"),
        "{}",
        lines[0]
    );
    assert!(
        logs.lines_with("proxy::server: refused ").is_empty(),
        "no per-request refusal lines: {}",
        logs.text()
    );
    lab.stop().await;
}

/// The control: with the per-device limit out of the way, the same flood spends the merchant's
/// 10 authinfo requests and WeChat Pay refuses the other terminal too (what the limit prevents).
#[tokio::test]
async fn without_the_device_limit_a_flooding_terminal_starves_the_others() {
    let (_dir, lab) = synced_lab_with(
        world_with_merchant_limit(),
        "[limits]\nauthinfo_burst = 1000\n",
        "",
    )
    .await;
    let flooded = flood(&lab).await;
    assert!(
        flooded.flooder[..10].iter().all(|r| r.status == 200),
        "the flooder took the merchant's quota"
    );
    for r in &flooded.other {
        let body = assert_refused(r, 429, codes::UPSTREAM_RATE_LIMITED);
        assert_eq!(
            body.upstream.and_then(|u| u.code).as_deref(),
            Some("FREQUENCY_LIMITED")
        );
    }
    lab.stop().await;
}

/// Terminals together stay under the merchant's ceiling: with `wechatpay_per_second = 21` and
/// the fleet sync keeping its 20, terminals get one WeChat Pay call a second; of two requests
/// sent at once by two devices, one is answered 429 MERCHANT_RATE_LIMITED and not forwarded.
#[tokio::test]
async fn the_merchants_ceiling_leaves_the_fleet_syncs_share_and_refuses_before_forwarding() {
    let (_dir, lab) = synced_lab_with(
        lab::world(1, 45),
        "[limits]\nwechatpay_per_second = 21\n",
        "",
    )
    .await;
    let b = append_device_b(&lab, DEVICE_B_SN);
    lab.proxy.reload_registry();
    let a = device_a(&lab);
    let (mut conn_a, mut conn_b) = (
        ProxyConnection::open(&lab).await,
        ProxyConnection::open(&lab).await,
    );
    let before = authinfo_calls(&lab);
    let body = authinfo_body("RAW-1");
    let (ra, rb) = tokio::join!(
        conn_a.signed(&a, "POST", "/v1/authinfo", &body),
        conn_b.signed(&b, "POST", "/v1/authinfo", &body),
    );
    let mut statuses = [ra.status, rb.status];
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 429]);
    let refused = if ra.status == 429 { &ra } else { &rb };
    let refusal = assert_refused(refused, 429, codes::MERCHANT_RATE_LIMITED);
    assert_eq!(refusal.retry_after_seconds, Some(1));
    assert!(
        refusal
            .message
            .contains("ceiling of 1 wechatpay calls a second"),
        "{}",
        refusal.message
    );
    assert_eq!(
        authinfo_calls(&lab) - before,
        1,
        "the refused one was not forwarded"
    );
    let (_, metrics) = admin_get(&lab, "/metrics").await;
    assert!(
        metrics.contains(
            "authinfo_proxy_rate_limited_total{route=\"/v1/authinfo\",limit=\"merchant\"} 1"
        ),
        "{metrics}"
    );
    lab.stop().await;
}
