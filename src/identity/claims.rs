//! First claim: without a peers file, an address belongs to the first live broker user
//! whose hello claims it.
//!
//! A hello's `user_id` was checked by the broker, so a claim names a real login. A claim
//! stays while its user keeps announcing it (hellos every few seconds) and lapses
//! [`CLAIM_LIFETIME`] after the last one, or at once with the user's bye. A second user's
//! claim of a held address is refused (and reported, so the agent can log it loudly); its
//! other addresses are still granted. Pure: the caller passes the time.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::Table;
use crate::config::Prefix;

/// How long a claim outlives its user's last hello (three missed hellos and then some).
pub const CLAIM_LIFETIME: Duration = Duration::from_secs(35);

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

/// Every address claimed so far, and by whom.
#[derive(Debug, Default)]
pub struct Claims {
    by_addr: HashMap<IpAddr, Claim>,
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
        for &addr in addresses {
            match self.by_addr.get_mut(&addr) {
                Some(c) if c.user == user => c.refreshed = now,
                Some(c) if now.saturating_duration_since(c.refreshed) < CLAIM_LIFETIME => {
                    refused.push(Refused { addr, claimant: user.to_owned(), holder: c.user.clone() });
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

    /// Drops the claims whose user has been silent too long. Returns whether any went.
    pub fn expire(&mut self, now: Instant) -> bool {
        let before = self.by_addr.len();
        self.by_addr.retain(|_, c| now.saturating_duration_since(c.refreshed) < CLAIM_LIFETIME);
        self.by_addr.len() != before
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
}
