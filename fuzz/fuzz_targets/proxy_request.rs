//! The bodies the proxy's terminal routes read (`POST /v1/authinfo`'s `{"raw_data"}`), and the
//! terminal's reading of what the proxy answers (`terminal::proxy_client::read_authinfo` for a
//! 2xx, `read_refusal` for anything else).
//!
//! The input is an answer: a status on the first line, header lines, an empty line, the body;
//! the body is also read as a request body. Properties:
//! - `AuthinfoRequest::from_body` accepts a body exactly when serde_json sees one object whose
//!   only member is `raw_data`, once, a string of 1 to `MAX_RAW_DATA` bytes that is not all
//!   whitespace, and then gives that string;
//! - an authinfo answer that reads is not empty and survives a round trip;
//! - a refusal always has a code, keeps the proxy's own code when the body is an error body
//!   with one,
//!   yields the proxy's clock only for a 401 `TIMESTAMP_SKEW`, and 429 and 5xx are always
//!   retried.
#![no_main]

use authinfod::terminal::proxy_client::{Disposition, read_authinfo, read_refusal};
use authinfod::wire::{self, AuthinfoRequest, AuthinfoResponse, ErrorBody};
use authinfod_fuzz::{Members, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(message) = Message::parse(data) else {
        return;
    };
    let body = message.body;

    // The proxy reading a request body, against serde_json's view of it.
    let expected = std::str::from_utf8(body)
        .ok()
        .and_then(Members::of)
        .and_then(|m| match (m.names().len(), m.one("raw_data")) {
            (1, Ok(Some(raw))) => serde_json::from_str::<String>(raw.get()).ok(),
            _ => None,
        })
        .filter(|raw| !raw.trim().is_empty() && raw.len() <= wire::MAX_RAW_DATA);
    match AuthinfoRequest::from_body(body) {
        Ok(request) => assert_eq!(Some(&request.raw_data), expected.as_ref()),
        Err(reason) => {
            assert!(expected.is_none(), "refused {expected:?}: {reason}");
            assert!(!reason.is_empty());
        }
    }

    // The terminal reading an answer.
    let Some(status) = message.status() else {
        return;
    };
    if (200..300).contains(&status) {
        if let Ok(answer) = read_authinfo(body) {
            assert!(!answer.authinfo.trim().is_empty());
            let again = serde_json::to_vec(&answer).expect("serialise");
            assert_eq!(read_authinfo(&again).ok(), Some(answer.clone()));
            let _: AuthinfoResponse = answer;
        }
        return;
    }
    let headers = message.header_map();
    let (error, proxy_date) = read_refusal(status, &headers, body);
    let authinfod::terminal::proxy_client::UpstreamError::Refused {
        status: seen,
        body: refusal,
        ..
    } = &error
    else {
        panic!("a refusal is a Refused error: {error:?}");
    };
    assert_eq!(*seen, status);
    assert!(!refusal.code.is_empty());
    if let Ok(sent) = serde_json::from_slice::<ErrorBody>(body)
        && authinfod_fuzz::opens_object(body)
        && !sent.code.trim().is_empty()
    {
        assert_eq!(refusal.code, sent.code);
    }
    if proxy_date.is_some() {
        assert_eq!(status, 401);
        assert_eq!(refusal.code, wire::codes::TIMESTAMP_SKEW);
    }
    if status == 429 || status >= 500 {
        assert!(matches!(error.disposition(), Disposition::Retry { .. }));
    }
    assert_eq!(error.code(), refusal.code);
});
