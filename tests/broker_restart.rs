//! The broker goes away mid-session and comes back: the agents live on and traffic resumes.
//! Its own test binary, because it restarts the shared broker (cargo runs test binaries one
//! after the other).

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn broker_restart_traffic_resumes_within_5_s() {
    if !system_ready("broker_restart_traffic_resumes_within_5_s") {
        return;
    }
    let mut p = Pair::start(6, &["--queues", "2"]);
    let (ok, out) = ping(&p.ns_a, &p.v4[1], 3);
    assert!(ok, "{out}");

    run("rabbitmqctl", &["stop_app"]);
    std::thread::sleep(Duration::from_secs(1));
    // While the broker is down, packets are dropped (and counted); the agents stay up.
    let (ok_down, _) = ping(&p.ns_a, &p.v4[1], 2);
    run("rabbitmqctl", &["start_app"]);
    run("rabbitmqctl", &["await_startup"]);
    let back = Instant::now();
    assert!(!ok_down, "ping succeeded with the broker stopped?");
    assert!(p.a.alive() && p.b.alive(), "an agent exited:\n{}\n{}", p.a.logs(), p.b.logs());

    // Every link must be back: IPv4 one way and IPv6 the other, on flows that hash to
    // different queues, all answering.
    loop {
        let v4 = p.ns_a.exec(&["ping", "-n", "-c", "1", "-W", "1", &p.v4[1]]).status.success();
        let v6 = p.ns_b.exec(&["ping", "-n", "-c", "1", "-W", "1", &p.v6[0]]).status.success();
        if v4 && v6 {
            break;
        }
        assert!(back.elapsed() < Duration::from_secs(10), "no traffic after restart:\n{}\n{}", p.a.logs(), p.b.logs());
    }
    let since_back = back.elapsed();
    assert!(since_back < Duration::from_secs(5), "traffic resumed {since_back:?} after the broker was back");
    for (ns, dst) in [(&p.ns_a, &p.v4[1]), (&p.ns_b, &p.v6[0]), (&p.ns_a, &p.v6[1]), (&p.ns_b, &p.v4[0])] {
        let (ok, out) = ping(ns, dst, 3);
        assert!(ok, "after restart:\n{out}");
    }

    let ra = p.a.interrupt();
    assert!(ra["reconnects"].as_u64().unwrap() >= 1, "{ra}");
    assert!(drops(&ra, "broker_down") + drops(&ra, "ring_full") >= 1, "drops while down were not counted: {ra}");
    let logs = p.a.logs();
    assert_eq!(logs.matches("lost the broker").count(), 1, "expected one loss line:\n{logs}");
    assert_eq!(logs.matches("broker is back").count(), 1, "expected one recovery line:\n{logs}");
}
