//! Either IP version behind one view ([`IpPacket`], chosen by the version nibble), the IP
//! protocol numbers tunbus reads, and the port pair of the transports that have one.
//!
//! Pure. Used per packet by classification and the flow hash (hot path).

use std::net::IpAddr;

use super::ipv4::Ipv4Packet;
use super::ipv6::Ipv6Packet;
use super::{checksum, Ecn, Error};

/// IP protocol numbers (IANA), as IPv4's protocol and IPv6's next header carry them.
pub mod protocol {
    /// IPv6 hop-by-hop options.
    pub const HOPOPT: u8 = 0;
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    /// IPv6 routing header.
    pub const IPV6_ROUTE: u8 = 43;
    /// IPv6 fragment header.
    pub const IPV6_FRAG: u8 = 44;
    pub const ICMPV6: u8 = 58;
    /// IPv6 "no next header".
    pub const IPV6_NONXT: u8 = 59;
    /// IPv6 destination options.
    pub const IPV6_OPTS: u8 = 60;
    pub const SCTP: u8 = 132;
    pub const UDPLITE: u8 = 136;
}

/// Whether the transport `protocol` starts with a source and a destination port (TCP,
/// UDP, SCTP, UDP-Lite).
#[inline]
pub fn has_ports(protocol: u8) -> bool {
    matches!(protocol, protocol::TCP | protocol::UDP | protocol::SCTP | protocol::UDPLITE)
}

/// The first four bytes of a transport header that [`has_ports`]: source and destination
/// port as they stand, present as soon as those four bytes are (the rest of the header
/// may be cut off).
#[inline]
pub fn ports(transport: &[u8]) -> Option<[u8; 4]> {
    transport.first_chunk::<4>().copied()
}

/// An IPv4 or IPv6 packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpPacket<T> {
    V4(Ipv4Packet<T>),
    V6(Ipv6Packet<T>),
}

impl<T: AsRef<[u8]>> IpPacket<T> {
    /// A view of `buffer` by its version nibble: the fixed header of that version must be
    /// there. An empty buffer is [`Error::Truncated`], another version [`Error::Version`].
    #[inline]
    pub fn new_checked(buffer: T) -> Result<IpPacket<T>, Error> {
        match buffer.as_ref().first().map(|b| b >> 4) {
            None => Err(Error::Truncated),
            Some(4) => Ipv4Packet::new_checked(buffer).map(IpPacket::V4),
            Some(6) => Ipv6Packet::new_checked(buffer).map(IpPacket::V6),
            Some(_) => Err(Error::Version),
        }
    }

    /// Whether the length fields agree with the buffer (see each version's `check_len`).
    #[inline]
    pub fn check_len(&self) -> Result<(), Error> {
        match self {
            IpPacket::V4(p) => p.check_len(),
            IpPacket::V6(p) => p.check_len(),
        }
    }

    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            IpPacket::V4(p) => p.as_bytes(),
            IpPacket::V6(p) => p.as_bytes(),
        }
    }

    #[inline]
    pub fn src_addr(&self) -> IpAddr {
        match self {
            IpPacket::V4(p) => IpAddr::V4(p.src_addr()),
            IpPacket::V6(p) => IpAddr::V6(p.src_addr()),
        }
    }

    #[inline]
    pub fn dst_addr(&self) -> IpAddr {
        match self {
            IpPacket::V4(p) => IpAddr::V4(p.dst_addr()),
            IpPacket::V6(p) => IpAddr::V6(p.dst_addr()),
        }
    }

    #[inline]
    pub fn ecn(&self) -> Ecn {
        match self {
            IpPacket::V4(p) => p.ecn(),
            IpPacket::V6(p) => p.ecn(),
        }
    }

    /// The pseudo-header sum of a transport segment of `len` bytes with `protocol`.
    #[inline]
    pub fn pseudo_header(&self, protocol: u8, len: u16) -> checksum::Sum {
        match self {
            IpPacket::V4(p) => checksum::pseudo_v4(p.src_addr(), p.dst_addr(), protocol, len),
            IpPacket::V6(p) => p.pseudo_header(protocol, u32::from(len)),
        }
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> IpPacket<T> {
    /// Marks congestion (see each version's `mark_ce`): `false` for a packet that is not
    /// ECN-capable, which is left alone.
    #[inline]
    pub fn mark_ce(&mut self) -> bool {
        match self {
            IpPacket::V4(p) => p.mark_ce(),
            IpPacket::V6(p) => p.mark_ce(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn by_version() {
        assert_eq!(IpPacket::new_checked(&[][..]), Err(Error::Truncated));
        assert_eq!(IpPacket::new_checked(&[0x45; 10][..]), Err(Error::Truncated));
        assert_eq!(IpPacket::new_checked(&[0x60; 39][..]), Err(Error::Truncated));
        assert_eq!(IpPacket::new_checked(&[0x00; 64][..]), Err(Error::Version));
        assert!(matches!(IpPacket::new_checked(&[0x45; 20][..]), Ok(IpPacket::V4(_))));
        assert!(matches!(IpPacket::new_checked(&[0x60; 40][..]), Ok(IpPacket::V6(_))));
        assert!(has_ports(6) && has_ports(17) && has_ports(132) && has_ports(136));
        assert!(!has_ports(1) && !has_ports(58) && !has_ports(47));
        assert_eq!(ports(&[1, 2, 3]), None);
        assert_eq!(ports(&[1, 2, 3, 4, 5]), Some([1, 2, 3, 4]));
    }

    proptest! {
        #[test]
        fn prop_any_bytes_never_panic(p in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(mut ip) = IpPacket::new_checked(p.clone()) {
                let _ = (ip.src_addr(), ip.dst_addr(), ip.ecn(), ip.check_len(), ip.pseudo_header(17, 8));
                let capable = ip.ecn().is_capable();
                prop_assert_eq!(ip.mark_ce(), capable);
                prop_assert_eq!(ip.as_bytes().len(), p.len());
            }
        }
    }
}
