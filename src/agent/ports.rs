//! Opening an agent's host end: one [`Port`] per queue, of the kind its configuration
//! names (`config::PortKind`). A TUN is created (under a temporary name when it moves to a
//! namespace), moved and configured with `ip`; a userspace stack is built in the process
//! with the agent's addresses and host services; a serial probe is opened, or waited for (a simulated radio's
//! pseudo-terminal made, and its port put behind its medium when it has links). The worker never learns which it got.
//!
//! Main thread (inside `Agent::start`), once per agent; not on the hot path.

use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::bail;

use crate::config::{AgentConfig, PortKind};
use crate::exit::{Exit, Failure};
use crate::port::medium::Medium;
use crate::port::serial::SerialPort;
use crate::port::userspace::{EndpointConfig, Limits, PortConfig, UserspacePort};
use crate::port::Port;
use crate::tun::{netns, TunDevice};
use crate::util::now_ns;

/// The ports of one agent, and what to say about them.
pub struct Opened {
    pub ports: Vec<Box<dyn Port>>,
    /// For the start line: `tun tso uso`, or `userspace`.
    pub summary: String,
    /// A userspace port's handle for pings from other threads (the lab's checks).
    pub pinger: Option<crate::port::userspace::Pinger>,
    /// A serial probe's counters (its final report and `agent status` show them).
    pub serial: Option<std::sync::Arc<crate::port::serial::SerialCounters>>,
}

/// Opens the host end of agent `c`: its ports, configured and ready.
pub fn open(c: &AgentConfig) -> anyhow::Result<Opened> {
    match &c.interface().kind {
        PortKind::Tun | PortKind::Tap { .. } => {
            let dev = bring_up_interface(c)?;
            let kind = if c.interface().is_l2() { format!("tap {}", c.mac()) } else { "tun".to_owned() };
            let summary = format!("{kind} (tso {}, uso {})", dev.offloads.tso, dev.offloads.uso);
            let ports = dev.queues.into_iter().map(|q| Box::new(q) as Box<dyn Port>).collect();
            Ok(Opened { ports, summary, pinger: None, serial: None })
        }
        PortKind::Userspace { services, endpoints } => {
            let now = std::time::Instant::now();
            let limits = Limits { mtu: c.interface().mtu.min(65_535) as usize, ..Limits::default() };
            let seed = now_ns() ^ u64::from(std::process::id()).rotate_left(32);
            let mut port = UserspacePort::new(PortConfig { index: 0, seed, limits }, now).map_err(|e| Failure::new(Exit::Local, e.to_string()))?;
            if c.hosts_own_endpoint() {
                let own =
                    EndpointConfig { name: c.name().to_string(), addrs: c.interface().addrs.clone(), link_local: c.link_local(), services: services.clone() };
                port.add_endpoint(own, now).map_err(|e| Failure::new(Exit::Local, e.to_string()))?;
            }
            for e in endpoints {
                port.add_endpoint(e.clone(), now).map_err(|e| Failure::new(Exit::Local, e.to_string()))?;
            }
            let pinger = port.pinger().map_err(|e| Failure::new(Exit::Local, e.to_string()))?;
            let summary = format!("userspace stack, {} endpoint(s)", port.endpoint_count());
            Ok(Opened { ports: vec![Box::new(port)], summary, pinger: Some(pinger), serial: None })
        }
        PortKind::Serial(cfg) => {
            // A probe that is not plugged in yet is waited for, as one that goes away is.
            // A simulated radio's pseudo-terminal is made now, or the start fails.
            let port = if cfg.pty { SerialPort::open(0, cfg.clone()) } else { SerialPort::waiting(0, cfg.clone()) };
            let port = port.map_err(|e| Failure::new(Exit::Usage, e.to_string()))?;
            let summary = match cfg.pty {
                true => format!("simulated radio: a pseudo-terminal at {}", cfg.device.display()),
                false => format!("serial probe {} at {} baud ({})", cfg.device.display(), cfg.baud, if port.is_open() { "open" } else { "waiting for it" }),
            };
            let counters = port.counters().clone();
            let port: Box<dyn Port> = match &c.data_path().hearing {
                Some(h) => Box::new(Medium::new(Box::new(port), h, counters.clone())),
                None => Box::new(port),
            };
            Ok(Opened { ports: vec![port], summary, pinger: None, serial: Some(counters) })
        }
    }
}

/// A name that cannot collide: the device is created under it, then renamed in its namespace.
fn temporary_ifname() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("tbt{:05x}{:03x}", std::process::id() & 0xf_ffff, n & 0xfff)
}

/// Creates the interface and configures it where it belongs.
pub fn bring_up_interface(c: &AgentConfig) -> anyhow::Result<TunDevice> {
    let create_as = match &c.interface().netns {
        Some(ns) => {
            if !netns::namespace_exists(ns) {
                bail!(netns::Error::NoNamespace(ns.clone()));
            }
            temporary_ifname()
        }
        None => {
            if netns::interface_exists(None, &c.interface().ifname) {
                bail!(netns::Error::Exists { name: c.interface().ifname.clone(), netns: None });
            }
            c.interface().ifname.clone()
        }
    };
    let i = c.interface();
    if let PortKind::Tap { bridge: Some(br) } = &i.kind {
        if !netns::interface_exists(i.netns.as_deref(), br) {
            bail!(Failure::new(
                Exit::Local,
                format!(
                    "--bridge {br}: no such interface{} (create it first: ip link add {br} type bridge; ip link set {br} up)",
                    i.netns.as_deref().map(|n| format!(" in namespace {n}")).unwrap_or_default()
                )
            ));
        }
    }
    let dev = match i.kind {
        PortKind::Tap { .. } => TunDevice::create_tap(&create_as, i.queues, i.offload),
        _ => TunDevice::create(&create_as, i.queues, i.offload),
    }
    .map_err(|e| Failure::new(Exit::Local, e.to_string()))?;
    if let Some(ns) = &i.netns {
        netns::move_into(&create_as, ns, &i.ifname)?; // on error `dev` drops: interface gone
    }
    match &i.kind {
        PortKind::Tap { bridge } => netns::configure_tap(i.netns.as_deref(), &i.ifname, i.mtu, c.mac(), &i.addrs, bridge.as_deref(), i.router_solicitations)?,
        _ => netns::configure(i.netns.as_deref(), &i.ifname, i.mtu, &i.addrs, c.link_local(), i.router_solicitations)?,
    }
    Ok(dev)
}
