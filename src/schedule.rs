//! Jitter and backoff arithmetic, shared by the daemon's refresh and health loops and the
//! proxy's fleet sync.
//!
//! Owns: [`Schedule`], pure functions of their inputs (the random draw is passed in), so every
//! bound can be checked exhaustively, and [`Backoff`], the one failure counter the three loops
//! share. It must not sleep or read clocks.

use std::time::Duration;

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

    /// The wait before retrying: full jitter (uniform in [0, ceiling)), but never less than a
    /// `Retry-After` the proxy sent (itself capped at one interval, so a confused proxy cannot
    /// park the terminal past its hourly refresh).
    pub fn retry_delay(&self, failures: u32, retry_after: Option<Duration>, unit: f64) -> Duration {
        let jittered = self.backoff_ceiling(failures).mul_f64(unit);
        match retry_after {
            Some(after) => jittered.max(after.min(self.interval)),
            None => jittered,
        }
    }
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
        self.failures = self.failures.saturating_add(1);
        self.schedule.retry_delay(self.failures, retry_after, unit)
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
}
