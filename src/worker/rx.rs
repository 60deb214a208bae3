//! RX: the receiving half of a queue worker. The worker reads its connection and hands
//! each delivery to [`Receiver::on_delivery`]; the wire's [`Inbound`] (`worker::wire`)
//! tells what it carries, and [`deliver`] (native) or [`deliver_json`] (ioppytest) writes
//! its packets into the worker's port (`crate::port`: its TUN queue, or another kind of
//! host end). Hot path.
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

use std::net::IpAddr;

use super::aqm::Aqm;
use crate::amqp::session::Delivery;
use crate::amqp::AckBatcher;
use crate::codec::vnet::{self, VnetHdr};
use crate::codec::{ioppytest, v1};
use crate::config::AgentConfig;
use crate::identity::{self, Verdict};
use crate::metrics::{DropReason, Histograms, LocalHistogram, RxCounters};
use crate::port::{Layer, Port};
use crate::route;
use crate::route::peers::PeerQueues;

use super::wire::{Inbound, PortSide};

/// A drained socket folds the latency samples when the last fold is older than this, so
/// statistics read right after traffic stops include it.
pub const QUIET_FOLD: Duration = Duration::from_millis(20);
/// Most socket reads per wake-up, so a flood of deliveries cannot starve the TUN side.
pub const READS_PER_WAKE: usize = 16;

/// The receiving state of one queue worker: what every wire shares (the TUN queue, the
/// counters, the latency samples, the acknowledgements); what a delivery means is the
/// wire's ([`Inbound`]).
pub struct Receiver {
    inbound: Box<dyn Inbound>,
    counters: Arc<RxCounters>,
    latency: LocalHistogram,
    acks: AckBatcher,
    /// The consumer's prefetch, sized to the path to the broker.
    window: super::window::Window,
    /// The socket was drained since the last [`Receiver::take_ack`].
    drained: bool,
    /// A reused buffer: an ioppytest packet decoded, a packet whose checksum is completed.
    scratch: Vec<u8>,
}

impl Receiver {
    pub fn new(config: &AgentConfig, counters: Arc<RxCounters>, hist: &Histograms, inbound: Box<dyn Inbound>) -> Receiver {
        Receiver {
            inbound,
            counters,
            latency: LocalHistogram::new(hist.one_way_us.clone()),
            acks: AckBatcher::for_prefetch(config.bus().prefetch),
            window: super::window::Window::new(config.bus().prefetch, config.bus().adaptive_prefetch, Instant::now()),
            drained: false,
            scratch: Vec::new(),
        }
    }

    /// Forgets pending acks: the connection is new (with the configured prefetch).
    pub fn reset(&mut self) {
        self.acks.take();
        self.drained = false;
        self.window.reset(Instant::now());
        self.acks.set_prefetch(self.window.prefetch());
    }

    /// What the consumer's window wants sent now (a round-trip sample, a larger prefetch).
    pub fn window_ask(&mut self, now: Instant) -> Option<super::window::Ask> {
        self.window.poll(now)
    }

    /// `ask` was sent.
    pub fn window_sent(&mut self, ask: super::window::Ask, now: Instant) {
        self.window.sent(ask, now);
        self.acks.set_prefetch(self.window.prefetch());
        if let super::window::Ask::Prefetch(p) = ask {
            self.counters.set_prefetch(p);
        }
    }

    /// The broker answered the window's question.
    pub fn window_answered(&mut self, now: Instant) {
        self.window.answered(now);
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
        self.inbound.take_probe()
    }

    /// The pings that arrived since the last call (`agent ping`).
    pub fn take_pings(&mut self) -> Vec<Vec<u8>> {
        self.inbound.take_pings()
    }

    /// Nothing to do: fold what was recorded, so readers of the statistics see it now;
    /// let silent claims lapse.
    pub fn idle(&mut self) {
        self.latency.maybe_fold(Instant::now(), true);
        self.inbound.tick(Instant::now());
    }

    /// Folds latency samples when due; publishes or expires claims when due (traffic that
    /// never lets the worker idle must not hold them back).
    pub fn fold_now(&mut self) {
        let now = Instant::now();
        self.latency.maybe_fold(now, false);
        self.inbound.tick(now);
    }

    /// One whole message, whose units go to `port`; returns a tag to acknowledge now
    /// (every half prefetch).
    pub fn on_delivery(&mut self, d: Delivery<'_>, now_ns: u64, port: &mut dyn Port) -> Option<u64> {
        self.window.delivered(d.body.len());
        let out = PortSide { port, counters: &self.counters, latency: &mut self.latency, scratch: &mut self.scratch };
        self.inbound.on_delivery(&d, now_ns, out);
        self.acks.delivered(d.tag)
    }

    /// A message too large to take: counted as malformed, acknowledged.
    pub fn on_oversized(&mut self, tag: u64) -> Option<u64> {
        self.counters.record_drop(DropReason::Malformed, 1);
        self.acks.delivered(tag)
    }
}

/// Writes the one packet (or serial frame, at most `max_len` bytes) of an ioppytest JSON
/// body into `port`, decoding into `scratch`
/// (reused: no allocation once it has grown to the largest packet).
pub fn deliver_json(body: &[u8], max_len: usize, port: &mut dyn Port, counters: &RxCounters, scratch: &mut Vec<u8>) -> u64 {
    if ioppytest::decode_bytes(body, "data", max_len, scratch).is_err() {
        counters.record_drop(DropReason::Malformed, 1);
        return 0;
    }
    match port.write(&vnet::PLAIN, scratch) {
        Ok(()) => {
            counters.received.message(1, scratch.len() as u64);
            1
        }
        Err(_) => {
            counters.received.message(0, 0);
            counters.record_drop(DropReason::TunWrite, 1);
            0
        }
    }
}

/// Where a receiver writes what passed: its port, counters and latency histogram, the
/// peers' queue counts, the trust table it checks senders against, its rate limit for
/// warnings about refused packets, and what it does with offload from the bus.
pub struct Sink<'a> {
    pub port: &'a mut dyn Port,
    /// What the port's units are; a batch of another layer is refused (`wrong_layer`).
    pub layer: Layer,
    pub counters: &'a RxCounters,
    pub latency: &'a mut LocalHistogram,
    pub peers: &'a PeerQueues,
    pub trust: &'a identity::View,
    pub suspects: &'a mut SuspectLog,
    /// Offload headers go to the kernel after the allow-list; `false`: never.
    pub offload_from_bus: bool,
    /// Where a packet is copied to complete its checksum or to be marked (grows once,
    /// then reused).
    pub scratch: &'a mut Vec<u8>,
    /// The queue management, with who sent this batch and its flow shard; `None`: off.
    pub congestion: Option<Congestion<'a>>,
}

/// What the queue management needs to judge one batch.
pub struct Congestion<'a> {
    pub aqm: &'a mut Aqm,
    /// A hash of the sender's broker user.
    pub sender: u64,
    /// The flow shard of the batch's routing key.
    pub shard: u8,
}

/// Most packets of one batch the queue management marks or drops.
const MOST_MARKS: usize = 8;

/// Whether the queue management may choose this IP packet: a TCP or UDP one (the flows a
/// mark or a drop slows down; an ICMP echo never is) that is ECN-capable, or any such one
/// when `drops` (then one that is not ECN-capable is dropped).
fn congestible(data: &[u8], drops: bool) -> bool {
    use crate::packet::ip::protocol::{TCP, UDP};
    use crate::packet::ipv4::Ipv4Packet;
    use crate::packet::ipv6::Ipv6Packet;
    use crate::packet::Ecn;
    let (proto, ecn) = match data.first().map(|b| b >> 4) {
        Some(4) => match Ipv4Packet::new_checked(data) {
            Ok(p) => (p.protocol(), p.ecn()),
            Err(_) => return false,
        },
        Some(6) => match Ipv6Packet::new_checked(data) {
            Ok(p) => (p.upper_layer().protocol, p.ecn()),
            Err(_) => return false,
        },
        _ => return false,
    };
    matches!(proto, TCP | UDP) && (drops || matches!(ecn, Ecn::Ect0 | Ecn::Ect1))
}

/// The indices of the `n` largest packets of `frame` the queue management may choose (a
/// standing queue is mostly a bulk flow's: its packets are the large ones).
fn victims(frame: &v1::Frame<'_>, n: usize, drops: bool) -> ([usize; MOST_MARKS], usize) {
    let mut chosen = [(0usize, 0usize); MOST_MARKS]; // (len, index), largest first
    let mut count = 0;
    for (i, p) in frame.packets().enumerate() {
        if !congestible(p.data, drops) {
            continue;
        }
        let len = p.data.len();
        if count < n {
            chosen[count] = (len, i);
            count += 1;
        } else if let Some(min) = (0..count).min_by_key(|&k| chosen[k].0) {
            if chosen[min].0 < len {
                chosen[min] = (len, i);
            }
        }
    }
    let mut out = [usize::MAX; MOST_MARKS];
    for (k, c) in chosen.iter().take(count).enumerate() {
        out[k] = c.1;
    }
    (out, count)
}

/// Writes every packet of `body`, a batch published by broker user `user` (`None`: the
/// message had no `user_id`), into the TUN, unless that user may not use the packet's
/// source address (counted as `spoofed` or `no_identity`). Notes the queue count the
/// sender stated for its (allowed) source addresses. Returns the number of packets written.
pub fn deliver(body: &[u8], user: Option<&[u8]>, now_ns: u64, sink: &mut Sink<'_>) -> u64 {
    let frame = match v1::decode(body) {
        Ok(f) => f,
        Err(_) => {
            sink.counters.record_drop(DropReason::Malformed, 1);
            return 0;
        }
    };
    if Layer::of_frame_flags(frame.header().flags) != sink.layer {
        sink.counters.record_drop(DropReason::WrongLayer, frame.len() as u64);
        return 0;
    }
    // Source addresses are IP's: other layers' batches are checked per message (a broker
    // user must vouch for them; L2 adds its MAC check in its own classifier).
    if sink.layer != Layer::Ip && sink.trust.checks() && user.is_none() {
        sink.counters.record_drop(DropReason::NoIdentity, frame.len() as u64);
        return 0;
    }
    let ip = sink.layer == Layer::Ip;
    // Queue management: how many packets of this batch the standing queue costs.
    let (marks, drops) = match (&mut sink.congestion, ip) {
        (Some(c), true) => (c.aqm.on_batch(c.sender, c.shard, frame.header().timestamp_ns, now_ns) as usize, c.aqm.drops()),
        _ => (0, false),
    };
    let (victim, victims_n) = if marks > 0 { victims(&frame, marks.min(MOST_MARKS), drops) } else { ([usize::MAX; MOST_MARKS], 0) };
    let mut marked = 0u64;
    let mut aqm_dropped = 0u64;
    let mut written = 0u64;
    let mut bytes = 0u64;
    let mut bad_vnet = 0u64;
    let mut refused_offload = 0u64;
    let mut refused = 0u64;
    let mut spoofed = 0u64;
    let mut unsigned = 0u64;
    let sender_queues = frame.header().sender_queues;
    let checks = sink.trust.checks();
    let sender = sink.trust.sender(user);
    // The last source seen and what was concluded about it: a batch is mostly one flow.
    let mut last: Option<(Option<IpAddr>, Verdict)> = None;
    for (i, p) in frame.packets().enumerate() {
        if ip && (checks || sender_queues != 0) {
            let src = route::source(p.data);
            let verdict = match last {
                Some((s, v)) if s == src => v,
                _ => {
                    let v = match src {
                        Some(a) => sender.check(a),
                        None => Verdict::Spoofed, // no source address to vouch for
                    };
                    let v = if checks { v } else { Verdict::Allowed };
                    if v == Verdict::Allowed && sender_queues != 0 {
                        if let Some(a) = src {
                            sink.peers.note(a, sender_queues);
                        }
                    } else if v != Verdict::Allowed {
                        sink.suspects.note(user, src, v);
                    }
                    last = Some((src, v));
                    v
                }
            };
            match verdict {
                Verdict::Allowed => {}
                Verdict::Spoofed => {
                    spoofed += 1;
                    continue;
                }
                Verdict::NoIdentity => {
                    unsigned += 1;
                    continue;
                }
            }
        }
        // Never the sender's header: one built from the packet (see codec::vnet).
        let hdr = match p.vnet.map(|h| vnet::build(h, p.data)) {
            None => vnet::PLAIN,
            Some(Ok(h)) => h,
            Some(Err(_)) => {
                bad_vnet += 1;
                continue;
            }
        };
        let mut in_scratch = false;
        if hdr != vnet::PLAIN && !sink.offload_from_bus {
            if VnetHdr::parse(&hdr).is_gso() {
                refused_offload += 1;
                continue;
            }
            sink.scratch.clear();
            sink.scratch.extend_from_slice(p.data);
            // invariant: `build` placed the checksum inside the packet, so completing cannot fail
            if vnet::complete_checksum(&hdr, sink.scratch).is_err() {
                bad_vnet += 1;
                continue;
            }
            in_scratch = true;
        }
        if victims_n > 0 && victim[..victims_n].contains(&i) {
            // CE on an ECN-capable packet (a copy: the batch is the read buffer); the IPv4
            // header checksum follows (RFC 1624), the transport checksum does not cover the
            // ECN bits, and a super-packet's segments all inherit its header. Not
            // ECN-capable (chosen only with `--aqm-drop`): dropped, as a router's AQM would.
            if !in_scratch {
                sink.scratch.clear();
                sink.scratch.extend_from_slice(p.data);
                in_scratch = true;
            }
            let ce = crate::packet::ip::IpPacket::new_checked(&mut sink.scratch[..]).is_ok_and(|mut view| view.mark_ce());
            if ce {
                marked += 1;
            } else {
                aqm_dropped += 1;
                continue;
            }
        }
        let data = if in_scratch { sink.scratch.as_slice() } else { p.data };
        let hdr = if sink.offload_from_bus { hdr } else { vnet::PLAIN };
        match sink.port.write(&hdr, data) {
            Ok(()) => {
                written += 1;
                bytes += data.len() as u64;
            }
            Err(_) => refused += 1,
        }
    }
    let c = sink.counters;
    c.record_drop(DropReason::BadVnet, bad_vnet);
    c.record_drop(DropReason::OffloadRefused, refused_offload);
    c.record_drop(DropReason::TunWrite, refused);
    c.record_drop(DropReason::Spoofed, spoofed);
    c.record_drop(DropReason::NoIdentity, unsigned);
    c.record_drop(DropReason::Aqm, aqm_dropped);
    c.record_marks(marked);
    c.received.message(written, bytes);
    let sent = frame.header().timestamp_ns;
    if written > 0 && sent > 0 {
        sink.latency.record_n(now_ns.saturating_sub(sent) / 1000, written);
    }
    written
}

/// What an L2 receiver does besides writing frames: the flood bound and, on queue 0 (which
/// receives the floods and the hellos), the learning of MACs.
pub struct L2Rx {
    pub flood: crate::route::mac::FloodBucket,
    pub learner: Option<super::switch::Learner>,
}

/// Writes every Ethernet frame of `body`, a batch published by broker user `user`, into
/// the TAP, unless its source MAC is one that user may not use (`spoofed_mac`, the identity
/// tables hold MACs as `identity::mac_address`). `flooded_by`: the sender's name when the
/// batch came under a flood key: each of its frames then passes the sender's flood bound
/// (`flood_limit`) and teaches the learner its source MAC. Returns the frames written.
pub fn deliver_frames(body: &[u8], user: Option<&[u8]>, flooded_by: Option<&str>, now_ns: u64, sink: &mut Sink<'_>, l2: &mut L2Rx) -> u64 {
    let frame = match v1::decode(body) {
        Ok(f) => f,
        Err(_) => {
            sink.counters.record_drop(DropReason::Malformed, 1);
            return 0;
        }
    };
    if Layer::of_frame_flags(frame.header().flags) != Layer::Ethernet {
        sink.counters.record_drop(DropReason::WrongLayer, frame.len() as u64);
        return 0;
    }
    let sender = sink.trust.sender(user);
    let now = Instant::now();
    let sender_hash = crate::util::fnv1a64(&[user.unwrap_or_default(), b"/", flooded_by.unwrap_or_default().as_bytes()]);
    let (mut written, mut bytes, mut bad_vnet, mut refused, mut spoofed, mut unsigned, mut limited, mut bad_frame) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let mut refused_offload = 0u64;
    let mut last: Option<(crate::packet::ethernet::Mac, Verdict)> = None;
    for p in frame.packets() {
        let Some(src) = crate::route::mac::frame_source(p.data) else {
            bad_frame += 1;
            continue;
        };
        let verdict = match last {
            Some((s, v)) if s == src => v,
            _ => {
                let v = if src.is_multicast() && sink.trust.checks() { Verdict::Spoofed } else { sender.check(identity::mac_address(src)) };
                if v != Verdict::Allowed {
                    sink.suspects.note(user, Some(identity::mac_address(src)), v);
                }
                last = Some((src, v));
                v
            }
        };
        match verdict {
            Verdict::Allowed => {}
            Verdict::Spoofed => {
                spoofed += 1;
                continue;
            }
            Verdict::NoIdentity => {
                unsigned += 1;
                continue;
            }
        }
        if let Some(name) = flooded_by {
            if !l2.flood.admit(sender_hash, p.data.len(), now) {
                limited += 1;
                continue;
            }
            if let Some(learner) = &mut l2.learner {
                learner.on_flooded_frame(name, src, now);
            }
        }
        let hdr = match p.vnet.map(|h| vnet::build_ethernet(h, p.data)) {
            None => vnet::PLAIN,
            Some(Ok(h)) => h,
            Some(Err(_)) => {
                bad_vnet += 1;
                continue;
            }
        };
        let mut data = p.data;
        let mut hdr_out = hdr;
        if hdr != vnet::PLAIN && !sink.offload_from_bus {
            if VnetHdr::parse(&hdr).is_gso() {
                refused_offload += 1;
                continue;
            }
            sink.scratch.clear();
            sink.scratch.extend_from_slice(p.data);
            if vnet::complete_checksum(&hdr, sink.scratch).is_err() {
                bad_vnet += 1;
                continue;
            }
            data = sink.scratch.as_slice();
            hdr_out = vnet::PLAIN;
        }
        match sink.port.write(&hdr_out, data) {
            Ok(()) => {
                written += 1;
                bytes += data.len() as u64;
            }
            Err(_) => refused += 1,
        }
    }
    let c = sink.counters;
    c.record_drop(DropReason::BadVnet, bad_vnet);
    c.record_drop(DropReason::TunWrite, refused);
    c.record_drop(DropReason::OffloadRefused, refused_offload);
    c.record_drop(DropReason::SpoofedMac, spoofed);
    c.record_drop(DropReason::NoIdentity, unsigned);
    c.record_drop(DropReason::FloodLimit, limited);
    c.record_drop(DropReason::BadFrame, bad_frame);
    c.received.message(written, bytes);
    let sent = frame.header().timestamp_ns;
    if written > 0 && sent > 0 {
        sink.latency.record_n(now_ns.saturating_sub(sent) / 1000, written);
    }
    written
}

/// Warnings about refused packets, at most one per second per sender (a hash of its user
/// decides its slot; two senders sharing a slot share the limit).
pub struct SuspectLog {
    slots: [(Option<Instant>, u64); SUSPECT_SLOTS],
}

const SUSPECT_SLOTS: usize = 32;

impl Default for SuspectLog {
    fn default() -> SuspectLog {
        SuspectLog { slots: [(None, 0); SUSPECT_SLOTS] }
    }
}

impl SuspectLog {
    /// A packet from `src` in a message of `user` was refused with `verdict`.
    pub fn note(&mut self, user: Option<&[u8]>, src: Option<IpAddr>, verdict: Verdict) {
        let slot = (crate::util::fnv1a64(&[user.unwrap_or(b"")]) as usize) % SUSPECT_SLOTS;
        let (last, since) = &mut self.slots[slot];
        *since += 1;
        let now = Instant::now();
        if last.is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1)) {
            let who = user.map(String::from_utf8_lossy);
            match verdict {
                Verdict::NoIdentity => {
                    tracing::warn!(source = ?src, dropped = *since, "dropping packets from a message without user_id: nobody vouches for them")
                }
                _ => {
                    tracing::warn!(user = who.as_deref().unwrap_or("-"), source = ?src, dropped = *since, "dropping packets whose source address this broker user may not use (spoofed)")
                }
            }
            *last = Some(now);
            *since = 0;
        }
    }
}
