//! The capture file formats: pcapng (one section, interfaces, enhanced packet blocks with
//! comments and directions, nanosecond timestamps), classic libpcap (what ioppytest's
//! tools read), and a reader of what [`Writer`] writes, for tests and tools.
//!
//! Little-endian throughout, link type raw IP (the packet starts at its IPv4 or IPv6 header;
//! 101, and 12 after the first interface, see [`LINKTYPE_RAW_DLT`]), as the pcapng specification (draft-ietf-opsawg-pcapng) lays out the blocks:
//! type, total length, body padded to 32 bits, total length again.

use std::io::{self, Write};
use std::net::IpAddr;

use crate::packet::prefix::v4_netmask;

/// Raw IPv4/IPv6, no link header.
pub const LINKTYPE_RAW: u16 = 101;
/// Raw IP under its Linux DLT number, which libpcap and Wireshark also read as raw IP. The
/// interfaces after the first carry it: libpcap (1.10.3, Debian 12's tcpdump) compares
/// each later interface's type with the *converted* type of the first (101 → 12) and
/// refuses a file of several raw-IP interfaces that all say 101.
pub const LINKTYPE_RAW_DLT: u16 = 12;

/// Whether `linktype` is raw IP as these files write it.
pub fn is_raw_ip(linktype: u16) -> bool {
    linktype == LINKTYPE_RAW || linktype == LINKTYPE_RAW_DLT
}

const SHB: u32 = 0x0A0D_0D0A;
const IDB: u32 = 1;
const EPB: u32 = 6;
const BYTE_ORDER_MAGIC: u32 = 0x1A2B_3C4D;

const OPT_END: u16 = 0;
const OPT_COMMENT: u16 = 1;
const SHB_USERAPPL: u16 = 4;
const IF_NAME: u16 = 2;
const IF_DESCRIPTION: u16 = 3;
const IF_IPV4ADDR: u16 = 4;
const IF_IPV6ADDR: u16 = 5;
const IF_TSRESOL: u16 = 9;
const EPB_FLAGS: u16 = 2;

/// Which way a packet went, as seen from the interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    fn flags(self) -> u32 {
        match self {
            Direction::Inbound => 1,
            Direction::Outbound => 2,
        }
    }
}

/// Appends one option (code, length, value padded to 32 bits).
fn option(body: &mut Vec<u8>, code: u16, value: &[u8]) {
    let len = value.len().min(u16::MAX as usize);
    body.extend_from_slice(&code.to_le_bytes());
    body.extend_from_slice(&(len as u16).to_le_bytes());
    body.extend_from_slice(&value[..len]);
    pad(body);
}

fn pad(body: &mut Vec<u8>) {
    while !body.len().is_multiple_of(4) {
        body.push(0);
    }
}

/// A pcapng file being written.
pub struct Writer<W: Write> {
    out: W,
    interfaces: u32,
    block: Vec<u8>,
}

impl<W: Write> Writer<W> {
    /// Writes the section header, naming `app` as the writer.
    pub fn new(out: W, app: &str) -> io::Result<Writer<W>> {
        let mut w = Writer { out, interfaces: 0, block: Vec::new() };
        let mut body = Vec::new();
        body.extend_from_slice(&BYTE_ORDER_MAGIC.to_le_bytes());
        body.extend_from_slice(&1u16.to_le_bytes());
        body.extend_from_slice(&0u16.to_le_bytes());
        body.extend_from_slice(&(-1i64).to_le_bytes());
        option(&mut body, SHB_USERAPPL, app.as_bytes());
        option(&mut body, OPT_END, &[]);
        w.block(SHB, &body)?;
        Ok(w)
    }

    fn block(&mut self, kind: u32, body: &[u8]) -> io::Result<()> {
        let total = (12 + body.len()) as u32;
        self.block.clear();
        self.block.extend_from_slice(&kind.to_le_bytes());
        self.block.extend_from_slice(&total.to_le_bytes());
        self.block.extend_from_slice(body);
        self.block.extend_from_slice(&total.to_le_bytes());
        self.out.write_all(&self.block)
    }

    /// Adds an interface (raw IP, nanosecond timestamps) named `name` with `addrs`;
    /// returns its id (0, 1, … in order).
    pub fn add_interface(
        &mut self,
        name: &str,
        description: &str,
        addrs: &[(IpAddr, u8)],
    ) -> io::Result<u32> {
        let mut body = Vec::new();
        let linktype = if self.interfaces == 0 { LINKTYPE_RAW } else { LINKTYPE_RAW_DLT };
        body.extend_from_slice(&linktype.to_le_bytes());
        body.extend_from_slice(&0u16.to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes()); // snaplen: no limit
        option(&mut body, IF_NAME, name.as_bytes());
        option(&mut body, IF_DESCRIPTION, description.as_bytes());
        for (ip, len) in addrs {
            match ip {
                IpAddr::V4(a) => {
                    let mut v = a.octets().to_vec();
                    v.extend_from_slice(&v4_netmask(*len).octets());
                    option(&mut body, IF_IPV4ADDR, &v);
                }
                IpAddr::V6(a) => {
                    let mut v = a.octets().to_vec();
                    v.push((*len).min(128));
                    option(&mut body, IF_IPV6ADDR, &v);
                }
            }
        }
        option(&mut body, IF_TSRESOL, &[9]);
        option(&mut body, OPT_END, &[]);
        self.block(IDB, &body)?;
        self.interfaces += 1;
        Ok(self.interfaces - 1)
    }

    /// One packet on interface `iface`, at `timestamp_ns` since the UNIX epoch.
    pub fn packet(&mut self, iface: u32, timestamp_ns: u64, data: &[u8], comment: Option<&str>, direction: Option<Direction>) -> io::Result<()> {
        let mut body = Vec::with_capacity(28 + data.len() + 64);
        body.extend_from_slice(&iface.to_le_bytes());
        body.extend_from_slice(&((timestamp_ns >> 32) as u32).to_le_bytes());
        body.extend_from_slice(&(timestamp_ns as u32).to_le_bytes());
        let len = data.len() as u32;
        body.extend_from_slice(&len.to_le_bytes());
        body.extend_from_slice(&len.to_le_bytes());
        body.extend_from_slice(data);
        pad(&mut body);
        if let Some(c) = comment {
            option(&mut body, OPT_COMMENT, c.as_bytes());
        }
        if let Some(d) = direction {
            option(&mut body, EPB_FLAGS, &d.flags().to_le_bytes());
        }
        if comment.is_some() || direction.is_some() {
            option(&mut body, OPT_END, &[]);
        }
        self.block(EPB, &body)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

/// A classic libpcap file (microsecond timestamps), as ioppytest's sniffer hands out.
pub struct ClassicWriter<W: Write> {
    out: W,
}

impl<W: Write> ClassicWriter<W> {
    /// Writes the global header for `linktype`.
    pub fn new(mut out: W, linktype: u16) -> io::Result<ClassicWriter<W>> {
        let mut h = Vec::with_capacity(24);
        h.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
        h.extend_from_slice(&2u16.to_le_bytes());
        h.extend_from_slice(&4u16.to_le_bytes());
        h.extend_from_slice(&0i32.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&262_144u32.to_le_bytes());
        h.extend_from_slice(&u32::from(linktype).to_le_bytes());
        out.write_all(&h)?;
        Ok(ClassicWriter { out })
    }

    pub fn packet(&mut self, timestamp_ns: u64, data: &[u8]) -> io::Result<()> {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&((timestamp_ns / 1_000_000_000) as u32).to_le_bytes());
        h[4..8].copy_from_slice(&((timestamp_ns % 1_000_000_000 / 1000) as u32).to_le_bytes());
        h[8..12].copy_from_slice(&(data.len() as u32).to_le_bytes());
        h[12..16].copy_from_slice(&(data.len() as u32).to_le_bytes());
        self.out.write_all(&h)?;
        self.out.write_all(data)?;
        self.out.flush()
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

/// An interface of a file read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub description: String,
    pub linktype: u16,
    /// `if_IPv4addr` and `if_IPv6addr`: address and prefix length.
    pub addresses: Vec<(IpAddr, u8)>,
}

/// A packet of a file read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub iface: u32,
    pub timestamp_ns: u64,
    pub data: Vec<u8>,
    pub comment: Option<String>,
    pub direction: Option<Direction>,
}

/// A whole file read back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capture {
    pub app: String,
    pub interfaces: Vec<Interface>,
    pub packets: Vec<Record>,
}

/// Why a file does not read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("the file ends inside a block")]
    Truncated,
    #[error("not a little-endian pcapng file")]
    BadMagic,
    #[error("a block's lengths do not match")]
    BadBlock,
    #[error("a packet names an interface that was not described")]
    NoInterface,
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, ReadError> {
    b.get(at..at + 2).and_then(|s| s.try_into().ok()).map(u16::from_le_bytes).ok_or(ReadError::Truncated)
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, ReadError> {
    b.get(at..at + 4).and_then(|s| s.try_into().ok()).map(u32::from_le_bytes).ok_or(ReadError::Truncated)
}

/// The options of a block body from `at`: (code, value) pairs.
fn options(body: &[u8], mut at: usize) -> Result<Vec<(u16, &[u8])>, ReadError> {
    let mut out = Vec::new();
    while at + 4 <= body.len() {
        let (code, len) = (u16_at(body, at)?, usize::from(u16_at(body, at + 2)?));
        if code == OPT_END {
            break;
        }
        let value = body.get(at + 4..at + 4 + len).ok_or(ReadError::Truncated)?;
        out.push((code, value));
        at += 4 + len.div_ceil(4) * 4;
    }
    Ok(out)
}

fn text(v: &[u8]) -> String {
    String::from_utf8_lossy(v).into_owned()
}

/// Reads a little-endian pcapng file (one or more sections; unknown blocks are skipped).
pub fn read(bytes: &[u8]) -> Result<Capture, ReadError> {
    let mut cap = Capture::default();
    let mut at = 0;
    if u32_at(bytes, 0)? != SHB || u32_at(bytes, 8)? != BYTE_ORDER_MAGIC {
        return Err(ReadError::BadMagic);
    }
    while at < bytes.len() {
        let kind = u32_at(bytes, at)?;
        let total = u32_at(bytes, at + 4)? as usize;
        if total < 12 || !total.is_multiple_of(4) {
            return Err(ReadError::BadBlock);
        }
        let block = bytes.get(at..at + total).ok_or(ReadError::Truncated)?;
        if u32_at(block, total - 4)? as usize != total {
            return Err(ReadError::BadBlock);
        }
        let body = &block[8..total - 4];
        match kind {
            SHB => {
                for (code, v) in options(body, 16)? {
                    if code == SHB_USERAPPL {
                        cap.app = text(v);
                    }
                }
            }
            IDB => {
                let mut i = Interface { name: String::new(), description: String::new(), linktype: u16_at(body, 0)?, addresses: Vec::new() };
                for (code, v) in options(body, 8)? {
                    match code {
                        IF_NAME => i.name = text(v),
                        IF_DESCRIPTION => i.description = text(v),
                        IF_IPV4ADDR => {
                            if let (Some(a), Some(m)) = (v.first_chunk::<4>(), v.get(4..8).and_then(|m| <[u8; 4]>::try_from(m).ok())) {
                                i.addresses.push((IpAddr::from(*a), u32::from_be_bytes(m).leading_ones() as u8));
                            }
                        }
                        IF_IPV6ADDR => {
                            if let (Some(a), Some(len)) = (v.first_chunk::<16>(), v.get(16)) {
                                i.addresses.push((IpAddr::from(*a), *len));
                            }
                        }
                        _ => {}
                    }
                }
                cap.interfaces.push(i);
            }
            EPB => {
                let iface = u32_at(body, 0)?;
                if iface as usize >= cap.interfaces.len() {
                    return Err(ReadError::NoInterface);
                }
                let timestamp_ns = u64::from(u32_at(body, 4)?) << 32 | u64::from(u32_at(body, 8)?);
                let len = u32_at(body, 12)? as usize;
                let data = body.get(20..20 + len).ok_or(ReadError::BadBlock)?.to_vec();
                let mut r = Record { iface, timestamp_ns, data, comment: None, direction: None };
                for (code, v) in options(body, 20 + len.div_ceil(4) * 4)? {
                    match code {
                        OPT_COMMENT => r.comment = Some(text(v)),
                        EPB_FLAGS => {
                            r.direction = match u32_at(v, 0)? & 3 {
                                1 => Some(Direction::Inbound),
                                2 => Some(Direction::Outbound),
                                _ => None,
                            }
                        }
                        _ => {}
                    }
                }
                cap.packets.push(r);
            }
            _ => {}
        }
        at += total;
    }
    Ok(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = Writer::new(Vec::new(), "tunbus test").unwrap();
        let a = w.add_interface("h1", "agent h1", &[("198.18.0.1".parse().unwrap(), 24), ("fd00::1".parse().unwrap(), 64)]).unwrap();
        let b = w.add_interface("h2", "", &[]).unwrap();
        for len in 1..=9u8 {
            let data: Vec<u8> = (0..len).collect();
            let comment = (len % 2 == 0).then(|| format!("packet {len}"));
            let direction = [None, Some(Direction::Inbound), Some(Direction::Outbound)][usize::from(len % 3)];
            w.packet(if len < 5 { a } else { b }, u64::from(len) * 1_000_000_007, &data, comment.as_deref(), direction).unwrap();
        }
        w.into_inner()
    }

    #[test]
    fn reads_back_what_it_wrote() {
        let cap = read(&sample()).unwrap();
        assert_eq!(cap.app, "tunbus test");
        assert_eq!(cap.interfaces.iter().map(|i| (i.name.as_str(), i.linktype)).collect::<Vec<_>>(), [("h1", LINKTYPE_RAW), ("h2", LINKTYPE_RAW_DLT)]);
        assert_eq!(cap.packets.len(), 9);
        for (r, len) in cap.packets.iter().zip(1..=9u8) {
            assert_eq!(r.data, (0..len).collect::<Vec<_>>());
            assert_eq!(r.timestamp_ns, u64::from(len) * 1_000_000_007);
            assert_eq!(r.iface, u32::from(len >= 5));
            assert_eq!(r.comment, (len % 2 == 0).then(|| format!("packet {len}")));
            assert_eq!(r.direction, [None, Some(Direction::Inbound), Some(Direction::Outbound)][usize::from(len % 3)]);
        }
    }

    #[test]
    fn every_cut_of_a_file_is_refused_or_read_never_a_panic() {
        let bytes = sample();
        for cut in 0..bytes.len() {
            let _ = read(&bytes[..cut]);
        }
        let mut bad = bytes.clone();
        bad[8] ^= 0xff;
        assert_eq!(read(&bad), Err(ReadError::BadMagic));
    }

    #[test]
    fn classic_pcap_header_is_what_libpcap_writes() {
        let mut w = ClassicWriter::new(Vec::new(), LINKTYPE_RAW).unwrap();
        w.packet(1_500_000_000_123_456_789, &[0x45, 0, 0, 20]).unwrap();
        let b = w.into_inner();
        assert_eq!(&b[..4], &[0xd4, 0xc3, 0xb2, 0xa1]);
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 101);
        assert_eq!(u32::from_le_bytes(b[28..32].try_into().unwrap()), 123_456, "microseconds");
        assert_eq!(b.len(), 24 + 16 + 4);
    }
}
