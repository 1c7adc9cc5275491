//! The daemon's persistent state: the held authinfo (current and previous), the newest raw_data,
//! the last refresh attempt and the device health records, in sled, with an independent
//! crash-safe copy of all of it beside sled.
//!
//! Owns: the on-disk layout and its permissions (directory 0700, files 0600); durability (a write
//! returns once sled is flushed and the copy renamed into place, both fsynced, so nothing is
//! announced that a power cut or a kill could lose); telling damage from trouble (a record that
//! is not whole, or is older than the other side, is damage and is restored from the other side;
//! a full or read-only disk, a permission error or the lock are not, and only make the store
//! stop persisting until they pass); and the watch on the state directory
//! ([`Store::check`], [`keep`]). Reads are served from memory, so a store that cannot persist
//! still serves what it holds. Callers never see sled types. It must not decide what is worth
//! saving: the refresher enforces "never worse" before calling [`Store::save_authinfo`].
//!
//! On disk, under the state directory:
//!
//! - `store/`: sled. Every write puts every record, each sealed ([`seal`]) with the write's
//!   generation, plus the generation itself, in one batch.
//! - `store.copy`: the same snapshot as one sealed record, replaced atomically.
//! - `store.opening`: present only while sled opens; tells the next start that this one died
//!   there (and, from the panic hook, whether sled panicked), and that start has a child open
//!   sled alone first ([`probe`]) to tell a kill from a store that crashes sled.
//! - `store.broken-<time>`: a sled store that could not be opened, moved aside (the newest
//!   [`files::KEEP_MOVED_ASIDE`] are kept).

mod files;
mod probe;
mod records;
mod recover;
mod seal;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Serialize, de::DeserializeOwned};
use tokio_util::sync::CancellationToken;

use self::files::FileId;
pub(crate) use self::files::write_atomically_with_mode;
pub use self::probe::{PROBE_ENV, PROBE_PARENT_ENV, child as probe_child};
pub use self::records::{AttemptRecord, HeldAuthinfo, RawData};
use self::records::{KEY_COPY, KEY_GENERATION, KEY_SCHEMA, SCHEMA, Snapshot, encode};
pub use self::recover::Source;
use self::recover::{CopyView, Finding, SledView};
use self::seal::seal;
use crate::units::WallClock;

/// sled's page cache bound: the data here is a few KiB, so 2 MiB is ample.
const CACHE_CAPACITY: u64 = 2 * 1024 * 1024;
/// Without a probe ([`StoreOptions::probe`]): after this many starts in a row died inside sled's
/// open without a panic (an abort, a segfault, or kills), the store is taken for one that crashes
/// sled and is moved aside: the copy still holds everything. A single kill there (systemd
/// stopping a slow start, a power cut) is not damage, and with the copy even a wrong guess loses
/// nothing. With a probe, deaths are not counted: the probe tells.
const OPEN_DEATHS_LIMIT: u32 = 3;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the state directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another process holds the state directory {path} (is authinfod already running?)")]
    Locked { path: PathBuf },
    #[error("cannot lock the state directory {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sled {op} failed at {path}")]
    Sled {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("cannot write the copy {path}")]
    Copy {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot move the damaged store {from} aside to {to}")]
    MoveAside {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot encode {key}")]
    Encode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the stored {key} does not decode: {reason}")]
    Decode { key: String, reason: String },
}

/// Decodes the body of the record stored under `key` (every record is a JSON object, and a
/// float reads back as the number written), or [`StoreError::Decode`] naming the key. The
/// records' reader, and the fuzz target `store_records`'s entry.
pub fn decode_record<T: serde::de::DeserializeOwned>(
    key: &str,
    body: &[u8],
) -> Result<T, StoreError> {
    crate::json::from_slice(body).map_err(|e| StoreError::Decode {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

/// One damage found and repaired, as logs and status tell it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Unix seconds when it was found.
    pub at: i64,
    /// What was damaged, deleted or behind.
    pub damaged: String,
    /// Where the good state came from.
    pub restored_from: Source,
    /// What was restored (the authinfo by fingerprint).
    pub restored: String,
    /// Where a store that could not be opened was moved.
    pub moved_to: Option<PathBuf>,
}

/// Why the store is not persisting, and since when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotPersisting {
    pub since: i64,
    pub reason: String,
}

/// The store's health, for status and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStatus {
    /// Set while writes fail: what is held is served from memory only.
    pub not_persisting: Option<NotPersisting>,
    /// The last damage repaired since start.
    pub last_recovery: Option<Recovery>,
    /// How many were repaired since start.
    pub recoveries: u64,
    /// The generation of the last write (or of what was found at start).
    pub generation: u64,
    /// Unix seconds of the last write that reached the disk.
    pub last_persist_at: Option<i64>,
}

/// The files of a store.
#[derive(Debug)]
struct Paths {
    state_dir: PathBuf,
    sled: PathBuf,
    copy: PathBuf,
    marker: PathBuf,
}

impl Paths {
    fn new(state_dir: &Path) -> Self {
        Self {
            state_dir: state_dir.to_owned(),
            sled: state_dir.join("store"),
            copy: state_dir.join("store.copy"),
            marker: state_dir.join("store.opening"),
        }
    }

    fn sled_db(&self) -> PathBuf {
        self.sled.join("db")
    }
}

/// The identities of what the store wrote, to notice them deleted or replaced.
#[derive(Debug, Clone, Copy, Default)]
struct Ids {
    state_dir: Option<FileId>,
    sled_db: Option<FileId>,
    copy: Option<FileId>,
}

#[derive(Debug)]
struct Inner {
    snapshot: Snapshot,
    generation: u64,
    /// `None` while sled cannot be opened (it is opened again at the next write).
    db: Option<sled::Db>,
    /// Memory holds more than the disk: the next write must succeed to catch up.
    pending: bool,
    /// Whether [`Store::check`] has written once since start (its first round proves the disk
    /// takes writes, so that a full or read-only disk shows in status at once).
    probed: bool,
    status: StoreStatus,
    ids: Ids,
    /// The flock on the state directory; replaced when the directory is created again.
    _lock: Option<nix::fcntl::Flock<std::fs::File>>,
}

/// The daemon's store. Cheap to clone: clones share one state.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<Mutex<Inner>>,
    paths: Arc<Paths>,
    clock: Arc<WallClock>,
}

/// Why sled could not be opened.
enum OpenFailure {
    /// The store is damaged: moved aside.
    Damage(String),
    /// Something else (space, permissions, read-only, file handles, the lock): left alone.
    Trouble(String),
}

/// How a store is opened.
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// The wall clock (the system's; tests shift it).
    pub clock: Arc<WallClock>,
    /// The daemon's own binary, run as a child that opens sled alone ([`PROBE_ENV`]) when the
    /// previous start died inside sled's open: a child that opens it proves that start was
    /// killed, one that dies or hangs proves the store crashes sled (moved aside at once).
    /// `None`, or a child that cannot be run: such deaths are counted instead
    /// ([`OPEN_DEATHS_LIMIT`]).
    pub probe: Option<PathBuf>,
}

impl Store {
    /// [`open_with`](Self::open_with) on the system's clock, without a probe.
    pub fn open(state_dir: &Path) -> Result<(Self, Vec<Recovery>), StoreError> {
        Self::open_with(state_dir, &StoreOptions::default())
    }

    /// Opens (or creates) the store under `state_dir`, reads sled and the copy, and repairs
    /// whichever is damaged, missing or behind from the other; every repair is logged at error
    /// and returned. A sled store that cannot be opened because it is damaged is moved aside and
    /// refilled from the copy; one that cannot be opened for another reason (full or read-only
    /// disk, permissions) is left alone and the copy is served read-only, not persisting, until
    /// a write succeeds. Errors only when the state directory cannot be created or is locked by
    /// another process.
    pub fn open_with(
        state_dir: &Path,
        options: &StoreOptions,
    ) -> Result<(Self, Vec<Recovery>), StoreError> {
        let clock = options.clock.clone();
        let paths = Arc::new(Paths::new(state_dir));
        files::prepare_dir(state_dir)?;
        let lock = files::lock_dir(state_dir)?;
        files::remove_temporary(&paths.copy);
        let now = clock.now();
        let copy = recover::read_copy(&paths.copy);
        // sled's settings file holds nothing of ours: a damaged one is removed and sled writes
        // it anew, instead of sled tripping over it (or silently keeping it).
        let conf_damage = files::damaged_sled_conf(&paths.sled).and_then(|why| {
            let conf = paths.sled.join("conf");
            std::fs::remove_file(&conf).ok().map(|()| Finding {
                damaged: format!("sled's settings file {} is damaged ({why})", conf.display()),
                restored_from: Source::Sled,
                restored: Some("sled's settings, written anew by sled".into()),
            })
        });
        let mut moved_to = None;
        let mut trouble = None;
        let opened = match open_guarded(&paths, options.probe.as_deref()) {
            Ok(opened) => Some(opened),
            Err(OpenFailure::Trouble(reason)) => {
                trouble = Some(reason);
                None
            }
            Err(OpenFailure::Damage(reason)) => match files::move_aside(&paths.sled, now) {
                Ok(to) => {
                    moved_to = Some((to, reason));
                    match open_sled(&paths.sled) {
                        Ok(db) => Some((db, SledView::default())),
                        Err(e) => {
                            trouble = Some(sled_error("open", &paths.sled, e).to_string());
                            None
                        }
                    }
                }
                Err(e) => {
                    trouble = Some(format!(
                        "sled's store is damaged ({reason}) and {}",
                        crate::error_chain(&e)
                    ));
                    None
                }
            },
        };
        let decision = recover::reconcile(opened.as_ref().map(|(_, view)| view), &copy);
        let db = opened.map(|(db, _)| db);
        if db.is_some()
            && let Err(error) = files::restrict_permissions(&paths.sled)
        {
            tracing::warn!(path = %paths.sled.display(), %error, "cannot restrict the store's permissions");
        }
        let ids = Ids {
            state_dir: files::file_id(state_dir),
            sled_db: files::file_id(&paths.sled_db()),
            copy: files::file_id(&paths.copy),
        };
        let store = Self {
            inner: Arc::new(Mutex::new(Inner {
                snapshot: decision.snapshot,
                generation: decision.generation,
                db,
                pending: false,
                probed: false,
                status: StoreStatus {
                    generation: decision.generation,
                    ..StoreStatus::default()
                },
                ids,
                _lock: Some(lock),
            })),
            paths,
            clock,
        };
        let mut inner = store.lock();
        let mut findings = decision.findings;
        let mut moved = None;
        if let Some((to, reason)) = moved_to {
            let copy_whole = matches!(copy, CopyView::Whole { .. });
            if copy_whole {
                // The only finding about an emptied sled is this one.
                findings.clear();
            }
            findings.insert(
                0,
                Finding {
                    damaged: format!("sled's store cannot be opened ({reason})"),
                    restored_from: if copy_whole {
                        Source::Copy
                    } else {
                        Source::Nothing
                    },
                    restored: None,
                },
            );
            moved = Some(to);
        }
        findings.extend(conf_damage);
        let recoveries: Vec<Recovery> = findings
            .into_iter()
            .map(|finding| store.note_recovery(&mut inner, finding, moved.take()))
            .collect();
        for note in &decision.notes {
            tracing::warn!(store = %store.paths.state_dir.display(), "{note}");
        }
        if let Some(reason) = trouble {
            store.not_persisting(&mut inner, reason);
        } else if decision.rewrite {
            // Errors are in status and the log; what is held is served either way.
            let _ = store.persist(&mut inner);
        }
        drop(inner);
        Ok((store, recoveries))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        crate::sync::lock(&self.inner)
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.paths.state_dir
    }

    /// The directory sled writes to.
    pub fn path(&self) -> &Path {
        &self.paths.sled
    }

    /// The copy beside sled.
    pub fn copy_path(&self) -> &Path {
        &self.paths.copy
    }

    // === reads (from memory) ===

    /// The held authinfo, if any.
    pub fn authinfo(&self) -> Option<HeldAuthinfo> {
        self.lock().snapshot.authinfo.clone()
    }

    /// The authinfo held before the current one, if any.
    pub fn previous_authinfo(&self) -> Option<HeldAuthinfo> {
        self.lock().snapshot.previous.clone()
    }

    /// The newest raw_data, if any.
    pub fn raw_data(&self) -> Option<RawData> {
        self.lock().snapshot.raw_data.clone()
    }

    /// The last refresh attempt, if any.
    pub fn last_attempt(&self) -> Option<AttemptRecord> {
        self.lock().snapshot.attempt.clone()
    }

    /// A health record by check name (`inspection`, `alipay_binding`, `licence`).
    pub fn health<T: DeserializeOwned>(&self, check: &str) -> Result<Option<T>, StoreError> {
        let value = self.lock().snapshot.health.get(check).cloned();
        value
            .map(|v| {
                serde_json::from_value(v).map_err(|e| StoreError::Decode {
                    key: format!("{}{check}", records::HEALTH_PREFIX),
                    reason: e.to_string(),
                })
            })
            .transpose()
    }

    /// The store's health now.
    pub fn status(&self) -> StoreStatus {
        self.lock().status.clone()
    }

    // === writes (to memory, then to disk) ===

    /// Makes `new` the held authinfo (the old one becomes the previous). Returns once it is on
    /// disk; on an error it is held (and served) from memory only, and written at the next
    /// write or check that can.
    pub fn save_authinfo(&self, new: &HeldAuthinfo) -> Result<(), StoreError> {
        self.change(|s| {
            s.previous = s.authinfo.replace(new.clone());
            Ok(())
        })
    }

    /// Stores the newest raw_data (as [`save_authinfo`](Self::save_authinfo)).
    pub fn save_raw_data(&self, raw: &RawData) -> Result<(), StoreError> {
        self.change(|s| {
            s.raw_data = Some(raw.clone());
            Ok(())
        })
    }

    /// Records the last refresh attempt (as [`save_authinfo`](Self::save_authinfo)).
    pub fn save_attempt(&self, attempt: &AttemptRecord) -> Result<(), StoreError> {
        self.change(|s| {
            s.attempt = Some(attempt.clone());
            Ok(())
        })
    }

    /// Stores a health record (as [`save_authinfo`](Self::save_authinfo)).
    pub fn save_health<T: Serialize>(&self, check: &str, record: &T) -> Result<(), StoreError> {
        let value = serde_json::to_value(record).map_err(|source| StoreError::Encode {
            key: format!("{}{check}", records::HEALTH_PREFIX),
            source,
        })?;
        self.change(|s| {
            s.health.insert(check.to_owned(), value);
            Ok(())
        })
    }

    /// Makes sure everything held is on disk (at shutdown): writes what is pending, else
    /// flushes sled.
    pub fn flush(&self) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if inner.pending {
            return self.persist(&mut inner);
        }
        match &inner.db {
            Some(db) => db.flush().map(drop).map_err(|source| StoreError::Sled {
                op: "flush",
                path: self.paths.sled.clone(),
                source,
            }),
            None => Ok(()),
        }
    }

    /// Checks that the state directory, sled's file and the copy are still the ones written
    /// (re-creating and rewriting them from memory if not), and writes what is pending (retrying
    /// a store that is not persisting). The first check after start always writes, to prove the
    /// disk takes writes.
    pub fn check(&self) {
        let mut inner = self.lock();
        let repaired = self.check_paths(&mut inner);
        if repaired || inner.pending || inner.status.not_persisting.is_some() || !inner.probed {
            inner.probed = true;
            let _ = self.persist(&mut inner);
        }
    }

    fn change(
        &self,
        apply: impl FnOnce(&mut Snapshot) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut inner = self.lock();
        apply(&mut inner.snapshot)?;
        self.check_paths(&mut inner);
        self.persist(&mut inner)
    }

    /// Writes the whole snapshot under a new generation: sled (one batch, flushed), then the
    /// copy. On failure the snapshot stays in memory, marked pending, and status says why.
    fn persist(&self, inner: &mut Inner) -> Result<(), StoreError> {
        let result = self.write_all(inner);
        let now = self.clock.now();
        match &result {
            Ok(()) => {
                inner.pending = false;
                inner.status.last_persist_at = Some(now);
                if let Some(was) = inner.status.not_persisting.take() {
                    tracing::info!(
                        store = %self.paths.state_dir.display(),
                        was = %was.reason,
                        generation = inner.generation,
                        "the store is persisting again; everything held is on disk"
                    );
                }
            }
            Err(error) => {
                inner.pending = true;
                self.not_persisting(inner, crate::error_chain(error));
            }
        }
        inner.status.generation = inner.generation;
        result
    }

    fn write_all(&self, inner: &mut Inner) -> Result<(), StoreError> {
        if inner.db.is_none() {
            let db = self.reopen_sled(inner)?;
            // A store found there (a replaced directory) may be of a later generation.
            if let Ok(view) = recover::read_sled(&db)
                && let Some(g) = view.generation
            {
                inner.generation = inner.generation.max(g);
            }
            inner.ids.sled_db = files::file_id(&self.paths.sled_db());
            inner.db = Some(db);
        }
        inner.generation = inner.generation.saturating_add(1);
        let generation = inner.generation;
        let mut batch = sled::Batch::default();
        batch.insert(KEY_SCHEMA, SCHEMA);
        batch.insert(
            KEY_GENERATION,
            seal(
                KEY_GENERATION,
                generation,
                generation.to_string().as_bytes(),
            ),
        );
        for (key, body) in inner.snapshot.records()? {
            batch.insert(key.as_bytes(), seal(&key, generation, &body));
        }
        let written = match &inner.db {
            Some(db) => db
                .apply_batch(batch)
                .map_err(|e| sled_error("write", &self.paths.sled, e))
                .and_then(|()| {
                    db.flush()
                        .map(drop)
                        .map_err(|e| sled_error("flush", &self.paths.sled, e))
                }),
            None => Ok(()),
        };
        if let Err(e) = written {
            // sled keeps an I/O error for good: the next write opens it afresh.
            inner.db = None;
            return Err(e);
        }
        let body = encode(KEY_COPY, &inner.snapshot)?;
        files::write_atomically(&self.paths.copy, &seal(KEY_COPY, generation, &body)).map_err(
            |source| StoreError::Copy {
                path: self.paths.copy.clone(),
                source,
            },
        )?;
        inner.ids.copy = files::file_id(&self.paths.copy);
        Ok(())
    }

    /// Opens sled again for a write (after an I/O error, or once the disk takes writes again);
    /// a store that is damaged by then is moved aside, logged, and replaced by an empty one that
    /// the write fills from memory.
    fn reopen_sled(&self, inner: &mut Inner) -> Result<sled::Db, StoreError> {
        let path = &self.paths.sled;
        match open_sled(path) {
            Ok(db) => Ok(db),
            Err(source) => match classify(&source) {
                OpenFailure::Trouble(_) => Err(sled_error("open", path, source)),
                OpenFailure::Damage(reason) => {
                    let moved_to = files::move_aside(path, self.clock.now())?;
                    self.note_recovery(
                        inner,
                        Finding {
                            damaged: format!("sled's store cannot be opened ({reason})"),
                            restored_from: Source::Memory,
                            restored: None,
                        },
                        Some(moved_to),
                    );
                    open_sled(path).map_err(|e| sled_error("open", path, e))
                }
            },
        }
    }

    /// Notices the state directory, sled's file or the copy deleted or replaced under the
    /// running daemon, logs it at error and prepares their re-creation (the next persist writes
    /// everything held). Returns whether anything was found.
    fn check_paths(&self, inner: &mut Inner) -> bool {
        let paths = &self.paths;
        let dir_now = files::file_id(&paths.state_dir);
        let damaged = if dir_now != inner.ids.state_dir {
            let what = if dir_now.is_none() {
                "deleted"
            } else {
                "replaced"
            };
            if let Err(error) = files::prepare_dir(&paths.state_dir) {
                self.not_persisting(inner, crate::error_chain(&error));
                return false;
            }
            match files::lock_dir(&paths.state_dir) {
                Ok(lock) => inner._lock = Some(lock),
                Err(error) => {
                    tracing::error!(error = %crate::error_chain(&error), "cannot lock the re-created state directory")
                }
            }
            inner.ids.state_dir = files::file_id(&paths.state_dir);
            inner.db = None;
            Some(format!(
                "the state directory {} was {what} while the daemon ran",
                paths.state_dir.display()
            ))
        } else if inner.db.is_some() && files::file_id(&paths.sled_db()) != inner.ids.sled_db {
            inner.db = None;
            Some(format!(
                "sled's file {} was deleted or replaced while the daemon ran",
                paths.sled_db().display()
            ))
        } else if inner.ids.copy.is_some() && files::file_id(&paths.copy) != inner.ids.copy {
            Some(format!(
                "the copy {} was deleted or replaced while the daemon ran",
                paths.copy.display()
            ))
        } else {
            None
        };
        match damaged {
            Some(damaged) => {
                inner.pending = true;
                self.note_recovery(
                    inner,
                    Finding {
                        damaged,
                        restored_from: Source::Memory,
                        restored: None,
                    },
                    None,
                );
                true
            }
            None => false,
        }
    }

    /// Logs a repair at error and shows it in status.
    fn note_recovery(
        &self,
        inner: &mut Inner,
        finding: Finding,
        moved_to: Option<PathBuf>,
    ) -> Recovery {
        let restored = finding
            .restored
            .unwrap_or_else(|| match finding.restored_from {
                Source::Nothing => format!("kept what was whole: {}", inner.snapshot.describe()),
                from => format!("{} from the {}", inner.snapshot.describe(), from.as_str()),
            });
        let recovery = Recovery {
            at: self.clock.now(),
            damaged: finding.damaged,
            restored_from: finding.restored_from,
            restored,
            moved_to,
        };
        tracing::error!(
            store = %self.paths.state_dir.display(),
            damaged = %recovery.damaged,
            restored_from = recovery.restored_from.as_str(),
            restored = %recovery.restored,
            moved_to = recovery.moved_to.as_ref().map(|p| p.display().to_string()),
            "store damage found and repaired"
        );
        inner.status.recoveries += 1;
        inner.status.last_recovery = Some(recovery.clone());
        recovery
    }

    /// Marks the store not persisting; logs at error when the reason is new.
    fn not_persisting(&self, inner: &mut Inner, reason: String) {
        inner.pending = true;
        let status = &mut inner.status;
        if status.not_persisting.as_ref().map(|n| &n.reason) != Some(&reason) {
            tracing::error!(
                store = %self.paths.state_dir.display(),
                reason = %reason,
                "the store is not persisting; serving what it holds from memory and retrying"
            );
        }
        let since = status
            .not_persisting
            .as_ref()
            .map_or_else(|| self.clock.now(), |n| n.since);
        status.not_persisting = Some(NotPersisting { since, reason });
    }
}

/// Runs [`Store::check`] at once and then every `every`, until `shutdown`. The check runs on the
/// async thread, as every store write does: it is a few `stat`s, and a few fsyncs when it writes.
pub async fn keep(store: Store, every: Duration, shutdown: CancellationToken) {
    loop {
        store.check();
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(every) => {}
        }
    }
}

/// Makes a panic inside sled's open (which aborts the release build) leave its message in the
/// opening marker of `state_dir`, so that the next start moves the store aside at once instead of
/// crashing on it again. The hook is process-wide by nature; it writes only while the marker
/// exists (during an open), and chains to the previous hook.
pub fn record_panics_while_opening(state_dir: &Path) {
    let marker = Paths::new(state_dir).marker;
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        files::mark_panic(&marker, &info.to_string());
        previous(info);
    }));
}

/// Opens sled and reads it, guarded by the opening marker: a store on which the previous start
/// panicked is reported as damage without opening it again; one on which the previous start died
/// otherwise is first opened by the `probe` child (damage if that dies or hangs too), or without
/// a probe, damage once [`OPEN_DEATHS_LIMIT`] starts in a row died. A panic inside (in a build
/// that unwinds) is damage too.
fn open_guarded(paths: &Paths, probe: Option<&Path>) -> Result<(sled::Db, SledView), OpenFailure> {
    let starts = match files::read_marker(&paths.marker) {
        files::Marker::Panicked(message) => {
            let _ = std::fs::remove_file(&paths.marker);
            return Err(OpenFailure::Damage(format!(
                "sled panicked opening it at the previous start: {message}"
            )));
        }
        files::Marker::Died { starts } => {
            let outcome = probe.map_or_else(
                || probe::Outcome::Unavailable("no probe is configured".into()),
                |program| probe::run(program, &paths.state_dir, probe::TIMEOUT),
            );
            match outcome {
                probe::Outcome::Opened | probe::Outcome::SledError => {
                    tracing::warn!(
                        starts,
                        "the previous start died while sled was opening the store, and a probe opening it alone did not: that start was killed, not crashed by the store; opening it again"
                    );
                    1
                }
                probe::Outcome::Died(how) => {
                    let _ = std::fs::remove_file(&paths.marker);
                    return Err(OpenFailure::Damage(format!(
                        "the previous start died while sled was opening it, and so did a probe opening it alone ({how})"
                    )));
                }
                probe::Outcome::Unavailable(_) if starts >= OPEN_DEATHS_LIMIT => {
                    let _ = std::fs::remove_file(&paths.marker);
                    return Err(OpenFailure::Damage(format!(
                        "{starts} starts in a row died while sled was opening it"
                    )));
                }
                probe::Outcome::Unavailable(why) => {
                    tracing::warn!(
                        starts,
                        probe = %why,
                        "the previous start died while sled was opening the store (killed, or crashed); opening it again"
                    );
                    starts + 1
                }
            }
        }
        files::Marker::Absent => 1,
    };
    files::write_marker(&paths.marker, starts);
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let db = open_sled(&paths.sled)?;
        let view = recover::read_sled(&db)?;
        Ok::<_, sled::Error>((db, view))
    }));
    let _ = std::fs::remove_file(&paths.marker);
    match opened {
        Ok(Ok(opened)) => Ok(opened),
        Ok(Err(e)) => Err(classify(&e)),
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(OpenFailure::Damage(format!(
                "sled panicked opening it: {message}"
            )))
        }
    }
}

/// Damage (moved aside) or trouble (left alone) by sled's error: only what says the files are
/// bad is damage.
fn classify(error: &sled::Error) -> OpenFailure {
    let reason = crate::error_chain(error);
    match error {
        sled::Error::Io(io) if is_trouble(io) => OpenFailure::Trouble(reason),
        _ => OpenFailure::Damage(reason),
    }
}

/// Whether an I/O error is about the machine rather than the files: space, quota, permissions,
/// a read-only mount, file handles, memory, the lock. What remains (EIO, a short or invalid file)
/// is damage.
fn is_trouble(error: &std::io::Error) -> bool {
    use nix::errno::Errno;
    if let Some(code) = error.raw_os_error() {
        let errno = Errno::from_raw(code);
        return errno != Errno::EIO;
    }
    !matches!(
        error.kind(),
        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidData
    )
}

/// Opens sled at `path`. sled's own file lock can outlive a closed handle for a moment (its IO
/// threads let go of the file asynchronously), so a lock conflict is retried for up to two
/// seconds: our flock on the state directory already proves no other process uses the store, and
/// mistaking the conflict for damage would move a good store aside.
fn open_sled(path: &Path) -> Result<sled::Db, sled::Error> {
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
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

fn sled_error(op: &'static str, path: &Path, source: sled::Error) -> StoreError {
    StoreError::Sled {
        op,
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `store_records` fuzz target: a health record written as a JSON array of its
    /// fields decoded (serde's derive takes arrays), and a float in it did not read back as the
    /// same number after saving (serde_json's default float parser can be an ulp off).
    #[test]
    fn records_are_objects_and_read_back_exactly() {
        type Record = crate::terminal::device::CheckRecord<serde_json::Value>;
        let array = b"[ \n666666666666666666666666666666666666666\n]";
        let err = decode_record::<Record>("health.inspection", array).unwrap_err();
        assert!(
            matches!(&err, StoreError::Decode { key, .. } if key == "health.inspection"),
            "{err}"
        );
        let object = br#"{"value":666666666666666666666666666666666666666}"#;
        let record: Record = decode_record("health.inspection", object).expect("decodes");
        let saved = encode("health.inspection", &record).expect("encodes");
        let again: Record = decode_record("health.inspection", &saved).expect("decodes");
        assert_eq!(again, record);
    }
    use std::os::unix::fs::MetadataExt as _;

    fn held(authinfo: &str, fetched_at: i64) -> HeldAuthinfo {
        HeldAuthinfo {
            authinfo: authinfo.into(),
            fetched_at,
            expires_at: fetched_at + 7200,
            expires_in: None,
            proxy_fetched_at: None,
        }
    }

    fn raw(value: &str) -> RawData {
        RawData {
            value: value.into(),
            received_at: 3,
            source: "socket".into(),
        }
    }

    /// A store holding A then B (B current, A previous) and raw_data, closed.
    fn filled(dir: &Path) {
        let (store, recoveries) = Store::open(dir).expect("open");
        assert!(recoveries.is_empty());
        store.save_authinfo(&held("A", 1)).expect("save");
        store.save_authinfo(&held("B", 2)).expect("save");
        store.save_raw_data(&raw("RAW")).expect("raw");
    }

    fn assert_holds_b(store: &Store) {
        assert_eq!(store.authinfo(), Some(held("B", 2)));
        assert_eq!(store.previous_authinfo(), Some(held("A", 1)));
        assert_eq!(store.raw_data(), Some(raw("RAW")));
    }

    /// The copy as it is on disk.
    fn copy_of(dir: &Path) -> (u64, Snapshot) {
        match recover::read_copy(&dir.join("store.copy")) {
            CopyView::Whole {
                generation,
                snapshot,
            } => (generation, *snapshot),
            other => panic!("copy not whole: {other:?}"),
        }
    }

    #[test]
    fn saved_records_survive_reopen_and_the_copy_matches_sled() {
        let dir = tempfile::tempdir().expect("tempdir");
        filled(dir.path());
        let (store, recoveries) = Store::open(dir.path()).expect("reopen");
        assert!(recoveries.is_empty(), "{recoveries:?}");
        assert_holds_b(&store);
        let status = store.status();
        assert_eq!(status.generation, 3, "one generation per write");
        assert!(status.not_persisting.is_none() && status.last_recovery.is_none());
        let (generation, snapshot) = copy_of(dir.path());
        assert_eq!(generation, 3);
        assert_eq!(snapshot.authinfo, Some(held("B", 2)));
        assert_eq!(snapshot.raw_data, Some(raw("RAW")));
    }

    #[test]
    fn state_dir_is_0700_and_store_files_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let (store, _) = Store::open(&state).expect("open");
        store.save_authinfo(&held("A", 1)).expect("save");
        assert_eq!(crate::test_support::mode_of(&state), 0o700);
        assert_eq!(crate::test_support::mode_of(store.copy_path()), 0o600);
        let mut files = 0;
        for entry in std::fs::read_dir(store.path()).expect("read_dir").flatten() {
            let meta = entry.metadata().expect("meta");
            let want = if meta.is_dir() { 0o700 } else { 0o600 };
            assert_eq!(meta.mode() & 0o777, want, "{}", entry.path().display());
            files += 1;
        }
        assert!(files > 0);
    }

    /// A sled snapshot that is garbage: sled cannot open the store; it is moved aside and
    /// everything comes back from the copy.
    #[test]
    fn an_unopenable_sled_store_is_moved_aside_and_refilled_from_the_copy() {
        let dir = tempfile::tempdir().expect("tempdir");
        filled(dir.path());
        // sled writes a snapshot when it opens a store with a log to recover.
        drop(Store::open(dir.path()).expect("reopen"));
        let mut garbled = 0;
        for entry in std::fs::read_dir(dir.path().join("store"))
            .expect("read_dir")
            .flatten()
        {
            if entry.file_name().to_string_lossy().starts_with("snap.") {
                std::fs::write(entry.path(), b"\xde\xad\xbe\xef not a snapshot").expect("garble");
                garbled += 1;
            }
        }
        assert!(garbled > 0);
        let (store, recoveries) = Store::open(dir.path()).expect("recovers");
        assert_holds_b(&store);
        let r = &recoveries[0];
        let moved_to = r.moved_to.as_ref().expect("moved aside");
        assert!(moved_to.exists());
        assert!(
            moved_to
                .file_name()
                .expect("name")
                .to_string_lossy()
                .starts_with("store.broken-")
        );
        assert_eq!(r.restored_from, Source::Copy);
        assert!(r.restored.contains("raw_data"), "{r:?}");
        assert_eq!(store.status().last_recovery.as_ref(), Some(r));
        // Written back: a second open finds nothing wrong.
        drop(store);
        let (store, recoveries) = Store::open(dir.path()).expect("reopen");
        assert!(recoveries.is_empty(), "{recoveries:?}");
        assert_holds_b(&store);
    }

    /// A record sled reads fine but whose seal does not verify is damage: restored from the
    /// copy, nothing moved aside.
    #[test]
    fn a_damaged_sled_record_is_restored_from_the_copy() {
        let dir = tempfile::tempdir().expect("tempdir");
        filled(dir.path());
        {
            let db = open_sled(&dir.path().join("store")).expect("sled");
            let mut bytes = db
                .get(records::KEY_CURRENT)
                .expect("get")
                .expect("present")
                .to_vec();
            let last = bytes.len() - 3;
            bytes[last] ^= 0x20;
            db.insert(records::KEY_CURRENT, bytes).expect("insert");
            db.flush().expect("flush");
        }
        let (store, recoveries) = Store::open(dir.path()).expect("open");
        assert_holds_b(&store);
        assert_eq!(recoveries.len(), 1, "{recoveries:?}");
        assert!(
            recoveries[0].damaged.contains("authinfo.current"),
            "{recoveries:?}"
        );
        assert_eq!(recoveries[0].restored_from, Source::Copy);
        assert!(recoveries[0].moved_to.is_none());
    }

    /// sled silently back at an older state (a truncated log) while the copy is newer.
    #[test]
    fn a_rolled_back_sled_is_restored_from_the_newer_copy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old = tempfile::tempdir().expect("tempdir");
        {
            let (store, _) = Store::open(dir.path()).expect("open");
            store.save_authinfo(&held("A", 1)).expect("save");
        }
        copy_dir(&dir.path().join("store"), &old.path().join("store"));
        filled(dir.path());
        std::fs::remove_dir_all(dir.path().join("store")).expect("rm");
        copy_dir(&old.path().join("store"), &dir.path().join("store"));
        let (store, recoveries) = Store::open(dir.path()).expect("open");
        assert_holds_b(&store);
        assert!(
            recoveries[0]
                .damaged
                .contains("rolled back to generation 1"),
            "{recoveries:?}"
        );
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).expect("mkdir");
        for entry in std::fs::read_dir(from).expect("read_dir").flatten() {
            let target = to.join(entry.file_name());
            if entry.path().is_dir() {
                copy_dir(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), &target).expect("copy");
            }
        }
    }

    #[test]
    fn a_damaged_or_deleted_copy_is_rewritten_from_sled() {
        let dir = tempfile::tempdir().expect("tempdir");
        filled(dir.path());
        let copy = dir.path().join("store.copy");
        let mut bytes = std::fs::read(&copy).expect("read");
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x01;
        std::fs::write(&copy, &bytes).expect("damage");
        let (store, recoveries) = Store::open(dir.path()).expect("open");
        assert_holds_b(&store);
        assert!(
            recoveries[0].damaged.contains("the copy is damaged"),
            "{recoveries:?}"
        );
        assert_eq!(recoveries[0].restored_from, Source::Sled);
        drop(store);
        assert_eq!(copy_of(dir.path()).1.authinfo, Some(held("B", 2)));
        std::fs::remove_file(&copy).expect("rm");
        let (store, recoveries) = Store::open(dir.path()).expect("open");
        assert!(
            recoveries[0].damaged.contains("the copy is missing"),
            "{recoveries:?}"
        );
        drop(store);
        assert_eq!(copy_of(dir.path()).1.raw_data, Some(raw("RAW")));
    }

    #[test]
    fn a_second_opener_of_the_same_state_dir_is_refused_and_nothing_moves() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = Store::open(dir.path()).expect("open");
        store.save_authinfo(&held("A", 1)).expect("save");
        let err = Store::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
        assert_eq!(store.authinfo(), Some(held("A", 1)));
        drop(store);
        let (store, recoveries) = Store::open(dir.path()).expect("reopen after release");
        assert!(recoveries.is_empty());
        assert_eq!(store.authinfo(), Some(held("A", 1)));
    }

    /// A start killed inside sled's open is not damage: the next start opens the store again.
    /// Only [`OPEN_DEATHS_LIMIT`] deaths in a row, or a panic, move it aside; the copy still
    /// holds everything then.
    #[test]
    fn starts_that_died_while_opening_move_the_store_aside_only_when_repeated_or_panicked() {
        let dir = tempfile::tempdir().expect("tempdir");
        filled(dir.path());
        let marker = dir.path().join("store.opening");
        for starts in 1..OPEN_DEATHS_LIMIT {
            files::write_marker(&marker, starts);
            let (store, recoveries) = Store::open(dir.path()).expect("open");
            assert!(recoveries.is_empty(), "{starts}: {recoveries:?}");
            assert_holds_b(&store);
            assert!(!marker.exists());
        }
        files::write_marker(&marker, OPEN_DEATHS_LIMIT);
        let (store, recoveries) = Store::open(dir.path()).expect("open");
        assert!(
            recoveries[0].damaged.contains("starts in a row"),
            "{recoveries:?}"
        );
        assert!(recoveries[0].moved_to.is_some());
        assert_holds_b(&store);
        drop(store);
        std::fs::write(&marker, b"").expect("marker");
        files::mark_panic(&marker, "sled: index out of bounds");
        let (store, recoveries) = Store::open(dir.path()).expect("open");
        assert!(
            recoveries[0].damaged.contains("index out of bounds"),
            "{recoveries:?}"
        );
        assert_holds_b(&store);
    }

    /// With a probe, deaths inside sled's open are not counted: a probe that opens the store
    /// clears any number of them, and one that dies moves the store aside at the first.
    #[test]
    fn with_a_probe_a_death_inside_the_open_is_damage_only_when_the_probe_dies_too() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        filled(&state);
        let marker = state.join("store.opening");
        let opens = StoreOptions {
            probe: Some(PathBuf::from("/bin/true")),
            ..StoreOptions::default()
        };
        files::write_marker(&marker, OPEN_DEATHS_LIMIT + 5);
        let (store, recoveries) = Store::open_with(&state, &opens).expect("open");
        assert!(recoveries.is_empty(), "{recoveries:?}");
        assert_holds_b(&store);
        assert!(!marker.exists());
        drop(store);

        let aborts = dir.path().join("aborts");
        crate::test_support::write_file(&aborts, "#!/bin/sh\nkill -ABRT $$\n", 0o755);
        let dies = StoreOptions {
            probe: Some(aborts),
            ..StoreOptions::default()
        };
        let (store, recoveries) = Store::open_with(&state, &dies).expect("open without a marker");
        assert!(recoveries.is_empty(), "no marker, no probe: {recoveries:?}");
        drop(store);
        files::write_marker(&marker, 1);
        let (store, recoveries) = Store::open_with(&state, &dies).expect("open");
        assert!(
            recoveries[0].damaged.contains("killed by SIGABRT"),
            "{recoveries:?}"
        );
        assert!(recoveries[0].moved_to.is_some());
        assert_holds_b(&store);
    }

    /// The first layout (unsealed JSON, schema "1") is read and rewritten sealed, with a copy.
    #[test]
    fn the_first_layout_is_upgraded_without_loss() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let db = open_sled(&dir.path().join("store")).expect("sled");
            db.insert(KEY_SCHEMA, records::LEGACY_SCHEMA)
                .expect("schema");
            db.insert(
                records::KEY_CURRENT,
                serde_json::to_vec(&held("B", 2)).expect("json"),
            )
            .expect("current");
            db.insert(
                records::KEY_RAW_DATA,
                serde_json::to_vec(&raw("RAW")).expect("json"),
            )
            .expect("raw");
            db.flush().expect("flush");
        }
        let (store, recoveries) = Store::open(dir.path()).expect("open");
        assert!(
            recoveries.is_empty(),
            "an upgrade is not damage: {recoveries:?}"
        );
        assert_eq!(store.authinfo(), Some(held("B", 2)));
        assert_eq!(store.raw_data(), Some(raw("RAW")));
        drop(store);
        assert_eq!(copy_of(dir.path()).1.authinfo, Some(held("B", 2)));
        let (store, recoveries) = Store::open(dir.path()).expect("reopen");
        assert!(recoveries.is_empty());
        assert_eq!(store.raw_data(), Some(raw("RAW")));
    }

    /// A write that cannot reach the disk keeps the value in memory, says why in status, and
    /// is written by the next check once the disk takes it.
    #[test]
    fn a_failed_write_is_held_in_memory_and_written_once_the_disk_takes_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = Store::open(dir.path()).expect("open");
        store.save_authinfo(&held("A", 1)).expect("save");
        // The copy's place taken by a directory: its rename fails.
        std::fs::remove_file(store.copy_path()).expect("rm");
        std::fs::create_dir_all(store.copy_path().join("blocker")).expect("mkdir");
        let err = store.save_authinfo(&held("B", 2)).unwrap_err();
        assert!(matches!(err, StoreError::Copy { .. }), "{err}");
        assert_eq!(store.authinfo(), Some(held("B", 2)), "held in memory");
        let reason = store
            .status()
            .not_persisting
            .expect("not persisting")
            .reason;
        assert!(reason.contains("store.copy"), "{reason}");
        store.check();
        assert!(store.status().not_persisting.is_some(), "still blocked");
        std::fs::remove_dir_all(store.copy_path()).expect("unblock");
        store.check();
        let status = store.status();
        assert!(status.not_persisting.is_none(), "{status:?}");
        assert!(status.last_persist_at.is_some());
        drop(store);
        let (store, _) = Store::open(dir.path()).expect("reopen");
        assert_eq!(store.authinfo(), Some(held("B", 2)));
    }

    /// The state directory deleted under a running store: the next check notices, logs it, and
    /// writes everything held into a new one.
    #[test]
    fn a_deleted_state_dir_is_recreated_with_everything_held() {
        let parent = tempfile::tempdir().expect("tempdir");
        let dir = parent.path().join("state");
        let (store, _) = Store::open(&dir).expect("open");
        store.save_authinfo(&held("A", 1)).expect("save");
        store.save_authinfo(&held("B", 2)).expect("save");
        store.save_raw_data(&raw("RAW")).expect("raw");
        std::fs::remove_dir_all(&dir).expect("rm -rf");
        store.check();
        assert!(dir.join("store.copy").exists());
        let status = store.status();
        let recovery = status.last_recovery.clone().expect("recovered");
        assert!(recovery.damaged.contains("was deleted"), "{recovery:?}");
        assert_eq!(recovery.restored_from, Source::Memory);
        assert!(status.not_persisting.is_none(), "{status:?}");
        drop(store);
        let (store, recoveries) = Store::open(&dir).expect("reopen");
        assert!(recoveries.is_empty(), "{recoveries:?}");
        assert_holds_b(&store);
    }
}
