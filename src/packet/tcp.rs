//! The TCP header (RFC 9293; ECE and CWR, RFC 3168) as a view over a byte buffer: the
//! fixed 20 bytes checked once, the data offset checked on demand, and the setters the
//! segmenter needs (sequence number, flags, checksum).
//!
//! Pure. Read per packet by the offload allow-list on the queue workers (hot path);
//! written by the segmenter (capture, emulation).

use super::{checksum, get_u16, get_u32, set_u16, set_u32, Error};

mod field {
    pub const SRC_PORT: usize = 0;
    pub const DST_PORT: usize = 2;
    pub const SEQ: usize = 4;
    pub const ACK: usize = 8;
    pub const DATA_OFF: usize = 12;
    pub const FLAGS: usize = 13;
    pub const WINDOW: usize = 14;
    pub const CHECKSUM: usize = 16;
    pub const URGENT: usize = 18;
}

/// Length of the header without options.
pub const HEADER_LEN: usize = 20;
/// Offset of the checksum field (a virtio header's `csum_offset` for TCP).
pub const CHECKSUM_OFFSET: usize = field::CHECKSUM;

/// The flag bits of the 14th byte.
pub mod flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
    pub const ECE: u8 = 0x40;
    pub const CWR: u8 = 0x80;
}

/// A TCP header at the start of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpPacket<T> {
    buffer: T,
}

impl<T: AsRef<[u8]>> TcpPacket<T> {
    /// A view of `buffer`: at least the fixed 20 bytes.
    #[inline]
    pub fn new_checked(buffer: T) -> Result<TcpPacket<T>, Error> {
        if buffer.as_ref().len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        Ok(TcpPacket { buffer })
    }

    /// Whether the data offset is at least 5 words and fits the buffer.
    #[inline]
    pub fn check_len(&self) -> Result<(), Error> {
        if (HEADER_LEN..=self.as_bytes().len()).contains(&self.header_len()) {
            Ok(())
        } else {
            Err(Error::Length)
        }
    }

    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    #[inline]
    pub fn into_inner(self) -> T {
        self.buffer
    }

    #[inline]
    pub fn src_port(&self) -> u16 {
        get_u16(self.as_bytes(), field::SRC_PORT)
    }

    #[inline]
    pub fn dst_port(&self) -> u16 {
        get_u16(self.as_bytes(), field::DST_PORT)
    }

    #[inline]
    pub fn seq_number(&self) -> u32 {
        get_u32(self.as_bytes(), field::SEQ)
    }

    #[inline]
    pub fn ack_number(&self) -> u32 {
        get_u32(self.as_bytes(), field::ACK)
    }

    /// The header length the data offset gives, in bytes (0 to 60; below 20 is
    /// malformed).
    #[inline]
    pub fn header_len(&self) -> usize {
        usize::from(self.as_bytes()[field::DATA_OFF] >> 4) * 4
    }

    /// The flag bits ([`flags`]).
    #[inline]
    pub fn flags(&self) -> u8 {
        self.as_bytes()[field::FLAGS]
    }

    #[inline]
    pub fn window(&self) -> u16 {
        get_u16(self.as_bytes(), field::WINDOW)
    }

    #[inline]
    pub fn checksum(&self) -> u16 {
        get_u16(self.as_bytes(), field::CHECKSUM)
    }

    #[inline]
    pub fn urgent(&self) -> u16 {
        get_u16(self.as_bytes(), field::URGENT)
    }

    /// The options, when the data offset is valid and fits the buffer.
    #[inline]
    pub fn options(&self) -> Option<&[u8]> {
        self.check_len().ok()?;
        self.as_bytes().get(HEADER_LEN..self.header_len())
    }

    /// The payload (after the data offset's header), when the data offset is valid and
    /// fits the buffer.
    #[inline]
    pub fn payload(&self) -> Option<&[u8]> {
        self.check_len().ok()?;
        self.as_bytes().get(self.header_len()..)
    }

    /// Whether the checksum verifies over the whole buffer behind `pseudo` (the IP
    /// packet's pseudo-header for this segment).
    #[inline]
    pub fn verify_checksum(&self, pseudo: checksum::Sum) -> bool {
        pseudo.add_bytes(self.as_bytes()).fold() == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> TcpPacket<T> {
    #[inline]
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.buffer.as_mut()
    }

    #[inline]
    pub fn set_src_port(&mut self, port: u16) {
        set_u16(self.bytes_mut(), field::SRC_PORT, port);
    }

    #[inline]
    pub fn set_dst_port(&mut self, port: u16) {
        set_u16(self.bytes_mut(), field::DST_PORT, port);
    }

    #[inline]
    pub fn set_seq_number(&mut self, seq: u32) {
        set_u32(self.bytes_mut(), field::SEQ, seq);
    }

    #[inline]
    pub fn set_ack_number(&mut self, ack: u32) {
        set_u32(self.bytes_mut(), field::ACK, ack);
    }

    #[inline]
    pub fn set_flags(&mut self, flags: u8) {
        self.bytes_mut()[field::FLAGS] = flags;
    }

    #[inline]
    pub fn set_window(&mut self, window: u16) {
        set_u16(self.bytes_mut(), field::WINDOW, window);
    }

    #[inline]
    pub fn set_checksum(&mut self, check: u16) {
        set_u16(self.bytes_mut(), field::CHECKSUM, check);
    }

    /// Computes the checksum afresh over the whole buffer behind `pseudo`.
    #[inline]
    pub fn fill_checksum(&mut self, pseudo: checksum::Sum) {
        self.set_checksum(0);
        let c = pseudo.add_bytes(self.as_bytes()).checksum();
        self.set_checksum(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    #[test]
    fn fields_and_checks() {
        let mut t = [0u8; 32];
        t[0..4].copy_from_slice(&[0x9c, 0x40, 0x00, 0x50]);
        t[4..8].copy_from_slice(&7u32.to_be_bytes());
        t[8..12].copy_from_slice(&9u32.to_be_bytes());
        t[12] = 6 << 4;
        t[13] = flags::SYN | flags::ECE | flags::CWR;
        t[14..16].copy_from_slice(&64240u16.to_be_bytes());
        let v = TcpPacket::new_checked(&t[..]).unwrap();
        assert_eq!((v.src_port(), v.dst_port(), v.seq_number(), v.ack_number()), (40000, 80, 7, 9));
        assert_eq!((v.header_len(), v.flags(), v.window(), v.urgent()), (24, 0xc2, 64240, 0));
        assert_eq!(v.options().map(<[u8]>::len), Some(4));
        assert_eq!(v.payload().map(<[u8]>::len), Some(8));
        assert_eq!(TcpPacket::new_checked(&t[..19]), Err(Error::Truncated));
        assert_eq!(TcpPacket::new_checked(&t[..23]).unwrap().check_len(), Err(Error::Length));
        t[12] = 4 << 4;
        let v = TcpPacket::new_checked(&t[..]).unwrap();
        assert_eq!((v.check_len(), v.payload(), v.options()), (Err(Error::Length), None, None));
    }

    proptest! {
        #[test]
        fn prop_any_bytes_never_panic(t in proptest::collection::vec(any::<u8>(), 0..80)) {
            if let Ok(v) = TcpPacket::new_checked(&t[..]) {
                let _ = (v.src_port(), v.dst_port(), v.seq_number(), v.ack_number(), v.header_len(), v.flags());
                let _ = (v.window(), v.checksum(), v.urgent(), v.options(), v.payload(), v.check_len());
                let _ = v.verify_checksum(checksum::Sum::new());
            } else {
                prop_assert!(t.len() < 20);
            }
        }

        #[test]
        fn prop_setters_round_trip(
            mut t in proptest::collection::vec(any::<u8>(), 20..100),
            sp: u16, dp: u16, seq: u32, ack: u32, fl: u8, win: u16, src: u32, dst: u32,
        ) {
            let mut v = TcpPacket::new_checked(&mut t[..]).unwrap();
            v.set_src_port(sp);
            v.set_dst_port(dp);
            v.set_seq_number(seq);
            v.set_ack_number(ack);
            v.set_flags(fl);
            v.set_window(win);
            prop_assert_eq!((v.src_port(), v.dst_port(), v.seq_number(), v.ack_number(), v.flags(), v.window()), (sp, dp, seq, ack, fl, win));
            let len = v.as_bytes().len() as u16;
            let pseudo = checksum::pseudo_v4(Ipv4Addr::from(src), Ipv4Addr::from(dst), 6, len);
            v.fill_checksum(pseudo);
            prop_assert!(v.verify_checksum(pseudo));
        }
    }
}
