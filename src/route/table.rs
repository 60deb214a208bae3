//! Advertised prefixes (subnet routers, issue #25): which agent a packet for an address no
//! agent owns goes to (docs/decisions/0027-advertised-prefixes.md).
//!
//! A gateway agent announces the prefixes it routes for (`agent connect --advertise
//! PREFIX`) in its hello, which it also publishes on `tunbus.v1.ctl.route.<name>`; queue 0
//! of every native agent binds `tunbus.v1.ctl.route.*` and keeps a [`Routes`] from what it
//! hears. The broker cannot match a destination against prefixes (a topic key is words,
//! not bits), so the **sender** does: it looks the destination up in the compiled
//! [`Table`] (longest prefix wins) and publishes to the chosen gateway's own address key,
//! `tunbus.v1.<gateway address>.<shard>`, which the gateway already binds. No binding per
//! prefix, no key grammar of its own; the gateway writes what it receives into its TUN and
//! its kernel forwards it.
//!
//! Between advertisers of the same prefix, the one with the lowest agent name (byte order)
//! wins, the others stand by: every agent picks the same gateway, so a flow never
//! alternates between two. An advertiser goes with its bye (from the broker user that
//! announced it) or [`ROUTE_LIFETIME`] after its last announcement; the next one takes over
//! at once. Pure: the caller passes the time; [`RouteShare`] hands compiled tables to the
//! queue workers the way `identity::Trust` does (a version they compare, an `Arc` they take
//! again when it changed).
//!
//! Beside what is heard, an agent may be given [`StaticRoute`]s (`agent connect --route
//! PREFIX=NEXTHOP`, the hosts of a routed lab): a next hop, as `ip route add PREFIX via
//! NEXTHOP` gives one. Packets to PREFIX go to the key of the agent owning NEXTHOP; a static
//! route never expires and beats an advertisement of the same prefix.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use super::Prefix;

/// How long an advertisement outlives its advertiser's last announcement: three hellos
/// (every 5 s) missed, and a second of slack.
pub const ROUTE_LIFETIME: Duration = Duration::from_secs(16);
/// Most prefixes one agent's advertisement counts (the rest are left out).
pub const MAX_PER_AGENT: usize = 64;
/// Most advertisers kept: a flood of made-up agents costs memory once.
pub const MAX_ADVERTISERS: usize = 1024;

/// Whether a prefix may be advertised at all: not a default route, not multicast, not
/// loopback, not link-local (those are never forwarded by a router).
pub fn advertisable(p: &Prefix) -> Result<(), String> {
    let net = p.network();
    if p.len == 0 {
        return Err(format!("{p} is a default route; advertise the networks behind the gateway instead"));
    }
    let bad = match net {
        IpAddr::V4(a) => a.is_multicast() || a.is_loopback() || a.is_link_local() || a.is_broadcast(),
        IpAddr::V6(a) => a.is_multicast() || a.is_loopback() || a.is_unicast_link_local(),
    };
    if bad {
        return Err(format!("{p} is multicast, loopback or link-local: routers do not forward it"));
    }
    Ok(())
}

/// A prefix as a network (host bits cleared): `192.168.50.7/24` → `192.168.50.0/24`.
pub fn network_of(p: &Prefix) -> Prefix {
    Prefix { addr: p.network(), len: p.len }
}

/// A route this agent was given: packets to `prefix` go to the agent that owns `via`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StaticRoute {
    /// A network (host bits cleared).
    pub prefix: Prefix,
    pub via: IpAddr,
}

impl std::str::FromStr for StaticRoute {
    type Err = String;

    /// `PREFIX=NEXTHOP`: `198.18.2.0/24=198.18.1.254`, `fd00:7b:2::/64=fd00:7b:1::fe`.
    fn from_str(s: &str) -> Result<StaticRoute, String> {
        let (prefix, via) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected PREFIX=NEXTHOP, e.g. 198.18.2.0/24=198.18.1.254"))?;
        let prefix: Prefix = prefix.trim().parse().map_err(|e| format!("{s:?}: {e}"))?;
        let via: IpAddr = via.trim().parse().map_err(|e| format!("{s:?}: the next hop {via:?} is not an address ({e})"))?;
        if prefix.len == 0 {
            return Err(format!("{s:?}: a default route into the bus would take all of the host's traffic; give the networks behind the next hop"));
        }
        advertisable(&prefix).map_err(|e| format!("{s:?}: {e}"))?;
        if prefix.addr.is_ipv4() != via.is_ipv4() {
            return Err(format!("{s:?}: the prefix and the next hop are of different families"));
        }
        Ok(StaticRoute { prefix: network_of(&prefix), via })
    }
}

impl std::fmt::Display for StaticRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}", self.prefix, self.via)
    }
}

/// The name a static route's gateway has in a compiled table.
pub const STATIC: &str = "(--route)";

/// One agent's advertisement.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Advertiser {
    /// The broker user that announced it (only its bye withdraws it).
    user: Option<String>,
    /// The gateway's own address whose key it binds: where packets for its prefixes go.
    via: IpAddr,
    /// Its consumer queues (for the key's shard).
    queues: u8,
    /// Networks, sorted, without duplicates.
    prefixes: Vec<Prefix>,
    heard: Instant,
}

/// Every advertisement heard, by agent name.
#[derive(Debug, Default)]
pub struct Routes {
    own: String,
    statics: Vec<StaticRoute>,
    by_agent: BTreeMap<String, Advertiser>,
}

/// What an announcement says, once parsed.
#[derive(Clone, Debug)]
pub struct Announcement<'a> {
    pub name: &'a str,
    /// The broker user that published it, when the message said.
    pub user: Option<&'a str>,
    /// The announcer's own addresses (its hello's `addresses`).
    pub addresses: &'a [Prefix],
    pub queues: usize,
    /// The prefixes accepted from its advertisement (the caller has judged them).
    pub advertise: &'a [Prefix],
}

/// The address of `addresses` a gateway's packets are sent to: the first global one
/// (neither link-local nor unspecified nor multicast), else none.
pub fn via_of(addresses: &[Prefix]) -> Option<IpAddr> {
    addresses.iter().map(|p| p.addr).find(|a| match a {
        IpAddr::V4(v) => !v.is_link_local() && !v.is_unspecified() && !v.is_multicast() && !v.is_broadcast(),
        IpAddr::V6(v) => !v.is_unicast_link_local() && !v.is_unspecified() && !v.is_multicast(),
    })
}

impl Routes {
    /// The routes heard by agent `own` (its own advertisements are left out: it does not
    /// route to itself).
    pub fn new(own: &str) -> Routes {
        Routes { own: own.to_owned(), statics: Vec::new(), by_agent: BTreeMap::new() }
    }

    /// With the routes this agent was given, which never expire.
    pub fn with_static(self, statics: &[StaticRoute]) -> Routes {
        Routes { statics: statics.to_vec(), ..self }
    }

    /// An announcement heard at `now`. An empty advertisement withdraws the agent's
    /// routes. Returns whether the compiled table may have changed.
    pub fn on_announcement(&mut self, a: &Announcement<'_>, now: Instant) -> bool {
        if a.name == self.own {
            return false;
        }
        let mut prefixes: Vec<Prefix> = a.advertise.iter().take(MAX_PER_AGENT).filter(|p| advertisable(p).is_ok()).map(network_of).collect();
        prefixes.sort_by_key(sort_key);
        prefixes.dedup();
        let via = via_of(a.addresses);
        let (Some(via), false) = (via, prefixes.is_empty()) else {
            return self.by_agent.remove(a.name).is_some();
        };
        let queues = u8::try_from(a.queues).ok().filter(|q| (1..=super::SHARDS).contains(q)).unwrap_or(1);
        let user = a.user.map(str::to_owned);
        let full = self.by_agent.len() >= MAX_ADVERTISERS;
        match self.by_agent.get_mut(a.name) {
            Some(old) => {
                let changed = old.via != via || old.queues != queues || old.prefixes != prefixes || old.user != user;
                *old = Advertiser { user, via, queues, prefixes, heard: now };
                changed
            }
            None if full => false,
            None => {
                self.by_agent.insert(a.name.to_owned(), Advertiser { user, via, queues, prefixes, heard: now });
                true
            }
        }
    }

    /// Whether agent `name` has routes here.
    pub fn knows(&self, name: &str) -> bool {
        self.by_agent.contains_key(name)
    }

    /// Agent `name`, logged in as `user`, said goodbye: its routes go (a bye from another
    /// user is ignored). Returns whether any went.
    pub fn on_bye(&mut self, name: &str, user: Option<&str>) -> bool {
        match self.by_agent.get(name) {
            Some(a) if a.user.as_deref() == user => self.by_agent.remove(name).is_some(),
            _ => false,
        }
    }

    /// Drops the advertisers silent for [`ROUTE_LIFETIME`]. Returns whether any went.
    pub fn expire(&mut self, now: Instant) -> bool {
        let before = self.by_agent.len();
        self.by_agent.retain(|_, a| now.saturating_duration_since(a.heard) < ROUTE_LIFETIME);
        self.by_agent.len() != before
    }

    /// The table senders look destinations up in.
    pub fn compile(&self) -> Table {
        let mut routes: Vec<Route> = Vec::new();
        for s in &self.statics {
            if !routes.iter().any(|r| r.prefix == s.prefix) {
                routes.push(Route { prefix: s.prefix, gateway: STATIC.to_owned(), via: s.via, queues: None, standby: Vec::new() });
            }
        }
        // By name: the first advertiser of a prefix is the lowest name, and wins.
        for (name, a) in &self.by_agent {
            for p in &a.prefixes {
                match routes.iter_mut().find(|r| r.prefix == *p) {
                    Some(r) => r.standby.push(name.clone()),
                    None => routes.push(Route { prefix: *p, gateway: name.clone(), via: a.via, queues: Some(a.queues), standby: Vec::new() }),
                }
            }
        }
        // Longest first: the first route that contains a destination is the longest match.
        routes.sort_by_key(|r| sort_key(&r.prefix));
        Table { routes }
    }
}

/// Longest prefix first, then by family and address.
fn sort_key(p: &Prefix) -> (std::cmp::Reverse<u8>, IpAddr) {
    (std::cmp::Reverse(p.len), p.addr)
}

/// One prefix and the gateway chosen for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub prefix: Prefix,
    /// The winning advertiser (lowest name).
    pub gateway: String,
    /// Its address whose key packets go to.
    pub via: IpAddr,
    /// Its queue count, from its hello (`None` for a static route: the senders' peer table
    /// knows it, or the key keeps the whole shard).
    pub queues: Option<u8>,
    /// The other advertisers of the same prefix, in the order they would take over.
    pub standby: Vec<String>,
}

/// The compiled routes, longest prefix first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    routes: Vec<Route>,
}

impl Table {
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The route of `dst`: the longest advertised prefix that contains it.
    #[inline]
    pub fn lookup(&self, dst: IpAddr) -> Option<&Route> {
        self.routes.iter().find(|r| r.prefix.contains(dst))
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }
}

/// The compiled table, shared by an agent's workers and its route installer.
#[derive(Debug, Default)]
pub struct RouteShare {
    version: AtomicU64,
    table: RwLock<Arc<Table>>,
}

impl RouteShare {
    pub fn new() -> Arc<RouteShare> {
        Arc::new(RouteShare::default())
    }

    /// Replaces the table.
    pub fn publish(&self, table: Table) {
        if let Ok(mut t) = self.table.write() {
            *t = Arc::new(table);
        }
        self.version.fetch_add(1, Ordering::Release);
    }

    /// The current version (changes with every publication).
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// The current table.
    pub fn table(&self) -> Arc<Table> {
        self.table.read().map(|t| t.clone()).unwrap_or_default()
    }

    /// A worker's view, refreshed by [`RouteView::refresh`].
    pub fn view(self: &Arc<RouteShare>) -> RouteView {
        RouteView { share: self.clone(), version: self.version(), table: self.table() }
    }
}

/// One worker's copy of the table.
#[derive(Debug)]
pub struct RouteView {
    share: Arc<RouteShare>,
    version: u64,
    table: Arc<Table>,
}

impl RouteView {
    /// Takes the newest table if it changed (one atomic load). Returns the version.
    #[inline]
    pub fn refresh(&mut self) -> u64 {
        let v = self.share.version.load(Ordering::Acquire);
        if v != self.version {
            self.table = self.share.table();
            self.version = v;
        }
        v
    }

    #[inline]
    pub fn table(&self) -> &Table {
        &self.table
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

    fn announce(r: &mut Routes, name: &str, addr: &str, adv: &[&str], now: Instant) -> bool {
        let addresses = [p("fe80::1/64"), p(addr)];
        let advertise: Vec<Prefix> = adv.iter().map(|s| p(s)).collect();
        r.on_announcement(&Announcement { name, user: Some(name), addresses: &addresses, queues: 2, advertise: &advertise }, now)
    }

    #[test]
    fn longest_prefix_wins_and_its_gateway_is_addressed_by_its_own_address() {
        let t0 = Instant::now();
        let mut r = Routes::new("me");
        assert!(r.compile().is_empty());
        assert!(announce(&mut r, "wide", "198.18.0.9/24", &["198.19.0.0/16"], t0));
        assert!(announce(&mut r, "narrow", "198.18.0.10/24", &["198.19.50.7/24", "fd00:50::/64"], t0));
        let t = r.compile();
        let hit = t.lookup(ip("198.19.50.2")).expect("a route");
        assert_eq!((hit.gateway.as_str(), hit.prefix, hit.via, hit.queues), ("narrow", p("198.19.50.0/24"), ip("198.18.0.10"), Some(2)));
        assert_eq!(t.lookup(ip("198.19.51.2")).expect("a route").gateway, "wide");
        assert_eq!(t.lookup(ip("fd00:50::7")).expect("a route").gateway, "narrow");
        assert!(t.lookup(ip("198.18.0.3")).is_none());
        assert!(t.lookup(ip("fd00:51::7")).is_none());
        // The same announcement again changes nothing.
        assert!(!announce(&mut r, "narrow", "198.18.0.10/24", &["fd00:50::/64", "198.19.50.0/24"], t0));
    }

    #[test]
    fn equal_prefixes_go_to_the_lowest_name_and_fail_over() {
        let t0 = Instant::now();
        let mut r = Routes::new("me");
        announce(&mut r, "gw-b", "198.18.0.2/24", &["198.19.1.0/24"], t0);
        announce(&mut r, "gw-a", "198.18.0.1/24", &["198.19.1.0/24"], t0 + Duration::from_secs(1));
        let t = r.compile();
        let route = t.lookup(ip("198.19.1.1")).expect("a route");
        assert_eq!(route.gateway, "gw-a", "lowest name, whoever came first");
        assert_eq!(route.standby, vec!["gw-b".to_owned()]);
        // A bye from another user is ignored; from its own, gw-a goes and gw-b takes over.
        assert!(!r.on_bye("gw-a", Some("rogue")));
        assert!(r.on_bye("gw-a", Some("gw-a")));
        assert_eq!(r.compile().lookup(ip("198.19.1.1")).expect("a route").gateway, "gw-b");
        // gw-a comes back, then falls silent: it goes ROUTE_LIFETIME after its last word.
        announce(&mut r, "gw-a", "198.18.0.1/24", &["198.19.1.0/24"], t0 + Duration::from_secs(2));
        announce(&mut r, "gw-b", "198.18.0.2/24", &["198.19.1.0/24"], t0 + Duration::from_secs(10));
        assert!(!r.expire(t0 + Duration::from_secs(2) + ROUTE_LIFETIME - Duration::from_millis(1)));
        assert_eq!(r.compile().lookup(ip("198.19.1.1")).expect("a route").gateway, "gw-a");
        assert!(r.expire(t0 + Duration::from_secs(2) + ROUTE_LIFETIME));
        assert_eq!(r.compile().lookup(ip("198.19.1.1")).expect("a route").gateway, "gw-b");
        // An empty advertisement withdraws.
        assert!(announce(&mut r, "gw-b", "198.18.0.2/24", &[], t0 + Duration::from_secs(11)));
        assert!(r.compile().is_empty());
    }

    #[test]
    fn what_cannot_be_routed_is_left_out() {
        let t0 = Instant::now();
        let mut r = Routes::new("me");
        // Its own advertisement, a default route, multicast, link-local: nothing.
        assert!(!announce(&mut r, "me", "198.18.0.1/24", &["198.19.0.0/24"], t0));
        assert!(!announce(&mut r, "gw", "198.18.0.2/24", &["0.0.0.0/0", "224.0.0.0/4", "fe80::/10", "127.0.0.0/8", "::/0"], t0));
        // No global address to send to: nothing.
        let ll = [p("fe80::9/64")];
        let adv = [p("198.19.0.0/24")];
        assert!(!r.on_announcement(&Announcement { name: "gw", user: None, addresses: &ll, queues: 1, advertise: &adv }, t0));
        assert!(r.compile().is_empty());
        for bad in ["0.0.0.0/0", "224.1.2.0/24", "fe80::/64", "ff02::/16", "127.0.0.0/8", "169.254.0.0/16"] {
            assert!(advertisable(&p(bad)).is_err(), "{bad}");
        }
        assert!(advertisable(&p("198.19.0.0/24")).is_ok());
        // At most MAX_PER_AGENT prefixes of one advertisement count.
        let many: Vec<String> = (0..200u32).map(|i| format!("10.{}.{}.0/24", i / 256, i % 256)).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        announce(&mut r, "big", "198.18.0.3/24", &many, t0);
        assert_eq!(r.compile().routes().len(), MAX_PER_AGENT);
    }

    #[test]
    fn the_advertiser_table_is_bounded() {
        let t0 = Instant::now();
        let mut r = Routes::new("me");
        for i in 0..(MAX_ADVERTISERS + 10) {
            announce(&mut r, &format!("a{i}"), "198.18.0.2/24", &["198.19.0.0/24"], t0);
        }
        assert_eq!(r.by_agent.len(), MAX_ADVERTISERS);
        assert!(r.expire(t0 + ROUTE_LIFETIME));
        assert!(announce(&mut r, "late", "198.18.0.2/24", &["198.19.0.0/24"], t0 + ROUTE_LIFETIME));
    }

    #[test]
    fn views_follow_the_share() {
        let share = RouteShare::new();
        let mut v = share.view();
        assert!(v.table().is_empty());
        let mut r = Routes::new("me");
        announce(&mut r, "gw", "198.18.0.2/24", &["198.19.0.0/24"], Instant::now());
        share.publish(r.compile());
        assert!(v.table().is_empty(), "until refreshed");
        let v1 = v.refresh();
        assert_eq!(v.table().lookup(ip("198.19.0.1")).expect("a route").gateway, "gw");
        assert_eq!(v.refresh(), v1);
    }

    #[test]
    fn static_routes_never_expire_and_beat_advertisements() {
        let t0 = Instant::now();
        let statics: Vec<StaticRoute> = ["198.19.2.7/24=198.19.1.254", "fd00:7b:2::/64=fd00:7b:1::fe"].iter().map(|s| s.parse().unwrap()).collect();
        assert_eq!(statics[0].prefix, p("198.19.2.0/24"), "kept as a network");
        assert_eq!(statics[0].to_string(), "198.19.2.0/24=198.19.1.254");
        let mut r = Routes::new("me").with_static(&statics);
        let t = r.compile();
        let hop = t.lookup(ip("198.19.2.9")).expect("a route");
        assert_eq!((hop.gateway.as_str(), hop.via, hop.queues), (STATIC, ip("198.19.1.254"), None));
        assert_eq!(t.lookup(ip("fd00:7b:2::9")).expect("a route").via, ip("fd00:7b:1::fe"));
        assert!(t.lookup(ip("198.19.1.9")).is_none(), "its own subnet is not routed");
        // An advertisement of the same prefix stands behind it; a longer one wins.
        announce(&mut r, "gw", "198.18.0.2/24", &["198.19.2.0/24", "198.19.2.128/25"], t0);
        let t = r.compile();
        assert_eq!(t.lookup(ip("198.19.2.9")).expect("a route").gateway, STATIC);
        assert_eq!(t.lookup(ip("198.19.2.200")).expect("a route").gateway, "gw");
        assert!(r.expire(t0 + ROUTE_LIFETIME));
        assert_eq!(r.compile().routes().len(), 2, "the static routes stay");
        for (bad, says) in [
            ("198.19.2.0/24", "PREFIX=NEXTHOP"),
            ("198.19.2.0/24=fd00::1", "different families"),
            ("0.0.0.0/0=198.19.1.1", "give the networks behind the next hop"),
            ("198.19.2.0/24=router", "not an address"),
            ("198.19.2.0/33=198.19.1.1", "198.19.2.0/33"),
        ] {
            let e = bad.parse::<StaticRoute>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    /// A reference: the longest prefix containing `dst`, lowest name among equals.
    fn reference(ads: &[(String, Vec<Prefix>)], dst: IpAddr) -> Option<(Prefix, String)> {
        let mut best: Option<(Prefix, String)> = None;
        for (name, ps) in ads {
            for q in ps.iter().map(network_of).filter(|q| advertisable(q).is_ok() && q.contains(dst)) {
                let better = match &best {
                    None => true,
                    Some((b, bn)) => q.len > b.len || (q.len == b.len && name < bn),
                };
                if better {
                    best = Some((q, name.clone()));
                }
            }
        }
        best
    }

    proptest! {
        #[test]
        fn lookup_agrees_with_a_reference(
            ads in proptest::collection::vec((0u8..6, proptest::collection::vec((any::<u32>(), 1u8..=32), 0..6)), 0..8),
            dsts in proptest::collection::vec(any::<u32>(), 1..20),
        ) {
            // Addresses in a small space so that prefixes overlap often.
            let squeeze = |a: u32| 0xC612_0000 | (a & 0x0000_0fff);
            let ads: Vec<(String, Vec<Prefix>)> = ads.into_iter().map(|(n, ps)| {
                (format!("gw{n}"), ps.into_iter().map(|(a, l)| Prefix { addr: IpAddr::V4(squeeze(a).into()), len: l.max(16) }).collect())
            }).collect();
            let t0 = Instant::now();
            let mut r = Routes::new("me");
            let mut merged: BTreeMap<String, Vec<Prefix>> = BTreeMap::new();
            for (name, ps) in &ads {
                // A later announcement of the same agent replaces its earlier one.
                let addresses = [p("198.18.255.1/24")];
                r.on_announcement(&Announcement { name, user: None, addresses: &addresses, queues: 1, advertise: ps }, t0);
                merged.insert(name.clone(), ps.iter().take(MAX_PER_AGENT).copied().collect());
            }
            let merged: Vec<(String, Vec<Prefix>)> = merged.into_iter().collect();
            let t = r.compile();
            for d in dsts {
                let dst = IpAddr::V4(squeeze(d).into());
                let got = t.lookup(dst).map(|r| (r.prefix, r.gateway.clone()));
                prop_assert_eq!(got, reference(&merged, dst));
            }
        }
    }
}
