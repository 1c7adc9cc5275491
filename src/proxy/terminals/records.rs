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
//! (`[cluster]`, issue 16) need one more implementation of this trait on Redis (a hash per
//! device, written through); the routes, the rules and the pages do not change.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use super::record::{Announced, ReceivedReport, TerminalRecord};
use crate::proxy::store::{Store, StoreError};
use crate::sync::lock;

/// What a [`TerminalRecords`] answers.
pub type RecordsFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Every record, shared: `(device_id, record)`.
pub type Snapshot = Vec<(Arc<str>, Arc<TerminalRecord>)>;

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
        let inner = lock(&self.inner);
        ready(
            inner
                .records
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
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

/// The set of enrolled device ids, for [`TerminalRecords::retain`].
pub fn enrolled_set<'a>(ids: impl Iterator<Item = &'a str>) -> HashSet<String> {
    ids.map(str::to_owned).collect()
}
