//! A radio's medium as its receiver hears it: which senders a simulated radio hears, and
//! through what link (`agent serial --hear`, `agent lab --radio --topology`).
//!
//! A radio frame is a flood: one publish reaches every radio of the session, so a link's
//! loss, delay or absence cannot be decided where the frame is sent. It is decided where it
//! is heard, as on a real channel: [`Medium`] wraps a radio's port, learns from the worker
//! who sent the units it is about to write ([`Port::hearing_from`]), and for each
//! - drops it, counted as `unheard` (the radio's [`SerialCounters`]), when its sender is one this radio has no link with
//!   (a listed peer whose spec is [`Spec::unlinked`]);
//! - hands it to the link's seeded [`Emulator`] when the sender's link has a spec (lost,
//!   counted as `lost_on_link`; or due later, held in a delay line drained from [`Port::poll`]);
//! - writes it at once otherwise (an unlisted sender: a plain link).
//!
//! Pure decisions from `emulate::model`; one delay line per port, bounded by each link's
//! `limit`. Runs on the worker's thread.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::serial::SerialCounters;
use super::{Layer, Port};
use crate::codec::v1::VNET_HDR_LEN;
use crate::emulate::{Emulator, Fate, RateClock, Spec};

/// What a radio hears: its links by sender name (a spec of [`Spec::unlinked`]: not heard at
/// all), every decision from `seed`. Senders not listed are heard plainly.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Hearing {
    pub links: Vec<(String, Spec)>,
    pub seed: u64,
}

/// How the units being written now are heard.
#[derive(Clone, Copy, Debug)]
enum Current {
    Plain,
    Unheard,
    /// Through link `i` of `Medium::links`.
    Link(usize),
}

/// A frame due later.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Due {
    at_ns: u64,
    seq: u64,
}

/// A radio port behind its medium (see the module header).
pub struct Medium {
    inner: Box<dyn Port>,
    names: HashMap<String, Current>,
    links: Vec<Emulator>,
    current: Current,
    line: BinaryHeap<Reverse<Due>>,
    held: HashMap<u64, (Vec<u8>, [u8; VNET_HDR_LEN])>,
    next_seq: u64,
    origin: Instant,
    counters: Arc<SerialCounters>,
}

impl Medium {
    /// `inner` heard through `hearing`, counted in `counters` (the radio's own).
    pub fn new(inner: Box<dyn Port>, hearing: &Hearing, counters: Arc<SerialCounters>) -> Medium {
        let mut names = HashMap::new();
        let mut links = Vec::new();
        let unlinked = Spec::unlinked();
        for (i, (peer, spec)) in hearing.links.iter().enumerate() {
            let how = if *spec == unlinked {
                Current::Unheard
            } else {
                links.push(Emulator::new(spec.clone(), hearing.seed, i as u64, Arc::new(RateClock::default()), 0));
                Current::Link(links.len() - 1)
            };
            names.insert(peer.clone(), how);
        }
        Medium { inner, names, links, current: Current::Plain, line: BinaryHeap::new(), held: HashMap::new(), next_seq: 0, origin: Instant::now(), counters }
    }

    fn now_ns(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.origin).as_nanos() as u64
    }

    /// Writes the held frames due at `now`.
    fn drain(&mut self, now: Instant) {
        let now_ns = self.now_ns(now);
        while self.line.peek().is_some_and(|Reverse(d)| d.at_ns <= now_ns) {
            let Some(Reverse(d)) = self.line.pop() else { break };
            if let Some((unit, hdr)) = self.held.remove(&d.seq) {
                let _ = self.inner.write(&hdr, &unit);
            }
        }
    }
}

impl Port for Medium {
    fn layer(&self) -> Layer {
        self.inner.layer()
    }

    fn index(&self) -> usize {
        self.inner.index()
    }

    fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.inner.fd()
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        self.inner.read(buf)
    }

    fn hearing_from(&mut self, sender: Option<&str>) {
        self.current = sender.and_then(|s| self.names.get(s).copied()).unwrap_or(Current::Plain);
    }

    fn write(&mut self, vnet_hdr: &[u8; VNET_HDR_LEN], unit: &[u8]) -> io::Result<()> {
        let i = match self.current {
            Current::Plain => return self.inner.write(vnet_hdr, unit),
            Current::Unheard => {
                self.counters.unheard.fetch_add(1, Relaxed);
                return Ok(());
            }
            Current::Link(i) => i,
        };
        let now = Instant::now();
        let now_ns = self.now_ns(now);
        let held = self.held.len();
        let Some(link) = self.links.get_mut(i) else { return self.inner.write(vnet_hdr, unit) };
        match link.decide(now_ns, unit.len(), held) {
            Fate::Drop(_) => {
                self.counters.lost_on_link.fetch_add(1, Relaxed);
                Ok(())
            }
            Fate::Send { at_ns, copies } => {
                for _ in 0..copies {
                    if at_ns <= now_ns && self.line.is_empty() {
                        self.inner.write(vnet_hdr, unit)?;
                        continue;
                    }
                    self.counters.delayed.fetch_add(1, Relaxed);
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    self.held.insert(seq, (unit.to_vec(), *vnet_hdr));
                    self.line.push(Reverse(Due { at_ns, seq }));
                }
                Ok(())
            }
        }
    }

    fn poll_at(&self) -> Option<Instant> {
        let due = self.line.peek().map(|Reverse(d)| self.origin + Duration::from_nanos(d.at_ns));
        match (due, self.inner.poll_at()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn poll(&mut self, now: Instant) -> bool {
        self.drain(now);
        self.inner.poll(now)
    }

    fn wants_write(&self) -> bool {
        self.inner.wants_write()
    }

    fn unit_sender(&self) -> Option<&str> {
        self.inner.unit_sender()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A port that keeps what it is given (shared, to be read from outside).
    struct Kept(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Port for Kept {
        fn layer(&self) -> Layer {
            Layer::Ieee802154
        }
        fn index(&self) -> usize {
            0
        }
        fn fd(&self) -> Option<BorrowedFd<'_>> {
            None
        }
        fn read(&mut self, _: &mut [u8]) -> io::Result<Option<usize>> {
            Ok(None)
        }
        fn write(&mut self, _: &[u8; VNET_HDR_LEN], unit: &[u8]) -> io::Result<()> {
            self.0.lock().unwrap().push(unit.to_vec());
            Ok(())
        }
    }

    #[test]
    fn unlinked_senders_are_not_heard_lossy_links_lose_delayed_links_wait() {
        let hearing = Hearing {
            links: vec![("far".into(), Spec::unlinked()), ("lossy".into(), "loss 50%".parse().unwrap()), ("slow".into(), "delay 30ms".parse().unwrap())],
            seed: 7,
        };
        let written = Arc::new(Mutex::new(Vec::new()));
        let counters = Arc::new(SerialCounters::default());
        let mut m = Medium::new(Box::new(Kept(written.clone())), &hearing, counters.clone());
        let hdr = [0u8; VNET_HDR_LEN];
        let count = || written.lock().unwrap().len();
        for (sender, n) in [(Some("far"), 10), (Some("near"), 10), (None, 1)] {
            m.hearing_from(sender);
            for k in 0..n {
                m.write(&hdr, &[k as u8, 1, 2]).unwrap();
            }
        }
        assert_eq!(count(), 11, "a plain link and a unit of no known sender pass at once");
        assert_eq!(counters.unheard.load(Relaxed), 10);
        m.hearing_from(Some("lossy"));
        for k in 0..1000 {
            m.write(&hdr, &[k as u8, 1, 2]).unwrap();
        }
        let lost = counters.lost_on_link.load(Relaxed);
        assert!((400..600).contains(&lost), "about half of 1000 lost: {lost}");
        assert_eq!(count() as u64, 11 + 1000 - lost);
        m.hearing_from(Some("slow"));
        for k in 0..5 {
            m.write(&hdr, &[k, 9]).unwrap();
        }
        let before = count();
        let due = m.poll_at().expect("a frame is due later");
        assert!(due >= m.origin + Duration::from_millis(30));
        m.poll(due - Duration::from_millis(1));
        assert_eq!(count(), before, "not before its delay");
        // Each is due 30 ms after it was written: polled at each due time, all come.
        let mut polls = 0;
        while let Some(at) = m.poll_at() {
            m.poll(at);
            polls += 1;
            assert!(polls <= 5, "a frame never came due");
        }
        assert_eq!(count(), before + 5);
        assert_eq!(written.lock().unwrap()[before..], [[0, 9], [1, 9], [2, 9], [3, 9], [4, 9]], "in order");
        assert_eq!(counters.delayed.load(Relaxed), 5);
        // The same seed decides the same losses.
        let again_counters = Arc::new(SerialCounters::default());
        let mut again = Medium::new(Box::new(Kept(Arc::default())), &hearing, again_counters.clone());
        again.hearing_from(Some("lossy"));
        for k in 0..1000 {
            again.write(&hdr, &[k as u8, 1, 2]).unwrap();
        }
        assert_eq!(again_counters.lost_on_link.load(Relaxed), lost);
    }
}
