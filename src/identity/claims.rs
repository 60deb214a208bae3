//! First claim: without a peers file, an address belongs to the first live broker user
//! whose hello claims it.
//!
//! A hello's `user_id` was checked by the broker, so a claim names a real login. A claim
//! stays while its user keeps announcing it (hellos every few seconds) and lapses
//! [`CLAIM_LIFETIME`] after the last one, or at once with the user's bye. A second user's
//! claim of a held address is refused (and reported, so the agent can log it loudly); its
//! other addresses are still granted. The table is bounded ([`MAX_CLAIMS`], and at most
//! [`MAX_PER_HELLO`] addresses of one hello count), so a flood of hellos claiming made-up
//! addresses costs memory once, not without end. Pure: the caller passes the time.
//!
//! Prefixes a gateway advertises (`--advertise`, decision 0027) are claimed the same way
//! ([`Claims::on_advertise`]): the first live user to advertise a prefix holds it, and a
//! prefix that overlaps one another live user holds, or contains an address another live
//! user holds, is refused. A held prefix lets its user send from any address inside it
//! (the hosts behind its gateway).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::Table;
use crate::route::Prefix;

/// How long a claim outlives its user's last hello (three missed hellos and then some).
pub const CLAIM_LIFETIME: Duration = Duration::from_secs(35);
/// Most addresses held at once (a 4000-host lab holds 12 000: IPv4, IPv6, link-local).
pub const MAX_CLAIMS: usize = 65_536;
/// Most addresses one hello claims (an agent announces its prefixes and its link-local).
pub const MAX_PER_HELLO: usize = 64;
/// The holder named when a claim is refused because the table is full.
pub const TABLE_FULL: &str = "(claims table full)";

#[derive(Clone, Debug, PartialEq, Eq)]
struct Claim {
    user: String,
    refreshed: Instant,
}

/// A claim that was refused: `addr` is held by `holder`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub addr: IpAddr,
    pub claimant: String,
    pub holder: String,
}

/// An advertised prefix that was refused: it overlaps `holder`'s.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefusedPrefix {
    pub prefix: Prefix,
    pub claimant: String,
    pub holder: String,
}

/// Most advertised prefixes held at once.
pub const MAX_PREFIX_CLAIMS: usize = 4096;

/// Every address claimed so far, and by whom.
#[derive(Debug, Default)]
pub struct Claims {
    by_addr: HashMap<IpAddr, Claim>,
    /// Advertised prefixes (networks), and who holds them.
    by_prefix: HashMap<Prefix, Claim>,
}

impl Claims {
    pub fn new() -> Claims {
        Claims::default()
    }

    /// `user` announced `addresses` at `now`. Returns the claims refused, and whether the
    /// table changed.
    pub fn on_hello(&mut self, user: &str, addresses: &[IpAddr], now: Instant) -> (Vec<Refused>, bool) {
        let mut refused = Vec::new();
        let mut changed = false;
        for &addr in addresses.iter().take(MAX_PER_HELLO) {
            let full = self.by_addr.len() >= MAX_CLAIMS;
            match self.by_addr.get_mut(&addr) {
                Some(c) if c.user == user => c.refreshed = now,
                Some(c) if now.saturating_duration_since(c.refreshed) < CLAIM_LIFETIME => {
                    refused.push(Refused { addr, claimant: user.to_owned(), holder: c.user.clone() });
                }
                None if full => {
                    refused.push(Refused { addr, claimant: user.to_owned(), holder: TABLE_FULL.to_owned() });
                }
                _ => {
                    self.by_addr.insert(addr, Claim { user: user.to_owned(), refreshed: now });
                    changed = true;
                }
            }
        }
        (refused, changed)
    }

    /// An agent of `user` said goodbye for `addresses`: those claims lapse (other agents
    /// logged in as the same user keep theirs). Returns whether the table changed.
    pub fn on_bye(&mut self, user: &str, addresses: &[IpAddr]) -> bool {
        let before = self.by_addr.len();
        self.by_addr.retain(|a, c| c.user != user || !addresses.contains(a));
        self.by_addr.len() != before
    }

    /// `user` advertised `prefixes` (networks) at `now`. Returns those refused (another live
    /// user holds an overlapping prefix or an address inside), and whether the table changed.
    pub fn on_advertise(&mut self, user: &str, prefixes: &[Prefix], now: Instant) -> (Vec<RefusedPrefix>, bool) {
        let live = |c: &Claim| now.saturating_duration_since(c.refreshed) < CLAIM_LIFETIME;
        let mut refused = Vec::new();
        let mut changed = false;
        for p in prefixes.iter().take(MAX_PER_HELLO) {
            if let Some(c) = self.by_prefix.get_mut(p).filter(|c| c.user == user) {
                c.refreshed = now;
                continue;
            }
            let overlapping = self.by_prefix.iter().find(|(q, c)| c.user != user && live(c) && (q.covers(p) || p.covers(q))).map(|(_, c)| c.user.clone());
            let inside = || self.by_addr.iter().find(|(a, c)| c.user != user && live(c) && p.contains(**a)).map(|(_, c)| c.user.clone());
            let holder = overlapping.or_else(inside).or_else(|| (self.by_prefix.len() >= MAX_PREFIX_CLAIMS).then(|| TABLE_FULL.to_owned()));
            match holder {
                Some(holder) => refused.push(RefusedPrefix { prefix: *p, claimant: user.to_owned(), holder }),
                None => {
                    self.by_prefix.insert(*p, Claim { user: user.to_owned(), refreshed: now });
                    changed = true;
                }
            }
        }
        (refused, changed)
    }

    /// An agent of `user` withdrew `prefixes` (its bye): those claims lapse.
    pub fn on_withdraw(&mut self, user: &str, prefixes: &[Prefix]) -> bool {
        let before = self.by_prefix.len();
        self.by_prefix.retain(|p, c| c.user != user || !prefixes.contains(p));
        self.by_prefix.len() != before
    }

    /// Who holds advertised prefix `p`, if anyone.
    pub fn prefix_holder(&self, p: &Prefix) -> Option<&str> {
        self.by_prefix.get(p).map(|c| c.user.as_str())
    }

    /// Drops the claims whose user has been silent too long. Returns whether any went.
    pub fn expire(&mut self, now: Instant) -> bool {
        let before = self.by_addr.len() + self.by_prefix.len();
        self.by_addr.retain(|_, c| now.saturating_duration_since(c.refreshed) < CLAIM_LIFETIME);
        self.by_prefix.retain(|_, c| now.saturating_duration_since(c.refreshed) < CLAIM_LIFETIME);
        self.by_addr.len() + self.by_prefix.len() != before
    }

    /// How many addresses are held.
    pub fn table_len(&self) -> usize {
        self.by_addr.len()
    }

    /// Who holds `addr`, if anyone.
    pub fn holder(&self, addr: IpAddr) -> Option<&str> {
        self.by_addr.get(&addr).map(|c| c.user.as_str())
    }

    /// The claims as a table: each user and its claimed addresses (host prefixes).
    pub fn table(&self) -> Table {
        let mut users: HashMap<&str, Vec<Prefix>> = HashMap::new();
        for (addr, c) in &self.by_addr {
            let len = if addr.is_ipv4() { 32 } else { 128 };
            users.entry(c.user.as_str()).or_default().push(Prefix { addr: *addr, len });
        }
        for (p, c) in &self.by_prefix {
            users.entry(c.user.as_str()).or_default().push(*p);
        }
        Table::new(users.into_iter().map(|(u, p)| (u.to_owned(), p)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Verdict;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn first_claim_wins_while_its_user_lives() {
        let t0 = Instant::now();
        let mut c = Claims::new();
        let (refused, changed) = c.on_hello("a", &[ip("198.18.0.1"), ip("fd00::1")], t0);
        assert!(refused.is_empty() && changed);
        let (refused, changed) = c.on_hello("rogue", &[ip("198.18.0.1"), ip("198.18.0.66")], t0 + Duration::from_secs(1));
        assert_eq!(refused, vec![Refused { addr: ip("198.18.0.1"), claimant: "rogue".into(), holder: "a".into() }]);
        assert!(changed, "the rogue still gets an address nobody holds");
        let t = c.table();
        assert_eq!(t.check(Some(b"a"), ip("198.18.0.1")), Verdict::Allowed);
        assert_eq!(t.check(Some(b"rogue"), ip("198.18.0.1")), Verdict::Spoofed);
        assert_eq!(t.check(Some(b"rogue"), ip("198.18.0.66")), Verdict::Allowed);
        // a refreshes; later the rogue is still refused.
        c.on_hello("a", &[ip("198.18.0.1")], t0 + Duration::from_secs(30));
        assert_eq!(c.on_hello("rogue", &[ip("198.18.0.1")], t0 + Duration::from_secs(60)).0.len(), 1);
        assert_eq!(c.holder(ip("198.18.0.1")), Some("a"));
    }

    #[test]
    fn claims_lapse_with_silence_and_with_a_bye() {
        let t0 = Instant::now();
        let mut c = Claims::new();
        c.on_hello("a", &[ip("198.18.0.1")], t0);
        assert!(!c.expire(t0 + Duration::from_secs(10)));
        assert!(c.expire(t0 + CLAIM_LIFETIME));
        assert_eq!(c.holder(ip("198.18.0.1")), None);
        c.on_hello("a", &[ip("198.18.0.1"), ip("198.18.0.2")], t0);
        assert!(!c.on_bye("someone else", &[ip("198.18.0.1")]));
        assert!(c.on_bye("a", &[ip("198.18.0.1")]));
        assert_eq!(c.holder(ip("198.18.0.2")), Some("a"), "another agent of the same user keeps its address");
        let (refused, _) = c.on_hello("b", &[ip("198.18.0.1")], t0 + Duration::from_secs(1));
        assert!(refused.is_empty(), "a bye frees the address at once");
        // A silent holder loses the address to the next claimant.
        let (refused, _) = c.on_hello("c", &[ip("198.18.0.1")], t0 + Duration::from_secs(1) + CLAIM_LIFETIME);
        assert!(refused.is_empty());
        assert_eq!(c.holder(ip("198.18.0.1")), Some("c"));
    }

    #[test]
    fn advertised_prefixes_are_claimed_first_come() {
        let p = |s: &str| -> Prefix { s.parse().unwrap() };
        let t0 = Instant::now();
        let mut c = Claims::new();
        c.on_hello("h1", &[ip("198.18.0.1")], t0);
        let (refused, changed) = c.on_advertise("gw", &[p("198.19.50.0/24"), p("fd00:50::/64")], t0);
        assert!(refused.is_empty() && changed);
        assert_eq!(c.table().check(Some(b"gw"), ip("198.19.50.7")), Verdict::Allowed, "hosts behind the gateway");
        assert_eq!(c.table().check(Some(b"h1"), ip("198.19.50.7")), Verdict::Spoofed);
        // Again: refreshed, nothing new.
        assert_eq!(c.on_advertise("gw", &[p("198.19.50.0/24")], t0 + Duration::from_secs(5)), (vec![], false));
        // A rogue: the same prefix, a wider one, a narrower one, one holding h1's address.
        for bad in ["198.19.50.0/24", "198.19.0.0/16", "198.19.50.128/25"] {
            let (refused, changed) = c.on_advertise("rogue", &[p(bad)], t0 + Duration::from_secs(6));
            assert_eq!(refused, vec![RefusedPrefix { prefix: p(bad), claimant: "rogue".into(), holder: "gw".into() }], "{bad}");
            assert!(!changed);
        }
        let (refused, _) = c.on_advertise("rogue", &[p("198.18.0.0/24")], t0 + Duration::from_secs(6));
        assert_eq!(refused[0].holder, "h1");
        assert_eq!(c.prefix_holder(&p("198.19.50.0/24")), Some("gw"));
        // A bye frees it at once; silence after CLAIM_LIFETIME.
        assert!(c.on_withdraw("gw", &[p("198.19.50.0/24")]));
        assert!(c.on_advertise("rogue", &[p("198.19.50.0/24")], t0 + Duration::from_secs(7)).0.is_empty());
        assert!(c.expire(t0 + Duration::from_secs(7) + CLAIM_LIFETIME));
        assert_eq!(c.prefix_holder(&p("198.19.50.0/24")), None);
    }

    #[test]
    fn a_hello_flood_fills_the_table_once_and_no_further() {
        let t0 = Instant::now();
        let mut c = Claims::new();
        let many: Vec<IpAddr> = (0..200u32).map(|i| IpAddr::from(std::net::Ipv4Addr::from(0xc612_0000 + i))).collect();
        c.on_hello("a", &many, t0);
        assert_eq!(c.table_len(), MAX_PER_HELLO, "one hello claims at most MAX_PER_HELLO addresses");
        for i in 0..(MAX_CLAIMS as u32 / 64 + 10) {
            let addrs: Vec<IpAddr> = (0..64u32).map(|j| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i * 64 + j))).collect();
            c.on_hello("flood", &addrs, t0);
        }
        assert_eq!(c.table_len(), MAX_CLAIMS);
        let (refused, changed) = c.on_hello("late", &[ip("fd00::99")], t0);
        assert!(!changed);
        assert_eq!(refused[0].holder, TABLE_FULL);
        // Once the flood's claims lapse, real agents get addresses again.
        c.on_hello("a", &many[..1], t0 + CLAIM_LIFETIME);
        assert!(c.expire(t0 + CLAIM_LIFETIME));
        assert!(c.on_hello("late", &[ip("fd00::99")], t0 + CLAIM_LIFETIME).0.is_empty());
    }
}
