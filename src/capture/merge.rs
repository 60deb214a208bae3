//! The merged capture of a bus: what each message on the session's exchange carries,
//! attributed to its sender and written packet by packet. Pure: deliveries in (routing
//! key, broker-checked user, body, time of arrival), packets out into a [`Recorder`].
//!
//! - Hellos (`tunbus.v1.ctl.hello.<name>`) say who owns which addresses: each sending
//!   agent gets an interface of its own, named after it, with its addresses.
//! - A v1 batch's packets are stamped with the sender's frame timestamp (when it published
//!   them, which is what receivers see) and commented with sender, routing key and batch
//!   sequence; its sender is the agent that owns the first packet's source address, unless
//!   the broker user that published it belongs to another agent alone (a provisioned
//!   session, where the broker vouches for `user_id`: a spoofer is named, not its victim).
//! - An ioppytest JSON packet (`fromAgent.<name>.ip.tun.packet.raw`) is its agent's,
//!   stamped when it arrived (the old wire carries no finer time); the agent's
//!   `fromAgent.<name>.ip.tun.started` gives its interface its addresses.
//! - In a session where `agent route` bridges old agents to native ones, the router
//!   republishes each old agent's packet as a v1 batch: the same packet twice on the bus.
//!   A packet without a virtio header (as the router writes them) that is byte for byte one
//!   of the last [`RECENT_JSON`] JSON packets is that copy, left out and counted
//!   (`bridged`), so a trace shows each packet once, under the old agent that sent it.
//! - Super-packets are cut into the wire-sized packets they stand for (`codec::segment`)
//!   unless told not to, so a trace reads like one taken on a real link.
//! - A batch from a sender no hello has named yet (a capture started while traffic flows
//!   hears the hellos a moment later) is held, up to [`HOLD_UNNAMED`], until one does, then
//!   written under its agent's interface; after that, under `unknown-<source address>`.
//!   An old agent's first JSON packets wait the same way for its `ip.tun.started`.
//! - An L2 session's batches of Ethernet frames go on one Ethernet interface per agent
//!   (link type 1): the sender is the flood key's last word, or for a frame sent to one MAC
//!   the agent whose hello announced its source MAC (`macs`); held like a batch above
//!   until a hello names it. Super-frames are cut behind copies of their Ethernet header.
//! - Loss: each publishing link numbers its batches (the top 16 bits of the sequence name
//!   the link, `docs/wire-format.md`); a gap is batches the tap queue dropped.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::io;
use std::net::IpAddr;

use crate::amqp::presence::{Hello, HelloWire};
use crate::codec::ioppytest::{self, addressing::OldAddressing};
use crate::codec::segment::Segmenter;
use crate::codec::v1;
use crate::codec::vnet::is_gso;
use crate::packet::ethernet::{ethertype, EthernetFrame, Mac};
use crate::route::{self, Key, RoutingKey};

/// Where the packets go (a pcapng file, a classic pcap for ioppytest).
pub trait Recorder {
    /// A new interface; returns its id.
    fn interface(&mut self, name: &str, description: &str, addrs: &[(IpAddr, u8)]) -> io::Result<u32>;
    /// One packet on interface `iface`, at `timestamp_ns` since the UNIX epoch.
    fn packet(&mut self, iface: u32, timestamp_ns: u64, data: &[u8], comment: Option<&str>) -> io::Result<()>;
    /// Pushes what is buffered to the file.
    fn flush(&mut self) -> io::Result<()>;
    /// A new interface of another link type (IEEE 802.15.4 frames: 230 without FCS, 195
    /// with; Ethernet: 1); `None` when this recorder has one link type only (its frames
    /// are left out).
    fn link_interface(&mut self, _name: &str, _description: &str, _linktype: u16) -> io::Result<Option<u32>> {
        Ok(None)
    }
}

/// How long a batch from a sender without a hello waits for one (by arrival time).
pub const HOLD_UNNAMED_NS: u64 = 2_000_000_000;
/// How long, as a `Duration`, for the documentation.
pub const HOLD_UNNAMED: std::time::Duration = std::time::Duration::from_nanos(HOLD_UNNAMED_NS);
/// Most bytes of such batches held.
pub const HOLD_MAX_BYTES: usize = 64 << 20;

/// How many of the last JSON packets are remembered to recognise the router's copies.
pub const RECENT_JSON: usize = 4096;

/// A batch waiting for its sender's hello.
struct Held {
    routing_key: String,
    user_id: Option<String>,
    body: Vec<u8>,
    at_ns: u64,
}

/// Which packets are kept.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Sent by, or addressed to, one of these agents (empty: any).
    pub agents: Vec<String>,
    /// With one of these as source or destination (empty: any).
    pub addresses: Vec<IpAddr>,
    /// Keep super-packets whole.
    pub no_segment: bool,
    /// 802.15.4 frames end with their FCS (`--fcs`): written as
    /// `LINKTYPE_IEEE802_15_4_WITHFCS`, else `_NOFCS` (docs/decisions/0024).
    pub radio_fcs: bool,
}

/// What the capture counted.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    /// Messages carrying packets (batches and JSON packets).
    pub messages: u64,
    /// Packets written.
    pub packets: u64,
    /// Super-packets cut, and the packets they gave.
    pub super_packets: u64,
    pub segments: u64,
    /// Packets the filter left out.
    pub filtered: u64,
    /// Batches missing from a link's sequence: the tap queue overflowed.
    pub lost_batches: u64,
    /// Messages that do not decode.
    pub malformed: u64,
    /// Packets left out as the ioppytest router's copies of old agents' JSON packets.
    pub bridged: u64,
    /// Packets that reached the capture too late to be put in timestamp order
    /// ([`super::reorder`]).
    pub late: u64,
    /// Agents that have an interface in the file.
    pub agents: u64,
    /// IEEE 802.15.4 frames written (also counted in `packets`).
    pub radio_frames: u64,
    /// Ethernet frames written, an L2 session's (also counted in `packets`).
    pub ethernet_frames: u64,
    /// End-to-end sealed batches opened with `--keys`, and those no key opened (or no
    /// `--keys` given): their packets are not in the file.
    pub opened: u64,
    pub sealed: u64,
}

/// What a hello (or an old agent's `ip.tun.started`) said.
#[derive(Clone, Debug, Default)]
struct Agent {
    addrs: Vec<(IpAddr, u8)>,
    user: Option<String>,
    iface: Option<u32>,
    /// An ioppytest agent (JSON packets).
    old_wire: bool,
}

/// The last JSON packets, by a hash of their bytes: which of them a batch repeats.
#[derive(Default)]
struct Recent {
    order: VecDeque<u64>,
    count: HashMap<u64, u32>,
}

impl Recent {
    fn hash(packet: &[u8]) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        packet.hash(&mut h);
        h.finish()
    }

    fn note(&mut self, packet: &[u8]) {
        if self.order.len() == RECENT_JSON {
            if let Some(old) = self.order.pop_front() {
                self.forget(old);
            }
        }
        let h = Self::hash(packet);
        self.order.push_back(h);
        *self.count.entry(h).or_default() += 1;
    }

    fn forget(&mut self, h: u64) {
        if let Some(n) = self.count.get_mut(&h) {
            *n -= 1;
            if *n == 0 {
                self.count.remove(&h);
            }
        }
    }

    /// Whether `packet` is one of the last JSON packets; if so it is used up (each JSON
    /// packet has one bridged copy).
    fn take(&mut self, packet: &[u8]) -> bool {
        if self.count.is_empty() {
            return false;
        }
        let h = Self::hash(packet);
        let seen = self.count.contains_key(&h);
        if seen {
            self.forget(h);
            if let Some(i) = self.order.iter().position(|x| *x == h) {
                self.order.remove(i);
            }
        }
        seen
    }
}

/// The merge in progress.
pub struct Merge {
    filter: Filter,
    agents: HashMap<String, Agent>,
    /// Address → agent name.
    owners: HashMap<IpAddr, String>,
    /// Broker user → agent name (`None`: more than one agent logs in as that user, as
    /// in a trusting session where all are `guest`).
    users: HashMap<String, Option<String>>,
    /// Interfaces of senders without a hello, by name.
    strangers: HashMap<String, u32>,
    /// (sender, link) → last sequence number seen.
    streams: HashMap<(String, u16), u64>,
    segmenter: Segmenter,
    json: Vec<u8>,
    comment: String,
    counts: Counts,
    /// Batches whose sender is not named yet, in arrival order.
    held: VecDeque<Held>,
    held_bytes: usize,
    /// The last old agents' packets, to leave out the router's copies of them.
    recent_json: Recent,
    /// Each radio's interface (`None`: the recorder takes no radio frames).
    radios: HashMap<String, Option<u32>>,
    /// Each L2 agent's Ethernet interface (`None`: the recorder takes raw IP only).
    ethernets: HashMap<String, Option<u32>>,
    /// MAC → L2 agent, from hellos (`macs`: its TAP's, then those behind its bridge).
    mac_owners: HashMap<Mac, String>,
    /// `--keys DIR`: the session keys that open sealed batches.
    keys: Option<crate::e2e::keylog::KeyRing>,
}

impl Merge {
    pub fn new(filter: Filter) -> Merge {
        Merge {
            filter,
            agents: HashMap::new(),
            owners: HashMap::new(),
            users: HashMap::new(),
            strangers: HashMap::new(),
            streams: HashMap::new(),
            segmenter: Segmenter::new(),
            json: Vec::new(),
            comment: String::new(),
            counts: Counts::default(),
            held: VecDeque::new(),
            held_bytes: 0,
            recent_json: Recent::default(),
            radios: HashMap::new(),
            ethernets: HashMap::new(),
            mac_owners: HashMap::new(),
            keys: None,
        }
    }

    /// Opens end-to-end sealed batches with the keys of `ring` (`agent capture --keys`).
    pub fn with_keys(self, ring: crate::e2e::keylog::KeyRing) -> Merge {
        Merge { keys: Some(ring), ..self }
    }

    /// A sealed batch's v1 frame, when a key of `--keys` opens it (else counted).
    fn open_sealed(&mut self, routing_key: &str, body: &[u8]) -> Option<Vec<u8>> {
        let mut frame = Vec::new();
        let opened = self.keys.as_mut().is_some_and(|ring| ring.open(routing_key.as_bytes(), body, &mut frame));
        if opened {
            self.counts.opened += 1;
            Some(frame)
        } else {
            self.counts.sealed += 1;
            None
        }
    }

    pub fn counts(&self) -> &Counts {
        &self.counts
    }

    /// One delivery, arrived at `now_ns`.
    pub fn on_delivery(&mut self, routing_key: &str, user_id: Option<&str>, body: &[u8], now_ns: u64, recorder: &mut dyn Recorder) -> io::Result<()> {
        self.expire(now_ns, recorder)?;
        if let Some(ioppytest::serial::SerialKey::FromAgent { name }) = ioppytest::serial::parse_key(routing_key) {
            return self.on_json_frame(name, body, now_ns, recorder);
        }
        // An end-to-end sealed batch (`--e2e`) is opened first, when the keys allow.
        let opened;
        let body = if crate::e2e::seal::is_sealed(body) {
            match self.open_sealed(routing_key, body) {
                Some(frame) => {
                    opened = frame;
                    &opened[..]
                }
                None => return Ok(()),
            }
        } else {
            body
        };
        let wait = match ioppytest::parse_from_agent(routing_key) {
            Some(ioppytest::FromAgent::Packet { name }) => {
                let wait = self.with_json(body, |m, packet| {
                    m.recent_json.note(packet); // now: the router's copy follows at once
                    m.on_json(name, packet, now_ns, recorder, true)
                });
                match wait {
                    Some(wait) => wait?,
                    None => {
                        self.counts.malformed += 1;
                        false
                    }
                }
            }
            Some(ioppytest::FromAgent::Started { name }) => {
                self.on_started(name, body);
                return self.release_ready(recorder);
            }
            None => match Key::parse(routing_key) {
                Some(Key::Hello { .. }) => {
                    self.on_hello(body, user_id);
                    return self.release_ready(recorder);
                }
                Some(Key::Unicast { .. } | Key::All { .. }) => self.on_batch(routing_key, user_id, body, recorder, true)?,
                None if RoutingKey::parse_mac(routing_key).is_some() => self.on_batch(routing_key, user_id, body, recorder, true)?,
                _ => false,
            },
        };
        if wait {
            self.held_bytes += body.len();
            self.held.push_back(Held { routing_key: routing_key.to_owned(), user_id: user_id.map(str::to_owned), body: body.to_vec(), at_ns: now_ns });
        }
        Ok(())
    }

    /// Writes what is still held, under `unknown-…` (the capture is ending).
    pub fn finish(&mut self, recorder: &mut dyn Recorder) -> io::Result<()> {
        self.expire(u64::MAX, recorder)
    }

    /// Decodes an old agent's JSON body into the reused buffer and hands the packet to
    /// `f`; `None` when the body does not decode.
    fn with_json<T>(&mut self, body: &[u8], f: impl FnOnce(&mut Merge, &[u8]) -> T) -> Option<T> {
        let mut json = std::mem::take(&mut self.json);
        let result = ioppytest::decode_packet(body, &mut json).ok().map(|()| f(self, &json));
        self.json = json;
        result
    }

    /// Writes a held message now, or (when `may_hold`) returns `true` if it must wait on.
    fn replay(&mut self, h: &Held, recorder: &mut dyn Recorder, may_hold: bool) -> io::Result<bool> {
        match ioppytest::parse_from_agent(&h.routing_key) {
            // One that does not decode was counted when it arrived, and never held.
            Some(ioppytest::FromAgent::Packet { name }) => {
                self.with_json(&h.body, |m, packet| m.on_json(name, packet, h.at_ns, recorder, may_hold)).unwrap_or(Ok(false))
            }
            _ => self.on_batch(&h.routing_key, h.user_id.as_deref(), &h.body, recorder, may_hold),
        }
    }

    /// Writes the held messages that waited longer than [`HOLD_UNNAMED`] (or beyond the
    /// byte bound), as they are; then those this made writable (the same sender's).
    fn expire(&mut self, now_ns: u64, recorder: &mut dyn Recorder) -> io::Result<()> {
        let mut wrote = false;
        while let Some(h) = self.held.front() {
            if h.at_ns.saturating_add(HOLD_UNNAMED_NS) > now_ns && self.held_bytes <= HOLD_MAX_BYTES {
                break;
            }
            let Some(h) = self.held.pop_front() else { break };
            self.held_bytes -= h.body.len();
            self.replay(&h, recorder, false)?;
            wrote = true;
        }
        if wrote {
            self.release_ready(recorder)?;
        }
        Ok(())
    }

    /// A hello, an `ip.tun.started` or an expiry named a sender: the held messages that
    /// can be written now are, in arrival order.
    fn release_ready(&mut self, recorder: &mut dyn Recorder) -> io::Result<()> {
        if self.held.is_empty() {
            return Ok(());
        }
        let held = std::mem::take(&mut self.held);
        for h in held {
            if self.replay(&h, recorder, true)? {
                self.held.push_back(h);
            } else {
                self.held_bytes -= h.body.len();
            }
        }
        Ok(())
    }

    fn on_hello(&mut self, body: &[u8], user_id: Option<&str>) {
        let Ok(hello) = serde_json::from_slice::<Hello>(body) else { return };
        if hello.leaving {
            return; // its packets in flight are still its own
        }
        let addrs: Vec<(IpAddr, u8)> = hello.addresses.iter().map(|p| (p.addr, p.len)).collect();
        for (ip, _) in &addrs {
            if hello.wire == HelloWire::Router {
                self.owners.entry(*ip).or_insert_with(|| hello.name.to_string());
            // an old agent's own say wins
            } else {
                self.owners.insert(*ip, hello.name.to_string());
            }
        }
        if let Some(u) = user_id {
            let name = Some(hello.name.to_string());
            let entry = self.users.entry(u.to_owned()).or_insert_with(|| name.clone());
            if *entry != name {
                *entry = None;
            }
        }
        for mac in &hello.macs {
            self.mac_owners.insert(*mac, hello.name.to_string());
        }
        let entry = self.agents.entry(hello.name.into()).or_default();
        entry.addrs = addrs;
        entry.user = user_id.map(str::to_owned);
    }

    /// An old agent said which addresses it has (`ip.tun.started`): they go on its
    /// interface (when its first packet has not created it yet), and name it as their
    /// owner (before the router, which claims them on its behalf).
    fn on_started(&mut self, name: &str, body: &[u8]) {
        let Ok(started) = serde_json::from_slice::<ioppytest::TunStarted>(body) else { return };
        let old = OldAddressing::from_started(&started);
        let mut addrs: Vec<(IpAddr, u8)> = old.prefixes().iter().map(|p| (p.addr, p.len)).collect();
        addrs.extend(old.link_local().map(|ll| (IpAddr::V6(ll), 64)));
        for (ip, _) in &addrs {
            self.owners.insert(*ip, name.to_owned());
        }
        let entry = self.agents.entry(name.to_owned()).or_default();
        entry.old_wire = true;
        if entry.iface.is_none() {
            entry.addrs = addrs;
        }
    }

    /// The interface of agent `name` (created on its first packet), or of a stranger.
    fn iface(&mut self, name: &str, recorder: &mut dyn Recorder) -> io::Result<u32> {
        if let Some(agent) = self.agents.get_mut(name) {
            if let Some(i) = agent.iface {
                return Ok(i);
            }
            let description = match (&agent.user, agent.old_wire) {
                (_, true) => format!("ioppytest agent {name} (JSON wire)"),
                (Some(u), false) => format!("tunbus agent {name} (broker user {u})"),
                (None, false) => format!("tunbus agent {name}"),
            };
            let i = recorder.interface(name, &description, &agent.addrs)?;
            agent.iface = Some(i);
            self.counts.agents += 1;
            return Ok(i);
        }
        if let Some(i) = self.strangers.get(name) {
            return Ok(*i);
        }
        let i = recorder.interface(name, "a sender without a hello (yet)", &[])?;
        self.strangers.insert(name.to_owned(), i);
        self.counts.agents += 1;
        Ok(i)
    }

    /// Who sent a batch, when a hello says: the agent that owns its first packet's source
    /// address, unless the broker user that published it is another agent's own (a
    /// provisioned session, where the broker vouches for `user_id`): then that agent.
    fn named_sender(&self, user_id: Option<&str>, first: Option<&[u8]>) -> Option<String> {
        let owner = self.owners.get(&first.and_then(route::source)?)?;
        let by_user = user_id.and_then(|u| self.users.get(u)).and_then(Option::as_ref);
        match by_user {
            Some(publisher) if publisher != owner && self.agents.get(owner).and_then(|a| a.user.as_deref()) != user_id => Some(publisher.clone()),
            _ => Some(owner.clone()),
        }
    }

    /// The name of a sender no hello named: its source address.
    fn unnamed_sender(first: Option<&[u8]>) -> String {
        match first.and_then(route::source) {
            Some(ip) => format!("unknown-{ip}"),
            None => "unknown".to_owned(),
        }
    }

    /// Whether the filter keeps a packet of `sender`.
    fn keeps(&self, sender: &str, packet: &[u8]) -> bool {
        let f = &self.filter;
        let (src, dst) = (route::source(packet), route::destination(packet));
        let agent_ok = f.agents.is_empty() || f.agents.iter().any(|a| a == sender || dst.and_then(|d| self.owners.get(&d)).is_some_and(|o| o == a));
        let addr_ok = f.addresses.is_empty() || f.addresses.iter().any(|a| Some(*a) == src || Some(*a) == dst);
        agent_ok && addr_ok
    }

    /// Writes a batch; or, when `may_hold` and no hello names its sender yet, writes
    /// nothing and returns `true` (the caller holds it).
    fn on_batch(&mut self, routing_key: &str, user_id: Option<&str>, body: &[u8], recorder: &mut dyn Recorder, may_hold: bool) -> io::Result<bool> {
        let Ok(frame) = v1::decode(body) else {
            self.counts.malformed += 1;
            return Ok(false);
        };
        match crate::port::Layer::of_frame_flags(frame.header().flags) {
            crate::port::Layer::Ip => {}
            crate::port::Layer::Ieee802154 => {
                self.on_radio_batch(routing_key, &frame, recorder)?;
                return Ok(false);
            }
            crate::port::Layer::Ethernet => return self.on_ethernet_batch(routing_key, user_id, &frame, recorder, may_hold),
        }
        let first = frame.packets().next().map(|p| p.data);
        let sender = match self.named_sender(user_id, first) {
            Some(name) => name,
            None if may_hold => return Ok(true),
            None => Self::unnamed_sender(first),
        };
        self.counts.messages += 1;
        let header = frame.header();
        self.account(&sender, header.seq);
        let iface = self.iface(&sender, recorder)?;
        for p in frame.packets() {
            if p.vnet.is_none() && self.recent_json.take(p.data) {
                self.counts.bridged += 1;
                continue;
            }
            if !self.keeps(&sender, p.data) {
                self.counts.filtered += 1;
                continue;
            }
            self.comment.clear();
            use std::fmt::Write;
            let _ = write!(self.comment, "from {sender} key {routing_key} batch {}", header.seq & LINK_SEQ_MASK);
            self.write(iface, header.timestamp_ns, p.vnet, p.data, false, recorder)?;
        }
        Ok(false)
    }

    /// Writes an old agent's packet (decoded from its JSON), stamped `at_ns` (when it
    /// arrived); or, when `may_hold` and nothing says the agent's addresses yet (its
    /// `ip.tun.started` may come a moment after its first packet: another connection),
    /// writes nothing and returns `true` (the caller holds it).
    fn on_json(&mut self, name: &str, packet: &[u8], at_ns: u64, recorder: &mut dyn Recorder, may_hold: bool) -> io::Result<bool> {
        let known = match self.agents.get_mut(name) {
            Some(agent) => {
                agent.old_wire = true;
                agent.iface.is_some() || !agent.addrs.is_empty()
            }
            None => {
                self.agents.insert(name.to_owned(), Agent { old_wire: true, ..Agent::default() });
                false
            }
        };
        if may_hold && !known {
            return Ok(true);
        }
        self.counts.messages += 1;
        if !self.keeps(name, packet) {
            self.counts.filtered += 1;
            return Ok(false);
        }
        let iface = self.iface(name, recorder)?;
        self.comment.clear();
        self.comment.push_str("from ");
        self.comment.push_str(name);
        self.comment.push_str(" key fromAgent (ioppytest JSON)");
        self.write(iface, at_ns, None, packet, false, recorder)?;
        Ok(false)
    }

    /// The interface of radio `name`, made on its first frame.
    fn radio_iface(&mut self, name: &str, description: &str, recorder: &mut dyn Recorder) -> io::Result<Option<u32>> {
        if let Some(i) = self.radios.get(name) {
            return Ok(*i);
        }
        let linktype = crate::capture::pcapng::ieee802154_linktype(self.filter.radio_fcs);
        let i = recorder.link_interface(name, description, linktype)?;
        if i.is_some() {
            self.counts.agents += 1;
        }
        self.radios.insert(name.to_owned(), i);
        Ok(i)
    }

    /// Whether the filter keeps a frame of radio `sender` (frames have no IP addresses).
    fn keeps_radio(&self, sender: &str) -> bool {
        let f = &self.filter;
        (f.agents.is_empty() || f.agents.iter().any(|a| a == sender)) && f.addresses.is_empty()
    }

    /// A native radio flood: its sender is the flood key's last word (`tunbus.v1.all.<sender>`);
    /// one 802.15.4 interface per radio. The router's re-emissions of old probes' frames
    /// are left out (each is in the file once, from its probe).
    fn on_radio_batch(&mut self, routing_key: &str, frame: &v1::Frame<'_>, recorder: &mut dyn Recorder) -> io::Result<()> {
        let sender = match Key::parse(routing_key) {
            Some(Key::All { sender }) => sender.to_owned(),
            _ => "unknown-radio".to_owned(),
        };
        self.counts.messages += 1;
        let header = frame.header();
        self.account(&sender, header.seq);
        let from_router = sender == crate::interop::router::ROUTER_SENDER;
        for p in frame.packets() {
            if from_router && self.recent_json.take(p.data) {
                self.counts.bridged += 1;
                continue;
            }
            if !self.keeps_radio(&sender) {
                self.counts.filtered += 1;
                continue;
            }
            let Some(iface) = self.radio_iface(&sender, "tunbus 802.15.4 radio", recorder)? else {
                self.counts.filtered += 1;
                continue;
            };
            self.comment.clear();
            use std::fmt::Write;
            let _ = write!(self.comment, "from {sender} key {routing_key} batch {}", header.seq & LINK_SEQ_MASK);
            self.counts.packets += 1;
            self.counts.radio_frames += 1;
            recorder.packet(iface, header.timestamp_ns, p.data, Some(&self.comment))?;
        }
        Ok(())
    }

    /// A batch of Ethernet frames (an L2 session). Its sender is the flood key's last word;
    /// for a frame sent to one MAC (`tunbus.v1.mac-<hex>.<shard>`, a key naming the
    /// receiver) the agent whose hello announced the first frame's source MAC, else the one
    /// agent that logs in as the broker user that published it; else, when `may_hold`,
    /// the batch waits for a hello (returns `true`), or goes under `unknown-<source MAC>`.
    /// One Ethernet interface per agent; super-frames are cut as super-packets are.
    fn on_ethernet_batch(
        &mut self,
        routing_key: &str,
        user_id: Option<&str>,
        frame: &v1::Frame<'_>,
        recorder: &mut dyn Recorder,
        may_hold: bool,
    ) -> io::Result<bool> {
        let first_src = frame.packets().next().and_then(|p| EthernetFrame::new_checked(p.data).ok()).map(|f| f.src());
        let named = match Key::parse(routing_key) {
            Some(Key::All { sender }) => Some(sender.to_owned()),
            _ => first_src.and_then(|m| self.mac_owners.get(&m).cloned()).or_else(|| user_id.and_then(|u| self.users.get(u)).cloned().flatten()),
        };
        let sender = match named {
            Some(name) => name,
            None if may_hold => return Ok(true),
            None => first_src.map_or_else(|| "unknown-frame".to_owned(), |m| format!("unknown-{m}")),
        };
        self.counts.messages += 1;
        let header = frame.header();
        self.account(&sender, header.seq);
        for p in frame.packets() {
            if !self.keeps_frame(&sender, p.data) {
                self.counts.filtered += 1;
                continue;
            }
            let Some(iface) = self.ethernet_iface(&sender, recorder)? else {
                self.counts.filtered += 1;
                continue;
            };
            self.comment.clear();
            use std::fmt::Write;
            let _ = write!(self.comment, "from {sender} key {routing_key} batch {}", header.seq & LINK_SEQ_MASK);
            let before = self.counts.packets;
            self.write(iface, header.timestamp_ns, p.vnet, p.data, true, recorder)?;
            self.counts.ethernet_frames += self.counts.packets - before;
        }
        Ok(false)
    }

    /// The Ethernet interface of L2 agent `name`, made on its first frame.
    fn ethernet_iface(&mut self, name: &str, recorder: &mut dyn Recorder) -> io::Result<Option<u32>> {
        if let Some(i) = self.ethernets.get(name) {
            return Ok(*i);
        }
        let description = match self.agents.get(name).and_then(|a| a.user.as_deref()) {
            Some(u) => format!("tunbus L2 agent {name} (broker user {u})"),
            None => format!("tunbus L2 agent {name}"),
        };
        let i = recorder.link_interface(name, &description, crate::capture::pcapng::LINKTYPE_ETHERNET)?;
        if i.is_some() {
            self.counts.agents += 1;
        }
        self.ethernets.insert(name.to_owned(), i);
        Ok(i)
    }

    /// Whether the filter keeps a frame of L2 agent `sender`: by agent, the sender or the
    /// owner of the destination MAC; by address, the IP packet the frame carries (a frame
    /// without one is left out when addresses are asked for).
    fn keeps_frame(&self, sender: &str, data: &[u8]) -> bool {
        let f = &self.filter;
        let frame = EthernetFrame::new_checked(data).ok();
        let to = frame.as_ref().and_then(|e| self.mac_owners.get(&e.dst()));
        let agent_ok = f.agents.is_empty() || f.agents.iter().any(|a| a == sender || to.is_some_and(|o| o == a));
        let ip = frame.as_ref().filter(|e| matches!(e.ethertype(), ethertype::IPV4 | ethertype::IPV6)).map(|e| e.payload());
        let (src, dst) = (ip.and_then(route::source), ip.and_then(route::destination));
        let addr_ok = f.addresses.is_empty() || f.addresses.iter().any(|a| Some(*a) == src || Some(*a) == dst);
        agent_ok && addr_ok
    }

    /// An old-wire probe's frame (`fromAgent.<name>.802154.serial.packet.raw`), stamped when
    /// it arrived.
    fn on_json_frame(&mut self, name: &str, body: &[u8], now_ns: u64, recorder: &mut dyn Recorder) -> io::Result<()> {
        let mut frame = std::mem::take(&mut self.json);
        let decoded = ioppytest::serial::decode_frame(body, usize::from(u16::MAX), &mut frame);
        let result = match decoded {
            Err(_) => {
                self.counts.malformed += 1;
                Ok(())
            }
            Ok(()) => {
                self.counts.messages += 1;
                self.recent_json.note(&frame); // the router's flood of it follows
                if !self.keeps_radio(name) {
                    self.counts.filtered += 1;
                    Ok(())
                } else {
                    match self.radio_iface(name, "ioppytest serial probe (JSON wire)", recorder) {
                        Ok(Some(iface)) => {
                            self.comment.clear();
                            self.comment.push_str("from ");
                            self.comment.push_str(name);
                            self.comment.push_str(" key fromAgent (ioppytest serial JSON)");
                            self.counts.packets += 1;
                            self.counts.radio_frames += 1;
                            recorder.packet(iface, now_ns, &frame, Some(&self.comment))
                        }
                        Ok(None) => {
                            self.counts.filtered += 1;
                            Ok(())
                        }
                        Err(e) => Err(e),
                    }
                }
            }
        };
        self.json = frame;
        result
    }

    /// Writes one packet (or, when `frame`, one Ethernet frame), cut into wire-sized ones
    /// when it is a super-packet (a super-frame: behind copies of its Ethernet header).
    fn write(&mut self, iface: u32, ts: u64, vnet: Option<&[u8; v1::VNET_HDR_LEN]>, data: &[u8], frame: bool, recorder: &mut dyn Recorder) -> io::Result<()> {
        let comment = self.comment.as_str();
        let gso = vnet.is_some_and(is_gso);
        if self.filter.no_segment || vnet.is_none() {
            self.counts.packets += 1;
            return recorder.packet(iface, ts, data, Some(comment));
        }
        let mut result = Ok(());
        let mut written = 0u64;
        let mut out = |seg: &[u8]| {
            if result.is_ok() {
                result = recorder.packet(iface, ts, seg, Some(comment));
                written += 1;
            }
        };
        let cut = if frame { self.segmenter.frame_segments(vnet, data, &mut out) } else { self.segmenter.segments(vnet, data, &mut out) };
        result?;
        if cut.is_err() {
            recorder.packet(iface, ts, data, Some(comment))?;
        }
        self.count_cut(cut.is_ok(), gso, written);
        Ok(())
    }

    /// Counts what a cut wrote; one that failed (its headers do not say how) is written
    /// as it came, one packet.
    fn count_cut(&mut self, cut: bool, gso: bool, written: u64) {
        if !cut {
            self.counts.packets += 1;
            return;
        }
        self.counts.packets += written;
        if gso {
            self.counts.super_packets += 1;
            self.counts.segments += written;
        }
    }

    /// Notes batch `seq` of `sender`'s link: a jump forward is batches lost.
    fn account(&mut self, sender: &str, seq: u64) {
        let link = (seq >> LINK_SHIFT) as u16;
        let n = seq & LINK_SEQ_MASK;
        match self.streams.get_mut(&(sender.to_owned(), link)) {
            Some(last) => {
                if n > *last {
                    self.counts.lost_batches += n - *last - 1;
                }
                // Lower: the agent restarted (a new count), or reordering; no loss counted.
                *last = n;
            }
            None => {
                self.streams.insert((sender.to_owned(), link), n);
            }
        }
    }
}

/// Where the link's number starts in a batch sequence number.
pub const LINK_SHIFT: u32 = 48;
/// The batch count of one link.
pub const LINK_SEQ_MASK: u64 = (1 << LINK_SHIFT) - 1;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::v1::{FrameHeader, Packet};

    /// A recorder that keeps what it is given.
    #[derive(Default)]
    struct Kept {
        interfaces: Vec<String>,
        packets: Vec<(u32, u64, Vec<u8>, String)>,
    }

    impl Recorder for Kept {
        fn interface(&mut self, name: &str, _d: &str, _a: &[(IpAddr, u8)]) -> io::Result<u32> {
            self.interfaces.push(name.to_owned());
            Ok(self.interfaces.len() as u32 - 1)
        }
        fn packet(&mut self, iface: u32, ts: u64, data: &[u8], comment: Option<&str>) -> io::Result<()> {
            self.packets.push((iface, ts, data.to_vec(), comment.unwrap_or("").to_owned()));
            Ok(())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn ipv4(src: [u8; 4], dst: [u8; 4], tag: u8) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 21, 0, 0, 0, 0, 64, 17, 0, 0];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.push(tag);
        p
    }

    fn batch(seq: u64, ts: u64, packets: &[Vec<u8>]) -> Vec<u8> {
        let plain = [0u8; v1::VNET_HDR_LEN];
        let entries: Vec<Packet<'_>> = packets.iter().map(|p| Packet { vnet: Some(&plain), data: p }).collect();
        let mut out = Vec::new();
        v1::encode(FrameHeader { flags: v1::FLAG_VNET, count: entries.len() as u16, sender_queues: 1, seq, timestamp_ns: ts }, &entries, &mut out).unwrap();
        out
    }

    fn hello(name: &str, addr: &str) -> Vec<u8> {
        let wire = if name == "tunbus-router" { "router" } else { "v1" };
        format!(r#"{{"name":"{name}","addresses":["{addr}/24"],"queues":1,"wire":"{wire}","started_unix_ms":0}}"#).into_bytes()
    }

    /// A batch of another layer's units (`flag`: `FLAG_ETHERNET`, `FLAG_IEEE802154`).
    fn layer_batch(flag: u8, seq: u64, units: &[Vec<u8>]) -> Vec<u8> {
        let mut b = batch(seq, 5, units);
        b[3] |= flag; // the header's flags byte
        b
    }

    const H1: [u8; 4] = [198, 18, 0, 1];
    const H2: [u8; 4] = [198, 18, 0, 2];
    const KEY: &str = "tunbus.v1.198-18-0-2.0";

    /// A recorder of any link type: interfaces as (name, link type), packets as given.
    #[derive(Default)]
    struct Links(Vec<(String, u16)>, Vec<(u32, Vec<u8>, String)>);

    impl Recorder for Links {
        fn interface(&mut self, name: &str, _: &str, _: &[(IpAddr, u8)]) -> io::Result<u32> {
            self.0.push((name.to_owned(), crate::capture::pcapng::LINKTYPE_RAW));
            Ok(self.0.len() as u32 - 1)
        }
        fn packet(&mut self, iface: u32, _: u64, data: &[u8], comment: Option<&str>) -> io::Result<()> {
            self.1.push((iface, data.to_vec(), comment.unwrap_or("").to_owned()));
            Ok(())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
        fn link_interface(&mut self, name: &str, _: &str, linktype: u16) -> io::Result<Option<u32>> {
            self.0.push((name.to_owned(), linktype));
            Ok(Some(self.0.len() as u32 - 1))
        }
    }

    /// Radio floods: one interface per radio, named by the flood key's sender word, frames
    /// as they were; an old probe's JSON frame once (the router's flood of it left out).
    #[test]
    fn radio_frames_get_an_interface_per_radio() {
        let radio_batch = |seq: u64, frames: &[&[u8]]| layer_batch(v1::FLAG_IEEE802154, seq, &frames.iter().map(|f| f.to_vec()).collect::<Vec<_>>());
        let mut m = Merge::new(Filter { radio_fcs: true, ..Filter::default() });
        let mut rec = Links::default();
        m.on_delivery("tunbus.v1.all.moteA", Some("u"), &radio_batch(1, &[&[0x41, 0x88, 1], &[0xc0]]), 10, &mut rec).unwrap();
        m.on_delivery("tunbus.v1.all.moteB", Some("u"), &radio_batch(1, &[&[2]]), 11, &mut rec).unwrap();
        let mut body = Vec::new();
        crate::codec::ioppytest::serial::encode_frame(&[7, 7], 1, &mut body);
        m.on_delivery("fromAgent.probe1.802154.serial.packet.raw", None, &body, 12, &mut rec).unwrap();
        m.on_delivery("tunbus.v1.all.tunbus-router", Some("r"), &radio_batch(1, &[&[7, 7]]), 13, &mut rec).unwrap();
        m.on_delivery("fromAgent.probe1.802154.serial.packet.raw", None, b"{\"data\": []}", 14, &mut rec).unwrap();
        assert_eq!(rec.0, [("moteA".to_owned(), 195), ("moteB".to_owned(), 195), ("probe1".to_owned(), 195)]);
        let frames: Vec<(u32, Vec<u8>)> = rec.1.iter().map(|(i, f, _)| (*i, f.clone())).collect();
        assert_eq!(frames, [(0, vec![0x41, 0x88, 1]), (0, vec![0xc0]), (1, vec![2]), (2, vec![7, 7])]);
        let c = m.counts();
        assert_eq!((c.radio_frames, c.packets, c.bridged, c.malformed, c.agents), (4, 4, 1, 1, 3));
        // An address filter keeps no radio frame; the default link type has no FCS.
        let mut m = Merge::new(Filter { addresses: vec!["198.18.0.1".parse().unwrap()], ..Filter::default() });
        m.on_delivery("tunbus.v1.all.moteA", Some("u"), &radio_batch(1, &[&[1]]), 10, &mut rec).unwrap();
        assert_eq!(m.counts().filtered, 1);
        let mut m = Merge::new(Filter::default());
        m.on_delivery("tunbus.v1.all.moteC", Some("u"), &radio_batch(1, &[&[1]]), 10, &mut rec).unwrap();
        assert_eq!(rec.0.last(), Some(&("moteC".to_owned(), 230)));
    }

    #[test]
    fn senders_are_named_by_their_hellos_even_when_the_hello_comes_later() {
        let mut m = Merge::new(Filter::default());
        let mut k = Kept::default();
        // h1's first batch arrives before any hello: held, then written under h1.
        m.on_delivery(KEY, Some("guest"), &batch(1, 100, &[ipv4(H1, H2, 1)]), 0, &mut k).unwrap();
        assert!(k.packets.is_empty());
        m.on_delivery("tunbus.v1.ctl.hello.h1", Some("guest"), &hello("h1", "198.18.0.1"), 1, &mut k).unwrap();
        m.on_delivery("tunbus.v1.ctl.hello.h2", Some("guest"), &hello("h2", "198.18.0.2"), 2, &mut k).unwrap();
        m.on_delivery(KEY, Some("guest"), &batch(2, 200, &[ipv4(H1, H2, 2), ipv4(H1, H2, 3)]), 3, &mut k).unwrap();
        m.on_delivery("tunbus.v1.198-18-0-1.0", Some("guest"), &batch(1, 150, &[ipv4(H2, H1, 4)]), 4, &mut k).unwrap();
        assert_eq!(k.interfaces, ["h1", "h2"], "guest is everyone's user: the source address names the sender");
        let seen: Vec<(u32, u64, u8)> = k.packets.iter().map(|(i, ts, d, _)| (*i, *ts, d[20])).collect();
        assert_eq!(seen, [(0, 100, 1), (0, 200, 2), (0, 200, 3), (1, 150, 4)]);
        assert_eq!(k.packets[1].3, format!("from h1 key {KEY} batch 2"));
        assert_eq!(m.counts().lost_batches, 0);
    }

    const MAC1: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const MAC2: [u8; 6] = [2, 0, 0, 0, 0, 2];

    fn l2_hello(name: &str, mac: &str) -> Vec<u8> {
        format!(r#"{{"name":"{name}","addresses":[],"queues":1,"wire":"v1","layer":"ethernet","macs":["{mac}"],"started_unix_ms":0}}"#).into_bytes()
    }

    /// An Ethernet frame from `src` to `dst` around `payload` (of `ethertype`).
    fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = dst.to_vec();
        f.extend_from_slice(&src);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn l2_batch(seq: u64, frames: &[Vec<u8>]) -> Vec<u8> {
        layer_batch(v1::FLAG_ETHERNET, seq, frames)
    }

    /// An L2 session: one Ethernet interface per agent, named by the flood key or by the
    /// hello that announced the source MAC of a unicast batch (held until it comes);
    /// frames byte for byte; filters by agent and by the carried IP address.
    #[test]
    fn ethernet_frames_get_an_interface_per_l2_agent() {
        let mut m = Merge::new(Filter::default());
        let mut rec = Links::default();
        let arp = eth([0xff; 6], MAC1, ethertype::ARP, &[0, 1, 8, 0, 6, 4, 0, 1]);
        let ping = eth(MAC1, MAC2, ethertype::IPV4, &ipv4(H2, H1, 9));
        let odd = eth(MAC1, MAC2, 0x88b5, b"local experimental");
        m.on_delivery("tunbus.v1.all.h1", Some("guest"), &l2_batch(1, std::slice::from_ref(&arp)), 0, &mut rec).unwrap();
        // To h1's MAC, from h2: nobody has said whose MAC2 is yet (guest is everyone's user).
        let to_h1 = RoutingKey::mac(Mac(MAC1), 3);
        m.on_delivery(to_h1.as_str(), Some("guest"), &l2_batch(1, &[ping.clone(), odd.clone()]), 1, &mut rec).unwrap();
        assert_eq!(rec.1.len(), 1, "the unicast batch waits for a hello");
        m.on_delivery("tunbus.v1.ctl.hello.h2", Some("guest"), &l2_hello("h2", "02:00:00:00:00:02"), 2, &mut rec).unwrap();
        assert_eq!(rec.0, [("h1".to_owned(), 1), ("h2".to_owned(), 1)]);
        let got: Vec<(u32, &[u8])> = rec.1.iter().map(|(i, d, _)| (*i, d.as_slice())).collect();
        assert_eq!(got, [(0, arp.as_slice()), (1, ping.as_slice()), (1, odd.as_slice())]);
        assert!(rec.1[1].2.starts_with(&format!("from h2 key {} batch 1", to_h1.as_str())), "{}", rec.1[1].2);
        assert_eq!((m.counts().ethernet_frames, m.counts().packets, m.counts().agents), (3, 3, 2));

        // Filters: by agent (the sender or the owner of the destination MAC), by address
        // (the IP packet inside; a frame without one is left out).
        let mut m = Merge::new(Filter { addresses: vec![IpAddr::from(H1)], ..Filter::default() });
        let mut rec = Links::default();
        m.on_delivery("tunbus.v1.all.h2", None, &l2_batch(1, &[ping.clone(), odd.clone(), arp.clone()]), 0, &mut rec).unwrap();
        assert_eq!(rec.1.len(), 1);
        assert_eq!(m.counts().filtered, 2);
        let mut m = Merge::new(Filter { agents: vec!["h1".into()], ..Filter::default() });
        let mut rec = Links::default();
        m.on_delivery("tunbus.v1.ctl.hello.h1", None, &l2_hello("h1", "02:00:00:00:00:01"), 0, &mut rec).unwrap();
        m.on_delivery("tunbus.v1.all.h2", None, &l2_batch(1, &[ping.clone(), eth(MAC2, MAC2, 0x88b5, b"x")]), 0, &mut rec).unwrap();
        assert_eq!(rec.1.len(), 1, "to h1 kept, h2 to itself left out");

        // A sender nobody ever names: after the hold, under its source MAC.
        let mut m = Merge::new(Filter::default());
        let mut rec = Links::default();
        m.on_delivery(to_h1.as_str(), Some("guest"), &l2_batch(1, std::slice::from_ref(&ping)), 0, &mut rec).unwrap();
        m.finish(&mut rec).unwrap();
        assert_eq!(rec.0, [("unknown-02:00:00:00:00:02".to_owned(), 1)]);
        // The raw-IP-only recorder takes none of them (counted as filtered).
        let mut m = Merge::new(Filter::default());
        let mut k = Kept::default();
        m.on_delivery("tunbus.v1.all.h1", None, &l2_batch(1, &[arp]), 0, &mut k).unwrap();
        assert!(k.packets.is_empty() && k.interfaces.is_empty());
        assert_eq!(m.counts().filtered, 1);
    }

    /// A super-frame (a TAP with offloads) is cut behind copies of its Ethernet header.
    #[test]
    fn ethernet_super_frames_are_cut() {
        // A UDP datagram of 3000 bytes in one super-frame, UDP_L4 at 1000.
        let mut p = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0, 198, 18, 0, 2, 198, 18, 0, 1];
        p.extend_from_slice(&[0x1f, 0x90, 0x13, 0x89, 0, 0, 0, 0]);
        p.extend((0..3000).map(|i| (i % 251) as u8));
        let total = p.len() as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p[24..26].copy_from_slice(&(total - 20).to_be_bytes());
        let frame = eth(MAC1, MAC2, ethertype::IPV4, &p);
        let v =
            crate::codec::vnet::VnetHdr { flags: 0, gso_type: crate::codec::vnet::GSO_UDP_L4, hdr_len: 14 + 28, gso_size: 1000, csum_start: 0, csum_offset: 0 }
                .to_bytes();
        let entries = [Packet { vnet: Some(&v), data: &frame }];
        let mut body = Vec::new();
        v1::encode(FrameHeader { flags: v1::FLAG_VNET | v1::FLAG_ETHERNET, count: 1, sender_queues: 1, seq: 1, timestamp_ns: 1 }, &entries, &mut body).unwrap();
        let mut m = Merge::new(Filter::default());
        let mut rec = Links::default();
        m.on_delivery("tunbus.v1.all.h2", None, &body, 0, &mut rec).unwrap();
        assert_eq!(rec.1.len(), 3);
        assert!(rec.1.iter().all(|(_, f, _)| f[..14] == frame[..14] && f.len() == 14 + 28 + 1000));
        assert_eq!((m.counts().super_packets, m.counts().segments, m.counts().ethernet_frames), (1, 3, 3));
    }

    #[test]
    fn in_a_provisioned_session_the_publishing_user_names_a_spoofer() {
        let mut m = Merge::new(Filter::default());
        let mut k = Kept::default();
        m.on_delivery("tunbus.v1.ctl.hello.h1", Some("h1"), &hello("h1", "198.18.0.1"), 0, &mut k).unwrap();
        m.on_delivery("tunbus.v1.ctl.hello.h2", Some("h2"), &hello("h2", "198.18.0.2"), 0, &mut k).unwrap();
        // h2's user publishes a packet with h1's source address.
        m.on_delivery("tunbus.v1.198-18-0-3.0", Some("h2"), &batch(1, 1, &[ipv4(H1, [198, 18, 0, 3], 1)]), 0, &mut k).unwrap();
        m.on_delivery("tunbus.v1.198-18-0-3.0", Some("h1"), &batch(1, 2, &[ipv4(H1, [198, 18, 0, 3], 2)]), 0, &mut k).unwrap();
        let by: Vec<&str> = k.packets.iter().map(|p| k.interfaces[p.0 as usize].as_str()).collect();
        assert_eq!(by, ["h2", "h1"]);
    }

    #[test]
    fn unnamed_senders_wait_then_get_their_address_and_gaps_count_as_lost() {
        let mut m = Merge::new(Filter::default());
        let mut k = Kept::default();
        m.on_delivery(KEY, None, &batch(5, 1, &[ipv4(H1, H2, 1)]), 0, &mut k).unwrap();
        m.on_delivery(KEY, None, &batch(9, 2, &[ipv4(H1, H2, 2)]), HOLD_UNNAMED_NS + 1, &mut k).unwrap();
        assert_eq!(k.interfaces, ["unknown-198.18.0.1"]);
        assert_eq!(k.packets.len(), 1, "the first waited its time; the second still waits");
        m.finish(&mut k).unwrap();
        assert_eq!(k.packets.len(), 2);
        assert_eq!(m.counts().lost_batches, 3, "batches 6, 7 and 8 of that link never came");
        // Another link of the same sender (top bits) is another count.
        m.on_delivery(KEY, None, &batch(1 | 1 << LINK_SHIFT, 3, &[ipv4(H1, H2, 3)]), u64::MAX / 2, &mut k).unwrap();
        m.finish(&mut k).unwrap();
        assert_eq!(m.counts().lost_batches, 3);
    }

    #[test]
    fn filters_and_json_packets() {
        let mut m = Merge::new(Filter { agents: vec!["h2".into()], ..Filter::default() });
        let mut k = Kept::default();
        for (name, addr) in [("h1", "198.18.0.1"), ("h2", "198.18.0.2"), ("h3", "198.18.0.3")] {
            m.on_delivery(&format!("tunbus.v1.ctl.hello.{name}"), None, &hello(name, addr), 0, &mut k).unwrap();
        }
        let h3 = [198, 18, 0, 3];
        m.on_delivery(KEY, None, &batch(1, 1, &[ipv4(H1, H2, 1), ipv4(H1, h3, 2)]), 0, &mut k).unwrap();
        assert_eq!(k.packets.iter().map(|p| p.2[20]).collect::<Vec<_>>(), [1], "to h2 kept, h1 -> h3 left out");
        assert_eq!(m.counts().filtered, 1);
        let json = br#"{"timestamp": 1, "interface_name": "tun0", "data": [69, 0, 0, 21, 0, 0, 0, 0, 64, 17, 0, 0, 198, 18, 0, 2, 198, 18, 0, 1, 9]}"#;
        m.on_delivery("fromAgent.h2.ip.tun.packet.raw", None, json, 77, &mut k).unwrap();
        let last = k.packets.last().unwrap();
        assert_eq!((k.interfaces[last.0 as usize].as_str(), last.1, last.2[20]), ("h2", 77, 9), "an old agent's packet, stamped on arrival");
        m.on_delivery(KEY, None, b"not a batch", 0, &mut k).unwrap();
        assert_eq!(m.counts().malformed, 1);
    }

    /// A v1 batch without virtio headers, as the ioppytest router publishes its copies.
    fn plain_batch(seq: u64, packets: &[Vec<u8>]) -> Vec<u8> {
        let entries: Vec<Packet<'_>> = packets.iter().map(|p| Packet { vnet: None, data: p }).collect();
        let mut out = Vec::new();
        v1::encode(FrameHeader { flags: 0, count: entries.len() as u16, sender_queues: 1, seq, timestamp_ns: 5 }, &entries, &mut out).unwrap();
        out
    }

    fn json(packet: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        ioppytest::encode_packet(packet, "tun0", 1, &mut out);
        out
    }

    #[test]
    fn the_routers_copies_of_old_agents_packets_are_left_out() {
        let mut m = Merge::new(Filter::default());
        let mut k = Kept::default();
        let (old, native) = ([10, 2, 0, 1], [10, 2, 0, 2]);
        let started = br#"{"_api_version": "1.2.15", "name": "agent_1", "ipv4_address": "10.2.0.1", "ipv4_netmask": "255.255.255.0", "ipv6_prefix": "bbbb", "ipv6_host": "1"}"#;
        m.on_delivery("fromAgent.agent_1.ip.tun.started", None, started, 0, &mut k).unwrap();
        m.on_delivery("tunbus.v1.ctl.hello.tunbus-router", None, &hello("tunbus-router", "10.2.0.1"), 0, &mut k).unwrap();
        m.on_delivery("tunbus.v1.ctl.hello.nat", None, &hello("nat", "10.2.0.2"), 0, &mut k).unwrap();
        // agent_1's request as JSON, then the router's copy of it; nat's answer; the same
        // request again (a retransmission is the old agent's too), and its copy.
        let (request, reply) = (ipv4(old, native, 1), ipv4(native, old, 2));
        m.on_delivery("fromAgent.agent_1.ip.tun.packet.raw", None, &json(&request), 10, &mut k).unwrap();
        m.on_delivery("tunbus.v1.10-2-0-2.0", None, &plain_batch(1, std::slice::from_ref(&request)), 11, &mut k).unwrap();
        m.on_delivery("tunbus.v1.10-2-0-1.0", None, &batch(1, 12, std::slice::from_ref(&reply)), 12, &mut k).unwrap();
        m.on_delivery("fromAgent.agent_1.ip.tun.packet.raw", None, &json(&request), 13, &mut k).unwrap();
        m.on_delivery("tunbus.v1.10-2-0-2.0", None, &plain_batch(2, std::slice::from_ref(&request)), 14, &mut k).unwrap();
        // A packet of the router the capture never had as JSON (the tap lost it): kept.
        let unseen = ipv4(old, native, 3);
        m.on_delivery("tunbus.v1.10-2-0-2.0", None, &plain_batch(3, &[unseen]), 15, &mut k).unwrap();
        let by: Vec<(&str, u8)> = k.packets.iter().map(|p| (k.interfaces[p.0 as usize].as_str(), p.2[20])).collect();
        assert_eq!(by, [("agent_1", 1), ("nat", 2), ("agent_1", 1), ("agent_1", 3)], "each packet once, under who sent it");
        assert_eq!(m.counts().bridged, 2);
        let mut w = crate::capture::pcapng::Writer::new(Vec::new(), "test").unwrap();
        let mut m = Merge::new(Filter::default());
        m.on_delivery("fromAgent.agent_1.ip.tun.started", None, started, 0, &mut w).unwrap();
        m.on_delivery("fromAgent.agent_1.ip.tun.packet.raw", None, &json(&request), 10, &mut w).unwrap();
        let file = crate::capture::pcapng::read(&w.into_inner()).unwrap();
        let iface = &file.interfaces[0];
        assert_eq!(iface.name, "agent_1");
        assert!(
            iface.addresses.iter().any(|a| a.0 == IpAddr::from(old)) && iface.addresses.iter().any(|a| a.0 == "bbbb::1".parse::<IpAddr>().unwrap()),
            "{:?}",
            iface.addresses
        );
    }

    #[test]
    fn an_old_agents_first_packets_wait_for_its_started() {
        let mut m = Merge::new(Filter::default());
        let mut k = Kept::default();
        let started = br#"{"name": "agent_1", "ipv4_address": "10.2.0.1", "ipv4_netmask": "255.255.255.0"}"#;
        let p = |tag| ipv4([10, 2, 0, 1], [10, 2, 0, 2], tag);
        m.on_delivery("fromAgent.agent_1.ip.tun.packet.raw", None, &json(&p(1)), 10, &mut k).unwrap();
        m.on_delivery("fromAgent.agent_1.ip.tun.packet.raw", None, &json(&p(2)), 20, &mut k).unwrap();
        assert!(k.packets.is_empty(), "held until its addresses are known");
        m.on_delivery("fromAgent.agent_1.ip.tun.started", None, started, 30, &mut k).unwrap();
        m.on_delivery("fromAgent.agent_1.ip.tun.packet.raw", None, &json(&p(3)), 40, &mut k).unwrap();
        let seen: Vec<(u64, u8)> = k.packets.iter().map(|p| (p.1, p.2[20])).collect();
        assert_eq!(seen, [(10, 1), (20, 2), (40, 3)], "in order, stamped when they arrived");
        // An agent whose started never comes: its packets are written after the wait.
        m.on_delivery("fromAgent.agent_9.ip.tun.packet.raw", None, &json(&p(4)), 50, &mut k).unwrap();
        m.on_delivery("fromAgent.agent_9.ip.tun.packet.raw", None, &json(&p(5)), 60, &mut k).unwrap();
        assert_eq!(k.packets.len(), 3);
        m.on_delivery("tunbus.v1.ctl.hello.x", None, &hello("x", "198.18.0.9"), 50 + HOLD_UNNAMED_NS, &mut k).unwrap();
        let seen: Vec<(&str, u64, u8)> = k.packets[3..].iter().map(|p| (k.interfaces[p.0 as usize].as_str(), p.1, p.2[20])).collect();
        assert_eq!(seen, [("agent_9", 50, 4), ("agent_9", 60, 5)], "the first waited its time, the second follows it at once");
        assert_eq!(m.counts().messages, 5);
    }
}
