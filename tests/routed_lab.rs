//! Routed labs (issue #25, decision 0030), with real agents, namespaces, kernel forwarding
//! and RabbitMQ: one router joins three subnets (every pair reaches, each host its own
//! broker user); a chain of two routers carries ping (the TTL says two hops) and TCP
//! (SHA-256 equal) and is graded by `agent lab --check`; with `--routers off` only pairs
//! of one subnet reach, until the 25-line Python forwarder of examples/ runs in the
//! router's namespace; a killed routed lab leaves nothing behind. Each lab runs in a
//! session of its own.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn lab(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_agent"));
    c.arg("lab").args(["--url", URL]).args(args);
    c
}

fn example(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(name).display().to_string()
}

/// A `--keep` lab of a routed topology in the background, its stdout in a file;
/// interrupted on drop.
struct RoutedLab {
    child: Child,
    session: String,
    out: PathBuf,
}

impl RoutedLab {
    fn start(topology: &str, extra: &[&str]) -> RoutedLab {
        let session = unique("r");
        let out = std::env::temp_dir().join(format!("tunbus-routed-{session}.out"));
        let file = std::fs::File::create(&out).expect("lab output file");
        let mut args = vec!["--keep", "--topology", topology, "--session", &session, "--throughput-seconds", "0"];
        args.extend_from_slice(extra);
        let child = lab(&args).stdout(file).stderr(Stdio::null()).spawn().expect("spawn lab");
        let lab = RoutedLab { child, session, out };
        let t0 = Instant::now();
        while !lab.output().contains("Ctrl-C tears the lab down") {
            assert!(t0.elapsed() < Duration::from_secs(60), "the lab did not come up: {}", lab.output());
            std::thread::sleep(Duration::from_millis(100));
        }
        lab
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    fn ns(&self, i: usize) -> String {
        format!("tb-{}-h{i}", self.session)
    }

    /// `agent lab --check` of this running lab: whether it passed, and its JSON report.
    fn grade(&self, topology: &str) -> (bool, serde_json::Value) {
        let json = std::env::temp_dir().join(format!("tunbus-grade-{}.json", self.session));
        let out = lab(&["--check", "--topology", topology, "--session", &self.session, "--json", &json.display().to_string()])
            .output()
            .expect("agent lab --check runs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(text.contains("the running lab graded"), "--check started a lab of its own instead of grading: {text}");
        let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).expect("--json written")).expect("a JSON report");
        let _ = std::fs::remove_file(&json);
        (out.status.success(), report)
    }

    fn interrupt(&mut self) -> bool {
        // SAFETY: signalling our own child process.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGINT);
        }
        matches!(wait_child(&mut self.child, Duration::from_secs(15)), Some(true))
    }
}

impl Drop for RoutedLab {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.interrupt();
        }
        let _ = std::fs::remove_file(&self.out);
    }
}

fn wait_child(child: &mut Child, limit: Duration) -> Option<bool> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s.success());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    None
}

/// Runs a command in a namespace the lab owns.
fn in_lab(ns: &str, args: &[&str]) -> std::process::Output {
    Command::new("ip").args(["netns", "exec", ns]).args(args).output().expect("ip netns exec")
}

/// Who reached whom in a report: `reached[a][b]` as (IPv4, IPv6).
fn reached(report: &serde_json::Value) -> Vec<Vec<(bool, bool)>> {
    serde_json::from_value(report["reach"]["reached"].clone()).expect("a reach matrix")
}

#[test]
fn one_router_joins_three_subnets_and_a_chain_of_two_carries_ping_and_tcp() {
    if !system_ready("a_chain_of_two_routers_carries_ping_and_tcp_and_is_graded") {
        return;
    }
    // Three subnets, one router, each host its own broker user (--secure: the router's is
    // granted every subnet, the others their addresses): every ordered pair reaches.
    let session = unique("r");
    let json = std::env::temp_dir().join(format!("tunbus-routed-{session}.json"));
    let out = lab(&[
        "--topology",
        &example("routed-star.yaml"),
        "--secure",
        "--session",
        &session,
        "--throughput-seconds",
        "0",
        "--json",
        &json.display().to_string(),
    ])
    .output()
    .expect("agent lab runs");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).expect("--json written")).expect("a JSON report");
    let _ = std::fs::remove_file(&json);
    assert!(out.status.success(), "the star lab failed: {}", String::from_utf8_lossy(&out.stdout));
    assert!(reached(&report).iter().flatten().all(|&(v4, v6)| v4 && v6), "{report}");
    assert!(namespaces_with(&format!("tb-{session}-")).is_empty(), "the star lab left namespaces");
    let users = run("rabbitmqctl", &["list_users", "-q"]);
    assert!(!users.contains(&format!("{session}.")), "the secure lab left users:\n{users}");

    let topology = example("routed-chain.yaml");
    let mut kept = RoutedLab::start(&topology, &[]);
    assert!(kept.output().contains("result          OK"), "the lab's own check failed: {}", kept.output());
    // h1 (198.18.1.1, subnet a) to h2 (198.18.3.2, subnet c): through h3 and h4, whose
    // kernels each take one off the TTL (and the hop limit) of the reply.
    let (h1, h2) = (kept.ns(1), kept.ns(2));
    for (dst, ttl) in [("198.18.3.2", "ttl=62"), ("fd00:7b:3::2", "ttl=62")] {
        let out = in_lab(&h1, &["ping", "-n", "-c", "2", "-W", "2", dst]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains(ttl), "h1 -> {dst} should take two routers: {text}");
    }
    // TCP across both routers, byte for byte.
    let sink = tcp_sink(&h2, "198.18.3.2:5001".into(), 1);
    let sent = tcp_send(&h1, "198.18.3.2:5001".into(), 20_000_000, 25).join().expect("sender");
    let got = sink.join().expect("sink");
    assert_eq!(got, vec![sent], "the TCP stream through two routers arrived changed");
    // The grader agrees: every ordered pair, both families.
    let (ok, report) = kept.grade(&topology);
    assert!(ok, "--check failed: {report}");
    assert!(reached(&report).iter().flatten().all(|&(v4, v6)| v4 && v6));
    // SIGKILL: the lab's guard removes its namespaces, and with them every route and
    // forwarding switch the lab set; --cleanup then finds nothing.
    kept.child.kill().expect("SIGKILL the lab");
    let _ = kept.child.wait();
    let prefix = format!("tb-{}-", kept.session);
    let t0 = Instant::now();
    while !namespaces_with(&prefix).is_empty() && t0.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(namespaces_with(&prefix).is_empty(), "a killed routed lab left namespaces");
    let out = lab(&["--cleanup"]).output().expect("cleanup runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!Path::new(&format!("/run/tunbus/lab-{}.json", kept.session)).exists(), "the state file stayed");
}

#[test]
fn with_routers_off_only_a_program_of_the_users_makes_subnets_meet() {
    if !system_ready("with_routers_off_only_a_program_of_the_users_makes_subnets_meet") {
        return;
    }
    let topology = example("routed-star.yaml");
    let mut lab = RoutedLab::start(&topology, &["--routers", "off"]);
    // The lab's own check expected just this: h4 (the router, in every subnet) reaches
    // everyone and is reached; h1, h2, h3 (one subnet each) reach nobody but h4.
    assert!(lab.output().contains("result          OK"), "the lab's own check failed: {}", lab.output());
    let (ok, report) = lab.grade(&topology);
    assert!(!ok, "a lab whose router forwards nothing passed the grade: {report}");
    let m = reached(&report);
    for (a, row) in m.iter().enumerate() {
        for (b, &cell) in row.iter().enumerate().filter(|(b, _)| *b != a) {
            let same_subnet = a == 3 || b == 3;
            assert_eq!(cell, (same_subnet, same_subnet), "h{} -> h{} with the routers off", a + 1, b + 1);
        }
    }
    // The user's router: 25 lines of Python on an AF_PACKET socket in h4's namespace.
    let mut forwarder = Command::new("ip")
        .args(["netns", "exec", &lab.ns(4), "python3", &example("forwarder.py"), "tb0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    std::thread::sleep(Duration::from_millis(500));
    assert!(forwarder.try_wait().expect("forwarder status").is_none(), "the forwarder exited at once");
    let (ok, report) = lab.grade(&topology);
    let _ = forwarder.kill();
    let _ = forwarder.wait();
    assert!(ok, "the Python forwarder should make every pair reach: {report}");
    let out = in_lab(&lab.ns(1), &["ping", "-n", "-c", "1", "-W", "2", "198.18.2.2"]);
    assert!(!out.status.success(), "with the forwarder gone, h1 -> h2 should not reach again");
    assert!(lab.interrupt(), "the lab should end cleanly on Ctrl-C");
    assert!(namespaces_with(&format!("tb-{}-", lab.session)).is_empty(), "namespaces left after Ctrl-C");
}
