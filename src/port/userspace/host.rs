//! The host side of one userspace endpoint: `--forward`, `--expose` and `--socks5`. Owns
//! the endpoint's host sockets (non-blocking, registered with the port's `mio::Poll`) and
//! the stack sockets they are paired with, and moves bytes between the two without an
//! intermediate buffer for TCP (host reads land in the stack socket's send buffer, the
//! stack's receive buffer is written to the host socket directly). Runs on the worker's
//! thread when the port services the endpoint; not per packet, but per readiness change.
//!
//! Portable: only std and mio (epoll on Linux, kqueue on macOS); no Linux-only call.
//!
//! Memory per TCP connection (forward, expose or SOCKS5 CONNECT): the stack socket's two
//! buffers (`Limits::tcp_buffer` each, 512 KiB by default), its state (448 B), and a
//! `Relay` (a host stream and flags; SOCKS5 clients add a 512-byte handshake buffer). A UDP flow holds one
//! stack socket with `Limits::udp_buffer` bytes each way (or a host socket for exposes).

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream, UdpSocket};
use mio::{Interest, Registry, Token};
use smoltcp::iface::{Interface, SocketHandle, SocketSet};
use smoltcp::socket::{tcp, udp};
use smoltcp::wire::{IpEndpoint, IpListenEndpoint};

use super::socks5::{self, Reply, Target};
use super::spec::{Expose, Forward, Proto, Socks5};
use super::{Counters, Limits};

/// Token kinds (bits 28..32 of the endpoint-local token).
const K_FWD_TCP: u32 = 1;
const K_FWD_UDP: u32 = 2;
const K_SOCKS: u32 = 3;
const K_RELAY: u32 = 4;
const K_EXPOSE_FLOW: u32 = 5;
const K_ASSOC: u32 = 6;

/// Most forwards or exposes per endpoint (12 bits of a token).
pub const MAX_SERVICES: usize = 4096;

/// A mio token naming endpoint `ep`'s socket `local`.
pub fn token(ep: u32, local: u32) -> Token {
    Token(((ep as usize) << 32) | local as usize)
}

/// The endpoint and local part of a token.
pub fn split_token(t: Token) -> (u32, u32) {
    ((t.0 >> 32) as u32, t.0 as u32)
}

fn local(kind: u32, a: usize, b: usize) -> u32 {
    (kind << 28) | ((a as u32 & 0xfff) << 16) | (b as u32 & 0xffff)
}

fn relay_token(slot: usize) -> u32 {
    (K_RELAY << 28) | (slot as u32 & 0x0fff_ffff)
}

/// What the port gives an endpoint's host side when servicing it.
pub struct Ctx<'a> {
    pub registry: &'a Registry,
    pub counters: &'a mut Counters,
    pub limits: &'a Limits,
    pub scratch: &'a mut [u8],
    pub now: Instant,
}

/// Why an endpoint's services could not start.
#[derive(Debug)]
pub struct ListenError {
    pub service: String,
    pub addr: SocketAddr,
    pub source: io::Error,
}

struct TcpForward {
    listener: TcpListener,
    bus: SocketAddr,
    pending: bool,
}

struct UdpForward {
    socket: UdpSocket,
    bus: SocketAddr,
    readable: bool,
    /// Per local peer: its stack socket.
    flows: Vec<ForwardFlow>,
}

struct ForwardFlow {
    peer: SocketAddr,
    handle: SocketHandle,
    last: Instant,
}

struct TcpExpose {
    port: u16,
    local: SocketAddr,
    listener: SocketHandle,
}

struct UdpExpose {
    local: SocketAddr,
    handle: SocketHandle,
    /// Per bus peer: a host socket connected to `local`.
    flows: Vec<Option<ExposeFlow>>,
}

struct ExposeFlow {
    bus_peer: IpEndpoint,
    bus_local: Option<smoltcp::wire::IpAddress>,
    socket: UdpSocket,
    readable: bool,
    last: Instant,
}

/// A SOCKS5 client's progress.
enum Socks {
    Greeting,
    Request,
    /// The stack connection is being opened; `from` is when.
    Connecting {
        from: Instant,
    },
    Relaying,
    /// UDP ASSOCIATE: the control connection only waits for its end.
    Associated,
}

/// A UDP ASSOCIATE: the host socket the client sends to and the stack socket that carries
/// its datagrams on the bus.
struct Assoc {
    socket: UdpSocket,
    handle: SocketHandle,
    client_ip: IpAddr,
    client: Option<SocketAddr>,
    readable: bool,
}

enum Kind {
    Forward,
    Expose { connecting: bool },
    Socks { state: Socks, buf: Box<[u8; 512]>, len: usize },
}

/// One host TCP connection and the stack connection it is paired with.
struct Relay {
    stream: TcpStream,
    handle: Option<SocketHandle>,
    kind: Kind,
    readable: bool,
    writable: bool,
    /// The host sent its FIN (the stack socket was closed after it).
    host_eof: bool,
    /// The stack's FIN was passed on (the host stream was shut down for writing).
    host_shut: bool,
    assoc: Option<Assoc>,
}

/// The host side of one endpoint.
#[derive(Default)]
pub struct Host {
    tcp_forwards: Vec<TcpForward>,
    udp_forwards: Vec<UdpForward>,
    tcp_exposes: Vec<TcpExpose>,
    udp_exposes: Vec<UdpExpose>,
    socks: Option<(TcpListener, bool)>,
    relays: Vec<Option<Relay>>,
    free: Vec<usize>,
    live: usize,
    next_port: u16,
    /// Stack sockets closing after their host side ended, and whether a previous `reap`
    /// already saw them closed (they go at the next one, after an egress pass has sent
    /// their last segment or RST).
    /// A socket still closing after `Limits::tcp_timeout` (a peer that never sends its
    /// FIN) is aborted.
    closing: Vec<(SocketHandle, bool, Instant)>,
}

fn tcp_socket(limits: &Limits) -> tcp::Socket<'static> {
    let mut s = tcp::Socket::new(tcp::SocketBuffer::new(vec![0; limits.tcp_buffer]), tcp::SocketBuffer::new(vec![0; limits.tcp_buffer]));
    s.set_timeout(Some(smoltcp::time::Duration::from_micros(limits.tcp_timeout.as_micros() as u64)));
    s.set_nagle_enabled(false);
    s
}

fn udp_socket(limits: &Limits) -> udp::Socket<'static> {
    let meta = || vec![udp::PacketMetadata::EMPTY; limits.udp_packets];
    udp::Socket::new(udp::PacketBuffer::new(meta(), vec![0; limits.udp_buffer]), udp::PacketBuffer::new(meta(), vec![0; limits.udp_buffer]))
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// Where a host UDP socket talking to `peer` binds.
fn unspecified_for(peer: SocketAddr) -> SocketAddr {
    match peer {
        SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    }
}

impl Host {
    /// Opens the listeners of `forwards`, `exposes` and `socks5` for endpoint `ep`.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        ep: u32,
        forwards: &[Forward],
        exposes: &[Expose],
        socks: Option<&Socks5>,
        registry: &Registry,
        sockets: &mut SocketSet<'static>,
        limits: &Limits,
        seed: u64,
    ) -> Result<Host, ListenError> {
        let mut h = Host { next_port: 49152 + (seed % 16384) as u16, ..Host::default() };
        let listen_err = |service: String, addr: SocketAddr| move |source: io::Error| ListenError { service, addr, source };
        for f in forwards {
            match f.proto {
                Proto::Tcp => {
                    let i = h.tcp_forwards.len();
                    let mut l = TcpListener::bind(f.local).map_err(listen_err(format!("--forward {f}"), f.local))?;
                    registry.register(&mut l, token(ep, local(K_FWD_TCP, i, 0)), Interest::READABLE).map_err(listen_err(format!("--forward {f}"), f.local))?;
                    h.tcp_forwards.push(TcpForward { listener: l, bus: f.bus, pending: true });
                }
                Proto::Udp => {
                    let i = h.udp_forwards.len();
                    let mut s = UdpSocket::bind(f.local).map_err(listen_err(format!("--forward {f}"), f.local))?;
                    registry.register(&mut s, token(ep, local(K_FWD_UDP, i, 0)), Interest::READABLE).map_err(listen_err(format!("--forward {f}"), f.local))?;
                    h.udp_forwards.push(UdpForward { socket: s, bus: f.bus, readable: true, flows: Vec::new() });
                }
            }
        }
        for e in exposes {
            let bad_port = |what: &str| ListenError {
                service: format!("--expose {e}"),
                addr: e.local,
                source: io::Error::new(io::ErrorKind::AddrInUse, format!("port {} of the endpoint {what}", e.port)),
            };
            match e.proto {
                Proto::Tcp => {
                    if h.tcp_exposes.iter().any(|x| x.port == e.port) {
                        return Err(bad_port("is exposed twice"));
                    }
                    let mut s = tcp_socket(limits);
                    s.listen(e.port).map_err(|_| bad_port("cannot listen"))?;
                    let listener = sockets.add(s);
                    h.tcp_exposes.push(TcpExpose { port: e.port, local: e.local, listener });
                }
                Proto::Udp => {
                    if exposes.iter().filter(|x| x.proto == Proto::Udp && x.port == e.port).count() > 1 {
                        return Err(bad_port("is exposed twice"));
                    }
                    let mut s = udp_socket(limits);
                    s.bind(e.port).map_err(|_| bad_port("cannot be bound"))?;
                    let handle = sockets.add(s);
                    h.udp_exposes.push(UdpExpose { local: e.local, handle, flows: Vec::new() });
                }
            }
        }
        if let Some(s) = socks {
            let mut l = TcpListener::bind(s.listen).map_err(listen_err(format!("--socks5 {s}"), s.listen))?;
            registry.register(&mut l, token(ep, local(K_SOCKS, 0, 0)), Interest::READABLE).map_err(listen_err(format!("--socks5 {s}"), s.listen))?;
            h.socks = Some((l, true));
        }
        Ok(h)
    }

    /// The local addresses the host listeners are bound to (forwards, then SOCKS5).
    pub fn listening(&self) -> Vec<SocketAddr> {
        let mut v: Vec<SocketAddr> = self.tcp_forwards.iter().filter_map(|f| f.listener.local_addr().ok()).collect();
        v.extend(self.udp_forwards.iter().filter_map(|f| f.socket.local_addr().ok()));
        v.extend(self.socks.iter().filter_map(|(l, _)| l.local_addr().ok()));
        v
    }

    /// Open TCP relays.
    pub fn connections(&self) -> usize {
        self.live
    }

    /// Notes readiness of the host socket `local` (from a token).
    pub fn event(&mut self, local: u32, readable: bool, writable: bool) {
        let (kind, a, b) = (local >> 28, ((local >> 16) & 0xfff) as usize, (local & 0xffff) as usize);
        match kind {
            K_FWD_TCP => {
                if let Some(f) = self.tcp_forwards.get_mut(a) {
                    f.pending = true;
                }
            }
            K_FWD_UDP => {
                if let Some(f) = self.udp_forwards.get_mut(a) {
                    f.readable = true;
                }
            }
            K_SOCKS => {
                if let Some((_, p)) = self.socks.as_mut() {
                    *p = true;
                }
            }
            K_RELAY | K_ASSOC => {
                let slot = (local & 0x0fff_ffff) as usize;
                if let Some(Some(r)) = self.relays.get_mut(slot) {
                    if kind == K_ASSOC {
                        if let Some(a) = r.assoc.as_mut() {
                            a.readable |= readable;
                        }
                    } else {
                        r.readable |= readable;
                        r.writable |= writable;
                    }
                }
            }
            K_EXPOSE_FLOW => {
                if let Some(Some(f)) = self.udp_exposes.get_mut(a).and_then(|e| e.flows.get_mut(b)) {
                    f.readable |= readable;
                }
            }
            _ => {}
        }
    }

    /// When the host side next needs servicing without an event (UDP flows going idle).
    pub fn deadline(&self, idle: Duration, tcp_timeout: Duration) -> Option<Instant> {
        let closing = self.closing_deadline(tcp_timeout);
        let fwd = self.udp_forwards.iter().flat_map(|f| f.flows.iter().map(|x| x.last));
        let exp = self.udp_exposes.iter().flat_map(|e| e.flows.iter().flatten().map(|x| x.last));
        let udp = fwd.chain(exp).min().map(|t| t + idle);
        match (udp, closing) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn ephemeral(&mut self, sockets: &SocketSet<'static>) -> u16 {
        ephemeral(&mut self.next_port, sockets)
    }

    fn add_relay(&mut self, r: Relay) -> usize {
        self.live += 1;
        match self.free.pop() {
            Some(i) => {
                self.relays[i] = Some(r);
                i
            }
            None => {
                self.relays.push(Some(r));
                self.relays.len() - 1
            }
        }
    }

    /// Everything due: new host connections and datagrams, bytes both ways, listeners
    /// re-armed, connections and flows that ended removed.
    pub fn service(&mut self, cx: &mut Ctx<'_>, ep: u32, iface: &mut Interface, sockets: &mut SocketSet<'static>) {
        self.accept_forwards(cx, ep, iface, sockets);
        self.accept_socks(cx, ep);
        self.rearm_exposes(cx, ep, sockets);
        for slot in 0..self.relays.len() {
            self.service_relay(cx, ep, slot, iface, sockets);
        }
        self.udp(cx, ep, sockets);
        self.reap(sockets, cx.now, cx.limits.tcp_timeout);
    }

    fn accept_forwards(&mut self, cx: &mut Ctx<'_>, ep: u32, iface: &mut Interface, sockets: &mut SocketSet<'static>) {
        for i in 0..self.tcp_forwards.len() {
            while self.tcp_forwards[i].pending {
                let (stream, _) = match self.tcp_forwards[i].listener.accept() {
                    Ok(s) => s,
                    Err(e) if would_block(&e) => {
                        self.tcp_forwards[i].pending = false;
                        break;
                    }
                    Err(_) => break,
                };
                let bus = self.tcp_forwards[i].bus;
                if self.live >= cx.limits.connections {
                    cx.counters.tcp_refused += 1;
                    continue;
                }
                let port = self.ephemeral(sockets);
                let mut s = tcp_socket(cx.limits);
                if s.connect(iface.context(), IpEndpoint::from(bus), IpListenEndpoint { addr: None, port }).is_err() {
                    cx.counters.tcp_refused += 1;
                    continue;
                }
                let handle = sockets.add(s);
                cx.counters.tcp_forwarded += 1;
                self.start_relay(cx, ep, stream, Some(handle), Kind::Forward);
            }
        }
    }

    fn start_relay(&mut self, cx: &mut Ctx<'_>, ep: u32, mut stream: TcpStream, handle: Option<SocketHandle>, kind: Kind) -> Option<usize> {
        let _ = stream.set_nodelay(true);
        let slot = self.free.last().copied().unwrap_or(self.relays.len());
        if cx.registry.register(&mut stream, token(ep, relay_token(slot)), Interest::READABLE | Interest::WRITABLE).is_err() {
            return None;
        }
        let r = Relay { stream, handle, kind, readable: true, writable: true, host_eof: false, host_shut: false, assoc: None };
        Some(self.add_relay(r))
    }

    fn accept_socks(&mut self, cx: &mut Ctx<'_>, ep: u32) {
        loop {
            let Some((listener, pending)) = self.socks.as_mut() else {
                return;
            };
            if !*pending {
                return;
            }
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if would_block(&e) => {
                    *pending = false;
                    return;
                }
                Err(_) => return,
            };
            if self.live >= cx.limits.connections {
                cx.counters.tcp_refused += 1;
                continue;
            }
            cx.counters.socks5_clients += 1;
            let kind = Kind::Socks { state: Socks::Greeting, buf: Box::new([0; 512]), len: 0 };
            self.start_relay(cx, ep, stream, None, kind);
        }
    }

    /// Exposed TCP ports: a listener that took a connection becomes a relay to the host
    /// service (non-blocking connect), and a new listener takes its place.
    pub fn rearm_exposes(&mut self, cx: &mut Ctx<'_>, ep: u32, sockets: &mut SocketSet<'static>) {
        for i in 0..self.tcp_exposes.len() {
            let h = self.tcp_exposes[i].listener;
            if sockets.get::<tcp::Socket>(h).state() == tcp::State::Listen {
                continue;
            }
            let (port, local) = (self.tcp_exposes[i].port, self.tcp_exposes[i].local);
            let mut fresh = tcp_socket(cx.limits);
            if fresh.listen(port).is_err() {
                continue;
            }
            self.tcp_exposes[i].listener = sockets.add(fresh);
            let refuse = |sockets: &mut SocketSet<'static>, counters: &mut Counters| {
                sockets.get_mut::<tcp::Socket>(h).abort();
                counters.tcp_refused += 1;
            };
            if self.live >= cx.limits.connections {
                refuse(sockets, cx.counters);
                continue;
            }
            match TcpStream::connect(local) {
                Ok(stream) => {
                    cx.counters.tcp_exposed += 1;
                    if self.start_relay(cx, ep, stream, Some(h), Kind::Expose { connecting: true }).is_none() {
                        refuse(sockets, cx.counters);
                        self.closing.push((h, false, cx.now));
                    }
                }
                Err(_) => {
                    refuse(sockets, cx.counters);
                    self.closing.push((h, false, cx.now));
                }
            }
        }
    }

    /// Ends relay `r` (taken out of `slot`): its host stream is closed (reset when `reset`),
    /// its stack socket aborted (when `reset`) or left to close gracefully.
    fn finish(&mut self, cx: &mut Ctx<'_>, slot: usize, mut r: Relay, sockets: &mut SocketSet<'static>, reset: bool) {
        let _ = cx.registry.deregister(&mut r.stream);
        if reset {
            // RST rather than FIN: the other side's connection failed.
            let _ = socket2::SockRef::from(&r.stream).set_linger(Some(Duration::ZERO));
        }
        if let Some(h) = r.handle {
            let s = sockets.get_mut::<tcp::Socket>(h);
            if reset {
                s.abort();
            } else {
                s.close();
            }
            // The stack socket goes when it has closed (an abort still sends its RST).
            self.closing.push((h, false, cx.now));
        }
        if let Some(mut a) = r.assoc.take() {
            let _ = cx.registry.deregister(&mut a.socket);
            sockets.remove(a.handle);
        }
        self.free.push(slot);
        self.live -= 1;
    }

    /// Removes the stack sockets that finished closing (seen closed by the previous call),
    /// aborts those closing for too long.
    pub fn reap(&mut self, sockets: &mut SocketSet<'static>, now: Instant, timeout: Duration) {
        self.closing.retain_mut(|(h, seen, since)| {
            let s = sockets.get_mut::<tcp::Socket>(*h);
            if now.duration_since(*since) > timeout {
                s.abort();
            }
            let closed = matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait);
            if closed && *seen {
                sockets.remove(*h);
                return false;
            }
            *seen = closed;
            true
        });
    }

    /// Whether closed sockets wait for the next service to be removed.
    pub fn reap_pending(&self, sockets: &SocketSet<'static>) -> bool {
        self.closing.iter().any(|(h, _, _)| matches!(sockets.get::<tcp::Socket>(*h).state(), tcp::State::Closed | tcp::State::TimeWait))
    }

    /// When the oldest closing socket is aborted.
    fn closing_deadline(&self, timeout: Duration) -> Option<Instant> {
        self.closing.iter().map(|(_, _, since)| *since + timeout).min()
    }

    fn service_relay(&mut self, cx: &mut Ctx<'_>, ep: u32, slot: usize, iface: &mut Interface, sockets: &mut SocketSet<'static>) {
        let Some(mut r) = self.relays.get_mut(slot).and_then(Option::take) else {
            return;
        };
        let outcome = match r.kind {
            Kind::Expose { connecting: true } => match connected(&mut r) {
                Connect::Pending => Outcome::Continue,
                Connect::Failed => Outcome::Reset,
                Connect::Done => {
                    r.kind = Kind::Expose { connecting: false };
                    r.readable = true;
                    r.writable = true;
                    pump(&mut r, sockets)
                }
            },
            Kind::Socks { .. } => self.socks_step(cx, ep, slot, &mut r, iface, sockets),
            _ => pump(&mut r, sockets),
        };
        match outcome {
            Outcome::Continue => self.relays[slot] = Some(r),
            Outcome::Done => self.finish(cx, slot, r, sockets, false),
            Outcome::Reset => self.finish(cx, slot, r, sockets, true),
        }
    }

    /// One step of a SOCKS5 client: handshake, connection, then relaying.
    fn socks_step(&mut self, cx: &mut Ctx<'_>, ep: u32, slot: usize, r: &mut Relay, iface: &mut Interface, sockets: &mut SocketSet<'static>) -> Outcome {
        let Kind::Socks { state, buf, len } = &mut r.kind else {
            return Outcome::Reset;
        };
        loop {
            match state {
                Socks::Greeting | Socks::Request => {
                    while r.readable && *len < buf.len() {
                        match r.stream.read(&mut buf[*len..]) {
                            Ok(0) => return Outcome::Reset,
                            Ok(n) => *len += n,
                            Err(e) if would_block(&e) => r.readable = false,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(_) => return Outcome::Reset,
                        }
                    }
                    let parsed = if matches!(state, Socks::Greeting) {
                        socks5::greeting(&buf[..*len]).map(|g| g.map(|g| (g.len, None, g.no_auth)))
                    } else {
                        socks5::request(&buf[..*len]).map(|q| q.map(|q| (q.len, Some(q), true)))
                    };
                    let (used, request, no_auth) = match parsed {
                        Err(_) => {
                            cx.counters.socks5_garbage += 1;
                            return Outcome::Reset;
                        }
                        Ok(None) if *len == buf.len() => {
                            cx.counters.socks5_garbage += 1;
                            return Outcome::Reset;
                        }
                        Ok(None) => return Outcome::Continue,
                        Ok(Some(x)) => x,
                    };
                    buf.copy_within(used..*len, 0);
                    *len -= used;
                    let Some(req) = request else {
                        if r.stream.write(&socks5::method_reply(no_auth)).ok() != Some(2) || !no_auth {
                            cx.counters.socks5_refused += u64::from(!no_auth);
                            return Outcome::Done;
                        }
                        *state = Socks::Request;
                        continue;
                    };
                    let refuse = |stream: &mut TcpStream, code: Reply, counters: &mut Counters| {
                        counters.socks5_refused += 1;
                        let mut out = [0u8; 22];
                        let n = socks5::reply(&mut out, code, SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0));
                        let _ = stream.write(&out[..n]);
                        Outcome::Done
                    };
                    let target = match (req.cmd, req.target) {
                        (_, Target::Name) => return refuse(&mut r.stream, Reply::HostUnreachable, cx.counters),
                        (socks5::CMD_CONNECT | socks5::CMD_UDP_ASSOCIATE, Target::Addr(a)) => a,
                        _ => return refuse(&mut r.stream, Reply::CommandNotSupported, cx.counters),
                    };
                    let port = ephemeral(&mut self.next_port, sockets);
                    if req.cmd == socks5::CMD_UDP_ASSOCIATE {
                        match self.associate(cx, ep, slot, r, port, sockets) {
                            Some(bound) => {
                                let mut out = [0u8; 22];
                                let n = socks5::reply(&mut out, Reply::Succeeded, bound);
                                if r.stream.write(&out[..n]).ok() != Some(n) {
                                    return Outcome::Reset;
                                }
                                let Kind::Socks { state, .. } = &mut r.kind else {
                                    return Outcome::Reset;
                                };
                                *state = Socks::Associated;
                                return Outcome::Continue;
                            }
                            None => return refuse(&mut r.stream, Reply::GeneralFailure, cx.counters),
                        }
                    }
                    let mut s = tcp_socket(cx.limits);
                    if s.connect(iface.context(), IpEndpoint::from(target), IpListenEndpoint { addr: None, port }).is_err() {
                        return refuse(&mut r.stream, Reply::NetworkUnreachable, cx.counters);
                    }
                    r.handle = Some(sockets.add(s));
                    *state = Socks::Connecting { from: cx.now };
                    return Outcome::Continue;
                }
                Socks::Connecting { from } => {
                    let Some(h) = r.handle else {
                        return Outcome::Reset;
                    };
                    let s = sockets.get_mut::<tcp::Socket>(h);
                    match s.state() {
                        tcp::State::SynSent | tcp::State::SynReceived => return Outcome::Continue,
                        tcp::State::Closed => {
                            // A reset comes at once; silence lasts until the connect timeout.
                            let code = if cx.now.duration_since(*from) < cx.limits.tcp_timeout { Reply::ConnectionRefused } else { Reply::HostUnreachable };
                            cx.counters.socks5_refused += 1;
                            let mut out = [0u8; 22];
                            let n = socks5::reply(&mut out, code, SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0));
                            let _ = r.stream.write(&out[..n]);
                            return Outcome::Done;
                        }
                        _ => {}
                    }
                    let bound = s.local_endpoint().map(SocketAddr::from).unwrap_or(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0));
                    let mut out = [0u8; 22];
                    let n = socks5::reply(&mut out, Reply::Succeeded, bound);
                    if r.stream.write(&out[..n]).ok() != Some(n) {
                        return Outcome::Reset;
                    }
                    // What the client sent after its request goes first.
                    if *len > 0 && s.send_slice(&buf[..*len]).ok() != Some(*len) {
                        return Outcome::Reset;
                    }
                    *len = 0;
                    *state = Socks::Relaying;
                    r.readable = true;
                    r.writable = true;
                }
                Socks::Relaying => return pump(r, sockets),
                Socks::Associated => {
                    // The association lives as long as its control connection.
                    while r.readable {
                        match r.stream.read(&mut buf[..]) {
                            Ok(0) => return Outcome::Done,
                            Ok(_) => {}
                            Err(e) if would_block(&e) => r.readable = false,
                            Err(_) => return Outcome::Reset,
                        }
                    }
                    return Outcome::Continue;
                }
            }
        }
    }

    /// Opens a UDP ASSOCIATE for relay `r`: a host socket beside the SOCKS5 listener and a
    /// stack socket on `port`; returns the host socket's address.
    fn associate(&mut self, cx: &mut Ctx<'_>, ep: u32, slot: usize, r: &mut Relay, port: u16, sockets: &mut SocketSet<'static>) -> Option<SocketAddr> {
        let listen_ip = self.socks.as_ref()?.0.local_addr().ok()?.ip();
        let client_ip = r.stream.peer_addr().ok()?.ip();
        let mut socket = UdpSocket::bind(SocketAddr::new(listen_ip, 0)).ok()?;
        let bound = socket.local_addr().ok()?;
        cx.registry.register(&mut socket, token(ep, (K_ASSOC << 28) | slot as u32), Interest::READABLE).ok()?;
        let mut s = udp_socket(cx.limits);
        if s.bind(port).is_err() {
            let _ = cx.registry.deregister(&mut socket);
            return None;
        }
        let handle = sockets.add(s);
        r.assoc = Some(Assoc { socket, handle, client_ip, client: None, readable: true });
        Some(bound)
    }

    /// UDP: forwards (host → bus and back), exposes (bus → host service and back), SOCKS5
    /// associations; idle flows closed.
    fn udp(&mut self, cx: &mut Ctx<'_>, ep: u32, sockets: &mut SocketSet<'static>) {
        let (now, idle, max_flows) = (cx.now, cx.limits.udp_idle, cx.limits.udp_flows);
        for f in &mut self.udp_forwards {
            while f.readable {
                let (n, peer) = match f.socket.recv_from(cx.scratch) {
                    Ok(x) => x,
                    Err(e) if would_block(&e) => {
                        f.readable = false;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => continue,
                };
                let i = match f.flows.iter().position(|x| x.peer == peer) {
                    Some(i) => i,
                    None if f.flows.len() >= max_flows => {
                        cx.counters.udp_dropped += 1;
                        continue;
                    }
                    None => {
                        let mut s = udp_socket(cx.limits);
                        if s.bind(ephemeral(&mut self.next_port, sockets)).is_err() {
                            cx.counters.udp_dropped += 1;
                            continue;
                        }
                        f.flows.push(ForwardFlow { peer, handle: sockets.add(s), last: now });
                        f.flows.len() - 1
                    }
                };
                let flow = &mut f.flows[i];
                flow.last = now;
                if sockets.get_mut::<udp::Socket>(flow.handle).send_slice(&cx.scratch[..n], IpEndpoint::from(f.bus)).is_err() {
                    cx.counters.udp_dropped += 1;
                }
            }
            for flow in &mut f.flows {
                let s = sockets.get_mut::<udp::Socket>(flow.handle);
                while let Ok((data, _)) = s.recv() {
                    flow.last = now;
                    if f.socket.send_to(data, flow.peer).is_err() {
                        cx.counters.udp_dropped += 1;
                    }
                }
            }
            f.flows.retain(|flow| {
                let keep = now.duration_since(flow.last) < idle;
                if !keep {
                    sockets.remove(flow.handle);
                }
                keep
            });
        }
        for (i, e) in self.udp_exposes.iter_mut().enumerate() {
            loop {
                let s = sockets.get_mut::<udp::Socket>(e.handle);
                let Ok((data, meta)) = s.recv() else { break };
                let j = match e.flows.iter().position(|x| x.as_ref().is_some_and(|x| x.bus_peer == meta.endpoint)) {
                    Some(j) => j,
                    None if e.flows.iter().flatten().count() >= max_flows => {
                        cx.counters.udp_dropped += 1;
                        continue;
                    }
                    None => {
                        let Some(socket) = UdpSocket::bind(unspecified_for(e.local)).ok().filter(|s| s.connect(e.local).is_ok()) else {
                            cx.counters.udp_dropped += 1;
                            continue;
                        };
                        let j = e.flows.iter().position(Option::is_none).unwrap_or(e.flows.len());
                        let mut socket = socket;
                        if cx.registry.register(&mut socket, token(ep, local(K_EXPOSE_FLOW, i, j)), Interest::READABLE).is_err() {
                            cx.counters.udp_dropped += 1;
                            continue;
                        }
                        let flow = ExposeFlow { bus_peer: meta.endpoint, bus_local: meta.local_address, socket, readable: true, last: now };
                        if j == e.flows.len() {
                            e.flows.push(Some(flow));
                        } else {
                            e.flows[j] = Some(flow);
                        }
                        j
                    }
                };
                if let Some(flow) = e.flows[j].as_mut() {
                    flow.last = now;
                    if flow.socket.send(data).is_err() {
                        cx.counters.udp_dropped += 1;
                    }
                }
            }
            for slot in &mut e.flows {
                let Some(flow) = slot else { continue };
                while flow.readable {
                    match flow.socket.recv(cx.scratch) {
                        Ok(n) => {
                            flow.last = now;
                            let mut meta = udp::UdpMetadata::from(flow.bus_peer);
                            meta.local_address = flow.bus_local;
                            if sockets.get_mut::<udp::Socket>(e.handle).send_slice(&cx.scratch[..n], meta).is_err() {
                                cx.counters.udp_dropped += 1;
                            }
                        }
                        Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                        // would block, or the service refused (ICMP): wait for the next event
                        Err(_) => flow.readable = false,
                    }
                }
                if now.duration_since(flow.last) >= idle {
                    let _ = cx.registry.deregister(&mut flow.socket);
                    *slot = None;
                }
            }
        }
        for r in self.relays.iter_mut().flatten() {
            let Some(a) = r.assoc.as_mut() else { continue };
            while a.readable {
                let (n, from) = match a.socket.recv_from(cx.scratch) {
                    Ok(x) => x,
                    Err(e) if would_block(&e) => {
                        a.readable = false;
                        break;
                    }
                    Err(_) => continue,
                };
                if from.ip() != a.client_ip {
                    cx.counters.udp_dropped += 1;
                    continue;
                }
                a.client = Some(from);
                match socks5::udp_header(&cx.scratch[..n]) {
                    Ok((Target::Addr(dst), at)) => {
                        if sockets.get_mut::<udp::Socket>(a.handle).send_slice(&cx.scratch[at..n], IpEndpoint::from(dst)).is_err() {
                            cx.counters.udp_dropped += 1;
                        }
                    }
                    Ok((Target::Name, _)) => cx.counters.socks5_refused += 1,
                    Err(_) => cx.counters.socks5_garbage += 1,
                }
            }
            let s = sockets.get_mut::<udp::Socket>(a.handle);
            while let Ok((data, meta)) = s.recv() {
                let Some(client) = a.client else { continue };
                let mut hdr = [0u8; 22];
                let h = socks5::put_udp_header(&mut hdr, SocketAddr::from(meta.endpoint));
                let Some(out) = cx.scratch.get_mut(..h + data.len()) else {
                    cx.counters.udp_dropped += 1;
                    continue;
                };
                out[..h].copy_from_slice(&hdr[..h]);
                out[h..].copy_from_slice(data);
                if a.socket.send_to(out, client).is_err() {
                    cx.counters.udp_dropped += 1;
                }
            }
        }
    }
}

/// A local port for a new stack socket (49152..=65535), not used by another of the
/// endpoint's sockets.
fn ephemeral(next: &mut u16, sockets: &SocketSet<'static>) -> u16 {
    for _ in 0..16384 {
        *next = next.checked_add(1).filter(|&p| p >= 49152).unwrap_or(49152);
        let p = *next;
        let used = sockets.iter().any(|(_, s)| match s {
            smoltcp::socket::Socket::Tcp(t) => t.local_endpoint().map(|e| e.port) == Some(p) || t.listen_endpoint().port == p,
            smoltcp::socket::Socket::Udp(u) => u.endpoint().port == p,
        });
        if !used {
            return p;
        }
    }
    *next
}

enum Outcome {
    Continue,
    /// Both directions ended: close gracefully.
    Done,
    /// One side failed: reset the other.
    Reset,
}

enum Connect {
    Pending,
    Done,
    Failed,
}

/// Whether a non-blocking connect to a host service has finished (as mio documents it:
/// after an event, an error means failure, a peer address means success).
fn connected(r: &mut Relay) -> Connect {
    if !r.readable && !r.writable {
        return Connect::Pending;
    }
    match r.stream.take_error() {
        Ok(None) => {}
        _ => return Connect::Failed,
    }
    match r.stream.peer_addr() {
        Ok(_) => Connect::Done,
        Err(e) if e.kind() == io::ErrorKind::NotConnected => {
            r.readable = false;
            r.writable = false;
            Connect::Pending
        }
        Err(_) => Connect::Failed,
    }
}

/// What one host I/O call inside a stack buffer callback did.
enum Io {
    Moved,
    /// The stack buffer had no room (send) or no data (recv).
    Nothing,
    WouldBlock,
    Eof,
    Failed,
}

/// Moves bytes both ways between a relay's host stream and its stack socket, passing on
/// each side's FIN; says whether the relay goes on, is done, or must be reset.
fn pump(r: &mut Relay, sockets: &mut SocketSet<'static>) -> Outcome {
    let Some(h) = r.handle else {
        return Outcome::Reset;
    };
    let s = sockets.get_mut::<tcp::Socket>(h);
    let stream = &mut r.stream;
    while r.readable && !r.host_eof && s.may_send() {
        let res = s.send(|buf| {
            if buf.is_empty() {
                return (0, Io::Nothing);
            }
            match stream.read(buf) {
                Ok(0) => (0, Io::Eof),
                Ok(n) => (n, Io::Moved),
                Err(e) if would_block(&e) => (0, Io::WouldBlock),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => (0, Io::Moved),
                Err(_) => (0, Io::Failed),
            }
        });
        match res {
            Ok(Io::Moved) => {}
            Ok(Io::Nothing) | Err(_) => break,
            Ok(Io::WouldBlock) => r.readable = false,
            Ok(Io::Eof) => {
                r.host_eof = true;
                s.close();
            }
            Ok(Io::Failed) => return Outcome::Reset,
        }
    }
    while r.writable && !r.host_shut {
        let res = s.recv(|buf| {
            if buf.is_empty() {
                return (0, Io::Nothing);
            }
            match stream.write(buf) {
                Ok(n) => (n, Io::Moved),
                Err(e) if would_block(&e) => (0, Io::WouldBlock),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => (0, Io::Moved),
                Err(_) => (0, Io::Failed),
            }
        });
        match res {
            Ok(Io::Moved) => {}
            Ok(Io::Nothing | Io::Eof) => break,
            Ok(Io::WouldBlock) => r.writable = false,
            Ok(Io::Failed) => return Outcome::Reset,
            Err(tcp::RecvError::Finished) => {
                let _ = stream.shutdown(Shutdown::Write);
                r.host_shut = true;
            }
            Err(tcp::RecvError::InvalidState) => break,
        }
    }
    if r.host_eof && r.host_shut {
        return Outcome::Done;
    }
    match s.state() {
        // Reset by the peer, or timed out, before both FINs.
        tcp::State::Closed => Outcome::Reset,
        // The host closed and the stack connection never opened.
        _ if r.host_eof && !s.is_open() => Outcome::Reset,
        _ => Outcome::Continue,
    }
}
