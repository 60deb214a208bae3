//! Counters and latency histograms, per worker, merged for reports.
//!
//! Each queue worker owns a [`TxCounters`] and an [`RxCounters`] block (its sending and
//! receiving half) on their own cache lines and adds to them with relaxed atomics once per burst or batch, never per
//! packet. Latency is recorded into a [`LocalHistogram`] owned by the worker and folded into a shared
//! one at most every [`FOLD_EVERY`]: one uncontended lock per interval, never per packet.
//! The reporter (a tokio task) takes [`Snapshot`]s and prints rates and percentiles.

pub mod kernel;
pub mod prometheus;
pub mod report;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Why a packet (or a whole batch) was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum DropReason {
    /// No batch slot free for a packet (more destinations in one burst than slots).
    NoBuffer,
    /// The broker connection was down when the batch was due.
    BrokerDown,
    /// The broker had blocked publishing (a memory or disk alarm) when the batch was due.
    BrokerBlocked,
    /// A message from the bus that does not decode.
    Malformed,
    /// A packet larger than a batch may carry.
    TooBig,
    /// Bytes from the TUN that are not IPv4/IPv6.
    NotIp,
    /// A virtio header that is not on the allow-list for its packet (`codec::vnet`).
    BadVnet,
    /// A super-packet (TSO/USO) from the bus while `--no-offload-from-bus` is set.
    OffloadRefused,
    /// The kernel refused a TUN write.
    TunWrite,
    /// An MLD message (query, report, done), not forwarded on purpose (see `route::is_mld`).
    Mld,
    /// A packet whose source address its sender's broker user may not use.
    Spoofed,
    /// A packet in a message without `user_id`: nobody vouches for it.
    NoIdentity,
    /// Packets the kernel dropped on our TUN because its queue was full (the worker was
    /// busy): the interface's `tx_dropped`, read from the kernel ([`kernel`]).
    TunQueueFull,
    /// A control message from someone not allowed to give it (`ip.tun.start` from a
    /// non-coordinator, an address outside the session's subnet, one start too many).
    ForgedControl,
    /// Dropped by the link emulation on purpose (`--emulate`: loss, a flap, its limit).
    Emulated,
    /// A batch of another layer than this agent's port (Ethernet frames at an IP agent,
    /// IP packets at a serial probe): sessions of different layers do not mix.
    WrongLayer,
    /// Dropped by the queue management (`worker::aqm`): a packet of a flow that is not
    /// ECN-capable, while the bus held a standing queue (ECN-capable ones are marked).
    Aqm,
    /// An Ethernet frame whose source MAC its sender's broker user may not use (L2).
    SpoofedMac,
    /// A flooded frame (broadcast, multicast, unknown unicast) over its sender's flood
    /// bound at this receiver (`route::mac::FloodLimit`).
    FloodLimit,
    /// A unit too short to be an Ethernet frame (read from a TAP or from the bus).
    BadFrame,
    /// End-to-end (`--e2e`): a sealed message that does not open under the session or group
    /// key of the broker user it claims (forged, altered, moved to another key, or sealed
    /// under a session this agent no longer has). Counted in messages.
    DecryptFailed,
    /// End-to-end: a sealed message whose counter was already accepted (a replay), or a
    /// handshake message that repeats one. Counted in messages.
    Replayed,
    /// End-to-end: a peer without a public key in the peers file (or a destination no peer
    /// owns): its traffic is refused both ways.
    NoKey,
    /// End-to-end: a batch for a peer whose handshake is under way (TCP and ping resend).
    NoSession,
    /// End-to-end: a batch in clear at an `--e2e` agent, which never accepts one.
    Plaintext,
    /// End-to-end without a peers file: a hello naming an agent whose key was pinned on
    /// first use with another key or broker user (an impostor, or a regenerated key).
    /// Counted in messages.
    KeyConflict,
}

impl DropReason {
    pub const ALL: [DropReason; 26] = [
        DropReason::NoBuffer,
        DropReason::BrokerDown,
        DropReason::BrokerBlocked,
        DropReason::Malformed,
        DropReason::TooBig,
        DropReason::NotIp,
        DropReason::BadVnet,
        DropReason::OffloadRefused,
        DropReason::TunWrite,
        DropReason::TunQueueFull,
        DropReason::Mld,
        DropReason::Spoofed,
        DropReason::NoIdentity,
        DropReason::ForgedControl,
        DropReason::Emulated,
        DropReason::WrongLayer,
        DropReason::Aqm,
        DropReason::SpoofedMac,
        DropReason::FloodLimit,
        DropReason::BadFrame,
        DropReason::DecryptFailed,
        DropReason::Replayed,
        DropReason::NoKey,
        DropReason::NoSession,
        DropReason::Plaintext,
        DropReason::KeyConflict,
    ];

    /// Stable snake_case name, used in reports and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::NoBuffer => "no_buffer",
            DropReason::BrokerDown => "broker_down",
            DropReason::BrokerBlocked => "broker_blocked",
            DropReason::Malformed => "malformed",
            DropReason::TooBig => "too_big",
            DropReason::NotIp => "not_ip",
            DropReason::BadVnet => "bad_vnet",
            DropReason::OffloadRefused => "offload_refused",
            DropReason::TunWrite => "tun_write",
            DropReason::TunQueueFull => "tun_queue_full",
            DropReason::Mld => "mld",
            DropReason::Spoofed => "spoofed",
            DropReason::NoIdentity => "no_identity",
            DropReason::ForgedControl => "forged_control",
            DropReason::Emulated => "emulated",
            DropReason::WrongLayer => "wrong_layer",
            DropReason::Aqm => "aqm",
            DropReason::SpoofedMac => "spoofed_mac",
            DropReason::FloodLimit => "flood_limit",
            DropReason::BadFrame => "bad_frame",
            DropReason::DecryptFailed => "decrypt_failed",
            DropReason::Replayed => "replayed",
            DropReason::NoKey => "no_key",
            DropReason::NoSession => "no_session",
            DropReason::Plaintext => "plaintext",
            DropReason::KeyConflict => "key_conflict",
        }
    }
}

/// Adds `n` to a counter (relaxed; skipped when 0).
#[inline]
fn add(field: &AtomicU64, n: u64) {
    if n != 0 {
        field.fetch_add(n, Ordering::Relaxed);
    }
}

/// Drops by reason.
#[derive(Debug, Default)]
struct Drops([AtomicU64; DropReason::ALL.len()]);

impl Drops {
    fn load(&self) -> [u64; DropReason::ALL.len()] {
        let mut out = [0; DropReason::ALL.len()];
        for (o, a) in out.iter_mut().zip(&self.0) {
            *o = a.load(Ordering::Relaxed);
        }
        out
    }
}

/// What passed one way: messages (batches), packets, IP bytes.
#[derive(Debug, Default)]
pub struct Passed {
    batches: AtomicU64,
    packets: AtomicU64,
    bytes: AtomicU64,
}

impl Passed {
    /// One message of `packets` packets and `bytes` IP bytes passed.
    #[inline]
    pub fn message(&self, packets: u64, bytes: u64) {
        add(&self.batches, 1);
        add(&self.packets, packets);
        add(&self.bytes, bytes);
    }

    fn load(&self) -> (u64, u64, u64) {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        (l(&self.batches), l(&self.packets), l(&self.bytes))
    }
}

/// What the sending half of one queue counts: what it published, its link's reconnects,
/// its drops (and, in a block of its own, the kernel's drops on the TUN, [`kernel`]).
/// Aligned so two blocks never share a cache line.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct TxCounters {
    pub sent: Passed,
    reconnects: AtomicU64,
    drops: Drops,
}

impl TxCounters {
    #[inline]
    pub fn record_drop(&self, reason: DropReason, n: u64) {
        add(&self.drops.0[reason as usize], n);
    }

    /// Sets a drop count kept elsewhere (the kernel's, see [`kernel`]).
    pub fn set_drop(&self, reason: DropReason, n: u64) {
        self.drops.0[reason as usize].store(n, Ordering::Relaxed);
    }

    /// The link came up again after it was lost.
    pub fn reconnected(&self) {
        add(&self.reconnects, 1);
    }

    /// This block alone.
    pub fn snapshot(&self) -> Snapshot {
        let mut s = Snapshot::default();
        s.add_tx(self);
        s
    }
}

/// What the receiving half of one queue counts: what it wrote into the TUN, its drops
/// (and, in a block of its own, refused control messages). Aligned like [`TxCounters`].
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct RxCounters {
    pub received: Passed,
    drops: Drops,
    /// Packets the queue management marked with CE (congestion experienced).
    marked: AtomicU64,
    /// The consumer's prefetch now, once it grew (0: the configured one).
    prefetch: AtomicU64,
}

impl RxCounters {
    /// The consumer's prefetch grew to `p` (`worker::window`).
    pub fn set_prefetch(&self, p: u16) {
        self.prefetch.store(u64::from(p), Ordering::Relaxed);
    }

    /// `n` packets were marked CE by the queue management.
    #[inline]
    pub fn record_marks(&self, n: u64) {
        add(&self.marked, n);
    }

    #[inline]
    pub fn record_drop(&self, reason: DropReason, n: u64) {
        add(&self.drops.0[reason as usize], n);
    }

    /// This block alone.
    pub fn snapshot(&self) -> Snapshot {
        let mut s = Snapshot::default();
        s.add_rx(self);
        s
    }
}

/// Every counter block of one agent: the reports and the metrics endpoint sum them.
#[derive(Clone, Debug, Default)]
pub struct AgentCounters {
    pub tx: Vec<Arc<TxCounters>>,
    pub rx: Vec<Arc<RxCounters>>,
}

/// Plain copy of an agent's counters, summed over its blocks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub tx_batches: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub rx_batches: u64,
    pub reconnects: u64,
    /// Packets marked CE by the receivers' queue management.
    pub ce_marked: u64,
    /// The largest consumer prefetch any queue grew to (0: none grew).
    pub prefetch: u64,
    pub drops: [u64; DropReason::ALL.len()],
}

impl Snapshot {
    pub fn of(counters: &AgentCounters) -> Snapshot {
        let mut total = Snapshot::default();
        for c in &counters.tx {
            total.add_tx(c);
        }
        for c in &counters.rx {
            total.add_rx(c);
        }
        total
    }

    fn add_tx(&mut self, c: &TxCounters) {
        let (b, p, n) = c.sent.load();
        (self.tx_batches, self.tx_packets, self.tx_bytes) = (self.tx_batches + b, self.tx_packets + p, self.tx_bytes + n);
        self.reconnects += c.reconnects.load(Ordering::Relaxed);
        self.add_drops(&c.drops);
    }

    fn add_rx(&mut self, c: &RxCounters) {
        let (b, p, n) = c.received.load();
        (self.rx_batches, self.rx_packets, self.rx_bytes) = (self.rx_batches + b, self.rx_packets + p, self.rx_bytes + n);
        self.ce_marked += c.marked.load(Ordering::Relaxed);
        self.prefetch = self.prefetch.max(c.prefetch.load(Ordering::Relaxed));
        self.add_drops(&c.drops);
    }

    fn add_drops(&mut self, d: &Drops) {
        for (t, n) in self.drops.iter_mut().zip(d.load()) {
            *t += n;
        }
    }

    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize]
    }

    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }
}

/// Latency histogram shared between a recording task and the reporter.
pub type SharedHistogram = Arc<Mutex<Histogram<u64>>>;

/// Histogram of 1 to 60 000 000 (µs: up to a minute; also packet and byte counts) with 2
/// significant digits: 1 % resolution is plenty for percentiles, and at ~50 KiB it is 8x
/// smaller than 3 digits, which matters with several per queue and hundreds of agents per lab.
pub fn new_histogram() -> Histogram<u64> {
    // invariant: these bounds are valid for hdrhistogram (low >= 1, high >= 2 * low, sigfig <= 5)
    Histogram::new_with_bounds(1, 60_000_000, 2).expect("valid histogram bounds")
}

/// The histograms of one queue. Each has one recording task (the link of that queue) that
/// folds into it periodically; reports merge them across queues.
#[derive(Debug)]
pub struct Histograms {
    /// One-way latency in µs: the sender's batch timestamp → the delivery reaching the RX path.
    pub one_way_us: SharedHistogram,
    /// µs from the TUN read burst that opened a batch to the end of its publish (TX).
    pub read_to_publish_us: SharedHistogram,
    /// Packets per published batch (TX).
    pub batch_packets: SharedHistogram,
    /// Bytes per published batch body (TX).
    pub batch_bytes: SharedHistogram,
    /// µs a queue worker spent in one turn of its loop, from waking to waiting again: what
    /// its port and its connection waited for it (nothing in a turn waits on the network,
    /// so this stays short also while the broker is away).
    pub loop_turn_us: SharedHistogram,
}

impl Histograms {
    pub fn new() -> Arc<Histograms> {
        let h = || Arc::new(Mutex::new(new_histogram()));
        Arc::new(Histograms { one_way_us: h(), read_to_publish_us: h(), batch_packets: h(), batch_bytes: h(), loop_turn_us: h() })
    }
}

/// How often a local histogram is folded into its shared one.
pub const FOLD_EVERY: Duration = Duration::from_millis(500);

/// A histogram owned by one task, folded into `shared` periodically.
pub struct LocalHistogram {
    local: Histogram<u64>,
    shared: SharedHistogram,
    last_fold: Instant,
}

impl LocalHistogram {
    pub fn new(shared: SharedHistogram) -> LocalHistogram {
        LocalHistogram { local: new_histogram(), shared, last_fold: Instant::now() }
    }

    /// Records `n` samples of `value_us` (saturated into range).
    #[inline]
    pub fn record_n(&mut self, value_us: u64, n: u64) {
        self.local.saturating_record_n(value_us.max(1), n);
    }

    /// Folds into the shared histogram when due (or when `force`).
    pub fn maybe_fold(&mut self, now: Instant, force: bool) {
        self.fold_if_older(now, if force { Duration::ZERO } else { FOLD_EVERY });
    }

    /// Folds when the last fold is at least `age` old: a worker that has just gone quiet
    /// folds soon (readers see its last samples) without folding after every message.
    pub fn fold_if_older(&mut self, now: Instant, age: Duration) {
        if now.duration_since(self.last_fold) >= age {
            if !self.local.is_empty() {
                if let Ok(mut shared) = self.shared.lock() {
                    let _ = shared.add(&self.local);
                }
                self.local.reset();
            }
            self.last_fold = now;
        }
    }
}

impl Drop for LocalHistogram {
    fn drop(&mut self) {
        self.maybe_fold(Instant::now(), true);
    }
}

/// The state of one link, shared by its worker (writer) and the status server (reader).
#[derive(Debug, Default)]
pub struct LinkState {
    /// 0: not connected; i + 1: connected to node i.
    node: AtomicUsize,
}

impl LinkState {
    pub fn up(&self, node: usize) {
        self.node.store(node + 1, Ordering::Relaxed);
    }

    pub fn down(&self) {
        self.node.store(0, Ordering::Relaxed);
    }

    /// The node connected to, if any.
    pub fn node(&self) -> Option<usize> {
        self.node.load(Ordering::Relaxed).checked_sub(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_sum_both_directions() {
        let (a, b) = (Arc::new(TxCounters::default()), Arc::new(TxCounters::default()));
        let r = Arc::new(RxCounters::default());
        a.sent.message(3, 300);
        b.sent.message(4, 400);
        b.reconnected();
        b.record_drop(DropReason::BrokerDown, 1);
        r.received.message(5, 500);
        r.record_drop(DropReason::Malformed, 2);
        let s = Snapshot::of(&AgentCounters { tx: vec![a, b], rx: vec![r] });
        assert_eq!((s.tx_batches, s.tx_packets, s.tx_bytes, s.reconnects), (2, 7, 700, 1));
        assert_eq!((s.rx_batches, s.rx_packets, s.rx_bytes), (1, 5, 500));
        assert_eq!(s.dropped(DropReason::Malformed), 2);
        assert_eq!(s.total_drops(), 3);
    }

    #[test]
    fn local_histogram_folds() {
        let shared: SharedHistogram = Arc::new(Mutex::new(new_histogram()));
        let mut h = LocalHistogram::new(shared.clone());
        h.record_n(100, 5);
        h.maybe_fold(Instant::now(), true);
        assert_eq!(shared.lock().unwrap().len(), 5);
    }

    #[test]
    fn link_state_says_which_node() {
        let s = LinkState::default();
        assert_eq!(s.node(), None);
        s.up(0);
        assert_eq!(s.node(), Some(0));
        s.up(2);
        assert_eq!(s.node(), Some(2));
        s.down();
        assert_eq!(s.node(), None);
    }
}
