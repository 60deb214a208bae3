//! The userspace port without a worker: two `UserspacePort`s wired back to back in this
//! process (what one reads, the other is written), each hosting endpoints with their own
//! addresses. No root, no TUN, no broker.
//!
//! - ping both ways over IPv4, IPv6 and link-local, and to `ff02::1` (every endpoint of the
//!   other port answers), with a fake clock (the round trip is exactly the clock's step);
//! - TCP through `--forward` on one side and `--expose` on the other, a real local client
//!   and server on localhost ports, both directions with half-close, SHA-256 equal;
//! - UDP request and answer through `--forward udp` and `--expose udp`;
//! - SOCKS5 CONNECT (an IP literal sent as a domain name, as `curl --socks5-hostname`
//!   does), a name refused with reply 4, garbage closing the client's connection only;
//! - bad specs and a port already in use: clear errors;
//! - 10,000 idle endpoints in one port: heap per endpoint within the budget (0.2 MiB),
//!   sampled ones answering pings;
//! - no allocation on the pump thread per ping, nor per packet of a TCP transfer.
//!
//! Host-socket tests run the pump with the real clock (the test is the caller that owns
//! the clock; the port itself never reads one).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tunbus::codec::v1::VNET_HDR_LEN;
use tunbus::port::userspace::{EndpointConfig, Error, Expose, Forward, Limits, PortConfig, Services, Socks5, UserspacePort};
use tunbus::port::Port;
use tunbus::route::Prefix;

// ---------------------------------------------------------------------------------------
// Allocations of the current thread, counted while armed.

struct Counting;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
    /// Bytes held (allocated minus freed) by this thread while `COUNT_BYTES` is set.
    static COUNT_BYTES: Cell<bool> = const { Cell::new(false) };
    static BYTES: Cell<i64> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded to `System` unchanged; the counters are thread-local
// cells (no allocation, no lock) touched with `try_with`, which cannot recurse.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        held(layout.size() as i64);
        // SAFETY: the caller's contract is System's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        held(-(layout.size() as i64));
        // SAFETY: the caller's contract is System's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        held(new_size as i64 - layout.size() as i64);
        // SAFETY: the caller's contract is System's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn count() {
    let _ = ARMED.try_with(|a| {
        if a.get() {
            let _ = ALLOCS.try_with(|n| n.set(n.get() + 1));
        }
    });
}

fn held(delta: i64) {
    let _ = COUNT_BYTES.try_with(|c| {
        if c.get() {
            let _ = BYTES.try_with(|b| b.set(b.get() + delta));
        }
    });
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations made by this thread while `f` runs.
fn allocations<R>(f: impl FnOnce() -> R) -> (R, u64) {
    ALLOCS.with(|n| n.set(0));
    ARMED.with(|a| a.set(true));
    let r = f();
    ARMED.with(|a| a.set(false));
    (r, ALLOCS.with(|n| n.get()))
}

// ---------------------------------------------------------------------------------------
// Two ports back to back.

fn prefix(s: &str) -> Prefix {
    s.parse().unwrap()
}

fn endpoint(name: &str, i: u16, services: Services) -> EndpointConfig {
    EndpointConfig {
        name: name.into(),
        addrs: vec![prefix(&format!("198.18.{}.{}/15", i >> 8, i & 0xff)), prefix(&format!("fd00:7b::{i:x}/64"))],
        link_local: format!("fe80::7b:{i:x}").parse().unwrap(),
        services,
    }
}

fn port(seed: u64) -> UserspacePort {
    UserspacePort::new(PortConfig { index: 0, seed, limits: Limits::default() }, Instant::now()).unwrap()
}

struct Pair {
    a: UserspacePort,
    b: UserspacePort,
    buf: Vec<u8>,
}

impl Pair {
    fn new() -> Pair {
        Pair { a: port(1), b: port(2), buf: vec![0; 65536 + VNET_HDR_LEN] }
    }

    /// Polls both ports at `now` and moves packets between them until neither has any;
    /// returns how many moved.
    fn step(&mut self, now: Instant) -> usize {
        let mut moved = 0;
        loop {
            let mut n = 0;
            self.a.poll(now);
            self.b.poll(now);
            n += relay(&mut self.a, &mut self.b, &mut self.buf);
            n += relay(&mut self.b, &mut self.a, &mut self.buf);
            moved += n;
            if n == 0 {
                return moved;
            }
        }
    }

    /// Pumps with the real clock until `done` or `limit`; sleeps a little when idle.
    fn pump_until(&mut self, limit: Duration, mut done: impl FnMut(&mut Pair) -> bool) {
        let end = Instant::now() + limit;
        while !done(self) {
            assert!(Instant::now() < end, "timed out after {limit:?}; counters a: {:?} b: {:?}", self.a.counters(), self.b.counters());
            if self.step(Instant::now()) == 0 {
                thread::sleep(Duration::from_micros(200));
            }
        }
    }
}

/// Moves everything `from` has to `to`; returns how many units.
fn relay(from: &mut UserspacePort, to: &mut UserspacePort, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while let Ok(Some(len)) = from.read(buf) {
        let (hdr, packet) = buf[..len].split_at(VNET_HDR_LEN);
        let hdr: &[u8; VNET_HDR_LEN] = hdr.try_into().unwrap();
        let _ = to.write(hdr, packet);
        n += 1;
    }
    n
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A localhost port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}

// ---------------------------------------------------------------------------------------
// Ping.

#[test]
fn ping_both_ways_over_ipv4_ipv6_link_local_and_all_nodes() {
    let mut p = Pair::new();
    let t0 = Instant::now();
    let a1 = p.a.add_endpoint(endpoint("a1", 1, Services::default()), t0).unwrap();
    let b2 = p.b.add_endpoint(endpoint("b2", 2, Services::default()), t0).unwrap();
    let b3 = p.b.add_endpoint(endpoint("b3", 3, Services::default()), t0).unwrap();
    let step = Duration::from_millis(1);
    let mut now = t0;
    let mut seq = 0;
    for (port_is_a, from, dst, answer) in [
        (true, a1, "198.18.0.2", "198.18.0.2"),
        (true, a1, "fd00:7b::3", "fd00:7b::3"),
        (true, a1, "fe80::7b:2", "fe80::7b:2"),
        (false, b2, "198.18.0.1", "198.18.0.1"),
        (false, b3, "fd00:7b::1", "fd00:7b::1"),
        (false, b3, "fe80::7b:1", "fe80::7b:1"),
    ] {
        seq += 1;
        now += step;
        let (sender, _) = if port_is_a { (&mut p.a, &mut p.b) } else { (&mut p.b, &mut p.a) };
        sender.ping(from, ip(dst), seq, now).unwrap();
        p.step(now + step);
        let sender = if port_is_a { &mut p.a } else { &mut p.b };
        let replies: Vec<_> = sender.ping_replies().collect();
        assert_eq!(replies.len(), 1, "{dst}: {replies:?}");
        assert_eq!((replies[0].endpoint, replies[0].from, replies[0].seq, replies[0].rtt), (from, ip(answer), seq, step), "{dst}");
        now += step;
    }
    // ff02::1 from a1: both endpoints of port b answer from their link-local addresses.
    p.a.ping(a1, ip("ff02::1"), 99, now).unwrap();
    p.step(now + step);
    let mut from: Vec<IpAddr> = p.a.ping_replies().map(|r| r.from).collect();
    from.sort();
    assert_eq!(from, vec![ip("fe80::7b:2"), ip("fe80::7b:3")]);
    // Nobody owns it: no reply, counted by the receiver.
    p.a.ping(a1, ip("198.18.0.9"), 100, now).unwrap();
    p.step(now + step);
    assert_eq!(p.a.ping_replies().count(), 0);
    assert_eq!(p.b.counters().no_endpoint, 1);
    // An echo request to a broadcast address is ignored, as Linux does by default.
    assert!(p.b.ping(b2, ip("255.255.255.255"), 101, now).is_ok());
    p.step(now + step);
    assert_eq!(p.b.ping_replies().count(), 0);
    assert_eq!(p.a.counters().echo_to_group, 1);
}

#[test]
fn no_allocation_per_ping() {
    let mut p = Pair::new();
    let t0 = Instant::now();
    let a = p.a.add_endpoint(endpoint("a", 1, Services::default()), t0).unwrap();
    p.b.add_endpoint(endpoint("b", 2, Services::default()), t0).unwrap();
    let mut now = t0;
    let mut round = |p: &mut Pair, i: u16| {
        now += Duration::from_millis(1);
        let dst = if i.is_multiple_of(2) { ip("198.18.0.2") } else { ip("fd00:7b::2") };
        p.a.ping(a, dst, i, now).unwrap();
        p.step(now);
        p.a.ping_replies().count()
    };
    for i in 0..100 {
        assert_eq!(round(&mut p, i), 1);
    }
    let (got, allocs) = allocations(|| (100..2100).map(|i| round(&mut p, i)).sum::<usize>());
    assert_eq!(got, 2000, "every ping answered");
    assert_eq!(allocs, 0, "allocations on the pump thread over 2000 pings");
}

// ---------------------------------------------------------------------------------------
// TCP and UDP through forward and expose.

/// A host service: for each connection, reads until EOF, then answers with the SHA-256
/// of what it read followed by `answer` bytes of a fixed pattern, and closes.
fn digest_server(answer: usize) -> (SocketAddr, thread::JoinHandle<usize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        s.write_all(&Sha256::digest(&got)).unwrap();
        s.write_all(&pattern(answer)).unwrap();
        got.len()
    });
    (addr, h)
}

fn pattern(n: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// A client: sends `send` bytes, closes its sending half, reads everything back; checks
/// the digest of what it sent and returns what followed.
fn digest_client(mut s: TcpStream, send: usize) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let data = pattern(send);
    s.write_all(&data).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    assert!(back.len() >= 32, "answer of {} bytes", back.len());
    assert_eq!(&back[..32], &Sha256::digest(&data)[..], "the server read what the client sent");
    back.split_off(32)
}

#[test]
fn tcp_through_forward_and_expose_both_ways_with_half_close() {
    let mut p = Pair::new();
    let t0 = Instant::now();
    let (server, served) = digest_server(3 << 20);
    let fwd_port = free_port();
    let forward: Forward = format!("tcp:{fwd_port}=198.18.0.2:80").parse().unwrap();
    let expose: Expose = format!("tcp:80={server}").parse().unwrap();
    let ea = p.a.add_endpoint(endpoint("a", 1, Services { forwards: vec![forward], ..Services::default() }), t0).unwrap();
    let eb = p.b.add_endpoint(endpoint("b", 2, Services { exposes: vec![expose], ..Services::default() }), t0).unwrap();
    let client = thread::spawn(move || digest_client(TcpStream::connect(local(fwd_port)).unwrap(), 2 << 20));
    let ((), allocs) = allocations(|| p.pump_until(Duration::from_secs(60), |_| client.is_finished()));
    let back = client.join().unwrap();
    assert_eq!(served.join().unwrap(), 2 << 20);
    assert_eq!(Sha256::digest(&back), Sha256::digest(pattern(3 << 20)), "the answer arrived whole");
    assert_eq!((p.a.counters().tcp_forwarded, p.b.counters().tcp_exposed), (1, 1));
    // 5 MiB is about 3,600 packets each way: allocations per connection only.
    assert!(allocs < 200, "{allocs} allocations on the pump thread for one connection");
    // The relays end when both sides have closed.
    p.pump_until(Duration::from_secs(5), |p| p.a.connections(ea) == 0 && p.b.connections(eb) == 0);
    println!("tcp: 2 MiB + 3 MiB, {allocs} allocations on the pump thread; a: {:?}", p.a.counters());
}

#[test]
fn udp_request_and_answer_through_forward_and_expose() {
    let mut p = Pair::new();
    let t0 = Instant::now();
    let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
    let echo_addr = echo.local_addr().unwrap();
    let server = thread::spawn(move || {
        let mut buf = [0u8; 2048];
        for _ in 0..2 {
            let (n, from) = echo.recv_from(&mut buf).unwrap();
            let mut answer = b"echo:".to_vec();
            answer.extend_from_slice(&buf[..n]);
            echo.send_to(&answer, from).unwrap();
        }
    });
    let (v4, v6) = (free_udp_port(), free_udp_port());
    let forwards = vec![format!("udp:{v4}=198.18.0.2:5683").parse().unwrap(), format!("udp:{v6}=[fd00:7b::2]:5683").parse().unwrap()];
    p.a.add_endpoint(endpoint("a", 1, Services { forwards, ..Services::default() }), t0).unwrap();
    let expose: Expose = format!("udp:5683={echo_addr}").parse().unwrap();
    p.b.add_endpoint(endpoint("b", 2, Services { exposes: vec![expose], ..Services::default() }), t0).unwrap();
    let client = thread::spawn(move || {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        for (port, msg) in [(v4, &b"coap over v4"[..]), (v6, &b"coap over v6"[..])] {
            s.send_to(msg, local(port)).unwrap();
            let mut buf = [0u8; 2048];
            let (n, from) = s.recv_from(&mut buf).unwrap();
            assert_eq!(from, local(port), "the answer comes from the forward");
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        got
    });
    p.pump_until(Duration::from_secs(20), |_| client.is_finished());
    assert_eq!(client.join().unwrap(), vec!["echo:coap over v4", "echo:coap over v6"]);
    server.join().unwrap();
    assert_eq!(p.a.counters().udp_dropped + p.b.counters().udp_dropped, 0);
}

// ---------------------------------------------------------------------------------------
// SOCKS5.

fn socks_connect(proxy: SocketAddr, request: &[u8]) -> (TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(&[5, 1, 0]).unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).unwrap();
    assert_eq!(m, [5, 0], "no authentication chosen");
    s.write_all(request).unwrap();
    let mut head = [0u8; 4];
    s.read_exact(&mut head).unwrap();
    let rest = match head[3] {
        1 => 6,
        4 => 18,
        other => panic!("address type {other} in the reply"),
    };
    let mut tail = vec![0u8; rest];
    s.read_exact(&mut tail).unwrap();
    (s, head.to_vec())
}

fn domain_request(name: &str, port: u16) -> Vec<u8> {
    let mut r = vec![5, 1, 0, 3, name.len() as u8];
    r.extend_from_slice(name.as_bytes());
    r.extend_from_slice(&port.to_be_bytes());
    r
}

#[test]
fn socks5_connect_names_and_garbage() {
    let mut p = Pair::new();
    let t0 = Instant::now();
    let (server, served) = digest_server(1 << 20);
    let proxy = local(free_port());
    let socks: Socks5 = proxy.to_string().parse().unwrap();
    let a = p.a.add_endpoint(endpoint("a", 1, Services { socks5: Some(socks), ..Services::default() }), t0).unwrap();
    let expose: Expose = format!("tcp:80={server}").parse().unwrap();
    p.b.add_endpoint(endpoint("b", 2, Services { exposes: vec![expose], ..Services::default() }), t0).unwrap();
    assert_eq!(p.a.listening(a), vec![proxy]);

    // Garbage first: that client's connection is closed, the server goes on.
    let garbage = thread::spawn(move || {
        let mut s = TcpStream::connect(proxy).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut buf = [0u8; 64];
        // closed: EOF, or a reset
        matches!(s.read(&mut buf), Ok(0) | Err(_))
    });
    p.pump_until(Duration::from_secs(10), |_| garbage.is_finished());
    assert!(garbage.join().unwrap(), "the garbage client's connection was closed");
    assert_eq!(p.a.counters().socks5_garbage, 1);

    // A name the bus cannot resolve: reply 4, closed.
    let name = thread::spawn(move || socks_connect(proxy, &domain_request("example.org", 80)).1);
    p.pump_until(Duration::from_secs(10), |_| name.is_finished());
    assert_eq!(name.join().unwrap()[1], 4, "host unreachable");

    // An IPv6 literal as a domain name, as curl --socks5-hostname sends it.
    let client = thread::spawn(move || {
        let (s, head) = socks_connect(proxy, &domain_request("[fd00:7b::2]", 80));
        assert_eq!(head[1], 0, "succeeded");
        digest_client(s, 512 << 10)
    });
    p.pump_until(Duration::from_secs(60), |_| client.is_finished());
    let back = client.join().unwrap();
    assert_eq!(served.join().unwrap(), 512 << 10);
    assert_eq!(Sha256::digest(&back), Sha256::digest(pattern(1 << 20)));
    assert_eq!(p.a.counters().socks5_refused, 1);
    assert_eq!(p.a.counters().socks5_clients, 3);
}

#[test]
fn socks5_udp_associate_carries_a_datagram_and_its_answer() {
    let mut p = Pair::new();
    let t0 = Instant::now();
    let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
    let echo_addr = echo.local_addr().unwrap();
    let server = thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let (n, from) = echo.recv_from(&mut buf).unwrap();
        echo.send_to(&buf[..n], from).unwrap();
    });
    let proxy = local(free_port());
    p.a.add_endpoint(endpoint("a", 1, Services { socks5: Some(Socks5 { listen: proxy }), ..Services::default() }), t0).unwrap();
    let expose: Expose = format!("udp:7={echo_addr}").parse().unwrap();
    p.b.add_endpoint(endpoint("b", 2, Services { exposes: vec![expose], ..Services::default() }), t0).unwrap();
    let client = thread::spawn(move || {
        let mut req = vec![5, 3, 0, 1, 0, 0, 0, 0, 0, 0];
        req[4..8].copy_from_slice(&[127, 0, 0, 1]);
        let mut ctl = TcpStream::connect(proxy).unwrap();
        ctl.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        ctl.write_all(&[5, 1, 0]).unwrap();
        let mut m = [0u8; 2];
        ctl.read_exact(&mut m).unwrap();
        ctl.write_all(&req).unwrap();
        let mut rep = [0u8; 10];
        ctl.read_exact(&mut rep).unwrap();
        assert_eq!(&rep[..4], &[5, 0, 0, 1]);
        let relay = SocketAddr::new(IpAddr::from([rep[4], rep[5], rep[6], rep[7]]), u16::from_be_bytes([rep[8], rep[9]]));
        let u = UdpSocket::bind("127.0.0.1:0").unwrap();
        u.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut d = vec![0, 0, 0, 1, 198, 18, 0, 2, 0, 7];
        d.extend_from_slice(b"hello bus");
        u.send_to(&d, relay).unwrap();
        let mut buf = [0u8; 2048];
        let (n, _) = u.recv_from(&mut buf).unwrap();
        buf[..n].to_vec()
    });
    p.pump_until(Duration::from_secs(20), |_| client.is_finished());
    let got = client.join().unwrap();
    server.join().unwrap();
    assert_eq!(&got[..10], &[0, 0, 0, 1, 198, 18, 0, 2, 0, 7], "the header names the bus sender");
    assert_eq!(&got[10..], b"hello bus");
}

// ---------------------------------------------------------------------------------------
// Bad input.

#[test]
fn bad_specs_and_ports_in_use_are_clear_errors() {
    let e = "tcp:8080".parse::<Forward>().unwrap_err().to_string();
    assert!(e.contains("--forward \"tcp:8080\": expected LOCAL=BUSADDR:PORT"), "{e}");
    let e = "tcp:8080=example.org:80".parse::<Forward>().unwrap_err().to_string();
    assert!(e.contains("the bus has no DNS"), "{e}");
    let e = "tcp:http=8000".parse::<Expose>().unwrap_err().to_string();
    assert!(e.contains("PORT: expected a port 1..=65535, found \"http\""), "{e}");

    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap();
    let t0 = Instant::now();
    let mut a = port(3);
    let forward: Forward = format!("tcp:{busy}=198.18.0.2:80").parse().unwrap();
    let err = a.add_endpoint(endpoint("a", 1, Services { forwards: vec![forward], ..Services::default() }), t0).unwrap_err();
    assert!(matches!(err, Error::Listen { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&format!("--forward tcp:{busy}=198.18.0.2:80: cannot listen on {busy}")), "{msg}");
    let err = a.add_endpoint(endpoint("a", 1, Services { socks5: Some(Socks5 { listen: busy }), ..Services::default() }), t0).unwrap_err().to_string();
    assert!(err.contains(&format!("--socks5 {busy}: cannot listen on {busy}")), "{err}");
    assert_eq!(a.endpoint_count(), 0);
    // The addresses of a refused endpoint are free again.
    a.add_endpoint(endpoint("a", 1, Services::default()), t0).unwrap();
}

// ---------------------------------------------------------------------------------------
// Scale.

#[test]
fn ten_thousand_idle_endpoints_fit_the_budget_and_answer() {
    const N: u16 = 10_000;
    let mut p = Pair::new();
    let t0 = Instant::now();
    let a = p.a.add_endpoint(endpoint("probe", 0xffff, Services::default()), t0).unwrap();
    let ((), allocs_bytes) = heap_bytes(|| {
        for i in 1..=N {
            p.b.add_endpoint(endpoint(&format!("h{i}"), i, Services::default()), t0).unwrap();
        }
    });
    let per_endpoint = allocs_bytes as f64 / f64::from(N);
    assert!(allocs_bytes > 0);
    println!("{N} idle endpoints: {per_endpoint:.0} bytes of heap allocated per endpoint");
    assert!(per_endpoint < 0.2 * 1024.0 * 1024.0, "{per_endpoint} bytes per endpoint");
    let mut now = t0;
    for (seq, i) in (1..=N).step_by(97).enumerate() {
        now += Duration::from_millis(1);
        let dst = if seq.is_multiple_of(2) { format!("198.18.{}.{}", i >> 8, i & 0xff) } else { format!("fd00:7b::{i:x}") };
        p.a.ping(a, ip(&dst), seq as u16, now).unwrap();
    }
    p.step(now);
    assert_eq!(p.a.ping_replies().count(), (1..=N).step_by(97).count(), "every sampled endpoint answered");
}

/// Bytes this thread allocated and did not free while `f` ran.
fn heap_bytes<R>(f: impl FnOnce() -> R) -> (R, i64) {
    BYTES.with(|b| b.set(0));
    COUNT_BYTES.with(|c| c.set(true));
    let r = f();
    COUNT_BYTES.with(|c| c.set(false));
    (r, BYTES.with(|b| b.get()))
}

// ---------------------------------------------------------------------------------------
// Offload from the bus.

/// A UDP super-packet (USO, as a TUN agent with offloads sends it) is cut into its
/// datagrams before the stack sees it: the exposed service gets each of them.
#[test]
fn a_udp_super_packet_from_the_bus_is_cut_into_its_datagrams() {
    let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
    echo.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let echo_addr = echo.local_addr().unwrap();
    let t0 = Instant::now();
    let mut b = port(5);
    let expose: Expose = format!("udp:5683={echo_addr}").parse().unwrap();
    b.add_endpoint(endpoint("b", 2, Services { exposes: vec![expose], ..Services::default() }), t0).unwrap();
    // IPv4 198.18.0.1:40000 -> 198.18.0.2:5683, 3 x 100 bytes, gso_size 100.
    let payload: Vec<u8> = (0..300u32).map(|i| (i / 100) as u8 + b'a').collect();
    let total = 20 + 8 + payload.len();
    let mut pkt = vec![0x45, 0, (total >> 8) as u8, total as u8, 0, 1, 0, 0, 64, 17, 0, 0, 198, 18, 0, 1, 198, 18, 0, 2];
    pkt.extend_from_slice(&40000u16.to_be_bytes());
    pkt.extend_from_slice(&5683u16.to_be_bytes());
    pkt.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    pkt.extend_from_slice(&[0, 0]); // partial checksum: the segmenter writes each one whole
    pkt.extend_from_slice(&payload);
    // flags NEEDS_CSUM, gso UDP_L4, hdr_len 28, gso_size 100, csum_start 20, csum_offset 6
    let hdr: [u8; VNET_HDR_LEN] = [1, 5, 28, 0, 100, 0, 20, 0, 6, 0];
    b.write(&hdr, &pkt).unwrap();
    let mut got = Vec::new();
    let end = Instant::now() + Duration::from_secs(10);
    echo.set_nonblocking(true).unwrap();
    while got.len() < 3 && Instant::now() < end {
        b.poll(Instant::now());
        let mut buf = [0u8; 2048];
        match echo.recv_from(&mut buf) {
            Ok((n, _)) => got.push(buf[..n].to_vec()),
            Err(_) => thread::sleep(Duration::from_millis(1)),
        }
    }
    assert_eq!(got, vec![vec![b'a'; 100], vec![b'b'; 100], vec![b'c'; 100]], "counters: {:?}", b.counters());
    assert_eq!(b.counters().bad_offload, 0);
}
