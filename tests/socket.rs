//! The socket's admission under misbehaving clients (issue 10): silent connections, a full
//! table, waiting requests, half-closed clients, denied peers and their log lines. Every test
//! checks that the face app is still served; none depends on the machine's speed (limits are
//! counts, timeouts are either short ones the test waits out generously or long ones it never
//! reaches).

use std::path::Path;

use authinfod::terminal::metrics::{Busy, Closed, Denial};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixStream;

use crate::support::fake_proxy::FakeProxy;
use crate::support::{GENEROUS, TestDaemon, device_key, logs, wait_until};

async fn daemon(socket_section: &str) -> (FakeProxy, TestDaemon) {
    let proxy = FakeProxy::start(&device_key().public.to_pem()).await;
    let daemon = TestDaemon::start(&proxy.url, &proxy.pki.ca_pem, socket_section).await;
    (proxy, daemon)
}

/// Sends `request` on a new connection and reads until the daemon closes it (every request
/// here says `connection: close`).
async fn exchange(socket: &Path, request: &[u8]) -> String {
    let mut s = UnixStream::connect(socket).await.expect("connect");
    s.write_all(request).await.expect("write");
    read_to_close(&mut s).await
}

async fn read_to_close(s: &mut UnixStream) -> String {
    let mut out = Vec::new();
    tokio::time::timeout(GENEROUS, s.read_to_end(&mut out))
        .await
        .expect("the daemon answers and closes")
        .expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

const STATUS: &[u8] = b"GET /v1/status HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";

/// The face app's request: `GET /v1/status` must answer 200.
async fn face_app_is_served(daemon: &TestDaemon) {
    let answer = exchange(&daemon.socket, STATUS).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
}

#[tokio::test]
async fn silent_connections_hold_no_slot_and_the_face_app_is_served() {
    let (_proxy, daemon) = daemon(
        "[socket]\nmax_connections = 4\nmax_waiting_requests = 2\nmax_pending_connections = 16\nfirst_byte_timeout = \"1h\"\n",
    )
    .await;
    let mut silent = Vec::new();
    for _ in 0..100 {
        silent.push(UnixStream::connect(&daemon.socket).await.expect("connect"));
    }
    let metrics = &daemon.state.metrics;
    wait_until("the oldest silent connections make room", || {
        metrics.closed(Closed::EvictedPending) >= 84
    })
    .await;
    for _ in 0..20 {
        face_app_is_served(&daemon).await;
    }
    // The evicted ones were the oldest: the first connection is closed, the last still open.
    let answer = read_to_close(&mut silent[0]).await;
    assert_eq!(
        answer, "",
        "an evicted silent connection is closed unanswered"
    );
    assert!(metrics.busy_answers(Busy::Connections) == 0);
    daemon.stop().await;
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_after_the_first_byte_timeout() {
    let (_proxy, daemon) = daemon("[socket]\nfirst_byte_timeout = \"1s\"\n").await;
    let mut silent = UnixStream::connect(&daemon.socket).await.expect("connect");
    face_app_is_served(&daemon).await;
    assert_eq!(read_to_close(&mut silent).await, "");
    assert_eq!(
        daemon.state.metrics.closed(Closed::FirstByteTimeout),
        1,
        "only the silent one timed out"
    );
    face_app_is_served(&daemon).await;
    daemon.stop().await;
}

/// A keep-alive client of hyper's, idle after one request.
async fn idle_client(
    socket: &Path,
) -> hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>> {
    let stream = UnixStream::connect(socket).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let req = hyper::Request::get("/v1/status")
        .header("host", "x")
        .body(http_body_util::Empty::new())
        .expect("request");
    let r = sender.send_request(req).await.expect("answer");
    assert_eq!(r.status(), 200);
    sender
}

#[tokio::test]
async fn when_every_slot_is_taken_the_connection_idle_longest_makes_room() {
    let (_proxy, daemon) =
        daemon("[socket]\nmax_connections = 2\nmax_waiting_requests = 1\n").await;
    let first = idle_client(&daemon.socket).await;
    let second = idle_client(&daemon.socket).await;
    face_app_is_served(&daemon).await;
    wait_until("the connection idle longest is closed", || {
        first.is_closed()
    })
    .await;
    assert!(!second.is_closed(), "the younger idle connection stays");
    assert_eq!(daemon.state.metrics.closed(Closed::EvictedIdle), 1);
    daemon.stop().await;
}

#[tokio::test]
async fn waiting_requests_have_a_cap_and_an_abandoned_one_gives_its_place_back() {
    let (_proxy, daemon) =
        daemon("[socket]\nmax_connections = 8\nmax_waiting_requests = 2\n").await;
    // No authinfo is held yet, so a long-poll waits (until the first one is fetched).
    let poll = b"GET /v1/authinfo?wait=300 HTTP/1.1\r\nhost: x\r\n\r\n";
    let mut waiting = Vec::new();
    for _ in 0..2 {
        let mut s = UnixStream::connect(&daemon.socket).await.expect("connect");
        s.write_all(poll).await.expect("write");
        waiting.push(s);
    }
    let metrics = &daemon.state.metrics;
    let now_waiting = || {
        metrics
            .requests_waiting
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    wait_until("two requests wait", || now_waiting() == 2).await;
    let third = exchange(
        &daemon.socket,
        b"GET /v1/authinfo?wait=300 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(third.starts_with("HTTP/1.1 503"), "{third:?}");
    assert!(
        third.contains("retry-after: 1") && third.contains("\"BUSY\""),
        "{third:?}"
    );
    assert_eq!(metrics.busy_answers(Busy::WaitingRequests), 1);
    face_app_is_served(&daemon).await;

    // A client that leaves gives its place back at once, not when its wait ends.
    drop(waiting.pop());
    wait_until("the abandoned wait ends", || now_waiting() == 1).await;
    // One that only half-closes still waits for its answer, and gets it.
    let mut half = UnixStream::connect(&daemon.socket).await.expect("connect");
    half.write_all(b"GET /v1/authinfo?wait=1 HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    half.shutdown().await.expect("shutdown");
    let answer = read_to_close(&mut half).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
    assert!(answer.contains("NO_AUTHINFO"), "{answer:?}");
    daemon.stop().await;
}

#[tokio::test]
async fn half_closed_clients_get_their_answer() {
    let (_proxy, daemon) = daemon("").await;
    let clients = (0..50).map(|_| {
        let socket = daemon.socket.clone();
        tokio::spawn(async move {
            let mut s = UnixStream::connect(&socket).await.expect("connect");
            s.write_all(b"GET /v1/status HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .expect("write");
            s.shutdown().await.expect("shutdown");
            read_to_close(&mut s).await
        })
    });
    for client in clients.collect::<Vec<_>>() {
        let answer = client.await.expect("client");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    }
    daemon.stop().await;
}

#[tokio::test]
async fn denials_are_logged_once_per_peer_per_interval_with_a_count() {
    let (captured, _guard) = logs::capture();
    let (_proxy, daemon) = daemon("[socket]\nallowed_uids = [4242]\nallowed_gids = [4242]\n").await;
    for _ in 0..30 {
        let answer = exchange(&daemon.socket, STATUS).await;
        assert!(answer.starts_with("HTTP/1.1 403"), "{answer:?}");
        assert!(answer.contains("\"PEER_DENIED\""), "{answer:?}");
    }
    assert_eq!(daemon.state.metrics.denials(Denial::NotAllowed), 30);
    let first = captured.lines_with("socket peer denied: not in");
    assert_eq!(first.len(), 1, "{first:#?}");
    assert!(first[0].contains("denied_unlogged=0"), "{}", first[0]);
    daemon.stop().await;
    let summary = captured.lines_with("socket peer denied again");
    assert_eq!(summary.len(), 1, "{summary:#?}");
    assert!(summary[0].contains("denied=29"), "{}", summary[0]);
}

/// A flood from another uid through `setpriv`: the child process a denied app would be.
const FLOODER: &str = r#"
import socket, sys
path, requests, idle = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
connects = answered = 0
for _ in range(requests):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    connects += 1
    data = b""
    try:
        s.sendall(b"GET /v1/authinfo HTTP/1.1\r\nhost: x\r\n\r\n")
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    if data.startswith(b"HTTP/1.1 403") and b"PEER_DENIED" in data:
        answered += 1
    s.close()
held = []
for _ in range(idle):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    connects += 1
    held.append(s)
print(connects, answered, flush=True)
sys.stdin.read()
"#;

const OTHER_UID: &str = "4242";

fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

fn as_other_uid() -> tokio::process::Command {
    let mut c = tokio::process::Command::new("setpriv");
    c.args([
        "--reuid",
        OTHER_UID,
        "--regid",
        OTHER_UID,
        "--clear-groups",
        python(),
    ]);
    c
}

/// Whether a child can run as another uid here: root with util-linux's setpriv and python3
/// (emulated or unprivileged runs cannot).
async fn other_uid_available() -> bool {
    if !nix::unistd::Uid::effective().is_root() {
        return false;
    }
    as_other_uid()
        .args(["-c", "import socket"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

#[tokio::test]
async fn a_denied_peers_flood_never_takes_the_face_apps_room() {
    use std::os::unix::fs::PermissionsExt as _;
    if !other_uid_available().await {
        eprintln!(
            "skipped: needs root, setpriv and python3 to run a client as uid {OTHER_UID} (not available here)"
        );
        return;
    }
    let (captured, _guard) = logs::capture();
    let (_proxy, daemon) = daemon(
        "[socket]\nallowed_uids = [0]\nmax_connections = 4\nmax_waiting_requests = 2\nmax_denied_connections = 4\n",
    )
    .await;
    // Any process may connect, as on Android's abstract socket, which has no file mode.
    std::fs::set_permissions(daemon.dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod dir");
    std::fs::set_permissions(&daemon.socket, std::fs::Permissions::from_mode(0o666))
        .expect("chmod socket");
    let (requests, idle) = (200, 300);
    let mut child = as_other_uid()
        .arg("-c")
        .arg(FLOODER)
        .arg(&daemon.socket)
        .arg(requests.to_string())
        .arg(idle.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the flooder");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut line = Vec::new();
    while !line.ends_with(b"\n") {
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(GENEROUS, stdout.read(&mut byte))
            .await
            .expect("the flooder reports")
            .expect("read");
        assert!(n == 1, "the flooder exited early");
        line.push(byte[0]);
    }
    let report = String::from_utf8_lossy(&line);
    let mut fields = report
        .split_whitespace()
        .map(|f| f.parse::<u64>().expect("count"));
    let (connects, answered) = (
        fields.next().expect("connects"),
        fields.next().expect("answered"),
    );
    assert_eq!(connects, requests + idle);
    assert!(answered > 0, "denied requests are answered 403 PEER_DENIED");
    // The flooder now holds 300 connections open: none of them holds a slot.
    for _ in 0..20 {
        face_app_is_served(&daemon).await;
    }
    let metrics = &daemon.state.metrics;
    wait_until("every denied connection is counted", || {
        metrics.denials(Denial::NotAllowed) == connects
    })
    .await;
    assert_eq!(metrics.busy_answers(Busy::Connections), 0);
    drop(child.stdin.take());
    tokio::time::timeout(GENEROUS, child.wait())
        .await
        .expect("the flooder exits")
        .expect("wait");
    let lines = captured.lines_with("socket peer denied: not in");
    assert_eq!(lines.len(), 1, "one line for the whole flood: {lines:#?}");
    assert!(
        lines[0].contains(&format!("peer_uid={OTHER_UID}")),
        "{}",
        lines[0]
    );
    daemon.stop().await;
}

/// The 503 a client gets when its uid holds every slot it may, all busy, is a JSON `BUSY`.
#[tokio::test]
async fn a_uid_at_its_share_of_busy_slots_gets_busy_and_the_wait_ends_it() {
    let (_proxy, daemon) = daemon(
        "[socket]\nmax_connections = 4\nmax_connections_per_uid = 1\nmax_waiting_requests = 2\n",
    )
    .await;
    let mut waiting = UnixStream::connect(&daemon.socket).await.expect("connect");
    waiting
        .write_all(b"GET /v1/authinfo?wait=300 HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let metrics = &daemon.state.metrics;
    wait_until("the long-poll waits", || {
        metrics
            .requests_waiting
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
    })
    .await;
    let answer = exchange(&daemon.socket, STATUS).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
    assert!(answer.contains("\"BUSY\""), "{answer:?}");
    assert_eq!(metrics.busy_answers(Busy::UidConnections), 1);
    drop(waiting);
    wait_until("the slot is free again", || {
        metrics
            .connections_open
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0
    })
    .await;
    face_app_is_served(&daemon).await;
    daemon.stop().await;
}
