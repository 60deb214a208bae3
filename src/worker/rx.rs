//! RX: the receiving half of a queue worker. [`Receiver::on_readable`] takes what has
//! arrived on the link's connection, reassembles deliveries and writes their packets into
//! the worker's TUN queue. Hot path.
//!
//! Queue k only ever writes TUN queue k, so a flow (one shard, one queue) keeps its order
//! end to end. A message whose body fits one AMQP frame (the common case) is decoded where
//! it was read: packets are slices of the socket buffer, nothing is copied before the
//! `writev`; a larger body is gathered into one reused buffer first. A body that does not
//! decode is counted as malformed and dropped whole; a packet whose virtio header lies is
//! counted and skipped; the rest of the batch still goes through. Acknowledgements are
//! batched (`multiple`): when nothing more has arrived, or every half prefetch.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::amqp::conn::{self, Conn, ReadState};
use crate::amqp::wire::{self, method, Deliver};
use crate::amqp::AckBatcher;
use crate::codec::{ioppytest, v1};
use crate::config::Wire;
use crate::metrics::{Counters, DropReason, Histograms, LocalHistogram};
use crate::route::peers::PeerQueues;
use crate::route::{self, RoutingKey};
use crate::tun::{vnet, TunQueue};

/// Largest body gathered (a native batch is at most 8 MiB); a larger one is skipped and
/// counted as malformed instead of growing the buffer without bound.
pub const MAX_BODY: usize = 16 << 20;
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

/// The message being received: announced by `basic.deliver`, then a header, then bodies.
#[derive(Clone, Copy, Debug)]
struct Incoming {
    what: Carries,
    size: Option<usize>,
    /// Too large to gather: its body frames are skipped.
    skip: bool,
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
    incoming: Option<Incoming>,
    /// A probe arrived since [`Receiver::take_probe`] was last asked.
    probed: bool,
    /// The socket was drained since the last [`Receiver::ack_if_drained`].
    drained: bool,
    /// Bodies that span several frames are gathered here.
    body: Vec<u8>,
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
            incoming: None,
            probed: false,
            drained: false,
            body: Vec::new(),
            json_scratch: Vec::new(),
        }
    }

    /// Forgets a half-received message and pending acks: the connection is new.
    pub fn reset(&mut self) {
        self.acks.take();
        self.drained = false;
        self.incoming = None;
        self.body.clear();
    }

    /// Acknowledges what was delivered if the socket was drained. The worker calls this
    /// after its TUN side: a reply the kernel produced for what was just written (a ping's
    /// echo, a TCP ACK) is published first, and the broker handles our ack after it.
    pub fn ack_if_drained(&mut self, conn: &mut Conn) -> Result<(), conn::Error> {
        if std::mem::take(&mut self.drained) {
            if let Some(tag) = self.acks.take() {
                conn.ack_multiple(tag)?;
            }
            self.latency.fold_if_older(Instant::now(), QUIET_FOLD);
        }
        Ok(())
    }

    /// Whether a presence probe arrived since the last call.
    pub fn take_probe(&mut self) -> bool {
        std::mem::take(&mut self.probed)
    }

    /// Nothing to do: fold what was recorded, so readers of the statistics see it now.
    pub fn idle(&mut self) {
        self.latency.maybe_fold(Instant::now(), true);
    }

    /// Delivers what has arrived on `conn` (up to [`READS_PER_WAKE`] reads). Once the
    /// socket is drained, the acknowledgement is due ([`Receiver::ack_if_drained`]).
    /// `Err` when the connection failed or the broker closed it.
    pub fn on_readable(&mut self, conn: &mut Conn) -> Result<(), conn::Error> {
        for _ in 0..READS_PER_WAKE {
            self.take_frames(conn)?;
            if conn.read_some()? == ReadState::Empty {
                self.drained = true;
                break;
            }
        }
        self.take_frames(conn)?;
        self.latency.maybe_fold(Instant::now(), false);
        Ok(())
    }

    /// Handles every complete frame already read.
    fn take_frames(&mut self, conn: &mut Conn) -> Result<(), conn::Error> {
        while let Some((frame, n)) = conn.next_frame()? {
            match frame.kind {
                wire::FRAME_BODY => {
                    self.on_body(frame.payload);
                    conn.consume_frame(n);
                }
                wire::FRAME_HEADER => {
                    let size = wire::content_body_size(frame.payload)?;
                    conn.consume_frame(n);
                    self.on_header(size);
                }
                wire::FRAME_METHOD => match wire::method_of(frame.payload)? {
                    (method::BASIC_DELIVER, a) => {
                        let d = Deliver::parse(a)?;
                        let what = if d.routing_key == self.own_flood_key.as_str().as_bytes() {
                            Carries::OwnFlood
                        } else if d.routing_key == route::CTL_PROBE.as_bytes() {
                            Carries::Probe
                        } else {
                            Carries::Packets
                        };
                        let tag = d.delivery_tag;
                        conn.consume_frame(n);
                        self.incoming = Some(Incoming { what, size: None, skip: false });
                        self.body.clear();
                        if let Some(tag) = self.acks.delivered(tag) {
                            conn.ack_multiple(tag)?;
                        }
                    }
                    _ => {
                        let (kind, channel) = (frame.kind, frame.channel);
                        let payload = frame.payload.to_vec(); // rare: control only
                        conn.consume_frame(n);
                        conn.control(wire::Frame { kind, channel, payload: &payload })?;
                    }
                },
                _ => conn.consume_frame(n), // heartbeats (off) and anything else
            }
        }
        Ok(())
    }

    /// The content header of the message being received: its body size.
    fn on_header(&mut self, size: u64) {
        let Some(m) = &mut self.incoming else { return };
        m.size = Some(size as usize);
        if size as usize > MAX_BODY {
            m.skip = true;
            self.counters.record_drop(DropReason::Malformed, 1);
        } else if size == 0 {
            let what = m.what;
            self.incoming = None;
            self.deliver(what, &[]);
        }
    }

    /// One body frame of the message being received; delivers the message once whole.
    fn on_body(&mut self, payload: &[u8]) {
        let Some(m) = &mut self.incoming else { return }; // no deliver before it: not ours to handle
        let size = m.size.unwrap_or(0);
        if m.skip {
            m.size = Some(size.saturating_sub(payload.len()));
            if m.size == Some(0) {
                self.incoming = None;
            }
        } else if self.body.is_empty() && payload.len() >= size {
            // The whole body in one frame: decode it where it lies.
            let what = m.what;
            self.incoming = None;
            self.deliver(what, payload);
        } else {
            self.body.extend_from_slice(payload);
            if self.body.len() >= size {
                let what = m.what;
                self.incoming = None;
                let body = std::mem::take(&mut self.body);
                self.deliver(what, &body);
                self.body = body;
                self.body.clear();
            }
        }
    }

    /// One whole message body.
    fn deliver(&mut self, what: Carries, body: &[u8]) {
        match (self.wire, what) {
            (Wire::Ioppytest, _) => {
                deliver_json(body, &self.tun, &self.counters, &mut self.json_scratch);
            }
            (Wire::Native, Carries::Packets) => {
                deliver(body, &self.tun, &self.counters, &mut self.latency, &self.peers, super::now_ns());
            }
            (Wire::Native, Carries::Probe) => self.probed = true,
            (Wire::Native, Carries::OwnFlood) => {} // echoed by the broker
        }
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
