//! ICMP for IPv4 (RFC 792) and IPv6 (RFC 4443) as views over a byte buffer: the eight
//! bytes every message starts with (type, code, checksum, four bytes whose meaning the
//! type gives: an echo's identifier and sequence number, a "packet too big" MTU), checked
//! once. ICMPv6's checksum covers the IPv6 pseudo-header, ICMPv4's does not. MLD (RFC 2710,
//! RFC 3810) is ICMPv6 types 130 to 132 and 143.
//!
//! Pure. The MLD check runs per IPv6 packet on the queue workers (hot path).

use super::{checksum, get_u16, get_u32, set_u16, Error};

mod field {
    pub const TYPE: usize = 0;
    pub const CODE: usize = 1;
    pub const CHECKSUM: usize = 2;
    /// The "rest of header": an echo's identifier, then its sequence number.
    pub const REST: usize = 4;
    pub const ECHO_IDENT: usize = 4;
    pub const ECHO_SEQ: usize = 6;
}

/// Length of the part every message has.
pub const HEADER_LEN: usize = 8;

/// ICMPv4 message types.
pub mod v4_type {
    pub const ECHO_REPLY: u8 = 0;
    pub const DEST_UNREACHABLE: u8 = 3;
    pub const ECHO_REQUEST: u8 = 8;
    pub const TIME_EXCEEDED: u8 = 11;
}

/// ICMPv6 message types.
pub mod v6_type {
    pub const DEST_UNREACHABLE: u8 = 1;
    pub const PACKET_TOO_BIG: u8 = 2;
    pub const TIME_EXCEEDED: u8 = 3;
    pub const PARAM_PROBLEM: u8 = 4;
    pub const ECHO_REQUEST: u8 = 128;
    pub const ECHO_REPLY: u8 = 129;
    pub const MLD_QUERY: u8 = 130;
    pub const MLD_REPORT: u8 = 131;
    pub const MLD_DONE: u8 = 132;
    pub const ROUTER_SOLICIT: u8 = 133;
    pub const ROUTER_ADVERT: u8 = 134;
    pub const NEIGHBOR_SOLICIT: u8 = 135;
    pub const NEIGHBOR_ADVERT: u8 = 136;
    pub const REDIRECT: u8 = 137;
    pub const MLDV2_REPORT: u8 = 143;
}

macro_rules! icmp_view {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub struct $name<T> {
            buffer: T,
        }

        impl<T: AsRef<[u8]>> $name<T> {
            /// A view of `buffer`: at least the eight bytes every message starts with.
            #[inline]
            pub fn new_checked(buffer: T) -> Result<$name<T>, Error> {
                if buffer.as_ref().len() < HEADER_LEN {
                    return Err(Error::Truncated);
                }
                Ok($name { buffer })
            }

            #[inline]
            pub fn as_bytes(&self) -> &[u8] {
                self.buffer.as_ref()
            }

            #[inline]
            pub fn into_inner(self) -> T {
                self.buffer
            }

            #[inline]
            pub fn msg_type(&self) -> u8 {
                self.as_bytes()[field::TYPE]
            }

            #[inline]
            pub fn code(&self) -> u8 {
                self.as_bytes()[field::CODE]
            }

            #[inline]
            pub fn checksum(&self) -> u16 {
                get_u16(self.as_bytes(), field::CHECKSUM)
            }

            /// The four bytes after the checksum, whose meaning the type gives.
            #[inline]
            pub fn rest_of_header(&self) -> u32 {
                get_u32(self.as_bytes(), field::REST)
            }

            /// An echo's identifier (bytes 4 and 5, whatever the type).
            #[inline]
            pub fn echo_ident(&self) -> u16 {
                get_u16(self.as_bytes(), field::ECHO_IDENT)
            }

            /// An echo's sequence number (bytes 6 and 7, whatever the type).
            #[inline]
            pub fn echo_seq(&self) -> u16 {
                get_u16(self.as_bytes(), field::ECHO_SEQ)
            }

            /// The bytes after the first eight.
            #[inline]
            pub fn payload(&self) -> &[u8] {
                self.as_bytes().get(HEADER_LEN..).unwrap_or_default()
            }
        }

        impl<T: AsRef<[u8]> + AsMut<[u8]>> $name<T> {
            #[inline]
            pub fn set_msg_type(&mut self, t: u8) {
                self.buffer.as_mut()[field::TYPE] = t;
            }

            #[inline]
            pub fn set_code(&mut self, code: u8) {
                self.buffer.as_mut()[field::CODE] = code;
            }

            #[inline]
            pub fn set_echo_ident(&mut self, ident: u16) {
                set_u16(self.buffer.as_mut(), field::ECHO_IDENT, ident);
            }

            #[inline]
            pub fn set_echo_seq(&mut self, seq: u16) {
                set_u16(self.buffer.as_mut(), field::ECHO_SEQ, seq);
            }

            #[inline]
            pub fn set_checksum(&mut self, check: u16) {
                set_u16(self.buffer.as_mut(), field::CHECKSUM, check);
            }
        }
    };
}

icmp_view! {
    /// An ICMPv4 message at the start of a buffer.
    Icmpv4Packet
}

icmp_view! {
    /// An ICMPv6 message at the start of a buffer.
    Icmpv6Packet
}

impl<T: AsRef<[u8]>> Icmpv4Packet<T> {
    /// Whether the checksum verifies over the whole buffer.
    #[inline]
    pub fn verify_checksum(&self) -> bool {
        checksum::verifies(self.as_bytes())
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Icmpv4Packet<T> {
    /// Computes the checksum afresh over the whole buffer.
    #[inline]
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let c = checksum::checksum(self.as_bytes());
        self.set_checksum(c);
    }
}

impl<T: AsRef<[u8]>> Icmpv6Packet<T> {
    /// Whether this is an MLD message (query, report, done, MLDv2 report).
    #[inline]
    pub fn is_mld(&self) -> bool {
        matches!(self.msg_type(), v6_type::MLD_QUERY | v6_type::MLD_REPORT | v6_type::MLD_DONE | v6_type::MLDV2_REPORT)
    }

    /// Whether the checksum verifies over the whole buffer behind `pseudo` (the IPv6
    /// pseudo-header with next header 58).
    #[inline]
    pub fn verify_checksum(&self, pseudo: checksum::Sum) -> bool {
        pseudo.add_bytes(self.as_bytes()).fold() == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Icmpv6Packet<T> {
    /// Computes the checksum afresh over the whole buffer behind `pseudo`.
    #[inline]
    pub fn fill_checksum(&mut self, pseudo: checksum::Sum) {
        self.set_checksum(0);
        let c = pseudo.add_bytes(self.as_bytes()).checksum();
        self.set_checksum(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::Ipv6Addr;

    #[test]
    fn an_echo_request() {
        // ping's first echo request, identifier 0x1c46, sequence 1, 8 bytes of payload.
        let mut m = vec![8, 0, 0, 0, 0x1c, 0x46, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8];
        let mut v = Icmpv4Packet::new_checked(&mut m[..]).unwrap();
        v.fill_checksum();
        assert!(v.verify_checksum());
        assert_eq!((v.msg_type(), v.code(), v.echo_ident(), v.echo_seq()), (v4_type::ECHO_REQUEST, 0, 0x1c46, 1));
        assert_eq!(v.rest_of_header(), 0x1c46_0001);
        assert_eq!(v.payload(), &[1, 2, 3, 4, 5, 6, 7, 8]);
        v.set_msg_type(v4_type::ECHO_REPLY);
        assert!(!v.verify_checksum());
        assert_eq!(Icmpv4Packet::new_checked(&m[..7]), Err(Error::Truncated));
    }

    #[test]
    fn mld_types() {
        let mut m = [0u8; 24];
        for t in 0..=255u8 {
            m[0] = t;
            let v = Icmpv6Packet::new_checked(&m[..]).unwrap();
            assert_eq!(v.is_mld(), matches!(t, 130..=132 | 143), "type {t}");
        }
        let pseudo = checksum::pseudo_v6(Ipv6Addr::LOCALHOST, "ff02::16".parse().unwrap(), 58, 24);
        let mut v = Icmpv6Packet::new_checked(&mut m[..]).unwrap();
        v.set_msg_type(v6_type::MLDV2_REPORT);
        v.fill_checksum(pseudo);
        assert!(v.verify_checksum(pseudo) && v.is_mld());
    }

    proptest! {
        #[test]
        fn prop_any_bytes_never_panic(m in proptest::collection::vec(any::<u8>(), 0..40)) {
            match (Icmpv4Packet::new_checked(&m[..]), Icmpv6Packet::new_checked(&m[..])) {
                (Ok(a), Ok(b)) => {
                    let _ = (a.msg_type(), a.code(), a.checksum(), a.rest_of_header(), a.echo_ident(), a.echo_seq(), a.payload(), a.verify_checksum());
                    let _ = (b.is_mld(), b.payload(), b.verify_checksum(checksum::Sum::new()));
                }
                (Err(_), Err(_)) => prop_assert!(m.len() < 8),
                _ => prop_assert!(false, "the two views disagree on {:?}", m),
            }
        }

        #[test]
        fn prop_setters_round_trip(mut m in proptest::collection::vec(any::<u8>(), 8..64), t: u8, code: u8, ident: u16, seq: u16) {
            let mut v = Icmpv4Packet::new_checked(&mut m[..]).unwrap();
            v.set_msg_type(t);
            v.set_code(code);
            v.set_echo_ident(ident);
            v.set_echo_seq(seq);
            v.fill_checksum();
            prop_assert!(v.verify_checksum());
            prop_assert_eq!((v.msg_type(), v.code(), v.echo_ident(), v.echo_seq()), (t, code, ident, seq));
        }
    }
}
