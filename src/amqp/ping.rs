//! `agent ping PEER`: probes through the bus to one agent and back, like `tailscale ping`.
//! Control plane, never the data path: the probes travel on keys of their own, and no
//! packet carries them.
//!
//! The pinger opens a short connection of its own with an exclusive, server-named queue
//! bound to its reply key `tunbus.v1.ctl.pong.<token>` and to the target's hello. Each probe
//! is two messages: an **echo** published to its own reply key (it comes back from the
//! broker: the time to the broker and back) and a **ping** on `tunbus.v1.ctl.ping.<name>`,
//! which queue 0 of a native agent binds; the agent's worker answers on the reply key the
//! ping names ([`answer`]), saying which node and queue it answered from (the time to the
//! peer's agent and back). The answer's `user_id`, checked by the broker, names who
//! answered.
//!
//! What no answer means ([`Summary::verdict`]): the echo did not come back either, so the
//! path to the broker is dead ([`Verdict::BrokerPathDead`]); no agent of that name said
//! hello to the presence probe ([`Verdict::NotOnBus`]: stopped, or on another session);
//! it said hello but does not answer pings ([`Verdict::Silent`]). A broker that refuses a
//! key (403) ends the ping with that error: a permission problem.
//!
//! [`answer`] (the agent's side) and the messages are pure; [`run`] (the pinger's side)
//! blocks on the calling thread.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::client::{self, Client, ConnectOptions, Endpoint, Owned};
use super::presence::{Hello, JSON_PROPERTIES};
use crate::route::{Key, RoutingKey, CTL_PROBE, HELLO_PATTERN};
use crate::util::{now_ns, Stop};

/// Bound of the pinger's queue (answers, echoes and hellos).
pub const LISTEN_QUEUE_MAX: i32 = 10_000;
/// Largest ping body an agent keeps for its answer.
pub const MAX_PING_BODY: usize = 512;
/// How long the pinger listens for the target's hello before the first probe.
pub const RESOLVE_WAIT: Duration = Duration::from_millis(1500);

/// A ping, as published on `tunbus.v1.ctl.ping.<name>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingMessage {
    pub seq: u64,
    /// The key to answer on: a pong key ([`Key::Pong`]), nothing else.
    pub reply: String,
    /// The pinger's clock when it sent the ping, echoed back.
    pub sent_ns: u64,
}

/// An answer on a pong key: an agent's, or the pinger's own echo through the broker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    pub seq: u64,
    /// The agent that answered; `None`: the pinger's own echo.
    #[serde(default)]
    pub agent: Option<String>,
    /// The broker node (`host:port`) of the answering connection.
    #[serde(default)]
    pub node: Option<String>,
    /// The queue the ping arrived on.
    #[serde(default)]
    pub queue: Option<String>,
    pub sent_ns: u64,
    /// The answering agent's clock when it answered.
    #[serde(default)]
    pub answered_ns: u64,
}

/// An agent's answer to a ping `body` that arrived on `queue` over a connection to `node`:
/// the reply key and the body to publish there. `None` when the body is not a ping, or
/// names a reply key that is not a pong key (an agent never publishes a ping's answer on a
/// data or presence key).
pub fn answer(body: &[u8], agent: &str, node: &str, queue: &str, now_ns: u64) -> Option<(String, Vec<u8>)> {
    if body.len() > MAX_PING_BODY {
        return None;
    }
    let ping: PingMessage = serde_json::from_slice(body).ok()?;
    if !matches!(Key::parse(&ping.reply), Some(Key::Pong { .. })) {
        return None;
    }
    let pong = Pong {
        seq: ping.seq,
        agent: Some(agent.to_owned()),
        node: Some(node.to_owned()),
        queue: Some(queue.to_owned()),
        sent_ns: ping.sent_ns,
        answered_ns: now_ns,
    };
    Some((ping.reply, serde_json::to_vec(&pong).ok()?))
}

/// Whom to ping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Name(String),
    /// An address: the agent whose hello claims it.
    Address(IpAddr),
}

impl std::str::FromStr for Target {
    type Err = String;
    /// An address (`198.18.0.2`, `fd00:7b::2`, with or without `/LEN`), else an agent name.
    fn from_str(s: &str) -> Result<Target, String> {
        let bare = s.split('/').next().unwrap_or(s);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(Target::Address(ip));
        }
        if crate::route::is_valid_word(s) {
            Ok(Target::Name(s.to_owned()))
        } else {
            Err(format!("{s:?} is neither an address nor an agent name (one topic word: letters, digits, '-', '_')"))
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Name(n) => f.write_str(n),
            Target::Address(a) => write!(f, "{a}"),
        }
    }
}

/// What `agent ping` was asked.
#[derive(Clone, Debug)]
pub struct Options {
    pub endpoints: Vec<Endpoint>,
    pub exchange: String,
    pub target: Target,
    /// Probes to send (at least 1).
    pub count: u32,
    /// Between the starts of two probes.
    pub interval: Duration,
    /// How long a probe waits for its answers.
    pub timeout: Duration,
    pub heartbeat: Duration,
}

/// One probe's outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub seq: u64,
    /// To the broker and back (the echo).
    pub broker: Option<Duration>,
    /// To the peer's agent and back.
    pub peer: Option<Duration>,
    /// The agent's answer, and the broker user that published it.
    pub answer: Option<(Pong, Option<String>)>,
}

/// Why a ping got no answer, or that it got one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// At least one probe came back from the peer's agent.
    Answered,
    /// Not even the echo came back from the broker: the path to it is dead.
    BrokerPathDead,
    /// The broker answers, but no agent of that name (or claiming that address) said hello.
    NotOnBus,
    /// The agent said hello but answered no ping.
    Silent,
}

/// Everything a ping learnt.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// The agent pinged (its name, or the address when no hello claimed it).
    pub name: String,
    /// Its hello, when one was heard.
    pub hello: Option<Hello>,
    /// The broker user of that hello.
    pub hello_user: Option<String>,
    /// The node the pinger's connection is on.
    pub node: String,
    pub probes: Vec<Probe>,
}

impl Summary {
    /// What the probes say (pure).
    pub fn verdict(&self) -> Verdict {
        if self.probes.iter().any(|p| p.peer.is_some()) {
            Verdict::Answered
        } else if !self.probes.is_empty() && self.probes.iter().all(|p| p.broker.is_none()) {
            Verdict::BrokerPathDead
        } else if self.hello.is_none() {
            Verdict::NotOnBus
        } else {
            Verdict::Silent
        }
    }

    /// The closing lines: counts, round trips, and what no answer means.
    pub fn report(&self, exchange: &str) -> String {
        let sent = self.probes.len();
        let answered = self.probes.iter().filter(|p| p.peer.is_some()).count();
        let lost = if sent == 0 { 0.0 } else { 100.0 * (sent - answered) as f64 / sent as f64 };
        let stats = |f: fn(&Probe) -> Option<Duration>| {
            let v: Vec<f64> = self.probes.iter().filter_map(f).map(|d| d.as_secs_f64() * 1e3).collect();
            if v.is_empty() {
                return "-".to_owned();
            }
            let min = v.iter().copied().fold(f64::INFINITY, f64::min);
            let max = v.iter().copied().fold(0.0, f64::max);
            format!("{min:.2}/{:.2}/{max:.2} ms", v.iter().sum::<f64>() / v.len() as f64)
        };
        let mut out = format!(
            "--- {}: {sent} probes, {answered} answered, {lost:.0}% lost; broker min/avg/max {}, peer {}",
            self.name,
            stats(|p| p.broker),
            stats(|p| p.peer)
        );
        let why = match self.verdict() {
            Verdict::Answered => return out,
            Verdict::BrokerPathDead => format!("the broker at {} did not even echo our own probes back: the path to the broker is dead (or it is overloaded)", self.node),
            Verdict::NotOnBus => format!(
                "the broker answers (our echo came back), but no agent {} said hello on exchange {exchange}: it is stopped, not connected yet, or on another --session/--exchange (see `agent peers`)",
                self.name
            ),
            Verdict::Silent => format!(
                "{} is on the bus (it said hello{}) but answered no ping: an agent older than `agent ping`, or one whose worker is stuck (see its log and `agent status` on its host)",
                self.name,
                self.hello_user.as_deref().map(|u| format!(" as broker user {u}")).unwrap_or_default()
            ),
        };
        out.push('\n');
        out.push_str(&why);
        out
    }
}

/// The line of one probe.
pub fn probe_line(name: &str, p: &Probe) -> String {
    let ms = |d: Option<Duration>| d.map_or("-".to_owned(), |d| format!("{:.2} ms", d.as_secs_f64() * 1e3));
    match &p.answer {
        Some((pong, user)) => format!(
            "seq {}: broker {}, peer {} from {} (user {}) on node {}, queue {}",
            p.seq,
            ms(p.broker),
            ms(p.peer),
            pong.agent.as_deref().unwrap_or(name),
            user.as_deref().unwrap_or("-"),
            pong.node.as_deref().unwrap_or("-"),
            pong.queue.as_deref().unwrap_or("-")
        ),
        None => format!("seq {}: broker {}, no answer from {name}", p.seq, ms(p.broker)),
    }
}

/// A word no other pinger uses: the reply key's last word.
fn token() -> String {
    let mut raw = [0u8; 6];
    let random = std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut raw)).is_ok();
    if !random {
        raw[..4].copy_from_slice(&(now_ns() as u32 ^ std::process::id()).to_le_bytes());
    }
    format!("p{}", raw.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// Whether `hello` is the target's.
fn is_target(hello: &Hello, target: &Target) -> bool {
    match target {
        Target::Name(n) => hello.name.as_str() == n,
        Target::Address(a) => hello.addresses.iter().any(|p| p.addr == *a),
    }
}

/// Pings `o.target`; `each` sees every probe as it completes. Returns what was learnt
/// (stopping early when `stop` is raised), or the connection's error: unreachable, TLS,
/// login, vhost, or a key the broker refuses this user (a permission problem).
pub fn run(o: &Options, stop: &Stop, mut each: impl FnMut(&Probe, &Summary)) -> Result<Summary, client::Error> {
    let token = token();
    let reply = RoutingKey::pong(&token).map(|k| k.as_str().to_owned()).unwrap_or_default();
    let hello_key = match &o.target {
        Target::Name(n) => RoutingKey::hello(n).map(|k| k.as_str().to_owned()).unwrap_or_default(),
        Target::Address(_) => HELLO_PATTERN.to_owned(),
    };
    let mut opts = ConnectOptions::new("tunbus ping");
    opts.frame_max = Some(super::CONTROL_FRAME_MAX);
    opts.heartbeat = o.heartbeat;
    let plan = client::Plan::listener(&o.exchange, vec![reply.clone(), hello_key], Some(LISTEN_QUEUE_MAX));
    let mut c = Client::connect(o.endpoints.clone(), &opts, plan, client::Retry::OncePerNode, stop.flag())?;
    let mut s = Summary { name: o.target.to_string(), node: c.broker().to_owned(), ..Summary::default() };
    // Who is it? Ask every agent for its hello, and wait for the target's.
    c.publish_copy(&o.exchange, CTL_PROBE, &JSON_PROPERTIES, br#"{"from":"agent ping"}"#)?;
    let deadline = Instant::now() + RESOLVE_WAIT;
    while s.hello.is_none() && !stop.is_raised() {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else { break };
        match c.wait_event(left, stop.flag())? {
            Some(event) => note_hello(&mut s, &o.target, event),
            None => break,
        }
    }
    let ping_key = match (&o.target, &s.hello) {
        (Target::Name(n), _) => RoutingKey::ping(n),
        (Target::Address(_), Some(h)) => RoutingKey::ping(&h.name),
        (Target::Address(_), None) => None,
    }
    .map(|k| k.as_str().to_owned());
    let started = Instant::now();
    for seq in 1..=u64::from(o.count.max(1)) {
        if stop.is_raised() {
            break;
        }
        let due = started + o.interval * (seq as u32 - 1);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            // Hellos and late answers keep arriving meanwhile.
            let until = Instant::now() + wait;
            while let Some(left) = until.checked_duration_since(Instant::now()) {
                match c.wait_event(left, stop.flag())? {
                    Some(event) => note_hello(&mut s, &o.target, event),
                    None => break,
                }
            }
        }
        let sent = Instant::now();
        let sent_ns = now_ns();
        let echo = Pong { seq, agent: None, node: None, queue: None, sent_ns, answered_ns: 0 };
        c.publish_copy(&o.exchange, &reply, &JSON_PROPERTIES, &serde_json::to_vec(&echo).unwrap_or_default())?;
        if let Some(key) = &ping_key {
            let ping = PingMessage { seq, reply: reply.clone(), sent_ns };
            c.publish_copy(&o.exchange, key, &JSON_PROPERTIES, &serde_json::to_vec(&ping).unwrap_or_default())?;
        }
        let mut probe = Probe { seq, broker: None, peer: None, answer: None };
        let deadline = sent + o.timeout;
        while (probe.broker.is_none() || (ping_key.is_some() && probe.peer.is_none())) && !stop.is_raised() {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else { break };
            let Some(event) = c.wait_event(left, stop.flag())? else { break };
            let Owned::Delivery { routing_key, body, user_id, .. } = &event else { continue };
            if *routing_key != reply {
                note_hello(&mut s, &o.target, event);
                continue;
            }
            let Ok(pong) = serde_json::from_slice::<Pong>(body) else { continue };
            if pong.seq != seq || pong.sent_ns != sent_ns {
                continue; // a late answer to an earlier probe
            }
            if pong.agent.is_none() {
                probe.broker = Some(sent.elapsed());
            } else {
                probe.peer = Some(sent.elapsed());
                probe.answer = Some((pong, user_id.clone()));
            }
        }
        s.probes.push(probe);
        if let Some(p) = s.probes.last() {
            each(p, &s);
        }
    }
    c.close(Duration::from_millis(300));
    Ok(s)
}

/// Notes the target's hello, if `event` is one.
fn note_hello(s: &mut Summary, target: &Target, event: Owned) {
    let Owned::Delivery { body, user_id, .. } = event else { return };
    let Ok(hello) = serde_json::from_slice::<Hello>(&body) else { return };
    if !hello.leaving && is_target(&hello, target) {
        s.name = hello.name.to_string();
        s.hello = Some(hello);
        s.hello_user = user_id;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_answers_on_the_pong_key_only() {
        let ping = PingMessage { seq: 7, reply: "tunbus.v1.ctl.pong.p1a2b".into(), sent_ns: 42 };
        let body = serde_json::to_vec(&ping).unwrap();
        let (key, reply) = answer(&body, "h2", "127.0.0.1:5672", "tunbus.lab.h2.0", 99).unwrap();
        assert_eq!(key, "tunbus.v1.ctl.pong.p1a2b");
        let pong: Pong = serde_json::from_slice(&reply).unwrap();
        assert_eq!((pong.seq, pong.sent_ns, pong.answered_ns), (7, 42, 99));
        assert_eq!((pong.agent.as_deref(), pong.node.as_deref(), pong.queue.as_deref()), (Some("h2"), Some("127.0.0.1:5672"), Some("tunbus.lab.h2.0")));
        // A ping may not make an agent publish anywhere else: data, flood, presence keys.
        for reply in [
            "tunbus.v1.198-18-0-2.3",
            "tunbus.v1.all.h2",
            "tunbus.v1.ctl.hello.h2",
            "tunbus.v1.ctl.probe",
            "tunbus.v1.ctl.pong.*",
            "tunbus.v1.ctl.pong.a.b",
            "x",
        ] {
            let body = serde_json::to_vec(&PingMessage { seq: 1, reply: reply.into(), sent_ns: 0 }).unwrap();
            assert_eq!(answer(&body, "h2", "n", "q", 0), None, "{reply}");
        }
        assert_eq!(answer(b"not json", "h2", "n", "q", 0), None);
        let big = format!(r#"{{"seq":1,"reply":"tunbus.v1.ctl.pong.p","sent_ns":0,"pad":"{}"}}"#, "x".repeat(MAX_PING_BODY));
        assert_eq!(answer(big.as_bytes(), "h2", "n", "q", 0), None, "bodies are bounded");
    }

    #[test]
    fn targets_are_names_or_addresses() {
        assert_eq!("h2".parse::<Target>(), Ok(Target::Name("h2".into())));
        assert_eq!("198.18.0.2".parse::<Target>(), Ok(Target::Address("198.18.0.2".parse().unwrap())));
        assert_eq!("fd00:7b::2/64".parse::<Target>(), Ok(Target::Address("fd00:7b::2".parse().unwrap())));
        assert!("a.b".parse::<Target>().is_err());
        let hello = Hello {
            name: crate::route::AgentName::new("h2").unwrap(),
            session: None,
            addresses: vec!["198.18.0.2/24".parse().unwrap(), "fd00:7b::2/64".parse().unwrap()],
            queues: 1,
            wire: super::super::presence::HelloWire::Native,
            started_unix_ms: 0,
            interface: String::new(),
            netns: None,
            version: String::new(),
            node: None,
            leaving: false,
            advertise: Vec::new(),
            layer: Default::default(),
            macs: Vec::new(),
            key: None,
        };
        assert!(is_target(&hello, &"h2".parse().unwrap()) && is_target(&hello, &"fd00:7b::2".parse().unwrap()));
        assert!(!is_target(&hello, &"h3".parse().unwrap()) && !is_target(&hello, &"198.18.0.3".parse().unwrap()));
    }

    #[test]
    fn the_verdict_tells_a_dead_peer_from_a_dead_broker_path() {
        let ms = |n| Some(Duration::from_millis(n));
        let probe = |broker, peer| Probe { seq: 1, broker, peer, answer: None };
        let mut s = Summary { name: "h2".into(), node: "127.0.0.1:5672".into(), ..Summary::default() };
        s.probes = vec![probe(None, None), probe(ms(1), ms(2))];
        assert_eq!(s.verdict(), Verdict::Answered);
        s.probes = vec![probe(None, None), probe(None, None)];
        assert_eq!(s.verdict(), Verdict::BrokerPathDead);
        assert!(s.report("amq.topic").contains("path to the broker is dead"), "{}", s.report("amq.topic"));
        s.probes = vec![probe(ms(1), None)];
        assert_eq!(s.verdict(), Verdict::NotOnBus);
        assert!(s.report("amq.topic").contains("no agent h2 said hello"), "{}", s.report("amq.topic"));
        s.hello = Some(Hello {
            name: crate::route::AgentName::new("h2").unwrap(),
            session: None,
            addresses: Vec::new(),
            queues: 1,
            wire: super::super::presence::HelloWire::Native,
            started_unix_ms: 0,
            interface: String::new(),
            netns: None,
            version: String::new(),
            node: None,
            leaving: false,
            advertise: Vec::new(),
            layer: Default::default(),
            macs: Vec::new(),
            key: None,
        });
        assert_eq!(s.verdict(), Verdict::Silent);
        assert!(s.report("amq.topic").contains("answered no ping"));
    }
}
