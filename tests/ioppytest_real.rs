//! System test against the REAL published Python `ioppytest-agent` 0.2.20 (from PyPI): the
//! Python agent in its own namespace (it creates and configures `tun0` there itself), reaching
//! the broker over a veth pair made by the test, `agent route` with a topology naming it and a
//! native tunbus agent on one link, and real `ping` and TCP both ways between the two
//! namespaces.
//!
//! The published agent is Python 2 code (its TUN handling mixes bytes and str: on Python 3 it
//! dies at start-up with "struct.error: argument for 's' must be a bytes object"). So:
//! - `real_python_agent_pings_a_tunbus_agent_through_the_router` runs it unmodified on
//!   Python 2.7 (`TUNBUS_PYTHON27`, else pyenv's 2.7, else `python2.7` on PATH), its
//!   dependencies pinned in tests/ioppytest_real/requirements.txt;
//! - `real_python_agent_on_python3_with_bytes_fixes_through_the_router` runs it on Python 3.11
//!   through tests/ioppytest_real/py3_agent.py, which replaces only those three bytes/str spots
//!   (requirements-py311.txt).
//!
//! The packages go under target/ioppytest-venv (reused while the requirements file is
//! unchanged). Without PyPI (or Python 2.7) a test is skipped with a notice, or fails when
//! `TUNBUS_REQUIRE_SYSTEM_TESTS=1`, like `system_ready`.
//!
//! `a_coordinator_on_ioppytest_utils_gets_its_capture_from_agent_sniffer` is the other end
//! of an F-Interop session: a coordinator written with the published `ioppytest-utils`
//! 1.2.14 (its message classes, its `amqp_request`, its pcap reader;
//! tests/ioppytest_real/coordinator.py) asks `agent sniffer` for a capture of real pings.
//!
//! `real_python_serial_listener_on_python{3,27}_speaks_our_serial_codec`: the package's
//! 802.15.4 serial listener (`agent.utils.serial_listener.SerialListener`, which 0.2.20's
//! command line no longer starts) run by tests/ioppytest_real/serial_listener.py on a
//! pseudo-terminal probe (`common::probe`): frames from the probe arrive on the broker in
//! bodies `codec::ioppytest::serial` decodes byte-exact (and writes byte for byte, on
//! Python 3), and bodies it encodes for the probe arrive SLIP-framed on the probe's line.
//!
//! RabbitMQ may listen on 127.0.0.1 only, so the test forwards the root end of the veth
//! (198.18.250.x, port chosen by the kernel) to the broker with a small TCP relay of its own.
//! The two tests share `amq.topic` and the ioppytest addresses, so they run one at a time.

mod common;

use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Marks a reason to skip that holds even when system tests are required: an optional
/// interpreter that no Debian package provides.
const OPTIONAL: &str = "optional: ";

fn required() -> bool {
    std::env::var("TUNBUS_REQUIRE_SYSTEM_TESTS").as_deref() == Ok("1")
}

/// Skips (returns false) or fails, as `system_ready` does.
fn cannot_run(test: &str, why: &str) -> bool {
    if required() {
        panic!("{test}: system test cannot run: {why}");
    }
    eprintln!("SKIPPED {test}: {why} (set TUNBUS_REQUIRE_SYSTEM_TESTS=1 to make this a failure)");
    false
}

fn here() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------------------------------- the Python side

/// How to start the agent: interpreter, leading arguments, extra environment.
struct PyRuntime {
    python: PathBuf,
    lead: Vec<String>,
    env: Vec<(String, String)>,
}

/// Runs `cmd`; on failure returns its combined output.
fn try_run(cmd: &mut Command) -> Result<(), String> {
    match cmd.output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "{:?} exited {}:\n{}{}",
            cmd,
            out.status,
            tail(&String::from_utf8_lossy(&out.stdout), 30),
            tail(&String::from_utf8_lossy(&out.stderr), 30)
        )),
        Err(e) => Err(format!("{cmd:?}: {e}")),
    }
}

/// Installs `requirements` with `pip` into `dir` unless a stamp says it is already there.
fn pip_install(dir: &Path, requirements: &Path, install: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
    let reqs = std::fs::read_to_string(requirements).map_err(|e| format!("{}: {e}", requirements.display()))?;
    let stamp = dir.join(".tunbus-installed");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(reqs.as_str()) {
        return Ok(());
    }
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.parent().expect("parent")).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    install()?;
    std::fs::write(&stamp, reqs).map_err(|e| e.to_string())?;
    eprintln!("installed {} into {} in {:.1?}", requirements.display(), dir.display(), t0.elapsed());
    Ok(())
}

fn is_python27(p: &Path) -> bool {
    Command::new(p)
        .args(["-c", "import sys; sys.exit(0 if sys.version_info[:2] == (2, 7) else 1)"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn find_python27() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("TUNBUS_PYTHON27") {
        return Some(PathBuf::from(p));
    }
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Ok(r) = std::env::var("PYENV_ROOT") {
        roots.push(r.into());
    }
    if let Ok(h) = std::env::var("HOME") {
        roots.push(Path::new(&h).join(".pyenv"));
    }
    roots.push("/root/.pyenv".into());
    let mut candidates: Vec<PathBuf> = Vec::new();
    for root in roots {
        if let Ok(entries) = std::fs::read_dir(root.join("versions")) {
            let mut found: Vec<PathBuf> =
                entries.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("2.7")).map(|e| e.path().join("bin/python2.7")).collect();
            found.sort();
            candidates.extend(found.into_iter().rev());
        }
    }
    candidates.extend(["python2.7".into(), "python2".into()]);
    candidates.into_iter().find(|p| is_python27(p))
}

/// Python 2.7 with the pinned packages installed by pip --target (2.7 has no venv module).
fn python27_runtime() -> Result<PyRuntime, String> {
    // Debian no longer packages Python 2.7: where none exists, this test is skipped with a
    // notice even under TUNBUS_REQUIRE_SYSTEM_TESTS=1 (the Python 3.11 variant still runs).
    let python = find_python27().ok_or(format!(
        "{OPTIONAL}no Python 2.7 found (ioppytest-agent 0.2.20 runs unmodified only on Python 2.7; set TUNBUS_PYTHON27 or install pyenv's 2.7)"
    ))?;
    let site = here().join("target/ioppytest-venv/py27");
    let reqs = here().join("tests/ioppytest_real/requirements.txt");
    pip_install(&site, &reqs, || {
        try_run(
            Command::new(&python)
                .args(["-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--timeout", "20", "--target"])
                .arg(&site)
                .arg("-r")
                .arg(&reqs),
        )
        .map_err(|e| format!("pip could not install ioppytest-agent for Python 2.7 (is PyPI reachable?): {e}"))
    })?;
    Ok(PyRuntime { python, lead: vec!["-m".into(), "agent".into()], env: vec![("PYTHONPATH".into(), site.display().to_string())] })
}

/// A Python 3.11 virtualenv `target/ioppytest-venv/<name>` with the packages of
/// tests/ioppytest_real/<requirements> (installed with `pip_flags` too); its python.
fn python3_venv(name: &str, requirements: &str, pip_flags: &[&str], what: &str) -> Result<PathBuf, String> {
    let venv = here().join("target/ioppytest-venv").join(name);
    let reqs = here().join("tests/ioppytest_real").join(requirements);
    let base = std::env::var("TUNBUS_PYTHON3").unwrap_or_else(|_| "python3.11".into());
    pip_install(&venv, &reqs, || {
        try_run(Command::new(&base).args(["-m", "venv"]).arg(&venv)).map_err(|e| format!("cannot create a Python 3.11 venv: {e}"))?;
        try_run(
            Command::new(venv.join("bin/python"))
                .args(["-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--timeout", "20"])
                .args(pip_flags)
                .arg("-r")
                .arg(&reqs),
        )
        .map_err(|e| format!("pip could not install {what} for Python 3.11 (is PyPI reachable?): {e}"))
    })?;
    Ok(venv.join("bin/python"))
}

/// A Python 3.11 virtualenv with the agent, started through py3_agent.py.
fn python3_runtime() -> Result<PyRuntime, String> {
    Ok(PyRuntime {
        python: python3_venv("py311", "requirements-py311.txt", &[], "ioppytest-agent")?,
        lead: vec![here().join("tests/ioppytest_real/py3_agent.py").display().to_string()],
        env: vec![],
    })
}

/// A Python 3.11 virtualenv with the coordinator's library, `ioppytest-utils` (no agent;
/// without its CLI's pinned dependencies).
fn coordinator_python() -> Result<PathBuf, String> {
    python3_venv("utils", "requirements-utils.txt", &["--no-deps"], "ioppytest-utils")
}

/// The Python agent, in its own process group; the whole group is ended on drop.
struct PyAgent {
    child: Option<Child>,
    log: PathBuf,
}

impl PyAgent {
    fn start(rt: &PyRuntime, ns: &Netns, url: &str, name: &str, v4: &str, v6_prefix: &str, v6_host: &str) -> PyAgent {
        let log = std::env::temp_dir().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("python agent log");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name])
            .arg(&rt.python)
            .arg("-u")
            .args(&rt.lead)
            .args(["connect", "--url", url, "--name", name, "--ipv4-address", v4, "--ipv6-prefix", v6_prefix, "--ipv6-host", v6_host])
            .envs(rt.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone"))
            .stderr(file)
            .process_group(0);
        let child = cmd.spawn().expect("spawn the Python agent");
        PyAgent { child: Some(child), log }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The agent's log without its per-packet dumps: start-up, warnings, errors.
    fn summary(&self) -> String {
        let text = self.logs();
        let keep: Vec<&str> = text
            .lines()
            .filter(|l| {
                !l.starts_with(' ')
                    && !l.is_empty()
                    && !l.starts_with('{')
                    && !l.contains("Got an IPv")
                    && !l.contains("packet captured")
                    && !l.contains("Pushing message")
                    && !l.contains("Messaged captured")
                    && !l.contains("OPEN TUN")
            })
            .collect();
        tail(&keep.join("\n"), 60)
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

impl Drop for PyAgent {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            end_process_group(child);
        }
    }
}

/// Ends a child started with `process_group(0)` and everything in its group: SIGTERM, then
/// SIGKILL, 3 s each.
fn end_process_group(mut child: Child) {
    let pgid = child.id() as i32;
    for (signal, wait) in [(libc::SIGTERM, Duration::from_secs(3)), (libc::SIGKILL, Duration::from_secs(3))] {
        // SAFETY: kill(2) on the process group of a child we spawned with process_group(0)
        // and have not reaped: the agent and the processes it forked, nothing else.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(-pgid, signal);
        }
        let t0 = Instant::now();
        while t0.elapsed() < wait {
            if let Ok(Some(_)) = child.try_wait() {
                // The forked consumers share the group; make sure they are gone too.
                // SAFETY: as above; ESRCH once the group is empty is harmless.
                #[allow(unsafe_code)]
                unsafe {
                    libc::kill(-pgid, libc::SIGKILL);
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = child.wait();
}

// ---------------------------------------------------------------- network plumbing

/// A veth pair between the root namespace and `ns`, a /30 out of 198.18.250.0/24.
struct Veth {
    root: String,
    root_ip: String,
}

impl Veth {
    fn new(ns: &Netns) -> Veth {
        let base = unique("tbv");
        let (root, peer) = (format!("{base}r"), format!("{base}n"));
        assert!(root.len() <= 15, "interface name {root} too long");
        run("ip", &["link", "add", &root, "type", "veth", "peer", "name", &peer]);
        let mut veth = Veth { root, root_ip: String::new() };
        run("ip", &["link", "set", &peer, "netns", &ns.name]);
        // A /30 nobody else on this host uses, starting from one derived from our pid.
        let start = std::process::id() as usize;
        let net = (0..64)
            .map(|i| (start + i) % 64 * 4)
            .find(|n| run("ip", &["-o", "addr", "show", "to", &format!("198.18.250.{n}/30")]).trim().is_empty())
            .expect("a free /30 in 198.18.250.0/24");
        let (root_ip, ns_ip) = (format!("198.18.250.{}", net + 1), format!("198.18.250.{}", net + 2));
        run("ip", &["addr", "add", &format!("{root_ip}/30"), "dev", &veth.root]);
        run("ip", &["link", "set", &veth.root, "up"]);
        run("ip", &["-n", &ns.name, "addr", "add", &format!("{ns_ip}/30"), "dev", &peer]);
        run("ip", &["-n", &ns.name, "link", "set", &peer, "up"]);
        veth.root_ip = root_ip;
        veth
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.root]).stderr(Stdio::null()).status();
    }
}

/// A TCP relay from `bind_ip:<port>` to the broker, stopped on drop.
struct BrokerRelay {
    port: u16,
    stop: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl BrokerRelay {
    fn start(bind_ip: &str) -> BrokerRelay {
        let listener = TcpListener::bind((bind_ip, 0)).unwrap_or_else(|e| panic!("bind {bind_ip}: {e}"));
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (stop2, open2) = (stop.clone(), open.clone());
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let Ok((down, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let _ = down.set_nonblocking(false);
                let Ok(up) = TcpStream::connect(BROKER) else { continue };
                let _ = (down.set_nodelay(true), up.set_nodelay(true));
                let mut open = open2.lock().unwrap();
                open.push(down.try_clone().expect("clone"));
                open.push(up.try_clone().expect("clone"));
                for (mut from, mut to) in [(down.try_clone().expect("clone"), up.try_clone().expect("clone")), (up, down)] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = from.shutdown(Shutdown::Both);
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        BrokerRelay { port, stop, open, thread: Some(thread) }
    }
}

impl Drop for BrokerRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for s in self.open.lock().map(|mut v| std::mem::take(&mut *v)).unwrap_or_default() {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------- the scenario

fn python_agent_and_tunbus_agent_through_the_router(test: &str, runtime: fn() -> Result<PyRuntime, String>) {
    if !system_ready(test) {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let t_prep = Instant::now();
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(why) => {
            match why.strip_prefix(OPTIONAL) {
                Some(why) => eprintln!("SKIPPED {test}: {why} (optional interpreter; not a failure)"),
                None => {
                    cannot_run(test, &why);
                }
            }
            return;
        }
    };
    let prep = t_prep.elapsed();
    let t0 = Instant::now();

    // Dropped in reverse order: Python agent, tunbus agent, router, relay, veth, namespaces.
    let ns_py = Netns::new();
    let ns_tb = Netns::new();
    let veth = Veth::new(&ns_py);
    let relay = BrokerRelay::start(&veth.root_ip);
    let (py_name, tb_name) = (unique("pyag"), unique("tbag"));
    let exchange = "amq.topic"; // the Python agent's and its router's exchange
    let mut router = RouterProc::start(exchange, &format!("--- !configuration\ntopology:\n  - link_id: link_01\n    nodes: [{py_name}, {tb_name}]\n"));
    let mut tb = AgentProc::start(&tb_name, &["--exchange", exchange, "--netns", &ns_tb.name, "--ipv4", "10.2.0.2/24", "--ipv6", "bbbb::2/64"]);
    let py_url = format!("amqp://guest:guest@{}:{}/%2f", veth.root_ip, relay.port);
    // The agent brings tun0 up and starts its TUN reader thread before it publishes
    // ip.tun.started, both on one AMQP connection (kombu's, not thread-safe): a packet from the
    // kernel in that window (IPv6 router solicitation) can hang it for good, consumers never
    // started. Nothing else speaks on a fresh TUN (NOARP: no DAD, no solicited-node MLD), so
    // the namespace does not solicit routers.
    let sysctl =
        ns_py.exec(&["sh", "-c", "echo 0 > /proc/sys/net/ipv6/conf/default/router_solicitations && echo 0 > /proc/sys/net/ipv6/conf/default/accept_ra"]);
    assert!(sysctl.status.success(), "sysctl in {}: {}", ns_py.name, String::from_utf8_lossy(&sysctl.stderr));
    let mut py = PyAgent::start(&rt, &ns_py, &py_url, &py_name, "10.2.0.1", "bbbb", "1");

    let diag = |router: &RouterProc, tb: &AgentProc, py: &PyAgent| {
        format!("--- router\n{}\n--- tunbus agent\n{}\n--- Python agent (log {})\n{}", router.logs(), tb.logs(), py.log.display(), py.summary())
    };

    // The Python agent is up once the router has learned it from its ip.tun.started.
    let learned = |log: String| log.lines().any(|l| l.contains("learned an old-wire agent") && l.contains(&format!("\"{py_name}\"")));
    let tw = Instant::now();
    while !learned(router.logs()) {
        assert!(py.alive(), "the Python agent exited:\n{}", diag(&router, &tb, &py));
        assert!(tw.elapsed() < Duration::from_secs(20), "the router never learned the Python agent:\n{}", diag(&router, &tb, &py));
        std::thread::sleep(Duration::from_millis(50));
    }
    // Then it forks its consumers (the TUN reader thread stays in the parent); traffic before
    // they have subscribed would be lost, and a fork while the reader holds the logging lock
    // can hang a consumer. They log their bindings once subscribed.
    let bound = format!("bound to: toAgent.{py_name}.ip.tun.packet.raw");
    while !py.logs().contains(&bound) {
        assert!(py.alive(), "the Python agent exited:\n{}", diag(&router, &tb, &py));
        assert!(tw.elapsed() < Duration::from_secs(20), "the Python agent never subscribed to its packets:\n{}", diag(&router, &tb, &py));
        std::thread::sleep(Duration::from_millis(50));
    }
    let up = t0.elapsed();
    let ip = py.summary();
    assert!(ip.contains("Network configs error codes"), "the Python agent did not configure its TUN:\n{ip}");

    let checks = [(&ns_py, "10.2.0.2"), (&ns_tb, "10.2.0.1"), (&ns_py, "bbbb::2"), (&ns_tb, "bbbb::1")];
    for (ns, dst) in checks {
        assert!(wait_reachable(ns, dst, Duration::from_secs(10)).is_some(), "{dst} not reachable from {}:\n{}", ns.name, diag(&router, &tb, &py));
    }
    for (ns, dst) in checks {
        let (ok, out) = ping(ns, dst, 5);
        assert!(ok, "ping {dst} from {}:\n{out}\n{}", ns.name, diag(&router, &tb, &py));
    }

    // TCP both ways, checked byte for byte: Python → tunbus over IPv4 (1500-byte packets read by
    // the Python agent), tunbus → Python over IPv6 (offloaded super-packets the router completes).
    let size = 512 * 1024;
    let sink = tcp_sink(&ns_tb.name, "10.2.0.2:5011".into(), 1);
    let sent = tcp_send(&ns_py.name, "10.2.0.2:5011".into(), size, 11).join().expect("send");
    assert_eq!(sink.join().expect("sink")[0], sent, "Python → tunbus transfer damaged:\n{}", diag(&router, &tb, &py));
    let sink = tcp_sink(&ns_py.name, "[bbbb::1]:5012".into(), 1);
    let sent = tcp_send(&ns_tb.name, "[bbbb::1]:5012".into(), size, 12).join().expect("send");
    assert_eq!(sink.join().expect("sink")[0], sent, "tunbus → Python transfer damaged:\n{}", diag(&router, &tb, &py));

    assert!(py.alive(), "the Python agent died:\n{}", diag(&router, &tb, &py));
    let summary = py.summary();
    for bad in ["Traceback", "CRITICAL", "ERROR"] {
        assert!(!summary.contains(bad), "the Python agent logged {bad}:\n{summary}");
    }
    let report = tb.interrupt();
    assert_eq!(drops(&report, "malformed"), 0, "{report}");
    let counters = router.stop();
    eprintln!("router: {counters}");
    assert_eq!(counters["agents_learned"], 1, "{counters}");
    assert_eq!(counters["malformed_json"], 0, "{counters}");
    assert_eq!(counters["unknown_sender"], 0, "{counters}");
    assert!(counters["bridged_to_native"].as_u64().unwrap() > 300, "{counters}");
    assert!(counters["bridged_to_old"].as_u64().unwrap() > 10, "{counters}");
    drop(py);
    eprintln!("{test}: packages ready in {prep:.1?}; agents up in {up:.1?}; pings and 2 x {size} bytes TCP done in {:.1?}", t0.elapsed());
}

#[test]
fn real_python_agent_pings_a_tunbus_agent_through_the_router() {
    python_agent_and_tunbus_agent_through_the_router("real_python_agent_pings_a_tunbus_agent_through_the_router", python27_runtime);
}

#[test]
fn real_python_agent_on_python3_with_bytes_fixes_through_the_router() {
    python_agent_and_tunbus_agent_through_the_router("real_python_agent_on_python3_with_bytes_fixes_through_the_router", python3_runtime);
}

/// An IPv4 ICMP echo: (source, destination, is_request, sequence number).
fn echo(p: &[u8]) -> Option<(String, String, bool, u16)> {
    if p.first()? >> 4 != 4 || *p.get(9)? != 1 {
        return None;
    }
    let icmp = p.get(usize::from(p[0] & 0xf) * 4..)?;
    let request = match icmp.first()? {
        8 => true,
        0 => false,
        _ => return None,
    };
    let addr = |at: usize| std::net::Ipv4Addr::from(<[u8; 4]>::try_from(&p[at..at + 4]).expect("4 bytes")).to_string();
    Some((addr(12), addr(16), request, u16::from_be_bytes([*icmp.get(6)?, *icmp.get(7)?])))
}

#[test]
fn a_coordinator_on_ioppytest_utils_gets_its_capture_from_agent_sniffer() {
    let test = "a_coordinator_on_ioppytest_utils_gets_its_capture_from_agent_sniffer";
    if !system_ready(test) {
        return;
    }
    let python = match coordinator_python() {
        Ok(p) => p,
        Err(why) => {
            cannot_run(test, &why);
            return;
        }
    };
    let exchange = unique("coord");
    let dir = std::env::temp_dir().join(&exchange);
    let out_file = std::env::temp_dir().join(format!("{exchange}.hex"));
    let log = std::env::temp_dir().join(format!("{exchange}.log"));
    let mut sniffer = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(["sniffer", "--url", URL, "--exchange", &exchange, "--dir"])
        .arg(&dir)
        .env_remove("AMQP_URL")
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("agent sniffer");
    let pair = Pair::start(83, &["--exchange", &exchange]);
    let mut coordinator = Command::new(&python)
        .arg(here().join("tests/ioppytest_real/coordinator.py"))
        .args([URL, &exchange, "TD_COAP_CORE_07"])
        .arg(&out_file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the coordinator");
    let mut said = std::io::BufReader::new(coordinator.stdout.take().expect("piped"));
    let mut line = String::new();
    use std::io::BufRead;
    while said.read_line(&mut line).map(|n| n > 0).unwrap_or(false) && !line.starts_with("started") {
        line.clear();
    }
    assert!(line.starts_with("started"), "the coordinator got no sniffing.start.reply; sniffer:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    let (ok, text) = ping(&pair.ns_a, &pair.v4[1], 10);
    assert!(ok, "{text}");
    std::thread::sleep(Duration::from_millis(300));
    use std::io::Write;
    coordinator.stdin.take().expect("piped").write_all(b"stop\n").expect("to the coordinator");
    let mut summary = String::new();
    let _ = std::io::Read::read_to_string(&mut said, &mut summary);
    let status = coordinator.wait().expect("the coordinator ends");
    let _ = sniffer.kill();
    let _ = sniffer.wait();
    assert!(
        status.success(),
        "the coordinator failed (its assertions are on the typed replies): {summary}\nsniffer:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let summary: serde_json::Value = serde_json::from_str(summary.lines().last().unwrap_or("")).expect("the coordinator's summary");
    assert_eq!((summary["filename"].as_str(), summary["linktype"].as_u64()), (Some("TD_COAP_CORE_07.pcap"), Some(101)), "{summary}");
    let packets: Vec<Vec<u8>> = std::fs::read_to_string(&out_file)
        .expect("the packets pure_pcapy read")
        .lines()
        .map(|l| (0..l.len()).step_by(2).map(|i| u8::from_str_radix(&l[i..i + 2], 16).expect("hex")).collect())
        .collect();
    let echoes: Vec<_> = packets.iter().filter_map(|p| echo(p)).collect();
    let (a, b) = (&pair.v4[0], &pair.v4[1]);
    for seq in 1..=10 {
        assert!(echoes.iter().any(|e| (&e.0, &e.1, e.2, e.3) == (a, b, true, seq)), "echo request {seq} missing from the capture: {echoes:?}");
        assert!(echoes.iter().any(|e| (&e.0, &e.1, e.2, e.3) == (b, a, false, seq)), "echo reply {seq} missing from the capture: {echoes:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&out_file);
    let _ = std::fs::remove_file(&log);
}

/// `--wait-config` with a real coordinator's orders: ioppytest-utils' `MsgAgentTunStart`,
/// published as ioppytest's testing tool publishes it (tests/ioppytest_real/tun_start.py:
/// no `user_id`), gives the waiting agent its interface and address; later orders add
/// addresses inside the subnets, one outside them and one past the count are refused and
/// counted (`forged_control`).
#[test]
fn wait_config_takes_a_real_coordinators_tun_start() {
    let test = "wait_config_takes_a_real_coordinators_tun_start";
    if !system_ready(test) {
        return;
    }
    let python = match coordinator_python() {
        Ok(p) => p,
        Err(why) => {
            cannot_run(test, &why);
            return;
        }
    };
    let exchange = unique("tunbus.ioc");
    let name = unique("coap_client");
    let ns = Netns::new();
    let mut agent = AgentProc::start(&name, &["--wire", "ioppytest", "--wait-config", "--exchange", &exchange, "--netns", &ns.name]);
    let t0 = Instant::now();
    while !agent.logs().contains("waiting for the configuration") {
        assert!(t0.elapsed() < Duration::from_secs(15) && agent.alive(), "the agent never waited for its configuration:\n{}", agent.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut listener = bus_client();
    listen(&mut listener, &exchange, &[&format!("fromAgent.{name}.ip.tun.started")]);
    let order = |orders: &[String]| {
        let out = Command::new(&python)
            .arg(here().join("tests/ioppytest_real/tun_start.py"))
            .args([URL, &exchange, &name])
            .args(orders)
            .output()
            .expect("tun_start.py");
        assert!(out.status.success(), "tun_start.py: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    };
    let addresses = |ns: &Netns| String::from_utf8_lossy(&ns.exec(&["ip", "-6", "-o", "addr", "show", "dev", "tb0"]).stdout).into_owned();
    order(&["bbbb:7".to_owned()]);
    let t0 = Instant::now();
    while !addresses(&ns).contains("bbbb::7/64") {
        assert!(t0.elapsed() < Duration::from_secs(15) && agent.alive(), "the order gave no interface:\n{}", agent.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, _, started) = next_delivery(&mut listener, Duration::from_secs(5)).unwrap_or_else(|| panic!("no ip.tun.started:\n{}", agent.logs()));
    let started: serde_json::Value = serde_json::from_slice(&started).expect("JSON");
    assert_eq!((started["ipv6_prefix"].as_str(), started["ipv6_host"].as_str()), (Some("bbbb"), Some("7")), "{started}");
    // The running agent: one order outside the subnets, then nine inside: eight honoured,
    // the ninth one too many.
    let mut more = vec!["cccc:1".to_owned()];
    more.extend((8..=16).map(|h| format!("bbbb:{h:x}")));
    order(&more);
    let t0 = Instant::now();
    while !addresses(&ns).contains("bbbb::f/64") {
        assert!(t0.elapsed() < Duration::from_secs(15), "orders inside the subnets were not honoured:\n{}\n{}", addresses(&ns), agent.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let now = addresses(&ns);
    assert!(!now.contains("cccc::1") && !now.contains("bbbb::10/64"), "an order past a limit was honoured:\n{now}");
    let report = agent.interrupt();
    let logs = agent.logs();
    assert!(logs.contains("outside the session's subnets") && logs.contains("one too many"), "{logs}");
    assert!(logs.contains("no user_id"), "the log says whom it trusted:\n{logs}");
    assert_eq!(drops(&report, "forged_control"), 2, "{report}");
}

// ---------------------------------------------------------------- the serial side

/// tests/ioppytest_real/serial_listener.py: the published agent's `SerialListener` on a
/// device, publishing what it reads, and writing what comes for it to the device as the
/// consumer of releases up to 0.2.0 did; its process group ended on drop.
struct PySerial {
    child: Option<Child>,
    stdin: Option<std::process::ChildStdin>,
    lines: std::sync::mpsc::Receiver<String>,
    log: PathBuf,
}

impl PySerial {
    /// Starts the harness and waits (at most 30 s) until it says it is ready.
    fn start(rt: &PyRuntime, name: &str, device: &Path) -> PySerial {
        let log = std::env::temp_dir().join(format!("{name}.log"));
        let mut child = Command::new(&rt.python)
            .arg("-u")
            .arg(here().join("tests/ioppytest_real/serial_listener.py"))
            // kombu's spelling of the default vhost.
            .args(["amqp://guest:guest@127.0.0.1:5672//", name])
            .arg(device)
            .arg("460800")
            .envs(rt.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("harness log"))
            .process_group(0)
            .spawn()
            .expect("start the Python serial harness");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let py = PySerial { child: Some(child), stdin, lines, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match py.lines.recv_timeout(Duration::from_millis(200)) {
                Ok(line) if line == "ready" => break,
                Ok(_) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(e) => panic!("the Python serial harness is not ready ({e:?}):\n{}", py.logs()),
            }
        }
        py
    }

    fn logs(&self) -> String {
        tail(&std::fs::read_to_string(&self.log).unwrap_or_default(), 40)
    }

    /// Ends the harness through its stdin; its last line.
    fn stop(&mut self) -> String {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = String::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => last = line,
                Err(_) => break,
            }
        }
        if let Some(mut child) = self.child.take() {
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(5) && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            end_process_group(child);
        }
        last
    }
}

impl Drop for PySerial {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            end_process_group(child);
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Frames for the serial tests: END and ESC inside, a maximal 127-byte PSDU, one byte.
fn radio_frames() -> Vec<Vec<u8>> {
    use tunbus::codec::slip::{END, ESC, ESC_END, ESC_ESC, MAX_PSDU};
    vec![
        vec![0x41, 0x88, 0x01, 0xcd, 0xab, 0xff, 0xff, 0x01, 0x00, 0x3f, 0x00],
        vec![END],
        vec![ESC, ESC_END, ESC_ESC, END, ESC, 0x00],
        (0..MAX_PSDU).map(|i| [END, ESC, i as u8][i % 3]).collect(),
        (0..MAX_PSDU as u8).rev().collect(),
        vec![0x02, 0x00, 0x2a],
    ]
}

/// The real listener, fed by a fake probe on a pseudo-terminal, publishes every frame in
/// a body our codec reads byte-exact (and, where Python sorts the keys, writes byte for
/// byte); bodies our codec writes on the injection key arrive on the probe's line,
/// SLIP-framed as the Python agent framed them.
fn python_serial_listener_speaks_our_serial_codec(test: &str, runtime: fn() -> Result<PyRuntime, String>) {
    use tunbus::codec::ioppytest::{self, serial};
    use tunbus::codec::slip;
    if !system_ready(test) {
        return;
    }
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(why) => {
            match why.strip_prefix(OPTIONAL) {
                Some(why) => eprintln!("SKIPPED {test}: {why} (optional interpreter; not a failure)"),
                None => {
                    cannot_run(test, &why);
                }
            }
            return;
        }
    };
    let python3 = !is_python27(&rt.python);
    let name = unique("probe");
    let mut bus = bus_client();
    listen(&mut bus, ioppytest::EXCHANGE, &[&format!("fromAgent.{name}.#")]);
    let mut probe = common::probe::FakeProbe::new();
    let t0 = Instant::now();
    let mut py = PySerial::start(&rt, &name, probe.path());

    // Started: fromAgent.<name>.802154.serial.started, `boudrate` a string.
    let (key, content_type, body) = next_delivery(&mut bus, Duration::from_secs(10)).unwrap_or_else(|| panic!("no serial.started:\n{}", py.logs()));
    assert_eq!(key, serial::routing_key_started(&name));
    assert_eq!(content_type.as_deref(), Some(ioppytest::CONTENT_TYPE));
    let started: serial::SerialStart = serde_json::from_slice(&body).expect("serial.started parses");
    assert_eq!(
        (started.name.as_str(), started.port.as_deref(), started.baud()),
        (name.as_str(), probe.path().to_str(), Some(460_800)),
        "{}",
        String::from_utf8_lossy(&body)
    );
    let mut ours = Vec::new();
    serial::encode_started(&name, &probe.path().display().to_string(), 460_800, &mut ours);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&ours).unwrap(), serde_json::from_slice::<serde_json::Value>(&body).unwrap());
    if python3 {
        assert_eq!(String::from_utf8_lossy(&ours), String::from_utf8_lossy(&body), "serial.started byte for byte");
    }

    // Probe → Python → bus → our codec.
    let frames = radio_frames();
    let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
    probe.send(&refs);
    for want in &frames {
        let (key, content_type, body) =
            next_delivery(&mut bus, Duration::from_secs(10)).unwrap_or_else(|| panic!("frame {want:02x?} never published:\n{}", py.logs()));
        assert_eq!(key, serial::routing_key_from_agent(&name));
        assert_eq!(serial::parse_key(&key), Some(serial::SerialKey::FromAgent { name: &name }));
        assert_eq!(content_type.as_deref(), Some(ioppytest::CONTENT_TYPE));
        let text = String::from_utf8_lossy(&body);
        let mut frame = Vec::new();
        serial::decode_frame(&body, slip::MAX_PSDU, &mut frame).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(&frame, want, "{text}");
        let mut line = Vec::new();
        serial::decode_data_slip(&body, slip::max_encoded_len(slip::MAX_PSDU), &mut line).expect("data_slip");
        let mut sent = Vec::new();
        slip::encode(want, &mut sent);
        assert_eq!(line, sent, "data_slip is the line as sent: {text}");
        let value: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(value["interface_name"], "serial");
        let ts = value["timestamp"].as_u64().unwrap_or_else(|| panic!("timestamp is not whole seconds: {text}"));
        let mut ours = Vec::new();
        serial::encode_frame(want, ts, &mut ours);
        assert_eq!(serde_json::from_slice::<serde_json::Value>(&ours).unwrap(), value);
        if python3 {
            assert_eq!(String::from_utf8_lossy(&ours), text, "our body byte for byte");
        }
    }

    // Our codec → bus → Python's message classes → the probe's line.
    // Both shapes: a listener's body (as a bridge passes it on) and the router's.
    let mut line = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        let mut body = Vec::new();
        let now_s = tunbus::util::now_ns() / 1_000_000_000;
        if i % 2 == 0 {
            serial::encode_frame(f, now_s, &mut body);
        } else {
            serial::encode_inject(f, now_s, &mut body);
        }
        publish(&mut bus, ioppytest::EXCHANGE, &serial::routing_key_to_agent(&name), &tunbus::amqp::IOPPYTEST_PROPERTIES, &body);
        slip::encode(f, &mut line);
    }
    let got = probe.recv_raw(Duration::from_secs(10), |b| b.len() >= line.len());
    assert_eq!(got, line, "what the harness wrote to the probe:\n{}", py.logs());
    let last = py.stop();
    assert!(last.starts_with("stopped:") && last.ends_with(&format!("{} frames injected", frames.len())), "{last}\n{}", py.logs());
    eprintln!("{test}: {} frames each way through the Python serial side in {:.1?} ({last})", frames.len(), t0.elapsed());
}

#[test]
fn real_python_serial_listener_on_python3_speaks_our_serial_codec() {
    python_serial_listener_speaks_our_serial_codec("real_python_serial_listener_on_python3_speaks_our_serial_codec", python3_runtime);
}

#[test]
fn real_python_serial_listener_on_python27_speaks_our_serial_codec() {
    python_serial_listener_speaks_our_serial_codec("real_python_serial_listener_on_python27_speaks_our_serial_codec", python27_runtime);
}

/// ioppytest's serial session end to end: the real Python listener on one pseudo-terminal
/// probe, `agent serial --wire ioppytest` on another, `agent route` with a topology linking
/// the two. Frames each probe sends arrive on the other's line, byte-exact: Python →
/// router → tunbus and tunbus → router → Python (the harness writes what the router
/// injects, as the 0.1.x consumer did).
#[test]
fn real_python_serial_listener_and_agent_serial_through_the_router() {
    let test = "real_python_serial_listener_and_agent_serial_through_the_router";
    if !system_ready(test) {
        return;
    }
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let rt = match python3_runtime() {
        Ok(rt) => rt,
        Err(why) => {
            cannot_run(test, &why);
            return;
        }
    };
    let t0 = Instant::now();
    let (py_name, tb_name) = (unique("pyprobe"), unique("tbprobe"));
    let mut router = RouterProc::start("amq.topic", &format!("topology:\n  - link_id: radio\n    nodes: [{py_name}, {tb_name}]\n"));
    let mut py_probe = common::probe::FakeProbe::new();
    let mut tb_probe = common::probe::FakeProbe::new();
    let mut py = PySerial::start(&rt, &py_name, py_probe.path());
    let tb_device = tb_probe.path().display().to_string();
    let mut agent = AgentProc::spawn_serial(&tb_name, &["--device", &tb_device, "--baud", "460800"]);
    assert!(agent.wait_log("agent up", Duration::from_secs(15)), "{}", agent.logs());

    let frames = radio_frames();
    let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
    py_probe.send(&refs);
    let got = tb_probe.recv_frames(frames.len(), Duration::from_secs(15));
    assert_eq!(got, frames, "Python → router → agent serial:\n{}\n{}", py.logs(), agent.logs());
    tb_probe.send(&refs);
    let got = py_probe.recv_frames(frames.len(), Duration::from_secs(15));
    assert_eq!(got, frames, "agent serial → router → Python:\n{}\n{}", py.logs(), agent.logs());

    let report = agent.interrupt();
    assert_eq!(
        (report["serial"]["frames_in"].as_u64(), report["serial"]["frames_out"].as_u64()),
        (Some(frames.len() as u64), Some(frames.len() as u64)),
        "{report}"
    );
    let counters = router.stop();
    // (The other serial tests' probes share amq.topic: their frames count as unknown senders.)
    let ours = counters["frames_in"].as_u64().unwrap_or(0) - counters["unknown_sender"].as_u64().unwrap_or(0);
    assert_eq!(ours, 2 * frames.len() as u64, "{counters}");
    // Each frame to the other probe and to agent_TT, as ioppytest's router does.
    assert_eq!(counters["frames_forwarded"].as_u64(), Some(4 * frames.len() as u64), "{counters}");
    let last = py.stop();
    assert!(last.ends_with(&format!("{} frames injected", frames.len())), "{last}\n{}", py.logs());
    eprintln!("{test}: {} frames each way in {:.1?}", frames.len(), t0.elapsed());
}
