//! Routed labs (`agent lab --topology FILE` with `subnets:`, decision 0030): the routers'
//! namespaces, the reachability matrix, and `--check`, which grades a lab as an exercise's
//! grader would.
//!
//! The addresses and next hops are the topology's ([`LabTopology::addresses_of`],
//! [`LabTopology::routes_of`]); each host's agent gets its next hops as `--route`s. Here:
//! - a router's namespace forwards (IPv4 and IPv6) unless `--routers off`, and never sends
//!   ICMP redirects (its TUN is both the way in and the way out: a redirect would tell a
//!   host to skip the router, which on the bus means nothing);
//! - every ordered pair is pinged (IPv4 and IPv6); the lab's expectation is the topology's
//!   (same subnet, or joined by forwarding routers), a grade's is that every pair reaches;
//! - `agent lab --check` on a session whose lab runs (`--keep`) only grades it: the lab
//!   stays as it is, a user's router program keeps running.
//!
//! Main thread and runtime tasks; not on the hot path.

use serde::Serialize;

use super::checks::ping_pairs;
use super::plan::{self, Host};
use super::report::LabReport;
use super::state::{process_alive, state_path, State};
use super::topology::LabTopology;
use super::{Lab, LabOptions};
use crate::tun::netns;

/// Who reached whom: `reached[a][b]` is (IPv4 answered, IPv6 answered) for a ping from host
/// a to host b's first addresses; `expected[a][b]` whether it should have.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Reach {
    pub hosts: Vec<String>,
    /// The subnets each host is in, by name.
    pub subnets: Vec<Vec<String>>,
    pub reached: Vec<Vec<(bool, bool)>>,
    pub expected: Vec<Vec<bool>>,
}

impl Reach {
    /// The pairs not as expected, one line each.
    pub fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (a, row) in self.reached.iter().enumerate() {
            for (b, &(v4, v6)) in row.iter().enumerate().filter(|(b, _)| *b != a) {
                let (from, to) = (&self.hosts[a], &self.hosts[b]);
                match (self.expected[a][b], v4, v6) {
                    (true, true, true) | (false, false, false) => {}
                    (true, false, false) => out.push(format!("{from} -> {to}: no reply")),
                    (true, false, true) => out.push(format!("{from} -> {to}: no IPv4 reply (IPv6 answered)")),
                    (true, true, false) => out.push(format!("{from} -> {to}: no IPv6 reply (IPv4 answered)")),
                    (false, ..) => out.push(format!("{from} -> {to}: answered, but they share no subnet and the routers are off")),
                }
            }
        }
        out
    }

    /// Ordered pairs that reached (both families).
    pub fn reaching(&self) -> usize {
        self.reached.iter().enumerate().map(|(a, row)| row.iter().enumerate().filter(|&(b, r)| b != a && r.0 && r.1).count()).sum()
    }
}

impl std::fmt::Display for Reach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.hosts.len();
        writeln!(
            f,
            "  reachability    {} of {} ordered pairs answered (rows ping columns: 46 both families, 4- or -6 one, -- none; ! not as expected)",
            self.reaching(),
            n * (n - 1)
        )?;
        write!(f, "  {:<16}", "")?;
        for h in &self.hosts {
            write!(f, "{h:>5}")?;
        }
        writeln!(f, "   subnets")?;
        for a in 0..n {
            write!(f, "  {:<16}", self.hosts[a])?;
            for b in 0..n {
                let (v4, v6) = self.reached[a][b];
                let cell = match (a == b, v4, v6) {
                    (true, ..) => ".".to_owned(),
                    (false, v4, v6) => format!("{}{}", if v4 { "4" } else { "-" }, if v6 { "6" } else { "-" }),
                };
                let mark = if a != b && self.expected[a][b] != (v4 && v6) { "!" } else { " " };
                write!(f, "{cell:>4}{mark}")?;
            }
            writeln!(f, "   {}", self.subnets[a].join(" "))?;
        }
        Ok(())
    }
}

/// The hosts of a routed topology: each known by its first addresses (those pinged).
pub(super) fn routed_hosts(session: &str, t: &LabTopology) -> Vec<Host> {
    plan::hosts(session, t.hosts)
        .into_iter()
        .map(|mut h| {
            let addrs = t.addresses_of(h.index - 1);
            if let Some(std::net::IpAddr::V4(v4)) = addrs.iter().map(|p| p.addr).find(std::net::IpAddr::is_ipv4) {
                h.v4 = v4;
            }
            if let Some(std::net::IpAddr::V6(v6)) = addrs.iter().map(|p| p.addr).find(std::net::IpAddr::is_ipv6) {
                h.v6 = v6;
            }
            h
        })
        .collect()
}

/// Pings every ordered pair of `hosts` (IPv4 and IPv6): the matrix, and the
/// round-trip times of the replies.
async fn reach_matrix(hosts: &[Host], t: &LabTopology, expect: impl Fn(usize, usize) -> bool) -> (Reach, Vec<f64>) {
    let n = hosts.len();
    let results = ping_pairs(hosts, &plan::all_pairs(n)).await;
    let mut reach = Reach {
        hosts: hosts.iter().map(|h| h.name.clone()).collect(),
        subnets: (0..n).map(|i| t.subnets_of(i).iter().map(|&k| t.subnets[k].name.clone()).collect()).collect(),
        reached: vec![vec![(true, true); n]; n],
        expected: (0..n).map(|a| (0..n).map(|b| a == b || expect(a, b)).collect()).collect(),
    };
    let mut rtts = Vec::new();
    for ((a, b, v6), r) in results {
        let cell = &mut reach.reached[a][b];
        let ok = r.map(|mut v| rtts.append(&mut v)).is_ok();
        if v6 {
            cell.1 = ok;
        } else {
            cell.0 = ok;
        }
    }
    (reach, rtts)
}

impl Lab {
    /// Routers forward (unless `--routers off`) and send no ICMP redirects.
    pub(super) fn set_up_routers(&self, t: &LabTopology) -> anyhow::Result<()> {
        let forward = if self.opts.routers { "1" } else { "0" };
        for h in self.hosts.iter().filter(|h| t.is_router(h.index - 1)) {
            for (key, value) in [
                ("net/ipv4/conf/all/send_redirects", "0"),
                ("net/ipv4/conf/default/send_redirects", "0"),
                ("net/ipv4/ip_forward", forward),
                ("net/ipv6/conf/all/forwarding", forward),
            ] {
                netns::set_sysctl(Some(&h.netns), key, value).map_err(|e| anyhow::anyhow!("router {}: cannot set {key}: {e}", h.name))?;
            }
        }
        Ok(())
    }

    /// A routed lab's check: the matrix against the topology (or, with `--check`, against
    /// every pair reaching).
    pub(super) async fn check_routed(&self, t: &LabTopology, report: &mut LabReport) {
        let grade = self.opts.check;
        let routers = self.opts.routers;
        let (reach, rtts) = reach_matrix(&self.hosts, t, |a, b| grade || t.reaches(a, b, routers)).await;
        let n = self.hosts.len();
        report.pairs_checked = n * (n - 1);
        report.pings_sent = report.pairs_checked * 2 * 3;
        report.failures.extend(reach.failures());
        report.failures.sort();
        report.rtt_p50_ms = plan::quantile(&rtts, 0.5);
        report.rtt_p99_ms = plan::quantile(&rtts, 0.99);
        report.reach = Some(reach);
    }
}

/// Whether a lab of `session` runs now (its state file names a live process).
pub fn lab_running(session: &str) -> bool {
    let state: Option<State> = std::fs::read(state_path(session)).ok().and_then(|b| serde_json::from_slice(&b).ok());
    state.is_some_and(|s| s.pid != std::process::id() && process_alive(s.pid))
}

/// `agent lab --check` while a lab of the session runs: pings every pair of the running
/// lab (the topology tells the addresses), expecting all to reach. Starts and stops nothing.
pub async fn grade_running(opts: &LabOptions) -> anyhow::Result<LabReport> {
    let Some(t) = opts.topology.as_ref().filter(|t| t.is_routed()) else {
        anyhow::bail!("--check grades a routed lab: give the --topology FILE (with subnets:) it was started with");
    };
    let hosts = routed_hosts(&opts.session, t);
    let present = super::hosts::session_namespaces(&opts.session);
    if let Some(missing) = hosts.iter().find(|h| !present.contains(&h.netns)) {
        anyhow::bail!("the lab of session {} has no namespace {}: was it started with this --topology?", opts.session, missing.netns);
    }
    let (reach, rtts) = reach_matrix(&hosts, t, |_, _| true).await;
    let n = hosts.len();
    let mut report = LabReport {
        session: opts.session.clone(),
        hosts: n,
        hosts_up: n,
        queues: opts.queues,
        broker: "(the running lab's)".into(),
        pairs_checked: n * (n - 1),
        pings_sent: n * (n - 1) * 2 * 3,
        failures: reach.failures(),
        rtt_p50_ms: plan::quantile(&rtts, 0.5),
        rtt_p99_ms: plan::quantile(&rtts, 0.99),
        graded: true,
        ..LabReport::default()
    };
    report.ok = report.failures.is_empty();
    report.reach = Some(reach);
    Ok(report)
}
