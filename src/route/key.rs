//! The key grammar: agent names as topic words, address words, routing keys
//! (`tunbus.v1.<dst>.<shard>`, `tunbus.v1.all.<sender>`, `tunbus.v1.ctl.…`), binding
//! patterns and exchange names. Pure and allocation-free for the keys of the hot path
//! (built on the stack).

use core::fmt::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Number of flow shards per destination address.
pub const SHARDS: u8 = 16;
/// Prefix of every tunbus v1 routing key.
pub const KEY_PREFIX: &str = "tunbus.v1.";
/// Prefix of a flood key (`tunbus.v1.all.<sender>`).
pub const ALL_PREFIX: &str = "tunbus.v1.all.";
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
/// Binding pattern for every gateway's route announcement (`tunbus.v1.ctl.route.<name>`:
/// its hello, and its bye, published again there by agents that `--advertise`).
pub const ROUTE_PATTERN: &str = "tunbus.v1.ctl.route.*";
/// Prefix of the key of an agent's ping (`tunbus.v1.ctl.ping.<name>`): queue 0 of a native
/// agent binds its own and answers on the reply key the ping names (`agent ping`).
pub const CTL_PING_PREFIX: &str = "tunbus.v1.ctl.ping.";
/// Prefix of a ping's reply key (`tunbus.v1.ctl.pong.<token>`), bound by the one who pings.
pub const CTL_PONG_PREFIX: &str = "tunbus.v1.ctl.pong.";
/// Longest agent name (a topic word) accepted in routing keys, in bytes.
pub const MAX_WORD_LEN: usize = 64;

const KEY_CAP: usize = 96;
/// Longest address word: a full uncompressed IPv6 address, 8 groups of 4 and 7 separators.
const WORD_CAP: usize = 39;

/// Whether `s` can be one word of a topic routing key, as agent names must: 1 to
/// [`MAX_WORD_LEN`] printable ASCII characters, none of them `.`, `*` or `#`.
pub fn is_valid_word(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_WORD_LEN && s.bytes().all(|b| b.is_ascii_graphic() && !matches!(b, b'.' | b'*' | b'#'))
}

/// A fixed-capacity ASCII buffer written through `fmt::Write`; overflow is an error.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct StackStr<const N: usize> {
    buf: [u8; N],
    len: u8,
}

impl<const N: usize> StackStr<N> {
    const fn new() -> Self {
        StackStr { buf: [0; N], len: 0 }
    }

    fn push_str(&mut self, s: &str) -> fmt::Result {
        let start = usize::from(self.len);
        let end = start.checked_add(s.len()).filter(|&e| e <= N && e <= usize::from(u8::MAX)).ok_or(fmt::Error)?;
        self.buf.get_mut(start..end).ok_or(fmt::Error)?.copy_from_slice(s.as_bytes());
        // end <= u8::MAX, checked above.
        self.len = end as u8;
        Ok(())
    }

    fn as_str(&self) -> &str {
        // Only whole `&str`s are ever appended, so the bytes are valid UTF-8.
        core::str::from_utf8(self.buf.get(..usize::from(self.len)).unwrap_or_default()).unwrap_or_default()
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
    let sep = if dashes == 3 && !word.contains("--") { b'.' } else { b':' };
    for b in dst.iter_mut() {
        if *b == b'-' {
            *b = sep;
        }
    }
    let text = core::str::from_utf8(dst).ok()?;
    let ip: IpAddr = if sep == b'.' { IpAddr::V4(text.parse().ok()?) } else { IpAddr::V6(text.parse().ok()?) };
    (address_word(ip).as_str() == word).then_some(ip)
}

/// The topic exchange without a session: RabbitMQ's own `amq.topic`.
pub const DEFAULT_EXCHANGE: &str = "amq.topic";

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
    pub(super) fn build(parts: &[&str]) -> Option<RoutingKey> {
        let mut s = StackStr::<KEY_CAP>::new();
        for p in parts {
            s.push_str(p).ok()?;
        }
        Some(RoutingKey { buf: s.buf, len: s.len })
    }

    /// `tunbus.v1.<dst>.<shard>`, e.g. `tunbus.v1.198-18-0-2.7`, `tunbus.v1.fd00-7b--2.15`.
    pub fn unicast(dst: IpAddr, shard: u8) -> RoutingKey {
        let mut s = StackStr::<KEY_CAP>::new();
        // Cannot fail: at most 10 + 39 + 1 + 3 = 53 bytes.
        let _ = write!(s, "{KEY_PREFIX}{}.{shard}", address_word(dst));
        RoutingKey { buf: s.buf, len: s.len }
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

    /// `tunbus.v1.ctl.route.<name>`: a gateway's advertised prefixes (its hello or bye,
    /// again). `None` if `name` is not valid.
    pub fn route(name: &str) -> Option<RoutingKey> {
        is_valid_word(name).then(|| Self::build(&[KEY_PREFIX, "ctl.route.", name]))?
    }

    /// `tunbus.v1.ctl.ping.<name>`: a ping for agent `name`. `None` if `name` is not valid.
    pub fn ping(name: &str) -> Option<RoutingKey> {
        is_valid_word(name).then(|| Self::build(&[CTL_PING_PREFIX, name]))?
    }

    /// `tunbus.v1.ctl.pong.<token>`: where the answers to one pinger go. `None` if `token`
    /// is not a valid word.
    pub fn pong(token: &str) -> Option<RoutingKey> {
        is_valid_word(token).then(|| Self::build(&[CTL_PONG_PREFIX, token]))?
    }

    /// The key as a string.
    pub fn as_str(&self) -> &str {
        // Built only from whole `&str`s (see `build` and `unicast`).
        core::str::from_utf8(self.buf.get(..usize::from(self.len)).unwrap_or_default()).unwrap_or_default()
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

/// What a tunbus v1 routing key names, read by the grammar above: the inverse of
/// [`RoutingKey`]'s constructors and [`CTL_PROBE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key<'a> {
    /// `tunbus.v1.<dst>.<shard>`.
    Unicast { dst: IpAddr, shard: u8 },
    /// `tunbus.v1.all.<sender>`.
    All { sender: &'a str },
    /// `tunbus.v1.ctl.probe`.
    Probe,
    /// `tunbus.v1.ctl.hello.<name>`.
    Hello { name: &'a str },
    /// `tunbus.v1.ctl.bye.<name>`.
    Bye { name: &'a str },
    /// `tunbus.v1.ctl.route.<name>`.
    Route { name: &'a str },
    /// `tunbus.v1.ctl.ping.<name>`.
    Ping { name: &'a str },
    /// `tunbus.v1.ctl.pong.<token>`.
    Pong { token: &'a str },
}

impl Key<'_> {
    /// Parses `key`; `None` for anything these constructors would not have built
    /// (another prefix, an invalid word, a non-canonical address or shard).
    pub fn parse(key: &str) -> Option<Key<'_>> {
        let rest = key.strip_prefix(KEY_PREFIX)?;
        if key == CTL_PROBE {
            return Some(Key::Probe);
        }
        let word = |w: &'_ str| is_valid_word(w).then_some(());
        if let Some(ctl) = rest.strip_prefix("ctl.") {
            return match ctl.split_once('.')? {
                ("hello", name) => word(name).map(|()| Key::Hello { name }),
                ("bye", name) => word(name).map(|()| Key::Bye { name }),
                ("route", name) => word(name).map(|()| Key::Route { name }),
                ("ping", name) => word(name).map(|()| Key::Ping { name }),
                ("pong", token) => word(token).map(|()| Key::Pong { token }),
                _ => None,
            };
        }
        if let Some(sender) = rest.strip_prefix("all.") {
            return word(sender).map(|()| Key::All { sender });
        }
        RoutingKey::parse_unicast(key).map(|(dst, shard)| Key::Unicast { dst, shard })
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // ---- routing keys ----

    #[test]
    fn keys_parse_back_to_what_built_them() {
        let ip: IpAddr = "fd00:7b::2".parse().unwrap();
        for shard in 0..SHARDS {
            assert_eq!(Key::parse(RoutingKey::unicast(ip, shard).as_str()), Some(Key::Unicast { dst: ip, shard }));
        }
        assert_eq!(Key::parse(RoutingKey::all("h1").unwrap().as_str()), Some(Key::All { sender: "h1" }));
        assert_eq!(Key::parse(RoutingKey::hello("h-2").unwrap().as_str()), Some(Key::Hello { name: "h-2" }));
        assert_eq!(Key::parse(RoutingKey::bye("h_3").unwrap().as_str()), Some(Key::Bye { name: "h_3" }));
        assert_eq!(Key::parse(RoutingKey::route("gw").unwrap().as_str()), Some(Key::Route { name: "gw" }));
        assert_eq!(Key::parse(RoutingKey::ping("h2").unwrap().as_str()), Some(Key::Ping { name: "h2" }));
        assert_eq!(Key::parse(RoutingKey::pong("p1a2b").unwrap().as_str()), Some(Key::Pong { token: "p1a2b" }));
        assert_eq!(RoutingKey::ping("h2").unwrap().as_str(), "tunbus.v1.ctl.ping.h2");
        assert!(RoutingKey::ping("a.b").is_none() && RoutingKey::pong("*").is_none());
        assert_eq!(Key::parse(CTL_PROBE), Some(Key::Probe));
        for bad in [
            "",
            "tunbus.v1.",
            "tunbus.v2.198-18-0-2.1",
            "tunbus.v1.198-18-0-2.16",
            "tunbus.v1.198-18-0-2.07",
            "tunbus.v1.198-18-0-2",
            "tunbus.v1.all.",
            "tunbus.v1.all.a.b",
            "tunbus.v1.all.*",
            "tunbus.v1.ctl.hello.",
            "tunbus.v1.ctl.hello.a.b",
            "tunbus.v1.ctl.probe.x",
            "tunbus.v1.ctl.other.x",
            "tunbus.v1.ctl",
            "fromAgent.a.ip.tun.packet.raw",
            "tunbus.v1.ctl.bye.#",
        ] {
            assert_eq!(Key::parse(bad), None, "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn key_parse_never_panics_and_accepts_only_canonical_keys(key in "[a-z0-9.*#:-]{0,60}") {
            match Key::parse(&key) {
                Some(Key::Unicast { dst, shard }) => prop_assert_eq!(RoutingKey::unicast(dst, shard).to_string(), key.clone()),
                Some(Key::All { sender }) => prop_assert_eq!(RoutingKey::all(sender).map(|k| k.to_string()), Some(key.clone())),
                Some(Key::Hello { name }) => prop_assert_eq!(RoutingKey::hello(name).map(|k| k.to_string()), Some(key.clone())),
                Some(Key::Bye { name }) => prop_assert_eq!(RoutingKey::bye(name).map(|k| k.to_string()), Some(key.clone())),
                Some(Key::Route { name }) => prop_assert_eq!(RoutingKey::route(name).map(|k| k.to_string()), Some(key.clone())),
                Some(Key::Ping { name }) => prop_assert_eq!(RoutingKey::ping(name).map(|k| k.to_string()), Some(key.clone())),
                Some(Key::Pong { token }) => prop_assert_eq!(RoutingKey::pong(token).map(|k| k.to_string()), Some(key.clone())),
                Some(Key::Probe) => prop_assert_eq!(key.as_str(), CTL_PROBE),
                None => {}
            }
        }
    }

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
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 255, "tunbus.v1.ffff-ffff-ffff-ffff-ffff-ffff-ffff-ffff.255"),
            ("::ffff:198.18.0.2", 0, "tunbus.v1.--ffff-c612-2.0"),
            ("0.0.0.0", 0, "tunbus.v1.0-0-0-0.0"),
            ("255.255.255.255", 9, "tunbus.v1.255-255-255-255.9"),
        ];
        for (ip, shard, want) in cases {
            assert_eq!(RoutingKey::unicast(ip.parse().unwrap(), shard).as_str(), want, "{ip}");
        }
    }

    #[test]
    fn all_and_ctl_keys() {
        assert_eq!(RoutingKey::all("agent_1").unwrap().as_str(), "tunbus.v1.all.agent_1");
        assert_eq!(RoutingKey::hello("a-b").unwrap().as_str(), "tunbus.v1.ctl.hello.a-b");
        assert_eq!(RoutingKey::bye("agent_TT").unwrap().as_str(), "tunbus.v1.ctl.bye.agent_TT");
        let longest = "x".repeat(MAX_WORD_LEN);
        assert_eq!(RoutingKey::all(&longest).unwrap().as_str().len(), 14 + MAX_WORD_LEN);
        assert_eq!(RoutingKey::hello(&longest).unwrap().as_str().len(), 20 + MAX_WORD_LEN);
        for bad in ["", "a.b", "a*", "#", "a b", "a\tb", "é", "\n", &"x".repeat(MAX_WORD_LEN + 1)] {
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
        assert_eq!(RoutingKey::parse_unicast("tunbus.v1.fd00-7b--2.15"), Some((ip, 15)));
        assert_eq!(RoutingKey::parse_unicast("tunbus.v1.198-18-0-2.0"), Some(("198.18.0.2".parse().unwrap(), 0)));
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
}
