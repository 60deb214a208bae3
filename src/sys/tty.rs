//! Terminals: opening a serial device in raw mode at a baud rate (termios), plain
//! `write(2)`, and pseudo-terminals for probes that tests and simulated radios drive.
//!
//! Why `unsafe` is allowed here (as in all of `sys`): `open(2)`, `tcgetattr`/`tcsetattr`,
//! `cfmakeraw`, `cfsetispeed`/`cfsetospeed`, `posix_openpt`/`grantpt`/`unlockpt`/`ptsname_r`
//! and `write(2)` take C structs and raw pointers. Each block says which invariant makes it
//! sound. POSIX calls only (`ptsname_r` on Linux, `ptsname` elsewhere); the baud-rate table
//! beyond POSIX's 38400 is Linux's `B*` constants, and on the BSDs and macOS `speed_t` is
//! the rate itself. Called by the serial port on its worker's thread (open and reopen: not
//! the hot path; [`write`]: per frame) and by tests.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The `speed_t` for `baud`, when the platform has one.
pub fn speed(baud: u32) -> Option<libc::speed_t> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let s = match baud {
            1200 => libc::B1200,
            2400 => libc::B2400,
            4800 => libc::B4800,
            9600 => libc::B9600,
            19_200 => libc::B19200,
            38_400 => libc::B38400,
            57_600 => libc::B57600,
            115_200 => libc::B115200,
            230_400 => libc::B230400,
            460_800 => libc::B460800,
            500_000 => libc::B500000,
            576_000 => libc::B576000,
            921_600 => libc::B921600,
            1_000_000 => libc::B1000000,
            1_152_000 => libc::B1152000,
            1_500_000 => libc::B1500000,
            2_000_000 => libc::B2000000,
            2_500_000 => libc::B2500000,
            3_000_000 => libc::B3000000,
            3_500_000 => libc::B3500000,
            4_000_000 => libc::B4000000,
            _ => return None,
        };
        Some(s)
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        // BSD termios: the speed is the rate in bits per second.
        (baud > 0).then_some(baud as libc::speed_t)
    }
}

fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Puts the terminal `fd` in raw mode (`cfmakeraw`: no echo, no line editing, no
/// translation of CR/NL, 8 bits, no parity), ignoring modem lines (`CLOCAL`), reading
/// enabled, at `speed` both ways when given.
pub fn set_raw(fd: BorrowedFd<'_>, speed: Option<libc::speed_t>) -> io::Result<()> {
    // SAFETY: termios is a plain C struct of integers and arrays; all-zero is a valid value,
    // and tcgetattr overwrites it entirely.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd is an open descriptor for the whole call; `t` is a live, writable termios.
    if unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: cfmakeraw only rewrites fields of the termios behind the pointer, which is live.
    #[allow(clippy::let_unit_value)]
    let _ = unsafe { libc::cfmakeraw(&mut t) };
    t.c_cflag |= libc::CLOCAL | libc::CREAD;
    t.c_cc[libc::VMIN] = 1;
    t.c_cc[libc::VTIME] = 0;
    if let Some(s) = speed {
        // SAFETY: as for cfmakeraw: they set the speed fields of a live termios.
        let rc = unsafe { libc::cfsetispeed(&mut t, s) | libc::cfsetospeed(&mut t, s) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: fd is open; tcsetattr only reads the live termios behind the pointer.
    if unsafe { libc::tcsetattr(fd.as_raw_fd(), libc::TCSANOW, &t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens the serial device at `path` (a symlink such as `/dev/serial/by-id/…` is followed)
/// for reading and writing, non-blocking, not as our controlling terminal, close-on-exec,
/// and sets it raw at `baud`. `ENOTTY` when the path is not a terminal; `EINVAL` when the
/// platform has no such rate.
pub fn open_serial(path: &Path, baud: u32) -> io::Result<OwnedFd> {
    let speed = speed(baud).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    let c = cpath(path)?;
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_CLOEXEC;
    // SAFETY: `c` is a NUL-terminated path that lives for the call; open reads it only.
    let raw = unsafe { libc::open(c.as_ptr(), flags) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: open returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: isatty only inspects the open descriptor.
    if unsafe { libc::isatty(fd.as_raw_fd()) } != 1 {
        return Err(io::Error::from_raw_os_error(libc::ENOTTY));
    }
    set_raw(fd.as_fd(), Some(speed))?;
    Ok(fd)
}

/// `write(2)` of `buf`; `Ok(None)` when the descriptor would block or the call was
/// interrupted (nothing was written).
#[inline]
pub fn write(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<Option<usize>> {
    // SAFETY: buf is a live, initialised slice of buf.len() bytes; write only reads it.
    let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
    if n < 0 {
        let err = io::Error::last_os_error();
        return match err.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
            _ => Err(err),
        };
    }
    Ok(Some(n as usize))
}

/// A pseudo-terminal: the side a program opens as its serial device (`path`, e.g.
/// `/dev/pts/7`, held open here by `peer` so that it exists until the `Pty` is dropped),
/// and the `master` side that plays the device. Both raw.
#[derive(Debug)]
pub struct Pty {
    /// The device's side: what a probe would send is written here, what the program
    /// writes to `path` is read here.
    pub master: OwnedFd,
    /// The terminal side, opened once so that its settings hold and its node stays.
    pub peer: OwnedFd,
    /// Where programs open the terminal side.
    pub path: PathBuf,
}

/// Opens a new pseudo-terminal, both sides raw, the master non-blocking when `nonblocking`.
pub fn openpty(nonblocking: bool) -> io::Result<Pty> {
    let mut flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    if nonblocking {
        flags |= libc::O_NONBLOCK;
    }
    // SAFETY: posix_openpt takes flags only and returns a new descriptor or -1.
    let raw = unsafe { libc::posix_openpt(flags) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    let master = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: grantpt acts on the open master descriptor only.
    if unsafe { libc::grantpt(master.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as grantpt.
    if unsafe { libc::unlockpt(master.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let path = peer_name(master.as_fd())?;
    let c = cpath(&path)?;
    // SAFETY: `c` is a NUL-terminated path that lives for the call.
    let raw = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    let peer = unsafe { OwnedFd::from_raw_fd(raw) };
    set_raw(peer.as_fd(), None)?;
    Ok(Pty { master, peer, path })
}

/// The path of the terminal side of the master `fd`.
fn peer_name(fd: BorrowedFd<'_>) -> io::Result<PathBuf> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let mut buf = [0 as libc::c_char; 128];
        // SAFETY: buf is live and writable for its whole length, which we pass; ptsname_r
        // writes a NUL-terminated name into it or fails.
        let rc = unsafe { libc::ptsname_r(fd.as_raw_fd(), buf.as_mut_ptr(), buf.len()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        // SAFETY: on success buf holds a NUL-terminated string within its length.
        let name = unsafe { CStr::from_ptr(buf.as_ptr()) };
        Ok(PathBuf::from(std::ffi::OsStr::from_bytes(name.to_bytes())))
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        // SAFETY: ptsname returns a pointer to a static NUL-terminated buffer (or null) that
        // stays valid until the next ptsname call; we copy it out at once. Not thread-safe:
        // tests and set-up only.
        let p = unsafe { libc::ptsname(fd.as_raw_fd()) };
        if p.is_null() {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: non-null, NUL-terminated, see above.
        let name = unsafe { CStr::from_ptr(p) };
        Ok(PathBuf::from(std::ffi::OsStr::from_bytes(name.to_bytes())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pty_carries_bytes_raw_both_ways() {
        let pty = openpty(true).unwrap();
        assert!(pty.path.starts_with("/dev/pts") || pty.path.starts_with("/dev/tty"), "{}", pty.path.display());
        let dev = open_serial(&pty.path, 460_800).unwrap();
        // Every byte value, CR and NL and ^C included, arrives untouched, no echo.
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(write(pty.master.as_fd(), &all).unwrap(), Some(256));
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        for _ in 0..100 {
            if let Some(n) = super::super::read(dev.as_fd(), &mut buf).unwrap() {
                got.extend_from_slice(&buf[..n]);
            }
            if got.len() >= 256 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(got, all);
        assert_eq!(write(dev.as_fd(), &[0x0d, 0x0a, 0xc0]).unwrap(), Some(3));
        std::thread::sleep(std::time::Duration::from_millis(20));
        let n = super::super::read(pty.master.as_fd(), &mut buf).unwrap();
        assert_eq!(n.map(|n| &buf[..n]), Some(&[0x0d, 0x0a, 0xc0][..]), "no echo, no translation");
    }

    #[test]
    fn opening_what_is_not_a_terminal_or_a_rate_that_does_not_exist_fails() {
        assert_eq!(open_serial(Path::new("/dev/null"), 460_800).unwrap_err().raw_os_error(), Some(libc::ENOTTY));
        assert_eq!(open_serial(Path::new("/nonexistent/tty"), 460_800).unwrap_err().kind(), io::ErrorKind::NotFound);
        let pty = openpty(true).unwrap();
        assert_eq!(open_serial(&pty.path, 12_345).unwrap_err().raw_os_error(), Some(libc::EINVAL));
        assert!(speed(9600).is_some() && speed(460_800).is_some() && speed(0).is_none());
    }
}
