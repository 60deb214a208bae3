//! Subnet routers (issue #25, decision 0027), with real agents, namespaces, veths, nftables
//! and RabbitMQ: a gateway advertises the network behind it, an agent with
//! `--accept-routes` reaches a host there (ping both families, TCP with SHA-256); with
//! `--masquerade` the far host sees the gateway's address; two gateways of one prefix fail
//! over; a rogue's advertisement is refused in strict mode. Each test runs on a session
//! (exchange) of its own and removes what it made, also on failure.

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A host network behind a gateway: a veth from the gateway's namespace to a namespace of
/// its own, `198.19.<net>.1/24` and `fd00:<net>:1::1/64` on the gateway's side, `.2`/`::2`
/// on the far host's, whose default routes point at the gateway (unless `routed` is false:
/// then it has no way back to the bus but through masquerade).
struct FarNet {
    far: Netns,
    v4: String,
    v6: String,
    gw_v4: String,
}

impl FarNet {
    fn new(gw: &Netns, net: u8, routed: bool) -> FarNet {
        let far = Netns::new();
        run("ip", &["-n", &gw.name, "link", "add", "vfar", "type", "veth", "peer", "name", "vgw", "netns", &far.name]);
        let (gw_v4, v4) = (format!("198.19.{net}.1"), format!("198.19.{net}.2"));
        let (gw_v6, v6) = (format!("fd00:{net:x}:1::1"), format!("fd00:{net:x}:1::2"));
        run("ip", &["-n", &gw.name, "addr", "add", &format!("{gw_v4}/24"), "dev", "vfar"]);
        run("ip", &["-n", &gw.name, "addr", "add", &format!("{gw_v6}/64"), "dev", "vfar", "nodad"]);
        run("ip", &["-n", &gw.name, "link", "set", "vfar", "up"]);
        run("ip", &["-n", &far.name, "addr", "add", &format!("{v4}/24"), "dev", "vgw"]);
        run("ip", &["-n", &far.name, "addr", "add", &format!("{v6}/64"), "dev", "vgw", "nodad"]);
        run("ip", &["-n", &far.name, "link", "set", "vgw", "up"]);
        if routed {
            run("ip", &["-n", &far.name, "route", "add", "default", "via", &gw_v4]);
            run("ip", &["-n", &far.name, "-6", "route", "add", "default", "via", &gw_v6]);
        }
        FarNet { far, v4, v6, gw_v4 }
    }

    fn v4_prefix(net: u8) -> String {
        format!("198.19.{net}.0/24")
    }

    fn v6_prefix(net: u8) -> String {
        format!("fd00:{net:x}:1::/64")
    }
}

/// A TCP server in a namespace (python3) that answers every connection with `tag` and the
/// address the connection came from, until dropped.
struct Teller {
    child: Child,
}

impl Teller {
    fn start(ns: &Netns, port: u16, tag: &str) -> Teller {
        let script = format!(
            "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('0.0.0.0',{port}))\ns.listen(16)\nwhile True:\n  c,a=s.accept()\n  c.sendall(('{tag} '+a[0]+'\\n').encode())\n  c.close()\n"
        );
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "python3", "-c", &script])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 runs");
        Teller { child }
    }
}

impl Drop for Teller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a [`Teller`] at `dst` says to a connection from namespace `ns` (`None`: no answer
/// within a second).
fn ask(ns: &Netns, dst: SocketAddr) -> Option<String> {
    in_netns(&ns.name, move || {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        Some(text.trim().to_owned())
    })
    .join()
    .ok()
    .flatten()
}

/// Pings until a reply comes or `limit` passes.
fn reachable(ns: &Netns, dst: &str, limit: Duration) -> bool {
    wait_reachable(ns, dst, limit).is_some()
}

/// The routes of namespace `ns`.
fn routes(ns: &Netns, family: &str) -> String {
    run("ip", &["-n", &ns.name, family, "route", "show"])
}

fn sysctl(ns: &Netns, key: &str) -> String {
    String::from_utf8_lossy(&ns.exec(&["cat", &format!("/proc/sys/{key}")]).stdout).trim().to_owned()
}

/// Agent `name` in namespace `ns` on `session`, with `args` after its addresses.
fn agent(ns: &Netns, session: &str, v4: &str, v6: &str, args: &[&str]) -> AgentProc {
    let mut all = vec!["--session", session, "--netns", ns.name.as_str(), "--ipv4", v4, "--ipv6", v6];
    all.extend_from_slice(args);
    AgentProc::start(&ns.name, &all)
}

#[test]
fn a_gateway_makes_the_network_behind_it_reachable() {
    if !system_ready("a_gateway_makes_the_network_behind_it_reachable") {
        return;
    }
    let net = 61;
    let session = unique("rt");
    let (ns_h, ns_gw) = (Netns::new(), Netns::new());
    let far = FarNet::new(&ns_gw, net, true);
    let forwarding_before = sysctl(&ns_gw, "net/ipv4/ip_forward");
    let (p4, p6) = (FarNet::v4_prefix(net), FarNet::v6_prefix(net));
    let mut gw = agent(&ns_gw, &session, "198.18.61.2/24", "fd00:3d::2/64", &["--advertise", &p4, "--advertise", &p6]);
    let mut h1 = agent(&ns_h, &session, "198.18.61.1/24", "fd00:3d::1/64", &["--accept-routes"]);

    let t0 = Instant::now();
    assert!(reachable(&ns_h, &far.v4, Duration::from_secs(20)), "the far host never answered over IPv4:\n--- h1\n{}\n--- gw\n{}", h1.logs(), gw.logs());
    eprintln!("far host reachable {:?} after start", t0.elapsed());
    assert!(routes(&ns_h, "-4").contains(&format!("{p4} dev tb0")), "{}", routes(&ns_h, "-4"));
    assert!(routes(&ns_h, "-6").contains(&format!("{p6} dev tb0")), "{}", routes(&ns_h, "-6"));
    assert_eq!(sysctl(&ns_gw, "net/ipv4/ip_forward"), "1");
    // IPv6 (neighbour discovery on the far network may take a moment).
    assert!(reachable(&ns_h, &far.v6, Duration::from_secs(10)), "IPv6 through the gateway:\n{}", gw.logs());
    let (ok, out) = ping(&ns_h, &far.v6, 3);
    assert!(ok, "IPv6 through the gateway:\n{out}\n{}", gw.logs());

    // TCP, byte-exact, from the bus to the host behind the gateway.
    let size = 32 * 1024 * 1024;
    let sink = tcp_sink(&far.far.name, format!("{}:5001", far.v4), 1);
    let sent = tcp_send(&ns_h.name, format!("{}:5001", far.v4), size, 61).join().expect("sender");
    let got = sink.join().expect("sink");
    assert_eq!(got, vec![sent], "SHA-256 differs:\n{}", gw.logs());
    // Without masquerade, the far host sees the bus address itself.
    let _teller = Teller::start(&far.far, 5002, "far");
    let dst: SocketAddr = format!("{}:5002", far.v4).parse().unwrap();
    let mut said = None;
    for _ in 0..20 {
        said = ask(&ns_h, dst);
        if said.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(said.as_deref(), Some("far 198.18.61.1"));

    // The gateway leaves: its bye withdraws the route at once, and it put forwarding back.
    let rg = gw.interrupt();
    assert!(rg["rx_bytes"].as_u64().unwrap_or(0) >= size, "{rg}");
    let t1 = Instant::now();
    while routes(&ns_h, "-4").contains(&p4) && t1.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!routes(&ns_h, "-4").contains(&p4), "route still there {:?} after the bye:\n{}", t1.elapsed(), h1.logs());
    assert!(!routes(&ns_h, "-6").contains(&p6));
    assert_eq!(sysctl(&ns_gw, "net/ipv4/ip_forward"), forwarding_before);
    let rh = h1.interrupt();
    assert_eq!(drops(&rh, "spoofed"), 0, "{rh}");
}

#[test]
fn masquerade_shows_the_gateway_address_and_leaves_nothing() {
    if !system_ready("masquerade_shows_the_gateway_address_and_leaves_nothing") {
        return;
    }
    let net = 62;
    let session = unique("rt");
    let (ns_h, ns_gw) = (Netns::new(), Netns::new());
    // The far host has no route back to the bus: only masquerade makes answers possible.
    let far = FarNet::new(&ns_gw, net, false);
    let p4 = FarNet::v4_prefix(net);
    let args = ["--advertise", p4.as_str(), "--masquerade"];
    let mut gw = agent(&ns_gw, &session, "198.18.62.2/24", "fd00:3e::2/64", &args);
    let mut h1 = agent(&ns_h, &session, "198.18.62.1/24", "fd00:3e::1/64", &["--accept-routes"]);
    let table = format!("tunbus_{}", ns_gw.name);
    let has_table = || ns_gw.exec(&["nft", "list", "table", "inet", &table]).status.success();
    assert!(reachable(&ns_h, &far.v4, Duration::from_secs(20)), "no answer through the masquerade:\n--- h1\n{}\n--- gw\n{}", h1.logs(), gw.logs());
    assert!(has_table(), "no nftables table {table}");
    let _teller = Teller::start(&far.far, 5003, "far");
    let dst: SocketAddr = format!("{}:5003", far.v4).parse().unwrap();
    let mut said = None;
    for _ in 0..20 {
        said = ask(&ns_h, dst);
        if said.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(said, Some(format!("far {}", far.gw_v4)), "the far host must see the gateway's address");

    // A clean exit removes the table.
    gw.interrupt();
    assert!(!has_table(), "the table outlived a clean exit");
    // A gateway started until its table exists, then killed: the table stays.
    let start_and_kill = || {
        let mut gw = agent(&ns_gw, &session, "198.18.62.2/24", "fd00:3e::2/64", &args);
        let t0 = Instant::now();
        while !has_table() && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
        }
        gw.stop_with(libc::SIGKILL, Duration::from_secs(5));
        assert!(has_table(), "expected the killed agent's table to remain");
    };
    // After SIGKILL the table stays; the next start replaces it, and its exit removes it.
    start_and_kill();
    let mut gw = agent(&ns_gw, &session, "198.18.62.2/24", "fd00:3e::2/64", &args);
    assert!(reachable(&ns_h, &far.v4, Duration::from_secs(25)), "after a restart:\n{}", gw.logs());
    gw.interrupt();
    assert!(!has_table(), "the table outlived the restarted agent");
    // Killed again, and not restarted: `agent connect --cleanup` removes what it left.
    start_and_kill();
    let cleanup = || {
        Command::new(env!("CARGO_BIN_EXE_agent"))
            .args(["connect", "--name", &ns_gw.name, "--netns", &ns_gw.name, "--cleanup"])
            .output()
            .expect("agent connect --cleanup")
    };
    let out = cleanup();
    let said = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.contains(&format!("removed nftables table inet {table}")), "{said}");
    assert!(!has_table(), "--cleanup left the table");
    let out = cleanup();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success() && said.contains("nothing to remove"), "{said}");
    h1.interrupt();
}

#[test]
fn two_gateways_of_one_prefix_fail_over() {
    if !system_ready("two_gateways_of_one_prefix_fail_over") {
        return;
    }
    let net = 63;
    let session = unique("rt");
    let (ns_h, ns_a, ns_b) = (Netns::new(), Netns::new(), Netns::new());
    // Two far networks with the same prefix and the same host address, one behind each.
    let (far_a, far_b) = (FarNet::new(&ns_a, net, true), FarNet::new(&ns_b, net, true));
    let (_ta, _tb) = (Teller::start(&far_a.far, 5004, "a"), Teller::start(&far_b.far, 5004, "b"));
    let p4 = FarNet::v4_prefix(net);
    // Names decide: the lowest wins. Agents are named after their namespaces, so give the
    // winner a name that sorts first by starting it under an explicit --name.
    let mut all_a =
        vec!["--session", session.as_str(), "--netns", ns_a.name.as_str(), "--ipv4", "198.18.63.2/24", "--ipv6", "fd00:3f::2/64", "--advertise", p4.as_str()];
    all_a.extend_from_slice(&["--url", URL]);
    let name_a = format!("a{}", ns_a.name);
    let name_b = format!("b{}", ns_b.name);
    let mut gw_a = AgentProc::spawn(&name_a, &all_a);
    let all_b = [
        "--url",
        URL,
        "--session",
        session.as_str(),
        "--netns",
        ns_b.name.as_str(),
        "--ipv4",
        "198.18.63.3/24",
        "--ipv6",
        "fd00:3f::3/64",
        "--advertise",
        p4.as_str(),
    ];
    let mut gw_b = AgentProc::spawn(&name_b, &all_b);
    let mut h1 = agent(&ns_h, &session, "198.18.63.1/24", "fd00:3f::1/64", &["--accept-routes"]);
    let dst: SocketAddr = format!("{}:5004", far_a.v4).parse().unwrap();

    // Both advertise: once h1 has heard both (it may hear b first), answers come from a.
    let t0 = Instant::now();
    let mut last = None;
    while !last.as_deref().is_some_and(|s: &str| s.starts_with('a')) && t0.elapsed() < Duration::from_secs(20) {
        last = ask(&ns_h, dst);
    }
    assert!(
        last.as_deref().is_some_and(|s| s.starts_with('a')),
        "the lowest name wins ({last:?}):\n--- h1\n{}\n--- a\n{}\n--- b\n{}",
        h1.logs(),
        gw_a.logs(),
        gw_b.logs()
    );
    std::thread::sleep(Duration::from_secs(6)); // b's hellos have come by now too
    for _ in 0..5 {
        assert_eq!(ask(&ns_h, dst).as_deref().map(|s| &s[..1]), Some("a"));
    }

    // a dies without a word: within the hello timeout, b answers.
    gw_a.stop_with(libc::SIGKILL, Duration::from_secs(5));
    let killed = Instant::now();
    let mut moved = None;
    while killed.elapsed() < Duration::from_secs(25) {
        if ask(&ns_h, dst).is_some_and(|s| s.starts_with('b')) {
            moved = Some(killed.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let moved = moved.unwrap_or_else(|| panic!("traffic never moved to b:\n--- h1\n{}\n--- b\n{}", h1.logs(), gw_b.logs()));
    // What the killed gateway left on this host (its status socket) goes with --cleanup.
    let sock = std::path::Path::new("/run/tunbus").join(format!("{name_a}.sock"));
    let out = Command::new(env!("CARGO_BIN_EXE_agent")).args(["connect", "--name", &name_a, "--netns", &ns_a.name, "--cleanup"]).output().expect("--cleanup");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success() && !sock.exists(), "--cleanup left {}: {said}", sock.display());
    eprintln!("failover after SIGKILL: {moved:?}");
    assert!(moved <= Duration::from_secs(18), "took {moved:?}, more than the 16 s hello timeout and a second");
    assert!(routes(&ns_h, "-4").contains(&p4), "the route stays while b advertises it");
    // `agent status` names the gateway in use.
    let status = Command::new(env!("CARGO_BIN_EXE_agent")).args(["status", "--json", &h1.name]).output().expect("agent status runs");
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains(&format!(r#""prefix":"{p4}","gateway":"{name_b}""#)), "{text}");
    gw_b.interrupt();
    h1.interrupt();
}

#[test]
fn a_rogue_advertisement_is_refused_in_strict_mode() {
    if !system_ready("a_rogue_advertisement_is_refused_in_strict_mode") {
        return;
    }
    let net = 64;
    let session = unique("rt");
    let users: Vec<TempUser> = ["rth", "rtg", "rtr"].iter().map(|p| TempUser::new(p, ".*", ".*", ".*", None)).collect();
    let (ns_h, ns_gw, ns_r) = (Netns::new(), Netns::new(), Netns::new());
    let far = FarNet::new(&ns_gw, net, true);
    let _teller = Teller::start(&far.far, 5005, "far");
    let p4 = FarNet::v4_prefix(net);
    let peers = std::env::temp_dir().join(format!("{session}.peers"));
    std::fs::write(&peers, format!("{} 198.18.64.1/32\n{} 198.18.64.2/32,{p4}\n{} 198.18.64.3/32\n", users[0].name, users[1].name, users[2].name)).unwrap();
    let peers_arg = peers.to_string_lossy().into_owned();
    let start = |ns: &Netns, user: &TempUser, v4: &str, v6: &str, extra: &[&str]| {
        let url = user.url();
        let mut all =
            vec!["--url", url.as_str(), "--session", session.as_str(), "--peers", peers_arg.as_str(), "--netns", ns.name.as_str(), "--ipv4", v4, "--ipv6", v6];
        all.extend_from_slice(extra);
        AgentProc::spawn(&ns.name, &all)
    };
    let mut gw = start(&ns_gw, &users[1], "198.18.64.2/24", "fd00:40::2/64", &["--advertise", &p4]);
    // The rogue advertises a longer prefix inside gw's: were it taken, it would win.
    let rogue_prefix = "198.19.64.0/25";
    let mut rogue = start(&ns_r, &users[2], "198.18.64.3/24", "fd00:40::3/64", &["--advertise", rogue_prefix]);
    let mut h1 = start(&ns_h, &users[0], "198.18.64.1/24", "fd00:40::1/64", &["--accept-routes"]);
    let dst: SocketAddr = format!("{}:5005", far.v4).parse().unwrap();
    let t0 = Instant::now();
    let mut said = None;
    while said.is_none() && t0.elapsed() < Duration::from_secs(20) {
        said = ask(&ns_h, dst);
    }
    assert_eq!(said.as_deref(), Some("far 198.18.64.1"), "through the granted gateway:\n--- h1\n{}\n--- gw\n{}", h1.logs(), gw.logs());
    // Let the rogue's hellos come (every 5 s), then look again.
    let t1 = Instant::now();
    while !h1.logs().contains("REFUSED an advertisement") && t1.elapsed() < Duration::from_secs(12) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let logs = h1.logs();
    assert!(logs.contains("REFUSED an advertisement") && logs.contains(rogue_prefix), "the refusal must be logged:\n{logs}");
    for _ in 0..5 {
        assert_eq!(ask(&ns_h, dst).as_deref(), Some("far 198.18.64.1"), "no traffic diverted");
    }
    assert!(!routes(&ns_h, "-4").contains(rogue_prefix), "no route for the refused prefix:\n{}", routes(&ns_h, "-4"));
    rogue.interrupt();
    gw.interrupt();
    h1.interrupt();
    let _ = std::fs::remove_file(&peers);
}
