//! What the benchmarks read from `/proc` about the machine they run on, and how they rank
//! their latencies.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, anyhow};

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
#[allow(dead_code)]
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
