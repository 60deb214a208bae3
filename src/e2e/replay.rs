//! The replay window of one receiving key: which counters (nonces) were already accepted.
//!
//! A sliding bitmap of [`WINDOW`] counters below the highest one seen, as WireGuard and
//! IPsec keep (RFC 6479's idea): a counter above the window moves it on, one inside it is
//! accepted once, one below it is refused. Batches of one sender reach a receiver through
//! several queues (one per flow shard) and so arrive somewhat out of order; the window is
//! wide enough for the queues' bound (4096 messages each) to reorder within it.
//!
//! Only authenticated counters may be offered ([`ReplayWindow::accept`] after the tag
//! checked out): a forged message never moves the window. Pure; one lock per batch.

/// Counters the window remembers below the highest accepted one.
pub const WINDOW: u64 = 8192;
const WORDS: usize = (WINDOW / 64) as usize;

/// Why a counter was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replay {
    /// Accepted before.
    Repeated,
    /// Older than the window: it cannot be told from a replay.
    TooOld,
}

/// The counters accepted so far, as far as the window reaches.
#[derive(Clone, Debug)]
pub struct ReplayWindow {
    /// One more than the highest accepted counter (0: none yet).
    top: u64,
    bits: [u64; WORDS],
}

impl Default for ReplayWindow {
    fn default() -> ReplayWindow {
        ReplayWindow { top: 0, bits: [0; WORDS] }
    }
}

impl ReplayWindow {
    fn bit(counter: u64) -> (usize, u64) {
        let slot = counter % WINDOW;
        ((slot / 64) as usize, 1u64 << (slot % 64))
    }

    /// Whether `counter` would be accepted now (nothing changes).
    pub fn check(&self, counter: u64) -> Result<(), Replay> {
        if counter == u64::MAX {
            return Err(Replay::TooOld); // the window's top could not move past it; never sent
        }
        if counter >= self.top {
            return Ok(());
        }
        if self.top - counter > WINDOW {
            return Err(Replay::TooOld);
        }
        let (w, m) = Self::bit(counter);
        if self.bits[w] & m != 0 {
            Err(Replay::Repeated)
        } else {
            Ok(())
        }
    }

    /// Accepts an authenticated `counter` once.
    pub fn accept(&mut self, counter: u64) -> Result<(), Replay> {
        self.check(counter)?;
        if counter >= self.top {
            // Forget the counters that fall out of the window: [top, counter] reuse their bits.
            let fresh = counter - self.top + 1;
            if fresh >= WINDOW {
                self.bits = [0; WORDS];
            } else {
                for c in self.top..=counter {
                    let (w, m) = Self::bit(c);
                    self.bits[w] &= !m;
                }
            }
            self.top = counter.saturating_add(1);
        }
        let (w, m) = Self::bit(counter);
        self.bits[w] |= m;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[test]
    fn each_counter_once_in_any_order_within_the_window() {
        let mut w = ReplayWindow::default();
        for c in [5, 3, 4, 0, 1, 2, 100, 50] {
            assert_eq!(w.accept(c), Ok(()), "{c}");
        }
        for c in [5, 3, 0, 100, 50] {
            assert_eq!(w.accept(c), Err(Replay::Repeated), "{c}");
        }
        assert_eq!(w.accept(99), Ok(()));
    }

    #[test]
    fn older_than_the_window_is_refused() {
        let mut w = ReplayWindow::default();
        w.accept(WINDOW + 10).unwrap();
        assert_eq!(w.check(10), Err(Replay::TooOld));
        assert_eq!(w.accept(11), Ok(()), "just inside");
        assert_eq!(w.accept(11), Err(Replay::Repeated));
        // A jump far ahead clears everything below.
        w.accept(10 * WINDOW).unwrap();
        assert_eq!(w.accept(10 * WINDOW - 1), Ok(()));
        assert_eq!(w.accept(WINDOW + 10), Err(Replay::TooOld));
    }

    #[test]
    fn the_last_counter_does_not_wrap() {
        let mut w = ReplayWindow::default();
        w.accept(u64::MAX - 1).unwrap();
        assert_eq!(w.accept(u64::MAX - 1), Err(Replay::Repeated));
        assert_eq!(w.accept(u64::MAX), Err(Replay::TooOld), "the last counter is never accepted");
        assert_eq!(w.accept(u64::MAX - 2), Ok(()));
    }

    proptest! {
        /// Against a model: a counter is accepted iff it was never accepted and it is
        /// within WINDOW of the highest accepted one (or above it).
        #[test]
        fn matches_the_model(ops in proptest::collection::vec((0u64..3, 0u64..20_000), 1..600)) {
            let mut w = ReplayWindow::default();
            let mut seen = HashSet::new();
            let mut top = 0u64;
            let mut base = 0u64;
            for (jump, delta) in ops {
                // Mostly near the top, sometimes far ahead.
                let c = if jump == 0 { base + delta * 3 } else { top.saturating_sub(delta % (WINDOW + 100)) };
                if jump == 0 { base = c; }
                let expect = if c >= top { Ok(()) } else if top - c > WINDOW { Err(Replay::TooOld) } else if seen.contains(&c) { Err(Replay::Repeated) } else { Ok(()) };
                prop_assert_eq!(w.accept(c), expect, "counter {}", c);
                if expect.is_ok() {
                    seen.insert(c);
                    top = top.max(c + 1);
                }
            }
        }
    }
}
