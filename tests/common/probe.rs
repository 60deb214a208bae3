//! A fake IEEE 802.15.4 probe on a pseudo-terminal (`tunbus::sys::tty::openpty`): the
//! test plays the probe on the master side; programs open the terminal side through a
//! stable name, a symlink like `/dev/serial/by-id/usb-…-if00` (under a temporary folder),
//! as they would a USB probe. [`FakeProbe::unplug`] removes the name and closes the
//! pseudo-terminal (the program's open side then reads `EIO`), [`FakeProbe::replug`] makes
//! a new one (another `/dev/pts/N`) under the same name. The folder is removed on drop.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tunbus::codec::slip::{self, Decoder, Framing};
use tunbus::sys::{self, tty::Pty, Interest};

pub struct FakeProbe {
    pty: Option<Pty>,
    dir: PathBuf,
    link: PathBuf,
    /// Decodes what the program writes to the probe.
    decoder: Decoder,
}

impl FakeProbe {
    /// A probe, plugged in.
    pub fn new() -> FakeProbe {
        let dir = std::env::temp_dir().join(super::unique("tbprobe"));
        std::fs::create_dir_all(dir.join("by-id")).expect("probe folder");
        let link = dir.join("by-id/usb-tunbus_fake_802154_probe-if00");
        let mut probe = FakeProbe { pty: None, dir, link, decoder: Decoder::new(Framing::Delimited, 4096) };
        probe.replug();
        probe
    }

    /// The stable name programs open.
    pub fn path(&self) -> &Path {
        &self.link
    }

    /// The pseudo-terminal the name points at now (`/dev/pts/N`).
    pub fn tty(&self) -> Option<&Path> {
        self.pty.as_ref().map(|p| p.path.as_path())
    }

    /// Plugs a new pseudo-terminal in under the same name.
    pub fn replug(&mut self) {
        assert!(self.pty.is_none(), "already plugged in");
        let pty = sys::tty::openpty(true).expect("a pseudo-terminal");
        let _ = std::fs::remove_file(&self.link);
        std::os::unix::fs::symlink(&pty.path, &self.link).expect("probe symlink");
        self.decoder.reset();
        self.pty = Some(pty);
    }

    /// Removes the name and closes the pseudo-terminal: gone, as a pulled USB plug.
    pub fn unplug(&mut self) {
        let _ = std::fs::remove_file(&self.link);
        self.pty = None;
    }

    fn pty(&self) -> &Pty {
        self.pty.as_ref().expect("the probe is plugged in")
    }

    /// Sends raw bytes down the line, whole.
    pub fn send_raw(&self, mut bytes: &[u8]) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !bytes.is_empty() {
            match sys::tty::write(self.pty().master.as_fd(), bytes).expect("write to the probe's line") {
                Some(n) => bytes = &bytes[n..],
                None => {
                    assert!(Instant::now() < deadline, "the line took nothing for 5 s");
                    let _ = sys::wait_fd(self.pty().master.as_fd(), Interest::Write, Duration::from_millis(10));
                }
            }
        }
    }

    /// Sends frames as a probe does: each SLIP-encoded with a leading END.
    pub fn send(&self, frames: &[&[u8]]) {
        let mut line = Vec::new();
        for f in frames {
            slip::encode(f, &mut line);
        }
        self.send_raw(&line);
    }

    /// Bytes the program wrote to the probe, until `done(bytes so far)` or `timeout`.
    pub fn recv_raw(&mut self, timeout: Duration, mut done: impl FnMut(&[u8]) -> bool) -> Vec<u8> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !done(&got) {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            let master = self.pty().master.as_fd();
            if !sys::wait_fd(master, Interest::Read, left.min(Duration::from_millis(50))).expect("poll the probe") {
                continue;
            }
            match sys::read(master, &mut buf) {
                Ok(Some(n)) => got.extend_from_slice(&buf[..n]),
                Ok(None) => {}
                // EIO: nobody has the terminal side open right now.
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        got
    }

    /// Reads and discards what the program wrote, for up to `wait`; returns how many bytes.
    pub fn discard(&self, wait: Duration) -> usize {
        let master = self.pty().master.as_fd();
        let mut buf = [0u8; 4096];
        let mut n = 0;
        if sys::wait_fd(master, Interest::Read, wait).unwrap_or(false) {
            while let Ok(Some(got)) = sys::read(master, &mut buf) {
                if got == 0 {
                    break;
                }
                n += got;
            }
        }
        n
    }

    /// The next `n` frames the program wrote (fewer if `timeout` passes first).
    pub fn recv_frames(&mut self, n: usize, timeout: Duration) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        let deadline = Instant::now() + timeout;
        while frames.len() < n {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            let raw = self.recv_raw(left, |b| !b.is_empty());
            self.decoder.decode_all(&raw, |f| frames.push(f.to_vec()));
        }
        frames
    }

    /// What the probe's decoder has seen of the program's writes.
    pub fn decode_stats(&self) -> slip::DecodeStats {
        self.decoder.stats()
    }
}

impl Drop for FakeProbe {
    fn drop(&mut self) {
        self.pty = None;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
