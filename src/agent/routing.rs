//! The host side of subnet routing (decision 0027): what `--advertise`, `--masquerade`
//! and `--accept-routes` change on the agent's host (its namespace), and how it is undone.
//!
//! - `--advertise`: the gateway's kernel forwards what the agent writes into its TUN, so
//!   forwarding is turned on in the agent's namespace (IPv4 and/or IPv6, for the families
//!   advertised); the old value is put back on exit when the agent changed it.
//! - `--masquerade`: an nftables table of the agent's own, `inet tunbus_<name>`, with one
//!   rule: what comes in from the bus and leaves by another interface takes the gateway's
//!   address. Deleted on exit; a start replaces a table a killed run left behind, and
//!   `agent connect --name NAME [--netns NS] --cleanup` removes it without a start
//!   ([`cleanup_after_kill`]); by hand: `nft delete table inet tunbus_<name>`.
//! - `--accept-routes`: a thread follows the compiled route table ([`RouteShare`], kept by
//!   queue 0) and keeps one kernel route per advertised prefix on the interface (`ip route
//!   replace PREFIX dev IFNAME`), deleting those whose advertisement went; on exit it
//!   deletes what it installed (the kernel also drops them with the interface).
//! - `--route PREFIX=NEXTHOP`: one kernel route per prefix on the interface, made at start
//!   (a failure stops the start) and deleted on exit; the next hop itself is the senders'
//!   business (`route::table::StaticRoute`).
//!
//! Control plane only; runs `ip` and `nft` as the interface set-up does.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::config::AgentConfig;
use crate::exit::{Exit, Failure};
use crate::route::table::RouteShare;
use crate::route::Prefix;
use crate::tun::netns;
use crate::util::Stop;

/// How often the route installer looks at the table.
const FOLLOW_EVERY: Duration = Duration::from_millis(100);

/// The nftables table of agent `name`: `tunbus_` and the name, every character that is no
/// letter or digit written `_`.
pub fn nft_table(name: &str) -> String {
    let clean: String = name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    format!("tunbus_{clean}")
}

/// The nft script that (re)creates the masquerade table of an agent on `ifname`: it
/// deletes a table of the same name first (a killed run's), so a start never fails on it.
pub fn masquerade_script(table: &str, ifname: &str) -> String {
    format!(
        "table inet {table} {{}}\ndelete table inet {table}\ntable inet {table} {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    iifname \"{ifname}\" oifname != \"{ifname}\" masquerade\n  }}\n}}\n"
    )
}

/// What this agent changed on its host for routing, undone by [`HostRouting::stop`] (or
/// on drop).
pub struct HostRouting {
    netns: Option<String>,
    /// Sysctls to put back: (key, old value).
    restore: Vec<(String, String)>,
    /// The masquerade table, when made.
    nft: Option<String>,
    installer: Option<JoinHandle<()>>,
    /// Kernel routes of `--route` into the interface, deleted on exit.
    statics: Vec<Prefix>,
    ifname: String,
    stop: Stop,
}

fn read_sysctl(netns: Option<&str>, key: &str) -> Option<String> {
    let path = format!("/proc/sys/{key}");
    netns::in_netns(netns, || std::fs::read_to_string(&path)).ok().map(|s| s.trim().to_owned())
}

/// Runs `nft -f -` with `script` in `netns`.
fn nft(netns: Option<&str>, script: &str) -> Result<(), String> {
    let out = netns::in_netns(netns, || {
        let mut child = Command::new("nft").args(["-f", "-"]).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(script.as_bytes())?;
        }
        child.wait_with_output()
    })
    .map_err(|e| format!("cannot run nft (install nftables): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// `agent connect --name NAME --cleanup`: deletes the masquerade table a killed agent of
/// `name` left in `netns` (the forwarding sysctl it turned on stays: its old value died with
/// the agent). Says what it did.
pub fn cleanup_after_kill(name: &str, netns: Option<&str>) -> Result<String, String> {
    let table = nft_table(name);
    let place = netns.map(|n| format!(" in namespace {n}")).unwrap_or_default();
    if netns.is_some_and(|n| !netns::namespace_exists(n)) {
        return Ok(format!("nothing to remove: no namespace{place}"));
    }
    // Listing first tells a table that is there from one that is not.
    let existed = netns::in_netns(netns, || Command::new("nft").args(["list", "table", "inet", &table]).stdout(Stdio::null()).stderr(Stdio::null()).status())
        .map_err(|e| format!("cannot run nft (install nftables): {e}"))?
        .success();
    if !existed {
        return Ok(format!("nothing to remove: no nftables table inet {table}{place}"));
    }
    nft(netns, &format!("delete table inet {table}\n")).map_err(|e| format!("cannot delete nftables table inet {table}{place}: {e}"))?;
    Ok(format!("removed nftables table inet {table}{place} (the masquerade of a killed agent {name})"))
}

impl HostRouting {
    /// Sets up what `config` asks for; `share` is the table queue 0 keeps.
    pub fn start(config: &AgentConfig, share: Arc<RouteShare>, stop: Stop) -> Result<HostRouting, Failure> {
        let r = config.routing();
        let iface = config.interface();
        let ns = iface.netns.clone();
        let mut host = HostRouting {
            netns: ns.clone(),
            restore: Vec::new(),
            nft: None,
            installer: None,
            statics: Vec::new(),
            ifname: iface.ifname.clone(),
            stop: stop.clone(),
        };
        let ns = ns.as_deref();
        for route in &r.routes {
            route_into(ns, &route.prefix, &iface.ifname)
                .map_err(|e| Failure::new(Exit::Local, format!("--route {route}: cannot route {} into {}: {e}", route.prefix, iface.ifname)))?;
            host.statics.push(route.prefix);
        }
        let families = [(true, "net/ipv4/ip_forward"), (false, "net/ipv6/conf/all/forwarding")];
        for (v4, key) in families {
            if !r.advertise.iter().any(|p| p.addr.is_ipv4() == v4) {
                continue;
            }
            let old = read_sysctl(ns, key);
            if old.as_deref() != Some("1") {
                netns::set_sysctl(ns, key, "1").map_err(|e| Failure::new(Exit::Local, format!("--advertise: cannot turn on forwarding ({key}): {e}")))?;
                if let Some(old) = old {
                    host.restore.push((key.to_owned(), old));
                }
                tracing::info!(agent = %config.name(), netns = ns.unwrap_or("-"), key, "forwarding on (the gateway's kernel forwards what the bus sends to its prefixes)");
            }
        }
        if r.masquerade {
            let table = nft_table(config.name());
            nft(ns, &masquerade_script(&table, &iface.ifname))
                .map_err(|e| Failure::new(Exit::Local, format!("--masquerade: cannot make nftables table inet {table}: {e}")))?;
            tracing::info!(agent = %config.name(), table = %format!("inet {table}"), "masquerade on: the bus appears behind this gateway's addresses on its other networks");
            host.nft = Some(table);
        }
        if r.accept_routes {
            let (ifname, ns, name) = (iface.ifname.clone(), host.netns.clone(), config.name().to_string());
            let handle = std::thread::Builder::new()
                .name(format!("routes-{name}"))
                .spawn(move || follow(&share, ns.as_deref(), &ifname, &name, &stop))
                .map_err(|e| Failure::new(Exit::Local, format!("spawning the route installer: {e}")))?;
            host.installer = Some(handle);
        }
        Ok(host)
    }

    /// Undoes what [`HostRouting::start`] did (idempotent).
    pub fn stop(&mut self) {
        self.stop.raise();
        if let Some(h) = self.installer.take() {
            let _ = h.join();
        }
        let ns = self.netns.as_deref();
        for p in self.statics.drain(..) {
            // Gone already when the interface went first.
            unroute(ns, &p, &self.ifname);
        }
        if let Some(table) = self.nft.take() {
            if let Err(e) = nft(ns, &format!("delete table inet {table}\n")) {
                tracing::warn!(table = %table, error = %e, "cannot delete the masquerade table; delete it with `nft delete table inet {table}`");
            }
        }
        for (key, old) in self.restore.drain(..) {
            let _ = netns::set_sysctl(ns, &key, &old);
        }
    }
}

impl Drop for HostRouting {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Keeps the kernel's routes on `ifname` equal to the advertised prefixes until `stop`,
/// then deletes them.
fn follow(share: &RouteShare, ns: Option<&str>, ifname: &str, agent: &str, stop: &Stop) {
    let mut installed: BTreeSet<(IpAddr, u8)> = BTreeSet::new();
    let mut seen = u64::MAX;
    while !stop.is_raised() {
        let v = share.version();
        if v != seen {
            seen = v;
            let want: BTreeSet<(IpAddr, u8)> = share.table().routes().iter().map(|r| (r.prefix.addr, r.prefix.len)).collect();
            for &(addr, len) in want.difference(&installed.clone()) {
                let p = Prefix { addr, len };
                match route_into(ns, &p, ifname) {
                    Ok(_) => {
                        tracing::info!(agent, prefix = %p, dev = ifname, "route installed (--accept-routes)");
                        installed.insert((addr, len));
                    }
                    Err(e) => tracing::warn!(agent, prefix = %p, error = %e, "cannot install the route"),
                }
            }
            for &(addr, len) in installed.clone().difference(&want) {
                let p = Prefix { addr, len };
                unroute(ns, &p, ifname);
                tracing::info!(agent, prefix = %p, dev = ifname, "route removed: its advertisement went");
                installed.remove(&(addr, len));
            }
        }
        std::thread::sleep(FOLLOW_EVERY);
    }
    for (addr, len) in installed {
        unroute(ns, &Prefix { addr, len }, ifname);
    }
}

/// `ip route replace PREFIX dev IFNAME` in `ns`: what `--accept-routes` and `--route` install.
fn route_into(ns: Option<&str>, prefix: &Prefix, ifname: &str) -> Result<String, netns::Error> {
    netns::ip(ns, &["route", "replace", &prefix.to_string(), "dev", ifname])
}

/// Deletes a route [`route_into`] made (one already gone is no error).
fn unroute(ns: Option<&str>, prefix: &Prefix, ifname: &str) {
    let _ = netns::ip(ns, &["route", "del", &prefix.to_string(), "dev", ifname]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nft_names_and_scripts() {
        assert_eq!(nft_table("gw-1"), "tunbus_gw_1");
        assert_eq!(nft_table("GW_2"), "tunbus_GW_2");
        let s = masquerade_script("tunbus_gw", "tb0");
        assert!(s.starts_with("table inet tunbus_gw {}\ndelete table inet tunbus_gw\n"), "{s}");
        assert!(s.contains("iifname \"tb0\" oifname != \"tb0\" masquerade"), "{s}");
    }
}
