//! The journal fields an operator queries: `authinfod` logs to journald when `JOURNAL_STREAM`
//! names its stderr, with the fields as the README writes them (`CODE=PROXY_UNREACHABLE`, no
//! prefix), a fixed `MESSAGE_ID` per event kind, and INFO at priority 6.
//!
//! Where a real journald runs, its socket is in use and the test reads the entries back with
//! `journalctl _PID=…`. Where none runs (CI, containers), the test binds journald's socket
//! itself and parses the native journal protocol the daemon sends, datagram by datagram.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use authinfod::events;

/// journald's socket, where tracing-journald always sends.
const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// One journal entry: field name to value (the last value of a repeated field).
type Entry = BTreeMap<String, String>;

/// Parses one datagram of the native protocol: `KEY=value\n`, or `KEY\n` + 64-bit LE length +
/// bytes + `\n` for values that may hold newlines.
fn parse_entry(mut data: &[u8]) -> Entry {
    let mut entry = Entry::new();
    while !data.is_empty() {
        let line_end = data.iter().position(|b| *b == b'\n').expect("a field ends");
        let line = &data[..line_end];
        if let Some(eq) = line.iter().position(|b| *b == b'=') {
            entry.insert(
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            );
            data = &data[line_end + 1..];
        } else {
            let name = String::from_utf8_lossy(line).into_owned();
            let rest = &data[line_end + 1..];
            let len = u64::from_le_bytes(rest[..8].try_into().expect("length"));
            let len = usize::try_from(len).expect("length fits");
            let value = &rest[8..8 + len];
            entry.insert(name, String::from_utf8_lossy(value).into_owned());
            data = &rest[8 + len + 1..];
        }
    }
    entry
}

/// Runs `authinfod run --once` against a proxy that is down, its stderr a file whose device and
/// inode `JOURNAL_STREAM` names (what systemd does), and returns the child's pid.
fn run_once_to_the_journal(dir: &Path) -> u32 {
    use authinfod::terminal::store::{RawData, Store};
    {
        let (store, _) = Store::open(&dir.join("state")).expect("store");
        store
            .save_raw_data(&RawData {
                value: "RAW-1".into(),
                received_at: authinfod::units::unix_now(),
                source: "socket".into(),
            })
            .expect("raw_data");
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead = format!(
        "https://127.0.0.1:{}",
        listener.local_addr().expect("addr").port()
    );
    drop(listener);
    let ca = authinfod::tls::generate_pki("journal test ca", &["localhost"])
        .expect("pki")
        .ca_pem;
    let config = crate::support::write_config(dir, &dead, &ca, "");
    let stderr = std::fs::File::create(dir.join("stderr")).expect("stderr file");
    let meta = stderr.metadata().expect("stat");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_authinfod"))
        .args(["run", "--once", "--config"])
        .arg(&config)
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .env("RUST_LOG", "info")
        .stderr(stderr)
        .spawn()
        .expect("run authinfod");
    let pid = child.id();
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(3), "the proxy is down: exit 3");
    pid
}

/// The entries the daemon sent, by MESSAGE_ID where it has one.
fn check_entries(entries: &[Entry]) {
    assert!(!entries.is_empty(), "nothing reached the journal");
    for e in entries {
        assert!(
            !e.keys().any(|k| k.starts_with("F_")),
            "no prefixed fields: {e:?}"
        );
        assert_eq!(
            e.get("SYSLOG_IDENTIFIER").map(String::as_str),
            Some("authinfod")
        );
    }
    let failed = entries
        .iter()
        .find(|e| e.get("MESSAGE_ID").map(String::as_str) == Some(events::REFRESH_FAILED))
        .unwrap_or_else(|| panic!("no REFRESH_FAILED entry in {entries:#?}"));
    assert_eq!(
        failed.get("CODE").map(String::as_str),
        Some("PROXY_UNREACHABLE"),
        "{failed:?}"
    );
    assert_eq!(
        failed.get("PRIORITY").map(String::as_str),
        Some("4"),
        "a warning"
    );
    assert!(failed.contains_key("MESSAGE"), "{failed:?}");
    let info = entries
        .iter()
        .find(|e| {
            e.get("MESSAGE")
                .is_some_and(|m| m.starts_with("no stored authinfo"))
        })
        .unwrap_or_else(|| panic!("no info entry in {entries:#?}"));
    assert_eq!(
        info.get("PRIORITY").map(String::as_str),
        Some("6"),
        "INFO is informational"
    );
    let health = entries
        .iter()
        .filter(|e| e.get("MESSAGE_ID").map(String::as_str) == Some(events::HEALTH_CHECK_FAILED))
        .count();
    assert_eq!(health, 3, "one HEALTH_CHECK_FAILED per check");
}

#[test]
fn binary_journal_fields_are_queryable_as_documented() {
    let dir = tempfile::tempdir().expect("tempdir");
    if std::os::unix::net::UnixDatagram::unbound()
        .and_then(|s| s.connect(JOURNAL_SOCKET))
        .is_ok()
    {
        // A real journald: read the entries back from it.
        let pid = run_once_to_the_journal(dir.path());
        let out = std::process::Command::new("journalctl")
            .arg(format!("_PID={pid}"))
            .args(["-o", "json", "--no-pager"])
            .output()
            .expect("journalctl");
        let entries: Vec<Entry> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| {
                v.as_object()
                    .into_iter()
                    .flatten()
                    .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
                    .collect()
            })
            .collect();
        check_entries(&entries);
        return;
    }
    let socket_dir = Path::new(JOURNAL_SOCKET).parent().expect("parent");
    let made_dir = !socket_dir.exists();
    if made_dir && std::fs::create_dir_all(socket_dir).is_err() {
        eprintln!(
            "SKIP journal fields: no journald and {} cannot be made here",
            socket_dir.display()
        );
        return;
    }
    let _ = std::fs::remove_file(JOURNAL_SOCKET);
    let receiver =
        std::os::unix::net::UnixDatagram::bind(JOURNAL_SOCKET).expect("bind the journal socket");
    run_once_to_the_journal(dir.path());
    receiver.set_nonblocking(true).expect("nonblocking");
    let mut entries = Vec::new();
    let mut buf = vec![0; 256 * 1024];
    while let Ok(n) = receiver.recv(&mut buf) {
        if n > 0 {
            entries.push(parse_entry(&buf[..n]));
        }
    }
    let _ = std::fs::remove_file(JOURNAL_SOCKET);
    if made_dir {
        let _ = std::fs::remove_dir(socket_dir);
    }
    check_entries(&entries);
}
