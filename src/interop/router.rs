//! `agent route`: ioppytest's packet router, and the bridge between old and new agents.
//!
//! One tokio task, one connection (a publishing and a consuming channel), one exclusive
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
use std::time::Duration;

use anyhow::anyhow;
use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel};
use serde::Serialize;
use tokio::sync::watch;

use super::addressing::OldAddressing;
use super::json_properties;
use super::topology::Topology;
use crate::amqp::stopped;
use crate::codec::ioppytest::{self, TunStarted};
use crate::codec::v1::{self, BatchWriter, Packet};
use crate::route::{self, Destination, RoutingKey};
use crate::tun::vnet;
use crate::worker::now_ns;

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
    pub reconnects: u64,
}

impl std::fmt::Display for RouterCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "json in {} (forwarded {} copies, bridged {} to native), native in {} (bridged {} to old), dropped: malformed json {}, malformed native {}, sender not in topology {}, no old owner {}; agents learned {}, reconnects {}",
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
            self.reconnects
        )
    }
}

pub struct RouterOptions {
    pub url: String,
    pub exchange: String,
    pub topology: Topology,
    pub prefetch: u16,
    pub stats_interval: Duration,
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
}

/// Runs until `stop`; returns the counters.
pub async fn run(opts: RouterOptions, mut stop: watch::Receiver<bool>) -> RouterCounters {
    let mut r = Router {
        opts,
        old: BTreeMap::new(),
        owner: HashMap::new(),
        counters: RouterCounters::default(),
        batch: BatchWriter::with_capacity(v1::HEADER_LEN + 4 + v1::MAX_PACKET_LEN),
        packet: Vec::new(),
        json: Vec::new(),
        seq: 0,
    };
    let mut attempt = 0u32;
    let mut lost = false;
    loop {
        let result = tokio::select! {
            res = r.serve(&mut lost, &mut attempt) => res,
            _ = stopped(&mut stop) => return r.counters,
        };
        if let Err(error) = result {
            if !lost {
                tracing::warn!(%error, "router lost the broker; reconnecting");
                lost = true;
            }
        }
        let delay = crate::amqp::backoff(attempt, now_ns());
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stopped(&mut stop) => return r.counters,
        }
    }
}

impl Router {
    async fn serve(&mut self, lost: &mut bool, attempt: &mut u32) -> anyhow::Result<()> {
        let conn = crate::amqp::connect(&self.opts.url, "tunbus router", None).await?;
        let publish = conn.create_channel().await?;
        let consume = conn.create_channel().await?;
        crate::amqp::declare_exchange(&publish, &self.opts.exchange).await?;
        let queue = format!("tunbus.router.{}", std::process::id());
        consume
            .queue_declare(queue.as_str().into(), QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() }, FieldTable::default())
            .await?;
        let mut keys = vec!["fromAgent.*.ip.tun.packet.raw".to_owned(), "fromAgent.*.ip.tun.started".to_owned(), route::ALL_PATTERN.to_owned()];
        keys.extend(self.owner.keys().map(|a| unicast_pattern(*a)));
        for key in &keys {
            bind(&consume, &queue, &self.opts.exchange, key).await?;
        }
        consume.basic_qos(self.opts.prefetch, BasicQosOptions::default()).await?;
        let mut consumer = consume
            .basic_consume(queue.as_str().into(), "tunbus-router".into(), BasicConsumeOptions { exclusive: true, ..Default::default() }, FieldTable::default())
            .await?;
        if *lost {
            tracing::info!("router reconnected to the broker");
            self.counters.reconnects += 1;
            *lost = false;
        }
        *attempt = 0;
        tracing::info!(exchange = %self.opts.exchange, nodes = self.opts.topology.nodes().count(), "router serving");
        let mut acks = crate::amqp::AckBatcher::for_prefetch(self.opts.prefetch);
        let mut report = tokio::time::interval(if self.opts.stats_interval.is_zero() { Duration::from_secs(3600) } else { self.opts.stats_interval });
        report.tick().await;
        loop {
            let next = match consumer.next().now_or_never() {
                Some(item) => item,
                None => {
                    if let Some(tag) = acks.take() {
                        consume.basic_ack(tag, BasicAckOptions { multiple: true }).await?;
                    }
                    tokio::select! {
                        item = consumer.next() => item,
                        _ = report.tick() => {
                            if !self.opts.stats_interval.is_zero() {
                                tracing::info!(counters = %self.counters, "router");
                            }
                            continue;
                        }
                    }
                }
            };
            let delivery = match next {
                Some(d) => d?,
                None => return Err(anyhow!("the broker cancelled the router's consumer")),
            };
            self.dispatch(&publish, &consume, &queue, delivery.routing_key.as_str(), &delivery.data).await?;
            if let Some(tag) = acks.delivered(delivery.delivery_tag) {
                consume.basic_ack(tag, BasicAckOptions { multiple: true }).await?;
            }
        }
    }

    async fn dispatch(&mut self, publish: &Channel, consume: &Channel, queue: &str, key: &str, body: &[u8]) -> anyhow::Result<()> {
        let words: Vec<&str> = key.split('.').collect();
        match words.as_slice() {
            ["fromAgent", name, "ip", "tun", "packet", "raw"] => self.on_old_packet(publish, name, body).await,
            ["fromAgent", name, "ip", "tun", "started"] => self.learn(consume, queue, name, body).await,
            ["tunbus", "v1", "all", sender] => {
                if *sender == ROUTER_SENDER {
                    return Ok(()); // a flood we emitted for an old agent
                }
                self.on_native_batch(publish, body, None).await
            }
            ["tunbus", "v1", word, _shard] => {
                let owner = route::word_to_address(word).and_then(|a| self.owner.get(&a).cloned());
                self.on_native_batch(publish, body, owner).await
            }
            _ => Ok(()),
        }
    }

    /// `ip.tun.started` from an old agent: remember its addresses and bind them.
    async fn learn(&mut self, consume: &Channel, queue: &str, name: &str, body: &[u8]) -> anyhow::Result<()> {
        let Ok(started) = serde_json::from_slice::<TunStarted>(body) else {
            self.counters.malformed_json += 1;
            return Ok(());
        };
        let addressing = OldAddressing::from_started(&started);
        for addr in addressing.addresses() {
            if self.owner.insert(addr, name.to_owned()).is_none() {
                bind(consume, queue, &self.opts.exchange, &unicast_pattern(addr)).await?;
            }
        }
        if self.old.insert(name.to_owned(), addressing).is_none() {
            self.counters.agents_learned += 1;
            tracing::info!(agent = name, addresses = ?self.old[name].addresses(), "learned an old-wire agent");
        }
        Ok(())
    }

    /// A JSON packet from old agent `name`.
    async fn on_old_packet(&mut self, publish: &Channel, name: &str, body: &[u8]) -> anyhow::Result<()> {
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
            publish.basic_publish(self.opts.exchange.as_str().into(), key.as_str().into(), BasicPublishOptions::default(), body, json_properties()).await?;
            self.counters.json_forwarded += 1;
        }
        let Ok(c) = route::classify(&self.packet) else { return Ok(()) };
        let key = match c.dst {
            Destination::Flood => RoutingKey::all(ROUTER_SENDER),
            Destination::Unicast(dst) if self.owner.contains_key(&dst) => None, // old agents got it above
            Destination::Unicast(dst) => Some(RoutingKey::unicast(dst, c.shard)),
        };
        let Some(key) = key else { return Ok(()) };
        self.batch.reset(0);
        if self.batch.push(None, &self.packet).is_err() {
            return Ok(());
        }
        self.seq += 1;
        let frame = self.batch.finish(self.seq, now_ns());
        publish
            .basic_publish(self.opts.exchange.as_str().into(), ShortString::from(key.as_str()), BasicPublishOptions::default(), frame, BasicProperties::default())
            .await?;
        self.counters.bridged_to_native += 1;
        Ok(())
    }

    /// A native batch for an old agent (`owner`), or a native flood (`None`: to every old agent).
    async fn on_native_batch(&mut self, publish: &Channel, body: &[u8], owner: Option<String>) -> anyhow::Result<()> {
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
                publish.basic_publish(self.opts.exchange.as_str().into(), key.as_str().into(), BasicPublishOptions::default(), &self.json, json_properties()).await?;
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
            Some(h) => vnet::complete_checksum(h, &mut self.packet).is_ok(),
            None => true,
        }
    }
}

fn unicast_pattern(addr: IpAddr) -> String {
    format!("tunbus.v1.{}.*", route::address_word(addr).as_str())
}

async fn bind(ch: &Channel, queue: &str, exchange: &str, key: &str) -> anyhow::Result<()> {
    ch.queue_bind(queue.into(), exchange.into(), key.into(), QueueBindOptions::default(), FieldTable::default()).await?;
    Ok(())
}
