//! One link per TUN queue k: one AMQP connection of our own ([`super::conn`]), owned by
//! queue worker k, which publishes its batches on it and consumes queue `…<name>.k` from
//! it.
//!
//! This module holds how to open it (the exchange, the exclusive queue and its bindings; queue k is bound to shard `s` of each owned
//! address when `s mod K == k`, queue 0 also takes the flood pattern) and [`Reconnect`], the
//! state of a connection that may be lost: jittered backoff, one log line per outage for
//! the whole agent ([`BrokerState`]) and the reconnect counter.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::conn::{self, Conn};
use super::presence::Announcements;
use super::wire::Properties;
use super::BrokerState;
use crate::codec::ioppytest;
use crate::config::{AgentConfig, Wire};
use crate::metrics::Counters;
use crate::route::{self, RoutingKey};

/// Bound of each consumer queue in messages (the byte bound is `--queue-max-bytes`):
/// beyond them the broker drops the oldest messages rather than let a slow receiver build
/// seconds of delay (bufferbloat). See docs/decisions/0005-queue-bounds.md.
pub const QUEUE_MAX_MESSAGES: i32 = 4096;

/// Longest wait for the TCP connection and each set-up answer of a data connection (a
/// broker that is accepting hundreds of connections at once, as when a 300-host lab starts,
/// can take seconds to answer).
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a stopping link waits for the broker to confirm its close.
pub const CLOSE_WAIT: Duration = Duration::from_millis(300);

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
}

impl LinkContext {
    /// Opens the connection of queue k, which carries both directions: the exchange, the
    /// queue, its bindings and the consumer; publishing needs nothing more.
    pub fn open(&self) -> Result<Conn, conn::Error> {
        let c = &self.config;
        let k = self.index;
        let addrs = c.owned_addresses();
        let mut conn = Conn::open(&c.url, &format!("tunbus {} q{k}", c.name), c.frame_max, SETUP_TIMEOUT)?;
        if !c.exchange.starts_with("amq.") {
            conn.exchange_declare(&c.exchange)?;
        }
        let queue = c.queue_name(k);
        let max_bytes = c.queue_max_bytes.min(i64::MAX as u64) as i64;
        conn.queue_declare(&queue, QUEUE_MAX_MESSAGES, max_bytes)?;
        match c.wire {
            // One queue takes every shard: one wildcard binding per address says so, and
            // keeps the exchange small (300 agents: ~900 bindings instead of ~10 000).
            Wire::Native if c.queues == 1 => {
                for addr in &addrs {
                    let key = format!("{}{}.*", route::KEY_PREFIX, route::address_word(*addr).as_str());
                    conn.queue_bind(&queue, &c.exchange, &key)?;
                }
                conn.queue_bind(&queue, &c.exchange, route::ALL_PATTERN)?;
            }
            Wire::Native => {
                for addr in &addrs {
                    for shard in 0..route::SHARDS {
                        if route::queue_for_shard(shard, c.queues) == k {
                            conn.queue_bind(&queue, &c.exchange, RoutingKey::unicast(*addr, shard).as_str())?;
                        }
                    }
                }
                if k == 0 {
                    conn.queue_bind(&queue, &c.exchange, route::ALL_PATTERN)?;
                }
            }
            // The router addresses old-wire agents by name, one packet per message.
            Wire::Ioppytest => conn.queue_bind(&queue, &c.exchange, &ioppytest::routing_key_to_agent(&c.name))?,
        }
        if self.hello.is_some() {
            conn.queue_bind(&queue, &c.exchange, route::CTL_PROBE)?;
        }
        conn.consume(&queue, &format!("tunbus-{}-{k}", c.name), c.prefetch)?;
        Ok(conn)
    }
}

/// The properties of an ioppytest packet message (the Python receivers want JSON's).
pub fn json_properties() -> Properties<'static> {
    Properties {
        content_type: Some(ioppytest::CONTENT_TYPE),
        content_encoding: Some(ioppytest::CONTENT_ENCODING),
        empty_headers: true,
        delivery_mode: Some(ioppytest::DELIVERY_MODE),
    }
}

/// The life of one connection that may be lost: when to try again, and what to tell.
#[derive(Debug)]
pub struct Reconnect {
    attempt: u32,
    seed: u64,
    next_try: Instant,
    /// Down as far as [`BrokerState`] knows (so up and down are reported once each).
    down: bool,
    ever_up: bool,
}

impl Reconnect {
    pub fn new(seed: u64) -> Reconnect {
        Reconnect { attempt: 0, seed, next_try: Instant::now(), down: false, ever_up: false }
    }

    /// Whether it is time for the next connection attempt.
    pub fn due(&self, now: Instant) -> bool {
        now >= self.next_try
    }

    /// Time left before the next attempt.
    pub fn until_due(&self, now: Instant) -> Duration {
        self.next_try.saturating_duration_since(now)
    }

    /// The connection is up (first time, or again).
    pub fn up(&mut self, ctx: &LinkContext, counters: &Counters) {
        if self.down {
            ctx.broker.link_up(&ctx.config.name);
            if self.ever_up {
                Counters::add(&counters.reconnects, 1);
            }
            self.down = false;
        }
        self.ever_up = true;
        self.attempt = 0;
        ctx.connected.fetch_add(1, Ordering::AcqRel);
        tracing::debug!(agent = %ctx.config.name, queue = ctx.index, "link connected");
    }

    /// A connection that was up is gone.
    pub fn lost(&mut self, ctx: &LinkContext, error: &conn::Error) {
        ctx.connected.fetch_sub(1, Ordering::AcqRel);
        self.failed(ctx, error);
    }

    /// A connection attempt failed, or a connection was lost: report once, back off.
    pub fn failed(&mut self, ctx: &LinkContext, error: &conn::Error) {
        if !self.down {
            ctx.broker.link_down(&ctx.config.name, error);
            self.down = true;
        }
        tracing::debug!(agent = %ctx.config.name, queue = ctx.index, %error, "data connection failed");
        self.next_try = Instant::now() + super::backoff(self.attempt, self.seed);
        self.attempt = self.attempt.saturating_add(1);
    }
}
