//! The fleet list as WeChat Pay gives it, as data: the synced snapshot, what it says of a
//! device, its index by serial, and its table for people. The store persists it and the fleet
//! view reads it; neither needs the sync (the parent module) to do so.
//!
//! Owns: [`FleetSnapshot`]'s shape (it is stored as JSON: fields are only ever added, with
//! defaults) and the lookups over it. No I/O.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::platform::wechatpay::Device;

/// What the fleet list says of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FleetStatus {
    Activated,
    /// Listed, but not `ACTIVATED`.
    Inactivated,
    /// Not in the list.
    Unlisted,
    /// No list has ever been fetched.
    Unknown,
}

impl FleetStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Activated => "activated",
            Self::Inactivated => "inactivated",
            Self::Unlisted => "unlisted",
            Self::Unknown => "unknown",
        }
    }
}

/// A synced list.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FleetSnapshot {
    /// Unix seconds of the sync; `None` before the first.
    pub synced_at: Option<i64>,
    pub devices: Vec<Device>,
}

impl FleetSnapshot {
    /// The list by serial, for looking up many devices at once (the fleet view).
    pub fn index(&self) -> FleetIndex<'_> {
        FleetIndex {
            synced: self.synced_at.is_some(),
            by_sn: self
                .devices
                .iter()
                .filter_map(|d| Some((d.device_sn.as_deref()?, d)))
                .collect(),
        }
    }
}

/// Whether WeChat Pay's list shows `device` as activated.
pub fn is_activated(device: &Device) -> bool {
    device.activation_status.as_deref() == Some("ACTIVATED")
}

/// A [`FleetSnapshot`] by serial.
#[derive(Debug)]
pub struct FleetIndex<'a> {
    synced: bool,
    by_sn: HashMap<&'a str, &'a Device>,
}

impl FleetIndex<'_> {
    /// What the list says of `device_sn` (as [`Fleet::status`]).
    pub fn status(&self, device_sn: &str) -> FleetStatus {
        if !self.synced {
            return FleetStatus::Unknown;
        }
        match self.by_sn.get(device_sn) {
            Some(d) if is_activated(d) => FleetStatus::Activated,
            Some(_) => FleetStatus::Inactivated,
            None => FleetStatus::Unlisted,
        }
    }

    /// The list's entry for `device_sn`.
    pub fn device(&self, device_sn: &str) -> Option<&Device> {
        self.by_sn.get(device_sn).copied()
    }
}

/// The fleet as a table for people (`authinfo-proxy devices`).
pub fn render_table(snapshot: &FleetSnapshot) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let cell = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let rows: Vec<Vec<String>> = snapshot
        .devices
        .iter()
        .map(|d| {
            vec![
                cell(&d.device_sn),
                cell(&d.device_category),
                cell(&d.device_class),
                cell(&d.device_model),
                cell(&d.app_scene),
                cell(&d.operating_system),
                cell(&d.activation_status),
                cell(&d.sub_mchid),
            ]
        })
        .collect();
    let header = [
        "DEVICE_SN",
        "CATEGORY",
        "CLASS",
        "MODEL",
        "SCENE",
        "OS",
        "ACTIVATION",
        "SUB_MCHID",
    ];
    out.push_str(&columns(&header, &rows));
    let activated = snapshot.devices.iter().filter(|d| is_activated(d)).count();
    let _ = writeln!(
        out,
        "{} device(s), {activated} activated; synced {}",
        snapshot.devices.len(),
        snapshot
            .synced_at
            .map_or_else(|| "never".into(), crate::units::rfc3339)
    );
    out
}

/// `header` and `rows` as lines of columns two spaces apart, each padded to its widest cell in
/// terminal columns ([`display_width`]), trailing spaces trimmed: the one table layout of the
/// proxy's commands (`devices`, `terminals`).
pub fn columns(header: &[&str], rows: &[Vec<String>]) -> String {
    use std::fmt::Write as _;
    let mut widths: Vec<usize> = header.iter().map(|h| display_width(h)).collect();
    for row in rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(display_width(c));
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (c, w) in cells.zip(&widths) {
            let pad = w.saturating_sub(display_width(c));
            let _ = write!(l, "{c}{}  ", " ".repeat(pad));
        }
        l.trim_end().to_owned()
    };
    let mut out = String::new();
    let _ = writeln!(out, "{}", line(&mut header.iter().copied()));
    for row in rows {
        let _ = writeln!(out, "{}", line(&mut row.iter().map(String::as_str)));
    }
    out
}

/// The terminal columns `text` takes: East Asian wide and fullwidth characters (the Chinese
/// names WeChat Pay gives device categories, classes and scenes) take two, others one.
pub fn display_width(text: &str) -> usize {
    text.chars()
        .map(|c| match u32::from(c) {
            0x1100..=0x115F
            | 0x2E80..=0x303E
            | 0x3041..=0x33FF
            | 0x3400..=0x4DBF
            | 0x4E00..=0x9FFF
            | 0xA000..=0xA4CF
            | 0xAC00..=0xD7A3
            | 0xF900..=0xFAFF
            | 0xFE30..=0xFE4F
            | 0xFF00..=0xFF60
            | 0xFFE0..=0xFFE6
            | 0x20000..=0x3FFFD => 2,
            _ => 1,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_a_header_a_row_per_device_and_a_summary() {
        let snapshot = FleetSnapshot {
            synced_at: Some(0),
            devices: vec![Device {
                device_sn: Some("SN1".into()),
                device_class: Some("团餐机".into()),
                activation_status: Some("ACTIVATED".into()),
                ..Device::default()
            }],
        };
        let table = render_table(&snapshot);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("DEVICE_SN"));
        assert!(
            lines[1].starts_with("SN1")
                && lines[1].contains("团餐机")
                && lines[1].contains("ACTIVATED")
        );
        assert_eq!(
            lines[2],
            "1 device(s), 1 activated; synced 1970-01-01T00:00:00Z"
        );
    }
    /// Chinese names take two terminal columns per character; the padding counts them so.
    #[test]
    fn table_columns_line_up_with_chinese_names() {
        let device = |sn: &str, class: &str| Device {
            device_sn: Some(sn.into()),
            device_class: Some(class.into()),
            activation_status: Some("ACTIVATED".into()),
            ..Device::default()
        };
        let snapshot = FleetSnapshot {
            synced_at: None,
            devices: vec![device("SN1", "团餐机"), device("SN2", "POS")],
        };
        let table = render_table(&snapshot);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "DEVICE_SN  CATEGORY  CLASS   MODEL  SCENE  OS  ACTIVATION  SUB_MCHID"
        );
        assert_eq!(
            lines[1],
            "SN1        -         团餐机  -      -      -   ACTIVATED   -"
        );
        assert_eq!(
            lines[2],
            "SN2        -         POS     -      -      -   ACTIVATED   -"
        );
        assert_eq!(display_width("团餐机"), 6);
        assert_eq!(display_width("FP-200"), 6);
    }
}
