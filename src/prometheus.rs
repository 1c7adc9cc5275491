//! The Prometheus text exposition format, written by hand for the daemon's and the proxy's
//! `/metrics`.
//!
//! Owns: the `# HELP`/`# TYPE` lines, sample lines and label-value escaping, the content type,
//! and the standard `process_*` series read from `/proc/self` ([`Text::process`]). It holds no
//! series: each binary's `metrics` module keeps its own counters and renders them through
//! [`Text`].

use std::fmt::{Display, Write as _};

/// The content type of a metrics page (the text format, version 0.0.4).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A metrics page being written.
#[derive(Debug, Default)]
pub struct Text(String);

impl Text {
    /// Starts a family: its `# HELP` and `# TYPE` lines (`kind`: counter, gauge, histogram).
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// One sample, `name{label="value",...} value`; label values are escaped.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &dyn Display)], value: impl Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (label, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{label}=\"");
                for c in v.to_string().chars() {
                    match c {
                        '\\' => self.0.push_str("\\\\"),
                        '"' => self.0.push_str("\\\""),
                        '\n' => self.0.push_str("\\n"),
                        c => self.0.push(c),
                    }
                }
                self.0.push('"');
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    /// A family of `kind`: its header, then one sample per `(label values, value)`, the values
    /// in the order of `labels`.
    pub fn labelled<K: LabelValues, V: Display>(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        labels: &[&str],
        samples: impl IntoIterator<Item = (K, V)>,
    ) {
        self.family(name, kind, help);
        for (key, value) in samples {
            let values = key.values();
            let pairs: Vec<(&str, &dyn Display)> = labels
                .iter()
                .zip(&values)
                .map(|(label, v)| (*label, v as &dyn Display))
                .collect();
            self.sample(name, &pairs, value);
        }
    }

    /// A family with one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: &str, help: &str, value: impl Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    /// `{prefix}_build_info{version="..."} 1`.
    pub fn build_info(&mut self, prefix: &str, help: &str) {
        let name = format!("{prefix}_build_info");
        self.family(&name, "gauge", help);
        self.sample(&name, &[("version", &env!("CARGO_PKG_VERSION"))], 1);
    }

    /// Gauges computed by the caller: (name, help, value).
    pub fn gauges(&mut self, gauges: &[(&str, &str, f64)]) {
        for (name, help, value) in gauges {
            self.single(name, "gauge", help, value);
        }
    }

    /// The standard process series (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
    /// `process_virtual_memory_bytes`, `process_open_fds`, `process_max_fds`,
    /// `process_start_time_seconds`), as the Prometheus client libraries name them, read from
    /// `/proc/self`. A series `/proc` cannot give (not Linux, a hardened `/proc`) is left out.
    pub fn process(&mut self) {
        let p = ProcessStats::read();
        let series: [(&str, &str, &str, Option<f64>); 6] = [
            (
                "process_cpu_seconds_total",
                "counter",
                "User and system CPU time spent, seconds.",
                p.cpu_seconds,
            ),
            (
                "process_resident_memory_bytes",
                "gauge",
                "Resident memory size, bytes.",
                p.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "gauge",
                "Virtual memory size, bytes.",
                p.virtual_bytes,
            ),
            (
                "process_open_fds",
                "gauge",
                "Open file descriptors.",
                p.open_fds,
            ),
            (
                "process_max_fds",
                "gauge",
                "The limit on open file descriptors.",
                p.max_fds,
            ),
            (
                "process_start_time_seconds",
                "gauge",
                "Start time of the process since the Unix epoch, seconds.",
                p.start_time_seconds,
            ),
        ];
        for (name, kind, help, value) in series {
            if let Some(v) = value {
                self.single(name, kind, help, v);
            }
        }
    }

    /// The page, ready to serve.
    pub fn finish(self) -> String {
        self.0
    }
}

/// The label values of one sample: a single value, or a tuple of them (a counter map's key).
pub trait LabelValues {
    fn values(&self) -> Vec<String>;
}

impl LabelValues for str {
    fn values(&self) -> Vec<String> {
        vec![self.to_owned()]
    }
}

impl LabelValues for String {
    fn values(&self) -> Vec<String> {
        vec![self.clone()]
    }
}

impl<K: LabelValues + ?Sized> LabelValues for &K {
    fn values(&self) -> Vec<String> {
        (**self).values()
    }
}

impl<A: Display, B: Display> LabelValues for (A, B) {
    fn values(&self) -> Vec<String> {
        vec![self.0.to_string(), self.1.to_string()]
    }
}

impl<A: Display, B: Display, C: Display> LabelValues for (A, B, C) {
    fn values(&self) -> Vec<String> {
        vec![self.0.to_string(), self.1.to_string(), self.2.to_string()]
    }
}

/// What `/proc/self` tells of this process.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<f64>,
    pub virtual_bytes: Option<f64>,
    pub open_fds: Option<f64>,
    pub max_fds: Option<f64>,
    pub start_time_seconds: Option<f64>,
}

/// USER_HZ: `/proc/<pid>/stat` counts CPU time in ticks of 1/100 s on Linux (every
/// architecture the daemon is built for).
const TICKS_PER_SECOND: f64 = 100.0;

impl ProcessStats {
    /// Reads `/proc/self`; what cannot be read stays `None`.
    pub fn read() -> Self {
        let stat = std::fs::read_to_string("/proc/self/stat").ok();
        // Fields after the command name, which is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat
            .as_deref()
            .and_then(|s| s.rsplit_once(") "))
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        // `man 5 proc`, counting from the state as field 3: utime 14, stime 15, starttime 22.
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
        // Memory from `status` in kB (its `stat` counterpart counts pages, whose size varies:
        // 4 KiB, or 16 or 64 KiB on some ARM kernels).
        let status = std::fs::read_to_string("/proc/self/status").ok();
        let kib = |key: &str| {
            status.as_deref().and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                    .map(|k| k * 1024.0)
            })
        };
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<f64>().ok())
        });
        let max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Max open files"))
                    .and_then(|l| l.split_whitespace().nth(3))
                    .and_then(|v| v.parse::<f64>().ok())
            });
        Self {
            cpu_seconds: field(14)
                .zip(field(15))
                .map(|(u, s)| (u + s) / TICKS_PER_SECOND),
            resident_bytes: kib("VmRSS:"),
            virtual_bytes: kib("VmSize:"),
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|d| d.count() as f64),
            max_fds,
            start_time_seconds: boot
                .zip(field(22))
                .map(|(b, ticks)| b + ticks / TICKS_PER_SECOND),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_samples_and_escaped_labels() {
        let mut t = Text::default();
        t.family("x_total", "counter", "Things.");
        t.sample("x_total", &[("route", &"/v1/a"), ("status", &200)], 3);
        t.sample("x_total", &[("odd", &"a\"b\\c\nd")], 1);
        t.single("y", "gauge", "Why.", 1.5);
        assert_eq!(
            t.finish(),
            "# HELP x_total Things.\n# TYPE x_total counter\n\
             x_total{route=\"/v1/a\",status=\"200\"} 3\n\
             x_total{odd=\"a\\\"b\\\\c\\nd\"} 1\n\
             # HELP y Why.\n# TYPE y gauge\ny 1.5\n"
        );
    }

    /// The process series read real values from `/proc/self` (this is Linux).
    #[test]
    fn process_series_come_from_proc_self() {
        let p = ProcessStats::read();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64();
        assert!(p.resident_bytes.is_some_and(|r| r > 1e6), "{p:?}");
        assert!(
            p.virtual_bytes
                .is_some_and(|v| v >= p.resident_bytes.unwrap_or(0.0)),
            "{p:?}"
        );
        assert!(p.open_fds.is_some_and(|n| n >= 3.0), "{p:?}");
        assert!(
            p.max_fds.is_some_and(|n| n >= p.open_fds.unwrap_or(0.0)),
            "{p:?}"
        );
        assert!(p.cpu_seconds.is_some_and(|c| c >= 0.0), "{p:?}");
        assert!(
            p.start_time_seconds
                .is_some_and(|t| t > now - 86400.0 * 365.0 && t <= now + 1.0),
            "{p:?}"
        );
        let mut t = Text::default();
        t.process();
        let page = t.finish();
        for name in [
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_start_time_seconds",
        ] {
            assert!(
                page.contains(&format!("# TYPE {name} gauge\n{name} ")),
                "{page}"
            );
        }
    }
}
