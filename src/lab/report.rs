//! What the lab tells its user: the report (hosts, pairs, RTTs, links, throughput,
//! memory) and, with `--keep`, the hosts table and a live line until Ctrl-C.
//!
//! Main thread; not on the hot path.

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;

use super::Lab;
use crate::agent::Agent;
use crate::metrics::report::bits_per_s;

/// One pair of hosts of a topology: its link as configured, and what the pings measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LinkReport {
    pub a: String,
    pub b: String,
    pub linked: bool,
    /// The link's emulation, in tc-netem words (`None`: a plain link).
    pub emulate: Option<String>,
    /// The round trip the emulation adds (its delay, both ways).
    pub configured_rtt_ms: Option<f64>,
    pub rtt_p50_ms: Option<f64>,
    /// Echo replies out of requests, both directions and both address families.
    pub replies: usize,
    pub requests: usize,
    /// A link with `loss`: round trips lost out of a burst of pings (a → b, IPv4).
    pub loss_probe: Option<(usize, usize)>,
    /// A link with `rate`: one TCP flow a → b (iperf3), bits per second.
    pub tcp_bits_per_s: Option<f64>,
}

/// The lab's findings.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LabReport {
    pub session: String,
    pub hosts: usize,
    pub hosts_up: usize,
    pub queues: usize,
    pub broker: String,
    pub bring_up_s: f64,
    pub pairs_checked: usize,
    pub pings_sent: usize,
    pub failures: Vec<String>,
    pub rtt_p50_ms: Option<f64>,
    pub rtt_p99_ms: Option<f64>,
    pub throughput_bits_per_s: Option<f64>,
    pub throughput_note: String,
    pub rss_mib: f64,
    pub rss_per_agent_mib: f64,
    /// Hosts per broker node (the node each host lists first).
    pub nodes: Vec<(String, usize)>,
    /// `--topology`: each link (and each pair without one), configured beside measured.
    pub links: Vec<LinkReport>,
    /// `--dhcp`: hosts that leased their IPv4 address from h1, out of those that asked.
    pub dhcp_leases: Option<(usize, usize)>,
    /// `--e2e`: every host sealed its batches end to end.
    pub e2e: bool,
    /// `--radio`: pairs were checked with frames (`pings_sent` counts frames sent, RTTs
    /// are one-way latencies from probe to probe, a link's replies are frames heard).
    pub radio: bool,
    /// A routed topology: who reached whom.
    pub reach: Option<super::routed::Reach>,
    /// `--check` of a running lab: only its pairs were pinged.
    pub graded: bool,
    pub ok: bool,
}

impl std::fmt::Display for LabReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |v: Option<f64>| v.map(|v| format!("{v:.3} ms")).unwrap_or_else(|| "-".into());
        let sealed = if self.e2e { ", end-to-end encrypted" } else { "" };
        if self.graded {
            writeln!(f, "tunbus lab, session {}: the running lab graded (every pair must reach)", self.session)?;
            writeln!(f, "  pairs checked   {} ({} pings, IPv4 and IPv6), failures: {}", self.pairs_checked, self.pings_sent, self.failures.len())?;
            for fail in &self.failures {
                writeln!(f, "    FAILED {fail}")?;
            }
            if let Some(reach) = &self.reach {
                write!(f, "{reach}")?;
            }
            writeln!(f, "  ping RTT        p50 {}, p99 {}", ms(self.rtt_p50_ms), ms(self.rtt_p99_ms))?;
            return write!(f, "  result          {}", if self.ok { "OK" } else { "FAILED" });
        }
        writeln!(f, "tunbus lab, session {} ({} queue(s) per host, broker {}{sealed})", self.session, self.queues, self.broker)?;
        writeln!(f, "  hosts up        {}/{} in {:.2} s", self.hosts_up, self.hosts, self.bring_up_s)?;
        if let Some((leased, asked)) = self.dhcp_leases {
            writeln!(f, "  DHCP leases     {leased}/{asked} (dnsmasq in h1, busybox udhcpc in the others, over the bus)")?;
        }
        match self.radio {
            true => writeln!(
                f,
                "  pairs checked   {} ({} frames sent, each heard by the radios linked to its sender), failures: {}",
                self.pairs_checked,
                self.pings_sent,
                self.failures.len()
            )?,
            false => writeln!(f, "  pairs checked   {} ({} pings, IPv4 and IPv6), failures: {}", self.pairs_checked, self.pings_sent, self.failures.len())?,
        }
        for fail in self.failures.iter().take(20) {
            writeln!(f, "    FAILED {fail}")?;
        }
        if self.failures.len() > 20 {
            writeln!(f, "    … and {} more", self.failures.len() - 20)?;
        }
        match self.radio {
            true => writeln!(f, "  frame latency   p50 {}, p99 {} (one way, probe to probe)", ms(self.rtt_p50_ms), ms(self.rtt_p99_ms))?,
            false => writeln!(f, "  ping RTT        p50 {}, p99 {}", ms(self.rtt_p50_ms), ms(self.rtt_p99_ms))?,
        }
        if let Some(reach) = &self.reach {
            write!(f, "{reach}")?;
        }
        for l in &self.links {
            let configured = match (&l.emulate, l.linked) {
                (_, false) => "no link".to_owned(),
                (None, true) => "plain link".to_owned(),
                (Some(e), true) if self.radio => format!("emulate {e} (+{:.1} ms one way)", l.configured_rtt_ms.unwrap_or(0.0)),
                (Some(e), true) => format!("emulate {e} (+{:.1} ms RTT)", l.configured_rtt_ms.unwrap_or(0.0)),
            };
            let mut measured = match self.radio {
                true => format!("one way p50 {}, {}/{} frames heard", ms(l.rtt_p50_ms), l.replies, l.requests),
                false => format!("RTT p50 {}, {}/{} replies", ms(l.rtt_p50_ms), l.replies, l.requests),
            };
            if let Some((lost, sent)) = l.loss_probe {
                measured += &format!(", {lost}/{sent} round trips lost");
            }
            if let Some(bps) = l.tcp_bits_per_s {
                measured += &format!(", TCP {:.2} Mbit/s", bps / 1e6);
            }
            writeln!(f, "  link {:<4}{:<5} {configured:<44} measured: {measured}", l.a, l.b)?;
        }
        match self.throughput_bits_per_s {
            Some(b) => writeln!(f, "  TCP h1 -> h2    {:.2} Gbit/s {}", b / 1e9, self.throughput_note)?,
            None => writeln!(f, "  TCP h1 -> h2    - ({})", self.throughput_note)?,
        }
        if self.nodes.len() > 1 {
            for (node, hosts) in &self.nodes {
                writeln!(f, "  node {node:<21} {hosts} host(s)")?;
            }
        }
        writeln!(f, "  memory          {:.1} MiB for the lab process, {:.2} MiB per agent", self.rss_mib, self.rss_per_agent_mib)?;
        write!(f, "  result          {}", if self.ok { "OK" } else { "FAILED" })
    }
}

pub(super) fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse::<f64>().ok()))
        .map(|kib| kib / 1024.0)
        .unwrap_or(0.0)
}

impl Lab {
    pub(super) fn print_hosts(&self) {
        if let Some(t) = self.opts.topology.as_ref().filter(|t| t.is_routed()) {
            println!("{:<6} {:<14} {:<8} addresses", "host", "namespace", "role");
            for h in &self.hosts {
                let addrs: Vec<String> = t.addresses_of(h.index - 1).iter().map(ToString::to_string).collect();
                let role = match (t.is_router(h.index - 1), self.opts.routers) {
                    (true, true) => "router",
                    (true, false) => "router*",
                    _ => "host",
                };
                println!("{:<6} {:<14} {role:<8} {}", h.name, h.netns, addrs.join(" "));
            }
            if !self.opts.routers {
                println!("\n* forwarding off (--routers off): a program of yours in the router's namespace routes, e.g.");
                println!(
                    "  ip netns exec {} python3 examples/forwarder.py tb0",
                    self.hosts.iter().find(|h| t.is_router(h.index - 1)).map_or("tb-h1", |h| h.netns.as_str())
                );
                println!(
                    "then grade it:  agent lab --check --topology FILE{}",
                    if self.opts.session == super::plan::DEFAULT_SESSION { String::new() } else { format!(" --session {}", self.opts.session) }
                );
            }
            println!("\nenter a host:  ip netns exec {} bash", self.hosts[0].netns);
            println!("Ctrl-C tears the lab down.\n");
            return;
        }
        println!("{:<6} {:<14} {:<16} {:<24}", "host", "namespace", "IPv4 (/15)", "IPv6 (/64)");
        for h in self.hosts.iter().take(50) {
            println!("{:<6} {:<14} {:<16} {:<24}", h.name, h.netns, h.v4, h.v6);
        }
        if self.hosts.len() > 50 {
            println!("… {} more: host i is 198.18.0.0 + i and fd00:7b::i", self.hosts.len() - 50);
        }
        let h = &self.hosts[0];
        if let Some(dir) = &self.opts.keys {
            let session = if self.opts.session == super::plan::DEFAULT_SESSION { String::new() } else { format!(" --session {}", self.opts.session) };
            println!("\nsee inside the sealed batches:  agent capture --url-file {0}/capture.url{session} --keys {0} -w lab.pcapng", dir.display());
        }
        println!("\nenter a host:  ip netns exec {} bash", h.netns);
        println!("then e.g.:     ping {}   ping {}", self.hosts[1].v4, self.hosts[1].v6);
        println!("Ctrl-C tears the lab down.\n");
    }

    pub(super) async fn live_status(&self, stop: &mut watch::Receiver<bool>) {
        let rx_totals = || self.agents.iter().map(Agent::totals).fold((0u64, 0u64), |(b, p), t| (b + t.rx_bytes, p + t.rx_packets));
        let (b0, p0) = rx_totals();
        let mut last = (b0, p0, Instant::now());
        // On a terminal one line rewritten every second; elsewhere (a log, a script) a line
        // every second with a time stamp, so a reader can follow reconnections.
        let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let t0 = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            let (mut bytes, mut packets, mut drops) = (0u64, 0u64, 0u64);
            for a in &self.agents {
                let t = a.totals();
                bytes += t.rx_bytes;
                packets += t.rx_packets;
                drops += t.total_drops();
            }
            let up = self.agents.iter().filter(|a| a.connected()).count();
            let dt = last.2.elapsed();
            let line = format!(
                "{up}/{} hosts connected, delivering {} ({:.0} packets/s), {drops} drops so far",
                self.agents.len(),
                bits_per_s(bytes.saturating_sub(last.0), dt),
                packets.saturating_sub(last.1) as f64 / dt.as_secs_f64().max(1e-9)
            );
            if terminal {
                eprint!("\r{line}   ");
            } else {
                eprintln!("[{:7.1} s] {line}", t0.elapsed().as_secs_f64());
            }
            last = (bytes, packets, Instant::now());
        }
        if terminal {
            eprintln!();
        }
    }
}
