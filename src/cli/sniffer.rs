//! `agent sniffer`: its flags (ioppytest's sniffer role on a session's bus), and their
//! conversion into `capture::sniffer::Options`.
//!
//! Main thread, once per run; not on the hot path.

use std::path::PathBuf;

use clap::Args;

use super::{bus_exchange, BusArgs};
use crate::capture::sniffer::Options;

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

impl SnifferArgs {
    /// The sniffer's options: the broker's nodes, the exchange, where captures are kept.
    pub fn options(&self) -> anyhow::Result<Options> {
        Ok(Options {
            endpoints: self.bus.broker.endpoints()?,
            exchange: bus_exchange(&self.bus)?,
            dir: self.dir.clone(),
            queue_max_bytes: self.queue_max_bytes,
        })
    }
}
