//! RX: one delivered batch → packets written into one TUN queue. Hot path.
//!
//! Runs inside the consumer task of `amqp::link` for queue k and writes only to TUN queue k,
//! so a flow (one shard, one queue) keeps its order end to end. The frame is decoded in
//! place: packets are slices of the delivery body, nothing is copied before the `writev`.
//! A body that does not decode is counted as malformed and dropped whole; a packet whose
//! virtio header lies is counted and skipped; the rest of the batch still goes through.

use crate::codec::{ioppytest, v1};
use crate::metrics::{Counters, DropReason, LocalHistogram};
use crate::tun::{vnet, TunQueue};

/// Writes the one packet of an ioppytest JSON body into `tun`, decoding into `scratch`
/// (reused: no allocation once it has grown to the largest packet).
pub fn deliver_json(body: &[u8], tun: &TunQueue, counters: &Counters, scratch: &mut Vec<u8>) -> u64 {
    if ioppytest::decode_packet(body, scratch).is_err() {
        counters.record_drop(DropReason::Malformed, 1);
        return 0;
    }
    Counters::add(&counters.rx_batches, 1);
    match tun.write(&vnet::PLAIN, scratch) {
        Ok(()) => {
            Counters::add(&counters.rx_packets, 1);
            Counters::add(&counters.rx_bytes, scratch.len() as u64);
            1
        }
        Err(_) => {
            counters.record_drop(DropReason::TunWrite, 1);
            0
        }
    }
}

/// Writes every packet of `body` into `tun`. Returns the number of packets written.
pub fn deliver(body: &[u8], tun: &TunQueue, counters: &Counters, latency: &mut LocalHistogram, now_ns: u64) -> u64 {
    let frame = match v1::decode(body) {
        Ok(f) => f,
        Err(_) => {
            counters.record_drop(DropReason::Malformed, 1);
            return 0;
        }
    };
    let mut written = 0u64;
    let mut bytes = 0u64;
    let mut bad_vnet = 0u64;
    let mut refused = 0u64;
    for p in frame.packets() {
        let hdr = match p.vnet {
            Some(h) => match vnet::fix_for_write(h, p.data) {
                Ok(h) => h,
                Err(_) => {
                    bad_vnet += 1;
                    continue;
                }
            },
            None => vnet::PLAIN,
        };
        match tun.write(&hdr, p.data) {
            Ok(()) => {
                written += 1;
                bytes += p.data.len() as u64;
            }
            Err(_) => refused += 1,
        }
    }
    counters.record_drop(DropReason::BadVnet, bad_vnet);
    counters.record_drop(DropReason::TunWrite, refused);
    Counters::add(&counters.rx_packets, written);
    Counters::add(&counters.rx_bytes, bytes);
    Counters::add(&counters.rx_batches, 1);
    let sent = frame.header().timestamp_ns;
    if written > 0 && sent > 0 {
        latency.record_n(now_ns.saturating_sub(sent) / 1000, written);
    }
    written
}
