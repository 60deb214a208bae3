//! Interoperability with ioppytest testbeds: the old agent's wire, its control messages,
//! and a packet router that serves old and new agents at once.
//!
//! - [`topology`] (pure): which nodes share a link, from ioppytest's configuration YAML.
//! - [`control`]: for an agent with `--wire ioppytest`, the control messages
//!   (`ip.tun.started`, `testingtool.component.ready`, `ip.tun.start`). A thread.
//! - [`router`]: `agent route`, the packet router and old↔new bridge: its decisions pure
//!   ([`router::state`]), its connection a thread.
//!
//! The data path of an ioppytest-wire agent is the native one up to the finished batch;
//! its queue worker then publishes one JSON message per packet, and decodes JSON on the way
//! in (`worker::queue`, `worker::rx`).

pub mod control;
pub mod router;
pub mod topology;
