//! A super-packet (TSO/USO, as a TUN with offloads reads it) cut into the wire-sized packets
//! it stands for, with their checksums completed: what a capture writes and what the link
//! emulation draws for, one packet at a time. Pure: bytes in, packets out through a
//! callback, one reused buffer (no allocation once it has grown).
//!
//! From the packet's `virtio_net_hdr` (`codec::vnet`):
//! - no header, or no offload asked for: the packet as it is;
//! - `NEEDS_CSUM` only: the packet with its transport checksum completed (the field holds
//!   the pseudo-header's sum, the rest is summed from `csum_start`);
//! - `TCPV4`/`TCPV6`: the payload cut into `gso_size` pieces, each behind a copy of the
//!   headers with its own IP length, IPv4 identification (+1 each) and header checksum,
//!   TCP sequence number, flags (CWR on the first only, FIN and PSH on the last only) and
//!   full TCP checksum, as the kernel's GSO does;
//! - `UDP_L4`: the payload cut likewise, each with its UDP length and checksum;
//! - UFO, unknown types, or a packet that is not TCP/UDP over IPv4/IPv6: as it is.
//!
//! A header that does not match its packet (lengths, a transport header past the end) is
//! an error and gives nothing; nothing here panics on any input.

/// Length of the `virtio_net_hdr` before each packet.
pub const VNET_HDR_LEN: usize = 10;

const F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_UDP_L4: u8 = 5;
const GSO_ECN: u8 = 0x80;

const TCP: u8 = 6;
const UDP: u8 = 17;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

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
}

/// The IP layer of a packet: where the transport starts, and its protocol.
#[derive(Clone, Copy, Debug)]
struct Ip {
    v6: bool,
    l4: usize,
    proto: u8,
}

fn ip_of(packet: &[u8]) -> Result<Ip, SegmentError> {
    match packet.first().map(|b| b >> 4) {
        Some(4) => {
            let l4 = usize::from(packet[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([*packet.get(2).ok_or(SegmentError::NotIp)?, *packet.get(3).ok_or(SegmentError::NotIp)?]));
            if l4 < 20 || packet.len() < l4 || total != packet.len() {
                return Err(SegmentError::IpLength);
            }
            Ok(Ip { v6: false, l4, proto: packet[9] })
        }
        Some(6) => {
            let payload = usize::from(u16::from_be_bytes([*packet.get(4).ok_or(SegmentError::NotIp)?, *packet.get(5).ok_or(SegmentError::NotIp)?]));
            if packet.len() < 40 || payload + 40 != packet.len() {
                return Err(SegmentError::IpLength);
            }
            Ok(Ip { v6: true, l4: 40, proto: packet[6] })
        }
        _ => Err(SegmentError::NotIp),
    }
}

/// The ones' complement sum of `data` (16-bit words, big-endian), added to `sum`, unfolded.
fn sum(mut acc: u64, data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The Internet checksum of `data` (the ones' complement of its ones' complement sum).
pub fn internet_checksum(data: &[u8]) -> u16 {
    !fold(sum(0, data))
}

/// The pseudo-header sum of a transport segment of `len` bytes of `ip`.
fn pseudo(packet: &[u8], ip: Ip, len: usize) -> u64 {
    let (src, dst) = if ip.v6 { (&packet[8..24], &packet[24..40]) } else { (&packet[12..16], &packet[16..20]) };
    sum(sum(u64::from(ip.proto) + len as u64, src), dst)
}

/// Whether the TCP or UDP checksum of a plain IPv4/IPv6 packet verifies.
pub fn transport_checksum_ok(packet: &[u8]) -> bool {
    let Ok(ip) = ip_of(packet) else { return false };
    let l4 = &packet[ip.l4..];
    if ip.proto != TCP && ip.proto != UDP {
        return false;
    }
    fold(sum(pseudo(packet, ip, l4.len()), l4)) == 0xffff
}

/// Writes the full transport checksum of the packet in `buf` at `field` (from `ip.l4`).
fn set_transport_checksum(buf: &mut [u8], ip: Ip, field: usize) {
    let at = ip.l4 + field;
    buf[at..at + 2].fill(0);
    let len = buf.len() - ip.l4;
    let mut c = !fold(sum(pseudo(buf, ip, len), &buf[ip.l4..]));
    if c == 0 && ip.proto == UDP {
        c = 0xffff; // 0 means "no checksum" in UDP
    }
    buf[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

/// Sets the IP lengths (and the IPv4 header checksum) of the packet in `buf`.
fn set_ip_lengths(buf: &mut [u8], ip: Ip, id: Option<u16>) {
    let len = buf.len();
    if ip.v6 {
        buf[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
    } else {
        buf[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        if let Some(id) = id {
            buf[4..6].copy_from_slice(&id.to_be_bytes());
        }
        buf[10..12].fill(0);
        let c = internet_checksum(&buf[..ip.l4]);
        buf[10..12].copy_from_slice(&c.to_be_bytes());
    }
}

/// Cuts super-packets; keeps one buffer.
#[derive(Debug, Default)]
pub struct Segmenter {
    buf: Vec<u8>,
}

impl Segmenter {
    pub fn new() -> Segmenter {
        Segmenter::default()
    }

    /// Gives `out` each wire-sized packet that `packet` (behind `vnet`) stands for; returns
    /// how many.
    pub fn segments(&mut self, vnet: Option<&[u8; VNET_HDR_LEN]>, packet: &[u8], mut out: impl FnMut(&[u8])) -> Result<usize, SegmentError> {
        let Some(v) = vnet else {
            out(packet);
            return Ok(1);
        };
        let (flags, gso) = (v[0], v[1] & !GSO_ECN);
        let gso_size = usize::from(u16::from_le_bytes([v[4], v[5]]));
        let (csum_start, csum_offset) = (usize::from(u16::from_le_bytes([v[6], v[7]])), usize::from(u16::from_le_bytes([v[8], v[9]])));
        match gso {
            GSO_NONE if flags & F_NEEDS_CSUM == 0 => {
                out(packet);
                Ok(1)
            }
            GSO_NONE => {
                self.complete(packet, csum_start, csum_offset);
                out(&self.buf);
                Ok(1)
            }
            GSO_TCPV4 | GSO_TCPV6 | GSO_UDP_L4 => {
                let ip = ip_of(packet)?;
                let want = if gso == GSO_UDP_L4 { UDP } else { TCP };
                if ip.proto != want || (gso == GSO_TCPV6) != ip.v6 && gso != GSO_UDP_L4 {
                    return Err(SegmentError::WrongProtocol);
                }
                if gso_size == 0 {
                    return Err(SegmentError::ZeroGsoSize);
                }
                let l4_len = if want == TCP { usize::from(packet.get(ip.l4 + 12).ok_or(SegmentError::Truncated)? >> 4) * 4 } else { 8 };
                let headers = ip.l4 + l4_len;
                if l4_len < if want == TCP { 20 } else { 8 } || headers > packet.len() {
                    return Err(SegmentError::Truncated);
                }
                Ok(self.cut(packet, ip, headers, gso_size, &mut out))
            }
            _ => {
                out(packet);
                Ok(1)
            }
        }
    }

    /// Completes a partial checksum into the buffer (as is when the offsets are outside).
    fn complete(&mut self, packet: &[u8], start: usize, offset: usize) {
        self.buf.clear();
        self.buf.extend_from_slice(packet);
        let at = start + offset;
        if start >= packet.len() || at + 2 > packet.len() {
            return;
        }
        let c = !fold(sum(0, &packet[start..]));
        self.buf[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }

    /// The cut proper: `headers` bytes of IP and transport header, then the payload.
    fn cut(&mut self, packet: &[u8], ip: Ip, headers: usize, gso_size: usize, out: &mut impl FnMut(&[u8])) -> usize {
        let payload = &packet[headers..];
        let pieces = payload.len().div_ceil(gso_size).max(1);
        let id0 = u16::from_be_bytes([packet[4], packet[5]]);
        let seq0 = u32::from_be_bytes([packet[ip.l4 + 4], packet[ip.l4 + 5], packet[ip.l4 + 6], packet[ip.l4 + 7]]);
        for i in 0..pieces {
            let from = (i * gso_size).min(payload.len());
            let piece = &payload[from..(from + gso_size).min(payload.len())];
            self.buf.clear();
            self.buf.extend_from_slice(&packet[..headers]);
            self.buf.extend_from_slice(piece);
            let id = (!ip.v6).then(|| id0.wrapping_add(i as u16));
            set_ip_lengths(&mut self.buf, ip, id);
            if ip.proto == TCP {
                let t = ip.l4;
                self.buf[t + 4..t + 8].copy_from_slice(&seq0.wrapping_add(from as u32).to_be_bytes());
                let mut flags = self.buf[t + 13];
                if i + 1 < pieces {
                    flags &= !(TCP_FIN | TCP_PSH);
                }
                if i > 0 {
                    flags &= !TCP_CWR;
                }
                self.buf[t + 13] = flags;
                set_transport_checksum(&mut self.buf, ip, 16);
            } else {
                let udp_len = (self.buf.len() - ip.l4) as u16;
                self.buf[ip.l4 + 4..ip.l4 + 6].copy_from_slice(&udp_len.to_be_bytes());
                set_transport_checksum(&mut self.buf, ip, 6);
            }
            out(&self.buf);
        }
        pieces
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let partial = fold(pseudo(&p, ip, total - ip_len));
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
}
