//! Where a packet from the bus goes inside a userspace port: to the endpoint owning its
//! destination, to every endpoint (a group address), or nowhere (refused, counted). Pure:
//! reads a few header fields, every offset checked. On the worker's thread, once per
//! packet written into the port (hot path).
//!
//! What is refused, and why:
//! - IPv4 fragments and IPv6 packets whose first extension header is a Fragment header:
//!   the stacks are built without reassembly (decision 0022); senders on the bus keep to
//!   the MTU, and a partial datagram must not be parsed as a whole one.
//! - ICMPv4 echo requests to a broadcast or multicast address: Linux hosts ignore them
//!   (`icmp_echo_ignore_broadcasts`, on by default), and ten thousand endpoints answering
//!   one would be a storm. IPv6 echo to `ff02::1` is answered, as Linux does.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The destination class of a packet from the bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inbound {
    /// To one address: the endpoint that owns it, if any.
    Unicast(IpAddr),
    /// To a broadcast or multicast address: every endpoint but the sender's own.
    Group { src: IpAddr },
    /// Dropped before any stack sees it.
    Refused(Refusal),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    NotIp,
    Fragment,
    EchoToGroup,
}

const ICMP: u8 = 1;
const IPV6_FRAGMENT: u8 = 44;
const ICMP_ECHO_REQUEST: u8 = 8;

/// Classifies `packet` (an IP packet, no virtio header).
pub fn inbound(packet: &[u8]) -> Inbound {
    match packet.first().map(|b| b >> 4) {
        Some(4) if packet.len() >= 20 => {
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            if ihl < 20 {
                return Inbound::Refused(Refusal::NotIp);
            }
            let more = packet[6] & 0x20 != 0;
            let offset = u16::from_be_bytes([packet[6] & 0x1f, packet[7]]);
            if more || offset != 0 {
                return Inbound::Refused(Refusal::Fragment);
            }
            let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
            let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
            if dst.is_multicast() || dst.is_broadcast() {
                if packet[9] == ICMP && packet.get(ihl) == Some(&ICMP_ECHO_REQUEST) {
                    return Inbound::Refused(Refusal::EchoToGroup);
                }
                return Inbound::Group { src: IpAddr::V4(src) };
            }
            Inbound::Unicast(IpAddr::V4(dst))
        }
        Some(6) if packet.len() >= 40 => {
            if packet[6] == IPV6_FRAGMENT {
                return Inbound::Refused(Refusal::Fragment);
            }
            let addr = |at: usize| {
                let mut o = [0u8; 16];
                o.copy_from_slice(&packet[at..at + 16]);
                Ipv6Addr::from(o)
            };
            let dst = addr(24);
            if dst.is_multicast() {
                return Inbound::Group { src: IpAddr::V6(addr(8)) };
            }
            Inbound::Unicast(IpAddr::V6(dst))
        }
        _ => Inbound::Refused(Refusal::NotIp),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v4(src: [u8; 4], dst: [u8; 4], proto: u8, frag: [u8; 2], l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 0, 0, 0, frag[0], frag[1], 64, proto, 0, 0];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(l4);
        p
    }

    fn v6(src: &str, dst: &str, next: u8) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0, 0, 8, next, 64];
        p.extend_from_slice(&src.parse::<Ipv6Addr>().unwrap().octets());
        p.extend_from_slice(&dst.parse::<Ipv6Addr>().unwrap().octets());
        p.extend_from_slice(&[0; 8]);
        p
    }

    #[test]
    fn unicast_group_and_refusals() {
        let (a, b) = ([198, 18, 0, 1], [198, 18, 0, 2]);
        assert_eq!(inbound(&v4(a, b, 6, [0x40, 0], &[0; 20])), Inbound::Unicast("198.18.0.2".parse().unwrap()));
        assert_eq!(inbound(&v4(a, b, 1, [0x20, 0], &[8])), Inbound::Refused(Refusal::Fragment));
        assert_eq!(inbound(&v4(a, b, 1, [0, 1], &[8])), Inbound::Refused(Refusal::Fragment));
        assert_eq!(inbound(&v4(a, [255; 4], 1, [0, 0], &[8, 0])), Inbound::Refused(Refusal::EchoToGroup));
        assert_eq!(inbound(&v4(a, [224, 0, 0, 1], 1, [0, 0], &[8, 0])), Inbound::Refused(Refusal::EchoToGroup));
        assert_eq!(inbound(&v4(a, [224, 0, 0, 251], 17, [0, 0], &[0; 8])), Inbound::Group { src: IpAddr::V4(a.into()) });
        assert_eq!(inbound(&v4(a, [255; 4], 1, [0, 0], &[0, 0])), Inbound::Group { src: IpAddr::V4(a.into()) }, "an echo reply is not a request");
        assert_eq!(inbound(&v6("fe80::1", "fe80::2", 58)), Inbound::Unicast("fe80::2".parse().unwrap()));
        assert_eq!(inbound(&v6("fe80::1", "ff02::1", 58)), Inbound::Group { src: "fe80::1".parse().unwrap() });
        assert_eq!(inbound(&v6("fd00::1", "fd00::2", 44)), Inbound::Refused(Refusal::Fragment));
        assert_eq!(inbound(&[]), Inbound::Refused(Refusal::NotIp));
        assert_eq!(inbound(&[0x45; 19]), Inbound::Refused(Refusal::NotIp));
        assert_eq!(inbound(&[0x60; 39]), Inbound::Refused(Refusal::NotIp));
        assert_eq!(inbound(&[0x41; 20]), Inbound::Refused(Refusal::NotIp));
    }

    proptest! {
        #[test]
        fn never_panics(p in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = inbound(&p);
        }
    }
}
