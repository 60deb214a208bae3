//! The consumer's window: how many unacknowledged messages the broker may push to this
//! queue worker (AMQP's prefetch), sized to the path as TCP's receive-buffer autotuning
//! sizes its window (issue 28, docs/decisions/0031).
//!
//! A fixed prefetch of 32 is one round trip's worth of 32 batches: plenty on a LAN (a
//! round trip of a few hundred microseconds), a cap of 32 batches per round trip to a
//! broker 50 ms away. So the window follows what one round trip carries:
//!
//! - **The round trip** to the broker is measured end to end, through any proxy or TLS: the
//!   time a `basic.qos` takes to be answered ([`Ask::Probe`], at connect and now and then;
//!   every resize is one too). The least sample since the connection came up counts:
//!   under load an answer waits behind deliveries, and that is queueing, not the path.
//! - **The rate**: messages and bytes delivered over an interval of a few round trips.
//! - **Growth**: when one round trip carried at least half the window, the window may be
//!   what limits the rate, so it doubles ([`Ask::Prefetch`]), up to [`MEMORY_BOUND`] bytes
//!   of messages of the size seen (and AMQP's 65,535). It never shrinks while the
//!   connection lives (as TCP's autotuning); a new connection starts again from the
//!   configured `--prefetch`. On a LAN a round trip carries a few messages: it stays put.
//!
//! Pure: the caller passes the time, sends what [`Window::poll`] asks for, and says when
//! the answer came ([`Window::answered`]).

use std::time::{Duration, Instant};

/// Most bytes of unacknowledged messages one queue worker lets the broker push to it.
pub const MEMORY_BOUND: u64 = 64 << 20;
/// A new round-trip sample this often (the first at connect).
pub const PROBE_EVERY: Duration = Duration::from_secs(10);
/// The rate is measured over at least this long (and at least four round trips).
pub const MIN_INTERVAL: Duration = Duration::from_millis(20);
/// A probe not answered within this long is given up (the connection's own liveness
/// handles a dead broker).
pub const PROBE_GIVE_UP: Duration = Duration::from_secs(30);

/// What the window wants sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ask {
    /// A round-trip sample: `basic.qos` with the current prefetch (changes nothing).
    Probe(u16),
    /// The consumer renewed with this prefetch.
    Prefetch(u16),
}

/// One queue worker's window.
#[derive(Debug)]
pub struct Window {
    floor: u16,
    adaptive: bool,
    prefetch: u16,
    min_rtt: Option<Duration>,
    /// A probe or resize sent and not answered yet.
    asked: Option<Instant>,
    next_probe: Instant,
    since: Instant,
    messages: u64,
    bytes: u64,
}

impl Window {
    /// A window that starts (and stays, unless `adaptive`) at `floor`.
    pub fn new(floor: u16, adaptive: bool, now: Instant) -> Window {
        let floor = floor.max(1);
        Window { floor, adaptive, prefetch: floor, min_rtt: None, asked: None, next_probe: now, since: now, messages: 0, bytes: 0 }
    }

    /// A new connection: back to the configured prefetch (the plan set it), a round-trip
    /// sample at once.
    pub fn reset(&mut self, now: Instant) {
        *self = Window::new(self.floor, self.adaptive, now);
    }

    pub fn prefetch(&self) -> u16 {
        self.prefetch
    }

    /// The least round trip to the broker seen on this connection.
    pub fn min_rtt(&self) -> Option<Duration> {
        self.min_rtt
    }

    /// A message of `bytes` was delivered.
    pub fn delivered(&mut self, bytes: usize) {
        self.messages += 1;
        self.bytes += bytes as u64;
    }

    /// What to send now, if anything.
    pub fn poll(&mut self, now: Instant) -> Option<Ask> {
        if !self.adaptive {
            return None;
        }
        if let Some(at) = self.asked {
            if now.saturating_duration_since(at) < PROBE_GIVE_UP {
                return None; // one question at a time
            }
            self.asked = None;
        }
        let Some(rtt) = self.min_rtt.filter(|_| now < self.next_probe) else {
            return Some(Ask::Probe(self.prefetch));
        };
        let elapsed = now.saturating_duration_since(self.since);
        if elapsed < MIN_INTERVAL.max(rtt * 4) {
            return None;
        }
        let (messages, bytes) = (self.messages, self.bytes);
        self.since = now;
        self.messages = 0;
        self.bytes = 0;
        // Messages one round trip carried: at least half the window, and the window may be
        // the limit.
        let per_rtt = messages as f64 * rtt.as_secs_f64() / elapsed.as_secs_f64();
        if messages == 0 || per_rtt * 2.0 < f64::from(self.prefetch) {
            return None;
        }
        let average = (bytes / messages).max(1);
        let cap = (MEMORY_BOUND / average).clamp(u64::from(self.floor), u64::from(u16::MAX)) as u16;
        let next = self.prefetch.saturating_mul(2).min(cap);
        (next > self.prefetch).then_some(Ask::Prefetch(next))
    }

    /// `ask` went out at `now`.
    pub fn sent(&mut self, ask: Ask, now: Instant) {
        self.asked = Some(now);
        match ask {
            Ask::Probe(_) => self.next_probe = now + PROBE_EVERY,
            Ask::Prefetch(p) => self.prefetch = p,
        }
    }

    /// The broker answered what was asked last: a round-trip sample.
    pub fn answered(&mut self, now: Instant) {
        let Some(at) = self.asked.take() else { return };
        let rtt = now.saturating_duration_since(at);
        self.min_rtt = Some(self.min_rtt.map_or(rtt, |m| m.min(rtt)));
        // The rate is measured afresh under the new window.
        self.since = now;
        self.messages = 0;
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A window whose first probe was answered after `rtt`; returns it and the time.
    fn measured(rtt: Duration) -> (Window, Instant) {
        let t = Instant::now();
        let mut w = Window::new(32, true, t);
        assert_eq!(w.poll(t), Some(Ask::Probe(32)), "a sample at connect");
        w.sent(Ask::Probe(32), t);
        assert_eq!(w.poll(t + rtt / 2), None, "one question at a time");
        w.answered(t + rtt);
        assert_eq!(w.min_rtt(), Some(rtt));
        (w, t + rtt)
    }

    /// A path of round trip `rtt` that delivers `per_rtt(window)` messages of `bytes` per
    /// round trip for `secs`; the window's questions are answered one round trip later.
    fn drive(w: &mut Window, mut t: Instant, rtt: Duration, bytes: usize, secs: u64, per_rtt: impl Fn(u16) -> u64) -> Instant {
        let end = t + Duration::from_secs(secs);
        let mut pending: Option<Instant> = None;
        while t < end {
            for _ in 0..per_rtt(w.prefetch()) {
                w.delivered(bytes);
            }
            t += rtt;
            if pending.is_some_and(|p| t >= p) {
                w.answered(t);
                pending = None;
            }
            if let Some(ask) = w.poll(t) {
                w.sent(ask, t);
                pending = Some(t + rtt);
            }
        }
        t
    }

    /// The window is the limit: a round trip carries all of it.
    fn window_limited(w: &mut Window, t: Instant, rtt: Duration, bytes: usize, secs: u64) -> Instant {
        drive(w, t, rtt, bytes, secs, u64::from)
    }

    #[test]
    fn a_far_broker_grows_the_window_to_the_memory_bound() {
        let rtt = 50 * MS;
        let (mut w, t) = measured(rtt);
        window_limited(&mut w, t, rtt, 65_536, 5);
        assert_eq!(u64::from(w.prefetch()), MEMORY_BOUND / 65_536, "64 KiB messages: 1024 of them in 64 MiB");
        // Small messages: up to AMQP's bound.
        let (mut w, t) = measured(rtt);
        window_limited(&mut w, t, rtt, 100, 10);
        assert_eq!(w.prefetch(), u16::MAX);
    }

    #[test]
    fn growth_is_one_doubling_per_few_round_trips() {
        let rtt = 100 * MS;
        let (mut w, t) = measured(rtt);
        window_limited(&mut w, t, rtt, 16_384, 1);
        assert!((64..=256).contains(&w.prefetch()), "a second at 100 ms: a few doublings, {}", w.prefetch());
    }

    #[test]
    fn a_lan_keeps_the_configured_window() {
        let rtt = Duration::from_micros(200);
        let (mut w, mut t) = measured(rtt);
        // 20,000 messages a second: four per round trip.
        for _ in 0..2000 {
            for _ in 0..20 {
                w.delivered(9000);
            }
            t += MS;
            if let Some(ask) = w.poll(t) {
                assert!(matches!(ask, Ask::Probe(32)), "{ask:?}");
                w.sent(ask, t);
                w.answered(t + rtt);
            }
        }
        assert_eq!(w.prefetch(), 32);
    }

    #[test]
    fn a_rate_limited_elsewhere_stops_growing() {
        let rtt = 50 * MS;
        let (mut w, t) = measured(rtt);
        // 2,000 messages a second whatever the window: 100 per round trip.
        drive(&mut w, t, rtt, 20_000, 10, |_| 100);
        assert_eq!(w.prefetch(), 256, "grows while half of it is used, then stops");
    }

    #[test]
    fn the_least_round_trip_counts_and_a_reset_starts_again() {
        let (mut w, t) = measured(50 * MS);
        let t1 = t + PROBE_EVERY;
        assert_eq!(w.poll(t1), Some(Ask::Probe(32)));
        w.sent(Ask::Probe(32), t1);
        w.answered(t1 + 200 * MS); // waited behind deliveries
        assert_eq!(w.min_rtt(), Some(50 * MS));
        window_limited(&mut w, t1 + 200 * MS, 50 * MS, 1000, 2);
        assert!(w.prefetch() > 32);
        w.reset(t1 + Duration::from_secs(3));
        assert_eq!((w.prefetch(), w.min_rtt()), (32, None));
    }

    #[test]
    fn an_unanswered_probe_is_given_up_and_fixed_windows_ask_nothing() {
        let t = Instant::now();
        let mut w = Window::new(32, true, t);
        w.sent(Ask::Probe(32), t);
        assert_eq!(w.poll(t + PROBE_GIVE_UP - MS), None);
        assert_eq!(w.poll(t + PROBE_GIVE_UP), Some(Ask::Probe(32)));
        let mut fixed = Window::new(32, false, t);
        for _ in 0..10_000 {
            fixed.delivered(100);
        }
        assert_eq!(fixed.poll(t + Duration::from_secs(60)), None);
    }
}
