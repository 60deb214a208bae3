//! `agent lab`: a whole multi-host network on one machine, checked and reported.
//!
//! (`--userspace`: hosts are endpoints of userspace stacks, [`userspace`]; `--radio`:
//! simulated 802.15.4 radios on pseudo-terminals, [`radio`].)
//!
//! For each host i: a namespace (`tb-h<i>`), an agent whose TUN lives in it, and
//! predictable addresses (198.18.0.0 + i /15, fd00:7b::i /64; see [`plan`]). All agents
//! live in this one process and share its tokio runtime: each has its own worker thread(s)
//! and AMQP connections, but no process, runtime or allocator of its own, which is what
//! lets hundreds of hosts come up in seconds. Then: a connectivity check with real `ping`
//! (all pairs, or a seeded sample), a TCP throughput sample with `iperf3`, and a report.
//!
//! Clean-up is the point of a lab: a state file under `/run/tunbus/` is written *before*
//! anything is created, so that a lab killed with SIGKILL is cleaned by the next run (or by
//! `--cleanup`), and at once by the lab's [`guard`] process: namespaces, a private broker,
//! its temporary folder. Interfaces and queues need no record: they die with the process
//! and its connections.

pub mod broker;
mod bus;
mod checks;
pub mod dhcp;
pub mod guard;
mod hosts;
pub mod plan;
pub mod progress;
pub mod radio;
mod report;
pub mod routed;
mod state;
pub mod topology;
pub mod userspace;

pub use report::{LabReport, LinkReport};
pub use state::{cleanup_all, cleanup_session, STATE_DIR};

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::sync::watch;

use crate::agent::Agent;
use crate::amqp::client::Endpoint;
use crate::util::Stop;
use broker::PrivateBroker;
use bus::{revoke_local, SecureSession};
use hosts::delete_namespaces;
use plan::Host;
use report::rss_mib;
use state::{state_path, write_state, State};

/// How long an L2 lab with a topology lets its hosts learn each other's MACs before it checks.
const L2_LEARN: Duration = Duration::from_secs(3);

/// What `agent lab` was asked to do.
#[derive(Clone, Debug)]
pub struct LabOptions {
    pub hosts: usize,
    pub queues: usize,
    pub keep: bool,
    /// The broker given by `--url` (else localhost, else a private node).
    pub endpoints: Option<Vec<Endpoint>>,
    pub heartbeat: Duration,
    pub session: String,
    pub sample: usize,
    pub seed: u64,
    pub throughput: Duration,
    pub private_broker: bool,
    /// Nodes of a private cluster to start (1: one node, or the local broker).
    pub brokers: usize,
    pub mtu: u32,
    /// Provision the session (vhost, one user per host, permissions) and run each host with
    /// its own identity, strict mode.
    pub secure: bool,
    /// `--topology`: which hosts are linked, with what emulation (`None`: all, plain).
    pub topology: Option<topology::LabTopology>,
    /// `--userspace`: hosts are endpoints of userspace stacks, many per worker (no
    /// namespaces, at most 64 broker connections).
    pub userspace: bool,
    /// `--l2`: hosts have TAPs in an Ethernet session.
    pub l2: bool,
    /// `--radio`: hosts are simulated 802.15.4 radios on pseudo-terminals (no namespaces).
    pub radio: bool,
    /// `--e2e`: every host seals its batches end to end (needs `secure`: keys are bound to
    /// the hosts' broker users).
    pub e2e: bool,
    /// `--dhcp` (with `l2`): h1 serves DHCP, the other hosts lease their IPv4 addresses.
    pub dhcp: bool,
    /// `--keys DIR` (with `e2e`): each host's session-key log, DIR/<host>.keys.
    pub keys: Option<PathBuf>,
    /// A routed topology's routers forward (`--routers on`, the default); off, a user's
    /// program in their namespaces must.
    pub routers: bool,
    /// `--check`: grade (every pair must reach) instead of checking the topology's
    /// expectation; with a lab of the session running, grade that one and start nothing.
    pub check: bool,
}

/// Everything the lab created, torn down in `teardown` (and, for namespaces and the
/// broker, by the next run if this process is killed).
struct Lab {
    opts: LabOptions,
    hosts: Vec<Host>,
    agents: Vec<Agent>,
    /// Private nodes this lab started (one, or a `--brokers N` cluster).
    private: Vec<PrivateBroker>,
    temp_dir: Option<PathBuf>,
    endpoints: Vec<Endpoint>,
    interrupt: Stop,
    /// `--secure`: the session's users (user, URL) per host, and the strict table.
    identities: Option<SecureSession>,
    /// The session was provisioned on a shared broker (revoked at teardown, also when the
    /// bring-up failed after it).
    provisioned: bool,
    /// `--e2e`: each host's static key, in host order (made in this process, never written).
    e2e_keys: Vec<crate::e2e::keys::PrivateKey>,
    /// `--dhcp`: the server in h1, killed at teardown.
    dhcp: Option<dhcp::DhcpServer>,
}

/// Runs a lab until it is checked (or, with `keep`, until `stop`), then tears it down.
pub async fn run(opts: LabOptions, mut stop: watch::Receiver<bool>, interrupt: Stop) -> anyhow::Result<LabReport> {
    let most = match (opts.userspace, opts.radio) {
        (true, _) => userspace::MAX_HOSTS,
        (_, true) => radio::MAX_HOSTS,
        _ => plan::MAX_HOSTS,
    };
    if opts.hosts < 2 || opts.hosts > most {
        bail!("--hosts must be between 2 and {most}{}", if opts.userspace || opts.radio { "" } else { " (--userspace goes to 20000)" });
    }
    // Per queue of each host: a TUN queue and a socket; then namespaces, pipes, slack. A
    // userspace lab: a socket and a poller per worker.
    let fds = if opts.userspace { (userspace::workers_for(opts.hosts) * 4 + 256) as u64 } else { (opts.hosts * opts.queues * 2 + opts.hosts + 256) as u64 };
    let got = crate::sys::raise_fd_limit(fds).context("raising the open-files limit")?;
    if got < fds {
        bail!(
            "a lab of {} hosts needs {fds} open files, and this process may have {got}: raise the hard limit (ulimit -Hn, or LimitNOFILE= in a unit)",
            opts.hosts
        );
    }
    cleanup_session(&opts.session)?;
    let mut state = State { pid: std::process::id(), session: opts.session.clone(), hosts: opts.hosts, ..State::default() };
    write_state(&state)?;
    guard::spawn(&opts.session)?;
    let mut lab = Lab {
        opts: opts.clone(),
        hosts: match opts.topology.as_ref().filter(|t| t.is_routed()) {
            Some(t) => routed::routed_hosts(&opts.session, t),
            None => plan::hosts(&opts.session, opts.hosts),
        },
        agents: Vec::new(),
        private: Vec::new(),
        temp_dir: None,
        endpoints: Vec::new(),
        interrupt,
        identities: None,
        provisioned: false,
        e2e_keys: Vec::new(),
        dhcp: None,
    };
    let result = lab.up_and_check(&mut state, &mut stop).await;
    lab.teardown().await;
    let _ = std::fs::remove_file(state_path(&opts.session));
    result
}

impl Lab {
    async fn up_and_check(&mut self, state: &mut State, stop: &mut watch::Receiver<bool>) -> anyhow::Result<LabReport> {
        let mut report = LabReport { session: self.opts.session.clone(), hosts: self.opts.hosts, queues: self.opts.queues, ..LabReport::default() };
        self.endpoints = self.choose_broker(state)?;
        report.broker = match self.private.as_slice() {
            [] => self.endpoints.iter().map(|e| e.url.to_string()).collect::<Vec<_>>().join(", "),
            [b] => format!("private node {} on port {}", b.node, b.port),
            nodes => format!("private {}-node cluster on ports {}", nodes.len(), nodes.iter().map(|b| b.port.to_string()).collect::<Vec<_>>().join(", ")),
        };
        if let (true, Some(dir)) = (self.opts.e2e, &self.opts.keys) {
            std::fs::create_dir_all(dir).with_context(|| format!("making --keys {}", dir.display()))?;
        }
        if self.opts.secure {
            self.provision(state)?;
        }
        if self.opts.e2e {
            if self.identities.is_none() {
                bail!("--e2e needs --secure: each host's key is bound to its own broker user");
            }
            self.e2e_keys = (0..self.hosts.len()).map(|_| crate::e2e::keys::PrivateKey::generate()).collect::<Result<_, _>>().map_err(anyhow::Error::msg)?;
            report.e2e = true;
        }
        let t0 = Instant::now();
        if self.opts.userspace {
            return self.up_and_check_userspace(report, t0, stop).await;
        }
        if self.opts.radio {
            std::fs::create_dir_all(radio::radio_dir(&self.opts.session)).context("making the folder of the radios' pseudo-terminals")?;
        } else {
            self.create_namespaces()?;
            if let Some(t) = self.opts.topology.clone().filter(|t| t.is_routed()) {
                self.set_up_routers(&t)?;
            }
        }
        let mut progress = progress::Progress::new("hosts started", self.hosts.len(), t0);
        for host in self.hosts.clone() {
            if *stop.borrow() {
                bail!("interrupted during bring-up");
            }
            let config = if self.opts.radio { self.radio_config(&host) } else { self.agent_config(&host) };
            let config = config.with_context(|| format!("configuring host {}", host.name))?;
            let Some(agent) = Agent::start(config, &self.interrupt).await.with_context(|| format!("starting host {}", host.name))? else {
                bail!("interrupted during bring-up");
            };
            self.agents.push(agent);
            progress.update(self.agents.len());
        }
        progress.finish();
        self.wait_connected(t0, stop).await?;
        report.bring_up_s = t0.elapsed().as_secs_f64();
        let n = self.endpoints.len().max(1);
        report.nodes = self.endpoints.iter().enumerate().map(|(i, e)| (e.url.authority(), (0..self.hosts.len()).filter(|h| h % n == i).count())).collect();
        report.hosts_up = self.agents.len();
        tracing::info!(hosts = report.hosts_up, seconds = report.bring_up_s, "lab up");

        if self.opts.radio {
            report.radio = true;
            self.check_radios(&mut report).await;
            report.throughput_note = "no TCP sample in a radio lab".into();
        } else {
            self.check_hosts(&mut report).await?;
        }
        report.rss_mib = rss_mib();
        report.rss_per_agent_mib = report.rss_mib / self.agents.len().max(1) as f64;
        report.ok = report.failures.is_empty() && report.hosts_up == report.hosts;

        if self.opts.keep {
            if self.opts.radio {
                self.print_radios();
            } else {
                self.print_hosts();
            }
            println!("{report}");
            self.live_status(stop).await;
        }
        Ok(report)
    }

    /// The checks of a lab of namespaces: (with `--dhcp`) the leases, the pairs, a TCP sample.
    async fn check_hosts(&mut self, report: &mut LabReport) -> anyhow::Result<()> {
        if self.opts.l2 && self.opts.topology.is_some() {
            // Until the hosts have heard each other's hellos (asked for every 2 s), a frame
            // to a MAC not yet learned is flooded, and floods are not emulated: the links'
            // delays would be measured on some pings and not on others.
            tokio::time::sleep(L2_LEARN).await;
        }
        if self.opts.dhcp {
            self.dhcp = Some(self.start_dhcp()?);
            let (leased, failures) = self.lease_all().await;
            report.dhcp_leases = Some((leased, self.hosts.len() - 1));
            report.failures.extend(failures);
        }
        self.check_pairs(report).await;
        let (bps, note) = self.throughput_sample().await;
        report.throughput_bits_per_s = bps;
        report.throughput_note = note;
        Ok(())
    }

    /// `--userspace`: workers hosting endpoints instead of namespaces with agents.
    async fn up_and_check_userspace(&mut self, mut report: LabReport, t0: Instant, stop: &mut watch::Receiver<bool>) -> anyhow::Result<LabReport> {
        let workers = userspace::workers_for(self.hosts.len());
        let mut progress = progress::Progress::new("workers started", workers, t0);
        for w in 0..workers {
            if *stop.borrow() {
                bail!("interrupted during bring-up");
            }
            let config = self.userspace_config(w, workers).with_context(|| format!("configuring userspace worker {}", w + 1))?;
            let Some(agent) = Agent::start(config, &self.interrupt).await.with_context(|| format!("starting userspace worker {}", w + 1))? else {
                bail!("interrupted during bring-up");
            };
            self.agents.push(agent);
            progress.update(self.agents.len());
        }
        progress.finish();
        self.wait_connected(t0, stop).await?;
        report.bring_up_s = t0.elapsed().as_secs_f64();
        report.hosts_up = self.hosts.len();
        report.queues = 1;
        report.nodes = self.endpoints.iter().map(|e| (e.url.authority(), self.hosts.len() / self.endpoints.len().max(1))).collect();
        tracing::info!(hosts = report.hosts_up, workers, seconds = report.bring_up_s, "userspace lab up");
        self.check_userspace_pairs(workers, &mut report).await;
        report.throughput_note = format!("no iperf3 sample in a userspace lab ({workers} broker connections for {} endpoints)", self.hosts.len());
        report.rss_mib = rss_mib();
        report.rss_per_agent_mib = report.rss_mib / self.hosts.len().max(1) as f64;
        report.ok = report.failures.is_empty();
        if self.opts.keep {
            println!("{report}");
            self.live_status(stop).await;
        }
        Ok(report)
    }

    /// Waits up to 60 s for every agent's links to be up.
    async fn wait_connected(&self, t0: Instant, stop: &mut watch::Receiver<bool>) -> anyhow::Result<()> {
        let mut progress = progress::Progress::new("hosts connected", self.agents.len(), t0);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let connected = self.agents.iter().filter(|a| a.connected()).count();
            progress.update(connected);
            if connected == self.agents.len() {
                break;
            }
            if Instant::now() > deadline {
                let down: Vec<String> = self.agents.iter().filter(|a| !a.connected()).map(|a| a.config().name().to_string()).collect();
                bail!("{} host(s) could not reach the broker within 60 s: {}", down.len(), down.join(" "));
            }
            if *stop.borrow() {
                bail!("interrupted during bring-up");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        progress.finish();
        Ok(())
    }

    async fn teardown(&mut self) {
        drop(self.dhcp.take());
        let agents = std::mem::take(&mut self.agents);
        let _ = futures_util::future::join_all(agents.into_iter().map(Agent::shutdown)).await;
        if self.opts.radio {
            radio::remove_radio_dir(&self.opts.session);
        } else if !self.opts.userspace {
            let names: Vec<String> = self.hosts.iter().map(|h| h.netns.clone()).collect();
            delete_namespaces(&names);
        }
        if !self.private.is_empty() {
            for b in std::mem::take(&mut self.private) {
                b.stop();
            }
        } else if self.identities.take().is_some() || self.provisioned {
            let session = self.opts.session.clone();
            let _ = tokio::task::spawn_blocking(move || revoke_local(&session)).await;
        }
        if let Some(dir) = self.temp_dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
