//! The host end of a queue worker: a **port**. Everything between the port and the broker
//! (the worker's loop, the batcher, the codec, the wire, the AMQP connection) is the same
//! for every kind of endpoint; what differs is how a unit is read and written, what a unit
//! is ([`Layer`]), and therefore how its routing key and its sender are derived.
//!
//! Kinds (each a module of its own, chosen once when the worker is built, never an
//! `if mode` in the worker's loops):
//! - the kernel's multi-queue TUN ([`crate::tun::TunQueue`]): IP packets, Linux only;
//! - a userspace TCP/IP stack inside the agent: IP packets, no privileges, any OS;
//! - a TAP device: Ethernet frames;
//! - an 802.15.4 serial probe: SLIP-framed radio frames ([`serial::SerialPort`]), or a
//!   simulated radio on a pseudo-terminal, heard through its medium ([`medium::Medium`]).
//!
//! A unit crosses the seam as it crosses the wire: a 10-byte `virtio_net_hdr`
//! ([`crate::codec::vnet`]) followed by the unit's bytes. Ports without offloads write
//! and expect the plain header (all zeros). Runs on the worker's thread; hot path.

pub mod medium;
pub mod serial;

use std::io;
use std::os::fd::BorrowedFd;
use std::time::Instant;

use crate::codec::v1::VNET_HDR_LEN;

pub mod userspace;

/// What a port's units are: decides how the worker classifies them (routing key, flow
/// shard) and how a receiver checks who sent them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Layer {
    /// IPv4 and IPv6 packets (TUN, userspace stack).
    Ip,
    /// Ethernet frames (TAP).
    Ethernet,
    /// IEEE 802.15.4 frames (serial probes, simulated radios).
    Ieee802154,
}

impl Layer {
    /// The v1 frame flag that marks a batch of this layer's units (none for IP, so IP
    /// batches are what they always were; an older agent refuses the others as unknown
    /// flags rather than write a frame into its TUN).
    pub fn frame_flag(self) -> u8 {
        match self {
            Layer::Ip => 0,
            Layer::Ethernet => crate::codec::v1::FLAG_ETHERNET,
            Layer::Ieee802154 => crate::codec::v1::FLAG_IEEE802154,
        }
    }

    /// The layer a frame's flags name.
    pub fn of_frame_flags(flags: u8) -> Layer {
        if flags & crate::codec::v1::FLAG_ETHERNET != 0 {
            Layer::Ethernet
        } else if flags & crate::codec::v1::FLAG_IEEE802154 != 0 {
            Layer::Ieee802154
        } else {
            Layer::Ip
        }
    }
}

/// The host end of one queue worker. Owned by the worker's thread; every call is
/// non-blocking.
pub trait Port: Send {
    /// What this port's units are.
    fn layer(&self) -> Layer;

    /// The queue index of this port (the worker's index), for logs.
    fn index(&self) -> usize;

    /// A descriptor that is readable when [`Port::read`] may return a unit; `None` when the
    /// port has none (the worker then relies on [`Port::poll_at`]).
    fn fd(&self) -> Option<BorrowedFd<'_>>;

    /// Reads one unit into `buf`: its virtio header, then its bytes; returns the length of
    /// both. `Ok(None)` when nothing is waiting.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>>;

    /// Writes one unit that came off the bus, with the virtio header to give it.
    fn write(&mut self, vnet_hdr: &[u8; VNET_HDR_LEN], unit: &[u8]) -> io::Result<()>;

    /// When the port next needs [`Port::poll`] without any input (a stack's timers);
    /// `None`: only when its descriptor is readable.
    fn poll_at(&self) -> Option<Instant> {
        None
    }

    /// Runs what is due at `now` (timers, retransmissions, local sockets); returns whether
    /// units may now be waiting to be read.
    fn poll(&mut self, _now: Instant) -> bool {
        false
    }

    /// Whether the port holds output its device refused: the worker then also waits for the
    /// descriptor to be writable and calls [`Port::poll`] when it is (a serial line's
    /// backlog drains as fast as the device takes it, not at a timer's pace).
    fn wants_write(&self) -> bool {
        false
    }

    /// The units the worker writes next (until the next call) were sent by agent `sender`
    /// (`None`: not known). A radio's medium decides by it who hears them
    /// ([`medium::Medium`]); other ports ignore it.
    fn hearing_from(&mut self, _sender: Option<&str>) {}

    /// For a port that hosts several endpoints: the name of the one whose unit
    /// [`Port::read`] returned last (its floods go out under its name). `None`: the
    /// agent's own name.
    fn unit_sender(&self) -> Option<&str> {
        None
    }
}
