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
pub const JSON_PROPERTIES: Properties<'static> = Properties {
    content_type: Some("application/json"),
    content_encoding: None,
    empty_headers: false,
    delivery_mode: None,
    user_id: None,
    correlation_id: None,
};

/// What an announcer speaks, as its hello says (`"v1"`, `"ioppytest"`, `"router"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloWire {
    /// The native v1 wire.
    #[serde(rename = "v1")]
    Native,
    /// The Python agent's JSON wire.
    #[serde(rename = "ioppytest")]
    Ioppytest,
    /// `agent route`: it claims the old agents' addresses on their behalf and republishes
    /// their packets (a capture leaves those copies out).
    #[serde(rename = "router")]
    Router,
    /// A later version's wire: heard, not spoken.
    #[serde(other)]
    Unknown,
}

impl std::fmt::Display for HelloWire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HelloWire::Native => "v1",
            HelloWire::Ioppytest => "ioppytest",
            HelloWire::Router => "router",
            HelloWire::Unknown => "unknown",
        })
    }
}

impl HelloWire {
    /// The wire an agent of `wire` announces.
    pub fn of(wire: crate::config::Wire) -> HelloWire {
        match wire {
            crate::config::Wire::Native => HelloWire::Native,
            crate::config::Wire::Ioppytest => HelloWire::Ioppytest,
        }
    }
}

/// What an announcer's port carries: its session's layer. Agents of different layers do
/// not mix (an L2 session is not an L3 session): a start that hears the other layer is
/// refused, and a running agent warns about it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloLayer {
    /// IP packets (TUN, userspace stack); what a hello without the field means.
    #[default]
    #[serde(rename = "ip")]
    Ip,
    /// Ethernet frames (TAP, `--l2`).
    #[serde(rename = "ethernet")]
    Ethernet,
    /// A later version's layer: heard, not spoken.
    #[serde(other)]
    Unknown,
}

impl HelloLayer {
    /// The layer of a port.
    pub fn of(layer: crate::port::Layer) -> HelloLayer {
        match layer {
            crate::port::Layer::Ethernet => HelloLayer::Ethernet,
            crate::port::Layer::Ip | crate::port::Layer::Ieee802154 => HelloLayer::Ip,
        }
    }
}

impl std::fmt::Display for HelloLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HelloLayer::Ip => "IP (L3)",
            HelloLayer::Ethernet => "Ethernet (L2)",
            HelloLayer::Unknown => "unknown",
        })
    }
}

/// What an agent says about itself. Parsed once, where it comes off the bus: a name that
/// is not a topic word makes the whole hello invalid; an address entry that is not a
/// prefix is left out (the rest of the hello counts).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub name: crate::route::AgentName,
    #[serde(default)]
    pub session: Option<String>,
    /// The prefixes it owns (`198.18.0.1/24`, `fe80::…/64`).
    #[serde(with = "prefixes")]
    pub addresses: Vec<crate::route::Prefix>,
    pub queues: usize,
    /// Wire format spoken.
    pub wire: HelloWire,
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
    /// The prefixes it routes for (`--advertise`; docs/decisions/0027). Left out when
    /// empty, so hellos of agents that route for nothing are what older agents read; older
    /// agents ignore the field.
    #[serde(default, with = "prefixes", skip_serializing_if = "Vec::is_empty")]
    pub advertise: Vec<crate::route::Prefix>,
    /// What its port carries (absent: IP).
    #[serde(default)]
    pub layer: HelloLayer,
    /// An L2 agent's MACs: its TAP's own first (the word it binds), then those seen behind
    /// its bridge. Entries that are not MACs are left out.
    #[serde(default, with = "macs", skip_serializing_if = "Vec::is_empty")]
    pub macs: Vec<crate::packet::ethernet::Mac>,
    /// An `--e2e` agent's public key (64 hex digits): without a peers file, peers pin it
    /// on first use (docs/decisions/0029). A key that does not parse counts as none.
    #[serde(default, with = "public_key", skip_serializing_if = "Option::is_none")]
    pub key: Option<crate::e2e::keys::PublicKey>,
}

/// The hello and bye of one agent, serialised when its announcing link connects (not per
/// message), with their keys.
#[derive(Clone, Debug)]
pub struct Announcements {
    pub hello_key: String,
    pub hello: Vec<u8>,
    pub bye_key: String,
    pub bye: Vec<u8>,
    /// A gateway's (`--advertise`): its hello and bye go here too
    /// (`tunbus.v1.ctl.route.<name>`), which every agent binds.
    pub route_key: Option<String>,
    template: Hello,
}

impl Announcements {
    pub fn new(hello: &Hello) -> Announcements {
        let mut a = Announcements {
            hello_key: hello.name.hello_key().as_str().to_owned(),
            hello: Vec::new(),
            bye_key: hello.name.bye_key().as_str().to_owned(),
            bye: Vec::new(),
            route_key: if hello.advertise.is_empty() { None } else { RoutingKey::route(&hello.name).map(|k| k.as_str().to_owned()) },
            template: hello.clone(),
        };
        a.on_node(hello.node.as_deref());
        a
    }

    /// The MACs announced (an L2 agent's own, then those seen behind its bridge): the
    /// hello is serialised again.
    pub fn set_macs(&mut self, macs: Vec<crate::packet::ethernet::Mac>) {
        self.template.macs = macs;
        let node = self.template.node.clone();
        self.on_node(node.as_deref());
    }

    /// The MACs announced.
    pub fn macs(&self) -> &[crate::packet::ethernet::Mac] {
        &self.template.macs
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
    let mut seen: BTreeMap<crate::route::AgentName, Peer> = BTreeMap::new();
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

/// The first live agent of another layer than `layer` that answers a probe within `wait`
/// (the start-up check of an L2 agent: an L2 and an L3 session do not mix), with its layer.
pub fn other_layer(
    endpoints: &[Endpoint],
    exchange: &str,
    layer: HelloLayer,
    own_name: &str,
    wait: Duration,
    stop: &Stop,
) -> Result<Option<(String, HelloLayer)>, client::Error> {
    let (mut c, _q) = listener(endpoints, exchange, "tunbus layer check", &[HELLO_PATTERN], stop)?;
    c.publish_copy(exchange, CTL_PROBE, &JSON_PROPERTIES, br#"{"from":"layer check"}"#)?;
    let deadline = Instant::now() + wait;
    let mut found = None;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match c.wait_event(left, stop.flag())? {
            Some(Owned::Delivery { body, .. }) => {
                if let Ok(h) = serde_json::from_slice::<Hello>(&body) {
                    if h.layer != layer && !h.leaving && h.name != own_name && h.wire == HelloWire::Native {
                        found = Some((h.name.as_str().to_owned(), h.layer));
                        break;
                    }
                }
            }
            Some(_) => {}
            None => break,
        }
    }
    c.close(Duration::from_millis(300));
    Ok(found)
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

/// Hello MACs on the wire: a list of `02:00:00:00:00:01` strings.
mod macs {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::packet::ethernet::Mac;

    pub fn serialize<S: Serializer>(macs: &[Mac], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(macs.iter().map(ToString::to_string))
    }

    /// Entries that are not MACs are left out; at most 64 count.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Mac>, D::Error> {
        let texts = Vec::<std::borrow::Cow<'de, str>>::deserialize(d)?;
        Ok(texts.iter().filter_map(|t| t.parse().ok()).take(64).collect())
    }
}

/// A hello's public key on the wire: 64 hex digits.
mod public_key {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::e2e::keys::PublicKey;

    pub fn serialize<S: Serializer>(key: &Option<PublicKey>, s: S) -> Result<S::Ok, S::Error> {
        match key {
            Some(k) => s.serialize_str(&k.to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PublicKey>, D::Error> {
        let text = Option::<std::borrow::Cow<'de, str>>::deserialize(d)?;
        Ok(text.and_then(|t| t.parse().ok()))
    }
}

/// Hello addresses on the wire: a list of `ADDR/LEN` strings.
mod prefixes {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::route::Prefix;

    pub fn serialize<S: Serializer>(prefixes: &[Prefix], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(prefixes.iter().map(ToString::to_string))
    }

    /// Entries that are not prefixes are left out: one bad entry does not silence an agent.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Prefix>, D::Error> {
        let texts = Vec::<std::borrow::Cow<'de, str>>::deserialize(d)?;
        Ok(texts.iter().filter_map(|t| t.parse().ok()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hellos_are_typed_where_they_come_in() {
        let body = br#"{"name":"h1","addresses":["198.18.0.1/24","nonsense","fe80::1/64"],"queues":2,"wire":"v1","started_unix_ms":1}"#;
        let h: Hello = serde_json::from_slice(body).expect("a valid hello");
        assert_eq!(h.name, "h1");
        assert_eq!(h.addresses, ["198.18.0.1/24".parse().unwrap(), "fe80::1/64".parse().unwrap()]);
        assert_eq!(h.wire, HelloWire::Native);
        let again: Hello = serde_json::from_slice(&serde_json::to_vec(&h).expect("serialises")).expect("parses back");
        assert_eq!(again, h);
        // A later version's wire is heard; a name that makes no key is refused.
        let later = br#"{"name":"h2","addresses":[],"queues":1,"wire":"v2","started_unix_ms":1}"#;
        assert_eq!(serde_json::from_slice::<Hello>(later).expect("parses").wire, HelloWire::Unknown);
        let bad = br#"{"name":"h.2","addresses":[],"queues":1,"wire":"v1","started_unix_ms":1}"#;
        assert!(serde_json::from_slice::<Hello>(bad).is_err());
        let a = Announcements::new(&h);
        assert_eq!(a.hello_key, "tunbus.v1.ctl.hello.h1");
        assert!(String::from_utf8_lossy(&a.hello).contains(r#""addresses":["198.18.0.1/24","fe80::1/64"]"#));
        assert!(!String::from_utf8_lossy(&a.hello).contains("advertise"), "nothing new for agents that route nothing");
        assert_eq!(a.route_key, None);
        // A gateway's hello lists its prefixes, and goes to its route key too.
        let gw = Hello { advertise: vec!["198.19.50.0/24".parse().unwrap()], ..h.clone() };
        let a = Announcements::new(&gw);
        assert_eq!(a.route_key.as_deref(), Some("tunbus.v1.ctl.route.h1"));
        assert!(String::from_utf8_lossy(&a.hello).contains(r#""advertise":["198.19.50.0/24"]"#));
        let back: Hello = serde_json::from_slice(&a.hello).expect("parses");
        assert_eq!(back.advertise, gw.advertise);
    }
}
