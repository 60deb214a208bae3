//! `agent lab`: its flags, and their conversion into `lab::LabOptions`.
//!
//! Main thread, once per run; not on the hot path.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::Args;

use super::{within, BrokerArgs};
use crate::config::{self, DEFAULT_MTU};
use crate::exit::{Exit, Failure};
use crate::route;

/// Hosts of a lab when neither `--hosts` nor a topology says.
pub const DEFAULT_LAB_HOSTS: u32 = 4;

/// `--url`'s help in `agent lab` (the shared text is connect's).
const LAB_URL_HELP: &str = "Broker URL of the lab, repeatable for the nodes of a cluster. Only this flag or \
--url-file choose the lab's broker: AMQP_URL and AMQP_URL_FILE are ignored, so that a platform's URL \
exported for `agent connect` never turns a local lab into one on the platform's broker \
[default: localhost:5672 if it answers, else a private RabbitMQ node]";

#[derive(Debug, Args)]
#[command(mut_arg("url", |a| a.help(LAB_URL_HELP)))]
#[command(mut_arg("url_file", |a| a.help("Read the lab's broker URL (or a comma- or line-separated list) from FILE (AMQP_URL_FILE is ignored)")))]
pub struct LabArgs {
    /// Number of hosts (namespaces tb-h1 … tb-hN, or tb-<SESSION>-h<i>; with --userspace,
    /// endpoints h1 … hN) [default: 4, or the topology's `hosts:`; at most 4000, 20000 with
    /// --userspace].
    #[arg(long, value_parser = clap::value_parser!(u32).range(2..=20_000))]
    pub hosts: Option<u32>,
    /// Hosts are endpoints of userspace TCP/IP stacks inside this process: no namespaces,
    /// no kernel interfaces, at most 64 broker connections however many hosts (about 160
    /// endpoints per connection). Checked with the stacks' own pings.
    #[arg(long, conflicts_with_all = ["topology", "secure", "queues"])]
    pub userspace: bool,
    /// An Ethernet (L2) lab: every host gets a TAP instead of a TUN (`connect --l2`), and
    /// the bus switches frames between them; pings resolve through ARP and neighbour
    /// discovery across the bus.
    #[arg(long, conflicts_with_all = ["userspace", "secure"])]
    pub l2: bool,
    /// Every host is a simulated IEEE 802.15.4 radio whose medium is the bus: a
    /// pseudo-terminal (under $TMPDIR/tunbus-radios-<SESSION>/) that a program written for
    /// a serial probe opens and speaks SLIP on. With --topology the links are radio links:
    /// a pair without one hears nothing of each other, a link's loss, delay and flap apply
    /// to each frame it carries. Checked by sending frames from every radio.
    #[arg(long, conflicts_with_all = ["userspace", "l2", "secure", "queues"])]
    pub radio: bool,
    /// With --l2: h1 serves DHCP on its TAP (dnsmasq) and every other host leases its IPv4
    /// address over the bus (busybox udhcpc) before the checks; needs dnsmasq and busybox.
    #[arg(long, requires = "l2")]
    pub dhcp: bool,
    /// TUN queues per host.
    #[arg(long, default_value_t = config::DEFAULT_QUEUES, value_parser = within(config::QUEUES))]
    pub queues: u16,
    /// Stay up for interactive use until Ctrl-C (prints how to enter the hosts).
    #[arg(long)]
    pub keep: bool,
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Session: isolates this lab from other labs and agents on the same broker.
    #[arg(long, default_value = crate::lab::plan::DEFAULT_SESSION)]
    pub session: String,
    /// Pairs to ping in labs larger than 8 hosts (smaller labs check all pairs).
    #[arg(long, default_value_t = 100)]
    pub sample: usize,
    /// Seed of the pair sample.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Length of the iperf3 TCP sample from h1 to h2 (0: skip).
    #[arg(long, default_value_t = 2.0, value_name = "SECONDS")]
    pub throughput_seconds: f64,
    /// Start a private RabbitMQ node even if one answers on localhost:5672.
    #[arg(long)]
    pub private_broker: bool,
    /// Start a private RabbitMQ cluster of N nodes and spread the hosts over them round
    /// robin (each host lists the other nodes after its own, for failover).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=9))]
    pub brokers: u16,
    /// Interface MTU of every host.
    #[arg(long, default_value_t = DEFAULT_MTU, value_parser = within(config::MTU))]
    pub mtu: u32,
    /// Write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<std::path::PathBuf>,
    /// Remove what earlier labs left behind (namespaces, private brokers) and exit.
    #[arg(long)]
    pub cleanup: bool,
    /// Provision the session as `agent provision` does (its vhost, one broker user per host
    /// with its own permissions) and run every host with its own identity, strict mode.
    #[arg(long)]
    pub secure: bool,
    /// Every host encrypts end to end (`connect --e2e`) with a key the lab makes for it; the
    /// broker carries only ciphertext. Implies --secure (keys are bound to broker users).
    #[arg(long, conflicts_with_all = ["userspace", "l2", "radio"])]
    pub e2e: bool,
    /// With --e2e: every host notes its session keys in DIR/<host>.keys (made if missing),
    /// so that `agent capture --keys DIR` sees inside the lab's sealed batches.
    #[arg(long, value_name = "DIR", requires = "e2e")]
    pub keys: Option<PathBuf>,
    /// Internal: be the guard of lab process PID (see `lab::guard`).
    #[arg(long, hide = true, value_name = "PID")]
    pub guard: Option<u32>,
    /// Which hosts are linked and how each link behaves, in YAML (hosts: N; links: a list
    /// of {between: [h1, h2], emulate: 'delay 10ms loss 1%'}); hosts without a link cannot
    /// reach each other. Its hosts: may be left to --hosts. See docs/capture-and-emulation.md.
    /// Or a routed lab: `subnets: {a: [h1, h4], b: [h2, h4]}` instead of links, the k-th
    /// subnet 198.18.k.0/24 and fd00:7b:k::/64 (docs/decisions/0030-routed-labs.md).
    #[arg(long, value_name = "FILE")]
    pub topology: Option<PathBuf>,
    /// In a routed topology (`subnets:`; a host in several subnets is a router): whether
    /// the routers' kernels forward. Off, nothing crosses subnets until a program of yours,
    /// run in a router's namespace, routes (examples/forwarder.py does in 25 lines).
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = ["on", "off"])]
    pub routers: String,
    /// Grade a routed lab as an exercise's grader would: every ordered pair must reach
    /// (IPv4 and IPv6); prints who reached whom. With a lab of this --session running
    /// (started with --keep), grades that one and starts nothing; else starts the lab,
    /// grades it and tears it down.
    #[arg(long, requires = "topology")]
    pub check: bool,
}

impl LabArgs {
    pub fn options(&self) -> anyhow::Result<crate::lab::LabOptions> {
        if !route::is_valid_word(&self.session) || self.session.len() > 20 {
            bail!("--session {:?} must be one topic word of at most 20 characters: letters, digits, '-' or '_'", self.session);
        }
        // The lab's own command line only: a platform's AMQP_URL must not make a "local" lab
        // run on the platform's broker.
        let endpoints = if self.broker.given_on_command_line() { Some(self.broker.endpoints()?) } else { None };
        if !(self.throughput_seconds >= 0.0 && self.throughput_seconds <= 600.0) {
            bail!("--throughput-seconds must be between 0 and 600");
        }
        let topology = match &self.topology {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| Failure::new(Exit::Local, format!("cannot read --topology {}: {e}", path.display())))?;
                let hosts = self.hosts.map(|h| h as usize);
                Some(
                    crate::lab::topology::LabTopology::parse(&text, hosts)
                        .map_err(|e| Failure::new(Exit::Usage, format!("--topology {}: {e}", path.display())))?,
                )
            }
            None => None,
        };
        let routed = topology.as_ref().is_some_and(|t| t.is_routed());
        if !routed && (self.check || self.routers != "on") {
            bail!("--routers and --check go with a routed --topology (one with subnets:)");
        }
        if routed && (self.l2 || self.radio) {
            bail!("a routed topology (subnets:) is a lab of IP hosts: not with --l2 or --radio");
        }
        Ok(crate::lab::LabOptions {
            routers: self.routers == "on",
            check: self.check,
            hosts: topology.as_ref().map_or(self.hosts.unwrap_or(DEFAULT_LAB_HOSTS) as usize, |t| t.hosts),
            topology,
            queues: usize::from(self.queues),
            keep: self.keep,
            endpoints,
            heartbeat: self.broker.heartbeat()?,
            session: self.session.clone(),
            sample: self.sample.max(1),
            seed: self.seed,
            throughput: Duration::from_secs_f64(self.throughput_seconds),
            private_broker: self.private_broker,
            brokers: usize::from(self.brokers),
            secure: self.secure || self.e2e,
            e2e: self.e2e,
            keys: self.keys.clone(),
            mtu: self.mtu,
            userspace: self.userspace,
            l2: self.l2,
            radio: self.radio,
            dhcp: self.dhcp,
        })
    }
}
