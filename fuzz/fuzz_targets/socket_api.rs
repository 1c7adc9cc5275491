//! The daemon's socket API (`terminal::api::handle`) on any method, path, query, `If-None-Match`
//! and body, against a real state (sled store, held authinfo) on tokio's paused clock.
//!
//! The input is a request: `METHOD TARGET` on the first line, then header lines (the API reads
//! `If-None-Match`), an empty line and the body. Properties: every answer has a documented
//! status; it is JSON whenever it says so, and every error is `{"code","message"}` with a
//! documented code; a 304 is empty and carries the ETag; 405 carries `Allow`; the authinfo
//! appears in no answer but a 200 to `GET /v1/authinfo`; a refresh or long poll never waits past
//! its documented bound (the paused clock would otherwise hang the target, which libFuzzer
//! reports as a timeout).
#![no_main]

use authinfod::terminal::api::ApiRequest;
use authinfod_fuzz::daemon::{self, SECRET};
use authinfod_fuzz::{Message, check_api_response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(message) = Message::parse(data) else {
        return;
    };
    let Some((method, target)) = message.first_line.split_once(' ') else {
        return;
    };
    let Ok(method) = http::Method::from_bytes(method.as_bytes()) else {
        return;
    };
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
        None => (target.to_owned(), None),
    };
    let req = ApiRequest {
        method: method.clone(),
        path: path.clone(),
        query,
        if_none_match: message.header("If-None-Match").map(str::to_owned),
        body: bytes::Bytes::copy_from_slice(message.body),
    };
    // An error may quote what it was sent: the secret is looked for only when it was not.
    let sent_secret = data.windows(SECRET.len()).any(|w| w == SECRET.as_bytes());
    let response = daemon::handle(req);
    check_api_response(
        &method,
        &path,
        &response,
        if sent_secret { "" } else { SECRET },
    );
});
