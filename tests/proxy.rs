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
use authinfod::proxy::fleet::{self, RateLimiter};
use authinfod::sandbox::{Fault, Platform, World};
use authinfod::terminal::doc::CheckState;
use authinfod::units::unix_now;
use authinfod::wire::auth::DeviceSigner;
use authinfod::wire::{ErrorBody, MAX_REQUEST_BODY, codes};
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use crate::support::{Reply, TestDaemon, device_key, wait_until};

/// Device B: enrolled by the tests that need a second terminal.
const DEVICE_B_ID: &str = "T-2002";
/// B's serial: the first extra device of `lab::world(n, ..)`, listed as ACTIVATED.
const DEVICE_B_SN: &str = "SANDBOX0000002000";
/// A serial WeChat Pay does not list for the merchant.
const UNLISTED_SN: &str = "SANDBOX0000009999";

// === the lab ===

/// Starts a lab in a fresh directory (the directory lives as long as the returned handle).
async fn start_lab(
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
async fn synced_lab(world: World, daemon_extra: &str) -> (Arc<tempfile::TempDir>, Lab) {
    let (dir, lab) = start_lab(world, "", daemon_extra).await;
    let fleet = lab.proxy.app.fleet.clone();
    wait_until("the proxy's first fleet sync is done", || {
        fleet.snapshot().synced_at.is_some()
    })
    .await;
    (dir, lab)
}

/// Every request the simulated platforms received so far, as `METHOD target`.
fn upstream_calls(lab: &Lab) -> Vec<String> {
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
fn device_a(lab: &Lab) -> DeviceSigner {
    let key = RsaSigner::from_file(&lab.files.path("device.key")).expect("device key");
    DeviceSigner::new(DEVICE_ID.into(), key)
}

/// A signer for `device_id` with `key`.
fn signer(device_id: &str, key: &GeneratedKey) -> DeviceSigner {
    DeviceSigner::new(
        device_id.into(),
        RsaSigner::from_pem(&key.private_pem, "test key").expect("key"),
    )
}

/// Enrols device B (the shared test key, serial `sn`) by appending it to the lab's registry
/// file; the running proxy sees it after a reload.
fn append_device_b(lab: &Lab, sn: &str) -> DeviceSigner {
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

fn authinfo_body(raw_data: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "raw_data": raw_data })).expect("json")
}

/// Parses a refusal and checks its status and code.
#[track_caller]
fn assert_refused(reply: &Reply, status: u16, code: &str) -> ErrorBody {
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
struct ProxyConnection {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    /// Ends when the connection closes.
    task: tokio::task::JoinHandle<()>,
}

impl ProxyConnection {
    async fn open(lab: &Lab) -> Self {
        Self::open_to(lab, lab.proxy.addr).await
    }

    async fn open_to(lab: &Lab, addr: SocketAddr) -> Self {
        let ca = std::fs::read_to_string(lab.files.path("proxy-ca.pem")).expect("proxy CA");
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
    async fn send(
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
    async fn signed_at(
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
    async fn signed(
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
    // Backoff far beyond the test, so that no background retry joins a refresh asked for here.
    let (dir, lab) = synced_lab(
        lab::world(0, 45),
        "[refresh]\nbackoff_min = \"24h\"\nbackoff_max = \"24h\"\n",
    )
    .await;
    let daemon = TestDaemon::start_with_config(dir.clone(), &lab.daemon_config).await;
    assert_eq!(daemon.put_raw_data("RAW-1").await.status, 202);
    let state = daemon.state.clone();
    wait_until("an authinfo is held and the health checks are done", || {
        let d = state.status().device;
        state.current().is_some()
            && [d.inspection.state, d.alipay_binding.state, d.licence.state]
                .iter()
                .all(|c| *c == CheckState::Ok)
    })
    .await;
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
    let (_dir, lab) = start_lab(
        lab::world(260, 45),
        "[fleet]\nrequests_per_second = 2\n",
        "",
    )
    .await;
    let fleet = lab.proxy.app.fleet.clone();
    wait_until("the fleet is synced", || {
        fleet.snapshot().synced_at.is_some()
    })
    .await;
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
    let admin = authinfod::proxy::admin_fleet(lab.proxy.admin_addr)
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
    let (_dir, lab) = start_lab(world, "[fleet]\nrequests_per_second = 2\n", "").await;
    let fleet = lab.proxy.app.fleet.clone();
    wait_until("the fleet is synced", || {
        fleet.snapshot().synced_at.is_some()
    })
    .await;
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
        .sync(&lab.proxy.app.wechat, &RateLimiter::new(20, 50_000))
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
    let mut config =
        authinfod::proxy::config::load(&lab.proxy_config).expect("the lab's proxy config");
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
async fn admin_get(lab: &Lab, path: &str) -> (String, String) {
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
        "authinfo_proxy_requests_total{route=\"/v1/authinfo\",outcome=\"OK\"} 1",
        "authinfo_proxy_requests_total{route=\"/v1/authinfo\",outcome=\"BAD_SIGNATURE\"} 2",
        "authinfo_proxy_auth_failures_total{reason=\"BAD_SIGNATURE\"} 2",
        "authinfo_proxy_registry_devices 1",
        "authinfo_proxy_fleet_devices 5",
        "# TYPE authinfo_proxy_upstream_seconds histogram",
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
            "https://127.0.0.1:8600",
            "127.0.0.1:8443",
            "127.0.0.1:9464",
            "",
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
}
