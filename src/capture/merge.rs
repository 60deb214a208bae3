//! The merged capture of a bus: what each message on the session's exchange carries,
//! attributed to its sender and written packet by packet. Pure: deliveries in (routing
//! key, broker-checked user, body, time of arrival), packets out into a [`Sink`].
//!
//! - Hellos (`tunbus.v1.ctl.hello.<name>`) say who owns which addresses: each sending
//!   agent gets an interface of its own, named after it, with its addresses.
//! - A v1 batch's packets are stamped with the sender's frame timestamp (when it published
//!   them, which is what receivers see) and commented with sender, routing key and batch
//!   sequence; its sender is the agent that owns the first packet's source address, unless
//!   the broker user that published it belongs to another agent alone (a provisioned
//!   session, where the broker vouches for `user_id`: a spoofer is named, not its victim).
//! - An ioppytest JSON packet (`fromAgent.<name>.ip.tun.packet.raw`) is its agent's,
//!   stamped when it arrived (the old wire carries no finer time).
//! - Super-packets are cut into the wire-sized packets they stand for (`codec::segment`)
//!   unless told not to, so a trace reads like one taken on a real link.
//! - A batch from a sender no hello has named yet (a capture started while traffic flows
//!   hears the hellos a moment later) is held, up to [`HOLD_UNNAMED`], until one does, then
//!   written under its agent's interface; after that, under `unknown-<source address>`.
//! - Loss: each publishing link numbers its batches (the top 16 bits of the sequence name
//!   the link, `docs/wire-format.md`); a gap is batches the tap queue dropped.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::IpAddr;

use crate::codec::segment::Segmenter;
use crate::codec::{ioppytest, v1};
use crate::route::{self, Key};

/// Where the packets go (a pcapng file, a classic pcap for ioppytest).
pub trait Sink {
    /// A new interface; returns its id.
    fn interface(&mut self, name: &str, description: &str, addrs: &[(IpAddr, u8)]) -> io::Result<u32>;
    /// One packet on interface `iface`, at `timestamp_ns` since the UNIX epoch.
    fn packet(&mut self, iface: u32, timestamp_ns: u64, data: &[u8], comment: Option<&str>) -> io::Result<()>;
    /// Pushes what is buffered to the file.
    fn flush(&mut self) -> io::Result<()>;
}

/// How long a batch from a sender without a hello waits for one (by arrival time).
pub const HOLD_UNNAMED_NS: u64 = 2_000_000_000;
/// How long, as a `Duration`, for the documentation.
pub const HOLD_UNNAMED: std::time::Duration = std::time::Duration::from_nanos(HOLD_UNNAMED_NS);
/// Most bytes of such batches held.
pub const HOLD_MAX_BYTES: usize = 64 << 20;

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
    /// Agents that have an interface in the file.
    pub agents: u64,
}

/// What a hello said.
#[derive(Clone, Debug)]
struct Agent {
    addrs: Vec<(IpAddr, u8)>,
    user: Option<String>,
    iface: Option<u32>,
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
}

/// What `tunbus.v1.ctl.hello.*` bodies carry that the capture needs.
#[derive(serde::Deserialize)]
struct Hello {
    name: String,
    addresses: Vec<String>,
    #[serde(default)]
    leaving: bool,
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
        }
    }

    pub fn counts(&self) -> &Counts {
        &self.counts
    }

    /// The agents heard of (by hello) so far.
    pub fn known_agents(&self) -> usize {
        self.agents.len()
    }

    /// One delivery, arrived at `now_ns`.
    pub fn on_delivery(&mut self, routing_key: &str, user_id: Option<&str>, body: &[u8], now_ns: u64, sink: &mut dyn Sink) -> io::Result<()> {
        self.expire(now_ns, sink)?;
        if let Some(ioppytest::FromAgent::Packet { name }) = ioppytest::parse_from_agent(routing_key) {
            return self.on_json(name, body, now_ns, sink);
        }
        match Key::parse(routing_key) {
            Some(Key::Hello { .. }) => {
                self.on_hello(body, user_id);
                self.release_named(sink)?;
            }
            Some(Key::Unicast { .. } | Key::All { .. }) if self.on_batch(routing_key, user_id, body, sink, true)? => {
                self.held_bytes += body.len();
                self.held.push_back(Held { routing_key: routing_key.to_owned(), user_id: user_id.map(str::to_owned), body: body.to_vec(), at_ns: now_ns });
            }
            _ => {}
        }
        Ok(())
    }

    /// Writes what is still held, under `unknown-…` (the capture is ending).
    pub fn finish(&mut self, sink: &mut dyn Sink) -> io::Result<()> {
        self.expire(u64::MAX, sink)
    }

    /// Writes the held batches that waited longer than [`HOLD_UNNAMED`] (or beyond the
    /// byte bound), as they are.
    fn expire(&mut self, now_ns: u64, sink: &mut dyn Sink) -> io::Result<()> {
        while let Some(h) = self.held.front() {
            if h.at_ns.saturating_add(HOLD_UNNAMED_NS) > now_ns && self.held_bytes <= HOLD_MAX_BYTES {
                break;
            }
            let Some(h) = self.held.pop_front() else { break };
            self.held_bytes -= h.body.len();
            self.on_batch(&h.routing_key, h.user_id.as_deref(), &h.body, sink, false)?;
        }
        Ok(())
    }

    /// A hello came: the held batches whose sender it names are written now, in order.
    fn release_named(&mut self, sink: &mut dyn Sink) -> io::Result<()> {
        if self.held.is_empty() {
            return Ok(());
        }
        let held = std::mem::take(&mut self.held);
        for h in held {
            let named = v1::decode(&h.body).ok().and_then(|f| self.named_sender(h.user_id.as_deref(), f.packets().next().map(|p| p.data))).is_some();
            if named {
                self.held_bytes -= h.body.len();
                self.on_batch(&h.routing_key, h.user_id.as_deref(), &h.body, sink, false)?;
            } else {
                self.held.push_back(h);
            }
        }
        Ok(())
    }

    fn on_hello(&mut self, body: &[u8], user_id: Option<&str>) {
        let Ok(hello) = serde_json::from_slice::<Hello>(body) else { return };
        if hello.leaving {
            return; // its packets in flight are still its own
        }
        let addrs: Vec<(IpAddr, u8)> = hello
            .addresses
            .iter()
            .filter_map(|a| {
                let (ip, len) = a.split_once('/').unwrap_or((a, ""));
                let ip: IpAddr = ip.parse().ok()?;
                Some((ip, len.parse().unwrap_or(if ip.is_ipv4() { 32 } else { 128 })))
            })
            .collect();
        for (ip, _) in &addrs {
            self.owners.insert(*ip, hello.name.clone());
        }
        if let Some(u) = user_id {
            let name = Some(hello.name.clone());
            let entry = self.users.entry(u.to_owned()).or_insert_with(|| name.clone());
            if *entry != name {
                *entry = None;
            }
        }
        let entry = self.agents.entry(hello.name).or_insert(Agent { addrs: Vec::new(), user: None, iface: None });
        entry.addrs = addrs;
        entry.user = user_id.map(str::to_owned);
    }

    /// The interface of agent `name` (created on its first packet), or of a stranger.
    fn iface(&mut self, name: &str, sink: &mut dyn Sink) -> io::Result<u32> {
        if let Some(agent) = self.agents.get_mut(name) {
            if let Some(i) = agent.iface {
                return Ok(i);
            }
            let description = match &agent.user {
                Some(u) => format!("tunbus agent {name} (broker user {u})"),
                None => format!("tunbus agent {name}"),
            };
            let i = sink.interface(name, &description, &agent.addrs)?;
            agent.iface = Some(i);
            self.counts.agents += 1;
            return Ok(i);
        }
        if let Some(i) = self.strangers.get(name) {
            return Ok(*i);
        }
        let i = sink.interface(name, "a sender without a hello (yet)", &[])?;
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
    fn on_batch(&mut self, routing_key: &str, user_id: Option<&str>, body: &[u8], sink: &mut dyn Sink, may_hold: bool) -> io::Result<bool> {
        let Ok(frame) = v1::decode(body) else {
            self.counts.malformed += 1;
            return Ok(false);
        };
        let first = frame.packets().next().map(|p| p.data);
        let sender = match self.named_sender(user_id, first) {
            Some(name) => name,
            None if may_hold => return Ok(true),
            None => Self::unnamed_sender(first),
        };
        self.counts.messages += 1;
        let header = frame.header();
        self.account(&sender, header.seq);
        let iface = self.iface(&sender, sink)?;
        for p in frame.packets() {
            if !self.keeps(&sender, p.data) {
                self.counts.filtered += 1;
                continue;
            }
            self.comment.clear();
            use std::fmt::Write;
            let _ = write!(self.comment, "from {sender} key {routing_key} batch {}", header.seq & LINK_SEQ_MASK);
            self.write(iface, header.timestamp_ns, p.vnet, p.data, sink)?;
        }
        Ok(false)
    }

    fn on_json(&mut self, name: &str, body: &[u8], now_ns: u64, sink: &mut dyn Sink) -> io::Result<()> {
        let mut json = std::mem::take(&mut self.json);
        let result = match ioppytest::decode_packet(body, &mut json) {
            Err(_) => {
                self.counts.malformed += 1;
                Ok(())
            }
            Ok(()) => {
                self.counts.messages += 1;
                if self.keeps(name, &json) {
                    let iface = self.iface(name, sink)?;
                    self.comment.clear();
                    self.comment.push_str("from ");
                    self.comment.push_str(name);
                    self.comment.push_str(" key fromAgent (ioppytest JSON)");
                    self.write(iface, now_ns, None, &json, sink)
                } else {
                    self.counts.filtered += 1;
                    Ok(())
                }
            }
        };
        self.json = json;
        result
    }

    /// Writes one packet, cut into wire-sized packets when it is a super-packet.
    fn write(&mut self, iface: u32, ts: u64, vnet: Option<&[u8; v1::VNET_HDR_LEN]>, data: &[u8], sink: &mut dyn Sink) -> io::Result<()> {
        let comment = self.comment.as_str();
        let gso = vnet.is_some_and(|v| v[1] & 0x7f != 0);
        if self.filter.no_segment || vnet.is_none() {
            self.counts.packets += 1;
            return sink.packet(iface, ts, data, Some(comment));
        }
        let mut result = Ok(());
        let mut written = 0u64;
        let cut = self.segmenter.segments(vnet, data, |seg| {
            if result.is_ok() {
                result = sink.packet(iface, ts, seg, Some(comment));
                written += 1;
            }
        });
        result?;
        match cut {
            Ok(_) => {
                self.counts.packets += written;
                if gso {
                    self.counts.super_packets += 1;
                    self.counts.segments += written;
                }
                Ok(())
            }
            Err(_) => {
                // Not cut (its headers do not say how): written as it came.
                self.counts.packets += 1;
                sink.packet(iface, ts, data, Some(comment))
            }
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

    /// A sink that keeps what it is given.
    #[derive(Default)]
    struct Kept {
        interfaces: Vec<String>,
        packets: Vec<(u32, u64, Vec<u8>, String)>,
    }

    impl Sink for Kept {
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
        format!(r#"{{"name":"{name}","addresses":["{addr}/24"],"queues":1,"wire":"v1","started_unix_ms":0}}"#).into_bytes()
    }

    const H1: [u8; 4] = [198, 18, 0, 1];
    const H2: [u8; 4] = [198, 18, 0, 2];
    const KEY: &str = "tunbus.v1.198-18-0-2.0";

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
}
