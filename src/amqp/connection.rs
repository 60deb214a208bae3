//! The life of one connection to the bus, without I/O, in the manner of quinn-proto's
//! `Connection`: which broker node to try and when (capped, fully jittered backoff between
//! rounds; the next node at once within a round), the deadline of each attempt, the AMQP
//! handshake ([`Session`]), the set-up a connection needs before it is any use (exchange,
//! queue, bindings, prefetch, consumer: a [`Plan`]), being up, being lost, and closing.
//!
//! The owner (the I/O shell, [`super::client::Client`]) feeds it the time, news about the
//! transport ([`Connection::connected`], [`Connection::failed`]) and the bytes it read
//! ([`Connection::handle`]); it opens the transport the machine asks for
//! ([`Connection::poll_connect`]), sends what [`Connection::pending`] holds, drops the
//! transport when [`Connection::wants_transport`] says so, and wakes the machine at
//! [`Connection::poll_timeout`]. The machine never touches a socket, reads a clock or
//! sleeps: tests drive it with a fake clock and a scripted broker (at the bottom).
//!
//! Phases: waiting (the backoff, or the next node at once) → connecting (TCP and TLS, the
//! shell's) → setting up (handshake, then the plan's steps, one synchronous method at a
//! time) → up → lost (back to waiting) or closing → closed. With [`Retry::OncePerNode`]
//! (the start of an agent, a one-shot tool) a round in which every node failed ends in
//! [`Phase::Failed`]; with [`Retry::Forever`] (a data link, the router) it backs off and
//! tries again. What happened is told as [`Note`]s. Pure; runs on each connection's thread.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::error::{hint_for, Error};
use super::session::{self, Event, ExchangeOptions, Handled, QueueOptions, Session};
use super::wire::{Args, Value};
use super::Backoff;

/// Deadline of an attempt until the connection has been up once (TCP, TLS, login and
/// set-up): a broker accepting hundreds of connections at once (a large lab starting)
/// takes seconds; an unreachable one should fail well inside 10 s.
pub const FIRST_ATTEMPT: Duration = Duration::from_secs(5);
/// Deadline of an attempt after the connection was up: a path that black-holes the
/// handshake costs at most this once it heals.
pub const LATER_ATTEMPT: Duration = Duration::from_secs(3);
/// Bindings sent without waiting before one synchronous method confirms them.
pub const BINDS_PER_ROUND_TRIP: usize = 64;
/// How long one round of bindings may take to be confirmed. The broker has let us in and
/// is working through them (its metadata store serialises every binding of every
/// connection: 30,000 bindings from 63 connections of a 10,000-endpoint lab wait in one
/// line on a loaded machine); a broker that died meanwhile is still found by the missing
/// heartbeats, which the set-up watches too.
pub const BIND_ROUND: Duration = Duration::from_secs(30);
/// How long a closing connection waits for the broker's `close-ok`.
pub const CLOSE_WAIT: Duration = Duration::from_millis(300);

/// One broker node, as the machine needs it.
#[derive(Clone, Debug)]
pub struct Node {
    /// `host:port`, for messages.
    pub broker: String,
    /// The session's login, vhost and limits on this node.
    pub session: session::Config,
    /// The URL's `connection_timeout`: overrides both attempt deadlines.
    pub timeout: Option<Duration>,
}

/// What a connection sets up on every node before it counts as up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The exchange the queue's bindings (and the owner's publishes) use. Made sure to
    /// exist: a passive declare first (a provisioned session's exchange exists, and its
    /// users may not declare it); when it is missing (404, which closes the channel), a
    /// fresh connection declares it transient and auto-delete. Empty or `amq.*`: left alone.
    pub exchange: String,
    /// The queue to declare, bind and consume; `None` for a connection that only publishes.
    pub queue: Option<QueuePlan>,
}

impl Plan {
    /// A control listener's plan: an exclusive, auto-delete, server-named queue (at most
    /// `max_length` messages) bound to `keys` on `exchange`, consumed without acks.
    pub fn listener(exchange: &str, keys: Vec<String>, max_length: Option<i32>) -> Plan {
        Plan {
            exchange: exchange.to_owned(),
            queue: Some(QueuePlan {
                name: String::new(),
                options: QueueOptions { exclusive: true, auto_delete: true, ..QueueOptions::default() },
                max_length,
                max_length_bytes: None,
                bindings: keys,
                prefetch: None,
                consume: Some(Consume { tag: String::new(), no_ack: true, exclusive: true }),
            }),
        }
    }
}

/// A queue of the plan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueuePlan {
    /// Empty: the broker names it ([`Connection::queue`] has the name once it is up).
    pub name: String,
    pub options: QueueOptions,
    /// `x-max-length`, when bounded in messages.
    pub max_length: Option<i32>,
    /// `x-max-length-bytes`, when bounded in bytes.
    pub max_length_bytes: Option<i64>,
    /// Routing keys bound to the queue on [`Plan::exchange`].
    pub bindings: Vec<String>,
    /// `basic.qos` prefetch, when set.
    pub prefetch: Option<u16>,
    /// The consumer, when the connection consumes.
    pub consume: Option<Consume>,
}

/// `basic.consume`'s settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Consume {
    /// Empty: the broker names the consumer.
    pub tag: String,
    /// No acknowledgements (control queues).
    pub no_ack: bool,
    pub exclusive: bool,
}

/// What to do when a whole round of nodes failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    /// Give up ([`Phase::Failed`]): the start of an agent, a one-shot tool.
    OncePerNode,
    /// Back off and try again, forever: a link that must come back.
    Forever,
}

/// Where the connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// No transport; the next attempt is due at [`Connection::poll_timeout`].
    Waiting,
    /// The owner is opening the transport (TCP, TLS).
    Connecting,
    /// Handshake, then the plan's steps.
    SettingUp,
    Up,
    Closing,
    Closed,
    /// Every node failed once, and the connection does not retry.
    Failed,
}

/// What happened, for the owner (logs, counters, status).
#[derive(Debug)]
pub enum Note {
    /// Set up on `node`; `again`: it had been up before (a reconnection).
    Up { node: usize, again: bool },
    /// The connection on `node`, which was up, is gone.
    Lost { node: usize, error: Error },
    /// An attempt on `node` failed.
    AttemptFailed { node: usize, error: Error },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Handshake,
    ExchangeCheck,
    ExchangeDeclare,
    QueueDeclare,
    /// Bindings from this index on: up to [`BINDS_PER_ROUND_TRIP`] sent without waiting
    /// (`nowait`), then a passive declare of the queue whose answer confirms them (a refusal
    /// closes the channel instead). Thousands of bindings cost a few round trips, and each
    /// answer renews the attempt's deadline, so a busy broker is not taken for a dead one.
    Bind(usize),
    Qos,
    Consume,
}

impl Step {
    fn doing(self) -> &'static str {
        match self {
            Step::Handshake => "logging in",
            Step::ExchangeCheck | Step::ExchangeDeclare => "declaring the exchange",
            Step::QueueDeclare => "declaring a queue",
            Step::Bind(_) => "binding a queue",
            Step::Qos => "setting the prefetch",
            Step::Consume => "starting to consume",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Waiting { until: Instant },
    Connecting { deadline: Instant },
    SettingUp { deadline: Instant, step: Step },
    Up,
    Closing { deadline: Instant },
    Closed,
    Failed,
}

/// One connection's life over the nodes of a cluster. See the module header.
pub struct Connection {
    nodes: Vec<Node>,
    plan: Plan,
    retry: Retry,
    state: State,
    session: Option<Session>,
    /// The node in use, or the one the next attempt goes to.
    node: usize,
    /// Nodes that failed in this round.
    failed_in_round: usize,
    /// When the first attempt of this round began (the backoff counts from it).
    round_started: Option<Instant>,
    backoff: Backoff,
    ever_up: bool,
    /// A passive declare found the exchange missing: the next attempt declares it.
    declare_exchange: bool,
    /// The declared queue's name (the broker's, for a server-named queue).
    queue: String,
    notes: VecDeque<Note>,
}

impl Connection {
    /// A connection whose first attempt is due at `now`, on node 0. `seed` spreads the
    /// backoff of connections that lost the broker together.
    pub fn new(nodes: Vec<Node>, plan: Plan, retry: Retry, seed: u64, now: Instant) -> Connection {
        Connection {
            nodes,
            plan,
            retry,
            state: State::Waiting { until: now },
            session: None,
            node: 0,
            failed_in_round: 0,
            round_started: None,
            backoff: Backoff::new(seed),
            ever_up: false,
            declare_exchange: false,
            queue: String::new(),
            notes: VecDeque::new(),
        }
    }

    /// What to do when a whole round of nodes fails, from now on.
    pub fn set_retry(&mut self, retry: Retry) {
        self.retry = retry;
    }

    pub fn phase(&self) -> Phase {
        match self.state {
            State::Waiting { .. } => Phase::Waiting,
            State::Connecting { .. } => Phase::Connecting,
            State::SettingUp { .. } => Phase::SettingUp,
            State::Up => Phase::Up,
            State::Closing { .. } => Phase::Closing,
            State::Closed => Phase::Closed,
            State::Failed => Phase::Failed,
        }
    }

    pub fn is_up(&self) -> bool {
        self.state == State::Up
    }

    /// The node in use, or the one the next attempt goes to.
    pub fn node(&self) -> usize {
        self.node
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// `host:port` of the current node.
    pub fn broker(&self) -> &str {
        self.nodes.get(self.node).map_or("", |n| n.broker.as_str())
    }

    /// The declared queue's name, once up.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Adds a binding to the plan (the owner binds it on the live connection itself):
    /// every later set-up binds it too.
    pub fn plan_binding(&mut self, key: &str) {
        if let Some(q) = &mut self.plan.queue {
            if !q.bindings.iter().any(|k| k == key) {
                q.bindings.push(key.to_owned());
            }
        }
    }

    /// The session, while there is one (publishing needs its frame size and state).
    pub fn session(&self) -> Option<&Session> {
        self.session.as_ref()
    }

    /// The session while up: synchronous methods, acks and copied publishes go through it.
    pub fn session_mut(&mut self) -> Option<&mut Session> {
        if self.state == State::Up {
            self.session.as_mut()
        } else {
            None
        }
    }

    /// Whether the owner should hold a transport now; when this turns false the owner drops
    /// it (and what it buffered).
    pub fn wants_transport(&self) -> bool {
        matches!(self.state, State::Connecting { .. } | State::SettingUp { .. } | State::Up | State::Closing { .. })
    }

    /// When an attempt is due, starts it: the owner opens a transport to the node returned.
    pub fn poll_connect(&mut self, now: Instant) -> Option<usize> {
        let State::Waiting { until } = self.state else { return None };
        if now < until || self.nodes.is_empty() {
            return None;
        }
        self.round_started.get_or_insert(now);
        self.state = State::Connecting { deadline: now + self.attempt_timeout() };
        Some(self.node)
    }

    /// The transport to the node is open: the handshake starts (its first bytes are in
    /// [`Connection::pending`]).
    pub fn connected(&mut self, now: Instant) {
        let State::Connecting { deadline } = self.state else { return };
        let Some(node) = self.nodes.get(self.node) else { return };
        self.session = Some(Session::new(node.session.clone(), now));
        self.state = State::SettingUp { deadline, step: Step::Handshake };
    }

    /// Bytes to send now.
    pub fn pending(&self) -> &[u8] {
        self.session.as_ref().map_or(&[], Session::pending)
    }

    /// `n` bytes of [`Connection::pending`] were sent.
    pub fn sent(&mut self, n: usize, now: Instant) {
        if let Some(s) = &mut self.session {
            s.sent(n, now);
        }
    }

    /// Something was sent past [`Connection::pending`] (a published message).
    pub fn note_sent(&mut self, now: Instant) {
        if let Some(s) = &mut self.session {
            s.note_sent(now);
        }
    }

    /// Takes what was read. While setting up, the broker's answers drive the plan and
    /// nothing comes out; once up (and in the same call: deliveries may follow the
    /// consumer's confirmation) events go to the owner, one per call, as
    /// [`Session::handle`] gives them. An `Err` ends the connection: the owner passes it to
    /// [`Connection::failed`] and drops the transport.
    pub fn handle<'a>(&'a mut self, now: Instant, input: &'a [u8]) -> Result<Handled<'a>, Error> {
        match self.state {
            State::Up => {
                let broker = self.nodes.get(self.node).map_or("", |n| n.broker.as_str());
                let Some(session) = &mut self.session else { return Ok(Handled { consumed: 0, event: None }) };
                session.handle(now, input).map_err(|e| session_error(broker, e, false))
            }
            State::Closing { .. } => {
                let Some(session) = &mut self.session else { return Ok(Handled { consumed: 0, event: None }) };
                let (consumed, closed) = match session.handle(now, input) {
                    Ok(h) => (h.consumed, matches!(h.event, Some(Event::Closed))),
                    Err(_) => (input.len(), true), // whatever it says, we are going
                };
                if closed {
                    self.state = State::Closed;
                    self.session = None;
                    return Ok(Handled { consumed, event: Some(Event::Closed) });
                }
                Ok(Handled { consumed, event: None })
            }
            State::SettingUp { step, .. } => {
                // Each answer renews the attempt's deadline: a broker that answers slowly but
                // steadily (thousands of bindings) is not a dead one; a silent one still
                // fails at the first deadline.
                let deadline = now + self.answer_timeout(step);
                let broker = self.nodes.get(self.node).map_or("", |n| n.broker.as_str());
                let Some(session) = &mut self.session else { return Ok(Handled { consumed: 0, event: None }) };
                let handshaking = step == Step::Handshake;
                let h = session.handle(now, input).map_err(|e| session_error(broker, e, handshaking))?;
                let consumed = h.consumed;
                let answer = match h.event {
                    Some(Event::Opened) => Some(Answer::Opened),
                    Some(Event::Reply { args, .. }) => Some(Answer::Reply(queue_name(args))),
                    _ => None,
                };
                if let Some(answer) = answer {
                    self.advance(deadline, step, answer);
                }
                Ok(Handled { consumed, event: None })
            }
            _ => Ok(Handled { consumed: input.len(), event: None }),
        }
    }

    /// The next step of the plan after `step` was answered.
    fn advance(&mut self, deadline: Instant, step: Step, answer: Answer) {
        if step == Step::QueueDeclare {
            if let Answer::Reply(Some(name)) = &answer {
                self.queue.clone_from(name);
            }
        }
        let mut next = self.step_after(step);
        loop {
            match next {
                None => return self.set_up(),
                Some(s) => {
                    if self.ask(s) {
                        self.state = State::SettingUp { deadline, step: s };
                        return;
                    }
                    next = self.step_after(s); // nothing to ask for this one
                }
            }
        }
    }

    fn step_after(&self, step: Step) -> Option<Step> {
        let q = self.plan.queue.as_ref();
        let exchange = !self.plan.exchange.is_empty() && !self.plan.exchange.starts_with("amq.");
        match step {
            Step::Handshake if exchange => Some(if self.declare_exchange { Step::ExchangeDeclare } else { Step::ExchangeCheck }),
            Step::Handshake | Step::ExchangeCheck | Step::ExchangeDeclare => q.map(|_| Step::QueueDeclare),
            Step::QueueDeclare => Some(Step::Bind(0)),
            Step::Bind(i) if q.is_some_and(|q| i + BINDS_PER_ROUND_TRIP < q.bindings.len()) => Some(Step::Bind(i + BINDS_PER_ROUND_TRIP)),
            Step::Bind(_) => Some(Step::Qos),
            Step::Qos => Some(Step::Consume),
            Step::Consume => None,
        }
    }

    /// Queues the method of `step`; false when the plan has nothing to ask there.
    fn ask(&mut self, step: Step) -> bool {
        let (Some(session), plan) = (&mut self.session, &self.plan) else { return false };
        let q = plan.queue.as_ref();
        match step {
            Step::Handshake => return false,
            Step::ExchangeCheck => session.exchange_declare(&plan.exchange, ExchangeOptions { passive: true, ..ExchangeOptions::default() }),
            Step::ExchangeDeclare => session.exchange_declare(&plan.exchange, ExchangeOptions::default()),
            Step::QueueDeclare => {
                let Some(q) = q else { return false };
                let mut args: Vec<(&str, Value<'_>)> = Vec::with_capacity(2);
                if let Some(n) = q.max_length {
                    args.push(("x-max-length", Value::I32(n)));
                }
                if let Some(b) = q.max_length_bytes {
                    args.push(("x-max-length-bytes", Value::I64(b)));
                }
                session.queue_declare(&q.name, q.options, &args);
            }
            Step::Bind(i) => {
                let Some(keys) = q.and_then(|q| q.bindings.get(i..)).filter(|k| !k.is_empty()) else { return false };
                for key in keys.iter().take(BINDS_PER_ROUND_TRIP) {
                    session.queue_bind_nowait(&self.queue, &plan.exchange, key);
                }
                session.queue_check(&self.queue);
            }
            Step::Qos => {
                let Some(p) = q.and_then(|q| q.prefetch) else { return false };
                session.basic_qos(p);
            }
            Step::Consume => {
                let Some(c) = q.and_then(|q| q.consume.as_ref()) else { return false };
                session.basic_consume(&self.queue, &c.tag, c.no_ack, c.exclusive);
            }
        }
        true
    }

    fn set_up(&mut self) {
        self.state = State::Up;
        self.notes.push_back(Note::Up { node: self.node, again: self.ever_up });
        self.ever_up = true;
        self.declare_exchange = false;
        self.failed_in_round = 0;
        self.round_started = None;
        self.backoff.reset();
    }

    /// The connection failed or ended at `now` (a transport error, a protocol error, a
    /// stalled send): an attempt counts as failed, an up connection as lost.
    pub fn failed(&mut self, now: Instant, error: Error) {
        match self.state {
            State::Connecting { .. } | State::SettingUp { .. } => self.attempt_failed(now, error),
            State::Up => self.lost(now, error),
            State::Closing { .. } => {
                self.state = State::Closed;
                self.session = None;
            }
            State::Waiting { .. } | State::Closed | State::Failed => {}
        }
    }

    fn attempt_failed(&mut self, now: Instant, error: Error) {
        self.session = None;
        let checking = matches!(self.state, State::SettingUp { step: Step::ExchangeCheck, .. });
        if checking && error.reply_code() == Some(404) && !self.declare_exchange {
            // The exchange is missing: declare it, at once, on a fresh connection.
            self.declare_exchange = true;
            self.state = State::Waiting { until: now };
            return;
        }
        self.notes.push_back(Note::AttemptFailed { node: self.node, error });
        self.failed_in_round += 1;
        self.node = (self.node + 1) % self.nodes.len().max(1);
        if self.failed_in_round < self.nodes.len() {
            self.state = State::Waiting { until: now }; // the next node, at once
            return;
        }
        // A whole round failed.
        self.failed_in_round = 0;
        if self.retry == Retry::OncePerNode {
            self.state = State::Failed;
            return;
        }
        let started = self.round_started.take().unwrap_or(now);
        // The time the round itself took counts towards the wait: a black-holed handshake
        // has waited its deadline already.
        self.state = State::Waiting { until: (started + self.backoff.failed(now)).max(now) };
    }

    fn lost(&mut self, now: Instant, error: Error) {
        self.session = None;
        self.notes.push_back(Note::Lost { node: self.node, error });
        // The next attempt starts with the next node: a dead node costs one attempt.
        self.node = (self.node + 1) % self.nodes.len().max(1);
        self.failed_in_round = 0;
        self.round_started = None;
        self.state = State::Waiting { until: now + self.backoff.failed(now) };
    }

    /// When [`Connection::handle_timeout`] (or [`Connection::poll_connect`]) wants to run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Waiting { until } => Some(until),
            State::Connecting { deadline } | State::SettingUp { deadline, .. } | State::Closing { deadline } => {
                let heartbeat = self.session.as_ref().and_then(Session::poll_timeout);
                Some(heartbeat.map_or(deadline, |h| h.min(deadline)))
            }
            State::Up => self.session.as_ref().and_then(Session::poll_timeout),
            State::Closed | State::Failed => None,
        }
    }

    /// Time has passed: an attempt past its deadline fails, a silent broker is lost, a
    /// heartbeat is queued when we have been quiet, a close that is not confirmed ends.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Connecting { deadline } if now >= deadline => {
                let broker = self.broker().to_owned();
                self.attempt_failed(now, Error::Timeout { broker, during: "connecting" });
            }
            State::SettingUp { deadline, step } if now >= deadline => {
                let broker = self.broker().to_owned();
                self.attempt_failed(now, Error::Timeout { broker, during: step.doing() });
            }
            State::Closing { deadline } if now >= deadline => {
                self.state = State::Closed;
                self.session = None;
            }
            State::Up => {
                // Hot path (every turn of a worker's loop): nothing allocated unless it failed.
                let result = self.session.as_mut().map_or(Ok(()), |s| s.handle_timeout(now));
                if let Err(e) = result {
                    let broker = self.broker().to_owned();
                    self.lost(now, session_error(&broker, e, false));
                }
            }
            _ => {}
        }
    }

    /// Closes: an up connection says goodbye and waits up to [`CLOSE_WAIT`] for the
    /// broker's answer; anything else ends at once.
    pub fn close(&mut self, now: Instant) {
        match self.state {
            State::Up => {
                if let Some(s) = &mut self.session {
                    s.close(200, "bye");
                }
                self.state = State::Closing { deadline: now + CLOSE_WAIT };
            }
            State::Closing { .. } | State::Closed => {}
            _ => {
                self.session = None;
                self.state = State::Closed;
            }
        }
    }

    /// What happened since the last call, oldest first.
    pub fn poll_note(&mut self) -> Option<Note> {
        self.notes.pop_front()
    }

    /// Puts a note back at the end (an owner that looked for one kind of note).
    pub fn push_note(&mut self, note: Note) {
        self.notes.push_back(note);
    }

    /// Ends at once, whatever the phase (a close the broker did not confirm in time).
    pub fn abandon(&mut self) {
        self.session = None;
        self.state = State::Closed;
    }

    fn attempt_timeout(&self) -> Duration {
        let by_url = self.nodes.get(self.node).and_then(|n| n.timeout);
        by_url.unwrap_or(if self.ever_up { LATER_ATTEMPT } else { FIRST_ATTEMPT })
    }

    /// How long the answer after `step`'s may take: the attempt's budget, or a round of
    /// bindings' ([`BIND_ROUND`]) when the next answer confirms bindings (the URL's
    /// `connection_timeout` still rules when given).
    fn answer_timeout(&self, step: Step) -> Duration {
        let binding = matches!(step, Step::QueueDeclare | Step::Bind(_));
        match self.nodes.get(self.node).and_then(|n| n.timeout) {
            Some(by_url) => by_url,
            None if binding => BIND_ROUND,
            None => self.attempt_timeout(),
        }
    }
}

/// A set-up answer, copied out of the session's borrow.
enum Answer {
    Opened,
    /// A reply; for `queue.declare`, the queue's name.
    Reply(Option<String>),
}

/// The queue name a `queue.declare-ok` starts with (other replies: whatever parses).
fn queue_name(args: &[u8]) -> Option<String> {
    Args::new(args).shortstr().ok().map(|n| String::from_utf8_lossy(n).into_owned())
}

/// A session error with the broker's name and advice.
pub fn session_error(broker: &str, e: session::Error, handshaking: bool) -> Error {
    Error::Session { broker: broker.to_owned(), hint: hint_for(&e, handshaking), source: e }
}

#[cfg(test)]
mod tests {
    //! The machine against a scripted broker with a fake clock (quinn-proto's `Pair` is the
    //! model): [`Broker`] answers what the machine sends, as RabbitMQ would, or does what a
    //! test tells it (refuse, stay silent, block, close). No sockets, no sleeps.

    use super::*;
    use crate::amqp::url::Mechanism;
    use crate::amqp::wire::method;
    use crate::amqp::wire::{self, Properties, Writer};

    const HEARTBEAT: u16 = 10;

    fn node(i: usize) -> Node {
        Node {
            broker: format!("node{i}:5672"),
            session: session::Config {
                mechanism: Mechanism::Plain,
                username: "h1".into(),
                password: "pw".into(),
                vhost: "/".into(),
                connection_name: "test".into(),
                frame_max: 131_072,
                heartbeat: Duration::from_secs(u64::from(HEARTBEAT)),
                max_body: 1 << 20,
            },
            timeout: None,
        }
    }

    fn plan() -> Plan {
        Plan {
            exchange: "tunbus.lab".into(),
            queue: Some(QueuePlan {
                name: "tunbus.lab.h1.0".into(),
                options: QueueOptions { exclusive: true, ..QueueOptions::default() },
                max_length: Some(4096),
                max_length_bytes: Some(4 << 20),
                bindings: vec!["tunbus.v1.198-18-0-1.*".into(), "tunbus.v1.all.*".into()],
                prefetch: Some(32),
                consume: Some(Consume { tag: "tunbus-h1-0".into(), ..Consume::default() }),
            }),
        }
    }

    /// How a scripted node behaves.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Behaviour {
        /// Answers everything, as RabbitMQ does.
        Normal,
        /// Accepts the transport, then never says a word.
        Silent,
        /// Refuses the transport (connection refused).
        Refuses,
        /// The exchange does not exist (404 on the passive declare).
        NoExchange,
        /// Refuses the queue's first binding (403).
        RefusesBind,
        /// Declares the queue, then says nothing more (a broker busy with others' bindings).
        StallsAfterQueueDeclare,
    }

    /// A scripted broker node: reads the frames the machine sends and writes RabbitMQ's
    /// answers into `to_client`.
    struct Broker {
        behaviour: Behaviour,
        inbox: Vec<u8>,
        to_client: Vec<u8>,
        got_header: bool,
        asked: Vec<(u16, u16)>,
        exchange_declared: bool,
        refused: bool,
    }

    impl Broker {
        fn new(behaviour: Behaviour) -> Broker {
            Broker { behaviour, inbox: Vec::new(), to_client: Vec::new(), got_header: false, asked: Vec::new(), exchange_declared: false, refused: false }
        }

        fn method(&mut self, channel: u16, id: (u16, u16), args: impl FnOnce(&mut Writer)) {
            let mut w = Writer::new();
            w.method(channel, id, args);
            self.to_client.extend_from_slice(&w.buf);
        }

        fn channel_close(&mut self, code: u16, text: &str, failed: (u16, u16)) {
            self.method(1, method::CHANNEL_CLOSE, |w| {
                w.short(code).shortstr(text.as_bytes()).short(failed.0).short(failed.1);
            });
        }

        /// Takes what the client sent and answers it.
        fn receive(&mut self, bytes: &[u8]) {
            if self.behaviour == Behaviour::Silent {
                return;
            }
            self.inbox.extend_from_slice(bytes);
            if !self.got_header {
                if self.inbox.len() < 8 {
                    return;
                }
                assert_eq!(&self.inbox[..8], wire::PROTOCOL_HEADER);
                self.inbox.drain(..8);
                self.got_header = true;
                self.method(0, method::CONNECTION_START, |w| {
                    w.octet(0).octet(9).table(&[("product", Value::Str("RabbitMQ"))]).longstr(b"PLAIN AMQPLAIN").longstr(b"en_US");
                });
            }
            while let Some((f, n)) = wire::parse_frame(&self.inbox, 1 << 20).expect("the client sends valid frames") {
                let (kind, payload) = (f.kind, f.payload.to_vec());
                self.inbox.drain(..n);
                if kind != wire::FRAME_METHOD {
                    continue;
                }
                let (m, args) = wire::method_of(&payload).expect("valid method");
                self.asked.push(m);
                if self.refused && m.0 != 10 {
                    continue; // channel 1 is closed: RabbitMQ ignores what follows until close-ok
                }
                match m {
                    method::CONNECTION_START_OK => self.method(0, method::CONNECTION_TUNE, |w| {
                        w.short(2047).long(131_072).short(HEARTBEAT);
                    }),
                    method::CONNECTION_OPEN => self.method(0, method::CONNECTION_OPEN_OK, |w| {
                        w.shortstr(b"");
                    }),
                    method::CHANNEL_OPEN => self.method(1, method::CHANNEL_OPEN_OK, |w| {
                        w.longstr(b"");
                    }),
                    method::EXCHANGE_DECLARE => {
                        let mut a = args;
                        let _ = a.short();
                        let _ = a.shortstr();
                        let _ = a.shortstr();
                        let passive = a.bit().unwrap_or(false);
                        if passive && self.behaviour == Behaviour::NoExchange && !self.exchange_declared {
                            self.channel_close(404, "NOT_FOUND - no exchange", m);
                        } else {
                            self.exchange_declared |= !passive;
                            self.method(1, method::EXCHANGE_DECLARE_OK, |_| {});
                        }
                    }
                    method::QUEUE_DECLARE => {
                        let mut a = args;
                        let _ = a.short();
                        let name = a.shortstr().unwrap_or(b"").to_vec();
                        let name = if name.is_empty() { b"amq.gen-xyz".to_vec() } else { name };
                        self.method(1, method::QUEUE_DECLARE_OK, |w| {
                            w.shortstr(&name).long(0).long(0);
                        });
                        if self.behaviour == Behaviour::StallsAfterQueueDeclare {
                            self.behaviour = Behaviour::Silent;
                        }
                    }
                    method::QUEUE_BIND => {
                        let mut a = args;
                        let _ = (a.short(), a.shortstr(), a.shortstr(), a.shortstr());
                        let nowait = a.bit().unwrap_or(false);
                        if self.behaviour == Behaviour::RefusesBind {
                            // Further methods on the closed channel are ignored, as RabbitMQ does.
                            if !self.refused {
                                self.channel_close(403, "ACCESS_REFUSED - no write access", m);
                                self.refused = true;
                            }
                        } else if !nowait {
                            self.method(1, method::QUEUE_BIND_OK, |_| {});
                        }
                    }
                    method::BASIC_QOS => self.method(1, method::BASIC_QOS_OK, |_| {}),
                    method::BASIC_CONSUME => self.method(1, method::BASIC_CONSUME_OK, |w| {
                        w.shortstr(b"ctag");
                    }),
                    method::CONNECTION_CLOSE => self.method(0, method::CONNECTION_CLOSE_OK, |_| {}),
                    _ => {}
                }
            }
        }

        fn deliver(&mut self, tag: u64, key: &[u8], body: &[u8]) {
            let mut w = Writer::new();
            w.method(1, method::BASIC_DELIVER, |w| {
                w.shortstr(b"ctag").longlong(tag).bit(false).shortstr(b"tunbus.lab").shortstr(key);
            });
            w.content_header(1, body.len() as u64, &Properties::default());
            w.begin_frame(wire::FRAME_BODY, 1);
            w.buf.extend_from_slice(body);
            w.end_frame();
            self.to_client.extend_from_slice(&w.buf);
        }
    }

    /// The machine and its scripted nodes, with a fake clock. `transport` is the node the
    /// machine is connected to, as the shell would hold it.
    struct Pair {
        conn: Connection,
        brokers: Vec<Broker>,
        now: Instant,
        transport: Option<usize>,
        notes: Vec<Note>,
        delivered: Vec<(u64, Vec<u8>)>,
        events: Vec<&'static str>,
    }

    impl Pair {
        fn new(behaviours: &[Behaviour], retry: Retry) -> Pair {
            let now = Instant::now();
            let nodes = (0..behaviours.len()).map(node).collect();
            Pair {
                conn: Connection::new(nodes, plan(), retry, 7, now),
                brokers: behaviours.iter().map(|&b| Broker::new(b)).collect(),
                now,
                transport: None,
                notes: Vec::new(),
                delivered: Vec::new(),
                events: Vec::new(),
            }
        }

        /// Does what the shell does, until nothing moves.
        fn drive(&mut self) {
            for _ in 0..1000 {
                let mut moved = false;
                self.conn.handle_timeout(self.now);
                if let Some(n) = self.conn.poll_connect(self.now) {
                    if self.brokers[n].behaviour == Behaviour::Refuses {
                        self.conn.failed(self.now, Error::Connect { broker: format!("node{n}"), source: std::io::ErrorKind::ConnectionRefused.into() });
                    } else {
                        self.brokers[n] = Broker::new(self.brokers[n].behaviour);
                        self.brokers[n].exchange_declared = self.brokers.iter().any(|b| b.exchange_declared);
                        self.transport = Some(n);
                        self.conn.connected(self.now);
                    }
                    moved = true;
                }
                if !self.conn.wants_transport() {
                    self.transport = None;
                }
                if let Some(n) = self.transport {
                    let out = self.conn.pending().to_vec();
                    if !out.is_empty() {
                        self.conn.sent(out.len(), self.now);
                        self.brokers[n].receive(&out);
                        moved = true;
                    }
                    let input = std::mem::take(&mut self.brokers[n].to_client);
                    let mut at = 0;
                    while at < input.len() {
                        match self.conn.handle(self.now, &input[at..]) {
                            Ok(h) => {
                                at += h.consumed;
                                match h.event {
                                    Some(Event::Delivery(d)) => self.delivered.push((d.tag, d.body.to_vec())),
                                    Some(Event::Blocked) => self.events.push("blocked"),
                                    Some(Event::Unblocked) => self.events.push("unblocked"),
                                    Some(Event::Closed) => self.events.push("closed"),
                                    Some(_) => {}
                                    None if h.consumed == 0 => break,
                                    None => {}
                                }
                            }
                            Err(e) => {
                                self.conn.failed(self.now, e);
                                break;
                            }
                        }
                        moved = true;
                    }
                    if !self.conn.wants_transport() {
                        self.transport = None;
                    }
                }
                while let Some(n) = self.conn.poll_note() {
                    self.notes.push(n);
                }
                if !moved {
                    return;
                }
            }
            panic!("the machine never settles");
        }

        /// Moves the clock to the machine's next deadline (as the shell's poll would).
        fn sleep_until_due(&mut self) {
            let t = self.conn.poll_timeout().expect("something is due");
            self.now = self.now.max(t);
            self.drive();
        }

        fn ups(&self) -> Vec<(usize, bool)> {
            self.notes.iter().filter_map(|n| if let Note::Up { node, again } = n { Some((*node, *again)) } else { None }).collect()
        }
    }

    #[test]
    fn connects_logs_in_and_runs_the_plan_in_order() {
        let mut p = Pair::new(&[Behaviour::Normal], Retry::Forever);
        assert_eq!(p.conn.phase(), Phase::Waiting);
        p.drive();
        assert_eq!(p.conn.phase(), Phase::Up);
        assert_eq!(p.ups(), [(0, false)]);
        assert_eq!(
            p.brokers[0].asked,
            [
                method::CONNECTION_START_OK,
                method::CONNECTION_TUNE_OK,
                method::CONNECTION_OPEN,
                method::CHANNEL_OPEN,
                method::EXCHANGE_DECLARE,
                method::QUEUE_DECLARE,
                method::QUEUE_BIND,
                method::QUEUE_BIND,
                method::QUEUE_DECLARE, // passive: confirms the bindings sent without waiting
                method::BASIC_QOS,
                method::BASIC_CONSUME
            ]
        );
        assert_eq!(p.conn.queue(), "tunbus.lab.h1.0");
        // Tuned: the broker's heartbeat.
        assert_eq!(p.conn.session().map(Session::heartbeat), Some(Duration::from_secs(10)));
        // Deliveries flow to the owner once up.
        p.brokers[0].deliver(1, b"tunbus.v1.198-18-0-1.3", b"batch");
        p.drive();
        assert_eq!(p.delivered, [(1, b"batch".to_vec())]);
    }

    #[test]
    fn a_server_named_queue_is_bound_by_the_name_the_broker_gave() {
        let mut p = Pair::new(&[Behaviour::Normal], Retry::OncePerNode);
        if let Some(q) = &mut p.conn.plan.queue {
            q.name.clear();
        }
        p.drive();
        assert!(p.conn.is_up());
        assert_eq!(p.conn.queue(), "amq.gen-xyz");
    }

    #[test]
    fn bindings_go_without_waiting_and_a_passive_declare_confirms_each_round() {
        let mut p = Pair::new(&[Behaviour::Normal], Retry::OncePerNode);
        if let Some(q) = &mut p.conn.plan.queue {
            q.prefetch = None;
            q.consume = None;
            q.bindings = (0..500).map(|i| format!("tunbus.v1.198-18-1-{i}.*")).collect();
        }
        p.drive();
        assert!(p.conn.is_up());
        let asked = &p.brokers[0].asked;
        assert_eq!(asked.iter().filter(|m| **m == method::QUEUE_BIND).count(), 500);
        // declare, then 8 rounds of up to 64 binds and a passive declare: 9 round trips, not 501.
        assert_eq!(asked.iter().filter(|m| **m == method::QUEUE_DECLARE).count(), 9);
        assert_eq!(asked.last(), Some(&method::QUEUE_DECLARE));
    }

    #[test]
    fn amq_exchanges_and_publish_only_plans_skip_their_steps() {
        let mut p = Pair::new(&[Behaviour::Normal], Retry::OncePerNode);
        p.conn.plan = Plan { exchange: "amq.topic".into(), queue: None };
        p.drive();
        assert!(p.conn.is_up());
        assert_eq!(p.brokers[0].asked.last(), Some(&method::CHANNEL_OPEN));
    }

    #[test]
    fn a_missing_exchange_is_declared_on_a_fresh_connection() {
        let mut p = Pair::new(&[Behaviour::NoExchange], Retry::OncePerNode);
        p.drive();
        assert!(p.conn.is_up(), "{:?}", p.notes);
        assert!(p.notes.iter().all(|n| !matches!(n, Note::AttemptFailed { .. })), "a missing exchange is not a failure: {:?}", p.notes);
        assert!(p.brokers[0].exchange_declared);
    }

    #[test]
    fn a_lost_node_fails_over_to_the_next_after_a_short_backoff() {
        let mut p = Pair::new(&[Behaviour::Normal, Behaviour::Normal], Retry::Forever);
        p.drive();
        assert_eq!(p.ups(), [(0, false)]);
        let lost_at = p.now;
        p.conn.failed(p.now, Error::Eof { broker: "node0:5672".into(), hint: "" });
        p.drive();
        assert_eq!(p.conn.phase(), Phase::Waiting);
        assert!(matches!(p.notes.last(), Some(Note::Lost { node: 0, .. })));
        let due = p.conn.poll_timeout().expect("a retry is due");
        assert!(due <= lost_at + crate::amqp::BACKOFF_BASE, "the first retry waits at most the base backoff");
        p.sleep_until_due();
        assert_eq!(p.ups(), [(0, false), (1, true)], "the next node, counted as a reconnection");
    }

    #[test]
    fn a_node_that_never_answers_costs_one_deadline_then_the_next_takes_over() {
        let mut p = Pair::new(&[Behaviour::Silent, Behaviour::Normal], Retry::Forever);
        let start = p.now;
        p.drive();
        assert_eq!(p.conn.phase(), Phase::SettingUp);
        assert_eq!(p.conn.poll_timeout(), Some(start + FIRST_ATTEMPT));
        p.sleep_until_due();
        assert!(p.conn.is_up());
        assert_eq!(p.ups(), [(1, false)]);
        assert!(matches!(&p.notes[0], Note::AttemptFailed { node: 0, error: Error::Timeout { during: "logging in", .. } }), "{:?}", p.notes);
        assert_eq!(p.now, start + FIRST_ATTEMPT, "no sleeping beyond the deadline");
    }

    #[test]
    fn a_broker_working_through_bindings_gets_a_bindings_round_not_the_attempts_deadline() {
        let mut p = Pair::new(&[Behaviour::StallsAfterQueueDeclare, Behaviour::Normal], Retry::Forever);
        let start = p.now;
        p.drive();
        assert_eq!(p.conn.phase(), Phase::SettingUp, "waiting for the bindings' confirmation");
        // Past the attempt's deadline: still waiting (heartbeats keep the watch).
        p.now = start + FIRST_ATTEMPT + Duration::from_secs(1);
        p.drive();
        assert_eq!(p.conn.phase(), Phase::SettingUp, "{:?}", p.notes);
        assert!(p.notes.is_empty(), "{:?}", p.notes);
        // A round of bindings has its own bound: then the next node.
        p.now = start + BIND_ROUND;
        p.drive();
        p.sleep_until_due();
        assert!(p.conn.is_up(), "{:?}", p.notes);
        assert!(matches!(&p.notes[0], Note::AttemptFailed { node: 0, .. }), "{:?}", p.notes);
    }

    #[test]
    fn after_being_up_an_attempt_gets_the_shorter_deadline() {
        let mut p = Pair::new(&[Behaviour::Normal, Behaviour::Silent], Retry::Forever);
        p.drive();
        p.conn.failed(p.now, Error::Eof { broker: "node0:5672".into(), hint: "" });
        p.sleep_until_due(); // the backoff
        assert_eq!(p.conn.phase(), Phase::SettingUp);
        let deadline = p.conn.poll_timeout().expect("deadline");
        assert_eq!(deadline, p.now + LATER_ATTEMPT);
    }

    #[test]
    fn once_per_node_fails_after_one_round_with_every_error() {
        let mut p = Pair::new(&[Behaviour::Refuses, Behaviour::Refuses], Retry::OncePerNode);
        p.drive();
        assert_eq!(p.conn.phase(), Phase::Failed);
        let failed: Vec<usize> = p.notes.iter().filter_map(|n| if let Note::AttemptFailed { node, .. } = n { Some(*node) } else { None }).collect();
        assert_eq!(failed, [0, 1]);
        assert_eq!(p.conn.poll_timeout(), None);
    }

    #[test]
    fn forever_backs_off_between_rounds_with_a_growing_ceiling() {
        let mut p = Pair::new(&[Behaviour::Refuses, Behaviour::Refuses], Retry::Forever);
        let mut waits = Vec::new();
        p.drive();
        for _ in 0..12 {
            assert_eq!(p.conn.phase(), Phase::Waiting);
            let due = p.conn.poll_timeout().expect("a retry");
            waits.push(due.saturating_duration_since(p.now));
            p.now = due;
            p.drive();
        }
        assert!(waits.iter().all(|w| *w <= crate::amqp::BACKOFF_CAP));
        assert!(waits.iter().skip(6).any(|w| *w > crate::amqp::BACKOFF_BASE), "the ceiling grows: {waits:?}");
        // Two nodes per round, one round per wait.
        let failed = p.notes.iter().filter(|n| matches!(n, Note::AttemptFailed { .. })).count();
        assert_eq!(failed, 26);
    }

    #[test]
    fn a_refused_binding_fails_the_attempt_with_the_permission_class() {
        let mut p = Pair::new(&[Behaviour::RefusesBind], Retry::OncePerNode);
        p.drive();
        assert_eq!(p.conn.phase(), Phase::Failed);
        let Some(Note::AttemptFailed { error, .. }) = p.notes.first() else { panic!("{:?}", p.notes) };
        assert_eq!(error.class(), crate::amqp::error::FailureClass::Permission, "{error}");
    }

    #[test]
    fn blocked_and_unblocked_reach_the_owner_and_the_connection_stays_up() {
        let mut p = Pair::new(&[Behaviour::Normal], Retry::Forever);
        p.drive();
        p.brokers[0].method(0, method::CONNECTION_BLOCKED, |w| {
            w.shortstr(b"low on memory");
        });
        p.drive();
        assert!(p.conn.session().is_some_and(Session::blocked));
        p.brokers[0].method(0, method::CONNECTION_UNBLOCKED, |_| {});
        p.drive();
        assert_eq!(p.events, ["blocked", "unblocked"]);
        assert!(p.conn.is_up());
        assert!(!p.conn.session().is_some_and(Session::blocked));
    }

    #[test]
    fn a_silent_broker_is_lost_after_two_heartbeats() {
        let mut p = Pair::new(&[Behaviour::Normal], Retry::Forever);
        p.drive();
        let up_at = p.now;
        // Nothing more from the broker: heartbeats go out, then it is declared lost.
        for _ in 0..10 {
            if !p.conn.is_up() {
                break;
            }
            let due = p.conn.poll_timeout().expect("heartbeat timer");
            p.now = due;
            p.brokers[0].behaviour = Behaviour::Silent;
            p.drive();
        }
        assert!(!p.conn.is_up());
        let Some(Note::Lost { error, .. }) = p.notes.last() else { panic!("{:?}", p.notes) };
        assert!(error.to_string().contains("two heartbeat intervals"), "{error}");
        assert_eq!(p.now.saturating_duration_since(up_at), Duration::from_secs(2 * u64::from(HEARTBEAT)));
    }

    #[test]
    fn close_waits_for_close_ok_and_gives_up_after_the_wait() {
        let mut p = Pair::new(&[Behaviour::Normal], Retry::Forever);
        p.drive();
        p.conn.close(p.now);
        p.drive();
        assert_eq!(p.conn.phase(), Phase::Closed);
        assert_eq!(p.events, ["closed"]);
        assert_eq!(p.brokers[0].asked.last(), Some(&method::CONNECTION_CLOSE));

        let mut p = Pair::new(&[Behaviour::Normal], Retry::Forever);
        p.drive();
        p.brokers[0].behaviour = Behaviour::Silent;
        p.conn.close(p.now);
        p.drive();
        assert_eq!(p.conn.phase(), Phase::Closing);
        assert_eq!(p.conn.poll_timeout(), Some(p.now + CLOSE_WAIT));
        p.sleep_until_due();
        assert_eq!(p.conn.phase(), Phase::Closed);
        assert!(!p.conn.wants_transport());
    }

    #[test]
    fn closing_before_up_abandons_the_attempt() {
        let mut p = Pair::new(&[Behaviour::Silent], Retry::Forever);
        p.drive();
        assert_eq!(p.conn.phase(), Phase::SettingUp);
        p.conn.close(p.now);
        assert_eq!(p.conn.phase(), Phase::Closed);
        assert!(!p.conn.wants_transport());
        assert_eq!(p.conn.poll_timeout(), None);
    }

    #[test]
    fn a_broker_that_closes_during_login_is_an_auth_failure() {
        let mut p = Pair::new(&[Behaviour::Normal], Retry::OncePerNode);
        // Connect, then answer the login with connection.close 403.
        p.conn.poll_connect(p.now);
        p.conn.connected(p.now);
        let hello = p.conn.pending().to_vec();
        p.conn.sent(hello.len(), p.now);
        p.brokers[0].receive(&hello);
        let start = std::mem::take(&mut p.brokers[0].to_client);
        let h = p.conn.handle(p.now, &start).expect("start is fine");
        assert_eq!(h.consumed, start.len());
        let mut w = Writer::new();
        w.method(0, method::CONNECTION_CLOSE, |w| {
            w.short(403).shortstr(b"ACCESS_REFUSED - Login was refused").short(0).short(0);
        });
        let err = match p.conn.handle(p.now, &w.buf) {
            Err(e) => e,
            Ok(_) => panic!("a refused login is an error"),
        };
        assert_eq!(err.class(), crate::amqp::error::FailureClass::Auth, "{err}");
        p.conn.failed(p.now, err);
        assert_eq!(p.conn.phase(), Phase::Failed);
    }

    #[test]
    fn bindings_added_to_the_plan_are_bound_on_the_next_connection() {
        let mut p = Pair::new(&[Behaviour::Normal], Retry::Forever);
        p.drive();
        p.conn.plan_binding("tunbus.v1.198-18-0-7.*");
        p.conn.plan_binding("tunbus.v1.198-18-0-7.*");
        p.conn.failed(p.now, Error::Eof { broker: "node0:5672".into(), hint: "" });
        p.sleep_until_due();
        assert!(p.conn.is_up());
        let binds = p.brokers[0].asked.iter().filter(|m| **m == method::QUEUE_BIND).count();
        assert_eq!(binds, 3);
    }
}
