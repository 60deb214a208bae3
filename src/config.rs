//! Validated configuration of one agent, from its parts (decision 0019).
//!
//! [`Bus`], [`Interface`], [`DataPath`], [`Identity`], [`Ioppytest`] and [`Routing`] are plain data with
//! the defaults of `agent connect`. [`AgentConfig::new`] and its `with_*` methods are the
//! only way to a configuration, and each checks the whole, so the CLI, the lab and the tests
//! build agents through the same checks. Everything below the CLI sees only this. Pure: no
//! I/O, no clap, no interop types.
//!
//! The defaults of `agent connect` are written here once ([`DEFAULT_QUEUES`] and the
//! constants after it); the CLI shows them through clap. Near a leaf: besides `route`'s
//! grammar helpers it imports only the types its parts carry (broker endpoints, the
//! emulation, the identity mode, the old agent's addressing), never an application
//! module (`status`, `tun`, `lab`, ...).

use std::net::{IpAddr, Ipv6Addr};
use std::ops::RangeInclusive;
use std::time::Duration;

use crate::amqp::client::{Endpoint, DEFAULT_HEARTBEAT};
use crate::codec::ioppytest::addressing::{default_subnets, OldAddressing};
use crate::emulate::Emulation;
use crate::identity::{self, Mode};
use crate::route::{is_valid_word, session_exchange, DEFAULT_EXCHANGE};

pub use crate::packet::Prefix;

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
/// Default TUN queues (and workers, and data connections).
pub const DEFAULT_QUEUES: u16 = 1;
/// Default interface name.
pub const DEFAULT_IFNAME: &str = "tb0";
/// Default unacknowledged deliveries per consumer.
pub const DEFAULT_PREFETCH: u16 = 32;
/// Default bound of each consumer queue on the broker, in bytes.
pub const DEFAULT_QUEUE_MAX_BYTES: u64 = 4 * 1024 * 1024;
/// Default largest AMQP message body (one batch), in bytes.
pub const DEFAULT_MAX_BATCH_BYTES: u32 = 256 * 1024;
/// Default interval of the one-line statistics.
pub const DEFAULT_STATS_INTERVAL: Duration = Duration::from_secs(5);
/// tunbus's folder of run-time files: the agents' status sockets (`--status-dir`) and the
/// lab's state files.
pub const RUN_DIR: &str = "/run/tunbus";
/// TUN queues (and workers) one agent may have.
pub const QUEUES: RangeInclusive<u16> = 1..=16;
/// Interface MTU: IPv6's minimum up to the largest IP packet.
pub const MTU: RangeInclusive<u32> = 1280..=65535;
/// One batch must hold the largest packet with its headers; 8 MiB bounds the memory.
pub const MAX_BATCH_BYTES: RangeInclusive<u32> = 70_000..=8_388_608;
/// Bytes of ready messages a consumer queue may hold on the broker.
pub const QUEUE_MAX_BYTES: RangeInclusive<u64> = 65_536..=1 << 32;
/// AMQP's smallest `frame_max` (0-9-1 §4.2.3).
pub const MIN_FRAME_MAX: u32 = 4096;
/// Longest report interval.
pub const MAX_STATS_INTERVAL: Duration = Duration::from_secs(86_400);

/// Checks an interface name the way the kernel will (IFNAMSIZ - 1 bytes, no separators).
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name.bytes().any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
}

/// Why a configuration is not valid: one sentence naming the setting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn ensure(ok: bool, why: impl FnOnce() -> String) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError(why()))
    }
}

/// The bus: which broker nodes, which session and exchange, and how the data connections
/// use them.
#[derive(Clone, Debug)]
pub struct Bus {
    /// The broker's nodes, in order of preference (the first that answers is used).
    pub endpoints: Vec<Endpoint>,
    /// Heartbeat interval asked for (a URL's `heartbeat` overrides it).
    pub heartbeat: Duration,
    pub session: Option<String>,
    pub exchange: String,
    /// Largest AMQP frame on the data connections (`None`: the broker's, 128 KiB on
    /// RabbitMQ). Each consuming connection reads into two frames' worth of buffer, so the
    /// lab lowers it for hundreds of light agents.
    pub frame_max: Option<u32>,
    /// The consumer's prefetch at connect (and its least).
    pub prefetch: u16,
    /// Grow the prefetch to what one round trip to the broker carries
    /// (`worker::window`; `--fixed-prefetch` turns it off).
    pub adaptive_prefetch: bool,
    /// Bound of each consumer queue on the broker (bytes of ready messages; beyond it the
    /// oldest are dropped): the delay a slow receiver can build up.
    pub queue_max_bytes: u64,
    /// Ask the broker at start whether the name is taken (the lab, which generates unique
    /// names in a fresh session, skips it).
    pub check_name: bool,
}

impl Bus {
    /// The defaults of `agent connect` on these nodes, without a session.
    pub fn new(endpoints: Vec<Endpoint>) -> Bus {
        Bus {
            endpoints,
            heartbeat: DEFAULT_HEARTBEAT,
            session: None,
            exchange: DEFAULT_EXCHANGE.to_owned(),
            frame_max: None,
            prefetch: DEFAULT_PREFETCH,
            adaptive_prefetch: true,
            queue_max_bytes: DEFAULT_QUEUE_MAX_BYTES,
            check_name: true,
        }
    }

    /// In session `session`, on its own exchange.
    pub fn in_session(self, session: &str) -> Bus {
        Bus { session: Some(session.to_owned()), exchange: session_exchange(session), ..self }
    }

    fn check(&self) -> Result<(), ConfigError> {
        if let Some(s) = &self.session {
            ensure(is_valid_word(s), || format!("session {s:?} must be one topic word: letters, digits, '-' or '_'"))?;
        }
        ensure(!self.exchange.is_empty(), || "the exchange name is empty".into())?;
        ensure(self.prefetch >= 1, || "prefetch must be at least 1".into())?;
        ensure(QUEUE_MAX_BYTES.contains(&self.queue_max_bytes), || format!("queue max bytes {} is outside {QUEUE_MAX_BYTES:?}", self.queue_max_bytes))?;
        if let Some(f) = self.frame_max {
            ensure(f >= MIN_FRAME_MAX, || format!("frame max {f} is below AMQP's minimum of {MIN_FRAME_MAX}"))?;
        }
        ensure(self.heartbeat.as_secs() <= u64::from(u16::MAX), || "heartbeat must be at most 65535 s".into())
    }
}

/// What the agent's host end is (`crate::port`): the kind decides how `agent connect`
/// opens its ports; the worker only sees a `Port`.
#[derive(Clone, Debug, Default)]
pub enum PortKind {
    /// A kernel multi-queue TUN device (Linux, root or CAP_NET_ADMIN).
    #[default]
    Tun,
    /// A userspace TCP/IP stack inside the agent (no privileges, any OS): its addresses
    /// answer pings, and these host services reach the bus. `endpoints`: more endpoints
    /// the same port hosts (`agent lab --userspace`: one worker, many hosts), each with its
    /// own name and addresses, all bound on this agent's queue.
    Userspace { services: crate::port::userspace::Services, endpoints: Vec<crate::port::userspace::EndpointConfig> },
    /// An IEEE 802.15.4 probe on a serial line (`agent serial`): SLIP frames, no IP
    /// addresses, one queue; its frames are flooded to the session (a radio channel).
    Serial(crate::port::serial::SerialConfig),
    /// A kernel multi-queue TAP device (`--l2`): Ethernet frames, switched on the bus by
    /// destination MAC (an L2 session). `bridge`: the TAP is enslaved to this existing
    /// Linux bridge, so what is behind it joins the segment.
    Tap { bridge: Option<String> },
}

/// The host end: its kind, name, namespace, queues, addresses and offloads.
#[derive(Clone, Debug)]
pub struct Interface {
    /// TUN or a userspace stack (more kinds come as `crate::port` grows).
    pub kind: PortKind,
    pub ifname: String,
    pub netns: Option<String>,
    pub queues: usize,
    pub addrs: Vec<Prefix>,
    pub mtu: u32,
    /// The interface's IPv6 link-local address; `None` derives one from session and name
    /// ([`AgentConfig::link_local`]). Agents bind it, so link-local traffic (neighbour
    /// discovery, replies to multicast pings) reaches them across the bus.
    pub link_local: Option<Ipv6Addr>,
    /// IPv6 router solicitations the interface sends at start (RFC 4861's 3; the lab, which
    /// has no router, sends none).
    pub router_solicitations: u8,
    /// TSO/USO and checksum offload on the TUN (`IFF_VNET_HDR`).
    pub offload: bool,
}

impl Default for Interface {
    fn default() -> Interface {
        Interface {
            kind: PortKind::Tun,
            ifname: DEFAULT_IFNAME.to_owned(),
            netns: None,
            queues: usize::from(DEFAULT_QUEUES),
            addrs: Vec::new(),
            mtu: DEFAULT_MTU,
            link_local: None,
            router_solicitations: 3,
            offload: true,
        }
    }
}

impl Interface {
    fn check(&self) -> Result<(), ConfigError> {
        ensure(valid_ifname(&self.ifname), || format!("interface name {:?} is not valid (1-15 characters, no '/', ':' or spaces)", self.ifname))?;
        ensure(u16::try_from(self.queues).is_ok_and(|q| QUEUES.contains(&q)), || format!("{} queues: an agent has {QUEUES:?}", self.queues))?;
        ensure(MTU.contains(&self.mtu), || format!("MTU {} is outside {MTU:?}", self.mtu))?;
        if let Some(ll) = self.link_local {
            ensure(ll.segments()[0] & 0xffc0 == 0xfe80, || format!("link-local address {ll} is not in fe80::/10"))?;
        }
        if let PortKind::Userspace { .. } = self.kind {
            // One endpoint is one stack: every flow to it must reach the one worker that holds it.
            ensure(self.queues == 1, || format!("a userspace endpoint has one queue, not {}", self.queues))?;
            ensure(self.netns.is_none(), || "a userspace endpoint has no interface to move into a namespace (drop --netns)".into())?;
        }
        if let PortKind::Serial(serial) = &self.kind {
            // One probe is one line: one worker reads it, and radio frames carry no addresses.
            ensure(self.queues == 1, || format!("a serial probe has one queue, not {}", self.queues))?;
            ensure(self.netns.is_none(), || "a serial probe has no interface to move into a namespace".into())?;
            ensure(self.addrs.is_empty(), || "a serial probe carries 802.15.4 frames, not IP: it has no addresses".into())?;
            ensure(!self.offload, || "a serial probe has no offloads".into())?;
            serial.check().map_err(|e| ConfigError(e.to_string()))?;
        }
        if let PortKind::Tap { bridge: Some(b) } = &self.kind {
            ensure(valid_ifname(b), || format!("bridge name {b:?} is not valid (1-15 characters, no '/', ':' or spaces)"))?;
        }
        Ok(())
    }

    /// Whether the host end is a kernel TUN (or TAP) device.
    pub fn is_tun(&self) -> bool {
        matches!(self.kind, PortKind::Tun | PortKind::Tap { .. })
    }

    /// Whether the host end carries Ethernet frames (a TAP: an L2 session).
    pub fn is_l2(&self) -> bool {
        matches!(self.kind, PortKind::Tap { .. })
    }

    /// The serial probe's settings, when the host end is one.
    pub fn serial(&self) -> Option<&crate::port::serial::SerialConfig> {
        match &self.kind {
            PortKind::Serial(s) => Some(s),
            _ => None,
        }
    }
}

/// How packets are carried (wire, batches, cores, offload from the bus) and measured.
#[derive(Clone, Debug)]
pub struct DataPath {
    pub wire: Wire,
    /// Core for queue worker i is `cpus[i % cpus.len()]`; empty means not pinned
    /// (docs/decisions/0011-no-pinning-by-default.md).
    pub cpus: Vec<usize>,
    /// Whether offload asked for by packets from the bus (checksum-only, TSO, USO) is
    /// handed to the kernel after the allow-list (`codec::vnet`); `false` completes
    /// checksums in software and refuses super-packets (`--no-offload-from-bus`).
    pub offload_from_bus: bool,
    /// Upper bound of one AMQP message body.
    pub max_batch_bytes: usize,
    pub stats_interval: Duration,
    /// Where to serve Prometheus metrics (`None`: nowhere).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Folder of the `agent status` socket (`None`: no socket; the lab's in-process agents).
    pub status_dir: Option<std::path::PathBuf>,
    /// Link emulation on egress (`--emulate`, `--emulate-to`, `--emulate-seed`).
    pub emulation: Emulation,
    /// A radio's links as it hears them (`--hear`, a radio lab's topology; `None`: every
    /// sender, plainly). See `port::medium`.
    pub hearing: Option<crate::port::medium::Hearing>,
    /// Where to write what crosses the TUN, both directions (`--pcap`).
    pub pcap: Option<std::path::PathBuf>,
    /// Queue management of what this agent receives (`--aqm`; `None`: `--no-aqm`).
    pub aqm: Option<AqmSettings>,
}

/// CoDel's two parameters (`worker::aqm`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AqmSettings {
    /// The standing queue the bus may keep.
    pub target: Duration,
    /// About the worst round trip of the flows it manages.
    pub interval: Duration,
    /// Drop packets that are not ECN-capable in place of a mark (`--aqm-drop`).
    pub drop: bool,
}

impl Default for AqmSettings {
    fn default() -> AqmSettings {
        AqmSettings { target: Duration::from_millis(2), interval: Duration::from_millis(20), drop: false }
    }
}

impl Default for DataPath {
    fn default() -> DataPath {
        DataPath {
            wire: Wire::Native,
            cpus: Vec::new(),
            offload_from_bus: true,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES as usize,
            stats_interval: DEFAULT_STATS_INTERVAL,
            metrics_addr: None,
            status_dir: Some(RUN_DIR.into()),
            emulation: Emulation::default(),
            hearing: None,
            pcap: None,
            aqm: Some(AqmSettings::default()),
        }
    }
}

impl DataPath {
    fn check(&self) -> Result<(), ConfigError> {
        ensure(u32::try_from(self.max_batch_bytes).is_ok_and(|b| MAX_BATCH_BYTES.contains(&b)), || {
            format!("max batch bytes {} is outside {MAX_BATCH_BYTES:?}", self.max_batch_bytes)
        })?;
        ensure(self.stats_interval <= MAX_STATS_INTERVAL, || "the stats interval must be at most 86400 s".into())
    }
}

/// Who this agent is on the bus, and whom it believes.
#[derive(Clone, Debug)]
pub struct Identity {
    /// The broker user this agent logs in as: every message it publishes carries it as
    /// `user_id`, which RabbitMQ checks against the login.
    pub user: String,
    /// How received packets are checked against their senders' identities.
    pub mode: Mode,
}

/// With the ioppytest wire: what the old agent announces and whose orders it takes.
#[derive(Clone, Debug)]
pub struct Ioppytest {
    /// The old agent's addressing, announced in `ip.tun.started`.
    pub addressing: OldAddressing,
    /// The broker user whose `ip.tun.start` orders count (`None`: this agent's own user).
    pub coordinator: Option<String>,
    /// Where ordered addresses must lie.
    pub start_within: Vec<Prefix>,
}

impl Default for Ioppytest {
    fn default() -> Ioppytest {
        Ioppytest { addressing: OldAddressing::default(), coordinator: None, start_within: default_subnets() }
    }
}

/// End-to-end encryption (`--e2e`, docs/decisions/0029): this agent's static private key
/// and its peers' public keys by broker user (from the peers file). Raw bytes: the keys'
/// own types are `e2e::keys`'.
#[derive(Clone)]
pub struct E2eKeys {
    pub private_key: [u8; 32],
    pub peer_keys: Vec<(String, [u8; 32])>,
    /// `--e2e-key-log FILE`: note session keys there (`e2e::keylog`), for captures.
    pub key_log: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for E2eKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "E2eKeys {{ private_key: …, peers with keys: {} }}", self.peer_keys.len())
    }
}

/// Everything one agent needs to run, valid by construction: built only by
/// [`AgentConfig::new`] and the `with_*` methods, each of which checks the whole.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    name: crate::route::AgentName,
    bus: Bus,
    interface: Interface,
    data_path: DataPath,
    identity: Identity,
    ioppytest: Ioppytest,
    routing: Routing,
    e2e: Option<E2eKeys>,
}

/// Subnet routing (issue #25, docs/decisions/0027-advertised-prefixes.md): the prefixes
/// this agent routes for, and what it does with those others advertise.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routing {
    /// Prefixes of the networks behind this agent (`--advertise`): packets to them come
    /// here and the kernel forwards them (forwarding is turned on in the agent's namespace).
    pub advertise: Vec<Prefix>,
    /// Install a kernel route on the interface for every prefix other agents advertise
    /// (`--accept-routes`), and remove it when the advertisement goes.
    pub accept_routes: bool,
    /// Hide the bus behind this gateway's own address on its other networks (`--masquerade`,
    /// an nftables table of the agent's own).
    pub masquerade: bool,
    /// Next hops this agent was given (`--route PREFIX=NEXTHOP`): packets to PREFIX go to
    /// the agent owning NEXTHOP, and the kernel routes PREFIX into the interface.
    pub routes: Vec<crate::route::table::StaticRoute>,
}

impl Routing {
    fn check(&self, interface: &Interface, wire: Wire) -> Result<(), ConfigError> {
        for p in &self.advertise {
            crate::route::table::advertisable(p).map_err(|e| ConfigError(format!("--advertise {e}")))?;
        }
        let routes = !self.advertise.is_empty() || self.accept_routes || self.masquerade || !self.routes.is_empty();
        if routes {
            ensure(interface.is_tun(), || "--advertise, --accept-routes, --masquerade and --route need a kernel interface (not --userspace)".into())?;
            ensure(wire == Wire::Native, || "--advertise, --accept-routes, --masquerade and --route need the native wire".into())?;
        }
        ensure(self.routes.len() <= crate::route::table::MAX_PER_AGENT, || format!("at most {} --route next hops", crate::route::table::MAX_PER_AGENT))?;
        ensure(!self.masquerade || !self.advertise.is_empty(), || "--masquerade goes with --advertise (a gateway hides the bus behind its address)".into())?;
        ensure(self.advertise.len() <= crate::route::table::MAX_PER_AGENT, || format!("at most {} --advertise prefixes", crate::route::table::MAX_PER_AGENT))?;
        Ok(())
    }
}

impl AgentConfig {
    /// Agent `name` on `bus` with `interface`; the default data path, and identity as the
    /// first node's user with first-claim checks.
    pub fn new(name: &str, bus: Bus, interface: Interface) -> Result<AgentConfig, ConfigError> {
        let user = bus.endpoints.first().map(Endpoint::user).unwrap_or_else(|| "guest".to_owned());
        let name = crate::route::AgentName::new(name).map_err(|e| ConfigError(e.to_string()))?;
        let config = AgentConfig {
            name,
            bus,
            interface,
            data_path: DataPath::default(),
            identity: Identity { user, mode: Mode::FirstClaim },
            ioppytest: Ioppytest::default(),
            routing: Routing::default(),
            e2e: None,
        };
        config.checked()
    }

    pub fn with_routing(self, routing: Routing) -> Result<AgentConfig, ConfigError> {
        AgentConfig { routing, ..self }.checked()
    }

    pub fn with_data_path(self, data_path: DataPath) -> Result<AgentConfig, ConfigError> {
        AgentConfig { data_path, ..self }.checked()
    }

    pub fn with_identity(self, identity: Identity) -> Result<AgentConfig, ConfigError> {
        AgentConfig { identity, ..self }.checked()
    }

    /// End-to-end encryption on (`Some`): needs the native wire and a peers file.
    pub fn with_e2e(self, e2e: Option<E2eKeys>) -> Result<AgentConfig, ConfigError> {
        AgentConfig { e2e, ..self }.checked()
    }

    pub fn with_ioppytest(self, ioppytest: Ioppytest) -> Result<AgentConfig, ConfigError> {
        AgentConfig { ioppytest, ..self }.checked()
    }

    /// The addressing an `ip.tun.start` order gave (`--wait-config`): announced, and its
    /// prefixes added to the interface's.
    pub fn with_ordered_addressing(mut self, addressing: OldAddressing) -> Result<AgentConfig, ConfigError> {
        self.interface.addrs.extend(addressing.prefixes());
        self.interface.link_local = addressing.link_local();
        self.ioppytest.addressing = addressing;
        self.checked()
    }

    fn checked(self) -> Result<AgentConfig, ConfigError> {
        ensure(!self.bus.endpoints.is_empty(), || "no broker URL".into())?;
        self.bus.check()?;
        self.interface.check()?;
        self.data_path.check()?;
        ensure(!self.identity.user.is_empty(), || "the broker user is empty".into())?;
        self.routing.check(&self.interface, self.data_path.wire)?;
        if self.data_path.wire == Wire::Ioppytest {
            ensure(self.interface.queues == 1, || "the ioppytest wire carries one packet per message on one queue: use 1 queue".into())?;
            // The old wire carries plain packets only: no super-packets, no partial checksums.
            ensure(!self.interface.offload, || "the ioppytest wire carries plain packets: offload must be off".into())?;
        }
        if self.e2e.is_some() {
            ensure(self.data_path.wire == Wire::Native, || "end-to-end encryption (--e2e) needs the native wire: the ioppytest wire cannot carry it".into())?;
            ensure(!matches!(self.identity.mode, Mode::Off), || {
                "end-to-end encryption (--e2e) needs to know who its peers are: give --peers, or leave out --no-identity-check (keys are then pinned on first use)".into()
            })?;
        }
        Ok(self)
    }

    /// The agent's name: a checked topic word, so its keys exist.
    pub fn name(&self) -> &crate::route::AgentName {
        &self.name
    }

    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    pub fn interface(&self) -> &Interface {
        &self.interface
    }

    pub fn data_path(&self) -> &DataPath {
        &self.data_path
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn ioppytest(&self) -> &Ioppytest {
        &self.ioppytest
    }

    pub fn routing(&self) -> &Routing {
        &self.routing
    }

    /// End-to-end encryption's keys, when it is on.
    pub fn e2e(&self) -> Option<&E2eKeys> {
        self.e2e.as_ref()
    }

    /// The link-local address: the configured one, else `fe80::` + 64 bits of a fixed
    /// FNV-1a hash of `session/name` (stable across restarts, distinct between agents).
    pub fn link_local(&self) -> Ipv6Addr {
        if let Some(a) = self.interface.link_local {
            return a;
        }
        identity::link_local(self.bus.session.as_deref(), &self.name)
    }

    /// The MAC address of an L2 agent's TAP: locally administered unicast, `02` and 40 bits
    /// of a fixed FNV-1a hash of `session/name` (stable across restarts, distinct between
    /// agents; its routing key is the word the agent binds).
    pub fn mac(&self) -> crate::packet::ethernet::Mac {
        identity::mac(self.bus.session.as_deref(), &self.name)
    }

    /// Every address this agent owns (and binds): configured ones and the link-local.
    pub fn owned_addresses(&self) -> Vec<IpAddr> {
        self.owned_prefixes().into_iter().map(|p| p.addr).collect()
    }

    /// [`AgentConfig::owned_addresses`] with their prefix lengths (link-locals as /64), as
    /// hellos announce them: also those of the endpoints a userspace port hosts for others.
    pub fn owned_prefixes(&self) -> Vec<Prefix> {
        let link = |a: Ipv6Addr| Prefix::new(IpAddr::V6(a), 64);
        let mut all: Vec<Prefix> = Vec::new();
        if self.hosts_own_endpoint() {
            all.extend(self.interface.addrs.iter().copied());
            // A TAP's link-local is the kernel's own (from its MAC); nothing binds it.
            if !self.interface.is_l2() {
                all.extend(link(self.link_local()));
            }
        }
        if let PortKind::Userspace { endpoints, .. } = &self.interface.kind {
            for e in endpoints {
                all.extend(e.addrs.iter().copied());
                all.extend(link(e.link_local));
            }
        }
        all
    }

    /// Whether the agent is an IP endpoint itself (always, except a userspace worker of a
    /// lab that only hosts other endpoints, and a serial probe, which carries radio frames).
    pub fn hosts_own_endpoint(&self) -> bool {
        match &self.interface.kind {
            PortKind::Userspace { endpoints, .. } => endpoints.is_empty() || !self.interface.addrs.is_empty(),
            PortKind::Serial(_) => false,
            PortKind::Tun | PortKind::Tap { .. } => true,
        }
    }

    /// `tunbus[.<session>].<name>.<k>`: the queue that feeds TUN queue k.
    pub fn queue_name(&self, k: usize) -> String {
        format!("{}.{k}", self.queue_prefix())
    }

    /// Prefix of every queue this agent declares.
    pub fn queue_prefix(&self) -> String {
        match &self.bus.session {
            Some(s) => format!("tunbus.{s}.{}", self.name),
            None => format!("tunbus.{}", self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bus() -> Bus {
        Bus::new(vec![Endpoint::plain(crate::amqp::url::parse("amqp://h1:pw@127.0.0.1:5672/%2f").unwrap())])
    }

    fn agent(name: &str) -> AgentConfig {
        AgentConfig::new(name, bus(), Interface::default()).unwrap()
    }

    #[test]
    fn link_local_is_stable_distinct_and_overridable() {
        let a = agent("h1");
        let b = agent("h2");
        assert_eq!(a.link_local(), agent("h1").link_local());
        assert_ne!(a.link_local(), b.link_local());
        assert_eq!(a.link_local().segments()[..4], [0xfe80, 0, 0, 0]);
        let s = AgentConfig::new("h1", bus().in_session("other"), Interface::default()).unwrap();
        assert_ne!(s.link_local(), a.link_local());
        let s = AgentConfig::new("h1", bus(), Interface { link_local: Some("fe80::1".parse().unwrap()), ..Interface::default() }).unwrap();
        assert_eq!(s.link_local().to_string(), "fe80::1");
        assert!(a.owned_addresses().contains(&IpAddr::V6(a.link_local())));
    }

    #[test]
    fn queue_names_and_exchange_carry_the_session() {
        assert_eq!(agent("h1").queue_name(3), "tunbus.h1.3");
        let c = AgentConfig::new("h1", bus().in_session("s7"), Interface::default()).unwrap();
        assert_eq!(c.queue_name(0), "tunbus.s7.h1.0");
        assert_eq!(c.bus().exchange, "tunbus.s7");
    }

    #[test]
    fn the_identity_defaults_to_the_login() {
        let c = agent("h1");
        assert_eq!(c.identity().user, "h1");
        assert!(matches!(c.identity().mode, crate::identity::Mode::FirstClaim));
    }

    /// Every part is checked, whoever builds it (the CLI, the lab, a test).
    #[test]
    fn invalid_parts_are_refused_with_the_setting_named() {
        let err = |r: Result<AgentConfig, ConfigError>| r.unwrap_err().0;
        assert!(err(AgentConfig::new("h.1", bus(), Interface::default())).contains("name \"h.1\""));
        assert!(err(AgentConfig::new("h1", Bus::new(Vec::new()), Interface::default())).contains("no broker URL"));
        assert!(err(AgentConfig::new("h1", bus().in_session("a.b"), Interface::default())).contains("session"));
        assert!(err(AgentConfig::new("h1", Bus { frame_max: Some(8), ..bus() }, Interface::default())).contains("frame max 8"));
        assert!(err(AgentConfig::new("h1", Bus { prefetch: 0, ..bus() }, Interface::default())).contains("prefetch"));
        assert!(err(AgentConfig::new("h1", Bus { queue_max_bytes: 10, ..bus() }, Interface::default())).contains("queue max bytes"));
        assert!(err(AgentConfig::new("h1", bus(), Interface { queues: 0, ..Interface::default() })).contains("0 queues"));
        assert!(err(AgentConfig::new("h1", bus(), Interface { queues: 17, ..Interface::default() })).contains("17 queues"));
        assert!(err(AgentConfig::new("h1", bus(), Interface { mtu: 576, ..Interface::default() })).contains("MTU 576"));
        assert!(err(AgentConfig::new("h1", bus(), Interface { ifname: "a/b".into(), ..Interface::default() })).contains("interface name"));
        assert!(err(AgentConfig::new("h1", bus(), Interface { link_local: Some("fd00::1".parse().unwrap()), ..Interface::default() })).contains("fe80::/10"));
        assert!(err(agent("h1").with_data_path(DataPath { max_batch_bytes: 1000, ..DataPath::default() })).contains("max batch bytes"));
        assert!(err(agent("h1").with_data_path(DataPath { stats_interval: Duration::from_secs(100_000), ..DataPath::default() })).contains("stats interval"));
        // The ioppytest wire: one queue, no offload.
        let old = DataPath { wire: Wire::Ioppytest, ..DataPath::default() };
        assert!(err(agent("h1").with_data_path(old.clone())).contains("offload"));
        let plain = Interface { offload: false, ..Interface::default() };
        assert!(err(AgentConfig::new("h1", bus(), Interface { queues: 2, ..plain.clone() }).unwrap().with_data_path(old.clone())).contains("one queue"));
        assert!(AgentConfig::new("h1", bus(), plain).unwrap().with_data_path(old).is_ok());
    }

    /// A serial probe: one queue, no addresses, no offload, a baud rate the system can set;
    /// it owns no address (its frames are flooded, it binds no unicast key).
    #[test]
    fn a_serial_probe_has_one_queue_and_no_addresses() {
        let err = |r: Result<AgentConfig, ConfigError>| r.unwrap_err().0;
        let serial = Interface {
            kind: PortKind::Serial(crate::port::serial::SerialConfig::new("/dev/ttyUSB0", 460_800)),
            ifname: "serial".into(),
            offload: false,
            ..Interface::default()
        };
        let c = AgentConfig::new("probe1", bus(), serial.clone()).unwrap();
        assert!(c.owned_prefixes().is_empty() && !c.hosts_own_endpoint());
        assert_eq!(c.interface().serial().map(|s| s.baud), Some(460_800));
        assert!(err(AgentConfig::new("p", bus(), Interface { queues: 2, ..serial.clone() })).contains("one queue"));
        assert!(err(AgentConfig::new("p", bus(), Interface { offload: true, ..serial.clone() })).contains("offloads"));
        assert!(err(AgentConfig::new("p", bus(), Interface { addrs: vec!["198.18.0.1/24".parse().unwrap()], ..serial.clone() })).contains("no addresses"));
        let odd = Interface { kind: PortKind::Serial(crate::port::serial::SerialConfig::new("/dev/ttyUSB0", 12_345)), ..serial };
        assert!(err(AgentConfig::new("p", bus(), odd)).contains("baud rate 12345"));
    }
}
