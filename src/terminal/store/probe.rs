//! Opens sled in a child process, to tell a start that was killed inside sled's open from a store
//! that crashes sled there. A store that makes sled abort, overflow its stack or hang does so
//! every time, so a child opening it alone dies (or hangs) too; a start that was killed leaves a
//! store that the child opens. Owns the protocol with the child (the daemon's own binary, with
//! [`PROBE_ENV`] naming the state directory) and the time limit. It must not decide what happens
//! to the store: [`super::open_guarded`] does.

use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Set on the child to the state directory whose sled it opens; the binary's `main` looks for it
/// before parsing the command line.
pub const PROBE_ENV: &str = "AUTHINFOD_STORE_PROBE";
/// Set on the child to the parent's pid: a child whose parent is already gone exits.
pub const PROBE_PARENT_ENV: &str = "AUTHINFOD_STORE_PROBE_PARENT";
/// How long the child may take. Opening a store of a few KiB takes milliseconds; a child still
/// opening after this is taken for one that hangs on the store.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// The child's exit code when sled opened and read the store.
const OPENED: u8 = 0;
/// The child's exit code when sled returned an error (or the parent was gone).
const SLED_ERROR: u8 = 1;
/// The conventional exit status of a program that could not be executed.
const EXEC_FAILED: u8 = 127;

/// What the child found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// sled opened and read the store: the start that died there was killed, not crashed by it.
    Opened,
    /// sled returned an error: not a crash; the start's own open tells damage from trouble.
    SledError,
    /// The child died inside sled's open (how), or did not finish in time: the store crashes
    /// sled.
    Died(String),
    /// No child could be run (why): the caller falls back to counting deaths.
    Unavailable(String),
}

/// Runs `program` as the probe of the store under `state_dir` and waits up to `timeout`.
pub fn run(program: &Path, state_dir: &Path, timeout: Duration) -> Outcome {
    let spawned = Command::new(program)
        .env(PROBE_ENV, state_dir)
        .env(PROBE_PARENT_ENV, std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // A panic message or sled's error goes where the daemon's own log goes.
        .stderr(Stdio::inherit())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => return Outcome::Unavailable(format!("cannot run {}: {e}", program.display())),
    };
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return outcome(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Outcome::Died(format!(
                    "it was still opening after {}",
                    crate::units::format_duration(timeout)
                ));
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Outcome::Unavailable(format!("cannot wait for the probe: {e}"));
            }
        }
    }
}

fn outcome(status: ExitStatus) -> Outcome {
    if let Some(signal) = status.signal() {
        let name = nix::sys::signal::Signal::try_from(signal)
            .map_or_else(|_| format!("signal {signal}"), |s| s.as_str().to_owned());
        return Outcome::Died(format!("killed by {name}"));
    }
    match status.code().and_then(|c| u8::try_from(c).ok()) {
        Some(OPENED) => Outcome::Opened,
        Some(SLED_ERROR) => Outcome::SledError,
        // The program could not be executed: how a failed exec shows where a wrapper starts it
        // (qemu-user under binfmt, a shell). The probe itself never exits 127.
        Some(EXEC_FAILED) => Outcome::Unavailable(format!("it could not be executed ({status})")),
        _ => Outcome::Died(format!("it exited with {status}")),
    }
}

/// The child's side: opens and reads sled under `state_dir` and returns the exit code. Dies with
/// its parent (a probe left behind would hold sled's lock); exits at once when `parent` is no
/// longer its parent.
pub fn child(state_dir: &Path, parent: Option<u32>) -> u8 {
    // (Linux only in nix; on Android the parent check below is all.)
    #[cfg(target_os = "linux")]
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    if parent.is_some_and(|p| p != std::os::unix::process::parent_id()) {
        return SLED_ERROR;
    }
    open_and_read(state_dir)
}

fn open_and_read(state_dir: &Path) -> u8 {
    let paths = super::Paths::new(state_dir);
    match super::open_sled(&paths.sled).and_then(|db| super::recover::read_sled(&db)) {
        Ok(_) => OPENED,
        Err(e) => {
            eprintln!(
                "authinfod: store probe: sled cannot open {}: {}",
                paths.sled.display(),
                crate::error_chain(&e)
            );
            SLED_ERROR
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(dir: &Path, name: &str, body: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        crate::test_support::write_file(&path, format!("#!/bin/sh\n{body}\n"), 0o755);
        path
    }

    #[test]
    fn the_childs_exit_tells_opened_sled_error_and_died_apart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path();
        let cases = [
            ("opens", "exit 0", Outcome::Opened),
            ("errs", "exit 1", Outcome::SledError),
            (
                "aborts",
                "kill -ABRT $$",
                Outcome::Died("killed by SIGABRT".into()),
            ),
            (
                "panics",
                "exit 101",
                Outcome::Died("it exited with exit status: 101".into()),
            ),
        ];
        for (name, body, want) in cases {
            let program = script(dir.path(), name, body);
            assert_eq!(run(&program, state, TIMEOUT), want, "{name}");
        }
    }

    #[test]
    fn a_probe_that_hangs_is_killed_and_counts_as_died() {
        let dir = tempfile::tempdir().expect("tempdir");
        let program = script(dir.path(), "hangs", "exec sleep 30");
        let started = Instant::now();
        let got = run(&program, dir.path(), Duration::from_millis(200));
        assert!(
            matches!(&got, Outcome::Died(why) if why.contains("still opening")),
            "{got:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    /// A failed exec reported as exit status 127 (qemu-user, a wrapper shell) is "cannot run",
    /// not a death inside sled's open.
    #[test]
    fn exit_127_is_a_probe_that_could_not_run() {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("exec-failed");
        crate::test_support::write_file(&script, "#!/bin/sh\nexit 127\n", 0o700);
        let got = run(&script, dir.path(), TIMEOUT);
        assert!(matches!(got, Outcome::Unavailable(_)), "{got:?}");
    }

    #[test]
    fn a_probe_that_cannot_run_is_unavailable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let got = run(&dir.path().join("missing"), dir.path(), TIMEOUT);
        assert!(matches!(got, Outcome::Unavailable(_)), "{got:?}");
    }

    /// The child's side, in this process: a store sled opens, and one it refuses.
    #[test]
    fn the_child_opens_a_good_store_and_reports_a_refused_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(super::super::Store::open(dir.path()).expect("open"));
        assert_eq!(open_and_read(dir.path()), OPENED);
        std::fs::write(dir.path().join("store").join("db"), b"not a sled file").expect("damage");
        assert_eq!(open_and_read(dir.path()), SLED_ERROR);
    }
}
