//! Jitter and backoff arithmetic, shared by the daemon's refresh and health loops and the
//! proxy's fleet sync.
//!
//! Owns: [`Schedule`], pure functions of their inputs (the random draw is passed in), so every
//! bound can be checked exhaustively, and [`Backoff`], the one failure counter the three loops
//! share. It must not sleep or read clocks: a loop that holds something with an expiry passes
//! its runway (the time left until it expires) in.
//!
//! # Backoff against a runway
//!
//! The doubling (`backoff_min` to `backoff_max`, full jitter) covers a blip. Once it has reached
//! `backoff_max` and [`OUTAGE_FAILURES`] attempts in a row have failed, the failure is an
//! outage, and a loop that holds a valid authinfo waits for a share of its runway instead
//! ([`RUNWAY_SHARE`], at least a second, at most one interval), drawn like the interval (up to
//! `jitter` early, never late). A fleet that failed for an hour
//! then comes back spread over its runways, not within `backoff_max` of the proxy's return
//! (`benches/fleet_sim.rs` measures it). A retry never waits past that share of the runway,
//! so a terminal near expiry retries sooner than `backoff_max`, and it is left with at least
//! `1 - RUNWAY_SHARE` of the runway it had when the proxy came back. Without a runway (nothing
//! held, or expired) the doubling stays capped at `backoff_max`.

use std::time::Duration;

/// The share of the runway a retry may wait in an outage (see [`OUTAGE_FAILURES`]): 0.8,
/// the least that keeps the recovery peak of `benches/fleet_sim.rs` (100 000 terminals, a 1 h
/// outage) under 3× the mean load. A terminal keeps at least a fifth of its runway.
pub const RUNWAY_SHARE: f64 = 0.8;

/// Failures in a row that make an outage rather than a blip (with the doubling at `backoff_max`):
/// seven, where the default doubling (5 s to 5 min) reaches its cap, counted in failures rather
/// than in time so that a short `backoff_max` (the link tests' 4 s) still means seconds-long
/// retries through a short fault.
pub const OUTAGE_FAILURES: u32 = 7;

/// The shortest ceiling a runway makes: a terminal seconds from expiry waits at most this long
/// rather than wait for `backoff_min` and lapse. It is a ceiling, not a floor: the draw under
/// it may be shorter (full jitter, or up to `jitter` early), as under `backoff_min`.
pub const RUNWAY_MIN_CEILING: Duration = Duration::from_secs(1);

/// The timing rules, pure so they can be checked exhaustively.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub interval: Duration,
    pub jitter: f64,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Schedule {
    /// The wait until the next scheduled refresh: up to `jitter` of the interval early, never
    /// late (`unit` in [0, 1)). WeChat Pay asks for an authinfo at least every interval, so the
    /// spread a fleet needs is taken from below: with 1 h and 0.1, refreshes land 54 to 60
    /// minutes apart and the held authinfo never turns stale on schedule.
    pub fn next_interval(&self, unit: f64) -> Duration {
        self.interval.mul_f64(1.0 - self.jitter * unit)
    }

    /// The backoff ceiling after `failures` consecutive failures: `backoff_min` doubling per
    /// failure, capped at `backoff_max`.
    pub fn backoff_ceiling(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(30);
        self.backoff_min
            .saturating_mul(1 << doublings)
            .min(self.backoff_max)
    }

    /// [`RUNWAY_SHARE`] of `runway`, at least [`RUNWAY_MIN_CEILING`] and at most one interval
    /// (or `backoff_max` if longer); `None` without a runway (a zero runway is an expired
    /// authinfo, as urgent as none).
    fn runway_share(&self, runway: Option<Duration>) -> Option<Duration> {
        let runway = runway.filter(|r| !r.is_zero())?;
        Some(
            runway
                .mul_f64(RUNWAY_SHARE)
                .min(self.interval.max(self.backoff_max))
                .max(RUNWAY_MIN_CEILING),
        )
    }

    /// What `failures` and `runway` make of the next wait.
    fn plan(&self, failures: u32, runway: Option<Duration>) -> Plan {
        let doubling = self.backoff_ceiling(failures);
        let share = self.runway_share(runway);
        let outage = share.is_some() && failures >= OUTAGE_FAILURES && doubling >= self.backoff_max;
        let ceiling = match share {
            None => doubling,
            Some(share) if outage => share,
            Some(share) => doubling.min(share),
        };
        Plan {
            ceiling,
            outage,
            share,
        }
    }

    /// The backoff ceiling after `failures` consecutive failures while what the loop holds is
    /// good for `runway` more (`None`: nothing valid held). Until an outage it is the
    /// doubling, never more than [`RUNWAY_SHARE`] of the runway (nor less than
    /// [`RUNWAY_MIN_CEILING`]); in an outage (see [`OUTAGE_FAILURES`]), that share of the
    /// runway, at most one interval (or `backoff_max` if longer). Without a runway it is
    /// [`Self::backoff_ceiling`].
    pub fn runway_ceiling(&self, failures: u32, runway: Option<Duration>) -> Duration {
        self.plan(failures, runway).ceiling
    }

    /// The wait before retrying: full jitter (uniform in [0, ceiling)), but never less than a
    /// `Retry-After` the proxy sent (itself capped at one interval, so a confused proxy cannot
    /// park the terminal past its hourly refresh).
    pub fn retry_delay(&self, failures: u32, retry_after: Option<Duration>, unit: f64) -> Duration {
        self.retry_delay_with_runway(failures, retry_after, None, unit)
    }

    /// [`Self::retry_delay`] for a loop that holds something good for `runway` more: the
    /// ceiling is [`Self::runway_ceiling`]. Until an outage (or while nothing is held) the wait
    /// is full jitter under it; once it waits for a share of the runway, it is drawn like
    /// the interval, up to `jitter` early and never late, so that a fleet failing through a
    /// long outage comes back spread evenly over its ceilings (under full jitter, twice as many
    /// come back in the first minute as in an even spread). `Retry-After` is a floor as in
    /// `retry_delay`, but never past [`RUNWAY_SHARE`] of a runway: a proxy's limit (429, up to
    /// `authinfo_every`) or a 503 must not make a terminal wait out the authinfo it holds.
    pub fn retry_delay_with_runway(
        &self,
        failures: u32,
        retry_after: Option<Duration>,
        runway: Option<Duration>,
        unit: f64,
    ) -> Duration {
        let plan = self.plan(failures, runway);
        let jittered = if plan.outage {
            plan.ceiling.mul_f64(1.0 - self.jitter * unit)
        } else {
            plan.ceiling.mul_f64(unit)
        };
        let most = plan
            .share
            .map_or(self.interval, |share| share.min(self.interval));
        match retry_after {
            Some(after) => jittered.max(after.min(most)),
            None => jittered,
        }
    }
}

/// The next wait's ceiling; whether it is an outage's wait for the runway's share (the doubling
/// at `backoff_max` after at least [`OUTAGE_FAILURES`], while something valid is held); and that
/// share, when there is a runway.
#[derive(Debug, Clone, Copy)]
struct Plan {
    ceiling: Duration,
    outage: bool,
    share: Option<Duration>,
}

/// A loop's consecutive failures and what they make it wait: the one backoff the refresh loop,
/// the health checks and the fleet sync share.
#[derive(Debug, Clone)]
pub struct Backoff {
    pub schedule: Schedule,
    failures: u32,
}

impl Backoff {
    pub fn new(schedule: Schedule) -> Self {
        Self {
            schedule,
            failures: 0,
        }
    }

    /// Consecutive failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// After a success (or an answer retrying cannot change): clears the failures and returns
    /// the wait until the next scheduled run.
    pub fn succeeded(&mut self, unit: f64) -> Duration {
        self.failures = 0;
        self.schedule.next_interval(unit)
    }

    /// After a failure: counts it and returns the wait before the retry.
    pub fn failed(&mut self, retry_after: Option<Duration>, unit: f64) -> Duration {
        self.failed_with_runway(retry_after, None, unit)
    }

    /// After a failure of a loop that holds something good for `runway` more (the refresh
    /// loop: the held authinfo's time to expiry): counts it and returns the wait before the
    /// retry ([`Schedule::retry_delay_with_runway`]).
    pub fn failed_with_runway(
        &mut self,
        retry_after: Option<Duration>,
        runway: Option<Duration>,
        unit: f64,
    ) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.schedule
            .retry_delay_with_runway(self.failures, retry_after, runway, unit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule() -> Schedule {
        Schedule {
            interval: Duration::from_secs(3600),
            jitter: 0.1,
            backoff_min: Duration::from_secs(5),
            backoff_max: Duration::from_secs(300),
        }
    }

    #[test]
    fn interval_jitter_is_up_to_ten_percent_early_and_never_late() {
        let s = schedule();
        assert_eq!(s.next_interval(0.0), Duration::from_secs(3600));
        assert_eq!(s.next_interval(0.5), Duration::from_secs(3420));
        assert!(s.next_interval(0.999_999) > Duration::from_secs(3240));
        for i in 0..1000 {
            let d = s.next_interval(f64::from(i) / 1000.0);
            assert!(
                d > Duration::from_secs(3240) && d <= Duration::from_secs(3600),
                "{d:?}"
            );
        }
    }

    #[test]
    fn backoff_doubles_from_min_to_max_with_full_jitter() {
        let s = schedule();
        let ceilings: Vec<u64> = (1..=9).map(|f| s.backoff_ceiling(f).as_secs()).collect();
        assert_eq!(ceilings, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(s.backoff_ceiling(u32::MAX).as_secs(), 300);
        assert_eq!(s.retry_delay(3, None, 0.0), Duration::ZERO);
        assert_eq!(s.retry_delay(3, None, 0.5), Duration::from_secs(10));
        assert!(s.retry_delay(3, None, 0.999) < Duration::from_secs(20));
    }

    #[test]
    fn retry_after_is_a_floor_capped_at_the_interval() {
        let s = schedule();
        assert_eq!(
            s.retry_delay(1, Some(Duration::from_secs(120)), 0.5),
            Duration::from_secs(120)
        );
        assert_eq!(
            s.retry_delay(9, Some(Duration::from_secs(1)), 0.5),
            Duration::from_secs(150)
        );
        assert_eq!(
            s.retry_delay(1, Some(Duration::from_secs(86400)), 0.0),
            Duration::from_secs(3600)
        );
    }

    const MINUTE: Duration = Duration::from_secs(60);

    /// Runways from nothing to two validities, every 7 s.
    fn runways() -> impl Iterator<Item = Duration> {
        (0..=2 * 7200 / 7).map(|i| Duration::from_secs(i * 7))
    }

    #[test]
    fn without_a_runway_or_once_expired_the_ceiling_is_the_doubling_capped_at_backoff_max() {
        let s = schedule();
        for failures in 0..=40 {
            let doubling = s.backoff_ceiling(failures);
            assert_eq!(s.runway_ceiling(failures, None), doubling);
            assert_eq!(s.runway_ceiling(failures, Some(Duration::ZERO)), doubling);
            // And the draw is full jitter, as before.
            assert_eq!(
                s.retry_delay_with_runway(failures, None, None, 0.5),
                s.retry_delay(failures, None, 0.5)
            );
        }
        assert_eq!(s.runway_ceiling(u32::MAX, None), s.backoff_max);
    }

    #[test]
    fn after_the_doubling_a_fresh_authinfo_waits_for_a_share_of_its_runway() {
        let s = schedule();
        let hour = Some(Duration::from_secs(3600));
        let ceilings: Vec<u64> = (1..=8)
            .map(|f| s.runway_ceiling(f, hour).as_secs())
            .collect();
        assert_eq!(
            ceilings,
            [5, 10, 20, 40, 80, 160, 2880, 2880],
            "0.8 of an hour"
        );
        // Drawn like the interval: up to `jitter` early, never late.
        assert_eq!(
            s.retry_delay_with_runway(7, None, hour, 0.0),
            Duration::from_secs(2880)
        );
        let early = s.retry_delay_with_runway(7, None, hour, 0.999_999);
        assert!(early > Duration::from_secs(2591) && early < Duration::from_secs(2593));
        // Never more than one interval, however long the runway.
        assert_eq!(
            s.runway_ceiling(9, Some(Duration::from_secs(86400))),
            s.interval
        );
        // Retry-After is still a floor, capped at the interval and at the runway's share.
        let day = Some(Duration::from_secs(86400));
        assert_eq!(s.retry_delay_with_runway(9, day, day, 0.0), s.interval);
        assert_eq!(
            s.retry_delay_with_runway(9, day, hour, 0.999_999),
            Duration::from_secs(2880),
            "the floor beats the early draw, up to the share"
        );
        assert_eq!(
            s.retry_delay_with_runway(9, Some(Duration::from_secs(1)), hour, 0.0),
            Duration::from_secs(2880)
        );
    }

    /// With the link tests' 1 s to 4 s the doubling is at its cap from the 3rd failure, but a
    /// fault of a few seconds is not an outage: the runway share waits for the 7th.
    #[test]
    fn a_short_backoff_max_waits_for_seven_failures_before_the_runway_share() {
        let s = Schedule {
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(4),
            ..schedule()
        };
        let hour = Some(Duration::from_secs(3600));
        let ceilings: Vec<u64> = (1..=8)
            .map(|f| s.runway_ceiling(f, hour).as_secs())
            .collect();
        assert_eq!(ceilings, [1, 2, 4, 4, 4, 4, 2880, 2880]);
        assert_eq!(OUTAGE_FAILURES, 7);
        assert_eq!(
            s.retry_delay_with_runway(6, None, hour, 0.5),
            Duration::from_secs(2),
            "full jitter before"
        );
    }

    /// Below `backoff_max / RUNWAY_SHARE` of runway (6 min 15 s) a terminal retries at least as
    /// often as with no authinfo, and sooner than its authinfo expires.
    #[test]
    fn a_terminal_near_expiry_keeps_a_ceiling_of_at_most_backoff_max() {
        let s = schedule();
        let threshold = s.backoff_max.div_f64(RUNWAY_SHARE);
        assert_eq!(threshold, Duration::from_secs(375));
        for runway in runways().filter(|r| *r <= threshold) {
            for failures in 1..=40 {
                let ceiling = s.runway_ceiling(failures, Some(runway));
                assert!(
                    ceiling <= s.backoff_max,
                    "{runway:?} {failures}: {ceiling:?}"
                );
                assert!(ceiling <= s.backoff_ceiling(failures));
                if runway > RUNWAY_MIN_CEILING {
                    assert!(ceiling < runway, "{runway:?} {failures}: {ceiling:?}");
                }
            }
        }
        assert_eq!(
            s.runway_ceiling(20, Some(Duration::from_secs(120))),
            Duration::from_secs(96)
        );
        assert_eq!(
            s.runway_ceiling(20, Some(Duration::from_secs(5))),
            Duration::from_secs(4),
            "sooner than backoff_min rather than lapse"
        );
        assert_eq!(
            s.runway_ceiling(20, Some(Duration::from_millis(300))),
            RUNWAY_MIN_CEILING,
            "never a storm"
        );
    }

    /// Whatever the failures and the draw, a retry waits at most `RUNWAY_SHARE` of the runway
    /// (or `RUNWAY_MIN_CEILING`), so at least a fifth of the runway is left when it is made.
    #[test]
    fn a_retry_never_waits_past_the_runway_share() {
        let s = schedule();
        for runway in runways().filter(|r| !r.is_zero()) {
            let share = runway.mul_f64(RUNWAY_SHARE).max(RUNWAY_MIN_CEILING);
            for failures in 1..=40 {
                assert!(s.runway_ceiling(failures, Some(runway)) <= share);
                for unit in [0.0, 0.25, 0.5, 0.999_999] {
                    let wait = s.retry_delay_with_runway(failures, None, Some(runway), unit);
                    assert!(wait <= share, "{runway:?} {failures} {unit}: {wait:?}");
                }
            }
        }
    }

    /// Monotone in both, over runways that hold something (an expired authinfo, a zero
    /// runway, goes back to the doubling capped at `backoff_max`, like none).
    #[test]
    fn the_ceiling_grows_with_the_failures_and_the_runway() {
        let s = schedule();
        for runway in runways() {
            let ceilings: Vec<Duration> = (0..=40)
                .map(|f| s.runway_ceiling(f, Some(runway)))
                .collect();
            assert!(ceilings.windows(2).all(|w| w[0] <= w[1]), "{runway:?}");
        }
        for failures in [1, 3, 6, 7, 12, u32::MAX] {
            let ceilings: Vec<Duration> = runways()
                .filter(|r| !r.is_zero())
                .map(|r| s.runway_ceiling(failures, Some(r)))
                .collect();
            assert!(ceilings.windows(2).all(|w| w[0] <= w[1]), "{failures}");
        }
        assert!(s.runway_ceiling(7, Some(30 * MINUTE)) > s.backoff_max);
    }

    /// A `Retry-After` is a floor, but not past the runway share: a terminal with 30 s left is
    /// not parked for the proxy's 120 s; with an hour left the 120 s hold.
    #[test]
    fn retry_after_never_parks_a_terminal_past_its_runway_share() {
        let s = schedule();
        let after = Some(Duration::from_secs(120));
        for failures in [1, 3, 7, 20] {
            assert_eq!(
                s.retry_delay_with_runway(failures, after, Some(Duration::from_secs(30)), 0.0),
                Duration::from_secs(24),
                "{failures}"
            );
            assert!(
                s.retry_delay_with_runway(failures, after, Some(Duration::from_secs(3600)), 0.0)
                    >= Duration::from_secs(120),
                "{failures}"
            );
            // Without a runway, as before: the floor capped at one interval.
            assert_eq!(
                s.retry_delay_with_runway(failures, after, None, 0.0),
                Duration::from_secs(120)
            );
        }
        for runway in runways().filter(|r| !r.is_zero()) {
            let share = runway.mul_f64(RUNWAY_SHARE).max(RUNWAY_MIN_CEILING);
            for failures in [1, 7, 40] {
                for after in [1, 45, 120, 86_400] {
                    let wait = s.retry_delay_with_runway(
                        failures,
                        Some(Duration::from_secs(after)),
                        Some(runway),
                        0.5,
                    );
                    assert!(wait <= share, "{runway:?} {failures} {after}: {wait:?}");
                }
            }
        }
    }

    #[test]
    fn backoff_counts_failures_until_a_success() {
        let mut b = Backoff::new(schedule());
        let waits: Vec<u64> = (0..3)
            .map(|_| b.failed(None, 0.999_999).as_secs())
            .collect();
        assert_eq!(waits, [4, 9, 19], "full jitter under 5, 10, 20 s");
        assert_eq!(b.failures(), 3);
        assert_eq!(b.succeeded(0.0), Duration::from_secs(3600));
        assert_eq!(b.failures(), 0);
        assert_eq!(
            b.failed(None, 0.999_999).as_secs(),
            4,
            "back to the first ceiling"
        );
    }

    #[test]
    fn backoff_with_a_runway_counts_the_same_failures() {
        let mut b = Backoff::new(schedule());
        let hour = Some(Duration::from_secs(3600));
        let waits: Vec<u64> = (0..7)
            .map(|_| b.failed_with_runway(None, hour, 0.0).as_secs())
            .collect();
        assert_eq!(
            waits,
            [0, 0, 0, 0, 0, 0, 2880],
            "full jitter, then the share"
        );
        assert_eq!(b.failures(), 7);
        b.succeeded(0.0);
        assert_eq!(b.failed_with_runway(None, hour, 0.999_999).as_secs(), 4);
    }
}
