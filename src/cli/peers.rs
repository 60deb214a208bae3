//! `agent peers`: its flags (who is on the bus).
//!
//! Main thread, once per run; not on the hot path.

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
