//! WeChat Pay's platform certificates answer (`GET /v3/certificates`): the body read as the
//! document (`platform::wechatpay::certificates::read_answer`), then every entry opened with the
//! merchant's APIv3 key (`open_answer`: AEAD_AES_256_GCM, the certificate inside, its serial
//! against the entry's). The answer's signature is `wechatpay_verify`'s.
//!
//! The input is a body. Properties:
//! - a body reads exactly when it is a JSON object serde_json reads as the answer;
//! - an answer opens only when every entry says AEAD_AES_256_GCM, opens with the key (the
//!   seeds' entries are sealed with it, and the fuzzer mutates around them) and holds the
//!   certificate its entry names; what opens is one certificate per entry, in order, each the
//!   decrypted text itself, with the entry's serial, and readable again from its PEM;
//! - the input sealed as one certificate (as the sandbox seals them) decrypts back to itself,
//!   and the answer made of it opens exactly when it is a certificate PEM, under its own serial.
#![no_main]

use authinfod::platform::wechatpay::certificates::{
    ALGORITHM, ApiV3Key, CertificatesAnswer, open_answer, read_answer,
};
use authinfod::platform::wechatpay::verify::read_certificate_pem;
use authinfod::sandbox::wechatpay::seal_certificate;
use authinfod_fuzz::{APIV3_KEY, opens_object};
use libfuzzer_sys::fuzz_target;

/// The nonce and associated data the sealed input is given (WeChat Pay's are 12 characters and
/// `certificate`).
const NONCE: &str = "fuzz-nonce12";
const ASSOCIATED: &str = "certificate";

fn key() -> ApiV3Key {
    ApiV3Key::from_text(APIV3_KEY).expect("the fixture key is 32 characters")
}

fuzz_target!(|data: &[u8]| {
    let key = key();

    // The document.
    let read = read_answer(data);
    let expected = serde_json::from_slice::<CertificatesAnswer>(data)
        .ok()
        .filter(|_| opens_object(data));
    assert_eq!(read.as_ref().ok(), expected.as_ref());

    // Every entry opened.
    if let Ok(answer) = &read
        && let Ok(opened) = open_answer(answer, &key)
    {
        assert_eq!(opened.len(), answer.data.len());
        for (certificate, entry) in opened.iter().zip(&answer.data) {
            let sealed = &entry.encrypt_certificate;
            assert_eq!(sealed.algorithm, ALGORITHM);
            let plain = key
                .decrypt(&sealed.nonce, &sealed.associated_data, &sealed.ciphertext)
                .expect("an opened entry decrypts");
            assert_eq!(plain, certificate.pem.as_bytes());
            assert!(
                certificate
                    .info
                    .serial
                    .eq_ignore_ascii_case(&entry.serial_no),
                "{} opened as {}",
                entry.serial_no,
                certificate.info.serial
            );
            let again = read_certificate_pem(&certificate.pem, "fuzz").expect("reads again");
            assert_eq!(again.serial, certificate.info.serial);
        }
    }

    // The input as the certificate WeChat Pay seals.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let ciphertext =
        seal_certificate(APIV3_KEY, NONCE, ASSOCIATED, text).expect("sealing cannot fail");
    assert_eq!(
        key.decrypt(NONCE, ASSOCIATED, &ciphertext)
            .expect("what was sealed opens"),
        data
    );
    let certificate = read_certificate_pem(text, "fuzz");
    let serial = certificate.as_ref().map_or("0", |c| c.serial.as_str());
    let body = serde_json::json!({
        "data": [{
            "serial_no": serial,
            "effective_time": "2026-01-01T00:00:00+08:00",
            "expire_time": "2031-01-01T00:00:00+08:00",
            "encrypt_certificate": {
                "algorithm": ALGORITHM,
                "nonce": NONCE,
                "associated_data": ASSOCIATED,
                "ciphertext": ciphertext,
            },
        }],
    });
    let answer = read_answer(body.to_string().as_bytes()).expect("the made answer reads");
    let opened = open_answer(&answer, &key);
    assert_eq!(
        opened.is_ok(),
        certificate.is_ok(),
        "{opened:?} for {certificate:?}"
    );
});
