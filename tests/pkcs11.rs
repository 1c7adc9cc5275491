//! Keys inside a PKCS#11 token: SoftHSM2, with the tokens of each test made in a temporary
//! directory of its own ([`crate::support::softhsm`]). Device requests signed in the token are
//! checked by the fake proxy's independent verifier, and the merchant's WeChat Pay and Alipay
//! requests by the sandbox.

use std::path::Path;
use std::process::Output;
use std::sync::Arc;

use authinfod::demo::lab::{self, Lab, LabOptions, MerchantKeys};
use authinfod::sandbox::Platform;

use crate::support::fake_proxy::{FakeProxy, Script};
use crate::support::softhsm::{self, SoftHsm};
use crate::support::{TestDaemon, wait_for_authinfo_and_health, wait_until};

/// `authinfod` with `args`, seeing `hsm`'s tokens.
fn authinfod(hsm: &SoftHsm, args: &[&str]) -> Output {
    hsm.command(env!("CARGO_BIN_EXE_authinfod"))
        .args(args)
        .output()
        .expect("run authinfod")
}

/// The first PEM block of `text`.
fn first_pem(text: &str) -> String {
    let start = text
        .find("-----BEGIN PUBLIC KEY-----")
        .expect("a public key");
    let end = text[start..]
        .find("-----END PUBLIC KEY-----")
        .expect("its end")
        + start;
    format!("{}-----END PUBLIC KEY-----\n", &text[start..end])
}

/// A daemon config with its key in a token; forced refreshes are not limited (these tests
/// force one after another to see each signature).
fn daemon_config(dir: &Path, url: &str, ca_pem: &str, key: &str) -> std::path::PathBuf {
    let path = crate::support::write_config(dir, url, ca_pem, crate::support::NO_FORCED_LIMIT);
    let text = std::fs::read_to_string(&path).expect("config");
    let file_line = format!("key_file = \"{}\"", dir.join("device.key").display());
    assert!(text.contains(&file_line), "{text}");
    std::fs::write(
        &path,
        text.replace(&file_line, &format!("key_file = \"{key}\"")),
    )
    .expect("config");
    path
}

/// The value after a boolean attribute's name in a `softhsm2-dump-file` listing.
fn dumped_bool(dump: &str, attribute: &str) -> bool {
    let mut lines = dump.lines();
    lines
        .by_ref()
        .find(|l| l.trim_end().ends_with(&format!(" {attribute}")))
        .unwrap_or_else(|| panic!("{attribute} in\n{dump}"));
    let value = lines.nth(1).expect("the value line");
    match value.split_whitespace().last() {
        Some("TRUE") => true,
        Some("FALSE") => false,
        _ => panic!("{attribute}: {value}"),
    }
}

/// Issue 17: `keygen --pkcs11` makes the key pair inside the token, where SoftHSM's own files
/// show the private key sensitive and never extractable; it prints the enrolment exactly as file
/// keygen does; the daemon then signs its requests in the token, and the fake proxy verifies
/// them with the printed public key.
#[tokio::test]
async fn keygen_in_the_token_and_the_daemon_signs_with_it() {
    let test = "pkcs11::keygen_in_the_token_and_the_daemon_signs_with_it";
    let Some(hsm) = SoftHsm::enter(test) else {
        return;
    };
    let token_dir = hsm.init_token("terminal");
    let pin = hsm.pin_file("pin", softhsm::PIN);
    let uri = hsm.uri("terminal", "device", &pin);
    let out = authinfod(&hsm, &["keygen", "--pkcs11", &uri, "--device-id", "T-1001"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("fingerprint: SHA256:"), "{stdout}");
    assert!(stdout.contains("device_id = \"T-1001\""), "{stdout}");
    assert!(
        stderr.contains("inside the token") && stderr.contains("key_file = \"pkcs11:"),
        "{stderr}"
    );
    let public_pem = first_pem(&stdout);

    let dumps = hsm.dump_objects(&token_dir);
    let private: Vec<_> = dumps
        .iter()
        .filter(|d| d.contains("CKO_PRIVATE_KEY"))
        .collect();
    assert_eq!(private.len(), 1, "one private key: {dumps:#?}");
    assert!(!dumped_bool(private[0], "CKA_EXTRACTABLE"));
    assert!(dumped_bool(private[0], "CKA_NEVER_EXTRACTABLE"));
    assert!(dumped_bool(private[0], "CKA_SENSITIVE"));
    assert!(dumped_bool(private[0], "CKA_TOKEN"));
    assert_eq!(
        dumps
            .iter()
            .filter(|d| d.contains("CKO_PUBLIC_KEY"))
            .count(),
        1,
        "{dumps:#?}"
    );

    // A second keygen does not replace the enrolled key unless forced.
    let again = authinfod(&hsm, &["keygen", "--pkcs11", &uri]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&again.stderr)
            .contains("already exists in token \"terminal\"; pass --force"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(hsm.dump_objects(&token_dir).len(), 2, "nothing added");

    let proxy = FakeProxy::start(&public_pem).await;
    proxy.script([Script::Authinfo("A1".into(), None)]);
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let config = daemon_config(dir.path(), &proxy.url, &proxy.pki.ca_pem, &uri);
    let daemon = TestDaemon::start_with_config(dir, &config).await;
    assert_eq!(daemon.put_raw_data("RAW-1").await.status, 202);
    let state = daemon.state.clone();
    wait_until("the first authinfo is served", || state.current().is_some()).await;
    assert_eq!(daemon.get("/v1/authinfo").await.json()["authinfo"], "A1");
    let seen = proxy.seen();
    assert!(seen.iter().any(|s| s.path == "/v1/authinfo"), "{seen:?}");
    proxy.assert_all_requests_valid();
    daemon.stop().await;
}

/// Issue 17: a token that goes away while the daemon runs (a USB HSM unplugged; here SoftHSM's
/// token directory moved away) fails the refresh with a status that says so and keeps the
/// authinfo it holds; once the token is back, the next refresh signs in it again.
#[tokio::test]
async fn a_token_that_goes_away_fails_the_refresh_until_it_returns() {
    let test = "pkcs11::a_token_that_goes_away_fails_the_refresh_until_it_returns";
    let Some(hsm) = SoftHsm::enter(test) else {
        return;
    };
    let token_dir = hsm.init_token("terminal");
    let key = crate::support::device_key();
    hsm.import("terminal", "device", "01", &key.private_pem);
    let pin = hsm.pin_file("pin", softhsm::PIN);
    let proxy = FakeProxy::start(&key.public.to_pem()).await;
    proxy.script([
        Script::Authinfo("A1".into(), None),
        Script::Authinfo("A2".into(), None),
    ]);
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let uri = hsm.uri("terminal", "device", &pin);
    let config = daemon_config(dir.path(), &proxy.url, &proxy.pki.ca_pem, &uri);
    let daemon = TestDaemon::start_with_config(dir, &config).await;
    assert_eq!(daemon.put_raw_data("RAW-1").await.status, 202);
    let state = daemon.state.clone();
    wait_until("the first authinfo is served", || state.current().is_some()).await;

    let away = hsm.dir.join("unplugged");
    std::fs::rename(&token_dir, &away).expect("unplug");
    let r = daemon
        .request("POST", "/v1/refresh?wait=true", &[], None)
        .await;
    assert_ne!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let status = daemon.status().await;
    let refresh = &status["refresh"];
    assert_eq!(refresh["last_attempt_ok"], false, "{status:#}");
    assert_eq!(
        refresh["last_error_code"], "TOKEN_UNAVAILABLE",
        "{status:#}"
    );
    assert_eq!(refresh["last_error_permanent"], false, "{status:#}");
    let message = refresh["last_error"].as_str().expect("a message");
    assert!(
        message.contains("no token with token=\"terminal\""),
        "{message}"
    );
    assert_eq!(
        daemon.get("/v1/authinfo").await.json()["authinfo"],
        "A1",
        "the held authinfo stays"
    );

    std::fs::rename(&away, &token_dir).expect("plug in again");
    let r = daemon
        .request("POST", "/v1/refresh?wait=true", &[], None)
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(daemon.get("/v1/authinfo").await.json()["authinfo"], "A2");
    assert_eq!(daemon.status().await["refresh"]["last_attempt_ok"], true);
    assert_eq!(
        proxy
            .seen()
            .iter()
            .filter(|s| s.path == "/v1/authinfo")
            .count(),
        2,
        "nothing unsigned reached the proxy"
    );
    proxy.assert_all_requests_valid();
    daemon.stop().await;
}

/// Issue 17: every private key of the chain in a token: the device key in the terminal's, the
/// WeChat Pay merchant key and the Alipay app key in the merchant's (imported, as a merchant
/// imports the key WeChat Pay's tool made). A refresh and the health checks go end to end
/// through the proxy to the sandbox, which verifies every platform request's signature. On a
/// multi-threaded runtime, as the binaries run, where token signatures hand their worker over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_goes_end_to_end_with_every_key_in_a_token() {
    let test = "pkcs11::a_refresh_goes_end_to_end_with_every_key_in_a_token";
    let Some(hsm) = SoftHsm::enter(test) else {
        return;
    };
    let keys = crate::support::lab_keys();
    hsm.init_token("terminal");
    hsm.import("terminal", "device", "01", &keys.device.private_pem);
    hsm.init_token("merchant");
    hsm.import(
        "merchant",
        "wechatpay",
        "01",
        &keys.wechat_merchant.private_pem,
    );
    hsm.import("merchant", "alipay", "02", &keys.alipay_app.private_pem);
    let merchant_pin = hsm.pin_file("merchant-pin", softhsm::PIN);
    let terminal_pin = hsm.pin_file("terminal-pin", softhsm::PIN);
    let wechat_uri = hsm.uri("merchant", "wechatpay", &merchant_pin);
    let alipay_uri = hsm.uri("merchant", "alipay", &merchant_pin);
    let options = LabOptions {
        merchant_keys: MerchantKeys {
            wechat_merchant: &wechat_uri,
            alipay_app: &alipay_uri,
        },
        ..LabOptions::default()
    };
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let lab = Lab::start_with(dir.path(), keys, lab::world(0, 400), &options)
        .await
        .unwrap_or_else(|e| panic!("lab: {}", authinfod::error_chain(&e)));
    // The key files the lab also wrote are not what the proxy uses: gone, nothing changes.
    std::fs::remove_file(lab.files.path("wechatpay-merchant.key")).expect("remove");
    std::fs::remove_file(lab.files.path("alipay-app.key")).expect("remove");
    let config_text = std::fs::read_to_string(&lab.proxy_config).expect("proxy config");
    assert!(
        config_text.contains("merchant_key = \"pkcs11:"),
        "{config_text}"
    );

    let daemon_uri = hsm.uri("terminal", "device", &terminal_pin);
    let text = std::fs::read_to_string(&lab.daemon_config).expect("daemon config");
    let file_line = format!("key_file = \"{}\"", lab.files.path("device.key").display());
    assert!(text.contains(&file_line), "{text}");
    std::fs::write(
        &lab.daemon_config,
        text.replace(&file_line, &format!("key_file = \"{daemon_uri}\"")),
    )
    .expect("daemon config");
    std::fs::remove_file(lab.files.path("device.key")).expect("remove");

    let daemon = TestDaemon::start_with_config(dir.clone(), &lab.daemon_config).await;
    assert_eq!(daemon.put_raw_data("RAW-E2E").await.status, 202);
    wait_for_authinfo_and_health(&daemon).await;
    let authinfo = daemon.get("/v1/authinfo").await.json();
    assert!(
        authinfo["authinfo"].as_str().is_some_and(|a| !a.is_empty()),
        "{authinfo}"
    );
    let received = lab.sandbox.state.received();
    for platform in [Platform::WechatPay, Platform::Alipay] {
        assert!(
            received.iter().any(|r| r.platform == platform),
            "{platform:?} got a request: {received:?}"
        );
    }
    assert!(
        received.iter().all(|r| r.signature_ok),
        "every signature verified: {received:?}"
    );
    assert!(
        received
            .iter()
            .any(|r| r.platform == Platform::WechatPay
                && r.request.contains("/v3/offlineface/authinfo")),
        "{received:?}"
    );
    daemon.stop().await;
    lab.stop().await;
}

/// Issue 17: what an operator can act on, from `check-config` and `run` alike, exit 78 (EX_CONFIG)
/// with the message that names the fix: a wrong PIN, a token that is not there (the tokens that
/// are, listed), a key that is not in the token (its keys, listed), a module that does not
/// exist; and the proxy's `check-config` for a merchant key behind a wrong PIN.
#[test]
fn wrong_pin_missing_token_missing_object_and_missing_module_exit_78() {
    let Some(hsm) =
        SoftHsm::new("pkcs11::wrong_pin_missing_token_missing_object_and_missing_module_exit_78")
    else {
        return;
    };
    hsm.init_token("terminal");
    hsm.import(
        "terminal",
        "device",
        "01",
        &crate::support::device_key().private_pem,
    );
    let good_pin = hsm.pin_file("pin", softhsm::PIN);
    let wrong_pin = hsm.pin_file("wrong-pin", "000000");
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = authinfod::tls::generate_pki("pkcs11 test CA", &["127.0.0.1"]).expect("pki");
    let check = |key: &str| {
        let config = daemon_config(dir.path(), "https://127.0.0.1:9", &ca.ca_pem, key);
        authinfod(&hsm, &["check-config", &config.to_string_lossy()])
    };

    let good = check(&hsm.uri("terminal", "device", &good_pin));
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    let module = softhsm::module();
    let module = module.display();
    let cases = [
        (
            hsm.uri("terminal", "device", &wrong_pin),
            "the PIN for token \"terminal\" is wrong".to_owned(),
        ),
        (
            hsm.uri("nope", "device", &good_pin),
            format!(
                "no token with token=\"nope\" in PKCS#11 module {module}; tokens present: \"terminal\""
            ),
        ),
        (
            hsm.uri("terminal", "nope", &good_pin),
            "token \"terminal\" has no private key object=\"nope\"; private keys in it: object=\"device\" id=%01".to_owned(),
        ),
        (
            format!(
                "pkcs11:token=terminal;object=device?module-path=/nonexistent/libpkcs11.so&pin-source=file:{}",
                good_pin.display()
            ),
            "PKCS#11 module /nonexistent/libpkcs11.so does not exist".to_owned(),
        ),
    ];
    for (uri, message) in &cases {
        let out = check(uri);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{uri}: {stderr}");
        assert!(
            stderr.contains("key_file: ") && stderr.contains(message.as_str()),
            "{uri}: {stderr}"
        );
        let config = dir.path().join("authinfod.toml");
        let run = authinfod(&hsm, &["run", "--config", &config.to_string_lossy()]);
        let run_stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(78), "run {uri}: {run_stderr}");
        assert!(
            run_stderr.contains(message.as_str()),
            "run {uri}: {run_stderr}"
        );
    }

    // The proxy's merchant key behind a wrong PIN: the lab's proxy config, the key replaced.
    let lab_dir = tempfile::tempdir().expect("tempdir");
    let generated = lab::write_keys(lab_dir.path(), crate::support::lab_keys()).expect("keys");
    let files = lab::LabFiles {
        dir: lab_dir.path().to_owned(),
    };
    files
        .write_registry(&generated.device_public)
        .expect("registry");
    let wrong = hsm.uri("terminal", "device", &wrong_pin);
    let config = files
        .write_proxy_config(
            &generated,
            &lab::ProxyConfigSpec {
                keys: MerchantKeys {
                    wechat_merchant: &wrong,
                    ..MerchantKeys::default()
                },
                ..lab::ProxyConfigSpec::new("https://127.0.0.1:9")
            },
        )
        .expect("proxy config");
    let out = hsm
        .command(env!("CARGO_BIN_EXE_authinfo-proxy"))
        .args(["check-config", &config.to_string_lossy()])
        .output()
        .expect("run authinfo-proxy");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("wechatpay.merchant_key: ")
            && stderr.contains("the PIN for token \"terminal\" is wrong"),
        "{stderr}"
    );
}

/// `authinfod check-config` on `config`, seeing `hsm`'s tokens.
fn check_config(hsm: &SoftHsm, config: &Path) -> Output {
    authinfod(hsm, &["check-config", &config.to_string_lossy()])
}

/// Issue 17: a token that cannot sign SHA256withRSA (here SoftHSM with the mechanism turned off)
/// is refused at start, exit 78, naming the mechanism.
#[test]
fn a_token_without_the_mechanism_is_refused() {
    let test = "pkcs11::a_token_without_the_mechanism_is_refused";
    // Only plain RSA; SoftHSM 2.6 ignores a "-CKM_..." list here.
    let mechanisms = "slots.mechanisms = CKM_RSA_PKCS_KEY_PAIR_GEN,CKM_RSA_PKCS";
    let Some(hsm) = SoftHsm::with_config(test, mechanisms) else {
        return;
    };
    hsm.init_token("terminal");
    hsm.import(
        "terminal",
        "device",
        "01",
        &crate::support::device_key().private_pem,
    );
    let pin = hsm.pin_file("pin", softhsm::PIN);
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = authinfod::tls::generate_pki("pkcs11 test CA", &["127.0.0.1"]).expect("pki");
    let uri = hsm.uri("terminal", "device", &pin);
    let config = daemon_config(dir.path(), "https://127.0.0.1:9", &ca.ca_pem, &uri);
    let out = check_config(&hsm, &config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains(
            "key_file: token \"terminal\" does not offer CKM_SHA256_RSA_PKCS (SHA256withRSA) signing"
        ),
        "{stderr}"
    );
}

/// Issue 17: what works but needs attention is a warning: a key that can leave the token
/// (CKA_EXTRACTABLE, made here with cryptoki as another tool might), and a PIN in the URI
/// (`pin-value`, for tests), which also makes the config a secret that must be 0600.
#[tokio::test]
async fn an_extractable_key_and_a_pin_in_the_uri_are_warned_about() {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::Attribute;
    use cryptoki::session::UserType;
    use cryptoki::types::AuthPin;
    use std::os::unix::fs::PermissionsExt as _;

    let test = "pkcs11::an_extractable_key_and_a_pin_in_the_uri_are_warned_about";
    let Some(hsm) = SoftHsm::enter(test) else {
        return;
    };
    hsm.init_token("terminal");
    let pkcs11 = Pkcs11::new(softhsm::module()).expect("module");
    pkcs11
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("initialize");
    let slot = pkcs11
        .get_slots_with_token()
        .expect("slots")
        .into_iter()
        .find(|s| {
            pkcs11
                .get_token_info(*s)
                .is_ok_and(|i| i.label() == "terminal")
        })
        .expect("the token");
    let session = pkcs11.open_rw_session(slot).expect("session");
    session
        .login(UserType::User, Some(&AuthPin::from(softhsm::PIN)))
        .expect("login");
    let name = [Attribute::Label(b"loose".to_vec()), Attribute::Id(vec![7])];
    session
        .generate_key_pair(
            &Mechanism::RsaPkcsKeyPairGen,
            &[
                [
                    Attribute::Token(true),
                    Attribute::Verify(true),
                    Attribute::ModulusBits(2048.into()),
                    Attribute::PublicExponent(vec![1, 0, 1]),
                ]
                .as_slice(),
                &name,
            ]
            .concat(),
            &[
                [
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(false),
                    Attribute::Extractable(true),
                    Attribute::Sign(true),
                ]
                .as_slice(),
                &name,
            ]
            .concat(),
        )
        .expect("an extractable key pair");
    drop(session);

    let dir = tempfile::tempdir().expect("tempdir");
    let ca = authinfod::tls::generate_pki("pkcs11 test CA", &["127.0.0.1"]).expect("pki");
    let pin = hsm.pin_file("pin", softhsm::PIN);
    let config = daemon_config(
        dir.path(),
        "https://127.0.0.1:9",
        &ca.ca_pem,
        &hsm.uri("terminal", "loose", &pin),
    );
    let out = check_config(&hsm, &config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: key_file: private key object=\"loose\" in token \"terminal\" is extractable or not sensitive"),
        "{stderr}"
    );

    // The PIN in the URI: the config (0644 as written) must be private first.
    let uri = format!(
        "pkcs11:token=terminal;object=loose?module-path={}&pin-value={}",
        softhsm::module().display(),
        softhsm::PIN
    );
    let config = daemon_config(dir.path(), "https://127.0.0.1:9", &ca.ca_pem, &uri);
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = check_config(&hsm, &config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("key_file: the URI holds a PIN (pin-value), so the file is a secret"),
        "{stderr}"
    );
    assert!(
        !stderr.contains(softhsm::PIN),
        "the PIN is never shown: {stderr}"
    );
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let out = check_config(&hsm, &config);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "warning: key_file: the URI carries its PIN (pin-value), which is meant for tests"
        ),
        "{stderr}"
    );
    assert!(
        !stdout.contains(softhsm::PIN) && !stderr.contains(softhsm::PIN),
        "the PIN is never shown: {stdout}{stderr}"
    );
}
