//! A userspace netem for kernels without `sch_netem`: packets that an `iptables ... -j NFQUEUE`
//! rule queues are held by the kernel until this handler gives its verdict over
//! `NETLINK_NETFILTER` (nfnetlink_queue), so delaying a verdict delays the packet, giving
//! verdicts out of order reorders packets, and a drop verdict loses one. The TCP stacks at both
//! ends see exactly that: it is their real retransmission, reordering and RTT machinery that the
//! link tests exercise, not a relay's.
//!
//! Owns: the nfnetlink_queue messages (bind, copy mode, verdicts, packet notifications), a
//! seeded random source (a run can be replayed with its seed), and counts of what it did. The
//! handler runs on a thread inside the namespace whose rules queue to it.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
    setsockopt, socket, sockopt,
};

use super::netns::Netns;

/// What to do to every packet the queue sees.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    /// Held this long before it goes on.
    pub delay: Duration,
    /// The fraction of packets dropped.
    pub loss: f64,
    /// The fraction of packets sent at once instead of after `delay` (netem's `reorder`): each
    /// overtakes the packets still held.
    pub reorder: f64,
}

/// What the handler did.
#[derive(Debug, Default)]
pub struct Counts {
    pub packets: AtomicU64,
    pub dropped: AtomicU64,
    /// Packets let through ahead of one that arrived before them.
    pub reordered: AtomicU64,
}

/// A running handler of one queue.
#[derive(Debug)]
pub struct Netem {
    pub counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_VERDICT: u16 = 1;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQA_CFG_MASK: u16 = 4;
const NFQA_CFG_FLAGS: u16 = 5;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_COPY_META: u8 = 1;
const NFQA_CFG_F_FAIL_OPEN: u32 = 1;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;

impl Netem {
    /// Handles queue `queue` of `netns` with `shape`, random decisions drawn from `seed`.
    pub fn start(netns: &Netns, queue: u16, shape: Shape, seed: u64) -> Result<Self, String> {
        let counts = Arc::new(Counts::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let (counts, stop) = (counts.clone(), stop.clone());
            netns.spawn(move || {
                let fd = match open(queue) {
                    Ok(fd) => {
                        let _ = ready_tx.send(Ok(()));
                        fd
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.clone()));
                        return Err(e);
                    }
                };
                serve(&fd, queue, shape, seed, &counts, &stop)
            })
        };
        ready_rx
            .recv()
            .map_err(|_| "the netem thread died".to_owned())??;
        Ok(Self {
            counts,
            stop,
            thread: Some(thread),
        })
    }

    /// Lets every held packet go and stops.
    pub fn stop(mut self) -> Result<(), String> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(std::thread::JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err("the netem thread panicked".into()),
            None => Ok(()),
        }
    }
}

impl Drop for Netem {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Opens a netfilter netlink socket bound to `queue`, copying packet metadata only and letting
/// packets through when the queue is full.
fn open(queue: u16) -> Result<OwnedFd, String> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )
    .map_err(|e| format!("netlink socket: {e}"))?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(|e| format!("netlink bind: {e}"))?;
    let _ = setsockopt(&fd, sockopt::RcvBuf, &(4 << 20));
    let mut attrs = Vec::new();
    attr(&mut attrs, NFQA_CFG_CMD, &[NFQNL_CFG_CMD_BIND, 0, 0, 2]);
    let mut params = 0xffffu32.to_be_bytes().to_vec();
    params.push(NFQNL_COPY_META);
    attr(&mut attrs, NFQA_CFG_PARAMS, &params);
    attr(&mut attrs, NFQA_CFG_QUEUE_MAXLEN, &4096u32.to_be_bytes());
    attr(
        &mut attrs,
        NFQA_CFG_MASK,
        &NFQA_CFG_F_FAIL_OPEN.to_be_bytes(),
    );
    attr(
        &mut attrs,
        NFQA_CFG_FLAGS,
        &NFQA_CFG_F_FAIL_OPEN.to_be_bytes(),
    );
    send_message(
        &fd,
        NFQNL_MSG_CONFIG,
        NLM_F_REQUEST | NLM_F_ACK,
        queue,
        &attrs,
    )?;
    let mut buf = vec![0u8; 8192];
    let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())
        .map_err(|e| format!("netlink ack: {e}"))?;
    match messages(&buf[..n]).next() {
        Some((NLMSG_ERROR, payload)) if payload.len() >= 4 => {
            let errno = i32::from_ne_bytes([payload[0], payload[1], payload[2], payload[3]]);
            if errno == 0 {
                Ok(fd)
            } else {
                Err(format!("binding queue {queue}: errno {}", -errno))
            }
        }
        _ => Err(format!("binding queue {queue}: no acknowledgement")),
    }
}

fn serve(
    fd: &OwnedFd,
    queue: u16,
    shape: Shape,
    seed: u64,
    counts: &Counts,
    stop: &AtomicBool,
) -> Result<(), String> {
    let mut random = XorShift(seed | 1);
    // Held packets: (when to release, arrival order, packet id).
    let mut held: BinaryHeap<Reverse<(Instant, u64, u32)>> = BinaryHeap::new();
    let mut arrivals = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    let verdict = |id: u32, v: u32| {
        let mut attrs = Vec::new();
        let mut hdr = v.to_be_bytes().to_vec();
        hdr.extend_from_slice(&id.to_be_bytes());
        attr(&mut attrs, NFQA_VERDICT_HDR, &hdr);
        send_message(fd, NFQNL_MSG_VERDICT, NLM_F_REQUEST, queue, &attrs)
    };
    loop {
        let now = Instant::now();
        while let Some(Reverse((at, _, id))) = held.peek().copied() {
            if at > now && !stop.load(Ordering::Relaxed) {
                break;
            }
            held.pop();
            verdict(id, NF_ACCEPT)?;
        }
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let wait = held
            .peek()
            .map_or(Duration::from_millis(50), |Reverse((at, _, _))| {
                at.saturating_duration_since(now)
            })
            .clamp(Duration::from_millis(1), Duration::from_millis(50));
        // At most 50 ms: fits suseconds_t, which is 32 bits on 32-bit ARM.
        let micros = wait.as_micros().try_into().unwrap_or(50_000);
        let tv = nix::sys::time::TimeVal::new(0, micros);
        setsockopt(fd, sockopt::ReceiveTimeout, &tv).map_err(|e| format!("timeout: {e}"))?;
        let n = match recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(n) => n,
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
            // Notifications lost while the socket buffer was full: those packets stay queued
            // until the kernel gives up on them; TCP retransmits.
            Err(nix::errno::Errno::ENOBUFS) => continue,
            Err(e) => return Err(format!("netlink recv: {e}")),
        };
        for (kind, payload) in messages(&buf[..n]) {
            if kind != (NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_PACKET) || payload.len() < 4 {
                continue;
            }
            let Some(id) = packet_id(&payload[4..]) else {
                continue;
            };
            counts.packets.fetch_add(1, Ordering::Relaxed);
            arrivals += 1;
            let now = Instant::now();
            if random.unit() < shape.loss {
                counts.dropped.fetch_add(1, Ordering::Relaxed);
                verdict(id, NF_DROP)?;
            } else if shape.delay.is_zero() || random.unit() < shape.reorder {
                if !held.is_empty() {
                    counts.reordered.fetch_add(1, Ordering::Relaxed);
                }
                verdict(id, NF_ACCEPT)?;
            } else {
                held.push(Reverse((now + shape.delay, arrivals, id)));
            }
        }
    }
}

/// Appends one netlink attribute (padded to 4 bytes).
fn attr(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    out.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// Sends one nfnetlink_queue message (`nlmsghdr`, `nfgenmsg` for `queue`, attributes).
fn send_message(
    fd: &OwnedFd,
    msg: u16,
    flags: u16,
    queue: u16,
    attrs: &[u8],
) -> Result<(), String> {
    let len = 16 + 4 + attrs.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&(NFNL_SUBSYS_QUEUE << 8 | msg).to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[0, 0]);
    m.extend_from_slice(&queue.to_be_bytes());
    m.extend_from_slice(attrs);
    send(fd.as_raw_fd(), &m, MsgFlags::empty())
        .map(drop)
        .map_err(|e| format!("netlink send: {e}"))
}

/// The netlink messages in a datagram: (type, payload after the 16-byte header).
fn messages(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 16 {
            return None;
        }
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        if len < 16 || len > buf.len() {
            return None;
        }
        let payload = &buf[16..len];
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        Some((kind, payload))
    })
}

/// The packet id in a packet notification's attributes.
fn packet_id(mut attrs: &[u8]) -> Option<u32> {
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if kind == NFQA_PACKET_HDR && len >= 8 {
            return Some(u32::from_be_bytes([attrs[4], attrs[5], attrs[6], attrs[7]]));
        }
        attrs = &attrs[len.next_multiple_of(4).min(attrs.len())..];
    }
    None
}

/// xorshift64*: reproducible decisions from a seed.
struct XorShift(u64);

impl XorShift {
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}
