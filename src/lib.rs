//! tunbus: IP packets between hosts over a RabbitMQ message bus.
//!
//! Module map (see `docs/architecture.md` for the data path in both directions):
//! - [`cli`]: command line → [`config::AgentConfig`]; nothing below sees clap types.
//! - [`agent`]: one agent's life cycle: TUN, workers, links, presence, reports.
//! - [`tun`]: the multi-queue TUN device with offloads and its configuration (OS glue; the
//!   only module allowed `unsafe`).
//! - [`codec`]: wire format v1 and the ioppytest JSON form. Pure.
//! - [`route`]: destination → routing key, flow hash, shard → queue. Pure.
//! - [`worker`]: the per-queue TX and RX threads (hot path): TUN → batch → broker socket,
//!   and broker socket → TUN.
//! - [`amqp`]: our AMQP framing and blocking data connections, link set-up and reconnect;
//!   presence; lapin for control connections.
//! - [`metrics`]: counters, latency histograms, reports.
//! - [`interop`]: the ioppytest wire, its control messages, and `agent route`.
//! - [`lab`]: `agent lab`, many hosts (namespaces + in-process agents) on one machine.
#![deny(unsafe_code)]

pub mod agent;
pub mod amqp;
pub mod cli;
pub mod codec;
pub mod config;
pub mod interop;
pub mod lab;
pub mod metrics;
pub mod route;
pub mod tun;
pub mod worker;
