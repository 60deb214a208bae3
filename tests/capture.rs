//! Captures, end to end: `agent capture` on a real session exchange while real agents
//! ping and stream TCP through RabbitMQ; `agent connect --pcap`; ioppytest's sniffer
//! requests answered by `agent sniffer`. Files are read back with `tcpdump -r` and with
//! tunbus's own pcapng reader, and checked packet by packet.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest, Sha256};
use tunbus::amqp::client::Owned;
use tunbus::amqp::wire::Properties;
use tunbus::capture::pcapng::{self, Direction};

/// An `agent <args>` process other than connect (capture, sniffer), stopped on drop.
struct Tool {
    child: Option<Child>,
    log: PathBuf,
}

impl Tool {
    fn start(args: &[&str], log_name: &str) -> Tool {
        let log = std::env::temp_dir().join(format!("{log_name}.log"));
        let file = std::fs::File::create(&log).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_agent"))
            .args(args)
            .env_remove("AMQP_URL")
            .stdout(file.try_clone().expect("fd"))
            .stderr(file)
            .spawn()
            .expect("spawn agent");
        Tool { child: Some(child), log }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log says `what`.
    fn wait_for(&self, what: &str, limit: Duration) {
        let t0 = Instant::now();
        while !self.logs().contains(what) {
            assert!(t0.elapsed() < limit, "no {what:?} within {limit:?}:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `signal` to the running tool.
    fn signal(&self, signal: i32) {
        let child = self.child.as_ref().expect("running");
        // SAFETY: kill(2) on our own child, not reaped yet (it is reaped only once taken).
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(child.id() as i32, signal);
        }
    }

    /// Ctrl-C; waits for a clean exit.
    fn interrupt(&mut self) -> String {
        self.signal(libc::SIGINT);
        let mut child = self.child.take().expect("running");
        let status = wait_child(&mut child, Duration::from_secs(10));
        assert!(status.is_some_and(|s| s.success()), "exit after SIGINT: {status:?}\n{}", self.logs());
        self.logs()
    }
}

fn wait_child(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

impl Drop for Tool {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A file in the temporary folder, removed on drop (also when the test fails).
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str) -> TempFile {
        TempFile(std::env::temp_dir().join(name))
    }

    fn arg(&self) -> &str {
        self.0.to_str().expect("a UTF-8 temporary path")
    }
}

impl std::ops::Deref for TempFile {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempFile {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// An ICMP echo in an IPv4 packet: (source, destination, is_request, id, seq).
fn echo(p: &[u8]) -> Option<(IpAddr, IpAddr, bool, u16, u16)> {
    if p.first()? >> 4 != 4 || *p.get(9)? != 1 {
        return None;
    }
    let ihl = usize::from(p[0] & 0xf) * 4;
    let icmp = p.get(ihl..ihl + 8)?;
    let kind = match icmp[0] {
        8 => true,
        0 => false,
        _ => return None,
    };
    let src = IpAddr::from(<[u8; 4]>::try_from(&p[12..16]).ok()?);
    let dst = IpAddr::from(<[u8; 4]>::try_from(&p[16..20]).ok()?);
    Some((src, dst, kind, u16::from_be_bytes([icmp[4], icmp[5]]), u16::from_be_bytes([icmp[6], icmp[7]])))
}

/// A TCP segment in an IPv4 packet: (source, destination port, seq, flags, payload).
fn tcp(p: &[u8]) -> Option<(IpAddr, u16, u32, u8, &[u8])> {
    if p.first()? >> 4 != 4 || *p.get(9)? != 6 {
        return None;
    }
    let ihl = usize::from(p[0] & 0xf) * 4;
    let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
    let t = p.get(ihl..total)?;
    let off = usize::from(t.get(12)? >> 4) * 4;
    let src = IpAddr::from(<[u8; 4]>::try_from(&p[12..16]).ok()?);
    Some((src, u16::from_be_bytes([t[2], t[3]]), u32::from_be_bytes([t[4], t[5], t[6], t[7]]), t[13], t.get(off..)?))
}

/// Reassembles the byte stream of the TCP segments from `src` to port `port`.
fn reassemble(packets: &[&[u8]], src: IpAddr, port: u16) -> Vec<u8> {
    let mut isn = None;
    let mut pieces: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
    for p in packets {
        let Some((s, dport, seq, flags, payload)) = tcp(p) else { continue };
        if s != src || dport != port {
            continue;
        }
        if flags & 0x02 != 0 {
            isn = Some(seq);
        }
        if !payload.is_empty() {
            pieces.entry(seq).or_insert_with(|| payload.to_vec());
        }
    }
    let mut next = isn.expect("the capture holds the SYN").wrapping_add(1);
    let mut out = Vec::new();
    while let Some(piece) = pieces.get(&next) {
        out.extend_from_slice(piece);
        next = next.wrapping_add(piece.len() as u32);
    }
    out
}

fn tcpdump(file: &Path, filter: &str) -> String {
    let out = Command::new("tcpdump").args(["-nn", "-r"]).arg(file).arg(filter).output().expect("tcpdump runs (apt-get install tcpdump)");
    assert!(out.status.success(), "tcpdump -r {} failed: {}", file.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Host {
    agent: AgentProc,
    ns: Netns,
    addr: String,
}

fn hosts(net: u8, n: usize, extra: &[&str]) -> Vec<Host> {
    let hosts: Vec<Host> = (1..=n)
        .map(|i| {
            let ns = Netns::new();
            let addr = format!("198.18.{net}.{i}");
            let v4 = format!("{addr}/24");
            let mut args = vec!["--url", URL, "--netns", ns.name.as_str(), "--ipv4", v4.as_str()];
            args.extend_from_slice(extra);
            let agent = AgentProc::spawn(&unique(&format!("c{i}")), &args);
            Host { agent, ns, addr }
        })
        .collect();
    for h in &hosts[1..] {
        assert!(wait_reachable(&hosts[0].ns, &h.addr, Duration::from_secs(15)).is_some(), "{} unreachable:\n{}", h.addr, h.agent.logs());
    }
    hosts
}

#[test]
fn merged_capture_of_three_agents_holds_every_echo_and_the_tcp_stream() {
    if !system_ready("merged_capture_of_three_agents_holds_every_echo_and_the_tcp_stream") {
        return;
    }
    let session = unique("cap");
    // Two queues per agent: batches of one sender cross the broker on two connections and
    // reach the tap out of timestamp order; the file must still be in order.
    let hs = hosts(80, 3, &["--session", &session, "--queues", "2"]);
    let file = TempFile::new(&format!("{session}.pcapng"));
    let only_h3 = TempFile::new(&format!("{session}-h3.pcapng"));
    let mut capture = Tool::start(&["capture", "--url", URL, "--session", &session, "-w", file.arg()], &session);
    let mut filtered =
        Tool::start(&["capture", "--url", URL, "--session", &session, "-w", only_h3.arg(), "--agent", &hs[2].agent.name], &format!("{session}-h3"));
    let whole = TempFile::new(&format!("{session}-whole.pcapng"));
    let h3_addr = hs[2].addr.clone();
    let mut unsegmented =
        Tool::start(&["capture", "--url", URL, "--session", &session, "-w", whole.arg(), "--address", &h3_addr, "--no-segment"], &format!("{session}-whole"));
    capture.wait_for("tap open", Duration::from_secs(10));
    filtered.wait_for("tap open", Duration::from_secs(10));
    unsegmented.wait_for("tap open", Duration::from_secs(10));

    // 100 pings each way between h1 and h2, and between h2 and h3.
    let runs: Vec<_> = [(0, 1), (1, 0), (1, 2), (2, 1)]
        .into_iter()
        .map(|(a, b)| {
            let (ns, dst) = (hs[a].ns.name.clone(), hs[b].addr.clone());
            std::thread::spawn(move || {
                Command::new("ip").args(["netns", "exec", &ns, "ping", "-n", "-q", "-c", "100", "-i", "0.01", "-W", "1", &dst]).output().expect("ping")
            })
        })
        .collect();
    for r in runs {
        let out = r.join().expect("ping thread");
        assert!(String::from_utf8_lossy(&out.stdout).contains(" 0% packet loss"), "{}", String::from_utf8_lossy(&out.stdout));
    }
    // A TCP transfer h1 -> h3 (super-packets on the bus, segments in the file), beside
    // four iperf3 flows h2 -> h3 over both of h2's queues.
    let mut server = Command::new("ip")
        .args(["netns", "exec", &hs[2].ns.name, "iperf3", "-s", "-1", "-B", &hs[2].addr, "-p", "5302"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("iperf3 -s");
    std::thread::sleep(Duration::from_millis(300));
    let (ns2, dst) = (hs[1].ns.name.clone(), hs[2].addr.clone());
    let flows = std::thread::spawn(move || {
        Command::new("ip").args(["netns", "exec", &ns2, "iperf3", "-c", &dst, "-p", "5302", "-P", "4", "-t", "2", "-b", "50M"]).output().expect("iperf3 -c")
    });
    let sink = tcp_sink(&hs[2].ns.name, format!("{}:5301", hs[2].addr), 1);
    let sent = tcp_send(&hs[0].ns.name, format!("{}:5301", hs[2].addr), 4 << 20, 99).join().expect("sender");
    assert_eq!(sink.join().expect("sink"), vec![Digest256 { bytes: sent.bytes, sha256: sent.sha256 }]);
    let flows = flows.join().expect("iperf3 thread");
    assert!(flows.status.success(), "iperf3 -P 4: {}", String::from_utf8_lossy(&flows.stdout));
    let _ = server.wait();
    std::thread::sleep(Duration::from_millis(500));
    let said = capture.interrupt();
    let said_h3 = filtered.interrupt();
    let said_whole = unsegmented.interrupt();
    assert!(said.contains("nothing lost"), "{said}");

    // tcpdump reads the file and sees every echo.
    let icmp = tcpdump(&file, "icmp");
    assert!(icmp.matches("echo request").count() >= 400 && icmp.matches("echo reply").count() >= 400, "tcpdump -r:\n{}", &icmp[..icmp.len().min(2000)]);

    let cap = pcapng::read(&std::fs::read(&file).expect("the capture file")).expect("a pcapng file tunbus can read");
    let names: BTreeSet<&str> = cap.interfaces.iter().map(|i| i.name.as_str()).collect();
    for h in &hs {
        assert!(names.contains(h.agent.name.as_str()), "an interface per agent: {names:?}");
    }
    assert!(cap.interfaces.iter().all(|i| pcapng::is_raw_ip(i.linktype)), "raw IP");
    let owner: HashMap<IpAddr, &str> = hs.iter().map(|h| (h.addr.parse().expect("ip"), h.agent.name.as_str())).collect();
    let mut echoes: BTreeSet<(IpAddr, IpAddr, bool, u16)> = BTreeSet::new();
    let mut last_ts: HashMap<u32, u64> = HashMap::new();
    for r in &cap.packets {
        let iface = cap.interfaces[r.iface as usize].name.as_str();
        let before = last_ts.insert(r.iface, r.timestamp_ns).unwrap_or(0);
        assert!(r.timestamp_ns >= before, "{iface}: timestamps go back ({before} then {})", r.timestamp_ns);
        assert!(r.data.len() <= 9000, "a {}-byte packet: super-packets are cut to the MTU", r.data.len());
        assert!(r.comment.as_deref().is_some_and(|c| c.contains("from ") && c.contains(" key tunbus.v1.") && c.contains(" batch ")), "comment {:?}", r.comment);
        if let Some((src, dst, request, _, seq)) = echo(&r.data) {
            assert_eq!(Some(&iface), owner.get(&src), "an echo from {src} is on its sender's interface");
            echoes.insert((src, dst, request, seq));
        }
    }
    for (a, b) in [(0, 1), (1, 0), (1, 2), (2, 1)] {
        let (src, dst): (IpAddr, IpAddr) = (hs[a].addr.parse().expect("ip"), hs[b].addr.parse().expect("ip"));
        for seq in 1..=100 {
            assert!(echoes.contains(&(src, dst, true, seq)), "echo request {src} -> {dst} seq {seq} missing");
            assert!(echoes.contains(&(dst, src, false, seq)), "echo reply {dst} -> {src} seq {seq} missing");
        }
    }
    let packets: Vec<&[u8]> = cap.packets.iter().map(|r| r.data.as_slice()).collect();
    let stream = reassemble(&packets, hs[0].addr.parse().expect("ip"), 5301);
    assert_eq!(stream.len() as u64, sent.bytes, "the TCP stream in the capture");
    assert_eq!(<[u8; 32]>::from(Sha256::digest(&stream)), sent.sha256, "the captured segments reassemble to the data sent");

    // --agent h3: only what h3 sent or was sent.
    let h3: IpAddr = hs[2].addr.parse().expect("ip");
    let cap3 = pcapng::read(&std::fs::read(&only_h3).expect("file")).expect("pcapng");
    assert!(!cap3.packets.is_empty(), "{said_h3}");
    for r in &cap3.packets {
        // Sent by h3 (its interface: the kernel's IPv6 router solicitations too), or to h3.
        let by_h3 = cap3.interfaces[r.iface as usize].name == hs[2].agent.name;
        assert!(
            by_h3 || tunbus::route::destination(&r.data) == Some(h3),
            "--agent h3 kept a packet neither from nor to h3: {:?}",
            tunbus::route::source(&r.data)
        );
    }

    // --no-segment: the super-packets as the agents carried them, the same stream.
    let kept = pcapng::read(&std::fs::read(&whole).expect("file")).expect("pcapng");
    let biggest = kept.packets.iter().map(|r| r.data.len()).max().unwrap_or(0);
    assert!(biggest > 9000, "--no-segment keeps super-packets whole: the largest is {biggest} bytes\n{said_whole}");
    let packets: Vec<&[u8]> = kept.packets.iter().map(|r| r.data.as_slice()).collect();
    assert_eq!(
        <[u8; 32]>::from(Sha256::digest(reassemble(&packets, hs[0].addr.parse().expect("ip"), 5301))),
        sent.sha256,
        "the whole super-packets hold the same stream"
    );
}

/// A capture that cannot keep up (stopped with SIGSTOP while 64 MiB of TCP cross the bus,
/// its tap queue bounded at 64 KiB) loses from its own queue only: it reports the batches
/// it lost, and the transfer arrives whole, the sender's report without a drop.
#[test]
fn a_capture_that_falls_behind_counts_its_losses_and_the_agents_lose_nothing() {
    if !system_ready("a_capture_that_falls_behind_counts_its_losses_and_the_agents_lose_nothing") {
        return;
    }
    let session = unique("capl");
    let mut pair = Pair::start(84, &["--session", &session]);
    let file = TempFile::new(&format!("{session}.pcapng"));
    let mut capture = Tool::start(&["capture", "--url", URL, "--session", &session, "-w", file.arg(), "--queue-max-bytes", "65536", "--json"], &session);
    capture.wait_for("tap open", Duration::from_secs(10));
    capture.signal(libc::SIGSTOP);
    let sink = tcp_sink(&pair.ns_b.name, format!("{}:5303", pair.v4[1]), 1);
    let sent = tcp_send(&pair.ns_a.name, format!("{}:5303", pair.v4[1]), 64 << 20, 7).join().expect("sender");
    let got = sink.join().expect("sink");
    capture.signal(libc::SIGCONT);
    assert_eq!(got, vec![Digest256 { bytes: sent.bytes, sha256: sent.sha256 }], "the transfer arrives whole");
    // What the tap kept is read now, then a ping shows the capture is current again.
    std::thread::sleep(Duration::from_millis(500));
    let (ok, text) = ping(&pair.ns_a, &pair.v4[1], 3);
    assert!(ok, "{text}");
    std::thread::sleep(Duration::from_millis(500));
    let said = capture.interrupt();
    let summary: serde_json::Value = said.lines().rev().find_map(|l| serde_json::from_str(l).ok()).unwrap_or_else(|| panic!("no JSON summary:\n{said}"));
    let lost = summary["counts"]["lost_batches"].as_u64().unwrap_or(0);
    eprintln!("a stopped capture: {} batches written, {lost} lost", summary["counts"]["messages"]);
    assert!(lost > 0 && summary["counts"]["packets"].as_u64().unwrap_or(0) > 0, "a stopped capture with a 64 KiB tap loses batches and says so: {summary}");
    let cap = pcapng::read(&std::fs::read(&file).expect("the capture file")).expect("pcapng");
    let (a, b): (IpAddr, IpAddr) = (pair.v4[0].parse().expect("ip"), pair.v4[1].parse().expect("ip"));
    let pings: BTreeSet<u16> = cap.packets.iter().filter_map(|r| echo(&r.data)).filter(|e| (e.0, e.1, e.2) == (a, b, true)).map(|e| e.4).collect();
    assert_eq!(pings, (1..=3).collect(), "after its losses the capture goes on: the pings sent after are in the file");
    let report = pair.a.interrupt();
    for reason in ["broker_blocked", "broker_down", "no_buffer"] {
        assert_eq!(drops(&report, reason), 0, "the sender dropped nothing ({reason}) while the capture lost {lost} batches: {report}");
    }
    assert_eq!(report["reconnects"], 0, "{report}");
}

#[test]
fn capture_stops_by_itself_after_its_duration() {
    if !system_ready("capture_stops_by_itself_after_its_duration") {
        return;
    }
    let session = unique("capd");
    let file = TempFile::new(&format!("{session}.pcapng"));
    let mut t = Tool::start(&["capture", "--url", URL, "--session", &session, "-w", file.arg(), "--duration", "1s"], &session);
    let mut child = t.child.take().expect("running");
    let status = wait_child(&mut child, Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "{status:?}: {}", t.logs());
    assert!(t.logs().contains("0 packets"), "{}", t.logs());
    assert!(pcapng::read(&std::fs::read(&file).expect("file")).expect("pcapng").packets.is_empty());
}

#[test]
fn connect_pcap_holds_both_directions_of_the_tun() {
    if !system_ready("connect_pcap_holds_both_directions_of_the_tun") {
        return;
    }
    let file = TempFile::new(&format!("{}.pcapng", unique("tunpcap")));
    let path = file.arg().to_owned();
    let mut pair = Pair::start_with(81, &["--pcap", &path], &[]);
    let (ok, text) = ping(&pair.ns_a, &pair.v4[1], 20);
    assert!(ok, "{text}");
    pair.a.interrupt();
    assert!(pair.a.logs().contains("written"), "{}", pair.a.logs());
    let cap = pcapng::read(&std::fs::read(&file).expect("the --pcap file")).expect("pcapng");
    let (a, b): (IpAddr, IpAddr) = (pair.v4[0].parse().expect("ip"), pair.v4[1].parse().expect("ip"));
    let mut out = BTreeSet::new();
    let mut back = BTreeSet::new();
    for r in &cap.packets {
        match (echo(&r.data), r.direction) {
            (Some((s, d, true, _, seq)), Some(Direction::Outbound)) if (s, d) == (a, b) => {
                out.insert(seq);
            }
            (Some((s, d, false, _, seq)), Some(Direction::Inbound)) if (s, d) == (b, a) => {
                back.insert(seq);
            }
            _ => {}
        }
    }
    let all: BTreeSet<u16> = (1..=20).collect();
    assert!(all.is_subset(&out) && all.is_subset(&back), "requests out {out:?}, replies in {back:?}");
    let dump = tcpdump(&file, "icmp");
    assert!(dump.matches("echo request").count() >= 20, "{dump}");
}

/// Standard base64 back to bytes (the test's own, to check the sniffer's).
fn unbase64(s: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let mut out = Vec::new();
    for chunk in s.as_bytes().chunks(4) {
        let digits: Vec<u8> = chunk.iter().copied().filter(|c| *c != b'=').map(value).collect();
        let n = digits.iter().enumerate().fold(0u32, |n, (i, d)| n | u32::from(*d) << (18 - 6 * i));
        out.extend_from_slice(&n.to_be_bytes()[1..digits.len()]);
    }
    out
}

/// The packets of a classic pcap file.
fn classic_packets(bytes: &[u8]) -> (u32, Vec<Vec<u8>>) {
    assert_eq!(&bytes[..4], &[0xd4, 0xc3, 0xb2, 0xa1], "classic pcap, little-endian, microseconds");
    let linktype = u32::from_le_bytes(bytes[20..24].try_into().expect("4"));
    let mut at = 24;
    let mut packets = Vec::new();
    while at + 16 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().expect("4")) as usize;
        packets.push(bytes[at + 16..at + 16 + len].to_vec());
        at += 16 + len;
    }
    (linktype, packets)
}

#[test]
fn ioppytest_sniffer_answers_start_stop_and_getcapture() {
    if !system_ready("ioppytest_sniffer_answers_start_stop_and_getcapture") {
        return;
    }
    let exchange = unique("sniff");
    let dir = std::env::temp_dir().join(&exchange);
    let sniffer = Tool::start(&["sniffer", "--url", URL, "--exchange", &exchange, "--dir", dir.to_str().expect("utf-8")], &exchange);
    sniffer.wait_for("sniffer ready", Duration::from_secs(10));
    let pair = Pair::start(82, &["--exchange", &exchange]);
    let mut c = bus_client();
    listen(&mut c, &exchange, &["sniffing.*.reply"]);
    let mut ask = |verb: &str, body: &str, id: &str| -> serde_json::Value {
        let props = Properties { content_type: Some("application/json"), correlation_id: Some(id), ..Properties::default() };
        publish(&mut c, &exchange, &format!("sniffing.{verb}.request"), &props, body.as_bytes());
        let never = std::sync::atomic::AtomicBool::new(false);
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if let Some(Owned::Delivery { routing_key, correlation_id, body, .. }) = c.wait_event(left, &never).expect("connection") {
                assert_eq!(routing_key, format!("sniffing.{verb}.reply"));
                assert_eq!(correlation_id.as_deref(), Some(id), "the answer names the request it answers");
                return serde_json::from_slice(&body).expect("a JSON answer");
            }
        }
        panic!("no answer to {verb}:\n{}", sniffer.logs())
    };
    let started = ask("start", r#"{"capture_id": "TD_COAP_CORE_01", "filter_if": "tun0", "filter_proto": "udp", "_api_version": "1.2.14"}"#, "c1");
    assert_eq!(started["ok"], true, "{started}");
    let again = ask("start", r#"{"capture_id": "TD_COAP_CORE_02"}"#, "c2");
    assert_eq!(again["ok"], false, "a second start while one runs is refused: {again}");
    let (ok, text) = ping(&pair.ns_a, &pair.v4[1], 10);
    assert!(ok, "{text}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(ask("stop", "{}", "c3")["ok"], true);
    let got = ask("getcapture", r#"{"capture_id": "TD_COAP_CORE_01"}"#, "c4");
    assert_eq!(
        (got["ok"].clone(), got["file_enc"].clone(), got["filename"].clone()),
        (true.into(), "pcap_base64".into(), "TD_COAP_CORE_01.pcap".into()),
        "{got}"
    );
    let (linktype, packets) = classic_packets(&unbase64(got["value"].as_str().expect("value")));
    assert_eq!(linktype, 101, "raw IP, as ioppytest's sniffer writes");
    let (a, b): (IpAddr, IpAddr) = (pair.v4[0].parse().expect("ip"), pair.v4[1].parse().expect("ip"));
    let requests: BTreeSet<u16> = packets.iter().filter_map(|p| echo(p)).filter(|e| (e.0, e.1, e.2) == (a, b, true)).map(|e| e.4).collect();
    let replies: BTreeSet<u16> = packets.iter().filter_map(|p| echo(p)).filter(|e| (e.0, e.1, e.2) == (b, a, false)).map(|e| e.4).collect();
    let all: BTreeSet<u16> = (1..=10).collect();
    assert!(all.is_subset(&requests) && all.is_subset(&replies), "requests {requests:?} replies {replies:?}");
    let last = ask("getlastcapture", "{}", "c5");
    assert_eq!(last["value"], got["value"]);
    let missing = ask("getcapture", r#"{"capture_id": "nope"}"#, "c6");
    assert_eq!(missing["ok"], false, "{missing}");
    drop(sniffer);
    let _ = std::fs::remove_dir_all(&dir);
}

/// An ioppytest session where `agent route` bridges an old-wire agent and a native one:
/// the old agent's packets cross the bus twice (its JSON, then the router's v1 copy). The
/// capture holds each once, on the interface of the agent that sent it, and the old
/// agent's interface carries the addresses of its `ip.tun.started`.
#[test]
fn a_bridged_ioppytest_session_is_captured_once_per_packet() {
    if !system_ready("a_bridged_ioppytest_session_is_captured_once_per_packet") {
        return;
    }
    let exchange = unique("tunbus.capx");
    let (old, native) = (unique("old"), unique("nat"));
    let (ns_old, ns_new) = (Netns::new(), Netns::new());
    let _router = RouterProc::start(&exchange, &format!("topology:\n  - link_id: l\n    nodes: [{old}, {native}]\n"));
    let file = TempFile::new(&format!("{exchange}.pcapng"));
    let mut capture = Tool::start(&["capture", "--url", URL, "--exchange", &exchange, "-w", file.arg()], &exchange);
    capture.wait_for("tap open", Duration::from_secs(10));
    let _old = AgentProc::start(&old, &["--wire", "ioppytest", "--exchange", &exchange, "--netns", &ns_old.name, "--ipv4", "10.2.0.1/24"]);
    let _new = AgentProc::start(&native, &["--exchange", &exchange, "--netns", &ns_new.name, "--ipv4", "10.2.0.2/24"]);
    assert!(wait_reachable(&ns_old, "10.2.0.2", Duration::from_secs(20)).is_some(), "no connectivity through the router");
    let out = ns_old.exec(&["ping", "-n", "-q", "-c", "20", "-i", "0.05", "-W", "1", "10.2.0.2"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(" 0% packet loss"), "{}", String::from_utf8_lossy(&out.stdout));
    std::thread::sleep(Duration::from_millis(300));
    let said = capture.interrupt();
    assert!(said.contains("copies the ioppytest router bridged left out"), "{said}");

    let cap = pcapng::read(&std::fs::read(&file).expect("the capture file")).expect("pcapng");
    let (a, b): (IpAddr, IpAddr) = ("10.2.0.1".parse().expect("ip"), "10.2.0.2".parse().expect("ip"));
    let mut seen: HashMap<(bool, u16, u16), Vec<&str>> = HashMap::new();
    for r in &cap.packets {
        let Some((src, dst, request, id, seq)) = echo(&r.data) else { continue };
        if (src, dst) == (a, b) || (src, dst) == (b, a) {
            seen.entry((request, id, seq)).or_default().push(cap.interfaces[r.iface as usize].name.as_str());
        }
    }
    // Every echo (wait_reachable's and the 20 pings') is in the file once, under its sender;
    // the 20 pings' run is whole.
    for ((request, id, seq), by) in &seen {
        let what = if *request { "request" } else { "reply" };
        assert_eq!(by.len(), 1, "echo {what} id {id} seq {seq} is in the file {} times: {by:?}", by.len());
        assert_eq!(by[0], if *request { old.as_str() } else { native.as_str() }, "echo {what} on its sender's interface");
    }
    let run = seen.keys().filter(|(request, _, seq)| *request && *seq == 20).map(|k| k.1).next().expect("the 20th ping");
    for seq in 1..=20u16 {
        assert!(seen.contains_key(&(true, run, seq)) && seen.contains_key(&(false, run, seq)), "echo {seq} of the run missing: {seen:?}");
    }
    let iface = cap.interfaces.iter().find(|i| i.name == old).expect("the old agent's interface");
    assert!(iface.addresses.iter().any(|(ip, len)| *ip == a && *len == 24), "its addresses, from its ip.tun.started: {:?}", iface.addresses);
    assert_eq!(tcpdump(&file, "icmp and host 10.2.0.2").matches("echo request").count(), seen.keys().filter(|k| k.0).count(), "tcpdump reads the same");
}
