//! The Internet checksum (RFC 1071), written once: the ones' complement sum of 16-bit
//! big-endian words, the IPv4 and IPv6 pseudo-header sums of TCP, UDP and ICMPv6, and the
//! incremental update of a checksum when one word changes (RFC 1624).
//!
//! The sum reads eight bytes at a time into a 64-bit accumulator (two 32-bit halves per
//! word, so no carry is lost), in the machine's byte order, and swaps the folded result
//! once: the ones' complement sum does not depend on the byte order of the words
//! (RFC 1071, section 2). Pieces can be chained with [`Sum`]; a piece that starts at an odd
//! offset of the covered data is swapped before it is added, so any split gives the same
//! checksum.
//!
//! Pure. Runs on the queue workers (completing offloaded checksums), in the segmenter
//! (capture, emulation) and in the header setters of the views.

use std::net::{Ipv4Addr, Ipv6Addr};

/// A running ones' complement sum: chain pieces with [`Sum::add_bytes`], then [`Sum::fold`] for
/// the sum or [`Sum::checksum`] for the checksum field.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sum {
    /// Sum of the pieces' folded sums, big-endian values, not yet folded.
    acc: u64,
    /// Whether the bytes added so far have an odd count.
    odd: bool,
}

impl Sum {
    /// The empty sum.
    #[inline]
    pub const fn new() -> Sum {
        Sum { acc: 0, odd: false }
    }

    /// The sum of `data`.
    #[inline]
    pub fn of(data: &[u8]) -> Sum {
        Sum::new().add_bytes(data)
    }

    /// Adds `data`, which follows what was added before in the covered bytes.
    #[inline]
    pub fn add_bytes(mut self, data: &[u8]) -> Sum {
        let s = u64::from(sum_be(data));
        self.acc += if self.odd { u64::from((s as u16).swap_bytes()) } else { s };
        self.odd ^= data.len() % 2 == 1;
        self
    }

    /// Adds a 16-bit big-endian word (two bytes of the covered data).
    #[inline]
    pub fn add_u16(self, word: u16) -> Sum {
        self.add_bytes(&word.to_be_bytes())
    }

    /// Adds a 32-bit big-endian value (four bytes of the covered data).
    #[inline]
    pub fn add_u32(self, value: u32) -> Sum {
        self.add_bytes(&value.to_be_bytes())
    }

    /// The ones' complement sum, folded to 16 bits (`0xffff` when the data verifies).
    #[inline]
    pub fn fold(self) -> u16 {
        fold(self.acc)
    }

    /// The value for a checksum field: the ones' complement of [`Sum::fold`].
    #[inline]
    pub fn checksum(self) -> u16 {
        !self.fold()
    }
}

/// The Internet checksum of `data`: what an IPv4 header or ICMPv4 message carries in its
/// checksum field (computed with that field zero), and 0 when `data` verifies.
#[inline]
pub fn checksum(data: &[u8]) -> u16 {
    Sum::of(data).checksum()
}

/// Whether `data` (checksum field included) verifies: its sum is `0xffff`.
#[inline]
pub fn verifies(data: &[u8]) -> bool {
    Sum::of(data).fold() == 0xffff
}

/// The IPv4 pseudo-header of a transport segment of `len` bytes (RFC 793, RFC 768).
#[inline]
pub fn pseudo_v4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, len: u16) -> Sum {
    Sum::new().add_bytes(&src.octets()).add_bytes(&dst.octets()).add_u16(u16::from(protocol)).add_u16(len)
}

/// The IPv6 pseudo-header of an upper-layer packet of `len` bytes (RFC 8200, 8.1).
#[inline]
pub fn pseudo_v6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, len: u32) -> Sum {
    Sum::new().add_bytes(&src.octets()).add_bytes(&dst.octets()).add_u32(len).add_u32(u32::from(next_header))
}

/// The checksum after one 16-bit word of the covered data changed from `old` to `new`,
/// without summing the rest again: RFC 1624, equation 3, `HC' = ~(~HC + ~m + m')`.
#[inline]
pub fn update(check: u16, old: u16, new: u16) -> u16 {
    !fold(u64::from(!check) + u64::from(!old) + u64::from(new))
}

/// Folds an unfolded sum to 16 bits with end-around carries.
#[inline]
fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Adds the two 32-bit halves of an 8-byte word in machine order.
#[inline(always)]
fn halves(w: &[u8; 8]) -> u64 {
    let v = u64::from_ne_bytes(*w);
    (v & 0xffff_ffff) + (v >> 32)
}

/// [`halves`] of the eight bytes at `at` (a constant below 25) of a 32-byte block.
#[inline(always)]
fn halves_at(block: &[u8; 32], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&block[at..at + 8]);
    halves(&w)
}

/// The folded ones' complement sum of `data` as big-endian words (an odd last byte is the
/// high byte of a word padded with zero). Each step adds at most 2^33, so the
/// accumulators cannot overflow below 2^31 steps per accumulator (16 GiB).
#[inline]
fn sum_be(mut data: &[u8]) -> u16 {
    let (mut a, mut b, mut c, mut d) = (0u64, 0u64, 0u64, 0u64);
    while let Some((block, rest)) = data.split_first_chunk::<32>() {
        // Four independent accumulators let the additions run in parallel.
        a += halves_at(block, 0);
        b += halves_at(block, 8);
        c += halves_at(block, 16);
        d += halves_at(block, 24);
        data = rest;
    }
    while let Some((w, rest)) = data.split_first_chunk::<8>() {
        a += halves(w);
        data = rest;
    }
    let mut tail = [0u8; 8];
    tail[..data.len()].copy_from_slice(data);
    b += halves(&tail);
    let folded = fold(a + b + c + d);
    // The words were read in machine order; the sum of the byte-swapped words is the
    // byte-swapped sum.
    u16::from_be(folded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// RFC 1071 written plainly: 16-bit big-endian words into a u32, folded.
    fn naive(data: &[u8]) -> u16 {
        let mut sum: u64 = 0;
        for c in data.chunks(2) {
            sum += u64::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u16
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071, 3: the bytes 00 01 f2 03 f4 f5 f6 f7 sum to ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(Sum::of(&data).fold(), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
    }

    #[test]
    fn an_ipv4_header_verifies() {
        // A real header (Wikipedia's example): checksum b861.
        let mut h = [0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7];
        assert_eq!(checksum(&h), 0xb861);
        h[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert!(verifies(&h));
        assert_eq!(checksum(&h), 0);
    }

    #[test]
    fn every_length_and_alignment_matches_the_plain_sum() {
        let data: Vec<u8> = (0..300u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        for start in 0..9 {
            for end in start..data.len() {
                assert_eq!(Sum::of(&data[start..end]).fold(), naive(&data[start..end]), "{start}..{end}");
            }
        }
        assert_eq!(Sum::of(&[]).fold(), 0);
        assert_eq!(Sum::of(&[0xff; 65_535]).fold(), naive(&[0xff; 65_535]));
    }

    #[test]
    fn pseudo_headers() {
        // 198.18.0.1 -> 198.18.0.2, UDP, 13 bytes: the words summed by hand.
        let s = pseudo_v4(Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(198, 18, 0, 2), 17, 13);
        assert_eq!(s.fold(), naive(&[198, 18, 0, 1, 198, 18, 0, 2, 0, 17, 0, 13]));
        let (a, b): (Ipv6Addr, Ipv6Addr) = ("fd00::1".parse().unwrap(), "fd00:7b::2".parse().unwrap());
        let mut bytes = a.octets().to_vec();
        bytes.extend_from_slice(&b.octets());
        bytes.extend_from_slice(&70_000u32.to_be_bytes());
        bytes.extend_from_slice(&[0, 0, 0, 6]);
        assert_eq!(pseudo_v6(a, b, 6, 70_000).fold(), naive(&bytes));
    }

    proptest! {
        #[test]
        fn prop_fast_sum_is_the_plain_sum(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            prop_assert_eq!(Sum::of(&data).fold(), naive(&data));
        }

        #[test]
        fn prop_any_split_gives_the_same_sum(
            data in proptest::collection::vec(any::<u8>(), 0..600),
            cuts in proptest::collection::vec(any::<usize>(), 0..5),
        ) {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (data.len() + 1)).collect();
            cuts.sort_unstable();
            let mut s = Sum::new();
            let mut from = 0;
            for c in cuts.into_iter().chain([data.len()]) {
                s = s.add_bytes(&data[from..c]);
                from = c;
            }
            prop_assert_eq!(s.fold(), naive(&data));
        }

        #[test]
        fn prop_incremental_update_is_a_recomputation(
            mut data in proptest::collection::vec(any::<u8>(), 4..200),
            at in any::<usize>(),
            new in any::<u16>(),
        ) {
            // The first word never changes and is never zero, as in a real header (an
            // all-zero buffer is where +0 and -0 would differ).
            data[0] |= 0x40;
            let at = (1 + at % (data.len() / 2 - 1)) * 2;
            let check = checksum(&data);
            let old = u16::from_be_bytes([data[at], data[at + 1]]);
            data[at..at + 2].copy_from_slice(&new.to_be_bytes());
            prop_assert_eq!(update(check, old, new), checksum(&data));
        }
    }
}
