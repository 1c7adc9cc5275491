//! The device request signature's signing string, end to end: what the terminal signs, the proxy
//! rebuilds byte for byte.
//!
//! The input is a candidate signing string, `METHOD\nTARGET\nTIMESTAMP\nNONCE\nBODY` (the body
//! is every byte after the fourth newline). Properties:
//! - the string `wire::auth::signing_string` builds splits back into the same five parts: two
//!   different requests never share a signing string;
//! - the header the terminal writes for that request (`Authorization`'s text form, as
//!   `DeviceSigner` writes it) parses at the proxy exactly when its timestamp and nonce are of
//!   the contract's shape, and then gives back the same timestamp and nonce, so the signing
//!   string the proxy rebuilds (`Authorization::verify` rebuilds it from the parsed header and
//!   the request as received) equals the terminal's;
//! - the request target the WeChat Pay client signs (`request_url` then `signed_target`) is
//!   exactly what an HTTP server reads back from the request line, so the platform rebuilds the
//!   same string too.
#![no_main]

use authinfod::platform::wechatpay::client::{request_url, signed_target};
use authinfod::wire::auth::{Authorization, signing_string};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(5, |b| *b == b'\n');
    let (Some(method), Some(target), Some(timestamp), Some(nonce), Some(body)) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return;
    };
    let (Ok(method), Ok(target), Ok(timestamp), Ok(nonce)) = (
        std::str::from_utf8(method),
        std::str::from_utf8(target),
        std::str::from_utf8(timestamp),
        std::str::from_utf8(nonce),
    ) else {
        return;
    };
    let Ok(ts) = timestamp.parse::<i64>() else {
        return;
    };

    // The signing string splits back into its parts.
    let signed = signing_string(method, target, ts, nonce, body);
    let mut back = signed.splitn(5, |b| *b == b'\n');
    assert_eq!(back.next(), Some(method.as_bytes()));
    assert_eq!(back.next(), Some(target.as_bytes()));
    assert_eq!(back.next(), Some(ts.to_string().as_bytes()));
    assert_eq!(back.next(), Some(nonce.as_bytes()));
    let rest = back.next().expect("the body line");
    assert_eq!(rest.last(), Some(&b'\n'));
    assert_eq!(&rest[..rest.len() - 1], body);

    // What the terminal writes, the proxy reads back to the same signing string.
    let header = Authorization {
        device_id: "T-1001".into(),
        timestamp: ts,
        nonce: nonce.to_owned(),
        signature: "c2lnbmF0dXJl".into(),
    }
    .to_string();
    let contract_shaped = (0..=999_999_999_999).contains(&ts)
        && (16..=64).contains(&nonce.len())
        && nonce.bytes().all(|b| b.is_ascii_alphanumeric());
    match Authorization::parse(&header) {
        Ok(parsed) => {
            assert!(contract_shaped, "the proxy accepted {header:?}");
            assert_eq!(
                signing_string(method, target, parsed.timestamp, &parsed.nonce, body),
                signed
            );
        }
        Err(e) => assert!(!contract_shaped, "the proxy refused {header:?}: {e}"),
    }

    // The target the WeChat Pay client signs is the one an HTTP server reads back.
    let base = url::Url::parse("https://api.mch.weixin.qq.com/").expect("base URL");
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    if !path.starts_with('/') {
        return;
    }
    let url = request_url(&base, path, query);
    let sent = signed_target(&url);
    let read: http::uri::PathAndQuery = sent
        .parse()
        .unwrap_or_else(|e| panic!("{sent:?} (from {target:?}) is not a request target: {e}"));
    assert_eq!(read.as_str(), sent, "from {target:?}");
});
