//! `agent serial`: an IEEE 802.15.4 probe on a serial line as an agent on the bus. Its
//! flags, and their conversion into a checked `AgentConfig` whose host end is a
//! `config::PortKind::Serial` (decision 0024).
//!
//! Main thread, once per run; not on the hot path.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::{bus_exchange, BusArgs};
use crate::codec::ioppytest::serial::{DEFAULT_BAUD, DEFAULT_PORT};
use crate::codec::slip::{self, Framing};
use crate::config::{self, AgentConfig, Bus, ConfigError, DataPath, Identity, Interface, PortKind, Wire};
use crate::exit::{Exit, Failure};
use crate::port::serial::SerialConfig;

/// The examples `serial --help` ends with.
pub const SERIAL_EXAMPLES: &str = concat!(
    "Examples:\n",
    "  A probe in an ioppytest session (the keys and JSON of ioppytest-agent 0.2.20's serial listener):\n",
    "    agent serial --name probe1 --device /dev/ttyUSB0 --baud 460800 --url \"$AMQP_URL\"\n",
    "  A probe in a tunbus session (frames batched like packets, flooded to the session's probes):\n",
    "    agent serial --name mote2 --device /dev/serial/by-id/usb-…-if00 --session thread --wire native\n",
    "  A simulated radio: a pseudo-terminal at /tmp/mote3 for a program that speaks SLIP to a probe,\n",
    "  hearing mote2 through a lossy link and nothing from mote4:\n",
    "    agent serial --name mote3 --session thread --wire native --pty --device /tmp/mote3 \\\n",
    "        --hear mote2='loss 10% delay 5ms' --hear mote4=none",
);

#[derive(Debug, Args)]
#[command(after_help = SERIAL_EXAMPLES)]
pub struct SerialArgs {
    #[command(flatten)]
    pub bus: BusArgs,
    /// Name of this probe's agent on the bus (one topic word: letters, digits, '-', '_').
    #[arg(long)]
    pub name: String,
    /// The probe's terminal device. A /dev/serial/by-id/… name is resolved again at every
    /// reopen, so a probe that comes back as another ttyUSBn is found. A device that is not
    /// there (yet, or any more) is looked for every 250 ms; the agent never exits for it.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_PORT)]
    pub device: PathBuf,
    /// A simulated radio: make a pseudo-terminal and link it at --device (which must be a
    /// free path, or a stale link), for a program that speaks SLIP to a probe to open; the
    /// link is removed on exit.
    #[arg(long)]
    pub pty: bool,
    /// How this radio hears agent PEER (native wire): through a link emulated in tc-netem's
    /// words ('loss 10% delay 5ms', decided where the frame is heard, from --emulate-seed),
    /// or not at all (PEER=none). Peers not named are heard plainly. Repeat for more peers.
    #[arg(long, value_name = "PEER=SPEC|none", value_parser = parse_hear)]
    pub hear: Vec<(String, crate::emulate::Spec)>,
    /// Seed of the --hear links' random decisions (the same seed replays the same losses).
    #[arg(long, value_name = "N", default_value_t = crate::emulate::DEFAULT_SEED)]
    pub emulate_seed: u64,
    /// Line speed in baud.
    #[arg(long, default_value_t = DEFAULT_BAUD)]
    pub baud: u32,
    /// Wire format: ioppytest (one JSON message per frame on
    /// fromAgent.<NAME>.802154.serial.packet.raw, frames to write taken from
    /// toAgent.<NAME>.802154.serial.packet.raw, serial.started announced), or native tunbus
    /// batches marked as 802.15.4 frames and flooded to the session.
    #[arg(long, default_value = "ioppytest", value_parser = super::connect::wire_parser())]
    pub wire: Wire,
    /// How the probe separates frames: delimited (an END before and after each frame, as
    /// ioppytest's probes send; noise between frames is dropped and counted) or terminated
    /// (RFC 1055: an END after each frame only).
    #[arg(long, default_value = "delimited", value_parser = ["delimited", "terminated"])]
    pub framing: String,
    /// The longest frame taken from the probe or written to it, in bytes (an 802.15.4 PSDU
    /// is at most 127; probes may append RSSI, LQI or a timestamp).
    #[arg(long, value_name = "BYTES", default_value_t = slip::DEFAULT_MAX_FRAME)]
    pub max_frame: usize,
    /// Accept frames whoever sent them (by default a native batch must carry the broker's
    /// user_id).
    #[arg(long)]
    pub no_identity_check: bool,
    /// Seconds between one-line statistics summaries (0: off).
    #[arg(long, default_value_t = config::DEFAULT_STATS_INTERVAL.as_secs_f64(), value_name = "SECONDS")]
    pub stats_interval: f64,
    /// Write the final report (the probe's counters included) as JSON to this file on exit.
    #[arg(long, value_name = "FILE")]
    pub stats_json: Option<PathBuf>,
    /// Serve Prometheus metrics on GET /metrics at this address (PORT alone means
    /// 127.0.0.1:PORT). Off by default.
    #[arg(long, value_name = "[HOST:]PORT")]
    pub metrics_addr: Option<String>,
    /// Folder of this agent's control socket for `agent status` [for users other than
    /// root: $XDG_RUNTIME_DIR/tunbus, else /tmp/tunbus-UID].
    #[arg(long, value_name = "DIR", default_value = config::RUN_DIR)]
    pub status_dir: PathBuf,
}

impl SerialArgs {
    pub fn into_config(self) -> anyhow::Result<AgentConfig> {
        let endpoints = self.bus.broker.endpoints()?;
        let heartbeat = self.bus.broker.heartbeat()?;
        let exchange = bus_exchange(&self.bus)?;
        let usage = |why: String| Failure::new(Exit::Usage, why);
        let stats_interval =
            Duration::try_from_secs_f64(self.stats_interval).map_err(|_| usage("--stats-interval must be between 0 and 86400 seconds".into()))?;
        let metrics_addr = match &self.metrics_addr {
            Some(a) => Some(crate::metrics::prometheus::parse_addr(a).map_err(usage)?),
            None => None,
        };
        let serial = SerialConfig {
            device: self.device,
            baud: self.baud,
            framing: if self.framing == "terminated" { Framing::Terminated } else { Framing::Delimited },
            max_frame: self.max_frame,
            pty: self.pty,
        };
        if !self.hear.is_empty() && self.wire != Wire::Native {
            return Err(usage("--hear needs --wire native (ioppytest's router decides who hears a frame on its wire)".into()).into());
        }
        let hearing = (!self.hear.is_empty()).then_some(crate::port::medium::Hearing { links: self.hear, seed: self.emulate_seed });
        let bus = Bus { heartbeat, session: self.bus.session, exchange, ..Bus::new(endpoints) };
        let interface = Interface { kind: PortKind::Serial(serial), ifname: "serial".into(), offload: false, mtu: 1500, ..Interface::default() };
        let data_path = DataPath {
            wire: self.wire,
            hearing,
            stats_interval,
            metrics_addr,
            status_dir: Some(if self.status_dir == std::path::Path::new(config::RUN_DIR) { crate::status::default_dir() } else { self.status_dir }),
            ..DataPath::default()
        };
        let invalid = |e: ConfigError| Failure::new(Exit::Usage, e.to_string());
        let config = AgentConfig::new(&self.name, bus, interface).map_err(invalid)?.with_data_path(data_path).map_err(invalid)?;
        let mode = if self.no_identity_check { crate::identity::Mode::Off } else { config.identity().mode.clone() };
        let user = config.identity().user.clone();
        Ok(config.with_identity(Identity { user, mode }).map_err(invalid)?)
    }
}

/// `PEER=SPEC` or `PEER=none` (no link).
fn parse_hear(text: &str) -> Result<(String, crate::emulate::Spec), String> {
    match text.split_once('=') {
        Some((peer, spec)) if spec.trim() == "none" && !peer.trim().is_empty() => Ok((peer.trim().to_owned(), crate::emulate::Spec::unlinked())),
        _ => crate::emulate::Emulation::parse_to(text).map_err(|e| e.replace("--emulate-to", "--hear")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn serial(args: &[&str]) -> anyhow::Result<AgentConfig> {
        let mut argv = vec!["agent", "serial"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv)?.command {
            Command::Serial(c) => c.into_config(),
            _ => unreachable!("parsed serial"),
        }
    }

    #[test]
    fn defaults_are_the_python_listeners() {
        let c = serial(&["--name", "probe1"]).unwrap();
        let s = c.interface().serial().expect("a serial port");
        assert_eq!((s.device.to_str(), s.baud, s.framing, s.max_frame), (Some("/dev/ttyUSB0"), 460_800, Framing::Delimited, 159));
        assert_eq!(c.data_path().wire, Wire::Ioppytest);
        assert_eq!(c.bus().exchange, "amq.topic");
        assert!(c.owned_prefixes().is_empty());
        let c = serial(&["--name", "mote2", "--device", "/dev/ttyACM0", "--session", "thread", "--wire", "native", "--framing", "terminated"]).unwrap();
        assert_eq!(c.data_path().wire, Wire::Native);
        assert_eq!(c.bus().exchange, "tunbus.thread");
        assert_eq!(c.interface().serial().map(|s| s.framing), Some(Framing::Terminated));
    }

    #[test]
    fn bad_settings_say_which() {
        let e = serial(&["--name", "p", "--baud", "12345"]).unwrap_err().to_string();
        assert!(e.contains("baud rate 12345"), "{e}");
        let e = serial(&["--name", "p", "--max-frame", "100"]).unwrap_err().to_string();
        assert!(e.contains("maximum frame"), "{e}");
        assert!(serial(&["--name", "a.b"]).is_err());
        assert!(serial(&["--name", "p", "--framing", "cobs"]).is_err());
        assert!(serial(&[]).is_err());
        let e = serial(&["--name", "p", "--hear", "m2=loss 5%"]).unwrap_err().to_string();
        assert!(e.contains("--wire native"), "{e}");
        let e = serial(&["--name", "p", "--wire", "native", "--hear", "m2"]).unwrap_err().to_string();
        assert!(e.contains("--hear"), "{e}");
    }

    #[test]
    fn a_simulated_radio_hears_its_links() {
        let c = serial(&["--name", "m3", "--wire", "native", "--pty", "--device", "/tmp/m3", "--hear", "m2=loss 10% delay 5ms", "--hear", "m4=none"]).unwrap();
        assert!(c.interface().serial().is_some_and(|s| s.pty));
        let h = c.data_path().hearing.clone().expect("hearing");
        assert_eq!(h.links, vec![("m2".to_owned(), "loss 10% delay 5ms".parse().unwrap()), ("m4".to_owned(), crate::emulate::Spec::unlinked())]);
        assert_eq!(h.seed, crate::emulate::DEFAULT_SEED);
        assert!(serial(&["--name", "m3"]).unwrap().data_path().hearing.is_none());
    }
}
