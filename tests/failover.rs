//! A worker that never waits on the network: an agent with two broker URLs, the first
//! through a proxy that black-holes every byte (old and new connections: a path gone
//! silent). While the agent finds out (two heartbeats), gives the dead node up and sets its
//! links up on the other one, its queue workers keep turning: the longest turn of their
//! loops (the `loop_turn` histogram of the report, also in `agent status` and Prometheus)
//! stays under 100 ms, the TUN queue is drained (what cannot be sent is counted as
//! `broker_down`), and traffic resumes on the second node.

mod common;

use std::time::{Duration, Instant};

use common::nodes::Proxy;
use common::*;

#[test]
fn a_black_holed_node_never_stalls_the_workers_and_traffic_resumes_on_the_next() {
    if !system_ready("a_black_holed_node_never_stalls_the_workers_and_traffic_resumes_on_the_next") {
        return;
    }
    let proxy = Proxy::start(5672);
    let session = unique("fo");
    let (ns_a, ns_b) = (Netns::new(), Netns::new());
    let via_proxy = format!("amqp://guest:guest@127.0.0.1:{}/%2f?heartbeat=1", proxy.port);
    let direct = "amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=1";
    let mut a = AgentProc::spawn(
        &unique("foa"),
        &["--url", &via_proxy, "--url", direct, "--session", &session, "--netns", &ns_a.name, "--queues", "2", "--ipv4", "198.18.72.1/24"],
    );
    let mut b = AgentProc::spawn(&unique("fob"), &["--url", direct, "--session", &session, "--netns", &ns_b.name, "--ipv4", "198.18.72.2/24"]);
    wait_reachable(&ns_a, "198.18.72.2", Duration::from_secs(15)).unwrap_or_else(|| panic!("the pair never reached each other:\n{}\n{}", a.logs(), b.logs()));
    // Both of a's queues connect through the proxy (the second may still be connecting when
    // the first ping gets through).
    let since = Instant::now();
    while proxy.accepted.load(std::sync::atomic::Ordering::Relaxed) < 2 && since.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(proxy.accepted.load(std::sync::atomic::Ordering::Relaxed) >= 2, "a should be on the first node, through the proxy:\n{}", a.logs());

    // A flood into A's TUN the whole time: the workers must keep draining it.
    let flood = {
        let name = ns_a.name.clone();
        std::thread::spawn(move || {
            std::process::Command::new("ip")
                .args(["netns", "exec", &name, "ping", "-n", "-q", "-i", "0.002", "-w", "12", "-s", "1000", "198.18.72.2"])
                .output()
                .expect("ping flood")
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let frozen_at = std::time::SystemTime::now();
    let t0 = Instant::now();
    proxy.freeze();
    let back = first_reply_after(&ns_a, "198.18.72.2", frozen_at, Duration::from_secs(30));
    let back = back.unwrap_or_else(|| panic!("no reply within 30 s of the black hole:\n{}", a.logs()));
    eprintln!("failover: a ping answered {back:?} after the first node went silent (heartbeat 1 s; waited {:?})", t0.elapsed());
    let _ = flood.join();
    let (ok, out) = ping(&ns_a, "198.18.72.2", 3);
    assert!(ok, "traffic after the failover:\n{out}\n{}", a.logs());

    // Where the links are now: the second node, seen by `agent peers`' view of a's hello.
    let report = a.interrupt();
    let _ = b.interrupt();
    let max_turn_us = report["loop_turn"]["max_us"].as_u64().expect("the report has loop_turn");
    let turns = report["loop_turn"]["samples"].as_u64().unwrap_or(0);
    eprintln!(
        "failover: {turns} loop turns, p99 {} us, max {max_turn_us} us; reconnects {}; broker_down {}",
        report["loop_turn"]["p99_us"],
        report["reconnects"],
        drops(&report, "broker_down")
    );
    assert!(turns > 1000, "the workers hardly turned: {turns}");
    assert!(max_turn_us < 100_000, "a worker's loop stalled for {max_turn_us} us (the bound is 100 ms)");
    assert!(report["reconnects"].as_u64().unwrap_or(0) >= 2, "both links should have reconnected: {report}");
    assert!(drops(&report, "broker_down") > 0, "what the flood sent while the links were down should be counted: {report}");
    assert!(back < Duration::from_secs(20), "traffic resumed only after {back:?}");
}
