//! What both binaries' mains do the same way: read the logging environment and install the
//! subscriber, and build the runtime. Included by each binary with `#[path]` (a folder without a
//! `main.rs` is not a binary of its own), so that the environment is still read only in `main`.

use anyhow::Context as _;

/// Logs to journald when `$JOURNAL_STREAM` says stderr goes there, else to stderr, as
/// `identifier`; `$RUST_LOG` overrides `default`. Returns the handle that changes the filter.
pub fn init_logging(identifier: &str, default: &str) -> authinfod::logging::LogControl {
    let journal = std::env::var("JOURNAL_STREAM").ok();
    let filter = std::env::var("RUST_LOG").ok();
    authinfod::logging::init(
        authinfod::logging::detect(journal.as_deref()),
        filter.as_deref(),
        default,
        identifier,
    )
    .1
}

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}
