//! Two (or three) agents' [`E2e`] driven by hand: their handshake messages carried between
//! them as the bus would, time moved by the test.

use super::*;
use std::net::IpAddr;

const S: Option<&str> = Some("lab");

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

struct Node {
    user: &'static str,
    key: PrivateKey,
    e2e: E2e,
}

fn spec(user: &str, key: Option<PublicKey>, addr: &str) -> PeerSpec {
    PeerSpec { user: user.into(), name: user.trim_start_matches("lab.").into(), key, prefixes: vec![format!("{addr}/32").parse().unwrap()] }
}

/// Agents lab.a (198.18.0.1), lab.b (.2), lab.c (.3, no key unless `c_keyed`), each knowing the others.
fn nodes(limits: Limits, c_keyed: bool) -> (Node, Node, Node) {
    let ka = PrivateKey::generate().unwrap();
    let kb = PrivateKey::generate().unwrap();
    let kc = PrivateKey::generate().unwrap();
    let ck = c_keyed.then(|| kc.public());
    let specs = vec![spec("lab.a", Some(ka.public()), "198.18.0.1"), spec("lab.b", Some(kb.public()), "198.18.0.2"), spec("lab.c", ck, "198.18.0.3")];
    let mk = |user: &'static str, key: &PrivateKey| Node { user, key: key.clone(), e2e: E2e::new(key.clone(), user, S, specs.clone(), limits).unwrap() };
    (mk("lab.a", &ka), mk("lab.b", &kb), mk("lab.c", &kc))
}

/// Carries every handshake message `from` has for `to` (by routing key), returns how many.
fn carry(from: &Node, to: &Node, now: Instant, wall: u64) -> usize {
    let key = handshake_key(to.user.trim_start_matches("lab."));
    let mut n = 0;
    let mut keep = Vec::new();
    for m in from.e2e.take_outgoing() {
        if m.routing_key == key {
            to.e2e.on_handshake(Some(from.user.as_bytes()), m.routing_key.as_bytes(), &m.body, now, wall).unwrap();
            n += 1;
        } else {
            keep.push(m);
        }
    }
    for m in keep {
        from.e2e.push(m);
    }
    n
}

/// a and b handshake (a initiates, then confirms).
fn handshake(a: &Node, b: &Node, now: Instant, wall: u64) {
    let _ = a.e2e.seal(Some(ip("198.18.0.2")), "k", b"", &mut Vec::new(), now, wall);
    assert_eq!(carry(a, b, now, wall), 1);
    assert_eq!(carry(b, a, now, wall), 1);
    assert_eq!(carry(a, b, now, wall), 1, "the confirmation");
}

const KEY_B: &str = "tunbus.v1.198-18-0-2.3";
const KEY_A: &str = "tunbus.v1.198-18-0-1.0";

/// A wall clock that moves on at every reading (initiations need a newer one each time).
fn wall() -> u64 {
    static WALL: AtomicU64 = AtomicU64::new(1_000);
    WALL.fetch_add(1, Ordering::Relaxed)
}

fn seal_to(from: &Node, dst: &str, key: &str, frame: &[u8], now: Instant) -> Result<Vec<u8>, SealRefusal> {
    let mut out = Vec::new();
    from.e2e.seal(Some(ip(dst)), key, frame, &mut out, now, wall()).map(|_| out)
}

fn open_at(to: &Node, user: &str, key: &str, body: &[u8], now: Instant) -> Result<Vec<u8>, OpenRefusal> {
    let mut out = Vec::new();
    to.e2e.open(Some(user.as_bytes()), key.as_bytes(), body, &mut out, now, 1).map(|()| out)
}

#[test]
fn after_a_handshake_batches_go_both_ways_and_floods_too() {
    let (a, b, _) = nodes(Limits::default(), true);
    let t = Instant::now();
    assert_eq!(seal_to(&a, "198.18.0.2", KEY_B, b"x", t), Err(SealRefusal::NoSession), "no session yet: the handshake starts");
    assert_eq!(carry(&a, &b, t, 10), 1);
    assert_eq!(carry(&b, &a, t, 11), 1);
    assert!(a.e2e.has_session("b") && b.e2e.has_session("a"));
    let body = seal_to(&a, "198.18.0.2", KEY_B, b"TB frame to b", t).unwrap();
    assert_eq!(open_at(&b, "lab.a", KEY_B, &body, t).unwrap(), b"TB frame to b");
    let back = seal_to(&b, "198.18.0.1", KEY_A, b"TB frame to a", t).unwrap();
    assert_eq!(open_at(&a, "lab.b", KEY_A, &back, t).unwrap(), b"TB frame to a");
    // Floods: sealed with the sender's group key, which the handshake handed over.
    let mut flood = Vec::new();
    a.e2e.seal(None, "tunbus.v1.all.a", b"TB flood", &mut flood, t, 1).unwrap();
    assert_eq!(open_at(&b, "lab.a", "tunbus.v1.all.a", &flood, t).unwrap(), b"TB flood");
    let mut flood = Vec::new();
    b.e2e.seal(None, "tunbus.v1.all.b", b"TB flood b", &mut flood, t, 1).unwrap();
    assert_eq!(open_at(&a, "lab.b", "tunbus.v1.all.b", &flood, t).unwrap(), b"TB flood b");
    assert_eq!(a.e2e.stats.sessions.load(Ordering::Relaxed), 1);
}

#[test]
fn forged_truncated_replayed_and_plaintext_batches_are_refused() {
    let (a, b, _) = nodes(Limits::default(), true);
    let t = Instant::now();
    handshake(&a, &b, t, 1);
    let body = seal_to(&a, "198.18.0.2", KEY_B, b"TB frame", t).unwrap();
    // Forged: a valid header with the right index, another key beneath.
    let mut forged = Vec::new();
    let h = seal::parse(&body).unwrap();
    seal::seal(&seal::cipher(&[9; 32]), Header { counter: 77, ..h }, KEY_B.as_bytes(), b"TB evil", &mut forged).unwrap();
    assert_eq!(open_at(&b, "lab.a", KEY_B, &forged, t), Err(OpenRefusal::DecryptFailed));
    for n in [0, 3, seal::HEADER_LEN, seal::HEADER_LEN + seal::TAG_LEN - 1] {
        assert_eq!(open_at(&b, "lab.a", KEY_B, &body[..n], t), Err(OpenRefusal::Malformed), "truncated to {n}");
    }
    let cut = &body[..body.len() - 1];
    assert_eq!(open_at(&b, "lab.a", KEY_B, cut, t), Err(OpenRefusal::DecryptFailed));
    assert_eq!(open_at(&b, "lab.a", "tunbus.v1.198-18-0-2.4", &body, t), Err(OpenRefusal::DecryptFailed), "moved to another shard's key");
    // The forgeries moved nothing: the real one opens, once.
    assert!(open_at(&b, "lab.a", KEY_B, &body, t).is_ok());
    assert_eq!(open_at(&b, "lab.a", KEY_B, &body, t), Err(OpenRefusal::Replayed));
    assert_eq!(open_at(&b, "lab.a", KEY_B, b"TB\x01\x00plain v1", t), Err(OpenRefusal::Plaintext));
    assert_eq!(open_at(&b, "lab.a", KEY_B, b"garbage", t), Err(OpenRefusal::Malformed));
}

#[test]
fn reordered_batches_open_within_the_window() {
    let (a, b, _) = nodes(Limits::default(), true);
    let t = Instant::now();
    handshake(&a, &b, t, 1);
    let bodies: Vec<Vec<u8>> = (0..100).map(|i| seal_to(&a, "198.18.0.2", KEY_B, format!("TB {i}").as_bytes(), t).unwrap()).collect();
    for i in (0..100).rev() {
        assert_eq!(open_at(&b, "lab.a", KEY_B, &bodies[i], t).unwrap(), format!("TB {i}").as_bytes());
    }
    for body in &bodies {
        assert_eq!(open_at(&b, "lab.a", KEY_B, body, t), Err(OpenRefusal::Replayed));
    }
}

#[test]
fn a_batch_published_by_another_user_does_not_open() {
    let (a, b, c) = nodes(Limits::default(), true);
    let t = Instant::now();
    handshake(&a, &b, t, 1);
    let body = seal_to(&a, "198.18.0.2", KEY_B, b"TB frame", t).unwrap();
    // c (a peer with its own login) republishes a's batch under its own user_id.
    assert_eq!(open_at(&b, "lab.c", KEY_B, &body, t), Err(OpenRefusal::DecryptFailed));
    // A broker user that is no peer at all.
    assert_eq!(b.e2e.open(Some(b"rogue"), KEY_B.as_bytes(), &body, &mut Vec::new(), t, 1), Err(OpenRefusal::NoKey));
    assert_eq!(b.e2e.open(None, KEY_B.as_bytes(), &body, &mut Vec::new(), t, 1), Err(OpenRefusal::NoKey));
    // Still opens for its real sender.
    assert!(open_at(&b, "lab.a", KEY_B, &body, t).is_ok());
    drop(c);
}

#[test]
fn a_peer_without_a_key_is_refused_both_ways() {
    let (a, _, c) = nodes(Limits::default(), false);
    let t = Instant::now();
    assert_eq!(seal_to(&a, "198.18.0.3", "tunbus.v1.198-18-0-3.0", b"x", t), Err(SealRefusal::NoKey));
    assert_eq!(seal_to(&a, "198.51.100.1", "tunbus.v1.198-51-100-1.0", b"x", t), Err(SealRefusal::NoKey), "nobody owns it");
    assert!(a.e2e.take_outgoing().is_empty(), "no handshake with a peer without a key");
    assert_eq!(a.e2e.peers_without_keys(), ["lab.c"]);
    // c has a's key and tries anyway: refused.
    let mut m = Vec::new();
    let mut c_specs = vec![spec("lab.a", Some(a.key.public()), "198.18.0.1")];
    c_specs.push(spec("lab.c", None, "198.18.0.3"));
    let c2 = E2e::new(c.key.clone(), "lab.c", S, c_specs, Limits::default()).unwrap();
    c2.initiate_all(t, 5);
    for o in c2.take_outgoing() {
        m.push(a.e2e.on_handshake(Some(b"lab.c"), o.routing_key.as_bytes(), &o.body, t, 5));
    }
    assert_eq!(m, [Err(OpenRefusal::NoKey)]);
}

#[test]
fn a_replayed_initiation_or_an_unasked_response_is_refused() {
    let (a, b, _) = nodes(Limits::default(), true);
    let t = Instant::now();
    a.e2e.initiate_all(t, 100);
    let out = a.e2e.take_outgoing();
    let init = out.iter().find(|o| o.routing_key == handshake_key("b")).unwrap();
    let kb = handshake_key("b").into_bytes();
    let ka = handshake_key("a").into_bytes();
    b.e2e.on_handshake(Some(b"lab.a"), &kb, &init.body, t, 100).unwrap();
    assert_eq!(b.e2e.on_handshake(Some(b"lab.a"), &kb, &init.body, t, 101), Err(OpenRefusal::Replayed));
    let resp = b.e2e.take_outgoing().pop().unwrap();
    a.e2e.on_handshake(Some(b"lab.b"), &ka, &resp.body, t, 100).unwrap();
    assert_eq!(a.e2e.on_handshake(Some(b"lab.b"), &ka, &resp.body, t, 100), Err(OpenRefusal::Replayed), "the response was used");
    // The confirmation opens once; again, it is a replay.
    let confirm = a.e2e.take_outgoing().pop().unwrap();
    assert_eq!(confirm.routing_key, handshake_key("b"));
    b.e2e.on_handshake(Some(b"lab.a"), &kb, &confirm.body, t, 100).unwrap();
    assert_eq!(b.e2e.on_handshake(Some(b"lab.a"), &kb, &confirm.body, t, 100), Err(OpenRefusal::Replayed));
    // An initiation for a's key, made by someone else and published as lab.a by a lying broker.
    let mallory = PrivateKey::generate().unwrap();
    let (_, forged) =
        handshake::initiate(&mallory, &b.key.public(), b"tunbus e2e v1 session=lab", 5, Payload { timestamp_ns: 999, group_id: 1, group_key: [0; 32] })
            .unwrap();
    assert_eq!(b.e2e.on_handshake(Some(b"lab.a"), &kb, &forged, t, 1), Err(OpenRefusal::DecryptFailed));
    assert_eq!(b.e2e.on_handshake(Some(b"lab.a"), &kb, b"TH", t, 1), Err(OpenRefusal::Malformed));
}

#[test]
fn a_restarted_peer_gets_a_new_session_and_old_batches_do_not_open() {
    let (a, b, _) = nodes(Limits::default(), true);
    let t = Instant::now();
    handshake(&a, &b, t, 1);
    let old = seal_to(&a, "198.18.0.2", KEY_B, b"TB old", t).unwrap();
    // b restarts: same key, nothing else remembered; it greets every peer.
    let specs = vec![spec("lab.a", Some(a.key.public()), "198.18.0.1"), spec("lab.b", Some(b.key.public()), "198.18.0.2")];
    let b2 = Node { user: "lab.b", key: b.key.clone(), e2e: E2e::new(b.key.clone(), "lab.b", S, specs, Limits::default()).unwrap() };
    let t2 = t + Duration::from_secs(5);
    assert_eq!(open_at(&b2, "lab.a", KEY_B, &old, t2), Err(OpenRefusal::DecryptFailed));
    b2.e2e.initiate_all(t2, 2);
    assert_eq!(carry(&b2, &a, t2, 2), 1);
    assert_eq!(carry(&a, &b2, t2, 2), 1);
    // Until b2 confirms, a (the responder) seals with its previous session, which b2 lost.
    let early = seal_to(&a, "198.18.0.2", KEY_B, b"TB early", t2).unwrap();
    assert_eq!(open_at(&b2, "lab.a", KEY_B, &early, t2), Err(OpenRefusal::DecryptFailed));
    assert_eq!(carry(&b2, &a, t2, 2), 1, "b2's confirmation");
    let new = seal_to(&a, "198.18.0.2", KEY_B, b"TB new", t2).unwrap();
    assert_eq!(open_at(&b2, "lab.a", KEY_B, &new, t2).unwrap(), b"TB new");
    let back = seal_to(&b2, "198.18.0.1", KEY_A, b"TB back", t2).unwrap();
    assert_eq!(open_at(&a, "lab.b", KEY_A, &back, t2).unwrap(), b"TB back");
    // Its floods carry a new group key, which a learnt in the handshake.
    let mut flood = Vec::new();
    b2.e2e.seal(None, "tunbus.v1.all.b", b"TB f", &mut flood, t2, 1).unwrap();
    assert!(open_at(&a, "lab.b", "tunbus.v1.all.b", &flood, t2).is_ok());
}

#[test]
fn sessions_are_renewed_on_time_and_volume_and_expire() {
    let limits = Limits { rekey_after_messages: 5, ..Limits::default() };
    let (a, b, _) = nodes(limits, true);
    let t = Instant::now();
    handshake(&a, &b, t, 1);
    let first = a.e2e.stats.initiations.load(Ordering::Relaxed);
    let mut before = Vec::new();
    let t0 = t + limits.retry;
    for _ in 0..6 {
        before.push(seal_to(&a, "198.18.0.2", KEY_B, b"TB v", t0).unwrap());
    }
    assert_eq!(a.e2e.stats.initiations.load(Ordering::Relaxed), first + 1, "volume: one new handshake");
    let t1 = t0 + Duration::from_secs(2);
    assert_eq!(carry(&a, &b, t1, 2), 1);
    assert_eq!(carry(&b, &a, t1, 2), 1);
    let after = seal_to(&a, "198.18.0.2", KEY_B, b"TB new", t1).unwrap();
    assert_ne!(seal::parse(&after).unwrap().index, seal::parse(&before[0]).unwrap().index, "sealed with the new session");
    assert!(open_at(&b, "lab.a", KEY_B, &after, t1).is_ok());
    assert!(open_at(&b, "lab.a", KEY_B, &before[5], t1).is_ok(), "the previous session still opens what was in flight");
    // Time: after rekey_after a new handshake; after reject_after nothing seals under the old.
    let t2 = t1 + limits.rekey_after;
    assert!(seal_to(&a, "198.18.0.2", KEY_B, b"TB", t2).is_ok());
    assert!(a.e2e.has_outgoing(), "an initiation is due");
    let _ = a.e2e.take_outgoing();
    let t3 = t1 + limits.reject_after;
    assert_eq!(seal_to(&a, "198.18.0.2", KEY_B, b"TB", t3), Err(SealRefusal::NoSession));
    assert_eq!(open_at(&b, "lab.a", KEY_B, &after, t3), Err(OpenRefusal::DecryptFailed), "expired");
}

#[test]
fn simultaneous_initiations_leave_both_sides_working() {
    let (a, b, _) = nodes(Limits::default(), true);
    let t = Instant::now();
    a.e2e.initiate_all(t, 10);
    b.e2e.initiate_all(t, 11);
    // Both initiations cross, then both responses.
    assert_eq!(carry(&a, &b, t, 12), 1);
    assert_eq!(carry(&b, &a, t, 12), 2, "b's initiation and its response");
    assert_eq!(carry(&a, &b, t, 13), 2, "a's response, and its confirmation of the session b answered");
    let x = seal_to(&a, "198.18.0.2", KEY_B, b"TB ab", t).unwrap();
    let y = seal_to(&b, "198.18.0.1", KEY_A, b"TB ba", t).unwrap();
    assert_eq!(open_at(&b, "lab.a", KEY_B, &x, t).unwrap(), b"TB ab");
    assert_eq!(open_at(&a, "lab.b", KEY_A, &y, t).unwrap(), b"TB ba");
}

#[test]
fn the_group_key_is_renewed_handed_over_and_the_old_one_still_opens() {
    let limits = Limits { rekey_after: Duration::from_secs(10), group_switch: Duration::from_secs(2), ..Limits::default() };
    let (a, b, _) = nodes(limits, true);
    let t = Instant::now();
    a.e2e.tick(t, wall());
    handshake(&a, &b, t, 1);
    let flood = |at: Instant| {
        let mut out = Vec::new();
        a.e2e.seal(None, "tunbus.v1.all.a", b"TB flood", &mut out, at, 1).unwrap();
        out
    };
    let old = flood(t);
    let old_id = seal::parse(&old).unwrap().index;
    a.e2e.tick(t + Duration::from_secs(9), wall());
    assert!(!a.e2e.has_outgoing(), "not due yet");
    // Due: a new key, handed to b in a new handshake; floods keep the old one meanwhile.
    let t1 = t + Duration::from_secs(10);
    a.e2e.tick(t1, wall());
    assert_eq!(a.e2e.stats.group_rotations.load(Ordering::Relaxed), 1);
    assert_eq!(carry(&a, &b, t1, wall()), 1, "the initiation carries the next key");
    assert_eq!(carry(&b, &a, t1, wall()), 1);
    let during = flood(t1 + Duration::from_secs(1));
    assert_eq!(seal::parse(&during).unwrap().index, old_id, "the old key seals until the switch");
    a.e2e.tick(t1 + Duration::from_secs(1), wall());
    assert_eq!(seal::parse(&flood(t1)).unwrap().index, old_id);
    let t2 = t1 + limits.group_switch;
    a.e2e.tick(t2, wall());
    let new = flood(t2);
    assert_ne!(seal::parse(&new).unwrap().index, old_id, "sealed with the new key after the switch");
    assert_eq!(open_at(&b, "lab.a", "tunbus.v1.all.a", &new, t2).unwrap(), b"TB flood");
    // Floods still in flight under the old key open (b keeps the key before), once each.
    assert_eq!(open_at(&b, "lab.a", "tunbus.v1.all.a", &during, t2).unwrap(), b"TB flood");
    assert_eq!(open_at(&b, "lab.a", "tunbus.v1.all.a", &during, t2), Err(OpenRefusal::Replayed));
    // Two renewals later the first key is forgotten.
    for k in 1..=2u64 {
        let at = t2 + Duration::from_secs(10 * k);
        a.e2e.tick(at, wall());
        carry(&a, &b, at, wall());
        carry(&b, &a, at, wall());
        a.e2e.tick(at + limits.group_switch, wall());
    }
    assert_eq!(open_at(&b, "lab.a", "tunbus.v1.all.a", &old, t2 + Duration::from_secs(40)), Err(OpenRefusal::DecryptFailed));
    assert_eq!(a.e2e.stats.group_rotations.load(Ordering::Relaxed), 3);
}

/// Agents without a peers file: each learns the other from its hello.
fn first_use_pair() -> (Node, Node) {
    let ka = PrivateKey::generate().unwrap();
    let kb = PrivateKey::generate().unwrap();
    let a = Node { user: "lab.a", key: ka.clone(), e2e: E2e::first_use(ka, "a", S, Limits::default()).unwrap() };
    let b = Node { user: "lab.b", key: kb.clone(), e2e: E2e::first_use(kb, "b", S, Limits::default()).unwrap() };
    (a, b)
}

fn host(addr: &str) -> Vec<Prefix> {
    vec![format!("{addr}/32").parse().unwrap()]
}

#[test]
fn first_use_pins_keys_from_hellos_and_refuses_another_key_later() {
    let (a, b) = first_use_pair();
    let t = Instant::now();
    assert_eq!(seal_to(&a, "198.18.0.2", KEY_B, b"x", t), Err(SealRefusal::NoKey), "nobody known yet");
    // Own hello is ignored; b's pins b's key and starts a handshake.
    assert_eq!(a.e2e.learn("lab.a", "a", a.key.public(), &host("198.18.0.1"), t, wall()), Learned::Ignored);
    assert_eq!(a.e2e.learn("lab.b", "b", b.key.public(), &host("198.18.0.2"), t, wall()), Learned::Pinned);
    assert_eq!(b.e2e.learn("lab.a", "a", a.key.public(), &host("198.18.0.1"), t, wall()), Learned::Pinned);
    assert_eq!(a.e2e.learn("lab.b", "b", b.key.public(), &host("198.18.0.2"), t, wall()), Learned::Known, "again: nothing new");
    assert_eq!(carry(&a, &b, t, wall()), 1);
    assert_eq!(carry(&b, &a, t, wall()), 2, "b's own initiation and its response");
    assert_eq!(carry(&a, &b, t, wall()), 2);
    let body = seal_to(&a, "198.18.0.2", KEY_B, b"TB to b", t).unwrap();
    assert_eq!(open_at(&b, "lab.a", KEY_B, &body, t).unwrap(), b"TB to b");
    // An impostor announces b with its own key (same user or another): refused, b's pin stays.
    let mallory = PrivateKey::generate().unwrap();
    assert!(
        matches!(a.e2e.learn("lab.b", "b", mallory.public(), &host("198.18.0.2"), t, wall()), Learned::Conflict { pinned_key, .. } if pinned_key == b.key.public())
    );
    assert!(matches!(a.e2e.learn("rogue", "b", b.key.public(), &host("198.18.0.2"), t, wall()), Learned::Conflict { .. }));
    assert!(matches!(a.e2e.learn("rogue", "m", b.key.public(), &host("198.18.0.9"), t, wall()), Learned::Conflict { .. }), "b's key under another name");
    assert_eq!(a.e2e.stats.key_conflicts.load(Ordering::Relaxed), 3);
    assert_eq!(a.e2e.peer_keys(), [("b".to_owned(), "lab.b".to_owned(), Some(b.key.public()))]);
    // Its batches for b are still sealed for b's pinned key (b opens them, nobody else can).
    let again = seal_to(&a, "198.18.0.2", KEY_B, b"TB still b", t).unwrap();
    assert_eq!(open_at(&b, "lab.a", KEY_B, &again, t).unwrap(), b"TB still b");
    // An impostor's initiation under b's user, with its own key, does not complete.
    a.e2e.learn("lab.m", "m", mallory.public(), &host("198.18.0.9"), t, wall());
    let (_, forged) =
        handshake::initiate(&mallory, &a.key.public(), b"tunbus e2e v1 session=lab", 5, Payload { timestamp_ns: u64::MAX, group_id: 1, group_key: [0; 32] })
            .unwrap();
    assert_eq!(a.e2e.on_handshake(Some(b"lab.b"), handshake_key("a").as_bytes(), &forged, t, 1), Err(OpenRefusal::DecryptFailed));
}

#[test]
fn first_use_follows_moved_addresses_and_lets_agents_share_a_login() {
    let kc = PrivateKey::generate().unwrap();
    let (a, b) = first_use_pair();
    let t = Instant::now();
    // b and c log in as the same user (a lab on one shared login).
    let c = Node { user: "lab.b", key: kc.clone(), e2e: E2e::first_use(kc.clone(), "c", S, Limits::default()).unwrap() };
    assert_eq!(a.e2e.learn("lab.b", "b", b.key.public(), &host("198.18.0.2"), t, wall()), Learned::Pinned);
    assert_eq!(a.e2e.learn("lab.b", "c", kc.public(), &host("198.18.0.3"), t, wall()), Learned::Pinned);
    b.e2e.learn("lab.a", "a", a.key.public(), &host("198.18.0.1"), t, wall());
    c.e2e.learn("lab.a", "a", a.key.public(), &host("198.18.0.1"), t, wall());
    for _ in 0..3 {
        for (x, y) in [(&a, &b), (&b, &a)] {
            carry(x, y, t, wall());
        }
        let key_c = handshake_key("c");
        for m in a.e2e.take_outgoing() {
            if m.routing_key == key_c {
                let _ = c.e2e.on_handshake(Some(b"lab.a"), m.routing_key.as_bytes(), &m.body, t, wall());
            } else {
                a.e2e.push(m);
            }
        }
        for m in c.e2e.take_outgoing() {
            let _ = a.e2e.on_handshake(Some(b"lab.b"), m.routing_key.as_bytes(), &m.body, t, wall());
        }
    }
    assert!(a.e2e.has_session("b") && a.e2e.has_session("c"));
    let to_c = seal_to(&a, "198.18.0.3", "tunbus.v1.198-18-0-3.0", b"TB to c", t).unwrap();
    assert_eq!(open_at(&c, "lab.a", "tunbus.v1.198-18-0-3.0", &to_c, t).unwrap(), b"TB to c");
    assert_eq!(open_at(&b, "lab.a", "tunbus.v1.198-18-0-3.0", &to_c, t), Err(OpenRefusal::DecryptFailed), "sealed for c only");
    let from_c = seal_to(&c, "198.18.0.1", KEY_A, b"TB from c", t).unwrap();
    assert_eq!(open_at(&a, "lab.b", KEY_A, &from_c, t).unwrap(), b"TB from c");
    // c moves to .4 and b takes .3 over (the claims table granted it): a follows.
    assert_eq!(a.e2e.learn("lab.b", "c", kc.public(), &host("198.18.0.4"), t, wall()), Learned::Known);
    assert_eq!(a.e2e.learn("lab.b", "b", b.key.public(), &[host("198.18.0.2")[0], host("198.18.0.3")[0]], t, wall()), Learned::Known);
    let to_3 = seal_to(&a, "198.18.0.3", "tunbus.v1.198-18-0-3.0", b"TB to 3", t).unwrap();
    assert_eq!(open_at(&b, "lab.a", "tunbus.v1.198-18-0-3.0", &to_3, t).unwrap(), b"TB to 3");
    let to_4 = seal_to(&a, "198.18.0.4", "tunbus.v1.198-18-0-4.0", b"TB to 4", t).unwrap();
    assert_eq!(open_at(&c, "lab.a", "tunbus.v1.198-18-0-4.0", &to_4, t).unwrap(), b"TB to 4");
    // A peers-file agent learns nothing from hellos.
    let (strict, _, _) = nodes(Limits::default(), true);
    assert_eq!(strict.e2e.learn("lab.z", "z", kc.public(), &host("198.18.0.9"), t, wall()), Learned::Ignored);
}
