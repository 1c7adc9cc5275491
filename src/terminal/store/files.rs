//! The files around sled: the state directory (its mode, its lock, its identity), the copy written
//! atomically, the marker that tells a start which died inside sled, and moved-aside stores.
//!
//! Owns: how each of these is written and read on disk. It must not decide what to do about what
//! it finds; [`super::Store`] does.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use super::StoreError;

/// How many moved-aside stores are kept (the newest); older ones are deleted, so that a terminal
/// whose flash keeps failing does not fill its disk with them.
pub const KEEP_MOVED_ASIDE: usize = 3;

/// What identifies a file or directory: its device and inode. A directory deleted and created
/// again, or a file replaced, has another.
pub type FileId = (u64, u64);

/// The identity of `path`, `None` when it does not exist (or cannot be read).
pub fn file_id(path: &Path) -> Option<FileId> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Creates `dir` (and parents) with mode 0700, or tightens an existing one to 0700. An existing
/// directory whose mode cannot be changed (a read-only mount, another owner) is used as it is,
/// with a warning: what it holds may still be served.
pub fn prepare_dir(dir: &Path) -> Result<(), StoreError> {
    if !dir.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| StoreError::CreateDir {
                path: dir.to_owned(),
                source,
            })?;
    }
    let mode = std::fs::metadata(dir)
        .map(|m| m.mode() & 0o777)
        .map_err(|source| StoreError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
    if mode != 0o700
        && let Err(error) = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
    {
        tracing::warn!(
            path = %dir.display(),
            mode = format_args!("{mode:o}"),
            %error,
            "cannot tighten the state directory to 0700; using it as it is"
        );
    }
    Ok(())
}

/// An exclusive flock on the state directory itself, held while the store lives: a second daemon
/// on the same directory is refused instead of mistaking the live store for a broken one. The
/// directory is opened read-only, so the lock works on a read-only mount too.
pub fn lock_dir(dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, StoreError> {
    let file = std::fs::File::open(dir).map_err(|source| StoreError::CreateDir {
        path: dir.to_owned(),
        source,
    })?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(_, errno)| match errno {
            nix::errno::Errno::EWOULDBLOCK => StoreError::Locked {
                path: dir.to_owned(),
            },
            other => StoreError::Lock {
                path: dir.to_owned(),
                source: std::io::Error::from(other),
            },
        },
    )
}

/// Writes `bytes` to `path` so that a crash or power cut at any moment leaves either the old file
/// or the new one, never a mix (as SPIRE's `AtomicWritePrivateFile`): a private (0600) temporary
/// file beside it, fsynced, renamed over `path`, and the directory fsynced so the rename is
/// durable. A failed write removes its temporary file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomically_with_mode(path, bytes, 0o600)
}

/// [`write_atomically`] with the new file's `mode` (before the umask), for a file that is not
/// private (the metrics textfile, 0644).
pub fn write_atomically_with_mode(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = temporary_name(path);
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)?;
        sync_dir(path.parent().unwrap_or(Path::new(".")))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The temporary file [`write_atomically`] uses for `path`.
fn temporary_name(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Removes a temporary file a killed [`write_atomically`] left behind.
pub fn remove_temporary(path: &Path) {
    let _ = std::fs::remove_file(temporary_name(path));
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Whether sled's `conf` in `sled_dir` is damaged, and why. sled 0.34 writes its settings there
/// followed by their CRC-32 (little-endian); it only warns about a bad checksum, and takes a file
/// of 8 bytes or less for none (rewriting it in place, without truncating what was there).
pub fn damaged_sled_conf(sled_dir: &Path) -> Option<String> {
    let bytes = std::fs::read(sled_dir.join("conf")).ok()?;
    if bytes.len() <= 8 {
        return Some(format!("it is {} bytes long", bytes.len()));
    }
    let (content, crc) = bytes.split_at(bytes.len() - 4);
    let expected = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    (crc32fast::hash(content) != expected).then(|| "its checksum does not match".to_owned())
}

/// What the opening marker says about the previous start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Marker {
    /// The previous open finished (or there was none).
    Absent,
    /// `starts` starts in a row died while sled was opening the store: killed, or crashed
    /// without a panic (an abort, a segfault).
    Died { starts: u32 },
    /// The previous start panicked inside sled's open (the panic hook wrote this).
    Panicked(String),
}

/// Reads the marker at `path`.
pub fn read_marker(path: &Path) -> Marker {
    match std::fs::read_to_string(path) {
        Err(_) => Marker::Absent,
        Ok(text) => match text.split_once(' ') {
            Some(("panic", message)) => Marker::Panicked(message.trim().to_owned()),
            Some(("starts", n)) => Marker::Died {
                starts: n.trim().parse().unwrap_or(1),
            },
            // An empty or unreadable marker (the previous layout wrote an empty one).
            _ => Marker::Died { starts: 1 },
        },
    }
}

/// Records that a start (the `starts`-th in a row) is opening sled. Best effort: on a full or
/// read-only disk the marker cannot be written, and the store is opened without it.
pub fn write_marker(path: &Path, starts: u32) {
    let _ = std::fs::write(path, format!("starts {starts}\n"));
}

/// Records, from the panic hook, that sled panicked while opening. Only when the marker exists:
/// a panic elsewhere is not the store's.
pub fn mark_panic(path: &Path, message: &str) {
    if path.exists() {
        let one_line: String = message.replace('\n', " ").chars().take(500).collect();
        let _ = std::fs::write(path, format!("panic {one_line}\n"));
    }
}

/// Moves the store at `path` to `store.broken-<now>` beside it and deletes all but the newest
/// [`KEEP_MOVED_ASIDE`] moved-aside stores.
pub fn move_aside(path: &Path, now: i64) -> Result<PathBuf, StoreError> {
    let mut moved_to = path.with_file_name(format!("store.broken-{now}"));
    let mut n = 1;
    while moved_to.exists() {
        moved_to = path.with_file_name(format!("store.broken-{now}-{n}"));
        n += 1;
    }
    std::fs::rename(path, &moved_to).map_err(|source| StoreError::MoveAside {
        from: path.to_owned(),
        to: moved_to.clone(),
        source,
    })?;
    if let Some(dir) = path.parent() {
        prune_moved_aside(dir);
    }
    Ok(moved_to)
}

/// Deletes all but the newest [`KEEP_MOVED_ASIDE`] `store.broken-<time>[-<n>]` in `dir`, newest
/// by the time in the name (when it was moved aside).
fn prune_moved_aside(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut moved: Vec<((i64, u32), PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let stamp = name.strip_prefix("store.broken-")?;
            let (time, n) = stamp.split_once('-').unwrap_or((stamp, "0"));
            Some(((time.parse().ok()?, n.parse().ok()?), e.path()))
        })
        .collect();
    moved.sort();
    let excess = moved.len().saturating_sub(KEEP_MOVED_ASIDE);
    for (_, path) in moved.into_iter().take(excess) {
        match std::fs::remove_dir_all(&path) {
            Ok(()) => tracing::info!(path = %path.display(), "deleted an old moved-aside store"),
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "cannot delete an old moved-aside store")
            }
        }
    }
}

/// Sets 0700 on `dir` and its subdirectories and 0600 on every file below it.
pub fn restrict_permissions(dir: &Path) -> std::io::Result<()> {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    for entry in std::fs::read_dir(dir)?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            restrict_permissions(&path)?;
        } else {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_atomic_write_replaces_the_file_whole_and_private() {
        let (_dir, path) = crate::test_support::temp_path("copy");
        write_atomically(&path, b"one").expect("write");
        write_atomically(&path, b"two").expect("write");
        assert_eq!(std::fs::read(&path).expect("read"), b"two");
        assert_eq!(crate::test_support::mode_of(&path), 0o600);
        assert!(!temporary_name(&path).exists());
    }

    #[test]
    fn markers_read_back_what_was_written() {
        let (_dir, path) = crate::test_support::temp_path("marker");
        assert_eq!(read_marker(&path), Marker::Absent);
        write_marker(&path, 2);
        assert_eq!(read_marker(&path), Marker::Died { starts: 2 });
        mark_panic(&path, "index out of bounds\nat sled");
        assert_eq!(
            read_marker(&path),
            Marker::Panicked("index out of bounds at sled".into())
        );
        std::fs::remove_file(&path).expect("rm");
        mark_panic(&path, "elsewhere");
        assert_eq!(read_marker(&path), Marker::Absent, "no marker, no mark");
        std::fs::write(&path, b"").expect("old layout");
        assert_eq!(read_marker(&path), Marker::Died { starts: 1 });
    }

    #[test]
    fn at_most_a_few_moved_aside_stores_are_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        for i in 0..5 {
            let store = dir.path().join("store");
            std::fs::create_dir(&store).expect("mkdir");
            let moved = move_aside(&store, 1000 + i).expect("move");
            assert!(moved.exists());
        }
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("read_dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left.len(), KEEP_MOVED_ASIDE, "{left:?}");
        assert!(left.contains(&"store.broken-1004".to_owned()), "{left:?}");
    }
}
