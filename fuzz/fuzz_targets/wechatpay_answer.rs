//! Reading WeChat Pay's answers once their signature is checked (`decode_answer` and what each
//! endpoint does after it), and its error answers (`error_answer`), on any status, headers and
//! body. The signature check itself is `wechatpay_verify`'s.
//!
//! The input is an answer: a status line, header lines, an empty line, the body. Properties:
//! - a 2xx body reads as an authinfo exactly when it is an object serde_json parses as one with a
//!   non-empty authinfo; as an inspection exactly when it is an object serde_json parses as one; a
//!   page that reads keeps the offset and limit the answer gave (or the request's) and its next
//!   offset always moves forward, so paging ends;
//! - an error answer keeps its status and the body's code and message when the body is
//!   `{"code","message"}`, and its failure class follows the documented table (429 or
//!   FREQUENCY_LIMITED → rate limited, else 5xx or SYSTEM_ERROR → server error, else refused),
//!   whatever else the body holds.
#![no_main]

use authinfod::platform::FailureClass;
use authinfod::platform::wechatpay::client::{
    Answer, RawDevicePage, WechatPayError, check_authinfo, classify, decode_answer, error_answer,
};
use authinfod::platform::wechatpay::{Authinfo, DeviceInspection};
use authinfod_fuzz::{Message, opens_object};
use libfuzzer_sys::fuzz_target;

const ENDPOINT: &str = "GET /fuzz";

fuzz_target!(|data: &[u8]| {
    let Some(message) = Message::parse(data) else {
        return;
    };
    let Some(status) = message.status() else {
        return;
    };
    let body = message.body;
    let headers = message.header_map();
    let request_id = message.header("Request-ID").map(str::to_owned);

    if (200..300).contains(&status) {
        let authinfo = decode_answer::<Authinfo>(ENDPOINT, status, request_id.clone(), body)
            .and_then(check_authinfo)
            .map(|a| a.value);
        let expected = serde_json::from_slice::<Authinfo>(body)
            .ok()
            .filter(|a| opens_object(body) && !a.authinfo.is_empty());
        assert_eq!(authinfo.as_ref().ok(), expected.as_ref());
        if let Err(e) = &authinfo {
            assert_eq!(e.failure().class, FailureClass::Malformed, "{e}");
            assert_eq!(e.failure().request_id, request_id);
        }
        let inspection =
            decode_answer::<DeviceInspection>(ENDPOINT, status, request_id.clone(), body);
        assert_eq!(
            inspection.ok().map(|a| a.value),
            serde_json::from_slice::<DeviceInspection>(body)
                .ok()
                .filter(|_| opens_object(body))
        );
        let raw: Result<Answer<RawDevicePage>, _> =
            decode_answer(ENDPOINT, status, request_id, body);
        let seen: Option<serde_json::Value> = serde_json::from_slice(body).ok();
        // serde_json skips the strings of fields it ignores without checking their UTF-8, so
        // a page may read where the whole body is not JSON; those are compared by shape only.
        if let Ok(raw) = raw {
            let (offset, limit) = (17, 100);
            let page = raw.value.into_page(offset, limit);
            if let Some(next) = page.next_offset() {
                assert!(next > page.offset, "paging does not move forward: {page:?}");
                assert!(!page.data.is_empty());
            }
            let Some(seen) = seen else {
                return;
            };
            let field = |name: &str, default: u64| seen[name].as_u64().unwrap_or(default);
            assert_eq!(page.offset, field("offset", offset));
            assert_eq!(page.limit, field("limit", limit));
            assert_eq!(page.total_count, seen["total_count"].as_u64());
            assert_eq!(page.data.len(), seen["data"].as_array().map_or(0, Vec::len));
        }
        return;
    }

    let error = error_answer(ENDPOINT, status, &headers, body);
    let WechatPayError::Api {
        status: seen_status,
        code,
        message: text,
        ..
    } = &error
    else {
        panic!("an error answer is an Api error: {error:?}");
    };
    assert_eq!(*seen_status, status);
    #[derive(serde::Deserialize)]
    struct Sent {
        code: Option<String>,
        message: Option<String>,
    }
    if let Ok(sent) = serde_json::from_slice::<Sent>(body)
        && opens_object(body)
    {
        assert_eq!(code, &sent.code);
        assert_eq!(text, &sent.message);
    }
    let failure = error.failure();
    assert_eq!(failure.class, classify(status, code.as_deref()));
    let want = if status == 429 || code.as_deref() == Some("FREQUENCY_LIMITED") {
        FailureClass::RateLimited
    } else if status >= 500 || code.as_deref() == Some("SYSTEM_ERROR") {
        FailureClass::ServerError
    } else {
        FailureClass::Rejected
    };
    assert_eq!(failure.class, want);
    assert_eq!(failure.status, status);
});
