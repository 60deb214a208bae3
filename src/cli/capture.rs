//! `agent capture`: its flags (the session's bus into one pcapng file), and their
//! conversion into `capture::Options`.
//!
//! Main thread, once per run; not on the hot path.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::{bus_exchange, BusArgs};
use crate::capture::{Filter, Options};

#[derive(Debug, Args)]
#[command(
    after_help = concat!(
        "Examples:\n",
        "  agent capture --session lab -w lab.pcapng\n",
        "  agent capture --session lab -w h2.pcapng --agent h2 --duration 30s\n",
        "  agent capture --session lab -w - | tshark -r -\n",
        "\n",
        "The broker user needs read on the session's exchange, configure/write/read on amq.gen-* queues and topic read on ",
        "tunbus.v1.# and fromAgent.# (docs/security.md, \"Capture\")."
    )
)]
pub struct CaptureArgs {
    #[command(flatten)]
    pub bus: BusArgs,
    /// Write to FILE (pcapng: raw IP, and IEEE 802.15.4 for serial probes' frames, one
    /// interface per sender; `-`: standard output).
    #[arg(short = 'w', long = "write", value_name = "FILE")]
    pub write: PathBuf,
    /// Only packets sent by, or addressed to, this agent (repeatable).
    #[arg(long = "agent", value_name = "NAME")]
    pub agents: Vec<String>,
    /// Only packets from or to this address (repeatable).
    #[arg(long = "address", value_name = "IP", value_parser = crate::capture::parse_address)]
    pub addresses: Vec<std::net::IpAddr>,
    /// Stop after this long (30s, 2m, 500ms) [default: until Ctrl-C].
    #[arg(long, value_name = "TIME", value_parser = crate::capture::parse_duration)]
    pub duration: Option<Duration>,
    /// Keep TCP/UDP super-packets whole, as the agents carry them, instead of cutting them
    /// into the wire-sized packets they stand for.
    #[arg(long)]
    pub no_segment: bool,
    /// Bound of the capture's queue on the broker, in bytes: when the capture falls behind,
    /// the broker drops the oldest messages of this queue (never the agents'), and the
    /// summary counts them.
    #[arg(long, default_value_t = crate::capture::TAP_MAX_BYTES, value_name = "BYTES")]
    pub queue_max_bytes: u64,
    /// Print the summary as JSON on standard error.
    #[arg(long)]
    pub json: bool,
    /// 802.15.4 frames from the session's serial probes end with their 2-byte FCS (sniffer
    /// firmware that keeps it): written as LINKTYPE_IEEE802_15_4_WITHFCS (195) instead of
    /// _NOFCS (230), which is what probes on ioppytest's wire send and its sniffer writes.
    #[arg(long)]
    pub fcs: bool,
    /// Open end-to-end sealed batches (`--e2e` agents) with the session keys noted in the
    /// files of DIR (`agent connect --e2e-key-log DIR/NAME.keys`, `agent lab --e2e --keys
    /// DIR`); the directory is read again as new sessions appear. Without it, sealed
    /// batches are counted and left out.
    #[arg(long, value_name = "DIR")]
    pub keys: Option<PathBuf>,
}

impl CaptureArgs {
    /// The capture's options: the broker's nodes, the exchange, what to keep.
    pub fn options(&self) -> anyhow::Result<Options> {
        Ok(Options {
            endpoints: self.bus.broker.endpoints()?,
            exchange: bus_exchange(&self.bus)?,
            filter: Filter { agents: self.agents.clone(), addresses: self.addresses.clone(), no_segment: self.no_segment, radio_fcs: self.fcs },
            duration: self.duration,
            queue_max_bytes: self.queue_max_bytes,
            keys: self.keys.clone(),
        })
    }
}
