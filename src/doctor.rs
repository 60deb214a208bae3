//! `agent doctor`: checks, in order, what `agent connect` with the same flags (and the same
//! `--config` file and variables) needs to start, and says for each failure how to fix it.
//!
//! The order is a start's: the TUN device, the capabilities, the configuration, the
//! namespace and the interface name, the broker's address, TLS and its certificate, the
//! login, the vhost, the permissions of this agent's keys (declared, bound and published
//! as the agent does, on a throw-away queue of its own name), the MTU, and the clock
//! against the broker's. A check that needs an earlier one that failed is skipped. The exit
//! code is the one `agent connect` would end with (`crate::exit`): the first failure's.
//!
//! Main thread (the caller runs it on the blocking pool), once; not on the hot path. The
//! verdicts that need no I/O (capability bits, HTTP dates, the MTU rule, the exit code) are
//! pure functions, tested below.

use std::fmt;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use crate::amqp::client::{self, Client, ConnectOptions, Endpoint, FailureClass, Plan, QueuePlan, Retry};
use crate::amqp::presence::{Announcements, Hello, JSON_PROPERTIES};
use crate::amqp::session::QueueOptions;
use crate::amqp::tls::TlsOptions;
use crate::amqp::url::BrokerUrl;
use crate::config::{AgentConfig, Wire};
use crate::exit::{code_of, Exit};
use crate::route::{self, RoutingKey};
use crate::util::Stop;
use crate::worker::uplink::UplinkContext;

/// How long the broker's address gets to accept a TCP connection.
const CONNECT_WAIT: Duration = Duration::from_secs(3);
/// Clocks further apart than this are reported (the broker's `Date` has 1 s resolution).
pub const SKEW_WARN: Duration = Duration::from_secs(2);
/// `CAP_NET_ADMIN` and `CAP_SYS_ADMIN`, bits of `/proc/self/status`'s `CapEff`.
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;

/// What became of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Works, but something is worth fixing.
    Warn,
    /// A start would fail here.
    Fail,
    /// Not checked: an earlier check it needs failed, or it does not apply.
    Skip,
}

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    /// What to do (failures and warnings).
    pub fix: String,
    /// The exit code of a failure.
    pub exit: Exit,
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.status {
            Status::Ok => "ok  ",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
            Status::Skip => "skip",
        };
        write!(f, "{tag}  {:<24} {}", self.name, self.detail)?;
        if !self.fix.is_empty() {
            write!(f, "\n      {:<24} fix: {}", "", self.fix)?;
        }
        Ok(())
    }
}

/// The names of the checks, in their order.
pub mod name {
    pub const TUN: &str = "TUN device";
    pub const CAPABILITIES: &str = "capabilities";
    pub const CONFIGURATION: &str = "configuration";
    pub const NAMESPACE: &str = "namespace";
    pub const INTERFACE: &str = "interface name";
    pub const ADDRESS: &str = "broker address";
    pub const TLS: &str = "TLS and its certificate";
    pub const LOGIN: &str = "login";
    pub const VHOST: &str = "vhost";
    pub const PERMISSIONS: &str = "permissions";
    pub const MTU: &str = "MTU";
    pub const CLOCK: &str = "clock skew";
}

/// What the doctor is given: the configuration `agent connect` would build (or why it
/// could not), the broker URLs and TLS options as given, and the management API to read
/// the broker's clock from.
pub struct Inputs {
    pub config: Result<AgentConfig, anyhow::Error>,
    pub urls: Result<Vec<BrokerUrl>, anyhow::Error>,
    pub tls: TlsOptions,
    pub netns: Option<String>,
    /// `--userspace`: no TUN device, no privileges.
    pub userspace: bool,
    pub api: Option<String>,
}

/// The report's checks, in order.
#[derive(Default)]
struct Report(Vec<Check>);

impl Report {
    fn push(&mut self, name: &'static str, status: Status, detail: impl Into<String>, fix: impl Into<String>, exit: Exit) {
        self.0.push(Check { name, status, detail: detail.into(), fix: fix.into(), exit });
    }
    fn ok(&mut self, name: &'static str, detail: impl Into<String>) {
        self.push(name, Status::Ok, detail, "", Exit::Ok);
    }
    fn warn(&mut self, name: &'static str, detail: impl Into<String>, fix: impl Into<String>) {
        self.push(name, Status::Warn, detail, fix, Exit::Ok);
    }
    fn fail(&mut self, name: &'static str, detail: impl Into<String>, fix: impl Into<String>, exit: Exit) {
        self.push(name, Status::Fail, detail, fix, exit);
    }
    fn skip(&mut self, name: &'static str, why: impl Into<String>) {
        self.push(name, Status::Skip, why, "", Exit::Ok);
    }
}

/// The exit code of a report: the first failure's, else 0 (warnings do not fail).
pub fn exit_code(checks: &[Check]) -> Exit {
    checks.iter().find(|c| c.status == Status::Fail).map_or(Exit::Ok, |c| c.exit)
}

/// Runs every check in order.
pub fn run(inputs: Inputs) -> Vec<Check> {
    let mut r = Report::default();
    if inputs.userspace {
        r.skip(name::TUN, "--userspace: the agent's stack is in the process, no TUN device");
        r.skip(name::CAPABILITIES, "--userspace needs no privileges");
    } else {
        tun_device(&mut r);
        capabilities(&mut r, inputs.netns.as_deref());
    }
    // The configuration, unless what failed is TLS (its own check, in its place).
    let (config, tls_error) = match inputs.config {
        Ok(c) => {
            let d = c.data_path();
            r.ok(name::CONFIGURATION, format!("agent {}, wire {}, {} queue(s), exchange {}", c.name(), d.wire.name(), c.interface().queues, c.bus().exchange));
            (Some(c), None)
        }
        Err(e) if code_of(&e) == Exit::Tls => (None, Some(format!("{e:#}"))),
        Err(e) => {
            let exit = match code_of(&e) {
                Exit::Failure => Exit::Usage,
                other => other,
            };
            r.fail(name::CONFIGURATION, format!("{e:#}"), "correct the flag, variable or --config key it names (agent connect --help lists them)", exit);
            (None, None)
        }
    };
    match &config {
        Some(_) if inputs.userspace => {
            r.skip(name::NAMESPACE, "--userspace: no interface");
            r.skip(name::INTERFACE, "--userspace: no interface");
        }
        Some(c) => local_setup(&mut r, c),
        None => {
            r.skip(name::NAMESPACE, "needs the configuration");
            r.skip(name::INTERFACE, "needs the configuration");
        }
    }
    let reachable = match &inputs.urls {
        Ok(urls) => broker_address(&mut r, urls),
        Err(e) => {
            r.skip(name::ADDRESS, format!("no usable broker URL: {e:#}"));
            None
        }
    };
    let session = match (&config, reachable, tls_error) {
        (_, None, _) => {
            for n in [name::TLS, name::LOGIN, name::VHOST, name::PERMISSIONS] {
                r.skip(n, "needs the broker's address");
            }
            false
        }
        (_, Some(_), Some(e)) => {
            r.fail(name::TLS, e, "give --tls-ca (the CA that signed the broker's certificate), and --tls-cert/--tls-key as the error says", Exit::Tls);
            for n in [name::LOGIN, name::VHOST, name::PERMISSIONS] {
                r.skip(n, "needs TLS");
            }
            false
        }
        (None, Some(_), None) => {
            for n in [name::TLS, name::LOGIN, name::VHOST, name::PERMISSIONS] {
                r.skip(n, "needs the configuration");
            }
            false
        }
        (Some(c), Some(node), None) => login(&mut r, c, node, &inputs.tls),
    };
    match (&config, session) {
        (Some(c), true) => permissions(&mut r, c),
        (Some(_), false) if !r.0.iter().any(|x| x.name == name::PERMISSIONS) => r.skip(name::PERMISSIONS, "needs the login and the vhost"),
        _ => {}
    }
    match &config {
        Some(c) => {
            let (status, detail, fix) = mtu_verdict(c.interface().mtu, c.data_path().wire);
            r.push(name::MTU, status, detail, fix, Exit::Ok);
        }
        None => r.skip(name::MTU, "needs the configuration"),
    }
    match (&inputs.urls, reachable) {
        (Ok(urls), Some(i)) => clock(&mut r, &urls[i], inputs.api.as_deref(), &inputs.tls),
        _ => r.skip(name::CLOCK, "needs the broker's address"),
    }
    r.0
}

fn tun_device(r: &mut Report) {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun") {
        Ok(_) => r.ok(name::TUN, "/dev/net/tun opens"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => r.fail(
            name::TUN,
            "/dev/net/tun is missing",
            "load the module (modprobe tun); in a container, give it the device (docker run --device /dev/net/tun --cap-add NET_ADMIN)",
            Exit::Local,
        ),
        Err(e) => r.fail(
            name::TUN,
            format!("/dev/net/tun cannot be opened: {e}"),
            "run as root (sudo -E agent connect …: -E keeps AMQP_URL) or with CAP_NET_ADMIN",
            Exit::Local,
        ),
    }
}

/// The effective capability set of `/proc/self/status` (`CapEff:`, hexadecimal).
pub fn effective_capabilities(status: &str) -> Option<u64> {
    status.lines().find_map(|l| l.strip_prefix("CapEff:")).and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// The capabilities a start lacks, by name, given the effective set `caps` (`netns`: the
/// start moves its interface into a namespace, which takes `CAP_SYS_ADMIN` too).
pub fn missing_capabilities(caps: u64, netns: bool) -> Vec<&'static str> {
    let mut missing = Vec::new();
    if caps & (1 << CAP_NET_ADMIN) == 0 {
        missing.push("CAP_NET_ADMIN");
    }
    if netns && caps & (1 << CAP_SYS_ADMIN) == 0 {
        missing.push("CAP_SYS_ADMIN");
    }
    missing
}

fn capabilities(r: &mut Report, netns: Option<&str>) {
    let Some(caps) = std::fs::read_to_string("/proc/self/status").ok().as_deref().and_then(effective_capabilities) else {
        return r.skip(name::CAPABILITIES, "cannot read /proc/self/status");
    };
    let missing = missing_capabilities(caps, netns.is_some());
    if missing.is_empty() {
        let who = if crate::sys::is_root() { " (root)" } else { "" };
        r.ok(name::CAPABILITIES, format!("CAP_NET_ADMIN{}{who}", if netns.is_some() { ", CAP_SYS_ADMIN (for --netns)" } else { "" }));
    } else {
        r.fail(
            name::CAPABILITIES,
            format!("missing {}: creating the interface{} needs them", missing.join(", "), if netns.is_some() { " and entering its namespace" } else { "" }),
            "run as root: sudo -E agent connect … (-E keeps AMQP_URL and AMQP_URL_FILE), or grant them: setcap cap_net_admin,cap_sys_admin+ep \"$(command -v agent)\"",
            Exit::Local,
        );
    }
}

fn local_setup(r: &mut Report, c: &AgentConfig) {
    let i = c.interface();
    match &i.netns {
        Some(ns) if !crate::tun::netns::namespace_exists(ns) => {
            r.fail(name::NAMESPACE, format!("network namespace {ns:?} does not exist"), format!("create it: ip netns add {ns}"), Exit::Local)
        }
        Some(ns) => r.ok(name::NAMESPACE, format!("{ns} exists")),
        None => r.skip(name::NAMESPACE, "no --netns: the interface stays in this namespace"),
    }
    let ns = i.netns.as_deref();
    if ns.is_some_and(|n| !crate::tun::netns::namespace_exists(n)) {
        return r.skip(name::INTERFACE, "needs the namespace");
    }
    if crate::tun::netns::interface_exists(ns, &i.ifname) {
        r.fail(
            name::INTERFACE,
            format!("{} exists already{}", i.ifname, ns.map(|n| format!(" in {n}")).unwrap_or_default()),
            format!(
                "another agent (or a leftover) has it: give --ifname another name, or remove it (ip {}link del {})",
                ns.map(|n| format!("-n {n} ")).unwrap_or_default(),
                i.ifname
            ),
            Exit::Local,
        );
    } else {
        r.ok(name::INTERFACE, format!("{} is free", i.ifname));
    }
}

/// TCP to each node; the index of the first that accepts.
fn broker_address(r: &mut Report, urls: &[BrokerUrl]) -> Option<usize> {
    let mut first = None;
    let mut failed = Vec::new();
    for (i, u) in urls.iter().enumerate() {
        let authority = u.authority();
        let reached = authority.to_socket_addrs().map_err(|e| format!("cannot resolve {}: {e}", u.host)).and_then(|addrs| {
            let mut last = format!("{} resolves to no address", u.host);
            for a in addrs {
                match TcpStream::connect_timeout(&a, CONNECT_WAIT) {
                    Ok(_) => return Ok(()),
                    Err(e) => last = format!("{a}: {e}"),
                }
            }
            Err(last)
        });
        match reached {
            Ok(()) => {
                first.get_or_insert(i);
            }
            Err(e) => failed.push(format!("{authority} ({e})")),
        }
    }
    let fix = "is RabbitMQ running there and listening on that port (5672, 5671 for amqps)? Check the URL's host and port, and that no firewall stands between this machine and the broker";
    match first {
        Some(i) if failed.is_empty() => r.ok(name::ADDRESS, format!("{} accepts TCP", urls[i].authority())),
        Some(i) => r.warn(name::ADDRESS, format!("{} accepts TCP; cannot reach {}", urls[i].authority(), failed.join(", ")), fix),
        None => r.fail(name::ADDRESS, format!("cannot reach {}", failed.join(", ")), fix, Exit::Unreachable),
    }
    first
}

/// TLS, login and vhost: one connection as the agent makes it. `true` when it opened.
fn login(r: &mut Report, c: &AgentConfig, node: usize, tls: &TlsOptions) -> bool {
    let Some(endpoint) = c.bus().endpoints.get(node) else { return false };
    let url = &endpoint.url;
    let mut opts = ConnectOptions::new(format!("tunbus {} doctor", c.name()));
    opts.frame_max = Some(crate::amqp::CONTROL_FRAME_MAX);
    let never = Stop::new();
    let opened = Client::open(endpoint, &opts, never.flag());
    let user = endpoint.user();
    match &opened {
        Err(e) if e.class() == FailureClass::Tls => {
            r.fail(name::TLS, e.to_string(), "give --tls-ca with the CA that signed the broker's certificate, check that the URL's host is the name in it, and --tls-cert/--tls-key when the broker asks for a client certificate", Exit::Tls);
            r.skip(name::LOGIN, "needs TLS");
            r.skip(name::VHOST, "needs TLS");
            return false;
        }
        _ if url.tls => {
            let insecure = tls.insecure || url.query.verify == Some(crate::amqp::url::Verify::None);
            let cert = endpoint.tls.as_ref().is_some_and(|t| t.has_client_cert);
            let detail = format!("handshake with {} done{}", url.authority(), if cert { ", client certificate presented" } else { "" });
            if insecure {
                r.warn(
                    name::TLS,
                    format!("{detail}, but the broker's certificate is NOT verified (--tls-insecure)"),
                    "give --tls-ca with the CA that signed the broker's certificate instead",
                );
            } else {
                r.ok(name::TLS, format!("{detail}, the broker's certificate verified"));
            }
        }
        _ if url.host == "localhost" || url.host.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_loopback()) => {
            r.skip(name::TLS, "amqp:// to this machine: no TLS needed")
        }
        _ => r.warn(
            name::TLS,
            "amqp:// without TLS: the password and every packet cross the network in clear",
            "use amqps:// (port 5671) beyond a trusted network",
        ),
    }
    match opened {
        Ok(client) => {
            client.close(Duration::from_millis(300));
            r.ok(name::LOGIN, format!("user {user} ({})", endpoint.mechanism().name()));
            r.ok(name::VHOST, format!("{:?} opens", url.vhost));
            true
        }
        Err(e) => {
            let exit = Exit::from(e.class());
            match e.class() {
                FailureClass::Vhost => {
                    r.ok(name::LOGIN, format!("user {user} ({})", endpoint.mechanism().name()));
                    r.fail(
                        name::VHOST,
                        e.to_string(),
                        format!("the URL's vhost ({:?}) must exist and user {user} must have permissions on it; a provisioned session's vhost is the session's name", url.vhost),
                        exit,
                    );
                }
                FailureClass::Auth => {
                    r.fail(
                        name::LOGIN,
                        e.to_string(),
                        "check the user and password in the URL (or URL file), or that the client certificate's common name is a broker user",
                        exit,
                    );
                    r.skip(name::VHOST, "needs the login");
                }
                _ => {
                    r.fail(name::LOGIN, e.to_string(), "is this an AMQP port, and the right scheme (amqps:// for TLS ports, usually 5671)?", exit);
                    r.skip(name::VHOST, "needs the login");
                }
            }
            false
        }
    }
}

/// What this agent's queues bind, on every queue.
fn binding_keys(c: &Arc<AgentConfig>) -> Vec<String> {
    let hello = (c.data_path().wire == Wire::Native).then(|| {
        let h = Hello {
            name: c.name().clone(),
            session: c.bus().session.clone(),
            addresses: Vec::new(),
            queues: c.interface().queues,
            wire: crate::amqp::presence::HelloWire::of(c.data_path().wire),
            started_unix_ms: 0,
            interface: c.interface().ifname.clone(),
            netns: None,
            version: String::new(),
            node: None,
            leaving: false,
            advertise: Vec::new(),
            layer: Default::default(),
            macs: Vec::new(),
            key: None,
        };
        Arc::new(Announcements::new(&h))
    });
    let mut keys = Vec::new();
    for k in 0..c.interface().queues {
        let ctx = UplinkContext {
            config: c.clone(),
            index: k,
            broker: Arc::default(),
            connected: Arc::new(AtomicUsize::new(0)),
            hello: if k == 0 { hello.clone() } else { None },
            stop: Stop::new(),
            state: Arc::default(),
            local_macs: None,
            e2e: None,
        };
        for key in ctx.binding_keys() {
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
    }
    keys
}

/// Declares a throw-away queue of this agent's name, binds every key the agent binds, and
/// publishes on every kind of key it publishes, each confirmed by a synchronous call (a
/// refused publish closes the channel before the call is answered).
fn permissions(r: &mut Report, c: &AgentConfig) {
    let config = Arc::new(c.clone());
    let keys = binding_keys(&config);
    let queue = format!("{}.doctor-{}", c.queue_prefix(), std::process::id());
    let plan = Plan {
        exchange: c.bus().exchange.clone(),
        queue: Some(QueuePlan {
            name: queue.clone(),
            options: QueueOptions { exclusive: true, auto_delete: true, ..QueueOptions::default() },
            max_length: Some(1),
            max_length_bytes: None,
            bindings: keys.clone(),
            prefetch: Some(c.bus().prefetch),
            consume: None,
        }),
    };
    let mut opts = ConnectOptions::new(format!("tunbus {} doctor", c.name()));
    opts.frame_max = Some(crate::amqp::CONTROL_FRAME_MAX);
    let never = Stop::new();
    let user = c.bus().endpoints.first().map(Endpoint::user).unwrap_or_default();
    let advice = |e: &client::Error| crate::exit::join_advice(e, c.bus().session.as_deref(), c.bus().endpoints.first().map(|e| e.url.vhost.as_str()));
    let mut client = match Client::connect(c.bus().endpoints.clone(), &opts, plan, Retry::OncePerNode, never.flag()) {
        Ok(client) => client,
        Err(e) => {
            let exit = Exit::from(e.class());
            return r.fail(
                name::PERMISSIONS,
                format!("declaring queue {queue} on exchange {} and binding its {} keys: {e}", c.bus().exchange, keys.len()),
                advice(&e).trim().to_owned(),
                exit,
            );
        }
    };
    let publishes = publish_keys(c);
    for (key, body) in &publishes {
        let confirmed = client.publish_copy(&c.bus().exchange, key, &JSON_PROPERTIES, body).and_then(|_| client.basic_qos(c.bus().prefetch, never.flag()));
        if let Err(e) = confirmed {
            return r.fail(name::PERMISSIONS, format!("publishing on {key}: {e}"), advice(&e).trim().to_owned(), Exit::from(e.class()));
        }
    }
    client.close(Duration::from_millis(300));
    let published = if publishes.is_empty() {
        "publishing not tried on the ioppytest wire (its messages would reach the session's router)".to_owned()
    } else {
        format!("published on {} kinds of key", publishes.len())
    };
    r.ok(name::PERMISSIONS, format!("user {user}: queue {queue} declared, {} keys bound, {published}", keys.len()));
}

/// One key of each kind this agent publishes on, with a body every receiver ignores: an
/// empty batch on data keys, an object that is no hello on presence keys.
fn publish_keys(c: &AgentConfig) -> Vec<(String, Vec<u8>)> {
    if c.data_path().wire != Wire::Native {
        return Vec::new();
    }
    let mut empty = crate::codec::v1::BatchWriter::with_capacity(crate::codec::v1::HEADER_LEN + 64);
    empty.reset(crate::codec::v1::FLAG_VNET);
    let batch = empty.finish(0, crate::util::now_ns()).to_vec();
    let not_hello = br#"{"doctor":true}"#.to_vec();
    let mut out = Vec::new();
    if let Some(addr) = c.owned_addresses().first() {
        out.push((RoutingKey::unicast(*addr, 0).as_str().to_owned(), batch.clone()));
    }
    let keys = [RoutingKey::all(c.name()), RoutingKey::hello(c.name()), RoutingKey::bye(c.name()), RoutingKey::pong(&format!("doctor-{}", std::process::id()))];
    for (i, key) in keys.into_iter().enumerate() {
        if let Some(k) = key {
            out.push((k.as_str().to_owned(), if i == 0 { batch.clone() } else { not_hello.clone() }));
        }
    }
    out.push((route::CTL_PROBE.to_owned(), br#"{"from":"agent doctor"}"#.to_vec()));
    out
}

/// The MTU rule: its status, what it says, and the fix (pure).
pub fn mtu_verdict(mtu: u32, wire: Wire) -> (Status, String, String) {
    if mtu < 1280 {
        return (Status::Fail, format!("{mtu} is below IPv6's minimum of 1280: the interface would lose its IPv6 addresses"), "--mtu 1280 or more".into());
    }
    if wire == Wire::Ioppytest && mtu != 1500 {
        return (
            Status::Warn,
            format!("{mtu} on the ioppytest wire: ioppytest's agents and router use 1500, and a larger packet one of them cannot take is lost"),
            "--mtu 1500 (the default on that wire)".into(),
        );
    }
    let kind = if mtu > 1500 { "jumbo: fewer, larger packets for bulk traffic; super-packets of 64 KiB travel whole either way" } else { "Ethernet's size" };
    (Status::Ok, format!("{mtu} ({kind})"), String::new())
}

/// Seconds since the epoch of an HTTP date (`Sun, 06 Nov 1994 08:49:37 GMT`, RFC 9110's
/// IMF-fixdate); `None` for anything else.
pub fn http_date_unix(text: &str) -> Option<i64> {
    let mut words = text.split_whitespace();
    let _weekday = words.next()?;
    let day: i64 = words.next()?.parse().ok()?;
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let month_word = words.next()?;
    let month = MONTHS.iter().position(|m| *m == month_word)? as i64 + 1;
    let year: i64 = words.next()?.parse().ok()?;
    let mut hms = words.next()?.split(':').map(|x| x.parse::<i64>().ok());
    let (h, m, s) = (hms.next()??, hms.next()??, hms.next()??);
    if words.next()? != "GMT" || !(1..=31).contains(&day) || h > 23 || m > 59 || s > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, mo) = if month <= 2 { (year - 1, month + 9) } else { (year, month - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * mo + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + m * 60 + s)
}

/// The broker's clock from its management API's `Date` header against ours.
fn clock(r: &mut Report, url: &BrokerUrl, api: Option<&str>, tls: &TlsOptions) {
    let base =
        api.map(str::to_owned).unwrap_or_else(|| format!("http://{}:15672", if url.host.contains(':') { format!("[{}]", url.host) } else { url.host.clone() }));
    let api_client = crate::provision::http::Api::new(&base, url.username.as_deref().unwrap_or("guest"), url.password().unwrap_or("guest"), tls);
    let date = match api_client.and_then(|a| a.date("/api/overview")) {
        Ok(Some(d)) => d,
        Ok(None) => return r.skip(name::CLOCK, format!("the management API at {base} sent no Date header")),
        Err(e) => return r.skip(name::CLOCK, format!("cannot read the broker's clock: {e} (give --api URL of its management API)")),
    };
    let Some(theirs) = http_date_unix(&date) else { return r.skip(name::CLOCK, format!("the management API's Date {date:?} is not an HTTP date")) };
    let ours = (crate::util::now_ns() / 1_000_000_000) as i64;
    let skew = ours - theirs;
    if skew.unsigned_abs() > SKEW_WARN.as_secs() {
        r.warn(
            name::CLOCK,
            format!(
                "this machine's clock is {} s {} the broker's ({date}): one-way latency figures are off by as much",
                skew.unsigned_abs(),
                if skew > 0 { "ahead of" } else { "behind" }
            ),
            "keep both clocks synchronised (chrony or systemd-timesyncd, against the same NTP servers)",
        );
    } else {
        r.ok(name::CLOCK, format!("within {} s of the broker's (its Date header has 1 s resolution)", SKEW_WARN.as_secs()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_come_from_capeff() {
        let status = "Name:\tagent\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        let caps = effective_capabilities(status).unwrap();
        assert!(missing_capabilities(caps, true).is_empty());
        assert_eq!(missing_capabilities(0, false), ["CAP_NET_ADMIN"]);
        assert_eq!(missing_capabilities(1 << CAP_NET_ADMIN, true), ["CAP_SYS_ADMIN"]);
        assert_eq!(missing_capabilities(1 << CAP_NET_ADMIN, false), Vec::<&str>::new());
        assert_eq!(effective_capabilities("CapEff:\tzz\n"), None);
        assert_eq!(effective_capabilities(""), None);
    }

    #[test]
    fn http_dates() {
        assert_eq!(http_date_unix("Sun, 06 Nov 1994 08:49:37 GMT"), Some(784_111_777));
        assert_eq!(http_date_unix("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(http_date_unix("Tue, 29 Feb 2028 23:59:59 GMT"), Some(1_835_481_599));
        for bad in ["", "Sun, 06 Nov 1994 08:49:37", "Sun, 06 Foo 1994 08:49:37 GMT", "Sun, 32 Nov 1994 08:49:37 GMT", "Sun, 06 Nov 1994 08:49 GMT", "x y z"] {
            assert_eq!(http_date_unix(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn mtu_rule() {
        assert_eq!(mtu_verdict(9000, Wire::Native).0, Status::Ok);
        assert_eq!(mtu_verdict(1500, Wire::Ioppytest).0, Status::Ok);
        let (s, d, fix) = mtu_verdict(9000, Wire::Ioppytest);
        assert_eq!(s, Status::Warn);
        assert!(d.contains("1500") && fix.contains("--mtu 1500"), "{d} {fix}");
        assert_eq!(mtu_verdict(1200, Wire::Native).0, Status::Fail);
    }

    #[test]
    fn the_exit_code_is_the_first_failures() {
        let c = |status, exit| Check { name: "x", status, detail: String::new(), fix: String::new(), exit };
        assert_eq!(exit_code(&[c(Status::Ok, Exit::Ok), c(Status::Warn, Exit::Ok), c(Status::Skip, Exit::Ok)]), Exit::Ok);
        assert_eq!(exit_code(&[c(Status::Ok, Exit::Ok), c(Status::Fail, Exit::Auth), c(Status::Fail, Exit::Local)]), Exit::Auth);
        let line = Check { name: name::LOGIN, status: Status::Fail, detail: "refused".into(), fix: "check the password".into(), exit: Exit::Auth }.to_string();
        assert!(line.starts_with("FAIL  login") && line.contains("fix: check the password"), "{line}");
    }
}
