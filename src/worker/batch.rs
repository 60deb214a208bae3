//! The batcher: where each packet read from the TUN lands, and when a batch is published.
//! Pure: it owns the open batches and nothing else; the time comes in as an argument and
//! publishing goes through an [`Outlet`], so the policy can be tested against a model
//! (`tests::model`, `fuzzing::batcher`) without a TUN or a broker.
//!
//! Landing: each packet is read straight into the open batch it most likely belongs to
//! (the one the previous packet went to), at its final place in the outgoing frame, then
//! classified by the caller. When the guess was wrong, the packet is copied into the right
//! batch: bulk flows arrive in runs, so a single flow is never copied.
//!
//! Flush policy: a batch is published when it cannot take one more maximum-size packet;
//! all open batches go when the burst ends (the TUN has nothing more ready), except that
//! they stay open while the broker has not yet taken what we sent ([`Outlet::busy`]), and
//! while a stream runs a small batch lingers up to [`LINGER`] for company (acknowledgements
//! of a bulk flow then share a message: the broker's cost is per message). No latency added
//! when idle, large messages under load. No allocation once every slot has its buffer.
//!
//! Every packet committed is published exactly once or reported to the outlet as dropped
//! exactly once, and packets of one key are published in the order they were committed.

use std::time::Duration;

use crate::codec::v1::{BatchWriter, FLAG_VNET, MAX_PACKET_LEN, VNET_HDR_LEN};
use crate::metrics::DropReason;
use crate::route::RoutingKey;

/// A flush less than this long ago means a stream is running (see [`Batcher::end_of_burst`]).
pub const STREAM_GAP: Duration = Duration::from_millis(1);
/// Longest a packet waits for company while a stream runs.
pub const LINGER: Duration = Duration::from_micros(100);
/// Only batches this small linger (acknowledgements, small datagrams); bulk goes at once.
pub const LINGER_MAX_BYTES: usize = 16 * 1024;
/// Most batches open at once (distinct destination/shard keys within one burst).
pub const MAX_OPEN: usize = 8;
/// The largest read: a virtio header and a maximum-size packet.
pub const MAX_READ: usize = VNET_HDR_LEN + MAX_PACKET_LEN;
/// Bytes one entry can take in a batch (length field + read).
pub const MAX_ENTRY: usize = 4 + MAX_READ;

/// Where finished batches go.
pub trait Outlet {
    /// Publishes `batch` under `key` (`read_ns`: when its first packet was read). `false`
    /// when it cannot be taken yet (a message still half-written): the batch stays open.
    /// A batch that is taken but not sent (the broker is away) is the outlet's to count.
    fn publish(&mut self, batch: &mut BatchWriter, key: RoutingKey, read_ns: u64) -> bool;
    /// Whether the broker is still behind on what was sent: the end of a burst then keeps
    /// the batches open instead of queueing small messages behind large ones.
    fn busy(&self) -> bool;
    /// Packets the batcher gave up on.
    fn dropped(&mut self, reason: DropReason, packets: u64);
}

struct Open {
    key: Option<RoutingKey>,
    writer: BatchWriter,
    /// Start of the burst in which this batch got its first packet.
    read_ns: u64,
}

/// The open batches of one queue worker.
pub struct Batcher {
    open: Vec<Open>,
    buffer_bytes: usize,
    sender_queues: u8,
    /// Key for a batch that somehow has none (never: a batch gets its key with its first packet).
    fallback_key: RoutingKey,
    /// The batch the last packet went to.
    last: usize,
    /// The batch the slot handed out by [`Batcher::slot`] belongs to.
    landing: Option<usize>,
    burst_ns: u64,
    last_flush_ns: u64,
    /// The frame flags of every batch: the virtio header, and the port's layer.
    flags: u8,
}

impl Batcher {
    /// Batches of up to `max_batch_bytes` (at least one maximum-size entry), stating
    /// `sender_queues` in every frame.
    pub fn new(max_batch_bytes: usize, sender_queues: u8, fallback_key: RoutingKey) -> Batcher {
        Batcher {
            open: Vec::with_capacity(MAX_OPEN),
            buffer_bytes: max_batch_bytes.max(crate::codec::v1::HEADER_LEN + MAX_ENTRY),
            sender_queues,
            fallback_key,
            last: 0,
            landing: None,
            burst_ns: 0,
            last_flush_ns: 0,
            flags: FLAG_VNET,
        }
    }

    /// Batches whose entries are units of `layer_flag` (`port::Layer::frame_flag`).
    pub fn with_layer_flag(mut self, layer_flag: u8) -> Batcher {
        self.flags = FLAG_VNET | layer_flag;
        self
    }

    /// Whether any batch holds packets.
    pub fn holding(&self) -> bool {
        self.open.iter().any(|o| !o.writer.is_empty())
    }

    /// A burst of reads starts at `now_ns`.
    pub fn begin_burst(&mut self, now_ns: u64) {
        self.burst_ns = now_ns;
    }

    /// Where the next read goes ([`MAX_READ`] bytes: a virtio header and a packet), or
    /// `None` when no batch is free (every slot keyed and the outlet refusing): the caller
    /// then reads elsewhere and counts the packet as `no_buffer`.
    pub fn slot(&mut self, out: &mut impl Outlet) -> Option<&mut [u8]> {
        self.landing = self.landing_index(out);
        let i = self.landing?;
        Some(self.open[i].writer.slot(MAX_READ))
    }

    /// The read into the last slot returned `n` bytes. `classify` gets the entry (virtio
    /// header and packet) and says under which key it is published, or why not.
    pub fn commit(&mut self, n: usize, classify: impl FnOnce(&[u8]) -> Result<RoutingKey, DropReason>, out: &mut impl Outlet) {
        let Some(li) = self.landing.take() else { return };
        if self.open[li].writer.commit(n).is_err() {
            // Shorter than a virtio header, or longer than a packet may be.
            let reason = if n <= VNET_HDR_LEN { DropReason::NotIp } else { DropReason::TooBig };
            return out.dropped(reason, 1);
        }
        let key = match self.open[li].writer.last_entry() {
            Some(entry) => classify(entry),
            None => Err(DropReason::NotIp),
        };
        match key {
            Ok(key) => self.place_last(li, key, out),
            Err(reason) => {
                self.open[li].writer.pop_last();
                out.dropped(reason, 1);
            }
        }
    }

    /// End of a burst at `now_ns`: publish what is open, unless the outlet is busy, or a
    /// stream is running (a flush less than [`STREAM_GAP`] ago), what is open is small
    /// (under [`LINGER_MAX_BYTES`]) and has waited less than [`LINGER`]: then small packets
    /// (TCP ACKs of a bulk flow) share a message instead of costing the broker one each.
    pub fn end_of_burst(&mut self, now_ns: u64, out: &mut impl Outlet) {
        if out.busy() {
            return;
        }
        let oldest = self.open.iter().filter(|o| !o.writer.is_empty()).map(|o| o.read_ns).min();
        let Some(oldest) = oldest else { return };
        let streaming = now_ns.saturating_sub(self.last_flush_ns) < STREAM_GAP.as_nanos() as u64;
        let small = self.open.iter().map(|o| o.writer.len()).sum::<usize>() < LINGER_MAX_BYTES;
        if streaming && small && now_ns.saturating_sub(oldest) < LINGER.as_nanos() as u64 {
            return;
        }
        self.last_flush_ns = now_ns;
        self.flush_all(out);
    }

    /// Index of the batch the next read lands in: the last one used, or a fresh one.
    fn landing_index(&mut self, out: &mut impl Outlet) -> Option<usize> {
        if self.last < self.open.len() && self.open[self.last].writer.remaining() >= MAX_ENTRY {
            return Some(self.last);
        }
        if let Some(i) = self.open.iter().position(|o| o.key.is_none()) {
            return Some(i);
        }
        if self.open.len() == MAX_OPEN {
            // Too many destinations in one burst: publish what we have and start over.
            self.flush_all(out);
            if let Some(i) = self.open.iter().position(|o| o.key.is_none()) {
                return Some(i);
            }
        }
        self.push_fresh()
    }

    /// Opens one more (empty, keyless) batch. Its buffer is allocated here, once: a slot
    /// keeps its buffer for the worker's life, so steady state allocates nothing.
    fn push_fresh(&mut self) -> Option<usize> {
        if self.open.len() == MAX_OPEN {
            return None;
        }
        let mut writer = BatchWriter::with_capacity(self.buffer_bytes);
        writer.set_sender_queues(self.sender_queues);
        writer.reset(self.flags);
        self.open.push(Open { key: None, writer, read_ns: 0 });
        Some(self.open.len() - 1)
    }

    /// Leaves the last entry of batch `li` where it is when its key matches, else moves it.
    fn place_last(&mut self, li: usize, key: RoutingKey, out: &mut impl Outlet) {
        if self.open[li].key == Some(key) {
            self.last = li;
        } else if let Some(ti) = self.open.iter().position(|o| o.key == Some(key)) {
            self.move_last(li, ti, out);
            self.last = ti;
        } else if self.open[li].key.is_none() {
            self.open[li].key = Some(key);
            self.open[li].read_ns = self.burst_ns;
            self.last = li;
        } else {
            // A new key while landing in a keyed batch: move the packet to a fresh batch.
            match self.new_open_for_move(li, out) {
                Some(ti) => {
                    self.open[ti].key = Some(key);
                    self.open[ti].read_ns = self.burst_ns;
                    self.move_last(li, ti, out);
                    self.last = ti;
                }
                None => {
                    self.open[li].writer.pop_last();
                    return out.dropped(DropReason::NoBuffer, 1);
                }
            }
        }
        let t = self.last;
        if self.open[t].writer.remaining() < MAX_ENTRY {
            self.flush(t, out);
        }
    }

    /// A fresh batch to move the last entry of `li` into; never flushes `li` itself.
    /// `None` when every other batch is keyed and the outlet will not take one.
    fn new_open_for_move(&mut self, li: usize, out: &mut impl Outlet) -> Option<usize> {
        if let Some(i) = self.open.iter().position(|o| o.key.is_none()) {
            return Some(i);
        }
        if self.open.len() == MAX_OPEN {
            let victim = if li == 0 { 1 } else { 0 };
            self.flush(victim, out);
            return self.open[victim].key.is_none().then_some(victim);
        }
        self.push_fresh()
    }

    /// Copies the last entry of batch `from` to batch `to` and removes it from `from`.
    fn move_last(&mut self, from: usize, to: usize, out: &mut impl Outlet) {
        let (src, dst) = two_mut(&mut self.open, from, to);
        let moved = match src.writer.last_entry() {
            Some(entry) if entry.len() > VNET_HDR_LEN => {
                let (hdr, data) = entry.split_at(VNET_HDR_LEN);
                let hdr: &[u8; VNET_HDR_LEN] = hdr.try_into().unwrap_or(&[0; VNET_HDR_LEN]);
                dst.writer.push(Some(hdr), data).is_ok()
            }
            _ => false,
        };
        src.writer.pop_last();
        if !moved {
            // `to` is full and was refused by the outlet when it filled up.
            out.dropped(DropReason::NoBuffer, 1);
        }
    }

    /// Publishes batch `i`; the slot becomes fresh (same buffer). A batch the outlet
    /// cannot take yet stays open as it is.
    fn flush(&mut self, i: usize, out: &mut impl Outlet) {
        let o = &mut self.open[i];
        if !o.writer.is_empty() {
            // invariant: a non-empty batch got its key when its first packet was placed
            let key = o.key.unwrap_or(self.fallback_key);
            if !out.publish(&mut o.writer, key, o.read_ns) {
                return;
            }
        }
        o.writer.reset(self.flags);
        o.key = None;
    }

    fn flush_all(&mut self, out: &mut impl Outlet) {
        for i in 0..self.open.len() {
            self.flush(i, out);
        }
    }
}

/// Two distinct mutable elements of a slice.
fn two_mut<T>(v: &mut [T], a: usize, b: usize) -> (&mut T, &mut T) {
    assert_ne!(a, b, "two_mut needs distinct indices"); // invariant upheld by callers
    if a < b {
        let (x, y) = v.split_at_mut(b);
        (&mut x[a], &mut y[0])
    } else {
        let (x, y) = v.split_at_mut(a);
        (&mut y[0], &mut x[b])
    }
}

#[cfg(test)]
mod tests {
    use crate::fuzzing::{batcher_model, BatchOp};
    use proptest::prelude::*;

    fn op() -> impl Strategy<Value = BatchOp> {
        prop_oneof![
            8 => (0u8..10, 0u8..8).prop_map(|(key, size)| BatchOp::Packet { key, size }),
            // Mostly small packets: many per batch, so batches fill, linger and move.
            8 => (0u8..4, 1u8..4).prop_map(|(key, size)| BatchOp::Packet { key, size }),
            2 => (0u16..300).prop_map(|us| BatchOp::EndBurst { us }),
            1 => (0u16..300).prop_map(|us| BatchOp::BeginBurst { us }),
            1 => (any::<bool>(), prop::bool::weighted(0.3), prop::bool::weighted(0.2)).prop_map(|(busy, refuse, down)| BatchOp::Outlet { busy, refuse, down }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

        /// Exactly once, per-key order, message limits and the linger bound, against the
        /// model in `fuzzing::batcher_model`, with the smallest batches and the default.
        #[test]
        fn every_packet_is_published_or_dropped_exactly_once(ops in prop::collection::vec(op(), 0..600), small: bool) {
            batcher_model(&ops, if small { 0 } else { 256 * 1024 });
        }
    }

    #[test]
    fn a_refusing_broker_costs_packets_as_no_buffer_and_nothing_else() {
        let mut ops = vec![BatchOp::Outlet { busy: false, refuse: true, down: false }];
        for i in 0..2000u32 {
            ops.push(BatchOp::Packet { key: (i % 9) as u8, size: 4 + (i % 4) as u8 });
        }
        ops.push(BatchOp::EndBurst { us: 10 });
        batcher_model(&ops, 0);
    }
}
