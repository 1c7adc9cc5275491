//! What the proxy keeps per enrolled terminal, as data: when it was first and last seen, when it
//! was last issued an authinfo, its last report, and the risks last announced in the journal;
//! and the vocabulary of risks ([`RiskKind`], [`Severity`]).
//!
//! Owns: these types and their stored (JSON) shape; new fields get defaults so records written
//! by an older proxy still read. It must not compute anything: [`super::risk`] judges records,
//! [`super::records`] keeps them.

use serde::{Deserialize, Serialize};

use crate::wire;

/// The proxy's record of one enrolled terminal. Times are Unix seconds on the proxy's clock.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TerminalRecord {
    /// Its first authenticated request.
    pub first_seen: Option<i64>,
    /// Its last authenticated request (any route).
    pub last_seen: Option<i64>,
    /// The last authinfo this proxy handed it.
    pub last_issued: Option<i64>,
    /// Its last report.
    pub report: Option<ReceivedReport>,
    /// The risks last announced in the journal (entering and leaving are logged once each).
    pub announced: Vec<Announced>,
}

impl TerminalRecord {
    /// Notes an authenticated request at `at`.
    pub fn seen(&mut self, at: i64) {
        self.first_seen.get_or_insert(at);
        self.last_seen = Some(self.last_seen.map_or(at, |t| t.max(at)));
    }
}

/// A report as received.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceivedReport {
    /// When the proxy received it.
    pub received_at: i64,
    pub report: wire::Report,
}

/// A risk as last announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announced {
    pub risk: RiskKind,
    pub severity: Severity,
}

/// How bad a risk is. Ordered: `Critical` is the worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Worth knowing; payments are not at stake (an older daemon).
    Info,
    /// Payments are at stake soon, or for some payers (licence within 30 days, no Alipay binding).
    Warning,
    /// The terminal has stopped, or will within days, taking payments.
    Critical,
}

impl Severity {
    pub const ALL: [Severity; 3] = [Severity::Critical, Severity::Warning, Severity::Info];

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// The risks a terminal can be in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RiskKind {
    /// No authenticated request for longer than the offline threshold (2 h).
    Offline,
    /// Enrolled, but never seen by this proxy.
    NeverSeen,
    /// No authinfo issued for longer than the threshold (1 h 15 m).
    AuthinfoNotIssued,
    /// The held authinfo has expired, is missing, or has less runway than the threshold.
    AuthinfoExpiring,
    /// The face SDK licence lapses within the warning (30 d) or critical (7 d) threshold.
    LicenceExpiring,
    /// The factory inspection says WARN or FAIL.
    InspectionFailed,
    /// Alipay does not know the device.
    AlipayUnbound,
    /// The terminal's clock is off by more than the threshold (60 s).
    ClockSkew,
    /// The daemon's store does not persist what it holds.
    StoreNotPersisting,
    /// WeChat Pay lists the device, but not as activated.
    FleetInactivated,
    /// WeChat Pay does not list the device for this merchant.
    FleetUnlisted,
    /// It runs an older daemon than the newest any terminal reports.
    OutdatedVersion,
}

impl RiskKind {
    pub const ALL: [RiskKind; 12] = [
        RiskKind::Offline,
        RiskKind::NeverSeen,
        RiskKind::AuthinfoNotIssued,
        RiskKind::AuthinfoExpiring,
        RiskKind::LicenceExpiring,
        RiskKind::InspectionFailed,
        RiskKind::AlipayUnbound,
        RiskKind::ClockSkew,
        RiskKind::StoreNotPersisting,
        RiskKind::FleetInactivated,
        RiskKind::FleetUnlisted,
        RiskKind::OutdatedVersion,
    ];

    /// Its name in the documents, the metrics' `risk` label, the query and the journal.
    pub fn as_str(self) -> &'static str {
        match self {
            RiskKind::Offline => "offline",
            RiskKind::NeverSeen => "never_seen",
            RiskKind::AuthinfoNotIssued => "authinfo_not_issued",
            RiskKind::AuthinfoExpiring => "authinfo_expiring",
            RiskKind::LicenceExpiring => "licence_expiring",
            RiskKind::InspectionFailed => "inspection_failed",
            RiskKind::AlipayUnbound => "alipay_unbound",
            RiskKind::ClockSkew => "clock_skew",
            RiskKind::StoreNotPersisting => "store_not_persisting",
            RiskKind::FleetInactivated => "fleet_inactivated",
            RiskKind::FleetUnlisted => "fleet_unlisted",
            RiskKind::OutdatedVersion => "outdated_version",
        }
    }

    /// What it means, for people (the dashboard's legend).
    pub fn describe(self) -> &'static str {
        match self {
            RiskKind::Offline => "no request from the terminal for too long",
            RiskKind::NeverSeen => "enrolled, but never seen by this proxy",
            RiskKind::AuthinfoNotIssued => "no authinfo issued to it for too long",
            RiskKind::AuthinfoExpiring => "its authinfo has expired or is about to",
            RiskKind::LicenceExpiring => "its face SDK licence lapses soon",
            RiskKind::InspectionFailed => "the factory inspection says WARN or FAIL",
            RiskKind::AlipayUnbound => "Alipay does not know the device",
            RiskKind::ClockSkew => "its clock is off",
            RiskKind::StoreNotPersisting => "its store does not persist the authinfo",
            RiskKind::FleetInactivated => "WeChat Pay lists it as not activated",
            RiskKind::FleetUnlisted => "WeChat Pay does not list it for this merchant",
            RiskKind::OutdatedVersion => "it runs an older daemon than the newest seen",
        }
    }
}

impl std::str::FromStr for RiskKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        RiskKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("{s:?} is not a risk"))
    }
}
