//! Test harness for the system tests: real namespaces, real agents (the built `agent`
//! binary), real RabbitMQ. Everything created here is removed on drop, also when a test
//! fails. A test calls [`system_ready`] first: without root, TUN, `ip`, `ping` or a broker it
//! is skipped with a notice, or fails when `TUNBUS_REQUIRE_SYSTEM_TESTS=1` (the README's test
//! command and CI set it).
#![allow(dead_code)]

pub mod fake_broker;
pub mod nodes;
pub mod probe;

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tunbus::amqp::client::{Client, ConnectOptions, Endpoint, Owned};
use tunbus::amqp::session::QueueOptions;
use tunbus::amqp::wire::Properties;

pub const BROKER: &str = "127.0.0.1:5672";
pub const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn missing() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    #[allow(unsafe_code)]
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Some("not running as root (TUN devices and namespaces need it)".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing (modprobe tun)".into());
    }
    for tool in ["ip", "ping"] {
        if Command::new(tool).arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status().is_err() {
            return Some(format!("`{tool}` is not installed (apt-get install iproute2 iputils-ping)"));
        }
    }
    let addr: SocketAddr = BROKER.parse().expect("constant address");
    if TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err() {
        return Some(format!("no RabbitMQ on {BROKER} (start it: rabbitmq-server -detached)"));
    }
    None
}

/// True when the system tests can run; otherwise skips (or fails, when required).
pub fn system_ready(test: &str) -> bool {
    match missing() {
        None => true,
        Some(why) => {
            if std::env::var("TUNBUS_REQUIRE_SYSTEM_TESTS").as_deref() == Ok("1") {
                panic!("{test}: system test cannot run: {why}");
            }
            eprintln!("SKIPPED {test}: {why} (set TUNBUS_REQUIRE_SYSTEM_TESTS=1 to make this a failure)");
            false
        }
    }
}

/// A name unique to this test process: `<prefix><pid>x<n>`.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}{}x{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// The pid of the guard process of lab `lab_pid` (`agent lab … --guard LAB_PID`).
pub fn guard_of(lab_pid: u32) -> Option<u32> {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(5) {
        if let Some(p) = processes_with_args(&["--guard", &lab_pid.to_string()]).first() {
            return Some(*p);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Processes whose command line contains `args` in a row.
pub fn processes_with_args(args: &[&str]) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(c) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
            let words: Vec<&[u8]> = c.split(|b| *b == 0).collect();
            words.windows(args.len()).any(|w| w.iter().zip(args).all(|(a, b)| *a == b.as_bytes()))
        })
        .collect()
}

/// Network namespaces whose name starts with `prefix`.
pub fn namespaces_with(prefix: &str) -> Vec<String> {
    run("ip", &["netns", "list"]).lines().filter_map(|l| l.split_whitespace().next()).filter(|n| n.starts_with(prefix)).map(str::to_owned).collect()
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Netns {
        let name = unique("tbt");
        run("ip", &["netns", "add", &name]);
        run("ip", &["-n", &name, "link", "set", "lo", "up"]);
        Netns { name }
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> std::process::Output {
        let mut full = vec!["netns", "exec", &self.name];
        full.extend_from_slice(args);
        Command::new("ip").args(&full).output().expect("ip netns exec runs")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Runs a command that must succeed.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An `agent connect` process, interrupted (then killed) on drop.
pub struct AgentProc {
    pub name: String,
    child: Option<Child>,
    log: PathBuf,
    pub stats: PathBuf,
}

impl AgentProc {
    /// Starts `agent connect --name NAME --url URL <args>` on the machine's broker.
    pub fn start(name: &str, args: &[&str]) -> AgentProc {
        let mut all = vec!["--url", URL];
        all.extend_from_slice(args);
        AgentProc::spawn(name, &all)
    }

    /// Starts `agent connect --name NAME <args>`: `args` say where the broker is.
    pub fn spawn(name: &str, args: &[&str]) -> AgentProc {
        AgentProc::spawn_env(name, args, &[])
    }

    /// Like [`AgentProc::spawn`], with environment variables.
    pub fn spawn_env(name: &str, args: &[&str], env: &[(&str, &str)]) -> AgentProc {
        AgentProc::spawn_program(Path::new(env!("CARGO_BIN_EXE_agent")), name, args, env)
    }

    /// `agent connect --name NAME <args>` as an unprivileged user (`nobody`, no
    /// capabilities, through `setpriv`): the userspace endpoint's promise.
    pub fn spawn_unprivileged(name: &str, args: &[&str]) -> AgentProc {
        let agent = env!("CARGO_BIN_EXE_agent");
        let mut all = vec!["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", agent, "connect", "--name", name];
        all.extend_from_slice(args);
        AgentProc::spawn_command("setpriv", name, &all, &[])
    }

    /// Like [`AgentProc::spawn_env`], running `program` (the agent under another name).
    pub fn spawn_program(program: &Path, name: &str, args: &[&str], env: &[(&str, &str)]) -> AgentProc {
        let mut all = vec!["connect", "--name", name];
        all.extend_from_slice(args);
        AgentProc::spawn_command(&program.to_string_lossy(), name, &all, env)
    }

    /// `agent serial --name NAME --url URL <args>`: an 802.15.4 probe's agent on the
    /// machine's broker.
    pub fn spawn_serial(name: &str, args: &[&str]) -> AgentProc {
        let agent = env!("CARGO_BIN_EXE_agent");
        let mut all = vec!["serial", "--name", name, "--url", URL];
        all.extend_from_slice(args);
        AgentProc::spawn_command(agent, name, &all, &[])
    }

    /// Waits up to `limit` until the agent's log says `what`.
    pub fn wait_log(&self, what: &str, limit: Duration) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if self.logs().contains(what) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Runs `program args… --stats-interval 0 --stats-json FILE`, the agent's output in a
    /// log of its own.
    fn spawn_command(program: &str, name: &str, args: &[&str], env: &[(&str, &str)]) -> AgentProc {
        let dir = std::env::temp_dir();
        let log = dir.join(format!("{name}.log"));
        let stats = dir.join(format!("{name}.stats.json"));
        let _ = std::fs::remove_file(&stats);
        let log_file = File::create(&log).expect("create agent log");
        let child = Command::new(program)
            .args(args)
            .args(["--stats-interval", "0", "--stats-json"])
            .arg(&stats)
            .envs(env.iter().copied())
            .env_remove("AMQP_URL")
            .stdout(log_file.try_clone().expect("clone log fd"))
            .stderr(log_file)
            .spawn()
            .expect("spawn agent");
        AgentProc { name: name.to_owned(), child: Some(child), log, stats }
    }

    /// Waits up to `limit` for the agent to exit by itself: its status and how long it took.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<(ExitStatus, Duration)> {
        let child = self.child.as_mut()?;
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some((status, t0.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Sends `signal`, waits up to `limit`; returns the exit status and how long it took.
    pub fn stop_with(&mut self, signal: i32, limit: Duration) -> (Option<ExitStatus>, Duration) {
        let Some(mut child) = self.child.take() else { return (None, Duration::ZERO) };
        let t0 = Instant::now();
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped yet.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(child.id() as i32, signal);
        }
        while t0.elapsed() < limit {
            if let Ok(Some(status)) = child.try_wait() {
                return (Some(status), t0.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        (None, t0.elapsed())
    }

    /// Ctrl-C, and the final report as JSON.
    pub fn interrupt(&mut self) -> serde_json::Value {
        let (status, took) = self.stop_with(libc::SIGINT, Duration::from_secs(5));
        assert!(status.map(|s| s.success()).unwrap_or(false), "agent {} did not exit 0 after SIGINT ({status:?}, {took:?}):\n{}", self.name, self.logs());
        let text = std::fs::read_to_string(&self.stats).unwrap_or_else(|_| panic!("no stats json from {}:\n{}", self.name, self.logs()));
        serde_json::from_str(&text).expect("stats json parses")
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop_with(libc::SIGINT, Duration::from_secs(3));
        }
    }
}

/// The count of drops for `reason` in a final report.
pub fn drops(report: &serde_json::Value, reason: &str) -> u64 {
    report["drops"].as_array().and_then(|a| a.iter().find(|d| d[0] == reason)).and_then(|d| d[1].as_u64()).unwrap_or(0)
}

/// One `ping` run inside `ns`; returns whether all replies came back, and the output.
pub fn ping(ns: &Netns, dst: &str, count: u32) -> (bool, String) {
    let count = count.to_string();
    let out = ns.exec(&["ping", "-n", "-c", &count, "-i", "0.2", "-W", "1", dst]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success() && text.contains(" 0% packet loss"), text)
}

/// Pings until one reply comes back or `limit` passes; returns the time it took.
pub fn wait_reachable(ns: &Netns, dst: &str, limit: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        let out = ns.exec(&["ping", "-n", "-c", "1", "-W", "1", dst]);
        if out.status.success() {
            return Some(t0.elapsed());
        }
    }
    None
}

/// The time from `since` until the first echo reply reaches `ns`, pinging `dst` every
/// 50 ms until one reply comes or `limit` passes. The reply's own arrival time (`ping -D`) is used, so a slow
/// reply counts when it arrives, and the cost of starting processes does not count at all.
pub fn first_reply_after(ns: &Netns, dst: &str, since: std::time::SystemTime, limit: Duration) -> Option<Duration> {
    let deadline = limit.as_secs().max(1).to_string();
    let out = ns.exec(&["ping", "-n", "-D", "-c", "1", "-i", "0.05", "-W", "1", "-w", &deadline, dst]);
    let text = String::from_utf8_lossy(&out.stdout);
    let since = since.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs_f64();
    text.lines()
        .filter(|l| l.contains("bytes from"))
        .find_map(|l| l.strip_prefix('[')?.split(']').next()?.parse::<f64>().ok())
        .map(|at| Duration::from_secs_f64((at - since).max(0.0)))
}

/// Runs `f` on a thread that has entered network namespace `ns`.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns on a valid namespace fd; it changes only this thread's network namespace.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}

/// A deterministic pseudo-random byte stream (xorshift64*), the same on both ends.
pub struct Stream {
    state: u64,
}

impl Stream {
    pub fn new(seed: u64) -> Stream {
        Stream { state: seed | 1 }
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.state ^= self.state >> 12;
            self.state ^= self.state << 25;
            self.state ^= self.state >> 27;
            let v = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Result of one side of a transfer: bytes and SHA-256.
#[derive(Debug, PartialEq, Eq)]
pub struct Digest256 {
    pub bytes: u64,
    pub sha256: [u8; 32],
}

/// Starts a TCP sink in `ns` on `bind` (e.g. "198.18.0.2:5001"); it accepts `conns`
/// connections and returns the digest of each, in accept order.
pub fn tcp_sink(ns: &str, bind: String, conns: usize) -> JoinHandle<Vec<Digest256>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = in_netns(ns, move || {
        let listener = TcpListener::bind(&bind).unwrap_or_else(|e| panic!("bind {bind}: {e}"));
        tx.send(()).expect("signal listening");
        let mut workers = Vec::new();
        for _ in 0..conns {
            let (mut s, _) = listener.accept().expect("accept");
            s.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
            workers.push(std::thread::spawn(move || {
                let mut h = Sha256::new();
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                loop {
                    let n = s.read(&mut buf).expect("read from TCP sink");
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                    total += n as u64;
                }
                Digest256 { bytes: total, sha256: h.finalize().into() }
            }));
        }
        workers.into_iter().map(|w| w.join().expect("sink worker")).collect()
    });
    rx.recv_timeout(Duration::from_secs(5)).expect("sink listening");
    handle
}

/// Sends `bytes` of the seeded stream from `ns` to `dst`; returns what it sent.
pub fn tcp_send(ns: &str, dst: String, bytes: u64, seed: u64) -> JoinHandle<Digest256> {
    tcp_send_paced(ns, dst, bytes, seed, u64::MAX)
}

/// Like [`tcp_send`], at most `bytes_per_s` (so that a stream is still running when a test
/// breaks something under it).
pub fn tcp_send_paced(ns: &str, dst: String, bytes: u64, seed: u64, bytes_per_s: u64) -> JoinHandle<Digest256> {
    in_netns(ns, move || {
        let t0 = Instant::now();
        let mut s = TcpStream::connect(&dst).unwrap_or_else(|e| panic!("connect {dst}: {e}"));
        s.set_write_timeout(Some(Duration::from_secs(60))).expect("timeout");
        let mut gen = Stream::new(seed);
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            gen.fill(&mut buf[..n]);
            h.update(&buf[..n]);
            s.write_all(&buf[..n]).expect("write to TCP");
            left -= n as u64;
            if bytes_per_s != u64::MAX {
                let due = Duration::from_secs_f64((bytes - left) as f64 / bytes_per_s as f64);
                if let Some(wait) = due.checked_sub(t0.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
        drop(s);
        Digest256 { bytes, sha256: h.finalize().into() }
    })
}

/// Two namespaces with an agent each, addresses 198.18.<net>.1/.2 and fd00:<net>::1/::2.
pub struct Pair {
    pub a: AgentProc,
    pub b: AgentProc,
    pub ns_a: Netns,
    pub ns_b: Netns,
    pub v4: [String; 2],
    pub v6: [String; 2],
}

impl Pair {
    pub fn start(net: u8, extra: &[&str]) -> Pair {
        Pair::start_with(net, extra, extra)
    }

    /// Like `start`, with different extra flags for agent a and agent b.
    pub fn start_with(net: u8, extra_a: &[&str], extra_b: &[&str]) -> Pair {
        let with_url = |extra: &[&str]| -> Vec<String> { ["--url", URL].iter().chain(extra).map(|s| s.to_string()).collect() };
        Pair::spawn(net, &with_url(extra_a), &with_url(extra_b))
    }

    /// Two agents whose flags (`extra_a`, `extra_b`) say where the broker is.
    pub fn spawn(net: u8, extra_a: &[String], extra_b: &[String]) -> Pair {
        let extra_a: Vec<&str> = extra_a.iter().map(String::as_str).collect();
        let extra_b: Vec<&str> = extra_b.iter().map(String::as_str).collect();
        let (extra_a, extra_b) = (extra_a.as_slice(), extra_b.as_slice());
        let ns_a = Netns::new();
        let ns_b = Netns::new();
        let v4 = [format!("198.18.{net}.1"), format!("198.18.{net}.2")];
        let v6 = [format!("fd00:{net:x}::1"), format!("fd00:{net:x}::2")];
        let start = |ns: &Netns, i: usize| {
            let v4a = format!("{}/24", v4[i]);
            let v6a = format!("{}/64", v6[i]);
            let mut args = vec!["--netns", ns.name.as_str(), "--ipv4", v4a.as_str(), "--ipv6", v6a.as_str()];
            args.extend_from_slice(if i == 0 { extra_a } else { extra_b });
            AgentProc::spawn(&ns.name, &args)
        };
        let a = start(&ns_a, 0);
        let b = start(&ns_b, 1);
        let pair = Pair { a, b, ns_a, ns_b, v4, v6 };
        if wait_reachable(&pair.ns_a, &pair.v4[1], Duration::from_secs(15)).is_none() {
            panic!("agents never became reachable:\n--- a\n{}\n--- b\n{}", pair.a.logs(), pair.b.logs());
        }
        pair
    }
}

/// A running `agent route`, interrupted on drop.
pub struct RouterProc {
    child: Child,
    log: PathBuf,
    stats: PathBuf,
}

impl RouterProc {
    pub fn start(exchange: &str, topology: &str) -> RouterProc {
        let tag = unique("rt");
        let dir = std::env::temp_dir();
        let topo = dir.join(format!("{tag}.yaml"));
        std::fs::File::create(&topo).and_then(|mut f| f.write_all(topology.as_bytes())).expect("topology file");
        let log = dir.join(format!("{tag}.log"));
        let stats = dir.join(format!("{tag}.stats.json"));
        let child = Command::new(env!("CARGO_BIN_EXE_agent"))
            .args(["route", "--url", URL, "--exchange", exchange, "--stats-interval", "0", "--topology"])
            .arg(&topo)
            .arg("--stats-json")
            .arg(&stats)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("router log"))
            .spawn()
            .expect("spawn router");
        let r = RouterProc { child, log, stats };
        let t0 = Instant::now();
        while !r.logs().contains("router serving") {
            assert!(t0.elapsed() < Duration::from_secs(10), "router did not come up:\n{}", r.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
        r
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn stop(&mut self) -> serde_json::Value {
        // SAFETY: signalling our own child.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGINT);
        }
        let status = self.child.wait().expect("router exits");
        assert!(status.success(), "router exit {status}:\n{}", self.logs());
        serde_json::from_slice(&std::fs::read(&self.stats).expect("router stats")).expect("json")
    }
}

impl Drop for RouterProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The machine's broker as an endpoint.
pub fn endpoint() -> Endpoint {
    Endpoint::plain(URL.parse().expect("constant URL"))
}

/// A plain client on the machine's broker, for tests that play a bus member themselves.
pub fn bus_client() -> Client {
    let never = std::sync::atomic::AtomicBool::new(false);
    Client::open(&endpoint(), &ConnectOptions::new("tunbus test"), &never).expect("connect to the test broker")
}

/// Declares a server-named exclusive queue bound to `keys` on `exchange` and consumes it
/// without acks; returns its name.
pub fn listen(c: &mut Client, exchange: &str, keys: &[&str]) -> String {
    let never = std::sync::atomic::AtomicBool::new(false);
    let q = c.queue_declare("", QueueOptions { exclusive: true, ..QueueOptions::default() }, &[], &never).expect("declare");
    for k in keys {
        c.queue_bind(&q, exchange, k, &never).expect("bind");
    }
    c.basic_consume(&q, "", true, true, &never).expect("consume");
    q
}

/// Publishes `body` (copied), waiting until it has left.
pub fn publish(c: &mut Client, exchange: &str, key: &str, props: &Properties<'_>, body: &[u8]) {
    c.publish_copy(exchange, key, props, body).expect("publish");
    assert!(c.wait_writable(Duration::from_secs(5)).expect("send"), "publish did not leave");
}

/// The next delivery within `timeout`: (routing key, content type, body).
pub fn next_delivery(c: &mut Client, timeout: Duration) -> Option<(String, Option<String>, Vec<u8>)> {
    let never = std::sync::atomic::AtomicBool::new(false);
    let deadline = Instant::now() + timeout;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        if let Some(Owned::Delivery { routing_key, content_type, body, .. }) = c.wait_event(left, &never).expect("connection") {
            return Some((routing_key, content_type, body));
        }
    }
    None
}

/// A broker user of the machine's broker with the permissions a test gives it, deleted
/// again on drop (also when the test fails): tests never leave the shared broker changed.
pub struct TempUser {
    pub name: String,
    pub password: String,
}

impl TempUser {
    /// A user on vhost `/` with `configure`, `write` and `read` permissions, and on
    /// `amq.topic` the topic permissions `topic` (write, read) when given.
    pub fn new(prefix: &str, configure: &str, write: &str, read: &str, topic: Option<(&str, &str)>) -> TempUser {
        let user = TempUser { name: unique(prefix), password: format!("pw-{}", unique("")) };
        run("rabbitmqctl", &["-q", "add_user", &user.name, &user.password]);
        run("rabbitmqctl", &["-q", "set_permissions", "-p", "/", &user.name, configure, write, read]);
        if let Some((w, r)) = topic {
            run("rabbitmqctl", &["-q", "set_topic_permissions", "-p", "/", &user.name, "amq.topic", w, r]);
        }
        user
    }

    /// Its URL on the machine's broker, vhost `/`.
    pub fn url(&self) -> String {
        format!("amqp://{}:{}@127.0.0.1:5672/%2f", self.name, self.password)
    }
}

impl Drop for TempUser {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").args(["-q", "delete_user", &self.name]).output();
    }
}

/// A file under the temporary folder (a unique name from `name`) holding `text`, removed on
/// drop, also when a test fails.
pub struct TempFile(pub PathBuf);

impl TempFile {
    pub fn new(name: &str, text: &str) -> TempFile {
        let p = std::env::temp_dir().join(unique(name));
        std::fs::write(&p, text).expect("write temp file");
        TempFile(p)
    }

    pub fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 temp path")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
