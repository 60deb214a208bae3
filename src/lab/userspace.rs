//! `agent lab --userspace`: hosts that are endpoints of userspace stacks, many per worker.
//!
//! No namespaces and no kernel interfaces: the lab starts W in-process agents (W ≤
//! [`MAX_WORKERS`] AMQP connections however many hosts), each a userspace port hosting
//! about N/W endpoints (`config::PortKind::Userspace { endpoints }`); every endpoint keeps
//! its host name, addresses and link-local, and its worker's one queue binds them all.
//! Hosts are spread over workers in contiguous blocks, so an endpoint's flows all take its
//! worker's queue (per-flow order holds). Identity: one broker user per worker (the lab's
//! shared one, strict for the lab's prefixes); a provisioned session would give each worker
//! a user allowed the prefixes of its block (docs/decisions/0022).
//!
//! Reachability is checked with the ports' own echo requests ([`Pinger`]): sampled pairs,
//! both families, through the broker (also when both ends share a worker).
//!
//! Main thread and runtime; not on the hot path.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::plan::{self, Host};
use super::report::LabReport;
use super::Lab;
use crate::config::{AgentConfig, Bus, ConfigError, DataPath, Identity, Interface, PortKind};
use crate::port::userspace::{EndpointConfig, EndpointId, Pinger, Services};

/// Most workers (AMQP connections) a userspace lab opens, whatever its size.
pub const MAX_WORKERS: usize = 64;
/// Endpoints a worker takes before the lab adds another (up to [`MAX_WORKERS`]).
pub const ENDPOINTS_PER_WORKER: usize = 160;
/// Largest userspace lab (addresses stay inside 198.18.0.0/15).
pub const MAX_HOSTS: usize = 20_000;

/// How many workers a lab of `hosts` endpoints runs.
pub fn workers_for(hosts: usize) -> usize {
    hosts.div_ceil(ENDPOINTS_PER_WORKER).clamp(1, MAX_WORKERS)
}

/// The hosts of worker `w` of `workers` (contiguous blocks, the first ones one larger).
pub fn block(hosts: usize, workers: usize, w: usize) -> std::ops::Range<usize> {
    let (base, extra) = (hosts / workers, hosts % workers);
    let start = w * base + w.min(extra);
    start..start + base + usize::from(w < extra)
}

impl Lab {
    /// The configuration of worker `w` (0-based): an agent named `u<w+1>` with no address
    /// of its own, hosting its block of hosts as endpoints.
    pub(super) fn userspace_config(&self, w: usize, workers: usize) -> Result<AgentConfig, ConfigError> {
        let session = Some(self.opts.session.as_str());
        let endpoints: Vec<EndpointConfig> = self.hosts[block(self.hosts.len(), workers, w)]
            .iter()
            .map(|h| EndpointConfig {
                name: h.name.clone(),
                addrs: h.prefixes().to_vec(),
                link_local: crate::identity::link_local(session, &h.name),
                services: Services::default(),
            })
            .collect();
        let bus = Bus {
            heartbeat: self.opts.heartbeat,
            check_name: false,
            frame_max: Some(32 * 1024),
            ..Bus::new(self.endpoints.clone()).in_session(&self.opts.session)
        };
        let interface = Interface {
            kind: PortKind::Userspace { services: Services::default(), endpoints },
            queues: 1,
            mtu: 1500,
            router_solicitations: 0,
            ..Interface::default()
        };
        let data_path = DataPath { stats_interval: Duration::ZERO, max_batch_bytes: 128 * 1024, status_dir: None, ..DataPath::default() };
        let c = AgentConfig::new(&format!("u{}", w + 1), bus, interface)?.with_data_path(data_path)?;
        let user = c.identity().user.clone();
        let prefixes: Vec<crate::route::Prefix> = ["198.18.0.0/15", "fd00:7b::/64", "fe80::/10"].iter().filter_map(|p| p.parse().ok()).collect();
        let mode = crate::identity::Mode::Strict(crate::identity::Table::new(vec![(user.clone(), prefixes)]));
        c.with_identity(Identity { user, mode })
    }

    /// Pings the sampled pairs (both families) with the ports' own echo requests: each
    /// probe's RTT, and the pairs that never answered (two tries, 3 s each).
    pub(super) async fn check_userspace_pairs(&self, workers: usize, report: &mut LabReport) {
        let n = self.hosts.len();
        let pairs = plan::pairs(n, self.opts.sample, self.opts.seed);
        report.pairs_checked = pairs.len();
        // Where each host lives: its worker's pinger and its endpoint there.
        let at = |host: usize| -> Option<(&Pinger, EndpointId)> {
            let w = (0..workers).find(|&w| block(n, workers, w).contains(&host))?;
            let pinger = self.agents.get(w)?.pinger()?;
            Some((pinger, EndpointId::from_index(host - block(n, workers, w).start)?))
        };
        let dst = |h: &Host, v6: bool| -> IpAddr {
            if v6 {
                IpAddr::V6(h.v6)
            } else {
                IpAddr::V4(h.v4)
            }
        };
        let mut rtts = Vec::new();
        let mut seq: u16 = 0;
        let mut todo: Vec<(usize, usize, bool)> = pairs.iter().flat_map(|&(a, b)| [(a, b, false), (a, b, true)]).collect();
        let mut failed = Vec::new();
        for _attempt in 0..2 {
            failed.clear();
            // A wave of probes at a time, as the TUN lab pings 8 pairs at a time: the RTT is
            // the path's, not the queue of a thousand probes sent at once.
            for wave in todo.chunks(16) {
                let mut waiting: HashMap<(usize, usize, bool), u16> = HashMap::new();
                for &(a, b, v6) in wave {
                    let Some((pinger, from)) = at(a) else { continue };
                    seq = seq.wrapping_add(1);
                    pinger.ask(from, dst(&self.hosts[b], v6), seq);
                    report.pings_sent += 1;
                    waiting.insert((a, b, v6), seq);
                }
                let deadline = Instant::now() + Duration::from_secs(3);
                while !waiting.is_empty() && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    for agent in &self.agents {
                        let Some(pinger) = agent.pinger() else { continue };
                        for r in pinger.replies() {
                            let key = waiting
                                .iter()
                                .find(|(&(a, b, v6), &s)| s == r.seq && dst(&self.hosts[b], v6) == r.from && at(a).is_some_and(|(_, e)| e == r.endpoint))
                                .map(|(k, _)| *k);
                            if let Some(k) = key {
                                waiting.remove(&k);
                                rtts.push(r.rtt.as_secs_f64() * 1000.0);
                            }
                        }
                    }
                }
                failed.extend(waiting.into_keys());
            }
            todo = std::mem::take(&mut failed);
            if todo.is_empty() {
                break;
            }
        }
        let mut failures: Vec<String> =
            todo.iter().map(|&(a, b, v6)| format!("{} -> {} ({}): no reply", self.hosts[a].name, self.hosts[b].name, dst(&self.hosts[b], v6))).collect();
        failures.sort();
        report.failures.extend(failures);
        report.rtt_p50_ms = plan::quantile(&rtts, 0.5);
        report.rtt_p99_ms = plan::quantile(&rtts, 0.99);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_cover_every_host_once_and_differ_by_at_most_one() {
        for hosts in [2, 3, 159, 160, 161, 1000, 2000, 10_000, 20_000] {
            let w = workers_for(hosts);
            assert!((1..=MAX_WORKERS).contains(&w));
            let mut next = 0;
            let sizes: Vec<usize> = (0..w)
                .map(|k| block(hosts, w, k))
                .inspect(|b| {
                    assert_eq!(b.start, next, "{hosts} hosts, block {b:?}");
                    next = b.end;
                })
                .map(|b| b.len())
                .collect();
            assert_eq!(next, hosts);
            assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1, "{sizes:?}");
        }
        assert_eq!(workers_for(10_000), 63);
        assert_eq!(workers_for(20_000), MAX_WORKERS);
    }
}
