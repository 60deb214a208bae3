//! Route micro benchmarks: what the TX worker does per packet to pick a routing key.
//!
//! `classify_key` is `route::classify` (addresses, flood check, flow hash, shard) followed by
//! `RoutingKey::unicast` (formats `tunbus.v1.<dst>.<shard>` on the stack); `classify` and
//! `unicast_key` are those two halves alone, `flow_hash` the 5-tuple hash alone. One element
//! is one packet; the packets are 64-byte IPv4 TCP and IPv6 UDP (only headers are read).
//! `decide` is the whole per-packet decision of the TX worker before the key: `is_mld`,
//! `classify`, and the directed-broadcast check against two own IPv4 networks.
//!
//! `identity/source_check` is the receiver's check of a packet's source against its sender's
//! broker user (strict table of 300 users).
//!
//! Run: `cargo bench --bench route`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tunbus::route::{self, Destination, RoutingKey};

fn config() -> Criterion {
    Criterion::default().measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500)).sample_size(20)
}

/// 198.18.0.1:40000 → 198.18.0.2:5001, TCP, 64 bytes.
fn ipv4_tcp() -> Vec<u8> {
    let mut p = vec![0u8; 64];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&64u16.to_be_bytes());
    p[6] = 0x40; // DF
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&[198, 18, 0, 1]);
    p[16..20].copy_from_slice(&[198, 18, 0, 2]);
    p[20..22].copy_from_slice(&40000u16.to_be_bytes());
    p[22..24].copy_from_slice(&5001u16.to_be_bytes());
    p[32] = 0x50; // data offset 5
    p
}

/// [fd00:7b::1]:40000 → [fd00:7b::2]:5001, UDP, 64 bytes.
fn ipv6_udp() -> Vec<u8> {
    let mut p = vec![0u8; 64];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&24u16.to_be_bytes());
    p[6] = 17;
    p[7] = 64;
    let src: std::net::Ipv6Addr = "fd00:7b::1".parse().expect("valid address");
    let dst: std::net::Ipv6Addr = "fd00:7b::2".parse().expect("valid address");
    p[8..24].copy_from_slice(&src.octets());
    p[24..40].copy_from_slice(&dst.octets());
    p[40..42].copy_from_slice(&40000u16.to_be_bytes());
    p[42..44].copy_from_slice(&5001u16.to_be_bytes());
    p[44..46].copy_from_slice(&24u16.to_be_bytes());
    p
}

/// The TX worker's per-packet routing decision (without the directed-broadcast check).
#[inline]
fn key_for(packet: &[u8]) -> Option<RoutingKey> {
    let c = route::classify(packet).ok()?;
    match c.dst {
        Destination::Unicast(ip) => Some(RoutingKey::unicast(ip, c.shard)),
        Destination::Flood => None,
    }
}

/// `worker::queue`'s decision before the key: MLD is dropped, then classification and the
/// directed-broadcast check.
#[inline]
fn decide(packet: &[u8], own_v4: &[(std::net::Ipv4Addr, u8)]) -> Option<(Destination, u8)> {
    if route::is_mld(packet) {
        return None;
    }
    let c = route::classify(packet).ok()?;
    let dst = match c.dst {
        Destination::Unicast(std::net::IpAddr::V4(v4)) if route::is_directed_broadcast(v4, own_v4) => Destination::Flood,
        d => d,
    };
    Some((dst, c.shard))
}

fn routing(c: &mut Criterion) {
    let packets = [("ipv4_tcp", ipv4_tcp()), ("ipv6_udp", ipv6_udp())];
    for (_, p) in &packets {
        assert!(key_for(p).is_some(), "test packets are unicast");
    }
    let mut g = c.benchmark_group("route");
    g.throughput(Throughput::Elements(1));
    for (name, p) in &packets {
        g.bench_function(format!("classify_key/{name}"), |b| b.iter(|| key_for(black_box(p))));
    }
    for (name, p) in &packets {
        g.bench_function(format!("classify/{name}"), |b| b.iter(|| route::classify(black_box(p))));
    }
    let own_v4 = [(std::net::Ipv4Addr::new(198, 18, 0, 1), 15), (std::net::Ipv4Addr::new(10, 2, 0, 1), 24)];
    for (name, p) in &packets {
        g.bench_function(format!("decide/{name}"), |b| b.iter(|| decide(black_box(p), black_box(&own_v4))));
    }
    for (name, p) in &packets {
        let c = route::classify(p).expect("valid packet");
        let Destination::Unicast(dst) = c.dst else { unreachable!("test packets are unicast") };
        g.bench_function(format!("unicast_key/{name}"), |b| b.iter(|| RoutingKey::unicast(black_box(dst), black_box(c.shard))));
    }
    for (name, p) in &packets {
        g.bench_function(format!("flow_hash/{name}"), |b| b.iter(|| route::flow_hash(black_box(p))));
    }
    g.finish();
}

/// The receiver's identity check: the sender's prefixes looked up once per message in a
/// strict table of 300 users, then `route::source` and the verdict, as `rx::deliver` does it
/// for a packet whose source differs from the one before.
fn identity(c: &mut Criterion) {
    use tunbus::identity::{Mode, Table, Trust, Verdict};
    let users: Vec<(String, Vec<tunbus::route::Prefix>)> = (1..=300u32)
        .map(|i| {
            let v4 = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(198, 18, 0, 0)) + i);
            (format!("lab.h{i}"), vec![format!("{v4}/32").parse().expect("prefix"), format!("fd00:7b::{i:x}/128").parse().expect("prefix")])
        })
        .collect();
    let view = Trust::new(&Mode::Strict(Table::new(users))).view();
    let packets = [("ipv4_tcp", ipv4_tcp(), &b"lab.h1"[..]), ("ipv6_udp", ipv6_udp(), &b"lab.h1"[..])];
    for (_, p, u) in &packets {
        assert_eq!(view.check(Some(u), route::source(p).expect("has a source")), Verdict::Allowed);
    }
    let mut g = c.benchmark_group("identity");
    g.throughput(Throughput::Elements(1));
    for (name, p, u) in &packets {
        // Once per message: the sender's prefixes.
        g.bench_function(format!("sender/{name}"), |b| b.iter(|| view.sender(Some(black_box(u)))));
        // Once per new source in a message: its verdict.
        let sender = view.sender(Some(u));
        g.bench_function(format!("source_check/{name}"), |b| b.iter(|| route::source(black_box(p)).map(|s| sender.check(s))));
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = routing, identity
}
criterion_main!(benches);
