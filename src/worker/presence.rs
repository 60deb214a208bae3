//! Presence as queue 0 hears it: each hello and bye is parsed once, where it comes off the
//! bus ([`Listeners::on_message`]), and handed to whoever keeps something from it: the
//! first-claim table and the keys pinned on first use ([`ClaimKeeper`], here), the routes
//! gateways advertise (`worker::routes::RouteKeeper`), an L2 agent's MAC owners
//! (`worker::switch::Learner`). What a hello is and how it travels: `amqp::presence`; when
//! an agent says hello: the uplink (`worker::uplink`). Control plane: hellos come every few
//! seconds per agent (parsed with allocation, unlike packets).

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::amqp::presence::Hello;
use crate::identity;
use crate::identity::claims::{Claims, MAX_PER_HELLO};
use crate::port::Layer;

use super::routes::RouteKeeper;
use super::switch::Learner;

/// The keepers of queue 0 of a native agent (each present when its mode needs it).
#[derive(Default)]
pub struct Listeners {
    /// First-claim mode: the claims table (and pinned keys with `--e2e`).
    pub claims: Option<ClaimKeeper>,
    /// The prefixes gateways advertise.
    pub routes: Option<RouteKeeper>,
}

/// What a presence message changed that the receiving half counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Heard {
    /// The hello named an agent pinned with another key (`key_conflict`).
    pub key_conflict: bool,
}

impl Listeners {
    /// A hello or bye from broker user `user`, parsed once and handed to every keeper
    /// (and to an L2 agent's `learner`). A body that is no hello changes nothing.
    pub fn on_message(&mut self, user: Option<&[u8]>, body: &[u8], learner: Option<&mut Learner>, now: Instant) -> Heard {
        let Ok(hello) = serde_json::from_slice::<Hello>(body) else { return Heard::default() };
        let mut heard = Heard::default();
        if let Some(c) = &mut self.claims {
            heard.key_conflict = c.on_hello(user, &hello, now);
        }
        if let Some(r) = &mut self.routes {
            r.on_hello(user, &hello, now);
        }
        if let Some(l) = learner {
            l.on_hello(&hello, now);
        }
        heard
    }

    /// Lets silent claims and routes lapse and publishes what changed (every turn; cheap).
    pub fn tick(&mut self, now: Instant) {
        if let Some(c) = &mut self.claims {
            c.expire(now);
        }
        if let Some(r) = &mut self.routes {
            r.tick(now);
        }
    }
}

/// First-claim mode: the claims queue 0 keeps from the hellos and byes it receives, shared
/// with the agent's other workers through [`identity::Trust`]. Control plane: hellos come
/// every few seconds per agent, parsed here (with allocation, unlike packets).
///
/// A changed table is published to the workers at once, up to [`PUBLISH_BURST`] times in a
/// row (a session starting: each agent's first hello counts before its first packets
/// arrive), then at most once per [`REPUBLISH_GAP`] (a flood of hellos costs a table copy
/// now and then; a claim then takes effect that much later). Refused claims are logged
/// once a second.
pub struct ClaimKeeper {
    claims: Arc<Mutex<Claims>>,
    trust: Arc<identity::Trust>,
    last_expire: Instant,
    /// Publications allowed now (a token bucket: [`PUBLISH_BURST`], one more per
    /// [`REPUBLISH_GAP`]), and when it was last refilled.
    credit: u32,
    credit_at: Instant,
    /// The table changed since it was last published.
    dirty: bool,
    last_warning: Option<Instant>,
    refused_since: u64,
    /// This agent's layer: hellos of the other layer are warned about (sessions of
    /// different layers do not mix).
    layer: crate::amqp::presence::HelloLayer,
    warned_layer: Option<Instant>,
    /// `--e2e` without a peers file: keys in hellos are pinned on first use, each peer
    /// reached at the addresses the table granted it.
    e2e: Option<Arc<crate::e2e::E2e>>,
}

/// Shortest time between two publications of the claims table to the workers, once the
/// burst is spent.
pub const REPUBLISH_GAP: Duration = Duration::from_millis(100);
/// Publications of the claims table at once before [`REPUBLISH_GAP`] applies.
pub const PUBLISH_BURST: u32 = 8;

impl ClaimKeeper {
    pub fn new(claims: Arc<Mutex<Claims>>, trust: Arc<identity::Trust>) -> ClaimKeeper {
        let now = Instant::now();
        ClaimKeeper {
            claims,
            trust,
            last_expire: now,
            credit: PUBLISH_BURST,
            credit_at: now,
            dirty: false,
            last_warning: None,
            refused_since: 0,
            layer: Default::default(),
            warned_layer: None,
            e2e: None,
        }
    }

    /// The keeper of an `--e2e` agent: it also pins keys from hellos.
    pub fn with_e2e(self, e2e: Option<Arc<crate::e2e::E2e>>) -> ClaimKeeper {
        ClaimKeeper { e2e, ..self }
    }

    /// The keeper of an agent whose port is of `layer`.
    pub fn with_layer(self, layer: Layer) -> ClaimKeeper {
        ClaimKeeper { layer: crate::amqp::presence::HelloLayer::of(layer), ..self }
    }

    /// A hello or bye published by broker user `user`. Whether it was refused for naming
    /// an agent pinned with another key (`--e2e` without a peers file).
    pub fn on_hello(&mut self, user: Option<&[u8]>, hello: &Hello, now: Instant) -> bool {
        let mut key_conflict = false;
        let Some(user) = user.map(String::from_utf8_lossy) else {
            return key_conflict; // a claim nobody vouches for claims nothing
        };
        if hello.layer != self.layer
            && self.layer == crate::amqp::presence::HelloLayer::Ip
            && !hello.leaving
            && self.warned_layer.is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(30))
        {
            tracing::warn!(agent = %hello.name, layer = %hello.layer, "an agent of another layer is in this session: it cannot reach us nor we it (an L2 and an L3 session do not mix; give it a session of its own)");
            self.warned_layer = Some(now);
        }
        let Ok(mut claims) = self.claims.lock() else { return key_conflict };
        // MACs (L2) are held in the same table as addresses (`identity::mac_address`).
        let macs = hello.macs.iter().map(|m| identity::mac_address(*m));
        let addrs: Vec<IpAddr> = hello.addresses.iter().map(|p| p.addr).chain(macs).take(MAX_PER_HELLO).collect();
        let changed = if hello.leaving {
            claims.on_bye(&user, &addrs)
        } else {
            let (refused, changed) = claims.on_hello(&user, &addrs, now);
            if let (Some(e2e), Some(key)) = (&self.e2e, hello.key) {
                // Its unicast batches are sealed for the key of whoever holds the address.
                let granted: Vec<crate::route::Prefix> =
                    hello.addresses.iter().map(|p| p.addr).filter(|a| !refused.iter().any(|r| r.addr == *a)).map(crate::route::Prefix::host).collect();
                key_conflict = matches!(e2e.learn(&user, hello.name.as_str(), key, &granted, now, crate::util::now_ns()), crate::e2e::Learned::Conflict { .. });
            }
            self.refused_since += refused.len() as u64;
            if let Some(r) = refused.first() {
                if self.last_warning.is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1)) {
                    tracing::warn!(agent = %hello.name, user = %r.claimant, address = %r.addr, holder = %r.holder, refused = self.refused_since, "REFUSED a claim: this address belongs to another live broker user (or the table is full); its packets from it are dropped");
                    self.last_warning = Some(now);
                    self.refused_since = 0;
                }
            }
            changed
        };
        self.dirty |= changed;
        drop(claims);
        self.publish_if_due(now);
        key_conflict
    }

    /// Publishes the table when it changed and the bucket allows.
    pub fn publish_if_due(&mut self, now: Instant) {
        if !self.dirty {
            return;
        }
        let gaps = now.saturating_duration_since(self.credit_at).as_nanos() / REPUBLISH_GAP.as_nanos();
        if gaps > 0 {
            self.credit = (self.credit as u128 + gaps).min(u128::from(PUBLISH_BURST)) as u32;
            self.credit_at = now;
        }
        if self.credit == 0 {
            return;
        }
        if let Ok(claims) = self.claims.lock() {
            self.trust.publish(claims.table());
            self.dirty = false;
            self.credit -= 1;
        }
    }

    /// Lets claims lapse whose users have gone silent (checked every few seconds).
    pub fn expire(&mut self, now: Instant) {
        self.publish_if_due(now);
        if now.saturating_duration_since(self.last_expire) < Duration::from_secs(5) {
            return;
        }
        self.last_expire = now;
        if let Ok(mut claims) = self.claims.lock() {
            self.dirty |= claims.expire(now);
        }
        self.publish_if_due(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::table::RouteShare;
    use crate::worker::routes::Judge;

    fn keepers() -> (Listeners, Arc<identity::Trust>, Arc<RouteShare>) {
        let trust = identity::Trust::new(&identity::Mode::FirstClaim);
        let claims = Arc::new(Mutex::new(Claims::new()));
        let share = RouteShare::new();
        let routes = RouteKeeper::new("me", &[], share.clone(), Judge::Claims(claims.clone(), trust.clone()));
        (Listeners { claims: Some(ClaimKeeper::new(claims, trust.clone())), routes: Some(routes) }, trust, share)
    }

    #[test]
    fn one_hello_reaches_every_keeper() {
        let (mut l, trust, share) = keepers();
        let gw = br#"{"name":"gw","addresses":["198.18.0.2/24"],"queues":1,"wire":"v1","started_unix_ms":1,"advertise":["198.19.50.0/24"]}"#;
        let t = Instant::now();
        assert_eq!(l.on_message(Some(b"gw"), gw, None, t), Heard::default());
        l.tick(t + REPUBLISH_GAP);
        let mut view = trust.view();
        view.refresh();
        assert_eq!(view.check(Some(b"gw"), "198.18.0.2".parse().unwrap()), identity::Verdict::Allowed, "claimed");
        assert_eq!(share.table().lookup("198.19.50.9".parse().unwrap()).map(|r| r.gateway.clone()).as_deref(), Some("gw"), "routed");
    }

    fn hello_from(user: u32) -> Vec<u8> {
        format!(r#"{{"name":"h{user}","addresses":["198.18.{}.{}/24"],"queues":1,"wire":"v1","started_unix_ms":1}}"#, user / 200, user % 200 + 1).into_bytes()
    }

    fn allowed(trust: &Arc<identity::Trust>, user: u32) -> bool {
        let mut view = trust.view();
        view.refresh();
        let addr = format!("198.18.{}.{}", user / 200, user % 200 + 1).parse().unwrap();
        view.check(Some(format!("u{user}").as_bytes()), addr) == identity::Verdict::Allowed
    }

    #[test]
    fn a_starting_session_is_claimed_at_once_and_a_flood_waits_its_turn() {
        let (mut l, trust, _) = keepers();
        let t = Instant::now();
        // A session starting: each new agent's claim counts before its first packet.
        for u in 0..PUBLISH_BURST {
            l.on_message(Some(format!("u{u}").as_bytes()), &hello_from(u), None, t);
            assert!(allowed(&trust, u), "agent {u}'s claim waited");
        }
        // A flood of hellos beyond the burst: published once per gap.
        for u in PUBLISH_BURST..100 {
            l.on_message(Some(format!("u{u}").as_bytes()), &hello_from(u), None, t);
        }
        assert!(!allowed(&trust, 99), "published beyond the burst");
        l.tick(t + REPUBLISH_GAP);
        assert!(allowed(&trust, 99), "not published after the gap");
    }

    #[test]
    fn garbage_and_invalid_hellos_change_nothing() {
        let (mut l, trust, share) = keepers();
        let v0 = share.version();
        let t = Instant::now();
        for body in [
            &b"not json"[..],
            br#"{"name":"a.b","addresses":["198.18.0.9/24"],"queues":1,"wire":"v1","started_unix_ms":1,"advertise":["198.19.0.0/24"]}"#,
            br#"{"addresses":["198.18.0.9/24"]}"#,
        ] {
            assert_eq!(l.on_message(Some(b"x"), body, None, t), Heard::default());
        }
        l.tick(t + REPUBLISH_GAP);
        assert_eq!(share.version(), v0);
        let mut view = trust.view();
        view.refresh();
        assert_ne!(view.check(Some(b"x"), "198.18.0.9".parse().unwrap()), identity::Verdict::Allowed);
    }
}
