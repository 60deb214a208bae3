//! Destination → routing key, flow hash, shard → queue.
//!
//! The broker does the routing (DESIGN.md, "Routing"): a sender publishes each batch with a
//! key naming the destination address and a flow shard, `tunbus.v1.<dst>.<shard>`, or
//! `tunbus.v1.all.<sender>` for broadcast and multicast; a receiver with K queues binds
//! shard `s` of each of its addresses to queue `s mod K`, so a flow keeps one queue and
//! its order.
//!
//! [`key`] is the grammar of keys, patterns and exchange names; [`packet`] classifies
//! packets (destination, flow hash, shard) through the checked views of
//! [`crate::packet`]; [`peers`] keeps receivers' queue counts; [`table`] the prefixes gateways advertise. `key` and `packet` are
//! re-exported here, and so is the interface prefix ([`Prefix`], `ADDR/LEN`, which lives in
//! `crate::packet::prefix`).
//!
//! Pure and allocation-free: the per-queue worker threads call [`classify`] for every
//! packet read from the TUN and build a [`RoutingKey`] (on the stack) per batch. Nothing
//! here panics on any input; the flow hash is fixed (no random seed) so every host and
//! every run agree on it.

pub mod key;
pub mod mac;
pub mod name;
pub mod packet;
pub mod peers;
pub mod table;

pub use crate::packet::Prefix;
pub use key::*;
pub use name::{AgentName, NameError};
pub use packet::*;
