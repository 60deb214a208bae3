//! End-to-end encryption (`--e2e`, docs/decisions/0029) on the real broker, real TUN
//! devices and namespaces: two agents with keys from `agent keygen` carry ping and a
//! 100 MB TCP transfer (SHA-256 equal) while a broker-side observer bound to `tunbus.v1.#`
//! finds no trace of the transfer's marker; a rogue with its own login, and a broker user
//! allowed to impersonate (what a hostile broker operator can do), publish forged and
//! replayed batches: all dropped and counted, the victim unaffected; a restarted agent is
//! reached again within 5 s through a new handshake.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::*;
use sha2::{Digest, Sha256};
use tunbus::amqp::client::Owned;
use tunbus::amqp::wire::Properties;

/// Every broker user of these tests may do anything on vhost `/` (the broker is not what is
/// tested here: its permissions have tests of their own).
fn user(prefix: &str) -> TempUser {
    TempUser::new(prefix, ".*", ".*", ".*", None)
}

/// `agent keygen > FILE` (mode 600); returns the public key it printed on stderr.
fn keygen(path: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_agent")).arg("keygen").output().expect("agent keygen runs");
    assert!(out.status.success(), "agent keygen: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(path, &out.stdout).expect("key file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let err = String::from_utf8_lossy(&out.stderr);
    let public = err.trim().strip_prefix("public key: ").unwrap_or_else(|| panic!("keygen's stderr: {err}")).to_owned();
    // --public gives the same from the file.
    let mut p =
        Command::new(env!("CARGO_BIN_EXE_agent")).args(["keygen", "--public"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("keygen --public");
    p.stdin.take().expect("stdin").write_all(&out.stdout).expect("write key");
    let again = p.wait_with_output().expect("keygen --public output");
    assert_eq!(String::from_utf8_lossy(&again.stdout).trim(), public);
    public
}

/// Two namespaces and two broker users, keys and a peers file; the agents are started by
/// [`Setup::start`]. Net `net`: 198.18.<net>.1/.2, fd00:<net>::1/::2.
struct Setup {
    dir: PathBuf,
    /// Each agent's broker user (its name is its agent's) and URL.
    names: [String; 2],
    urls: [String; 2],
    /// A session of its own (its exchange `tunbus.<session>`): other tests' agents on the
    /// shared broker stay out of it.
    session: String,
    /// The users on the machine's broker, deleted on drop (none on a private node).
    _users: Vec<TempUser>,
    ns: [Netns; 2],
    v4: [String; 2],
    v6: [String; 2],
}

impl Setup {
    fn new(net: u8) -> Setup {
        Setup::with_keys(net, [true, true])
    }

    /// Like [`Setup::new`]; `keyed[i]`: whether the peers file gives agent i's key.
    fn with_keys(net: u8, keyed: [bool; 2]) -> Setup {
        let users = vec![user("tbea"), user("tbeb")];
        let names = [users[0].name.clone(), users[1].name.clone()];
        let urls = [users[0].url(), users[1].url()];
        Setup::with_users(net, keyed, names, urls, users)
    }

    /// Agents logging in as `names` at `urls`.
    fn with_users(net: u8, keyed: [bool; 2], names: [String; 2], urls: [String; 2], users: Vec<TempUser>) -> Setup {
        let dir = std::env::temp_dir().join(unique("tbe2e"));
        std::fs::create_dir_all(&dir).expect("dir");
        let v4 = [format!("198.18.{net}.1"), format!("198.18.{net}.2")];
        let v6 = [format!("fd00:{net:x}::1"), format!("fd00:{net:x}::2")];
        let mut peers = String::from("# test peers\n");
        for i in 0..2 {
            let public = keygen(&dir.join(format!("{i}.key")));
            let key = if keyed[i] { format!(" key={public}") } else { String::new() };
            peers.push_str(&format!("{} {}/32,{}/128{key}\n", names[i], v4[i], v6[i]));
        }
        std::fs::write(dir.join("peers"), peers).expect("peers file");
        Setup { dir, names, urls, session: unique("e2es"), _users: users, ns: [Netns::new(), Netns::new()], v4, v6 }
    }

    /// Agent `i` (its name is its broker user's, as a peers file without session says).
    fn start(&self, i: usize, extra: &[&str]) -> AgentProc {
        self.start_as(i, true, extra)
    }

    /// Agent `i`, with `--e2e` or without (then it checks identities with the same peers file).
    fn start_as(&self, i: usize, e2e: bool, extra: &[&str]) -> AgentProc {
        let url = self.urls[i].clone();
        let key = self.dir.join(format!("{i}.key"));
        let peers = self.dir.join("peers");
        let (v4, v6) = (format!("{}/24", self.v4[i]), format!("{}/64", self.v6[i]));
        let mut args = vec![
            "--url",
            url.as_str(),
            "--session",
            self.session.as_str(),
            "--netns",
            self.ns[i].name.as_str(),
            "--ipv4",
            v4.as_str(),
            "--ipv6",
            v6.as_str(),
            "--e2e",
            "--private-key",
            key.to_str().expect("utf-8"),
            "--peers",
            peers.to_str().expect("utf-8"),
        ];
        if !e2e {
            args.retain(|a| *a != "--e2e");
            let at = args.iter().position(|a| *a == "--private-key").expect("flag");
            args.drain(at..at + 2);
        }
        args.extend_from_slice(extra);
        AgentProc::spawn(&self.names[i], &args)
    }

    /// Agent `i` with `--e2e` and no peers file: first-claim identities, keys pinned on
    /// first use from hellos.
    fn start_first_use(&self, i: usize, extra: &[&str]) -> AgentProc {
        let url = self.urls[i].clone();
        let key = self.dir.join(format!("{i}.key"));
        let (v4, v6) = (format!("{}/24", self.v4[i]), format!("{}/64", self.v6[i]));
        let mut args = vec!["--url", url.as_str(), "--session", self.session.as_str(), "--netns", self.ns[i].name.as_str()];
        args.extend(["--ipv4", v4.as_str(), "--ipv6", v6.as_str(), "--e2e", "--private-key", key.to_str().expect("utf-8")]);
        args.extend_from_slice(extra);
        AgentProc::spawn(&self.names[i], &args)
    }
}

impl Setup {
    fn exchange(&self) -> String {
        format!("tunbus.{}", self.session)
    }

    /// Agent `i`, once it says it is up (its session's exchange exists then).
    fn start_up(&self, i: usize, extra: &[&str]) -> AgentProc {
        up(self.start(i, extra))
    }
}

/// `a`, once it says it is up (its session's exchange exists then).
fn up(a: AgentProc) -> AgentProc {
    let t0 = Instant::now();
    while !a.logs().contains("agent up") {
        assert!(t0.elapsed() < Duration::from_secs(10), "the agent did not come up:\n{}", a.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    a
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What an observer received: (routing key, body) pairs.
type Seen = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A bus member bound to every data and control key of the exchange (what the broker, or
/// anyone it lets bind `tunbus.v1.#`, sees): every body it receives, kept.
struct Observer {
    stop: Arc<AtomicBool>,
    seen: Seen,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Observer {
    fn start(exchange: &str) -> Observer {
        let exchange = exchange.to_owned();
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s, k) = (stop.clone(), seen.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let mut c = bus_client();
            listen(&mut c, &exchange, &["tunbus.v1.#"]);
            ready_tx.send(()).expect("ready");
            let never = AtomicBool::new(false);
            while !s.load(Ordering::Relaxed) {
                if let Ok(Some(Owned::Delivery { routing_key, body, .. })) = c.wait_event(Duration::from_millis(100), &never) {
                    k.lock().expect("seen").push((routing_key, body));
                }
            }
        });
        ready_rx.recv_timeout(Duration::from_secs(5)).expect("observer listening");
        Observer { stop, seen, thread: Some(thread) }
    }

    fn stop(&mut self) -> Vec<(String, Vec<u8>)> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("observer");
        }
        std::mem::take(&mut *self.seen.lock().expect("seen"))
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.stop();
    }
}

const MARKER: &[u8] = b"TUNBUS-E2E-MARKER-7f3a9c";

/// Sends `bytes` made of the marker (with a running number, so it is not one repeated
/// block) from `ns` to `dst`; returns what it sent.
fn send_marked(ns: &str, dst: String, bytes: u64) -> std::thread::JoinHandle<Digest256> {
    in_netns(ns, move || {
        let mut s = std::net::TcpStream::connect(&dst).unwrap_or_else(|e| panic!("connect {dst}: {e}"));
        let mut h = Sha256::new();
        let mut buf = Vec::with_capacity(64 * 1024 + 64);
        let mut left = bytes;
        let mut n = 0u64;
        while left > 0 {
            buf.clear();
            while buf.len() < 64 * 1024 {
                buf.extend_from_slice(MARKER);
                buf.extend_from_slice(format!("-{n:012}\n").as_bytes());
                n += 1;
            }
            let take = left.min(buf.len() as u64) as usize;
            s.write_all(&buf[..take]).expect("send");
            h.update(&buf[..take]);
            left -= take as u64;
        }
        drop(s);
        Digest256 { bytes, sha256: h.finalize().into() }
    })
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn ping_and_100_mb_cross_sealed_and_the_broker_sees_no_plaintext() {
    if !system_ready("ping_and_100_mb_cross_sealed_and_the_broker_sees_no_plaintext") {
        return;
    }
    let s = Setup::new(41);
    let mut a = s.start_up(0, &["--queues", "2"]);
    let mut observer = Observer::start(&s.exchange());
    let mut b = s.start(1, &["--queues", "2"]);
    assert!(wait_reachable(&s.ns[0], &s.v4[1], Duration::from_secs(15)).is_some(), "never reachable:\n--- a\n{}\n--- b\n{}", a.logs(), b.logs());
    let (ok4, out4) = ping(&s.ns[0], &s.v4[1], 5);
    assert!(ok4, "IPv4 ping:\n{out4}\n{}", b.logs());
    let (ok6, out6) = ping(&s.ns[1], &s.v6[0], 5);
    assert!(ok6, "IPv6 ping:\n{out6}\n{}", a.logs());

    // A flood (IPv6 all-nodes), sealed with a's group key: b answers from its link-local
    // address, sealed with its session with a.
    let own = run("ip", &["-n", &s.ns[0].name, "-6", "-o", "addr", "show", "dev", "tb0", "scope", "link"]);
    let own_ll = own.split_whitespace().nth(3).and_then(|a| a.split('/').next()).expect("own link-local").to_owned();
    let out = run("ip", &["netns", "exec", &s.ns[0].name, "ping", "-n", "-c", "3", "-i", "0.3", "-w", "4", "ff02::1%tb0"]);
    let others = out
        .lines()
        .filter_map(|l| l.split("bytes from ").nth(1))
        .filter(|r| !r.starts_with(&format!("{own_ll}%")) && !r.starts_with(&format!("{own_ll}:")))
        .count();
    assert!(others >= 2, "b did not answer a's multicast ping:\n{out}\n{}", b.logs());

    let size = 100 * 1024 * 1024;
    let sink = tcp_sink(&s.ns[1].name, format!("{}:5001", s.v4[1]), 1);
    let sent = send_marked(&s.ns[0].name, format!("{}:5001", s.v4[1]), size).join().expect("sender");
    let got = sink.join().expect("sink");
    assert_eq!(got, vec![sent], "the transfer arrived damaged:\n{}", b.logs());

    std::thread::sleep(Duration::from_millis(300));
    let seen = observer.stop();
    let data: Vec<&(String, Vec<u8>)> = seen.iter().filter(|(k, _)| !k.starts_with("tunbus.v1.ctl.")).collect();
    let data_bytes: usize = data.iter().map(|(_, b)| b.len()).sum();
    assert!(data_bytes as u64 >= size, "the observer saw only {data_bytes} bytes of data: it did not see the transfer");
    assert!(data.iter().all(|(_, b)| b.starts_with(b"TE\x02")), "a data message not sealed");
    assert!(seen.iter().any(|(k, _)| k.starts_with("tunbus.v1.ctl.e2e.")), "no handshake seen on the bus");
    assert!(seen.iter().any(|(k, b)| k.starts_with("tunbus.v1.all.") && b.starts_with(b"TE\x02\x02")), "no sealed flood seen on the bus");
    for (key, body) in &seen {
        assert!(!contains(body, MARKER), "the marker is readable in a message on {key}");
        assert!(!contains(body, &MARKER[..12]), "part of the marker is readable in a message on {key}");
    }

    let (ra, rb) = (a.interrupt(), b.interrupt());
    for (r, who) in [(&ra, "a"), (&rb, "b")] {
        for reason in ["replayed", "plaintext", "no_key", "malformed", "spoofed"] {
            assert_eq!(drops(r, reason), 0, "{who} dropped {reason}: {r}");
        }
        // A batch sealed under a session whose handshake response has not reached the
        // receiver yet (another queue) does not open: at most a few, at the start.
        assert!(drops(r, "decrypt_failed") <= 4, "{who}: {r}");
    }
}

/// A v1 frame of one IPv4 ICMP echo request from `src` to `dst` (no checksum care: it must
/// never reach the TUN anyway).
fn plain_frame(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let mut pkt = vec![0x45, 0, 0, 28, 0, 0, 0, 0, 64, 1, 0, 0];
    pkt.extend_from_slice(&src);
    pkt.extend_from_slice(&dst);
    pkt.extend_from_slice(&[8, 0, 0, 0, 0, 1, 0, 1]);
    let mut f = vec![b'T', b'B', 1, 0, 0, 1, 0, 0];
    f.extend_from_slice(&[0; 16]);
    f.extend_from_slice(&(pkt.len() as u32).to_be_bytes());
    f.extend_from_slice(&pkt);
    f
}

#[test]
fn without_a_peers_file_keys_are_pinned_on_first_use_and_an_impostor_is_refused() {
    if !system_ready("without_a_peers_file_keys_are_pinned_on_first_use_and_an_impostor_is_refused") {
        return;
    }
    let s = Setup::new(48);
    let mut a = up(s.start_first_use(0, &["--queues", "2"]));
    let mut observer = Observer::start(&s.exchange());
    let mut b = s.start_first_use(1, &["--queues", "2"]);
    assert!(wait_reachable(&s.ns[0], &s.v4[1], Duration::from_secs(15)).is_some(), "never reachable:\n--- a\n{}\n--- b\n{}", a.logs(), b.logs());
    let (ok6, out6) = ping(&s.ns[1], &s.v6[0], 3);
    assert!(ok6, "IPv6 ping:\n{out6}\n{}", a.logs());
    let size = 20 * 1024 * 1024;
    let sink = tcp_sink(&s.ns[1].name, format!("{}:5001", s.v4[1]), 1);
    let sent = send_marked(&s.ns[0].name, format!("{}:5001", s.v4[1]), size).join().expect("sender");
    assert_eq!(sink.join().expect("sink"), vec![sent], "the transfer arrived damaged:\n{}", b.logs());
    for (who, p) in [("a", &a), ("b", &b)] {
        assert!(p.logs().contains("key pinned on first use"), "{who} pinned no key:\n{}", p.logs());
    }

    // An impostor with a login of its own announces b's name with a key of its own.
    let mallory = keygen(&s.dir.join("mallory.key"));
    let rogue = user("tberh");
    let mut c = tunbus::amqp::client::Client::open(
        &tunbus::amqp::client::Endpoint::plain(rogue.url().parse().expect("url")),
        &tunbus::amqp::client::ConnectOptions::new("impostor"),
        &AtomicBool::new(false),
    )
    .expect("impostor connects");
    let hello = serde_json::json!({
        "name": s.names[1], "addresses": [format!("{}/24", s.v4[1]), "198.18.99.1/24"], "queues": 1, "wire": "v1",
        "started_unix_ms": 1, "key": mallory,
    });
    let as_rogue = Properties { user_id: Some(&rogue.name), ..Properties::default() };
    for _ in 0..3 {
        publish(&mut c, &s.exchange(), &format!("tunbus.v1.ctl.hello.{}", s.names[1]), &as_rogue, hello.to_string().as_bytes());
    }
    std::thread::sleep(Duration::from_millis(500));
    let (ok, out) = ping(&s.ns[0], &s.v4[1], 3);
    assert!(ok, "b no longer reached after the impostor's hello:\n{out}\n{}", a.logs());

    std::thread::sleep(Duration::from_millis(300));
    let seen = observer.stop();
    let data: Vec<&(String, Vec<u8>)> = seen.iter().filter(|(k, _)| !k.starts_with("tunbus.v1.ctl.")).collect();
    assert!(data.iter().map(|(_, b)| b.len()).sum::<usize>() as u64 >= size, "the observer did not see the transfer");
    assert!(data.iter().all(|(_, b)| b.starts_with(b"TE\x02")), "a data message not sealed");
    for (key, body) in &seen {
        assert!(!contains(body, MARKER), "the marker is readable in a message on {key}");
    }
    let ra = a.interrupt();
    assert_eq!(drops(&ra, "key_conflict"), 3, "the impostor's hellos: {ra}");
    assert!(a.logs().contains("REFUSED a hello"), "no warning about the impostor:\n{}", a.logs());
    let rb = b.interrupt();
    for (r, who) in [(&ra, "a"), (&rb, "b")] {
        for reason in ["replayed", "plaintext", "malformed", "spoofed"] {
            assert_eq!(drops(r, reason), 0, "{who} dropped {reason}: {r}");
        }
    }
}

#[test]
fn forged_and_replayed_batches_are_dropped_and_counted() {
    if !system_ready("forged_and_replayed_batches_are_dropped_and_counted") {
        return;
    }
    let s = Setup::new(42);
    let mut a = s.start_up(0, &[]);
    let mut observer = Observer::start(&s.exchange());
    let mut b = s.start(1, &[]);
    assert!(wait_reachable(&s.ns[0], &s.v4[1], Duration::from_secs(15)).is_some(), "never reachable:\n{}\n{}", a.logs(), b.logs());
    let (ok, out) = ping(&s.ns[0], &s.v4[1], 3);
    assert!(ok, "{out}");
    // A sealed batch from a to b, as the broker (or an observer) captured it.
    let b_key = format!("tunbus.v1.{}.", s.v4[1].replace('.', "-"));
    let captured = observer.stop().into_iter().rev().find(|(k, body)| k.starts_with(&b_key) && body.starts_with(b"TE")).expect("a captured batch for b");

    // A rogue with a login of its own (no peer, no key): replays and forgeries.
    let rogue = user("tberg");
    let mut c = tunbus::amqp::client::Client::open(
        &tunbus::amqp::client::Endpoint::plain(rogue.url().parse().expect("url")),
        &tunbus::amqp::client::ConnectOptions::new("rogue"),
        &AtomicBool::new(false),
    )
    .expect("rogue connects");
    let as_rogue = Properties { user_id: Some(&rogue.name), ..Properties::default() };
    publish(&mut c, &s.exchange(), &captured.0, &as_rogue, &captured.1);
    let mut forged = captured.1.clone();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    publish(&mut c, &s.exchange(), &captured.0, &as_rogue, &forged);
    // A broker user allowed to impersonate (what the broker's operator can do): the batch
    // again, under a's user_id (a replay), altered (a forgery), and in clear from a's address.
    let operator = user("tbeop");
    run("rabbitmqctl", &["-q", "set_user_tags", &operator.name, "impersonator"]);
    let mut o = tunbus::amqp::client::Client::open(
        &tunbus::amqp::client::Endpoint::plain(operator.url().parse().expect("url")),
        &tunbus::amqp::client::ConnectOptions::new("operator"),
        &AtomicBool::new(false),
    )
    .expect("operator connects");
    let as_a = Properties { user_id: Some(&s.names[0]), ..Properties::default() };
    for _ in 0..3 {
        publish(&mut o, &s.exchange(), &captured.0, &as_a, &captured.1);
    }
    for i in 0..4 {
        let mut f = captured.1.clone();
        let at = 16 + i * 7 % (f.len() - 32);
        f[at] ^= 0x40;
        publish(&mut o, &s.exchange(), &captured.0, &as_a, &f);
    }
    let ip = |s: &str| -> [u8; 4] { s.parse::<std::net::Ipv4Addr>().expect("v4").octets() };
    publish(&mut o, &s.exchange(), &captured.0, &as_a, &plain_frame(ip(&s.v4[0]), ip(&s.v4[1])));

    // The victim is unaffected.
    std::thread::sleep(Duration::from_millis(300));
    let (ok, out) = ping(&s.ns[0], &s.v4[1], 5);
    assert!(ok, "b no longer answers after the attack:\n{out}\n{}", b.logs());
    let rb = b.interrupt();
    assert_eq!(drops(&rb, "replayed"), 3, "{rb}");
    assert!(drops(&rb, "decrypt_failed") >= 4, "{rb}");
    assert_eq!(drops(&rb, "plaintext"), 1, "{rb}");
    assert_eq!(drops(&rb, "no_key"), 2, "the rogue's two: {rb}");
    assert!(b.logs().contains("no public key for this peer"), "no warning about the rogue:\n{}", b.logs());
    let ra = a.interrupt();
    assert_eq!(drops(&ra, "decrypt_failed") + drops(&ra, "replayed"), 0, "{ra}");
}

#[test]
fn a_restarted_agent_is_reached_again_within_5_s() {
    if !system_ready("a_restarted_agent_is_reached_again_within_5_s") {
        return;
    }
    let s = Setup::new(43);
    let _a = s.start(0, &[]);
    let mut b = s.start(1, &[]);
    assert!(wait_reachable(&s.ns[0], &s.v4[1], Duration::from_secs(15)).is_some(), "never reachable:\n{}", b.logs());
    b.interrupt();
    // The namespace keeps no interface of the old agent; the new one greets a at once.
    let since = SystemTime::now();
    let t0 = Instant::now();
    let b2 = s.start(1, &[]);
    let took = first_reply_after(&s.ns[0], &s.v4[1], since, Duration::from_secs(10));
    let took = took.unwrap_or_else(|| panic!("no reply within 10 s of the restart:\n{}", b2.logs()));
    assert!(took < Duration::from_secs(5), "traffic resumed only after {took:?} (restart began {:?} ago)", t0.elapsed());
    let (ok, out) = ping(&s.ns[1], &s.v4[0], 3);
    assert!(ok, "the other way after the restart:\n{out}");
}

#[test]
fn a_peer_without_a_key_or_in_clear_is_refused_with_a_warning_and_counted() {
    if !system_ready("a_peer_without_a_key_or_in_clear_is_refused_with_a_warning_and_counted") {
        return;
    }
    // a runs --e2e; b does not, and the peers file gives no key for it.
    let s = Setup::with_keys(44, [true, false]);
    let mut a = s.start(0, &[]);
    let mut b = s.start_as(1, false, &[]);
    let t0 = Instant::now();
    while !a.logs().contains("agent up") || !b.logs().contains("agent up") {
        assert!(t0.elapsed() < Duration::from_secs(10), "agents did not start:\n{}\n{}", a.logs(), b.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let (ok_ab, _) = ping(&s.ns[0], &s.v4[1], 4);
    let (ok_ba, _) = ping(&s.ns[1], &s.v4[0], 4);
    assert!(!ok_ab && !ok_ba, "traffic crossed between an --e2e agent and a keyless one");
    let logs = a.logs();
    assert!(logs.contains("these peers have no key in the peers file"), "no warning at start:\n{logs}");
    let warnings = logs.matches("no public key for this peer").count();
    assert!((1..=6).contains(&warnings), "{warnings} warnings in about 3 s: not rate-limited, or none:\n{logs}");
    let ra = a.interrupt();
    assert!(drops(&ra, "no_key") >= 4, "a's sends to b not counted: {ra}");
    assert!(drops(&ra, "plaintext") >= 4, "b's batches in clear not counted: {ra}");
    assert_eq!(ra["rx_packets"].as_u64(), Some(0), "a took something from b: {ra}");
    let rb = b.interrupt();
    assert_eq!(rb["rx_packets"].as_u64(), Some(0), "b took something from a: {rb}");
}

/// `agent provision --revoke` of a session on the machine's broker, on drop.
struct Provisioned(String);

impl Drop for Provisioned {
    fn drop(&mut self) {
        let _ = Command::new(env!("CARGO_BIN_EXE_agent")).args(["provision", "--revoke", "--session", &self.0, "--url", URL]).output();
    }
}

#[test]
fn provision_keys_gives_agents_that_reach_each_other_sealed() {
    if !system_ready("provision_keys_gives_agents_that_reach_each_other_sealed") {
        return;
    }
    let session = unique("e2ep");
    let dir = std::env::temp_dir().join(unique("tbe2ep"));
    // The machine's broker has no management API: provision falls back to rabbitmqctl.
    let out = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(["provision", "--url", URL, "--session", &session, "--agent", "h1=198.18.45.1/24", "--agent", "h2=198.18.45.2/24", "--keys", "--out"])
        .arg(&dir)
        .output()
        .expect("agent provision runs");
    let _revoke = Provisioned(session.clone());
    assert!(out.status.success(), "provision: {}", String::from_utf8_lossy(&out.stderr));
    let peers = std::fs::read_to_string(dir.join("peers")).expect("peers file");
    assert_eq!(peers.matches(" key=").count(), 2, "{peers}");
    for h in ["h1", "h2"] {
        let mode = std::fs::metadata(dir.join(format!("{h}.key"))).expect("key file").permissions().mode();
        assert_eq!(mode & 0o077, 0, "{h}.key may be read by others");
        assert!(std::fs::read_to_string(dir.join(format!("{h}.toml"))).expect("toml").contains("e2e = true"));
    }
    let ns = [Netns::new(), Netns::new()];
    let agents: Vec<AgentProc> = ["h1", "h2"]
        .iter()
        .zip(&ns)
        .map(|(h, n)| {
            let conf = dir.join(format!("{h}.toml"));
            AgentProc::spawn(h, &["--config", conf.to_str().expect("utf-8"), "--netns", &n.name])
        })
        .collect();
    let reached = wait_reachable(&ns[0], "198.18.45.2", Duration::from_secs(15));
    assert!(reached.is_some(), "provisioned --e2e agents never reached each other:\n--- h1\n{}\n--- h2\n{}", agents[0].logs(), agents[1].logs());
    let (ok, out) = ping(&ns[1], "198.18.45.1", 3);
    assert!(ok, "{out}");
    assert!(agents[0].logs().contains("end-to-end encryption on"), "{}", agents[0].logs());
    drop(agents);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A private RabbitMQ node, stopped (and its folder removed) on drop.
struct Node(tunbus::lab::broker::PrivateBroker);

impl Drop for Node {
    fn drop(&mut self) {
        self.0.stop();
    }
}

#[test]
fn after_a_broker_restart_traffic_resumes_within_5_s() {
    if !system_ready("after_a_broker_restart_traffic_resumes_within_5_s") {
        return;
    }
    // A node of its own: restarting the machine's broker would cut every other test.
    let node = Node(tunbus::lab::broker::PrivateBroker::start(&std::env::temp_dir().join(unique("tbe2en"))).expect("a private RabbitMQ node starts"));
    let mut names = [String::new(), String::new()];
    let mut urls = [String::new(), String::new()];
    for (i, n) in ["a", "b"].iter().enumerate() {
        names[i] = unique(&format!("tbe{n}"));
        node.0.ctl(&["add_user", &names[i], "pw"]).expect("add_user");
        node.0.ctl(&["set_permissions", "-p", "/", &names[i], ".*", ".*", ".*"]).expect("set_permissions");
        urls[i] = format!("amqp://{}:pw@127.0.0.1:{}/%2f", names[i], node.0.port);
    }
    let s = Setup::with_users(46, [true, true], names, urls, Vec::new());
    let a = s.start(0, &[]);
    let b = s.start(1, &[]);
    assert!(wait_reachable(&s.ns[0], &s.v4[1], Duration::from_secs(20)).is_some(), "never reachable:\n{}\n{}", a.logs(), b.logs());
    node.0.kill().expect("kill the node");
    std::thread::sleep(Duration::from_millis(500));
    node.0.launch().expect("the node starts again");
    node.0.wait_up(None, Duration::from_secs(60)).expect("the node is back");
    // The links come back after their backoff (capped, jittered: the node took a while to
    // start); from then on, the sessions (kept, and renewed by the handshakes every new
    // connection of queue 0 starts) carry traffic at once.
    let t0 = Instant::now();
    while !(a.logs().contains("broker is back") && b.logs().contains("broker is back")) {
        assert!(t0.elapsed() < Duration::from_secs(40), "the links did not come back:\n--- a\n{}\n--- b\n{}", a.logs(), b.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    let back = SystemTime::now();
    let took = first_reply_after(&s.ns[0], &s.v4[1], back, Duration::from_secs(15));
    let took = took.unwrap_or_else(|| panic!("no reply within 15 s of the links' return:\n--- a\n{}\n--- b\n{}", a.logs(), b.logs()));
    assert!(took < Duration::from_secs(5), "traffic resumed {took:?} after the links were back");
    let (ok, out) = ping(&s.ns[1], &s.v4[0], 3);
    assert!(ok, "the other way after the broker's restart:\n{out}");
}

/// `agent lab --e2e`: every host gets a key the lab makes and its own broker user; every
/// pair answers through sealed batches (an `--e2e` receiver accepts nothing in clear), TCP
/// crosses too, and the session's users and vhost are gone afterwards.
#[test]
fn a_lab_with_e2e_checks_every_pair_through_sealed_batches() {
    if !system_ready("a_lab_with_e2e_checks_every_pair_through_sealed_batches") {
        return;
    }
    let session = unique("e2elab");
    let json = std::env::temp_dir().join(format!("{session}.json"));
    let out = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(["lab", "--url", URL, "--hosts", "3", "--e2e", "--session", &session, "--throughput-seconds", "1", "--json"])
        .arg(&json)
        .env("RUST_LOG", "info")
        .output()
        .expect("lab runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "agent lab --e2e failed:\n{text}");
    assert_eq!(text.matches("end-to-end encryption on").count(), 3, "each host seals:\n{text}");
    assert!(text.contains("end-to-end encrypted"), "{text}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).expect("json report")).expect("parses");
    let _ = std::fs::remove_file(&json);
    assert_eq!(report["e2e"], true, "{report}");
    assert_eq!(report["hosts_up"], 3, "{report}");
    assert_eq!(report["failures"].as_array().map(Vec::len), Some(0), "{report}");
    assert_eq!(report["pairs_checked"], 6, "{report}");
    assert!(report["throughput_bits_per_s"].as_f64().is_some_and(|b| b > 0.0), "TCP through sealed batches: {report}");
    let users = run("rabbitmqctl", &["list_users", "-q"]);
    assert!(!users.contains(&format!("{session}.h")), "users left behind:\n{users}");
}

/// `agent capture --keys DIR`: two `--e2e` agents note their session keys
/// (`--e2e-key-log`); a capture given their logs writes the packets of sealed batches
/// (the marker of a TCP transfer and of pings is in its file, both directions, and floods),
/// one without them writes none and counts the batches it left out.
#[test]
fn a_capture_with_the_agents_key_logs_sees_inside_sealed_batches() {
    if !system_ready("a_capture_with_the_agents_key_logs_sees_inside_sealed_batches") {
        return;
    }
    let s = Setup::new(47);
    let keys = s.dir.join("keys");
    std::fs::create_dir_all(&keys).expect("keys dir");
    let logs: Vec<String> = (0..2).map(|i| keys.join(format!("{i}.keys")).display().to_string()).collect();
    let capture = |file: &Path, with_keys: bool| {
        let mut args = vec!["capture".to_owned(), "--url".into(), URL.into(), "--session".into(), s.session.clone(), "-w".into(), file.display().to_string()];
        args.extend(["--duration".into(), "12s".into()]);
        if with_keys {
            args.extend(["--keys".into(), keys.display().to_string()]);
        }
        Command::new(env!("CARGO_BIN_EXE_agent")).args(&args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("agent capture")
    };
    let mut a = s.start_up(0, &["--e2e-key-log", &logs[0]]);
    let mut b = s.start_up(1, &["--e2e-key-log", &logs[1]]);
    let mode = std::fs::metadata(&logs[0]).expect("a key log").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "a key log is its owner's only");
    let (with, without) = (s.dir.join("with.pcapng"), s.dir.join("without.pcapng"));
    let (cap_with, cap_without) = (capture(&with, true), capture(&without, false));
    std::thread::sleep(Duration::from_secs(2));
    // A pattern in the pings' payload, a marker in the TCP stream, a ping to all hosts.
    let pattern = "7475626275732d6b6579";
    let out = s.ns[0].exec(&["ping", "-n", "-c", "5", "-i", "0.2", "-W", "2", "-p", pattern, &s.v4[1]]);
    assert!(out.status.success(), "ping through sealed batches: {}", String::from_utf8_lossy(&out.stdout));
    let sink = tcp_sink(&s.ns[1].name, format!("{}:5047", s.v4[1]), 1);
    let sent = send_marked(&s.ns[0].name, format!("{}:5047", s.v4[1]), 256 * 1024).join().expect("sender");
    assert_eq!(sink.join().expect("sink"), vec![sent]);
    let _ = s.ns[0].exec(&["ping", "-n", "-c", "2", "-W", "1", "-I", "tb0", "ff02::1"]);
    let outputs: Vec<String> = [cap_with, cap_without]
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().expect("capture ends");
            assert!(out.status.success(), "capture failed: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8_lossy(&out.stderr).into_owned()
        })
        .collect();
    a.interrupt();
    b.interrupt();
    let with_bytes = std::fs::read(&with).expect("the capture with keys");
    let without_bytes = std::fs::read(&without).expect("the capture without keys");
    let ping_payload: Vec<u8> = (0..pattern.len() / 2).map(|i| u8::from_str_radix(&pattern[2 * i..2 * i + 2], 16).expect("hex")).collect();
    assert!(contains(&with_bytes, MARKER), "the TCP marker is not in the capture with keys: {}", outputs[0]);
    assert!(contains(&with_bytes, &ping_payload), "the pings are not in the capture with keys");
    assert!(outputs[0].contains("sealed batches opened with --keys"), "{}", outputs[0]);
    assert!(!contains(&without_bytes, MARKER) && !contains(&without_bytes, &ping_payload), "a capture without keys saw inside");
    assert!(outputs[1].contains("sealed batches left out"), "{}", outputs[1]);
    // Both directions: the replies (h2 -> h1) carry the pattern too, from the other log.
    let lines = std::fs::read_to_string(&logs[1]).expect("h2's key log");
    assert!(lines.lines().any(|l| l.starts_with("TUNBUS_E2E_PAIR ")) && lines.lines().any(|l| l.starts_with("TUNBUS_E2E_GROUP ")), "{lines}");
}

/// `agent lab --e2e --keys DIR`: the hosts note their session keys in DIR, the lab makes a
/// capture user (DIR/capture.url), and `agent capture --keys DIR` with it writes the pings
/// that crossed sealed; the session's users, the capture user among them, go at the end.
#[test]
fn a_lab_with_keys_can_be_captured_from_inside() {
    if !system_ready("a_lab_with_keys_can_be_captured_from_inside") {
        return;
    }
    let session = unique("e2ek");
    let dir = std::env::temp_dir().join(unique("tbe2ekeys"));
    let out_file = std::env::temp_dir().join(format!("{session}.out"));
    let mut lab = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(["lab", "--url", URL, "--hosts", "2", "--e2e", "--keep", "--throughput-seconds", "0", "--session", &session, "--keys"])
        .arg(&dir)
        .stdout(std::fs::File::create(&out_file).expect("lab output"))
        .stderr(Stdio::null())
        .spawn()
        .expect("agent lab");
    let t0 = Instant::now();
    while !std::fs::read_to_string(&out_file).unwrap_or_default().contains("Ctrl-C tears the lab down") {
        assert!(t0.elapsed() < Duration::from_secs(60), "the lab did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    let printed = std::fs::read_to_string(&out_file).unwrap_or_default();
    assert!(printed.contains("agent capture --url-file"), "the lab says how to capture inside: {printed}");
    let pcap = dir.join("lab.pcapng");
    let capture = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(["capture", "--session", &session, "--duration", "5s", "--url-file"])
        .arg(dir.join("capture.url"))
        .arg("--keys")
        .arg(&dir)
        .arg("-w")
        .arg(&pcap)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("agent capture");
    std::thread::sleep(Duration::from_millis(1500));
    let pattern = "6c61622d6b657973";
    let ns = format!("tb-{session}-h1");
    let ping =
        Command::new("ip").args(["netns", "exec", &ns, "ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", "-p", pattern, "198.18.0.2"]).output().expect("ping");
    assert!(ping.status.success(), "{}", String::from_utf8_lossy(&ping.stdout));
    let cap = capture.wait_with_output().expect("capture ends");
    let said = String::from_utf8_lossy(&cap.stderr).into_owned();
    // SAFETY: signalling our own child process.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(lab.id() as i32, libc::SIGINT);
    }
    let ended = lab.wait().expect("the lab ends");
    let bytes = std::fs::read(&pcap).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&out_file);
    assert!(cap.status.success() && said.contains("sealed batches opened with --keys"), "{said}");
    let payload: Vec<u8> = (0..pattern.len() / 2).map(|i| u8::from_str_radix(&pattern[2 * i..2 * i + 2], 16).expect("hex")).collect();
    assert!(contains(&bytes, &payload), "the pings are not in the lab's capture: {said}");
    assert!(ended.success(), "the lab did not end cleanly on Ctrl-C");
    let users = run("rabbitmqctl", &["list_users", "-q"]);
    assert!(!users.contains(&format!("{session}.")), "users left behind:\n{users}");
}
