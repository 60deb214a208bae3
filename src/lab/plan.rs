//! The pure half of a lab: host names and addresses, which pairs to check, and the
//! arithmetic of the report. No I/O, so it is unit-tested exhaustively.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::route::Prefix;
use crate::util::SplitMix64;

/// Session used when `--session` is not given.
pub const DEFAULT_SESSION: &str = "lab";
/// Labs up to this size check every ordered pair; larger ones a seeded sample.
pub const ALL_PAIRS_UP_TO: usize = 8;
/// Largest lab: addresses are 198.18.0.0/15 + i.
pub const MAX_HOSTS: usize = 4000;

/// One host of the lab.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    pub index: usize,
    pub name: String,
    pub netns: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

impl Host {
    pub fn prefixes(&self) -> [Prefix; 2] {
        [Prefix { addr: IpAddr::V4(self.v4), len: 15 }, Prefix { addr: IpAddr::V6(self.v6), len: 64 }]
    }
}

/// Namespace name of host `i`: `tb-h<i>` in the default session, `tb-<session>-h<i>` otherwise.
pub fn netns_name(session: &str, i: usize) -> String {
    if session == DEFAULT_SESSION {
        format!("tb-h{i}")
    } else {
        format!("tb-{session}-h{i}")
    }
}

/// Prefix shared by every namespace of a session (for clean-up of a killed lab).
pub fn netns_prefix(session: &str) -> String {
    netns_name(session, 0).trim_end_matches('0').to_owned()
}

/// Host `i` (1-based): IPv4 198.18.0.0 + i in a /15, IPv6 fd00:7b::i in a /64.
pub fn host(session: &str, i: usize) -> Host {
    let v4 = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + i as u32);
    let v6 = Ipv6Addr::new(0xfd00, 0x7b, 0, 0, 0, 0, (i >> 16) as u16, (i & 0xffff) as u16);
    Host { index: i, name: format!("h{i}"), netns: netns_name(session, i), v4, v6 }
}

/// The hosts 1..=n.
pub fn hosts(session: &str, n: usize) -> Vec<Host> {
    (1..=n).map(|i| host(session, i)).collect()
}

/// Every ordered pair (from, to) of `n` hosts' indexes, from ≠ to.
pub fn all_pairs(n: usize) -> Vec<(usize, usize)> {
    (0..n).flat_map(|a| (0..n).filter(move |b| *b != a).map(move |b| (a, b))).collect()
}

/// Ordered pairs (from, to) of host indexes (0-based into the host list) to check: all of
/// them up to [`ALL_PAIRS_UP_TO`] hosts, else `sample` distinct pairs drawn with `seed`.
pub fn pairs(n: usize, sample: usize, seed: u64) -> Vec<(usize, usize)> {
    if n < 2 {
        return Vec::new();
    }
    if n <= ALL_PAIRS_UP_TO || sample >= n * (n - 1) {
        return all_pairs(n);
    }
    let mut rng = SplitMix64(seed);
    let mut chosen = std::collections::BTreeSet::new();
    while chosen.len() < sample {
        let a = (rng.next_u64() % n as u64) as usize;
        let b = (rng.next_u64() % n as u64) as usize;
        if a != b {
            chosen.insert((a, b));
        }
    }
    chosen.into_iter().collect()
}

/// Round-trip times (ms) from `ping` output lines like `64 bytes from …: icmp_seq=1 ttl=64 time=0.523 ms`.
pub fn ping_rtts_ms(output: &str) -> Vec<f64> {
    output.lines().filter_map(|l| l.split("time=").nth(1)).filter_map(|t| t.split_whitespace().next()).filter_map(|t| t.parse::<f64>().ok()).collect()
}

/// The q-quantile (0..=1) of `values` by nearest rank; `None` when empty.
pub fn quantile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q.clamp(0.0, 1.0) * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_predictable() {
        let h = host(DEFAULT_SESSION, 1);
        assert_eq!(h.netns, "tb-h1");
        assert_eq!(h.v4, Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(h.v6.to_string(), "fd00:7b::1");
        let h = host("s2", 300);
        assert_eq!(h.netns, "tb-s2-h300");
        assert_eq!(h.v4, Ipv4Addr::new(198, 18, 1, 44));
        assert_eq!(h.v6.to_string(), "fd00:7b::12c");
        assert_eq!(host("x", MAX_HOSTS).v4, Ipv4Addr::new(198, 18, 15, 160));
        assert_eq!(netns_prefix(DEFAULT_SESSION), "tb-h");
        assert_eq!(netns_prefix("s2"), "tb-s2-h");
    }

    #[test]
    fn addresses_stay_in_the_test_ranges_and_are_distinct() {
        let all = hosts("x", MAX_HOSTS);
        let v4: std::collections::HashSet<_> = all.iter().map(|h| h.v4).collect();
        assert_eq!(v4.len(), MAX_HOSTS);
        for h in &all {
            let o = h.v4.octets();
            assert!(o[0] == 198 && (o[1] == 18 || o[1] == 19), "{}", h.v4);
            assert_eq!(h.v6.segments()[0], 0xfd00);
        }
    }

    #[test]
    fn small_labs_check_all_pairs_large_ones_a_reproducible_sample() {
        assert_eq!(pairs(1, 10, 1), vec![]);
        assert_eq!(pairs(3, 10, 1).len(), 6);
        assert_eq!(pairs(8, 1, 1).len(), 56);
        let s = pairs(300, 100, 7);
        assert_eq!(s.len(), 100);
        assert!(s.iter().all(|(a, b)| a != b && *a < 300 && *b < 300));
        assert_eq!(s, pairs(300, 100, 7));
        assert_ne!(s, pairs(300, 100, 8));
        assert_eq!(pairs(10, 1000, 1).len(), 90);
    }

    #[test]
    fn ping_output_parses() {
        let out = "PING 198.18.0.2 (198.18.0.2) 56(84) bytes of data.\n64 bytes from 198.18.0.2: icmp_seq=1 ttl=64 time=0.523 ms\n64 bytes from 198.18.0.2: icmp_seq=2 ttl=64 time=1.20 ms\n\n--- stats ---\nrtt min/avg/max/mdev = 0.5/0.8/1.2/0.3 ms";
        assert_eq!(ping_rtts_ms(out), vec![0.523, 1.20]);
        assert!(ping_rtts_ms("garbage time=x ms").is_empty());
    }

    #[test]
    fn quantiles() {
        assert_eq!(quantile(&[], 0.5), None);
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), Some(50.0));
        assert_eq!(quantile(&v, 0.99), Some(99.0));
        assert_eq!(quantile(&v, 1.0), Some(100.0));
        assert_eq!(quantile(&[3.0], 0.0), Some(3.0));
    }
}
