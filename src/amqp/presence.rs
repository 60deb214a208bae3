//! Presence: who is on the bus. Control plane, never on the data path.
//!
//! An agent publishes a [`Hello`] on `tunbus.v1.ctl.hello.<name>` when it connects, every
//! [`HELLO_EVERY`], and whenever someone publishes `tunbus.v1.ctl.probe`; it publishes
//! `tunbus.v1.ctl.bye.<name>` when it stops. Queue worker 0 does this on its data
//! connection ([`Announcements`]; its queue also binds the probe key), so presence costs
//! no connection of its own (decision 0014). [`discover`] (`agent peers`) and
//! [`name_answers`] (the start-up name check) probe and collect the answers on a short
//! connection of their own, on the calling thread.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::client::{self, Client, ConnectOptions, Endpoint, Owned};
use super::wire::Properties;
use crate::route::{RoutingKey, BYE_PATTERN, CTL_PROBE, HELLO_PATTERN};
use crate::util::Stop;

pub const HELLO_EVERY: Duration = Duration::from_secs(5);
/// Bound of the queues `agent peers` and the name check listen on (hellos of every agent).
pub const LISTEN_QUEUE_MAX: i32 = 100_000;

/// The properties of presence messages.
pub const JSON_PROPERTIES: Properties<'static> = Properties { content_type: Some("application/json"), content_encoding: None, empty_headers: false, delivery_mode: None, user_id: None, correlation_id: None };

/// The `wire` of `agent route`'s hello: it claims the old agents' addresses on their
/// behalf and republishes their packets (a capture leaves those copies out).
pub const ROUTER_WIRE: &str = "router";

/// What an agent says about itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub name: String,
    #[serde(default)]
    pub session: Option<String>,
    pub addresses: Vec<String>,
    pub queues: usize,
    /// Wire format spoken: "v1" (native), "ioppytest", or [`ROUTER_WIRE`].
    pub wire: String,
    pub started_unix_ms: u64,
    #[serde(default)]
    pub interface: String,
    #[serde(default)]
    pub netns: Option<String>,
    #[serde(default)]
    pub version: String,
    /// The broker node (`host:port`) the announcing connection is on.
    #[serde(default)]
    pub node: Option<String>,
    /// Set on the goodbye message.
    #[serde(default)]
    pub leaving: bool,
}

/// The hello and bye of one agent, serialised when its announcing link connects (not per
/// message), with their keys.
#[derive(Clone, Debug)]
pub struct Announcements {
    pub hello_key: String,
    pub hello: Vec<u8>,
    pub bye_key: String,
    pub bye: Vec<u8>,
    template: Hello,
}

impl Announcements {
    pub fn new(hello: &Hello) -> anyhow::Result<Announcements> {
        let word = |k: Option<RoutingKey>| k.map(|k| k.as_str().to_owned()).ok_or_else(|| anyhow::anyhow!("agent name {:?} is not a topic word", hello.name));
        let mut a = Announcements {
            hello_key: word(RoutingKey::hello(&hello.name))?,
            hello: Vec::new(),
            bye_key: word(RoutingKey::bye(&hello.name))?,
            bye: Vec::new(),
            template: hello.clone(),
        };
        a.on_node(hello.node.as_deref());
        Ok(a)
    }

    /// The announcing connection is (now) on `node`.
    pub fn on_node(&mut self, node: Option<&str>) {
        self.template.node = node.map(str::to_owned);
        // Serialising a struct of strings cannot fail.
        self.hello = serde_json::to_vec(&self.template).unwrap_or_default();
        self.bye = serde_json::to_vec(&Hello { leaving: true, ..self.template.clone() }).unwrap_or_default();
    }
}

/// One agent as `agent peers` saw it.
#[derive(Clone, Debug)]
pub struct Peer {
    pub hello: Hello,
    /// The broker user that published the hello (RabbitMQ checked it), when it said.
    pub user: Option<String>,
    pub heard: Instant,
}

/// A short control connection with an exclusive, server-named queue bound to `patterns`.
fn listener(endpoints: &[Endpoint], exchange: &str, role: &str, patterns: &[&str], stop: &Stop) -> Result<(Client, String), client::Error> {
    let mut opts = ConnectOptions::new(role);
    opts.frame_max = Some(super::CONTROL_FRAME_MAX);
    let plan = client::Plan::listener(exchange, patterns.iter().map(|p| (*p).to_owned()).collect(), Some(LISTEN_QUEUE_MAX));
    let c = Client::connect(endpoints.to_vec(), &opts, plan, client::Retry::OncePerNode, stop.flag())?;
    let q = c.queue().to_owned();
    Ok((c, q))
}

/// Probes the bus and collects hellos for `wait`. Agents that said goodbye are left out.
pub fn discover(endpoints: &[Endpoint], exchange: &str, wait: Duration, stop: &Stop) -> Result<Vec<Peer>, client::Error> {
    let (mut c, _q) = listener(endpoints, exchange, "tunbus peers", &[HELLO_PATTERN, BYE_PATTERN], stop)?;
    c.publish_copy(exchange, CTL_PROBE, &JSON_PROPERTIES, br#"{"from":"agent peers"}"#)?;
    let mut seen: BTreeMap<String, Peer> = BTreeMap::new();
    let deadline = Instant::now() + wait;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Some(event) = c.wait_event(left, stop.flag())? else { break };
        let Owned::Delivery { body, user_id, .. } = event else { continue };
        let Ok(hello) = serde_json::from_slice::<Hello>(&body) else { continue };
        if hello.leaving {
            seen.remove(&hello.name);
        } else {
            seen.insert(hello.name.clone(), Peer { hello, user: user_id, heard: Instant::now() });
        }
    }
    c.close(Duration::from_millis(300));
    Ok(seen.into_values().collect())
}

/// Whether a live agent called `name` answers a probe within `wait` (the start-up check
/// when its queue name is taken: a live owner answers, a dead connection the broker has
/// not dropped yet does not).
pub fn name_answers(endpoints: &[Endpoint], exchange: &str, name: &str, wait: Duration, stop: &Stop) -> Result<bool, client::Error> {
    let Some(key) = RoutingKey::hello(name) else { return Ok(false) };
    let (mut c, _q) = listener(endpoints, exchange, "tunbus name check", &[key.as_str()], stop)?;
    c.publish_copy(exchange, CTL_PROBE, &JSON_PROPERTIES, br#"{"from":"name check"}"#)?;
    let deadline = Instant::now() + wait;
    let mut answered = false;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match c.wait_event(left, stop.flag())? {
            Some(Owned::Delivery { body, .. }) => {
                if serde_json::from_slice::<Hello>(&body).is_ok_and(|h| h.name == name && !h.leaving) {
                    answered = true;
                    break;
                }
            }
            Some(_) => {}
            None => break,
        }
    }
    c.close(Duration::from_millis(300));
    Ok(answered)
}
