//! Interface configuration: namespace move, rename, MTU, addresses, link state.
//!
//! Control plane only (start-up and shutdown, never per packet), so it drives iproute2's
//! `ip` command rather than speaking rtnetlink itself: one well-known tool, whose error
//! messages we pass on verbatim. Run from the thread that starts the agent.
//!
//! Sysctls of an interface inside a namespace are written from a short-lived thread that
//! has joined that namespace (`setns(2)` changes only the calling thread's namespace, and
//! `/proc/sys/net` shows the namespace of the thread that opens it): hundreds of agents
//! come up without spawning a process each.

use std::net::IpAddr;
use std::path::Path;
use std::process::Command;

use crate::route::Prefix;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("network namespace {0:?} does not exist (create it with `ip netns add {0}`)")]
    NoNamespace(String),
    #[error("interface {name:?} already exists{}", ns_suffix(.netns))]
    Exists { name: String, netns: Option<String> },
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("cannot run `ip` (install iproute2): {0}")]
    Spawn(std::io::Error),
}

fn ns_suffix(netns: &Option<String>) -> String {
    netns.as_ref().map(|n| format!(" in namespace {n}")).unwrap_or_default()
}

/// Runs `ip [-n netns] args…`, returning stdout.
pub fn ip(netns: Option<&str>, args: &[&str]) -> Result<String, Error> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    cmd.args(args);
    let out = cmd.output().map_err(Error::Spawn)?;
    if !out.status.success() {
        let mut command = String::from("ip");
        if let Some(ns) = netns {
            command.push_str(&format!(" -n {ns}"));
        }
        for a in args {
            command.push(' ');
            command.push_str(a);
        }
        return Err(Error::Command { command, stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned() });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn namespace_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

/// Whether `name` exists in `netns` (or in our own namespace when `None`).
pub fn interface_exists(netns: Option<&str>, name: &str) -> bool {
    match netns {
        None => Path::new("/sys/class/net").join(name).exists(),
        Some(_) => ip(netns, &["link", "show", "dev", name]).is_ok(),
    }
}

/// Moves interface `from` into namespace `netns`, naming it `to` there. (The kernel
/// refuses a name that is taken there: that is reported as [`Error::Exists`], without a
/// separate check costing a process per agent.)
pub fn move_into(from: &str, netns: &str, to: &str) -> Result<(), Error> {
    if !namespace_exists(netns) {
        return Err(Error::NoNamespace(netns.to_owned()));
    }
    match ip(None, &["link", "set", "dev", from, "netns", netns, "name", to]) {
        Err(Error::Command { stderr, .. }) if stderr.contains("exists") => Err(Error::Exists { name: to.to_owned(), netns: Some(netns.to_owned()) }),
        r => r.map(drop),
    }
}

/// Sets MTU and addresses and brings the link up. IPv6 addresses skip duplicate address
/// detection: the bus has no link layer on which a duplicate could answer, and DAD would
/// hold the address tentative for a second or more.
///
/// The kernel's own link-local address generation is turned off (`addrgenmode none`) and
/// `link_local` is assigned instead: known in advance, so the agent can bind it, and usable
/// at once (no DAD).
///
/// The link and address commands go to one `ip -batch` run: a lab of a thousand hosts
/// spawns one process per host for them instead of six.
pub fn configure(netns: Option<&str>, ifname: &str, mtu: u32, addrs: &[Prefix], link_local: std::net::Ipv6Addr, router_solicitations: u8) -> Result<(), Error> {
    // Linux retries router solicitations forever by default (RFC 7559 back-off); on a bus
    // every one is flooded to every other agent. RFC 4861's MAX_RTR_SOLICITATIONS is 3.
    // Written before the link is up, so not one is sent beyond the limit.
    set_sysctl(netns, &format!("net/ipv6/conf/{ifname}/router_solicitations"), &router_solicitations.to_string())?;
    let mut script = format!("link set dev {ifname} mtu {mtu} addrgenmode none\n");
    for a in std::iter::once(Prefix { addr: IpAddr::V6(link_local), len: 64 }).chain(addrs.iter().copied()) {
        script.push_str(&address_command(ifname, &a));
        script.push('\n');
    }
    script.push_str(&format!("link set dev {ifname} up\n"));
    ip_batch(netns, &script)
}

/// [`configure`] for a TAP (an L2 session): its MAC, MTU and addresses; the kernel keeps
/// its own IPv6 link-local address (from the MAC) and answers neighbour discovery itself,
/// which crosses the bus as Ethernet frames. With `bridge`, the TAP is enslaved to that
/// existing bridge (in the same namespace) instead of being an end host.
pub fn configure_tap(
    netns: Option<&str>,
    ifname: &str,
    mtu: u32,
    mac: crate::packet::ethernet::Mac,
    addrs: &[Prefix],
    bridge: Option<&str>,
    router_solicitations: u8,
) -> Result<(), Error> {
    set_sysctl(netns, &format!("net/ipv6/conf/{ifname}/router_solicitations"), &router_solicitations.to_string())?;
    let mut script = format!("link set dev {ifname} address {mac} mtu {mtu}\n");
    if let Some(br) = bridge {
        script.push_str(&format!("link set dev {ifname} master {br}\n"));
    }
    for a in addrs {
        script.push_str(&address_command(ifname, a));
        script.push('\n');
    }
    script.push_str(&format!("link set dev {ifname} up\n"));
    ip_batch(netns, &script)
}

/// The `ip` arguments that add address `a` (IPv6 without duplicate address detection).
fn address_command(ifname: &str, a: &Prefix) -> String {
    match a.addr {
        IpAddr::V4(_) => format!("addr add {a} dev {ifname}"),
        IpAddr::V6(_) => format!("addr add {a} dev {ifname} nodad"),
    }
}

/// Runs `ip [-n netns] -batch -` with `script` on its standard input.
pub fn ip_batch(netns: Option<&str>, script: &str) -> Result<(), Error> {
    use std::io::Write;
    use std::process::Stdio;
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    let mut child = cmd.args(["-batch", "-"]).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().map_err(Error::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(script.as_bytes());
    }
    let out = child.wait_with_output().map_err(Error::Spawn)?;
    if !out.status.success() {
        return Err(Error::Command {
            command: format!("ip{} -batch ({})", netns.map(|n| format!(" -n {n}")).unwrap_or_default(), script.trim().replace('\n', "; ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Writes `/proc/sys/<key>` (e.g. `net/ipv6/conf/tb0/router_solicitations`) in `netns`.
pub fn set_sysctl(netns: Option<&str>, key: &str, value: &str) -> Result<(), Error> {
    let path = format!("/proc/sys/{key}");
    in_netns(netns, || std::fs::write(&path, value)).map_err(|e| match e {
        Error::Command { stderr, .. } => Error::Command { command: format!("write {path}"), stderr },
        e => e,
    })
}

/// [`crate::sys::in_netns`], with a missing namespace said as such.
pub fn in_netns<T: Send>(netns: Option<&str>, f: impl FnOnce() -> std::io::Result<T> + Send) -> Result<T, Error> {
    if let Some(ns) = netns {
        if !namespace_exists(ns) {
            return Err(Error::NoNamespace(ns.to_owned()));
        }
    }
    crate::sys::in_netns(netns, f)
        .map_err(|e| Error::Command { command: format!("in namespace {}", netns.unwrap_or("of this process")), stderr: e.to_string() })
}

/// Adds one address (IPv6 without duplicate address detection).
pub fn add_address(netns: Option<&str>, ifname: &str, a: &Prefix) -> Result<(), Error> {
    ip_batch(netns, &address_command(ifname, a))
}

/// Deletes an interface (for tools that must remove a device another process may hold).
pub fn delete(netns: Option<&str>, ifname: &str) {
    let _ = ip(netns, &["link", "del", "dev", ifname]);
}
