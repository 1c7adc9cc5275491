//! The PEM and key readers behind every key and certificate file the configs and the registry
//! name, and the platform certificates WeChat Pay hands out (`crypto::pem_certificates`,
//! `RsaVerifier::from_pem_or_base64`, `RsaSigner::from_pem_or_base64`,
//! `PlatformKeys::add_certificates_pem`, `verify::read_certificate_pem`,
//! `tls::client_config_pinned`), on any text.
//!
//! Properties: certificates that parse print back (`certificate_pem`) to text that parses to the
//! same DER; a public key that reads prints back to a PEM that reads as the same key (same
//! fingerprint); a private key that reads signs what its public half verifies; platform
//! certificates that load give their serials in WeChat Pay's spelling (upper-case hex, no
//! leading zeros); nothing else is asked of arbitrary text but an error.
#![no_main]

use authinfod::crypto::{RsaSigner, RsaVerifier, certificate_pem, pem_certificates};
use authinfod::platform::wechatpay::verify::{PlatformKeys, read_certificate_pem};
use libfuzzer_sys::fuzz_target;

/// WeChat Pay's spelling of a serial: upper-case hex without leading zeros.
fn assert_serial(s: &str) {
    assert!(
        s.bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b)),
        "{s:?}"
    );
    assert!(!s.starts_with("00"), "{s:?}");
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(certificates) = pem_certificates(text, "fuzz") {
        let printed: String = certificates
            .iter()
            .map(|der| certificate_pem(der))
            .collect();
        let again = pem_certificates(&printed, "fuzz").expect("printed PEM parses");
        assert_eq!(again, certificates);
    }
    let keys = [
        RsaVerifier::from_pem(text, "fuzz"),
        RsaVerifier::from_pem_or_base64(text, "fuzz"),
    ];
    for key in keys.into_iter().flatten() {
        let back = RsaVerifier::from_pem(&key.to_pem(), "fuzz").expect("printed key reads");
        assert_eq!(back.fingerprint(), key.fingerprint());
    }
    if let Ok(signer) = RsaSigner::from_pem_or_base64(text, "fuzz") {
        let public = signer
            .public_key()
            .expect("a private key has a public half");
        let signature = signer.sign(b"fuzz").expect("a loaded key signs");
        assert!(public.verify(b"fuzz", &signature));
    }
    if let Ok(info) = read_certificate_pem(text, "fuzz") {
        assert_serial(&info.serial);
    }
    let mut keys = PlatformKeys::new();
    if let Ok(serials) = keys.add_certificates_pem(text, "fuzz") {
        assert!(!serials.is_empty());
        for s in &serials {
            assert_serial(s);
        }
    }
    let _ = authinfod::tls::client_config_pinned(text, "fuzz");
});
