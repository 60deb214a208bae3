//! The lab's hosts: their namespaces (created and deleted in one `ip -batch` run each),
//! and the agent configuration each host runs.
//!
//! Main thread; not on the hot path.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};

use super::plan::{self, Host};
use super::{topology, Lab};
use crate::amqp::client::Endpoint;
use crate::config::{AgentConfig, Bus, ConfigError, DataPath, Identity, Interface};

/// Namespaces of `session` that exist now (exact pattern: prefix + digits).
pub(super) fn session_namespaces(session: &str) -> Vec<String> {
    let prefix = plan::netns_prefix(session);
    let list = crate::tun::netns::ip(None, &["netns", "list"]).unwrap_or_default();
    list.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.strip_prefix(&prefix).is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit())))
        .map(str::to_owned)
        .collect()
}

/// Deletes namespaces in one `ip -batch` run.
pub(super) fn delete_namespaces(names: &[String]) {
    if names.is_empty() {
        return;
    }
    let script: String = names.iter().map(|n| format!("netns del {n}\n")).collect();
    let _ = run_batch(&script);
}

/// Runs `ip -force -batch -` with `script`: every line is tried, also after one fails (a
/// namespace already gone), unlike `tun::netns::ip_batch`, and an error does not repeat
/// the script (thousands of lines in a large lab).
pub(super) fn run_batch(script: &str) -> anyhow::Result<()> {
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

impl Lab {
    pub(super) fn create_namespaces(&self) -> anyhow::Result<()> {
        let script: String = self.hosts.iter().map(|h| format!("netns add {}\n", h.netns)).collect();
        run_batch(&script).context("creating the lab's namespaces")?;
        for h in &self.hosts {
            crate::tun::netns::ip(Some(&h.netns), &["link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    pub(super) fn agent_config(&self, host: &Host) -> Result<AgentConfig, ConfigError> {
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
            endpoints = endpoints
                .iter()
                .map(|e| Endpoint::plain(e.url.with_credentials(url.username.as_deref().unwrap_or(login), url.password().unwrap_or("")).with_vhost(&url.vhost)))
                .collect();
            user = Some(login.clone());
        }
        // Many agents per process, so smaller per-agent buffers: 128 KiB batches, 32 KiB
        // frames (each data connection reads into two frames' worth). The same at every lab
        // size, so that a lab's figures compare across sizes; `agent connect` keeps the
        // defaults tuned for throughput.
        let bus = Bus { heartbeat: self.opts.heartbeat, check_name: false, frame_max: Some(32 * 1024), ..Bus::new(endpoints).in_session(&self.opts.session) };
        let interface = Interface {
            queues: self.opts.queues,
            // --dhcp: the hosts after h1 lease their IPv4 address (`lab::dhcp`).
            addrs: if self.opts.dhcp && host.index > 1 { host.prefixes()[1..].to_vec() } else { self.addresses_of(host) },
            netns: Some(host.netns.clone()),
            mtu: self.opts.mtu,
            router_solicitations: 0, // a lab has no router: nothing to solicit
            kind: if self.opts.l2 { crate::config::PortKind::Tap { bridge: None } } else { crate::config::PortKind::Tun },
            ..Interface::default()
        };
        let emulation = match &self.opts.topology {
            Some(t) if !t.is_routed() => {
                let names: Vec<String> = self.hosts.iter().map(|h| h.name.clone()).collect();
                // An L2 host's frames go to its MAC, held as an address (`identity::mac_address`).
                let session = Some(self.opts.session.as_str());
                let mac_of = |h: &Host| crate::identity::mac_address(crate::identity::mac(session, &h.name));
                let addrs: Vec<Vec<std::net::IpAddr>> =
                    self.hosts.iter().map(|h| h.prefixes().iter().map(|p| p.addr).chain(self.opts.l2.then(|| mac_of(h))).collect()).collect();
                // `Host::index` counts from 1; the topology's indices from 0.
                crate::emulate::Emulation { known: topology::LabTopology::addresses(&names, &addrs), ..t.emulation_of(host.index - 1, &names, self.opts.seed) }
            }
            _ => crate::emulate::Emulation::default(),
        };
        let data_path = DataPath { stats_interval: Duration::ZERO, max_batch_bytes: 128 * 1024, status_dir: None, emulation, ..DataPath::default() };
        let mut c = AgentConfig::new(&host.name, bus, interface)?.with_data_path(data_path)?;
        if let Some(t) = self.opts.topology.as_ref().filter(|t| t.is_routed()) {
            c = c.with_routing(crate::config::Routing { routes: t.routes_of(host.index - 1), ..Default::default() })?;
        }
        let user = user.unwrap_or_else(|| c.identity().user.clone());
        let mode = match &self.identities {
            Some(secure) => crate::identity::Mode::Strict(secure.table.clone()),
            None => {
                let mut prefixes: Vec<crate::route::Prefix> = ["198.18.0.0/15", "fd00:7b::/32", "fe80::/10"].iter().filter_map(|p| p.parse().ok()).collect();
                // L2: the hosts' MACs (all derived: 02:…).
                prefixes.push(crate::identity::mac_prefix(crate::packet::ethernet::Mac([2, 0, 0, 0, 0, 0]), 8));
                crate::identity::Mode::Strict(crate::identity::Table::new(vec![(user.clone(), prefixes)]))
            }
        };
        let c = c.with_identity(Identity { user, mode })?;
        self.with_e2e_keys(c, host)
    }

    /// Host `host`'s interface addresses: a routed topology's (one per subnet and family),
    /// else the plan's.
    pub(super) fn addresses_of(&self, host: &Host) -> Vec<crate::route::Prefix> {
        match self.opts.topology.as_ref().filter(|t| t.is_routed()) {
            Some(t) => t.addresses_of(host.index - 1),
            None => host.prefixes().to_vec(),
        }
    }

    /// What host `host`'s broker user may send from (`--secure`), each prefix written with
    /// the host's own address in it (provisioning lets the user bind that address's keys):
    /// in a routed topology its interface addresses (one per subnet, so each grants its
    /// subnet), and for a router, which forwards everyone's packets, also the networks of
    /// the subnets it is not in; else the plan's prefixes.
    pub(super) fn grants_of(&self, host: &Host) -> Vec<crate::route::Prefix> {
        let i = host.index - 1;
        match self.opts.topology.as_ref().filter(|t| t.is_routed()) {
            Some(t) => {
                let mine = t.subnets_of(i);
                let beyond = (0..t.subnets.len()).filter(|k| t.is_router(i) && !mine.contains(k)).flat_map(|k| t.networks_of(k));
                t.addresses_of(i).into_iter().chain(beyond).collect()
            }
            None => host.prefixes().to_vec(),
        }
    }

    /// `--e2e`: host `host`'s key, and every other host's public key under its broker user.
    fn with_e2e_keys(&self, c: AgentConfig, host: &Host) -> Result<AgentConfig, ConfigError> {
        let (Some(me), Some(secure)) = (self.e2e_keys.get(host.index - 1), &self.identities) else {
            return Ok(c);
        };
        let peer_keys = self
            .hosts
            .iter()
            .zip(&self.e2e_keys)
            .filter(|(h, _)| h.index != host.index)
            .filter_map(|(h, key)| secure.by_host.get(&h.name).map(|(user, _)| (user.clone(), key.public().0)))
            .collect();
        let key_log = self.opts.keys.as_ref().map(|dir| dir.join(format!("{}.keys", host.name)));
        c.with_e2e(Some(crate::config::E2eKeys { private_key: *me.as_bytes(), peer_keys, key_log }))
    }
}
