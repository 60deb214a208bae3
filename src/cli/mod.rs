//! The command line: clap derive types, and their conversion into validated configuration.
//!
//! Nothing below this module sees `Args`; a bad flag becomes a one-line error here.

pub mod config_file;

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use crate::amqp::client::Endpoint;
use crate::amqp::tls::TlsOptions;
use crate::amqp::url::{self, BrokerUrl, DEFAULT_URL};
use crate::config::{self, AgentConfig, Bus, ConfigError, DataPath, Identity, Interface, Ioppytest, Prefix, Wire, DEFAULT_MTU};
use crate::exit::{Exit, Failure};
use crate::codec::ioppytest::addressing::OldAddressing;
use crate::route;

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
    use clap::FromArgMatches;
    let argv = effective_args(argv);
    // A first, lenient look for `connect --config` and for what the flags and the
    // environment already set (the file may hold required flags, like the name).
    let lenient = command().ignore_errors(true).mut_subcommand("connect", |c| c.ignore_errors(true)).try_get_matches_from(&argv);
    let file = match lenient.as_ref().ok().and_then(|m| m.subcommand()) {
        Some(("connect", given)) => match given.get_one::<PathBuf>("config") {
            Some(path) => Some((path.clone(), file_args(path, given)?)),
            None => None,
        },
        _ => None,
    };
    let Some((path, (text, table, extra))) = file else {
        return command().try_get_matches_from(&argv).and_then(|m| Cli::from_arg_matches(&m)).map_err(ParseError::Clap);
    };
    match command().try_get_matches_from(argv.iter().chain(&extra)).and_then(|m| Cli::from_arg_matches(&m)) {
        Ok(cli) => Ok(cli),
        Err(e) => {
            // A value from the file that the parser refuses: name its line and key.
            let arg = match e.get(clap::error::ContextKind::InvalidArg) {
                Some(clap::error::ContextValue::String(a)) => a.clone(),
                _ => String::new(),
            };
            let long = arg.trim_start_matches("--").split([' ', '=']).next().unwrap_or_default().to_owned();
            let Some(key) = table.keys().find(|k| !long.is_empty() && k.replace('_', "-") == long && extra.iter().any(|x| x.to_str().is_some_and(|x| x.starts_with(&format!("--{long}"))))) else {
                return Err(ParseError::Clap(e));
            };
            let text_of_error = e.to_string();
            let why = text_of_error.lines().next().unwrap_or_default().trim_start_matches("error: ").to_owned();
            let err = config_file::FileError { line: config_file::line_of(&text, key), key: Some(key.clone()), why };
            Err(ParseError::File(Failure::new(Exit::Usage, format!("--config {}", err.describe(&path.display().to_string())))))
        }
    }
}

/// The `--config` file: its text, its table, and its keys as arguments.
fn file_args(path: &std::path::Path, given: &clap::ArgMatches) -> Result<(String, toml::Table, Vec<OsString>), ParseError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ParseError::File(Failure::new(Exit::Local, format!("cannot read --config {file}: {e}"))))?;
    let bad = |e: config_file::FileError| ParseError::File(Failure::new(Exit::Usage, format!("--config {}", e.describe(&file))));
    let table = config_file::parse(&text).map_err(bad)?;
    let cmd = command();
    let connect = cmd.find_subcommand("connect").ok_or_else(|| ParseError::File(Failure::new(Exit::Internal, "no connect command".to_owned())))?;
    // The URL's variables outrank the file, as every flag's own does.
    let url_in_env = std::env::var_os("AMQP_URL").is_some() || std::env::var_os("AMQP_URL_FILE").is_some();
    let mut all = Vec::new();
    for (key, value) in &table {
        if url_in_env && matches!(key.replace('_', "-").as_str(), "url" | "url-file") {
            continue;
        }
        all.extend(config_file::key_args(&text, connect, given, key, value).map_err(bad)?);
    }
    Ok((text, table, all))
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

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  agent capture --session lab -w lab.pcapng\n  agent capture --session lab -w h2.pcapng --agent h2 --duration 30s\n  agent capture --session lab -w - | tshark -r -\n\nThe broker user needs read on the session's exchange, configure/write/read on amq.gen-* queues and topic read on tunbus.v1.# and fromAgent.# (docs/security.md, \"Capture\").")]
pub struct CaptureArgs {
    #[command(flatten)]
    pub bus: BusArgs,
    /// Write to FILE (pcapng, raw IP; `-`: standard output).
    #[arg(short = 'w', long = "write", value_name = "FILE")]
    pub write: PathBuf,
    /// Only packets sent by, or addressed to, this agent (repeatable).
    #[arg(long = "agent", value_name = "NAME")]
    pub agents: Vec<String>,
    /// Only packets from or to this address (repeatable).
    #[arg(long = "address", value_name = "IP", value_parser = crate::capture::parse_address)]
    pub addresses: Vec<std::net::IpAddr>,
    /// Stop after this long (30s, 2m, 500ms) [default: until Ctrl-C].
    #[arg(long, value_name = "TIME", value_parser = crate::capture::parse_duration)]
    pub duration: Option<Duration>,
    /// Keep TCP/UDP super-packets whole, as the agents carry them, instead of cutting them
    /// into the wire-sized packets they stand for.
    #[arg(long)]
    pub no_segment: bool,
    /// Bound of the capture's queue on the broker, in bytes: when the capture falls behind,
    /// the broker drops the oldest messages of this queue (never the agents'), and the
    /// summary counts them.
    #[arg(long, default_value_t = crate::capture::TAP_MAX_BYTES, value_name = "BYTES")]
    pub queue_max_bytes: u64,
    /// Print the summary as JSON on standard error.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SnifferArgs {
    #[command(flatten)]
    pub bus: BusArgs,
    /// Folder where the captures are kept (<capture_id>.pcap).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/tunbus/captures")]
    pub dir: PathBuf,
    /// Bound of each capture's queue on the broker, in bytes.
    #[arg(long, default_value_t = crate::capture::TAP_MAX_BYTES, value_name = "BYTES")]
    pub queue_max_bytes: u64,
}

#[derive(Debug, Args)]
pub struct ManpagesArgs {
    /// Folder to write `agent.1`, `agent-connect.1`, … into (created if missing).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
}

impl ManpagesArgs {
    /// Writes one page for `agent` and one for each visible subcommand, from the same
    /// definitions as `--help` (so they cannot drift).
    pub fn write(&self) -> std::io::Result<Vec<PathBuf>> {
        std::fs::create_dir_all(&self.dir)?;
        let root = command().name("agent");
        let mut written = Vec::new();
        let mut page = |cmd: clap::Command, name: &str| -> std::io::Result<()> {
            let path = self.dir.join(format!("{name}.1"));
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut out)?;
            std::fs::write(&path, out)?;
            written.push(path);
            Ok(())
        };
        for sub in root.get_subcommands().filter(|c| !c.is_hide_set()) {
            let name = format!("agent-{}", sub.get_name());
            page(sub.clone().name(name.clone()).bin_name(format!("agent {}", sub.get_name())), &name)?;
        }
        page(root, "agent")?;
        Ok(written)
    }
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Only this agent [default: every agent on this host].
    pub name: Option<String>,
    /// One JSON object per agent per line (the report inside is `--stats-json`'s).
    #[arg(long)]
    pub json: bool,
    /// Where the agents' sockets are (their --status-dir).
    #[arg(long, value_name = "DIR", default_value = crate::status::DEFAULT_DIR)]
    pub dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_parser = clap::value_parser!(clap_complete::Shell))]
    pub shell: clap_complete::Shell,
}

impl CompletionsArgs {
    /// Writes the completion script for `agent` (and its `ioppytest-agent` name) to `out`.
    pub fn write(&self, out: &mut dyn std::io::Write) {
        let mut command = command();
        clap_complete::generate(self.shell, &mut command, "agent", out);
    }
}

#[derive(Debug, Args)]
pub struct ProvisionArgs {
    /// An administrator's broker URL (the agents' URL files use its host, port and query).
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// The session: its vhost, exchange `tunbus.SESSION` and users `SESSION.AGENT`.
    #[arg(long)]
    pub session: String,
    /// An agent and its interface prefixes, NAME=PREFIX[,PREFIX…] (repeatable), e.g.
    /// h1=198.18.0.1/24,fd00:7b::1/64.
    #[arg(long = "agent", value_name = "NAME=PREFIXES")]
    pub agents: Vec<String>,
    /// Agents from a file: one NAME=PREFIX[,PREFIX…] per line, # comments.
    #[arg(long, value_name = "FILE")]
    pub agents_file: Option<PathBuf>,
    /// Also a capture user NAME (repeatable), for `agent capture` and `agent sniffer`: it
    /// reads every packet of the session and may send nothing but the presence probe.
    /// Its URL file is NAME.url.
    #[arg(long = "observer", value_name = "NAME")]
    pub observers: Vec<String>,
    /// Write NAME.url (the agent's URL, password included, mode 0600) and peers here.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// The management API [default: http://<broker host>:15672; without it, rabbitmqctl
    /// on this machine].
    #[arg(long, value_name = "URL")]
    pub api: Option<String>,
    /// Remove the session instead: its vhost and every user of it.
    #[arg(long)]
    pub revoke: bool,
}

impl ProvisionArgs {
    pub fn options(&self) -> anyhow::Result<crate::provision::Options> {
        let urls = self.broker.urls()?;
        let admin = urls.into_iter().next().ok_or_else(|| anyhow::anyhow!("no broker URL"))?;
        let mut agents = Vec::new();
        for a in &self.agents {
            agents.push(a.parse::<crate::provision::plan::AgentSpec>().map_err(|e| Failure::new(Exit::Usage, format!("--agent {a}: {e}")))?);
        }
        if let Some(f) = &self.agents_file {
            let text = std::fs::read_to_string(f).map_err(|e| Failure::new(Exit::Local, format!("cannot read --agents-file {}: {e}", f.display())))?;
            agents.extend(crate::provision::plan::parse_agents_file(&text).map_err(|e| Failure::new(Exit::Usage, format!("--agents-file {}: {e}", f.display())))?);
        }
        if !route::is_valid_word(&self.session) {
            return Err(Failure::new(Exit::Usage, format!("--session {:?} must be one topic word", self.session)).into());
        }
        if agents.is_empty() && !self.revoke {
            return Err(Failure::new(Exit::Usage, "give at least one --agent NAME=PREFIXES (or --agents-file)").into());
        }
        Ok(crate::provision::Options { admin, tls: self.broker.tls(), api: self.api.clone(), session: self.session.clone(), agents, observers: self.observers.clone(), out: self.out.clone(), node: None })
    }
}

#[derive(Debug, Args)]
pub struct RouteArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// ioppytest test configuration (YAML with a `topology` list of links and their nodes).
    #[arg(long, value_name = "FILE")]
    pub topology: std::path::PathBuf,
    /// Exchange of the session (ioppytest uses amq.topic).
    #[arg(long, default_value = "amq.topic")]
    pub exchange: String,
    /// Unacknowledged messages in flight from the broker.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,
    /// Seconds between one-line summaries (0: off).
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS")]
    pub stats_interval: f64,
    /// Write the final counters as JSON to this file on exit.
    #[arg(long, value_name = "FILE")]
    pub stats_json: Option<std::path::PathBuf>,
}

/// Hosts of a lab when neither `--hosts` nor a topology says.
pub const DEFAULT_LAB_HOSTS: u32 = 4;

#[derive(Debug, Args)]
pub struct LabArgs {
    /// Number of hosts (namespaces tb-h1 … tb-hN, or tb-<SESSION>-h<i>) [default: 4, or
    /// the topology's `hosts:`].
    #[arg(long, value_parser = clap::value_parser!(u32).range(2..=4000))]
    pub hosts: Option<u32>,
    /// TUN queues per host.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(clap_range(config::QUEUES.start(), config::QUEUES.end())))]
    pub queues: u16,
    /// Stay up for interactive use until Ctrl-C (prints how to enter the hosts).
    #[arg(long)]
    pub keep: bool,
    /// Broker URL, repeatable for the nodes of a cluster [default: localhost:5672 if it
    /// answers, else a private RabbitMQ node]. TLS flags as for `connect`.
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
    #[arg(long, default_value_t = DEFAULT_MTU, value_parser = clap::value_parser!(u32).range(clap_range(config::MTU.start(), config::MTU.end())))]
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
    /// Internal: be the guard of lab process PID (see `lab::guard`).
    #[arg(long, hide = true, value_name = "PID")]
    pub guard: Option<u32>,
    /// Which hosts are linked and how each link behaves, in YAML (hosts: N; links: a list
    /// of {between: [h1, h2], emulate: 'delay 10ms loss 1%'}); hosts without a link cannot
    /// reach each other. Its hosts: may be left to --hosts. See docs/capture-and-emulation.md.
    #[arg(long, value_name = "FILE")]
    pub topology: Option<PathBuf>,
}

impl LabArgs {
    pub fn options(&self) -> anyhow::Result<crate::lab::LabOptions> {
        if !route::is_valid_word(&self.session) || self.session.len() > 20 {
            bail!("--session {:?} must be one topic word of at most 20 characters: letters, digits, '-' or '_'", self.session);
        }
        let endpoints = if self.broker.given() { Some(self.broker.endpoints()?) } else { None };
        if !(self.throughput_seconds >= 0.0 && self.throughput_seconds <= 600.0) {
            bail!("--throughput-seconds must be between 0 and 600");
        }
        let topology = match &self.topology {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("--topology {}", path.display()))?;
                let hosts = self.hosts.map(|h| h as usize);
                Some(crate::lab::topology::Topology::parse(&text, hosts).map_err(|e| Failure::new(Exit::Usage, format!("--topology {}: {e}", path.display())))?)
            }
            None => None,
        };
        Ok(crate::lab::LabOptions {
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
            secure: self.secure,
            mtu: self.mtu,
        })
    }
}

/// Where the broker is and how to reach it: shared by every command that connects.
#[derive(Debug, Args)]
pub struct BrokerArgs {
    /// Broker URL: amqp[s]://USER:PASS@HOST[:PORT]/VHOST[?heartbeat=S&connection_timeout=MS&…]
    /// (vhost URL-encoded: %2f is "/"). Repeat it for the nodes of one cluster, in order
    /// of preference. Without it: --url-file, else $AMQP_URL_FILE, else $AMQP_URL (a
    /// comma-separated list), else amqp://guest:guest@localhost:5672/%2f (RabbitMQ's guest
    /// works from localhost only). Passwords are never printed.
    #[arg(long, value_name = "URL")]
    pub url: Vec<String>,
    /// Read the URL (or a comma- or line-separated list) from FILE, keeping the password out
    /// of the process list [env: AMQP_URL_FILE].
    #[arg(long, value_name = "FILE")]
    pub url_file: Option<PathBuf>,
    /// CA certificate (PEM) that signed the broker's certificate, for amqps:// [default:
    /// the system's roots]. The URL's cacertfile= overrides it.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM): log in by certificate (SASL EXTERNAL) when the URL names no
    /// user. The URL's certfile= overrides it.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// Key of --tls-cert (PEM). The URL's keyfile= overrides it.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Do not verify the broker's certificate (warns once; anyone on the path can then pose
    /// as the broker). Same as the URL's verify=verify_none.
    #[arg(long)]
    pub tls_insecure: bool,
    /// Heartbeat interval asked of the broker, in seconds (0: off); a dead path is noticed
    /// within two of them. The URL's heartbeat= overrides it.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub heartbeat: u16,
}

impl BrokerArgs {
    /// Whether any URL was given (flag, file or environment).
    pub fn given(&self) -> bool {
        !self.url.is_empty() || self.url_file.is_some() || std::env::var_os("AMQP_URL_FILE").is_some() || std::env::var_os("AMQP_URL").is_some()
    }

    /// The broker URLs, from the first place that has them.
    pub fn urls(&self) -> Result<Vec<BrokerUrl>, Failure> {
        let usage = |e: url::UrlError| Failure::new(Exit::Usage, e.to_string());
        if !self.url.is_empty() {
            let mut all = Vec::new();
            for u in &self.url {
                all.extend(url::parse_list(u).map_err(usage)?);
            }
            return Ok(all);
        }
        let file = self.url_file.clone().or_else(|| std::env::var_os("AMQP_URL_FILE").map(PathBuf::from));
        if let Some(path) = file {
            let text = std::fs::read_to_string(&path).map_err(|e| Failure::new(Exit::Local, format!("cannot read the URL file {}: {e}", path.display())))?;
            let list: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
            return url::parse_list(&list.join(",")).map_err(|e| Failure::new(Exit::Usage, format!("{}: {e}", path.display())));
        }
        if let Ok(env) = std::env::var("AMQP_URL") {
            return url::parse_list(&env).map_err(|e| Failure::new(Exit::Usage, format!("$AMQP_URL: {e}")));
        }
        url::parse_list(DEFAULT_URL).map_err(usage)
    }

    pub fn tls(&self) -> TlsOptions {
        TlsOptions { ca: self.tls_ca.clone(), cert: self.tls_cert.clone(), key: self.tls_key.clone(), insecure: self.tls_insecure }
    }

    /// The nodes with their TLS clients built (certificate files read now).
    pub fn endpoints(&self) -> Result<Vec<Endpoint>, Failure> {
        let tls = self.tls();
        if (tls.ca.is_some() || tls.cert.is_some() || tls.insecure) && self.urls()?.iter().all(|u| !u.tls) {
            return Err(Failure::new(Exit::Usage, "--tls-* flags need an amqps:// URL (TLS is chosen by the URL's scheme)"));
        }
        self.urls()?
            .into_iter()
            .map(|u| {
                let shown = u.to_string();
                Endpoint::new(u, &tls).map_err(|e| Failure::new(Exit::Tls, format!("TLS settings for {shown}: {e}")))
            })
            .collect()
    }

    pub fn heartbeat(&self) -> Result<Duration, Failure> {
        Ok(Duration::from_secs(u64::from(self.heartbeat)))
    }
}

#[derive(Debug, Args)]
pub struct BusArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// Testbed session: agents of different sessions never see each other's packets or
    /// presence. Uses the topic exchange `tunbus.<SESSION>` unless --exchange is given.
    #[arg(long)]
    pub session: Option<String>,
    /// Topic exchange carrying data and presence [default: amq.topic, or tunbus.<SESSION>].
    #[arg(long)]
    pub exchange: Option<String>,
}

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
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(clap_range(config::QUEUES.start(), config::QUEUES.end())))]
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
    #[arg(long, value_parser = clap::value_parser!(u32).range(clap_range(config::MTU.start(), config::MTU.end())))]
    pub mtu: Option<u32>,
    /// Wire format: native tunbus batches, or the Python ioppytest-agent's JSON (one
    /// packet per message on fromAgent.<NAME>…/toAgent.<NAME>…, through `agent route`).
    #[arg(long, default_value = "native", value_parser = wire_parser())]
    pub wire: Wire,
    /// With --wire ioppytest: create the interface only when toAgent.<NAME>.ip.tun.start
    /// brings the addresses (as an ioppytest coordinator expects).
    #[arg(long)]
    pub wait_config: bool,
    /// Accepted so that ioppytest-agent 0.2.20 scripts run unchanged. It changes nothing:
    /// tunbus always configures its interface (the flag defaulted to on there too).
    #[arg(long)]
    pub force_bootstrap: bool,
    /// What ioppytest-agent 0.2.20 promised (it did nothing there): --pcap NAME.pcapng.
    #[arg(long)]
    pub dump: bool,
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
    /// With --wire ioppytest: the broker user whose toAgent.<NAME>.ip.tun.start orders
    /// count [default: this agent's own broker user]; others are refused and counted.
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
    /// Move the interface into this existing network namespace and configure it there.
    #[arg(long)]
    pub netns: Option<String>,
    /// Interface name.
    #[arg(long, default_value = "tb0")]
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
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS")]
    pub stats_interval: f64,
    /// Largest AMQP message body (one batch of packets), in bytes.
    #[arg(long, default_value_t = 256 * 1024, value_parser = clap::value_parser!(u32).range(clap_range(config::MAX_BATCH_BYTES.start(), config::MAX_BATCH_BYTES.end())))]
    pub max_batch_bytes: u32,
    /// Serve Prometheus metrics on GET /metrics at this address (PORT alone means
    /// 127.0.0.1:PORT). Off by default.
    #[arg(long, value_name = "[HOST:]PORT")]
    pub metrics_addr: Option<String>,
    /// Folder of this agent's control socket for `agent status` (made root-only).
    #[arg(long, value_name = "DIR", default_value = crate::status::DEFAULT_DIR)]
    pub status_dir: PathBuf,
    /// Write the final report as JSON to this file on exit.
    #[arg(long, value_name = "FILE")]
    pub stats_json: Option<std::path::PathBuf>,
    /// Bound of each of this agent's queues on the broker, in bytes (the oldest messages are
    /// dropped beyond it): caps the delay that builds up when this receiver is slower than
    /// its senders.
    #[arg(long, default_value_t = 4 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(config::QUEUE_MAX_BYTES))]
    pub queue_max_bytes: u64,
    /// Unacknowledged messages the broker may push to each consumer (they are not counted
    /// against --queue-max-bytes, so this too bounds the delay under load).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,
    /// Strict identities: accept a packet only when the broker user that published it may
    /// use its source address, as FILE says (one line per user: USER PREFIX[,PREFIX…]; each
    /// user also gets its agent's link-local address). Without it, first claim: a user's
    /// hello claims its addresses, and a later claim by another live user is refused.
    #[arg(long, value_name = "FILE", conflicts_with = "no_identity_check")]
    pub peers: Option<PathBuf>,
    /// Accept every packet, whoever sent it (no check of senders' identities; warns).
    #[arg(long)]
    pub no_identity_check: bool,
    /// The broker user this agent logs in as, when neither the URL nor the client
    /// certificate's common name says (RabbitMQ's ssl_cert_login_from other than
    /// common_name): every message carries it as user_id, which the broker checks.
    #[arg(long, value_name = "USER")]
    pub broker_user: Option<String>,
}

#[derive(Debug, Args)]
pub struct PeersArgs {
    #[command(flatten)]
    pub bus: BusArgs,
    /// How long to listen for answers, in seconds.
    #[arg(long, default_value_t = 1.5, value_name = "SECONDS")]
    pub wait: f64,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// A configuration range as clap's (`i64` bounds).
fn clap_range<T: Copy + Into<i64>>(start: &T, end: &T) -> std::ops::RangeInclusive<i64> {
    (*start).into()..=(*end).into()
}

/// Exchange and session from the shared bus flags.
pub fn bus_exchange(bus: &BusArgs) -> anyhow::Result<String> {
    if let Some(s) = &bus.session {
        if !route::is_valid_word(s) {
            bail!("--session {s:?} must be one topic word: letters, digits, '-' or '_'");
        }
    }
    Ok(match (&bus.exchange, &bus.session) {
        (Some(e), _) => e.clone(),
        (None, Some(s)) => route::session_exchange(s),
        (None, None) => "amq.topic".to_owned(),
    })
}

/// `--wire native|ioppytest` (the configuration's `Wire` knows nothing of clap).
fn wire_parser() -> impl clap::builder::TypedValueParser<Value = Wire> {
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
        let identity = if self.no_identity_check {
            tracing::warn!("--no-identity-check: packets are accepted whoever sent them; any bus member can pose as any address");
            crate::identity::Mode::Off
        } else if let Some(path) = &self.peers {
            let text = std::fs::read_to_string(path).map_err(|e| Failure::new(Exit::Local, format!("cannot read --peers {}: {e}", path.display())))?;
            let table = crate::identity::peers_file::parse(&text, self.bus.session.as_deref()).map_err(|e| Failure::new(Exit::Usage, format!("--peers {}: {e}", path.display())))?;
            crate::identity::Mode::Strict(table)
        } else {
            crate::identity::Mode::FirstClaim
        };
        let stats_interval = Duration::try_from_secs_f64(self.stats_interval).map_err(|_| anyhow::anyhow!("--stats-interval must be between 0 and 86400 seconds"))?;
        let metrics_addr = match &self.metrics_addr {
            Some(a) => Some(crate::metrics::prometheus::parse_addr(a).map_err(anyhow::Error::msg)?),
            None => None,
        };
        let bus = Bus {
            heartbeat,
            session: self.bus.session,
            exchange,
            prefetch: self.prefetch,
            queue_max_bytes: self.queue_max_bytes,
            ..Bus::new(endpoints)
        };
        let interface = Interface {
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
            mtu: self.mtu.unwrap_or(if self.wire == Wire::Ioppytest { 1500 } else { DEFAULT_MTU }),
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
            status_dir: Some(self.status_dir),
            emulation: crate::emulate::Emulation { all: self.emulate, to: self.emulate_to, seed: self.emulate_seed, known: Vec::new() },
            pcap,
        };
        let mut start_within = self.start_within;
        if start_within.is_empty() {
            // The old agent's subnets, and the networks of the agent's own prefixes.
            start_within = Ioppytest::default().start_within;
            start_within.extend(interface.addrs.iter().copied());
        }
        let ioppytest = Ioppytest { addressing: old, coordinator: self.coordinator, start_within };
        let invalid = |e: ConfigError| Failure::new(Exit::Usage, e.to_string());
        let config = AgentConfig::new(&self.name, bus, interface).map_err(invalid)?.with_data_path(data_path).map_err(invalid)?.with_ioppytest(ioppytest).map_err(invalid)?;
        let user = self.broker_user.unwrap_or_else(|| config.identity().user.clone());
        Ok(config.with_identity(Identity { user, mode: identity }).map_err(invalid)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(args(&["/usr/bin/ioppytest-agent", "connect", "--name", "agent_1", "--force-bootstrap"]), ["/usr/bin/ioppytest-agent", "connect", "--wire", "ioppytest", "--name", "agent_1", "--force-bootstrap"]);
        assert_eq!(args(&["ioppytest-agent", "connect", "--wire", "native"]), ["ioppytest-agent", "connect", "--wire", "native"]);
        assert_eq!(args(&["ioppytest-agent", "connect", "--wire=native"]), ["ioppytest-agent", "connect", "--wire=native"]);
        assert_eq!(args(&["agent", "connect", "--name", "h1"]), ["agent", "connect", "--name", "h1"]);
        assert_eq!(args(&["ioppytest-agent", "--help"]), ["ioppytest-agent", "--help"]);
        let argv = effective_args(["ioppytest-agent", "connect", "--url", "amqp://127.0.0.1", "--name", "agent_1", "--force-bootstrap", "--dump"].map(Into::into).to_vec());
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
    fn cpu_lists() {
        assert_eq!(parse_cpus("0,2-4").unwrap(), vec![0, 2, 3, 4]);
        assert!(parse_cpus("x").is_err());
        assert!(parse_cpus("").is_err());
    }
}
