//! The fleet view end to end: a real daemon's reports reach the proxy over device-signed TLS and
//! show in `GET /terminals`, `authinfo-proxy terminals`, `/metrics` and the dashboard; forged,
//! replayed, oversized and flooding reports are refused; what terminals report is escaped on the
//! page; the admin listener needs its token off loopback; the journal tells when a terminal
//! enters and leaves a risk; and the sandbox's simulated terminals show their spread of risks.

use std::time::Duration;

use authinfod::demo::lab::{self, DEVICE_ID, Lab};
use authinfod::proxy::config::AdminToken;
use authinfod::proxy::terminals::doc::{TerminalDoc, TerminalsList, TerminalsPage};
use authinfod::proxy::terminals::record::{RiskKind, Severity};
use authinfod::units::unix_now;
use authinfod::wire::{self, ErrorBody, HeldState, InspectionResult, Report, codes};

use crate::proxy::{
    DEVICE_B_ID, ProxyConnection, append_device_b, assert_refused, device_a, signer, synced_lab,
};
use crate::support::logs::capture;
use crate::support::{TestDaemon, device_key, wait_for_authinfo_and_health};

/// An HTTP/1.0 call to the admin listener at `addr`: (status, headers, body).
async fn admin(
    addr: std::net::SocketAddr,
    path: &str,
    authorization: Option<&str>,
) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the admin listener");
    let auth = authorization.map_or_else(String::new, |a| format!("authorization: {a}\r\n"));
    tcp.write_all(format!("GET {path} HTTP/1.0\r\nhost: admin\r\n{auth}\r\n").as_bytes())
        .await
        .expect("send");
    let mut text = String::new();
    tcp.read_to_string(&mut text)
        .await
        .expect("read the answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}

fn json<T: serde::de::DeserializeOwned>(body: &str) -> T {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not the document ({e}): {body}"))
}

/// Polls the proxy's record of `device_id` until `cond` holds of its last report.
async fn wait_for_report(lab: &Lab, device_id: &str, what: &str, cond: impl Fn(&Report) -> bool) {
    let deadline = tokio::time::Instant::now() + crate::support::GENEROUS;
    loop {
        let record = lab
            .proxy
            .app
            .health
            .records()
            .get(device_id)
            .await
            .expect("records");
        if record
            .as_ref()
            .and_then(|r| r.report.as_ref())
            .is_some_and(|r| cond(&r.report))
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The lab's proxy config with the admin listener's real address (the lab binds port 0), and
/// `extra` top-level lines, for the `authinfo-proxy` commands.
fn config_for_commands(lab: &Lab, extra: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(&lab.proxy_config).expect("proxy config");
    let text = text.replace(
        "admin_listen = \"127.0.0.1:0\"",
        &format!("admin_listen = \"{}\"\n{extra}", lab.proxy.admin_addr),
    );
    let path = lab.files.path("commands.toml");
    std::fs::write(&path, text).expect("write");
    path
}

/// Runs `authinfo-proxy ARGS --config CONFIG` off the test's thread (the proxy it asks runs on
/// that thread): (exit code, stdout, stderr).
async fn proxy_command(args: &[&str], config: &std::path::Path) -> (i32, String, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_authinfo-proxy"));
    command.args(args).arg("--config").arg(config);
    let out = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("join")
        .expect("run authinfo-proxy");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A real daemon reports after its refresh and health checks; the proxy shows it in the JSON,
/// the command's table and JSON and the metrics, with the authinfo's fingerprint and never the
/// authinfo itself.
#[tokio::test]
async fn daemon_reports_reach_terminals_json_the_command_and_metrics() {
    let (dir, lab) = synced_lab(lab::world(0, 45), "").await;
    let daemon = TestDaemon::start_with_config(dir.clone(), &lab.daemon_config).await;
    assert_eq!(daemon.put_raw_data("RAW-1").await.status, 202);
    wait_for_authinfo_and_health(&daemon).await;
    wait_for_report(&lab, DEVICE_ID, "a report after the health checks", |r| {
        r.authinfo.state == HeldState::Fresh
            && r.inspection.value == Some(InspectionResult::Success)
            && r.alipay_binding.value.is_some()
            && r.licence.value.is_some()
    })
    .await;
    let authinfo = daemon.get("/v1/authinfo").await.json()["authinfo"]
        .as_str()
        .expect("authinfo")
        .to_owned();
    let status = daemon.status().await;
    let fingerprint = status["authinfo"]["fingerprint"]
        .as_str()
        .expect("fingerprint")
        .to_owned();

    let (code, _, body) = admin(lab.proxy.admin_addr, "/terminals", None).await;
    assert_eq!(code, 200, "{body}");
    assert!(!body.contains(&authinfo), "no authinfo in the fleet view");
    let page: TerminalsPage = json(&body);
    assert_eq!(
        (
            page.summary.terminals,
            page.summary.ok,
            page.summary.at_risk
        ),
        (1, 1, 0),
        "{body}"
    );
    let t = &page.terminals[0];
    assert_eq!(
        (t.device_id.as_str(), t.severity),
        (DEVICE_ID, None),
        "{body}"
    );
    assert!(
        t.last_issued_at.is_some() && t.last_seen_seconds_ago.is_some(),
        "{body}"
    );
    let report = t.report.as_ref().expect("the report");
    assert_eq!(
        report.authinfo.fingerprint.as_deref(),
        Some(fingerprint.as_str())
    );
    assert_eq!(report.version, env!("CARGO_PKG_VERSION"));
    assert!(report.raw_data_present);
    assert_eq!(t.licence_days_left, Some(45), "{body}");

    let (code, _, body) = admin(
        lab.proxy.admin_addr,
        &format!("/terminals/{DEVICE_ID}"),
        None,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let one: TerminalDoc = json(&body);
    assert_eq!(one.device_id, DEVICE_ID);
    let (code, _, body) = admin(lab.proxy.admin_addr, "/terminals/T-NOBODY", None).await;
    assert_eq!(code, 404, "{body}");
    assert_eq!(json::<ErrorBody>(&body).code, codes::NOT_FOUND);
    let (code, _, body) = admin(lab.proxy.admin_addr, "/terminals?risk=sunburn", None).await;
    assert_eq!(
        (code, json::<ErrorBody>(&body).code.as_str()),
        (400, codes::BAD_REQUEST)
    );
    let (_, _, body) = admin(lab.proxy.admin_addr, "/terminals?at_risk=true", None).await;
    let at_risk: TerminalsPage = json(&body);
    assert_eq!(
        (at_risk.matching, at_risk.terminals.len()),
        (0, 0),
        "{body}"
    );

    let (code, _, metrics) = admin(lab.proxy.admin_addr, "/metrics", None).await;
    assert_eq!(code, 200);
    for line in [
        "authinfo_proxy_terminals_enrolled 1",
        "authinfo_proxy_terminals_at_risk{severity=\"critical\"} 0",
        "authinfo_proxy_terminals{risk=\"offline\",severity=\"critical\"} 0",
        "authinfo_proxy_terminal_report_age_seconds_count 1",
        "authinfo_proxy_requests_total{route=\"/v1/report\",status=\"200\",outcome=\"ok\"} ",
    ] {
        assert!(
            metrics.lines().any(|l| l.starts_with(line)),
            "no `{line}` in\n{metrics}"
        );
    }
    assert!(!metrics.contains(DEVICE_ID), "no per-device label");

    let config = config_for_commands(&lab, "");
    let (code, out, err) = proxy_command(&["terminals"], &config).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("SEVERITY"), "{out}");
    let row = out.lines().nth(1).expect("a row");
    assert!(row.starts_with("ok") && row.contains(DEVICE_ID), "{out}");
    assert!(out.contains("1 terminal(s): 1 ok, 0 at risk"), "{out}");
    let (code, out, err) = proxy_command(&["terminals", "--json", "--at-risk"], &config).await;
    assert_eq!(code, 0, "{out}{err}");
    let list: TerminalsList = json(&out);
    assert_eq!(
        (list.summary.terminals, list.terminals.len()),
        (1, 0),
        "{out}"
    );
    daemon.stop().await;
    lab.stop().await;
}

/// Reports are device-signed calls like every other: a wrong key, an unknown device, a replayed
/// nonce are refused and keep nothing; oversized or malformed reports are refused; a device
/// flooding reports is told to wait.
#[tokio::test]
async fn forged_replayed_oversized_and_flooding_reports_are_refused() {
    let (_dir, lab) = synced_lab(lab::world(0, 45), "").await;
    let mut conn = ProxyConnection::open(&lab).await;
    let body =
        serde_json::to_vec(&Report::healthy("1.4.0", unix_now(), "2030-01-01")).expect("json");
    let records = lab.proxy.app.health.records();

    let impostor = signer(DEVICE_ID, device_key());
    let r = conn
        .signed(&impostor, "POST", wire::ROUTE_REPORT, &body)
        .await;
    assert_refused(&r, 401, codes::BAD_SIGNATURE);
    let stranger = signer("T-9999", device_key());
    let r = conn
        .signed(&stranger, "POST", wire::ROUTE_REPORT, &body)
        .await;
    assert_refused(&r, 401, codes::UNKNOWN_DEVICE);
    let kept = records.snapshot().await.expect("snapshot");
    assert!(
        kept.iter()
            .all(|(id, r)| &**id == DEVICE_ID && r.report.is_none() && r.last_seen.is_none()),
        "nothing is kept of a refused report, and no record of a stranger: {kept:?}"
    );

    let a = device_a(&lab);
    let authorization = a
        .authorize("POST", wire::ROUTE_REPORT, unix_now(), &body)
        .expect("sign");
    let r = conn
        .send("POST", wire::ROUTE_REPORT, Some(&authorization), &body)
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let receipt: wire::ReportReceipt = serde_json::from_slice(&r.body).expect("receipt");
    assert!(authinfod::units::parse_rfc3339(&receipt.received_at).is_some());
    let record = records.get(DEVICE_ID).await.expect("get").expect("kept");
    assert_eq!(
        record.report.as_ref().map(|r| r.report.version.as_str()),
        Some("1.4.0")
    );
    let r = conn
        .send("POST", wire::ROUTE_REPORT, Some(&authorization), &body)
        .await;
    assert_refused(&r, 401, codes::REPLAYED_NONCE);

    let mut big = Report::healthy("1.4.0", unix_now(), "2030-01-01");
    big.version = "9".repeat(9000);
    let oversized = serde_json::to_vec(&big).expect("json");
    let r = conn
        .signed(&a, "POST", wire::ROUTE_REPORT, &oversized)
        .await;
    assert_refused(&r, 413, codes::BODY_TOO_LARGE);
    let mut bad = Report::healthy("1.4.0", unix_now(), "2030-01-01");
    bad.authinfo.fingerprint = Some("ab\u{1b}[31m".into());
    let r = conn
        .signed(
            &a,
            "POST",
            wire::ROUTE_REPORT,
            &serde_json::to_vec(&bad).expect("json"),
        )
        .await;
    let refusal = assert_refused(&r, 400, codes::BAD_REQUEST);
    assert!(
        refusal.message.contains("authinfo.fingerprint"),
        "{refusal:?}"
    );
    let r = conn
        .signed(&a, "POST", wire::ROUTE_REPORT, b"{\"version\": 1}")
        .await;
    assert_refused(&r, 400, codes::BAD_REQUEST);

    let mut admitted = 2; // the first report and the malformed one took a token each
    let limited = loop {
        let r = conn.signed(&a, "POST", wire::ROUTE_REPORT, &body).await;
        if r.status != 200 {
            break r;
        }
        admitted += 1;
        assert!(admitted <= 10, "more than the burst admitted");
    };
    let refusal = assert_refused(&limited, 429, codes::REPORT_RATE_LIMITED);
    assert!(
        refusal.retryable && refusal.retry_after_seconds.is_some(),
        "{refusal:?}"
    );
    assert!(limited.header("retry-after").is_some());
    assert!(admitted >= 9, "the burst is admitted: {admitted}");
    lab.stop().await;
}

/// A terminal that reports markup sees it shown as text: escaped in the table, the detail and
/// the charts, and the page allows only its own script and style (CSP nonce).
#[tokio::test]
async fn the_dashboard_escapes_what_terminals_report_and_allows_only_its_own_script() {
    let (_dir, lab) = synced_lab(lab::world(1, 45), "").await;
    let b = append_device_b(&lab, crate::proxy::DEVICE_B_SN);
    lab.proxy.reload_registry();
    let mut evil = Report::healthy("<script>alert(\"v\")</script>", unix_now(), "2030-01-01");
    evil.licence.value = Some("<img src=x onerror=alert(1)>".into());
    evil.refresh.last_error_code = Some("</td><script>alert(2)</script>".into());
    evil.refresh.last_attempt_ok = Some(false);
    evil.inspection.value = Some(InspectionResult::Fail);
    let mut conn = ProxyConnection::open(&lab).await;
    let r = conn
        .signed(
            &b,
            "POST",
            wire::ROUTE_REPORT,
            &serde_json::to_vec(&evil).expect("json"),
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    let (code, head, page) = admin(lab.proxy.admin_addr, "/", None).await;
    assert_eq!(code, 200, "{page}");
    assert!(
        !page.contains("<script>alert") && !page.contains("<img"),
        "{page}"
    );
    assert!(
        page.contains("&lt;script&gt;alert(&quot;v&quot;)&lt;/script&gt;"),
        "{page}"
    );
    assert!(page.contains("&lt;/td&gt;&lt;script&gt;alert(2)"), "{page}");
    let csp = head
        .lines()
        .find_map(|l| l.strip_prefix("content-security-policy: "))
        .expect("a CSP header");
    let nonce = csp
        .split("script-src 'nonce-")
        .nth(1)
        .and_then(|s| s.split('\'').next())
        .expect("a script nonce");
    assert!(csp.starts_with("default-src 'none'"), "{csp}");
    let scripts = page.matches("<script").count();
    assert_eq!(scripts, 1, "one script, the page's own");
    assert!(
        page.contains(&format!("<script nonce=\"{nonce}\">")),
        "{page}"
    );
    assert!(
        page.contains(&format!("data-device=\"{DEVICE_B_ID}\"")),
        "{page}"
    );
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "no external asset"
    );
    lab.stop().await;
}

/// Off loopback the admin listener needs `admin_token_file` (the config check says so), and then
/// every admin call needs the token, as a bearer token or a basic password; the command sends it.
#[tokio::test]
async fn an_admin_listener_off_loopback_needs_a_token_and_checks_it() {
    use std::os::unix::fs::PermissionsExt as _;
    let (_dir, lab) = synced_lab(lab::world(0, 45), "").await;
    let text = std::fs::read_to_string(&lab.proxy_config).expect("config");
    let open = text.replace(
        "admin_listen = \"127.0.0.1:0\"",
        "admin_listen = \"0.0.0.0:0\"",
    );
    assert_ne!(open, text, "the lab's admin_listen line");
    let path = lab.files.path("open-admin.toml");
    std::fs::write(&path, &open).expect("write");
    let env = authinfod::proxy::config::no_environment;
    let err = authinfod::proxy::config::load_with_env(&path, &env).expect_err("refused");
    let message = authinfod::error_chain(&err);
    assert!(
        message.contains("admin_listen") && message.contains("admin_token_file"),
        "{message}"
    );

    let token_path = lab.files.path("admin.token");
    std::fs::write(&token_path, "short\n").expect("write");
    std::fs::set_permissions(&token_path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let with_token = open.replace(
        "admin_listen = \"0.0.0.0:0\"",
        "admin_listen = \"0.0.0.0:0\"\nadmin_token_file = \"admin.token\"",
    );
    std::fs::write(&path, &with_token).expect("write");
    let err = authinfod::proxy::config::load_with_env(&path, &env).expect_err("too short");
    assert!(
        authinfod::error_chain(&err).contains("at least 16"),
        "{err}"
    );
    let token = "s3cret-admin-token-0123456789";
    std::fs::write(&token_path, format!("{token}\n")).expect("write");
    let config = authinfod::proxy::config::load_with_env(&path, &env).expect("valid with a token");
    assert!(
        config
            .admin_token
            .as_ref()
            .is_some_and(|t| t.expose() == token)
    );
    lab.proxy.stop().await;
    let proxy = authinfod::proxy::start(config).await.expect("start");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], proxy.admin_addr.port()));

    for path in ["/", "/terminals", "/metrics", "/healthz"] {
        let (code, head, body) = admin(addr, path, None).await;
        assert_eq!(code, 401, "{path}: {body}");
        assert!(
            head.to_ascii_lowercase()
                .contains("www-authenticate: basic"),
            "{head}"
        );
        let (code, _, _) = admin(addr, path, Some("Bearer not-the-token-at-all")).await;
        assert_eq!(code, 401, "{path}");
    }
    let (code, _, body) = admin(addr, "/terminals", Some(&format!("Bearer {token}"))).await;
    assert_eq!(code, 200, "{body}");
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("merchant:{token}"));
    let (code, _, body) = admin(addr, "/", Some(&format!("Basic {basic}"))).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("Fleet health"));
    let wrong = base64::engine::general_purpose::STANDARD.encode("merchant:guess");
    let (code, _, _) = admin(addr, "/", Some(&format!("Basic {wrong}"))).await;
    assert_eq!(code, 401);
    assert!(AdminToken::new(token).is_ok_and(|t| t.matches(token.as_bytes()) && !t.matches(b"x")));

    let commands = with_token.replace(
        "admin_listen = \"0.0.0.0:0\"",
        &format!("admin_listen = \"0.0.0.0:{}\"", proxy.admin_addr.port()),
    );
    let commands_path = lab.files.path("commands.toml");
    std::fs::write(&commands_path, commands).expect("write");
    let (code, out, err) = proxy_command(&["terminals"], &commands_path).await;
    assert_eq!(code, 0, "the command sends the token: {out}{err}");
    assert!(out.contains("1 terminal(s)"), "{out}");
    proxy.stop().await;
    lab.sandbox.stop().await;
}

/// A terminal entering a risk and leaving it is one journal line each, with the catalog's
/// message id, and judging again without a change logs nothing.
#[tokio::test]
async fn the_journal_tells_once_when_a_terminal_enters_and_leaves_a_risk() {
    let (logs, _guard) = capture();
    let (_dir, lab) = synced_lab(lab::world(1, 45), "").await;
    let b = append_device_b(&lab, crate::proxy::DEVICE_B_SN);
    lab.proxy.reload_registry();
    let app = lab.proxy.app.clone();
    let entered = |logs: &crate::support::logs::Captured| {
        logs.lines_with("terminal entered a risk")
            .into_iter()
            .filter(|l| l.contains(DEVICE_B_ID) && l.contains("risk=\"never_seen\""))
            .count()
    };
    let view = app.fleet_view().await.expect("view");
    app.health.announce(&view).await.expect("announce");
    assert_eq!(entered(&logs), 1, "{}", logs.text());
    let line = &logs.lines_with("terminal entered a risk")[0];
    assert!(
        line.contains(authinfod::events::TERMINAL_AT_RISK) && line.contains("severity=\"warning\""),
        "{line}"
    );
    let view = app.fleet_view().await.expect("view");
    assert_eq!(app.health.announce(&view).await.expect("announce"), 0);
    assert_eq!(entered(&logs), 1, "once");

    let mut conn = ProxyConnection::open(&lab).await;
    let body =
        serde_json::to_vec(&Report::healthy("1.4.0", unix_now(), "2030-01-01")).expect("json");
    let r = conn.signed(&b, "POST", wire::ROUTE_REPORT, &body).await;
    assert_eq!(r.status, 200);
    let view = app.fleet_view().await.expect("view");
    let t = view.get(DEVICE_B_ID).expect("B");
    assert!(
        t.risks.iter().all(|r| r.risk != RiskKind::NeverSeen),
        "{:?}",
        t.risks
    );
    assert!(
        t.worst().is_none_or(|s| s < Severity::Warning),
        "{:?}",
        t.risks
    );
    app.health.announce(&view).await.expect("announce");
    let left: Vec<String> = logs
        .lines_with("terminal left a risk")
        .into_iter()
        .filter(|l| l.contains(DEVICE_B_ID))
        .collect();
    assert_eq!(left.len(), 1, "{}", logs.text());
    assert!(
        left[0].contains(authinfod::events::TERMINAL_RISK_CLEARED),
        "{}",
        left[0]
    );
    lab.stop().await;
}

// === the dashboard in a real browser ===

/// Runs Debian's chromium headless on `url` with its own profile in `dir`: `--dump-dom` (the DOM
/// after the page's script ran) or `--screenshot=PATH`.
async fn chromium(dir: &std::path::Path, url: &str, mode: &str) -> String {
    let mut command = std::process::Command::new("chromium");
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--window-size=1280,1500",
        ])
        .arg(format!(
            "--user-data-dir={}",
            dir.join("chromium-profile").display()
        ))
        .arg(mode)
        .arg(url);
    let out = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("join")
        .expect("chromium must be installed (scripts/setup)");
    assert!(
        out.status.success(),
        "chromium {mode}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Decodes `png` (8-bit RGB or RGBA, as chromium writes them) with python3's zlib and answers
/// (distinct colours, share of pixels unlike the top-left one).
fn png_variety(png: &std::path::Path) -> (usize, f64) {
    const SCRIPT: &str = r#"
import struct, sys, zlib
data = open(sys.argv[1], 'rb').read()
assert data[:8] == b'\x89PNG\r\n\x1a\n', 'not a PNG'
pos, idat, w, h, ctype = 8, b'', 0, 0, 0
while pos < len(data):
    n, kind = struct.unpack('>I4s', data[pos:pos + 8])
    body = data[pos + 8:pos + 8 + n]
    if kind == b'IHDR':
        w, h, depth, ctype = struct.unpack('>IIBB', body[:10])
        assert depth == 8 and ctype in (2, 6), (depth, ctype)
    elif kind == b'IDAT':
        idat += body
    pos += 12 + n
bpp = 3 if ctype == 2 else 4
raw, stride = zlib.decompress(idat), w * bpp
prev, rows, i = bytearray(stride), [], 0
for _ in range(h):
    f, line = raw[i], bytearray(raw[i + 1:i + 1 + stride])
    i += 1 + stride
    for x in range(stride):
        a = line[x - bpp] if x >= bpp else 0
        b, c = prev[x], (prev[x - bpp] if x >= bpp else 0)
        if f == 1: line[x] = (line[x] + a) & 255
        elif f == 2: line[x] = (line[x] + b) & 255
        elif f == 3: line[x] = (line[x] + (a + b) // 2) & 255
        elif f == 4:
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
    rows.append(bytes(line)); prev = line
first = rows[0][:bpp]
colours, unlike = set(), 0
for r in rows:
    for x in range(0, stride, bpp):
        px = r[x:x + bpp]
        colours.add(px)
        unlike += px != first
print(len(colours), unlike / (w * h))
"#;
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(SCRIPT)
        .arg(png)
        .output()
        .expect("python3 must be installed (scripts/setup)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut parts = text.split_whitespace();
    let colours = parts.next().and_then(|n| n.parse().ok()).expect("colours");
    let unlike = parts.next().and_then(|n| n.parse().ok()).expect("share");
    (colours, unlike)
}

/// Enrols `device_id` (serial `sn`) with `key` in the lab's registry file.
fn enrol(lab: &Lab, device_id: &str, sn: &str, key: &authinfod::crypto::GeneratedKey) {
    use std::io::Write as _;
    let entry = format!(
        "\n[[device]]\ndevice_id = \"{device_id}\"\npublic_key = \"\"\"\n{}\"\"\"\ndevice_sn = \"{sn}\"\nsub_mchid = \"1900000002\"\norganization_id = \"ORG-CANTEEN-03\"\n",
        key.public.to_pem()
    );
    std::fs::OpenOptions::new()
        .append(true)
        .open(lab.files.path("devices.toml"))
        .and_then(|mut f| f.write_all(entry.as_bytes()))
        .expect("append to the registry");
}

/// The dashboard in Debian's chromium, loaded from a running proxy with six terminals in
/// assorted risks: the rows, the tiles and the licence timeline are in the DOM after its script
/// ran under the page's CSP, and its screenshot is not blank. With `AUTHINFOD_SCREENSHOT` set,
/// the screenshot is copied there (the README's).
#[tokio::test]
async fn the_dashboard_renders_in_a_real_browser() {
    use authinfod::proxy::terminals::record::ReceivedReport;
    use authinfod::wire::{BindingState, CheckState, StoreHealth};
    let (dir, lab) = synced_lab(lab::world(10, 45), "").await;
    let keys = crate::support::lab_keys();
    let b = append_device_b(&lab, crate::proxy::DEVICE_B_SN);
    enrol(&lab, "T-2003", "SANDBOX0000002001", &keys.wechat_platform);
    enrol(&lab, "T-2004", "SANDBOX0000002002", &keys.alipay_app);
    enrol(&lab, "T-2005", "SANDBOX0000002009", &keys.alipay_platform);
    enrol(&lab, "T-2006", "SANDBOX0000009999", &keys.wechat_merchant);
    lab.proxy.reload_registry();
    let now = unix_now();
    let day = |days: i64| authinfod::units::rfc3339(now + days * 86_400)[..10].to_owned();
    let mut conn = ProxyConnection::open(&lab).await;
    let mut send = async |device: &authinfod::wire::auth::DeviceSigner, report: &Report| {
        let r = conn
            .signed(
                device,
                "POST",
                wire::ROUTE_REPORT,
                &serde_json::to_vec(report).expect("json"),
            )
            .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    };
    let healthy = Report::healthy(env!("CARGO_PKG_VERSION"), now, &day(200));
    send(&device_a(&lab), &healthy).await;
    let mut r = healthy.clone();
    r.licence.value = Some(day(5));
    r.authinfo.runway_seconds = Some(600);
    send(&b, &r).await;
    let mut r = healthy.clone();
    r.version = "0.0.9".into();
    r.licence.value = Some(day(21));
    r.inspection.value = Some(InspectionResult::Warn);
    r.alipay_binding.state = CheckState::Error;
    r.alipay_binding.value = Some(BindingState::Unbound);
    r.store = StoreHealth::NotPersisting;
    send(&signer("T-2003", &keys.wechat_platform), &r).await;
    let mut r = healthy.clone();
    r.licence.value = Some(day(60));
    send(&signer("T-2005", &keys.alipay_platform), &r).await;
    // T-2004 went quiet three hours ago with an expired authinfo; T-2006 was never seen.
    let records = lab.proxy.app.health.records();
    let mut quiet = healthy.clone();
    quiet.sent_at = now - 3 * 3600;
    quiet.authinfo.state = HeldState::Expired;
    quiet.licence.value = Some(day(40));
    records
        .report(
            "T-2004",
            ReceivedReport {
                received_at: now - 3 * 3600,
                report: quiet,
            },
        )
        .await
        .expect("report");

    let url = format!("http://{}/", lab.proxy.admin_addr);
    let dom = chromium(dir.path(), &url, "--dump-dom").await;
    assert!(
        dom.contains("data-sortable=\"true\""),
        "the page's script ran: {dom}"
    );
    let rows = dom.matches("<tr class=\"terminal ").count();
    assert_eq!(rows, 6, "{dom}");
    for id in [
        DEVICE_ID,
        DEVICE_B_ID,
        "T-2003",
        "T-2004",
        "T-2005",
        "T-2006",
    ] {
        assert!(
            dom.contains(&format!("data-device=\"{id}\"")),
            "{id}: {dom}"
        );
    }
    let first = dom.find("<tr class=\"terminal ").expect("a row");
    assert!(
        dom[first..].starts_with("<tr class=\"terminal critical\""),
        "worst first"
    );
    assert!(dom.contains("id=\"licence-timeline\""), "{dom}");
    let bars = dom.matches("<rect class=\"bar").count();
    assert!(bars >= 5, "timeline and age bars: {bars}");
    for day_left in [5, 21, 40, 60] {
        assert!(
            dom.contains(&format!("data-day=\"{day_left}\"")),
            "licence in {day_left} d"
        );
    }
    let tile = |id: &str| {
        let at = dom.find(&format!("id=\"{id}\"")).expect(id);
        let n = &dom[at..];
        let start = n.find("class=\"n\">").expect("count") + 10;
        n[start..].split('<').next().unwrap_or_default().to_owned()
    };
    assert_eq!(tile("tile-terminals"), "6");
    assert_eq!(tile("tile-offline"), "1");

    let png = dir.path().join("dashboard.png");
    chromium(dir.path(), &url, &format!("--screenshot={}", png.display())).await;
    let (colours, unlike) = png_variety(&png);
    assert!(
        colours > 20 && unlike > 0.05,
        "a blank screenshot: {colours} colours, {unlike}"
    );
    if let Some(out) = std::env::var_os("AUTHINFOD_SCREENSHOT") {
        std::fs::copy(&png, out).expect("copy the screenshot");
    }
    lab.stop().await;
}

/// `authinfo-proxy sandbox --simulate-terminals 12`: the simulated terminals, enrolled in the
/// registry the sandbox writes, wait for the proxy (saying so once), and once a proxy runs from
/// the written config they fetch authinfos and report, and `GET /terminals` shows the spread of
/// risks they pretend, the silent one never seen.
#[tokio::test]
async fn the_sandbox_simulates_terminals_reporting_assorted_risks() {
    use authinfod::demo::lab::{StandaloneOptions, StandaloneSandbox};
    let (logs, _guard) = capture();
    let dir = tempfile::tempdir().expect("tempdir");
    let proxy_port = crate::support::free_port();
    let options = StandaloneOptions {
        listen: "127.0.0.1:0".into(),
        proxy_listen: format!("127.0.0.1:{proxy_port}"),
        admin_listen: "127.0.0.1:0".into(),
        devices: 0,
        simulate_terminals: 12,
        keys: Some(crate::support::lab_keys().clone()),
        ..StandaloneOptions::new(dir.path())
    };
    let sandbox = StandaloneSandbox::start(&options).await.expect("sandbox");
    assert!(
        sandbox
            .next_steps()
            .contains("12 simulated terminals (SIM-001 to SIM-012"),
        "{}",
        sandbox.next_steps()
    );
    crate::support::wait_until("the simulator waits for the proxy", || {
        !logs
            .lines_with("simulated terminals wait for the proxy")
            .is_empty()
    })
    .await;
    let config = authinfod::proxy::config::load_with_env(
        &sandbox.proxy_config,
        &authinfod::proxy::config::no_environment,
    )
    .expect("the written proxy config");
    let proxy = authinfod::proxy::start(config).await.expect("proxy");

    let deadline = tokio::time::Instant::now() + crate::support::GENEROUS;
    let list = loop {
        let list = authinfod::proxy::admin_terminals(proxy.admin_addr, None, false)
            .await
            .expect("GET /terminals");
        let reported = list.terminals.iter().filter(|t| t.report.is_some()).count();
        if reported == 11 {
            break list;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{reported} of 11 simulated terminals reported"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        list.summary.terminals, 13,
        "the lab's terminal and 12 simulated"
    );
    let terminal = |id: &str| {
        list.terminals
            .iter()
            .find(|t| t.device_id == id)
            .unwrap_or_else(|| panic!("{id} is not in the fleet view"))
    };
    let has = |id: &str, risk: RiskKind, severity: Severity| {
        let t = terminal(id);
        assert!(
            t.risks
                .iter()
                .any(|r| r.risk == risk && r.severity == severity),
            "{id} is not in {risk:?} ({severity:?}): {:?}",
            t.risks
        );
    };
    has("SIM-002", RiskKind::LicenceExpiring, Severity::Critical);
    has("SIM-003", RiskKind::InspectionFailed, Severity::Warning);
    has("SIM-004", RiskKind::NeverSeen, Severity::Warning);
    has("SIM-005", RiskKind::OutdatedVersion, Severity::Info);
    has("SIM-007", RiskKind::LicenceExpiring, Severity::Warning);
    has("SIM-008", RiskKind::InspectionFailed, Severity::Critical);
    has("SIM-010", RiskKind::AlipayUnbound, Severity::Warning);
    has("SIM-011", RiskKind::AuthinfoExpiring, Severity::Critical);
    for id in ["SIM-001", "SIM-006", "SIM-009", "SIM-012"] {
        let t = terminal(id);
        assert!(t.risks.is_empty(), "{id} is healthy: {:?}", t.risks);
        assert!(t.last_issued_at.is_some(), "{id} fetched an authinfo");
        let report = t.report.as_ref().expect("a report");
        assert_eq!(report.authinfo.state, HeldState::Fresh, "{id}");
        assert_eq!(report.version, env!("CARGO_PKG_VERSION"));
    }
    assert_eq!(terminal("SIM-004").last_seen_at, None, "the silent one");
    assert!(list.summary.ok >= 5, "{:?}", list.summary);
    assert!(list.summary.critical >= 3, "{:?}", list.summary);
    assert_eq!(
        logs.lines_with("simulated terminals wait for the proxy")
            .len(),
        1,
        "said once while waiting"
    );
    crate::support::wait_until("the round's log line", || {
        !logs.lines_with("simulated terminals reported").is_empty()
    })
    .await;
    let rounds = logs.lines_with("simulated terminals reported");
    assert!(
        rounds
            .first()
            .is_some_and(|l| l.contains("reported=11") && l.contains("refused=0")),
        "one line for the round: {rounds:?}"
    );
    proxy.stop().await;
    sandbox.stop().await;
}
