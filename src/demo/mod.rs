//! `authinfod demo`: the whole chain in one process — simulated platforms, the signing proxy and
//! the daemon — on temporary directories and sockets with keys made on the spot, playing the
//! story a newcomer needs: first fetch, a face-app read, the network cut, recovery, and the
//! merchant's fleet view of the terminal.
//!
//! - [`lab`]: the setup (keys, certificates, config files, servers) the demo and tests share.
//! - [`simulated`]: simulated terminals reporting to a proxy (`authinfo-proxy sandbox
//!   --simulate-terminals`).
//!
//! Owns: the story and its narration. It must not reach into the daemon's internals: it talks
//! to the daemon over its socket like the face app and `authinfod status` do, and reads the
//! fleet view from the proxy's admin listener like `authinfo-proxy terminals`.

pub mod lab;
pub mod simulated;

use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

use crate::proxy::terminals::doc::{TerminalDoc, TerminalsList, render_table};
use crate::terminal::client::{self, ClientError};
use crate::terminal::config::SocketAddress;
use crate::terminal::doc::{CheckState, HeldState, StatusDoc};
use crate::terminal::{self, Daemon, RunOptions};

/// Why the demo stopped early.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Lab(#[from] lab::LabError),
    #[error(transparent)]
    Config(#[from] terminal::config::ConfigError),
    #[error(transparent)]
    Daemon(#[from] terminal::DaemonError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("cannot read the fleet view")]
    Proxy(#[from] crate::proxy::ProxyError),
    #[error("{0}")]
    Story(String),
    #[error("cannot write the story")]
    Output(#[from] std::io::Error),
}

/// The daemon's settings in the demo: a short interval and backoff so the story fits in seconds.
/// A forced refresh is allowed every second (the default, a minute, would stall the story).
const DAEMON_EXTRA: &str = "[refresh]\ninterval = \"30s\"\nbackoff_min = \"1s\"\nbackoff_max = \"3s\"\nmin_forced_interval = \"1s\"\n\n[health]\ninterval = \"1m\"\n";

/// How long a step of the story may take before the demo gives up. Each normally takes well
/// under a second; the bound is for a machine that is slow (the demo also runs under qemu in
/// the tests).
const STEP_LIMIT: Duration = Duration::from_secs(90);

/// Runs the demo: the story, then serving until `duration` has passed since the start or
/// `shutdown` resolves. Narration goes to `out`.
pub async fn run(
    duration: Duration,
    shutdown: impl Future<Output = ()>,
    out: &mut (dyn Write + Send),
) -> Result<(), DemoError> {
    let dir = demo_dir();
    let result = run_in(&dir, duration, shutdown, out).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_in(
    dir: &Path,
    duration: Duration,
    shutdown: impl Future<Output = ()>,
    out: &mut (dyn Write + Send),
) -> Result<(), DemoError> {
    let started = Instant::now();
    let mut story = Story { out, started };
    story.say(
        "authinfod demo: the whole chain on this machine, no account and no network needed.",
    )?;
    story
        .step("Generating keys and certificates, starting the simulated platforms and the proxy")?;
    let lab = lab::Lab::start(
        dir,
        lab::world(12, 45),
        "[fleet]\nsync_interval = \"10m\"\n",
        DAEMON_EXTRA,
    )
    .await?;
    let parts = [
        (
            "sandbox (WeChat Pay, Alipay, Alibaba Cloud)",
            lab.sandbox.base_url.clone(),
            "verifies the proxy's signatures like the real platforms",
        ),
        (
            "authinfo-proxy",
            format!("https://{}", lab.proxy.addr),
            "holds the merchant keys, authenticates the terminal",
        ),
        (
            "authinfo-proxy admin listener",
            format!("http://{}/", lab.proxy.admin_addr),
            "the fleet dashboard; GET /terminals is its JSON",
        ),
        (
            "network between terminal and proxy",
            format!("127.0.0.1:{}", lab.net.addr.port()),
            "(a relay the demo can cut)",
        ),
    ];
    let width = parts
        .iter()
        .map(|(name, _, _)| name.len())
        .max()
        .unwrap_or(0);
    for (name, address, what) in &parts {
        story.say(&format!("  {name:<width$}  {address}   {what}"))?;
    }
    story.say(&format!("  configs and keys in {}", dir.display()))?;

    story.step("Starting authinfod (the terminal daemon)")?;
    let config = terminal::config::load(&lab.daemon_config)?;
    let socket = config.socket.address.clone();
    let daemon = Daemon::start(config, RunOptions::default()).await?;
    let stop = tokio_util::sync::CancellationToken::new();
    let token = stop.clone();
    let daemon_task = tokio::spawn(daemon.run(async move { token.cancelled().await }));
    story.say(&format!("  serving on {socket}"))?;
    story.say("  Try it while the demo runs, in another terminal:")?;
    story.say(&format!(
        "    curl --unix-socket {socket} http://localhost/v1/authinfo"
    ))?;
    story.say(&format!(
        "    curl --unix-socket {socket} http://localhost/v1/status"
    ))?;
    story.say(&format!(
        "    cargo run --release -- status --socket {socket}"
    ))?;

    let result = play(&mut story, &lab, &socket).await;
    if let Err(e) = &result {
        story.say(&format!("The story stopped: {e}"))?;
    } else {
        let left = duration.saturating_sub(started.elapsed());
        story.step(&format!(
            "The chain keeps running for {} more (--duration); Ctrl-C stops it",
            crate::units::format_duration(Duration::from_secs(left.as_secs()))
        ))?;
        tokio::select! {
            () = shutdown => story.say("Stopping on a signal.")?,
            () = tokio::time::sleep(left) => story.say("Duration reached; stopping.")?,
        }
    }
    stop.cancel();
    let _ = daemon_task.await;
    lab.stop().await;
    story.say("Stopped. Everything the demo made is deleted.")?;
    result
}

/// Narration with elapsed-time stamps and step numbers.
struct Story<'a> {
    out: &'a mut (dyn Write + Send),
    started: Instant,
}

impl Story<'_> {
    fn say(&mut self, line: &str) -> std::io::Result<()> {
        writeln!(self.out, "{line}")?;
        self.out.flush()
    }

    fn step(&mut self, title: &str) -> std::io::Result<()> {
        let t = self.started.elapsed().as_secs_f64();
        writeln!(self.out, "\n[{t:5.1}s] {title}")?;
        self.out.flush()
    }
}

/// Polls `GET /v1/status` until `cond` holds (at most `limit`).
async fn wait_status(
    socket: &SocketAddress,
    limit: Duration,
    mut cond: impl FnMut(&StatusDoc) -> bool,
) -> Result<StatusDoc, DemoError> {
    let deadline = Instant::now() + limit;
    loop {
        let status = client::status(socket).await?;
        if cond(&status) {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            return Err(DemoError::Story(format!(
                "gave up waiting; status was {}",
                serde_json::to_string(&status).unwrap_or_default()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `authinfod refresh --wait`, waiting out the daemon's forced-refresh limit (a 429 with its
/// `retry_after_seconds`) as a patient operator would, a few times at most.
async fn refresh_when_allowed(
    socket: &SocketAddress,
) -> Result<crate::terminal::doc::RefreshDone, ClientError> {
    let mut tries = 0;
    loop {
        match client::refresh_and_wait(socket).await {
            Err(ClientError::Refused {
                status: 429,
                retry_after_seconds: Some(secs),
                ..
            }) if tries < 5 => {
                tries += 1;
                tokio::time::sleep(Duration::from_secs(secs)).await;
            }
            other => return other,
        }
    }
}

fn short(authinfo: &str) -> String {
    let mut s: String = authinfo.chars().take(28).collect();
    if authinfo.len() > 28 {
        s.push('…');
    }
    s
}

fn or_unknown(v: Option<&str>) -> &str {
    v.unwrap_or("?")
}

async fn play(
    story: &mut Story<'_>,
    lab: &lab::Lab,
    socket: &SocketAddress,
) -> Result<(), DemoError> {
    story.step("The face app hands over the face SDK's raw_data (PUT /v1/raw-data)")?;
    let accepted = client::put_raw_data(socket, "SANDBOX-RAWDATA-FROM-getWxpayfaceRawdata").await?;
    story.say(&format!(
        "  202 {}",
        serde_json::to_string(&accepted).unwrap_or_default()
    ))?;

    story.step("authinfod fetches an authinfo: terminal → proxy (device-signed, TLS) → WeChat Pay sandbox (merchant-signed)")?;
    let status = wait_status(socket, STEP_LIMIT, |s| s.authinfo.state == HeldState::Fresh).await?;
    let first = or_unknown(status.authinfo.fingerprint.as_deref()).to_owned();
    story.say(&format!(
        "  stored in sled and served: fingerprint {first}, expires {}",
        or_unknown(status.authinfo.expires_at.as_deref())
    ))?;

    story.step("The face app reads it over the socket (GET /v1/authinfo)")?;
    let doc = client::authinfo(socket)
        .await?
        .ok_or_else(|| DemoError::Story("no authinfo is served".into()))?;
    story.say(&format!(
        "  200 {{\"authinfo\": \"{}\", \"state\": \"{}\", \"age_seconds\": {}, \"expires_at\": \"{}\"}}",
        short(&doc.authinfo),
        doc.state.as_str(),
        doc.age_seconds
            .map_or_else(|| "null".to_owned(), |a| a.to_string()),
        doc.expires_at
    ))?;

    story.step(
        "Device health, fetched through the proxy from all three platforms (GET /v1/device)",
    )?;
    let status = wait_status(socket, STEP_LIMIT, |s| {
        let d = &s.device;
        [d.inspection.state, d.alipay_binding.state, d.licence.state]
            .iter()
            .all(|c| *c != CheckState::Pending)
    })
    .await?;
    let d = &status.device;
    let state = CheckState::as_str;
    story.say(&format!(
        "  inspection (WeChat Pay):      {}: {}",
        state(d.inspection.state),
        d.inspection
            .value
            .as_ref()
            .map_or("?", |v| v.result.as_str())
    ))?;
    let binding = d.alipay_binding.value.as_ref();
    story.say(&format!(
        "  Alipay binding (Alipay):      {}: {} merchant, pid {}, shop {}",
        state(d.alipay_binding.state),
        or_unknown(binding.map(|b| b.merchant_type.as_str())),
        or_unknown(binding.map(|b| b.pid.as_str())),
        or_unknown(binding.map(|b| b.shop_id.as_str())),
    ))?;
    let licence = d.licence.value.as_ref();
    story.say(&format!(
        "  SDK licence (Alibaba Cloud):  {}: valid to {} ({} days left)",
        state(d.licence.state),
        or_unknown(licence.map(|l| l.licence.expired_day.as_str())),
        licence
            .and_then(|l| l.days_left)
            .map_or_else(|| "?".into(), |n| n.to_string())
    ))?;

    story.step("The network to the proxy is cut")?;
    lab.net.cut();
    match refresh_when_allowed(socket).await {
        Err(ClientError::Refused { status, code, .. }) => {
            story.say(&format!("  a refresh fails: {status} {code}"))?;
        }
        Ok(_) => {
            return Err(DemoError::Story(
                "a refresh succeeded through a cut network".into(),
            ));
        }
        Err(e) => return Err(e.into()),
    }
    let status = wait_status(socket, STEP_LIMIT, |s| s.refresh.consecutive_failures >= 2).await?;
    let still = client::authinfo(socket).await?;
    story.say(&format!(
        "  the face app is still served: {} {} (the held authinfo is never replaced by a failure)",
        if still.is_some() { 200 } else { 503 },
        still.map(|d| short(&d.authinfo)).unwrap_or_default()
    ))?;
    story.say(&format!(
        "  status: proxy reachable={}, {} consecutive failures (last: {}), retrying with exponential backoff and jitter",
        status.proxy.reachable.map_or_else(|| "unknown".into(), |r| r.to_string()),
        status.refresh.consecutive_failures,
        or_unknown(status.refresh.last_error_code.as_deref())
    ))?;

    story.step("The network comes back")?;
    lab.net.restore();
    let status = wait_status(socket, STEP_LIMIT, |s| {
        s.authinfo
            .fingerprint
            .as_deref()
            .is_some_and(|f| f != first)
            && s.refresh.last_attempt_ok == Some(true)
    })
    .await?;
    story.say(&format!(
        "  recovered on the next backoff attempt: new authinfo {} (was {first}), proxy reachable={}",
        or_unknown(status.authinfo.fingerprint.as_deref()),
        status.proxy.reachable.map_or_else(|| "unknown".into(), |r| r.to_string())
    ))?;
    story.say(&format!(
        "  {} terminal requests were served by the proxy; the sandbox verified {} signed platform calls",
        lab.proxy.app.metrics.requests("/v1/authinfo", "OK")
            + lab.proxy.app.metrics.requests("/v1/inspection", "OK")
            + lab.proxy.app.metrics.requests("/v1/alipay-binding", "OK")
            + lab.proxy.app.metrics.requests("/v1/licence", "OK"),
        lab.sandbox.state.received().iter().filter(|r| r.signature_ok).count()
    ))?;

    story.step("The fleet view, as the merchant sees it (authinfo-proxy terminals)")?;
    let fleet = wait_fleet_view(lab.proxy.admin_addr, STEP_LIMIT, |t| {
        t.device_id == lab::DEVICE_ID
            && t.report.as_ref().is_some_and(|r| {
                r.authinfo.state == HeldState::Fresh && r.refresh.last_attempt_ok == Some(true)
            })
    })
    .await?;
    for line in render_table(&fleet.terminals, &fleet.summary).lines() {
        story.say(&format!("  {line}"))?;
    }
    Ok(())
}

/// Asks the proxy's admin listener for the fleet view (`GET /terminals`, as `authinfo-proxy
/// terminals` does) until a terminal in it passes `cond` (at most `limit`): the daemon reports
/// soon after each refresh attempt.
async fn wait_fleet_view(
    admin: std::net::SocketAddr,
    limit: Duration,
    cond: impl Fn(&TerminalDoc) -> bool,
) -> Result<TerminalsList, DemoError> {
    let deadline = Instant::now() + limit;
    loop {
        let answer = crate::proxy::admin_terminals(admin, None, false).await;
        match answer {
            Ok(list) if list.terminals.iter().any(&cond) => return Ok(list),
            Err(e) if Instant::now() >= deadline => return Err(e.into()),
            _ if Instant::now() >= deadline => {
                return Err(DemoError::Story(
                    "gave up waiting for the terminal's report in the fleet view".into(),
                ));
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Where the demo keeps its files while it runs.
pub fn demo_dir() -> PathBuf {
    std::env::temp_dir().join(format!("authinfod-demo-{}", std::process::id()))
}
