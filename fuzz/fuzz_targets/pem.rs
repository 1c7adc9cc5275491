//! The PEM and key readers behind every key and certificate file the configs and the registry
//! name (`crypto::pem_blocks`, `RsaVerifier::from_pem`, `PlatformKeys::add_certificates_pem`,
//! `tls::client_config_pinned`), on any text.
//!
//! Properties: blocks that parse print back (`pem_encode`) to text that parses to the same
//! blocks; a public key that reads prints back to a PEM that reads as the same key (same
//! fingerprint); platform certificates that load give their serials in WeChat Pay's spelling
//! (upper-case hex, no leading zeros); nothing else is asked of arbitrary text but an error.
#![no_main]

use authinfod::crypto::{RsaVerifier, pem_blocks, pem_encode};
use authinfod::platform::wechatpay::verify::PlatformKeys;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(blocks) = pem_blocks(text, "fuzz") {
        let printed: String = blocks
            .iter()
            .map(|b| pem_encode(&b.label, &b.der))
            .collect();
        let again = pem_blocks(&printed, "fuzz").expect("printed PEM parses");
        assert_eq!(again.len(), blocks.len());
        for (a, b) in again.iter().zip(&blocks) {
            assert_eq!((&a.label, &a.der), (&b.label, &b.der));
        }
    }
    if let Ok(key) = RsaVerifier::from_pem(text, "fuzz") {
        let back = RsaVerifier::from_pem(&key.to_pem(), "fuzz").expect("printed key reads");
        assert_eq!(back.fingerprint(), key.fingerprint());
    }
    let mut keys = PlatformKeys::new();
    if let Ok(serials) = keys.add_certificates_pem(text, "fuzz") {
        assert!(!serials.is_empty());
        for s in &serials {
            assert!(
                s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b)),
                "{s:?}"
            );
            assert!(!s.starts_with("00"), "{s:?}");
        }
    }
    let _ = authinfod::tls::client_config_pinned(text, "fuzz");
});
