//! `agent ping PEER`: its flags, and their conversion into `amqp::ping::Options`.
//!
//! Main thread, once per run; not on the hot path.

use std::time::Duration;

use clap::Args;

use super::{bus_exchange, BusArgs};
use crate::amqp::ping::{Options, Target};

#[derive(Debug, Args)]
#[command(after_help = PING_AFTER_HELP)]
pub struct PingArgs {
    /// The agent to ping: its name (h2), or an address it owns (198.18.0.2, fd00:7b::2).
    #[arg(value_name = "PEER", value_parser = |s: &str| s.parse::<Target>())]
    pub peer: Target,
    /// Probes to send.
    #[arg(long, short = 'c', default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub count: u32,
    /// Seconds between probes.
    #[arg(long, short = 'i', default_value_t = 1.0, value_name = "SECONDS")]
    pub interval: f64,
    /// Seconds a probe waits for its answers.
    #[arg(long, short = 'W', default_value_t = 2.0, value_name = "SECONDS")]
    pub timeout: f64,
    #[command(flatten)]
    pub bus: BusArgs,
}

const PING_AFTER_HELP: &str = "Each probe measures the time to the broker and back (an echo on our own reply key) and to the \
peer's agent and back (tunbus.v1.ctl.ping.PEER, answered by its queue 0 on our reply key), and names the node, queue \
and broker user that answered. Without an answer it says why: the broker did not echo (a dead path to the broker, \
exit 3), no agent of that name is on the bus or it does not answer (exit 1), or the broker refused a key (a \
permission problem, exit 7). Exit 0 when the peer answered at least once.";

impl PingArgs {
    pub fn options(&self) -> anyhow::Result<Options> {
        let seconds = |v: f64, flag: &str| -> anyhow::Result<Duration> {
            if !(v > 0.0 && v <= 3600.0) {
                anyhow::bail!("{flag} must be between 0 and 3600 seconds");
            }
            Ok(Duration::from_secs_f64(v))
        };
        Ok(Options {
            endpoints: self.bus.broker.endpoints()?,
            exchange: bus_exchange(&self.bus)?,
            target: self.peer.clone(),
            count: self.count,
            interval: seconds(self.interval, "--interval")?,
            timeout: seconds(self.timeout, "--timeout")?,
            heartbeat: self.bus.broker.heartbeat()?,
        })
    }
}
