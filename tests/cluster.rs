//! Proxy replicas sharing a real `redis-server` (`[cluster]`), against the sandbox over real TLS:
//! a nonce used at one replica is refused at the others, exactly one replica pages WeChat Pay's
//! device list and the others take its list, a killed lease holder is replaced within the lease
//! time, the day's device-list budget is one for all replicas, and while Redis is down terminals
//! get a retryable 503 (never an unchecked nonce) until everything recovers by itself.
//!
//! Each test starts its own Redis on a free loopback port and its own sandbox; replicas run in
//! this process (`proxy::start`), except where one must die as a process does (`binary_*`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use authinfod::crypto::RsaSigner;
use authinfod::demo::lab::{self, DEVICE_ID, LabFiles, ProxyConfigSpec};
use authinfod::proxy::{self as proxy_lib, RunningProxy};
use authinfod::sandbox::{RunningSandbox, World};
use authinfod::units::unix_now;
use authinfod::wire::auth::DeviceSigner;
use authinfod::wire::{ErrorBody, codes};
use tokio::time::Instant;

use crate::proxy::{ProxyConnection, assert_refused, authinfo_body};
use crate::support::redis::RedisServer;
use crate::support::{GENEROUS, lab_keys, wait_until};

/// The lease the replicas hold the fleet sync with (renewed every second).
const LEASE: Duration = Duration::from_secs(3);

/// A sandbox, a Redis, and a proxy config any number of replicas start from.
struct ClusterLab {
    dir: Arc<tempfile::TempDir>,
    files: LabFiles,
    sandbox: RunningSandbox,
    redis: RedisServer,
}

impl ClusterLab {
    /// Keys, registry, sandbox (knowing `world`) and Redis; the replicas' config gets
    /// `[cluster]` and `extra`.
    async fn start(world: World, extra: &str) -> Self {
        let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
        let redis = RedisServer::start(dir.path()).await;
        let cluster = format!("[cluster]\nredis_url = \"{}\"\n", redis.url());
        Self::assemble(dir, redis, &cluster, world, extra).await
    }

    /// [`Self::start`] with a Redis already started in `dir` and the `cluster` section's
    /// first lines (the lease and the timeout are added).
    async fn assemble(
        dir: Arc<tempfile::TempDir>,
        redis: RedisServer,
        cluster: &str,
        world: World,
        extra: &str,
    ) -> Self {
        let generated =
            lab::write_keys_for(dir.path(), lab_keys(), Some("127.0.0.1")).expect("lab keys");
        let files = LabFiles {
            dir: dir.path().to_owned(),
        };
        files
            .write_registry(&generated.device_public)
            .expect("registry");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let sandbox_url = format!(
            "https://127.0.0.1:{}",
            listener.local_addr().expect("addr").port()
        );
        let cluster = format!(
            "{cluster}lease = \"{}s\"\ntimeout = \"1s\"\n\n{extra}",
            LEASE.as_secs()
        );
        files
            .write_proxy_config(
                &generated,
                &ProxyConfigSpec {
                    extra: &cluster,
                    ..ProxyConfigSpec::new(&sandbox_url)
                },
            )
            .expect("proxy config");
        let sandbox = lab::start_sandbox(
            generated.sandbox_keys,
            &generated.sandbox_pki,
            listener,
            world,
        )
        .expect("sandbox");
        Self {
            dir,
            files,
            sandbox,
            redis,
        }
    }

    /// Replica `name`'s config: the shared one with its own state directory and listeners.
    fn replica_config(&self, name: &str, listen: &str, admin: &str) -> PathBuf {
        self.replica_config_with(name, listen, admin, &[])
    }

    /// [`Self::replica_config`] with whole lines replaced (`(old, new)`).
    fn replica_config_with(
        &self,
        name: &str,
        listen: &str,
        admin: &str,
        replace: &[(&str, &str)],
    ) -> PathBuf {
        let mut shared =
            std::fs::read_to_string(self.files.path("authinfo-proxy.toml")).expect("config");
        for (old, new) in replace {
            assert!(shared.contains(old), "{old} is in the config");
            shared = shared.replace(old, new);
        }
        let own: String = shared
            .lines()
            .map(|line| {
                if line.starts_with("listen = ") {
                    format!("listen = \"{listen}\"")
                } else if line.starts_with("admin_listen = ") {
                    format!("admin_listen = \"{admin}\"")
                } else if line.starts_with("state_dir = ") {
                    format!("state_dir = \"proxy-state-{name}\"")
                } else {
                    line.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let path = self.files.path(&format!("authinfo-proxy-{name}.toml"));
        std::fs::write(&path, own).expect("write");
        std::fs::set_permissions(
            &path,
            <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
        )
        .expect("chmod");
        path
    }

    /// Replica `name`, in this process.
    async fn replica(&self, name: &str) -> RunningProxy {
        self.replica_with(name, &[]).await
    }

    /// Replica `name` with whole lines of the shared config replaced.
    async fn replica_with(&self, name: &str, replace: &[(&str, &str)]) -> RunningProxy {
        let path = self.replica_config_with(name, "127.0.0.1:0", "127.0.0.1:0", replace);
        let config = proxy_lib::config::load_with_env(&path, &proxy_lib::config::no_environment)
            .expect("replica config");
        proxy_lib::start(config)
            .await
            .unwrap_or_else(|e| panic!("replica {name}: {}", authinfod::error_chain(&e)))
    }

    /// The device-list requests WeChat Pay received so far.
    fn list_calls(&self) -> usize {
        self.received("GET /v3/iotmanage/devices?")
    }

    /// The authinfo requests WeChat Pay received so far.
    fn authinfo_calls(&self) -> usize {
        self.received("POST /v3/offlineface/authinfo")
    }

    fn received(&self, prefix: &str) -> usize {
        self.sandbox
            .state
            .received()
            .iter()
            .filter(|r| r.request.starts_with(prefix))
            .count()
    }

    /// The lab's terminal.
    fn device(&self) -> DeviceSigner {
        let key = RsaSigner::from_file(&self.files.path("device.key")).expect("device key");
        DeviceSigner::new(DEVICE_ID.into(), key)
    }
}

/// `POST /v1/authinfo` signed by `device` now: (body, Authorization).
fn signed_authinfo(device: &DeviceSigner, raw: &str) -> (Vec<u8>, String) {
    let body = authinfo_body(raw);
    let authorization = device
        .authorize("POST", "/v1/authinfo", unix_now(), &body)
        .expect("sign");
    (body, authorization)
}

/// Sends a signed `POST /v1/authinfo` to the replica at `addr`.
async fn send(
    files: &LabFiles,
    addr: SocketAddr,
    body: &[u8],
    authorization: &str,
) -> crate::support::Reply {
    ProxyConnection::open_at(files, addr)
        .await
        .send("POST", "/v1/authinfo", Some(authorization), body)
        .await
}

/// Signs `POST /v1/authinfo` for `raw` now ([`signed_authinfo`]) and sends it to the replica at
/// `addr`, which must serve it (200; `what` says which request, when it is not). Returns the
/// request, to replay.
async fn send_served(
    files: &LabFiles,
    addr: SocketAddr,
    device: &DeviceSigner,
    raw: &str,
    what: &str,
) -> (Vec<u8>, String) {
    let (body, authorization) = signed_authinfo(device, raw);
    let reply = send(files, addr, &body, &authorization).await;
    assert_eq!(
        reply.status,
        200,
        "{what}: {}",
        String::from_utf8_lossy(&reply.body)
    );
    (body, authorization)
}

/// Sends `request` again, to the replica at `addr`: refused as a replay (401 REPLAYED_NONCE).
async fn assert_replayed(
    files: &LabFiles,
    addr: SocketAddr,
    (body, authorization): &(Vec<u8>, String),
) -> ErrorBody {
    let reply = send(files, addr, body, authorization).await;
    assert_refused(&reply, 401, codes::REPLAYED_NONCE)
}

/// One admin call over plain HTTP/1.0: (status, body).
async fn admin(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the admin listener");
    tcp.write_all(
        format!("{method} {path} HTTP/1.0\r\nhost: admin\r\ncontent-length: 0\r\n\r\n").as_bytes(),
    )
    .await
    .expect("send");
    let mut text = String::new();
    tokio::time::timeout(GENEROUS, tcp.read_to_string(&mut text))
        .await
        .expect("the admin listener answers")
        .expect("read");
    let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    (status, body.to_owned())
}

async fn healthz(addr: SocketAddr) -> (u16, serde_json::Value) {
    let (status, body) = admin(addr, "GET", "/healthz").await;
    (status, serde_json::from_str(&body).expect("healthz JSON"))
}

/// A nonce used at one replica is refused at the two others, and only the first use reaches
/// WeChat Pay; each replica still serves a request signed afresh.
#[tokio::test]
async fn a_nonce_used_at_one_replica_is_refused_at_every_other_and_reaches_the_platform_once() {
    let lab = ClusterLab::start(lab::world(0, 45), "[fleet]\nenabled = false\n").await;
    let replicas = [
        lab.replica("a").await,
        lab.replica("b").await,
        lab.replica("c").await,
    ];
    let device = lab.device();
    let used = send_served(
        &lab.files,
        replicas[0].addr,
        &device,
        "RAW-1",
        "the first use",
    )
    .await;
    for replica in &replicas[1..] {
        let refusal = assert_replayed(&lab.files, replica.addr, &used).await;
        assert!(!refusal.retryable);
    }
    assert_eq!(lab.authinfo_calls(), 1, "only the first use was forwarded");
    for replica in &replicas[1..] {
        send_served(&lab.files, replica.addr, &device, "RAW-2", "signed afresh").await;
    }
    assert_eq!(lab.authinfo_calls(), 3);
    // The nonce is in Redis under the merchant's prefix, with the window's expiry; no secret is.
    let keys = lab.redis.command(&["KEYS", "*"]).await.expect("KEYS");
    assert!(keys.contains(":nonce:T-1001:"), "{keys}");
    for secret in ["BEGIN", "PRIVATE", "aliyun-secret"] {
        assert!(!keys.contains(secret), "{keys}");
    }
    for replica in replicas {
        replica.stop().await;
    }
}

/// Three replicas: exactly one pages the device list (the lease holder), the others take the list
/// it stored in Redis; an admin's sync at another replica is refused with LEASE_HELD, and all
/// three `/healthz` name the same holder.
#[tokio::test]
async fn exactly_one_replica_pages_the_device_list_and_the_others_take_its_list() {
    let mut world = lab::world(59, 45);
    world.wechat_list_page_cap = Some(20);
    let lab = ClusterLab::start(world, "").await;
    let replicas = [
        lab.replica("a").await,
        lab.replica("b").await,
        lab.replica("c").await,
    ];
    wait_until("every replica has the fleet list", || {
        replicas
            .iter()
            .all(|r| r.app.fleet.snapshot().devices.len() == 60)
    })
    .await;
    assert_eq!(
        lab.list_calls(),
        3,
        "one sync of three pages, by one replica"
    );
    let synced: Vec<_> = replicas
        .iter()
        .map(|r| r.app.fleet.snapshot().synced_at)
        .collect();
    assert!(synced.iter().all(|s| *s == synced[0]), "{synced:?}");
    let mut holders = Vec::new();
    for r in &replicas {
        let (status, doc) = healthz(r.admin_addr).await;
        assert_eq!(status, 200, "{doc}");
        assert_eq!(doc["cluster"]["redis_up"], true, "{doc}");
        holders.push(doc["cluster"]["lease_holder"].as_str().map(str::to_owned));
    }
    let holder = holders[0].clone().expect("a holder");
    assert!(
        holders
            .iter()
            .all(|h| h.as_deref() == Some(holder.as_str())),
        "{holders:?}"
    );
    let follower = replicas
        .iter()
        .find(|r| {
            r.app
                .cluster
                .as_ref()
                .is_some_and(|c| c.replica() != holder)
        })
        .expect("a follower");
    let (status, body) = admin(follower.admin_addr, "POST", "/fleet/sync").await;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("LEASE_HELD"), "{body}");
    assert_eq!(lab.list_calls(), 3, "the refused sync paged nothing");
    for replica in replicas {
        replica.stop().await;
    }
}

/// The day's device-list budget is one count in Redis for all replicas: after the lease holder
/// spent most of it and stopped, the replica that takes the lease over gets only what is left.
#[tokio::test]
async fn the_daily_device_list_budget_is_one_for_all_replicas() {
    let mut world = lab::world(59, 45);
    world.wechat_list_page_cap = Some(20);
    let lab = ClusterLab::start(world, "[fleet]\nrequests_per_day = 7\n").await;
    let mut replicas = vec![lab.replica("a").await, lab.replica("b").await];
    wait_until("both replicas have the list", || {
        replicas
            .iter()
            .all(|r| r.app.fleet.snapshot().devices.len() == 60)
    })
    .await;
    assert_eq!(lab.list_calls(), 3, "the first sync: three pages");
    let name = |r: &RunningProxy| r.app.cluster.as_ref().map(|c| c.replica().to_owned());
    let holder_now = || async {
        let (_, doc) = healthz(replicas[0].admin_addr).await;
        doc["cluster"]["lease_holder"].as_str().map(str::to_owned)
    };
    let holder = holder_now().await;
    let at = replicas
        .iter()
        .position(|r| name(r) == holder)
        .expect("one of the two holds the lease");
    let (status, body) = admin(replicas[at].admin_addr, "POST", "/fleet/sync").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(lab.list_calls(), 6);
    // The holder stops (giving the lease up); the other takes it over.
    replicas.remove(at).stop().await;
    let other = &replicas[0];
    let deadline = Instant::now() + GENEROUS;
    loop {
        let (_, doc) = healthz(other.admin_addr).await;
        if doc["cluster"]["lease_holder"].as_str().map(str::to_owned) == name(other) {
            break;
        }
        assert!(Instant::now() < deadline, "the lease never moved: {doc}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..2 {
        let (status, body) = admin(other.admin_addr, "POST", "/fleet/sync").await;
        assert_eq!(status, 429, "{body}");
        assert!(body.contains("DAILY_BUDGET_SPENT"), "{body}");
    }
    assert_eq!(
        lab.list_calls(),
        7,
        "requests_per_day for the merchant across replicas, and not one more"
    );
    assert_eq!(
        other.app.fleet.snapshot().devices.len(),
        60,
        "the list stays"
    );
    replicas.remove(0).stop().await;
}

/// Redis stopped: a fresh request gets a retryable 503 CLUSTER_UNAVAILABLE with Retry-After, a
/// replay is never accepted, `/healthz` answers 503 with the reason. Redis restarted empty: the
/// replicas recover by themselves, a replica rebuilds the shared fleet list under a new lease,
/// and a request stamped before the restart is refused (its nonce may be lost) while one signed
/// now passes.
#[tokio::test]
async fn with_redis_down_requests_get_a_retryable_503_and_everything_recovers_when_it_returns() {
    let mut lab = ClusterLab::start(lab::world(0, 45), "").await;
    let a = lab.replica("a").await;
    let b = lab.replica("b").await;
    wait_until("both replicas have the list", || {
        [&a, &b]
            .iter()
            .all(|r| r.app.fleet.snapshot().synced_at.is_some())
    })
    .await;
    let syncs_before = lab.list_calls();
    let device = lab.device();
    let (used_body, used_authorization) =
        send_served(&lab.files, a.addr, &device, "RAW-1", "the first use").await;

    lab.redis.stop();
    let (body, authorization) = signed_authinfo(&device, "RAW-2");
    let down = send(&lab.files, a.addr, &body, &authorization).await;
    let refusal = assert_refused(&down, 503, codes::CLUSTER_UNAVAILABLE);
    assert!(refusal.retryable, "{refusal:?}");
    let retry_after: u64 = down
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((15..=45).contains(&retry_after), "{retry_after}");
    let replay = send(&lab.files, b.addr, &used_body, &used_authorization).await;
    assert_refused(&replay, 503, codes::CLUSTER_UNAVAILABLE);
    assert_eq!(
        lab.authinfo_calls(),
        1,
        "nothing was forwarded while Redis was down"
    );
    let (status, doc) = healthz(a.admin_addr).await;
    assert_eq!(status, 503, "{doc}");
    assert_eq!(doc["status"], "unavailable");
    assert_eq!(doc["cluster"]["redis_up"], false);
    assert!(
        doc["cluster"]["error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "{doc}"
    );
    // The list in memory stays: the fleet check still knows the terminals.
    assert!(a.app.fleet.snapshot().synced_at.is_some());

    // Back, empty (no persistence): the replicas recover without anyone touching them.
    let restarted_at = unix_now();
    lab.redis.restart().await;
    let deadline = Instant::now() + GENEROUS;
    for replica in [&a, &b] {
        loop {
            let (status, _) = healthz(replica.admin_addr).await;
            if status == 200 {
                break;
            }
            assert!(Instant::now() < deadline, "a replica never recovered");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // A request stamped before the restart cannot be told from a replay now: refused, retryable.
    let (old_body, old_authorization) = {
        let body = authinfo_body("RAW-OLD");
        let authorization = device
            .authorize("POST", "/v1/authinfo", restarted_at - 5, &body)
            .expect("sign");
        (body, authorization)
    };
    // The first nonce after the restart sets the epoch (Redis's now): the old request is it.
    let old = send(&lab.files, b.addr, &old_body, &old_authorization).await;
    let refusal = assert_refused(&old, 503, codes::CLUSTER_UNAVAILABLE);
    assert!(refusal.retryable, "{refusal:?}");
    assert!(refusal.message.contains("restarted empty"), "{refusal:?}");
    // Signed in a later second than the epoch: admitted.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let used = send_served(
        &lab.files,
        a.addr,
        &device,
        "RAW-4",
        "signed after the restart",
    )
    .await;
    assert_replayed(&lab.files, b.addr, &used).await;
    // The shared list was lost with Redis: the lease holder pages it again, once.
    let keys = || async {
        lab.redis
            .command(&["KEYS", "*fleet:*"])
            .await
            .unwrap_or_default()
    };
    let deadline = Instant::now() + GENEROUS;
    while !(keys().await.contains("fleet:list") && keys().await.contains("fleet:lease")) {
        assert!(
            Instant::now() < deadline,
            "the fleet list was never rebuilt"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        lab.list_calls(),
        syncs_before + 1,
        "one replica paged the list again"
    );
    a.stop().await;
    b.stop().await;
}

/// `rediss://` against a Redis that speaks only TLS to the replicas and requires a user and
/// a password: with the CA from `ca_file` and the password from `password_file` (0600) a replica
/// serves and a replay is refused through it (the nonce is in Redis, read back by the test as
/// that user); no credentials, a wrong password or a server certificate from another CA are a
/// retryable 503 with the reason in `/healthz`, and nothing is forwarded.
#[tokio::test]
async fn a_replica_reaches_a_tls_redis_with_a_user_and_password_and_refuses_without() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let write = |name: &str, text: &str, mode: u32| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        path.display().to_string()
    };
    let pki = authinfod::tls::generate_pki("redis test CA", &["127.0.0.1"]).expect("pki");
    let other = authinfod::tls::generate_pki("another CA", &["127.0.0.1"]).expect("pki");
    let cert = write("redis.crt", &pki.cert_pem, 0o644);
    let key = write("redis.key", &pki.key_pem, 0o600);
    let ca = write("redis-ca.pem", &pki.ca_pem, 0o644);
    let other_ca = write("other-ca.pem", &other.ca_pem, 0o644);
    let password = "correct horse battery staple";
    let password_file = write("redis-password", &format!("{password}\n"), 0o600);
    let wrong_password_file = write("wrong-password", "hunter2\n", 0o600);
    let tls_port = crate::support::free_port();
    let args = [
        "--tls-port",
        &tls_port.to_string(),
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca,
        "--tls-auth-clients",
        "no",
        // The replicas' user; the default user (no password) is switched off.
        "--user",
        "authinfo",
        "on",
        &format!(">{password}"),
        "~*",
        "&*",
        "+@all",
        "--user",
        "default",
        "off",
    ]
    .map(str::to_owned)
    .to_vec();
    let redis = RedisServer::start_with(dir.path(), args).await;
    assert!(
        redis
            .command(&["PING"])
            .await
            .expect("PING")
            .starts_with("-NOAUTH"),
        "no command without the password"
    );
    let cluster = format!(
        "[cluster]\nredis_url = \"rediss://127.0.0.1:{tls_port}/0\"\nusername = \"authinfo\"\npassword_file = \"{password_file}\"\nca_file = \"{ca}\"\n"
    );
    let lab = ClusterLab::assemble(
        dir.clone(),
        redis,
        &cluster,
        lab::world(0, 45),
        "[fleet]\nenabled = false\n",
    )
    .await;

    let good = lab.replica("good").await;
    let device = lab.device();
    let used = send_served(&lab.files, good.addr, &device, "RAW-1", "the first use").await;
    assert_replayed(&lab.files, good.addr, &used).await;
    let keys = lab
        .redis
        .command_as("authinfo", password, &["KEYS", "*"])
        .await
        .expect("KEYS as the replicas' user");
    assert!(keys.contains(":nonce:T-1001:"), "{keys}");
    let (status, doc) = healthz(good.admin_addr).await;
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["cluster"]["redis_up"], true, "{doc}");
    assert!(
        !doc.to_string().contains(password),
        "no password in /healthz: {doc}"
    );

    let password_line = format!("password_file = \"{password_file}\"");
    let wrong_password_line = format!("password_file = \"{wrong_password_file}\"");
    let ca_line = format!("ca_file = \"{ca}\"");
    let other_ca_line = format!("ca_file = \"{other_ca}\"");
    let user_line = "username = \"authinfo\"";
    // (replica, config lines replaced, what /healthz must say)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str);
    let cases: [Case; 3] = [
        (
            "no-credentials",
            vec![(user_line, ""), (password_line.as_str(), "")],
            "NOAUTH",
        ),
        (
            "wrong-password",
            vec![(password_line.as_str(), wrong_password_line.as_str())],
            "authentication failed",
        ),
        (
            "other-ca",
            vec![(ca_line.as_str(), other_ca_line.as_str())],
            "invalid peer certificate: UnknownIssuer",
        ),
    ];
    for (name, replace, reason) in cases {
        let replica = lab.replica_with(name, &replace).await;
        let (body, authorization) = signed_authinfo(&device, name);
        let refused = send(&lab.files, replica.addr, &body, &authorization).await;
        let refusal = assert_refused(&refused, 503, codes::CLUSTER_UNAVAILABLE);
        assert!(refusal.retryable, "{name}: {refusal:?}");
        let (status, doc) = healthz(replica.admin_addr).await;
        assert_eq!(status, 503, "{name}: {doc}");
        assert_eq!(doc["cluster"]["redis_up"], false, "{name}: {doc}");
        let error = doc["cluster"]["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(reason),
            "{name}: the error says why: {error}"
        );
        replica.stop().await;
    }
    assert_eq!(
        lab.authinfo_calls(),
        1,
        "only the good replica's first request was forwarded"
    );
    good.stop().await;
}

/// A replica process killed with SIGKILL while it holds the fleet-sync lease (it cannot give it
/// up): another takes the lease within the lease time and can sync; the third is refused.
#[tokio::test]
async fn binary_a_killed_lease_holder_is_replaced_within_the_lease_time() {
    let lab = ClusterLab::start(lab::world(0, 45), "").await;
    let mut replicas: Vec<ReplicaProcess> = Vec::new();
    for name in ["a", "b", "c"] {
        replicas.push(ReplicaProcess::start(&lab, name).await);
    }
    // Wait for a holder all three agree on.
    let deadline = Instant::now() + GENEROUS;
    let holder = loop {
        let mut seen = Vec::new();
        for r in &replicas {
            let (_, doc) = healthz(r.admin).await;
            seen.push(doc["cluster"]["lease_holder"].as_str().map(str::to_owned));
        }
        if let Some(Some(h)) = seen.first()
            && seen.iter().all(|s| s.as_deref() == Some(h.as_str()))
        {
            break h.clone();
        }
        assert!(Instant::now() < deadline, "no agreed holder: {seen:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut index = None;
    for (i, r) in replicas.iter().enumerate() {
        let (_, doc) = healthz(r.admin).await;
        if doc["cluster"]["replica"].as_str() == Some(holder.as_str()) {
            index = Some(i);
        }
    }
    let killed = replicas.remove(index.expect("the holder is one of the three"));
    let killed_at = Instant::now();
    drop(killed); // SIGKILL: no shutdown, the lease is not given up.
    let deadline = killed_at + GENEROUS;
    let successor = loop {
        let (_, doc) = healthz(replicas[0].admin).await;
        match doc["cluster"]["lease_holder"].as_str() {
            Some(h) if h != holder => break h.to_owned(),
            _ => {}
        }
        assert!(Instant::now() < deadline, "nobody took the lease over");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let took = killed_at.elapsed();
    // The lease runs out at most LEASE after the holder's last renewal, and the others look
    // every LEASE / 3: LEASE + LEASE / 3, with a second's slack for a loaded machine.
    assert!(
        took <= LEASE + LEASE / 3 + Duration::from_secs(1),
        "the lease moved after {took:?}"
    );
    let before = lab.list_calls();
    for r in &replicas {
        let (_, doc) = healthz(r.admin).await;
        let (status, body) = admin(r.admin, "POST", "/fleet/sync").await;
        if doc["cluster"]["replica"].as_str() == Some(successor.as_str()) {
            assert_eq!(status, 200, "the successor syncs: {body}");
        } else {
            assert_eq!(status, 409, "{body}");
        }
    }
    assert_eq!(lab.list_calls(), before + 1, "one sync, by the successor");
    let _ = &lab.dir;
}

/// An `authinfo-proxy serve` process on its own ports, killed (SIGKILL) on drop.
struct ReplicaProcess {
    child: std::process::Child,
    admin: SocketAddr,
}

impl ReplicaProcess {
    async fn start(lab: &ClusterLab, name: &str) -> Self {
        let free = || SocketAddr::from(([127, 0, 0, 1], crate::support::free_port()));
        let (listen, admin) = (free(), free());
        let config = lab.replica_config(name, &listen.to_string(), &admin.to_string());
        let log =
            std::fs::File::create(lab.files.path(&format!("replica-{name}.log"))).expect("log");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_authinfo-proxy"))
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("authinfo-proxy");
        let deadline = Instant::now() + GENEROUS;
        while tokio::net::TcpStream::connect(admin).await.is_err() {
            assert!(Instant::now() < deadline, "replica {name} never listened");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self { child, admin }
    }
}

impl Drop for ReplicaProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `examples/haproxy.cfg` is valid, and as written (only its addresses changed) it carries
/// terminals' TLS through to two replicas: signed requests are served, a replay through it is
/// refused, and when one replica stops the other serves on.
#[tokio::test]
async fn binary_the_example_haproxy_config_passes_tls_through_to_the_replicas() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/haproxy.cfg");
    let check = std::process::Command::new(haproxy())
        .args(["-c", "-f", example])
        .output()
        .expect("haproxy (scripts/setup installs it)");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let lab = ClusterLab::start(lab::world(0, 45), "[fleet]\nenabled = false\n").await;
    let a = lab.replica("a").await;
    let b = lab.replica("b").await;
    let front = SocketAddr::from(([127, 0, 0, 1], crate::support::free_port()));
    let text = std::fs::read_to_string(example).expect("example");
    let mut config = String::new();
    for line in text.lines() {
        let line = match line.trim_start() {
            "bind :443" => format!("    bind {front}"),
            l if l.starts_with("default-server ") => l
                .replace(" port 9464", "")
                .replace("default-server", "    default-server"),
            l if l.starts_with("server proxy1 ") => {
                format!(
                    "    server proxy1 {} check port {}",
                    a.addr,
                    a.admin_addr.port()
                )
            }
            l if l.starts_with("server proxy2 ") => {
                format!(
                    "    server proxy2 {} check port {}",
                    b.addr,
                    b.admin_addr.port()
                )
            }
            l if l.starts_with("server proxy3 ") => continue,
            _ => line.to_owned(),
        };
        config.push_str(&line);
        config.push('\n');
    }
    let path = lab.files.path("haproxy.cfg");
    std::fs::write(&path, config).expect("write");
    let _haproxy = KillOnDrop(
        std::process::Command::new(haproxy())
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("haproxy"),
    );
    let device = lab.device();
    // Until HAProxy listens and has checked both replicas up.
    let deadline = Instant::now() + GENEROUS;
    while tokio::net::TcpStream::connect(front).await.is_err() {
        assert!(Instant::now() < deadline, "haproxy never listened");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut served = 0;
    for i in 0..6 {
        let used = send_served(
            &lab.files,
            front,
            &device,
            &format!("RAW-{i}"),
            "through the load balancer",
        )
        .await;
        served += 1;
        if i == 5 {
            assert_replayed(&lab.files, front, &used).await;
        }
    }
    assert_eq!(lab.authinfo_calls(), served);
    a.stop().await;
    for i in 0..4 {
        send_served(
            &lab.files,
            front,
            &device,
            &format!("AFTER-{i}"),
            "with one replica stopped",
        )
        .await;
    }
    b.stop().await;
}

/// A child process killed on drop.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Debian's haproxy is in /usr/sbin, which a user's PATH may not hold.
fn haproxy() -> &'static str {
    if std::path::Path::new("/usr/sbin/haproxy").exists() {
        "/usr/sbin/haproxy"
    } else {
        "haproxy"
    }
}
