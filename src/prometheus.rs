//! The Prometheus text exposition format, written by hand for the daemon's and the proxy's
//! `/metrics`.
//!
//! Owns: the `# HELP`/`# TYPE` lines, sample lines and label-value escaping. It holds no series:
//! each binary's `metrics` module keeps its own counters and renders them through [`Text`].

use std::fmt::{Display, Write as _};

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

    /// The page, ready to serve.
    pub fn finish(self) -> String {
        self.0
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
}
