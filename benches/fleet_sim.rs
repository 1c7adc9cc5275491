//! Fleet simulation: the daemon's real schedule and backoff code (`authinfod::schedule`, with
//! the daemon's default config) driven on a virtual clock for a whole fleet, counting the
//! requests that reach the proxy per minute.
//!
//! Each terminal runs what its refresh loop and its health checker run: a refresh when the held
//! authinfo is one interval old (up to `jitter` early), and after a failure the backoff the
//! refresher asks for (`Backoff::failed_with_runway` with the held authinfo's runway: the
//! doubling, then a share of the runway); three device health checks at start and then every
//! `health.interval`, retried as the checker retries them (against `health::CHECK_RUNWAY`).
//! Each terminal holds an authinfo (fetched at, expires at fetched + the default
//! `assumed_validity`, as the sandbox's `expires_in`), replaced on each success. The fleet
//! starts with each terminal's authinfo fetched at a uniformly random time in the last interval
//! and its next health checks at a random time within one (jittered) health interval, and runs
//! `--warmup-hours` (3) before counting, so that what is counted is the schedule's own spread,
//! not the initial draw's. A
//! proxy outage makes every call in its window fail (the daemon's backoff then runs as it would
//! on `PROXY_UNREACHABLE`).
//!
//! Two runs: 24 h undisturbed, where each minute's load must stay within ±15 % of the mean, and
//! 24 h with a one-hour outage, where the recovery peak must stay at most 3× the mean of the
//! undisturbed run. It prints both figures, how many terminals' authinfo expired (during the
//! outage, which a long enough outage makes unavoidable, and after it ended, which the backoff
//! must never cause) and the longest time from the proxy's return to a terminal's successful
//! refresh; with `--plot FILE.png` and gnuplot installed, it writes a plot of requests per
//! minute (both runs).
//!
//! A measurement, not a test: it exits 0 whatever the figures. Options: `--terminals N`
//! (100000), `--hours H` (24), `--outage-at H` (12), `--outage-hours H` (1), `--seed S`,
//! `--plot FILE.png`, `--csv FILE`. Run it with `cargo bench --bench fleet_sim -- [options]`.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use authinfod::schedule::{Backoff, Schedule};
use authinfod::terminal::config as defaults;
use authinfod::terminal::health::CHECK_RUNWAY;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "Simulate a fleet's load on the proxy with the daemon's schedule")]
struct Args {
    /// Terminals in the fleet.
    #[arg(long, default_value_t = 100_000)]
    terminals: usize,
    /// Simulated hours (counted after the warm-up).
    #[arg(long, default_value_t = 24)]
    hours: u64,
    /// Hours simulated before counting starts, so that the fleet's phases have settled from
    /// the initial draw into the schedule's own spread.
    #[arg(long, default_value_t = 3)]
    warmup_hours: u64,
    /// When the outage starts, hours into the run.
    #[arg(long, default_value_t = 12.0)]
    outage_at: f64,
    /// How long the outage lasts, hours.
    #[arg(long, default_value_t = 1.0)]
    outage_hours: f64,
    /// Seed of the random draws (the same seed gives the same figures).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write a PNG plot of requests per minute here (needs gnuplot).
    #[arg(long)]
    plot: Option<std::path::PathBuf>,
    /// Write requests per minute of both runs as CSV here.
    #[arg(long)]
    csv: Option<std::path::PathBuf>,
    /// Ignored (cargo bench passes it).
    #[arg(long, hide = true)]
    bench: bool,
}

/// splitmix64: reproducible uniform draws in [0, 1).
struct Random(u64);

impl Random {
    fn unit(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// What a terminal does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Task {
    Refresh,
    Health,
}

/// What one run measured.
struct Run {
    /// Requests per minute reaching the proxy (calls into an outage count too: they are
    /// connection attempts the proxy's host sees when it comes back up halfway).
    per_minute: Vec<u64>,
    /// Terminals whose authinfo expired before the outage ended (and before they refreshed).
    expired_in_outage: usize,
    /// Terminals whose authinfo expired after the outage ended, before they refreshed: what a
    /// backoff that waits too long would cause.
    expired_after_outage: usize,
    /// The longest time from the end of the outage to a terminal's successful refresh, among
    /// the terminals that failed in it, seconds.
    longest_recovery: f64,
    /// The shortest runway a failed terminal had left when it refreshed after the outage (among
    /// those whose authinfo had not expired), seconds.
    least_runway_at_recovery: f64,
    /// The smallest share of the runway it had when the proxy came back that a failed terminal
    /// still had when it refreshed (the schedule promises at least `1 - RUNWAY_SHARE`).
    least_share_kept: f64,
}

/// A terminal's held authinfo and its two loops' backoffs.
struct Terminal {
    refresh: Backoff,
    health: Backoff,
    /// When the held authinfo expires, seconds on the virtual clock.
    expires_at: f64,
}

/// Runs the fleet, with the proxy down over `outage` (seconds into the counted run).
fn simulate(args: &Args, outage: Option<(f64, f64)>) -> Run {
    let refresh = Schedule {
        interval: defaults::DEFAULT_INTERVAL,
        jitter: defaults::DEFAULT_JITTER,
        backoff_min: defaults::DEFAULT_BACKOFF_MIN,
        backoff_max: defaults::DEFAULT_BACKOFF_MAX,
    };
    let health = Schedule {
        interval: defaults::DEFAULT_HEALTH_INTERVAL,
        ..refresh
    };
    let warmup = Duration::from_secs(args.warmup_hours * 3600).as_secs_f64();
    let end = warmup + Duration::from_secs(args.hours * 3600).as_secs_f64();
    let mut random = Random(args.seed);
    let validity = defaults::DEFAULT_ASSUMED_VALIDITY.as_secs_f64();
    let mut terminals: Vec<Terminal> = Vec::with_capacity(args.terminals);
    // (due time in ms, terminal, task): a min-heap of every terminal's next call.
    let mut queue = BinaryHeap::with_capacity(args.terminals * 2);
    let ms = |secs: f64| (secs * 1000.0) as u64;
    for id in 0..args.terminals {
        // Fetched `age` ago: due when it turns one interval old, as `Refresher::initial_due`.
        let age = random.unit() * refresh.next_interval(random.unit()).as_secs_f64();
        terminals.push(Terminal {
            refresh: Backoff::new(refresh),
            health: Backoff::new(health),
            expires_at: validity - age,
        });
        queue.push(Reverse((
            ms(refresh.interval.as_secs_f64() - age),
            id,
            Task::Refresh,
        )));
        // The next check within one jittered interval, as for the refresh: the warm-up is
        // shorter than a day, so a draw over a plain `health.interval` would leave its second
        // round (up to `jitter` early) piled on the last 2.4 h of its first, inside the counted
        // day (up to a tenth more load for two hours: seed 2 missed ±15 % by it).
        let next_check = random.unit() * health.next_interval(random.unit()).as_secs_f64();
        queue.push(Reverse((ms(next_check), id, Task::Health)));
    }
    let minutes = (args.hours * 60) as usize;
    let mut per_minute = vec![0u64; minutes];
    let mut run = Run {
        per_minute: Vec::new(),
        expired_in_outage: 0,
        expired_after_outage: 0,
        longest_recovery: 0.0,
        least_runway_at_recovery: f64::INFINITY,
        least_share_kept: f64::INFINITY,
    };
    let outage_end = outage.map(|(_, to)| warmup + to);
    while let Some(Reverse((at, id, task))) = queue.pop() {
        let now = at as f64 / 1000.0;
        if now >= end {
            break;
        }
        let calls = match task {
            Task::Refresh => 1,
            Task::Health => 3,
        };
        if now >= warmup {
            per_minute[((now - warmup) / 60.0) as usize] += calls;
        }
        let down = outage.is_some_and(|(from, to)| now >= warmup + from && now < warmup + to);
        let terminal = &mut terminals[id];
        let unit = random.unit();
        let wait = match (task, down) {
            // As `Refresher::runway`: zero once expired.
            (Task::Refresh, true) => {
                let runway = Duration::from_secs_f64((terminal.expires_at - now).max(0.0));
                terminal
                    .refresh
                    .failed_with_runway(None, Some(runway), unit)
            }
            (Task::Refresh, false) => {
                if let Some(end) = outage_end
                    && now >= end
                    && terminal.refresh.failures() > 0
                {
                    run.longest_recovery = run.longest_recovery.max(now - end);
                    let runway = terminal.expires_at - now;
                    if runway >= 0.0 {
                        run.least_runway_at_recovery = run.least_runway_at_recovery.min(runway);
                        let at_return = terminal.expires_at - end;
                        if now > end && at_return > 0.0 {
                            run.least_share_kept = run.least_share_kept.min(runway / at_return);
                        }
                    } else if terminal.expires_at < end {
                        run.expired_in_outage += 1;
                    } else {
                        run.expired_after_outage += 1;
                    }
                }
                terminal.expires_at = now + validity;
                terminal.refresh.succeeded(unit)
            }
            (Task::Health, true) => {
                terminal
                    .health
                    .failed_with_runway(None, Some(CHECK_RUNWAY), unit)
            }
            (Task::Health, false) => terminal.health.succeeded(unit),
        };
        queue.push(Reverse((at + ms(wait.as_secs_f64()).max(1), id, task)));
    }
    run.per_minute = per_minute;
    run
}

fn main() {
    let args = Args::parse();
    let started = std::time::Instant::now();
    let steady = simulate(&args, None).per_minute;
    let from = args.outage_at * 3600.0;
    let to = from + args.outage_hours * 3600.0;
    let outage = simulate(&args, Some((from, to)));
    let disturbed = &outage.per_minute;
    let mean = steady.iter().sum::<u64>() as f64 / steady.len() as f64;
    let (lo, hi) = steady
        .iter()
        .fold((u64::MAX, 0), |(lo, hi), &n| (lo.min(n), hi.max(n)));
    let spread = (hi as f64 - mean).max(mean - lo as f64) / mean;
    let after = (to / 60.0) as usize;
    let (peak_minute, peak) = disturbed
        .iter()
        .enumerate()
        .skip(after)
        .max_by_key(|(_, n)| **n)
        .map_or((after, 0), |(m, n)| (m, *n));
    println!(
        "fleet: {} terminals, {} h, seed {}, default schedule (interval {}, jitter {}, backoff {}..{}, then {} of the runway; validity {}), health every {}",
        args.terminals,
        args.hours,
        args.seed,
        authinfod::units::format_duration(defaults::DEFAULT_INTERVAL),
        defaults::DEFAULT_JITTER,
        authinfod::units::format_duration(defaults::DEFAULT_BACKOFF_MIN),
        authinfod::units::format_duration(defaults::DEFAULT_BACKOFF_MAX),
        authinfod::schedule::RUNWAY_SHARE,
        authinfod::units::format_duration(defaults::DEFAULT_ASSUMED_VALIDITY),
        authinfod::units::format_duration(defaults::DEFAULT_HEALTH_INTERVAL),
    );
    println!(
        "undisturbed: mean {mean:.0} requests/min, min {lo}, max {hi}: within ±{:.1} % of the mean (target ±15 %): {}",
        spread * 100.0,
        if spread <= 0.15 { "met" } else { "MISSED" }
    );
    println!(
        "outage {:.1} h at {:.1} h: recovery peak {peak} requests/min at minute {peak_minute} ({:.0} min after it ended) = {:.2}× the mean (target ≤ 3×): {}",
        args.outage_hours,
        args.outage_at,
        peak_minute.saturating_sub(after),
        peak as f64 / mean,
        if peak as f64 <= 3.0 * mean {
            "met"
        } else {
            "MISSED"
        }
    );
    println!(
        "outage: authinfo expired in {} terminals before it ended, in {} after it ended (target 0): {}",
        outage.expired_in_outage,
        outage.expired_after_outage,
        if outage.expired_after_outage == 0 {
            "met"
        } else {
            "MISSED"
        }
    );
    println!(
        "outage: longest from the proxy's return to a terminal's refresh {:.1} min; least runway left at that refresh {:.1} min",
        outage.longest_recovery / 60.0,
        outage.least_runway_at_recovery / 60.0,
    );
    let floor = 1.0 - authinfod::schedule::RUNWAY_SHARE;
    println!(
        "outage: least share of its runway at the proxy's return a terminal still had at its refresh {:.3} (target ≥ {floor:.2}): {}",
        outage.least_share_kept,
        if outage.least_share_kept >= floor - 1e-9 {
            "met"
        } else {
            "MISSED"
        }
    );
    println!("simulated in {:.1} s", started.elapsed().as_secs_f64());
    let csv: String = std::iter::once("minute,undisturbed,outage\n".to_owned())
        .chain(
            steady
                .iter()
                .zip(disturbed)
                .enumerate()
                .map(|(m, (a, b))| format!("{m},{a},{b}\n")),
        )
        .collect();
    if let Some(path) = &args.csv
        && let Err(e) = std::fs::write(path, &csv)
    {
        eprintln!("fleet: cannot write {}: {e}", path.display());
    }
    if let Some(png) = &args.plot {
        plot(png, &csv, mean, from / 60.0, to / 60.0);
    }
}

/// Plots both runs with gnuplot (skipped, saying so, when gnuplot is not installed).
fn plot(png: &std::path::Path, csv: &str, mean: f64, from: f64, to: f64) {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => return eprintln!("fleet: no plot: {e}"),
    };
    let data = dir.path().join("fleet.csv");
    if let Err(e) = std::fs::write(&data, csv) {
        return eprintln!("fleet: no plot: {e}");
    }
    let script = format!(
        "set terminal pngcairo size 1200,500\nset output '{}'\nset datafile separator ','\n\
         set key top left\nset xlabel 'minute'\nset ylabel 'requests per minute at the proxy'\n\
         set title 'Fleet load with the default schedule ({} min outage from minute {from:.0})'\n\
         set object 1 rect from {from},graph 0 to {to},graph 1 fc rgb '#eeeeee' behind\n\
         plot '{}' using 1:3 with lines title 'with outage', '{}' using 1:2 with lines title 'undisturbed', \
         {mean} title 'mean' dt 2, {} title '3x mean' dt 3\n",
        png.display(),
        (to - from).round(),
        data.display(),
        data.display(),
        3.0 * mean,
    );
    // A script file, not `-e`: gnuplot 5.4 reads one line of `-e` only.
    let commands = dir.path().join("fleet.gp");
    if let Err(e) = std::fs::write(&commands, script) {
        return eprintln!("fleet: no plot: {e}");
    }
    match std::process::Command::new("gnuplot")
        .arg(&commands)
        .status()
    {
        Ok(s) if s.success() => println!("plot: {}", png.display()),
        Ok(s) => eprintln!("fleet: gnuplot failed ({s})"),
        Err(e) => {
            eprintln!("fleet: no plot (gnuplot not installed: apt-get install gnuplot-nox): {e}")
        }
    }
}
