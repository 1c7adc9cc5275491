//! The refresh loop: keeps a fresh authinfo, on the monotonic clock.
//!
//! Owns: the schedule (every interval, up to `jitter` early; at once when the held authinfo is
//! older than the interval, at start and after a suspend or clock jump), exponential backoff
//! with full jitter on failure (honouring `Retry-After`), stretched to a share of the held
//! authinfo's runway in an outage ([`crate::schedule`]), the hold on permanent
//! errors, and the "never worse" rule: only a good answer reaches the store, and it is flushed
//! before it is served. It must not serve anything itself; the socket reads what
//! [`State::publish`] made current.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::proxy_client::{Disposition, Upstream, UpstreamError};
use super::state::{AttemptReport, Freshness, Heartbeats, State, Waiting};
use super::store::{AttemptRecord, HeldAuthinfo, RawData};
use crate::schedule::{Backoff, Schedule};
use crate::wire::MAX_RAW_DATA;

/// The loop wakes at least this often, to report in to the watchdog and to notice a suspend.
pub const TICK: Duration = Duration::from_secs(10);
/// A wall-clock advance this much beyond the monotonic one means the machine slept (or the
/// clock was set forward): the held authinfo's age is checked again.
const JUMP_THRESHOLD: Duration = Duration::from_secs(30);

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A new authinfo is stored and served.
    Fetched,
    /// Failed; retry after backing off (and not before `after`).
    Retry { after: Option<Duration> },
    /// Failed in a way retrying cannot fix; wait for new raw_data or the next interval.
    Permanent,
    /// No raw_data to send.
    NoRawData,
}

/// The refresh loop and its single attempt.
pub struct Refresher {
    state: Arc<State>,
    upstream: Arc<dyn Upstream>,
    schedule: Schedule,
    /// Source of uniform randoms in [0, 1) for jitter (the OS generator in production).
    random: fn() -> f64,
}

impl Refresher {
    pub fn new(state: Arc<State>, upstream: Arc<dyn Upstream>) -> Self {
        let schedule = state.config.refresh.schedule();
        Self {
            state,
            upstream,
            schedule,
            random: crate::crypto::random_unit,
        }
    }

    /// Replaces the random source (tests pin the jitter).
    pub fn with_random(mut self, random: fn() -> f64) -> Self {
        self.random = random;
        self
    }

    /// When the first refresh is due: at once when nothing is held, or the held authinfo is
    /// older than the interval or of unknown age (the clock was set back past its fetch);
    /// otherwise when it turns one interval old.
    fn initial_due(&self, now: Instant) -> Option<Instant> {
        match self.state.current() {
            None if self.can_get_raw_data() => Some(now),
            None => None,
            Some(served) => match served.age(self.state.time()).seconds {
                Some(age) => Some(
                    now + self
                        .schedule
                        .interval
                        .saturating_sub(Duration::from_secs(age)),
                ),
                None => Some(now),
            },
        }
    }

    /// The held authinfo's runway (the time until it expires; zero once it has), which a
    /// retry in an outage waits a share of ([`Schedule::retry_delay_with_runway`]); `None`
    /// when nothing is held, or when its age is unknown (the wall clock behind its fetch and
    /// the proxy's clock not known): a runway that may be shorter than it looks must not
    /// stretch a retry, so such a terminal retries as one holding nothing.
    fn runway(&self) -> Option<Duration> {
        let now = self.state.time();
        let served = self.state.current()?;
        served.age(now).seconds?;
        Some(Duration::from_secs(served.runway(now)))
    }

    fn can_get_raw_data(&self) -> bool {
        self.state.config.refresh.raw_data_command.is_some()
            || self.state.store.raw_data().is_some()
    }

    /// Runs until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(self.schedule);
        let mut next = self.initial_due(Instant::now());
        if next.is_none() {
            self.state.refresh_status().waiting_for = Some(Waiting::RawData);
            tracing::info!(
                "no authinfo and no raw_data yet; waiting for the face app to PUT /v1/raw-data"
            );
        }
        let mut last_tick = (Instant::now(), self.state.now());
        loop {
            let now = Instant::now();
            Heartbeats::beat(&self.state.heartbeats.refresh, now, self.state.started);
            let wall = self.state.now();
            self.state.refresh_status().next_attempt_at = next.map(|n| wall_at(wall, now, n));
            // A forced refresh asked for but held by the limit wakes the loop when it may start.
            let asked = self.state.requested_refresh_at(now);
            let wake = [next, asked]
                .into_iter()
                .flatten()
                .fold(now + TICK, Instant::min);
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.state.refresh_requested() => {}
                () = tokio::time::sleep_until(wake) => {}
            }
            let (mono, wall) = (Instant::now(), self.state.now());
            let jump = wall
                .saturating_sub(last_tick.1)
                .saturating_sub(secs(mono.duration_since(last_tick.0)));
            last_tick = (mono, wall);
            if jump.saturating_abs() > secs(JUMP_THRESHOLD) {
                // Ahead: a suspend or the clock set forward, the held authinfo may have aged.
                // Back: the clock was set back, its age may now be unknown. Either way a held
                // authinfo that is not fresh any more is refreshed at once.
                let fresh = self.state.current().is_some_and(|s| {
                    s.freshness(self.state.time(), self.schedule.interval) == Freshness::Fresh
                });
                tracing::info!(
                    message_id = crate::events::CLOCK_JUMP,
                    jump_seconds = jump,
                    fresh,
                    "the wall clock jumped against the monotonic clock (suspend, or the clock was set)"
                );
                if !fresh && next.is_some() {
                    next = Some(mono);
                }
            }
            let asked = self
                .state
                .requested_refresh_at(mono)
                .is_some_and(|at| at <= mono);
            let due = asked || next.is_some_and(|n| n <= mono);
            if !due {
                continue;
            }
            // Cancelling mid-attempt is safe: the only await points are before anything is
            // stored, and the waiters are answered here.
            self.state.begin_refresh();
            let (outcome, mut report) = tokio::select! {
                attempt = self.attempt() => attempt,
                () = shutdown.cancelled() => {
                    self.state.abandon_refresh();
                    break;
                }
            };
            let now = Instant::now();
            let unit = (self.random)();
            next = match outcome {
                Outcome::Fetched | Outcome::Permanent => Some(now + backoff.succeeded(unit)),
                Outcome::Retry { after } => {
                    let runway = self.runway();
                    let delay = backoff.failed_with_runway(after, runway, unit);
                    tracing::info!(
                        attempt = backoff.failures(),
                        backoff_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                        runway_seconds = runway.map(|r| r.as_secs()),
                        "next refresh attempt scheduled"
                    );
                    Some(now + delay)
                }
                Outcome::NoRawData if self.state.config.refresh.raw_data_command.is_some() => {
                    Some(now + backoff.failed_with_runway(None, self.runway(), unit))
                }
                Outcome::NoRawData => None,
            };
            report.consecutive_failures = backoff.failures();
            let wall = self.state.now();
            report.next_attempt_at = next.map(|n| wall_at(wall, now, n));
            self.state.finish_refresh(report);
        }
        tracing::info!("refresh loop stopped");
    }

    /// One refresh, start to finish, outside the loop (tests): its waiters are answered.
    pub async fn refresh_once(&self) -> Outcome {
        self.state.begin_refresh();
        let (outcome, report) = self.attempt().await;
        self.state.finish_refresh(report);
        outcome
    }

    /// One attempt and its report (the loop fills in the schedule).
    async fn attempt(&self) -> (Outcome, AttemptReport) {
        let (outcome, record, reached) = self.fetch().await;
        let waiting_for = match outcome {
            Outcome::NoRawData => Some(Waiting::RawData),
            Outcome::Permanent => Some(Waiting::PermanentError),
            _ => None,
        };
        let retry_after = match outcome {
            Outcome::Retry { after } => after,
            _ => None,
        };
        let report = AttemptReport {
            record,
            proxy_reachable: reached,
            waiting_for,
            consecutive_failures: 0,
            next_attempt_at: None,
            retry_after,
        };
        (outcome, report)
    }

    /// Fetches, and on a good answer stores and serves it: the outcome, its record and whether
    /// the proxy was reached (`None` when no call was made).
    async fn fetch(&self) -> (Outcome, AttemptRecord, Option<bool>) {
        let Some(raw) = self.raw_data().await else {
            self.state.metrics.count_refresh("no_raw_data");
            return (
                Outcome::NoRawData,
                AttemptRecord {
                    at: self.state.now(),
                    ok: false,
                    code: Some("NO_RAW_DATA".into()),
                    error: Some("no raw_data yet: the face app must PUT /v1/raw-data".into()),
                    permanent: false,
                },
                None,
            );
        };
        let result = self.upstream.fetch_authinfo(&raw.value).await;
        let reached = match &result {
            Ok(_) => true,
            Err(e) => e.reached_proxy(),
        };
        // The answer's `Date` has just been read: the proxy's clock is as fresh as it gets.
        let time = self.state.time();
        let now = time.local;
        let range = &self.state.config.refresh.expires_in_range;
        let failure = match result
            .map(|answer| crate::wire::check_expires_in(answer.expires_in, range).map(|()| answer))
        {
            Ok(Err(reason)) => UpstreamError::Malformed { reason },
            Ok(Ok(answer)) => {
                let validity = answer
                    .expires_in
                    .unwrap_or(self.state.config.refresh.assumed_validity.as_secs());
                let held = HeldAuthinfo {
                    authinfo: answer.authinfo,
                    fetched_at: now,
                    expires_at: now.saturating_add(i64::try_from(validity).unwrap_or(i64::MAX)),
                    expires_in: answer.expires_in,
                    proxy_fetched_at: time.proxy,
                };
                if let Err(error) = self.state.store.save_authinfo(&held) {
                    // Serving the new authinfo from memory is still better for the face app
                    // than keeping the old one; it just will not survive a restart.
                    tracing::error!(message_id = crate::events::PERSIST_FAILED,
                        error = %crate::error_chain(&error),
                        "cannot persist the new authinfo; serving it from memory only"
                    );
                }
                let served = self.state.publish(held);
                self.state.metrics.count_refresh("ok");
                tracing::info!(message_id = crate::events::REFRESH_OK,
                    authinfo_fingerprint = %served.fingerprint,
                    expires_at = %crate::units::rfc3339(served.held.expires_at),
                    expires_in = ?served.held.expires_in,
                    "new authinfo fetched, stored and served"
                );
                return (
                    Outcome::Fetched,
                    AttemptRecord {
                        at: now,
                        ok: true,
                        code: None,
                        error: None,
                        permanent: false,
                    },
                    Some(true),
                );
            }
            Err(e) => e,
        };
        let disposition = failure.disposition();
        let permanent = disposition == Disposition::Permanent;
        let error = crate::error_chain(&failure);
        let held = self.state.current().map(|s| s.fingerprint.clone());
        let upstream_status = match &failure {
            UpstreamError::Refused { body, .. } => body.upstream.as_ref().map(|u| u.status),
            _ => None,
        };
        if permanent {
            self.state.metrics.count_refresh("permanent_error");
            tracing::error!(message_id = crate::events::REFRESH_REFUSED,
                code = %failure.code(),
                %error,
                upstream_status,
                held_authinfo_fingerprint = held.as_deref(),
                "refresh refused permanently; keeping the held authinfo and not retrying until raw_data changes or the next interval"
            );
        } else {
            self.state.metrics.count_refresh("retryable_error");
            tracing::warn!(message_id = crate::events::REFRESH_FAILED,
                code = %failure.code(),
                %error,
                upstream_status,
                held_authinfo_fingerprint = held.as_deref(),
                "refresh failed; keeping the held authinfo"
            );
        }
        let outcome = match disposition {
            Disposition::Permanent => Outcome::Permanent,
            Disposition::Retry { after } => Outcome::Retry { after },
        };
        (
            outcome,
            AttemptRecord {
                at: now,
                ok: false,
                code: Some(failure.code()),
                error: Some(error),
                permanent,
            },
            Some(reached),
        )
    }

    /// The raw_data to send: from `raw_data_command` when configured (stored when it
    /// changed), else, or when the command fails, the newest stored.
    async fn raw_data(&self) -> Option<RawData> {
        if let Some(command) = &self.state.config.refresh.raw_data_command {
            match run_raw_data_command(command, self.state.config.refresh.raw_data_command_timeout)
                .await
            {
                Ok(value) => {
                    let stored = self.state.store.raw_data();
                    if stored.as_ref().is_some_and(|s| s.value == value) {
                        return stored;
                    }
                    let raw = RawData {
                        value,
                        received_at: self.state.now(),
                        source: "command".into(),
                    };
                    if let Err(error) = self.state.save_raw_data(raw.clone()) {
                        tracing::error!(error = %crate::error_chain(&error), "cannot store raw_data");
                    }
                    return Some(raw);
                }
                Err(error) => {
                    tracing::warn!(%error, "raw_data_command failed; using the stored raw_data if any");
                }
            }
        }
        self.state.store.raw_data()
    }
}

/// Whole seconds of `d`, as the signed seconds wall-clock arithmetic uses (saturating).
fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// The wall-clock estimate (Unix seconds) of the monotonic instant `at`, seen from `now` at the
/// wall-clock time `wall`.
fn wall_at(wall: i64, now: Instant, at: Instant) -> i64 {
    wall.saturating_add(secs(at.saturating_duration_since(now)))
}

/// Runs the configured program and returns its trimmed standard output.
async fn run_raw_data_command(command: &[String], timeout: Duration) -> Result<String, String> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| "raw_data_command is empty".to_owned())?;
    let child = tokio::process::Command::new(program)
        .args(args)
        .env_remove("NOTIFY_SOCKET")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    let output = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| {
            format!(
                "{program} did not finish within {}",
                crate::units::format_duration(timeout)
            )
        })?
        .map_err(|e| format!("{program}: {e}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(format!(
            "{program} exited with {}: {}",
            output.status,
            stderr.trim().chars().take(200).collect::<String>()
        ));
    }
    let value = String::from_utf8(output.stdout)
        .map_err(|_| format!("{program} printed something that is not UTF-8"))?
        .trim()
        .to_owned();
    if value.is_empty() {
        return Err(format!("{program} printed nothing"));
    }
    if value.len() > MAX_RAW_DATA {
        return Err(format!("{program} printed more than {MAX_RAW_DATA} bytes"));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::terminal::proxy_client::fake::{FakeUpstream, Running, Step};
    use crate::terminal::state::lock;
    use crate::units::unix_now;

    // === the loop, on tokio's paused clock, against a scripted upstream ===

    fn state_with_raw_data(dir: &std::path::Path) -> Arc<State> {
        let config = crate::terminal::config::test_config(dir);
        crate::terminal::state::test_state_with(config, |store| {
            store
                .save_raw_data(&RawData {
                    value: "RAW".into(),
                    received_at: 0,
                    source: "socket".into(),
                })
                .expect("raw");
        })
    }

    /// An authinfo "OLD" fetched `age` seconds ago, valid for `runway` more seconds.
    fn old_authinfo(age: i64, runway: i64) -> HeldAuthinfo {
        HeldAuthinfo {
            authinfo: "OLD".into(),
            fetched_at: unix_now() - age,
            expires_at: unix_now() + runway,
            expires_in: None,
            proxy_fetched_at: None,
        }
    }

    /// The refresher of `state` running against `upstream`.
    fn refreshing(state: &Arc<State>, upstream: &Arc<FakeUpstream>) -> Running {
        let refresher = Refresher::new(state.clone(), upstream.clone());
        Running::start(|stop| refresher.run(stop))
    }

    fn max_random() -> f64 {
        0.999_999
    }

    /// With the worst-case jitter, each retry waits at most the doubling ceiling and a 429's
    /// Retry-After is never undercut; after success the next refresh is at most one interval
    /// (and at least 0.9 of it) later; failures never replace the served authinfo.
    #[tokio::test(start_paused = true)]
    async fn backoff_and_retry_after_bounds_hold_on_the_paused_clock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = state_with_raw_data(dir.path());
        let upstream = FakeUpstream::authinfo([
            Step::Ok("FIRST"),
            Step::Fail(500, None),
            Step::Fail(500, None),
            Step::Fail(500, None),
            Step::Fail(429, Some(100)),
            Step::Ok("SECOND"),
        ]);
        let refresher = Refresher::new(state.clone(), upstream.clone()).with_random(max_random);
        let running = Running::start(|stop| refresher.run(stop));
        let start = Instant::now();
        // Let the schedule play out: 1 h interval (+10 %) then the backoffs.
        tokio::time::sleep(Duration::from_secs(3 * 3600)).await;
        running.stop().await;

        let calls: Vec<Duration> = lock(&upstream.calls)
            .iter()
            .map(|t| t.duration_since(start))
            .collect();
        // Six scripted answers, then a seventh call one interval after the second success.
        assert_eq!(calls.len(), 7, "{calls:?}");
        assert!(
            calls[0] < Duration::from_secs(1),
            "first refresh at once: {calls:?}"
        );
        let gaps: Vec<Duration> = calls.windows(2).map(|w| w[1] - w[0]).collect();
        // After success: the interval minus jitter, between 0.9 h and 1 h.
        assert!(
            gaps[0] > Duration::from_secs(3239) && gaps[0] <= Duration::from_secs(3600),
            "{gaps:?}"
        );
        // Failures 1, 2, 3: full jitter under ceilings 5 s, 10 s, 20 s.
        for (gap, ceiling) in gaps[1..4].iter().zip([5, 10, 20]) {
            assert!(
                *gap <= Duration::from_secs(ceiling),
                "{gap:?} > {ceiling}s in {gaps:?}"
            );
            assert!(
                *gap >= Duration::from_secs(ceiling).mul_f64(0.99),
                "max jitter gives the ceiling: {gaps:?}"
            );
        }
        // The 429 said Retry-After: 100, above the 40 s ceiling.
        assert!(
            gaps[4] >= Duration::from_secs(100) && gaps[4] < Duration::from_secs(101),
            "{gaps:?}"
        );
        assert!(
            gaps[5] > Duration::from_secs(3239) && gaps[5] <= Duration::from_secs(3600),
            "{gaps:?}"
        );
        assert_eq!(state.current().expect("held").held.authinfo, "SECOND");
        assert_eq!(state.metrics.refreshes("retryable_error"), 4);
    }

    /// The calls `upstream` saw, as times since `start`, and the gaps between them.
    fn call_gaps(upstream: &FakeUpstream, start: Instant) -> (Vec<Duration>, Vec<Duration>) {
        let calls: Vec<Duration> = lock(&upstream.calls)
            .iter()
            .map(|t| t.duration_since(start))
            .collect();
        let gaps = calls.windows(2).map(|w| w[1] - w[0]).collect();
        (calls, gaps)
    }

    /// The refresher of `state` (the worst-case draw) through an hour of the paused clock in
    /// which every call fails: the calls' times since the start, and the gaps between them.
    async fn through_an_hour_of_outage(state: &Arc<State>) -> (Vec<Duration>, Vec<Duration>) {
        let upstream = FakeUpstream::authinfo((0..100).map(|_| Step::Fail(500, None)));
        let refresher = Refresher::new(state.clone(), upstream.clone()).with_random(max_random);
        let running = Running::start(|stop| refresher.run(stop));
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs(3600)).await;
        running.stop().await;
        call_gaps(&upstream, start)
    }

    /// In an outage (every call fails) a terminal whose authinfo has an hour left backs off past
    /// `backoff_max` once the doubling has reached it (the 7th failure), to a share of that hour,
    /// while one whose authinfo has 4 minutes left keeps retrying within them. (The paused clock
    /// does not move the wall clock, so each runway stays what it was at start.)
    #[tokio::test(start_paused = true)]
    async fn in_an_outage_a_fresh_authinfo_backs_off_longer_and_one_near_expiry_does_not() {
        let backoff_max = crate::terminal::config::DEFAULT_BACKOFF_MAX;
        for (runway, shortest_last_gap, longest_gap) in [
            // 0.8 of an hour, up to 10 % early.
            (3600, 2591, 2880),
            // 0.8 of 240 s: within the runway and within backoff_max.
            (240, 172, 192),
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            let state = state_with_raw_data(dir.path());
            // Older than the interval: refreshed at once.
            state.publish(old_authinfo(7200 - runway, runway));
            let (calls, gaps) = through_an_hour_of_outage(&state).await;
            assert!(calls[0] < Duration::from_secs(1), "{calls:?}");
            // The doubling first, as without a runway: 5 s to 160 s.
            for (gap, ceiling) in gaps[..6].iter().zip([5, 10, 20, 40, 80, 160]) {
                let ceiling = Duration::from_secs(ceiling);
                assert!(*gap >= ceiling.mul_f64(0.99) && *gap <= ceiling, "{gaps:?}");
            }
            // Then the share of the runway.
            let shortest = Duration::from_secs(shortest_last_gap);
            let longest = Duration::from_secs(longest_gap);
            assert!(
                gaps[6..].iter().all(|g| *g >= shortest && *g <= longest),
                "runway {runway}: {gaps:?}"
            );
            if runway > 3000 {
                assert!(gaps[6] > backoff_max, "{gaps:?}");
                assert_eq!(calls.len(), 8, "one long wait fits after the doubling");
            } else {
                assert!(gaps.iter().all(|g| *g <= backoff_max), "{gaps:?}");
                assert!(calls.len() > 20, "{}", calls.len());
            }
            assert_eq!(state.current().expect("held").held.authinfo, "OLD");
        }
    }

    /// With the wall clock moving with the paused one, the runway shrinks as the outage goes
    /// on: every wait is at most 0.8 of the runway left when it starts, the retries come ever
    /// closer before expiry (the last within 2 s of it), and once expired the terminal retries
    /// at the doubling capped at `backoff_max`.
    #[tokio::test(start_paused = true)]
    async fn in_an_outage_the_waits_shrink_with_the_runway_until_expiry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = state_with_raw_data(dir.path());
        let runway = 240;
        state.publish(old_authinfo(7200 - runway, runway));
        let expires_at = state.current().expect("held").held.expires_at;
        let upstream = FakeUpstream::authinfo((0..200).map(|_| Step::Fail(500, None)));
        let refresher = Refresher::new(state.clone(), upstream.clone()).with_random(max_random);
        let running = Running::start(|stop| refresher.run(stop));
        let start = Instant::now();
        let wall_start = state.now();
        // The wall clock follows the paused clock, a second at a time (no jump is seen).
        for _ in 0..1200 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            state.wall_clock().shift(1);
        }
        running.stop().await;
        let (calls, gaps) = call_gaps(&upstream, start);
        // Unix seconds of each call on the moved wall clock.
        let at: Vec<i64> = calls
            .iter()
            .map(|c| wall_start + i64::try_from(c.as_secs()).expect("secs"))
            .collect();
        let before: Vec<usize> = (0..at.len()).filter(|&i| at[i] < expires_at).collect();
        assert!(before.len() >= 9, "{calls:?}");
        for &i in &before[..before.len() - 1] {
            let left = Duration::from_secs(u64::try_from(expires_at - at[i]).expect("left"));
            let most = left.mul_f64(crate::schedule::RUNWAY_SHARE) + Duration::from_secs(1);
            assert!(
                gaps[i] <= most,
                "call {i} with {left:?} left waited {:?}",
                gaps[i]
            );
        }
        let last = *before.last().expect("a call before expiry");
        assert!(expires_at - at[last] <= 2, "{at:?} {expires_at}");
        let backoff_max = crate::terminal::config::DEFAULT_BACKOFF_MAX;
        for gap in &gaps[last + 1..] {
            assert!(*gap <= backoff_max + Duration::from_secs(1), "{gaps:?}");
        }
        assert!(
            calls.len() > before.len() + 2,
            "it goes on after expiry: {calls:?}"
        );
    }

    /// An authinfo whose age is unknown (fetched in the wall clock's future: the clock was set
    /// back, and the proxy's clock is not known) has no runway to trust: in an outage the
    /// terminal retries at the doubling capped at `backoff_max`, not for 48 min.
    #[tokio::test(start_paused = true)]
    async fn in_an_outage_an_authinfo_of_unknown_age_gives_no_runway_to_wait_for() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = state_with_raw_data(dir.path());
        state.publish(HeldAuthinfo {
            authinfo: "OLD".into(),
            fetched_at: unix_now() + 3600,
            expires_at: unix_now() + 3600 + 7200,
            expires_in: None,
            proxy_fetched_at: None,
        });
        let (calls, gaps) = through_an_hour_of_outage(&state).await;
        let backoff_max = crate::terminal::config::DEFAULT_BACKOFF_MAX;
        assert!(calls.len() > 12, "{calls:?}");
        assert!(gaps.iter().all(|g| *g <= backoff_max), "{gaps:?}");
        assert_eq!(state.current().expect("held").held.authinfo, "OLD");
    }

    /// The runway wait binds the schedule only: a forced refresh asked during it starts at
    /// once (its own limit, `min_forced_interval`, has long passed), not 45 min later.
    #[tokio::test(start_paused = true)]
    async fn a_forced_refresh_during_the_runway_wait_is_not_held_by_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = state_with_raw_data(dir.path());
        state.publish(old_authinfo(3600, 3600));
        let upstream = FakeUpstream::authinfo((0..100).map(|_| Step::Fail(500, None)));
        let refresher = Refresher::new(state.clone(), upstream.clone()).with_random(max_random);
        let running = Running::start(|stop| refresher.run(stop));
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs(600)).await;
        let (calls, gaps) = call_gaps(&upstream, start);
        assert_eq!(
            calls.len(),
            7,
            "the doubling (5 s to 160 s), then the runway wait: {calls:?}"
        );
        let next = state.refresh_status().next_attempt_at.expect("scheduled");
        assert!(
            next - state.now() > 2000,
            "the schedule waits for 0.8 of the runway: {next} {gaps:?}"
        );
        let asked = Instant::now() - start;
        let answer = forced_refresh(&state).await;
        assert_eq!(
            answer.status, 502,
            "the forced attempt ran and failed: {answer:?}"
        );
        let (calls, _) = call_gaps(&upstream, start);
        assert_eq!(calls.len(), 8, "{calls:?}");
        assert!(calls[7] - asked < Duration::from_secs(1), "{calls:?}");
        running.stop().await;
        assert_eq!(state.current().expect("held").held.authinfo, "OLD");
    }

    /// A held authinfo younger than the interval is not refreshed at start; one older is.
    #[tokio::test(start_paused = true)]
    async fn start_refreshes_only_a_stale_authinfo() {
        for (age, expect_immediate) in [(600, false), (4000, true)] {
            let dir = tempfile::tempdir().expect("tempdir");
            let state = state_with_raw_data(dir.path());
            state.publish(old_authinfo(age, 3600));
            let upstream = FakeUpstream::authinfo([Step::Ok("NEW")]);
            let running = refreshing(&state, &upstream);
            tokio::time::sleep(Duration::from_secs(60)).await;
            assert_eq!(
                lock(&upstream.calls).len() == 1,
                expect_immediate,
                "age {age}"
            );
            running.stop().await;
        }
    }

    /// A permanent error (400) is not retried on the backoff schedule; new raw_data is.
    #[tokio::test(start_paused = true)]
    async fn permanent_error_holds_until_new_raw_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = state_with_raw_data(dir.path());
        let upstream = FakeUpstream::authinfo([Step::Fail(400, None), Step::Ok("GOOD")]);
        let running = refreshing(&state, &upstream);
        tokio::time::sleep(Duration::from_secs(1800)).await;
        assert_eq!(
            lock(&upstream.calls).len(),
            1,
            "no retries within the interval"
        );
        assert!(state.status().refresh.last_error_permanent);
        assert!(state.accept_raw_data("NEWRAW".into()).refresh_triggered);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(lock(&upstream.calls).len(), 2);
        assert_eq!(state.current().expect("held").held.authinfo, "GOOD");
        running.stop().await;
    }

    /// `POST /v1/refresh?wait=true` through the socket API's handler, as a face app sends it.
    async fn forced_refresh(state: &Arc<State>) -> crate::terminal::api::ApiResponse {
        let request = crate::terminal::api::ApiRequest {
            method: http::Method::POST,
            path: "/v1/refresh".into(),
            query: Some("wait=true".into()),
            ..Default::default()
        };
        crate::terminal::api::handle(request, state, &CancellationToken::new()).await
    }

    /// Floods `POST /v1/refresh?wait=true` every 50 ms for `duration` of the paused clock and
    /// returns the answers' statuses and `Retry-After`s.
    async fn flood(state: &Arc<State>, duration: Duration) -> Vec<(u16, Option<u64>)> {
        let end = Instant::now() + duration;
        let mut answers = Vec::new();
        while Instant::now() < end {
            let r = forced_refresh(state).await;
            if r.status == 429 {
                assert_eq!(r.json_body()["code"], "REFRESH_RATE_LIMITED");
                assert_eq!(
                    r.json_body()["retry_after_seconds"].as_u64(),
                    r.retry_after,
                    "the body and Retry-After agree"
                );
            }
            answers.push((r.status, r.retry_after));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        answers
    }

    /// A face app flooding `POST /v1/refresh` while a fresh authinfo is held makes the daemon
    /// call the proxy once a minute (`refresh.min_forced_interval`): over 121 s, the refresh at
    /// start and the forced ones at 60 s and 120 s. Every other request gets 429 with the wait
    /// until the next is allowed.
    #[tokio::test(start_paused = true)]
    async fn a_face_app_flooding_refresh_makes_one_proxy_call_a_minute() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = state_with_raw_data(dir.path());
        let upstream = FakeUpstream::authinfo((0..100).map(|_| Step::Ok("NEW")));
        let running = refreshing(&state, &upstream);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(lock(&upstream.calls).len(), 1, "the refresh at start");
        let answers = flood(&state, Duration::from_secs(121)).await;
        let calls = lock(&upstream.calls).clone();
        assert_eq!(calls.len(), 3, "{calls:?}");
        for gap in calls.windows(2).map(|w| w[1] - w[0]) {
            assert!(
                gap >= Duration::from_secs(60) && gap < Duration::from_secs(61),
                "{calls:?}"
            );
        }
        let served = answers.iter().filter(|(s, _)| *s == 200).count();
        let limited = answers.iter().filter(|(s, _)| *s == 429).count();
        assert_eq!((served, limited), (2, answers.len() - 2), "{answers:?}");
        assert!(limited > 2000, "{limited}");
        // The first refusal waits out the minute since the start; none waits longer.
        assert_eq!(answers[0], (429, Some(60)), "{:?}", &answers[..3]);
        assert!(
            answers
                .iter()
                .all(|(_, after)| after.is_none_or(|a| a <= 60)),
            "{answers:?}"
        );
        assert_eq!(state.metrics.refreshes("ok"), 3);
        running.stop().await;
    }

    /// Without a fresh authinfo (the proxy failing), the flood is held to the backoff: with the
    /// worst-case jitter the loop's own retries come 5, 10, 20 s apart, and forced refreshes
    /// wait the same ceilings, so 60 s of flooding make the four calls the schedule makes alone.
    #[tokio::test(start_paused = true)]
    async fn without_a_fresh_authinfo_a_flood_is_held_to_the_backoff() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = state_with_raw_data(dir.path());
        let upstream = FakeUpstream::authinfo((0..100).map(|_| Step::Fail(500, None)));
        let refresher = Refresher::new(state.clone(), upstream.clone()).with_random(max_random);
        let running = Running::start(|stop| refresher.run(stop));
        let start = Instant::now();
        let answers = flood(&state, Duration::from_secs(60)).await;
        let calls: Vec<Duration> = lock(&upstream.calls)
            .iter()
            .map(|t| t.duration_since(start))
            .collect();
        // At 0, then 5, 10 and 20 s after each failed start: 0, 5, 15, 35 (the next is at 75).
        assert_eq!(calls.len(), 4, "{calls:?}");
        for (gap, ceiling) in calls.windows(2).map(|w| w[1] - w[0]).zip([5, 10, 20]) {
            let ceiling = Duration::from_secs(ceiling);
            assert!(gap >= ceiling.mul_f64(0.99) && gap <= ceiling, "{calls:?}");
        }
        assert!(answers.iter().filter(|(s, _)| *s == 429).count() > 1000);
        // Forced requests admitted between the loop's own retries are the failures it answers.
        assert!(
            answers.iter().all(|(s, _)| matches!(s, 429 | 502)),
            "{answers:?}"
        );
        running.stop().await;
    }

    /// New raw_data right after a permanent refusal is stored and its refresh deferred, not
    /// dropped: it starts by itself when the limit allows (5 s after the refused start).
    #[tokio::test(start_paused = true)]
    async fn raw_data_within_the_limit_starts_its_refresh_when_the_limit_allows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = state_with_raw_data(dir.path());
        let upstream = FakeUpstream::authinfo([Step::Fail(400, None), Step::Ok("GOOD")]);
        let running = refreshing(&state, &upstream);
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(state.status().refresh.last_error_permanent);
        let accepted = state.accept_raw_data("NEWRAW".into());
        assert!(accepted.refresh_triggered);
        let held = accepted
            .refresh_deferred_seconds
            .expect("held by the backoff");
        assert!(held <= 4, "{held:?}");
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(
            lock(&upstream.calls).len(),
            1,
            "not before the limit allows"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        let calls = lock(&upstream.calls).clone();
        assert_eq!(calls.len(), 2);
        assert!(calls[1].duration_since(start) >= Duration::from_secs(5));
        assert_eq!(state.current().expect("held").held.authinfo, "GOOD");
        running.stop().await;
    }

    /// The first raw_data's refresh starts at once and is reported so, however soon the loop
    /// starts it: the hold is read where the request is made, not after.
    #[tokio::test(start_paused = true)]
    async fn the_refresh_new_raw_data_starts_does_not_report_itself_as_deferred() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = state_with_raw_data(dir.path());
        let accepted = state.accept_raw_data("RAW-2".into());
        assert!(accepted.refresh_triggered);
        assert_eq!(accepted.refresh_deferred_seconds, None);
        state.begin_refresh();
        assert!(
            state.forced_refresh_held().is_some(),
            "once it started, another forced refresh is held"
        );
    }

    /// Requests made while a refresh runs join it instead of starting another.
    #[tokio::test(start_paused = true)]
    async fn refresh_requests_during_a_refresh_join_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = state_with_raw_data(dir.path());
        state.publish(old_authinfo(0, 7200));
        // The first call never answers: the refresh stays in flight.
        let upstream = FakeUpstream::authinfo([]);
        let running = refreshing(&state, &upstream);
        let first = state.request_refresh();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(state.refresh_status().in_flight);
        let joined = state.request_refresh();
        assert_eq!(
            first, joined,
            "a request during a flight waits for that flight"
        );
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(lock(&upstream.calls).len(), 1);
        running.stop().await;
    }
}
