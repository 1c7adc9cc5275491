//! The command line of `authinfod`: the clap definitions, the exit codes and the environment
//! the daemon reads, and nothing that runs. `examples/gen-docs.rs` includes this file too
//! (`#[path]`), to write the man pages and shell completions from the same definitions, so
//! every help text here is also documentation.

use std::path::PathBuf;

use authinfod::help_table;
use authinfod::terminal::config;
use clap::{Parser, Subcommand};

/// Exit codes: the shared ones (sysexits.h where one fits) and the daemon's own.
pub mod exit {
    pub use authinfod::exit::*;
    /// `get`: no authinfo is held, or only an expired one; `refresh --wait`: the refresh failed.
    pub const NO_AUTHINFO: u8 = 3;
    /// EX_TEMPFAIL: `refresh`: the daemon's forced-refresh limit holds it; try again later.
    pub const TEMPFAIL: u8 = 75;
}

/// Every exit code and what it means, for `--help` and the man page's EXIT STATUS.
pub const EXIT_STATUS: &[(u8, &str)] = &[
    (0, "ok"),
    (exit::FAILURE, "failure"),
    (exit::USAGE, "usage error"),
    (
        exit::NO_AUTHINFO,
        "no authinfo held, or only an expired one (get); the refresh failed (refresh --wait)",
    ),
    (
        exit::UNAVAILABLE,
        "the daemon cannot be reached (client commands)",
    ),
    (
        exit::TEMPFAIL,
        "refresh: not started, the forced-refresh limit holds it; the message says when the next is allowed",
    ),
    (
        exit::CONFIG,
        "the configuration, or a file it names, is invalid",
    ),
];

/// The environment `authinfod run` reads, for `run --help` and the man pages' ENVIRONMENT.
pub const RUN_ENVIRONMENT: &[(&str, &str)] = &[
    (
        "RUST_LOG",
        "Log filter in tracing's EnvFilter syntax, e.g. debug or authinfod=debug,warn (default: info). An invalid filter falls back to the default.",
    ),
    (
        "JOURNAL_STREAM",
        "Set by systemd when standard error is the journal (device:inode): the daemon then logs to journald with structured fields; otherwise, plain lines on standard error.",
    ),
    (
        "NOTIFY_SOCKET",
        "Set by systemd for Type=notify: READY=1 once the store is loaded and the socket bound, STATUS= one line, STOPPING=1 on SIGTERM. Unset (another supervisor): no notifications.",
    ),
    (
        "WATCHDOG_USEC, WATCHDOG_PID",
        "Set by systemd with WatchdogSec=: WATCHDOG=1 every half period while both the refresh loop and the socket loop report in.",
    ),
];

#[derive(Debug, Parser)]
#[command(
    name = "authinfod",
    version,
    about = "Keeps a fresh WeChat Pay offline-face authinfo on a face-payment terminal and serves it over a Unix socket.",
    after_help = help_table("Exit codes", EXIT_STATUS)
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Args)]
pub struct SocketArgs {
    /// The daemon's socket (a path or @abstract-name); default: the config's, else /run/authinfod/authinfod.sock.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<String>,
    /// Config file to read the socket path from (not read with --socket).
    #[arg(long, value_name = "FILE", default_value = config::DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (under systemd: Type=notify); SIGHUP reloads the allow-list, the proxy CA
    /// and log_level.
    #[command(after_help = help_table("Environment", RUN_ENVIRONMENT))]
    Run {
        /// The configuration file.
        #[arg(long, short, value_name = "FILE", default_value = config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// For provisioning: fetch an authinfo and the device health once, persist them and
        /// exit (0, or 3 when the refresh failed, with the reason); the socket is not started.
        #[arg(long)]
        once: bool,
    },
    /// Validate a config file and list every invalid field (exit 78 if any).
    CheckConfig {
        /// The configuration file to check.
        #[arg(value_name = "FILE", default_value = config::DEFAULT_CONFIG_PATH)]
        file: PathBuf,
    },
    /// Make the device's RSA-2048 key (a 0600 file, or inside a PKCS#11 token) and print its public key for enrolment.
    Keygen {
        /// Where to write the private key; missing parent directories are created (0700).
        #[arg(
            long,
            value_name = "FILE",
            required_unless_present = "pkcs11",
            conflicts_with = "pkcs11"
        )]
        out: Option<PathBuf>,
        /// Generate the key inside the PKCS#11 token this RFC 7512 URI names (sensitive, never extractable): pkcs11:token=terminal;object=device followed by ?module-path= and &pin-source=file: (README, Hardware-backed keys); key_file then takes the same URI.
        #[arg(long, value_name = "URI")]
        pkcs11: Option<String>,
        /// Replace an existing key (its enrolment at the proxy stops working).
        #[arg(long)]
        force: bool,
        /// Device id to put in the printed registry entry.
        #[arg(long, value_name = "ID")]
        device_id: Option<String>,
    },
    /// Show the daemon's status: authinfo, refresh, raw_data, proxy, device health.
    Status {
        /// Print the raw status JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Print the held authinfo (exit 3 when there is none).
    Get {
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Ask for a refresh now.
    Refresh {
        /// Wait for the refresh and report its outcome (exit 3 if it failed). Either way, a
        /// refresh the forced-refresh limit holds is not started (exit 75, and when the next
        /// one is allowed).
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Hand the daemon the face SDK's raw_data (argument, or standard input when absent).
    PutRawData {
        /// The raw_data string from the face SDK; read from standard input when absent.
        #[arg(value_name = "RAW_DATA")]
        raw_data: Option<String>,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Run the whole chain (sandbox platforms, proxy, daemon) in this process and tell its story.
    #[cfg(feature = "merchant")]
    Demo {
        /// How long to keep running after the story (e.g. 60s, 5m); Ctrl-C stops earlier.
        #[arg(long, value_name = "DURATION", default_value = "60s")]
        duration: String,
    },
}
