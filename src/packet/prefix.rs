//! An address with its prefix length (`198.18.0.1/24`, `fd00:7b::1/64`), as agents, peers
//! files, claims, hellos and the lab write them, and the one place where prefix
//! arithmetic is done: [`Prefix::contains`], [`Prefix::network`], [`Prefix::broadcast`],
//! [`Prefix::netmask`].
//!
//! Pure. `contains` runs per packet in the receiver's source check (hot path, through the
//! identity tables); the rest at configuration time.

use core::fmt;
use core::str::FromStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An interface address with its prefix length, e.g. `198.18.0.1/24` or `fd00:7b::1/64`.
/// The address keeps its host bits (an interface address, not only a network).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

/// The mask of the first `len` bits of 32 (all of them from 32 up).
#[inline]
fn mask_v4(len: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(len.min(32))).unwrap_or(0)
}

/// The mask of the first `len` bits of 128 (all of them from 128 up).
#[inline]
fn mask_v6(len: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(len.min(128))).unwrap_or(0)
}

/// The IPv4 netmask of prefix length `len` (24: `255.255.255.0`; all ones from 32 up).
#[inline]
pub fn v4_netmask(len: u8) -> Ipv4Addr {
    Ipv4Addr::from(mask_v4(len))
}

impl Prefix {
    /// `addr/len`, when `len` fits the address family (32 or 128).
    pub fn new(addr: IpAddr, len: u8) -> Option<Prefix> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (len <= max).then_some(Prefix { addr, len })
    }

    /// The prefix of one host: `addr/32` or `addr/128`.
    pub fn host(addr: IpAddr) -> Prefix {
        Prefix { addr, len: if addr.is_ipv4() { 32 } else { 128 } }
    }

    /// An IPv4 address with a netmask (`255.255.255.0`), when the mask is contiguous.
    pub fn with_netmask(addr: Ipv4Addr, netmask: Ipv4Addr) -> Option<Prefix> {
        let m = u32::from(netmask);
        let len = m.leading_ones();
        (m.checked_shl(len).unwrap_or(0) == 0).then_some(Prefix { addr: IpAddr::V4(addr), len: len as u8 })
    }

    /// Whether `addr` lies in the prefix (the same family, the first `len` bits equal).
    #[inline]
    pub fn contains(&self, addr: IpAddr) -> bool {
        match (self.addr, addr) {
            (IpAddr::V4(net), IpAddr::V4(a)) => (u32::from(net) ^ u32::from(a)) & mask_v4(self.len) == 0,
            (IpAddr::V6(net), IpAddr::V6(a)) => (u128::from(net) ^ u128::from(a)) & mask_v6(self.len) == 0,
            _ => false,
        }
    }

    /// Whether every address of `other` lies in this prefix.
    #[inline]
    pub fn covers(&self, other: &Prefix) -> bool {
        self.len <= other.len && self.contains(other.addr)
    }

    /// The network: the address with its host bits cleared.
    pub fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask_v4(self.len))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask_v6(self.len))),
        }
    }

    /// The mask of the prefix length (`255.255.255.0` for a /24; `ffff:ffff:ffff:ffff::`
    /// for a /64).
    pub fn netmask(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(mask_v4(self.len))),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(mask_v6(self.len))),
        }
    }

    /// The subnet-directed broadcast address of an IPv4 prefix (all host bits set); `None`
    /// for IPv6 and for /31 and /32, which have none (RFC 3021).
    #[inline]
    pub fn broadcast(&self) -> Option<Ipv4Addr> {
        match self.addr {
            IpAddr::V4(a) if self.len < 31 => Some(Ipv4Addr::from(u32::from(a) | !mask_v4(self.len))),
            _ => None,
        }
    }

    /// Whether the prefix is one address (/32, /128).
    #[inline]
    pub fn is_host(&self) -> bool {
        self.len == if self.addr.is_ipv4() { 32 } else { 128 }
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Prefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Prefix, String> {
        let (addr, len) = s.split_once('/').ok_or_else(|| format!("{s:?} has no prefix length (write it as ADDR/LEN, e.g. 198.18.0.1/24)"))?;
        let addr: IpAddr = addr.parse().map_err(|_| format!("{addr:?} is not an IP address"))?;
        let len: u8 = len.parse().map_err(|_| format!("{len:?} is not a prefix length"))?;
        Prefix::new(addr, len).ok_or_else(|| format!("prefix length {len} is too long for {addr}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn prefixes_parse_and_print() {
        let q = p("198.18.0.1/24");
        assert_eq!(q.to_string(), "198.18.0.1/24");
        assert_eq!(p("fd00:7b::1/64").len, 64);
        assert_eq!("198.18.0.1".parse::<Prefix>(), Err("\"198.18.0.1\" has no prefix length (write it as ADDR/LEN, e.g. 198.18.0.1/24)".to_owned()));
        assert_eq!("198.18.0.1/33".parse::<Prefix>(), Err("prefix length 33 is too long for 198.18.0.1".to_owned()));
        assert!("fd00::1/129".parse::<Prefix>().is_err());
        assert_eq!("nonsense/8".parse::<Prefix>(), Err("\"nonsense\" is not an IP address".to_owned()));
        assert_eq!("fd00::1/x".parse::<Prefix>(), Err("\"x\" is not a prefix length".to_owned()));
    }

    #[test]
    fn containment() {
        assert!(p("198.18.0.0/15").contains(ip("198.19.255.1")));
        assert!(!p("198.18.0.0/15").contains(ip("198.20.0.1")));
        assert!(p("198.18.0.1/32").contains(ip("198.18.0.1")));
        assert!(!p("198.18.0.1/32").contains(ip("198.18.0.2")));
        assert!(p("0.0.0.0/0").contains(ip("1.2.3.4")));
        assert!(p("fd00:7b::/64").contains(ip("fd00:7b::9")));
        assert!(!p("fd00:7b::/64").contains(ip("fd00:7c::9")));
        assert!(!p("fd00::/8").contains(ip("198.18.0.1")));
        assert!(!p("0.0.0.0/0").contains(ip("::1")));
        assert!(p("::/0").contains(ip("fe80::1")));
        assert!(p("fd00::1/128").contains(ip("fd00::1")) && !p("fd00::1/128").contains(ip("fd00::2")));
        // a length past the family's (only by hand: FromStr refuses it) compares everything
        let wide = Prefix { addr: ip("10.0.0.1"), len: 200 };
        assert!(wide.contains(ip("10.0.0.1")) && !wide.contains(ip("10.0.0.2")));
        assert!(p("198.18.0.0/15").covers(&p("198.19.3.0/24")));
        assert!(!p("198.18.0.0/24").covers(&p("198.18.0.0/15")));
        assert!(!p("198.18.0.0/15").covers(&p("10.0.0.0/24")));
    }

    #[test]
    fn arithmetic() {
        assert_eq!(p("198.18.3.7/15").network(), ip("198.18.0.0"));
        assert_eq!(p("198.18.3.7/15").netmask(), ip("255.254.0.0"));
        assert_eq!(v4_netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(v4_netmask(0), Ipv4Addr::UNSPECIFIED);
        assert_eq!(v4_netmask(40), Ipv4Addr::BROADCAST);
        assert_eq!(p("198.18.3.7/15").broadcast(), Some(Ipv4Addr::new(198, 19, 255, 255)));
        assert_eq!(p("10.2.0.1/24").broadcast(), Some(Ipv4Addr::new(10, 2, 0, 255)));
        assert_eq!(p("10.0.0.1/30").broadcast(), Some(Ipv4Addr::new(10, 0, 0, 3)));
        assert_eq!(p("10.0.0.1/0").broadcast(), Some(Ipv4Addr::BROADCAST));
        assert_eq!(p("10.0.0.1/0").network(), ip("0.0.0.0"));
        assert_eq!(p("10.0.0.0/31").broadcast(), None);
        assert_eq!(p("10.0.0.1/32").broadcast(), None);
        assert_eq!(p("fd00::1/64").broadcast(), None);
        assert_eq!(p("fd00:7b::1:2/64").network(), ip("fd00:7b::"));
        assert_eq!(p("fd00:7b::1:2/64").netmask(), ip("ffff:ffff:ffff:ffff::"));
        assert!(p("10.0.0.1/32").is_host() && p("fd00::1/128").is_host());
        assert!(!p("10.0.0.1/31").is_host() && !p("fd00::1/127").is_host());
        assert_eq!(Prefix::with_netmask(Ipv4Addr::new(10, 2, 0, 1), Ipv4Addr::new(255, 255, 255, 0)), Some(p("10.2.0.1/24")));
        assert_eq!(Prefix::with_netmask(Ipv4Addr::new(10, 2, 0, 1), Ipv4Addr::new(0, 0, 0, 0)), Some(p("10.2.0.1/0")));
        assert_eq!(Prefix::with_netmask(Ipv4Addr::new(10, 2, 0, 1), Ipv4Addr::BROADCAST), Some(p("10.2.0.1/32")));
        assert_eq!(Prefix::with_netmask(Ipv4Addr::new(10, 2, 0, 1), Ipv4Addr::new(255, 0, 255, 0)), None);
    }

    proptest! {
        #[test]
        fn prop_v4_against_the_plain_mask(net: u32, a: u32, len in 0u8..=32) {
            let q = Prefix::new(IpAddr::V4(Ipv4Addr::from(net)), len).unwrap();
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            prop_assert_eq!(q.contains(IpAddr::V4(Ipv4Addr::from(a))), net & mask == a & mask);
            prop_assert_eq!(q.network(), IpAddr::V4(Ipv4Addr::from(net & mask)));
            prop_assert!(q.contains(q.network()));
            if let Some(b) = q.broadcast() {
                prop_assert!(len < 31 && q.contains(IpAddr::V4(b)));
                prop_assert_eq!(u32::from(b), net | !mask);
            }
            prop_assert_eq!(Prefix::with_netmask(Ipv4Addr::from(net), Ipv4Addr::from(mask)), Some(q));
            prop_assert_eq!(q.to_string().parse::<Prefix>(), Ok(q));
        }

        #[test]
        fn prop_v6_against_the_plain_mask(net: u128, a: u128, len in 0u8..=128) {
            let q = Prefix::new(IpAddr::V6(Ipv6Addr::from(net)), len).unwrap();
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
            prop_assert_eq!(q.contains(IpAddr::V6(Ipv6Addr::from(a))), net & mask == a & mask);
            prop_assert_eq!(q.network(), IpAddr::V6(Ipv6Addr::from(net & mask)));
            prop_assert_eq!(q.broadcast(), None);
            prop_assert_eq!(q.to_string().parse::<Prefix>(), Ok(q));
        }

        #[test]
        fn prop_parsing_never_panics(s in ".{0,60}") {
            let _ = s.parse::<Prefix>();
        }
    }
}
