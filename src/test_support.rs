//! Helpers the unit tests of several modules share: a path in a fresh folder, a file written
//! with a given mode and a file's mode read back, and
//! running the independent implementations (openssl, python3's cryptography) the known-answer
//! tests compare with. Compiled for tests only.

use std::path::{Path, PathBuf};

/// A fresh temporary folder and the path of `name` in it; the folder goes when the guard drops.
pub(crate) fn temp_path(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(name);
    (dir, path)
}

/// The permission bits of `path` (`0o600`).
pub(crate) fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

/// Writes `contents` to `path` and sets its mode to `mode` (whatever the umask).
pub(crate) fn write_file(path: &Path, contents: impl AsRef<[u8]>, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, contents).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Runs `program` with `args` and `input` on its stdin; asserts that it succeeded (its stderr
/// and `hint` say why not) and returns its stdout.
pub(crate) fn run_piped(program: &str, args: &[&str], input: &[u8], hint: &str) -> Vec<u8> {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program} must be installed ({hint}): {e}"));
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(input)
        .expect("write");
    let out = child.wait_with_output().expect(program);
    assert!(
        out.status.success(),
        "{program} failed ({hint}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}
