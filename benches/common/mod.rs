//! What the benchmarks share: what they read from `/proc` about the machine they run on, how
//! they rank their latencies, their option parsers, and the terminals' HTTPS client ([`https`]).

// Each bench uses what it needs of these.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, anyhow};

pub mod https;

/// The machine's busy and total ticks, summed over CPUs, from `/proc/stat`.
pub fn machine_ticks() -> anyhow::Result<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
    let line = stat
        .lines()
        .next()
        .ok_or_else(|| anyhow!("empty /proc/stat"))?;
    // cpu user nice system idle iowait irq softirq steal (guest time is inside user).
    let ticks: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|v| v.parse::<f64>().unwrap_or(0.0))
        .collect();
    let total: f64 = ticks.iter().sum();
    let idle = ticks.get(3).copied().unwrap_or(0.0) + ticks.get(4).copied().unwrap_or(0.0);
    Ok((total - idle, total))
}

/// The one-minute load average, or "?".
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// A thread's time on a CPU: the first field of its `schedstat`, in nanoseconds.
// benches/socket.rs measures its daemon from /proc/PID/stat and does not read thread times.
pub fn on_cpu(schedstat: &Path) -> anyhow::Result<Duration> {
    let text = std::fs::read_to_string(schedstat)
        .with_context(|| format!("cannot read {}", schedstat.display()))?;
    text.split_whitespace()
        .next()
        .and_then(|ns| ns.parse().ok())
        .map(Duration::from_nanos)
        .ok_or_else(|| anyhow!("unexpected {}", schedstat.display()))
}

/// The nearest-rank percentile `p` (0 to 100) of `sorted` (shortest first): the smallest value
/// with at least p % of the sample at or below it; zero for an empty sample.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let n = sorted.len();
    if n == 0 {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * n as f64).ceil() as usize;
    sorted[rank.clamp(1, n) - 1]
}

/// A positive whole number (a clap value parser).
pub fn positive(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{text:?} is not a positive whole number")),
    }
}

/// A positive whole number of seconds (a clap value parser).
pub fn seconds(text: &str) -> Result<Duration, String> {
    match text.parse::<u64>() {
        Ok(n) if n > 0 => Ok(Duration::from_secs(n)),
        _ => Err(format!(
            "{text:?} is not a positive whole number of seconds"
        )),
    }
}

/// `f(0)`..`f(count - 1)` on up to `threads` threads, in order; the first error, if any (signing
/// requests ahead of a timed window, making keys).
pub fn parallel<T: Send>(
    count: usize,
    threads: usize,
    f: impl Fn(usize) -> anyhow::Result<T> + Sync,
) -> anyhow::Result<Vec<T>> {
    let per_thread = count.div_ceil(threads.max(1)).max(1);
    let f = &f;
    let chunks: Vec<anyhow::Result<Vec<T>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..count)
            .step_by(per_thread)
            .map(|from| {
                let to = (from + per_thread).min(count);
                scope.spawn(move || (from..to).map(f).collect::<anyhow::Result<Vec<T>>>())
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("a worker thread panicked")))
            })
            .collect()
    });
    let mut all = Vec::with_capacity(count);
    for chunk in chunks {
        all.extend(chunk?);
    }
    Ok(all)
}
