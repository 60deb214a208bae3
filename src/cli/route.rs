//! `agent route`: its flags (the ioppytest packet router and bridge), and their conversion
//! into `interop::router::RouterOptions`.
//!
//! Main thread, once per run; not on the hot path.

use std::time::Duration;

use anyhow::Context;
use clap::Args;

use super::BrokerArgs;
use crate::codec::ioppytest;
use crate::config::{DEFAULT_STATS_INTERVAL, MAX_STATS_INTERVAL};
use crate::interop::router::RouterOptions;
use crate::interop::topology::Topology;

#[derive(Debug, Args)]
pub struct RouteArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    /// ioppytest test configuration (YAML with a `topology` list of links and their nodes).
    #[arg(long, value_name = "FILE")]
    pub topology: std::path::PathBuf,
    /// Exchange of the session (ioppytest uses amq.topic).
    #[arg(long, default_value = ioppytest::EXCHANGE)]
    pub exchange: String,
    /// Unacknowledged messages in flight from the broker.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,
    /// Seconds between one-line summaries (0: off).
    #[arg(long, default_value_t = DEFAULT_STATS_INTERVAL.as_secs_f64(), value_name = "SECONDS")]
    pub stats_interval: f64,
    /// Write the final counters as JSON to this file on exit.
    #[arg(long, value_name = "FILE")]
    pub stats_json: Option<std::path::PathBuf>,
}

impl RouteArgs {
    /// The router's options: the broker's nodes, the topology file read and parsed.
    pub fn options(&self) -> anyhow::Result<RouterOptions> {
        let endpoints = self.broker.endpoints()?;
        let text = std::fs::read_to_string(&self.topology)
            .map_err(|e| crate::exit::Failure::new(crate::exit::Exit::Local, format!("cannot read --topology {}: {e}", self.topology.display())))?;
        let topology = Topology::parse(&text).with_context(|| format!("--topology {}", self.topology.display()))?;
        if !(self.stats_interval >= 0.0 && self.stats_interval <= MAX_STATS_INTERVAL.as_secs_f64()) {
            anyhow::bail!("--stats-interval must be between 0 and {} seconds", MAX_STATS_INTERVAL.as_secs());
        }
        Ok(RouterOptions {
            endpoints,
            exchange: self.exchange.clone(),
            topology,
            prefetch: self.prefetch,
            stats_interval: Duration::from_secs_f64(self.stats_interval),
            heartbeat: self.broker.heartbeat()?,
        })
    }
}
