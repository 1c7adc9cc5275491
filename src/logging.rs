//! Logging setup for both binaries: structured journald fields when systemd's journal holds
//! stderr, plain lines on stderr otherwise.
//!
//! Owns: the one global, the tracing subscriber. The binaries read the environment and pass it
//! in; nothing else here looks at it.

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Registry, reload};

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

/// Changes the running process's log filter (a reload's `log_level`). The default does
/// nothing: tests and library users own their subscriber.
#[derive(Clone, Default)]
pub struct LogControl {
    handle: Option<reload::Handle<EnvFilter, Registry>>,
    /// `$RUST_LOG` was set at start: it wins over the config, at start and on reload.
    from_env: bool,
}

impl std::fmt::Debug for LogControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogControl")
            .field("installed", &self.handle.is_some())
            .field("from_env", &self.from_env)
            .finish()
    }
}

/// What [`LogControl::apply`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterChange {
    Applied,
    /// `$RUST_LOG` is set and overrides the config.
    OverriddenByEnv,
    /// No subscriber of ours is installed (a library user's own).
    NotInstalled,
}

impl LogControl {
    /// Makes `filter` (EnvFilter syntax, validated by the config) the log filter, unless
    /// `$RUST_LOG` was given.
    pub fn apply(&self, filter: &str) -> Result<FilterChange, String> {
        if self.from_env {
            return Ok(FilterChange::OverriddenByEnv);
        }
        let Some(handle) = &self.handle else {
            return Ok(FilterChange::NotInstalled);
        };
        let filter = EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())?;
        Ok(FilterChange::Applied)
    }
}

/// Whether `filter` is a valid log filter (EnvFilter syntax: `info`, `authinfod=debug,warn`).
pub fn check_filter(filter: &str) -> Result<(), String> {
    EnvFilter::try_new(filter)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Installs the subscriber. `filter` is `$RUST_LOG` when set; `default` applies otherwise.
/// Returns the target actually used (journald falls back to stderr if its socket is missing)
/// and the handle that changes the filter later.
pub fn init(
    target: LogTarget,
    filter: Option<&str>,
    default: &str,
    identifier: &str,
) -> (LogTarget, LogControl) {
    let from_env = filter.and_then(|f| EnvFilter::try_new(f).ok());
    let control_from_env = from_env.is_some();
    let (filter, handle) = reload::Layer::new(from_env.unwrap_or_else(|| EnvFilter::new(default)));
    let control = LogControl {
        handle: Some(handle),
        from_env: control_from_env,
    };
    let none = LogControl::default();
    // journald exists on Linux only; on Android (logcat) and elsewhere this is stderr.
    #[cfg(target_os = "linux")]
    if target == LogTarget::Journald
        && let Ok(layer) = tracing_journald::layer()
    {
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
        return match tracing_subscriber::registry()
            .with(filter)
            .with(layer)
            .try_init()
        {
            Ok(()) => (LogTarget::Journald, control),
            Err(_) => (LogTarget::Stderr, none),
        };
    }
    let _ = (target, identifier);
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    match tracing_subscriber::registry()
        .with(filter)
        .with(stderr)
        .try_init()
    {
        Ok(()) => (LogTarget::Stderr, control),
        Err(_) => (LogTarget::Stderr, none),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_checked_and_an_uninstalled_control_changes_nothing() {
        assert!(check_filter("info").is_ok());
        assert!(check_filter("authinfod=debug,warn").is_ok());
        assert!(check_filter("authinfod=loud").is_err());
        let control = LogControl::default();
        assert_eq!(control.apply("debug"), Ok(FilterChange::NotInstalled));
        let env = LogControl {
            handle: None,
            from_env: true,
        };
        assert_eq!(env.apply("debug"), Ok(FilterChange::OverriddenByEnv));
    }

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
