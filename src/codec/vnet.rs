//! The 10-byte `virtio_net_hdr` that precedes every packet on an `IFF_VNET_HDR` TUN.
//!
//! Pure: no syscalls. Called by the receiving half of each queue worker once per packet before the
//! TUN write, so it must not allocate. The header travels on the wire exactly as the sending
//! kernel produced it (little-endian fields, see `docs/wire-format.md`); before writing it
//! into our TUN we recompute `hdr_len`, which the kernel uses to size the linear part of the
//! skb and which is not trustworthy on forwarded packets.

/// Size of `struct virtio_net_hdr` (without `num_buffers`).
pub const HDR_LEN: usize = 10;
/// A header that asks for nothing: a plain, fully checksummed packet.
pub const PLAIN: [u8; HDR_LEN] = [0; HDR_LEN];

pub const F_NEEDS_CSUM: u8 = 1;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_UDP: u8 = 3;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_UDP_L4: u8 = 5;
pub const GSO_ECN: u8 = 0x80;

/// Why a header cannot be made consistent with its packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VnetError {
    #[error("checksum or transport header lies outside the packet")]
    OutOfBounds,
    #[error("unknown GSO type")]
    UnknownGso,
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
        VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
        }
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

    pub fn is_gso(&self) -> bool {
        self.gso_type & !GSO_ECN != GSO_NONE
    }
}

/// Returns the header to write with `packet`: `hdr_len` recomputed from the packet itself
/// (the IP and transport headers up to the payload for GSO packets; up to the checksum
/// field for checksum-only packets; 0 otherwise).
pub fn fix_for_write(hdr: &[u8; HDR_LEN], packet: &[u8]) -> Result<[u8; HDR_LEN], VnetError> {
    let mut h = VnetHdr::parse(hdr);
    let start = usize::from(h.csum_start);
    let needs_csum = h.flags & F_NEEDS_CSUM != 0;
    let hdr_len = if h.is_gso() {
        let l4_len = match h.gso_type & !GSO_ECN {
            GSO_TCPV4 | GSO_TCPV6 => {
                let doff = *packet.get(start + 12).ok_or(VnetError::OutOfBounds)?;
                usize::from(doff >> 4) * 4
            }
            GSO_UDP | GSO_UDP_L4 => 8,
            _ => return Err(VnetError::UnknownGso),
        };
        start + l4_len
    } else if needs_csum {
        start + usize::from(h.csum_offset) + 2
    } else {
        0
    };
    if hdr_len > packet.len() || (needs_csum && start + usize::from(h.csum_offset) + 2 > packet.len()) {
        return Err(VnetError::OutOfBounds);
    }
    h.hdr_len = u16::try_from(hdr_len).map_err(|_| VnetError::OutOfBounds)?;
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
    let mut sum: u32 = 0;
    for pair in packet[start..].chunks(2) {
        let word = u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]);
        sum = sum.wrapping_add(u32::from(word));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let mut check = !(sum as u16);
    if check == 0 && h.gso_type & !GSO_ECN != GSO_TCPV4 && h.gso_type & !GSO_ECN != GSO_TCPV6 {
        check = 0xffff; // UDP: 0 means "no checksum"; send its one's-complement twin
    }
    packet[field..field + 2].copy_from_slice(&check.to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp4_packet(len: usize, doff_words: u8) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[20 + 12] = doff_words << 4;
        p
    }

    #[test]
    fn plain_header_stays_plain() {
        assert_eq!(fix_for_write(&PLAIN, &[0x45; 40]).unwrap(), PLAIN);
    }

    #[test]
    fn tcp_gso_hdr_len_is_recomputed() {
        let h = VnetHdr { flags: F_NEEDS_CSUM, gso_type: GSO_TCPV4, hdr_len: 9999, gso_size: 1448, csum_start: 20, csum_offset: 16 };
        let p = tcp4_packet(3000, 8); // 32-byte TCP header (timestamps)
        let fixed = VnetHdr::parse(&fix_for_write(&h.to_bytes(), &p).unwrap());
        assert_eq!(fixed.hdr_len, 52);
        assert_eq!(fixed.gso_size, 1448);
    }

    #[test]
    fn udp_gso_and_checksum_only() {
        let h = VnetHdr { flags: F_NEEDS_CSUM, gso_type: GSO_UDP_L4, hdr_len: 0, gso_size: 1400, csum_start: 40, csum_offset: 6 };
        assert_eq!(VnetHdr::parse(&fix_for_write(&h.to_bytes(), &[0; 3000]).unwrap()).hdr_len, 48);
        let h = VnetHdr { flags: F_NEEDS_CSUM, gso_type: GSO_NONE, hdr_len: 0, gso_size: 0, csum_start: 20, csum_offset: 16 };
        assert_eq!(VnetHdr::parse(&fix_for_write(&h.to_bytes(), &[0; 100]).unwrap()).hdr_len, 38);
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
        complete_checksum(&h.to_bytes(), &mut p).unwrap();
        assert!(udp4_checksum_ok(&p), "{p:?}");
        // Nothing to do without the flag; out-of-bounds offsets are refused.
        let before = p.clone();
        complete_checksum(&PLAIN, &mut p).unwrap();
        assert_eq!(p, before);
        let bad = VnetHdr { csum_offset: 60_000, ..h };
        assert_eq!(complete_checksum(&bad.to_bytes(), &mut p), Err(VnetError::OutOfBounds));
    }

    #[test]
    fn lying_offsets_are_rejected_not_panicking() {
        let h = VnetHdr { flags: F_NEEDS_CSUM, gso_type: GSO_TCPV4, hdr_len: 0, gso_size: 1, csum_start: 65535, csum_offset: 65535 };
        assert_eq!(fix_for_write(&h.to_bytes(), &[0; 10]), Err(VnetError::OutOfBounds));
        let h = VnetHdr { gso_type: 77, ..h };
        assert_eq!(fix_for_write(&h.to_bytes(), &[0; 10]), Err(VnetError::UnknownGso));
        for b in 0..=255u8 {
            let _ = fix_for_write(&[b; HDR_LEN], &[b; 64]);
        }
    }
}
