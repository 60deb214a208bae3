//! The userspace port: many endpoints (names and addresses) whose IP stacks live in this
//! process (smoltcp, `Medium::Ip`, decision 0022), behind one [`Port`] of a queue worker.
//! No privileges, no `/dev/net/tun`, no Linux-only call: the path a macOS build takes.
//!
//! Runs on the worker's thread; `write`, `read` and `poll` are the hot path.
//!
//! - [`Port::write`] (a packet from the bus) cuts a super-packet into wire-sized packets
//!   (`codec::segment`), finds the endpoint owning each destination (one hash map; group
//!   addresses go to every endpoint but the sender) and queues it in the **inbox** (a
//!   bounded ring: full means dropped, as a full TUN queue drops).
//! - [`Port::poll`] (with the caller's `now`: nothing here reads a clock) hands queued
//!   packets to their endpoint's stack one at a time, runs the host sockets that are ready
//!   (`--forward`, `--expose`, `--socks5`: `host.rs`, one `mio::Poll` for all of them) and
//!   the timers that are due. The stacks' packets land in the **outbox** (a bounded ring);
//!   while it is full, no more input is handed to the stacks.
//! - [`Port::read`] returns the outbox's packets, each behind a plain virtio header.
//! - [`Port::poll_at`]: now while the inbox holds packets, else the earliest timer of the
//!   endpoints that have sockets. [`Port::fd`]: the `mio::Poll`'s descriptor (epoll on
//!   Linux, kqueue on macOS), readable when a host socket is ready.
//!
//! Endpoints with no sockets (the lab's hosts) cost nothing per poll: the stack answers
//! pings and refuses connections (RST, port unreachable) from inside `poll_ingress_single`;
//! only endpoints with host services are scanned for timers.
//!
//! Memory (measured by `examples/userspace_endpoints.rs`, 10,000 endpoints in one port):
//! an idle endpoint holds its `Interface` (360 B: addresses, routes, state), an empty
//! socket set, its name, addresses and map entries: 957 bytes of heap in all. A port holds
//! its two rings (`Limits::inbox` and `Limits::outbox` slots of `Limits::mtu` bytes: 0.75
//! MiB at the defaults) and a 64 KiB scratch buffer (818 KiB). A TCP connection holds two
//! stack buffers of `Limits::tcp_buffer` (512 KiB each: the window, which a round trip
//! through the bus must fill), the socket (448 B) and a relay; a UDP flow two buffers of `Limits::udp_buffer` (16 KiB each).
//!
//! Nothing allocates per packet in steady state: rings and scratch are allocated when the
//! port is built, the segmenter keeps its buffer; sockets and their buffers are allocated
//! per connection or flow.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};

use crate::codec::segment::Segmenter;
use crate::codec::v1::VNET_HDR_LEN;
use crate::codec::vnet;
use crate::port::{Layer, Port};
use crate::route::Prefix;

mod dest;
mod host;
mod ping;
mod ring;
mod socks5;
pub mod spec;

pub use spec::{Expose, Forward, Proto, Socks5, SpecError};

use dest::{Inbound, Refusal};
use ring::Ring;

/// Addresses per endpoint, the link-local included (smoltcp's `iface-max-addr-count-8`,
/// chosen in Cargo.toml).
pub const MAX_ADDRS: usize = 8;

/// The inbox tag of a packet for every endpoint.
const GROUP: u32 = u32::MAX;

/// What marks the payload of the port's own echo requests (after the 8-byte send time).
const PING_MAGIC: &[u8; 8] = b"tunbusUS";

/// Bounds of one port and of what its endpoints may hold.
#[derive(Clone, Debug)]
pub struct Limits {
    /// IP MTU of every endpoint; also the size of a ring slot.
    pub mtu: usize,
    /// Packets from the bus waiting for the stacks.
    pub inbox: usize,
    /// Packets the stacks emitted, waiting for `read`.
    pub outbox: usize,
    /// Each of a TCP connection's two stack buffers: its window. 512 KiB: at 64 KiB one flow
    /// through `--forward` ran at 0.12x a TUN agent's, at 512 KiB 0.37x (perf/userspace.py,
    /// docs/decisions/0022-userspace-stack.md).
    pub tcp_buffer: usize,
    /// Each of a UDP socket's two stack buffers, and the datagrams each holds.
    pub udp_buffer: usize,
    pub udp_packets: usize,
    /// TCP connections per endpoint (forward, expose and SOCKS5 together).
    pub connections: usize,
    /// UDP flows per forward, expose or association.
    pub udp_flows: usize,
    /// A UDP flow with no datagram for this long is closed.
    pub udp_idle: Duration,
    /// A stack TCP connection whose peer is silent this long (connect, or data unacked) is
    /// aborted.
    pub tcp_timeout: Duration,
    /// Ping replies kept until taken.
    pub ping_replies: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            mtu: 1500,
            inbox: 256,
            outbox: 256,
            tcp_buffer: 512 * 1024,
            udp_buffer: 16 * 1024,
            udp_packets: 32,
            connections: 1024,
            udp_flows: 256,
            udp_idle: Duration::from_secs(60),
            tcp_timeout: Duration::from_secs(20),
            ping_replies: 4096,
        }
    }
}

/// One port: which worker it belongs to, how its stacks are seeded, its bounds.
#[derive(Clone, Debug)]
pub struct PortConfig {
    /// The worker's queue index (logs).
    pub index: usize,
    /// Seeds the stacks' generators (TCP initial sequence numbers, ports, ping ids): give
    /// each process a different one (the agent: time and pid).
    pub seed: u64,
    pub limits: Limits,
}

/// The host services of one endpoint.
#[derive(Clone, Debug, Default)]
pub struct Services {
    pub forwards: Vec<Forward>,
    pub exposes: Vec<Expose>,
    pub socks5: Option<Socks5>,
}

impl Services {
    fn is_empty(&self) -> bool {
        self.forwards.is_empty() && self.exposes.is_empty() && self.socks5.is_none()
    }
}

/// One endpoint: its name, its addresses and the host services it offers.
#[derive(Clone, Debug)]
pub struct EndpointConfig {
    pub name: String,
    /// `--ipv4`/`--ipv6` prefixes.
    pub addrs: Vec<Prefix>,
    /// Its IPv6 link-local address (`AgentConfig::link_local`), owned like the others.
    pub link_local: Ipv6Addr,
    pub services: Services,
}

/// An endpoint of a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointId(u32);

impl EndpointId {
    pub fn index(self) -> usize {
        self.0 as usize
    }

    /// The endpoint added `index`-th to its port (they are numbered in order from 0).
    pub fn from_index(index: usize) -> Option<EndpointId> {
        u32::try_from(index).ok().filter(|&i| i < GROUP).map(EndpointId)
    }
}

/// Why a port or an endpoint could not be built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("endpoint {name:?}: {what}")]
    Endpoint { name: String, what: String },
    #[error("endpoint {name:?}: {service}: cannot listen on {addr}: {source}")]
    Listen { name: String, service: String, addr: SocketAddr, source: io::Error },
    #[error("the userspace port's poller: {0}")]
    Poller(io::Error),
}

/// Why a ping was not sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PingError {
    #[error("no such endpoint")]
    NoEndpoint,
    #[error("the endpoint has no address of the destination's family")]
    NoSource,
    #[error("the outbox is full")]
    Full,
}

/// A reply to one of the port's pings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PingReply {
    pub endpoint: EndpointId,
    pub from: IpAddr,
    pub seq: u16,
    pub rtt: Duration,
}

/// What the port counted (drops by reason, host-side events). Read by the worker's
/// report; never logged per packet.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Units written by the worker and packets read by it.
    pub from_bus: u64,
    pub to_bus: u64,
    /// Dropped from the bus: no endpoint owns the destination, not IP, IPv4/IPv6
    /// fragments, echo requests to group addresses, offload the segmenter refused, larger
    /// than the MTU, the inbox full.
    pub no_endpoint: u64,
    pub not_ip: u64,
    pub fragments: u64,
    pub echo_to_group: u64,
    pub bad_offload: u64,
    pub too_big: u64,
    pub inbox_full: u64,
    /// Packets a stack emitted with no room in the outbox, or larger than a slot.
    pub outbox_full: u64,
    /// Packets dropped because `read`'s buffer was too small.
    pub read_too_small: u64,
    /// TCP connections carried by forwards, taken by exposes, and refused (limits, failed
    /// connects to the host service).
    pub tcp_forwarded: u64,
    pub tcp_exposed: u64,
    pub tcp_refused: u64,
    pub udp_dropped: u64,
    pub socks5_clients: u64,
    /// SOCKS5 clients closed for bytes that are not SOCKS5, and requests refused (names,
    /// BIND, unreachable or refusing targets).
    pub socks5_garbage: u64,
    pub socks5_refused: u64,
    pub ping_replies_dropped: u64,
}

struct Endpoint {
    id: u32,
    name: Box<str>,
    addrs: Box<[Prefix]>,
    ident: u16,
    iface: Interface,
    sockets: SocketSet<'static>,
    host: Option<Box<host::Host>>,
    next_at: Option<Instant>,
    dirty: bool,
}

/// The stacks' device: at most one input packet, and the outbox for what they emit.
struct Wire<'a> {
    input: Option<&'a [u8]>,
    outbox: &'a mut Ring,
    spill: &'a mut Vec<u8>,
    dropped: &'a mut u64,
    tag: u32,
    mtu: usize,
}

struct RxOne<'a>(&'a [u8]);

struct TxOne<'a> {
    outbox: &'a mut Ring,
    spill: &'a mut Vec<u8>,
    dropped: &'a mut u64,
    tag: u32,
}

impl phy::RxToken for RxOne<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl phy::TxToken for TxOne<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        match self.outbox.push_with(self.tag, len, f) {
            Ok(r) => r,
            Err(f) => {
                // No room (a reply to input handed over while the outbox filled): the
                // packet is built and dropped, as a full device drops.
                *self.dropped += 1;
                self.spill.clear();
                self.spill.resize(len, 0);
                f(self.spill)
            }
        }
    }
}

impl phy::Device for Wire<'_> {
    type RxToken<'b>
        = RxOne<'b>
    where
        Self: 'b;
    type TxToken<'b>
        = TxOne<'b>
    where
        Self: 'b;

    fn receive(&mut self, _: smoltcp::time::Instant) -> Option<(RxOne<'_>, TxOne<'_>)> {
        let p = self.input.take()?;
        Some((RxOne(p), TxOne { outbox: self.outbox, spill: self.spill, dropped: self.dropped, tag: self.tag }))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<TxOne<'_>> {
        if self.outbox.is_full() {
            return None;
        }
        Some(TxOne { outbox: self.outbox, spill: self.spill, dropped: self.dropped, tag: self.tag })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        caps
    }
}

/// The host stack of many endpoints behind one worker.
pub struct UserspacePort {
    index: usize,
    epoch: Instant,
    now: Instant,
    seed: u64,
    limits: Limits,
    endpoints: Vec<Endpoint>,
    owners: HashMap<IpAddr, u32>,
    inbox: Ring,
    outbox: Ring,
    /// The next endpoint to get the inbox's front packet when it is for every endpoint.
    group_next: usize,
    segmenter: Segmenter,
    spill: Vec<u8>,
    poll: mio::Poll,
    events: mio::Events,
    scratch: Vec<u8>,
    dirty: Vec<u32>,
    /// Endpoints with host services (the only ones with timers).
    active: Vec<u32>,
    earliest: Option<Instant>,
    pings: VecDeque<PingReply>,
    last_read: Option<EndpointId>,
    counters: Counters,
    /// Pings asked for from other threads ([`Pinger`]), when someone holds a handle.
    pinger: Option<Arc<Mutex<PingBook>>>,
}

/// Pings asked for from another thread and the replies they got.
#[derive(Default)]
struct PingBook {
    asks: Vec<(EndpointId, IpAddr, u16)>,
    replies: Vec<PingReply>,
}

/// A handle with which another thread (the lab's checks) has the port's endpoints ping;
/// the port sends them on its next `poll` (the handle wakes its worker).
#[derive(Clone)]
pub struct Pinger {
    book: Arc<Mutex<PingBook>>,
    waker: Arc<mio::Waker>,
}

impl Pinger {
    /// Endpoint `from` pings `dst` with sequence number `seq`.
    pub fn ask(&self, from: EndpointId, dst: IpAddr, seq: u16) {
        if let Ok(mut b) = self.book.lock() {
            b.asks.push((from, dst, seq));
        }
        let _ = self.waker.wake();
    }

    /// The replies received since the last call.
    pub fn replies(&self) -> Vec<PingReply> {
        self.book.lock().map(|mut b| std::mem::take(&mut b.replies)).unwrap_or_default()
    }
}

/// The token of the [`Pinger`]'s waker (no endpoint has it).
const WAKER: mio::Token = mio::Token(usize::MAX);

/// smoltcp's time: microseconds since the port's epoch.
fn stamp(epoch: Instant, t: Instant) -> smoltcp::time::Instant {
    smoltcp::time::Instant::from_micros(t.saturating_duration_since(epoch).as_micros() as i64)
}

fn unstamp(epoch: Instant, t: smoltcp::time::Instant) -> Instant {
    epoch + Duration::from_micros(t.total_micros().max(0) as u64)
}

impl UserspacePort {
    /// An empty port; `now` is its epoch (the stacks' time zero).
    pub fn new(config: PortConfig, now: Instant) -> Result<UserspacePort, Error> {
        let limits = config.limits;
        let slot = limits.mtu.max(1280);
        Ok(UserspacePort {
            index: config.index,
            epoch: now,
            now,
            seed: config.seed,
            inbox: Ring::new(limits.inbox, slot),
            outbox: Ring::new(limits.outbox, slot),
            limits,
            endpoints: Vec::new(),
            owners: HashMap::new(),
            group_next: 0,
            segmenter: Segmenter::new(),
            spill: Vec::new(),
            poll: mio::Poll::new().map_err(Error::Poller)?,
            events: mio::Events::with_capacity(256),
            scratch: vec![0; 65536 + 64],
            dirty: Vec::new(),
            active: Vec::new(),
            earliest: None,
            pings: VecDeque::new(),
            last_read: None,
            counters: Counters::default(),
            pinger: None,
        })
    }

    /// A handle for other threads to have endpoints ping (see [`Pinger`]).
    pub fn pinger(&mut self) -> Result<Pinger, Error> {
        let book = self.pinger.get_or_insert_with(Default::default).clone();
        let waker = mio::Waker::new(self.poll.registry(), WAKER).map_err(Error::Poller)?;
        Ok(Pinger { book, waker: Arc::new(waker) })
    }

    /// Sends the pings other threads asked for; hands them the replies.
    fn serve_pinger(&mut self, now: Instant) {
        let Some(book) = self.pinger.clone() else { return };
        let Ok(mut b) = book.lock() else { return };
        for (from, dst, seq) in std::mem::take(&mut b.asks) {
            let _ = self.ping(from, dst, seq, now);
        }
        b.replies.extend(self.pings.drain(..));
    }

    /// Adds an endpoint: its stack with its addresses (and default routes through them),
    /// and its host services (listeners bound now: a port in use is an error here).
    pub fn add_endpoint(&mut self, config: EndpointConfig, now: Instant) -> Result<EndpointId, Error> {
        let bad = |what: String| Error::Endpoint { name: config.name.clone(), what };
        let id = u32::try_from(self.endpoints.len()).ok().filter(|&i| i < GROUP).ok_or_else(|| bad("too many endpoints in one port".into()))?;
        if config.name.is_empty() {
            return Err(bad("the name is empty".into()));
        }
        if config.link_local.segments()[0] & 0xffc0 != 0xfe80 {
            return Err(bad(format!("link-local address {} is not in fe80::/10", config.link_local)));
        }
        let mut addrs = config.addrs.clone();
        addrs.push(Prefix { addr: IpAddr::V6(config.link_local), len: 64 });
        if addrs.len() > MAX_ADDRS {
            return Err(bad(format!("{} addresses with the link-local; an endpoint has at most {MAX_ADDRS}", addrs.len())));
        }
        for (i, p) in addrs.iter().enumerate() {
            let a = p.addr;
            let unicast = match a {
                IpAddr::V4(v) => !(v.is_unspecified() || v.is_multicast() || v.is_broadcast() || v.is_loopback()),
                IpAddr::V6(v) => !(v.is_unspecified() || v.is_multicast() || v.is_loopback()),
            };
            if !unicast {
                return Err(bad(format!("{a} is not a unicast address")));
            }
            if let Some(&other) = self.owners.get(&a) {
                return Err(bad(format!("{a} already belongs to endpoint {:?}", self.endpoints[other as usize].name)));
            }
            if addrs[..i].iter().any(|q| q.addr == a) {
                return Err(bad(format!("{a} is given twice")));
            }
        }
        let t = stamp(self.epoch, now);
        let mut wire =
            Wire { input: None, outbox: &mut self.outbox, spill: &mut self.spill, dropped: &mut self.counters.outbox_full, tag: id, mtu: self.limits.mtu };
        let mut cfg = Config::new(HardwareAddress::Ip);
        cfg.random_seed = crate::util::splitmix64(self.seed ^ u64::from(id).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut iface = Interface::new(cfg, &mut wire, t);
        iface.update_ip_addrs(|a| {
            for p in &addrs {
                // cannot fail: at most MAX_ADDRS, checked above
                let _ = a.push(IpCidr::new(IpAddress::from(p.addr), p.len));
            }
        });
        if let Some(IpAddr::V4(v4)) = addrs.iter().map(|p| p.addr).find(IpAddr::is_ipv4) {
            let _ = iface.routes_mut().add_default_ipv4_route(v4);
        }
        let _ = iface.routes_mut().add_default_ipv6_route(config.link_local);
        let mut sockets = SocketSet::new(Vec::new());
        let host = if config.services.is_empty() {
            None
        } else {
            let s = &config.services;
            if s.forwards.len() > host::MAX_SERVICES || s.exposes.len() > host::MAX_SERVICES {
                return Err(bad(format!("more than {} forwards or exposes", host::MAX_SERVICES)));
            }
            let h = host::Host::open(id, &s.forwards, &s.exposes, s.socks5.as_ref(), self.poll.registry(), &mut sockets, &self.limits, cfg_seed(self.seed, id))
                .map_err(|e| Error::Listen { name: config.name.clone(), service: e.service, addr: e.addr, source: e.source })?;
            Some(Box::new(h))
        };
        for p in &addrs {
            self.owners.insert(p.addr, id);
        }
        let has_host = host.is_some();
        self.endpoints.push(Endpoint {
            id,
            name: config.name.into_boxed_str(),
            addrs: addrs.into_boxed_slice(),
            ident: (crate::util::splitmix64(self.seed) as u16) ^ (id as u16),
            iface,
            sockets,
            host,
            next_at: has_host.then_some(now),
            dirty: false,
        });
        if has_host {
            self.active.push(id);
            self.earliest = Some(now);
        }
        Ok(EndpointId(id))
    }

    /// How many endpoints the port hosts.
    pub fn endpoint_count(&self) -> usize {
        self.endpoints.len()
    }

    /// An endpoint's name and addresses (the link-local last).
    pub fn endpoint(&self, id: EndpointId) -> Option<(&str, &[Prefix])> {
        self.endpoints.get(id.index()).map(|e| (&*e.name, &*e.addrs))
    }

    /// The endpoint that owns `addr`.
    pub fn owner(&self, addr: IpAddr) -> Option<EndpointId> {
        self.owners.get(&addr).map(|&i| EndpointId(i))
    }

    /// Every address the port's endpoints own: what its worker binds on the bus.
    pub fn owned_addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.endpoints.iter().flat_map(|e| e.addrs.iter().map(|p| p.addr))
    }

    /// The endpoint whose packet the last [`Port::read`] returned (for its flood key and
    /// its identity).
    pub fn last_read_endpoint(&self) -> Option<EndpointId> {
        self.last_read
    }

    /// The host addresses an endpoint's forwards and SOCKS5 server listen on.
    pub fn listening(&self, id: EndpointId) -> Vec<SocketAddr> {
        self.endpoints.get(id.index()).and_then(|e| e.host.as_ref()).map(|h| h.listening()).unwrap_or_default()
    }

    /// Open TCP connections of an endpoint's host services.
    pub fn connections(&self, id: EndpointId) -> usize {
        self.endpoints.get(id.index()).and_then(|e| e.host.as_ref()).map_or(0, |h| h.connections())
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Sends an echo request from endpoint `id` to `dst` (from its link-local address for
    /// link-local and multicast destinations). Replies come out of [`Self::ping_replies`].
    pub fn ping(&mut self, id: EndpointId, dst: IpAddr, seq: u16, now: Instant) -> Result<(), PingError> {
        let e = self.endpoints.get(id.index()).ok_or(PingError::NoEndpoint)?;
        let src = source_for(&e.addrs, dst).ok_or(PingError::NoSource)?;
        let mut data = [0u8; 56];
        data[..8].copy_from_slice(&(now.saturating_duration_since(self.epoch).as_nanos() as u64).to_be_bytes());
        data[8..16].copy_from_slice(PING_MAGIC);
        let echo = ping::Echo { src, dst, ident: e.ident, seq, data: &data };
        let len = ping::request_len(&echo);
        match self.outbox.push_with(id.0, len, |b| ping::write_request(b, &echo)) {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(PingError::NoSource),
            Err(_) => Err(PingError::Full),
        }
    }

    /// The replies to [`Self::ping`] received so far.
    pub fn ping_replies(&mut self) -> impl Iterator<Item = PingReply> + '_ {
        self.pings.drain(..)
    }

    /// Bytes held by the port itself (rings, scratch), without its endpoints.
    pub fn fixed_footprint(&self) -> usize {
        self.inbox.footprint() + self.outbox.footprint() + self.scratch.len()
    }

    /// Readiness of host sockets: flags set on their owners, owners marked for service.
    fn host_events(&mut self) {
        if self.active.is_empty() && self.pinger.is_none() {
            return;
        }
        for _ in 0..4 {
            if self.poll.poll(&mut self.events, Some(Duration::ZERO)).is_err() {
                return;
            }
            let mut n = 0;
            for ev in self.events.iter() {
                n += 1;
                let (ep, local) = host::split_token(ev.token());
                let Some(e) = self.endpoints.get_mut(ep as usize) else {
                    continue;
                };
                let Some(h) = e.host.as_mut() else { continue };
                let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
                let writable = ev.is_writable() || ev.is_write_closed() || ev.is_error();
                h.event(local, readable, writable);
                if !e.dirty {
                    e.dirty = true;
                    self.dirty.push(ep);
                }
            }
            if n < self.events.capacity() {
                return;
            }
        }
    }

    /// Hands queued packets to their stacks while the outbox has room.
    fn deliver(&mut self, now: Instant) {
        let t = stamp(self.epoch, now);
        let mtu = self.limits.mtu;
        while !self.outbox.is_full() {
            let Some((tag, pkt)) = self.inbox.front() else {
                break;
            };
            if tag == GROUP {
                let sender = match dest::inbound(pkt) {
                    Inbound::Group { src } => self.owners.get(&src).copied(),
                    _ => None,
                };
                let mut i = self.group_next;
                while i < self.endpoints.len() && !self.outbox.is_full() {
                    let e = &mut self.endpoints[i];
                    if Some(e.id) != sender {
                        let mut wire = Wire {
                            input: Some(pkt),
                            outbox: &mut self.outbox,
                            spill: &mut self.spill,
                            dropped: &mut self.counters.outbox_full,
                            tag: e.id,
                            mtu,
                        };
                        e.iface.poll_ingress_single(t, &mut wire, &mut e.sockets);
                        if e.host.is_some() && !e.dirty {
                            e.dirty = true;
                            self.dirty.push(e.id);
                        }
                    }
                    i += 1;
                }
                if i < self.endpoints.len() {
                    self.group_next = i;
                    return;
                }
                self.group_next = 0;
            } else if let Some(e) = self.endpoints.get_mut(tag as usize) {
                let ours = ping::parse_reply(pkt).filter(|r| r.ident == e.ident && r.data.get(8..16) == Some(&PING_MAGIC[..]));
                if let Some(r) = ours {
                    let sent = r.data.get(..8).map_or(0, |b| u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]));
                    let rtt = now.saturating_duration_since(self.epoch + Duration::from_nanos(sent));
                    if self.pings.len() < self.limits.ping_replies {
                        self.pings.push_back(PingReply { endpoint: EndpointId(e.id), from: r.src, seq: r.seq, rtt });
                    } else {
                        self.counters.ping_replies_dropped += 1;
                    }
                } else {
                    let mut wire =
                        Wire { input: Some(pkt), outbox: &mut self.outbox, spill: &mut self.spill, dropped: &mut self.counters.outbox_full, tag: e.id, mtu };
                    e.iface.poll_ingress_single(t, &mut wire, &mut e.sockets);
                    if let Some(h) = e.host.as_mut() {
                        // A listener that took a connection is replaced before the next
                        // packet, so a burst of SYNs finds one each.
                        let mut cx =
                            host::Ctx { registry: self.poll.registry(), counters: &mut self.counters, limits: &self.limits, scratch: &mut self.scratch, now };
                        h.rearm_exposes(&mut cx, e.id, &mut e.sockets);
                        if !e.dirty {
                            e.dirty = true;
                            self.dirty.push(e.id);
                        }
                    }
                }
            }
            self.inbox.pop();
        }
    }

    /// Runs endpoint `i`'s host side, then its stack's timers and transmissions.
    fn service(&mut self, i: u32, now: Instant) {
        let Some(e) = self.endpoints.get_mut(i as usize) else {
            return;
        };
        e.dirty = false;
        let t = stamp(self.epoch, now);
        // Host side, then the stack's transmissions; once more when the stack changed a
        // socket's state (a connection opened, reset or timed out), so the host side
        // learns of it now rather than at the next event.
        for round in 0..2 {
            if let Some(h) = e.host.as_mut() {
                let mut cx = host::Ctx { registry: self.poll.registry(), counters: &mut self.counters, limits: &self.limits, scratch: &mut self.scratch, now };
                h.service(&mut cx, e.id, &mut e.iface, &mut e.sockets);
            }
            let mut wire = Wire {
                input: None,
                outbox: &mut self.outbox,
                spill: &mut self.spill,
                dropped: &mut self.counters.outbox_full,
                tag: e.id,
                mtu: self.limits.mtu,
            };
            let changed = e.iface.poll(t, &mut wire, &mut e.sockets);
            if round == 1 || e.host.is_none() || changed == smoltcp::iface::PollResult::None {
                break;
            }
        }
        let stack = e.iface.poll_at(t, &e.sockets).map(|x| unstamp(self.epoch, x));
        let host = e.host.as_ref().and_then(|h| h.deadline(self.limits.udp_idle, self.limits.tcp_timeout));
        e.next_at = match (stack, host) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if e.host.as_ref().is_some_and(|h| h.reap_pending(&e.sockets)) {
            e.next_at = Some(now);
        }
    }
}

fn cfg_seed(seed: u64, id: u32) -> u64 {
    crate::util::splitmix64(seed.rotate_left(17) ^ u64::from(id))
}

/// The source address an endpoint uses towards `dst`: the link-local for link-local and
/// multicast IPv6 destinations, else the first address of the family.
fn source_for(addrs: &[Prefix], dst: IpAddr) -> Option<IpAddr> {
    let v6_local = match dst {
        IpAddr::V6(d) => d.is_multicast() || d.segments()[0] & 0xffc0 == 0xfe80,
        IpAddr::V4(_) => false,
    };
    let mut family = addrs.iter().map(|p| p.addr).filter(|a| a.is_ipv4() == dst.is_ipv4());
    if v6_local {
        return family.find(|a| matches!(a, IpAddr::V6(v) if v.segments()[0] & 0xffc0 == 0xfe80));
    }
    let mut v = family.clone().filter(|a| !matches!(a, IpAddr::V6(v) if v.segments()[0] & 0xffc0 == 0xfe80));
    v.next().or_else(|| family.next())
}

/// Queues one wire-sized packet from the bus for its endpoint(s); false when dropped for
/// lack of room.
fn accept(inbox: &mut Ring, owners: &HashMap<IpAddr, u32>, counters: &mut Counters, packet: &[u8]) -> bool {
    let tag = match dest::inbound(packet) {
        Inbound::Unicast(dst) => match owners.get(&dst) {
            Some(&id) => id,
            None => {
                counters.no_endpoint += 1;
                return true;
            }
        },
        Inbound::Group { .. } => GROUP,
        Inbound::Refused(r) => {
            match r {
                Refusal::NotIp => counters.not_ip += 1,
                Refusal::Fragment => counters.fragments += 1,
                Refusal::EchoToGroup => counters.echo_to_group += 1,
            }
            return true;
        }
    };
    if packet.len() > inbox.slot_size() {
        counters.too_big += 1;
        return true;
    }
    if !inbox.push(tag, packet) {
        counters.inbox_full += 1;
        return false;
    }
    true
}

impl Port for UserspacePort {
    fn layer(&self) -> Layer {
        Layer::Ip
    }

    fn index(&self) -> usize {
        self.index
    }

    fn fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.poll.registry().as_fd())
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let Some((tag, pkt)) = self.outbox.front() else {
            return Ok(None);
        };
        let n = VNET_HDR_LEN + pkt.len();
        let Some(out) = buf.get_mut(..n) else {
            self.outbox.pop();
            self.counters.read_too_small += 1;
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "read buffer smaller than the packet"));
        };
        out[..VNET_HDR_LEN].copy_from_slice(&vnet::PLAIN);
        out[VNET_HDR_LEN..].copy_from_slice(pkt);
        self.last_read = Some(EndpointId(tag));
        self.outbox.pop();
        self.counters.to_bus += 1;
        Ok(Some(n))
    }

    fn write(&mut self, vnet_hdr: &[u8; VNET_HDR_LEN], unit: &[u8]) -> io::Result<()> {
        self.counters.from_bus += 1;
        // A batch can bring a whole TCP window (512 KiB: hundreds of segments) at once; the
        // worker polls the stacks after its writes, so hand what waits to them now, before
        // the inbox fills and refuses.
        if self.inbox.len() * 2 >= self.inbox.capacity() {
            self.deliver(self.now);
        }
        let (inbox, owners, counters) = (&mut self.inbox, &self.owners, &mut self.counters);
        let mut full = false;
        let cut = self.segmenter.segments(Some(vnet_hdr), unit, |p| full |= !accept(inbox, owners, counters, p));
        if cut.is_err() {
            self.counters.bad_offload += 1;
        }
        if full {
            return Err(io::Error::new(io::ErrorKind::WouldBlock, "the userspace port's inbox is full"));
        }
        Ok(())
    }

    fn unit_sender(&self) -> Option<&str> {
        // One endpoint: it is the agent, whose own flood key the worker has.
        if self.endpoints.len() < 2 {
            return None;
        }
        self.last_read.and_then(|id| self.endpoint(id)).map(|(name, _)| name)
    }

    fn poll_at(&self) -> Option<Instant> {
        if !self.inbox.is_empty() {
            return Some(self.now);
        }
        self.earliest
    }

    fn poll(&mut self, now: Instant) -> bool {
        self.now = now;
        self.host_events();
        self.deliver(now);
        self.serve_pinger(now);
        for k in 0..self.active.len() {
            let i = self.active[k];
            let e = &mut self.endpoints[i as usize];
            if !e.dirty && e.next_at.is_some_and(|t| t <= now) {
                e.dirty = true;
                self.dirty.push(i);
            }
        }
        while let Some(i) = self.dirty.pop() {
            self.service(i, now);
        }
        self.earliest = self.active.iter().filter_map(|&i| self.endpoints[i as usize].next_at).min();
        !self.outbox.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    #[test]
    fn source_addresses_follow_the_destination() {
        let addrs = [prefix("198.18.0.1/24"), prefix("fd00::1/64"), prefix("fe80::1/64")];
        let src = |d: &str| source_for(&addrs, d.parse().unwrap()).map(|a| a.to_string());
        assert_eq!(src("198.18.0.2").as_deref(), Some("198.18.0.1"));
        assert_eq!(src("fd00::2").as_deref(), Some("fd00::1"));
        assert_eq!(src("fe80::2").as_deref(), Some("fe80::1"));
        assert_eq!(src("ff02::1").as_deref(), Some("fe80::1"));
        let only_ll = [prefix("fe80::1/64")];
        assert_eq!(source_for(&only_ll, "fd00::2".parse().unwrap()), Some("fe80::1".parse().unwrap()));
        assert_eq!(source_for(&only_ll, "198.18.0.2".parse().unwrap()), None);
    }

    fn endpoint(name: &str, v4: &str, v6: &str, ll: &str) -> EndpointConfig {
        EndpointConfig { name: name.into(), addrs: vec![prefix(v4), prefix(v6)], link_local: ll.parse().unwrap(), services: Services::default() }
    }

    #[test]
    fn endpoints_are_checked_when_added() {
        let now = Instant::now();
        let mut p = UserspacePort::new(PortConfig { index: 0, seed: 1, limits: Limits::default() }, now).unwrap();
        let a = p.add_endpoint(endpoint("a", "198.18.0.1/24", "fd00::1/64", "fe80::1"), now).unwrap();
        assert_eq!(p.owner("fe80::1".parse().unwrap()), Some(a));
        let e = p.add_endpoint(endpoint("b", "198.18.0.1/24", "fd00::2/64", "fe80::2"), now).unwrap_err().to_string();
        assert!(e.contains("198.18.0.1 already belongs to endpoint \"a\""), "{e}");
        let e = p.add_endpoint(endpoint("b", "198.18.0.2/24", "fd00::2/64", "fd00::3"), now).unwrap_err().to_string();
        assert!(e.contains("not in fe80::/10"), "{e}");
        let e = p.add_endpoint(endpoint("b", "224.0.0.1/24", "fd00::2/64", "fe80::2"), now).unwrap_err().to_string();
        assert!(e.contains("not a unicast address"), "{e}");
        let mut many = endpoint("b", "198.18.0.2/24", "fd00::2/64", "fe80::2");
        many.addrs.extend((10..20).map(|i| prefix(&format!("198.18.1.{i}/24"))));
        let e = p.add_endpoint(many, now).unwrap_err().to_string();
        assert!(e.contains("at most 8"), "{e}");
        assert_eq!(p.endpoint_count(), 1, "refused endpoints leave nothing behind");
        assert_eq!(p.owned_addresses().count(), 3);
    }
}
