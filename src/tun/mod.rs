//! The multi-queue TUN device.
//!
//! [`TunDevice::create`] opens `/dev/net/tun` once per queue with `IFF_TUN | IFF_NO_PI |
//! IFF_MULTI_QUEUE | IFF_VNET_HDR`, then enables checksum and segmentation offloads with
//! `TUNSETOFFLOAD` so that the kernel hands us whole TCP (and, where it can, UDP)
//! super-packets of up to 64 KiB, each preceded by a 10-byte `virtio_net_hdr`
//! (`codec::vnet`). Every queue file descriptor is non-blocking; queue k is read and
//! written by queue worker k only. The system calls themselves are in [`crate::sys`]; this
//! module is safe code. The device disappears when the last queue fd is closed (it is
//! never made persistent), so nothing outlives the agent.
//!
//! [`TunDevice::create_tap`] makes the same device with `IFF_TAP` instead (an L2 session,
//! `agent connect --l2`): its queues carry Ethernet frames, with the same offloads (the
//! virtio header's checksum offsets then count from the frame's first byte).

pub mod netns;

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use crate::codec::vnet;
use crate::sys::{self, Interest};

/// Errors while setting up the device. Per-packet I/O errors are plain `io::Error`s that the
/// callers count; they never end the agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("interface name {0:?} is not valid (1 to 15 characters, no '/', ':' or white space)")]
    BadName(String),
    #[error("opening /dev/net/tun for queue {queue} failed (is the tun module loaded and are you root?)")]
    Open { queue: usize, source: io::Error },
    #[error("TUNSETIFF {name} for queue {queue} failed (does a non-TUN interface of that name exist?)")]
    SetIff { name: String, queue: usize, source: io::Error },
    #[error("enabling offloads on {name} failed")]
    Offload { name: String, source: io::Error },
}

/// Offload flags we ask for; USO is tried first and dropped on kernels without it.
#[cfg(target_os = "linux")]
const OFFLOADS_BASE: libc::c_uint = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
#[cfg(target_os = "linux")]
const OFFLOADS_USO: libc::c_uint = libc::TUN_F_USO4 | libc::TUN_F_USO6;
// Elsewhere no kernel TUN opens (`set_iff` says so): nothing to ask for.
#[cfg(not(target_os = "linux"))]
const OFFLOADS_BASE: libc::c_uint = 0;
#[cfg(not(target_os = "linux"))]
const OFFLOADS_USO: libc::c_uint = 0;

/// What the kernel granted on this device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offloads {
    pub tso: bool,
    pub uso: bool,
}

/// One queue of the device: a non-blocking fd.
#[derive(Debug)]
pub struct TunQueue {
    fd: OwnedFd,
    index: usize,
    /// IP packets (TUN) or Ethernet frames (TAP).
    layer: crate::port::Layer,
}

/// The device: its name (as created; it may be renamed when moved to a namespace) and queues.
#[derive(Debug)]
pub struct TunDevice {
    pub name: String,
    pub queues: Vec<TunQueue>,
    pub offloads: Offloads,
}

impl TunDevice {
    /// Creates interface `name` with `queues` queues. `offload` false keeps the vnet header
    /// (so the wire is the same) but never asks the kernel for super-packets.
    pub fn create(name: &str, queues: usize, offload: bool) -> Result<TunDevice, Error> {
        Self::open(name, queues, offload, crate::port::Layer::Ip)
    }

    /// Creates TAP interface `name` with `queues` queues: Ethernet frames, the same
    /// offloads as [`TunDevice::create`].
    pub fn create_tap(name: &str, queues: usize, offload: bool) -> Result<TunDevice, Error> {
        Self::open(name, queues, offload, crate::port::Layer::Ethernet)
    }

    fn open(name: &str, queues: usize, offload: bool, layer: crate::port::Layer) -> Result<TunDevice, Error> {
        if !crate::config::valid_ifname(name) {
            return Err(Error::BadName(name.to_owned()));
        }
        let mut opened = Vec::with_capacity(queues);
        for index in 0..queues.max(1) {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open("/dev/net/tun")
                .map_err(|source| Error::Open { queue: index, source })?;
            let fd = OwnedFd::from(file);
            set_iff(&fd, name, layer).map_err(|source| Error::SetIff { name: name.to_owned(), queue: index, source })?;
            opened.push(TunQueue { fd, index, layer });
        }
        let offloads = if offload {
            let first = &opened[0]; // invariant: the loop above ran at least once
            match set_offload(&first.fd, OFFLOADS_BASE | OFFLOADS_USO) {
                Ok(()) => Offloads { tso: true, uso: true },
                Err(_) => {
                    set_offload(&first.fd, OFFLOADS_BASE).map_err(|source| Error::Offload { name: name.to_owned(), source })?;
                    Offloads { tso: true, uso: false }
                }
            }
        } else {
            Offloads { tso: false, uso: false }
        };
        Ok(TunDevice { name: name.to_owned(), queues: opened, offloads })
    }
}

#[cfg(not(target_os = "linux"))]
fn set_iff(fd: &OwnedFd, name: &str, _layer: crate::port::Layer) -> io::Result<()> {
    sys::tun_set_iff(fd.as_fd(), name, 0)
}

#[cfg(target_os = "linux")]
fn set_iff(fd: &OwnedFd, name: &str, layer: crate::port::Layer) -> io::Result<()> {
    let kind = if layer == crate::port::Layer::Ethernet { libc::IFF_TAP } else { libc::IFF_TUN };
    let flags = kind | libc::IFF_NO_PI | libc::IFF_MULTI_QUEUE | libc::IFF_VNET_HDR;
    sys::tun_set_iff(fd.as_fd(), name, flags)
}

fn set_offload(fd: &OwnedFd, flags: libc::c_uint) -> io::Result<()> {
    sys::tun_set_offload(fd.as_fd(), flags)
}

/// What [`TunQueue::wait_readable`] saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readiness {
    Readable,
    TimedOut,
}

impl TunQueue {
    pub fn index(&self) -> usize {
        self.index
    }

    /// Reads one packet (with its vnet header) into `buf`. `Ok(None)` when the queue is empty.
    #[inline]
    pub fn read(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        sys::read(self.fd.as_fd(), buf)
    }

    /// Writes one packet: its 10-byte vnet header and its bytes, in one `writev`.
    #[inline]
    pub fn write(&self, vnet_hdr: &[u8; vnet::HDR_LEN], packet: &[u8]) -> io::Result<()> {
        sys::write2(self.fd.as_fd(), vnet_hdr, packet).map(drop)
    }

    /// The queue's descriptor, for waiting on it together with a socket.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Blocks until the queue has a packet or `timeout` passes.
    pub fn wait_readable(&self, timeout: Duration) -> io::Result<Readiness> {
        let [r] = sys::wait([Some((self.fd(), Interest::Read))], timeout)?;
        if r.error {
            return Err(io::Error::other("TUN queue reported an error or hang-up"));
        }
        Ok(if r.read { Readiness::Readable } else { Readiness::TimedOut })
    }
}

impl crate::port::Port for TunQueue {
    fn layer(&self) -> crate::port::Layer {
        self.layer
    }

    fn index(&self) -> usize {
        self.index
    }

    fn fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.fd.as_fd())
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        TunQueue::read(self, buf)
    }

    fn write(&mut self, vnet_hdr: &[u8; vnet::HDR_LEN], unit: &[u8]) -> io::Result<()> {
        TunQueue::write(self, vnet_hdr, unit)
    }
}
