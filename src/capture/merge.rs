//! The merged capture of a bus: what each message on the session's exchange carries,
//! attributed to its sender and written packet by packet. Pure: deliveries in (routing
//! key, broker-checked user, body, time of arrival), packets out into a [`Sink`].
//!
//! - Hellos (`tunbus.v1.ctl.hello.<name>`) say who owns which addresses: each sending
//!   agent gets an interface of its own, named after it, with its addresses.
//! - A v1 batch's packets are stamped with the sender's frame timestamp (when it published
//!   them, which is what receivers see) and commented with sender, routing key and batch
//!   sequence; its sender is the broker user that published it when a hello of that user is
//!   known and no other agent logs in as that user (a secure session), else the agent that
//!   owns the packet's source address.
//! - An ioppytest JSON packet (`fromAgent.<name>.ip.tun.packet.raw`) is its agent's,
//!   stamped when it arrived (the old wire carries no finer time).
//! - Super-packets are cut into the wire-sized packets they stand for (`codec::segment`)
//!   unless told not to, so a trace reads like one taken on a real link.
//! - Loss: each publishing link numbers its batches (the top 16 bits of the sequence name
//!   the link, `docs/wire-format.md`); a gap is batches the tap queue dropped.

use std::collections::HashMap;
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
        if let Some(ioppytest::FromAgent::Packet { name }) = ioppytest::parse_from_agent(routing_key) {
            return self.on_json(name, body, now_ns, sink);
        }
        match Key::parse(routing_key) {
            Some(Key::Hello { .. }) => self.on_hello(body, user_id),
            Some(Key::Unicast { .. } | Key::All { .. }) => self.on_batch(routing_key, user_id, body, sink)?,
            _ => {}
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

    /// Who sent a batch: the agent of its broker user, else the owner of its first
    /// packet's source address, else the address itself.
    fn sender_of(&self, user_id: Option<&str>, first: Option<&[u8]>) -> String {
        if let Some(Some(name)) = user_id.and_then(|u| self.users.get(u)) {
            return name.clone();
        }
        let src = first.and_then(route::source);
        match src {
            Some(ip) => self.owners.get(&ip).cloned().unwrap_or_else(|| format!("unknown-{ip}")),
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

    fn on_batch(&mut self, routing_key: &str, user_id: Option<&str>, body: &[u8], sink: &mut dyn Sink) -> io::Result<()> {
        let Ok(frame) = v1::decode(body) else {
            self.counts.malformed += 1;
            return Ok(());
        };
        self.counts.messages += 1;
        let header = frame.header();
        let sender = self.sender_of(user_id, frame.packets().next().map(|p| p.data));
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
        Ok(())
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
