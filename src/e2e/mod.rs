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
//!   the pairwise channel), renewed as often as sessions are ([`E2e::tick`]). Peers come
//!   from the peers file ([`KeySource::PeersFile`]) or, without one, are pinned on first
//!   use from their hellos ([`KeySource::FirstUse`], [`E2e::learn`]).
//!   A batch that does not open is counted (`decrypt_failed`), one
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
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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
    /// A new group key is handed to every peer this long before floods are sealed with it
    /// (the old one still opens meanwhile, and after).
    pub group_switch: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            rekey_after: Duration::from_secs(120),
            rekey_after_messages: 1 << 48,
            reject_after: Duration::from_secs(180),
            retry: Duration::from_secs(1),
            keep: 4,
            group_switch: Duration::from_secs(2),
        }
    }
}

/// Where peers' public keys come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// The peers file names every peer and its key (strict mode): nobody else is a peer.
    PeersFile,
    /// No peers file (first-claim mode): an agent's key is pinned from its first hello that
    /// carries one, and a later hello with another key (or another broker user) for the
    /// same agent is refused. Trust on first use, as SSH's known hosts: docs/security.md.
    FirstUse,
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

/// The group keys a peer handed over: the newest, and the one before (its floods sealed
/// before it switched still open).
#[derive(Default)]
struct GroupsRx {
    current: Option<Arc<GroupRx>>,
    previous: Option<Arc<GroupRx>>,
}

impl GroupsRx {
    fn find(&self, id: u32) -> Option<Arc<GroupRx>> {
        [&self.current, &self.previous].into_iter().flatten().find(|g| g.id == id).cloned()
    }
}

/// This agent's group key: what its floods are sealed with.
struct GroupTx {
    id: u32,
    key: [u8; KEY_LEN],
    cipher: seal::Cipher,
    counter: AtomicU64,
}

impl GroupTx {
    fn new() -> Result<GroupTx, String> {
        let mut key = [0u8; KEY_LEN];
        getrandom::fill(&mut key).map_err(|e| format!("no randomness from the operating system: {e}"))?;
        Ok(GroupTx { id: random_u32() | 1, cipher: seal::cipher(&key), key, counter: AtomicU64::new(0) })
    }
}

/// The group key that seals, and the next one while peers are being handed it.
struct GroupKeys {
    sealing: Arc<GroupTx>,
    /// Since when `sealing` seals (`None` until the first [`E2e::tick`]).
    since: Option<Instant>,
    /// The next key and when it starts sealing: handshakes carry it from its making on.
    next: Option<(Arc<GroupTx>, Instant)>,
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
    group: RwLock<GroupsRx>,
    state: Mutex<PeerState>,
}

impl Peer {
    fn new(spec: PeerSpec) -> Peer {
        Peer { spec, current: RwLock::new(None), previous: RwLock::new(None), group: RwLock::new(GroupsRx::default()), state: Mutex::new(PeerState::default()) }
    }
}

/// Every peer known, and how to find one. Peers are only ever added (a key pinned on first
/// use stays pinned while the agent runs), so a peer's index stays valid.
#[derive(Default)]
struct Directory {
    peers: Vec<Arc<Peer>>,
    /// Broker user → its peers (one in strict mode; first use lets agents share a login).
    by_user: HashMap<Vec<u8>, Vec<usize>>,
    by_name: HashMap<String, usize>,
    by_key: HashMap<[u8; KEY_LEN], usize>,
    /// (prefix, peer), longest prefix first: where unicast batches go.
    routes: Vec<(Prefix, usize)>,
}

impl Directory {
    fn add(&mut self, spec: PeerSpec) -> usize {
        let i = self.peers.len();
        self.by_user.entry(spec.user.as_bytes().to_vec()).or_default().push(i);
        self.by_name.insert(spec.name.clone(), i);
        if let Some(k) = spec.key {
            self.by_key.entry(k.0).or_insert(i);
        }
        self.routes.extend(spec.prefixes.iter().map(|p| (*p, i)));
        self.peers.push(Arc::new(Peer::new(spec)));
        i
    }

    fn sort_routes(&mut self) {
        self.routes.sort_by_key(|r| std::cmp::Reverse(r.0.len));
    }

    /// Peer `i` now owns exactly `prefixes` (each taken from whoever held it before).
    /// Whether anything changed.
    fn route(&mut self, i: usize, prefixes: &[Prefix]) -> bool {
        let mut held: Vec<Prefix> = self.routes.iter().filter(|r| r.1 == i).map(|r| r.0).collect();
        held.sort_by_key(|p| (p.addr, p.len));
        let mut want = prefixes.to_vec();
        want.sort_by_key(|p| (p.addr, p.len));
        want.dedup();
        if held == want {
            return false;
        }
        self.routes.retain(|(p, j)| *j != i && !want.contains(p));
        self.routes.extend(want.into_iter().map(|p| (p, i)));
        self.sort_routes();
        true
    }

    fn peer_for(&self, dst: IpAddr) -> Option<usize> {
        self.routes.iter().find(|(p, _)| p.contains(dst)).map(|(_, i)| *i)
    }

    /// The keyed peers of broker user `user`.
    fn keyed_of<'a>(&'a self, user: Option<&[u8]>) -> impl Iterator<Item = usize> + Clone + 'a {
        let list = user.and_then(|u| self.by_user.get(u)).map(Vec::as_slice).unwrap_or_default();
        list.iter().copied().filter(|&i| self.peers[i].spec.key.is_some())
    }
}

/// What [`E2e::learn`] made of a hello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Learned {
    /// A new peer, its key pinned.
    Pinned,
    /// A known peer (its prefixes may have moved).
    Known,
    /// The hello names a pinned agent with another key or another broker user (or a
    /// pinned key under another name): refused, nothing changed.
    Conflict { pinned_user: String, pinned_key: PublicKey },
    /// Not for first use (a peers file names the peers), or this agent's own hello.
    Ignored,
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
    /// Keys pinned on first use, and hellos refused for naming a pinned agent with another key.
    pub pinned: AtomicU64,
    pub key_conflicts: AtomicU64,
    /// Group keys made after the first.
    pub group_rotations: AtomicU64,
}

/// This agent's keys and its sessions with every peer, shared by its workers.
pub struct E2e {
    local: PrivateKey,
    /// This agent's own name, in first use (its own hellos come back from the bus).
    own_name: Option<String>,
    source: KeySource,
    prologue: Vec<u8>,
    limits: Limits,
    directory: RwLock<Directory>,
    /// How many peers have a key (for logs and status without the directory's lock).
    keyed: AtomicUsize,
    sessions: RwLock<HashMap<u32, Arc<Session>>>,
    group: RwLock<GroupKeys>,
    outbox: Mutex<Vec<Outgoing>>,
    has_outgoing: AtomicBool,
    last_warning: Mutex<Option<Instant>>,
    warned_since: AtomicU64,
    last_conflict_warning: Mutex<Option<Instant>>,
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

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

impl E2e {
    /// The state of agent `own_user` (left out of `peers`) of `session`, with `local` as
    /// its key, its peers from a peers file.
    pub fn new(local: PrivateKey, own_user: &str, session: Option<&str>, peers: Vec<PeerSpec>, limits: Limits) -> Result<E2e, String> {
        let mut directory = Directory::default();
        for spec in peers {
            if spec.user == own_user || directory.by_user.contains_key(spec.user.as_bytes()) {
                continue;
            }
            directory.add(spec);
        }
        directory.sort_routes();
        let mut prologue = b"tunbus e2e v1 session=".to_vec();
        prologue.extend_from_slice(session.unwrap_or("-").as_bytes());
        Ok(E2e {
            local,
            own_name: None,
            source: KeySource::PeersFile,
            prologue,
            limits,
            keyed: AtomicUsize::new(directory.peers.iter().filter(|p| p.spec.key.is_some()).count()),
            directory: RwLock::new(directory),
            sessions: RwLock::new(HashMap::new()),
            group: RwLock::new(GroupKeys { sealing: Arc::new(GroupTx::new()?), since: None, next: None }),
            outbox: Mutex::new(Vec::new()),
            has_outgoing: AtomicBool::new(false),
            last_warning: Mutex::new(None),
            warned_since: AtomicU64::new(0),
            last_conflict_warning: Mutex::new(None),
            key_log: None,
            stats: Stats::default(),
        })
    }

    /// The state of agent `own_name` without a peers file: peers are learnt from hellos
    /// ([`E2e::learn`]), each key pinned on first use.
    pub fn first_use(local: PrivateKey, own_name: &str, session: Option<&str>, limits: Limits) -> Result<E2e, String> {
        Ok(E2e { source: KeySource::FirstUse, own_name: Some(own_name.to_owned()), ..E2e::new(local, "", session, Vec::new(), limits)? })
    }

    /// Notes every key that opens batches to this agent, and its group keys, in `log`
    /// (for `agent capture --keys`).
    pub fn with_key_log(mut self, log: keylog::KeyLog) -> E2e {
        {
            let g = read(&self.group);
            log.note(Kind::Group, g.sealing.id, &g.sealing.key);
        }
        self.key_log = Some(log);
        self
    }

    pub fn public_key(&self) -> PublicKey {
        self.local.public()
    }

    /// How many peers have a key.
    pub fn peers_with_keys(&self) -> usize {
        self.keyed.load(Ordering::Relaxed)
    }

    /// Peers without a key (their broker users), whose traffic is refused.
    pub fn peers_without_keys(&self) -> Vec<String> {
        read(&self.directory).peers.iter().filter(|p| p.spec.key.is_none()).map(|p| p.spec.user.clone()).collect()
    }

    /// The peers and their keys (none: refused), as (agent, broker user, key).
    pub fn peer_keys(&self) -> Vec<(String, String, Option<PublicKey>)> {
        read(&self.directory).peers.iter().map(|p| (p.spec.name.clone(), p.spec.user.clone(), p.spec.key)).collect()
    }

    /// The payload a handshake carries: the wall clock, and the group key peers should
    /// hold (the next one while it is being handed over).
    fn payload(&self, wall_ns: u64) -> Payload {
        let g = read(&self.group);
        let k = g.next.as_ref().map(|(n, _)| n).unwrap_or(&g.sealing);
        Payload { timestamp_ns: wall_ns, group_id: k.id, group_key: k.key }
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
        let user = user.as_deref().unwrap_or("-");
        match self.source {
            KeySource::PeersFile => {
                tracing::warn!(user, destination = ?dst, refused = since, "end-to-end encryption: no public key for this peer, its traffic is refused (add key=<its public key> to its line of the peers file)")
            }
            KeySource::FirstUse => {
                tracing::warn!(user, destination = ?dst, refused = since, "end-to-end encryption: no hello with a public key from this peer yet (an agent without --e2e, or one not heard from), its traffic is refused")
            }
        }
    }

    /// Starts a handshake with every peer that has a key (at start, after a reconnection,
    /// when the group key is renewed).
    pub fn initiate_all(&self, now: Instant, wall_ns: u64) {
        let peers: Vec<Arc<Peer>> = read(&self.directory).peers.clone();
        for peer in peers {
            self.want_handshake(&peer, now, wall_ns, true);
        }
    }

    /// Sends an initiation to `peer`, at most one per [`Limits::retry`] (`force`: unless
    /// one is already waiting for its response within that time).
    fn want_handshake(&self, peer: &Peer, now: Instant, wall_ns: u64, force: bool) {
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
        let sessions = read(&self.sessions);
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

    /// Renews the group key (queue 0 calls this every turn; cheap when nothing is due):
    /// when it has sealed for [`Limits::rekey_after`], a new one is made and handed to every
    /// peer in a new handshake at once, and floods are sealed with it
    /// [`Limits::group_switch`] later. Receivers keep the key before, so floods sealed with
    /// the old key just before the switch still open.
    pub fn tick(&self, now: Instant, wall_ns: u64) {
        {
            let g = read(&self.group);
            let due = match (&g.next, g.since) {
                (Some((_, at)), _) => now >= *at,
                (None, Some(since)) => now.saturating_duration_since(since) >= self.limits.rekey_after,
                (None, None) => true,
            };
            if !due {
                return;
            }
        }
        let mut g = write(&self.group);
        if g.since.is_none() {
            g.since = Some(now);
            return;
        }
        if let Some((next, at)) = g.next.take() {
            if now >= at {
                g.sealing = next;
                g.since = Some(now);
            } else {
                g.next = Some((next, at));
            }
            return;
        }
        if g.since.is_some_and(|s| now.saturating_duration_since(s) < self.limits.rekey_after) {
            return;
        }
        let Ok(next) = GroupTx::new() else { return };
        if let Some(log) = &self.key_log {
            log.note(Kind::Group, next.id, &next.key);
        }
        g.next = Some((Arc::new(next), now + self.limits.group_switch));
        drop(g);
        self.stats.group_rotations.fetch_add(1, Ordering::Relaxed);
        self.initiate_all(now, wall_ns);
    }

    /// Seals `frame` for `routing_key` into `out`: with the session of the peer owning
    /// `dst` (unicast), or with this agent's group key (`dst` = `None`: a flood).
    pub fn seal(&self, dst: Option<IpAddr>, routing_key: &str, frame: &[u8], out: &mut Vec<u8>, now: Instant, wall_ns: u64) -> Result<(), SealRefusal> {
        let Some(dst) = dst else {
            let g = read(&self.group).sealing.clone();
            let counter = g.counter.fetch_add(1, Ordering::Relaxed);
            let h = Header { kind: Kind::Group, index: g.id, counter };
            return seal::seal(&g.cipher, h, routing_key.as_bytes(), frame, out).map_err(|_| SealRefusal::NoSession);
        };
        let peer = {
            let d = read(&self.directory);
            d.peer_for(dst).map(|i| d.peers[i].clone()).filter(|p| p.spec.key.is_some())
        };
        let Some(peer) = peer else {
            self.warn_no_key(None, Some(dst), now);
            return Err(SealRefusal::NoKey);
        };
        let alive = |s: &Arc<Session>| now.saturating_duration_since(s.born) < self.limits.reject_after;
        let current = read(&peer.current).clone();
        // A responder's new session seals once the initiator has shown it holds it: its
        // batches could otherwise reach the initiator before the response does.
        let sealing = match current {
            Some(c) if !c.confirmed.load(Ordering::Relaxed) => match read(&peer.previous).clone() {
                Some(p) if alive(&p) => Some(p),
                _ => Some(c),
            },
            other => other,
        };
        match sealing {
            Some(s) if alive(&s) => {
                let counter = s.counter.fetch_add(1, Ordering::Relaxed);
                if now.saturating_duration_since(s.born) >= self.limits.rekey_after || counter >= self.limits.rekey_after_messages {
                    self.want_handshake(&peer, now, wall_ns, false);
                }
                let h = Header { kind: Kind::Pair, index: s.their_index, counter };
                seal::seal(&s.send, h, routing_key.as_bytes(), frame, out).map_err(|_| SealRefusal::NoSession)
            }
            _ => {
                self.want_handshake(&peer, now, wall_ns, false);
                Err(SealRefusal::NoSession)
            }
        }
    }

    /// Opens `body`, received from broker user `user` with `routing_key`, into `out`. It
    /// opens only under a key of a peer logged in as `user`: the identity the packets'
    /// sources are then checked against.
    pub fn open(&self, user: Option<&[u8]>, routing_key: &[u8], body: &[u8], out: &mut Vec<u8>, now: Instant, wall_ns: u64) -> Result<(), OpenRefusal> {
        if !seal::is_sealed(body) {
            return Err(if body.starts_with(&crate::codec::v1::MAGIC) { OpenRefusal::Plaintext } else { OpenRefusal::Malformed });
        }
        let h = seal::parse(body).map_err(|_| OpenRefusal::Malformed)?;
        let keyed = match self.lookup(user, h, now) {
            Lookup::Open(k) => k,
            Lookup::NoKey => {
                self.warn_no_key(user, None, now);
                return Err(OpenRefusal::NoKey);
            }
            Lookup::Refuse(refusal, renew) => {
                if let Some(peer) = renew {
                    self.want_handshake(&peer, now, wall_ns, false);
                }
                return Err(refusal);
            }
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
        Ok(())
    }

    /// The key that opens a batch with header `h` from broker user `user`: a session or
    /// group key of one of the user's peers.
    fn lookup(&self, user: Option<&[u8]>, h: Header, now: Instant) -> Lookup {
        let d = read(&self.directory);
        let mut candidates = d.keyed_of(user).peekable();
        if candidates.peek().is_none() {
            return Lookup::NoKey;
        }
        // A sender we do not share the key with (we restarted, or it did) gets a new
        // handshake, when the user names a single peer.
        let only = |mut c: std::iter::Peekable<_>| c.next().filter(|_| c.next().is_none()).map(|i: usize| d.peers[i].clone());
        match h.kind {
            Kind::Pair => match read(&self.sessions).get(&h.index).cloned() {
                Some(s) if d.peers[s.peer].spec.user.as_bytes() != user.unwrap_or_default() => Lookup::Refuse(OpenRefusal::DecryptFailed, None),
                Some(s) if now.saturating_duration_since(s.born) < self.limits.reject_after => Lookup::Open(Keyed::Session(s)),
                Some(s) => Lookup::Refuse(OpenRefusal::DecryptFailed, Some(d.peers[s.peer].clone())),
                None => Lookup::Refuse(OpenRefusal::DecryptFailed, only(candidates)),
            },
            Kind::Group => match candidates.clone().find_map(|i| read(&d.peers[i].group).find(h.index)) {
                Some(g) => Lookup::Open(Keyed::Group(g)),
                None => Lookup::Refuse(OpenRefusal::DecryptFailed, only(candidates)),
            },
        }
    }

    /// A handshake message from broker user `user` on `routing_key`: answered (into the
    /// outbox), completed, or (a sealed empty batch) the initiator's confirmation.
    pub fn on_handshake(&self, user: Option<&[u8]>, routing_key: &[u8], body: &[u8], now: Instant, wall_ns: u64) -> Result<(), OpenRefusal> {
        if seal::is_sealed(body) {
            let mut scratch = Vec::new();
            return self.open(user, routing_key, body, &mut scratch, now, wall_ns);
        }
        let env = handshake::envelope(body).map_err(|_| OpenRefusal::Malformed)?;
        let candidates: Vec<(usize, Arc<Peer>)> = {
            let d = read(&self.directory);
            d.keyed_of(user).map(|i| (i, d.peers[i].clone())).collect()
        };
        if candidates.is_empty() {
            self.warn_no_key(user, None, now);
            return Err(OpenRefusal::NoKey);
        }
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
                // The initiator is the peer of this user whose key made the initiation.
                let Some((i, peer)) = candidates.into_iter().find(|(_, p)| p.spec.key == Some(r.remote)) else {
                    return refused(OpenRefusal::DecryptFailed);
                };
                let Ok(mut st) = peer.state.lock() else { return refused(OpenRefusal::DecryptFailed) };
                if r.payload.timestamp_ns <= st.newest_initiation_ns {
                    drop(st);
                    return refused(OpenRefusal::Replayed);
                }
                st.newest_initiation_ns = r.payload.timestamp_ns;
                self.install(i, &peer, &mut st, index, r.their_index, &r.keys, now, false);
                drop(st);
                set_group(&peer, &r.payload);
                self.stats.responses.fetch_add(1, Ordering::Relaxed);
                self.push(Outgoing { routing_key: handshake_key(&peer.spec.name), body: r.message });
                Ok(())
            }
            handshake::Type::Response => {
                // The peer of this user our initiation went to.
                let waiting = candidates.into_iter().find_map(|(i, p)| {
                    let init = p.state.lock().ok()?.pending.take_if(|p| p.index == env.receiver)?;
                    Some((i, p, init))
                });
                let Some((i, peer, init)) = waiting else {
                    return refused(OpenRefusal::Replayed); // an answer to nothing we asked (now)
                };
                let our = init.index;
                let Ok((their, payload, keys)) = handshake::finish(init, body) else {
                    return refused(OpenRefusal::DecryptFailed);
                };
                let Ok(mut st) = peer.state.lock() else { return refused(OpenRefusal::DecryptFailed) };
                let s = self.install(i, &peer, &mut st, our, their, &keys, now, true);
                drop(st);
                set_group(&peer, &payload);
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
    fn install(
        &self,
        i: usize,
        peer: &Peer,
        st: &mut PeerState,
        our: u32,
        their: u32,
        keys: &handshake::SessionKeys,
        now: Instant,
        initiator: bool,
    ) -> Arc<Session> {
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
        {
            let mut m = write(&self.sessions);
            m.insert(our, s.clone());
            st.indices.push_back(our);
            while st.indices.len() > self.limits.keep.max(1) {
                if let Some(old) = st.indices.pop_front() {
                    m.remove(&old);
                }
            }
        }
        let old = write(&peer.current).replace(s.clone());
        *write(&peer.previous) = old;
        let first = self.stats.sessions.fetch_add(1, Ordering::Relaxed) == 0;
        tracing::debug!(peer = %peer.spec.name, first, initiator, "end-to-end session established");
        s
    }

    /// First use: agent `name`, logged in as `user`, announced `key` and owns `prefixes`
    /// (those the claims table granted it). A new agent's key is pinned (and a handshake
    /// started); a known one's prefixes follow its hello; another key, or another user,
    /// for a pinned agent is refused (counted, warned at most once a second).
    pub fn learn(&self, user: &str, name: &str, key: PublicKey, prefixes: &[Prefix], now: Instant, wall_ns: u64) -> Learned {
        // Its own hello comes back; a hello with its own name or key is nobody else's.
        if self.source != KeySource::FirstUse || self.own_name.as_deref() == Some(name) || key == self.local.public() {
            return Learned::Ignored;
        }
        let mut d = write(&self.directory);
        let known = d.by_name.get(name).copied().or_else(|| d.by_key.get(&key.0).copied());
        let learned = match known {
            Some(i) => {
                let p = &d.peers[i];
                if p.spec.key != Some(key) || p.spec.user != user || p.spec.name != name {
                    let conflict = Learned::Conflict { pinned_user: p.spec.user.clone(), pinned_key: p.spec.key.unwrap_or(PublicKey([0; KEY_LEN])) };
                    let pinned_name = p.spec.name.clone();
                    drop(d);
                    self.stats.key_conflicts.fetch_add(1, Ordering::Relaxed);
                    self.warn_conflict(name, user, key, &pinned_name, &conflict, now);
                    return conflict;
                }
                d.route(i, prefixes);
                return Learned::Known;
            }
            None => {
                let i = d.add(PeerSpec { user: user.to_owned(), name: name.to_owned(), key: Some(key), prefixes: Vec::new() });
                d.route(i, prefixes);
                d.peers[i].clone()
            }
        };
        drop(d);
        self.keyed.fetch_add(1, Ordering::Relaxed);
        self.stats.pinned.fetch_add(1, Ordering::Relaxed);
        tracing::info!(agent = name, user, public_key = %key, "end-to-end encryption: key pinned on first use (a later hello with another key for this agent is refused)");
        self.want_handshake(&learned, now, wall_ns, false);
        Learned::Pinned
    }

    fn warn_conflict(&self, name: &str, user: &str, key: PublicKey, pinned_name: &str, c: &Learned, now: Instant) {
        let Learned::Conflict { pinned_user, pinned_key } = c else { return };
        let Ok(mut last) = self.last_conflict_warning.try_lock() else { return };
        if last.is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1)) {
            return;
        }
        *last = Some(now);
        tracing::warn!(agent = name, user, public_key = %key, pinned_agent = pinned_name, pinned_user = %pinned_user, pinned_key = %pinned_key, refused = self.stats.key_conflicts.load(Ordering::Relaxed), "end-to-end encryption: REFUSED a hello whose agent, broker user or key differs from what was pinned on first use (an impostor, or an agent that made a new key: restart this agent to forget the pins, or use a peers file)");
    }

    /// Whether peer `name` (an agent name) has a session now.
    pub fn has_session(&self, name: &str) -> bool {
        let d = read(&self.directory);
        d.by_name.get(name).is_some_and(|&i| read(&d.peers[i].current).is_some())
    }
}

/// Peer `peer` handed over group key `p` (in a handshake): the one it had before still opens.
fn set_group(peer: &Peer, p: &Payload) {
    let mut g = write(&peer.group);
    if g.current.as_ref().is_some_and(|c| c.id == p.group_id) {
        return;
    }
    let new = Arc::new(GroupRx { id: p.group_id, cipher: seal::cipher(&p.group_key), replay: Mutex::new(ReplayWindow::default()) });
    g.previous = g.current.replace(new);
}

/// The key a received batch is opened with.
enum Keyed {
    Session(Arc<Session>),
    Group(Arc<GroupRx>),
}

/// What [`E2e::lookup`] found for a received batch.
enum Lookup {
    Open(Keyed),
    /// The user is no peer with a key.
    NoKey,
    /// Refused; a peer to start a new handshake with, when that helps.
    Refuse(OpenRefusal, Option<Arc<Peer>>),
}

#[cfg(test)]
mod tests;
