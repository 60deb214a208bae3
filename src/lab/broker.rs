//! A private RabbitMQ node for a lab when no broker answers (and for tests that need a
//! broker of their own: a TLS listener, users and permissions, an alarm): its own node
//! name, port and data directory under a temporary folder, stopped and removed when done.
//!
//! Control plane, run from the caller's thread. It drives Debian's `rabbitmq-server` and
//! `rabbitmqctl` with environment variables (the documented way to run several nodes on
//! one host). Plugins are off unless [`NodeConfig::plugins`] names them, so that no other
//! port (management, Prometheus) is opened by accident.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Whether something accepts TCP connections on `addr`.
pub fn answers(addr: &str) -> bool {
    addr.parse::<SocketAddr>().map(|a| TcpStream::connect_timeout(&a, Duration::from_millis(500)).is_ok()).unwrap_or(false)
}

/// Whether the RabbitMQ server programs are installed.
pub fn installed() -> bool {
    ["/usr/sbin/rabbitmq-server", "/usr/lib/rabbitmq/bin/rabbitmq-server"].iter().any(|p| Path::new(p).exists())
        || Command::new("sh").args(["-c", "command -v rabbitmq-server"]).stdout(Stdio::null()).status().map(|s| s.success()).unwrap_or(false)
}

/// What the default local node can still take (`rabbitmqctl status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// Sockets (connections) it may still accept under its open-files limit.
    pub sockets_free: usize,
    /// Bytes below its memory high watermark.
    pub memory_free: u64,
}

/// What one agent connection costs a broker in memory (measured: perf/cluster_sim.py).
pub const MEMORY_PER_CONNECTION: u64 = 256 * 1024;

impl Capacity {
    /// Whether `connections` more fit, with a fifth to spare: a broker at its socket limit
    /// refuses connections and, at its memory watermark, blocks every publisher.
    pub fn holds(&self, connections: usize) -> bool {
        let want = connections + connections / 5 + 16;
        want <= self.sockets_free && (want as u64) * MEMORY_PER_CONNECTION <= self.memory_free
    }
}

/// The default local node's free sockets and memory, if it can be asked.
pub fn local_capacity() -> Option<Capacity> {
    let out = Command::new("rabbitmqctl").args(["status", "--formatter", "json"]).stderr(Stdio::null()).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let fd = status.get("file_descriptors")?;
    let sockets_free = fd.get("sockets_limit")?.as_u64()?.saturating_sub(fd.get("sockets_used")?.as_u64()?) as usize;
    let limit = status.get("vm_memory_high_watermark_limit")?.as_u64()?;
    let used = status.get("memory").and_then(|m| m.get("total")).and_then(|t| t.get("rss").or_else(|| t.get("erlang"))).and_then(|v| v.as_u64()).unwrap_or(0);
    Some(Capacity { sockets_free, memory_free: limit.saturating_sub(used) })
}

/// Debian's `rabbitmq-server` wrapper starts the node through `su rabbitmq`, whose soft
/// limit of open files is 1024, too few for a large lab: start it the wrapper's way with
/// the limit raised to the hard limit (at most 65536). Elsewhere, the plain command.
const RAISED_START: &str = "cd /var/lib/rabbitmq 2>/dev/null; n=$(ulimit -Hn); \
    if [ \"$n\" = unlimited ] || [ \"$n\" -gt 65536 ]; then n=65536; fi; ulimit -Sn \"$n\"; \
    exec /usr/lib/rabbitmq/bin/rabbitmq-server -detached";

/// Processes started for RabbitMQ node `node` (`RABBITMQ_NODENAME=node` in their environment).
pub fn processes_of_node(node: &str) -> Vec<u32> {
    let entry = format!("RABBITMQ_NODENAME={node}");
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == entry.as_bytes())))
        .collect()
}

/// A free TCP port on loopback whose RabbitMQ distribution port (port + 20000) is free too.
fn free_port() -> anyhow::Result<u16> {
    for _ in 0..50 {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let port = l.local_addr()?.port();
        if port < 45_000 && TcpListener::bind(("127.0.0.1", port + 20_000)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port pair for a private RabbitMQ node")
}

/// A TLS listener for a private node (RabbitMQ's `listeners.ssl` and `ssl_options`).
#[derive(Clone, Debug)]
pub struct TlsListener {
    pub port: u16,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Ask clients for a certificate (verify_peer), without requiring one.
    pub verify_peer: bool,
}

/// What a private node runs with beyond the defaults.
#[derive(Clone, Debug, Default)]
pub struct NodeConfig {
    pub tls: Option<TlsListener>,
    /// Plugins to enable (e.g. `rabbitmq_auth_mechanism_ssl`, `rabbitmq_management`).
    pub plugins: Vec<String>,
    /// More `rabbitmq.conf` lines (`auth_mechanisms.1 = PLAIN`, …).
    pub extra: Vec<String>,
}

/// A private cluster of several nodes on this machine: node 1 starts, the others join it
/// (`rabbitmqctl join_cluster`). All run as the `rabbitmq` user, so they share its Erlang
/// cookie. Stopped and removed like a single node.
#[derive(Debug)]
pub struct PrivateCluster {
    pub nodes: Vec<PrivateBroker>,
}

impl PrivateCluster {
    /// Starts `n` nodes under `dir/node<i>` and joins them into one cluster.
    pub fn start(dir: &Path, n: usize, config: &NodeConfig) -> anyhow::Result<PrivateCluster> {
        let mut nodes = Vec::new();
        for i in 1..=n {
            nodes.push(PrivateBroker::prepare(&dir.join(format!("node{i}")), config)?);
        }
        PrivateCluster::start_prepared(nodes)
    }

    /// Starts prepared nodes and joins them to the first.
    pub fn start_prepared(nodes: Vec<PrivateBroker>) -> anyhow::Result<PrivateCluster> {
        let config = NodeConfig::default();
        let cluster = PrivateCluster { nodes };
        // Booting in parallel: the VMs start at once, the joins come after.
        for node in &cluster.nodes {
            if let Err(e) = node.launch() {
                cluster.stop();
                return Err(e);
            }
        }
        for node in &cluster.nodes {
            if let Err(e) = node.wait_up(config.tls.as_ref().map(|t| t.port), Duration::from_secs(90)) {
                cluster.stop();
                return Err(e);
            }
        }
        let first = cluster.nodes[0].node.clone();
        for node in &cluster.nodes[1..] {
            let joined = node.ctl(&["stop_app"]).and_then(|_| node.ctl(&["join_cluster", &first])).and_then(|_| node.ctl(&["start_app"]));
            if let Err(e) = joined.and_then(|_| node.wait_up(None, Duration::from_secs(60))) {
                cluster.stop();
                return Err(e.context(format!("joining {} to {first}", node.node)));
            }
        }
        Ok(cluster)
    }

    /// The nodes' AMQP URLs (guest), in node order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(PrivateBroker::url).collect()
    }

    /// Stops every node and removes their folders.
    pub fn stop(&self) {
        for n in &self.nodes {
            n.stop();
        }
    }
}

/// A running private node.
#[derive(Debug)]
pub struct PrivateBroker {
    pub node: String,
    pub port: u16,
    pub dir: PathBuf,
}

/// A free TCP port on loopback (for a second listener of a node).
pub fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl PrivateBroker {
    /// Starts a node under `dir` and waits (up to 60 s) until it accepts connections.
    pub fn start(dir: &Path) -> anyhow::Result<PrivateBroker> {
        PrivateBroker::start_with(dir, &NodeConfig::default())
    }

    /// Starts a node with `config` under `dir` (files it names may live there too: the
    /// folder is handed to the `rabbitmq` user) and waits until every listener answers.
    pub fn start_with(dir: &Path, config: &NodeConfig) -> anyhow::Result<PrivateBroker> {
        let broker = PrivateBroker::prepare(dir, config)?;
        broker.launch()?;
        broker.wait_up(config.tls.as_ref().map(|t| t.port), Duration::from_secs(60))?;
        Ok(broker)
    }

    /// Writes the node's folder and configuration (its own name, ports, data): nothing runs
    /// yet.
    pub fn prepare(dir: &Path, config: &NodeConfig) -> anyhow::Result<PrivateBroker> {
        if !installed() {
            bail!("RabbitMQ is not installed: apt-get install rabbitmq-server (or pass --url to a broker)");
        }
        let port = free_port()?;
        let node = format!("tunbus-{}-{port}@localhost", std::process::id());
        std::fs::create_dir_all(dir.join("log"))?;
        std::fs::create_dir_all(dir.join("mnesia"))?;
        std::fs::write(dir.join("enabled_plugins"), format!("[{}].\n", config.plugins.join(",")))?;
        let mut conf = vec!["loopback_users = none".to_owned()];
        if let Some(t) = &config.tls {
            conf.push(format!("listeners.ssl.default = 127.0.0.1:{}", t.port));
            conf.push(format!("ssl_options.cacertfile = {}", t.ca.display()));
            conf.push(format!("ssl_options.certfile = {}", t.cert.display()));
            conf.push(format!("ssl_options.keyfile = {}", t.key.display()));
            conf.push(format!("ssl_options.verify = {}", if t.verify_peer { "verify_peer" } else { "verify_none" }));
            conf.push("ssl_options.fail_if_no_peer_cert = false".to_owned());
        }
        conf.extend(config.extra.iter().cloned());
        std::fs::write(dir.join("rabbitmq.conf"), conf.join("\n") + "\n")?;
        // Debian's rabbitmq-server drops root privileges to the `rabbitmq` user, which must
        // own the node's folder (where there is no such user, the server runs as us).
        let _ = Command::new("chown").args(["-R", "rabbitmq:rabbitmq"]).arg(dir).stderr(Stdio::null()).status();
        Ok(PrivateBroker { node, port, dir: dir.to_owned() })
    }

    /// Starts the prepared node (again, after a crash: same name, ports and data, so a
    /// cluster member rejoins its cluster).
    pub fn launch(&self) -> anyhow::Result<()> {
        let debian = Path::new("/usr/lib/rabbitmq/bin/rabbitmq-server").exists()
            && Command::new("id").arg("rabbitmq").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
        let mut start = if debian {
            let mut c = self.command("su");
            c.args(["rabbitmq", "-s", "/bin/sh", "-c", RAISED_START]);
            c
        } else {
            let mut c = self.command("rabbitmq-server");
            c.arg("-detached");
            c
        };
        let status = start.stdout(Stdio::null()).stderr(Stdio::null()).status().context("starting rabbitmq-server")?;
        if !status.success() {
            bail!("rabbitmq-server -detached failed ({status}); logs in {}", self.dir.join("log").display());
        }
        Ok(())
    }

    /// Waits until the node's AMQP port (and `tls_port`) answer; stops it on failure.
    pub fn wait_up(&self, tls_port: Option<u16>, limit: Duration) -> anyhow::Result<()> {
        let t0 = Instant::now();
        let ports: Vec<u16> = std::iter::once(self.port).chain(tls_port).collect();
        while !ports.iter().all(|p| answers(&format!("127.0.0.1:{p}"))) {
            if t0.elapsed() > limit {
                let log = std::fs::read_dir(self.dir.join("log"))
                    .ok()
                    .and_then(|d| d.flatten().find(|e| e.file_name().to_string_lossy().ends_with("@localhost.log")))
                    .and_then(|e| std::fs::read_to_string(e.path()).ok())
                    .map(|t| t.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n"))
                    .unwrap_or_default();
                self.stop();
                bail!("the private RabbitMQ node did not come up in {} s; its log ended with:\n{log}", limit.as_secs());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// Kills the node hard (SIGKILL of its Erlang VM), as a crashed machine would; its
    /// folder stays, so [`PrivateBroker::launch`] brings it back.
    pub fn kill(&self) -> anyhow::Result<()> {
        let pid = self.os_pid().context("the node has no pid file")?;
        let status = Command::new("kill").args(["-9", &pid.to_string()]).status().context("kill")?;
        if !status.success() {
            bail!("kill -9 {pid} failed");
        }
        let t0 = Instant::now();
        while answers(&format!("127.0.0.1:{}", self.port)) && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Runs `rabbitmqctl -n NODE args…`; its stdout, or an error with its stderr.
    pub fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.command("rabbitmqctl").arg("-n").arg(&self.node).args(args).output().context("running rabbitmqctl")?;
        if !out.status.success() {
            bail!("rabbitmqctl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The node's Erlang pid (`beam.smp`), to kill it hard.
    pub fn os_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("pid")).ok()?.trim().parse().ok()
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_DIST_PORT", (self.port + 20_000).to_string())
            .env("RABBITMQ_MNESIA_BASE", self.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.dir.join("log"))
            .env("RABBITMQ_PID_FILE", self.dir.join("pid"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", self.dir.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", self.dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", self.dir.join("none-advanced.config"));
        c
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Stops the node (waits for it) and removes its data directory. A node that does not
    /// stop (still booting, or wedged) is killed: every process started with this node's
    /// name in its environment, which is only ever this node's Erlang VM and helpers (node
    /// names hold the lab's pid and port).
    pub fn stop(&self) {
        let _ = self.command("rabbitmqctl").args(["-n", &self.node, "stop"]).stdout(Stdio::null()).stderr(Stdio::null()).status();
        for pid in processes_of_node(&self.node) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).stderr(Stdio::null()).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_keeps_a_fifth_to_spare() {
        let c = Capacity { sockets_free: 832, memory_free: 8 << 30 };
        assert!(c.holds(600));
        assert!(!c.holds(1000), "832 sockets do not hold 1000 agents");
        assert!(!Capacity { sockets_free: 100_000, memory_free: 10 << 20 }.holds(1000), "nor 10 MiB of memory");
    }
}
