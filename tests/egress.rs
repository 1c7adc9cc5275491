//! How the proxy's platform calls leave the merchant's server: through an egress proxy
//! (`[upstream] http_proxy`, a CONNECT proxy started here) and checked against the system's
//! trust store (`[upstream] trust = "system"`), with the real proxy, daemon and sandbox.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use authinfod::demo::lab::{self, Lab, SANDBOX_ALIAS_HOST};
use authinfod::platform::FailureClass;
use authinfod::proxy::config;
use authinfod::sandbox::Platform;
use authinfod::sandbox::connect_proxy::ConnectProxy;
use base64::Engine as _;

use crate::support::{TestDaemon, wait_for_authinfo_and_health, wait_until};

const USER: &str = "merchant-egress";
const PASSWORD: &str = "s3cret";

/// The platforms are named by a host that never resolves ([`SANDBOX_ALIAS_HOST`]); only the
/// egress proxy knows where it is. So the terminal's authinfo, all three health checks and the
/// fleet sync succeeding proves that every platform call went through the proxy (a direct call
/// could not even resolve the name), each client with the configured credentials.
#[tokio::test]
async fn every_platform_call_goes_through_the_configured_egress_proxy_with_its_credentials() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let egress = ConnectProxy::start_with_hosts(
        listener,
        Some((USER, PASSWORD)),
        HashMap::from([(
            SANDBOX_ALIAS_HOST.to_owned(),
            IpAddr::V4(Ipv4Addr::LOCALHOST),
        )]),
    )
    .expect("egress proxy");
    let extra = format!(
        "[upstream]\nhttp_proxy = \"{}\"\n",
        egress.url(Some((USER, PASSWORD)))
    );
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let options = lab::LabOptions {
        proxy_extra: &extra,
        host: Some(SANDBOX_ALIAS_HOST),
        ..lab::LabOptions::default()
    };
    let lab = Lab::start_with(
        dir.path(),
        crate::support::lab_keys(),
        lab::world(3, 45),
        &options,
    )
    .await
    .unwrap_or_else(|e| panic!("lab: {}", authinfod::error_chain(&e)));
    let fleet = lab.proxy.app.fleet.clone();
    wait_until("the fleet is synced through the egress proxy", || {
        fleet.snapshot().synced_at.is_some()
    })
    .await;
    assert_eq!(fleet.snapshot().devices.len(), 4);

    let daemon = TestDaemon::start_with_config(dir.clone(), &lab.daemon_config).await;
    assert_eq!(daemon.put_raw_data("RAW-1").await.status, 202);
    wait_for_authinfo_and_health(&daemon).await;

    let received = lab.sandbox.state.received();
    for platform in [Platform::WechatPay, Platform::Alipay, Platform::Aliyun] {
        assert!(
            received
                .iter()
                .any(|r| r.platform == platform && r.signature_ok),
            "{platform:?} answered a verified call"
        );
    }
    let tunnels = egress.tunnels();
    let target = format!("{SANDBOX_ALIAS_HOST}:{}", lab.sandbox.addr.port());
    let credentials = format!(
        "Basic {}",
        authinfod::crypto::BASE64.encode(format!("{USER}:{PASSWORD}"))
    );
    // One client (and connection pool) per platform: at least three tunnels.
    assert!(tunnels.len() >= 3, "{tunnels:?}");
    for tunnel in &tunnels {
        assert_eq!(tunnel.target, target);
        assert!(tunnel.opened, "{tunnel:?}");
        assert_eq!(
            tunnel.proxy_authorization.as_deref(),
            Some(credentials.as_str())
        );
    }
    daemon.stop().await;
    lab.stop().await;
    egress.stop().await;
}

/// A proxy that refuses the credentials: the platform call is a transport failure (retryable,
/// the terminal backs off), and nothing reaches the platform.
#[tokio::test]
async fn an_egress_proxy_refusing_the_credentials_is_a_retryable_transport_failure() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let egress = ConnectProxy::start(listener, Some((USER, PASSWORD))).expect("egress proxy");
    let extra = format!(
        "[fleet]\nenabled = false\n\n[upstream]\nhttp_proxy = \"{}\"\n",
        egress.url(Some((USER, "wrong")))
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let lab = Lab::start_with_keys(
        dir.path(),
        crate::support::lab_keys(),
        lab::world(0, 45),
        &extra,
        "",
    )
    .await
    .unwrap_or_else(|e| panic!("lab: {}", authinfod::error_chain(&e)));
    let failure = lab
        .proxy
        .app
        .wechat
        .device_inspection(lab::DEVICE_SN)
        .await
        .expect_err("the proxy says 407")
        .failure();
    assert_eq!(failure.class, FailureClass::Transport, "{failure:?}");
    assert!(failure.retryable());
    assert!(lab.sandbox.state.received().is_empty());
    let tunnels = egress.tunnels();
    assert_eq!(tunnels.len(), 1, "{tunnels:?}");
    assert!(!tunnels[0].opened);
    lab.stop().await;
    egress.stop().await;
}

/// `trust = "system"`: a proxy whose config names no `ca_file` reaches the sandbox because the
/// system store (here `SSL_CERT_FILE`, holding the sandbox's CA) trusts it; the same config with
/// the compiled-in roots does not.
#[tokio::test]
async fn system_trust_reaches_a_platform_only_the_system_store_trusts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lab = Lab::start_with_keys(
        dir.path(),
        crate::support::lab_keys(),
        lab::world(2, 45),
        "[fleet]\nenabled = false\n",
        "",
    )
    .await
    .unwrap_or_else(|e| panic!("lab: {}", authinfod::error_chain(&e)));
    let without_ca_files: String = std::fs::read_to_string(&lab.proxy_config)
        .expect("config")
        .lines()
        .filter(|l| !l.starts_with("ca_file = "))
        .map(|l| {
            // A store of its own: the lab's proxy holds the lab's.
            if l.starts_with("state_dir = ") {
                "state_dir = \"proxy-state-system\"\n".to_owned()
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    let ca = lab.files.path("sandbox-ca.pem").display().to_string();
    let env = |name: &str| (name == "SSL_CERT_FILE").then(|| ca.clone());
    for (trust, reaches) in [("system", true), ("webpki", false)] {
        let path = lab.files.path(&format!("authinfo-proxy-{trust}.toml"));
        let text = format!("{without_ca_files}\n[upstream]\ntrust = \"{trust}\"\n");
        std::fs::write(&path, text).expect("write config");
        let config = config::load_with_env(&path, &env)
            .unwrap_or_else(|e| panic!("{trust}: {}", authinfod::error_chain(&e)));
        let proxy = authinfod::proxy::start(config).await.expect("proxy");
        let inspection = proxy.app.wechat.device_inspection(lab::DEVICE_SN).await;
        let licence = proxy
            .app
            .aliyun
            .as_ref()
            .expect("aliyun configured")
            .find_device(lab::CLOUDAUTH_DEVICE_ID, None)
            .await;
        if reaches {
            inspection.unwrap_or_else(|e| panic!("{trust}: {e}"));
            licence.unwrap_or_else(|e| panic!("{trust}: {e}"));
        } else {
            let failure = inspection.expect_err("unknown issuer").failure();
            assert_eq!(failure.class, FailureClass::Transport, "{failure:?}");
            assert!(licence.is_err());
        }
        proxy.stop().await;
    }
    lab.stop().await;
}
