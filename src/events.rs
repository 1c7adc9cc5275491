//! The kinds of log line an operator acts on, each with a fixed 128-bit journal `MESSAGE_ID`, so
//! that `journalctl MESSAGE_ID=…` finds them however the wording changes, and a journal catalog
//! (`packaging/authinfod.catalog`) explains each one.
//!
//! Owns: the ids (never change one: a changed id breaks the operators' queries and alerts) and
//! the list of them ([`ALL`]) the catalog is checked against. A log line carries one as its
//! `message_id` field; on journald it becomes the `MESSAGE_ID` field. It must not log anything.

// === the terminal daemon ===

/// `authinfod` started (version and effective configuration in the fields).
pub const DAEMON_STARTED: &str = "1f0aa022b5af40889c8cfeec6474e072";
/// `authinfod` stopped.
pub const DAEMON_STOPPED: &str = "43fcf3518459429d93d3fc674fb38ec2";
/// At start, the authinfo held in the store is served before any network call.
pub const SERVING_STORED: &str = "e624acfe997641bea37cb979879e35a6";
/// A new authinfo was fetched, stored and served.
pub const REFRESH_OK: &str = "4a5f11fd8407473cb6dde913be3414cf";
/// A refresh failed in a way a retry may cure; the held authinfo is kept.
pub const REFRESH_FAILED: &str = "5123ba0b7bac4fffbdcd5d9bd29a5f63";
/// A refresh was refused permanently; retries wait for new raw_data or the next interval.
pub const REFRESH_REFUSED: &str = "e593fb9807654e3781c4d43ffcc67b78";
/// A new authinfo could not be persisted; it is served from memory only.
pub const PERSIST_FAILED: &str = "0069f43fd9ef42e2a50fe367525066c2";
/// The store was damaged or unusable and was recovered (what, and from what, in the fields).
pub const STORE_RECOVERED: &str = "52b346ca6f2f416eaa895b8483fa5178";
/// A socket peer outside the allow-list was refused.
pub const PEER_DENIED: &str = "d7bce9bd7fac4bc593e65da47c86f536";
/// The face app handed over new raw_data.
pub const RAW_DATA_RECEIVED: &str = "fb887f9a05624d0fb84eb75b04766264";
/// The proxy refused our timestamp; its clock's offset was learned.
pub const CLOCK_SKEW_LEARNED: &str = "1814d8a3e9db4bd79a7cb89b81ba8089";
/// The wall clock jumped ahead of the monotonic clock (a suspend, or the clock set).
pub const CLOCK_JUMP: &str = "dd00e74986704ccb98a75b143f1cb41c";
/// A daemon loop stopped reporting in; the watchdog is not petted, so systemd restarts us.
pub const WATCHDOG_WITHHELD: &str = "1592c261754e4161b22e3273b57e89af";
/// SIGHUP: the config was read again and what can change while running was applied.
pub const CONFIG_RELOADED: &str = "ade95745ceee45839ae36fffa0295e8f";
/// SIGHUP: the config could not be read or is invalid; the daemon keeps the one it runs with.
pub const CONFIG_RELOAD_FAILED: &str = "8377a1b8c6be42f4ad4f4dda646af166";
/// The factory inspection passed.
pub const INSPECTION_PASSED: &str = "1e0bcda0f105443ab2d37ad2b03d10e2";
/// The factory inspection reported WARN or FAIL.
pub const INSPECTION_WARNING: &str = "3cb0bdfd0ad6479db862f7195e1cbdb1";
/// Alipay does not know the device (not bound).
pub const ALIPAY_UNBOUND: &str = "c93e72ec99424b088f02d0ab3bedb638";
/// A device health check failed; the previous result is kept.
pub const HEALTH_CHECK_FAILED: &str = "c90be0b98e174780bc1e6bdb69e030cc";
/// The face SDK licence is valid for more than 30 days.
pub const LICENCE_VALID: &str = "ee073ed9fb9d4915bbdb4d696173b848";
/// The face SDK licence expires within 30 days.
pub const LICENCE_EXPIRING: &str = "900b6ac7533b4063ad294b8188471306";
/// The face SDK licence expires within 7 days, or has lapsed.
pub const LICENCE_URGENT: &str = "25228d016b9d43bdbaee563029a530d4";

// === the signing proxy ===

/// `authinfo-proxy` started.
pub const PROXY_STARTED: &str = "acd1260432764fc1aab0378304fdd488";
/// `authinfo-proxy` stopped.
pub const PROXY_STOPPED: &str = "6c698144a8fc45f7a2b23e59461fb6ea";
/// The device registry was reloaded.
pub const REGISTRY_RELOADED: &str = "cba68da4a23547f784dd962c52b9ae4d";
/// A registry reload failed; the previous registry stays.
pub const REGISTRY_RELOAD_FAILED: &str = "3b89119462724f3c954c959fe90f202a";
/// The fleet list was synced from WeChat Pay.
pub const FLEET_SYNCED: &str = "9ab9617144c6465eb5f640c159c9c07f";
/// A fleet sync failed; the cached list stays.
pub const FLEET_SYNC_FAILED: &str = "649500c3953b4ac4b3ca48be2c46fb53";
/// The replicas' Redis (`[cluster]`) stopped answering; terminal requests get a retryable 503.
pub const CLUSTER_UNAVAILABLE: &str = "57d7ef4afbc546b99ac47c5bc99144ba";
/// The replicas' Redis answers again.
pub const CLUSTER_RECOVERED: &str = "8aa95fd876604e909408bf4b6c1dc38b";
/// A terminal's request was refused (authentication, fleet, or the platform's answer).
pub const TERMINAL_REFUSED: &str = "afe374d2a5d043f8a738d293a83e46ed";
/// A terminal's requests are refused by a rate limit (logged once per device per minute).
pub const TERMINAL_RATE_LIMITED: &str = "e76e107a6eb8490e8a72c7bed81059ad";
/// WeChat Pay's platform certificates were downloaded and verified.
pub const PLATFORM_CERTIFICATES_REFRESHED: &str = "1b3f5067d78042eab0dc1b0e593c4f79";
/// Downloading the platform certificates failed; the trusted ones stay.
pub const PLATFORM_CERTIFICATES_FAILED: &str = "f79ce4f80a2e4ec1889b499ec3c18812";
/// A platform certificate not seen before is trusted now (a rotation began).
pub const PLATFORM_CERTIFICATE_NEW: &str = "de2b89b1a7ae445595850471c4c62fbc";
/// Every trusted platform certificate expires within 30 days.
pub const PLATFORM_CERTIFICATES_EXPIRING: &str = "2e6ee522f42b462b90f3250335c8e548";
/// A terminal entered a risk of the fleet view (or its severity changed).
pub const TERMINAL_AT_RISK: &str = "b6c1f0e2a9d44f1c8e27d3a5c0f49b18";
/// A terminal left a risk of the fleet view.
pub const TERMINAL_RISK_CLEARED: &str = "4d9e2b7c15a34e0f9b6a8c2d7e1f0a53";

/// Every id and its name, as the catalog lists them.
pub const ALL: &[(&str, &str)] = &[
    (DAEMON_STARTED, "DAEMON_STARTED"),
    (DAEMON_STOPPED, "DAEMON_STOPPED"),
    (SERVING_STORED, "SERVING_STORED"),
    (REFRESH_OK, "REFRESH_OK"),
    (REFRESH_FAILED, "REFRESH_FAILED"),
    (REFRESH_REFUSED, "REFRESH_REFUSED"),
    (PERSIST_FAILED, "PERSIST_FAILED"),
    (STORE_RECOVERED, "STORE_RECOVERED"),
    (PEER_DENIED, "PEER_DENIED"),
    (RAW_DATA_RECEIVED, "RAW_DATA_RECEIVED"),
    (CLOCK_SKEW_LEARNED, "CLOCK_SKEW_LEARNED"),
    (CLOCK_JUMP, "CLOCK_JUMP"),
    (WATCHDOG_WITHHELD, "WATCHDOG_WITHHELD"),
    (CONFIG_RELOADED, "CONFIG_RELOADED"),
    (CONFIG_RELOAD_FAILED, "CONFIG_RELOAD_FAILED"),
    (INSPECTION_PASSED, "INSPECTION_PASSED"),
    (INSPECTION_WARNING, "INSPECTION_WARNING"),
    (ALIPAY_UNBOUND, "ALIPAY_UNBOUND"),
    (HEALTH_CHECK_FAILED, "HEALTH_CHECK_FAILED"),
    (LICENCE_VALID, "LICENCE_VALID"),
    (LICENCE_EXPIRING, "LICENCE_EXPIRING"),
    (LICENCE_URGENT, "LICENCE_URGENT"),
    (PROXY_STARTED, "PROXY_STARTED"),
    (PROXY_STOPPED, "PROXY_STOPPED"),
    (REGISTRY_RELOADED, "REGISTRY_RELOADED"),
    (REGISTRY_RELOAD_FAILED, "REGISTRY_RELOAD_FAILED"),
    (FLEET_SYNCED, "FLEET_SYNCED"),
    (FLEET_SYNC_FAILED, "FLEET_SYNC_FAILED"),
    (CLUSTER_UNAVAILABLE, "CLUSTER_UNAVAILABLE"),
    (CLUSTER_RECOVERED, "CLUSTER_RECOVERED"),
    (TERMINAL_REFUSED, "TERMINAL_REFUSED"),
    (TERMINAL_RATE_LIMITED, "TERMINAL_RATE_LIMITED"),
    (
        PLATFORM_CERTIFICATES_REFRESHED,
        "PLATFORM_CERTIFICATES_REFRESHED",
    ),
    (PLATFORM_CERTIFICATES_FAILED, "PLATFORM_CERTIFICATES_FAILED"),
    (PLATFORM_CERTIFICATE_NEW, "PLATFORM_CERTIFICATE_NEW"),
    (
        PLATFORM_CERTIFICATES_EXPIRING,
        "PLATFORM_CERTIFICATES_EXPIRING",
    ),
    (TERMINAL_AT_RISK, "TERMINAL_AT_RISK"),
    (TERMINAL_RISK_CLEARED, "TERMINAL_RISK_CLEARED"),
];

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Each id is 128 bits of lower-case hex, all distinct, and the catalog explains exactly
    /// these ids, each with a subject.
    #[test]
    fn ids_are_distinct_128_bit_and_match_the_catalog() {
        let ids: BTreeSet<&str> = ALL.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids.len(), ALL.len(), "duplicate ids");
        for id in &ids {
            assert!(
                id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
                "{id}"
            );
        }
        let catalog = include_str!("../packaging/authinfod.catalog");
        let entries: Vec<&str> = catalog.split("\n-- ").skip(1).collect();
        let in_catalog: BTreeSet<&str> = entries.iter().map(|e| &e[..32]).collect();
        assert_eq!(
            in_catalog, ids,
            "the catalog lists every id, and nothing else"
        );
        for entry in entries {
            assert!(entry.contains("\nSubject: "), "{entry}");
            assert!(entry.contains("\nDefined-By: authinfod\n"), "{entry}");
        }
    }
}
