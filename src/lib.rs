//! tunbus: IP packets between hosts over a RabbitMQ message bus.
//!
//! Module map (see `docs/architecture.md` for the data path in both directions):
//! - [`cli`]: command line → [`config::AgentConfig`]; nothing below sees clap types.
//! - [`capture`]: `agent capture` (the bus of a session into one pcapng), `--pcap`, and
//!   ioppytest's sniffer role.
//! - [`config`]: one agent's configuration, built from checked parts (bus, interface, data
//!   path, identity, ioppytest); nothing can change it after the checks.
//! - [`agent`]: one agent's life cycle: join the bus, TUN, workers, presence, reports.
//! - [`doctor`]: `agent doctor`, what a start needs, checked in order, with the fixes.
//! - [`emulate`]: link emulation on egress (tc-netem's words, seeded decisions, the delay
//!   line).
//! - [`exit`]: exit codes, one per class of failure.
//! - [`tun`]: the multi-queue TUN device with offloads and its configuration.
//! - [`sys`]: every call into the OS the standard library does not wrap (the only module
//!   allowed `unsafe`).
//! - [`packet`]: one checked view per header (IPv4, IPv6 and its extension headers, TCP,
//!   UDP, ICMP, Ethernet with 802.1Q tags and MAC addresses), the Internet checksum, and
//!   the prefix type with its arithmetic; every parser below reads headers through it.
//!   Pure, and a leaf: it imports nothing else of tunbus.
//! - [`codec`]: wire format v1, the virtio header and the ioppytest JSON form. Pure.
//! - [`route`]: the key grammar (keys, patterns, exchanges, parsing them back), packet
//!   classification (destination, flow hash, shard → queue). Pure.
//! - [`worker`]: one thread per queue (hot path): TUN → batch → broker socket, and broker
//!   socket → TUN, on one connection; each wire (native, ioppytest) is a type; links with
//!   reconnection; the batcher itself is pure.
//! - [`amqp`]: our AMQP client: URLs, framing and the session state machine (pure), TLS
//!   and TCP transport, presence, `agent ping`.
//! - [`metrics`]: counters, latency histograms, reports.
//! - [`port`]: the host end of a queue worker (TUN, userspace stack, TAP, serial probe)
//!   behind one small interface.
//! - [`interop`]: the ioppytest wire, its control messages, and `agent route`.
//! - [`lab`]: `agent lab`, many hosts (namespaces + in-process agents) on one machine.
//! - [`e2e`]: end-to-end encryption (`--e2e`): static keys, the Noise IK handshake over
//!   the bus, sealed batches, replay windows; the broker carries only ciphertext.
//! - [`identity`]: who may send from which address (strict peers file, first claim). Pure.
//! - [`status`]: `agent status`, the local control socket of a running agent.
//! - [`provision`]: `agent provision`, a session's vhost, users and permissions.
//! - [`util`]: the clock, the stop flag, the fixed hashes, the seeded generator, base64.
//! - `fuzzing`: the bodies of the fuzz targets, replayed by `tests/corpus.rs` (hidden).
#![deny(unsafe_code)]

pub mod agent;
pub mod amqp;
pub mod capture;
pub mod cli;
pub mod codec;
pub mod config;
pub mod doctor;
pub mod e2e;
pub mod emulate;
pub mod exit;
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
pub mod interop;
pub mod lab;
pub mod metrics;
pub mod packet;
pub mod port;
pub mod provision;
pub mod route;
pub mod status;
pub mod sys;
pub mod tun;
pub mod util;
pub mod worker;
