//! Reading the JSON documents other parties send.
//!
//! Every document this crate reads from outside (a request body, a proxy or platform answer) is,
//! by its contract, one JSON object. serde's derived readers also take a struct written as an
//! array of its field values (`["R"]` for `{"raw_data": "R"}`): nobody sends that, and anyone
//! else reading the same bytes (a platform SDK, a verifier) would see something else. Owns:
//! refusing anything but an object before serde reads it. It must not change what an object
//! means: objects are read exactly as `serde_json` reads them.

use serde::Deserialize;
use serde::de::{DeserializeOwned, Error as _, Unexpected};

/// `serde_json::from_slice`, for a document that must be an object.
pub fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, serde_json::Error> {
    check_object(bytes)?;
    serde_json::from_slice(bytes)
}

/// `serde_json::from_str`, for a document that must be an object.
pub fn from_str<'a, T: Deserialize<'a>>(text: &'a str) -> Result<T, serde_json::Error> {
    check_object(text.as_bytes())?;
    serde_json::from_str(text)
}

/// Refuses a document whose first value (after JSON whitespace) does not open an object; an
/// empty document is left to serde, which reports it as such.
fn check_object(bytes: &[u8]) -> Result<(), serde_json::Error> {
    match bytes
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
    {
        None | Some(b'{') => Ok(()),
        Some(_) => Err(serde_json::Error::invalid_type(
            Unexpected::Other("a value that is not an object"),
            &"a JSON object",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        raw_data: String,
    }

    /// Found by the `proxy_request` fuzz target: serde's derive reads `["R"]` as
    /// `{"raw_data":"R"}`.
    #[test]
    fn a_struct_written_as_an_array_is_refused() {
        let array = br#"["usKete44444444344]4,"]"#;
        assert!(
            serde_json::from_slice::<Body>(array).is_ok(),
            "serde's own reader takes it"
        );
        let err = from_slice::<Body>(array).expect_err("refused");
        assert!(err.to_string().contains("a JSON object"), "{err}");
        assert!(from_str::<Body>(" \n[\"R\"]").is_err());
    }

    #[test]
    fn objects_read_as_serde_reads_them() {
        assert_eq!(
            from_slice::<Body>(b" \t{\"raw_data\":\"R\"}").expect("object"),
            Body {
                raw_data: "R".into()
            }
        );
        assert!(from_slice::<Body>(b"").is_err());
        assert!(from_slice::<Body>(br#"{"raw_data":"R","x":1}"#).is_err());
    }
}
