//! A bounded FIFO of packets in fixed slots, allocated once: the userspace port's inbox
//! (packets from the bus waiting for the stacks) and outbox (packets the stacks emitted,
//! waiting for the worker's `read`). Each packet carries a tag (the endpoint it is for or
//! from). Pure; on the worker's thread; hot path: pushing and popping never allocate.

/// Packets of at most `slot` bytes, at most `slots` of them.
#[derive(Debug)]
pub struct Ring {
    buf: Vec<u8>,
    lens: Vec<u32>,
    tags: Vec<u32>,
    slot: usize,
    head: usize,
    len: usize,
}

impl Ring {
    /// A ring of `slots` packets of at most `slot` bytes each (at least one of each).
    pub fn new(slots: usize, slot: usize) -> Ring {
        let (slots, slot) = (slots.max(1), slot.max(1));
        Ring { buf: vec![0; slots * slot], lens: vec![0; slots], tags: vec![0; slots], slot, head: 0, len: 0 }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Slots in all.
    pub fn capacity(&self) -> usize {
        self.lens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_full(&self) -> bool {
        self.len == self.lens.len()
    }

    /// The largest packet a slot holds.
    pub fn slot_size(&self) -> usize {
        self.slot
    }

    /// Bytes held by the ring's buffers.
    pub fn footprint(&self) -> usize {
        self.buf.len() + self.lens.len() * 8
    }

    /// Appends a packet that `fill` writes into a slot of `len` bytes; when the ring is
    /// full or `len` exceeds a slot, `fill` is handed back uncalled.
    pub fn push_with<R, F: FnOnce(&mut [u8]) -> R>(&mut self, tag: u32, len: usize, fill: F) -> Result<R, F> {
        if self.is_full() || len > self.slot {
            return Err(fill);
        }
        let i = (self.head + self.len) % self.lens.len();
        let r = fill(&mut self.buf[i * self.slot..i * self.slot + len]);
        self.lens[i] = len as u32;
        self.tags[i] = tag;
        self.len += 1;
        Ok(r)
    }

    /// Appends a copy of `packet`; false when full or too big.
    pub fn push(&mut self, tag: u32, packet: &[u8]) -> bool {
        self.push_with(tag, packet.len(), |b| b.copy_from_slice(packet)).is_ok()
    }

    /// The oldest packet and its tag.
    pub fn front(&self) -> Option<(u32, &[u8])> {
        if self.len == 0 {
            return None;
        }
        let i = self.head;
        Some((self.tags[i], &self.buf[i * self.slot..i * self.slot + self.lens[i] as usize]))
    }

    /// Drops the oldest packet.
    pub fn pop(&mut self) {
        if self.len > 0 {
            self.head = (self.head + 1) % self.lens.len();
            self.len -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    #[test]
    fn bounded_in_count_and_size() {
        let mut r = Ring::new(2, 4);
        assert!(r.push(1, b"ab"));
        assert!(!r.push(2, b"abcde"), "larger than a slot");
        assert!(r.push(2, b"abcd"));
        assert!(r.is_full());
        assert!(!r.push(3, b"x"));
        assert_eq!(r.front(), Some((1, &b"ab"[..])));
        r.pop();
        assert!(r.push(3, b""));
        assert_eq!(r.front(), Some((2, &b"abcd"[..])));
        r.pop();
        assert_eq!(r.front(), Some((3, &b""[..])));
        r.pop();
        r.pop();
        assert!(r.is_empty() && r.front().is_none());
    }

    proptest! {
        /// The ring behaves as a bounded VecDeque of (tag, bytes).
        #[test]
        fn matches_a_bounded_deque(ops in proptest::collection::vec((any::<bool>(), any::<u32>(), proptest::collection::vec(any::<u8>(), 0..12)), 0..200)) {
            let mut ring = Ring::new(5, 8);
            let mut model: VecDeque<(u32, Vec<u8>)> = VecDeque::new();
            for (push, tag, data) in ops {
                if push {
                    let fits = model.len() < 5 && data.len() <= 8;
                    prop_assert_eq!(ring.push(tag, &data), fits);
                    if fits { model.push_back((tag, data)); }
                } else {
                    ring.pop();
                    model.pop_front();
                }
                prop_assert_eq!(ring.len(), model.len());
                prop_assert_eq!(ring.front().map(|(t, b)| (t, b.to_vec())), model.front().cloned());
            }
        }
    }
}
