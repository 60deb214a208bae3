//! Active queue management on the bus: CoDel (RFC 8289) applied where the whole queue is
//! visible, at the receiver. Pure: times and delays in, decisions out. Hot path (one call
//! per delivered batch, nothing per packet).
//!
//! A batch carries its sender's timestamp (wire v1), so the receiver knows how long the
//! batch spent between the sender's flush and its own socket: in the sender's socket, the
//! broker's queue and the consumer window. That one-way delay includes the clocks' offset,
//! so the **sojourn** is the delay above the smallest one seen from that sender recently
//! ([`BaseDelay`], a windowed minimum, as LEDBAT does): constant skew cancels out.
//!
//! Per flow shard (the routing key's last word), a [`Codel`] watches the sojourn of the
//! batches of that shard: a standing queue above `target` for a whole `interval` puts it in
//! its marking state, where it asks for one mark now and the next after `interval /
//! sqrt(count)`; a short burst never does. The receiver then sets CE on an ECN-capable
//! TCP or UDP packet of the batch (its largest: the bulk flow's). Dropping instead, for
//! flows that are not ECN-capable, is opt-in (`--aqm-drop`): the unit here is often a
//! super-packet of dozens of segments, and losing one at CoDel's pace starved a TCP flow
//! behind an emulated 20 Mbit/s link to 0.12 Mbit/s. Flows of
//! other shards (a ping beside a bulk transfer) keep their own state and are not marked for
//! the bulk flow's queue; the bulk flow backs off, and the queue they share shrinks.

use std::time::Duration;

/// Default CoDel target: the standing queue a link may keep.
pub const TARGET: Duration = Duration::from_millis(1);
/// Default CoDel interval: about the worst round trip of the flows it manages.
pub const INTERVAL: Duration = Duration::from_millis(20);
/// How long a smallest delay stays the base before a newer one replaces it.
pub const BASE_WINDOW: Duration = Duration::from_secs(10);

/// CoDel for one queue, on a clock of nanoseconds (the caller's).
#[derive(Clone, Copy, Debug)]
pub struct Codel {
    target_ns: u64,
    interval_ns: u64,
    /// When the sojourn first went above target in this episode (plus an interval: when
    /// it is time to start marking), `None` while below.
    first_above: Option<u64>,
    marking: bool,
    /// When the next mark is due in the marking state.
    mark_next: u64,
    /// Marks in this marking episode.
    count: u32,
    /// `count` when the last episode ended (to resume quickly, as RFC 8289 does).
    last_count: u32,
}

impl Codel {
    pub fn new(target: Duration, interval: Duration) -> Codel {
        Codel {
            target_ns: target.as_nanos() as u64,
            interval_ns: interval.as_nanos().max(1) as u64,
            first_above: None,
            marking: false,
            mark_next: 0,
            count: 0,
            last_count: 0,
        }
    }

    /// Whether the queue is in its marking state.
    pub fn marking(&self) -> bool {
        self.marking
    }

    /// A batch left the queue at `now_ns` after `sojourn_ns`: how many packets of it to
    /// mark (or drop) now. RFC 8289's `dodequeue`/`dequeue`, with a batch for a packet.
    pub fn on_batch(&mut self, now_ns: u64, sojourn_ns: u64) -> u32 {
        let ok_to_mark = if sojourn_ns < self.target_ns {
            self.first_above = None;
            false
        } else {
            match self.first_above {
                None => {
                    self.first_above = Some(now_ns + self.interval_ns);
                    false
                }
                Some(t) => now_ns >= t,
            }
        };
        if self.marking {
            if !ok_to_mark {
                self.marking = false;
                return 0;
            }
            let mut marks = 0;
            while now_ns >= self.mark_next && self.marking && marks < 64 {
                marks += 1;
                self.count = self.count.saturating_add(1);
                self.mark_next = self.control_law(self.mark_next);
            }
            return marks;
        }
        if ok_to_mark {
            self.marking = true;
            // Resume near the last episode's rate when it ended recently.
            let recent = now_ns.saturating_sub(self.mark_next) < 16 * self.interval_ns;
            self.count = if recent && self.count > 2 { self.count - 2 } else { 1 };
            self.last_count = self.count;
            self.mark_next = self.control_law(now_ns);
            return 1;
        }
        0
    }

    /// The time of the next mark: `t + interval / sqrt(count)`.
    fn control_law(&self, t: u64) -> u64 {
        let count = f64::from(self.count.max(1));
        t + (self.interval_ns as f64 / count.sqrt()) as u64
    }
}

/// The smallest one-way delay seen recently from one sender: a windowed minimum over two
/// halves of [`BASE_WINDOW`], so an old minimum ages out (a clock that stepped, a path
/// that got longer) within a window.
#[derive(Clone, Copy, Debug)]
pub struct BaseDelay {
    window_ns: u64,
    /// (minimum, since) of the current and the previous half-window.
    current: (i64, u64),
    previous: i64,
}

impl BaseDelay {
    pub fn new(window: Duration) -> BaseDelay {
        BaseDelay { window_ns: (window.as_nanos() as u64 / 2).max(1), current: (i64::MAX, 0), previous: i64::MAX }
    }

    /// Notes a one-way delay (may be negative: clocks differ) at `now_ns`; returns the
    /// sojourn above the base, in nanoseconds.
    pub fn sojourn(&mut self, now_ns: u64, owd_ns: i64) -> u64 {
        if now_ns.saturating_sub(self.current.1) >= self.window_ns {
            self.previous = self.current.0;
            self.current = (i64::MAX, now_ns);
        }
        self.current.0 = self.current.0.min(owd_ns);
        let base = self.current.0.min(self.previous);
        owd_ns.saturating_sub(base).max(0) as u64
    }
}

/// The queue management of one receiving worker: a base delay per sender slot and a
/// CoDel per flow shard of each. Fixed size, allocated once.
#[derive(Clone, Debug)]
pub struct Aqm {
    /// Whether a packet that is not ECN-capable is dropped for a mark (`--aqm-drop`).
    drops: bool,
    bases: [BaseDelay; SENDER_SLOTS],
    shards: [[Codel; crate::route::SHARDS as usize]; SENDER_SLOTS],
}

/// Senders are hashed into this many slots (two sharing a slot share its state).
pub const SENDER_SLOTS: usize = 16;

impl Aqm {
    pub fn new(target: Duration, interval: Duration, drops: bool) -> Aqm {
        Aqm { drops, bases: [BaseDelay::new(BASE_WINDOW); SENDER_SLOTS], shards: [[Codel::new(target, interval); crate::route::SHARDS as usize]; SENDER_SLOTS] }
    }

    /// Whether packets that are not ECN-capable are dropped for marks (else left alone).
    pub fn drops(&self) -> bool {
        self.drops
    }

    /// A batch from `sender` (a hash of its broker user), flow shard `shard`, stamped
    /// `sent_ns` by its sender, arrived at `now_ns`: packets to mark or drop now.
    pub fn on_batch(&mut self, sender: u64, shard: u8, sent_ns: u64, now_ns: u64) -> u32 {
        let slot = (sender as usize) % SENDER_SLOTS;
        let owd = now_ns as i64 - sent_ns as i64;
        let sojourn = self.bases[slot].sojourn(now_ns, owd);
        let q = &mut self.shards[slot][usize::from(shard) % crate::route::SHARDS as usize];
        q.on_batch(now_ns, sojourn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn a_short_burst_is_never_marked() {
        let mut c = Codel::new(TARGET, INTERVAL);
        // 15 ms of 5 ms sojourn (shorter than the interval), then the queue drains.
        let mut marks = 0;
        for t in 0..15 {
            marks += c.on_batch(t * MS, 5 * MS);
        }
        for t in 15..200 {
            marks += c.on_batch(t * MS, MS / 10);
        }
        assert_eq!(marks, 0);
        assert!(!c.marking());
    }

    #[test]
    fn a_standing_queue_is_marked_at_codels_pace() {
        let mut c = Codel::new(TARGET, INTERVAL);
        let mut marks_at = Vec::new();
        for t in 0..200 {
            for _ in 0..c.on_batch(t * MS, 5 * MS) {
                marks_at.push(t);
            }
        }
        // The first mark one interval after the queue stood above target, then closer and
        // closer: interval / sqrt(count).
        assert_eq!(marks_at[0], 20, "{marks_at:?}");
        let gaps: Vec<u64> = marks_at.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps[0] >= 19 && gaps[0] <= 21, "{gaps:?}");
        assert!(gaps.windows(2).all(|g| g[1] <= g[0] + 1), "gaps shrink: {gaps:?}");
        assert!(marks_at.len() >= 10 && marks_at.len() <= 30, "{} marks in 180 ms", marks_at.len());
        // The queue drains: marking stops at once.
        assert_eq!(c.on_batch(201 * MS, 0), 0);
        assert!(!c.marking());
    }

    #[test]
    fn a_second_flow_is_not_marked_for_the_first_ones_queue() {
        let mut aqm = Aqm::new(TARGET, INTERVAL, false);
        let (bulk, ping) = (3u8, 11u8);
        let (mut bulk_marks, mut ping_marks) = (0, 0);
        for t in 0..300u64 {
            // The bulk flow's batches stand 8 ms in the queue; a ping every 10 ms passes
            // through the same queue but its shard has no standing queue of its own.
            bulk_marks += aqm.on_batch(7, bulk, t * MS, t * MS + 8 * MS);
            if t % 10 == 0 {
                ping_marks += aqm.on_batch(7, ping, t * MS, t * MS + 8 * MS / 10);
            }
        }
        assert!(bulk_marks > 5, "{bulk_marks}");
        assert_eq!(ping_marks, 0);
    }

    #[test]
    fn the_base_delay_cancels_a_clock_offset_and_ages_out() {
        let mut b = BaseDelay::new(Duration::from_secs(2));
        // The sender's clock is 500 ms behind: every one-way delay reads 500 ms more.
        assert_eq!(b.sojourn(0, 500 * MS as i64), 0);
        assert_eq!(b.sojourn(10 * MS, 503 * MS as i64), 3 * MS);
        // Negative delays (a sender ahead of us) are fine.
        let mut b = BaseDelay::new(Duration::from_secs(2));
        assert_eq!(b.sojourn(0, -40 * MS as i64), 0);
        assert_eq!(b.sojourn(MS, -38 * MS as i64), 2 * MS);
        // The path gets 10 ms longer for good: within a window the new delay is the base.
        for t in 0..3000u64 {
            b.sojourn(t * MS, -28 * MS as i64);
        }
        assert_eq!(b.sojourn(3001 * MS, -28 * MS as i64), 0);
    }
}
