//! The daemon's config parser (`terminal::config::parse`) on any text.
//!
//! Properties: every input gives either a config or a list of problems, each naming its field
//! (`field: reason`); a config that validates holds only values the daemon can run with: a
//! valid device id, absolute paths, an https proxy origin (no path), a socket mode without
//! access for others, a jitter in [0, 0.5], positive durations with `backoff_min <=
//! backoff_max`, and every sum the daemon forms from them (the next refresh and retry instants,
//! the health check instant, the bound of `POST /v1/refresh?wait=true`, `expires_at` from the
//! assumed validity) computes without overflow.
//!
//! Seeds name the fixture CA `/tmp/authinfod-fuzz/proxy-ca.pem`, which the target writes.
#![no_main]

use std::path::Path;
use std::time::{Duration, Instant};

use authinfod::schedule::Schedule;
use authinfod::terminal::config::{self, ConfigError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    authinfod_fuzz::fixtures();
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match config::parse(text, Path::new("/etc/authinfod/authinfod.toml")) {
        Ok(c) => {
            assert!(authinfod::wire::valid_device_id(&c.device_id));
            // A key is an absolute file or a PKCS#11 URI.
            assert!(c.key_file.file().is_none_or(std::path::Path::is_absolute));
            assert!(c.state_dir.is_absolute());
            assert!(c.proxy.ca_file.is_absolute());
            // The URL is kept as written (less a trailing slash); what reqwest makes of it is
            // an https origin.
            let url = url::Url::parse(&c.proxy.url).expect("the proxy URL parses");
            assert_eq!(
                (url.scheme(), url.path(), url.query()),
                ("https", "/", None)
            );
            assert!(url.host_str().is_some_and(|h| !h.is_empty()));
            assert!(c.socket.mode & 0o007 == 0 && c.socket.mode <= 0o777);
            assert!((1..=4096).contains(&c.socket.limits.max_connections));
            let r = &c.refresh;
            assert!((0.0..=0.5).contains(&r.jitter));
            for d in [
                r.interval,
                r.backoff_min,
                r.backoff_max,
                r.assumed_validity,
                r.raw_data_command_timeout,
                c.proxy.timeout,
                c.health.interval,
            ] {
                assert!(!d.is_zero());
            }
            assert!(r.backoff_min <= r.backoff_max);
            // What the daemon computes from the config must not overflow.
            let schedule = Schedule {
                interval: r.interval,
                jitter: r.jitter,
                backoff_min: r.backoff_min,
                backoff_max: r.backoff_max,
            };
            let now = Instant::now();
            for unit in [0.0, 0.5, 0.999_999] {
                let next = schedule.next_interval(unit);
                assert!(now.checked_add(next).is_some(), "next refresh {next:?}");
                let retry = schedule.retry_delay(u32::MAX, Some(Duration::MAX), unit);
                assert!(now.checked_add(retry).is_some(), "retry {retry:?}");
                let health = Schedule {
                    interval: c.health.interval,
                    ..schedule
                };
                assert!(now.checked_add(health.next_interval(unit)).is_some());
            }
            let bound = c
                .proxy
                .timeout
                .checked_mul(2)
                .and_then(|t| t.checked_add(r.raw_data_command_timeout))
                .and_then(|t| t.checked_add(Duration::from_secs(5)));
            assert!(bound.is_some(), "the refresh wait bound overflows");
            let validity = i64::try_from(r.assumed_validity.as_secs()).expect("validity in i64");
            assert!(authinfod::units::unix_now().checked_add(validity).is_some());
        }
        Err(ConfigError::Invalid { problems, .. }) => {
            authinfod_fuzz::check_problems(&problems, b"")
        }
        Err(ConfigError::Parse { message, .. }) => assert!(!message.is_empty()),
        Err(ConfigError::Read { .. }) => panic!("parse reads no config file"),
    }
});
