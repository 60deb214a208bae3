//! Queue worker k's uplink: its one AMQP connection ([`Client`], non-blocking, driven by
//! the worker's `ppoll`), on which it publishes its batches and consumes queue
//! `…<name>.k`, with the wire's [`Outbound`], the receiving half ([`Receiver`]), presence
//! (queue 0 of a native agent says hello and answers probes) and what the sending half
//! counts. Hot path.
//!
//! The connection's life (which node, backoff, handshake, the queue and its bindings:
//! queue k is bound to shard `s` of each owned address when `s mod K == k`, queue 0 also
//! takes the flood pattern; failover, close) is the pure machine `amqp::connection`, so no
//! call here waits on the network: while the uplink is down or setting up, the worker
//! keeps draining its port and counts what it cannot send as `broker_down`. What the
//! machine notes (up, lost, failed attempts) becomes the agent's one log line per outage
//! ([`BrokerState`]), the reconnect counter, and the link's state in `agent status`.
//! It is the agent's side of a connection, so it lives with the worker, above `amqp`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::os::fd::BorrowedFd;

use crate::amqp::client::{self, Client, ConnectOptions, Consume, Note, Plan, Published, QueuePlan, Retry};
use crate::amqp::presence::{Announcements, HELLO_EVERY, JSON_PROPERTIES};
use crate::amqp::session::{Event, QueueOptions};
use crate::amqp::BrokerState;
use crate::codec::ioppytest;
use crate::codec::v1::{self, BatchWriter, VNET_HDR_LEN};
use crate::config::{AgentConfig, Wire};
use crate::metrics::{DropReason, Histograms, LocalHistogram, TxCounters};
use crate::port::Port;
use crate::route::{self, RoutingKey};
use crate::sys::Interest;
use crate::util::{now_ns, Stop};

use super::batch::{Outlet, MAX_ENTRY};
use super::rx::{Receiver, READS_PER_WAKE};
use super::window::Ask;
use super::wire::{Outbound, Outcome};

/// Unacknowledged bytes in the publishing socket above which the broker counts as busy
/// ([`Outlet::busy`]):
/// the end of a burst then keeps its batches open (re-checked every
/// [`super::queue::HOLD_POLL`]) instead of queueing small messages behind large ones
/// (decision 0013).
pub const HOLD_UNSENT: usize = 256 * 1024;
/// Shortest time between two hellos sent in answer to probes.
pub const PROBE_ANSWER_GAP: Duration = Duration::from_millis(250);
/// Shortest time between two answers to pings (`agent ping` sends one a second): a ping
/// flood costs at most a hundred small answers a second.
pub const PING_ANSWER_GAP: Duration = Duration::from_millis(10);

/// Bound of each consumer queue in messages (the byte bound is `--queue-max-bytes`):
/// beyond them the broker drops the oldest messages rather than let a slow receiver build
/// seconds of delay (bufferbloat). See docs/decisions/0005-queue-bounds.md.
pub const QUEUE_MAX_MESSAGES: i32 = 4096;

/// How long a stopping uplink waits for the broker to confirm its close.
pub const CLOSE_WAIT: Duration = crate::amqp::connection::CLOSE_WAIT;

/// What queue worker k needs to open and report on its uplink.
#[derive(Clone)]
pub struct UplinkContext {
    pub config: Arc<AgentConfig>,
    pub index: usize,
    pub broker: Arc<BrokerState>,
    /// Connections of this agent currently up (one per queue when all is well).
    pub connected: Arc<AtomicUsize>,
    /// What this agent says about itself on the bus, for the link that announces it (queue
    /// 0 of a native agent; `None` elsewhere): it publishes hellos and answers probes.
    pub hello: Option<Arc<Announcements>>,
    /// The agent's stop flag: a connection attempt gives up when it is raised.
    pub stop: Stop,
    /// Whether this link is up and on which node, for `agent status`.
    pub state: Arc<crate::status::LinkState>,
    /// An L2 agent with `--bridge`: the MACs seen behind its bridge, which its hellos
    /// announce (queue 0).
    pub local_macs: Option<Arc<super::switch::LocalMacs>>,
    /// End-to-end encryption (`--e2e`): the agent's keys and sessions, shared by its links.
    pub e2e: Option<Arc<crate::e2e::E2e>>,
}

impl UplinkContext {
    /// Connection options of this uplink.
    pub fn connect_options(&self) -> ConnectOptions {
        let c = &self.config;
        let mut o = ConnectOptions::new(format!("tunbus {} q{}", c.name(), self.index));
        o.frame_max = c.bus().frame_max;
        o.heartbeat = c.bus().heartbeat;
        o
    }

    /// What queue k sets up on every node: the exchange, the exclusive queue (bounded), its
    /// bindings, the prefetch and the consumer.
    pub fn plan(&self) -> Plan {
        let c = &self.config;
        let k = self.index;
        Plan {
            exchange: c.bus().exchange.clone(),
            queue: Some(QueuePlan {
                name: c.queue_name(k),
                options: QueueOptions { exclusive: true, ..QueueOptions::default() },
                max_length: Some(QUEUE_MAX_MESSAGES),
                max_length_bytes: Some(c.bus().queue_max_bytes.min(i64::MAX as u64) as i64),
                bindings: self.binding_keys(),
                prefetch: Some(c.bus().prefetch),
                consume: Some(Consume { tag: format!("tunbus-{}-{k}", c.name()), no_ack: false, exclusive: false }),
            }),
        }
    }

    /// A client for this uplink, not connected yet (`retry`: forever for a running
    /// agent; once per node for the start, which reports what the broker refused).
    pub fn client(&self, retry: Retry) -> Client {
        let seed = (self.index as u64) ^ now_ns() ^ u64::from(std::process::id()) << 32;
        Client::new(self.config.bus().endpoints.clone(), &self.connect_options(), self.plan(), retry, seed)
    }

    /// The keys queue k binds.
    pub fn binding_keys(&self) -> Vec<String> {
        let c = &self.config;
        let k = self.index;
        let mut keys = Vec::new();
        let l2 = c.interface().is_l2();
        match c.data_path().wire {
            // An L2 agent binds its TAP's MAC (all shards, or its queue's), and the floods.
            Wire::Native if l2 => {
                let mac = c.mac();
                if c.interface().queues == 1 {
                    keys.push(route::mac::mac_pattern(mac));
                } else {
                    for shard in 0..route::SHARDS {
                        if route::queue_for_shard(shard, c.interface().queues) == k {
                            keys.push(RoutingKey::mac(mac, shard).as_str().to_owned());
                        }
                    }
                }
                if k == 0 {
                    keys.push(route::ALL_PATTERN.to_owned());
                }
            }
            // One queue takes every shard: one wildcard binding per address says so, and
            // keeps the exchange small (300 agents: ~900 bindings instead of ~10 000).
            Wire::Native if c.interface().queues == 1 => {
                keys.extend(c.owned_addresses().into_iter().map(route::unicast_pattern));
                keys.push(route::ALL_PATTERN.to_owned());
            }
            Wire::Native => {
                for addr in c.owned_addresses() {
                    for shard in 0..route::SHARDS {
                        if route::queue_for_shard(shard, c.interface().queues) == k {
                            keys.push(RoutingKey::unicast(addr, shard).as_str().to_owned());
                        }
                    }
                }
                if k == 0 {
                    keys.push(route::ALL_PATTERN.to_owned());
                }
            }
            // The router addresses old-wire agents by name, one packet per message.
            Wire::Ioppytest if c.interface().serial().is_some() => keys.push(ioppytest::serial::routing_key_to_agent(c.name())),
            Wire::Ioppytest => keys.push(ioppytest::routing_key_to_agent(c.name())),
        }
        if self.hello.is_some() {
            keys.push(route::CTL_PROBE.to_owned());
            if let Some(ping) = RoutingKey::ping(c.name()) {
                keys.push(ping.as_str().to_owned());
            }
            if self.e2e.is_some() {
                // Handshake messages for this agent.
                keys.push(crate::e2e::handshake_key(c.name()));
            }
            if c.identity().mode == crate::identity::Mode::FirstClaim || (l2 && c.data_path().wire == Wire::Native) {
                // First claim: every hello and bye, to know who holds which address; L2:
                // to learn which agent owns which MAC.
                keys.push(route::HELLO_PATTERN.to_owned());
                keys.push(route::BYE_PATTERN.to_owned());
            }
            // The prefixes gateways advertise (decision 0027): senders route by them.
            keys.push(route::ROUTE_PATTERN.to_owned());
        }
        keys
    }
}

/// Queue worker k's uplink: its connection (up or not), how batches go onto it (the wire's
/// [`Outbound`]), the receiving half, presence, and what the sending half counts.
pub struct Uplink {
    ctx: UplinkContext,
    client: Client,
    outbound: Box<dyn Outbound>,
    pub receiver: Receiver,
    /// Queue 0 of a native agent: its presence, and when to say hello next.
    announce: Option<Announcements>,
    next_hello: Instant,
    last_hello: Instant,
    /// When the last ping was answered.
    last_pong: Instant,
    /// First claim: ask everyone for their hellos once connected (to learn their claims).
    probe_due: bool,
    /// The version of the bridge's MACs the hello announces.
    local_version: u64,
    /// Down as far as [`BrokerState`] knows (so up and down are reported once each).
    down: bool,
    counters: Arc<TxCounters>,
    exchange: String,
    seq: u64,
    wait: LocalHistogram,
    packets: LocalHistogram,
    bytes: LocalHistogram,
}

impl Uplink {
    /// An uplink on `client` (a fresh one, or the one the agent's start connected).
    pub fn new(
        ctx: UplinkContext,
        counters: Arc<TxCounters>,
        hist: &Histograms,
        outbound: Box<dyn Outbound>,
        receiver: Receiver,
        mut client: Client,
    ) -> Uplink {
        // The backlog holds at most one message: the largest batch and its frames.
        client.reserve_backlog(ctx.config.data_path().max_batch_bytes.max(v1::HEADER_LEN + MAX_ENTRY) + 16 * 1024);
        // A running agent's link comes back, whatever happened at the start.
        client.set_retry(Retry::Forever);
        let mut up = Uplink {
            exchange: ctx.config.bus().exchange.clone(),
            announce: ctx.hello.as_deref().cloned(),
            next_hello: Instant::now(),
            last_hello: Instant::now() - PROBE_ANSWER_GAP,
            last_pong: Instant::now() - PING_ANSWER_GAP,
            probe_due: false,
            local_version: 0,
            down: false,
            ctx,
            client,
            outbound,
            receiver,
            counters,
            seq: 0,
            wait: LocalHistogram::new(hist.read_to_publish_us.clone()),
            packets: LocalHistogram::new(hist.batch_packets.clone()),
            bytes: LocalHistogram::new(hist.batch_bytes.clone()),
        };
        if up.client.is_up() {
            let node = up.client.node();
            up.connected(node, false);
        }
        up
    }

    /// Moves the connection on (timers, the next attempt, handshake, set-up, queued
    /// bytes) without waiting, and acts on what its machine noted.
    pub fn poll(&mut self, now: Instant) {
        self.client.poll(now);
        while let Some(note) = self.client.poll_note() {
            match note {
                Note::Up { node, again } => self.connected(node, again),
                Note::Lost { error, .. } => {
                    self.ctx.state.down();
                    self.ctx.connected.fetch_sub(1, Ordering::AcqRel);
                    self.report_down(&error);
                }
                Note::AttemptFailed { node, error } => {
                    tracing::debug!(agent = %self.ctx.config.name(), queue = self.ctx.index, node, %error, "connection attempt failed");
                    self.report_down(&error);
                }
            }
        }
    }

    fn report_down(&mut self, error: &client::Error) {
        if !self.down {
            self.ctx.broker.link_down(self.ctx.config.name(), error);
            self.down = true;
        }
    }

    /// Set up on `node` (`again`: a reconnection).
    fn connected(&mut self, node: usize, again: bool) {
        if self.down {
            self.ctx.broker.link_up(self.ctx.config.name());
            self.down = false;
        }
        if again {
            self.counters.reconnected();
        }
        if let Some(a) = &mut self.announce {
            a.on_node(Some(self.client.broker()));
        }
        self.receiver.reset();
        self.tune_window(); // a first round-trip sample on the idle connection
        if let (Some(e2e), true) = (&self.ctx.e2e, self.announce.is_some()) {
            // A new handshake with every peer on every new connection of queue 0: after a
            // restart of this agent or of the broker, sessions start afresh.
            e2e.initiate_all(Instant::now(), now_ns());
        }
        self.next_hello = Instant::now(); // say hello on every new connection
                                          // First claim, and agents that install routes: ask for everyone's hellos now rather
                                          // than wait for the next round.
        self.probe_due =
            self.announce.is_some() && (self.ctx.config.identity().mode == crate::identity::Mode::FirstClaim || self.ctx.config.routing().accept_routes);
        self.ctx.state.up(node);
        self.ctx.connected.fetch_add(1, Ordering::AcqRel);
        tracing::debug!(agent = %self.ctx.config.name(), queue = self.ctx.index, node, "link connected");
    }

    /// A probe arrived: say hello now, or at most one answer per [`PROBE_ANSWER_GAP`]: a probe flood costs a hello now and then.
    pub fn answer_probe(&mut self) {
        let now = Instant::now();
        self.next_hello = self.next_hello.min(now.max(self.last_hello + PROBE_ANSWER_GAP));
        self.announce_if_due();
    }

    /// Publishes this agent's hello when it is due (every [`HELLO_EVERY`], at once after a
    /// connection or a probe). Pre-serialised bytes: no allocation.
    pub fn announce_if_due(&mut self) {
        self.note_local_macs();
        self.send_handshakes();
        let Some(a) = &self.announce else { return };
        let now = Instant::now();
        if now < self.next_hello || !self.client.is_up() {
            return;
        }
        match self.client.publish(now, &self.exchange, &a.hello_key, &JSON_PROPERTIES, &a.hello) {
            Ok(Published::Busy | Published::Down) => {} // try again on the next turn
            Ok(_) => {
                self.next_hello = now + HELLO_EVERY;
                self.last_hello = now;
                // A gateway's hello also goes where every agent listens for routes.
                if let Some(key) = &a.route_key {
                    if let Err(e) = self.client.publish_copy(&self.exchange, key, &JSON_PROPERTIES, &a.hello) {
                        return self.client.fail(now, e);
                    }
                }
            }
            Err(e) => return self.client.fail(now, e),
        }
        if std::mem::take(&mut self.probe_due) {
            if let Err(e) = self.client.publish_copy(&self.exchange, route::CTL_PROBE, &JSON_PROPERTIES, br#"{"from":"first claim"}"#) {
                self.client.fail(now, e);
            }
        }
    }

    /// New MACs behind the bridge: the hello names them, and goes out soon (at most one
    /// extra hello per [`PROBE_ANSWER_GAP`]).
    fn note_local_macs(&mut self) {
        let (Some(local), Some(a)) = (&self.ctx.local_macs, &mut self.announce) else { return };
        let v = local.version();
        if v == self.local_version {
            return;
        }
        self.local_version = v;
        let mut macs: Vec<_> = a.macs().first().copied().into_iter().collect();
        for m in local.list() {
            if !macs.contains(&m) {
                macs.push(m);
            }
        }
        a.set_macs(macs);
        let now = Instant::now();
        self.next_hello = self.next_hello.min(now.max(self.last_hello + PROBE_ANSWER_GAP));
    }

    /// Publishes the end-to-end handshake messages waiting in the agent's outbox (any link
    /// that is up takes them; control plane: a few per peer every two minutes).
    pub fn send_handshakes(&mut self) {
        let Some(e2e) = &self.ctx.e2e else { return };
        if self.announce.is_some() {
            e2e.tick(Instant::now(), now_ns()); // the group key's renewal, when due
        }
        if !e2e.has_outgoing() || !self.client.is_up() {
            return;
        }
        let now = Instant::now();
        for m in e2e.take_outgoing() {
            if let Err(e) = self.client.publish_copy(&self.exchange, &m.routing_key, &crate::amqp::wire::Properties::default(), &m.body) {
                return self.client.fail(now, e);
            }
        }
    }

    /// Whether the broker is still behind on what we sent: then a small batch would only
    /// queue behind it, so the worker keeps filling.
    pub fn busy(&self) -> bool {
        self.client.backlogged() || self.client.unsent() > HOLD_UNSENT
    }

    /// A message is half-written: nothing more can be published until it is out.
    pub fn backlogged(&self) -> bool {
        self.client.backlogged()
    }

    pub fn has_buffered(&self) -> bool {
        self.client.has_buffered()
    }

    /// When the connection wants attention (the next attempt, a deadline, a heartbeat,
    /// the stall check).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.client.poll_timeout()
    }

    /// What to wait on: the socket (or the connect under way), and for what.
    pub fn fd(&self) -> Option<(BorrowedFd<'_>, Interest)> {
        self.client.fd()
    }

    pub fn is_up(&self) -> bool {
        self.client.is_up()
    }

    /// The broker sent something: deliveries (and control, such as a close when it shuts
    /// down) for the receiving half, whose units go to `port`.
    pub fn on_readable(&mut self, port: &mut dyn Port) {
        if !self.client.is_up() {
            return;
        }
        if let Err(e) = receive(&mut self.client, &mut self.receiver, port) {
            self.client.fail(Instant::now(), e);
            return;
        }
        self.tune_window();
        self.answer_pings();
        self.send_handshakes();
    }

    /// Sends what the consumer's window asks for (a round-trip sample, a larger prefetch:
    /// `worker::window`); sent with the next flush.
    fn tune_window(&mut self) {
        let now = Instant::now();
        let Some(ask) = self.receiver.window_ask(now) else { return };
        let sent = match ask {
            Ask::Probe(p) => self.client.ask_qos(p),
            Ask::Prefetch(p) => self.client.set_prefetch(p),
        };
        if sent {
            self.receiver.window_sent(ask, now);
            if let Err(e) = self.client.flush(now) {
                self.client.fail(now, e);
            }
        }
    }

    /// Answers the pings that arrived (`agent ping`), at most one per [`PING_ANSWER_GAP`],
    /// on the reply keys they name (pong keys only: `amqp::ping::answer`), saying which node
    /// and queue answered. Control plane: nothing here runs unless a ping came.
    fn answer_pings(&mut self) {
        let pings = self.receiver.take_pings();
        for body in pings {
            let now = Instant::now();
            if now < self.last_pong + PING_ANSWER_GAP {
                continue;
            }
            let queue = self.ctx.config.queue_name(self.ctx.index);
            let Some((key, pong)) = crate::amqp::ping::answer(&body, self.ctx.config.name(), self.client.broker(), &queue, now_ns()) else { continue };
            match self.client.publish_copy(&self.exchange, &key, &JSON_PROPERTIES, &pong) {
                Ok(_) => self.last_pong = now,
                Err(e) => return self.client.fail(now, e),
            }
        }
    }

    /// Acknowledges deliveries once the socket was drained (after the TUN side, see
    /// [`Receiver::take_ack`]).
    pub fn ack_if_drained(&mut self) {
        if !self.client.is_up() {
            return;
        }
        if let Some(tag) = self.receiver.take_ack() {
            self.client.ack_multiple(tag);
            if let Err(e) = self.client.flush(Instant::now()) {
                self.client.fail(Instant::now(), e);
            }
        }
    }

    /// Says goodbye to the broker (bounded wait); closing the connection deletes the
    /// exclusive queue.
    pub fn close(&mut self) {
        self.receiver.idle();
        for h in [&mut self.wait, &mut self.packets, &mut self.bytes] {
            h.maybe_fold(Instant::now(), true);
        }
        if let Some(a) = &self.announce {
            if self.client.is_up() {
                let _ = self.client.publish(Instant::now(), &self.exchange, &a.bye_key, &JSON_PROPERTIES, &a.bye);
                if let Some(key) = &a.route_key {
                    let _ = self.client.publish_copy(&self.exchange, key, &JSON_PROPERTIES, &a.bye);
                }
                let _ = self.client.flush(Instant::now());
            }
        }
        if self.client.is_up() {
            self.ctx.state.down();
            self.ctx.connected.fetch_sub(1, Ordering::AcqRel);
        }
        self.client.close_within(CLOSE_WAIT);
    }
}

impl Outlet for Uplink {
    /// Publishes one finished batch, or counts it as dropped when the broker is away or
    /// blocked. `false` when the connection cannot take it yet (keep it and try later).
    fn publish(&mut self, writer: &mut BatchWriter, key: RoutingKey, read_ns: u64) -> bool {
        let packets = writer.count() as u64;
        let overhead = v1::HEADER_LEN + writer.count() * (4 + VNET_HDR_LEN);
        let bytes = writer.len().saturating_sub(overhead) as u64;
        let client = &mut self.client;
        if !client.is_up() {
            self.counters.record_drop(DropReason::BrokerDown, packets);
            return true;
        }
        if client.backlogged() {
            return false;
        }
        // The top 16 bits name the link, the rest counts the batches it sent
        // (docs/wire-format.md): a capture reads a gap in one link's count as batches lost.
        // A number is used up only by a batch that goes out (not by one retried later).
        let seq = (self.seq + 1) & crate::capture::LINK_SEQ_MASK;
        writer.finish(seq | (self.ctx.index as u64) << crate::capture::LINK_SHIFT, now_ns());
        let now = Instant::now();
        match self.outbound.publish(client, now, &self.exchange, key, writer) {
            Ok(Outcome::Refused(reason)) => {
                self.counters.record_drop(reason, packets);
                self.send_handshakes(); // a handshake it started, at once
                true
            }
            Ok(Outcome::Broker(Published::Sent)) => {
                self.seq = seq;
                self.counters.sent.message(packets, bytes);
                self.wait.record_n(now_ns().saturating_sub(read_ns) / 1000, 1);
                self.packets.record_n(packets, 1);
                self.bytes.record_n(writer.len() as u64, 1);
                for h in [&mut self.wait, &mut self.packets, &mut self.bytes] {
                    h.maybe_fold(now, false);
                }
                true
            }
            Ok(Outcome::Broker(Published::Blocked)) => {
                self.counters.record_drop(DropReason::BrokerBlocked, packets);
                true
            }
            Ok(Outcome::Broker(Published::Busy)) => false,
            Ok(Outcome::Broker(Published::Down)) => {
                self.counters.record_drop(DropReason::BrokerDown, packets);
                true
            }
            Err(e) => {
                self.counters.record_drop(DropReason::BrokerDown, packets);
                self.client.fail(Instant::now(), e);
                true
            }
        }
    }

    fn busy(&self) -> bool {
        Uplink::busy(self)
    }

    fn dropped(&mut self, reason: DropReason, packets: u64) {
        self.counters.record_drop(reason, packets);
    }
}

/// Takes what has arrived on `client` (up to [`READS_PER_WAKE`] reads) and
/// hands deliveries to `receiver`; once the socket is drained the acknowledgement is due.
fn receive(client: &mut Client, receiver: &mut Receiver, port: &mut dyn Port) -> Result<(), client::Error> {
    for _ in 0..READS_PER_WAKE {
        take_events(client, receiver, port)?;
        if client.read_some()? == 0 {
            receiver.drained();
            break;
        }
    }
    take_events(client, receiver, port)?;
    receiver.fold_now();
    Ok(())
}

/// Handles every whole event already read.
fn take_events(client: &mut Client, receiver: &mut Receiver, port: &mut dyn Port) -> Result<(), client::Error> {
    let now = Instant::now();
    loop {
        let ack = match client.next_event(now)? {
            None => return Ok(()),
            Some(Event::Delivery(d)) => receiver.on_delivery(d, now_ns(), port),
            Some(Event::Oversized { tag }) => receiver.on_oversized(tag),
            Some(Event::Cancelled) => return Err(client::Error::Eof { broker: client.broker().to_owned(), hint: " (our consumer was cancelled)" }),
            Some(Event::Reply { .. }) => {
                receiver.window_answered(now);
                None
            }
            Some(_) => None, // blocked and unblocked are the client's; no reply is due
        };
        if let Some(tag) = ack {
            client.ack_multiple(tag);
        }
    }
}
