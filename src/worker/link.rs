//! One link per TUN queue k: one AMQP connection ([`Client`]), owned by queue worker k,
//! which publishes its batches on it and consumes queue `…<name>.k` from it.
//!
//! This module holds [`Link`], the link itself (its connection when up, the wire's
//! [`Outbound`], the receiving half, presence, what the sending half counts); how to open
//! it ([`LinkContext`]:  (the exchange, the exclusive queue and its bindings:
//! queue k is bound to shard `s` of each owned address when `s mod K == k`, queue 0 also
//! takes the flood pattern) on the first broker node that answers, and [`Reconnect`], the
//! state of a connection that may be lost: which node to try next, backoff, one log line
//! per outage for the whole agent ([`BrokerState`]) and the reconnect counter.
//! It is the agent's side of a connection, so it lives with the worker, above `amqp`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::os::fd::BorrowedFd;

use crate::amqp::client::{self, Client, ConnectOptions, Endpoint, Error, Published};
use crate::amqp::presence::{Announcements, HELLO_EVERY, JSON_PROPERTIES};
use crate::amqp::session::{Event, QueueOptions};
use crate::amqp::wire::Value;
use crate::amqp::{Backoff, BrokerState};
use crate::codec::ioppytest;
use crate::codec::v1::{self, BatchWriter, VNET_HDR_LEN};
use crate::config::{AgentConfig, Wire};
use crate::metrics::{DropReason, Histograms, LocalHistogram, TxCounters};
use crate::port::Port;
use crate::route::{self, RoutingKey};
use crate::util::{now_ns, Stop};

use super::batch::{Outlet, MAX_ENTRY};
use super::rx::{Receiver, READS_PER_WAKE};
use super::wire::Outbound;

/// Unacknowledged bytes in the publishing socket above which the broker counts as busy
/// ([`Outlet::busy`]):
/// the end of a burst then keeps its batches open (re-checked every
/// [`super::queue::HOLD_POLL`]) instead of queueing small messages behind large ones
/// (decision 0013).
pub const HOLD_UNSENT: usize = 256 * 1024;
/// Shortest time between two hellos sent in answer to probes.
pub const PROBE_ANSWER_GAP: Duration = Duration::from_millis(250);

/// Bound of each consumer queue in messages (the byte bound is `--queue-max-bytes`):
/// beyond them the broker drops the oldest messages rather than let a slow receiver build
/// seconds of delay (bufferbloat). See docs/decisions/0005-queue-bounds.md.
pub const QUEUE_MAX_MESSAGES: i32 = 4096;

/// How long a stopping link waits for the broker to confirm its close.
pub const CLOSE_WAIT: Duration = Duration::from_millis(300);

/// Deadline of a reconnection attempt (the first attempt of a link gets
/// [`client::CONNECT_TIMEOUT`]; a URL's `connection_timeout` overrides both): a path
/// that black-holes the handshake costs at most this once it heals.
pub const RECONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// What queue worker k needs to open and report on its link.
#[derive(Clone)]
pub struct LinkContext {
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
}

impl LinkContext {
    /// Connection options of this link (`timeout`: the attempt's deadline).
    pub fn connect_options(&self, timeout: Duration) -> ConnectOptions {
        let c = &self.config;
        let mut o = ConnectOptions::new(format!("tunbus {} q{}", c.name(), self.index));
        o.frame_max = c.bus().frame_max;
        o.heartbeat = c.bus().heartbeat;
        o.timeout = timeout;
        o
    }

    /// Opens the connection of queue k on the first node that answers, trying them in
    /// order from `start_at` with `timeout` each: the exchange, the queue, its bindings and
    /// the consumer; publishing needs nothing more. Returns the client and the node's index.
    pub fn open(&self, start_at: usize, timeout: Duration) -> Result<(Client, usize), Error> {
        let endpoints = &self.config.bus().endpoints;
        let mut last = None;
        for i in 0..endpoints.len() {
            let at = (start_at + i) % endpoints.len();
            match self.open_on(&endpoints[at], timeout) {
                Ok(c) => return Ok((c, at)),
                Err(Error::Stopped) => return Err(Error::Stopped),
                Err(e) => {
                    tracing::debug!(agent = %self.config.name(), queue = self.index, node = %endpoints[at].url, error = %e, "node did not take the link");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or(Error::Stopped))
    }

    fn open_on(&self, endpoint: &Endpoint, timeout: Duration) -> Result<Client, Error> {
        let c = &self.config;
        let k = self.index;
        let stop = self.stop.flag();
        let opts = self.connect_options(timeout);
        let mut client = client::with_exchange(&c.bus().exchange, stop, || Client::open(endpoint, &opts, stop))?;
        let queue = c.queue_name(k);
        let max_bytes = c.bus().queue_max_bytes.min(i64::MAX as u64) as i64;
        let args = [("x-max-length", Value::I32(QUEUE_MAX_MESSAGES)), ("x-max-length-bytes", Value::I64(max_bytes))];
        client.queue_declare(&queue, QueueOptions { exclusive: true, ..QueueOptions::default() }, &args, stop)?;
        for key in self.binding_keys() {
            client.queue_bind(&queue, &c.bus().exchange, &key, stop)?;
        }
        client.basic_qos(c.bus().prefetch, stop)?;
        client.basic_consume(&queue, &format!("tunbus-{}-{k}", c.name()), false, false, stop)?;
        Ok(client)
    }

    /// The keys queue k binds.
    pub fn binding_keys(&self) -> Vec<String> {
        let c = &self.config;
        let k = self.index;
        let mut keys = Vec::new();
        match c.data_path().wire {
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
            Wire::Ioppytest => keys.push(ioppytest::routing_key_to_agent(c.name())),
        }
        if self.hello.is_some() {
            keys.push(route::CTL_PROBE.to_owned());
            if c.identity().mode == crate::identity::Mode::FirstClaim {
                // First claim: every hello and bye, to know who holds which address.
                keys.push(route::HELLO_PATTERN.to_owned());
                keys.push(route::BYE_PATTERN.to_owned());
            }
        }
        keys
    }
}

/// The life of one connection that may be lost: when to try again, on which node, and
/// what to tell.
#[derive(Debug)]
pub struct Reconnect {
    backoff: Backoff,
    next_try: Instant,
    /// Down as far as [`BrokerState`] knows (so up and down are reported once each).
    down: bool,
    ever_up: bool,
    /// The node of the last connection (or the one to try first).
    node: usize,
}

impl Reconnect {
    pub fn new(seed: u64) -> Reconnect {
        Reconnect { backoff: Backoff::new(seed), next_try: Instant::now(), down: false, ever_up: false, node: 0 }
    }

    /// Whether it is time for the next connection attempt.
    pub fn due(&self, now: Instant) -> bool {
        now >= self.next_try
    }

    /// Time left before the next attempt.
    pub fn until_due(&self, now: Instant) -> Duration {
        self.next_try.saturating_duration_since(now)
    }

    /// The node the next attempt starts with.
    pub fn node(&self) -> usize {
        self.node
    }

    /// The next attempt's deadline: the full one until the link has been up once.
    pub fn attempt_timeout(&self) -> Duration {
        if self.ever_up {
            RECONNECT_TIMEOUT
        } else {
            client::CONNECT_TIMEOUT
        }
    }

    /// The connection is up (first time, or again) on node `node`.
    pub fn up(&mut self, ctx: &LinkContext, counters: &TxCounters, node: usize) {
        if self.down {
            ctx.broker.link_up(ctx.config.name());
            if self.ever_up {
                counters.reconnected();
            }
            self.down = false;
        }
        self.ever_up = true;
        self.backoff.reset();
        self.node = node;
        ctx.state.up(node);
        ctx.connected.fetch_add(1, Ordering::AcqRel);
        tracing::debug!(agent = %ctx.config.name(), queue = ctx.index, node, "link connected");
    }

    /// A connection that was up is gone: the next attempt starts with the next node, so a
    /// dead node costs one failed attempt, not one per retry.
    pub fn lost(&mut self, ctx: &LinkContext, error: &Error) {
        ctx.state.down();
        ctx.connected.fetch_sub(1, Ordering::AcqRel);
        let nodes = ctx.config.bus().endpoints.len().max(1);
        if !matches!(error, Error::Stopped) && nodes > 1 {
            self.node = (self.node + 1) % nodes;
        }
        self.failed(ctx, error);
    }

    /// A connection was lost: report once, back off.
    pub fn failed(&mut self, ctx: &LinkContext, error: &Error) {
        let now = Instant::now();
        self.attempt_failed(ctx, error, now);
    }

    /// A connection attempt that began at `started` failed: report once, back off. The
    /// time the attempt itself took counts towards the backoff (a black-holed handshake
    /// has waited its deadline already; spacing attempts is what the backoff is for).
    pub fn attempt_failed(&mut self, ctx: &LinkContext, error: &Error, started: Instant) {
        if !self.down {
            ctx.broker.link_down(ctx.config.name(), error);
            self.down = true;
        }
        tracing::debug!(agent = %ctx.config.name(), queue = ctx.index, %error, "data connection failed");
        let now = Instant::now();
        self.next_try = (started + self.backoff.failed(now)).max(now);
    }
}

/// Link k, owned by queue worker k: its connection (when up), how batches go onto it (the
/// wire's [`Outbound`]), the receiving half, and what the sending half counts.
pub struct Link {
    ctx: LinkContext,
    client: Option<Client>,
    outbound: Box<dyn Outbound>,
    pub receiver: Receiver,
    /// Queue 0 of a native agent: its presence, and when to say hello next.
    announce: Option<Announcements>,
    next_hello: Instant,
    last_hello: Instant,
    /// First claim: ask everyone for their hellos once connected (to learn their claims).
    probe_due: bool,
    reconnect: Reconnect,
    counters: Arc<TxCounters>,
    exchange: String,
    seq: u64,
    wait: LocalHistogram,
    packets: LocalHistogram,
    bytes: LocalHistogram,
}

impl Link {
    pub fn new(ctx: LinkContext, counters: Arc<TxCounters>, hist: &Histograms, outbound: Box<dyn Outbound>, receiver: Receiver, client: Option<(Client, usize)>) -> Link {
        let seed = (ctx.index as u64) ^ now_ns() ^ u64::from(std::process::id()) << 32;
        let mut link = Link {
            exchange: ctx.config.bus().exchange.clone(),
            announce: ctx.hello.as_deref().cloned(),
            next_hello: Instant::now(),
            last_hello: Instant::now() - PROBE_ANSWER_GAP,
            probe_due: false,
            ctx,
            client: None,
            outbound,
            receiver,
            reconnect: Reconnect::new(seed),
            counters,
            seq: 0,
            wait: LocalHistogram::new(hist.read_to_publish_us.clone()),
            packets: LocalHistogram::new(hist.batch_packets.clone()),
            bytes: LocalHistogram::new(hist.batch_bytes.clone()),
        };
        if let Some((c, node)) = client {
            link.connected(c, node);
        }
        link
    }

    fn connected(&mut self, mut client: Client, node: usize) {
        // The backlog holds at most one message: the largest batch and its frames.
        client.reserve_backlog(self.ctx.config.data_path().max_batch_bytes.max(v1::HEADER_LEN + MAX_ENTRY) + 16 * 1024);
        if let Some(a) = &mut self.announce {
            a.on_node(Some(client.broker()));
        }
        self.client = Some(client);
        self.receiver.reset();
        self.next_hello = Instant::now(); // say hello on every new connection
        self.probe_due = self.announce.is_some() && self.ctx.config.identity().mode == crate::identity::Mode::FirstClaim;
        self.reconnect.up(&self.ctx, &self.counters, node);
    }

    /// Connects when disconnected and the backoff allows it.
    pub fn maintain(&mut self) {
        if self.client.is_some() || !self.reconnect.due(Instant::now()) {
            return;
        }
        let started = Instant::now();
        match self.ctx.open(self.reconnect.node(), self.reconnect.attempt_timeout()) {
            Ok((client, node)) => self.connected(client, node),
            Err(client::Error::Stopped) => {}
            Err(e) => self.reconnect.attempt_failed(&self.ctx, &e, started),
        }
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
        let (Some(a), Some(client)) = (&self.announce, &mut self.client) else { return };
        let now = Instant::now();
        if now < self.next_hello {
            return;
        }
        match client.publish(now, &self.exchange, &a.hello_key, &JSON_PROPERTIES, &a.hello) {
            Ok(Published::Busy) => {} // try again on the next turn
            Ok(_) => {
                self.next_hello = now + HELLO_EVERY;
                self.last_hello = now;
            }
            Err(e) => return self.lose(e),
        }
        if std::mem::take(&mut self.probe_due) {
            if let Err(e) = client.publish_copy(&self.exchange, route::CTL_PROBE, &JSON_PROPERTIES, br#"{"from":"first claim"}"#) {
                self.lose(e);
            }
        }
    }

    /// Whether the broker is still behind on what we sent: then a small batch would only
    /// queue behind it, so the worker keeps filling.
    pub fn busy(&self) -> bool {
        self.client.as_ref().is_some_and(|c| c.backlogged() || c.unsent() > HOLD_UNSENT)
    }

    /// A message is half-written: nothing more can be published until it is out.
    pub fn backlogged(&self) -> bool {
        self.client.as_ref().is_some_and(Client::backlogged)
    }

    pub fn wants_write(&self) -> bool {
        self.client.as_ref().is_some_and(Client::wants_write)
    }

    pub fn has_buffered(&self) -> bool {
        self.client.as_ref().is_some_and(Client::has_buffered)
    }

    /// Time until the next connection attempt, while disconnected.
    pub fn reconnect_in(&self) -> Option<Duration> {
        self.client.is_none().then(|| self.reconnect.until_due(Instant::now()))
    }

    /// When the connection wants attention (a heartbeat, the stall check).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.client.as_ref().and_then(Client::poll_timeout)
    }

    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.client.as_ref().map(Client::fd)
    }

    pub fn flush(&mut self) {
        if let Some(c) = &mut self.client {
            if let Err(e) = c.flush(Instant::now()) {
                self.lose(e);
            }
        }
    }

    pub fn tick(&mut self) {
        if let Some(c) = &mut self.client {
            if let Err(e) = c.tick(Instant::now()) {
                self.lose(e);
            }
        }
    }

    /// The broker sent something: deliveries (and control, such as a close when it shuts
    /// down) for the receiving half.
    pub fn on_readable(&mut self, port: &mut dyn Port) {
        let Some(client) = &mut self.client else { return };
        if let Err(e) = receive(client, &mut self.receiver, port) {
            self.lose(e);
        }
    }

    /// Acknowledges deliveries once the socket was drained (after the TUN side, see
    /// [`Receiver::take_ack`]).
    pub fn ack_if_drained(&mut self) {
        let Some(client) = &mut self.client else { return };
        if let Some(tag) = self.receiver.take_ack() {
            client.ack_multiple(tag);
            if let Err(e) = client.flush(Instant::now()) {
                self.lose(e);
            }
        }
    }

    fn lose(&mut self, e: client::Error) {
        self.client = None;
        self.reconnect.lost(&self.ctx, &e);
    }

    /// Says goodbye to the broker (bounded wait); closing the connection deletes the
    /// exclusive queue.
    pub fn close(&mut self) {
        self.receiver.idle();
        for h in [&mut self.wait, &mut self.packets, &mut self.bytes] {
            h.maybe_fold(Instant::now(), true);
        }
        if let (Some(a), Some(client)) = (&self.announce, &mut self.client) {
            let _ = client.publish(Instant::now(), &self.exchange, &a.bye_key, &JSON_PROPERTIES, &a.bye);
            let _ = client.flush(Instant::now());
        }
        if let Some(client) = self.client.take() {
            client.close(CLOSE_WAIT);
        }
    }
}

impl Outlet for Link {
    /// Publishes one finished batch, or counts it as dropped when the broker is away or
    /// blocked. `false` when the connection cannot take it yet (keep it and try later).
    fn publish(&mut self, writer: &mut BatchWriter, key: RoutingKey, read_ns: u64) -> bool {
        let packets = writer.count() as u64;
        let overhead = v1::HEADER_LEN + writer.count() * (4 + VNET_HDR_LEN);
        let bytes = writer.len().saturating_sub(overhead) as u64;
        let Some(client) = &mut self.client else {
            self.counters.record_drop(DropReason::BrokerDown, packets);
            return true;
        };
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
            Ok(Published::Sent) => {
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
            Ok(Published::Blocked) => {
                self.counters.record_drop(DropReason::BrokerBlocked, packets);
                true
            }
            Ok(Published::Busy) => false,
            Err(e) => {
                self.counters.record_drop(DropReason::BrokerDown, packets);
                self.lose(e);
                true
            }
        }
    }

    fn busy(&self) -> bool {
        Link::busy(self)
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
            Some(_) => None, // blocked and unblocked are the client's; no reply is due
        };
        if let Some(tag) = ack {
            client.ack_multiple(tag);
        }
    }
}
