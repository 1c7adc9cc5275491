//! Writes the man pages and shell completions of `authinfod` and `authinfo-proxy` from their
//! clap definitions (`src/bin/*/cli.rs`, included below), on the build machine:
//!
//! ```text
//! cargo run --example gen-docs -- OUT_DIR
//!   OUT_DIR/man/man1/authinfod.1, authinfod-run.1, ... authinfo-proxy.1, authinfo-proxy-serve.1, ...
//!   OUT_DIR/completions/bash/authinfod   OUT_DIR/completions/zsh/_authinfod
//!   OUT_DIR/completions/fish/authinfod.fish   (and the same three for authinfo-proxy)
//! ```
//!
//! `scripts/package-deb build` runs it and installs the `authinfod` ones in the terminal package.
//!
//! Why an example and not a hidden `authinfod` subcommand: the package is built on the build
//! machine from a cross-compiled binary that cannot run there (an ARM `authinfod` would need
//! qemu), and a subcommand would link clap_mangen, clap_complete and roff into the terminal
//! binary, which has a size budget, for something no terminal ever runs. As an example it is
//! built by `cargo test` (so it always compiles), never by `cargo build`, and its two crates are
//! dev-dependencies. Why not a build script: it would run on every build of every target, and
//! a build script may only write into `OUT_DIR`.
//!
//! The `authinfod` pages and completions describe the terminal build (`--no-default-features`),
//! which is the one the package ships: without the merchant-only `demo`.
//!
//! The tests here (`cargo test` runs them: `test = true` in Cargo.toml) hold both command lines
//! to their documentation: every argument and subcommand has a help text, `run --help` names
//! the environment the daemon reads, and the generated files have what the package needs.

use std::path::{Path, PathBuf};

use clap::{Command, CommandFactory as _};
use clap_complete::Shell;
use clap_mangen::Man;
use clap_mangen::roff::{Roff, bold, roman};

// The binaries read every field of these types; this example only builds their `Command`s.
#[allow(dead_code)]
#[path = "../src/bin/authinfod/cli.rs"]
mod authinfod_cli;
#[allow(dead_code)]
#[path = "../src/bin/authinfo-proxy/cli.rs"]
mod proxy_cli;

/// Subcommands of `authinfod` that only the merchant build (feature `merchant`) has.
const MERCHANT_ONLY: &[&str] = &["demo"];

/// The files `authinfod` uses, for its man page's FILES.
const AUTHINFOD_FILES: &[(&str, &str)] = &[
    (
        authinfod::terminal::config::DEFAULT_CONFIG_PATH,
        "The configuration (the Debian package's conffile; see the annotated example in it).",
    ),
    (
        "/var/lib/authinfod/",
        "The state directory (0700): the sled store, the crash-safe copy of the last good authinfo, and by convention the device key, device.key (0600).",
    ),
    (
        "/run/authinfod/authinfod.sock",
        "The face app's socket (0660), the default [socket] path.",
    ),
    (
        "/lib/systemd/system/authinfod.service",
        "The systemd unit (Type=notify, sandboxed); site changes go in a drop-in (systemctl edit authinfod).",
    ),
];

/// The files `authinfo-proxy` uses, for its man page's FILES.
const PROXY_FILES: &[(&str, &str)] = &[
    (
        authinfod::proxy::config::DEFAULT_CONFIG_PATH,
        "The configuration: listeners, the platform keys' files, the device registry's path.",
    ),
    (
        "/var/lib/authinfo-proxy/",
        "Caches (the fleet list); nothing in it is needed to start.",
    ),
];

fn main() -> std::process::ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        eprintln!("usage: cargo run --example gen-docs -- OUT_DIR");
        return std::process::ExitCode::from(2);
    };
    match generate(Path::new(&out)) {
        Ok(written) => {
            for path in written {
                println!("{}", path.display());
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gen-docs: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Writes every man page and completion under `out`; returns the paths written.
fn generate(out: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let man = out.join("man/man1");
    std::fs::create_dir_all(&man)?;
    written.extend(man_pages(terminal_authinfod(), &authinfod_sections, &man)?);
    written.extend(man_pages(proxy_cli::Cli::command(), &proxy_sections, &man)?);
    for (name, cmd) in [
        ("authinfod", terminal_authinfod()),
        ("authinfo-proxy", proxy_cli::Cli::command()),
    ] {
        for (shell, dir, file) in completion_files(name) {
            let dir = out.join("completions").join(dir);
            std::fs::create_dir_all(&dir)?;
            let path = dir.join(file);
            std::fs::write(&path, completion(shell, cmd.clone(), name))?;
            written.push(path);
        }
    }
    Ok(written)
}

/// `authinfod` as the terminal build has it: the full command without [`MERCHANT_ONLY`].
/// (clap can hide a subcommand, but the completion generators still offer hidden ones, so the
/// top level is rebuilt; `terminal_help_is_the_full_help_without_demo` checks the copy.)
fn terminal_authinfod() -> Command {
    let full = authinfod_cli::Cli::command();
    // The derive's name and `version` (CARGO_PKG_VERSION); clap takes only static strings.
    let mut cmd = Command::new("authinfod")
        .version(env!("CARGO_PKG_VERSION"))
        .subcommand_required(full.is_subcommand_required_set())
        .arg_required_else_help(full.is_arg_required_else_help_set())
        .args(full.get_arguments().cloned())
        .subcommands(
            full.get_subcommands()
                .filter(|s| !MERCHANT_ONLY.contains(&s.get_name()))
                .cloned(),
        );
    if let Some(a) = full.get_about() {
        cmd = cmd.about(a.clone());
    }
    if let Some(a) = full.get_long_about() {
        cmd = cmd.long_about(a.clone());
    }
    if let Some(a) = full.get_after_help() {
        cmd = cmd.after_help(a.clone());
    }
    if let Some(a) = full.get_after_long_help() {
        cmd = cmd.after_long_help(a.clone());
    }
    cmd
}

/// Where Debian's bash-completion, zsh and fish look for a command's completions.
fn completion_files(name: &str) -> [(Shell, &'static str, String); 3] {
    [
        (Shell::Bash, "bash", name.to_owned()),
        (Shell::Zsh, "zsh", format!("_{name}")),
        (Shell::Fish, "fish", format!("{name}.fish")),
    ]
}

fn completion(shell: Shell, mut cmd: Command, name: &str) -> Vec<u8> {
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut buf);
    buf
}

/// What a page has beyond what clap knows: `(heading, rows)` sections and SEE ALSO entries.
struct Sections {
    tables: Vec<(&'static str, Vec<(String, &'static str)>)>,
    see_also: Vec<&'static str>,
}

/// `page` is the page's name: `authinfod`, `authinfod-run`, ...
fn authinfod_sections(page: &str) -> Sections {
    let environment = || table(authinfod_cli::RUN_ENVIRONMENT);
    match page {
        "authinfod" => Sections {
            tables: vec![
                ("ENVIRONMENT", environment()),
                ("FILES", table(AUTHINFOD_FILES)),
                ("EXIT STATUS", table(authinfod_cli::EXIT_STATUS)),
            ],
            see_also: vec![
                "authinfod-run(1)",
                "systemd.service(5)",
                "journalctl(1)",
                "/usr/share/doc/authinfod/README.md",
            ],
        },
        "authinfod-run" => Sections {
            tables: vec![("ENVIRONMENT", environment())],
            see_also: vec!["authinfod(1)", "sd_notify(3)", "systemd.exec(5)"],
        },
        _ => Sections {
            tables: vec![],
            see_also: vec!["authinfod(1)"],
        },
    }
}

fn proxy_sections(page: &str) -> Sections {
    let environment = || table(proxy_cli::SERVE_ENVIRONMENT);
    match page {
        "authinfo-proxy" => Sections {
            tables: vec![
                ("ENVIRONMENT", environment()),
                ("FILES", table(PROXY_FILES)),
                ("EXIT STATUS", table(proxy_cli::EXIT_STATUS)),
            ],
            see_also: vec!["authinfo-proxy-serve(1)", "authinfod(1)"],
        },
        "authinfo-proxy-serve" => Sections {
            tables: vec![("ENVIRONMENT", environment())],
            see_also: vec!["authinfo-proxy(1)", "systemd.exec(5)"],
        },
        _ => Sections {
            tables: vec![],
            see_also: vec!["authinfo-proxy(1)"],
        },
    }
}

fn table<K: ToString>(rows: &[(K, &'static str)]) -> Vec<(String, &'static str)> {
    rows.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// One page for `cmd` and one per visible subcommand (`authinfod-run.1`, ...), as
/// `clap_mangen::generate_to` makes them, with the [`Sections`] in place of clap_mangen's
/// EXTRA section: the `after_help` texts are those tables as `--help` shows them.
fn man_pages(
    cmd: Command,
    sections: &dyn Fn(&str) -> Sections,
    dir: &Path,
) -> std::io::Result<Vec<PathBuf>> {
    // The pages list the subcommands themselves; `help` is the same as `--help`.
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    // Every page names the program and its version (clap_mangen's default for a subcommand's
    // page is the subcommand's bare name).
    let source = format!(
        "{} {}",
        cmd.get_name(),
        cmd.get_version().unwrap_or_default()
    );
    let mut written = Vec::new();
    let mut pages = vec![cmd];
    while let Some(cmd) = pages.pop() {
        pages.extend(cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
        let man = Man::new(cmd.clone()).source(source.clone());
        let path = dir.join(man.get_filename());
        let name = cmd.get_display_name().unwrap_or(cmd.get_name()).to_owned();
        let mut page = Vec::new();
        render_page(&man, &cmd, &sections(&name), &mut page)?;
        std::fs::write(&path, page)?;
        written.push(path);
    }
    Ok(written)
}

fn render_page(
    man: &Man,
    cmd: &Command,
    sections: &Sections,
    w: &mut dyn std::io::Write,
) -> std::io::Result<()> {
    man.render_title(w)?;
    man.render_name_section(w)?;
    man.render_synopsis_section(w)?;
    man.render_description_section(w)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(w)?;
    }
    if cmd.get_subcommands().any(|s| !s.is_hide_set()) {
        man.render_subcommands_section(w)?;
    }
    let mut roff = Roff::new();
    for (heading, rows) in &sections.tables {
        roff.control("SH", [*heading]);
        for (name, meaning) in rows {
            roff.control("TP", []);
            roff.text([bold(name.as_str())]);
            roff.text([roman(*meaning)]);
        }
    }
    if !sections.see_also.is_empty() {
        roff.control("SH", ["SEE ALSO"]);
        roff.text([roman(sections.see_also.join(", "))]);
    }
    roff.to_writer(w)?;
    if cmd.get_version().is_some() {
        man.render_version_section(w)?;
    }
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every argument and subcommand below `cmd` that has no help text, as `bin sub --arg`.
    fn undocumented(cmd: &Command) -> Vec<String> {
        fn walk(cmd: &Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    let name = match (arg.get_long(), arg.get_short()) {
                        (Some(long), _) => format!("--{long}"),
                        (None, Some(short)) => format!("-{short}"),
                        (None, None) => format!("<{}>", arg.get_id()),
                    };
                    missing.push(format!("{path} {name}"));
                }
            }
            for sub in cmd.get_subcommands() {
                let sub_path = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() && sub.get_long_about().is_none() {
                    missing.push(sub_path.clone());
                }
                walk(sub, &sub_path, missing);
            }
        }
        // Built, so that clap's own --help, --version and help subcommand are walked too.
        let mut cmd = cmd.clone();
        cmd.build();
        let mut missing = Vec::new();
        walk(&cmd, cmd.get_name(), &mut missing);
        missing
    }

    #[test]
    fn every_argument_and_subcommand_of_both_binaries_has_help() {
        for cmd in [
            authinfod_cli::Cli::command(),
            proxy_cli::Cli::command(),
            terminal_authinfod(),
        ] {
            assert_eq!(undocumented(&cmd), Vec::<String>::new(), "no help text");
        }
    }

    /// The walk above would pass on an empty tree: it must find what is missing.
    #[test]
    fn the_help_walk_names_an_undocumented_argument_and_subcommand() {
        let cmd = Command::new("t")
            .arg(clap::Arg::new("documented").long("documented").help("yes"))
            .subcommand(Command::new("bare").arg(clap::Arg::new("file")))
            .subcommand(
                Command::new("fine")
                    .about("ok")
                    .arg(clap::Arg::new("level").short('l')),
            );
        // `help bare` is clap's help subcommand, which takes its about from `bare`.
        assert_eq!(
            undocumented(&cmd),
            ["t bare", "t bare <file>", "t fine -l", "t help bare"]
        );
    }

    /// What `authinfod run --help` prints.
    fn run_help() -> String {
        let err = authinfod_cli::Cli::try_parse_from(["authinfod", "run", "--help"])
            .expect_err("--help stops parsing");
        assert_eq!(err.kind(), clap::error::ErrorKind::DisplayHelp);
        err.to_string()
    }

    use clap::Parser as _;

    #[test]
    fn run_help_names_the_environment_the_daemon_reads() {
        let help = run_help();
        for var in [
            "RUST_LOG",
            "JOURNAL_STREAM",
            "NOTIFY_SOCKET",
            "WATCHDOG_USEC",
        ] {
            assert!(
                help.contains(var),
                "run --help does not mention {var}:\n{help}"
            );
        }
    }

    #[test]
    fn terminal_help_is_the_full_help_without_demo() {
        let full = authinfod_cli::Cli::command().render_long_help().to_string();
        let terminal = terminal_authinfod().render_long_help().to_string();
        assert!(full.contains("\n  demo "), "{full}");
        let without_demo: Vec<&str> = full
            .lines()
            .filter(|l| !l.trim_start().starts_with("demo "))
            .collect();
        assert_eq!(terminal.lines().collect::<Vec<_>>(), without_demo);
        assert_eq!(
            terminal_authinfod().render_version(),
            authinfod_cli::Cli::command().render_version()
        );
        for (shell, _, _) in completion_files("authinfod") {
            let full = String::from_utf8(completion(
                shell,
                authinfod_cli::Cli::command(),
                "authinfod",
            ))
            .expect("utf-8");
            let terminal = String::from_utf8(completion(shell, terminal_authinfod(), "authinfod"))
                .expect("utf-8");
            assert!(
                full.contains("demo"),
                "{shell}: the full completion offers demo"
            );
            assert!(
                !terminal.contains("demo"),
                "{shell}: the terminal one must not"
            );
            assert!(terminal.contains("put-raw-data"), "{shell}");
        }
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn generate_writes_a_page_per_subcommand_with_its_sections_and_the_completions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let written = generate(dir.path()).expect("generate");
        let man = dir.path().join("man/man1");
        let mut pages: Vec<String> = std::fs::read_dir(&man)
            .expect("man dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        pages.sort();
        assert_eq!(
            pages,
            [
                "authinfo-proxy-certificates.1",
                "authinfo-proxy-check-config.1",
                "authinfo-proxy-devices.1",
                "authinfo-proxy-sandbox.1",
                "authinfo-proxy-serve.1",
                "authinfo-proxy-terminals.1",
                "authinfo-proxy.1",
                "authinfod-check-config.1",
                "authinfod-get.1",
                "authinfod-keygen.1",
                "authinfod-put-raw-data.1",
                "authinfod-refresh.1",
                "authinfod-run.1",
                "authinfod-status.1",
                "authinfod.1",
            ]
        );
        let top = read(&man.join("authinfod.1"));
        assert!(top.contains(".TH authinfod 1 "), "{top}");
        for needle in [
            ".SH ENVIRONMENT",
            ".SH FILES",
            "/etc/authinfod/authinfod.toml",
            ".SH \"EXIT STATUS\"",
            "authinfod\\-run(1)",
            ".SH \"SEE ALSO\"",
        ] {
            assert!(top.contains(needle), "authinfod.1 lacks {needle}:\n{top}");
        }
        assert!(
            !top.contains("demo"),
            "the terminal build has no demo:\n{top}"
        );
        assert!(!top.contains(".SH EXTRA"), "{top}");
        let run = read(&man.join("authinfod-run.1"));
        for needle in [
            "NOTIFY_SOCKET",
            "JOURNAL_STREAM",
            "RUST_LOG",
            "\\-\\-config",
        ] {
            assert!(
                run.contains(needle),
                "authinfod-run.1 lacks {needle}:\n{run}"
            );
        }
        let version = env!("CARGO_PKG_VERSION");
        assert!(
            run.contains(&format!(".TH authinfod-run 1  \"authinfod {version}\"")),
            "{run}"
        );
        let serve = read(&man.join("authinfo-proxy-serve.1"));
        assert!(serve.contains("JOURNAL_STREAM"), "{serve}");
        for path in [
            "completions/bash/authinfod",
            "completions/zsh/_authinfod",
            "completions/fish/authinfod.fish",
            "completions/bash/authinfo-proxy",
            "completions/zsh/_authinfo-proxy",
            "completions/fish/authinfo-proxy.fish",
        ] {
            let path = dir.path().join(path);
            assert!(written.contains(&path), "{} not reported", path.display());
            assert!(read(&path).contains("check-config"), "{}", path.display());
        }
        assert_eq!(written.len(), pages.len() + 6);
    }
}
