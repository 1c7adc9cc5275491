//! The fleet dashboard (`GET /` on the admin listener): one server-rendered HTML page with its
//! own small CSS and JavaScript inline, no external asset (it works on an intranet without
//! internet): summary tiles, a licence-expiry timeline of the next 90 days and an authinfo-age
//! distribution drawn as inline SVG, and a table of terminals, worst first, sortable by any
//! column, each with its detail. It reloads itself every [`REFRESH_SECONDS`].
//!
//! Owns: the page's markup and the rule that every string not written here is escaped. The page
//! is written through [`Html`], whose only way to add text that is not a `&'static str` of this
//! file is [`Html::text`], which escapes it; numbers go through [`Html::num`]. Terminals choose
//! what they report, so this is what keeps a report of `<script>` a string on the page; the
//! Content-Security-Policy the server sends (scripts and styles only with this page's nonce) is
//! the second wall. It must not judge terminals: it draws a [`FleetView`] and a
//! [`TerminalsPage`].

use std::fmt::Display;

use super::FleetView;
use super::doc::{Summary, TerminalDoc, TerminalsPage, TerminalsQuery, short_age};
use super::record::{RiskKind, Severity};
use super::risk::licence_days_left;
use crate::wire::ReportedCheck;

/// How often the page reloads itself.
pub const REFRESH_SECONDS: u32 = 30;
/// The days the licence timeline covers.
pub const TIMELINE_DAYS: i64 = 90;
/// Terminals in the dashboard's table when the query does not say.
pub const DASHBOARD_PER_PAGE: usize = 200;

/// The authinfo-age buckets of the distribution: (label, upper bound in seconds).
const AGE_BUCKETS: [(&str, u64); 9] = [
    ("<15m", 15 * 60),
    ("15-30m", 30 * 60),
    ("30-45m", 45 * 60),
    ("45-60m", 60 * 60),
    ("1-1.25h", 75 * 60),
    ("1.25-2h", 2 * 3600),
    ("2-6h", 6 * 3600),
    ("6-24h", 24 * 3600),
    (">24h", u64::MAX),
];

/// A page being written: static markup as is, everything else escaped.
#[derive(Debug, Default)]
pub struct Html(String);

/// What [`Html::num`] takes: numbers, whose text needs no escaping.
pub trait Number: Display {}
impl Number for u64 {}
impl Number for i64 {}
impl Number for usize {}
impl Number for u32 {}
impl Number for f64 {}

impl Html {
    /// Markup written in this file.
    pub fn raw(&mut self, markup: &'static str) -> &mut Self {
        self.0.push_str(markup);
        self
    }

    /// Any other text, escaped for an element's content or a quoted attribute.
    pub fn text(&mut self, text: &str) -> &mut Self {
        for c in text.chars() {
            match c {
                '&' => self.0.push_str("&amp;"),
                '<' => self.0.push_str("&lt;"),
                '>' => self.0.push_str("&gt;"),
                '"' => self.0.push_str("&quot;"),
                '\'' => self.0.push_str("&#39;"),
                c => self.0.push(c),
            }
        }
        self
    }

    /// A number.
    pub fn num(&mut self, n: impl Number) -> &mut Self {
        use std::fmt::Write as _;
        let _ = write!(self.0, "{n}");
        self
    }

    pub fn finish(self) -> String {
        self.0
    }
}

/// The page for `view`, with `page` (the table's terminals) and `nonce` (the CSP nonce of its
/// style and script).
pub fn render(view: &FleetView, page: &TerminalsPage, nonce: &str) -> String {
    let mut h = Html::default();
    h.raw("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">")
        .raw("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">")
        .raw("<title>Fleet health · authinfo-proxy</title><style nonce=\"")
        .text(nonce)
        .raw("\">")
        .raw(CSS)
        .raw("</style><noscript><meta http-equiv=\"refresh\" content=\"")
        .num(REFRESH_SECONDS)
        .raw("\"></noscript></head><body>\n<header><h1>Fleet health</h1><p class=\"meta\">judged ")
        .text(&page.generated_at)
        .raw(" · reloads every ")
        .num(REFRESH_SECONDS)
        .raw(" s");
    if let Some(v) = &page.summary.newest_version {
        h.raw(" · newest daemon ").text(v);
    }
    h.raw("</p></header>\n");
    tiles(&mut h, &page.summary);
    h.raw("<section class=\"charts\">");
    timeline(&mut h, view);
    ages(&mut h, view);
    h.raw("</section>\n");
    table(&mut h, page);
    legend(&mut h);
    h.raw("<script nonce=\"").text(nonce).raw("\">");
    h.raw(SCRIPT_START)
        .num(REFRESH_SECONDS * 1000)
        .raw(SCRIPT_END);
    h.raw("</script></body></html>\n");
    h.finish()
}

fn tiles(h: &mut Html, s: &Summary) {
    h.raw("<section class=\"tiles\">");
    let tile =
        |h: &mut Html, id: &'static str, class: &'static str, n: usize, label: &'static str| {
            h.raw("<div class=\"tile ")
                .raw(class)
                .raw("\" id=\"")
                .raw(id)
                .raw("\"><span class=\"n\">")
                .num(n)
                .raw("</span><span class=\"l\">")
                .raw(label)
                .raw("</span></div>");
        };
    tile(h, "tile-terminals", "", s.terminals, "terminals");
    tile(h, "tile-ok", "ok", s.ok, "ok");
    tile(h, "tile-at-risk", "warning", s.at_risk, "at risk");
    tile(h, "tile-critical", "critical", s.critical, "critical");
    tile(h, "tile-offline", "critical", s.offline, "offline");
    h.raw("</section>\n");
}

/// The licence-expiry timeline: terminals whose licence lapses on each of the next 90 days.
fn timeline(h: &mut Html, view: &FleetView) {
    let mut per_day = vec![0usize; TIMELINE_DAYS as usize + 1];
    let mut lapsed = 0usize;
    for t in &view.terminals {
        let Some(day) = t
            .record
            .as_ref()
            .and_then(|r| r.report.as_ref())
            .and_then(|r| r.report.licence.value.as_deref())
        else {
            continue;
        };
        match licence_days_left(day, view.now) {
            Some(d) if d < 0 => lapsed += 1,
            Some(d) if d <= TIMELINE_DAYS => per_day[d as usize] += 1,
            _ => {}
        }
    }
    let (width, height, base) = (910.0, 170.0, 140.0);
    let most = per_day.iter().copied().max().unwrap_or(0).max(1) as f64;
    let step = 900.0 / per_day.len() as f64;
    h.raw("<figure><figcaption>Licence expiry, next 90 days");
    if lapsed > 0 {
        h.raw(" · <b class=\"critical-text\" id=\"licence-lapsed\">")
            .num(lapsed)
            .raw(" lapsed</b>");
    }
    h.raw("</figcaption><svg id=\"licence-timeline\" role=\"img\" viewBox=\"0 0 ")
        .num(width)
        .raw(" ")
        .num(height)
        .raw("\">");
    for (day, n) in per_day.iter().enumerate() {
        if *n == 0 {
            continue;
        }
        let class = if day as i64 <= view.thresholds.licence_critical_days {
            "bar critical"
        } else if day as i64 <= view.thresholds.licence_warning_days {
            "bar warning"
        } else {
            "bar ok"
        };
        let bar = (*n as f64 / most * 120.0).max(2.0);
        h.raw("<rect class=\"")
            .raw(class)
            .raw("\" data-day=\"")
            .num(day)
            .raw("\" data-count=\"")
            .num(*n)
            .raw("\" x=\"")
            .num(5.0 + day as f64 * step)
            .raw("\" y=\"")
            .num(base - bar)
            .raw("\" width=\"")
            .num((step - 1.0).max(1.0))
            .raw("\" height=\"")
            .num(bar)
            .raw("\"><title>")
            .num(*n)
            .raw(" terminal(s): licence lapses in ")
            .num(day)
            .raw(" day(s)</title></rect>");
    }
    h.raw("<line class=\"axis\" x1=\"5\" y1=\"")
        .num(base)
        .raw("\" x2=\"905\" y2=\"")
        .num(base)
        .raw("\"/>");
    for day in [0u32, 7, 30, 60, 90] {
        h.raw("<text class=\"tick\" x=\"")
            .num(5.0 + f64::from(day) * step)
            .raw("\" y=\"160\">")
            .num(day)
            .raw("d</text>");
    }
    if per_day.iter().all(|n| *n == 0) {
        h.raw("<text class=\"empty\" x=\"455\" y=\"80\" text-anchor=\"middle\">no licence lapses in the next 90 days</text>");
    }
    h.raw("</svg></figure>");
}

/// The distribution of the held authinfos' ages now.
fn ages(h: &mut Html, view: &FleetView) {
    let mut counts = [0usize; AGE_BUCKETS.len()];
    let mut none = 0usize;
    for t in &view.terminals {
        let received = t.record.as_ref().and_then(|r| r.report.as_ref());
        let age = received.and_then(|r| {
            let since = u64::try_from(view.now.saturating_sub(r.received_at)).unwrap_or(0);
            r.report
                .authinfo
                .age_seconds
                .map(|a| a.saturating_add(since))
        });
        match age {
            Some(a) => {
                let i = AGE_BUCKETS
                    .iter()
                    .position(|(_, bound)| a < *bound)
                    .unwrap_or(AGE_BUCKETS.len() - 1);
                counts[i] += 1;
            }
            None => none += 1,
        }
    }
    let most = counts.iter().copied().max().unwrap_or(0).max(1) as f64;
    h.raw("<figure><figcaption>Authinfo age · ")
        .num(none)
        .raw(" without one reported</figcaption><svg id=\"authinfo-ages\" role=\"img\" viewBox=\"0 0 460 170\">");
    for (i, ((label, _), n)) in AGE_BUCKETS.iter().zip(counts).enumerate() {
        let x = 10.0 + i as f64 * 50.0;
        let bar = if n == 0 {
            0.0
        } else {
            (n as f64 / most * 110.0).max(2.0)
        };
        let class = if i >= 5 { "bar warning" } else { "bar ok" };
        h.raw("<rect class=\"")
            .raw(class)
            .raw("\" data-bucket=\"")
            .raw(label)
            .raw("\" data-count=\"")
            .num(n)
            .raw("\" x=\"")
            .num(x)
            .raw("\" y=\"")
            .num(130.0 - bar)
            .raw("\" width=\"42\" height=\"")
            .num(bar)
            .raw("\"><title>")
            .num(n)
            .raw(" terminal(s)</title></rect><text class=\"tick\" x=\"")
            .num(x)
            .raw("\" y=\"148\">")
            .raw(label)
            .raw("</text><text class=\"count\" x=\"")
            .num(x)
            .raw("\" y=\"")
            .num(125.0 - bar)
            .raw("\">")
            .num(n)
            .raw("</text>");
    }
    h.raw("<line class=\"axis\" x1=\"5\" y1=\"130\" x2=\"455\" y2=\"130\"/></svg></figure>");
}

fn table(h: &mut Html, page: &TerminalsPage) {
    h.raw("<section><h2>Terminals</h2><nav class=\"filters\">");
    let filters: [(&'static str, TerminalsQuery); 5] = [
        ("all", TerminalsQuery::default()),
        (
            "at risk",
            TerminalsQuery {
                at_risk: Some(true),
                ..TerminalsQuery::default()
            },
        ),
        (
            "critical",
            TerminalsQuery {
                severity: Some(Severity::Critical),
                ..TerminalsQuery::default()
            },
        ),
        (
            "offline",
            TerminalsQuery {
                risk: Some(RiskKind::Offline),
                ..TerminalsQuery::default()
            },
        ),
        (
            "never seen",
            TerminalsQuery {
                risk: Some(RiskKind::NeverSeen),
                ..TerminalsQuery::default()
            },
        ),
    ];
    for (label, query) in filters {
        let current = TerminalsQuery {
            page: None,
            per_page: None,
            ..page.query.clone()
        } == query;
        h.raw("<a href=\"")
            .text(&href(&query))
            .raw(if current {
                "\" class=\"current\">"
            } else {
                "\">"
            })
            .raw(label)
            .raw("</a>");
    }
    h.raw("<span class=\"count\">")
        .num(page.matching)
        .raw(" matching · page ")
        .num(page.page)
        .raw(" of ")
        .num(page.pages.max(1))
        .raw("</span>");
    for (label, to) in [
        ("previous", page.page.checked_sub(1)),
        ("next", Some(page.page + 1)),
    ] {
        if let Some(to) = to.filter(|p| (1..=page.pages).contains(p)) {
            let q = TerminalsQuery {
                page: Some(to),
                ..page.query.clone()
            };
            h.raw("<a href=\"")
                .text(&href(&q))
                .raw("\">")
                .raw(label)
                .raw("</a>");
        }
    }
    h.raw("</nav>\n<table id=\"terminals\"><thead><tr>")
        .raw("<th data-sort=\"num\">Severity</th><th data-sort=\"text\">Device</th>")
        .raw("<th data-sort=\"text\">Class</th><th data-sort=\"num\">Last seen</th>")
        .raw("<th data-sort=\"num\">Authinfo</th><th data-sort=\"num\">Licence</th>")
        .raw("<th data-sort=\"text\">Version</th><th data-sort=\"num\">Risks</th></tr></thead><tbody>\n");
    for t in &page.terminals {
        row(h, t);
    }
    h.raw("</tbody></table>");
    if page.terminals.is_empty() {
        h.raw("<p class=\"empty\">No terminal matches.</p>");
    }
    h.raw("</section>\n");
}

/// `/` with `query`'s parameters (typed values: nothing here comes from a terminal).
fn href(query: &TerminalsQuery) -> String {
    let mut parts = Vec::new();
    if let Some(r) = query.risk {
        parts.push(format!("risk={}", r.as_str()));
    }
    if let Some(s) = query.severity {
        parts.push(format!("severity={}", s.as_str()));
    }
    if let Some(a) = query.at_risk {
        parts.push(format!("at_risk={a}"));
    }
    if let Some(p) = query.page {
        parts.push(format!("page={p}"));
    }
    if let Some(p) = query.per_page {
        parts.push(format!("per_page={p}"));
    }
    if parts.is_empty() {
        "/".into()
    } else {
        format!("/?{}", parts.join("&"))
    }
}

fn severity_rank(s: Option<Severity>) -> u64 {
    match s {
        None => 0,
        Some(Severity::Info) => 1,
        Some(Severity::Warning) => 2,
        Some(Severity::Critical) => 3,
    }
}

fn severity_class(s: Option<Severity>) -> &'static str {
    match s {
        None => "ok",
        Some(Severity::Info) => "info",
        Some(Severity::Warning) => "warning",
        Some(Severity::Critical) => "critical",
    }
}

fn row(h: &mut Html, t: &TerminalDoc) {
    let class = severity_class(t.severity);
    let report = t.report.as_ref();
    h.raw("<tr class=\"terminal ")
        .raw(class)
        .raw("\" data-device=\"")
        .text(&t.device_id)
        .raw("\"><td data-v=\"")
        .num(severity_rank(t.severity))
        .raw("\"><span class=\"badge ")
        .raw(class)
        .raw("\">")
        .raw(t.severity.map_or("ok", Severity::as_str))
        .raw("</span></td><td data-v=\"")
        .text(&t.device_id)
        .raw("\"><b>")
        .text(&t.device_id)
        .raw("</b><br><small>")
        .text(&t.device_sn)
        .raw("</small></td><td data-v=\"")
        .text(t.device_class.as_deref().unwrap_or(""))
        .raw("\">")
        .text(t.device_class.as_deref().unwrap_or("-"));
    if let Some(m) = &t.merchant {
        h.raw("<br><small>").text(m).raw("</small>");
    }
    h.raw("</td><td data-v=\"")
        .num(t.last_seen_seconds_ago.unwrap_or(u64::MAX))
        .raw("\">");
    match t.last_seen_seconds_ago {
        Some(s) => h.text(&short_age(s)).raw(" ago"),
        None => h.raw("never"),
    };
    h.raw("</td><td data-v=\"")
        .num(t.authinfo_age_seconds.unwrap_or(u64::MAX))
        .raw("\">");
    match report {
        Some(r) => {
            h.text(r.authinfo.state.as_str());
            if let Some(age) = t.authinfo_age_seconds {
                h.raw(" · ").text(&short_age(age));
            }
        }
        None => {
            h.raw("-");
        }
    }
    h.raw("</td><td data-v=\"")
        .num(t.licence_days_left.unwrap_or(i64::MAX))
        .raw("\">");
    match t.licence_days_left {
        Some(d) if d < 0 => h.raw("lapsed"),
        Some(d) => h.num(d).raw(" d"),
        None => h.raw("-"),
    };
    h.raw("</td><td data-v=\"")
        .text(report.map_or("", |r| r.version.as_str()))
        .raw("\">")
        .text(report.map_or("-", |r| r.version.as_str()))
        .raw("</td><td data-v=\"")
        .num(t.risks.len())
        .raw("\">");
    if t.risks.is_empty() {
        h.raw("<span class=\"none\">none</span>");
    }
    for r in &t.risks {
        h.raw("<span class=\"risk ")
            .raw(r.severity.as_str())
            .raw("\">")
            .raw(r.risk.as_str())
            .raw("</span> ");
    }
    detail(h, t);
    h.raw("</td></tr>\n");
}

/// The terminal's detail, folded: every risk's message and everything its last report said.
fn detail(h: &mut Html, t: &TerminalDoc) {
    h.raw("<details><summary>detail</summary><dl>");
    for r in &t.risks {
        h.raw("<dt>")
            .raw(r.risk.as_str())
            .raw("</dt><dd>")
            .text(&r.message)
            .raw("</dd>");
    }
    let field = |h: &mut Html, name: &'static str, value: Option<String>| {
        h.raw("<dt>")
            .raw(name)
            .raw("</dt><dd>")
            .text(value.as_deref().unwrap_or("-"))
            .raw("</dd>");
    };
    field(h, "fleet list", Some(t.fleet.as_str().into()));
    field(h, "first seen", t.first_seen_at.clone());
    field(h, "last seen", t.last_seen_at.clone());
    field(h, "last issued an authinfo", t.last_issued_at.clone());
    field(h, "last report", t.report_received_at.clone());
    if let Some(r) = &t.report {
        field(h, "authinfo fingerprint", r.authinfo.fingerprint.clone());
        field(h, "authinfo expires", r.authinfo.expires_at.clone());
        field(
            h,
            "last refresh",
            Some(
                match (r.refresh.last_attempt_ok, &r.refresh.last_error_code) {
                    (Some(true), _) => "ok".into(),
                    (_, Some(code)) => format!(
                        "{code} ({} consecutive failure(s))",
                        r.refresh.consecutive_failures
                    ),
                    _ => "none yet".into(),
                },
            ),
        );
        field(
            h,
            "raw_data",
            Some(
                if r.raw_data_present {
                    "present"
                } else {
                    "missing"
                }
                .into(),
            ),
        );
        field(
            h,
            "clock skew (learned)",
            r.clock_skew_seconds.map(|s| format!("{s} s")),
        );
        field(h, "store", Some(r.store.as_str().into()));
        field(h, "uptime", Some(short_age(r.uptime_seconds)));
        let inspection = check_text(&r.inspection, |v| v.as_str());
        field(h, "inspection", Some(inspection));
        let binding = check_text(&r.alipay_binding, |v| v.as_str());
        field(h, "Alipay binding", Some(binding));
        field(h, "licence until", r.licence.value.clone());
    }
    h.raw("</dl></details>");
}

/// A reported check as `state`, or `state: value` when it holds one.
fn check_text<T: Copy>(check: &ReportedCheck<T>, value: fn(T) -> &'static str) -> String {
    match check.value {
        Some(v) => format!("{}: {}", check.state.as_str(), value(v)),
        None => check.state.as_str().to_owned(),
    }
}

fn legend(h: &mut Html) {
    h.raw("<section class=\"legend\"><h2>Risks</h2><dl>");
    for k in RiskKind::ALL {
        h.raw("<dt>")
            .raw(k.as_str())
            .raw("</dt><dd>")
            .raw(k.describe())
            .raw("</dd>");
    }
    h.raw("</dl></section>\n");
}

const CSS: &str = "
:root{--bg:#f6f7f9;--fg:#1d2330;--mute:#6b7385;--card:#fff;--line:#e2e5ea;--ok:#2e9d5b;--info:#4a7bd0;--warning:#d98a00;--critical:#d23b3b}
*{box-sizing:border-box}body{margin:0;padding:20px 28px;background:var(--bg);color:var(--fg);font:14px/1.45 system-ui,-apple-system,'Segoe UI','PingFang SC','Noto Sans CJK SC','WenQuanYi Micro Hei',sans-serif}
h1{margin:0;font-size:22px}h2{font-size:16px;margin:22px 0 8px}.meta{margin:2px 0 16px;color:var(--mute)}
.tiles{display:flex;gap:12px;flex-wrap:wrap}.tile{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:12px 18px;min-width:130px;border-top:4px solid var(--info)}
.tile .n{display:block;font-size:28px;font-weight:600}.tile .l{color:var(--mute)}.tile.ok{border-top-color:var(--ok)}.tile.warning{border-top-color:var(--warning)}.tile.critical{border-top-color:var(--critical)}
.charts{display:flex;gap:12px;flex-wrap:wrap;margin-top:14px}figure{margin:0;background:var(--card);border:1px solid var(--line);border-radius:8px;padding:10px 12px;flex:1 1 420px}
figcaption{font-weight:600;margin-bottom:4px}svg{width:100%;height:auto;display:block}.bar.ok{fill:var(--info)}.bar.warning{fill:var(--warning)}.bar.critical{fill:var(--critical)}
.axis{stroke:#9aa1ae}.tick,.count{font-size:11px;fill:var(--mute)}.empty{fill:var(--mute);color:var(--mute)}.critical-text{color:var(--critical)}
.filters{display:flex;gap:10px;align-items:center;margin-bottom:8px;flex-wrap:wrap}.filters a{color:var(--info);text-decoration:none;padding:2px 8px;border-radius:12px;border:1px solid var(--line);background:var(--card)}.filters a.current{background:var(--info);color:#fff}.filters .count{color:var(--mute)}
table{border-collapse:collapse;width:100%;background:var(--card);border:1px solid var(--line)}th,td{text-align:left;padding:6px 9px;border-bottom:1px solid var(--line);vertical-align:top}
th{cursor:pointer;user-select:none;background:#eef0f4;white-space:nowrap}th[data-dir=asc]::after{content:' \\25B2'}th[data-dir=desc]::after{content:' \\25BC'}
tr.critical td:first-child{box-shadow:inset 4px 0 var(--critical)}tr.warning td:first-child{box-shadow:inset 4px 0 var(--warning)}small{color:var(--mute)}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;color:#fff;font-size:12px}.badge.ok{background:var(--ok)}.badge.info{background:var(--info)}.badge.warning{background:var(--warning)}.badge.critical{background:var(--critical)}
.risk{display:inline-block;margin:0 4px 2px 0;padding:0 6px;border-radius:4px;font-size:12px;border:1px solid}.risk.critical{color:var(--critical)}.risk.warning{color:var(--warning)}.risk.info{color:var(--info)}.none{color:var(--mute)}
details summary{cursor:pointer;color:var(--info);font-size:12px}dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 12px;margin:6px 0}dt{color:var(--mute)}dd{margin:0;word-break:break-all}
.legend dl{grid-template-columns:max-content 1fr}td:nth-child(3),td:nth-child(4),td:nth-child(5){white-space:nowrap}
";

const SCRIPT_START: &str = "
(function(){
  var table=document.getElementById('terminals');
  var heads=table.tHead.rows[0].cells;
  table.setAttribute('data-sortable','true');
  function value(row,i,kind){var c=row.cells[i];var v=c.getAttribute('data-v');return kind==='num'?parseFloat(v):(v||'').toLowerCase();}
  function sort(i,dir){
    var kind=heads[i].getAttribute('data-sort');var body=table.tBodies[0];
    var rows=Array.prototype.slice.call(body.rows);
    rows.sort(function(a,b){var x=value(a,i,kind),y=value(b,i,kind);var c=x<y?-1:x>y?1:0;return dir==='asc'?c:-c;});
    rows.forEach(function(r){body.appendChild(r);});
    for(var j=0;j<heads.length;j++){heads[j].removeAttribute('data-dir');}
    heads[i].setAttribute('data-dir',dir);
    try{sessionStorage.setItem('authinfo-proxy-sort',i+':'+dir);}catch(e){}
  }
  for(var i=0;i<heads.length;i++){(function(i){heads[i].addEventListener('click',function(){
    sort(i,heads[i].getAttribute('data-dir')==='desc'?'asc':'desc');});})(i);}
  try{var saved=(sessionStorage.getItem('authinfo-proxy-sort')||'').split(':');
    if(saved.length===2&&heads[+saved[0]]){sort(+saved[0],saved[1]);}}catch(e){}
  setTimeout(function(){location.reload();},";
const SCRIPT_END: &str = ");
})();
";
