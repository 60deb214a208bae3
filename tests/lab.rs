//! `agent lab` end to end: a 3-host lab checks every pair on both IP versions and leaves
//! nothing behind; two labs in different sessions share one broker without seeing each
//! other; a lab killed with SIGKILL is cleaned by the next run.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn lab(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_agent"));
    c.arg("lab").args(["--url", URL]).args(args);
    c
}

fn namespaces_with(prefix: &str) -> Vec<String> {
    run("ip", &["netns", "list"]).lines().filter_map(|l| l.split_whitespace().next()).filter(|n| n.starts_with(prefix)).map(str::to_owned).collect()
}

/// A `--keep` lab in the background, interrupted on drop.
struct KeptLab {
    child: Child,
    session: String,
}

impl KeptLab {
    fn start(session: &str, hosts: u32) -> KeptLab {
        let child = lab(&["--keep", "--hosts", &hosts.to_string(), "--session", session, "--throughput-seconds", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn lab");
        KeptLab { child, session: session.to_owned() }
    }

    /// Name of the lab's namespace for host i (owned by the lab, not by the test).
    fn ns(&self, i: usize) -> String {
        format!("tb-{}-h{i}", self.session)
    }

    fn interrupt(&mut self) -> bool {
        // SAFETY: signalling our own child process.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGINT);
        }
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        false
    }
}

impl Drop for KeptLab {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.interrupt();
        }
    }
}

/// Pings from a lab namespace without taking ownership of it.
fn lab_ping(ns: &str, dst: &str) -> bool {
    let n = Netns { name: ns.to_owned() };
    let ok = n.exec(&["ping", "-n", "-c", "1", "-W", "1", dst]).status.success();
    std::mem::forget(n);
    ok
}

fn wait_lab_ping(ns: &str, dst: &str, limit: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if lab_ping(ns, dst) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn three_host_lab_checks_all_pairs_and_cleans_up() {
    if !system_ready("three_host_lab_checks_all_pairs_and_cleans_up") {
        return;
    }
    let session = unique("l");
    let json = std::env::temp_dir().join(format!("{session}.json"));
    let out = lab(&["--hosts", "3", "--session", &session, "--throughput-seconds", "1", "--json"]).arg(&json).output().expect("lab runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "lab failed:\n{text}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).expect("json report")).expect("parses");
    assert_eq!(report["hosts_up"], 3, "{report}");
    assert_eq!(report["pairs_checked"], 6, "{report}");
    assert_eq!(report["failures"].as_array().map(Vec::len), Some(0), "{report}");
    assert!(report["rtt_p50_ms"].as_f64().is_some(), "{report}");
    assert!(report["throughput_bits_per_s"].as_f64().unwrap_or(0.0) > 1e6, "{report}");
    assert!(namespaces_with(&format!("tb-{session}-")).is_empty(), "namespaces left behind");
    assert!(!std::path::Path::new(&format!("/run/tunbus/lab-{session}.json")).exists(), "state file left behind");
    let queues = run("rabbitmqctl", &["list_queues", "-q", "name"]);
    assert!(!queues.contains(&format!("tunbus.{session}.")), "queues left behind:\n{queues}");
}

#[test]
fn two_labs_in_different_sessions_do_not_see_each_other() {
    if !system_ready("two_labs_in_different_sessions_do_not_see_each_other") {
        return;
    }
    let (sa, sb) = (unique("a"), unique("b"));
    let mut a = KeptLab::start(&sa, 2);
    let mut b = KeptLab::start(&sb, 3);
    let (a1, b1) = (a.ns(1), b.ns(1));
    assert!(wait_lab_ping(&a1, "198.18.0.2", Duration::from_secs(30)), "lab A never came up");
    assert!(wait_lab_ping(&b1, "198.18.0.3", Duration::from_secs(30)), "lab B never came up");
    // 198.18.0.3 exists only in lab B: lab A must not reach it through the shared broker.
    assert!(!lab_ping(&a1, "198.18.0.3"), "lab A reached a host of lab B");
    assert!(!lab_ping(&a1, "fd00:7b::3"), "lab A reached a host of lab B over IPv6");
    // Presence is per session too.
    for (session, expect) in [(&sa, 2), (&sb, 3)] {
        let out = Command::new(env!("CARGO_BIN_EXE_agent"))
            .args(["peers", "--url", URL, "--json", "--wait", "1", "--session", session])
            .output()
            .expect("peers");
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.lines().count(), expect, "session {session} peers:\n{text}");
    }
    assert!(a.interrupt(), "lab A did not exit 0 on Ctrl-C");
    assert!(b.interrupt(), "lab B did not exit 0 on Ctrl-C");
    assert!(namespaces_with(&format!("tb-{sa}-")).is_empty() && namespaces_with(&format!("tb-{sb}-")).is_empty());
}

#[test]
fn a_killed_lab_is_cleaned_by_the_next_run() {
    if !system_ready("a_killed_lab_is_cleaned_by_the_next_run") {
        return;
    }
    let session = unique("k");
    let mut kept = KeptLab::start(&session, 2);
    let h1 = format!("tb-{session}-h1");
    assert!(wait_lab_ping(&h1, "198.18.0.2", Duration::from_secs(30)), "lab never came up");
    kept.child.kill().expect("SIGKILL");
    let _ = kept.child.wait();
    assert_eq!(namespaces_with(&format!("tb-{session}-")).len(), 2, "a killed lab leaves its namespaces (that is what we clean)");
    let out = lab(&["--cleanup"]).output().expect("cleanup runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(namespaces_with(&format!("tb-{session}-")).is_empty(), "--cleanup left namespaces");
    assert!(!std::path::Path::new(&format!("/run/tunbus/lab-{session}.json")).exists());
}
