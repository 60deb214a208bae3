//! What a link does to each packet: the seeded decisions of one [`Spec`]. Pure: the time
//! and the packet length come in, a [`Fate`] goes out, and every random draw comes from
//! the generator seeded by `--emulate-seed` and the stream (which link, which flow shard),
//! so the same seed and the same packet sequence give the same fates.
//!
//! Per packet, in this order (as netem): is the link flapped down; is the packet lost
//! (random, or the Gilbert–Elliott chain); is the queue full (`limit`); is it duplicated;
//! then when it leaves: now + delay ± jitter (a reordered packet: now), no sooner than
//! the line is free at `rate` ([`RateClock`], shared by the queue workers of one link).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::spec::{Loss, Spec};
use crate::util::{splitmix64, SplitMix64};

/// Why the link dropped a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// The link is down (`flap`).
    Down,
    /// Lost by chance (`loss`).
    Lost,
    /// More packets held than `limit`.
    Limit,
}

/// What happens to one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    Drop(Dropped),
    /// Sent `copies` times (2 when duplicated), leaving at `at_ns`.
    Send {
        at_ns: u64,
        copies: u8,
    },
}

/// When the emulated line is next free at its rate, in ns; one per link, shared by the
/// queue workers whose packets cross it.
#[derive(Debug, Default)]
pub struct RateClock(AtomicU64);

impl RateClock {
    /// Takes the line for `tx_ns` from the later of `ready_ns` and when it is free; returns
    /// when the packet has crossed it.
    fn take(&self, ready_ns: u64, tx_ns: u64) -> u64 {
        let mut free = self.0.load(Ordering::Relaxed);
        loop {
            let done = free.max(ready_ns).saturating_add(tx_ns);
            match self.0.compare_exchange_weak(free, done, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return done,
                Err(now) => free = now,
            }
        }
    }
}

/// One stream of decisions of one link (the link's packets of one flow shard).
#[derive(Debug)]
pub struct Emulator {
    spec: Spec,
    rng: SplitMix64,
    rate: Arc<RateClock>,
    /// When the link came up (the flap schedule starts there).
    start_ns: u64,
    /// Gilbert–Elliott: in the bad state.
    bad: bool,
    last_loss: f64,
    last_delay: f64,
    last_reorder: f64,
}

impl Emulator {
    /// Decisions for `spec`, from `seed` and `stream` (which link and which flow shard), with
    /// the flap schedule starting at `start_ns`.
    pub fn new(spec: Spec, seed: u64, stream: u64, rate: Arc<RateClock>, start_ns: u64) -> Emulator {
        let rng = SplitMix64(splitmix64(seed ^ splitmix64(stream)));
        Emulator { spec, rng, rate, start_ns, bad: false, last_loss: 0.0, last_delay: 0.5, last_reorder: 0.0 }
    }

    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    /// A uniform draw in [0, 1).
    fn uniform(&mut self) -> f64 {
        (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A draw tied to the last one by `correlation` (netem's correlated generator).
    fn correlated(&mut self, last: f64, correlation: f64) -> f64 {
        let u = self.uniform();
        if correlation <= 0.0 {
            u
        } else {
            u * (1.0 - correlation) + last * correlation
        }
    }

    /// The fate of a packet of `len` bytes at `now_ns`, with `held` packets held.
    pub fn decide(&mut self, now_ns: u64, len: usize, held: usize) -> Fate {
        if self.flapped_down(now_ns) {
            return Fate::Drop(Dropped::Down);
        }
        if self.lost() {
            return Fate::Drop(Dropped::Lost);
        }
        if held >= self.spec.limit {
            return Fate::Drop(Dropped::Limit);
        }
        let copies = if self.spec.duplicate > 0.0 && self.uniform() < self.spec.duplicate { 2 } else { 1 };
        let mut at_ns = now_ns.saturating_add(self.delay_ns());
        if let Some(rate) = self.spec.rate {
            let tx_ns = (len as u128 * 8 * 1_000_000_000 / u128::from(rate.max(1))) as u64;
            at_ns = self.rate.take(at_ns, tx_ns);
        }
        Fate::Send { at_ns, copies }
    }

    fn flapped_down(&self, now_ns: u64) -> bool {
        let Some((up, down)) = self.spec.flap else { return false };
        let period = (up + down).as_nanos() as u64;
        period > 0 && now_ns.saturating_sub(self.start_ns) % period >= up.as_nanos() as u64
    }

    fn lost(&mut self) -> bool {
        match self.spec.loss {
            None => false,
            Some(Loss::Random { p, correlation }) => {
                let u = self.correlated(self.last_loss, correlation);
                self.last_loss = u;
                u < p
            }
            Some(Loss::GilbertElliott { p, r, bad_loss, good_loss }) => {
                // Move between the states first, then lose with the state's probability.
                let flip = self.uniform();
                self.bad = if self.bad { flip >= r } else { flip < p };
                let loss = if self.bad { bad_loss } else { good_loss };
                self.uniform() < loss
            }
        }
    }

    /// This packet's delay: a reordered packet has none; jitter is uniform in ±jitter.
    fn delay_ns(&mut self) -> u64 {
        let s = &self.spec;
        let (delay, jitter, reorder, reorder_corr, delay_corr) = (s.delay, s.jitter, s.reorder, s.reorder_correlation, s.delay_correlation);
        if reorder > 0.0 {
            let u = self.correlated(self.last_reorder, reorder_corr);
            self.last_reorder = u;
            if u < reorder {
                return 0;
            }
        }
        let base = delay.as_nanos() as f64;
        if jitter.is_zero() {
            return base as u64;
        }
        let u = self.correlated(self.last_delay, delay_corr);
        self.last_delay = u;
        (base + (2.0 * u - 1.0) * jitter.as_nanos() as f64).max(0.0) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn emulator(text: &str, seed: u64) -> Emulator {
        Emulator::new(text.parse().expect("spec"), seed, 0, Arc::default(), 0)
    }

    fn dropped(text: &str, seed: u64, n: u64) -> Vec<u64> {
        let mut e = emulator(text, seed);
        (0..n).filter(|i| matches!(e.decide(i * 100_000, 100, 0), Fate::Drop(_))).collect()
    }

    #[test]
    fn loss_rate_is_what_was_asked() {
        let n = 100_000;
        for p in [0.01, 0.05, 0.3] {
            let lost = dropped(&format!("loss {}%", p * 100.0), 1, n).len() as f64 / n as f64;
            assert!((lost - p).abs() < 0.01 * p.max(0.1) * 3.0, "asked {p}, lost {lost}");
        }
    }

    #[test]
    fn same_seed_same_drops_other_seed_other_drops() {
        let a = dropped("loss 5%", 7, 10_000);
        assert_eq!(a, dropped("loss 5%", 7, 10_000));
        assert_ne!(a, dropped("loss 5%", 8, 10_000));
    }

    #[test]
    fn gilbert_elliott_loses_in_bursts() {
        // p 1 %, r 10 %: bad spells of 10 packets on average, every ~110; loss ≈ p/(p+r).
        let n = 200_000;
        let lost = dropped("loss gemodel 1% 10%", 3, n);
        let rate = lost.len() as f64 / n as f64;
        assert!((rate - 0.01 / 0.11).abs() < 0.02, "loss {rate}");
        let runs = 1 + lost.windows(2).filter(|w| w[1] != w[0] + 1).count();
        let mean_run = lost.len() as f64 / runs as f64;
        assert!(mean_run > 5.0, "mean burst {mean_run}");
    }

    #[test]
    fn delay_and_jitter_stay_in_bounds() {
        let mut e = emulator("delay 20ms 2ms", 1);
        let (mut lo, mut hi) = (u64::MAX, 0);
        for i in 0..10_000u64 {
            let now = i * 1_000_000;
            let Fate::Send { at_ns, copies: 1 } = e.decide(now, 100, 0) else { panic!("only delay") };
            lo = lo.min(at_ns - now);
            hi = hi.max(at_ns - now);
        }
        assert!((18_000_000..18_100_000).contains(&lo), "{lo}");
        assert!((21_900_001..=22_000_000).contains(&hi), "{hi}");
    }

    #[test]
    fn rate_spaces_packets_by_their_size() {
        // 10 Mbit/s: a 1250-byte packet takes 1 ms on the line.
        let mut e = emulator("rate 10mbit", 1);
        let at: Vec<u64> = (0..5)
            .map(|_| match e.decide(0, 1250, 0) {
                Fate::Send { at_ns, .. } => at_ns,
                v => panic!("{v:?}"),
            })
            .collect();
        assert_eq!(at, [1_000_000, 2_000_000, 3_000_000, 4_000_000, 5_000_000]);
        // An idle line starts again from now.
        assert_eq!(e.decide(100_000_000, 1250, 0), Fate::Send { at_ns: 101_000_000, copies: 1 });
    }

    #[test]
    fn flap_limit_duplicate_reorder() {
        let mut e = emulator("flap 1s 500ms", 1);
        assert!(matches!(e.decide(999_000_000, 1, 0), Fate::Send { .. }));
        assert_eq!(e.decide(1_200_000_000, 1, 0), Fate::Drop(Dropped::Down));
        assert!(matches!(e.decide(1_500_000_000, 1, 0), Fate::Send { .. }));
        assert_eq!(emulator("limit 3", 1).decide(0, 1, 3), Fate::Drop(Dropped::Limit));
        let mut d = emulator("duplicate 50%", 1);
        let twice = (0..10_000).filter(|_| d.decide(0, 1, 0) == Fate::Send { at_ns: 0, copies: 2 }).count();
        assert!((4500..5500).contains(&twice), "{twice}");
        let mut r = emulator("delay 10ms reorder 25%", 1);
        let early = (0..10_000).filter(|_| r.decide(0, 1, 0) == Fate::Send { at_ns: 0, copies: 1 }).count();
        assert!((2200..2800).contains(&early), "{early}");
    }
}
