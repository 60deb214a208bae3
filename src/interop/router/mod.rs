//! `agent route`: ioppytest's packet router, and the bridge between old and new agents.
//!
//! One thread, one connection (publishing and consuming on its channel), one exclusive
//! queue bound to:
//! - `fromAgent.*.ip.tun.packet.raw`: JSON packets from old-wire agents (Python agents and
//!   tunbus agents with `--wire ioppytest`). Each is forwarded unchanged to the other nodes
//!   of the sender's links and to `agent_TT`, as the old router does; and, when its
//!   destination is not an old agent, re-emitted as a v1 batch on `tunbus.v1.<dst>.<shard>`
//!   (or the flood key) for native agents.
//! - `fromAgent.*.802154.serial.packet.raw`: 802.15.4 frames from old-wire serial probes
//!   (the Python listener, `agent serial --wire ioppytest`), re-published to the other
//!   probes of the sender's links and `agent_TT` in the router's `MsgPacketInjectRaw`
//!   shape, and flooded to native radios as a v1 batch marked `FLAG_IEEE802154`; native
//!   radio floods go back to every old probe heard (never to old IP agents).
//! - `fromAgent.*.ip.tun.started`: old agents' addressing. The router learns it and binds
//!   `tunbus.v1.<addr>.*` for each of their addresses,
//! - so native batches for old agents arrive here; their packets are re-emitted as JSON on
//!   `toAgent.<owner>.ip.tun.packet.raw`, checksums completed (no offloads over there).
//! - `tunbus.v1.all.*`: native floods, re-emitted as JSON to every old agent; floods the
//!   router itself emitted on an old agent's behalf carry the sender word
//!   [`ROUTER_SENDER`] and are ignored.
//!
//! The decisions are [`state::Router`]'s, a pure function of (topology, what it learned,
//! delivery) → [`state::Action`]s; this module is the shell that connects, binds, feeds it
//! deliveries and carries out its actions.
//!
//! Unlike the old router it keeps `prefetch` messages in flight, acknowledges in batches,
//! survives a broker restart (reconnect, re-declare, re-bind what it learned), and counts
//! what it forwarded and dropped.

pub mod state;

use std::time::{Duration, Instant};

use serde::Serialize;

use super::topology::Topology;
use crate::amqp::client::{self, Client, ConnectOptions, Endpoint, Owned, Published};
use crate::amqp::presence::{HELLO_EVERY, JSON_PROPERTIES};
use crate::amqp::session::QueueOptions;
use crate::amqp::wire::Properties;
use crate::amqp::IOPPYTEST_PROPERTIES;
use crate::route::{self, RoutingKey};
use crate::util::{now_ns, Stop};
pub use state::ROUTER_SENDER;
use state::{Action, Form, Router};

/// Bound of the router's queue in messages (it forwards one packet per message).
pub const QUEUE_MAX_MESSAGES: i32 = 10_000;

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
    /// 802.15.4 frames from old-wire serial probes, copies forwarded to their link peers,
    /// floods bridged to native radios; native radio frames bridged to old probes.
    pub frames_in: u64,
    pub frames_forwarded: u64,
    pub frames_bridged_to_native: u64,
    pub frames_bridged_to_old: u64,
    /// `ip.tun.started` refused: the name is not a topology node, or an address belongs
    /// to a native agent.
    pub refused_claims: u64,
    pub reconnects: u64,
}

impl std::fmt::Display for RouterCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "json in {} (forwarded {} copies, bridged {} to native), native in {} (bridged {} to old), radio frames in {} (forwarded {} copies, bridged {} to native, {} from native), dropped: malformed json {}, malformed native {}, sender not in topology {}, no old owner {}; agents learned {}, claims refused {}, reconnects {}",
            self.json_in,
            self.json_forwarded,
            self.bridged_to_native,
            self.native_in,
            self.bridged_to_old,
            self.frames_in,
            self.frames_forwarded,
            self.frames_bridged_to_native,
            self.frames_bridged_to_old,
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

/// The router's connection side: options, the pure [`Router`], its queue and actions.
struct Shell {
    opts: RouterOptions,
    router: Router,
    actions: Vec<Action>,
    queue: String,
    next_hello: Instant,
}

/// Runs until `stop`; returns the counters.
pub fn run(mut opts: RouterOptions, stop: &Stop) -> RouterCounters {
    let topology = std::mem::take(&mut opts.topology);
    let mut r =
        Shell { opts, router: Router::new(topology), actions: Vec::new(), queue: format!("tunbus.router.{}", std::process::id()), next_hello: Instant::now() };
    let mut opts = ConnectOptions::new("tunbus router");
    opts.heartbeat = r.opts.heartbeat;
    let plan = client::Plan {
        exchange: r.opts.exchange.clone(),
        queue: Some(client::QueuePlan {
            name: r.queue.clone(),
            options: QueueOptions { exclusive: true, auto_delete: true, ..QueueOptions::default() },
            max_length: Some(QUEUE_MAX_MESSAGES),
            max_length_bytes: None,
            bindings: r.router.bindings(),
            prefetch: Some(r.opts.prefetch),
            consume: Some(client::Consume { tag: "tunbus-router".into(), no_ack: false, exclusive: true }),
        }),
    };
    // One connection that comes back by itself (the machine's backoff, the next node).
    let mut c = match Client::connect(r.opts.endpoints.clone(), &opts, plan, client::Retry::Forever, stop.flag()) {
        Ok(c) => c,
        Err(_) => return r.router.counters,
    };
    loop {
        match r.serve(&mut c, stop) {
            Ok(()) | Err(client::Error::Stopped) => break,
            Err(error) => tracing::warn!(%error, "router lost the broker; reconnecting"),
        }
        if c.reconnect(stop.flag()).is_err() {
            break;
        }
        tracing::info!("router reconnected to the broker");
        r.router.counters.reconnects += 1;
    }
    r.announce(&mut c, true).ok();
    c.close(Duration::from_millis(300));
    r.router.counters
}

impl Shell {
    /// Serves one connection until it is lost (`Err`) or `stop`.
    fn serve(&mut self, c: &mut Client, stop: &Stop) -> Result<(), client::Error> {
        let s = stop.flag();
        let exchange = self.opts.exchange.clone();
        // Hear every native agent's claims now, not at its next hello.
        c.publish_copy(&exchange, route::CTL_PROBE, &JSON_PROPERTIES, br#"{"from":"agent route"}"#)?;
        tracing::info!(exchange = %exchange, nodes = self.router.topology().nodes().count(), "router serving");
        let mut acks = crate::amqp::AckBatcher::for_prefetch(self.opts.prefetch);
        let mut next_report = Instant::now() + self.opts.stats_interval;
        self.next_hello = Instant::now();
        while !stop.is_raised() {
            if Instant::now() >= self.next_hello {
                self.announce(c, false)?;
            }
            let event = c.wait_event(Duration::from_millis(100), s)?;
            let Some(event) = event else {
                if let Some(tag) = acks.take() {
                    c.ack_multiple(tag);
                    c.flush(Instant::now())?;
                }
                if !self.opts.stats_interval.is_zero() && Instant::now() >= next_report {
                    tracing::info!(counters = %self.router.counters, "router");
                    next_report = Instant::now() + self.opts.stats_interval;
                }
                continue;
            };
            match event {
                Owned::Delivery { tag, routing_key, body, user_id, .. } => {
                    self.router.on_delivery(&routing_key, user_id.as_deref(), &body, Instant::now(), now_ns(), &mut self.actions);
                    self.carry_out(c, stop)?;
                    if let Some(tag) = acks.delivered(tag) {
                        c.ack_multiple(tag);
                    }
                }
                Owned::Cancelled => return Err(client::Error::Eof { broker: c.broker().to_owned(), hint: " (the router's consumer was cancelled)" }),
                Owned::Blocked | Owned::Unblocked => {}
            }
        }
        Ok(())
    }

    /// Does what the router decided, in order.
    fn carry_out(&mut self, c: &mut Client, stop: &Stop) -> Result<(), client::Error> {
        let mut actions = std::mem::take(&mut self.actions);
        let mut result = Ok(());
        for action in actions.drain(..) {
            result = match action {
                Action::Publish { key, form: Form::Ioppytest, body } => send(c, &self.opts.exchange, &key, &IOPPYTEST_PROPERTIES, &body),
                Action::Publish { key, form: Form::Native, body } => send(c, &self.opts.exchange, &key, &Properties::default(), &body),
                Action::Bind(pattern) => {
                    c.plan_binding(&pattern); // bound again by every reconnection
                    c.queue_bind(&self.queue, &self.opts.exchange, &pattern, stop.flag())
                }
                Action::Announce => {
                    // A probe or new claims: hello now (a bind above came first).
                    self.announce(c, false)
                }
            };
            if result.is_err() {
                break;
            }
        }
        actions.clear();
        self.actions = actions;
        result
    }

    /// Publishes the router's hello (or bye).
    fn announce(&mut self, c: &mut Client, leaving: bool) -> Result<(), client::Error> {
        self.next_hello = Instant::now() + HELLO_EVERY;
        let hello = self.router.hello(c.broker(), leaving);
        let (key, body) = match (RoutingKey::hello(ROUTER_SENDER), RoutingKey::bye(ROUTER_SENDER)) {
            (Some(h), Some(b)) => (if leaving { b } else { h }, serde_json::to_vec(&hello).unwrap_or_default()),
            _ => return Ok(()), // invariant: the router's name is a topic word
        };
        c.publish_copy(&self.opts.exchange, key.as_str(), &JSON_PROPERTIES, &body).map(drop)
    }
}

/// Publishes one message, waiting (bounded) while the previous one is still being written.
fn send(c: &mut Client, exchange: &str, key: &str, props: &Properties<'_>, body: &[u8]) -> Result<(), client::Error> {
    if c.publish(Instant::now(), exchange, key, props, body)? == Published::Busy && c.wait_writable(client::SEND_STALL)? {
        c.publish(Instant::now(), exchange, key, props, body)?;
    }
    Ok(())
}
