//! Packet classification: destination and source of an IP packet, the fixed flow hash and
//! its shard, subnet-directed broadcasts, MLD. Pure, allocation-free, never panics on any
//! input. The headers are read through the checked views of [`crate::packet`]: each packet
//! is checked once ([`IpPacket::new_checked`]) and its IPv6 extension headers are walked
//! in one place ([`Ipv6Packet::upper_layer`]).

use std::net::{IpAddr, Ipv4Addr};

use super::key::SHARDS;
use crate::packet::icmp::Icmpv6Packet;
use crate::packet::ip::{self, protocol};
use crate::packet::{Error, IpPacket, Ipv6Packet, Prefix};
use crate::util::{fmix32, Fnv1a32};

/// Where a packet goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    /// One address: `tunbus.v1.<dst>.<shard>`.
    Unicast(IpAddr),
    /// Everyone: IPv4 255.255.255.255 and 224.0.0.0/4, IPv6 ff00::/8 (`tunbus.v1.all.<sender>`).
    /// Subnet-directed broadcasts need the local networks: see [`is_directed_broadcast`].
    Flood,
}

/// What the worker needs to know about one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Classified {
    /// Source address.
    pub src: IpAddr,
    /// Destination.
    pub dst: Destination,
    /// Flow shard, `0..SHARDS`: `shard(flow_hash(packet))`.
    pub shard: u8,
}

/// Why a packet cannot be routed. Counted and dropped by the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClassifyError {
    /// Zero bytes.
    #[error("empty packet")]
    Empty,
    /// The version nibble is neither 4 nor 6.
    #[error("not an IP packet")]
    NotIp,
    /// Shorter than the fixed IPv4 (20) or IPv6 (40) header.
    #[error("truncated IP header")]
    Truncated,
}

/// Classifies one IP packet (no vnet header): source, destination and flow shard.
#[inline]
pub fn classify(packet: &[u8]) -> Result<Classified, ClassifyError> {
    let ip = IpPacket::new_checked(packet).map_err(|e| match e {
        Error::Truncated if packet.is_empty() => ClassifyError::Empty,
        Error::Version => ClassifyError::NotIp,
        _ => ClassifyError::Truncated,
    })?;
    let dst = match &ip {
        IpPacket::V4(p) => {
            let dst = p.dst_addr();
            if dst.is_broadcast() || dst.is_multicast() {
                Destination::Flood
            } else {
                Destination::Unicast(IpAddr::V4(dst))
            }
        }
        IpPacket::V6(p) => {
            let dst = p.dst_addr();
            if dst.is_multicast() {
                Destination::Flood
            } else {
                Destination::Unicast(IpAddr::V6(dst))
            }
        }
    };
    Ok(Classified { src: ip.src_addr(), dst, shard: shard(hash_of(&ip)) })
}

/// The source address of an IP packet (no vnet header), if it has a whole fixed header.
#[inline]
pub fn source(packet: &[u8]) -> Option<IpAddr> {
    IpPacket::new_checked(packet).ok().map(|ip| ip.src_addr())
}

/// The destination address of an IP packet (no vnet header), as written (multicast and
/// broadcast included), if it has a whole fixed header.
#[inline]
pub fn destination(packet: &[u8]) -> Option<IpAddr> {
    IpPacket::new_checked(packet).ok().map(|ip| ip.dst_addr())
}

/// Deterministic 32-bit hash of (src, dst, protocol, src port, dst port): FNV-1a over the
/// tuple bytes, then MurmurHash3's `fmix32`. The same on every host and every run.
///
/// Ports are read only for TCP, UDP, UDP-Lite and SCTP, and are 0 for IPv4 fragments (MF
/// set or offset != 0) and IPv6 packets with a fragment header (so all fragments of a
/// datagram share a shard), and when the transport header is truncated. IPv6 follows up to
/// 8 hop-by-hop / routing / destination-options headers; with a fragment header the
/// protocol is the fragment header's next header. Not an IP packet or truncated IP header: 0.
#[inline]
pub fn flow_hash(packet: &[u8]) -> u32 {
    IpPacket::new_checked(packet).map_or(0, |ip| hash_of(&ip))
}

/// [`flow_hash`] of a checked packet.
#[inline]
fn hash_of(ip: &IpPacket<&[u8]>) -> u32 {
    let mut h = Fnv1a32::new();
    let (proto, ports) = match ip {
        IpPacket::V4(p) => {
            let proto = p.protocol();
            let ports = if ip::has_ports(proto) && !p.is_fragment() { p.payload().and_then(ip::ports) } else { None };
            h.write(&p.src_addr().octets());
            h.write(&p.dst_addr().octets());
            (proto, ports)
        }
        IpPacket::V6(p) => {
            let u = p.upper_layer();
            let ports = if ip::has_ports(u.protocol) { u.offset.and_then(|at| p.as_bytes().get(at..)).and_then(ip::ports) } else { None };
            h.write(&p.src_addr().octets());
            h.write(&p.dst_addr().octets());
            (u.protocol, ports)
        }
    };
    h.write(&[proto]);
    h.write(&ports.unwrap_or([0; 4]));
    h.finish()
}

/// The shard of a flow hash, `0..SHARDS`. Mixes the bits first so that weak low bits in
/// `hash` still spread evenly.
pub fn shard(hash: u32) -> u8 {
    (fmix32(hash ^ 0x9e37_79b9) % u32::from(SHARDS)) as u8
}

/// The queue (of `queues`) that shard `shard` is bound to: `shard mod queues`; 0 when
/// `queues` is 0.
pub fn queue_for_shard(shard: u8, queues: usize) -> usize {
    usize::from(shard).checked_rem(queues).unwrap_or(0)
}

/// Whether `dst` is the subnet-directed broadcast address of one of the IPv4 networks
/// `nets` (address, prefix length; [`Prefix::broadcast`]). Prefixes of 31 or more have no
/// broadcast address; a length above 32 is no prefix.
#[inline]
pub fn is_directed_broadcast(dst: Ipv4Addr, nets: &[(Ipv4Addr, u8)]) -> bool {
    nets.iter().any(|&(net, len)| Prefix::new(IpAddr::V4(net), len).and_then(|p| p.broadcast()) == Some(dst))
}

/// Whether `packet` is an IPv6 MLD message (ICMPv6 types 130-132 and 143, behind the
/// hop-by-hop header that carries their router alert, or any other extension headers).
/// tunbus floods every multicast packet to every agent of a session whatever the
/// membership, so membership reports inform nobody; agents do not forward them. Never
/// panics.
#[inline]
pub fn is_mld(packet: &[u8]) -> bool {
    let Ok(p) = Ipv6Packet::new_checked(packet) else {
        return false;
    };
    let u = p.upper_layer();
    u.protocol == protocol::ICMPV6 && u.offset.and_then(|at| packet.get(at..)).and_then(|m| Icmpv6Packet::new_checked(m).ok()).is_some_and(|m| m.is_mld())
}

#[cfg(test)]
mod tests {
    #[test]
    fn mld_is_recognised_and_nothing_else() {
        let mut p = vec![0u8; 40 + 8 + 28];
        p[0] = 0x60;
        p[6] = 0; // hop-by-hop
        p[40] = 58; // then ICMPv6
        p[41] = 0; // 8 bytes of options
        p[48] = 143; // MLDv2 report
        assert!(super::is_mld(&p));
        p[48] = 131;
        assert!(super::is_mld(&p));
        p[48] = 128; // echo request
        assert!(!super::is_mld(&p));
        p[48] = 143;
        p[40] = 17; // UDP after hop-by-hop
        assert!(!super::is_mld(&p));
        assert!(!super::is_mld(&p[..45]));
        assert!(!super::is_mld(&[0x45; 60]));
        assert!(!super::is_mld(&[]));
        for n in 0..=p.len() {
            let _ = super::is_mld(&p[..n]);
        }
    }

    use super::*;
    use crate::packet::ipv6::MAX_EXT_HEADERS;
    use proptest::prelude::*;
    use std::net::Ipv6Addr;

    // ---- packet builders ----

    fn ipv4(proto: u8, src: [u8; 4], dst: [u8; 4], frag: u16, payload: &[u8]) -> Vec<u8> {
        let total = (20 + payload.len()) as u16;
        let mut p = vec![0x45, 0];
        p.extend_from_slice(&total.to_be_bytes());
        p.extend_from_slice(&[0x12, 0x34]);
        p.extend_from_slice(&frag.to_be_bytes());
        p.extend_from_slice(&[64, proto, 0, 0]);
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(payload);
        p
    }

    fn ports(sp: u16, dp: u16) -> Vec<u8> {
        let mut v = sp.to_be_bytes().to_vec();
        v.extend_from_slice(&dp.to_be_bytes());
        v.extend_from_slice(&[0, 8, 0, 0]);
        v
    }

    fn ipv6(next: u8, src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        p.extend_from_slice(&[next, 64]);
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(payload);
        p
    }

    /// An IPv6 extension header of (len + 1) * 8 bytes.
    fn ext(next: u8, len: u8) -> Vec<u8> {
        let mut v = vec![next, len];
        v.resize((usize::from(len) + 1) * 8, 0);
        v
    }

    fn frag_hdr(next: u8, offset_mf: u16) -> Vec<u8> {
        let mut v = vec![next, 0];
        v.extend_from_slice(&offset_mf.to_be_bytes());
        v.extend_from_slice(&[0, 0, 0, 1]);
        v
    }

    const A4: [u8; 4] = [198, 18, 0, 1];
    const B4: [u8; 4] = [198, 18, 0, 2];
    fn a6() -> Ipv6Addr {
        "fd00::1".parse().unwrap()
    }
    fn b6() -> Ipv6Addr {
        "fd00:7b::2".parse().unwrap()
    }

    /// The hash as the documented tuple would give it.
    fn tuple_hash(src: &[u8], dst: &[u8], proto: u8, sp: u16, dp: u16) -> u32 {
        let mut h = Fnv1a32::new();
        h.write(src);
        h.write(dst);
        h.write(&[proto]);
        h.write(&sp.to_be_bytes());
        h.write(&dp.to_be_bytes());
        h.finish()
    }

    // ---- classify ----

    #[test]
    fn classify_errors() {
        assert_eq!(classify(&[]), Err(ClassifyError::Empty));
        for first in [0x00, 0x10, 0x50, 0x70, 0xf0, 0x3f] {
            assert_eq!(classify(&[first; 60]), Err(ClassifyError::NotIp), "{first:#x}");
        }
        assert_eq!(classify(b"ZZZ not a packet, but long enough for any IP header........"), Err(ClassifyError::NotIp));
        let p4 = ipv4(17, A4, B4, 0, &ports(1, 2));
        for n in 1..20 {
            assert_eq!(classify(&p4[..n]), Err(ClassifyError::Truncated), "v4 len {n}");
        }
        let p6 = ipv6(17, a6(), b6(), &ports(1, 2));
        for n in 1..40 {
            assert_eq!(classify(&p6[..n]), Err(ClassifyError::Truncated), "v6 len {n}");
        }
        assert!(classify(&p4[..20]).is_ok());
        assert!(classify(&p6[..40]).is_ok());
    }

    #[test]
    fn classify_unicast_and_flood() {
        let c = classify(&ipv4(1, A4, B4, 0, &[8, 0, 0, 0])).unwrap();
        assert_eq!(c.src, IpAddr::from(A4));
        assert_eq!(c.dst, Destination::Unicast(IpAddr::from(B4)));
        assert!(c.shard < SHARDS);

        for dst in [[255, 255, 255, 255], [224, 0, 0, 1], [239, 255, 255, 250], [224, 0, 0, 251]] {
            assert_eq!(classify(&ipv4(17, A4, dst, 0, &ports(5353, 5353))).unwrap().dst, Destination::Flood);
        }
        for dst in [[223, 255, 255, 255], [240, 0, 0, 1], [198, 18, 255, 255], [10, 2, 0, 255]] {
            assert_eq!(
                classify(&ipv4(17, A4, dst, 0, &[])).unwrap().dst,
                Destination::Unicast(IpAddr::from(dst)),
                "{dst:?} (directed broadcasts need is_directed_broadcast)"
            );
        }

        let c = classify(&ipv6(58, a6(), b6(), &[128, 0, 0, 0])).unwrap();
        assert_eq!(c.src, IpAddr::V6(a6()));
        assert_eq!(c.dst, Destination::Unicast(IpAddr::V6(b6())));
        for dst in ["ff02::1", "ff02::1:ff00:2", "ff05::fb", "ff00::"] {
            assert_eq!(classify(&ipv6(58, a6(), dst.parse().unwrap(), &[])).unwrap().dst, Destination::Flood);
        }
        for dst in ["fe80::1", "fec0::1", "fd00::ff"] {
            assert!(matches!(classify(&ipv6(58, a6(), dst.parse().unwrap(), &[])).unwrap().dst, Destination::Unicast(_)));
        }
    }

    #[test]
    fn classify_shard_matches_flow_hash() {
        let p = ipv4(6, A4, B4, 0, &ports(40000, 80));
        assert_eq!(classify(&p).unwrap().shard, shard(flow_hash(&p)));
        let p = ipv6(17, a6(), b6(), &ports(40000, 53));
        assert_eq!(classify(&p).unwrap().shard, shard(flow_hash(&p)));
    }

    // ---- flow hash ----

    #[test]
    fn flow_hash_ipv4_ports() {
        for proto in [6, 17, 132, 136] {
            let p = ipv4(proto, A4, B4, 0, &ports(1234, 80));
            assert_eq!(flow_hash(&p), tuple_hash(&A4, &B4, proto, 1234, 80), "proto {proto}");
            assert_ne!(flow_hash(&p), flow_hash(&ipv4(proto, A4, B4, 0, &ports(1235, 80))));
            assert_ne!(flow_hash(&p), flow_hash(&ipv4(proto, A4, B4, 0, &ports(1234, 81))));
            // the reverse direction is a different flow
            assert_ne!(flow_hash(&p), flow_hash(&ipv4(proto, B4, A4, 0, &ports(80, 1234))));
            // DF bit does not matter
            assert_eq!(flow_hash(&p), flow_hash(&ipv4(proto, A4, B4, 0x4000, &ports(1234, 80))));
        }
        // ICMP and others: no ports, payload ignored
        let icmp = ipv4(1, A4, B4, 0, &[8, 0, 1, 2, 3, 4]);
        assert_eq!(flow_hash(&icmp), tuple_hash(&A4, &B4, 1, 0, 0));
        assert_eq!(flow_hash(&icmp), flow_hash(&ipv4(1, A4, B4, 0, &[0, 0, 9, 9, 9, 9])));
        assert_eq!(flow_hash(&ipv4(47, A4, B4, 0, &ports(1, 2))), tuple_hash(&A4, &B4, 47, 0, 0));
    }

    #[test]
    fn flow_hash_ipv4_options_and_bad_ihl() {
        // IHL 6: ports after 4 bytes of options
        let mut p = ipv4(17, A4, B4, 0, &[1, 1, 1, 1]);
        p[0] = 0x46;
        p.extend_from_slice(&ports(7, 9));
        assert_eq!(flow_hash(&p), tuple_hash(&A4, &B4, 17, 7, 9));
        // IHL < 5 is malformed: no ports
        let mut p = ipv4(17, A4, B4, 0, &ports(7, 9));
        p[0] = 0x44;
        assert_eq!(flow_hash(&p), tuple_hash(&A4, &B4, 17, 0, 0));
        // IHL past the end: no ports
        let mut p = ipv4(17, A4, B4, 0, &ports(7, 9));
        p[0] = 0x4f;
        assert_eq!(flow_hash(&p), tuple_hash(&A4, &B4, 17, 0, 0));
    }

    #[test]
    fn flow_hash_ipv4_fragments_share_shard() {
        let first = ipv4(17, A4, B4, 0x2000, &ports(1234, 53)); // MF, offset 0
        let middle = ipv4(17, A4, B4, 0x2000 | 185, &[0xaa; 8]); // MF, offset 185
        let last = ipv4(17, A4, B4, 370, &[0xbb; 8]); // offset 370
        let want = tuple_hash(&A4, &B4, 17, 0, 0);
        for p in [&first, &middle, &last] {
            assert_eq!(flow_hash(p), want);
        }
        // with DF as well
        assert_eq!(flow_hash(&ipv4(17, A4, B4, 0x6000, &ports(1, 2))), want);
    }

    #[test]
    fn flow_hash_truncated_transport() {
        let full = ipv4(6, A4, B4, 0, &ports(1234, 80));
        for n in 20..24 {
            assert_eq!(flow_hash(&full[..n]), tuple_hash(&A4, &B4, 6, 0, 0), "len {n}");
        }
        assert_eq!(flow_hash(&full[..24]), tuple_hash(&A4, &B4, 6, 1234, 80));
        let full6 = ipv6(17, a6(), b6(), &ports(1234, 80));
        for n in 40..44 {
            assert_eq!(flow_hash(&full6[..n]), tuple_hash(&a6().octets(), &b6().octets(), 17, 0, 0));
        }
        assert_eq!(flow_hash(&full6[..44]), tuple_hash(&a6().octets(), &b6().octets(), 17, 1234, 80));
    }

    #[test]
    fn flow_hash_non_ip_is_zero() {
        assert_eq!(flow_hash(&[]), 0);
        assert_eq!(flow_hash(&[0x45; 19]), 0);
        assert_eq!(flow_hash(&[0x60; 39]), 0);
        assert_eq!(flow_hash(&[0x00; 64]), 0);
        assert_eq!(flow_hash(b"ZZZ not a packet, but long enough for any IP header........"), 0);
    }

    #[test]
    fn flow_hash_ipv6_ext_headers() {
        let (s, d) = (a6().octets(), b6().octets());
        let want = tuple_hash(&s, &d, 17, 1000, 2000);
        assert_eq!(flow_hash(&ipv6(17, a6(), b6(), &ports(1000, 2000))), want);
        // hop-by-hop -> routing -> destination options -> UDP
        let mut payload = ext(43, 0);
        payload.extend(ext(60, 2));
        payload.extend(ext(17, 1));
        payload.extend(ports(1000, 2000));
        assert_eq!(flow_hash(&ipv6(0, a6(), b6(), &payload)), want);
        // TCP after a destination options header
        let mut payload = ext(6, 0);
        payload.extend(ports(443, 5555));
        assert_eq!(flow_hash(&ipv6(60, a6(), b6(), &payload)), tuple_hash(&s, &d, 6, 443, 5555));
        // ICMPv6: no ports
        assert_eq!(flow_hash(&ipv6(58, a6(), b6(), &[128, 0, 1, 2, 3, 4])), tuple_hash(&s, &d, 58, 0, 0));
        // no next header
        assert_eq!(flow_hash(&ipv6(59, a6(), b6(), &[])), tuple_hash(&s, &d, 59, 0, 0));
        // extension header truncated: protocol is the header we could not read past
        let mut payload = ext(17, 1);
        payload.truncate(1);
        assert_eq!(flow_hash(&ipv6(0, a6(), b6(), &payload)), tuple_hash(&s, &d, 0, 0, 0));
        // extension header length runs past the end
        let mut payload = ext(17, 0);
        payload[1] = 200;
        assert_eq!(flow_hash(&ipv6(0, a6(), b6(), &payload)), tuple_hash(&s, &d, 17, 0, 0));
    }

    #[test]
    fn flow_hash_ipv6_ext_header_bound() {
        let (s, d) = (a6().octets(), b6().octets());
        let chain = |n: usize| {
            let mut payload = Vec::new();
            for _ in 0..n - 1 {
                payload.extend(ext(60, 0));
            }
            payload.extend(ext(17, 0));
            payload.extend(ports(1, 2));
            ipv6(60, a6(), b6(), &payload)
        };
        assert_eq!(flow_hash(&chain(MAX_EXT_HEADERS)), tuple_hash(&s, &d, 17, 1, 2));
        assert_eq!(flow_hash(&chain(MAX_EXT_HEADERS + 1)), tuple_hash(&s, &d, 60, 0, 0));
        assert_eq!(flow_hash(&chain(50)), tuple_hash(&s, &d, 60, 0, 0));
    }

    #[test]
    fn flow_hash_ipv6_fragments_share_shard() {
        let (s, d) = (a6().octets(), b6().octets());
        let want = tuple_hash(&s, &d, 17, 0, 0);
        let mut first = frag_hdr(17, 0x0001); // offset 0, M
        first.extend(ports(1234, 53));
        let mut later = frag_hdr(17, 185 << 3); // offset 185, last
        later.extend([0xcc; 16]);
        assert_eq!(flow_hash(&ipv6(44, a6(), b6(), &first)), want);
        assert_eq!(flow_hash(&ipv6(44, a6(), b6(), &later)), want);
        // fragment header after hop-by-hop
        let mut hbh = ext(44, 0);
        hbh.extend(frag_hdr(17, 0x0001));
        hbh.extend(ports(1234, 53));
        assert_eq!(flow_hash(&ipv6(0, a6(), b6(), &hbh)), want);
        // fragment header truncated to nothing
        assert_eq!(flow_hash(&ipv6(44, a6(), b6(), &[])), tuple_hash(&s, &d, 44, 0, 0));
    }

    #[test]
    fn flow_hash_is_fixed() {
        // Pinned values (computed independently, in Python): the hash must never change
        // between builds, hosts or runs, or agents of different versions would disagree.
        let p = ipv4(17, A4, B4, 0, &ports(1234, 53));
        assert_eq!(flow_hash(&p), 0xaa12_c023);
        assert_eq!(shard(flow_hash(&p)), 3);
        let p = ipv6(6, a6(), b6(), &ports(40000, 443));
        assert_eq!(flow_hash(&p), 0x3919_ce76);
        assert_eq!(shard(flow_hash(&p)), 12);
        assert_eq!(fmix32(0), 0);
        assert_eq!(Fnv1a32::new().0, 0x811c_9dc5);
    }

    #[test]
    fn shards_spread_evenly() {
        // 10 000 distinct UDP flows from a fixed PRNG (xorshift32): every shard gets its share.
        let mut x: u32 = 0x1234_5678;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        let mut counts = [0u32; SHARDS as usize];
        for _ in 0..10_000 {
            let r = next();
            let src = [198, 18, (r >> 24) as u8, (r >> 16) as u8];
            let p = ipv4(17, src, B4, 0, &ports(r as u16, 4789));
            counts[usize::from(classify(&p).unwrap().shard)] += 1;
        }
        assert!(counts.iter().all(|&c| (400..=850).contains(&c)), "{counts:?}");

        // Sequential source ports from one host (the common case: one client, many sockets).
        let mut counts = [0u32; SHARDS as usize];
        for port in 0..10_000u16 {
            let p = ipv6(6, a6(), b6(), &ports(30_000 + port, 443));
            counts[usize::from(classify(&p).unwrap().shard)] += 1;
        }
        assert!(counts.iter().all(|&c| (400..=850).contains(&c)), "{counts:?}");
    }

    #[test]
    fn shard_mixes_weak_hashes() {
        // Hashes differing only in high bits still spread over all shards.
        let mut seen = [false; SHARDS as usize];
        for i in 0..256u32 {
            seen[usize::from(shard(i << 24))] = true;
        }
        assert!(seen.iter().all(|&s| s));
        assert!((0..100_000u32).all(|h| shard(h) < SHARDS));
        assert_eq!(shard(u32::MAX), shard(u32::MAX));
    }

    #[test]
    fn queue_mapping() {
        assert_eq!(queue_for_shard(7, 0), 0);
        assert_eq!(queue_for_shard(7, 1), 0);
        assert_eq!(queue_for_shard(7, 4), 3);
        assert_eq!(queue_for_shard(15, 16), 15);
        assert_eq!(queue_for_shard(15, 32), 15);
        assert_eq!(queue_for_shard(255, usize::MAX), 255);
        // every queue of K gets shards when K <= SHARDS
        for k in 1..=usize::from(SHARDS) {
            let mut used = vec![false; k];
            for s in 0..SHARDS {
                used[queue_for_shard(s, k)] = true;
            }
            assert!(used.iter().all(|&u| u), "K = {k}");
        }
    }

    #[test]
    fn directed_broadcast() {
        let nets = [(Ipv4Addr::new(10, 2, 0, 1), 24), (Ipv4Addr::new(198, 18, 0, 0), 15)];
        assert!(is_directed_broadcast(Ipv4Addr::new(10, 2, 0, 255), &nets));
        assert!(is_directed_broadcast(Ipv4Addr::new(198, 19, 255, 255), &nets));
        assert!(!is_directed_broadcast(Ipv4Addr::new(198, 18, 255, 255), &nets));
        assert!(!is_directed_broadcast(Ipv4Addr::new(10, 2, 0, 254), &nets));
        assert!(!is_directed_broadcast(Ipv4Addr::new(10, 2, 1, 255), &nets));
        assert!(!is_directed_broadcast(Ipv4Addr::new(10, 2, 0, 255), &[]));
        let p31 = [(Ipv4Addr::new(10, 0, 0, 0), 31)];
        assert!(!is_directed_broadcast(Ipv4Addr::new(10, 0, 0, 1), &p31));
        let p32 = [(Ipv4Addr::new(10, 0, 0, 1), 32)];
        assert!(!is_directed_broadcast(Ipv4Addr::new(10, 0, 0, 1), &p32));
        let p30 = [(Ipv4Addr::new(10, 0, 0, 1), 30)];
        assert!(is_directed_broadcast(Ipv4Addr::new(10, 0, 0, 3), &p30));
        let p0 = [(Ipv4Addr::new(10, 0, 0, 1), 0)];
        assert!(is_directed_broadcast(Ipv4Addr::BROADCAST, &p0));
        let bad = [(Ipv4Addr::new(10, 0, 0, 1), 200)];
        assert!(!is_directed_broadcast(Ipv4Addr::new(10, 0, 0, 1), &bad));
    }

    /// The raw-offset parsers this module had before the packet views (as of 3c4508b),
    /// kept as an oracle: the views must classify, hash and spot MLD exactly as they did.
    mod before_views {
        use crate::util::Fnv1a32;

        fn array_at<const N: usize>(p: &[u8], at: usize) -> Option<[u8; N]> {
            p.get(at..at.checked_add(N)?)?.try_into().ok()
        }

        fn has_ports(proto: u8) -> bool {
            matches!(proto, 6 | 17 | 132 | 136)
        }

        /// (protocol, offset) as the old walk found them.
        pub fn ipv6_upper(packet: &[u8]) -> (u8, Option<usize>) {
            let mut next = packet.get(6).copied().unwrap_or(0);
            let mut at = 40;
            let mut followed = 0;
            loop {
                match next {
                    0 | 43 | 60 => {
                        if followed == 8 {
                            return (next, None);
                        }
                        followed += 1;
                        let Some([nh, len]) = array_at::<2>(packet, at) else {
                            return (next, None);
                        };
                        next = nh;
                        at += (usize::from(len) + 1) * 8;
                    }
                    44 => return (packet.get(at).copied().unwrap_or(44), None),
                    p => return (p, Some(at)),
                }
            }
        }

        pub fn flow_hash(packet: &[u8]) -> u32 {
            let Some(&first) = packet.first() else {
                return 0;
            };
            let mut h = Fnv1a32::new();
            match first >> 4 {
                4 => {
                    let (Some(src), Some(dst)) = (array_at::<4>(packet, 12), array_at::<4>(packet, 16)) else {
                        return 0;
                    };
                    let proto = packet.get(9).copied().unwrap_or(0);
                    let frag = array_at::<2>(packet, 6).map_or(0, u16::from_be_bytes);
                    let ihl = usize::from(first & 0x0f) * 4;
                    let ports = if has_ports(proto) && frag & 0x3fff == 0 && ihl >= 20 { array_at::<4>(packet, ihl) } else { None };
                    h.write(&src);
                    h.write(&dst);
                    h.write(&[proto]);
                    h.write(&ports.unwrap_or([0; 4]));
                }
                6 => {
                    let (Some(src), Some(dst)) = (array_at::<16>(packet, 8), array_at::<16>(packet, 24)) else {
                        return 0;
                    };
                    let (proto, at) = ipv6_upper(packet);
                    let ports = if has_ports(proto) { at.and_then(|at| array_at::<4>(packet, at)) } else { None };
                    h.write(&src);
                    h.write(&dst);
                    h.write(&[proto]);
                    h.write(&ports.unwrap_or([0; 4]));
                }
                _ => return 0,
            }
            h.finish()
        }

        pub fn is_mld(packet: &[u8]) -> bool {
            if packet.len() < 40 || packet[0] >> 4 != 6 {
                return false;
            }
            let (proto, at) = ipv6_upper(packet);
            proto == 58 && matches!(at.and_then(|at| packet.get(at)), Some(130..=132 | 143))
        }
    }

    /// The views against the old parsers: equal, except where the views need a whole
    /// header the old code did not (an ICMPv6 message under 8 bytes is no MLD message; a
    /// source address needs the whole fixed IP header, as classification always did).
    fn same_as_before(p: &[u8]) -> Result<(), TestCaseError> {
        prop_assert_eq!(flow_hash(p), before_views::flow_hash(p));
        let (new, old) = (is_mld(p), before_views::is_mld(p));
        if new != old {
            let at = before_views::ipv6_upper(p).1.unwrap_or(0);
            prop_assert!(old && p.len() < at + 8, "is_mld {new} (before: {old}) on {p:?}");
        }
        match classify(p) {
            Ok(c) => {
                prop_assert_eq!(Some(c.src), source(p));
                prop_assert_eq!(c.shard, shard(before_views::flow_hash(p)));
            }
            Err(_) => prop_assert_eq!(source(p), None),
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn prop_views_hash_and_spot_mld_as_before(p in proptest::collection::vec(any::<u8>(), 0..128)) {
            same_as_before(&p)?;
        }

        #[test]
        fn prop_views_as_before_on_ip_like_bytes(
            v in prop_oneof![Just(0x40u8), Just(0x60u8)],
            low in 0u8..16,
            next in prop_oneof![Just(0u8), Just(43), Just(44), Just(58), Just(60), Just(6), Just(17), any::<u8>()],
            mld in prop_oneof![Just(130u8), Just(143), any::<u8>()],
            frag in prop_oneof![Just(0u16), Just(0x4000), any::<u16>()],
            rest in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let mut p = vec![v | low];
            p.extend_from_slice(&rest);
            if p.len() > 9 {
                p[6] = next;
                p[7] = (frag & 0xff) as u8;
                p[9] = next;
            }
            // an extension chain ending in ICMPv6 at 40 or 48
            for at in [40, 48] {
                if let Some(b) = p.get_mut(at) {
                    *b = if at == 40 && next == 0 { 58 } else { mld };
                }
            }
            if let Some(b) = p.get_mut(41) {
                *b = 0;
            }
            same_as_before(&p)?;
        }

        #[test]
        fn prop_classify_never_panics(p in proptest::collection::vec(any::<u8>(), 0..128)) {
            let h = flow_hash(&p);
            match classify(&p) {
                Ok(c) => {
                    prop_assert!(c.shard < SHARDS);
                    prop_assert_eq!(c.shard, shard(h));
                    prop_assert_eq!(source(&p), Some(c.src));
                }
                Err(ClassifyError::Empty) => prop_assert!(p.is_empty()),
                Err(ClassifyError::NotIp) => prop_assert!(!matches!(p[0] >> 4, 4 | 6)),
                Err(ClassifyError::Truncated) => prop_assert!(p.len() < 40),
            }
        }

        #[test]
        fn prop_ip_like_never_panics(
            v in prop_oneof![Just(0x40u8), Just(0x60u8)],
            low in 0u8..16,
            next in prop_oneof![Just(0u8), Just(43), Just(44), Just(60), Just(6), Just(17), any::<u8>()],
            rest in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let mut p = vec![v | low];
            p.extend_from_slice(&rest);
            if p.len() > 6 { p[6] = next; }
            if p.len() > 9 { p[9] = next; }
            let _ = flow_hash(&p);
            let _ = classify(&p);
        }

        #[test]
        fn prop_directed_broadcast_never_panics(dst in any::<u32>(), net in any::<u32>(), prefix in any::<u8>()) {
            let r = is_directed_broadcast(Ipv4Addr::from(dst), &[(Ipv4Addr::from(net), prefix)]);
            if prefix >= 31 { prop_assert!(!r); }
        }
    }
}
