//! Echo requests an endpoint sends (`UserspacePort::ping`: the lab's reachability checks,
//! the tests) and the replies that answer them. Pure: builds and parses ICMP/ICMPv6 echo
//! packets with their checksums, no clock (the send time travels in the payload, written
//! and read by the caller). Answering echo requests is the stack's job
//! (`auto-icmp-echo-reply`); this module only originates. On the worker's thread, per ping.

use std::net::IpAddr;

const ICMP: u8 = 1;
const ICMPV6: u8 = 58;
const V4_ECHO_REQUEST: u8 = 8;
const V4_ECHO_REPLY: u8 = 0;
const V6_ECHO_REQUEST: u8 = 128;
const V6_ECHO_REPLY: u8 = 129;

/// An echo message, either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Echo<'a> {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub ident: u16,
    pub seq: u16,
    pub data: &'a [u8],
}

/// The ones' complement sum of several byte runs, each of even length except the last.
fn sum(parts: &[&[u8]]) -> u16 {
    let mut acc: u64 = 0;
    for part in parts {
        let mut words = part.chunks_exact(2);
        for w in &mut words {
            acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
        }
        if let [last] = words.remainder() {
            acc += u64::from(*last) << 8;
        }
    }
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The length of the echo request `e` as a packet.
pub fn request_len(e: &Echo<'_>) -> usize {
    (if e.src.is_ipv4() { 20 } else { 40 }) + 8 + e.data.len()
}

/// Writes the echo request `e` into `out`; returns its length, or `None` when the
/// addresses are of two families or `out` is too short.
pub fn write_request(out: &mut [u8], e: &Echo<'_>) -> Option<usize> {
    let len = request_len(e);
    let out = out.get_mut(..len)?;
    let icmp_len = 8 + e.data.len();
    let l4 = match (e.src, e.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out[..12].copy_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, ICMP, 0, 0]);
            out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            out[12..16].copy_from_slice(&s.octets());
            out[16..20].copy_from_slice(&d.octets());
            let c = !sum(&[&out[..20]]);
            out[10..12].copy_from_slice(&c.to_be_bytes());
            out[20] = V4_ECHO_REQUEST;
            20
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            out[..8].copy_from_slice(&[0x60, 0, 0, 0, 0, 0, ICMPV6, 64]);
            out[4..6].copy_from_slice(&(icmp_len as u16).to_be_bytes());
            out[8..24].copy_from_slice(&s.octets());
            out[24..40].copy_from_slice(&d.octets());
            out[40] = V6_ECHO_REQUEST;
            40
        }
        _ => return None,
    };
    out[l4 + 1] = 0;
    out[l4 + 2..l4 + 4].fill(0);
    out[l4 + 4..l4 + 6].copy_from_slice(&e.ident.to_be_bytes());
    out[l4 + 6..l4 + 8].copy_from_slice(&e.seq.to_be_bytes());
    out[l4 + 8..].copy_from_slice(e.data);
    let c = !icmp_sum(&out[..l4], &out[l4..]);
    out[l4 + 2..l4 + 4].copy_from_slice(&c.to_be_bytes());
    Some(len)
}

/// The checksum sum of an ICMP message (`icmp`) behind the IP header `ip`: plain for
/// IPv4, with the pseudo-header (addresses from the 40-byte header) for IPv6.
fn icmp_sum(ip: &[u8], icmp: &[u8]) -> u16 {
    match ip.get(8..40) {
        Some(addrs) if ip[0] >> 4 == 6 => {
            let len = (icmp.len() as u32).to_be_bytes();
            sum(&[addrs, &len, &[0, 0, 0, ICMPV6], icmp])
        }
        _ => sum(&[icmp]),
    }
}

/// The echo reply in `packet`, if it is one with a valid checksum.
pub fn parse_reply(packet: &[u8]) -> Option<Echo<'_>> {
    let (src, dst, l4, reply_type) = match packet.first()? >> 4 {
        4 => {
            let ihl = usize::from(packet.first()? & 0x0f) * 4;
            if ihl < 20 || packet.len() < ihl + 8 || packet[9] != ICMP {
                return None;
            }
            let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
            if total != packet.len() {
                return None;
            }
            let a = |at: usize| IpAddr::from([packet[at], packet[at + 1], packet[at + 2], packet[at + 3]]);
            (a(12), a(16), ihl, V4_ECHO_REPLY)
        }
        6 => {
            if packet.len() < 48 || packet[6] != ICMPV6 {
                return None;
            }
            if usize::from(u16::from_be_bytes([packet[4], packet[5]])) + 40 != packet.len() {
                return None;
            }
            let a = |at: usize| {
                let mut o = [0u8; 16];
                o.copy_from_slice(&packet[at..at + 16]);
                IpAddr::from(o)
            };
            (a(8), a(24), 40, V6_ECHO_REPLY)
        }
        _ => return None,
    };
    let icmp = &packet[l4..];
    if icmp[0] != reply_type || icmp[1] != 0 || icmp_sum(&packet[..l4], icmp) != 0xffff {
        return None;
    }
    Some(Echo { src, dst, ident: u16::from_be_bytes([icmp[4], icmp[5]]), seq: u16::from_be_bytes([icmp[6], icmp[7]]), data: &icmp[8..] })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Turns a request into the reply a host would send (swap, type, checksum).
    fn answer(req: &[u8]) -> Vec<u8> {
        let mut p = req.to_vec();
        let (l4, t) = if p[0] >> 4 == 4 {
            let (s, d) = (p[12..16].to_vec(), p[16..20].to_vec());
            p[12..16].copy_from_slice(&d);
            p[16..20].copy_from_slice(&s);
            (20, V4_ECHO_REPLY)
        } else {
            let (s, d) = (p[8..24].to_vec(), p[24..40].to_vec());
            p[8..24].copy_from_slice(&d);
            p[24..40].copy_from_slice(&s);
            (40, V6_ECHO_REPLY)
        };
        p[l4] = t;
        p[l4 + 2..l4 + 4].fill(0);
        let c = !icmp_sum(&p[..l4], &p[l4..]);
        p[l4 + 2..l4 + 4].copy_from_slice(&c.to_be_bytes());
        p
    }

    #[test]
    fn requests_are_valid_packets_and_replies_parse() {
        for (src, dst) in [("198.18.0.1", "198.18.0.2"), ("fd00::1", "fd00::2"), ("fe80::1", "ff02::1")] {
            let e = Echo { src: src.parse().unwrap(), dst: dst.parse().unwrap(), ident: 0x1234, seq: 7, data: b"0123456789abcdef" };
            let mut buf = [0u8; 100];
            let n = write_request(&mut buf, &e).unwrap();
            assert_eq!(n, request_len(&e));
            assert!(parse_reply(&buf[..n]).is_none(), "a request is not a reply");
            let r = answer(&buf[..n]);
            let got = parse_reply(&r).unwrap();
            assert_eq!((got.src, got.dst, got.ident, got.seq, got.data), (e.dst, e.src, 0x1234, 7, &b"0123456789abcdef"[..]));
            let mut bad = r.clone();
            *bad.last_mut().unwrap() ^= 1;
            assert!(parse_reply(&bad).is_none(), "checksum checked");
            assert!(parse_reply(&r[..r.len() - 1]).is_none(), "length checked");
        }
        let mixed = Echo { src: "198.18.0.1".parse().unwrap(), dst: "fd00::2".parse().unwrap(), ident: 0, seq: 0, data: &[] };
        assert_eq!(write_request(&mut [0u8; 100], &mixed), None);
        let e = Echo { src: "198.18.0.1".parse().unwrap(), dst: "198.18.0.2".parse().unwrap(), ident: 0, seq: 0, data: &[0; 64] };
        assert_eq!(write_request(&mut [0u8; 80], &e), None, "too short");
    }

    /// The IPv4 header checksum a request carries verifies.
    #[test]
    fn ipv4_header_checksum() {
        let e = Echo { src: "198.18.0.1".parse().unwrap(), dst: "198.18.0.2".parse().unwrap(), ident: 1, seq: 1, data: b"x" };
        let mut buf = [0u8; 64];
        let n = write_request(&mut buf, &e).unwrap();
        assert_eq!(sum(&[&buf[..20]]), 0xffff);
        assert_eq!(n, 29);
    }

    proptest! {
        #[test]
        fn parse_never_panics(p in proptest::collection::vec(any::<u8>(), 0..120)) {
            let _ = parse_reply(&p);
        }
    }
}
