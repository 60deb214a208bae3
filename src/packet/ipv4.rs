//! The IPv4 header (RFC 791; DSCP and ECN, RFC 2474 and RFC 3168) as a view over a byte
//! buffer: the fixed 20 bytes checked once, then the fields, the options and payload as far
//! as the IHL and the buffer allow, and setters that keep the header checksum right.
//!
//! Pure. Read for every packet on the queue workers (classification, flow hash, offload
//! allow-list: hot path); written by the segmenter and by ECN marking (RFC 1624 update).

use std::net::Ipv4Addr;

use super::{checksum, get_array, get_u16, set_u16, Ecn, Error};

mod field {
    pub const VER_IHL: usize = 0;
    pub const DSCP_ECN: usize = 1;
    pub const LENGTH: usize = 2;
    pub const IDENT: usize = 4;
    pub const FLG_OFF: usize = 6;
    pub const TTL: usize = 8;
    pub const PROTOCOL: usize = 9;
    pub const CHECKSUM: usize = 10;
    pub const SRC: usize = 12;
    pub const DST: usize = 16;
}

/// Length of the header without options.
pub const HEADER_LEN: usize = 20;

const DF: u16 = 0x4000;
const MF: u16 = 0x2000;
const OFFSET: u16 = 0x1fff;

/// An IPv4 header at the start of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Packet<T> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Ipv4Packet<T> {
    /// A view of `buffer`: version 4 and at least the fixed 20 bytes.
    #[inline]
    pub fn new_checked(buffer: T) -> Result<Ipv4Packet<T>, Error> {
        let b = buffer.as_ref();
        match b.first() {
            None => Err(Error::Truncated),
            Some(v) if v >> 4 != 4 => Err(Error::Version),
            Some(_) if b.len() < HEADER_LEN => Err(Error::Truncated),
            Some(_) => Ok(Ipv4Packet { buffer }),
        }
    }

    /// Whether the length fields agree with the buffer: an IHL of at least 5 words that
    /// fits the buffer, and a total length equal to the buffer's.
    #[inline]
    pub fn check_len(&self) -> Result<(), Error> {
        let len = self.as_bytes().len();
        let ihl = self.header_len();
        if ihl < HEADER_LEN || ihl > len || usize::from(self.total_len()) != len {
            return Err(Error::Length);
        }
        Ok(())
    }

    /// The whole buffer.
    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    #[inline]
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// The header length the IHL field gives, in bytes (0 to 60; below 20 is malformed).
    #[inline]
    pub fn header_len(&self) -> usize {
        usize::from(self.as_bytes()[field::VER_IHL] & 0x0f) * 4
    }

    /// The differentiated services codepoint (the six high bits of the second byte).
    #[inline]
    pub fn dscp(&self) -> u8 {
        self.as_bytes()[field::DSCP_ECN] >> 2
    }

    #[inline]
    pub fn ecn(&self) -> Ecn {
        Ecn::from_bits(self.as_bytes()[field::DSCP_ECN])
    }

    #[inline]
    pub fn total_len(&self) -> u16 {
        get_u16(self.as_bytes(), field::LENGTH)
    }

    #[inline]
    pub fn ident(&self) -> u16 {
        get_u16(self.as_bytes(), field::IDENT)
    }

    #[inline]
    pub fn dont_frag(&self) -> bool {
        get_u16(self.as_bytes(), field::FLG_OFF) & DF != 0
    }

    #[inline]
    pub fn more_frags(&self) -> bool {
        get_u16(self.as_bytes(), field::FLG_OFF) & MF != 0
    }

    /// The fragment offset in 8-byte units.
    #[inline]
    pub fn frag_offset(&self) -> u16 {
        get_u16(self.as_bytes(), field::FLG_OFF) & OFFSET
    }

    /// Whether this is a fragment of a larger datagram (MF set or a non-zero offset): only
    /// the first fragment carries the transport header, and then not whole.
    #[inline]
    pub fn is_fragment(&self) -> bool {
        get_u16(self.as_bytes(), field::FLG_OFF) & (MF | OFFSET) != 0
    }

    #[inline]
    pub fn ttl(&self) -> u8 {
        self.as_bytes()[field::TTL]
    }

    /// The protocol of the payload (`ip::protocol`).
    #[inline]
    pub fn protocol(&self) -> u8 {
        self.as_bytes()[field::PROTOCOL]
    }

    #[inline]
    pub fn checksum(&self) -> u16 {
        get_u16(self.as_bytes(), field::CHECKSUM)
    }

    #[inline]
    pub fn src_addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(get_array::<4>(self.as_bytes(), field::SRC))
    }

    #[inline]
    pub fn dst_addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(get_array::<4>(self.as_bytes(), field::DST))
    }

    /// The options (between the fixed header and the IHL), when the IHL is valid and
    /// fits the buffer.
    #[inline]
    pub fn options(&self) -> Option<&[u8]> {
        let ihl = self.header_len();
        if ihl < HEADER_LEN {
            return None;
        }
        self.as_bytes().get(HEADER_LEN..ihl)
    }

    /// The bytes after the header (the IHL's) to the end of the buffer, when the IHL is
    /// valid and fits: the transport header as far as it is present. The total length is
    /// not applied; [`Ipv4Packet::check_len`] says whether it matches.
    #[inline]
    pub fn payload(&self) -> Option<&[u8]> {
        let ihl = self.header_len();
        if ihl < HEADER_LEN {
            return None;
        }
        self.as_bytes().get(ihl..)
    }

    /// The header's bytes for its checksum: the IHL's when valid and within the buffer,
    /// else the fixed 20.
    #[inline]
    fn header_bytes(&self) -> &[u8] {
        let b = self.as_bytes();
        let ihl = self.header_len();
        if (HEADER_LEN..=b.len()).contains(&ihl) {
            &b[..ihl]
        } else {
            &b[..HEADER_LEN]
        }
    }

    /// Whether the header checksum verifies.
    #[inline]
    pub fn verify_checksum(&self) -> bool {
        checksum::verifies(self.header_bytes())
    }

    /// The pseudo-header sum of a transport segment of `len` bytes of this packet.
    #[inline]
    pub fn pseudo_header(&self, len: u16) -> checksum::Sum {
        checksum::pseudo_v4(self.src_addr(), self.dst_addr(), self.protocol(), len)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv4Packet<T> {
    #[inline]
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.buffer.as_mut()
    }

    /// The bytes after the header to the end of the buffer (see [`Ipv4Packet::payload`]).
    #[inline]
    pub fn payload_mut(&mut self) -> Option<&mut [u8]> {
        let ihl = self.header_len();
        if ihl < HEADER_LEN {
            return None;
        }
        self.bytes_mut().get_mut(ihl..)
    }

    #[inline]
    pub fn set_total_len(&mut self, len: u16) {
        set_u16(self.bytes_mut(), field::LENGTH, len);
    }

    #[inline]
    pub fn set_ident(&mut self, ident: u16) {
        set_u16(self.bytes_mut(), field::IDENT, ident);
    }

    #[inline]
    pub fn set_ttl(&mut self, ttl: u8) {
        self.bytes_mut()[field::TTL] = ttl;
    }

    #[inline]
    pub fn set_src_addr(&mut self, addr: Ipv4Addr) {
        self.bytes_mut()[field::SRC..field::SRC + 4].copy_from_slice(&addr.octets());
    }

    #[inline]
    pub fn set_dst_addr(&mut self, addr: Ipv4Addr) {
        self.bytes_mut()[field::DST..field::DST + 4].copy_from_slice(&addr.octets());
    }

    #[inline]
    pub fn set_checksum(&mut self, check: u16) {
        set_u16(self.bytes_mut(), field::CHECKSUM, check);
    }

    /// Computes the header checksum afresh (over the IHL's bytes when valid, else the fixed
    /// 20).
    #[inline]
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let c = checksum::checksum(self.header_bytes());
        self.set_checksum(c);
    }

    /// Writes the second byte (DSCP and ECN) and updates the header checksum for it
    /// (RFC 1624): a header whose checksum verified still verifies.
    #[inline]
    fn set_tos(&mut self, tos: u8) {
        let b = self.as_bytes();
        let old = u16::from_be_bytes([b[field::VER_IHL], b[field::DSCP_ECN]]);
        let new = u16::from_be_bytes([b[field::VER_IHL], tos]);
        let check = checksum::update(self.checksum(), old, new);
        self.bytes_mut()[field::DSCP_ECN] = tos;
        self.set_checksum(check);
    }

    /// Sets the ECN codepoint, keeping the header checksum right.
    #[inline]
    pub fn set_ecn(&mut self, ecn: Ecn) {
        let tos = self.as_bytes()[field::DSCP_ECN] & !3 | ecn.bits();
        self.set_tos(tos);
    }

    /// Sets the DSCP (its six low bits), keeping the header checksum right.
    #[inline]
    pub fn set_dscp(&mut self, dscp: u8) {
        let tos = (dscp << 2) | self.as_bytes()[field::DSCP_ECN] & 3;
        self.set_tos(tos);
    }

    /// Marks congestion as a router would (RFC 3168, 6.1.1): an ECN-capable packet gets CE
    /// and `true`; a not-ECN-capable one is left alone and gets `false` (drop it instead).
    /// The header checksum stays right; the transport checksum does not cover these bits.
    #[inline]
    pub fn mark_ce(&mut self) -> bool {
        if !self.ecn().is_capable() {
            return false;
        }
        self.set_ecn(Ecn::Ce);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// 198.18.0.1 -> 198.18.0.2, UDP, DF, TTL 64, ECT(0), `payload` zero bytes, checksum
    /// filled.
    fn sample(payload: usize) -> Vec<u8> {
        let len = 20 + payload;
        let mut p = vec![0x45, 0x02, 0, 0, 0x12, 0x34, 0x40, 0, 64, 17, 0, 0, 198, 18, 0, 1, 198, 18, 0, 2];
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p.resize(len, 0);
        let mut v = Ipv4Packet::new_checked(&mut p[..]).unwrap();
        v.fill_checksum();
        p
    }

    #[test]
    fn fields_of_a_sample() {
        let p = sample(8);
        let v = Ipv4Packet::new_checked(&p[..]).unwrap();
        assert_eq!(v.header_len(), 20);
        assert_eq!((v.dscp(), v.ecn()), (0, Ecn::Ect0));
        assert_eq!((v.total_len(), v.ident(), v.ttl(), v.protocol()), (28, 0x1234, 64, 17));
        assert!(v.dont_frag() && !v.more_frags() && !v.is_fragment());
        assert_eq!(v.src_addr(), Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(v.dst_addr(), Ipv4Addr::new(198, 18, 0, 2));
        assert_eq!(v.options(), Some(&[][..]));
        assert_eq!(v.payload(), Some(&[0u8; 8][..]));
        assert!(v.verify_checksum());
        assert_eq!(v.check_len(), Ok(()));
    }

    #[test]
    fn checks() {
        assert_eq!(Ipv4Packet::new_checked(&[][..]), Err(Error::Truncated));
        assert_eq!(Ipv4Packet::new_checked(&[0x45; 19][..]), Err(Error::Truncated));
        assert_eq!(Ipv4Packet::new_checked(&[0x65; 19][..]), Err(Error::Version));
        assert_eq!(Ipv4Packet::new_checked(&[0x60; 40][..]), Err(Error::Version));
        let mut p = sample(8);
        p[2] = 1; // total length above the buffer
        assert_eq!(Ipv4Packet::new_checked(&p[..]).unwrap().check_len(), Err(Error::Length));
        let mut p = sample(8);
        p[0] = 0x44; // IHL 16
        let v = Ipv4Packet::new_checked(&p[..]).unwrap();
        assert_eq!((v.check_len(), v.payload(), v.options()), (Err(Error::Length), None, None));
        p[0] = 0x48; // IHL 32 > 28
        let v = Ipv4Packet::new_checked(&p[..]).unwrap();
        assert_eq!((v.check_len(), v.payload(), v.options()), (Err(Error::Length), None, None));
        p[0] = 0x46; // IHL 24: 4 bytes of options
        let v = Ipv4Packet::new_checked(&p[..]).unwrap();
        assert_eq!(v.options().map(<[u8]>::len), Some(4));
        assert_eq!(v.payload().map(<[u8]>::len), Some(4));
    }

    #[test]
    fn fragments() {
        let mut p = sample(8);
        for (flags, frag, mf, off) in [(0x2000u16, true, true, 0), (0x0001, true, false, 1), (0x4000, false, false, 0), (0x3fff, true, true, 0x1fff)] {
            p[6..8].copy_from_slice(&flags.to_be_bytes());
            let v = Ipv4Packet::new_checked(&p[..]).unwrap();
            assert_eq!((v.is_fragment(), v.more_frags(), v.frag_offset()), (frag, mf, off), "{flags:#x}");
        }
    }

    #[test]
    fn ecn_marking_keeps_the_checksum() {
        let mut p = sample(100);
        let mut v = Ipv4Packet::new_checked(&mut p[..]).unwrap();
        assert!(v.mark_ce());
        assert_eq!(v.ecn(), Ecn::Ce);
        assert!(v.verify_checksum());
        let marked = v.checksum();
        v.fill_checksum();
        assert_eq!(v.checksum(), marked, "the incremental update is the recomputation");
        v.set_ecn(Ecn::NotEct);
        assert!(!v.mark_ce(), "not ECN-capable: left alone, to be dropped");
        assert_eq!(v.ecn(), Ecn::NotEct);
        v.set_dscp(46);
        assert_eq!((v.dscp(), v.ecn()), (46, Ecn::NotEct));
        assert!(v.verify_checksum());
    }

    proptest! {
        #[test]
        fn prop_any_bytes_never_panic(p in proptest::collection::vec(any::<u8>(), 0..100)) {
            if let Ok(v) = Ipv4Packet::new_checked(&p[..]) {
                let _ = (v.header_len(), v.dscp(), v.ecn(), v.total_len(), v.ident(), v.dont_frag(), v.more_frags());
                let _ = (v.frag_offset(), v.is_fragment(), v.ttl(), v.protocol(), v.checksum(), v.src_addr(), v.dst_addr());
                let _ = (v.options(), v.payload(), v.verify_checksum(), v.check_len(), v.pseudo_header(3));
                if v.check_len().is_ok() {
                    prop_assert_eq!(v.payload().map(<[u8]>::len), Some(p.len() - v.header_len()));
                }
            } else {
                prop_assert!(p.len() < 20 || p[0] >> 4 != 4);
            }
        }

        #[test]
        fn prop_setters_round_trip(
            mut p in proptest::collection::vec(any::<u8>(), 20..80),
            ecn in 0u8..4, dscp in 0u8..64, ttl: u8, ident: u16, len: u16, src: u32, dst: u32,
        ) {
            p[0] = 0x40 | (p[0] & 0x0f);
            let mut v = Ipv4Packet::new_checked(&mut p[..]).unwrap();
            v.fill_checksum();
            prop_assert!(v.verify_checksum());
            v.set_ecn(Ecn::from_bits(ecn));
            prop_assert!(v.verify_checksum(), "ECN setter broke the checksum");
            v.set_dscp(dscp);
            prop_assert!(v.verify_checksum(), "DSCP setter broke the checksum");
            prop_assert_eq!((v.ecn().bits(), v.dscp()), (ecn, dscp));
            let capable = v.ecn().is_capable();
            prop_assert_eq!(v.mark_ce(), capable);
            prop_assert!(v.verify_checksum());
            prop_assert_eq!(v.ecn() == Ecn::Ce, capable);
            v.set_ttl(ttl);
            v.set_ident(ident);
            v.set_total_len(len);
            v.set_src_addr(Ipv4Addr::from(src));
            v.set_dst_addr(Ipv4Addr::from(dst));
            v.fill_checksum();
            prop_assert!(v.verify_checksum());
            prop_assert_eq!((v.ttl(), v.ident(), v.total_len()), (ttl, ident, len));
            prop_assert_eq!((v.src_addr(), v.dst_addr()), (Ipv4Addr::from(src), Ipv4Addr::from(dst)));
        }
    }
}
