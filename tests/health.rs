//! Device health end to end: daemon → proxy → simulated WeChat Pay, Alipay and Alibaba Cloud over
//! real TLS, and the log lines an operator acts on.

use std::sync::Arc;
use std::time::Duration;

use authinfod::crypto::RsaSigner;
use authinfod::demo::lab::{self, Lab};
use authinfod::sandbox::{Fault, Platform};
use authinfod::terminal::device::Check;
use authinfod::terminal::doc::CheckState;
use authinfod::terminal::health::check_once;
use authinfod::terminal::proxy_client::{ProxyClient, Upstream};
use authinfod::terminal::{Daemon, RunOptions, config};
use authinfod::wire::auth::DeviceSigner;

use crate::support::logs::capture;
use crate::support::{TestDaemon, wait_until};

/// A daemon state and an upstream client for calling `check_once` directly.
async fn daemon_parts(lab: &Lab) -> (Daemon, Arc<dyn Upstream>) {
    let config = config::load(&lab.daemon_config).expect("daemon config");
    let key_file = config
        .key_file
        .file()
        .expect("the lab's device key is a file");
    let key = RsaSigner::from_file(key_file).expect("device key");
    let upstream: Arc<dyn Upstream> = Arc::new(
        ProxyClient::new(
            &config.proxy.url,
            &config.proxy.tls,
            DeviceSigner::new(config.device_id.clone(), key),
            crate::support::GENEROUS,
        )
        .expect("client"),
    );
    let daemon = Daemon::start(config, RunOptions::default())
        .await
        .expect("daemon");
    (daemon, upstream)
}

#[tokio::test]
async fn binding_licence_and_inspection_reach_the_device_route_through_real_tls() {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let lab = Lab::start_with_keys(
        dir.path(),
        crate::support::lab_keys(),
        lab::world(3, 90),
        "",
        "",
    )
    .await
    .expect("lab");
    let daemon = TestDaemon::start_with_config(dir.clone(), &lab.daemon_config).await;
    let state = daemon.state.clone();
    wait_until("all three checks have a value", || {
        let doc = serde_json::to_value(state.status().device).expect("json");
        ["inspection", "alipay_binding", "licence"]
            .iter()
            .all(|c| doc[c]["state"] == "ok")
    })
    .await;
    let doc = daemon.get("/v1/device").await.json();
    assert_eq!(doc["inspection"]["value"]["result"], "SUCCESS");
    assert_eq!(doc["inspection"]["value"]["device_sn"], lab::DEVICE_SN);
    assert_eq!(doc["alipay_binding"]["value"]["merchant_type"], "indirect");
    assert_eq!(doc["alipay_binding"]["value"]["pid"], "2088101112139885");
    assert_eq!(
        doc["licence"]["value"]["device_id"],
        lab::CLOUDAUTH_DEVICE_ID
    );
    assert_eq!(doc["licence"]["value"]["days_left"], 90);
    let expiry = doc["licence"]["value"]["expired_day"]
        .as_str()
        .expect("day");
    assert_eq!(expiry.len(), 10, "YYYY-MM-DD: {expiry}");
    for check in ["inspection", "alipay_binding", "licence"] {
        assert!(doc[check]["fetched_at"].is_string(), "{check}");
        assert!(doc[check]["last_error"].is_null(), "{check}");
    }
    // Each platform verified a signed call from the proxy for this device.
    let received = lab.sandbox.state.received();
    for (platform, what) in [
        (Platform::WechatPay, "device-inspections/SANDBOX0000001001"),
        (Platform::Alipay, "gateway.do"),
        (Platform::Aliyun, "/"),
    ] {
        assert!(
            received
                .iter()
                .any(|r| r.platform == platform && r.signature_ok && r.request.contains(what)),
            "{platform:?} saw no verified call for {what}: {received:#?}"
        );
    }
    // The human status shows them.
    let status: authinfod::terminal::doc::StatusDoc =
        serde_json::from_value(daemon.status().await).expect("status doc");
    let text = authinfod::terminal::client::render_status(&status);
    assert!(text.contains("health    inspection: SUCCESS"), "{text}");
    assert!(
        text.contains("indirect merchant, pid 2088101112139885"),
        "{text}"
    );
    assert!(text.contains("(90 days left)"), "{text}");
    daemon.stop().await;
    lab.stop().await;
}

#[tokio::test]
async fn licence_expiry_is_logged_at_warning_within_30_days_and_error_within_7_or_lapsed() {
    let (logs, _guard) = capture();
    let dir = tempfile::tempdir().expect("tempdir");
    let lab = Lab::start_with_keys(
        dir.path(),
        crate::support::lab_keys(),
        lab::world(0, 120),
        "",
        "",
    )
    .await
    .expect("lab");
    let (daemon, upstream) = daemon_parts(&lab).await;
    let state = daemon.state();
    let today = time::OffsetDateTime::now_utc().date();
    for (days, level, words) in [
        (120, "INFO", "licence valid"),
        (30, "WARN", "expires within 30 days"),
        (8, "WARN", "expires within 30 days"),
        (7, "ERROR", "expires within 7 days"),
        (-3, "ERROR", "has LAPSED"),
    ] {
        let expiry = (today + time::Duration::days(days))
            .to_string()
            .replace('-', "");
        lab.sandbox
            .state
            .update_world(|w| w.licences[0].expired_day = expiry.clone());
        logs.clear();
        check_once(Check::Licence, &state, upstream.as_ref())
            .await
            .expect("check");
        let lines = logs.lines_with("check=\"licence\"");
        assert!(
            lines.iter().any(|l| l.contains(level)
                && l.contains(words)
                && l.contains(&format!("days_left={days}"))),
            "{days} days: expected {level} '{words}' in {lines:#?}"
        );
        if level != "INFO" {
            assert!(
                !lines.iter().any(|l| l.contains(" INFO ")),
                "{days} days: {lines:#?}"
            );
        }
    }
    lab.stop().await;
}

#[tokio::test]
async fn inspection_warn_or_fail_and_an_unbound_device_are_logged_as_warnings() {
    let (logs, _guard) = capture();
    let dir = tempfile::tempdir().expect("tempdir");
    let lab = Lab::start_with_keys(
        dir.path(),
        crate::support::lab_keys(),
        lab::world(0, 120),
        "",
        "",
    )
    .await
    .expect("lab");
    let (daemon, upstream) = daemon_parts(&lab).await;
    let state = daemon.state();
    for (result, words) in [("WARN", "reported warnings"), ("FAIL", "FAILED")] {
        lab.sandbox.state.update_world(|w| {
            let i = w.inspections.get_mut(lab::DEVICE_SN).expect("inspection");
            i.result = result.into();
            i.errors = vec!["摄像头序列号为空".into()];
            i.warnings = vec!["该设备已经进行过出厂检查".into()];
        });
        logs.clear();
        check_once(Check::Inspection, &state, upstream.as_ref())
            .await
            .expect("check");
        let lines = logs.lines_with("check=\"inspection\"");
        assert!(
            lines.iter().any(|l| l.contains("WARN")
                && l.contains(words)
                && l.contains("摄像头序列号为空")
                && l.contains("该设备已经进行过出厂检查")),
            "{result}: {lines:#?}"
        );
    }
    // Alipay does not know the device: a warning that says so, not a generic failure.
    lab.sandbox
        .state
        .update_world(|w| w.alipay_bindings.clear());
    logs.clear();
    assert!(
        check_once(Check::AlipayBinding, &state, upstream.as_ref())
            .await
            .is_err()
    );
    let lines = logs.lines_with("check=\"alipay_binding\"");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("WARN") && l.contains("not bound in Alipay")),
        "{lines:#?}"
    );
    lab.stop().await;
}

/// A platform fault leaves the previous good result and shows the error beside it.
#[tokio::test]
async fn faults_in_either_platform_keep_the_previous_result_with_the_error_beside_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lab = Lab::start_with_keys(
        dir.path(),
        crate::support::lab_keys(),
        lab::world(0, 60),
        "",
        "",
    )
    .await
    .expect("lab");
    let (daemon, upstream) = daemon_parts(&lab).await;
    let state = daemon.state();
    for check in [Check::AlipayBinding, Check::Licence] {
        check_once(check, &state, upstream.as_ref())
            .await
            .expect("first check succeeds");
    }
    let device_json = || serde_json::to_value(state.status().device).expect("json");
    let before = device_json();
    for (check, platform, fault) in [
        (
            Check::AlipayBinding,
            Platform::Alipay,
            Fault {
                status: Some(500),
                ..Fault::default()
            },
        ),
        (
            Check::AlipayBinding,
            Platform::Alipay,
            Fault {
                bad_signature: true,
                ..Fault::default()
            },
        ),
        (
            Check::Licence,
            Platform::Aliyun,
            Fault {
                status: Some(503),
                ..Fault::default()
            },
        ),
        (
            Check::Licence,
            Platform::Aliyun,
            Fault {
                malformed_body: true,
                ..Fault::default()
            },
        ),
    ] {
        lab.sandbox.state.faults.set(platform, fault.clone());
        let result = check_once(check, &state, upstream.as_ref()).await;
        lab.sandbox.state.faults.clear(platform);
        let check = check.name();
        assert!(result.is_err(), "{check} with {fault:?}");
        let doc = device_json();
        assert_eq!(
            doc[check]["value"], before[check]["value"],
            "{check} kept its value under {fault:?}"
        );
        assert_eq!(doc[check]["fetched_at"], before[check]["fetched_at"]);
        assert_eq!(doc[check]["state"], "ok");
        let error = doc[check]["last_error"].as_str().expect("error shown");
        assert!(
            error.contains("UPSTREAM") || error.contains("upstream") || error.contains("502"),
            "{error}"
        );
    }
    // Survives a restart: the store has the record, error included.
    let stored: authinfod::terminal::device::CheckRecord<authinfod::wire::Licence> = state
        .store
        .health("licence")
        .expect("store")
        .expect("record");
    assert!(stored.value.is_some() && stored.last_error.is_some());
    lab.stop().await;
}

/// A device without an Alipay identity in the registry is "not configured", not an error.
#[tokio::test]
async fn a_platform_the_merchant_does_not_use_for_the_device_shows_as_not_configured() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lab = Lab::start_with_keys(
        dir.path(),
        crate::support::lab_keys(),
        lab::world(0, 60),
        "",
        "",
    )
    .await
    .expect("lab");
    let registry = dir.path().join("devices.toml");
    let text = std::fs::read_to_string(&registry).expect("registry");
    let without_alipay = text.replace(
        "[device.alipay]\nbiz_tid = \"01017sandboxbiztid1001\"\n",
        "",
    );
    assert_ne!(text, without_alipay);
    std::fs::write(&registry, without_alipay).expect("write");
    lab.proxy.reload_registry();
    let (daemon, upstream) = daemon_parts(&lab).await;
    let state = daemon.state();
    let before = lab.sandbox.state.received_by(Platform::Alipay);
    let _ = check_once(Check::AlipayBinding, &state, upstream.as_ref()).await;
    let doc = state.status().device;
    assert_eq!(doc.alipay_binding.state, CheckState::NotConfigured);
    assert!(doc.alipay_binding.last_error.is_none());
    assert_eq!(
        lab.sandbox.state.received_by(Platform::Alipay),
        before,
        "nothing sent to Alipay"
    );
    lab.stop().await;
}

#[tokio::test]
async fn the_demo_plays_the_whole_story() {
    let mut out = Vec::new();
    authinfod::demo::run(Duration::ZERO, std::future::ready(()), &mut out)
        .await
        .expect("demo");
    let text = String::from_utf8(out).expect("utf8");
    for expected in [
        "202 {\"accepted\":true,\"refresh_triggered\":true,\"persisted\":true}",
        "stored in sled and served",
        "200 {\"authinfo\": \"SANDBOX-AUTHINFO-",
        "inspection (WeChat Pay):      ok: SUCCESS",
        "Alipay binding (Alipay):      ok: indirect merchant",
        "SDK licence (Alibaba Cloud):  ok: valid to",
        "a refresh fails: 502 PROXY_UNREACHABLE",
        "the face app is still served: 200",
        "recovered on the next backoff attempt",
        "curl --unix-socket",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    assert_fleet_view_narrated(&text);
}

/// The demo names the proxy's admin listener and ends its story with the fleet table, the
/// demo's terminal in it, healthy and freshly reported.
fn assert_fleet_view_narrated(text: &str) {
    let admin = text
        .lines()
        .find(|l| l.trim_start().starts_with("authinfo-proxy admin listener"))
        .unwrap_or_else(|| panic!("no admin listener line in:\n{text}"));
    assert!(
        admin.contains("http://127.0.0.1:") && admin.contains("GET /terminals"),
        "{admin}"
    );
    let (_, table) = text
        .split_once("The fleet view, as the merchant sees it")
        .unwrap_or_else(|| panic!("no fleet view step in:\n{text}"));
    let mut lines = table.lines().skip(1);
    let header = lines.next().unwrap_or_default();
    assert!(
        header.contains("SEVERITY") && header.contains("DEVICE_ID") && header.contains("RISKS"),
        "{table}"
    );
    let row = lines.next().unwrap_or_default();
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells.first(), Some(&"ok"), "{table}");
    assert_eq!(
        cells.get(1),
        Some(&authinfod::demo::lab::DEVICE_ID),
        "{table}"
    );
    assert!(row.contains("fresh"), "{table}");
    assert!(
        lines
            .next()
            .is_some_and(|l| l.contains("1 terminal(s): 1 ok, 0 at risk")),
        "{table}"
    );
}

/// The README's first command, as the binary runs it: `authinfod demo` starts its own runtime
/// and signal handlers (installed outside the runtime they panicked: no reactor), plays the
/// story and exits 0.
#[test]
fn binary_demo_plays_the_story_and_exits_0() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_authinfod"))
        .args(["demo", "--duration", "1s"])
        .output()
        .expect("run authinfod demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}: {stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("Stopped. Everything the demo made is deleted."),
        "{stdout}"
    );
    assert_fleet_view_narrated(&stdout);
}
