//! The queue worker: one OS thread per TUN queue k, owning TUN queue k and link k, a
//! single AMQP connection that carries both directions. Hot path.
//!
//! One `ppoll` waits on the TUN queue and the connection's socket. Packets read from the
//! TUN are batched and published (below); deliveries read from the socket go to the
//! [`Receiver`] (`worker::rx`), which writes them into the same TUN queue. One thread and
//! one connection per queue, both directions (docs/decisions/0014-one-worker-per-queue.md).
//!
//! TX: when the queue is readable (`IDLE_POLL` bounds the wait, to notice shutdown),
//! read a burst of up to [`BURST`] packets, each straight into the slot the [`Batcher`]
//! (`worker::batch`) hands out, classify it (destination, flow shard → routing key) and
//! let the batcher place it; the batcher decides when a batch is published (its flush
//! policy, the linger, the hold while the broker is behind). The worker shuttles bytes.
//!
//! Publishing: the worker writes each finished batch into the connection itself ([`Link`],
//! one `writev` per message), so a packet crosses no thread between the TUN and the
//! broker's socket (docs/decisions/0010-own-amqp-data-path.md). While it writes,
//! the next packets wait in the TUN queue, so the slower the broker, the larger the next
//! burst and its batches. When the broker is gone, batches are counted as `broker_down`
//! and the worker keeps draining the TUN while it reconnects with backoff. No allocation,
//! lock or syscall per packet besides the `read` itself.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::amqp::client::{self, Client, Published};
use crate::amqp::link::{self, LinkContext, Reconnect};
use crate::amqp::presence::{Announcements, HELLO_EVERY, JSON_PROPERTIES};
use crate::amqp::session::Event;
use crate::amqp::wire::Properties;
use crate::codec::ioppytest;
use crate::codec::v1::{self, BatchWriter, VNET_HDR_LEN};
use crate::config::Wire;
use crate::identity::claims::Claims;
use crate::identity::Trust;
use crate::metrics::{Counters, DropReason, Histograms, LocalHistogram};
use crate::route::peers::{self, PeerQueues};
use crate::route::{self, Destination, RoutingKey};
use crate::sys::{self, Interest};
use crate::tun::TunQueue;
use crate::util::{now_ns, Stop};

use super::batch::{Batcher, Outlet, MAX_READ};
use super::rx::Receiver;

/// Most packets read per wake-up before the open batches are flushed.
pub const BURST: usize = 256;
/// How often a worker holding a lingering batch re-checks it.
pub const HOLD_POLL: Duration = Duration::from_micros(50);
/// Unacknowledged bytes in the publishing socket above which the broker counts as busy
/// ([`Outlet::busy`]):
/// the end of a burst then keeps its batches open (re-checked every [`HOLD_POLL`]) instead
/// of queueing small messages behind large ones (decision 0013).
pub const HOLD_UNSENT: usize = 256 * 1024;
/// Shortest time between two hellos sent in answer to probes.
pub const PROBE_ANSWER_GAP: Duration = Duration::from_millis(250);
/// How often an idle worker wakes to notice shutdown (hundreds of agents share a lab).
pub const IDLE_POLL: Duration = Duration::from_millis(250);

/// The state of one queue worker; owned by its thread.
pub struct QueueWorker {
    queue: Arc<TunQueue>,
    link: Link,
    counters: Arc<Counters>,
    stop: Stop,
    batcher: Batcher,
    classifier: Classifier,
    scratch: Vec<u8>,
    read_errors_logged: bool,
}

/// Turns a packet into its routing key.
struct Classifier {
    flood_key: RoutingKey,
    own_v4: Vec<(Ipv4Addr, u8)>,
    /// Receivers' queue counts, learned by the receiving halves: batch per receiving queue.
    peers: Arc<PeerQueues>,
    /// The last unicast (destination, shard) and its key.
    last_unicast: Option<(IpAddr, u8, RoutingKey)>,
}

/// Everything queue worker k is built from.
pub struct WorkerSetup {
    pub queue: Arc<TunQueue>,
    pub link: LinkContext,
    /// What the sending half counts.
    pub tx_counters: Arc<Counters>,
    /// What the receiving half counts.
    pub rx_counters: Arc<Counters>,
    pub hist: Arc<Histograms>,
    /// Receivers' queue counts, shared by the agent's workers.
    pub peers: Arc<PeerQueues>,
    /// Who may use which source addresses, shared by the agent's workers.
    pub trust: Arc<Trust>,
    /// First-claim mode, queue 0: the claims its hellos keep.
    pub claims: Option<Arc<Mutex<Claims>>>,
    /// The connection when it was opened before the worker (link 0 at start).
    pub connected: Option<(Client, usize)>,
}

impl QueueWorker {
    /// A worker for TUN queue `setup.queue` and its link, with batches of up to
    /// `max_batch_bytes` (from the link's configuration).
    pub fn new(setup: WorkerSetup) -> QueueWorker {
        let WorkerSetup { queue, link, tx_counters: counters, rx_counters, hist, peers, trust, claims, connected } = setup;
        let config = link.config.clone();
        let own_queues = u8::try_from(config.queues).unwrap_or(0);
        // invariant: the agent refuses a name that is not a topic word before it builds workers
        let flood_key = RoutingKey::all(&config.name).unwrap_or_else(|| RoutingKey::unicast(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0));
        let own_v4 = config
            .addrs
            .iter()
            .filter_map(|p| match p.addr {
                IpAddr::V4(a) => Some((a, p.len)),
                IpAddr::V6(_) => None,
            })
            .collect();
        let presence = claims.map(|claims| super::rx::ClaimKeeper::new(claims, trust.clone()));
        let receiver = Receiver::new(&config, queue.clone(), rx_counters, &hist, flood_key, peers.clone(), trust.view(), presence);
        let stop = link.stop.clone();
        QueueWorker {
            queue,
            link: Link::new(link, counters.clone(), &hist, receiver, connected),
            counters,
            stop,
            batcher: Batcher::new(config.max_batch_bytes, own_queues, flood_key),
            classifier: Classifier { flood_key, own_v4, peers, last_unicast: None },
            scratch: vec![0; MAX_READ],
            read_errors_logged: false,
        }
    }

    /// Runs until the stop flag is set; then closes the connection.
    pub fn run(mut self) {
        while !self.stop.is_raised() {
            self.link.maintain();
            self.link.announce_if_due();
            let now = Instant::now();
            let holding = self.batcher.holding();
            let mut timeout = if holding { HOLD_POLL } else { IDLE_POLL };
            if let Some(wait) = self.link.reconnect_in() {
                timeout = timeout.min(wait.max(HOLD_POLL));
            }
            if let Some(at) = self.link.next_deadline() {
                timeout = timeout.min(at.saturating_duration_since(now));
            }
            if self.link.has_buffered() {
                timeout = Duration::ZERO;
            }
            // While a message is half-written, packets wait in the TUN queue: backpressure
            // instead of an unbounded queue of our own.
            let tun = (!self.link.backlogged()).then(|| (self.queue.fd(), Interest::Read));
            let socket = self.link.fd().map(|fd| (fd, if self.link.wants_write() { Interest::ReadWrite } else { Interest::Read }));
            match sys::wait([tun, socket], timeout) {
                Ok([t, s]) => {
                    if s.write {
                        self.link.flush();
                    }
                    let socket_event = s.read || s.error || self.link.has_buffered();
                    if socket_event {
                        self.link.on_readable();
                        if self.link.receiver.take_probe() {
                            self.link.answer_probe();
                        }
                    }
                    if t.error && !self.read_errors_logged {
                        tracing::warn!(queue = self.queue.index(), "tun queue reported an error or hang-up");
                        self.read_errors_logged = true;
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    if t.read {
                        self.burst();
                    } else {
                        self.batcher.end_of_burst(now_ns(), &mut self.link);
                    }
                    self.link.ack_if_drained();
                    self.link.tick();
                    if !t.read && !socket_event {
                        self.link.receiver.idle();
                    }
                }
                Err(e) => {
                    if !self.read_errors_logged {
                        tracing::warn!(queue = self.queue.index(), error = %e, "poll failed");
                        self.read_errors_logged = true;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        // Stopping: what is still open is not sent (and not counted as a broker failure).
        self.link.close();
    }

    /// Reads and batches up to BURST packets, then ends the burst.
    fn burst(&mut self) {
        self.batcher.begin_burst(now_ns());
        for _ in 0..BURST {
            if self.link.backlogged() {
                break; // the broker is behind: leave the rest in the TUN queue
            }
            let Some(slot) = self.batcher.slot(&mut self.link) else {
                // No buffer: read into scratch to keep the queue moving, and count the drop.
                match self.queue.read(&mut self.scratch) {
                    Ok(Some(_)) => {
                        self.counters.record_drop(DropReason::NoBuffer, 1);
                        continue;
                    }
                    _ => break,
                }
            };
            let n = match self.queue.read(slot) {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(e) => {
                    if !self.read_errors_logged {
                        tracing::warn!(queue = self.queue.index(), error = %e, "tun read failed");
                        self.read_errors_logged = true;
                    }
                    break;
                }
            };
            let classifier = &mut self.classifier;
            self.batcher.commit(n, |entry| classifier.key(entry), &mut self.link);
        }
        self.batcher.end_of_burst(now_ns(), &mut self.link);
    }
}

impl Classifier {
    /// The routing key of `entry` (virtio header and packet), or why it is not sent. A
    /// unicast key carries the flow's shard reduced to the receiver's queue count when
    /// known ([`peers::key_shard`]). Formatting a key costs most of the per-packet routing
    /// time, so the key of the last (destination, key shard) is kept: a run of one flow, or
    /// of flows to one receiving queue, formats it once.
    fn key(&mut self, entry: &[u8]) -> Result<RoutingKey, DropReason> {
        let packet = entry.get(VNET_HDR_LEN..).ok_or(DropReason::NotIp)?;
        if route::is_mld(packet) {
            return Err(DropReason::Mld);
        }
        let c = route::classify(packet).map_err(|_| DropReason::NotIp)?;
        Ok(match c.dst {
            Destination::Flood => self.flood_key,
            Destination::Unicast(IpAddr::V4(v4)) if route::is_directed_broadcast(v4, &self.own_v4) => self.flood_key,
            Destination::Unicast(ip) => {
                let shard = peers::key_shard(c.shard, self.peers.queues(ip));
                match self.last_unicast {
                    Some((cached_ip, cached_shard, key)) if cached_ip == ip && cached_shard == shard => key,
                    _ => {
                        let key = RoutingKey::unicast(ip, shard);
                        self.last_unicast = Some((ip, shard, key));
                        key
                    }
                }
            }
        })
    }
}

/// Link k, owned by queue worker k: its connection (when up) with the receiving half, what
/// the sending half counts, and the ioppytest form when that wire is chosen.
struct Link {
    ctx: LinkContext,
    client: Option<Client>,
    receiver: Receiver,
    /// Queue 0 of a native agent: its presence, and when to say hello next.
    announce: Option<Announcements>,
    next_hello: Instant,
    last_hello: Instant,
    /// First claim: ask everyone for their hellos once connected (to learn their claims).
    probe_due: bool,
    reconnect: Reconnect,
    counters: Arc<Counters>,
    exchange: String,
    seq: u64,
    wait: LocalHistogram,
    packets: LocalHistogram,
    bytes: LocalHistogram,
    /// ioppytest wire: the routing key of our packets, and a reused body buffer.
    json_key: String,
    json_body: Vec<u8>,
}

impl Link {
    fn new(ctx: LinkContext, counters: Arc<Counters>, hist: &Histograms, receiver: Receiver, client: Option<(Client, usize)>) -> Link {
        let seed = (ctx.index as u64) ^ now_ns() ^ u64::from(std::process::id()) << 32;
        let mut link = Link {
            exchange: ctx.config.exchange.clone(),
            json_key: ioppytest::routing_key_from_agent(&ctx.config.name),
            announce: ctx.hello.as_deref().cloned(),
            next_hello: Instant::now(),
            last_hello: Instant::now() - PROBE_ANSWER_GAP,
            probe_due: false,
            ctx,
            client: None,
            receiver,
            reconnect: Reconnect::new(seed),
            counters,
            seq: 0,
            wait: LocalHistogram::new(hist.read_to_publish_us.clone()),
            packets: LocalHistogram::new(hist.batch_packets.clone()),
            bytes: LocalHistogram::new(hist.batch_bytes.clone()),
            json_body: Vec::with_capacity(8 * 1024),
        };
        if let Some((c, node)) = client {
            link.connected(c, node);
        }
        link
    }

    fn connected(&mut self, mut client: Client, node: usize) {
        // The backlog holds at most one message: the largest batch and its frames.
        client.reserve_backlog(self.ctx.config.max_batch_bytes.max(v1::HEADER_LEN + super::batch::MAX_ENTRY) + 16 * 1024);
        if let Some(a) = &mut self.announce {
            a.on_node(Some(client.broker()));
        }
        self.client = Some(client);
        self.receiver.reset();
        self.next_hello = Instant::now(); // say hello on every new connection
        self.probe_due = self.announce.is_some() && self.ctx.config.identity == crate::identity::Mode::FirstClaim;
        self.reconnect.up(&self.ctx, &self.counters, node);
    }

    /// Connects when disconnected and the backoff allows it.
    fn maintain(&mut self) {
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
    fn answer_probe(&mut self) {
        let now = Instant::now();
        self.next_hello = self.next_hello.min(now.max(self.last_hello + PROBE_ANSWER_GAP));
        self.announce_if_due();
    }

    /// Publishes this agent's hello when it is due (every [`HELLO_EVERY`], at once after a
    /// connection or a probe). Pre-serialised bytes: no allocation.
    fn announce_if_due(&mut self) {
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
    fn busy(&self) -> bool {
        self.client.as_ref().is_some_and(|c| c.backlogged() || c.unsent() > HOLD_UNSENT)
    }

    /// A message is half-written: nothing more can be published until it is out.
    fn backlogged(&self) -> bool {
        self.client.as_ref().is_some_and(Client::backlogged)
    }

    fn wants_write(&self) -> bool {
        self.client.as_ref().is_some_and(Client::wants_write)
    }

    fn has_buffered(&self) -> bool {
        self.client.as_ref().is_some_and(Client::has_buffered)
    }

    /// Time until the next connection attempt, while disconnected.
    fn reconnect_in(&self) -> Option<Duration> {
        self.client.is_none().then(|| self.reconnect.until_due(Instant::now()))
    }

    /// When the connection wants attention (a heartbeat, the stall check).
    fn next_deadline(&self) -> Option<Instant> {
        self.client.as_ref().and_then(Client::poll_timeout)
    }

    fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.client.as_ref().map(Client::fd)
    }

    fn flush(&mut self) {
        if let Some(c) = &mut self.client {
            if let Err(e) = c.flush(Instant::now()) {
                self.lose(e);
            }
        }
    }

    fn tick(&mut self) {
        if let Some(c) = &mut self.client {
            if let Err(e) = c.tick(Instant::now()) {
                self.lose(e);
            }
        }
    }

    /// The broker sent something: deliveries (and control, such as a close when it shuts
    /// down) for the receiving half.
    fn on_readable(&mut self) {
        let Some(client) = &mut self.client else { return };
        if let Err(e) = receive(client, &mut self.receiver) {
            self.lose(e);
        }
    }

    /// Acknowledges deliveries once the socket was drained (after the TUN side, see
    /// [`Receiver::take_ack`]).
    fn ack_if_drained(&mut self) {
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
    fn close(&mut self) {
        self.receiver.idle();
        for h in [&mut self.wait, &mut self.packets, &mut self.bytes] {
            h.maybe_fold(Instant::now(), true);
        }
        if let (Some(a), Some(client)) = (&self.announce, &mut self.client) {
            let _ = client.publish(Instant::now(), &self.exchange, &a.bye_key, &JSON_PROPERTIES, &a.bye);
            let _ = client.flush(Instant::now());
        }
        if let Some(client) = self.client.take() {
            client.close(link::CLOSE_WAIT);
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
        self.seq = self.seq.wrapping_add(1);
        writer.finish(self.seq, now_ns());
        let now = Instant::now();
        let result = match self.ctx.config.wire {
            Wire::Native => client.publish(now, &self.exchange, key.as_str(), &Properties::default(), writer.as_bytes()),
            Wire::Ioppytest => publish_json(client, now, &self.exchange, &self.json_key, &self.ctx.config.ifname, writer.as_bytes(), &mut self.json_body),
        };
        match result {
            Ok(Published::Sent) => {
                Counters::add(&self.counters.tx_packets, packets);
                Counters::add(&self.counters.tx_bytes, bytes);
                Counters::add(&self.counters.tx_batches, 1);
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

/// Takes what has arrived on `client` (up to [`super::rx::READS_PER_WAKE`] reads) and
/// hands deliveries to `receiver`; once the socket is drained the acknowledgement is due.
fn receive(client: &mut Client, receiver: &mut Receiver) -> Result<(), client::Error> {
    for _ in 0..super::rx::READS_PER_WAKE {
        take_events(client, receiver)?;
        if client.read_some()? == 0 {
            receiver.drained();
            break;
        }
    }
    take_events(client, receiver)?;
    receiver.fold_now();
    Ok(())
}

/// Handles every whole event already read.
fn take_events(client: &mut Client, receiver: &mut Receiver) -> Result<(), client::Error> {
    let now = Instant::now();
    loop {
        let ack = match client.next_event(now)? {
            None => return Ok(()),
            Some(Event::Delivery(d)) => receiver.on_delivery(d, now_ns()),
            Some(Event::Oversized { tag }) => receiver.on_oversized(tag),
            Some(Event::Cancelled) => return Err(client::Error::Eof { broker: client.broker().to_owned(), hint: " (our consumer was cancelled)" }),
            Some(_) => None, // blocked and unblocked are the client's; no reply is due
        };
        if let Some(tag) = ack {
            client.ack_multiple(tag);
        }
    }
}

/// The ioppytest wire: each packet of our own v1 frame becomes one JSON message on
/// `fromAgent.<name>.ip.tun.packet.raw`, with the Python agent's properties.
fn publish_json(client: &mut Client, now: Instant, exchange: &str, key: &str, ifname: &str, frame: &[u8], body: &mut Vec<u8>) -> Result<Published, client::Error> {
    // Our own frame: it decodes unless the codec is broken.
    let Ok(frame) = v1::decode(frame) else { return Ok(Published::Sent) };
    let seconds = now_ns() / 1_000_000_000;
    let props = ioppytest::PROPERTIES;
    for p in frame.packets() {
        ioppytest::encode_packet(p.data, ifname, seconds, body);
        let mut result = client.publish(now, exchange, key, &props, body)?;
        if result == Published::Busy && client.wait_writable(client::SEND_STALL)? {
            result = client.publish(Instant::now(), exchange, key, &props, body)?;
        }
        if result != Published::Sent {
            return Ok(result);
        }
    }
    Ok(Published::Sent)
}
