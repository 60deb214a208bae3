//! The serial port (`tunbus::port::serial::SerialPort`) against fake 802.15.4 probes on
//! pseudo-terminals (`common::probe`): frames from the probe come out of `read` byte-exact,
//! `write` arrives SLIP-framed on the probe's line, malformed SLIP is counted by reason and
//! the next frame passes, the device's backpressure costs whole frames only, and a probe
//! that is unplugged for 3 s and plugged in again (another `/dev/pts/N` under the same
//! `by-id` name) carries frames again within 2 s, never making the port return an error.
//!
//! The test drives the port as a queue worker will (`pump`): wait on `Port::fd` until
//! `Port::poll_at`, `Port::poll`, then `Port::read` until it has nothing. Needs only
//! `/dev/ptmx`: no root, no broker.

mod common;

use std::time::{Duration, Instant};

use common::probe::FakeProbe;
use tunbus::codec::slip::{self, MAX_PSDU};
use tunbus::codec::vnet;
use tunbus::port::serial::{SerialConfig, SerialPort, SerialStats, REOPEN_EVERY};
use tunbus::port::Port;
use tunbus::sys::{self, Interest};

const BAUD: u32 = 460_800;

/// Runs the port as a worker would for at most `limit`, until `done(frames so far)`;
/// returns the frames read (virtio header checked and stripped).
fn pump(port: &mut SerialPort, limit: Duration, mut done: impl FnMut(&[Vec<u8>]) -> bool) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + limit;
    let mut frames = Vec::new();
    let mut buf = vec![0u8; 65_536];
    while !done(&frames) {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let mut wake = deadline.min(now + Duration::from_millis(20));
        if let Some(t) = port.poll_at() {
            wake = wake.min(t);
        }
        let timeout = wake.saturating_duration_since(now);
        match port.fd() {
            Some(fd) => {
                sys::wait([Some((fd, Interest::Read))], timeout).expect("poll");
            }
            None => std::thread::sleep(timeout),
        }
        port.poll(Instant::now());
        while let Some(n) = port.read(&mut buf).expect("a serial port never fails a read") {
            assert!(n >= 10, "a unit shorter than its header");
            assert_eq!(buf[..10], vnet::PLAIN, "a serial frame carries the plain virtio header");
            frames.push(buf[10..n].to_vec());
        }
    }
    frames
}

/// Frames that exercise SLIP: every escape, a maximal PSDU, one byte, all byte values.
fn test_frames() -> Vec<Vec<u8>> {
    let mut frames: Vec<Vec<u8>> = vec![
        vec![0x41, 0x88, 0x01, 0xcd, 0xab, 0xff, 0xff, 0x01, 0x00, 0x3f, 0x00],
        vec![slip::END],
        vec![slip::ESC],
        vec![slip::END, slip::ESC, slip::ESC_END, slip::ESC_ESC, slip::END, slip::END],
        vec![0x02, 0x00, 0x2a],
        (0..MAX_PSDU).map(|i| [slip::END, slip::ESC, i as u8][i % 3]).collect(),
        (0..MAX_PSDU as u8).collect(),
        vec![0x00],
    ];
    frames.extend((0..=255u8).collect::<Vec<u8>>().chunks(MAX_PSDU).map(<[u8]>::to_vec));
    frames
}

fn stats(port: &SerialPort) -> SerialStats {
    port.counters().snapshot()
}

#[test]
fn frames_from_the_probe_come_out_of_read_byte_exact() {
    let probe = FakeProbe::new();
    let mut port = SerialPort::open(0, SerialConfig::new(probe.path(), BAUD)).expect("open the probe");
    let want = test_frames();
    let refs: Vec<&[u8]> = want.iter().map(Vec::as_slice).collect();
    probe.send(&refs);
    let got = pump(&mut port, Duration::from_secs(5), |f| f.len() >= want.len());
    assert_eq!(got, want);
    let s = stats(&port);
    assert_eq!((s.frames_in, s.bytes_in), (want.len() as u64, want.iter().map(|f| f.len() as u64).sum()));
    assert_eq!((s.malformed(), s.outages, s.connected), (0, 0, true), "{s:?}");
}

#[test]
fn written_frames_arrive_slip_framed_on_the_probe() {
    let mut probe = FakeProbe::new();
    let mut port = SerialPort::open(0, SerialConfig::new(probe.path(), BAUD)).expect("open the probe");
    let frames = test_frames();
    let mut line = Vec::new();
    for f in &frames {
        port.write(&vnet::PLAIN, f).expect("a serial port never fails a write");
        slip::encode(f, &mut line);
    }
    let got = probe.recv_raw(Duration::from_secs(5), |b| b.len() >= line.len());
    assert_eq!(got, line, "the bytes on the line: END, escaped frame, END, for each frame in order");
    assert_eq!(got.first(), Some(&slip::END), "a leading END");
    let s = stats(&port);
    assert_eq!((s.frames_out, s.bytes_out), (frames.len() as u64, frames.iter().map(|f| f.len() as u64).sum()));
    // Frames no probe can send are refused, counted, and nothing reaches the line.
    port.write(&vnet::PLAIN, &[]).expect("never fails");
    port.write(&vnet::PLAIN, &[7u8; slip::DEFAULT_MAX_FRAME + 1]).expect("never fails");
    assert_eq!(stats(&port).refused_out, 2);
    assert!(probe.recv_raw(Duration::from_millis(200), |_| false).is_empty());
}

#[test]
fn malformed_slip_is_counted_by_reason_and_the_next_frame_passes() {
    let probe = FakeProbe::new();
    let mut port = SerialPort::open(0, SerialConfig::new(probe.path(), BAUD)).expect("open the probe");
    let good: Vec<Vec<u8>> = (1..=6u8).map(|i| vec![0x41, i, slip::END, i]).collect();
    let mut line = Vec::new();
    line.extend_from_slice(&[0x13, 0x37]); // the middle of a frame: noise before the first END
    slip::encode(&good[0], &mut line);
    line.extend_from_slice(&[slip::END, 0x41, slip::ESC, 0x42, 0x43, slip::END]); // ESC + garbage
    slip::encode(&good[1], &mut line);
    slip::encode(&[0x55; slip::DEFAULT_MAX_FRAME + 1], &mut line); // over-long
    slip::encode(&good[2], &mut line);
    line.extend_from_slice(b"noise between frames");
    slip::encode(&good[3], &mut line);
    line.extend_from_slice(&[slip::END, slip::END, slip::END]); // empty frames: not an error
    slip::encode(&good[4], &mut line);
    line.extend_from_slice(&[slip::END, 0x41, slip::ESC, slip::END]); // ESC END: broken, closed
    slip::encode(&good[5], &mut line);
    probe.send_raw(&line);
    let got = pump(&mut port, Duration::from_secs(5), |f| f.len() >= good.len());
    assert_eq!(got, good);
    let s = stats(&port);
    assert_eq!((s.bad_escape, s.too_long, s.noise), (2, 1, 2), "{s:?}");
    assert!(s.empty >= 1, "{s:?}");
    assert_eq!(s.frames_in, 6);
}

#[test]
fn a_full_line_costs_whole_frames_only() {
    let mut probe = FakeProbe::new();
    let mut port = SerialPort::open(0, SerialConfig::new(probe.path(), BAUD)).expect("open the probe");
    // Nobody reads the probe's side: the pseudo-terminal's buffer fills, then the port's queue.
    let n = 3000u32;
    let frames: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let mut f = i.to_be_bytes().to_vec();
            f.extend_from_slice(&[slip::END; 100]);
            f
        })
        .collect();
    for f in &frames {
        port.write(&vnet::PLAIN, f).expect("never fails");
    }
    let busy = stats(&port).lost_busy;
    assert!(busy > 0, "the line never filled: {:?}", stats(&port));
    // Now read the line while the port drains its queue.
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        // A worker polls the port when poll_at says; here: at once.
        port.poll(Instant::now() + Duration::from_secs(1));
        let more = probe.recv_frames(usize::MAX, Duration::from_millis(100));
        if more.is_empty() && port.poll_at().is_none() {
            break;
        }
        got.extend(more);
    }
    let s = stats(&port);
    assert_eq!(s.frames_out + s.lost_busy, u64::from(n), "{s:?}");
    assert_eq!(got.len() as u64, s.frames_out, "{s:?}");
    assert_eq!(probe.decode_stats().malformed(), 0, "a frame was cut on the line");
    // In order, each whole, a gap wherever the queue was full.
    let ids: Vec<u32> = got.iter().map(|f| u32::from_be_bytes(f[..4].try_into().unwrap())).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "out of order");
    for f in &got {
        assert_eq!(f, &frames[u32::from_be_bytes(f[..4].try_into().unwrap()) as usize]);
    }
}

#[test]
fn unplugged_for_3_s_and_plugged_in_again_frames_flow_within_2_s() {
    let mut probe = FakeProbe::new();
    let mut port = SerialPort::open(0, SerialConfig::new(probe.path(), BAUD)).expect("open the probe");
    let first_tty = probe.tty().unwrap().to_path_buf();
    probe.send(&[b"before"]);
    assert_eq!(pump(&mut port, Duration::from_secs(2), |f| !f.is_empty()), [b"before".to_vec()]);

    // Pulled: the port notices on its next read (EIO), closes the device and keeps going.
    probe.unplug();
    let t_unplug = Instant::now();
    while port.fd().is_some() && t_unplug.elapsed() < Duration::from_secs(1) {
        pump(&mut port, Duration::from_millis(20), |_| false);
    }
    assert!(port.fd().is_none(), "the port did not notice the unplug: {:?}", stats(&port));
    // Someone else takes the freed pseudo-terminal, so the probe comes back under another
    // number, as a USB adapter may come back as ttyUSB1. Other processes open and close
    // pseudo-terminals meanwhile (the kernel hands out the lowest free number), so take
    // numbers until the freed one is among them.
    let mut _others = Vec::new();
    for _ in 0..256 {
        let other = sys::tty::openpty(true).expect("a pseudo-terminal");
        let got_it = other.path.as_path() == first_tty.as_path();
        _others.push(other);
        if got_it {
            break;
        }
    }
    let s = stats(&port);
    assert_eq!((s.outages, s.connected), (1, false), "{s:?}");
    // Frames for the probe meanwhile are counted, never an error; the port looks for the
    // device every 250 ms.
    let mut lost = 0;
    while t_unplug.elapsed() < Duration::from_secs(3) {
        port.write(&vnet::PLAIN, b"while away").expect("never fails");
        lost += 1;
        let wake = port.poll_at().expect("away: the port wants to be polled");
        assert!(wake <= Instant::now() + REOPEN_EVERY, "next attempt too far away");
        pump(&mut port, Duration::from_millis(100), |_| false);
    }
    assert_eq!(stats(&port).lost_unplugged, lost);

    // Back, under another /dev/pts/N.
    probe.replug();
    assert_ne!(probe.tty().unwrap(), first_tty, "the kernel gave the same pseudo-terminal back");
    let t_replug = Instant::now();
    let mut got = Vec::new();
    let mut sent = 0u32;
    while got.is_empty() && t_replug.elapsed() < Duration::from_secs(5) {
        probe.send(&[&sent.to_be_bytes()]);
        sent += 1;
        got = pump(&mut port, Duration::from_millis(50), |f| !f.is_empty());
    }
    let flowing = t_replug.elapsed();
    assert!(!got.is_empty(), "no frame after the replug: {:?}", stats(&port));
    assert!(flowing < Duration::from_secs(2), "frames flowed again only after {flowing:?}");
    // And the other way.
    port.write(&vnet::PLAIN, b"after").expect("never fails");
    assert_eq!(probe.recv_frames(1, Duration::from_secs(2)), [b"after".to_vec()]);
    let s = stats(&port);
    assert_eq!((s.outages, s.reopens, s.connected), (1, 1, true), "{s:?}");
    eprintln!("unplugged 3 s: {lost} frames counted lost; frames flowed {flowing:?} after the replug; {s:?}");
}

#[test]
fn a_probe_absent_at_start_is_waited_for() {
    let mut probe = FakeProbe::new();
    probe.unplug();
    let mut port = SerialPort::waiting(0, SerialConfig::new(probe.path(), BAUD)).expect("a valid configuration");
    assert!(port.fd().is_none());
    assert!(matches!(SerialPort::open(1, SerialConfig::new(probe.path(), BAUD)), Err(tunbus::port::serial::Error::Open { .. })));
    pump(&mut port, Duration::from_millis(600), |_| false);
    probe.replug();
    let t = Instant::now();
    let mut got = Vec::new();
    while got.is_empty() && t.elapsed() < Duration::from_secs(3) {
        probe.send(&[b"hello"]);
        got = pump(&mut port, Duration::from_millis(50), |f| !f.is_empty());
    }
    assert_eq!(got.first().map(Vec::as_slice), Some(&b"hello"[..]));
    assert_eq!(stats(&port).reopens, 1);
}

/// Frames per second from a probe through the port, with the pseudo-terminal as fast as
/// the machine goes (a real line at 460800 baud carries at most ~357 maximal frames/s).
#[test]
fn throughput_is_far_above_the_line_rate() {
    let probe = FakeProbe::new();
    let mut port = SerialPort::open(0, SerialConfig::new(probe.path(), BAUD)).expect("open the probe");
    let n = 20_000usize;
    let frame: Vec<u8> = (0..MAX_PSDU).map(|i| i as u8).collect();
    let mut line = Vec::new();
    for _ in 0..n {
        slip::encode(&frame, &mut line);
    }
    let t0 = Instant::now();
    let got = std::thread::scope(|s| {
        s.spawn(|| probe.send_raw(&line));
        pump(&mut port, Duration::from_secs(30), |f| f.len() >= n)
    });
    let elapsed = t0.elapsed();
    assert_eq!(got.len(), n);
    assert!(got.iter().all(|f| f == &frame));
    let per_s = n as f64 / elapsed.as_secs_f64();
    let line_rate = BAUD as f64 / 10.0 / slip::encoded_len(&frame) as f64;
    eprintln!(
        "{n} frames of {MAX_PSDU} bytes through a pty in {elapsed:.2?}: {per_s:.0} frames/s, {:.1} MB/s, {:.0}x a 460800-baud line",
        per_s * MAX_PSDU as f64 / 1e6,
        per_s / line_rate
    );
    assert!(per_s > 10.0 * line_rate, "{per_s:.0} frames/s");
}
