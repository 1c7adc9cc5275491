//! The terminal daemon: keeps a fresh authinfo, persisted, served to the face app over a Unix
//! socket.
//!
//! - [`config`]: the TOML config, defaults and validation.
//! - [`store`]: sled persistence, a crash-safe copy beside it, and recovery from either.
//! - [`doc`]: the socket API's documents and route table, as types servers and clients share.
//! - [`device`]: the device health facts as data (checks, records, their document).
//! - [`state`]: the shared in-memory state: served authinfo, refresh bookkeeping, health.
//! - [`proxy_client`]: the signed HTTPS client of the merchant's proxy.
//! - [`refresher`]: the refresh loop and its schedule.
//! - [`health`]: the device health checks (inspection, Alipay binding, licence).
//! - [`api`]: the socket API as a pure function; [`server`]: the socket transport.
//! - [`systemd`]: sd_notify and the watchdog; [`metrics`]: Prometheus counters.
//! - [`client`]: the `status`/`get`/`refresh`/`put-raw-data` commands; [`keygen`]: device keys.
//!
//! [`Daemon::start`] does everything up to `READY=1` (config is already valid; the store is
//! opened and loaded, the socket bound) without touching the network; [`Daemon::run`] then
//! serves until its shutdown future resolves.

pub mod api;
pub mod client;
pub mod config;
pub mod device;
pub mod doc;
pub mod health;
pub mod keygen;
pub mod metrics;
pub mod proxy_client;
pub mod refresher;
pub mod server;
pub mod state;
pub mod store;
pub mod systemd;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use self::config::Config;
use self::proxy_client::{ProxyClient, Upstream};
use self::server::{ServerError, SocketServer};
use self::state::State;
use self::store::{Store, StoreError};
use self::systemd::Notifier;
use crate::crypto::{CryptoError, RsaSigner};
use crate::wire::auth::DeviceSigner;

/// How long the loops get to stop after shutdown starts.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot load the device key")]
    Key(#[source] CryptoError),
    #[error("the device key cannot be used")]
    KeyFile(#[from] crate::config_file::PrivateFileError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Socket(#[from] ServerError),
    #[error("cannot set up TLS to the proxy")]
    Tls(#[from] crate::tls::TlsError),
}

impl DaemonError {
    /// True when fixing the configuration (or the files it names) is the cure.
    pub fn is_config(&self) -> bool {
        matches!(self, Self::Key(_) | Self::KeyFile(_) | Self::Tls(_))
    }
}

/// What the daemon takes from its environment (read by the binary, passed in).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub notifier: Notifier,
    /// systemd's watchdog period (`WATCHDOG_USEC`), when enabled.
    pub watchdog: Option<Duration>,
    /// The wall clock (the system's; tests shift it).
    pub clock: Arc<crate::units::WallClock>,
    /// What the proxy client learns of the proxy's clock, read by the state for ages.
    pub proxy_clock: Arc<crate::units::PeerClock>,
    /// The daemon's own binary, to open the store in a child after a start died inside sled's
    /// open ([`store::StoreOptions::probe`]).
    pub store_probe: Option<std::path::PathBuf>,
}

/// A started daemon: store loaded, socket bound, not yet refreshing.
pub struct Daemon {
    state: Arc<State>,
    server: SocketServer,
    upstream: Arc<dyn Upstream>,
    options: RunOptions,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("socket", self.server.address())
            .finish_non_exhaustive()
    }
}

impl Daemon {
    /// Loads the key, opens the store (moving a broken one aside), binds the socket and tells
    /// systemd `READY=1`. No network call happens here: a stored authinfo is served at once.
    pub async fn start(config: Config, options: RunOptions) -> Result<Self, DaemonError> {
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            device_id = %config.device_id,
            proxy = %config.proxy.url,
            socket = %config.socket.address,
            state_dir = %config.state_dir.display(),
            interval = %crate::units::format_duration(config.refresh.interval),
            jitter = config.refresh.jitter,
            backoff_min = %crate::units::format_duration(config.refresh.backoff_min),
            backoff_max = %crate::units::format_duration(config.refresh.backoff_max),
            assumed_validity = %crate::units::format_duration(config.refresh.assumed_validity),
            raw_data_command = config.refresh.raw_data_command.is_some(),
            allowed_uids = ?config.socket.allowed_uids,
            allowed_gids = ?config.socket.allowed_gids,
            "authinfod starting"
        );
        crate::config_file::check_private_file(&config.key_file)?;
        let key = RsaSigner::from_file(&config.key_file).map_err(DaemonError::Key)?;
        let signer = DeviceSigner::new(config.device_id.clone(), key);
        let upstream = Arc::new(
            ProxyClient::new(
                &config.proxy.url,
                &config.proxy.tls,
                signer,
                config.proxy.timeout,
            )?
            .with_clocks(options.clock.clone(), options.proxy_clock.clone()),
        );
        Self::start_with_upstream(config, options, upstream).await
    }

    /// [`start`](Self::start) with a given upstream (tests of the loop use scripted ones).
    pub async fn start_with_upstream(
        config: Config,
        options: RunOptions,
        upstream: Arc<dyn Upstream>,
    ) -> Result<Self, DaemonError> {
        // Damage found here is repaired and logged by the store itself.
        let (store, _) = Store::open_with(
            &config.state_dir,
            &store::StoreOptions {
                clock: options.clock.clone(),
                probe: options.store_probe.clone(),
            },
        )?;
        let state = State::load(
            config,
            store,
            options.clock.clone(),
            options.proxy_clock.clone(),
        )?;
        match state.current() {
            Some(served) => tracing::info!(
                authinfo_fingerprint = %served.fingerprint,
                age_seconds = served.age(state.time()).seconds,
                age_basis = served.age(state.time()).basis.as_str(),
                state = served.freshness(state.time(), state.config.refresh.interval).as_str(),
                "serving the stored authinfo"
            ),
            None => tracing::info!(
                "no stored authinfo; the face app gets 503 NO_AUTHINFO until the first refresh"
            ),
        }
        let server = SocketServer::bind(&state.config.socket).await?;
        tracing::info!(socket = %server.address(), "socket bound");
        options
            .notifier
            .notify(&format!("READY=1\nSTATUS={}", systemd::status_line(&state)));
        Ok(Self {
            state,
            server,
            upstream,
            options,
        })
    }

    /// The shared state (tests inspect it).
    pub fn state(&self) -> Arc<State> {
        self.state.clone()
    }

    /// Refreshes, checks health and serves until `shutdown` resolves; then stops accepting,
    /// drains in-flight requests, flushes the store and removes the socket file.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let token = CancellationToken::new();
        let Self {
            state,
            server,
            upstream,
            options,
        } = self;
        let tasks = [
            tokio::spawn(
                refresher::Refresher::new(state.clone(), upstream.clone()).run(token.clone()),
            ),
            tokio::spawn(health::Checker::new(state.clone(), upstream).run(token.clone())),
            tokio::spawn(server.serve(state.clone(), token.clone())),
            tokio::spawn(systemd::supervise(
                state.clone(),
                options.notifier.clone(),
                options.watchdog,
                token.clone(),
            )),
            tokio::spawn(store::keep(
                state.store.clone(),
                state.config.store.check_interval,
                token.clone(),
            )),
        ];
        shutdown.await;
        options.notifier.notify("STOPPING=1\nSTATUS=stopping");
        token.cancel();
        if tokio::time::timeout(STOP_TIMEOUT, futures_join(tasks))
            .await
            .is_err()
        {
            tracing::warn!("some tasks did not stop within the timeout");
        }
        if let Err(error) = state.store.flush() {
            tracing::error!(error = %crate::error_chain(&error), "final store flush failed");
        }
        tracing::info!("authinfod stopped");
    }
}

async fn futures_join<const N: usize>(tasks: [tokio::task::JoinHandle<()>; N]) {
    for task in tasks {
        let _ = task.await;
    }
}
