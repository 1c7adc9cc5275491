//! Alibaba Cloud Cloudauth's answers: `DescribeDeviceInfo` pages (`platform::aliyun::read_page`)
//! and error answers (`read_error`), on any status, headers and body.
//!
//! The input is an answer: a status line, header lines (`x-acs-request-id`), an empty line, the
//! body. Properties:
//! - a 2xx body reads as a page exactly when serde_json reads one (`RequestId`, `TotalCount`,
//!   `PageSize`, `CurrentPage`, `DeviceInfoList.DeviceInfo[]`), with the same records, and every
//!   day in it that parses as `YYYYMMDD` prints back to the same day;
//! - an error answer keeps its status, takes the body's `Code`, `Message` and `RequestId` when
//!   it is an error body (the header's request id otherwise), and is classed as documented: 429
//!   or `Throttling*` → rate limited, else 5xx, `InternalError` or `ServiceUnavailable` →
//!   server error, else 4xx → refused, anything else → malformed.
#![no_main]

use authinfod::platform::FailureClass;
use authinfod::platform::aliyun::{AliyunError, format_day, parse_day, read_error, read_page};
use authinfod_fuzz::Message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(message) = Message::parse(data) else {
        return;
    };
    let Some(status) = message.status() else {
        return;
    };
    let body = String::from_utf8_lossy(message.body);
    let header_id = message.header("x-acs-request-id").map(str::to_owned);

    if (200..300).contains(&status) {
        let Ok(page) = read_page(&body) else {
            return;
        };
        for info in &page.device_info_list {
            for text in [&info.begin_day, &info.expired_day] {
                if let Some(day) = parse_day(text) {
                    assert_eq!(format_day(day).replace('-', ""), *text);
                }
            }
            assert_eq!(info.expiry_date(), parse_day(&info.expired_day));
        }
        // serde_json skips the fields a struct ignores without checking them (a number out of
        // range, a lone surrogate escape) where its Value refuses the whole document; the page
        // is compared with the Value where that reads.
        let Ok(seen) = serde_json::from_str::<serde_json::Value>(&body) else {
            return;
        };
        assert_eq!(seen["RequestId"].as_str(), Some(page.request_id.as_str()));
        assert_eq!(seen["TotalCount"].as_u64(), Some(page.total_count));
        let listed = seen["DeviceInfoList"]["DeviceInfo"]
            .as_array()
            .map_or(0, Vec::len);
        assert_eq!(page.device_info_list.len(), listed);
        return;
    }

    let error = read_error(status, &body, header_id.clone(), None);
    let AliyunError::Api {
        status: seen_status,
        code,
        message: text,
        request_id,
        ..
    } = &error
    else {
        panic!("an error answer is an Api error: {error:?}");
    };
    assert_eq!(*seen_status, status);
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Sent {
        request_id: Option<String>,
        code: Option<String>,
        message: Option<String>,
    }
    match serde_json::from_str::<Sent>(&body) {
        Ok(sent) if authinfod_fuzz::opens_object(body.as_bytes()) => {
            assert_eq!(code, &sent.code);
            assert_eq!(text, &sent.message);
            assert_eq!(request_id, &sent.request_id.or(header_id));
        }
        _ => {
            assert_eq!((code, text), (&None, &None));
            assert_eq!(request_id, &header_id);
        }
    }
    let class = error.failure().class;
    let code = code.as_deref().unwrap_or_default();
    let want = if status == 429 || code.starts_with("Throttling") {
        FailureClass::RateLimited
    } else if status >= 500 || code == "InternalError" || code == "ServiceUnavailable" {
        FailureClass::ServerError
    } else if (400..500).contains(&status) {
        FailureClass::Rejected
    } else {
        FailureClass::Malformed
    };
    assert_eq!(class, want);
});
