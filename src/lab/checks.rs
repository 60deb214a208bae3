//! What the lab checks once its hosts are up: `ping` between pairs (all, a seeded sample,
//! or a topology's every pair beside its links), loss bursts, and `iperf3` TCP samples.
//!
//! Runtime tasks, up to 8 probes at a time; not on the hot path.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use futures_util::stream::{self, StreamExt};

use super::report::{LabReport, LinkReport};
use super::{plan, topology, Lab};

/// A ping from host a to host b (over IPv6 when the flag says): its RTTs, or why none came back.
pub(super) type FamilyPing = ((usize, usize, bool), Result<Vec<f64>, String>);

/// Pings each of `pairs` (indexes into `hosts`) over IPv4 and over IPv6, 8 at a time: more
/// would have the check itself starve the agents of CPU.
pub(super) async fn ping_pairs(hosts: &[plan::Host], pairs: &[(usize, usize)]) -> Vec<FamilyPing> {
    let jobs: Vec<(usize, usize, bool)> = pairs.iter().flat_map(|&(a, b)| [(a, b, false), (a, b, true)]).collect();
    stream::iter(jobs)
        .map(|(a, b, v6)| {
            let (from, to) = (&hosts[a], &hosts[b]);
            let dst = if v6 { to.v6.to_string() } else { to.v4.to_string() };
            async move { ((a, b, v6), ping(&from.netns, &dst).await) }
        })
        .buffer_unordered(8)
        .collect()
        .await
}

impl Lab {
    pub(super) async fn check_pairs(&self, report: &mut LabReport) {
        match &self.opts.topology {
            Some(t) if t.is_routed() => return self.check_routed(t, report).await,
            Some(t) => return self.check_topology(t, report).await,
            None => {}
        }
        let pairs = plan::pairs(self.hosts.len(), self.opts.sample, self.opts.seed);
        report.pairs_checked = pairs.len();
        report.pings_sent = pairs.len() * 2 * 3;
        let mut rtts = Vec::new();
        for ((a, b, v6), r) in ping_pairs(&self.hosts, &pairs).await {
            match r {
                Ok(mut t) => rtts.append(&mut t),
                Err(why) => {
                    let (from, to) = (&self.hosts[a], &self.hosts[b]);
                    let dst = if v6 { to.v6.to_string() } else { to.v4.to_string() };
                    report.failures.push(format!("{} -> {} ({dst}): {why}", from.name, to.name));
                }
            }
        }
        report.failures.sort();
        report.rtt_p50_ms = plan::quantile(&rtts, 0.5);
        report.rtt_p99_ms = plan::quantile(&rtts, 0.99);
    }

    /// A topology lab: every ordered pair is pinged; linked pairs must answer, the others
    /// must not. Each pair's RTT is reported beside its link's configuration; a link with
    /// `loss` also gets a burst of pings, one with `rate` a TCP flow (one link at a time).
    pub(super) async fn check_topology(&self, t: &topology::LabTopology, report: &mut LabReport) {
        let n = self.hosts.len();
        let pairs = plan::all_pairs(n);
        report.pairs_checked = pairs.len();
        report.pings_sent = pairs.len() * 2 * 3;
        let results = ping_pairs(&self.hosts, &pairs).await;
        let mut all = Vec::new();
        for a in 0..n {
            for b in a + 1..n {
                let link = t.link(a, b);
                let mut rtts = Vec::new();
                let mut replies = 0;
                for ((x, y, _), r) in &results {
                    if (x.min(y), x.max(y)) != (&a, &b) {
                        continue;
                    }
                    if let Ok(v) = r {
                        replies += v.len();
                        rtts.extend_from_slice(v);
                    }
                    let (from, to) = (&self.hosts[*x].name, &self.hosts[*y].name);
                    match (link.is_some(), r) {
                        (true, Err(why)) => report.failures.push(format!("{from} -> {to}: {why}, but they are linked")),
                        (false, Ok(_)) => report.failures.push(format!("{from} -> {to}: answered, but they have no link")),
                        _ => {}
                    }
                }
                all.extend_from_slice(&rtts);
                let spec = link.and_then(|l| l.spec.as_ref());
                let (from, to) = (&self.hosts[a], &self.hosts[b]);
                let loss_probe = match spec.and_then(|s| s.loss) {
                    Some(_) => loss_probe(&from.netns, &to.v4.to_string()).await,
                    None => None,
                };
                let tcp_bits_per_s = match spec.and_then(|s| s.rate) {
                    Some(_) if !self.opts.throughput.is_zero() && which("iperf3").is_some() => iperf(from, to, self.opts.throughput).await.ok(),
                    _ => None,
                };
                report.links.push(LinkReport {
                    a: from.name.clone(),
                    b: to.name.clone(),
                    linked: link.is_some(),
                    emulate: spec.map(ToString::to_string),
                    configured_rtt_ms: spec.map(|s| 2.0 * s.delay.as_secs_f64() * 1000.0),
                    rtt_p50_ms: plan::quantile(&rtts, 0.5),
                    replies,
                    requests: 4 * 3,
                    loss_probe,
                    tcp_bits_per_s,
                });
            }
        }
        report.failures.sort();
        report.rtt_p50_ms = plan::quantile(&all, 0.5);
        report.rtt_p99_ms = plan::quantile(&all, 0.99);
    }

    /// iperf3 from host 1 to host 2 (real TCP through two agents and the broker).
    pub(super) async fn throughput_sample(&self) -> (Option<f64>, String) {
        if self.opts.throughput.is_zero() {
            return (None, "skipped (--throughput-seconds 0)".into());
        }
        if which("iperf3").is_none() {
            return (None, "skipped: iperf3 is not installed (apt-get install iperf3)".into());
        }
        match iperf(&self.hosts[0], &self.hosts[1], self.opts.throughput).await {
            Ok(bps) => (Some(bps), format!("(iperf3, {:.1} s, one flow)", self.opts.throughput.as_secs_f64())),
            Err(why) => (None, why),
        }
    }
}

/// Three pings, 50 ms apart; Ok with the RTTs when at least one came back.
pub(super) async fn ping(netns: &str, dst: &str) -> Result<Vec<f64>, String> {
    let out = tokio::process::Command::new("ip")
        .args(["netns", "exec", netns, "ping", "-n", "-c", "3", "-i", "0.05", "-W", "2", dst])
        .output()
        .await
        .map_err(|e| format!("cannot run ping: {e}"))?;
    let rtts = plan::ping_rtts_ms(&String::from_utf8_lossy(&out.stdout));
    if rtts.is_empty() {
        Err("no reply".into())
    } else {
        Ok(rtts)
    }
}

/// One TCP flow from `from` to `to` for `time` (iperf3): the bits per second received.
pub(super) async fn iperf(from: &plan::Host, to: &plan::Host, time: Duration) -> Result<f64, String> {
    let server = tokio::process::Command::new("ip")
        .args(["netns", "exec", &to.netns, "iperf3", "-s", "-1", "-B", &to.v4.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let Ok(mut server) = server else { return Err("iperf3 server did not start".into()) };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let secs = format!("{:.1}", time.as_secs_f64());
    let out = tokio::process::Command::new("ip").args(["netns", "exec", &from.netns, "iperf3", "-c", &to.v4.to_string(), "-t", &secs, "-J"]).output().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), server.wait()).await;
    let Ok(out) = out else { return Err("iperf3 client did not run".into()) };
    let parsed: Option<f64> = serde_json::from_slice::<serde_json::Value>(&out.stdout).ok().and_then(|v| v["end"]["sum_received"]["bits_per_second"].as_f64());
    parsed.ok_or_else(|| format!("iperf3 failed: {}", String::from_utf8_lossy(&out.stdout).lines().find(|l| l.contains("error")).unwrap_or("no result")))
}

/// Pings in a burst that a link's `loss` shows in (100, 10 ms apart): (lost, sent).
pub(super) async fn loss_probe(netns: &str, dst: &str) -> Option<(usize, usize)> {
    const SENT: usize = 100;
    let out = tokio::process::Command::new("ip")
        .args(["netns", "exec", netns, "ping", "-n", "-q", "-c", &SENT.to_string(), "-i", "0.01", "-W", "1", dst])
        .output()
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let received: usize = text.lines().find_map(|l| l.split(" received").next()?.rsplit(", ").next()?.trim().parse().ok())?;
    Some((SENT.saturating_sub(received), SENT))
}

pub(super) fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(program)).find(|f| f.is_file()))
}
