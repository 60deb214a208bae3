//! A broker like the ones interop platforms run: TLS, users, vhosts, liveness, alarms.
//!
//! One private RabbitMQ node serves every step (starting one takes seconds): a plain and a
//! TLS listener with certificates made at test time, EXTERNAL login by certificate. Each
//! step is a function; the test runs them all and reports every one that failed, and the
//! node goes when the test ends, also on failure.
//!
//! - TLS with passwords, and with certificate login: IPv4 and IPv6 ping and 100 MB of TCP
//!   whose SHA-256 matches.
//! - Clear failures at start: wrong CA, wrong password, unknown vhost, nothing listening,
//!   each its exit code within 10 s, nothing left behind, no password in any output.
//! - A password from a URL file.
//! - Half-open path: a proxy that black-holes everything; the loss is noticed within two
//!   heartbeats, and ping is back within 5 s of the path healing.
//! - SIGKILL, then the same name again at once.
//! - A memory alarm during traffic: no connection torn down, traffic back within 2 s.

mod common;

use std::panic::AssertUnwindSafe;
use std::process::Command;
use std::time::{Duration, Instant};

use common::nodes::{Proxy, TestNode};
use common::*;

const PASSWORD: &str = "s3cr3t-Pa55word";

fn tls_url(node: &TestNode, user: &str, vhost: &str) -> String {
    format!("amqps://{user}:{PASSWORD}@localhost:{}/{vhost}", node.tls_port)
}

fn plain_url(node: &TestNode, user: &str, port: u16) -> String {
    let _ = node;
    format!("amqp://{user}:{PASSWORD}@127.0.0.1:{port}/lab")
}

/// 100 MB from a to b over IPv4, and ping both ways over both families.
fn carries_traffic(p: &mut Pair) {
    let (ok4, out4) = ping(&p.ns_a, &p.v4[1], 3);
    assert!(ok4, "IPv4 ping failed:\n{out4}\n{}\n{}", p.a.logs(), p.b.logs());
    let (ok6, out6) = ping(&p.ns_b, &p.v6[0], 3);
    assert!(ok6, "IPv6 ping failed:\n{out6}\n{}\n{}", p.a.logs(), p.b.logs());
    let size = 100 * 1024 * 1024;
    let sink = tcp_sink(&p.ns_b.name, format!("{}:5001", p.v4[1]), 1);
    let sent = tcp_send(&p.ns_a.name, format!("{}:5001", p.v4[1]), size, 7).join().expect("sender");
    let got = sink.join().expect("sink");
    assert_eq!(got[0], sent, "the 100 MB arrived changed:\n{}", p.b.logs());
}

fn tls_with_passwords(node: &TestNode) {
    node.add_user("tls1", Some(PASSWORD), "lab");
    let ca = node.certs.ca.display().to_string();
    let args =
        |u: &str| vec!["--url".to_owned(), format!("{}?heartbeat=5", tls_url(node, u, "lab")), "--tls-ca".into(), ca.clone(), "--queues".into(), "2".into()];
    let mut p = Pair::spawn(41, &args("tls1"), &args("tls1"));
    carries_traffic(&mut p);
    let logs = p.a.logs() + &p.b.logs();
    assert!(!logs.contains(PASSWORD), "a password was printed:\n{logs}");
    let conns = node.ctl(&["list_connections", "-q", "user", "ssl", "auth_mechanism"]);
    assert!(
        conns.lines().filter(|l| l.contains("tls1") && l.contains("true") && l.contains("PLAIN")).count() >= 4,
        "expected 4 TLS connections of tls1:\n{conns}"
    );
    let (ra, rb) = (p.a.interrupt(), p.b.interrupt());
    assert_eq!(drops(&ra, "malformed") + drops(&rb, "malformed"), 0);
}

fn tls_with_certificates(node: &TestNode) {
    for u in ["cert-a", "cert-b"] {
        node.add_user(u, None, "lab");
    }
    let args = |u: &str| {
        let (cert, key) = node.certs.client(u);
        vec![
            "--url".to_owned(),
            format!("amqps://localhost:{}/lab", node.tls_port),
            "--tls-ca".into(),
            node.certs.ca.display().to_string(),
            "--tls-cert".into(),
            cert.display().to_string(),
            "--tls-key".into(),
            key.display().to_string(),
        ]
    };
    let mut p = Pair::spawn(42, &args("cert-a"), &args("cert-b"));
    carries_traffic(&mut p);
    let conns = node.ctl(&["list_connections", "-q", "user", "auth_mechanism"]);
    for u in ["cert-a", "cert-b"] {
        assert!(conns.lines().any(|l| l.contains(u) && l.contains("EXTERNAL")), "{u} did not log in by certificate:\n{conns}");
    }
    p.a.interrupt();
    p.b.interrupt();
}

/// Starts an agent that must fail: its exit code, how long it took, and its output.
fn failing_start(name: &str, args: &[&str], env: &[(&str, &str)]) -> (i32, Duration, String, Netns) {
    let ns = Netns::new();
    let mut all = vec!["--netns", ns.name.as_str(), "--ipv4", "198.18.43.1/24"];
    all.extend_from_slice(args);
    let mut agent = AgentProc::spawn_env(name, &all, env);
    let (status, took) = agent.wait_exit(Duration::from_secs(15)).unwrap_or_else(|| panic!("{name} did not exit within 15 s:\n{}", agent.logs()));
    let code = status.code().unwrap_or(-1);
    let logs = agent.logs();
    let links = ns.exec(&["ip", "-o", "link"]);
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(!links.contains("tb0"), "{name} left its interface behind:\n{links}");
    (code, took, logs, ns)
}

fn clear_failures_at_start(node: &TestNode) {
    node.add_user("fail1", Some(PASSWORD), "lab");
    let ca = node.certs.ca.display().to_string();
    let wrong_ca = node.certs.wrong_ca.display().to_string();
    let before = node.queues("lab");
    let dead_port = tunbus::lab::broker::free_tcp_port().expect("port");
    let cases: Vec<(&str, Vec<String>, i32, &str)> = vec![
        ("wrong CA", vec!["--url".into(), tls_url(node, "fail1", "lab"), "--tls-ca".into(), wrong_ca], 4, "certificate"),
        ("no CA given (system roots)", vec!["--url".into(), tls_url(node, "fail1", "lab")], 4, "tls-ca"),
        ("plain AMQP to the TLS port", vec!["--url".into(), format!("amqp://fail1:{PASSWORD}@127.0.0.1:{}/lab", node.tls_port)], 1, "amqps"),
        (
            "wrong password",
            vec!["--url".into(), format!("amqps://fail1:wrong-{PASSWORD}@localhost:{}/lab", node.tls_port), "--tls-ca".into(), ca.clone()],
            5,
            "login",
        ),
        ("unknown vhost", vec!["--url".into(), tls_url(node, "fail1", "nosuchvhost"), "--tls-ca".into(), ca.clone()], 6, "vhost"),
        ("nothing listening", vec!["--url".into(), format!("amqp://fail1:{PASSWORD}@127.0.0.1:{dead_port}/lab")], 3, "cannot reach"),
        ("bad URL", vec!["--url".into(), format!("amqp://fail1:{PASSWORD}@127.0.0.1:99999/lab")], 2, "port"),
    ];
    for (what, args, code, says) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (got, took, logs, _ns) = failing_start(&unique("fail"), &args, &[]);
        assert_eq!(got, code, "{what}: exit code {got}, expected {code}:\n{logs}");
        assert!(took < Duration::from_secs(10), "{what}: took {took:?}");
        assert!(!logs.contains(PASSWORD), "{what}: the password was printed:\n{logs}");
        assert!(logs.to_lowercase().contains(says), "{what}: the error should mention {says:?}:\n{logs}");
        assert_eq!(logs.lines().filter(|l| l.starts_with("error:")).count(), 1, "{what}: one error line:\n{logs}");
    }
    assert_eq!(node.queues("lab"), before, "failed starts left queues behind");
}

fn url_from_a_file(node: &TestNode) {
    node.add_user("file1", Some(PASSWORD), "lab");
    let file = std::env::temp_dir().join(unique("tunbus-url-"));
    std::fs::write(&file, format!("# the broker\n{}\n", tls_url(node, "file1", "lab"))).expect("url file");
    let ca = node.certs.ca.display().to_string();
    let ns = Netns::new();
    let name = unique("file");
    let mut agent = AgentProc::spawn_env(
        &name,
        &["--tls-ca", &ca, "--netns", &ns.name, "--ipv4", "198.18.44.1/24"],
        &[("AMQP_URL_FILE", file.to_str().expect("utf-8 path"))],
    );
    let t0 = Instant::now();
    while !node.queues("lab").iter().any(|q| q.contains(&name)) {
        assert!(t0.elapsed() < Duration::from_secs(10) && agent.alive(), "agent with AMQP_URL_FILE did not join:\n{}", agent.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    let peers = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(["peers", "--url-file", file.to_str().expect("utf-8"), "--tls-ca", &ca, "--json", "--wait", "1"])
        .output()
        .expect("agent peers");
    let text = String::from_utf8_lossy(&peers.stdout);
    assert!(text.contains(&format!("\"name\":\"{name}\"")), "peers over TLS from a URL file:\n{text}\n{}", String::from_utf8_lossy(&peers.stderr));
    assert!(text.contains(&format!("localhost:{}", node.tls_port)), "peers shows the node:\n{text}");
    agent.interrupt();
    assert!(!agent.logs().contains(PASSWORD));
    let _ = std::fs::remove_file(file);
}

fn half_open_path(node: &TestNode) {
    node.add_user("ho", Some(PASSWORD), "lab");
    let proxy = Proxy::start(node.plain_port());
    let hb = 2u64;
    let via_proxy = vec!["--url".to_owned(), format!("{}?heartbeat={hb}", plain_url(node, "ho", proxy.port)), "--queues".into(), "2".into()];
    let direct = vec!["--url".to_owned(), format!("{}?heartbeat={hb}", plain_url(node, "ho", node.plain_port()))];
    let mut p = Pair::spawn(45, &via_proxy, &direct);
    let (ok, out) = ping(&p.ns_a, &p.v4[1], 2);
    assert!(ok, "{out}");
    let closes_before = proxy.client_closes.lock().expect("lock").len();
    let frozen_at = Instant::now();
    proxy.freeze();
    // Agent a must notice on its own, on every queue (a queue that only receives sends
    // nothing): both its connections through the proxy close within two heartbeats.
    let detected = loop {
        if let Some(t) = proxy.client_closes.lock().expect("lock").get(closes_before + 1) {
            break *t;
        }
        assert!(frozen_at.elapsed() < Duration::from_secs(4 * hb + 2), "no loss detected while frozen:\n{}", p.a.logs());
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = detected.duration_since(frozen_at);
    assert!(took <= Duration::from_millis(2 * hb * 1000 + 700), "loss noticed after {took:?}, over 2 x {hb} s");
    std::thread::sleep(Duration::from_secs(3 * hb));
    proxy.heal();
    let healed = Instant::now();
    let back = wait_reachable(&p.ns_a, &p.v4[1], Duration::from_secs(10)).unwrap_or_else(|| panic!("no ping after healing:\n{}", p.a.logs()));
    assert!(back < Duration::from_secs(5), "ping back {back:?} after the path healed (took {:?} in all)", healed.elapsed());
    eprintln!("half-open: heartbeat {hb} s, loss noticed {took:?} after the freeze, ping back {back:?} after healing");
    assert!(p.a.alive(), "agent a exited:\n{}", p.a.logs());
    let r = p.a.interrupt();
    assert!(r["reconnects"].as_u64().unwrap_or(0) >= 1, "{r}");
    p.b.interrupt();
}

fn sigkill_then_same_name(node: &TestNode) {
    node.add_user("kill", Some(PASSWORD), "lab");
    let url = vec!["--url".to_owned(), plain_url(node, "kill", node.plain_port())];
    let mut p = Pair::spawn(46, &url, &url);
    let (ok, out) = ping(&p.ns_a, &p.v4[1], 2);
    assert!(ok, "{out}");
    let name = p.b.name.clone();
    let (status, _) = p.b.stop_with(libc::SIGKILL, Duration::from_secs(5));
    assert!(status.is_some(), "SIGKILL did not end the agent");
    // The killed agent's interface died with it; start it again under the same name.
    let restarted = Instant::now();
    let v4 = format!("{}/24", p.v4[1]);
    let v6 = format!("{}/64", p.v6[1]);
    let mut args: Vec<&str> = url.iter().map(String::as_str).collect();
    args.extend_from_slice(&["--netns", &p.ns_b.name, "--ipv4", &v4, "--ipv6", &v6]);
    let mut again = AgentProc::spawn(&name, &args);
    let back =
        wait_reachable(&p.ns_a, &p.v4[1], Duration::from_secs(10)).unwrap_or_else(|| panic!("the restarted agent never carried ping:\n{}", again.logs()));
    assert!(restarted.elapsed() < Duration::from_secs(5), "up and carrying ping {back:?} after restart ({:?} in all):\n{}", restarted.elapsed(), again.logs());
    eprintln!("sigkill: the same name carried ping {:?} after the restart", restarted.elapsed());
    again.interrupt();
    p.a.interrupt();
}

/// Restores the node's memory watermark when dropped, also when the step fails.
struct Watermark<'a>(&'a TestNode);

impl Drop for Watermark<'_> {
    fn drop(&mut self) {
        let _ = self.0.broker.ctl(&["set_vm_memory_high_watermark", "0.4"]);
    }
}

fn memory_alarm_during_traffic(node: &TestNode) {
    node.add_user("alarm", Some(PASSWORD), "lab");
    let url = vec!["--url".to_owned(), plain_url(node, "alarm", node.plain_port())];
    let mut p = Pair::spawn(47, &url, &url);
    let (ok, out) = ping(&p.ns_a, &p.v4[1], 2);
    assert!(ok, "{out}");
    // Traffic throughout: a ping every 100 ms.
    let mut pinger = Command::new("ip")
        .args(["netns", "exec", &p.ns_a.name, "ping", "-n", "-q", "-i", "0.1", &p.v4[1]])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("ping runs");
    std::thread::sleep(Duration::from_secs(2));
    let guard = Watermark(node);
    node.ctl(&["set_vm_memory_high_watermark", "0.0000001"]);
    let t0 = Instant::now();
    while !node.ctl(&["eval", "rabbit_alarm:get_alarms()."]).contains("memory") {
        assert!(t0.elapsed() < Duration::from_secs(10), "the alarm did not go off");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(10));
    drop(guard);
    let cleared = Instant::now();
    let back =
        wait_reachable(&p.ns_a, &p.v4[1], Duration::from_secs(10)).unwrap_or_else(|| panic!("no traffic after the alarm:\n{}\n{}", p.a.logs(), p.b.logs()));
    assert!(back < Duration::from_secs(2), "traffic back {back:?} after the alarm cleared ({:?})", cleared.elapsed());
    eprintln!("alarm: traffic back {back:?} after the alarm cleared");
    let _ = pinger.kill();
    let _ = pinger.wait();
    let (ra, rb) = (p.a.interrupt(), p.b.interrupt());
    eprintln!("alarm: dropped as broker_blocked: a {}, b {}", drops(&ra, "broker_blocked"), drops(&rb, "broker_blocked"));
    for (r, logs) in [(&ra, p.a.logs()), (&rb, p.b.logs())] {
        assert_eq!(r["reconnects"].as_u64(), Some(0), "a connection was torn down during the alarm: {r}\n{logs}");
        assert!(!logs.contains("lost the broker"), "{logs}");
    }
    assert!(drops(&ra, "broker_blocked") + drops(&rb, "broker_blocked") > 0, "what could not be sent is counted: {ra}\n{rb}");
}

#[test]
fn real_broker_tls_failures_liveness_alarms() {
    if !system_ready("real_broker_tls_failures_liveness_alarms") {
        return;
    }
    let node = TestNode::start();
    type Step = (&'static str, fn(&TestNode));
    let steps: [Step; 7] = [
        ("tls_with_passwords", tls_with_passwords),
        ("tls_with_certificates", tls_with_certificates),
        ("clear_failures_at_start", clear_failures_at_start),
        ("url_from_a_file", url_from_a_file),
        ("half_open_path", half_open_path),
        ("sigkill_then_same_name", sigkill_then_same_name),
        ("memory_alarm_during_traffic", memory_alarm_during_traffic),
    ];
    let only = std::env::var("TUNBUS_STEP").ok();
    let mut failed = Vec::new();
    for (name, step) in steps {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let t0 = Instant::now();
        match std::panic::catch_unwind(AssertUnwindSafe(|| step(&node))) {
            Ok(()) => eprintln!("step {name}: ok in {:.1} s", t0.elapsed().as_secs_f64()),
            Err(_) => {
                eprintln!("step {name}: FAILED after {:.1} s", t0.elapsed().as_secs_f64());
                failed.push(name);
            }
        }
    }
    assert!(failed.is_empty(), "failed steps: {failed:?}");
}
