//! `agent status`: its flags (which agents of this host to ask, and how to print them).
//!
//! Main thread, once per run; not on the hot path.

use std::path::PathBuf;

use clap::Args;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Only these agents [default: every agent on this host].
    #[arg(value_name = "NAME")]
    pub names: Vec<String>,
    /// Wait up to SECONDS for the agents to be up, every link connected (named agents: each
    /// of them; else at least one), then show them; exit 1 if they are not.
    #[arg(long, value_name = "SECONDS")]
    pub wait: Option<f64>,
    /// One JSON object per agent per line (the report inside is `--stats-json`'s).
    #[arg(long)]
    pub json: bool,
    /// Where the agents' sockets are (their --status-dir) [for users other than root:
    /// $XDG_RUNTIME_DIR/tunbus, else /tmp/tunbus-UID].
    #[arg(long, value_name = "DIR", default_value = crate::config::RUN_DIR)]
    pub dir: PathBuf,
}
