//! A connection to the broker: a [`Transport`] (TCP or TLS) driving a [`Session`], owned
//! by one thread. Every connection tunbus opens is one of these: queue workers' data links
//! (non-blocking, woken by their `ppoll`), presence, `agent peers`, the ioppytest control
//! wire and `agent route` (blocking helpers with deadlines).
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
//!
//! Waiting: every blocking step waits at most [`STOP_POLL`] at a time and looks at the
//! caller's stop flag in between, and every set-up has an overall deadline (the URL's
//! `connection_timeout`, else [`CONNECT_TIMEOUT`]). A broker that accepts and then
//! trickles bytes cannot hold a thread past either.

use std::collections::VecDeque;
use std::fmt;
use std::io::IoSlice;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::session::{self, Config, Event, ExchangeOptions, QueueOptions, Session};
use super::tls::{self, TlsClient, TlsOptions};
use super::transport::{connect_tcp, Transport, TransportError, STOP_POLL};
use super::url::{BrokerUrl, Mechanism};
use super::wire::{self, Args, Properties, Value, Writer};
use crate::sys::{self, Interest};

/// Longest a connection takes from TCP connect to channel open, unless the URL says
/// (`connection_timeout`): a broker accepting hundreds of connections at once (a large
/// lab starting) takes seconds; an unreachable one should fail well inside 10 s.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest each set-up method (declare, bind, consume) waits for its answer.
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
    pub timeout: Duration,
    /// Largest message body gathered.
    pub max_body: usize,
}

impl ConnectOptions {
    pub fn new(name: impl Into<String>) -> ConnectOptions {
        ConnectOptions { name: name.into(), frame_max: None, heartbeat: DEFAULT_HEARTBEAT, timeout: CONNECT_TIMEOUT, max_body: 16 << 20 }
    }
}

/// What kind of failure, for the agent's exit code and its advice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureClass {
    /// Nothing answered (refused, no route, timed out).
    Unreachable,
    /// The TLS handshake or certificate verification failed.
    Tls,
    /// The broker refused the login.
    Auth,
    /// The vhost does not exist or the user may not use it.
    Vhost,
    /// The broker refused an operation (declare, bind, publish) to this user.
    Permission,
    /// Another connection holds the resource (an exclusive queue of the same name).
    Locked,
    /// Anything else: a broken or hostile broker, a lost connection.
    Protocol,
}

/// Why a connection failed or ended.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach the broker at {broker}: {source}")]
    Connect { broker: String, source: std::io::Error },
    #[error("TLS with {broker} failed: {source}{hint}")]
    Tls { broker: String, source: rustls::Error, hint: &'static str },
    #[error("broker {broker}: {source}{hint}")]
    Session { broker: String, source: session::Error, hint: &'static str },
    #[error("broker {broker}: {source}")]
    Io { broker: String, source: std::io::Error },
    #[error("broker {broker} closed the connection{hint}")]
    Eof { broker: String, hint: &'static str },
    #[error("broker {broker} did not answer in time ({during})")]
    Timeout { broker: String, during: &'static str },
    #[error("broker {broker} stopped reading what we send for {:.1} s", .stalled.as_secs_f64())]
    Stalled { broker: String, stalled: Duration },
    #[error("stopped")]
    Stopped,
}

impl Error {
    pub fn class(&self) -> FailureClass {
        use session::{Error as S, Phase};
        match self {
            Error::Connect { .. } | Error::Timeout { .. } => FailureClass::Unreachable,
            Error::Tls { .. } => FailureClass::Tls,
            Error::Session { source, .. } => match source {
                S::ConnectionClosed { phase: Phase::Login, .. } | S::NoMechanism { .. } => FailureClass::Auth,
                S::ConnectionClosed { phase: Phase::Open, .. } => FailureClass::Vhost,
                S::ChannelClosed { close, .. } if close.code == 403 => FailureClass::Permission,
                S::ConnectionClosed { close, .. } if close.code == 403 => FailureClass::Permission,
                S::ChannelClosed { close, .. } if close.code == 405 => FailureClass::Locked,
                _ => FailureClass::Protocol,
            },
            _ => FailureClass::Protocol,
        }
    }

    /// The broker's reply code, when it refused something.
    pub fn reply_code(&self) -> Option<u16> {
        match self {
            Error::Session { source: session::Error::ChannelClosed { close, .. } | session::Error::ConnectionClosed { close, .. }, .. } => Some(close.code),
            _ => None,
        }
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
}

/// An event with its data copied out, for control paths that wait for one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Owned {
    Delivery { tag: u64, routing_key: String, user_id: Option<String>, content_type: Option<String>, correlation_id: Option<String>, body: Vec<u8> },
    Blocked,
    Unblocked,
    Cancelled,
}

/// One open connection.
pub struct Client {
    transport: Transport,
    session: Session,
    rbuf: Vec<u8>,
    rpos: usize,
    rlen: usize,
    /// The unsent tail of a published message (plain TCP; TLS keeps its own).
    backlog: Vec<u8>,
    w: Writer,
    stalled_since: Option<Instant>,
    /// `host:port`, for messages.
    broker: String,
    /// Events a blocking call read past while it waited for its answer.
    deferred: VecDeque<Owned>,
    /// The negotiated heartbeat (zero until tuned).
    heartbeat: Duration,
    /// The `user_id` every message is stamped with (the login user) unless the caller
    /// sets one: receivers trust what RabbitMQ checked.
    stamp: Option<String>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Client({})", self.broker)
    }
}

impl Client {
    /// Connects, logs in and opens channel 1, within the connection timeout; `stop` cuts
    /// it short.
    pub fn open(endpoint: &Endpoint, opts: &ConnectOptions, stop: &AtomicBool) -> Result<Client, Error> {
        let url = &endpoint.url;
        let broker = url.authority();
        let timeout = url.query.connection_timeout.unwrap_or(opts.timeout);
        let deadline = Instant::now() + timeout;
        let frame_max = [opts.frame_max, url.query.frame_max.filter(|&f| f != 0), Some(DEFAULT_FRAME_MAX)]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(DEFAULT_FRAME_MAX)
            .max(wire::FRAME_MIN_SIZE);
        let config = Config {
            mechanism: endpoint.mechanism(),
            username: url.username.clone().unwrap_or_else(|| "guest".into()),
            password: url.password().map(str::to_owned).unwrap_or_else(|| if url.username.is_none() { "guest".into() } else { String::new() }),
            vhost: url.vhost.clone(),
            connection_name: opts.name.clone(),
            frame_max,
            heartbeat: url.query.heartbeat.unwrap_or(opts.heartbeat),
            max_body: opts.max_body,
        };
        let sock = connect_tcp(&broker, deadline, stop).map_err(|source| {
            if stop.load(Ordering::Relaxed) {
                Error::Stopped
            } else {
                Error::Connect { broker: broker.clone(), source }
            }
        })?;
        let transport = Transport::new(sock, endpoint.tls.as_ref()).map_err(|e| transport_error(&broker, e, false))?;
        let mut client = Client {
            transport,
            session: Session::new(config, Instant::now()),
            rbuf: vec![0; 2 * (frame_max as usize + wire::FRAME_OVERHEAD)],
            rpos: 0,
            rlen: 0,
            backlog: Vec::new(),
            w: Writer::new(),
            stalled_since: None,
            broker,
            deferred: VecDeque::new(),
            heartbeat: Duration::ZERO,
            stamp: Some(endpoint.user()),
        };
        client.drive(deadline, stop, "logging in", |e| matches!(e, Event::Opened))?;
        client.heartbeat = client.session.heartbeat();
        client
            .transport
            .set_liveness(client.heartbeat, true)
            .map_err(|source| Error::Io { broker: client.broker.clone(), source })?;
        Ok(client)
    }

    /// `host:port` of the broker.
    pub fn broker(&self) -> &str {
        &self.broker
    }

    /// The `user_id` messages are stamped with (`None`: not stamped; for tests that play
    /// a client which does not say who it is).
    pub fn set_stamp(&mut self, user: Option<String>) {
        self.stamp = user;
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.transport.fd()
    }

    /// The negotiated heartbeat interval.
    pub fn heartbeat(&self) -> Duration {
        self.heartbeat
    }

    /// Whether the broker has blocked our publishes.
    pub fn blocked(&self) -> bool {
        self.session.blocked()
    }

    /// Whether bytes are waiting for the socket to take them (poll for writability).
    pub fn wants_write(&self) -> bool {
        self.backlogged() || !self.session.pending().is_empty()
    }

    /// Makes room up front for `bytes` of unsent data (the largest message this connection
    /// will publish), so that a full socket never grows the backlog on the hot path.
    /// Capacity not yet written costs address space, not resident memory.
    pub fn reserve_backlog(&mut self, bytes: usize) {
        self.backlog.reserve(bytes.saturating_sub(self.backlog.len()));
    }

    /// Whether a published message is still being written.
    pub fn backlogged(&self) -> bool {
        !self.backlog.is_empty() || self.transport.wants_write()
    }

    /// Bytes sent that the broker has not taken yet: the socket's unacknowledged bytes and
    /// our backlog.
    pub fn unsent(&self) -> usize {
        self.transport.unsent() + self.backlog.len()
    }

    /// Whether a whole frame may already be read and waiting (the caller should not sleep).
    pub fn has_buffered(&self) -> bool {
        let rest = &self.rbuf[self.rpos..self.rlen];
        rest.len() >= wire::FRAME_HEADER_LEN && {
            let size = u32::from_be_bytes([rest[3], rest[4], rest[5], rest[6]]) as usize;
            rest.len() >= size + wire::FRAME_OVERHEAD
        }
    }

    /// When [`Client::tick`] wants to run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let stall = self.stalled_since.map(|s| s + SEND_STALL);
        match (self.session.poll_timeout(), stall) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Heartbeats and the stall check.
    pub fn tick(&mut self, now: Instant) -> Result<(), Error> {
        self.session.handle_timeout(now).map_err(|e| self.session_error(e))?;
        if let Some(since) = self.stalled_since {
            if !self.session.blocked() && now.saturating_duration_since(since) >= SEND_STALL {
                return Err(Error::Stalled { broker: self.broker.clone(), stalled: now.saturating_duration_since(since) });
            }
        }
        self.flush(now)
    }

    /// Reads what has arrived (without waiting). Returns the bytes read.
    pub fn read_some(&mut self) -> Result<usize, Error> {
        if self.rpos == self.rlen {
            self.rpos = 0;
            self.rlen = 0;
        } else if self.rbuf.len() - self.rlen < self.session.frame_max() as usize + wire::FRAME_OVERHEAD {
            self.rbuf.copy_within(self.rpos..self.rlen, 0);
            self.rlen -= self.rpos;
            self.rpos = 0;
        }
        let n = self.transport.read(&mut self.rbuf[self.rlen..]).map_err(|e| transport_error(&self.broker, e, !self.session.is_open()))?;
        self.rlen += n;
        Ok(n)
    }

    /// The next event in what was read, if a whole one is there. Deliveries borrow the read
    /// buffer: handle them before reading again.
    pub fn next_event(&mut self, now: Instant) -> Result<Option<Event<'_>>, Error> {
        let broker = &self.broker;
        let opened = self.session.is_open();
        let h = match self.session.handle(now, &self.rbuf[self.rpos..self.rlen]) {
            Ok(h) => h,
            Err(e) => return Err(Error::Session { broker: broker.clone(), hint: hint_for(&e, !opened), source: e }),
        };
        self.rpos += h.consumed;
        match h.event {
            Some(Event::Blocked) => {
                tracing::warn!(broker = %broker, "the broker blocked publishing (a memory or disk alarm); dropping what we would send until it unblocks");
                let _ = self.transport.set_liveness(self.heartbeat, false);
            }
            Some(Event::Unblocked) => {
                tracing::info!(broker = %broker, "the broker unblocked publishing");
                let _ = self.transport.set_liveness(self.heartbeat, true);
            }
            _ => {}
        }
        Ok(h.event)
    }

    /// Acknowledges every delivery up to `tag` (queued; sent by the next flush).
    pub fn ack_multiple(&mut self, tag: u64) {
        self.session.ack_multiple(tag);
    }

    /// Sends the backlog, then queued control bytes, as far as the socket takes them now.
    pub fn flush(&mut self, now: Instant) -> Result<(), Error> {
        let mut progress = false;
        if !self.backlog.is_empty() {
            let n = self.transport.write(&[IoSlice::new(&self.backlog)]).map_err(|e| transport_error(&self.broker, e, false))?;
            self.backlog.drain(..n);
            progress |= n > 0;
        }
        if self.backlog.is_empty() && !self.session.pending().is_empty() {
            let n = self.transport.write(&[IoSlice::new(self.session.pending())]).map_err(|e| transport_error(&self.broker, e, false))?;
            self.session.sent(n, now);
            progress |= n > 0;
        }
        let before = self.transport.wants_write();
        self.transport.flush().map_err(|e| transport_error(&self.broker, e, false))?;
        progress |= before && !self.transport.wants_write();
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
    /// backlog. No allocation once the writer and backlog have grown.
    pub fn publish(&mut self, now: Instant, exchange: &str, key: &str, props: &Properties<'_>, body: &[u8]) -> Result<Published, Error> {
        if self.session.blocked() {
            return Ok(Published::Blocked);
        }
        self.flush(now)?;
        if self.backlogged() || !self.session.pending().is_empty() {
            return Ok(Published::Busy);
        }
        let props = Properties { user_id: props.user_id.or(self.stamp.as_deref()), ..*props };
        let prefix = self.session.publish_frames(&mut self.w, exchange, key, &props, body);
        let frame_max = self.session.frame_max();
        let frames = wire::body_frames(body.len(), frame_max);
        let mut first = 0;
        while first < frames {
            let mut iov = [IoSlice::new(&[]); 2 * IOV_FRAMES + 1];
            let (n, next) = wire::publish_iov(&self.w.buf, prefix, body, frame_max, first, &mut iov);
            let total: usize = iov[..n].iter().map(|s| s.len()).sum();
            let written = self.transport.write(&iov[..n]).map_err(|e| transport_error(&self.broker, e, false))?;
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
        self.session.note_sent(now);
        Ok(Published::Sent)
    }

    // -----------------------------------------------------------------------------------
    // Blocking helpers for set-up and control paths.

    /// Waits up to `timeout` for the backlog to drain; returns whether it did.
    pub fn wait_writable(&mut self, timeout: Duration) -> Result<bool, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            self.flush(Instant::now())?;
            if !self.wants_write() {
                return Ok(true);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.session.blocked() {
                return Ok(false);
            }
            sys::wait([Some((self.fd(), Interest::Write))], left.min(STOP_POLL)).map_err(|source| Error::Io { broker: self.broker.clone(), source })?;
        }
    }

    /// Runs until `done` accepts an event, or fails at `deadline` or on `stop`.
    fn drive(&mut self, deadline: Instant, stop: &AtomicBool, during: &'static str, mut done: impl FnMut(&Event<'_>) -> bool) -> Result<Vec<u8>, Error> {
        loop {
            let now = Instant::now();
            self.flush(now)?;
            loop {
                let reply = match self.next_event(now)? {
                    None => break,
                    Some(e) if done(&e) => Some(match e {
                        Event::Reply { args, .. } => args.to_vec(),
                        _ => Vec::new(),
                    }),
                    Some(e) => {
                        if let Some(o) = owned(e) {
                            self.deferred.push_back(o);
                        }
                        None
                    }
                };
                if let Some(r) = reply {
                    self.flush(now)?;
                    return Ok(r);
                }
            }
            if stop.load(Ordering::Relaxed) {
                return Err(Error::Stopped);
            }
            if now >= deadline {
                return Err(Error::Timeout { broker: self.broker.clone(), during });
            }
            let wait = deadline.saturating_duration_since(now).min(STOP_POLL);
            let interest = if self.wants_write() { Interest::ReadWrite } else { Interest::Read };
            let _ = sys::wait([Some((self.fd(), interest))], wait).map_err(|source| Error::Io { broker: self.broker.clone(), source })?;
            self.read_some()?;
            self.session.handle_timeout(Instant::now()).map_err(|e| self.session_error(e))?;
        }
    }

    /// Sends a synchronous method (`ask` queues it) and waits for its answer; returns the
    /// answer's arguments.
    pub fn call(&mut self, ask: impl FnOnce(&mut Session), stop: &AtomicBool) -> Result<Vec<u8>, Error> {
        ask(&mut self.session);
        let Some(wanted) = self.session.awaiting() else { return Ok(Vec::new()) };
        let during = match wanted {
            wire::method::EXCHANGE_DECLARE => "declaring the exchange",
            wire::method::QUEUE_DECLARE => "declaring a queue",
            wire::method::QUEUE_BIND => "binding a queue",
            wire::method::QUEUE_UNBIND => "unbinding a queue",
            wire::method::BASIC_QOS => "setting the prefetch",
            wire::method::BASIC_CONSUME => "starting to consume",
            _ => "waiting for an answer",
        };
        self.drive(Instant::now() + CALL_TIMEOUT, stop, during, |e| matches!(e, Event::Reply { .. }))
    }

    pub fn exchange_declare_with(&mut self, name: &str, options: ExchangeOptions, stop: &AtomicBool) -> Result<(), Error> {
        self.call(|s| s.exchange_declare(name, options), stop).map(drop)
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

    pub fn queue_unbind(&mut self, queue: &str, exchange: &str, key: &str, stop: &AtomicBool) -> Result<(), Error> {
        self.call(|s| s.queue_unbind(queue, exchange, key), stop).map(drop)
    }

    pub fn basic_qos(&mut self, prefetch: u16, stop: &AtomicBool) -> Result<(), Error> {
        self.call(|s| s.basic_qos(prefetch), stop).map(drop)
    }

    pub fn basic_consume(&mut self, queue: &str, tag: &str, no_ack: bool, exclusive: bool, stop: &AtomicBool) -> Result<(), Error> {
        self.call(|s| s.basic_consume(queue, tag, no_ack, exclusive), stop).map(drop)
    }

    /// Publishes a control message (copied into the session's queue), then sends.
    pub fn publish_copy(&mut self, exchange: &str, key: &str, props: &Properties<'_>, body: &[u8]) -> Result<Published, Error> {
        if self.session.blocked() {
            return Ok(Published::Blocked);
        }
        let props = Properties { user_id: props.user_id.or(self.stamp.as_deref()), ..*props };
        self.session.publish_copy(exchange, key, &props, body);
        self.flush(Instant::now())?;
        Ok(Published::Sent)
    }

    /// Waits up to `timeout` for the next delivery or notice; `None` when none came.
    pub fn wait_event(&mut self, timeout: Duration, stop: &AtomicBool) -> Result<Option<Owned>, Error> {
        if let Some(e) = self.deferred.pop_front() {
            return Ok(Some(e));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let now = Instant::now();
            loop {
                match self.next_event(now)? {
                    None => break,
                    Some(e) => {
                        if let Some(o) = owned(e) {
                            return Ok(Some(o));
                        }
                    }
                }
            }
            self.tick(now)?;
            if stop.load(Ordering::Relaxed) || now >= deadline {
                return Ok(None);
            }
            let mut wait = deadline.saturating_duration_since(now).min(STOP_POLL);
            if let Some(t) = self.poll_timeout() {
                wait = wait.min(t.saturating_duration_since(now));
            }
            let interest = if self.wants_write() { Interest::ReadWrite } else { Interest::Read };
            sys::wait([Some((self.fd(), interest))], wait).map_err(|source| Error::Io { broker: self.broker.clone(), source })?;
            self.read_some()?;
        }
    }

    /// Closes the connection, waiting up to `wait` for the broker to confirm (its exclusive
    /// queues go with it).
    pub fn close(mut self, wait: Duration) {
        self.session.close(200, "bye");
        let never = AtomicBool::new(false);
        let _ = self.drive(Instant::now() + wait, &never, "closing", |e| matches!(e, Event::Closed));
    }

    fn session_error(&self, e: session::Error) -> Error {
        Error::Session { broker: self.broker.clone(), hint: hint_for(&e, !self.session.is_open()), source: e }
    }
}

/// Makes sure `exchange` exists on the connection `open` makes: a passive declare first
/// (a provisioned session's exchange exists, and its users may not declare it), else an
/// agent's own transient, auto-delete one on a fresh connection (a 404 closes the channel).
/// Predeclared `amq.*` exchanges are left alone.
pub fn with_exchange(exchange: &str, stop: &AtomicBool, mut open: impl FnMut() -> Result<Client, Error>) -> Result<Client, Error> {
    let mut c = open()?;
    if exchange.starts_with("amq.") {
        return Ok(c);
    }
    match c.exchange_declare_with(exchange, ExchangeOptions { passive: true, ..ExchangeOptions::default() }, stop) {
        Ok(()) => Ok(c),
        Err(e) if e.reply_code() == Some(404) => {
            let mut c = open()?;
            c.exchange_declare_with(exchange, ExchangeOptions::default(), stop)?;
            Ok(c)
        }
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

/// Advice for an error; `handshaking`: before the session was open.
fn hint_for(e: &session::Error, handshaking: bool) -> &'static str {
    use session::{Error as S, Phase};
    match e {
        S::ConnectionClosed { phase: Phase::Login, .. } => " (check the user name and password in the URL, or the client certificate)",
        S::ConnectionClosed { phase: Phase::Open, .. } => " (check the vhost in the URL, and that the user has permissions on it)",
        S::NoMechanism { .. } => " (EXTERNAL needs RabbitMQ's rabbitmq_auth_mechanism_ssl plugin)",
        S::Frame(_) if handshaking => " (is this a TLS port? use amqps://)",
        _ => "",
    }
}

fn transport_error(broker: &str, e: TransportError, handshaking: bool) -> Error {
    let broker = broker.to_owned();
    match e {
        TransportError::Tls(source) => {
            let hint = match &source {
                rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => " (is this a TLS port? plain AMQP uses amqp://, usually port 5672)",
                rustls::Error::InvalidCertificate(_) => " (give --tls-ca with the CA that signed the broker's certificate, and check that the URL's host is the name in it)",
                rustls::Error::AlertReceived(_) => " (the broker refused our TLS handshake: does it want a client certificate, --tls-cert/--tls-key?)",
                _ => "",
            };
            Error::Tls { broker, source, hint }
        }
        TransportError::Io(source) => Error::Io { broker, source },
        TransportError::Eof => Error::Eof { broker, hint: if handshaking { " during the handshake (a TLS port? use amqps://; or too many connections)" } else { "" } },
    }
}
