//! `agent lab --l2 --dhcp`: h1 serves DHCP on its TAP (`dnsmasq`), every other host leases
//! its IPv4 address over the bus (`busybox udhcpc`), as hosts on a real LAN do.
//!
//! h1 keeps its planned addresses; the others start with their IPv6 address only. The
//! server hands each host its planned IPv4 address by MAC (a `dhcp-hostsfile`, so the
//! lab's checks ping the addresses they always do), and nothing to unknown MACs. Each
//! client asks, applies its lease with a script and exits (`-q`): only the server runs on,
//! killed at teardown; its PID file lets `--cleanup` (or the next run after a kill) end it.
//! Files live in `$TMPDIR/tunbus-dhcp-<SESSION>/`.
//!
//! Main thread and the runtime; not on the hot path.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::checks::which;
use super::Lab;

/// How long every host has to lease its address.
const LEASE_WITHIN: Duration = Duration::from_secs(30);

/// The client's script: applies a lease (udhcpc calls it with `bound` or `renew`).
const CLIENT_SCRIPT: &str = "#!/bin/sh\ncase \"$1\" in\n  bound|renew) ip addr add \"$ip/$subnet\" dev \"$interface\" ;;\nesac\nexit 0\n";

/// The lab's DHCP server, killed on drop.
pub(super) struct DhcpServer {
    child: Child,
    dir: PathBuf,
}

impl Drop for DhcpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Where a session's DHCP files are.
pub fn dhcp_dir(session: &str) -> PathBuf {
    std::env::temp_dir().join(format!("tunbus-dhcp-{session}"))
}

/// Ends the DHCP server a killed lab of `session` left, and removes its files. Only a
/// process whose command is `dnsmasq` and whose PID the lab wrote is ended.
pub(super) fn cleanup(session: &str) {
    let dir = dhcp_dir(session);
    let pid = std::fs::read_to_string(dir.join("dnsmasq.pid")).ok().and_then(|t| t.trim().parse::<i32>().ok());
    if let Some(pid) = pid {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "dnsmasq" {
            let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).stderr(Stdio::null()).status();
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

impl Lab {
    /// Starts dnsmasq in h1's namespace on its TAP, serving every other host its planned
    /// IPv4 address by MAC.
    pub(super) fn start_dhcp(&self) -> anyhow::Result<DhcpServer> {
        let (Some(dnsmasq), Some(_)) = (which("dnsmasq"), which("busybox")) else {
            bail!("--dhcp needs dnsmasq and busybox: apt-get install dnsmasq-base busybox (scripts/setup.sh does)");
        };
        cleanup(&self.opts.session);
        let dir = dhcp_dir(&self.opts.session);
        std::fs::create_dir_all(&dir).with_context(|| format!("making {}", dir.display()))?;
        let hosts: String = self.agents.iter().zip(&self.hosts).skip(1).map(|(a, h)| format!("{},{}\n", a.config().mac(), h.v4)).collect();
        std::fs::write(dir.join("hosts"), hosts).context("writing the DHCP hosts file")?;
        std::fs::write(dir.join("udhcpc.sh"), CLIENT_SCRIPT).context("writing the DHCP client script")?;
        std::fs::set_permissions(dir.join("udhcpc.sh"), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let server = &self.hosts[0];
        let arg = |k: &str, p: &str| format!("--{k}={}", dir.join(p).display());
        let child = Command::new("ip")
            .args(["netns", "exec", &server.netns])
            .arg(dnsmasq)
            .args(["--keep-in-foreground", "--no-resolv", "--no-hosts", "--port=0", "--interface=tb0", "--bind-interfaces"])
            .arg("--dhcp-range=198.18.0.0,static,255.254.0.0,1h")
            .arg(arg("dhcp-hostsfile", "hosts"))
            .arg(arg("dhcp-leasefile", "leases"))
            .arg(arg("pid-file", "dnsmasq.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting dnsmasq in h1")?;
        Ok(DhcpServer { child, dir })
    }

    /// Every host but h1 leases its address (all at once); the hosts that did not, with why.
    pub(super) async fn lease_all(&self) -> (usize, Vec<String>) {
        let dir = dhcp_dir(&self.opts.session);
        let script = dir.join("udhcpc.sh");
        let mut clients = Vec::new();
        for h in self.hosts.iter().skip(1) {
            let child = tokio::process::Command::new("ip")
                .args(["netns", "exec", &h.netns, "busybox", "udhcpc", "-f", "-q", "-n", "-t", "15", "-T", "2", "-i", "tb0", "-s"])
                .arg(&script)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn();
            clients.push((h.clone(), child));
        }
        let t0 = Instant::now();
        let mut leased = 0;
        let mut failures = Vec::new();
        for (h, child) in clients {
            let left = LEASE_WITHIN.saturating_sub(t0.elapsed());
            let outcome = match child {
                Err(e) => Err(format!("udhcpc did not start: {e}")),
                Ok(mut c) => match tokio::time::timeout(left, c.wait()).await {
                    Ok(Ok(s)) if s.success() => Ok(()),
                    Ok(Ok(s)) => Err(format!("udhcpc got no lease ({s})")),
                    Ok(Err(e)) => Err(format!("udhcpc: {e}")),
                    Err(_) => Err(format!("no lease within {} s", LEASE_WITHIN.as_secs())),
                },
            };
            let has = crate::tun::netns::ip(Some(&h.netns), &["-4", "-o", "addr", "show", "dev", "tb0"]).unwrap_or_default().contains(&format!("{}/", h.v4));
            match (outcome, has) {
                (Ok(()), true) => leased += 1,
                (Ok(()), false) => failures.push(format!("{}: leased, but {} is not on its TAP", h.name, h.v4)),
                (Err(why), _) => failures.push(format!("{}: {why}", h.name)),
            }
        }
        (leased, failures)
    }
}
