//! The wire a queue worker speaks, as types: how a finished batch goes onto the bus
//! ([`Outbound`]) and what a delivery coming off it means ([`Inbound`]). Hot path.
//!
//! Each wire has one implementation of each half: the native v1 wire ([`NativeOut`],
//! [`NativeIn`]) and the Python agent's JSON wire ([`IoppytestOut`], [`IoppytestIn`]). The
//! worker is given one pair when it is built ([`for_agent`]); its loops call the trait and
//! never ask which wire they speak. One virtual call per batch and per delivery, none per
//! packet.
//!
//! The ioppytest wire encodes each packet once: the batcher's buffer is only where the
//! TUN read landed, and [`IoppytestOut`] reads its entries back (`BatchWriter::entries`)
//! into one JSON message each, without building or decoding a v1 frame.

use std::sync::Arc;
use std::time::Instant;

use crate::amqp::client::{self, Client, Published};
use crate::amqp::session::Delivery;
use crate::amqp::wire::Properties;
use crate::codec::ioppytest;
use crate::codec::v1::{BatchWriter, FLAG_VNET, VNET_HDR_LEN};
use crate::config::{AgentConfig, Wire};
use crate::e2e::{E2e, OpenRefusal, SealRefusal};
use crate::identity;
use crate::metrics::{DropReason, LocalHistogram, RxCounters};
use crate::port::{Layer, Port};
use crate::route::peers::PeerQueues;
use crate::route::{self, RoutingKey};
use crate::util::now_ns;

use super::presence::Listeners;
use super::rx::{self, Sink, SuspectLog};

/// What became of a batch handed to an [`Outbound`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Handed to the connection, with its answer.
    Broker(Published),
    /// Refused by the wire itself (`--e2e`: no key, no session yet): counted as this drop.
    Refused(DropReason),
}

/// How a finished batch is published.
pub trait Outbound: Send {
    /// Publishes `batch` (finished: its header is written) for routing key `key`.
    fn publish(&mut self, client: &mut Client, now: Instant, exchange: &str, key: RoutingKey, batch: &BatchWriter) -> Result<Outcome, client::Error>;
}

/// What the receiving half owns and an [`Inbound`] writes into: the worker's port, its
/// counters and latency histogram, a reused buffer.
pub struct PortSide<'a> {
    pub port: &'a mut dyn Port,
    pub counters: &'a RxCounters,
    pub latency: &'a mut LocalHistogram,
    pub scratch: &'a mut Vec<u8>,
}

/// What a delivery means and where its packets go. Acknowledging it is the receiver's.
pub trait Inbound: Send {
    /// One whole message, received at `now_ns`.
    fn on_delivery(&mut self, d: &Delivery<'_>, now_ns: u64, out: PortSide<'_>);

    /// Whether a presence probe arrived since the last call.
    fn take_probe(&mut self) -> bool {
        false
    }

    /// Housekeeping when due (claims lapse, the claims table is published).
    fn tick(&mut self, _now: Instant) {}

    /// The bodies of the pings (`agent ping`) that arrived since the last call, oldest
    /// first; empty (no allocation) when none did.
    fn take_pings(&mut self) -> Vec<Vec<u8>> {
        Vec::new()
    }
}

/// Pings kept between two turns of the worker at most: a flood of them costs a few answers.
const MAX_PENDING_PINGS: usize = 8;

/// The halves of the wire that agent `config` speaks, for a worker whose flood key is
/// `flood_key`; `listeners`: queue 0's keepers of what hellos say (claims in first-claim
/// mode, advertised prefixes: `worker::presence`); `l2`: an L2 agent's flood bound
/// and (queue 0) learner. With `e2e` (`--e2e`), batches are sealed after batching and
/// opened before they are delivered ([`SealedOut`], and [`NativeIn`] with its keys).
#[allow(clippy::too_many_arguments)]
pub fn for_agent(
    config: &AgentConfig,
    layer: Layer,
    flood_key: RoutingKey,
    peers: Arc<PeerQueues>,
    trust: identity::View,
    listeners: Listeners,
    l2: Option<rx::L2Rx>,
    e2e: Option<Arc<E2e>>,
) -> (Box<dyn Outbound>, Box<dyn Inbound>) {
    match config.data_path().wire {
        Wire::Native => (
            match &e2e {
                Some(e) => Box::new(SealedOut { e2e: e.clone(), sealed: Vec::new() }),
                None => Box::new(NativeOut),
            },
            Box::new(NativeIn {
                own_flood_key: flood_key,
                layer,
                peers,
                trust,
                suspects: SuspectLog::default(),
                listeners,
                probed: false,
                pings: Vec::new(),
                offload_from_bus: config.data_path().offload_from_bus,
                aqm: config.data_path().aqm.map(|a| super::aqm::Aqm::new(a.target, a.interval, a.drop)),
                l2,
                e2e,
                opened: Vec::new(),
            }),
        ),
        Wire::Ioppytest => match config.interface().serial() {
            Some(serial) => (Box::new(IoppytestOut::serial(config.name())), Box::new(IoppytestIn::serial(serial.max_frame))),
            None => (Box::new(IoppytestOut::new(config.name(), &config.interface().ifname)), Box::new(IoppytestIn::ip())),
        },
    }
}

/// The native wire: the batch is the message.
pub struct NativeOut;

impl Outbound for NativeOut {
    fn publish(&mut self, client: &mut Client, now: Instant, exchange: &str, key: RoutingKey, batch: &BatchWriter) -> Result<Outcome, client::Error> {
        client.publish(now, exchange, key.as_str(), &Properties::default(), batch.as_bytes()).map(Outcome::Broker)
    }
}

/// The native wire with end-to-end encryption: the batch, sealed for its receiver (the
/// peer owning the key's destination) or, on the flood key, with this agent's group key
/// (`crate::e2e`). The sealed copy lives in a buffer of its own, reused.
pub struct SealedOut {
    e2e: Arc<E2e>,
    sealed: Vec<u8>,
}

impl Outbound for SealedOut {
    fn publish(&mut self, client: &mut Client, now: Instant, exchange: &str, key: RoutingKey, batch: &BatchWriter) -> Result<Outcome, client::Error> {
        let dst = RoutingKey::parse_unicast(key.as_str()).map(|(dst, _)| dst);
        match self.e2e.seal(dst, key.as_str(), batch.as_bytes(), &mut self.sealed, now, now_ns()) {
            Ok(()) => client.publish(now, exchange, key.as_str(), &Properties::default(), &self.sealed).map(Outcome::Broker),
            Err(SealRefusal::NoKey) => Ok(Outcome::Refused(DropReason::NoKey)),
            Err(SealRefusal::NoSession) => Ok(Outcome::Refused(DropReason::NoSession)),
        }
    }
}

/// What a native delivery carries, told by its routing key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Carries {
    Packets,
    /// Our own flood, echoed back by the broker: acknowledged, not written.
    OwnFlood,
    /// A presence probe (queue 0 of a native agent binds it): answered with a hello.
    Probe,
    /// A ping for this agent (`agent ping`; queue 0 binds it): answered on its reply key.
    Ping,
    /// A hello or bye (queue 0 in first-claim mode): claims of addresses; a gateway's
    /// route announcement (queue 0): advertised prefixes.
    Presence,
    /// An end-to-end handshake message for this agent (queue 0 of an `--e2e` agent).
    Handshake,
}

impl Carries {
    fn of(routing_key: &[u8], own_flood_key: &RoutingKey) -> Carries {
        if routing_key == own_flood_key.as_str().as_bytes() {
            Carries::OwnFlood
        } else if !routing_key.starts_with(route::CTL_PREFIX.as_bytes()) {
            Carries::Packets // one prefix test per packet batch, whatever control keys exist
        } else if routing_key == route::CTL_PROBE.as_bytes() {
            Carries::Probe
        } else if routing_key.starts_with(route::CTL_PING_PREFIX.as_bytes()) {
            Carries::Ping
        } else if routing_key.starts_with(crate::e2e::CTL_E2E_PREFIX.as_bytes()) {
            Carries::Handshake
        } else {
            Carries::Presence
        }
    }
}

/// The native wire's receiving half: v1 batches checked against who sent them
/// ([`rx::deliver`]), presence probes and claims.
pub struct NativeIn {
    own_flood_key: RoutingKey,
    /// What the port's units are: batches of another layer are refused.
    layer: Layer,
    /// Where the queue counts stated by senders are noted for the sending half.
    peers: Arc<PeerQueues>,
    /// Who may use which source addresses (refreshed once per delivery).
    trust: identity::View,
    suspects: SuspectLog,
    /// Queue 0 of a native agent: what hellos say (claims, advertised prefixes).
    listeners: Listeners,
    /// A probe arrived since [`Inbound::take_probe`] was last asked.
    probed: bool,
    /// Pings that arrived since [`Inbound::take_pings`] was last asked (bodies, bounded).
    pings: Vec<Vec<u8>>,
    /// Offload from the bus goes to the kernel (after the allow-list).
    offload_from_bus: bool,
    /// The queue management of what this receiver writes (`None`: off).
    aqm: Option<super::aqm::Aqm>,
    /// An L2 agent's flood bound and learner (`None`: IP).
    l2: Option<rx::L2Rx>,
    /// End-to-end encryption: every batch is opened (into `opened`) before it is delivered,
    /// and nothing in clear is taken.
    e2e: Option<Arc<E2e>>,
    opened: Vec<u8>,
}

/// The flow shard named by a unicast routing key's last word (`tunbus.v1.<dst>.<shard>`);
/// 0 for anything else (floods).
fn key_shard(routing_key: &[u8]) -> u8 {
    let last = routing_key.rsplit(|&b| b == b'.').next().unwrap_or_default();
    if last.is_empty() || last.len() > 2 || !last.iter().all(u8::is_ascii_digit) {
        return 0;
    }
    last.iter().fold(0u8, |n, d| n.wrapping_mul(10).wrapping_add(d - b'0'))
}

impl Inbound for NativeIn {
    fn on_delivery(&mut self, d: &Delivery<'_>, now_ns: u64, out: PortSide<'_>) {
        match Carries::of(d.routing_key, &self.own_flood_key) {
            Carries::Packets => {
                self.trust.refresh();
                // Floods come under `tunbus.v1.all.<sender>`: a radio's medium hears by it.
                let flooded_by = d.routing_key.strip_prefix(route::ALL_PREFIX.as_bytes()).and_then(|n| std::str::from_utf8(n).ok());
                out.port.hearing_from(flooded_by);
                let mut sink = Sink {
                    port: out.port,
                    layer: self.layer,
                    counters: out.counters,
                    latency: out.latency,
                    peers: &self.peers,
                    trust: &self.trust,
                    suspects: &mut self.suspects,
                    offload_from_bus: self.offload_from_bus,
                    scratch: out.scratch,
                    congestion: None,
                };
                // End to end: opened first; the sources are then checked against the peer
                // whose key opened it (the same user as the broker's user_id, or it would not
                // open).
                let (body, user): (&[u8], Option<&[u8]>) = match &self.e2e {
                    None => (d.body, d.user_id),
                    Some(e2e) => match e2e.open(d.user_id, d.routing_key, d.body, &mut self.opened, Instant::now(), now_ns) {
                        Ok(()) => (&self.opened, d.user_id),
                        Err(refusal) => {
                            out.counters.record_drop(refusal_reason(refusal), 1);
                            return;
                        }
                    },
                };
                if let Some(l2) = &mut self.l2 {
                    rx::deliver_frames(body, user, flooded_by, now_ns, &mut sink, l2);
                } else {
                    sink.congestion = self.aqm.as_mut().map(|aqm| rx::Congestion {
                        aqm,
                        sender: crate::util::fnv1a64(&[user.unwrap_or_default()]),
                        shard: key_shard(d.routing_key),
                    });
                    rx::deliver(body, user, now_ns, &mut sink);
                }
            }
            Carries::Handshake => {
                if let Some(e2e) = &self.e2e {
                    if let Err(refusal) = e2e.on_handshake(d.user_id, d.routing_key, d.body, Instant::now(), now_ns) {
                        out.counters.record_drop(refusal_reason(refusal), 1);
                    }
                }
            }
            Carries::Probe => self.probed = true,
            Carries::Ping => {
                if self.pings.len() < MAX_PENDING_PINGS && d.body.len() <= crate::amqp::ping::MAX_PING_BODY {
                    self.pings.push(d.body.to_vec());
                }
            }
            Carries::Presence => {
                let learner = self.l2.as_mut().and_then(|l2| l2.learner.as_mut());
                if self.listeners.on_message(d.user_id, d.body, learner, Instant::now()).key_conflict {
                    out.counters.record_drop(DropReason::KeyConflict, 1);
                }
            }
            Carries::OwnFlood => {} // echoed by the broker
        }
    }

    fn take_probe(&mut self) -> bool {
        std::mem::take(&mut self.probed)
    }

    fn take_pings(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.pings)
    }

    fn tick(&mut self, now: Instant) {
        self.listeners.tick(now);
        if let Some(learner) = self.l2.as_mut().and_then(|l2| l2.learner.as_mut()) {
            learner.tick(now);
        }
    }
}

/// The drop a refused sealed message counts as.
fn refusal_reason(r: OpenRefusal) -> DropReason {
    match r {
        OpenRefusal::Plaintext => DropReason::Plaintext,
        OpenRefusal::Malformed => DropReason::Malformed,
        OpenRefusal::NoKey => DropReason::NoKey,
        OpenRefusal::DecryptFailed => DropReason::DecryptFailed,
        OpenRefusal::Replayed => DropReason::Replayed,
    }
}

/// How one unit becomes a JSON body: (unit, interface name, UNIX seconds, body).
type EncodeJson = fn(&[u8], &str, u64, &mut Vec<u8>);

/// The ioppytest wire's sending half: each packet one JSON message on
/// `fromAgent.<name>.ip.tun.packet.raw` (a serial probe's frames: on
/// `fromAgent.<name>.802154.serial.packet.raw`, with `data_slip`), with the Python agent's
/// properties.
pub struct IoppytestOut {
    key: String,
    ifname: String,
    /// The body of one unit, chosen once: an IP packet's or a serial frame's.
    encode: EncodeJson,
    /// The JSON body, reused.
    body: Vec<u8>,
    /// A batch the connection took part of: its buffer's address and the entries sent.
    /// The batcher offers it again when the socket drains, and the rest goes then.
    partial: Option<(usize, usize)>,
}

impl IoppytestOut {
    pub fn new(name: &str, ifname: &str) -> IoppytestOut {
        IoppytestOut {
            key: ioppytest::routing_key_from_agent(name),
            ifname: ifname.to_owned(),
            encode: ioppytest::encode_packet,
            body: Vec::with_capacity(8 * 1024),
            partial: None,
        }
    }

    /// A serial probe's frames, as ioppytest-agent 0.2.20's serial listener publishes them.
    pub fn serial(name: &str) -> IoppytestOut {
        IoppytestOut {
            key: ioppytest::serial::routing_key_from_agent(name),
            ifname: ioppytest::serial::INTERFACE_NAME.to_owned(),
            encode: |frame, _, seconds, out| ioppytest::serial::encode_frame(frame, seconds, out),
            body: Vec::with_capacity(4 * 1024),
            partial: None,
        }
    }
}

impl Outbound for IoppytestOut {
    fn publish(&mut self, client: &mut Client, now: Instant, exchange: &str, _key: RoutingKey, batch: &BatchWriter) -> Result<Outcome, client::Error> {
        let vnet_len = if batch.flags() & FLAG_VNET != 0 { VNET_HDR_LEN } else { 0 };
        let seconds = now_ns() / 1_000_000_000;
        let props = crate::amqp::IOPPYTEST_PROPERTIES;
        let id = batch.as_bytes().as_ptr() as usize;
        let skip = match self.partial {
            Some((p, sent)) if p == id => sent,
            _ => 0,
        };
        for (i, entry) in batch.entries().enumerate().skip(skip) {
            let Some(packet) = entry.get(vnet_len..) else { continue };
            (self.encode)(packet, &self.ifname, seconds, &mut self.body);
            match client.publish(now, exchange, &self.key, &props, &self.body)? {
                Published::Sent => {}
                // The socket is full: the rest of this batch goes when it drains (the worker
                // never waits for it).
                Published::Busy => {
                    self.partial = Some((id, i));
                    return Ok(Outcome::Broker(Published::Busy));
                }
                other => {
                    self.partial = None;
                    return Ok(Outcome::Broker(other));
                }
            }
        }
        self.partial = None;
        Ok(Outcome::Broker(Published::Sent))
    }
}

/// The ioppytest wire's receiving half: every delivery is one JSON packet (or one serial
/// frame), its `data` read into the scratch buffer and written to the port.
pub struct IoppytestIn {
    /// The longest unit accepted.
    max_len: usize,
}

impl IoppytestIn {
    /// IP packets, up to v1's largest.
    pub fn ip() -> IoppytestIn {
        IoppytestIn { max_len: crate::codec::v1::MAX_PACKET_LEN }
    }

    /// Frames for a serial probe, up to its maximum frame.
    pub fn serial(max_frame: usize) -> IoppytestIn {
        IoppytestIn { max_len: max_frame }
    }
}

impl Inbound for IoppytestIn {
    fn on_delivery(&mut self, d: &Delivery<'_>, _now_ns: u64, out: PortSide<'_>) {
        rx::deliver_json(d.body, self.max_len, out.port, out.counters, out.scratch);
    }
}
