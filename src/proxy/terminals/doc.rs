//! The fleet view's documents, as types the admin listener answers and `authinfo-proxy
//! terminals` reads back: [`TerminalsPage`] (`GET /terminals`), [`TerminalDoc`]
//! (`GET /terminals/{device_id}`), the query they take ([`TerminalsQuery`]), and the table the
//! command prints ([`render_table`]).
//!
//! Owns: the documents' shape and how an assessed terminal becomes one (times as RFC 3339, ages
//! anchored on the proxy's clock). It must not judge terminals ([`super::risk`] does) or render
//! HTML ([`super::dashboard`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::record::{RiskKind, Severity};
use super::risk::{Risk, licence_days_left};
use super::{Assessed, FleetView};
use crate::proxy::fleet::FleetStatus;
use crate::units::rfc3339;
use crate::wire;

/// Terminals on a page when the query does not say.
pub const DEFAULT_PER_PAGE: usize = 100;
/// The most terminals on one page.
pub const MAX_PER_PAGE: usize = 1000;

/// The query of `GET /terminals` (and of the dashboard's table).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TerminalsQuery {
    /// Only terminals in this risk.
    pub risk: Option<RiskKind>,
    /// Only terminals whose worst risk is at least this severe.
    pub severity: Option<Severity>,
    /// Only terminals at risk (a warning or worse).
    pub at_risk: Option<bool>,
    /// 1-based.
    pub page: Option<usize>,
    pub per_page: Option<usize>,
}

impl TerminalsQuery {
    /// Whether `terminal` passes the filters.
    pub fn admits(&self, terminal: &Assessed) -> bool {
        let worst = terminal.worst();
        self.risk
            .is_none_or(|k| terminal.risks.iter().any(|r| r.risk == k))
            && self.severity.is_none_or(|s| worst.is_some_and(|w| w >= s))
            && (self.at_risk != Some(true) || terminal.at_risk())
    }

    pub fn page(&self) -> usize {
        self.page.unwrap_or(1).max(1)
    }

    pub fn per_page(&self) -> usize {
        self.per_page
            .unwrap_or(DEFAULT_PER_PAGE)
            .clamp(1, MAX_PER_PAGE)
    }
}

/// The fleet in numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Enrolled terminals.
    pub terminals: usize,
    /// Terminals in no risk worse than info.
    pub ok: usize,
    /// Terminals in a risk of warning or worse.
    pub at_risk: usize,
    pub critical: usize,
    pub warning: usize,
    pub info: usize,
    /// Terminals in the `offline` risk.
    pub offline: usize,
    /// Terminals in each risk (every risk listed, 0 included).
    pub by_risk: BTreeMap<RiskKind, usize>,
    /// The newest daemon version any terminal reports.
    pub newest_version: Option<String>,
}

impl Summary {
    pub fn of(view: &FleetView) -> Self {
        let mut s = Summary {
            terminals: view.terminals.len(),
            by_risk: RiskKind::ALL.into_iter().map(|k| (k, 0)).collect(),
            newest_version: view.newest_version.as_ref().map(|v| v.text.clone()),
            ..Summary::default()
        };
        for t in &view.terminals {
            match t.worst() {
                Some(Severity::Critical) => s.critical += 1,
                Some(Severity::Warning) => s.warning += 1,
                Some(Severity::Info) => s.info += 1,
                None => {}
            }
            if t.at_risk() {
                s.at_risk += 1;
            } else {
                s.ok += 1;
            }
            for r in &t.risks {
                *s.by_risk.entry(r.risk).or_default() += 1;
            }
        }
        s.offline = s.by_risk.get(&RiskKind::Offline).copied().unwrap_or(0);
        s
    }
}

/// `GET /terminals`: the summary and one page of the terminals the query admits, worst first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalsPage {
    /// When the risks were judged (RFC 3339, the proxy's clock).
    pub generated_at: String,
    /// The whole fleet, whatever the filters.
    pub summary: Summary,
    pub query: TerminalsQuery,
    /// Terminals the filters admit.
    pub matching: usize,
    pub page: usize,
    pub per_page: usize,
    pub pages: usize,
    pub terminals: Vec<TerminalDoc>,
}

impl TerminalsPage {
    /// The page `query` asks of `view`.
    pub fn of(view: &FleetView, query: &TerminalsQuery) -> Self {
        let (page, per_page) = (query.page(), query.per_page());
        let admitted: Vec<&Assessed> = view.terminals.iter().filter(|t| query.admits(t)).collect();
        let matching = admitted.len();
        let terminals = admitted
            .into_iter()
            .skip((page - 1).saturating_mul(per_page))
            .take(per_page)
            .map(|t| TerminalDoc::of(t, view.now))
            .collect();
        TerminalsPage {
            generated_at: rfc3339(view.now),
            summary: Summary::of(view),
            query: query.clone(),
            matching,
            page,
            per_page,
            pages: matching.div_ceil(per_page),
            terminals,
        }
    }
}

/// The whole fleet view as `authinfo-proxy terminals --json` prints it: the summary and every
/// terminal the filter admits (all pages), worst first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalsList {
    pub summary: Summary,
    pub terminals: Vec<TerminalDoc>,
}

/// One terminal in the fleet view (`GET /terminals/{device_id}`, and each entry of a page).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalDoc {
    pub device_id: String,
    pub device_sn: String,
    /// The device class WeChat Pay lists (`团餐机`).
    pub device_class: Option<String>,
    /// The sub-merchant's short name WeChat Pay lists.
    pub merchant: Option<String>,
    /// What WeChat Pay's list says of it.
    pub fleet: FleetStatus,
    /// Its worst risk's severity; `null` when it is in none.
    pub severity: Option<Severity>,
    pub risks: Vec<Risk>,
    pub first_seen_at: Option<String>,
    pub last_seen_at: Option<String>,
    pub last_seen_seconds_ago: Option<u64>,
    pub last_issued_at: Option<String>,
    pub report_received_at: Option<String>,
    pub report_age_seconds: Option<u64>,
    /// The held authinfo's age now (its age when reported, plus the report's).
    pub authinfo_age_seconds: Option<u64>,
    /// Days of licence left now (negative once lapsed).
    pub licence_days_left: Option<i64>,
    /// The last report as received: everything the terminal said.
    pub report: Option<wire::Report>,
}

impl TerminalDoc {
    pub fn of(t: &Assessed, now: i64) -> Self {
        let ago = |at: i64| u64::try_from(now.saturating_sub(at)).unwrap_or(0);
        let record = t.record.as_deref();
        let received = record.and_then(|r| r.report.as_ref());
        let report_age = received.map(|r| ago(r.received_at));
        TerminalDoc {
            device_id: t.device.device_id.clone(),
            device_sn: t.device.device_sn.clone(),
            device_class: t.class.clone(),
            merchant: t.merchant.clone(),
            fleet: t.fleet,
            severity: t.worst(),
            risks: t.risks.clone(),
            first_seen_at: record.and_then(|r| r.first_seen).map(rfc3339),
            last_seen_at: record.and_then(|r| r.last_seen).map(rfc3339),
            last_seen_seconds_ago: record.and_then(|r| r.last_seen).map(ago),
            last_issued_at: record.and_then(|r| r.last_issued).map(rfc3339),
            report_received_at: received.map(|r| rfc3339(r.received_at)),
            report_age_seconds: report_age,
            authinfo_age_seconds: received.and_then(|r| {
                r.report
                    .authinfo
                    .age_seconds
                    .map(|a| a.saturating_add(report_age.unwrap_or(0)))
            }),
            licence_days_left: received
                .and_then(|r| r.report.licence.value.as_deref())
                .and_then(|day| licence_days_left(day, now)),
            report: received.map(|r| r.report.clone()),
        }
    }
}

/// A short age for people: `45s`, `12m`, `3h`, `2d`.
pub fn short_age(seconds: u64) -> String {
    match seconds {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86400 * 2 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// The terminals as a table for people (`authinfo-proxy terminals`), in the order given (worst
/// first), with a summary line. Chinese names line up ([`crate::proxy::fleet::columns`]).
pub fn render_table(terminals: &[TerminalDoc], summary: &Summary) -> String {
    let dash = || "-".to_owned();
    let rows: Vec<Vec<String>> = terminals
        .iter()
        .map(|t| {
            let report = t.report.as_ref();
            vec![
                t.severity.map_or("ok", Severity::as_str).to_owned(),
                t.device_id.clone(),
                t.device_class.clone().unwrap_or_else(dash),
                t.merchant.clone().unwrap_or_else(dash),
                t.last_seen_seconds_ago
                    .map_or_else(|| "never".into(), |s| format!("{} ago", short_age(s))),
                report.map_or_else(dash, |r| match t.authinfo_age_seconds {
                    Some(age) => format!("{} {}", r.authinfo.state.as_str(), short_age(age)),
                    None => r.authinfo.state.as_str().to_owned(),
                }),
                t.licence_days_left.map_or_else(dash, |d| {
                    if d < 0 {
                        "lapsed".into()
                    } else {
                        format!("{d}d")
                    }
                }),
                report.map_or_else(dash, |r| r.version.clone()),
                if t.risks.is_empty() {
                    dash()
                } else {
                    t.risks
                        .iter()
                        .map(|r| r.risk.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                },
            ]
        })
        .collect();
    let header = [
        "SEVERITY",
        "DEVICE_ID",
        "CLASS",
        "MERCHANT",
        "LAST_SEEN",
        "AUTHINFO",
        "LICENCE",
        "VERSION",
        "RISKS",
    ];
    let mut out = crate::proxy::fleet::columns(&header, &rows);
    out.push_str(&format!(
        "{} terminal(s): {} ok, {} at risk ({} critical, {} warning), {} offline{}\n",
        summary.terminals,
        summary.ok,
        summary.at_risk,
        summary.critical,
        summary.warning,
        summary.offline,
        summary
            .newest_version
            .as_ref()
            .map_or_else(String::new, |v| format!("; newest daemon {v}"))
    ));
    out
}
