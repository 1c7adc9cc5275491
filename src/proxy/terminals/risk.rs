//! The risk rules: which terminals will stop taking payments, judged from what the proxy keeps
//! of each ([`TerminalRecord`]), WeChat Pay's fleet list and the newest daemon version seen.
//!
//! Owns: [`Thresholds`] (configurable, with documented defaults) and [`assess`], a pure function
//! of its inputs and `now`, so every rule is tested on an injected clock. Durations the terminal
//! reported are anchored on the time the proxy received the report, never on the terminal's
//! clock. It must not read clocks, stores or the network.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::record::{ReceivedReport, RiskKind, Severity, TerminalRecord};
use crate::proxy::fleet::FleetStatus;
use crate::units::format_duration;
use crate::wire::{BindingState, HeldState, InspectionResult, StoreHealth};

/// Default: no authinfo issued for longer than this is a risk (the hourly refresh plus margin).
pub const DEFAULT_AUTHINFO_ISSUED_WITHIN: Duration = Duration::from_secs(75 * 60);
/// Default: no request for longer than this is offline.
pub const DEFAULT_OFFLINE_AFTER: Duration = Duration::from_secs(2 * 3600);
/// Default: less authinfo runway than this is a risk.
pub const DEFAULT_RUNWAY_BELOW: Duration = Duration::from_secs(30 * 60);
/// Default: a licence lapsing within this many days is a warning.
pub const DEFAULT_LICENCE_WARNING_DAYS: i64 = 30;
/// Default: a licence lapsing within this many days (or lapsed) is critical.
pub const DEFAULT_LICENCE_CRITICAL_DAYS: i64 = 7;
/// Default: a clock off by more than this is a risk.
pub const DEFAULT_CLOCK_SKEW_ABOVE: Duration = Duration::from_secs(60);

/// The thresholds of the risk rules (`[terminals]` in the proxy's config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub authinfo_issued_within: Duration,
    pub offline_after: Duration,
    pub runway_below: Duration,
    pub licence_warning_days: i64,
    pub licence_critical_days: i64,
    pub clock_skew_above: Duration,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            authinfo_issued_within: DEFAULT_AUTHINFO_ISSUED_WITHIN,
            offline_after: DEFAULT_OFFLINE_AFTER,
            runway_below: DEFAULT_RUNWAY_BELOW,
            licence_warning_days: DEFAULT_LICENCE_WARNING_DAYS,
            licence_critical_days: DEFAULT_LICENCE_CRITICAL_DAYS,
            clock_skew_above: DEFAULT_CLOCK_SKEW_ABOVE,
        }
    }
}

/// One risk a terminal is in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Risk {
    pub risk: RiskKind,
    pub severity: Severity,
    /// What was found, for people (`not seen for 3h5m`).
    pub message: String,
}

impl Risk {
    fn new(risk: RiskKind, severity: Severity, message: String) -> Self {
        Self {
            risk,
            severity,
            message,
        }
    }
}

/// Everything the rules look at for one terminal.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    pub record: Option<&'a TerminalRecord>,
    /// What WeChat Pay's list says (`Unknown` when the fleet check is off or never synced).
    pub fleet: FleetStatus,
    /// The newest daemon version any terminal reports.
    pub newest_version: Option<&'a Version>,
}

/// The risks of a terminal at `now` (Unix seconds, the proxy's clock), worst first.
pub fn assess(facts: Facts<'_>, t: &Thresholds, now: i64) -> Vec<Risk> {
    let mut risks = Vec::new();
    match facts.fleet {
        FleetStatus::Inactivated => risks.push(Risk::new(
            RiskKind::FleetInactivated,
            Severity::Critical,
            "WeChat Pay lists it as not activated: the proxy refuses its authinfo".into(),
        )),
        FleetStatus::Unlisted => risks.push(Risk::new(
            RiskKind::FleetUnlisted,
            Severity::Critical,
            "WeChat Pay does not list it for this merchant: the proxy refuses its authinfo".into(),
        )),
        FleetStatus::Activated | FleetStatus::Unknown => {}
    }
    let record = facts.record.filter(|r| r.last_seen.is_some());
    let Some(record) = record else {
        risks.push(Risk::new(
            RiskKind::NeverSeen,
            Severity::Warning,
            "enrolled, but never seen by this proxy".into(),
        ));
        return sorted(risks);
    };
    let since = |t: i64| Duration::from_secs(u64::try_from(now.saturating_sub(t)).unwrap_or(0));
    if let Some(seen) = record.last_seen {
        let quiet = since(seen);
        if quiet > t.offline_after {
            risks.push(Risk::new(
                RiskKind::Offline,
                Severity::Critical,
                format!("not seen for {}", format_duration(whole_minutes(quiet))),
            ));
        }
    }
    match (record.last_issued, record.first_seen) {
        (Some(issued), _) if since(issued) > t.authinfo_issued_within => risks.push(Risk::new(
            RiskKind::AuthinfoNotIssued,
            Severity::Warning,
            format!(
                "no authinfo issued for {}",
                format_duration(whole_minutes(since(issued)))
            ),
        )),
        (None, Some(first)) if since(first) > t.authinfo_issued_within => risks.push(Risk::new(
            RiskKind::AuthinfoNotIssued,
            Severity::Warning,
            format!(
                "never issued an authinfo (first seen {} ago)",
                format_duration(whole_minutes(since(first)))
            ),
        )),
        _ => {}
    }
    if let Some(received) = &record.report {
        from_report(received, facts.newest_version, t, now, &mut risks);
    }
    sorted(risks)
}

/// The rules that read the terminal's last report.
fn from_report(
    received: &ReceivedReport,
    newest_version: Option<&Version>,
    t: &Thresholds,
    now: i64,
    risks: &mut Vec<Risk>,
) {
    let r = &received.report;
    let elapsed = now.saturating_sub(received.received_at).max(0);
    let runway = r.authinfo.runway_seconds.map(|s| s.saturating_sub(elapsed));
    let runway_below = i64::try_from(t.runway_below.as_secs()).unwrap_or(i64::MAX);
    match (r.authinfo.state, runway) {
        (HeldState::None, _) => risks.push(Risk::new(
            RiskKind::AuthinfoExpiring,
            Severity::Critical,
            "holds no authinfo".into(),
        )),
        (HeldState::Expired, _) => risks.push(Risk::new(
            RiskKind::AuthinfoExpiring,
            Severity::Critical,
            "its authinfo has expired".into(),
        )),
        (_, Some(left)) if left <= 0 => risks.push(Risk::new(
            RiskKind::AuthinfoExpiring,
            Severity::Critical,
            "its authinfo has expired since its last report".into(),
        )),
        (_, Some(left)) if left < runway_below => risks.push(Risk::new(
            RiskKind::AuthinfoExpiring,
            Severity::Warning,
            format!(
                "authinfo runway {} (under {})",
                format_duration(Duration::from_secs(left.unsigned_abs())),
                format_duration(t.runway_below)
            ),
        )),
        _ => {}
    }
    if let Some(day) = &r.licence.value {
        match licence_days_left(day, now) {
            Some(days) if days < 0 => risks.push(Risk::new(
                RiskKind::LicenceExpiring,
                Severity::Critical,
                format!("the face SDK licence lapsed on {day}"),
            )),
            Some(days) if days <= t.licence_critical_days => risks.push(Risk::new(
                RiskKind::LicenceExpiring,
                Severity::Critical,
                format!("the face SDK licence lapses in {days} day(s), on {day}"),
            )),
            Some(days) if days <= t.licence_warning_days => risks.push(Risk::new(
                RiskKind::LicenceExpiring,
                Severity::Warning,
                format!("the face SDK licence lapses in {days} days, on {day}"),
            )),
            Some(_) => {}
            None => risks.push(Risk::new(
                RiskKind::LicenceExpiring,
                Severity::Warning,
                format!("the licence's last day {day:?} does not read as YYYY-MM-DD"),
            )),
        }
    }
    match r.inspection.value {
        Some(InspectionResult::Fail) => risks.push(Risk::new(
            RiskKind::InspectionFailed,
            Severity::Critical,
            "the factory inspection FAILED".into(),
        )),
        Some(InspectionResult::Warn) => risks.push(Risk::new(
            RiskKind::InspectionFailed,
            Severity::Warning,
            "the factory inspection reported warnings".into(),
        )),
        Some(InspectionResult::Success) | None => {}
    }
    if r.alipay_binding.value == Some(BindingState::Unbound) {
        risks.push(Risk::new(
            RiskKind::AlipayUnbound,
            Severity::Warning,
            format!(
                "Alipay does not know the device ({})",
                r.alipay_binding
                    .last_error_code
                    .as_deref()
                    .unwrap_or("no code")
            ),
        ));
    }
    // The proxy's clock against the terminal's when it sent the report (transit makes it look a
    // little behind, never ahead), or what the daemon learned itself, whichever is further off.
    let observed = received.received_at.saturating_sub(r.sent_at);
    let skew = [Some(observed), r.clock_skew_seconds]
        .into_iter()
        .flatten()
        .max_by_key(|s| s.unsigned_abs())
        .unwrap_or(0);
    if skew.unsigned_abs() > t.clock_skew_above.as_secs() {
        let (how, off) = if skew > 0 {
            ("behind", skew.unsigned_abs())
        } else {
            ("ahead of", skew.unsigned_abs())
        };
        risks.push(Risk::new(
            RiskKind::ClockSkew,
            Severity::Warning,
            format!(
                "its clock is {} {how} the proxy's",
                format_duration(Duration::from_secs(off))
            ),
        ));
    }
    if r.store == StoreHealth::NotPersisting {
        risks.push(Risk::new(
            RiskKind::StoreNotPersisting,
            Severity::Warning,
            "its store does not persist: a restart would lose the authinfo".into(),
        ));
    }
    if let (Some(newest), Some(own)) = (newest_version, Version::order(&r.version))
        && own < (newest.numbers, newest.release)
    {
        risks.push(Risk::new(
            RiskKind::OutdatedVersion,
            Severity::Info,
            format!("runs {}; {} is the newest seen", r.version, newest.text),
        ));
    }
}

fn sorted(mut risks: Vec<Risk>) -> Vec<Risk> {
    risks.sort_by(|a, b| b.severity.cmp(&a.severity).then(a.risk.cmp(&b.risk)));
    risks
}

/// `d` less its seconds (3h5m, not 3h5m12s).
fn whole_minutes(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs() / 60 * 60)
}

/// Days from `now`'s UTC date to the licence's last day `day` (`YYYY-MM-DD`), negative once
/// lapsed (the day itself is still valid: 0 days left).
pub fn licence_days_left(day: &str, now: i64) -> Option<i64> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let last = time::Date::parse(day, &format).ok()?;
    let today = time::OffsetDateTime::from_unix_timestamp(now).ok()?.date();
    Some((last - today).whole_days())
}

/// A daemon version as the rules compare them: `MAJOR.MINOR.PATCH` numbers (missing ones are 0),
/// a pre-release (`-rc1`) before its release. Build metadata (`+...`) is ignored.
#[derive(Debug, Clone)]
pub struct Version {
    numbers: [u64; 3],
    release: bool,
    /// As reported.
    pub text: String,
}

impl Version {
    /// `None` for a version that does not read so: it is never called older.
    pub fn parse(text: &str) -> Option<Self> {
        let (numbers, release) = Self::order(text)?;
        Some(Self {
            numbers,
            release,
            text: text.to_owned(),
        })
    }

    /// Where `text` stands among versions (what [`Ord`] compares), without keeping the text:
    /// the fleet view orders every terminal's version and keeps only the newest.
    pub fn order(text: &str) -> Option<([u64; 3], bool)> {
        let core = text.strip_prefix('v').unwrap_or(text);
        let core = core.split('+').next().unwrap_or(core);
        let (core, pre) = match core.split_once('-') {
            Some((c, p)) => (c, Some(p)),
            None => (core, None),
        };
        let mut numbers = [0; 3];
        let mut parts = core.split('.');
        for n in &mut numbers {
            if let Some(part) = parts.next() {
                *n = part.parse().ok()?;
            }
        }
        if parts.next().is_some() {
            return None;
        }
        Some((numbers, pre.is_none()))
    }
}

impl PartialEq for Version {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}

impl Eq for Version {}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.numbers, self.release).cmp(&(other.numbers, other.release))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{CheckState, Report};

    /// 2026-03-01T00:00:00Z, the tests' "now" on the proxy's clock.
    const NOW: i64 = 1_772_323_200;
    const MINUTE: i64 = 60;
    const HOUR: i64 = 3600;
    const DAY: i64 = 86_400;

    /// A terminal seen, issued and reporting a healthy report at `at`, its licence valid until
    /// 2026-12-31.
    fn record_at(at: i64) -> TerminalRecord {
        TerminalRecord {
            first_seen: Some(at - DAY),
            last_seen: Some(at),
            last_issued: Some(at),
            report: Some(ReceivedReport {
                received_at: at,
                report: Report::healthy("1.4.0", at, "2026-12-31"),
            }),
            announced: Vec::new(),
        }
    }

    fn judge(record: Option<&TerminalRecord>, fleet: FleetStatus) -> Vec<(RiskKind, Severity)> {
        judge_with(record, fleet, None, &Thresholds::default())
    }

    fn judge_with(
        record: Option<&TerminalRecord>,
        fleet: FleetStatus,
        newest: Option<&Version>,
        t: &Thresholds,
    ) -> Vec<(RiskKind, Severity)> {
        assess(
            Facts {
                record,
                fleet,
                newest_version: newest,
            },
            t,
            NOW,
        )
        .into_iter()
        .map(|r| (r.risk, r.severity))
        .collect()
    }

    fn with_report(change: impl FnOnce(&mut Report)) -> TerminalRecord {
        let mut r = record_at(NOW);
        if let Some(received) = &mut r.report {
            change(&mut received.report);
        }
        r
    }

    #[test]
    fn a_healthy_terminal_seen_and_issued_just_now_is_in_no_risk() {
        assert_eq!(judge(Some(&record_at(NOW)), FleetStatus::Activated), []);
        assert_eq!(judge(Some(&record_at(NOW)), FleetStatus::Unknown), []);
    }

    #[test]
    fn an_enrolled_terminal_never_seen_is_a_warning_and_nothing_else() {
        use RiskKind as K;
        assert_eq!(
            judge(None, FleetStatus::Activated),
            [(K::NeverSeen, Severity::Warning)]
        );
        assert_eq!(
            judge(Some(&TerminalRecord::default()), FleetStatus::Unknown),
            [(K::NeverSeen, Severity::Warning)]
        );
    }

    #[test]
    fn no_authinfo_issued_for_more_than_1h15m_is_a_warning() {
        let mut r = record_at(NOW);
        r.last_issued = Some(NOW - 75 * MINUTE);
        assert_eq!(
            judge(Some(&r), FleetStatus::Activated),
            [],
            "75 min is the edge"
        );
        r.last_issued = Some(NOW - 75 * MINUTE - 1);
        assert_eq!(
            judge(Some(&r), FleetStatus::Activated),
            [(RiskKind::AuthinfoNotIssued, Severity::Warning)]
        );
        // Never issued: counted from its first request.
        r.last_issued = None;
        r.first_seen = Some(NOW - 2 * HOUR);
        assert_eq!(
            judge(Some(&r), FleetStatus::Activated),
            [(RiskKind::AuthinfoNotIssued, Severity::Warning)]
        );
        r.first_seen = Some(NOW - 10 * MINUTE);
        assert_eq!(judge(Some(&r), FleetStatus::Activated), []);
    }

    #[test]
    fn not_seen_for_two_hours_is_offline_and_critical() {
        let mut r = record_at(NOW - 2 * HOUR);
        r.last_seen = Some(NOW - 2 * HOUR);
        let risks = judge(Some(&r), FleetStatus::Activated);
        assert!(
            !risks.iter().any(|(k, _)| *k == RiskKind::Offline),
            "{risks:?}"
        );
        r.last_seen = Some(NOW - 2 * HOUR - 1);
        let risks = judge(Some(&r), FleetStatus::Activated);
        assert_eq!(
            risks[0],
            (RiskKind::Offline, Severity::Critical),
            "{risks:?}"
        );
    }

    #[test]
    fn an_expired_missing_or_short_authinfo_is_a_risk_anchored_on_the_proxys_clock() {
        use RiskKind::AuthinfoExpiring as E;
        let r = with_report(|r| r.authinfo.state = HeldState::Expired);
        assert_eq!(
            judge(Some(&r), FleetStatus::Activated),
            [(E, Severity::Critical)]
        );
        let r = with_report(|r| r.authinfo.state = HeldState::None);
        assert_eq!(
            judge(Some(&r), FleetStatus::Activated),
            [(E, Severity::Critical)]
        );
        let r = with_report(|r| r.authinfo.runway_seconds = Some(29 * MINUTE));
        assert_eq!(
            judge(Some(&r), FleetStatus::Activated),
            [(E, Severity::Warning)]
        );
        let r = with_report(|r| r.authinfo.runway_seconds = Some(30 * MINUTE));
        assert_eq!(judge(Some(&r), FleetStatus::Activated), []);
        // 40 minutes of runway reported 20 minutes ago: 20 left now, whatever the
        // terminal's clock said when it sent it.
        let mut r = record_at(NOW);
        if let Some(received) = &mut r.report {
            received.received_at = NOW - 20 * MINUTE;
            received.report.sent_at = NOW - 20 * MINUTE;
            received.report.authinfo.runway_seconds = Some(40 * MINUTE);
        }
        assert_eq!(
            judge(Some(&r), FleetStatus::Activated),
            [(E, Severity::Warning)]
        );
        if let Some(received) = &mut r.report {
            received.received_at = NOW - 41 * MINUTE;
            received.report.sent_at = NOW - 41 * MINUTE;
        }
        assert_eq!(
            judge(Some(&r), FleetStatus::Activated),
            [(E, Severity::Critical)]
        );
    }

    #[test]
    fn a_licence_within_30_days_warns_within_7_days_or_lapsed_is_critical() {
        use RiskKind::LicenceExpiring as L;
        // NOW is 2026-03-01.
        for (day, expected) in [
            ("2026-04-01", vec![]),
            ("2026-03-31", vec![(L, Severity::Warning)]),
            ("2026-03-09", vec![(L, Severity::Warning)]),
            ("2026-03-08", vec![(L, Severity::Critical)]),
            ("2026-03-01", vec![(L, Severity::Critical)]),
            ("2026-02-28", vec![(L, Severity::Critical)]),
            ("not a day", vec![(L, Severity::Warning)]),
        ] {
            let r = with_report(|r| r.licence.value = Some(day.into()));
            assert_eq!(judge(Some(&r), FleetStatus::Activated), expected, "{day}");
        }
        // Thresholds are the config's.
        let t = Thresholds {
            licence_warning_days: 60,
            licence_critical_days: 40,
            ..Thresholds::default()
        };
        let r = with_report(|r| r.licence.value = Some("2026-04-01".into()));
        assert_eq!(
            judge_with(Some(&r), FleetStatus::Activated, None, &t),
            [(L, Severity::Critical)]
        );
    }

    #[test]
    fn inspection_warn_is_a_warning_and_fail_is_critical() {
        let r = with_report(|r| r.inspection.value = Some(InspectionResult::Warn));
        assert_eq!(
            judge(Some(&r), FleetStatus::Activated),
            [(RiskKind::InspectionFailed, Severity::Warning)]
        );
        let r = with_report(|r| r.inspection.value = Some(InspectionResult::Fail));
        assert_eq!(
            judge(Some(&r), FleetStatus::Activated),
            [(RiskKind::InspectionFailed, Severity::Critical)]
        );
    }

    #[test]
    fn not_bound_on_alipay_is_a_warning() {
        let r = with_report(|r| {
            r.alipay_binding.state = CheckState::Error;
            r.alipay_binding.value = Some(BindingState::Unbound);
            r.alipay_binding.last_error_code = Some("DEVICE_NOT_EXIST".into());
        });
        assert_eq!(
            judge(Some(&r), FleetStatus::Activated),
            [(RiskKind::AlipayUnbound, Severity::Warning)]
        );
    }

    #[test]
    fn a_clock_off_by_more_than_60_s_is_a_warning_either_way() {
        use RiskKind::ClockSkew as C;
        let r = with_report(|r| r.sent_at = NOW - 60);
        assert_eq!(judge(Some(&r), FleetStatus::Activated), []);
        let r = with_report(|r| r.sent_at = NOW - 61);
        assert_eq!(
            judge(Some(&r), FleetStatus::Activated),
            [(C, Severity::Warning)]
        );
        let r = with_report(|r| r.sent_at = NOW + 3600);
        assert_eq!(
            judge(Some(&r), FleetStatus::Activated),
            [(C, Severity::Warning)]
        );
        // What the daemon learned itself counts too.
        let r = with_report(|r| r.clock_skew_seconds = Some(-120));
        assert_eq!(
            judge(Some(&r), FleetStatus::Activated),
            [(C, Severity::Warning)]
        );
    }

    #[test]
    fn a_store_not_persisting_is_a_warning() {
        let r = with_report(|r| r.store = StoreHealth::NotPersisting);
        assert_eq!(
            judge(Some(&r), FleetStatus::Activated),
            [(RiskKind::StoreNotPersisting, Severity::Warning)]
        );
        let r = with_report(|r| r.store = StoreHealth::Recovered);
        assert_eq!(judge(Some(&r), FleetStatus::Activated), []);
    }

    #[test]
    fn inactivated_or_unlisted_in_wechat_pays_fleet_list_is_critical() {
        let r = record_at(NOW);
        assert_eq!(
            judge(Some(&r), FleetStatus::Inactivated),
            [(RiskKind::FleetInactivated, Severity::Critical)]
        );
        assert_eq!(
            judge(None, FleetStatus::Unlisted),
            [
                (RiskKind::FleetUnlisted, Severity::Critical),
                (RiskKind::NeverSeen, Severity::Warning)
            ]
        );
    }

    #[test]
    fn an_older_daemon_than_the_newest_seen_is_info() {
        let newest = Version::parse("1.5.0").expect("version");
        let r = record_at(NOW);
        assert_eq!(
            judge_with(
                Some(&r),
                FleetStatus::Activated,
                Some(&newest),
                &Thresholds::default()
            ),
            [(RiskKind::OutdatedVersion, Severity::Info)]
        );
        let same = Version::parse("1.4.0").expect("version");
        assert_eq!(
            judge_with(
                Some(&r),
                FleetStatus::Activated,
                Some(&same),
                &Thresholds::default()
            ),
            []
        );
    }

    #[test]
    fn versions_compare_by_number_with_a_pre_release_before_its_release() {
        let v = |t| Version::parse(t).expect(t);
        assert!(v("1.10.0") > v("1.9.9"));
        assert!(v("1.4.0-rc1") < v("1.4.0"));
        assert!(v("v1.4") == v("1.4.0+build7"));
        assert!(Version::parse("<script>").is_none());
        assert!(Version::parse("1.2.3.4").is_none());
    }

    #[test]
    fn risks_are_sorted_worst_first() {
        let mut r = with_report(|r| {
            r.inspection.value = Some(InspectionResult::Warn);
            r.licence.value = Some("2026-03-02".into());
        });
        r.last_seen = Some(NOW - 3 * HOUR);
        let risks = judge(Some(&r), FleetStatus::Activated);
        let severities: Vec<Severity> = risks.iter().map(|(_, s)| *s).collect();
        let mut sorted = severities.clone();
        sorted.sort_by(|a, b| b.cmp(a));
        assert_eq!(severities, sorted, "{risks:?}");
        assert_eq!(risks.len(), 3, "{risks:?}");
    }
}
