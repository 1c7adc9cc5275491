//! Cluster load test: a fleet of simulated terminals, each with its own RSA-2048 device key,
//! sends signed `POST /v1/authinfo` over real TLS to two `authinfo-proxy` replicas that share a
//! real `redis-server` (`[cluster]`), in front of the sandbox's WeChat Pay. It measures the
//! sustained rate, the latency and the CPU each part spends per request, and then checks that
//! no nonce was accepted twice.
//!
//! The parts: `redis-server` as its own process (on a free loopback port, no persistence);
//! the sandbox and the two replicas in this process, each on its own multi-thread runtime whose
//! threads are named `sandbox`, `replica-a` and `replica-b`, so `/proc/self/task` tells their
//! CPU time apart; the terminals on this process's main thread (a current-thread runtime,
//! keep-alive HTTPS connections on hyper and tokio-rustls, pinned to the lab's proxy CA). In
//! process rather than as release binaries: the replicas' figures are per thread group exactly
//! as in benches/proxy.rs, and the sandbox's state (what WeChat Pay received) can be read.
//!
//! The fleet check stays on: the sandbox lists every terminal's serial as ACTIVATED, and the
//! load starts once both replicas hold that list (one pages it under the lease, the other takes
//! it from Redis). The limits that would refuse a flood are raised (printed at the start): the
//! per-device authinfo bucket, and the merchant's WeChat Pay ceiling (shared by the replicas in
//! Redis); the sandbox has no authinfo limit of its own. A refusal is an error, never a success.
//!
//! Terminal `i` talks to replica `i % 2`. The terminals do not each hold a connection: every
//! replica gets `--connections / 2` keep-alive connections, which take that replica's requests
//! from one queue (a terminal's requests are signed with its key, whichever connection carries
//! them). Every request is signed before the run with a fresh nonce and one timestamp, so the
//! run is a fixed number of requests that must finish within the proxy's 300 s window.
//!
//! After the timed run, a sample of the accepted requests is sent again, each to both replicas:
//! every one must be refused with 401 `REPLAYED_NONCE`. WeChat Pay's authinfo calls at the
//! sandbox must equal the 200s, and the nonces in Redis must equal the accepted requests.
//!
//! Exit status: 0 after a measurement with no error and every check passed; 1 when the setup
//! fails, a request is answered other than 200 with an authinfo, or a check fails.
//!
//! Run it with `scripts/bench-cluster` (or `cargo bench --bench cluster`). Options (after
//! `--`): `--terminals N` (1000), `--requests N` timed requests (5000), `--connections N` in
//! all, half per replica (64), `--replays N` accepted requests sent again (200).

mod common;

use common::https::{
    RAISED_LIMITS, RAISED_LIMITS_NOTE, Signed, Target, check, code_of, connect, drain, post, sign,
};
use common::{load_average, machine_ticks, on_cpu, parallel, percentile, positive};

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use authinfod::crypto::{self, GeneratedKey, RsaSigner};
use authinfod::demo::lab::{self, LabFiles, LabKeys, ProxyConfigSpec};
use authinfod::proxy::{self as proxy_lib, RunningProxy};
use authinfod::sandbox::RunningSandbox;
use authinfod::units::unix_now;
use authinfod::wire::auth::DeviceSigner;
use authinfod::wire::{ROUTE_AUTHINFO, codes};
use bytes::Bytes;

/// The replicas, by the name of their state directory and their runtime's threads.
const REPLICAS: [&str; 2] = ["replica-a", "replica-b"];
/// The sandbox runtime's thread name (at most 15 bytes: Linux truncates thread names).
const SANDBOX_THREAD: &str = "sandbox";
/// Untimed requests each connection sends before the window.
const WARMUP_PER_CONNECTION: usize = 2;
/// How long the replicas get to hold the fleet list.
const FLEET_WAIT: Duration = Duration::from_secs(120);
/// How long redis-server gets to answer after it started.
const REDIS_WAIT: Duration = Duration::from_secs(10);
/// WeChat Pay's authinfo call, as the sandbox records it.
const UPSTREAM_AUTHINFO: &str = "POST /v3/offlineface/authinfo";
/// `/proc/stat` counts CPU time in USER_HZ ticks, 100 per second on Linux.
const TICKS_PER_SECOND: f64 = 100.0;

fn main() -> ExitCode {
    let options = <Options as clap::Parser>::parse();
    match run(&options) {
        Ok(Verdict::Passed) => ExitCode::SUCCESS,
        Ok(Verdict::Failed(why)) => {
            eprintln!("bench cluster: FAILED: {why}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("bench cluster: setup failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Simulated terminals against two proxy replicas on Redis and the sandbox.
#[derive(Debug, clap::Parser)]
#[command(name = "bench cluster")]
struct Options {
    /// Simulated terminals, each with its own RSA-2048 key.
    #[arg(long, default_value_t = 1000, value_parser = positive)]
    terminals: usize,
    /// Timed requests.
    #[arg(long, default_value_t = 5000, value_parser = positive)]
    requests: usize,
    /// Keep-alive connections in all, half to each replica.
    #[arg(long, default_value_t = 64, value_parser = even)]
    connections: usize,
    /// Accepted requests sent again (each to both replicas) after the run.
    #[arg(long, default_value_t = 200, value_parser = positive)]
    replays: usize,
    /// Passed by cargo to every bench executable.
    #[arg(long, hide = true)]
    bench: bool,
}

/// A positive even number (one half per replica).
fn even(text: &str) -> Result<usize, String> {
    match positive(text)? {
        n if n % 2 == 0 => Ok(n),
        n => Err(format!(
            "{n} is not even (half the connections go to each replica)"
        )),
    }
}

/// How the run ended, once measured.
enum Verdict {
    Passed,
    Failed(String),
}

fn run(options: &Options) -> anyhow::Result<Verdict> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    println!(
        "authinfo-proxy cluster load test: POST {ROUTE_AUTHINFO} from simulated terminals to two replicas on Redis and the sandbox"
    );
    println!(
        "  machine     {cores} CPUs, load average {} before the run",
        load_average()
    );
    println!(
        "  load        {} terminals (own RSA-2048 keys), {} timed requests, {} keep-alive TLS connections ({} per replica), {WARMUP_PER_CONNECTION} untimed requests per connection first",
        options.terminals,
        options.requests,
        options.connections,
        options.connections / 2,
    );
    println!(
        "  raised      {RAISED_LIMITS_NOTE}; fleet check on; sandbox without an authinfo limit"
    );

    let started = Instant::now();
    let (lab_keys, keys) = generate_keys(options.terminals, cores)?;
    println!(
        "generated {} RSA-2048 keys ({} terminals + 5 for the lab) in {:.1} s on {cores} threads",
        keys.len() + 5,
        keys.len(),
        started.elapsed().as_secs_f64()
    );

    let dir = tempfile::Builder::new()
        .prefix("authinfo-proxy-cluster-bench-")
        .tempdir()
        .context("cannot make a temporary directory")?;
    let started = Instant::now();
    let cluster = Cluster::start(dir.path(), &lab_keys, &keys, cores)?;
    let terminals = cluster.terminals(&keys)?;
    drop(keys);
    println!(
        "started redis-server (pid {}, {}), the sandbox ({}) and replicas at https://{} and https://{} in {:.1} s; both hold the fleet list of {} devices",
        cluster.redis.pid(),
        cluster.redis.url(),
        cluster.sandbox.base_url,
        cluster.replicas[0].addr,
        cluster.replicas[1].addr,
        started.elapsed().as_secs_f64(),
        options.terminals + 1,
    );

    let targets = cluster.targets()?;
    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the client runtime")?;
    for (r, target) in targets.iter().enumerate() {
        let terminal = terminals
            .iter()
            .find(|t| t.replica == r)
            .ok_or_else(|| anyhow!("no terminal for replica {}", REPLICAS[r]))?;
        let body = Bytes::from_static(br#"{"raw_data":"CLUSTER-BENCH-CHECK"}"#);
        client.block_on(check(target, &terminal.signer, body))?;
    }
    println!("one request checked at each replica: 200 with an authinfo");

    let presigned = presign(&terminals, options, cores)?;
    println!(
        "pre-signed {} requests ({} warm-up) in {:.2} s on {cores} threads ({:.0} signs/s), each with its terminal's key and a fresh nonce, outside the timed window",
        presigned.timed.len() + presigned.warmup.len(),
        presigned.warmup.len(),
        presigned.took.as_secs_f64(),
        (presigned.timed.len() + presigned.warmup.len()) as f64 / presigned.took.as_secs_f64(),
    );
    let signed_at = presigned.timestamp;
    let presigned = Arc::new(presigned);
    let measured = client.block_on(load(&targets, options, presigned.clone(), &cluster))?;
    let replays = client.block_on(replay(&targets, &presigned, &measured, options.replays))?;
    drop(client);

    let upstream = cluster.received(UPSTREAM_AUTHINFO);
    let answered_ok: u64 = cluster
        .replicas
        .iter()
        .map(|r| r.app.metrics.requests(ROUTE_AUTHINFO, "OK"))
        .sum();
    let nonces_in_redis = cluster.redis.count_keys("*:nonce:*")?;
    let age = unix_now() - signed_at;
    cluster.stop();

    // The checks and the warm-up are accepted requests too: two checks, then warm-ups.
    let accepted = 2 + presigned.warmup.len() + measured.accepted.len();
    let report = Report {
        cores,
        options,
        run: &measured,
        replays: &replays,
        accepted,
        upstream,
        answered_ok,
        nonces_in_redis,
        age,
    };
    report.print();
    println!();
    println!("load average {} after the run", load_average());
    Ok(report.verdict())
}

// === keys and the fleet ===

/// The lab's five keys and one per terminal, generated on `threads` threads.
fn generate_keys(terminals: usize, threads: usize) -> anyhow::Result<(LabKeys, Vec<GeneratedKey>)> {
    let total = terminals + 5;
    let mut keys = parallel(total, threads, |_| Ok(crypto::generate_rsa_key(2048)?))?.into_iter();
    let mut lab_key = || keys.next().ok_or_else(|| anyhow!("a lab key is missing"));
    let lab_keys = LabKeys {
        wechat_merchant: lab_key()?,
        wechat_platform: lab_key()?,
        alipay_app: lab_key()?,
        alipay_platform: lab_key()?,
        device: lab_key()?,
    };
    Ok((lab_keys, keys.collect()))
}

/// A simulated terminal: its signer and the replica it talks to.
struct Terminal {
    signer: DeviceSigner,
    replica: usize,
}

/// Terminal `i`'s device id.
fn device_id(i: usize) -> String {
    format!("LOAD-{i:05}")
}

/// `[[device]]` entries for the terminals, with the serials the sandbox lists.
fn registry_entries(keys: &[GeneratedKey], serials: &[String]) -> String {
    let mut text = String::new();
    for (i, (key, sn)) in keys.iter().zip(serials).enumerate() {
        text.push_str(&format!(
            "\n[[device]]\ndevice_id = \"{}\"\npublic_key = \"\"\"\n{}\"\"\"\ndevice_sn = \"{sn}\"\nsub_mchid = \"1900000002\"\nsub_appid = \"wxsandboxsubapp0001\"\norganization_id = \"ORG-LOAD\"\n",
            device_id(i),
            key.public.to_pem(),
        ));
    }
    text
}

// === the cluster ===

/// redis-server, the sandbox and two replicas, each on its own runtime.
struct Cluster {
    files: LabFiles,
    redis: RedisServer,
    sandbox: RunningSandbox,
    sandbox_runtime: tokio::runtime::Runtime,
    replicas: Vec<RunningProxy>,
    replica_runtimes: Vec<tokio::runtime::Runtime>,
}

impl Cluster {
    /// Writes the lab's files with `keys`' terminals enrolled, starts everything and waits until
    /// both replicas hold the fleet list.
    fn start(
        dir: &Path,
        lab_keys: &LabKeys,
        keys: &[GeneratedKey],
        cores: usize,
    ) -> anyhow::Result<Self> {
        let runtime = |name: &str| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(cores)
                .thread_name(name)
                .enable_all()
                .build()
                .with_context(|| format!("cannot start the {name} runtime"))
        };
        let generated = lab::write_keys_for(dir, lab_keys, Some("127.0.0.1"))
            .context("cannot write the lab's keys")?;
        let files = LabFiles {
            dir: dir.to_owned(),
        };
        // Every device the sandbox lists is activated: the fleet check passes every terminal.
        let mut world = lab::world(keys.len(), 90);
        for device in &mut world.wechat_devices {
            device.activation_status = Some("ACTIVATED".into());
        }
        let serials: Vec<String> = world.wechat_devices[1..]
            .iter()
            .map(|d| d.device_sn.clone().unwrap_or_default())
            .collect();
        let registry = files
            .write_registry(&generated.device_public)
            .context("cannot write the registry")?;
        let mut text = std::fs::read_to_string(&registry).context("cannot read the registry")?;
        text.push_str(&registry_entries(keys, &serials));
        std::fs::write(&registry, text).context("cannot write the registry")?;

        let redis = RedisServer::start(dir)?;
        let sandbox_runtime = runtime(SANDBOX_THREAD)?;
        let listener = sandbox_runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .context("cannot listen for the sandbox")?;
        let sandbox_url = format!("https://127.0.0.1:{}", listener.local_addr()?.port());
        let extra = format!(
            "[cluster]\nredis_url = \"{}\"\n\n{RAISED_LIMITS}",
            redis.url()
        );
        files
            .write_proxy_config(
                &generated,
                &ProxyConfigSpec {
                    extra: &extra,
                    ..ProxyConfigSpec::new(&sandbox_url)
                },
            )
            .context("cannot write the proxy config")?;
        let sandbox = sandbox_runtime
            .block_on(async {
                lab::start_sandbox(
                    generated.sandbox_keys,
                    &generated.sandbox_pki,
                    listener,
                    world,
                )
            })
            .context("cannot start the sandbox")?;
        let mut replicas = Vec::new();
        let mut replica_runtimes = Vec::new();
        for name in REPLICAS {
            let path = replica_config(&files, name)?;
            let config =
                proxy_lib::config::load_with_env(&path, &proxy_lib::config::no_environment)
                    .with_context(|| format!("{name}: invalid config"))?;
            let rt = runtime(name)?;
            let replica = rt
                .block_on(proxy_lib::start(config))
                .map_err(|e| anyhow!("{name}: {}", authinfod::error_chain(&e)))?;
            replicas.push(replica);
            replica_runtimes.push(rt);
        }
        let cluster = Self {
            files,
            redis,
            sandbox,
            sandbox_runtime,
            replicas,
            replica_runtimes,
        };
        let expected = keys.len() + 1;
        let deadline = Instant::now() + FLEET_WAIT;
        while !cluster
            .replicas
            .iter()
            .all(|r| r.app.fleet.snapshot().devices.len() == expected)
        {
            if Instant::now() > deadline {
                let held: Vec<usize> = cluster
                    .replicas
                    .iter()
                    .map(|r| r.app.fleet.snapshot().devices.len())
                    .collect();
                bail!(
                    "the replicas hold fleet lists of {held:?} devices, not {expected}, after {FLEET_WAIT:?}"
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(cluster)
    }

    /// The terminals' signers, terminal `i` on replica `i % 2`.
    fn terminals(&self, keys: &[GeneratedKey]) -> anyhow::Result<Vec<Terminal>> {
        keys.iter()
            .enumerate()
            .map(|(i, key)| {
                let signer = RsaSigner::from_pem(&key.private_pem, "a terminal's key")?;
                Ok(Terminal {
                    signer: DeviceSigner::new(device_id(i), signer),
                    replica: i % REPLICAS.len(),
                })
            })
            .collect()
    }

    /// How to reach each replica, trusting only the lab's proxy CA (as a terminal does).
    fn targets(&self) -> anyhow::Result<Vec<Target>> {
        let first = self.replicas.first().context("no replica")?;
        let pinned = Target::pinned(first.addr, &self.files.path("proxy-ca.pem"))?;
        Ok(self.replicas.iter().map(|r| pinned.at(r.addr)).collect())
    }

    /// Requests the sandbox received that start with `prefix`.
    fn received(&self, prefix: &str) -> usize {
        self.sandbox
            .state
            .received()
            .iter()
            .filter(|r| r.request.starts_with(prefix))
            .count()
    }

    /// Stops the replicas, the sandbox and Redis.
    fn stop(self) {
        for (replica, rt) in self.replicas.into_iter().zip(&self.replica_runtimes) {
            rt.block_on(replica.stop());
        }
        self.sandbox_runtime.block_on(self.sandbox.stop());
        drop(self.redis);
    }
}

/// Replica `name`'s config: the shared one with its own state directory (and port 0 for both
/// listeners, as the shared one has).
fn replica_config(files: &LabFiles, name: &str) -> anyhow::Result<PathBuf> {
    let shared = std::fs::read_to_string(files.path("authinfo-proxy.toml"))
        .context("cannot read the proxy config")?;
    let own: String = shared
        .lines()
        .map(|line| {
            if line.starts_with("state_dir = ") {
                format!("state_dir = \"proxy-state-{name}\"")
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let path = files.path(&format!("authinfo-proxy-{name}.toml"));
    std::fs::write(&path, own).with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::set_permissions(
        &path,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
    )
    .with_context(|| format!("cannot chmod {}", path.display()))?;
    Ok(path)
}

// === redis-server ===

/// A `redis-server` on a free loopback port, without persistence, killed on drop. (The cluster
/// tests' `tests/support/redis.rs` does the same with panics; a bench reports a setup failure
/// and exits 1 instead.)
struct RedisServer {
    port: u16,
    child: Child,
}

impl RedisServer {
    fn start(dir: &Path) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("no free port for redis-server")?
            .port();
        let log = std::fs::File::create(dir.join("redis.log")).context("cannot make redis.log")?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--maxmemory-policy", "noeviction"])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::from(log))
            .stderr(Stdio::null())
            .spawn()
            .context("cannot run redis-server (scripts/setup installs it)")?;
        let server = Self { port, child };
        let deadline = Instant::now() + REDIS_WAIT;
        loop {
            match server.command(&["PING"]) {
                Ok(answer) if answer.starts_with("+PONG") => return Ok(server),
                _ if Instant::now() > deadline => {
                    bail!("redis-server on port {port} never answered PING")
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// One command in RESP over a raw connection (independent of the code under test); the
    /// reply as text.
    fn command(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut request = format!("*{}\r\n", args.len());
        for a in args {
            request.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        stream.write_all(request.as_bytes())?;
        let mut buf = vec![0u8; 64 * 1024];
        let n = stream.read(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// How many keys match `pattern` (a Lua `KEYS` inside Redis, so only the count comes back).
    fn count_keys(&self, pattern: &str) -> anyhow::Result<usize> {
        let answer =
            self.command(&["EVAL", "return #redis.call('KEYS', ARGV[1])", "0", pattern])?;
        answer
            .strip_prefix(':')
            .and_then(|n| n.trim_end().parse().ok())
            .ok_or_else(|| anyhow!("unexpected answer to the key count: {answer:?}"))
    }

    /// Its CPU time so far, summed over its threads.
    fn cpu(&self) -> Duration {
        process_cpu(self.pid())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Process `pid`'s threads' time on a CPU so far.
fn process_cpu(pid: u32) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Duration::ZERO;
    };
    tasks
        .flatten()
        .filter_map(|t| on_cpu(&t.path().join("schedstat")).ok())
        .sum()
}

// === the terminals' side ===

/// One signed request and the replica its terminal talks to.
struct Routed {
    signed: Signed,
    replica: usize,
}

/// Signs `body` for `POST /v1/authinfo` at `timestamp` with a fresh nonce, by `terminal`.
fn sign_for(terminal: &Terminal, timestamp: i64, body: Bytes) -> anyhow::Result<Routed> {
    Ok(Routed {
        signed: sign(&terminal.signer, ROUTE_AUTHINFO, timestamp, body)?,
        replica: terminal.replica,
    })
}

/// The run's requests, signed before it with one timestamp.
struct Presigned {
    /// `WARMUP_PER_CONNECTION` per connection, each replica's first.
    warmup: Vec<Routed>,
    /// Request `k` is terminal `k % terminals`'s.
    timed: Vec<Routed>,
    timestamp: i64,
    took: Duration,
}

/// Signs the warm-up and the timed requests on `threads` threads, each with its terminal's key.
fn presign(terminals: &[Terminal], options: &Options, threads: usize) -> anyhow::Result<Presigned> {
    let warmups = options.connections * WARMUP_PER_CONNECTION;
    let count = warmups + options.requests;
    let timestamp = unix_now();
    let started = Instant::now();
    // Warm-up `w` is terminal `w`'s (so it lands on replica `w % 2`, half each); timed request
    // `k` is terminal `k`'s, round the fleet.
    let terminal_of = |i: usize| {
        if i < warmups {
            &terminals[i % terminals.len()]
        } else {
            &terminals[(i - warmups) % terminals.len()]
        }
    };
    let mut all = parallel(count, threads, |i| {
        let body = format!(r#"{{"raw_data":"CLUSTER-BENCH-{i:07}"}}"#);
        sign_for(terminal_of(i), timestamp, Bytes::from(body))
    })?;
    let took = started.elapsed();
    let timed = all.split_off(warmups);
    Ok(Presigned {
        warmup: all,
        timed,
        timestamp,
        took,
    })
}

/// The timed run: each replica's connections send their warm-up requests, then take that
/// replica's timed requests from one queue as fast as the answers come back. The window runs
/// from their common start to the last answer.
async fn load(
    targets: &[Target],
    options: &Options,
    presigned: Arc<Presigned>,
    cluster: &Cluster,
) -> anyhow::Result<Measured> {
    let per_replica = options.connections / REPLICAS.len();
    // Each replica's queue: the indices of its terminals' timed requests, in order.
    let queues: Vec<Arc<[usize]>> = (0..REPLICAS.len())
        .map(|r| {
            (0..presigned.timed.len())
                .filter(|&k| presigned.timed[k].replica == r)
                .collect::<Vec<_>>()
                .into()
        })
        .collect();
    let warmups: Vec<Vec<usize>> = (0..REPLICAS.len())
        .map(|r| {
            (0..presigned.warmup.len())
                .filter(|&w| presigned.warmup[w].replica == r)
                .collect()
        })
        .collect();
    let nexts: Vec<Arc<AtomicUsize>> = (0..REPLICAS.len())
        .map(|_| Arc::new(AtomicUsize::new(0)))
        .collect();
    // Every connection waits at `ready` once connected and warmed up, then at `go`; the CPU
    // counters are read in between, so the warm-up is outside the window.
    let ready = Arc::new(tokio::sync::Barrier::new(options.connections + 1));
    let go = Arc::new(tokio::sync::Barrier::new(options.connections + 1));
    let mut tasks = tokio::task::JoinSet::new();
    for (r, target) in targets.iter().enumerate() {
        for c in 0..per_replica {
            let mine: Vec<usize> = warmups[r]
                .iter()
                .skip(c * WARMUP_PER_CONNECTION)
                .take(WARMUP_PER_CONNECTION)
                .copied()
                .collect();
            let (queue, next) = (queues[r].clone(), nexts[r].clone());
            let (ready, go) = (ready.clone(), go.clone());
            let (target, presigned) = (target.clone(), presigned.clone());
            tasks.spawn(async move {
                // Every connection reaches the barriers, even one whose setup failed, so none
                // waits for ever; the failure is reported after the run.
                let setup = async {
                    let mut sender = connect(&target).await?;
                    for &w in &mine {
                        let (status, body) =
                            post(&mut sender, ROUTE_AUTHINFO, &presigned.warmup[w].signed).await?;
                        if status != 200 {
                            bail!("a warm-up request answered {status} {}", code_of(&body));
                        }
                    }
                    anyhow::Ok(sender)
                }
                .await;
                ready.wait().await;
                go.wait().await;
                let tally = drain(setup?, &target, &next, |at| {
                    let &k = queue.get(at)?;
                    Some((k, &presigned.timed[k].signed))
                })
                .await;
                anyhow::Ok(tally)
            });
        }
    }
    ready.wait().await;
    let cpu_before = CpuSnapshot::read(cluster)?;
    go.wait().await;
    let start = Instant::now();
    let results = tasks.join_all().await;
    let window = start.elapsed();
    let cpu = CpuSnapshot::read(cluster)?.since(&cpu_before);
    let mut measured = Measured {
        requests: presigned.timed.len(),
        window,
        latencies: Vec::with_capacity(presigned.timed.len()),
        accepted: Vec::with_capacity(presigned.timed.len()),
        failures: BTreeMap::new(),
        cpu,
    };
    for result in results {
        let tally = result?;
        measured.latencies.extend(tally.latencies);
        measured.accepted.extend(tally.accepted);
        for (what, n) in tally.failures {
            *measured.failures.entry(what).or_default() += n;
        }
    }
    measured.latencies.sort_unstable();
    measured.accepted.sort_unstable();
    Ok(measured)
}

/// Everything measured in the timed run.
struct Measured {
    requests: usize,
    window: Duration,
    /// Sorted, shortest first; one per timed request answered.
    latencies: Vec<Duration>,
    /// Timed requests answered 200 with an authinfo, by index, sorted.
    accepted: Vec<usize>,
    failures: BTreeMap<String, usize>,
    cpu: Cpu,
}

impl Measured {
    /// Answers (of any kind) per second of the window.
    fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.window.as_secs_f64()
    }

    fn errors(&self) -> usize {
        self.failures.values().sum()
    }

    /// CPU time per answered request.
    fn per_request(&self, cpu: Duration) -> Duration {
        cpu / u32::try_from(self.latencies.len().max(1)).unwrap_or(u32::MAX)
    }
}

/// What the replays were answered.
struct Replays {
    /// Distinct accepted requests sent again.
    sampled: usize,
    /// Replays sent (each sample to both replicas).
    sent: usize,
    /// Of them, refused with 401 REPLAYED_NONCE.
    refused: usize,
    /// Anything else, by status and code.
    other: BTreeMap<String, usize>,
}

/// Sends `sample` of the accepted timed requests again, evenly spread over the run, each first
/// to the replica that accepted it and then to the other.
async fn replay(
    targets: &[Target],
    presigned: &Presigned,
    measured: &Measured,
    sample: usize,
) -> anyhow::Result<Replays> {
    let accepted = &measured.accepted;
    let sample = sample.min(accepted.len());
    let mut senders = Vec::new();
    for target in targets {
        senders.push(connect(target).await?);
    }
    let mut replays = Replays {
        sampled: sample,
        sent: 0,
        refused: 0,
        other: BTreeMap::new(),
    };
    for s in 0..sample {
        let k = accepted[s * accepted.len() / sample];
        let signed = &presigned.timed[k];
        for r in [signed.replica, 1 - signed.replica] {
            let (status, body) = post(&mut senders[r], ROUTE_AUTHINFO, &signed.signed).await?;
            replays.sent += 1;
            let code = code_of(&body);
            if status == 401 && code == codes::REPLAYED_NONCE {
                replays.refused += 1;
            } else {
                *replays.other.entry(format!("{status} {code}")).or_default() += 1;
            }
        }
    }
    Ok(replays)
}

// === CPU time from /proc ===

/// CPU time used over the window.
#[derive(Debug, Clone, Copy)]
struct Cpu {
    /// Each replica's runtime threads.
    replicas: [Duration; 2],
    /// The sandbox runtime's threads.
    sandbox: Duration,
    /// The redis-server process.
    redis: Duration,
    /// This thread: the terminals.
    terminals: Duration,
    /// This process's other threads (sled's, tokio's blocking pool of the client runtime).
    rest: Duration,
    /// The machine's busy time outside this process and Redis: other builds, the kernel.
    other: Duration,
    /// What the machine had: the window × its CPUs.
    capacity: Duration,
}

/// Counters read at one moment.
struct CpuSnapshot {
    replicas: [Duration; 2],
    sandbox: Duration,
    redis: Duration,
    terminals: Duration,
    process: Duration,
    machine_busy: f64,
    machine_total: f64,
}

impl CpuSnapshot {
    fn read(cluster: &Cluster) -> anyhow::Result<Self> {
        let mut replicas = [Duration::ZERO; 2];
        let mut sandbox = Duration::ZERO;
        let mut process = Duration::ZERO;
        for entry in std::fs::read_dir("/proc/self/task").context("cannot list /proc/self/task")? {
            let path = entry.context("cannot list /proc/self/task")?.path();
            // A thread may end between the listing and the read; its time is then lost to both
            // snapshots alike.
            let Ok(on_cpu) = on_cpu(&path.join("schedstat")) else {
                continue;
            };
            let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
            let name = name.trim_end();
            if let Some(r) = REPLICAS.iter().position(|r| name.starts_with(r)) {
                replicas[r] += on_cpu;
            } else if name.starts_with(SANDBOX_THREAD) {
                sandbox += on_cpu;
            }
            process += on_cpu;
        }
        let terminals = on_cpu(Path::new("/proc/thread-self/schedstat"))?;
        let (machine_busy, machine_total) = machine_ticks()?;
        Ok(Self {
            replicas,
            sandbox,
            redis: cluster.redis.cpu(),
            terminals,
            process,
            machine_busy,
            machine_total,
        })
    }

    fn since(&self, before: &Self) -> Cpu {
        let d = |now: Duration, then: Duration| now.saturating_sub(then);
        let replicas = [
            d(self.replicas[0], before.replicas[0]),
            d(self.replicas[1], before.replicas[1]),
        ];
        let sandbox = d(self.sandbox, before.sandbox);
        let redis = d(self.redis, before.redis);
        let terminals = d(self.terminals, before.terminals);
        let process = d(self.process, before.process);
        let busy = (self.machine_busy - before.machine_busy) / TICKS_PER_SECOND;
        let total = (self.machine_total - before.machine_total) / TICKS_PER_SECOND;
        Cpu {
            replicas,
            sandbox,
            redis,
            terminals,
            rest: process.saturating_sub(replicas[0] + replicas[1] + sandbox + terminals),
            other: Duration::from_secs_f64(
                (busy - process.as_secs_f64() - redis.as_secs_f64()).max(0.0),
            ),
            capacity: Duration::from_secs_f64(total.max(0.0)),
        }
    }
}

// === report ===

struct Report<'a> {
    cores: usize,
    options: &'a Options,
    run: &'a Measured,
    replays: &'a Replays,
    /// Requests answered 200 with an authinfo: the two checks, the warm-up and the timed ones.
    accepted: usize,
    /// WeChat Pay authinfo calls the sandbox received.
    upstream: usize,
    /// `OK` outcomes the replicas counted on the route.
    answered_ok: u64,
    /// Nonce keys in Redis after the run.
    nonces_in_redis: usize,
    /// Seconds from the signing to the end of the checks.
    age: i64,
}

fn millis(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

impl Report<'_> {
    fn print(&self) {
        let run = self.run;
        println!();
        println!(
            "POST {ROUTE_AUTHINFO}, {} terminals over 2 replicas + Redis + sandbox, {} keep-alive HTTPS connections, pre-signed requests (timed from the common start to the last answer)",
            self.options.terminals, self.options.connections
        );
        println!(
            "{:>8} {:>8} {:>9} {:>10} {:>10} {:>10} {:>8}",
            "requests", "window", "req/s", "p50", "p99", "max", "errors"
        );
        println!("{}", "-".repeat(68));
        println!(
            "{:>8} {:>6.2} s {:>9.0} {:>10} {:>10} {:>10} {:>8}",
            run.requests,
            run.window.as_secs_f64(),
            run.rate(),
            millis(percentile(&run.latencies, 50.0)),
            millis(percentile(&run.latencies, 99.0)),
            millis(run.latencies.last().copied().unwrap_or_default()),
            run.errors(),
        );
        for (what, n) in &run.failures {
            println!("  error: {n} × {what}");
        }

        let c = &run.cpu;
        println!();
        println!(
            "CPU per request in the timed window: each thread group's CPU time (from /proc; redis-server is its own process) over all {} answers, so a replica's row is half of what one request costs the replica that serves it",
            run.latencies.len()
        );
        let rows = [
            (REPLICAS[0], c.replicas[0]),
            (REPLICAS[1], c.replicas[1]),
            ("both replicas", c.replicas[0] + c.replicas[1]),
            ("redis-server", c.redis),
            ("sandbox", c.sandbox),
            ("terminals", c.terminals),
            ("rest of process", c.rest),
        ];
        for (what, cpu) in rows {
            println!(
                "  {what:<16} {:>10} per request ({:.2} s)",
                millis(run.per_request(cpu)),
                cpu.as_secs_f64()
            );
        }
        println!(
            "  (the sandbox copies its whole world, {} listed devices, on every WeChat Pay call: its row grows with the fleet; WeChat Pay's cost, not the proxy's)",
            self.options.terminals + 1
        );
        let proxy_side = c.replicas[0] + c.replicas[1] + c.redis;
        println!(
            "  replicas + Redis: {} per request: {:.0} req/s per core of proxy capacity",
            millis(run.per_request(proxy_side)),
            1.0 / run.per_request(proxy_side).as_secs_f64().max(1e-9)
        );
        println!(
            "  machine: {:.1} s of CPU had over the window, {:.1} s busy elsewhere (other processes, the kernel)",
            c.capacity.as_secs_f64(),
            c.other.as_secs_f64()
        );

        let r = self.replays;
        println!();
        println!(
            "nonces: {} accepted once, {} replays refused at both replicas ({} accepted requests sent again to each replica; {} answered otherwise)",
            self.accepted,
            r.refused,
            r.sampled,
            r.sent - r.refused,
        );
        for (what, n) in &r.other {
            println!("  replay answered {n} × {what}");
        }
        println!(
            "WeChat Pay authinfo calls at the sandbox: {} for {} accepted requests (2 checks + {} warm-up + {} timed); the replicas counted {} OK; Redis holds {} nonces; the requests were {} s old at the end",
            self.upstream,
            self.accepted,
            self.accepted - 2 - run.accepted.len(),
            run.accepted.len(),
            self.answered_ok,
            self.nonces_in_redis,
            self.age,
        );
        println!(
            "Everything runs on the same {} cores: the rate is a lower bound for a deployment, where the sandbox's work is WeChat Pay's and the terminals are elsewhere.",
            self.cores
        );
    }

    fn verdict(&self) -> Verdict {
        let mut failed = Vec::new();
        if self.run.errors() > 0 {
            failed.push(format!(
                "{} of {} timed requests answered other than 200 with an authinfo",
                self.run.errors(),
                self.run.requests
            ));
        }
        if self.replays.refused != self.replays.sent || self.replays.sent == 0 {
            failed.push(format!(
                "{} of {} replays were not refused with 401 {}",
                self.replays.sent - self.replays.refused,
                self.replays.sent,
                codes::REPLAYED_NONCE
            ));
        }
        if self.upstream != self.accepted {
            failed.push(format!(
                "WeChat Pay received {} authinfo calls for {} accepted requests",
                self.upstream, self.accepted
            ));
        }
        if self.answered_ok != self.accepted as u64 {
            failed.push(format!(
                "the replicas counted {} OK for {} accepted requests",
                self.answered_ok, self.accepted
            ));
        }
        if self.nonces_in_redis != self.accepted {
            failed.push(format!(
                "Redis holds {} nonces for {} accepted requests",
                self.nonces_in_redis, self.accepted
            ));
        }
        if failed.is_empty() {
            Verdict::Passed
        } else {
            Verdict::Failed(failed.join("; "))
        }
    }
}
