//! Session-key logs, as TLS's `SSLKEYLOGFILE`: what lets a capture see inside sealed
//! batches when whoever runs it holds the agents' logs (decision 0029, "Capture").
//!
//! With Noise IK the keys that seal batches come from ephemeral keys: the agents' static
//! private keys alone open nothing that was captured. An agent given a key log
//! (`agent connect --e2e-key-log FILE`, a lab's `--keys DIR`) appends one line per key that
//! opens batches sent *to* it or *by* it to many:
//!
//! ```text
//! TUNBUS_E2E_PAIR <agent> <index, 8 hex digits> <key, 64 hex digits>    a session's receiving key, under this agent's index
//! TUNBUS_E2E_GROUP <agent> <id, 8 hex digits> <key, 64 hex digits>      this agent's group key (its floods)
//! ```
//! A sealed batch's header names the index (pairwise) or the group key id (floods), so
//! [`KeyRing`] (`agent capture --keys DIR`) finds the candidate keys and lets the tag say
//! which opens it. Each direction of a session is opened with its receiver's line, so a
//! capture sees both directions of a pair when both agents log. The file is made 0600: it
//! holds keys that read the traffic.
//!
//! The log is written on the control path (at start, at each handshake); the ring reads
//! the directory again when a batch names a key it does not know (sessions are renewed
//! every two minutes), at most every [`RELOAD_EVERY`].

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::seal::{self, Cipher, Kind};

/// Shortest time between two reads of the key directory.
pub const RELOAD_EVERY: Duration = Duration::from_millis(200);

/// One line of a key log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    pub kind: Kind,
    pub agent: String,
    pub index: u32,
    pub key: [u8; 32],
}

impl Line {
    pub fn to_text(&self) -> String {
        let tag = match self.kind {
            Kind::Pair => "TUNBUS_E2E_PAIR",
            Kind::Group => "TUNBUS_E2E_GROUP",
        };
        let key: String = self.key.iter().map(|b| format!("{b:02x}")).collect();
        format!("{tag} {} {:08x} {key}", self.agent, self.index)
    }

    /// A line of a key log; `None` for anything else (comments, other tools' lines).
    pub fn parse(text: &str) -> Option<Line> {
        let mut words = text.split_whitespace();
        let kind = match words.next()? {
            "TUNBUS_E2E_PAIR" => Kind::Pair,
            "TUNBUS_E2E_GROUP" => Kind::Group,
            _ => return None,
        };
        let agent = words.next()?.to_owned();
        let index = u32::from_str_radix(words.next()?, 16).ok()?;
        let hex = words.next()?;
        if hex.len() != 64 || words.next().is_some() {
            return None;
        }
        let mut key = [0u8; 32];
        for (i, k) in key.iter_mut().enumerate() {
            *k = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Line { kind, agent, index, key })
    }
}

/// An agent's key log, appended to.
#[derive(Debug)]
pub struct KeyLog {
    agent: String,
    file: Mutex<std::fs::File>,
}

impl KeyLog {
    /// Opens (creates, mode 0600) `path` for agent `agent`'s lines.
    pub fn create(path: &Path, agent: &str) -> std::io::Result<KeyLog> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path)?;
        Ok(KeyLog { agent: agent.to_owned(), file: Mutex::new(file) })
    }

    /// Notes a key that opens batches of `kind` naming `index`. A write that fails is
    /// logged and forgotten: the key log is for observers, never in the traffic's way.
    pub fn note(&self, kind: Kind, index: u32, key: &[u8; 32]) {
        let line = Line { kind, agent: self.agent.clone(), index, key: *key }.to_text();
        let written = self.file.lock().map_err(|_| std::io::Error::other("poisoned")).and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = written {
            tracing::warn!(error = %e, "cannot write the end-to-end key log");
        }
    }
}

/// The keys of a directory of key logs, for opening what a capture sees.
pub struct KeyRing {
    dir: PathBuf,
    pair: HashMap<u32, Vec<Cipher>>,
    group: HashMap<u32, Vec<Cipher>>,
    known: std::collections::HashSet<(Kind, u32, [u8; 32])>,
    last_load: Option<Instant>,
    /// Batches opened, and sealed ones no key opened.
    pub opened: u64,
    pub unopened: u64,
}

impl KeyRing {
    /// The keys of every file in `dir` (read again as batches name unknown keys).
    pub fn new(dir: &Path) -> std::io::Result<KeyRing> {
        std::fs::read_dir(dir)?;
        let mut ring =
            KeyRing { dir: dir.to_owned(), pair: HashMap::new(), group: HashMap::new(), known: Default::default(), last_load: None, opened: 0, unopened: 0 };
        ring.load();
        Ok(ring)
    }

    /// Keys known.
    pub fn len(&self) -> usize {
        self.known.len()
    }

    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }

    fn load(&mut self) {
        self.last_load = Some(Instant::now());
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        for e in entries.flatten() {
            let Ok(text) = std::fs::read_to_string(e.path()) else { continue };
            for line in text.lines().filter_map(Line::parse) {
                if self.known.insert((line.kind, line.index, line.key)) {
                    let map = if line.kind == Kind::Pair { &mut self.pair } else { &mut self.group };
                    map.entry(line.index).or_default().push(seal::cipher(&line.key));
                }
            }
        }
    }

    fn try_open(&self, header: seal::Header, routing_key: &[u8], body: &[u8], out: &mut Vec<u8>) -> bool {
        let map = if header.kind == Kind::Pair { &self.pair } else { &self.group };
        map.get(&header.index).is_some_and(|ciphers| ciphers.iter().any(|c| seal::open(c, header, routing_key, body, out).is_ok()))
    }

    /// Opens a sealed `body` received with `routing_key` into `out` (the v1 frame), reading
    /// the directory again when no key known yet opens it. `false`: no key does.
    pub fn open(&mut self, routing_key: &[u8], body: &[u8], out: &mut Vec<u8>) -> bool {
        let Ok(header) = seal::parse(body) else {
            self.unopened += 1;
            return false;
        };
        let mut ok = self.try_open(header, routing_key, body, out);
        if !ok && self.last_load.is_none_or(|t| t.elapsed() >= RELOAD_EVERY) {
            self.load();
            ok = self.try_open(header, routing_key, body, out);
        }
        if ok {
            self.opened += 1;
        } else {
            self.unopened += 1;
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use seal::Header;

    #[test]
    fn lines_round_trip_and_others_are_ignored() {
        let l = Line { kind: Kind::Pair, agent: "h1".into(), index: 0xdead_beef, key: [0xab; 32] };
        let text = l.to_text();
        assert_eq!(text, format!("TUNBUS_E2E_PAIR h1 deadbeef {}", "ab".repeat(32)));
        assert_eq!(Line::parse(&text), Some(l));
        let g = Line { kind: Kind::Group, agent: "h2".into(), index: 7, key: [1; 32] };
        assert_eq!(Line::parse(&g.to_text()), Some(g));
        for bad in [
            "",
            "# a comment",
            "CLIENT_RANDOM 00 11",
            "TUNBUS_E2E_PAIR h1 xyz 00",
            "TUNBUS_E2E_PAIR h1 1 abab",
            &format!("TUNBUS_E2E_PAIR h1 1 {} extra", "00".repeat(32)),
        ] {
            assert_eq!(Line::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_ring_opens_what_its_directory_has_keys_for_and_reads_new_lines() {
        let dir = std::env::temp_dir().join(format!("tunbus-keyring-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let log = KeyLog::create(&dir.join("h2.keys"), "h2").unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(dir.join("h2.keys")).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600, "a key log is its owner's only");
        log.note(Kind::Pair, 42, &[5; 32]);
        let mut ring = KeyRing::new(&dir).unwrap();
        assert_eq!(ring.len(), 1);
        let key = b"tunbus.v1.198-18-0-2.0";
        let mut sealed = Vec::new();
        seal::seal(&seal::cipher(&[5; 32]), Header { kind: Kind::Pair, index: 42, counter: 3 }, key, b"TB frame", &mut sealed).unwrap();
        let mut out = Vec::new();
        assert!(ring.open(key, &sealed, &mut out));
        assert_eq!(out, b"TB frame");
        // A flood under a group key noted after the ring was made: read on the next miss.
        seal::seal(&seal::cipher(&[6; 32]), Header { kind: Kind::Group, index: 9, counter: 0 }, b"tunbus.v1.all.h2", b"TB flood", &mut sealed).unwrap();
        log.note(Kind::Group, 9, &[6; 32]);
        ring.last_load = None;
        assert!(ring.open(b"tunbus.v1.all.h2", &sealed, &mut out));
        assert_eq!(out, b"TB flood");
        // Under another index, or moved to another key: not opened.
        seal::seal(&seal::cipher(&[5; 32]), Header { kind: Kind::Pair, index: 43, counter: 4 }, key, b"TB frame", &mut sealed).unwrap();
        assert!(!ring.open(key, &sealed, &mut out));
        assert!(!ring.open(b"elsewhere", &sealed, &mut out));
        assert_eq!((ring.opened, ring.unopened), (2, 2));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
