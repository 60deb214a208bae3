//! A participant far from the broker (issue 28, docs/decisions/0031): an agent whose only
//! way to the real broker is a relay that holds every chunk 25 ms each way (a broker 50 ms
//! away) receives a TCP transfer from an agent next to the broker. Its consumer's window
//! grows past the configured 32 (the report says so), the near agent's does not, and every
//! byte arrives (SHA-256 equal). Speed is perf/far_broker.py's, not this test's.

mod common;

use std::time::Duration;

use common::nodes::Proxy;
use common::*;

#[test]
fn an_agent_far_from_the_broker_grows_its_window_and_carries_tcp_whole() {
    if !system_ready("an_agent_far_from_the_broker_grows_its_window_and_carries_tcp_whole") {
        return;
    }
    let proxy = Proxy::delayed(5672, Duration::from_millis(25));
    let far = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port);
    let session = unique("tbfar");
    let args = |url: &str| -> Vec<String> { ["--url", url, "--session", &session].iter().map(|s| s.to_string()).collect() };
    let mut p = Pair::spawn(66, &args(&far), &args(URL));
    let (ok, out) = ping(&p.ns_b, &p.v4[0], 3);
    assert!(ok, "{out}");
    assert!(out.contains("time=5") || out.contains("time=6") || out.contains("time=7"), "the far agent is not ~50 ms away:\n{out}");
    // From the near agent to the far one: the far agent consumes over the long path.
    let size = 64 * 1024 * 1024;
    let sink = tcp_sink(&p.ns_a.name, format!("{}:5001", p.v4[0]), 1);
    let sent = tcp_send(&p.ns_b.name, format!("{}:5001", p.v4[0]), size, 66).join().expect("sender");
    assert_eq!(sink.join().expect("sink"), vec![sent], "the transfer arrived damaged:\n{}", p.a.logs());
    let ra = p.a.interrupt();
    let rb = p.b.interrupt();
    let grown = ra["prefetch_grown"].as_u64().unwrap_or(0);
    assert!(grown >= 64, "the far agent's window did not grow (prefetch_grown {grown}): {ra}");
    assert_eq!(rb["prefetch_grown"].as_u64(), Some(0), "the near agent's window grew: {rb}");
    drop(proxy);
}
