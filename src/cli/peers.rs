//! `agent peers`: its flags (who is on the bus), checked.
//!
//! Main thread, once per run; not on the hot path.

use std::time::Duration;

use clap::Args;

use super::BusArgs;

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

/// Longest `--wait`.
const MAX_WAIT_S: f64 = 600.0;

impl PeersArgs {
    /// How long to listen for answers (`--wait`, checked).
    pub fn wait(&self) -> anyhow::Result<Duration> {
        if !(self.wait > 0.0 && self.wait <= MAX_WAIT_S) {
            anyhow::bail!("--wait must be between 0 and {MAX_WAIT_S} seconds");
        }
        Ok(Duration::from_secs_f64(self.wait))
    }
}
