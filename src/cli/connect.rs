//! `agent connect`: its flags, and their conversion into a checked `AgentConfig`
//! (decision 0019).
//!
//! Main thread, once per run; not on the hot path.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;

use super::{bus_exchange, within, BusArgs};
use crate::codec::ioppytest::addressing::OldAddressing;
use crate::config::{self, AgentConfig, Bus, ConfigError, DataPath, Identity, Interface, Ioppytest, Prefix, Wire, DEFAULT_MTU};
use crate::exit::{Exit, Failure};

#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// Read connect's flags from a TOML file, under their long names (`queues = 4`, `url =
    /// ["amqp://…", …]`, `no-offload = true`). Precedence: flag > environment variable >
    /// file > default. Every flag has a variable: TUNBUS_ and its name in capitals
    /// (TUNBUS_QUEUES, TUNBUS_MAX_BATCH_BYTES); the URL's are AMQP_URL and AMQP_URL_FILE.
    #[arg(long, value_name = "FILE", env = "TUNBUS_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub bus: BusArgs,
    /// Name of this agent on the bus (one topic word: letters, digits, '-', '_'); part of
    /// its queue names.
    #[arg(long)]
    pub name: String,
    /// TUN queues = worker threads = AMQP connections = consumer queues (at most 16, the
    /// number of flow shards).
    #[arg(long, default_value_t = config::DEFAULT_QUEUES, value_parser = within(config::QUEUES))]
    pub queues: u16,
    /// IPv4 address with prefix length, e.g. 198.18.0.1/24 (repeatable).
    #[arg(long, value_name = "ADDR/PREFIX")]
    pub ipv4: Vec<Prefix>,
    /// IPv6 address with prefix length, e.g. fd00:7b::1/64 (repeatable).
    #[arg(long, value_name = "ADDR/PREFIX")]
    pub ipv6: Vec<Prefix>,
    /// Interface MTU [default: 9000; 1500 with --wire ioppytest]. TCP super-packets of
    /// 64 KiB travel whole either way (offloads); jumbo frames cut the packet rate of
    /// non-offloaded bulk traffic 6x compared with 1500.
    #[arg(long, value_parser = within(config::MTU))]
    pub mtu: Option<u32>,
    /// Wire format: native tunbus batches, or the Python ioppytest-agent's JSON (one
    /// packet per message on fromAgent.<NAME>…/toAgent.<NAME>…, through `agent route`).
    #[arg(long, default_value = "native", value_parser = wire_parser())]
    pub wire: Wire,
    /// With --wire ioppytest: create the interface only when toAgent.<NAME>.ip.tun.start
    /// brings the addresses (as an ioppytest coordinator expects). ioppytest's coordinators
    /// stamp no user_id: without --coordinator such orders are taken from anyone the broker
    /// lets publish that key (isolate the session in a vhost of its own), always inside
    /// --start-within and at most 8 orders.
    #[arg(long)]
    pub wait_config: bool,
    /// Accepted so that ioppytest-agent 0.2.20 scripts run unchanged. It changes nothing:
    /// tunbus always configures its interface (the flag defaulted to on there too).
    #[arg(long)]
    pub force_bootstrap: bool,
    /// What ioppytest-agent 0.2.20 promised (it did nothing there): --pcap NAME.pcapng.
    #[arg(long)]
    pub dump: bool,
    /// Remove what a killed agent of this --name left on its host (its --masquerade
    /// nftables table, in --netns when given, and its status socket) and exit; nothing is
    /// started. A clean exit, and the next start, remove them too.
    #[arg(long)]
    pub cleanup: bool,
    /// Write what crosses this agent's TUN, both directions, to FILE (pcapng, raw IP,
    /// stamped when read or written). A writer thread of its own: when it falls behind,
    /// packets are left out of the file and counted, never delayed.
    #[arg(long, value_name = "FILE")]
    pub pcap: Option<PathBuf>,
    /// Emulate a link on everything this agent sends, in tc-netem's words: 'delay 20ms 2ms
    /// loss 1% rate 100mbit'; also loss gemodel P R [1-H [1-K]], duplicate P%, reorder P%,
    /// limit PACKETS, flap UP DOWN. Random decisions come from --emulate-seed.
    #[arg(long, value_name = "SPEC", value_parser = parse_spec)]
    pub emulate: Option<crate::emulate::Spec>,
    /// Emulate a link towards one agent (by name; its addresses come from its hellos),
    /// instead of --emulate for its packets: h2='delay 50ms loss gemodel 1% 10%'. Repeat
    /// for more peers.
    #[arg(long, value_name = "PEER=SPEC", value_parser = crate::emulate::Emulation::parse_to)]
    pub emulate_to: Vec<(String, crate::emulate::Spec)>,
    /// Seed of every random decision of the emulation: the same seed and the same packets
    /// give the same drops, delays and reorders (to replay a failing run).
    #[arg(long, value_name = "N", default_value_t = crate::emulate::DEFAULT_SEED)]
    pub emulate_seed: u64,
    /// With --wire ioppytest: only orders (toAgent.<NAME>.ip.tun.start) stamped by this
    /// broker user count; orders without user_id are then refused and counted [default:
    /// orders stamped by this agent's own user, and orders without user_id, as ioppytest's
    /// coordinators send them].
    #[arg(long, value_name = "USER")]
    pub coordinator: Option<String>,
    /// With --wire ioppytest: ordered addresses must lie in these prefixes, at least as
    /// narrow (repeatable) [default: ioppytest's 10.2.0.0/24 and bbbb::/64, and the
    /// networks of --ipv4/--ipv6].
    #[arg(long, value_name = "PREFIX")]
    pub start_within: Vec<Prefix>,
    /// ioppytest-agent style: IPv6 prefix (with --ipv6-host: bbbb + 1 = bbbb::1/64, fe80::1).
    #[arg(long, value_name = "PREFIX")]
    pub ipv6_prefix: Option<String>,
    /// ioppytest-agent style: IPv6 host part.
    #[arg(long, value_name = "HOST")]
    pub ipv6_host: Option<String>,
    /// ioppytest-agent style: IPv4 address (netmask from --ipv4-netmask).
    #[arg(long, value_name = "ADDR")]
    pub ipv4_address: Option<std::net::Ipv4Addr>,
    /// ioppytest-agent style: IPv4 netmask.
    #[arg(long, value_name = "MASK", default_value = "255.255.255.0")]
    pub ipv4_netmask: std::net::Ipv4Addr,
    /// No kernel interface: the agent's addresses live in a userspace TCP/IP stack inside
    /// the agent (no root, no /dev/net/tun, no namespace). They answer pings; applications
    /// reach the bus through --forward, --expose and --socks5. One queue.
    #[arg(long, conflicts_with_all = ["netns", "queues", "pcap"])]
    pub userspace: bool,
    /// With --userspace: listen on LOCAL and carry each TCP connection or UDP flow to an
    /// address on the bus, e.g. tcp:127.0.0.1:8080=10.2.0.3:80 or
    /// udp:127.0.0.1:5683=[bbbb::3]:5683 (repeatable).
    #[arg(long, value_name = "PROTO:LOCAL=BUSADDR:PORT", requires = "userspace")]
    pub forward: Vec<crate::port::userspace::spec::Forward>,
    /// With --userspace: answer PORT on the agent's bus addresses with the local service
    /// LOCAL, e.g. tcp:80=127.0.0.1:8000 or udp:5683=127.0.0.1:5683 (repeatable).
    #[arg(long, value_name = "PROTO:PORT=LOCAL", requires = "userspace")]
    pub expose: Vec<crate::port::userspace::spec::Expose>,
    /// With --userspace: a SOCKS5 server (RFC 1928: CONNECT and UDP ASSOCIATE, IPv4 and
    /// IPv6, no authentication) into the bus on this local address, e.g. 127.0.0.1:1080.
    #[arg(long, value_name = "ADDR:PORT", requires = "userspace")]
    pub socks5: Option<crate::port::userspace::spec::Socks5>,
    /// An Ethernet (L2) session: a multi-queue TAP with its own MAC (02:… from session and
    /// name) instead of a TUN; frames are switched on the bus by destination MAC, and
    /// broadcast, multicast and unknown unicast are flooded to the session (bounded per
    /// sender). ARP, DHCP, IPv6 RAs/SLAAC, VLAN tags and any ethertype cross. Every agent
    /// of the session must use --l2 (a start that hears an IP agent there is refused).
    /// MTU 1500 unless --mtu.
    #[arg(long, conflicts_with_all = ["userspace", "wait_config"])]
    pub l2: bool,
    /// With --l2: enslave the TAP to this existing Linux bridge (in --netns when given), so
    /// the VMs, containers, veths or NICs on it join the segment. Run no STP loop through
    /// two such gateways: the bus does not carry BPDUs' loop protection for you (the flood
    /// bound limits the damage).
    #[arg(long, value_name = "BR", requires = "l2")]
    pub bridge: Option<String>,
    /// Move the interface into this existing network namespace and configure it there.
    #[arg(long)]
    pub netns: Option<String>,
    /// Interface name.
    #[arg(long, default_value = config::DEFAULT_IFNAME)]
    pub ifname: String,
    /// Pin queue worker k to core LIST[k mod len], e.g. 0,1 or 2-5 [default: no pinning; the
    /// scheduler places them, which measured better when agents share a machine].
    #[arg(long, value_name = "LIST")]
    pub cpus: Option<String>,
    /// Do not ask the kernel for TSO/USO super-packets and checksum offload.
    #[arg(long)]
    pub no_offload: bool,
    /// Hand no offload from the bus to the kernel: checksums that senders left to
    /// offload are completed in software, super-packets (TSO/USO) are dropped as
    /// `offload_refused` (senders should then run with --no-offload). By default offload
    /// headers pass only after the allow-list in docs/security.md.
    #[arg(long)]
    pub no_offload_from_bus: bool,
    /// Seconds between one-line statistics summaries (0: off).
    #[arg(long, default_value_t = config::DEFAULT_STATS_INTERVAL.as_secs_f64(), value_name = "SECONDS")]
    pub stats_interval: f64,
    /// Largest AMQP message body (one batch of packets), in bytes.
    #[arg(long, default_value_t = config::DEFAULT_MAX_BATCH_BYTES, value_parser = within(config::MAX_BATCH_BYTES))]
    pub max_batch_bytes: u32,
    /// Serve Prometheus metrics on GET /metrics at this address (PORT alone means
    /// 127.0.0.1:PORT). Off by default.
    #[arg(long, value_name = "[HOST:]PORT")]
    pub metrics_addr: Option<String>,
    /// Folder of this agent's control socket for `agent status` (made private to its user)
    /// [for users other than root: $XDG_RUNTIME_DIR/tunbus, else /tmp/tunbus-UID].
    #[arg(long, value_name = "DIR", default_value = config::RUN_DIR)]
    pub status_dir: PathBuf,
    /// Queue management of what this agent receives: when the bus keeps a standing queue
    /// longer than this (measured from each batch's timestamp, above the smallest delay
    /// seen), ECN-capable packets of the bulk flow are marked CE at CoDel's pace, so that a
    /// ping beside a transfer stays fast (docs/decisions/0028).
    #[arg(long, value_name = "TIME", default_value = "2ms", value_parser = parse_time)]
    pub aqm_target: Duration,
    /// CoDel's interval: about the worst round trip of the flows through the bus.
    #[arg(long, value_name = "TIME", default_value = "20ms", value_parser = parse_time)]
    pub aqm_interval: Duration,
    /// Drop packets that are not ECN-capable where the queue management would mark (as a
    /// router's CoDel does; costly here: a dropped unit is often a super-packet).
    #[arg(long, conflicts_with = "no_aqm")]
    pub aqm_drop: bool,
    /// No queue management: batches are written however long they waited.
    #[arg(long)]
    pub no_aqm: bool,
    /// Write the final report as JSON to this file on exit.
    #[arg(long, value_name = "FILE")]
    pub stats_json: Option<std::path::PathBuf>,
    /// Bound of each of this agent's queues on the broker, in bytes (the oldest messages are
    /// dropped beyond it): caps the delay that builds up when this receiver is slower than
    /// its senders.
    #[arg(long, default_value_t = config::DEFAULT_QUEUE_MAX_BYTES, value_parser = clap::value_parser!(u64).range(config::QUEUE_MAX_BYTES))]
    pub queue_max_bytes: u64,
    /// Unacknowledged messages the broker may push to each consumer at connect (they are
    /// not counted against --queue-max-bytes). The window then grows to what one round trip
    /// to the broker carries, within 64 MiB per queue, unless --fixed-prefetch.
    #[arg(long, default_value_t = config::DEFAULT_PREFETCH, value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,
    /// Keep --prefetch as it is: no growth with a far broker.
    #[arg(long)]
    pub fixed_prefetch: bool,
    /// Strict identities: accept a packet only when the broker user that published it may
    /// use its source address, as FILE says (one line per user: USER PREFIX[,PREFIX…]; each
    /// user also gets its agent's link-local address). Without it, first claim: a user's
    /// hello claims its addresses, and a later claim by another live user is refused.
    #[arg(long, value_name = "FILE", conflicts_with = "no_identity_check")]
    pub peers: Option<PathBuf>,
    /// Accept every packet, whoever sent it (no check of senders' identities; warns).
    #[arg(long)]
    pub no_identity_check: bool,
    /// End-to-end encryption: every batch is sealed for its receiving agent (Noise IK
    /// handshake over the bus, AES-256-GCM), so the broker carries only ciphertext.
    /// Needs --private-key. Peers' public keys come from the --peers file (key=…), or
    /// without one are pinned on first use from the peers' hellos (weaker: whoever
    /// announces a name first holds it; docs/security.md). Traffic in clear, or from a
    /// peer without a key, is refused.
    #[arg(long, requires = "private_key")]
    pub e2e: bool,
    /// This agent's private key for --e2e (a file only its owner may read, written by
    /// `agent keygen > FILE`; the public key goes into the peers file).
    #[arg(long, value_name = "FILE", requires = "e2e")]
    pub private_key: Option<PathBuf>,
    /// With --e2e: append the session keys that open this agent's traffic to FILE (made
    /// 0600), as TLS's SSLKEYLOGFILE, so that `agent capture --keys DIR` with FILE in DIR
    /// can see inside. Whoever reads FILE reads the traffic: for labs and debugging.
    #[arg(long, value_name = "FILE", requires = "e2e")]
    pub e2e_key_log: Option<PathBuf>,
    /// The broker user this agent logs in as, when neither the URL nor the client
    /// certificate's common name says (RabbitMQ's ssl_cert_login_from other than
    /// common_name): every message carries it as user_id, which the broker checks.
    #[arg(long, value_name = "USER")]
    pub broker_user: Option<String>,
    /// Route for this network: packets other agents send to PREFIX come to this agent, whose
    /// kernel forwards them (forwarding is turned on in its namespace), e.g. 192.168.50.0/24
    /// (repeatable). Longest prefix wins; between equal prefixes, the lowest agent name.
    #[arg(long, value_name = "PREFIX")]
    pub advertise: Vec<Prefix>,
    /// Install a kernel route on this agent's interface for every prefix other agents
    /// advertise, and remove it when the advertisement goes [default: the host's routes are
    /// left alone].
    #[arg(long)]
    pub accept_routes: bool,
    /// With --advertise: the far networks see the bus behind this agent's own address
    /// (nftables table `tunbus_NAME` in its namespace, removed on exit; after a SIGKILL,
    /// `nft delete table inet tunbus_NAME`, or the next start replaces it).
    #[arg(long, requires = "advertise")]
    pub masquerade: bool,
    /// Send packets for PREFIX to the agent that owns NEXTHOP (a router on the bus), as
    /// `ip route add PREFIX via NEXTHOP` would, and route PREFIX into this agent's interface,
    /// e.g. 198.18.2.0/24=198.18.1.254 (repeatable). Beats an advertisement of the same prefix.
    #[arg(long, value_name = "PREFIX=NEXTHOP")]
    pub route: Vec<crate::route::table::StaticRoute>,
}

/// `--wire native|ioppytest` (the configuration's `Wire` knows nothing of clap).
pub(super) fn wire_parser() -> impl clap::builder::TypedValueParser<Value = Wire> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(["native", "ioppytest"]).map(|s| if s == "ioppytest" { Wire::Ioppytest } else { Wire::Native })
}

/// Parses a core list: `0,1`, `2-5`, `0,2-3`.
pub fn parse_cpus(text: &str) -> anyhow::Result<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let a: usize = a.parse().with_context(|| format!("--cpus: {part:?} is not a range"))?;
                let b: usize = b.parse().with_context(|| format!("--cpus: {part:?} is not a range"))?;
                if a > b || b > 4096 {
                    bail!("--cpus: {part:?} is not a valid range");
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().with_context(|| format!("--cpus: {part:?} is not a core number"))?),
        }
    }
    if cpus.is_empty() {
        bail!("--cpus: the list is empty");
    }
    Ok(cpus)
}

fn parse_spec(text: &str) -> Result<crate::emulate::Spec, String> {
    text.parse().map_err(|e: crate::emulate::SpecError| e.to_string())
}

impl ConnectArgs {
    pub fn into_config(self) -> anyhow::Result<AgentConfig> {
        let endpoints = self.bus.broker.endpoints()?;
        let heartbeat = self.bus.broker.heartbeat()?;
        let pcap = self.pcap.or_else(|| self.dump.then(|| PathBuf::from(format!("{}.pcapng", self.name))));
        if let Some(p) = self.ipv4.iter().find(|p| !p.addr.is_ipv4()) {
            bail!("--ipv4 {p} is not an IPv4 address");
        }
        if let Some(p) = self.ipv6.iter().find(|p| !p.addr.is_ipv6()) {
            bail!("--ipv6 {p} is not an IPv6 address");
        }
        let exchange = bus_exchange(&self.bus)?;
        let mut old = OldAddressing {
            ipv4: match self.ipv4_address {
                Some(a) => {
                    let len = crate::codec::ioppytest::addressing::netmask_len(self.ipv4_netmask)
                        .ok_or_else(|| anyhow::anyhow!("--ipv4-netmask {} is not a contiguous netmask", self.ipv4_netmask))?;
                    Some((a, len))
                }
                None => None,
            },
            ipv6_prefix: self.ipv6_prefix.clone(),
            ipv6_host: self.ipv6_host.clone(),
        };
        if self.ipv6_prefix.is_some() != self.ipv6_host.is_some() {
            bail!("--ipv6-prefix and --ipv6-host go together (bbbb + 1 = bbbb::1)");
        }
        if old.ipv6_prefix.is_some() && old.global_v6().is_none() {
            bail!("--ipv6-prefix {:?} with --ipv6-host {:?} is not an IPv6 address", self.ipv6_prefix.unwrap_or_default(), self.ipv6_host.unwrap_or_default());
        }
        if self.wait_config && self.wire != Wire::Ioppytest {
            bail!("--wait-config goes with --wire ioppytest");
        }
        if self.wire == Wire::Ioppytest && old.is_empty() && self.ipv4.is_empty() && self.ipv6.is_empty() && !self.wait_config {
            old = OldAddressing::default_for(&self.name).ok_or_else(|| {
                anyhow::anyhow!(
                    "agent {:?} has no default addresses (only agent_1 … agent_6 do): give --ipv6-prefix/--ipv6-host and/or --ipv4-address, or --wait-config",
                    self.name
                )
            })?;
        }
        if self.wire == Wire::Ioppytest && old.ipv4.is_none() {
            // ip.tun.started names one IPv4 address: the first --ipv4, so that a router
            // learns it (and bridges to it) as it does --ipv4-address.
            old.ipv4 = self.ipv4.iter().find_map(|p| match p.addr {
                std::net::IpAddr::V4(a) => Some((a, p.len)),
                std::net::IpAddr::V6(_) => None,
            });
        }
        let cpus = match &self.cpus {
            Some(text) => parse_cpus(text)?,
            None => Vec::new(),
        };
        let e2e = match &self.private_key {
            Some(key) if self.e2e => {
                let private = crate::e2e::keys::read_private_key(key).map_err(|e| Failure::new(Exit::Local, format!("--private-key: {e}")))?;
                let peer_keys = match &self.peers {
                    Some(peers) => {
                        let text =
                            std::fs::read_to_string(peers).map_err(|e| Failure::new(Exit::Local, format!("cannot read --peers {}: {e}", peers.display())))?;
                        crate::identity::peers_file::keys(&text).map_err(|e| Failure::new(Exit::Usage, format!("--peers {}: {e}", peers.display())))?
                    }
                    None => Vec::new(), // pinned on first use
                };
                Some(crate::config::E2eKeys { private_key: *private.as_bytes(), peer_keys, key_log: self.e2e_key_log.clone() })
            }
            _ => None,
        };
        let identity = if self.no_identity_check {
            tracing::warn!("--no-identity-check: packets are accepted whoever sent them; any bus member can pose as any address");
            crate::identity::Mode::Off
        } else if let Some(path) = &self.peers {
            let text = std::fs::read_to_string(path).map_err(|e| Failure::new(Exit::Local, format!("cannot read --peers {}: {e}", path.display())))?;
            let table = crate::identity::peers_file::parse(&text, self.bus.session.as_deref())
                .map_err(|e| Failure::new(Exit::Usage, format!("--peers {}: {e}", path.display())))?;
            crate::identity::Mode::Strict(table)
        } else {
            crate::identity::Mode::FirstClaim
        };
        let stats_interval =
            Duration::try_from_secs_f64(self.stats_interval).map_err(|_| anyhow::anyhow!("--stats-interval must be between 0 and 86400 seconds"))?;
        let metrics_addr = match &self.metrics_addr {
            Some(a) => Some(crate::metrics::prometheus::parse_addr(a).map_err(anyhow::Error::msg)?),
            None => None,
        };
        let bus = Bus {
            heartbeat,
            session: self.bus.session,
            exchange,
            prefetch: self.prefetch,
            adaptive_prefetch: !self.fixed_prefetch,
            queue_max_bytes: self.queue_max_bytes,
            ..Bus::new(endpoints)
        };
        let kind = if self.userspace {
            let services = crate::port::userspace::Services { forwards: self.forward, exposes: self.expose, socks5: self.socks5 };
            config::PortKind::Userspace { services, endpoints: Vec::new() }
        } else if self.l2 {
            config::PortKind::Tap { bridge: self.bridge }
        } else {
            config::PortKind::Tun
        };
        let l2 = self.l2;
        let userspace = self.userspace;
        let interface = Interface {
            kind,
            ifname: self.ifname,
            netns: self.netns,
            queues: usize::from(self.queues),
            addrs: {
                let mut addrs: Vec<Prefix> = self.ipv4.into_iter().chain(self.ipv6).collect();
                for p in old.prefixes() {
                    if !addrs.contains(&p) {
                        addrs.push(p);
                    }
                }
                addrs
            },
            // A userspace stack sends packets of at most its MTU; 1500 is what the far end's
            // links take without fragments.
            mtu: self.mtu.unwrap_or(if self.wire == Wire::Ioppytest || userspace || l2 { 1500 } else { DEFAULT_MTU }),
            link_local: old.link_local(),
            // The old wire carries plain packets only: no super-packets, no partial checksums.
            offload: !self.no_offload && self.wire == Wire::Native,
            ..Interface::default()
        };
        let data_path = DataPath {
            wire: self.wire,
            cpus,
            offload_from_bus: !self.no_offload_from_bus,
            max_batch_bytes: self.max_batch_bytes as usize,
            stats_interval,
            metrics_addr,
            status_dir: Some(if self.status_dir == std::path::Path::new(config::RUN_DIR) { crate::status::default_dir() } else { self.status_dir }),
            emulation: crate::emulate::Emulation { all: self.emulate, to: self.emulate_to, seed: self.emulate_seed, known: Vec::new() },
            hearing: None,
            pcap,
            aqm: (!self.no_aqm).then_some(config::AqmSettings { target: self.aqm_target, interval: self.aqm_interval, drop: self.aqm_drop }),
        };
        let mut start_within = self.start_within;
        if start_within.is_empty() {
            // The old agent's subnets, and the networks of the agent's own prefixes.
            start_within = Ioppytest::default().start_within;
            start_within.extend(interface.addrs.iter().copied());
        }
        let ioppytest = Ioppytest { addressing: old, coordinator: self.coordinator, start_within };
        let invalid = |e: ConfigError| Failure::new(Exit::Usage, e.to_string());
        let config = AgentConfig::new(&self.name, bus, interface)
            .map_err(invalid)?
            .with_data_path(data_path)
            .map_err(invalid)?
            .with_ioppytest(ioppytest)
            .map_err(invalid)?;
        let user = self.broker_user.unwrap_or_else(|| config.identity().user.clone());
        let routing = config::Routing { advertise: self.advertise, accept_routes: self.accept_routes, masquerade: self.masquerade, routes: self.route };
        Ok(config.with_identity(Identity { user, mode: identity }).map_err(invalid)?.with_routing(routing).map_err(invalid)?.with_e2e(e2e).map_err(invalid)?)
    }
}

/// A time as tc-netem writes it: `2ms`, `500us`, `1.5ms`, `1s`.
fn parse_time(s: &str) -> Result<Duration, String> {
    crate::emulate::spec::parse_time(s).ok_or_else(|| format!("expected a time such as 2ms, 500us or 1s, found {s:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{effective_args, Cli, Command};
    use clap::Parser;

    fn connect(args: &[&str]) -> anyhow::Result<AgentConfig> {
        let mut argv = vec!["agent", "connect"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv)?.command {
            Command::Connect(c) => c.into_config(),
            _ => unreachable!("parsed connect"),
        }
    }

    #[test]
    fn defaults_and_addresses() {
        let c = connect(&["--name", "h1", "--ipv4", "198.18.0.1/24", "--ipv6", "fd00:7b::1/64", "--queues", "2"]).unwrap();
        assert_eq!(c.interface().queues, 2);
        assert_eq!(c.interface().addrs.len(), 2);
        assert_eq!(c.bus().exchange, "amq.topic");
        assert_eq!(c.interface().ifname, "tb0");
        assert!(c.interface().offload);
    }

    #[test]
    fn as_ioppytest_agent_connect_speaks_the_old_wire() {
        let args = |v: &[&str]| effective_args(v.iter().map(Into::into).collect()).into_iter().map(|a| a.into_string().unwrap()).collect::<Vec<_>>();
        assert_eq!(
            args(&["/usr/bin/ioppytest-agent", "connect", "--name", "agent_1", "--force-bootstrap"]),
            ["/usr/bin/ioppytest-agent", "connect", "--wire", "ioppytest", "--name", "agent_1", "--force-bootstrap"]
        );
        assert_eq!(args(&["ioppytest-agent", "connect", "--wire", "native"]), ["ioppytest-agent", "connect", "--wire", "native"]);
        assert_eq!(args(&["ioppytest-agent", "connect", "--wire=native"]), ["ioppytest-agent", "connect", "--wire=native"]);
        assert_eq!(args(&["agent", "connect", "--name", "h1"]), ["agent", "connect", "--name", "h1"]);
        assert_eq!(args(&["ioppytest-agent", "--help"]), ["ioppytest-agent", "--help"]);
        let argv = effective_args(
            ["ioppytest-agent", "connect", "--url", "amqp://127.0.0.1", "--name", "agent_1", "--force-bootstrap", "--dump"].map(Into::into).to_vec(),
        );
        let Command::Connect(c) = Cli::try_parse_from(argv).unwrap().command else { panic!("connect") };
        let c = c.into_config().unwrap();
        assert_eq!(c.data_path().wire, Wire::Ioppytest);
        let addrs: Vec<String> = c.interface().addrs.iter().map(ToString::to_string).collect();
        assert_eq!(addrs, ["10.2.0.1/24", "bbbb::1/64"]);
        assert_eq!(c.data_path().pcap.as_deref(), Some(std::path::Path::new("agent_1.pcapng")), "--dump is --pcap NAME.pcapng");
    }

    #[test]
    fn session_picks_its_exchange() {
        let c = connect(&["--name", "h1", "--session", "lab7"]).unwrap();
        assert_eq!(c.bus().exchange, "tunbus.lab7");
        assert_eq!(c.queue_name(1), "tunbus.lab7.h1.1");
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        assert!(connect(&["--name", "a.b"]).is_err());
        assert!(connect(&["--name", "h1", "--ipv4", "fd00::1/64"]).is_err());
        assert!(connect(&["--name", "h1", "--ipv6", "198.18.0.1/24"]).is_err());
        assert!(connect(&["--name", "h1", "--queues", "0"]).is_err());
        assert!(connect(&["--name", "h1", "--url", "http://x"]).is_err());
        assert!(connect(&["--name", "h1", "--cpus", "3-1"]).is_err());
        assert!(connect(&["--name", "h1", "--ifname", "much-too-long-name"]).is_err());
        assert!(connect(&["--name", "h1", "--stats-interval", "-1"]).is_err());
        assert!(connect(&[]).is_err());
    }

    #[test]
    fn ioppytest_flags_and_defaults() {
        let c = connect(&["--name", "agent_2", "--wire", "ioppytest"]).unwrap();
        let addrs: Vec<String> = c.interface().addrs.iter().map(ToString::to_string).collect();
        assert_eq!(addrs, ["10.2.0.2/24", "bbbb::2/64"]);
        assert_eq!(c.link_local().to_string(), "fe80::2");
        assert_eq!(c.interface().mtu, 1500);
        assert!(!c.interface().offload);
        let c = connect(&["--name", "tt", "--wire", "ioppytest", "--ipv6-prefix", "fd00:20", "--ipv6-host", "1", "--ipv4-address", "198.18.20.1"]).unwrap();
        let addrs: Vec<String> = c.interface().addrs.iter().map(ToString::to_string).collect();
        assert_eq!(addrs, ["198.18.20.1/24", "fd00:20::1/64"]);
        let e = connect(&["--name", "stranger", "--wire", "ioppytest"]).unwrap_err().to_string();
        assert!(e.contains("no default addresses"), "{e}");
        assert!(connect(&["--name", "stranger", "--wire", "ioppytest", "--wait-config"]).is_ok());
        assert!(connect(&["--name", "x", "--wait-config"]).is_err());
        assert!(connect(&["--name", "x", "--ipv6-prefix", "bbbb"]).is_err());
        assert!(connect(&["--name", "agent_1", "--wire", "ioppytest", "--queues", "2"]).is_err());
    }

    #[test]
    fn routing_flags() {
        let c = connect(&["--name", "gw", "--ipv4", "198.18.0.9/24", "--advertise", "198.19.50.0/24", "--advertise", "fd00:50::/64", "--masquerade"]).unwrap();
        assert_eq!(c.routing().advertise.len(), 2);
        assert!(c.routing().masquerade && !c.routing().accept_routes);
        assert!(connect(&["--name", "h1", "--accept-routes"]).unwrap().routing().accept_routes);
        assert!(connect(&["--name", "gw", "--masquerade"]).is_err(), "--masquerade needs --advertise");
        assert!(connect(&["--name", "gw", "--advertise", "0.0.0.0/0"]).is_err());
        assert!(connect(&["--name", "gw", "--advertise", "224.0.0.0/4"]).is_err());
        assert!(connect(&["--name", "gw", "--advertise", "198.19.0.0/33"]).is_err());
        assert!(connect(&["--name", "gw", "--advertise", "198.19.0.0/24", "--userspace"]).is_err());
        assert!(connect(&["--name", "agent_1", "--wire", "ioppytest", "--accept-routes"]).is_err());
        let c = connect(&["--name", "h1", "--route", "198.19.2.0/24=198.18.0.254", "--route", "fd00:2::/64=fd00:1::fe"]).unwrap();
        assert_eq!(c.routing().routes.iter().map(ToString::to_string).collect::<Vec<_>>(), ["198.19.2.0/24=198.18.0.254", "fd00:2::/64=fd00:1::fe"]);
        assert!(connect(&["--name", "h1", "--route", "198.19.2.0/24"]).is_err());
        assert!(connect(&["--name", "h1", "--route", "198.19.2.0/24=198.18.0.254", "--userspace"]).is_err());
    }

    #[test]
    fn l2_makes_a_tap_with_its_own_mac() {
        let c = connect(&["--name", "h1", "--session", "plant", "--l2", "--ipv4", "198.18.0.1/24"]).unwrap();
        assert!(c.interface().is_l2());
        assert_eq!(c.interface().mtu, 1500);
        assert_eq!(c.mac(), crate::identity::mac(Some("plant"), "h1"));
        assert!(c.mac().is_local() && c.mac().is_unicast());
        assert_ne!(c.mac(), connect(&["--name", "h2", "--session", "plant", "--l2"]).unwrap().mac());
        let c = connect(&["--name", "gw", "--l2", "--bridge", "br-lab"]).unwrap();
        assert!(matches!(&c.interface().kind, config::PortKind::Tap { bridge: Some(b) } if b == "br-lab"));
        assert!(connect(&["--name", "gw", "--bridge", "br-lab"]).is_err(), "--bridge needs --l2");
        assert!(connect(&["--name", "gw", "--l2", "--bridge", "much-too-long-bridge"]).is_err());
        assert!(connect(&["--name", "gw", "--l2", "--userspace"]).is_err());
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpus("0,2-4").unwrap(), vec![0, 2, 3, 4]);
        assert!(parse_cpus("x").is_err());
        assert!(parse_cpus("").is_err());
    }
}
