//! RX: one thread per TUN queue k owns the consuming connection of link k, reads
//! deliveries from its socket and writes their packets into TUN queue k. Hot path.
//!
//! Queue k only ever writes TUN queue k, so a flow (one shard, one queue) keeps its order
//! end to end. A message whose body fits one AMQP frame (the common case) is decoded where
//! it was read: packets are slices of the socket buffer, nothing is copied before the
//! `writev`; a larger body is gathered into one reused buffer first. A body that does not
//! decode is counted as malformed and dropped whole; a packet whose virtio header lies is
//! counted and skipped; the rest of the batch still goes through. Acknowledgements are
//! batched (`multiple`): when nothing more has arrived, or every half prefetch.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::amqp::conn::{self, Conn, ReadState};
use crate::amqp::link::{self, LinkContext, Reconnect};
use crate::amqp::wire::{self, method, Deliver};
use crate::amqp::AckBatcher;
use crate::codec::{ioppytest, v1};
use crate::config::Wire;
use crate::metrics::{Counters, DropReason, Histograms, LocalHistogram};
use crate::route::peers::PeerQueues;
use crate::route::{self, RoutingKey};
use crate::tun::{vnet, wait_fd, Interest, TunQueue};

/// How often an idle RX worker wakes to notice shutdown.
pub const IDLE_POLL: Duration = Duration::from_millis(250);
/// Largest body gathered (a native batch is at most 8 MiB); a larger one is skipped and
/// counted as malformed instead of growing the buffer without bound.
pub const MAX_BODY: usize = 16 << 20;

/// The message being received: announced by `basic.deliver`, then a header, then bodies.
#[derive(Clone, Copy, Debug)]
struct Incoming {
    /// Our own flood, echoed back by the broker: acknowledged, not written.
    own: bool,
    size: Option<usize>,
    /// Too large to gather: its body frames are skipped.
    skip: bool,
}

/// One RX worker; owned by its thread.
pub struct RxWorker {
    link: LinkContext,
    tun: Arc<TunQueue>,
    counters: Arc<Counters>,
    latency: LocalHistogram,
    stop: Arc<AtomicBool>,
    own_flood_key: RoutingKey,
    addrs: Vec<IpAddr>,
    /// Where the queue counts stated by senders are noted for the TX workers.
    peers: Arc<PeerQueues>,
    /// Bodies that span several frames are gathered here.
    body: Vec<u8>,
    json_scratch: Vec<u8>,
}

impl RxWorker {
    #[allow(clippy::too_many_arguments)] // the parts of one agent a worker shares; built once
    pub fn new(
        link: LinkContext,
        tun: Arc<TunQueue>,
        counters: Arc<Counters>,
        hist: &Histograms,
        stop: Arc<AtomicBool>,
        own_flood_key: RoutingKey,
        addrs: Vec<IpAddr>,
        peers: Arc<PeerQueues>,
    ) -> RxWorker {
        RxWorker {
            peers,
            link,
            tun,
            counters,
            latency: LocalHistogram::new(hist.one_way_us.clone()),
            stop,
            own_flood_key,
            addrs,
            body: Vec::new(),
            json_scratch: Vec::new(),
        }
    }

    /// Connects, consumes until the connection fails, reconnects; until the stop flag.
    pub fn run(mut self) {
        let mut reconnect = Reconnect::new((self.link.index as u64).rotate_left(32) ^ super::now_ns());
        while !self.stopping() {
            let now = Instant::now();
            if !reconnect.due(now) {
                std::thread::sleep(reconnect.until_due(now).min(Duration::from_millis(50)));
                continue;
            }
            let mut conn = match self.link.open_consumer(&self.addrs) {
                Ok(c) => c,
                Err(e) => {
                    reconnect.failed(&self.link, &e);
                    continue;
                }
            };
            reconnect.up(&self.link, &self.counters);
            match self.consume(&mut conn) {
                Ok(()) => {
                    // Stopping: closing the connection deletes our exclusive queue.
                    self.latency.maybe_fold(Instant::now(), true);
                    conn.close(link::CLOSE_WAIT);
                    return;
                }
                Err(e) => reconnect.lost(&self.link, &e),
            }
        }
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Reads and delivers until the connection fails (`Err`) or the worker stops (`Ok`).
    fn consume(&mut self, conn: &mut Conn) -> Result<(), conn::Error> {
        let mut acks = AckBatcher::for_prefetch(self.link.config.prefetch);
        let mut incoming: Option<Incoming> = None;
        loop {
            while let Some((frame, n)) = conn.next_frame()? {
                match frame.kind {
                    wire::FRAME_BODY => {
                        self.on_body(&mut incoming, frame.payload);
                        conn.consume_frame(n);
                    }
                    wire::FRAME_HEADER => {
                        let size = wire::content_body_size(frame.payload)?;
                        conn.consume_frame(n);
                        if let Some(m) = &mut incoming {
                            m.size = Some(size as usize);
                            if size as usize > MAX_BODY {
                                m.skip = true;
                                self.counters.record_drop(DropReason::Malformed, 1);
                            } else if size == 0 {
                                self.deliver(m.own, &[]);
                                incoming = None;
                            }
                        }
                    }
                    wire::FRAME_METHOD => match wire::method_of(frame.payload)? {
                        (method::BASIC_DELIVER, a) => {
                            let d = Deliver::parse(a)?;
                            let (tag, own) = (d.delivery_tag, d.routing_key == self.own_flood_key.as_str().as_bytes());
                            conn.consume_frame(n);
                            incoming = Some(Incoming { own, size: None, skip: false });
                            self.body.clear();
                            if let Some(tag) = acks.delivered(tag) {
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
            if conn.read_some()? == ReadState::Data {
                continue;
            }
            // Nothing more has arrived: acknowledge, then wait.
            if let Some(tag) = acks.take() {
                conn.ack_multiple(tag)?;
            }
            // Idle: fold what was recorded, so readers of the statistics see it now.
            self.latency.maybe_fold(Instant::now(), true);
            if self.stopping() {
                return Ok(());
            }
            wait_fd(conn.fd(), Interest::Read, IDLE_POLL)?;
            if self.stopping() {
                return Ok(());
            }
        }
    }

    /// One body frame of the message being received; delivers the message once whole.
    fn on_body(&mut self, incoming: &mut Option<Incoming>, payload: &[u8]) {
        let Some(m) = incoming else { return }; // no deliver before it: not ours to handle
        let size = m.size.unwrap_or(0);
        if m.skip {
            m.size = Some(size.saturating_sub(payload.len()));
            if m.size == Some(0) {
                *incoming = None;
            }
        } else if self.body.is_empty() && payload.len() >= size {
            // The whole body in one frame: decode it where it lies.
            let own = m.own;
            *incoming = None;
            self.deliver(own, payload);
        } else {
            self.body.extend_from_slice(payload);
            if self.body.len() >= size {
                let own = m.own;
                *incoming = None;
                let body = std::mem::take(&mut self.body);
                self.deliver(own, &body);
                self.body = body;
                self.body.clear();
            }
        }
    }

    /// One whole message body.
    fn deliver(&mut self, own: bool, body: &[u8]) {
        match self.link.config.wire {
            Wire::Ioppytest => {
                deliver_json(body, &self.tun, &self.counters, &mut self.json_scratch);
            }
            Wire::Native if !own => {
                deliver(body, &self.tun, &self.counters, &mut self.latency, &self.peers, super::now_ns());
            }
            Wire::Native => {} // our own flood, echoed by the broker
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
