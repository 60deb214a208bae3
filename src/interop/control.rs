//! Control messages of an agent speaking the ioppytest wire.
//!
//! At start it announces `testingtool.component.ready` and, once its interface is up,
//! `fromAgent.<name>.ip.tun.started` with its addressing. It consumes
//! `toAgent.<name>.ip.tun.start`: with `--wait-config` the first one supplies the addresses
//! before the interface exists ([`wait_for_start`]); later ones add addresses to the running
//! interface and are answered with `ip.tun.started` again ([`run`]). A serial probe's agent
//! announces `802154.serial.started` and answers `802154.serial.start` ([`run_serial`]). A thread of the
//! agent's with its own connection, reconnecting quietly (the data link logs broker loss);
//! not on the hot path. It decides which addresses an order adds and leaves adding them to
//! its caller (the agent owns the interface): nothing here runs `ip`.

use std::fmt::Display;
use std::sync::Arc;
use std::time::Duration;

use crate::amqp::client::{self, Client, ConnectOptions, Owned};
use crate::codec::ioppytest::addressing::{OldAddressing, Order, StartPolicy};
use crate::codec::ioppytest::{self, ComponentReady, TunStarted, API_VERSION};
use crate::config::{AgentConfig, Prefix};
use crate::metrics::{DropReason, RxCounters};
use crate::util::Stop;

fn publish(c: &mut Client, exchange: &str, key: &str, body: &impl serde::Serialize) -> Result<(), client::Error> {
    // Serialising these plain structs cannot fail.
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    c.publish_copy(exchange, key, &crate::amqp::IOPPYTEST_PROPERTIES, &bytes).map(drop)
}

fn announce_ready(c: &mut Client, exchange: &str, name: &str) -> Result<(), client::Error> {
    let ready = ComponentReady { _api_version: API_VERSION.to_owned(), component: name.to_owned(), description: format!("{name} READY to start test suite.") };
    publish(c, exchange, ioppytest::ROUTING_KEY_COMPONENT_READY, &ready)
}

/// A connection consuming `toAgent.<name>.ip.tun.start`, on the first node that answers.
fn open(config: &AgentConfig, retry: client::Retry, stop: &Stop) -> Result<Client, client::Error> {
    open_for(config, ioppytest::routing_key_tun_start(config.name()), retry, stop)
}

/// A connection consuming the order key `start_key`, on the first node that answers.
fn open_for(config: &AgentConfig, start_key: String, retry: client::Retry, stop: &Stop) -> Result<Client, client::Error> {
    let mut opts = ConnectOptions::new(format!("tunbus {} ioppytest control", config.name()));
    opts.frame_max = Some(crate::amqp::CONTROL_FRAME_MAX);
    opts.heartbeat = config.bus().heartbeat;
    let mut plan = client::Plan::listener(&config.bus().exchange, vec![start_key], Some(100));
    if let Some(q) = &mut plan.queue {
        q.name = format!("{}.ctl", config.queue_prefix());
    }
    Client::connect(config.bus().endpoints.clone(), &opts, plan, retry, stop.flag())
}

/// The order policy of `config`: with `--coordinator USER`, that user's orders only (stamped
/// with its `user_id`); without it, orders stamped by this agent's own user and orders
/// without `user_id` (what ioppytest's coordinators send): the broker's permissions then
/// decide who may give orders. Either way inside `--start-within`, and at most
/// `MAX_ORDERS`.
pub fn policy(config: &AgentConfig) -> StartPolicy {
    let named = config.ioppytest().coordinator.clone();
    let unsigned = named.is_none();
    StartPolicy::new(named.unwrap_or_else(|| config.identity().user.clone()), config.ioppytest().start_within.clone()).unsigned(unsigned)
}

/// Judges an order; logs (and counts into `counters`) a refused one.
fn judge(policy: &mut StartPolicy, name: &str, user: Option<&str>, body: &[u8], counters: Option<&RxCounters>) -> Option<OldAddressing> {
    let Ok(t) = serde_json::from_slice::<TunStarted>(body) else {
        tracing::warn!(agent = name, "ignoring an ip.tun.start that is not valid JSON");
        return None;
    };
    let why = match policy.judge(user, OldAddressing::from_started(&t)) {
        Order::Accept(a) => {
            let from = user.map_or_else(|| "no user_id (anyone the broker lets publish it)".to_owned(), |u| format!("broker user {u:?}"));
            tracing::info!(agent = name, from = %from, addresses = ?a.prefixes().iter().map(ToString::to_string).collect::<Vec<_>>(), "ip.tun.start accepted");
            return Some(a);
        }
        Order::Empty => {
            tracing::warn!(agent = name, "ip.tun.start without addresses; ignored");
            return None;
        }
        Order::NotCoordinator(Some(u)) => format!("from broker user {u:?}, not the coordinator {:?}", policy.coordinator),
        Order::NotCoordinator(None) => format!("without user_id: --coordinator {:?} asks for orders stamped by that user", policy.coordinator),
        Order::OutsideSubnets(p) => format!("for {p}, outside the session's subnets (--start-within)"),
        Order::TooMany => format!("one too many (at most {})", policy.max_orders),
    };
    tracing::warn!(agent = name, "REFUSED an ip.tun.start {why}");
    if let Some(c) = counters {
        c.record_drop(DropReason::ForgedControl, 1);
    }
    None
}

/// Announces readiness and waits for the first `ip.tun.start` that carries addresses.
/// `Ok(None)` when stopped first.
pub fn wait_for_start(config: &AgentConfig, stop: &Stop) -> Result<Option<OldAddressing>, client::Error> {
    let (exchange, name) = (config.bus().exchange.as_str(), config.name().as_str());
    let mut c = match open(config, client::Retry::OncePerNode, stop) {
        Ok(c) => c,
        Err(client::Error::Stopped) => return Ok(None),
        Err(e) => return Err(e),
    };
    announce_ready(&mut c, exchange, name)?;
    tracing::info!(agent = name, key = %ioppytest::routing_key_tun_start(name), "waiting for the configuration");
    let mut policy = policy(config);
    let found = loop {
        if stop.is_raised() {
            break None;
        }
        let Some(event) = c.wait_event(Duration::from_millis(250), stop.flag())? else { continue };
        let Owned::Delivery { body, user_id, .. } = event else { continue };
        if let Some(a) = judge(&mut policy, name, user_id.as_deref(), &body, None) {
            break Some(a);
        }
    };
    c.close(Duration::from_millis(300));
    Ok(found)
}

/// Announces `ip.tun.started` (and readiness) and serves later `ip.tun.start` messages
/// (from the coordinator only, counting forged ones into `counters`), reconnecting quietly
/// (the data link logs broker loss), until `stop`. An accepted order's addresses that the
/// interface lacks go to `add_address` (the agent's: `ip addr add` on its interface).
pub fn run<E: Display>(config: &AgentConfig, stop: &Stop, counters: Arc<RxCounters>, mut add_address: impl FnMut(&Prefix) -> Result<(), E>) {
    let mut addressing = config.ioppytest().addressing.clone();
    let mut policy = policy(config);
    // The connection retries on its own (the machine's backoff, the next node).
    let Ok(mut c) = open(config, client::Retry::Forever, stop) else { return };
    while !stop.is_raised() {
        match serve(&mut c, config, &mut addressing, &mut policy, &counters, &mut add_address, stop) {
            Ok(()) | Err(client::Error::Stopped) => break,
            Err(error) => tracing::debug!(agent = %config.name(), %error, "ioppytest control connection failed"),
        }
        if c.reconnect(stop.flag()).is_err() {
            return;
        }
    }
    c.close(Duration::from_millis(300));
}

fn serve<E: Display>(
    c: &mut Client,
    config: &AgentConfig,
    addressing: &mut OldAddressing,
    policy: &mut StartPolicy,
    counters: &RxCounters,
    add_address: &mut impl FnMut(&Prefix) -> Result<(), E>,
    stop: &Stop,
) -> Result<(), client::Error> {
    let (exchange, name) = (config.bus().exchange.as_str(), config.name().as_str());
    let c = &mut *c;
    let started_key = ioppytest::routing_key_tun_started(name);
    announce_ready(c, exchange, name)?;
    publish(c, exchange, &started_key, &addressing.to_started(name))?;
    while !stop.is_raised() {
        let Some(event) = c.wait_event(Duration::from_millis(250), stop.flag())? else { continue };
        let (body, user) = match event {
            Owned::Delivery { body, user_id, .. } => (body, user_id),
            Owned::Cancelled => return Err(client::Error::Eof { broker: c.broker().to_owned(), hint: " (the control consumer was cancelled)" }),
            _ => continue,
        };
        let Some(wanted) = judge(policy, name, user.as_deref(), &body, Some(counters)) else { continue };
        for p in wanted.prefixes() {
            if !config.interface().addrs.iter().any(|c| c.addr == p.addr) && !addressing.prefixes().iter().any(|c| c.addr == p.addr) {
                match add_address(&p) {
                    Ok(()) => tracing::info!(agent = name, address = %p, "address added by ip.tun.start"),
                    Err(e) => tracing::warn!(agent = name, error = %e, "cannot add address from ip.tun.start"),
                }
            }
        }
        if !wanted.is_empty() {
            *addressing = wanted;
        }
        publish(c, exchange, &started_key, &addressing.to_started(name))?;
    }
    Ok(())
}

/// A serial probe on the ioppytest wire: announces `fromAgent.<name>.802154.serial.started`
/// (`port`, `boudrate`) and readiness, and answers every
/// `toAgent.<name>.802154.serial.start` with `serial.started` again, until `stop`. The
/// probe is the one `--device` names: an order for another port or speed is logged and
/// answered with what is open (0.2.20 handled no order at all; its listener took the port
/// from its environment). Reconnects quietly, as [`run`] does.
pub fn run_serial(config: &AgentConfig, device: &str, baud: u32, stop: &Stop) {
    let name = config.name().as_str();
    let Ok(mut c) = open_for(config, ioppytest::serial::routing_key_start(name), client::Retry::Forever, stop) else { return };
    while !stop.is_raised() {
        match serve_serial(&mut c, config, device, baud, stop) {
            Ok(()) | Err(client::Error::Stopped) => break,
            Err(error) => tracing::debug!(agent = %config.name(), %error, "ioppytest control connection failed"),
        }
        if c.reconnect(stop.flag()).is_err() {
            return;
        }
    }
    c.close(Duration::from_millis(300));
}

fn serve_serial(c: &mut Client, config: &AgentConfig, device: &str, baud: u32, stop: &Stop) -> Result<(), client::Error> {
    let (exchange, name) = (config.bus().exchange.as_str(), config.name().as_str());
    let started_key = ioppytest::serial::routing_key_started(name);
    let mut started = Vec::new();
    ioppytest::serial::encode_started(name, device, baud, &mut started);
    announce_ready(c, exchange, name)?;
    c.publish_copy(exchange, &started_key, &crate::amqp::IOPPYTEST_PROPERTIES, &started).map(drop)?;
    while !stop.is_raised() {
        let Some(event) = c.wait_event(Duration::from_millis(250), stop.flag())? else { continue };
        let body = match event {
            Owned::Delivery { body, .. } => body,
            Owned::Cancelled => return Err(client::Error::Eof { broker: c.broker().to_owned(), hint: " (the control consumer was cancelled)" }),
            _ => continue,
        };
        match serde_json::from_slice::<ioppytest::serial::SerialStart>(&body) {
            Ok(order) => {
                let other_port = order.port.as_deref().is_some_and(|p| !p.is_empty() && p != device);
                let other_baud = order.baud().is_some_and(|b| b != baud);
                if other_port || other_baud {
                    tracing::warn!(
                        agent = name,
                        port = order.port.as_deref().unwrap_or("-"),
                        boudrate = order.boudrate.as_deref().unwrap_or("-"),
                        device,
                        baud,
                        "serial.start asks for another probe or speed; this agent serves --device at --baud only"
                    );
                }
            }
            Err(_) => tracing::warn!(agent = name, "ignoring a serial.start that is not valid JSON"),
        }
        c.publish_copy(exchange, &started_key, &crate::amqp::IOPPYTEST_PROPERTIES, &started).map(drop)?;
    }
    Ok(())
}
