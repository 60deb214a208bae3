//! Validated configuration of one agent, and the address type it is built from.
//!
//! `cli.rs` turns command-line arguments into an [`AgentConfig`]; everything below the CLI
//! (the agent, the lab) sees only this. Pure data: no I/O.

use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use crate::amqp::client::{Endpoint, DEFAULT_HEARTBEAT};

pub use crate::route::Prefix;

/// Which wire an agent speaks on the bus.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Wire {
    /// tunbus v1 batches routed by destination (docs/wire-format.md).
    #[default]
    Native,
    /// The Python ioppytest-agent's JSON, one packet per message, via its packet router.
    Ioppytest,
}

impl Wire {
    pub fn name(self) -> &'static str {
        match self {
            Wire::Native => "v1",
            Wire::Ioppytest => "ioppytest",
        }
    }
}

/// Default MTU: see docs/decisions/0003-mtu.md.
pub const DEFAULT_MTU: u32 = 9000;

/// Everything one agent needs to run.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The broker's nodes, in order of preference (the first that answers is used).
    pub endpoints: Vec<Endpoint>,
    /// Heartbeat interval asked for (a URL's `heartbeat` overrides it).
    pub heartbeat: Duration,
    pub name: String,
    /// The broker user this agent logs in as: every message it publishes carries it as
    /// `user_id`, which RabbitMQ checks against the login.
    pub user: String,
    /// How received packets are checked against their senders' identities.
    pub identity: crate::identity::Mode,
    pub session: Option<String>,
    pub queues: usize,
    pub addrs: Vec<Prefix>,
    pub mtu: u32,
    pub netns: Option<String>,
    pub ifname: String,
    pub exchange: String,
    /// Core for queue worker i is `cpus[i % cpus.len()]`; empty means not pinned
    /// (docs/decisions/0011-no-pinning-by-default.md).
    pub cpus: Vec<usize>,
    pub offload: bool,
    /// Whether offload asked for by packets from the bus (checksum-only, TSO, USO) is
    /// handed to the kernel after the allow-list (`codec::vnet`); `false` completes
    /// checksums in software and refuses super-packets (`--no-offload-from-bus`).
    pub offload_from_bus: bool,
    pub stats_interval: Duration,
    /// Upper bound of one AMQP message body.
    pub max_batch_bytes: usize,
    pub prefetch: u16,
    /// Largest AMQP frame on the data connections (`None`: the broker's, 128 KiB on
    /// RabbitMQ). Each consuming connection reads into two frames' worth of buffer, so the
    /// lab lowers it for hundreds of light agents.
    pub frame_max: Option<u32>,
    /// IPv6 router solicitations the interface sends at start (RFC 4861's 3; the lab, which
    /// has no router, sends none).
    pub router_solicitations: u8,
    /// Bound of each consumer queue on the broker (bytes of ready messages; beyond it the
    /// oldest are dropped): the delay a slow receiver can build up.
    pub queue_max_bytes: u64,
    /// The interface's IPv6 link-local address; `None` derives one from session and name
    /// ([`AgentConfig::link_local`]). Agents bind it, so link-local traffic (neighbour
    /// discovery, replies to multicast pings) reaches them across the bus.
    pub link_local: Option<Ipv6Addr>,
    pub wire: Wire,
    /// Where to serve Prometheus metrics (`None`: nowhere).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// With the ioppytest wire: the old agent's addressing, announced in `ip.tun.started`.
    pub old_addressing: crate::interop::addressing::OldAddressing,
    /// ioppytest wire: the broker user whose `ip.tun.start` orders count (`None`: this
    /// agent's own user).
    pub coordinator: Option<String>,
    /// ioppytest wire: where ordered addresses must lie.
    pub start_within: Vec<Prefix>,
    /// Ask the broker at start whether the name is taken (the lab, which generates unique
    /// names in a fresh session, skips it).
    pub check_name: bool,
}

impl AgentConfig {
    /// A configuration with the defaults of `agent connect`, for tests and the lab.
    pub fn new(endpoints: Vec<Endpoint>, name: &str) -> AgentConfig {
        let user = endpoints.first().map(Endpoint::user).unwrap_or_else(|| "guest".to_owned());
        AgentConfig {
            endpoints,
            heartbeat: DEFAULT_HEARTBEAT,
            name: name.to_owned(),
            user,
            identity: crate::identity::Mode::FirstClaim,
            session: None,
            queues: 1,
            addrs: Vec::new(),
            mtu: DEFAULT_MTU,
            netns: None,
            ifname: "tb0".to_owned(),
            exchange: "amq.topic".to_owned(),
            cpus: Vec::new(),
            offload: true,
            offload_from_bus: true,
            stats_interval: Duration::from_secs(5),
            max_batch_bytes: 256 * 1024,
            prefetch: 32,
            queue_max_bytes: 4 * 1024 * 1024,
            frame_max: None,
            router_solicitations: 3,
            check_name: true,
            coordinator: None,
            start_within: crate::interop::addressing::default_subnets(),
            link_local: None,
            wire: Wire::Native,
            metrics_addr: None,
            old_addressing: Default::default(),
        }
    }

    /// The link-local address: the configured one, else `fe80::` + 64 bits of a fixed
    /// FNV-1a hash of `session/name` (stable across restarts, distinct between agents).
    pub fn link_local(&self) -> Ipv6Addr {
        if let Some(a) = self.link_local {
            return a;
        }
        crate::identity::link_local(self.session.as_deref(), &self.name)
    }

    /// Every address this agent owns (and binds): configured ones and the link-local.
    pub fn owned_addresses(&self) -> Vec<IpAddr> {
        let mut all: Vec<IpAddr> = self.addrs.iter().map(|p| p.addr).collect();
        all.push(IpAddr::V6(self.link_local()));
        all
    }

    /// `tunbus[.<session>].<name>.<k>`: the queue that feeds TUN queue k.
    pub fn queue_name(&self, k: usize) -> String {
        format!("{}.{k}", self.queue_prefix())
    }

    /// Prefix of every queue this agent declares.
    pub fn queue_prefix(&self) -> String {
        match &self.session {
            Some(s) => format!("tunbus.{s}.{}", self.name),
            None => format!("tunbus.{}", self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_local_is_stable_distinct_and_overridable() {
        let a = AgentConfig::new(Vec::new(), "h1");
        let b = AgentConfig::new(Vec::new(), "h2");
        assert_eq!(a.link_local(), AgentConfig::new(Vec::new(), "h1").link_local());
        assert_ne!(a.link_local(), b.link_local());
        assert_eq!(a.link_local().segments()[..4], [0xfe80, 0, 0, 0]);
        let mut s = a.clone();
        s.session = Some("other".into());
        assert_ne!(s.link_local(), a.link_local());
        s.link_local = Some("fe80::1".parse().unwrap());
        assert_eq!(s.link_local().to_string(), "fe80::1");
        assert!(a.owned_addresses().contains(&IpAddr::V6(a.link_local())));
    }

    #[test]
    fn queue_names_carry_the_session() {
        let mut c = AgentConfig::new(Vec::new(), "h1");
        assert_eq!(c.queue_name(3), "tunbus.h1.3");
        c.session = Some("s7".into());
        assert_eq!(c.queue_name(0), "tunbus.s7.h1.0");
    }
}
