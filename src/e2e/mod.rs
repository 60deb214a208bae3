//! End-to-end encryption (`agent connect --e2e`, docs/decisions/0029): the broker carries
//! only ciphertext. Every batch is sealed by the sending agent and opened by the receiving
//! one; the broker sees routing keys, sizes and timing.
//!
//! - [`keys`]: static X25519 keys (`agent keygen`, the peers file's `key=`).
//! - [`handshake`]: Noise IK over the bus (`tunbus.v1.ctl.e2e.<name>`), through `snow`.
//! - [`seal`]: the sealed batch, AES-256-GCM under a session or group key.
//! - [`replay`]: the replay window of each receiving key.
//! - [`E2e`] (here): the agent's keys and sessions, shared by its queue workers. Unicast
//!   batches are sealed with the session of the destination's peer (one session per peer
//!   and direction, rekeyed after [`Limits::rekey_after`] or a volume of messages); floods
//!   with this agent's group key, which each peer receives inside the handshake (so over
//!   the pairwise channel). A batch that does not open is counted (`decrypt_failed`), one
//!   whose counter was seen is counted (`replayed`), a peer without a key is refused with
//!   a rate-limited warning (`no_key`), a batch while the handshake is under way is
//!   dropped (`no_session`; TCP and ping retransmit), plaintext is never accepted
//!   (`plaintext`).
//!
//! Threads: every queue worker seals and opens (hot path: one read lock and one mutex per
//! batch, no allocation once the buffers have grown); queue 0 receives the handshake
//! messages; any worker publishes what [`E2e::take_outgoing`] hands it. No clock is read
//! here: `now` and the wall clock come in as arguments, so the tests drive time.

pub mod handshake;
pub mod keylog;
pub mod keys;
pub mod replay;
pub mod seal;

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::route::Prefix;
use handshake::{Initiation, Payload};
use keys::{PrivateKey, PublicKey, KEY_LEN};
use replay::ReplayWindow;
use seal::{Header, Kind};

/// Routing keys of handshake messages: `tunbus.v1.ctl.e2e.<recipient agent>`.
pub const CTL_E2E_PREFIX: &str = "tunbus.v1.ctl.e2e.";

/// The handshake key of agent `name`.
pub fn handshake_key(name: &str) -> String {
    format!("{CTL_E2E_PREFIX}{name}")
}

/// When sessions are renewed and given up.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// A sender starts a new handshake when its session is this old (WireGuard: 120 s).
    pub rekey_after: Duration,
    /// … or has sealed this many batches under it.
    pub rekey_after_messages: u64,
    /// A session this old seals and opens nothing more (WireGuard: 180 s).
    pub reject_after: Duration,
    /// Shortest time between two initiations to one peer.
    pub retry: Duration,
    /// Sessions kept per peer for receiving (the newest is the one that seals).
    pub keep: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            rekey_after: Duration::from_secs(120),
            rekey_after_messages: 1 << 48,
            reject_after: Duration::from_secs(180),
            retry: Duration::from_secs(1),
            keep: 4,
        }
    }
}

/// A peer as the configuration names it: its broker user, its agent, its public key (none:
/// refused with a warning), the prefixes it may use (where its unicast batches go).
#[derive(Clone, Debug)]
pub struct PeerSpec {
    pub user: String,
    pub name: String,
    pub key: Option<PublicKey>,
    pub prefixes: Vec<Prefix>,
}

/// Why a batch was not sealed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SealRefusal {
    /// No peer (with a key) owns the destination.
    NoKey,
    /// The handshake with the destination's peer is under way.
    NoSession,
}

/// Why a received batch was not opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenRefusal {
    /// A v1 frame in clear: an `--e2e` agent never takes one.
    Plaintext,
    /// Neither a sealed batch nor a v1 frame, or a sealed header that does not parse.
    Malformed,
    /// From a user who is no peer with a key.
    NoKey,
    /// No such session or group key for that user, an expired session, or a tag that does
    /// not check out.
    DecryptFailed,
    /// A counter already accepted (or older than the window).
    Replayed,
}

/// One session with a peer: a key each way, the sending counter, the receiving window.
struct Session {
    peer: usize,
    their_index: u32,
    send: seal::Cipher,
    recv: seal::Cipher,
    counter: AtomicU64,
    replay: Mutex<ReplayWindow>,
    born: Instant,
    /// The peer has shown it holds the session (we initiated it, or a batch of the peer's
    /// opened under it): until then a responder keeps sealing with its previous session.
    confirmed: AtomicBool,
}

/// A peer's group key, as its handshake gave it.
struct GroupRx {
    id: u32,
    cipher: seal::Cipher,
    replay: Mutex<ReplayWindow>,
}

#[derive(Default)]
struct PeerState {
    /// Our initiation waiting for its response, and when it went.
    pending: Option<Initiation>,
    last_attempt: Option<Instant>,
    /// The newest initiation accepted from this peer (its wall clock): older ones are replays.
    newest_initiation_ns: u64,
    /// Our indices of its sessions, oldest first.
    indices: VecDeque<u32>,
}

struct Peer {
    spec: PeerSpec,
    current: RwLock<Option<Arc<Session>>>,
    /// The session before `current`: it seals while `current` is not confirmed.
    previous: RwLock<Option<Arc<Session>>>,
    group: RwLock<Option<Arc<GroupRx>>>,
    state: Mutex<PeerState>,
}

/// A handshake message to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub routing_key: String,
    pub body: Vec<u8>,
}

/// What the handshakes did, for logs and tests.
#[derive(Debug, Default)]
pub struct Stats {
    pub initiations: AtomicU64,
    pub responses: AtomicU64,
    pub sessions: AtomicU64,
    pub refused_handshakes: AtomicU64,
}

/// This agent's keys and its sessions with every peer, shared by its workers.
pub struct E2e {
    local: PrivateKey,
    prologue: Vec<u8>,
    limits: Limits,
    peers: Vec<Peer>,
    by_user: HashMap<Vec<u8>, usize>,
    /// (prefix, peer), longest prefix first.
    routes: Vec<(Prefix, usize)>,
    sessions: RwLock<HashMap<u32, Arc<Session>>>,
    group_id: u32,
    group_key: [u8; KEY_LEN],
    group: seal::Cipher,
    group_counter: AtomicU64,
    outbox: Mutex<Vec<Outgoing>>,
    has_outgoing: AtomicBool,
    last_warning: Mutex<Option<Instant>>,
    warned_since: AtomicU64,
    /// `--e2e-key-log`: where session keys are noted for captures (`keylog`).
    key_log: Option<keylog::KeyLog>,
    pub stats: Stats,
}

fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    // The operating system's randomness never fails on Linux once booted; a zero index
    // would only collide, never weaken a key.
    let _ = getrandom::fill(&mut b);
    u32::from_ne_bytes(b)
}

impl E2e {
    /// The state of agent `own_user` (left out of `peers`) of `session`, with `local` as its key.
    pub fn new(local: PrivateKey, own_user: &str, session: Option<&str>, peers: Vec<PeerSpec>, limits: Limits) -> Result<E2e, String> {
        let mut group_key = [0u8; KEY_LEN];
        getrandom::fill(&mut group_key).map_err(|e| format!("no randomness from the operating system: {e}"))?;
        let mut prologue = b"tunbus e2e v1 session=".to_vec();
        prologue.extend_from_slice(session.unwrap_or("-").as_bytes());
        let mut list = Vec::new();
        let mut by_user = HashMap::new();
        let mut routes = Vec::new();
        for spec in peers {
            if spec.user == own_user || by_user.contains_key(spec.user.as_bytes()) {
                continue;
            }
            let i = list.len();
            by_user.insert(spec.user.as_bytes().to_vec(), i);
            routes.extend(spec.prefixes.iter().map(|p| (*p, i)));
            list.push(Peer {
                spec,
                current: RwLock::new(None),
                previous: RwLock::new(None),
                group: RwLock::new(None),
                state: Mutex::new(PeerState::default()),
            });
        }
        routes.sort_by_key(|r| std::cmp::Reverse(r.0.len));
        Ok(E2e {
            local,
            prologue,
            limits,
            peers: list,
            by_user,
            routes,
            sessions: RwLock::new(HashMap::new()),
            group_id: random_u32() | 1,
            group: seal::cipher(&group_key),
            group_key,
            group_counter: AtomicU64::new(0),
            outbox: Mutex::new(Vec::new()),
            has_outgoing: AtomicBool::new(false),
            last_warning: Mutex::new(None),
            warned_since: AtomicU64::new(0),
            key_log: None,
            stats: Stats::default(),
        })
    }

    /// Notes every key that opens batches to this agent, and its group key, in `log`
    /// (for `agent capture --keys`).
    pub fn with_key_log(mut self, log: keylog::KeyLog) -> E2e {
        log.note(Kind::Group, self.group_id, &self.group_key);
        self.key_log = Some(log);
        self
    }

    pub fn public_key(&self) -> PublicKey {
        self.local.public()
    }

    /// The peers with a key (their agents' names).
    pub fn peers_with_keys(&self) -> impl Iterator<Item = &str> {
        self.peers.iter().filter(|p| p.spec.key.is_some()).map(|p| p.spec.name.as_str())
    }

    /// Peers without a key, whose traffic is refused.
    pub fn peers_without_keys(&self) -> impl Iterator<Item = &str> {
        self.peers.iter().filter(|p| p.spec.key.is_none()).map(|p| p.spec.user.as_str())
    }

    fn payload(&self, wall_ns: u64) -> Payload {
        Payload { timestamp_ns: wall_ns, group_id: self.group_id, group_key: self.group_key }
    }

    fn peer_for(&self, dst: IpAddr) -> Option<usize> {
        self.routes.iter().find(|(p, _)| p.contains(dst)).map(|(_, i)| *i)
    }

    /// A warning about a peer without a key, at most one a second (how many since).
    fn warn_no_key(&self, user: Option<&[u8]>, dst: Option<IpAddr>, now: Instant) {
        let since = self.warned_since.fetch_add(1, Ordering::Relaxed) + 1;
        let Ok(mut last) = self.last_warning.try_lock() else { return };
        if last.is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1)) {
            return;
        }
        *last = Some(now);
        self.warned_since.store(0, Ordering::Relaxed);
        let user = user.map(String::from_utf8_lossy);
        tracing::warn!(user = user.as_deref().unwrap_or("-"), destination = ?dst, refused = since, "end-to-end encryption: no public key for this peer, its traffic is refused (add key=<its public key> to its line of the peers file)");
    }

    /// Starts a handshake with every peer that has a key (at start, after a reconnection).
    pub fn initiate_all(&self, now: Instant, wall_ns: u64) {
        for i in 0..self.peers.len() {
            self.want_handshake(i, now, wall_ns, true);
        }
    }

    /// Sends an initiation to peer `i`, at most one per [`Limits::retry`] (`force`: unless
    /// one is already waiting for its response within that time).
    fn want_handshake(&self, i: usize, now: Instant, wall_ns: u64, force: bool) {
        let peer = &self.peers[i];
        let Some(remote) = peer.spec.key else { return };
        let Ok(mut st) = peer.state.lock() else { return };
        if !force && st.last_attempt.is_some_and(|t| now.saturating_duration_since(t) < self.limits.retry) {
            return;
        }
        if force && st.pending.is_some() && st.last_attempt.is_some_and(|t| now.saturating_duration_since(t) < self.limits.retry) {
            return;
        }
        st.last_attempt = Some(now);
        let Ok((init, msg)) = handshake::initiate(&self.local, &remote, &self.prologue, self.new_index(), self.payload(wall_ns)) else { return };
        st.pending = Some(init);
        drop(st);
        self.stats.initiations.fetch_add(1, Ordering::Relaxed);
        self.push(Outgoing { routing_key: handshake_key(&peer.spec.name), body: msg });
    }

    fn new_index(&self) -> u32 {
        let sessions = self.sessions.read().unwrap_or_else(|e| e.into_inner());
        loop {
            let i = random_u32();
            if i != 0 && !sessions.contains_key(&i) {
                return i;
            }
        }
    }

    fn push(&self, out: Outgoing) {
        if let Ok(mut o) = self.outbox.lock() {
            if o.len() < 4096 {
                o.push(out);
            }
            self.has_outgoing.store(true, Ordering::Release);
        }
    }

    /// The handshake messages to publish now (no allocation when there are none).
    pub fn take_outgoing(&self) -> Vec<Outgoing> {
        if !self.has_outgoing.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        self.outbox.lock().map(|mut o| std::mem::take(&mut *o)).unwrap_or_default()
    }

    /// Whether handshake messages wait in the outbox.
    pub fn has_outgoing(&self) -> bool {
        self.has_outgoing.load(Ordering::Acquire)
    }

    /// Seals `frame` for `routing_key` into `out`: with the session of the peer owning
    /// `dst` (unicast), or with this agent's group key (`dst` = `None`: a flood).
    pub fn seal(&self, dst: Option<IpAddr>, routing_key: &str, frame: &[u8], out: &mut Vec<u8>, now: Instant, wall_ns: u64) -> Result<(), SealRefusal> {
        let Some(dst) = dst else {
            let counter = self.group_counter.fetch_add(1, Ordering::Relaxed);
            let h = Header { kind: Kind::Group, index: self.group_id, counter };
            return seal::seal(&self.group, h, routing_key.as_bytes(), frame, out).map_err(|_| SealRefusal::NoSession);
        };
        let Some(i) = self.peer_for(dst).filter(|&i| self.peers[i].spec.key.is_some()) else {
            self.warn_no_key(None, Some(dst), now);
            return Err(SealRefusal::NoKey);
        };
        let peer = &self.peers[i];
        let alive = |s: &Arc<Session>| now.saturating_duration_since(s.born) < self.limits.reject_after;
        let current = peer.current.read().ok().and_then(|c| c.clone());
        // A responder's new session seals once the initiator has shown it holds it: its
        // batches could otherwise reach the initiator before the response does.
        let sealing = match current {
            Some(c) if !c.confirmed.load(Ordering::Relaxed) => match peer.previous.read().ok().and_then(|p| p.clone()) {
                Some(p) if alive(&p) => Some(p),
                _ => Some(c),
            },
            other => other,
        };
        match sealing {
            Some(s) if alive(&s) => {
                let counter = s.counter.fetch_add(1, Ordering::Relaxed);
                if now.saturating_duration_since(s.born) >= self.limits.rekey_after || counter >= self.limits.rekey_after_messages {
                    self.want_handshake(i, now, wall_ns, false);
                }
                let h = Header { kind: Kind::Pair, index: s.their_index, counter };
                seal::seal(&s.send, h, routing_key.as_bytes(), frame, out).map_err(|_| SealRefusal::NoSession)
            }
            _ => {
                self.want_handshake(i, now, wall_ns, false);
                Err(SealRefusal::NoSession)
            }
        }
    }

    /// Opens `body`, received from broker user `user` with `routing_key`, into `out`.
    /// Returns the peer's user: the identity the packets' sources are checked against.
    pub fn open(&self, user: Option<&[u8]>, routing_key: &[u8], body: &[u8], out: &mut Vec<u8>, now: Instant, wall_ns: u64) -> Result<&str, OpenRefusal> {
        if !seal::is_sealed(body) {
            return Err(if body.starts_with(&crate::codec::v1::MAGIC) { OpenRefusal::Plaintext } else { OpenRefusal::Malformed });
        }
        let h = seal::parse(body).map_err(|_| OpenRefusal::Malformed)?;
        let Some(&i) = user.and_then(|u| self.by_user.get(u)).filter(|&&i| self.peers[i].spec.key.is_some()) else {
            self.warn_no_key(user, None, now);
            return Err(OpenRefusal::NoKey);
        };
        let peer = &self.peers[i];
        let keyed = match h.kind {
            Kind::Pair => {
                let s = self.sessions.read().ok().and_then(|m| m.get(&h.index).cloned());
                match s {
                    Some(s) if s.peer == i && now.saturating_duration_since(s.born) < self.limits.reject_after => Keyed::Session(s),
                    _ => {
                        // It has a session we do not know (we restarted, or it did): a new one.
                        self.want_handshake(i, now, wall_ns, false);
                        return Err(OpenRefusal::DecryptFailed);
                    }
                }
            }
            Kind::Group => match peer.group.read().ok().and_then(|g| g.clone()) {
                Some(g) if g.id == h.index => Keyed::Group(g),
                _ => {
                    self.want_handshake(i, now, wall_ns, false);
                    return Err(OpenRefusal::DecryptFailed);
                }
            },
        };
        let (cipher, replay) = match &keyed {
            Keyed::Session(s) => (&s.recv, &s.replay),
            Keyed::Group(g) => (&g.cipher, &g.replay),
        };
        // Authenticated first, then the window: an altered copy of a seen batch is a
        // forgery (`decrypt_failed`), an exact one a replay, and neither moves the window.
        seal::open(cipher, h, routing_key, body, out).map_err(|_| OpenRefusal::DecryptFailed)?;
        let accepted = replay.lock().map(|mut w| w.accept(h.counter).is_ok()).unwrap_or(false);
        if !accepted {
            out.clear();
            return Err(OpenRefusal::Replayed);
        }
        if let Keyed::Session(s) = &keyed {
            if !s.confirmed.load(Ordering::Relaxed) {
                s.confirmed.store(true, Ordering::Relaxed);
            }
        }
        Ok(peer.spec.user.as_str())
    }

    /// A handshake message from broker user `user` on `routing_key`: answered (into the
    /// outbox), completed, or (a sealed empty batch) the initiator's confirmation.
    pub fn on_handshake(&self, user: Option<&[u8]>, routing_key: &[u8], body: &[u8], now: Instant, wall_ns: u64) -> Result<(), OpenRefusal> {
        if seal::is_sealed(body) {
            let mut scratch = Vec::new();
            return self.open(user, routing_key, body, &mut scratch, now, wall_ns).map(|_| ());
        }
        let env = handshake::envelope(body).map_err(|_| OpenRefusal::Malformed)?;
        let Some(&i) = user.and_then(|u| self.by_user.get(u)) else {
            self.warn_no_key(user, None, now);
            return Err(OpenRefusal::NoKey);
        };
        let peer = &self.peers[i];
        let Some(expected) = peer.spec.key else {
            self.warn_no_key(user, None, now);
            return Err(OpenRefusal::NoKey);
        };
        let refused = |r| {
            self.stats.refused_handshakes.fetch_add(1, Ordering::Relaxed);
            Err(r)
        };
        match env.kind {
            handshake::Type::Initiation => {
                let index = self.new_index();
                let Ok(r) = handshake::respond(&self.local, &self.prologue, body, index, self.payload(wall_ns)) else {
                    return refused(OpenRefusal::DecryptFailed);
                };
                if r.remote != expected {
                    return refused(OpenRefusal::DecryptFailed);
                }
                let Ok(mut st) = peer.state.lock() else { return refused(OpenRefusal::DecryptFailed) };
                if r.payload.timestamp_ns <= st.newest_initiation_ns {
                    drop(st);
                    return refused(OpenRefusal::Replayed);
                }
                st.newest_initiation_ns = r.payload.timestamp_ns;
                self.install(i, &mut st, index, r.their_index, &r.keys, now, false);
                drop(st);
                self.set_group(i, &r.payload);
                self.stats.responses.fetch_add(1, Ordering::Relaxed);
                self.push(Outgoing { routing_key: handshake_key(&peer.spec.name), body: r.message });
                Ok(())
            }
            handshake::Type::Response => {
                let Ok(mut st) = peer.state.lock() else { return refused(OpenRefusal::DecryptFailed) };
                let Some(init) = st.pending.take_if(|p| p.index == env.receiver) else {
                    drop(st);
                    return refused(OpenRefusal::Replayed); // an answer to nothing we asked (now)
                };
                let our = init.index;
                let Ok((their, payload, keys)) = handshake::finish(init, body) else {
                    drop(st);
                    return refused(OpenRefusal::DecryptFailed);
                };
                let s = self.install(i, &mut st, our, their, &keys, now, true);
                drop(st);
                self.set_group(i, &payload);
                // Confirms the session to the responder at once: an empty batch sealed
                // under it, on its handshake key.
                let key = handshake_key(&peer.spec.name);
                let h = Header { kind: Kind::Pair, index: s.their_index, counter: s.counter.fetch_add(1, Ordering::Relaxed) };
                let mut body = Vec::new();
                if seal::seal(&s.send, h, key.as_bytes(), b"", &mut body).is_ok() {
                    self.push(Outgoing { routing_key: key, body });
                }
                Ok(())
            }
        }
    }

    /// A new session with peer `i` (ours `our`, theirs `their`): it seals from now on (a
    /// responder's once confirmed); the oldest beyond [`Limits::keep`] are forgotten.
    #[allow(clippy::too_many_arguments)]
    fn install(&self, i: usize, st: &mut PeerState, our: u32, their: u32, keys: &handshake::SessionKeys, now: Instant, initiator: bool) -> Arc<Session> {
        let s = Arc::new(Session {
            peer: i,
            their_index: their,
            send: seal::cipher(&keys.send),
            recv: seal::cipher(&keys.recv),
            counter: AtomicU64::new(0),
            replay: Mutex::new(ReplayWindow::default()),
            born: now,
            confirmed: AtomicBool::new(initiator),
        });
        if let Some(log) = &self.key_log {
            log.note(Kind::Pair, our, &keys.recv);
        }
        if let Ok(mut m) = self.sessions.write() {
            m.insert(our, s.clone());
            st.indices.push_back(our);
            while st.indices.len() > self.limits.keep.max(1) {
                if let Some(old) = st.indices.pop_front() {
                    m.remove(&old);
                }
            }
        }
        if let Ok(mut c) = self.peers[i].current.write() {
            let old = c.replace(s.clone());
            if let Ok(mut p) = self.peers[i].previous.write() {
                *p = old;
            }
        }
        let first = self.stats.sessions.fetch_add(1, Ordering::Relaxed) == 0;
        tracing::debug!(peer = %self.peers[i].spec.name, first, initiator, "end-to-end session established");
        s
    }

    fn set_group(&self, i: usize, p: &Payload) {
        if let Ok(mut g) = self.peers[i].group.write() {
            if g.as_ref().is_none_or(|g| g.id != p.group_id) {
                *g = Some(Arc::new(GroupRx { id: p.group_id, cipher: seal::cipher(&p.group_key), replay: Mutex::new(ReplayWindow::default()) }));
            }
        }
    }

    /// Whether peer `name` (an agent name) has a session now.
    pub fn has_session(&self, name: &str) -> bool {
        self.peers.iter().any(|p| p.spec.name == name && p.current.read().is_ok_and(|c| c.is_some()))
    }
}

/// The key a received batch is opened with.
enum Keyed {
    Session(Arc<Session>),
    Group(Arc<GroupRx>),
}

#[cfg(test)]
mod tests;
