//! Logging setup for both binaries: structured journald fields when systemd's journal holds
//! stderr, plain lines on stderr otherwise.
//!
//! Owns: the one global, the tracing subscriber. The binaries read the environment and pass it
//! in; nothing else here looks at it.

use tracing_subscriber::EnvFilter;

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    /// systemd-journald, with each tracing field as a journal field.
    Journald,
    /// Human-readable lines on stderr.
    Stderr,
}

/// journald when `journal_stream` (`$JOURNAL_STREAM`, `device:inode`) names our stderr: that is
/// how systemd says stderr is connected to the journal.
pub fn detect(journal_stream: Option<&str>) -> LogTarget {
    let Some((dev, ino)) = journal_stream.and_then(|v| v.split_once(':')) else {
        return LogTarget::Stderr;
    };
    let Ok(stat) = nix::sys::stat::fstat(std::io::stderr()) else {
        return LogTarget::Stderr;
    };
    // Both are u64 on most targets but st_ino is u32 on 32-bit ARM glibc (armv7 terminals).
    #[allow(clippy::useless_conversion)]
    let (st_dev, st_ino) = (u64::from(stat.st_dev), u64::from(stat.st_ino));
    if dev.parse::<u64>().ok() == Some(st_dev) && ino.parse::<u64>().ok() == Some(st_ino) {
        LogTarget::Journald
    } else {
        LogTarget::Stderr
    }
}

/// Installs the subscriber. `filter` is `$RUST_LOG` when set; `default` applies otherwise.
/// Returns the target actually used (journald falls back to stderr if its socket is missing).
pub fn init(target: LogTarget, filter: Option<&str>, default: &str, identifier: &str) -> LogTarget {
    let filter = filter
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(default));
    // journald exists on Linux only; on Android (logcat) and elsewhere this is stderr.
    #[cfg(target_os = "linux")]
    if target == LogTarget::Journald
        && let Ok(layer) = tracing_journald::layer()
    {
        use tracing_subscriber::layer::SubscriberExt as _;
        use tracing_subscriber::util::SubscriberInitExt as _;
        // Fields keep their names (`CODE=PROXY_UNREACHABLE`, `MESSAGE_ID=…`), not the crate's
        // default `F_` prefix: none of ours collides with a journal field, and the README's
        // queries are written this way. INFO is "informational" (6), not "notice" (5).
        let layer = layer
            .with_syslog_identifier(identifier.to_owned())
            .with_field_prefix(None)
            .with_priority_mappings(tracing_journald::PriorityMappings {
                info: tracing_journald::Priority::Informational,
                debug: tracing_journald::Priority::Debug,
                ..tracing_journald::PriorityMappings::new()
            });
        if tracing_subscriber::registry()
            .with(filter)
            .with(layer)
            .try_init()
            .is_ok()
        {
            return LogTarget::Journald;
        }
        return LogTarget::Stderr;
    }
    let _ = (target, identifier);
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
    LogTarget::Stderr
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journald_only_when_journal_stream_names_our_stderr() {
        assert_eq!(detect(None), LogTarget::Stderr);
        assert_eq!(detect(Some("garbage")), LogTarget::Stderr);
        assert_eq!(detect(Some("0:0")), LogTarget::Stderr);
        let stat = nix::sys::stat::fstat(std::io::stderr()).expect("fstat");
        let ours = format!("{}:{}", stat.st_dev, stat.st_ino);
        assert_eq!(detect(Some(&ours)), LogTarget::Journald);
    }
}
