//! authinfod keeps a WeChat Pay offline-face authinfo fresh on a face-payment terminal, and
//! authinfo-proxy signs the terminal's platform calls on the merchant's server.
//!
//! # Layout
//!
//! - [`config_file`]: what the config files share: TOML reading, the problems collector, the
//!   one config error type and the private-file permission check.
//! - [`events`]: the journal MESSAGE_IDs of the log lines an operator acts on.
//! - [`crypto`]: RSA signing (ring, or inside a PKCS#11 token with the `pkcs11` feature),
//!   verification, key generation, PEM, fingerprints, `pkcs11:` URIs.
//! - [`units`]: durations and timestamps as people write them.
//! - [`json`]: reading the JSON documents other parties send (objects only).
//! - [`prometheus`]: the metrics text format both `/metrics` pages are written in.
//! - [`schedule`]: jitter and backoff arithmetic shared by the daemon and the proxy.
//! - [`serve`]: the one accept, serve and drain loop of every listener.
//! - [`sync`]: poison-tolerant locking.
//! - [`wire`]: the terminal ⇄ proxy contract: routes, bodies, the device request signature.
//! - [`terminal`]: the daemon: config, sled store, refresh loop, socket API, systemd, client.
//! - `platform` (feature `merchant`): WeChat Pay APIv3, Alipay RSA2, Alibaba Cloud clients, and
//!   how their calls go out (egress proxy, trusted roots).
//! - `proxy` (feature `merchant`): the signing proxy: device registry, fleet sync and its daily
//!   budget, platform certificates, its store, HTTPS server.
//! - `sandbox` (feature `merchant`): simulated platforms that verify signatures like the real ones.
//! - `demo` (feature `merchant`): the whole chain in one process, and the sandbox's simulated
//!   terminals.
//! - `test_support` (unit tests only): helpers the modules' tests share.
//!
//! Dependencies point one way: `terminal` and `proxy` use `wire`; `proxy` and `sandbox` use
//! `platform`; only the binaries and `demo` use `terminal`.
//!
//! # Lifecycle
//!
//! **Start.** `authinfod run` validates its config (exit 78 listing every bad field), opens the
//! sled store (a corrupt one is moved aside), loads the held authinfo and binds the Unix socket,
//! then tells systemd `READY=1`: the face app is served from the store before any network call.
//!
//! **Serve.** Every socket connection's peer credentials are checked against the allow-list at
//! accept (a denied peer gets its 403 and never a slot); a connection holds a slot only from its
//! first byte, and a full table closes the connection idle the longest
//! (`terminal::admission`). `GET /v1/authinfo` answers from memory.
//!
//! **Refresh.** One task refreshes on the monotonic clock every interval (±jitter), at once when
//! the held authinfo is older than the interval, with exponential backoff on failure. A new
//! authinfo is written and flushed to sled before it is served. Health checks run beside it.
//!
//! **Shutdown.** SIGTERM or SIGINT cancels a token: the socket stops accepting, in-flight
//! requests finish within a bound, the store is flushed and the socket file removed.
#![forbid(unsafe_code)]

pub mod config_file;
pub mod crypto;
pub mod events;
pub mod json;
pub mod prometheus;
pub mod schedule;
pub mod serve;
pub mod sync;
pub mod terminal;
pub mod tls;
pub mod units;
pub mod wire;

#[cfg(feature = "merchant")]
pub mod platform;
#[cfg(feature = "merchant")]
pub mod proxy;
#[cfg(feature = "merchant")]
pub mod sandbox;
#[cfg(test)]
mod test_support;

/// An error and its sources, joined with `: ` — the one-line form logs and status carry.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let next = s.to_string();
        // Some errors repeat their source's text in their own; don't say it twice.
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

/// The exit codes both binaries share (sysexits.h where one fits); each binary's `cli` adds its
/// own and says what each means for it.
pub mod exit {
    /// The command failed.
    pub const FAILURE: u8 = 1;
    /// clap's code for a usage error.
    pub const USAGE: u8 = 2;
    /// EX_UNAVAILABLE: the running daemon or proxy cannot be reached.
    pub const UNAVAILABLE: u8 = 69;
    /// EX_CONFIG: the configuration (or a file it names) is invalid.
    pub const CONFIG: u8 = 78;
}

/// `Heading:` and one indented, aligned line per `(name, meaning)`: the binaries' `--help`
/// footers (exit codes, environment), which their man pages show as sections.
pub fn help_table<K: std::fmt::Display>(heading: &str, rows: &[(K, &str)]) -> String {
    let names: Vec<String> = rows.iter().map(|(k, _)| k.to_string()).collect();
    let width = names.iter().map(String::len).max().unwrap_or(0);
    let mut out = format!("{heading}:\n");
    for (name, (_, meaning)) in names.iter().zip(rows) {
        out.push_str(&format!("  {name:<width$}  {meaning}\n"));
    }
    out
}

#[cfg(feature = "merchant")]
pub mod demo;
pub mod logging;
