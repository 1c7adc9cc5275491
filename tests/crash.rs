//! `kill -9` of the real daemon binary at random moments (start-up, refresh, persist, shutdown),
//! against the sandbox lab: no announced authinfo or raw_data is ever lost, rolled back or
//! corrupted, nothing is moved aside, and a restart serves the stored authinfo at once. A good
//! share of the start-up kills land inside sled's open (the figure says how many): the next start
//! probes the store in a child and must not take them for damage, however many come in a row.
//!
//! `cargo test` runs [`DEFAULT_ITERATIONS`] iterations of the debug binary; `scripts/kill-loop`
//! runs 500 of the release binary (`KILL_LOOP_ITERATIONS`, `KILL_LOOP_BIN`, `KILL_LOOP_SEED`)
//! and prints the figures. It executes a built binary, so it cannot run under qemu user
//! emulation (`scripts/cross` skips it).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use authinfod::crypto::secret_fingerprint;
use authinfod::demo::lab::{self, Lab};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;

use crate::support::{GENEROUS, Reply};

/// Iterations in `cargo test`: enough to kill in every phase many times, cheap enough for CI.
const DEFAULT_ITERATIONS: usize = 60;

/// Where an iteration kills the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Moment {
    /// 0 to 50 ms after exec: config, key, store open, socket bind.
    StartUp,
    /// While a refresh it asked for (and its persist) may be running.
    Refresh,
    /// Right after new raw_data was pushed (its persist may be running).
    RawData,
    /// After SIGTERM, while it shuts down (the final flush).
    Shutdown,
    /// While it idles (the store check may be writing).
    Idle,
}

/// A small deterministic generator (xorshift64*), so a run can be repeated with its seed.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn moment(&mut self) -> Moment {
        match self.below(100) {
            0..30 => Moment::StartUp,
            30..60 => Moment::Refresh,
            60..75 => Moment::RawData,
            75..90 => Moment::Shutdown,
            _ => Moment::Idle,
        }
    }
}

/// What the loop counted.
#[derive(Debug, Default)]
struct Figures {
    kills: usize,
    /// Kills 0 to 50 ms after exec.
    kills_at_start: usize,
    /// A start that served nothing (503) though an authinfo had been announced, or lost the
    /// announced raw_data.
    lost: usize,
    /// A start that served something never issued, or did not come up.
    corrupt: usize,
    /// A start that served an older announced authinfo than the last one.
    rolled_back: usize,
    moved_aside: usize,
    /// Milliseconds from exec to the first 200 of `GET /v1/authinfo`, for starts with an
    /// authinfo stored.
    start_to_serve_ms: Vec<f64>,
    problems: Vec<String>,
}

impl Figures {
    fn percentile(&self, p: f64) -> f64 {
        let mut v = self.start_to_serve_ms.clone();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return f64::NAN;
        }
        let rank = (p / 100.0 * (v.len() as f64)).ceil() as usize;
        v[rank.clamp(1, v.len()) - 1]
    }
}

/// One HTTP/1.1 exchange over the daemon's socket; `None` while it is not listening.
async fn exchange(socket: &Path, method: &str, path: &str, body: Option<&[u8]>) -> Option<Reply> {
    let stream = tokio::net::UnixStream::connect(socket).await.ok()?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "authinfod");
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .body(Full::new(bytes::Bytes::copy_from_slice(
            body.unwrap_or_default(),
        )))
        .expect("request");
    let response = sender.send_request(req).await.ok()?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .ok()?
        .to_bytes()
        .to_vec();
    Some(Reply {
        status,
        headers,
        body,
    })
}

/// Polls `GET /v1/authinfo` every millisecond until the daemon answers; the answer and when.
async fn first_answer(socket: &Path, child: &mut Child) -> Result<(Reply, Instant), String> {
    let deadline = Instant::now() + GENEROUS;
    loop {
        if let Some(reply) = exchange(socket, "GET", "/v1/authinfo", None).await {
            return Ok((reply, Instant::now()));
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("the daemon exited on its own: {status}"));
        }
        if Instant::now() > deadline {
            return Err("the daemon did not answer".into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn kill(child: &mut Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = child.wait();
}

fn count_moved_aside(state: &Path) -> usize {
    std::fs::read_dir(state).map_or(0, |d| {
        d.flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("store.broken-"))
            .count()
    })
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_never_loses_an_announced_authinfo() {
    let iterations = env_or("KILL_LOOP_ITERATIONS", DEFAULT_ITERATIONS);
    let binary = std::env::var_os("KILL_LOOP_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_authinfod")),
        PathBuf::from,
    );
    let seed = env_or(
        "KILL_LOOP_SEED",
        authinfod::units::unix_now().unsigned_abs() | 1,
    );
    let mut random = Random(seed);
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let lab = Lab::start_with_keys(
        dir.path(),
        crate::support::lab_keys(),
        lab::world(0, 90),
        "",
        "",
    )
    .await
    .expect("lab");
    let socket = dir.path().join("authinfod.sock");
    let state = dir.path().join("authinfod-state");
    let log_path = dir.path().join("authinfod.log");
    let log = std::fs::File::create(&log_path).expect("log");

    let mut figures = Figures::default();
    // Fingerprints of every authinfo announced (served, or answered by a refresh), in order.
    let mut announced: Vec<String> = Vec::new();
    // The raw_data announced last (a 202 that said persisted), and the one pushed after it
    // whose answer the kill may have cut off.
    let mut raw_announced: Option<String> = None;
    let mut raw_in_flight: Option<String> = None;
    let mut raw_counter = 0_u32;

    for iteration in 0..iterations {
        let moment = random.moment();
        let started = Instant::now();
        let mut child = Command::new(&binary)
            .args(["run", "--config"])
            .arg(&lab.daemon_config)
            .env("RUST_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.try_clone().expect("log"))
            .spawn()
            .expect("spawn authinfod");
        if moment == Moment::StartUp && !announced.is_empty() {
            tokio::time::sleep(Duration::from_micros(random.below(50_000))).await;
            kill(&mut child);
            figures.kills += 1;
            figures.kills_at_start += 1;
            continue;
        }
        let (reply, answered) = match first_answer(&socket, &mut child).await {
            Ok(answer) => answer,
            Err(why) => {
                figures.corrupt += 1;
                figures
                    .problems
                    .push(format!("iteration {iteration}: {why}"));
                kill(&mut child);
                break;
            }
        };
        // What the start serves, against what was announced before.
        match (reply.status, announced.last().cloned()) {
            (200, last) => {
                figures
                    .start_to_serve_ms
                    .push(answered.duration_since(started).as_secs_f64() * 1000.0);
                let authinfo = reply.json()["authinfo"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let fingerprint = secret_fingerprint(authinfo.as_bytes());
                if !authinfo.starts_with("SANDBOX-AUTHINFO-") {
                    figures.corrupt += 1;
                    figures
                        .problems
                        .push(format!("iteration {iteration}: served {authinfo:?}"));
                } else if last.as_ref().is_some_and(|l| *l != fingerprint) {
                    if announced.contains(&fingerprint) {
                        figures.rolled_back += 1;
                        figures.problems.push(format!(
                            "iteration {iteration}: served {fingerprint}, announced last {last:?}"
                        ));
                    } else {
                        // Stored, but the kill came before it was seen: newer.
                        announced.push(fingerprint);
                    }
                } else if last.is_none() {
                    announced.push(fingerprint);
                }
            }
            (503, Some(last)) => {
                figures.lost += 1;
                figures.problems.push(format!(
                    "iteration {iteration}: served nothing, announced {last}"
                ));
            }
            (503, None) => {}
            (status, _) => {
                figures.corrupt += 1;
                figures.problems.push(format!(
                    "iteration {iteration}: GET /v1/authinfo answered {status}"
                ));
            }
        }
        // The raw_data it holds.
        if let Some(status) = exchange(&socket, "GET", "/v1/status", None).await {
            let held = status.json()["raw_data"]["fingerprint"]
                .as_str()
                .map(str::to_owned);
            match (&raw_announced, &held) {
                (Some(want), Some(got)) if want == got => {}
                (Some(_), Some(got)) if raw_in_flight.as_ref() == Some(got) => {
                    raw_announced = Some(got.clone());
                }
                (None, _) => raw_announced = held.clone(),
                (Some(want), got) => {
                    figures.lost += 1;
                    figures.problems.push(format!(
                        "iteration {iteration}: raw_data {got:?}, announced {want}"
                    ));
                }
            }
            raw_in_flight = None;
        }
        if announced.is_empty() {
            // The first start: give it raw_data and wait for its first authinfo.
            raw_counter += 1;
            let raw = format!("RAW-{raw_counter}");
            let body = serde_json::to_vec(&serde_json::json!({ "raw_data": raw })).expect("json");
            let r = exchange(&socket, "PUT", "/v1/raw-data", Some(&body))
                .await
                .expect("raw_data accepted");
            assert_eq!(r.status, 202);
            raw_announced = Some(secret_fingerprint(raw.as_bytes()));
            let done = exchange(&socket, "POST", "/v1/refresh?wait=true", None)
                .await
                .expect("refresh");
            assert_eq!(done.status, 200, "{}", String::from_utf8_lossy(&done.body));
            announced.push(
                done.json()["fingerprint"]
                    .as_str()
                    .expect("fingerprint")
                    .to_owned(),
            );
        }
        match moment {
            Moment::StartUp | Moment::Idle => {
                tokio::time::sleep(Duration::from_micros(random.below(100_000))).await;
            }
            Moment::Refresh => {
                let socket = socket.clone();
                let refresh = tokio::spawn(async move {
                    exchange(&socket, "POST", "/v1/refresh?wait=true", None).await
                });
                tokio::time::sleep(Duration::from_micros(random.below(60_000))).await;
                kill(&mut child);
                if let Ok(Some(done)) = refresh.await
                    && done.status == 200
                    && let Some(fp) = done.json()["fingerprint"].as_str()
                {
                    announced.push(fp.to_owned());
                }
                figures.kills += 1;
                continue;
            }
            Moment::RawData => {
                raw_counter += 1;
                let raw = format!("RAW-{raw_counter}");
                raw_in_flight = Some(secret_fingerprint(raw.as_bytes()));
                let socket = socket.clone();
                let push = tokio::spawn(async move {
                    let body =
                        serde_json::to_vec(&serde_json::json!({ "raw_data": raw })).expect("json");
                    exchange(&socket, "PUT", "/v1/raw-data", Some(&body)).await
                });
                tokio::time::sleep(Duration::from_micros(random.below(20_000))).await;
                kill(&mut child);
                if let Ok(Some(r)) = push.await
                    && r.status == 202
                    && r.json()["persisted"] == true
                {
                    raw_announced = raw_in_flight.take();
                }
                figures.kills += 1;
                continue;
            }
            Moment::Shutdown => {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid")),
                    nix::sys::signal::Signal::SIGTERM,
                );
                tokio::time::sleep(Duration::from_micros(random.below(20_000))).await;
            }
        }
        kill(&mut child);
        figures.kills += 1;
    }
    figures.moved_aside = count_moved_aside(&state);
    let log_text = std::fs::read_to_string(&log_path).unwrap_or_default();
    // Told by the start after: the kill came while sled was opening the store.
    let kills_in_open = log_text
        .lines()
        .filter(|l| l.contains("the previous start died while sled was opening"))
        .count();
    let repairs: Vec<String> = log_text
        .lines()
        .filter(|l| l.contains("store damage found"))
        .map(str::to_owned)
        .collect();
    for line in &repairs {
        println!("kill-loop: repair logged: {line}");
    }
    let recoveries = repairs.len();
    println!(
        "kill-loop: binary {}, seed {seed}, {iterations} iterations: kills {} ({} at start-up, {kills_in_open} of them inside sled's open), lost {}, corrupt {}, rolled back {}, moved aside {}, repairs logged {recoveries}; start->serve p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} starts",
        binary.display(),
        figures.kills,
        figures.kills_at_start,
        figures.lost,
        figures.corrupt,
        figures.rolled_back,
        figures.moved_aside,
        figures.percentile(50.0),
        figures.percentile(99.0),
        figures.percentile(100.0),
        figures.start_to_serve_ms.len(),
    );
    lab.stop().await;
    assert!(
        figures.lost == 0
            && figures.corrupt == 0
            && figures.rolled_back == 0
            && figures.moved_aside == 0,
        "seed {seed}: {:#?}\nthe daemon's log: {}",
        figures.problems,
        std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("ERROR") || l.contains("WARN"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(figures.kills >= iterations / 2, "{figures:?}");
}
