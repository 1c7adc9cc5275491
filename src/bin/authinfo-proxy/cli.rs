//! The command line of `authinfo-proxy`: the clap definitions, the exit codes and the
//! environment the proxy reads, and nothing that runs. `examples/gen-docs.rs` includes this file
//! too (`#[path]`), to write the man pages and shell completions from the same definitions.

use std::path::PathBuf;

use authinfod::demo::lab;
use authinfod::demo::simulated::MAX_SIMULATED_TERMINALS;
use authinfod::help_table;
use authinfod::proxy::config;
use clap::{Parser, Subcommand};

/// Exit codes: the shared ones (sysexits.h where one fits).
pub use authinfod::exit;

/// Every exit code and what it means, for `--help` and the man page's EXIT STATUS.
pub const EXIT_STATUS: &[(u8, &str)] = &[
    (0, "ok"),
    (exit::FAILURE, "failure"),
    (exit::USAGE, "usage error"),
    (
        exit::UNAVAILABLE,
        "the running proxy cannot be reached (devices, terminals), or its store is held by a process that does not answer on the admin listener (devices --live)",
    ),
    (
        exit::CONFIG,
        "the configuration, the registry or a key file is invalid",
    ),
];

/// The environment `authinfo-proxy serve` reads, for `serve --help` and the man pages.
pub const SERVE_ENVIRONMENT: &[(&str, &str)] = &[
    (
        "RUST_LOG",
        "Log filter in tracing's EnvFilter syntax, e.g. debug or authinfod::proxy=debug,warn (default: info).",
    ),
    (
        "JOURNAL_STREAM",
        "Set by systemd when standard error is the journal: log to journald with structured fields; otherwise, plain lines on standard error.",
    ),
    (
        "https_proxy, HTTPS_PROXY, all_proxy, ALL_PROXY",
        "When [upstream] http_proxy is not set: the forward proxy (http://[user:pass@]host:port) every platform call goes through, the first of these that is set.",
    ),
    (
        "no_proxy, NO_PROXY",
        "With a proxy from the environment: the hosts that are reached directly (names and their subdomains, IPs, CIDR ranges, *).",
    ),
    (
        "SSL_CERT_FILE, SSL_CERT_DIR",
        "With [upstream] trust = \"system\": where the system's trusted roots are (default: where OpenSSL keeps them).",
    ),
];

#[derive(Debug, Parser)]
#[command(
    name = "authinfo-proxy",
    version,
    about = "The merchant's signing proxy: authenticates terminals and signs their own calls to WeChat Pay, Alipay and Alibaba Cloud.",
    after_help = help_table("Exit codes", EXIT_STATUS)
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve terminals (HTTPS) and the admin listener; SIGHUP reloads the registry.
    #[command(after_help = help_table("Environment", SERVE_ENVIRONMENT))]
    Serve {
        /// The configuration file.
        #[arg(long, short, value_name = "FILE", default_value = config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Validate a config file (keys loaded, permissions checked) and its registry; list every problem.
    CheckConfig {
        /// The configuration file to check.
        #[arg(value_name = "FILE", default_value = config::DEFAULT_CONFIG_PATH)]
        file: PathBuf,
    },
    /// Print the merchant's fleet as WeChat Pay lists it (from the running proxy's cache).
    Devices {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Page WeChat Pay's list now, within its limits and the merchant's daily budget: the
        /// running proxy does it (admin listener) when it answers, else this command on the
        /// proxy's store.
        #[arg(long)]
        live: bool,
        /// The configuration file (the running proxy's admin address, or the WeChat Pay keys for --live).
        #[arg(long, short, value_name = "FILE", default_value = config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Print the fleet view from the running proxy: every enrolled terminal with its risks,
    /// worst first (from the terminals' reports, when they were last seen and issued an authinfo).
    Terminals {
        /// Print JSON (the documents of the admin listener's `/terminals`) instead of a table.
        #[arg(long)]
        json: bool,
        /// Only the terminals in a risk of warning or worse.
        #[arg(long)]
        at_risk: bool,
        /// The configuration file (the running proxy's admin address and token).
        #[arg(long, short, value_name = "FILE", default_value = config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Download WeChat Pay's platform certificates now (with `[wechatpay] apiv3_key_file`), verify
    /// them and print each serial and validity; changes nothing the running proxy keeps.
    Certificates {
        /// Also write them as one PEM file (what `[wechatpay] platform_certificates` reads).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// The configuration file (the WeChat Pay keys and the APIv3 key file).
        #[arg(long, short, value_name = "FILE", default_value = config::DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Run the simulated platforms and write a ready proxy config, registry and terminal config
    /// (with fresh keys) into DIR, for trying `serve` and `authinfod run` against them; with
    /// --simulate-terminals, also a simulated fleet that reports to that proxy.
    Sandbox {
        /// The directory to write the configs and keys into (created if missing).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Where the simulated platforms listen.
        #[arg(long, value_name = "ADDR", default_value = lab::SANDBOX_LISTEN)]
        listen: String,
        /// Where the written proxy config makes the proxy listen.
        #[arg(long, value_name = "ADDR", default_value = lab::SANDBOX_PROXY_LISTEN)]
        proxy_listen: String,
        /// Extra devices in the simulated WeChat Pay fleet list.
        #[arg(long, value_name = "N", default_value_t = lab::SANDBOX_DEVICES)]
        devices: usize,
        /// Make simulated WeChat Pay refuse the merchant's authinfo requests beyond N a minute
        /// (429 FREQUENCY_LIMITED), as its per-merchant limits do. Default: no limit.
        #[arg(long, value_name = "N")]
        authinfo_per_minute: Option<usize>,
        /// Also enrol N simulated terminals (SIM-001, ...) in the registry written, each with
        /// its own fresh key, and once the proxy answers on the proxy address, have them fetch
        /// authinfos and report every 5 minutes with assorted risks (healthy, licence lapsing,
        /// inspection WARN or FAIL, Alipay unbound, authinfo expired or short, an older version,
        /// clock skew, store not persisting, not activated, never seen), for trying the fleet
        /// view (`terminals`, the admin dashboard). At most 200.
        #[arg(long, value_name = "N", default_value_t = 0,
              value_parser = clap::value_parser!(u16).range(..=MAX_SIMULATED_TERMINALS as i64))]
        simulate_terminals: u16,
    },
}
