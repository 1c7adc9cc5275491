//! Simulated terminals for `authinfo-proxy sandbox --simulate-terminals N`: enrolled devices
//! that fetch authinfos from and report to a real proxy, each pretending one of the troubles the
//! fleet view looks for (a licence lapsing, a failed inspection, a wrong clock, silence...), so
//! the dashboard and `authinfo-proxy terminals` can be tried without a fleet.
//!
//! Owns: the simulated devices (ids, serials, keys, the trouble each pretends, [`Profile`]) and
//! the loop that sends their calls ([`run`]) through the daemon's own device-signed client
//! ([`ProxyClient`]). It must not reach into the proxy: it is a client, like a fleet of daemons.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::crypto::{self, CryptoError, GeneratedKey, RsaSigner};
use crate::platform::aliyun::format_day;
use crate::terminal::proxy_client::{ProxyClient, Upstream as _, UpstreamError};
use crate::units::{rfc3339, unix_now};
use crate::wire::auth::DeviceSigner;
use crate::wire::{BindingState, CheckState, HeldState, InspectionResult, Report, StoreHealth};

/// The most terminals the sandbox simulates (each needs its own RSA-2048 key, made at start).
pub const MAX_SIMULATED_TERMINALS: usize = 200;
/// How often every simulated terminal reports: well within the proxy's offline threshold (2 h)
/// and its report rate limit.
pub const ROUND_EVERY: Duration = Duration::from_secs(5 * 60);
/// How often the simulator tries again while the proxy does not answer.
pub const WAIT_RETRY: Duration = Duration::from_secs(2);
/// A simulated terminal fetches a new authinfo when its held one is this old (the daemon's
/// default refresh interval).
const REFRESH_AFTER: i64 = 3600;
/// The validity of an authinfo whose answer gives no `expires_in` (the daemon's default).
const DEFAULT_VALIDITY: i64 = 7200;
/// The version the `OutdatedVersion` terminals report: older than this build's.
pub const OUTDATED_VERSION: &str = "0.0.9";

/// The trouble a simulated terminal pretends (or none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Healthy,
    /// Its face SDK licence lapses within 7 days (critical).
    LicenceCritical,
    /// Its licence lapses within 30 days (warning).
    LicenceWarning,
    /// The factory inspection says WARN.
    InspectionWarn,
    /// The factory inspection says FAIL.
    InspectionFail,
    /// Alipay does not know it.
    AlipayUnbound,
    /// Its authinfo has expired; its refreshes fail (it fetches none).
    AuthinfoExpired,
    /// Its authinfo has less than 30 minutes of runway.
    ShortRunway,
    /// It runs [`OUTDATED_VERSION`].
    OutdatedVersion,
    /// Its clock is four minutes behind the proxy's.
    ClockSkew,
    /// Its store does not persist.
    StoreNotPersisting,
    /// WeChat Pay lists it as not activated (the proxy refuses its authinfo).
    NotActivated,
    /// Enrolled, but never sends anything (never seen).
    Silent,
}

/// The fleet's mix, repeated: half healthy, the troubles spread so that the first twelve
/// already show the main ones.
const PATTERN: [Profile; 20] = [
    Profile::Healthy,
    Profile::LicenceCritical,
    Profile::InspectionWarn,
    Profile::Silent,
    Profile::OutdatedVersion,
    Profile::Healthy,
    Profile::LicenceWarning,
    Profile::InspectionFail,
    Profile::Healthy,
    Profile::AlipayUnbound,
    Profile::AuthinfoExpired,
    Profile::Healthy,
    Profile::ClockSkew,
    Profile::StoreNotPersisting,
    Profile::Healthy,
    Profile::ShortRunway,
    Profile::Healthy,
    Profile::NotActivated,
    Profile::Healthy,
    Profile::Healthy,
];

impl Profile {
    /// The profile of the `index`th simulated terminal.
    pub fn of(index: usize) -> Self {
        PATTERN[index % PATTERN.len()]
    }

    /// Whether WeChat Pay's fleet list has it as activated.
    pub fn activated(self) -> bool {
        self != Profile::NotActivated
    }

    /// Days of licence left for the `index`th terminal: spread over a year when nothing is
    /// wrong with it.
    fn licence_days(self, index: usize) -> i64 {
        let spread = i64::try_from(index).unwrap_or(0);
        match self {
            Profile::LicenceCritical => spread % 6,
            Profile::LicenceWarning => 10 + spread % 18,
            _ => 40 + (spread * 37) % 320,
        }
    }

    /// Changes a report that says what the terminal holds into one that shows the trouble.
    fn shape(self, r: &mut Report) {
        match self {
            // The licence's day is chosen by `licence_days`; a refused authinfo is what it holds.
            Profile::Healthy
            | Profile::LicenceCritical
            | Profile::LicenceWarning
            | Profile::NotActivated
            | Profile::Silent => {}
            Profile::InspectionWarn => r.inspection.value = Some(InspectionResult::Warn),
            Profile::InspectionFail => r.inspection.value = Some(InspectionResult::Fail),
            Profile::AlipayUnbound => {
                r.alipay_binding.state = CheckState::Error;
                r.alipay_binding.value = Some(BindingState::Unbound);
                r.alipay_binding.last_error_code = Some("DEVICE_NOT_EXIST".into());
            }
            Profile::AuthinfoExpired => {
                r.authinfo.state = HeldState::Expired;
                r.authinfo.fingerprint = Some("5e1f0c2a".into());
                r.authinfo.age_seconds = Some(9_000);
                r.authinfo.runway_seconds = Some(-1_800);
                r.refresh.last_attempt_ok = Some(false);
                r.refresh.last_error_code = Some(crate::wire::codes::UPSTREAM_UNAVAILABLE.into());
                r.refresh.consecutive_failures = 14;
            }
            Profile::ShortRunway => r.authinfo.runway_seconds = Some(20 * 60),
            Profile::OutdatedVersion => r.version = OUTDATED_VERSION.into(),
            Profile::ClockSkew => {
                r.sent_at -= 240;
                r.clock_skew_seconds = Some(240);
            }
            Profile::StoreNotPersisting => r.store = StoreHealth::NotPersisting,
        }
    }
}

/// One simulated terminal as enrolled.
#[derive(Debug)]
pub struct SimulatedTerminal {
    pub index: usize,
    /// `SIM-001`, ...
    pub device_id: String,
    /// `SIMULATED000001`, ...: WeChat Pay's rule (5 to 200 letters and digits).
    pub device_sn: String,
    pub profile: Profile,
    pub key: GeneratedKey,
}

impl SimulatedTerminal {
    /// The `index`th simulated terminal (0-based), with `key`.
    pub fn new(index: usize, key: GeneratedKey) -> Self {
        Self {
            index,
            device_id: format!("SIM-{:03}", index + 1),
            device_sn: format!("SIMULATED{:06}", index + 1),
            profile: Profile::of(index),
            key,
        }
    }
}

/// `n` simulated terminals with fresh RSA-2048 keys (the registry refuses a key enrolled twice).
/// Slow (a fraction of a second a key): run it off the runtime's threads. Logs progress.
pub fn generate(n: usize) -> Result<Vec<SimulatedTerminal>, CryptoError> {
    let mut terminals = Vec::with_capacity(n);
    for index in 0..n {
        terminals.push(SimulatedTerminal::new(
            index,
            crypto::generate_rsa_key(2048)?,
        ));
        if (index + 1) % 25 == 0 && index + 1 < n {
            tracing::info!(
                done = index + 1,
                terminals = n,
                "generating the simulated terminals' keys"
            );
        }
    }
    Ok(terminals)
}

/// The authinfo a simulated terminal holds.
struct Held {
    fetched_at: i64,
    expires_at: i64,
    fingerprint: String,
}

/// A simulated terminal while it runs: its client and what it holds.
struct Running {
    terminal: SimulatedTerminal,
    client: ProxyClient,
    started: i64,
    held: Option<Held>,
    last_attempt_ok: Option<bool>,
    last_error_code: Option<String>,
    consecutive_failures: u32,
}

/// What one round came to.
enum Round {
    Done {
        reported: usize,
        refused: usize,
        fetched: usize,
        first_error: Option<String>,
    },
    /// The proxy does not answer.
    ProxyDown,
}

impl Running {
    /// Fetches an authinfo when it holds none or an old one (unless its profile fetches none),
    /// then reports; whether it got a new authinfo. `Err` when the proxy did not answer, or
    /// refused the report.
    async fn round(&mut self) -> Result<bool, UpstreamError> {
        let mut fetched = false;
        let now = unix_now();
        let stale = self
            .held
            .as_ref()
            .is_none_or(|h| now - h.fetched_at >= REFRESH_AFTER);
        if stale && self.terminal.profile != Profile::AuthinfoExpired {
            let raw_data = format!("SIMULATED-RAWDATA-{}", self.terminal.device_id);
            match self.client.fetch_authinfo(&raw_data).await {
                Ok(answer) => {
                    fetched = true;
                    let validity = answer
                        .expires_in
                        .and_then(|s| i64::try_from(s).ok())
                        .unwrap_or(DEFAULT_VALIDITY);
                    self.held = Some(Held {
                        fetched_at: now,
                        expires_at: now + validity,
                        fingerprint: crypto::secret_fingerprint(answer.authinfo.as_bytes()),
                    });
                    self.last_attempt_ok = Some(true);
                    self.last_error_code = None;
                    self.consecutive_failures = 0;
                }
                Err(e) if proxy_down(&e) => return Err(e),
                Err(e) => {
                    self.last_attempt_ok = Some(false);
                    self.last_error_code = Some(e.code());
                    self.consecutive_failures += 1;
                }
            }
        }
        let report = self.report(unix_now());
        self.client.send_report(&report).await.map(|_| fetched)
    }

    /// The report of what it holds, shaped by its profile.
    fn report(&self, now: i64) -> Report {
        let t = &self.terminal;
        let today = time::OffsetDateTime::now_utc().date();
        let licence = format_day(today + time::Duration::days(t.profile.licence_days(t.index)));
        let mut r = Report::healthy(env!("CARGO_PKG_VERSION"), now, &licence);
        r.uptime_seconds = u64::try_from(now - self.started).unwrap_or(0);
        match &self.held {
            Some(h) => {
                let runway = h.expires_at - now;
                r.authinfo.state = if runway <= 0 {
                    HeldState::Expired
                } else if now - h.fetched_at >= REFRESH_AFTER {
                    HeldState::Stale
                } else {
                    HeldState::Fresh
                };
                r.authinfo.fingerprint = Some(h.fingerprint.clone());
                r.authinfo.age_seconds = u64::try_from(now - h.fetched_at).ok();
                r.authinfo.runway_seconds = Some(runway);
                r.authinfo.expires_at = Some(rfc3339(h.expires_at));
            }
            None => {
                r.authinfo.state = HeldState::None;
                r.authinfo.fingerprint = None;
                r.authinfo.age_seconds = None;
                r.authinfo.runway_seconds = None;
            }
        }
        r.refresh.last_attempt_ok = self.last_attempt_ok;
        r.refresh.last_error_code = self.last_error_code.clone();
        r.refresh.consecutive_failures = self.consecutive_failures;
        t.profile.shape(&mut r);
        r
    }
}

/// Runs `terminals` against the proxy at `proxy_url` (`https://host:port`, its CA in `tls`):
/// every [`ROUND_EVERY`] each one that is not [`Profile::Silent`] fetches an authinfo when due
/// and reports, one log line a round. While the proxy does not answer it tries again every
/// [`WAIT_RETRY`], saying so once. Until `shutdown`.
pub async fn run(
    terminals: Vec<SimulatedTerminal>,
    proxy_url: &str,
    tls: &rustls::ClientConfig,
    timeout: Duration,
    shutdown: CancellationToken,
) -> Result<(), crate::tls::TlsError> {
    let started = unix_now();
    let mut fleet = Vec::new();
    for terminal in terminals {
        if terminal.profile == Profile::Silent {
            continue;
        }
        let key = match RsaSigner::from_pem(&terminal.key.private_pem, &terminal.device_id) {
            Ok(key) => key,
            Err(error) => {
                tracing::error!(device_id = %terminal.device_id, error = %crate::error_chain(&error), "cannot load the simulated terminal's key; it stays silent");
                continue;
            }
        };
        let signer = DeviceSigner::new(terminal.device_id.clone(), key);
        fleet.push(Running {
            client: ProxyClient::new(proxy_url, tls, signer, timeout)?,
            terminal,
            started,
            held: None,
            last_attempt_ok: None,
            last_error_code: None,
            consecutive_failures: 0,
        });
    }
    let mut waiting = false;
    loop {
        let next = match round(&mut fleet).await {
            Round::ProxyDown => {
                if !waiting {
                    tracing::info!(proxy = proxy_url, "simulated terminals wait for the proxy");
                    waiting = true;
                }
                WAIT_RETRY
            }
            Round::Done {
                reported,
                refused,
                fetched,
                first_error,
            } => {
                waiting = false;
                tracing::info!(
                    terminals = fleet.len(),
                    reported,
                    refused,
                    authinfo_fetched = fetched,
                    first_error = first_error.as_deref().unwrap_or("none"),
                    next_round_seconds = ROUND_EVERY.as_secs(),
                    "simulated terminals reported"
                );
                ROUND_EVERY
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(next) => {}
        }
    }
}

/// One round of every terminal, one after the other (a fleet spreads its calls; a burst would
/// only meet the proxy's limits).
async fn round(fleet: &mut [Running]) -> Round {
    let (mut reported, mut refused, mut fetched) = (0, 0, 0);
    let mut first_error = None;
    for terminal in fleet.iter_mut() {
        match terminal.round().await {
            Ok(got) => {
                reported += 1;
                fetched += usize::from(got);
            }
            Err(e) if proxy_down(&e) => return Round::ProxyDown,
            Err(e) => {
                refused += 1;
                first_error.get_or_insert_with(|| format!("{}: {e}", terminal.terminal.device_id));
            }
        }
    }
    Round::Done {
        reported,
        refused,
        fetched,
        first_error,
    }
}

/// Whether the proxy did not answer at all (not up yet, or gone).
fn proxy_down(e: &UpstreamError) -> bool {
    matches!(
        e,
        UpstreamError::Unreachable { .. } | UpstreamError::Timeout { .. }
    )
}
