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

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::amqp::client::{Client, Retry};
use crate::emulate::Shaper;
use crate::identity::claims::Claims;
use crate::identity::Trust;
use crate::metrics::{DropReason, Histograms, LocalHistogram, RxCounters, TxCounters};
use crate::port::Port;
use crate::route::peers::PeerQueues;
use crate::route::table::RouteShare;
use crate::sys::{self, Interest};
use crate::util::{now_ns, Stop};

use super::batch::{Batcher, Outlet, MAX_READ};
use super::classify::{self, Classify};
use super::routes::{Judge, RouteKeeper};
use super::rx::Receiver;
use super::uplink::{Uplink, UplinkContext};
use super::wire;

/// Most packets read per wake-up before the open batches are flushed.
pub const BURST: usize = 256;
/// How often a worker holding a lingering batch re-checks it.
pub const HOLD_POLL: Duration = Duration::from_micros(50);
/// How often an idle worker wakes to notice shutdown (hundreds of agents share a lab).
pub const IDLE_POLL: Duration = Duration::from_millis(250);

/// The state of one queue worker; owned by its thread.
pub struct QueueWorker {
    /// The host end: a TUN queue, or another kind of port (`crate::port`).
    port: Box<dyn Port>,
    /// The AMQP connection of this queue, with the wire and the receiving half.
    link: Uplink,
    /// How long each turn of the loop took, waking to waiting again.
    turn: LocalHistogram,
    counters: Arc<TxCounters>,
    stop: Stop,
    batcher: Batcher,
    /// Units → routing keys, for this port's layer.
    classifier: Box<dyn Classify>,
    scratch: Vec<u8>,
    read_errors_logged: bool,
    /// Link emulation (`--emulate`): packets wait in its delay line before their batch.
    shaper: Option<Shaper>,
}

/// Everything queue worker k is built from.
pub struct WorkerSetup {
    /// The host end this worker reads and writes (owned: it closes when the worker ends).
    pub port: Box<dyn Port>,
    pub link: UplinkContext,
    /// What the sending half counts.
    pub tx_counters: Arc<TxCounters>,
    /// What the receiving half counts.
    pub rx_counters: Arc<RxCounters>,
    pub hist: Arc<Histograms>,
    /// Receivers' queue counts, shared by the agent's workers.
    pub peers: Arc<PeerQueues>,
    /// Who may use which source addresses, shared by the agent's workers.
    pub trust: Arc<Trust>,
    /// First-claim mode, queue 0: the claims its hellos keep.
    pub claims: Option<Arc<Mutex<Claims>>>,
    /// The prefixes gateways advertise, compiled (queue 0 of a native agent keeps them).
    pub routes: Arc<RouteShare>,
    /// The connection when it was opened before the worker (link 0 at start).
    pub connected: Option<Client>,
    /// This worker's link emulation, when there is one.
    pub shaper: Option<Shaper>,
    /// An L2 agent's switch state, shared by its workers (`None`: not a TAP).
    pub l2: Option<super::switch::L2Shared>,
}

impl QueueWorker {
    /// A worker for TUN queue `setup.queue` and its link, with batches of up to
    /// `max_batch_bytes` (from the link's configuration).
    pub fn new(setup: WorkerSetup) -> QueueWorker {
        let WorkerSetup { port, link, tx_counters: counters, rx_counters, hist, peers, trust, claims, routes, connected, shaper, l2 } = setup;
        let config = link.config.clone();
        let own_queues = u8::try_from(config.interface().queues).unwrap_or(0);
        let flood_key = config.name().flood_key();
        let own_v4 = config
            .interface()
            .addrs
            .iter()
            .filter_map(|p| match p.addr {
                IpAddr::V4(a) => Some((a, p.len)),
                IpAddr::V6(_) => None,
            })
            .collect();
        // The link that announces this agent (queue 0 of a native agent) also hears gateways.
        let route_keeper = link.hello.is_some().then(|| {
            RouteKeeper::new(config.name(), &config.routing().routes, routes.clone(), Judge::of(&config.identity().mode, claims.clone(), trust.clone()))
        });
        let listeners = super::presence::Listeners {
            claims: claims.map(|claims| super::presence::ClaimKeeper::new(claims, trust.clone()).with_layer(port.layer()).with_e2e(link.e2e.clone())),
            routes: route_keeper,
        };
        // Queue 0 receives the floods and the hellos: it learns where MACs are.
        let l2_rx = l2.as_ref().map(|l2| super::rx::L2Rx {
            flood: crate::route::mac::FloodBucket::new(crate::route::mac::FloodLimit::default()),
            learner: (link.index == 0).then(|| super::switch::Learner::new(l2.own, l2.directory.clone())),
        });
        let bridged = matches!(config.interface().kind, crate::config::PortKind::Tap { bridge: Some(_) });
        let (outbound, inbound) = wire::for_agent(&config, port.layer(), flood_key, peers.clone(), trust.view(), listeners, l2_rx, link.e2e.clone());
        let receiver = Receiver::new(&config, rx_counters, &hist, inbound);
        let stop = link.stop.clone();
        let layer = port.layer();
        let client = connected.unwrap_or_else(|| link.client(Retry::Forever));
        let turn = LocalHistogram::new(hist.loop_turn_us.clone());
        QueueWorker {
            port,
            turn,
            link: Uplink::new(link, counters.clone(), &hist, outbound, receiver, client),
            counters,
            stop,
            batcher: Batcher::new(config.data_path().max_batch_bytes, own_queues, flood_key).with_layer_flag(layer.frame_flag()),
            classifier: classify::for_layer(layer, flood_key, own_v4, peers, routes.view(), l2.as_ref().map(|l2| (l2, bridged))),
            scratch: vec![0; MAX_READ],
            read_errors_logged: false,
            shaper,
        }
    }

    /// Runs until the stop flag is set; then closes the connection and hands the port back
    /// (the agent closes it after its final report).
    pub fn run(mut self) -> Box<dyn Port> {
        let mut woke = Instant::now();
        while !self.stop.is_raised() {
            self.link.poll(Instant::now());
            self.link.announce_if_due();
            let now = Instant::now();
            let holding = self.batcher.holding();
            let mut timeout = if holding { HOLD_POLL } else { IDLE_POLL };
            if let Some(at) = self.link.next_deadline() {
                timeout = timeout.min(at.saturating_duration_since(now));
            }
            if let Some(due) = self.shaper.as_mut().and_then(Shaper::wake_at) {
                timeout = timeout.min(Duration::from_nanos(due.saturating_sub(now_ns())));
            }
            if let Some(at) = self.port.poll_at() {
                timeout = timeout.min(at.saturating_duration_since(now));
            }
            if self.link.has_buffered() {
                timeout = Duration::ZERO;
            }
            // While a message is half-written, units wait in the port: backpressure instead
            // of an unbounded queue of our own.
            let port_interest = if self.port.wants_write() { Interest::ReadWrite } else { Interest::Read };
            let port_fd = if self.link.backlogged() { None } else { self.port.fd().map(|fd| (fd, port_interest)) };
            let socket = self.link.fd();
            self.turn.record_n(woke.elapsed().as_micros() as u64, 1);
            self.turn.maybe_fold(now, false);
            let waited = sys::wait([port_fd, socket], timeout);
            woke = Instant::now();
            match waited {
                Ok([mut t, s]) => {
                    // A port with timers or sockets of its own (a userspace stack) runs when
                    // they are due or its descriptor woke us; a TUN has nothing to run.
                    if t.read || t.write || t.error || self.port.poll_at().is_some_and(|at| at <= woke) {
                        t.read |= self.port.poll(woke);
                    }
                    if s.write || ((s.read || s.error) && !self.link.is_up()) {
                        // A connect that finished, a handshake or set-up that moved, bytes to send.
                        self.link.poll(woke);
                    }
                    let socket_event = s.read || s.error || self.link.has_buffered();
                    if socket_event {
                        self.link.on_readable(&mut *self.port);
                        if self.link.receiver.take_probe() {
                            self.link.answer_probe();
                        }
                    }
                    if t.error && !self.read_errors_logged {
                        tracing::warn!(queue = self.port.index(), "the port reported an error or hang-up");
                        self.read_errors_logged = true;
                    }
                    if t.read {
                        self.burst();
                    } else if self.shaper.is_some() {
                        self.batcher.begin_burst(now_ns());
                        self.release_due();
                        self.batcher.end_of_burst(now_ns(), &mut self.link);
                    } else {
                        self.batcher.end_of_burst(now_ns(), &mut self.link);
                    }
                    self.link.ack_if_drained();
                    if !t.read && !socket_event {
                        self.link.receiver.idle();
                    }
                }
                Err(e) => {
                    if !self.read_errors_logged {
                        tracing::warn!(queue = self.port.index(), error = %e, "poll failed");
                        self.read_errors_logged = true;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        self.turn.maybe_fold(Instant::now(), true);
        // Stopping: what is still open is not sent (and not counted as a broker failure).
        self.link.close();
        self.port
    }

    /// Reads and batches up to BURST packets, then ends the burst.
    fn burst(&mut self) {
        if self.shaper.is_some() {
            return self.burst_shaped();
        }
        self.batcher.begin_burst(now_ns());
        for _ in 0..BURST {
            if self.link.backlogged() {
                break; // the broker is behind: leave the rest in the TUN queue
            }
            let Some(slot) = self.batcher.slot(&mut self.link) else {
                // No buffer: read into scratch to keep the queue moving, and count the drop.
                match self.port.read(&mut self.scratch) {
                    Ok(Some(_)) => {
                        self.counters.record_drop(DropReason::NoBuffer, 1);
                        continue;
                    }
                    _ => break,
                }
            };
            let n = match self.port.read(slot) {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(e) => {
                    if !self.read_errors_logged {
                        tracing::warn!(queue = self.port.index(), error = %e, "port read failed");
                        self.read_errors_logged = true;
                    }
                    break;
                }
            };
            let (classifier, sender) = (&mut self.classifier, self.port.unit_sender());
            self.batcher.commit(n, |entry| classifier.key(entry, sender), &mut self.link);
        }
        self.batcher.end_of_burst(now_ns(), &mut self.link);
    }
}

impl QueueWorker {
    /// With link emulation: reads up to BURST packets into the delay line, then batches
    /// those that are due and ends the burst.
    fn burst_shaped(&mut self) {
        let now = now_ns();
        self.batcher.begin_burst(now);
        for _ in 0..BURST {
            if self.link.backlogged() {
                break;
            }
            let n = match self.port.read(&mut self.scratch) {
                Ok(Some(n)) => n,
                _ => break,
            };
            let Some(entry) = self.scratch.get(..n) else { break };
            let key = match self.classifier.key(entry, self.port.unit_sender()) {
                Ok(key) => key,
                Err(reason) => {
                    self.counters.record_drop(reason, 1);
                    continue;
                }
            };
            let Some(shaper) = &mut self.shaper else { return };
            let dropped = shaper.admit(entry, key, self.classifier.last_flow(), now_ns());
            if dropped > 0 {
                self.counters.record_drop(DropReason::Emulated, dropped);
            }
        }
        self.release_due();
        self.batcher.end_of_burst(now_ns(), &mut self.link);
    }

    /// Moves the held packets that are due into their batches.
    fn release_due(&mut self) {
        let Some(shaper) = &mut self.shaper else { return };
        let (batcher, link) = (&mut self.batcher, &mut self.link);
        shaper.release(now_ns(), |key, entry| {
            if link.backlogged() {
                return false; // the broker is behind: the packet waits in the line
            }
            let Some(slot) = batcher.slot(link) else {
                link.dropped(DropReason::NoBuffer, 1);
                return true;
            };
            if let Some(place) = slot.get_mut(..entry.len()) {
                place.copy_from_slice(entry);
                batcher.commit(entry.len(), |_| Ok(key), link);
            }
            true
        });
    }
}
