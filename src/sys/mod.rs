//! Every call into the operating system that Rust's standard library does not wrap: the
//! TUN ioctls, `read`/`writev` on a TUN queue, `ppoll` over several descriptors, a
//! socket's unsent bytes, `setns`, and the open-files limit; terminals (serial probes,
//! pseudo-terminals) in [`tty`]. OS glue, the one module allowed `unsafe`.
//!
//! Why `unsafe` is allowed here: these are `ioctl(2)`, `ppoll(2)`, `setns(2)` and
//! `setrlimit(2)` on C structs, and the hot path needs `read(2)` and `writev(2)` on a raw
//! fd without extra copies. Each block says which invariant makes it sound. Everything
//! above this module is safe code; `tun`, `amqp` and `worker` call these wrappers. Called
//! by whichever thread needs them (queue workers per burst, set-up code once); nothing here
//! keeps state.
#![allow(unsafe_code)]

pub mod tty;

#[cfg(target_os = "linux")]
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

// ---------------------------------------------------------------------------------------
// Waiting on descriptors.

/// What to wait for on one descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interest {
    Read,
    Write,
    ReadWrite,
}

/// What `ppoll` reported for one descriptor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ready {
    pub read: bool,
    pub write: bool,
    /// An error or hang-up: the next read or write says which.
    pub error: bool,
}

impl Ready {
    /// Anything at all happened on the descriptor.
    pub fn any(self) -> bool {
        self.read || self.write || self.error
    }
}

/// Blocks until one of `fds` is ready for its interest (absent entries are ignored), or
/// `timeout` passes; an interrupted wait counts as a timeout. Returns what each saw.
pub fn wait<const N: usize>(fds: [Option<(BorrowedFd<'_>, Interest)>; N], timeout: Duration) -> io::Result<[Ready; N]> {
    let mut pfds = [libc::pollfd { fd: -1, events: 0, revents: 0 }; N];
    for (p, f) in pfds.iter_mut().zip(&fds) {
        if let Some((fd, interest)) = f {
            p.fd = fd.as_raw_fd();
            p.events = match interest {
                Interest::Read => libc::POLLIN,
                Interest::Write => libc::POLLOUT,
                Interest::ReadWrite => libc::POLLIN | libc::POLLOUT,
            };
        }
    }
    let ts = libc::timespec { tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t, tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32) };
    // SAFETY: pfds is a live, writable array of pollfd and we pass its length; ts is a live
    // timespec; a null signal mask means "leave the mask as it is".
    let rc = unsafe { libc::ppoll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, &ts, std::ptr::null()) };
    let mut out = [Ready::default(); N];
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(out);
        }
        return Err(err);
    }
    for (o, p) in out.iter_mut().zip(&pfds) {
        o.read = p.revents & libc::POLLIN != 0;
        o.write = p.revents & libc::POLLOUT != 0;
        o.error = p.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0;
    }
    Ok(out)
}

/// Blocks until `fd` is ready for `interest` (or has an error or hang-up), or `timeout`
/// passes. Returns whether anything happened.
pub fn wait_fd(fd: BorrowedFd<'_>, interest: Interest, timeout: Duration) -> io::Result<bool> {
    Ok(wait([Some((fd, interest))], timeout)?[0].any())
}

// ---------------------------------------------------------------------------------------
// Sockets.

/// The effective user id of this process (0: root).
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
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

// ---------------------------------------------------------------------------------------
// TUN devices.

/// What a Linux-only call answers elsewhere (the userspace path needs none of them).
#[cfg(not(target_os = "linux"))]
fn linux_only(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, format!("{what} needs Linux; on this system use agent connect --userspace"))
}

/// `TUNSETIFF` elsewhere: no kernel TUN of Linux's kind.
#[cfg(not(target_os = "linux"))]
pub fn tun_set_iff(_fd: BorrowedFd<'_>, _name: &str, _flags: libc::c_int) -> io::Result<()> {
    Err(linux_only("a kernel TUN interface"))
}

/// `TUNSETOFFLOAD` elsewhere.
#[cfg(not(target_os = "linux"))]
pub fn tun_set_offload(_fd: BorrowedFd<'_>, _flags: libc::c_uint) -> io::Result<()> {
    Err(linux_only("a kernel TUN interface"))
}

/// `setns` elsewhere: no network namespaces.
#[cfg(not(target_os = "linux"))]
pub fn enter_netns(_ns: BorrowedFd<'_>) -> io::Result<()> {
    Err(linux_only("a network namespace"))
}

/// `TUNSETIFF` on an open `/dev/net/tun` descriptor: attaches it as one queue of the
/// interface `name` with `flags` (`IFF_TUN | …`). `name` must be a valid interface name.
#[cfg(target_os = "linux")]
pub fn tun_set_iff(fd: BorrowedFd<'_>, name: &str, flags: libc::c_int) -> io::Result<()> {
    let cname = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    if cname.as_bytes().len() >= libc::IFNAMSIZ {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: ifreq is a plain C struct of integers, arrays and a union of such; all-zero
    // bytes are a valid value of every field.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(cname.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    // The name fits (checked above), so the last byte of ifr_name stays NUL.
    req.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: fd is an open /dev/net/tun descriptor; TUNSETIFF reads and writes one
    // `struct ifreq`, and `req` is a live, properly aligned ifreq for the whole call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut libc::ifreq) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `TUNSETOFFLOAD`: which offloads (`TUN_F_*`) the kernel may hand us.
#[cfg(target_os = "linux")]
pub fn tun_set_offload(fd: BorrowedFd<'_>, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned long of flags), no pointer.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETOFFLOAD, flags as libc::c_ulong) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `read(2)` into `buf`; `Ok(None)` when nothing is there (non-blocking fd) or the call
/// was interrupted.
#[inline]
pub fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Option<usize>> {
    // SAFETY: buf is a valid, writable region of buf.len() bytes for the whole call, and
    // the kernel writes at most that many bytes.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        let err = io::Error::last_os_error();
        return match err.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
            _ => Err(err),
        };
    }
    Ok(Some(n as usize))
}

/// `writev(2)` of two slices (a header and a packet) as one write.
#[inline]
pub fn write2(fd: BorrowedFd<'_>, head: &[u8], body: &[u8]) -> io::Result<usize> {
    let iov = [
        libc::iovec { iov_base: head.as_ptr() as *mut libc::c_void, iov_len: head.len() },
        libc::iovec { iov_base: body.as_ptr() as *mut libc::c_void, iov_len: body.len() },
    ];
    // SAFETY: both iovecs point at live, initialised slices for the duration of the call;
    // writev only reads from them.
    let n = unsafe { libc::writev(fd.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

// ---------------------------------------------------------------------------------------
// Namespaces and limits.

/// Moves the calling thread into the network namespace of the open namespace file `ns`
/// (`/run/netns/NAME`). Only this thread changes namespace (`setns(2)`): callers run it on
/// a short-lived thread of their own.
#[cfg(target_os = "linux")]
pub fn enter_netns(ns: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: setns(2) on an open descriptor; it changes the network namespace of the
    // calling thread only and touches no memory of ours.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a short-lived thread inside namespace `netns` (`/run/netns/NAME`; `None`:
/// here, on this thread), for what only a thread in the namespace sees (`/proc/sys/net`,
/// `/proc/thread-self/net`; a file opened there keeps that namespace).
pub fn in_netns<T: Send>(netns: Option<&str>, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    let Some(ns) = netns else { return f() };
    let ns_file = std::fs::File::open(std::path::Path::new("/run/netns").join(ns))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            use std::os::fd::AsFd;
            enter_netns(ns_file.as_fd())?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other(format!("the thread in namespace {ns} panicked"))))
    })
}

/// Whether this process runs as root (effective user id 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid(2) takes no arguments, touches no memory and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Raises this process's soft limit of open files towards its hard limit (at most `want`)
/// and returns the soft limit now in force. A lab of hundreds of agents holds a TUN queue
/// and a socket per queue of each.
pub fn raise_fd_limit(want: u64) -> io::Result<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit through the pointer, which points at a live one.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // rlim_t is u64 on Linux, i64 on the BSDs (where the cast is not a no-op).
    #[allow(clippy::unnecessary_cast)]
    let (cur, max) = (lim.rlim_cur as u64, lim.rlim_max as u64);
    let target = want.min(max);
    if cur >= target {
        return Ok(cur);
    }
    #[allow(clippy::unnecessary_cast)]
    let new = libc::rlimit { rlim_cur: target as libc::rlim_t, rlim_max: lim.rlim_max };
    // SAFETY: setrlimit only reads the rlimit behind the pointer, which is live.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn wait_sees_readable_and_writable_and_times_out() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let r = wait([Some((b.as_fd(), Interest::Read)), None], Duration::from_millis(10)).unwrap();
        assert!(!r[0].any() && !r[1].any());
        a.write_all(b"x").unwrap();
        let r = wait([Some((b.as_fd(), Interest::ReadWrite))], Duration::from_secs(1)).unwrap();
        assert!(r[0].read && r[0].write && !r[0].error);
        assert!(wait_fd(a.as_fd(), Interest::Write, Duration::from_secs(1)).unwrap());
    }

    #[test]
    fn read_of_an_empty_nonblocking_fd_is_none() {
        let (_a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(read(b.as_fd(), &mut buf).unwrap(), None);
    }
}
