//! The proxy's `Authorization` header parser (`wire::auth::Authorization::parse`) on any text.
//!
//! Properties: a header that parses is of the contract's shape (a valid device id, a decimal
//! timestamp of at most 12 digits, a 16-64 character alphanumeric nonce, a base64 signature),
//! formatting it gives back a header that parses to the same value (what the terminal writes,
//! the proxy reads), and the skew check never overflows.
#![no_main]

use authinfod::wire::auth::{Authorization, MAX_HEADER_LEN, SCHEME};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for header in [text.to_owned(), format!("{SCHEME} {text}")] {
        let Ok(a) = Authorization::parse(&header) else {
            continue;
        };
        assert!(header.len() <= MAX_HEADER_LEN);
        assert!(authinfod::wire::valid_device_id(&a.device_id), "{a:?}");
        assert!((0..=999_999_999_999).contains(&a.timestamp), "{a:?}");
        assert!((16..=64).contains(&a.nonce.len()), "{a:?}");
        assert!(a.nonce.bytes().all(|b| b.is_ascii_alphanumeric()), "{a:?}");
        assert!(!a.signature.is_empty(), "{a:?}");
        assert!(
            a.signature
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=')),
            "{a:?}"
        );
        let written = a.to_string();
        assert_eq!(Authorization::parse(&written).as_ref(), Ok(&a), "{written}");
        for now in [i64::MIN, -1, 0, a.timestamp, i64::MAX] {
            if let Some(skew) = a.skew(now) {
                assert!(skew.unsigned_abs() > 300);
            }
        }
    }
});
