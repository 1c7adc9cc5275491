//! What the store holds, as types: the held authinfo, the raw_data, the last attempt and the
//! health records, and the [`Snapshot`] of all of them that sled and the copy each persist whole.
//!
//! Owns: the records' JSON and their sled keys. It must not do I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::StoreError;

pub const KEY_SCHEMA: &str = "schema";
pub const KEY_GENERATION: &str = "generation";
pub const KEY_CURRENT: &str = "authinfo.current";
pub const KEY_PREVIOUS: &str = "authinfo.previous";
pub const KEY_RAW_DATA: &str = "raw_data";
pub const KEY_ATTEMPT: &str = "attempt.last";
pub const HEALTH_PREFIX: &str = "health.";
/// The key the copy's one record is sealed under.
pub const KEY_COPY: &str = "copy";

/// Layout version written under [`KEY_SCHEMA`]: sealed records, one generation for all.
pub const SCHEMA: &[u8] = b"2";
/// The first layout: unsealed JSON records. Read once, then rewritten as [`SCHEMA`].
pub const LEGACY_SCHEMA: &[u8] = b"1";

/// An authinfo the daemon holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldAuthinfo {
    /// The secret itself: served to the face app, never logged.
    pub authinfo: String,
    /// Unix seconds (local wall clock) when it was fetched.
    pub fetched_at: i64,
    /// Unix seconds (local wall clock) when it stops being valid: `fetched_at` plus `expires_in`
    /// if the platform gave one, else plus the configured assumed validity.
    pub expires_at: i64,
    /// The platform's `expires_in`, when it gave one.
    #[serde(default)]
    pub expires_in: Option<u64>,
    /// The proxy's clock when it was fetched (from the answer's `Date`), when known: its age can
    /// then be told by the proxy's clock even if the local one was wrong or has been changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_fetched_at: Option<i64>,
}

impl HeldAuthinfo {
    /// How long it is valid from its fetch, in seconds.
    pub fn validity(&self) -> u64 {
        u64::try_from(self.expires_at.saturating_sub(self.fetched_at)).unwrap_or(0)
    }
}

/// The newest raw_data from the face SDK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawData {
    /// The secret itself, never logged.
    pub value: String,
    /// Unix seconds when it was received.
    pub received_at: i64,
    /// `socket` or `command`.
    pub source: String,
}

/// The outcome of the last refresh attempt, kept so status survives a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// Unix seconds when it finished.
    pub at: i64,
    pub ok: bool,
    /// The error code (`PROXY_UNREACHABLE`, `UPSTREAM_500`, ...) when it failed.
    #[serde(default)]
    pub code: Option<String>,
    /// A sentence for an operator when it failed.
    #[serde(default)]
    pub error: Option<String>,
    /// Whether the failure stops retries until something changes.
    #[serde(default)]
    pub permanent: bool,
}

/// Everything the store holds. sled keeps it one record per key, the copy as one record; each
/// write persists all of it under a new generation, so that both sides always hold a whole
/// snapshot and can be compared.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Snapshot {
    pub authinfo: Option<HeldAuthinfo>,
    pub previous: Option<HeldAuthinfo>,
    pub raw_data: Option<RawData>,
    pub attempt: Option<AttemptRecord>,
    /// Health records by check name, as their JSON.
    pub health: BTreeMap<String, serde_json::Value>,
}

impl Snapshot {
    /// Whether it holds nothing at all.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Its records as sled keys and JSON bodies.
    pub fn records(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        fn add<T: Serialize>(
            out: &mut Vec<(String, Vec<u8>)>,
            key: &str,
            value: Option<&T>,
        ) -> Result<(), StoreError> {
            if let Some(value) = value {
                out.push((key.to_owned(), encode(key, value)?));
            }
            Ok(())
        }
        let mut out = Vec::new();
        add(&mut out, KEY_CURRENT, self.authinfo.as_ref())?;
        add(&mut out, KEY_PREVIOUS, self.previous.as_ref())?;
        add(&mut out, KEY_RAW_DATA, self.raw_data.as_ref())?;
        add(&mut out, KEY_ATTEMPT, self.attempt.as_ref())?;
        for (name, value) in &self.health {
            add(&mut out, &format!("{HEALTH_PREFIX}{name}"), Some(value))?;
        }
        Ok(out)
    }

    /// Takes the record `key` from its JSON body. `Ok(false)` for a key it does not know (a
    /// later layout's), which is left alone.
    pub fn set(&mut self, key: &str, body: &[u8]) -> Result<bool, serde_json::Error> {
        match key {
            KEY_CURRENT => self.authinfo = Some(crate::json::from_slice(body)?),
            KEY_PREVIOUS => self.previous = Some(crate::json::from_slice(body)?),
            KEY_RAW_DATA => self.raw_data = Some(crate::json::from_slice(body)?),
            KEY_ATTEMPT => self.attempt = Some(crate::json::from_slice(body)?),
            _ => match key.strip_prefix(HEALTH_PREFIX) {
                Some(name) => {
                    self.health
                        .insert(name.to_owned(), crate::json::from_slice(body)?);
                }
                None => return Ok(false),
            },
        }
        Ok(true)
    }

    /// Takes the record `key` from `other` (a record `other` lacks is removed here too).
    pub fn take_record(&mut self, key: &str, other: &Snapshot) {
        match key {
            KEY_CURRENT => self.authinfo.clone_from(&other.authinfo),
            KEY_PREVIOUS => self.previous.clone_from(&other.previous),
            KEY_RAW_DATA => self.raw_data.clone_from(&other.raw_data),
            KEY_ATTEMPT => self.attempt.clone_from(&other.attempt),
            _ => {
                if let Some(name) = key.strip_prefix(HEALTH_PREFIX) {
                    match other.health.get(name) {
                        Some(v) => self.health.insert(name.to_owned(), v.clone()),
                        None => self.health.remove(name),
                    };
                }
            }
        }
    }

    /// What it holds, for the log lines and status of a recovery: the authinfo by fingerprint,
    /// never a secret.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(a) = &self.authinfo {
            parts.push(format!(
                "authinfo {}",
                crate::crypto::secret_fingerprint(a.authinfo.as_bytes())
            ));
        }
        if self.raw_data.is_some() {
            parts.push("raw_data".to_owned());
        }
        let others = usize::from(self.previous.is_some())
            + usize::from(self.attempt.is_some())
            + self.health.len();
        if others > 0 {
            parts.push(format!("{others} other record(s)"));
        }
        if parts.is_empty() {
            "nothing (it was empty)".to_owned()
        } else {
            parts.join(", ")
        }
    }
}

/// `value` as JSON, the body of the record `key`.
pub fn encode<T: Serialize>(key: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|source| StoreError::Encode {
        key: key.to_owned(),
        source,
    })
}
