//! `agent lab --radio`: every host a simulated IEEE 802.15.4 radio whose medium is the bus.
//!
//! Host i is an agent whose port is a simulated radio (`port::serial`, `pty`): a
//! pseudo-terminal linked at `<radio dir>/h<i>` that a program written for a serial probe
//! opens and speaks SLIP on (END-delimited frames, as ioppytest's probes; decision 0024).
//! Frames are floods on the native wire; who hears whom is the lab's `--topology`, decided
//! where a frame is heard (`port::medium`): a pair without a link hears nothing of each
//! other, a link's loss, delay, rate and flap apply to each frame it carries. Without a
//! topology every radio hears every other, plainly.
//!
//! The check plays each radio's program: it opens every pseudo-terminal, sends
//! [`FRAMES_PER_HOST`] marked frames from each, and reads what each radio received: linked
//! pairs must hear each other (all frames, unless their link may lose some), pairs without
//! a link must hear nothing; one-way latencies go in the report.
//!
//! Main thread and one blocking thread for the check; not on the hot path.

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::plan::{self, Host};
use super::report::LinkReport;
use super::{Lab, LabReport};
use crate::codec::ioppytest::serial::DEFAULT_BAUD;
use crate::codec::slip::{self, Decoder, Framing};
use crate::config::{AgentConfig, Bus, ConfigError, DataPath, Identity, Interface, PortKind};
use crate::port::medium::Hearing;
use crate::port::serial::SerialConfig;

/// Most hosts of a radio lab (an agent, a connection and a pseudo-terminal each).
pub const MAX_HOSTS: usize = 256;
/// Frames each radio sends during the check.
pub const FRAMES_PER_HOST: usize = 4;
/// How long the check listens beyond the topology's longest delay.
const LISTEN: Duration = Duration::from_millis(1500);
/// The check's frames end with this mark (then: frame number, sender index).
const MARK: &[u8] = b"tunbus-lab";

/// Where a session's radios are linked.
pub fn radio_dir(session: &str) -> PathBuf {
    std::env::temp_dir().join(format!("tunbus-radios-{session}"))
}

/// A check frame: an 802.15.4 data frame header's first bytes, then the frame number `k`,
/// the sender's index `i`, and the mark.
fn check_frame(i: usize, k: usize) -> Vec<u8> {
    let mut f = vec![0x41, 0x88, k as u8, (i >> 8) as u8, i as u8];
    f.extend_from_slice(MARK);
    f
}

/// (sender index, frame number) of a check frame.
fn parse_check_frame(f: &[u8]) -> Option<(usize, usize)> {
    match f {
        [0x41, 0x88, k, hi, lo, mark @ ..] if mark == MARK => Some(((usize::from(*hi) << 8) | usize::from(*lo), usize::from(*k))),
        _ => None,
    }
}

/// What each radio heard: `heard[j][i]` holds the one-way latency (ms) of each frame of
/// radio i that radio j received.
type Heard = Vec<Vec<Vec<f64>>>;

/// Plays every radio's program: sends the check frames from each, and listens for `listen`.
fn exchange_frames(paths: &[PathBuf], listen: Duration) -> Result<Heard, String> {
    let n = paths.len();
    let fds: Vec<OwnedFd> = paths
        .iter()
        .map(|p| crate::sys::tty::open_serial(p, DEFAULT_BAUD).map_err(|e| format!("opening radio {}: {e}", p.display())))
        .collect::<Result<_, _>>()?;
    let mut decoders: Vec<Decoder> = (0..n).map(|_| Decoder::new(Framing::Delimited, slip::DEFAULT_MAX_FRAME)).collect();
    let mut heard: Heard = vec![vec![Vec::new(); n]; n];
    let mut sent_at = vec![vec![None::<Instant>; FRAMES_PER_HOST]; n];
    let mut buf = vec![0u8; 4096];
    let mut listen_once = |heard: &mut Heard, sent_at: &[Vec<Option<Instant>>]| {
        for (j, fd) in fds.iter().enumerate() {
            while let Ok(Some(got)) = crate::sys::read(fd.as_fd(), &mut buf) {
                if got == 0 {
                    break;
                }
                let now = Instant::now();
                decoders[j].decode_all(&buf[..got], |f| {
                    if let Some((i, k)) = parse_check_frame(f) {
                        if let Some(Some(t)) = sent_at.get(i).and_then(|s| s.get(k)) {
                            heard[j][i].push(now.duration_since(*t).as_secs_f64() * 1000.0);
                        }
                    }
                });
            }
        }
    };
    let mut out = Vec::new();
    for k in 0..FRAMES_PER_HOST {
        for (i, fd) in fds.iter().enumerate() {
            out.clear();
            slip::encode(&check_frame(i, k), &mut out);
            sent_at[i][k] = Some(Instant::now());
            let mut at = 0;
            let give_up = Instant::now() + Duration::from_secs(1);
            while at < out.len() && Instant::now() < give_up {
                match crate::sys::tty::write(fd.as_fd(), &out[at..]) {
                    Ok(Some(w)) => at += w,
                    Ok(None) => std::thread::sleep(Duration::from_millis(1)),
                    Err(e) => return Err(format!("writing to radio {}: {e}", paths[i].display())),
                }
            }
        }
        // Rounds 20 ms apart; read every millisecond meanwhile (a latency is measured to
        // the read that found the frame).
        let next = Instant::now() + Duration::from_millis(20);
        while Instant::now() < next {
            listen_once(&mut heard, &sent_at);
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let end = Instant::now() + listen;
    while Instant::now() < end {
        listen_once(&mut heard, &sent_at);
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(heard)
}

impl Lab {
    /// Where host `host`'s radio is linked.
    pub(super) fn radio_path(&self, host: &Host) -> PathBuf {
        radio_dir(&self.opts.session).join(&host.name)
    }

    /// Host `host` as a simulated radio on the native wire, hearing its topology's links.
    pub(super) fn radio_config(&self, host: &Host) -> Result<AgentConfig, ConfigError> {
        let n = self.endpoints.len().max(1);
        let mut endpoints = self.endpoints.clone();
        endpoints.rotate_left((host.index - 1) % n);
        let bus = Bus { heartbeat: self.opts.heartbeat, check_name: false, frame_max: Some(32 * 1024), ..Bus::new(endpoints).in_session(&self.opts.session) };
        let serial = SerialConfig { pty: true, ..SerialConfig::new(self.radio_path(host), DEFAULT_BAUD) };
        let interface = Interface { kind: PortKind::Serial(serial), ifname: "serial".into(), offload: false, mtu: 1500, queues: 1, ..Interface::default() };
        let hearing = self.opts.topology.as_ref().map(|t| {
            let names: Vec<String> = self.hosts.iter().map(|h| h.name.clone()).collect();
            // `Host::index` counts from 1; the topology's indices from 0. Links are the
            // same both ways: what host i would send towards j is what it hears from j.
            Hearing { links: t.emulation_of(host.index - 1, &names, self.opts.seed).to, seed: self.opts.seed }
        });
        let data_path = DataPath { stats_interval: Duration::ZERO, max_batch_bytes: 128 * 1024, status_dir: None, hearing, ..DataPath::default() };
        let c = AgentConfig::new(&host.name, bus, interface)?.with_data_path(data_path)?;
        // Every radio logs in as the lab's user; a radio batch must carry it.
        let user = c.identity().user.clone();
        let mode = crate::identity::Mode::Strict(crate::identity::Table::new(vec![(user.clone(), Vec::new())]));
        c.with_identity(Identity { user, mode })
    }

    /// Sends frames from every radio and reports who heard whom (see the module header).
    pub(super) async fn check_radios(&self, report: &mut LabReport) {
        let n = self.hosts.len();
        let paths: Vec<PathBuf> = self.hosts.iter().map(|h| self.radio_path(h)).collect();
        let topology = self.opts.topology.clone();
        let longest = topology.iter().flat_map(|t| &t.links).filter_map(|l| l.spec.as_ref()).map(|s| s.delay + s.jitter).max().unwrap_or_default();
        let listen = LISTEN + longest * 2;
        report.pairs_checked = n * (n - 1);
        report.pings_sent = n * FRAMES_PER_HOST;
        let heard = match tokio::task::spawn_blocking(move || exchange_frames(&paths, listen)).await {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                report.failures.push(format!("radio check: {e}"));
                return;
            }
            Err(e) => {
                report.failures.push(format!("radio check: {e}"));
                return;
            }
        };
        let mut all = Vec::new();
        for a in 0..n {
            for b in a + 1..n {
                let link = topology.as_ref().map(|t| t.link(a, b));
                let linked = link.is_none_or(|l| l.is_some());
                let spec = link.flatten().and_then(|l| l.spec.as_ref());
                // Links that may lose frames are measured, not judged.
                let lossy = spec.is_some_and(|s| s.loss.is_some() || s.flap.is_some() || s.rate.is_some());
                let mut latencies = Vec::new();
                for (from, to) in [(a, b), (b, a)] {
                    let got = &heard[to][from];
                    let (x, y) = (&self.hosts[from].name, &self.hosts[to].name);
                    if linked && !lossy && got.len() < FRAMES_PER_HOST {
                        report.failures.push(format!("{x} -> {y}: heard {} of {FRAMES_PER_HOST} frames, but they are linked", got.len()));
                    }
                    if !linked && !got.is_empty() {
                        report.failures.push(format!("{x} -> {y}: heard {} frames, but they have no link", got.len()));
                    }
                    latencies.extend_from_slice(got);
                }
                all.extend_from_slice(&latencies);
                if topology.is_some() {
                    report.links.push(LinkReport {
                        a: self.hosts[a].name.clone(),
                        b: self.hosts[b].name.clone(),
                        linked,
                        emulate: spec.map(ToString::to_string),
                        configured_rtt_ms: spec.map(|s| s.delay.as_secs_f64() * 1000.0),
                        rtt_p50_ms: plan::quantile(&latencies, 0.5),
                        replies: latencies.len(),
                        requests: 2 * FRAMES_PER_HOST,
                        loss_probe: None,
                        tcp_bits_per_s: None,
                    });
                }
            }
        }
        report.failures.sort();
        report.rtt_p50_ms = plan::quantile(&all, 0.5);
        report.rtt_p99_ms = plan::quantile(&all, 0.99);
    }

    /// `--keep`: where each radio is, and how to use it.
    pub(super) fn print_radios(&self) {
        println!("{:<6} pseudo-terminal (SLIP, END-delimited 802.15.4 frames)", "host");
        for h in self.hosts.iter().take(50) {
            println!("{:<6} {}", h.name, self.radio_path(h).display());
        }
        if self.hosts.len() > 50 {
            println!("… {} more under {}", self.hosts.len() - 50, radio_dir(&self.opts.session).display());
        }
        println!("\nopen a radio as a probe: e.g. socat - {},raw,echo=0", self.radio_path(&self.hosts[0]).display());
        println!("Ctrl-C tears the lab down.\n");
    }
}

/// Removes a session's radio links (a lab killed before its teardown leaves them).
pub(super) fn remove_radio_dir(session: &str) {
    let _ = std::fs::remove_dir_all(radio_dir(session));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_frames_name_their_sender_and_number() {
        for (i, k) in [(0, 0), (1, 3), (255, 2), (256, 1), (1000, 3)] {
            assert_eq!(parse_check_frame(&check_frame(i, k)), Some((i, k)));
        }
        assert_eq!(parse_check_frame(b"\x41\x88\x00\x00\x01tunbus-lax"), None);
        assert_eq!(parse_check_frame(&[]), None);
    }

    #[test]
    fn a_topology_becomes_what_each_radio_hears() {
        let t = super::super::topology::LabTopology::parse("hosts: 3\nlinks:\n  - between: [h1, h2]\n    emulate: loss 10%\n  - between: [h2, h3]\n", None)
            .unwrap();
        let names: Vec<String> = ["h1", "h2", "h3"].map(String::from).to_vec();
        let hearing_of = |i: usize| Hearing { links: t.emulation_of(i, &names, 3).to, seed: 3 };
        let h1 = hearing_of(0);
        assert_eq!(h1.links, vec![("h2".to_owned(), "loss 10%".parse().unwrap()), ("h3".to_owned(), crate::emulate::Spec::unlinked())]);
        assert_eq!(hearing_of(1).links, vec![("h1".to_owned(), "loss 10%".parse().unwrap())], "h2 hears h3 plainly");
    }
}
