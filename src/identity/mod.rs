//! Who may send what: the broker user behind every message, and the source addresses that
//! user may use (docs/security.md).
//!
//! The broker authenticates every connection and checks the AMQP `user_id` property of
//! every message against the connection's login (RabbitMQ refuses a message that claims
//! another user). A receiver therefore knows who sent a batch, and drops each packet whose
//! inner source address that user may not use, WireGuard's allowed-IPs on a bus:
//!
//! - **strict** (`--peers FILE`, [`peers_file`]): one line per user, its prefixes; each
//!   user may also use its agent's deterministic link-local address;
//! - **first claim** (no file, [`claims`]): a user's hello, whose `user_id` the broker
//!   checked, claims the addresses it lists; a later claim of an address another live user
//!   holds is refused and logged, and that user's packets from it are dropped.
//!
//! Pure: the tables are plain data. [`Trust`] shares them between an agent's workers: a
//! version number they compare once per batch, and a snapshot they take again (one `Arc`
//! clone, no allocation) only when it changed, so the hot path takes no lock.

pub mod claims;
pub mod peers_file;

use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::packet::Prefix;

/// What a receiver concludes about one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The sender may use this source address.
    Allowed,
    /// The message carried no `user_id`: nobody vouches for it.
    NoIdentity,
    /// The source address is not one the sender's user may use.
    Spoofed,
}

/// The deterministic link-local address of agent `name` in `session` (also
/// `AgentConfig::link_local`): `fe80::` + 64 bits of FNV-1a of `session/name`.
pub fn link_local(session: Option<&str>, name: &str) -> Ipv6Addr {
    let h = crate::util::fnv1a64(&[session.unwrap_or("").as_bytes(), b"/", name.as_bytes()]);
    Ipv6Addr::from((0xfe80u128 << 112) | u128::from(h.max(1)))
}

/// The deterministic MAC address of L2 agent `name` in `session` (also `AgentConfig::mac`):
/// `02` (locally administered, unicast) and 40 bits of FNV-1a of `session/name`.
pub fn mac(session: Option<&str>, name: &str) -> crate::packet::ethernet::Mac {
    let h = crate::util::fnv1a64(&[session.unwrap_or("").as_bytes(), b"/", name.as_bytes()]).to_be_bytes();
    crate::packet::ethernet::Mac([0x02, h[0], h[1], h[2], h[3], h[4]])
}

/// The identity tables hold MACs as IPv6 addresses in RFC 6666's discard-only prefix
/// `100::/64` (`100::` + the 48 bits of the MAC), which no packet may carry as a source:
/// strict peers files, first claims and their expiry serve L2 sessions unchanged.
pub fn mac_address(mac: crate::packet::ethernet::Mac) -> IpAddr {
    let o = mac.octets();
    let low = u64::from_be_bytes([0, 0, o[0], o[1], o[2], o[3], o[4], o[5]]);
    IpAddr::V6(Ipv6Addr::from((0x0100u128 << 112) | u128::from(low)))
}

/// The prefix of the MACs that share their first `bits` bits with `mac` (`02:aa:00:00:00:00/16`
/// in a peers file: every MAC behind a bridge whose vendor part is `02:aa`).
pub fn mac_prefix(mac: crate::packet::ethernet::Mac, bits: u8) -> Prefix {
    Prefix { addr: mac_address(mac), len: 80 + bits.min(48) }
}

/// The agent name behind broker user `user` in `session`: provisioned users are
/// `<session>.<agent>`; any other user name is taken as the agent's name itself.
pub fn agent_of_user<'a>(session: Option<&str>, user: &'a str) -> &'a str {
    match session {
        Some(s) => user.strip_prefix(s).and_then(|r| r.strip_prefix('.')).filter(|r| !r.is_empty()).unwrap_or(user),
        None => user,
    }
}

/// Sources no sender may use: unspecified, multicast, loopback, broadcast. (Link-local
/// sources are allowed per user, like any other address.)
pub fn never_a_source(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => a.is_unspecified() || a.is_multicast() || a.is_loopback() || a.is_broadcast(),
        IpAddr::V6(a) => a.is_unspecified() || a.is_multicast() || a.is_loopback(),
    }
}

/// Who may use which addresses, as one immutable snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    /// (user, its prefixes), sorted by user.
    users: Vec<(String, Vec<Prefix>)>,
}

impl Table {
    pub fn new(mut users: Vec<(String, Vec<Prefix>)>) -> Table {
        users.sort_by(|a, b| a.0.cmp(&b.0));
        users.dedup_by(|b, a| {
            if a.0 == b.0 {
                a.1.append(&mut b.1);
                true
            } else {
                false
            }
        });
        Table { users }
    }

    /// The prefixes of `user`, if the table knows the user.
    pub fn prefixes(&self, user: &[u8]) -> Option<&[Prefix]> {
        self.users.binary_search_by(|(u, _)| u.as_bytes().cmp(user)).ok().map(|i| self.users[i].1.as_slice())
    }

    /// The verdict on a packet from `src` in a message of `user` (`None`: no `user_id`).
    pub fn check(&self, user: Option<&[u8]>, src: IpAddr) -> Verdict {
        let Some(user) = user else { return Verdict::NoIdentity };
        if never_a_source(src) {
            return Verdict::Spoofed;
        }
        match self.prefixes(user) {
            Some(ps) if ps.iter().any(|p| p.contains(src)) => Verdict::Allowed,
            _ => Verdict::Spoofed,
        }
    }

    pub fn users(&self) -> impl Iterator<Item = (&str, &[Prefix])> {
        self.users.iter().map(|(u, p)| (u.as_str(), p.as_slice()))
    }
}

/// How an agent checks what it receives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Only the users and prefixes of a peers file (plus each user's link-local address).
    Strict(Table),
    /// Addresses claimed by hellos, first claim wins.
    FirstClaim,
    /// No check (`--no-identity-check`): every packet is accepted.
    Off,
}

/// The table an agent's workers check against, shared and versioned.
#[derive(Debug)]
pub struct Trust {
    mode: ModeKind,
    version: AtomicU64,
    table: RwLock<Arc<Table>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ModeKind {
    Check,
    Off,
}

impl Trust {
    pub fn new(mode: &Mode) -> Arc<Trust> {
        let (kind, table) = match mode {
            Mode::Strict(t) => (ModeKind::Check, t.clone()),
            Mode::FirstClaim => (ModeKind::Check, Table::default()),
            Mode::Off => (ModeKind::Off, Table::default()),
        };
        Arc::new(Trust { mode: kind, version: AtomicU64::new(1), table: RwLock::new(Arc::new(table)) })
    }

    pub fn checks(&self) -> bool {
        self.mode == ModeKind::Check
    }

    /// Replaces the table (first-claim mode, after a hello or a bye changed it).
    pub fn publish(&self, table: Table) {
        if let Ok(mut t) = self.table.write() {
            *t = Arc::new(table);
        }
        self.version.fetch_add(1, Ordering::Release);
    }

    /// A worker's view, refreshed by [`View::refresh`].
    pub fn view(self: &Arc<Trust>) -> View {
        let table = self.table.read().map(|t| t.clone()).unwrap_or_default();
        View { trust: self.clone(), version: self.version.load(Ordering::Acquire), table }
    }
}

/// One worker's copy of the table.
#[derive(Debug)]
pub struct View {
    trust: Arc<Trust>,
    version: u64,
    table: Arc<Table>,
}

impl View {
    /// Takes the newest table if it changed (one atomic load; an `Arc` clone when it did).
    #[inline]
    pub fn refresh(&mut self) {
        let v = self.trust.version.load(Ordering::Acquire);
        if v != self.version {
            if let Ok(t) = self.trust.table.read() {
                self.table = t.clone();
            }
            self.version = v;
        }
    }

    pub fn checks(&self) -> bool {
        self.trust.checks()
    }

    #[inline]
    pub fn check(&self, user: Option<&[u8]>, src: IpAddr) -> Verdict {
        self.sender(user).check(src)
    }

    /// The checker for one message's sender: the user is looked up once, then each
    /// source costs a scan of that user's few prefixes.
    #[inline]
    pub fn sender(&self, user: Option<&[u8]>) -> Sender<'_> {
        if !self.trust.checks() {
            return Sender::Anyone;
        }
        match user {
            None => Sender::Unsigned,
            Some(u) => Sender::User(self.table.prefixes(u).unwrap_or(&[])),
        }
    }
}

/// What one message's sender may use.
#[derive(Clone, Copy, Debug)]
pub enum Sender<'a> {
    /// Checks are off.
    Anyone,
    /// The message had no `user_id`.
    Unsigned,
    /// A user and its prefixes (none when the table does not know it).
    User(&'a [Prefix]),
}

impl Sender<'_> {
    /// The verdict on a packet from `src`. Always inlined: the receiver calls it for every
    /// new source in a batch, and out of line the address goes through memory.
    #[inline(always)]
    pub fn check(&self, src: IpAddr) -> Verdict {
        match self {
            Sender::Anyone => Verdict::Allowed,
            Sender::Unsigned => Verdict::NoIdentity,
            Sender::User(ps) => {
                if !never_a_source(src) && ps.iter().any(|p| p.contains(src)) {
                    Verdict::Allowed
                } else {
                    Verdict::Spoofed
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    #[test]
    fn tables_decide_per_user_and_source() {
        let t = Table::new(vec![
            ("a".into(), vec![p("198.18.0.1/32")]),
            ("b".into(), vec![p("198.18.0.2/32"), p("fd00::2/128")]),
            ("a".into(), vec![p("fd00::1/128")]),
        ]);
        let a: IpAddr = "198.18.0.1".parse().unwrap();
        assert_eq!(t.check(Some(b"a"), a), Verdict::Allowed);
        assert_eq!(t.check(Some(b"a"), "fd00::1".parse().unwrap()), Verdict::Allowed, "lines of one user merge");
        assert_eq!(t.check(Some(b"b"), a), Verdict::Spoofed);
        assert_eq!(t.check(Some(b"rogue"), a), Verdict::Spoofed);
        assert_eq!(t.check(None, a), Verdict::NoIdentity);
        assert_eq!(t.check(Some(b"a"), "0.0.0.0".parse().unwrap()), Verdict::Spoofed);
        let all = Table::new(vec![("x".into(), vec![p("0.0.0.0/0")])]);
        assert_eq!(all.check(Some(b"x"), "224.0.0.1".parse().unwrap()), Verdict::Spoofed, "never a multicast source");
    }

    #[test]
    fn views_follow_the_shared_table() {
        let trust = Trust::new(&Mode::FirstClaim);
        let mut v = trust.view();
        let a: IpAddr = "198.18.0.1".parse().unwrap();
        assert_eq!(v.check(Some(b"u"), a), Verdict::Spoofed, "nothing claimed yet");
        trust.publish(Table::new(vec![("u".into(), vec![p("198.18.0.1/32")])]));
        assert_eq!(v.check(Some(b"u"), a), Verdict::Spoofed, "until refreshed");
        v.refresh();
        assert_eq!(v.check(Some(b"u"), a), Verdict::Allowed);
        let off = Trust::new(&Mode::Off).view();
        assert_eq!(off.check(None, a), Verdict::Allowed);
    }

    #[test]
    fn users_map_to_agents() {
        assert_eq!(agent_of_user(Some("lab"), "lab.h1"), "h1");
        assert_eq!(agent_of_user(Some("lab"), "h1"), "h1");
        assert_eq!(agent_of_user(Some("lab"), "lab."), "lab.");
        assert_eq!(agent_of_user(None, "lab.h1"), "lab.h1");
        assert_eq!(link_local(Some("s"), "h1"), link_local(Some("s"), "h1"));
        assert_ne!(link_local(Some("s"), "h1"), link_local(None, "h1"));
        assert_ne!(link_local(Some("s"), "h1"), link_local(Some("s"), "h2"));
    }
}
