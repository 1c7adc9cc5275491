//! The merchant's signing proxy: authenticates terminals, signs and forwards only each
//! terminal's own calls to WeChat Pay, Alipay and Alibaba Cloud, verifies the platforms'
//! answers, and keeps the merchant's fleet list.
//!
//! - [`config`]: the TOML config and its validation (keys loaded, permissions checked).
//! - [`registry`]: the enrolled devices, reloaded on SIGHUP.
//! - [`auth`]: terminal request authentication and the nonce cache.
//! - [`certificates`]: WeChat Pay's platform certificates, downloaded and rotated.
//! - [`fleet`]: WeChat Pay's device list: paced sync, the day's budget, cache, lookup.
//! - [`limits`]: per-device token buckets per route and per-merchant platform ceilings.
//! - [`store`]: the proxy's sled store (fleet cache, device-list budget, platform certificates).
//! - [`server`]: the terminal routes, the admin routes and the error table.
//! - [`metrics`]: Prometheus series.
//! - [`periodic`]: the loop background duties run in (interval, jitter, backoff).
//!
//! - [`cluster`]: the replicas' shared state in Redis (`[cluster] redis_url`).
//!
//! One proxy keeps its state in memory and its sled store (the nonce cache, the limits, the
//! fleet list, the day's device-list count, the fleet view's records, downloaded platform
//! certificates). With `[cluster]`, several replicas behind one load balancer share all of it
//! but the certificates through Redis ([`cluster`]): a nonce is refused at every replica once
//! used at one, one replica at a time holds the fleet-sync lease and pages the list for all,
//! WeChat Pay's limits are counted once for the merchant, and every replica's fleet view shows
//! what any of them saw. When Redis does not answer, terminal requests get a retryable 503 (no
//! nonce is accepted unchecked) and everything recovers by itself when it answers again.

pub mod auth;
pub mod certificates;
pub mod cluster;
pub mod config;
pub mod fleet;
pub mod limits;
pub mod metrics;
pub mod periodic;
pub mod registry;
pub mod server;
pub mod store;
pub mod terminals;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::config::Config;
use self::fleet::{Fleet, FleetError, FleetSnapshot, SyncRefusal};
use self::registry::{RegistryError, SharedRegistry};
use self::server::App;
use self::store::{Store, StoreError};
use crate::platform::alipay::AlipayClient;
use crate::platform::aliyun::{AccessKey, AliyunClient, AliyunError};
use crate::platform::wechatpay::{MerchantSigner, WechatPayClient};
use crate::platform::{Upstream, UpstreamError};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Fleet(#[from] FleetError),
    #[error("cannot set up TLS")]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("HTTP to {platform} failed")]
    Http {
        platform: &'static str,
        #[source]
        source: reqwest::Error,
    },
    #[error("bad Alibaba Cloud settings")]
    Aliyun(#[from] AliyunError),
    #[error(transparent)]
    Certificates(#[from] certificates::CertificatesError),
    #[error(
        "[wechatpay] apiv3_key_file is not set: platform certificates are downloaded with the APIv3 key"
    )]
    NoApiV3Key,
    #[error("the admin listener's answer is malformed: {0}")]
    Admin(String),
    #[error("the running proxy refused: {} {}", .0.code, .0.message)]
    AdminRefused(SyncRefusal),
    #[error(
        "the proxy's store at {path} is held by another process, and no proxy answers on the \
         admin listener at {admin}: stop the other process or run this where the admin listener \
         is reachable"
    )]
    StoreBusy {
        path: std::path::PathBuf,
        admin: SocketAddr,
    },
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl ProxyError {
    /// True when fixing the configuration (or a file it names) is the cure.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            Self::Registry(_)
                | Self::Tls(_)
                | Self::Aliyun(_)
                | Self::Upstream(_)
                | Self::NoApiV3Key
        )
    }
}

/// A running proxy.
#[derive(Debug)]
pub struct RunningProxy {
    /// The terminal listener's address (HTTPS).
    pub addr: SocketAddr,
    /// The admin listener's address (HTTP).
    pub admin_addr: SocketAddr,
    pub app: Arc<App>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl RunningProxy {
    /// Re-reads the registry; on failure the old one stays and the error is logged.
    pub fn reload_registry(&self) {
        match self.app.registry.reload() {
            Ok(n) => tracing::info!(
                message_id = crate::events::REGISTRY_RELOADED,
                devices = n,
                "registry reloaded"
            ),
            Err(error) => {
                tracing::error!(message_id = crate::events::REGISTRY_RELOAD_FAILED, error = %crate::error_chain(&error), "registry reload failed; keeping the previous registry")
            }
        }
    }

    /// Stops the listeners and the fleet sync, letting in-flight requests finish.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        tracing::info!(
            message_id = crate::events::PROXY_STOPPED,
            "authinfo-proxy stopped"
        );
    }
}

/// A platform HTTP client going out and trusting as `upstream` says, plus `extra_ca`.
fn http(
    platform: &'static str,
    extra_ca: Option<&str>,
    upstream: &Upstream,
    timeout: std::time::Duration,
) -> Result<reqwest::Client, ProxyError> {
    Ok(upstream.client(extra_ca, platform, timeout)?)
}

/// Builds the platform clients, loads the registry and the fleet cache, binds both listeners and
/// starts serving, syncing the fleet when enabled.
pub async fn start(config: Config) -> Result<RunningProxy, ProxyError> {
    tracing::info!(message_id = crate::events::PROXY_STARTED,
        version = env!("CARGO_PKG_VERSION"),
        listen = %config.listen,
        admin_listen = %config.admin_listen,
        registry = %config.registry.display(),
        state_dir = %config.state_dir.display(),
        wechatpay = %config.wechatpay.base_url,
        mchid = %config.wechatpay.mchid,
        fleet_enabled = config.fleet.enabled,
        alipay = config.alipay.is_some(),
        aliyun = config.aliyun.is_some(),
        egress = %config.upstream.egress.redacted(),
        cluster = config.cluster.as_ref().map_or("none (one proxy on its own store)", |c| c.redacted_url.as_str()),
        trust = ?config.upstream.trust,
        "authinfo-proxy starting"
    );
    for warning in config.key_warnings() {
        tracing::warn!(warning = %warning, "a configured key needs attention");
    }
    let registry = SharedRegistry::load(&config.registry)?;
    tracing::info!(devices = registry.current().len(), "registry loaded");
    let timeout = config.upstream_timeout;
    let sp_appid = config.wechatpay.sp_appid.clone();
    let upstream = config.upstream;
    let apiv3_key = config.wechatpay.apiv3_key.clone();
    let configured_keys = config.wechatpay.platform_keys.clone();
    let wechat = Arc::new(wechat_client(config.wechatpay, &upstream, timeout)?);
    let alipay = match config.alipay {
        Some(a) => {
            let client = AlipayClient::new(
                a.gateway,
                a.app_id,
                a.app_key,
                a.alipay_public,
                http("alipay", a.ca_pem.as_deref(), &upstream, timeout)?,
            );
            Some(match a.app_auth_token {
                Some(token) => client.with_app_auth_token(token),
                None => client,
            })
        }
        None => None,
    };
    let aliyun = match config.aliyun {
        Some(a) => Some(AliyunClient::new(
            &a.endpoint,
            AccessKey::new(a.access_key_id, a.access_key_secret),
            a.scheme,
            http("aliyun", a.ca_pem.as_deref(), &upstream, timeout)?,
        )?),
        None => None,
    };
    let cluster = config
        .cluster
        .map(cluster::Cluster::new)
        .transpose()?
        .map(Arc::new);
    if let Some(cluster) = &cluster {
        match cluster.start_nonce_epoch().await {
            Ok(_) => tracing::info!(
                replica = cluster.replica(),
                prefix = %cluster.config().prefix,
                "redis answers: nonces, limits, the fleet list and the fleet view are shared with the other replicas"
            ),
            Err(error) => {
                tracing::warn!(%error, "redis does not answer yet: terminal requests get a retryable 503 until it does")
            }
        }
    }
    let store = Store::open(&config.state_dir).map_err(FleetError::from)?;
    let keeper = match apiv3_key {
        Some(key) => Some(start_certificates(configured_keys, key, store.clone(), &wechat).await),
        None => None,
    };
    let records: Arc<dyn terminals::records::TerminalRecords> = match &cluster {
        Some(cluster) => Arc::new(terminals::records::SharedRecords::new(cluster.clone())),
        None => Arc::new(
            terminals::records::StoredRecords::open(store.clone()).map_err(FleetError::from)?,
        ),
    };
    let health = Arc::new(terminals::FleetHealth::new(
        records,
        config.terminals.thresholds,
        fleet::system_clock(),
    ));
    let fleet = Arc::new(Fleet::open(
        store,
        cluster.clone(),
        config.fleet.requests_per_second,
        config.fleet.requests_per_day,
    )?);
    let (nonces, limit_store): (auth::Nonces, Arc<dyn limits::RateLimitStore>) = match &cluster {
        Some(cluster) => (
            auth::Nonces::Shared(cluster.clone()),
            Arc::new(limits::SharedLimits::new(cluster.clone())),
        ),
        None => (
            auth::Nonces::Local(auth::NonceCache::default()),
            Arc::new(limits::MemoryLimits::default()),
        ),
    };
    let app = Arc::new(App {
        registry,
        nonces,
        cluster: cluster.clone(),
        fleet: fleet.clone(),
        fleet_enabled: config.fleet.enabled,
        wechat: wechat.clone(),
        sp_appid,
        alipay,
        aliyun,
        metrics: metrics::ProxyMetrics::default(),
        limits: limits::Limits::new(
            config.limits.clone(),
            if config.fleet.enabled {
                config.fleet.requests_per_second
            } else {
                0
            },
            limit_store,
        ),
        started: tokio::time::Instant::now(),
        health: health.clone(),
        reports: terminals::ReportLimiter::new(
            config.terminals.report_burst,
            config.terminals.report_refill,
        ),
        admin_token: config.admin_token,
    });
    let bind = |addr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| ProxyError::Listen { addr, source })
    };
    let listener = bind(config.listen).await?;
    let admin = bind(config.admin_listen).await?;
    let addr = local(&listener, config.listen);
    let admin_addr = local(&admin, config.admin_listen);
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    tracker.spawn(crate::tls::serve_https(
        listener,
        config.tls,
        server::terminal_router(app.clone()),
        shutdown.clone(),
    ));
    let admin_router = server::admin_router(app.clone());
    let token = shutdown.clone();
    tracker.spawn(async move {
        let _ = axum::serve(admin, admin_router)
            .with_graceful_shutdown(token.cancelled_owned())
            .await;
    });
    if let Some((keeper, first_in)) = keeper {
        tracker.spawn(certificates::run(
            keeper,
            wechat.clone(),
            first_in,
            shutdown.clone(),
        ));
    }
    tracker.spawn(terminals::run(health, fleet_inputs(&app), shutdown.clone()));
    if config.fleet.enabled {
        tracker.spawn(fleet::run_shared_sync(
            fleet,
            wechat,
            config.fleet.sync_interval,
            shutdown.clone(),
        ));
    }
    tracing::info!(%addr, %admin_addr, "listening");
    Ok(RunningProxy {
        addr,
        admin_addr,
        app,
        shutdown,
        tracker,
    })
}

/// What the fleet view's loop reads each pass from `app`: the registry now, and the fleet list
/// when the fleet check is on. It also forgets the report rate of devices no longer enrolled.
fn fleet_inputs(app: &Arc<App>) -> terminals::Inputs {
    let app = app.clone();
    Box::new(move || {
        let registry = app.registry.current();
        app.reports.retain(|id| registry.get(id).is_some());
        (registry, app.fleet_enabled.then(|| app.fleet.snapshot()))
    })
}

/// Gives `wechat` the stored platform certificates, and when it then has no key at all (a
/// first start in platform-certificate mode: no answer could be verified) downloads them before
/// the proxy serves. Returns the keeper and when its next refresh is due.
async fn start_certificates(
    configured: crate::platform::wechatpay::PlatformKeys,
    key: crate::platform::wechatpay::certificates::ApiV3Key,
    store: Store,
    wechat: &WechatPayClient,
) -> (Arc<certificates::CertificateKeeper>, std::time::Duration) {
    let keeper = Arc::new(certificates::CertificateKeeper::new(configured, key, store));
    match keeper.install_stored(wechat) {
        Ok(n) => tracing::info!(
            certificates = n,
            "stored wechat pay platform certificates loaded"
        ),
        Err(error) => {
            tracing::error!(message_id = crate::events::PLATFORM_CERTIFICATES_FAILED, error = %crate::error_chain(&error), "stored wechat pay platform certificates are unreadable; downloading them again")
        }
    }
    if !wechat.keys().is_empty() {
        return (keeper, std::time::Duration::ZERO);
    }
    match keeper.refresh(wechat).await {
        Ok(refreshed) => {
            tracing::info!(
                message_id = crate::events::PLATFORM_CERTIFICATES_REFRESHED,
                certificates = refreshed.kept.len(),
                "wechat pay platform certificates downloaded for the first time"
            );
            (keeper, certificates::REFRESH_INTERVAL)
        }
        Err(error) => {
            tracing::error!(message_id = crate::events::PLATFORM_CERTIFICATES_FAILED, error = %crate::error_chain(&error), "cannot download the wechat pay platform certificates; answers cannot be verified until a retry succeeds");
            (keeper, std::time::Duration::from_secs(30))
        }
    }
}

/// What `authinfo-proxy certificates` shows.
#[derive(Debug)]
pub struct CertificatesReport {
    pub certificates: Vec<crate::platform::wechatpay::certificates::DownloadedCertificate>,
    pub verification: crate::platform::wechatpay::certificates::Verification,
    /// Whether the proxy's stored certificates were trusted too (not while a proxy holds the
    /// store).
    pub store_read: bool,
}

/// Downloads and verifies the platform certificates now (`authinfo-proxy certificates`), with
/// the configured keys and, when no proxy holds the store, the certificates it downloaded
/// before. Changes nothing.
pub async fn certificates_now(config: Config) -> Result<CertificatesReport, ProxyError> {
    let Some(key) = config.wechatpay.apiv3_key.clone() else {
        return Err(ProxyError::NoApiV3Key);
    };
    let configured = config.wechatpay.platform_keys.clone();
    let state_dir = config.state_dir.clone();
    let client = wechat_client(config.wechatpay, &config.upstream, config.upstream_timeout)?;
    let store_read = match Store::open(&state_dir) {
        Ok(store) => {
            certificates::CertificateKeeper::new(configured, key.clone(), store)
                .install_stored(&client)?;
            true
        }
        Err(StoreError::Locked { .. }) => false,
        Err(e) => return Err(FleetError::from(e).into()),
    };
    let download = client
        .download_certificates(&key)
        .await
        .map_err(|e| certificates::CertificatesError::Download(Box::new(e)))?;
    Ok(CertificatesReport {
        certificates: download.certificates,
        verification: download.verification,
        store_read,
    })
}

fn wechat_client(
    w: config::WechatPayConfig,
    upstream: &Upstream,
    timeout: std::time::Duration,
) -> Result<WechatPayClient, ProxyError> {
    Ok(WechatPayClient::new(
        w.base_url,
        MerchantSigner::new(w.mchid, w.merchant_serial, w.merchant_key),
        w.platform_keys,
        http("wechatpay", w.ca_pem.as_deref(), upstream, timeout)?,
    ))
}

/// How long `devices --live` waits for a running proxy to page the list (a 50 000-device fleet
/// is 500 pages, 25 s at 20 a second, more when WeChat Pay asks it to back off).
const ADMIN_SYNC_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// Pages WeChat Pay's device list now (`devices --live`), within the merchant's limits and in
/// the merchant's one daily budget: when a proxy answers on its admin listener at `admin`, it is
/// asked to sync (`POST /fleet/sync`: its own pacing and store, and its cache is refreshed);
/// otherwise the list is paged here on the proxy's store, whose budget and cache the next
/// `serve` then finds. sled admits one process at a time, so a store held by a process that
/// does not answer on `admin` is [`ProxyError::StoreBusy`], never a second, separate count.
pub async fn fleet_live(config: Config, admin: SocketAddr) -> Result<FleetSnapshot, ProxyError> {
    let synced = admin_call(
        reqwest::Method::POST,
        admin,
        config.admin_token.as_ref(),
        "/fleet/sync",
        ADMIN_SYNC_TIMEOUT,
    );
    match synced.await {
        Err(ProxyError::Http { source, .. }) if source.is_connect() => {}
        answered => return answered,
    }
    let store = match Store::open(&config.state_dir) {
        Ok(store) => store,
        Err(StoreError::Locked { path }) => return Err(ProxyError::StoreBusy { path, admin }),
        Err(e) => return Err(FleetError::from(e).into()),
    };
    let client = wechat_client(config.wechatpay, &config.upstream, config.upstream_timeout)?;
    // Clustered: the merchant's one budget and the lease are in Redis, so this pages only when
    // no replica holds the lease, and counts where the replicas count.
    let cluster = config
        .cluster
        .map(cluster::Cluster::new)
        .transpose()?
        .map(Arc::new);
    let fleet = Fleet::open(
        store,
        cluster,
        config.fleet.requests_per_second,
        config.fleet.requests_per_day,
    )?;
    fleet.sync(&client).await?;
    Ok((*fleet.snapshot()).clone())
}

/// Asks a running proxy's admin listener for its cached fleet (`devices`).
pub async fn admin_fleet(
    admin: SocketAddr,
    token: Option<&config::AdminToken>,
) -> Result<FleetSnapshot, ProxyError> {
    admin_call(
        reqwest::Method::GET,
        admin,
        token,
        "/fleet",
        std::time::Duration::from_secs(10),
    )
    .await
}

/// Asks a running proxy's admin listener for its whole fleet view (`terminals`), page by page,
/// worst first; only the terminals at risk with `at_risk`.
pub async fn admin_terminals(
    admin: SocketAddr,
    token: Option<&config::AdminToken>,
    at_risk: bool,
) -> Result<terminals::doc::TerminalsList, ProxyError> {
    let mut all = Vec::new();
    let mut page = 1;
    loop {
        let path = format!(
            "/terminals?per_page={}&page={page}{}",
            terminals::doc::MAX_PER_PAGE,
            if at_risk { "&at_risk=true" } else { "" }
        );
        let answer: terminals::doc::TerminalsPage = admin_call(
            reqwest::Method::GET,
            admin,
            token,
            &path,
            std::time::Duration::from_secs(30),
        )
        .await?;
        all.extend(answer.terminals);
        if page >= answer.pages {
            return Ok(terminals::doc::TerminalsList {
                summary: answer.summary,
                terminals: all,
            });
        }
        page += 1;
    }
}

/// One call to the admin listener answering a `T`, or a [`SyncRefusal`] or error body.
async fn admin_call<T: serde::de::DeserializeOwned>(
    method: reqwest::Method,
    admin: SocketAddr,
    token: Option<&config::AdminToken>,
    path: &str,
    timeout: std::time::Duration,
) -> Result<T, ProxyError> {
    // The admin listener is local: straight to it, whatever the egress proxy.
    let http = http("admin listener", None, &Upstream::direct(), timeout)?;
    let failed = |source| ProxyError::Http {
        platform: "admin listener",
        source,
    };
    let mut request = http.request(method, format!("http://{admin}{path}"));
    if let Some(token) = token {
        request = request.bearer_auth(token.expose());
    }
    let response = request.send().await.map_err(failed)?;
    let status = response.status();
    let bytes = response.bytes().await.map_err(failed)?;
    if status.is_success() {
        return serde_json::from_slice(&bytes).map_err(|e| ProxyError::Admin(e.to_string()));
    }
    if let Ok(refusal) = serde_json::from_slice::<SyncRefusal>(&bytes) {
        return Err(ProxyError::AdminRefused(refusal));
    }
    match serde_json::from_slice::<crate::wire::ErrorBody>(&bytes) {
        Ok(body) => Err(ProxyError::Admin(format!(
            "HTTP {status} on {path}: {} {}",
            body.code, body.message
        ))),
        Err(_) => Err(ProxyError::Admin(format!("HTTP {status} on {path}"))),
    }
}

fn local(listener: &TcpListener, configured: SocketAddr) -> SocketAddr {
    listener.local_addr().unwrap_or(configured)
}

/// Runs the proxy until `shutdown` resolves, reloading the registry on SIGHUP.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ProxyError> {
    // The handler is installed before the listeners are bound: a SIGHUP sent as soon as the
    // proxy answers must reload, never hit the default action (which ends the process).
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(hup) => Some(hup),
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGHUP; registry reloads need a restart");
            None
        }
    };
    let proxy = start(config).await?;
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                tracing::info!("SIGHUP: reloading the registry");
                proxy.reload_registry();
            }
        }
    }
    proxy.stop().await;
    Ok(())
}
