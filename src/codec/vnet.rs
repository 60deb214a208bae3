//! The 10-byte `virtio_net_hdr` that precedes every packet on an `IFF_VNET_HDR` TUN, and the
//! allow-list that decides which of them a receiver hands to its kernel.
//!
//! Pure: no syscalls, no allocation. Called by the receiving half of each queue worker once
//! per packet before the TUN write. The header travels on the wire as the sending kernel
//! produced it (little-endian fields, see `docs/wire-format.md`), but any bus member can
//! write any ten bytes there, and the kernel acts on them (`virtio_net_hdr_to_skb`, then
//! GSO). So the receiver never passes on what the sender claimed: [`build`] parses the packet
//! and writes a header of its own, for one of these cases only:
//!
//! | packet                | gso_type          | flags      | csum_start / csum_offset |
//! |-----------------------|-------------------|------------|--------------------------|
//! | anything              | NONE              | none       | 0 / 0 (the plain header) |
//! | IPv4 or IPv6 / TCP    | NONE              | NEEDS_CSUM | transport header / 16    |
//! | IPv4 or IPv6 / UDP    | NONE              | NEEDS_CSUM | transport header / 6     |
//! | IPv4 / TCP            | TCPV4 (+ECN)      | NEEDS_CSUM | transport header / 16    |
//! | IPv6 / TCP            | TCPV6 (+ECN)      | NEEDS_CSUM | transport header / 16    |
//! | IPv4 or IPv6 / UDP    | UDP_L4            | NEEDS_CSUM | transport header / 6     |
//!
//! The IP header must match the packet's length and not be a fragment; IPv6 extension
//! headers are not followed. The packet is read through the checked views of
//! [`crate::packet`] (IP, then TCP or UDP), and checksums are completed with its one
//! checksum implementation. A GSO packet's `gso_size` is at least [`MIN_GSO_SIZE`] and cuts
//! it into at most [`MAX_SEGMENTS`] segments; `hdr_len` is recomputed. The sender's
//! `DATA_VALID` flag is not passed on (the kernel then verifies the checksum itself).
//!
//! What is not in the table is refused ([`VnetError`], counted as `bad_vnet`), with one
//! exception that is safe to degrade: a GSO packet whose payload fits in one segment is
//! written as checksum-only, which is what it is. The receiver's `--no-offload-from-bus`
//! goes further: checksums are completed in software ([`complete_checksum`]) and the kernel
//! only ever sees the plain header.

use crate::packet::checksum::Sum;
use crate::packet::ip::protocol;
use crate::packet::{ipv6, tcp, udp, Error as PacketError, IpPacket, TcpPacket, UdpPacket};

/// Size of `struct virtio_net_hdr` (without `num_buffers`).
pub const HDR_LEN: usize = 10;
/// A header that asks for nothing: a plain, fully checksummed packet.
pub const PLAIN: [u8; HDR_LEN] = [0; HDR_LEN];

pub const F_NEEDS_CSUM: u8 = 1;
pub const F_DATA_VALID: u8 = 2;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_UDP: u8 = 3;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_UDP_L4: u8 = 5;
pub const GSO_ECN: u8 = 0x80;

/// Why a claimed header is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VnetError {
    #[error("flag bits other than NEEDS_CSUM and DATA_VALID")]
    UnknownFlags,
    #[error("unknown GSO type")]
    UnknownGso,
    #[error("UDP fragmentation offload (UFO) is not accepted")]
    Ufo,
    #[error("segmentation offload without NEEDS_CSUM")]
    GsoWithoutCsum,
    #[error("offload asked for a packet that is not unfragmented TCP or UDP over IPv4/IPv6")]
    NotTransport,
    #[error("IP header does not match the packet's length")]
    IpLength,
    #[error("GSO type does not match the packet's IP version or protocol")]
    WrongGso,
    #[error("csum_start/csum_offset do not point at the transport checksum")]
    ChecksumPlace,
    #[error("gso_size below the minimum")]
    GsoSize,
    #[error("more segments than allowed")]
    TooManySegments,
    #[error("checksum or transport header lies outside the packet")]
    OutOfBounds,
}

/// A parsed view of the header fields we need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn parse(b: &[u8; HDR_LEN]) -> VnetHdr {
        let le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        VnetHdr { flags: b[0], gso_type: b[1], hdr_len: le(2), gso_size: le(4), csum_start: le(6), csum_offset: le(8) }
    }

    pub fn to_bytes(self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b
    }

    /// Whether the header asks for segmentation (any GSO type; the ECN bit alone is none).
    pub fn is_gso(&self) -> bool {
        gso_asked(self.gso_type)
    }
}

/// Whether `hdr` asks for segmentation (any GSO type; the ECN bit alone is none): the one
/// test of it on raw header bytes.
#[inline]
pub fn is_gso(hdr: &[u8; HDR_LEN]) -> bool {
    gso_asked(hdr[1])
}

#[inline]
fn gso_asked(gso_type: u8) -> bool {
    gso_type & !GSO_ECN != GSO_NONE
}

/// The kernel's constants: a TCP peer may announce an MSS this small
/// (`TCP_MIN_SND_MSS`), and UDP GSO cuts a send into at most this many datagrams
/// (`UDP_MAX_SEGMENTS`).
pub const MIN_GSO_SIZE: u16 = 48;
pub const MAX_SEGMENTS: usize = 128;

/// What [`build`] needs to know about a packet: where its transport header starts and ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Transport {
    v6: bool,
    tcp: bool,
    /// Offset of the TCP or UDP header.
    start: usize,
    /// Offset of the first payload byte.
    end: usize,
}

impl Transport {
    fn csum_offset(&self) -> usize {
        if self.tcp {
            tcp::CHECKSUM_OFFSET
        } else {
            udp::CHECKSUM_OFFSET
        }
    }
}

/// Parses the IP and transport headers of `p` far enough to place a checksum.
fn transport(p: &[u8]) -> Result<Transport, VnetError> {
    let (v6, start, proto) = match IpPacket::new_checked(p) {
        Ok(IpPacket::V4(ip)) => {
            ip.check_len().map_err(|_| VnetError::IpLength)?;
            if ip.is_fragment() {
                return Err(VnetError::NotTransport); // no whole transport header
            }
            (false, ip.header_len(), ip.protocol())
        }
        Ok(IpPacket::V6(ip)) => {
            ip.check_len().map_err(|_| VnetError::IpLength)?;
            (true, ipv6::HEADER_LEN, ip.next_header())
        }
        // version 4 or 6, shorter than its fixed header
        Err(PacketError::Truncated) if !p.is_empty() => return Err(VnetError::IpLength),
        Err(_) => return Err(VnetError::NotTransport),
    };
    // invariant: check_len proved start <= p.len()
    let l4 = p.get(start..).unwrap_or_default();
    let end = match proto {
        protocol::TCP => {
            let t = TcpPacket::new_checked(l4).map_err(|_| VnetError::OutOfBounds)?;
            t.check_len().map_err(|_| VnetError::OutOfBounds)?;
            start + t.header_len()
        }
        protocol::UDP => {
            UdpPacket::new_checked(l4).map_err(|_| VnetError::OutOfBounds)?;
            start + udp::HEADER_LEN
        }
        _ => return Err(VnetError::NotTransport),
    };
    Ok(Transport { v6, tcp: proto == protocol::TCP, start, end })
}

/// The header to write with `packet`, built from the packet itself: one of the rows of the
/// table above, or why the sender's `claimed` header is refused.
pub fn build(claimed: &[u8; HDR_LEN], packet: &[u8]) -> Result<[u8; HDR_LEN], VnetError> {
    let c = VnetHdr::parse(claimed);
    if c.flags & !(F_NEEDS_CSUM | F_DATA_VALID) != 0 {
        return Err(VnetError::UnknownFlags);
    }
    let ecn = c.gso_type & GSO_ECN != 0;
    let gso = c.gso_type & !GSO_ECN;
    match gso {
        GSO_NONE | GSO_TCPV4 | GSO_TCPV6 | GSO_UDP_L4 => {}
        GSO_UDP => return Err(VnetError::Ufo),
        _ => return Err(VnetError::UnknownGso),
    }
    let needs_csum = c.flags & F_NEEDS_CSUM != 0;
    if gso == GSO_NONE && !needs_csum {
        return if ecn { Err(VnetError::UnknownGso) } else { Ok(PLAIN) };
    }
    if !needs_csum {
        return Err(VnetError::GsoWithoutCsum);
    }
    let t = transport(packet)?;
    if usize::from(c.csum_start) != t.start || usize::from(c.csum_offset) != t.csum_offset() {
        return Err(VnetError::ChecksumPlace);
    }
    let fits = match gso {
        GSO_NONE => !ecn,
        GSO_TCPV4 => t.tcp && !t.v6,
        GSO_TCPV6 => t.tcp && t.v6,
        _ => !t.tcp && !ecn, // GSO_UDP_L4
    };
    if !fits {
        return Err(VnetError::WrongGso);
    }
    // invariant: t.end <= packet.len() <= MAX_PACKET_LEN < 65536 (checked by transport and the codec)
    let hdr_len = u16::try_from(t.end).map_err(|_| VnetError::OutOfBounds)?;
    let checksum_only = VnetHdr { flags: F_NEEDS_CSUM, gso_type: GSO_NONE, hdr_len, gso_size: 0, csum_start: c.csum_start, csum_offset: c.csum_offset };
    if gso == GSO_NONE {
        return Ok(checksum_only.to_bytes());
    }
    if c.gso_size < MIN_GSO_SIZE {
        return Err(VnetError::GsoSize);
    }
    let payload = packet.len() - t.end;
    if payload <= usize::from(c.gso_size) {
        return Ok(checksum_only.to_bytes()); // one segment: nothing to segment
    }
    if payload.div_ceil(usize::from(c.gso_size)) > MAX_SEGMENTS {
        return Err(VnetError::TooManySegments);
    }
    Ok(VnetHdr { gso_type: c.gso_type, gso_size: c.gso_size, ..checksum_only }.to_bytes())
}

/// [`build`] for an Ethernet frame (a TAP's unit, L2 sessions): the kernel's offsets count
/// from the frame's first byte, so the IP packet after the Ethernet header (and its up to
/// two 802.1Q tags) is checked as [`build`] checks a packet, and the offsets are moved by
/// the header's length. Offload is accepted only for IPv4 and IPv6 ethertypes whose payload
/// is of that version; anything else may go with the plain header only.
pub fn build_ethernet(claimed: &[u8; HDR_LEN], frame: &[u8]) -> Result<[u8; HDR_LEN], VnetError> {
    use crate::packet::ethernet::{ethertype, EthernetFrame};
    let c = VnetHdr::parse(claimed);
    if c.flags & F_NEEDS_CSUM == 0 {
        // Nothing to place: `build` decides without reading the packet.
        return build(claimed, &[]);
    }
    let f = EthernetFrame::new_checked(frame).map_err(|_| VnetError::NotTransport)?;
    let l2 = f.header_len();
    let version = f.payload().first().map(|b| b >> 4);
    match (f.ethertype(), version) {
        (ethertype::IPV4, Some(4)) | (ethertype::IPV6, Some(6)) => {}
        _ => return Err(VnetError::NotTransport),
    }
    let start = usize::from(c.csum_start).checked_sub(l2).ok_or(VnetError::ChecksumPlace)?;
    // invariant: start < csum_start <= u16::MAX
    let shifted = VnetHdr { csum_start: start as u16, ..c };
    let built = build(&shifted.to_bytes(), f.payload())?;
    if built == PLAIN {
        return Ok(PLAIN);
    }
    let mut h = VnetHdr::parse(&built);
    // invariant: both fit: the frame is at most MAX_PACKET_LEN bytes (the codec checked)
    // and these offsets lie inside it; a frame too long for u16 offsets is refused.
    let l2 = u16::try_from(l2).map_err(|_| VnetError::OutOfBounds)?;
    h.csum_start = h.csum_start.checked_add(l2).ok_or(VnetError::OutOfBounds)?;
    h.hdr_len = h.hdr_len.checked_add(l2).ok_or(VnetError::OutOfBounds)?;
    Ok(h.to_bytes())
}

/// Finishes a partial checksum in place (`F_NEEDS_CSUM`: the transport checksum field holds
/// only the pseudo-header sum), so that the packet can go where no offload exists, such as
/// the ioppytest wire. A GSO super-packet stays whole: its headers describe the whole
/// packet, so the completed checksum is valid for it as one (large) segment.
pub fn complete_checksum(hdr: &[u8; HDR_LEN], packet: &mut [u8]) -> Result<(), VnetError> {
    let h = VnetHdr::parse(hdr);
    if h.flags & F_NEEDS_CSUM == 0 {
        return Ok(());
    }
    let start = usize::from(h.csum_start);
    let field = start + usize::from(h.csum_offset);
    if field + 2 > packet.len() {
        return Err(VnetError::OutOfBounds);
    }
    // The field holds the pseudo-header's sum: the sum from csum_start is the whole.
    let mut check = Sum::of(&packet[start..]).checksum();
    if check == 0 && h.gso_type & !GSO_ECN != GSO_TCPV4 && h.gso_type & !GSO_ECN != GSO_TCPV6 {
        check = 0xffff; // UDP: 0 means "no checksum"; send its one's-complement twin
    }
    packet[field..field + 2].copy_from_slice(&check.to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use crate::fuzzing::{kernel_header, sample_packet as packet};

    /// The allow-list written out once more, independently of `build`: whether `h` may go
    /// to the kernel with `p`.
    fn allowed(h: &[u8; HDR_LEN], p: &[u8]) -> bool {
        crate::fuzzing::vnet_allowed(h, p)
    }

    fn all_packets() -> Vec<Vec<u8>> {
        let mut v = Vec::new();
        for v6 in [false, true] {
            for tcp in [false, true] {
                for payload in [0, 1, 47, 48, 1000, 8000, 65_000 - 80] {
                    v.push(packet(v6, tcp, payload));
                }
            }
        }
        v
    }

    #[test]
    fn ethernet_frames_are_checked_as_their_ip_packet_with_offsets_moved() {
        for v6 in [false, true] {
            for tcp in [false, true] {
                let p = packet(v6, tcp, 8000);
                let claimed = kernel_header(&p, 1400).to_bytes();
                let expected = build(&claimed, &p).expect("what a kernel sends");
                for tags in 0..=2usize {
                    let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
                    for _ in 0..tags {
                        f.extend_from_slice(&[0x81, 0x00, 0x00, 0x07]);
                    }
                    f.extend_from_slice(&(if v6 { 0x86ddu16 } else { 0x0800 }).to_be_bytes());
                    let l2 = f.len() as u16;
                    f.extend_from_slice(&p);
                    let mut c = VnetHdr::parse(&claimed);
                    c.csum_start += l2;
                    let got = VnetHdr::parse(&build_ethernet(&c.to_bytes(), &f).expect("accepted"));
                    let want = VnetHdr::parse(&expected);
                    assert_eq!(got, VnetHdr { csum_start: want.csum_start + l2, hdr_len: want.hdr_len + l2, ..want });
                    // The same header at the IP packet's offsets lies for a frame.
                    assert!(build_ethernet(&claimed, &f).is_err());
                }
                // An ethertype that is not the payload's version is refused.
                let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
                f.extend_from_slice(&(if v6 { 0x0800u16 } else { 0x86dd }).to_be_bytes());
                f.extend_from_slice(&p);
                let mut c = VnetHdr::parse(&claimed);
                c.csum_start += 14;
                assert_eq!(build_ethernet(&c.to_bytes(), &f), Err(VnetError::NotTransport));
            }
        }
        assert_eq!(build_ethernet(&PLAIN, &[1, 2, 3]), Ok(PLAIN));
        let csum = VnetHdr { flags: F_NEEDS_CSUM, ..VnetHdr::parse(&PLAIN) };
        assert!(build_ethernet(&csum.to_bytes(), &[1, 2, 3]).is_err());
    }

    #[test]
    fn plain_header_stays_plain_for_any_bytes() {
        assert_eq!(build(&PLAIN, &[0x45; 40]), Ok(PLAIN));
        assert_eq!(build(&PLAIN, &[]), Ok(PLAIN));
        // DATA_VALID alone: the kernel verifies instead.
        let dv = VnetHdr { flags: F_DATA_VALID, ..VnetHdr::parse(&PLAIN) };
        assert_eq!(build(&dv.to_bytes(), &[1, 2, 3]), Ok(PLAIN));
    }

    #[test]
    fn what_kernels_send_passes_with_hdr_len_recomputed() {
        for v6 in [false, true] {
            for tcp in [false, true] {
                let p = packet(v6, tcp, 3000);
                let end = if v6 { 40 } else { 20 } + if tcp { 32 } else { 8 };
                for gso in [0, 1448] {
                    let h = kernel_header(&p, gso);
                    let out = VnetHdr::parse(&build(&h.to_bytes(), &p).unwrap());
                    assert_eq!(out, VnetHdr { hdr_len: end as u16, ..h }, "v6 {v6} tcp {tcp} gso {gso}");
                }
            }
        }
        let p = packet(false, true, 3000);
        let ecn = VnetHdr { gso_type: GSO_TCPV4 | GSO_ECN, ..kernel_header(&p, 1448) };
        assert_eq!(VnetHdr::parse(&build(&ecn.to_bytes(), &p).unwrap()).gso_type, GSO_TCPV4 | GSO_ECN);
    }

    #[test]
    fn every_flag_and_gso_type_against_the_table() {
        for p in all_packets() {
            let v6 = p[0] >> 4 == 6;
            let tcp = p[if v6 { 6 } else { 9 }] == 6;
            let base = kernel_header(&p, 1400);
            for flags in 0..=255u8 {
                for gso_type in 0..=255u8 {
                    let h = VnetHdr { flags, gso_type, ..base };
                    let got = build(&h.to_bytes(), &p);
                    let known = flags & !(F_NEEDS_CSUM | F_DATA_VALID) == 0;
                    let csum = flags & F_NEEDS_CSUM != 0;
                    let ecn = gso_type & GSO_ECN != 0;
                    let ok = known
                        && match gso_type & !GSO_ECN {
                            GSO_NONE => !ecn,
                            GSO_TCPV4 => csum && tcp && !v6,
                            GSO_TCPV6 => csum && tcp && v6,
                            GSO_UDP_L4 => csum && !tcp && !ecn,
                            _ => false,
                        };
                    assert_eq!(got.is_ok(), ok, "flags {flags:#x} gso {gso_type:#x} v6 {v6} tcp {tcp} len {}: {got:?}", p.len());
                    if let Ok(out) = got {
                        assert!(allowed(&out, &p), "{:?}", VnetHdr::parse(&out));
                    }
                }
            }
        }
    }

    #[test]
    fn offsets_must_point_at_the_transport_checksum() {
        for p in all_packets() {
            let h = kernel_header(&p, 0);
            for (start, off) in [(0, h.csum_offset), (h.csum_start + 1, h.csum_offset), (h.csum_start, h.csum_offset + 2), (65535, 65535), (h.csum_start, 0)] {
                let bad = VnetHdr { csum_start: start, csum_offset: off, ..h };
                assert_eq!(build(&bad.to_bytes(), &p), Err(VnetError::ChecksumPlace));
            }
        }
    }

    #[test]
    fn gso_size_is_bounded_both_ways() {
        let p = packet(false, false, 20_000);
        let h = |size| kernel_header(&p, size).to_bytes();
        assert_eq!(build(&h(1), &p), Err(VnetError::GsoSize));
        assert_eq!(build(&h(MIN_GSO_SIZE - 1), &p), Err(VnetError::GsoSize));
        assert_eq!(build(&h(100), &p), Err(VnetError::TooManySegments)); // 200 segments
        assert!(build(&h(20_000 / 128 + 1), &p).is_ok());
        // gso_size 0 with a GSO type: below the minimum.
        assert_eq!(build(&h(0).map_or_gso(GSO_UDP_L4), &p), Err(VnetError::GsoSize));
        // One segment or less: written as checksum-only.
        for size in [20_000, 20_001, 65535] {
            let out = VnetHdr::parse(&build(&h(size), &p).unwrap());
            assert_eq!((out.gso_type, out.gso_size, out.flags), (GSO_NONE, 0, F_NEEDS_CSUM));
        }
    }

    trait WithGso {
        fn map_or_gso(self, gso: u8) -> [u8; HDR_LEN];
    }
    impl WithGso for [u8; HDR_LEN] {
        fn map_or_gso(mut self, gso: u8) -> [u8; HDR_LEN] {
            self[1] = gso;
            self
        }
    }

    #[test]
    fn lying_ip_headers_and_other_protocols_are_refused() {
        let h = |p: &[u8]| kernel_header(p, 0).to_bytes();
        let mut p = packet(false, true, 100);
        p[2] ^= 1; // total length off by one
        assert_eq!(build(&h(&p), &p), Err(VnetError::IpLength));
        let mut p = packet(true, false, 100);
        p[5] ^= 1;
        assert_eq!(build(&h(&p), &p), Err(VnetError::IpLength));
        let mut p = packet(false, true, 100);
        p[6] = 0x20; // more fragments
        assert_eq!(build(&h(&p), &p), Err(VnetError::NotTransport));
        let mut p = packet(false, true, 100);
        p[9] = 1; // ICMP
        assert_eq!(build(&kernel_header(&packet(false, true, 100), 0).to_bytes(), &p), Err(VnetError::NotTransport));
        let mut p = packet(false, true, 0);
        p[20 + 12] = 15 << 4; // TCP header longer than the packet
        assert_eq!(build(&h(&packet(false, true, 0)), &p), Err(VnetError::OutOfBounds));
        let mut p = packet(false, true, 10);
        p[20 + 12] = 4 << 4; // TCP header shorter than 20
        assert_eq!(build(&h(&packet(false, true, 10)), &p), Err(VnetError::OutOfBounds));
        let hdr = kernel_header(&packet(false, true, 10), 0).to_bytes();
        for len in 0..60 {
            let _ = build(&hdr, &packet(false, true, 10)[..len.min(62)]);
        }
    }

    proptest! {
        #[test]
        fn build_ethernet_never_panics(h in any::<[u8; HDR_LEN]>(), f in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = build_ethernet(&h, &f);
        }

        #[test]
        fn whatever_the_sender_claims_the_result_is_on_the_list(
            v6: bool, tcp: bool, payload in 0usize..9000, claimed: [u8; HDR_LEN], damage: Option<(usize, u8)>,
            near: bool, gso_size in 0u16..12000,
        ) {
            let mut p = packet(v6, tcp, payload);
            if let Some((at, byte)) = damage {
                let at = at % p.len();
                p[at] = byte;
            }
            // Half the time a header near what a kernel writes, so the interesting checks run.
            let h = if near { VnetHdr { flags: claimed[0] & 3, gso_type: claimed[1] & 0x87, gso_size, ..kernel_header(&packet(v6, tcp, payload), 1) }.to_bytes() } else { claimed };
            if let Ok(out) = build(&h, &p) {
                prop_assert!(allowed(&out, &p), "{:?} for {:?}", VnetHdr::parse(&out), VnetHdr::parse(&h));
            }
        }
    }

    /// RFC 1071 sum of the IPv4 pseudo-header and the UDP datagram.
    fn udp4_checksum_ok(p: &[u8]) -> bool {
        let udp = &p[20..];
        let mut sum: u32 = 0;
        let mut add = |b: &[u8]| {
            for c in b.chunks(2) {
                sum += u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]));
            }
        };
        add(&p[12..20]);
        add(&[0, 17]);
        add(&(udp.len() as u16).to_be_bytes());
        add(udp);
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum == 0xffff
    }

    #[test]
    fn partial_checksum_is_completed() {
        // IPv4 UDP 198.18.0.1:1000 -> 198.18.0.2:2000, 5 payload bytes, checksum field
        // holding the folded pseudo-header sum as the kernel leaves it.
        let mut p = vec![0x45, 0, 0, 33, 0, 0, 0, 0, 64, 17, 0, 0, 198, 18, 0, 1, 198, 18, 0, 2];
        p.extend_from_slice(&[0x03, 0xe8, 0x07, 0xd0, 0, 13, 0, 0, b'h', b'e', b'l', b'l', b'o']);
        let mut pseudo: u32 = 0;
        for w in [0xc612u32, 0x0001, 0xc612, 0x0002, 17, 13] {
            pseudo += w;
        }
        while pseudo > 0xffff {
            pseudo = (pseudo & 0xffff) + (pseudo >> 16);
        }
        p[26..28].copy_from_slice(&(pseudo as u16).to_be_bytes());
        let h = VnetHdr { flags: F_NEEDS_CSUM, gso_type: GSO_NONE, hdr_len: 0, gso_size: 0, csum_start: 20, csum_offset: 6 };
        assert!(!udp4_checksum_ok(&p));
        let built = build(&h.to_bytes(), &p).unwrap();
        complete_checksum(&built, &mut p).unwrap();
        assert!(udp4_checksum_ok(&p), "{p:?}");
        // Nothing to do without the flag; out-of-bounds offsets are refused.
        let before = p.clone();
        complete_checksum(&PLAIN, &mut p).unwrap();
        assert_eq!(p, before);
        let bad = VnetHdr { csum_offset: 60_000, ..h };
        assert_eq!(complete_checksum(&bad.to_bytes(), &mut p), Err(VnetError::OutOfBounds));
    }
}
