//! Shared test parts: a device key, a fake proxy that checks the wire contract independently,
//! a daemon harness on a temporary directory and a real Unix socket, a raw socket client, and
//! log capture ([`logs`]), and the network namespaces and userspace netem of the link tests.

#![allow(dead_code)]

pub mod fake_proxy;
pub mod logs;
pub mod netem;
pub mod netns;
pub mod redis;
pub mod softhsm;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use authinfod::crypto::{self, GeneratedKey};
use authinfod::terminal::{Daemon, RunOptions, config, state::State};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

/// A free loopback port, for a server the test starts that must be told its port (Redis, a
/// replica process, a load balancer's front).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// One device key for every test in this binary (generation is the slow part).
pub fn device_key() -> &'static GeneratedKey {
    static KEY: OnceLock<GeneratedKey> = OnceLock::new();
    KEY.get_or_init(|| crypto::generate_rsa_key(2048).expect("keygen"))
}

/// One set of lab keys for every lab in this binary: each lab still makes its own certificates,
/// serials and AccessKey, but RSA key generation (seconds under emulation) happens once. Distinct
/// from [`device_key`], which the tests use as "some other key".
pub fn lab_keys() -> &'static authinfod::demo::lab::LabKeys {
    static KEYS: OnceLock<authinfod::demo::lab::LabKeys> = OnceLock::new();
    KEYS.get_or_init(|| authinfod::demo::lab::LabKeys::generate().expect("keygen"))
}

/// How long a test waits for something that must happen, and the timeout of every call whose
/// answer a test checks: generous enough for a test binary under qemu on a loaded machine (10-20x
/// slower TLS and RSA), so that no outcome depends on the machine's speed. Tests that check a
/// timeout use a server that never answers and a short timeout of their own instead.
pub const GENEROUS: Duration = Duration::from_secs(120);
/// The daemon's `[proxy] timeout` in the tests' configs (below [`GENEROUS`], which bounds the
/// waits around a call).
pub const PROXY_TIMEOUT: &str = "60s";
/// Daemon config (`extra`) that turns the daemon's forced-refresh limit off, for tests that force
/// refreshes back to back to see each fault's outcome; the limit has tests of its own.
pub const NO_FORCED_LIMIT: &str = "[refresh]\nmin_forced_interval = \"0s\"\n";

/// `extra` with issue 14's forced-refresh limit lifted: in its `[refresh]` section, or in one
/// added (for tests that force refreshes back to back to test something else).
pub fn no_forced_limit(extra: &str) -> String {
    if extra.contains("[refresh]\n") {
        extra.replacen(
            "[refresh]\n",
            "[refresh]\nmin_forced_interval = \"0s\"\n",
            1,
        )
    } else {
        format!("{extra}\n{NO_FORCED_LIMIT}")
    }
}

/// Polls `cond` every 20 ms until it holds, failing the test after [`GENEROUS`].
pub async fn wait_until<F: FnMut() -> bool>(what: &str, mut cond: F) {
    let deadline = tokio::time::Instant::now() + GENEROUS;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `daemon` holds an authinfo and its three health checks (inspection, Alipay
/// binding, licence) are `ok`.
pub async fn wait_for_authinfo_and_health(daemon: &TestDaemon) {
    use authinfod::terminal::doc::CheckState;
    let state = daemon.state.clone();
    wait_until("an authinfo is held and the health checks are done", || {
        let d = state.status().device;
        state.current().is_some()
            && [d.inspection.state, d.alipay_binding.state, d.licence.state]
                .iter()
                .all(|c| *c == CheckState::Ok)
    })
    .await;
}

/// The lab's proxy config, loaded as the lab loads it (no environment: the lab's platforms are
/// on loopback, and a CI machine's `HTTPS_PROXY` must not apply to them).
pub fn lab_proxy_config(
    files: &authinfod::demo::lab::LabFiles,
) -> authinfod::proxy::config::Config {
    authinfod::proxy::config::load_with_env(
        &files.path("authinfo-proxy.toml"),
        &authinfod::proxy::config::no_environment,
    )
    .expect("the lab's proxy config")
}

/// An answer read from the daemon's socket or the proxy.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    /// Reads a whole response.
    pub async fn read(response: hyper::Response<hyper::body::Incoming>) -> Self {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes()
            .to_vec();
        Reply {
            status,
            headers,
            body,
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }
}

/// One HTTP/1.1 request over the Unix socket at `socket`.
pub async fn socket_request(
    socket: &Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Reply {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .expect("connect to the daemon socket");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "authinfod");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(bytes::Bytes::copy_from_slice(
            body.unwrap_or_default(),
        )))
        .expect("request");
    Reply::read(sender.send_request(req).await.expect("send")).await
}

/// A daemon running in this process on a temporary state directory and socket.
pub struct TestDaemon {
    pub dir: Arc<tempfile::TempDir>,
    pub socket: PathBuf,
    pub state: Arc<State>,
    /// What SIGHUP calls in the binary.
    pub reloader: Arc<authinfod::terminal::reload::Reloader>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl TestDaemon {
    /// Writes a config for `proxy_url` trusting `ca_pem` (plus `extra` TOML appended to the
    /// sections, e.g. `[refresh]\ninterval = "1h"`) and starts the daemon.
    pub async fn start(proxy_url: &str, ca_pem: &str, extra: &str) -> Self {
        let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
        Self::start_in(dir, proxy_url, ca_pem, extra).await
    }

    /// Starts a daemon in an existing directory (a restart keeps the store).
    pub async fn start_in(
        dir: Arc<tempfile::TempDir>,
        proxy_url: &str,
        ca_pem: &str,
        extra: &str,
    ) -> Self {
        let config = write_config(dir.path(), proxy_url, ca_pem, extra);
        Self::start_with_config(dir, &config).await
    }

    /// Starts a daemon from a config file written elsewhere (a lab's); `dir` is kept alive.
    pub async fn start_with_config(dir: Arc<tempfile::TempDir>, config: &Path) -> Self {
        Self::start_with_options(dir, config, RunOptions::default()).await
    }

    /// [`start_with_config`](Self::start_with_config) with given run options (a shifted
    /// clock, a notify socket).
    pub async fn start_with_options(
        dir: Arc<tempfile::TempDir>,
        config: &Path,
        options: RunOptions,
    ) -> Self {
        let config =
            config::load(config).unwrap_or_else(|e| panic!("{}", authinfod::error_chain(&e)));
        let socket = match &config.socket.address {
            config::SocketAddress::Path(p) => p.clone(),
            config::SocketAddress::Abstract(_) => PathBuf::new(),
        };
        let daemon = Daemon::start(config, options).await.expect("daemon starts");
        let state = daemon.state();
        let reloader = daemon.reloader();
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let task = tokio::spawn(daemon.run(async move { token.cancelled().await }));
        Self {
            dir,
            socket,
            state,
            reloader,
            shutdown,
            task,
        }
    }

    pub async fn get(&self, path: &str) -> Reply {
        socket_request(&self.socket, "GET", path, &[], None).await
    }

    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Reply {
        socket_request(&self.socket, method, path, headers, body).await
    }

    pub async fn put_raw_data(&self, raw: &str) -> Reply {
        let body = serde_json::to_vec(&serde_json::json!({ "raw_data": raw })).expect("json");
        self.request(
            "PUT",
            "/v1/raw-data",
            &[("content-type", "application/json")],
            Some(&body),
        )
        .await
    }

    /// `POST /v1/refresh?wait=true`: the refresh's outcome.
    pub async fn refresh_and_wait(&self) -> Reply {
        self.request("POST", "/v1/refresh?wait=true", &[], None)
            .await
    }

    pub async fn status(&self) -> serde_json::Value {
        let r = self.get("/v1/status").await;
        assert_eq!(r.status, 200);
        r.json()
    }

    /// Stops the daemon and waits for it; returns the directory for a restart.
    pub async fn stop(self) -> Arc<tempfile::TempDir> {
        self.shutdown.cancel();
        tokio::time::timeout(GENEROUS, self.task)
            .await
            .expect("daemon stops")
            .expect("daemon task");
        self.dir
    }
}

/// Writes the device key and a config into `dir`; returns the config path.
pub fn write_config(dir: &Path, proxy_url: &str, ca_pem: &str, extra: &str) -> PathBuf {
    write_config_with_timeout(dir, proxy_url, ca_pem, PROXY_TIMEOUT, extra)
}

/// [`write_config`] with another `[proxy] timeout` (tests of a proxy that never answers).
pub fn write_config_with_timeout(
    dir: &Path,
    proxy_url: &str,
    ca_pem: &str,
    timeout: &str,
    extra: &str,
) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let key = dir.join("device.key");
    std::fs::write(&key, &device_key().private_pem).expect("key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let ca = dir.join("proxy-ca.pem");
    std::fs::write(&ca, ca_pem).expect("ca");
    // The socket always lives in the test's directory; an `extra` [socket] section gets the
    // path line added to it.
    let path_line = format!("path = \"{}\"\n", dir.join("authinfod.sock").display());
    let (socket_section, extra) = if extra.contains("[socket]\n") {
        (
            String::new(),
            extra.replacen("[socket]\n", &format!("[socket]\n{path_line}"), 1),
        )
    } else {
        (format!("[socket]\n{path_line}"), extra.to_owned())
    };
    let text = format!(
        "device_id = \"T-1001\"\nkey_file = \"{}\"\nstate_dir = \"{}\"\n\n[proxy]\nurl = \"{proxy_url}\"\nca_file = \"{}\"\ntimeout = \"{timeout}\"\n\n{socket_section}\n{extra}\n",
        key.display(),
        dir.join("state").display(),
        ca.display(),
    );
    let path = dir.join("authinfod.toml");
    std::fs::write(&path, text).expect("config");
    path
}

/// A URL where nothing listens.
pub async fn dead_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    format!("https://127.0.0.1:{}", addr.port())
}
