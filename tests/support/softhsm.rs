//! SoftHSM2 tokens for the PKCS#11 tests, each test with its own token directory.
//!
//! SoftHSM reads its configuration (`SOFTHSM2_CONF`, which names the token directory) once, when
//! a process first initialises the module, and PKCS#11 initialises a module once per process.
//! A test that signs in this process therefore runs in a child of this test binary, started by
//! [`SoftHsm::enter`] with `SOFTHSM2_CONF` pointing into a temporary directory of its own: every
//! test has its own tokens, and tests run in parallel without seeing each other's. A test that
//! only runs the binaries hands them the variable ([`SoftHsm::command`]) and needs no child.
//!
//! When SoftHSM2 is not installed (Debian: `softhsm2`) the tests say so on one line and pass
//! without checking anything: `scripts/setup` installs it, so CI always runs them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The variable that tells a child of this binary the SoftHSM directory it runs in.
const CHILD_DIR: &str = "AUTHINFOD_TEST_SOFTHSM_DIR";

/// The user PIN of every test token, and its SO PIN.
pub const PIN: &str = "246810";
pub const SO_PIN: &str = "13579111";

/// SoftHSM's module for this test binary's architecture (Debian's multiarch path): an aarch64
/// test binary under qemu cannot load the host's x86_64 module, and skips.
pub fn module() -> PathBuf {
    let triple = if cfg!(target_arch = "x86_64") {
        "x86_64-linux-gnu"
    } else if cfg!(target_arch = "aarch64") {
        "aarch64-linux-gnu"
    } else if cfg!(target_arch = "arm") {
        "arm-linux-gnueabihf"
    } else {
        "unknown"
    };
    PathBuf::from(format!("/usr/lib/{triple}/softhsm/libsofthsm2.so"))
}

/// Why the SoftHSM tests cannot run here, if they cannot.
fn missing() -> Option<String> {
    let util = Command::new("softhsm2-util").arg("--version").output();
    if !util.is_ok_and(|o| o.status.success()) {
        return Some("softhsm2-util is not on PATH".into());
    }
    let module = module();
    if !module.exists() {
        return Some(format!("{} does not exist", module.display()));
    }
    None
}

/// A SoftHSM2 installation confined to one temporary directory.
#[derive(Debug)]
pub struct SoftHsm {
    pub dir: PathBuf,
    /// Kept alive in the parent (the child only borrows the directory).
    _temp: Option<tempfile::TempDir>,
}

impl SoftHsm {
    /// A fresh SoftHSM directory for a test that runs the binaries; `None` (and a line saying
    /// why) when SoftHSM2 is not installed.
    pub fn new(test: &str) -> Option<Self> {
        Self::with_config(test, "")
    }

    /// [`new`](Self::new) with `extra` lines in `softhsm2.conf` (`slots.mechanisms = ...`).
    pub fn with_config(test: &str, extra: &str) -> Option<Self> {
        if let Some(why) = missing() {
            eprintln!(
                "{test}: SKIPPED: SoftHSM2 is not installed ({why}; apt-get install softhsm2, or run scripts/setup)"
            );
            return None;
        }
        let temp = tempfile::tempdir().expect("tempdir");
        let hsm = Self {
            dir: temp.path().to_owned(),
            _temp: Some(temp),
        };
        hsm.write_config(extra);
        Some(hsm)
    }

    /// For a test that signs in this process: in the parent, runs the test `test` (its full
    /// name, `pkcs11::...`) again in a child of this binary with a SoftHSM directory of its own,
    /// fails if the child fails, and returns `None`; in that child, returns the directory.
    /// `None` too (with a line) when SoftHSM2 is not installed.
    pub fn enter(test: &str) -> Option<Self> {
        if let Some(dir) = std::env::var_os(CHILD_DIR) {
            return Some(Self {
                dir: PathBuf::from(dir),
                _temp: None,
            });
        }
        let hsm = Self::new(test)?;
        let out = Command::new(std::env::current_exe().expect("this test binary"))
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_DIR, &hsm.dir)
            .env("SOFTHSM2_CONF", hsm.config())
            .output()
            .expect("run this test binary again");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "{test} in its SoftHSM child: {}\n--- stdout\n{stdout}\n--- stderr\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        None
    }

    pub fn config(&self) -> PathBuf {
        self.dir.join("softhsm2.conf")
    }

    fn tokens(&self) -> PathBuf {
        self.dir.join("tokens")
    }

    fn write_config(&self, extra: &str) {
        std::fs::create_dir_all(self.tokens()).expect("token directory");
        std::fs::write(
            self.config(),
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = true\n{extra}\n",
                self.tokens().display()
            ),
        )
        .expect("softhsm2.conf");
    }

    /// `softhsm2-util` (or another SoftHSM tool) with this directory's configuration.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new(program);
        command.env("SOFTHSM2_CONF", self.config());
        command
    }

    fn util(&self, args: &[&str]) -> Output {
        let out = self
            .command("softhsm2-util")
            .args(args)
            .output()
            .expect("run softhsm2-util");
        assert!(
            out.status.success(),
            "softhsm2-util {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Initialises a token labelled `label` with [`PIN`]; returns the directory SoftHSM keeps
    /// it in (the one that appeared).
    pub fn init_token(&self, label: &str) -> PathBuf {
        let before = self.token_dirs();
        self.util(&[
            "--init-token",
            "--free",
            "--label",
            label,
            "--pin",
            PIN,
            "--so-pin",
            SO_PIN,
        ]);
        let mut new: Vec<_> = self
            .token_dirs()
            .into_iter()
            .filter(|d| !before.contains(d))
            .collect();
        assert_eq!(new.len(), 1, "one new token directory: {new:?}");
        new.remove(0)
    }

    fn token_dirs(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.tokens())
            .expect("token directory")
            .map(|e| e.expect("entry").path())
            .collect()
    }

    /// Imports a PKCS#8 PEM private key (and its public half) into token `token` as `object`
    /// with id `id` (hex): how a merchant puts a key WeChat Pay's tool made into an HSM.
    pub fn import(&self, token: &str, object: &str, id: &str, private_pem: &str) {
        let pem = self.dir.join(format!("{object}.pem"));
        std::fs::write(&pem, private_pem).expect("key file");
        self.util(&[
            "--import",
            &pem.to_string_lossy(),
            "--token",
            token,
            "--label",
            object,
            "--id",
            id,
            "--pin",
            PIN,
        ]);
        std::fs::remove_file(&pem).expect("remove the key file");
    }

    /// A PIN file (0600) holding `pin`; its path.
    pub fn pin_file(&self, name: &str, pin: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let path = self.dir.join(name);
        std::fs::write(&path, format!("{pin}\n")).expect("pin file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        path
    }

    /// The URI of `object` in `token`, its PIN in the file [`pin_file`](Self::pin_file) made.
    pub fn uri(&self, token: &str, object: &str, pin_file: &Path) -> String {
        format!(
            "pkcs11:token={token};object={object}?module-path={}&pin-source=file:{}",
            module().display(),
            pin_file.display()
        )
    }

    /// Every attribute SoftHSM stores for each object of the token in `token_dir`, as
    /// `softhsm2-dump-file` shows them: an independent look at what the token holds.
    pub fn dump_objects(&self, token_dir: &Path) -> Vec<String> {
        let mut dumps = Vec::new();
        for entry in std::fs::read_dir(token_dir).expect("token") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "object")
                && path.file_name().is_some_and(|n| n != "token.object")
            {
                let out = self
                    .command("softhsm2-dump-file")
                    .arg(&path)
                    .output()
                    .expect("run softhsm2-dump-file");
                dumps.push(String::from_utf8_lossy(&out.stdout).into_owned());
            }
        }
        dumps
    }
}
