//! What an agent has learned about its peers' queue counts, so that it can batch per
//! receiving queue instead of per flow shard (docs/decisions/0012-batch-per-receiver-queue.md).
//!
//! Every v1 frame states how many consumer queues its sender has (`sender_queues`). Workers'
//! receiving halves note it for the source addresses of the packets they deliver; sending halves look
//! up the destination and publish shard `s mod K` instead of `s` ([`key_shard`]). The
//! receiver binds shard `s` to its queue `s mod K`, so the packet reaches the same queue as
//! before (and a flow keeps one queue and its order), but a destination now has K keys
//! instead of 16: the flows bound for one queue share batches, and the broker, whose cost
//! is per message, carries fewer and larger messages.
//!
//! A fixed table of atomics, shared by the agent's workers: no lock, no allocation after
//! start. Slot = hash(address) mod [`SLOTS`]; an entry holds 56 bits of the hash as a tag
//! and the count. Colliding addresses overwrite each other. A miss, a collision or a stale
//! count costs batching only, never delivery: whatever K the sender assumes, the key it
//! picks is one the receiver binds.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use super::SHARDS;
use crate::util::splitmix64;

/// Entries in the table (8 bytes each).
pub const SLOTS: usize = 1024;

/// Peer address → its number of consumer queues.
pub struct PeerQueues {
    slots: Box<[AtomicU64]>,
}

impl Default for PeerQueues {
    fn default() -> Self {
        PeerQueues::new()
    }
}

impl PeerQueues {
    pub fn new() -> PeerQueues {
        PeerQueues { slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect() }
    }

    /// Notes that `addr` belongs to an agent with `queues` consumer queues. Counts outside
    /// `1..=SHARDS` (0: not stated) are ignored. Writes only when the entry changes.
    #[inline]
    pub fn note(&self, addr: IpAddr, queues: u8) {
        if queues == 0 || queues > SHARDS {
            return;
        }
        let h = hash(addr);
        let entry = (h & !0xff) | u64::from(queues);
        let slot = &self.slots[(h as usize) % SLOTS];
        if slot.load(Ordering::Relaxed) != entry {
            slot.store(entry, Ordering::Relaxed);
        }
    }

    /// The queue count noted for `addr`, if any.
    #[inline]
    pub fn queues(&self, addr: IpAddr) -> Option<u8> {
        let h = hash(addr);
        let entry = self.slots[(h as usize) % SLOTS].load(Ordering::Relaxed);
        (entry != 0 && entry & !0xff == h & !0xff).then_some((entry & 0xff) as u8)
    }
}

/// The shard to put in the key of a packet of flow shard `shard` for a receiver with
/// `receiver_queues` queues (`None`: unknown, keep the shard).
#[inline]
pub fn key_shard(shard: u8, receiver_queues: Option<u8>) -> u8 {
    match receiver_queues {
        Some(k) if k > 0 => shard % k,
        _ => shard,
    }
}

/// 64 well-mixed bits of an address (splitmix64 finaliser over its 128 bits; IPv4 as
/// IPv4-mapped IPv6, so each address has one hash).
fn hash(addr: IpAddr) -> u64 {
    let bits = match addr {
        IpAddr::V4(a) => a.to_ipv6_mapped().to_bits(),
        IpAddr::V6(a) => a.to_bits(),
    };
    splitmix64(splitmix64(bits as u64) ^ (bits >> 64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::queue_for_shard;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn a_key_shard_reaches_the_queue_its_flow_shard_would() {
        // Exhaustive: every shard, every receiver queue count, known or not.
        for k in 1..=SHARDS {
            for s in 0..SHARDS {
                let ks = key_shard(s, Some(k));
                assert!(ks < k && ks < SHARDS);
                assert_eq!(queue_for_shard(ks, usize::from(k)), queue_for_shard(s, usize::from(k)), "s={s} k={k}");
                assert_eq!(key_shard(s, None), s);
            }
        }
    }

    #[test]
    fn noted_counts_are_found_and_others_are_not() {
        let t = PeerQueues::new();
        let a = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2));
        let b = IpAddr::V6(Ipv6Addr::new(0xfd00, 0x7b, 0, 0, 0, 0, 0, 2));
        assert_eq!(t.queues(a), None);
        t.note(a, 1);
        t.note(b, 4);
        assert_eq!(t.queues(a), Some(1));
        assert_eq!(t.queues(b), Some(4));
        t.note(a, 2);
        assert_eq!(t.queues(a), Some(2));
        // not stated, or impossible: ignored
        t.note(a, 0);
        t.note(a, 17);
        assert_eq!(t.queues(a), Some(2));
        // v4 and its v4-mapped v6 form are one address; other addresses miss
        assert_eq!(t.queues(IpAddr::V6(Ipv4Addr::new(198, 18, 0, 2).to_ipv6_mapped())), Some(2));
        let misses = (3..=250u8).filter(|i| t.queues(IpAddr::V4(Ipv4Addr::new(198, 18, 0, *i))).is_some()).count();
        assert_eq!(misses, 0);
    }

    #[test]
    fn a_lab_worth_of_addresses_mostly_fits() {
        let t = PeerQueues::new();
        let addrs: Vec<IpAddr> = (1..=600u32).map(|i| IpAddr::V4(Ipv4Addr::from(0xC612_0000 + i))).collect();
        for a in &addrs {
            t.note(*a, 1);
        }
        let found = addrs.iter().filter(|a| t.queues(**a) == Some(1)).count();
        // 600 addresses in 1024 slots: collisions overwrite some, never answer wrongly.
        assert!(found > 400, "{found}");
    }
}
