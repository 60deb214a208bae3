//! Link emulation (`--emulate`), end to end: real agents in namespaces, real ping, UDP and
//! iperf3 through a real RabbitMQ; and the replay of a seeded run through the agent's own
//! emulation code (`emulate::Links` and its shaper), packet by packet.

mod common;

use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tunbus::emulate::{Emulation, Links};
use tunbus::route::RoutingKey;

/// The system tests of this file run one at a time: a ping RTT checked to ±2 ms must not
/// share two cores with a 5000-datagram/s sender or an iperf3 run.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn alone() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

/// The round-trip times `ping` printed, in ms.
fn rtts(text: &str) -> Vec<f64> {
    text.lines().filter_map(|l| l.split("time=").nth(1)?.split(' ').next()?.parse().ok()).collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[test]
fn delay_on_both_agents_adds_up_in_the_round_trip() {
    if !system_ready("delay_on_both_agents_adds_up_in_the_round_trip") {
        return;
    }
    let _alone = alone();
    let pair = Pair::start(70, &["--emulate", "delay 20ms"]);
    let (_, text) = ping(&pair.ns_a, &pair.v4[1], 30);
    let rtt = rtts(&text);
    assert!(rtt.len() >= 28, "replies:\n{text}");
    let p50 = median(rtt);
    eprintln!("delay 20ms on both agents: ping RTT p50 {p50:.2} ms");
    assert!((38.0..=42.0).contains(&p50), "ping RTT p50 {p50} ms, expected 40 ± 2 ms:\n{text}");
}

#[test]
fn loss_five_percent_of_twenty_thousand_datagrams() {
    if !system_ready("loss_five_percent_of_twenty_thousand_datagrams") {
        return;
    }
    let _alone = alone();
    // Only the sender emulates: the loss is one way, on the datagrams.
    let pair = Pair::start_with(71, &["--emulate", "loss 5%", "--emulate-seed", "11"], &[]);
    const N: u32 = 20_000;
    let (dst, src) = (pair.v4[1].clone(), pair.v4[0].clone());
    let sink = in_netns(&pair.ns_b.name, move || {
        let s = UdpSocket::bind((dst.as_str(), 7001)).expect("bind the sink");
        s.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
        let mut seen = vec![false; N as usize];
        let mut buf = [0u8; 256];
        while let Ok(n) = s.recv(&mut buf) {
            if let Some(i) = buf.get(..n.min(4)).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes) {
                if let Some(slot) = seen.get_mut(i as usize) {
                    *slot = true;
                }
            }
        }
        seen.iter().filter(|s| **s).count()
    });
    std::thread::sleep(Duration::from_millis(300));
    let dst = pair.v4[1].clone();
    in_netns(&pair.ns_a.name, move || {
        let s = UdpSocket::bind((src.as_str(), 0)).expect("bind the source");
        let t0 = Instant::now();
        for i in 0..N {
            let mut datagram = [0u8; 100];
            datagram[..4].copy_from_slice(&i.to_be_bytes());
            s.send_to(&datagram, (dst.as_str(), 7001)).expect("send");
            // 5000 datagrams per second: the bus itself loses none.
            let due = Duration::from_micros(200 * u64::from(i));
            if let Some(wait) = due.checked_sub(t0.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    })
    .join()
    .expect("sender");
    let arrived = sink.join().expect("sink");
    let loss = 1.0 - arrived as f64 / f64::from(N);
    eprintln!("loss 5%: {arrived} of {N} datagrams arrived, measured loss {:.2} %", loss * 100.0);
    assert!((0.04..=0.06).contains(&loss), "measured loss {:.2} % over {N} datagrams, expected 5 ± 1 %", loss * 100.0);
    let mut a = pair.a;
    let report = a.interrupt();
    let emulated = drops(&report, "emulated");
    assert!(emulated >= u64::from(N - arrived as u32) * 9 / 10, "the sender counts what its link dropped: {emulated}\n{report}");
}

#[test]
fn rate_ten_mbit_caps_a_tcp_transfer() {
    if !system_ready("rate_ten_mbit_caps_a_tcp_transfer") {
        return;
    }
    let _alone = alone();
    if Command::new("iperf3").arg("--version").output().is_err() {
        panic!("iperf3 is not installed (apt-get install iperf3; the README's test command installs it)");
    }
    let pair = Pair::start_with(72, &["--emulate", "rate 10mbit"], &[]);
    let mut server = Command::new("ip")
        .args(["netns", "exec", &pair.ns_b.name, "iperf3", "-s", "-1", "-B", &pair.v4[1], "-p", "5211"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("iperf3 server");
    std::thread::sleep(Duration::from_millis(500));
    let out = pair.ns_a.exec(&["iperf3", "-c", &pair.v4[1], "-B", &pair.v4[0], "-p", "5211", "-t", "8", "-J"]);
    let _ = server.kill();
    let _ = server.wait();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("iperf3 -J: {e}: {}", String::from_utf8_lossy(&out.stdout)));
    let mbit = json["end"]["sum_received"]["bits_per_second"].as_f64().expect("received rate") / 1e6;
    eprintln!("rate 10mbit: iperf3 TCP received {mbit:.2} Mbit/s");
    assert!((8.0..=10.5).contains(&mbit), "iperf3 TCP through 'rate 10mbit': {mbit:.2} Mbit/s, expected 8 to 10.5");
}

/// One IPv4/UDP packet with a virtio header in front, as the TUN gives it.
fn entry(i: u32) -> Vec<u8> {
    let mut e = vec![0u8; 10];
    let payload = i.to_be_bytes();
    let total = 20 + 8 + payload.len();
    let mut ip = vec![0x45, 0, 0, total as u8, 0, 0, 0x40, 0, 64, 17, 0, 0, 198, 18, 0, 1, 198, 18, 0, 2];
    ip.extend_from_slice(&[0x1f, 0x40, 0x1f, 0x41, 0, 12, 0, 0]);
    ip.extend_from_slice(&payload);
    e.extend_from_slice(&ip);
    e
}

/// Replays `n` packets, 100 µs apart, through queue worker 0's shaper for `spec` with
/// `seed`; returns the indices of the dropped packets and the order they left in.
fn replay(spec: &str, seed: u64, n: u32) -> (Vec<u32>, Vec<u32>) {
    let emulation = Emulation { all: Some(spec.parse().expect("spec")), seed, ..Emulation::default() };
    let links = Arc::new(Links::new(emulation, 0));
    let mut shaper = links.shaper(0).expect("emulation is on");
    let key = RoutingKey::unicast(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)), 0);
    let dst = Some(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)));
    let (mut dropped, mut order) = (Vec::new(), Vec::new());
    let mut sent = |e: &[u8]| order.push(u32::from_be_bytes(e[e.len() - 4..].try_into().expect("4 bytes")));
    for i in 0..n {
        let now = u64::from(i) * 100_000;
        if shaper.admit(&entry(i), key, dst, now) > 0 {
            dropped.push(i);
        }
        shaper.release(now, |_, e| {
            sent(e);
            true
        });
    }
    shaper.release(u64::MAX, |_, e| {
        sent(e);
        true
    });
    (dropped, order)
}

#[test]
fn the_same_seed_replays_the_same_drops_and_order() {
    let spec = "delay 10ms 5ms loss 5% duplicate 1% reorder 5%";
    let (dropped, order) = replay(spec, 7, 10_000);
    assert!((400..600).contains(&dropped.len()), "{} of 10 000 dropped", dropped.len());
    let (again, order_again) = replay(spec, 7, 10_000);
    assert_eq!(dropped, again, "the same seed must drop the same packets");
    assert_eq!(order, order_again, "and deliver the rest in the same order, with the same duplicates");
    let reordered = order.windows(2).filter(|w| w[1] < w[0]).count();
    assert!(reordered > 100, "jitter and reorder move packets: {reordered}");
    let (other, _) = replay(spec, 8, 10_000);
    assert_ne!(dropped, other, "another seed must drop another set");
}
