//! ioppytest addressing, pure: the old agent's address flags and defaults, and the
//! `ip.tun.started` / `ip.tun.start` body, to and from our prefixes.
//!
//! The old agent names its IPv6 address by a prefix and a host part (`--ipv6-prefix bbbb
//! --ipv6-host 1` is `bbbb::1/64`, with link-local `fe80::1/64`) and its IPv4 address by
//! address and netmask (`10.2.0.1`, `255.255.255.0`). Agents `agent_1` … `agent_6` have
//! defaults: `10.2.0.N/24`, `bbbb::N/64`, `fe80::N/64`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::codec::ioppytest::{TunStarted, API_VERSION};
use crate::packet::Prefix;

/// The addresses of one old-style agent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OldAddressing {
    pub ipv4: Option<(Ipv4Addr, u8)>,
    pub ipv6_prefix: Option<String>,
    pub ipv6_host: Option<String>,
}

/// `prefix` + `host` → IPv6 address: `bbbb` + `1` → `bbbb::1`.
pub fn ipv6_from(prefix: &str, host: &str) -> Option<Ipv6Addr> {
    let p = prefix.trim().trim_end_matches(':');
    let h = host.trim().trim_start_matches(':');
    if p.is_empty() || h.is_empty() {
        return None;
    }
    format!("{p}::{h}").parse().ok().or_else(|| format!("{p}:{h}").parse().ok())
}

/// Netmask → prefix length (`255.255.255.0` → 24); `None` when not contiguous.
pub fn netmask_len(mask: Ipv4Addr) -> Option<u8> {
    Prefix::with_netmask(Ipv4Addr::UNSPECIFIED, mask).map(|p| p.len)
}

/// N for `agent_N` with 1 ≤ N ≤ 6 (the old agent's known names).
pub fn default_index(name: &str) -> Option<u8> {
    name.strip_prefix("agent_").and_then(|n| n.parse::<u8>().ok()).filter(|n| (1..=6).contains(n))
}

impl OldAddressing {
    /// The old agent's defaults for `agent_1` … `agent_6`.
    pub fn default_for(name: &str) -> Option<OldAddressing> {
        let n = default_index(name)?;
        Some(OldAddressing { ipv4: Some((Ipv4Addr::new(10, 2, 0, n), 24)), ipv6_prefix: Some("bbbb".into()), ipv6_host: Some(n.to_string()) })
    }

    pub fn is_empty(&self) -> bool {
        self.ipv4.is_none() && self.ipv6_prefix.is_none()
    }

    /// Global addresses as prefixes (`/64` for IPv6 as the old agent does).
    pub fn prefixes(&self) -> Vec<Prefix> {
        let mut out = Vec::new();
        if let Some((a, len)) = self.ipv4 {
            out.push(Prefix { addr: IpAddr::V4(a), len });
        }
        if let Some(a) = self.global_v6() {
            out.push(Prefix { addr: IpAddr::V6(a), len: 64 });
        }
        out
    }

    pub fn global_v6(&self) -> Option<Ipv6Addr> {
        ipv6_from(self.ipv6_prefix.as_deref()?, self.ipv6_host.as_deref()?)
    }

    /// `fe80::<host>` as the old agent configures it.
    pub fn link_local(&self) -> Option<Ipv6Addr> {
        ipv6_from("fe80", self.ipv6_host.as_deref()?)
    }

    /// Every address the agent answers on (global and link-local).
    pub fn addresses(&self) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = self.prefixes().into_iter().map(|p| p.addr).collect();
        if let Some(ll) = self.link_local() {
            v.push(IpAddr::V6(ll));
        }
        v
    }

    /// From an `ip.tun.started` / `ip.tun.start` body.
    pub fn from_started(t: &TunStarted) -> OldAddressing {
        let ipv4 = t.ipv4_address.as_deref().and_then(|a| a.parse::<Ipv4Addr>().ok()).map(|a| {
            let len = t.ipv4_netmask.as_deref().and_then(|m| m.parse().ok()).and_then(netmask_len).unwrap_or(24);
            (a, len)
        });
        OldAddressing { ipv4, ipv6_prefix: t.ipv6_prefix.clone(), ipv6_host: t.ipv6_host.clone() }
    }

    /// The body of `fromAgent.<name>.ip.tun.started`.
    pub fn to_started(&self, name: &str) -> TunStarted {
        let (ipv4_address, ipv4_netmask, ipv4_network) = match self.ipv4 {
            Some((a, len)) => {
                let p = Prefix { addr: IpAddr::V4(a), len: len.min(32) };
                (Some(a.to_string()), Some(p.netmask().to_string()), Some(p.network().to_string()))
            }
            None => (None, None, None),
        };
        TunStarted {
            _api_version: API_VERSION.to_owned(),
            name: name.to_owned(),
            ipv4_address,
            ipv4_netmask,
            ipv4_network,
            ipv6_prefix: self.ipv6_prefix.clone(),
            ipv6_host: self.ipv6_host.clone(),
            ..TunStarted::default()
        }
    }
}

/// Who may configure an ioppytest-wire agent with `ip.tun.start`, with what, and how often.
/// A forged order (another user, an address outside the session's subnets, a prefix wider
/// than the subnet, one order too many) is refused and counted; the agent runs `ip addr add`
/// only for what passes. Pure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartPolicy {
    /// The broker user whose orders count (the coordinator).
    pub coordinator: String,
    /// Orders without `user_id` count too (what ioppytest's coordinators send: their
    /// messages carry no `user_id`): then the broker's permissions decide who may give
    /// them, anyone who may publish `toAgent.<name>.ip.tun.start` on the exchange.
    pub accept_unsigned: bool,
    /// Where ordered addresses must lie, at least as narrow as these prefixes.
    pub within: Vec<Prefix>,
    /// Most orders honoured in the agent's life.
    pub max_orders: u32,
    honoured: u32,
}

/// What became of an `ip.tun.start`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Order {
    Accept(OldAddressing),
    /// Carries no address.
    Empty,
    NotCoordinator(Option<String>),
    OutsideSubnets(Prefix),
    TooMany,
}

/// Orders honoured at most, by default.
pub const MAX_ORDERS: u32 = 8;

/// ioppytest's own subnets: `10.2.0.0/24`, `bbbb::/64`.
pub fn default_subnets() -> Vec<Prefix> {
    ["10.2.0.0/24", "bbbb::/64"].iter().filter_map(|p| p.parse().ok()).collect()
}

impl StartPolicy {
    /// Orders from `coordinator` only (stamped with its `user_id`); [`StartPolicy::unsigned`]
    /// also takes orders without one.
    pub fn new(coordinator: String, within: Vec<Prefix>) -> StartPolicy {
        StartPolicy { coordinator, accept_unsigned: false, within, max_orders: MAX_ORDERS, honoured: 0 }
    }

    /// Also takes orders without `user_id`, as a real ioppytest coordinator sends them.
    pub fn unsigned(self, accept: bool) -> StartPolicy {
        StartPolicy { accept_unsigned: accept, ..self }
    }

    /// Judges one order published by broker user `user` (`None`: the message had no
    /// `user_id`); an accepted one counts against the bound. Unsigned or not, an order
    /// stays inside the subnets and the count.
    pub fn judge(&mut self, user: Option<&str>, wanted: OldAddressing) -> Order {
        let trusted = match user {
            None => self.accept_unsigned,
            Some(u) => u == self.coordinator,
        };
        if !trusted {
            return Order::NotCoordinator(user.map(str::to_owned));
        }
        if wanted.is_empty() {
            return Order::Empty;
        }
        for p in wanted.prefixes() {
            if !self.within.iter().any(|w| w.covers(&p)) {
                return Order::OutsideSubnets(p);
            }
        }
        if self.honoured >= self.max_orders {
            return Order::TooMany;
        }
        self.honoured += 1;
        Order::Accept(wanted)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn orders_come_from_the_coordinator_inside_the_subnets_and_not_too_often() {
        let mut p = StartPolicy::new("coord".into(), default_subnets());
        let ok = OldAddressing { ipv4: Some(("10.2.0.9".parse().unwrap(), 24)), ipv6_prefix: Some("bbbb".into()), ipv6_host: Some("9".into()) };
        assert_eq!(p.judge(Some("rogue"), ok.clone()), Order::NotCoordinator(Some("rogue".into())));
        assert_eq!(p.judge(None, ok.clone()), Order::NotCoordinator(None));
        assert_eq!(p.judge(Some("coord"), ok.clone()), Order::Accept(ok.clone()));
        let everything = OldAddressing { ipv4: Some(("10.2.0.9".parse().unwrap(), 0)), ..OldAddressing::default() };
        assert!(matches!(p.judge(Some("coord"), everything), Order::OutsideSubnets(_)), "netmask 0.0.0.0 routes everything onto the bus");
        let elsewhere = OldAddressing { ipv4: Some(("192.168.1.1".parse().unwrap(), 24)), ..OldAddressing::default() };
        assert!(matches!(p.judge(Some("coord"), elsewhere), Order::OutsideSubnets(_)));
        assert_eq!(p.judge(Some("coord"), OldAddressing::default()), Order::Empty);
        for _ in 1..MAX_ORDERS {
            assert_eq!(p.judge(Some("coord"), ok.clone()), Order::Accept(ok.clone()));
        }
        assert_eq!(p.judge(Some("coord"), ok), Order::TooMany);
    }

    /// ioppytest's coordinators send no `user_id`: with `unsigned`, such orders count, inside
    /// the subnets and the count; a stamped order must still be the coordinator's.
    #[test]
    fn unsigned_orders_when_asked_still_inside_the_subnets_and_the_count() {
        let mut p = StartPolicy::new("coord".into(), default_subnets()).unsigned(true);
        let ok = OldAddressing { ipv6_prefix: Some("bbbb".into()), ipv6_host: Some("3".into()), ..OldAddressing::default() };
        assert_eq!(p.judge(None, ok.clone()), Order::Accept(ok.clone()));
        assert_eq!(p.judge(Some("rogue"), ok.clone()), Order::NotCoordinator(Some("rogue".into())));
        let elsewhere = OldAddressing { ipv6_prefix: Some("cccc".into()), ipv6_host: Some("3".into()), ..OldAddressing::default() };
        assert!(matches!(p.judge(None, elsewhere), Order::OutsideSubnets(_)));
        for _ in 1..MAX_ORDERS {
            assert_eq!(p.judge(None, ok.clone()), Order::Accept(ok.clone()));
        }
        assert_eq!(p.judge(None, ok), Order::TooMany);
    }

    use super::*;

    #[test]
    fn prefix_and_host_make_addresses() {
        assert_eq!(ipv6_from("bbbb", "1").unwrap().to_string(), "bbbb::1");
        assert_eq!(ipv6_from("bbbb::", "a").unwrap().to_string(), "bbbb::a");
        assert_eq!(ipv6_from("fd00:20", "1").unwrap().to_string(), "fd00:20::1");
        assert_eq!(ipv6_from("fe80", "2").unwrap().to_string(), "fe80::2");
        assert!(ipv6_from("", "1").is_none());
        assert!(ipv6_from("zzzz", "1").is_none());
    }

    #[test]
    fn netmasks() {
        assert_eq!(netmask_len("255.255.255.0".parse().unwrap()), Some(24));
        assert_eq!(netmask_len("255.254.0.0".parse().unwrap()), Some(15));
        assert_eq!(netmask_len("0.0.0.0".parse().unwrap()), Some(0));
        assert_eq!(netmask_len("255.0.255.0".parse().unwrap()), None);
        let netmask = |len| crate::packet::prefix::v4_netmask(len).to_string();
        assert_eq!(netmask(24), "255.255.255.0");
        assert_eq!(netmask(0), "0.0.0.0");
    }

    #[test]
    fn defaults_cover_agent_1_to_6_only() {
        let a = OldAddressing::default_for("agent_2").unwrap();
        let addrs: Vec<String> = a.addresses().iter().map(ToString::to_string).collect();
        assert_eq!(addrs, ["10.2.0.2", "bbbb::2", "fe80::2"]);
        assert!(OldAddressing::default_for("agent_7").is_none());
        assert!(OldAddressing::default_for("agent_TT").is_none());
        assert!(OldAddressing::default_for("h1").is_none());
    }

    #[test]
    fn started_round_trips_and_matches_the_captured_vector() {
        let a = OldAddressing::default_for("agent_1").unwrap();
        let t = a.to_started("agent_1");
        assert_eq!(OldAddressing::from_started(&t), a);
        let vector: TunStarted =
            serde_json::from_slice(&std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/vectors/ioppytest/tun-started.json")).expect("vector"))
                .expect("parses");
        assert_eq!(OldAddressing::from_started(&vector), a);
        assert_eq!(t.ipv4_network.as_deref(), Some("10.2.0.0"));
        assert_eq!(t.ipv4_netmask.as_deref(), Some("255.255.255.0"));
    }
}
