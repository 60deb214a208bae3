//! The host-side services of a userspace endpoint, as the command line writes them:
//! `--forward PROTO:LOCAL=BUSADDR:PORT`, `--expose PROTO:PORT=LOCAL`, `--socks5 ADDR`.
//! Pure: parsing and printing, no sockets. Each spec's `Display` prints the canonical
//! form, which parses back to the same spec.
//!
//! - `LOCAL` and the SOCKS5 `ADDR` are host socket addresses (`127.0.0.1:8080`,
//!   `[::1]:8080`); a bare port (`8080`) means `127.0.0.1:PORT`.
//! - `BUSADDR:PORT` is an address on the bus (`10.2.0.3:80`, `[bbbb::3]:5683`): never a
//!   name (the bus has no DNS), never unspecified, multicast only for UDP.
//! - Ports are 1..=65535.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;

/// The transport a forward or an expose carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// `--forward PROTO:LOCAL=BUSADDR:PORT`: a local listener whose TCP connections or UDP
/// flows are carried to `bus` from the endpoint's address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Forward {
    pub proto: Proto,
    pub local: SocketAddr,
    pub bus: SocketAddr,
}

/// `--expose PROTO:PORT=LOCAL`: the endpoint listens on its bus addresses at `port` and
/// hands each TCP connection or UDP datagram to the host service at `local`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Expose {
    pub proto: Proto,
    pub port: u16,
    pub local: SocketAddr,
}

/// `--socks5 ADDR`: where the SOCKS5 server listens on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Socks5 {
    pub listen: SocketAddr,
}

/// Why a spec does not parse: the flag, the spec, and what was expected where.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{flag} {spec:?}: {what} (form: {form})")]
pub struct SpecError {
    pub flag: &'static str,
    pub spec: String,
    pub what: String,
    pub form: &'static str,
}

const FORWARD_FORM: &str = "PROTO:LOCAL=BUSADDR:PORT, e.g. tcp:127.0.0.1:8080=10.2.0.3:80 or udp:5683=[bbbb::3]:5683";
const EXPOSE_FORM: &str = "PROTO:PORT=LOCAL, e.g. tcp:80=127.0.0.1:8000 or udp:5683=5683";
const SOCKS5_FORM: &str = "ADDR, e.g. 127.0.0.1:1080, [::1]:1080 or 1080";

/// What a host address looks like, for the errors.
const HOST_ADDR: &str = "a host address IP:PORT or [IPv6]:PORT, or a bare PORT for 127.0.0.1";
const BUS_ADDR: &str = "a bus address IP:PORT or [IPv6]:PORT (an IP address: the bus has no DNS)";
const PORT: &str = "a port 1..=65535";

fn parse_proto(s: &str) -> Result<Proto, String> {
    match s {
        "tcp" => Ok(Proto::Tcp),
        "udp" => Ok(Proto::Udp),
        _ => Err(format!("PROTO: expected tcp or udp, found {s:?}")),
    }
}

fn parse_port(slot: &str, s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("{slot}: expected {PORT}, found {s:?}")),
    }
}

/// `IP:PORT`, `[IPv6]:PORT` or a bare `PORT` (127.0.0.1).
fn parse_host_addr(slot: &str, s: &str) -> Result<SocketAddr, String> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), parse_port(slot, s)?));
    }
    match s.parse::<SocketAddr>() {
        Ok(a) if a.port() == 0 => Err(format!("{slot}: expected {PORT}, found port 0 in {s:?}")),
        Ok(a) => Ok(a),
        Err(_) => Err(format!("{slot}: expected {HOST_ADDR}, found {s:?}")),
    }
}

fn parse_bus_addr(proto: Proto, s: &str) -> Result<SocketAddr, String> {
    let a: SocketAddr = s.parse().map_err(|_| format!("BUSADDR:PORT: expected {BUS_ADDR}, found {s:?}"))?;
    if a.port() == 0 {
        return Err(format!("BUSADDR:PORT: expected {PORT}, found port 0 in {s:?}"));
    }
    let ip = a.ip();
    if ip.is_unspecified() {
        return Err(format!("BUSADDR:PORT: {ip} is unspecified; expected the address of a host on the bus"));
    }
    let group = ip.is_multicast() || ip == IpAddr::V4(Ipv4Addr::BROADCAST);
    if group && proto == Proto::Tcp {
        return Err(format!("BUSADDR:PORT: {ip} is a group address; TCP needs one host"));
    }
    Ok(a)
}

/// `PROTO:REST`, the proto and the rest.
fn split_proto(s: &str) -> Result<(Proto, &str), String> {
    let (p, rest) = s.split_once(':').ok_or_else(|| "expected PROTO: (tcp: or udp:) first, found no ':'".to_owned())?;
    Ok((parse_proto(p)?, rest))
}

/// `LEFT=RIGHT`, each non-empty.
fn split_eq<'a>(rest: &'a str, left: &str, right: &str) -> Result<(&'a str, &'a str), String> {
    let (l, r) = rest.split_once('=').ok_or_else(|| format!("expected {left}={right}, found no '=' in {rest:?}"))?;
    if l.is_empty() {
        return Err(format!("{left}: expected a value before '=', found nothing"));
    }
    if r.is_empty() {
        return Err(format!("{right}: expected a value after '=', found nothing"));
    }
    Ok((l, r))
}

impl FromStr for Forward {
    type Err = SpecError;

    fn from_str(text: &str) -> Result<Forward, SpecError> {
        let err = |what: String| SpecError { flag: "--forward", spec: text.to_owned(), what, form: FORWARD_FORM };
        let (proto, rest) = split_proto(text).map_err(err)?;
        let (local, bus) = split_eq(rest, "LOCAL", "BUSADDR:PORT").map_err(err)?;
        let local = parse_host_addr("LOCAL", local).map_err(err)?;
        let bus = parse_bus_addr(proto, bus).map_err(err)?;
        Ok(Forward { proto, local, bus })
    }
}

impl FromStr for Expose {
    type Err = SpecError;

    fn from_str(text: &str) -> Result<Expose, SpecError> {
        let err = |what: String| SpecError { flag: "--expose", spec: text.to_owned(), what, form: EXPOSE_FORM };
        let (proto, rest) = split_proto(text).map_err(err)?;
        let (port, local) = split_eq(rest, "PORT", "LOCAL").map_err(err)?;
        let port = parse_port("PORT", port).map_err(err)?;
        let local = parse_host_addr("LOCAL", local).map_err(err)?;
        if local.ip().is_unspecified() || local.ip().is_multicast() {
            return Err(err(format!("LOCAL: {} is not one host; expected the host service's address", local.ip())));
        }
        Ok(Expose { proto, port, local })
    }
}

impl FromStr for Socks5 {
    type Err = SpecError;

    fn from_str(text: &str) -> Result<Socks5, SpecError> {
        let err = |what: String| SpecError { flag: "--socks5", spec: text.to_owned(), what, form: SOCKS5_FORM };
        let listen = parse_host_addr("ADDR", text).map_err(err)?;
        if listen.ip().is_multicast() {
            return Err(err(format!("ADDR: {} is a group address; expected a local address to listen on", listen.ip())));
        }
        Ok(Socks5 { listen })
    }
}

impl fmt::Display for Forward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}={}", self.proto, self.local, self.bus)
    }
}

impl fmt::Display for Expose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}={}", self.proto, self.port, self.local)
    }
}

impl fmt::Display for Socks5 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.listen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_issue_s_examples_parse() {
        let f: Forward = "tcp:127.0.0.1:8080=10.2.0.3:80".parse().unwrap();
        assert_eq!(f, Forward { proto: Proto::Tcp, local: sa("127.0.0.1:8080"), bus: sa("10.2.0.3:80") });
        let f: Forward = "udp:127.0.0.1:5683=[bbbb::3]:5683".parse().unwrap();
        assert_eq!(f, Forward { proto: Proto::Udp, local: sa("127.0.0.1:5683"), bus: sa("[bbbb::3]:5683") });
        let e: Expose = "udp:5683=127.0.0.1:5683".parse().unwrap();
        assert_eq!(e, Expose { proto: Proto::Udp, port: 5683, local: sa("127.0.0.1:5683") });
        let e: Expose = "tcp:80=127.0.0.1:8000".parse().unwrap();
        assert_eq!(e, Expose { proto: Proto::Tcp, port: 80, local: sa("127.0.0.1:8000") });
        let s: Socks5 = "127.0.0.1:1080".parse().unwrap();
        assert_eq!(s.listen, sa("127.0.0.1:1080"));
    }

    #[test]
    fn bare_ports_and_ipv6_hosts() {
        let f: Forward = "tcp:8080=[fd00::2]:80".parse().unwrap();
        assert_eq!(f.local, sa("127.0.0.1:8080"));
        let f: Forward = "tcp:[::1]:8080=198.18.0.2:80".parse().unwrap();
        assert_eq!(f.local, sa("[::1]:8080"));
        let e: Expose = "tcp:80=8000".parse().unwrap();
        assert_eq!(e.local, sa("127.0.0.1:8000"));
        let s: Socks5 = "1080".parse().unwrap();
        assert_eq!(s.listen, sa("127.0.0.1:1080"));
        let f: Forward = "udp:5683=[ff02::1]:5683".parse().unwrap();
        assert_eq!(f.bus, sa("[ff02::1]:5683"));
    }

    /// Each bad spec and the words its error must contain.
    #[test]
    fn bad_specs_say_what_was_expected() {
        let forward = [
            ("", "expected PROTO:"),
            ("tcp", "found no ':'"),
            ("sctp:1=10.0.0.1:1", "expected tcp or udp, found \"sctp\""),
            ("tcp:8080", "expected LOCAL=BUSADDR:PORT"),
            ("tcp:=10.0.0.1:80", "LOCAL: expected a value"),
            ("tcp:8080=", "BUSADDR:PORT: expected a value"),
            ("tcp:0=10.0.0.1:80", "LOCAL: expected a port"),
            ("tcp:70000=10.0.0.1:80", "LOCAL: expected a port"),
            ("tcp:localhost:80=10.0.0.1:80", "LOCAL: expected a host address"),
            ("tcp:8080=example.org:80", "the bus has no DNS"),
            ("tcp:8080=10.0.0.1", "BUSADDR:PORT: expected a bus address"),
            ("tcp:8080=10.0.0.1:0", "found port 0"),
            ("tcp:8080=0.0.0.0:80", "unspecified"),
            ("tcp:8080=[ff02::1]:80", "TCP needs one host"),
            ("tcp:8080=bbbb::3:80", "expected a bus address"),
        ];
        for (spec, want) in forward {
            let e = spec.parse::<Forward>().unwrap_err().to_string();
            assert!(e.contains(want), "{spec:?}: {e}");
            assert!(e.starts_with("--forward"), "{e}");
            assert!(e.contains("form: PROTO:LOCAL=BUSADDR:PORT"), "{e}");
        }
        let expose = [
            ("tcp:80", "expected PORT=LOCAL"),
            ("tcp:0=8000", "PORT: expected a port"),
            ("tcp:http=8000", "PORT: expected a port"),
            ("udp:53=0.0.0.0:53", "not one host"),
            ("icmp:1=2", "expected tcp or udp"),
        ];
        for (spec, want) in expose {
            let e = spec.parse::<Expose>().unwrap_err().to_string();
            assert!(e.contains(want), "{spec:?}: {e}");
            assert!(e.starts_with("--expose"), "{e}");
        }
        for (spec, want) in [("", "ADDR: expected a host address"), ("0", "expected a port"), ("[ff02::1]:1080", "group address")] {
            let e = spec.parse::<Socks5>().unwrap_err().to_string();
            assert!(e.contains(want), "{spec:?}: {e}");
        }
    }

    fn addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), 1u16..).prop_map(|(a, p)| SocketAddr::new(IpAddr::from(a), p)),
            (any::<[u8; 16]>(), 1u16..).prop_map(|(a, p)| SocketAddr::new(IpAddr::from(a), p)),
        ]
    }

    proptest! {
        #[test]
        fn printed_specs_parse_back(local in addr(), bus in addr(), port in 1u16.., udp in any::<bool>()) {
            let proto = if udp { Proto::Udp } else { Proto::Tcp };
            let f = Forward { proto, local, bus };
            match f.to_string().parse::<Forward>() {
                Ok(back) => prop_assert_eq!(back, f),
                // only the addresses the parser refuses on purpose
                Err(_) => prop_assert!(bus.ip().is_unspecified() || (proto == Proto::Tcp && (bus.ip().is_multicast() || bus.ip() == IpAddr::V4(Ipv4Addr::BROADCAST)))),
            }
            let e = Expose { proto, port, local };
            match e.to_string().parse::<Expose>() {
                Ok(back) => prop_assert_eq!(back, e),
                Err(_) => prop_assert!(local.ip().is_unspecified() || local.ip().is_multicast()),
            }
        }

        #[test]
        fn parsers_never_panic(s in ".{0,64}") {
            let _ = s.parse::<Forward>();
            let _ = s.parse::<Expose>();
            let _ = s.parse::<Socks5>();
        }
    }
}
