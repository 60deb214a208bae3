//! The per-queue glue between the TUN and the bus.
//!
//! [`queue`]: one OS thread per TUN queue k, owning TUN queue k and link k (one AMQP
//! connection, both directions): reads bursts, classifies, batches and publishes; and,
//! through [`rx::Receiver`], reads deliveries from the same connection and writes their
//! packets into TUN queue k. [`wire`]: how each wire (native v1, ioppytest JSON) publishes
//! a batch and reads a delivery.

pub mod aqm;
pub mod batch;
pub mod classify;
pub mod presence;
pub mod queue;
pub mod routes;
pub mod rx;
pub mod switch;
pub mod uplink;
pub mod window;
pub mod wire;
