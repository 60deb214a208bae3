//! The command line: clap derive types, and their conversion into validated configuration.
//!
//! Nothing below this module sees `Args`; a bad flag becomes a one-line error here. One
//! file per command (its flags and their conversion), [`bus`] for the broker and session
//! flags they share, [`config_file`] for `connect --config FILE`.

mod bus;
mod capture;
mod completions;
pub mod config_file;
mod connect;
mod doctor;
mod keygen;
mod lab;
mod manpages;
mod peers;
mod ping;
mod provision;
mod route;
mod serial;
mod sniffer;
mod status;

pub use bus::{bus_exchange, BrokerArgs, BusArgs};
pub use capture::CaptureArgs;
pub use completions::CompletionsArgs;
pub use connect::{parse_cpus, ConnectArgs};
pub use doctor::DoctorArgs;
pub use keygen::KeygenArgs;
pub use lab::{LabArgs, DEFAULT_LAB_HOSTS};
pub use manpages::ManpagesArgs;
pub use peers::PeersArgs;
pub use ping::PingArgs;
pub use provision::ProvisionArgs;
pub use route::RouteArgs;
pub use serial::SerialArgs;
pub use sniffer::SnifferArgs;
pub use status::StatusArgs;

use std::ffi::OsString;

use clap::{Parser, Subcommand};

use crate::exit::Failure;

#[derive(Debug, Parser)]
#[command(
    name = "agent",
    version,
    about = "tunbus agent: carries IP packets between hosts over a RabbitMQ message bus",
    long_about = "tunbus agent: carries IP packets between hosts over a RabbitMQ message bus.\n\n\
Each agent owns a multi-queue TUN interface. Packets the kernel routes into it are batched \
and published to the broker with a routing key naming their destination; the agent that owns \
that address consumes them and writes them into its own TUN.\n\n\
Logging: RUST_LOG (e.g. RUST_LOG=debug) controls verbosity; the default is info.\n\n\
Invoked as ioppytest-agent (a symlink), connect speaks the Python ioppytest-agent's wire by \
default and accepts its 0.2.20 flags.",
    after_help = crate::exit::TABLE
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log warnings and errors only (RUST_LOG, when set, still decides).
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// How log lines are written to stderr: text for people, json (one object per line)
    /// for journald and log shippers.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

/// The command line's definition, with an environment variable for every `connect` flag:
/// `TUNBUS_` and the flag's long name in capitals (the URL keeps `AMQP_URL` and
/// `AMQP_URL_FILE`, which `BrokerArgs` reads itself).
pub fn command() -> clap::Command {
    let with_env = |sub: clap::Command| {
        let longs: Vec<(String, String)> = sub
            .get_arguments()
            .filter(|a| a.get_env().is_none())
            .filter_map(|a| Some((a.get_id().to_string(), a.get_long()?.to_owned())))
            .filter(|(_, long)| !matches!(long.as_str(), "url" | "url-file" | "help" | "version"))
            .collect();
        longs.into_iter().fold(sub, |c, (id, long)| c.mut_arg(id, |a| a.env(format!("TUNBUS_{}", long.to_uppercase().replace('-', "_")))))
    };
    let with_headings = |sub: clap::Command| {
        let mut order = 0;
        CONNECT_HEADINGS.iter().fold(sub, |c, (heading, ids)| {
            ids.iter().fold(c, |c, id| {
                order += 1;
                let n = order;
                c.mut_arg(*id, |a| a.help_heading(*heading).display_order(n))
            })
        })
    };
    // `agent doctor` checks what `agent connect` would start: the same flags, file and
    // variables.
    <Cli as clap::CommandFactory>::command().mut_subcommand("connect", |c| with_headings(with_env(c))).mut_subcommand("doctor", |c| with_headings(with_env(c)))
}

/// `connect --help` in sections, in this order (every flag of connect has one: a test says so).
pub const CONNECT_HEADINGS: [(&str, &[&str]); 11] = [
    ("Who and where", &["name", "config", "session", "exchange", "wire"]),
    ("Broker", &["url", "url_file", "tls_ca", "tls_cert", "tls_key", "tls_insecure", "heartbeat", "broker_user"]),
    ("Interface", &["ipv4", "ipv6", "netns", "ifname", "mtu", "queues", "cpus", "no_offload", "no_offload_from_bus"]),
    ("Userspace stack (no root, no TUN)", &["userspace", "forward", "expose", "socks5"]),
    ("Ethernet (L2) session", &["l2", "bridge"]),
    ("Identities and encryption", &["peers", "no_identity_check", "e2e", "private_key", "e2e_key_log"]),
    ("Subnet routing", &["advertise", "accept_routes", "masquerade", "route", "cleanup"]),
    ("ioppytest wire", &["wait_config", "coordinator", "start_within", "ipv6_prefix", "ipv6_host", "ipv4_address", "ipv4_netmask", "force_bootstrap", "dump"]),
    ("Capture and emulation", &["pcap", "emulate", "emulate_to", "emulate_seed"]),
    ("Statistics", &["stats_interval", "stats_json", "metrics_addr", "status_dir"]),
    ("Tuning", &["max_batch_bytes", "queue_max_bytes", "prefetch", "fixed_prefetch", "aqm_target", "aqm_interval", "aqm_drop", "no_aqm"]),
];

/// The examples `connect --help` ends with (then the exit codes).
pub const CONNECT_EXAMPLES: &str = concat!(
    "Examples:\n",
    "  Join a platform's session (the operator gives you the URL, or a URL file, the session, your\n",
    "  agent's name and its addresses; sudo -E keeps AMQP_URL):\n",
    "    sudo -E agent connect --url-file h1.url --session lab --name h1 --ipv4 198.18.0.1/24 --ipv6 fd00:7b::1/64\n",
    "  The same on ioppytest's wire, the addresses from the coordinator's ip.tun.start:\n",
    "    sudo -E agent connect --wire ioppytest --name coap_client --wait-config\n",
    "  All from a file (what the systemd unit tunbus-agent@h1 runs; agent provision writes one):\n",
    "    sudo agent connect --config /etc/tunbus/h1.toml\n",
    "  Check a start before making it, and the path to a peer once up:\n",
    "    sudo agent doctor --config /etc/tunbus/h1.toml;  agent ping h2;  sudo agent status",
);

/// `connect --help`'s epilogue: examples, then the exit codes.
fn connect_after_help() -> String {
    format!("{CONNECT_EXAMPLES}\n\n{}", crate::exit::TABLE)
}

/// Why the command line could not be read.
#[derive(Debug)]
pub enum ParseError {
    /// clap's own (usage, --help, --version): `exit()` prints it with clap's exit code.
    Clap(clap::Error),
    /// The `--config` file: unreadable, not TOML, or a key that is no flag or has a bad value.
    File(Failure),
}

/// Parses the command line: flags, then the environment, then `connect --config FILE`,
/// then the defaults ([`config_file`]).
pub fn parse(argv: Vec<OsString>) -> Result<Cli, ParseError> {
    config_file::parse_with_file(&effective_args(argv))
}

/// The name under which tunbus is the Python agent's drop-in (a symlink to `agent`).
pub const IOPPYTEST_AGENT: &str = "ioppytest-agent";

/// The arguments `agent` parses. Invoked as [`IOPPYTEST_AGENT`], `connect` speaks the old
/// wire unless `--wire` is given, so `ioppytest-agent connect --url … --name agent_1
/// --force-bootstrap` runs as it did with the Python agent.
pub fn effective_args(mut argv: Vec<OsString>) -> Vec<OsString> {
    let invoked = argv.first().and_then(|a| std::path::Path::new(a).file_name()).and_then(|n| n.to_str()).unwrap_or("");
    if invoked != IOPPYTEST_AGENT {
        return argv;
    }
    let has_wire = argv.iter().any(|a| a == "--wire" || a.to_str().is_some_and(|a| a.starts_with("--wire=")));
    if let Some(i) = argv.iter().position(|a| a == "connect") {
        if !has_wire {
            argv.splice(i + 1..i + 1, ["--wire".into(), "ioppytest".into()]);
        }
    }
    argv
}

// Parsed once per run: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the TUN interface and connect it to the bus until Ctrl-C / SIGTERM.
    #[command(after_help = connect_after_help())]
    Connect(ConnectArgs),
    /// Check, in order, what `agent connect` with the same flags needs, and say how to fix
    /// what is missing (the TUN device, capabilities, broker, TLS, login, vhost,
    /// permissions, MTU, clock).
    Doctor(DoctorArgs),
    /// Probe an agent through the bus (like tailscale ping): the time to the broker and
    /// back and to the peer's agent and back, which node and queue answered.
    Ping(PingArgs),
    /// List the agents present on the bus (asks them to announce themselves).
    Peers(PeersArgs),
    /// Bring up N hosts (namespaces + agents) on this machine, check them, report, tear down.
    Lab(LabArgs),
    /// Serve an ioppytest session: route old agents' packets per the test configuration's
    /// topology, and bridge them with native tunbus agents.
    Route(RouteArgs),
    /// Put an IEEE 802.15.4 probe (a SLIP serial line) on the bus: frames it reads go to the
    /// session, frames for it are written to it; ioppytest's serial keys or native batches.
    Serial(SerialArgs),
    /// Create (or with --revoke remove) a session on a shared broker: its vhost and
    /// exchange, one user per agent with its own permissions, URL files and a peers file.
    Provision(ProvisionArgs),
    /// Write everything crossing a session's bus into one pcapng file, one interface per
    /// sending agent, until Ctrl-C or --duration (like tcpdump -w, for the whole testbed).
    Capture(CaptureArgs),
    /// Serve ioppytest's sniffer role: sniffing.start/stop/getcapture/getlastcapture
    /// requests on the exchange, answered with pcap files of what crossed the bus.
    Sniffer(SnifferArgs),
    /// Show the agents running on this host (like `wg show`): links and their broker
    /// nodes, rates, drops by reason, latency, peers. Asks each agent's control socket.
    Status(StatusArgs),
    /// Print a shell completion script: `source <(agent completions bash)`, or save it where
    /// the shell looks (bash: /usr/share/bash-completion/completions/agent).
    Completions(CompletionsArgs),
    /// Make a private key for end-to-end encryption (--e2e): the key on standard output
    /// (`agent keygen > h1.key`, mode 600), its public key on standard error (for the peers
    /// file: `USER PREFIX… key=PUBLIC`). With --public, read a private key on standard
    /// input and print its public key.
    Keygen(KeygenArgs),
    /// Write the man pages (agent.1 and one per subcommand) into DIR, for packaging.
    #[command(hide = true)]
    Manpages(ManpagesArgs),
}

/// A parser of integers within a configuration range (clap's ranges are `i64`).
fn within<T>(range: std::ops::RangeInclusive<T>) -> clap::builder::RangedI64ValueParser<T>
where
    T: Copy + Into<i64> + TryFrom<i64> + Clone + Send + Sync + 'static,
    <T as TryFrom<i64>>::Error: std::error::Error + Send + Sync + 'static,
{
    clap::builder::RangedI64ValueParser::new().range((*range.start()).into()..=(*range.end()).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every flag of `connect` (and so of `doctor`) is in one section of `--help`: a new
    /// flag must choose one.
    #[test]
    fn every_connect_flag_has_a_section_and_help_ends_with_examples() {
        let cmd = command();
        for sub in ["connect", "doctor"] {
            let c = cmd.find_subcommand(sub).expect("subcommand");
            for a in c.get_arguments() {
                let id = a.get_id().as_str();
                if matches!(id, "help" | "version" | "quiet" | "log_format" | "api") {
                    continue;
                }
                assert!(a.get_help_heading().is_some(), "{sub} --{id} is in no section of CONNECT_HEADINGS");
            }
        }
        let help = cmd.find_subcommand("connect").expect("connect").clone().render_help().to_string();
        for heading in CONNECT_HEADINGS.iter().map(|(h, _)| *h) {
            assert!(help.contains(&format!("{heading}:")), "{heading}");
        }
        assert!(help.contains("Examples:") && help.contains("sudo -E agent connect") && help.contains(crate::exit::TABLE), "{help}");
    }
}
