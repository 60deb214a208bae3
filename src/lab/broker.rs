//! A private RabbitMQ node for a lab when no broker answers: its own node name, port and
//! data directory under a temporary folder, stopped and removed when the lab ends.
//!
//! Control plane, run from the lab's thread. It drives Debian's `rabbitmq-server` and
//! `rabbitmqctl` with environment variables (the documented way to run several nodes on
//! one host), and disables every plugin so that no other port (management, Prometheus)
//! is opened.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Whether something accepts TCP connections on `addr`.
pub fn answers(addr: &str) -> bool {
    addr.parse::<SocketAddr>()
        .map(|a| TcpStream::connect_timeout(&a, Duration::from_millis(500)).is_ok())
        .unwrap_or(false)
}

/// Whether the RabbitMQ server programs are installed.
pub fn installed() -> bool {
    ["/usr/sbin/rabbitmq-server", "/usr/lib/rabbitmq/bin/rabbitmq-server"].iter().any(|p| Path::new(p).exists())
        || Command::new("sh").args(["-c", "command -v rabbitmq-server"]).stdout(Stdio::null()).status().map(|s| s.success()).unwrap_or(false)
}

/// The open-files limit the default local node reports (`rabbitmqctl status`), if it can
/// be asked. Each AMQP connection takes one.
pub fn local_fd_limit() -> Option<usize> {
    let out = Command::new("rabbitmqctl").args(["status", "--formatter", "json"]).stderr(Stdio::null()).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    status.get("file_descriptors")?.get("total_limit")?.as_u64().map(|n| n as usize)
}

/// Debian's `rabbitmq-server` wrapper starts the node through `su rabbitmq`, whose soft
/// limit of open files is 1024, too few for a large lab: start it the wrapper's way with
/// the limit raised to the hard limit (at most 65536). Elsewhere, the plain command.
const RAISED_START: &str = "cd /var/lib/rabbitmq 2>/dev/null; n=$(ulimit -Hn); \
    if [ \"$n\" = unlimited ] || [ \"$n\" -gt 65536 ]; then n=65536; fi; ulimit -Sn \"$n\"; \
    exec /usr/lib/rabbitmq/bin/rabbitmq-server -detached";

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

/// A running private node.
#[derive(Debug)]
pub struct PrivateBroker {
    pub node: String,
    pub port: u16,
    pub dir: PathBuf,
}

impl PrivateBroker {
    /// Starts a node under `dir` and waits (up to 60 s) until it accepts connections.
    pub fn start(dir: &Path) -> anyhow::Result<PrivateBroker> {
        if !installed() {
            bail!("RabbitMQ is not installed: apt-get install rabbitmq-server (or pass --url to a broker)");
        }
        let port = free_port()?;
        let node = format!("tunbus-{}-{port}@localhost", std::process::id());
        std::fs::create_dir_all(dir.join("log"))?;
        std::fs::create_dir_all(dir.join("mnesia"))?;
        std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
        // Debian's rabbitmq-server drops root privileges to the `rabbitmq` user, which must
        // own the node's folder (where there is no such user, the server runs as us).
        let _ = Command::new("chown").args(["-R", "rabbitmq:rabbitmq"]).arg(dir).stderr(Stdio::null()).status();
        let broker = PrivateBroker { node, port, dir: dir.to_owned() };
        let debian = Path::new("/usr/lib/rabbitmq/bin/rabbitmq-server").exists()
            && Command::new("id").arg("rabbitmq").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
        let mut start = if debian {
            let mut c = broker.command("su");
            c.args(["rabbitmq", "-s", "/bin/sh", "-c", RAISED_START]);
            c
        } else {
            let mut c = broker.command("rabbitmq-server");
            c.arg("-detached");
            c
        };
        let status = start
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("starting rabbitmq-server")?;
        if !status.success() {
            bail!("rabbitmq-server -detached failed ({status}); logs in {}", dir.join("log").display());
        }
        let t0 = Instant::now();
        while !answers(&format!("127.0.0.1:{port}")) {
            if t0.elapsed() > Duration::from_secs(60) {
                broker.stop();
                bail!("the private RabbitMQ node did not come up in 60 s; logs in {}", dir.join("log").display());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(broker)
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
            .env("RABBITMQ_CONFIG_FILE", self.dir.join("none"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", self.dir.join("none-advanced.config"));
        c
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Stops the node (waits for it) and removes its data directory.
    pub fn stop(&self) {
        let _ = self.command("rabbitmqctl").args(["-n", &self.node, "stop"]).stdout(Stdio::null()).stderr(Stdio::null()).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
