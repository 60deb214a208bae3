//! `agent sniffer`: its flags (ioppytest's sniffer role on a session's bus).
//!
//! Main thread, once per run; not on the hot path.

use std::path::PathBuf;

use clap::Args;

use super::BusArgs;

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
