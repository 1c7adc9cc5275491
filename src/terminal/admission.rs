//! Who gets room on the socket, as data: the connection slots with their per-uid shares and the
//! idle-first eviction, the connections that have not sent a byte yet (pending), the budget for
//! answering denied peers, the cap on waiting requests, and the rate limit on the log lines
//! about all of them.
//!
//! The policy, in the order a connection meets it: a denied peer never enters the table (the
//! server answers it from [`Admission::try_deny`]'s budget or closes it); an allowed one whose
//! request is already there when it is accepted (the face app writes right after connecting)
//! goes straight to a slot; a silent one is *pending* and holds no slot until its first byte,
//! and past `max_pending_connections` silent ones the oldest is closed for the newcomer (so a
//! face app that lost the race between its `connect` and its first write is not the one shut
//! out: a flood must open that many connections in that instant to push it out). When no slot
//! is free, or
//! the uid holds its share, the connection idle the longest (between requests, or still sending
//! a request head) is closed for the newcomer; only when every candidate is busy answering does
//! the newcomer get 503 `BUSY`.
//!
//! Owns: the bookkeeping and its invariants (a slot is counted once, an evicted connection is
//! told once). It must not touch sockets or write answers: the server does both.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::config::SocketLimits;
use super::metrics::Busy;
use crate::sync::lock;

/// One connection in the table: pending or holding a slot.
#[derive(Debug)]
struct Ticket {
    id: u64,
    uid: u32,
    /// When it went idle, in [`Admission::idle_clock`] ticks; 0 while a request is answered.
    idle_since: AtomicU64,
    /// Told once when the connection must close to make room.
    evicted: Notify,
}

#[derive(Debug, Default)]
struct Table {
    next_id: u64,
    /// Connections holding a slot (at most `max_connections`: a linear scan is cheap).
    slots: Vec<Arc<Ticket>>,
    /// Slots held per uid.
    per_uid: HashMap<u32, usize>,
    /// Connections that have not sent a byte, oldest first.
    pending: BTreeMap<u64, Arc<Ticket>>,
}

impl Table {
    fn ticket(&mut self, uid: u32, idle_since: u64) -> Arc<Ticket> {
        self.next_id += 1;
        Arc::new(Ticket {
            id: self.next_id,
            uid,
            idle_since: AtomicU64::new(idle_since),
            evicted: Notify::new(),
        })
    }

    fn release(&mut self, id: u64) -> Option<Arc<Ticket>> {
        let at = self.slots.iter().position(|t| t.id == id)?;
        let ticket = self.slots.swap_remove(at);
        if let Some(n) = self.per_uid.get_mut(&ticket.uid) {
            *n -= 1;
            if *n == 0 {
                self.per_uid.remove(&ticket.uid);
            }
        }
        Some(ticket)
    }
}

/// The socket's admission state, shared by the accept loop and every connection task.
#[derive(Debug)]
pub struct Admission {
    limits: SocketLimits,
    table: Mutex<Table>,
    /// Orders idle connections: each one going idle takes the next tick (no clock read).
    idle_clock: AtomicU64,
    /// Places held under each [`Counted`] limit, indexed by it.
    counted: [AtomicUsize; 3],
}

/// The limits that only count their holders: a [`Place`] of each is taken with `try_place`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Counted {
    /// A 503 answer lingering for its client to read it (`max_pending_connections`).
    Lingering,
    /// A request waiting for the daemon's answer (`max_waiting_requests`).
    Waiting,
    /// A denied peer's connection being answered (`max_denied_connections`).
    Denied,
}

impl Admission {
    pub fn new(limits: SocketLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            table: Mutex::default(),
            idle_clock: AtomicU64::new(1),
            counted: Default::default(),
        })
    }

    pub fn limits(&self) -> &SocketLimits {
        &self.limits
    }

    fn tick(&self) -> u64 {
        self.idle_clock.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Registers an allowed peer's silent connection as pending; when that passes
    /// `max_pending_connections`, the oldest pending connection is told to close.
    pub fn enter_pending(self: &Arc<Self>, uid: u32) -> Pending {
        let mut table = lock(&self.table);
        if table.pending.len() >= self.limits.max_pending_connections
            && let Some((_, oldest)) = table.pending.pop_first()
        {
            oldest.evicted.notify_one();
        }
        let ticket = table.ticket(uid, 0);
        table.pending.insert(ticket.id, ticket.clone());
        Pending {
            admission: self.clone(),
            ticket,
        }
    }

    /// Room to linger over one more 503 answer, if fewer than `max_pending_connections` are.
    pub fn try_linger(self: &Arc<Self>) -> Option<Place> {
        self.try_place(Counted::Lingering)
    }

    /// A slot for a connection of `uid` that sent its first byte; makes room by evicting the
    /// connection idle the longest (of the same uid when the uid holds its share), or says which
    /// limit left none.
    pub fn take_slot(self: &Arc<Self>, uid: u32) -> Result<Slot, Busy> {
        let mut table = lock(&self.table);
        let held = table.per_uid.get(&uid).copied().unwrap_or(0);
        let scope = if held >= self.limits.max_connections_per_uid {
            Some(Some(uid))
        } else if table.slots.len() >= self.limits.max_connections {
            Some(None)
        } else {
            None
        };
        if let Some(scope) = scope {
            let victim = table
                .slots
                .iter()
                .filter(|t| scope.is_none_or(|uid| t.uid == uid))
                .filter_map(|t| {
                    let since = t.idle_since.load(Ordering::Relaxed);
                    (since != 0).then_some((since, t.id))
                })
                .min();
            let Some((_, id)) = victim else {
                return Err(if scope.is_some() {
                    Busy::UidConnections
                } else {
                    Busy::Connections
                });
            };
            if let Some(victim) = table.release(id) {
                victim.evicted.notify_one();
            }
        }
        // A new slot counts as idle until its request head is read: a client that trickles its
        // head is as evictable as one idle between requests.
        let ticket = table.ticket(uid, self.tick());
        table.slots.push(ticket.clone());
        *table.per_uid.entry(uid).or_default() += 1;
        Ok(Slot {
            admission: self.clone(),
            ticket,
        })
    }

    /// Room for one more waiting request, if fewer than `max_waiting_requests` wait.
    pub fn try_wait(self: &Arc<Self>) -> Option<Place> {
        self.try_place(Counted::Waiting)
    }

    /// Room to answer one more denied peer, if fewer than `max_denied_connections` are being
    /// answered.
    pub fn try_deny(self: &Arc<Self>) -> Option<Place> {
        self.try_place(Counted::Denied)
    }

    fn try_place(self: &Arc<Self>, counted: Counted) -> Option<Place> {
        let max = match counted {
            Counted::Lingering => self.limits.max_pending_connections,
            Counted::Waiting => self.limits.max_waiting_requests,
            Counted::Denied => self.limits.max_denied_connections,
        };
        self.counted[counted as usize]
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
            .then(|| Place {
                admission: self.clone(),
                counted,
            })
    }

    /// Slots held now (tests).
    pub fn slots(&self) -> usize {
        lock(&self.table).slots.len()
    }

    /// Pending connections now (tests).
    pub fn pending(&self) -> usize {
        lock(&self.table).pending.len()
    }
}

/// A pending connection: registered until it takes a slot, closes, or is evicted.
#[derive(Debug)]
pub struct Pending {
    admission: Arc<Admission>,
    ticket: Arc<Ticket>,
}

impl Pending {
    /// Resolves when the connection must close to make room for a newer one.
    pub async fn evicted(&self) {
        self.ticket.evicted.notified().await;
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        lock(&self.admission.table).pending.remove(&self.ticket.id);
    }
}

/// A place under one of the counted limits (a lingering 503, a waiting request, a denied peer
/// being answered), released on drop.
#[derive(Debug)]
pub struct Place {
    admission: Arc<Admission>,
    counted: Counted,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.admission.counted[self.counted as usize].fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection's slot, released on drop.
#[derive(Debug)]
pub struct Slot {
    admission: Arc<Admission>,
    ticket: Arc<Ticket>,
}

impl Slot {
    /// A request is being answered: not evictable until [`idle`](Self::idle).
    pub fn busy(&self) {
        self.ticket.idle_since.store(0, Ordering::Relaxed);
    }

    /// The answer is done: evictable again, behind every connection idle for longer.
    pub fn idle(&self) {
        let tick = self.admission.tick();
        self.ticket.idle_since.store(tick, Ordering::Relaxed);
    }

    /// Resolves when the slot was given to another connection.
    pub async fn evicted(&self) {
        self.ticket.evicted.notified().await;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        lock(&self.admission.table).release(self.ticket.id);
    }
}

// === log rate limit ===

/// Peers tracked by a [`LogThrottle`]; the others share one entry.
const MAX_TRACKED_PEERS: usize = 256;

/// One line per peer per interval: the first event of a peer is logged at once, the rest of the
/// interval only counted, and the count logged when the interval ends ([`LogThrottle::due`]).
#[derive(Debug)]
pub struct LogThrottle {
    interval: Duration,
    /// By uid; `None` gathers the peers beyond [`MAX_TRACKED_PEERS`].
    peers: Mutex<BTreeMap<Option<u32>, Window>>,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    /// Events since the last line.
    unlogged: u64,
}

impl LogThrottle {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            peers: Mutex::default(),
        }
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Records an event of `uid` at `now`; `Some(n)` when a line is due now, `n` being the events
    /// of this peer not logged since its last line.
    pub fn event(&self, uid: u32, now: Instant) -> Option<u64> {
        let mut peers = lock(&self.peers);
        let key = if peers.len() >= MAX_TRACKED_PEERS && !peers.contains_key(&Some(uid)) {
            None
        } else {
            Some(uid)
        };
        match peers.get_mut(&key) {
            None => {
                peers.insert(
                    key,
                    Window {
                        started: now,
                        unlogged: 0,
                    },
                );
                Some(0)
            }
            Some(w) if now.duration_since(w.started) >= self.interval => {
                let unlogged = w.unlogged;
                *w = Window {
                    started: now,
                    unlogged: 0,
                };
                Some(unlogged)
            }
            Some(w) => {
                w.unlogged += 1;
                None
            }
        }
    }

    /// The peers whose interval ended with events not logged, and how many (a window with none
    /// is forgotten; one with some starts again, so a flood gets one line per interval).
    pub fn due(&self, now: Instant) -> Vec<(Option<u32>, u64)> {
        let mut due = Vec::new();
        lock(&self.peers).retain(|uid, w| {
            if now.duration_since(w.started) < self.interval {
                return true;
            }
            if w.unlogged == 0 {
                return false;
            }
            due.push((*uid, w.unlogged));
            *w = Window {
                started: now,
                unlogged: 0,
            };
            true
        });
        due
    }

    /// Every count not yet logged (at shutdown).
    pub fn drain(&self) -> Vec<(Option<u32>, u64)> {
        std::mem::take(&mut *lock(&self.peers))
            .into_iter()
            .filter(|(_, w)| w.unlogged > 0)
            .map(|(uid, w)| (uid, w.unlogged))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, per_uid: usize, pending: usize) -> SocketLimits {
        SocketLimits {
            max_connections: max,
            max_connections_per_uid: per_uid,
            max_pending_connections: pending,
            max_waiting_requests: 1,
            max_denied_connections: 1,
            ..SocketLimits::default()
        }
    }

    /// Whether the connection has been told to close: one poll, no waiting (a notification is
    /// stored until it is awaited).
    fn told(evicted: impl std::future::Future<Output = ()>) -> bool {
        let mut evicted = std::pin::pin!(evicted);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        evicted.as_mut().poll(&mut cx).is_ready()
    }

    #[test]
    fn a_full_table_evicts_the_connection_idle_longest_never_a_busy_one() {
        let admission = Admission::new(limits(3, 3, 8));
        let a = admission.take_slot(1).expect("a");
        let b = admission.take_slot(1).expect("b");
        let c = admission.take_slot(1).expect("c");
        a.busy();
        c.busy();
        c.idle();
        // b has been idle (reading its head) since before c went idle: b goes.
        let d = admission.take_slot(2).expect("d evicts b");
        assert!(told(b.evicted()));
        assert!(!told(a.evicted()) && !told(c.evicted()));
        assert_eq!(admission.slots(), 3);
        d.busy();
        let e = admission.take_slot(2).expect("e evicts c");
        assert!(told(c.evicted()));
        e.busy();
        assert_eq!(admission.take_slot(3).err(), Some(Busy::Connections));
        drop((a, b, c, d));
        assert_eq!(
            admission.slots(),
            1,
            "an evicted slot is not released twice"
        );
        drop(e);
        assert_eq!(admission.slots(), 0);
    }

    #[test]
    fn a_uid_at_its_share_evicts_only_its_own_idle_connections() {
        let admission = Admission::new(limits(4, 2, 8));
        let other = admission.take_slot(7).expect("other uid");
        let a = admission.take_slot(1).expect("a");
        let b = admission.take_slot(1).expect("b");
        let c = admission.take_slot(1).expect("c takes a's place");
        assert!(told(a.evicted()));
        assert!(!told(other.evicted()), "the other uid's idle slot is kept");
        b.busy();
        c.busy();
        assert_eq!(admission.take_slot(1).err(), Some(Busy::UidConnections));
        assert!(admission.take_slot(9).is_ok(), "another uid still gets in");
    }

    #[test]
    fn the_oldest_pending_connection_makes_room_for_a_new_one() {
        let admission = Admission::new(limits(4, 4, 2));
        let first = admission.enter_pending(1);
        let second = admission.enter_pending(1);
        let third = admission.enter_pending(1);
        assert!(told(first.evicted()));
        assert!(!told(second.evicted()) && !told(third.evicted()));
        assert_eq!(admission.pending(), 2);
        drop((first, second));
        assert_eq!(admission.pending(), 1);
    }

    #[test]
    fn lingering_waiting_and_denied_budgets_are_counted_and_released() {
        let admission = Admission::new(limits(4, 4, 1));
        let l = admission.try_linger().expect("the first 503 lingers");
        assert!(admission.try_linger().is_none());
        drop(l);
        assert!(admission.try_linger().is_some());
        let w = admission.try_wait().expect("first waits");
        assert!(admission.try_wait().is_none());
        drop(w);
        assert!(admission.try_wait().is_some());
        let d = admission.try_deny().expect("first denied is answered");
        assert!(admission.try_deny().is_none());
        drop(d);
        assert!(admission.try_deny().is_some());
    }

    #[test]
    fn a_flood_gets_one_line_per_interval_with_its_count() {
        let t = LogThrottle::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(t.event(42, t0), Some(0), "the first is logged");
        for i in 1..=9 {
            assert_eq!(t.event(42, t0 + Duration::from_secs(i)), None);
        }
        assert_eq!(t.event(7, t0), Some(0), "another peer has its own line");
        assert!(t.due(t0 + Duration::from_secs(30)).is_empty());
        assert_eq!(t.due(t0 + Duration::from_secs(61)), vec![(Some(42), 9)]);
        assert_eq!(t.event(42, t0 + Duration::from_secs(62)), None);
        assert_eq!(
            t.event(42, t0 + Duration::from_secs(122)),
            Some(1),
            "a new interval logs again, with what the last one counted"
        );
        assert_eq!(t.event(42, t0 + Duration::from_secs(123)), None);
        assert_eq!(t.drain(), vec![(Some(42), 1)]);
    }
}
