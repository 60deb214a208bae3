//! Robustness of a receiving agent against what any bus member can send: hostile virtio
//! headers (the allow-list in `codec::vnet`), and `--no-offload-from-bus`. Real agents in
//! real namespaces, real broker; packets checked where the kernel delivers them.

mod common;

use std::net::{Ipv4Addr, UdpSocket};
use std::time::Duration;

use common::*;
use tunbus::codec::v1::{self, FrameHeader, Packet, FLAG_VNET};
use tunbus::codec::vnet::{self, VnetHdr};

/// RFC 1071 sum of `bytes` folded to 16 bits (not complemented).
fn sum16(bytes: &[u8], mut sum: u32) -> u16 {
    for c in bytes.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// An IPv4 packet (valid header checksum) with protocol `proto` and transport bytes `l4`.
fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let len = 20 + l4.len();
    let mut p = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, proto, 0, 0];
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let check = !sum16(&p, 0);
    p[10..12].copy_from_slice(&check.to_be_bytes());
    p.extend_from_slice(l4);
    p
}

/// IPv4/UDP with the checksum field holding only the pseudo-header sum, as a kernel leaves
/// it for offload (NEEDS_CSUM); `complete` writes the full checksum instead.
fn udp4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8], complete: bool) -> Vec<u8> {
    let ulen = (8 + payload.len()) as u16;
    let mut u = Vec::with_capacity(usize::from(ulen));
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&ulen.to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&ulen.to_be_bytes());
    let partial = sum16(&pseudo, 0);
    let check = if complete { !sum16(&u, u32::from(partial)) } else { partial };
    u[6..8].copy_from_slice(&check.to_be_bytes());
    ipv4(src, dst, 17, &u)
}

/// IPv4/TCP, a bare ACK with `payload`, to a port nobody listens on.
fn tcp4(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let mut t = vec![0x9c, 0x40, 0x13, 0x89, 0, 0, 0, 1, 0, 0, 0, 1, 5 << 4, 0x10, 0xff, 0xff, 0, 0, 0, 0];
    t.extend_from_slice(payload);
    ipv4(src, dst, 6, &t)
}

/// The header a kernel writes for `packet` (UDP or TCP over IPv4) with segments of
/// `gso_size` (0: checksum only).
fn offload(packet: &[u8], gso_size: u16) -> VnetHdr {
    let tcp = packet[9] == 6;
    let gso_type = match (gso_size, tcp) {
        (0, _) => vnet::GSO_NONE,
        (_, true) => vnet::GSO_TCPV4,
        (_, false) => vnet::GSO_UDP_L4,
    };
    VnetHdr { flags: vnet::F_NEEDS_CSUM, gso_type, hdr_len: if tcp { 40 } else { 28 }, gso_size, csum_start: 20, csum_offset: if tcp { 16 } else { 6 } }
}

/// One frame per (header, packet), as a peer's worker would publish them.
fn frames(entries: &[(VnetHdr, Vec<u8>)]) -> Vec<Vec<u8>> {
    entries
        .iter()
        .map(|(h, p)| {
            let hdr = h.to_bytes();
            let mut out = Vec::new();
            let header = FrameHeader { flags: FLAG_VNET, count: 0, sender_queues: 0, seq: 1, timestamp_ns: 0 };
            v1::encode(header, &[Packet { vnet: Some(&hdr), data: p }], &mut out).expect("frame");
            out
        })
        .collect()
}

/// Publishes `bodies` onto every data queue of agent `name` (stamped `guest`, the login
/// both agents of a [`Pair`] share, so the first-claim check lets them through).
fn publish_to(name: &str, queues: usize, bodies: &[Vec<u8>]) {
    let mut c = bus_client();
    for q in 0..queues {
        for b in bodies {
            publish(&mut c, "", &format!("tunbus.{name}.{q}"), &Default::default(), b);
        }
    }
    c.close(Duration::from_secs(1));
}

/// Kernel log lines that would mean our packets hurt the kernel.
fn kernel_warnings(since: usize) -> Vec<String> {
    let out = std::process::Command::new("dmesg").output().expect("dmesg");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(since)
        .filter(|l| ["WARNING", "BUG", "bad gso", "skb_warn_bad_offload", "Oops", "general protection", "tun:", "virtio"].iter().any(|w| l.contains(w)))
        .map(str::to_owned)
        .collect()
}

fn dmesg_lines() -> usize {
    let out = std::process::Command::new("dmesg").output().expect("dmesg");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// A UDP socket in `ns` on `addr`; returns the datagrams it got within `wait` once
/// `expect` arrived or time ran out.
fn udp_listen(ns: &str, addr: &str, expect: usize, wait: Duration) -> (std::thread::JoinHandle<Vec<Vec<u8>>>, std::sync::mpsc::Receiver<()>) {
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let addr = addr.to_owned();
    let h = in_netns(ns, move || {
        let s = UdpSocket::bind(&addr).expect("bind udp in namespace");
        s.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
        ready_tx.send(()).expect("ready");
        let mut got = Vec::new();
        let t0 = std::time::Instant::now();
        let mut buf = vec![0u8; 65536];
        while got.len() < expect && t0.elapsed() < wait {
            if let Ok(n) = s.recv(&mut buf) {
                got.push(buf[..n].to_vec());
            }
        }
        got
    });
    (h, ready)
}

#[test]
fn hostile_virtio_headers_are_counted_and_valid_offload_still_works() {
    if !system_ready("hostile_virtio_headers_are_counted_and_valid_offload_still_works") {
        return;
    }
    let mut p = Pair::start(60, &[]);
    let (a, b): (Ipv4Addr, Ipv4Addr) = (p.v4[0].parse().expect("v4"), p.v4[1].parse().expect("v4"));
    let dmesg_before = dmesg_lines();

    let udp = udp4(a, b, 4000, 5000, &[7u8; 3000], false);
    let tcp = tcp4(a, b, &[9u8; 3000]);
    let tcp_gso = offload(&tcp, 1448);
    let udp_gso = offload(&udp, 1400);
    let mut v6_packet = vec![0u8; 40 + 20 + 100];
    v6_packet[0] = 0x60;
    v6_packet[4..6].copy_from_slice(&120u16.to_be_bytes());
    v6_packet[6] = 6;
    v6_packet[8..24].copy_from_slice(&"fd00:3c::1".parse::<std::net::Ipv6Addr>().expect("v6").octets());
    v6_packet[24..40].copy_from_slice(&"fd00:3c::2".parse::<std::net::Ipv6Addr>().expect("v6").octets());
    v6_packet[40 + 12] = 5 << 4;
    let hostile: Vec<(VnetHdr, Vec<u8>)> = vec![
        (VnetHdr { gso_size: 0, ..tcp_gso }, tcp.clone()),
        (VnetHdr { gso_size: 1, ..tcp_gso }, tcp.clone()),
        (VnetHdr { gso_size: 1, ..udp_gso }, udp.clone()),
        (VnetHdr { gso_type: vnet::GSO_TCPV6, ..tcp_gso }, tcp.clone()), // IPv6 GSO on IPv4
        (VnetHdr { gso_type: vnet::GSO_TCPV4, csum_start: 40, ..tcp_gso }, v6_packet.clone()), // IPv4 GSO on IPv6
        (VnetHdr { gso_type: vnet::GSO_UDP, ..udp_gso }, udp.clone()), // UFO
        (VnetHdr { gso_type: vnet::GSO_UDP_L4, ..tcp_gso }, tcp.clone()), // UDP GSO on TCP
        (VnetHdr { gso_type: vnet::GSO_TCPV4, ..udp_gso }, udp.clone()), // TCP GSO on UDP
        (VnetHdr { gso_type: 7, ..tcp_gso }, tcp.clone()),
        (VnetHdr { gso_type: vnet::GSO_UDP_L4 | vnet::GSO_ECN, ..udp_gso }, udp.clone()),
        (VnetHdr { csum_start: 0, ..tcp_gso }, tcp.clone()),
        (VnetHdr { csum_start: 3050, ..tcp_gso }, tcp.clone()), // past the end
        (VnetHdr { csum_start: 65535, csum_offset: 65535, ..offload(&udp, 0) }, udp.clone()),
        (VnetHdr { csum_offset: 0, ..offload(&udp, 0) }, udp.clone()),
        (VnetHdr { flags: vnet::F_NEEDS_CSUM | 0x04, ..tcp_gso }, tcp.clone()), // extra flag bit
        (VnetHdr { flags: 0x80, ..offload(&udp, 0) }, udp.clone()),
        (VnetHdr { flags: 0, ..tcp_gso }, tcp.clone()), // GSO without NEEDS_CSUM
        (VnetHdr { gso_size: 48, ..tcp_gso }, tcp.clone()), // 63 segments: fine ...
        (VnetHdr { gso_size: 20, ..udp_gso }, udp.clone()), // ... 150: too many
        (offload(&tcp, 1448), { let mut t = tcp.clone(); t[2] ^= 0x10; t }), // IP length lies
    ];
    // gso_size 48 on 3000 bytes is legal (63 segments); so is gso_size 65535 (one
    // segment: written as checksum-only).
    let allowed_among_hostile = 1;
    let one_segment = vec![(VnetHdr { gso_size: 65535, ..tcp_gso }, tcp.clone())];
    let bad = (hostile.len() - allowed_among_hostile) as u64;

    // Valid offload next to them: a UDP GSO super-packet of 10 datagrams of 100 bytes.
    let payload: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
    let super_udp = udp4(a, b, 4000, 5000, &payload, false);
    let valid = vec![(offload(&super_udp, 100), super_udp)];
    let (listener, ready) = udp_listen(&p.ns_b.name, &format!("{b}:5000"), 10, Duration::from_secs(5));
    ready.recv().expect("listener ready");
    let mut all = frames(&hostile);
    all.extend(frames(&valid));
    all.extend(frames(&one_segment));
    publish_to(&p.b.name, 1, &all);

    let got = listener.join().expect("listener");
    assert_eq!(got.len(), 10, "the valid UDP GSO packet did not arrive as 10 datagrams: {:?}", got.iter().map(Vec::len).collect::<Vec<_>>());
    assert_eq!(got.concat(), payload, "datagrams differ from what was sent");
    assert!(p.b.alive(), "agent died on hostile headers:\n{}", p.b.logs());
    let (ok, out) = ping(&p.ns_a, &p.v4[1], 3);
    assert!(ok, "ping after hostile headers failed:\n{out}");
    let sink = tcp_sink(&p.ns_b.name, format!("{}:5003", p.v4[1]), 1);
    let sent = tcp_send(&p.ns_a.name, format!("{}:5003", p.v4[1]), 8 << 20, 60).join().expect("tcp sender");
    assert_eq!(sink.join().expect("sink"), vec![sent], "TCP after hostile headers arrived damaged");

    let rb = p.b.interrupt();
    assert_eq!(drops(&rb, "bad_vnet"), bad, "{rb}");
    let warnings = kernel_warnings(dmesg_before);
    assert!(warnings.is_empty(), "the kernel complained:\n{}", warnings.join("\n"));
}

#[test]
fn no_offload_from_bus_completes_checksums_and_refuses_super_packets() {
    if !system_ready("no_offload_from_bus_completes_checksums_and_refuses_super_packets") {
        return;
    }
    // The sender asks its kernel for no offload; the receiver takes none from the bus.
    let mut p = Pair::start_with(61, &["--no-offload"], &["--no-offload-from-bus"]);
    let (a, b): (Ipv4Addr, Ipv4Addr) = (p.v4[0].parse().expect("v4"), p.v4[1].parse().expect("v4"));
    let payload = b"checksum completed in software".to_vec();
    let partial = udp4(a, b, 4000, 5001, &payload, false);
    let super_udp = udp4(a, b, 4000, 5001, &[1u8; 1000], false);
    let (listener, ready) = udp_listen(&p.ns_b.name, &format!("{b}:5001"), 2, Duration::from_secs(3));
    ready.recv().expect("listener ready");
    publish_to(&p.b.name, 1, &frames(&[(offload(&partial, 0), partial), (offload(&super_udp, 100), super_udp)]));
    let got = listener.join().expect("listener");
    // With a plain header the kernel checks the UDP checksum: this arrived only if it was completed.
    assert_eq!(got, vec![payload], "expected the checksum-only datagram and nothing of the super-packet");

    let sink = tcp_sink(&p.ns_b.name, format!("{}:5004", p.v4[1]), 1);
    let sent = tcp_send(&p.ns_a.name, format!("{}:5004", p.v4[1]), 8 << 20, 61).join().expect("tcp sender");
    assert_eq!(sink.join().expect("sink"), vec![sent], "TCP without offload arrived damaged");
    let rb = p.b.interrupt();
    assert_eq!(drops(&rb, "offload_refused"), 1, "{rb}");
    assert_eq!(drops(&rb, "bad_vnet"), 0, "{rb}");
}
