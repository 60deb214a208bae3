//! `agent provision`: its flags, and their conversion into `provision::Options`.
//!
//! Main thread, once per run; not on the hot path.

use std::path::PathBuf;

use clap::Args;

use super::BrokerArgs;
use crate::exit::{Exit, Failure};
use crate::route;

/// `--url`'s help in `agent provision` (the shared text is connect's).
const PROVISION_URL_HELP: &str = "An ADMINISTRATOR's broker URL, amqp[s]://ADMIN:PASS@HOST[:PORT]/: provisioning \
creates a vhost, users and permissions, which takes RabbitMQ's administrator tag. The agents' URL files get its \
host, port and query, with their own users and the session's vhost. Without it: --url-file, else \
$AMQP_URL_FILE, else $AMQP_URL, else amqp://guest:guest@localhost:5672/%2f. Passwords are never printed";

#[derive(Debug, Args)]
#[command(mut_arg("url", |a| a.help(PROVISION_URL_HELP)))]
pub struct ProvisionArgs {
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
    /// End-to-end encryption (connect --e2e): also a private key per agent (NAME.key, mode
    /// 0600, in --out), each public key on its agent's line of the peers file, and
    /// e2e/private-key in each NAME.toml.
    #[arg(long, requires = "out")]
    pub keys: bool,
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
            agents.extend(
                crate::provision::plan::parse_agents_file(&text).map_err(|e| Failure::new(Exit::Usage, format!("--agents-file {}: {e}", f.display())))?,
            );
        }
        if !route::is_valid_word(&self.session) {
            return Err(Failure::new(Exit::Usage, format!("--session {:?} must be one topic word", self.session)).into());
        }
        if agents.is_empty() && !self.revoke {
            return Err(Failure::new(Exit::Usage, "give at least one --agent NAME=PREFIXES (or --agents-file)").into());
        }
        Ok(crate::provision::Options {
            admin,
            tls: self.broker.tls(),
            api: self.api.clone(),
            session: self.session.clone(),
            agents,
            observers: self.observers.clone(),
            out: self.out.clone(),
            node: None,
            keys: self.keys,
        })
    }
}
