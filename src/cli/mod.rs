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
mod lab;
mod manpages;
mod peers;
mod provision;
mod route;
mod sniffer;
mod status;

pub use bus::{bus_exchange, BrokerArgs, BusArgs};
pub use capture::CaptureArgs;
pub use completions::CompletionsArgs;
pub use connect::{parse_cpus, ConnectArgs};
pub use lab::{LabArgs, DEFAULT_LAB_HOSTS};
pub use manpages::ManpagesArgs;
pub use peers::PeersArgs;
pub use provision::ProvisionArgs;
pub use route::RouteArgs;
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
    <Cli as clap::CommandFactory>::command().mut_subcommand("connect", |connect| {
        let longs: Vec<(String, String)> = connect
            .get_arguments()
            .filter(|a| a.get_env().is_none())
            .filter_map(|a| Some((a.get_id().to_string(), a.get_long()?.to_owned())))
            .filter(|(_, long)| !matches!(long.as_str(), "url" | "url-file" | "help" | "version"))
            .collect();
        longs.into_iter().fold(connect, |c, (id, long)| c.mut_arg(id, |a| a.env(format!("TUNBUS_{}", long.to_uppercase().replace('-', "_")))))
    })
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
    #[command(after_help = crate::exit::TABLE)]
    Connect(ConnectArgs),
    /// List the agents present on the bus (asks them to announce themselves).
    Peers(PeersArgs),
    /// Bring up N hosts (namespaces + agents) on this machine, check them, report, tear down.
    Lab(LabArgs),
    /// Serve an ioppytest session: route old agents' packets per the test configuration's
    /// topology, and bridge them with native tunbus agents.
    Route(RouteArgs),
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
