//! Sealed records: a one-line header carrying a generation and a checksum in front of a record's
//! JSON, so that a reader can tell that the record is whole, that it belongs under the key it was
//! read from, and how new it is. sled's records and the copy beside sled are both sealed.
//!
//! Owns: the byte format only (`authinfod-seal/1 <generation> <sha256 hex>\n<body>`). It must not
//! decide what a damaged record means; the recovery does.

use crate::crypto::sha256_hex;

/// The first word of every sealed record, naming the format's version.
const MAGIC: &str = "authinfod-seal/1";

/// Why a record did not unseal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("it is not a sealed record")]
    NotSealed,
    #[error("its header is damaged")]
    BadHeader,
    #[error("its checksum does not match its content (damaged, or not the record of {key})")]
    Checksum { key: String },
}

/// `body` sealed as the record `key` of `generation`.
pub fn seal(key: &str, generation: u64, body: &[u8]) -> Vec<u8> {
    let mut out =
        format!("{MAGIC} {generation} {}\n", checksum(key, generation, body)).into_bytes();
    out.extend_from_slice(body);
    out
}

/// The generation and body of the sealed record `key`, if it is whole.
pub fn unseal<'a>(key: &str, bytes: &'a [u8]) -> Result<(u64, &'a [u8]), SealError> {
    let magic = format!("{MAGIC} ");
    let rest = bytes
        .strip_prefix(magic.as_bytes())
        .ok_or(SealError::NotSealed)?;
    let newline = rest
        .iter()
        .position(|&b| b == b'\n')
        .ok_or(SealError::BadHeader)?;
    let (header, body) = (&rest[..newline], &rest[newline + 1..]);
    let header = std::str::from_utf8(header).map_err(|_| SealError::BadHeader)?;
    let (generation, sum) = header.split_once(' ').ok_or(SealError::BadHeader)?;
    let generation: u64 = generation.parse().map_err(|_| SealError::BadHeader)?;
    if sum != checksum(key, generation, body) {
        return Err(SealError::Checksum {
            key: key.to_owned(),
        });
    }
    Ok((generation, body))
}

/// SHA-256 over the key, the generation and the body: a record moved to another key or another
/// generation does not verify.
fn checksum(key: &str, generation: u64, body: &[u8]) -> String {
    let mut data = format!("{key}\n{generation}\n").into_bytes();
    data.extend_from_slice(body);
    sha256_hex(&data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_record_unseals_to_its_generation_and_body() {
        let sealed = seal("raw_data", 42, br#"{"value":"x"}"#);
        assert!(sealed.starts_with(b"authinfod-seal/1 42 "));
        assert_eq!(
            unseal("raw_data", &sealed),
            Ok((42, &br#"{"value":"x"}"#[..]))
        );
    }

    /// Every single-byte change, a truncation, another key and an unsealed record are refused.
    #[test]
    fn any_damage_or_another_key_is_refused() {
        let sealed = seal("authinfo.current", 7, br#"{"authinfo":"SECRET"}"#);
        for i in 0..sealed.len() {
            let mut damaged = sealed.clone();
            damaged[i] ^= 0x01;
            assert!(unseal("authinfo.current", &damaged).is_err(), "byte {i}");
        }
        for len in 0..sealed.len() {
            assert!(
                unseal("authinfo.current", &sealed[..len]).is_err(),
                "len {len}"
            );
        }
        assert!(matches!(
            unseal("authinfo.previous", &sealed),
            Err(SealError::Checksum { .. })
        ));
        assert_eq!(
            unseal("raw_data", br#"{"value":"x"}"#),
            Err(SealError::NotSealed)
        );
    }
}
