//! The proxy's config loader (`proxy::config::load_with_env`, with no environment) and device
//! registry parser (`proxy::registry::Registry::parse`) on any text.
//!
//! The input is the config, a line `%%registry%%`, then the registry (without that line the
//! whole input is the config, and the registry is the same text). The config is written to a
//! scratch directory holding the files a config names (the lab's names: `proxy-tls.crt`,
//! `proxy-tls.key`, `sandbox-ca.pem`, `wechatpay-merchant.key`, `wechatpay-public.pem`,
//! `alipay-app.key`, `alipay-public.pem`, `aliyun-secret`, `devices.toml`), so seeds reach past
//! the file reads. Properties:
//! - every config gives either a config or a list of problems, each naming its field; a config
//!   that loads listens on addresses, has a positive upstream timeout, fleet limits within
//!   WeChat Pay's, and a sync interval the fleet schedule can add to a clock;
//! - every registry gives either a registry or an error; one that parses holds exactly the
//!   `[[device]]` tables serde sees, each under a valid and distinct id.
#![no_main]

use std::sync::OnceLock;
use std::time::Instant;

use authinfod::proxy::config::{self, ConfigError};
use authinfod::proxy::registry::Registry;
use authinfod::schedule::Schedule;
use authinfod_fuzz::{scratch_dir, write_fixture};
use libfuzzer_sys::fuzz_target;

/// The scratch directory with every file a lab config names.
fn dir() -> &'static std::path::Path {
    static DIR: OnceLock<&'static std::path::Path> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = scratch_dir("proxy-config");
        let pki = authinfod::tls::generate_pki("fuzz proxy CA", &["127.0.0.1"]).expect("pki");
        let key = authinfod_fuzz::test_key();
        for (name, text, mode) in [
            ("proxy-tls.crt", pki.cert_pem.as_str(), 0o644),
            ("proxy-tls.key", pki.key_pem.as_str(), 0o600),
            ("sandbox-ca.pem", pki.ca_pem.as_str(), 0o644),
            ("wechatpay-merchant.key", key.private_pem.as_str(), 0o600),
            ("alipay-app.key", key.private_pem.as_str(), 0o600),
            ("aliyun-secret", "fuzzsecret0123456789", 0o600),
        ] {
            write_fixture(&dir.join(name), text, mode);
        }
        let public = key.public.to_pem();
        write_fixture(&dir.join("wechatpay-public.pem"), &public, 0o644);
        write_fixture(&dir.join("alipay-public.pem"), &public, 0o644);
        write_fixture(
            &dir.join("devices.toml"),
            &format!(
                "[[device]]\ndevice_id = \"T-1001\"\npublic_key = \"\"\"\n{}\"\"\"\ndevice_sn = \"SANDBOX0000001001\"\nsub_mchid = \"1900000002\"\norganization_id = \"ORG\"\n",
                key.public.to_pem()
            ),
            0o644,
        );
        dir
    })
}

/// [`authinfod_fuzz::check_problems`], with the `/` and ` ` of the proxy's paired fields
/// (`wechatpay.public_key_id / wechatpay.public_key`).
fn check_problems(problems: &[String]) {
    authinfod_fuzz::check_problems(problems, b"/ ");
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (config_text, registry_text) = text.split_once("\n%%registry%%\n").unwrap_or((text, text));
    let dir = dir();

    let path = dir.join("authinfo-proxy.toml");
    std::fs::write(&path, config_text).expect("write the config");
    match config::load_with_env(&path, &config::no_environment) {
        Ok(c) => {
            assert!(!c.upstream_timeout.is_zero());
            assert!((1..=20).contains(&c.fleet.requests_per_second));
            assert!((1..=50_000).contains(&c.fleet.requests_per_day));
            let schedule = Schedule {
                interval: c.fleet.sync_interval,
                jitter: 0.1,
                backoff_min: std::time::Duration::from_secs(30),
                backoff_max: c
                    .fleet
                    .sync_interval
                    .min(std::time::Duration::from_secs(1800)),
            };
            for unit in [0.0, 0.5, 0.999_999] {
                let next = schedule.next_interval(unit);
                assert!(Instant::now().checked_add(next).is_some(), "sync {next:?}");
            }
        }
        Err(ConfigError::Invalid { problems, .. }) => check_problems(&problems),
        Err(ConfigError::Parse { message, .. }) => assert!(!message.is_empty()),
        Err(ConfigError::Read { .. }) => panic!("the config file was just written"),
    }

    let seen_devices = toml::from_str::<toml::Table>(registry_text).ok().map(|t| {
        t.get("device")
            .and_then(|d| d.as_array())
            .map_or(0, Vec::len)
    });
    match Registry::parse(registry_text, &dir.join("devices.toml")) {
        Ok(registry) => {
            assert_eq!(
                Some(registry.len()),
                seen_devices,
                "devices lost or invented"
            );
            if let Some(table) = toml::from_str::<toml::Table>(registry_text).ok()
                && let Some(list) = table.get("device").and_then(|d| d.as_array())
            {
                let mut ids = std::collections::BTreeSet::new();
                for d in list {
                    let id = d["device_id"].as_str().expect("an id");
                    assert!(authinfod::wire::valid_device_id(id), "{id:?}");
                    assert!(ids.insert(id), "duplicate id {id:?}");
                    assert!(registry.get(id).is_some());
                }
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
