//! Hostile or broken brokers never crash an agent: a fake broker plays one misbehaviour per
//! connection (frames over the negotiated size, a body before its header, a body longer
//! than announced, garbage, `frame_max` 8, a handshake trickled a byte every 3 s). The
//! agent closes each connection with a protocol error, reconnects, lives on, and exits 0 on
//! SIGINT within 2 s, even in the middle of a trickle.

mod common;

use std::time::{Duration, Instant};

use common::fake_broker::{FakeBroker, Scenario};
use common::*;

#[test]
fn hostile_brokers_are_survived_and_ctrl_c_is_prompt() {
    if !system_ready("hostile_brokers_are_survived_and_ctrl_c_is_prompt") {
        return;
    }
    use Scenario::*;
    let script = vec![FrameTooLarge, BodyBeforeHeader, BodyOverrun, Garbage, TinyFrameMax, Trickle, Good];
    let fake = FakeBroker::start(script.clone());
    let ns = Netns::new();
    let url = fake.url();
    let mut agent = AgentProc::spawn_env(
        &unique("hostile"),
        &["--url", &url, "--netns", &ns.name, "--ipv4", "198.18.48.1/24"],
        &[("RUST_LOG", "info,tunbus::amqp=debug,tunbus::worker=debug")],
    );
    let t0 = Instant::now();
    while !fake.consuming.lock().expect("lock").contains(&Good) {
        assert!(agent.alive(), "the agent exited:\n{}", agent.logs());
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the agent never got through the script; played {:?}:\n{}",
            fake.played.lock().expect("lock"),
            agent.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("hostile: through {} scenarios in {:.1} s", script.len(), t0.elapsed().as_secs_f64());
    let logs = agent.logs();
    for says in [
        "exceeds the negotiated",
        "no content header had come",
        "body bytes for a message of 3",
        "without its end octet",
        "below AMQP's minimum",
        "did not answer in time",
    ] {
        assert!(logs.contains(says), "no protocol error saying {says:?}:\n{logs}");
    }
    assert!(!logs.contains("panicked"), "{logs}");
    let (status, took) = agent.stop_with(libc::SIGINT, Duration::from_secs(5));
    assert!(status.is_some_and(|s| s.success()), "exit after SIGINT: {status:?}\n{}", agent.logs());
    assert!(took < Duration::from_secs(2), "SIGINT took {took:?}");

    // Ctrl-C while the very first handshake is being trickled: out within 2 s, exit 0,
    // nothing left behind.
    let trickle = FakeBroker::start(vec![Trickle]);
    let ns2 = Netns::new();
    let url = trickle.url();
    let mut agent = AgentProc::spawn(&unique("trickled"), &["--url", &url, "--netns", &ns2.name, "--ipv4", "198.18.48.2/24"]);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(agent.alive(), "{}", agent.logs());
    let (status, took) = agent.stop_with(libc::SIGINT, Duration::from_secs(5));
    assert!(status.is_some_and(|s| s.success()), "exit after SIGINT during the handshake: {status:?}\n{}", agent.logs());
    assert!(took < Duration::from_secs(2), "SIGINT during a trickled handshake took {took:?}");
    let links = ns2.exec(&["ip", "-o", "link"]);
    assert!(!String::from_utf8_lossy(&links.stdout).contains("tb0"));
}
