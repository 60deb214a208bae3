//! One link per TUN queue k: one AMQP connection ([`Client`]), owned by queue worker k,
//! which publishes its batches on it and consumes queue `…<name>.k` from it.
//!
//! This module holds how to open it (the exchange, the exclusive queue and its bindings:
//! queue k is bound to shard `s` of each owned address when `s mod K == k`, queue 0 also
//! takes the flood pattern) on the first broker node that answers, and [`Reconnect`], the
//! state of a connection that may be lost: which node to try next, backoff, one log line
//! per outage for the whole agent ([`BrokerState`]) and the reconnect counter.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::client::{Client, ConnectOptions, Endpoint, Error};
use super::presence::Announcements;
use super::session::QueueOptions;
use super::wire::Value;
use super::BrokerState;
use crate::codec::ioppytest;
use crate::config::{AgentConfig, Wire};
use crate::metrics::Counters;
use crate::route::{self, RoutingKey};
use crate::util::Stop;

/// Bound of each consumer queue in messages (the byte bound is `--queue-max-bytes`):
/// beyond them the broker drops the oldest messages rather than let a slow receiver build
/// seconds of delay (bufferbloat). See docs/decisions/0005-queue-bounds.md.
pub const QUEUE_MAX_MESSAGES: i32 = 4096;

/// How long a stopping link waits for the broker to confirm its close.
pub const CLOSE_WAIT: Duration = Duration::from_millis(300);

/// Deadline of a reconnection attempt (the first attempt of a link gets
/// [`super::client::CONNECT_TIMEOUT`]; a URL's `connection_timeout` overrides both): a path
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
}

impl LinkContext {
    /// Connection options of this link (`timeout`: the attempt's deadline).
    pub fn connect_options(&self, timeout: Duration) -> ConnectOptions {
        let c = &self.config;
        let mut o = ConnectOptions::new(format!("tunbus {} q{}", c.name, self.index));
        o.frame_max = c.frame_max;
        o.heartbeat = c.heartbeat;
        o.timeout = timeout;
        o
    }

    /// Opens the connection of queue k on the first node that answers, trying them in
    /// order from `start_at` with `timeout` each: the exchange, the queue, its bindings and
    /// the consumer; publishing needs nothing more. Returns the client and the node's index.
    pub fn open(&self, start_at: usize, timeout: Duration) -> Result<(Client, usize), Error> {
        let endpoints = &self.config.endpoints;
        let mut last = None;
        for i in 0..endpoints.len() {
            let at = (start_at + i) % endpoints.len();
            match self.open_on(&endpoints[at], timeout) {
                Ok(c) => return Ok((c, at)),
                Err(Error::Stopped) => return Err(Error::Stopped),
                Err(e) => {
                    tracing::debug!(agent = %self.config.name, queue = self.index, node = %endpoints[at].url, error = %e, "node did not take the link");
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
        let mut client = super::client::with_exchange(&c.exchange, stop, || Client::open(endpoint, &opts, stop))?;
        let queue = c.queue_name(k);
        let max_bytes = c.queue_max_bytes.min(i64::MAX as u64) as i64;
        let args = [("x-max-length", Value::I32(QUEUE_MAX_MESSAGES)), ("x-max-length-bytes", Value::I64(max_bytes))];
        client.queue_declare(&queue, QueueOptions { exclusive: true, ..QueueOptions::default() }, &args, stop)?;
        for key in self.binding_keys() {
            client.queue_bind(&queue, &c.exchange, &key, stop)?;
        }
        client.basic_qos(c.prefetch, stop)?;
        client.basic_consume(&queue, &format!("tunbus-{}-{k}", c.name), false, false, stop)?;
        Ok(client)
    }

    /// The keys queue k binds.
    pub fn binding_keys(&self) -> Vec<String> {
        let c = &self.config;
        let k = self.index;
        let mut keys = Vec::new();
        match c.wire {
            // One queue takes every shard: one wildcard binding per address says so, and
            // keeps the exchange small (300 agents: ~900 bindings instead of ~10 000).
            Wire::Native if c.queues == 1 => {
                keys.extend(c.owned_addresses().into_iter().map(route::unicast_pattern));
                keys.push(route::ALL_PATTERN.to_owned());
            }
            Wire::Native => {
                for addr in c.owned_addresses() {
                    for shard in 0..route::SHARDS {
                        if route::queue_for_shard(shard, c.queues) == k {
                            keys.push(RoutingKey::unicast(addr, shard).as_str().to_owned());
                        }
                    }
                }
                if k == 0 {
                    keys.push(route::ALL_PATTERN.to_owned());
                }
            }
            // The router addresses old-wire agents by name, one packet per message.
            Wire::Ioppytest => keys.push(ioppytest::routing_key_to_agent(&c.name)),
        }
        if self.hello.is_some() {
            keys.push(route::CTL_PROBE.to_owned());
            if c.identity == crate::identity::Mode::FirstClaim {
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
    backoff: super::Backoff,
    next_try: Instant,
    /// Down as far as [`BrokerState`] knows (so up and down are reported once each).
    down: bool,
    ever_up: bool,
    /// The node of the last connection (or the one to try first).
    node: usize,
}

impl Reconnect {
    pub fn new(seed: u64) -> Reconnect {
        Reconnect { backoff: super::Backoff::new(seed), next_try: Instant::now(), down: false, ever_up: false, node: 0 }
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
            super::client::CONNECT_TIMEOUT
        }
    }

    /// The connection is up (first time, or again) on node `node`.
    pub fn up(&mut self, ctx: &LinkContext, counters: &Counters, node: usize) {
        if self.down {
            ctx.broker.link_up(&ctx.config.name);
            if self.ever_up {
                Counters::add(&counters.reconnects, 1);
            }
            self.down = false;
        }
        self.ever_up = true;
        self.backoff.reset();
        self.node = node;
        ctx.connected.fetch_add(1, Ordering::AcqRel);
        tracing::debug!(agent = %ctx.config.name, queue = ctx.index, node, "link connected");
    }

    /// A connection that was up is gone: the next attempt starts with the next node, so a
    /// dead node costs one failed attempt, not one per retry.
    pub fn lost(&mut self, ctx: &LinkContext, error: &Error) {
        ctx.connected.fetch_sub(1, Ordering::AcqRel);
        let nodes = ctx.config.endpoints.len().max(1);
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
            ctx.broker.link_down(&ctx.config.name, error);
            self.down = true;
        }
        tracing::debug!(agent = %ctx.config.name, queue = ctx.index, %error, "data connection failed");
        let now = Instant::now();
        self.next_try = (started + self.backoff.failed(now)).max(now);
    }
}
