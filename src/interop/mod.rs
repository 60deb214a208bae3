//! Interoperability with ioppytest testbeds: the old agent's wire, its control messages,
//! and a packet router that serves old and new agents at once.
//!
//! - [`addressing`] (pure): the old agent's address flags, defaults and `ip.tun.started`.
//! - [`topology`] (pure): which nodes share a link, from ioppytest's configuration YAML.
//! - [`control`]: for an agent with `--wire ioppytest`, the control messages
//!   (`ip.tun.started`, `testingtool.component.ready`, `ip.tun.start`). A tokio task.
//! - [`router`]: `agent route`, the packet router and old↔new bridge. A tokio task.
//!
//! The data path of an ioppytest-wire agent is the native one up to the finished batch;
//! its queue worker then publishes one JSON message per packet, and decodes JSON on the way
//! in (`worker::queue`, `worker::rx`).

pub mod addressing;
pub mod control;
pub mod router;
pub mod topology;

use lapin::types::ShortString;
use lapin::BasicProperties;

use crate::codec::ioppytest::{CONTENT_ENCODING, CONTENT_TYPE, DELIVERY_MODE};

/// The properties the Python agent sets on every message (its receivers accept only
/// `application/json`).
pub fn json_properties() -> BasicProperties {
    BasicProperties::default()
        .with_content_type(ShortString::from(CONTENT_TYPE))
        .with_content_encoding(ShortString::from(CONTENT_ENCODING))
        .with_delivery_mode(DELIVERY_MODE)
}
