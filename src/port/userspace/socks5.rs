//! SOCKS5 (RFC 1928) as bytes: the client's greeting and request, the server's replies,
//! and the header of a UDP ASSOCIATE datagram. Pure: no sockets; every length is checked
//! before use, so no input can panic it. Used by the host side of a userspace endpoint
//! (`host.rs`) on the worker's thread, once per client handshake and once per relayed UDP
//! datagram.
//!
//! What is served: version 5, method "no authentication" (0x00), commands CONNECT (1) and
//! UDP ASSOCIATE (3), address types IPv4 (1), IPv6 (4) and domain name (3). The bus has no
//! DNS, so a domain name is accepted only when it is an IP literal (`curl
//! --socks5-hostname` sends `10.2.0.3` and `[bbbb::3]` that way); any other name is
//! refused with reply 0x04 (host unreachable), BIND (2) with 0x07.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub const VERSION: u8 = 5;
pub const METHOD_NO_AUTH: u8 = 0x00;
pub const METHOD_NONE_ACCEPTABLE: u8 = 0xff;

pub const CMD_CONNECT: u8 = 1;
pub const CMD_UDP_ASSOCIATE: u8 = 3;

const ATYP_V4: u8 = 1;
const ATYP_DOMAIN: u8 = 3;
const ATYP_V6: u8 = 4;

/// Reply codes (RFC 1928 §6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Reply {
    Succeeded = 0,
    GeneralFailure = 1,
    NetworkUnreachable = 3,
    HostUnreachable = 4,
    ConnectionRefused = 5,
    CommandNotSupported = 7,
}

/// Bytes that are not SOCKS5: the client's connection is closed and counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Garbage {
    #[error("not SOCKS version 5")]
    Version,
    #[error("a greeting offering no method")]
    NoMethods,
    #[error("a reserved byte that is not zero")]
    Reserved,
    #[error("an unknown address type")]
    AddressType,
    #[error("an empty domain name")]
    EmptyName,
    #[error("a UDP datagram cut short")]
    Truncated,
}

/// The greeting, once complete: whether "no authentication" was offered, and its length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Greeting {
    pub no_auth: bool,
    pub len: usize,
}

/// Where a request points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Addr(SocketAddr),
    /// A domain name that is not an IP literal (the bus cannot resolve it).
    Name,
}

/// A complete request: its command, target and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub cmd: u8,
    pub target: Target,
    pub len: usize,
}

/// Reads a greeting from the start of `buf`: `Ok(None)` while incomplete.
pub fn greeting(buf: &[u8]) -> Result<Option<Greeting>, Garbage> {
    let Some(&ver) = buf.first() else {
        return Ok(None);
    };
    if ver != VERSION {
        return Err(Garbage::Version);
    }
    let Some(&n) = buf.get(1) else {
        return Ok(None);
    };
    if n == 0 {
        return Err(Garbage::NoMethods);
    }
    let len = 2 + usize::from(n);
    let Some(methods) = buf.get(2..len) else {
        return Ok(None);
    };
    Ok(Some(Greeting { no_auth: methods.contains(&METHOD_NO_AUTH), len }))
}

/// Reads a request from the start of `buf`: `Ok(None)` while incomplete.
pub fn request(buf: &[u8]) -> Result<Option<Request>, Garbage> {
    let Some(&ver) = buf.first() else {
        return Ok(None);
    };
    if ver != VERSION {
        return Err(Garbage::Version);
    }
    let (Some(&cmd), Some(&rsv)) = (buf.get(1), buf.get(2)) else {
        return Ok(None);
    };
    if rsv != 0 {
        return Err(Garbage::Reserved);
    }
    Ok(address(&buf[3..])?.map(|(target, n)| Request { cmd, target, len: 3 + n }))
}

/// An address (ATYP, ADDR, PORT) at the start of `buf` and its length; `Ok(None)` while
/// incomplete.
fn address(buf: &[u8]) -> Result<Option<(Target, usize)>, Garbage> {
    let Some(&atyp) = buf.first() else {
        return Ok(None);
    };
    let port_at = |at: usize| buf.get(at..at + 2).map(|p| u16::from_be_bytes([p[0], p[1]]));
    match atyp {
        ATYP_V4 => {
            let (Some(a), Some(port)) = (buf.get(1..5), port_at(5)) else {
                return Ok(None);
            };
            let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            Ok(Some((Target::Addr(SocketAddr::new(IpAddr::V4(ip), port)), 7)))
        }
        ATYP_V6 => {
            let (Some(a), Some(port)) = (buf.get(1..17), port_at(17)) else {
                return Ok(None);
            };
            let mut o = [0u8; 16];
            o.copy_from_slice(a);
            Ok(Some((Target::Addr(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), port)), 19)))
        }
        ATYP_DOMAIN => {
            let Some(&n) = buf.get(1) else {
                return Ok(None);
            };
            if n == 0 {
                return Err(Garbage::EmptyName);
            }
            let n = usize::from(n);
            let (Some(name), Some(port)) = (buf.get(2..2 + n), port_at(2 + n)) else {
                return Ok(None);
            };
            let target = match ip_literal(name) {
                Some(ip) => Target::Addr(SocketAddr::new(ip, port)),
                None => Target::Name,
            };
            Ok(Some((target, 4 + n)))
        }
        _ => Err(Garbage::AddressType),
    }
}

/// A domain name that is an IP literal: `10.2.0.3`, `bbbb::3`, `[bbbb::3]`.
pub fn ip_literal(name: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(name).ok()?;
    let s = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')).unwrap_or(s);
    s.parse().ok()
}

/// The server's method choice.
pub fn method_reply(no_auth: bool) -> [u8; 2] {
    [VERSION, if no_auth { METHOD_NO_AUTH } else { METHOD_NONE_ACCEPTABLE }]
}

/// Writes a reply with its bound address into `out`; returns its length (at most 22).
pub fn reply(out: &mut [u8; 22], code: Reply, bound: SocketAddr) -> usize {
    out[..3].copy_from_slice(&[VERSION, code as u8, 0]);
    3 + put_address(&mut out[3..], bound)
}

/// Writes ATYP, ADDR, PORT; returns the length (7 or 19). `out` holds at least 19 bytes.
fn put_address(out: &mut [u8], a: SocketAddr) -> usize {
    let n = match a.ip() {
        IpAddr::V4(ip) => {
            out[0] = ATYP_V4;
            out[1..5].copy_from_slice(&ip.octets());
            5
        }
        IpAddr::V6(ip) => {
            out[0] = ATYP_V6;
            out[1..17].copy_from_slice(&ip.octets());
            17
        }
    };
    out[n..n + 2].copy_from_slice(&a.port().to_be_bytes());
    n + 2
}

/// A UDP ASSOCIATE datagram from the client: its target and where its payload starts.
/// Fragments (FRAG ≠ 0) are refused as garbage (RFC 1928 lets a server drop them).
pub fn udp_header(buf: &[u8]) -> Result<(Target, usize), Garbage> {
    let (Some(&r1), Some(&r2), Some(&frag)) = (buf.first(), buf.get(1), buf.get(2)) else {
        return Err(Garbage::Truncated);
    };
    if r1 != 0 || r2 != 0 || frag != 0 {
        return Err(Garbage::Reserved);
    }
    match address(&buf[3..])? {
        Some((t, n)) => Ok((t, 3 + n)),
        None => Err(Garbage::Truncated),
    }
}

/// Writes the header of a datagram to the client (from `from`) into `out`; returns its
/// length (at most 22).
pub fn put_udp_header(out: &mut [u8; 22], from: SocketAddr) -> usize {
    out[..3].fill(0);
    3 + put_address(&mut out[3..], from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn greetings() {
        assert_eq!(greeting(&[]), Ok(None));
        assert_eq!(greeting(&[5]), Ok(None));
        assert_eq!(greeting(&[5, 2, 0]), Ok(None));
        assert_eq!(greeting(&[5, 2, 2, 0]), Ok(Some(Greeting { no_auth: true, len: 4 })));
        assert_eq!(greeting(&[5, 1, 2, 9]), Ok(Some(Greeting { no_auth: false, len: 3 })));
        assert_eq!(greeting(&[4, 1, 0]), Err(Garbage::Version));
        assert_eq!(greeting(b"GET / HTTP/1.1\r\n"), Err(Garbage::Version));
        assert_eq!(greeting(&[5, 0]), Err(Garbage::NoMethods));
        assert_eq!(method_reply(true), [5, 0]);
        assert_eq!(method_reply(false), [5, 0xff]);
    }

    #[test]
    fn requests_of_every_address_type() {
        let v4 = [5, 1, 0, 1, 10, 2, 0, 3, 0, 80];
        assert_eq!(request(&v4), Ok(Some(Request { cmd: 1, target: Target::Addr("10.2.0.3:80".parse().unwrap()), len: 10 })));
        for cut in 0..v4.len() {
            assert_eq!(request(&v4[..cut]), Ok(None), "cut at {cut}");
        }
        let mut v6 = vec![5, 3, 0, 4];
        v6.extend_from_slice(&"bbbb::3".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&5683u16.to_be_bytes());
        assert_eq!(request(&v6), Ok(Some(Request { cmd: 3, target: Target::Addr("[bbbb::3]:5683".parse().unwrap()), len: 22 })));
        for (name, want) in [("10.2.0.3", Some("10.2.0.3:80")), ("[bbbb::3]", Some("[bbbb::3]:80")), ("bbbb::3", Some("[bbbb::3]:80")), ("example.org", None)] {
            let mut r = vec![5, 1, 0, 3, name.len() as u8];
            r.extend_from_slice(name.as_bytes());
            r.extend_from_slice(&80u16.to_be_bytes());
            r.extend_from_slice(b"early data");
            let got = request(&r).unwrap().unwrap();
            assert_eq!(got.len, 7 + name.len());
            let want = want.map_or(Target::Name, |w| Target::Addr(w.parse().unwrap()));
            assert_eq!(got.target, want, "{name}");
        }
        assert_eq!(request(&[5, 1, 1, 1]), Err(Garbage::Reserved));
        assert_eq!(request(&[5, 1, 0, 9, 0]), Err(Garbage::AddressType));
        assert_eq!(request(&[5, 1, 0, 3, 0, 0, 80]), Err(Garbage::EmptyName));
        assert_eq!(request(&[0x16, 3, 1]), Err(Garbage::Version));
    }

    #[test]
    fn replies_and_udp_headers_round_trip() {
        let mut out = [0u8; 22];
        let n = reply(&mut out, Reply::Succeeded, "198.18.0.7:40000".parse().unwrap());
        assert_eq!(&out[..n], &[5, 0, 0, 1, 198, 18, 0, 7, 0x9c, 0x40]);
        let n = reply(&mut out, Reply::HostUnreachable, "[fd00::7]:1".parse().unwrap());
        assert_eq!(n, 22);
        assert_eq!(out[1], 4);
        for from in ["198.18.0.7:5683", "[fd00::7]:5683"] {
            let from: SocketAddr = from.parse().unwrap();
            let n = put_udp_header(&mut out, from);
            let mut d = out[..n].to_vec();
            d.extend_from_slice(b"payload");
            assert_eq!(udp_header(&d), Ok((Target::Addr(from), n)));
        }
        assert_eq!(udp_header(&[0, 0, 1, 1, 1, 2, 3, 4, 0, 1]), Err(Garbage::Reserved));
        assert_eq!(udp_header(&[0, 0, 0, 1, 1, 2]), Err(Garbage::Truncated));
        assert_eq!(udp_header(&[0]), Err(Garbage::Truncated));
    }

    proptest! {
        #[test]
        fn nothing_panics_and_lengths_stay_inside(buf in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(Some(g)) = greeting(&buf) { prop_assert!(g.len <= buf.len()); }
            if let Ok(Some(r)) = request(&buf) { prop_assert!(r.len <= buf.len()); }
            if let Ok((_, n)) = udp_header(&buf) { prop_assert!(n <= buf.len()); }
        }

        #[test]
        fn a_request_is_complete_exactly_at_its_length(ip in any::<[u8; 16]>(), port in any::<u16>(), v6 in any::<bool>()) {
            let a = if v6 { SocketAddr::new(IpAddr::from(ip), port) } else { SocketAddr::new(IpAddr::from([ip[0], ip[1], ip[2], ip[3]]), port) };
            let mut out = [0u8; 22];
            let n = reply(&mut out, Reply::Succeeded, a);
            let mut req = out[..n].to_vec();
            req[1] = CMD_CONNECT;
            for cut in 0..n { prop_assert_eq!(request(&req[..cut]), Ok(None)); }
            prop_assert_eq!(request(&req), Ok(Some(Request { cmd: CMD_CONNECT, target: Target::Addr(a), len: n })));
        }
    }
}
