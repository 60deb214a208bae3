//! Link emulation in the agent: `--emulate SPEC` on all egress, `--emulate-to PEER=SPEC`
//! towards one agent, every random decision from `--emulate-seed` (docs/decisions/0021).
//!
//! - [`spec`]: the tc-netem vocabulary, parsed and printed (pure);
//! - [`model`]: the seeded decisions of one stream, packet by packet (pure);
//! - [`Emulation`]: what the configuration says (specs and seed);
//! - [`Links`]: the agent's links at run time: per link, one stream of decisions per flow
//!   shard (and one for floods) and the rate clock, all shared by the queue workers; and
//!   which addresses each `--emulate-to` peer has (learned from its hellos);
//! - [`Shaper`]: queue worker k's side: the delay line of the packets it holds, and the
//!   cutting of super-packets when packets are told apart by chance.
//!
//! **Per flow shard.** A packet draws from the stream of its (link, flow shard): what
//! happens to a flow depends only on the seed and on the packets of its shard, not on how
//! many queues the agent has, which TUN queue the kernel hands the flow to (it moves a flow
//! to the queue its replies are written on), or what other flows and the kernel's own
//! chatter (router solicitations, to the floods' stream) send meanwhile. So a run replays.
//!
//! Off (no spec given), the worker has no shaper and its path is unchanged: the check is
//! one `Option` per burst. On, each packet read is copied once into the delay line and
//! copied into its batch when it is due; the line's buffers are reused. A stream is a
//! `Mutex` taken once per packet read, uncontended unless two queues carry one shard.

pub mod model;
pub mod spec;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

pub use model::{Dropped, Emulator, Fate, RateClock};
pub use spec::{Spec, SpecError};

use crate::codec::segment::Segmenter;
use crate::codec::v1::VNET_HDR_LEN;
use crate::codec::vnet::is_gso;
use crate::route::{RoutingKey, SHARDS};

/// The seed when `--emulate-seed` is not given (the run prints it, to replay).
pub const DEFAULT_SEED: u64 = 1;

/// Most packets a worker holds for destinations without a spec (due at once; they wait
/// only while the broker is behind).
pub const MAX_HELD: usize = 10 * spec::DEFAULT_LIMIT;

/// Wake-ups later than this are not the timer's lateness (the worker was busy).
pub const MAX_LATENESS_NS: u64 = 1_000_000;

/// The size of a wire packet, for counting super-packets against `limit`.
pub const WIRE_PACKET: usize = 1500;

/// What the configuration asks for.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Emulation {
    /// Applies to every packet sent (`--emulate`).
    pub all: Option<Spec>,
    /// Applies to the packets for one agent, by name (`--emulate-to`), instead of `all`.
    pub to: Vec<(String, Spec)>,
    pub seed: u64,
    /// Addresses of `to` peers known before any hello (a lab's plan).
    pub known: Vec<(String, Vec<IpAddr>)>,
}

impl Emulation {
    pub fn is_off(&self) -> bool {
        self.all.is_none() && self.to.is_empty()
    }

    /// `PEER=SPEC` as `--emulate-to` takes it.
    pub fn parse_to(text: &str) -> Result<(String, Spec), String> {
        let (peer, spec) = text.split_once('=').ok_or_else(|| format!("--emulate-to {text:?}: expected PEER=SPEC, e.g. h2='delay 50ms loss 1%'"))?;
        let peer = peer.trim();
        if peer.is_empty() {
            return Err(format!("--emulate-to {text:?}: the peer's name is empty"));
        }
        Ok((peer.to_owned(), spec.parse().map_err(|e: SpecError| e.to_string())?))
    }
}

/// Where a packet goes, as the emulation sees it: its destination (`None`: a flood) and its
/// flow shard (`route::shard`, before any reduction to the receiver's queue count).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub dst: Option<IpAddr>,
    pub shard: u8,
}

impl Flow {
    /// A broadcast or multicast packet: all floods share one stream.
    pub const FLOOD: Flow = Flow { dst: None, shard: 0 };

    pub fn unicast(dst: IpAddr, shard: u8) -> Flow {
        Flow { dst: Some(dst), shard }
    }

    /// Which of its link's streams it draws from: its shard's, or the floods' (the last).
    fn stream(self) -> usize {
        match self.dst {
            Some(_) => usize::from(self.shard % SHARDS),
            None => usize::from(SHARDS),
        }
    }
}

/// One link's decisions: a stream per flow shard and one for floods (`SHARDS + 1`), each an
/// [`Emulator`] seeded by (seed, link, stream), shared by the queue workers; they share the
/// link's rate clock.
type Streams = Box<[Mutex<Emulator>]>;

/// One agent's links at run time, shared by its queue workers.
pub struct Links {
    emulation: Emulation,
    /// `--emulate`'s link, then one per `--emulate-to` peer.
    all: Option<Streams>,
    to: Vec<Streams>,
    /// Which `to` peer each address belongs to, and a generation bumped on each change.
    addresses: Mutex<HashMap<IpAddr, usize>>,
    generation: AtomicU64,
}

impl Links {
    pub fn new(emulation: Emulation, start_ns: u64) -> Links {
        let seed = emulation.seed;
        let streams = |link: u64, spec: &Spec| -> Streams {
            let rate = Arc::new(RateClock::default());
            (0..=u64::from(SHARDS)).map(|s| Mutex::new(Emulator::new(spec.clone(), seed, link << 8 | s, rate.clone(), start_ns))).collect()
        };
        let all = emulation.all.as_ref().map(|s| streams(0, s));
        let to = emulation.to.iter().enumerate().map(|(i, (_, s))| streams(i as u64 + 1, s)).collect();
        let known = emulation.known.clone();
        let links = Links { emulation, all, to, addresses: Mutex::default(), generation: AtomicU64::new(0) };
        for (name, addrs) in &known {
            links.learn(name, addrs);
        }
        links
    }

    pub fn emulation(&self) -> &Emulation {
        &self.emulation
    }

    /// The names of the `--emulate-to` peers.
    pub fn peers(&self) -> impl Iterator<Item = &str> {
        self.emulation.to.iter().map(|(name, _)| name.as_str())
    }

    /// Peer `name` has `addrs` (from its hello); the workers pick it up on their next packet.
    pub fn learn(&self, name: &str, addrs: &[IpAddr]) {
        let Some(i) = self.emulation.to.iter().position(|(n, _)| n == name) else { return };
        let mut map = self.addresses.lock().unwrap_or_else(|p| p.into_inner());
        let before = map.len();
        map.retain(|a, owner| *owner != i || addrs.contains(a));
        let mut changed = map.len() != before;
        for a in addrs {
            changed |= map.insert(*a, i) != Some(i);
        }
        if changed {
            self.generation.fetch_add(1, Ordering::Release);
        }
    }

    /// Whether every `--emulate-to` peer has addresses.
    pub fn all_known(&self) -> bool {
        let map = self.addresses.lock().unwrap_or_else(|p| p.into_inner());
        (0..self.emulation.to.len()).all(|i| map.values().any(|o| *o == i))
    }

    /// A queue worker's shaper, or `None` when nothing is emulated.
    pub fn shaper(self: &Arc<Links>) -> Option<Shaper> {
        if self.emulation.is_off() {
            return None;
        }
        Some(Shaper {
            links: self.clone(),
            seen: u64::MAX,
            addresses: HashMap::new(),
            line: DelayLine::default(),
            segmenter: Segmenter::new(),
            cut: Vec::new(),
            lateness_ns: 0,
            planned_wake: None,
        })
    }
}

/// Queue worker k's emulation: the links' decisions and the packets it holds.
pub struct Shaper {
    links: Arc<Links>,
    /// The generation of [`Links`]' addresses copied into `addresses`.
    seen: u64,
    addresses: HashMap<IpAddr, usize>,
    line: DelayLine,
    segmenter: Segmenter,
    /// One segment of a super-packet, with a plain virtio header.
    cut: Vec<u8>,
    /// How late timed wake-ups come (a moving average), and the one planned.
    lateness_ns: u64,
    planned_wake: Option<u64>,
}

impl Shaper {
    /// Hands `entry` (virtio header and packet) for `key` and `flow` to its link at
    /// `now_ns`: it is held until due, or dropped (returns how many packets were dropped: a
    /// cut super-packet can lose some of its segments).
    pub fn admit(&mut self, entry: &[u8], key: RoutingKey, flow: Flow, now_ns: u64) -> u64 {
        self.refresh();
        let Shaper { links, addresses, line, segmenter, cut, .. } = self;
        let streams = match flow.dst.and_then(|d| addresses.get(&d).copied()) {
            Some(i) => links.to.get(i),
            None => links.all.as_ref(),
        };
        let Some(stream) = streams.and_then(|s| s.get(flow.stream())) else {
            if line.len() >= MAX_HELD {
                return 1;
            }
            line.hold(now_ns, key, entry); // no spec for this destination: due at once
            return 0;
        };
        let mut emulator = stream.lock().unwrap_or_else(PoisonError::into_inner);
        let emulator = &mut *emulator;
        let (Some(vnet), Some(packet)) = (entry.first_chunk::<VNET_HDR_LEN>(), entry.get(VNET_HDR_LEN..)) else { return 1 };
        if !emulator.spec().per_packet() || !is_gso(vnet) {
            return Self::one(emulator, line, now_ns, key, entry);
        }
        // Each wire-sized packet of a super-packet gets its own draw.
        let mut dropped = 0;
        let result = segmenter.segments(Some(vnet), packet, |p| {
            cut.clear();
            cut.extend_from_slice(&[0; VNET_HDR_LEN]);
            cut.extend_from_slice(p);
            dropped += Self::one(emulator, line, now_ns, key, cut);
        });
        match result {
            Ok(_) => dropped,
            Err(_) => Self::one(emulator, line, now_ns, key, entry),
        }
    }

    fn one(emulator: &mut Emulator, line: &mut DelayLine, now_ns: u64, key: RoutingKey, entry: &[u8]) -> u64 {
        match emulator.decide(now_ns, entry.len().saturating_sub(VNET_HDR_LEN), line.packets()) {
            Fate::Drop(_) => 1,
            Fate::Send { at_ns, copies } => {
                for _ in 0..copies {
                    line.hold(at_ns, key, entry);
                }
                0
            }
        }
    }

    /// Copies the peers' addresses again when they changed.
    fn refresh(&mut self) {
        let generation = self.links.generation.load(Ordering::Acquire);
        if generation != self.seen {
            self.addresses = self.links.addresses.lock().unwrap_or_else(|p| p.into_inner()).clone();
            self.seen = generation;
        }
    }

    /// When the next held packet is due, in ns.
    pub fn next_due(&self) -> Option<u64> {
        self.line.next_due()
    }

    /// When the worker should wake for the next held packet: that early by how late its
    /// timed wake-ups come (a VM's timer and scheduler add 0.2–0.5 ms here), so that the
    /// packet leaves when it is due rather than that much after.
    pub fn wake_at(&mut self) -> Option<u64> {
        let at = self.line.next_due()?.saturating_sub(self.lateness_ns);
        self.planned_wake = Some(at);
        Some(at)
    }

    /// Gives each packet due by `now_ns` (and within how late a wake-up comes: sooner
    /// cannot be hit) to `send`, in the order they are due, until `send` says it cannot
    /// take one (it is then kept for the next call).
    pub fn release(&mut self, now_ns: u64, mut send: impl FnMut(RoutingKey, &[u8]) -> bool) {
        if let Some(planned) = self.planned_wake.take() {
            // A timed wake-up: how late did it come? (An earlier wake was for something else.)
            if let Some(late) = now_ns.checked_sub(planned).filter(|l| *l < MAX_LATENESS_NS) {
                self.lateness_ns = (self.lateness_ns * 7 + late) / 8;
            } else if now_ns < planned {
                self.planned_wake = Some(planned);
            }
        }
        let by = now_ns.saturating_add(self.lateness_ns);
        while let Some(slot) = self.line.peek_due(by) {
            let (key, entry) = &self.line.held[slot];
            if !send(*key, entry) {
                return;
            }
            self.line.pop();
        }
    }

    /// Packets held.
    pub fn held(&self) -> usize {
        self.line.len()
    }
}

/// Packets held until they are due, ordered by due time (then by arrival); the buffers are
/// kept for reuse.
#[derive(Default)]
struct DelayLine {
    due: BinaryHeap<Reverse<(u64, u64, usize)>>,
    held: Vec<(RoutingKey, Vec<u8>)>,
    free: Vec<usize>,
    order: u64,
    /// Bytes held.
    bytes: usize,
}

impl DelayLine {
    fn len(&self) -> usize {
        self.due.len()
    }

    /// Packets held, counting a super-packet as the wire-sized packets it stands for
    /// ([`WIRE_PACKET`] bytes each), so that `limit` bounds the delay a line can build.
    fn packets(&self) -> usize {
        self.due.len().max(self.bytes.div_ceil(WIRE_PACKET))
    }

    fn hold(&mut self, at_ns: u64, key: RoutingKey, entry: &[u8]) {
        let slot = match self.free.pop() {
            Some(s) => {
                let (k, buf) = &mut self.held[s];
                *k = key;
                buf.clear();
                buf.extend_from_slice(entry);
                s
            }
            None => {
                self.held.push((key, entry.to_vec()));
                self.held.len() - 1
            }
        };
        self.order += 1;
        self.bytes += entry.len();
        self.due.push(Reverse((at_ns, self.order, slot)));
    }

    fn next_due(&self) -> Option<u64> {
        self.due.peek().map(|Reverse((at, _, _))| *at)
    }

    /// The slot of the first packet when it is due at `now_ns`.
    fn peek_due(&self, now_ns: u64) -> Option<usize> {
        let Reverse((at, _, slot)) = self.due.peek()?;
        (*at <= now_ns).then_some(*slot)
    }

    /// Drops the first packet and keeps its buffer for reuse.
    fn pop(&mut self) {
        if let Some(Reverse((_, _, slot))) = self.due.pop() {
            self.bytes -= self.held[slot].1.len();
            self.free.push(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn key() -> RoutingKey {
        RoutingKey::unicast(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)), 0)
    }

    #[test]
    fn the_line_releases_in_due_order_and_reuses_buffers() {
        let mut line = DelayLine::default();
        for (at, b) in [(30, 3u8), (10, 1), (20, 2), (10, 4)] {
            line.hold(at, key(), &[b; 20]);
        }
        let mut out = Vec::new();
        while let Some(slot) = line.peek_due(25) {
            out.push(line.held[slot].1[0]);
            line.pop();
        }
        assert_eq!(out, [1, 4, 2]);
        assert_eq!(line.next_due(), Some(30));
        line.hold(40, key(), &[5; 20]);
        assert_eq!(line.held.len(), 4, "a freed buffer is reused");
    }

    #[test]
    fn peers_get_their_own_link_and_others_the_default() {
        let emulation =
            Emulation { all: Some("delay 1ms".parse().unwrap()), to: vec![Emulation::parse_to("h2=delay 5ms").unwrap()], seed: 1, known: Vec::new() };
        let links = Arc::new(Links::new(emulation, 0));
        let h2 = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2));
        let h3 = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 3));
        assert!(!links.all_known());
        links.learn("h2", &[h2]);
        assert!(links.all_known());
        let mut s = links.shaper().expect("on");
        let entry = [0u8; VNET_HDR_LEN + 20];
        assert_eq!(s.admit(&entry, key(), Flow::unicast(h2, 0), 0), 0);
        assert_eq!(s.admit(&entry, key(), Flow::unicast(h3, 0), 0), 0);
        assert_eq!(s.admit(&entry, key(), Flow::FLOOD, 0), 0);
        assert_eq!(s.next_due(), Some(1_000_000));
        let mut at = Vec::new();
        s.release(10_000_000, |_, _| {
            at.push(());
            true
        });
        assert_eq!(at.len(), 3);
        assert!(Emulation::parse_to("h2").unwrap_err().contains("PEER=SPEC"));
        assert!(Emulation::parse_to("=delay 1ms").unwrap_err().contains("empty"));
    }
}
