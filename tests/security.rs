//! No spoofing, no eavesdropping: identities the broker enforces.
//!
//! One private RabbitMQ node with the management API. `agent provision` makes a session of
//! three agents and a rogue with valid credentials of its own (over the HTTP API), and a
//! second session with `rabbitmqctl`. Then, as a rogue bus member would:
//! - batches carrying agent a's source address published onto b's keys with the rogue's
//!   own `user_id`, with none, and claiming a's: b drops the first two (counted), the
//!   broker refuses the third, nothing reaches b's namespace, a ↔ b traffic goes on;
//! - binds to b's keys and to `tunbus.v1.#`, a hello under b's name, another session's
//!   vhost: refused by the broker;
//! - first claim (no peers file): a second user's hello claiming a held address is
//!   refused, its packets from that address dropped, and `agent peers` shows the conflict;
//! - a forged `ip.tun.start` from a non-coordinator is refused and counted, no address is
//!   added; a forged `ip.tun.started` for a native agent's address makes `agent route` bind
//!   nothing.

mod common;

use std::net::{Ipv4Addr, UdpSocket};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use common::nodes::TestNode;
use common::*;
use tunbus::amqp::client::{Client, ConnectOptions, Endpoint, Error};
use tunbus::amqp::session::QueueOptions;
use tunbus::amqp::wire::Properties;
use tunbus::codec::v1::BatchWriter;

const SESSION: &str = "sec";

/// An IPv4 UDP packet `src` → `dst`:`port`, header checksum set, no UDP checksum.
fn udp4(src: Ipv4Addr, dst: Ipv4Addr, port: u16, payload: &[u8]) -> Vec<u8> {
    let len = 28 + payload.len();
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let sum = p[..20].chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p[20..22].copy_from_slice(&40000u16.to_be_bytes());
    p[22..24].copy_from_slice(&port.to_be_bytes());
    p[24..26].copy_from_slice(&((len - 20) as u16).to_be_bytes());
    p[28..].copy_from_slice(payload);
    p
}

/// One well-formed v1 batch holding `packet`.
fn batch(packet: &[u8]) -> Vec<u8> {
    let mut w = BatchWriter::with_capacity(128 * 1024);
    w.reset(0);
    w.push(None, packet).expect("fits");
    w.finish(1, tunbus::util::now_ns()).to_vec()
}

fn provision(node: &TestNode, session: &str, agents: &[&str], out: &Path, api: bool) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_agent"));
    cmd.args(["provision", "--url", &format!("amqp://guest:guest@127.0.0.1:{}/", node.plain_port()), "--session", session, "--out"]).arg(out);
    for a in agents {
        cmd.args(["--agent", a]);
    }
    cmd.args(["--observer", "o"]); // a capture user
    if api {
        cmd.args(["--api", &format!("http://127.0.0.1:{}", node.api_port.expect("api"))]);
    } else {
        // No API where provision looks by default (the machine's broker runs none): it falls
        // back to rabbitmqctl, pointed at the private node.
        cmd.env("RABBITMQ_NODENAME", &node.broker.node);
    }
    let out = cmd.output().expect("agent provision runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "provision failed:\n{text}");
    text
}

fn url_of(dir: &Path, agent: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{agent}.url"))).expect("url file").trim().to_owned()
}

fn client_of(url: &str) -> Client {
    let never = AtomicBool::new(false);
    Client::open(&Endpoint::plain(url.parse().expect("url")), &ConnectOptions::new("rogue"), &never).expect("the rogue logs in with its own credentials")
}

/// Starts a provisioned agent in its own namespace.
fn start_agent(dir: &Path, name: &str, ns: &Netns, v4: &str, v6: &str, peers: bool) -> AgentProc {
    let url_file = dir.join(format!("{name}.url"));
    let peers_file = dir.join("peers");
    let mut args = vec!["--url-file", url_file.to_str().expect("utf-8"), "--session", SESSION, "--netns", &ns.name, "--ipv4", v4, "--ipv6", v6];
    if peers {
        args.extend_from_slice(&["--peers", peers_file.to_str().expect("utf-8")]);
    }
    AgentProc::spawn(name, &args)
}

struct World {
    node: TestNode,
    dir: PathBuf,
}

fn spoofing_is_dropped_and_refused(w: &World) {
    let (ns_a, ns_b, ns_c) = (Netns::new(), Netns::new(), Netns::new());
    let mut a = start_agent(&w.dir, "a", &ns_a, "198.18.50.1/24", "fd00:50::1/64", true);
    let mut b = start_agent(&w.dir, "b", &ns_b, "198.18.50.2/24", "fd00:50::2/64", true);
    let mut c = start_agent(&w.dir, "c", &ns_c, "198.18.50.3/24", "fd00:50::3/64", true);
    for (ns, dst) in [(&ns_a, "198.18.50.2"), (&ns_b, "fd00:50::1"), (&ns_c, "198.18.50.1")] {
        wait_reachable(ns, dst, Duration::from_secs(15)).unwrap_or_else(|| panic!("provisioned agents do not reach each other:\n{}\n{}", a.logs(), b.logs()));
    }
    // What reaches b's namespace on UDP port 7777.
    let sink = in_netns(&ns_b.name, || {
        let s = UdpSocket::bind("198.18.50.2:7777").expect("bind in b's namespace");
        s.set_read_timeout(Some(Duration::from_secs(6))).expect("timeout");
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            got.push((from, buf[..n].to_vec()));
        }
        got
    });
    std::thread::sleep(Duration::from_millis(300));
    let body = batch(&udp4("198.18.50.1".parse().unwrap(), "198.18.50.2".parse().unwrap(), 7777, b"spoofed by the rogue"));
    let key = "tunbus.v1.198-18-50-2.3";
    let mut rogue = client_of(&url_of(&w.dir, "r"));
    // 1. With its own user_id (the client stamps it): the broker passes it, b drops it.
    for _ in 0..5 {
        publish(&mut rogue, "tunbus.sec", key, &Properties::default(), &body);
    }
    // 2. Without user_id.
    rogue.set_stamp(None);
    for _ in 0..5 {
        publish(&mut rogue, "tunbus.sec", key, &Properties::default(), &body);
    }
    // 3. Claiming a's user_id: the broker refuses the message and closes the channel.
    let forged = Properties { user_id: Some("sec.a"), ..Properties::default() };
    rogue.publish_copy("tunbus.sec", key, &forged, &body).expect("sent");
    let never = AtomicBool::new(false);
    let refused = loop {
        match rogue.wait_event(Duration::from_secs(2), &never) {
            Err(e) => break e,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the broker accepted a message claiming another user's user_id"),
        }
    };
    assert!(refused.to_string().contains("406") || refused.to_string().contains("user_id"), "{refused}");
    // a ↔ b is unaffected throughout.
    let (ok, out) = ping(&ns_a, "198.18.50.2", 3);
    assert!(ok, "a -> b after the attack:\n{out}");
    let got = sink.join().expect("sink");
    assert!(got.is_empty(), "spoofed packets reached b's namespace: {got:?}");
    let rb = b.interrupt();
    eprintln!(
        "spoofing: b dropped spoofed {}, no_identity {}; the broker refused the forged user_id: {refused}",
        drops(&rb, "spoofed"),
        drops(&rb, "no_identity")
    );
    assert!(drops(&rb, "spoofed") >= 5, "{rb}");
    assert!(drops(&rb, "no_identity") >= 5, "{rb}");
    a.interrupt();
    c.interrupt();
}

/// The capture user (`--observer o`) captures the session with `agent capture`: it sees
/// a's and b's echoes on their interfaces, and a rogue's packet with a's source address
/// under the rogue's own name (the broker vouches for its user). It may send no data.
fn a_capture_user_sees_the_session(w: &World) {
    let url_file = w.dir.join("o.url");
    let file = w.dir.join("session.pcapng");
    let (ns_a, ns_b) = (Netns::new(), Netns::new());
    let mut a = start_agent(&w.dir, "a", &ns_a, "198.18.50.1/24", "fd00:50::1/64", true);
    let mut b = start_agent(&w.dir, "b", &ns_b, "198.18.50.2/24", "fd00:50::2/64", true);
    assert!(wait_reachable(&ns_a, "198.18.50.2", Duration::from_secs(15)).is_some(), "{}", a.logs());
    let log = w.dir.join("capture.log");
    let mut capture = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(["capture", "--url-file", url_file.to_str().expect("utf-8"), "--session", SESSION, "-w", file.to_str().expect("utf-8")])
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("agent capture");
    let t0 = Instant::now();
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("tap open") {
        assert!(t0.elapsed() < Duration::from_secs(10), "the capture user could not open its tap: {}", std::fs::read_to_string(&log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(50));
    }
    let (ok, out) = ping(&ns_a, "198.18.50.2", 5);
    assert!(ok, "{out}");
    let mut rogue = client_of(&url_of(&w.dir, "r"));
    let hello = br#"{"name":"r","addresses":["198.18.50.9/24"],"queues":1,"wire":"v1","started_unix_ms":0}"#;
    publish(&mut rogue, "tunbus.sec", "tunbus.v1.ctl.hello.r", &Properties::default(), hello);
    let spoofed = batch(&udp4("198.18.50.1".parse().unwrap(), "198.18.50.2".parse().unwrap(), 7777, b"spoofed, in the capture"));
    publish(&mut rogue, "tunbus.sec", "tunbus.v1.198-18-50-2.3", &Properties::default(), &spoofed);
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill(2) on our own child.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(capture.id() as i32, libc::SIGINT);
    }
    assert!(capture.wait().expect("capture exits").success(), "{}", std::fs::read_to_string(&log).unwrap_or_default());
    let said = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(said.contains("nothing lost"), "{said}");
    let cap = tunbus::capture::pcapng::read(&std::fs::read(&file).expect("the capture")).expect("pcapng");
    let on = |r: &tunbus::capture::pcapng::Record| cap.interfaces[r.iface as usize].name.clone();
    let icmp_from_a = cap.packets.iter().filter(|r| r.data.get(9) == Some(&1) && r.data.get(12..16) == Some(&[198, 18, 50, 1][..])).map(on).collect::<Vec<_>>();
    assert!(icmp_from_a.len() >= 5 && icmp_from_a.iter().all(|i| i == "a"), "a's echoes on a's interface: {icmp_from_a:?}");
    let spoof: Vec<String> = cap.packets.iter().filter(|r| r.data.windows(7).any(|w| w == b"spoofed")).map(on).collect();
    assert_eq!(spoof, ["r"], "the rogue's packet is named after the rogue's user, not a");
    let publish_data = |c: &mut Client, _: &AtomicBool| c.publish_copy("tunbus.sec", "tunbus.v1.198-18-50-2.3", &Properties::default(), &spoofed).map(drop);
    assert_eq!(refused_code(&url_of(&w.dir, "o"), publish_data), Some(403), "the capture user may not send packets");
    a.interrupt();
    b.interrupt();
    let _ = std::fs::remove_file(&file);
}

/// Runs `act` on a fresh rogue connection; returns the broker's reply code of its refusal.
fn refused_code(url: &str, act: impl FnOnce(&mut Client, &AtomicBool) -> Result<(), Error>) -> Option<u16> {
    let never = AtomicBool::new(false);
    let endpoint = Endpoint::plain(url.parse().expect("url"));
    let mut c = match Client::open(&endpoint, &ConnectOptions::new("rogue"), &never) {
        Ok(c) => c,
        Err(e) => return e.reply_code(),
    };
    match act(&mut c, &never) {
        Ok(()) => match c.wait_event(Duration::from_secs(1), &never) {
            Err(e) => e.reply_code(),
            Ok(_) => None,
        },
        Err(e) => e.reply_code(),
    }
}

fn the_broker_refuses_what_agents_must_not_do(w: &World) {
    let url = url_of(&w.dir, "r");
    let q = QueueOptions { exclusive: true, ..QueueOptions::default() };
    let bind = |key: &'static str| {
        move |c: &mut Client, s: &AtomicBool| {
            let name = c.queue_declare("", q, &[], s)?;
            c.queue_bind(&name, "tunbus.sec", key, s)
        }
    };
    assert_eq!(refused_code(&url, bind("tunbus.v1.198-18-50-2.*")), Some(403), "binding b's address keys");
    assert_eq!(refused_code(&url, bind("tunbus.v1.#")), Some(403), "binding tunbus.v1.#");
    assert_eq!(refused_code(&url, bind("#")), Some(403), "binding #");
    let hello_as_b = |c: &mut Client, _: &AtomicBool| c.publish_copy("tunbus.sec", "tunbus.v1.ctl.hello.b", &Properties::default(), b"{}").map(drop);
    assert_eq!(refused_code(&url, hello_as_b), Some(403), "publishing b's hello");
    let other_queue = |c: &mut Client, s: &AtomicBool| c.queue_declare("tunbus.sec.b.0", QueueOptions::default(), &[], s).map(drop);
    assert!(matches!(refused_code(&url, other_queue), Some(403 | 405)), "declaring b's queue");
    assert_eq!(refused_code(&url, bind("tunbus.v1.198-18-50-9.*")), None, "the rogue may bind its own address");
    let other_vhost = format!("{}/sec2", url.rsplit_once('/').expect("a vhost").0);
    assert!(matches!(refused_code(&other_vhost, |_, _| Ok(())), Some(530 | 403)), "another session's vhost");
    // A client of the other session sees nothing of this one.
    let mut other = client_of(&url_of(&w.dir.join("sec2"), "x"));
    let never = AtomicBool::new(false);
    let q = other.queue_declare("", QueueOptions { exclusive: true, ..QueueOptions::default() }, &[], &never).expect("own queue");
    assert!(other.queue_bind(&q, "tunbus.sec", "tunbus.v1.all.*", &never).is_err(), "the other session reached this one's exchange");
}

fn first_claim(w: &World) {
    // Plain users with full rights on a vhost of their own: only the claim check stands.
    let vhost = "claims";
    for u in ["u1", "u2", "u3"] {
        w.node.add_user(u, Some("pw-claims"), vhost);
    }
    let url = |u: &str| format!("amqp://{u}:pw-claims@127.0.0.1:{}/{vhost}", w.node.plain_port());
    let (ns_x, ns_y) = (Netns::new(), Netns::new());
    let mut x = AgentProc::spawn("x", &["--url", &url("u1"), "--session", "fc", "--netns", &ns_x.name, "--ipv4", "198.18.51.1/24"]);
    let mut y = AgentProc::spawn("y", &["--url", &url("u2"), "--session", "fc", "--netns", &ns_y.name, "--ipv4", "198.18.51.2/24"]);
    wait_reachable(&ns_x, "198.18.51.2", Duration::from_secs(15)).unwrap_or_else(|| panic!("first claim agents:\n{}\n{}", x.logs(), y.logs()));
    // u3 claims x's address in a hello of its own.
    let mut rogue = client_of(&url("u3"));
    let hello = br#"{"name":"fake","addresses":["198.18.51.1/24"],"queues":1,"wire":"v1","started_unix_ms":0}"#;
    publish(&mut rogue, "tunbus.fc", "tunbus.v1.ctl.hello.fake", &Properties::default(), hello);
    std::thread::sleep(Duration::from_millis(500));
    let body = batch(&udp4("198.18.51.1".parse().unwrap(), "198.18.51.2".parse().unwrap(), 7778, b"from a held address"));
    for _ in 0..5 {
        publish(&mut rogue, "tunbus.fc", "tunbus.v1.198-18-51-2.0", &Properties::default(), &body);
    }
    std::thread::sleep(Duration::from_millis(500));
    let (ok, out) = ping(&ns_x, "198.18.51.2", 2);
    assert!(ok, "x -> y after the false claim:\n{out}");
    let peers = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(["peers", "--url", &url("u1"), "--session", "fc", "--wait", "1.5"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("peers");
    std::thread::sleep(Duration::from_millis(700));
    publish(&mut rogue, "tunbus.fc", "tunbus.v1.ctl.hello.fake", &Properties::default(), hello); // the rogue keeps claiming
    let peers_text = String::from_utf8_lossy(&peers.wait_with_output().expect("peers").stdout).into_owned();
    let ry = y.interrupt();
    assert!(y.logs().contains("REFUSED a claim"), "the second claim was not refused loudly:\n{}", y.logs());
    assert!(drops(&ry, "spoofed") >= 5, "{ry}");
    x.interrupt();
    assert!(peers_text.contains("CONFLICT"), "agent peers does not show the conflict:\n{peers_text}");
}

fn forged_orders_are_refused(w: &World) {
    let vhost = "orders";
    for u in ["coord", "mallory"] {
        w.node.add_user(u, Some("pw-orders"), vhost);
    }
    let url = |u: &str| format!("amqp://{u}:pw-orders@127.0.0.1:{}/{vhost}", w.node.plain_port());
    let ns = Netns::new();
    // As a coordinator does: wait for the agent's ip.tun.started, then give orders.
    let mut coord = client_of(&url("coord"));
    listen(&mut coord, "amq.topic", &["fromAgent.agent_1.ip.tun.started"]);
    let mut old = AgentProc::spawn("agent_1", &["--url", &url("coord"), "--wire", "ioppytest", "--coordinator", "coord", "--netns", &ns.name]);
    next_delivery(&mut coord, Duration::from_secs(15)).unwrap_or_else(|| panic!("no ip.tun.started from the ioppytest agent:\n{}", old.logs()));
    let order = |addr: &str, mask: &str| format!(r#"{{"_api_version":"1.2.15","ipv4_address":"{addr}","ipv4_netmask":"{mask}"}}"#);
    let mut mallory = client_of(&url("mallory"));
    let json = tunbus::amqp::IOPPYTEST_PROPERTIES;
    publish(&mut mallory, "amq.topic", "toAgent.agent_1.ip.tun.start", &json, order("10.2.0.77", "255.255.255.0").as_bytes());
    publish(&mut coord, "amq.topic", "toAgent.agent_1.ip.tun.start", &json, order("10.2.0.78", "0.0.0.0").as_bytes());
    publish(&mut coord, "amq.topic", "toAgent.agent_1.ip.tun.start", &json, order("10.2.0.79", "255.255.255.0").as_bytes());
    let t0 = Instant::now();
    let addrs = loop {
        let a = String::from_utf8_lossy(&ns.exec(&["ip", "-o", "addr"]).stdout).into_owned();
        if a.contains("10.2.0.79") || t0.elapsed() > Duration::from_secs(5) {
            break a;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        addrs.contains("10.2.0.79"),
        "the coordinator's order was not carried out:\n{addrs}\n{}\n{}",
        old.logs(),
        String::from_utf8_lossy(&ns.exec(&["ip", "-o", "link"]).stdout)
    );
    assert!(!addrs.contains("10.2.0.77"), "a non-coordinator added an address:\n{addrs}");
    assert!(!addrs.contains("10.2.0.78"), "a netmask of 0 was accepted:\n{addrs}");
    let r = old.interrupt();
    assert_eq!(drops(&r, "forged_control"), 2, "{r}");

    // agent route: a forged ip.tun.started for a native agent's address binds nothing.
    let ns_n = Netns::new();
    let mut native = AgentProc::spawn("native1", &["--url", &url("coord"), "--netns", &ns_n.name, "--ipv4", "10.2.0.50/24"]);
    wait_reachable(&ns_n, "10.2.0.50", Duration::from_secs(10)).expect("native agent up");
    let topo = std::env::temp_dir().join(unique("tunbus-topo-"));
    std::fs::write(&topo, "topology:\n  - nodes: [agent_1, agent_2, native1]\n").expect("topology");
    let router = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(["route", "--url", &url("coord"), "--stats-interval", "0", "--topology"])
        .arg(&topo)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("router");
    std::thread::sleep(Duration::from_secs(2)); // it hears native1's hello
    let started = r#"{"_api_version":"1.2.15","name":"agent_2","ipv4_address":"10.2.0.50","ipv4_netmask":"255.255.255.0"}"#;
    publish(&mut mallory, "amq.topic", "fromAgent.agent_2.ip.tun.started", &json, started.as_bytes());
    let stranger = r#"{"_api_version":"1.2.15","name":"stranger","ipv4_address":"10.2.0.60","ipv4_netmask":"255.255.255.0"}"#;
    publish(&mut mallory, "amq.topic", "fromAgent.stranger.ip.tun.started", &json, stranger.as_bytes());
    std::thread::sleep(Duration::from_secs(1));
    let bindings = w.node.ctl(&["list_bindings", "-p", vhost, "-q", "destination_name", "routing_key"]);
    // SAFETY: signalling our own child.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(router.id() as i32, libc::SIGINT);
    }
    let out = router.wait_with_output().expect("router exits");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        !bindings.lines().any(|l| l.contains("tunbus.router") && (l.contains("10-2-0-50") || l.contains("10-2-0-60"))),
        "the router bound a forged address:\n{bindings}"
    );
    assert!(log.contains("REFUSED") && log.contains("not a node of the topology"), "{log}");
    native.interrupt();
    let _ = std::fs::remove_file(topo);
}

#[test]
fn identities_the_broker_enforces() {
    if !system_ready("identities_the_broker_enforces") {
        return;
    }
    let node = TestNode::start_with_api(true);
    let dir = std::env::temp_dir().join(unique("tunbus-prov-"));
    let text = provision(
        &node,
        SESSION,
        &["a=198.18.50.1/24,fd00:50::1/64", "b=198.18.50.2/24,fd00:50::2/64", "c=198.18.50.3/24,fd00:50::3/64", "r=198.18.50.9/24"],
        &dir,
        true,
    );
    assert!(text.contains("management HTTP API"), "{text}");
    let text2 = provision(&node, "sec2", &["x=198.18.53.1/24"], &dir.join("sec2"), false);
    eprintln!("provisioned: {}\n{}", text.lines().next().unwrap_or(""), text2.lines().next().unwrap_or(""));
    let world = World { node, dir };
    type Step = (&'static str, fn(&World));
    let steps: [Step; 5] = [
        ("spoofing_is_dropped_and_refused", spoofing_is_dropped_and_refused),
        ("the_broker_refuses_what_agents_must_not_do", the_broker_refuses_what_agents_must_not_do),
        ("first_claim", first_claim),
        ("forged_orders_are_refused", forged_orders_are_refused),
        ("a_capture_user_sees_the_session", a_capture_user_sees_the_session),
    ];
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
    // Revoke leaves nothing of the sessions.
    let out = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args([
            "provision",
            "--revoke",
            "--session",
            SESSION,
            "--url",
            &format!("amqp://guest:guest@127.0.0.1:{}/", world.node.plain_port()),
            "--api",
            &format!("http://127.0.0.1:{}", world.node.api_port.expect("api")),
        ])
        .output()
        .expect("revoke");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let users = world.node.ctl(&["list_users", "-q"]);
    assert!(!users.contains("sec.a") && !users.contains("sec.r") && !users.contains("sec.o"), "{users}");
    assert!(!world.node.ctl(&["list_vhosts", "-q"]).lines().any(|l| l.trim() == SESSION));
    let _ = std::fs::remove_dir_all(&world.dir);
    assert!(failed.is_empty(), "failed steps: {failed:?}");
}
