//! Where the per-terminal records live: [`TerminalRecords`], the narrow interface the fleet view
//! uses, and [`StoredRecords`], its implementation on the proxy's own sled store.
//!
//! Owns: bounding (a record exists only for a device that passed authentication, and records of
//! devices no longer enrolled are dropped by [`TerminalRecords::retain`]), and when records reach
//! the disk. It must not judge records ([`super::risk`] does).
//!
//! [`StoredRecords`] keeps every record in memory (the fleet view reads them all on each page)
//! and writes changed ones to sled on [`TerminalRecords::flush`], which the fleet-health loop
//! calls every few seconds and at shutdown: a report is not flushed on arrival (that fsync would
//! cap ingestion far below a large fleet's rate), and a crash loses at most the last seconds of
//! reports, which the terminals send again within 15 minutes. Replicas that share state
//! (`[cluster]`) use [`SharedRecords`]: a hash per device in Redis, written through, so every
//! replica's fleet view shows what any replica saw; the routes, the rules and the pages do not
//! change.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use super::record::{Announced, ReceivedReport, TerminalRecord};
use crate::proxy::cluster::{Cluster, Fields};
use crate::proxy::store::{Store, StoreError};
use crate::sync::lock;

/// What a [`TerminalRecords`] answers.
pub type RecordsFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Every record, shared, by device_id.
pub type Snapshot = HashMap<Arc<str>, Arc<TerminalRecord>>;

/// The per-terminal records of the fleet view. Callers pass only device ids that are enrolled
/// (they come from authenticated requests), so the records stay one per enrolled device.
pub trait TerminalRecords: Send + Sync + std::fmt::Debug {
    /// An authenticated request from `device_id` at `at`.
    fn seen(&self, device_id: &str, at: i64) -> RecordsFuture<'_, ()>;
    /// This proxy handed `device_id` an authinfo at `at`.
    fn issued(&self, device_id: &str, at: i64) -> RecordsFuture<'_, ()>;
    /// `device_id`'s report, received at `report.received_at`.
    fn report(&self, device_id: &str, report: ReceivedReport) -> RecordsFuture<'_, ()>;
    /// The risks announced for `device_id` in the journal.
    fn announce(&self, device_id: &str, announced: Vec<Announced>) -> RecordsFuture<'_, ()>;
    /// One device's record.
    fn get(&self, device_id: &str) -> RecordsFuture<'_, Option<Arc<TerminalRecord>>>;
    /// Every record.
    fn snapshot(&self) -> RecordsFuture<'_, Snapshot>;
    /// Drops the records of devices `enrolled` says no; returns how many.
    fn retain<'a>(
        &'a self,
        enrolled: &'a (dyn Fn(&str) -> bool + Sync),
    ) -> RecordsFuture<'a, usize>;
    /// Makes every change so far durable.
    fn flush(&self) -> RecordsFuture<'_, ()>;
}

/// The records in the proxy's sled store, cached in memory and written behind.
#[derive(Debug)]
pub struct StoredRecords {
    store: Store,
    inner: Mutex<Inner>,
    /// One flush at a time.
    flushing: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct Inner {
    records: HashMap<Arc<str>, Arc<TerminalRecord>>,
    /// Changed since the last flush (`None`: removed).
    dirty: HashMap<Arc<str>, Option<Arc<TerminalRecord>>>,
}

impl StoredRecords {
    /// Loads every record `store` holds. A record that does not decode (damaged, or written by
    /// an incompatible version) is dropped with a warning; it is rebuilt by the device's next
    /// request.
    pub fn open(store: Store) -> Result<Self, StoreError> {
        let (records, undecodable) = store.terminal_records()?;
        for device_id in &undecodable {
            tracing::warn!(device_id = %device_id, "a stored terminal record does not decode; dropping it (the device's next request makes a new one)");
        }
        let mut inner = Inner::default();
        for (device_id, record) in records {
            inner.records.insert(Arc::from(device_id), Arc::new(record));
        }
        for device_id in undecodable {
            inner.dirty.insert(Arc::from(device_id), None);
        }
        Ok(Self {
            store,
            inner: Mutex::new(inner),
            flushing: tokio::sync::Mutex::new(()),
        })
    }

    /// Changes `device_id`'s record (made when missing) with `change`.
    fn change(&self, device_id: &str, change: impl FnOnce(&mut TerminalRecord)) {
        let mut inner = lock(&self.inner);
        let (key, mut record) = match inner.records.get_key_value(device_id) {
            Some((k, r)) => (k.clone(), TerminalRecord::clone(r)),
            None => (Arc::from(device_id), TerminalRecord::default()),
        };
        change(&mut record);
        let record = Arc::new(record);
        inner.records.insert(key.clone(), record.clone());
        inner.dirty.insert(key, Some(record));
    }

    /// Records not yet flushed (tests).
    pub fn pending(&self) -> usize {
        lock(&self.inner).dirty.len()
    }
}

fn ready<T: Send + 'static>(value: T) -> RecordsFuture<'static, T> {
    Box::pin(std::future::ready(Ok(value)))
}

impl TerminalRecords for StoredRecords {
    fn seen(&self, device_id: &str, at: i64) -> RecordsFuture<'_, ()> {
        self.change(device_id, |r| r.seen(at));
        ready(())
    }

    fn issued(&self, device_id: &str, at: i64) -> RecordsFuture<'_, ()> {
        self.change(device_id, |r| {
            r.seen(at);
            r.last_issued = Some(r.last_issued.map_or(at, |t| t.max(at)));
        });
        ready(())
    }

    fn report(&self, device_id: &str, report: ReceivedReport) -> RecordsFuture<'_, ()> {
        self.change(device_id, |r| {
            r.seen(report.received_at);
            r.report = Some(report);
        });
        ready(())
    }

    fn announce(&self, device_id: &str, announced: Vec<Announced>) -> RecordsFuture<'_, ()> {
        self.change(device_id, |r| r.announced = announced);
        ready(())
    }

    fn get(&self, device_id: &str) -> RecordsFuture<'_, Option<Arc<TerminalRecord>>> {
        ready(lock(&self.inner).records.get(device_id).cloned())
    }

    fn snapshot(&self) -> RecordsFuture<'_, Snapshot> {
        // A clone of the table (no rehashing): the fleet view looks each enrolled device up.
        ready(lock(&self.inner).records.clone())
    }

    fn retain<'a>(
        &'a self,
        enrolled: &'a (dyn Fn(&str) -> bool + Sync),
    ) -> RecordsFuture<'a, usize> {
        let mut inner = lock(&self.inner);
        let gone: Vec<Arc<str>> = inner
            .records
            .keys()
            .filter(|k| !enrolled(k))
            .cloned()
            .collect();
        for key in &gone {
            inner.records.remove(key);
            inner.dirty.insert(key.clone(), None);
        }
        ready(gone.len())
    }

    fn flush(&self) -> RecordsFuture<'_, ()> {
        Box::pin(async move {
            let _one = self.flushing.lock().await;
            let dirty = std::mem::take(&mut lock(&self.inner).dirty);
            if dirty.is_empty() {
                return Ok(());
            }
            let changes: Vec<(&str, Option<&TerminalRecord>)> =
                dirty.iter().map(|(k, v)| (&**k, v.as_deref())).collect();
            if let Err(error) = self.store.save_terminal_records(&changes).await {
                // Not lost: put back what no later change replaced, for the next flush.
                let mut inner = lock(&self.inner);
                for (k, v) in dirty {
                    inner.dirty.entry(k).or_insert(v);
                }
                return Err(error);
            }
            Ok(())
        })
    }
}

/// The records in the replicas' Redis (`[cluster]`), written through: one hash per device
/// (`first_seen`, `last_seen`, `last_issued` kept by an atomic script that never moves a time
/// back; `report` and `announced` as JSON) and the set of their ids.
#[derive(Debug)]
pub struct SharedRecords {
    cluster: Arc<Cluster>,
}

/// The set (and the hash prefix) of terminal records in Redis.
const SET: &str = "terminals";

impl SharedRecords {
    pub fn new(cluster: Arc<Cluster>) -> Self {
        Self { cluster }
    }
}

/// A record from its hash's fields; a field that does not decode is left out (the device's
/// next request or report writes it again).
fn decode(fields: &Fields) -> TerminalRecord {
    let time = |name: &str| {
        fields
            .get(name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse().ok())
    };
    TerminalRecord {
        first_seen: time("first_seen"),
        last_seen: time("last_seen"),
        last_issued: time("last_issued"),
        report: fields
            .get("report")
            .and_then(|v| serde_json::from_slice(v).ok()),
        announced: fields
            .get("announced")
            .and_then(|v| serde_json::from_slice(v).ok())
            .unwrap_or_default(),
    }
}

fn encode<T: serde::Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Encode {
        what,
        reason: e.to_string(),
    })
}

impl TerminalRecords for SharedRecords {
    fn seen(&self, device_id: &str, at: i64) -> RecordsFuture<'_, ()> {
        let device_id = device_id.to_owned();
        Box::pin(async move { Ok(self.cluster.seen(SET, &device_id, at, false).await?) })
    }

    fn issued(&self, device_id: &str, at: i64) -> RecordsFuture<'_, ()> {
        let device_id = device_id.to_owned();
        Box::pin(async move { Ok(self.cluster.seen(SET, &device_id, at, true).await?) })
    }

    fn report(&self, device_id: &str, report: ReceivedReport) -> RecordsFuture<'_, ()> {
        let device_id = device_id.to_owned();
        Box::pin(async move {
            let bytes = encode("report", &report)?;
            self.cluster
                .seen(SET, &device_id, report.received_at, false)
                .await?;
            Ok(self
                .cluster
                .set_field(SET, &device_id, "report", &bytes)
                .await?)
        })
    }

    fn announce(&self, device_id: &str, announced: Vec<Announced>) -> RecordsFuture<'_, ()> {
        let device_id = device_id.to_owned();
        Box::pin(async move {
            let bytes = encode("announced", &announced)?;
            Ok(self
                .cluster
                .set_field(SET, &device_id, "announced", &bytes)
                .await?)
        })
    }

    fn get(&self, device_id: &str) -> RecordsFuture<'_, Option<Arc<TerminalRecord>>> {
        let device_id = device_id.to_owned();
        Box::pin(async move {
            let fields = self.cluster.fields(SET, &device_id).await?;
            Ok((!fields.is_empty()).then(|| Arc::new(decode(&fields))))
        })
    }

    fn snapshot(&self) -> RecordsFuture<'_, Snapshot> {
        Box::pin(async move {
            Ok(self
                .cluster
                .members(SET)
                .await?
                .into_iter()
                .map(|(id, fields)| (Arc::from(id), Arc::new(decode(&fields))))
                .collect())
        })
    }

    fn retain<'a>(
        &'a self,
        enrolled: &'a (dyn Fn(&str) -> bool + Sync),
    ) -> RecordsFuture<'a, usize> {
        Box::pin(async move {
            let gone: Vec<String> = self
                .cluster
                .members(SET)
                .await?
                .into_iter()
                .map(|(id, _)| id)
                .filter(|id| !enrolled(id))
                .collect();
            self.cluster.remove_members(SET, &gone).await?;
            Ok(gone.len())
        })
    }

    fn flush(&self) -> RecordsFuture<'_, ()> {
        // Written through: every change is in Redis when its call returns (Redis's own
        // persistence, `appendonly`, makes it durable there).
        Box::pin(std::future::ready(Ok(())))
    }
}

/// The set of enrolled device ids, for [`TerminalRecords::retain`].
pub fn enrolled_set<'a>(ids: impl Iterator<Item = &'a str>) -> HashSet<String> {
    ids.map(str::to_owned).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Report;

    fn report(at: i64) -> ReceivedReport {
        ReceivedReport {
            received_at: at,
            report: Report::healthy("1.4.0", at, "2026-12-31"),
        }
    }

    /// Records reach sled on flush (not before) and a reopened store holds them; removals too.
    #[tokio::test]
    async fn flushed_records_survive_a_reopen_and_unflushed_ones_wait_for_the_flush() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let records =
                StoredRecords::open(Store::open(dir.path()).expect("store")).expect("open");
            records.seen("T-1", 100).await.expect("seen");
            records.issued("T-1", 110).await.expect("issued");
            records.report("T-2", report(120)).await.expect("report");
            assert_eq!(records.pending(), 2);
            assert!(
                records.store.terminal_records().expect("read").0.is_empty(),
                "nothing written before the flush"
            );
            records.flush().await.expect("flush");
            assert_eq!(records.pending(), 0);
            let gone = records
                .retain(&|id: &str| id == "T-1")
                .await
                .expect("retain");
            assert_eq!(gone, 1);
            records.flush().await.expect("flush");
        }
        let records = StoredRecords::open(crate::proxy::store::open_when_released(dir.path()))
            .expect("reopen");
        let all = records.snapshot().await.expect("snapshot");
        assert_eq!(all.len(), 1, "{all:?}");
        let t1 = records.get("T-1").await.expect("get").expect("T-1 kept");
        assert_eq!(
            (t1.first_seen, t1.last_seen, t1.last_issued),
            (Some(100), Some(110), Some(110))
        );
        assert!(
            records.get("T-2").await.expect("get").is_none(),
            "T-2 was dropped"
        );
    }

    #[tokio::test]
    async fn a_report_marks_the_terminal_seen_and_never_moves_last_seen_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let records = StoredRecords::open(Store::open(dir.path()).expect("store")).expect("open");
        records.seen("T-1", 500).await.expect("seen");
        records.report("T-1", report(400)).await.expect("report");
        let r = records.get("T-1").await.expect("get").expect("record");
        assert_eq!((r.first_seen, r.last_seen), (Some(500), Some(500)));
        assert_eq!(r.report.as_ref().map(|r| r.received_at), Some(400));
    }

    /// A record that does not decode is dropped (and removed on the next flush), never a
    /// failure to start.
    #[tokio::test]
    async fn an_undecodable_record_is_dropped_not_fatal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        store
            .put_raw_terminal_record("T-bad", b"{not json")
            .expect("write");
        let records = StoredRecords::open(store.clone()).expect("open despite the damage");
        assert!(records.get("T-bad").await.expect("get").is_none());
        records.flush().await.expect("flush");
        let (good, bad) = store.terminal_records().expect("read");
        assert!(good.is_empty() && bad.is_empty(), "{good:?} {bad:?}");
    }
}
