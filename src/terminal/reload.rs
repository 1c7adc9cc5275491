//! `systemctl reload authinfod` (SIGHUP): the config file is read again and what can change
//! under a running daemon is applied, without touching the held authinfo.
//!
//! Owns: which fields a reload applies (the socket's allow-list, the proxy's CA, `log_level`)
//! and the list of changed fields that only a restart applies. An invalid file changes
//! nothing. It must not touch the store, the authinfo or connections already admitted.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::config::{self, Config, ConfigError};
use super::proxy_client::ProxyClient;
use super::state::{Peers, State};
use crate::logging::{FilterChange, LogControl};

/// What one reload changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// Fields whose new value is in effect now.
    pub applied: Vec<&'static str>,
    /// Fields that changed but take effect only at the next start.
    pub need_restart: Vec<&'static str>,
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot use the new proxy CA: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot apply log_level: {0}")]
    LogLevel(String),
}

/// Applies reloads of one running daemon's config file.
#[derive(Debug)]
pub struct Reloader {
    state: Arc<State>,
    /// The real proxy client (absent with a scripted upstream in tests).
    proxy: Option<Arc<ProxyClient>>,
    log: LogControl,
    /// What is in effect now for the fields a reload applies.
    current: Mutex<Current>,
}

#[derive(Debug)]
struct Current {
    /// The CA bundle's path and bytes the proxy client trusts.
    ca: (PathBuf, Option<Vec<u8>>),
    log_level: String,
}

impl Reloader {
    pub(super) fn new(state: Arc<State>, proxy: Option<Arc<ProxyClient>>, log: LogControl) -> Self {
        let config = &state.config;
        let current = Current {
            ca: (
                config.proxy.ca_file.clone(),
                std::fs::read(&config.proxy.ca_file).ok(),
            ),
            log_level: config.log_level.clone(),
        };
        Self {
            state,
            proxy,
            log,
            current: Mutex::new(current),
        }
    }

    /// Reads the config file the daemon started with and applies what may change; an error
    /// leaves everything as it was.
    pub fn reload(&self) -> Result<Reloaded, ReloadError> {
        let new = config::load(&self.state.config.path)?;
        let mut current = crate::sync::lock(&self.current);
        let mut done = Reloaded {
            need_restart: restart_fields(&self.state.config, &new),
            ..Reloaded::default()
        };
        // Checked and built first, applied after: a reload applies everything or nothing.
        let ca = (
            new.proxy.ca_file.clone(),
            std::fs::read(&new.proxy.ca_file).ok(),
        );
        let ca_changed = ca != current.ca;
        let log_changed = new.log_level != current.log_level;
        if log_changed {
            crate::logging::check_filter(&new.log_level).map_err(ReloadError::LogLevel)?;
        }
        if ca_changed {
            if let Some(proxy) = &self.proxy {
                proxy.set_tls(&new.proxy.tls)?;
            }
            current.ca = ca;
            done.applied.push("proxy.ca_file");
        }
        let peers = Peers::from_config(&new.socket);
        if peers != *self.state.peers() {
            self.state.set_peers(peers);
            done.applied.push("socket.allowed_uids/allowed_gids");
        }
        if log_changed {
            match self
                .log
                .apply(&new.log_level)
                .map_err(ReloadError::LogLevel)?
            {
                FilterChange::Applied | FilterChange::NotInstalled => {
                    done.applied.push("log_level")
                }
                FilterChange::OverriddenByEnv => {
                    tracing::warn!("log_level changed but RUST_LOG is set and wins over it")
                }
            }
            current.log_level = new.log_level;
        }
        Ok(done)
    }

    /// [`reload`](Self::reload), logged for the operator either way.
    pub fn reload_and_log(&self) -> Option<Reloaded> {
        match self.reload() {
            Ok(done) => {
                tracing::info!(
                    message_id = crate::events::CONFIG_RELOADED,
                    applied = %list(&done.applied),
                    need_restart = %list(&done.need_restart),
                    "SIGHUP: config reloaded{}",
                    if done.need_restart.is_empty() {
                        ""
                    } else {
                        "; some changed fields take effect only after systemctl restart authinfod"
                    }
                );
                Some(done)
            }
            Err(error) => {
                tracing::error!(
                    message_id = crate::events::CONFIG_RELOAD_FAILED,
                    error = %crate::error_chain(&error),
                    "SIGHUP: config not reloaded; still running with the previous one"
                );
                None
            }
        }
    }
}

fn list(fields: &[&str]) -> String {
    if fields.is_empty() {
        "none".into()
    } else {
        fields.join(", ")
    }
}

/// The fields that differ between `old` and `new` and that only a restart applies.
pub fn restart_fields(old: &Config, new: &Config) -> Vec<&'static str> {
    // Sections compared through Debug pick up fields added later without a change here;
    // the reloadable fields are blanked first.
    let socket = |c: &Config| {
        let mut s = c.socket.clone();
        s.allowed_uids.clear();
        s.allowed_gids.clear();
        format!("{s:?}")
    };
    let checks: [(&'static str, bool); 9] = [
        ("device_id", old.device_id != new.device_id),
        ("key_file", old.key_file != new.key_file),
        ("state_dir", old.state_dir != new.state_dir),
        ("proxy.url", old.proxy.url != new.proxy.url),
        ("proxy.timeout", old.proxy.timeout != new.proxy.timeout),
        ("socket", socket(old) != socket(new)),
        (
            "refresh",
            format!("{:?}", old.refresh) != format!("{:?}", new.refresh),
        ),
        (
            "health",
            format!("{:?}", old.health) != format!("{:?}", new.health),
        ),
        (
            "metrics",
            format!("{:?}", old.metrics) != format!("{:?}", new.metrics),
        ),
    ];
    checks
        .into_iter()
        .filter_map(|(field, changed)| changed.then_some(field))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_fields_a_reload_cannot_apply_are_listed_for_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old = config::test_config(dir.path());
        let mut new = old.clone();
        assert!(restart_fields(&old, &new).is_empty());
        new.socket.allowed_uids.insert(4242);
        new.socket.allowed_gids.insert(4242);
        new.log_level = "debug".into();
        new.proxy.ca_file = dir.path().join("other-ca.pem");
        assert!(restart_fields(&old, &new).is_empty(), "all reloadable");
        new.refresh.interval = std::time::Duration::from_secs(60);
        new.socket.mode = 0o600;
        new.device_id = "T-OTHER".into();
        assert_eq!(
            restart_fields(&old, &new),
            ["device_id", "socket", "refresh"]
        );
    }
}
