//! Reading what sled and the copy hold at start and deciding which one is right: the newest
//! whole snapshot wins, and whatever was damaged, missing or behind is named.
//!
//! Owns: the comparison rules (generations, checksums, a layout upgrade). It must not write:
//! [`super::Store::open`] writes what the decision asks for and logs the findings.

use std::path::Path;

use super::records::{KEY_COPY, KEY_GENERATION, KEY_SCHEMA, LEGACY_SCHEMA, SCHEMA, Snapshot};
use super::seal::unseal;

/// What sled's store holds.
#[derive(Debug, Clone, Default)]
pub struct SledView {
    /// The generation of the last whole write; `None` for an empty (or never written) store.
    pub generation: Option<u64>,
    /// The records that are whole and of that generation.
    pub snapshot: Snapshot,
    /// The keys that are not, each with why.
    pub damaged: Vec<(String, String)>,
    /// The store has the first, unsealed layout.
    pub legacy: bool,
}

impl SledView {
    fn is_empty(&self) -> bool {
        self.generation.is_none() && self.snapshot.is_empty() && self.damaged.is_empty()
    }

    fn damage(&self) -> String {
        let list: Vec<String> = self
            .damaged
            .iter()
            .map(|(key, why)| format!("{key} ({why})"))
            .collect();
        format!("sled's records are damaged: {}", list.join("; "))
    }
}

/// Reads every record of `db`. An error is sled's own (it could not read its files).
pub fn read_sled(db: &sled::Db) -> Result<SledView, sled::Error> {
    let mut view = SledView::default();
    let schema = db.get(KEY_SCHEMA)?;
    view.legacy = schema.as_deref() == Some(LEGACY_SCHEMA);
    if let Some(s) = &schema
        && &s[..] != SCHEMA
        && !view.legacy
    {
        view.damaged.push((
            KEY_SCHEMA.into(),
            format!("unknown layout {:?}", String::from_utf8_lossy(s)),
        ));
    }
    if !view.legacy
        && let Some(bytes) = db.get(KEY_GENERATION)?
    {
        match unseal(KEY_GENERATION, &bytes) {
            Ok((g, body)) if body == g.to_string().as_bytes() => view.generation = Some(g),
            Ok(_) => view.damaged.push((
                KEY_GENERATION.into(),
                "its body disagrees with its header".into(),
            )),
            Err(e) => view.damaged.push((KEY_GENERATION.into(), e.to_string())),
        }
    }
    for item in db.iter() {
        let (key, value) = item?;
        let key = String::from_utf8_lossy(&key).into_owned();
        if key == KEY_SCHEMA || key == KEY_GENERATION {
            continue;
        }
        let body = if view.legacy {
            &value[..]
        } else {
            match unseal(&key, &value) {
                Ok((g, body)) if Some(g) == view.generation => body,
                Ok((g, _)) => {
                    let store = view
                        .generation
                        .map_or_else(|| "none".to_owned(), |g| g.to_string());
                    view.damaged.push((
                        key,
                        format!("it is of generation {g}, the store's is {store}"),
                    ));
                    continue;
                }
                Err(e) => {
                    view.damaged.push((key, e.to_string()));
                    continue;
                }
            }
        };
        match view.snapshot.set(&key, body) {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                key,
                "the store holds a record this version does not know; left alone"
            ),
            Err(e) => view.damaged.push((key, format!("it does not decode: {e}"))),
        }
    }
    if view.legacy && !view.snapshot.is_empty() {
        view.generation = Some(0);
    }
    Ok(view)
}

/// What the copy beside sled holds.
#[derive(Debug, Clone)]
pub enum CopyView {
    Missing,
    Whole {
        generation: u64,
        snapshot: Box<Snapshot>,
    },
    /// It exists but is not whole (why).
    Damaged(String),
    /// It exists but cannot be read (a permission error, not damage).
    Unreadable(String),
}

/// Reads the copy at `path`.
pub fn read_copy(path: &Path) -> CopyView {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return CopyView::Missing,
        Err(e) => return CopyView::Unreadable(e.to_string()),
    };
    match unseal(KEY_COPY, &bytes) {
        Ok((generation, body)) => match crate::json::from_slice(body) {
            Ok(snapshot) => CopyView::Whole {
                generation,
                snapshot: Box::new(snapshot),
            },
            Err(e) => CopyView::Damaged(format!("it does not decode: {e}")),
        },
        Err(e) => CopyView::Damaged(e.to_string()),
    }
}

/// Where a recovery took the good state from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The copy beside sled.
    Copy,
    /// sled's store.
    Sled,
    /// What the running daemon held in memory.
    Memory,
    /// Nothing whole was left.
    Nothing,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Copy => "copy",
            Source::Sled => "sled",
            Source::Memory => "memory",
            Source::Nothing => "nothing",
        }
    }
}

/// One thing found damaged or missing, and what was done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub damaged: String,
    pub restored_from: Source,
    /// What was restored, when it is not simply what the store holds now.
    pub restored: Option<String>,
}

/// The decision.
#[derive(Debug, Clone)]
pub struct Reconciled {
    /// What the store holds from now on.
    pub snapshot: Snapshot,
    /// The newest generation either side has seen.
    pub generation: u64,
    /// Both sides must be written again (one is damaged, missing or behind).
    pub rewrite: bool,
    /// Damage to log at error and show in status.
    pub findings: Vec<Finding>,
    /// Things to log that are not damage (an interrupted write, a layout upgrade).
    pub notes: Vec<String>,
}

/// Decides between `sled` (`None`: it could not be opened for a reason that is not damage) and
/// `copy`.
pub fn reconcile(sled: Option<&SledView>, copy: &CopyView) -> Reconciled {
    let mut out = Reconciled {
        snapshot: Snapshot::default(),
        generation: 0,
        rewrite: false,
        findings: Vec::new(),
        notes: Vec::new(),
    };
    let mut finding = |damaged: String, restored_from| {
        out.findings.push(Finding {
            damaged,
            restored_from,
            restored: None,
        });
    };
    let Some(sled) = sled else {
        // Serve what the copy holds; nothing can be written.
        match copy {
            CopyView::Whole {
                generation,
                snapshot,
            } => {
                out.snapshot = (**snapshot).clone();
                out.generation = *generation;
            }
            CopyView::Missing => {}
            CopyView::Damaged(why) => finding(
                format!("the copy is damaged ({why}) and sled's store cannot be opened"),
                Source::Nothing,
            ),
            CopyView::Unreadable(why) => out.notes.push(format!(
                "the copy cannot be read ({why}) and sled's store cannot be opened"
            )),
        }
        return out;
    };
    let sled_generation = sled.generation.unwrap_or(0);
    match copy {
        CopyView::Whole {
            generation,
            snapshot,
        } if sled.damaged.is_empty() => {
            let copy_generation = *generation;
            out.generation = sled_generation.max(copy_generation);
            if sled.generation.is_none() || sled_generation < copy_generation {
                let what = if sled.is_empty() {
                    "sled's store is empty".to_owned()
                } else {
                    format!("sled's store was rolled back to generation {sled_generation}")
                };
                finding(
                    format!("{what} while the copy holds generation {copy_generation}"),
                    Source::Copy,
                );
                out.snapshot = (**snapshot).clone();
                out.rewrite = true;
            } else if sled_generation > copy_generation {
                // sled is written first, the copy second: a kill between the two (once, or
                // again during the catch-up write of the next start) leaves the copy behind.
                // That is not damage, and sled holds everything.
                out.snapshot = sled.snapshot.clone();
                out.rewrite = true;
                out.notes.push(format!(
                    "the copy is behind sled (generation {copy_generation}, sled \
                     {sled_generation}): a write was interrupted; brought up to date"
                ));
            } else {
                out.snapshot = sled.snapshot.clone();
                if sled.snapshot != **snapshot {
                    finding(
                        format!("sled and the copy disagree at generation {sled_generation}"),
                        Source::Sled,
                    );
                    out.rewrite = true;
                }
            }
        }
        CopyView::Whole {
            generation,
            snapshot,
        } => {
            // Some of sled's records are damaged.
            out.generation = sled_generation.max(*generation);
            out.rewrite = true;
            if *generation >= sled_generation {
                out.snapshot = (**snapshot).clone();
            } else {
                // The copy is older than sled's whole records: keep those, take only the damaged
                // ones from the copy.
                out.snapshot = sled.snapshot.clone();
                for (key, _) in &sled.damaged {
                    out.snapshot.take_record(key, snapshot);
                }
            }
            finding(sled.damage(), Source::Copy);
        }
        CopyView::Missing | CopyView::Damaged(_) | CopyView::Unreadable(_) => {
            out.snapshot = sled.snapshot.clone();
            out.generation = sled_generation;
            let copy_problem = match copy {
                CopyView::Damaged(why) => Some(format!("the copy is damaged ({why})")),
                CopyView::Missing if !sled.is_empty() && !sled.legacy => {
                    Some("the copy is missing".to_owned())
                }
                _ => None,
            };
            if let CopyView::Unreadable(why) = copy {
                out.notes.push(format!("the copy cannot be read ({why})"));
            }
            if sled.legacy && sled.damaged.is_empty() {
                out.notes.push(
                    "the store has the first layout; rewritten with sealed records and a copy"
                        .into(),
                );
            }
            if !sled.damaged.is_empty() {
                let both = match &copy_problem {
                    Some(p) => format!("{}, and {p}", sled.damage()),
                    None => format!("{}, and there is no copy", sled.damage()),
                };
                finding(both, Source::Nothing);
            } else if let Some(problem) = copy_problem {
                let from = if sled.is_empty() {
                    Source::Nothing
                } else {
                    Source::Sled
                };
                finding(problem, from);
            }
            out.rewrite = !sled.is_empty() || !matches!(copy, CopyView::Missing);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::terminal::store::records::{HeldAuthinfo, RawData};

    fn snapshot(authinfo: &str) -> Snapshot {
        Snapshot {
            authinfo: Some(HeldAuthinfo {
                authinfo: authinfo.into(),
                fetched_at: 1,
                expires_at: 7201,
                expires_in: None,
                proxy_fetched_at: None,
            }),
            raw_data: Some(RawData {
                value: format!("RAW-{authinfo}"),
                received_at: 1,
                source: "socket".into(),
            }),
            ..Snapshot::default()
        }
    }

    fn sled(generation: u64, authinfo: &str) -> SledView {
        SledView {
            generation: Some(generation),
            snapshot: snapshot(authinfo),
            ..SledView::default()
        }
    }

    fn copy(generation: u64, authinfo: &str) -> CopyView {
        CopyView::Whole {
            generation,
            snapshot: Box::new(snapshot(authinfo)),
        }
    }

    #[test]
    fn agreeing_sides_need_nothing() {
        let r = reconcile(Some(&sled(5, "A")), &copy(5, "A"));
        assert_eq!(r.snapshot, snapshot("A"));
        assert_eq!(r.generation, 5);
        assert!(!r.rewrite && r.findings.is_empty() && r.notes.is_empty());
    }

    #[test]
    fn a_rolled_back_or_empty_sled_is_restored_from_the_copy() {
        for view in [sled(3, "OLD"), SledView::default()] {
            let r = reconcile(Some(&view), &copy(5, "NEW"));
            assert_eq!(r.snapshot, snapshot("NEW"));
            assert!(r.rewrite);
            assert_eq!(r.findings.len(), 1);
            assert_eq!(r.findings[0].restored_from, Source::Copy);
            assert!(r.findings[0].damaged.contains("generation 5"), "{r:?}");
        }
    }

    /// The copy behind sled is what a kill between sled's write and the copy's leaves (twice
    /// behind when the catch-up write is killed too): rewritten, and not damage.
    #[test]
    fn a_copy_behind_sled_is_rewritten_and_is_not_damage() {
        for behind in [1, 2, 4] {
            let r = reconcile(Some(&sled(5 + behind, "NEW")), &copy(5, "OLD"));
            assert_eq!(r.snapshot, snapshot("NEW"));
            assert!(
                r.rewrite && r.findings.is_empty() && r.notes.len() == 1,
                "{r:?}"
            );
        }
    }

    #[test]
    fn damaged_sled_records_come_from_the_copy_and_an_older_copy_fills_only_them() {
        let mut view = sled(5, "A");
        view.snapshot.raw_data = None;
        view.damaged.push(("raw_data".into(), "checksum".into()));
        let r = reconcile(Some(&view), &copy(5, "A"));
        assert_eq!(r.snapshot, snapshot("A"));
        assert_eq!(r.findings[0].restored_from, Source::Copy);
        assert!(r.findings[0].damaged.contains("raw_data (checksum)"));
        // The copy is older: the whole authinfo from sled stays, the raw_data comes from the copy.
        let r = reconcile(Some(&view), &copy(4, "OLD"));
        assert_eq!(r.snapshot.authinfo, snapshot("A").authinfo);
        assert_eq!(r.snapshot.raw_data, snapshot("OLD").raw_data);
    }

    #[test]
    fn a_missing_or_damaged_copy_is_rewritten_from_sled() {
        for c in [CopyView::Missing, CopyView::Damaged("checksum".into())] {
            let r = reconcile(Some(&sled(5, "A")), &c);
            assert_eq!(r.snapshot, snapshot("A"));
            assert!(r.rewrite);
            assert_eq!(r.findings[0].restored_from, Source::Sled, "{c:?}");
        }
        // A fresh store: nothing anywhere, nothing to say.
        let r = reconcile(Some(&SledView::default()), &CopyView::Missing);
        assert!(!r.rewrite && r.findings.is_empty() && r.snapshot.is_empty());
    }

    #[test]
    fn sled_unopenable_serves_the_copy() {
        let r = reconcile(None, &copy(5, "A"));
        assert_eq!(r.snapshot, snapshot("A"));
        assert!(!r.rewrite && r.findings.is_empty());
        let r = reconcile(None, &CopyView::Damaged("checksum".into()));
        assert!(r.snapshot.is_empty());
        assert_eq!(r.findings[0].restored_from, Source::Nothing);
    }
}
