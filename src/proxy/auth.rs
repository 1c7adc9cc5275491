//! Terminal authentication: every request must carry a valid `AUTHINFOD-SHA256-RSA2048`
//! signature by an enrolled device, a timestamp within 300 s of the proxy's clock, and a nonce
//! not seen within the window.
//!
//! Owns: the order of checks (header shape, known device, signature, timestamp, nonce — the nonce
//! is recorded only for requests that verified, so strangers cannot fill the cache) and the nonce
//! cache ([`Nonces`]: this process's, or the replicas' shared one in Redis, where a nonce is
//! recorded with one atomic set-if-absent, so a nonce used at one replica is refused at every
//! other; when Redis cannot answer, no nonce is accepted). It must not decide what a device may
//! ask: routes use the device it returns, so a device can only ever ask about itself.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use crate::wire::auth::{Authorization, HeaderError, TIMESTAMP_WINDOW_SECS};

use super::cluster::{Cluster, ClusterError, NonceAnswer};
use super::registry::{Device, Registry};

/// The most nonces remembered; beyond it the oldest are dropped (they are older than any
/// request the window still admits only under a flood from enrolled devices).
const MAX_NONCES: usize = 1_000_000;

/// Why a request was not authenticated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error("no device {0} is enrolled")]
    UnknownDevice(String),
    #[error("the signature does not verify with device {0}'s enrolled key")]
    BadSignature(String),
    #[error(
        "the request timestamp is {skew} s from the proxy's clock (more than {TIMESTAMP_WINDOW_SECS} s)"
    )]
    Skewed { skew: i64 },
    #[error("the nonce was already used")]
    Replayed,
}

/// Nonces seen within the window, per device.
#[derive(Debug, Default)]
pub struct NonceCache {
    inner: Mutex<NonceInner>,
}

#[derive(Debug, Default)]
struct NonceInner {
    /// (device_id, nonce) → forget after (Unix seconds).
    seen: HashMap<(String, String), i64>,
    /// Insertion order, for expiry.
    order: VecDeque<(i64, String, String)>,
}

impl NonceCache {
    /// Records `nonce` for `device_id` at `now` unless already seen; false on a replay.
    pub fn check_and_record(&self, device_id: &str, nonce: &str, timestamp: i64, now: i64) -> bool {
        let mut inner = crate::sync::lock(&self.inner);
        while let Some((forget_at, _, _)) = inner.order.front() {
            if *forget_at > now && inner.order.len() < MAX_NONCES {
                break;
            }
            if let Some((_, d, n)) = inner.order.pop_front() {
                inner.seen.remove(&(d, n));
            }
        }
        let key = (device_id.to_owned(), nonce.to_owned());
        if inner.seen.contains_key(&key) {
            return false;
        }
        let forget_at = remember_until(timestamp, now);
        inner.seen.insert(key, forget_at);
        inner
            .order
            .push_back((forget_at, device_id.to_owned(), nonce.to_owned()));
        true
    }

    pub fn len(&self) -> usize {
        crate::sync::lock(&self.inner).seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How long a nonce first used at `now` in a request stamped `timestamp` must be remembered: a
/// request is admitted while |now - timestamp| <= window, so until timestamp + window (plus a
/// second for the edge).
fn remember_until(timestamp: i64, now: i64) -> i64 {
    timestamp.max(now) + TIMESTAMP_WINDOW_SECS + 1
}

/// Where the nonces of verified requests are remembered.
#[derive(Debug)]
pub enum Nonces {
    /// This process only: one proxy (a replay at another replica would not be seen).
    Local(NonceCache),
    /// The replicas' Redis: a nonce is refused at every replica once used at one.
    Shared(Arc<Cluster>),
}

/// Why a nonce was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum NonceError {
    #[error("the nonce was already used")]
    Replayed,
    /// The shared cache did not answer: the request is refused (retryable), never admitted
    /// unchecked.
    #[error("the replicas' nonce cache cannot be checked: {0}")]
    Unavailable(#[from] ClusterError),
    /// Stamped before the shared cache's nonces start (Redis restarted empty): whether it is a
    /// replay cannot be told, so it is refused (retryable: a request signed now passes).
    #[error(
        "the replicas' nonce cache starts at {epoch} (Redis restarted empty), after this request's timestamp: sign it again"
    )]
    BeforeEpoch { epoch: i64 },
}

impl Nonces {
    /// Records `header`'s nonce at `now` unless it was used before.
    pub async fn record(&self, header: &Authorization, now: i64) -> Result<(), NonceError> {
        match self {
            Self::Local(cache) => cache
                .check_and_record(&header.device_id, &header.nonce, header.timestamp, now)
                .then_some(())
                .ok_or(NonceError::Replayed),
            Self::Shared(cluster) => {
                let ttl = remember_until(header.timestamp, now) - now;
                let name = format!("nonce:{}:{}", header.device_id, header.nonce);
                let ttl = std::time::Duration::from_secs(ttl.max(1) as u64);
                match cluster.nonce(&name, header.timestamp, ttl).await? {
                    NonceAnswer::Fresh => Ok(()),
                    NonceAnswer::Replayed => Err(NonceError::Replayed),
                    NonceAnswer::BeforeEpoch { epoch } => Err(NonceError::BeforeEpoch { epoch }),
                }
            }
        }
    }

    /// The nonces this process remembers (`None` when they are in Redis).
    pub fn local_len(&self) -> Option<usize> {
        match self {
            Self::Local(cache) => Some(cache.len()),
            Self::Shared(_) => None,
        }
    }
}

/// Checks one request's header, signature and timestamp (everything but the nonce); returns the
/// enrolled device that signed it and the parsed header, whose nonce the caller records next
/// ([`Nonces::record`]).
pub fn verify(
    registry: &Registry,
    authorization: Option<&str>,
    method: &str,
    path_and_query: &str,
    body: &[u8],
    now: i64,
) -> Result<(Arc<Device>, Authorization), AuthError> {
    let header = Authorization::parse(authorization.ok_or(HeaderError::Missing)?)?;
    let device = registry
        .get(&header.device_id)
        .ok_or_else(|| AuthError::UnknownDevice(header.device_id.clone()))?;
    if !header.verify(&device.public_key, method, path_and_query, body) {
        return Err(AuthError::BadSignature(header.device_id));
    }
    if let Some(skew) = header.skew(now) {
        return Err(AuthError::Skewed { skew });
    }
    Ok((device, header))
}

/// Authenticates one request against this process's nonce cache ([`verify`], then the nonce);
/// returns the enrolled device that signed it.
pub fn authenticate(
    registry: &Registry,
    nonces: &NonceCache,
    authorization: Option<&str>,
    method: &str,
    path_and_query: &str,
    body: &[u8],
    now: i64,
) -> Result<Arc<Device>, AuthError> {
    let (device, header) = verify(registry, authorization, method, path_and_query, body, now)?;
    if !nonces.check_and_record(&header.device_id, &header.nonce, header.timestamp, now) {
        return Err(AuthError::Replayed);
    }
    Ok(device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{RsaSigner, test_key};
    use crate::wire::auth::DeviceSigner;

    /// The window's edge, on an injected clock: 300 s off either way is admitted, 301 s is
    /// refused as skewed (with the skew), before the nonce is recorded.
    #[test]
    fn the_timestamp_window_admits_300_s_and_refuses_301_s_either_way() {
        let key = test_key(0);
        let registry = Registry::parse(
            &format!(
                "[[device]]\ndevice_id = \"T-1\"\npublic_key = \"\"\"\n{}\"\"\"\ndevice_sn = \"SN00001\"\nsub_mchid = \"1900000002\"\norganization_id = \"ORG\"\n",
                key.public.to_pem()
            ),
            std::path::Path::new("devices.toml"),
        )
        .expect("registry");
        let signer = DeviceSigner::new(
            "T-1".into(),
            RsaSigner::from_pem(&key.private_pem, "test key").expect("key"),
        );
        let nonces = NonceCache::default();
        let now = 1_700_000_000;
        for offset in [-300, 300, -301, 301] {
            let authorization = signer
                .authorize("GET", "/v1/licence", now + offset, b"")
                .expect("sign");
            let result = authenticate(
                &registry,
                &nonces,
                Some(&authorization),
                "GET",
                "/v1/licence",
                b"",
                now,
            );
            match offset {
                -300 | 300 => assert!(result.is_ok(), "{offset}: {:?}", result.err()),
                _ => assert!(
                    matches!(result, Err(AuthError::Skewed { skew }) if skew == offset),
                    "{offset}: {:?}",
                    result.err()
                ),
            }
        }
        assert_eq!(nonces.len(), 2, "refused requests leave no nonce behind");
    }

    #[test]
    fn a_nonce_is_refused_while_its_request_could_still_be_admitted() {
        let cache = NonceCache::default();
        assert!(cache.check_and_record("d", "N1", 1000, 1000));
        assert!(!cache.check_and_record("d", "N1", 1000, 1100));
        assert!(
            cache.check_and_record("e", "N1", 1000, 1100),
            "nonces are per device"
        );
        assert!(
            !cache.check_and_record("d", "N1", 1000, 1300),
            "still within the window"
        );
        // Past timestamp + window the request itself would be refused as skewed; the nonce is
        // forgotten then.
        assert!(cache.check_and_record("d", "N2", 1400, 1400));
        assert!(cache.check_and_record("d", "N1", 1400, 1400));
    }
}
