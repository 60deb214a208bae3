//! `agent route`: its flags (the ioppytest packet router and bridge).
//!
//! Main thread, once per run; not on the hot path.

use clap::Args;

use super::BrokerArgs;

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
