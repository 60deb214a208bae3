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
fn a_secure_lab_gives_each_host_its_own_identity_and_removes_them() {
    if !system_ready("a_secure_lab_gives_each_host_its_own_identity_and_removes_them") {
        return;
    }
    let session = unique("s");
    let json = std::env::temp_dir().join(format!("{session}.json"));
    // The shared broker: provisioning goes through rabbitmqctl, and is revoked at the end.
    let out = lab(&["--hosts", "3", "--session", &session, "--secure", "--throughput-seconds", "0", "--json"]).arg(&json).output().expect("lab runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "secure lab failed:\n{text}");
    assert!(text.contains("lab session provisioned users=3"), "{text}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).expect("json report")).expect("parses");
    assert_eq!(report["failures"].as_array().map(Vec::len), Some(0), "{report}");
    let users = run("rabbitmqctl", &["list_users", "-q"]);
    assert!(!users.contains(&format!("{session}.h")), "users left behind:\n{users}");
    let vhosts = run("rabbitmqctl", &["list_vhosts", "-q"]);
    assert!(!vhosts.lines().any(|l| l.trim() == session), "vhost left behind:\n{vhosts}");
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
        let out =
            Command::new(env!("CARGO_BIN_EXE_agent")).args(["peers", "--url", URL, "--json", "--wait", "1", "--session", session]).output().expect("peers");
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.lines().count(), expect, "session {session} peers:\n{text}");
    }
    assert!(a.interrupt(), "lab A did not exit 0 on Ctrl-C");
    assert!(b.interrupt(), "lab B did not exit 0 on Ctrl-C");
    assert!(namespaces_with(&format!("tb-{sa}-")).is_empty() && namespaces_with(&format!("tb-{sb}-")).is_empty());
}

#[test]
fn a_lab_killed_with_its_guard_is_cleaned_by_cleanup() {
    if !system_ready("a_lab_killed_with_its_guard_is_cleaned_by_cleanup") {
        return;
    }
    let session = unique("k");
    let mut kept = KeptLab::start(&session, 2);
    let h1 = format!("tb-{session}-h1");
    assert!(wait_lab_ping(&h1, "198.18.0.2", Duration::from_secs(30)), "lab never came up");
    // The guard would clean at once (tests/robustness.rs); without it the state file is
    // what is left to go by.
    let guard = guard_of(kept.child.id()).expect("the lab runs a guard");
    run("kill", &["-9", &guard.to_string()]);
    kept.child.kill().expect("SIGKILL");
    let _ = kept.child.wait();
    assert_eq!(namespaces_with(&format!("tb-{session}-")).len(), 2, "a lab killed with its guard leaves its namespaces (that is what we clean)");
    let out = lab(&["--cleanup"]).output().expect("cleanup runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(namespaces_with(&format!("tb-{session}-")).is_empty(), "--cleanup left namespaces");
    assert!(!std::path::Path::new(&format!("/run/tunbus/lab-{session}.json")).exists());
}

fn ifindex_here(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).expect("no NUL");
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    #[allow(unsafe_code)]
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert!(i != 0, "no interface {name} in this namespace");
    i
}

#[test]
fn multicast_and_broadcast_reach_every_other_host() {
    if !system_ready("multicast_and_broadcast_reach_every_other_host") {
        return;
    }
    let session = unique("m");
    let _lab = KeptLab::start(&session, 3);
    let ns: Vec<String> = (1..=3).map(|i| format!("tb-{session}-h{i}")).collect();
    assert!(wait_lab_ping(&ns[0], "198.18.0.3", Duration::from_secs(30)), "lab never came up");
    assert!(wait_lab_ping(&ns[0], "198.18.0.2", Duration::from_secs(10)), "h2 not up");

    // IPv6 ping to all-nodes: both other hosts answer (from their link-local addresses).
    let own = run("ip", &["-n", &ns[0], "-6", "-o", "addr", "show", "dev", "tb0", "scope", "link"]);
    let own_ll = own.split_whitespace().nth(3).and_then(|a| a.split('/').next()).expect("own link-local").to_owned();
    let out = run("ip", &["netns", "exec", &ns[0], "ping", "-n", "-c", "3", "-i", "0.3", "-w", "4", "ff02::1%tb0"]);
    let responders: std::collections::BTreeSet<String> = out
        .lines()
        // "64 bytes from fe80::…%tb0: icmp_seq=1 …" → "fe80::…"
        .filter_map(|l| l.split("bytes from ").nth(1))
        .filter_map(|r| r.split_whitespace().next())
        .map(|a| a.trim_end_matches(':').split('%').next().unwrap_or("").to_owned())
        .filter(|a| !a.is_empty() && *a != own_ll)
        .collect();
    assert_eq!(responders.len(), 2, "expected answers from the two other hosts, got {responders:?}:\n{out}");

    // A UDP datagram to CoAP's all-nodes group ff02::fd arrives at both other hosts.
    let (tx, rx) = std::sync::mpsc::channel();
    let receivers: Vec<_> = ns[1..]
        .iter()
        .map(|n| {
            let tx = tx.clone();
            in_netns(n, move || {
                let sock = std::net::UdpSocket::bind("[::]:5683").expect("bind 5683");
                sock.join_multicast_v6(&"ff02::fd".parse().expect("group"), ifindex_here("tb0")).expect("join ff02::fd");
                sock.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
                tx.send(()).expect("ready");
                let mut buf = [0u8; 256];
                let (n, _) = sock.recv_from(&mut buf).expect("multicast datagram arrives");
                buf[..n].to_vec()
            })
        })
        .collect();
    for _ in 0..2 {
        rx.recv_timeout(Duration::from_secs(5)).expect("receivers ready");
    }
    std::thread::sleep(Duration::from_millis(300)); // MLD join travels to the kernel
    let payload = b"tunbus multicast check".to_vec();
    let sent = payload.clone();
    in_netns(&ns[0], move || {
        let sock = std::net::UdpSocket::bind("[::]:0").expect("bind");
        let dst = std::net::SocketAddrV6::new("ff02::fd".parse().expect("group"), 5683, 0, ifindex_here("tb0"));
        for _ in 0..3 {
            sock.send_to(&sent, dst).expect("send multicast");
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .join()
    .expect("sender");
    for r in receivers {
        assert_eq!(r.join().expect("receiver"), payload);
    }
}

#[test]
fn a_lab_without_a_broker_starts_and_removes_its_own() {
    if !system_ready("a_lab_without_a_broker_starts_and_removes_its_own") {
        return;
    }
    // --private-broker takes the path a machine without a running broker takes.
    let session = unique("p");
    let json = std::env::temp_dir().join(format!("{session}.json"));
    let out = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(["lab", "--private-broker", "--hosts", "2", "--session", &session, "--throughput-seconds", "0", "--json"])
        .arg(&json)
        .output()
        .expect("lab runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "lab with a private broker failed:\n{text}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).expect("report")).expect("json");
    let broker = report["broker"].as_str().unwrap_or_default().to_owned();
    assert!(broker.starts_with("private node "), "{report}");
    assert_eq!(report["hosts_up"], 2, "{report}");
    assert_eq!(report["failures"].as_array().map(Vec::len), Some(0), "{report}");
    // The node is stopped and its folder removed.
    let node = broker.trim_start_matches("private node ").split(' ').next().unwrap_or_default().to_owned();
    let procs = Command::new("pgrep").args(["-f", &node]).output().expect("pgrep");
    assert!(String::from_utf8_lossy(&procs.stdout).trim().is_empty(), "private broker {node} still running");
    let leftovers: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .expect("tmp")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&format!("tunbus-lab-{session}-")))
        .collect();
    assert!(leftovers.is_empty(), "temporary folder left behind: {leftovers:?}");
    assert!(namespaces_with(&format!("tb-{session}-")).is_empty());
}

#[test]
fn a_large_lab_leaves_the_broker_healthy() {
    if !system_ready("a_large_lab_leaves_the_broker_healthy") {
        return;
    }
    let session = unique("big");
    let out = lab(&["--hosts", "300", "--session", &session, "--sample", "30", "--throughput-seconds", "0"]).output().expect("lab runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "a 300-host lab failed:\n{text}");
    // The broker it used still runs, has no alarm, and declares queues.
    for check in [["-q", "check_running"], ["-q", "check_local_alarms"]] {
        let o = Command::new("rabbitmq-diagnostics").args(check).output().expect("rabbitmq-diagnostics");
        assert!(o.status.success(), "rabbitmq-diagnostics {check:?} after the lab: {}", String::from_utf8_lossy(&o.stdout));
    }
    let mut c = bus_client();
    let never = std::sync::atomic::AtomicBool::new(false);
    let q = c.queue_declare("", tunbus::amqp::session::QueueOptions { exclusive: true, ..Default::default() }, &[], &never);
    assert!(q.is_ok(), "the broker no longer declares queues after a large lab: {q:?}");
    let queues = run("rabbitmqctl", &["list_queues", "-q", "name"]);
    assert!(!queues.contains(&format!("tunbus.{session}.")), "queues left behind");
}

#[test]
fn a_topology_lab_links_some_hosts_and_reports_each_link() {
    if !system_ready("a_topology_lab_links_some_hosts_and_reports_each_link") {
        return;
    }
    let session = unique("t");
    let dir = std::env::temp_dir();
    let (file, json) = (dir.join(format!("{session}.yaml")), dir.join(format!("{session}.json")));
    std::fs::write(&file, "hosts: 3\nlinks:\n  - between: [h1, h2]\n    emulate: delay 10ms\n  - between: [h2, h3]\n    emulate: rate 20mbit\n")
        .expect("topology file");
    let out = lab(&["--topology", file.to_str().expect("utf-8"), "--session", &session, "--throughput-seconds", "1", "--json"])
        .arg(&json)
        .output()
        .expect("lab runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "lab failed:\n{text}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).expect("json report")).expect("parses");
    assert_eq!(report["hosts_up"], 3, "{report}");
    assert_eq!(report["failures"].as_array().map(Vec::len), Some(0), "{report}");
    let link = |a: &str, b: &str| {
        report["links"].as_array().and_then(|l| l.iter().find(|x| x["a"] == a && x["b"] == b).cloned()).unwrap_or_else(|| panic!("no link {a}-{b} in {report}"))
    };
    let h1h2 = link("h1", "h2");
    let rtt = h1h2["rtt_p50_ms"].as_f64().expect("h1-h2 answers");
    assert!((19.0..=24.0).contains(&rtt), "h1-h2 has 'delay 10ms' each way: RTT p50 {rtt} ms\n{text}");
    assert_eq!(h1h2["configured_rtt_ms"].as_f64(), Some(20.0));
    let h2h3 = link("h2", "h3");
    assert!(h2h3["rtt_p50_ms"].as_f64().is_some_and(|r| r < 5.0), "h2-h3 has no delay\n{text}");
    let mbit = h2h3["tcp_bits_per_s"].as_f64().map(|b| b / 1e6);
    assert!(mbit.is_some_and(|m| (5.0..=21.0).contains(&m)), "h2-h3 'rate 20mbit': the lab measures a TCP flow over it: {mbit:?} Mbit/s\n{text}");
    assert!(text.contains("emulate rate 20mbit") && text.contains("TCP "), "the rate beside the measured TCP:\n{text}");
    let h1h3 = link("h1", "h3");
    assert_eq!((h1h3["linked"].clone(), h1h3["replies"].clone()), (false.into(), 0.into()), "h1 cannot reach h3\n{text}");
    assert!(text.contains("emulate delay 10ms"), "the report shows each link's configuration beside what it measured:\n{text}");
    assert!(namespaces_with(&format!("tb-{session}-")).is_empty(), "namespaces left behind");
    let _ = std::fs::remove_file(&file);
}
