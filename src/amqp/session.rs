//! The AMQP 0-9-1 session of one connection, without I/O: bytes and the time in, events and
//! bytes out, in the manner of quinn-proto's `Connection`.
//!
//! [`Session`] owns the protocol: the handshake (start, login by PLAIN or EXTERNAL, tune
//! with its limits checked, open, channel 1), the synchronous methods a client asks for
//! (declare, bind, qos, consume: one at a time, each answered by [`Event::Reply`]),
//! heartbeats (sent when we have been quiet for half the interval, and the connection
//! declared dead when nothing has arrived for two), content reassembly (`basic.deliver`,
//! its header, its body frames, checked against each other), acknowledgements,
//! `connection.blocked`/`unblocked`, and both directions of close. It never touches a
//! socket or reads a clock: the transport ([`super::client`]) feeds it what it read with
//! [`Session::handle`], sends what [`Session::pending`] holds, and wakes it at
//! [`Session::poll_timeout`].
//!
//! On the hot path (a queue worker's receiving half) a delivery whose body fits one frame
//! is handed out as a slice of the caller's read buffer: nothing is copied. Larger bodies
//! are gathered in one buffer that is reused. Publishing writes its frames with
//! [`wire::publish_frames`] into the caller's writer (the body is never copied); acks go
//! into [`Session::pending`], which is reused. No allocation in steady state.
//!
//! Everything that arrives is checked before use; a broker that sends what the protocol
//! does not allow (frames over the negotiated size, a body before its header, a body
//! longer than announced, `frame_max` under 4096, a frame on a channel we did not open)
//! gets an [`Error`], which ends the connection. Nothing here panics on any input.

use std::fmt;
use std::time::{Duration, Instant};

use super::url::Mechanism;
use super::wire::{self, method, Args, Close, ContentHeader, Deliver, Frame, Properties, Tune, Value, Writer, FRAME_MIN_SIZE};

/// The one channel a session opens.
pub const CHANNEL: u16 = 1;

/// What a session is opened with.
#[derive(Clone, Debug)]
pub struct Config {
    pub mechanism: Mechanism,
    pub username: String,
    pub password: String,
    pub vhost: String,
    /// Shown in the broker's management view.
    pub connection_name: String,
    /// Largest frame we want (the broker may lower it); at least 4096.
    pub frame_max: u32,
    /// Heartbeat interval we ask for; zero turns heartbeats off. The broker's proposal
    /// lowers it when both are set.
    pub heartbeat: Duration,
    /// Largest message body gathered; larger ones are skipped ([`Event::Oversized`]).
    pub max_body: usize,
}

/// Where in its life a session was when the broker closed it: the same code means
/// different things at login and later.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// After our `start-ok`, before `tune`: a refusal here is a login refusal.
    Login,
    /// After `connection.open`: a refusal here is about the vhost.
    Open,
    /// Opening channel 1.
    Channel,
    /// In use.
    Running,
}

/// Why a session ended. Every variant ends the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// A frame we cannot read (out of step, too large, truncated arguments).
    Frame(wire::Error),
    /// The broker's `connection.tune` allows frames smaller than AMQP's minimum.
    FrameMaxTooSmall(u32),
    /// The broker offers no login mechanism we can use.
    NoMechanism { offered: String, wanted: Mechanism },
    /// The broker closed the connection.
    ConnectionClosed { close: Close, phase: Phase },
    /// The broker closed channel 1 (a refused declare, bind or publish).
    ChannelClosed { close: Close, method: (u16, u16) },
    /// Nothing arrived for two heartbeat intervals.
    HeartbeatTimeout(Duration),
    /// A frame the protocol does not allow at this point.
    Unexpected { what: &'static str, kind: u8, method: Option<(u16, u16)> },
    /// A frame on a channel we did not open.
    WrongChannel(u16),
    /// Body frames longer than the header announced.
    BodyOverrun { announced: u64, got: u64 },
    /// We closed it.
    Closed,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Frame(e) => write!(f, "{e}"),
            Error::FrameMaxTooSmall(n) => write!(f, "the broker offers frame_max {n}, below AMQP's minimum of {FRAME_MIN_SIZE}"),
            Error::NoMechanism { offered, wanted } => write!(f, "the broker offers login by {offered}, not {}", wanted.name()),
            Error::ConnectionClosed { close, phase } => match phase {
                Phase::Login => write!(f, "the broker refused the login: {close}"),
                Phase::Open => write!(f, "the broker refused the vhost: {close}"),
                _ => write!(f, "the broker closed the connection: {close}"),
            },
            Error::ChannelClosed { close, method } => write!(f, "the broker refused {}: {close}", method_name(*method)),
            Error::HeartbeatTimeout(d) => write!(f, "nothing heard from the broker for {:.1} s (two heartbeat intervals)", d.as_secs_f64()),
            Error::Unexpected { what, kind, method } => match method {
                Some(m) => write!(f, "the broker sent {} while {what}", method_name(*m)),
                None => write!(f, "the broker sent a frame of type {kind} while {what}"),
            },
            Error::WrongChannel(c) => write!(f, "the broker sent a frame on channel {c}, which is not open"),
            Error::BodyOverrun { announced, got } => write!(f, "the broker sent {got} body bytes for a message of {announced}"),
            Error::Closed => write!(f, "connection closed"),
        }
    }
}

impl std::error::Error for Error {}

impl From<wire::Error> for Error {
    fn from(e: wire::Error) -> Error {
        Error::Frame(e)
    }
}

/// A method's name for messages.
pub fn method_name(m: (u16, u16)) -> String {
    let name = match m {
        method::CONNECTION_START => "connection.start",
        method::CONNECTION_SECURE => "connection.secure",
        method::CONNECTION_TUNE => "connection.tune",
        method::CONNECTION_OPEN => "connection.open",
        method::CONNECTION_OPEN_OK => "connection.open-ok",
        method::CONNECTION_CLOSE => "connection.close",
        method::CHANNEL_OPEN => "channel.open",
        method::EXCHANGE_DECLARE => "exchange.declare",
        method::QUEUE_DECLARE => "queue.declare",
        method::QUEUE_BIND => "queue.bind",
        method::QUEUE_UNBIND => "queue.unbind",
        method::QUEUE_DELETE => "queue.delete",
        method::BASIC_QOS => "basic.qos",
        method::BASIC_CONSUME => "basic.consume",
        method::BASIC_PUBLISH => "basic.publish",
        method::BASIC_ACK => "basic.ack",
        method::BASIC_DELIVER => "basic.deliver",
        _ => return format!("method {}.{}", m.0, m.1),
    };
    name.to_owned()
}

/// A whole message that arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivery<'a> {
    pub tag: u64,
    pub routing_key: &'a [u8],
    /// The publisher's `user_id` property (validated by RabbitMQ), if it set one.
    pub user_id: Option<&'a [u8]>,
    /// The `content_type` property, if set.
    pub content_type: Option<&'a [u8]>,
    /// The `correlation_id` property, if set.
    pub correlation_id: Option<&'a [u8]>,
    pub body: &'a [u8],
}

/// What the broker told us.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// Connection and channel are open: methods can be sent.
    Opened,
    /// The answer to the synchronous method asked for: its identifier and arguments.
    Reply { method: (u16, u16), args: &'a [u8] },
    /// A message.
    Delivery(Delivery<'a>),
    /// A message larger than [`Config::max_body`], skipped; it still wants its ack.
    Oversized { tag: u64 },
    /// The broker stopped reading our publishes (a resource alarm).
    Blocked,
    /// It reads them again.
    Unblocked,
    /// The broker cancelled our consumer (its queue was deleted, or the node went away).
    Cancelled,
    /// Our close was confirmed.
    Closed,
}

/// What [`Session::handle`] did with the bytes it was given.
#[derive(Debug)]
pub struct Handled<'a> {
    /// Bytes used; the caller drops them from its buffer.
    pub consumed: usize,
    /// What happened, if anything. `None` with `consumed` short of the input means a frame
    /// is incomplete: read more.
    pub event: Option<Event<'a>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    AwaitStart,
    AwaitTune,
    AwaitOpenOk,
    AwaitChannelOpenOk,
    Open,
    Closing,
    Closed,
}

/// A message being received on channel 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Incoming {
    Idle,
    /// `basic.deliver` (or, with `discard`, a `basic.return`) seen; the header is due.
    Method {
        tag: u64,
        discard: bool,
    },
    /// The header seen; `received` of `size` body bytes so far (gathered unless `discard`).
    Body {
        tag: u64,
        size: u64,
        received: u64,
        discard: bool,
        oversized: bool,
    },
}

/// One AMQP connection's protocol state.
pub struct Session {
    config: Config,
    state: State,
    frame_max: u32,
    heartbeat: Duration,
    last_rx: Instant,
    last_tx: Instant,
    /// Bytes to send, in order (handshake, methods, acks, heartbeats, close).
    out: Writer,
    /// The synchronous method whose answer is due.
    awaiting: Option<(u16, u16)>,
    incoming: Incoming,
    key: [u8; 255],
    key_len: u8,
    user_id: ShortStr,
    content_type: ShortStr,
    correlation_id: ShortStr,
    gather: Vec<u8>,
    blocked: bool,
}

impl Session {
    /// A session about to start: the protocol header is the first thing [`Session::pending`]
    /// holds.
    pub fn new(config: Config, now: Instant) -> Session {
        let frame_max = config.frame_max.max(FRAME_MIN_SIZE);
        let mut out = Writer::new();
        out.buf.extend_from_slice(wire::PROTOCOL_HEADER);
        Session {
            config,
            state: State::AwaitStart,
            frame_max,
            heartbeat: Duration::ZERO,
            last_rx: now,
            last_tx: now,
            out,
            awaiting: None,
            incoming: Incoming::Idle,
            key: [0; 255],
            key_len: 0,
            user_id: ShortStr::default(),
            content_type: ShortStr::default(),
            correlation_id: ShortStr::default(),
            gather: Vec::new(),
            blocked: false,
        }
    }

    /// Whether the connection and channel are open.
    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    /// The negotiated largest frame.
    pub fn frame_max(&self) -> u32 {
        self.frame_max
    }

    /// The negotiated heartbeat interval (zero: off).
    pub fn heartbeat(&self) -> Duration {
        self.heartbeat
    }

    /// Whether the broker has blocked our publishes (`connection.blocked`).
    pub fn blocked(&self) -> bool {
        self.blocked
    }

    /// Whether a synchronous method's answer is still due.
    pub fn awaiting(&self) -> Option<(u16, u16)> {
        self.awaiting
    }

    /// Bytes waiting to be sent.
    pub fn pending(&self) -> &[u8] {
        &self.out.buf
    }

    /// `n` bytes of [`Session::pending`] were sent.
    pub fn sent(&mut self, n: usize, now: Instant) {
        let n = n.min(self.out.buf.len());
        if n > 0 {
            self.out.buf.drain(..n);
            self.last_tx = now;
        }
    }

    /// Something was sent past [`Session::pending`] (a published message): no heartbeat
    /// is due for a while.
    pub fn note_sent(&mut self, now: Instant) {
        self.last_tx = now;
    }

    /// When [`Session::handle_timeout`] wants to run next (heartbeats), if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.heartbeat.is_zero() || !matches!(self.state, State::Open | State::Closing) {
            return None;
        }
        Some((self.last_tx + self.heartbeat / 2).min(self.last_rx + self.heartbeat * 2))
    }

    /// Time has passed: queue a heartbeat when we have been quiet for half the interval,
    /// and fail when the broker has been silent for two.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), Error> {
        if self.heartbeat.is_zero() || !matches!(self.state, State::Open | State::Closing) {
            return Ok(());
        }
        if now.saturating_duration_since(self.last_rx) >= self.heartbeat * 2 {
            return Err(Error::HeartbeatTimeout(now.saturating_duration_since(self.last_rx)));
        }
        if now.saturating_duration_since(self.last_tx) >= self.heartbeat / 2 && self.out.buf.is_empty() {
            self.out.begin_frame(wire::FRAME_HEARTBEAT, 0).end_frame();
        }
        Ok(())
    }

    /// Takes what was read: parses whole frames from the start of `input` until one of them
    /// is an [`Event`] or no whole frame is left.
    pub fn handle<'a>(&'a mut self, now: Instant, input: &'a [u8]) -> Result<Handled<'a>, Error> {
        let mut at = 0;
        loop {
            // Before tune, our own limit (RabbitMQ's connection.start is a few hundred bytes).
            let Some((frame, n)) = wire::parse_frame(&input[at..], self.frame_max)? else {
                return Ok(Handled { consumed: at, event: None });
            };
            at += n;
            self.last_rx = now;
            match self.on_frame(frame)? {
                Step::Continue => {}
                Step::Event(e) => return Ok(Handled { consumed: at, event: Some(e.into_event()) }),
                Step::Reply(m) => {
                    let args = frame.payload.get(4..).unwrap_or(&[]);
                    return Ok(Handled { consumed: at, event: Some(Event::Reply { method: m, args }) });
                }
                Step::BodyInPlace(tag) => {
                    let delivery = Delivery {
                        tag,
                        routing_key: &self.key[..usize::from(self.key_len)],
                        user_id: self.user_id.get(),
                        content_type: self.content_type.get(),
                        correlation_id: self.correlation_id.get(),
                        body: frame.payload,
                    };
                    return Ok(Handled { consumed: at, event: Some(Event::Delivery(delivery)) });
                }
                Step::BodyGathered(tag) => {
                    let delivery = Delivery {
                        tag,
                        routing_key: &self.key[..usize::from(self.key_len)],
                        user_id: self.user_id.get(),
                        content_type: self.content_type.get(),
                        correlation_id: self.correlation_id.get(),
                        body: &self.gather,
                    };
                    return Ok(Handled { consumed: at, event: Some(Event::Delivery(delivery)) });
                }
            }
        }
    }

    fn on_frame(&mut self, frame: Frame<'_>) -> Result<Step, Error> {
        match (frame.kind, frame.channel) {
            (wire::FRAME_HEARTBEAT, 0) => Ok(Step::Continue),
            (wire::FRAME_HEARTBEAT, c) => Err(Error::WrongChannel(c)),
            (wire::FRAME_METHOD, 0) => {
                let (m, args) = wire::method_of(frame.payload)?;
                self.on_connection_method(m, args)
            }
            (_, 0) => Err(Error::Unexpected { what: "speaking on channel 0", kind: frame.kind, method: None }),
            (_, CHANNEL) if matches!(self.state, State::AwaitChannelOpenOk | State::Open | State::Closing) => self.on_channel_frame(frame),
            (_, c) => Err(Error::WrongChannel(c)),
        }
    }

    fn on_connection_method(&mut self, m: (u16, u16), args: Args<'_>) -> Result<Step, Error> {
        if m == method::CONNECTION_CLOSE {
            let close = Close::parse(args)?;
            self.queue_method(0, method::CONNECTION_CLOSE_OK, |_| {});
            let phase = match self.state {
                State::AwaitStart | State::AwaitTune => Phase::Login,
                State::AwaitOpenOk => Phase::Open,
                State::AwaitChannelOpenOk => Phase::Channel,
                _ => Phase::Running,
            };
            self.state = State::Closed;
            return Err(Error::ConnectionClosed { close, phase });
        }
        match (self.state, m) {
            (State::AwaitStart, method::CONNECTION_START) => {
                self.on_start(args)?;
                self.state = State::AwaitTune;
                Ok(Step::Continue)
            }
            (State::AwaitTune, method::CONNECTION_TUNE) => {
                self.on_tune(Tune::parse(args)?)?;
                self.state = State::AwaitOpenOk;
                Ok(Step::Continue)
            }
            (State::AwaitOpenOk, method::CONNECTION_OPEN_OK) => {
                self.queue_method(CHANNEL, method::CHANNEL_OPEN, |w| {
                    w.shortstr(b"");
                });
                self.state = State::AwaitChannelOpenOk;
                Ok(Step::Continue)
            }
            (State::Open | State::Closing, method::CONNECTION_BLOCKED) => {
                self.blocked = true;
                Ok(Step::Event(Ev::Blocked))
            }
            (State::Open | State::Closing, method::CONNECTION_UNBLOCKED) => {
                self.blocked = false;
                Ok(Step::Event(Ev::Unblocked))
            }
            (State::Closing, method::CONNECTION_CLOSE_OK) => {
                self.state = State::Closed;
                Ok(Step::Event(Ev::Closed))
            }
            (state, m) => Err(Error::Unexpected { what: state.doing(), kind: wire::FRAME_METHOD, method: Some(m) }),
        }
    }

    fn on_start(&mut self, mut a: Args<'_>) -> Result<(), Error> {
        let (_major, _minor) = (a.octet()?, a.octet()?);
        let _server_properties = a.longstr()?;
        let offered = String::from_utf8_lossy(a.longstr()?).into_owned();
        let wanted = self.config.mechanism;
        if !offered.split(' ').any(|m| m == wanted.name()) {
            return Err(Error::NoMechanism { offered, wanted });
        }
        let mut response = Vec::new();
        if wanted == Mechanism::Plain {
            response.push(0);
            response.extend_from_slice(self.config.username.as_bytes());
            response.push(0);
            response.extend_from_slice(self.config.password.as_bytes());
        }
        let name = self.config.connection_name.clone();
        self.queue_method(0, method::CONNECTION_START_OK, |w| {
            w.table(&[
                ("product", Value::Str("tunbus")),
                ("version", Value::Str(env!("CARGO_PKG_VERSION"))),
                ("platform", Value::Str("Rust")),
                ("connection_name", Value::Str(&name)),
                (
                    "capabilities",
                    Value::Table(&[
                        ("authentication_failure_close", Value::Bool(true)),
                        ("connection.blocked", Value::Bool(true)),
                        ("consumer_cancel_notify", Value::Bool(true)),
                    ]),
                ),
            ])
            .shortstr(wanted.name().as_bytes())
            .longstr(&response)
            .shortstr(b"en_US");
        });
        Ok(())
    }

    fn on_tune(&mut self, tune: Tune) -> Result<(), Error> {
        if tune.frame_max != 0 && tune.frame_max < FRAME_MIN_SIZE {
            return Err(Error::FrameMaxTooSmall(tune.frame_max));
        }
        if tune.frame_max != 0 {
            self.frame_max = self.frame_max.min(tune.frame_max);
        }
        let ours = self.config.heartbeat.as_secs().min(u64::from(u16::MAX)) as u16;
        let heartbeat = match (ours, tune.heartbeat) {
            (0, _) => 0,
            (o, 0) => o,
            (o, t) => o.min(t),
        };
        self.heartbeat = Duration::from_secs(u64::from(heartbeat));
        let (frame_max, vhost) = (self.frame_max, self.config.vhost.clone());
        let channel_max = if tune.channel_max == 0 { 16 } else { tune.channel_max.min(16) };
        self.queue_method(0, method::CONNECTION_TUNE_OK, |w| {
            w.short(channel_max).long(frame_max).short(heartbeat);
        });
        self.queue_method(0, method::CONNECTION_OPEN, |w| {
            w.shortstr(vhost.as_bytes()).shortstr(b"").bit(false);
        });
        Ok(())
    }

    fn on_channel_frame(&mut self, frame: Frame<'_>) -> Result<Step, Error> {
        match frame.kind {
            wire::FRAME_METHOD => {
                let (m, args) = wire::method_of(frame.payload)?;
                if !matches!(self.incoming, Incoming::Idle) {
                    return Err(Error::Unexpected { what: "a message's content was incomplete", kind: frame.kind, method: Some(m) });
                }
                self.on_channel_method(m, args)
            }
            wire::FRAME_HEADER => {
                let Incoming::Method { tag, discard } = self.incoming else {
                    return Err(Error::Unexpected { what: "no message was announced", kind: frame.kind, method: None });
                };
                let h = ContentHeader::parse(frame.payload)?;
                self.user_id.set(h.user_id);
                self.content_type.set(h.content_type);
                self.correlation_id.set(h.correlation_id);
                let oversized = h.body_size > self.config.max_body as u64;
                self.gather.clear();
                if h.body_size == 0 {
                    self.incoming = Incoming::Idle;
                    return Ok(finished(tag, discard, oversized, false)); // the (empty) gather buffer
                }
                self.incoming = Incoming::Body { tag, size: h.body_size, received: 0, discard, oversized };
                Ok(Step::Continue)
            }
            wire::FRAME_BODY => {
                let Incoming::Body { tag, size, received, discard, oversized } = self.incoming else {
                    return Err(Error::Unexpected { what: "no content header had come", kind: frame.kind, method: None });
                };
                let got = received + frame.payload.len() as u64;
                if got > size {
                    return Err(Error::BodyOverrun { announced: size, got });
                }
                let whole_in_one = received == 0 && got == size;
                if !(discard || oversized || whole_in_one) {
                    self.gather.extend_from_slice(frame.payload);
                }
                if got < size {
                    self.incoming = Incoming::Body { tag, size, received: got, discard, oversized };
                    return Ok(Step::Continue);
                }
                self.incoming = Incoming::Idle;
                Ok(finished(tag, discard, oversized, whole_in_one))
            }
            other => Err(Error::Unexpected { what: "on channel 1", kind: other, method: None }),
        }
    }

    fn on_channel_method(&mut self, m: (u16, u16), args: Args<'_>) -> Result<Step, Error> {
        match (self.state, m) {
            (State::AwaitChannelOpenOk, method::CHANNEL_OPEN_OK) => {
                self.state = State::Open;
                Ok(Step::Event(Ev::Opened))
            }
            (_, method::CHANNEL_CLOSE) => {
                let close = Close::parse(args.clone())?;
                let mut a = args;
                let _ = (a.short(), a.shortstr());
                let failed = (a.short().unwrap_or(0), a.short().unwrap_or(0));
                self.queue_method(CHANNEL, method::CHANNEL_CLOSE_OK, |_| {});
                self.state = State::Closed;
                let method = if failed == (0, 0) { self.awaiting.unwrap_or((0, 0)) } else { failed };
                Err(Error::ChannelClosed { close, method })
            }
            (State::Open | State::Closing, method::BASIC_DELIVER) => {
                let d = Deliver::parse(args)?;
                self.key[..d.routing_key.len()].copy_from_slice(d.routing_key); // a short string
                self.key_len = d.routing_key.len() as u8;
                self.incoming = Incoming::Method { tag: d.delivery_tag, discard: false };
                Ok(Step::Continue)
            }
            (State::Open | State::Closing, method::BASIC_RETURN) => {
                self.incoming = Incoming::Method { tag: 0, discard: true };
                Ok(Step::Continue)
            }
            (State::Open | State::Closing, method::BASIC_CANCEL) => Ok(Step::Event(Ev::Cancelled)),
            (State::Open | State::Closing, reply) if self.awaiting.is_some_and(|a| reply_of(a) == Some(reply)) => {
                self.awaiting = None;
                Ok(Step::Reply(reply))
            }
            (state, m) => Err(Error::Unexpected { what: state.doing(), kind: wire::FRAME_METHOD, method: Some(m) }),
        }
    }

    fn queue_method(&mut self, channel: u16, id: (u16, u16), args: impl FnOnce(&mut Writer)) {
        self.out.method(channel, id, args);
    }

    fn ask(&mut self, id: (u16, u16), args: impl FnOnce(&mut Writer)) {
        self.awaiting = Some(id);
        self.queue_method(CHANNEL, id, args);
    }

    // -----------------------------------------------------------------------------------
    // What a client asks for. Each synchronous one is answered by `Event::Reply`.

    /// `exchange.declare` of a topic exchange.
    pub fn exchange_declare(&mut self, name: &str, o: ExchangeOptions) {
        self.ask(method::EXCHANGE_DECLARE, |w| {
            w.short(0).shortstr(name.as_bytes()).shortstr(b"topic");
            w.bit(o.passive).bit(o.durable).bit(o.auto_delete).bit(false).bit(false); // …, internal, nowait
            w.table(&[]);
        });
    }

    /// `queue.declare`. An empty name asks the broker for one (the reply's first argument).
    pub fn queue_declare(&mut self, name: &str, options: QueueOptions, args: &[(&str, Value<'_>)]) {
        self.ask(method::QUEUE_DECLARE, |w| {
            w.short(0).shortstr(name.as_bytes());
            w.bit(options.passive).bit(false).bit(options.exclusive).bit(options.auto_delete).bit(false);
            w.table(args);
        });
    }

    /// `queue.declare` of a durable queue (quorum and stream queues must be).
    pub fn queue_declare_durable(&mut self, name: &str, args: &[(&str, Value<'_>)]) {
        self.ask(method::QUEUE_DECLARE, |w| {
            w.short(0).shortstr(name.as_bytes());
            w.bit(false).bit(true).bit(false).bit(false).bit(false); // passive, durable, exclusive, auto-delete, nowait
            w.table(args);
        });
    }

    pub fn queue_bind(&mut self, queue: &str, exchange: &str, key: &str) {
        self.ask(method::QUEUE_BIND, |w| {
            w.short(0).shortstr(queue.as_bytes()).shortstr(exchange.as_bytes()).shortstr(key.as_bytes()).bit(false).table(&[]);
        });
    }

    /// `queue.bind` with `nowait`: no answer comes (a refusal closes the channel, which the
    /// next synchronous method's answer then reports). Many bindings cost one round trip.
    pub fn queue_bind_nowait(&mut self, queue: &str, exchange: &str, key: &str) {
        self.queue_method(CHANNEL, method::QUEUE_BIND, |w| {
            w.short(0).shortstr(queue.as_bytes()).shortstr(exchange.as_bytes()).shortstr(key.as_bytes()).bit(true).table(&[]);
        });
    }

    /// `queue.declare` with `passive`: whether the queue exists (a barrier after methods sent
    /// without waiting: its answer comes after theirs).
    pub fn queue_check(&mut self, name: &str) {
        self.queue_declare(name, QueueOptions { passive: true, ..QueueOptions::default() }, &[]);
    }

    pub fn queue_delete(&mut self, queue: &str) {
        self.ask(method::QUEUE_DELETE, |w| {
            w.short(0).shortstr(queue.as_bytes()).bit(false).bit(false).bit(false);
        });
    }

    pub fn basic_qos(&mut self, prefetch: u16) {
        self.ask(method::BASIC_QOS, |w| {
            w.long(0).short(prefetch).bit(false);
        });
    }

    /// `basic.consume`; `no_ack` for control queues whose messages need no acknowledgement.
    pub fn basic_consume(&mut self, queue: &str, tag: &str, no_ack: bool, exclusive: bool) {
        self.ask(method::BASIC_CONSUME, |w| {
            w.short(0).shortstr(queue.as_bytes()).shortstr(tag.as_bytes());
            w.bit(false).bit(no_ack).bit(exclusive).bit(false); // no-local, no-ack, exclusive, nowait
            w.table(&[]);
        });
    }

    /// Renews consumer `tag` of `queue` with another prefetch without a pause: in one write,
    /// `basic.cancel` and `basic.consume` without waiting around a `basic.qos` (answered by
    /// [`Event::Reply`]; a consumer's prefetch is fixed when it is made). Deliveries to the
    /// old consumer still arrive first and are acknowledged as any other; nothing is requeued.
    pub fn reconsume(&mut self, queue: &str, tag: &str, no_ack: bool, exclusive: bool, prefetch: u16) {
        self.queue_method(CHANNEL, method::BASIC_CANCEL, |w| {
            w.shortstr(tag.as_bytes()).bit(true); // nowait
        });
        self.basic_qos(prefetch);
        self.queue_method(CHANNEL, method::BASIC_CONSUME, |w| {
            w.short(0).shortstr(queue.as_bytes()).shortstr(tag.as_bytes());
            w.bit(false).bit(no_ack).bit(exclusive).bit(true); // no-local, no-ack, exclusive, nowait
            w.table(&[]);
        });
    }

    /// Acknowledges every delivery up to `tag`. Hot path: writes 21 bytes into the reused
    /// pending buffer.
    pub fn ack_multiple(&mut self, tag: u64) {
        self.queue_method(CHANNEL, method::BASIC_ACK, |w| {
            w.longlong(tag).bit(true);
        });
    }

    /// The frames of a message for the caller to write itself, the body left in place
    /// (see [`wire::publish_frames`]). `pending` must be empty: frames go out in order.
    pub fn publish_frames(&self, w: &mut Writer, exchange: &str, key: &str, props: &Properties<'_>, body: &[u8]) -> usize {
        wire::publish_frames(w, CHANNEL, exchange.as_bytes(), key.as_bytes(), props, body, self.frame_max)
    }

    /// A whole message into [`Session::pending`] (copied: for control messages).
    pub fn publish_copy(&mut self, exchange: &str, key: &str, props: &Properties<'_>, body: &[u8]) {
        let mut w = Writer::new();
        let prefix = wire::publish_frames(&mut w, CHANNEL, exchange.as_bytes(), key.as_bytes(), props, body, self.frame_max);
        let mut iov = [std::io::IoSlice::new(&[]); 3];
        let mut first = 0;
        let frames = wire::body_frames(body.len(), self.frame_max);
        while first < frames {
            let (n, next) = wire::publish_iov(&w.buf, prefix, body, self.frame_max, first, &mut iov);
            for s in &iov[..n] {
                self.out.buf.extend_from_slice(s);
            }
            first = next;
        }
    }

    /// Starts closing the connection; [`Event::Closed`] confirms it.
    pub fn close(&mut self, code: u16, text: &str) {
        if matches!(self.state, State::Closing | State::Closed) {
            return;
        }
        self.queue_method(0, method::CONNECTION_CLOSE, |w| {
            w.short(code).shortstr(text.as_bytes()).short(0).short(0);
        });
        self.state = State::Closing;
    }
}

/// A property kept from a content header for its delivery: a short string (at most 255
/// bytes), copied into a fixed buffer so nothing is allocated.
#[derive(Clone, Copy)]
struct ShortStr {
    buf: [u8; 255],
    len: Option<u8>,
}

impl Default for ShortStr {
    fn default() -> ShortStr {
        ShortStr { buf: [0; 255], len: None }
    }
}

impl ShortStr {
    fn set(&mut self, v: Option<&[u8]>) {
        self.len = v.map(|v| {
            let n = v.len().min(255); // a short string never exceeds 255 bytes
            self.buf[..n].copy_from_slice(&v[..n]);
            n as u8
        });
    }

    fn get(&self) -> Option<&[u8]> {
        self.len.map(|n| &self.buf[..usize::from(n)])
    }
}

/// Options of `exchange.declare`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExchangeOptions {
    /// Only check that it exists (needs no configure permission).
    pub passive: bool,
    pub durable: bool,
    /// Deleted with its last binding.
    pub auto_delete: bool,
}

impl Default for ExchangeOptions {
    /// What an agent declares for a session nobody provisioned: transient, auto-delete.
    fn default() -> ExchangeOptions {
        ExchangeOptions { passive: false, durable: false, auto_delete: true }
    }
}

/// Options of `queue.declare`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueOptions {
    pub passive: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
}

/// The answer the broker gives to a synchronous method.
fn reply_of(m: (u16, u16)) -> Option<(u16, u16)> {
    Some(match m {
        method::EXCHANGE_DECLARE => method::EXCHANGE_DECLARE_OK,
        method::QUEUE_DECLARE => method::QUEUE_DECLARE_OK,
        method::QUEUE_BIND => method::QUEUE_BIND_OK,
        method::QUEUE_UNBIND => method::QUEUE_UNBIND_OK,
        method::QUEUE_DELETE => method::QUEUE_DELETE_OK,
        method::BASIC_QOS => method::BASIC_QOS_OK,
        method::BASIC_CONSUME => method::BASIC_CONSUME_OK,
        _ => return None,
    })
}

/// What one frame did (no borrow, so the caller can borrow the session for the event).
enum Step {
    Continue,
    Event(Ev),
    Reply((u16, u16)),
    /// A whole body in this frame's payload.
    BodyInPlace(u64),
    /// A whole body in the gather buffer.
    BodyGathered(u64),
}

/// Events that borrow nothing.
enum Ev {
    Opened,
    Oversized(u64),
    Blocked,
    Unblocked,
    Cancelled,
    Closed,
}

impl Ev {
    fn into_event(self) -> Event<'static> {
        match self {
            Ev::Opened => Event::Opened,
            Ev::Oversized(tag) => Event::Oversized { tag },
            Ev::Blocked => Event::Blocked,
            Ev::Unblocked => Event::Unblocked,
            Ev::Cancelled => Event::Cancelled,
            Ev::Closed => Event::Closed,
        }
    }
}

/// The step that ends a message's content.
fn finished(tag: u64, discard: bool, oversized: bool, in_place: bool) -> Step {
    if discard {
        Step::Continue
    } else if oversized {
        Step::Event(Ev::Oversized(tag))
    } else if in_place {
        Step::BodyInPlace(tag)
    } else {
        Step::BodyGathered(tag)
    }
}

impl State {
    fn doing(self) -> &'static str {
        match self {
            State::AwaitStart => "connection.start was due",
            State::AwaitTune => "connection.tune was due",
            State::AwaitOpenOk => "connection.open-ok was due",
            State::AwaitChannelOpenOk => "channel.open-ok was due",
            State::Open => "no answer was due",
            State::Closing => "closing",
            State::Closed => "closed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn config(mechanism: Mechanism, heartbeat: u64) -> Config {
        Config {
            mechanism,
            username: "h1".into(),
            password: "pw".into(),
            vhost: "lab".into(),
            connection_name: "test".into(),
            frame_max: 131_072,
            heartbeat: Duration::from_secs(heartbeat),
            max_body: 1 << 20,
        }
    }

    /// Frames as a broker writes them.
    fn server(channel: u16, id: (u16, u16), args: impl FnOnce(&mut Writer)) -> Vec<u8> {
        let mut w = Writer::new();
        w.method(channel, id, args);
        w.buf
    }

    fn start(mechanisms: &str) -> Vec<u8> {
        server(0, method::CONNECTION_START, |w| {
            w.octet(0).octet(9).table(&[("product", Value::Str("RabbitMQ"))]).longstr(mechanisms.as_bytes()).longstr(b"en_US");
        })
    }

    fn tune(frame_max: u32, heartbeat: u16) -> Vec<u8> {
        server(0, method::CONNECTION_TUNE, |w| {
            w.short(2047).long(frame_max).short(heartbeat);
        })
    }

    /// The methods in what the session wants to send, skipping the protocol header.
    fn sent_methods(s: &mut Session, now: Instant) -> Vec<(u16, u16)> {
        let mut buf = s.pending().to_vec();
        s.sent(buf.len(), now);
        if buf.starts_with(wire::PROTOCOL_HEADER) {
            buf.drain(..8);
        }
        let mut out = Vec::new();
        let mut at = 0;
        while let Some((f, n)) = wire::parse_frame(&buf[at..], 1 << 20).unwrap() {
            if f.kind == wire::FRAME_METHOD {
                out.push(wire::method_of(f.payload).unwrap().0);
            } else {
                out.push((0, u16::from(f.kind)));
            }
            at += n;
        }
        assert_eq!(at, buf.len(), "partial frame in pending");
        out
    }

    /// Feeds all of `input`; returns the events (owned: tags and bodies).
    fn feed(s: &mut Session, now: Instant, input: &[u8]) -> Result<Vec<Seen>, Error> {
        let mut at = 0;
        let mut seen = Vec::new();
        loop {
            let h = s.handle(now, &input[at..])?;
            at += h.consumed;
            match h.event {
                Some(e) => seen.push(Seen::from(e)),
                None => break,
            }
        }
        assert_eq!(at, input.len(), "bytes left unparsed");
        Ok(seen)
    }

    #[derive(Debug, PartialEq, Eq)]
    enum Seen {
        Opened,
        Reply((u16, u16), Vec<u8>),
        Delivery { tag: u64, key: Vec<u8>, user: Option<Vec<u8>>, body: Vec<u8> },
        Oversized(u64),
        Blocked,
        Unblocked,
        Cancelled,
        Closed,
    }

    impl From<Event<'_>> for Seen {
        fn from(e: Event<'_>) -> Seen {
            match e {
                Event::Opened => Seen::Opened,
                Event::Reply { method, args } => Seen::Reply(method, args.to_vec()),
                Event::Delivery(d) => Seen::Delivery { tag: d.tag, key: d.routing_key.to_vec(), user: d.user_id.map(<[u8]>::to_vec), body: d.body.to_vec() },
                Event::Oversized { tag } => Seen::Oversized(tag),
                Event::Blocked => Seen::Blocked,
                Event::Unblocked => Seen::Unblocked,
                Event::Cancelled => Seen::Cancelled,
                Event::Closed => Seen::Closed,
            }
        }
    }

    /// A session through the whole handshake with the broker's `frame_max` and heartbeat.
    fn open(frame_max: u32, heartbeat: u16, now: Instant) -> Session {
        let mut s = Session::new(config(Mechanism::Plain, 10), now);
        assert!(s.pending().starts_with(wire::PROTOCOL_HEADER));
        assert!(feed(&mut s, now, &start("AMQPLAIN PLAIN")).unwrap().is_empty());
        assert_eq!(sent_methods(&mut s, now), [method::CONNECTION_START_OK]);
        assert!(feed(&mut s, now, &tune(frame_max, heartbeat)).unwrap().is_empty());
        assert_eq!(sent_methods(&mut s, now), [method::CONNECTION_TUNE_OK, method::CONNECTION_OPEN]);
        assert!(feed(
            &mut s,
            now,
            &server(0, method::CONNECTION_OPEN_OK, |w| {
                w.shortstr(b"");
            })
        )
        .unwrap()
        .is_empty());
        assert_eq!(sent_methods(&mut s, now), [method::CHANNEL_OPEN]);
        assert_eq!(
            feed(
                &mut s,
                now,
                &server(1, method::CHANNEL_OPEN_OK, |w| {
                    w.longstr(b"");
                })
            )
            .unwrap(),
            [Seen::Opened]
        );
        assert!(s.is_open());
        s
    }

    /// A delivery as the broker frames it: method, header, body in frames of `chunk`.
    fn delivery(tag: u64, key: &[u8], user: Option<&str>, body: &[u8], chunk: usize) -> Vec<u8> {
        let mut w = Writer::new();
        w.method(1, method::BASIC_DELIVER, |w| {
            w.shortstr(b"ctag").longlong(tag).bit(false).shortstr(b"ex").shortstr(key);
        });
        w.content_header(1, body.len() as u64, &Properties { user_id: user, ..Properties::default() });
        for part in body.chunks(chunk.max(1)) {
            w.begin_frame(wire::FRAME_BODY, 1);
            w.buf.extend_from_slice(part);
            w.end_frame();
        }
        w.buf
    }

    #[test]
    fn handshake_logs_in_with_plain_and_negotiates_limits() {
        let now = Instant::now();
        let s = open(65_536, 60, now);
        assert_eq!(s.frame_max(), 65_536);
        assert_eq!(s.heartbeat(), Duration::from_secs(10), "the smaller of ours (10) and the broker's (60)");
        let s = open(0, 0, now);
        assert_eq!(s.frame_max(), 131_072, "0: no limit from the broker");
        assert_eq!(s.heartbeat(), Duration::from_secs(10), "the broker's 0 leaves ours");
        assert_eq!(open(131_072, 5, now).heartbeat(), Duration::from_secs(5));
    }

    #[test]
    fn start_ok_carries_the_login_and_capabilities() {
        let now = Instant::now();
        let mut s = Session::new(config(Mechanism::Plain, 10), now);
        feed(&mut s, now, &start("PLAIN")).unwrap();
        let out = s.pending()[8..].to_vec();
        let (f, _) = wire::parse_frame(&out, 1 << 20).unwrap().unwrap();
        let (_, mut a) = wire::method_of(f.payload).unwrap();
        let props = a.longstr().unwrap();
        assert!(props.windows(28).any(|w| w == b"authentication_failure_close"));
        assert!(props.windows(18).any(|w| w == b"connection.blocked"));
        assert_eq!(a.shortstr().unwrap(), b"PLAIN");
        assert_eq!(a.longstr().unwrap(), b"\0h1\0pw");

        let mut e = Session::new(config(Mechanism::External, 10), now);
        feed(&mut e, now, &start("PLAIN EXTERNAL")).unwrap();
        let out = e.pending()[8..].to_vec();
        let (f, _) = wire::parse_frame(&out, 1 << 20).unwrap().unwrap();
        let (_, mut a) = wire::method_of(f.payload).unwrap();
        a.longstr().unwrap();
        assert_eq!(a.shortstr().unwrap(), b"EXTERNAL");
        assert_eq!(a.longstr().unwrap(), b"", "EXTERNAL sends no password");

        let mut x = Session::new(config(Mechanism::External, 10), now);
        assert_eq!(feed(&mut x, now, &start("PLAIN AMQPLAIN")), Err(Error::NoMechanism { offered: "PLAIN AMQPLAIN".into(), wanted: Mechanism::External }));
    }

    #[test]
    fn hostile_tune_is_refused() {
        let now = Instant::now();
        for bad in [8u32, 1, 4095] {
            let mut s = Session::new(config(Mechanism::Plain, 10), now);
            feed(&mut s, now, &start("PLAIN")).unwrap();
            assert_eq!(feed(&mut s, now, &tune(bad, 60)), Err(Error::FrameMaxTooSmall(bad)));
        }
        // Heartbeats off when we ask for 0, whatever the broker proposes.
        let mut s = Session::new(config(Mechanism::Plain, 0), now);
        feed(&mut s, now, &start("PLAIN")).unwrap();
        feed(&mut s, now, &tune(4096, 60)).unwrap();
        assert_eq!(s.heartbeat(), Duration::ZERO);
        assert_eq!(s.frame_max(), 4096);
    }

    #[test]
    fn refusals_are_told_apart_by_phase() {
        let now = Instant::now();
        let close = |code: u16, text: &str| {
            server(0, method::CONNECTION_CLOSE, |w| {
                w.short(code).shortstr(text.as_bytes()).short(0).short(0);
            })
        };
        let mut s = Session::new(config(Mechanism::Plain, 10), now);
        feed(&mut s, now, &start("PLAIN")).unwrap();
        s.sent(s.pending().len(), now);
        let e = feed(&mut s, now, &close(403, "ACCESS_REFUSED - Login was refused")).unwrap_err();
        assert!(matches!(&e, Error::ConnectionClosed { close, phase: Phase::Login } if close.code == 403), "{e:?}");
        assert!(e.to_string().contains("refused the login"), "{e}");
        assert_eq!(sent_methods(&mut s, now), [method::CONNECTION_CLOSE_OK]);

        let mut s = Session::new(config(Mechanism::Plain, 10), now);
        feed(&mut s, now, &start("PLAIN")).unwrap();
        feed(&mut s, now, &tune(0, 0)).unwrap();
        let e = feed(&mut s, now, &close(530, "NOT_ALLOWED - vhost lab not found")).unwrap_err();
        assert!(matches!(&e, Error::ConnectionClosed { close, phase: Phase::Open } if close.code == 530), "{e:?}");
    }

    #[test]
    fn sync_methods_get_their_replies_and_refusals_name_the_method() {
        let now = Instant::now();
        let mut s = open(0, 0, now);
        s.queue_declare("", QueueOptions { exclusive: true, ..QueueOptions::default() }, &[("x-max-length", Value::I32(5))]);
        assert_eq!(sent_methods(&mut s, now), [method::QUEUE_DECLARE]);
        let ok = server(1, method::QUEUE_DECLARE_OK, |w| {
            w.shortstr(b"amq.gen-1").long(0).long(0);
        });
        let seen = feed(&mut s, now, &ok).unwrap();
        let Seen::Reply(m, args) = &seen[0] else { panic!("{seen:?}") };
        assert_eq!(*m, method::QUEUE_DECLARE_OK);
        assert_eq!(Args::new(args).shortstr().unwrap(), b"amq.gen-1");
        assert_eq!(s.awaiting(), None);
        // An answer nobody asked for.
        assert!(matches!(feed(&mut s, now, &ok), Err(Error::Unexpected { .. })));

        let mut s = open(0, 0, now);
        s.queue_bind("q", "ex", "tunbus.v1.#");
        let refused = server(1, method::CHANNEL_CLOSE, |w| {
            w.short(403).shortstr(b"ACCESS_REFUSED - read access to topic").short(50).short(20);
        });
        let e = feed(&mut s, now, &refused).unwrap_err();
        assert!(matches!(&e, Error::ChannelClosed { close, method } if close.code == 403 && *method == method::QUEUE_BIND), "{e:?}");
        assert!(e.to_string().contains("queue.bind"), "{e}");
        assert!(sent_methods(&mut s, now).contains(&method::CHANNEL_CLOSE_OK));
    }

    #[test]
    fn a_single_frame_body_is_not_copied() {
        let now = Instant::now();
        let mut s = open(0, 0, now);
        let input = delivery(7, b"tunbus.v1.198-18-0-2.3", Some("h2"), b"packet bytes", 4096);
        let h = s.handle(now, &input).unwrap();
        let Some(Event::Delivery(d)) = h.event else { panic!("{:?}", h.event) };
        assert_eq!((d.tag, d.routing_key, d.user_id, d.body), (7, &b"tunbus.v1.198-18-0-2.3"[..], Some(&b"h2"[..]), &b"packet bytes"[..]));
        assert_eq!(d.content_type, None);
        let range = input.as_ptr_range();
        assert!(range.contains(&d.body.as_ptr()), "the body should be a slice of the input");
        assert_eq!(h.consumed, input.len());
    }

    #[test]
    fn bodies_reassemble_however_the_bytes_are_split() {
        let now = Instant::now();
        let body: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let mut stream = delivery(1, b"k1", None, &body, 4000);
        stream.extend(delivery(2, b"k2", Some("u"), b"", 1));
        stream.extend(delivery(3, b"k3", None, b"x", 1));
        let expected = vec![
            Seen::Delivery { tag: 1, key: b"k1".to_vec(), user: None, body: body.clone() },
            Seen::Delivery { tag: 2, key: b"k2".to_vec(), user: Some(b"u".to_vec()), body: Vec::new() },
            Seen::Delivery { tag: 3, key: b"k3".to_vec(), user: None, body: b"x".to_vec() },
        ];
        for step in [1, 2, 3, 7, 100, 4096, stream.len()] {
            let mut s = open(0, 0, now);
            let mut buf = Vec::new();
            let mut seen = Vec::new();
            for piece in stream.chunks(step) {
                buf.extend_from_slice(piece);
                loop {
                    let h = s.handle(now, &buf).unwrap();
                    let n = h.consumed;
                    let e = h.event.map(Seen::from);
                    buf.drain(..n);
                    match e {
                        Some(e) => seen.push(e),
                        None => break,
                    }
                }
            }
            assert_eq!(seen, expected, "split every {step} bytes");
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn content_out_of_order_is_a_protocol_error() {
        let now = Instant::now();
        let body_frame = |payload: &[u8]| {
            let mut w = Writer::new();
            w.begin_frame(wire::FRAME_BODY, 1);
            w.buf.extend_from_slice(payload);
            w.end_frame();
            w.buf
        };
        let header = |size: u64| {
            let mut w = Writer::new();
            w.content_header(1, size, &Properties::default());
            w.buf
        };
        let deliver = delivery(1, b"k", None, b"", 1)[..].to_vec();
        let method_only = deliver[..deliver.len() - header(0).len()].to_vec();

        let mut s = open(0, 0, now);
        assert!(matches!(feed(&mut s, now, &body_frame(b"x")), Err(Error::Unexpected { kind: wire::FRAME_BODY, .. })), "body before header");
        let mut s = open(0, 0, now);
        assert!(matches!(feed(&mut s, now, &header(3)), Err(Error::Unexpected { kind: wire::FRAME_HEADER, .. })), "header without deliver");
        let mut s = open(0, 0, now);
        let mut overrun = method_only.clone();
        overrun.extend(header(3));
        overrun.extend(body_frame(b"four"));
        assert_eq!(feed(&mut s, now, &overrun), Err(Error::BodyOverrun { announced: 3, got: 4 }));
        let mut s = open(0, 0, now);
        let mut interleaved = method_only.clone();
        interleaved.extend(method_only.clone());
        assert!(matches!(feed(&mut s, now, &interleaved), Err(Error::Unexpected { method: Some(method::BASIC_DELIVER), .. })));
        let mut s = open(0, 0, now);
        let mut short = method_only.clone();
        short.extend(header(10));
        short.extend(body_frame(b"abc"));
        short.extend(method_only);
        assert!(feed(&mut s, now, &short).is_err(), "a new message while a body is short");
    }

    #[test]
    fn frames_beyond_limits_and_garbage_end_the_session() {
        let now = Instant::now();
        let mut s = open(4096, 0, now);
        let big = delivery(1, b"k", None, &[0u8; 5000], 5000);
        assert!(matches!(feed(&mut s, now, &big), Err(Error::Frame(wire::Error::FrameTooLarge { .. }))));
        let mut s = open(0, 0, now);
        assert_eq!(feed(&mut s, now, b"\x01\x00\x01\x00\x00\x00\x04\x00\x3c\x00\x50\xff"), Err(Error::Frame(wire::Error::BadFrameEnd)));
        let mut s = open(0, 0, now);
        assert_eq!(feed(&mut s, now, &server(5, method::BASIC_DELIVER, |_| {})), Err(Error::WrongChannel(5)));
        let mut s = open(0, 0, now);
        assert!(feed(&mut s, now, &server(0, method::CONNECTION_START, |_| {})).is_err(), "a second start");
        // Before the handshake, nothing but connection.start.
        let mut s = Session::new(config(Mechanism::Plain, 10), now);
        assert!(feed(&mut s, now, &delivery(1, b"k", None, b"x", 10)).is_err());
    }

    #[test]
    fn oversized_bodies_are_skipped_and_still_acked() {
        let now = Instant::now();
        let mut s = open(0, 0, now);
        s.config.max_body = 100;
        let mut input = delivery(4, b"k", None, &[1u8; 300], 128);
        input.extend(delivery(5, b"k", None, b"ok", 128));
        let seen = feed(&mut s, now, &input).unwrap();
        assert_eq!(seen[0], Seen::Oversized(4));
        assert!(matches!(&seen[1], Seen::Delivery { tag: 5, body, .. } if body == b"ok"));
    }

    #[test]
    fn heartbeats_go_out_when_quiet_and_silence_is_fatal() {
        let t0 = Instant::now();
        let mut s = open(0, 4, t0); // ours 10, the broker's 4: 4 s
        assert_eq!(s.heartbeat(), Duration::from_secs(4));
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(2)));
        s.handle_timeout(t0 + Duration::from_secs(1)).unwrap();
        assert!(s.pending().is_empty(), "not quiet for long enough yet");
        s.handle_timeout(t0 + Duration::from_secs(2)).unwrap();
        assert_eq!(sent_methods(&mut s, t0 + Duration::from_secs(2)), [(0, u16::from(wire::FRAME_HEARTBEAT))]);
        // A heartbeat from the broker keeps it alive; a trickle of a partial frame does not.
        let mut beat = Writer::new();
        beat.begin_frame(wire::FRAME_HEARTBEAT, 0).end_frame();
        feed(&mut s, t0 + Duration::from_secs(7), &beat.buf).unwrap();
        s.handle_timeout(t0 + Duration::from_secs(14)).unwrap();
        let partial = &delivery(1, b"k", None, b"x", 1)[..5];
        for i in 0..5 {
            let h = s.handle(t0 + Duration::from_secs(14 + i), &partial[..=i as usize]).unwrap();
            assert_eq!((h.consumed, h.event.is_none()), (0, true));
        }
        assert_eq!(s.handle_timeout(t0 + Duration::from_secs(15)), Err(Error::HeartbeatTimeout(Duration::from_secs(8))));
    }

    #[test]
    fn blocked_unblocked_cancel_and_close() {
        let now = Instant::now();
        let mut s = open(0, 0, now);
        let blocked = server(0, method::CONNECTION_BLOCKED, |w| {
            w.shortstr(b"low on memory");
        });
        assert_eq!(feed(&mut s, now, &blocked).unwrap(), [Seen::Blocked]);
        assert!(s.blocked());
        assert_eq!(feed(&mut s, now, &server(0, method::CONNECTION_UNBLOCKED, |_| {})).unwrap(), [Seen::Unblocked]);
        assert!(!s.blocked());
        let cancel = server(1, method::BASIC_CANCEL, |w| {
            w.shortstr(b"ctag").bit(true);
        });
        assert_eq!(feed(&mut s, now, &cancel).unwrap(), [Seen::Cancelled]);
        s.close(200, "bye");
        assert_eq!(sent_methods(&mut s, now), [method::CONNECTION_CLOSE]);
        assert_eq!(feed(&mut s, now, &server(0, method::CONNECTION_CLOSE_OK, |_| {})).unwrap(), [Seen::Closed]);
    }

    #[test]
    fn acks_and_copied_publishes_are_well_formed() {
        let now = Instant::now();
        let mut s = open(4096, 0, now);
        s.ack_multiple(99);
        let body = vec![7u8; 10_000];
        s.publish_copy("ex", "key", &Properties::default(), &body);
        let out = s.pending().to_vec();
        let mut at = 0;
        let mut kinds = Vec::new();
        let mut got = Vec::new();
        while let Some((f, n)) = wire::parse_frame(&out[at..], 4096).unwrap() {
            kinds.push(f.kind);
            if f.kind == wire::FRAME_BODY {
                got.extend_from_slice(f.payload);
            }
            at += n;
        }
        assert_eq!(at, out.len());
        assert_eq!(kinds, [1, 1, 2, 3, 3, 3]);
        assert_eq!(got, body);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), split in 0usize..512) {
            let now = Instant::now();
            for opened in [false, true] {
                let mut s = if opened { open(4096, 0, now) } else { Session::new(config(Mechanism::Plain, 10), now) };
                let cut = split.min(bytes.len());
                let mut buf = bytes[..cut].to_vec();
                for part in [&bytes[cut..], &[][..]] {
                    loop {
                        match s.handle(now, &buf) {
                            Ok(h) if h.event.is_some() => { let n = h.consumed; buf.drain(..n); }
                            Ok(h) => { let n = h.consumed; buf.drain(..n); break; }
                            Err(_) => { buf.clear(); break; }
                        }
                    }
                    buf.extend_from_slice(part);
                }
                let _ = s.handle_timeout(now + Duration::from_secs(100));
            }
        }

        #[test]
        fn framed_garbage_after_the_handshake_never_panics(frames in proptest::collection::vec((0u8..10, 0u16..3, proptest::collection::vec(any::<u8>(), 0..64)), 0..20)) {
            let now = Instant::now();
            let mut s = open(4096, 0, now);
            let mut input = Vec::new();
            for (kind, channel, payload) in frames {
                input.extend_from_slice(&wire::frame_header(kind, channel, payload.len() as u32));
                input.extend_from_slice(&payload);
                input.push(wire::FRAME_END);
            }
            let mut at = 0;
            while let Ok(h) = s.handle(now, &input[at..]) {
                at += h.consumed;
                if h.event.is_none() { break; }
            }
        }
    }
}
