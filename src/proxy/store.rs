//! The proxy's own state on disk: one sled database under `state_dir/fleet` (the name it has had
//! since it held only the fleet cache) with the last synced fleet list, the day's count of
//! device-list requests, the WeChat Pay platform certificates the proxy downloaded, and the
//! fleet view's record of each enrolled terminal.
//!
//! Owns: the keys and encodings of those records and writing them durably (every write is
//! flushed before it is relied on). It must not decide what the records mean (the fleet, the
//! budget and the certificate keeper do); callers never see sled types.
//!
//! sled lets one process open a database at a time: a second opener gets
//! [`StoreError::Locked`], which `devices --live` reads as "a proxy is serving; ask it instead".

use std::path::{Path, PathBuf};

use super::fleet::list::FleetSnapshot;
use super::terminals::record::TerminalRecord;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the proxy's store at {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("the proxy's store at {path} is in use by another process (a running proxy?)")]
    Locked { path: PathBuf },
    #[error("the proxy's store failed")]
    Io(#[from] sled::Error),
    #[error("cannot encode the {what} record: {reason}")]
    Encode { what: &'static str, reason: String },
    /// The replicas' shared store (Redis, `[cluster]`) failed.
    #[error("the replicas' shared store failed: {0}")]
    Shared(String),
}

impl From<super::cluster::ClusterError> for StoreError {
    fn from(e: super::cluster::ClusterError) -> Self {
        Self::Shared(e.to_string())
    }
}

/// The key of the fleet snapshot (JSON), as older versions wrote it.
const FLEET_KEY: &str = "fleet";
/// The tree of device-list counts, one key per day.
const BUDGET_TREE: &str = "device_list_budget";
/// The key of the downloaded platform certificates (a PEM bundle).
const CERTIFICATES_KEY: &str = "wechatpay_platform_certificates";
/// The tree of terminal records (JSON), one key per device id.
const TERMINALS_TREE: &str = "terminals";

/// The proxy's store. Cheap to clone; clones share the database.
#[derive(Debug, Clone)]
pub struct Store {
    db: sled::Db,
    path: PathBuf,
}

impl Store {
    /// Opens (creating it, mode 0700) the store under `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(state_dir)
            .map_err(|e| StoreError::Open {
                path: state_dir.to_owned(),
                source: sled::Error::Io(e),
            })?;
        let path = state_dir.join("fleet");
        let db = sled::Config::new()
            .path(&path)
            .cache_capacity(4 * 1024 * 1024)
            .mode(sled::Mode::LowSpace)
            .flush_every_ms(None)
            .open()
            .map_err(|source| {
                // sled reports the lock only in its message (an `io::ErrorKind::Other`).
                if source.to_string().contains("could not acquire lock") {
                    StoreError::Locked { path: path.clone() }
                } else {
                    StoreError::Open {
                        path: path.clone(),
                        source,
                    }
                }
            })?;
        Ok(Self { db, path })
    }

    /// A store in a temporary directory that sled removes on drop (tests, `Fleet::in_memory`).
    pub fn temporary() -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .temporary(true)
            .cache_capacity(1024 * 1024)
            .open()
            .map_err(|source| StoreError::Open {
                path: PathBuf::from("(temporary)"),
                source,
            })?;
        Ok(Self {
            db,
            path: PathBuf::from("(temporary)"),
        })
    }

    /// Where the store lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    // === the fleet list ===

    /// The last synced fleet list; `None` when there is none or it cannot be decoded (an older
    /// or damaged record: the next sync replaces it).
    pub fn fleet(&self) -> Result<Option<FleetSnapshot>, StoreError> {
        Ok(self
            .db
            .get(FLEET_KEY)?
            .and_then(|bytes| serde_json::from_slice(&bytes).ok()))
    }

    /// Replaces the fleet list, durably.
    pub async fn save_fleet(&self, snapshot: &FleetSnapshot) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(snapshot).map_err(|e| StoreError::Encode {
            what: "fleet",
            reason: e.to_string(),
        })?;
        self.db.insert(FLEET_KEY, bytes)?;
        self.db.flush_async().await?;
        Ok(())
    }

    // === the device-list budget ===

    /// Counts one request on `day` unless `limit` are counted already; returns the count before
    /// this request (so `Ok(n)` with `n < limit` means admitted as the `n + 1`th). Atomic within
    /// the process, durable before it returns; other days' counts are dropped.
    pub async fn take_budget(&self, day: &str, limit: u32) -> Result<u32, StoreError> {
        let tree = self.db.open_tree(BUDGET_TREE)?;
        let before = tree
            .fetch_and_update(day, |old| {
                let n = decode_count(old);
                Some(
                    n.saturating_add(u32::from(n < limit))
                        .to_be_bytes()
                        .to_vec(),
                )
            })?
            .as_deref()
            .map_or(0, |b| decode_count(Some(b)));
        for key in tree.iter().keys() {
            let key = key?;
            if key.as_ref() != day.as_bytes() {
                tree.remove(key)?;
            }
        }
        tree.flush_async().await?;
        Ok(before)
    }

    /// The requests counted on `day`.
    pub fn budget_used(&self, day: &str) -> Result<u32, StoreError> {
        let tree = self.db.open_tree(BUDGET_TREE)?;
        Ok(decode_count(tree.get(day)?.as_deref()))
    }

    // === platform certificates ===

    /// The platform certificates downloaded earlier (a PEM bundle), if any.
    pub fn platform_certificates(&self) -> Result<Option<String>, StoreError> {
        Ok(self
            .db
            .get(CERTIFICATES_KEY)?
            .and_then(|bytes| String::from_utf8(bytes.to_vec()).ok()))
    }

    /// Replaces the downloaded platform certificates, durably.
    pub async fn save_platform_certificates(&self, pem: &str) -> Result<(), StoreError> {
        self.db.insert(CERTIFICATES_KEY, pem.as_bytes())?;
        self.db.flush_async().await?;
        Ok(())
    }
}

/// The stored terminal records: `(device_id, record)`, and the device ids whose record does not
/// decode.
pub type TerminalRecordsRead = (Vec<(String, TerminalRecord)>, Vec<String>);

impl Store {
    // === terminal records ===

    /// Every stored terminal record, and the device ids whose record does not decode.
    pub fn terminal_records(&self) -> Result<TerminalRecordsRead, StoreError> {
        let tree = self.db.open_tree(TERMINALS_TREE)?;
        let mut records = Vec::new();
        let mut undecodable = Vec::new();
        for entry in tree.iter() {
            let (key, value) = entry?;
            let device_id = String::from_utf8_lossy(&key).into_owned();
            match serde_json::from_slice(&value) {
                Ok(record) => records.push((device_id, record)),
                Err(_) => undecodable.push(device_id),
            }
        }
        Ok((records, undecodable))
    }

    /// Writes (`Some`) or removes (`None`) terminal records, then flushes.
    pub async fn save_terminal_records(
        &self,
        changes: &[(&str, Option<&TerminalRecord>)],
    ) -> Result<(), StoreError> {
        let tree = self.db.open_tree(TERMINALS_TREE)?;
        let mut batch = sled::Batch::default();
        for (device_id, record) in changes {
            match record {
                Some(record) => {
                    let bytes = serde_json::to_vec(record).map_err(|e| StoreError::Encode {
                        what: "terminal",
                        reason: e.to_string(),
                    })?;
                    batch.insert(device_id.as_bytes(), bytes);
                }
                None => batch.remove(device_id.as_bytes()),
            }
        }
        tree.apply_batch(batch)?;
        tree.flush_async().await?;
        Ok(())
    }
}

#[cfg(test)]
impl Store {
    /// Writes `bytes` as `device_id`'s terminal record as is (tests of damaged records).
    pub fn put_raw_terminal_record(&self, device_id: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.db
            .open_tree(TERMINALS_TREE)?
            .insert(device_id, bytes)?;
        Ok(())
    }
}

/// A stored count (big-endian u32); anything else reads as 0.
fn decode_count(bytes: Option<&[u8]>) -> u32 {
    bytes
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map_or(0, u32::from_be_bytes)
}

/// Opens the store at `dir` that a dropped `Store` held (tests that reopen one). sled lets go of
/// its file lock when its IO threads drop their handles, a moment after the last `Db` is dropped
/// (long moments under emulation): the daemon's store retries for the same reason.
#[cfg(test)]
pub(crate) fn open_when_released(dir: &Path) -> Store {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match Store::open(dir) {
            Ok(store) => return store,
            Err(StoreError::Locked { .. }) if std::time::Instant::now() < until => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("open again once released: {e:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn budget_counts_up_to_the_limit_and_keeps_only_the_current_day() {
        let store = Store::temporary().expect("store");
        for want in 0..3 {
            assert_eq!(
                store.take_budget("2026-01-05", 3).await.expect("take"),
                want
            );
        }
        assert_eq!(store.take_budget("2026-01-05", 3).await.expect("take"), 3);
        assert_eq!(store.budget_used("2026-01-05").expect("used"), 3, "capped");
        assert_eq!(store.take_budget("2026-01-06", 3).await.expect("take"), 0);
        assert_eq!(store.budget_used("2026-01-05").expect("used"), 0, "dropped");
        assert_eq!(store.budget_used("2026-01-06").expect("used"), 1);
    }

    /// A second opener of the same store is told it is locked, by that name.
    #[test]
    fn a_second_opener_is_refused_as_locked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = Store::open(dir.path()).expect("open");
        let second = Store::open(dir.path()).expect_err("the store is held");
        assert!(matches!(second, StoreError::Locked { .. }), "{second:?}");
        assert!(second.to_string().contains("in use"), "{second}");
        drop(first);
        open_when_released(dir.path());
    }

    #[tokio::test]
    async fn fleet_and_certificates_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        assert!(store.fleet().expect("read").is_none());
        let snapshot = FleetSnapshot {
            synced_at: Some(7),
            devices: Vec::new(),
        };
        store.save_fleet(&snapshot).await.expect("save");
        store
            .save_platform_certificates("-----BEGIN CERTIFICATE-----\n")
            .await
            .expect("save");
        drop(store);
        let store = open_when_released(dir.path());
        assert_eq!(
            store.fleet().expect("read").and_then(|s| s.synced_at),
            Some(7)
        );
        assert_eq!(
            store.platform_certificates().expect("read").as_deref(),
            Some("-----BEGIN CERTIFICATE-----\n")
        );
    }
}
