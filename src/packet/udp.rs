//! The UDP header (RFC 768) as a view over a byte buffer: eight bytes checked once, and
//! the setters the segmenter needs (length, checksum; a computed 0 is sent as `0xffff`,
//! since 0 means "no checksum").
//!
//! Pure. Read per packet by the offload allow-list on the queue workers (hot path);
//! written by the segmenter (capture, emulation).

use super::{checksum, get_u16, set_u16, Error};

mod field {
    pub const SRC_PORT: usize = 0;
    pub const DST_PORT: usize = 2;
    pub const LENGTH: usize = 4;
    pub const CHECKSUM: usize = 6;
}

/// Length of the header.
pub const HEADER_LEN: usize = 8;
/// Offset of the checksum field (a virtio header's `csum_offset` for UDP).
pub const CHECKSUM_OFFSET: usize = field::CHECKSUM;

/// A UDP header at the start of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpPacket<T> {
    buffer: T,
}

impl<T: AsRef<[u8]>> UdpPacket<T> {
    /// A view of `buffer`: at least the eight bytes of the header.
    #[inline]
    pub fn new_checked(buffer: T) -> Result<UdpPacket<T>, Error> {
        if buffer.as_ref().len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        Ok(UdpPacket { buffer })
    }

    /// Whether the length field equals the buffer's length.
    #[inline]
    pub fn check_len(&self) -> Result<(), Error> {
        if usize::from(self.len()) == self.as_bytes().len() {
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

    /// The length field (header and payload).
    #[inline]
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u16 {
        get_u16(self.as_bytes(), field::LENGTH)
    }

    #[inline]
    pub fn checksum(&self) -> u16 {
        get_u16(self.as_bytes(), field::CHECKSUM)
    }

    /// The bytes after the header, to the end of the buffer.
    #[inline]
    pub fn payload(&self) -> &[u8] {
        self.as_bytes().get(HEADER_LEN..).unwrap_or_default()
    }

    /// Whether the checksum verifies over the whole buffer behind `pseudo` (0, no checksum
    /// over IPv4, counts as verified).
    #[inline]
    pub fn verify_checksum(&self, pseudo: checksum::Sum) -> bool {
        self.checksum() == 0 || pseudo.add_bytes(self.as_bytes()).fold() == 0xffff
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> UdpPacket<T> {
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
    pub fn set_len(&mut self, len: u16) {
        set_u16(self.bytes_mut(), field::LENGTH, len);
    }

    #[inline]
    pub fn set_checksum(&mut self, check: u16) {
        set_u16(self.bytes_mut(), field::CHECKSUM, check);
    }

    /// Computes the checksum afresh over the whole buffer behind `pseudo`; a computed 0 is
    /// written as `0xffff`.
    #[inline]
    pub fn fill_checksum(&mut self, pseudo: checksum::Sum) {
        self.set_checksum(0);
        let c = pseudo.add_bytes(self.as_bytes()).checksum();
        self.set_checksum(if c == 0 { 0xffff } else { c });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::Ipv6Addr;

    #[test]
    fn fields_and_checks() {
        let u = [0x03, 0xe8, 0x07, 0xd0, 0, 13, 0xab, 0xcd, b'h', b'e', b'l', b'l', b'o'];
        let v = UdpPacket::new_checked(&u[..]).unwrap();
        assert_eq!((v.src_port(), v.dst_port(), v.len(), v.checksum()), (1000, 2000, 13, 0xabcd));
        assert_eq!(v.payload(), b"hello");
        assert_eq!(v.check_len(), Ok(()));
        assert_eq!(UdpPacket::new_checked(&u[..12]).unwrap().check_len(), Err(Error::Length));
        assert_eq!(UdpPacket::new_checked(&u[..7]), Err(Error::Truncated));
    }

    proptest! {
        #[test]
        fn prop_any_bytes_never_panic(u in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Ok(v) = UdpPacket::new_checked(&u[..]) {
                let _ = (v.src_port(), v.dst_port(), v.len(), v.checksum(), v.payload(), v.check_len());
                let _ = v.verify_checksum(checksum::Sum::new());
            } else {
                prop_assert!(u.len() < 8);
            }
        }

        #[test]
        fn prop_setters_round_trip(mut u in proptest::collection::vec(any::<u8>(), 8..100), sp: u16, dp: u16, src: u128, dst: u128) {
            let len = u.len() as u16;
            let mut v = UdpPacket::new_checked(&mut u[..]).unwrap();
            v.set_src_port(sp);
            v.set_dst_port(dp);
            v.set_len(len);
            prop_assert_eq!((v.src_port(), v.dst_port(), v.len(), v.check_len()), (sp, dp, len, Ok(())));
            let pseudo = checksum::pseudo_v6(Ipv6Addr::from(src), Ipv6Addr::from(dst), 17, u32::from(len));
            v.fill_checksum(pseudo);
            prop_assert!(v.checksum() != 0);
            prop_assert_eq!(pseudo.add_bytes(v.as_bytes()).fold(), 0xffff);
        }
    }
}
