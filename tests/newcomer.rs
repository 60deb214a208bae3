//! What a newcomer relies on, on the real binary, the machine's broker and namespaces:
//!
//! - `agent ping` against a live peer, a stopped peer, a blocked path to the broker and a
//!   user the broker refuses the ping keys: four different answers and exit codes;
//! - `agent doctor` with each check broken in turn names that check (and exits with the code
//!   a start would);
//! - `agent provision` writes a `NAME.toml` per agent that `agent connect --config` takes
//!   unchanged: two agents started from their files ping each other and `agent ping` each
//!   other, as the session's own users.
//!
//! Broker users and sessions a test creates are removed when it ends, also on failure.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::nodes::{Certs, Proxy};
use common::*;

fn agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_agent")).args(args).env_remove("AMQP_URL").env_remove("AMQP_URL_FILE").output().expect("run agent")
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

// ---------------------------------------------------------------------------- ping

#[test]
fn ping_tells_a_live_peer_a_stopped_peer_a_dead_path_and_a_refused_key_apart() {
    if !system_ready("ping_tells_a_live_peer_a_stopped_peer_a_dead_path_and_a_refused_key_apart") {
        return;
    }
    let mut p = Pair::start(62, &[]);
    let peer = p.b.name.clone();

    // Live: every probe answered by the peer's queue 0, with both round trips.
    let out = agent(&["ping", &peer, "--url", URL, "-c", "3", "-i", "0.2"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert_eq!(said.matches(&format!("from {peer} (user guest) on node")).count(), 3, "{said}");
    assert!(said.contains(&format!("queue tunbus.{peer}.0")) && said.contains("3 probes, 3 answered, 0% lost"), "{said}");
    let line = said.lines().find(|l| l.starts_with("seq 1:")).unwrap_or_default();
    assert!(line.contains("broker ") && line.contains(" ms, peer ") && line.contains("127.0.0.1:5672"), "{line}");
    // By address: the agent whose hello claims it answers.
    let out = agent(&["ping", &p.v6[1], "--url", URL, "-c", "1"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains(&format!("from {peer} ")), "{}", text(&out));

    // A path to the broker that carries nothing: not the peer's fault (exit 3).
    let proxy = Proxy::start(5672);
    proxy.freeze();
    let t0 = Instant::now();
    let out = agent(&["ping", &peer, "--url", &format!("amqp://guest:guest@127.0.0.1:{}/%2f?connection_timeout=2000", proxy.port), "-c", "1"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(3), "{said}");
    assert!(said.contains("the path to the broker is dead") && said.contains("did not answer in time"), "{said}");
    assert!(t0.elapsed() < Duration::from_secs(10), "took {:?}", t0.elapsed());
    drop(proxy);

    // A user the broker refuses the ping key: a permission problem (exit 7), named.
    let user = TempUser::new("pinguser", ".*", ".*", ".*", Some(("^tunbus\\.v1\\.ctl\\.(pong\\..*|probe)$", ".*")));
    let out = agent(&["ping", &peer, "--url", &user.url(), "-c", "1"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(7), "{said}");
    assert!(said.contains("a permission problem") && said.contains(&format!("tunbus.v1.ctl.ping.{peer}")), "{said}");
    assert!(!said.contains(&user.password), "{said}");

    // Stopped: the broker echoes, nobody of that name says hello (exit 1).
    p.b.interrupt();
    let out = agent(&["ping", &peer, "--url", URL, "-c", "2", "-i", "0.2"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("our echo came back") && said.contains(&format!("no agent {peer} said hello")), "{said}");
    assert!(said.contains("seq 1: broker ") && said.contains("no answer from"), "{said}");
    p.a.interrupt();
}

// ---------------------------------------------------------------------------- doctor

/// `agent doctor <args>` (as a program run through `wrap`, when given): its exit code and
/// its lines.
fn doctor_via(wrap: &[&str], args: &[&str]) -> (Option<i32>, String) {
    let mut cmd = match wrap.split_first() {
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest).arg(env!("CARGO_BIN_EXE_agent"));
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_agent")),
    };
    let out = cmd.arg("doctor").args(args).env_remove("AMQP_URL").env_remove("AMQP_URL_FILE").output().expect("run agent doctor");
    (out.status.code(), text(&out))
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn doctor(args: &[&str]) -> (Option<i32>, String) {
    doctor_via(&[], args)
}

/// The check `name` has status `status` ("ok", "FAIL", "WARN", "skip").
fn check_is(said: &str, name: &str, status: &str) -> bool {
    said.lines().any(|l| l.starts_with(status) && l[status.len()..].trim_start().starts_with(name))
}

fn broken(what: &str, got: (Option<i32>, String), check: &str, status: &str, code: i32) {
    let (got, said) = got;
    assert!(check_is(&said, check, status), "{what}: expected {status} {check}:\n{said}");
    assert_eq!(got, Some(code), "{what}: exit code:\n{said}");
    if status == "FAIL" || status == "WARN" {
        let i = said.lines().position(|l| l.starts_with(status) && l.contains(check)).unwrap_or(0);
        assert!(said.lines().nth(i + 1).is_some_and(|l| l.trim_start().starts_with("fix:")), "{what}: a fix follows:\n{said}");
    }
    // Exactly one check failed (the others pass or are skipped because of it).
    if status == "FAIL" {
        assert_eq!(said.lines().filter(|l| l.starts_with("FAIL")).count(), 1, "{what}:\n{said}");
    }
}

#[test]
fn doctor_names_each_broken_check() {
    if !system_ready("doctor_names_each_broken_check") {
        return;
    }
    let name = unique("dr");
    let ns = Netns::new();
    let base = ["--name", name.as_str(), "--url", URL, "--netns", ns.name.as_str(), "--ipv4", "198.18.63.1/24"];
    let with = |extra: &[&str]| -> Vec<String> { base.iter().chain(extra).map(|s| s.to_string()).collect() };

    // Everything in place (no management API here: the clock is skipped, not failed).
    let (code, said) = doctor(&base);
    assert_eq!(code, Some(0), "{said}");
    for check in ["TUN device", "capabilities", "configuration", "namespace", "interface name", "broker address", "login", "vhost", "permissions", "MTU"] {
        assert!(check_is(&said, check, "ok"), "{check} should pass:\n{said}");
    }
    assert!(said.contains("a start has what it needs"), "{said}");

    // The TUN device: hidden from this process (a mount namespace of its own).
    let dev_hidden = ["unshare", "-m", "sh", "-c", "mount -t tmpfs none /dev/net && exec \"$0\" \"$@\""];
    broken("no /dev/net/tun", doctor_via(&dev_hidden, &base), "TUN device", "FAIL", 9);
    // The capabilities: CAP_NET_ADMIN and CAP_SYS_ADMIN dropped.
    broken("no capabilities", doctor_via(&["setpriv", "--bounding-set", "-net_admin,-sys_admin"], &base), "capabilities", "FAIL", 9);
    // The configuration: a value only `into_config` refuses.
    broken("a bad session", doctor(&strs(&with(&["--session", "a.b"]))), "configuration", "FAIL", 2);
    // The namespace, then the interface name.
    let missing = unique("tbnone");
    let v = with(&[]);
    let mut v: Vec<&str> = strs(&v);
    v[5] = &missing;
    broken("no namespace", doctor(&v), "namespace", "FAIL", 9);
    let taken = Netns::new();
    run("ip", &["-n", &taken.name, "tuntap", "add", "dev", "tb0", "mode", "tun"]);
    let mut v = strs(&with(&[])).iter().map(|s| s.to_string()).collect::<Vec<_>>();
    v[5] = taken.name.clone();
    broken("an interface of that name", doctor(&strs(&v)), "interface name", "FAIL", 9);
    // The broker's address.
    let dead = TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let mut v = with(&[]);
    v[3] = format!("amqp://guest:guest@127.0.0.1:{dead}/");
    broken("nothing listening", doctor(&strs(&v)), "broker address", "FAIL", 3);
    // TLS: a server certificate the given CA did not sign; a version 1 client certificate.
    let dir = std::env::temp_dir().join(unique("tunbus-dr-"));
    let certs = Certs::generate(&dir);
    let port = TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let mut server = Command::new("openssl")
        .args(["s_server", "-quiet", "-accept", &format!("127.0.0.1:{port}")])
        .arg("-cert")
        .arg(&certs.server_cert)
        .arg("-key")
        .arg(&certs.server_key)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_server");
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(10), "openssl s_server did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut v = with(&["--tls-ca", certs.wrong_ca.to_str().expect("utf-8")]);
    v[3] = format!("amqps://guest:guest@localhost:{port}/");
    broken("a certificate from another CA", doctor(&strs(&v)), "TLS and its certificate", "FAIL", 4);
    let ok = |a: &[&str]| assert!(Command::new("openssl").args(a).current_dir(&dir).output().expect("openssl").status.success(), "openssl {a:?}");
    ok(&["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "v1.key", "-out", "v1.csr", "-subj", "/CN=h1"]);
    ok(&["x509", "-req", "-in", "v1.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "v1.pem", "-days", "2"]);
    let mut v = with(&[
        "--tls-ca",
        certs.ca.to_str().expect("utf-8"),
        "--tls-cert",
        dir.join("v1.pem").to_str().expect("utf-8"),
        "--tls-key",
        dir.join("v1.key").to_str().expect("utf-8"),
    ]);
    v[3] = format!("amqps://localhost:{port}/");
    let got = doctor(&strs(&v));
    assert!(got.1.contains("-extfile client.ext"), "the fix for a version 1 certificate:\n{}", got.1);
    broken("a version 1 client certificate", got, "TLS and its certificate", "FAIL", 4);
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
    // The login, the vhost.
    let mut v = with(&[]);
    v[3] = "amqp://guest:Wrong-QZXJ@127.0.0.1:5672/%2f".into();
    let got = doctor(&strs(&v));
    assert!(!got.1.contains("QZXJ"), "the password was printed:\n{}", got.1);
    broken("a wrong password", got, "login", "FAIL", 5);
    let mut v = with(&[]);
    v[3] = format!("amqp://guest:guest@127.0.0.1:5672/{}", unique("novhost"));
    broken("an unknown vhost", doctor(&strs(&v)), "vhost", "FAIL", 6);
    // The permissions: a user that may not declare this agent's queue; one that may bind
    // but not publish this agent's keys.
    let nothing = TempUser::new("druser", "^$", "^$", "^$", None);
    let mut v = with(&[]);
    v[3] = nothing.url();
    let got = doctor(&strs(&v));
    assert!(got.1.contains("declaring queue"), "{}", got.1);
    broken("no configure permission", got, "permissions", "FAIL", 7);
    let mute = TempUser::new("druser", ".*", ".*", ".*", Some(("^$", ".*")));
    let mut v = with(&[]);
    v[3] = mute.url();
    let got = doctor(&strs(&v));
    assert!(got.1.contains("publishing on tunbus.v1."), "{}", got.1);
    broken("no topic write permission", got, "permissions", "FAIL", 7);
    // The MTU: a jumbo MTU on the ioppytest wire, where every other agent uses 1500.
    let v = vec!["--name", "agent_1", "--wire", "ioppytest", "--mtu", "9000", "--url", URL];
    broken("a jumbo MTU on the ioppytest wire", doctor(&v), "MTU", "WARN", 0);
    // The clock: a management API whose Date is 25 years behind.
    let api = TcpListener::bind("127.0.0.1:0").expect("bind");
    let api_port = api.local_addr().expect("addr").port();
    let server = std::thread::spawn(move || {
        if let Ok((mut s, _)) = api.accept() {
            let mut buf = [0u8; 2048];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.1 401 Unauthorized\r\nDate: Mon, 01 Jan 2001 00:00:00 GMT\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    let got = doctor(&strs(&with(&["--api", &format!("http://127.0.0.1:{api_port}")])));
    assert!(got.1.contains("ahead of the broker's"), "{}", got.1);
    broken("a broker clock far off", got, "clock skew", "WARN", 0);
    let _ = server.join();
}

// ---------------------------------------------------------------------------- provision

/// Removes a provisioned session from the machine's broker when dropped.
struct Session(String);

impl Drop for Session {
    fn drop(&mut self) {
        let _ = agent(&["provision", "--revoke", "--session", &self.0, "--url", URL]);
    }
}

#[test]
fn provision_writes_configurations_connect_takes_unchanged() {
    if !system_ready("provision_writes_configurations_connect_takes_unchanged") {
        return;
    }
    let session = Session(unique("nc"));
    let dir = std::env::temp_dir().join(unique("tunbus-prov-"));
    let out = agent(&[
        "provision",
        "--url",
        URL,
        "--session",
        &session.0,
        "--agent",
        "a=198.18.64.1/24,fd00:64::1/64",
        "--agent",
        "b=198.18.64.2/24,fd00:64::2/64",
        "--out",
        dir.to_str().expect("utf-8"),
    ]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("agent connect --config") && said.contains("a.toml"), "it says how to start an agent:\n{said}");
    for f in ["a.toml", "b.toml", "a.url", "b.url", "peers"] {
        let meta = std::fs::metadata(dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777, 0o600, "{f}");
    }
    let toml = std::fs::read_to_string(dir.join("a.toml")).expect("a.toml");
    assert!(!toml.contains("amqp") && toml.contains("url-file") && toml.contains(&session.0), "{toml}");
    // The unit runs `agent connect --config FILE`; here each agent also gets its namespace
    // (where it runs on this machine), and nothing else.
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/dist/tunbus-agent@.service")).expect("unit");
    assert!(unit.contains("ExecStart=/usr/bin/agent connect --config /etc/tunbus/%i.toml"), "{unit}");
    let (ns_a, ns_b) = (Netns::new(), Netns::new());
    let spawn = |file: &str, ns: &Netns, log: &str| {
        let config = dir.join(file);
        let log = std::fs::File::create(std::env::temp_dir().join(log)).expect("log");
        Command::new(env!("CARGO_BIN_EXE_agent"))
            .args(["connect", "--config", config.to_str().expect("utf-8"), "--netns", &ns.name, "--stats-interval", "0"])
            .env_remove("AMQP_URL")
            .env_remove("AMQP_URL_FILE")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("agent connect --config")
    };
    let log_a = format!("{}-a.log", session.0);
    let log_b = format!("{}-b.log", session.0);
    let mut a = spawn("a.toml", &ns_a, &log_a);
    let mut b = spawn("b.toml", &ns_b, &log_b);
    let logs = || {
        std::fs::read_to_string(std::env::temp_dir().join(&log_a)).unwrap_or_default()
            + &std::fs::read_to_string(std::env::temp_dir().join(&log_b)).unwrap_or_default()
    };
    let reached = wait_reachable(&ns_a, "198.18.64.2", Duration::from_secs(20));
    let ok6 = ping(&ns_b, "fd00:64::1", 2).0;
    // `agent ping` as the session's own user: its permissions let it ping.
    let url_file = dir.join("a.url");
    let pinged = agent(&["ping", "b", "--url-file", url_file.to_str().expect("utf-8"), "--session", &session.0, "-c", "2", "-i", "0.2"]);
    for c in [&mut a, &mut b] {
        // SAFETY: signalling our own child.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(c.id() as i32, libc::SIGINT);
        }
    }
    let (sa, sb) = (a.wait().expect("a exits"), b.wait().expect("b exits"));
    let all = logs();
    assert!(reached.is_some(), "agents started from their NAME.toml never reached each other:\n{all}");
    assert!(ok6, "IPv6 between them:\n{all}");
    assert!(
        all.contains(&format!("user={}.a", session.0)) && all.contains(&format!("exchange=tunbus.{}", session.0)),
        "the start line names user and exchange:\n{all}"
    );
    assert!(pinged.status.success() && text(&pinged).contains(&format!("from b (user {}.b)", session.0)), "{}", text(&pinged));
    assert!(sa.success() && sb.success(), "{sa} {sb}\n{all}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(std::env::temp_dir().join(&log_a));
    let _ = std::fs::remove_file(std::env::temp_dir().join(&log_b));
}

// ---------------------------------------------------------------------------- the URL's source

/// "flag > environment > file > default" holds for the URL as one setting: a `url-file`
/// on the command line (or in `AMQP_URL_FILE`) beats a `url` key of the `--config` file.
#[test]
fn a_url_file_given_on_the_command_line_beats_the_files_url() {
    let dead = || TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let (in_file, in_url_file) = (dead(), dead());
    let dir = std::env::temp_dir().join(unique("tunbus-urlsrc-"));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("h1.toml");
    std::fs::write(&config, format!("name = \"h1\"\nurl = \"amqp://guest:guest@127.0.0.1:{in_file}/\"\n")).expect("config");
    let url_file = dir.join("h1.url");
    std::fs::write(&url_file, format!("amqp://guest:guest@127.0.0.1:{in_url_file}/\n")).expect("url file");
    let (config, url_file) = (config.to_str().expect("utf-8"), url_file.to_str().expect("utf-8"));
    let out = agent(&["connect", "--config", config, "--url-file", url_file]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(3), "{said}");
    assert!(said.contains(&format!("127.0.0.1:{in_url_file}")) && !said.contains(&format!(":{in_file}")), "--url-file must win over the file's url:\n{said}");
    let out = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(["connect", "--config", config])
        .env("AMQP_URL_FILE", url_file)
        .env_remove("AMQP_URL")
        .output()
        .expect("run");
    let said = text(&out);
    assert!(said.contains(&format!("127.0.0.1:{in_url_file}")), "AMQP_URL_FILE must win over the file's url:\n{said}");
    let out = agent(&["connect", "--config", config]);
    assert!(text(&out).contains(&format!("127.0.0.1:{in_file}")), "without either, the file's url:\n{}", text(&out));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `agent lab` takes a broker only from its own command line: an exported `AMQP_URL` (a
/// platform's) is ignored, and the lab says which broker it uses.
#[test]
fn a_lab_ignores_amqp_url_and_says_which_broker_it_uses() {
    if !system_ready("a_lab_ignores_amqp_url_and_says_which_broker_it_uses") {
        return;
    }
    let session = format!("u{}", std::process::id());
    let out = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(["lab", "--hosts", "2", "--throughput-seconds", "0", "--session", &session])
        .env("AMQP_URL", "amqps://platform:Secret-QZXJ@broker.invalid:5671/lab")
        .output()
        .expect("agent lab");
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("is ignored") && said.contains("the lab's broker: this machine's RabbitMQ"), "{said}");
    assert!(!said.contains("QZXJ") && !said.contains("broker.invalid"), "{said}");
}

/// Without the management API, `agent provision` says it needs it, and that its fallback,
/// `rabbitmqctl`, needs root on the broker's own machine (instead of rabbitmqctl's own
/// error about an Erlang cookie).
#[test]
fn provision_says_what_it_needs() {
    if !system_ready("provision_says_what_it_needs") {
        return;
    }
    let args = ["provision", "--url", "amqp://guest:guest@127.0.0.1:5672/", "--api", "http://127.0.0.1:1", "--session", "nc", "--agent", "a=198.18.0.1/24"];
    // --api given: its failure is the error, whatever else there is.
    let out = agent(&args);
    assert!(!out.status.success() && text(&out).contains("cannot reach the management API at 127.0.0.1:1"), "{}", text(&out));
    let local = ["provision", "--url", "amqp://guest:guest@127.0.0.1:5672/", "--session", "nc", "--agent", "a=198.18.0.1/24"];
    if std::net::TcpStream::connect("127.0.0.1:15672").is_err() {
        let out = Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", env!("CARGO_BIN_EXE_agent")])
            .args(local)
            .output()
            .expect("setpriv");
        let said = text(&out);
        assert!(!out.status.success() && said.contains("needs RabbitMQ's management API") && said.contains("rabbitmqctl, needs root"), "{said}");
    }
    let remote = ["provision", "--url", "amqp://admin:pw@broker.invalid:5672/", "--session", "nc", "--agent", "a=198.18.0.1/24"];
    let said = text(&agent(&remote));
    assert!(said.contains("needs RabbitMQ's management API") && said.contains("works only on the broker's own machine") && !said.contains("pw@"), "{said}");
}
