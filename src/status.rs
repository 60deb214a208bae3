//! `agent status`: ask a running agent how it is, over a local control socket.
//!
//! Each agent listens on `<dir>/<name>.sock` (`--status-dir`, default `/run/tunbus`; the
//! folder is made root-only, the socket 0600). A client connects and reads one JSON
//! document, [`Status`], then the agent closes: there is no request to parse, so nothing a
//! client writes can reach the agent. The report inside is the one `--stats-json` writes at
//! exit, so scripts read both the same way. An agent removes its socket when it stops; one
//! killed with SIGKILL cannot, and `agent status` removes what such an agent left (as the
//! next start of an agent of that name would).

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use crate::metrics::report::Report;

pub use crate::metrics::LinkState;

/// One queue's link as `agent status` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct QueueStatus {
    pub queue: usize,
    pub connected: bool,
    /// The broker node's URL (password masked), when connected.
    pub node: Option<String>,
}

/// Rates over the last second the server sampled.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Rates {
    pub tx_pps: f64,
    pub tx_bps: f64,
    pub rx_pps: f64,
    pub rx_bps: f64,
}

/// A peer this agent accepts packets from, and its addresses: heard in hellos (first
/// claim) or listed in the peers file (strict).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PeerStatus {
    pub user: String,
    pub addresses: Vec<String>,
}

/// A prefix some gateway advertises, and which gateway this agent sends it to
/// (decision 0027).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RouteStatus {
    pub prefix: String,
    pub gateway: String,
    /// Other advertisers of the same prefix, in the order they would take over.
    pub standby: Vec<String>,
}

/// What `agent status` reads from one agent.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub agent: String,
    pub pid: u32,
    pub session: Option<String>,
    pub wire: String,
    pub interface: String,
    pub netns: Option<String>,
    pub queues: Vec<QueueStatus>,
    pub rates: Rates,
    /// `strict` (the peers file), `first-claim` (hellos) or `off`.
    pub identity: String,
    pub peers: Vec<PeerStatus>,
    /// The advertised prefixes this agent routes by (absent from older agents' answers).
    #[serde(default)]
    pub routes: Vec<RouteStatus>,
    /// The same report `--stats-json` writes at exit.
    pub report: serde_json::Value,
}

/// Where agents put their sockets unless told: `/run/tunbus` for root; for anyone else (a
/// userspace agent run without privileges) `$XDG_RUNTIME_DIR/tunbus`, else
/// `/tmp/tunbus-<uid>`. `agent status` looks in the same place.
pub fn default_dir() -> PathBuf {
    let uid = crate::sys::euid();
    if uid == 0 {
        return PathBuf::from(crate::config::RUN_DIR);
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => Path::new(&d).join("tunbus"),
        _ => std::env::temp_dir().join(format!("tunbus-{uid}")),
    }
}

/// The socket of agent `name` in `dir`.
pub fn socket_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.sock"))
}

/// Binds `<dir>/<name>.sock`, root-only. A socket left by an agent that died is replaced;
/// one that answers belongs to a live agent of the same name on this host: an error.
pub fn bind(dir: &Path, name: &str) -> std::io::Result<(tokio::net::UnixListener, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let path = socket_path(dir, name);
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Err(std::io::Error::new(std::io::ErrorKind::AddrInUse, format!("{} answers: another agent {name} runs on this host", path.display())));
        }
        std::fs::remove_file(&path)?;
    }
    let listener = tokio::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok((listener, path))
}

/// Serves `status()` to every client until `stop`, then removes the socket. `sample` is
/// called once a second for (tx packets, tx bytes, rx packets, rx bytes), for the rates.
pub async fn serve(
    listener: tokio::net::UnixListener,
    path: PathBuf,
    status: Arc<dyn Fn(Rates) -> Status + Send + Sync>,
    sample: Arc<dyn Fn() -> [u64; 4] + Send + Sync>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let (mut last, mut last_at) = (sample(), Instant::now());
    let mut rates = Rates::default();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = tick.tick() => {
                let (now, at) = (sample(), Instant::now());
                let dt = at.duration_since(last_at).as_secs_f64().max(1e-3);
                let per_s = |i: usize| now[i].saturating_sub(last[i]) as f64 / dt;
                rates = Rates { tx_pps: per_s(0), tx_bps: per_s(1) * 8.0, rx_pps: per_s(2), rx_bps: per_s(3) * 8.0 };
                (last, last_at) = (now, at);
            }
            accepted = listener.accept() => {
                let Ok((mut stream, _)) = accepted else { continue };
                let body = serde_json::to_vec(&status(rates)).unwrap_or_default();
                // One slow client never holds the others: each reply is its own task.
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(2), async {
                        let _ = stream.write_all(&body).await;
                        let _ = stream.shutdown().await;
                    })
                    .await;
                });
            }
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// Builds the report part from a [`Report`].
pub fn report_value(report: &Report) -> serde_json::Value {
    serde_json::to_value(report).unwrap_or_default()
}

/// Reads the status of the agent whose socket is `path`.
pub fn query(path: &Path) -> Result<Status, String> {
    let mut stream = std::os::unix::net::UnixStream::connect(path).map_err(|e| format!("{}: {e} (is the agent running? status needs root)", path.display()))?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(3)));
    let mut body = Vec::new();
    stream.read_to_end(&mut body).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_slice(&body).map_err(|e| format!("{}: not a status reply: {e}", path.display()))
}

/// Whether `path` is a socket no agent listens on any more (its agent was killed before it
/// could remove it): connecting is refused.
pub fn is_stale(path: &Path) -> bool {
    matches!(std::os::unix::net::UnixStream::connect(path), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// The sockets in `dir`: every agent's, or only those of `names`.
pub fn sockets(dir: &Path, names: &[String]) -> Result<Vec<PathBuf>, String> {
    if !names.is_empty() {
        return Ok(names.iter().map(|n| socket_path(dir, n)).collect());
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e} (status needs root)", dir.display())),
    };
    let mut all: Vec<PathBuf> = entries.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "sock")).collect();
    all.sort();
    Ok(all)
}

/// Waits up to `limit` until the agents of `names` (or, with none, at least one agent) in
/// `dir` answer with every link connected; what is still missing when it gives up.
pub fn wait_connected(dir: &Path, names: &[String], limit: Duration) -> Result<(), String> {
    let t0 = std::time::Instant::now();
    loop {
        let missing: Vec<String> = match sockets(dir, names) {
            Ok(all) if all.is_empty() => vec!["an agent".to_owned()],
            Ok(all) => all
                .iter()
                .filter(|p| !query(p).is_ok_and(|s| !s.queues.is_empty() && s.queues.iter().all(|q| q.connected)))
                .map(|p| p.file_stem().map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into_owned()))
                .collect(),
            Err(e) => return Err(e),
        };
        if missing.is_empty() {
            return Ok(());
        }
        if t0.elapsed() >= limit {
            return Err(format!("not up with every link connected after {:.0} s: {}", limit.as_secs_f64(), missing.join(", ")));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A rate in bits/s, written as the reports write theirs.
fn rate(bits_per_s: f64) -> String {
    crate::metrics::report::bits_per_s((bits_per_s / 8.0) as u64, Duration::from_secs(1))
}

impl std::fmt::Display for Status {
    /// The `wg show` shape: one block per agent.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = &self.report;
        let n = |k: &str| r[k].as_u64().unwrap_or(0);
        writeln!(f, "agent: {} (pid {})", self.agent, self.pid)?;
        let netns = self.netns.as_deref().map(|n| format!(" in netns {n}")).unwrap_or_default();
        let session = self.session.as_deref().map(|s| format!(", session {s}")).unwrap_or_default();
        writeln!(f, "  interface: {}{netns}, wire {}{session}, up {:.0} s", self.interface, self.wire, r["uptime_s"].as_f64().unwrap_or(0.0))?;
        for q in &self.queues {
            match &q.node {
                Some(node) if q.connected => writeln!(f, "  queue {}: connected to {node}", q.queue)?,
                _ => writeln!(f, "  queue {}: not connected (retrying)", q.queue)?,
            }
        }
        writeln!(
            f,
            "  transfer: {} packets {} B sent, {} packets {} B received, {} reconnects",
            n("tx_packets"),
            n("tx_bytes"),
            n("rx_packets"),
            n("rx_bytes"),
            n("reconnects")
        )?;
        writeln!(f, "  rates: tx {} {:.0} pkt/s, rx {} {:.0} pkt/s", rate(self.rates.tx_bps), self.rates.tx_pps, rate(self.rates.rx_bps), self.rates.rx_pps)?;
        let drops: Vec<String> = r["drops"].as_array().into_iter().flatten().filter_map(|d| Some(format!("{} {}", d[0].as_str()?, d[1].as_u64()?))).collect();
        writeln!(f, "  drops: {}", if drops.is_empty() { "none".to_owned() } else { drops.join(", ") })?;
        let p = &r["serial"];
        if p.is_object() {
            let c = |k: &str| p[k].as_u64().unwrap_or(0);
            writeln!(
                f,
                "  serial probe: {}, {} frames in, {} out; malformed {} (bad_escape {}, too_long {}, noise {}); lost unplugged {}, busy {}; outages {}",
                if p["connected"].as_bool().unwrap_or(false) { "connected" } else { "AWAY (reopening every 250 ms)" },
                c("frames_in"),
                c("frames_out"),
                c("bad_escape") + c("too_long") + c("noise"),
                c("bad_escape"),
                c("too_long"),
                c("noise"),
                c("lost_unplugged"),
                c("lost_busy"),
                c("outages")
            )?;
        }
        let l = &r["latency"];
        let ms = |k: &str| l[k].as_u64().unwrap_or(0) as f64 / 1000.0;
        writeln!(
            f,
            "  latency: p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms ({} samples)",
            ms("p50_us"),
            ms("p99_us"),
            ms("p999_us"),
            l["samples"].as_u64().unwrap_or(0)
        )?;
        if !self.routes.is_empty() {
            writeln!(f, "  routes (advertised):")?;
            for r in &self.routes {
                let standby = if r.standby.is_empty() { String::new() } else { format!(" (standby: {})", r.standby.join(", ")) };
                writeln!(f, "    {} via {}{standby}", r.prefix, r.gateway)?;
            }
        }
        if self.peers.is_empty() {
            writeln!(f, "  peers ({}): none yet", self.identity)
        } else {
            writeln!(f, "  peers ({}):", self.identity)?;
            for p in &self.peers {
                writeln!(f, "    {}: {}", p.user, p.addresses.join(", "))?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_lists_only_sockets_in_order() {
        let dir = std::env::temp_dir().join(format!("tunbus-status-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["b.sock", "a.sock", "notes.txt"] {
            std::fs::write(dir.join(f), b"").unwrap();
        }
        let names: Vec<String> = sockets(&dir, &[]).unwrap().iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["a.sock", "b.sock"]);
        assert_eq!(sockets(&dir, &["h9".to_owned()]).unwrap(), [dir.join("h9.sock")]);
        assert!(sockets(&dir.join("missing"), &[]).unwrap().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
