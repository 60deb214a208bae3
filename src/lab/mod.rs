//! `agent lab`: a whole multi-host network on one machine, checked and reported.
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
pub mod guard;
pub mod plan;
pub mod progress;
pub mod topology;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::stream::{self, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::agent::Agent;
use crate::amqp::client::Endpoint;
use crate::amqp::url::{self, DEFAULT_URL};
use crate::config::{AgentConfig, Bus, ConfigError, DataPath, Identity, Interface};
use crate::util::Stop;
use crate::metrics::report::bits_per_s;
use broker::PrivateBroker;
use plan::Host;

/// Where lab state files live.
pub const STATE_DIR: &str = "/run/tunbus";

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
    pub topology: Option<topology::Topology>,
}

/// A ping from host a to host b: its RTTs, or why none came back.
type PairPing = ((usize, usize), Result<Vec<f64>, String>);

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
    pub ok: bool,
}

impl std::fmt::Display for LabReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |v: Option<f64>| v.map(|v| format!("{v:.3} ms")).unwrap_or_else(|| "-".into());
        writeln!(f, "tunbus lab, session {} ({} queue(s) per host, broker {})", self.session, self.queues, self.broker)?;
        writeln!(f, "  hosts up        {}/{} in {:.2} s", self.hosts_up, self.hosts, self.bring_up_s)?;
        writeln!(f, "  pairs checked   {} ({} pings, IPv4 and IPv6), failures: {}", self.pairs_checked, self.pings_sent, self.failures.len())?;
        for fail in self.failures.iter().take(20) {
            writeln!(f, "    FAILED {fail}")?;
        }
        if self.failures.len() > 20 {
            writeln!(f, "    … and {} more", self.failures.len() - 20)?;
        }
        writeln!(f, "  ping RTT        p50 {}, p99 {}", ms(self.rtt_p50_ms), ms(self.rtt_p99_ms))?;
        for l in &self.links {
            let configured = match (&l.emulate, l.linked) {
                (_, false) => "no link".to_owned(),
                (None, true) => "plain link".to_owned(),
                (Some(e), true) => format!("emulate {e} (+{:.1} ms RTT)", l.configured_rtt_ms.unwrap_or(0.0)),
            };
            let mut measured = format!("RTT p50 {}, {}/{} replies", ms(l.rtt_p50_ms), l.replies, l.requests);
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

/// What a lab leaves on the machine, recorded before it is created.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct State {
    pid: u32,
    session: String,
    hosts: usize,
    broker_node: Option<String>,
    broker_port: Option<u16>,
    /// The private nodes of a `--brokers N` cluster, (node, port), under `temp_dir`.
    #[serde(default)]
    cluster: Vec<(String, u16)>,
    temp_dir: Option<PathBuf>,
    /// The session was provisioned on this broker (admin URL without password when it is
    /// the default one); the next run revokes it.
    #[serde(default)]
    provisioned_on: Option<String>,
}

fn state_path(session: &str) -> PathBuf {
    Path::new(STATE_DIR).join(format!("lab-{session}.json"))
}

/// Writes the state file atomically (a temporary file renamed over it): the lab's guard
/// reads it every 100 ms, and a file caught half-written would read as "the lab is done",
/// so that the guard left without cleaning up.
fn write_state(state: &State) -> anyhow::Result<()> {
    std::fs::create_dir_all(STATE_DIR).with_context(|| format!("creating {STATE_DIR}"))?;
    let path = state_path(&state.session);
    let temp = path.with_extension(format!("json.{}.tmp", std::process::id()));
    std::fs::write(&temp, serde_json::to_vec(state)?).context("writing the lab state file")?;
    std::fs::rename(&temp, &path).context("writing the lab state file")
}

/// Whether process `pid` runs (a zombie, dead but not yet reaped by its parent, does not).
fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

/// Namespaces of `session` that exist now (exact pattern: prefix + digits).
fn session_namespaces(session: &str) -> Vec<String> {
    let prefix = plan::netns_prefix(session);
    let list = crate::tun::netns::ip(None, &["netns", "list"]).unwrap_or_default();
    list.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.strip_prefix(&prefix).is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit())))
        .map(str::to_owned)
        .collect()
}

/// Deletes namespaces in one `ip -batch` run.
fn delete_namespaces(names: &[String]) {
    if names.is_empty() {
        return;
    }
    let script: String = names.iter().map(|n| format!("netns del {n}\n")).collect();
    let _ = run_batch(&script);
}

fn run_batch(script: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = std::process::Command::new("ip")
        .args(["-force", "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running `ip -batch` (install iproute2)")?;
    child.stdin.take().context("ip stdin")?.write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("ip -batch failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Where a lab's broker nodes live: an unpredictable name under the temporary directory.
fn private_dir_name(session: &str) -> anyhow::Result<PathBuf> {
    let mut raw = [0u8; 8];
    std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut raw)).context("reading /dev/urandom")?;
    Ok(std::env::temp_dir().join(format!("tunbus-lab-{session}-{:016x}", u64::from_le_bytes(raw))))
}

/// Creates the folder named by [`private_dir_name`]: mode 0700 (failing if anything is
/// there already), owned by the `rabbitmq` user that runs the nodes (root reads it anyway).
fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().mode(0o700).create(dir).with_context(|| format!("creating {}", dir.display()))?;
    let _ = std::process::Command::new("chown").arg("rabbitmq:rabbitmq").arg(dir).stderr(Stdio::null()).status();
    Ok(())
}

/// Removes what a dead lab of `session` left. Errors if a lab of that session still runs.
pub fn cleanup_session(session: &str) -> anyhow::Result<usize> {
    let path = state_path(session);
    let state: Option<State> = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok());
    if let Some(s) = &state {
        if s.pid != std::process::id() && process_alive(s.pid) {
            bail!("a lab of session {session:?} is running (pid {}); stop it, or use another --session", s.pid);
        }
        if let (Some(node), Some(port), Some(dir)) = (&s.broker_node, s.broker_port, &s.temp_dir) {
            PrivateBroker { node: node.clone(), port, dir: dir.join("rabbitmq") }.stop();
        } else if let (false, Some(dir)) = (s.cluster.is_empty(), &s.temp_dir) {
            for (i, (node, port)) in s.cluster.iter().enumerate() {
                PrivateBroker { node: node.clone(), port: *port, dir: dir.join(format!("node{}", i + 1)) }.stop();
            }
        } else if s.provisioned_on.is_some() {
            revoke_local(session);
        }
        if let Some(dir) = &s.temp_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    let names = session_namespaces(session);
    delete_namespaces(&names);
    let _ = std::fs::remove_file(&path);
    // A lab killed between writing and renaming its state leaves the temporary file.
    let temp_prefix = format!("lab-{session}.json.");
    for e in std::fs::read_dir(STATE_DIR).into_iter().flatten().flatten() {
        if e.file_name().to_str().is_some_and(|n| n.starts_with(&temp_prefix) && n.ends_with(".tmp")) {
            let _ = std::fs::remove_file(e.path());
        }
    }
    Ok(names.len())
}

/// `agent lab --cleanup`: every session with a state file, and the default session.
pub fn cleanup_all() -> anyhow::Result<()> {
    let mut sessions = vec![plan::DEFAULT_SESSION.to_owned()];
    if let Ok(dir) = std::fs::read_dir(STATE_DIR) {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(s) = name.strip_prefix("lab-").and_then(|n| n.strip_suffix(".json")) {
                sessions.push(s.to_owned());
            }
        }
    }
    sessions.sort();
    sessions.dedup();
    for s in sessions {
        match cleanup_session(&s) {
            Ok(n) => println!("session {s}: removed {n} namespace(s)"),
            Err(e) => println!("session {s}: {e:#}"),
        }
    }
    Ok(())
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse::<f64>().ok()))
        .map(|kib| kib / 1024.0)
        .unwrap_or(0.0)
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
}

/// `--secure`: each host's broker user and URL, and the session's strict table.
struct SecureSession {
    by_host: std::collections::HashMap<String, (String, Endpoint)>,
    table: crate::identity::Table,
}

/// Revokes a lab's provisioned session on this machine's broker (rabbitmqctl).
fn revoke_local(session: &str) {
    let Ok(admin) = url::parse(DEFAULT_URL) else { return };
    let o = crate::provision::Options { admin, tls: Default::default(), api: None, session: session.to_owned(), agents: Vec::new(), observers: Vec::new(), out: None, node: None };
    if let Err(e) = crate::provision::revoke(&o) {
        tracing::warn!(session, error = %e, "could not revoke the lab's session");
    }
}

/// Runs a lab until it is checked (or, with `keep`, until `stop`), then tears it down.
pub async fn run(opts: LabOptions, mut stop: watch::Receiver<bool>, interrupt: Stop) -> anyhow::Result<LabReport> {
    if opts.hosts < 2 || opts.hosts > plan::MAX_HOSTS {
        bail!("--hosts must be between 2 and {}", plan::MAX_HOSTS);
    }
    // Per queue of each host: a TUN queue and a socket; then namespaces, pipes, slack.
    let fds = (opts.hosts * opts.queues * 2 + opts.hosts + 256) as u64;
    let got = crate::sys::raise_fd_limit(fds).context("raising the open-files limit")?;
    if got < fds {
        bail!("a lab of {} hosts needs {fds} open files, and this process may have {got}: raise the hard limit (ulimit -Hn, or LimitNOFILE= in a unit)", opts.hosts);
    }
    cleanup_session(&opts.session)?;
    let mut state = State { pid: std::process::id(), session: opts.session.clone(), hosts: opts.hosts, ..State::default() };
    write_state(&state)?;
    guard::spawn(&opts.session)?;
    let mut lab = Lab {
        opts: opts.clone(),
        hosts: plan::hosts(&opts.session, opts.hosts),
        agents: Vec::new(),
        private: Vec::new(),
        temp_dir: None,
        endpoints: Vec::new(),
        interrupt,
        identities: None,
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
        if self.opts.secure {
            self.provision(state)?;
        }
        let t0 = Instant::now();
        self.create_namespaces()?;
        let mut progress = progress::Progress::new("hosts started", self.hosts.len(), t0);
        for host in self.hosts.clone() {
            if *stop.borrow() {
                bail!("interrupted during bring-up");
            }
            let config = self.agent_config(&host).with_context(|| format!("configuring host {}", host.name))?;
            let Some(agent) = Agent::start(config, &self.interrupt).await.with_context(|| format!("starting host {}", host.name))? else {
                bail!("interrupted during bring-up");
            };
            self.agents.push(agent);
            progress.update(self.agents.len());
        }
        progress.finish();
        let mut progress = progress::Progress::new("hosts connected", self.agents.len(), t0);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let connected = self.agents.iter().filter(|a| a.connected()).count();
            progress.update(connected);
            if connected == self.agents.len() {
                break;
            }
            if Instant::now() > deadline {
                let down: Vec<_> = self.agents.iter().filter(|a| !a.connected()).map(|a| a.config().name().to_owned()).collect();
                bail!("{} host(s) could not reach the broker within 60 s: {}", down.len(), down.join(" "));
            }
            if *stop.borrow() {
                bail!("interrupted during bring-up");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        progress.finish();
        report.bring_up_s = t0.elapsed().as_secs_f64();
        let n = self.endpoints.len().max(1);
        report.nodes = self.endpoints.iter().enumerate().map(|(i, e)| (e.url.authority(), (0..self.hosts.len()).filter(|h| h % n == i).count())).collect();
        report.hosts_up = self.agents.len();
        tracing::info!(hosts = report.hosts_up, seconds = report.bring_up_s, "lab up");

        self.check_pairs(&mut report).await;
        let (bps, note) = self.throughput_sample().await;
        report.throughput_bits_per_s = bps;
        report.throughput_note = note;
        report.rss_mib = rss_mib();
        report.rss_per_agent_mib = report.rss_mib / self.agents.len().max(1) as f64;
        report.ok = report.failures.is_empty() && report.hosts_up == report.hosts;

        if self.opts.keep {
            self.print_hosts();
            println!("{report}");
            self.live_status(stop).await;
        }
        Ok(report)
    }

    /// `--url`, else (one node asked for) localhost:5672 if it answers and can hold the
    /// lab, else a private node, or a private cluster of `--brokers N` nodes.
    fn choose_broker(&mut self, state: &mut State) -> anyhow::Result<Vec<Endpoint>> {
        if let Some(endpoints) = &self.opts.endpoints {
            return Ok(endpoints.clone());
        }
        let connections = self.opts.hosts * self.opts.queues;
        if self.opts.brokers <= 1 && !self.opts.private_broker && broker::answers("127.0.0.1:5672") {
            match broker::local_capacity() {
                Some(cap) if !cap.holds(connections) => tracing::warn!(
                    connections,
                    sockets_free = cap.sockets_free,
                    memory_free_mib = cap.memory_free / (1 << 20),
                    "the local broker cannot hold this lab (raise its open-files limit: scripts/setup.sh starts it so); starting a private node with a raised limit instead"
                ),
                _ => return Ok(vec![Endpoint::plain(url::parse(&DEFAULT_URL.replace("localhost", "127.0.0.1"))?)]),
            }
        }
        if !broker::installed() {
            bail!("no broker answers on localhost:5672 and RabbitMQ is not installed: apt-get install rabbitmq-server (or pass --url)");
        }
        // Recorded before it exists, so that no moment of a kill leaves it behind.
        let dir = private_dir_name(&self.opts.session)?;
        self.temp_dir = Some(dir.clone());
        state.temp_dir = Some(dir.clone());
        write_state(state)?;
        create_private_dir(&dir)?;
        if self.opts.brokers > 1 {
            tracing::info!(nodes = self.opts.brokers, "starting a private RabbitMQ cluster");
            let prepared: Vec<PrivateBroker> = (1..=self.opts.brokers)
                .map(|i| PrivateBroker::prepare(&dir.join(format!("node{i}")), &broker::NodeConfig::default()))
                .collect::<anyhow::Result<_>>()?;
            // Recorded before anything runs: a killed lab's nodes are stopped by the next run.
            state.cluster = prepared.iter().map(|b| (b.node.clone(), b.port)).collect();
            write_state(state)?;
            let cluster = broker::PrivateCluster::start_prepared(prepared)?;
            let urls = cluster.urls();
            self.private = cluster.nodes;
            return urls.iter().map(|u| Ok(Endpoint::plain(url::parse(u)?))).collect();
        }
        tracing::info!("starting a private RabbitMQ node");
        let b = PrivateBroker::prepare(&dir.join("rabbitmq"), &broker::NodeConfig::default())?;
        state.broker_node = Some(b.node.clone());
        state.broker_port = Some(b.port);
        write_state(state)?;
        b.launch()?;
        b.wait_up(None, Duration::from_secs(60))?;
        let url = url::parse(&b.url())?;
        self.private = vec![b];
        Ok(vec![Endpoint::plain(url)])
    }

    /// `--secure`: the session's vhost, one user per host, permissions; recorded first so
    /// that a killed lab's session is revoked by the next run.
    fn provision(&mut self, state: &mut State) -> anyhow::Result<()> {
        let Some(base) = self.endpoints.first().map(|e| e.url.clone()) else { bail!("no broker") };
        let agents: Vec<crate::provision::plan::AgentSpec> = self.hosts.iter().map(|h| crate::provision::plan::AgentSpec { name: h.name.clone(), prefixes: h.prefixes().to_vec() }).collect();
        let o = crate::provision::Options {
            admin: base.clone(),
            tls: Default::default(),
            api: None,
            session: self.opts.session.clone(),
            agents,
            observers: Vec::new(),
            out: None,
            node: self.private.first().map(|b| b.node.clone()),
        };
        if self.private.is_empty() {
            state.provisioned_on = Some(base.authority());
            write_state(state)?;
        }
        let t0 = Instant::now();
        let summary = crate::provision::provision(&o).context("provisioning the lab's session (--secure)")?;
        let plan = summary.plan.context("provisioning made no plan")?;
        let table = crate::identity::peers_file::parse(&plan.peers_file(), Some(&plan.session)).map_err(anyhow::Error::msg)?;
        let mut by_host = std::collections::HashMap::new();
        for u in &plan.users {
            let url = base.with_credentials(&u.user, &u.password).with_vhost(&plan.vhost);
            by_host.insert(u.agent.clone(), (u.user.clone(), Endpoint::plain(url)));
        }
        tracing::info!(users = plan.users.len(), seconds = t0.elapsed().as_secs_f64(), via = summary.backend, "lab session provisioned");
        self.identities = Some(SecureSession { by_host, table });
        Ok(())
    }

    fn create_namespaces(&self) -> anyhow::Result<()> {
        let script: String = self.hosts.iter().map(|h| format!("netns add {}\n", h.netns)).collect();
        run_batch(&script).context("creating the lab's namespaces")?;
        for h in &self.hosts {
            crate::tun::netns::ip(Some(&h.netns), &["link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    fn agent_config(&self, host: &Host) -> Result<AgentConfig, ConfigError> {
        // Hosts spread over the nodes round robin; each lists the others after its own.
        let n = self.endpoints.len().max(1);
        let mut endpoints = self.endpoints.clone();
        endpoints.rotate_left((host.index - 1) % n);
        // Every host logs in as the same user: it may use the lab's prefixes. (First claim
        // would have every host bind every hello: N² messages.) With --secure: the host's
        // own user, and only the session's users and addresses.
        let mut user = None;
        if let Some((login, endpoint)) = self.identities.as_ref().and_then(|secure| secure.by_host.get(&host.name)) {
            let url = &endpoint.url;
            endpoints = endpoints.iter().map(|e| Endpoint::plain(e.url.with_credentials(url.username.as_deref().unwrap_or(login), url.password().unwrap_or("")).with_vhost(&url.vhost))).collect();
            user = Some(login.clone());
        }
        // Many agents per process, so smaller per-agent buffers: 128 KiB batches, 32 KiB
        // frames (each data connection reads into two frames' worth). The same at every lab
        // size, so that a lab's figures compare across sizes; `agent connect` keeps the
        // defaults tuned for throughput.
        let bus = Bus { heartbeat: self.opts.heartbeat, check_name: false, frame_max: Some(32 * 1024), ..Bus::new(endpoints).in_session(&self.opts.session) };
        let interface = Interface {
            queues: self.opts.queues,
            addrs: host.prefixes().to_vec(),
            netns: Some(host.netns.clone()),
            mtu: self.opts.mtu,
            router_solicitations: 0, // a lab has no router: nothing to solicit
            ..Interface::default()
        };
        let emulation = match &self.opts.topology {
            Some(t) => {
                let names: Vec<String> = self.hosts.iter().map(|h| h.name.clone()).collect();
                let addrs: Vec<Vec<std::net::IpAddr>> = self.hosts.iter().map(|h| h.prefixes().iter().map(|p| p.addr).collect()).collect();
                // `Host::index` counts from 1; the topology's indices from 0.
                crate::emulate::Emulation { known: topology::Topology::addresses(&names, &addrs), ..t.emulation_of(host.index - 1, &names, self.opts.seed) }
            }
            None => crate::emulate::Emulation::default(),
        };
        let data_path = DataPath { stats_interval: Duration::ZERO, max_batch_bytes: 128 * 1024, status_dir: None, emulation, ..DataPath::default() };
        let c = AgentConfig::new(&host.name, bus, interface)?.with_data_path(data_path)?;
        let user = user.unwrap_or_else(|| c.identity().user.clone());
        let mode = match &self.identities {
            Some(secure) => crate::identity::Mode::Strict(secure.table.clone()),
            None => {
                let prefixes: Vec<crate::route::Prefix> = ["198.18.0.0/15", "fd00:7b::/64", "fe80::/10"].iter().filter_map(|p| p.parse().ok()).collect();
                crate::identity::Mode::Strict(crate::identity::Table::new(vec![(user.clone(), prefixes)]))
            }
        };
        c.with_identity(Identity { user, mode })
    }

    async fn check_pairs(&self, report: &mut LabReport) {
        if let Some(t) = &self.opts.topology {
            return self.check_topology(t, report).await;
        }
        let pairs = plan::pairs(self.hosts.len(), self.opts.sample, self.opts.seed);
        report.pairs_checked = pairs.len();
        let jobs: Vec<(usize, usize, bool)> = pairs.iter().flat_map(|&(a, b)| [(a, b, false), (a, b, true)]).collect();
        report.pings_sent = jobs.len() * 3;
        let results: Vec<(String, Result<Vec<f64>, String>)> = stream::iter(jobs)
            .map(|(a, b, v6)| {
                let from = self.hosts[a].clone();
                let to = self.hosts[b].clone();
                async move {
                    let dst = if v6 { to.v6.to_string() } else { to.v4.to_string() };
                    let label = format!("{} -> {} ({dst})", from.name, to.name);
                    (label, ping(&from.netns, &dst).await)
                }
            })
            // 8 pings at a time: more would have the check itself starve the agents of CPU.
            .buffer_unordered(8)
            .collect()
            .await;
        let mut rtts = Vec::new();
        for (label, r) in results {
            match r {
                Ok(mut t) => rtts.append(&mut t),
                Err(why) => report.failures.push(format!("{label}: {why}")),
            }
        }
        report.failures.sort();
        report.rtt_p50_ms = plan::quantile(&rtts, 0.5);
        report.rtt_p99_ms = plan::quantile(&rtts, 0.99);
    }

    /// A topology lab: every ordered pair is pinged; linked pairs must answer, the others
    /// must not. Each pair's RTT is reported beside its link's configuration; a link with
    /// `loss` also gets a burst of pings, one with `rate` a TCP flow (one link at a time).
    async fn check_topology(&self, t: &topology::Topology, report: &mut LabReport) {
        let n = self.hosts.len();
        let jobs: Vec<(usize, usize, bool)> = (0..n).flat_map(|a| (0..n).filter(move |b| *b != a).flat_map(move |b| [(a, b, false), (a, b, true)])).collect();
        report.pairs_checked = n * (n - 1);
        report.pings_sent = jobs.len() * 3;
        let results: Vec<PairPing> = stream::iter(jobs)
            .map(|(a, b, v6)| {
                let (from, to) = (self.hosts[a].clone(), self.hosts[b].clone());
                async move {
                    let dst = if v6 { to.v6.to_string() } else { to.v4.to_string() };
                    ((a, b), ping(&from.netns, &dst).await)
                }
            })
            .buffer_unordered(8)
            .collect()
            .await;
        let mut all = Vec::new();
        for a in 0..n {
            for b in a + 1..n {
                let link = t.link(a, b);
                let mut rtts = Vec::new();
                let mut replies = 0;
                for ((x, y), r) in &results {
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
    async fn throughput_sample(&self) -> (Option<f64>, String) {
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

    fn print_hosts(&self) {
        println!("{:<6} {:<14} {:<16} {:<24}", "host", "namespace", "IPv4 (/15)", "IPv6 (/64)");
        for h in self.hosts.iter().take(50) {
            println!("{:<6} {:<14} {:<16} {:<24}", h.name, h.netns, h.v4, h.v6);
        }
        if self.hosts.len() > 50 {
            println!("… {} more: host i is 198.18.0.0 + i and fd00:7b::i", self.hosts.len() - 50);
        }
        let h = &self.hosts[0];
        println!("\nenter a host:  ip netns exec {} bash", h.netns);
        println!("then e.g.:     ping {}   ping {}", self.hosts[1].v4, self.hosts[1].v6);
        println!("Ctrl-C tears the lab down.\n");
    }

    async fn live_status(&self, stop: &mut watch::Receiver<bool>) {
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

    async fn teardown(&mut self) {
        let agents = std::mem::take(&mut self.agents);
        let _ = futures_util::future::join_all(agents.into_iter().map(Agent::shutdown)).await;
        let names: Vec<String> = self.hosts.iter().map(|h| h.netns.clone()).collect();
        delete_namespaces(&names);
        if !self.private.is_empty() {
            for b in std::mem::take(&mut self.private) {
                b.stop();
            }
        } else if self.identities.take().is_some() {
            let session = self.opts.session.clone();
            let _ = tokio::task::spawn_blocking(move || revoke_local(&session)).await;
        }
        if let Some(dir) = self.temp_dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Three pings, 50 ms apart; Ok with the RTTs when at least one came back.
async fn ping(netns: &str, dst: &str) -> Result<Vec<f64>, String> {
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
async fn iperf(from: &plan::Host, to: &plan::Host, time: Duration) -> Result<f64, String> {
    let server = tokio::process::Command::new("ip")
        .args(["netns", "exec", &to.netns, "iperf3", "-s", "-1", "-B", &to.v4.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let Ok(mut server) = server else { return Err("iperf3 server did not start".into()) };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let secs = format!("{:.1}", time.as_secs_f64());
    let out = tokio::process::Command::new("ip")
        .args(["netns", "exec", &from.netns, "iperf3", "-c", &to.v4.to_string(), "-t", &secs, "-J"])
        .output()
        .await;
    let _ = tokio::time::timeout(Duration::from_secs(2), server.wait()).await;
    let Ok(out) = out else { return Err("iperf3 client did not run".into()) };
    let parsed: Option<f64> = serde_json::from_slice::<serde_json::Value>(&out.stdout).ok().and_then(|v| v["end"]["sum_received"]["bits_per_second"].as_f64());
    parsed.ok_or_else(|| format!("iperf3 failed: {}", String::from_utf8_lossy(&out.stdout).lines().find(|l| l.contains("error")).unwrap_or("no result")))
}

/// Pings in a burst that a link's `loss` shows in (100, 10 ms apart): (lost, sent).
async fn loss_probe(netns: &str, dst: &str) -> Option<(usize, usize)> {
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

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(program)).find(|f| f.is_file()))
}
