//! `agent status`: its flags (which agents of this host to ask, and how to print them).
//!
//! Main thread, once per run; not on the hot path.

use std::path::PathBuf;

use clap::Args;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Only this agent [default: every agent on this host].
    pub name: Option<String>,
    /// One JSON object per agent per line (the report inside is `--stats-json`'s).
    #[arg(long)]
    pub json: bool,
    /// Where the agents' sockets are (their --status-dir) [for users other than root:
    /// $XDG_RUNTIME_DIR/tunbus, else /tmp/tunbus-UID].
    #[arg(long, value_name = "DIR", default_value = crate::config::RUN_DIR)]
    pub dir: PathBuf,
}
