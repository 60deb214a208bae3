//! One checked view per packet header, in the manner of smoltcp's `wire`: every parser of
//! IP, transport and Ethernet headers in tunbus reads and writes them through these types.
//!
//! A view wraps a byte buffer (`&[u8]`, `&mut [u8]`, `Vec<u8>`) without copying it.
//! `new_checked` makes the one check a view needs (the version, when the header has one,
//! and the length of the fixed header); after it, every accessor of a fixed field is
//! infallible and never panics. The parts whose extent a field of the header gives (IPv4
//! options and payload, a TCP header's options) are returned as `Option`s, and
//! `check_len` says whether every length field agrees with the buffer, for the callers
//! that need an exact packet (the virtio allow-list, the segmenter). There is no
//! `new_unchecked`: a view that exists has been checked. Field offsets live in one private
//! `field` module per view.
//!
//! - [`ipv4`], [`ipv6`] (with the one walk over the extension-header chain), [`ip`] (either
//!   version, protocol numbers, ports), [`tcp`], [`udp`], [`icmp`] (v4 and v6),
//!   [`ethernet`] (with up to two 802.1Q tags, and the [`Mac`] address);
//! - [`checksum`]: the Internet checksum (RFC 1071, eight bytes at a time), the
//!   pseudo-header sums, incremental update (RFC 1624);
//! - [`prefix`]: an address with its prefix length, and the arithmetic on it.
//!
//! Pure: no syscalls, no clock, no threads, no allocation. It runs wherever a header is
//! read: the queue workers for every packet (classification, the offload allow-list; hot
//! path), the router, capture and emulation. It imports nothing else of tunbus, so every
//! layer can use it.

pub mod checksum;
pub mod ethernet;
pub mod icmp;
pub mod ip;
pub mod ipv4;
pub mod ipv6;
pub mod prefix;
pub mod tcp;
pub mod udp;

pub use ethernet::{EthernetFrame, Mac};
pub use icmp::{Icmpv4Packet, Icmpv6Packet};
pub use ip::IpPacket;
pub use ipv4::Ipv4Packet;
pub use ipv6::Ipv6Packet;
pub use prefix::Prefix;
pub use tcp::TcpPacket;
pub use udp::UdpPacket;

/// Why a buffer cannot be viewed as a header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Shorter than the header's fixed part (an empty buffer included).
    #[error("truncated header")]
    Truncated,
    /// The version field is not the view's (4 for IPv4, 6 for IPv6).
    #[error("wrong IP version")]
    Version,
    /// A length field of the header disagrees with the buffer (`check_len`).
    #[error("a length field disagrees with the buffer")]
    Length,
}

/// The two ECN bits of an IP header (RFC 3168).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ecn {
    /// Not ECN-capable transport (`00`).
    NotEct = 0,
    /// ECN-capable transport, ECT(1) (`01`; L4S).
    Ect1 = 1,
    /// ECN-capable transport, ECT(0) (`10`).
    Ect0 = 2,
    /// Congestion experienced (`11`).
    Ce = 3,
}

impl Ecn {
    /// The codepoint of the two low bits of `bits`.
    #[inline]
    pub fn from_bits(bits: u8) -> Ecn {
        match bits & 3 {
            0 => Ecn::NotEct,
            1 => Ecn::Ect1,
            2 => Ecn::Ect0,
            _ => Ecn::Ce,
        }
    }

    /// The two bits.
    #[inline]
    pub fn bits(self) -> u8 {
        self as u8
    }

    /// Whether a router may mark the packet instead of dropping it (ECT(0), ECT(1), CE).
    #[inline]
    pub fn is_capable(self) -> bool {
        self != Ecn::NotEct
    }
}

// Big-endian field access for the views. Callers pass offsets their `new_checked` has
// proved to lie inside the buffer.

#[inline]
fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

#[inline]
fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[inline]
fn set_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

#[inline]
fn set_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// `N` bytes at `at` (zeros if they are not there, which a checked view rules out): read
/// through `get`, so there is no panic path even for a wrong offset.
#[inline]
fn get_array<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    b.get(at..).and_then(<[u8]>::first_chunk::<N>).copied().unwrap_or([0; N])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecn_codepoints() {
        for bits in 0..=255u8 {
            let e = Ecn::from_bits(bits);
            assert_eq!(e.bits(), bits & 3);
            assert_eq!(e.is_capable(), bits & 3 != 0);
        }
        assert_eq!(Ecn::from_bits(0b10), Ecn::Ect0);
        assert_eq!(Ecn::from_bits(0b01), Ecn::Ect1);
    }
}
