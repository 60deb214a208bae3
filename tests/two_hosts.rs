//! Two agents in two namespaces over the real broker: ping, TCP integrity, multi-queue
//! flows, malformed input, clean shutdown.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

#[test]
fn ping_ipv4_and_ipv6_and_peers() {
    if !system_ready("ping_ipv4_and_ipv6_and_peers") {
        return;
    }
    let mut p = Pair::start(1, &["--queues", "2"]);
    let (ok4, out4) = ping(&p.ns_a, &p.v4[1], 5);
    assert!(ok4, "IPv4 ping failed:\n{out4}\n{}", p.a.logs());
    let (ok6, out6) = ping(&p.ns_b, &p.v6[0], 5);
    assert!(ok6, "IPv6 ping failed:\n{out6}\n{}", p.b.logs());

    let peers = Command::new(env!("CARGO_BIN_EXE_agent")).args(["peers", "--url", URL, "--json", "--wait", "1"]).output().expect("agent peers runs");
    let text = String::from_utf8_lossy(&peers.stdout);
    for agent in [&p.a.name, &p.b.name] {
        let line = text.lines().find(|l| l.contains(&format!("\"name\":\"{agent}\""))).unwrap_or_else(|| panic!("{agent} missing from peers:\n{text}"));
        assert!(line.contains("\"queues\":2"), "{line}");
    }

    let ra = p.a.interrupt();
    let rb = p.b.interrupt();
    assert!(ra["rx_packets"].as_u64().unwrap() >= 10, "{ra}");
    assert!(rb["rx_packets"].as_u64().unwrap() >= 10, "{rb}");
    assert_eq!(drops(&ra, "malformed") + drops(&rb, "malformed"), 0);
}

#[test]
fn tcp_200_mb_arrives_intact() {
    if !system_ready("tcp_200_mb_arrives_intact") {
        return;
    }
    let p = Pair::start(2, &[]);
    let size = 200 * 1024 * 1024;
    let sink = tcp_sink(&p.ns_b.name, format!("{}:5001", p.v4[1]), 1);
    let sent = tcp_send(&p.ns_a.name, format!("{}:5001", p.v4[1]), size, 42).join().expect("sender");
    let got = sink.join().expect("sink");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].bytes, size, "length differs:\n{}", p.b.logs());
    assert_eq!(got[0], sent, "SHA-256 differs");
}

#[test]
fn eight_flows_over_four_queues_arrive_intact() {
    if !system_ready("eight_flows_over_four_queues_arrive_intact") {
        return;
    }
    let mut p = Pair::start(3, &["--queues", "4"]);
    let flows = 8;
    let size = 16 * 1024 * 1024;
    // IPv6 this time, so both families carry bulk traffic.
    let sink = tcp_sink(&p.ns_b.name, format!("[{}]:5002", p.v6[1]), flows);
    let senders: Vec<_> = (0..flows).map(|i| tcp_send(&p.ns_a.name, format!("[{}]:5002", p.v6[1]), size, 1000 + i as u64)).collect();
    let mut sent: Vec<_> = senders.into_iter().map(|s| s.join().expect("sender")).collect();
    let mut got = sink.join().expect("sink");
    // Accept order need not match connect order: compare as sets.
    sent.sort_by_key(|d| d.sha256);
    got.sort_by_key(|d| d.sha256);
    assert_eq!(got, sent, "some flow arrived damaged:\n{}", p.b.logs());
    let rb = p.b.interrupt();
    assert!(rb["rx_bytes"].as_u64().unwrap() >= (flows as u64) * size, "{rb}");
}

/// Publishes raw bodies straight onto an agent's queue through the default exchange.
fn publish_raw(queue: &str, bodies: Vec<Vec<u8>>) {
    let mut c = bus_client();
    for body in bodies {
        publish(&mut c, "", queue, &Default::default(), &body);
    }
    c.close(Duration::from_secs(1));
}

fn header(version: u8, flags: u8, count: u16) -> Vec<u8> {
    let mut h = b"TB".to_vec();
    h.push(version);
    h.push(flags);
    h.extend_from_slice(&count.to_be_bytes());
    h.extend_from_slice(&[0; 2 + 8 + 8]);
    h
}

#[test]
fn malformed_messages_are_counted_and_forwarding_goes_on() {
    if !system_ready("malformed_messages_are_counted_and_forwarding_goes_on") {
        return;
    }
    let mut p = Pair::start(4, &[]);
    let mut bodies = Vec::new();
    bodies.push(Vec::new()); // empty
    bodies.push(b"TB".to_vec()); // truncated header
    bodies.push({
        let mut b = header(1, 0, 1);
        b[0] = b'X';
        b
    }); // wrong magic
    bodies.push(header(9, 0, 0)); // unknown version
    bodies.push(header(1, 0x80, 0)); // unknown flag
    bodies.push({
        let mut b = header(1, 0, 1);
        b.extend_from_slice(&1000u32.to_be_bytes());
        b.extend_from_slice(&[0x45; 10]);
        b
    }); // length lies
    bodies.push({
        let mut b = header(1, 0, 3);
        b.extend_from_slice(&4u32.to_be_bytes());
        b.extend_from_slice(&[0x45; 4]);
        b
    }); // count lies
    bodies.push({
        let mut b = header(1, 0, 1);
        b.extend_from_slice(&u32::MAX.to_be_bytes());
        b
    }); // absurd length
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for len in [1usize, 23, 24, 25, 100, 1500, 70_000] {
        let mut b = Vec::with_capacity(len);
        for _ in 0..len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.push(x as u8);
        }
        bodies.push(b); // random bytes
    }
    bodies.push(vec![0xAB; 4 * 1024 * 1024]); // huge
    let bad = bodies.len() as u64;
    publish_raw(&format!("tunbus.{}.0", p.b.name), bodies);

    std::thread::sleep(Duration::from_millis(500));
    assert!(p.b.alive(), "agent died on malformed input:\n{}", p.b.logs());
    let (ok, out) = ping(&p.ns_a, &p.v4[1], 3);
    assert!(ok, "ping after malformed input failed:\n{out}\n{}", p.b.logs());
    let rb = p.b.interrupt();
    assert_eq!(drops(&rb, "malformed"), bad, "{rb}");
}

#[test]
fn ctrl_c_leaves_nothing_behind() {
    if !system_ready("ctrl_c_leaves_nothing_behind") {
        return;
    }
    // One agent in the root namespace (unique interface name), one moved into a namespace.
    let ns = Netns::new();
    let root_if = unique("tbr");
    let root_name = unique("root");
    let mut root = AgentProc::start(&root_name, &["--ifname", &root_if, "--queues", "2", "--ipv4", "198.18.5.1/24"]);
    let mut moved = AgentProc::start(&ns.name, &["--netns", &ns.name, "--queues", "2", "--ipv4", "198.18.5.2/24"]);
    wait_reachable(&ns, "198.18.5.1", Duration::from_secs(15)).unwrap_or_else(|| panic!("not reachable:\n{}", moved.logs()));
    assert!(std::path::Path::new("/sys/class/net").join(&root_if).exists());

    for (agent, signal) in [(&mut root, libc::SIGINT), (&mut moved, libc::SIGTERM)] {
        let (status, took) = agent.stop_with(signal, Duration::from_secs(5));
        assert!(status.map(|s| s.success()).unwrap_or(false), "exit status {status:?}:\n{}", agent.logs());
        assert!(took < Duration::from_secs(2), "shutdown took {took:?}");
    }
    assert!(!std::path::Path::new("/sys/class/net").join(&root_if).exists(), "root interface left behind");
    let links = String::from_utf8_lossy(&ns.exec(&["ip", "-o", "link"]).stdout).into_owned();
    assert!(!links.contains("tb0"), "interface left in namespace: {links}");
    let queues = run("rabbitmqctl", &["list_queues", "-q", "name"]);
    for name in [&root_name, &ns.name] {
        assert!(!queues.contains(&format!("tunbus.{name}.")), "queue of {name} left behind:\n{queues}");
    }
}

#[test]
fn bad_flags_give_one_line_and_nonzero_exit() {
    for args in [
        vec!["connect", "--name", "bad.name"],
        vec!["connect", "--name", "ok", "--ipv4", "fd00::1/64"],
        vec!["connect", "--name", "ok", "--queues", "0"],
        vec!["connect", "--name", "ok", "--url", "http://nope"],
        vec!["connect"],
        vec!["frobnicate"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_agent")).args(&args).output().expect("runs");
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.to_lowercase().contains("error"), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    }
}

#[test]
fn a_name_already_on_the_bus_is_refused_clearly() {
    if !system_ready("a_name_already_on_the_bus_is_refused_clearly") {
        return;
    }
    let ns = Netns::new();
    let ns2 = Netns::new();
    let _first = AgentProc::start(&ns.name, &["--netns", &ns.name, "--ipv4", "198.18.7.1/24"]);
    wait_reachable(&ns, "198.18.7.1", Duration::from_secs(10)).expect("own address answers");
    std::thread::sleep(Duration::from_millis(500)); // let its link declare the queue
    let t0 = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(["connect", "--url", URL, "--name", &ns.name, "--netns", &ns2.name, "--ipv4", "198.18.7.2/24"])
        .output()
        .expect("runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(8), "a taken name has exit code 8:\n{err}");
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert!(err.contains("already in use"), "{err}");
    let links = String::from_utf8_lossy(&ns2.exec(&["ip", "-o", "link"]).stdout).into_owned();
    assert!(!links.contains("tb0"), "refused agent left an interface: {links}");
}

#[test]
fn metrics_endpoint_counts_what_crossed() {
    if !system_ready("metrics_endpoint_counts_what_crossed") {
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("free port").local_addr().expect("addr").port();
    let port_text = port.to_string();
    let p = Pair::start_with(8, &["--metrics-addr", &port_text], &[]);
    let (ok, out) = ping(&p.ns_a, &p.v4[1], 10);
    assert!(ok, "{out}");
    // A scraper that connects and says nothing holds no other (it is dropped after 2 s).
    let _silent = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint listens");
    let asked = std::time::Instant::now();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint listens");
    use std::io::{Read, Write};
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").expect("request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("response");
    assert!(text.starts_with("HTTP/1.0 200"), "{text}");
    assert!(asked.elapsed() < Duration::from_millis(1500), "the scrape waited for the silent client: {:?}", asked.elapsed());
    let value = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name) && !l.starts_with('#'))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
    };
    // Each echo request left A and each reply came back (plus whatever the kernel sent).
    assert!(value("tunbus_tx_packets_total{") >= 10.0, "{text}");
    assert!(value("tunbus_rx_packets_total{") >= 10.0, "{text}");
    assert!(value("tunbus_one_way_latency_seconds_count{") >= 10.0, "{text}");
    assert!(value("tunbus_one_way_latency_seconds_bucket{") <= value("tunbus_one_way_latency_seconds_count{"), "{text}");
    assert_eq!(value("tunbus_link_connected{"), 1.0, "{text}");
    assert_eq!(value("tunbus_build_info{"), 1.0, "{text}");
}

#[test]
fn a_dead_worker_ends_the_agent_with_its_exit_code() {
    if !system_ready("a_dead_worker_ends_the_agent_with_its_exit_code") {
        return;
    }
    let ns = Netns::new();
    let mut agent = AgentProc::spawn_env(
        &unique("dies"),
        &["--url", URL, "--netns", &ns.name, "--ipv4", "198.18.9.1/24", "--queues", "2"],
        &[("TUNBUS_FAULT", "worker-panic")],
    );
    let (status, took) = agent.wait_exit(Duration::from_secs(10)).unwrap_or_else(|| panic!("the agent lived on with a dead worker:\n{}", agent.logs()));
    assert_eq!(status.code(), Some(10), "exit code of an agent whose worker died:\n{}", agent.logs());
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(agent.logs().contains("queue worker 0"), "{}", agent.logs());
    let links = ns.exec(&["ip", "-o", "link"]);
    assert!(!String::from_utf8_lossy(&links.stdout).contains("tb0"), "interface left behind");
}

/// `agent status` against two running agents: their links and nodes, peers, and the same
/// counters `--stats-json` reports at exit for the same traffic; the sockets go with them.
#[test]
fn status_shows_links_peers_and_the_counters_of_the_exit_report() {
    if !system_ready("status_shows_links_peers_and_the_counters_of_the_exit_report") {
        return;
    }
    let dir = std::env::temp_dir().join(unique("status"));
    let dir_text = dir.display().to_string();
    let mut p = Pair::start(41, &["--status-dir", &dir_text, "--queues", "2"]);
    let (ok, out) = ping(&p.ns_a, &p.v4[1], 10);
    assert!(ok, "{out}");
    let status = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_agent")).arg("status").args(args).args(["--dir", &dir_text]).output().expect("agent status");
    let out = status(&["--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let all: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(all.len(), 2, "{all:?}");
    let of = |name: &str| all.iter().find(|s| s["agent"] == name).cloned().unwrap_or_else(|| panic!("no status of {name}: {all:?}"));
    let (sa, sb) = (of(&p.a.name), of(&p.b.name));
    for s in [&sa, &sb] {
        let queues = s["queues"].as_array().expect("queues");
        assert_eq!(queues.len(), 2, "{s}");
        assert!(
            queues.iter().all(|q| q["connected"] == true && q["node"].as_str().is_some_and(|n| n.contains("127.0.0.1:5672") && !n.contains(":guest@"))),
            "{s}"
        );
        assert_eq!(s["identity"], "first-claim", "{s}");
    }
    let heard: Vec<String> = sa["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .flat_map(|p| p["addresses"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect();
    assert!(heard.contains(&format!("{}/32", p.v4[1])), "a has not heard b: {heard:?}");
    let text = String::from_utf8_lossy(&status(&[&p.a.name]).stdout).into_owned();
    assert!(
        text.contains(&format!("agent: {}", p.a.name))
            && text.contains("queue 1: connected to amqp://guest:***@127.0.0.1:5672")
            && text.contains("latency: p50"),
        "{text}"
    );

    let (ra, rb) = (p.a.interrupt(), p.b.interrupt());
    // The same traffic: the exit report has what status had, plus at most what the kernel
    // sent on its own in between (neighbour discovery, MLD), and what a peer sent after
    // its bye as it left (counted as spoofed: nobody vouches for it any more).
    let drops = |r: &serde_json::Value| -> std::collections::BTreeMap<String, u64> {
        r["drops"].as_array().into_iter().flatten().filter_map(|d| Some((d[0].as_str()?.to_owned(), d[1].as_u64()?))).collect()
    };
    for (live, exit) in [(&sa["report"], &ra), (&sb["report"], &rb)] {
        for key in ["tx_packets", "rx_packets"] {
            let (l, e) = (live[key].as_u64().expect("live count"), exit[key].as_u64().expect("exit count"));
            assert!(l >= 10 && e >= l && e - l <= 10, "{key}: status {l}, exit report {e}");
        }
        let (l, e) = (drops(live), drops(exit));
        for (reason, n) in &l {
            assert!(e.get(reason).is_some_and(|m| m >= n), "{reason}: status {n}, exit report {:?}", e.get(reason));
        }
        assert!(e.values().sum::<u64>() - l.values().sum::<u64>() <= 10, "drops: status {l:?}, exit report {e:?}");
    }
    assert!(!dir.join(format!("{}.sock", p.a.name)).exists(), "socket left behind");
    assert!(String::from_utf8_lossy(&status(&[]).stdout).contains("no agents running"));
    assert_eq!(status(&[&p.a.name]).status.code(), Some(9));
    let _ = std::fs::remove_dir_all(&dir);
}
