//! The fleet view: which terminals will stop taking payments, from what the proxy knows of each
//! enrolled terminal (its last report, when it was last seen, when it was last issued an
//! authinfo) and WeChat Pay's fleet list.
//!
//! - [`record`]: the per-terminal record and the vocabulary of risks, as data.
//! - [`records`]: where records live ([`records::TerminalRecords`]; sled now, Redis for replicas).
//! - [`risk`]: the rules, pure functions of (record, fleet list, thresholds, now).
//! - [`doc`]: the JSON documents of `GET /terminals` and the `terminals` command's table.
//! - [`dashboard`]: the admin listener's HTML page.
//!
//! Owns: [`FleetHealth`], the hub the routes call (a request seen, an authinfo issued, a report),
//! [`evaluate`] (every enrolled terminal judged at one `now`, worst first), the journal lines
//! when a terminal enters or leaves a risk, the Prometheus series, and the loop that judges the
//! fleet and flushes the records ([`run`]). It must not answer HTTP: the server does.

pub mod dashboard;
pub mod doc;
pub mod record;
pub mod records;
pub mod risk;

use std::cmp::Reverse;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use self::record::{Announced, ReceivedReport, RiskKind, Severity, TerminalRecord};
use self::records::TerminalRecords;
use self::risk::{Facts, Risk, Thresholds, Version};
use super::fleet::{Clock, FleetSnapshot, FleetStatus};
use super::registry::{Device, Registry};
use super::store::StoreError;
use crate::prometheus::Text;
use crate::wire;

/// How often the loop judges the fleet (journal lines for risks entered and left) and flushes
/// the records.
pub const EVALUATE_EVERY: Duration = Duration::from_secs(15);
/// The most risk transitions logged one by one in one pass; the rest are counted in one line
/// (a first start with thousands of never-seen terminals must not flood the journal).
pub const MAX_TRANSITIONS_LOGGED: usize = 100;
/// Largest report body the proxy reads (a report is under 2 KiB; the texts in it are bounded by
/// [`wire::MAX_REPORT_TEXT`]).
pub const MAX_REPORT_BODY: usize = 8 * 1024;
/// Reports a terminal may send in a burst ([`ReportLimiter`]): a start's refresh and health
/// checks, a few retries.
pub const REPORT_BURST: u32 = 10;
/// One more report is admitted every this long once the burst is spent (a daemon sends one
/// every 15 minutes, plus one after each refresh attempt and health check, coalesced).
pub const REPORT_REFILL: Duration = Duration::from_secs(10);
/// Upper bounds (seconds) of the report age histogram.
const REPORT_AGE_BUCKETS: [u64; 9] = [60, 300, 900, 1800, 3600, 7200, 21600, 86400, 604800];

/// One terminal as the fleet view sees it at one `now`.
#[derive(Debug, Clone)]
pub struct Assessed {
    pub device: Arc<Device>,
    pub record: Option<Arc<TerminalRecord>>,
    pub fleet: FleetStatus,
    /// The device class WeChat Pay lists.
    pub class: Option<String>,
    /// The sub-merchant's short name WeChat Pay lists.
    pub merchant: Option<String>,
    /// Worst first.
    pub risks: Vec<Risk>,
}

impl Assessed {
    /// The severity of its worst risk.
    pub fn worst(&self) -> Option<Severity> {
        self.risks.iter().map(|r| r.severity).max()
    }

    /// In a risk of warning or worse.
    pub fn at_risk(&self) -> bool {
        self.worst().is_some_and(|s| s >= Severity::Warning)
    }
}

/// Every enrolled terminal judged at `now`, worst first.
#[derive(Debug, Clone)]
pub struct FleetView {
    pub now: i64,
    /// The thresholds the risks were judged with.
    pub thresholds: Thresholds,
    pub terminals: Vec<Assessed>,
    pub newest_version: Option<Version>,
}

impl FleetView {
    pub fn get(&self, device_id: &str) -> Option<&Assessed> {
        self.terminals
            .iter()
            .find(|t| t.device.device_id == device_id)
    }
}

/// Judges every device `registry` enrolls at `now`: with its record from `records`, what
/// `fleet` (when the fleet check is on) lists of it, and the newest version any record reports.
pub fn evaluate(
    registry: &Registry,
    fleet: Option<&FleetSnapshot>,
    records: &records::Snapshot,
    thresholds: &Thresholds,
    now: i64,
) -> FleetView {
    let index = fleet.map(FleetSnapshot::index);
    // Each enrolled device with its record, looked up once (a record of a device no longer
    // enrolled is not in the view, nor its version).
    let enrolled: Vec<(&Arc<Device>, Option<&Arc<TerminalRecord>>)> = registry
        .devices()
        .map(|device| (device, records.get(device.device_id.as_str())))
        .collect();
    let newest_version = enrolled
        .iter()
        .filter_map(|(_, r)| {
            let text = &r.as_ref()?.report.as_ref()?.report.version;
            Some((Version::order(text)?, text))
        })
        .max_by_key(|(order, _)| *order)
        .and_then(|(_, text)| Version::parse(text));
    let mut terminals: Vec<Assessed> = enrolled
        .into_iter()
        .map(|(device, record)| {
            let record = record.cloned();
            let listed = index.as_ref().and_then(|i| i.device(&device.device_sn));
            let fleet = index
                .as_ref()
                .map_or(FleetStatus::Unknown, |i| i.status(&device.device_sn));
            let risks = risk::assess(
                Facts {
                    record: record.as_deref(),
                    fleet,
                    newest_version: newest_version.as_ref(),
                },
                thresholds,
                now,
            );
            Assessed {
                device: device.clone(),
                record,
                fleet,
                class: listed.and_then(|d| d.device_class.clone()),
                merchant: listed.and_then(|d| {
                    d.sub_merchant_shortname
                        .clone()
                        .or_else(|| d.merchant_shortname.clone())
                }),
                risks,
            }
        })
        .collect();
    // Worst first, then most risks first; the sort is stable and the registry yields devices
    // by device_id, so ties stay in device_id order without comparing ids (comparing 100 000
    // ids was most of the sort).
    terminals.sort_by_key(|t| (Reverse(t.worst()), Reverse(t.risks.len())));
    FleetView {
        now,
        thresholds: *thresholds,
        terminals,
        newest_version,
    }
}

// === report admission ===

/// Bounds each terminal's report rate: a token bucket of [`REPORT_BURST`] per device, one
/// token back every [`REPORT_REFILL`], on tokio's (monotonic) clock. Only devices that passed
/// authentication reach it, so it holds at most one entry per enrolled device.
#[derive(Debug)]
pub struct ReportLimiter {
    buckets: std::sync::Mutex<HashMap<String, (u32, tokio::time::Instant)>>,
    burst: u32,
    refill: Duration,
}

impl Default for ReportLimiter {
    fn default() -> Self {
        Self::new(REPORT_BURST, REPORT_REFILL)
    }
}

impl ReportLimiter {
    pub fn new(burst: u32, refill: Duration) -> Self {
        Self {
            buckets: std::sync::Mutex::new(HashMap::new()),
            burst: burst.max(1),
            refill: refill.max(Duration::from_millis(1)),
        }
    }

    /// Takes a token for `device_id`; `Err(wait)` when none is left, with how long until one is.
    pub fn admit(&self, device_id: &str) -> Result<(), Duration> {
        let now = tokio::time::Instant::now();
        let mut buckets = crate::sync::lock(&self.buckets);
        let (tokens, since) = buckets
            .entry(device_id.to_owned())
            .or_insert((self.burst, now));
        let earned = now.duration_since(*since).as_nanos() / self.refill.as_nanos();
        if earned > 0 {
            let earned = u32::try_from(earned).unwrap_or(u32::MAX);
            *tokens = tokens.saturating_add(earned).min(self.burst);
            // Keep the fraction of a refill already under way.
            *since = if *tokens == self.burst {
                now
            } else {
                *since + self.refill * earned
            };
        }
        if *tokens == 0 {
            return Err(self.refill.saturating_sub(now.duration_since(*since)));
        }
        *tokens -= 1;
        Ok(())
    }

    /// Forgets devices `enrolled` says no (the registry changed).
    pub fn retain(&self, enrolled: impl Fn(&str) -> bool) {
        crate::sync::lock(&self.buckets).retain(|id, _| enrolled(id));
    }
}

/// From this many enrolled terminals on, a request reads the latest judged view when it is
/// younger than [`EVALUATE_EVERY`] instead of judging the fleet itself. Judging is linear in
/// the fleet (about 150-200 ms for 100 000 terminals on one core, README "Fleet health"); below
/// this it costs a few milliseconds and every request is judged afresh, so a report shows at
/// once.
pub const REUSE_VIEW_FROM: usize = 10_000;

/// The fleet view's hub: records what the routes see and judges the fleet on demand.
pub struct FleetHealth {
    records: Arc<dyn TerminalRecords>,
    pub thresholds: Thresholds,
    clock: Clock,
    /// The latest view and what it was judged from. A tokio lock held while judging: requests
    /// that arrive meanwhile wait for that view rather than judging the fleet again each.
    latest: tokio::sync::Mutex<Option<Judged>>,
}

/// A view with the inputs it was judged from.
struct Judged {
    view: Arc<FleetView>,
    registry: Arc<Registry>,
    fleet: Option<Arc<FleetSnapshot>>,
}

impl Judged {
    /// Judged from these inputs, and young enough to stand for a view of `now`.
    fn serves(
        &self,
        registry: &Arc<Registry>,
        fleet: Option<&Arc<FleetSnapshot>>,
        now: i64,
    ) -> bool {
        let age = now.saturating_sub(self.view.now);
        registry.len() >= REUSE_VIEW_FROM
            && Arc::ptr_eq(&self.registry, registry)
            && match (&self.fleet, fleet) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
            && (0..i64::try_from(EVALUATE_EVERY.as_secs()).unwrap_or(i64::MAX)).contains(&age)
    }
}

impl std::fmt::Debug for FleetHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetHealth")
            .field("records", &self.records)
            .field("thresholds", &self.thresholds)
            .finish_non_exhaustive()
    }
}

impl FleetHealth {
    pub fn new(records: Arc<dyn TerminalRecords>, thresholds: Thresholds, clock: Clock) -> Self {
        Self {
            records,
            thresholds,
            clock,
            latest: tokio::sync::Mutex::new(None),
        }
    }

    /// Unix seconds now, on the fleet view's clock.
    pub fn now(&self) -> i64 {
        (self.clock)()
    }

    pub fn records(&self) -> &dyn TerminalRecords {
        &*self.records
    }

    /// An authenticated request from `device_id`. A failure to record it is logged, never
    /// passed to the terminal: the fleet view must not cost a terminal its answer.
    pub async fn seen(&self, device_id: &str) {
        if let Err(error) = self.records.seen(device_id, self.now()).await {
            tracing::warn!(device_id, error = %crate::error_chain(&error), "cannot record the terminal as seen");
        }
    }

    /// This proxy handed `device_id` an authinfo (logged, never passed on, when it fails).
    pub async fn issued(&self, device_id: &str) {
        if let Err(error) = self.records.issued(device_id, self.now()).await {
            tracing::warn!(device_id, error = %crate::error_chain(&error), "cannot record the authinfo issued to the terminal");
        }
    }

    /// Keeps `device_id`'s report; returns when it was received.
    pub async fn report(&self, device_id: &str, report: wire::Report) -> Result<i64, StoreError> {
        let received_at = self.now();
        self.records
            .report(
                device_id,
                ReceivedReport {
                    received_at,
                    report,
                },
            )
            .await?;
        Ok(received_at)
    }

    /// Every terminal `registry` enrolls, judged now; for a fleet of [`REUSE_VIEW_FROM`] or
    /// more, the latest view when it was judged from the same registry and fleet list less
    /// than [`EVALUATE_EVERY`] ago.
    pub async fn view(
        &self,
        registry: &Arc<Registry>,
        fleet: Option<&Arc<FleetSnapshot>>,
    ) -> Result<Arc<FleetView>, StoreError> {
        self.judge(registry, fleet, true).await
    }

    /// Drops the latest view: the next request judges the fleet (benchmarks).
    pub async fn forget_view(&self) {
        *self.latest.lock().await = None;
    }

    /// Judges the fleet (`reuse`: unless the latest view serves) and keeps the view for the
    /// requests that follow.
    async fn judge(
        &self,
        registry: &Arc<Registry>,
        fleet: Option<&Arc<FleetSnapshot>>,
        reuse: bool,
    ) -> Result<Arc<FleetView>, StoreError> {
        let mut latest = self.latest.lock().await;
        if let Some(judged) = latest
            .as_ref()
            .filter(|j| reuse && j.serves(registry, fleet, self.now()))
        {
            return Ok(judged.view.clone());
        }
        let records = self.records.snapshot().await?;
        let view = Arc::new(evaluate(
            registry,
            fleet.map(|f| &**f),
            &records,
            &self.thresholds,
            self.now(),
        ));
        *latest = Some(Judged {
            view: view.clone(),
            registry: registry.clone(),
            fleet: fleet.cloned(),
        });
        Ok(view)
    }

    /// Logs each terminal's risks entered, left or changed in severity since they were last
    /// announced (one line each, at most [`MAX_TRANSITIONS_LOGGED`] a pass and a count of the
    /// rest), and records what was announced. Returns the number of transitions.
    pub async fn announce(&self, view: &FleetView) -> Result<usize, StoreError> {
        let mut transitions = 0;
        for t in &view.terminals {
            let now: Vec<Announced> = t
                .risks
                .iter()
                .map(|r| Announced {
                    risk: r.risk,
                    severity: r.severity,
                })
                .collect();
            let before = t.record.as_deref().map_or(&[][..], |r| &r.announced[..]);
            if now == before {
                continue;
            }
            let device_id = t.device.device_id.as_str();
            for risk in &t.risks {
                let was = before.iter().find(|a| a.risk == risk.risk);
                if was.is_some_and(|a| a.severity == risk.severity) {
                    continue;
                }
                transitions += 1;
                if transitions <= MAX_TRANSITIONS_LOGGED {
                    log_entered(device_id, risk, was.map(|a| a.severity));
                }
            }
            for gone in before
                .iter()
                .filter(|a| !t.risks.iter().any(|r| r.risk == a.risk))
            {
                transitions += 1;
                if transitions <= MAX_TRANSITIONS_LOGGED {
                    tracing::info!(
                        message_id = crate::events::TERMINAL_RISK_CLEARED,
                        device_id,
                        risk = gone.risk.as_str(),
                        severity = gone.severity.as_str(),
                        "terminal left a risk"
                    );
                }
            }
            self.records.announce(device_id, now).await?;
        }
        if transitions > MAX_TRANSITIONS_LOGGED {
            tracing::warn!(
                message_id = crate::events::TERMINAL_AT_RISK,
                transitions,
                not_logged = transitions - MAX_TRANSITIONS_LOGGED,
                "more terminals entered or left risks than are logged one by one; GET /terminals on the admin listener lists them"
            );
        }
        Ok(transitions)
    }
}

fn log_entered(device_id: &str, risk: &Risk, was: Option<Severity>) {
    let (id, risk_name, severity, message) = (
        crate::events::TERMINAL_AT_RISK,
        risk.risk.as_str(),
        risk.severity.as_str(),
        risk.message.as_str(),
    );
    let previous = was.map(Severity::as_str);
    // `tracing::event!` takes its level as a constant: one call per severity, the same fields.
    macro_rules! entered {
        ($level:expr) => {
            tracing::event!(
                $level,
                message_id = id,
                device_id,
                risk = risk_name,
                severity,
                previous_severity = previous,
                detail = message,
                "terminal entered a risk"
            )
        };
    }
    match risk.severity {
        Severity::Critical => entered!(tracing::Level::ERROR),
        Severity::Warning => entered!(tracing::Level::WARN),
        Severity::Info => entered!(tracing::Level::INFO),
    }
}

/// The fleet view's series for `/metrics`: terminals by risk and severity, by worst severity,
/// and the distribution of report ages. No per-device label: the cardinality is that of the
/// risk vocabulary, whatever the fleet's size.
pub fn render_metrics(view: &FleetView) -> String {
    let mut counts: HashMap<(RiskKind, Severity), u64> = HashMap::new();
    let mut worst: HashMap<Severity, u64> = HashMap::new();
    let mut ages = Vec::new();
    for t in &view.terminals {
        for r in &t.risks {
            *counts.entry((r.risk, r.severity)).or_default() += 1;
        }
        if let Some(w) = t.worst() {
            *worst.entry(w).or_default() += 1;
        }
        if let Some(received) = t.record.as_ref().and_then(|r| r.report.as_ref()) {
            ages.push(u64::try_from(view.now.saturating_sub(received.received_at)).unwrap_or(0));
        }
    }
    let mut text = Text::default();
    text.single(
        "authinfo_proxy_terminals_enrolled",
        "gauge",
        "Terminals enrolled in the registry (the fleet view's terminals).",
        view.terminals.len(),
    );
    text.labelled(
        "authinfo_proxy_terminals",
        "gauge",
        "Terminals in each risk, by the risk's severity (a terminal counts once per risk it is in).",
        &["risk", "severity"],
        RiskKind::ALL.into_iter().flat_map(|kind| {
            Severity::ALL.map(|severity| {
                let n = counts.get(&(kind, severity)).copied().unwrap_or(0);
                ((kind.as_str(), severity.as_str()), n)
            })
        }),
    );
    text.labelled(
        "authinfo_proxy_terminals_at_risk",
        "gauge",
        "Terminals by the severity of their worst risk.",
        &["severity"],
        Severity::ALL.map(|s| (s.as_str(), worst.get(&s).copied().unwrap_or(0))),
    );
    let name = "authinfo_proxy_terminal_report_age_seconds";
    text.family(
        name,
        "histogram",
        "Age of each terminal's last report, now (terminals that never reported are not counted).",
    );
    let bucket = format!("{name}_bucket");
    for bound in REPORT_AGE_BUCKETS {
        let n = ages.iter().filter(|a| **a <= bound).count();
        text.sample(&bucket, &[("le", &bound)], n);
    }
    text.sample(&bucket, &[("le", &"+Inf")], ages.len());
    text.sample(&format!("{name}_sum"), &[], ages.iter().sum::<u64>());
    text.sample(&format!("{name}_count"), &[], ages.len());
    text.finish()
}

/// What the loop reads each pass: the registry now, and the fleet list when the fleet check is
/// on.
pub type Inputs = Box<dyn Fn() -> (Arc<Registry>, Option<Arc<FleetSnapshot>>) + Send + Sync>;

/// Every [`EVALUATE_EVERY`] until `shutdown`: drops the records of devices no longer enrolled
/// (when the registry changed), judges the fleet, logs the risks entered and left, and flushes
/// the records; flushes once more at the end.
pub async fn run(health: Arc<FleetHealth>, inputs: Inputs, shutdown: CancellationToken) {
    let mut last_registry: Option<Arc<Registry>> = None;
    loop {
        let (registry, fleet) = inputs();
        if last_registry
            .as_ref()
            .is_none_or(|r| !Arc::ptr_eq(r, &registry))
        {
            let enrolled = |id: &str| registry.get(id).is_some();
            match health.records.retain(&enrolled).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    records = n,
                    "dropped the fleet view's records of devices no longer enrolled"
                ),
                Err(error) => {
                    tracing::warn!(error = %crate::error_chain(&error), "cannot drop the records of devices no longer enrolled")
                }
            }
            last_registry = Some(registry.clone());
        }
        let pass = async {
            // Always judged afresh: the risks announced must be judged from the records as
            // they are now (a reused view's records predate the last announcement).
            let view = health.judge(&registry, fleet.as_ref(), false).await?;
            health.announce(&view).await?;
            health.records.flush().await
        };
        if let Err(error) = pass.await {
            tracing::warn!(error = %crate::error_chain(&error), "the fleet view's pass failed; retrying on the next");
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(EVALUATE_EVERY) => {}
        }
    }
    if let Err(error) = health.records.flush().await {
        tracing::error!(error = %crate::error_chain(&error), "cannot flush the fleet view's records at shutdown; the last reports are lost (terminals send them again)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A burst is admitted, then one report per refill; the wait is told.
    #[tokio::test(start_paused = true)]
    async fn reports_beyond_the_burst_wait_for_the_refill() {
        let limiter = ReportLimiter::new(3, Duration::from_secs(10));
        for _ in 0..3 {
            assert_eq!(limiter.admit("T-1"), Ok(()));
        }
        let wait = limiter.admit("T-1").expect_err("the burst is spent");
        assert!(
            wait > Duration::from_secs(9) && wait <= Duration::from_secs(10),
            "{wait:?}"
        );
        assert_eq!(
            limiter.admit("T-2"),
            Ok(()),
            "each device has its own bucket"
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(limiter.admit("T-1"), Ok(()));
        assert!(limiter.admit("T-1").is_err(), "one token per refill");
        tokio::time::advance(Duration::from_secs(3600)).await;
        for _ in 0..3 {
            assert_eq!(limiter.admit("T-1"), Ok(()));
        }
        assert!(
            limiter.admit("T-1").is_err(),
            "the bucket never holds more than the burst"
        );
        limiter.retain(|id| id == "T-2");
        assert_eq!(crate::sync::lock(&limiter.buckets).len(), 1);
    }
}

#[cfg(test)]
mod view_reuse_tests {
    use std::sync::atomic::{AtomicI64, Ordering};

    use super::records::StoredRecords;
    use super::*;
    use crate::crypto::RsaVerifier;
    use crate::proxy::store::Store;

    fn registry(devices: usize) -> Arc<Registry> {
        let key = crate::crypto::test_key(0);
        let public_key = RsaVerifier::from_pem(&key.public.to_pem(), "test").expect("public");
        Arc::new(Registry::from_devices((0..devices).map(|i| Device {
            device_id: format!("T-{i:05}"),
            public_key: public_key.clone(),
            device_sn: format!("SN{i:05}"),
            authinfo_device_id: format!("T-{i:05}"),
            sub_mchid: "1900000109".into(),
            sub_appid: "wx0000000000000000".into(),
            organization_id: "org".into(),
            alipay: None,
            aliyun: None,
        })))
    }

    fn report(at: i64) -> wire::Report {
        wire::Report::healthy("1.4.0", at, "2030-01-01")
    }

    /// A small fleet is judged on every request (a report shows at once); a large one reuses
    /// the latest view of the same registry and fleet list while it is younger than the loop's
    /// interval, and never across a registry change; the loop always judges afresh.
    #[tokio::test]
    async fn a_large_fleets_view_is_reused_within_the_loops_interval_and_a_small_one_never() {
        let dir = tempfile::tempdir().expect("tempdir");
        let records = StoredRecords::open(Store::open(dir.path()).expect("store")).expect("open");
        let now = Arc::new(AtomicI64::new(1_000_000));
        let clock: Clock = {
            let now = now.clone();
            Arc::new(move || now.load(Ordering::SeqCst))
        };
        let health = FleetHealth::new(Arc::new(records), Thresholds::default(), clock);
        let never_seen = |view: &FleetView, id: &str| {
            view.get(id)
                .expect("enrolled")
                .risks
                .iter()
                .any(|r| r.risk == RiskKind::NeverSeen)
        };

        let small = registry(3);
        let first = health.view(&small, None).await.expect("view");
        assert!(never_seen(&first, "T-00001"));
        health
            .report("T-00001", report(1_000_000))
            .await
            .expect("report");
        let second = health.view(&small, None).await.expect("view");
        assert!(
            !Arc::ptr_eq(&first, &second),
            "a small fleet is judged again"
        );
        assert!(!never_seen(&second, "T-00001"), "the report shows at once");

        let large = registry(REUSE_VIEW_FROM);
        let first = health.view(&large, None).await.expect("view");
        assert!(never_seen(&first, "T-00002"));
        health
            .report("T-00002", report(1_000_000))
            .await
            .expect("report");
        now.fetch_add(14, Ordering::SeqCst);
        let reused = health.view(&large, None).await.expect("view");
        assert!(
            Arc::ptr_eq(&first, &reused),
            "14 s later the view is reused"
        );
        let judged = health.judge(&large, None, false).await.expect("judge");
        assert!(!Arc::ptr_eq(&first, &judged), "the loop judges afresh");
        assert!(!never_seen(&judged, "T-00002"));
        assert!(
            Arc::ptr_eq(&judged, &health.view(&large, None).await.expect("view")),
            "requests reuse what the loop judged"
        );
        now.fetch_add(15, Ordering::SeqCst);
        let aged = health.view(&large, None).await.expect("view");
        assert!(!Arc::ptr_eq(&judged, &aged), "15 s old is judged again");
        let replaced = registry(REUSE_VIEW_FROM);
        let other = health.view(&replaced, None).await.expect("view");
        assert!(
            !Arc::ptr_eq(&aged, &other),
            "another registry is judged again"
        );
        now.fetch_sub(60, Ordering::SeqCst);
        let back = health.view(&replaced, None).await.expect("view");
        assert!(
            !Arc::ptr_eq(&other, &back),
            "a clock set back is judged again"
        );
    }
}

#[cfg(test)]
mod alert_rules_tests {
    use super::*;

    const RULES: &str = include_str!("../../../examples/authinfo-proxy-alerts.yml");

    /// The example alerting rules name only series the fleet view exports, and `promtool check
    /// rules` accepts them (promtool comes with Debian's prometheus, scripts/setup).
    #[test]
    fn the_example_alert_rules_use_real_series_and_pass_promtool() {
        let view = FleetView {
            now: 0,
            thresholds: Thresholds::default(),
            terminals: Vec::new(),
            newest_version: None,
        };
        let text = render_metrics(&view);
        let mut names = 0;
        for word in RULES.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("authinfo_proxy_") {
                names += 1;
                assert!(
                    text.lines().any(|l| l.starts_with(word)),
                    "{word} is not a series of render_metrics:\n{text}"
                );
            }
        }
        assert!(names >= 7, "the rules use the fleet series");
        let out = std::process::Command::new("promtool")
            .args(["check", "rules"])
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/examples/authinfo-proxy-alerts.yml"
            ))
            .output()
            .expect("promtool must be installed (scripts/setup)");
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
