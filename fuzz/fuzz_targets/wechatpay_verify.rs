//! The check of WeChat Pay's answer signatures (`PlatformKeys::verify`, then the readers of
//! `platform::wechatpay::client`) on answers whose headers and body are anything.
//!
//! The input is an answer: a status line, header lines (`Wechatpay-Serial`, `-Timestamp`,
//! `-Nonce`, `-Signature`), an empty line, the body. The target holds a platform key (the
//! crate's `test_key`) and signs the genuine answers of its seed corpus with it at start (signing every input
//! would cost a millisecond each); a `Wechatpay-Signature` of `GENUINE` is replaced by the
//! genuine signature of the seed answer with the same timestamp, nonce and body, or else by the
//! first seed's. Properties:
//! - nothing verifies that is not a genuine answer: a signature made over one message never
//!   verifies another, whatever the headers say;
//! - a genuine answer within the window verifies, and is refused as stale at 300 s or more;
//! - a verified answer reads exactly as its body parses.
#![no_main]

use std::sync::OnceLock;

use authinfod::platform::wechatpay::client::{read_authinfo, read_device_page, read_inspection};
use authinfod::platform::wechatpay::verify::{PlatformKeys, SignatureError, response_message};
use authinfod::platform::wechatpay::{Authinfo, DeviceInspection};
use authinfod_fuzz::Message;
use libfuzzer_sys::fuzz_target;

/// The key id the seeds name in `Wechatpay-Serial`.
const KEY_ID: &str = "PUB_KEY_ID_0114232134912410000000000000000001";

/// The seed answers whose signatures the target makes.
const SEEDS: &[&[u8]] = &[
    include_bytes!("../seeds/wechatpay_verify/authinfo-200.txt"),
    include_bytes!("../seeds/wechatpay_verify/inspection-200.txt"),
    include_bytes!("../seeds/wechatpay_verify/devices-200.txt"),
];

struct Genuine {
    timestamp: String,
    nonce: String,
    body: Vec<u8>,
    signature: String,
}

struct Setup {
    keys: PlatformKeys,
    genuine: Vec<Genuine>,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let key = authinfod_fuzz::test_key();
        let mut keys = PlatformKeys::new();
        keys.add_public_key(KEY_ID, key.public.clone());
        let genuine = SEEDS
            .iter()
            .map(|seed| {
                let m = Message::parse(seed).expect("a seed answer");
                let timestamp = m
                    .header("Wechatpay-Timestamp")
                    .expect("timestamp")
                    .to_owned();
                let nonce = m.header("Wechatpay-Nonce").expect("nonce").to_owned();
                let message = response_message(&timestamp, &nonce, m.body);
                Genuine {
                    signature: key.signer.sign_base64(&message).expect("sign"),
                    timestamp,
                    nonce,
                    body: m.body.to_vec(),
                }
            })
            .collect();
        Setup { keys, genuine }
    })
}

fuzz_target!(|data: &[u8]| {
    let setup = setup();
    let Some(message) = Message::parse(data) else {
        return;
    };
    let status = message.status().unwrap_or(200);
    let mut headers = message.header_map();
    let ts = message.header("Wechatpay-Timestamp").unwrap_or_default();
    let nonce = message.header("Wechatpay-Nonce").unwrap_or_default();
    let matched = setup
        .genuine
        .iter()
        .position(|g| g.timestamp == ts && g.nonce == nonce && g.body == message.body);
    let lent = &setup.genuine[matched.unwrap_or(0)];
    if message.header("Wechatpay-Signature") == Some("GENUINE") {
        headers.insert(
            "Wechatpay-Signature",
            lent.signature.parse().expect("base64 is a header value"),
        );
    }
    // The clock the answer is checked at: the genuine timestamp, moved by the `X-Fuzz-Now`
    // header's seconds when there is one (to reach both sides of the window).
    let genuine_ts: i64 = lent.timestamp.parse().expect("a seed timestamp");
    let shift = message
        .header("X-Fuzz-Now")
        .and_then(|s| s.parse::<i64>().ok())
        .unwrap_or(0);
    let now = genuine_ts.saturating_add(shift);

    let verified = setup.keys.verify(&headers, message.body, now);
    let value = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .unwrap_or_default()
            .to_owned()
    };
    let (h_serial, h_ts, h_nonce, h_sig) = (
        value("Wechatpay-Serial"),
        value("Wechatpay-Timestamp"),
        value("Wechatpay-Nonce"),
        value("Wechatpay-Signature"),
    );
    let serial_ok = h_serial == KEY_ID || h_serial.to_ascii_uppercase() == KEY_ID;
    let is_genuine =
        h_ts == lent.timestamp && h_nonce == lent.nonce && message.body == lent.body.as_slice();
    if verified.is_ok() {
        assert!(
            is_genuine && serial_ok,
            "verified an answer that was never signed: {h_serial} {h_ts} {h_nonce} {:?}",
            String::from_utf8_lossy(message.body)
        );
        assert!(now.abs_diff(genuine_ts) < 300);
    }
    if is_genuine && serial_ok && h_sig == lent.signature {
        match now.abs_diff(genuine_ts) {
            0..300 => assert_eq!(verified, Ok(()), "a genuine answer is refused"),
            _ => assert!(
                matches!(verified, Err(SignatureError::Stale { .. })),
                "{verified:?}"
            ),
        }
    }

    // What the readers make of it: non-2xx is a refusal, unverified 2xx a bad signature, a
    // verified one exactly its body as parsed.
    let authinfo = read_authinfo(status, &headers, message.body, &setup.keys, now);
    let inspection = read_inspection(status, &headers, message.body, &setup.keys, now);
    let page = read_device_page(status, &headers, message.body, &setup.keys, now, 0, 100);
    if !(200..300).contains(&status) || verified.is_err() {
        assert!(authinfo.is_err() && inspection.is_err() && page.is_err());
        return;
    }
    let object = authinfod_fuzz::opens_object(message.body);
    let parsed = serde_json::from_slice::<Authinfo>(message.body)
        .ok()
        .filter(|a| object && !a.authinfo.is_empty());
    assert_eq!(authinfo.ok().map(|a| a.value), parsed);
    assert_eq!(
        inspection.ok(),
        serde_json::from_slice::<DeviceInspection>(message.body)
            .ok()
            .filter(|_| object)
    );
    if let Ok(page) = page {
        assert!(page.next_offset().is_none_or(|n| n > page.offset));
    }
});
