//! Ethernet II frames (IEEE 802.3) with up to two 802.1Q tags (a customer tag, or a service
//! tag 802.1ad then a customer tag) as a view over a byte buffer, and the MAC address type
//! ([`Mac`]: printed and parsed as `02:00:00:00:00:01`). The frame check sequence is not
//! part of the buffer (a TAP device neither gives nor takes it).
//!
//! Pure. Read per frame by the TAP port and its routing by destination MAC (coming).

use core::fmt;
use core::str::FromStr;

use super::{get_array, get_u16, set_u16, Error};

mod field {
    pub const DST: usize = 0;
    pub const SRC: usize = 6;
    /// The EtherType, or a tag's protocol identifier (TPID).
    pub const ETHERTYPE: usize = 12;
    /// Within a tag (from the tag's TPID): the tag control information.
    pub const TAG_TCI: usize = 2;
    pub const TAG_LEN: usize = 4;
}

/// Length of the untagged header.
pub const HEADER_LEN: usize = 14;
/// Most 802.1Q tags the view reads.
pub const MAX_TAGS: usize = 2;

/// EtherTypes.
pub mod ethertype {
    pub const IPV4: u16 = 0x0800;
    pub const ARP: u16 = 0x0806;
    /// An 802.1Q customer tag follows.
    pub const VLAN: u16 = 0x8100;
    pub const IPV6: u16 = 0x86dd;
    /// An 802.1ad service tag follows.
    pub const QINQ: u16 = 0x88a8;
}

/// Whether `ethertype` announces an 802.1Q tag.
#[inline]
fn is_tag(ethertype: u16) -> bool {
    matches!(ethertype, ethertype::VLAN | ethertype::QINQ)
}

/// A MAC address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    pub const BROADCAST: Mac = Mac([0xff; 6]);

    #[inline]
    pub fn octets(self) -> [u8; 6] {
        self.0
    }

    #[inline]
    pub fn is_broadcast(self) -> bool {
        self == Mac::BROADCAST
    }

    /// The group bit: multicast, broadcast included.
    #[inline]
    pub fn is_multicast(self) -> bool {
        self.0[0] & 1 != 0
    }

    /// One station (group bit clear).
    #[inline]
    pub fn is_unicast(self) -> bool {
        !self.is_multicast()
    }

    /// Locally administered (the U/L bit), as tunbus's own addresses are.
    #[inline]
    pub fn is_local(self) -> bool {
        self.0[0] & 2 != 0
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl FromStr for Mac {
    type Err = String;

    /// Six pairs of hex digits separated by `:` (or all by `-`), either case.
    fn from_str(s: &str) -> Result<Mac, String> {
        let bad = || format!("{s:?} is not a MAC address (write it as 02:00:00:00:00:01)");
        let sep = if s.contains('-') { '-' } else { ':' };
        let mut out = [0u8; 6];
        let mut parts = s.split(sep);
        for o in &mut out {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *o = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Mac(out))
    }
}

impl From<[u8; 6]> for Mac {
    fn from(octets: [u8; 6]) -> Mac {
        Mac(octets)
    }
}

/// One 802.1Q tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VlanTag {
    /// The tag protocol identifier: [`ethertype::VLAN`] or [`ethertype::QINQ`].
    pub tpid: u16,
    /// Priority code point (0 to 7).
    pub pcp: u8,
    /// Drop eligible indicator.
    pub dei: bool,
    /// VLAN identifier (0 to 4095).
    pub vid: u16,
}

/// An Ethernet frame at the start of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EthernetFrame<T> {
    buffer: T,
}

impl<T: AsRef<[u8]>> EthernetFrame<T> {
    /// A view of `buffer`: the 14-byte header, and the whole of each of the first two tags
    /// it announces.
    #[inline]
    pub fn new_checked(buffer: T) -> Result<EthernetFrame<T>, Error> {
        let b = buffer.as_ref();
        if b.len() < HEADER_LEN || b.len() < HEADER_LEN + Self::tags_in(b) * field::TAG_LEN {
            return Err(Error::Truncated);
        }
        Ok(EthernetFrame { buffer })
    }

    /// How many tags (at most [`MAX_TAGS`]) `b` announces, reading only what is there.
    #[inline]
    fn tags_in(b: &[u8]) -> usize {
        let announces = |at: usize| b.get(at..at + 2).is_some_and(|t| is_tag(u16::from_be_bytes([t[0], t[1]])));
        (0..MAX_TAGS).take_while(|&i| announces(field::ETHERTYPE + i * field::TAG_LEN)).count()
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
    pub fn dst(&self) -> Mac {
        Mac(get_array::<6>(self.as_bytes(), field::DST))
    }

    #[inline]
    pub fn src(&self) -> Mac {
        Mac(get_array::<6>(self.as_bytes(), field::SRC))
    }

    /// How many 802.1Q tags the frame carries (0, 1 or 2; a third is left in the payload,
    /// and [`EthernetFrame::ethertype`] is then its TPID).
    #[inline]
    pub fn tag_count(&self) -> usize {
        Self::tags_in(self.as_bytes())
    }

    /// Tag `i` (0: the outer one), if the frame has it.
    #[inline]
    pub fn tag(&self, i: usize) -> Option<VlanTag> {
        if i >= self.tag_count() {
            return None;
        }
        let at = field::ETHERTYPE + i * field::TAG_LEN;
        let b = self.as_bytes();
        let tci = get_u16(b, at + field::TAG_TCI);
        Some(VlanTag { tpid: get_u16(b, at), pcp: (tci >> 13) as u8, dei: tci & 0x1000 != 0, vid: tci & 0x0fff })
    }

    /// The length of the header, tags included.
    #[inline]
    pub fn header_len(&self) -> usize {
        HEADER_LEN + self.tag_count() * field::TAG_LEN
    }

    /// The EtherType of the payload, after the tags.
    #[inline]
    pub fn ethertype(&self) -> u16 {
        get_u16(self.as_bytes(), self.header_len() - 2)
    }

    /// The bytes after the header.
    #[inline]
    pub fn payload(&self) -> &[u8] {
        self.as_bytes().get(self.header_len()..).unwrap_or_default()
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> EthernetFrame<T> {
    #[inline]
    pub fn set_dst(&mut self, mac: Mac) {
        self.buffer.as_mut()[field::DST..field::DST + 6].copy_from_slice(&mac.0);
    }

    #[inline]
    pub fn set_src(&mut self, mac: Mac) {
        self.buffer.as_mut()[field::SRC..field::SRC + 6].copy_from_slice(&mac.0);
    }

    /// Sets the EtherType of the payload (after the tags).
    #[inline]
    pub fn set_ethertype(&mut self, ethertype: u16) {
        let at = self.header_len() - 2;
        set_u16(self.buffer.as_mut(), at, ethertype);
    }

    /// The bytes after the header.
    #[inline]
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let at = self.header_len();
        self.buffer.as_mut().get_mut(at..).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(tags: &[(u16, u16)], ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0, 0, 0, 0, 1];
        for (tpid, tci) in tags {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&tci.to_be_bytes());
        }
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn macs() {
        let m: Mac = "02:00:00:00:00:01".parse().unwrap();
        assert_eq!(m, Mac([2, 0, 0, 0, 0, 1]));
        assert_eq!(m.to_string(), "02:00:00:00:00:01");
        assert!(m.is_local() && m.is_unicast() && !m.is_multicast() && !m.is_broadcast());
        assert_eq!("0A-1b-2C-3d-4E-5f".parse::<Mac>(), Ok(Mac([0x0a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f])));
        assert_eq!(Mac([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff]).to_string(), "aa:bb:cc:dd:ee:ff");
        assert!(Mac::BROADCAST.is_broadcast() && Mac::BROADCAST.is_multicast());
        let mcast: Mac = "33:33:00:00:00:01".parse().unwrap();
        assert!(mcast.is_multicast() && !mcast.is_broadcast() && !mcast.is_unicast());
        assert!("01:00:5e:00:00:fb".parse::<Mac>().unwrap().is_multicast());
        for bad in ["", "02:00:00:00:00", "02:00:00:00:00:01:02", "2:0:0:0:0:1", "02:00:00:00:00:0g", "02-00:00:00:00:01", "020000000001", "+2:00:00:00:00:01"]
        {
            assert!(bad.parse::<Mac>().is_err(), "{bad:?}");
        }
        assert!("zz".parse::<Mac>().unwrap_err().contains("02:00:00:00:00:01"));
    }

    #[test]
    fn untagged_and_tagged() {
        let f = frame(&[], ethertype::IPV6, &[0x60; 40]);
        let v = EthernetFrame::new_checked(&f[..]).unwrap();
        assert_eq!((v.dst(), v.src()), (Mac::BROADCAST, Mac([2, 0, 0, 0, 0, 1])));
        assert_eq!((v.tag_count(), v.header_len(), v.ethertype(), v.tag(0)), (0, 14, ethertype::IPV6, None));
        assert_eq!(v.payload(), &[0x60; 40]);

        let f = frame(&[(ethertype::VLAN, 0xa07b)], ethertype::IPV4, &[0x45; 20]);
        let v = EthernetFrame::new_checked(&f[..]).unwrap();
        assert_eq!((v.tag_count(), v.header_len(), v.ethertype()), (1, 18, ethertype::IPV4));
        assert_eq!(v.tag(0), Some(VlanTag { tpid: ethertype::VLAN, pcp: 5, dei: false, vid: 0x07b }));
        assert_eq!(v.payload(), &[0x45; 20]);

        let f = frame(&[(ethertype::QINQ, 0x1064), (ethertype::VLAN, 0x000a)], ethertype::ARP, &[1; 28]);
        let v = EthernetFrame::new_checked(&f[..]).unwrap();
        assert_eq!((v.tag_count(), v.header_len(), v.ethertype()), (2, 22, ethertype::ARP));
        assert_eq!(v.tag(0), Some(VlanTag { tpid: ethertype::QINQ, pcp: 0, dei: true, vid: 100 }));
        assert_eq!(v.tag(1).map(|t| t.vid), Some(10));
        assert_eq!(v.tag(2), None);

        // a third tag stays in the payload
        let f = frame(&[(ethertype::VLAN, 1), (ethertype::VLAN, 2), (ethertype::VLAN, 3)], ethertype::IPV4, &[]);
        let v = EthernetFrame::new_checked(&f[..]).unwrap();
        assert_eq!((v.tag_count(), v.ethertype(), v.payload().len()), (2, ethertype::VLAN, 4));
    }

    #[test]
    fn truncated() {
        let f = frame(&[(ethertype::QINQ, 1), (ethertype::VLAN, 2)], ethertype::IPV4, &[]);
        assert_eq!(f.len(), 22);
        for n in 0..f.len() {
            assert_eq!(EthernetFrame::new_checked(&f[..n]), Err(Error::Truncated), "{n} bytes");
        }
        assert!(EthernetFrame::new_checked(&f[..]).is_ok());
    }

    #[test]
    fn setters() {
        let mut f = frame(&[(ethertype::VLAN, 7)], ethertype::IPV4, &[0; 4]);
        let mut v = EthernetFrame::new_checked(&mut f[..]).unwrap();
        v.set_dst(Mac([2, 0, 0, 0, 0, 9]));
        v.set_src(Mac([2, 0, 0, 0, 0, 8]));
        v.set_ethertype(ethertype::IPV6);
        v.payload_mut()[0] = 0x60;
        assert_eq!((v.dst(), v.src(), v.ethertype(), v.tag_count()), (Mac([2, 0, 0, 0, 0, 9]), Mac([2, 0, 0, 0, 0, 8]), ethertype::IPV6, 1));
        assert_eq!(v.payload(), &[0x60, 0, 0, 0]);
    }

    proptest! {
        #[test]
        fn prop_any_bytes_never_panic(f in proptest::collection::vec(any::<u8>(), 0..40), tags in 0usize..4) {
            let mut f = f;
            for i in 0..tags {
                if let Some(t) = f.get_mut(12 + 4 * i..14 + 4 * i) {
                    t.copy_from_slice(&ethertype::VLAN.to_be_bytes());
                }
            }
            if let Ok(v) = EthernetFrame::new_checked(&f[..]) {
                let _ = (v.dst(), v.src(), v.ethertype(), v.tag(0), v.tag(1), v.tag(2), v.payload());
                prop_assert!(v.header_len() <= f.len());
                prop_assert_eq!(v.payload().len(), f.len() - v.header_len());
            } else {
                prop_assert!(f.len() < 22);
            }
        }

        #[test]
        fn prop_mac_round_trip(octets: [u8; 6]) {
            let m = Mac(octets);
            prop_assert_eq!(m.to_string().parse::<Mac>(), Ok(m));
            prop_assert_eq!(m.to_string().to_uppercase().replace(':', "-").parse::<Mac>(), Ok(m));
            prop_assert_eq!(m.is_multicast(), octets[0] & 1 == 1);
        }
    }
}
