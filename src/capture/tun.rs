//! `agent connect --pcap FILE`: what crosses this agent's TUN, both directions, in pcapng.
//!
//! Each TUN queue hands a copy of every packet it reads or writes to the [`Tap`] (stamped
//! then), which passes it to a writer thread through a bounded channel with `try_send`: a
//! worker never waits for the disk. When the writer falls behind, the packet is left out
//! of the file and counted. Super-packets are cut into wire-sized packets by the writer,
//! as `agent capture` does. Off (no `--pcap`), a queue has no tap: one branch per packet.
//! An L2 agent's TAP is written with the Ethernet link type; its super-frames are cut
//! into frames that each repeat the Ethernet header (and its tags).

use std::io::{self, Write};
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::pcapng::{Direction, Writer};
use crate::codec::segment::Segmenter;
use crate::codec::v1::VNET_HDR_LEN;
use crate::util::now_ns;

/// Packets waiting for the writer, at most.
pub const BACKLOG: usize = 16 * 1024;

/// One packet on its way to the file: when, which way, the virtio header and the bytes.
#[derive(Debug)]
struct Record {
    ns: u64,
    direction: Direction,
    entry: Vec<u8>,
}

/// The queues' side: hands packets to the writer, never waits.
#[derive(Debug)]
pub struct Tap {
    tx: SyncSender<Record>,
    left_out: Arc<AtomicU64>,
}

/// What the writer did, when it ends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Written {
    pub packets: u64,
    /// Packets the writer could not keep up with.
    pub left_out: u64,
    /// Why writing stopped early, if it did.
    pub error: Option<String>,
}

impl Tap {
    /// Creates `path` and starts its writer: one interface, `ifname` with `addrs`. The
    /// writer ends (and returns what it wrote) once the last [`Tap`] clone is dropped.
    /// `layer`: what the port carries (Ethernet frames get the Ethernet link type).
    pub fn start(path: &Path, ifname: &str, addrs: &[(IpAddr, u8)], layer: crate::port::Layer) -> io::Result<(Arc<Tap>, JoinHandle<Written>)> {
        let file = std::fs::File::create(path)?;
        let mut writer = Writer::new(io::BufWriter::with_capacity(1 << 20, file), concat!("tunbus ", env!("CARGO_PKG_VERSION"), " agent connect --pcap"))?;
        let ethernet = layer == crate::port::Layer::Ethernet;
        if ethernet {
            writer.add_interface_of(super::pcapng::LINKTYPE_ETHERNET, ifname, "tunbus agent TAP", addrs)?;
        } else {
            writer.add_interface(ifname, "tunbus agent TUN", addrs)?;
        }
        let (tx, rx) = mpsc::sync_channel(BACKLOG);
        let left_out = Arc::new(AtomicU64::new(0));
        let counted = left_out.clone();
        let handle = std::thread::Builder::new().name("pcap".into()).spawn(move || write_all(writer, rx, &counted, ethernet))?;
        Ok((Arc::new(Tap { tx, left_out }), handle))
    }

    /// A packet (virtio header and bytes) read from the TUN: the host sent it.
    #[inline]
    pub fn sent(&self, entry: &[u8]) {
        self.hand(Direction::Outbound, entry);
    }

    /// A packet written into the TUN: the host receives it.
    #[inline]
    pub fn received(&self, vnet: &[u8; VNET_HDR_LEN], packet: &[u8]) {
        let mut entry = Vec::with_capacity(VNET_HDR_LEN + packet.len());
        entry.extend_from_slice(vnet);
        entry.extend_from_slice(packet);
        self.send(Record { ns: now_ns(), direction: Direction::Inbound, entry });
    }

    fn hand(&self, direction: Direction, entry: &[u8]) {
        self.send(Record { ns: now_ns(), direction, entry: entry.to_vec() });
    }

    fn send(&self, r: Record) {
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.tx.try_send(r) {
            self.left_out.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn write_all<W: Write>(mut writer: Writer<W>, rx: Receiver<Record>, left_out: &AtomicU64, ethernet: bool) -> Written {
    let mut segmenter = Segmenter::new();
    let mut done = Written::default();
    for r in rx {
        let (Some(vnet), Some(packet)) = (r.entry.first_chunk::<VNET_HDR_LEN>(), r.entry.get(VNET_HDR_LEN..)) else { continue };
        let mut result = Ok(());
        let mut write = |p: &[u8]| {
            if result.is_ok() {
                result = writer.packet(0, r.ns, p, None, Some(r.direction));
                done.packets += 1;
            }
        };
        // A frame's IP packet is cut behind copies of its Ethernet header.
        let cut = if ethernet { segmenter.frame_segments(Some(vnet), packet, &mut write) } else { segmenter.segments(Some(vnet), packet, &mut write) };
        if cut.is_err() && result.is_ok() {
            result = writer.packet(0, r.ns, packet, None, Some(r.direction));
            done.packets += 1;
        }
        if let Err(e) = result {
            done.error = Some(e.to_string());
            break;
        }
    }
    if let Err(e) = writer.flush() {
        done.error.get_or_insert(e.to_string());
    }
    done.left_out = left_out.load(Ordering::Relaxed);
    done
}

/// A port whose units are copied to a [`Tap`] as they are read and written (`--pcap`),
/// whatever kind of port it wraps.
pub struct Tapped {
    inner: Box<dyn crate::port::Port>,
    tap: std::sync::Arc<Tap>,
}

impl Tapped {
    pub fn new(inner: Box<dyn crate::port::Port>, tap: std::sync::Arc<Tap>) -> Tapped {
        Tapped { inner, tap }
    }
}

impl crate::port::Port for Tapped {
    fn layer(&self) -> crate::port::Layer {
        self.inner.layer()
    }

    fn index(&self) -> usize {
        self.inner.index()
    }

    fn fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.inner.fd()
    }

    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        let n = self.inner.read(buf)?;
        if let Some(entry) = n.and_then(|n| buf.get(..n)) {
            self.tap.sent(entry);
        }
        Ok(n)
    }

    fn write(&mut self, vnet_hdr: &[u8; VNET_HDR_LEN], unit: &[u8]) -> std::io::Result<()> {
        self.inner.write(vnet_hdr, unit)?;
        self.tap.received(vnet_hdr, unit);
        Ok(())
    }

    fn poll_at(&self) -> Option<std::time::Instant> {
        self.inner.poll_at()
    }

    fn poll(&mut self, now: std::time::Instant) -> bool {
        self.inner.poll(now)
    }

    fn unit_sender(&self) -> Option<&str> {
        self.inner.unit_sender()
    }

    fn hearing_from(&mut self, sender: Option<&str>) {
        self.inner.hearing_from(sender);
    }
}
