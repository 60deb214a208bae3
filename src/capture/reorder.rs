//! Puts a capture's packets in timestamp order before they reach the file. Pure: packets
//! and the time of arrival in, packets out into the [`Recorder`] it wraps.
//!
//! Packets are stamped with their sender's frame timestamp, but they reach the tap in the
//! order the broker delivers them: an agent with several queues publishes on several
//! connections, and a batch stamped earlier on one can arrive after a later one from
//! another (measured here: up to 32 ms with two queues under iperf3). Like a jitter
//! buffer, [`Reorder`] holds each packet for [`WINDOW`] after it arrived and writes the
//! held ones oldest timestamp first, so the file is in timestamp order, per sender and as
//! a whole. A packet that arrives later than the window behind one already written is
//! written at once and counted as `late`. The packets held are bounded by [`MAX_BYTES`]:
//! beyond, the oldest are written early.
//!
//! Interfaces pass straight through: a pcapng interface block is written before any
//! packet that names it.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::net::IpAddr;

use super::Recorder;

/// How long a packet waits for ones stamped earlier that arrive after it.
pub const WINDOW_NS: u64 = 250_000_000;
/// Most bytes of packets held.
pub const MAX_BYTES: usize = 64 << 20;

/// One packet held.
struct Held {
    iface: u32,
    timestamp_ns: u64,
    arrived_ns: u64,
    data: Vec<u8>,
    comment: Option<String>,
}

/// A recorder that writes into `inner` in timestamp order.
pub struct Reorder<'a> {
    inner: &'a mut dyn Recorder,
    /// (timestamp, arrival order) → slot in `held`.
    order: BinaryHeap<Reverse<(u64, u64, usize)>>,
    held: Vec<Option<Held>>,
    free: Vec<usize>,
    arrivals: u64,
    bytes: usize,
    now_ns: u64,
    /// The timestamp of the last packet written.
    written_ns: u64,
    late: u64,
}

impl<'a> Reorder<'a> {
    pub fn new(inner: &'a mut dyn Recorder) -> Reorder<'a> {
        Reorder { inner, order: BinaryHeap::new(), held: Vec::new(), free: Vec::new(), arrivals: 0, bytes: 0, now_ns: 0, written_ns: 0, late: 0 }
    }

    /// The time is `now_ns`: writes the packets that have waited their window, in order.
    pub fn advance(&mut self, now_ns: u64) -> io::Result<()> {
        self.now_ns = self.now_ns.max(now_ns);
        while let Some(Reverse((_, _, slot))) = self.order.peek().copied() {
            let due = self.held[slot].as_ref().is_some_and(|h| h.arrived_ns.saturating_add(WINDOW_NS) <= self.now_ns);
            if !due && self.bytes <= MAX_BYTES {
                break;
            }
            self.write_first()?;
        }
        Ok(())
    }

    /// Writes everything held (the capture is ending).
    pub fn drain(&mut self) -> io::Result<()> {
        while !self.order.is_empty() {
            self.write_first()?;
        }
        self.inner.flush()
    }

    /// Packets that came more than the window behind one written before them.
    pub fn late(&self) -> u64 {
        self.late
    }

    fn write_first(&mut self) -> io::Result<()> {
        let Some(Reverse((_, _, slot))) = self.order.pop() else { return Ok(()) };
        let Some(h) = self.held[slot].take() else { return Ok(()) };
        self.free.push(slot);
        self.bytes -= h.data.len();
        self.written_ns = self.written_ns.max(h.timestamp_ns);
        self.inner.packet(h.iface, h.timestamp_ns, &h.data, h.comment.as_deref())
    }
}

impl Recorder for Reorder<'_> {
    fn interface(&mut self, name: &str, description: &str, addrs: &[(IpAddr, u8)]) -> io::Result<u32> {
        self.inner.interface(name, description, addrs)
    }

    fn link_interface(&mut self, name: &str, description: &str, linktype: u16) -> io::Result<Option<u32>> {
        self.inner.link_interface(name, description, linktype)
    }

    fn packet(&mut self, iface: u32, timestamp_ns: u64, data: &[u8], comment: Option<&str>) -> io::Result<()> {
        if timestamp_ns < self.written_ns {
            self.late += 1;
            return self.inner.packet(iface, timestamp_ns, data, comment);
        }
        let h = Held { iface, timestamp_ns, arrived_ns: self.now_ns, data: data.to_vec(), comment: comment.map(str::to_owned) };
        self.bytes += h.data.len();
        let slot = match self.free.pop() {
            Some(s) => {
                self.held[s] = Some(h);
                s
            }
            None => {
                self.held.push(Some(h));
                self.held.len() - 1
            }
        };
        self.arrivals += 1;
        self.order.push(Reverse((timestamp_ns, self.arrivals, slot)));
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Kept(Vec<(u32, u64, u8)>);

    impl Recorder for Kept {
        fn interface(&mut self, _: &str, _: &str, _: &[(IpAddr, u8)]) -> io::Result<u32> {
            Ok(0)
        }
        fn packet(&mut self, iface: u32, ts: u64, data: &[u8], _: Option<&str>) -> io::Result<()> {
            self.0.push((iface, ts, data[0]));
            Ok(())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn packets_within_the_window_come_out_in_timestamp_order() {
        let mut kept = Kept::default();
        let mut r = Reorder::new(&mut kept);
        const MS: u64 = 1_000_000;
        // Queue 0's batch (100, 103) arrives before queue 1's (101, 102), 30 ms later.
        r.advance(1_000 * MS).unwrap();
        r.packet(0, 100, &[1], None).unwrap();
        r.packet(0, 103, &[4], None).unwrap();
        r.advance(1_030 * MS).unwrap();
        r.packet(0, 101, &[2], None).unwrap();
        r.packet(0, 102, &[3], None).unwrap();
        r.advance(1_100 * MS).unwrap();
        assert!(r.held.iter().flatten().count() == 4, "nothing is written before its window");
        r.advance(1_000 * MS + WINDOW_NS).unwrap();
        // 100 is due; 101 and 102 are older than 103 but not due yet: 103 waits behind them.
        r.advance(1_030 * MS + WINDOW_NS).unwrap();
        // A straggler older than what was written: written at once, counted.
        r.packet(0, 99, &[0], None).unwrap();
        r.drain().unwrap();
        assert_eq!(r.late(), 1);
        let order: Vec<u8> = kept.0.iter().map(|p| p.2).collect();
        assert_eq!(order, [1, 2, 3, 4, 0]);
    }

    #[test]
    fn a_full_buffer_writes_its_oldest_early() {
        let mut kept = Kept::default();
        let mut r = Reorder::new(&mut kept);
        let big = vec![7u8; 1 << 20];
        for ts in 0..80u64 {
            r.packet(0, ts, &big, None).unwrap();
            r.advance(0).unwrap();
        }
        assert!(r.bytes <= MAX_BYTES, "{} bytes held", r.bytes);
        r.drain().unwrap();
        let ts: Vec<u64> = kept.0.iter().map(|p| p.1).collect();
        assert_eq!(ts, (0..80).collect::<Vec<_>>(), "in order all the same");
    }
}
