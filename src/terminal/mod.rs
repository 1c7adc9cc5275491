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
//! - [`reporter`]: the health reports to the proxy's fleet view (`POST /v1/report`).
//! - [`api`]: the socket API as a pure function; [`server`]: the socket transport;
//!   [`admission`]: who gets room on the socket (slots, per-uid shares, eviction, budgets).
//! - [`systemd`]: sd_notify and the watchdog; [`metrics`]: Prometheus counters; [`exporter`]:
//!   the metrics textfile and the loopback `/metrics` listener.
//! - [`client`]: the `status`/`get`/`refresh`/`put-raw-data` commands; [`keygen`]: device keys.
//!
//! [`Daemon::start`] does everything up to `READY=1` (config is already valid; the store is
//! opened and loaded, the socket bound) without touching the network; [`Daemon::run`] then
//! serves until its shutdown future resolves.

pub mod admission;
pub mod api;
pub mod client;
pub mod config;
pub mod device;
pub mod doc;
pub mod exporter;
pub mod health;
pub mod keygen;
pub mod metrics;
pub mod proxy_client;
pub mod refresher;
pub mod reload;
pub mod reporter;
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

use crate::wire::auth::DeviceSigner;

/// How long the loops get to stop after shutdown starts.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Preflight(#[from] config::ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Socket(#[from] ServerError),
    #[error("cannot listen for metrics on {addr}")]
    MetricsListen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up TLS to the proxy")]
    Tls(#[from] crate::tls::TlsError),
}

impl DaemonError {
    /// True when fixing the configuration (or the files it names) is the cure.
    pub fn is_config(&self) -> bool {
        matches!(self, Self::Preflight(_) | Self::Tls(_))
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
    /// Changes the log filter on a reload (the binary's subscriber; nothing by default).
    pub log: crate::logging::LogControl,
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
    /// The loopback `/metrics` listener, when configured.
    metrics_listener: Option<tokio::net::TcpListener>,
    upstream: Arc<dyn Upstream>,
    /// The same upstream when it is the real proxy client, whose CA a reload replaces.
    proxy: Option<Arc<ProxyClient>>,
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
        let key = config::preflight(&config)?;
        Self::start_with_key(config, key, options).await
    }

    /// [`start`](Self::start) with the device key already opened (by
    /// [`config::load_for_run`]: a token is logged in to once, not twice, since every wrong PIN
    /// counts towards locking it).
    pub async fn start_with_key(
        config: Config,
        key: crate::crypto::Signer,
        options: RunOptions,
    ) -> Result<Self, DaemonError> {
        tracing::info!(message_id = crate::events::DAEMON_STARTED,
            version = env!("CARGO_PKG_VERSION"),
            device_id = %config.device_id,
            key_file = %config.key_file,
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
        for warning in key.warnings() {
            tracing::warn!(warning = %warning, key_file = %config.key_file, "the device key needs attention");
        }
        let proxy = proxy_client(&config, key, &options)?;
        let mut daemon = Self::start_with_upstream(config, options, proxy.clone()).await?;
        daemon.proxy = Some(proxy);
        Ok(daemon)
    }

    /// [`start`](Self::start) with a given upstream (tests of the loop use scripted ones).
    pub async fn start_with_upstream(
        config: Config,
        options: RunOptions,
        upstream: Arc<dyn Upstream>,
    ) -> Result<Self, DaemonError> {
        let state = load_state(config, &options)?;
        let server = SocketServer::bind(&state.config.socket).await?;
        tracing::info!(socket = %server.address(), "socket bound");
        let metrics_listener = match state.config.metrics.listen {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| DaemonError::MetricsListen { addr, source })?;
                tracing::info!(%addr, "metrics listener bound");
                Some(listener)
            }
            None => None,
        };
        options
            .notifier
            .notify(&format!("READY=1\nSTATUS={}", systemd::status_line(&state)));
        Ok(Self {
            state,
            server,
            metrics_listener,
            upstream,
            proxy: None,
            options,
        })
    }

    /// What applies a reload of the config file (`systemctl reload`, SIGHUP) to this daemon.
    pub fn reloader(&self) -> Arc<reload::Reloader> {
        Arc::new(reload::Reloader::new(
            self.state.clone(),
            self.proxy.clone(),
            self.options.log.clone(),
        ))
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
            metrics_listener,
            upstream,
            options,
            ..
        } = self;
        let mut exporters = Vec::new();
        if let Some(listener) = metrics_listener {
            exporters.push(tokio::spawn(exporter::serve_metrics(
                listener,
                state.clone(),
                token.clone(),
            )));
        }
        if let Some(path) = state.config.metrics.textfile.clone() {
            exporters.push(tokio::spawn(exporter::keep_textfile(
                state.clone(),
                path,
                token.clone(),
            )));
        }
        let tasks = [
            tokio::spawn(
                refresher::Refresher::new(state.clone(), upstream.clone()).run(token.clone()),
            ),
            tokio::spawn(
                reporter::Reporter::new(state.clone(), upstream.clone()).run(token.clone()),
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
        let stopped = async {
            futures_join(tasks).await;
            for task in exporters {
                let _ = task.await;
            }
        };
        if tokio::time::timeout(STOP_TIMEOUT, stopped).await.is_err() {
            tracing::warn!("some tasks did not stop within the timeout");
        }
        if let Err(error) = state.store.flush() {
            tracing::error!(error = %crate::error_chain(&error), "final store flush failed");
        }
        tracing::info!(
            message_id = crate::events::DAEMON_STOPPED,
            "authinfod stopped"
        );
    }
}

/// The signed client of the proxy, after the start-up checks of the key.
fn proxy_client(
    config: &Config,
    key: crate::crypto::Signer,
    options: &RunOptions,
) -> Result<Arc<ProxyClient>, DaemonError> {
    let signer = DeviceSigner::new(config.device_id.clone(), key);
    Ok(Arc::new(
        ProxyClient::new(
            &config.proxy.url,
            &config.proxy.tls,
            signer,
            config.proxy.timeout,
        )?
        .with_clocks(options.clock.clone(), options.proxy_clock.clone()),
    ))
}

/// Opens the store (recovering a broken one) and makes the state serving what it holds.
fn load_state(config: Config, options: &RunOptions) -> Result<Arc<State>, DaemonError> {
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
        Some(served) => tracing::info!(message_id = crate::events::SERVING_STORED,
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
    Ok(state)
}

/// What `authinfod run --once` did.
#[derive(Debug)]
pub struct OnceReport {
    /// The refresh attempt's outcome and its record.
    pub refresh: refresher::Outcome,
    pub record: Option<Arc<store::AttemptRecord>>,
    /// Each enabled health check, and whether it succeeded.
    pub health: Vec<(device::Check, Result<(), proxy_client::Disposition>)>,
    /// The authinfo now held (new, or the one stored before).
    pub held: Option<Arc<state::Served>>,
}

/// `authinfod run --once`, for provisioning: one refresh and one round of health checks
/// through the proxy, persisted and flushed; the socket is never started. The stored raw_data
/// (or `raw_data_command`) is used, as by the running daemon.
pub async fn run_once(config: Config, options: RunOptions) -> Result<OnceReport, DaemonError> {
    let key = config::preflight(&config)?;
    run_once_with_key(config, key, options).await
}

/// [`run_once`] with the device key already opened (by [`config::load_for_run`]: a token is
/// logged in to once).
pub async fn run_once_with_key(
    config: Config,
    key: crate::crypto::Signer,
    options: RunOptions,
) -> Result<OnceReport, DaemonError> {
    let upstream = proxy_client(&config, key, &options)?;
    let state = load_state(config, &options)?;
    let refresh = refresher::Refresher::new(state.clone(), upstream.clone())
        .refresh_once()
        .await;
    let record = state.refresh_status().last_attempt.clone();
    let checks = state.health().enabled_checks();
    let mut health = Vec::new();
    for check in checks {
        health.push((
            check,
            health::check_once(check, &state, upstream.as_ref()).await,
        ));
    }
    state.store.flush()?;
    Ok(OnceReport {
        refresh,
        record,
        health,
        held: state.current(),
    })
}

async fn futures_join<const N: usize>(tasks: [tokio::task::JoinHandle<()>; N]) {
    for task in tasks {
        let _ = task.await;
    }
}
