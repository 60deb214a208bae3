//! An IEEE 802.15.4 serial probe as a [`Port`] ([`Layer::Ieee802154`]): a terminal device
//! (`/dev/ttyUSB0`, a `/dev/serial/by-id/…` name, a pseudo-terminal) opened raw and
//! non-blocking at a baud rate, carrying one radio frame per SLIP frame
//! ([`crate::codec::slip`]).
//!
//! Owns the device's descriptor, the SLIP decoder of what it reads, the queue of encoded
//! frames it has not taken yet, and the probe's counters ([`SerialCounters`]). Runs on its
//! queue worker's thread; `read` and `write` are on the hot path and allocate nothing
//! (buffers are made in the constructor).
//!
//! - [`Port::read`] hands out one decoded frame: the plain 10-byte virtio header (zeros)
//!   and the frame's bytes. Malformed SLIP is counted by reason and dropped.
//! - [`Port::write`] SLIP-encodes a frame (with a leading END) and writes it; what the
//!   device cannot take at once waits in a bounded queue ([`OUT_FRAMES`] frames), retried
//!   from [`Port::poll`] when the device is writable ([`Port::wants_write`]) or after
//!   2 ms; a frame that finds the queue full is dropped as `lost_busy`.
//! - **A probe that comes and goes.** A read or write error (`EIO` from a pseudo-terminal
//!   whose other side closed, `ENXIO`, `ENODEV` from an unplugged USB adapter), an end of
//!   file or a hang-up closes the device, counts an outage and logs one line. From then on
//!   [`Port::poll_at`] asks for a [`Port::poll`] every [`REOPEN_EVERY`], which opens the
//!   path again: a symlink is resolved anew at each attempt, so a `/dev/serial/by-id` name
//!   finds the probe under whatever `ttyUSBn` it came back as. Frames the worker writes
//!   meanwhile are counted as `lost_unplugged`, never an error: nothing here ends the
//!   worker. The first frame after a reopen may be cut (the decoder waits for an END).
//!
//! - **A simulated radio** (`pty`, `agent serial --pty PATH`, `agent lab --radio`): the port
//!   makes a pseudo-terminal and links its terminal side at the configured path, for any
//!   program written for a serial probe (a stack's host build, a test harness, `socat`)
//!   to open as its probe and speak SLIP on; the port plays the device on the master side. It keeps the terminal side open itself, so the program
//!   may come and go without the port seeing a hang-up; the link is removed on drop.
//!
//! The worker must ask for [`Port::fd`] before each wait (it changes across a reopen, and
//! is `None` while the probe is away) and call [`Port::read`] when the descriptor reports
//! an error or hang-up, too: that is where the port notices it.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Layer, Port};
use crate::codec::slip::{self, DecodeStats, Decoder, Framing};
use crate::codec::v1::VNET_HDR_LEN;
use crate::codec::vnet;
use crate::sys;

/// How often a missing probe is looked for.
pub const REOPEN_EVERY: Duration = Duration::from_millis(250);
/// Frames that may wait for the device to take them (at 460800 baud a maximal frame
/// takes 5.6 ms on the line; 32 of them are 180 ms of backlog).
pub const OUT_FRAMES: usize = 32;
/// Bytes read from the device per `read(2)`.
const READ_CHUNK: usize = 4096;
/// How soon to try again a write the device would not take.
const WRITE_RETRY: Duration = Duration::from_millis(2);

/// What to open and how to read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SerialConfig {
    /// The device path (a symlink is followed at each open).
    pub device: PathBuf,
    /// Line speed, e.g. 460800 (ioppytest's probes).
    pub baud: u32,
    /// How the probe separates frames ([`Framing::Delimited`] for ioppytest's probes).
    pub framing: Framing,
    /// The longest frame accepted from the probe or written to it.
    pub max_frame: usize,
    /// Make a pseudo-terminal and link it at `device` instead of opening a device there (a
    /// simulated radio; see the module header).
    pub pty: bool,
}

impl SerialConfig {
    /// `device` at `baud`, delimited framing, frames up to [`slip::DEFAULT_MAX_FRAME`].
    pub fn new(device: impl Into<PathBuf>, baud: u32) -> SerialConfig {
        SerialConfig { device: device.into(), baud, framing: Framing::Delimited, max_frame: slip::DEFAULT_MAX_FRAME, pty: false }
    }

    /// Checks what can be checked without the device.
    pub fn check(&self) -> Result<(), Error> {
        if sys::tty::speed(self.baud).is_none() {
            return Err(Error::Baud { baud: self.baud });
        }
        if !(slip::MAX_PSDU..=u16::MAX as usize).contains(&self.max_frame) {
            return Err(Error::MaxFrame { max_frame: self.max_frame });
        }
        Ok(())
    }
}

/// Why a serial port could not be made.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The system cannot set this line speed.
    #[error("baud rate {baud} is not one this system can set (460800, 115200, 921600, …)")]
    Baud { baud: u32 },
    /// The maximum frame is below a PSDU or absurd.
    #[error("maximum frame of {max_frame} bytes: it must be 127 (an 802.15.4 PSDU) to 65535")]
    MaxFrame { max_frame: usize },
    /// The device did not open (with [`SerialPort::open`]; [`SerialPort::waiting`] waits).
    #[error("opening serial device {}: {source}", device.display())]
    Open { device: PathBuf, source: io::Error },
}

/// A probe's counters: relaxed atomics the port writes and anyone may read.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct SerialCounters {
    /// Frames read from the probe and handed to the worker, and their bytes.
    pub frames_in: AtomicU64,
    pub bytes_in: AtomicU64,
    /// Frames the device took whole, and their bytes (unescaped).
    pub frames_out: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Malformed SLIP from the probe, by reason (see [`slip::Malformed`]); `too_long` also
    /// counts a frame that would not fit the worker's buffer.
    pub bad_escape: AtomicU64,
    pub too_long: AtomicU64,
    pub noise: AtomicU64,
    /// Empty frames (END END): not an error.
    pub empty: AtomicU64,
    /// Frames to write that were lost because the probe was away (written meanwhile, or
    /// waiting in the queue when it went).
    pub lost_unplugged: AtomicU64,
    /// Frames to write dropped because the device's queue was full.
    pub lost_busy: AtomicU64,
    /// Frames from the bus that no probe can send (empty, or over the maximum).
    pub refused_out: AtomicU64,
    /// Times the probe went away, and times it was opened again.
    pub outages: AtomicU64,
    pub reopens: AtomicU64,
    /// A simulated radio's medium ([`super::medium::Medium`]): frames from senders it has
    /// no link with, frames its links' emulation lost, frames held for a link's delay.
    pub unheard: AtomicU64,
    pub lost_on_link: AtomicU64,
    pub delayed: AtomicU64,
    /// Whether the device is open now.
    pub connected: AtomicBool,
}

/// A copy of [`SerialCounters`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SerialStats {
    pub frames_in: u64,
    pub bytes_in: u64,
    pub frames_out: u64,
    pub bytes_out: u64,
    pub bad_escape: u64,
    pub too_long: u64,
    pub noise: u64,
    pub empty: u64,
    pub lost_unplugged: u64,
    pub lost_busy: u64,
    pub refused_out: u64,
    pub outages: u64,
    pub reopens: u64,
    pub unheard: u64,
    pub lost_on_link: u64,
    pub delayed: u64,
    pub connected: bool,
}

impl SerialStats {
    /// All malformed input dropped.
    pub fn malformed(&self) -> u64 {
        self.bad_escape + self.too_long + self.noise
    }
}

impl SerialCounters {
    /// The counters now.
    pub fn snapshot(&self) -> SerialStats {
        SerialStats {
            frames_in: self.frames_in.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            frames_out: self.frames_out.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            bad_escape: self.bad_escape.load(Relaxed),
            too_long: self.too_long.load(Relaxed),
            noise: self.noise.load(Relaxed),
            empty: self.empty.load(Relaxed),
            lost_unplugged: self.lost_unplugged.load(Relaxed),
            lost_busy: self.lost_busy.load(Relaxed),
            refused_out: self.refused_out.load(Relaxed),
            outages: self.outages.load(Relaxed),
            reopens: self.reopens.load(Relaxed),
            unheard: self.unheard.load(Relaxed),
            lost_on_link: self.lost_on_link.load(Relaxed),
            delayed: self.delayed.load(Relaxed),
            connected: self.connected.load(Relaxed),
        }
    }
}

/// Frames waiting in the output: where each ends in the stream of bytes written since
/// the start, and its length. A fixed ring, no allocation.
#[derive(Debug)]
struct Pending {
    ends: [u64; OUT_FRAMES],
    lens: [u16; OUT_FRAMES],
    head: usize,
    len: usize,
}

impl Pending {
    fn new() -> Pending {
        Pending { ends: [0; OUT_FRAMES], lens: [0; OUT_FRAMES], head: 0, len: 0 }
    }

    fn is_full(&self) -> bool {
        self.len == OUT_FRAMES
    }

    fn push(&mut self, end: u64, len: u16) {
        let at = (self.head + self.len) % OUT_FRAMES;
        self.ends[at] = end;
        self.lens[at] = len;
        self.len += 1;
    }

    /// The oldest frame if it ends at or before `written`.
    fn pop_done(&mut self, written: u64) -> Option<u16> {
        if self.len == 0 || self.ends[self.head] > written {
            return None;
        }
        let len = self.lens[self.head];
        self.head = (self.head + 1) % OUT_FRAMES;
        self.len -= 1;
        Some(len)
    }

    fn clear(&mut self) -> usize {
        let n = self.len;
        self.len = 0;
        n
    }
}

/// The probe is away since `since`; `lost_before` is `lost_unplugged` when it went.
#[derive(Clone, Copy, Debug)]
struct Outage {
    since: Instant,
    lost_before: u64,
}

/// An 802.15.4 probe on a serial line (see the module header).
pub struct SerialPort {
    index: usize,
    cfg: SerialConfig,
    fd: Option<OwnedFd>,
    decoder: Decoder,
    /// Bytes read and not yet decoded: `raw[raw_at..raw_len]`.
    raw: Box<[u8]>,
    raw_at: usize,
    raw_len: usize,
    /// Encoded frames the device has not taken yet, and where each ends.
    out: Vec<u8>,
    out_cap: usize,
    pending: Pending,
    /// Bytes the device has taken since the start.
    written: u64,
    retry_write_at: Option<Instant>,
    /// While away: when to try again, and since when.
    next_open: Instant,
    outage: Option<Outage>,
    /// Frames that did not fit the caller's buffer (counted under `too_long`).
    no_room: u64,
    counters: Arc<SerialCounters>,
    /// A simulated radio's pseudo-terminal: its terminal side (held open) and where it is
    /// linked.
    pty: Option<PtyLink>,
}

/// The terminal side of a port's own pseudo-terminal, and the symlink that names it.
#[derive(Debug)]
struct PtyLink {
    _peer: OwnedFd,
    target: PathBuf,
    link: PathBuf,
}

impl Drop for PtyLink {
    fn drop(&mut self) {
        // Only our own link: another port may have taken the path since.
        if std::fs::read_link(&self.link).is_ok_and(|t| t == self.target) {
            let _ = std::fs::remove_file(&self.link);
        }
    }
}

impl SerialPort {
    /// Opens the probe now; an error when the device does not open.
    pub fn open(index: usize, cfg: SerialConfig) -> Result<SerialPort, Error> {
        let mut port = SerialPort::new(index, cfg)?;
        match port.open_device() {
            Ok(()) => Ok(port),
            Err(source) => Err(Error::Open { device: port.cfg.device, source }),
        }
    }

    /// Opens the probe if it is there, else waits for it: the port starts away and looks for
    /// the device every [`REOPEN_EVERY`] (logged once). Errors only on a bad configuration.
    pub fn waiting(index: usize, cfg: SerialConfig) -> Result<SerialPort, Error> {
        let mut port = SerialPort::new(index, cfg)?;
        if let Err(e) = port.open_device() {
            tracing::warn!(device = %port.cfg.device.display(), error = %e, "serial probe not there yet; looking for it every 250 ms");
            port.outage = Some(Outage { since: Instant::now(), lost_before: 0 });
            port.next_open = Instant::now() + REOPEN_EVERY;
        }
        Ok(port)
    }

    fn new(index: usize, cfg: SerialConfig) -> Result<SerialPort, Error> {
        cfg.check()?;
        let out_cap = OUT_FRAMES * slip::max_encoded_len(cfg.max_frame);
        Ok(SerialPort {
            index,
            decoder: Decoder::new(cfg.framing, cfg.max_frame),
            cfg,
            fd: None,
            raw: vec![0u8; READ_CHUNK].into_boxed_slice(),
            raw_at: 0,
            raw_len: 0,
            out: Vec::with_capacity(out_cap),
            out_cap,
            pending: Pending::new(),
            written: 0,
            retry_write_at: None,
            next_open: Instant::now(),
            outage: None,
            no_room: 0,
            counters: Arc::default(),
            pty: None,
        })
    }

    /// The probe's counters (shared: the worker, reports and tests read them).
    pub fn counters(&self) -> &Arc<SerialCounters> {
        &self.counters
    }

    /// The configuration it was made with.
    pub fn config(&self) -> &SerialConfig {
        &self.cfg
    }

    /// The device path, as configured.
    pub fn device(&self) -> &Path {
        &self.cfg.device
    }

    /// Whether the device is open now.
    pub fn is_open(&self) -> bool {
        self.fd.is_some()
    }

    /// Opens the path (resolving a symlink anew) and makes it the device; or, for a
    /// simulated radio, makes a pseudo-terminal and links it at the path.
    fn open_device(&mut self) -> io::Result<()> {
        let (fd, target) = if self.cfg.pty { self.make_pty()? } else { self.open_path()? };
        self.fd = Some(fd);
        self.decoder.reset();
        self.raw_at = 0;
        self.raw_len = 0;
        self.counters.connected.store(true, Relaxed);
        if let Some(outage) = self.outage.take() {
            self.counters.reopens.fetch_add(1, Relaxed);
            let lost = self.counters.lost_unplugged.load(Relaxed) - outage.lost_before;
            tracing::info!(device = %self.cfg.device.display(), target = %target.display(), away_ms = outage.since.elapsed().as_millis() as u64, lost, "serial probe back");
        }
        Ok(())
    }

    fn open_path(&self) -> io::Result<(OwnedFd, PathBuf)> {
        let target = std::fs::canonicalize(&self.cfg.device)?;
        Ok((sys::tty::open_serial(&target, self.cfg.baud)?, target))
    }

    /// A new pseudo-terminal linked at the configured path (a stale link there is replaced;
    /// anything else is not).
    fn make_pty(&mut self) -> io::Result<(OwnedFd, PathBuf)> {
        let link = &self.cfg.device;
        match std::fs::symlink_metadata(link) {
            Ok(m) if m.file_type().is_symlink() => std::fs::remove_file(link)?,
            Ok(_) => return Err(io::Error::new(io::ErrorKind::AlreadyExists, "something other than a link is there; give a free path")),
            Err(_) => {}
        }
        self.pty = None;
        let pty = sys::tty::openpty(true)?;
        std::os::unix::fs::symlink(&pty.path, link)?;
        self.pty = Some(PtyLink { _peer: pty.peer, target: pty.path.clone(), link: link.clone() });
        Ok((pty.master, pty.path))
    }

    /// The device failed or hung up: close it, count the outage, drop what waited for it,
    /// and look for it again from [`REOPEN_EVERY`] on.
    fn lose(&mut self, what: &'static str, error: Option<&io::Error>) {
        self.fd = None;
        self.raw_at = 0;
        self.raw_len = 0;
        let waiting = self.pending.clear() as u64;
        self.out.clear();
        self.retry_write_at = None;
        let c = &self.counters;
        c.connected.store(false, Relaxed);
        c.outages.fetch_add(1, Relaxed);
        let lost_before = c.lost_unplugged.fetch_add(waiting, Relaxed);
        let now = Instant::now();
        self.outage = Some(Outage { since: now, lost_before });
        self.next_open = now + REOPEN_EVERY;
        match error {
            Some(e) => {
                tracing::warn!(device = %self.cfg.device.display(), error = %e, what, "serial probe gone; reopening every 250 ms")
            }
            None => {
                tracing::warn!(device = %self.cfg.device.display(), what, "serial probe gone; reopening every 250 ms")
            }
        }
    }

    /// Writes what waits for the device, until it would block.
    fn flush(&mut self) {
        while !self.out.is_empty() {
            let Some(fd) = self.fd.as_ref() else { return };
            match sys::tty::write(fd.as_fd(), &self.out) {
                Ok(Some(n)) if n > 0 => {
                    self.out.drain(..n.min(self.out.len()));
                    self.written += n as u64;
                    while let Some(len) = self.pending.pop_done(self.written) {
                        self.counters.frames_out.fetch_add(1, Relaxed);
                        self.counters.bytes_out.fetch_add(u64::from(len), Relaxed);
                    }
                }
                Ok(_) => {
                    self.retry_write_at = Some(Instant::now() + WRITE_RETRY);
                    return;
                }
                Err(e) => {
                    self.lose("write", Some(&e));
                    return;
                }
            }
        }
        self.retry_write_at = None;
    }

    /// Copies the decoder's totals into the counters.
    fn sync_decoder(&self) {
        let DecodeStats { bad_escape, too_long, noise, empty, .. } = self.decoder.stats();
        let c = &self.counters;
        c.bad_escape.store(bad_escape, Relaxed);
        c.too_long.store(too_long + self.no_room, Relaxed);
        c.noise.store(noise, Relaxed);
        c.empty.store(empty, Relaxed);
    }
}

impl Port for SerialPort {
    fn layer(&self) -> Layer {
        Layer::Ieee802154
    }

    fn index(&self) -> usize {
        self.index
    }

    fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(|fd| fd.as_fd())
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            while self.raw_at < self.raw_len {
                let (used, frame) = self.decoder.decode(&self.raw[self.raw_at..self.raw_len]);
                self.raw_at += used;
                let Some(frame) = frame else { continue };
                let len = VNET_HDR_LEN + frame.len();
                let Some(dst) = buf.get_mut(..len) else {
                    self.no_room += 1;
                    continue;
                };
                dst[..VNET_HDR_LEN].copy_from_slice(&vnet::PLAIN);
                dst[VNET_HDR_LEN..].copy_from_slice(frame);
                self.counters.frames_in.fetch_add(1, Relaxed);
                self.counters.bytes_in.fetch_add(frame.len() as u64, Relaxed);
                self.sync_decoder();
                return Ok(Some(len));
            }
            self.sync_decoder();
            let Some(fd) = self.fd.as_ref() else {
                return Ok(None);
            };
            match sys::read(fd.as_fd(), &mut self.raw) {
                Ok(Some(0)) => {
                    self.lose("end of file", None);
                    return Ok(None);
                }
                Ok(Some(n)) => {
                    self.raw_at = 0;
                    self.raw_len = n;
                }
                Ok(None) => {
                    // Nothing to read. A hang-up that read(2) does not report shows in poll.
                    let hung_up = sys::wait([Some((fd.as_fd(), sys::Interest::Read))], Duration::ZERO).map(|[r]| r.error && !r.read);
                    match hung_up {
                        Ok(true) => self.lose("hang-up", None),
                        Ok(false) => {}
                        Err(e) => self.lose("poll", Some(&e)),
                    }
                    return Ok(None);
                }
                Err(e) => {
                    self.lose("read", Some(&e));
                    return Ok(None);
                }
            }
        }
    }

    fn write(&mut self, _vnet_hdr: &[u8; VNET_HDR_LEN], unit: &[u8]) -> io::Result<()> {
        let c = &self.counters;
        if unit.is_empty() || unit.len() > self.cfg.max_frame {
            c.refused_out.fetch_add(1, Relaxed);
            return Ok(());
        }
        if self.fd.is_none() {
            c.lost_unplugged.fetch_add(1, Relaxed);
            return Ok(());
        }
        if self.pending.is_full() || self.out.len() + slip::encoded_len(unit) > self.out_cap {
            c.lost_busy.fetch_add(1, Relaxed);
            return Ok(());
        }
        slip::encode(unit, &mut self.out);
        // max_frame ≤ u16::MAX (SerialConfig::check).
        self.pending.push(self.written + self.out.len() as u64, unit.len() as u16);
        self.flush();
        Ok(())
    }

    fn poll_at(&self) -> Option<Instant> {
        let reopen = self.fd.is_none().then_some(self.next_open);
        match (reopen, self.retry_write_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn poll(&mut self, now: Instant) -> bool {
        if self.fd.is_none() {
            if now < self.next_open {
                return false;
            }
            if self.open_device().is_err() {
                self.next_open = now + REOPEN_EVERY;
                return false;
            }
            return true;
        }
        // Due, or woken by the device being writable (`wants_write`): take what it will.
        if !self.out.is_empty() {
            self.flush();
        }
        false
    }

    fn wants_write(&self) -> bool {
        self.fd.is_some() && !self.out.is_empty()
    }
}

impl std::fmt::Debug for SerialPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialPort").field("index", &self.index).field("device", &self.cfg.device).field("open", &self.fd.is_some()).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_ring_pops_in_order_when_written() {
        let mut p = Pending::new();
        for i in 0..OUT_FRAMES as u64 {
            assert!(!p.is_full());
            p.push(10 * (i + 1), i as u16);
        }
        assert!(p.is_full());
        assert_eq!(p.pop_done(9), None);
        assert_eq!(p.pop_done(25), Some(0));
        assert_eq!(p.pop_done(25), Some(1));
        assert_eq!(p.pop_done(25), None);
        p.push(1000, 77);
        assert_eq!(p.clear(), OUT_FRAMES - 1);
        assert_eq!(p.pop_done(u64::MAX), None);
    }

    #[test]
    fn configuration_is_checked_before_any_device() {
        assert!(matches!(SerialConfig::new("/dev/null", 12_345).check(), Err(Error::Baud { baud: 12_345 })));
        let mut cfg = SerialConfig::new("/dev/null", 460_800);
        cfg.max_frame = 100;
        assert!(matches!(cfg.check(), Err(Error::MaxFrame { .. })));
        assert!(matches!(SerialPort::open(0, SerialConfig::new("/nonexistent/probe", 460_800)), Err(Error::Open { .. })));
        let port = SerialPort::waiting(0, SerialConfig::new("/nonexistent/probe", 460_800)).unwrap();
        assert!(!port.is_open() && port.poll_at().is_some());
        assert_eq!(port.layer(), Layer::Ieee802154);
    }
}
