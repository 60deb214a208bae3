//! The per-queue glue between the TUN and the bus.
//!
//! [`tx`]: one OS thread per TUN queue, pinned to a core: reads bursts, classifies, batches,
//! and publishes each batch on its own AMQP connection. [`rx`]: one OS thread per TUN queue
//! that consumes that queue's messages on its own connection and writes their packets into
//! the TUN queue they belong to.

pub mod rx;
pub mod tx;

use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock nanoseconds since the UNIX epoch (the batch timestamp; a vDSO call, no syscall).
#[inline]
pub fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}
