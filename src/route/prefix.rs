//! Interface prefixes: an address with its prefix length (`198.18.0.1/24`,
//! `fd00:7b::1/64`), as agents, peers files, claims and the lab write them.

use core::fmt;
use core::str::FromStr;
use std::net::IpAddr;

/// An interface address with its prefix length, e.g. `198.18.0.1/24` or `fd00:7b::1/64`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl Prefix {
    pub fn new(addr: IpAddr, len: u8) -> Option<Prefix> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (len <= max).then_some(Prefix { addr, len })
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
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} has no prefix length (write it as ADDR/LEN, e.g. 198.18.0.1/24)"))?;
        let addr: IpAddr = addr.parse().map_err(|_| format!("{addr:?} is not an IP address"))?;
        let len: u8 = len.parse().map_err(|_| format!("{len:?} is not a prefix length"))?;
        Prefix::new(addr, len).ok_or_else(|| format!("prefix length {len} is too long for {addr}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_parse_and_print() {
        let p: Prefix = "198.18.0.1/24".parse().unwrap();
        assert_eq!(p.to_string(), "198.18.0.1/24");
        let p: Prefix = "fd00:7b::1/64".parse().unwrap();
        assert_eq!(p.len, 64);
        assert!("198.18.0.1".parse::<Prefix>().is_err());
        assert!("198.18.0.1/33".parse::<Prefix>().is_err());
        assert!("fd00::1/129".parse::<Prefix>().is_err());
        assert!("nonsense/8".parse::<Prefix>().is_err());
        assert!("fd00::1/x".parse::<Prefix>().is_err());
    }
}
