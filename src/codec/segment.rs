//! A super-packet (TSO/USO, as a TUN with offloads reads it) cut into the wire-sized packets
//! it stands for, with their checksums completed: what a capture writes and what the link
//! emulation draws for, one packet at a time. Pure: bytes in, packets out through a
//! callback, one reused buffer (no allocation once it has grown).
//!
//! From the packet's `virtio_net_hdr` ([`VnetHdr`]):
//! - no header, or no offload asked for: the packet as it is;
//! - `NEEDS_CSUM` only: the packet with its transport checksum completed
//!   ([`vnet::complete_checksum`]: the field holds the pseudo-header's sum, the rest is
//!   summed from `csum_start`);
//! - `TCPV4`/`TCPV6`: the payload cut into `gso_size` pieces, each behind a copy of the
//!   headers with its own IP length, IPv4 identification (+1 each) and header checksum,
//!   TCP sequence number, flags (CWR on the first only, FIN and PSH on the last only) and
//!   full TCP checksum, as the kernel's GSO does;
//! - `UDP_L4`: the payload cut likewise, each with its UDP length and checksum;
//! - UFO, unknown types, or a packet that is not TCP/UDP over IPv4/IPv6: as it is.
//!
//! An Ethernet frame (a TAP with offloads: [`Segmenter::frame_segments`]) is cut the same
//! way: its IP packet after the Ethernet header and tags, the offsets moved past that
//! header, each piece behind a copy of it.
//!
//! Headers are read and written through the checked views of [`crate::packet`], checksums
//! computed by its one implementation. A header that does not match its packet (lengths, a
//! transport header past the end) is an error and gives nothing; nothing here panics on
//! any input.

use super::vnet::{self, VnetHdr, F_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4};
use crate::packet::ethernet::EthernetFrame;
use crate::packet::ip::protocol::{TCP, UDP};
use crate::packet::tcp::flags;
use crate::packet::{ipv6, udp, Error as PacketError, IpPacket, Ipv4Packet, Ipv6Packet, TcpPacket, UdpPacket};

/// Length of the `virtio_net_hdr` before each packet.
pub const VNET_HDR_LEN: usize = vnet::HDR_LEN;

/// Why a packet cannot be cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SegmentError {
    #[error("not an IPv4 or IPv6 packet")]
    NotIp,
    #[error("the IP header does not match the packet's length")]
    IpLength,
    #[error("the transport header runs past the end of the packet")]
    Truncated,
    #[error("the header asks for GSO with a segment size of 0")]
    ZeroGsoSize,
    #[error("the GSO type does not match the packet's protocol")]
    WrongProtocol,
    #[error("the frame is shorter than its Ethernet header")]
    NotEthernet,
}

/// The IP layer of a packet: where the transport starts, and its protocol.
#[derive(Clone, Copy, Debug)]
struct Ip {
    v6: bool,
    l4: usize,
    proto: u8,
}

/// The IP layer of an exact packet (its length fields agree with its length).
fn ip_of(packet: &[u8]) -> Result<Ip, SegmentError> {
    match IpPacket::new_checked(packet) {
        Ok(IpPacket::V4(p)) => {
            p.check_len().map_err(|_| SegmentError::IpLength)?;
            Ok(Ip { v6: false, l4: p.header_len(), proto: p.protocol() })
        }
        Ok(IpPacket::V6(p)) => {
            p.check_len().map_err(|_| SegmentError::IpLength)?;
            Ok(Ip { v6: true, l4: ipv6::HEADER_LEN, proto: p.next_header() })
        }
        Err(PacketError::Truncated) if !packet.is_empty() => Err(SegmentError::IpLength),
        Err(_) => Err(SegmentError::NotIp),
    }
}

/// Sets the IP lengths (and the IPv4 identification and header checksum) of the packet in
/// `buf`, whose headers were copied from a checked packet.
fn set_ip_lengths(buf: &mut [u8], ip: Ip, id: Option<u16>) {
    let len = buf.len();
    if ip.v6 {
        if let Ok(mut p) = Ipv6Packet::new_checked(buf) {
            p.set_payload_len((len - ipv6::HEADER_LEN) as u16);
        }
    } else if let Ok(mut p) = Ipv4Packet::new_checked(buf) {
        p.set_total_len(len as u16);
        if let Some(id) = id {
            p.set_ident(id);
        }
        p.fill_checksum();
    }
}

/// Cuts super-packets; keeps two buffers (a piece, and a frame around it).
#[derive(Debug, Default)]
pub struct Segmenter {
    buf: Vec<u8>,
    frame: Vec<u8>,
}

impl Segmenter {
    pub fn new() -> Segmenter {
        Segmenter::default()
    }

    /// Gives `out` each wire-sized Ethernet frame that `frame` (behind `vnet`, whose offsets
    /// count from the frame's first byte) stands for; returns how many. The IP packet after
    /// the Ethernet header and its tags is cut as [`segments`](Self::segments) cuts a
    /// packet, and each piece goes out behind a copy of that header.
    pub fn frame_segments(&mut self, vnet: Option<&[u8; VNET_HDR_LEN]>, frame: &[u8], mut out: impl FnMut(&[u8])) -> Result<usize, SegmentError> {
        let l2 = EthernetFrame::new_checked(frame).map_err(|_| SegmentError::NotEthernet)?.header_len();
        let shifted = vnet.map(|v| {
            let mut h = VnetHdr::parse(v);
            // invariant: l2 <= 22 (two tags)
            h.csum_start = h.csum_start.saturating_sub(l2 as u16);
            h.hdr_len = h.hdr_len.saturating_sub(l2 as u16);
            h.to_bytes()
        });
        let (head, body) = frame.split_at(l2);
        let mut piece = std::mem::take(&mut self.frame);
        let cut = self.segments(shifted.as_ref(), body, |p| {
            piece.clear();
            piece.extend_from_slice(head);
            piece.extend_from_slice(p);
            out(&piece);
        });
        self.frame = piece;
        cut
    }

    /// Gives `out` each wire-sized packet that `packet` (behind `vnet`) stands for; returns
    /// how many.
    pub fn segments(&mut self, vnet: Option<&[u8; VNET_HDR_LEN]>, packet: &[u8], mut out: impl FnMut(&[u8])) -> Result<usize, SegmentError> {
        let Some(v) = vnet else {
            out(packet);
            return Ok(1);
        };
        let h = VnetHdr::parse(v);
        let gso = h.gso_type & !GSO_ECN;
        match gso {
            GSO_NONE if h.flags & F_NEEDS_CSUM == 0 => {
                out(packet);
                Ok(1)
            }
            GSO_NONE => {
                self.buf.clear();
                self.buf.extend_from_slice(packet);
                // Offsets outside the packet: written as it is.
                let _ = vnet::complete_checksum(v, &mut self.buf);
                out(&self.buf);
                Ok(1)
            }
            GSO_TCPV4 | GSO_TCPV6 | GSO_UDP_L4 => {
                let ip = ip_of(packet)?;
                let want = if gso == GSO_UDP_L4 { UDP } else { TCP };
                if ip.proto != want || (gso == GSO_TCPV6) != ip.v6 && gso != GSO_UDP_L4 {
                    return Err(SegmentError::WrongProtocol);
                }
                if h.gso_size == 0 {
                    return Err(SegmentError::ZeroGsoSize);
                }
                // invariant: ip_of proved l4 <= packet.len()
                let l4 = packet.get(ip.l4..).unwrap_or_default();
                let l4_len = if want == TCP {
                    let t = TcpPacket::new_checked(l4).map_err(|_| SegmentError::Truncated)?;
                    t.check_len().map_err(|_| SegmentError::Truncated)?;
                    t.header_len()
                } else {
                    UdpPacket::new_checked(l4).map_err(|_| SegmentError::Truncated)?;
                    udp::HEADER_LEN
                };
                Ok(self.cut(packet, ip, ip.l4 + l4_len, usize::from(h.gso_size), &mut out))
            }
            _ => {
                out(packet);
                Ok(1)
            }
        }
    }

    /// The cut proper: `headers` bytes of IP and transport header (checked by the caller),
    /// then the payload.
    fn cut(&mut self, packet: &[u8], ip: Ip, headers: usize, gso_size: usize, out: &mut impl FnMut(&[u8])) -> usize {
        let payload = packet.get(headers..).unwrap_or_default();
        let pieces = payload.len().div_ceil(gso_size).max(1);
        let id0 = Ipv4Packet::new_checked(packet).map_or(0, |p| p.ident());
        let seq0 = packet.get(ip.l4..).and_then(|t| TcpPacket::new_checked(t).ok()).map_or(0, |t| t.seq_number());
        for i in 0..pieces {
            let from = (i * gso_size).min(payload.len());
            let piece = &payload[from..(from + gso_size).min(payload.len())];
            self.buf.clear();
            self.buf.extend_from_slice(&packet[..headers]);
            self.buf.extend_from_slice(piece);
            let id = (!ip.v6).then(|| id0.wrapping_add(i as u16));
            set_ip_lengths(&mut self.buf, ip, id);
            let l4_len = (self.buf.len() - ip.l4) as u16;
            let Ok(pseudo) = IpPacket::new_checked(&self.buf[..]).map(|p| p.pseudo_header(ip.proto, l4_len)) else {
                continue;
            };
            let l4 = &mut self.buf[ip.l4..];
            if ip.proto == TCP {
                if let Ok(mut t) = TcpPacket::new_checked(l4) {
                    t.set_seq_number(seq0.wrapping_add(from as u32));
                    let mut f = t.flags();
                    if i + 1 < pieces {
                        f &= !(flags::FIN | flags::PSH);
                    }
                    if i > 0 {
                        f &= !flags::CWR;
                    }
                    t.set_flags(f);
                    t.fill_checksum(pseudo);
                }
            } else if let Ok(mut u) = UdpPacket::new_checked(l4) {
                u.set_len(l4_len);
                u.fill_checksum(pseudo);
            }
            out(&self.buf);
        }
        pieces
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::checksum::checksum as internet_checksum;
    use crate::packet::tcp::flags::{CWR as TCP_CWR, FIN as TCP_FIN, PSH as TCP_PSH};

    /// Whether the TCP or UDP checksum of a plain IPv4/IPv6 packet verifies.
    fn transport_checksum_ok(packet: &[u8]) -> bool {
        let Ok(ip) = ip_of(packet) else { return false };
        let l4 = &packet[ip.l4..];
        let Ok(pseudo) = IpPacket::new_checked(packet).map(|p| p.pseudo_header(ip.proto, l4.len() as u16)) else {
            return false;
        };
        match ip.proto {
            TCP => TcpPacket::new_checked(l4).is_ok_and(|t| t.verify_checksum(pseudo)),
            UDP => UdpPacket::new_checked(l4).is_ok_and(|u| u.checksum() != 0 && u.verify_checksum(pseudo)),
            _ => false,
        }
    }

    /// A TCP or UDP super-packet as the kernel hands it: the transport checksum field holds
    /// the pseudo-header sum of the whole thing, lengths are those of the whole thing.
    fn super_packet(v6: bool, proto: u8, payload: usize, gso_size: u16) -> ([u8; VNET_HDR_LEN], Vec<u8>) {
        let l4_len = if proto == TCP { 32 } else { 8 };
        let mut p = if v6 {
            let mut h = vec![0x60, 0, 0, 0, 0, 0, proto, 64];
            h.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            h.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
            h
        } else {
            vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, proto, 0, 0, 198, 18, 0, 1, 198, 18, 0, 2]
        };
        let ip_len = p.len();
        let mut l4 = vec![0u8; l4_len];
        l4[0..4].copy_from_slice(&[0x1f, 0x90, 0x13, 0x89]);
        if proto == TCP {
            l4[4..8].copy_from_slice(&0xffff_f000u32.to_be_bytes()); // wraps during the cut
            l4[12] = ((l4_len / 4) as u8) << 4;
            l4[13] = TCP_FIN | TCP_PSH | TCP_CWR | 0x10;
        }
        p.extend_from_slice(&l4);
        p.extend((0..payload).map(|i| (i * 7 % 251) as u8));
        let total = p.len();
        if v6 {
            p[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
        } else {
            p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            let c = internet_checksum(&p[..20]);
            p[10..12].copy_from_slice(&c.to_be_bytes());
        }
        let ip = ip_of(&p).unwrap();
        let field = if proto == TCP { 16 } else { 6 };
        if proto == UDP {
            let l = (total - ip_len) as u16;
            p[ip_len + 4..ip_len + 6].copy_from_slice(&l.to_be_bytes());
        }
        let partial = IpPacket::new_checked(&p[..]).unwrap().pseudo_header(ip.proto, (total - ip_len) as u16).fold();
        p[ip_len + field..ip_len + field + 2].copy_from_slice(&partial.to_be_bytes());
        let gso = match (proto, v6) {
            (UDP, _) => GSO_UDP_L4,
            (_, false) => GSO_TCPV4,
            (_, true) => GSO_TCPV6,
        };
        let mut v = [0u8; VNET_HDR_LEN];
        v[0] = F_NEEDS_CSUM;
        v[1] = gso;
        v[2..4].copy_from_slice(&((ip_len + l4_len) as u16).to_le_bytes());
        v[4..6].copy_from_slice(&gso_size.to_le_bytes());
        v[6..8].copy_from_slice(&(ip_len as u16).to_le_bytes());
        v[8..10].copy_from_slice(&(field as u16).to_le_bytes());
        (v, p)
    }

    fn cut(v: &[u8; VNET_HDR_LEN], p: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let n = Segmenter::new().segments(Some(v), p, |s| out.push(s.to_vec())).unwrap();
        assert_eq!(n, out.len());
        out
    }

    #[test]
    fn tcp_super_packets_become_checked_segments_in_order() {
        for v6 in [false, true] {
            let (v, p) = super_packet(v6, TCP, 10_000, 1448);
            let segs = cut(&v, &p);
            assert_eq!(segs.len(), 7);
            let headers = if v6 { 72 } else { 52 };
            let mut payload = Vec::new();
            for (i, s) in segs.iter().enumerate() {
                assert!(transport_checksum_ok(s), "segment {i} (v6 {v6}) checksum");
                assert!(ip_of(s).is_ok(), "segment {i} IP length");
                if !v6 {
                    assert_eq!(internet_checksum(&s[..20]), 0, "IPv4 header checksum");
                    assert_eq!(u16::from_be_bytes([s[4], s[5]]), 0x1234 + i as u16);
                }
                let t = if v6 { 40 } else { 20 };
                let seq = u32::from_be_bytes(s[t + 4..t + 8].try_into().unwrap());
                assert_eq!(seq, 0xffff_f000u32.wrapping_add(1448 * i as u32));
                let flags = s[t + 13];
                assert_eq!(flags & TCP_CWR != 0, i == 0);
                assert_eq!(flags & (TCP_FIN | TCP_PSH) != 0, i == 6);
                assert!(s.len() <= headers + 1448);
                payload.extend_from_slice(&s[headers..]);
            }
            assert_eq!(payload, p[headers..]);
        }
    }

    #[test]
    fn udp_super_packets_become_datagrams() {
        for v6 in [false, true] {
            let (v, p) = super_packet(v6, UDP, 5000, 1200);
            let segs = cut(&v, &p);
            assert_eq!(segs.len(), 5);
            let l4 = if v6 { 40 } else { 20 };
            let mut payload = Vec::new();
            for s in &segs {
                assert!(transport_checksum_ok(s));
                assert_eq!(usize::from(u16::from_be_bytes([s[l4 + 4], s[l4 + 5]])), s.len() - l4);
                payload.extend_from_slice(&s[l4 + 8..]);
            }
            assert_eq!(payload, p[l4 + 8..]);
        }
    }

    #[test]
    fn many_sizes_reassemble() {
        for gso in (48..=2000).step_by(97) {
            for payload in [1, 47, 48, 1000, 4097, 30_000] {
                let (v, p) = super_packet(false, TCP, payload, gso as u16);
                let segs = cut(&v, &p);
                assert_eq!(segs.len(), payload.div_ceil(gso));
                let joined: Vec<u8> = segs.iter().flat_map(|s| s[52..].to_vec()).collect();
                assert_eq!(joined, p[52..], "gso {gso} payload {payload}");
                assert!(segs.iter().all(|s| transport_checksum_ok(s)));
            }
        }
    }

    #[test]
    fn checksum_only_is_completed_and_plain_is_untouched() {
        let (mut v, p) = super_packet(false, UDP, 100, 1200);
        v[1] = GSO_NONE;
        let segs = cut(&v, &p);
        assert_eq!(segs.len(), 1);
        assert!(transport_checksum_ok(&segs[0]));
        let mut out = Vec::new();
        assert_eq!(Segmenter::new().segments(None, &p, |s| out.push(s.to_vec())), Ok(1));
        assert_eq!(out, vec![p.clone()]);
        let plain = [0u8; VNET_HDR_LEN];
        assert_eq!(cut(&plain, &p), vec![p.clone()]);
        let mut ufo = v;
        ufo[1] = 3;
        assert_eq!(cut(&ufo, &p), vec![p]);
    }

    #[test]
    fn malformed_input_is_refused_at_every_cut_and_never_panics() {
        let (v, p) = super_packet(true, TCP, 3000, 1000);
        for n in 0..p.len() {
            let mut called = false;
            let r = Segmenter::new().segments(Some(&v), &p[..n], |_| called = true);
            assert!(r.is_err() && !called, "a packet cut at {n} must be refused");
        }
        let (mut v, p) = super_packet(false, TCP, 3000, 1000);
        v[4..6].fill(0);
        assert_eq!(Segmenter::new().segments(Some(&v), &p, |_| {}), Err(SegmentError::ZeroGsoSize));
        v[1] = GSO_TCPV6;
        assert_eq!(Segmenter::new().segments(Some(&v), &p, |_| {}), Err(SegmentError::WrongProtocol));
        let mut junk = [0xffu8; VNET_HDR_LEN];
        for b in 0..=255u8 {
            junk[1] = b;
            let _ = Segmenter::new().segments(Some(&junk), &[0x45, 0, 0, 3], |_| {});
            let _ = Segmenter::new().segments(Some(&junk), &[], |_| {});
        }
    }

    /// A super-packet behind an Ethernet header with `tags` 802.1Q tags, offsets counted
    /// from the frame's first byte (as a TAP with offloads reads it).
    fn super_frame(v6: bool, tags: usize, payload: usize, gso_size: u16) -> ([u8; VNET_HDR_LEN], Vec<u8>) {
        let (v, p) = super_packet(v6, TCP, payload, gso_size);
        let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
        for t in 0..tags {
            f.extend_from_slice(&[0x81, 0x00, 0, 10 + t as u8]);
        }
        f.extend_from_slice(&if v6 { [0x86, 0xdd] } else { [0x08, 0x00] });
        let l2 = f.len() as u16;
        f.extend_from_slice(&p);
        let mut h = VnetHdr::parse(&v);
        h.csum_start += l2;
        h.hdr_len += l2;
        (h.to_bytes(), f)
    }

    #[test]
    fn super_frames_are_cut_behind_copies_of_their_ethernet_header() {
        for (v6, tags) in [(false, 0), (true, 0), (false, 1), (true, 2)] {
            let (v, f) = super_frame(v6, tags, 5000, 1448);
            let l2 = 14 + 4 * tags;
            let (_, p) = super_packet(v6, TCP, 5000, 1448);
            let (pv, _) = super_packet(v6, TCP, 5000, 1448);
            let mut frames = Vec::new();
            let n = Segmenter::new().frame_segments(Some(&v), &f, |s| frames.push(s.to_vec())).unwrap();
            assert_eq!(n, 4);
            // The same pieces as the bare packet gives, each behind the frame's header.
            let packets = cut(&pv, &p);
            assert_eq!(frames.len(), packets.len());
            for (frame, packet) in frames.iter().zip(&packets) {
                assert_eq!(&frame[..l2], &f[..l2], "v6 {v6} tags {tags}: the header is repeated");
                assert_eq!(&frame[l2..], &packet[..]);
            }
        }
        // Plain and header-less frames go through whole.
        let (_, f) = super_frame(false, 1, 100, 1448);
        let mut out = Vec::new();
        assert_eq!(Segmenter::new().frame_segments(None, &f, |s| out.push(s.to_vec())), Ok(1));
        assert_eq!(out, vec![f.clone()]);
        // Shorter than a header: refused, nothing given; cut anywhere else: refused or whole.
        let (v, f) = super_frame(true, 2, 3000, 1000);
        for n in 0..f.len() {
            let mut got = 0;
            let r = Segmenter::new().frame_segments(Some(&v), &f[..n], |_| got += 1);
            assert!(r.is_err() && got == 0, "a frame cut at {n} must be refused");
        }
    }
}
