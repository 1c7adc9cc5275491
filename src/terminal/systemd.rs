//! systemd integration: `sd_notify` (`READY=1`, `STATUS=`, `WATCHDOG=1`, `STOPPING=1`) and the
//! watchdog gate.
//!
//! Owns: the notify protocol (a datagram to `$NOTIFY_SOCKET`, a path or an `@abstract` name) and
//! the rule that `WATCHDOG=1` is sent only while both the refresh loop and the socket loop have
//! reported in recently. The environment is read by the binary and passed in, so tests use their
//! own notify socket. Without `NOTIFY_SOCKET` (Android, a shell) every call is a no-op.

use std::ffi::OsString;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::state::State;
use crate::units::format_duration;

/// A loop that has not reported in for this long counts as stuck.
const STUCK_AFTER: Duration = Duration::from_secs(60);
/// How often `STATUS=` is refreshed when no watchdog is configured.
const STATUS_EVERY: Duration = Duration::from_secs(30);

/// Sends notifications to the service manager.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    socket: Option<OsString>,
}

impl Notifier {
    /// A notifier for `$NOTIFY_SOCKET` (pass `std::env::var_os("NOTIFY_SOCKET")`).
    pub fn new(notify_socket: Option<OsString>) -> Self {
        Self {
            socket: notify_socket.filter(|s| !s.is_empty()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// Sends `state` (newline-separated `KEY=value` lines). Failures are logged at debug
    /// level: a lost notification must never stop the daemon.
    pub fn notify(&self, state: &str) {
        let Some(socket) = &self.socket else {
            return;
        };
        if let Err(error) = send(socket, state.as_bytes()) {
            tracing::debug!(%error, "sd_notify failed");
        }
    }
}

fn send(socket: &OsString, message: &[u8]) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let sock = std::os::unix::net::UnixDatagram::unbound()?;
    let bytes = socket.as_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        send_abstract(&sock, name, message)
    } else {
        sock.send_to(message, std::path::Path::new(socket))
            .map(drop)
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn send_abstract(
    sock: &std::os::unix::net::UnixDatagram,
    name: &[u8],
    message: &[u8],
) -> std::io::Result<()> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt as _;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt as _;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    sock.send_to_addr(message, &addr).map(drop)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn send_abstract(
    _sock: &std::os::unix::net::UnixDatagram,
    _name: &[u8],
    _message: &[u8],
) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "abstract sockets need Linux",
    ))
}

/// The one-line story for `STATUS=`.
pub fn status_line(state: &State) -> String {
    let time = state.time();
    let now = time.local;
    let status = state.refresh_status().clone();
    let authinfo = match state.current() {
        None => "no authinfo yet".to_owned(),
        Some(s) => format!(
            "authinfo {} {} (age {}, {} left)",
            s.fingerprint,
            s.freshness(time, state.config.refresh.interval).as_str(),
            s.age(time).seconds.map_or_else(
                || "unknown".to_owned(),
                |a| format_duration(Duration::from_secs(a))
            ),
            format_duration(Duration::from_secs(s.runway(time))),
        ),
    };
    let store = match state.store.status().not_persisting {
        Some(n) => format!("; store not persisting: {}", n.reason),
        None => String::new(),
    };
    let next = match (status.waiting_for, status.next_attempt_at) {
        (Some(w), _) => format!("waiting for {}", w.as_str()),
        (None, Some(t)) => format!(
            "next refresh in {}",
            format_duration(Duration::from_secs(u64::try_from(t - now).unwrap_or(0)))
        ),
        (None, None) => "refresh pending".to_owned(),
    };
    let failing = match (&status.last_attempt, status.consecutive_failures) {
        (Some(a), n) if !a.ok => format!(
            "; last refresh failed ({}{})",
            a.code.as_deref().unwrap_or("error"),
            if n > 1 {
                format!(", {n} in a row")
            } else {
                String::new()
            }
        ),
        _ => String::new(),
    };
    format!("{authinfo}; {next}{failing}{store}")
}

/// Whether both loops have reported in within [`STUCK_AFTER`].
pub fn loops_alive(state: &State) -> bool {
    let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let now = millis(state.started.elapsed());
    let fresh = |slot: &std::sync::atomic::AtomicU64| {
        now.saturating_sub(slot.load(Ordering::Relaxed)) < millis(STUCK_AFTER)
    };
    fresh(&state.heartbeats.refresh) && fresh(&state.heartbeats.socket)
}

/// Keeps `STATUS=` current (sent as soon as something it tells changes, and checked every
/// [`STATUS_EVERY`] for what only time changes, like an age) and pets the watchdog (every half
/// `watchdog` period) while both loops are alive, until `shutdown`.
pub async fn supervise(
    state: Arc<State>,
    notifier: Notifier,
    watchdog: Option<Duration>,
    shutdown: CancellationToken,
) {
    let period = watchdog.map_or(STATUS_EVERY, |w| (w / 2).min(STATUS_EVERY));
    let mut ticker = tokio::time::interval(period);
    let mut changes = state.watch_changes();
    let mut last_status = String::new();
    loop {
        let tick = tokio::select! {
            () = shutdown.cancelled() => break,
            _ = ticker.tick() => true,
            // The sender lives in the state this task holds, so `changed` never fails here.
            _ = changes.changed() => false,
        };
        let line = status_line(&state);
        if line != last_status {
            notifier.notify(&format!("STATUS={line}"));
            last_status = line;
        }
        if !tick {
            continue;
        }
        if watchdog.is_some() {
            if loops_alive(&state) {
                notifier.notify("WATCHDOG=1");
            } else {
                tracing::error!(
                    message_id = crate::events::WATCHDOG_WITHHELD,
                    "a daemon loop has not reported in; withholding WATCHDOG=1 so systemd restarts us"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_reach_the_notify_socket_and_absent_socket_is_a_no_op() {
        let (_dir, path) = crate::test_support::temp_path("notify");
        let receiver = std::os::unix::net::UnixDatagram::bind(&path).expect("bind");
        let notifier = Notifier::new(Some(path.into_os_string()));
        assert!(notifier.enabled());
        notifier.notify("READY=1\nSTATUS=serving");
        let mut buf = [0; 64];
        let n = receiver.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving");
        let off = Notifier::new(None);
        assert!(!off.enabled());
        off.notify("READY=1");
        assert!(!Notifier::new(Some(OsString::new())).enabled());
    }

    /// The watchdog is petted only while both loops report in: a loop silent for a minute
    /// withholds it.
    #[tokio::test(start_paused = true)]
    async fn loops_alive_needs_both_heartbeats_within_a_minute() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = crate::terminal::state::test_state(dir.path());
        let beat = |slot: &std::sync::atomic::AtomicU64| {
            crate::terminal::state::Heartbeats::beat(
                slot,
                tokio::time::Instant::now(),
                state.started,
            );
        };
        tokio::time::advance(Duration::from_secs(120)).await;
        assert!(!loops_alive(&state), "no heartbeat for two minutes");
        beat(&state.heartbeats.refresh);
        assert!(!loops_alive(&state), "the socket loop is still silent");
        beat(&state.heartbeats.socket);
        assert!(loops_alive(&state));
        tokio::time::advance(Duration::from_secs(59)).await;
        beat(&state.heartbeats.socket);
        assert!(loops_alive(&state), "59 s is within the limit");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(
            !loops_alive(&state),
            "the refresh loop has been silent for 61 s"
        );
    }

    /// A change (here a new authinfo) reaches `STATUS=` at once, not at the next 30 s tick.
    #[tokio::test(start_paused = true)]
    async fn status_follows_a_change_without_waiting_for_the_tick() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = crate::terminal::state::test_state(dir.path());
        let path = dir.path().join("notify");
        let receiver = std::os::unix::net::UnixDatagram::bind(&path).expect("bind");
        receiver.set_nonblocking(true).expect("nonblocking");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(supervise(
            state.clone(),
            Notifier::new(Some(path.into_os_string())),
            None,
            shutdown.clone(),
        ));
        let settle = || async {
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
        };
        settle().await;
        let mut buf = [0; 256];
        let n = receiver.recv(&mut buf).expect("the first STATUS at start");
        assert!(
            String::from_utf8_lossy(&buf[..n]).starts_with("STATUS=no authinfo yet"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
        let now = state.now();
        let served = state.publish(crate::terminal::store::HeldAuthinfo {
            authinfo: "A".into(),
            fetched_at: now,
            expires_at: now + 7200,
            expires_in: None,
            proxy_fetched_at: None,
        });
        settle().await;
        // Still within the first second of paused time: no tick has come since the start.
        let n = receiver
            .recv(&mut buf)
            .expect("a STATUS right after the change");
        let status = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(
            status.starts_with(&format!("STATUS=authinfo {} fresh", served.fingerprint)),
            "{status}"
        );
        shutdown.cancel();
        task.await.expect("join");
    }

    #[test]
    fn abstract_notify_sockets_work() {
        #[cfg(target_os = "android")]
        use std::os::android::net::SocketAddrExt as _;
        #[cfg(target_os = "linux")]
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("authinfod-test-{}", std::process::id());
        let addr =
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
        let receiver = std::os::unix::net::UnixDatagram::bind_addr(&addr).expect("bind");
        Notifier::new(Some(format!("@{name}").into())).notify("WATCHDOG=1");
        let mut buf = [0; 16];
        let n = receiver.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"WATCHDOG=1");
    }
}
