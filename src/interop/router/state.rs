//! The router's decisions, pure: (topology, what it learned, one delivery) → actions.
//!
//! In the manner of quinn-proto, [`Router`] owns no connection and reads no clock: the
//! shell in [`super`] feeds it each delivery with the time, and carries out the
//! [`Action`]s it returns (publish, bind, announce) on its connection, in order. So every
//! forwarding, bridging and refusal rule is tested here without a broker.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::Instant;

use super::RouterCounters;
use crate::amqp::presence::{Hello, HelloWire};
use crate::codec::ioppytest::addressing::OldAddressing;
use crate::codec::ioppytest::{self, serial, TunStarted};
use crate::codec::v1::{self, BatchWriter};
use crate::codec::vnet;
use crate::identity::claims::Claims;
use crate::interop::topology::{Topology, TESTING_TOOL};
use crate::route::{self, Destination, Key, RoutingKey};

/// The sender word of floods the router emits on behalf of old agents (an agent name can
/// never contain '.', but it could be anything else; this one is reserved for the router).
pub const ROUTER_SENDER: &str = "tunbus-router";

/// What old-wire serial probes publish: 802.15.4 frames, one JSON body each.
pub const SERIAL_PATTERN: &str = "fromAgent.*.802154.serial.packet.raw";

/// The AMQP properties of a message the router publishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    /// ioppytest JSON (`amqp::IOPPYTEST_PROPERTIES`).
    Ioppytest,
    /// A native v1 batch (no properties; the connection adds `user_id`).
    Native,
}

/// One thing the shell must do on the router's connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Publish {
        key: String,
        form: Form,
        body: Vec<u8>,
    },
    /// Bind the router's queue to this pattern.
    Bind(String),
    /// Publish the router's hello now: its claims changed, or an agent asked.
    Announce,
}

/// The router's memory: topology, learned old agents, native claims, reusable buffers.
pub struct Router {
    topology: Topology,
    old: BTreeMap<String, OldAddressing>,
    /// Old-wire serial probes heard (`fromAgent.<name>.802154.serial.packet.raw`): native
    /// radio floods are re-emitted to each.
    radios: BTreeSet<String>,
    owner: HashMap<IpAddr, String>,
    /// Addresses native agents claim in their hellos: never learned for an old agent.
    native: Claims,
    pub counters: RouterCounters,
    batch: BatchWriter,
    packet: Vec<u8>,
    json: Vec<u8>,
    /// Cuts native super-packets into the MTU-sized packets an old agent takes.
    segmenter: crate::codec::segment::Segmenter,
    seq: u64,
}

impl Router {
    pub fn new(topology: Topology) -> Router {
        Router {
            topology,
            old: BTreeMap::new(),
            radios: BTreeSet::new(),
            owner: HashMap::new(),
            native: Claims::new(),
            counters: RouterCounters::default(),
            batch: BatchWriter::with_capacity(v1::HEADER_LEN + 4 + v1::MAX_PACKET_LEN),
            packet: Vec::new(),
            json: Vec::new(),
            segmenter: crate::codec::segment::Segmenter::new(),
            seq: 0,
        }
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Every key the router's queue must be bound to: the fixed ones and one per address
    /// of a learned old agent (so a reconnect re-binds what was learned).
    pub fn bindings(&self) -> Vec<String> {
        let mut keys: Vec<String> = [
            "fromAgent.*.ip.tun.packet.raw",
            "fromAgent.*.ip.tun.started",
            SERIAL_PATTERN,
            route::ALL_PATTERN,
            route::HELLO_PATTERN,
            route::BYE_PATTERN,
            route::CTL_PROBE,
        ]
        .map(str::to_owned)
        .to_vec();
        keys.extend(self.owner.keys().map(|a| route::unicast_pattern(*a)));
        keys
    }

    /// The router's hello (or bye): it claims the old agents' addresses, for which it
    /// publishes bridged batches, so native receivers accept them from its broker user.
    pub fn hello(&self, node: &str, leaving: bool) -> Hello {
        let mut addresses: Vec<route::Prefix> = self.owner.keys().filter_map(|a| route::Prefix::new(*a, if a.is_ipv4() { 32 } else { 128 })).collect();
        addresses.sort_by_key(ToString::to_string);
        Hello {
            // invariant: the router's name is a constant topic word
            name: route::AgentName::new(ROUTER_SENDER).unwrap_or_else(|_| unreachable!("{ROUTER_SENDER} is a topic word")),
            session: None,
            addresses,
            queues: 1,
            wire: HelloWire::Router,
            started_unix_ms: 0,
            interface: String::new(),
            netns: None,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            node: Some(node.to_owned()),
            leaving,
            advertise: Vec::new(),
            layer: Default::default(),
            macs: Vec::new(),
            key: None,
        }
    }

    /// One delivery on `key`, published by broker user `user`, at `now` (`now_ns` on the
    /// bus clock stamps what is re-emitted). Appends what to do to `out`.
    pub fn on_delivery(&mut self, key: &str, user: Option<&str>, body: &[u8], now: Instant, now_ns: u64, out: &mut Vec<Action>) {
        if let Some(serial::SerialKey::FromAgent { name }) = serial::parse_key(key) {
            return self.on_old_frame(name, body, now_ns, out);
        }
        if let Some(old) = ioppytest::parse_from_agent(key) {
            return match old {
                ioppytest::FromAgent::Packet { name } => self.on_old_packet(name, body, now_ns, out),
                ioppytest::FromAgent::Started { name } => self.learn(name, body, now, out),
            };
        }
        match Key::parse(key) {
            Some(Key::Probe) => out.push(Action::Announce),
            Some(Key::Ping { .. } | Key::Pong { .. }) => {} // never bound: agents answer their pings
            Some(Key::Route { .. }) => {}                   // never bound: the router routes old agents by name
            Some(Key::Hello { name } | Key::Bye { name }) if name == ROUTER_SENDER => {}
            Some(Key::Hello { .. }) => self.note_native(user, false, body, now),
            Some(Key::Bye { .. }) => self.note_native(user, true, body, now),
            Some(Key::All { sender }) if sender == ROUTER_SENDER => {} // a flood we emitted for an old agent
            Some(Key::All { .. }) => self.on_native_batch(body, None, now_ns, out),
            Some(Key::Unicast { dst, .. }) => {
                let owner = self.owner.get(&dst).cloned();
                self.on_native_batch(body, owner, now_ns, out);
            }
            None => {}
        }
    }

    /// A native agent's hello or bye (published by broker user `user`): what it claims.
    fn note_native(&mut self, user: Option<&str>, leaving: bool, body: &[u8], now: Instant) {
        let (Some(user), Ok(hello)) = (user, serde_json::from_slice::<Hello>(body)) else { return };
        let addrs: Vec<IpAddr> = hello.addresses.iter().map(|p| p.addr).collect();
        if leaving || hello.leaving {
            self.native.on_bye(user, &addrs);
        } else {
            self.native.on_hello(user, &addrs, now);
        }
    }

    /// `ip.tun.started` from an old agent: remember its addresses and bind them, if it is a
    /// node of the topology and no native agent holds them.
    fn learn(&mut self, name: &str, body: &[u8], now: Instant, out: &mut Vec<Action>) {
        let Ok(started) = serde_json::from_slice::<TunStarted>(body) else {
            self.counters.malformed_json += 1;
            return;
        };
        if !self.topology.nodes().any(|n| n == name) && name != TESTING_TOOL {
            self.counters.refused_claims += 1;
            tracing::warn!(agent = name, "ignoring ip.tun.started from a name that is not a node of the topology");
            return;
        }
        self.native.expire(now);
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
                out.push(Action::Bind(route::unicast_pattern(addr)));
                added = true;
            }
        }
        if added {
            out.push(Action::Announce);
        }
        if kept > 0 && self.old.insert(name.to_owned(), addressing).is_none() {
            self.counters.agents_learned += 1;
            tracing::info!(agent = name, addresses = ?self.old[name].addresses(), "learned an old-wire agent");
        }
    }

    /// A JSON packet from old agent `name`: copies to its link peers, and a v1 batch for
    /// its destination when that is not an old agent.
    fn on_old_packet(&mut self, name: &str, body: &[u8], now_ns: u64, out: &mut Vec<Action>) {
        self.counters.json_in += 1;
        if ioppytest::decode_packet(body, &mut self.packet).is_err() {
            self.counters.malformed_json += 1;
            return;
        }
        let targets = self.topology.flood_targets(name);
        if targets.is_empty() && !self.old.contains_key(name) {
            self.counters.unknown_sender += 1;
        }
        for peer in &targets {
            out.push(Action::Publish { key: ioppytest::routing_key_to_agent(peer), form: Form::Ioppytest, body: body.to_vec() });
            self.counters.json_forwarded += 1;
        }
        let Ok(class) = route::classify(&self.packet) else { return };
        let key = match class.dst {
            Destination::Flood => RoutingKey::all(ROUTER_SENDER),
            Destination::Unicast(dst) if self.owner.contains_key(&dst) => None, // old agents got it above
            Destination::Unicast(dst) => Some(RoutingKey::unicast(dst, class.shard)),
        };
        let Some(key) = key else { return };
        self.batch.reset(0);
        if self.batch.push(None, &self.packet).is_err() {
            return;
        }
        self.seq += 1;
        let frame = self.batch.finish(self.seq, now_ns);
        out.push(Action::Publish { key: key.as_str().to_owned(), form: Form::Native, body: frame.to_vec() });
        self.counters.bridged_to_native += 1;
    }

    /// An 802.15.4 frame from old-wire probe `name`: re-published to the probes of its
    /// links (and `agent_TT`) as ioppytest's router does (`MsgPacketInjectRaw` on
    /// `toAgent.<peer>.802154.serial.packet.raw`), and flooded to native radios as a v1
    /// batch marked `FLAG_IEEE802154` under the router's flood key.
    fn on_old_frame(&mut self, name: &str, body: &[u8], now_ns: u64, out: &mut Vec<Action>) {
        self.counters.frames_in += 1;
        if serial::decode_frame(body, usize::from(u16::MAX), &mut self.packet).is_err() {
            self.counters.malformed_json += 1;
            return;
        }
        let targets = self.topology.flood_targets(name);
        if targets.is_empty() {
            self.counters.unknown_sender += 1;
        } else if !self.radios.contains(name) {
            // Only nodes of the topology are remembered: the set stays bounded whoever publishes.
            self.radios.insert(name.to_owned());
        }
        serial::encode_inject(&self.packet, now_ns / 1_000_000_000, &mut self.json);
        for peer in &targets {
            out.push(Action::Publish { key: serial::routing_key_to_agent(peer), form: Form::Ioppytest, body: self.json.clone() });
            self.counters.frames_forwarded += 1;
        }
        self.batch.reset(v1::FLAG_IEEE802154);
        if self.batch.push(None, &self.packet).is_err() {
            return;
        }
        self.seq += 1;
        let frame = self.batch.finish(self.seq, now_ns);
        if let Some(key) = RoutingKey::all(ROUTER_SENDER) {
            out.push(Action::Publish { key: key.as_str().to_owned(), form: Form::Native, body: frame.to_vec() });
            self.counters.frames_bridged_to_native += 1;
        }
    }

    /// A native radio flood: each frame re-emitted to every old-wire probe heard.
    fn on_native_frames(&mut self, frame: &v1::Frame<'_>, now_ns: u64, out: &mut Vec<Action>) {
        for p in frame.packets() {
            self.counters.native_in += 1;
            if self.radios.is_empty() {
                self.counters.no_old_owner += 1;
                continue;
            }
            serial::encode_inject(p.data, now_ns / 1_000_000_000, &mut self.json);
            for name in &self.radios {
                out.push(Action::Publish { key: serial::routing_key_to_agent(name), form: Form::Ioppytest, body: self.json.clone() });
                self.counters.frames_bridged_to_old += 1;
            }
        }
    }

    /// A native batch for an old agent (`owner`), or a native flood (`None`: to every old agent).
    fn on_native_batch(&mut self, body: &[u8], owner: Option<String>, now_ns: u64, out: &mut Vec<Action>) {
        let Ok(frame) = v1::decode(body) else {
            self.counters.malformed_native += 1;
            return;
        };
        match crate::port::Layer::of_frame_flags(frame.header().flags) {
            crate::port::Layer::Ip => {}
            crate::port::Layer::Ieee802154 => return self.on_native_frames(&frame, now_ns, out),
            crate::port::Layer::Ethernet => return, // no old-wire agent carries Ethernet
        }
        let targets: Vec<String> = match owner {
            Some(o) => vec![o],
            None => self.old.keys().cloned().collect(),
        };
        for p in frame.packets() {
            self.counters.native_in += 1;
            // The header the allow-list builds from the packet, never the sender's offsets.
            let hdr = match p.vnet.map(|h| vnet::build(h, p.data)) {
                None => None,
                Some(Ok(h)) => Some(h),
                Some(Err(_)) => {
                    self.counters.malformed_native += 1;
                    continue;
                }
            };
            // A unicast batch key names one address, but check each packet's own destination.
            let per_packet_owner = match route::classify(p.data).map(|c| c.dst) {
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
            // The old wire carries plain packets of the old agent's MTU: a super-packet
            // goes as the segments it stands for, checksums completed (as GSO would).
            let (json, counters, seconds) = (&mut self.json, &mut self.counters, now_ns / 1_000_000_000);
            let cut = self.segmenter.segments(hdr.as_ref(), p.data, |seg| {
                ioppytest::encode_packet(seg, "tun0", seconds, json);
                for name in &to {
                    out.push(Action::Publish { key: ioppytest::routing_key_to_agent(name), form: Form::Ioppytest, body: json.clone() });
                    counters.bridged_to_old += 1;
                }
            });
            if cut.is_err() {
                self.counters.malformed_native += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interop::topology::Link;

    const T0_NS: u64 = 1_700_000_000_000_000_000;

    fn router() -> Router {
        Router::new(Topology::from_links(None, vec![Link { link_id: "l".into(), nodes: vec!["agent_1".into(), "agent_2".into()] }]))
    }

    /// An ICMP echo request from `src` to `dst` (IPv4, checksum not checked by the router).
    fn ping(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 28, 0, 1, 0, 0, 64, 1, 0, 0];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(&[8, 0, 0, 0, 0, 1, 0, 1]);
        p
    }

    fn json(packet: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        ioppytest::encode_packet(packet, "tun0", 1, &mut out);
        out
    }

    fn started(v4: &str) -> Vec<u8> {
        format!(r#"{{"ipv4_address":"{v4}","ipv4_netmask":"255.255.255.0","ipv4_network":"10.2.0.0","_api_version":"1.2.15"}}"#).into_bytes()
    }

    fn deliver(r: &mut Router, key: &str, user: Option<&str>, body: &[u8]) -> Vec<Action> {
        let mut out = Vec::new();
        r.on_delivery(key, user, body, Instant::now(), T0_NS, &mut out);
        out
    }

    fn published(actions: &[Action]) -> Vec<(&str, Form)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Publish { key, form, .. } => Some((key.as_str(), *form)),
                _ => None,
            })
            .collect()
    }

    fn native_batch(packets: &[&[u8]]) -> Vec<u8> {
        let mut w = BatchWriter::with_capacity(64 * 1024);
        w.reset(0);
        for p in packets {
            w.push(None, p).unwrap();
        }
        w.finish(1, T0_NS).to_vec()
    }

    #[test]
    fn an_old_packet_goes_to_its_link_peers_and_the_testing_tool_and_bridges_to_native() {
        let mut r = router();
        let p = ping([10, 2, 0, 1], [198, 18, 0, 9]);
        let a = deliver(&mut r, "fromAgent.agent_1.ip.tun.packet.raw", None, &json(&p));
        let keys = published(&a);
        assert_eq!(keys[..2], [("toAgent.agent_2.ip.tun.packet.raw", Form::Ioppytest), ("toAgent.agent_TT.ip.tun.packet.raw", Form::Ioppytest)]);
        let (key, form) = keys[2];
        let dst = "198.18.0.9".parse().unwrap();
        assert_eq!(route::Key::parse(key), Some(route::Key::Unicast { dst, shard: route::classify(&p).unwrap().shard }), "{key}");
        assert_eq!(form, Form::Native);
        // The bridged batch carries exactly the packet, stamped with the time given.
        let Action::Publish { body, .. } = &a[2] else { panic!() };
        let frame = v1::decode(body).unwrap();
        assert_eq!(frame.header().timestamp_ns, T0_NS);
        assert_eq!(frame.packets().map(|p| p.data.to_vec()).collect::<Vec<_>>(), [p]);
        assert_eq!((r.counters.json_in, r.counters.json_forwarded, r.counters.bridged_to_native), (1, 2, 1));
    }

    #[test]
    fn a_started_old_agent_is_bound_announced_and_served_from_native() {
        let mut r = router();
        let a = deliver(&mut r, "fromAgent.agent_2.ip.tun.started", None, &started("10.2.0.2"));
        assert_eq!(a, [Action::Bind(route::unicast_pattern("10.2.0.2".parse().unwrap())), Action::Announce]);
        assert!(r.bindings().contains(&route::unicast_pattern("10.2.0.2".parse().unwrap())));
        assert_eq!(r.hello("n", false).addresses, ["10.2.0.2/32".parse::<route::Prefix>().unwrap()]);
        // Learning the same again binds nothing new.
        assert!(deliver(&mut r, "fromAgent.agent_2.ip.tun.started", None, &started("10.2.0.2")).is_empty());
        assert_eq!(r.counters.agents_learned, 1);

        // A native batch for it becomes its JSON, checked byte for byte.
        let p = ping([198, 18, 0, 9], [10, 2, 0, 2]);
        let key = RoutingKey::unicast("10.2.0.2".parse().unwrap(), 0);
        let a = deliver(&mut r, key.as_str(), Some("h9"), &native_batch(&[&p]));
        let mut expect = Vec::new();
        ioppytest::encode_packet(&p, "tun0", T0_NS / 1_000_000_000, &mut expect);
        assert_eq!(a, [Action::Publish { key: "toAgent.agent_2.ip.tun.packet.raw".into(), form: Form::Ioppytest, body: expect }]);

        // And an old packet to it is not bridged back to native (agent_2 got the JSON copy).
        let a = deliver(&mut r, "fromAgent.agent_1.ip.tun.packet.raw", None, &json(&ping([10, 2, 0, 1], [10, 2, 0, 2])));
        assert!(published(&a).iter().all(|(_, f)| *f == Form::Ioppytest));
    }

    #[test]
    fn claims_of_strangers_and_of_native_addresses_are_refused() {
        let mut r = router();
        assert!(deliver(&mut r, "fromAgent.mallory.ip.tun.started", None, &started("10.2.0.7")).is_empty());
        assert_eq!(r.counters.refused_claims, 1);
        let hello = br#"{"name":"h1","addresses":["10.2.0.2/24"],"queues":1,"wire":"v1","started_unix_ms":0,"interface":"tb0","version":"x"}"#;
        assert!(deliver(&mut r, RoutingKey::hello("h1").unwrap().as_str(), Some("h1"), hello).is_empty());
        assert!(deliver(&mut r, "fromAgent.agent_2.ip.tun.started", None, &started("10.2.0.2")).is_empty());
        assert_eq!(r.counters.refused_claims, 2);
        assert_eq!(r.counters.agents_learned, 0);
        // Once h1 says bye, the address may be learned.
        assert!(deliver(&mut r, RoutingKey::bye("h1").unwrap().as_str(), Some("h1"), hello).is_empty());
        assert_eq!(deliver(&mut r, "fromAgent.agent_2.ip.tun.started", None, &started("10.2.0.2")).len(), 2);
    }

    #[test]
    fn floods_reach_every_old_agent_but_the_routers_own_are_ignored() {
        let mut r = router();
        deliver(&mut r, "fromAgent.agent_1.ip.tun.started", None, &started("10.2.0.1"));
        deliver(&mut r, "fromAgent.agent_2.ip.tun.started", None, &started("10.2.0.2"));
        let bcast = ping([198, 18, 0, 9], [255, 255, 255, 255]);
        let batch = native_batch(&[&bcast]);
        let a = deliver(&mut r, RoutingKey::all("h9").unwrap().as_str(), Some("h9"), &batch);
        assert_eq!(published(&a), [("toAgent.agent_1.ip.tun.packet.raw", Form::Ioppytest), ("toAgent.agent_2.ip.tun.packet.raw", Form::Ioppytest)]);
        assert!(deliver(&mut r, RoutingKey::all(ROUTER_SENDER).unwrap().as_str(), Some("router"), &batch).is_empty());
        assert_eq!(deliver(&mut r, route::CTL_PROBE, Some("h9"), b"{}"), [Action::Announce]);
    }

    /// Serial probes on the old wire: a frame goes to the sender's link peers and the
    /// testing tool in the router's injection shape, and to native radios as a marked flood;
    /// a native radio flood goes to every old probe heard, never to old IP agents.
    #[test]
    fn radio_frames_go_to_link_peers_and_between_wires() {
        let mut r = router();
        let frame = [0x41u8, 0x88, 0xc0, 0xdb, 0x01];
        let mut body = Vec::new();
        serial::encode_frame(&frame, 1, &mut body);
        let a = deliver(&mut r, "fromAgent.agent_1.802154.serial.packet.raw", None, &body);
        assert_eq!(
            published(&a),
            [
                ("toAgent.agent_2.802154.serial.packet.raw", Form::Ioppytest),
                ("toAgent.agent_TT.802154.serial.packet.raw", Form::Ioppytest),
                ("tunbus.v1.all.tunbus-router", Form::Native)
            ]
        );
        let Action::Publish { body: inject, .. } = &a[0] else { panic!("a publish") };
        let mut got = Vec::new();
        serial::decode_frame(inject, 127, &mut got).unwrap();
        assert_eq!(got, frame);
        assert!(!String::from_utf8_lossy(inject).contains("data_slip"), "the router's shape");
        let Action::Publish { body: batch, .. } = &a[2] else { panic!("a publish") };
        let f = v1::decode(batch).unwrap();
        assert_eq!(crate::port::Layer::of_frame_flags(f.header().flags), crate::port::Layer::Ieee802154);
        assert_eq!(f.packets().next().map(|p| p.data), Some(&frame[..]));
        // An old IP agent and a native radio flood: only the probe gets it.
        deliver(&mut r, "fromAgent.agent_2.ip.tun.started", None, &started("10.2.0.2"));
        let a = deliver(&mut r, RoutingKey::all("mote9").unwrap().as_str(), Some("mote9"), batch);
        assert_eq!(published(&a), [("toAgent.agent_1.802154.serial.packet.raw", Form::Ioppytest)]);
        assert_eq!((r.counters.frames_in, r.counters.frames_forwarded, r.counters.frames_bridged_to_native, r.counters.frames_bridged_to_old), (1, 2, 1, 1));
        assert!(deliver(&mut r, "fromAgent.agent_1.802154.serial.packet.raw", None, br#"{"data": []}"#).is_empty());
        // A stranger's frame is counted, and it never becomes a radio the router serves.
        let a = deliver(&mut r, "fromAgent.stranger.802154.serial.packet.raw", None, &body);
        assert_eq!(published(&a), [("tunbus.v1.all.tunbus-router", Form::Native)]);
        assert_eq!((r.counters.unknown_sender, r.radios.len()), (1, 1));
    }

    #[test]
    fn malformed_input_is_counted_and_produces_nothing() {
        let mut r = router();
        assert!(deliver(&mut r, "fromAgent.agent_1.ip.tun.packet.raw", None, b"{not json").is_empty());
        assert!(deliver(&mut r, "fromAgent.agent_1.ip.tun.started", None, b"{\"ipv4_address\":").is_empty());
        assert!(deliver(&mut r, RoutingKey::all("h9").unwrap().as_str(), Some("h9"), b"\x00\x01garbage").is_empty());
        assert!(deliver(&mut r, "no.such.key", None, b"").is_empty());
        assert_eq!((r.counters.malformed_json, r.counters.malformed_native), (2, 1));
        // A native packet for nobody is counted as such.
        let a = deliver(&mut r, RoutingKey::all("h9").unwrap().as_str(), Some("h9"), &native_batch(&[&ping([198, 18, 0, 9], [255, 255, 255, 255])]));
        assert!(a.is_empty());
        assert_eq!(r.counters.no_old_owner, 1);
    }
}
