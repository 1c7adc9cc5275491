//! Fleet view benchmark: report ingestion through the proxy, and the admin pages of a large
//! fleet.
//!
//! 1. **Ingestion.** `POST /v1/report` from the lab's device over loopback HTTPS (keep-alive
//!    clients on hyper and tokio-rustls, pinned to the lab's proxy CA) into a running proxy
//!    (`authinfod::demo::lab`, fleet sync off, the report rate limit raised so one device can send
//!    them all): each report's TLS, RSA-2048 signature check, nonce, JSON and text checks, and
//!    its record kept (written behind to sled by the fleet view's loop). Requests are signed
//!    before the timed window (a device's RSA signing cost is the device's, not the proxy's).
//! 2. **Pages.** The proxy's registry is replaced by `--terminals` enrolled terminals (default
//!    100 000) with reports in assorted risks, and `GET /terminals` (one page of 100, the whole
//!    fleet judged for the summary) and `GET /` (the dashboard: 200 rows, the charts over the
//!    whole fleet) are fetched from the admin listener over HTTP, each `--page-runs` times; the
//!    median and the worst are printed.
//!
//! A measurement, not a test: it exits 0 whatever the figures, 1 when the setup fails.
//! Run it with `scripts/bench-fleet` (or `cargo bench --bench fleet`); options after `--`:
//! `--reports N` (6000), `--clients N` (8), `--terminals N` (100000), `--page-runs N` (7).

mod common;

use common::https::{Signed, Target, connect, post, sign};
use common::parallel;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use authinfod::crypto::RsaSigner;
use authinfod::demo::lab::{self, DEVICE_ID, Lab};
use authinfod::proxy::registry::{Device, Registry};
use authinfod::proxy::terminals::record::ReceivedReport;
use authinfod::units::unix_now;
use authinfod::wire::auth::DeviceSigner;
use authinfod::wire::{HeldState, InspectionResult, ROUTE_REPORT, Report};
use bytes::Bytes;

/// The lab's proxy: no fleet sync, and a report limit one device cannot reach in this run.
const PROXY_EXTRA: &str =
    "[fleet]\nenabled = false\n\n[terminals]\nreport_burst = 100000000\nreport_refill = \"1ms\"\n";

struct Options {
    reports: usize,
    clients: usize,
    terminals: usize,
    page_runs: usize,
}

fn main() -> ExitCode {
    let mut options = Options {
        reports: 6000,
        clients: 8,
        terminals: 100_000,
        page_runs: 7,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|v| *v > 0)
        };
        let slot = match arg.as_str() {
            "--reports" => &mut options.reports,
            "--clients" => &mut options.clients,
            "--terminals" => &mut options.terminals,
            "--page-runs" => &mut options.page_runs,
            "--bench" => continue,
            other => {
                eprintln!("fleet bench: unknown option {other}");
                return ExitCode::FAILURE;
            }
        };
        match value() {
            Some(v) => *slot = v,
            None => {
                eprintln!("fleet bench: {arg} takes a positive number");
                return ExitCode::FAILURE;
            }
        }
    }
    match run(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleet bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(options: &Options) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    println!("authinfo-proxy fleet view benchmark ({cores} CPUs)");
    let dir = tempfile::Builder::new()
        .prefix("authinfo-proxy-fleet-bench-")
        .tempdir()
        .context("cannot make a temporary directory")?;
    let lab_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores)
        .thread_name("lab-worker")
        .enable_all()
        .build()
        .context("cannot start the lab runtime")?;
    let lab = lab_runtime
        .block_on(Lab::start(dir.path(), lab::world(0, 90), PROXY_EXTRA, ""))
        .context("cannot start the lab")?;
    let key = RsaSigner::from_file(&lab.files.path("device.key")).context("device key")?;
    let device = DeviceSigner::new(DEVICE_ID.to_owned(), key);

    // 1. Ingestion.
    let signed_at = Instant::now();
    let requests = presign(&device, options.reports, cores)?;
    println!(
        "ingestion: {} reports signed in {:.1} s (outside the timed window); {} keep-alive clients",
        requests.len(),
        signed_at.elapsed().as_secs_f64(),
        options.clients
    );
    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the client runtime")?;
    let target = Target::pinned(lab.proxy.addr, &lab.files.path("proxy-ca.pem"))?;
    let took = client.block_on(ingest(&target, options.clients, requests))?;
    let kept = lab.proxy.app.metrics.requests(ROUTE_REPORT, "OK");
    println!(
        "ingestion: {} reports answered 200 in {:.2} s: {:.0} reports/s (target >= 2000)",
        options.reports,
        took.as_secs_f64(),
        options.reports as f64 / took.as_secs_f64()
    );
    if kept < options.reports as u64 {
        bail!("only {kept} reports were counted OK");
    }

    // 2. Pages of a large fleet.
    let built = Instant::now();
    let now = unix_now();
    let enrolled = lab.proxy.app.registry.current();
    let template = enrolled
        .get(DEVICE_ID)
        .ok_or_else(|| anyhow!("the lab device"))?;
    let registry = Registry::from_devices((0..options.terminals).map(|i| Device {
        device_id: format!("T-{i:06}"),
        device_sn: format!("SIM{i:012}"),
        ..Device::clone(&template)
    }));
    lab.proxy.app.registry.replace(registry);
    let records = lab.proxy.app.health.records();
    lab_runtime.block_on(async {
        for i in 0..options.terminals {
            // Nine in ten healthy; the rest in assorted risks; one in fifty never reported.
            if i % 50 == 49 {
                continue;
            }
            let mut r = Report::healthy("0.1.0", now, &day(now, 30 + (i % 300) as i64));
            match i % 20 {
                1 => r.licence.value = Some(day(now, (i % 30) as i64)),
                2 => r.inspection.value = Some(InspectionResult::Warn),
                3 => r.authinfo.state = HeldState::Expired,
                4 => r.version = "0.0.9".into(),
                _ => {}
            }
            r.authinfo.age_seconds = Some((i % 4000) as u64);
            let id = format!("T-{i:06}");
            records.issued(&id, now - (i % 3000) as i64).await?;
            records
                .report(
                    &id,
                    ReceivedReport {
                        received_at: now - (i % 900) as i64,
                        report: r,
                    },
                )
                .await?;
        }
        anyhow::Ok(())
    })?;
    let building = built.elapsed();
    // Written through to sled before the pages are timed: a live fleet's flushes are a few
    // thousand records every 15 s, not 100 000 at once.
    let flushed = Instant::now();
    lab_runtime.block_on(records.flush())?;
    println!(
        "pages: {} terminals enrolled with reports in {:.1} s, flushed to sled in {:.1} s",
        options.terminals,
        building.as_secs_f64(),
        flushed.elapsed().as_secs_f64()
    );
    let admin = lab.proxy.admin_addr;
    // The first request judges the fleet (nothing has judged these records yet); the ones that
    // follow within the loop's interval reuse that view (FleetHealth::view, from 10 000
    // terminals on). Both are printed: the first is the worst a request can take.
    for path in ["/terminals", "/"] {
        let health = &lab.proxy.app.health;
        lab_runtime.block_on(async {
            health.forget_view().await;
        });
        let mut times = Vec::new();
        let mut size = 0;
        for _ in 0..options.page_runs.max(2) {
            let started = Instant::now();
            let body = client.block_on(admin_get(admin, path))?;
            times.push(started.elapsed());
            size = body.len();
        }
        let first = times.remove(0);
        times.sort();
        println!(
            "pages: GET {path:<10} {} terminals: first (judging the fleet) {:.0} ms; then median {:.0} ms, worst {:.0} ms over {} runs reusing the view ({} KiB; target <= 200 ms)",
            options.terminals,
            first.as_secs_f64() * 1000.0,
            times[times.len() / 2].as_secs_f64() * 1000.0,
            times[times.len() - 1].as_secs_f64() * 1000.0,
            times.len(),
            size / 1024
        );
    }
    drop(client);
    lab_runtime.block_on(lab.stop());
    Ok(())
}

/// `YYYY-MM-DD`, `days` after `now`.
fn day(now: i64, days: i64) -> String {
    authinfod::units::rfc3339(now + days * 86_400)[..10].to_owned()
}

/// `n` report requests of `device`, each with its own nonce, signed on `threads` threads.
fn presign(device: &DeviceSigner, n: usize, threads: usize) -> anyhow::Result<Vec<Signed>> {
    let now = unix_now();
    let body = Bytes::from(serde_json::to_vec(&Report::healthy(
        "0.1.0",
        now,
        &day(now, 200),
    ))?);
    parallel(n, threads, |_| {
        sign(device, ROUTE_REPORT, now, body.clone())
    })
}

/// Sends every request over `clients` keep-alive connections (opened before the clock starts);
/// how long until the last answer.
async fn ingest(
    target: &Target,
    clients: usize,
    requests: Vec<Signed>,
) -> anyhow::Result<Duration> {
    let mut senders = Vec::new();
    for _ in 0..clients {
        senders.push(connect(target).await?);
    }
    let mut shares: Vec<Vec<Signed>> = (0..clients).map(|_| Vec::new()).collect();
    for (i, r) in requests.into_iter().enumerate() {
        shares[i % clients].push(r);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (mut sender, share) in senders.into_iter().zip(shares) {
        tasks.push(tokio::spawn(async move {
            for signed in share {
                let (status, body) = post(&mut sender, ROUTE_REPORT, &signed).await?;
                if status != 200 {
                    bail!("HTTP {status}: {}", String::from_utf8_lossy(&body));
                }
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(started.elapsed())
}

/// `GET path` on the admin listener; the body.
async fn admin_get(addr: SocketAddr, path: &str) -> anyhow::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.write_all(format!("GET {path} HTTP/1.0\r\nhost: admin\r\n\r\n").as_bytes())
        .await?;
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer).await?;
    if !answer.starts_with(b"HTTP/1.0 200") && !answer.starts_with(b"HTTP/1.1 200") {
        bail!(
            "GET {path}: {}",
            String::from_utf8_lossy(&answer[..answer.len().min(300)])
        );
    }
    Ok(answer)
}
