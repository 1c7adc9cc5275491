//! The merchant's signing proxy: authenticates terminals, signs and forwards only each
//! terminal's own calls to WeChat Pay, Alipay and Alibaba Cloud, verifies the platforms'
//! answers, and keeps the merchant's fleet list.
//!
//! - [`config`]: the TOML config and its validation (keys loaded, permissions checked).
//! - [`registry`]: the enrolled devices, reloaded on SIGHUP.
//! - [`auth`]: terminal request authentication and the nonce cache.
//! - [`fleet`]: WeChat Pay's device list: paced sync, cache, lookup.
//! - [`server`]: the terminal routes, the admin routes and the error table.
//! - [`metrics`]: Prometheus series.
//!
//! Stateless apart from caches (nonces, fleet list), so several replicas can run behind any load
//! balancer; the nonce cache is per replica, so a replay is caught only by the replica that saw
//! the first use (route a terminal to one replica, or accept that window).

pub mod auth;
pub mod config;
pub mod fleet;
pub mod metrics;
pub mod registry;
pub mod server;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::config::Config;
use self::fleet::{Fleet, FleetError, RateLimiter};
use self::registry::{RegistryError, SharedRegistry};
use self::server::App;
use crate::platform::alipay::AlipayClient;
use crate::platform::aliyun::{AccessKey, AliyunClient, AliyunError};
use crate::platform::wechatpay::{MerchantSigner, WechatPayClient};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Fleet(#[from] FleetError),
    #[error("cannot set up TLS")]
    Tls(#[from] crate::tls::TlsError),
    #[error("HTTP to {platform} failed")]
    Http {
        platform: &'static str,
        #[source]
        source: reqwest::Error,
    },
    #[error("bad Alibaba Cloud settings")]
    Aliyun(#[from] AliyunError),
    #[error("the admin listener's answer is malformed: {0}")]
    Admin(String),
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
        matches!(self, Self::Registry(_) | Self::Tls(_) | Self::Aliyun(_))
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

/// A platform HTTP client trusting the Mozilla roots plus `extra_ca`.
fn http(
    platform: &'static str,
    extra_ca: Option<&str>,
    timeout: std::time::Duration,
) -> Result<reqwest::Client, ProxyError> {
    let tls = crate::tls::client_config_webpki(extra_ca, platform)?;
    crate::platform::http_client(tls, timeout)
        .map_err(|source| ProxyError::Http { platform, source })
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
        "authinfo-proxy starting"
    );
    let registry = SharedRegistry::load(&config.registry)?;
    tracing::info!(devices = registry.current().len(), "registry loaded");
    let timeout = config.upstream_timeout;
    let sp_appid = config.wechatpay.sp_appid.clone();
    let wechat = Arc::new(wechat_client(config.wechatpay, timeout)?);
    let alipay = match config.alipay {
        Some(a) => {
            let client = AlipayClient::new(
                a.gateway,
                a.app_id,
                a.app_key,
                a.alipay_public,
                http("alipay", a.ca_pem.as_deref(), timeout)?,
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
            http("aliyun", a.ca_pem.as_deref(), timeout)?,
        )?),
        None => None,
    };
    let fleet = Arc::new(Fleet::open(&config.state_dir)?);
    let app = Arc::new(App {
        registry,
        nonces: auth::NonceCache::default(),
        fleet: fleet.clone(),
        fleet_enabled: config.fleet.enabled,
        wechat: wechat.clone(),
        sp_appid,
        alipay,
        aliyun,
        metrics: metrics::ProxyMetrics::default(),
        started: tokio::time::Instant::now(),
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
    if config.fleet.enabled {
        let limiter = Arc::new(RateLimiter::new(
            config.fleet.requests_per_second,
            config.fleet.requests_per_day,
        ));
        tracker.spawn(fleet::run_sync(
            fleet,
            wechat,
            limiter,
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

fn wechat_client(
    w: config::WechatPayConfig,
    timeout: std::time::Duration,
) -> Result<WechatPayClient, ProxyError> {
    Ok(WechatPayClient::new(
        w.base_url,
        MerchantSigner::new(w.mchid, w.merchant_serial, w.merchant_key),
        w.platform_keys,
        http("wechatpay", w.ca_pem.as_deref(), timeout)?,
    ))
}

/// Pages WeChat Pay's device list now, within the configured limits (`devices --live`).
pub async fn fleet_now(config: Config) -> Result<fleet::FleetSnapshot, ProxyError> {
    let client = wechat_client(config.wechatpay, config.upstream_timeout)?;
    let limiter = RateLimiter::new(
        config.fleet.requests_per_second,
        config.fleet.requests_per_day,
    );
    let devices = fleet::fetch_all(&client, &limiter).await?;
    Ok(fleet::FleetSnapshot {
        synced_at: Some(crate::units::unix_now()),
        devices,
    })
}

/// Asks a running proxy's admin listener for its cached fleet (`devices`).
pub async fn admin_fleet(admin: SocketAddr) -> Result<fleet::FleetSnapshot, ProxyError> {
    let http = http("admin listener", None, std::time::Duration::from_secs(10))?;
    let failed = |source| ProxyError::Http {
        platform: "admin listener",
        source,
    };
    let bytes = http
        .get(format!("http://{admin}/fleet"))
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(failed)?
        .bytes()
        .await
        .map_err(failed)?;
    serde_json::from_slice(&bytes).map_err(|e| ProxyError::Admin(e.to_string()))
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
