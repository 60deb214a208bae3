//! `agent serial` end to end: real `agent serial` processes, fake 802.15.4 probes on
//! pseudo-terminals (`common::probe`), the machine's RabbitMQ.
//!
//! `two_probes_on_the_native_wire`: frames a probe sends to one agent arrive SLIP-framed on
//! the other agent's probe, byte-exact (END and ESC inside, a maximal 127-byte PSDU, every
//! byte value), and not back on the sender's; malformed SLIP (an ESC followed by garbage,
//! an over-long frame, noise between frames) is dropped and counted and the next good frame
//! passes; each probe in turn is unplugged for 3 s and plugged in again under its `by-id`
//! name (another `/dev/pts/N`), and frames flow again within 2 s; Ctrl-C ends both agents
//! at once with reports that count all of it.
//!
//! `a_probe_on_the_ioppytest_wire`: the serial keys and JSON of ioppytest-agent 0.2.20, the
//! test playing the bus: `serial.started` and the frame bodies byte for byte as the
//! Python listener writes them, injected frames (both shapes) on the probe's line, a
//! `serial.start` answered, a body that does not decode counted.

mod common;

use std::time::{Duration, Instant};

use common::probe::FakeProbe;
use common::*;
use tunbus::codec::slip::{self, END, ESC, ESC_END, ESC_ESC, MAX_PSDU};

/// Frames that exercise SLIP: every escape, a maximal PSDU, one byte, all byte values.
fn radio_frames() -> Vec<Vec<u8>> {
    let mut frames: Vec<Vec<u8>> = vec![
        vec![0x41, 0x88, 0x01, 0xcd, 0xab, 0xff, 0xff, 0x01, 0x00, 0x3f, 0x00],
        vec![END],
        vec![ESC],
        vec![END, ESC, ESC_END, ESC_ESC, END, END],
        (0..MAX_PSDU).map(|i| [END, ESC, i as u8][i % 3]).collect(),
        (0..MAX_PSDU as u8).rev().collect(),
        vec![0x02, 0x00, 0x2a],
    ];
    frames.extend((0..=255u8).collect::<Vec<u8>>().chunks(MAX_PSDU).map(<[u8]>::to_vec));
    frames
}

fn serial_stats(report: &serde_json::Value, field: &str) -> u64 {
    report["serial"][field].as_u64().unwrap_or_else(|| panic!("no serial.{field} in the report: {report}"))
}

/// Sends a numbered frame from `from` every 50 ms until `to` receives one (any); the time
/// from `since` to that frame.
fn first_frame_after(from: &FakeProbe, to: &mut FakeProbe, since: Instant, limit: Duration) -> Option<Duration> {
    let mut n = 0u8;
    while since.elapsed() < limit {
        from.send(&[&[0x41, 0x98, n, 0xcd, 0xab]]);
        n = n.wrapping_add(1);
        if !to.recv_frames(1, Duration::from_millis(50)).is_empty() {
            return Some(since.elapsed());
        }
    }
    None
}

#[test]
fn two_probes_on_the_native_wire() {
    if !system_ready("two_probes_on_the_native_wire") {
        return;
    }
    let session = unique("radio");
    let mut probe_a = FakeProbe::new();
    let mut probe_b = FakeProbe::new();
    let (name_a, name_b) = (unique("moteA"), unique("moteB"));
    let dev_a = probe_a.path().display().to_string();
    let dev_b = probe_b.path().display().to_string();
    let mut a = AgentProc::spawn_serial(&name_a, &["--device", &dev_a, "--session", &session, "--wire", "native"]);
    let mut b = AgentProc::spawn_serial(&name_b, &["--device", &dev_b, "--session", &session, "--wire", "native"]);
    for agent in [&a, &b] {
        assert!(agent.wait_log("agent up", Duration::from_secs(15)), "agent {} did not come up:\n{}", agent.name, agent.logs());
    }

    // Byte-exact, SLIP-framed, to the other probe only.
    let want = radio_frames();
    let refs: Vec<&[u8]> = want.iter().map(Vec::as_slice).collect();
    probe_a.send(&refs);
    let got = probe_b.recv_frames(want.len(), Duration::from_secs(10));
    assert_eq!(got, want, "frames at probe B:\n{}\n{}", a.logs(), b.logs());
    assert_eq!(probe_b.decode_stats().malformed(), 0, "the agent writes clean SLIP");
    assert!(probe_a.recv_frames(1, Duration::from_millis(300)).is_empty(), "a probe hears its own frames back");
    // And the other way.
    probe_b.send(&refs[..3]);
    assert_eq!(probe_a.recv_frames(3, Duration::from_secs(10)), want[..3]);

    // Malformed SLIP: counted, and the next good frame passes.
    let good = [0x61u8, 0xdc, 0x07, END, 0x33];
    let mut line = vec![END, 0x41, ESC, 0x00, 0x42, END]; // an ESC followed by garbage
    line.push(END);
    line.extend(std::iter::repeat_n(0x55u8, 400)); // over the 159-byte maximum
    line.push(END);
    line.extend_from_slice(b"noise"); // between frames
    slip::encode(&good, &mut line);
    probe_a.send_raw(&line);
    assert_eq!(probe_b.recv_frames(1, Duration::from_secs(10)), [good.to_vec()], "the good frame after the bad ones:\n{}", a.logs());

    // Probe B (written to) unplugged for 3 s: frames sent meanwhile are lost and counted;
    // back (a new pseudo-terminal under the same name), frames flow again within 2 s.
    probe_b.unplug();
    let gone = Instant::now();
    while gone.elapsed() < Duration::from_secs(3) {
        probe_a.send(&[&[0x41, 0x98, 0xee]]);
        std::thread::sleep(Duration::from_millis(200));
    }
    probe_b.replug();
    let back_b = first_frame_after(&probe_a, &mut probe_b, Instant::now(), Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no frame at probe B after its replug:\n{}", b.logs()));
    // Probe A (read from) unplugged for 3 s.
    probe_a.unplug();
    std::thread::sleep(Duration::from_secs(3));
    probe_a.replug();
    let back_a = first_frame_after(&probe_a, &mut probe_b, Instant::now(), Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no frame from probe A after its replug:\n{}", a.logs()));
    eprintln!("frames again {back_b:.2?} after probe B's replug, {back_a:.2?} after probe A's");
    assert!(back_b < Duration::from_secs(2) && back_a < Duration::from_secs(2), "{back_b:?} {back_a:?}");

    // agent status shows the probe.
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_agent")).args(["status", &name_b]).output().expect("agent status");
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success() && text.contains("serial probe: connected") && text.contains("outages 1"),
        "{text}{}",
        String::from_utf8_lossy(&status.stderr)
    );

    // Both probes say hello in their session.
    let peers = std::process::Command::new(env!("CARGO_BIN_EXE_agent")).args(["peers", "--url", URL, "--session", &session]).output().expect("agent peers");
    let text = String::from_utf8_lossy(&peers.stdout);
    assert!(text.contains(&name_a) && text.contains(&name_b), "{text}{}", String::from_utf8_lossy(&peers.stderr));

    // Ctrl-C: both exit 0 at once; the reports count what happened.
    let t0 = Instant::now();
    let report_a = a.interrupt();
    let report_b = b.interrupt();
    assert!(t0.elapsed() < Duration::from_secs(4), "stopping took {:?}", t0.elapsed());
    assert!(serial_stats(&report_a, "bad_escape") >= 1 && serial_stats(&report_a, "too_long") >= 1 && serial_stats(&report_a, "noise") >= 1, "{report_a}");
    assert!(serial_stats(&report_a, "frames_in") as usize > want.len(), "{report_a}");
    assert!(report_a["tx_packets"].as_u64().unwrap_or(0) as usize > want.len(), "{report_a}");
    assert!(serial_stats(&report_b, "lost_unplugged") >= 1, "{report_b}");
    assert!(serial_stats(&report_b, "outages") >= 1 && serial_stats(&report_b, "reopens") >= 1, "{report_b}");
    assert!(serial_stats(&report_a, "outages") >= 1 && serial_stats(&report_a, "reopens") >= 1, "{report_a}");
    assert!(serial_stats(&report_b, "frames_out") as usize > want.len(), "{report_b}");
    for r in [&report_a, &report_b] {
        assert_eq!(drops(r, "wrong_layer") + drops(r, "no_identity") + drops(r, "malformed"), 0, "{r}");
    }
    let logs = a.logs();
    assert!(logs.contains("serial probe gone") && logs.contains("serial probe back"), "{logs}");
}

#[test]
fn a_probe_on_the_ioppytest_wire() {
    use tunbus::codec::ioppytest::{self, serial};
    if !system_ready("a_probe_on_the_ioppytest_wire") {
        return;
    }
    let name = unique("probe");
    let mut bus = bus_client();
    listen(&mut bus, ioppytest::EXCHANGE, &[&format!("fromAgent.{name}.#"), ioppytest::ROUTING_KEY_COMPONENT_READY]);
    let mut probe = FakeProbe::new();
    let device = probe.path().display().to_string();
    let mut agent = AgentProc::spawn_serial(&name, &["--device", &device, "--baud", "460800"]);
    assert!(agent.wait_log("agent up", Duration::from_secs(15)), "{}", agent.logs());

    // serial.started as the Python listener writes it (and readiness).
    let mut started = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while started.is_none() && Instant::now() < deadline {
        if let Some((key, content_type, body)) = next_delivery(&mut bus, Duration::from_millis(200)) {
            if key == serial::routing_key_started(&name) {
                assert_eq!(content_type.as_deref(), Some(ioppytest::CONTENT_TYPE));
                started = Some(body);
            }
        }
    }
    let started = started.unwrap_or_else(|| panic!("no serial.started:\n{}", agent.logs()));
    let mut ours = Vec::new();
    serial::encode_started(&name, &device, 460_800, &mut ours);
    assert_eq!(String::from_utf8_lossy(&started), String::from_utf8_lossy(&ours));

    // Probe → bus: one body per frame, byte for byte the Python listener's.
    let frames = radio_frames();
    let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
    probe.send(&refs);
    for want in &frames {
        let (key, content_type, body) =
            next_delivery(&mut bus, Duration::from_secs(10)).unwrap_or_else(|| panic!("frame {want:02x?} never published:\n{}", agent.logs()));
        assert_eq!(key, serial::routing_key_from_agent(&name));
        assert_eq!(content_type.as_deref(), Some(ioppytest::CONTENT_TYPE));
        let value: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        let ts = value["timestamp"].as_u64().expect("whole seconds");
        serial::encode_frame(want, ts, &mut ours);
        assert_eq!(String::from_utf8_lossy(&body), String::from_utf8_lossy(&ours));
    }

    // Bus → probe: the listener's shape and the router's, and one body that is no frame.
    let mut line = Vec::new();
    let to_probe = serial::routing_key_to_agent(&name);
    for (i, f) in frames.iter().enumerate() {
        let mut body = Vec::new();
        let now_s = tunbus::util::now_ns() / 1_000_000_000;
        if i % 2 == 0 {
            serial::encode_frame(f, now_s, &mut body);
        } else {
            serial::encode_inject(f, now_s, &mut body);
        }
        if i == 1 {
            publish(&mut bus, ioppytest::EXCHANGE, &to_probe, &tunbus::amqp::IOPPYTEST_PROPERTIES, br#"{"data": [300]}"#);
        }
        publish(&mut bus, ioppytest::EXCHANGE, &to_probe, &tunbus::amqp::IOPPYTEST_PROPERTIES, &body);
        slip::encode(f, &mut line);
    }
    let got = probe.recv_raw(Duration::from_secs(10), |b| b.len() >= line.len());
    assert_eq!(got, line, "what the agent wrote to the probe:\n{}", agent.logs());

    // serial.start is answered with serial.started.
    publish(
        &mut bus,
        ioppytest::EXCHANGE,
        &serial::routing_key_start(&name),
        &tunbus::amqp::IOPPYTEST_PROPERTIES,
        br#"{"_api_version": "1.2.15", "name": null, "port": null, "boudrate": null}"#,
    );
    let answered = (0..50).any(|_| {
        next_delivery(&mut bus, Duration::from_millis(200)).is_some_and(|(key, _, body)| key == serial::routing_key_started(&name) && body == started)
    });
    assert!(answered, "serial.start was not answered:\n{}", agent.logs());

    let report = agent.interrupt();
    assert_eq!(serial_stats(&report, "frames_in") as usize, frames.len(), "{report}");
    assert_eq!(serial_stats(&report, "frames_out") as usize, frames.len(), "{report}");
    assert_eq!(drops(&report, "malformed"), 1, "{report}");
}

/// `agent capture` of a serial session: one IEEE 802.15.4 interface per probe, link type
/// NOFCS (230), which `tcpdump -r` names and decodes; the frames as the probes sent them.
#[test]
fn a_capture_of_a_serial_session_reads_as_802154() {
    if !system_ready("a_capture_of_a_serial_session_reads_as_802154") {
        return;
    }
    let session = unique("radiocap");
    let probe_a = FakeProbe::new();
    let mut probe_b = FakeProbe::new();
    let (name_a, name_b) = (unique("capA"), unique("capB"));
    let (dev_a, dev_b) = (probe_a.path().display().to_string(), probe_b.path().display().to_string());
    let a = AgentProc::spawn_serial(&name_a, &["--device", &dev_a, "--session", &session, "--wire", "native"]);
    let b = AgentProc::spawn_serial(&name_b, &["--device", &dev_b, "--session", &session, "--wire", "native"]);
    for agent in [&a, &b] {
        assert!(agent.wait_log("agent up", Duration::from_secs(15)), "{}", agent.logs());
    }
    let file = std::env::temp_dir().join(format!("{session}.pcapng"));
    let log = std::env::temp_dir().join(format!("{session}.capture.log"));
    let mut capture = std::process::Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(["capture", "--url", URL, "--session", &session, "-w"])
        .arg(&file)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("capture log"))
        .spawn()
        .expect("agent capture");
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();
    let t0 = Instant::now();
    while !logs().contains("tap open") {
        assert!(t0.elapsed() < Duration::from_secs(10), "{}", logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    // IEEE 802.15.4 data frames (short addresses, PAN 0xabcd), sequence numbers 1..=5.
    let frames: Vec<Vec<u8>> = (1..=5u8).map(|seq| vec![0x41, 0x88, seq, 0xcd, 0xab, 0xff, 0xff, 0x01, 0x00, 0xc0, 0xdb, seq]).collect();
    let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
    probe_a.send(&refs);
    assert_eq!(probe_b.recv_frames(frames.len(), Duration::from_secs(10)), frames);
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill(2) on our own child, not reaped yet.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(capture.id() as i32, libc::SIGINT);
    }
    let status = capture.wait().expect("capture exits");
    assert!(status.success(), "{}", logs());
    let out = std::process::Command::new("tcpdump").args(["-nn", "-x", "-r"]).arg(&file).output().expect("tcpdump");
    let (text, err) = (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_file(&log);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("IEEE802_15_4_NOFCS"), "{err}");
    let decoded: Vec<&str> = text.lines().filter(|l| l.contains("IEEE 802.15.4 Data packet") && l.contains("abcd:ffff < -:0001")).collect();
    assert_eq!(decoded.len(), frames.len(), "{text}");
    for seq in 1..=5 {
        // (tcpdump -x leaves out the first byte of the frame control field.)
        assert!(text.contains(&format!("0x0000:  88{seq:02x} cdab ffff 0100 c0db {seq:02x}")), "frame {seq} byte-exact: {text}");
    }
}
