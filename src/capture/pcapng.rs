//! The capture file formats: pcapng (one section, interfaces, enhanced packet blocks with
//! comments and directions, nanosecond timestamps), classic libpcap (what ioppytest's
//! tools read), and a reader of what [`Writer`] writes, for tests and tools.
//!
//! Little-endian throughout, link type raw IP (the packet starts at its IPv4 or IPv6 header;
//! 101, and 12 after the first interface, see [`LINKTYPE_RAW_DLT`]), as the pcapng specification (draft-ietf-opsawg-pcapng) lays out the blocks:
//! type, total length, body padded to 32 bits, total length again.
//!
//! IEEE 802.15.4 probes get interfaces of their own link type ([`Writer::add_interface_of`]):
//! [`LINKTYPE_IEEE802_15_4_NOFCS`] (230) by default, [`LINKTYPE_IEEE802_15_4_WITHFCS`] (195)
//! when the probe's frames end with their 2-byte FCS (`--fcs`). Without is the default
//! because that is what the ioppytest stack carries: its packet sniffer writes serial
//! captures as `DLT_IEEE802_15_4_NOFCS` (ioppytest `packet_sniffer`, `802_15_4_tun` mode,
//! and the agent's `packet_dumper`), and a frame's `data` there is the MAC frame the probe
//! passed on. Sniffer firmware that keeps the FCS (OpenThread's pyspinel and Zephyr's
//! sniffer tools write 195) needs `--fcs`; with the wrong choice Wireshark takes two payload bytes for an FCS,
//! or the reverse. libpcap (tcpdump) reads a file only when all its interfaces share the
//! first one's link type: a capture of probes holds 802.15.4 interfaces only (Wireshark
//! reads mixed files).

use std::io::{self, Write};
use std::net::IpAddr;

use crate::packet::prefix::v4_netmask;

/// Raw IPv4/IPv6, no link header.
pub const LINKTYPE_RAW: u16 = 101;
/// Ethernet frames (an L2 agent's TAP).
pub const LINKTYPE_ETHERNET: u16 = 1;
/// Raw IP under its Linux DLT number, which libpcap and Wireshark also read as raw IP. The
/// interfaces after the first carry it: libpcap (1.10.3, Debian 12's tcpdump) compares
/// each later interface's type with the *converted* type of the first (101 → 12) and
/// refuses a file of several raw-IP interfaces that all say 101.
pub const LINKTYPE_RAW_DLT: u16 = 12;

/// IEEE 802.15.4 MAC frames that end with their 2-byte FCS.
pub const LINKTYPE_IEEE802_15_4_WITHFCS: u16 = 195;
/// IEEE 802.15.4 MAC frames without FCS: what ioppytest's probes carry (the default).
pub const LINKTYPE_IEEE802_15_4_NOFCS: u16 = 230;

/// The link type of an 802.15.4 probe's interface: whether its frames end with the FCS.
pub fn ieee802154_linktype(fcs: bool) -> u16 {
    if fcs {
        LINKTYPE_IEEE802_15_4_WITHFCS
    } else {
        LINKTYPE_IEEE802_15_4_NOFCS
    }
}

/// Whether `linktype` is IEEE 802.15.4 (with or without FCS).
pub fn is_ieee802154(linktype: u16) -> bool {
    linktype == LINKTYPE_IEEE802_15_4_WITHFCS || linktype == LINKTYPE_IEEE802_15_4_NOFCS
}

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
    pub fn add_interface(&mut self, name: &str, description: &str, addrs: &[(IpAddr, u8)]) -> io::Result<u32> {
        self.add_interface_of(LINKTYPE_RAW, name, description, addrs)
    }

    /// Adds an interface of `linktype` (nanosecond timestamps), e.g.
    /// [`ieee802154_linktype`] for a probe; raw IP is written as [`LINKTYPE_RAW_DLT`] after
    /// the first interface. Returns its id.
    pub fn add_interface_of(&mut self, linktype: u16, name: &str, description: &str, addrs: &[(IpAddr, u8)]) -> io::Result<u32> {
        let mut body = Vec::new();
        let linktype = if is_raw_ip(linktype) && self.interfaces > 0 { LINKTYPE_RAW_DLT } else { linktype };
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

    /// CRC-16/KERMIT, the 802.15.4 FCS (ITU-T polynomial, reflected, initial 0), sent
    /// least significant byte first.
    fn fcs(frame: &[u8]) -> [u8; 2] {
        let mut crc = 0u16;
        for &b in frame {
            crc ^= u16::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0x8408 } else { crc >> 1 };
            }
        }
        crc.to_le_bytes()
    }

    /// An acknowledgement (seq 0x2a) and a data frame from short address 0x0001 to the
    /// broadcast address on PAN 0xabcd, seq 1, payload `3f 00 "hello"`.
    fn radio_frames() -> [Vec<u8>; 2] {
        let mut data = vec![0x41, 0x88, 0x01, 0xcd, 0xab, 0xff, 0xff, 0x01, 0x00, 0x3f, 0x00];
        data.extend_from_slice(b"hello");
        [vec![0x02, 0x00, 0x2a], data]
    }

    /// `tcpdump -nn -v -r` of `bytes` (written to a temporary file), or `None` (with a notice)
    /// when tcpdump is not installed and system tests are not required.
    fn tcpdump(bytes: &[u8]) -> Option<String> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let file = std::env::temp_dir().join(format!("tunbus-pcapng-{}-{n}.pcapng", std::process::id()));
        std::fs::write(&file, bytes).unwrap();
        let out = std::process::Command::new("tcpdump").args(["-nn", "-v", "-r"]).arg(&file).output();
        let _ = std::fs::remove_file(&file);
        match out {
            Ok(out) => {
                let text = format!("{}{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
                assert!(out.status.success(), "tcpdump -r failed:\n{text}");
                Some(text)
            }
            Err(e) if std::env::var("TUNBUS_REQUIRE_SYSTEM_TESTS").as_deref() != Ok("1") => {
                eprintln!("SKIPPED the tcpdump half: {e} (scripts/setup.sh installs tcpdump)");
                None
            }
            Err(e) => panic!("tcpdump: {e} (scripts/setup.sh installs tcpdump)"),
        }
    }

    #[test]
    fn ieee802154_probes_read_back_and_tcpdump_reads_them() {
        for fcs_on in [false, true] {
            let mut w = Writer::new(Vec::new(), "tunbus test").unwrap();
            let lt = ieee802154_linktype(fcs_on);
            let a = w.add_interface_of(lt, "probe1", "serial probe /dev/ttyUSB0", &[]).unwrap();
            let b = w.add_interface_of(lt, "probe2", "serial probe /dev/ttyACM0", &[]).unwrap();
            let frames = radio_frames();
            for (i, f) in frames.iter().enumerate() {
                let mut f = f.clone();
                if fcs_on {
                    let sum = fcs(&f);
                    f.extend_from_slice(&sum);
                }
                w.packet([a, b][i], 1_700_000_000_000_000_000 + i as u64, &f, None, Some(Direction::Inbound)).unwrap();
            }
            let bytes = w.into_inner();
            let cap = read(&bytes).unwrap();
            assert_eq!(cap.interfaces.iter().map(|i| (i.name.as_str(), i.linktype)).collect::<Vec<_>>(), [("probe1", lt), ("probe2", lt)]);
            assert!(cap.interfaces.iter().all(|i| is_ieee802154(i.linktype) && !is_raw_ip(i.linktype)));
            assert_eq!(cap.packets.len(), 2);
            assert_eq!(cap.packets[0].data[..3], frames[0][..]);
            let Some(text) = tcpdump(&bytes) else { continue };
            let want_type = if fcs_on { "link-type IEEE802_15_4 (IEEE 802.15.4 with FCS)" } else { "link-type IEEE802_15_4_NOFCS (IEEE 802.15.4 without FCS)" };
            assert!(text.contains(want_type), "{text}");
            assert!(text.contains("IEEE 802.15.4 ACK packet v0 seq 2a"), "{text}");
            assert!(text.contains("IEEE 802.15.4 Data packet v0 seq 01 abcd:ffff < -:0001"), "{text}");
            // The payload, FCS not included in either case.
            assert!(text.contains("0x0000:  3f00 6865 6c6c 6f  "), "{text}");
        }
    }

    #[test]
    fn raw_ip_after_a_first_interface_is_still_written_as_dlt_12() {
        let mut w = Writer::new(Vec::new(), "t").unwrap();
        w.add_interface_of(LINKTYPE_RAW, "a", "", &[]).unwrap();
        w.add_interface_of(LINKTYPE_RAW, "b", "", &[]).unwrap();
        let cap = read(&w.into_inner()).unwrap();
        assert_eq!(cap.interfaces.iter().map(|i| i.linktype).collect::<Vec<_>>(), [LINKTYPE_RAW, LINKTYPE_RAW_DLT]);
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
