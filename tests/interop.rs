//! ioppytest interop over the real broker: an agent speaking the old JSON wire and a native
//! agent in one session behind `agent route`; and messages shaped exactly like the Python
//! agent's, published by the test itself, answered through the router.
//! Each test uses its own exchange so that concurrent routers never see each other.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn all_ok(checks: &[(&Netns, &str)], limit: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if checks.iter().all(|(ns, dst)| ns.exec(&["ping", "-n", "-c", "1", "-W", "1", dst]).status.success()) {
            return true;
        }
    }
    false
}

#[test]
fn old_wire_and_native_agents_talk_through_the_router() {
    if !system_ready("old_wire_and_native_agents_talk_through_the_router") {
        return;
    }
    let exchange = unique("tunbus.x");
    let (ns_old, ns_new) = (Netns::new(), Netns::new());
    let (old, new) = (unique("old"), unique("new"));
    let mut router = RouterProc::start(&exchange, &format!("--- !configuration\ntopology:\n  - link_id: link_01\n    nodes: [{old}, {new}]\n"));
    let mut a_old = AgentProc::start(
        &old,
        &[
            "--exchange",
            &exchange,
            "--wire",
            "ioppytest",
            "--netns",
            &ns_old.name,
            "--ipv4-address",
            "198.18.30.1",
            "--ipv6-prefix",
            "fd00:30",
            "--ipv6-host",
            "1",
        ],
    );
    let mut a_new = AgentProc::start(&new, &["--exchange", &exchange, "--netns", &ns_new.name, "--ipv4", "198.18.30.2/24", "--ipv6", "fd00:30::2/64"]);
    let checks = [(&ns_old, "198.18.30.2"), (&ns_old, "fd00:30::2"), (&ns_new, "198.18.30.1"), (&ns_new, "fd00:30::1")];
    assert!(all_ok(&checks, Duration::from_secs(20)), "no connectivity:\n--- router\n{}\n--- old\n{}\n--- new\n{}", router.logs(), a_old.logs(), a_new.logs());
    for (ns, dst) in checks {
        let (ok, out) = ping(ns, dst, 3);
        assert!(ok, "{out}");
    }
    // TCP both ways, checked byte for byte: native → old carries offloaded super-packets
    // (the router completes their checksums); old → native plain MTU-sized packets.
    let size = 8 * 1024 * 1024;
    let sink = tcp_sink(&ns_old.name, "198.18.30.1:5003".into(), 1);
    let sent = tcp_send(&ns_new.name, "198.18.30.1:5003".into(), size, 7).join().expect("send");
    assert_eq!(sink.join().expect("sink")[0], sent, "native → old transfer damaged:\n{}", router.logs());
    let sink = tcp_sink(&ns_new.name, "[fd00:30::2]:5004".into(), 1);
    let sent = tcp_send(&ns_old.name, "[fd00:30::2]:5004".into(), size, 8).join().expect("send");
    assert_eq!(sink.join().expect("sink")[0], sent, "old → native transfer damaged");

    let r_old = a_old.interrupt();
    let _ = a_new.interrupt();
    assert_eq!(r_old["drops"].as_array().map(|d| d.iter().filter(|x| x[0] == "malformed").count()), Some(0), "{r_old}");
    let counters = router.stop();
    assert!(counters["bridged_to_old"].as_u64().unwrap() > 100, "{counters}");
    assert!(counters["bridged_to_native"].as_u64().unwrap() > 100, "{counters}");
    assert_eq!(counters["agents_learned"], 1, "{counters}");
}

/// The captured Python agent message and the properties it is sent with.
/// A folder holding `ioppytest-agent`, a symlink to the agent; removed on drop.
struct DropIn(std::path::PathBuf);

impl DropIn {
    fn new() -> DropIn {
        let dir = std::env::temp_dir().join(unique("dropin"));
        std::fs::create_dir_all(&dir).expect("create the drop-in folder");
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_agent"), dir.join("ioppytest-agent")).expect("symlink ioppytest-agent");
        DropIn(dir)
    }

    fn program(&self) -> std::path::PathBuf {
        self.0.join("ioppytest-agent")
    }
}

impl Drop for DropIn {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An F-Interop script's command line, `ioppytest-agent connect --url … --exchange …
/// --name agent_1 --force-bootstrap`, run unchanged through the `ioppytest-agent` name (plus
/// `--netns`, to keep the test's interface in its own namespace): it speaks the old wire
/// with agent_1's default addresses, and pings a native agent through the router.
#[test]
fn the_ioppytest_agent_command_line_runs_unchanged() {
    if !system_ready("the_ioppytest_agent_command_line_runs_unchanged") {
        return;
    }
    let exchange = unique("tunbus.x");
    let (ns_old, ns_new) = (Netns::new(), Netns::new());
    let native = unique("nat");
    let dropin = DropIn::new();
    let mut router = RouterProc::start(&exchange, &format!("topology:\n  - link_id: l\n    nodes: [agent_1, {native}]\n"));
    let mut old =
        AgentProc::spawn_program(&dropin.program(), "agent_1", &["--url", URL, "--exchange", &exchange, "--force-bootstrap", "--netns", &ns_old.name], &[]);
    let mut new = AgentProc::start(&native, &["--exchange", &exchange, "--netns", &ns_new.name, "--ipv4", "10.2.0.2/24", "--ipv6", "bbbb::2/64"]);
    let checks = [(&ns_old, "10.2.0.2"), (&ns_old, "bbbb::2"), (&ns_new, "10.2.0.1"), (&ns_new, "bbbb::1")];
    assert!(
        all_ok(&checks, Duration::from_secs(20)),
        "no connectivity:\n--- router\n{}\n--- ioppytest-agent\n{}\n--- native\n{}",
        router.logs(),
        old.logs(),
        new.logs()
    );
    let r_old = old.interrupt();
    let _ = new.interrupt();
    assert!(r_old["tx_packets"].as_u64().unwrap_or(0) > 0, "{r_old}");
    let counters = router.stop();
    // The agent spoke the old wire: the router forwarded its JSON and learned it.
    assert!(counters["json_in"].as_u64().unwrap_or(0) > 0, "{counters}");
    assert_eq!(counters["agents_learned"], 1, "{counters}");
}

fn python_vector(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/../shared/vectors/ioppytest/{name}", env!("CARGO_MANIFEST_DIR"))).expect("vector")
}

#[test]
fn python_shaped_messages_reach_a_native_agent_and_are_answered() {
    if !system_ready("python_shaped_messages_reach_a_native_agent_and_are_answered") {
        return;
    }
    let exchange = unique("tunbus.x");
    let ns = Netns::new();
    let native = unique("nat");
    let mut router = RouterProc::start(&exchange, &format!("topology:\n  - link_id: l\n    nodes: [agent_1, {native}]\n"));
    // The native agent owns 10.2.0.2, the destination of the captured echo request.
    let mut agent = AgentProc::start(&native, &["--exchange", &exchange, "--netns", &ns.name, "--ipv4", "10.2.0.2/24"]);
    wait_reachable(&ns, "10.2.0.2", Duration::from_secs(10)).expect("agent up");
    std::thread::sleep(Duration::from_millis(500));

    let request_body = python_vector("packet-ipv4-icmp-echo.json");
    let mut request = Vec::new();
    tunbus::codec::ioppytest::decode_packet(&request_body, &mut request).expect("vector decodes");
    let mut c = bus_client();
    // Play agent_1: listen where the router sends to it, announce, send the ping.
    listen(&mut c, &exchange, &["toAgent.agent_1.ip.tun.packet.raw"]);
    let props = tunbus::amqp::IOPPYTEST_PROPERTIES;
    publish(&mut c, &exchange, "fromAgent.agent_1.ip.tun.started", &props, &python_vector("tun-started.json"));
    std::thread::sleep(Duration::from_millis(300)); // the router binds agent_1's addresses
    publish(&mut c, &exchange, "fromAgent.agent_1.ip.tun.packet.raw", &props, &request_body);
    let (_, content_type, reply) = next_delivery(&mut c, Duration::from_secs(10)).expect("an answer within 10 s");
    assert_eq!(content_type.as_deref(), Some("application/json"));
    c.close(Duration::from_secs(1));
    let mut answer = Vec::new();
    tunbus::codec::ioppytest::decode_packet(&reply, &mut answer).expect("reply is ioppytest JSON");
    let text = String::from_utf8_lossy(&reply);
    assert!(text.contains("\"_api_version\"") && text.contains("\"interface_name\"") && text.contains("\"timestamp\""), "{text}");
    // An ICMP echo reply 10.2.0.2 → 10.2.0.1 carrying the request's identifier, sequence and data.
    assert_eq!(answer.len(), request.len());
    assert_eq!(&answer[12..16], &request[16..20], "source is the request's destination");
    assert_eq!(&answer[16..20], &request[12..16], "destination is the request's source");
    assert_eq!(answer[20], 0, "ICMP echo reply");
    assert_eq!(&answer[24..], &request[24..], "identifier, sequence and payload echoed");
    let r = agent.interrupt();
    assert!(r["rx_packets"].as_u64().unwrap() >= 1, "{r}");
    let counters = router.stop();
    assert_eq!(counters["bridged_to_native"], 1, "{counters}");
    assert_eq!(counters["bridged_to_old"], 1, "{counters}");
}

#[test]
fn malformed_json_is_counted_by_router_and_agent() {
    if !system_ready("malformed_json_is_counted_by_router_and_agent") {
        return;
    }
    let exchange = unique("tunbus.x");
    let ns = Netns::new();
    let old = unique("old");
    let mut router = RouterProc::start(&exchange, &format!("topology:\n  - nodes: [{old}, peer]\n"));
    let mut agent = AgentProc::start(&old, &["--exchange", &exchange, "--wire", "ioppytest", "--netns", &ns.name, "--ipv4-address", "198.18.31.1"]);
    wait_reachable(&ns, "198.18.31.1", Duration::from_secs(10)).expect("agent up");
    std::thread::sleep(Duration::from_millis(500));
    let bad: Vec<&[u8]> = vec![
        b"",
        b"[1,2,3]",
        b"{\"data\": \"nope\"}",
        b"{\"data\": [1, 2, 256]}",
        b"{\"data\": [-1]}",
        b"{\"no_data\": 1}",
        b"{\"data\": [69, 0,",
        b"\xff\xfe garbage",
    ];
    let huge = format!("{{\"data\": [{}0]}}", "1, ".repeat(600_000));
    let mut c = bus_client();
    for (key, bodies) in [(format!("toAgent.{old}.ip.tun.packet.raw"), &bad), (format!("fromAgent.{old}.ip.tun.packet.raw"), &bad)] {
        for b in bodies.iter().copied().chain([huge.as_bytes()]) {
            publish(&mut c, &exchange, &key, &Default::default(), b);
        }
    }
    c.close(Duration::from_secs(1));
    std::thread::sleep(Duration::from_millis(800));
    assert!(agent.alive(), "agent died:\n{}", agent.logs());
    let r = agent.interrupt();
    assert_eq!(drops(&r, "malformed"), bad.len() as u64 + 1, "{r}");
    let counters = router.stop();
    assert_eq!(counters["malformed_json"], bad.len() as u64 + 1, "{counters}");
}
