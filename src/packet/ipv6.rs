//! The IPv6 header (RFC 8200; traffic class with DSCP and ECN, RFC 2474 and RFC 3168) as a
//! view over a byte buffer, and the one walk over its extension-header chain
//! ([`Ipv6Packet::upper_layer`]) that classification, the flow hash and the MLD check use.
//!
//! Pure. Read for every IPv6 packet on the queue workers (hot path); ECN marking writes the
//! traffic class (IPv6 has no header checksum, and the pseudo-header does not cover it).

use std::net::Ipv6Addr;

use super::ip::protocol;
use super::{checksum, get_array, get_u16, get_u32, set_u16, Ecn, Error};

mod field {
    pub const VER_TC_FLOW: usize = 0;
    pub const PAYLOAD_LEN: usize = 4;
    pub const NEXT_HEADER: usize = 6;
    pub const HOP_LIMIT: usize = 7;
    pub const SRC: usize = 8;
    pub const DST: usize = 24;
    /// In an extension header: next header, then its length in 8-byte units past the first
    /// eight.
    pub const EXT_NEXT: usize = 0;
    pub const EXT_LEN: usize = 1;
}

/// Length of the fixed header.
pub const HEADER_LEN: usize = 40;

/// Most hop-by-hop, routing and destination-options headers the walk follows before it
/// gives up.
pub const MAX_EXT_HEADERS: usize = 8;

/// Where the upper-layer header of an IPv6 packet is, as [`Ipv6Packet::upper_layer`] finds
/// it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpperLayer {
    /// The upper-layer protocol; behind a fragment header, the fragment header's next
    /// header (44 when that is cut off); when the walk gave up, the extension header it
    /// stopped at.
    pub protocol: u8,
    /// Its offset from the start of the packet; `None` behind a fragment header (the
    /// fragments of a datagram, first or not, stay together) or when the walk gave up.
    pub offset: Option<usize>,
}

/// An IPv6 header at the start of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Packet<T> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Ipv6Packet<T> {
    /// A view of `buffer`: version 6 and at least the fixed 40 bytes.
    #[inline]
    pub fn new_checked(buffer: T) -> Result<Ipv6Packet<T>, Error> {
        let b = buffer.as_ref();
        match b.first() {
            None => Err(Error::Truncated),
            Some(v) if v >> 4 != 6 => Err(Error::Version),
            Some(_) if b.len() < HEADER_LEN => Err(Error::Truncated),
            Some(_) => Ok(Ipv6Packet { buffer }),
        }
    }

    /// Whether the payload length agrees with the buffer (a jumbogram's 0 does not).
    #[inline]
    pub fn check_len(&self) -> Result<(), Error> {
        if usize::from(self.payload_len()) + HEADER_LEN != self.as_bytes().len() {
            return Err(Error::Length);
        }
        Ok(())
    }

    /// The whole buffer.
    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    #[inline]
    pub fn into_inner(self) -> T {
        self.buffer
    }

    #[inline]
    pub fn traffic_class(&self) -> u8 {
        (get_u16(self.as_bytes(), field::VER_TC_FLOW) >> 4) as u8
    }

    #[inline]
    pub fn dscp(&self) -> u8 {
        self.traffic_class() >> 2
    }

    #[inline]
    pub fn ecn(&self) -> Ecn {
        Ecn::from_bits(self.traffic_class())
    }

    #[inline]
    pub fn flow_label(&self) -> u32 {
        get_u32(self.as_bytes(), field::VER_TC_FLOW) & 0x000f_ffff
    }

    #[inline]
    pub fn payload_len(&self) -> u16 {
        get_u16(self.as_bytes(), field::PAYLOAD_LEN)
    }

    /// The protocol of the header after the fixed one (`ip::protocol`).
    #[inline]
    pub fn next_header(&self) -> u8 {
        self.as_bytes()[field::NEXT_HEADER]
    }

    #[inline]
    pub fn hop_limit(&self) -> u8 {
        self.as_bytes()[field::HOP_LIMIT]
    }

    #[inline]
    pub fn src_addr(&self) -> Ipv6Addr {
        Ipv6Addr::from(get_array::<16>(self.as_bytes(), field::SRC))
    }

    #[inline]
    pub fn dst_addr(&self) -> Ipv6Addr {
        Ipv6Addr::from(get_array::<16>(self.as_bytes(), field::DST))
    }

    /// The bytes after the fixed header to the end of the buffer (extension headers
    /// included; the payload length is not applied, see [`Ipv6Packet::check_len`]).
    #[inline]
    pub fn payload(&self) -> &[u8] {
        self.as_bytes().get(HEADER_LEN..).unwrap_or_default()
    }

    /// The one walk over the extension-header chain: up to [`MAX_EXT_HEADERS`]
    /// hop-by-hop, routing and destination-options headers, stopping at a fragment header.
    /// Never reads past the buffer.
    pub fn upper_layer(&self) -> UpperLayer {
        let b = self.as_bytes();
        let mut next = self.next_header();
        let mut at = HEADER_LEN;
        let mut followed = 0;
        loop {
            match next {
                protocol::HOPOPT | protocol::IPV6_ROUTE | protocol::IPV6_OPTS => {
                    if followed == MAX_EXT_HEADERS {
                        return UpperLayer { protocol: next, offset: None };
                    }
                    followed += 1;
                    let (Some(&nh), Some(&len)) = (b.get(at + field::EXT_NEXT), b.get(at + field::EXT_LEN)) else {
                        return UpperLayer { protocol: next, offset: None };
                    };
                    next = nh;
                    // (hdr ext len + 1) * 8 bytes; at most 8 * 2048 past 40: no overflow
                    at += (usize::from(len) + 1) * 8;
                }
                protocol::IPV6_FRAG => {
                    let protocol = b.get(at + field::EXT_NEXT).copied().unwrap_or(protocol::IPV6_FRAG);
                    return UpperLayer { protocol, offset: None };
                }
                p => return UpperLayer { protocol: p, offset: Some(at) },
            }
        }
    }

    /// The pseudo-header sum of an upper-layer packet of `len` bytes with protocol
    /// `next_header` (after any extension headers).
    #[inline]
    pub fn pseudo_header(&self, next_header: u8, len: u32) -> checksum::Sum {
        checksum::pseudo_v6(self.src_addr(), self.dst_addr(), next_header, len)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv6Packet<T> {
    #[inline]
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.buffer.as_mut()
    }

    /// The bytes after the fixed header (see [`Ipv6Packet::payload`]).
    #[inline]
    pub fn payload_mut(&mut self) -> &mut [u8] {
        self.bytes_mut().get_mut(HEADER_LEN..).unwrap_or_default()
    }

    #[inline]
    pub fn set_payload_len(&mut self, len: u16) {
        set_u16(self.bytes_mut(), field::PAYLOAD_LEN, len);
    }

    #[inline]
    pub fn set_hop_limit(&mut self, hops: u8) {
        self.bytes_mut()[field::HOP_LIMIT] = hops;
    }

    #[inline]
    pub fn set_src_addr(&mut self, addr: Ipv6Addr) {
        self.bytes_mut()[field::SRC..field::SRC + 16].copy_from_slice(&addr.octets());
    }

    #[inline]
    pub fn set_dst_addr(&mut self, addr: Ipv6Addr) {
        self.bytes_mut()[field::DST..field::DST + 16].copy_from_slice(&addr.octets());
    }

    #[inline]
    pub fn set_traffic_class(&mut self, tc: u8) {
        let b = self.bytes_mut();
        b[0] = b[0] & 0xf0 | tc >> 4;
        b[1] = b[1] & 0x0f | tc << 4;
    }

    /// Sets the ECN codepoint (no header checksum to keep).
    #[inline]
    pub fn set_ecn(&mut self, ecn: Ecn) {
        let tc = self.traffic_class() & !3 | ecn.bits();
        self.set_traffic_class(tc);
    }

    /// Marks congestion as a router would (RFC 3168): an ECN-capable packet gets CE and
    /// `true`; a not-ECN-capable one is left alone and gets `false` (drop it instead).
    #[inline]
    pub fn mark_ce(&mut self) -> bool {
        if !self.ecn().is_capable() {
            return false;
        }
        self.set_ecn(Ecn::Ce);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(next: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x6b, 0x81, 0x23, 0x45];
        p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        p.extend_from_slice(&[next, 64]);
        p.extend_from_slice(&"fd00::1".parse::<Ipv6Addr>().unwrap().octets());
        p.extend_from_slice(&"fd00:7b::2".parse::<Ipv6Addr>().unwrap().octets());
        p.extend_from_slice(payload);
        p
    }

    fn ext(next: u8, len: u8) -> Vec<u8> {
        let mut v = vec![next, len];
        v.resize((usize::from(len) + 1) * 8, 0);
        v
    }

    #[test]
    fn fields_of_a_sample() {
        let p = sample(17, &[0; 8]);
        let v = Ipv6Packet::new_checked(&p[..]).unwrap();
        assert_eq!(v.traffic_class(), 0xb8);
        assert_eq!((v.dscp(), v.ecn()), (46, Ecn::NotEct));
        assert_eq!(v.flow_label(), 0x12345);
        assert_eq!((v.payload_len(), v.next_header(), v.hop_limit()), (8, 17, 64));
        assert_eq!(v.src_addr(), "fd00::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(v.dst_addr(), "fd00:7b::2".parse::<Ipv6Addr>().unwrap());
        assert_eq!(v.payload(), &[0; 8]);
        assert_eq!(v.check_len(), Ok(()));
        assert_eq!(v.upper_layer(), UpperLayer { protocol: 17, offset: Some(40) });
        assert_eq!(Ipv6Packet::new_checked(&p[..39]), Err(Error::Truncated));
        assert_eq!(Ipv6Packet::new_checked(&[0x45; 40][..]), Err(Error::Version));
        assert_eq!(Ipv6Packet::new_checked(&[][..]), Err(Error::Truncated));
        assert_eq!(Ipv6Packet::new_checked(&p[..44]).unwrap().check_len(), Err(Error::Length));
    }

    #[test]
    fn the_walk() {
        let walk = |next: u8, payload: &[u8]| Ipv6Packet::new_checked(sample(next, payload)).unwrap().upper_layer();
        let mut chain = ext(43, 0);
        chain.extend(ext(60, 2));
        chain.extend(ext(6, 1));
        assert_eq!(walk(0, &chain), UpperLayer { protocol: 6, offset: Some(40 + 8 + 24 + 16) });
        // fragment header, first or later fragment
        assert_eq!(walk(44, &[17, 0, 0, 1]), UpperLayer { protocol: 17, offset: None });
        assert_eq!(walk(44, &[]), UpperLayer { protocol: 44, offset: None });
        // cut inside an extension header: the header it stopped at
        assert_eq!(walk(0, &[17]), UpperLayer { protocol: 0, offset: None });
        // a length running past the end: the offset is past the end too
        assert_eq!(walk(0, &[17, 200]), UpperLayer { protocol: 17, offset: Some(40 + 201 * 8) });
        // the bound
        let chain = |n: usize| {
            let mut c = Vec::new();
            for _ in 0..n - 1 {
                c.extend(ext(60, 0));
            }
            c.extend(ext(17, 0));
            c
        };
        assert_eq!(walk(60, &chain(MAX_EXT_HEADERS)).protocol, 17);
        assert_eq!(walk(60, &chain(MAX_EXT_HEADERS + 1)), UpperLayer { protocol: 60, offset: None });
    }

    #[test]
    fn ecn_marking() {
        let mut p = sample(6, &[0; 20]);
        let mut v = Ipv6Packet::new_checked(&mut p[..]).unwrap();
        assert!(!v.mark_ce());
        v.set_ecn(Ecn::Ect1);
        assert!(v.mark_ce());
        assert_eq!((v.ecn(), v.dscp(), v.flow_label()), (Ecn::Ce, 46, 0x12345));
        assert_eq!(p[0] >> 4, 6);
    }

    proptest! {
        #[test]
        fn prop_any_bytes_never_panic(p in proptest::collection::vec(any::<u8>(), 0..200), next: u8) {
            let mut p = p;
            if p.len() > 6 {
                p[6] = [0, 43, 44, 60, next][usize::from(next % 5)];
            }
            if let Ok(v) = Ipv6Packet::new_checked(&p[..]) {
                let _ = (v.traffic_class(), v.dscp(), v.ecn(), v.flow_label(), v.payload_len(), v.next_header());
                let _ = (v.hop_limit(), v.src_addr(), v.dst_addr(), v.payload(), v.check_len(), v.pseudo_header(6, 9));
                let u = v.upper_layer();
                if let Some(at) = u.offset {
                    prop_assert!(at >= HEADER_LEN);
                }
            } else {
                prop_assert!(p.len() < 40 || p[0] >> 4 != 6);
            }
        }

        #[test]
        fn prop_setters_round_trip(
            mut p in proptest::collection::vec(any::<u8>(), 40..80),
            tc: u8, ecn in 0u8..4, hops: u8, len: u16, src: u128, dst: u128,
        ) {
            p[0] = 0x60 | (p[0] & 0x0f);
            let flow = Ipv6Packet::new_checked(&p[..]).unwrap().flow_label();
            let mut v = Ipv6Packet::new_checked(&mut p[..]).unwrap();
            v.set_traffic_class(tc);
            prop_assert_eq!(v.traffic_class(), tc);
            v.set_ecn(Ecn::from_bits(ecn));
            prop_assert_eq!(v.traffic_class(), tc & !3 | ecn);
            prop_assert_eq!(v.mark_ce(), ecn != 0);
            v.set_hop_limit(hops);
            v.set_payload_len(len);
            v.set_src_addr(Ipv6Addr::from(src));
            v.set_dst_addr(Ipv6Addr::from(dst));
            prop_assert_eq!((v.hop_limit(), v.payload_len(), v.flow_label()), (hops, len, flow));
            prop_assert_eq!((v.src_addr(), v.dst_addr()), (Ipv6Addr::from(src), Ipv6Addr::from(dst)));
            prop_assert_eq!(v.as_bytes()[0] >> 4, 6);
        }
    }
}
