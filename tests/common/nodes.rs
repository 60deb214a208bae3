//! Brokers of a test's own: certificates made at test time (openssl), a private RabbitMQ
//! node with a TLS listener, users and vhosts, and a TCP proxy the test can freeze to
//! black-hole a path. Everything is removed on drop, also when the test fails.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tunbus::lab::broker::{free_tcp_port, NodeConfig, PrivateBroker, TlsListener};

use super::unique;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl runs (apt-get install openssl)");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A test CA, a server certificate for localhost / 127.0.0.1, client certificates whose
/// common names are broker user names, and a second CA that signed nothing of these.
pub struct Certs {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub wrong_ca: PathBuf,
}

impl Certs {
    pub fn generate(dir: &Path) -> Certs {
        std::fs::create_dir_all(dir).expect("cert dir");
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        for (name, cn) in [("ca", "tunbus test CA"), ("wrong-ca", "some other CA")] {
            let mut args = vec!["req", "-x509"];
            args.extend_from_slice(&ec);
            let key = format!("{name}.key");
            let pem = format!("{name}.pem");
            let subj = format!("/CN={cn}");
            args.extend_from_slice(&[
                "-keyout",
                &key,
                "-out",
                &pem,
                "-days",
                "2",
                "-subj",
                &subj,
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ]);
            openssl(dir, &args);
        }
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .expect("ext");
        Certs::sign(dir, "server", "localhost", "server.ext");
        Certs {
            dir: dir.to_owned(),
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            wrong_ca: dir.join("wrong-ca.pem"),
        }
    }

    fn sign(dir: &Path, name: &str, cn: &str, ext: &str) {
        let (key, csr, pem, subj) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"), format!("/CN={cn}"));
        openssl(dir, &["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", &key, "-out", &csr, "-subj", &subj]);
        openssl(dir, &["x509", "-req", "-in", &csr, "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", &pem, "-days", "2", "-extfile", ext]);
    }

    /// A client certificate with common name `user`: (certificate, key).
    pub fn client(&self, user: &str) -> (PathBuf, PathBuf) {
        let ext = self.dir.join("client.ext");
        if !ext.exists() {
            std::fs::write(&ext, "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n").expect("ext");
        }
        let name = format!("client-{user}");
        Certs::sign(&self.dir, &name, user, "client.ext");
        (self.dir.join(format!("{name}.pem")), self.dir.join(format!("{name}.key")))
    }
}

/// A private RabbitMQ node with a plain and a TLS listener (client certificates asked for,
/// EXTERNAL login by common name enabled), stopped and removed on drop.
pub struct TestNode {
    pub broker: PrivateBroker,
    pub dir: PathBuf,
    pub tls_port: u16,
    pub certs: Certs,
    /// The management HTTP API's port, when the node runs it.
    pub api_port: Option<u16>,
}

impl TestNode {
    pub fn start() -> TestNode {
        TestNode::start_with_api(false)
    }

    /// A node that also runs the management HTTP API (`management.tcp.port`).
    pub fn start_with_api(api: bool) -> TestNode {
        let dir = std::env::temp_dir().join(unique("tunbus-node-"));
        // Inside the node's folder, which is handed to the rabbitmq user: it must read the key.
        let certs = Certs::generate(&dir.join("node").join("certs"));
        let tls_port = free_tcp_port().expect("free port");
        let api_port = api.then(|| free_tcp_port().expect("free port"));
        let mut config = NodeConfig {
            tls: Some(TlsListener { port: tls_port, ca: certs.ca.clone(), cert: certs.server_cert.clone(), key: certs.server_key.clone(), verify_peer: true }),
            plugins: vec!["rabbitmq_auth_mechanism_ssl".into()],
            extra: vec!["auth_mechanisms.1 = PLAIN".into(), "auth_mechanisms.2 = EXTERNAL".into(), "ssl_cert_login_from = common_name".into()],
        };
        if let Some(p) = api_port {
            config.plugins.push("rabbitmq_management".into());
            config.extra.push(format!("management.tcp.port = {p}"));
            config.extra.push("management.tcp.ip = 127.0.0.1".into());
        }
        let broker = PrivateBroker::start_with(&dir.join("node"), &config).expect("a private RabbitMQ node with TLS starts");
        if let Some(p) = api_port {
            let t0 = Instant::now();
            while TcpStream::connect(("127.0.0.1", p)).is_err() {
                assert!(t0.elapsed() < Duration::from_secs(60), "the management API did not come up");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        TestNode { broker, dir, tls_port, certs, api_port }
    }

    pub fn ctl(&self, args: &[&str]) -> String {
        self.broker.ctl(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A user with all permissions on `vhost` (created if needed); `None`: no password
    /// (certificate login only).
    pub fn add_user(&self, user: &str, password: Option<&str>, vhost: &str) {
        self.ctl(&["add_user", user, password.unwrap_or("unused-password")]);
        if password.is_none() {
            self.ctl(&["clear_password", user]);
        }
        if vhost != "/" && !self.ctl(&["list_vhosts"]).lines().any(|l| l.trim() == vhost) {
            self.ctl(&["add_vhost", vhost]);
        }
        self.ctl(&["set_permissions", "-p", vhost, user, ".*", ".*", ".*"]);
    }

    pub fn plain_port(&self) -> u16 {
        self.broker.port
    }

    /// Queue names on `vhost`.
    pub fn queues(&self, vhost: &str) -> Vec<String> {
        self.ctl(&["list_queues", "-p", vhost, "-q", "name"]).lines().map(|l| l.trim().to_owned()).filter(|l| !l.is_empty() && l != "name").collect()
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.broker.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP relay between clients and `target`. [`Proxy::freeze`] drops every byte both ways
/// on every connection, old and new, without closing anything: to the agent the path went
/// silent (a NAT timeout, a cable pulled). [`Proxy::heal`] relays again.
/// [`Proxy::delayed`] holds every chunk a while each way: a far broker (a delay line, no
/// rate limit, no loss).
pub struct Proxy {
    pub port: u16,
    frozen: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    /// When each client connection was closed by the client (detected the loss).
    pub client_closes: Arc<Mutex<Vec<Instant>>>,
    pub accepted: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl Proxy {
    pub fn start(target: u16) -> Proxy {
        Proxy::delayed(target, Duration::ZERO)
    }

    /// A relay that holds what it relays `one_way` in each direction.
    pub fn delayed(target: u16, one_way: Duration) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let frozen = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let client_closes = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (frozen, stop, closes, accepted) = (frozen.clone(), stop.clone(), client_closes.clone(), accepted.clone());
            std::thread::spawn(move || {
                let mut pumps = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                            let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else { continue };
                            for (from, to, is_client) in
                                [(client.try_clone().expect("clone"), server.try_clone().expect("clone"), true), (server, client, false)]
                            {
                                let (frozen, stop, closes) = (frozen.clone(), stop.clone(), closes.clone());
                                pumps.push(std::thread::spawn(move || {
                                    if one_way.is_zero() {
                                        pump(from, to, is_client, &frozen, &stop, &closes)
                                    } else {
                                        let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
                                        let writer = std::thread::spawn(move || delay_line(rx, to));
                                        pump(from, DelayedWriter { tx, one_way }, is_client, &frozen, &stop, &closes);
                                        let _ = writer.join();
                                    }
                                }));
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
                for p in pumps {
                    let _ = p.join();
                }
            })
        };
        Proxy { port, frozen, stop, client_closes, accepted, thread: Some(thread) }
    }

    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    pub fn heal(&self) {
        self.frozen.store(false, Ordering::SeqCst);
    }
}

/// What a delayed relay writes into: each chunk with the time it is due.
struct DelayedWriter {
    tx: std::sync::mpsc::Sender<(Instant, Vec<u8>)>,
    one_way: Duration,
}

/// The far end of a relay's way: a stream, or a delay line in front of one.
trait Way: Write {
    fn shut(&mut self);
}

impl Way for TcpStream {
    fn shut(&mut self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}

impl Write for DelayedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tx.send((Instant::now() + self.one_way, buf.to_vec())).map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Way for DelayedWriter {
    fn shut(&mut self) {} // the line closes when this is dropped, after what it holds
}

/// Writes each chunk into `to` when it is due; shuts `to` once the line is closed and empty.
fn delay_line(rx: std::sync::mpsc::Receiver<(Instant, Vec<u8>)>, mut to: TcpStream) {
    while let Ok((due, chunk)) = rx.recv() {
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        if to.write_all(&chunk).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
}

fn pump(mut from: TcpStream, mut to: impl Way, from_client: bool, frozen: &AtomicBool, stop: &AtomicBool, closes: &Mutex<Vec<Instant>>) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::Relaxed) {
        match from.read(&mut buf) {
            Ok(0) => {
                if from_client {
                    closes.lock().expect("lock").push(Instant::now());
                }
                break;
            }
            Ok(n) => {
                // Frozen: the bytes are lost, as on a path that drops everything.
                if !frozen.load(Ordering::SeqCst) && to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted) => {}
            Err(_) => {
                if from_client {
                    closes.lock().expect("lock").push(Instant::now());
                }
                break;
            }
        }
    }
    to.shut();
    let _ = from.shutdown(Shutdown::Both);
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
