//! One link per TUN queue k: an AMQP connection that publishes the batches of TX worker k
//! and consumes queue `…<name>.k`, writing what arrives into TUN queue k.
//!
//! A tokio task per link. While connected, a publisher loop drains the ring (one
//! `basic_publish` per batch: transient, no confirms, no `mandatory`) and a consumer loop
//! decodes deliveries and acknowledges them in batches (`multiple`, when the consumer has
//! nothing more ready or every `prefetch / 2` messages). When the connection fails, the link
//! drops and counts the batches it cannot send, waits a jittered backoff, reconnects,
//! re-declares its queue and bindings, and carries on. Queue k is bound to shard `s` of
//! each owned address when `s mod K == k`; queue 0 also takes the flood pattern.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::anyhow;
use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, Consumer};
use tokio::sync::watch;

use super::{AckBatcher, BrokerState};
use crate::codec::{ioppytest, v1};
use crate::config::{AgentConfig, Wire};
use crate::metrics::{Counters, DropReason, Histograms, LocalHistogram};
use crate::ring::Ring;
use crate::route::{self, RoutingKey};
use crate::tun::TunQueue;
use crate::worker::{now_ns, rx};

/// Bound of each consumer queue in messages (the byte bound is `--queue-max-bytes`):
/// beyond them the broker drops the oldest messages rather than let a slow receiver build
/// seconds of delay (bufferbloat). See docs/decisions/0005-queue-bounds.md.
pub const QUEUE_MAX_MESSAGES: i32 = 4096;

/// What link k needs; shared with worker k through `Arc`s.
pub struct Link {
    pub config: Arc<AgentConfig>,
    pub index: usize,
    pub ring: Arc<Ring>,
    pub tun: Arc<TunQueue>,
    pub counters: Arc<Counters>,
    pub hist: Arc<Histograms>,
    pub broker: Arc<BrokerState>,
    /// Links of this agent currently connected.
    pub connected: Arc<AtomicUsize>,
    /// Our own flood key: flood messages carrying it are ours, echoed back by the broker.
    pub own_flood_key: RoutingKey,
    /// Addresses whose unicast keys this agent binds.
    pub addrs: Vec<IpAddr>,
}

struct Session {
    conn: Connection,
    publish: Channel,
    consume: Channel,
    consumer: Consumer,
}

/// Runs link `link` until `stop` turns true; then deletes its queue and closes.
pub async fn run(link: Link, mut stop: watch::Receiver<bool>) {
    let name = link.config.name.clone();
    let mut attempt = 0u32;
    let mut down = false;
    let mut ever_up = false;
    let seed = (link.index as u64) ^ now_ns();
    loop {
        let opened = tokio::select! {
            r = open(&link) => r,
            _ = drain_forever(&link) => unreachable!("drain_forever never returns"),
            _ = stopped(&mut stop) => return,
        };
        match opened {
            Ok(session) => {
                if down {
                    link.broker.link_up(&name);
                    if ever_up {
                        Counters::add(&link.counters.reconnects, 1);
                    }
                }
                ever_up = true;
                attempt = 0;
                link.connected.fetch_add(1, Ordering::AcqRel);
                tracing::debug!(agent = %name, queue = link.index, "link connected");
                let result = tokio::select! {
                    r = publish_loop(&link, &session.publish) => r,
                    r = consume_loop(&link, &session.consume, session.consumer.clone()) => r,
                    _ = stopped(&mut stop) => {
                        close(&link, &session).await;
                        return;
                    }
                };
                link.connected.fetch_sub(1, Ordering::AcqRel);
                let error = result.err().unwrap_or_else(|| anyhow!("link ended"));
                link.broker.link_down(&name, &error);
                down = true;
            }
            Err(error) => {
                if !down {
                    link.broker.link_down(&name, &error);
                    down = true;
                }
                tracing::debug!(agent = %name, queue = link.index, %error, "connect failed");
            }
        }
        let delay = super::backoff(attempt, seed);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = drain_forever(&link) => unreachable!("drain_forever never returns"),
            _ = stopped(&mut stop) => return,
        }
    }
}

/// Resolves when the stop flag is (or becomes) true, or its sender is gone.
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn open(link: &Link) -> anyhow::Result<Session> {
    let c = &link.config;
    let conn = super::connect(&c.url, &format!("tunbus {} q{}", c.name, link.index), c.frame_max).await?;
    let publish = conn.create_channel().await?;
    let consume = conn.create_channel().await?;
    super::declare_exchange(&publish, &c.exchange).await?;
    let queue = c.queue_name(link.index);
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(QUEUE_MAX_MESSAGES));
    args.insert("x-max-length-bytes".into(), AMQPValue::LongLongInt(c.queue_max_bytes.min(i64::MAX as u64) as i64));
    consume
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
            args,
        )
        .await?;
    let bind = |key: String| {
        let consume = consume.clone();
        let queue = queue.clone();
        let exchange = c.exchange.clone();
        async move {
            consume
                .queue_bind(queue.as_str().into(), exchange.as_str().into(), key.as_str().into(), QueueBindOptions::default(), FieldTable::default())
                .await
        }
    };
    match c.wire {
        // One queue takes every shard: one wildcard binding per address says so, and keeps
        // the exchange small (300 agents: ~900 bindings instead of ~10 000).
        Wire::Native if c.queues == 1 => {
            for addr in &link.addrs {
                bind(format!("{}{}.*", route::KEY_PREFIX, route::address_word(*addr).as_str())).await?;
            }
            bind(route::ALL_PATTERN.to_owned()).await?;
        }
        Wire::Native => {
            for addr in &link.addrs {
                for shard in 0..route::SHARDS {
                    if route::queue_for_shard(shard, c.queues) == link.index {
                        bind(RoutingKey::unicast(*addr, shard).as_str().to_owned()).await?;
                    }
                }
            }
            if link.index == 0 {
                bind(route::ALL_PATTERN.to_owned()).await?;
            }
        }
        // The router addresses old-wire agents by name, one packet per message.
        Wire::Ioppytest => bind(ioppytest::routing_key_to_agent(&c.name)).await?,
    }
    consume.basic_qos(c.prefetch, BasicQosOptions::default()).await?;
    let consumer = consume
        .basic_consume(
            queue.as_str().into(),
            format!("tunbus-{}-{}", c.name, link.index).as_str().into(),
            BasicConsumeOptions { exclusive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    Ok(Session { conn, publish, consume, consumer })
}

/// Publishes every batch the worker hands over, until the channel fails.
async fn publish_loop(link: &Link, channel: &Channel) -> anyhow::Result<()> {
    if link.config.wire == Wire::Ioppytest {
        return publish_json_loop(link, channel).await;
    }
    let exchange = ShortString::from(link.config.exchange.as_str());
    let mut wait = LocalHistogram::new(link.hist.read_to_publish_us.clone());
    let mut packets = LocalHistogram::new(link.hist.batch_packets.clone());
    let mut bytes = LocalHistogram::new(link.hist.batch_bytes.clone());
    loop {
        while let Some(batch) = link.ring.pop() {
            let result = channel
                .basic_publish(
                    exchange.clone(),
                    batch.key.as_str().into(),
                    BasicPublishOptions::default(),
                    batch.writer.as_bytes(),
                    BasicProperties::default(),
                )
                .await;
            if let Err(e) = result {
                link.counters.record_drop(DropReason::BrokerDown, u64::from(batch.packets));
                return Err(e.into());
            }
            Counters::add(&link.counters.tx_packets, u64::from(batch.packets));
            Counters::add(&link.counters.tx_bytes, batch.bytes);
            Counters::add(&link.counters.tx_batches, 1);
            wait.record_n(now_ns().saturating_sub(batch.read_ns) / 1000, 1);
            packets.record_n(u64::from(batch.packets), 1);
            bytes.record_n(batch.writer.len() as u64, 1);
            let now = Instant::now();
            for h in [&mut wait, &mut packets, &mut bytes] {
                h.maybe_fold(now, false);
            }
        }
        link.ring.ready().await;
    }
}

/// The ioppytest wire: each packet of a batch becomes one JSON message on
/// `fromAgent.<name>.ip.tun.packet.raw`, with the Python agent's properties.
async fn publish_json_loop(link: &Link, channel: &Channel) -> anyhow::Result<()> {
    let exchange = ShortString::from(link.config.exchange.as_str());
    let key = ShortString::from(ioppytest::routing_key_from_agent(&link.config.name));
    let properties = crate::interop::json_properties();
    let mut body = Vec::with_capacity(8 * 1024);
    loop {
        while let Some(batch) = link.ring.pop() {
            // Our own frame: it decodes unless the codec is broken.
            let Ok(frame) = v1::decode(batch.writer.as_bytes()) else {
                link.counters.record_drop(DropReason::Malformed, u64::from(batch.packets));
                continue;
            };
            let seconds = now_ns() / 1_000_000_000;
            for (sent, p) in frame.packets().enumerate() {
                ioppytest::encode_packet(p.data, &link.config.ifname, seconds, &mut body);
                if let Err(e) = channel.basic_publish(exchange.clone(), key.clone(), BasicPublishOptions::default(), &body, properties.clone()).await {
                    link.counters.record_drop(DropReason::BrokerDown, u64::from(batch.packets).saturating_sub(sent as u64));
                    return Err(e.into());
                }
                Counters::add(&link.counters.tx_packets, 1);
                Counters::add(&link.counters.tx_bytes, p.data.len() as u64);
            }
            Counters::add(&link.counters.tx_batches, 1);
        }
        link.ring.ready().await;
    }
}

/// Writes deliveries into the TUN, acknowledging in batches, until the consumer fails.
async fn consume_loop(link: &Link, channel: &Channel, mut consumer: Consumer) -> anyhow::Result<()> {
    let mut latency = LocalHistogram::new(link.hist.one_way_us.clone());
    let mut acks = AckBatcher::for_prefetch(link.config.prefetch);
    let mut json_scratch = Vec::new();
    loop {
        let next = match consumer.next().now_or_never() {
            Some(item) => item,
            None => {
                if let Some(tag) = acks.take() {
                    channel.basic_ack(tag, BasicAckOptions { multiple: true }).await?;
                }
                latency.maybe_fold(Instant::now(), false);
                consumer.next().await
            }
        };
        let delivery = match next {
            Some(d) => d?,
            None => return Err(anyhow!("the broker cancelled our consumer")),
        };
        match link.config.wire {
            Wire::Ioppytest => {
                rx::deliver_json(&delivery.data, &link.tun, &link.counters, &mut json_scratch);
            }
            Wire::Native if delivery.routing_key.as_str() != link.own_flood_key.as_str() => {
                rx::deliver(&delivery.data, &link.tun, &link.counters, &mut latency, now_ns());
            }
            Wire::Native => {} // our own flood, echoed by the broker
        }
        latency.maybe_fold(Instant::now(), false);
        if let Some(tag) = acks.delivered(delivery.delivery_tag) {
            channel.basic_ack(tag, BasicAckOptions { multiple: true }).await?;
        }
    }
}

/// While disconnected: take batches off the ring so the worker keeps a fresh pipeline, and
/// count them as dropped because the broker is down.
async fn drain_forever(link: &Link) {
    loop {
        while let Some(batch) = link.ring.pop() {
            link.counters.record_drop(DropReason::BrokerDown, u64::from(batch.packets));
        }
        link.ring.ready().await;
    }
}

/// Graceful end: delete our queue, close the connection (bounded in time by the caller).
async fn close(link: &Link, s: &Session) {
    let queue = link.config.queue_name(link.index);
    let _ = s.consume.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
    let _ = s.conn.close(200, "agent stopping".into()).await;
}
