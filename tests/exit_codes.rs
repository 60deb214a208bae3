//! Every exit code of the table (`tunbus::exit`, the README, `--help`) produced by the
//! failure it names, on the real binary: one test per code. The systemd unit must not
//! restart the codes that do not fix themselves.
//!
//! The broker is the machine's (127.0.0.1:5672); codes 4 and 7 bring what they need: a TLS
//! server of their own (`openssl s_server`, certificates made at test time) and a broker
//! user with too few permissions (deleted again when the test ends, also on failure).

mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::nodes::Certs;
use common::*;

/// Runs `agent connect --name NAME <args>` (no AMQP_URL from outside) until it exits: its
/// code and what it said.
fn connect(name: &str, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut agent = AgentProc::spawn_env(name, args, env);
    let (status, _) = agent.wait_exit(Duration::from_secs(20)).unwrap_or_else(|| panic!("{name} did not exit within 20 s:\n{}", agent.logs()));
    (status.code(), agent.logs())
}

fn assert_code(what: &str, got: (Option<i32>, String), code: i32, says: &str) {
    let (got, logs) = got;
    assert_eq!(got, Some(code), "{what}: exit {got:?}, expected {code}:\n{logs}");
    assert!(logs.contains(says), "{what}: the error should say {says:?}:\n{logs}");
    assert_eq!(logs.lines().filter(|l| l.starts_with("error:")).count(), 1, "{what}: one error line:\n{logs}");
}

/// A port nothing listens on.
fn dead_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

#[test]
fn exit_0_after_ctrl_c() {
    if !system_ready("exit_0_after_ctrl_c") {
        return;
    }
    let ns = Netns::new();
    let mut agent = AgentProc::start(&unique("x0"), &["--netns", &ns.name, "--ipv4", "198.18.60.1/24"]);
    let t0 = Instant::now();
    while !agent.logs().contains("agent up") {
        assert!(t0.elapsed() < Duration::from_secs(15) && agent.alive(), "never up:\n{}", agent.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    let report = agent.interrupt(); // asserts exit 0
    assert!(report["uptime_s"].as_f64().is_some(), "{report}");
}

/// A broker that answers the protocol header with something else: a failure with no code
/// of its own.
#[test]
fn exit_1_any_other_failure() {
    if !system_ready("exit_1_any_other_failure") {
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        for _ in 0..4 {
            let Ok((mut s, _)) = listener.accept() else { return };
            let mut header = [0u8; 8];
            let _ = s.read_exact(&mut header);
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        }
    });
    let ns = Netns::new();
    let got = connect(&unique("x1"), &["--url", &format!("amqp://guest:guest@127.0.0.1:{port}/"), "--netns", &ns.name, "--ipv4", "198.18.60.1/24"], &[]);
    assert_code("a broker that is no AMQP broker", got, 1, "127.0.0.1");
    drop(server);
}

#[test]
fn exit_2_bad_usage_also_found_after_clap_and_in_a_config_file() {
    if !system_ready("exit_2_bad_usage_also_found_after_clap_and_in_a_config_file") {
        return;
    }
    let url = "amqp://127.0.0.1:1";
    assert_code("clap: --queues 0", connect("h1", &["--url", url, "--queues", "0"], &[]), 2, "--queues");
    assert_code("after clap: --session a.b", connect("h1", &["--url", url, "--session", "a.b"], &[]), 2, "--session \"a.b\" must be one topic word");
    assert_code("after clap: --ipv4 with an IPv6 address", connect("h1", &["--url", url, "--ipv4", "fd00::1/64"], &[]), 2, "is not an IPv4 address");
    assert_code("a URL with a raw '/' in its password", connect("h1", &["--url", "amqp://u:QZ/XJ@127.0.0.1:1/"], &[]), 2, "percent-encode");
    // The unit's case: a configuration file with a bad session name is bad usage (exit 2,
    // which RestartPreventExitStatus stops), not a failure retried every 2 s.
    let file = std::env::temp_dir().join(format!("{}.toml", unique("x2")));
    std::fs::write(&file, "name = \"h1\"\nsession = \"lab.2\"\nurl = \"amqp://127.0.0.1:1\"\n").expect("write");
    assert_code("a --config file with a bad session", connect("h1", &["--config", file.to_str().expect("utf-8")], &[]), 2, "--session \"lab.2\"");
    let _ = std::fs::remove_file(&file);
    let (_, logs) = connect("h1", &["--url", "amqp://u:QZ/XJ@127.0.0.1:1/"], &[]);
    assert!(!logs.contains("QZ") && !logs.contains("XJ"), "the password was printed:\n{logs}");
}

#[test]
fn exit_3_broker_unreachable() {
    if !system_ready("exit_3_broker_unreachable") {
        return;
    }
    let ns = Netns::new();
    let got =
        connect(&unique("x3"), &["--url", &format!("amqp://guest:guest@127.0.0.1:{}/", dead_port()), "--netns", &ns.name, "--ipv4", "198.18.60.1/24"], &[]);
    assert_code("nothing listening", got, 3, "Is RabbitMQ running there?");
    // A native agent without addresses is told so before anything else happens.
    let (code, logs) = connect(&unique("x3"), &["--url", &format!("amqp://guest:guest@127.0.0.1:{}/", dead_port())], &[]);
    assert_eq!(code, Some(3), "{logs}");
    assert!(logs.contains("no --ipv4/--ipv6: this agent owns only its link-local address"), "{logs}");
}

/// `openssl s_server` with a certificate the agent's CA did not sign; ended on drop.
struct TlsServer(Child);

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn exit_4_tls_handshake_or_certificate() {
    if !system_ready("exit_4_tls_handshake_or_certificate") {
        return;
    }
    let dir = std::env::temp_dir().join(unique("tunbus-x4-"));
    let certs = Certs::generate(&dir);
    let port = dead_port();
    let server = TlsServer(
        Command::new("openssl")
            .args(["s_server", "-quiet", "-accept", &format!("127.0.0.1:{port}")])
            .arg("-cert")
            .arg(&certs.server_cert)
            .arg("-key")
            .arg(&certs.server_key)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_server"),
    );
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(10), "openssl s_server did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let ns = Netns::new();
    let url = format!("amqps://guest:guest@localhost:{port}/");
    let wrong = certs.wrong_ca.display().to_string();
    let got = connect(&unique("x4"), &["--url", &url, "--tls-ca", &wrong, "--netns", &ns.name, "--ipv4", "198.18.60.1/24"], &[]);
    assert_code("a broker certificate the CA did not sign", got, 4, "certificate");
    // A version 1 client certificate (a bare `openssl x509 -req`): refused before any
    // connection, with the command that makes a version 3 one.
    let ok = |args: &[&str]| assert!(Command::new("openssl").args(args).current_dir(&dir).output().expect("openssl").status.success(), "openssl {args:?}");
    ok(&["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "v1.key", "-out", "v1.csr", "-subj", "/CN=h1"]);
    ok(&["x509", "-req", "-in", "v1.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "v1.pem", "-days", "2"]);
    let (cert, key, ca) = (dir.join("v1.pem"), dir.join("v1.key"), certs.ca.display().to_string());
    let got = connect("h1", &["--url", &url, "--tls-ca", &ca, "--tls-cert", cert.to_str().expect("utf-8"), "--tls-key", key.to_str().expect("utf-8")], &[]);
    assert_code("an X.509 version 1 client certificate", got, 4, "-extfile client.ext");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn exit_5_login_refused() {
    if !system_ready("exit_5_login_refused") {
        return;
    }
    let ns = Netns::new();
    let got = connect(&unique("x5"), &["--url", "amqp://guest:Wrong-QZXJ@127.0.0.1:5672/%2f", "--netns", &ns.name, "--ipv4", "198.18.60.1/24"], &[]);
    assert!(!got.1.contains("QZXJ"), "the password was printed:\n{}", got.1);
    assert_code("a wrong password", got, 5, "login");
}

#[test]
fn exit_6_vhost_unknown_or_forbidden() {
    if !system_ready("exit_6_vhost_unknown_or_forbidden") {
        return;
    }
    let ns = Netns::new();
    let got = connect(
        &unique("x6"),
        &["--url", &format!("amqp://guest:guest@127.0.0.1:5672/{}", unique("novhost")), "--netns", &ns.name, "--ipv4", "198.18.60.1/24"],
        &[],
    );
    assert_code("an unknown vhost", got, 6, "vhost");
}

/// A user that may log in and use `/` but not declare this agent's queue: 403, and since
/// no --session was given, the hint that a provisioned user needs one.
#[test]
fn exit_7_permission_refused() {
    if !system_ready("exit_7_permission_refused") {
        return;
    }
    let user = TempUser::new("x7user", "^$", "^$", "^$", None);
    let ns = Netns::new();
    let got = connect(&unique("x7"), &["--url", &user.url(), "--netns", &ns.name, "--ipv4", "198.18.60.1/24"], &[]);
    assert!(!got.1.contains(&user.password), "the password was printed:\n{}", got.1);
    assert_code("a user without permissions", got, 7, "give --session SESSION");
}

#[test]
fn exit_8_name_in_use() {
    if !system_ready("exit_8_name_in_use") {
        return;
    }
    let (ns1, ns2) = (Netns::new(), Netns::new());
    let name = unique("x8");
    let mut first = AgentProc::start(&name, &["--netns", &ns1.name, "--ipv4", "198.18.60.1/24"]);
    let t0 = Instant::now();
    while !first.logs().contains("agent up") {
        assert!(t0.elapsed() < Duration::from_secs(15) && first.alive(), "never up:\n{}", first.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    let got = connect(&name, &["--url", URL, "--netns", &ns2.name, "--ipv4", "198.18.60.2/24"], &[]);
    assert_code("the same name twice", got, 8, "already in use");
    first.interrupt();
}

#[test]
fn exit_9_local_set_up() {
    if !system_ready("exit_9_local_set_up") {
        return;
    }
    let missing = unique("tbnone");
    let got = connect(&unique("x9"), &["--url", URL, "--netns", &missing, "--ipv4", "198.18.60.1/24"], &[]);
    assert_code("a namespace that does not exist", got, 9, &format!("ip netns add {missing}"));
    let ns = Netns::new();
    run("ip", &["-n", &ns.name, "tuntap", "add", "dev", "tb0", "mode", "tun"]);
    let got = connect(&unique("x9"), &["--url", URL, "--netns", &ns.name, "--ipv4", "198.18.60.1/24"], &[]);
    assert_code("an interface name taken in the namespace", got, 9, "tb0");
    let got = connect("h1", &["--url", URL, "--config", "/nonexistent/tunbus.toml"], &[]);
    assert_code("a --config file that is not there", got, 9, "/nonexistent/tunbus.toml");
}

#[test]
fn exit_10_a_worker_died() {
    if !system_ready("exit_10_a_worker_died") {
        return;
    }
    let ns = Netns::new();
    let got = connect(&unique("x10"), &["--url", URL, "--netns", &ns.name, "--ipv4", "198.18.60.1/24"], &[("TUNBUS_FAULT", "worker-panic")]);
    assert_code("a queue worker that dies", got, 10, "died");
}

/// What the unit keeps from restarting are the codes that do not fix themselves, and every
/// code it names is one the table has.
#[test]
fn the_unit_does_not_restart_what_does_not_fix_itself() {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/dist/tunbus-agent@.service")).expect("the unit");
    let line = unit.lines().find_map(|l| l.strip_prefix("RestartPreventExitStatus=")).expect("RestartPreventExitStatus");
    let codes: Vec<u8> = line.split_whitespace().map(|c| c.parse().expect("a number")).collect();
    assert_eq!(codes, [2, 4, 5, 6, 7, 8], "usage, TLS, login, vhost, permission, name: {line}");
    for table in [tunbus::exit::TABLE.to_owned(), std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README")] {
        for code in 0..=10 {
            assert!(table.contains(&format!("{code} ")) || table.contains(&format!("| {code} |")), "code {code} missing from:\n{table}");
        }
    }
}
