//! The terminal daemon driven through its real socket against a fake proxy over real TLS.

use std::time::Duration;

use authinfod::terminal::metrics::Denial;

use crate::support::fake_proxy::{FakeProxy, Script};
use crate::support::{
    NO_FORCED_LIMIT, TestDaemon, dead_url, device_key, socket_request, wait_until,
};

async fn proxy() -> FakeProxy {
    FakeProxy::start(&device_key().public.to_pem()).await
}

/// Starts a daemon with a first authinfo `A1` already fetched and served, and no forced-refresh
/// limit (its callers force one refresh per fault).
async fn daemon_with_authinfo(proxy: &FakeProxy) -> (TestDaemon, String) {
    proxy.script([Script::Authinfo("A1".into(), None)]);
    let daemon = TestDaemon::start(&proxy.url, &proxy.pki.ca_pem, NO_FORCED_LIMIT).await;
    let r = daemon.put_raw_data("RAW-1").await;
    assert_eq!(r.status, 202);
    let state = daemon.state.clone();
    wait_until("the first authinfo is served", || state.current().is_some()).await;
    let r = daemon.get("/v1/authinfo").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["authinfo"], "A1");
    let etag = r.header("etag").expect("etag");
    (daemon, etag)
}

#[tokio::test]
async fn raw_data_push_fetches_serves_and_long_poll_wakes_on_change() {
    let proxy = proxy().await;
    proxy.script([Script::Authinfo("A1".into(), Some(5400))]);
    let daemon = TestDaemon::start(&proxy.url, &proxy.pki.ca_pem, NO_FORCED_LIMIT).await;
    let t0 = std::time::Instant::now();

    let r = daemon.get("/v1/authinfo").await;
    assert_eq!(r.status, 503, "nothing before the first success");
    assert_eq!(r.json()["code"], "NO_AUTHINFO");
    assert_eq!(daemon.get("/healthz").await.status, 503);

    assert_eq!(daemon.put_raw_data("RAW-1").await.status, 202);
    let state = daemon.state.clone();
    wait_until("the first authinfo is served", || state.current().is_some()).await;

    let r = daemon.get("/v1/authinfo").await;
    assert_eq!(r.status, 200);
    let doc = r.json();
    assert_eq!(doc["authinfo"], "A1");
    assert_eq!(doc["state"], "fresh");
    assert!(doc["age_seconds"].as_u64().expect("age") <= t0.elapsed().as_secs() + 1);
    let etag = r.header("etag").expect("etag");
    assert_eq!(
        daemon.get("/v1/authinfo").await.header("etag"),
        Some(etag.clone()),
        "ETag is stable"
    );
    let r = daemon
        .request("GET", "/v1/authinfo", &[("if-none-match", &etag)], None)
        .await;
    assert_eq!(r.status, 304);
    assert_eq!(daemon.get("/healthz").await.status, 200);

    // The proxy got the raw_data in the contract's body, signed.
    let seen: Vec<_> = proxy
        .seen()
        .into_iter()
        .filter(|s| s.path == "/v1/authinfo")
        .collect();
    assert_eq!(seen.len(), 1);
    let body: serde_json::Value = serde_json::from_slice(&seen[0].body).expect("json body");
    assert_eq!(body, serde_json::json!({ "raw_data": "RAW-1" }));
    proxy.assert_all_requests_valid();

    // Validity from the platform's expires_in.
    let status = daemon.status().await;
    assert_eq!(status["authinfo"]["expiry_from_platform"], true);
    let runway = status["authinfo"]["runway_seconds"]
        .as_i64()
        .expect("runway");
    let age = status["authinfo"]["age_seconds"].as_i64().expect("age");
    assert!(
        runway <= 5400 && runway + age >= 5399,
        "runway {runway} s + age {age} s is the platform's 5400 s"
    );

    // A long-poll waits for a change and wakes when a refresh brings a new authinfo.
    let poll = {
        let (socket, etag) = (daemon.socket.clone(), etag.clone());
        tokio::spawn(async move {
            socket_request(
                &socket,
                "GET",
                "/v1/authinfo?wait=30",
                &[("if-none-match", &etag)],
                None,
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !poll.is_finished(),
        "the long-poll waits while nothing changes"
    );
    proxy.script([Script::Authinfo("A2".into(), None)]);
    let r = daemon
        .request("POST", "/v1/refresh?wait=true", &[], None)
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let woke = tokio::time::timeout(crate::support::GENEROUS, poll)
        .await
        .expect("woke")
        .expect("join");
    assert_eq!(woke.status, 200);
    assert_eq!(woke.json()["authinfo"], "A2");
    assert_ne!(woke.header("etag"), Some(etag));
    proxy.assert_all_requests_valid();
    daemon.stop().await;
}

/// Each fault: the refresh fails with a code, the held authinfo and its ETag stay, status shows
/// the error and whether the proxy was reached.
#[tokio::test]
async fn every_fault_leaves_the_held_authinfo_untouched_and_shows_in_status() {
    let proxy = proxy().await;
    let (daemon, etag) = daemon_with_authinfo(&proxy).await;
    let cases: Vec<(Script, &str, bool)> = vec![
        (
            Script::Error(500, "UPSTREAM_UNAVAILABLE", None),
            "UPSTREAM_UNAVAILABLE",
            true,
        ),
        (Script::Raw("{\"authinfo\": "), "MALFORMED_ANSWER", true),
        (Script::Raw("{\"authinfo\": \"\"}"), "EMPTY_AUTHINFO", true),
        (
            Script::Raw("{\"authinfo\": \"X\", \"expires_in\": 0}"),
            "MALFORMED_ANSWER",
            true,
        ),
        (
            Script::Raw("<html>not json</html>"),
            "MALFORMED_ANSWER",
            true,
        ),
    ];
    for (script, code, reached) in cases {
        proxy.script([script.clone()]);
        let r = daemon
            .request("POST", "/v1/refresh?wait=true", &[], None)
            .await;
        assert_eq!(
            r.status,
            502,
            "{script:?}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.json()["code"], code, "{script:?}");
        let r = daemon.get("/v1/authinfo").await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.json()["authinfo"],
            "A1",
            "{script:?} must not replace the authinfo"
        );
        assert_eq!(r.header("etag").as_deref(), Some(etag.as_str()));
        let status = daemon.status().await;
        assert_eq!(status["refresh"]["last_attempt_ok"], false, "{script:?}");
        assert_eq!(status["refresh"]["last_error_code"], code, "{script:?}");
        assert_eq!(status["proxy"]["reachable"], reached, "{script:?}");
        assert_eq!(status["authinfo"]["state"], "fresh");
    }
    let stored = daemon.state.store.authinfo().expect("held");
    assert_eq!(stored.authinfo, "A1", "the store was not touched either");
    proxy.assert_all_requests_valid();
    daemon.stop().await;
}

/// A proxy that accepts and never answers: the refresh ends with `PROXY_TIMEOUT` after the
/// configured timeout, whatever the machine's speed (the answer never comes), and the held
/// authinfo (stored before the start, so no call has to beat the short timeout) stays.
#[tokio::test]
async fn a_proxy_that_never_answers_times_out_and_leaves_the_held_authinfo() {
    use authinfod::terminal::store::{HeldAuthinfo, RawData, Store};
    let proxy = proxy().await;
    proxy.script([Script::Hang]);
    let dir = std::sync::Arc::new(tempfile::tempdir().expect("tempdir"));
    let now = authinfod::units::unix_now();
    {
        let (store, _) = Store::open(&dir.path().join("state")).expect("store");
        store
            .save_authinfo(&HeldAuthinfo {
                authinfo: "A1".into(),
                fetched_at: now,
                expires_at: now + 7200,
                expires_in: None,
                proxy_fetched_at: None,
            })
            .expect("seed authinfo");
        store
            .save_raw_data(&RawData {
                value: "RAW-1".into(),
                received_at: now,
                source: "socket".into(),
            })
            .expect("seed raw_data");
    }
    let config = crate::support::write_config_with_timeout(
        dir.path(),
        &proxy.url,
        &proxy.pki.ca_pem,
        "1s",
        "",
    );
    let daemon = TestDaemon::start_with_config(dir, &config).await;
    let etag = daemon.get("/v1/authinfo").await.header("etag");
    let r = daemon
        .request("POST", "/v1/refresh?wait=true", &[], None)
        .await;
    assert_eq!(r.status, 502, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["code"], "PROXY_TIMEOUT");
    let r = daemon.get("/v1/authinfo").await;
    assert_eq!(r.json()["authinfo"], "A1");
    assert_eq!(r.header("etag"), etag);
    let status = daemon.status().await;
    assert_eq!(status["refresh"]["last_error_code"], "PROXY_TIMEOUT");
    assert_eq!(status["proxy"]["reachable"], false);
    daemon.stop().await;
}

#[tokio::test]
async fn rate_limit_with_retry_after_delays_the_next_attempt_at_least_that_long() {
    let proxy = proxy().await;
    let (daemon, _) = daemon_with_authinfo(&proxy).await;
    proxy.script([Script::Error(429, "UPSTREAM_RATE_LIMITED", Some(120))]);
    let r = daemon
        .request("POST", "/v1/refresh?wait=true", &[], None)
        .await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["code"], "UPSTREAM_RATE_LIMITED");
    let state = daemon.state.clone();
    wait_until("the next attempt is scheduled", || {
        state.refresh_status().consecutive_failures == 1
    })
    .await;
    let status = daemon.status().await;
    let next = status["refresh"]["next_attempt_in_seconds"]
        .as_i64()
        .expect("next");
    assert!(next >= 118, "Retry-After: 120 honoured, next in {next} s");
    assert_eq!(daemon.get("/v1/authinfo").await.json()["authinfo"], "A1");
    daemon.stop().await;
}

#[tokio::test]
async fn permanent_refusal_stops_retries_and_shows_in_status() {
    let proxy = proxy().await;
    let (daemon, _) = daemon_with_authinfo(&proxy).await;
    proxy.script([Script::Error(422, "UPSTREAM_REJECTED", None)]);
    let r = daemon
        .request("POST", "/v1/refresh?wait=true", &[], None)
        .await;
    assert_eq!(r.json()["code"], "UPSTREAM_REJECTED");
    let status = daemon.status().await;
    assert_eq!(status["refresh"]["last_error_permanent"], true);
    assert!(
        status["refresh"]["next_attempt_in_seconds"]
            .as_i64()
            .expect("next")
            > 3000
    );
    daemon.stop().await;
}

#[tokio::test]
async fn connection_refused_keeps_the_authinfo_and_marks_the_proxy_unreachable() {
    let proxy = proxy().await;
    proxy.script([Script::Authinfo("A1".into(), None)]);
    let dir = {
        let daemon = TestDaemon::start(&proxy.url, &proxy.pki.ca_pem, "").await;
        daemon.put_raw_data("RAW").await;
        let state = daemon.state.clone();
        wait_until("served", || state.current().is_some()).await;
        daemon.stop().await
    };
    // Same store, proxy address where nothing listens.
    let daemon = TestDaemon::start_in(dir, &dead_url().await, &proxy.pki.ca_pem, "").await;
    let r = daemon
        .request("POST", "/v1/refresh?wait=true", &[], None)
        .await;
    assert_eq!(r.json()["code"], "PROXY_UNREACHABLE");
    assert_eq!(daemon.get("/v1/authinfo").await.json()["authinfo"], "A1");
    let status = daemon.status().await;
    assert_eq!(status["proxy"]["reachable"], false);
    assert!(
        status["refresh"]["last_error"]
            .as_str()
            .expect("error")
            .contains("Connection refused")
    );
    daemon.stop().await;
}

#[tokio::test]
async fn a_proxy_certificate_from_another_ca_is_refused() {
    let proxy = proxy().await;
    proxy.fallback(Script::Authinfo("EVIL".into(), None));
    let other = authinfod::tls::generate_pki("another CA", &["127.0.0.1"]).expect("pki");
    let daemon = TestDaemon::start(&proxy.url, &other.ca_pem, NO_FORCED_LIMIT).await;
    daemon.put_raw_data("RAW").await;
    let r = daemon
        .request("POST", "/v1/refresh?wait=true", &[], None)
        .await;
    assert_eq!(r.json()["code"], "PROXY_UNREACHABLE");
    assert!(
        proxy.seen().is_empty(),
        "no request got through the handshake"
    );
    assert_eq!(daemon.get("/v1/authinfo").await.status, 503);
    let status = daemon.status().await;
    let error = status["refresh"]["last_error"]
        .as_str()
        .expect("error")
        .to_lowercase();
    assert!(error.contains("certificate"), "{error}");
    daemon.stop().await;
}

#[tokio::test]
async fn a_skewed_clock_is_learned_from_the_proxy_date_and_retried_once() {
    let proxy = proxy().await;
    proxy.set_clock_offset(1000);
    proxy.script([Script::Authinfo("A1".into(), None)]);
    let daemon = TestDaemon::start(&proxy.url, &proxy.pki.ca_pem, "").await;
    let t0 = std::time::Instant::now();
    daemon.put_raw_data("RAW").await;
    let state = daemon.state.clone();
    wait_until("served", || state.current().is_some()).await;
    // The offset is learned to within the exchange's duration (and whole seconds each side).
    let slack = i64::try_from(t0.elapsed().as_secs()).expect("seconds") + 2;
    let near_1000 = 1000 - slack..=1000 + 2;
    let seen: Vec<_> = proxy
        .seen()
        .into_iter()
        .filter(|s| s.path == "/v1/authinfo")
        .collect();
    assert_eq!(seen.len(), 2, "one refused attempt, one retry");
    let skew = seen[1].timestamp - seen[0].timestamp;
    assert!(
        near_1000.contains(&skew),
        "the retry's timestamp moved by the offset: {skew}"
    );
    let status = daemon.status().await;
    let learned = status["proxy"]["clock_skew_seconds"]
        .as_i64()
        .expect("skew");
    assert!(near_1000.contains(&learned), "{learned}");
    proxy.assert_all_requests_valid();
    daemon.stop().await;
}

#[tokio::test]
async fn restart_with_the_proxy_down_serves_the_persisted_authinfo_at_once_with_its_age() {
    let proxy = proxy().await;
    let (daemon, etag) = daemon_with_authinfo(&proxy).await;
    let dir = daemon.stop().await;
    // The restart comes "two minutes later": the daemon's clock is shifted, nothing sleeps.
    let later = authinfod::terminal::RunOptions::default();
    later.clock.shift(120);
    let config = crate::support::write_config(dir.path(), &dead_url().await, &proxy.pki.ca_pem, "");
    let daemon = TestDaemon::start_with_options(dir, &config, later).await;
    // Served before any network call could have succeeded: the proxy is down.
    let r = daemon.get("/v1/authinfo").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["authinfo"], "A1");
    assert!(r.json()["age_seconds"].as_u64().expect("age") >= 120);
    assert_eq!(
        r.header("etag"),
        Some(etag),
        "same authinfo, same ETag across restarts"
    );
    assert_eq!(daemon.get("/healthz").await.status, 200);
    daemon.stop().await;
}

#[tokio::test]
async fn a_peer_outside_the_allow_list_gets_403_and_nothing_else() {
    let proxy = proxy().await;
    let daemon = TestDaemon::start(
        &proxy.url,
        &proxy.pki.ca_pem,
        "[socket]\nallowed_uids = [4242]\nallowed_gids = [4242]\n",
    )
    .await;
    for path in ["/v1/authinfo", "/v1/status", "/healthz"] {
        let r = daemon.get(path).await;
        assert_eq!(r.status, 403, "{path}");
        assert_eq!(r.json()["code"], "PEER_DENIED");
    }
    let r = daemon.put_raw_data("RAW").await;
    assert_eq!(r.status, 403);
    assert!(
        daemon.state.store.raw_data().is_none(),
        "a denied peer changes nothing"
    );
    assert_eq!(daemon.state.metrics.denials(Denial::NotAllowed), 4);
    daemon.stop().await;
}

#[tokio::test]
async fn garbage_oversized_headers_and_bodies_get_errors_and_the_next_client_is_served() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let proxy = proxy().await;
    let daemon = TestDaemon::start(&proxy.url, &proxy.pki.ca_pem, "").await;
    let raw_exchange = |bytes: Vec<u8>| {
        let socket = daemon.socket.clone();
        async move {
            let mut s = tokio::net::UnixStream::connect(&socket)
                .await
                .expect("connect");
            let _ = s.write_all(&bytes).await;
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
            String::from_utf8_lossy(&out).into_owned()
        }
    };
    let garbage = raw_exchange(b"\x00\x01\x02 this is not HTTP\r\n\r\n".to_vec()).await;
    assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage:?}");
    let mut big_header = b"GET /v1/status HTTP/1.1\r\nhost: x\r\nx-big: ".to_vec();
    big_header.extend(std::iter::repeat_n(b'a', 64 * 1024));
    big_header.extend_from_slice(b"\r\n\r\n");
    let answer = raw_exchange(big_header).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    let big_body = vec![b'x'; 100 * 1024];
    let r = daemon
        .request("PUT", "/v1/raw-data", &[], Some(&big_body))
        .await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["code"], "BODY_TOO_LARGE");
    let r = daemon
        .request("PUT", "/v1/raw-data", &[], Some(b"{not json"))
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["code"], "BAD_BODY");
    // Still serving.
    assert_eq!(daemon.get("/v1/status").await.status, 200);
    daemon.stop().await;
}

#[tokio::test]
async fn the_socket_file_has_the_configured_mode_and_is_removed_on_shutdown() {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
    let proxy = proxy().await;
    let daemon = TestDaemon::start(
        &proxy.url,
        &proxy.pki.ca_pem,
        "[socket]\nmode = \"0600\"\ngroup = \"root\"\n",
    )
    .await;
    let meta = std::fs::metadata(&daemon.socket).expect("socket exists");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.mode() & 0o777, 0o600);
    assert_eq!(meta.gid(), 0);
    let socket = daemon.socket.clone();
    daemon.stop().await;
    assert!(!socket.exists(), "the socket file is removed on shutdown");
}

#[tokio::test]
async fn device_route_answers_with_sections_for_every_check() {
    let proxy = proxy().await;
    let daemon = TestDaemon::start(
        &proxy.url,
        &proxy.pki.ca_pem,
        "[health]\nalipay_binding = false\n",
    )
    .await;
    let state = daemon.state.clone();
    // The fake proxy answers both remote checks with NOT_CONFIGURED; Alipay is switched off here
    // and never asked.
    wait_until("both remote checks ran", || {
        let text = state.metrics.render(&[], &[]);
        ["inspection", "licence"].iter().all(|check| {
            text.contains(&format!(
                "{{check=\"{check}\",outcome=\"not_configured\"}} 1"
            ))
        })
    })
    .await;
    let doc = daemon.get("/v1/device").await.json();
    for check in ["inspection", "alipay_binding", "licence"] {
        assert_eq!(doc[check]["state"], "not_configured", "{check}: {doc}");
    }
    daemon.stop().await;
}

/// systemd hears `READY=1` once the socket is bound (before any network call), `WATCHDOG=1`
/// while the loops run, `STATUS=` updates, and `STOPPING=1` on shutdown.
#[tokio::test]
async fn systemd_is_told_ready_after_bind_then_watchdog_status_and_stopping() {
    use authinfod::terminal::{Daemon, RunOptions, config, systemd::Notifier};
    let proxy = proxy().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = crate::support::write_config(dir.path(), &dead_url().await, &proxy.pki.ca_pem, "");
    let config = config::load(&path).expect("config");
    let notify = dir.path().join("notify");
    let listener = tokio::net::UnixDatagram::bind(&notify).expect("notify socket");
    let options = RunOptions {
        notifier: Notifier::new(Some(notify.into_os_string())),
        watchdog: Some(Duration::from_millis(400)),
        ..RunOptions::default()
    };
    let daemon = Daemon::start(config, options).await.expect("start");
    let socket = dir.path().join("authinfod.sock");
    let mut buf = vec![0; 4096];
    // Sent during start, so already waiting in the socket.
    let n = tokio::time::timeout(Duration::from_millis(100), listener.recv(&mut buf))
        .await
        .expect("READY was sent during start")
        .expect("recv");
    let ready = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(
        ready.starts_with("READY=1\nSTATUS=no authinfo yet"),
        "{ready}"
    );
    assert!(socket.exists(), "the socket is bound before READY");
    let stop = tokio_util::sync::CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(daemon.run(async move { token.cancelled().await }));
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + crate::support::GENEROUS;
    while !seen.iter().any(|m: &String| m == "WATCHDOG=1") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no WATCHDOG=1 in {seen:?}"
        );
        let n = tokio::time::timeout(crate::support::GENEROUS, listener.recv(&mut buf))
            .await
            .expect("a notification")
            .expect("recv");
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(seen.iter().any(|m| m.starts_with("STATUS=")), "{seen:?}");
    stop.cancel();
    task.await.expect("run");
    let mut last = String::new();
    while let Ok(Ok(n)) =
        tokio::time::timeout(Duration::from_millis(100), listener.recv(&mut buf)).await
    {
        last = String::from_utf8_lossy(&buf[..n]).into_owned();
        if last.starts_with("STOPPING=1") {
            break;
        }
    }
    assert!(
        last.starts_with("STOPPING=1"),
        "last notification: {last:?}"
    );
}

/// `authinfod check-config` predicts `run`: a missing key and a key others can read fail it
/// (exit 78, naming the file) as they fail `run`, an unknown field is listed beside the other
/// problems, and a config `run` accepts passes. Executes the built binary (skipped under qemu by
/// `scripts/cross`: an emulated test's child runs natively without the target's libraries).
#[test]
fn check_config_fails_where_run_fails_and_lists_every_problem() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = crate::support::write_config(dir.path(), "https://127.0.0.1:9", &ca_pem(), "");
    let key = dir.path().join("device.key");
    let check = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_authinfod"))
            .arg("check-config")
            .arg(&config)
            .output()
            .expect("run authinfod")
    };
    let out = check();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = check();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("key_file") && stderr.contains("644"),
        "{stderr}"
    );
    std::fs::remove_file(&key).expect("rm");
    let text = std::fs::read_to_string(&config).expect("read");
    std::fs::write(&config, format!("typo_field = 1\n{text}")).expect("write");
    let out = check();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("typo_field: unknown field") && stderr.contains("key_file: cannot read"),
        "both problems listed: {stderr}"
    );
}

/// A CA certificate for configs that never connect.
fn ca_pem() -> String {
    authinfod::tls::generate_pki("check-config test ca", &["localhost"])
        .expect("pki")
        .ca_pem
}

/// `run --once` (provisioning) fetches through the proxy, persists and returns without ever
/// binding the socket; the next start serves what it stored.
#[tokio::test]
async fn run_once_fetches_persists_and_never_binds_the_socket() {
    use authinfod::terminal::refresher::Outcome;
    use authinfod::terminal::store::{RawData, Store};
    let proxy = proxy().await;
    proxy.script([Script::Authinfo("ONCE-1".into(), Some(7200))]);
    let dir = std::sync::Arc::new(tempfile::tempdir().expect("tempdir"));
    {
        let (store, _) = Store::open(&dir.path().join("state")).expect("store");
        store
            .save_raw_data(&RawData {
                value: "RAW-1".into(),
                received_at: authinfod::units::unix_now(),
                source: "socket".into(),
            })
            .expect("raw_data");
    }
    let path = crate::support::write_config(dir.path(), &proxy.url, &proxy.pki.ca_pem, "");
    let config = authinfod::terminal::config::load(&path).expect("config");
    let report = authinfod::terminal::run_once(config, Default::default())
        .await
        .expect("run --once");
    assert_eq!(report.refresh, Outcome::Fetched);
    assert_eq!(
        report.held.as_ref().map(|h| h.held.authinfo.as_str()),
        Some("ONCE-1")
    );
    assert!(
        !dir.path().join("authinfod.sock").exists(),
        "the socket is never bound"
    );
    assert_eq!(report.health.len(), 3, "every enabled check ran once");
    proxy.assert_all_requests_valid();
    let daemon = TestDaemon::start_in(dir, &dead_url().await, &proxy.pki.ca_pem, "").await;
    assert_eq!(
        daemon.get("/v1/authinfo").await.json()["authinfo"],
        "ONCE-1"
    );
    daemon.stop().await;
}

/// The binary: `run --once` against a proxy that is down exits 3 and says why.
#[test]
fn binary_run_once_exits_3_with_the_reason_when_the_refresh_fails() {
    use authinfod::terminal::store::{RawData, Store};
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (store, _) = Store::open(&dir.path().join("state")).expect("store");
        store
            .save_raw_data(&RawData {
                value: "RAW-1".into(),
                received_at: authinfod::units::unix_now(),
                source: "socket".into(),
            })
            .expect("raw_data");
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead = format!(
        "https://127.0.0.1:{}",
        listener.local_addr().expect("addr").port()
    );
    drop(listener);
    let config = crate::support::write_config(dir.path(), &dead, &ca_pem(), "");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_authinfod"))
        .args(["run", "--once", "--config"])
        .arg(&config)
        .output()
        .expect("run authinfod");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("PROXY_UNREACHABLE"), "{stderr}");
    assert!(!dir.path().join("authinfod.sock").exists());
}

/// Metrics off the terminal: the textfile is written at start and rewritten when a new
/// authinfo arrives (no minute's wait), and the loopback listener serves `/metrics` (with the
/// process series and the text format's content type) and nothing else.
#[tokio::test]
async fn metrics_reach_a_textfile_and_a_loopback_listener() {
    let proxy = proxy().await;
    proxy.script([Script::Authinfo("M1".into(), None)]);
    let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = free.local_addr().expect("addr");
    drop(free);
    let dir = std::sync::Arc::new(tempfile::tempdir().expect("tempdir"));
    let textfile = dir.path().join("authinfod.prom");
    let extra = format!(
        "[metrics]\ntextfile = \"{}\"\nlisten = \"{addr}\"\n",
        textfile.display()
    );
    let daemon = TestDaemon::start_in(dir.clone(), &proxy.url, &proxy.pki.ca_pem, &extra).await;
    wait_until("the textfile is written", || {
        std::fs::read_to_string(&textfile).is_ok_and(|t| t.contains("authinfod_authinfo_present 0"))
    })
    .await;
    let first = std::fs::read_to_string(&textfile).expect("textfile");
    for gauge in [
        "authinfod_authinfo_age_seconds NaN",
        "authinfod_authinfo_runway_seconds 0",
    ] {
        assert!(
            first.contains(gauge),
            "gauges are always there: {gauge} in {first}"
        );
    }
    assert_eq!(daemon.put_raw_data("RAW-1").await.status, 202);
    wait_until("the textfile shows the new authinfo", || {
        std::fs::read_to_string(&textfile).is_ok_and(|t| t.contains("authinfod_authinfo_present 1"))
    })
    .await;
    let get = |path: &'static str| async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(format!("GET {path} HTTP/1.0\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .expect("send");
        let mut text = String::new();
        tcp.read_to_string(&mut text).await.expect("read");
        text
    };
    let page = get("/metrics").await;
    assert!(page.starts_with("HTTP/1.0 200"), "{page}");
    assert!(
        page.to_lowercase()
            .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
        "{page}"
    );
    for series in [
        "authinfod_authinfo_present 1",
        "process_resident_memory_bytes ",
        "process_open_fds ",
    ] {
        assert!(page.contains(series), "{series} in {page}");
    }
    assert!(!page.contains("M1"), "the secret never appears in metrics");
    assert!(get("/v1/authinfo").await.starts_with("HTTP/1.0 404"));
    daemon.stop().await;
}

/// `systemctl reload`: the allow-list, the proxy's CA (replaced in place) and the log level
/// change under the running daemon; the held authinfo stays served throughout; an invalid file
/// changes nothing.
#[tokio::test]
async fn a_reload_applies_the_allow_list_and_the_proxy_ca_and_keeps_the_authinfo() {
    let proxy = proxy().await;
    let (daemon, _) = daemon_with_authinfo(&proxy).await;
    let dir = daemon.dir.path().to_owned();
    // As the daemon was started: without the forced-refresh limit (the test forces one).
    let rewrite = |ca: &str, extra: &str| {
        crate::support::write_config(&dir, &proxy.url, ca, &format!("{extra}{NO_FORCED_LIMIT}"));
    };
    let served = || async { daemon.get("/v1/authinfo").await };

    rewrite(
        &proxy.pki.ca_pem,
        "[socket]\nallowed_uids = [4242]\nallowed_gids = [4242]\n",
    );
    let done = daemon.reloader.reload().expect("reloads");
    assert_eq!(done.applied, ["socket.allowed_uids/allowed_gids"]);
    assert!(done.need_restart.is_empty(), "{done:?}");
    let r = served().await;
    assert_eq!(r.status, 403, "the next connection meets the new list");
    assert_eq!(r.json()["code"], "PEER_DENIED");

    let other = authinfod::tls::generate_pki("another CA", &["127.0.0.1"]).expect("pki");
    rewrite(&other.ca_pem, "");
    let done = daemon.reloader.reload().expect("reloads");
    assert_eq!(
        done.applied,
        ["proxy.ca_file", "socket.allowed_uids/allowed_gids"]
    );
    let r = served().await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["authinfo"],
        "A1",
        "the held authinfo survives reloads"
    );
    proxy.fallback(Script::Authinfo("NOT-TRUSTED".into(), None));
    let r = daemon
        .request("POST", "/v1/refresh?wait=true", &[], None)
        .await;
    assert_eq!(
        r.json()["code"],
        "PROXY_UNREACHABLE",
        "the proxy's CA is no longer trusted"
    );
    assert_eq!(served().await.json()["authinfo"], "A1");

    rewrite(&proxy.pki.ca_pem, "");
    assert_eq!(
        daemon.reloader.reload().expect("reloads").applied,
        ["proxy.ca_file"]
    );
    proxy.script([Script::Authinfo("A2".into(), None)]);
    let r = daemon
        .request("POST", "/v1/refresh?wait=true", &[], None)
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(served().await.json()["authinfo"], "A2");

    // A field a reload cannot apply is named, beside what it did apply.
    crate::support::write_config(
        &dir,
        &proxy.url,
        &proxy.pki.ca_pem,
        "[refresh]\ninterval = \"10m\"\nmin_forced_interval = \"0s\"\n",
    );
    let config = dir.join("authinfod.toml");
    let text = std::fs::read_to_string(&config).expect("read");
    std::fs::write(&config, format!("log_level = \"debug\"\n{text}")).expect("write");
    let done = daemon.reloader.reload().expect("reloads");
    assert_eq!(done.applied, ["log_level"]);
    assert_eq!(done.need_restart, ["refresh"]);

    // An invalid file changes nothing.
    rewrite(
        &proxy.pki.ca_pem,
        "[socket]\nallowed_uids = [4242]\nmode = \"0666\"\n",
    );
    let err = daemon.reloader.reload().expect_err("invalid");
    assert!(
        err.to_string().contains("socket.mode") || format!("{err:?}").contains("socket.mode"),
        "{err:?}"
    );
    assert_eq!(served().await.status, 200, "the old allow-list is kept");
    std::fs::write(&config, "not toml [").expect("write");
    assert!(daemon.reloader.reload().is_err());
    assert_eq!(served().await.json()["authinfo"], "A2");
    daemon.stop().await;
}

/// The binary: SIGHUP reloads (the unit's `ExecReload`); the new `log_level` takes effect, so
/// the reload's own INFO line appears where INFO was filtered out before, and the daemon keeps
/// running until SIGTERM.
#[test]
fn binary_sighup_reloads_the_log_level_and_keeps_running() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = crate::support::write_config(dir.path(), "https://127.0.0.1:9", &ca_pem(), "");
    let text = std::fs::read_to_string(&config).expect("read");
    std::fs::write(&config, format!("log_level = \"warn\"\n{text}")).expect("write");
    let log = dir.path().join("stderr");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_authinfod"))
        .args(["run", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .env_remove("JOURNAL_STREAM")
        .env_remove("NOTIFY_SOCKET")
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("run authinfod");
    let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let wait = |what: &str, cond: &dyn Fn() -> bool| {
        let until = std::time::Instant::now() + crate::support::GENEROUS;
        while !cond() {
            assert!(std::time::Instant::now() < until, "{what}: {}", read());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let socket = dir.path().join("authinfod.sock");
    wait("the socket is bound", &|| socket.exists());
    assert!(
        !read().contains("authinfod starting"),
        "INFO is filtered out: {}",
        read()
    );
    std::fs::write(&config, format!("log_level = \"info\"\n{text}")).expect("write");
    kill(pid, Signal::SIGHUP).expect("SIGHUP");
    wait("the reload is logged at INFO", &|| {
        read().contains("config reloaded")
    });
    assert!(read().contains("log_level"), "{}", read());
    assert_eq!(
        child.try_wait().expect("wait"),
        None,
        "SIGHUP did not stop it"
    );
    kill(pid, Signal::SIGTERM).expect("SIGTERM");
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status:?}: {}", read());
}
