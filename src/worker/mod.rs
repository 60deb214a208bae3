//! The per-queue glue between the TUN and the bus.
//!
//! [`queue`]: one OS thread per TUN queue k, owning TUN queue k and link k (one AMQP
//! connection, both directions): reads bursts, classifies, batches and publishes; and,
//! through [`rx::Receiver`], reads deliveries from the same connection and writes their
//! packets into TUN queue k.

pub mod queue;
pub mod rx;

use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock nanoseconds since the UNIX epoch (the batch timestamp; a vDSO call, no syscall).
#[inline]
pub fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}
