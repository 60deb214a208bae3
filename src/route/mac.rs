//! Switching Ethernet frames on the bus (L2 sessions, `agent connect --l2`): which routing
//! key a frame read from a TAP goes out under, the table of which agent owns which MAC
//! address, and the bound on what one sender may flood.
//!
//! - **Keys.** Each L2 agent binds `tunbus.v1.mac-<12 hex digits>.<shard>` for its own TAP
//!   address ([`RoutingKey::mac`]): one word, never an address word (it holds letters
//!   outside hex). A frame to a unicast MAC the [`MacTable`] knows goes to the key of the
//!   agent that owns it (its TAP address, also for MACs learned behind its bridge);
//!   broadcast, multicast and unknown unicast go under the sender's flood key, as IP
//!   broadcasts do.
//! - **Shards.** [`frame_shard`]: an IP payload (after up to two 802.1Q tags) takes the IP
//!   flow's shard ([`super::flow_hash`]), anything else a hash of (destination, source,
//!   ethertype). The receiver binds shard `s` to queue `s mod K`, so one flow keeps one
//!   queue and its order, as with TUN.
//! - **Learning** ([`MacTable`]): an agent's hello names its MACs; a flood from a sender
//!   teaches the receiver the source MAC of each frame that passed the identity check.
//!   Entries age out after [`MAC_AGE`] without news; the table is bounded ([`MAX_MACS`]).
//! - **Flood bound** ([`FloodBucket`]): a token bucket per sender at the receiver, in
//!   frames and bytes, so one agent's broadcast storm cannot starve the others.
//!
//! Pure: the time is passed in, nothing here reads a clock or allocates per frame.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::key::{RoutingKey, KEY_PREFIX, SHARDS};
use crate::packet::ethernet::{ethertype, EthernetFrame, Mac};

/// How long a learned MAC is kept without a hello or a frame that confirms it (a bridge's
/// default ageing time is 300 s).
pub const MAC_AGE: Duration = Duration::from_secs(300);
/// Most MACs a table holds; beyond, new ones are not learned (their frames are flooded).
pub const MAX_MACS: usize = 16_384;
/// Prefix of a MAC's routing word.
pub const MAC_WORD_PREFIX: &str = "mac-";

/// `mac-02aabbccddee`: a MAC as one topic word.
pub fn mac_word(mac: Mac) -> [u8; 16] {
    let mut w = [0u8; 16];
    w[..4].copy_from_slice(MAC_WORD_PREFIX.as_bytes());
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, o) in mac.octets().iter().enumerate() {
        w[4 + 2 * i] = HEX[usize::from(o >> 4)];
        w[5 + 2 * i] = HEX[usize::from(o & 15)];
    }
    w
}

/// The MAC a word names (`mac-` and twelve lowercase hex digits), else `None`.
pub fn word_to_mac(word: &str) -> Option<Mac> {
    let hex = word.strip_prefix(MAC_WORD_PREFIX)?;
    if hex.len() != 12 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; 6];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(Mac(out))
}

/// `tunbus.v1.mac-<hex>.*`: every shard of one MAC (a one-queue receiver's binding).
pub fn mac_pattern(mac: Mac) -> String {
    let w = mac_word(mac);
    format!("{KEY_PREFIX}{}.*", core::str::from_utf8(&w).unwrap_or_default())
}

impl RoutingKey {
    /// `tunbus.v1.mac-<hex>.<shard>`: a frame for the agent whose TAP has address `owner`.
    pub fn mac(owner: Mac, shard: u8) -> RoutingKey {
        const SHARD_WORDS: [&str; SHARDS as usize] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15"];
        let w = mac_word(owner);
        let word = core::str::from_utf8(&w).unwrap_or_default(); // ASCII by construction
        let shard = SHARD_WORDS[usize::from(shard % SHARDS)];
        // Cannot fail: 10 + 16 + 1 + 2 bytes, within the key's capacity.
        RoutingKey::build(&[KEY_PREFIX, word, ".", shard]).unwrap_or_else(|| RoutingKey::unicast(std::net::Ipv4Addr::UNSPECIFIED.into(), 0))
    }

    /// Parses a MAC key back into (owner, shard); `None` for anything else.
    pub fn parse_mac(key: &str) -> Option<(Mac, u8)> {
        let rest = key.strip_prefix(KEY_PREFIX)?;
        let (word, shard) = rest.split_once('.')?;
        let shard: u8 = shard.parse().ok().filter(|&s| s < SHARDS)?;
        let mac = word_to_mac(word)?;
        (RoutingKey::mac(mac, shard).as_str() == key).then_some((mac, shard))
    }
}

/// Where a frame read from a TAP goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameDestination {
    /// Broadcast or multicast: the whole session.
    Flood,
    /// One station, and the frame's flow shard.
    Unicast { dst: Mac, shard: u8 },
}

/// Why a frame is not sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Shorter than an Ethernet header (or than its tags).
    Truncated,
}

/// The destination and flow shard of `frame` (no virtio header).
#[inline]
pub fn classify_frame(frame: &[u8]) -> Result<FrameDestination, FrameError> {
    let f = EthernetFrame::new_checked(frame).map_err(|_| FrameError::Truncated)?;
    let dst = f.dst();
    if dst.is_multicast() {
        return Ok(FrameDestination::Flood);
    }
    Ok(FrameDestination::Unicast { dst, shard: frame_shard(&f) })
}

/// The flow shard of a frame: its IP flow's ([`super::flow_hash`]) when it carries IP,
/// else a hash of (destination, source, ethertype), so that every frame of one flow takes
/// one shard.
#[inline]
pub fn frame_shard<T: AsRef<[u8]>>(f: &EthernetFrame<T>) -> u8 {
    let et = f.ethertype();
    if et == ethertype::IPV4 || et == ethertype::IPV6 {
        return super::shard(super::flow_hash(f.payload()));
    }
    let mut bytes = [0u8; 14];
    bytes[..6].copy_from_slice(&f.dst().octets());
    bytes[6..12].copy_from_slice(&f.src().octets());
    bytes[12..].copy_from_slice(&et.to_be_bytes());
    super::shard(crate::util::fnv1a64(&[&bytes]) as u32)
}

/// The source MAC of a frame, if it has a whole header.
#[inline]
pub fn frame_source(frame: &[u8]) -> Option<Mac> {
    EthernetFrame::new_checked(frame).ok().map(|f| f.src())
}

/// One learned MAC: the agent that owns it (named by its TAP's MAC, the word it binds),
/// and when that was last confirmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    owner: Mac,
    seen: Instant,
}

/// Which agent owns which MAC. The learner (queue 0's receiving half) changes it; the
/// sending halves read snapshots of it ([`MacTable::clone`], published when it changed).
#[derive(Clone, Debug, Default)]
pub struct MacTable {
    by_mac: HashMap<Mac, Entry>,
}

impl MacTable {
    pub fn new() -> MacTable {
        MacTable::default()
    }

    /// `mac` is behind the agent whose TAP is `owner`, as of `now`. Returns whether the
    /// table changed in a way a sender sees (a new MAC, or one that moved); a refresh is not
    /// a change. Multicast and all-zero MACs are never learned; a full table learns nothing
    /// new.
    pub fn learn(&mut self, mac: Mac, owner: Mac, now: Instant) -> bool {
        if mac.is_multicast() || mac == Mac([0; 6]) {
            return false;
        }
        let full = self.by_mac.len() >= MAX_MACS;
        match self.by_mac.get_mut(&mac) {
            Some(e) if e.owner == owner => {
                e.seen = now;
                false
            }
            Some(e) => {
                *e = Entry { owner, seen: now };
                true
            }
            None if full => false,
            None => {
                self.by_mac.insert(mac, Entry { owner, seen: now });
                true
            }
        }
    }

    /// Forgets what `owner` taught (its bye). Returns whether anything went.
    pub fn forget_owner(&mut self, owner: Mac) -> bool {
        let before = self.by_mac.len();
        self.by_mac.retain(|_, e| e.owner != owner);
        self.by_mac.len() != before
    }

    /// Drops entries older than [`MAC_AGE`] at `now`. Returns whether any went.
    pub fn expire(&mut self, now: Instant) -> bool {
        let before = self.by_mac.len();
        self.by_mac.retain(|_, e| now.saturating_duration_since(e.seen) < MAC_AGE);
        self.by_mac.len() != before
    }

    /// The owner of `mac`, if known.
    #[inline]
    pub fn owner(&self, mac: Mac) -> Option<Mac> {
        self.by_mac.get(&mac).map(|e| e.owner)
    }

    pub fn len(&self) -> usize {
        self.by_mac.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_mac.is_empty()
    }
}

/// The flood bound of one receiver: per sender, a token bucket of frames and one of bytes.
/// A sender may flood [`FloodLimit::frames_per_s`] frames and [`FloodLimit::bytes_per_s`]
/// bytes per second on average, in bursts of one second's worth; what is over is dropped
/// and counted (`flood_limit`). The buckets are kept for at most [`FloodBucket::SENDERS`]
/// senders (slots chosen by a hash of the sender; two senders sharing a slot share it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FloodLimit {
    pub frames_per_s: u32,
    pub bytes_per_s: u32,
}

impl Default for FloodLimit {
    /// 2000 frames/s and 2 MB/s per sender: ARP, ND, DHCP and discovery protocols of a
    /// testbed stay far below; a storm is cut to that.
    fn default() -> FloodLimit {
        FloodLimit { frames_per_s: 2000, bytes_per_s: 2_000_000 }
    }
}

/// Token buckets for [`FloodLimit`], one per sender slot.
#[derive(Clone, Debug)]
pub struct FloodBucket {
    limit: FloodLimit,
    /// (sender hash, frames, bytes, last refill)
    slots: Vec<(u64, f64, f64, Option<Instant>)>,
}

impl FloodBucket {
    /// Sender slots.
    pub const SENDERS: usize = 64;

    pub fn new(limit: FloodLimit) -> FloodBucket {
        FloodBucket { limit, slots: vec![(0, 0.0, 0.0, None); Self::SENDERS] }
    }

    /// Whether sender `sender` (a hash of its broker user and name) may flood a frame of
    /// `len` bytes at `now`; takes its tokens when it may.
    pub fn admit(&mut self, sender: u64, len: usize, now: Instant) -> bool {
        let (fcap, bcap) = (f64::from(self.limit.frames_per_s), f64::from(self.limit.bytes_per_s));
        let slot = &mut self.slots[(sender as usize) % Self::SENDERS];
        match slot.3 {
            Some(last) if slot.0 == sender => {
                let dt = now.saturating_duration_since(last).as_secs_f64();
                slot.1 = (slot.1 + dt * fcap).min(fcap);
                slot.2 = (slot.2 + dt * bcap).min(bcap);
            }
            _ => *slot = (sender, fcap, bcap, None),
        }
        slot.3 = Some(now);
        let len = len as f64;
        if slot.1 >= 1.0 && slot.2 >= len {
            slot.1 -= 1.0;
            slot.2 -= len;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: Mac = Mac([0x02, 0, 0, 0, 0, 0x0a]);
    const B: Mac = Mac([0x02, 0, 0, 0, 0, 0x0b]);
    const C: Mac = Mac([0x02, 0, 0, 0, 0, 0x0c]);

    fn frame(dst: Mac, src: Mac, et: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst.octets());
        f.extend_from_slice(&src.octets());
        f.extend_from_slice(&et.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn udp4(sport: u16) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 198, 18, 0, 1, 198, 18, 0, 2];
        p.extend_from_slice(&sport.to_be_bytes());
        p.extend_from_slice(&[0, 7, 0, 8, 0, 0]);
        p
    }

    #[test]
    fn words_and_keys_go_both_ways() {
        let w = mac_word(Mac([0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee]));
        assert_eq!(&w, b"mac-02aabbccddee");
        assert_eq!(word_to_mac("mac-02aabbccddee"), Some(Mac([0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee])));
        for bad in ["mac-02AABBCCDDEE", "mac-02aabbccdd", "02aabbccddee", "mac-02aabbccddeeff", "mac-02aabbccddgg", ""] {
            assert_eq!(word_to_mac(bad), None, "{bad}");
        }
        let k = RoutingKey::mac(A, 7);
        assert_eq!(k.as_str(), "tunbus.v1.mac-02000000000a.7");
        assert_eq!(RoutingKey::parse_mac(k.as_str()), Some((A, 7)));
        assert_eq!(RoutingKey::parse_mac("tunbus.v1.mac-02000000000a.16"), None);
        assert_eq!(RoutingKey::parse_mac("tunbus.v1.mac-02000000000a.07"), None);
        assert_eq!(RoutingKey::parse_mac("tunbus.v1.198-18-0-1.7"), None);
        // A MAC word is never an address word, and the other way round.
        assert_eq!(super::super::word_to_address("mac-02000000000a"), None);
        assert_eq!(mac_pattern(A), "tunbus.v1.mac-02000000000a.*");
    }

    #[test]
    fn broadcast_multicast_flood_unicast_has_a_shard() {
        assert_eq!(classify_frame(&frame(Mac::BROADCAST, A, ethertype::ARP, &[0; 28])), Ok(FrameDestination::Flood));
        let v6_multicast = Mac([0x33, 0x33, 0, 0, 0, 1]);
        assert_eq!(classify_frame(&frame(v6_multicast, A, ethertype::IPV6, &[0; 40])), Ok(FrameDestination::Flood));
        match classify_frame(&frame(B, A, ethertype::IPV4, &udp4(1000))) {
            Ok(FrameDestination::Unicast { dst, shard }) => {
                assert_eq!(dst, B);
                assert_eq!(shard, super::super::shard(super::super::flow_hash(&udp4(1000))), "an IP frame takes its IP flow's shard");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(classify_frame(&[0; 13]), Err(FrameError::Truncated));
        assert_eq!(classify_frame(&[]), Err(FrameError::Truncated));
    }

    #[test]
    fn tagged_ip_takes_the_same_shard_as_untagged() {
        let plain = frame(B, A, ethertype::IPV4, &udp4(4242));
        let mut tagged = frame(B, A, ethertype::VLAN, &[0x00, 0x07]);
        tagged.extend_from_slice(&ethertype::IPV4.to_be_bytes());
        tagged.extend_from_slice(&udp4(4242));
        assert_eq!(classify_frame(&plain), classify_frame(&tagged));
    }

    #[test]
    fn non_ip_flows_keep_one_shard() {
        let s1 = classify_frame(&frame(B, A, 0x88a4, &[1; 40]));
        let s2 = classify_frame(&frame(B, A, 0x88a4, &[2; 60]));
        assert_eq!(s1, s2, "the same (dst, src, ethertype) is one flow whatever its payload");
    }

    #[test]
    fn learning_moves_and_ageing() {
        let t0 = Instant::now();
        let mut t = MacTable::new();
        assert!(t.learn(A, A, t0));
        assert!(!t.learn(A, A, t0 + Duration::from_secs(1)), "a refresh is no change");
        assert!(t.learn(C, B, t0), "C behind B's bridge");
        assert_eq!(t.owner(C), Some(B));
        assert!(t.learn(C, A, t0), "C moved to A");
        assert_eq!(t.owner(C), Some(A));
        assert!(!t.learn(Mac::BROADCAST, A, t0));
        assert!(!t.learn(Mac([0x33, 0x33, 0, 0, 0, 1]), A, t0));
        assert!(!t.learn(Mac([0; 6]), A, t0));
        assert!(!t.expire(t0 + MAC_AGE - Duration::from_secs(2)));
        assert!(t.expire(t0 + MAC_AGE), "C was last confirmed at t0");
        assert_eq!(t.owner(C), None);
        assert_eq!(t.owner(A), Some(A), "A was refreshed at t0 + 1 s");
        assert!(t.learn(B, B, t0));
        assert!(t.forget_owner(B));
        assert_eq!(t.owner(B), None);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_full_table_learns_nothing_new() {
        let t0 = Instant::now();
        let mut t = MacTable::new();
        for i in 0..MAX_MACS as u32 {
            let b = i.to_be_bytes();
            t.learn(Mac([2, 0, b[0], b[1], b[2], b[3]]), A, t0);
        }
        assert_eq!(t.len(), MAX_MACS);
        assert!(!t.learn(Mac([2, 1, 0, 0, 0, 0]), A, t0));
        assert_eq!(t.owner(Mac([2, 1, 0, 0, 0, 0])), None);
    }

    #[test]
    fn flood_bucket_bounds_each_sender_and_refills() {
        let limit = FloodLimit { frames_per_s: 100, bytes_per_s: 10_000 };
        let mut b = FloodBucket::new(limit);
        let t0 = Instant::now();
        let admitted = (0..1000).filter(|_| b.admit(1, 60, t0)).count();
        assert_eq!(admitted, 100, "one second's worth of frames in a burst");
        // Another sender is not starved by the first.
        assert!(b.admit(2, 60, t0));
        // Half a second refills half.
        let t1 = t0 + Duration::from_millis(500);
        let again = (0..1000).filter(|_| b.admit(1, 60, t1)).count();
        assert_eq!(again, 50);
        // Bytes bound too: 10 kB/s of 1500-byte frames is 6 a second.
        let mut b = FloodBucket::new(limit);
        assert_eq!((0..100).filter(|_| b.admit(3, 1500, t0)).count(), 6);
    }

    proptest! {
        #[test]
        fn classification_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = classify_frame(&bytes);
            let _ = frame_source(&bytes);
        }

        #[test]
        fn mac_keys_round_trip(octets in any::<[u8; 6]>(), shard in 0u8..SHARDS) {
            let mac = Mac(octets);
            let k = RoutingKey::mac(mac, shard);
            prop_assert_eq!(RoutingKey::parse_mac(k.as_str()), Some((mac, shard)));
            prop_assert_eq!(super::super::Key::parse(k.as_str()), None);
        }

        #[test]
        fn the_flood_bucket_never_admits_more_than_its_rate(lens in proptest::collection::vec(1usize..2000, 1..400), step_us in 0u64..5000) {
            let limit = FloodLimit { frames_per_s: 50, bytes_per_s: 20_000 };
            let mut b = FloodBucket::new(limit);
            let t0 = Instant::now();
            let (mut frames, mut bytes) = (0u64, 0u64);
            let mut t = t0;
            for len in &lens {
                t += Duration::from_micros(step_us);
                if b.admit(9, *len, t) {
                    frames += 1;
                    bytes += *len as u64;
                }
            }
            let secs = t.saturating_duration_since(t0).as_secs_f64();
            prop_assert!(frames as f64 <= 50.0 * (1.0 + secs) + 1e-6);
            prop_assert!(bytes as f64 <= 20_000.0 * (1.0 + secs) + 1e-6);
        }
    }
}
