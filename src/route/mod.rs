//! Destination → routing key, flow hash, shard → queue.
//!
//! The broker does the routing (DESIGN.md, "Routing"): a sender publishes each batch with a
//! key naming the destination address and a flow shard, `tunbus.v1.<dst>.<shard>`, or
//! `tunbus.v1.all.<sender>` for broadcast and multicast; a receiver with K queues binds
//! shard `s` of each of its addresses to queue `s mod K`, so a flow keeps one queue and
//! its order.
//!
//! Pure and allocation-free: the per-queue worker threads call [`classify`] for every
//! packet read from the TUN and build a [`RoutingKey`] (on the stack) per batch. Nothing
//! here panics on any input; the flow hash is fixed (no random seed) so every host and
//! every run agree on it.

pub mod peers;

use core::fmt::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Number of flow shards per destination address.
pub const SHARDS: u8 = 16;
/// Prefix of every tunbus v1 routing key.
pub const KEY_PREFIX: &str = "tunbus.v1.";
/// Binding pattern for broadcast and multicast from all agents (each ignores its own).
pub const ALL_PATTERN: &str = "tunbus.v1.all.*";
/// Prefix of every control (presence) key.
pub const CTL_PREFIX: &str = "tunbus.v1.ctl.";
/// Routing key of a presence probe (agents answer with a hello).
pub const CTL_PROBE: &str = "tunbus.v1.ctl.probe";
/// Binding pattern for every agent's hello.
pub const HELLO_PATTERN: &str = "tunbus.v1.ctl.hello.*";
/// Binding pattern for every agent's bye.
pub const BYE_PATTERN: &str = "tunbus.v1.ctl.bye.*";
/// Longest agent name (a topic word) accepted in routing keys, in bytes.
pub const MAX_WORD_LEN: usize = 64;

const KEY_CAP: usize = 96;
/// Longest address word: a full uncompressed IPv6 address, 8 groups of 4 and 7 separators.
const WORD_CAP: usize = 39;

/// Whether `s` can be one word of a topic routing key, as agent names must: 1 to
/// [`MAX_WORD_LEN`] printable ASCII characters, none of them `.`, `*` or `#`.
pub fn is_valid_word(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_WORD_LEN
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'.' | b'*' | b'#'))
}

/// A fixed-capacity ASCII buffer written through `fmt::Write`; overflow is an error.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct StackStr<const N: usize> {
    buf: [u8; N],
    len: u8,
}

impl<const N: usize> StackStr<N> {
    const fn new() -> Self {
        StackStr {
            buf: [0; N],
            len: 0,
        }
    }

    fn push_str(&mut self, s: &str) -> fmt::Result {
        let start = usize::from(self.len);
        let end = start
            .checked_add(s.len())
            .filter(|&e| e <= N && e <= usize::from(u8::MAX))
            .ok_or(fmt::Error)?;
        self.buf
            .get_mut(start..end)
            .ok_or(fmt::Error)?
            .copy_from_slice(s.as_bytes());
        // end <= u8::MAX, checked above.
        self.len = end as u8;
        Ok(())
    }

    fn as_str(&self) -> &str {
        // Only whole `&str`s are ever appended, so the bytes are valid UTF-8.
        core::str::from_utf8(self.buf.get(..usize::from(self.len)).unwrap_or_default())
            .unwrap_or_default()
    }
}

impl<const N: usize> fmt::Write for StackStr<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.push_str(s)
    }
}

/// An address written as one topic word: IPv4 `198-18-0-2`, IPv6 `fd00-7b--2` (RFC 5952
/// compressed form, `:` → `-`). Built on the stack.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct AddressWord(StackStr<WORD_CAP>);

impl AddressWord {
    /// The word.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl fmt::Display for AddressWord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for AddressWord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// The topic word for an address: IPv4 dotted quad with `.` → `-`; IPv6 in RFC 5952
/// compressed form (what `std` prints) with `:` → `-`. IPv4-mapped IPv6 addresses are
/// written in hex groups (`--ffff-c612-2`), unlike `std`, which prints a dotted tail.
pub fn address_word(ip: IpAddr) -> AddressWord {
    let mut w = StackStr::new();
    // Cannot fail: the longest word is 39 bytes, the buffer's capacity.
    let _ = match ip {
        IpAddr::V4(a) => write_v4_word(&mut w, a),
        IpAddr::V6(a) => write_v6_word(&mut w, a),
    };
    AddressWord(w)
}

fn write_v4_word(w: &mut impl fmt::Write, a: Ipv4Addr) -> fmt::Result {
    let [x, y, z, t] = a.octets();
    write!(w, "{x}-{y}-{z}-{t}")
}

/// RFC 5952: lowercase hex, no leading zeros, the longest run (first on a tie) of two or
/// more zero groups replaced by `::`.
fn write_v6_word(w: &mut impl fmt::Write, a: Ipv6Addr) -> fmt::Result {
    let g = a.segments();
    let (mut best_start, mut best_len) = (0, 0);
    let mut i = 0;
    while i < g.len() {
        if g[i] == 0 {
            let start = i;
            while i < g.len() && g[i] == 0 {
                i += 1;
            }
            if i - start > best_len {
                (best_start, best_len) = (start, i - start);
            }
        } else {
            i += 1;
        }
    }
    let write_groups = |w: &mut dyn fmt::Write, groups: &[u16]| -> fmt::Result {
        for (n, s) in groups.iter().enumerate() {
            if n > 0 {
                w.write_char('-')?;
            }
            write!(w, "{s:x}")?;
        }
        Ok(())
    };
    if best_len >= 2 {
        write_groups(w, g.get(..best_start).unwrap_or_default())?;
        w.write_str("--")?;
        write_groups(w, g.get(best_start + best_len..).unwrap_or_default())
    } else {
        write_groups(w, &g)
    }
}

/// Inverse of [`address_word`]: the address a word names, `None` unless the word is
/// exactly what `address_word` writes for it.
pub fn word_to_address(word: &str) -> Option<IpAddr> {
    if word.is_empty() || word.len() > WORD_CAP {
        return None;
    }
    let mut buf = [0u8; WORD_CAP];
    let dst = buf.get_mut(..word.len())?;
    dst.copy_from_slice(word.as_bytes());
    let dashes = word.bytes().filter(|&b| b == b'-').count();
    let sep = if dashes == 3 && !word.contains("--") {
        b'.'
    } else {
        b':'
    };
    for b in dst.iter_mut() {
        if *b == b'-' {
            *b = sep;
        }
    }
    let text = core::str::from_utf8(dst).ok()?;
    let ip: IpAddr = if sep == b'.' {
        IpAddr::V4(text.parse().ok()?)
    } else {
        IpAddr::V6(text.parse().ok()?)
    };
    (address_word(ip).as_str() == word).then_some(ip)
}

/// The topic exchange of a testbed session: `tunbus.<session>`.
pub fn session_exchange(session: &str) -> String {
    format!("tunbus.{session}")
}

/// `tunbus.v1.<addr>.*`: every shard of one address (a one-queue receiver's binding, and
/// the router's for the addresses of old-wire agents).
pub fn unicast_pattern(addr: IpAddr) -> String {
    format!("{KEY_PREFIX}{}.*", address_word(addr))
}

/// A routing key, built on the stack (no allocation).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct RoutingKey {
    buf: [u8; KEY_CAP],
    len: u8,
}

impl RoutingKey {
    fn build(parts: &[&str]) -> Option<RoutingKey> {
        let mut s = StackStr::<KEY_CAP>::new();
        for p in parts {
            s.push_str(p).ok()?;
        }
        Some(RoutingKey {
            buf: s.buf,
            len: s.len,
        })
    }

    /// `tunbus.v1.<dst>.<shard>`, e.g. `tunbus.v1.198-18-0-2.7`, `tunbus.v1.fd00-7b--2.15`.
    pub fn unicast(dst: IpAddr, shard: u8) -> RoutingKey {
        let mut s = StackStr::<KEY_CAP>::new();
        // Cannot fail: at most 10 + 39 + 1 + 3 = 53 bytes.
        let _ = write!(s, "{KEY_PREFIX}{}.{shard}", address_word(dst));
        RoutingKey {
            buf: s.buf,
            len: s.len,
        }
    }

    /// `tunbus.v1.all.<sender>`: broadcast and multicast. `None` if `sender` is not a valid
    /// word ([`is_valid_word`]).
    pub fn all(sender: &str) -> Option<RoutingKey> {
        is_valid_word(sender).then(|| Self::build(&[KEY_PREFIX, "all.", sender]))?
    }

    /// `tunbus.v1.ctl.hello.<name>`: presence announcement. `None` if `name` is not valid.
    pub fn hello(name: &str) -> Option<RoutingKey> {
        is_valid_word(name).then(|| Self::build(&[KEY_PREFIX, "ctl.hello.", name]))?
    }

    /// `tunbus.v1.ctl.bye.<name>`: graceful exit. `None` if `name` is not valid.
    pub fn bye(name: &str) -> Option<RoutingKey> {
        is_valid_word(name).then(|| Self::build(&[KEY_PREFIX, "ctl.bye.", name]))?
    }

    /// The key as a string.
    pub fn as_str(&self) -> &str {
        // Built only from whole `&str`s (see `build` and `unicast`).
        core::str::from_utf8(self.buf.get(..usize::from(self.len)).unwrap_or_default())
            .unwrap_or_default()
    }

    /// Parses a unicast key back into (destination, shard); `None` for anything else.
    pub fn parse_unicast(key: &str) -> Option<(IpAddr, u8)> {
        let rest = key.strip_prefix(KEY_PREFIX)?;
        let (word, shard) = rest.split_once('.')?;
        let shard: u8 = shard.parse().ok().filter(|&s| s < SHARDS)?;
        let ip = word_to_address(word)?;
        // Reject non-canonical shard spellings ("07", "+7").
        (RoutingKey::unicast(ip, shard).as_str() == key).then_some((ip, shard))
    }
}

impl fmt::Display for RoutingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for RoutingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl AsRef<str> for RoutingKey {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

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

const IPV4_HEADER_LEN: usize = 20;
const IPV6_HEADER_LEN: usize = 40;

fn array_at<const N: usize>(p: &[u8], at: usize) -> Option<[u8; N]> {
    p.get(at..at.checked_add(N)?)?.try_into().ok()
}

/// Classifies one IP packet (no vnet header): source, destination and flow shard.
pub fn classify(packet: &[u8]) -> Result<Classified, ClassifyError> {
    let first = *packet.first().ok_or(ClassifyError::Empty)?;
    let (src, dst) = match first >> 4 {
        4 => {
            let src = array_at::<4>(packet, 12).ok_or(ClassifyError::Truncated)?;
            let dst = array_at::<4>(packet, 16).ok_or(ClassifyError::Truncated)?;
            let dst = Ipv4Addr::from(dst);
            let dest = if dst.is_broadcast() || dst.is_multicast() {
                Destination::Flood
            } else {
                Destination::Unicast(IpAddr::V4(dst))
            };
            (IpAddr::V4(Ipv4Addr::from(src)), dest)
        }
        6 => {
            let src = array_at::<16>(packet, 8).ok_or(ClassifyError::Truncated)?;
            let dst = array_at::<16>(packet, 24).ok_or(ClassifyError::Truncated)?;
            let dst = Ipv6Addr::from(dst);
            let dest = if dst.is_multicast() {
                Destination::Flood
            } else {
                Destination::Unicast(IpAddr::V6(dst))
            };
            (IpAddr::V6(Ipv6Addr::from(src)), dest)
        }
        _ => return Err(ClassifyError::NotIp),
    };
    Ok(Classified {
        src,
        dst,
        shard: shard(flow_hash(packet)),
    })
}

/// The source address of an IP packet (no vnet header), if it has one.
pub fn source(packet: &[u8]) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 => array_at::<4>(packet, 12).map(|a| IpAddr::V4(Ipv4Addr::from(a))),
        6 => array_at::<16>(packet, 8).map(|a| IpAddr::V6(Ipv6Addr::from(a))),
        _ => None,
    }
}

/// Transport protocols whose first four bytes are source and destination ports.
fn has_ports(proto: u8) -> bool {
    matches!(proto, 6 | 17 | 132 | 136)
}

/// Most IPv6 extension headers followed before giving up (ports = 0).
const MAX_EXT_HEADERS: usize = 8;

/// FNV-1a, 32-bit, streaming.
struct Fnv1a(u32);

impl Fnv1a {
    const OFFSET: u32 = 0x811c_9dc5;
    const PRIME: u32 = 0x0100_0193;

    fn new() -> Self {
        Fnv1a(Self::OFFSET)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u32::from(b)).wrapping_mul(Self::PRIME);
        }
    }

    fn finish(&self) -> u32 {
        fmix32(self.0)
    }
}

/// MurmurHash3's finaliser: full avalanche of a 32-bit value.
fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// Deterministic 32-bit hash of (src, dst, protocol, src port, dst port): FNV-1a over the
/// tuple bytes, then MurmurHash3's `fmix32`. The same on every host and every run.
///
/// Ports are read only for TCP, UDP, UDP-Lite and SCTP, and are 0 for IPv4 fragments (MF
/// set or offset != 0) and IPv6 packets with a fragment header (so all fragments of a
/// datagram share a shard), and when the transport header is truncated. IPv6 follows up to
/// 8 hop-by-hop / routing / destination-options headers; with a fragment header the
/// protocol is the fragment header's next header. Not an IP packet or truncated IP header: 0.
pub fn flow_hash(packet: &[u8]) -> u32 {
    let Some(&first) = packet.first() else {
        return 0;
    };
    let mut h = Fnv1a::new();
    match first >> 4 {
        4 => {
            let (Some(src), Some(dst)) = (array_at::<4>(packet, 12), array_at::<4>(packet, 16))
            else {
                return 0;
            };
            let proto = packet.get(9).copied().unwrap_or(0);
            let frag = array_at::<2>(packet, 6).map_or(0, u16::from_be_bytes);
            let fragmented = frag & 0x3fff != 0; // MF bit or fragment offset
            let ihl = usize::from(first & 0x0f) * 4;
            let ports = if has_ports(proto) && !fragmented && ihl >= IPV4_HEADER_LEN {
                array_at::<4>(packet, ihl)
            } else {
                None
            };
            h.write(&src);
            h.write(&dst);
            h.write(&[proto]);
            h.write(&ports.unwrap_or([0; 4]));
        }
        6 => {
            let (Some(src), Some(dst)) = (array_at::<16>(packet, 8), array_at::<16>(packet, 24))
            else {
                return 0;
            };
            let (proto, ports) = ipv6_transport(packet);
            h.write(&src);
            h.write(&dst);
            h.write(&[proto]);
            h.write(&ports.unwrap_or([0; 4]));
        }
        _ => return 0,
    }
    h.finish()
}

/// The IPv6 transport protocol and, when it has ports and they are present, its first four
/// bytes. The packet is at least 40 bytes long.
fn ipv6_transport(packet: &[u8]) -> (u8, Option<[u8; 4]>) {
    let mut next = packet.get(6).copied().unwrap_or(0);
    let mut at = IPV6_HEADER_LEN;
    let mut followed = 0;
    loop {
        match next {
            // hop-by-hop, routing, destination options: (hdr ext len + 1) * 8 bytes
            0 | 43 | 60 => {
                if followed == MAX_EXT_HEADERS {
                    return (next, None);
                }
                followed += 1;
                let Some([nh, len]) = array_at::<2>(packet, at) else {
                    return (next, None);
                };
                next = nh;
                at += (usize::from(len) + 1) * 8;
            }
            // fragment: ports only in the first fragment; keep all fragments together
            44 => return (packet.get(at).copied().unwrap_or(44), None),
            p if has_ports(p) => return (p, array_at::<4>(packet, at)),
            p => return (p, None),
        }
    }
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
/// `nets` (address, prefix length). Prefixes of 31 or more have no broadcast address.
pub fn is_directed_broadcast(dst: Ipv4Addr, nets: &[(Ipv4Addr, u8)]) -> bool {
    nets.iter().any(|&(net, prefix)| {
        if prefix >= 31 {
            return false;
        }
        let host_mask = u32::MAX.checked_shr(u32::from(prefix)).unwrap_or(0);
        u32::from(dst) == u32::from(net) | host_mask
    })
}

/// Whether `packet` is an IPv6 MLD message (ICMPv6 types 130-132 and 143, behind the
/// hop-by-hop header that carries their router alert). tunbus floods every multicast
/// packet to every agent of a session whatever the membership, so membership reports
/// inform nobody; agents do not forward them. Never panics.
pub fn is_mld(packet: &[u8]) -> bool {
    if packet.len() < 40 || packet[0] >> 4 != 6 {
        return false;
    }
    let (mut next, mut at) = (packet[6], 40usize);
    if next == 0 {
        // hop-by-hop options: length in 8-byte units, not counting the first 8
        let Some(&len) = packet.get(at + 1) else { return false };
        next = packet[at];
        at += 8 + usize::from(len) * 8;
    }
    next == 58 && matches!(packet.get(at), Some(130..=132 | 143))
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
    use proptest::prelude::*;

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
        let mut h = Fnv1a::new();
        h.write(src);
        h.write(dst);
        h.write(&[proto]);
        h.write(&sp.to_be_bytes());
        h.write(&dp.to_be_bytes());
        h.finish()
    }

    // ---- routing keys ----

    #[test]
    fn unicast_keys() {
        let k = RoutingKey::unicast("198.18.0.2".parse().unwrap(), 7);
        assert_eq!(k.as_str(), "tunbus.v1.198-18-0-2.7");
        assert_eq!(k.to_string(), "tunbus.v1.198-18-0-2.7");
        assert_eq!(format!("{k:?}"), "\"tunbus.v1.198-18-0-2.7\"");
        let cases = [
            ("fd00:7b::2", 15, "tunbus.v1.fd00-7b--2.15"),
            ("::", 0, "tunbus.v1.--.0"),
            ("::1", 1, "tunbus.v1.--1.1"),
            ("fe80::", 2, "tunbus.v1.fe80--.2"),
            ("bbbb::1", 3, "tunbus.v1.bbbb--1.3"),
            ("1:0:0:2:0:0:0:3", 4, "tunbus.v1.1-0-0-2--3.4"),
            ("1:0:2:3:4:5:6:7", 5, "tunbus.v1.1-0-2-3-4-5-6-7.5"),
            ("1:0:0:2:3:0:0:4", 6, "tunbus.v1.1--2-3-0-0-4.6"),
            (
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                255,
                "tunbus.v1.ffff-ffff-ffff-ffff-ffff-ffff-ffff-ffff.255",
            ),
            ("::ffff:198.18.0.2", 0, "tunbus.v1.--ffff-c612-2.0"),
            ("0.0.0.0", 0, "tunbus.v1.0-0-0-0.0"),
            ("255.255.255.255", 9, "tunbus.v1.255-255-255-255.9"),
        ];
        for (ip, shard, want) in cases {
            assert_eq!(
                RoutingKey::unicast(ip.parse().unwrap(), shard).as_str(),
                want,
                "{ip}"
            );
        }
    }

    #[test]
    fn all_and_ctl_keys() {
        assert_eq!(
            RoutingKey::all("agent_1").unwrap().as_str(),
            "tunbus.v1.all.agent_1"
        );
        assert_eq!(
            RoutingKey::hello("a-b").unwrap().as_str(),
            "tunbus.v1.ctl.hello.a-b"
        );
        assert_eq!(
            RoutingKey::bye("agent_TT").unwrap().as_str(),
            "tunbus.v1.ctl.bye.agent_TT"
        );
        let longest = "x".repeat(MAX_WORD_LEN);
        assert_eq!(
            RoutingKey::all(&longest).unwrap().as_str().len(),
            14 + MAX_WORD_LEN
        );
        assert_eq!(
            RoutingKey::hello(&longest).unwrap().as_str().len(),
            20 + MAX_WORD_LEN
        );
        for bad in [
            "",
            "a.b",
            "a*",
            "#",
            "a b",
            "a\tb",
            "é",
            "\n",
            &"x".repeat(MAX_WORD_LEN + 1),
        ] {
            assert!(!is_valid_word(bad), "{bad:?}");
            assert_eq!(RoutingKey::all(bad), None);
            assert_eq!(RoutingKey::hello(bad), None);
            assert_eq!(RoutingKey::bye(bad), None);
        }
        assert!(is_valid_word("agent_1") && is_valid_word("A-Z~!") && is_valid_word("x"));
    }

    #[test]
    fn parse_unicast_keys() {
        let ip: IpAddr = "fd00:7b::2".parse().unwrap();
        assert_eq!(
            RoutingKey::parse_unicast("tunbus.v1.fd00-7b--2.15"),
            Some((ip, 15))
        );
        assert_eq!(
            RoutingKey::parse_unicast("tunbus.v1.198-18-0-2.0"),
            Some(("198.18.0.2".parse().unwrap(), 0))
        );
        for bad in [
            "tunbus.v1.198-18-0-2.16",
            "tunbus.v1.198-18-0-2.07",
            "tunbus.v1.198-18-0-2.+7",
            "tunbus.v1.198-18-0-2",
            "tunbus.v1.all.agent_1",
            "tunbus.v2.198-18-0-2.1",
            "tunbus.v1.FD00-7b--2.1",
            "",
        ] {
            assert_eq!(RoutingKey::parse_unicast(bad), None, "{bad}");
        }
    }

    #[test]
    fn address_words_and_inverse() {
        for (ip, w) in [
            ("198.18.0.2", "198-18-0-2"),
            ("fd00:7b::2", "fd00-7b--2"),
            ("::", "--"),
            ("::ffff:1.2.3.4", "--ffff-102-304"),
            ("1:2:3:4:5:6:7:8", "1-2-3-4-5-6-7-8"),
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(address_word(ip).as_str(), w);
            assert_eq!(word_to_address(w), Some(ip));
        }
        for bad in [
            "",
            "-",
            "1-2-3",
            "1-2-3-4-5",
            "01-2-3-4",
            "256-0-0-0",
            "1.2.3.4",
            "0-0-0-0-0-0-0-1",
            "FD00--1",
            "fd00-0-0-0-0-0-0-1",
            "::1",
            "1-2-3-4-",
            "x",
            "1--2--3",
            "00001--",
            "-1-2-3",
            "1111-2222-3333-4444-5555-6666-7777-8888-9",
        ] {
            assert_eq!(word_to_address(bad), None, "{bad}");
        }
    }

    proptest! {
        #[test]
        fn prop_word_roundtrip_v4(a in any::<u32>()) {
            let ip = IpAddr::V4(Ipv4Addr::from(a));
            let w = address_word(ip);
            prop_assert_eq!(w.as_str(), ip.to_string().replace('.', "-"));
            prop_assert_eq!(word_to_address(w.as_str()), Some(ip));
        }

        #[test]
        fn prop_word_roundtrip_v6(segs in any::<[u16; 8]>(), zero_mask in any::<u8>()) {
            // Zero out some groups so that compression cases are common.
            let mut segs = segs;
            for (i, s) in segs.iter_mut().enumerate() {
                if zero_mask & (1 << i) != 0 { *s = 0; }
            }
            let a = Ipv6Addr::from(segs);
            let ip = IpAddr::V6(a);
            let w = address_word(ip);
            prop_assert!(is_valid_word(w.as_str()));
            if a.to_ipv4_mapped().is_none() {
                prop_assert_eq!(w.as_str(), a.to_string().replace(':', "-"));
            }
            prop_assert_eq!(word_to_address(w.as_str()), Some(ip));
            let k = RoutingKey::unicast(ip, 3);
            prop_assert_eq!(RoutingKey::parse_unicast(k.as_str()), Some((ip, 3)));
        }

        #[test]
        fn prop_word_to_address_never_panics(s in "\\PC{0,45}") {
            if let Some(ip) = word_to_address(&s) {
                let w = address_word(ip);
                prop_assert_eq!(w.as_str(), s.as_str());
            }
        }

        #[test]
        fn prop_word_to_address_dashes(s in "[0-9a-f\\-]{0,40}") {
            if let Some(ip) = word_to_address(&s) {
                let w = address_word(ip);
                prop_assert_eq!(w.as_str(), s.as_str());
            }
        }
    }

    // ---- classify ----

    #[test]
    fn classify_errors() {
        assert_eq!(classify(&[]), Err(ClassifyError::Empty));
        for first in [0x00, 0x10, 0x50, 0x70, 0xf0, 0x3f] {
            assert_eq!(
                classify(&[first; 60]),
                Err(ClassifyError::NotIp),
                "{first:#x}"
            );
        }
        assert_eq!(
            classify(b"ZZZ not a packet, but long enough for any IP header........"),
            Err(ClassifyError::NotIp)
        );
        let p4 = ipv4(17, A4, B4, 0, &ports(1, 2));
        for n in 1..20 {
            assert_eq!(
                classify(&p4[..n]),
                Err(ClassifyError::Truncated),
                "v4 len {n}"
            );
        }
        let p6 = ipv6(17, a6(), b6(), &ports(1, 2));
        for n in 1..40 {
            assert_eq!(
                classify(&p6[..n]),
                Err(ClassifyError::Truncated),
                "v6 len {n}"
            );
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

        for dst in [
            [255, 255, 255, 255],
            [224, 0, 0, 1],
            [239, 255, 255, 250],
            [224, 0, 0, 251],
        ] {
            assert_eq!(
                classify(&ipv4(17, A4, dst, 0, &ports(5353, 5353)))
                    .unwrap()
                    .dst,
                Destination::Flood
            );
        }
        for dst in [
            [223, 255, 255, 255],
            [240, 0, 0, 1],
            [198, 18, 255, 255],
            [10, 2, 0, 255],
        ] {
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
            assert_eq!(
                classify(&ipv6(58, a6(), dst.parse().unwrap(), &[]))
                    .unwrap()
                    .dst,
                Destination::Flood
            );
        }
        for dst in ["fe80::1", "fec0::1", "fd00::ff"] {
            assert!(matches!(
                classify(&ipv6(58, a6(), dst.parse().unwrap(), &[]))
                    .unwrap()
                    .dst,
                Destination::Unicast(_)
            ));
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
            assert_eq!(
                flow_hash(&p),
                tuple_hash(&A4, &B4, proto, 1234, 80),
                "proto {proto}"
            );
            assert_ne!(
                flow_hash(&p),
                flow_hash(&ipv4(proto, A4, B4, 0, &ports(1235, 80)))
            );
            assert_ne!(
                flow_hash(&p),
                flow_hash(&ipv4(proto, A4, B4, 0, &ports(1234, 81)))
            );
            // the reverse direction is a different flow
            assert_ne!(
                flow_hash(&p),
                flow_hash(&ipv4(proto, B4, A4, 0, &ports(80, 1234)))
            );
            // DF bit does not matter
            assert_eq!(
                flow_hash(&p),
                flow_hash(&ipv4(proto, A4, B4, 0x4000, &ports(1234, 80)))
            );
        }
        // ICMP and others: no ports, payload ignored
        let icmp = ipv4(1, A4, B4, 0, &[8, 0, 1, 2, 3, 4]);
        assert_eq!(flow_hash(&icmp), tuple_hash(&A4, &B4, 1, 0, 0));
        assert_eq!(
            flow_hash(&icmp),
            flow_hash(&ipv4(1, A4, B4, 0, &[0, 0, 9, 9, 9, 9]))
        );
        assert_eq!(
            flow_hash(&ipv4(47, A4, B4, 0, &ports(1, 2))),
            tuple_hash(&A4, &B4, 47, 0, 0)
        );
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
            assert_eq!(
                flow_hash(&full[..n]),
                tuple_hash(&A4, &B4, 6, 0, 0),
                "len {n}"
            );
        }
        assert_eq!(flow_hash(&full[..24]), tuple_hash(&A4, &B4, 6, 1234, 80));
        let full6 = ipv6(17, a6(), b6(), &ports(1234, 80));
        for n in 40..44 {
            assert_eq!(
                flow_hash(&full6[..n]),
                tuple_hash(&a6().octets(), &b6().octets(), 17, 0, 0)
            );
        }
        assert_eq!(
            flow_hash(&full6[..44]),
            tuple_hash(&a6().octets(), &b6().octets(), 17, 1234, 80)
        );
    }

    #[test]
    fn flow_hash_non_ip_is_zero() {
        assert_eq!(flow_hash(&[]), 0);
        assert_eq!(flow_hash(&[0x45; 19]), 0);
        assert_eq!(flow_hash(&[0x60; 39]), 0);
        assert_eq!(flow_hash(&[0x00; 64]), 0);
        assert_eq!(
            flow_hash(b"ZZZ not a packet, but long enough for any IP header........"),
            0
        );
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
        assert_eq!(
            flow_hash(&ipv6(60, a6(), b6(), &payload)),
            tuple_hash(&s, &d, 6, 443, 5555)
        );
        // ICMPv6: no ports
        assert_eq!(
            flow_hash(&ipv6(58, a6(), b6(), &[128, 0, 1, 2, 3, 4])),
            tuple_hash(&s, &d, 58, 0, 0)
        );
        // no next header
        assert_eq!(
            flow_hash(&ipv6(59, a6(), b6(), &[])),
            tuple_hash(&s, &d, 59, 0, 0)
        );
        // extension header truncated: protocol is the header we could not read past
        let mut payload = ext(17, 1);
        payload.truncate(1);
        assert_eq!(
            flow_hash(&ipv6(0, a6(), b6(), &payload)),
            tuple_hash(&s, &d, 0, 0, 0)
        );
        // extension header length runs past the end
        let mut payload = ext(17, 0);
        payload[1] = 200;
        assert_eq!(
            flow_hash(&ipv6(0, a6(), b6(), &payload)),
            tuple_hash(&s, &d, 17, 0, 0)
        );
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
        assert_eq!(
            flow_hash(&chain(MAX_EXT_HEADERS)),
            tuple_hash(&s, &d, 17, 1, 2)
        );
        assert_eq!(
            flow_hash(&chain(MAX_EXT_HEADERS + 1)),
            tuple_hash(&s, &d, 60, 0, 0)
        );
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
        assert_eq!(
            flow_hash(&ipv6(44, a6(), b6(), &[])),
            tuple_hash(&s, &d, 44, 0, 0)
        );
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
        assert_eq!(Fnv1a::new().0, 0x811c_9dc5);
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
        assert!(
            counts.iter().all(|&c| (400..=850).contains(&c)),
            "{counts:?}"
        );

        // Sequential source ports from one host (the common case: one client, many sockets).
        let mut counts = [0u32; SHARDS as usize];
        for port in 0..10_000u16 {
            let p = ipv6(6, a6(), b6(), &ports(30_000 + port, 443));
            counts[usize::from(classify(&p).unwrap().shard)] += 1;
        }
        assert!(
            counts.iter().all(|&c| (400..=850).contains(&c)),
            "{counts:?}"
        );
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
        let nets = [
            (Ipv4Addr::new(10, 2, 0, 1), 24),
            (Ipv4Addr::new(198, 18, 0, 0), 15),
        ];
        assert!(is_directed_broadcast(Ipv4Addr::new(10, 2, 0, 255), &nets));
        assert!(is_directed_broadcast(
            Ipv4Addr::new(198, 19, 255, 255),
            &nets
        ));
        assert!(!is_directed_broadcast(
            Ipv4Addr::new(198, 18, 255, 255),
            &nets
        ));
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

    proptest! {
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
