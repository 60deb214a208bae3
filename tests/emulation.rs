//! Link emulation (`--emulate`), end to end: real agents in namespaces, real ping, UDP and
//! iperf3 through a real RabbitMQ; a seeded run of real agents replayed; and the replay of
//! a seeded packet sequence through the agent's own emulation code (`emulate::Links` and
//! its shapers), packet by packet.

mod common;

use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tunbus::emulate::{Emulation, Flow, Links};
use tunbus::route::{self, RoutingKey};

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
    // The same path with `delay 0ms` first: what the bus and the emulation's machinery
    // take on this machine (about 2.5 ms here), which the 40 ms come on top of.
    let p50_of = |spec: &str| {
        let pair = Pair::start(70, &["--emulate", spec]);
        let (_, text) = ping(&pair.ns_a, &pair.v4[1], 30);
        let rtt = rtts(&text);
        assert!(rtt.len() >= 28, "{spec}: replies:\n{text}");
        (median(rtt), text)
    };
    let (base, base_text) = p50_of("delay 0ms");
    assert!(base < 10.0, "delay 0ms: ping RTT p50 {base} ms:\n{base_text}");
    let (p50, text) = p50_of("delay 20ms");
    eprintln!("delay 20ms on both agents: ping RTT p50 {p50:.2} ms, {base:.2} ms with delay 0ms");
    assert!((38.0..=42.0).contains(&(p50 - base)), "ping RTT p50 {p50} ms, {base} ms with delay 0ms: expected 40 ± 2 ms more:\n{text}");
}

/// `--emulate-to B='delay 30ms'` on agent A: A learns B's addresses from B's hello (it
/// asks every 2 s until it knows them), then delays what it sends to B, not to C.
#[test]
fn emulate_to_one_peer_delays_that_peer_only() {
    if !system_ready("emulate_to_one_peer_delays_that_peer_only") {
        return;
    }
    let _alone = alone();
    let session = unique("to");
    let (b_name, c_name) = (unique("eb"), unique("ec"));
    let nss: Vec<Netns> = (0..3).map(|_| Netns::new()).collect();
    let addr = |i: usize| format!("198.18.74.{}", i + 1);
    let to = format!("{b_name}=delay 30ms");
    let start = |i: usize, name: &str, extra: &[&str]| {
        let v4 = format!("{}/24", addr(i));
        let mut args = vec!["--session", session.as_str(), "--netns", nss[i].name.as_str(), "--ipv4", v4.as_str()];
        args.extend_from_slice(extra);
        AgentProc::start(name, &args)
    };
    let _a = start(0, &unique("ea"), &["--emulate-to", &to]);
    let _b = start(1, &b_name, &[]);
    let _c = start(2, &c_name, &[]);
    for i in [1, 2] {
        assert!(wait_reachable(&nss[0], &addr(i), Duration::from_secs(15)).is_some(), "{} unreachable", addr(i));
    }
    // Until A has B's hello, B's packets are not delayed.
    let t0 = Instant::now();
    while rtts(&ping(&nss[0], &addr(1), 1).1).first().is_none_or(|rtt| *rtt < 25.0) {
        assert!(t0.elapsed() < Duration::from_secs(10), "A never learned B's addresses");
    }
    let to_b = median(rtts(&ping(&nss[0], &addr(1), 10).1));
    let to_c = median(rtts(&ping(&nss[0], &addr(2), 10).1));
    eprintln!("--emulate-to B='delay 30ms': ping B p50 {to_b:.2} ms, C {to_c:.2} ms");
    assert!((29.0..=36.0).contains(&to_b), "to B: RTT p50 {to_b} ms, expected 30 ms and the path's own");
    assert!(to_c < 10.0, "to C: RTT p50 {to_c} ms, expected no delay");
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

/// Pings `count` times from a to b (10 ms apart) through agents where only a emulates
/// `spec` with `seed` (both with `queues` queues); returns the sequence numbers that got
/// no reply. The agents are waited for over IPv6, another flow shard than the IPv4 pings
/// (asserted), so that the pings are the only packets of their stream: the same seed must
/// lose the same ones.
fn lost_pings(net: u8, spec: &str, seed: u64, queues: u32, count: u16) -> Vec<u16> {
    let (v4, v6) = ([format!("198.18.{net}.1"), format!("198.18.{net}.2")], [format!("fd00:{net:x}::1"), format!("fd00:{net:x}::2")]);
    let probe = |src: &str, dst: &str| {
        let (s, d): (IpAddr, IpAddr) = (src.parse().expect("ip"), dst.parse().expect("ip"));
        let p = match (s, d) {
            (IpAddr::V4(s), IpAddr::V4(d)) => [&[0x45, 0, 0, 28, 0, 0, 0, 0, 64, 1, 0, 0][..], &s.octets(), &d.octets(), &[8, 0, 0, 0, 0, 0, 0, 0]].concat(),
            (IpAddr::V6(s), IpAddr::V6(d)) => [&[0x60, 0, 0, 0, 0, 8, 58, 64][..], &s.octets(), &d.octets(), &[128, 0, 0, 0, 0, 0, 0, 0]].concat(),
            _ => unreachable!("one family"),
        };
        route::shard(route::flow_hash(&p))
    };
    assert_ne!(probe(&v4[0], &v4[1]), probe(&v6[0], &v6[1]), "pick addresses whose IPv4 and IPv6 pings are in different shards");
    let queues = queues.to_string();
    let seed = seed.to_string();
    let (ns_a, ns_b) = (Netns::new(), Netns::new());
    let session = unique("replay");
    let agent = |ns: &Netns, i: usize, extra: &[&str]| {
        let (a4, a6) = (format!("{}/24", v4[i]), format!("{}/64", v6[i]));
        let mut args = vec!["--url", URL, "--session", &session, "--netns", &ns.name, "--queues", &queues, "--ipv4", &a4, "--ipv6", &a6];
        args.extend_from_slice(extra);
        AgentProc::spawn(&ns.name, &args)
    };
    let a = agent(&ns_a, 0, &["--emulate", spec, "--emulate-seed", &seed]);
    let b = agent(&ns_b, 1, &[]);
    assert!(wait_reachable(&ns_a, &v6[1], Duration::from_secs(15)).is_some(), "agents never reachable:\n{}\n{}", a.logs(), b.logs());
    let out = ns_a.exec(&["ping", "-n", "-c", &count.to_string(), "-i", "0.01", "-W", "1", &v4[1]]);
    let answered: Vec<u16> =
        String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.split("icmp_seq=").nth(1)?.split(' ').next()?.parse().ok()).collect();
    (1..=count).filter(|s| !answered.contains(s)).collect()
}

#[test]
fn real_agents_replay_the_same_losses_with_the_same_seed() {
    if !system_ready("real_agents_replay_the_same_losses_with_the_same_seed") {
        return;
    }
    let _alone = alone();
    let spec = "loss 20%";
    let first = lost_pings(73, spec, 7, 2, 200);
    let again = lost_pings(73, spec, 7, 2, 200);
    eprintln!("loss 20%, seed 7: pings lost {first:?}, then {again:?}");
    assert!((20..=60).contains(&first.len()), "{} of 200 lost with 'loss 20%'", first.len());
    assert_eq!(first, again, "the same seed on the same pings loses the same ones");
    let one_queue = lost_pings(73, spec, 7, 1, 200);
    assert_eq!(first, one_queue, "decisions are per flow shard: the queue count does not change them");
    let other = lost_pings(73, spec, 8, 2, 200);
    assert_ne!(first, other, "another seed loses other pings");
}

/// One IPv4/UDP packet from source port `port`, with a virtio header in front, as the TUN
/// gives it; its payload is `i`.
fn entry(i: u32, port: u16) -> Vec<u8> {
    let mut e = vec![0u8; 10];
    let payload = i.to_be_bytes();
    let total = 20 + 8 + payload.len();
    let mut ip = vec![0x45, 0, 0, total as u8, 0, 0, 0x40, 0, 64, 17, 0, 0, 198, 18, 0, 1, 198, 18, 0, 2];
    ip.extend_from_slice(&port.to_be_bytes());
    ip.extend_from_slice(&[0x1f, 0x41, 0, 12, 0, 0]);
    ip.extend_from_slice(&payload);
    e.extend_from_slice(&ip);
    e
}

fn shard_of_port(port: u16) -> u8 {
    route::shard(route::flow_hash(&entry(0, port)[10..]))
}

/// Replays `n` packets, 100 µs apart, of UDP flows from source `ports` (packet i from
/// `ports[i mod len]`) through the shapers of `queues` queue workers for `spec` with
/// `seed`; packet i goes to worker (its flow shard mod `queues`), as the TUN steers flows.
/// Returns the indices of the dropped packets and the order they left in.
fn replay(spec: &str, seed: u64, n: u32, ports: &[u16], queues: usize) -> (Vec<u32>, Vec<u32>) {
    let emulation = Emulation { all: Some(spec.parse().expect("spec")), seed, ..Emulation::default() };
    let links = Arc::new(Links::new(emulation, 0));
    let mut shapers: Vec<_> = (0..queues).map(|_| links.shaper().expect("emulation is on")).collect();
    let dst = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2));
    let (mut dropped, mut order) = (Vec::new(), Vec::new());
    let mut sent = |e: &[u8]| order.push(u32::from_be_bytes(e[e.len() - 4..].try_into().expect("4 bytes")));
    for i in 0..n {
        let now = u64::from(i) * 100_000;
        let port = ports[i as usize % ports.len()];
        let e = entry(i, port);
        let shard = shard_of_port(port);
        let shaper = &mut shapers[usize::from(shard) % queues];
        if shaper.admit(&e, RoutingKey::unicast(dst, shard), Flow::unicast(dst, shard), now) > 0 {
            dropped.push(i);
        }
        for s in &mut shapers {
            s.release(now, |_, e| {
                sent(e);
                true
            });
        }
    }
    for s in &mut shapers {
        s.release(u64::MAX, |_, e| {
            sent(e);
            true
        });
    }
    (dropped, order)
}

#[test]
fn the_same_seed_replays_the_same_drops_and_order() {
    let spec = "delay 10ms 5ms loss 5% duplicate 1% reorder 5%";
    let (dropped, order) = replay(spec, 7, 10_000, &[8000], 1);
    assert!((400..600).contains(&dropped.len()), "{} of 10 000 dropped", dropped.len());
    let (again, order_again) = replay(spec, 7, 10_000, &[8000], 1);
    assert_eq!(dropped, again, "the same seed must drop the same packets");
    assert_eq!(order, order_again, "and deliver the rest in the same order, with the same duplicates");
    let reordered = order.windows(2).filter(|w| w[1] < w[0]).count();
    assert!(reordered > 100, "jitter and reorder move packets: {reordered}");
    let (other, _) = replay(spec, 8, 10_000, &[8000], 1);
    assert_ne!(dropped, other, "another seed must drop another set");
}

#[test]
fn decisions_are_per_flow_shard_whatever_the_queue_count() {
    let spec = "loss 5% duplicate 2%";
    let ports: Vec<u16> = (8000..8008).collect();
    let (one, _) = replay(spec, 3, 10_000, &ports, 1);
    for queues in [2, 4] {
        assert_eq!(replay(spec, 3, 10_000, &ports, queues).0, one, "8 flows over {queues} queues drop what they drop over one");
    }
    // A flow alone in its shard loses the same packets with 7 other flows beside it or alone.
    let k = ports.iter().position(|p| ports.iter().filter(|q| shard_of_port(**q) == shard_of_port(*p)).count() == 1).expect("a flow alone in its shard");
    let mixed: Vec<u32> = one.iter().filter(|i| **i as usize % 8 == k).map(|i| i / 8).collect();
    let (by_itself, _) = replay(spec, 3, 10_000 / 8, &ports[k..=k], 1);
    assert_eq!(mixed, by_itself, "flow {}'s drops with 7 other flows and alone", ports[k]);
}
