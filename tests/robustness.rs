//! Robustness, with real agents in real namespaces and the real broker: hostile virtio
//! headers (the allow-list in `codec::vnet`) and `--no-offload-from-bus`, packets checked
//! where the kernel delivers them; a receiver flooded far beyond what it drains (memory,
//! queue limits, broker alarms, recovery); the kernel's own drops on a full TUN queue;
//! `kill -9` of agents and labs at random moments, and nothing left behind.

mod common;

use std::net::{Ipv4Addr, UdpSocket};
use std::time::Duration;

use common::*;
use tunbus::codec::v1::{self, FrameHeader, Packet, FLAG_VNET};
use tunbus::codec::vnet::{self, VnetHdr};

/// Every test here wants the machine to itself: the flood measures a 2 s recovery, the
/// others ping and would lose replies to a flood running beside them.
static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// RFC 1071 sum of `bytes` folded to 16 bits (not complemented).
fn sum16(bytes: &[u8], mut sum: u32) -> u16 {
    for c in bytes.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// An IPv4 packet (valid header checksum) with protocol `proto` and transport bytes `l4`.
fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let len = 20 + l4.len();
    let mut p = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, proto, 0, 0];
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let check = !sum16(&p, 0);
    p[10..12].copy_from_slice(&check.to_be_bytes());
    p.extend_from_slice(l4);
    p
}

/// IPv4/UDP with the checksum field holding only the pseudo-header sum, as a kernel leaves
/// it for offload (NEEDS_CSUM); `complete` writes the full checksum instead.
fn udp4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8], complete: bool) -> Vec<u8> {
    let ulen = (8 + payload.len()) as u16;
    let mut u = Vec::with_capacity(usize::from(ulen));
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&ulen.to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&ulen.to_be_bytes());
    let partial = sum16(&pseudo, 0);
    let check = if complete { !sum16(&u, u32::from(partial)) } else { partial };
    u[6..8].copy_from_slice(&check.to_be_bytes());
    ipv4(src, dst, 17, &u)
}

/// IPv4/TCP, a bare ACK with `payload`, to a port nobody listens on.
fn tcp4(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let mut t = vec![0x9c, 0x40, 0x13, 0x89, 0, 0, 0, 1, 0, 0, 0, 1, 5 << 4, 0x10, 0xff, 0xff, 0, 0, 0, 0];
    t.extend_from_slice(payload);
    ipv4(src, dst, 6, &t)
}

/// The header a kernel writes for `packet` (UDP or TCP over IPv4) with segments of
/// `gso_size` (0: checksum only).
fn offload(packet: &[u8], gso_size: u16) -> VnetHdr {
    let tcp = packet[9] == 6;
    let gso_type = match (gso_size, tcp) {
        (0, _) => vnet::GSO_NONE,
        (_, true) => vnet::GSO_TCPV4,
        (_, false) => vnet::GSO_UDP_L4,
    };
    VnetHdr { flags: vnet::F_NEEDS_CSUM, gso_type, hdr_len: if tcp { 40 } else { 28 }, gso_size, csum_start: 20, csum_offset: if tcp { 16 } else { 6 } }
}

/// One frame per (header, packet), as a peer's worker would publish them.
fn frames(entries: &[(VnetHdr, Vec<u8>)]) -> Vec<Vec<u8>> {
    entries
        .iter()
        .map(|(h, p)| {
            let hdr = h.to_bytes();
            let mut out = Vec::new();
            let header = FrameHeader { flags: FLAG_VNET, count: 0, sender_queues: 0, seq: 1, timestamp_ns: 0 };
            v1::encode(header, &[Packet { vnet: Some(&hdr), data: p }], &mut out).expect("frame");
            out
        })
        .collect()
}

/// Publishes `bodies` onto every data queue of agent `name` (stamped `guest`, the login
/// both agents of a [`Pair`] share, so the first-claim check lets them through).
/// Publishes `bodies` straight onto queues 0..`queues` of agent `name` of `session` (the
/// default exchange).
fn publish_to(session: &str, name: &str, queues: usize, bodies: &[Vec<u8>]) {
    let mut c = bus_client();
    for q in 0..queues {
        for b in bodies {
            publish(&mut c, "", &format!("tunbus.{session}.{name}.{q}"), &Default::default(), b);
        }
    }
    c.close(Duration::from_secs(1));
}

/// Kernel log lines that would mean our packets hurt the kernel.
fn kernel_warnings(since: usize) -> Vec<String> {
    let out = std::process::Command::new("dmesg").output().expect("dmesg");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(since)
        .filter(|l| ["WARNING", "BUG", "bad gso", "skb_warn_bad_offload", "Oops", "general protection", "tun:", "virtio"].iter().any(|w| l.contains(w)))
        .map(str::to_owned)
        .collect()
}

fn dmesg_lines() -> usize {
    let out = std::process::Command::new("dmesg").output().expect("dmesg");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// A UDP socket in `ns` on `addr`; returns the datagrams it got within `wait` once
/// `expect` arrived or time ran out.
fn udp_listen(ns: &str, addr: &str, expect: usize, wait: Duration) -> (std::thread::JoinHandle<Vec<Vec<u8>>>, std::sync::mpsc::Receiver<()>) {
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let addr = addr.to_owned();
    let h = in_netns(ns, move || {
        let s = UdpSocket::bind(&addr).expect("bind udp in namespace");
        s.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
        ready_tx.send(()).expect("ready");
        let mut got = Vec::new();
        let t0 = std::time::Instant::now();
        let mut buf = vec![0u8; 65536];
        while got.len() < expect && t0.elapsed() < wait {
            if let Ok(n) = s.recv(&mut buf) {
                got.push(buf[..n].to_vec());
            }
        }
        got
    });
    (h, ready)
}

#[test]
fn hostile_virtio_headers_are_counted_and_valid_offload_still_works() {
    if !system_ready("hostile_virtio_headers_are_counted_and_valid_offload_still_works") {
        return;
    }
    let _alone = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    // A session of its own: the flood test's hellos on amq.topic, which the broker may still
    // be routing when this test starts, would fill the first-claim table of these agents.
    let session = unique("rb");
    let mut p = Pair::start(60, &["--session", &session]);
    let (a, b): (Ipv4Addr, Ipv4Addr) = (p.v4[0].parse().expect("v4"), p.v4[1].parse().expect("v4"));
    let dmesg_before = dmesg_lines();

    let udp = udp4(a, b, 4000, 5000, &[7u8; 3000], false);
    let tcp = tcp4(a, b, &[9u8; 3000]);
    let tcp_gso = offload(&tcp, 1448);
    let udp_gso = offload(&udp, 1400);
    let mut v6_packet = vec![0u8; 40 + 20 + 100];
    v6_packet[0] = 0x60;
    v6_packet[4..6].copy_from_slice(&120u16.to_be_bytes());
    v6_packet[6] = 6;
    v6_packet[8..24].copy_from_slice(&"fd00:3c::1".parse::<std::net::Ipv6Addr>().expect("v6").octets());
    v6_packet[24..40].copy_from_slice(&"fd00:3c::2".parse::<std::net::Ipv6Addr>().expect("v6").octets());
    v6_packet[40 + 12] = 5 << 4;
    let hostile: Vec<(VnetHdr, Vec<u8>)> = vec![
        (VnetHdr { gso_size: 0, ..tcp_gso }, tcp.clone()),
        (VnetHdr { gso_size: 1, ..tcp_gso }, tcp.clone()),
        (VnetHdr { gso_size: 1, ..udp_gso }, udp.clone()),
        (VnetHdr { gso_type: vnet::GSO_TCPV6, ..tcp_gso }, tcp.clone()), // IPv6 GSO on IPv4
        (VnetHdr { gso_type: vnet::GSO_TCPV4, csum_start: 40, ..tcp_gso }, v6_packet.clone()), // IPv4 GSO on IPv6
        (VnetHdr { gso_type: vnet::GSO_UDP, ..udp_gso }, udp.clone()),   // UFO
        (VnetHdr { gso_type: vnet::GSO_UDP_L4, ..tcp_gso }, tcp.clone()), // UDP GSO on TCP
        (VnetHdr { gso_type: vnet::GSO_TCPV4, ..udp_gso }, udp.clone()), // TCP GSO on UDP
        (VnetHdr { gso_type: 7, ..tcp_gso }, tcp.clone()),
        (VnetHdr { gso_type: vnet::GSO_UDP_L4 | vnet::GSO_ECN, ..udp_gso }, udp.clone()),
        (VnetHdr { csum_start: 0, ..tcp_gso }, tcp.clone()),
        (VnetHdr { csum_start: 3050, ..tcp_gso }, tcp.clone()), // past the end
        (VnetHdr { csum_start: 65535, csum_offset: 65535, ..offload(&udp, 0) }, udp.clone()),
        (VnetHdr { csum_offset: 0, ..offload(&udp, 0) }, udp.clone()),
        (VnetHdr { flags: vnet::F_NEEDS_CSUM | 0x04, ..tcp_gso }, tcp.clone()), // extra flag bit
        (VnetHdr { flags: 0x80, ..offload(&udp, 0) }, udp.clone()),
        (VnetHdr { flags: 0, ..tcp_gso }, tcp.clone()),     // GSO without NEEDS_CSUM
        (VnetHdr { gso_size: 48, ..tcp_gso }, tcp.clone()), // 63 segments: fine ...
        (VnetHdr { gso_size: 20, ..udp_gso }, udp.clone()), // ... 150: too many
        (offload(&tcp, 1448), {
            let mut t = tcp.clone();
            t[2] ^= 0x10;
            t
        }), // IP length lies
    ];
    // gso_size 48 on 3000 bytes is legal (63 segments); so is gso_size 65535 (one
    // segment: written as checksum-only).
    let allowed_among_hostile = 1;
    let one_segment = vec![(VnetHdr { gso_size: 65535, ..tcp_gso }, tcp.clone())];
    let bad = (hostile.len() - allowed_among_hostile) as u64;

    // Valid offload next to them: a UDP GSO super-packet of 10 datagrams of 100 bytes.
    let payload: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
    let super_udp = udp4(a, b, 4000, 5000, &payload, false);
    let valid = vec![(offload(&super_udp, 100), super_udp)];
    let (listener, ready) = udp_listen(&p.ns_b.name, &format!("{b}:5000"), 10, Duration::from_secs(5));
    ready.recv().expect("listener ready");
    let mut all = frames(&hostile);
    all.extend(frames(&valid));
    all.extend(frames(&one_segment));
    publish_to(&session, &p.b.name, 1, &all);

    let got = listener.join().expect("listener");
    assert_eq!(got.len(), 10, "the valid UDP GSO packet did not arrive as 10 datagrams: {:?}", got.iter().map(Vec::len).collect::<Vec<_>>());
    assert_eq!(got.concat(), payload, "datagrams differ from what was sent");
    assert!(p.b.alive(), "agent died on hostile headers:\n{}", p.b.logs());
    let (ok, out) = ping(&p.ns_a, &p.v4[1], 3);
    assert!(ok, "ping after hostile headers failed:\n{out}");
    let sink = tcp_sink(&p.ns_b.name, format!("{}:5003", p.v4[1]), 1);
    let sent = tcp_send(&p.ns_a.name, format!("{}:5003", p.v4[1]), 8 << 20, 60).join().expect("tcp sender");
    assert_eq!(sink.join().expect("sink"), vec![sent], "TCP after hostile headers arrived damaged");

    let rb = p.b.interrupt();
    assert_eq!(drops(&rb, "bad_vnet"), bad, "{rb}");
    let warnings = kernel_warnings(dmesg_before);
    assert!(warnings.is_empty(), "the kernel complained:\n{}", warnings.join("\n"));
}

#[test]
fn no_offload_from_bus_completes_checksums_and_refuses_super_packets() {
    if !system_ready("no_offload_from_bus_completes_checksums_and_refuses_super_packets") {
        return;
    }
    let _alone = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    // The sender asks its kernel for no offload; the receiver takes none from the bus.
    let session = unique("rb");
    let mut p = Pair::start_with(61, &["--no-offload", "--session", &session], &["--no-offload-from-bus", "--session", &session]);
    let (a, b): (Ipv4Addr, Ipv4Addr) = (p.v4[0].parse().expect("v4"), p.v4[1].parse().expect("v4"));
    let payload = b"checksum completed in software".to_vec();
    let partial = udp4(a, b, 4000, 5001, &payload, false);
    let super_udp = udp4(a, b, 4000, 5001, &[1u8; 1000], false);
    let (listener, ready) = udp_listen(&p.ns_b.name, &format!("{b}:5001"), 2, Duration::from_secs(3));
    ready.recv().expect("listener ready");
    publish_to(&session, &p.b.name, 1, &frames(&[(offload(&partial, 0), partial), (offload(&super_udp, 100), super_udp)]));
    let got = listener.join().expect("listener");
    // With a plain header the kernel checks the UDP checksum: this arrived only if it was completed.
    assert_eq!(got, vec![payload], "expected the checksum-only datagram and nothing of the super-packet");

    let sink = tcp_sink(&p.ns_b.name, format!("{}:5004", p.v4[1]), 1);
    let sent = tcp_send(&p.ns_a.name, format!("{}:5004", p.v4[1]), 8 << 20, 61).join().expect("tcp sender");
    assert_eq!(sink.join().expect("sink"), vec![sent], "TCP without offload arrived damaged");
    let rb = p.b.interrupt();
    assert_eq!(drops(&rb, "offload_refused"), 1, "{rb}");
    assert_eq!(drops(&rb, "bad_vnet"), 0, "{rb}");
}

/// What one kill may leave, looked for after it.
struct Leftovers {
    namespaces: Vec<String>,
    state_file: bool,
    broker_processes: Vec<u32>,
    folders: Vec<String>,
    guard: Option<u32>,
}

impl Leftovers {
    /// What lab `pid` of `session` left, once its guard is done (bounded wait).
    fn of_lab(pid: u32, session: &str, wait: Duration) -> Leftovers {
        let t0 = std::time::Instant::now();
        loop {
            let l = Leftovers {
                namespaces: namespaces_with(&format!("tb-{session}-")),
                state_file: std::path::Path::new(&format!("/run/tunbus/lab-{session}.json")).exists(),
                broker_processes: processes_with_env_prefix(&format!("RABBITMQ_NODENAME=tunbus-{pid}-")),
                folders: std::fs::read_dir(std::env::temp_dir())
                    .map(|d| {
                        d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with(&format!("tunbus-lab-{session}-"))).collect()
                    })
                    .unwrap_or_default(),
                guard: processes_with_args(&["--guard", &pid.to_string()]).first().copied(),
            };
            if l.is_empty() || t0.elapsed() > wait {
                return l;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn is_empty(&self) -> bool {
        self.namespaces.is_empty() && !self.state_file && self.broker_processes.is_empty() && self.folders.is_empty() && self.guard.is_none()
    }
}

impl std::fmt::Debug for Leftovers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "namespaces {:?}, state file {}, broker processes {:?}, folders {:?}, guard {:?}",
            self.namespaces, self.state_file, self.broker_processes, self.folders, self.guard
        )
    }
}

/// Processes with an environment entry starting with `prefix`.
fn processes_with_env_prefix(prefix: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| env.split(|b| *b == 0).any(|v| v.starts_with(prefix.as_bytes()))))
        .collect()
}

/// TUN devices in namespace `ns` (`None`: this one).
fn tun_devices(ns: Option<&str>) -> Vec<String> {
    let mut args = vec![];
    if let Some(ns) = ns {
        args.extend(["-n", ns]);
    }
    args.extend(["-o", "link", "show", "type", "tun"]);
    run("ip", &args).lines().filter_map(|l| l.split(": ").nth(1)).map(|n| n.split('@').next().unwrap_or(n).to_owned()).collect()
}

/// Queues on the machine's broker whose name starts with one of `prefixes`.
fn queues_with(prefixes: &[String]) -> Vec<String> {
    run("rabbitmqctl", &["list_queues", "-q", "--no-table-headers", "name"])
        .lines()
        .map(str::trim)
        .filter(|q| prefixes.iter().any(|p| q.starts_with(p.as_str())))
        .map(str::to_owned)
        .collect()
}

#[test]
fn killed_at_random_moments_nothing_is_left() {
    if !system_ready("killed_at_random_moments_nothing_is_left") {
        return;
    }
    let _alone = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    // TUNBUS_KILL_SEED=<n> replays a run (the seed is printed on failure);
    // TUNBUS_KILL_ROUNDS=200 is the long run of docs/performance.md.
    let rounds: u64 = std::env::var("TUNBUS_KILL_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    let seed = std::env::var("TUNBUS_KILL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(tunbus::util::now_ns);
    let mut state = seed;
    let mut next = |bound: u64| {
        state = tunbus::util::splitmix64(state);
        state % bound
    };
    let mut queue_prefixes = Vec::new();
    let mut done = Vec::new();
    // The agents' status sockets: a killed agent cannot remove its own; `agent status`
    // removes what it left.
    let status_dir = std::env::temp_dir().join(unique("killst"));
    let status_text = status_dir.display().to_string();
    // Of every 5 kills: 2 agents, 2 labs on the machine's broker (one --keep), 1 lab on a
    // private node; each at a random moment from start-up to teardown.
    for round in 0..rounds {
        let kind = round % 5;
        let at = Duration::from_millis(match kind {
            0 | 1 => next(2500),
            2 | 3 => next(4000),
            _ => next(9000),
        });
        if kind < 2 {
            let ns = Netns::new();
            let name = unique("kill");
            queue_prefixes.push(format!("tunbus.{name}."));
            let mut agent = AgentProc::start(&name, &["--netns", &ns.name, "--ipv4", "198.18.62.1/24", "--queues", "2", "--status-dir", &status_text]);
            std::thread::sleep(at);
            agent.stop_with(libc::SIGKILL, Duration::from_secs(5));
            // The TUN closes with the process; nothing of it stays here or there.
            let t0 = std::time::Instant::now();
            let left = loop {
                let left: Vec<String> = tun_devices(Some(&ns.name)).into_iter().chain(tun_devices(None).into_iter().filter(|n| n.starts_with("tbt"))).collect();
                if left.is_empty() || t0.elapsed() > Duration::from_secs(5) {
                    break left;
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            assert!(left.is_empty(), "seed {seed}, round {round}: agent killed after {at:?} left TUN devices {left:?}");
            done.push(format!("connect at {at:?}"));
        } else {
            let session = unique("kl");
            queue_prefixes.push(format!("tunbus.{session}."));
            let mut args = vec!["lab", "--hosts", "3", "--throughput-seconds", "0", "--session", &session];
            match kind {
                2 => args.push("--keep"),
                3 => {}
                _ => args.push("--private-broker"),
            }
            let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_agent"))
                .args(&args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("lab starts");
            std::thread::sleep(at);
            let pid = child.id();
            let _ = child.kill();
            let _ = child.wait();
            let left = Leftovers::of_lab(pid, &session, Duration::from_secs(30));
            if !left.is_empty() {
                let _ = std::process::Command::new(env!("CARGO_BIN_EXE_agent")).args(["lab", "--cleanup"]).output();
                panic!("seed {seed}, round {round}: lab {args:?} killed after {at:?} left {left:?}");
            }
            done.push(format!("{} at {at:?}", args[7..].join(" ")));
        }
    }
    let left = queues_with(&queue_prefixes);
    assert!(left.is_empty(), "seed {seed}: queues left behind: {left:?}");
    let swept = std::process::Command::new(env!("CARGO_BIN_EXE_agent")).args(["status", "--dir", &status_text]).output().expect("agent status");
    assert!(swept.status.success(), "{}", String::from_utf8_lossy(&swept.stderr));
    let sockets: Vec<_> = std::fs::read_dir(&status_dir).map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect()).unwrap_or_default();
    assert!(sockets.is_empty(), "seed {seed}: status sockets left after agent status: {sockets:?}");
    let _ = std::fs::remove_dir(&status_dir);
    println!("seed {seed}: {rounds} kills, nothing left: {}", done.join(", "));
}

/// Resident memory of process `pid`, in MiB.
fn rss_mib(pid: i32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .map_or(0.0, |kib| kib / 1024.0)
}

/// (name, ready messages, their bytes) of the machine broker's queues starting with
/// `prefix`: what the queue's length limits bound (messages delivered and not yet
/// acknowledged are bounded by the prefetch instead).
fn queue_depths(prefix: &str) -> Vec<(String, u64, u64)> {
    run("rabbitmqctl", &["list_queues", "-q", "--no-table-headers", "name", "messages_ready", "message_bytes_ready"])
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (n, m, b) = (f.next()?, f.next()?.parse().ok()?, f.next()?.parse().ok()?);
            n.starts_with(prefix).then(|| (n.to_owned(), m, b))
        })
        .collect()
}

fn broker_alarms() -> String {
    run("rabbitmqctl", &["eval", "rabbit_alarm:get_alarms()."]).trim().to_owned()
}

/// One flood: what a thread publishes until `stop`, as fast as the broker takes it.
fn flood(kind: u8, queue: String, stop: std::sync::Arc<std::sync::atomic::AtomicBool>, src: Ipv4Addr, dst: Ipv4Addr) -> std::thread::JoinHandle<(u64, u64)> {
    std::thread::spawn(move || {
        use std::sync::atomic::Ordering;
        let mut c = bus_client();
        let small: Vec<Vec<u8>> = (0..900).map(|i| udp4(src, dst, 4000 + (i % 16) as u16, 9, &[0u8; 36], true)).collect();
        let frame_of = |packets: &[Vec<u8>]| {
            let ps: Vec<Packet<'_>> = packets.iter().map(|p| Packet { vnet: Some(&vnet::PLAIN), data: p }).collect();
            let mut out = Vec::new();
            v1::encode(FrameHeader { flags: FLAG_VNET, count: 0, sender_queues: 0, seq: 1, timestamp_ns: 0 }, &ps, &mut out).expect("frame");
            out
        };
        let smalls = frame_of(&small);
        let big: Vec<Vec<u8>> = (0..4).map(|_| udp4(src, dst, 4000, 9, &vec![1u8; 60_000], true)).collect();
        let bigs = frame_of(&big);
        let spoofed = frame_of(&[udp4(Ipv4Addr::new(198, 18, 63, 99), dst, 4000, 9, &[0u8; 36], true)]);
        let garbage: Vec<u8> = (0..60_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let (mut messages, mut bytes) = (0u64, 0u64);
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            let (exchange, key, body): (&str, String, Vec<u8>) = match kind {
                0 => ("", queue.clone(), smalls.clone()),
                1 => match i % 4 {
                    0 => ("", queue.clone(), garbage.clone()),
                    1 => ("", queue.clone(), spoofed.clone()),
                    _ => ("", queue.clone(), bigs.clone()),
                },
                _ => {
                    if i.is_multiple_of(2) {
                        ("amq.topic", "tunbus.v1.ctl.probe".into(), br#"{"from":"flood"}"#.to_vec())
                    } else {
                        let addrs: Vec<String> = (0..64).map(|j| format!("\"10.{}.{}.{}/32\"", (i >> 8) & 255, i & 255, j)).collect();
                        let hello = format!(r#"{{"name":"flood{i}","addresses":[{}],"queues":1,"wire":"v1","started_unix_ms":0}}"#, addrs.join(","));
                        ("amq.topic", format!("tunbus.v1.ctl.hello.flood{}", i % 1000), hello.into_bytes())
                    }
                }
            };
            if c.publish_copy(exchange, &key, &Default::default(), &body).is_err() || !c.wait_writable(Duration::from_secs(5)).unwrap_or(false) {
                break;
            }
            messages += 1;
            bytes += body.len() as u64;
        }
        c.close(Duration::from_secs(1));
        (messages, bytes)
    })
}

#[test]
fn an_overloaded_receiver_stays_bounded_and_recovers() {
    if !system_ready("an_overloaded_receiver_stays_bounded_and_recovers") {
        return;
    }
    let _alone = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut p = Pair::start(63, &[]);
    let (a, b): (Ipv4Addr, Ipv4Addr) = (p.v4[0].parse().expect("v4"), p.v4[1].parse().expect("v4"));
    let seconds = std::env::var("TUNBUS_OVERLOAD_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(30u64);
    let queue = format!("tunbus.{}.0", p.b.name);
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let floods: Vec<_> = (0..3).map(|k| flood(k, queue.clone(), stop.clone(), a, b)).collect();

    // The agent's bound (docs/architecture.md, "Memory"): 24 MiB of its own, per queue two
    // batch sets (8 × 256 KiB), receive buffers, and the first-claim table when full.
    let bound_mib = 24.0 + 1.0 * (8.0 * 0.25 + 2.0 * 0.125 + 1.0) + 16.0;
    let limits = (4096u64, 4u64 << 20);
    let (mut max_rss, mut max_depth, mut worst) = (0.0f64, (0u64, 0u64), String::new());
    let t0 = std::time::Instant::now();
    let mut alarms = Vec::new();
    while t0.elapsed() < Duration::from_secs(seconds) {
        max_rss = max_rss.max(rss_mib(p.b.pid()));
        for (name, messages, bytes) in queue_depths("tunbus.").into_iter().filter(|q| q.0.contains(&p.b.name) || q.0.contains(&p.a.name)) {
            if messages > max_depth.0 || bytes > max_depth.1 {
                worst = name.clone();
            }
            max_depth = (max_depth.0.max(messages), max_depth.1.max(bytes));
        }
        let a = broker_alarms();
        if a != "[]" {
            alarms.push(a);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    stop.store(true, Ordering::Relaxed);
    let sent: Vec<(u64, u64)> = floods.into_iter().map(|f| f.join().expect("flood thread")).collect();
    let recovered = first_reply_after(&p.ns_a, &p.v4[1], std::time::SystemTime::now(), Duration::from_secs(10));
    assert!(p.b.alive(), "the receiver died under the flood:\n{}", p.b.logs());
    let rb = p.b.interrupt();
    let offered: u64 = sent.iter().map(|s| s.0).sum();
    println!(
        "{seconds} s flood: {offered} messages ({:.0} MB) offered, {:.1} times what the receiver took ({} messages), it wrote {} packets; max RSS {max_rss:.1} MiB (bound {bound_mib:.1}); deepest queue {worst}: {} messages, {} bytes; recovered in {recovered:?}; drops {}",
        sent.iter().map(|s| s.1).sum::<u64>() as f64 / 1e6,
        offered as f64 / rb["rx_batches"].as_u64().unwrap_or(1).max(1) as f64,
        rb["rx_batches"],
        rb["rx_packets"],
        max_depth.0,
        max_depth.1,
        rb["drops"]
    );
    assert!(alarms.is_empty(), "the broker raised alarms: {alarms:?}");
    assert!(max_rss <= bound_mib, "receiver RSS {max_rss:.1} MiB above its bound {bound_mib:.1} MiB");
    assert!(max_depth.0 <= limits.0 && max_depth.1 <= limits.1 + (256 << 10), "queue {worst} grew past its limits: {max_depth:?}");
    assert!(recovered.is_some_and(|d| d <= Duration::from_secs(2)), "not reachable within 2 s of the flood's end: {recovered:?}");
    for reason in ["malformed", "spoofed"] {
        assert!(drops(&rb, reason) > 0, "no {reason} drops counted: {rb}");
    }
}

#[test]
fn the_kernels_drops_on_a_full_tun_queue_are_counted() {
    if !system_ready("the_kernels_drops_on_a_full_tun_queue_are_counted") {
        return;
    }
    let _alone = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let session = unique("rb");
    let mut p = Pair::start(64, &["--session", &session]);
    let dst = format!("{}:9", p.v4[1]);
    // A worker that does not read (stopped): the kernel's TUN queue fills and it drops.
    // SAFETY: kill(2) on the pid of a child the test spawned.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(p.a.pid(), libc::SIGSTOP);
    }
    in_netns(&p.ns_a.name, move || {
        let s = UdpSocket::bind("0.0.0.0:0").expect("udp");
        for _ in 0..5000 {
            let _ = s.send_to(&[0u8; 64], &dst);
        }
    })
    .join()
    .expect("sender");
    #[allow(unsafe_code)]
    // SAFETY: as above.
    unsafe {
        libc::kill(p.a.pid(), libc::SIGCONT);
    }
    let stats = String::from_utf8_lossy(&p.ns_a.exec(&["cat", "/proc/net/dev"]).stdout).into_owned();
    let kernel = tunbus::metrics::kernel::tx_dropped(&stats, "tb0").expect("tb0 in /proc/net/dev");
    assert!(kernel > 0, "the kernel dropped nothing:\n{stats}");
    std::thread::sleep(Duration::from_millis(1500));
    let ra = p.a.interrupt();
    assert_eq!(drops(&ra, "tun_queue_full"), kernel, "{ra}");
}
