//! The daemon store's record decoding (`terminal::store::decode_record`) on whatever bytes sled
//! hands back, and the daemon serving what decoded.
//!
//! The input is `KEY` on the first line (`authinfo.current`, `authinfo.previous`, `raw_data`,
//! `attempt.last`, `health.inspection`, `health.alipay_binding`, `health.licence`), an empty
//! line, then the record's bytes. Properties: the bytes give either the record or a
//! `StoreError::Decode` naming that key; a record that decodes encodes back to a record equal
//! to it; and a daemon holding it still answers every read route of the socket API within the
//! contract (a documented status, JSON, no panic), whatever the timestamps and strings in it.
#![no_main]

use authinfod::terminal::api::ApiRequest;
use std::sync::Arc;

use authinfod::terminal::device::{CheckRecord, DeviceHealth};
use authinfod::terminal::store::{AttemptRecord, HeldAuthinfo, RawData, StoreError, decode_record};
use authinfod_fuzz::daemon::{self, SECRET};
use authinfod_fuzz::{Message, check_api_response};
use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;

fn decode<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(
    key: &str,
    bytes: &[u8],
) -> Option<T> {
    match decode_record::<T>(key, bytes) {
        Ok(record) => {
            let again = serde_json::to_vec(&record).expect("a record encodes");
            let back: T = decode_record(key, &again).expect("an encoded record decodes");
            assert_eq!(back, record);
            Some(record)
        }
        Err(StoreError::Decode { key: named, .. }) => {
            assert_eq!(named, key);
            None
        }
        Err(other) => panic!("decoding gave {other}"),
    }
}

/// A health record of one check decoded, then served in place of the fixture's for a round of
/// the read routes.
fn swap_health<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(
    key: &str,
    bytes: &[u8],
    secret: &str,
    slot: impl Fn(&mut DeviceHealth) -> &mut CheckRecord<T>,
) {
    let Some(record) = decode::<CheckRecord<T>>(key, bytes) else {
        return;
    };
    let state = &daemon::fixture().state;
    let before = std::mem::replace(slot(&mut state.health()), record);
    serve_all(secret);
    *slot(&mut state.health()) = before;
}

/// The read routes.
const READ_ROUTES: [&str; 5] = [
    "/v1/authinfo",
    "/v1/status",
    "/v1/device",
    "/healthz",
    "/metrics",
];

fn get(path: &str) -> authinfod::terminal::api::ApiResponse {
    daemon::handle(ApiRequest {
        method: http::Method::GET,
        path: path.into(),
        ..ApiRequest::default()
    })
}

/// Every read route, answered within the contract.
fn serve_all(secret: &str) {
    for path in READ_ROUTES {
        check_api_response(&http::Method::GET, path, &get(path), secret);
    }
}

/// Whether some read route's answer holds `text` while the daemon does not hold it: text the
/// answers carry anyway (a gauge's line, say), which no check can tell from a leaked secret.
fn answers_hold(text: &str) -> bool {
    READ_ROUTES.iter().any(|path| {
        get(path)
            .body
            .windows(text.len())
            .any(|w| w == text.as_bytes())
    })
}

fuzz_target!(|data: &[u8]| {
    let Some(message) = Message::parse(data) else {
        return;
    };
    let key = message.first_line.trim();
    let bytes = message.body;
    // A record may itself carry the fixture's secret text; then it is not looked for.
    let secret = if bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()) {
        ""
    } else {
        SECRET
    };
    let state = &daemon::fixture().state;
    match key {
        "authinfo.current" | "authinfo.previous" => {
            if let Some(held) = decode::<HeldAuthinfo>(key, bytes) {
                let restore = state.current().map(|s| s.held.clone());
                let held_secret = held.authinfo.clone();
                // The record's own authinfo is the secret once held (unless it is too short to
                // tell apart from the text of the answers, "authinfo" itself, say, or the
                // answers hold it before it is held: the fuzzer once made it the start-time
                // gauge's line of GET /metrics).
                let telling = held_secret.len() >= 24 && !answers_hold(&held_secret);
                state.publish(held);
                let own = if telling {
                    held_secret.as_str()
                } else {
                    secret
                };
                serve_all(own);
                if let Some(held) = restore {
                    state.publish(held);
                }
            }
        }
        "raw_data" if decode::<RawData>(key, bytes).is_some() => serve_all(secret),
        "attempt.last" => {
            if let Some(attempt) = decode::<AttemptRecord>(key, bytes) {
                let before = state
                    .refresh_status()
                    .last_attempt
                    .replace(Arc::new(attempt));
                serve_all(secret);
                state.refresh_status().last_attempt = before;
            }
        }
        "health.inspection" => swap_health(key, bytes, secret, |h| &mut h.inspection),
        "health.alipay_binding" => swap_health(key, bytes, secret, |h| &mut h.alipay_binding),
        "health.licence" => swap_health(key, bytes, secret, |h| &mut h.licence),
        _ => {}
    }
});
