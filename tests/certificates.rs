//! WeChat Pay platform certificates through the real proxy (`[wechatpay] apiv3_key_file`): the
//! first download before anything is served, verification of every answer with them, the store
//! that keeps them across restarts, and `authinfo-proxy certificates`.

use std::sync::Arc;

use authinfod::demo::lab::{self, Lab, LabOptions, WechatVerification};
use authinfod::platform::wechatpay::certificates::Verification;
use authinfod::sandbox::{RunningSandbox, World};

use crate::support::{TestDaemon, lab_proxy_config, wait_for_authinfo_and_health, wait_until};

fn certificate_downloads(sandbox: &RunningSandbox) -> usize {
    sandbox
        .state
        .received()
        .iter()
        .filter(|r| r.request == "GET /v3/certificates")
        .count()
}

/// A proxy configured with only the APIv3 key (no public key, no certificate file) downloads
/// the platform certificates before it serves, verifies every answer with them (the fleet sync,
/// a terminal's authinfo and health checks), keeps them in its store so that a restart trusts
/// them before any download, and `authinfo-proxy certificates` verifies a download with what is
/// trusted (the stored ones once no proxy holds the store).
#[tokio::test]
async fn certificate_mode_downloads_first_verifies_with_them_and_keeps_them_across_restarts() {
    let world = World {
        wechat_sign_with_certificate: true,
        ..lab::world(2, 45)
    };
    let options = LabOptions {
        wechat: WechatVerification::DownloadedCertificates,
        ..LabOptions::default()
    };
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let lab = Lab::start_with(dir.path(), crate::support::lab_keys(), world, &options)
        .await
        .unwrap_or_else(|e| panic!("lab: {}", authinfod::error_chain(&e)));
    let serial = lab.sandbox.state.platform_certificates()[0].serial.clone();
    assert!(
        lab.proxy.app.wechat.keys().contains(&serial),
        "downloaded before start returned"
    );
    assert_eq!(
        lab.sandbox.state.received()[0].request,
        "GET /v3/certificates",
        "the first call of all"
    );
    let fleet = lab.proxy.app.fleet.clone();
    wait_until("the fleet is synced, verified by the certificate", || {
        fleet.snapshot().synced_at.is_some()
    })
    .await;
    let daemon = TestDaemon::start_with_config(dir.clone(), &lab.daemon_config).await;
    assert_eq!(daemon.put_raw_data("RAW-1").await.status, 202);
    wait_for_authinfo_and_health(&daemon).await;
    daemon.stop().await;
    drop(fleet);

    // While the proxy runs, `certificates` cannot read its store: it verifies as a first
    // download would (nothing configured), and says so.
    let report = authinfod::proxy::certificates_now(lab_proxy_config(&lab.files))
        .await
        .expect("certificates");
    assert!(!report.store_read);
    assert_eq!(report.verification, Verification::FirstUse(serial.clone()));
    assert_eq!(report.certificates.len(), 1);
    assert_eq!(report.certificates[0].info.serial, serial);

    let Lab {
        proxy,
        sandbox,
        files,
        ..
    } = lab;
    proxy.stop().await;
    let report = authinfod::proxy::certificates_now(lab_proxy_config(&files))
        .await
        .expect("certificates");
    assert!(report.store_read, "no proxy holds the store now");
    assert_eq!(report.verification, Verification::Trusted(serial.clone()));

    let restarted = authinfod::proxy::start(lab_proxy_config(&files))
        .await
        .expect("restart");
    assert!(
        restarted.app.wechat.keys().contains(&serial),
        "the stored certificate is trusted at once"
    );
    assert_eq!(certificate_downloads(&sandbox), 3);
    wait_until("the restarted proxy refreshes in the background", || {
        certificate_downloads(&sandbox) == 4
    })
    .await;
    restarted.stop().await;
    sandbox.stop().await;
}
