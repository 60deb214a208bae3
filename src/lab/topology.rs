//! `agent lab --topology FILE`: which lab hosts are linked, and how each link behaves.
//! Pure: the file is parsed and checked here, and turned into each host's emulation.
//!
//! ```yaml
//! hosts: 3                  # h1, h2, h3
//! links:
//!   - between: [h1, h2]
//!     emulate: delay 10ms loss 1%
//!   - between: [h2, h3]     # a plain link
//! ```
//! A link's `emulate` (tc-netem words, `emulate::spec`) applies in each direction, as netem
//! on both ends of a cable: `delay 10ms` makes a 20 ms round trip. Hosts without a link
//! cannot reach each other: each drops what it would send to the other (counted as
//! `emulated`). Broadcast and multicast are not filtered.
//!
//! A **routed** topology has subnets instead of links (docs/decisions/0030-routed-labs.md):
//!
//! ```yaml
//! hosts: 4
//! subnets:                  # the k-th subnet: 198.18.k.0/24 and fd00:7b:k::/64
//!   a: [h1, h4]             # h1 is 198.18.1.1, fd00:7b:1::1
//!   b: [h2, h4]             # a host in two or more subnets is a router:
//!   c: [h3, h4]             # h4 is 198.18.1.4, 198.18.2.4 and 198.18.3.4
//! ```
//! Every host gets, for each subnet it is not in, a next hop ([`StaticRoute`]): the
//! address, in one of its own subnets, of the first router on a shortest path there.
//! Hosts of one subnet reach each other directly; the others only through routers.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::route::table::StaticRoute;
use crate::route::Prefix;

use serde::Deserialize;

use crate::emulate::{Emulation, Spec};

/// Most hosts of a topology lab (every ordered pair is pinged).
pub const MAX_HOSTS: usize = 64;

/// The file, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    hosts: Option<usize>,
    #[serde(default)]
    links: Vec<LinkEntry>,
    /// Subnet name → its hosts, in the file's order (a mapping keeps it).
    #[serde(default)]
    subnets: serde_yaml_ng::Mapping,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkEntry {
    between: [String; 2],
    #[serde(default)]
    emulate: Option<String>,
}

/// One link between hosts `a` and `b` (indices from 0), and its emulation.
#[derive(Clone, Debug, PartialEq)]
pub struct Link {
    pub a: usize,
    pub b: usize,
    pub spec: Option<Spec>,
}

/// Most subnets of a routed topology (the k-th is 198.18.k.0/24).
pub const MAX_SUBNETS: usize = 250;

/// One subnet of a routed topology: its name and hosts (indices from 0, ascending).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subnet {
    pub name: String,
    pub hosts: Vec<usize>,
}

/// A checked topology.
#[derive(Clone, Debug, PartialEq)]
pub struct LabTopology {
    pub hosts: usize,
    pub links: Vec<Link>,
    /// A routed topology's subnets, in the file's order (empty: a flat one, with links).
    pub subnets: Vec<Subnet>,
}

/// Host name → index: `h1` is 0.
fn index_of(name: &str, hosts: usize) -> Option<usize> {
    let i: usize = name.strip_prefix('h')?.parse().ok()?;
    (1..=hosts).contains(&i).then(|| i - 1)
}

impl LabTopology {
    /// Parses and checks a topology file's text; `hosts` is `--hosts`, when given (the
    /// file's `hosts:` may then be left out, and must agree when it is not).
    pub fn parse(text: &str, hosts: Option<usize>) -> Result<LabTopology, String> {
        let file: File = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
        let n = match (file.hosts, hosts) {
            (Some(f), Some(h)) if f != h => return Err(format!("the file has hosts: {f}, the command line --hosts {h}: give one, or the same")),
            (Some(n), _) | (None, Some(n)) => n,
            (None, None) => return Err("how many hosts? add `hosts: N` to the file, or give --hosts N".into()),
        };
        if !(2..=MAX_HOSTS).contains(&n) {
            return Err(format!("hosts: {n} (a topology has 2 to {MAX_HOSTS} hosts)"));
        }
        let mut links: Vec<Link> = Vec::new();
        for entry in file.links {
            let [x, y] = &entry.between;
            let a = index_of(x, n).ok_or_else(|| format!("link {x}–{y}: {x:?} is not a host (h1 … h{n})"))?;
            let b = index_of(y, n).ok_or_else(|| format!("link {x}–{y}: {y:?} is not a host (h1 … h{n})"))?;
            if a == b {
                return Err(format!("link {x}–{y}: a host cannot be linked to itself"));
            }
            if links.iter().any(|l| (l.a, l.b) == (a.min(b), a.max(b))) {
                return Err(format!("link {x}–{y} is given twice"));
            }
            let spec = entry.emulate.as_deref().map(str::parse::<Spec>).transpose().map_err(|e| format!("link {x}–{y}: {e}"))?;
            links.push(Link { a: a.min(b), b: a.max(b), spec });
        }
        let subnets = parse_subnets(&file.subnets, n)?;
        if !subnets.is_empty() && !links.is_empty() {
            return Err("a topology has links or subnets, not both (links between subnets are routers: hosts in several subnets)".into());
        }
        Ok(LabTopology { hosts: n, links, subnets })
    }

    /// Whether hosts sit in subnets joined by routers.
    pub fn is_routed(&self) -> bool {
        !self.subnets.is_empty()
    }

    /// Indices of host `i`'s subnets, in the file's order.
    pub fn subnets_of(&self, i: usize) -> Vec<usize> {
        (0..self.subnets.len()).filter(|&k| self.subnets[k].hosts.contains(&i)).collect()
    }

    /// Whether host `i` routes: it is in two subnets or more.
    pub fn is_router(&self, i: usize) -> bool {
        self.subnets_of(i).len() >= 2
    }

    /// Host `i`'s addresses: in each of its subnets k (from 0), 198.18.(k+1).(i+1)/24 and
    /// fd00:7b:(k+1)::(i+1)/64; IPv4 first, in its subnets' order.
    pub fn addresses_of(&self, i: usize) -> Vec<Prefix> {
        let mine = self.subnets_of(i);
        let v4 = mine.iter().map(|&k| Prefix { addr: IpAddr::V4(subnet_v4(k, i + 1)), len: 24 });
        let v6 = mine.iter().map(|&k| Prefix { addr: IpAddr::V6(subnet_v6(k, i + 1)), len: 64 });
        v4.chain(v6).collect()
    }

    /// Subnet `k`'s two networks (IPv4, IPv6).
    pub fn networks_of(&self, k: usize) -> [Prefix; 2] {
        [Prefix { addr: IpAddr::V4(subnet_v4(k, 0)), len: 24 }, Prefix { addr: IpAddr::V6(subnet_v6(k, 0)), len: 64 }]
    }

    /// Host `i`'s next hops: for every subnet it is not in but can reach, the address (in
    /// a subnet of its own) of the first router on a shortest path there. Breadth first
    /// from its subnets; routers and subnets are tried in index order, so the choice is
    /// deterministic.
    pub fn routes_of(&self, i: usize) -> Vec<StaticRoute> {
        // first[t]: (router, subnet of i it is reached in) for subnets beyond i's own.
        let mut first: Vec<Option<(usize, usize)>> = vec![None; self.subnets.len()];
        let mut seen = vec![false; self.subnets.len()];
        let mut queue = std::collections::VecDeque::new();
        for k in self.subnets_of(i) {
            seen[k] = true;
            queue.push_back(k);
        }
        while let Some(s) = queue.pop_front() {
            for &r in self.subnets[s].hosts.iter().filter(|&&r| r != i && self.is_router(r)) {
                for t in self.subnets_of(r) {
                    if !seen[t] {
                        seen[t] = true;
                        first[t] = first[s].or(Some((r, s)));
                        queue.push_back(t);
                    }
                }
            }
        }
        let mut routes = Vec::new();
        for (t, hop) in first.iter().enumerate() {
            if let Some((r, s)) = hop {
                let [v4, v6] = self.networks_of(t);
                routes.push(StaticRoute { prefix: v4, via: IpAddr::V4(subnet_v4(*s, r + 1)) });
                routes.push(StaticRoute { prefix: v6, via: IpAddr::V6(subnet_v6(*s, r + 1)) });
            }
        }
        routes.sort_by_key(|r| (r.prefix.addr.is_ipv6(), r.prefix.addr));
        routes
    }

    /// Whether host `a` should reach host `b`: they share a subnet, or (with `routers`
    /// forwarding) a path of routers joins their subnets.
    pub fn reaches(&self, a: usize, b: usize, routers: bool) -> bool {
        let (sa, sb) = (self.subnets_of(a), self.subnets_of(b));
        if sa.iter().any(|k| sb.contains(k)) {
            return true;
        }
        routers && {
            let reachable: Vec<IpAddr> = self.routes_of(a).iter().map(|r| r.prefix.addr).collect();
            sb.iter().any(|&k| reachable.contains(&self.networks_of(k)[0].addr))
        }
    }

    /// The link between hosts `a` and `b`, if they are linked.
    pub fn link(&self, a: usize, b: usize) -> Option<&Link> {
        self.links.iter().find(|l| (l.a, l.b) == (a.min(b), a.max(b)))
    }

    /// Host `i`'s emulation: its links' specs towards its peers, and a link that drops
    /// everything towards the hosts it has no link with. `names[j]` and `addrs[j]` are
    /// host j's name and addresses (known from the plan, before any hello).
    pub fn emulation_of(&self, i: usize, names: &[String], seed: u64) -> Emulation {
        let mut to = Vec::new();
        for (j, name) in names.iter().enumerate().filter(|(j, _)| *j != i) {
            match self.link(i, j) {
                Some(Link { spec: Some(spec), .. }) => to.push((name.clone(), spec.clone())),
                Some(_) => {}
                None => to.push((name.clone(), Spec::unlinked())),
            }
        }
        Emulation { all: None, to, seed, known: Vec::new() }
    }

    /// The addresses each `--emulate-to` peer has, from the plan.
    pub fn addresses(names: &[String], addrs: &[Vec<IpAddr>]) -> Vec<(String, Vec<IpAddr>)> {
        names.iter().cloned().zip(addrs.iter().cloned()).collect()
    }
}

/// Host `host` (0: the network) of subnet `k` (from 0): 198.18.(k+1).host.
fn subnet_v4(k: usize, host: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, (k + 1) as u8, host as u8)
}

/// Host `host` (0: the network) of subnet `k` (from 0): fd00:7b:(k+1)::host.
fn subnet_v6(k: usize, host: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x7b, (k + 1) as u16, 0, 0, 0, 0, host as u16)
}

/// The `subnets:` mapping, checked: names are words, hosts exist and appear once per
/// subnet, every host is in a subnet.
fn parse_subnets(map: &serde_yaml_ng::Mapping, n: usize) -> Result<Vec<Subnet>, String> {
    if map.is_empty() {
        return Ok(Vec::new());
    }
    if map.len() > MAX_SUBNETS {
        return Err(format!("{} subnets (at most {MAX_SUBNETS})", map.len()));
    }
    let mut subnets = Vec::new();
    for (key, value) in map {
        let name = match key {
            serde_yaml_ng::Value::String(s) => s.clone(),
            serde_yaml_ng::Value::Number(x) => x.to_string(),
            other => return Err(format!("subnet name {other:?}: a name is a word (a, lan1, …)")),
        };
        let names: Vec<String> = serde_yaml_ng::from_value(value.clone()).map_err(|e| format!("subnet {name}: a list of hosts, e.g. [h1, h2] ({e})"))?;
        if names.is_empty() {
            return Err(format!("subnet {name} has no host"));
        }
        let mut hosts = Vec::new();
        for h in &names {
            let i = index_of(h, n).ok_or_else(|| format!("subnet {name}: {h:?} is not a host (h1 … h{n})"))?;
            if hosts.contains(&i) {
                return Err(format!("subnet {name}: {h} is given twice"));
            }
            hosts.push(i);
        }
        hosts.sort_unstable();
        subnets.push(Subnet { name, hosts });
    }
    if let Some(lonely) = (0..n).find(|i| !subnets.iter().any(|s| s.hosts.contains(i))) {
        return Err(format!("h{} is in no subnet (every host of a routed topology is in one or more)", lonely + 1));
    }
    Ok(subnets)
}

#[cfg(test)]
mod tests {
    use super::*;

    const THREE: &str = "hosts: 3\nlinks:\n  - between: [h1, h2]\n    emulate: delay 10ms\n  - between: [h3, h2]\n";

    #[test]
    fn parses_and_turns_into_emulation() {
        let t = LabTopology::parse(THREE, None).unwrap();
        assert_eq!(LabTopology::parse(THREE, Some(3)).unwrap(), t);
        assert_eq!(LabTopology::parse("links:\n  - between: [h1, h2]\n", Some(5)).unwrap().hosts, 5, "--hosts when the file has none");
        assert_eq!(t.links.len(), 2);
        assert_eq!(t.link(1, 0).and_then(|l| l.spec.clone()), Some("delay 10ms".parse().unwrap()));
        assert!(t.link(1, 2).is_some_and(|l| l.spec.is_none()));
        assert!(t.link(0, 2).is_none());
        let names: Vec<String> = ["h1", "h2", "h3"].map(String::from).to_vec();
        let h1 = t.emulation_of(0, &names, 7);
        assert_eq!(h1.to, vec![("h2".to_owned(), "delay 10ms".parse().unwrap()), ("h3".to_owned(), Spec::unlinked())]);
        assert_eq!(h1.seed, 7);
        let h2 = t.emulation_of(1, &names, 7);
        assert_eq!(h2.to, vec![("h1".to_owned(), "delay 10ms".parse().unwrap())], "h2–h3 is a plain link");
    }

    #[test]
    fn mistakes_name_the_link() {
        for (text, says) in [
            ("hosts: 3\nlinks:\n  - between: [h1, h4]\n", "\"h4\" is not a host"),
            ("hosts: 3\nlinks:\n  - between: [h1, h1]\n", "itself"),
            ("hosts: 3\nlinks:\n  - between: [h1, h2]\n  - between: [h2, h1]\n", "twice"),
            ("hosts: 3\nlinks:\n  - between: [h1, h2]\n    emulate: delay fast\n", "link h1–h2"),
            ("hosts: 1\n", "2 to"),
            ("hosts: 3\nlinkz: []\n", "unknown field"),
            ("links: []\n", "how many hosts"),
            ("hosts: 3\nsubnets:\n  a: [h1, h2]\n", "h3 is in no subnet"),
            ("hosts: 2\nsubnets:\n  a: [h1, h3]\n", "subnet a: \"h3\" is not a host"),
            ("hosts: 2\nsubnets:\n  a: [h1, h2, h1]\n", "h1 is given twice"),
            ("hosts: 2\nsubnets:\n  a: []\n", "no host"),
            ("hosts: 2\nsubnets:\n  a: h1\n", "a list of hosts"),
            ("hosts: 2\nsubnets:\n  a: [h1, h2]\nlinks:\n  - between: [h1, h2]\n", "not both"),
        ] {
            let e = LabTopology::parse(text, None).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
        let e = LabTopology::parse("hosts: 3\n", Some(6)).unwrap_err();
        assert!(e.contains("--hosts 6: give one, or the same"), "{e}");
    }

    /// pyroute's stage 1: three subnets, one router.
    const STAR: &str = "hosts: 4\nsubnets:\n  a: [h1, h4]\n  b: [h2, h4]\n  c: [h3, h4]\n";
    /// A chain: a — h3 — b — h4 — c, with h1 in a and h2 in c.
    const CHAIN: &str = "hosts: 4\nsubnets:\n  a: [h1, h3]\n  b: [h3, h4]\n  c: [h4, h2]\n";

    fn routes(t: &LabTopology, i: usize) -> Vec<String> {
        t.routes_of(i).iter().map(ToString::to_string).collect()
    }

    #[test]
    fn subnets_give_addresses_and_next_hops() {
        let t = LabTopology::parse(STAR, None).unwrap();
        assert!(t.is_routed() && t.is_router(3) && !t.is_router(0));
        assert_eq!(t.subnets.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["a", "b", "c"], "the file's order");
        let addrs: Vec<String> = t.addresses_of(3).iter().map(ToString::to_string).collect();
        assert_eq!(addrs, ["198.18.1.4/24", "198.18.2.4/24", "198.18.3.4/24", "fd00:7b:1::4/64", "fd00:7b:2::4/64", "fd00:7b:3::4/64"]);
        assert_eq!(t.addresses_of(1).iter().map(ToString::to_string).collect::<Vec<_>>(), ["198.18.2.2/24", "fd00:7b:2::2/64"]);
        assert_eq!(routes(&t, 0), ["198.18.2.0/24=198.18.1.4", "198.18.3.0/24=198.18.1.4", "fd00:7b:2::/64=fd00:7b:1::4", "fd00:7b:3::/64=fd00:7b:1::4"]);
        assert!(t.routes_of(3).is_empty(), "the router is in every subnet");
        for (a, b) in [(0, 1), (0, 2), (1, 2)] {
            assert!(t.reaches(a, b, true) && !t.reaches(a, b, false), "h{} h{}", a + 1, b + 1);
        }
        assert!(t.reaches(0, 3, false), "a host and its router share a subnet");
    }

    #[test]
    fn next_hops_follow_shortest_paths_through_chains() {
        let t = LabTopology::parse(CHAIN, None).unwrap();
        // h1 (in a) reaches b and c through h3; h3 reaches c through h4; h2 (in c) a and b through h4.
        assert_eq!(routes(&t, 0), ["198.18.2.0/24=198.18.1.3", "198.18.3.0/24=198.18.1.3", "fd00:7b:2::/64=fd00:7b:1::3", "fd00:7b:3::/64=fd00:7b:1::3"]);
        assert_eq!(routes(&t, 2), ["198.18.3.0/24=198.18.2.4", "fd00:7b:3::/64=fd00:7b:2::4"]);
        assert_eq!(routes(&t, 3), ["198.18.1.0/24=198.18.2.3", "fd00:7b:1::/64=fd00:7b:2::3"]);
        assert_eq!(routes(&t, 1), ["198.18.1.0/24=198.18.3.4", "198.18.2.0/24=198.18.3.4", "fd00:7b:1::/64=fd00:7b:3::4", "fd00:7b:2::/64=fd00:7b:3::4"]);
        assert!(t.reaches(0, 1, true) && !t.reaches(0, 1, false));
        // Two islands: no route between them, not even with routers.
        let islands = LabTopology::parse("hosts: 4\nsubnets:\n  a: [h1, h2]\n  b: [h3, h4]\n", None).unwrap();
        assert!(islands.routes_of(0).is_empty() && !islands.reaches(0, 2, true) && islands.reaches(0, 1, false));
    }

    #[test]
    fn every_route_leads_one_hop_closer() {
        // Walking the next hops from any host reaches any subnet joined to its own, in at
        // most as many hops as there are routers, on a ring with a tail.
        let text = "hosts: 7\nsubnets:\n  s1: [h1, h2, h3]\n  s2: [h2, h4]\n  s3: [h4, h5]\n  s4: [h5, h3]\n  s5: [h5, h6]\n  s6: [h6, h7]\n";
        let t = LabTopology::parse(text, None).unwrap();
        for start in 0..t.hosts {
            for (k, _) in t.subnets.iter().enumerate() {
                let target = t.networks_of(k)[0];
                let mut at = start;
                let mut hops = 0;
                while !t.subnets_of(at).contains(&k) {
                    let hop = t.routes_of(at).into_iter().find(|r| r.prefix == target).unwrap_or_else(|| panic!("h{} has no route to {target}", at + 1));
                    at = (0..t.hosts).find(|&h| t.addresses_of(h).iter().any(|p| p.addr == hop.via)).expect("the next hop is a host");
                    assert!(t.is_router(at));
                    hops += 1;
                    assert!(hops <= 4, "h{} to {target}: a loop", start + 1);
                }
            }
        }
    }
}
