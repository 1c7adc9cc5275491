//! Proxy benchmark: `POST /v1/authinfo` through `authinfo-proxy` to the simulated WeChat Pay,
//! over HTTPS on loopback, with the RSA-2048 signing cost measured beside it in the same run.
//!
//! One request's chain: client → proxy (TLS; it verifies the device's RSA signature, the
//! timestamp and the nonce) → sandbox WeChat Pay (TLS; the proxy signs the call with the
//! merchant's RSA-2048 key, the sandbox verifies it, answers and signs the answer with its
//! platform key) → the proxy verifies that answer → client. So two RSA-2048 private-key
//! operations and three verifications per request, plus TLS and HTTP on two hops.
//!
//! The lab (`authinfod::demo::lab`: the sandbox and the proxy, fleet sync off) runs in this
//! process on one multi-thread runtime whose threads are named `lab-worker`; the load runs on
//! this process's main thread (a current-thread runtime, keep-alive HTTPS clients on hyper and
//! tokio-rustls, pinned to the lab's proxy CA). All three share the machine's cores, so the
//! request rate is a lower bound for a deployment, where the sandbox's half of the work is
//! WeChat Pay's. CPU time is read per thread from `/proc`, so the table also shows what one
//! request costs the lab and the load, whatever else the machine was doing.
//!
//! Every request is signed before its run: each needs its own nonce and a timestamp within
//! 300 s of the proxy's clock, and signing costs the device an RSA private-key operation that
//! must stay out of the timed window. A run therefore sends a fixed number of requests, and
//! must finish within 300 s of its signing (a skewed request shows up as a non-200).
//!
//! The signing cost is measured first, on a quiet process: ring's SHA256withRSA
//! (`RsaSigner::sign`) and verification (`RsaVerifier::verify`), single-threaded, on a generated
//! key; then `openssl speed rsa2048` (single process), and, on a CPU with AVX-512 IFMA, again
//! with that extension masked (`OPENSSL_ia32cap`): OpenSSL 3 signs RSA-2048 with IFMA code that
//! ring does not have, which is most of the gap between the two.
//!
//! It is a measurement, not a test: it exits 0 whatever the figures, and 1 only when the setup
//! fails (including anything but a 200 with an authinfo for the one request checked first).
//!
//! Run it with `scripts/bench-proxy` (or `cargo bench --bench proxy`). Options (after `--`):
//! `--requests N` timed requests per client count (3000), `--clients 1,8,32` the client counts,
//! one run each, `--sign-seconds S` length of the ring signing loop (2), `--openssl-seconds S`
//! passed to `openssl speed -seconds` (3), `--no-openssl`.

mod common;

use common::https::{
    RAISED_LIMITS, RAISED_LIMITS_NOTE, Signed, Target, check, code_of, connect, drain, post, sign,
};
use common::{load_average, machine_ticks, on_cpu, parallel, positive, seconds};

use std::collections::BTreeMap;
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use authinfod::crypto::{self, RsaSigner};
use authinfod::demo::lab::{self, DEVICE_ID, Lab};
use authinfod::sandbox::Platform;
use authinfod::units::unix_now;
use authinfod::wire::ROUTE_AUTHINFO;
use authinfod::wire::auth::{DeviceSigner, signing_string};
use bytes::Bytes;

/// Appended to the lab's proxy config: no fleet sync, so the only upstream calls are the
/// measured ones.
const PROXY_EXTRA: &str = "[fleet]\nenabled = false\n";
/// The name of the lab runtime's threads (at most 15 bytes: Linux truncates thread names).
const LAB_THREAD: &str = "lab-worker";
/// Untimed requests each client sends on its connection before the window: the TLS session,
/// the proxy's upstream connection pool and the caches are warm when timing starts.
const WARMUP_PER_CLIENT: usize = 5;
/// Each RSA-2048 private-key operation the chain does per request: the proxy's (merchant key)
/// and the sandbox's (platform key).
const SIGNS_PER_REQUEST: f64 = 2.0;
/// Verifications per request: the device's signature and the answer's (proxy), the merchant's
/// signature (sandbox).
const VERIFIES_PER_REQUEST: f64 = 3.0;
/// `/proc/stat` counts CPU time in USER_HZ ticks, 100 per second on Linux.
const TICKS_PER_SECOND: f64 = 100.0;

fn main() -> ExitCode {
    let options = <Options as clap::Parser>::parse();
    match run(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench proxy: setup failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `POST /v1/authinfo` through the proxy to the sandbox, beside the RSA signing cost.
#[derive(Debug, clap::Parser)]
#[command(name = "bench proxy")]
struct Options {
    /// Requests per client count.
    #[arg(long, default_value_t = 3000, value_parser = positive)]
    requests: usize,
    /// Client counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32", value_parser = positive)]
    clients: Vec<usize>,
    /// How long ring's signing is timed, seconds.
    #[arg(long = "sign-seconds", default_value = "2", value_parser = seconds)]
    sign_window: Duration,
    /// How long `openssl speed rsa2048` runs, seconds.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    openssl_seconds: u64,
    /// Skip `openssl speed`.
    #[arg(long = "no-openssl", action = clap::ArgAction::SetFalse)]
    openssl: bool,
    /// Passed by cargo to every bench executable.
    #[arg(long, hide = true)]
    bench: bool,
}

fn run(options: &Options) -> anyhow::Result<()> {
    check_openssl_parser()?;
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    println!("authinfo-proxy benchmark: POST {ROUTE_AUTHINFO} through the proxy to the sandbox");
    println!(
        "  machine     {cores} CPUs, load average {} before the run",
        load_average()
    );
    println!("  raised      {RAISED_LIMITS_NOTE}");
    println!(
        "  runs        {} timed requests per run, clients {}, {WARMUP_PER_CLIENT} untimed requests per client first",
        options.requests,
        options
            .clients
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(" / "),
    );
    println!();

    // The signing cost first, while this process does nothing else.
    let ring = RingCost::measure(options.sign_window)?;
    let (openssl, openssl_no_ifma) = if options.openssl {
        let plain = OpenSsl::measure(options.openssl_seconds, None);
        let masked = if matches!(plain, OpenSsl::Measured { .. }) && cpu_has("avx512ifma") {
            Some(OpenSsl::measure(
                options.openssl_seconds,
                Some(MASK_AVX512_IFMA),
            ))
        } else {
            None
        };
        (plain, masked)
    } else {
        (OpenSsl::Skipped, None)
    };

    let dir = tempfile::Builder::new()
        .prefix("authinfo-proxy-bench-")
        .tempdir()
        .context("cannot make a temporary directory")?;
    let lab_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores)
        .thread_name(LAB_THREAD)
        .enable_all()
        .build()
        .context("cannot start the lab runtime")?;
    let started = Instant::now();
    let lab = lab_runtime
        .block_on(Lab::start(
            dir.path(),
            lab::world(0, 90),
            &format!("{PROXY_EXTRA}\n{RAISED_LIMITS}"),
            "",
        ))
        .context("cannot start the lab")?;
    let lab_start = started.elapsed();
    let target = Target::pinned(lab.proxy.addr, &lab.files.path("proxy-ca.pem"))?;
    let device = DeviceSigner::new(
        DEVICE_ID.to_owned(),
        RsaSigner::from_file(&lab.files.path("device.key"))
            .context("cannot read the device key")?,
    );
    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the client runtime")?;
    let checked = client.block_on(check(
        &target,
        &device,
        Bytes::from_static(br#"{"raw_data":"BENCH-RAW-DATA-CHECK"}"#),
    ))?;
    println!(
        "lab started in {:.1} s (keys, certificates, sandbox {}, proxy https://{}); one request checked: 200, authinfo of {} characters",
        lab_start.as_secs_f64(),
        lab.sandbox.base_url,
        target.addr,
        checked.len(),
    );

    let mut runs = Vec::new();
    for (i, &clients) in options.clients.iter().enumerate() {
        let presigned = presign(&device, i, options.requests, clients, cores)?;
        println!(
            "{clients:>2} clients: pre-signed {} requests in {:.2} s on {cores} threads ({:.0} signs/s), outside the timed window",
            presigned.count,
            presigned.took.as_secs_f64(),
            presigned.count as f64 / presigned.took.as_secs_f64(),
        );
        let measured = client.block_on(load(&target, clients, presigned))?;
        runs.push(measured);
    }
    drop(client);

    let answered_ok = lab.proxy.app.metrics.requests(ROUTE_AUTHINFO, "OK");
    let upstream = lab.sandbox.state.received_by(Platform::WechatPay);
    lab_runtime.block_on(lab.stop());
    drop(lab_runtime);

    println!();
    report(&Report {
        cores,
        runs: &runs,
        ring: &ring,
        openssl: &openssl,
        openssl_no_ifma: openssl_no_ifma.as_ref(),
        answered_ok,
        upstream,
    });
    println!();
    println!("load average {} after the run", load_average());
    Ok(())
}

// === the lab and its client ===

fn raw_data_body(run: usize, i: usize) -> Bytes {
    Bytes::from(format!(r#"{{"raw_data":"BENCH-RAW-DATA-{run}-{i:06}"}}"#))
}

/// A run's requests, signed before it.
struct Presigned {
    /// `WARMUP_PER_CLIENT` per client, sent before the window.
    warmup: Vec<Signed>,
    timed: Vec<Signed>,
    count: usize,
    took: Duration,
}

/// Signs the warm-up and timed requests of run number `run` on `threads` threads, all with the
/// timestamp of now: the proxy admits them for the next 300 s.
fn presign(
    device: &DeviceSigner,
    run: usize,
    requests: usize,
    clients: usize,
    threads: usize,
) -> anyhow::Result<Presigned> {
    let warmups = clients * WARMUP_PER_CLIENT;
    let count = warmups + requests;
    let timestamp = unix_now();
    let started = Instant::now();
    let mut all = parallel(count, threads, |i| {
        sign(device, ROUTE_AUTHINFO, timestamp, raw_data_body(run, i))
    })?;
    let took = started.elapsed();
    let timed = all.split_off(warmups);
    Ok(Presigned {
        warmup: all,
        timed,
        count,
        took,
    })
}

/// One run: `clients` keep-alive connections each send their warm-up requests, then all take
/// the timed requests from one queue as fast as the answers come back. The window runs from
/// their common start to the last answer.
async fn load(target: &Target, clients: usize, presigned: Presigned) -> anyhow::Result<Run> {
    let Presigned { warmup, timed, .. } = presigned;
    let requests = timed.len();
    let timed: Arc<[Signed]> = timed.into();
    let next = Arc::new(AtomicUsize::new(0));
    // Every client waits at `ready` once connected and warmed up, then at `go`; the CPU
    // counters are read in between, so the warm-up is outside the window.
    let ready = Arc::new(tokio::sync::Barrier::new(clients + 1));
    let go = Arc::new(tokio::sync::Barrier::new(clients + 1));
    let mut warmup = warmup.into_iter();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let mine: Vec<Signed> = warmup.by_ref().take(WARMUP_PER_CLIENT).collect();
        let (timed, next) = (timed.clone(), next.clone());
        let (ready, go) = (ready.clone(), go.clone());
        let target = target.clone();
        tasks.spawn(async move {
            // Every client reaches the barriers, even one whose setup failed, so none waits
            // for ever; the failure is reported after the run.
            let setup = async {
                let mut sender = connect(&target).await?;
                for signed in &mine {
                    let (status, body) = post(&mut sender, ROUTE_AUTHINFO, signed).await?;
                    if status != 200 {
                        bail!("a warm-up request answered {status} {}", code_of(&body));
                    }
                }
                anyhow::Ok(sender)
            }
            .await;
            ready.wait().await;
            go.wait().await;
            let tally = drain(setup?, &target, &next, |i| Some((i, timed.get(i)?))).await;
            anyhow::Ok(tally)
        });
    }
    ready.wait().await;
    let cpu_before = CpuSnapshot::read()?;
    go.wait().await;
    let start = Instant::now();
    let results = tasks.join_all().await;
    let window = start.elapsed();
    let cpu = CpuSnapshot::read()?.since(&cpu_before);
    let mut latencies = Vec::with_capacity(requests);
    let mut failures = BTreeMap::new();
    for result in results {
        let tally = result?;
        latencies.extend(tally.latencies);
        for (what, n) in tally.failures {
            *failures.entry(what).or_default() += n;
        }
    }
    latencies.sort_unstable();
    Ok(Run {
        clients,
        requests,
        window,
        latencies,
        failures,
        cpu,
    })
}

/// Everything measured in one run.
struct Run {
    clients: usize,
    requests: usize,
    window: Duration,
    /// Sorted, shortest first; one per timed request.
    latencies: Vec<Duration>,
    failures: BTreeMap<String, usize>,
    cpu: Cpu,
}

impl Run {
    /// Answers (of any kind) per second of the window.
    fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.window.as_secs_f64()
    }

    /// The nearest-rank percentile `p` (0 to 100).
    fn percentile(&self, p: f64) -> Duration {
        common::percentile(&self.latencies, p)
    }

    fn max(&self) -> Duration {
        self.latencies.last().copied().unwrap_or_default()
    }

    fn mean(&self) -> Duration {
        self.latencies.iter().sum::<Duration>()
            / u32::try_from(self.latencies.len().max(1)).unwrap_or(u32::MAX)
    }

    fn errors(&self) -> usize {
        self.failures.values().sum()
    }

    /// CPU time per answered request.
    fn per_request(&self, cpu: Duration) -> Duration {
        cpu / u32::try_from(self.latencies.len().max(1)).unwrap_or(u32::MAX)
    }
}

// === CPU time from /proc ===

/// CPU time used over a window.
#[derive(Debug, Clone, Copy)]
struct Cpu {
    /// The lab runtime's threads: the proxy and the sandbox.
    lab: Duration,
    /// This thread: the clients.
    client: Duration,
    /// The machine's busy time outside this process: other builders, the kernel's own work.
    other: Duration,
    /// What the machine had: the window × its CPUs.
    capacity: Duration,
}

/// Counters read at one moment.
struct CpuSnapshot {
    lab: Duration,
    client: Duration,
    process: Duration,
    machine_busy: f64,
    machine_total: f64,
}

impl CpuSnapshot {
    fn read() -> anyhow::Result<Self> {
        let mut lab = Duration::ZERO;
        let mut process = Duration::ZERO;
        for entry in std::fs::read_dir("/proc/self/task").context("cannot list /proc/self/task")? {
            let path = entry.context("cannot list /proc/self/task")?.path();
            // A thread may end between the listing and the read; its time is then lost to both
            // snapshots alike.
            let Ok(on_cpu) = on_cpu(&path.join("schedstat")) else {
                continue;
            };
            let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
            if name.trim_end().starts_with(LAB_THREAD) {
                lab += on_cpu;
            }
            process += on_cpu;
        }
        let client = on_cpu(std::path::Path::new("/proc/thread-self/schedstat"))?;
        let (machine_busy, machine_total) = machine_ticks()?;
        Ok(Self {
            lab,
            client,
            process,
            machine_busy,
            machine_total,
        })
    }

    fn since(&self, before: &Self) -> Cpu {
        let process = self.process.saturating_sub(before.process);
        let busy = (self.machine_busy - before.machine_busy) / TICKS_PER_SECOND;
        let total = (self.machine_total - before.machine_total) / TICKS_PER_SECOND;
        Cpu {
            lab: self.lab.saturating_sub(before.lab),
            client: self.client.saturating_sub(before.client),
            other: Duration::from_secs_f64((busy - process.as_secs_f64()).max(0.0)),
            capacity: Duration::from_secs_f64(total.max(0.0)),
        }
    }
}

// === the signing cost ===

/// ring's RSA-2048 SHA256withRSA cost on one thread, as the proxy and the sandbox pay it.
struct RingCost {
    signs: u64,
    sign_wall: Duration,
    /// This thread's time on a CPU during the signing loop (less than the wall time when other
    /// processes took the core).
    sign_cpu: Duration,
    verifies: u64,
    verify_wall: Duration,
    verify_cpu: Duration,
}

impl RingCost {
    /// Signs a request-sized message with a generated key for `window`, then verifies for half
    /// as long.
    fn measure(window: Duration) -> anyhow::Result<Self> {
        let key = crypto::generate_rsa_key(2048).context("cannot generate an RSA key")?;
        let signer = RsaSigner::from_pem(&key.private_pem, "the generated key")?;
        let message = signing_string(
            "POST",
            "/v3/offlineface/authinfo",
            unix_now(),
            "0123456789ABCDEFGHIJKLMNOPQRSTUV",
            br#"{"sp_appid":"wxsandboxspapp0001","sub_mchid":"1900000002","raw_data":"BENCH-RAW-DATA"}"#,
        );
        let mut signature = Vec::new();
        for _ in 0..10 {
            signature = signer.sign(&message)?;
        }
        let (signs, sign_wall, sign_cpu) = timed_loop(window, || {
            signature = signer.sign(&message)?;
            Ok(())
        })?;
        let (verifies, verify_wall, verify_cpu) = timed_loop(window / 2, || {
            if key.public.verify(&message, &signature) {
                Ok(())
            } else {
                bail!("ring's signature does not verify")
            }
        })?;
        Ok(Self {
            signs,
            sign_wall,
            sign_cpu,
            verifies,
            verify_wall,
            verify_cpu,
        })
    }

    fn sign_rate_wall(&self) -> f64 {
        self.signs as f64 / self.sign_wall.as_secs_f64()
    }

    fn sign_rate_cpu(&self) -> f64 {
        self.signs as f64 / self.sign_cpu.as_secs_f64().max(1e-9)
    }

    fn verify_rate_cpu(&self) -> f64 {
        self.verifies as f64 / self.verify_cpu.as_secs_f64().max(1e-9)
    }

    fn verify_rate_wall(&self) -> f64 {
        self.verifies as f64 / self.verify_wall.as_secs_f64()
    }

    /// CPU time of the RSA work in one proxied request: two signs and three verifications.
    fn per_request(&self) -> Duration {
        Duration::from_secs_f64(
            SIGNS_PER_REQUEST / self.sign_rate_cpu()
                + VERIFIES_PER_REQUEST / self.verify_rate_cpu(),
        )
    }
}

/// Runs `op` on this thread until `window` has passed: how many times, the wall time and this
/// thread's CPU time.
fn timed_loop(
    window: Duration,
    mut op: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<(u64, Duration, Duration)> {
    let this_thread = std::path::Path::new("/proc/thread-self/schedstat");
    let cpu_before = on_cpu(this_thread)?;
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < window {
        op()?;
        n += 1;
    }
    let wall = start.elapsed();
    let cpu = on_cpu(this_thread)?.saturating_sub(cpu_before);
    Ok((n, wall, cpu))
}

/// `OPENSSL_ia32cap` value that hides AVX-512 IFMA from OpenSSL: the second word is CPUID
/// leaf 7's EBX (low half) and ECX, and IFMA is EBX bit 21.
const MASK_AVX512_IFMA: &str = ":~0x200000";

/// True when `/proc/cpuinfo` lists the CPU flag `flag`.
fn cpu_has(flag: &str) -> bool {
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|info| {
        info.lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == flag))
    })
}

/// What `openssl speed rsa2048` said.
enum OpenSsl {
    Measured {
        version: String,
        sign: f64,
        verify: f64,
    },
    Missing,
    Failed(String),
    Skipped,
}

impl OpenSsl {
    /// Runs `openssl speed -seconds <seconds> rsa2048`, with `OPENSSL_ia32cap=<ia32cap>` when
    /// given.
    fn measure(seconds: u64, ia32cap: Option<&str>) -> Self {
        let version = match Command::new("openssl").arg("version").output() {
            // "OpenSSL 3.0.19 27 Jan 2026 (Library: ...)": the name and the version will do.
            Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" "),
            Ok(out) => {
                return Self::Failed(format!("`openssl version` exited with {}", out.status));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Self::Missing,
            Err(e) => return Self::Failed(format!("cannot run openssl: {e}")),
        };
        let mut command = Command::new("openssl");
        command.args(["speed", "-seconds", &seconds.to_string(), "rsa2048"]);
        if let Some(mask) = ia32cap {
            command.env("OPENSSL_ia32cap", mask);
        }
        let out = match command.output() {
            Ok(out) => out,
            Err(e) => return Self::Failed(format!("cannot run openssl speed: {e}")),
        };
        let text = format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            return Self::Failed(format!(
                "`openssl speed` exited with {}: {}",
                out.status,
                text.trim()
            ));
        }
        match parse_openssl_speed(&text) {
            Some((sign, verify)) => Self::Measured {
                version,
                sign,
                verify,
            },
            None => Self::Failed(format!(
                "no `rsa 2048 bits` row under a sign/s header in `openssl speed`'s output:\n{}",
                text.trim()
            )),
        }
    }

    fn sign(&self) -> Option<f64> {
        match self {
            Self::Measured { sign, .. } => Some(*sign),
            _ => None,
        }
    }
}

/// The `sign/s` and `verify/s` of the `rsa 2048 bits` row of `openssl speed`'s table. The
/// columns are found by name in the header line above the row, so both layouts parse: OpenSSL
/// 1.1 and 3.0/3.1 (`sign verify sign/s verify/s`) and 3.2 on (which adds encrypt and decrypt
/// columns, `sign verify encrypt decrypt sign/s verify/s encr./s decr./s`).
fn parse_openssl_speed(text: &str) -> Option<(f64, f64)> {
    let mut header: Option<Vec<&str>> = None;
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.contains(&"sign/s") {
            header = Some(words);
            continue;
        }
        let Some(columns) = &header else { continue };
        if words.len() > 3 && words[..3] == ["rsa", "2048", "bits"] {
            let values = &words[3..];
            let column = |name: &str| -> Option<f64> {
                let at = columns.iter().position(|c| *c == name)?;
                values.get(at)?.parse().ok()
            };
            return Some((column("sign/s")?, column("verify/s")?));
        }
    }
    None
}

/// The layouts [`parse_openssl_speed`] must read, checked at every start (a bench has no test
/// harness): OpenSSL 1.1.1 and 3.0 share the first; 3.2 and later print the second.
fn check_openssl_parser() -> anyhow::Result<()> {
    const OPENSSL_1_1_AND_3_0: &str = "\
Doing 2048 bits private rsa's for 3s: 4434 2048 bits private RSA's in 3.00s
Doing 2048 bits public rsa's for 3s: 150273 2048 bits public RSA's in 3.00s
OpenSSL 1.1.1w  11 Sep 2023
built on: Mon Sep 11 12:00:00 2023 UTC
options:bn(64,64) rc4(16x,int) des(int) aes(partial) blowfish(ptr)
                  sign    verify    sign/s verify/s
rsa 2048 bits 0.000677s 0.000020s   1478.0  50091.0
";
    const OPENSSL_3_2_ON: &str = "\
version: 3.2.1
built on: Tue Jan 30 12:00:00 2024 UTC
options: bn(64,64)
CPUINFO: OPENSSL_ia32cap=0xfffa3203078bffff:0x405fc6f1bf07ab
                   sign    verify    encrypt   decrypt   sign/s verify/s  encr./s  decr./s
rsa  2048 bits 0.000613s 0.000018s 0.000018s 0.000620s   1630.6  55315.5  55556.9   1612.4
";
    for (layout, text, expected) in [
        ("1.1 / 3.0", OPENSSL_1_1_AND_3_0, (1478.0, 50091.0)),
        ("3.2+", OPENSSL_3_2_ON, (1630.6, 55315.5)),
    ] {
        if parse_openssl_speed(text) != Some(expected) {
            bail!("the openssl speed parser misreads the OpenSSL {layout} layout");
        }
    }
    Ok(())
}

// === report ===

struct Report<'a> {
    cores: usize,
    runs: &'a [Run],
    ring: &'a RingCost,
    openssl: &'a OpenSsl,
    /// The same with AVX-512 IFMA masked, on a CPU that has it.
    openssl_no_ifma: Option<&'a OpenSsl>,
    /// `OK` outcomes the proxy counted on the route: check, warm-up and timed requests.
    answered_ok: u64,
    /// Calls the sandbox's WeChat Pay received.
    upstream: usize,
}

fn millis(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn secs(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64())
}

fn report(r: &Report<'_>) {
    println!(
        "POST {ROUTE_AUTHINFO} through the proxy, keep-alive HTTPS, pre-signed requests (timed from the common start to the last answer)"
    );
    println!(
        "{:>7} {:>8} {:>8} {:>9} {:>10} {:>10} {:>10} {:>8}",
        "clients", "requests", "window", "req/s", "p50", "p99", "max", "non-200"
    );
    println!("{}", "-".repeat(76));
    for run in r.runs {
        println!(
            "{:>7} {:>8} {:>6.2} s {:>9.0} {:>10} {:>10} {:>10} {:>8}",
            run.clients,
            run.requests,
            run.window.as_secs_f64(),
            run.rate(),
            millis(run.percentile(50.0)),
            millis(run.percentile(99.0)),
            millis(run.max()),
            run.errors(),
        );
    }
    for run in r.runs {
        for (what, n) in &run.failures {
            println!("  {} clients: {n} × {what}", run.clients);
        }
    }

    println!();
    println!(
        "CPU in each timed window: lab = the proxy and the sandbox (threads {LAB_THREAD}), client = the load; other = the rest of the machine"
    );
    println!(
        "{:>7} {:>12} {:>14} {:>14} {:>26}",
        "clients", "lab CPU/req", "client CPU/req", "ceiling req/s", "CPU s lab/client/other/had"
    );
    println!("{}", "-".repeat(77));
    for run in r.runs {
        let per_request = run.per_request(run.cpu.lab + run.cpu.client);
        println!(
            "{:>7} {:>12} {:>14} {:>14.0} {:>26}",
            run.clients,
            millis(run.per_request(run.cpu.lab)),
            millis(run.per_request(run.cpu.client)),
            r.cores as f64 / per_request.as_secs_f64().max(1e-9),
            format!(
                "{}/{}/{}/{}",
                secs(run.cpu.lab),
                secs(run.cpu.client),
                secs(run.cpu.other),
                secs(run.cpu.capacity)
            ),
        );
    }
    println!(
        "  ceiling = {} CPUs / (lab + client CPU per request): the rate if this process had every core to itself",
        r.cores
    );

    println!();
    println!("RSA-2048 cost, one thread, measured in this run before the lab started");
    let ring = r.ring;
    println!(
        "  ring   RsaSigner::sign (SHA256withRSA)   {:>7.0} sign/s per CPU second ({:.0} per wall second, {} signs)",
        ring.sign_rate_cpu(),
        ring.sign_rate_wall(),
        ring.signs,
    );
    println!(
        "  ring   RsaVerifier::verify               {:>7.0} verify/s per CPU second ({:.0} per wall second)",
        ring.verify_rate_cpu(),
        ring.verify_rate_wall(),
    );
    match r.openssl {
        OpenSsl::Measured {
            version,
            sign,
            verify,
        } => {
            println!(
                "  openssl speed rsa2048                    {sign:>7.0} sign/s, {verify:.0} verify/s (user CPU seconds; {version})"
            );
            if let Some(OpenSsl::Measured {
                sign: masked,
                verify,
                ..
            }) = r.openssl_no_ifma
            {
                println!(
                    "  openssl, AVX-512 IFMA masked             {masked:>7.0} sign/s, {verify:.0} verify/s (OPENSSL_ia32cap={MASK_AVX512_IFMA}; ring has no IFMA code)"
                );
            }
            println!(
                "  ring / openssl, signing                  {:>7.2}{}",
                ring.sign_rate_cpu() / sign,
                match r.openssl_no_ifma {
                    Some(OpenSsl::Measured { sign: masked, .. }) => {
                        format!(
                            " ({:.2} against openssl without IFMA)",
                            ring.sign_rate_cpu() / masked
                        )
                    }
                    _ => String::new(),
                }
            );
        }
        OpenSsl::Missing => println!("  openssl: not found on PATH; openssl speed skipped"),
        OpenSsl::Failed(why) => println!("  openssl speed failed; skipped: {why}"),
        OpenSsl::Skipped => println!("  openssl speed skipped (--no-openssl)"),
    }

    println!();
    println!(
        "Each proxied request costs 2 RSA-2048 signs (proxy: merchant key; sandbox: platform key) and 3 verifies"
    );
    let cores = r.cores as f64;
    let ceiling = |sign_rate: f64| sign_rate * cores / SIGNS_PER_REQUEST;
    let mut line = format!(
        "  signing ceiling ≈ sign/s × {} cores / 2 = {:.0} req/s (ring)",
        r.cores,
        ceiling(ring.sign_rate_cpu())
    );
    if let Some(sign) = r.openssl.sign() {
        line.push_str(&format!(", {:.0} req/s (openssl)", ceiling(sign)));
    }
    println!("{line}");
    let rsa = ring.per_request();
    println!(
        "  RSA per request (ring, 2 signs + 3 verifies) = {}: ceiling {:.0} req/s",
        millis(rsa),
        cores / rsa.as_secs_f64().max(1e-9)
    );
    for run in r.runs {
        let lab = run.per_request(run.cpu.lab);
        let all = run.per_request(run.cpu.lab + run.cpu.client);
        println!(
            "  {:>2} clients: {:.0} req/s = {:.0} % of the signing ceiling; RSA is {:.0} % of the lab's {} per request, {:.0} % of lab + client {}",
            run.clients,
            run.rate(),
            100.0 * run.rate() / ceiling(ring.sign_rate_cpu()),
            100.0 * rsa.as_secs_f64() / lab.as_secs_f64().max(1e-9),
            millis(lab),
            100.0 * rsa.as_secs_f64() / all.as_secs_f64().max(1e-9),
            millis(all),
        );
    }
    if let Some(one) = r.runs.iter().find(|run| run.clients == 1) {
        let cpu = one.per_request(one.cpu.lab + one.cpu.client);
        println!(
            "  1 client: one request at a time, mean latency {} against {} of CPU per request: {} of waiting (loopback, scheduling, other processes)",
            millis(one.mean()),
            millis(cpu),
            millis(one.mean().saturating_sub(cpu)),
        );
    }
    // The proxy alone: one sign and two verifies, plus some part of what is not RSA (TLS and
    // HTTP on both hops, JSON), which the proxy and the sandbox share; counting none of it and
    // all of it brackets the proxy's own rate.
    let proxy_rsa = 1.0 / ring.sign_rate_cpu() + 2.0 / ring.verify_rate_cpu();
    let rest: f64 = r
        .runs
        .iter()
        .map(|run| (run.per_request(run.cpu.lab).as_secs_f64() - rsa.as_secs_f64()).max(0.0))
        .sum::<f64>()
        / r.runs.len().max(1) as f64;
    println!(
        "  the lab's CPU per request that is not RSA (TLS, HTTP, JSON, tokio; both servers), mean of the runs: {}",
        millis(Duration::from_secs_f64(rest))
    );
    println!(
        "  the proxy alone signs once and verifies twice: ≈ sign/s × cores = {:.0} req/s (ring); with all of the non-RSA rest counted to it {:.0} req/s, on {} cores",
        cores / proxy_rsa,
        cores / (proxy_rsa + rest),
        r.cores
    );

    let timed: usize = r.runs.iter().map(|run| run.requests).sum();
    let errors: usize = r.runs.iter().map(Run::errors).sum();
    println!();
    println!(
        "{timed} timed requests, {errors} answered other than 200 with an authinfo; the proxy counted {} OK answers and the sandbox's WeChat Pay {} calls (check + warm-up + timed)",
        r.answered_ok, r.upstream
    );
    println!(
        "The sandbox and the clients run in this process on the same {} cores as the proxy: the rate is a lower bound for a deployment, where the sandbox's signing is WeChat Pay's cost.",
        r.cores
    );
}
