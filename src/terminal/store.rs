//! The daemon's persistent state in sled: the held authinfo (current and previous), the newest
//! raw_data, the last refresh attempt and the device health records.
//!
//! Owns: the on-disk layout, its permissions (directory 0700, files 0600), flushing (every
//! write is fsynced before it returns, so nothing is announced that a power cut could lose) and
//! recovery: a store that cannot be opened or decoded is moved aside and replaced by an empty
//! one, never a crash loop. Callers never see sled types. It must not decide what is worth
//! saving: the refresher enforces "never worse" before calling [`Store::save_authinfo`].

use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// sled's page cache bound: the data here is a few KiB, so 2 MiB is ample.
const CACHE_CAPACITY: u64 = 2 * 1024 * 1024;
/// Layout version written under [`KEY_SCHEMA`].
const SCHEMA: &[u8] = b"1";

const KEY_SCHEMA: &str = "schema";
const KEY_CURRENT: &str = "authinfo.current";
const KEY_PREVIOUS: &str = "authinfo.previous";
const KEY_RAW_DATA: &str = "raw_data";
const KEY_ATTEMPT: &str = "attempt.last";
const HEALTH_PREFIX: &str = "health.";

/// An authinfo the daemon holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldAuthinfo {
    /// The secret itself: served to the face app, never logged.
    pub authinfo: String,
    /// Unix seconds (local wall clock) when it was fetched.
    pub fetched_at: i64,
    /// Unix seconds when it stops being valid: `expires_in` if the platform gave one, else the
    /// configured assumed validity.
    pub expires_at: i64,
    /// The platform's `expires_in`, when it gave one.
    #[serde(default)]
    pub expires_in: Option<u64>,
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

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create state directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the sled store at {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("the store at {path} holds an undecodable {key}: {reason}")]
    Corrupt {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("cannot move the broken store {from} aside to {to}")]
    MoveAside {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set permissions on {path}")]
    Permissions {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another process holds the state directory {path} (is authinfod already running?)")]
    Locked { path: PathBuf },
    #[error("store {op} failed")]
    Io {
        op: &'static str,
        #[source]
        source: sled::Error,
    },
    #[error("cannot encode {key}")]
    Encode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

/// What [`Store::open`] had to do to give a usable store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Where the unusable store was moved.
    pub moved_to: PathBuf,
    /// Why it was unusable.
    pub reason: String,
}

/// The daemon's store. Cheap to clone (sled handles are reference-counted).
#[derive(Debug, Clone)]
pub struct Store {
    db: sled::Db,
    path: PathBuf,
    /// An exclusive flock on `state_dir/lock`, held while any clone lives: a second daemon on
    /// the same state directory is refused instead of mistaking the live store for a broken one.
    _lock: std::sync::Arc<nix::fcntl::Flock<std::fs::File>>,
}

impl Store {
    /// Opens (or creates) the store under `state_dir/store`. A store that fails to open or to
    /// decode, or whose previous open never finished (the process died inside sled), is moved
    /// to `state_dir/store.broken-<unix time>` and an empty one is created in its place.
    pub fn open(state_dir: &Path) -> Result<(Self, Option<Recovery>), StoreError> {
        create_private_dir(state_dir)?;
        let lock = lock_state_dir(state_dir)?;
        let path = state_dir.join("store");
        // The marker exists only while sled is opening: if a previous start died there (sled
        // panicked or aborted on a damaged file), the marker is still present now.
        let marker = state_dir.join("store.opening");
        let mut recovery = None;
        if marker.exists() && path.exists() {
            recovery = Some(move_aside(
                &path,
                "a previous start died while opening it".into(),
            )?);
        }
        std::fs::write(&marker, b"").map_err(|source| StoreError::CreateDir {
            path: marker.clone(),
            source,
        })?;
        let store = match Self::open_checked(&path, lock.clone()) {
            Ok(store) => store,
            Err(err) if recovery.is_none() => {
                recovery = Some(move_aside(&path, crate::error_chain(&err))?);
                Self::open_checked(&path, lock)?
            }
            Err(err) => return Err(err),
        };
        let _ = std::fs::remove_file(&marker);
        Ok((store, recovery))
    }

    fn open_checked(
        path: &Path,
        lock: std::sync::Arc<nix::fcntl::Flock<std::fs::File>>,
    ) -> Result<Self, StoreError> {
        let db = open_sled(path)?;
        let store = Self {
            db,
            path: path.to_owned(),
            _lock: lock,
        };
        store.check_decodable()?;
        if store.get_raw(KEY_SCHEMA)?.is_none() {
            store.put_raw(KEY_SCHEMA, SCHEMA.to_vec())?;
            store.flush()?;
        }
        restrict_permissions(path)?;
        Ok(store)
    }

    /// Decodes every record once, so damage is found at start and not at the first read.
    fn check_decodable(&self) -> Result<(), StoreError> {
        self.get::<HeldAuthinfo>(KEY_CURRENT)?;
        self.get::<HeldAuthinfo>(KEY_PREVIOUS)?;
        self.get::<RawData>(KEY_RAW_DATA)?;
        self.get::<AttemptRecord>(KEY_ATTEMPT)?;
        for item in self.db.scan_prefix(HEALTH_PREFIX) {
            let (key, value) = item.map_err(|source| StoreError::Io { op: "scan", source })?;
            serde_json::from_slice::<serde_json::Value>(&value).map_err(|e| {
                StoreError::Corrupt {
                    path: self.path.clone(),
                    key: String::from_utf8_lossy(&key).into_owned(),
                    reason: e.to_string(),
                }
            })?;
        }
        match self.get_raw(KEY_SCHEMA)? {
            Some(v) if v != SCHEMA => Err(StoreError::Corrupt {
                path: self.path.clone(),
                key: KEY_SCHEMA.into(),
                reason: format!("unknown layout {:?}", String::from_utf8_lossy(&v)),
            }),
            _ => Ok(()),
        }
    }

    /// The directory sled writes to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The held authinfo, if any.
    pub fn authinfo(&self) -> Result<Option<HeldAuthinfo>, StoreError> {
        self.get(KEY_CURRENT)
    }

    /// The authinfo held before the current one, if any.
    pub fn previous_authinfo(&self) -> Result<Option<HeldAuthinfo>, StoreError> {
        self.get(KEY_PREVIOUS)
    }

    /// Makes `new` the held authinfo (the old one becomes the previous) and flushes to disk
    /// before returning.
    pub fn save_authinfo(&self, new: &HeldAuthinfo) -> Result<(), StoreError> {
        let encoded = encode(KEY_CURRENT, new)?;
        let mut batch = sled::Batch::default();
        if let Some(old) = self.get_raw(KEY_CURRENT)? {
            batch.insert(KEY_PREVIOUS, old);
        }
        batch.insert(KEY_CURRENT, encoded);
        self.db
            .apply_batch(batch)
            .map_err(|source| StoreError::Io {
                op: "write",
                source,
            })?;
        self.flush()
    }

    /// The newest raw_data, if any.
    pub fn raw_data(&self) -> Result<Option<RawData>, StoreError> {
        self.get(KEY_RAW_DATA)
    }

    /// Stores the newest raw_data, flushed.
    pub fn save_raw_data(&self, raw: &RawData) -> Result<(), StoreError> {
        self.put(KEY_RAW_DATA, raw)
    }

    /// The last refresh attempt, if any.
    pub fn last_attempt(&self) -> Result<Option<AttemptRecord>, StoreError> {
        self.get(KEY_ATTEMPT)
    }

    /// Records the last refresh attempt, flushed.
    pub fn save_attempt(&self, attempt: &AttemptRecord) -> Result<(), StoreError> {
        self.put(KEY_ATTEMPT, attempt)
    }

    /// A health record by check name (`inspection`, `alipay_binding`, `licence`).
    pub fn health<T: DeserializeOwned>(&self, check: &str) -> Result<Option<T>, StoreError> {
        self.get(&format!("{HEALTH_PREFIX}{check}"))
    }

    /// Stores a health record, flushed.
    pub fn save_health<T: Serialize>(&self, check: &str, record: &T) -> Result<(), StoreError> {
        self.put(&format!("{HEALTH_PREFIX}{check}"), record)
    }

    /// Flushes everything written so far to disk (fsync).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(drop).map_err(|source| StoreError::Io {
            op: "flush",
            source,
        })
    }

    fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        self.get_raw(key)?
            .map(|bytes| decode_record(&self.path, key, &bytes))
            .transpose()
    }

    fn put<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        self.put_raw(key, encode(key, value)?)?;
        self.flush()
    }

    fn get_raw(&self, key: &str) -> Result<Option<sled::IVec>, StoreError> {
        self.db
            .get(key)
            .map_err(|source| StoreError::Io { op: "read", source })
    }

    fn put_raw(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        self.db
            .insert(key, value)
            .map(drop)
            .map_err(|source| StoreError::Io {
                op: "write",
                source,
            })
    }
}

/// Decodes the record stored under `key` from the bytes sled handed back: the record (every
/// record is a JSON object), or [`StoreError::Corrupt`] naming the store at `path` and the key.
/// Every read of a record goes through here (and so does the fuzz target `store_records`).
pub fn decode_record<T: DeserializeOwned>(
    path: &Path,
    key: &str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    crate::json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        path: path.to_owned(),
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

/// Opens sled at `path`. sled's own file lock can outlive a closed handle for a moment (its IO
/// threads let go of the file asynchronously), so a lock conflict is retried for up to two
/// seconds: our flock on the state directory already proves no other process uses the store, and
/// mistaking the conflict for damage would move a good store aside.
fn open_sled(path: &Path) -> Result<sled::Db, StoreError> {
    let mut attempts = 0;
    loop {
        let result = sled::Config::new()
            .path(path)
            .cache_capacity(CACHE_CAPACITY)
            .mode(sled::Mode::LowSpace)
            // Every write is flushed explicitly; no background flusher thread is needed.
            .flush_every_ms(None)
            .open();
        match result {
            Err(sled::Error::Io(e))
                if attempts < 40 && e.to_string().contains("could not acquire lock") =>
            {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => {
                return other.map_err(|source| StoreError::Open {
                    path: path.to_owned(),
                    source,
                });
            }
        }
    }
}

fn lock_state_dir(
    state_dir: &Path,
) -> Result<std::sync::Arc<nix::fcntl::Flock<std::fs::File>>, StoreError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = state_dir.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|source| StoreError::CreateDir {
            path: path.clone(),
            source,
        })?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map(std::sync::Arc::new)
        .map_err(|_| StoreError::Locked {
            path: state_dir.to_owned(),
        })
}

fn encode<T: Serialize>(key: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|source| StoreError::Encode {
        key: key.to_owned(),
        source,
    })
}

fn move_aside(path: &Path, reason: String) -> Result<Recovery, StoreError> {
    let mut moved_to = path.with_file_name(format!("store.broken-{}", crate::units::unix_now()));
    let mut n = 1;
    while moved_to.exists() {
        moved_to = path.with_file_name(format!("store.broken-{}-{n}", crate::units::unix_now()));
        n += 1;
    }
    std::fs::rename(path, &moved_to).map_err(|source| StoreError::MoveAside {
        from: path.to_owned(),
        to: moved_to.clone(),
        source,
    })?;
    Ok(Recovery { moved_to, reason })
}

/// Creates `dir` (and parents) with mode 0700, and tightens it to 0700 if it exists.
pub fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| StoreError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|source| {
        StoreError::Permissions {
            path: dir.to_owned(),
            source,
        }
    })
}

/// Sets 0700 on `dir` and its subdirectories and 0600 on every file below it.
fn restrict_permissions(dir: &Path) -> Result<(), StoreError> {
    let perm = |path: &Path, mode| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
            StoreError::Permissions {
                path: path.to_owned(),
                source,
            }
        })
    };
    perm(dir, 0o700)?;
    let entries = std::fs::read_dir(dir).map_err(|source| StoreError::Permissions {
        path: dir.to_owned(),
        source,
    })?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            restrict_permissions(&path)?;
        } else {
            perm(&path, 0o600)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    fn held(authinfo: &str, fetched_at: i64) -> HeldAuthinfo {
        HeldAuthinfo {
            authinfo: authinfo.into(),
            fetched_at,
            expires_at: fetched_at + 7200,
            expires_in: None,
        }
    }

    #[test]
    fn saved_authinfo_survives_reopen_and_keeps_the_previous() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (store, recovery) = Store::open(dir.path()).expect("open");
            assert!(recovery.is_none());
            assert_eq!(store.authinfo().expect("read"), None);
            store.save_authinfo(&held("A", 1)).expect("save");
            store.save_authinfo(&held("B", 2)).expect("save");
            store
                .save_raw_data(&RawData {
                    value: "RAW".into(),
                    received_at: 3,
                    source: "socket".into(),
                })
                .expect("raw");
        }
        let (store, recovery) = Store::open(dir.path()).expect("reopen");
        assert!(recovery.is_none());
        assert_eq!(store.authinfo().expect("read"), Some(held("B", 2)));
        assert_eq!(store.previous_authinfo().expect("read"), Some(held("A", 1)));
        assert_eq!(
            store.raw_data().expect("read").map(|r| r.value),
            Some("RAW".into())
        );
    }

    #[test]
    fn state_dir_is_0700_and_store_files_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let (store, _) = Store::open(&state).expect("open");
        store.save_authinfo(&held("A", 1)).expect("save");
        assert_eq!(
            std::fs::metadata(&state).expect("meta").mode() & 0o777,
            0o700
        );
        let mut files = 0;
        for entry in std::fs::read_dir(store.path()).expect("read_dir").flatten() {
            let meta = entry.metadata().expect("meta");
            let want = if meta.is_dir() { 0o700 } else { 0o600 };
            assert_eq!(meta.mode() & 0o777, want, "{}", entry.path().display());
            files += 1;
        }
        assert!(files > 0);
    }

    /// A store whose files are garbage is moved aside and an empty one takes its place.
    #[test]
    fn corrupt_store_is_moved_aside_and_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (store, _) = Store::open(dir.path()).expect("open");
            store.save_authinfo(&held("A", 1)).expect("save");
        }
        let store_dir = dir.path().join("store");
        for entry in std::fs::read_dir(&store_dir).expect("read_dir").flatten() {
            if entry.path().is_file() {
                std::fs::write(entry.path(), b"\xde\xad\xbe\xef not sled at all").expect("garble");
            }
        }
        let (store, recovery) = Store::open(dir.path()).expect("recovers");
        let recovery = recovery.expect("was recovered");
        assert!(recovery.moved_to.exists());
        assert!(
            recovery
                .moved_to
                .file_name()
                .expect("name")
                .to_string_lossy()
                .starts_with("store.broken-")
        );
        assert_eq!(store.authinfo().expect("read"), None);
    }

    /// A record that sled reads fine but that does not decode counts as corruption too.
    #[test]
    fn undecodable_record_is_treated_as_corruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (store, _) = Store::open(dir.path()).expect("open");
            store
                .put_raw(KEY_CURRENT, b"{not json".to_vec())
                .expect("put");
            store.flush().expect("flush");
        }
        let (store, recovery) = Store::open(dir.path()).expect("recovers");
        let reason = recovery.expect("recovered").reason;
        assert!(reason.contains(KEY_CURRENT), "{reason}");
        assert_eq!(store.authinfo().expect("read"), None);
    }

    /// Found by the `store_records` fuzz target: a health record written as a JSON array of its
    /// fields decoded (serde's derive takes arrays), and a float in it did not read back as the
    /// same number after saving (serde_json's default float parser can be an ulp off).
    #[test]
    fn records_are_objects_and_read_back_exactly() {
        let path = Path::new("/var/lib/authinfod/store");
        let array = b"[ \n666666666666666666666666666666666666666\n]";
        let err = decode_record::<crate::terminal::device::CheckRecord<serde_json::Value>>(
            path,
            "health.inspection",
            array,
        )
        .unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt { key, .. } if key == "health.inspection"),
            "{err}"
        );
        let object = br#"{"value":666666666666666666666666666666666666666}"#;
        let record: crate::terminal::device::CheckRecord<serde_json::Value> =
            decode_record(path, "health.inspection", object).expect("decodes");
        let saved = encode("health.inspection", &record).expect("encodes");
        let again: crate::terminal::device::CheckRecord<serde_json::Value> =
            decode_record(path, "health.inspection", &saved).expect("decodes");
        assert_eq!(again, record);
    }

    #[test]
    fn a_second_opener_of_the_same_state_dir_is_refused_and_nothing_moves() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = Store::open(dir.path()).expect("open");
        store.save_authinfo(&held("A", 1)).expect("save");
        let err = Store::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
        assert_eq!(store.authinfo().expect("read"), Some(held("A", 1)));
        drop(store);
        let (store, recovery) = Store::open(dir.path()).expect("reopen after release");
        assert!(recovery.is_none());
        assert_eq!(store.authinfo().expect("read"), Some(held("A", 1)));
    }

    /// If a previous start died inside sled's open (its marker is still there), the store is
    /// moved aside rather than opened again, so a store that crashes sled cannot crash-loop.
    #[test]
    fn an_open_that_never_finished_moves_the_store_aside() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (store, _) = Store::open(dir.path()).expect("open");
            store.save_authinfo(&held("A", 1)).expect("save");
        }
        std::fs::write(dir.path().join("store.opening"), b"").expect("marker");
        let (store, recovery) = Store::open(dir.path()).expect("open");
        assert!(recovery.expect("recovered").reason.contains("died"));
        assert_eq!(store.authinfo().expect("read"), None);
        assert!(!dir.path().join("store.opening").exists());
    }
}
