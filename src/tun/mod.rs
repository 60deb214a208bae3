//! The multi-queue TUN device: OS glue, and the one module where `unsafe` lives.
//!
//! [`TunDevice::create`] opens `/dev/net/tun` once per queue with `IFF_TUN | IFF_NO_PI |
//! IFF_MULTI_QUEUE | IFF_VNET_HDR`, then enables checksum and segmentation offloads with
//! `TUNSETOFFLOAD` so that the kernel hands us whole TCP (and, where it can, UDP)
//! super-packets of up to 64 KiB, each preceded by a 10-byte `virtio_net_hdr` ([`vnet`]).
//! Every queue file descriptor is non-blocking; queue k is read and written by queue
//! worker k (plain syscalls on one fd).
//!
//! Why `unsafe` is allowed here: the TUN API is `ioctl(2)` on a C struct, and the hot path
//! needs `read(2)`, `writev(2)` and `poll(2)` on a raw fd without extra copies. Each block
//! says which invariant makes it sound. The device disappears when the last queue fd is
//! closed (it is never made persistent), so nothing outlives the agent.
#![allow(unsafe_code)]

pub mod netns;
pub mod vnet;

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

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
const OFFLOADS_BASE: libc::c_uint = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
const OFFLOADS_USO: libc::c_uint = libc::TUN_F_USO4 | libc::TUN_F_USO6;

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
}

/// The device: its name (as created; it may be renamed when moved to a namespace) and queues.
#[derive(Debug)]
pub struct TunDevice {
    pub name: String,
    pub queues: Vec<TunQueue>,
    pub offloads: Offloads,
}

/// Checks an interface name the way the kernel will (IFNAMSIZ - 1 bytes, no separators).
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name.bytes().any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
}

impl TunDevice {
    /// Creates interface `name` with `queues` queues. `offload` false keeps the vnet header
    /// (so the wire is the same) but never asks the kernel for super-packets.
    pub fn create(name: &str, queues: usize, offload: bool) -> Result<TunDevice, Error> {
        if !valid_ifname(name) {
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
            set_iff(&fd, name).map_err(|source| Error::SetIff {
                name: name.to_owned(),
                queue: index,
                source,
            })?;
            opened.push(TunQueue { fd, index });
        }
        let offloads = if offload {
            let first = &opened[0]; // invariant: the loop above ran at least once
            match set_offload(&first.fd, OFFLOADS_BASE | OFFLOADS_USO) {
                Ok(()) => Offloads { tso: true, uso: true },
                Err(_) => {
                    set_offload(&first.fd, OFFLOADS_BASE)
                        .map_err(|source| Error::Offload { name: name.to_owned(), source })?;
                    Offloads { tso: true, uso: false }
                }
            }
        } else {
            Offloads { tso: false, uso: false }
        };
        Ok(TunDevice { name: name.to_owned(), queues: opened, offloads })
    }
}

fn ifreq_for(name: &str, flags: libc::c_int) -> io::Result<libc::ifreq> {
    let cname = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: ifreq is a plain C struct of integers, arrays and a union of such; all-zero
    // bytes are a valid value of every field.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(cname.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    // The name fits: valid_ifname checked len < IFNAMSIZ, so the last byte stays NUL.
    req.ifr_ifru.ifru_flags = flags as libc::c_short;
    Ok(req)
}

fn set_iff(fd: &OwnedFd, name: &str) -> io::Result<()> {
    let flags = libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_MULTI_QUEUE | libc::IFF_VNET_HDR;
    let mut req = ifreq_for(name, flags)?;
    // SAFETY: fd is an open /dev/net/tun descriptor; TUNSETIFF reads and writes one
    // `struct ifreq`, and `req` is a live, properly aligned ifreq for the whole call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut libc::ifreq) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_offload(fd: &OwnedFd, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned long of flags), no pointer.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETOFFLOAD, flags as libc::c_ulong) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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
        // SAFETY: buf is a valid, writable region of buf.len() bytes for the whole call, and
        // the kernel writes at most that many bytes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock => Ok(None),
                io::ErrorKind::Interrupted => Ok(None),
                _ => Err(err),
            };
        }
        Ok(Some(n as usize))
    }

    /// Writes one packet: its 10-byte vnet header and its bytes, in one `writev`.
    #[inline]
    pub fn write(&self, vnet_hdr: &[u8; vnet::HDR_LEN], packet: &[u8]) -> io::Result<()> {
        let iov = [
            libc::iovec { iov_base: vnet_hdr.as_ptr() as *mut libc::c_void, iov_len: vnet_hdr.len() },
            libc::iovec { iov_base: packet.as_ptr() as *mut libc::c_void, iov_len: packet.len() },
        ];
        // SAFETY: both iovecs point at live, initialised slices for the duration of the call;
        // writev only reads from them.
        let n = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Blocks until the queue has a packet or `timeout` passes.
    pub fn wait_readable(&self, timeout: Duration) -> io::Result<Readiness> {
        let (tun, _) = self.wait_readable_or(None, timeout)?;
        Ok(if tun { Readiness::Readable } else { Readiness::TimedOut })
    }

    /// Blocks until the queue has a packet, `other` (a broker socket) has bytes or an error,
    /// or `timeout` passes. Returns (queue readable, other readable).
    pub fn wait_readable_or(&self, other: Option<BorrowedFd<'_>>, timeout: Duration) -> io::Result<(bool, bool)> {
        let mut pfds = [
            libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: other.map_or(-1, |f| f.as_raw_fd()), events: libc::POLLIN, revents: 0 },
        ];
        let n = poll(&mut pfds, timeout)?;
        if n == 0 {
            return Ok((false, false));
        }
        if pfds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            return Err(io::Error::other("TUN queue reported an error or hang-up"));
        }
        Ok((pfds[0].revents & libc::POLLIN != 0, pfds[1].revents != 0))
    }
}

/// What to wait for on a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interest {
    Read,
    Write,
}

/// Blocks until `fd` is ready for `interest` (or has an error or hang-up, which the next
/// read or write reports), or `timeout` passes. Returns whether it is ready. Lives here with
/// the other raw `poll(2)` so that `unsafe` stays in one module.
pub fn wait_fd(fd: BorrowedFd<'_>, interest: Interest, timeout: Duration) -> io::Result<bool> {
    let events = match interest {
        Interest::Read => libc::POLLIN,
        Interest::Write => libc::POLLOUT,
    };
    let mut pfds = [libc::pollfd { fd: fd.as_raw_fd(), events, revents: 0 }];
    Ok(poll(&mut pfds, timeout)? > 0)
}

/// Raises this process's soft limit of open files towards its hard limit (at most `want`)
/// and returns the soft limit now in force. Each agent holds a TUN queue fd and three
/// sockets per queue, so a lab of hundreds of hosts needs more than the usual 1024.
pub fn raise_fd_limit(want: u64) -> io::Result<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit through the pointer, which points at a live one.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let target = want.min(lim.rlim_max);
    if lim.rlim_cur >= target {
        return Ok(lim.rlim_cur);
    }
    let new = libc::rlimit { rlim_cur: target, rlim_max: lim.rlim_max };
    // SAFETY: setrlimit only reads the rlimit behind the pointer, which is live.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(target)
}

/// Bytes written to the TCP socket `fd` that its peer has not acknowledged yet
/// (`SIOCOUTQ`): how far behind the broker is in reading what we sent.
pub fn unsent_bytes(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (= TIOCOUTQ) writes one c_int through the pointer, which points at a
    // live, writable c_int for the duration of the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

/// `ppoll(2)` on `pfds` (entries with fd -1 are ignored). An interrupted wait counts as a
/// timeout.
fn poll(pfds: &mut [libc::pollfd], timeout: Duration) -> io::Result<usize> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: pfds is a live, writable slice of pollfd and we pass its length; ts is a live
    // timespec; a null signal mask means "leave the mask as it is".
    let rc = unsafe { libc::ppoll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, &ts, std::ptr::null()) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(err);
    }
    Ok(rc as usize)
}
