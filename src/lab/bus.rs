//! The lab's bus: which broker (`--url`, the local one, or a private node or cluster of
//! its own) and, with `--secure`, the session's users, one per host.
//!
//! Main thread; not on the hot path.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::broker::{self, PrivateBroker};
use super::state::{write_state, State};
use super::Lab;
use crate::amqp::client::Endpoint;
use crate::amqp::url::{self, DEFAULT_URL};

/// Where a lab's broker nodes live: an unpredictable name under the temporary directory.
pub(super) fn private_dir_name(session: &str) -> anyhow::Result<PathBuf> {
    let mut raw = [0u8; 8];
    std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut raw)).context("reading /dev/urandom")?;
    Ok(std::env::temp_dir().join(format!("tunbus-lab-{session}-{:016x}", u64::from_le_bytes(raw))))
}

/// Creates the folder named by [`private_dir_name`]: mode 0700 (failing if anything is
/// there already), owned by the `rabbitmq` user that runs the nodes (root reads it anyway).
pub(super) fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().mode(0o700).create(dir).with_context(|| format!("creating {}", dir.display()))?;
    let _ = std::process::Command::new("chown").arg("rabbitmq:rabbitmq").arg(dir).stderr(Stdio::null()).status();
    Ok(())
}

/// `--secure`: each host's broker user and URL, and the session's strict table.
pub(super) struct SecureSession {
    pub(super) by_host: std::collections::HashMap<String, (String, Endpoint)>,
    pub(super) table: crate::identity::Table,
}

/// Revokes a lab's provisioned session on this machine's broker (rabbitmqctl).
pub(super) fn revoke_local(session: &str) {
    let Ok(admin) = url::parse(DEFAULT_URL) else { return };
    let o = crate::provision::Options {
        admin,
        tls: Default::default(),
        api: None,
        session: session.to_owned(),
        agents: Vec::new(),
        observers: Vec::new(),
        out: None,
        node: None,
        keys: false,
    };
    if let Err(e) = crate::provision::revoke(&o) {
        tracing::warn!(session, error = %e, "could not revoke the lab's session");
    }
}

impl Lab {
    /// `--url`, else (one node asked for) localhost:5672 if it answers and can hold the
    /// lab, else a private node, or a private cluster of `--brokers N` nodes.
    pub(super) fn choose_broker(&mut self, state: &mut State) -> anyhow::Result<Vec<Endpoint>> {
        if let Some(endpoints) = &self.opts.endpoints {
            let shown: Vec<String> = endpoints.iter().map(|e| e.url.to_string()).collect();
            tracing::info!(broker = %shown.join(" "), "the lab's broker: the one its --url names");
            return Ok(endpoints.clone());
        }
        if std::env::var_os("AMQP_URL").is_some() || std::env::var_os("AMQP_URL_FILE").is_some() {
            tracing::warn!("AMQP_URL or AMQP_URL_FILE is set, but a lab takes its broker only from its own --url or --url-file: it is ignored");
        }
        let connections = if self.opts.userspace { super::userspace::workers_for(self.opts.hosts) } else { self.opts.hosts * self.opts.queues };
        if self.opts.brokers <= 1 && !self.opts.private_broker && broker::answers("127.0.0.1:5672") {
            match broker::local_capacity() {
                Some(cap) if !cap.holds(connections) => tracing::warn!(
                    connections,
                    sockets_free = cap.sockets_free,
                    memory_free_mib = cap.memory_free / (1 << 20),
                    "the local broker cannot hold this lab (raise its open-files limit: scripts/setup.sh starts it so); starting a private node with a raised limit instead"
                ),
                _ => {
                    tracing::info!(broker = "127.0.0.1:5672", "the lab's broker: this machine's RabbitMQ (--private-broker for one of the lab's own)");
                    return Ok(vec![Endpoint::plain(url::parse(&DEFAULT_URL.replace("localhost", "127.0.0.1"))?)]);
                }
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
            tracing::info!(nodes = self.opts.brokers, "the lab's broker: a private RabbitMQ cluster of its own, starting");
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
        tracing::info!("the lab's broker: a private RabbitMQ node of its own, starting");
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
    pub(super) fn provision(&mut self, state: &mut State) -> anyhow::Result<()> {
        let Some(base) = self.endpoints.first().map(|e| e.url.clone()) else { bail!("no broker") };
        let agents: Vec<crate::provision::plan::AgentSpec> =
            self.hosts.iter().map(|h| crate::provision::plan::AgentSpec { name: h.name.clone(), prefixes: self.grants_of(h) }).collect();
        let o = crate::provision::Options {
            admin: base.clone(),
            tls: Default::default(),
            api: None,
            session: self.opts.session.clone(),
            agents,
            // `--e2e --keys DIR`: a capture user, its URL in DIR/capture.url.
            observers: if self.opts.keys.is_some() { vec![CAPTURE_USER.to_owned()] } else { Vec::new() },
            out: None,
            node: self.private.first().map(|b| b.node.clone()),
            keys: false,
        };
        if self.private.is_empty() {
            state.provisioned_on = Some(base.authority());
            write_state(state)?;
        }
        let t0 = Instant::now();
        let summary = crate::provision::provision(&o).context("provisioning the lab's session (--secure)")?;
        self.provisioned = true;
        let plan = summary.plan.context("provisioning made no plan")?;
        let mut table = crate::identity::peers_file::parse(&plan.peers_file(), Some(&plan.session)).map_err(anyhow::Error::msg)?;
        if let Some(t) = self.opts.topology.as_ref().filter(|t| t.is_routed()) {
            // A peers file grants each user its addresses; a routed lab's routers send
            // everyone's packets on, so a router's user is granted every subnet whole
            // (decision 0030). Other hosts keep their addresses only.
            let grants = plan
                .users
                .iter()
                .filter(|u| !u.observer)
                .filter_map(|u| {
                    let h = self.hosts.iter().find(|h| h.name == u.agent)?;
                    let prefixes = if t.is_router(h.index - 1) { self.grants_of(h) } else { u.addresses.clone() };
                    Some((u.user.clone(), prefixes))
                })
                .collect();
            table = crate::identity::Table::new(grants);
        }
        let mut by_host = std::collections::HashMap::new();
        for u in &plan.users {
            let url = base.with_credentials(&u.user, &u.password).with_vhost(&plan.vhost);
            if let (true, Some(dir)) = (u.observer, &self.opts.keys) {
                write_private(&dir.join("capture.url"), &url.to_secret_string()).context("writing the capture user's URL file")?;
                continue;
            }
            by_host.insert(u.agent.clone(), (u.user.clone(), Endpoint::plain(url)));
        }
        tracing::info!(users = plan.users.len(), seconds = t0.elapsed().as_secs_f64(), via = summary.backend, "lab session provisioned");
        self.identities = Some(SecureSession { by_host, table });
        Ok(())
    }
}

/// The broker user of a lab's captures (`--e2e --keys DIR`: its URL is DIR/capture.url).
pub(super) const CAPTURE_USER: &str = "capture";

/// Writes `text` into a new file only its owner may read.
fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    writeln!(f, "{text}")
}
