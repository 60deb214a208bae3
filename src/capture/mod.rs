//! Captures: `agent capture` (the whole bus of a session, merged into one pcapng),
//! `agent connect --pcap` (what crosses one agent's TUN) and the ioppytest sniffer role.
//!
//! - [`pcapng`]: the file formats (pcapng, and classic pcap for ioppytest), and a reader;
//! - [`merge`]: a delivery from the bus → packets attributed to their sender (pure);
//! - [`reorder`]: those packets in timestamp order, within a window (pure);
//! - [`run`]: the tap itself: a bounded, server-named queue bound to every data and
//!   presence key of the session's exchange, consumed without acknowledgements. When the
//!   capture cannot keep up, the broker drops the oldest messages of the tap queue (never
//!   an agent's), and the gaps in each link's batch numbers say how many;
//! - [`tun`]: the `--pcap` writer thread of an agent;
//! - [`sniffer`]: `agent sniffer`, ioppytest's `sniffing.*` requests served from a tap.
//!
//! The capture's broker user needs (docs/security.md, "Capture"): configure, write and read
//! on `amq.gen-.*` (its queue), read on the session's exchange (to bind), topic read on
//! `tunbus.v1.#` and `fromAgent.#`, and write plus topic write on
//! `tunbus.v1.ctl.probe` to ask the agents for their hellos at once (optional).

pub mod merge;
pub mod pcapng;
pub mod reorder;
pub mod sniffer;
pub mod tun;

use std::io::{self, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use merge::{Counts, Filter, Merge, Recorder, LINK_SEQ_MASK, LINK_SHIFT};
pub use reorder::Reorder;

use crate::amqp::client::{self, Client, ConnectOptions, Endpoint, Owned};
use crate::amqp::presence::JSON_PROPERTIES;
use crate::route;
use crate::util::{now_ns, Stop};

/// The tap queue's bound in messages (the byte bound is `--queue-max-bytes`).
pub const TAP_MAX_MESSAGES: i32 = 100_000;
/// The tap queue's default bound in bytes.
pub const TAP_MAX_BYTES: u64 = 256 * 1024 * 1024;
/// What the tap binds: every data and presence key of the native wire.
pub const NATIVE_PATTERN: &str = "tunbus.v1.#";
/// And what old agents publish (on amq.topic, or the exchange they were given).
pub const IOPPYTEST_PATTERN: &str = "fromAgent.#";

/// A capture to run.
#[derive(Clone, Debug)]
pub struct Options {
    pub endpoints: Vec<Endpoint>,
    pub exchange: String,
    pub filter: Filter,
    /// Stop after this long (`None`: until stopped).
    pub duration: Option<Duration>,
    pub queue_max_bytes: u64,
    /// `--keys DIR`: key logs of `--e2e` agents (`e2e::keylog`), to open sealed batches.
    pub keys: Option<PathBuf>,
}

/// How a capture went.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Summary {
    pub counts: Counts,
    pub seconds: f64,
    /// Why it ended early, when it did (the broker went away).
    pub ended_by: Option<String>,
}

impl Summary {
    /// One line for the terminal.
    pub fn line(&self, file: &str) -> String {
        let c = &self.counts;
        let mut s = format!("capture: {} packets from {} agent(s) in {} messages over {:.1} s into {file}", c.packets, c.agents, c.messages, self.seconds);
        if c.super_packets > 0 {
            s += &format!("; {} super-packets cut into {} packets", c.super_packets, c.segments);
        }
        if c.radio_frames > 0 {
            s += &format!("; {} of them IEEE 802.15.4 frames", c.radio_frames);
        }
        if c.ethernet_frames > 0 {
            s += &format!("; {} of them Ethernet frames", c.ethernet_frames);
        }
        if c.filtered > 0 {
            s += &format!("; {} left out by the filter", c.filtered);
        }
        if c.bridged > 0 {
            s += &format!("; {} copies the ioppytest router bridged left out (each is in the file once, from its old agent)", c.bridged);
        }
        if c.lost_batches > 0 {
            s += &format!(
                "; LOST {} batches (the capture fell behind and the broker dropped them from its tap queue: raise --queue-max-bytes or filter)",
                c.lost_batches
            );
        } else {
            s += "; nothing lost";
        }
        if c.malformed > 0 {
            s += &format!("; {} messages did not decode", c.malformed);
        }
        if c.opened > 0 {
            s += &format!("; {} end-to-end sealed batches opened with --keys", c.opened);
        }
        if c.sealed > 0 {
            s += &format!("; {} end-to-end sealed batches left out (no key opens them: give the agents' key logs with --keys DIR)", c.sealed);
        }
        if c.late > 0 {
            s += &format!("; {} packets came more than {} ms behind later ones and are out of order", c.late, reorder::WINDOW_NS / 1_000_000);
        }
        if let Some(why) = &self.ended_by {
            s += &format!("; ended early: {why}");
        }
        s
    }
}

/// Opens the tap on the first node that answers: the queue, its bindings, the consumer,
/// and a probe so that the agents say hello at once.
pub fn open_tap(endpoints: &[Endpoint], exchange: &str, queue_max_bytes: u64, stop: &Stop) -> Result<Client, client::Error> {
    let opts = ConnectOptions::new("tunbus capture");
    let mut plan = client::Plan::listener(exchange, vec![NATIVE_PATTERN.to_owned(), IOPPYTEST_PATTERN.to_owned()], Some(TAP_MAX_MESSAGES));
    if let Some(q) = &mut plan.queue {
        q.max_length_bytes = Some(queue_max_bytes.min(i64::MAX as u64) as i64);
    }
    let mut c = Client::connect(endpoints.to_vec(), &opts, plan, client::Retry::OncePerNode, stop.flag())?;
    c.publish_copy(exchange, route::CTL_PROBE, &JSON_PROPERTIES, br#"{"from":"agent capture"}"#)?;
    Ok(c)
}

/// Runs a capture into `recorder` until `stop`, the duration, or the broker ends it.
pub fn run(opts: &Options, recorder: &mut dyn Recorder, stop: &Stop) -> Result<Summary, client::Error> {
    let tap = open_tap(&opts.endpoints, &opts.exchange, opts.queue_max_bytes, stop)?;
    tracing::info!(exchange = %opts.exchange, "capture: tap open");
    run_on(tap, opts, recorder, stop)
}

/// Runs a capture on a tap opened already ([`open_tap`]).
pub fn run_on(mut tap: Client, opts: &Options, recorder: &mut dyn Recorder, stop: &Stop) -> Result<Summary, client::Error> {
    let started = Instant::now();
    let mut merge = Merge::new(opts.filter.clone());
    if let Some(dir) = &opts.keys {
        match crate::e2e::keylog::KeyRing::new(dir) {
            Ok(ring) => {
                tracing::info!(dir = %dir.display(), keys = ring.len(), "capture: sealed batches are opened with these key logs");
                merge = merge.with_keys(ring);
            }
            Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "capture: cannot read --keys; sealed batches are left out"),
        }
    }
    let mut recorder = Reorder::new(recorder);
    let mut ended_by = None;
    let mut last_flush = Instant::now();
    loop {
        let left = opts.duration.map(|d| d.saturating_sub(started.elapsed()));
        if stop.is_raised() || left == Some(Duration::ZERO) {
            break;
        }
        let wait = left.unwrap_or(Duration::MAX).min(Duration::from_millis(50));
        let written = match tap.wait_event(wait, stop.flag()) {
            Ok(Some(Owned::Delivery { routing_key, user_id, body, .. })) => merge.on_delivery(&routing_key, user_id.as_deref(), &body, now_ns(), &mut recorder),
            Ok(_) => Ok(()),
            Err(client::Error::Stopped) => break,
            Err(e) => {
                ended_by = Some(format!("the broker connection was lost: {e}"));
                break;
            }
        };
        if let Err(e) = written.and_then(|()| recorder.advance(now_ns())) {
            ended_by = Some(format!("cannot write the capture: {e}"));
            break;
        }
        if last_flush.elapsed() > Duration::from_secs(1) {
            let _ = recorder.flush();
            last_flush = Instant::now();
        }
    }
    if let Err(e) = merge.finish(&mut recorder).and_then(|()| recorder.drain()) {
        ended_by.get_or_insert(format!("cannot write the capture: {e}"));
    }
    tap.close(Duration::from_millis(300));
    let counts = Counts { late: recorder.late(), ..merge.counts().clone() };
    Ok(Summary { counts, seconds: started.elapsed().as_secs_f64(), ended_by })
}

impl<W: Write> Recorder for pcapng::Writer<W> {
    fn interface(&mut self, name: &str, description: &str, addrs: &[(IpAddr, u8)]) -> io::Result<u32> {
        self.add_interface(name, description, addrs)
    }

    fn link_interface(&mut self, name: &str, description: &str, linktype: u16) -> io::Result<Option<u32>> {
        self.add_interface_of(linktype, name, description, &[]).map(Some)
    }

    fn packet(&mut self, iface: u32, timestamp_ns: u64, data: &[u8], comment: Option<&str>) -> io::Result<()> {
        pcapng::Writer::packet(self, iface, timestamp_ns, data, comment, None)
    }

    fn flush(&mut self) -> io::Result<()> {
        pcapng::Writer::flush(self)
    }
}

impl<W: Write> Recorder for pcapng::ClassicWriter<W> {
    fn interface(&mut self, _name: &str, _description: &str, _addrs: &[(IpAddr, u8)]) -> io::Result<u32> {
        Ok(0) // one link type, no interfaces
    }

    fn packet(&mut self, _iface: u32, timestamp_ns: u64, data: &[u8], _comment: Option<&str>) -> io::Result<()> {
        pcapng::ClassicWriter::packet(self, timestamp_ns, data)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `30s`, `2m`, `500ms`, or seconds (`30`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let parsed = if let Some(m) = s.strip_suffix('m').filter(|m| !m.ends_with('m')) {
        m.parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0).map(|v| Duration::from_secs_f64(v * 60.0))
    } else if let Ok(secs) = s.parse::<f64>() {
        (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
    } else {
        crate::emulate::spec::parse_time(s)
    };
    parsed.ok_or_else(|| format!("{s:?} is not a duration (30s, 2m, 500ms)"))
}

/// Where a capture is written: a file, or standard output for `-`.
pub fn output(path: &PathBuf) -> io::Result<Box<dyn Write + Send>> {
    if path.as_os_str() == "-" {
        return Ok(Box::new(io::BufWriter::new(io::stdout())));
    }
    Ok(Box::new(io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?)))
}

/// Addresses given to `--address`.
pub fn parse_address(s: &str) -> Result<IpAddr, String> {
    s.parse().map_err(|_| format!("{s:?} is not an IP address"))
}
