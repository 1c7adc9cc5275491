//! Socket benchmark: the real `authinfod` binary, run as its own process, serving
//! `GET /v1/authinfo` from memory over its Unix socket.
//!
//! Measures one keep-alive client's latency (p50 / p90 / p99 / max, and `GET /healthz` for
//! comparison), the request rate of 32 keep-alive clients, and the daemon's RSS idle, under
//! load and after it, and prints them against the targets. It is a measurement, not a test:
//! it exits 0 whatever the figures, and 1 only when the setup fails.
//!
//! Run it with `scripts/bench-socket`, which builds the release binary exactly as shipped and
//! passes its path in `AUTHINFOD_BIN`. Without that variable, `cargo bench --bench socket`
//! uses the `authinfod` cargo built for the bench (bench profile: same code, other codegen).
//!
//! The same load is also run against a trivial hyper server on a Unix socket (this executable
//! again, as `--baseline-server`, in its own process) that answers the daemon's bytes: what the
//! machine, the kernel and this client allow, so the daemon's own cost is the difference.
//!
//! Two more modes ([`modes`]): `--mode abuse` runs the face app's probe while idle connections,
//! garbage senders, a slowloris and a denied peer's flood (as another uid, through `setpriv`) all
//! hit the daemon; `--mode nginx` runs the same load against Debian's nginx answering the same
//! body with `return 200` on a Unix socket, in rounds, and prints the ratios.
//!
//! Options (after `--`): `--requests N` sequential requests per latency run (20000),
//! `--seconds S` length of the concurrent run (10), `--clients C` (32), `--no-baseline`, `--mode
//! standard|abuse|nginx`, and the abuse mix (`--idle`, `--garbage`, `--slowloris`,
//! `--denied`) and the comparison's `--rounds`.

mod common;
#[path = "socket/modes.rs"]
mod modes;

use common::{load_average, machine_ticks, positive, seconds};

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use authinfod::terminal::store::{HeldAuthinfo, Store};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::{TokioIo, TokioTimer};

/// One-client latency target at the 99th percentile.
const TARGET_P99: Duration = Duration::from_micros(200);
/// 32-client throughput target on 2 cores, requests per second.
const TARGET_RATE: f64 = 20_000.0;
/// Resident memory target (VmRSS and VmHWM), KiB: 15 MiB.
const TARGET_RSS_KIB: u64 = 15 * 1024;

/// Untimed requests before the one-client authinfo run (connections, caches, CPU clocks).
const WARMUP: Duration = Duration::from_secs(2);
/// Untimed requests before the shorter comparison runs.
const SHORT_WARMUP: Duration = Duration::from_secs(1);
/// How long the daemon sits idle after start before its idle RSS is read.
const SETTLE: Duration = Duration::from_secs(1);
/// How often RSS is sampled during the concurrent run.
const RSS_SAMPLE_EVERY: Duration = Duration::from_millis(50);
/// How long the daemon (and the baseline server) may take to answer after spawning.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the daemon may take to stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// `/proc/<pid>/stat` counts CPU time in USER_HZ ticks, 100 per second on Linux.
const TICKS_PER_SECOND: f64 = 100.0;
/// Length of the seeded authinfo: WeChat Pay's are opaque strings of a few hundred characters.
const AUTHINFO_LEN: usize = 600;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "--abuser") {
        return match modes::abuser(&args[i + 1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("abuser: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(i) = args.iter().position(|a| a == "--baseline-server") {
        let (Some(socket), Some(body)) = (args.get(i + 1), args.get(i + 2)) else {
            eprintln!("--baseline-server needs SOCKET BODY_FILE");
            return ExitCode::FAILURE;
        };
        return match baseline::serve(Path::new(socket), Path::new(body)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("baseline server: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let options = <Options as clap::Parser>::parse();
    match run(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench socket: setup failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The daemon's socket latency, throughput and RSS, against a trivial hyper server.
#[derive(Debug, clap::Parser)]
#[command(name = "bench socket")]
struct Options {
    /// Sequential requests per latency run.
    #[arg(long, default_value_t = 20_000, value_parser = positive)]
    requests: usize,
    /// Length of the concurrent run, seconds.
    #[arg(long = "seconds", default_value = "10", value_parser = seconds)]
    window: Duration,
    /// Concurrent keep-alive clients.
    #[arg(long, default_value_t = 32, value_parser = positive)]
    clients: usize,
    /// Skip the trivial-server baseline.
    #[arg(long = "no-baseline", action = clap::ArgAction::SetFalse)]
    baseline: bool,
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Mode::Standard)]
    mode: Mode,
    /// Abuse mode: connections that never send a byte (reopened when closed).
    #[arg(long, default_value_t = 2000)]
    idle: usize,
    /// Abuse mode: clients sending garbage in a loop.
    #[arg(long, default_value_t = 100)]
    garbage: usize,
    /// Abuse mode: slowloris connections (a header line a second, never ending the head).
    #[arg(long, default_value_t = 50)]
    slowloris: usize,
    /// Abuse mode: a denied uid's clients connecting and requesting in a loop.
    #[arg(long, default_value_t = 32)]
    denied: usize,
    /// nginx mode: alternating rounds of the daemon and nginx.
    #[arg(long, default_value_t = 3, value_parser = positive)]
    rounds: usize,
    /// Passed by cargo to every bench executable.
    #[arg(long, hide = true)]
    bench: bool,
}

/// The benchmark's modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    /// One-client latency, concurrent throughput and RSS, against a trivial hyper server.
    Standard,
    /// The face app's probe while misbehaving clients hit the daemon.
    Abuse,
    /// The concurrent load against the daemon and nginx, alternating in rounds.
    Nginx,
}

fn run(options: &Options) -> anyhow::Result<()> {
    let (binary, binary_note) = match std::env::var_os("AUTHINFOD_BIN") {
        Some(path) => (PathBuf::from(path), "AUTHINFOD_BIN"),
        None => (
            PathBuf::from(env!("CARGO_BIN_EXE_authinfod")),
            "bench-profile build; run scripts/bench-socket for the release binary",
        ),
    };
    let dir = tempfile::Builder::new()
        .prefix("authinfod-bench-")
        .tempdir()
        .context("cannot make a temporary directory")?
        .keep();
    let setup = Setup::write(&dir, &binary)?;
    let log = dir.join("authinfod.log");

    println!("authinfod socket benchmark");
    println!("  binary      {} ({binary_note})", binary.display());
    println!("  daemon log  {}", log.display());
    println!(
        "  machine     {} CPUs, load average {} before the run",
        std::thread::available_parallelism().map_or(0, usize::from),
        load_average()
    );
    println!(
        "  runs        {} sequential requests after {} s warm-up; {} clients for {} s after 1 s warm-up",
        options.requests,
        WARMUP.as_secs(),
        options.clients,
        options.window.as_secs()
    );
    println!();

    let unit_env = unit_environment()?;
    println!(
        "  environment {} (systemd/authinfod.service's Environment=, as the unit runs it)",
        unit_env
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut daemon = Process::spawn(
        Command::new(&binary)
            .envs(unit_env)
            .arg("run")
            .arg("--config")
            .arg(&setup.config)
            .env("RUST_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID"),
        &log,
    )?;
    let body = wait_ready(&mut daemon, &setup.socket, &log)?;
    check_authinfo_body(&body, &setup.authinfo)?;
    std::thread::sleep(SETTLE);
    let idle = Memory::read(daemon.pid())?;
    match options.mode {
        Mode::Standard => {}
        Mode::Abuse => {
            modes::abuse(&dir, &setup.socket, &mut daemon, options, idle)?;
            return finish(daemon.stop()?, &setup);
        }
        Mode::Nginx => {
            modes::nginx(&dir, &setup.socket, &daemon, &body, options)?;
            return finish(daemon.stop()?, &setup);
        }
    }

    let measured = measure(&setup.socket, daemon.pid(), options, true)?;
    std::thread::sleep(SETTLE);
    let after = Memory::read(daemon.pid())?;
    let status = daemon.stop()?;

    let baseline = if options.baseline {
        let body_file = dir.join("baseline-body.json");
        std::fs::write(&body_file, &body).context("cannot write the baseline body")?;
        let socket = dir.join("baseline.sock");
        let mut server = Process::spawn(
            Command::new(std::env::current_exe().context("cannot find this executable")?)
                .arg("--baseline-server")
                .arg(&socket)
                .arg(&body_file),
            &dir.join("baseline.log"),
        )?;
        wait_ready(&mut server, &socket, &dir.join("baseline.log"))?;
        let measured = measure(&socket, server.pid(), options, false)?;
        server.stop()?;
        Some(measured)
    } else {
        None
    };

    report(&Report {
        options,
        daemon: &measured,
        baseline: baseline.as_ref(),
        idle,
        after,
    });
    finish(status, &setup)
}

/// Says how the daemon stopped, and cleans up.
fn finish(status: std::process::ExitStatus, setup: &Setup) -> anyhow::Result<()> {
    println!();
    println!(
        "daemon stopped on SIGTERM with {status}; load average {} after the run",
        load_average()
    );
    setup.clean_up();
    Ok(())
}

/// Every figure taken from one server.
#[derive(Debug)]
struct Measured {
    authinfo: Sample,
    healthz: Option<Sample>,
    load: Load,
}

/// Runs the one-client and the concurrent runs against the server on `socket`.
fn measure(socket: &Path, pid: u32, options: &Options, healthz: bool) -> anyhow::Result<Measured> {
    let single = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the current-thread runtime")?;
    let authinfo = single.block_on(sequential(socket, "/v1/authinfo", WARMUP, options.requests))?;
    let healthz = if healthz {
        Some(single.block_on(sequential(
            socket,
            "/healthz",
            SHORT_WARMUP,
            options.requests,
        ))?)
    } else {
        None
    };
    drop(single);
    let load = concurrent(socket, "/v1/authinfo", pid, options)?;
    Ok(Measured {
        authinfo,
        healthz,
        load,
    })
}

// === setup ===

/// The files the daemon is started with.
#[derive(Debug)]
struct Setup {
    config: PathBuf,
    socket: PathBuf,
    key: PathBuf,
    state_dir: PathBuf,
    authinfo: String,
}

impl Setup {
    /// Makes the device key (with the binary's own `keygen`), a CA, the config, and a store
    /// holding a fresh authinfo, so the daemon serves at once without a proxy.
    fn write(dir: &Path, binary: &Path) -> anyhow::Result<Self> {
        let key = dir.join("device.key");
        let keygen = Command::new(binary)
            .args(["keygen", "--out"])
            .arg(&key)
            .output()
            .with_context(|| format!("cannot run {}", binary.display()))?;
        if !keygen.status.success() {
            bail!(
                "authinfod keygen failed: {}",
                String::from_utf8_lossy(&keygen.stderr)
            );
        }
        let pki = authinfod::tls::generate_pki("authinfod bench CA", &["localhost"])
            .context("cannot make a CA certificate")?;
        let ca = dir.join("proxy-ca.pem");
        std::fs::write(&ca, &pki.ca_pem).context("cannot write the CA file")?;
        let state_dir = dir.join("state");
        let socket = dir.join("authinfod.sock");
        let config = dir.join("authinfod.toml");
        let text = format!(
            r#"device_id = "BENCH-0001"
key_file = "{key}"
state_dir = "{state}"

[proxy]
# Nothing listens here. No refresh is due during the run (the seeded authinfo is fresh and the
# interval is a day); the health checks fail at once (connection refused) and back off.
url = "https://127.0.0.1:9"
ca_file = "{ca}"
timeout = "2s"

[socket]
path = "{socket}"

[refresh]
interval = "1d"
"#,
            key = key.display(),
            state = state_dir.display(),
            ca = ca.display(),
            socket = socket.display(),
        );
        std::fs::write(&config, text).context("cannot write the config")?;

        let authinfo = fake_authinfo(AUTHINFO_LEN);
        let now = authinfod::units::unix_now();
        // The store holds an exclusive lock on the state directory: it must be dropped
        // before the daemon starts.
        {
            let (store, _) = Store::open(&state_dir).context("cannot open the store")?;
            store
                .save_authinfo(&HeldAuthinfo {
                    authinfo: authinfo.clone(),
                    fetched_at: now,
                    expires_at: now + 7200,
                    expires_in: None,
                    proxy_fetched_at: None,
                })
                .context("cannot seed the store")?;
        }
        Ok(Self {
            config,
            socket,
            key,
            state_dir,
            authinfo,
        })
    }

    /// Removes the key and the store; the config and the logs stay for inspection.
    fn clean_up(&self) {
        let _ = std::fs::remove_file(&self.key);
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// A deterministic base64 string of `len` characters (xorshift bytes), the shape of a real
/// authinfo.
fn fake_authinfo(len: usize) -> String {
    use base64::Engine as _;
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let bytes: Vec<u8> = (0..len.div_ceil(4) * 3)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect();
    let mut s = base64::engine::general_purpose::STANDARD.encode(bytes);
    s.truncate(len);
    s
}

/// Checks that the daemon serves the seeded authinfo, so the run measures the real answer.
fn check_authinfo_body(body: &[u8], expected: &str) -> anyhow::Result<()> {
    let doc: serde_json::Value =
        serde_json::from_slice(body).context("GET /v1/authinfo did not answer JSON")?;
    if doc["authinfo"].as_str() != Some(expected) || doc["state"].as_str() != Some("fresh") {
        bail!("GET /v1/authinfo answered something other than the seeded authinfo: {doc}");
    }
    Ok(())
}

// === processes ===

/// A child process that is killed if the benchmark fails before stopping it.
#[derive(Debug)]
struct Process {
    child: Child,
}

impl Process {
    fn spawn(command: &mut Command, log: &Path) -> anyhow::Result<Self> {
        let log_file = std::fs::File::create(log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("cannot spawn {command:?}"))?;
        Ok(Self { child })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends SIGTERM and waits for the exit; after [`STOP_TIMEOUT`] it fails, and the drop
    /// sends SIGKILL.
    fn stop(mut self) -> anyhow::Result<std::process::ExitStatus> {
        use nix::sys::signal::{Signal, kill};
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.pid())?);
        kill(pid, Signal::SIGTERM).context("cannot send SIGTERM")?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.exited() {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("pid {pid} did not stop within {STOP_TIMEOUT:?} of SIGTERM")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits until the server answers `GET /v1/authinfo` with 200; returns that body.
fn wait_ready(process: &mut Process, socket: &Path, log: &Path) -> anyhow::Result<Bytes> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime")?;
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut last = String::from("the socket did not appear");
    loop {
        if let Some(status) = process.exited() {
            bail!(
                "the server exited with {status} before answering; its log ({}):\n{}",
                log.display(),
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if socket.exists() {
            match runtime.block_on(get_once(socket, "/v1/authinfo")) {
                Ok((200, body)) => return Ok(body),
                Ok((status, _)) => last = format!("GET /v1/authinfo answered {status}"),
                Err(e) => last = format!("{e:#}"),
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "the server did not serve within {READY_TIMEOUT:?} ({last}); its log: {}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// === client ===

type Sender = SendRequest<Empty<Bytes>>;

/// Opens one keep-alive HTTP/1.1 connection; its driver runs as a task on the current runtime.
async fn connect(socket: &Path) -> anyhow::Result<Sender> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("cannot connect to {}", socket.display()))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP/1.1 handshake failed")?;
    tokio::spawn(conn);
    Ok(sender)
}

/// One request on a kept-alive connection: its status, the body read to the end.
async fn get(sender: &mut Sender, path: &str) -> anyhow::Result<(u16, Bytes)> {
    sender
        .ready()
        .await
        .context("the connection closed between requests")?;
    let request = hyper::Request::get(path)
        .header(http::header::HOST, "authinfod")
        .body(Empty::new())
        .context("cannot build the request")?;
    let response = sender
        .send_request(request)
        .await
        .with_context(|| format!("GET {path} failed"))?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .with_context(|| format!("GET {path}: cannot read the body"))?
        .to_bytes();
    Ok((status, body))
}

async fn get_once(socket: &Path, path: &str) -> anyhow::Result<(u16, Bytes)> {
    let mut sender = connect(socket).await?;
    get(&mut sender, path).await
}

/// Latencies of sequential requests on one connection.
#[derive(Debug)]
struct Sample {
    /// Sorted, shortest first.
    latencies: Vec<Duration>,
    /// Answers other than 200.
    failures: usize,
}

impl Sample {
    fn new(mut latencies: Vec<Duration>, failures: usize) -> Self {
        latencies.sort_unstable();
        Self {
            latencies,
            failures,
        }
    }

    /// The nearest-rank percentile `p` (0 to 100).
    fn percentile(&self, p: f64) -> Duration {
        common::percentile(&self.latencies, p)
    }

    fn max(&self) -> Duration {
        self.latencies.last().copied().unwrap_or_default()
    }
}

/// `count` sequential requests for `path` on one keep-alive connection after `warmup` of
/// untimed ones.
async fn sequential(
    socket: &Path,
    path: &str,
    warmup: Duration,
    count: usize,
) -> anyhow::Result<Sample> {
    let mut sender = connect(socket).await?;
    let warm_until = Instant::now() + warmup;
    while Instant::now() < warm_until {
        get(&mut sender, path).await?;
    }
    let mut latencies = Vec::with_capacity(count);
    let mut failures = 0;
    for _ in 0..count {
        let start = Instant::now();
        let (status, _) = get(&mut sender, path).await?;
        latencies.push(start.elapsed());
        failures += usize::from(status != 200);
    }
    Ok(Sample::new(latencies, failures))
}

/// What the concurrent run saw.
#[derive(Debug)]
struct Load {
    /// Requests started and finished inside the window.
    sample: Sample,
    window: Duration,
    /// CPU seconds over the window: the server, this client, everything else on the machine.
    cpu: Cpu,
    /// Highest VmRSS sampled during the window.
    peak_rss_kib: u64,
}

impl Load {
    fn rate(&self) -> f64 {
        self.sample.latencies.len() as f64 / self.window.as_secs_f64()
    }

    /// The server's CPU time divided by the requests it answered in the window: unlike the
    /// rate, it does not depend on how much CPU other processes left it.
    fn server_cpu_per_request(&self) -> Duration {
        let n = self.sample.latencies.len().max(1);
        Duration::from_secs_f64(self.cpu.server / n as f64)
    }
}

/// `options.clients` keep-alive clients on a multi-thread runtime, each sending `path`
/// back to back; counts what completes in the window after one second of warm-up.
fn concurrent(socket: &Path, path: &str, pid: u32, options: &Options) -> anyhow::Result<Load> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the multi-thread runtime")?;
    let measure_from = Instant::now() + SHORT_WARMUP;
    let until = measure_from + options.window;
    let observer = std::thread::spawn(move || observe(pid, measure_from, until));
    let results = runtime.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..options.clients {
            let (socket, path) = (socket.to_owned(), path.to_owned());
            tasks.spawn(async move {
                let mut sender = connect(&socket).await?;
                let mut latencies = Vec::with_capacity(1 << 16);
                let mut failures = 0usize;
                loop {
                    let start = Instant::now();
                    if start >= until {
                        break;
                    }
                    let (status, _) = get(&mut sender, &path).await?;
                    let end = Instant::now();
                    if start >= measure_from && end <= until {
                        latencies.push(end - start);
                        failures += usize::from(status != 200);
                    }
                }
                anyhow::Ok((latencies, failures))
            });
        }
        tasks.join_all().await
    });
    drop(runtime);
    let (cpu, peak_rss_kib) = observer
        .join()
        .map_err(|_| anyhow!("the observer thread panicked"))??;
    let mut latencies = Vec::new();
    let mut failures = 0;
    for result in results {
        let (l, f) = result?;
        latencies.extend(l);
        failures += f;
    }
    Ok(Load {
        sample: Sample::new(latencies, failures),
        window: options.window,
        cpu,
        peak_rss_kib,
    })
}

// === /proc ===

/// CPU seconds spent over a window.
#[derive(Debug, Clone, Copy)]
struct Cpu {
    server: f64,
    client: f64,
    /// The machine's busy time minus the two above: other builders, the kernel's own work.
    other: f64,
    /// CPU seconds the machine had (window × CPUs).
    capacity: f64,
}

/// Sleeps until `from`, then samples `pid`'s RSS until `until`; returns the CPU used in between
/// and the highest RSS seen.
fn observe(pid: u32, from: Instant, until: Instant) -> anyhow::Result<(Cpu, u64)> {
    std::thread::sleep(from.saturating_duration_since(Instant::now()));
    let server0 = tree_ticks(pid)?;
    let client0 = process_ticks("self")?;
    let (busy0, total0) = machine_ticks()?;
    let mut peak = 0;
    while Instant::now() < until {
        peak = peak.max(Memory::read(pid)?.rss_kib);
        std::thread::sleep(RSS_SAMPLE_EVERY.min(until.saturating_duration_since(Instant::now())));
    }
    let server = tree_ticks(pid)? - server0;
    let client = process_ticks("self")? - client0;
    let (busy1, total1) = machine_ticks()?;
    let (busy, total) = (busy1 - busy0, total1 - total0);
    Ok((
        Cpu {
            server: server / TICKS_PER_SECOND,
            client: client / TICKS_PER_SECOND,
            other: (busy - server - client).max(0.0) / TICKS_PER_SECOND,
            capacity: total / TICKS_PER_SECOND,
        },
        peak,
    ))
}

/// User plus system ticks of `pid` and its children (nginx's workers).
fn tree_ticks(pid: u32) -> anyhow::Result<f64> {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let mut ticks = process_ticks(&pid.to_string())?;
    for child in children.split_whitespace() {
        ticks += process_ticks(child).unwrap_or(0.0);
    }
    Ok(ticks)
}

/// User plus system ticks of every thread of `pid` (`self` for this process).
fn process_ticks(pid: &str) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    // Fields after the parenthesised command name start at field 3 (state); utime and stime
    // are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow!("unexpected /proc/{pid}/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> anyhow::Result<f64> {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| anyhow!("unexpected /proc/{pid}/stat"))
    };
    Ok(field(11)? + field(12)?)
}

/// A process's resident memory, KiB, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy)]
struct Memory {
    rss_kib: u64,
    /// The peak RSS since the process started.
    hwm_kib: u64,
    /// Heap, stacks and other private memory.
    anon_kib: u64,
    /// Mapped files: the executable and the libraries.
    file_kib: u64,
}

impl Memory {
    fn read(pid: u32) -> anyhow::Result<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("cannot read /proc/{pid}/status"))?;
        let field = |name: &str| -> anyhow::Result<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .ok_or_else(|| anyhow!("no {name} in /proc/{pid}/status"))
        };
        Ok(Self {
            rss_kib: field("VmRSS:")?,
            hwm_kib: field("VmHWM:")?,
            anon_kib: field("RssAnon:")?,
            file_kib: field("RssFile:")?,
        })
    }
}

// === report ===

struct Report<'a> {
    options: &'a Options,
    daemon: &'a Measured,
    baseline: Option<&'a Measured>,
    idle: Memory,
    after: Memory,
}

fn micros(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn mib(kib: u64) -> String {
    let mib = kib as f64 / 1024.0;
    format!("{mib:.1} MiB")
}

fn verdict(pass: bool) -> &'static str {
    if pass { "PASS" } else { "FAIL" }
}

fn row(what: &str, daemon: &str, baseline: &str, target: &str, result: &str) {
    println!("{what:<36} {daemon:>14} {baseline:>14}   {target:<9} {result}");
}

fn report(r: &Report<'_>) {
    let d = r.daemon;
    let b = r.baseline;
    let base = |f: &dyn Fn(&Measured) -> String| b.map_or_else(|| "-".to_owned(), f);
    row("metric", "authinfod", "baseline", "target", "result");
    println!("{}", "-".repeat(86));

    let p99 = d.authinfo.percentile(99.0);
    for (label, p) in [("p50", 50.0), ("p90", 90.0), ("p99", 99.0)] {
        let (target, result) = if label == "p99" {
            ("< 200 µs", verdict(p99 < TARGET_P99))
        } else {
            ("", "")
        };
        row(
            &format!("GET /v1/authinfo, 1 client, {label}"),
            &micros(d.authinfo.percentile(p)),
            &base(&|m| micros(m.authinfo.percentile(p))),
            target,
            result,
        );
    }
    row(
        "GET /v1/authinfo, 1 client, max",
        &micros(d.authinfo.max()),
        &base(&|m| micros(m.authinfo.max())),
        "",
        "",
    );
    if let Some(h) = &d.healthz {
        for (label, p) in [("p50", 50.0), ("p99", 99.0)] {
            row(
                &format!("GET /healthz, 1 client, {label}"),
                &micros(h.percentile(p)),
                "-",
                "",
                "",
            );
        }
    }

    let clients = r.options.clients;
    let rate = d.load.rate();
    row(
        &format!("GET /v1/authinfo, {clients} clients, req/s"),
        &format!("{rate:.0}"),
        &base(&|m| format!("{:.0}", m.load.rate())),
        "≥ 20000",
        verdict(rate >= TARGET_RATE),
    );
    for (label, p) in [("p50", 50.0), ("p99", 99.0)] {
        row(
            &format!("  latency under load, {label}"),
            &micros(d.load.sample.percentile(p)),
            &base(&|m| micros(m.load.sample.percentile(p))),
            "",
            "",
        );
    }
    row(
        "  server CPU per request",
        &micros(d.load.server_cpu_per_request()),
        &base(&|m| micros(m.load.server_cpu_per_request())),
        "",
        "",
    );
    row(
        "  CPU s: server / client / other",
        &cpu_split(&d.load.cpu),
        &base(&|m| cpu_split(&m.load.cpu)),
        "",
        "",
    );

    let rss_row = |label: &str, kib: u64| {
        row(
            label,
            &mib(kib),
            "",
            "< 15 MiB",
            verdict(kib < TARGET_RSS_KIB),
        );
    };
    rss_row("daemon VmRSS idle after start", r.idle.rss_kib);
    row(
        "  of which anonymous / file-backed",
        &format!("{} / {}", mib(r.idle.anon_kib), mib(r.idle.file_kib)),
        "",
        "",
        "",
    );
    rss_row("daemon VmHWM idle after start", r.idle.hwm_kib);
    rss_row("daemon VmRSS peak sampled in load", d.load.peak_rss_kib);
    rss_row("daemon VmRSS after load", r.after.rss_kib);
    rss_row("daemon VmHWM after load", r.after.hwm_kib);
    if let Some(b) = b {
        row(
            "baseline VmRSS peak sampled in load",
            "",
            &mib(b.load.peak_rss_kib),
            "",
            "",
        );
    }

    let failures =
        d.authinfo.failures + d.healthz.as_ref().map_or(0, |h| h.failures) + d.load.sample.failures;
    println!();
    println!(
        "{} + {} + {} requests measured on the daemon, {failures} answered other than 200; \
         CPU capacity in the window {:.1} s",
        d.authinfo.latencies.len(),
        d.healthz.as_ref().map_or(0, |h| h.latencies.len()),
        d.load.sample.latencies.len(),
        d.load.cpu.capacity,
    );
}

fn cpu_split(cpu: &Cpu) -> String {
    format!("{:.1}/{:.1}/{:.1}", cpu.server, cpu.client, cpu.other)
}

// === baseline ===

mod baseline {
    //! A trivial hyper server on a Unix socket answering fixed bytes: the floor under the
    //! daemon's figures on this machine.

    use super::{Bytes, Full, Infallible, Path, TokioIo, TokioTimer};
    use anyhow::Context as _;
    use http::HeaderValue;
    use http::header::{CACHE_CONTROL, CONTENT_TYPE, ETAG};

    pub fn serve(socket: &Path, body_file: &Path) -> anyhow::Result<()> {
        let body = Bytes::from(std::fs::read(body_file).context("cannot read the body file")?);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the runtime")?;
        runtime.block_on(async move {
            let listener = tokio::net::UnixListener::bind(socket)
                .with_context(|| format!("cannot bind {}", socket.display()))?;
            loop {
                let (stream, _) = listener.accept().await.context("accept failed")?;
                let body = body.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_req| {
                        // The daemon's headers, with an ETag of the same length.
                        let mut response = hyper::Response::new(Full::new(body.clone()));
                        let headers = response.headers_mut();
                        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
                        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                        headers.insert(ETAG, HeaderValue::from_static("\"0123456789abcdef0123\""));
                        async move { Ok::<_, Infallible>(response) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(std::time::Duration::from_secs(30))
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        })
    }
}

/// The `Environment=` settings of the shipped unit, so the daemon runs as systemd runs it.
fn unit_environment() -> anyhow::Result<Vec<(String, String)>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/authinfod.service");
    let unit = std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?;
    Ok(unit
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Environment="))
        .flat_map(str::split_whitespace)
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect())
}
