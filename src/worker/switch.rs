//! The switch state an L2 agent's workers share (`agent connect --l2`): the learned MAC
//! table ([`MacDirectory`]: written by queue 0's receiving half, read as snapshots by
//! every sending half), and the MACs seen behind this agent's own bridge ([`LocalMacs`]:
//! noted by the sending halves, announced in queue 0's hellos so that first-claim
//! receivers accept them).
//!
//! Like `identity::Trust`: a version number the readers compare once per batch, and a
//! snapshot they take again (one `Arc` clone) only when it changed; the hot path takes no
//! lock. The decisions themselves (what is learned, when it ages) are `route::mac`'s, pure.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::amqp::presence::Hello;
use crate::packet::ethernet::Mac;
use crate::route::mac::MacTable;

/// Shortest time between two publications of the table to the sending halves.
pub const REPUBLISH_GAP: Duration = Duration::from_millis(50);
/// Most MACs an agent announces as seen behind its bridge.
pub const MAX_LOCAL_MACS: usize = 62;

/// The learned table, shared and versioned.
#[derive(Debug, Default)]
pub struct MacDirectory {
    version: AtomicU64,
    table: RwLock<Arc<MacTable>>,
}

impl MacDirectory {
    pub fn new() -> Arc<MacDirectory> {
        Arc::new(MacDirectory::default())
    }

    fn publish(&self, table: &MacTable) {
        if let Ok(mut t) = self.table.write() {
            *t = Arc::new(table.clone());
        }
        self.version.fetch_add(1, Ordering::Release);
    }

    /// A sending half's view.
    pub fn view(self: &Arc<MacDirectory>) -> MacView {
        let table = self.table.read().map(|t| t.clone()).unwrap_or_default();
        MacView { directory: self.clone(), version: self.version.load(Ordering::Acquire), table }
    }
}

/// One sending half's snapshot of the table.
#[derive(Debug)]
pub struct MacView {
    directory: Arc<MacDirectory>,
    version: u64,
    table: Arc<MacTable>,
}

impl MacView {
    /// Takes the newest table if it changed (one atomic load).
    #[inline]
    pub fn refresh(&mut self) {
        let v = self.directory.version.load(Ordering::Acquire);
        if v != self.version {
            if let Ok(t) = self.directory.table.read() {
                self.table = t.clone();
            }
            self.version = v;
        }
    }

    /// The agent (its TAP's MAC) that owns `mac`, if known.
    #[inline]
    pub fn owner(&self, mac: Mac) -> Option<Mac> {
        self.table.owner(mac)
    }
}

/// Queue 0's learner: hellos say which MACs an agent owns (and give its name's MAC, so
/// that its floods teach their source MACs); it publishes the table to the directory.
#[derive(Debug)]
pub struct Learner {
    table: MacTable,
    directory: Arc<MacDirectory>,
    /// Agent name → its TAP's MAC, from hellos.
    owners: HashMap<String, Mac>,
    own: Mac,
    dirty: bool,
    last_publish: Option<Instant>,
    last_expire: Instant,
    /// When a hello of another layer was last warned about.
    warned_layer: Option<Instant>,
}

/// Most agents whose names the learner keeps.
const MAX_OWNERS: usize = 16_384;

impl Learner {
    /// The learner of the agent whose TAP is `own`.
    pub fn new(own: Mac, directory: Arc<MacDirectory>) -> Learner {
        Learner {
            table: MacTable::new(),
            directory,
            owners: HashMap::new(),
            own,
            dirty: false,
            last_publish: None,
            last_expire: Instant::now(),
            warned_layer: None,
        }
    }

    /// A hello or bye (any agent's, ours included).
    pub fn on_hello(&mut self, hello: &Hello, now: Instant) {
        if hello.layer != crate::amqp::presence::HelloLayer::Ethernet {
            if self.warned_layer.is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(30)) {
                tracing::warn!(agent = %hello.name, layer = %hello.layer, "an agent of another layer is in this L2 session: it cannot reach us nor we it (sessions of different layers do not mix; give it a session of its own)");
                self.warned_layer = Some(now);
            }
            return;
        }
        let Some(&first) = hello.macs.first() else { return };
        if hello.leaving {
            self.owners.remove(hello.name.as_str());
            self.dirty |= self.table.forget_owner(first);
        } else {
            if self.owners.len() < MAX_OWNERS || self.owners.contains_key(hello.name.as_str()) {
                self.owners.insert(hello.name.as_str().to_owned(), first);
            }
            for &mac in &hello.macs {
                self.dirty |= self.table.learn(mac, first, now);
            }
        }
        self.publish_if_due(now);
    }

    /// A flooded frame from `mac`, sent by agent `sender` (the flood key's last word), that
    /// passed the identity check. Frames from an agent whose hello is not known teach
    /// nothing yet (their replies are flooded until it is).
    #[inline]
    pub fn on_flooded_frame(&mut self, sender: &str, mac: Mac, now: Instant) {
        if let Some(&owner) = self.owners.get(sender) {
            if owner != self.own {
                self.dirty |= self.table.learn(mac, owner, now);
            }
        }
    }

    /// Publishes when changed and due; ages entries every few seconds.
    pub fn tick(&mut self, now: Instant) {
        if now.saturating_duration_since(self.last_expire) >= Duration::from_secs(5) {
            self.last_expire = now;
            self.dirty |= self.table.expire(now);
        }
        self.publish_if_due(now);
    }

    fn publish_if_due(&mut self, now: Instant) {
        if self.dirty && self.last_publish.is_none_or(|t| now.saturating_duration_since(t) >= REPUBLISH_GAP) {
            self.directory.publish(&self.table);
            self.dirty = false;
            self.last_publish = Some(now);
        }
    }
}

/// The MACs the sending halves saw as sources on this agent's TAP other than its own
/// (hosts behind its bridge), for its hellos.
#[derive(Debug, Default)]
pub struct LocalMacs {
    version: AtomicU64,
    macs: Mutex<Vec<Mac>>,
}

impl LocalMacs {
    pub fn new() -> Arc<LocalMacs> {
        Arc::new(LocalMacs::default())
    }

    /// `mac` was seen as a source on the TAP. Called only for a source that differs from
    /// the last one the caller noted (a lock per new source, not per frame).
    pub fn note(&self, mac: Mac) {
        if mac.is_multicast() {
            return;
        }
        if let Ok(mut m) = self.macs.lock() {
            if !m.contains(&mac) && m.len() < MAX_LOCAL_MACS {
                m.push(mac);
                self.version.fetch_add(1, Ordering::Release);
            }
        }
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    pub fn list(&self) -> Vec<Mac> {
        self.macs.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

/// What an L2 agent's workers share.
#[derive(Clone, Debug)]
pub struct L2Shared {
    /// The TAP's own MAC.
    pub own: Mac,
    pub directory: Arc<MacDirectory>,
    pub local: Arc<LocalMacs>,
}

impl L2Shared {
    pub fn new(own: Mac) -> L2Shared {
        L2Shared { own, directory: MacDirectory::new(), local: LocalMacs::new() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Mac = Mac([2, 0, 0, 0, 0, 0xa]);
    const B: Mac = Mac([2, 0, 0, 0, 0, 0xb]);
    const X: Mac = Mac([2, 0, 0, 0, 0, 0x99]);

    fn hello(name: &str, macs: &[Mac], leaving: bool) -> Hello {
        let macs: Vec<String> = macs.iter().map(ToString::to_string).collect();
        let body =
            format!(r#"{{"name":"{name}","addresses":[],"queues":1,"wire":"v1","started_unix_ms":1,"layer":"ethernet","macs":{macs:?},"leaving":{leaving}}}"#);
        serde_json::from_str(&body).expect("a hello")
    }

    #[test]
    fn hellos_and_floods_teach_the_senders_views() {
        let dir = MacDirectory::new();
        let mut view = dir.view();
        let mut l = Learner::new(A, dir.clone());
        let t0 = Instant::now();
        l.on_hello(&hello("h2", &[B], false), t0);
        view.refresh();
        assert_eq!(view.owner(B), Some(B));
        // X floods from behind h2's bridge.
        l.on_flooded_frame("h2", X, t0 + REPUBLISH_GAP);
        l.tick(t0 + REPUBLISH_GAP);
        view.refresh();
        assert_eq!(view.owner(X), Some(B));
        // An unknown sender teaches nothing; our own echo neither.
        l.on_flooded_frame("h9", Mac([2, 9, 9, 9, 9, 9]), t0);
        l.on_hello(&hello("h1", &[A], false), t0 + REPUBLISH_GAP * 2);
        l.on_flooded_frame("h1", Mac([2, 8, 8, 8, 8, 8]), t0 + REPUBLISH_GAP * 2);
        l.tick(t0 + REPUBLISH_GAP * 3);
        view.refresh();
        assert_eq!(view.owner(Mac([2, 9, 9, 9, 9, 9])), None);
        assert_eq!(view.owner(Mac([2, 8, 8, 8, 8, 8])), None);
        // Bye: what h2 taught goes.
        l.on_hello(&hello("h2", &[B], true), t0 + REPUBLISH_GAP * 4);
        view.refresh();
        assert_eq!(view.owner(B), None);
        assert_eq!(view.owner(X), None);
    }

    #[test]
    fn hellos_of_another_layer_teach_nothing() {
        let dir = MacDirectory::new();
        let mut l = Learner::new(A, dir.clone());
        let body = br#"{"name":"r1","addresses":[],"queues":1,"wire":"v1","started_unix_ms":1,"macs":["02:00:00:00:00:0b"]}"#;
        l.on_hello(&serde_json::from_slice(body).expect("a hello"), Instant::now());
        let mut v = dir.view();
        v.refresh();
        assert_eq!(v.owner(B), None);
    }

    #[test]
    fn local_macs_are_bounded_and_versioned() {
        let l = LocalMacs::new();
        let v0 = l.version();
        l.note(X);
        l.note(X);
        l.note(Mac::BROADCAST);
        assert_eq!(l.list(), vec![X]);
        assert_eq!(l.version(), v0 + 1);
        for i in 0..200u8 {
            l.note(Mac([2, 1, 1, 1, 1, i]));
        }
        assert_eq!(l.list().len(), MAX_LOCAL_MACS);
    }
}
