//! The per-queue glue between the TUN and the bus.
//!
//! [`tx`]: one OS thread per TUN queue, pinned to a core: reads bursts, classifies, batches
//! into ring buffers. [`rx`]: decodes a delivered batch and writes its packets into the TUN
//! queue it belongs to; it runs inside the consumer task of `amqp::link`.

pub mod rx;
pub mod tx;

use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock nanoseconds since the UNIX epoch (the batch timestamp; a vDSO call, no syscall).
#[inline]
pub fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}
