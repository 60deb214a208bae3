//! Wire format v1: one AMQP message body = one batch of IP packets.
//!
//! Owns the frame layout (`docs/wire-format.md` is the contract): a 24-byte header, then
//! per packet a big-endian `u32` length, the 10-byte `virtio_net_hdr` when the frame has
//! [`FLAG_VNET`], and the packet bytes.
//!
//! Pure and allocation-free: the per-queue worker threads use [`BatchWriter`] on TX (the
//! TUN read lands directly in its place in the outgoing frame) and [`decode`] on RX (packets
//! are slices of the message body). `decode` checks every length once, up front; iterating a
//! [`Frame`] afterwards cannot fail. Nothing here panics on any input.

/// First two bytes of every frame.
pub const MAGIC: [u8; 2] = *b"TB";
/// The only version this module reads and writes.
pub const VERSION: u8 = 1;
/// Length of the fixed frame header.
pub const HEADER_LEN: usize = 24;
/// Header flag: every entry carries a `virtio_net_hdr` before its packet bytes.
pub const FLAG_VNET: u8 = 0x01;
/// Length of the `virtio_net_hdr` carried per entry when [`FLAG_VNET`] is set.
pub const VNET_HDR_LEN: usize = 10;
/// Length of the per-entry packet length field.
pub const ENTRY_LEN_FIELD: usize = 4;
/// Largest packet (without vnet header): the largest IPv6 packet without jumbograms.
pub const MAX_PACKET_LEN: usize = 65_575;
/// Largest frame, header included.
pub const MAX_FRAME_LEN: usize = 16 * 1024 * 1024;
/// Largest packet count (the count field is a `u16`).
pub const MAX_PACKETS: usize = u16::MAX as usize;

/// Header flag: the entries are Ethernet frames (an L2 session), not IP packets.
pub const FLAG_ETHERNET: u8 = 0x02;
/// Header flag: the entries are IEEE 802.15.4 frames (serial probes, simulated radios).
pub const FLAG_IEEE802154: u8 = 0x04;
/// The flag bits that name what the entries are; none set: IP packets. At most one is set.
pub const LAYER_FLAGS: u8 = FLAG_ETHERNET | FLAG_IEEE802154;

/// Flag bits this version knows.
const KNOWN_FLAGS: u8 = FLAG_VNET | LAYER_FLAGS;

/// Byte offsets inside the frame header.
mod field {
    use core::ops::Range;
    pub const MAGIC: Range<usize> = 0..2;
    pub const VERSION: usize = 2;
    pub const FLAGS: usize = 3;
    pub const COUNT: Range<usize> = 4..6;
    pub const SENDER_QUEUES: usize = 6;
    pub const RESERVED: usize = 7;
    pub const SEQ: Range<usize> = 8..16;
    pub const TIMESTAMP: Range<usize> = 16..24;
}

/// The decoded fixed header of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Flag bits: [`FLAG_VNET`], and at most one of [`LAYER_FLAGS`].
    pub flags: u8,
    /// Number of packet entries.
    pub count: u16,
    /// How many consumer queues the sender has (1..=16), so that replies can be batched per
    /// queue instead of per shard; 0 when not stated (older senders wrote 0 here).
    pub sender_queues: u8,
    /// Sender's sequence number (per publisher, for loss and reorder accounting).
    pub seq: u64,
    /// Sender's clock when the frame was finished, ns since the UNIX epoch.
    pub timestamp_ns: u64,
}

impl FrameHeader {
    /// Whether every entry carries a `virtio_net_hdr`.
    pub fn has_vnet(&self) -> bool {
        self.flags & FLAG_VNET != 0
    }

    fn vnet_len(&self) -> usize {
        if self.has_vnet() {
            VNET_HDR_LEN
        } else {
            0
        }
    }
}

/// Why a message body is not a valid v1 frame. Counted and dropped by the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Shorter than the header, or ends inside an entry's length field.
    #[error("frame truncated")]
    Truncated,
    /// The first two bytes are not `TB`.
    #[error("bad magic")]
    BadMagic,
    /// A version this code does not speak.
    #[error("unknown wire version {0}")]
    UnknownVersion(u8),
    /// Flag bits other than the known ones are set (the value is the whole flags byte).
    #[error("unknown flags {0:#04x}")]
    UnknownFlags(u8),
    /// An entry has length 0.
    #[error("empty packet entry")]
    EmptyPacket,
    /// An entry's length exceeds `MAX_PACKET_LEN`.
    #[error("packet entry too big")]
    PacketTooBig,
    /// An entry's vnet header or packet bytes run past the end of the body.
    #[error("packet entry runs past the end of the frame")]
    LengthMismatch,
    /// Bytes remain after the last entry announced by the header.
    #[error("trailing bytes after the last entry")]
    TrailingBytes,
    /// The body is longer than `MAX_FRAME_LEN`.
    #[error("frame too big")]
    FrameTooBig,
    /// The body ends cleanly after fewer entries than the header's count.
    #[error("fewer entries than the header's count")]
    CountMismatch,
}

/// Why a packet was not added to a batch. The batch is left unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// No room left in the buffer, or the batch already holds `MAX_PACKETS` packets.
    #[error("batch full")]
    Full,
    /// The packet (without vnet header) is longer than `MAX_PACKET_LEN`.
    #[error("packet too big")]
    TooBig,
    /// Empty packet, or a vnet entry with no packet bytes after its header.
    #[error("packet too short")]
    TooShort,
    /// A vnet header was given to a plain batch, or none to a vnet batch.
    #[error("vnet header presence does not match the batch flags")]
    VnetMismatch,
}

/// One packet of a frame, borrowed from the message body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet<'a> {
    /// The `virtio_net_hdr` as the sender's kernel gave it (vnet frames only).
    pub vnet: Option<&'a [u8; VNET_HDR_LEN]>,
    /// The IP packet (possibly a GSO super-packet), never empty.
    pub data: &'a [u8],
}

/// A validated frame borrowing the message body: its packets are slices of that body,
/// written to the TUN without a copy.
#[derive(Clone, Copy, Debug)]
pub struct Frame<'a> {
    header: FrameHeader,
    /// The entries, exactly `header.count` of them, all lengths checked.
    entries: &'a [u8],
}

fn be_u16(b: &[u8], at: core::ops::Range<usize>) -> u16 {
    b.get(at).and_then(|s| <[u8; 2]>::try_from(s).ok()).map_or(0, u16::from_be_bytes)
}

fn be_u64(b: &[u8], at: core::ops::Range<usize>) -> u64 {
    b.get(at).and_then(|s| <[u8; 8]>::try_from(s).ok()).map_or(0, u64::from_be_bytes)
}

/// Validates a message body as a v1 frame: checks the header, then walks every entry once
/// and checks its length against the limits and the body. Allocation-free.
pub fn decode(body: &[u8]) -> Result<Frame<'_>, DecodeError> {
    if body.len() > MAX_FRAME_LEN {
        return Err(DecodeError::FrameTooBig);
    }
    let Some((head, entries)) = body.split_first_chunk::<HEADER_LEN>() else {
        return Err(DecodeError::Truncated);
    };
    if head[field::MAGIC] != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    if head[field::VERSION] != VERSION {
        return Err(DecodeError::UnknownVersion(head[field::VERSION]));
    }
    let flags = head[field::FLAGS];
    if flags & !KNOWN_FLAGS != 0 || (flags & LAYER_FLAGS).count_ones() > 1 {
        return Err(DecodeError::UnknownFlags(flags));
    }
    let header = FrameHeader {
        flags,
        count: be_u16(head, field::COUNT),
        sender_queues: head[field::SENDER_QUEUES],
        seq: be_u64(head, field::SEQ),
        timestamp_ns: be_u64(head, field::TIMESTAMP),
    };
    let vnet_len = header.vnet_len();
    let mut rest = entries;
    for _ in 0..header.count {
        if rest.is_empty() {
            return Err(DecodeError::CountMismatch);
        }
        let Some((len, tail)) = rest.split_first_chunk::<ENTRY_LEN_FIELD>() else {
            return Err(DecodeError::Truncated);
        };
        let len = u32::from_be_bytes(*len) as usize;
        if len == 0 {
            return Err(DecodeError::EmptyPacket);
        }
        if len > MAX_PACKET_LEN {
            return Err(DecodeError::PacketTooBig);
        }
        // Both terms are bounded (10 + 65 575), no overflow.
        let entry = vnet_len + len;
        rest = tail.get(entry..).ok_or(DecodeError::LengthMismatch)?;
    }
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes);
    }
    Ok(Frame { header, entries })
}

impl<'a> Frame<'a> {
    /// The frame header.
    pub fn header(&self) -> FrameHeader {
        self.header
    }

    /// Number of packets in the frame.
    pub fn len(&self) -> usize {
        usize::from(self.header.count)
    }

    /// Whether the frame carries no packets.
    pub fn is_empty(&self) -> bool {
        self.header.count == 0
    }

    /// The packets, in order.
    pub fn packets(&self) -> Packets<'a> {
        Packets { rest: self.entries, remaining: self.len(), vnet: self.header.has_vnet() }
    }
}

impl<'a> IntoIterator for &Frame<'a> {
    type Item = Packet<'a>;
    type IntoIter = Packets<'a>;
    fn into_iter(self) -> Packets<'a> {
        self.packets()
    }
}

/// Iterator over the packets of a validated [`Frame`].
#[derive(Clone, Debug)]
pub struct Packets<'a> {
    rest: &'a [u8],
    remaining: usize,
    vnet: bool,
}

impl<'a> Iterator for Packets<'a> {
    type Item = Packet<'a>;

    fn next(&mut self) -> Option<Packet<'a>> {
        if self.remaining == 0 {
            return None;
        }
        // `decode` checked every length; the fallible accessors below only keep this
        // panic-free by construction and end the iteration if that invariant were broken.
        let parsed = (|| {
            let (len, mut tail) = self.rest.split_first_chunk::<ENTRY_LEN_FIELD>()?;
            let len = u32::from_be_bytes(*len) as usize;
            let vnet = if self.vnet {
                let (hdr, after) = tail.split_first_chunk::<VNET_HDR_LEN>()?;
                tail = after;
                Some(hdr)
            } else {
                None
            };
            let data = tail.get(..len)?;
            let rest = tail.get(len..)?;
            Some((Packet { vnet, data }, rest))
        })();
        match parsed {
            Some((packet, rest)) => {
                self.rest = rest;
                self.remaining -= 1;
                Some(packet)
            }
            None => {
                self.remaining = 0;
                None
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for Packets<'_> {}
impl core::iter::FusedIterator for Packets<'_> {}

/// Builds one frame in a caller-owned, reused buffer.
///
/// The buffer is allocated (zeroed) once in [`BatchWriter::with_capacity`] and never grows
/// or shrinks: `len()` bytes of it are the frame so far, the rest is free space that
/// [`BatchWriter::slot`] lends out so the TUN read lands where the entry goes (zero-copy TX).
#[derive(Clone, Debug)]
pub struct BatchWriter {
    /// Always `capacity` bytes long; `buf[..len]` is the frame so far.
    buf: Vec<u8>,
    len: usize,
    flags: u8,
    count: usize,
    /// Written into the header's `sender_queues`; kept across `reset`.
    sender_queues: u8,
    /// Offset of the last entry's length field (valid when `count > 0`).
    last_start: usize,
    /// Offset of the entry before it, when known (lets one `pop_last` stay O(1)).
    prev_start: Option<usize>,
}

impl BatchWriter {
    /// A writer whose frames are at most `capacity` bytes, header included. `capacity` is
    /// clamped to `HEADER_LEN..=MAX_FRAME_LEN`. The new batch is empty with flags 0.
    pub fn with_capacity(capacity: usize) -> Self {
        let capacity = capacity.clamp(HEADER_LEN, MAX_FRAME_LEN);
        let mut writer =
            BatchWriter { buf: vec![0; capacity], len: HEADER_LEN, flags: 0, count: 0, sender_queues: 0, last_start: HEADER_LEN, prev_start: None };
        writer.reset(0);
        writer
    }

    /// Starts a new empty batch with these flags, keeping the buffer. Unknown flag bits are
    /// cleared (a receiver would reject them).
    pub fn reset(&mut self, flags: u8) {
        self.flags = flags & KNOWN_FLAGS;
        self.len = HEADER_LEN;
        self.count = 0;
        self.last_start = HEADER_LEN;
        self.prev_start = None;
    }

    /// States how many consumer queues the sender has in every frame this writer finishes.
    pub fn set_sender_queues(&mut self, queues: u8) {
        self.sender_queues = queues;
    }

    /// The flags of the current batch.
    pub fn flags(&self) -> u8 {
        self.flags
    }

    /// Bytes so far, header included.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the batch holds no packets.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Packets so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The buffer size, i.e. the largest frame this writer builds.
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// Free bytes before the capacity is reached.
    pub fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.len)
    }

    fn vnet_len(&self) -> usize {
        if self.flags & FLAG_VNET != 0 {
            VNET_HDR_LEN
        } else {
            0
        }
    }

    /// Free space for the next entry's payload (vnet header, if any, then packet bytes),
    /// right after its 4-byte length field; at most `max` bytes. Empty if fewer than
    /// `ENTRY_LEN_FIELD + 1` bytes are free or the batch already has `MAX_PACKETS` packets.
    pub fn slot(&mut self, max: usize) -> &mut [u8] {
        if self.count >= MAX_PACKETS || self.remaining() < ENTRY_LEN_FIELD + 1 {
            return &mut [];
        }
        let start = self.len + ENTRY_LEN_FIELD;
        let end = start.saturating_add(max).min(self.buf.len());
        self.buf.get_mut(start..end).unwrap_or_default()
    }

    /// Checks an entry whose payload (vnet header included) is `n` bytes long.
    fn check_entry(&self, n: usize) -> Result<(), PushError> {
        let vnet_len = self.vnet_len();
        if n <= vnet_len {
            return Err(PushError::TooShort);
        }
        if n - vnet_len > MAX_PACKET_LEN {
            return Err(PushError::TooBig);
        }
        if self.count >= MAX_PACKETS || ENTRY_LEN_FIELD.saturating_add(n) > self.remaining() {
            return Err(PushError::Full);
        }
        Ok(())
    }

    /// Writes the length field of an entry whose payload is already in place.
    fn seal_entry(&mut self, n: usize) {
        let start = self.len;
        // `check_entry` bounded n - vnet_len by MAX_PACKET_LEN, which fits a u32.
        let packet_len = (n - self.vnet_len()) as u32;
        if let Some(field) = self.buf.get_mut(start..start + ENTRY_LEN_FIELD) {
            field.copy_from_slice(&packet_len.to_be_bytes());
        }
        self.prev_start = (self.count > 0).then_some(self.last_start);
        self.last_start = start;
        self.len = start + ENTRY_LEN_FIELD + n;
        self.count += 1;
    }

    /// Accepts the `n` bytes just written at the start of [`BatchWriter::slot`] as one entry
    /// (`n` includes the vnet header in a vnet batch). On error the batch is unchanged.
    pub fn commit(&mut self, n: usize) -> Result<(), PushError> {
        self.check_entry(n)?;
        self.seal_entry(n);
        Ok(())
    }

    /// Copies one packet into the batch. `vnet` must be `Some` exactly when the batch is a
    /// vnet batch. On error the batch is unchanged.
    pub fn push(&mut self, vnet: Option<&[u8; VNET_HDR_LEN]>, data: &[u8]) -> Result<(), PushError> {
        if vnet.is_some() != (self.flags & FLAG_VNET != 0) {
            return Err(PushError::VnetMismatch);
        }
        if data.is_empty() {
            return Err(PushError::TooShort);
        }
        let n = self.vnet_len().saturating_add(data.len());
        self.check_entry(n)?;
        let mut at = self.len + ENTRY_LEN_FIELD;
        if let Some(hdr) = vnet {
            if let Some(dst) = self.buf.get_mut(at..at + VNET_HDR_LEN) {
                dst.copy_from_slice(hdr);
            }
            at += VNET_HDR_LEN;
        }
        if let Some(dst) = self.buf.get_mut(at..at + data.len()) {
            dst.copy_from_slice(data);
        }
        self.seal_entry(n);
        Ok(())
    }

    /// Writes the header (flags, count, `seq`, `timestamp_ns`) and returns the frame. The
    /// batch stays readable (and may even grow and be finished again) until `reset`.
    pub fn finish(&mut self, seq: u64, timestamp_ns: u64) -> &[u8] {
        // count <= MAX_PACKETS == u16::MAX, enforced by `check_entry`.
        let count = u16::try_from(self.count).unwrap_or(u16::MAX);
        if let Some(head) = self.buf.get_mut(..HEADER_LEN) {
            head[field::MAGIC].copy_from_slice(&MAGIC);
            head[field::VERSION] = VERSION;
            head[field::FLAGS] = self.flags;
            head[field::COUNT].copy_from_slice(&count.to_be_bytes());
            head[field::SENDER_QUEUES] = self.sender_queues;
            head[field::RESERVED] = 0;
            head[field::SEQ].copy_from_slice(&seq.to_be_bytes());
            head[field::TIMESTAMP].copy_from_slice(&timestamp_ns.to_be_bytes());
        }
        self.as_bytes()
    }

    /// The payload (vnet header included in a vnet batch) of the last entry, so the worker
    /// can classify a packet right after committing it. `None` when the batch is empty.
    pub fn last_entry(&self) -> Option<&[u8]> {
        if self.count == 0 {
            return None;
        }
        self.buf.get(self.last_start + ENTRY_LEN_FIELD..self.len)
    }

    /// Removes the last entry (no-op when empty). O(1); a second `pop_last` in a row walks
    /// the entries once to find the new last one.
    pub fn pop_last(&mut self) {
        if self.count == 0 {
            return;
        }
        self.len = self.last_start;
        self.count -= 1;
        self.last_start = match self.prev_start.take() {
            Some(start) => start,
            None => self.find_last_start(),
        };
    }

    /// Offset of the last entry's length field, by walking the entries from the header.
    fn find_last_start(&self) -> usize {
        let vnet_len = self.vnet_len();
        let mut at = HEADER_LEN;
        let mut last = HEADER_LEN;
        for _ in 0..self.count {
            last = at;
            let len = self.buf.get(at..at + ENTRY_LEN_FIELD).and_then(|s| <[u8; 4]>::try_from(s).ok()).map_or(0, |b| u32::from_be_bytes(b) as usize);
            at += ENTRY_LEN_FIELD + vnet_len + len;
        }
        last
    }

    /// The payload of every entry so far (vnet header included in a vnet batch), in
    /// order: the batch read back by its writer, which checked each entry as it went in.
    pub fn entries(&self) -> Entries<'_> {
        Entries { buf: self.as_bytes(), at: HEADER_LEN, vnet_len: self.vnet_len(), left: self.count }
    }

    /// The frame so far (header bytes are valid only after `finish`).
    pub fn as_bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }

    /// The buffer, truncated to the frame so far.
    pub fn into_inner(mut self) -> Vec<u8> {
        self.buf.truncate(self.len);
        self.buf
    }
}

/// The entries of a [`BatchWriter`], see [`BatchWriter::entries`].
#[derive(Clone, Debug)]
pub struct Entries<'a> {
    buf: &'a [u8],
    at: usize,
    vnet_len: usize,
    left: usize,
}

impl<'a> Iterator for Entries<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.left == 0 {
            return None;
        }
        let len_field = self.buf.get(self.at..self.at + ENTRY_LEN_FIELD)?;
        let len = u32::from_be_bytes(len_field.try_into().ok()?) as usize;
        let start = self.at + ENTRY_LEN_FIELD;
        let end = start + self.vnet_len + len;
        let entry = self.buf.get(start..end)?;
        self.at = end;
        self.left -= 1;
        Some(entry)
    }
}

/// Encodes a whole frame into `out` (cleared first). `header.count` is ignored (taken from
/// `packets`), flag bits other than `FLAG_VNET` are cleared. For tests and tools; the hot
/// path uses [`BatchWriter`].
pub fn encode(header: FrameHeader, packets: &[Packet<'_>], out: &mut Vec<u8>) -> Result<(), PushError> {
    out.clear();
    let flags = header.flags & KNOWN_FLAGS;
    let vnet = flags & FLAG_VNET != 0;
    if packets.len() > MAX_PACKETS {
        return Err(PushError::Full);
    }
    let mut total = HEADER_LEN;
    for p in packets {
        if p.vnet.is_some() != vnet {
            return Err(PushError::VnetMismatch);
        }
        if p.data.is_empty() {
            return Err(PushError::TooShort);
        }
        if p.data.len() > MAX_PACKET_LEN {
            return Err(PushError::TooBig);
        }
        total += ENTRY_LEN_FIELD + p.vnet.map_or(0, |v| v.len()) + p.data.len();
        if total > MAX_FRAME_LEN {
            return Err(PushError::Full);
        }
    }
    out.reserve(total);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(flags);
    // packets.len() <= MAX_PACKETS == u16::MAX, checked above.
    out.extend_from_slice(&(packets.len() as u16).to_be_bytes());
    out.extend_from_slice(&[header.sender_queues, 0]);
    out.extend_from_slice(&header.seq.to_be_bytes());
    out.extend_from_slice(&header.timestamp_ns.to_be_bytes());
    for p in packets {
        // <= MAX_PACKET_LEN, checked above.
        out.extend_from_slice(&(p.data.len() as u32).to_be_bytes());
        if let Some(v) = p.vnet {
            out.extend_from_slice(v);
        }
        out.extend_from_slice(p.data);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hdr(flags: u8, seq: u64, ts: u64) -> FrameHeader {
        FrameHeader { flags, count: 0, sender_queues: 0, seq, timestamp_ns: ts }
    }

    fn collect<'a>(f: &Frame<'a>) -> Vec<Packet<'a>> {
        f.packets().collect()
    }

    /// A frame header by hand, for malformed-input tests.
    fn raw_header(flags: u8, count: u16) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(b"TB");
        v.push(1);
        v.push(flags);
        v.extend_from_slice(&count.to_be_bytes());
        v.extend_from_slice(&[3, 0xBB]); // sender_queues 3, then the reserved octet (ignored)
        v.extend_from_slice(&7u64.to_be_bytes());
        v.extend_from_slice(&9u64.to_be_bytes());
        v
    }

    #[test]
    fn header_layout_is_byte_exact() {
        let mut out = Vec::new();
        let p = [Packet { vnet: None, data: &[0x45, 1, 2] }];
        encode(hdr(0, 0x0102_0304_0506_0708, 0x1112_1314_1516_1718), &p, &mut out).unwrap();
        assert_eq!(
            out,
            [
                b'T', b'B', 1, 0, 0, 1, 0, 0, //
                1, 2, 3, 4, 5, 6, 7, 8, //
                0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, //
                0, 0, 0, 3, 0x45, 1, 2,
            ]
        );
    }

    #[test]
    fn vnet_entry_layout() {
        let v = [1u8, 2, 3, 4, 5, 6, 7, 8, 9, 10];
        let mut out = Vec::new();
        encode(hdr(FLAG_VNET, 0, 0), &[Packet { vnet: Some(&v), data: &[0x60] }], &mut out).unwrap();
        assert_eq!(out[3], FLAG_VNET);
        assert_eq!(&out[24..28], &[0, 0, 0, 1]);
        assert_eq!(&out[28..38], &v);
        assert_eq!(&out[38..], &[0x60]);
        let f = decode(&out).unwrap();
        assert_eq!(collect(&f), vec![Packet { vnet: Some(&v), data: &[0x60] }]);
    }

    #[test]
    fn decode_roundtrip_and_reserved_ignored() {
        let mut body = raw_header(0, 2);
        body.extend_from_slice(&[0, 0, 0, 2, 0x45, 0x00, 0, 0, 0, 1, 0x60]);
        let f = decode(&body).unwrap();
        assert_eq!(f.header(), FrameHeader { flags: 0, count: 2, sender_queues: 3, seq: 7, timestamp_ns: 9 });
        assert_eq!(f.len(), 2);
        assert_eq!(f.packets().len(), 2);
        let ps = collect(&f);
        assert_eq!(ps[0].data, &[0x45, 0]);
        assert_eq!(ps[1].data, &[0x60]);
        assert!(ps.iter().all(|p| p.vnet.is_none()));
    }

    #[test]
    fn empty_frame_is_valid() {
        let body = raw_header(0, 0);
        let f = decode(&body).unwrap();
        assert!(f.is_empty());
        assert_eq!(f.packets().next(), None);
    }

    #[test]
    fn decode_errors() {
        use DecodeError::*;
        assert_eq!(decode(&[]).unwrap_err(), Truncated);
        assert_eq!(decode(&raw_header(0, 0)[..23]).unwrap_err(), Truncated);
        let mut b = raw_header(0, 0);
        b[0] = b'X';
        assert_eq!(decode(&b).unwrap_err(), BadMagic);
        let mut b = raw_header(0, 0);
        b[2] = 2;
        assert_eq!(decode(&b).unwrap_err(), UnknownVersion(2));
        assert_eq!(decode(&raw_header(0x08, 0)).unwrap_err(), UnknownFlags(0x08));
        // Both layer bits: an entry cannot be an Ethernet and an 802.15.4 frame at once.
        assert_eq!(decode(&raw_header(0x06, 0)).unwrap_err(), UnknownFlags(0x06));
        assert_eq!(decode(&raw_header(FLAG_ETHERNET, 0)).unwrap().header().flags, FLAG_ETHERNET);
        assert_eq!(decode(&raw_header(FLAG_IEEE802154, 0)).unwrap().header().flags, FLAG_IEEE802154);
        assert_eq!(decode(&raw_header(0x81, 0)).unwrap_err(), UnknownFlags(0x81));
        // count says 1, body ends right after the header
        assert_eq!(decode(&raw_header(0, 1)).unwrap_err(), CountMismatch);
        // ends inside the length field
        let mut b = raw_header(0, 1);
        b.extend_from_slice(&[0, 0]);
        assert_eq!(decode(&b).unwrap_err(), Truncated);
        // zero length
        let mut b = raw_header(0, 1);
        b.extend_from_slice(&[0, 0, 0, 0]);
        assert_eq!(decode(&b).unwrap_err(), EmptyPacket);
        // too big
        let mut b = raw_header(0, 1);
        b.extend_from_slice(&((MAX_PACKET_LEN + 1) as u32).to_be_bytes());
        assert_eq!(decode(&b).unwrap_err(), PacketTooBig);
        let mut b = raw_header(0, 1);
        b.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(decode(&b).unwrap_err(), PacketTooBig);
        // runs past the end
        let mut b = raw_header(0, 1);
        b.extend_from_slice(&[0, 0, 0, 3, 1, 2]);
        assert_eq!(decode(&b).unwrap_err(), LengthMismatch);
        // vnet header runs past the end
        let mut b = raw_header(FLAG_VNET, 1);
        b.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0]);
        assert_eq!(decode(&b).unwrap_err(), LengthMismatch);
        // trailing bytes
        let mut b = raw_header(0, 1);
        b.extend_from_slice(&[0, 0, 0, 1, 0x45, 0]);
        assert_eq!(decode(&b).unwrap_err(), TrailingBytes);
        let mut b = raw_header(0, 0);
        b.push(0);
        assert_eq!(decode(&b).unwrap_err(), TrailingBytes);
        // too big as a whole
        let b = vec![0u8; MAX_FRAME_LEN + 1];
        assert_eq!(decode(&b).unwrap_err(), FrameTooBig);
    }

    #[test]
    fn max_packet_len_is_accepted() {
        let data = vec![0x60; MAX_PACKET_LEN];
        let mut out = Vec::new();
        encode(hdr(0, 1, 2), &[Packet { vnet: None, data: &data }], &mut out).unwrap();
        let f = decode(&out).unwrap();
        assert_eq!(collect(&f)[0].data.len(), MAX_PACKET_LEN);
        let too_big = vec![0x60; MAX_PACKET_LEN + 1];
        assert_eq!(encode(hdr(0, 1, 2), &[Packet { vnet: None, data: &too_big }], &mut out), Err(PushError::TooBig));
    }

    #[test]
    fn encode_rejects() {
        let v = [0u8; VNET_HDR_LEN];
        let mut out = Vec::new();
        assert_eq!(encode(hdr(0, 0, 0), &[Packet { vnet: Some(&v), data: &[1] }], &mut out), Err(PushError::VnetMismatch));
        assert_eq!(encode(hdr(FLAG_VNET, 0, 0), &[Packet { vnet: None, data: &[1] }], &mut out), Err(PushError::VnetMismatch));
        assert_eq!(encode(hdr(0, 0, 0), &[Packet { vnet: None, data: &[] }], &mut out), Err(PushError::TooShort));
        let many = vec![Packet { vnet: None, data: &[1] }; MAX_PACKETS + 1];
        assert_eq!(encode(hdr(0, 0, 0), &many, &mut out), Err(PushError::Full));
        let max = vec![Packet { vnet: None, data: &[1] }; MAX_PACKETS];
        encode(hdr(0, 0, 0), &max, &mut out).unwrap();
        assert_eq!(decode(&out).unwrap().len(), MAX_PACKETS);
        // unknown flag bits are cleared, so the frame decodes
        encode(hdr(0xF0, 0, 0), &[Packet { vnet: None, data: &[1] }], &mut out).unwrap();
        assert_eq!(decode(&out).unwrap().header().flags, 0);
    }

    #[test]
    fn writer_slot_commit_finish() {
        let mut w = BatchWriter::with_capacity(64);
        assert_eq!(w.capacity(), 64);
        assert!(w.is_empty());
        assert_eq!(w.len(), HEADER_LEN);
        assert_eq!(w.remaining(), 40);
        assert_eq!(w.last_entry(), None);
        let slot = w.slot(1500);
        assert_eq!(slot.len(), 36);
        slot[..3].copy_from_slice(&[0x45, 1, 2]);
        w.commit(3).unwrap();
        assert_eq!(w.count(), 1);
        assert_eq!(w.last_entry(), Some(&[0x45, 1, 2][..]));
        assert_eq!(w.slot(2).len(), 2);
        w.push(None, &[0x60, 9]).unwrap();
        assert_eq!(w.last_entry(), Some(&[0x60, 9][..]));
        let frame = w.finish(5, 6).to_vec();
        assert_eq!(frame.len(), HEADER_LEN + 7 + 6);
        let f = decode(&frame).unwrap();
        assert_eq!(f.header(), FrameHeader { flags: 0, count: 2, sender_queues: 0, seq: 5, timestamp_ns: 6 });
        let ps = collect(&f);
        assert_eq!(ps[0].data, &[0x45, 1, 2]);
        assert_eq!(ps[1].data, &[0x60, 9]);
        assert_eq!(w.as_bytes(), &frame[..]);
        assert_eq!(w.clone().into_inner(), frame);
    }

    #[test]
    fn writer_vnet_commit() {
        let mut w = BatchWriter::with_capacity(1024);
        w.reset(FLAG_VNET);
        assert_eq!(w.flags(), FLAG_VNET);
        let slot = w.slot(usize::MAX);
        slot[..VNET_HDR_LEN].copy_from_slice(&[1; VNET_HDR_LEN]);
        slot[VNET_HDR_LEN..VNET_HDR_LEN + 2].copy_from_slice(&[0x45, 0]);
        assert_eq!(w.commit(VNET_HDR_LEN), Err(PushError::TooShort));
        assert_eq!(w.commit(0), Err(PushError::TooShort));
        w.commit(VNET_HDR_LEN + 2).unwrap();
        assert_eq!(w.last_entry().map(<[u8]>::len), Some(12));
        assert_eq!(w.push(None, &[1]), Err(PushError::VnetMismatch));
        w.push(Some(&[2; VNET_HDR_LEN]), &[0x60]).unwrap();
        let frame = w.finish(1, 2);
        let f = decode(frame).unwrap();
        let ps = collect(&f);
        assert_eq!(ps[0], Packet { vnet: Some(&[1; VNET_HDR_LEN]), data: &[0x45, 0] });
        assert_eq!(ps[1], Packet { vnet: Some(&[2; VNET_HDR_LEN]), data: &[0x60] });
    }

    #[test]
    fn writer_full_and_too_big_leave_batch_unchanged() {
        let mut w = BatchWriter::with_capacity(HEADER_LEN + 10);
        w.push(None, &[1, 2, 3]).unwrap(); // 7 bytes used, 3 free
        let before = w.as_bytes().to_vec();
        assert_eq!(w.slot(100).len(), 0, "fewer than 5 bytes free");
        assert_eq!(w.commit(1), Err(PushError::Full));
        assert_eq!(w.push(None, &[1]), Err(PushError::Full));
        assert_eq!(w.as_bytes(), &before[..]);
        assert_eq!(w.count(), 1);

        let mut w = BatchWriter::with_capacity(MAX_FRAME_LEN);
        assert_eq!(w.commit(MAX_PACKET_LEN + 1), Err(PushError::TooBig));
        assert_eq!(w.push(None, &vec![0; MAX_PACKET_LEN + 1]), Err(PushError::TooBig));
        assert_eq!(w.commit(MAX_FRAME_LEN), Err(PushError::TooBig));
        w.reset(FLAG_VNET);
        w.commit(MAX_PACKET_LEN + VNET_HDR_LEN).unwrap();
        assert!(!w.is_empty() && w.count() == 1);
        assert_eq!(w.commit(usize::MAX), Err(PushError::TooBig));
    }

    #[test]
    fn writer_capacity_is_clamped() {
        assert_eq!(BatchWriter::with_capacity(0).capacity(), HEADER_LEN);
        assert_eq!(BatchWriter::with_capacity(0).slot(10).len(), 0);
        assert_eq!(BatchWriter::with_capacity(usize::MAX).capacity(), MAX_FRAME_LEN);
    }

    #[test]
    fn writer_max_packets() {
        let mut w = BatchWriter::with_capacity(MAX_FRAME_LEN);
        for _ in 0..MAX_PACKETS {
            w.push(None, &[0x45]).unwrap();
        }
        assert_eq!(w.slot(10).len(), 0);
        assert_eq!(w.push(None, &[0x45]), Err(PushError::Full));
        assert_eq!(w.commit(1), Err(PushError::Full));
        let f = decode(w.finish(0, 0)).unwrap();
        assert_eq!(f.packets().count(), MAX_PACKETS);
    }

    #[test]
    fn writer_pop_last() {
        let mut w = BatchWriter::with_capacity(256);
        w.pop_last(); // no-op when empty
        assert!(w.is_empty());
        w.push(None, &[1]).unwrap();
        w.push(None, &[2, 2]).unwrap();
        w.push(None, &[3, 3, 3]).unwrap();
        w.pop_last();
        assert_eq!(w.last_entry(), Some(&[2, 2][..]));
        w.pop_last(); // second pop: rescan path
        assert_eq!(w.last_entry(), Some(&[1][..]));
        w.push(None, &[4]).unwrap();
        let f = decode(w.finish(0, 0)).unwrap();
        let data: Vec<&[u8]> = f.packets().map(|p| p.data).collect();
        assert_eq!(data, vec![&[1][..], &[4][..]]);
        w.pop_last();
        w.pop_last();
        assert!(w.is_empty());
        assert_eq!(w.last_entry(), None);
        assert_eq!(w.len(), HEADER_LEN);
        w.pop_last();
        assert_eq!(w.len(), HEADER_LEN);
    }

    #[test]
    fn writer_reset_keeps_buffer_and_masks_flags() {
        let mut w = BatchWriter::with_capacity(128);
        w.push(None, &[1, 2]).unwrap();
        w.reset(0xF9);
        assert_eq!(w.flags(), FLAG_VNET);
        assert!(w.is_empty());
        assert_eq!(w.capacity(), 128);
        assert_eq!(w.len(), HEADER_LEN);
        let f = decode(w.finish(0, 0)).unwrap();
        assert_eq!(f.header().flags, FLAG_VNET);
        assert!(f.is_empty());
    }

    /// (flags, seq, timestamp, entries as (vnet header, packet bytes)).
    type ArbFrame = (u8, u64, u64, Vec<([u8; VNET_HDR_LEN], Vec<u8>)>);

    fn arb_frame() -> impl Strategy<Value = ArbFrame> {
        (0u8..2, any::<u64>(), any::<u64>(), proptest::collection::vec((any::<[u8; VNET_HDR_LEN]>(), proptest::collection::vec(any::<u8>(), 1..300)), 0..20))
    }

    proptest! {
        #[test]
        fn prop_decode_encode_roundtrip((flags, seq, ts, pkts) in arb_frame(), queues in 0u8..=16) {
            let vnet = flags & FLAG_VNET != 0;
            let packets: Vec<Packet<'_>> = pkts
                .iter()
                .map(|(v, d)| Packet { vnet: vnet.then_some(v), data: d })
                .collect();
            let mut out = Vec::new();
            encode(FrameHeader { flags, count: 999, sender_queues: queues, seq, timestamp_ns: ts }, &packets, &mut out).unwrap();
            let f = decode(&out).unwrap();
            prop_assert_eq!(f.header(), FrameHeader { flags, count: packets.len() as u16, sender_queues: queues, seq, timestamp_ns: ts });
            prop_assert_eq!(f.packets().collect::<Vec<_>>(), packets.clone());

            // the writer produces the same bytes, via push and via slot/commit
            let mut w = BatchWriter::with_capacity(out.len());
            w.set_sender_queues(queues);
            w.reset(flags);
            for p in &packets {
                w.push(p.vnet, p.data).unwrap();
            }
            prop_assert_eq!(w.finish(seq, ts), &out[..]);
            w.reset(flags);
            for p in &packets {
                let vl = if vnet { VNET_HDR_LEN } else { 0 };
                let n = vl + p.data.len();
                let slot = w.slot(n);
                prop_assert_eq!(slot.len(), n);
                if let Some(v) = p.vnet { slot[..vl].copy_from_slice(v); }
                slot[vl..].copy_from_slice(p.data);
                w.commit(n).unwrap();
                prop_assert_eq!(w.last_entry(), Some(&slot_bytes(p)[..]));
            }
            prop_assert_eq!(w.finish(seq, ts), &out[..]);
            // and reads its entries back as they went in
            let entries: Vec<Vec<u8>> = w.entries().map(<[u8]>::to_vec).collect();
            prop_assert_eq!(entries, packets.iter().map(slot_bytes).collect::<Vec<_>>());
        }

        #[test]
        fn prop_decode_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(f) = decode(&body) {
                prop_assert_eq!(f.packets().count(), f.len());
            }
        }

        #[test]
        fn prop_decode_never_panics_on_valid_prefix(
            (flags, seq, ts, pkts) in arb_frame(),
            cut in any::<proptest::sample::Index>(),
            flip in any::<proptest::sample::Index>(),
            bits in any::<u8>(),
        ) {
            let vnet = flags & FLAG_VNET != 0;
            let packets: Vec<Packet<'_>> = pkts
                .iter()
                .map(|(v, d)| Packet { vnet: vnet.then_some(v), data: d })
                .collect();
            let mut out = Vec::new();
            encode(FrameHeader { flags, count: 0, sender_queues: 0, seq, timestamp_ns: ts }, &packets, &mut out).unwrap();
            let i = flip.index(out.len());
            out[i] ^= bits;
            let cut = cut.index(out.len() + 1);
            if let Ok(f) = decode(&out[..cut]) {
                prop_assert_eq!(f.packets().count(), f.len());
            }
        }
    }

    fn slot_bytes(p: &Packet<'_>) -> Vec<u8> {
        let mut v = p.vnet.map(|v| v.to_vec()).unwrap_or_default();
        v.extend_from_slice(p.data);
        v
    }
}
