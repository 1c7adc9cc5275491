//! Durations and timestamps as people write them in config files and read them in status.
//!
//! Owns: the `"90s"`, `"5m"`, `"1h"` duration syntax (a serde type for config structs), the
//! wall clock as Unix seconds, and RFC 3339 rendering. It must not hold state: everything here
//! is a pure function of its arguments, apart from [`unix_now`].

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration written as an integer and a unit: `250ms`, `30s`, `5m`, `1h`, `7d`. Several may
/// be joined (`1h30m`). A bare integer means seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub const fn secs(s: u64) -> Self {
        Self(Duration::from_secs(s))
    }
}

/// The longest duration a config may give: a year. No setting needs more, and much longer ones
/// overflow the clock arithmetic they feed (a refresh due in 10^16 days is past what an
/// `Instant` can hold); the config validators refuse them.
pub const MAX_CONFIG_DURATION: Duration = Duration::from_secs(365 * 86400);

/// Parses the [`HumanDuration`] syntax.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("{text:?} is not a duration like 30s, 5m or 1h"));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{text:?}: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86400)),
            _ => {
                return Err(format!(
                    "{text:?}: unknown unit {unit:?} (use ms, s, m, h or d)"
                ));
            }
        };
        total = total.saturating_add(part);
    }
    Ok(total)
}

/// Renders a duration the way [`parse_duration`] reads it, largest units first.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    if !ms.is_multiple_of(1000) && ms < 10_000 {
        return format!("{ms}ms");
    }
    let mut secs = d.as_secs();
    let mut out = String::new();
    for (unit, size) in [("d", 86400), ("h", 3600), ("m", 60), ("s", 1)] {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    out
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(s) => Ok(Self(Duration::from_secs(s))),
            Raw::Text(t) => parse_duration(&t)
                .map(Self)
                .map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(self.0))
    }
}

/// The wall clock a daemon reads: the system's, shifted by an offset that is zero in
/// production. Tests shift it to play a clock set back or forward while the daemon runs, without
/// sleeping; the monotonic clock (tokio's) is not affected, as with a real clock change.
#[derive(Debug, Default)]
pub struct WallClock {
    offset: std::sync::atomic::AtomicI64,
}

impl WallClock {
    /// Unix seconds now, as this clock reads.
    pub fn now(&self) -> i64 {
        unix_now().saturating_add(self.offset.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Moves the clock by `seconds` (negative: back).
    pub fn shift(&self, seconds: i64) {
        self.offset
            .fetch_add(seconds, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What the daemon knows of its proxy's clock: the `Date` of the proxy's last answer, anchored on
/// the boot-time clock. Unlike the wall clock, that clock is never set (NTP, an operator or a dead
/// RTC cannot move it), and unlike the monotonic clock it keeps counting through a suspend; so the
/// estimate of the proxy's time now stays right when the local clock is changed, until the next
/// answer refreshes it. The proxy is a merchant server on NTP: its clock is the one to trust when
/// the terminal's is wrong.
#[derive(Debug, Default)]
pub struct PeerClock {
    /// The proxy's Unix seconds and the boot-time clock when they were read.
    anchor: std::sync::Mutex<Option<(i64, Duration)>>,
}

impl PeerClock {
    /// Records that the proxy's clock reads `unix` seconds now (from its `Date` header).
    pub fn observe(&self, unix: i64) {
        *crate::sync::lock(&self.anchor) = Some((unix, since_boot()));
    }

    /// The proxy's clock now, as estimated from its last answer; `None` before any answer.
    pub fn now(&self) -> Option<i64> {
        let (unix, at) = (*crate::sync::lock(&self.anchor))?;
        let elapsed = since_boot().saturating_sub(at).as_secs();
        Some(unix.saturating_add(i64::try_from(elapsed).unwrap_or(i64::MAX)))
    }
}

/// Time since boot, counting suspend (`CLOCK_BOOTTIME`); where that clock does not exist, the
/// monotonic clock.
fn since_boot() -> Duration {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let id = nix::time::ClockId::CLOCK_BOOTTIME;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let id = nix::time::ClockId::CLOCK_MONOTONIC;
    // Both clocks exist on every kernel this runs on; the fallback keeps the estimate frozen
    // rather than wrong.
    nix::time::clock_gettime(id).map_or(Duration::ZERO, Duration::from)
}

/// The wall clock as Unix seconds (negative before 1970, which a terminal with a dead RTC can
/// report).
pub fn unix_now() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// RFC 3339 in UTC (`2026-11-23T03:37:12Z`) for Unix seconds.
pub fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("@{unix}"))
}

/// Parses an RFC 3339 timestamp into Unix seconds.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_every_unit() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86400)));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("h").is_err());
        assert!(
            parse_duration("5 minutes")
                .unwrap_err()
                .contains("unknown unit")
        );
        assert!(parse_duration("-5s").is_err());
    }

    #[test]
    fn durations_format_back_to_what_parses() {
        for s in ["1h", "1h30m", "5m", "250ms", "1d2h", "0s", "59s"] {
            let d = parse_duration(s).expect("parse");
            assert_eq!(format_duration(d), s);
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
    }

    #[test]
    fn human_duration_reads_strings_and_integers_from_toml() {
        #[derive(Deserialize)]
        struct T {
            a: HumanDuration,
            b: HumanDuration,
        }
        let t: T = toml::from_str("a = \"2m\"\nb = 7").expect("toml");
        assert_eq!(t.a.0, Duration::from_secs(120));
        assert_eq!(t.b.0, Duration::from_secs(7));
        let err = toml::from_str::<T>("a = \"2 weeks\"\nb = 1")
            .err()
            .expect("error");
        assert!(err.to_string().contains("unknown unit"), "{err}");
    }

    #[test]
    fn peer_clock_is_unknown_until_observed_then_follows_the_boot_clock() {
        let peer = PeerClock::default();
        assert_eq!(peer.now(), None);
        peer.observe(1_000_000);
        let now = peer.now().expect("observed");
        // Nothing here sleeps: the estimate is the observed time plus (close to) no time.
        assert!((1_000_000..1_000_002).contains(&now), "{now}");
        peer.observe(-5);
        assert!(peer.now().expect("observed") < 0);
    }

    #[test]
    fn rfc3339_roundtrips() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            parse_rfc3339("2015-05-20T13:29:35.120+08:00"),
            Some(1432099775)
        );
        assert_eq!(parse_rfc3339(&rfc3339(1_800_000_000)), Some(1_800_000_000));
    }
}
