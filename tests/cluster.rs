//! A RabbitMQ cluster as the engine: one private 3-node cluster serves every step.
//!
//! - Two agents on different nodes carry a 100 MB TCP stream while the node of one of them
//!   is killed (SIGKILL of its Erlang VM): the stream completes byte for byte, ping is back
//!   within 3 s, both agents live on, and `agent peers` shows the moved agent's new node.
//! - The node comes back: it rejoins the cluster, and traffic still flows (also for an
//!   agent that starts on it).
//! - An agent whose first node is down at start connects to the next one.

mod common;

use std::panic::AssertUnwindSafe;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use tunbus::lab::broker::{NodeConfig, PrivateCluster};

struct World {
    cluster: PrivateCluster,
    dir: std::path::PathBuf,
}

impl Drop for World {
    fn drop(&mut self) {
        self.cluster.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl World {
    fn url(&self, i: usize) -> String {
        self.cluster.urls()[i].clone()
    }

    /// `--url` flags for the nodes in `order` (0-based).
    fn urls(&self, order: &[usize]) -> Vec<String> {
        order.iter().flat_map(|&i| ["--url".to_owned(), self.url(i)]).collect()
    }

    fn running_nodes(&self) -> usize {
        let out = self.cluster.nodes[1].ctl(&["cluster_status", "--formatter", "json"]).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        v["running_nodes"].as_array().map_or(0, Vec::len)
    }
}

/// The node `agent peers` reports for agent `name`.
fn node_of(w: &World, via: usize, session: &str, name: &str) -> Option<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_agent")).args(["peers", "--url", &w.url(via), "--session", session, "--json", "--wait", "1"]).output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["name"] == name)
        .and_then(|v| v["node"].as_str().map(str::to_owned))
}

fn node_dies_under_a_stream(w: &World) {
    let session = "clu";
    let (ns_a, ns_b) = (Netns::new(), Netns::new());
    let mut args_a: Vec<String> = w.urls(&[0, 1, 2]);
    args_a.extend(["--session", session, "--netns", &ns_a.name, "--ipv4", "198.18.70.1/24", "--ipv6", "fd00:70::1/64"].map(String::from));
    let mut args_b: Vec<String> = w.urls(&[1, 2, 0]);
    args_b.extend(["--session", session, "--netns", &ns_b.name, "--ipv4", "198.18.70.2/24", "--ipv6", "fd00:70::2/64"].map(String::from));
    let a_args: Vec<&str> = args_a.iter().map(String::as_str).collect();
    let b_args: Vec<&str> = args_b.iter().map(String::as_str).collect();
    let mut a = AgentProc::spawn("clu-a", &a_args);
    let mut b = AgentProc::spawn("clu-b", &b_args);
    wait_reachable(&ns_a, "198.18.70.2", Duration::from_secs(15))
        .unwrap_or_else(|| panic!("agents on two nodes do not reach each other:\n{}\n{}", a.logs(), b.logs()));
    let node1 = format!("127.0.0.1:{}", w.cluster.nodes[0].port);
    let node2 = format!("127.0.0.1:{}", w.cluster.nodes[1].port);
    assert_eq!(node_of(w, 1, session, "clu-a").as_deref(), Some(node1.as_str()), "a should start on node 1");
    assert_eq!(node_of(w, 1, session, "clu-b").as_deref(), Some(node2.as_str()), "b should start on node 2");

    // 100 MB at 16 MB/s: the stream runs for about 6 s; node 1 dies 2 s in.
    let size = 100 * 1024 * 1024;
    let sink = tcp_sink(&ns_b.name, "198.18.70.2:5010".into(), 1);
    let sender = tcp_send_paced(&ns_a.name, "198.18.70.2:5010".into(), size, 99, 16 * 1024 * 1024);
    std::thread::sleep(Duration::from_secs(2));
    let killed = Instant::now();
    w.cluster.nodes[0].kill().expect("kill node 1");
    let back_v4 = wait_reachable(&ns_a, "198.18.70.2", Duration::from_secs(10)).unwrap_or_else(|| panic!("no IPv4 ping after node 1 died:\n{}", a.logs()));
    let back_v6 = wait_reachable(&ns_b, "fd00:70::1", Duration::from_secs(10)).unwrap_or_else(|| panic!("no IPv6 ping after node 1 died:\n{}", b.logs()));
    let both = killed.elapsed();
    eprintln!("cluster: node 1 killed; ping a->b back after {back_v4:?}, b->a after {:?} more ({both:?} in all)", back_v6);
    assert!(both < Duration::from_secs(3), "ping between the pair back after {both:?}");
    let sent = sender.join().expect("sender");
    let got = sink.join().expect("sink");
    assert_eq!(got[0], sent, "the stream arrived changed after the node died");
    assert!(a.alive() && b.alive(), "an agent exited:\n{}\n{}", a.logs(), b.logs());
    let moved = node_of(w, 1, session, "clu-a");
    assert!(moved.is_some() && moved.as_deref() != Some(node1.as_str()), "peers should show a's new node, not {moved:?}");
    eprintln!("cluster: a moved to {}", moved.unwrap_or_default());
    assert_eq!(node_of(w, 1, session, "clu-b").as_deref(), Some(node2.as_str()));

    // Node 1 comes back and rejoins; nothing breaks, and an agent can start on it.
    let restarted = Instant::now();
    w.cluster.nodes[0].launch().expect("node 1 starts again");
    w.cluster.nodes[0].wait_up(None, Duration::from_secs(60)).expect("node 1 up again");
    let t0 = Instant::now();
    while w.running_nodes() < 3 {
        assert!(t0.elapsed() < Duration::from_secs(30), "node 1 did not rejoin the cluster");
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("cluster: node 1 rejoined {:?} after its restart", restarted.elapsed());
    let (ok, out) = ping(&ns_a, "198.18.70.2", 3);
    assert!(ok, "traffic after node 1 came back:\n{out}");
    let ns_c = Netns::new();
    let mut c = AgentProc::spawn("clu-c", &["--url", &w.url(0), "--session", session, "--netns", &ns_c.name, "--ipv4", "198.18.70.3/24"]);
    wait_reachable(&ns_c, "198.18.70.1", Duration::from_secs(15)).unwrap_or_else(|| panic!("an agent on the restarted node:\n{}", c.logs()));
    let (ok, out) = ping(&ns_c, "198.18.70.2", 2);
    assert!(ok, "{out}");
    for p in [&mut a, &mut b, &mut c] {
        p.interrupt();
    }
}

fn first_node_down_at_start(w: &World) {
    w.cluster.nodes[2].kill().expect("kill node 3");
    let ns = Netns::new();
    let ns2 = Netns::new();
    let t0 = Instant::now();
    let mut d = AgentProc::spawn("clu-d", &["--url", &w.url(2), "--url", &w.url(1), "--session", "clu2", "--netns", &ns.name, "--ipv4", "198.18.71.1/24"]);
    let mut e = AgentProc::spawn("clu-e", &["--url", &w.url(0), "--session", "clu2", "--netns", &ns2.name, "--ipv4", "198.18.71.2/24"]);
    wait_reachable(&ns, "198.18.71.2", Duration::from_secs(15)).unwrap_or_else(|| panic!("an agent whose first node is down:\n{}", d.logs()));
    eprintln!("cluster: with its first node down, an agent carried ping {:?} after its start", t0.elapsed());
    assert_eq!(node_of(w, 0, "clu2", "clu-d").as_deref(), Some(format!("127.0.0.1:{}", w.cluster.nodes[1].port).as_str()));
    d.interrupt();
    e.interrupt();
}

#[test]
fn a_cluster_loses_a_node_without_losing_the_session() {
    if !system_ready("a_cluster_loses_a_node_without_losing_the_session") {
        return;
    }
    let dir = std::env::temp_dir().join(unique("tunbus-cluster-"));
    let t0 = Instant::now();
    let cluster = PrivateCluster::start(&dir, 3, &NodeConfig::default()).expect("a private 3-node cluster starts");
    eprintln!("cluster: 3 nodes up and joined in {:.1} s", t0.elapsed().as_secs_f64());
    let world = World { cluster, dir };
    assert_eq!(world.running_nodes(), 3);
    type Step = (&'static str, fn(&World));
    let steps: [Step; 2] = [("node_dies_under_a_stream", node_dies_under_a_stream), ("first_node_down_at_start", first_node_down_at_start)];
    let only = std::env::var("TUNBUS_STEP").ok();
    let mut failed = Vec::new();
    for (name, step) in steps {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let t0 = Instant::now();
        match std::panic::catch_unwind(AssertUnwindSafe(|| step(&world))) {
            Ok(()) => eprintln!("step {name}: ok in {:.1} s", t0.elapsed().as_secs_f64()),
            Err(_) => {
                eprintln!("step {name}: FAILED after {:.1} s", t0.elapsed().as_secs_f64());
                failed.push(name);
            }
        }
    }
    assert!(failed.is_empty(), "failed steps: {failed:?}");
}
