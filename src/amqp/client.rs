//! A connection to the broker as one thread owns it: the I/O shell around the pure
//! [`Connection`] machine (which node, backoff, handshake, set-up, liveness, close) with
//! its [`Transport`] (TCP or TLS). Every connection tunbus opens is one of these.
//!
//! **Non-blocking** (queue workers): [`Client::new`] makes a client that is not connected
//! yet; the owner calls [`Client::poll`] on every turn of its loop and waits on
//! [`Client::fd`] and [`Client::poll_timeout`]. Nothing in `poll`, `publish`, `read_some`
//! or `next_event` waits: a name that is not an IP address is resolved on a short-lived
//! thread, TCP connects in the background, TLS and the AMQP handshake and set-up advance
//! with whatever has arrived. While the client is not up, publishes answer
//! [`Published::Down`]. What happened (up, lost, failed attempts) comes out of
//! [`Client::poll_note`].
//!
//! **Blocking** (control paths: presence, `agent peers`, the ioppytest control wire,
//! `agent route`, captures, the sniffer, tests): [`Client::connect`] drives the same
//! machine until it is up (or, with [`Retry::OncePerNode`], every node failed), and the
//! helpers [`Client::call`], [`Client::wait_event`], [`Client::wait_writable`],
//! [`Client::reconnect`] wait with deadlines, looking at the caller's stop flag every
//! [`STOP_POLL`]. Node selection and backoff exist once, in the machine.
//!
//! Sending: control bytes (methods, acks, heartbeats) queue in the session; a published
//! message goes straight from the caller's buffer into the socket ([`Client::publish`],
//! one `writev`, the body never copied). What the socket does not take is kept in a
//! backlog of at most one message and sent first when it drains; until then further
//! publishes answer [`Published::Busy`], so the caller holds its batches instead of
//! queueing without bound. A backlog that makes no progress for [`SEND_STALL`] while the
//! broker has not told us it is blocked means the connection is dead.
//!
//! Every message is stamped with the login user as `user_id` ([`Endpoint::user`]):
//! RabbitMQ refuses a message whose `user_id` is not the login, so receivers can trust it.
//!
//! Receiving: bytes are read into a buffer of two frames; [`Client::next_event`] hands out
//! the session's events, deliveries as slices of that buffer.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, IoSlice};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use super::connection::{Connection, Node};
pub use super::connection::{Consume, Note, Phase, Plan, QueuePlan, Retry};
pub use super::error::{Error, FailureClass};
use super::session::{self, Event, QueueOptions, Session};
use super::tls::{self, TlsClient, TlsOptions};
use super::transport::{Transport, TransportError, STOP_POLL};
use super::url::{BrokerUrl, Mechanism};
use super::wire::{self, Args, Properties, Value, Writer};
use crate::sys::{self, Interest};

/// Longest an attempt takes from TCP connect to the end of its set-up until the
/// connection has been up once, unless the URL says (`connection_timeout`).
pub const CONNECT_TIMEOUT: Duration = super::connection::FIRST_ATTEMPT;
/// Longest each synchronous method asked for once up (a bind, a declare) waits for its
/// answer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Heartbeat asked for unless the URL says (`heartbeat`): a link whose path dies silently
/// is noticed within 2 × 10 s, and a thousand agents' heartbeats cost the broker nothing
/// next to their traffic (docs/decisions/0016-liveness.md).
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);
/// Longest a published message may sit half-written while the broker has not said it is
/// blocked.
pub const SEND_STALL: Duration = Duration::from_secs(2);
/// Our frame size when the URL and the caller do not lower it (RabbitMQ's default maximum).
pub const DEFAULT_FRAME_MAX: u32 = 128 * 1024;
/// Body frames per `writev`: the vector lives on the stack.
pub const IOV_FRAMES: usize = 128;
/// How often a client waiting for a name to resolve looks again.
const RESOLVE_POLL: Duration = Duration::from_millis(10);
/// One broker node as a client reaches it: its URL and, for `amqps://`, the TLS client.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub url: BrokerUrl,
    pub tls: Option<TlsClient>,
}

impl Endpoint {
    /// Builds the TLS client of an `amqps://` URL (reads the certificate files).
    pub fn new(url: BrokerUrl, tls: &TlsOptions) -> Result<Endpoint, tls::TlsError> {
        let tls = if url.tls { Some(tls::client_for(&url, tls)?) } else { None };
        Ok(Endpoint { url, tls })
    }

    /// `amqp://…` endpoints need no settings.
    pub fn plain(url: BrokerUrl) -> Endpoint {
        Endpoint { url, tls: None }
    }

    /// The broker user this endpoint logs in as: the URL's user; with a client certificate
    /// and no user, the certificate's common name (RabbitMQ's `ssl_cert_login_from =
    /// common_name`); else RabbitMQ's default, `guest`.
    pub fn user(&self) -> String {
        if let Some(u) = &self.url.username {
            return u.clone();
        }
        if self.mechanism() == Mechanism::External {
            if let Some(cn) = self.tls.as_ref().and_then(|t| t.common_name.clone()) {
                return cn;
            }
        }
        "guest".to_owned()
    }

    /// How this client logs in: the URL's `auth_mechanism`, else EXTERNAL when a client
    /// certificate is presented and the URL names no user, else PLAIN.
    pub fn mechanism(&self) -> Mechanism {
        self.url.query.auth_mechanism.unwrap_or(if self.tls.as_ref().is_some_and(|t| t.has_client_cert) && self.url.username.is_none() {
            Mechanism::External
        } else {
            Mechanism::Plain
        })
    }
}

/// How a connection is opened (the URL's query overrides these).
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Shown in the broker's management view.
    pub name: String,
    pub frame_max: Option<u32>,
    pub heartbeat: Duration,
    /// Each attempt's deadline; `None`: the machine's (5 s until up once, then 3 s). The
    /// URL's `connection_timeout` overrides both.
    pub timeout: Option<Duration>,
    /// Largest message body gathered.
    pub max_body: usize,
}

impl ConnectOptions {
    pub fn new(name: impl Into<String>) -> ConnectOptions {
        ConnectOptions { name: name.into(), frame_max: None, heartbeat: DEFAULT_HEARTBEAT, timeout: None, max_body: 16 << 20 }
    }
}

/// What became of a publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Published {
    Sent,
    /// The broker has blocked publishing (a resource alarm): not sent.
    Blocked,
    /// The previous message is still being written: not sent, try again when writable.
    Busy,
    /// Not connected now (down, or still setting up): not sent.
    Down,
}

/// An event with its data copied out, for control paths that wait for one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Owned {
    Delivery { tag: u64, routing_key: String, user_id: Option<String>, content_type: Option<String>, correlation_id: Option<String>, body: Vec<u8> },
    Blocked,
    Unblocked,
    Cancelled,
}

/// The transport as far as it got.
enum Pipe {
    None,
    /// A host name being resolved on a thread of its own.
    Resolving(mpsc::Receiver<io::Result<Vec<SocketAddr>>>),
    /// A TCP connect under way; the addresses left to try after this one.
    Connecting {
        sock: Socket,
        rest: Vec<SocketAddr>,
    },
    Open(Transport),
}

/// One connection to the bus, its transport and buffers. See the module header.
pub struct Client {
    conn: Connection,
    endpoints: Vec<Endpoint>,
    pipe: Pipe,
    rbuf: Vec<u8>,
    rpos: usize,
    rlen: usize,
    /// The unsent tail of a published message (plain TCP; TLS keeps its own).
    backlog: Vec<u8>,
    w: Writer,
    stalled_since: Option<Instant>,
    /// Events a blocking call read past while it waited for its answer.
    deferred: VecDeque<Owned>,
    /// The `user_id` every message is stamped with: the login user of the node in use,
    /// unless [`Client::set_stamp`] says otherwise.
    stamp: Option<String>,
    stamp_set: bool,
    /// Up as far as the transport's settings know (liveness set, stamp chosen).
    was_up: bool,
    /// Bytes of unsent data to keep room for ([`Client::reserve_backlog`]).
    backlog_room: usize,
    /// `host:port` of the node of the transport, for messages on the hot path.
    node_name: String,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Client({}, {:?})", self.conn.broker(), self.conn.phase())
    }
}

impl Client {
    /// A client of `endpoints` (the nodes of one cluster, nearest first) that sets up
    /// `plan` on whichever node takes it; nothing happens until [`Client::poll`].
    pub fn new(endpoints: Vec<Endpoint>, opts: &ConnectOptions, plan: Plan, retry: Retry, seed: u64) -> Client {
        let now = Instant::now();
        let mut largest = wire::FRAME_MIN_SIZE;
        let nodes = endpoints
            .iter()
            .map(|e| {
                let url = &e.url;
                let frame_max = [opts.frame_max, url.query.frame_max.filter(|&f| f != 0), Some(DEFAULT_FRAME_MAX)]
                    .into_iter()
                    .flatten()
                    .min()
                    .unwrap_or(DEFAULT_FRAME_MAX)
                    .max(wire::FRAME_MIN_SIZE);
                largest = largest.max(frame_max);
                Node {
                    broker: url.authority(),
                    session: session::Config {
                        mechanism: e.mechanism(),
                        username: url.username.clone().unwrap_or_else(|| "guest".into()),
                        password: url.password().map(str::to_owned).unwrap_or_else(|| if url.username.is_none() { "guest".into() } else { String::new() }),
                        vhost: url.vhost.clone(),
                        connection_name: opts.name.clone(),
                        frame_max,
                        heartbeat: url.query.heartbeat.unwrap_or(opts.heartbeat),
                        max_body: opts.max_body,
                    },
                    timeout: url.query.connection_timeout.or(opts.timeout),
                }
            })
            .collect();
        Client {
            conn: Connection::new(nodes, plan, retry, seed, now),
            endpoints,
            pipe: Pipe::None,
            rbuf: vec![0; 2 * (largest as usize + wire::FRAME_OVERHEAD)],
            rpos: 0,
            rlen: 0,
            backlog: Vec::new(),
            w: Writer::new(),
            stalled_since: None,
            deferred: VecDeque::new(),
            stamp: None,
            stamp_set: false,
            was_up: false,
            backlog_room: 0,
            node_name: String::new(),
        }
    }

    /// Blocks until the client is up: with [`Retry::OncePerNode`] it fails with the last
    /// node's error once every node failed; with [`Retry::Forever`] it backs off and tries
    /// again until `stop` is raised ([`Error::Stopped`]).
    pub fn connect(endpoints: Vec<Endpoint>, opts: &ConnectOptions, plan: Plan, retry: Retry, stop: &AtomicBool) -> Result<Client, Error> {
        let seed = crate::util::now_ns() ^ u64::from(std::process::id()).rotate_left(32);
        let mut c = Client::new(endpoints, opts, plan, retry, seed);
        c.wait_up(stop)?;
        Ok(c)
    }

    /// One node, no set-up, one attempt: a plain login (tools, tests).
    pub fn open(endpoint: &Endpoint, opts: &ConnectOptions, stop: &AtomicBool) -> Result<Client, Error> {
        Client::connect(vec![endpoint.clone()], opts, Plan::default(), Retry::OncePerNode, stop)
    }

    /// Drives the machine until it is up again (after a loss, or from the start); see
    /// [`Client::connect`]. Notes on the way are taken (failed attempts are logged at
    /// debug level).
    pub fn wait_up(&mut self, stop: &AtomicBool) -> Result<(), Error> {
        let mut last = None;
        loop {
            self.poll(Instant::now());
            while let Some(note) = self.conn.poll_note() {
                match note {
                    Note::AttemptFailed { error, node } => {
                        tracing::debug!(node, %error, "connection attempt failed");
                        last = Some(error);
                    }
                    Note::Lost { error, .. } => last = Some(error),
                    Note::Up { .. } => {}
                }
            }
            match self.conn.phase() {
                Phase::Up => return Ok(()),
                Phase::Failed | Phase::Closed => return Err(last.unwrap_or(Error::Stopped)),
                _ => {}
            }
            if stop.load(Ordering::Relaxed) {
                self.conn.close(Instant::now());
                self.sync_pipe();
                return Err(Error::Stopped);
            }
            self.wait_a_little(STOP_POLL);
        }
    }

    /// Blocking: after a loss reported by a helper, waits until the machine has set the
    /// connection up again (with its backoff and the next node).
    pub fn reconnect(&mut self, stop: &AtomicBool) -> Result<(), Error> {
        if self.conn.is_up() {
            // The owner gave up on it (an error the machine did not see, a cancelled consumer).
            let broker = self.conn.broker().to_owned();
            self.fail(Instant::now(), Error::Eof { broker, hint: " (given up by its owner)" });
        }
        self.wait_up(stop)
    }

    /// Waits on the transport (or the timer) for at most `most`.
    fn wait_a_little(&mut self, most: Duration) {
        let now = Instant::now();
        let mut wait = most;
        if let Some(t) = self.poll_timeout() {
            wait = wait.min(t.saturating_duration_since(now));
        }
        match self.fd() {
            Some((fd, interest)) => {
                let _ = sys::wait([Some((fd, interest))], wait);
            }
            None => std::thread::sleep(wait),
        }
    }

    // -----------------------------------------------------------------------------------
    // The non-blocking drive.

    /// Does everything that is due and possible without waiting: timers, the next attempt,
    /// the transport's progress, the handshake and set-up, sending what is queued.
    pub fn poll(&mut self, now: Instant) {
        self.conn.handle_timeout(now);
        if self.conn.is_up() && !self.session_blocked() {
            if let Some(since) = self.stalled_since {
                if now.saturating_duration_since(since) >= SEND_STALL {
                    let e = Error::Stalled { broker: self.conn.broker().to_owned(), stalled: now.saturating_duration_since(since) };
                    self.fail(now, e);
                }
            }
        }
        if let Some(node) = self.conn.poll_connect(now) {
            self.start(node, now);
        }
        self.progress(now);
        if matches!(self.pipe, Pipe::Open(_)) && self.conn.phase() == Phase::SettingUp {
            self.set_up(now);
        }
        if self.conn.is_up() {
            if !self.was_up {
                self.on_up();
            }
            if let Err(e) = self.flush(now) {
                self.fail(now, e);
            }
        }
        self.sync_pipe();
    }

    /// What happened since the last call (up, lost, failed attempts), oldest first.
    pub fn poll_note(&mut self) -> Option<Note> {
        self.conn.poll_note()
    }

    pub fn phase(&self) -> Phase {
        self.conn.phase()
    }

    /// What to do when a whole round of nodes fails, from now on.
    pub fn set_retry(&mut self, retry: Retry) {
        self.conn.set_retry(retry);
    }

    pub fn is_up(&self) -> bool {
        self.conn.is_up()
    }

    /// The node in use (or the next to try), an index into the endpoints.
    pub fn node(&self) -> usize {
        self.conn.node()
    }

    /// The declared queue's name (the broker's for a server-named queue), once up.
    pub fn queue(&self) -> &str {
        self.conn.queue()
    }

    /// Adds a binding to the plan, so a reconnection binds it too (bind it now with
    /// [`Client::queue_bind`]).
    pub fn plan_binding(&mut self, key: &str) {
        self.conn.plan_binding(key);
    }

    /// Opens a transport to `node`.
    fn start(&mut self, node: usize, now: Instant) {
        self.drop_pipe();
        let Some(e) = self.endpoints.get(node) else { return };
        let authority = e.url.authority();
        self.node_name.clone_from(&authority);
        let literal = e.url.host.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, e.url.port));
        match literal {
            Some(addr) => self.connect_to(vec![addr], now),
            None => {
                let (tx, rx) = mpsc::channel();
                let spawned = std::thread::Builder::new().name("tunbus-resolve".into()).spawn(move || {
                    let _ = tx.send(authority.to_socket_addrs().map(Iterator::collect));
                });
                match spawned {
                    Ok(_) => self.pipe = Pipe::Resolving(rx),
                    Err(source) => {
                        let broker = self.conn.broker().to_owned();
                        self.fail(now, Error::Connect { broker, source });
                    }
                }
            }
        }
    }

    /// Starts a non-blocking TCP connect to the first of `addrs` that takes one.
    fn connect_to(&mut self, mut addrs: Vec<SocketAddr>, now: Instant) {
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the host name resolves to no address");
        addrs.reverse(); // popped from the end, in the resolver's order
        while let Some(addr) = addrs.pop() {
            match start_connect(addr) {
                Ok((sock, true)) => return self.tcp_up(sock, now),
                Ok((sock, false)) => {
                    self.pipe = Pipe::Connecting { sock, rest: addrs };
                    return;
                }
                Err(e) => last = e,
            }
        }
        let broker = self.conn.broker().to_owned();
        self.fail(now, Error::Connect { broker, source: last });
    }

    /// Moves a resolving or connecting transport on, as far as it can without waiting.
    fn progress(&mut self, now: Instant) {
        match &mut self.pipe {
            Pipe::Resolving(rx) => match rx.try_recv() {
                Ok(Ok(addrs)) => {
                    self.pipe = Pipe::None;
                    self.connect_to(addrs, now);
                }
                Ok(Err(source)) => {
                    let broker = self.conn.broker().to_owned();
                    self.fail(now, Error::Connect { broker, source });
                }
                Err(mpsc::TryRecvError::Empty) => {}
                Err(mpsc::TryRecvError::Disconnected) => {
                    let broker = self.conn.broker().to_owned();
                    self.fail(now, Error::Connect { broker, source: io::Error::other("the resolver thread ended") });
                }
            },
            Pipe::Connecting { sock, rest } => match sys::wait_fd(sock.as_fd(), Interest::Write, Duration::ZERO) {
                Ok(false) => {}
                Ok(true) => match sock.take_error() {
                    Ok(None) => {
                        let Pipe::Connecting { sock, .. } = std::mem::replace(&mut self.pipe, Pipe::None) else { return };
                        self.tcp_up(sock, now);
                    }
                    Ok(Some(e)) | Err(e) => {
                        let rest = std::mem::take(rest);
                        self.pipe = Pipe::None;
                        if rest.is_empty() {
                            let broker = self.conn.broker().to_owned();
                            self.fail(now, Error::Connect { broker, source: e });
                        } else {
                            self.connect_to(rest, now);
                        }
                    }
                },
                Err(source) => {
                    let broker = self.conn.broker().to_owned();
                    self.fail(now, Error::Io { broker, source });
                }
            },
            Pipe::None | Pipe::Open(_) => {}
        }
    }

    /// TCP is connected: TLS (when the URL says) and the handshake start.
    fn tcp_up(&mut self, sock: Socket, now: Instant) {
        let _ = sock.set_tcp_nodelay(true);
        let stream: TcpStream = sock.into();
        let tls = self.endpoints.get(self.conn.node()).and_then(|e| e.tls.as_ref());
        match Transport::new(stream, tls) {
            Ok(t) => {
                self.pipe = Pipe::Open(t);
                self.rpos = 0;
                self.rlen = 0;
                self.backlog.clear();
                self.stalled_since = None;
                self.conn.connected(now);
            }
            Err(e) => {
                let e = transport_error(self.conn.broker(), e, true);
                self.fail(now, e);
            }
        }
    }

    /// Handshake and set-up: send what the machine asks, feed it what arrives, until it is
    /// up or nothing more has arrived.
    fn set_up(&mut self, now: Instant) {
        for _ in 0..64 {
            if let Err(e) = self.flush(now) {
                return self.fail(now, e);
            }
            loop {
                if self.conn.phase() != Phase::SettingUp {
                    return;
                }
                let consumed = match self.conn.handle(now, &self.rbuf[self.rpos..self.rlen]) {
                    Ok(h) => h.consumed,
                    Err(e) => return self.fail(now, e),
                };
                if consumed == 0 {
                    break;
                }
                self.rpos += consumed;
            }
            if let Err(e) = self.flush(now) {
                return self.fail(now, e);
            }
            match self.read_some() {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) => return self.fail(now, e),
            }
        }
    }

    /// The connection just came up: the transport's liveness from the negotiated
    /// heartbeat, the user messages are stamped with, room for the backlog.
    fn on_up(&mut self) {
        self.was_up = true;
        let heartbeat = self.heartbeat();
        if let Pipe::Open(t) = &self.pipe {
            let _ = t.set_liveness(heartbeat, true);
        }
        if !self.stamp_set {
            self.stamp = self.endpoints.get(self.conn.node()).map(Endpoint::user);
        }
        self.backlog.reserve(self.backlog_room.saturating_sub(self.backlog.len()));
    }

    /// Tells the machine the connection failed (an attempt, or an up connection is lost);
    /// the transport goes when the machine no longer wants it.
    pub fn fail(&mut self, now: Instant, e: Error) {
        self.conn.failed(now, e);
        self.sync_pipe();
    }

    /// Drops the transport when the machine no longer wants one.
    fn sync_pipe(&mut self) {
        if !self.conn.wants_transport() {
            self.drop_pipe();
        }
        if !self.conn.is_up() {
            self.was_up = false;
        }
    }

    fn drop_pipe(&mut self) {
        self.pipe = Pipe::None;
        self.rpos = 0;
        self.rlen = 0;
        self.backlog.clear();
        self.stalled_since = None;
        self.deferred.clear();
    }

    fn session_blocked(&self) -> bool {
        self.conn.session().is_some_and(Session::blocked)
    }

    // -----------------------------------------------------------------------------------
    // What the owner's loop asks.

    /// `host:port` of the node in use (or the next to try).
    pub fn broker(&self) -> &str {
        self.conn.broker()
    }

    /// The `user_id` messages are stamped with (`None`: not stamped; for tests that play
    /// a client which does not say who it is).
    pub fn set_stamp(&mut self, user: Option<String>) {
        self.stamp = user;
        self.stamp_set = true;
    }

    /// The descriptor to wait on and for what: writability while TCP connects, else
    /// readability (and writability while bytes wait). `None` without a socket (waiting,
    /// resolving): wake at [`Client::poll_timeout`].
    pub fn fd(&self) -> Option<(BorrowedFd<'_>, Interest)> {
        match &self.pipe {
            Pipe::Connecting { sock, .. } => Some((sock.as_fd(), Interest::Write)),
            Pipe::Open(t) => Some((t.fd(), if self.wants_write() { Interest::ReadWrite } else { Interest::Read })),
            Pipe::None | Pipe::Resolving(_) => None,
        }
    }

    /// The negotiated heartbeat interval (zero until tuned).
    pub fn heartbeat(&self) -> Duration {
        self.conn.session().map_or(Duration::ZERO, Session::heartbeat)
    }

    /// Whether the broker has blocked our publishes.
    pub fn blocked(&self) -> bool {
        self.session_blocked()
    }

    /// Whether bytes are waiting for the socket to take them (poll for writability).
    pub fn wants_write(&self) -> bool {
        self.backlogged() || !self.conn.pending().is_empty()
    }

    /// Makes room up front for `bytes` of unsent data (the largest message this connection
    /// will publish), so that a full socket never grows the backlog on the hot path.
    /// Capacity not yet written costs address space, not resident memory.
    pub fn reserve_backlog(&mut self, bytes: usize) {
        self.backlog_room = bytes;
        self.backlog.reserve(bytes.saturating_sub(self.backlog.len()));
    }

    /// Whether a published message is still being written.
    pub fn backlogged(&self) -> bool {
        !self.backlog.is_empty() || matches!(&self.pipe, Pipe::Open(t) if t.wants_write())
    }

    /// Bytes sent that the broker has not taken yet: the socket's unacknowledged bytes and
    /// our backlog.
    pub fn unsent(&self) -> usize {
        let socket = match &self.pipe {
            Pipe::Open(t) => t.unsent(),
            _ => 0,
        };
        socket + self.backlog.len()
    }

    /// Whether a whole frame may already be read and waiting (the caller should not sleep).
    pub fn has_buffered(&self) -> bool {
        let rest = &self.rbuf[self.rpos..self.rlen];
        rest.len() >= wire::FRAME_HEADER_LEN && {
            let size = u32::from_be_bytes([rest[3], rest[4], rest[5], rest[6]]) as usize;
            rest.len() >= size + wire::FRAME_OVERHEAD
        }
    }

    /// When [`Client::poll`] wants to run next: the machine's timers (the next attempt,
    /// its deadline, heartbeats, a close), the stall check, a resolver to look at.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut at = self.conn.poll_timeout();
        let mut also = |t: Instant| at = Some(at.map_or(t, |a| a.min(t)));
        if let Some(s) = self.stalled_since {
            also(s + SEND_STALL);
        }
        if matches!(self.pipe, Pipe::Resolving(_)) {
            also(Instant::now() + RESOLVE_POLL);
        }
        at
    }

    /// Heartbeats and the stall check (what [`Client::poll`] does, for callers that only
    /// hold an up connection). An error means the connection is gone.
    pub fn tick(&mut self, now: Instant) -> Result<(), Error> {
        let was_up = self.conn.is_up();
        self.poll(now);
        if was_up && !self.conn.is_up() {
            return Err(self.lost_error());
        }
        Ok(())
    }

    /// The error of the loss just noted (left in the notes for the owner too).
    fn lost_error(&mut self) -> Error {
        let broker = self.conn.broker().to_owned();
        let mut found = None;
        let mut kept = VecDeque::new();
        while let Some(n) = self.conn.poll_note() {
            if let Note::Lost { error, .. } = &n {
                found = Some(error.duplicate());
            }
            kept.push_back(n);
        }
        for n in kept {
            self.conn.push_note(n);
        }
        found.unwrap_or(Error::Eof { broker, hint: "" })
    }

    /// Reads what has arrived (without waiting). Returns the bytes read.
    pub fn read_some(&mut self) -> Result<usize, Error> {
        let Pipe::Open(transport) = &mut self.pipe else { return Ok(0) };
        if self.rpos == self.rlen {
            self.rpos = 0;
            self.rlen = 0;
        } else if self.rbuf.len() - self.rlen < self.conn.session().map_or(wire::FRAME_MIN_SIZE, Session::frame_max) as usize + wire::FRAME_OVERHEAD {
            self.rbuf.copy_within(self.rpos..self.rlen, 0);
            self.rlen -= self.rpos;
            self.rpos = 0;
        }
        let handshaking = !self.conn.is_up();
        let n = transport.read(&mut self.rbuf[self.rlen..]).map_err(|e| transport_error(self.conn.broker(), e, handshaking))?;
        self.rlen += n;
        Ok(n)
    }

    /// The next event in what was read, if a whole one is there. Deliveries borrow the read
    /// buffer: handle them before reading again.
    pub fn next_event(&mut self, now: Instant) -> Result<Option<Event<'_>>, Error> {
        if !self.conn.is_up() {
            return Ok(None);
        }
        let heartbeat = self.heartbeat();
        let h = self.conn.handle(now, &self.rbuf[self.rpos..self.rlen])?;
        self.rpos += h.consumed;
        let broker = &self.node_name;
        match h.event {
            Some(Event::Blocked) => {
                tracing::warn!(broker = %broker, "the broker blocked publishing (a memory or disk alarm); dropping what we would send until it unblocks");
                if let Pipe::Open(t) = &self.pipe {
                    let _ = t.set_liveness(heartbeat, false);
                }
            }
            Some(Event::Unblocked) => {
                tracing::info!(broker = %broker, "the broker unblocked publishing");
                if let Pipe::Open(t) = &self.pipe {
                    let _ = t.set_liveness(heartbeat, true);
                }
            }
            _ => {}
        }
        Ok(h.event)
    }

    /// A round-trip sample: `basic.qos` with `prefetch` (what the consumer has: nothing
    /// changes), answered by [`Event::Reply`]. False (nothing sent) while not up or while
    /// another question waits for its answer.
    pub fn ask_qos(&mut self, prefetch: u16) -> bool {
        match self.conn.session_mut() {
            Some(s) if s.awaiting().is_none() => {
                s.basic_qos(prefetch);
                true
            }
            _ => false,
        }
    }

    /// Renews the plan's consumer with `prefetch` (`Session::reconsume`), answered by
    /// [`Event::Reply`]. False (nothing sent) while not up, while another question waits,
    /// or when the plan has no consumer. A new connection gets the plan's prefetch again.
    pub fn set_prefetch(&mut self, prefetch: u16) -> bool {
        let Some(q) = self.conn.plan().queue.as_ref() else { return false };
        let Some(c) = q.consume.clone() else { return false };
        if c.tag.is_empty() {
            return false; // the broker named it: not ours to renew
        }
        let queue = self.conn.queue().to_owned();
        match self.conn.session_mut() {
            Some(s) if s.awaiting().is_none() => {
                s.reconsume(&queue, &c.tag, c.no_ack, c.exclusive, prefetch);
                true
            }
            _ => false,
        }
    }

    /// Acknowledges every delivery up to `tag` (queued; sent by the next flush).
    pub fn ack_multiple(&mut self, tag: u64) {
        if let Some(s) = self.conn.session_mut() {
            s.ack_multiple(tag);
        }
    }

    /// Sends the backlog, then queued control bytes, as far as the socket takes them now.
    pub fn flush(&mut self, now: Instant) -> Result<(), Error> {
        let Pipe::Open(transport) = &mut self.pipe else { return Ok(()) };
        let handshaking = !self.conn.is_up();
        let broker = self.conn.broker();
        let mut progress = false;
        if !self.backlog.is_empty() {
            let n = transport.write(&[IoSlice::new(&self.backlog)]).map_err(|e| transport_error(broker, e, handshaking))?;
            self.backlog.drain(..n);
            progress |= n > 0;
        }
        if self.backlog.is_empty() && !self.conn.pending().is_empty() {
            let n = transport.write(&[IoSlice::new(self.conn.pending())]).map_err(|e| transport_error(broker, e, handshaking))?;
            self.conn.sent(n, now);
            progress |= n > 0;
        }
        let before = transport.wants_write();
        transport.flush().map_err(|e| transport_error(self.conn.broker(), e, handshaking))?;
        progress |= before && !transport.wants_write();
        // `stalled_since`: the last progress while something waited to be sent.
        if !self.wants_write() {
            self.stalled_since = None;
        } else if progress {
            self.stalled_since = Some(now);
        } else {
            self.stalled_since.get_or_insert(now);
        }
        Ok(())
    }

    /// Publishes `body` to `exchange` under `key`: written straight from `body` (one
    /// `writev` per [`IOV_FRAMES`] frames), what the socket does not take kept in the
    /// backlog. No allocation once the writer and backlog have grown. Not up:
    /// [`Published::Down`].
    pub fn publish(&mut self, now: Instant, exchange: &str, key: &str, props: &Properties<'_>, body: &[u8]) -> Result<Published, Error> {
        if !self.conn.is_up() {
            return Ok(Published::Down);
        }
        if self.session_blocked() {
            return Ok(Published::Blocked);
        }
        self.flush(now)?;
        if self.backlogged() || !self.conn.pending().is_empty() {
            return Ok(Published::Busy);
        }
        let (Some(session), Pipe::Open(transport)) = (self.conn.session(), &mut self.pipe) else { return Ok(Published::Down) };
        let props = Properties { user_id: props.user_id.or(self.stamp.as_deref()), ..*props };
        let prefix = session.publish_frames(&mut self.w, exchange, key, &props, body);
        let frame_max = session.frame_max();
        let frames = wire::body_frames(body.len(), frame_max);
        let mut first = 0;
        while first < frames {
            let mut iov = [IoSlice::new(&[]); 2 * IOV_FRAMES + 1];
            let (n, next) = wire::publish_iov(&self.w.buf, prefix, body, frame_max, first, &mut iov);
            let total: usize = iov[..n].iter().map(|s| s.len()).sum();
            let written = transport.write(&iov[..n]).map_err(|e| transport_error(self.conn.broker(), e, false))?;
            if written < total {
                let mut skip = written;
                for s in &iov[..n] {
                    if skip >= s.len() {
                        skip -= s.len();
                    } else {
                        self.backlog.extend_from_slice(&s[skip..]);
                        skip = 0;
                    }
                }
                let mut f = next;
                while f < frames {
                    let (n, next) = wire::publish_iov(&self.w.buf, prefix, body, frame_max, f, &mut iov);
                    for s in &iov[..n] {
                        self.backlog.extend_from_slice(s);
                    }
                    f = next;
                }
                self.stalled_since = Some(now);
                break;
            }
            first = next;
        }
        self.conn.note_sent(now);
        Ok(Published::Sent)
    }

    // -----------------------------------------------------------------------------------
    // Blocking helpers for control paths. An error from one of them has been told to the
    // machine already (the connection is lost); [`Client::reconnect`] brings it back.

    /// Fails the connection with `e` and returns a copy for the caller.
    fn lose(&mut self, e: Error) -> Error {
        let copy = e.duplicate();
        self.fail(Instant::now(), e);
        copy
    }

    /// Waits up to `timeout` for the backlog to drain; returns whether it did.
    pub fn wait_writable(&mut self, timeout: Duration) -> Result<bool, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Err(e) = self.flush(Instant::now()) {
                return Err(self.lose(e));
            }
            if !self.wants_write() {
                return Ok(true);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.session_blocked() || !self.conn.is_up() {
                return Ok(false);
            }
            let Some((fd, _)) = self.fd() else { return Ok(false) };
            if let Err(source) = sys::wait([Some((fd, Interest::Write))], left.min(STOP_POLL)) {
                let broker = self.conn.broker().to_owned();
                return Err(self.lose(Error::Io { broker, source }));
            }
        }
    }

    /// Runs until `done` accepts an event, or fails at `deadline` or on `stop`.
    fn drive(&mut self, deadline: Instant, stop: &AtomicBool, during: &'static str, mut done: impl FnMut(&Event<'_>) -> bool) -> Result<Vec<u8>, Error> {
        loop {
            let now = Instant::now();
            if let Err(e) = self.flush(now) {
                return Err(self.lose(e));
            }
            loop {
                let reply = match self.next_event(now) {
                    Err(e) => return Err(self.lose(e)),
                    Ok(None) => break,
                    Ok(Some(e)) if done(&e) => Some(match e {
                        Event::Reply { args, .. } => args.to_vec(),
                        _ => Vec::new(),
                    }),
                    Ok(Some(e)) => {
                        if let Some(o) = owned(e) {
                            self.deferred.push_back(o);
                        }
                        None
                    }
                };
                if let Some(r) = reply {
                    if let Err(e) = self.flush(now) {
                        return Err(self.lose(e));
                    }
                    return Ok(r);
                }
            }
            if !self.conn.is_up() {
                return Err(self.lost_error());
            }
            if stop.load(Ordering::Relaxed) {
                return Err(Error::Stopped);
            }
            if now >= deadline {
                let broker = self.conn.broker().to_owned();
                return Err(self.lose(Error::Timeout { broker, during }));
            }
            self.wait_a_little(deadline.saturating_duration_since(now).min(STOP_POLL));
            if let Err(e) = self.read_some() {
                return Err(self.lose(e));
            }
            let was_up = self.conn.is_up();
            self.conn.handle_timeout(Instant::now());
            self.sync_pipe();
            if was_up && !self.conn.is_up() {
                return Err(self.lost_error());
            }
        }
    }

    /// Sends a synchronous method (`ask` queues it) and waits for its answer; returns the
    /// answer's arguments.
    pub fn call(&mut self, ask: impl FnOnce(&mut Session), stop: &AtomicBool) -> Result<Vec<u8>, Error> {
        let Some(session) = self.conn.session_mut() else { return Err(self.lost_error()) };
        ask(session);
        let Some(wanted) = session.awaiting() else { return Ok(Vec::new()) };
        let during = match wanted {
            wire::method::EXCHANGE_DECLARE => "declaring the exchange",
            wire::method::QUEUE_DECLARE => "declaring a queue",
            wire::method::QUEUE_BIND => "binding a queue",
            wire::method::BASIC_QOS => "setting the prefetch",
            wire::method::BASIC_CONSUME => "starting to consume",
            _ => "waiting for an answer",
        };
        self.drive(Instant::now() + CALL_TIMEOUT, stop, during, |e| matches!(e, Event::Reply { .. }))
    }

    /// Declares a queue; returns its name (the broker's, when `name` is empty).
    pub fn queue_declare(&mut self, name: &str, options: QueueOptions, args: &[(&str, Value<'_>)], stop: &AtomicBool) -> Result<String, Error> {
        let reply = self.call(|s| s.queue_declare(name, options, args), stop)?;
        let mut a = Args::new(&reply);
        Ok(a.shortstr().map(|n| String::from_utf8_lossy(n).into_owned()).unwrap_or_else(|_| name.to_owned()))
    }

    pub fn queue_bind(&mut self, queue: &str, exchange: &str, key: &str, stop: &AtomicBool) -> Result<(), Error> {
        self.call(|s| s.queue_bind(queue, exchange, key), stop).map(drop)
    }

    pub fn basic_qos(&mut self, prefetch: u16, stop: &AtomicBool) -> Result<(), Error> {
        self.call(|s| s.basic_qos(prefetch), stop).map(drop)
    }

    /// `basic.consume` on a connection that is up (a plan's consumer needs no call).
    pub fn basic_consume(&mut self, queue: &str, tag: &str, no_ack: bool, exclusive: bool, stop: &AtomicBool) -> Result<(), Error> {
        self.call(|s| s.basic_consume(queue, tag, no_ack, exclusive), stop).map(drop)
    }

    /// Publishes a control message (copied into the session's queue), then sends.
    pub fn publish_copy(&mut self, exchange: &str, key: &str, props: &Properties<'_>, body: &[u8]) -> Result<Published, Error> {
        if self.session_blocked() {
            return Ok(Published::Blocked);
        }
        let stamp = self.stamp.clone();
        let Some(session) = self.conn.session_mut() else { return Ok(Published::Down) };
        let props = Properties { user_id: props.user_id.or(stamp.as_deref()), ..*props };
        session.publish_copy(exchange, key, &props, body);
        if let Err(e) = self.flush(Instant::now()) {
            return Err(self.lose(e));
        }
        Ok(Published::Sent)
    }

    /// Waits up to `timeout` for the next delivery or notice; `None` when none came. The
    /// connection lost: `Err`.
    pub fn wait_event(&mut self, timeout: Duration, stop: &AtomicBool) -> Result<Option<Owned>, Error> {
        if let Some(e) = self.deferred.pop_front() {
            return Ok(Some(e));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let now = Instant::now();
            loop {
                match self.next_event(now) {
                    Err(e) => return Err(self.lose(e)),
                    Ok(None) => break,
                    Ok(Some(e)) => {
                        if let Some(o) = owned(e) {
                            return Ok(Some(o));
                        }
                    }
                }
            }
            let was_up = self.conn.is_up();
            self.poll(now);
            if !self.conn.is_up() {
                return Err(if was_up { self.lost_error() } else { Error::Stopped });
            }
            if stop.load(Ordering::Relaxed) || now >= deadline {
                return Ok(None);
            }
            self.wait_a_little(deadline.saturating_duration_since(now).min(STOP_POLL));
            if let Err(e) = self.read_some() {
                return Err(self.lose(e));
            }
        }
    }

    /// Closes the connection, waiting up to `wait` for the broker to confirm (its exclusive
    /// queues go with it).
    pub fn close(mut self, wait: Duration) {
        self.close_within(wait);
    }

    /// [`Client::close`] for an owner that keeps the client (a queue worker at shutdown).
    pub fn close_within(&mut self, wait: Duration) {
        let deadline = Instant::now() + wait;
        self.conn.close(Instant::now());
        while self.conn.phase() == Phase::Closing && Instant::now() < deadline {
            let now = Instant::now();
            if self.flush(now).is_err() {
                break;
            }
            let consumed = match self.conn.handle(now, &self.rbuf[self.rpos..self.rlen]) {
                Ok(h) => h.consumed,
                Err(_) => break,
            };
            self.rpos += consumed;
            if self.conn.phase() != Phase::Closing {
                break;
            }
            if consumed == 0 {
                self.wait_a_little(deadline.saturating_duration_since(now).min(STOP_POLL));
                if self.read_some().is_err() {
                    break;
                }
            }
        }
        self.conn.abandon();
        self.drop_pipe();
    }
}

/// Starts a non-blocking connect to `addr`; `true` when it is connected already.
fn start_connect(addr: SocketAddr) -> io::Result<(Socket, bool)> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    match socket.connect(&addr.into()) {
        Ok(()) => Ok((socket, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) || e.kind() == io::ErrorKind::WouldBlock => Ok((socket, false)),
        Err(e) => Err(e),
    }
}

/// Copies out an event a control path waits for (`None` for those it does not).
fn owned(e: Event<'_>) -> Option<Owned> {
    Some(match e {
        Event::Delivery(d) => Owned::Delivery {
            tag: d.tag,
            routing_key: String::from_utf8_lossy(d.routing_key).into_owned(),
            user_id: d.user_id.map(|u| String::from_utf8_lossy(u).into_owned()),
            content_type: d.content_type.map(|u| String::from_utf8_lossy(u).into_owned()),
            correlation_id: d.correlation_id.map(|u| String::from_utf8_lossy(u).into_owned()),
            body: d.body.to_vec(),
        },
        Event::Blocked => Owned::Blocked,
        Event::Unblocked => Owned::Unblocked,
        Event::Cancelled => Owned::Cancelled,
        _ => return None,
    })
}

fn transport_error(broker: &str, e: TransportError, handshaking: bool) -> Error {
    let broker = broker.to_owned();
    match e {
        TransportError::Tls(source) => {
            let hint = match &source {
                rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => " (is this a TLS port? plain AMQP uses amqp://, usually port 5672)",
                rustls::Error::InvalidCertificate(c) if format!("{c:?}").contains("UnsupportedCertVersion") => {
                    " (the broker's certificate is X.509 version 1, which rustls refuses: sign it again with extensions, `openssl x509 -req … -extfile server.ext`, the file holding subjectAltName=DNS:HOST and basicConstraints=CA:FALSE)"
                }
                rustls::Error::InvalidCertificate(_) => " (give --tls-ca with the CA that signed the broker's certificate, and check that the URL's host is the name in it)",
                rustls::Error::AlertReceived(_) => " (the broker refused our TLS handshake: does it want a client certificate, --tls-cert/--tls-key?)",
                _ => "",
            };
            Error::Tls { broker, source, hint }
        }
        TransportError::Io(source) => Error::Io { broker, source },
        TransportError::Eof => {
            Error::Eof { broker, hint: if handshaking { " during the handshake (a TLS port? use amqps://; or too many connections)" } else { "" } }
        }
    }
}
