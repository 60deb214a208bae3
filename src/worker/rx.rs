//! RX: the receiving half of a queue worker. The worker reads its connection and hands
//! each delivery to [`Receiver::on_delivery`], which writes its packets into the worker's
//! TUN queue. Hot path.
//!
//! Queue k only ever writes TUN queue k, so a flow (one shard, one queue) keeps its order
//! end to end. The AMQP session hands a delivery over as a slice of the read buffer when
//! its body fits one frame (the common case): packets are slices of it, nothing is copied
//! before the `writev`. A body that does not decode is counted as malformed and dropped
//! whole; a packet whose virtio header lies is counted and skipped; the rest of the batch
//! still goes through. Acknowledgements are batched (`multiple`): when nothing more has
//! arrived, or every half prefetch.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::amqp::session::Delivery;
use crate::amqp::AckBatcher;
use crate::codec::{ioppytest, v1, vnet};
use crate::config::Wire;
use crate::metrics::{Counters, DropReason, Histograms, LocalHistogram};
use crate::route::peers::PeerQueues;
use crate::route::{self, RoutingKey};
use crate::tun::TunQueue;

/// A drained socket folds the latency samples when the last fold is older than this, so
/// statistics read right after traffic stops include it.
pub const QUIET_FOLD: Duration = Duration::from_millis(20);
/// Most socket reads per wake-up, so a flood of deliveries cannot starve the TUN side.
pub const READS_PER_WAKE: usize = 16;

/// What a delivery carries, told by its routing key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Carries {
    Packets,
    /// Our own flood, echoed back by the broker: acknowledged, not written.
    OwnFlood,
    /// A presence probe (queue 0 of a native agent binds it): answered with a hello.
    Probe,
}

/// The receiving state of one queue worker.
pub struct Receiver {
    wire: Wire,
    tun: Arc<TunQueue>,
    counters: Arc<Counters>,
    latency: LocalHistogram,
    own_flood_key: RoutingKey,
    /// Where the queue counts stated by senders are noted for the sending half.
    peers: Arc<PeerQueues>,
    acks: AckBatcher,
    /// A probe arrived since [`Receiver::take_probe`] was last asked.
    probed: bool,
    /// The socket was drained since the last [`Receiver::take_ack`].
    drained: bool,
    json_scratch: Vec<u8>,
}

impl Receiver {
    #[allow(clippy::too_many_arguments)] // the parts of one agent a worker shares; built once
    pub fn new(
        wire: Wire,
        prefetch: u16,
        tun: Arc<TunQueue>,
        counters: Arc<Counters>,
        hist: &Histograms,
        own_flood_key: RoutingKey,
        peers: Arc<PeerQueues>,
    ) -> Receiver {
        Receiver {
            wire,
            tun,
            counters,
            latency: LocalHistogram::new(hist.one_way_us.clone()),
            own_flood_key,
            peers,
            acks: AckBatcher::for_prefetch(prefetch),
            probed: false,
            drained: false,
            json_scratch: Vec::new(),
        }
    }

    /// Forgets pending acks: the connection is new.
    pub fn reset(&mut self) {
        self.acks.take();
        self.drained = false;
    }

    /// The socket has nothing more for now.
    pub fn drained(&mut self) {
        self.drained = true;
    }

    /// The tag to acknowledge now, if the socket was drained. The worker asks after its
    /// TUN side: a reply the kernel produced for what was just written (a ping's echo, a
    /// TCP ACK) is published first, and the broker handles our ack after it.
    pub fn take_ack(&mut self) -> Option<u64> {
        if std::mem::take(&mut self.drained) {
            self.latency.fold_if_older(Instant::now(), QUIET_FOLD);
            self.acks.take()
        } else {
            None
        }
    }

    /// Whether a presence probe arrived since the last call.
    pub fn take_probe(&mut self) -> bool {
        std::mem::take(&mut self.probed)
    }

    /// Nothing to do: fold what was recorded, so readers of the statistics see it now.
    pub fn idle(&mut self) {
        self.latency.maybe_fold(Instant::now(), true);
    }

    /// Folds latency samples when due.
    pub fn fold_now(&mut self) {
        self.latency.maybe_fold(Instant::now(), false);
    }

    /// One whole message; returns a tag to acknowledge now (every half prefetch).
    pub fn on_delivery(&mut self, d: Delivery<'_>, now_ns: u64) -> Option<u64> {
        let what = if d.routing_key == self.own_flood_key.as_str().as_bytes() {
            Carries::OwnFlood
        } else if d.routing_key == route::CTL_PROBE.as_bytes() {
            Carries::Probe
        } else {
            Carries::Packets
        };
        match (self.wire, what) {
            (Wire::Ioppytest, _) => {
                deliver_json(d.body, &self.tun, &self.counters, &mut self.json_scratch);
            }
            (Wire::Native, Carries::Packets) => {
                deliver(d.body, &self.tun, &self.counters, &mut self.latency, &self.peers, now_ns);
            }
            (Wire::Native, Carries::Probe) => self.probed = true,
            (Wire::Native, Carries::OwnFlood) => {} // echoed by the broker
        }
        self.acks.delivered(d.tag)
    }

    /// A message too large to take: counted as malformed, acknowledged.
    pub fn on_oversized(&mut self, tag: u64) -> Option<u64> {
        self.counters.record_drop(DropReason::Malformed, 1);
        self.acks.delivered(tag)
    }
}

/// Writes the one packet of an ioppytest JSON body into `tun`, decoding into `scratch`
/// (reused: no allocation once it has grown to the largest packet).
pub fn deliver_json(body: &[u8], tun: &TunQueue, counters: &Counters, scratch: &mut Vec<u8>) -> u64 {
    if ioppytest::decode_packet(body, scratch).is_err() {
        counters.record_drop(DropReason::Malformed, 1);
        return 0;
    }
    Counters::add(&counters.rx_batches, 1);
    match tun.write(&vnet::PLAIN, scratch) {
        Ok(()) => {
            Counters::add(&counters.rx_packets, 1);
            Counters::add(&counters.rx_bytes, scratch.len() as u64);
            1
        }
        Err(_) => {
            counters.record_drop(DropReason::TunWrite, 1);
            0
        }
    }
}

/// Writes every packet of `body` into `tun`, noting in `peers` the queue count the sender
/// stated for its source addresses. Returns the number of packets written.
pub fn deliver(body: &[u8], tun: &TunQueue, counters: &Counters, latency: &mut LocalHistogram, peers: &PeerQueues, now_ns: u64) -> u64 {
    let frame = match v1::decode(body) {
        Ok(f) => f,
        Err(_) => {
            counters.record_drop(DropReason::Malformed, 1);
            return 0;
        }
    };
    let mut written = 0u64;
    let mut bytes = 0u64;
    let mut bad_vnet = 0u64;
    let mut refused = 0u64;
    let sender_queues = frame.header().sender_queues;
    let mut last_src = None;
    for p in frame.packets() {
        if sender_queues != 0 {
            let src = route::source(p.data);
            if src != last_src {
                if let Some(a) = src {
                    peers.note(a, sender_queues);
                }
                last_src = src;
            }
        }
        let hdr = match p.vnet {
            Some(h) => match vnet::fix_for_write(h, p.data) {
                Ok(h) => h,
                Err(_) => {
                    bad_vnet += 1;
                    continue;
                }
            },
            None => vnet::PLAIN,
        };
        match tun.write(&hdr, p.data) {
            Ok(()) => {
                written += 1;
                bytes += p.data.len() as u64;
            }
            Err(_) => refused += 1,
        }
    }
    counters.record_drop(DropReason::BadVnet, bad_vnet);
    counters.record_drop(DropReason::TunWrite, refused);
    Counters::add(&counters.rx_packets, written);
    Counters::add(&counters.rx_bytes, bytes);
    Counters::add(&counters.rx_batches, 1);
    let sent = frame.header().timestamp_ns;
    if written > 0 && sent > 0 {
        latency.record_n(now_ns.saturating_sub(sent) / 1000, written);
    }
    written
}
