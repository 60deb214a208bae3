//! Userspace endpoints as users run them (issue 23): `agent connect --userspace` as an
//! unprivileged user (nobody, no capabilities), beside TUN agents in namespaces, on the
//! real broker. Pings both address families; `--forward tcp` fetched by curl from a web
//! server in a TUN agent's namespace; 50 MB through `--socks5`; UDP through `--forward` and
//! `--expose` both ways; two userspace agents over forward and expose; the ioppytest wire
//! through `agent route`; a userspace endpoint sending from an address its user may not
//! use is dropped at the receiver; bad specs, a port in use and SOCKS5 garbage.
//! Every transfer is checked byte for byte (SHA-256).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest, Sha256};

/// A port on 127.0.0.1 nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// `size` bytes of the seeded stream, and their SHA-256.
fn content(size: usize, seed: u64) -> (Vec<u8>, [u8; 32]) {
    let mut body = vec![0u8; size];
    Stream::new(seed).fill(&mut body);
    let sum = Sha256::digest(&body).into();
    (body, sum)
}

/// An HTTP/1.0 server answering every GET with `body`, `conns` times, on `listener`.
fn serve_http(listener: TcpListener, body: Vec<u8>, conns: usize) {
    for _ in 0..conns {
        let Ok((mut s, _)) = listener.accept() else { return };
        let mut req = [0u8; 4096];
        let mut got = 0;
        while !req[..got].windows(4).any(|w| w == b"\r\n\r\n") && got < req.len() {
            match s.read(&mut req[got..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        let head = format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\r\n", body.len());
        let _ = s.write_all(head.as_bytes()).and_then(|()| s.write_all(&body));
    }
}

/// An HTTP server in namespace `ns` on `bind`.
fn http_in_netns(ns: &str, bind: &str, body: Vec<u8>, conns: usize) -> JoinHandle<()> {
    let bind = bind.to_owned();
    let (tx, rx) = std::sync::mpsc::channel();
    let h = in_netns(ns, move || {
        let l = TcpListener::bind(&bind).unwrap_or_else(|e| panic!("bind {bind}: {e}"));
        tx.send(()).expect("listening");
        serve_http(l, body, conns);
    });
    rx.recv_timeout(Duration::from_secs(5)).expect("server listening");
    h
}

/// `curl ARGS URL` (as root, on the host): the body's SHA-256 and size.
fn curl(args: &[&str], url: &str) -> (u64, [u8; 32], String) {
    let out = Command::new("curl").args(["-sS", "--max-time", "120", "-o", "-"]).args(args).arg(url).output().expect("run curl");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.stdout.len() as u64, Sha256::digest(&out.stdout).into(), err)
}

/// A UDP echo server on `bind` (in namespace `ns`, or on the host), answering `n` datagrams.
fn udp_echo(ns: Option<&str>, bind: &str, n: usize) -> JoinHandle<()> {
    let bind = bind.to_owned();
    let (tx, rx) = std::sync::mpsc::channel();
    let serve = move || {
        let s = UdpSocket::bind(&bind).unwrap_or_else(|e| panic!("bind {bind}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        tx.send(()).expect("bound");
        let mut buf = [0u8; 2048];
        for _ in 0..n {
            let Ok((len, from)) = s.recv_from(&mut buf) else { return };
            let mut reply = b"echo:".to_vec();
            reply.extend_from_slice(&buf[..len]);
            let _ = s.send_to(&reply, from);
        }
    };
    let h = match ns {
        Some(ns) => in_netns(ns, serve),
        None => std::thread::spawn(serve),
    };
    rx.recv_timeout(Duration::from_secs(5)).expect("echo bound");
    h
}

/// Sends `msg` from a fresh UDP socket (in `ns`, or on the host) to `to` until an answer
/// comes (the first datagrams may go while a flow is being set up); returns it.
fn udp_ask(ns: Option<&str>, to: &str, msg: &[u8]) -> Option<Vec<u8>> {
    let (to, msg) = (to.to_owned(), msg.to_vec());
    let ask = move || {
        let to: SocketAddr = to.parse().expect("address");
        let s = UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).expect("bind");
        s.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
        let mut buf = [0u8; 2048];
        for _ in 0..20 {
            s.send_to(&msg, to).ok()?;
            if let Ok((n, _)) = s.recv_from(&mut buf) {
                return Some(buf[..n].to_vec());
            }
        }
        None
    };
    match ns {
        Some(ns) => in_netns(ns, ask).join().expect("udp ask"),
        None => ask(),
    }
}

/// Waits until `addr` (on the host) accepts TCP connections.
fn wait_listening(addr: &str, limit: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if TcpStream::connect(addr).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The user and effective capabilities of process `pid`, from `/proc`.
fn uid_and_caps(pid: i32) -> (String, String) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field =
        |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.split_whitespace().next().unwrap_or("").to_owned()).unwrap_or_default();
    (field("Uid:"), field("CapEff:"))
}

#[test]
fn an_unprivileged_userspace_agent_answers_pings_forwards_exposes_and_serves_socks5() {
    if !system_ready("an_unprivileged_userspace_agent_answers_pings_forwards_exposes_and_serves_socks5") {
        return;
    }
    let session = unique("us");
    let ns = Netns::new();
    let (fwd_tcp, fwd_udp, exp_udp, exp_tcp, socks) = (free_port(), free_port(), free_port(), free_port(), free_port());
    let mut tun = AgentProc::start(&unique("ust"), &["--session", &session, "--netns", &ns.name, "--ipv4", "198.18.81.1/24", "--ipv6", "fd00:81::1/64"]);
    let forward_tcp = format!("tcp:127.0.0.1:{fwd_tcp}=198.18.81.1:8080");
    let forward_udp = format!("udp:127.0.0.1:{fwd_udp}=[fd00:81::1]:5683");
    let expose_udp = format!("udp:5683=127.0.0.1:{exp_udp}");
    let expose_tcp = format!("tcp:80=127.0.0.1:{exp_tcp}");
    let socks5 = format!("127.0.0.1:{socks}");
    let mut user = AgentProc::spawn_unprivileged(
        &unique("usu"),
        &[
            "--url",
            URL,
            "--userspace",
            "--session",
            &session,
            "--ipv4",
            "198.18.81.2/24",
            "--ipv6",
            "fd00:81::2/64",
            "--forward",
            &forward_tcp,
            "--forward",
            &forward_udp,
            "--expose",
            &expose_udp,
            "--expose",
            &expose_tcp,
            "--socks5",
            &socks5,
        ],
    );
    assert!(wait_listening(&socks5, Duration::from_secs(10)), "the userspace agent never listened:\n{}", user.logs());
    let (uid, caps) = uid_and_caps(user.pid());
    assert_eq!((uid.as_str(), caps.as_str()), ("65534", "0000000000000000"), "the userspace agent must run unprivileged");

    // Pings from the TUN agent, both families.
    wait_reachable(&ns, "198.18.81.2", Duration::from_secs(15)).unwrap_or_else(|| panic!("no ping reply:\n{}\n{}", user.logs(), tun.logs()));
    for dst in ["198.18.81.2", "fd00:81::2"] {
        let (ok, out) = ping(&ns, dst, 5);
        assert!(ok, "ping {dst}:\n{out}\n{}", user.logs());
    }

    // --forward tcp: curl fetches from a web server in the TUN agent's namespace.
    let (small, small_sum) = content(2 << 20, 11);
    let (big, big_sum) = content(50 << 20, 12);
    let server = http_in_netns(&ns.name, "198.18.81.1:8080", small, 1);
    let (n, sum, err) = curl(&[], &format!("http://127.0.0.1:{fwd_tcp}/file"));
    assert_eq!((n, sum), (2 << 20, small_sum), "curl through --forward: {err}\n{}", user.logs());
    server.join().expect("server");

    // --socks5: 50 MB, curl resolving the name itself (an IP literal sent as a name).
    let server = http_in_netns(&ns.name, "198.18.81.1:8080", big, 1);
    let t0 = Instant::now();
    let (n, sum, err) = curl(&["--socks5-hostname", &socks5], "http://198.18.81.1:8080/big");
    let took = t0.elapsed();
    assert_eq!((n, sum), (50 << 20, big_sum), "curl through --socks5: {err}\n{}", user.logs());
    eprintln!("userspace: 50 MB through --socks5 in {took:?} ({:.0} Mbit/s)", 400.0 / took.as_secs_f64());
    server.join().expect("server");

    // --forward udp: a datagram from the host to an echo server on the bus, and its answer.
    let echo = udp_echo(Some(&ns.name), "[fd00:81::1]:5683", 1);
    let answer = udp_ask(None, &format!("127.0.0.1:{fwd_udp}"), b"coap-get");
    assert_eq!(answer.as_deref(), Some(&b"echo:coap-get"[..]), "UDP through --forward:\n{}", user.logs());
    echo.join().expect("echo");

    // --expose udp: the TUN agent asks the userspace agent's bus address; a local service answers.
    let echo = udp_echo(None, &format!("127.0.0.1:{exp_udp}"), 1);
    let answer = udp_ask(Some(&ns.name), "198.18.81.2:5683", b"coap-put");
    assert_eq!(answer.as_deref(), Some(&b"echo:coap-put"[..]), "UDP through --expose:\n{}", user.logs());
    echo.join().expect("echo");

    // --expose tcp: the TUN agent fetches from a local web server through the bus.
    let (page, page_sum) = content(3 << 20, 13);
    let local = TcpListener::bind(format!("127.0.0.1:{exp_tcp}")).expect("bind the local service");
    let server = std::thread::spawn(move || serve_http(local, page, 1));
    let fetched = in_netns(&ns.name, || {
        let mut s = TcpStream::connect("198.18.81.2:80").expect("connect to the exposed port");
        s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").expect("request");
        let mut all = Vec::new();
        s.read_to_end(&mut all).expect("response");
        let at = all.windows(4).position(|w| w == b"\r\n\r\n").map_or(all.len(), |p| p + 4);
        all.split_off(at)
    })
    .join()
    .expect("client");
    assert_eq!((fetched.len(), <[u8; 32]>::from(Sha256::digest(&fetched))), (3 << 20, page_sum), "TCP through --expose:\n{}", user.logs());
    server.join().expect("server");

    let r_user = user.interrupt();
    let r_tun = tun.interrupt();
    assert!(r_user["rx_bytes"].as_u64().unwrap_or(0) > 50 << 20, "{r_user}");
    for r in [&r_user, &r_tun] {
        for reason in ["malformed", "no_identity", "wrong_layer", "tun_write"] {
            assert_eq!(drops(r, reason), 0, "{reason}: {r}");
        }
        // First claim: a packet that overtakes its sender's first hello is refused.
        assert!(drops(r, "spoofed") <= 2, "spoofed beyond the start: {r}");
    }
}

#[test]
fn two_userspace_agents_talk_tcp_through_forward_and_expose() {
    if !system_ready("two_userspace_agents_talk_tcp_through_forward_and_expose") {
        return;
    }
    let session = unique("us2");
    let (local, via) = (free_port(), free_port());
    let expose = format!("tcp:8000=127.0.0.1:{local}");
    let forward = format!("tcp:127.0.0.1:{via}=[fd00:82::1]:8000");
    let mut a = AgentProc::spawn_unprivileged(
        &unique("usa"),
        &["--url", URL, "--userspace", "--session", &session, "--ipv4", "198.18.82.1/24", "--ipv6", "fd00:82::1/64", "--expose", &expose],
    );
    let mut b = AgentProc::spawn_unprivileged(
        &unique("usb"),
        &["--url", URL, "--userspace", "--session", &session, "--ipv4", "198.18.82.2/24", "--ipv6", "fd00:82::2/64", "--forward", &forward],
    );
    let (page, sum) = content(8 << 20, 21);
    let listener = TcpListener::bind(format!("127.0.0.1:{local}")).expect("bind the local service");
    let server = std::thread::spawn(move || serve_http(listener, page, 2));
    assert!(wait_listening(&format!("127.0.0.1:{via}"), Duration::from_secs(10)), "{}", b.logs());
    // The first request may race the agents' start (b's hello, a's bindings): retry once.
    let url = format!("http://127.0.0.1:{via}/");
    let mut got = curl(&[], &url);
    if got.0 == 0 {
        std::thread::sleep(Duration::from_secs(1));
        got = curl(&[], &url);
    }
    assert_eq!((got.0, got.1), (8 << 20, sum), "userspace to userspace: {}\n{}\n{}", got.2, a.logs(), b.logs());
    drop(server);
    let _ = a.interrupt();
    let _ = b.interrupt();
}

#[test]
fn a_userspace_agent_on_the_ioppytest_wire_reaches_a_tun_agent_through_agent_route() {
    if !system_ready("a_userspace_agent_on_the_ioppytest_wire_reaches_a_tun_agent_through_agent_route") {
        return;
    }
    let exchange = unique("tunbus.us");
    let ns = Netns::new();
    let (old, new) = (unique("usold"), unique("usnew"));
    let fwd = free_port();
    let mut router = RouterProc::start(&exchange, &format!("--- !configuration\ntopology:\n  - link_id: link_01\n    nodes: [{old}, {new}]\n"));
    let forward = format!("tcp:127.0.0.1:{fwd}=198.18.83.2:8080");
    let mut a_old = AgentProc::spawn_unprivileged(
        &old,
        &[
            "--url",
            URL,
            "--userspace",
            "--exchange",
            &exchange,
            "--wire",
            "ioppytest",
            "--ipv4-address",
            "198.18.83.1",
            "--ipv6-prefix",
            "fd00:83",
            "--ipv6-host",
            "1",
            "--forward",
            &forward,
        ],
    );
    let mut a_new = AgentProc::start(&new, &["--exchange", &exchange, "--netns", &ns.name, "--ipv4", "198.18.83.2/24", "--ipv6", "fd00:83::2/64"]);
    wait_reachable(&ns, "198.18.83.1", Duration::from_secs(20))
        .unwrap_or_else(|| panic!("no ping through the router:\n{}\n{}\n{}", router.logs(), a_old.logs(), a_new.logs()));
    let (ok, out) = ping(&ns, "fd00:83::1", 3);
    assert!(ok, "{out}");
    let (page, sum) = content(4 << 20, 31);
    let server = http_in_netns(&ns.name, "198.18.83.2:8080", page, 1);
    let (n, got, err) = curl(&[], &format!("http://127.0.0.1:{fwd}/"));
    assert_eq!((n, got), (4 << 20, sum), "old-wire userspace agent to native TUN agent: {err}\n{}", router.logs());
    server.join().expect("server");
    let _ = a_old.interrupt();
    let _ = a_new.interrupt();
    let counters = router.stop();
    assert!(counters["bridged_to_native"].as_u64().unwrap_or(0) > 100, "{counters}");
}

#[test]
fn a_userspace_endpoint_cannot_send_from_an_address_its_user_may_not_use() {
    if !system_ready("a_userspace_endpoint_cannot_send_from_an_address_its_user_may_not_use") {
        return;
    }
    // Strict identities at the TUN agent: guest (everyone here) may use .1 and .2 only.
    let dir = std::env::temp_dir().join(unique("uspeers"));
    std::fs::create_dir_all(&dir).expect("folder");
    let peers = dir.join("lab.peers");
    std::fs::write(&peers, "guest 198.18.84.1/32,198.18.84.2/32\n").expect("peers file");
    let session = unique("usid");
    let ns = Netns::new();
    let mut tun =
        AgentProc::start(&unique("usidt"), &["--session", &session, "--netns", &ns.name, "--ipv4", "198.18.84.1/24", "--peers", peers.to_str().expect("path")]);
    let mut honest = AgentProc::spawn_unprivileged(&unique("usidh"), &["--url", URL, "--userspace", "--session", &session, "--ipv4", "198.18.84.2/24"]);
    let mut rogue = AgentProc::spawn_unprivileged(&unique("usidr"), &["--url", URL, "--userspace", "--session", &session, "--ipv4", "198.18.84.9/24"]);
    wait_reachable(&ns, "198.18.84.2", Duration::from_secs(15)).unwrap_or_else(|| panic!("the honest endpoint:\n{}", honest.logs()));
    let (ok, _) = ping(&ns, "198.18.84.9", 5);
    assert!(!ok, "replies from an address guest may not use must not arrive");
    let report = tun.interrupt();
    let _ = honest.interrupt();
    let r_rogue = rogue.interrupt();
    assert!(r_rogue["rx_packets"].as_u64().unwrap_or(0) >= 5, "the rogue got the pings: {r_rogue}");
    assert!(drops(&report, "spoofed") >= 5, "its replies are dropped and counted as spoofed: {report}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_specs_a_port_in_use_and_socks5_garbage_give_clear_answers() {
    if !system_ready("bad_specs_a_port_in_use_and_socks5_garbage_give_clear_answers") {
        return;
    }
    let agent = env!("CARGO_BIN_EXE_agent");
    for (flag, spec, expected) in [
        ("--forward", "tcp:8080", "expected"),
        ("--forward", "sctp:127.0.0.1:1=198.18.0.1:2", "tcp or udp"),
        ("--expose", "tcp:80=nowhere", "expected"),
        ("--socks5", "localhost", "expected"),
    ] {
        let out = Command::new(agent)
            .args(["connect", "--userspace", "--name", "x", "--url", URL, "--ipv4", "198.18.85.1/24", flag, spec])
            .output()
            .expect("run agent");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {spec}: {err}");
        assert!(err.to_lowercase().contains(expected), "{flag} {spec} should say what was expected: {err}");
    }
    let out = Command::new(agent).args(["connect", "--name", "x", "--url", URL, "--forward", "tcp:127.0.0.1:1=198.18.0.1:2"]).output().expect("run agent");
    assert_eq!(out.status.code(), Some(2), "--forward without --userspace: {}", String::from_utf8_lossy(&out.stderr));

    // A local port already taken: exit 9 (local set-up), saying which.
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let session = unique("usbad");
    let out = Command::new(agent)
        .args(["connect", "--userspace", "--name", &unique("usbad"), "--session", &session, "--url", URL, "--ipv4", "198.18.85.1/24", "--stats-interval", "0"])
        .args(["--forward", &format!("tcp:127.0.0.1:{port}=198.18.85.2:80")])
        .output()
        .expect("run agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(9), "a port in use: {err}");
    assert!(err.contains("in use"), "{err}");

    // SOCKS5 garbage closes that client only; a good client after it is served.
    let socks = free_port();
    let socks5 = format!("127.0.0.1:{socks}");
    let mut a =
        AgentProc::spawn_unprivileged(&unique("ussg"), &["--url", URL, "--userspace", "--session", &session, "--ipv4", "198.18.85.1/24", "--socks5", &socks5]);
    assert!(wait_listening(&socks5, Duration::from_secs(10)), "{}", a.logs());
    for garbage in [&b"GET / HTTP/1.1\r\n\r\n"[..], &[5, 1, 0, 5, 9, 9, 9][..], &[4, 1, 0, 80, 1, 2, 3, 4, 0][..], &[5, 255][..]] {
        let mut s = TcpStream::connect(&socks5).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let _ = s.write_all(garbage);
        let mut buf = [0u8; 64];
        let mut total = 0;
        // The server answers (a refusal) and/or closes; it never hangs and never crashes.
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
            if total > 1024 {
                break;
            }
        }
    }
    assert!(a.alive(), "garbage killed the agent:\n{}", a.logs());
    let mut s = TcpStream::connect(&socks5).expect("connect after the garbage");
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    s.write_all(&[5, 1, 0]).expect("greeting");
    let mut reply = [0u8; 2];
    s.read_exact(&mut reply).expect("method reply");
    assert_eq!(reply, [5, 0], "a good client is served after the garbage");
    let _ = a.interrupt();
}

#[test]
fn a_userspace_lab_of_2000_hosts_comes_up_answers_and_leaves_nothing() {
    if !system_ready("a_userspace_lab_of_2000_hosts_comes_up_answers_and_leaves_nothing") {
        return;
    }
    let session = format!("u{}", std::process::id() % 100_000);
    let json = std::env::temp_dir().join(format!("{session}-lab.json"));
    let t0 = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(["lab", "--url", URL, "--userspace", "--hosts", "2000", "--sample", "100", "--session", &session, "--json"])
        .arg(&json)
        .output()
        .expect("run the lab");
    let took = t0.elapsed();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the userspace lab failed:\n{text}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("the lab's JSON")).expect("JSON");
    let _ = std::fs::remove_file(&json);
    eprintln!(
        "userspace lab: 2000 hosts up in {} s, {} pairs, {} MiB ({} MiB per endpoint), ping p50 {} ms; {took:?} in all",
        report["bring_up_s"], report["pairs_checked"], report["rss_mib"], report["rss_per_agent_mib"], report["rtt_p50_ms"]
    );
    assert_eq!(report["hosts_up"], 2000, "{report}");
    assert_eq!(report["pairs_checked"], 100, "{report}");
    assert_eq!(report["failures"].as_array().map(Vec::len), Some(0), "{report}");
    assert!(report["rss_per_agent_mib"].as_f64().unwrap_or(1.0) < 0.2, "{report}");
    // Nothing left: no queue of the session on the broker, no state file, no namespace.
    let queues = run("rabbitmqctl", &["list_queues", "-q", "name"]);
    assert!(!queues.lines().any(|q| q.contains(&format!("tunbus.{session}."))), "queues left:\n{queues}");
    assert!(!std::path::Path::new(&format!("/run/tunbus/lab-{session}.json")).exists(), "state file left");
    assert!(namespaces_with(&format!("tb-{session}")).is_empty(), "namespaces left");
}
