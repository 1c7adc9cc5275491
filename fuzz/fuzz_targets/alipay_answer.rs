//! Alipay's answers: finding the exact text of `alipay_merchant_iot_device_query_response` and
//! its `sign` in a body (`platform::alipay::signed_text`), checked against serde_json's own view
//! of the same document, then reading the object (`read_object`) and the whole answer
//! (`read_answer`, with a key the input cannot have signed for).
//!
//! The input is a body. Properties:
//! - the extracted object is, byte for byte, the text of the body's one
//!   `alipay_merchant_iot_device_query_response` member (or, when that is absent or null, its one
//!   `error_response`), a slice of the body itself (never re-serialised), and the sign is its
//!   one `sign` string; a body with two of any of those members, or one that is not a JSON
//!   object, is refused rather than read one way here and another way by a verifier;
//! - no answer reads as a binding without a valid sign, and none is a gateway error (a
//!   permanent refusal) either: an unsigned or badly signed answer is a signature failure, what
//!   an unsigned one claims shown only as code and sub_code in a safe alphabet;
//! - an object that reads as verified gives exactly what serde_json reads from it.
#![no_main]

use authinfod::crypto::RsaVerifier;
use authinfod::platform::FailureClass;
use authinfod::platform::alipay::{
    AlipayError, DEVICE_QUERY_RESPONSE_KEY, DeviceBinding, read_answer, read_object, signed_text,
};
use authinfod_fuzz::{Members, is_slice_of};
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;

fn alipay_public() -> &'static RsaVerifier {
    &authinfod_fuzz::test_key().public
}

fuzz_target!(|data: &[u8]| {
    let Ok(body) = std::str::from_utf8(data) else {
        return;
    };
    let extracted = signed_text(body);

    // serde_json's view: the members, duplicates included.
    let expected = Members::of(body).and_then(|m| {
        let response = m.one(DEVICE_QUERY_RESPONSE_KEY).ok()?;
        let error = m.one("error_response").ok()?;
        let sign = m.one("sign").ok()?;
        fn not_null(v: Option<&RawValue>) -> Option<&RawValue> {
            v.filter(|v| v.get() != "null")
        }
        let object = not_null(response).or(not_null(error))?;
        let sign = match not_null(sign) {
            None => None,
            Some(s) => Some(serde_json::from_str::<String>(s.get()).ok()?),
        };
        Some((object.get(), sign))
    });
    match (&extracted, &expected) {
        (Ok(text), Some((object, sign))) => {
            assert_eq!(text.object, *object, "not the member's exact text");
            assert!(
                is_slice_of(text.object, body),
                "the object was re-serialised"
            );
            assert_eq!(&text.sign, sign);
        }
        (Err(_), None) => {}
        (Ok(text), None) => panic!("read {text:?} where serde_json sees no single object"),
        (Err(e), Some(seen)) => panic!("refused {seen:?}: {e}"),
    }

    // The whole answer, with a key nobody signed for: never trusted, and never a permanent
    // refusal (an unsigned gateway error is not known to be Alipay's).
    match read_answer(body, alipay_public(), Some("trace".into())) {
        Ok(binding) => panic!("read {binding:?} without a valid sign"),
        Err(error) => {
            let failure = error.failure();
            assert_eq!(failure.request_id.as_deref(), Some("trace"));
            match (&extracted, &error) {
                (Err(_), AlipayError::Malformed { .. }) => {
                    assert_eq!(failure.class, FailureClass::Malformed);
                }
                (Err(e), other) => panic!("{e} became {other:?}"),
                (Ok(text), AlipayError::BadSignature { unverified, .. }) => {
                    assert_eq!(failure.class, FailureClass::BadSignature);
                    if text.sign.is_some() {
                        assert_eq!(unverified, &None, "a bad sign's claim was shown");
                    }
                    // What an unverified answer claims reaches the logs only as code and
                    // sub_code, 64 characters each of letters, digits and `._-`.
                    if let Some(claim) = unverified {
                        assert!(claim.len() <= 129, "{claim:?}");
                        assert!(
                            claim
                                .chars()
                                .all(|c| c.is_ascii_alphanumeric() || "._- ".contains(c)),
                            "{claim:?}"
                        );
                    }
                }
                (Ok(_), other) => panic!("unexpected {other:?}"),
            }
        }
    }

    // The object read as if verified, against serde_json's Value. serde_json skips the members
    // a struct ignores without checking them (a lone surrogate escape, a number out of range),
    // where its Value refuses the whole document: those are compared by code only when the
    // Value reads.
    if let Ok(text) = &extracted {
        let read = read_object(text.object, None);
        let Ok(common) = serde_json::from_str::<serde_json::Value>(text.object) else {
            return;
        };
        let code = common.get("code").and_then(|c| c.as_str());
        match read {
            Ok(binding) => {
                assert_eq!(code, Some("10000"));
                assert_eq!(
                    serde_json::from_str::<DeviceBinding>(text.object).ok(),
                    Some(binding)
                );
            }
            Err(AlipayError::Gateway { code: got, .. }) => {
                assert_eq!(Some(got.as_str()), code);
                assert_ne!(got, "10000");
            }
            Err(_) => {}
        }
    }
});
