//! The socket bench's abuse and nginx modes, and the abuser processes the abuse mode starts.
//!
//! Abuse: this executable again, as `--abuser`, in two processes of its own (so that their work
//! is not the probe's): one as this uid with the idle connections, the garbage senders and the
//! slowloris; one as another uid (through util-linux's `setpriv`, when run as root) with the
//! denied peer's flood. Meanwhile the face app's probe opens a connection, asks `GET
//! /v1/authinfo` and reads the answer, every [`PROBE_EVERY`], and the daemon's RSS is sampled.
//!
//! nginx: Debian's nginx (nginx-light; `scripts/bench-socket --mode nginx` installs it) on a
//! temporary Unix socket, answering the daemon's body with `return 200`, as many workers as CPUs
//! (the daemon's runtime has as many threads); the same 32-client load against each in turn.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixStream;

use super::{
    Load, Memory, Options, Process, Sample, concurrent, load_average, mib, micros, sequential,
    wait_ready,
};

/// How often the face app's probe asks during the abuse run.
const PROBE_EVERY: Duration = Duration::from_millis(20);
/// A probe without an answer by then counts as failed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the attackers run before the probe starts (the first idle connections time out and
/// come back in that time).
const ABUSE_WARMUP: Duration = Duration::from_secs(4);
/// The uid of the denied peer's flood.
const DENIED_UID: &str = "4242";
/// Abuse mode's targets: the probe's p99 and the daemon's peak RSS.
const TARGET_PROBE_P99: Duration = Duration::from_millis(50);
const TARGET_RSS_KIB: u64 = 15 * 1024;
/// nginx mode's targets: p99 at most 1.1 x nginx's, throughput at least 0.9 x.
const TARGET_P99_RATIO: f64 = 1.1;
const TARGET_RATE_RATIO: f64 = 0.9;

// === abuse ===

pub fn abuse(
    dir: &Path,
    socket: &Path,
    daemon: &mut Process,
    options: &Options,
    idle_memory: Memory,
) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    // The denied uid must reach the socket, as any app reaches Android's abstract socket.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .context("cannot open the bench directory to the denied uid")?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666))
        .context("cannot open the socket to the denied uid")?;
    let exe = std::env::current_exe().context("cannot find this executable")?;
    println!(
        "abuse mix: {} idle connections, {} garbage senders, {} slowloris connections (this uid); \
         {} clients of uid {DENIED_UID} in a loop; probe every {} ms for {} s after {} s",
        options.idle,
        options.garbage,
        options.slowloris,
        options.denied,
        PROBE_EVERY.as_millis(),
        options.window.as_secs(),
        ABUSE_WARMUP.as_secs()
    );
    let mut attackers = Vec::new();
    attackers.push(Process::spawn(
        Command::new(&exe)
            .arg("--abuser")
            .arg(socket)
            .arg(format!("idle={}", options.idle))
            .arg(format!("garbage={}", options.garbage))
            .arg(format!("slowloris={}", options.slowloris)),
        &dir.join("abuser.log"),
    )?);
    let as_root = nix::unistd::Uid::effective().is_root();
    if as_root && options.denied > 0 {
        attackers.push(Process::spawn(
            Command::new("setpriv")
                .args([
                    "--reuid",
                    DENIED_UID,
                    "--regid",
                    DENIED_UID,
                    "--clear-groups",
                ])
                .arg(&exe)
                .arg("--abuser")
                .arg(socket)
                .arg(format!("denied={}", options.denied)),
            &dir.join("denied-abuser.log"),
        )?);
    } else {
        println!("  (no denied flood: it needs root for setpriv)");
    }
    std::thread::sleep(ABUSE_WARMUP);
    for a in &mut attackers {
        if let Some(status) = a.exited() {
            bail!("an abuser exited with {status}; see {}", dir.display());
        }
    }
    let pid = daemon.pid();
    let until = Instant::now() + options.window;
    let observer = std::thread::spawn(move || -> anyhow::Result<u64> {
        let mut peak = 0;
        while Instant::now() < until {
            peak = peak.max(Memory::read(pid)?.rss_kib);
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(peak)
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the probe's runtime")?;
    let (probes, failures) = runtime.block_on(probe(socket, until));
    let peak_rss = observer
        .join()
        .map_err(|_| anyhow::anyhow!("the observer thread panicked"))??;
    let after = Memory::read(pid)?;
    let metrics = runtime
        .block_on(super::get_once(socket, "/metrics"))
        .map(|(_, body)| body)
        .unwrap_or_default();
    drop(attackers);

    let sample = Sample::new(probes, 0);
    let p99 = sample.percentile(99.0);
    let answered = sample.latencies.len();
    println!();
    println!(
        "face app probes: {} answered 200, {} failed ({})",
        answered,
        failures.len(),
        summarize(&failures)
    );
    for (label, p) in [("p50", 50.0), ("p90", 90.0), ("p99", 99.0)] {
        println!("  probe {label:<4} {:>12}", micros(sample.percentile(p)));
    }
    println!("  probe max  {:>12}", micros(sample.max()));
    println!(
        "  probe p99 ≤ {} ms and no failures: {}",
        TARGET_PROBE_P99.as_millis(),
        super::verdict(p99 <= TARGET_PROBE_P99 && failures.is_empty() && answered > 0)
    );
    let hwm = after.hwm_kib;
    println!(
        "daemon RSS: idle {}, peak sampled {}, VmHWM {} (≤ 15 MiB: {})",
        mib(idle_memory.rss_kib),
        mib(peak_rss),
        mib(hwm),
        super::verdict(hwm <= TARGET_RSS_KIB)
    );
    println!("daemon counters after the run:");
    for line in String::from_utf8_lossy(&metrics).lines().filter(|l| {
        l.starts_with("authinfod_socket_") && !l.starts_with("authinfod_socket_requests_total")
    }) {
        println!("  {line}");
    }
    println!("load average {} at the end of the run", load_average());
    Ok(())
}

/// Probes until `until`, one at a time, every [`PROBE_EVERY`]: latencies of the 200s, and what
/// went wrong with the others.
async fn probe(socket: &Path, until: Instant) -> (Vec<Duration>, Vec<String>) {
    let mut latencies = Vec::new();
    let mut failures = Vec::new();
    let mut next = Instant::now();
    while Instant::now() < until {
        tokio::time::sleep_until(next.into()).await;
        next += PROBE_EVERY;
        let start = Instant::now();
        match tokio::time::timeout(PROBE_TIMEOUT, super::get_once(socket, "/v1/authinfo")).await {
            Ok(Ok((200, _))) => latencies.push(start.elapsed()),
            Ok(Ok((status, body))) => failures.push(format!(
                "{status} {}",
                String::from_utf8_lossy(&body)
                    .chars()
                    .take(60)
                    .collect::<String>()
            )),
            Ok(Err(e)) => failures.push(format!("{e:#}")),
            Err(_) => failures.push("timeout".into()),
        }
        next = next.max(Instant::now());
    }
    (latencies, failures)
}

fn summarize(failures: &[String]) -> String {
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for f in failures {
        *counts.entry(f.as_str()).or_default() += 1;
    }
    if counts.is_empty() {
        return "none".into();
    }
    counts
        .iter()
        .map(|(f, n)| format!("{n} × {f}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The abuser process: `SOCKET KIND=COUNT...` with kinds `idle`, `garbage`, `slowloris`,
/// `denied`; runs until killed.
pub fn abuser(args: &[String]) -> anyhow::Result<()> {
    let socket = args
        .first()
        .map(std::path::PathBuf::from)
        .context("--abuser needs SOCKET KIND=COUNT...")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async move {
        let mut tasks = tokio::task::JoinSet::new();
        for arg in &args[1..] {
            let (kind, count) = arg.split_once('=').context("KIND=COUNT")?;
            let count: usize = count.parse().context("COUNT")?;
            for _ in 0..count {
                let socket = socket.clone();
                match kind {
                    "idle" => tasks.spawn(idle(socket)),
                    "garbage" => tasks.spawn(garbage(socket)),
                    "slowloris" => tasks.spawn(slowloris(socket)),
                    "denied" => tasks.spawn(denied(socket)),
                    other => bail!("unknown abuser kind {other}"),
                };
            }
        }
        while tasks.join_next().await.is_some() {}
        Ok(())
    })
}

/// Connects, retrying while the daemon's backlog is full.
async fn connect_retrying(socket: &Path) -> UnixStream {
    loop {
        match UnixStream::connect(socket).await {
            Ok(s) => return s,
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Holds a connection that never sends; opens another when the daemon closes it.
async fn idle(socket: std::path::PathBuf) {
    loop {
        let mut s = connect_retrying(&socket).await;
        let mut buf = [0u8; 64];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    }
}

/// Sends bytes that are not HTTP, reads the answer, again.
async fn garbage(socket: std::path::PathBuf) {
    loop {
        let mut s = connect_retrying(&socket).await;
        let _ = s.write_all(b"\x00\x01\x02 this is not HTTP\r\n\r\n").await;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
    }
}

/// Starts a request head and sends one more header line a second, never ending it.
async fn slowloris(socket: std::path::PathBuf) {
    loop {
        let mut s = connect_retrying(&socket).await;
        if s.write_all(b"GET /v1/authinfo HTTP/1.1\r\n").await.is_err() {
            continue;
        }
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if s.write_all(b"x-slow: 1\r\n").await.is_err() {
                break;
            }
        }
    }
}

/// A denied peer asking again and again.
async fn denied(socket: std::path::PathBuf) {
    loop {
        let mut s = connect_retrying(&socket).await;
        let _ = s
            .write_all(b"GET /v1/authinfo HTTP/1.1\r\nhost: x\r\n\r\n")
            .await;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
    }
}

// === nginx ===

/// Runs the concurrent load against the daemon and nginx in alternating rounds.
pub fn nginx(
    dir: &Path,
    socket: &Path,
    daemon: &Process,
    body: &Bytes,
    options: &Options,
) -> anyhow::Result<()> {
    let mut server = Nginx::start(dir, body)?;
    let workers = std::thread::available_parallelism().map_or(1, usize::from);
    println!(
        "nginx {} with {workers} workers on {}: return 200 of the daemon's {} bytes",
        server.version,
        server.socket.display(),
        body.len()
    );
    println!(
        "{} rounds of: 1 client × {} requests, then {} clients × {} s, daemon then nginx",
        options.rounds,
        options.requests,
        options.clients,
        options.window.as_secs()
    );
    println!();
    let single = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the current-thread runtime")?;
    let mut rows = Vec::new();
    for round in 1..=options.rounds {
        let one = |s: &Path| {
            single.block_on(sequential(
                s,
                "/v1/authinfo",
                super::SHORT_WARMUP,
                options.requests,
            ))
        };
        let d1 = one(socket)?;
        let n1 = one(&server.socket)?;
        let d = concurrent(socket, "/v1/authinfo", daemon.pid(), options)?;
        let n = concurrent(
            &server.socket,
            "/v1/authinfo",
            server.process.pid(),
            options,
        )?;
        if let Some(status) = server.process.exited() {
            bail!("nginx exited with {status}");
        }
        rows.push(Round {
            round,
            daemon_single: d1,
            nginx_single: n1,
            daemon: d,
            nginx: n,
        });
    }
    report(&rows, options.clients);
    server.stop();
    Ok(())
}

struct Round {
    round: usize,
    daemon_single: Sample,
    nginx_single: Sample,
    daemon: Load,
    nginx: Load,
}

fn report(rows: &[Round], clients: usize) {
    println!(
        "{:<6} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11} {:>7} {:>7}",
        "round", "1c p99 d", "1c p99 n", "req/s d", "req/s n", "p99 d", "p99 n", "p99 ×", "rate ×"
    );
    let mut p99_ratios = Vec::new();
    let mut rate_ratios = Vec::new();
    for r in rows {
        let (dp, np) = (
            r.daemon.sample.percentile(99.0),
            r.nginx.sample.percentile(99.0),
        );
        let p99_ratio = dp.as_secs_f64() / np.as_secs_f64().max(1e-9);
        let rate_ratio = r.daemon.rate() / r.nginx.rate().max(1e-9);
        p99_ratios.push(p99_ratio);
        rate_ratios.push(rate_ratio);
        println!(
            "{:<6} {:>11} {:>11} {:>11.0} {:>11.0} {:>11} {:>11} {:>7.2} {:>7.2}",
            r.round,
            micros(r.daemon_single.percentile(99.0)),
            micros(r.nginx_single.percentile(99.0)),
            r.daemon.rate(),
            r.nginx.rate(),
            micros(dp),
            micros(np),
            p99_ratio,
            rate_ratio
        );
    }
    for r in rows {
        println!(
            "round {}: {clients} clients p50 {} / {} (daemon / nginx); server CPU per request {} / {}; \
             CPU s server/client/other {:.1}/{:.1}/{:.1} and {:.1}/{:.1}/{:.1}; non-200 {} / {}",
            r.round,
            micros(r.daemon.sample.percentile(50.0)),
            micros(r.nginx.sample.percentile(50.0)),
            micros(r.daemon.server_cpu_per_request()),
            micros(r.nginx.server_cpu_per_request()),
            r.daemon.cpu.server,
            r.daemon.cpu.client,
            r.daemon.cpu.other,
            r.nginx.cpu.server,
            r.nginx.cpu.client,
            r.nginx.cpu.other,
            r.daemon.sample.failures,
            r.nginx.sample.failures,
        );
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (p99, rate) = (median(&mut p99_ratios), median(&mut rate_ratios));
    println!();
    println!(
        "median of {} rounds at {clients} clients: p99 {p99:.2} × nginx's (≤ {TARGET_P99_RATIO}: {}), \
         throughput {rate:.2} × nginx's (≥ {TARGET_RATE_RATIO}: {})",
        rows.len(),
        super::verdict(p99 <= TARGET_P99_RATIO),
        super::verdict(rate >= TARGET_RATE_RATIO),
    );
}

/// nginx serving one fixed body on a Unix socket.
struct Nginx {
    process: Process,
    socket: std::path::PathBuf,
    version: String,
}

impl Nginx {
    fn start(dir: &Path, body: &Bytes) -> anyhow::Result<Self> {
        let binary = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .context(
                "no nginx: install Debian's nginx-light (scripts/bench-socket --mode nginx does)",
            )?;
        let text = std::str::from_utf8(body).context("the body is not UTF-8")?;
        if text.contains(['\'', '\\', '$']) {
            bail!("the body has characters nginx's return would interpret");
        }
        let prefix = dir.join("nginx");
        std::fs::create_dir_all(prefix.join("logs")).context("cannot make nginx's directory")?;
        let socket = dir.join("nginx.sock");
        let conf = prefix.join("nginx.conf");
        // The daemon's headers (content-type, cache-control, an ETag of the same length);
        // nginx adds Server, Date and Connection. Keep-alive connections are never closed by
        // count or time within a run.
        std::fs::write(
            &conf,
            format!(
                "worker_processes auto;\ndaemon off;\nmaster_process on;\nuser root;\npid {pid};\n\
                 error_log stderr warn;\nevents {{ worker_connections 1024; }}\n\
                 http {{\n  access_log off;\n  keepalive_requests 100000000;\n  keepalive_timeout 300s;\n\
                 client_body_temp_path {tmp}/body;\n  proxy_temp_path {tmp}/proxy;\n  fastcgi_temp_path {tmp}/fastcgi;\n\
                 uwsgi_temp_path {tmp}/uwsgi;\n  scgi_temp_path {tmp}/scgi;\n\
                 server {{\n    listen unix:{socket};\n    location / {{\n      default_type application/json;\n\
                 add_header cache-control no-store;\n      add_header etag '\"0123456789abcdef0123\"';\n\
                 return 200 '{text}';\n    }}\n  }}\n}}\n",
                pid = prefix.join("nginx.pid").display(),
                tmp = prefix.display(),
                socket = socket.display(),
            ),
        )
        .context("cannot write nginx.conf")?;
        let version = Command::new(binary)
            .arg("-v")
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stderr)
                    .trim()
                    .replace("nginx version: ", "")
            })
            .unwrap_or_default();
        let log = prefix.join("error.log");
        let mut process = Process::spawn(
            Command::new(binary)
                .arg("-p")
                .arg(&prefix)
                .arg("-c")
                .arg(&conf)
                .arg("-e")
                .arg("stderr"),
            &log,
        )?;
        wait_ready(&mut process, &socket, &log)?;
        Ok(Self {
            process,
            socket,
            version,
        })
    }

    fn stop(self) {
        let _ = self.process.stop();
    }
}
