//! Simulated 802.15.4 radios whose medium is the bus, end to end on the machine's RabbitMQ:
//! the test plays the programs that open the radios' pseudo-terminals and speak SLIP.
//!
//! `a_radio_lab_hears_its_topology`: `agent lab --radio --topology` (h1–h2 plain, h2–h3
//! with 30 ms of delay, h1 and h3 unlinked) checks itself and reports OK with each link
//! measured; then, kept up, frames from h1 (every SLIP escape, a maximal PSDU) reach h2
//! byte for byte and never h3, h3's reach h2 no sooner than the link's delay; Ctrl-C ends
//! it at once and its pseudo-terminals' folder is gone.
//!
//! `agent_serial_pty_radios_hear_only_their_links`: three `agent serial --pty` processes,
//! one of which hears nothing of another (`--hear A=none`): frames go where the links say,
//! the deaf one counts what it did not hear (in its report and on its Prometheus
//! endpoint), and each link is removed on exit.

mod common;

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tunbus::codec::slip::{self, Decoder, Framing, END, ESC, ESC_END, ESC_ESC, MAX_PSDU};
use tunbus::sys::{self, Interest};

/// A program's side of a simulated radio: the pseudo-terminal a radio links at `path`.
struct Radio {
    fd: OwnedFd,
    decoder: Decoder,
}

impl Radio {
    /// Opens the radio at `path`, waiting up to `limit` for it to appear.
    fn open(path: &Path, limit: Duration) -> Radio {
        let t0 = Instant::now();
        loop {
            match sys::tty::open_serial(path, 460_800) {
                Ok(fd) => return Radio { fd, decoder: Decoder::new(Framing::Delimited, 4096) },
                Err(e) => assert!(t0.elapsed() < limit, "no radio at {}: {e}", path.display()),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn send(&self, frames: &[&[u8]]) {
        let mut line = Vec::new();
        for f in frames {
            slip::encode(f, &mut line);
        }
        let mut at = 0;
        let deadline = Instant::now() + Duration::from_secs(5);
        while at < line.len() {
            match sys::tty::write(self.fd.as_fd(), &line[at..]).expect("write to the radio") {
                Some(n) => at += n,
                None => {
                    assert!(Instant::now() < deadline, "the radio took nothing for 5 s");
                    let _ = sys::wait_fd(self.fd.as_fd(), Interest::Write, Duration::from_millis(10));
                }
            }
        }
    }

    /// Frames received within `timeout` (stops early at `n`), each with when it came.
    fn recv(&mut self, n: usize, timeout: Duration) -> Vec<(Vec<u8>, Instant)> {
        let mut got = Vec::new();
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        while got.len() < n {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else { break };
            if !sys::wait_fd(self.fd.as_fd(), Interest::Read, left.min(Duration::from_millis(20))).expect("poll the radio") {
                continue;
            }
            while let Ok(Some(k)) = sys::read(self.fd.as_fd(), &mut buf) {
                if k == 0 {
                    break;
                }
                let now = Instant::now();
                self.decoder.decode_all(&buf[..k], |f| got.push((f.to_vec(), now)));
            }
        }
        got
    }

    /// Reads and drops what is waiting (the lab's own check frames).
    fn drain(&mut self) {
        let _ = self.recv(usize::MAX, Duration::from_millis(300));
    }
}

/// Frames that exercise SLIP: every escape, a maximal PSDU.
fn radio_frames() -> Vec<Vec<u8>> {
    vec![
        vec![0x41, 0x88, 0x01, 0xcd, 0xab, 0xff, 0xff, 0x01, 0x00, 0x3f, 0x00],
        vec![END, ESC, ESC_END, ESC_ESC, END, END],
        (0..MAX_PSDU).map(|i| [END, ESC, i as u8][i % 3]).collect(),
    ]
}

const TOPOLOGY: &str = "hosts: 3\nlinks:\n  - between: [h1, h2]\n  - between: [h2, h3]\n    emulate: delay 30ms\n";

/// A child killed on drop (a test that fails leaves nothing running).
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn radio_dir(session: &str) -> PathBuf {
    std::env::temp_dir().join(format!("tunbus-radios-{session}"))
}

#[test]
fn a_radio_lab_hears_its_topology() {
    if !system_ready("a_radio_lab_hears_its_topology") {
        return;
    }
    let topology = TempFile::new("radio-topology.yaml", TOPOLOGY);
    let json = TempFile::new("radio-lab.json", "");

    // Checked and torn down.
    let session = unique("rlab");
    let out = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(["lab", "--url", URL, "--radio", "--topology", topology.path(), "--session", &session, "--json", json.path()])
        .output()
        .expect("lab runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "agent lab --radio failed:\n{text}");
    assert!(text.contains("frame latency"), "{text}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json.0).expect("report")).expect("json");
    assert_eq!(report["hosts_up"], 3, "{report}");
    assert_eq!(report["failures"].as_array().map(Vec::len), Some(0), "{report}");
    let links = report["links"].as_array().expect("links");
    let link = |a: &str, b: &str| links.iter().find(|l| l["a"] == a && l["b"] == b).unwrap_or_else(|| panic!("no link {a}-{b}: {report}"));
    assert_eq!((link("h1", "h2")["replies"].as_u64(), link("h1", "h2")["requests"].as_u64()), (Some(8), Some(8)), "{report}");
    assert_eq!(link("h1", "h3")["linked"], false);
    assert_eq!(link("h1", "h3")["replies"], 0, "unlinked radios heard each other: {report}");
    let slow = link("h2", "h3");
    assert_eq!(slow["replies"], 8, "{report}");
    assert!(slow["rtt_p50_ms"].as_f64().is_some_and(|ms| ms >= 30.0), "the 30 ms link was faster: {report}");
    assert!(!radio_dir(&session).exists(), "the lab left its radios behind");

    // Kept up, driven by the test.
    let session = unique("rkeep");
    let lab = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(["lab", "--url", URL, "--radio", "--topology", topology.path(), "--session", &session, "--keep"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn lab");
    let mut lab = Running(lab);
    let mut stdout = std::io::BufReader::new(lab.0.stdout.take().expect("stdout"));
    let t0 = Instant::now();
    let mut printed = String::new();
    loop {
        let mut line = String::new();
        let n = std::io::BufRead::read_line(&mut stdout, &mut line).expect("lab output");
        assert!(n > 0, "the lab ended before it was up:\n{printed}");
        printed += &line;
        if line.starts_with("  result") {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "the lab did not come up:\n{printed}");
    }
    assert!(printed.contains("result          OK"), "{printed}");
    let dir = radio_dir(&session);
    assert!(printed.contains(&dir.join("h1").display().to_string()), "the radios' paths are printed:\n{printed}");
    let mut radios: Vec<Radio> = (1..=3).map(|i| Radio::open(&dir.join(format!("h{i}")), Duration::from_secs(5))).collect();
    for r in &mut radios {
        r.drain();
    }
    let want = radio_frames();
    let refs: Vec<&[u8]> = want.iter().map(Vec::as_slice).collect();
    radios[0].send(&refs);
    let at_h2: Vec<Vec<u8>> = radios[1].recv(want.len(), Duration::from_secs(5)).into_iter().map(|(f, _)| f).collect();
    assert_eq!(at_h2, want, "h1's frames at h2, byte for byte");
    assert!(radios[2].recv(1, Duration::from_millis(500)).is_empty(), "h3 has no link with h1 and heard it");
    assert!(radios[0].recv(1, Duration::from_millis(100)).is_empty(), "h1 heard itself");
    // h3 -> h2 over the 30 ms link.
    let sent = Instant::now();
    radios[2].send(&[&[0x41, 0x88, 0x77]]);
    let got = radios[1].recv(1, Duration::from_secs(5));
    assert_eq!(got.first().map(|(f, _)| f.as_slice()), Some(&[0x41u8, 0x88, 0x77][..]));
    let took = got[0].1.duration_since(sent);
    assert!(took >= Duration::from_millis(30), "the 30 ms link took {took:?}");
    drop(radios);

    // SAFETY: kill(2) on our own child, not reaped yet.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(lab.0.id() as i32, libc::SIGINT);
    }
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = lab.0.try_wait().expect("wait") {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "the lab did not end after SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    assert!(!dir.exists(), "the kept lab left its radios behind");
}

#[test]
fn agent_serial_pty_radios_hear_only_their_links() {
    if !system_ready("agent_serial_pty_radios_hear_only_their_links") {
        return;
    }
    let session = unique("rpty");
    let dir = std::env::temp_dir().join(unique("rptydir"));
    std::fs::create_dir_all(&dir).expect("folder");
    let (a, b, c) = (unique("ra"), unique("rb"), unique("rc"));
    let path = |n: &str| dir.join(n).display().to_string();
    let common = ["--session", session.as_str(), "--wire", "native", "--pty"];
    let mut agent_a = AgentProc::spawn_serial(&a, &[&common[..], &["--device", &path(&a)]].concat());
    let mut agent_b = AgentProc::spawn_serial(&b, &[&common[..], &["--device", &path(&b)]].concat());
    let deaf = format!("{a}=none");
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port").to_string();
    let mut agent_c = AgentProc::spawn_serial(&c, &[&common[..], &["--device", &path(&c), "--hear", &deaf, "--metrics-addr", &port]].concat());
    for agent in [&agent_a, &agent_b, &agent_c] {
        assert!(agent.wait_log("agent up", Duration::from_secs(15)), "agent {} did not come up:\n{}", agent.name, agent.logs());
    }
    let mut ra = Radio::open(Path::new(&path(&a)), Duration::from_secs(5));
    let mut rb = Radio::open(Path::new(&path(&b)), Duration::from_secs(5));
    let mut rc = Radio::open(Path::new(&path(&c)), Duration::from_secs(5));
    let want = radio_frames();
    let refs: Vec<&[u8]> = want.iter().map(Vec::as_slice).collect();
    ra.send(&refs);
    let at_b: Vec<Vec<u8>> = rb.recv(want.len(), Duration::from_secs(5)).into_iter().map(|(f, _)| f).collect();
    assert_eq!(at_b, want, "a's frames at b:\n{}\n{}", agent_a.logs(), agent_b.logs());
    assert!(rc.recv(1, Duration::from_millis(500)).is_empty(), "c does not hear a");
    rb.send(&[&[0x41, 0x88, 0x42]]);
    let at_c: Vec<Vec<u8>> = rc.recv(1, Duration::from_secs(5)).into_iter().map(|(f, _)| f).collect();
    assert_eq!(at_c, vec![vec![0x41, 0x88, 0x42]], "c hears b:\n{}", agent_c.logs());
    assert_eq!(ra.recv(1, Duration::from_secs(2)).first().map(|(f, _)| f.clone()), Some(vec![0x41, 0x88, 0x42]), "a hears b");
    drop((ra, rb, rc));
    // The radio's counters on its Prometheus endpoint.
    let metrics = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port.parse::<u16>().expect("port"))).expect("metrics endpoint listens");
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").expect("request");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("response");
        text
    };
    let unheard = format!("tunbus_serial_dropped_frames_total{{agent=\"{c}\",reason=\"unheard\"}} {}", want.len());
    assert!(metrics.contains(&unheard), "no {unheard:?} in:\n{metrics}");
    assert!(metrics.contains(&format!("tunbus_serial_frames_total{{agent=\"{c}\",direction=\"out\"}} 1")), "{metrics}");
    let report_c = agent_c.interrupt();
    assert_eq!(report_c["serial"]["unheard"], want.len() as u64, "{report_c}");
    agent_a.interrupt();
    agent_b.interrupt();
    for n in [&a, &b, &c] {
        assert!(std::fs::symlink_metadata(dir.join(n)).is_err(), "the link of {n} is left behind");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
