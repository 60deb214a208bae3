//! `agent route`: ioppytest's packet router, and the bridge between old and new agents.
//!
//! One thread, one connection (publishing and consuming on its channel), one exclusive
//! queue bound to:
//! - `fromAgent.*.ip.tun.packet.raw`: JSON packets from old-wire agents (Python agents and
//!   tunbus agents with `--wire ioppytest`). Each is forwarded unchanged to the other nodes
//!   of the sender's links and to `agent_TT`, as the old router does; and, when its
//!   destination is not an old agent, re-emitted as a v1 batch on `tunbus.v1.<dst>.<shard>`
//!   (or the flood key) for native agents.
//! - `fromAgent.*.ip.tun.started`: old agents' addressing. The router learns it and binds
//!   `tunbus.v1.<addr>.*` for each of their addresses,
//! - so native batches for old agents arrive here; their packets are re-emitted as JSON on
//!   `toAgent.<owner>.ip.tun.packet.raw`, checksums completed (no offloads over there).
//! - `tunbus.v1.all.*`: native floods, re-emitted as JSON to every old agent; floods the
//!   router itself emitted on an old agent's behalf carry the sender word
//!   [`ROUTER_SENDER`] and are ignored.
//!
//! Unlike the old router it keeps `prefetch` messages in flight, acknowledges in batches,
//! survives a broker restart (reconnect, re-declare, re-bind what it learned), and counts
//! what it forwarded and dropped.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::addressing::OldAddressing;
use super::topology::Topology;
use crate::amqp::client::{self, Client, ConnectOptions, Endpoint, Owned, Published};
use crate::amqp::presence::{Hello, HELLO_EVERY, JSON_PROPERTIES};
use crate::identity::claims::Claims;
use crate::amqp::session::QueueOptions;
use crate::amqp::wire::{Properties, Value};
use crate::codec::ioppytest::{self, TunStarted};
use crate::codec::v1::{self, BatchWriter, Packet};
use crate::codec::vnet;
use crate::route::{self, Destination, Key, RoutingKey};
use crate::util::{now_ns, Stop};

/// Bound of the router's queue in messages (it forwards one packet per message).
pub const QUEUE_MAX_MESSAGES: i32 = 10_000;

/// The sender word of floods the router emits on behalf of old agents (an agent name can
/// never contain '.', but it could be anything else; this one is reserved for the router).
pub const ROUTER_SENDER: &str = "tunbus-router";

/// What the router did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RouterCounters {
    pub json_in: u64,
    pub json_forwarded: u64,
    pub bridged_to_native: u64,
    pub native_in: u64,
    pub bridged_to_old: u64,
    pub malformed_json: u64,
    pub malformed_native: u64,
    pub unknown_sender: u64,
    pub no_old_owner: u64,
    pub agents_learned: u64,
    /// `ip.tun.started` refused: the name is not a topology node, or an address belongs
    /// to a native agent.
    pub refused_claims: u64,
    pub reconnects: u64,
}

impl std::fmt::Display for RouterCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "json in {} (forwarded {} copies, bridged {} to native), native in {} (bridged {} to old), dropped: malformed json {}, malformed native {}, sender not in topology {}, no old owner {}; agents learned {}, claims refused {}, reconnects {}",
            self.json_in,
            self.json_forwarded,
            self.bridged_to_native,
            self.native_in,
            self.bridged_to_old,
            self.malformed_json,
            self.malformed_native,
            self.unknown_sender,
            self.no_old_owner,
            self.agents_learned,
            self.refused_claims,
            self.reconnects
        )
    }
}

pub struct RouterOptions {
    pub endpoints: Vec<Endpoint>,
    pub exchange: String,
    pub topology: Topology,
    pub prefetch: u16,
    pub stats_interval: Duration,
    pub heartbeat: Duration,
}

/// The router's memory: topology, learned old agents, reusable buffers.
struct Router {
    opts: RouterOptions,
    old: BTreeMap<String, OldAddressing>,
    owner: HashMap<IpAddr, String>,
    counters: RouterCounters,
    batch: BatchWriter,
    packet: Vec<u8>,
    json: Vec<u8>,
    seq: u64,
    queue: String,
    /// Addresses native agents claim in their hellos: never learned for an old agent.
    native: Claims,
    next_hello: Instant,
}

/// Runs until `stop`; returns the counters.
pub fn run(opts: RouterOptions, stop: &Stop) -> RouterCounters {
    let mut r = Router {
        opts,
        old: BTreeMap::new(),
        owner: HashMap::new(),
        counters: RouterCounters::default(),
        batch: BatchWriter::with_capacity(v1::HEADER_LEN + 4 + v1::MAX_PACKET_LEN),
        packet: Vec::new(),
        json: Vec::new(),
        seq: 0,
        queue: format!("tunbus.router.{}", std::process::id()),
        native: Claims::new(),
        next_hello: Instant::now(),
    };
    let mut backoff = crate::amqp::Backoff::new(now_ns());
    let mut lost = false;
    while !stop.is_raised() {
        match r.serve(&mut lost, &mut backoff, stop) {
            Ok(()) | Err(client::Error::Stopped) => break,
            Err(error) => {
                if !lost {
                    tracing::warn!(%error, "router lost the broker; reconnecting");
                    lost = true;
                }
            }
        }
        let until = Instant::now() + backoff.failed(Instant::now());
        while Instant::now() < until && !stop.is_raised() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    r.counters
}

impl Router {
    fn connect(&self, stop: &Stop) -> Result<Client, client::Error> {
        let mut opts = ConnectOptions::new("tunbus router");
        opts.heartbeat = self.opts.heartbeat;
        let mut last = None;
        for e in &self.opts.endpoints {
            match Client::open(e, &opts, stop.flag()) {
                Ok(c) => return Ok(c),
                Err(client::Error::Stopped) => return Err(client::Error::Stopped),
                Err(err) => last = Some(err),
            }
        }
        Err(last.unwrap_or(client::Error::Stopped))
    }

    fn serve(&mut self, lost: &mut bool, backoff: &mut crate::amqp::Backoff, stop: &Stop) -> Result<(), client::Error> {
        let s = stop.flag();
        let exchange = self.opts.exchange.clone();
        let mut c = client::with_exchange(&exchange, s, || self.connect(stop))?;
        c.queue_declare(&self.queue, QueueOptions { exclusive: true, auto_delete: true, ..QueueOptions::default() }, &[("x-max-length", Value::I32(QUEUE_MAX_MESSAGES))], s)?;
        let mut keys = vec![
            "fromAgent.*.ip.tun.packet.raw".to_owned(),
            "fromAgent.*.ip.tun.started".to_owned(),
            route::ALL_PATTERN.to_owned(),
            route::HELLO_PATTERN.to_owned(),
            route::BYE_PATTERN.to_owned(),
            route::CTL_PROBE.to_owned(),
        ];
        keys.extend(self.owner.keys().map(|a| route::unicast_pattern(*a)));
        for key in &keys {
            c.queue_bind(&self.queue, &self.opts.exchange, key, s)?;
        }
        c.basic_qos(self.opts.prefetch, s)?;
        c.basic_consume(&self.queue, "tunbus-router", false, true, s)?;
        // Hear every native agent's claims now, not at its next hello.
        c.publish_copy(&exchange, route::CTL_PROBE, &JSON_PROPERTIES, br#"{"from":"agent route"}"#)?;
        if *lost {
            tracing::info!("router reconnected to the broker");
            self.counters.reconnects += 1;
            *lost = false;
        }
        backoff.reset();
        tracing::info!(exchange = %self.opts.exchange, nodes = self.opts.topology.nodes().count(), "router serving");
        let mut acks = crate::amqp::AckBatcher::for_prefetch(self.opts.prefetch);
        let mut next_report = Instant::now() + self.opts.stats_interval;
        self.next_hello = Instant::now();
        while !stop.is_raised() {
            if Instant::now() >= self.next_hello {
                self.announce(&mut c, false)?;
            }
            let event = c.wait_event(Duration::from_millis(100), s)?;
            let Some(event) = event else {
                if let Some(tag) = acks.take() {
                    c.ack_multiple(tag);
                    c.flush(Instant::now())?;
                }
                if !self.opts.stats_interval.is_zero() && Instant::now() >= next_report {
                    tracing::info!(counters = %self.counters, "router");
                    next_report = Instant::now() + self.opts.stats_interval;
                }
                continue;
            };
            match event {
                Owned::Delivery { tag, routing_key, body, user_id, .. } => {
                    self.dispatch(&mut c, &routing_key, user_id.as_deref(), &body, stop)?;
                    if let Some(tag) = acks.delivered(tag) {
                        c.ack_multiple(tag);
                    }
                }
                Owned::Cancelled => return Err(client::Error::Eof { broker: c.broker().to_owned(), hint: " (the router's consumer was cancelled)" }),
                Owned::Blocked | Owned::Unblocked => {}
            }
        }
        self.announce(&mut c, true)?;
        c.close(Duration::from_millis(300));
        Ok(())
    }

    /// Publishes the router's hello (or bye): it claims the old agents' addresses, for which
    /// it publishes bridged batches, so native receivers accept them from its broker user.
    fn announce(&mut self, c: &mut Client, leaving: bool) -> Result<(), client::Error> {
        self.next_hello = Instant::now() + HELLO_EVERY;
        let addresses = self.owner.keys().map(|a| format!("{a}/{}", if a.is_ipv4() { 32 } else { 128 })).collect();
        let hello = Hello {
            name: ROUTER_SENDER.to_owned(),
            session: None,
            addresses,
            queues: 1,
            wire: "router".to_owned(),
            started_unix_ms: 0,
            interface: String::new(),
            netns: None,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            node: Some(c.broker().to_owned()),
            leaving,
        };
        let (key, body) = match (RoutingKey::hello(ROUTER_SENDER), RoutingKey::bye(ROUTER_SENDER)) {
            (Some(h), Some(b)) => (if leaving { b } else { h }, serde_json::to_vec(&hello).unwrap_or_default()),
            _ => return Ok(()), // invariant: the router's name is a topic word
        };
        c.publish_copy(&self.opts.exchange, key.as_str(), &JSON_PROPERTIES, &body).map(drop)
    }

    fn dispatch(&mut self, c: &mut Client, key: &str, user: Option<&str>, body: &[u8], stop: &Stop) -> Result<(), client::Error> {
        if let Some(old) = ioppytest::parse_from_agent(key) {
            return match old {
                ioppytest::FromAgent::Packet { name } => self.on_old_packet(c, name, body),
                ioppytest::FromAgent::Started { name } => self.learn(c, name, body, stop),
            };
        }
        match Key::parse(key) {
            Some(Key::Probe) => {
                self.next_hello = Instant::now();
                Ok(())
            }
            Some(Key::Hello { name } | Key::Bye { name }) if name == ROUTER_SENDER => Ok(()),
            Some(Key::Hello { .. }) => {
                self.note_native(user, false, body);
                Ok(())
            }
            Some(Key::Bye { .. }) => {
                self.note_native(user, true, body);
                Ok(())
            }
            Some(Key::All { sender }) if sender == ROUTER_SENDER => Ok(()), // a flood we emitted for an old agent
            Some(Key::All { .. }) => self.on_native_batch(c, body, None),
            Some(Key::Unicast { dst, .. }) => {
                let owner = self.owner.get(&dst).cloned();
                self.on_native_batch(c, body, owner)
            }
            None => Ok(()),
        }
    }

    /// A native agent's hello or bye (published by broker user `user`): what it claims.
    fn note_native(&mut self, user: Option<&str>, leaving: bool, body: &[u8]) {
        let (Some(user), Ok(hello)) = (user, serde_json::from_slice::<Hello>(body)) else { return };
        let addrs: Vec<IpAddr> = hello.addresses.iter().filter_map(|a| a.parse::<crate::route::Prefix>().ok()).map(|p| p.addr).collect();
        if leaving || hello.leaving {
            self.native.on_bye(user, &addrs);
        } else {
            self.native.on_hello(user, &addrs, Instant::now());
        }
    }

    /// `ip.tun.started` from an old agent: remember its addresses and bind them, if it is a
    /// node of the topology and no native agent holds them.
    fn learn(&mut self, c: &mut Client, name: &str, body: &[u8], stop: &Stop) -> Result<(), client::Error> {
        let Ok(started) = serde_json::from_slice::<TunStarted>(body) else {
            self.counters.malformed_json += 1;
            return Ok(());
        };
        if !self.opts.topology.nodes().any(|n| n == name) && name != super::topology::TESTING_TOOL {
            self.counters.refused_claims += 1;
            tracing::warn!(agent = name, "ignoring ip.tun.started from a name that is not a node of the topology");
            return Ok(());
        }
        self.native.expire(Instant::now());
        let addressing = OldAddressing::from_started(&started);
        let mut added = false;
        let mut kept = 0;
        for addr in addressing.addresses() {
            if let Some(holder) = self.native.holder(addr) {
                self.counters.refused_claims += 1;
                tracing::warn!(agent = name, address = %addr, holder, "REFUSED: an old-wire agent announced an address a native agent holds");
                continue;
            }
            kept += 1;
            if self.owner.insert(addr, name.to_owned()).is_none() {
                c.queue_bind(&self.queue, &self.opts.exchange, &route::unicast_pattern(addr), stop.flag())?;
                added = true;
            }
        }
        if added {
            self.announce(c, false)?;
        }
        if kept > 0 && self.old.insert(name.to_owned(), addressing).is_none() {
            self.counters.agents_learned += 1;
            tracing::info!(agent = name, addresses = ?self.old[name].addresses(), "learned an old-wire agent");
        }
        Ok(())
    }

    /// A JSON packet from old agent `name`.
    fn on_old_packet(&mut self, c: &mut Client, name: &str, body: &[u8]) -> Result<(), client::Error> {
        self.counters.json_in += 1;
        if ioppytest::decode_packet(body, &mut self.packet).is_err() {
            self.counters.malformed_json += 1;
            return Ok(());
        }
        let targets = self.opts.topology.flood_targets(name);
        if targets.is_empty() && !self.old.contains_key(name) {
            self.counters.unknown_sender += 1;
        }
        for peer in &targets {
            let key = ioppytest::routing_key_to_agent(peer);
            send(c, &self.opts.exchange, &key, &ioppytest::PROPERTIES, body)?;
            self.counters.json_forwarded += 1;
        }
        let Ok(class) = route::classify(&self.packet) else { return Ok(()) };
        let key = match class.dst {
            Destination::Flood => RoutingKey::all(ROUTER_SENDER),
            Destination::Unicast(dst) if self.owner.contains_key(&dst) => None, // old agents got it above
            Destination::Unicast(dst) => Some(RoutingKey::unicast(dst, class.shard)),
        };
        let Some(key) = key else { return Ok(()) };
        self.batch.reset(0);
        if self.batch.push(None, &self.packet).is_err() {
            return Ok(());
        }
        self.seq += 1;
        let frame = self.batch.finish(self.seq, now_ns());
        send(c, &self.opts.exchange, key.as_str(), &Properties::default(), frame)?;
        self.counters.bridged_to_native += 1;
        Ok(())
    }

    /// A native batch for an old agent (`owner`), or a native flood (`None`: to every old agent).
    fn on_native_batch(&mut self, c: &mut Client, body: &[u8], owner: Option<String>) -> Result<(), client::Error> {
        let Ok(frame) = v1::decode(body) else {
            self.counters.malformed_native += 1;
            return Ok(());
        };
        let targets: Vec<String> = match owner {
            Some(o) => vec![o],
            None => self.old.keys().cloned().collect(),
        };
        for p in frame.packets() {
            self.counters.native_in += 1;
            if !self.plain_packet(p) {
                self.counters.malformed_native += 1;
                continue;
            }
            // A unicast batch key names one address, but check each packet's own destination.
            let per_packet_owner = match route::classify(&self.packet).map(|c| c.dst) {
                Ok(Destination::Unicast(dst)) => self.owner.get(&dst).cloned(),
                _ => None,
            };
            let to = match per_packet_owner {
                Some(o) => vec![o],
                None => targets.clone(),
            };
            if to.is_empty() {
                self.counters.no_old_owner += 1;
                continue;
            }
            ioppytest::encode_packet(&self.packet, "tun0", now_ns() / 1_000_000_000, &mut self.json);
            for name in &to {
                let key = ioppytest::routing_key_to_agent(name);
                send(c, &self.opts.exchange, &key, &ioppytest::PROPERTIES, &self.json)?;
                self.counters.bridged_to_old += 1;
            }
        }
        Ok(())
    }

    /// Copies a native packet into `self.packet`, completing an offloaded checksum.
    fn plain_packet(&mut self, p: Packet<'_>) -> bool {
        self.packet.clear();
        self.packet.extend_from_slice(p.data);
        match p.vnet {
            // The header the allow-list builds from the packet, never the sender's offsets.
            Some(h) => vnet::build(h, p.data).and_then(|h| vnet::complete_checksum(&h, &mut self.packet)).is_ok(),
            None => true,
        }
    }
}

/// Publishes one message, waiting (bounded) while the previous one is still being written.
fn send(c: &mut Client, exchange: &str, key: &str, props: &Properties<'_>, body: &[u8]) -> Result<(), client::Error> {
    if c.publish(Instant::now(), exchange, key, props, body)? == Published::Busy && c.wait_writable(client::SEND_STALL)? {
        c.publish(Instant::now(), exchange, key, props, body)?;
    }
    Ok(())
}
