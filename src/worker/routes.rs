//! Queue 0's keeper of the prefixes gateways advertise (decision 0027): it reads the route
//! announcements (`tunbus.v1.ctl.route.<name>`, hellos and byes of agents that
//! `--advertise`), judges each prefix against the agent's identity mode, keeps the
//! [`Routes`] and publishes the compiled table to the agent's workers ([`RouteShare`]).
//! Control plane: a gateway announces every few seconds; parsed here, with allocation.
//!
//! Who may advertise what:
//! - strict (`--peers FILE`): a prefix the file grants to the announcing broker user (one
//!   of its prefixes covers it);
//! - first claim: the first live user to advertise a prefix holds it
//!   ([`Claims::on_advertise`]); the claim also lets that user send from addresses inside
//!   it, which the receivers' check then accepts;
//! - off (`--no-identity-check`): any.
//!
//! A refused prefix is logged (at most once a second) and left out: no traffic goes to it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::amqp::presence::Hello;
use crate::identity::claims::Claims;
use crate::identity::{self, Mode};
use crate::route::table::{self, Announcement, RouteShare, Routes, StaticRoute};
use crate::route::Prefix;

/// How an advertisement is judged.
pub enum Judge {
    Off,
    /// The peers file's table.
    Strict(identity::Table),
    /// First claim: the claims queue 0 keeps, and the table the workers check against.
    Claims(Arc<Mutex<Claims>>, Arc<identity::Trust>),
}

impl Judge {
    /// The judge of an agent of identity `mode` (`claims`: queue 0's, in first-claim mode).
    pub fn of(mode: &Mode, claims: Option<Arc<Mutex<Claims>>>, trust: Arc<identity::Trust>) -> Judge {
        match (mode, claims) {
            (Mode::Strict(t), _) => Judge::Strict(t.clone()),
            (Mode::FirstClaim, Some(c)) => Judge::Claims(c, trust),
            // First claim without a claims table (not queue 0): nobody's prefixes count.
            (Mode::FirstClaim, None) => Judge::Strict(identity::Table::default()),
            (Mode::Off, _) => Judge::Off,
        }
    }

    /// The prefixes of `advertise` that `user` may route for; the others, refused, with
    /// who holds them.
    fn judge(&self, user: Option<&str>, advertise: &[Prefix], now: Instant) -> (Vec<Prefix>, Vec<(Prefix, String)>) {
        let nets: Vec<Prefix> = advertise.iter().take(table::MAX_PER_AGENT).filter(|p| table::advertisable(p).is_ok()).map(table::network_of).collect();
        match (self, user) {
            (Judge::Off, _) => (nets, Vec::new()),
            (_, None) => (Vec::new(), nets.into_iter().map(|p| (p, "(no user_id: nobody vouches)".to_owned())).collect()),
            (Judge::Strict(t), Some(user)) => {
                let granted = t.prefixes(user.as_bytes()).unwrap_or(&[]);
                let (ok, no): (Vec<Prefix>, Vec<Prefix>) = nets.into_iter().partition(|p| granted.iter().any(|g| g.covers(p)));
                (ok, no.into_iter().map(|p| (p, "(not granted to this user by the peers file)".to_owned())).collect())
            }
            (Judge::Claims(claims, trust), Some(user)) => {
                let Ok(mut c) = claims.lock() else { return (Vec::new(), Vec::new()) };
                let (refused, changed) = c.on_advertise(user, &nets, now);
                if changed {
                    trust.publish(c.table());
                }
                let accepted = nets.into_iter().filter(|p| c.prefix_holder(p) == Some(user)).collect();
                (accepted, refused.into_iter().map(|r| (r.prefix, r.holder)).collect())
            }
        }
    }

    /// Agent `name` of `user` said goodbye for `advertise`.
    fn withdraw(&self, user: Option<&str>, advertise: &[Prefix]) {
        if let (Judge::Claims(claims, trust), Some(user)) = (self, user) {
            let nets: Vec<Prefix> = advertise.iter().map(table::network_of).collect();
            if let Ok(mut c) = claims.lock() {
                if c.on_withdraw(user, &nets) {
                    trust.publish(c.table());
                }
            }
        }
    }
}

/// Queue 0's routes.
pub struct RouteKeeper {
    routes: Routes,
    share: Arc<RouteShare>,
    judge: Judge,
    last_expire: Instant,
    last_warning: Option<Instant>,
    refused_since: u64,
}

/// How often silent advertisers are looked for.
const EXPIRE_EVERY: Duration = Duration::from_secs(1);

impl RouteKeeper {
    /// The keeper of agent `own`, given `statics` (which it keeps in every table).
    pub fn new(own: &str, statics: &[StaticRoute], share: Arc<RouteShare>, judge: Judge) -> RouteKeeper {
        RouteKeeper { routes: Routes::new(own).with_static(statics), share, judge, last_expire: Instant::now(), last_warning: None, refused_since: 0 }
    }

    /// A hello or bye published by broker user `user` (on any control key: agents in
    /// first-claim mode hear gateways' hellos on both their hello and route keys).
    pub fn on_hello(&mut self, user: Option<&[u8]>, hello: &Hello, now: Instant) {
        let user = user.map(String::from_utf8_lossy);
        let user = user.as_deref();
        if hello.leaving {
            self.judge.withdraw(user, &hello.advertise);
            if self.routes.on_bye(&hello.name, user) {
                self.publish();
            }
            return;
        }
        if hello.advertise.is_empty() && !self.routes.knows(&hello.name) {
            return; // an ordinary agent's hello
        }
        let (accepted, refused) = self.judge.judge(user, &hello.advertise, now);
        if !refused.is_empty() {
            self.refused_since += refused.len() as u64;
            if self.last_warning.is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1)) {
                let list: Vec<String> = refused.iter().map(|(p, holder)| format!("{p} (held by {holder})")).collect();
                tracing::warn!(agent = %hello.name, user = user.unwrap_or("-"), refused = %list.join(", "), since_last = self.refused_since, "REFUSED an advertisement: these prefixes belong to another broker user; no traffic goes to this agent for them");
                self.last_warning = Some(now);
                self.refused_since = 0;
            }
        }
        let a = Announcement { name: &hello.name, user, addresses: &hello.addresses, queues: hello.queues, advertise: &accepted };
        if self.routes.on_announcement(&a, now) {
            self.publish();
        }
    }

    /// Lets silent advertisers go (checked every second).
    pub fn tick(&mut self, now: Instant) {
        if now.saturating_duration_since(self.last_expire) < EXPIRE_EVERY {
            return;
        }
        self.last_expire = now;
        if self.routes.expire(now) {
            self.publish();
        }
    }

    fn publish(&mut self) {
        let table = self.routes.compile();
        for r in table.routes() {
            tracing::debug!(prefix = %r.prefix, gateway = %r.gateway, via = %r.via, standby = ?r.standby, "route");
        }
        tracing::info!(routes = table.routes().len(), "advertised routes changed");
        self.share.publish(table);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn hello(name: &str, addr: &str, advertise: &[&str], leaving: bool) -> Hello {
        let adv: Vec<String> = advertise.iter().map(|s| format!("{s:?}")).collect();
        let body = format!(
            r#"{{"name":"{name}","addresses":["{addr}"],"queues":1,"wire":"v1","started_unix_ms":1,"leaving":{leaving},"advertise":[{}]}}"#,
            adv.join(",")
        );
        serde_json::from_str(&body).expect("a hello")
    }

    fn gateway_of(share: &Arc<RouteShare>, dst: &str) -> Option<String> {
        share.table().lookup(dst.parse::<IpAddr>().unwrap()).map(|r| r.gateway.clone())
    }

    #[test]
    fn strict_mode_takes_only_granted_prefixes() {
        let table =
            identity::Table::new(vec![("gw".into(), vec!["198.19.0.0/16".parse().unwrap()]), ("rogue".into(), vec!["198.18.0.66/32".parse().unwrap()])]);
        let share = RouteShare::new();
        let mut k = RouteKeeper::new("me", &[], share.clone(), Judge::Strict(table));
        let now = Instant::now();
        k.on_hello(Some(b"gw"), &hello("gw", "198.18.0.2/24", &["198.19.50.0/24"], false), now);
        assert_eq!(gateway_of(&share, "198.19.50.9").as_deref(), Some("gw"));
        // A rogue advertises a longer prefix inside gw's grant: refused, nothing diverted.
        k.on_hello(Some(b"rogue"), &hello("rogue", "198.18.0.66/24", &["198.19.50.0/25"], false), now);
        assert_eq!(gateway_of(&share, "198.19.50.9").as_deref(), Some("gw"));
        // Unsigned: refused.
        k.on_hello(None, &hello("anon", "198.18.0.67/24", &["198.19.50.0/26"], false), now);
        assert_eq!(gateway_of(&share, "198.19.50.9").as_deref(), Some("gw"));
        // A bye in gw's name from the rogue changes nothing; gw's own removes the route.
        k.on_hello(Some(b"rogue"), &hello("gw", "198.18.0.2/24", &[], true), now);
        assert_eq!(gateway_of(&share, "198.19.50.9").as_deref(), Some("gw"));
        k.on_hello(Some(b"gw"), &hello("gw", "198.18.0.2/24", &["198.19.50.0/24"], true), now);
        assert_eq!(gateway_of(&share, "198.19.50.9"), None);
    }

    #[test]
    fn first_claim_holds_and_lets_the_gateway_send_from_its_prefix() {
        let trust = identity::Trust::new(&Mode::FirstClaim);
        let claims = Arc::new(Mutex::new(Claims::new()));
        let share = RouteShare::new();
        let mut k = RouteKeeper::new("me", &[], share.clone(), Judge::Claims(claims.clone(), trust.clone()));
        let now = Instant::now();
        k.on_hello(Some(b"gw"), &hello("gw", "198.18.0.2/24", &["198.19.50.0/24"], false), now);
        k.on_hello(Some(b"rogue"), &hello("rogue", "198.18.0.66/24", &["198.19.50.0/24"], false), now);
        let t = share.table();
        let r = t.lookup("198.19.50.9".parse().unwrap()).expect("a route");
        assert_eq!((r.gateway.as_str(), r.standby.len()), ("gw", 0), "the rogue's claim was refused, so it stands by for nothing");
        let mut view = trust.view();
        view.refresh();
        assert_eq!(view.check(Some(b"gw"), "198.19.50.9".parse().unwrap()), identity::Verdict::Allowed);
        assert_eq!(view.check(Some(b"rogue"), "198.19.50.9".parse().unwrap()), identity::Verdict::Spoofed);
        // Silence: the route goes after ROUTE_LIFETIME.
        k.tick(now + table::ROUTE_LIFETIME);
        assert!(share.table().is_empty());
    }

    #[test]
    fn ordinary_hellos_change_nothing() {
        let share = RouteShare::new();
        let mut k = RouteKeeper::new("me", &[], share.clone(), Judge::Off);
        let v0 = share.version();
        k.on_hello(Some(b"h1"), &hello("h1", "198.18.0.1/24", &[], false), Instant::now());
        assert_eq!(share.version(), v0);
    }
}
