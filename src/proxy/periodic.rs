//! The proxy's background duties (fleet sync, platform certificate refresh) as one loop: a
//! first run after a given delay, then every interval (up to `jitter` early), a failed run
//! retried with the shared [`Backoff`] (never sooner than `backoff_min`), until shutdown.
//!
//! Owns: the sleeping and the failure log line. It must not know what a duty does: the duty
//! logs its own success.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::schedule::{Backoff, Schedule};

/// Runs `duty` first after `first_in`, then on `schedule`, until `shutdown`. A failure is
/// logged at warning level as `failed` (journal `MESSAGE_ID` `failed_id`, one of
/// [`crate::events`]) with the error, the attempt and the backoff.
pub async fn repeat<F, Fut, E>(
    schedule: Schedule,
    first_in: Duration,
    shutdown: CancellationToken,
    failed_id: &'static str,
    failed: &'static str,
    mut duty: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::error::Error,
{
    let mut backoff = Backoff::new(schedule);
    let mut delay = first_in;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        let result = tokio::select! {
            () = shutdown.cancelled() => return,
            r = duty() => r,
        };
        let unit = crate::crypto::random_unit();
        delay = match result {
            Ok(()) => backoff.succeeded(unit),
            Err(error) => {
                // Never sooner than the minimum: a duty is a burst of platform requests.
                let delay = backoff.failed(None, unit).max(schedule.backoff_min);
                tracing::warn!(
                    message_id = failed_id,
                    error = %crate::error_chain(&error),
                    attempt = backoff.failures(),
                    backoff_ms = delay.as_millis() as u64,
                    "{failed}"
                );
                delay
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Debug, thiserror::Error)]
    #[error("no")]
    struct No;

    /// Two failures back off (at least `backoff_min` each), then successes come every interval
    /// (up to 10 % early); shutdown ends the loop.
    #[tokio::test(start_paused = true)]
    async fn failures_back_off_and_successes_follow_the_interval() {
        let schedule = Schedule {
            interval: Duration::from_secs(3600),
            jitter: 0.1,
            backoff_min: Duration::from_secs(30),
            backoff_max: Duration::from_secs(1800),
        };
        let runs = Arc::new(AtomicU32::new(0));
        let at = Arc::new(std::sync::Mutex::new(Vec::new()));
        let shutdown = CancellationToken::new();
        let start = tokio::time::Instant::now();
        let task = tokio::spawn({
            let (runs, at, shutdown) = (runs.clone(), at.clone(), shutdown.clone());
            repeat(
                schedule,
                Duration::from_secs(5),
                shutdown,
                crate::events::FLEET_SYNC_FAILED,
                "duty failed",
                move || {
                    let n = runs.fetch_add(1, Ordering::SeqCst);
                    at.lock().expect("lock").push(start.elapsed());
                    async move { if n < 2 { Err(No) } else { Ok(()) } }
                },
            )
        });
        while runs.load(Ordering::SeqCst) < 5 {
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        shutdown.cancel();
        task.await.expect("the loop ends on shutdown");
        let at = at.lock().expect("lock").clone();
        assert_eq!(at[0], Duration::from_secs(5));
        let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps[0] >= Duration::from_secs(30) && gaps[1] >= Duration::from_secs(30));
        assert!(
            gaps[1] <= Duration::from_secs(60),
            "second backoff within 2 x 30 s"
        );
        for gap in &gaps[2..] {
            assert!(
                (Duration::from_secs(3240)..=Duration::from_secs(3600)).contains(gap),
                "{gap:?}"
            );
        }
    }
}
