//! AMQP 0-9-1 framing for every connection tunbus opens: the handful of methods it needs,
//! encoded and parsed without I/O (pure, like `codec/`). Runs on whichever thread owns the
//! connection; on the hot path (each publish and delivery).
//!
//! Why our own: the data path used lapin, where every message crossed two extra threads
//! (our task → lapin's I/O loop on send; I/O loop → our task on receive), and those
//! hand-offs dominated the profile (docs/decisions/0010-own-amqp-data-path.md). tunbus only
//! ever opens a connection, declares and binds queues, publishes, consumes and acks, so its
//! protocol fits in this file; since decision 0015 the control connections (the name check,
//! `agent peers`, the ioppytest control messages, the router, captures) use it too, and
//! lapin is gone.
//!
//! A frame is `type:u8 channel:u16 size:u32 payload[size] 0xCE`; a method payload is
//! `class:u16 method:u16 arguments`. Strings are `u8`-length ("short") or `u32`-length
//! ("long"); consecutive bit arguments share an octet. Every length read from the broker is
//! checked before use: a bad frame is an [`Error`], never a panic.

use std::fmt;

pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";
pub const FRAME_METHOD: u8 = 1;
pub const FRAME_HEADER: u8 = 2;
pub const FRAME_BODY: u8 = 3;
pub const FRAME_HEARTBEAT: u8 = 8;
pub const FRAME_END: u8 = 0xCE;
/// Frame type, channel and size.
pub const FRAME_HEADER_LEN: usize = 7;
/// What a frame adds around its payload (header and end octet).
pub const FRAME_OVERHEAD: usize = FRAME_HEADER_LEN + 1;
/// The smallest frame size AMQP allows a peer to choose.
pub const FRAME_MIN_SIZE: u32 = 4096;

/// (class, method) identifiers of the methods a data link sends or expects.
pub mod method {
    pub const CONNECTION_START: (u16, u16) = (10, 10);
    pub const CONNECTION_START_OK: (u16, u16) = (10, 11);
    pub const CONNECTION_TUNE: (u16, u16) = (10, 30);
    pub const CONNECTION_TUNE_OK: (u16, u16) = (10, 31);
    pub const CONNECTION_OPEN: (u16, u16) = (10, 40);
    pub const CONNECTION_OPEN_OK: (u16, u16) = (10, 41);
    pub const CONNECTION_CLOSE: (u16, u16) = (10, 50);
    pub const CONNECTION_CLOSE_OK: (u16, u16) = (10, 51);
    pub const CONNECTION_SECURE: (u16, u16) = (10, 20);
    pub const CONNECTION_BLOCKED: (u16, u16) = (10, 60);
    pub const CONNECTION_UNBLOCKED: (u16, u16) = (10, 61);
    pub const CHANNEL_OPEN: (u16, u16) = (20, 10);
    pub const CHANNEL_OPEN_OK: (u16, u16) = (20, 11);
    pub const CHANNEL_CLOSE: (u16, u16) = (20, 40);
    pub const CHANNEL_CLOSE_OK: (u16, u16) = (20, 41);
    pub const EXCHANGE_DECLARE: (u16, u16) = (40, 10);
    pub const EXCHANGE_DECLARE_OK: (u16, u16) = (40, 11);
    pub const QUEUE_DECLARE: (u16, u16) = (50, 10);
    pub const QUEUE_DECLARE_OK: (u16, u16) = (50, 11);
    pub const QUEUE_BIND: (u16, u16) = (50, 20);
    pub const QUEUE_BIND_OK: (u16, u16) = (50, 21);
    pub const QUEUE_DELETE: (u16, u16) = (50, 40);
    pub const QUEUE_DELETE_OK: (u16, u16) = (50, 41);
    pub const QUEUE_UNBIND: (u16, u16) = (50, 50);
    pub const QUEUE_UNBIND_OK: (u16, u16) = (50, 51);
    pub const BASIC_QOS: (u16, u16) = (60, 10);
    pub const BASIC_QOS_OK: (u16, u16) = (60, 11);
    pub const BASIC_CONSUME: (u16, u16) = (60, 20);
    pub const BASIC_CONSUME_OK: (u16, u16) = (60, 21);
    pub const BASIC_CANCEL: (u16, u16) = (60, 30);
    pub const BASIC_CANCEL_OK: (u16, u16) = (60, 31);
    pub const BASIC_RETURN: (u16, u16) = (60, 50);
    pub const BASIC_PUBLISH: (u16, u16) = (60, 40);
    pub const BASIC_DELIVER: (u16, u16) = (60, 60);
    pub const BASIC_ACK: (u16, u16) = (60, 80);
}

/// The basic class, in content headers.
const CLASS_BASIC: u16 = 60;

/// Why bytes from the broker are not a frame we can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The frame does not end with 0xCE: the stream is out of step.
    BadFrameEnd,
    /// A frame larger than the negotiated maximum.
    FrameTooLarge { size: u32, max: u32 },
    /// A method's arguments end before a field does.
    Truncated,
    /// A string that is not UTF-8 where one is required.
    NotUtf8,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::BadFrameEnd => write!(f, "AMQP frame without its end octet (stream out of step)"),
            Error::FrameTooLarge { size, max } => write!(f, "AMQP frame of {size} bytes exceeds the negotiated {max}"),
            Error::Truncated => write!(f, "AMQP method arguments are truncated"),
            Error::NotUtf8 => write!(f, "AMQP string is not UTF-8"),
        }
    }
}

impl std::error::Error for Error {}

/// One frame, borrowed from the read buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub kind: u8,
    pub channel: u16,
    pub payload: &'a [u8],
}

/// The first complete frame at the start of `buf` and its total length, `Ok(None)` when more
/// bytes are needed.
pub fn parse_frame(buf: &[u8], frame_max: u32) -> Result<Option<(Frame<'_>, usize)>, Error> {
    if buf.len() < FRAME_HEADER_LEN {
        return Ok(None);
    }
    let kind = buf[0];
    let channel = u16::from_be_bytes([buf[1], buf[2]]);
    let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]);
    if size > frame_max {
        return Err(Error::FrameTooLarge { size, max: frame_max });
    }
    let total = FRAME_OVERHEAD + size as usize;
    if buf.len() < total {
        return Ok(None);
    }
    if buf[total - 1] != FRAME_END {
        return Err(Error::BadFrameEnd);
    }
    Ok(Some((Frame { kind, channel, payload: &buf[FRAME_HEADER_LEN..total - 1] }, total)))
}

/// The 7-byte header of a frame of `size` payload bytes.
pub fn frame_header(kind: u8, channel: u16, size: u32) -> [u8; FRAME_HEADER_LEN] {
    let c = channel.to_be_bytes();
    let s = size.to_be_bytes();
    [kind, c[0], c[1], s[0], s[1], s[2], s[3]]
}

// ---------------------------------------------------------------------------------------
// Reading arguments.

/// A cursor over method arguments; every read checks the length first.
#[derive(Clone)]
pub struct Args<'a> {
    buf: &'a [u8],
    bits: Option<(u8, u8)>,
}

impl<'a> Args<'a> {
    pub fn new(buf: &'a [u8]) -> Args<'a> {
        Args { buf, bits: None }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        self.bits = None;
        if self.buf.len() < n {
            return Err(Error::Truncated);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    pub fn octet(&mut self) -> Result<u8, Error> {
        Ok(self.take(1)?[0])
    }

    pub fn short(&mut self) -> Result<u16, Error> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub fn long(&mut self) -> Result<u32, Error> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn longlong(&mut self) -> Result<u64, Error> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    pub fn shortstr(&mut self) -> Result<&'a [u8], Error> {
        let n = self.octet()? as usize;
        self.take(n)
    }

    pub fn longstr(&mut self) -> Result<&'a [u8], Error> {
        let n = self.long()? as usize;
        self.take(n)
    }

    /// The arguments not read yet.
    pub fn rest(&self) -> &'a [u8] {
        self.buf
    }

    /// The next bit; consecutive bits share an octet, least significant first.
    pub fn bit(&mut self) -> Result<bool, Error> {
        let (octet, index) = match self.bits {
            Some((o, i)) if i < 8 => (o, i),
            _ => (self.octet()?, 0),
        };
        self.bits = Some((octet, index + 1));
        Ok(octet & (1 << index) != 0)
    }
}

/// A method frame's class and method identifiers and its arguments.
pub fn method_of(payload: &[u8]) -> Result<((u16, u16), Args<'_>), Error> {
    let mut a = Args::new(payload);
    let class = a.short()?;
    let method = a.short()?;
    Ok(((class, method), a))
}

/// A `connection.close` or `channel.close`: the broker's reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Close {
    pub code: u16,
    pub text: String,
}

impl Close {
    pub fn parse(mut a: Args<'_>) -> Result<Close, Error> {
        let code = a.short()?;
        let text = String::from_utf8_lossy(a.shortstr()?).into_owned();
        Ok(Close { code, text })
    }
}

impl fmt::Display for Close {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.text)
    }
}

/// `connection.tune`: the broker's limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tune {
    pub channel_max: u16,
    pub frame_max: u32,
    pub heartbeat: u16,
}

impl Tune {
    pub fn parse(mut a: Args<'_>) -> Result<Tune, Error> {
        Ok(Tune { channel_max: a.short()?, frame_max: a.long()?, heartbeat: a.short()? })
    }
}

/// `basic.deliver`: which message arrived and under which key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deliver<'a> {
    pub delivery_tag: u64,
    pub routing_key: &'a [u8],
}

impl<'a> Deliver<'a> {
    pub fn parse(mut a: Args<'a>) -> Result<Deliver<'a>, Error> {
        let _consumer_tag = a.shortstr()?;
        let delivery_tag = a.longlong()?;
        let _redelivered = a.bit()?;
        let _exchange = a.shortstr()?;
        let routing_key = a.shortstr()?;
        Ok(Deliver { delivery_tag, routing_key })
    }
}

/// The body size announced by a content header frame.
pub fn content_body_size(payload: &[u8]) -> Result<u64, Error> {
    let mut a = Args::new(payload);
    let _class = a.short()?;
    let _weight = a.short()?;
    a.longlong()
}

/// A content header: the body size and the properties a receiver looks at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ContentHeader<'a> {
    pub body_size: u64,
    pub content_type: Option<&'a [u8]>,
    /// Set by the publisher and, on RabbitMQ, checked against the publisher's login.
    pub user_id: Option<&'a [u8]>,
    /// What a request is answered with (ioppytest's `sniffing.*` requests).
    pub correlation_id: Option<&'a [u8]>,
}

/// Property flag bits of the basic class, most significant first (AMQP 0-9-1, 4.2.6.1).
mod prop {
    pub const CONTENT_TYPE: u16 = 1 << 15;
    pub const CONTENT_ENCODING: u16 = 1 << 14;
    pub const HEADERS: u16 = 1 << 13;
    pub const DELIVERY_MODE: u16 = 1 << 12;
    pub const PRIORITY: u16 = 1 << 11;
    pub const CORRELATION_ID: u16 = 1 << 10;
    pub const REPLY_TO: u16 = 1 << 9;
    pub const EXPIRATION: u16 = 1 << 8;
    pub const MESSAGE_ID: u16 = 1 << 7;
    pub const TIMESTAMP: u16 = 1 << 6;
    pub const TYPE: u16 = 1 << 5;
    pub const USER_ID: u16 = 1 << 4;
    pub const APP_ID: u16 = 1 << 3;
    pub const CLUSTER_ID: u16 = 1 << 2;
    /// Another flags word follows (never used by RabbitMQ for the basic class).
    pub const CONTINUATION: u16 = 1;
}

impl<'a> ContentHeader<'a> {
    /// Parses a content header frame's payload, properties included. Every field is
    /// length-checked; a header that ends early is [`Error::Truncated`].
    pub fn parse(payload: &'a [u8]) -> Result<ContentHeader<'a>, Error> {
        let mut a = Args::new(payload);
        let _class = a.short()?;
        let _weight = a.short()?;
        let body_size = a.longlong()?;
        let mut flags = a.short()?;
        let first = flags;
        while flags & prop::CONTINUATION != 0 {
            flags = a.short()?; // further flag words name properties the basic class has not got
        }
        let mut h = ContentHeader { body_size, content_type: None, user_id: None, correlation_id: None };
        let f = first;
        if f & prop::CONTENT_TYPE != 0 {
            h.content_type = Some(a.shortstr()?);
        }
        if f & prop::CONTENT_ENCODING != 0 {
            a.shortstr()?;
        }
        if f & prop::HEADERS != 0 {
            a.longstr()?; // a table: its length, then its entries, skipped whole
        }
        if f & prop::DELIVERY_MODE != 0 {
            a.octet()?;
        }
        if f & prop::PRIORITY != 0 {
            a.octet()?;
        }
        if f & prop::CORRELATION_ID != 0 {
            h.correlation_id = Some(a.shortstr()?);
        }
        for bit in [prop::REPLY_TO, prop::EXPIRATION, prop::MESSAGE_ID] {
            if f & bit != 0 {
                a.shortstr()?;
            }
        }
        if f & prop::TIMESTAMP != 0 {
            a.longlong()?;
        }
        if f & prop::TYPE != 0 {
            a.shortstr()?;
        }
        if f & prop::USER_ID != 0 {
            h.user_id = Some(a.shortstr()?);
        }
        for bit in [prop::APP_ID, prop::CLUSTER_ID] {
            if f & bit != 0 {
                a.shortstr()?;
            }
        }
        Ok(h)
    }
}

// ---------------------------------------------------------------------------------------
// Writing.

/// A value in an argument table (the types a data link uses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value<'a> {
    Bool(bool),
    I32(i32),
    I64(i64),
    Str(&'a str),
    Table(&'a [(&'a str, Value<'a>)]),
}

/// Builds frames into a reusable buffer. Strings longer than their length field allows are
/// cut to fit (names and keys are validated long before they get here).
#[derive(Default)]
pub struct Writer {
    pub buf: Vec<u8>,
    bits: Option<(usize, u8)>,
    frame_start: Option<usize>,
}

impl Writer {
    pub fn new() -> Writer {
        Writer::default()
    }

    pub fn clear(&mut self) {
        self.buf.clear();
        self.bits = None;
        self.frame_start = None;
    }

    /// Opens a frame; [`Writer::end_frame`] fills in its size.
    pub fn begin_frame(&mut self, kind: u8, channel: u16) -> &mut Self {
        self.bits = None;
        self.frame_start = Some(self.buf.len());
        self.buf.extend_from_slice(&frame_header(kind, channel, 0));
        self
    }

    pub fn end_frame(&mut self) -> &mut Self {
        self.bits = None;
        if let Some(start) = self.frame_start.take() {
            let size = (self.buf.len() - start - FRAME_HEADER_LEN) as u32;
            self.buf[start + 3..start + 7].copy_from_slice(&size.to_be_bytes());
            self.buf.push(FRAME_END);
        }
        self
    }

    /// A whole method frame: `args` writes the arguments.
    pub fn method(&mut self, channel: u16, id: (u16, u16), args: impl FnOnce(&mut Writer)) -> &mut Self {
        self.begin_frame(FRAME_METHOD, channel);
        self.short(id.0).short(id.1);
        args(self);
        self.end_frame()
    }

    pub fn octet(&mut self, v: u8) -> &mut Self {
        self.bits = None;
        self.buf.push(v);
        self
    }

    pub fn short(&mut self, v: u16) -> &mut Self {
        self.bits = None;
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn long(&mut self, v: u32) -> &mut Self {
        self.bits = None;
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn longlong(&mut self, v: u64) -> &mut Self {
        self.bits = None;
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub fn shortstr(&mut self, s: &[u8]) -> &mut Self {
        let s = &s[..s.len().min(255)];
        self.octet(s.len() as u8);
        self.buf.extend_from_slice(s);
        self
    }

    pub fn longstr(&mut self, s: &[u8]) -> &mut Self {
        self.long(s.len().min(u32::MAX as usize) as u32);
        self.buf.extend_from_slice(s);
        self
    }

    /// The next bit argument (shares an octet with the bits just before it).
    pub fn bit(&mut self, v: bool) -> &mut Self {
        let (at, index) = match self.bits {
            Some((at, i)) if i < 8 => (at, i),
            _ => {
                self.buf.push(0);
                (self.buf.len() - 1, 0)
            }
        };
        if v {
            self.buf[at] |= 1 << index;
        }
        self.bits = Some((at, index + 1));
        self
    }

    pub fn table(&mut self, entries: &[(&str, Value<'_>)]) -> &mut Self {
        let at = self.buf.len();
        self.long(0);
        for (name, value) in entries {
            self.shortstr(name.as_bytes());
            self.value(value);
        }
        let size = (self.buf.len() - at - 4) as u32;
        self.buf[at..at + 4].copy_from_slice(&size.to_be_bytes());
        self.bits = None;
        self
    }

    fn value(&mut self, v: &Value<'_>) {
        match v {
            Value::Bool(b) => {
                self.octet(b't').octet(u8::from(*b));
            }
            Value::I32(i) => {
                self.octet(b'I').long(*i as u32);
            }
            Value::I64(i) => {
                self.octet(b'l').longlong(*i as u64);
            }
            Value::Str(s) => {
                self.octet(b'S').longstr(s.as_bytes());
            }
            Value::Table(t) => {
                self.octet(b'F').table(t);
            }
        }
    }

    /// A content header frame for a basic message of `body_size` bytes.
    pub fn content_header(&mut self, channel: u16, body_size: u64, props: &Properties<'_>) -> &mut Self {
        self.begin_frame(FRAME_HEADER, channel);
        self.short(CLASS_BASIC).short(0).longlong(body_size);
        props.write(self);
        self.end_frame()
    }

    /// `basic.publish` and its content header (the body frames follow, written by the caller).
    pub fn publish(&mut self, channel: u16, exchange: &[u8], key: &[u8], body_size: u64, props: &Properties<'_>) -> &mut Self {
        self.method(channel, method::BASIC_PUBLISH, |w| {
            w.short(0).shortstr(exchange).shortstr(key).bit(false).bit(false);
        });
        self.content_header(channel, body_size, props)
    }
}

/// The basic properties a data link sets (ioppytest receivers want the JSON ones).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Properties<'a> {
    pub content_type: Option<&'a str>,
    pub content_encoding: Option<&'a str>,
    /// An empty `headers` table, as the Python agent sends.
    pub empty_headers: bool,
    pub delivery_mode: Option<u8>,
    /// The publisher's broker user: RabbitMQ refuses a message whose `user_id` is not the
    /// connection's login, so receivers can trust it.
    pub user_id: Option<&'a str>,
    /// The request a reply answers.
    pub correlation_id: Option<&'a str>,
}

impl Properties<'_> {
    fn write(&self, w: &mut Writer) {
        let mut flags = 0u16;
        if self.content_type.is_some() {
            flags |= prop::CONTENT_TYPE;
        }
        if self.content_encoding.is_some() {
            flags |= prop::CONTENT_ENCODING;
        }
        if self.empty_headers {
            flags |= prop::HEADERS;
        }
        if self.delivery_mode.is_some() {
            flags |= prop::DELIVERY_MODE;
        }
        if self.correlation_id.is_some() {
            flags |= prop::CORRELATION_ID;
        }
        if self.user_id.is_some() {
            flags |= prop::USER_ID;
        }
        w.short(flags);
        if let Some(t) = self.content_type {
            w.shortstr(t.as_bytes());
        }
        if let Some(e) = self.content_encoding {
            w.shortstr(e.as_bytes());
        }
        if self.empty_headers {
            w.table(&[]);
        }
        if let Some(m) = self.delivery_mode {
            w.octet(m);
        }
        if let Some(c) = self.correlation_id {
            w.shortstr(c.as_bytes());
        }
        if let Some(u) = self.user_id {
            w.shortstr(u.as_bytes());
        }
    }
}

/// Lays out the frames of one published message for a vectored write that leaves the body
/// where it is: into `w`, the `basic.publish` method and content header frames, then for
/// each body frame its header (preceded, from the second on, by the end octet of the one
/// before), then the last end octet. Returns the length of the method and header frames
/// (the prefix). [`publish_iov`] pairs these separators with the body's chunks.
pub fn publish_frames(w: &mut Writer, channel: u16, exchange: &[u8], key: &[u8], props: &Properties<'_>, body: &[u8], frame_max: u32) -> usize {
    let chunk = body_chunk(frame_max);
    w.clear();
    w.publish(channel, exchange, key, body.len() as u64, props);
    let prefix = w.buf.len();
    for (i, part) in body.chunks(chunk).enumerate() {
        if i > 0 {
            w.buf.push(FRAME_END);
        }
        w.buf.extend_from_slice(&frame_header(FRAME_BODY, channel, part.len() as u32));
    }
    if !body.is_empty() {
        w.buf.push(FRAME_END);
    }
    prefix
}

/// Body bytes per frame at `frame_max` (at least one: `frame_max` is never below
/// [`FRAME_MIN_SIZE`] once negotiated).
pub fn body_chunk(frame_max: u32) -> usize {
    (frame_max as usize).saturating_sub(FRAME_OVERHEAD).max(1)
}

/// The slices of body frames `first..` of a message laid out by [`publish_frames`]
/// (`seps` is the writer's buffer, `prefix` its return value), into `iov`, at most
/// `(iov.len() - 1) / 2` frames. Returns how many slices were filled and the first frame
/// not yet in them (the message is complete when that is [`body_frames`]). Frame 0 carries
/// the method and header frames with it.
pub fn publish_iov<'a>(seps: &'a [u8], prefix: usize, body: &'a [u8], frame_max: u32, first: usize, iov: &mut [std::io::IoSlice<'a>]) -> (usize, usize) {
    let chunk = body_chunk(frame_max);
    if body.is_empty() {
        iov[0] = std::io::IoSlice::new(&seps[..prefix]);
        return (1, 1);
    }
    let frames = body_frames(body.len(), frame_max);
    let mut n = 0;
    let mut i = first;
    while i < frames && n + 3 <= iov.len() {
        // Separator i starts after the prefix's first header, then 8 bytes per frame.
        let (start, len) =
            if i == 0 { (0, prefix + FRAME_HEADER_LEN) } else { (prefix + FRAME_HEADER_LEN + (i - 1) * (1 + FRAME_HEADER_LEN), 1 + FRAME_HEADER_LEN) };
        iov[n] = std::io::IoSlice::new(&seps[start..start + len]);
        let end = ((i + 1) * chunk).min(body.len());
        iov[n + 1] = std::io::IoSlice::new(&body[i * chunk..end]);
        n += 2;
        i += 1;
    }
    if i == frames {
        iov[n] = std::io::IoSlice::new(&seps[seps.len() - 1..]);
        n += 1;
    }
    (n, i)
}

/// How many body frames a body of `len` bytes takes at `frame_max` (an empty body counts
/// as one step: its method and header frames).
pub fn body_frames(len: usize, frame_max: u32) -> usize {
    len.div_ceil(body_chunk(frame_max)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frames(mut buf: &[u8]) -> Vec<(u8, u16, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some((f, n)) = parse_frame(buf, 1 << 20).unwrap() {
            out.push((f.kind, f.channel, f.payload.to_vec()));
            buf = &buf[n..];
        }
        assert!(buf.is_empty(), "trailing bytes");
        out
    }

    #[test]
    fn method_frames_round_trip() {
        let mut w = Writer::new();
        w.method(3, method::QUEUE_BIND, |w| {
            w.short(0).shortstr(b"q").shortstr(b"amq.topic").shortstr(b"tunbus.v1.*").bit(false).table(&[]);
        });
        let f = frames(&w.buf);
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].0, f[0].1), (FRAME_METHOD, 3));
        let (id, mut a) = method_of(&f[0].2).unwrap();
        assert_eq!(id, method::QUEUE_BIND);
        assert_eq!(a.short().unwrap(), 0);
        assert_eq!(a.shortstr().unwrap(), b"q");
        assert_eq!(a.shortstr().unwrap(), b"amq.topic");
        assert_eq!(a.shortstr().unwrap(), b"tunbus.v1.*");
        assert!(!a.bit().unwrap());
        assert_eq!(a.long().unwrap(), 0);
        assert_eq!(a.octet(), Err(Error::Truncated));
    }

    #[test]
    fn bits_share_octets() {
        let mut w = Writer::new();
        w.bit(true).bit(false).bit(true).short(7).bit(true);
        assert_eq!(w.buf, [0b101, 0, 7, 1]);
        let mut a = Args::new(&w.buf);
        assert_eq!([a.bit().unwrap(), a.bit().unwrap(), a.bit().unwrap()], [true, false, true]);
        assert_eq!(a.short().unwrap(), 7);
        assert!(a.bit().unwrap());
        // nine bits take two octets
        let mut w = Writer::new();
        for i in 0..9 {
            w.bit(i % 2 == 0);
        }
        assert_eq!(w.buf, [0b0101_0101, 1]);
    }

    #[test]
    fn tables_encode_as_rabbitmq_expects() {
        let mut w = Writer::new();
        w.table(&[("x-max-length", Value::I32(4096)), ("x-max-length-bytes", Value::I64(1 << 22))]);
        let mut expected = Vec::new();
        let mut entries = Vec::new();
        entries.extend_from_slice(&[12]);
        entries.extend_from_slice(b"x-max-length");
        entries.push(b'I');
        entries.extend_from_slice(&4096i32.to_be_bytes());
        entries.push(18);
        entries.extend_from_slice(b"x-max-length-bytes");
        entries.push(b'l');
        entries.extend_from_slice(&(1i64 << 22).to_be_bytes());
        expected.extend_from_slice(&(entries.len() as u32).to_be_bytes());
        expected.extend_from_slice(&entries);
        assert_eq!(w.buf, expected);
    }

    #[test]
    fn publish_carries_key_size_and_properties() {
        let mut w = Writer::new();
        let props = Properties {
            content_type: Some("application/json"),
            content_encoding: Some("utf-8"),
            empty_headers: true,
            delivery_mode: Some(2),
            user_id: Some("h1"),
            correlation_id: None,
        };
        w.publish(1, b"amq.topic", b"fromAgent.a.ip.tun.packet.raw", 1234, &props);
        let f = frames(&w.buf);
        assert_eq!(f.len(), 2);
        let (id, mut a) = method_of(&f[0].2).unwrap();
        assert_eq!(id, method::BASIC_PUBLISH);
        a.short().unwrap();
        assert_eq!(a.shortstr().unwrap(), b"amq.topic");
        assert_eq!(a.shortstr().unwrap(), b"fromAgent.a.ip.tun.packet.raw");
        assert_eq!(f[1].0, FRAME_HEADER);
        assert_eq!(content_body_size(&f[1].2).unwrap(), 1234);
        let mut h = Args::new(&f[1].2[12..]);
        assert_eq!(h.short().unwrap(), 0b1111 << 12 | 1 << 4);
        assert_eq!(h.shortstr().unwrap(), b"application/json");
        assert_eq!(h.shortstr().unwrap(), b"utf-8");
        assert_eq!(h.longstr().unwrap(), b"");
        assert_eq!(h.octet().unwrap(), 2);
        assert_eq!(h.shortstr().unwrap(), b"h1");
        let parsed = ContentHeader::parse(&f[1].2).unwrap();
        assert_eq!(parsed, ContentHeader { body_size: 1234, content_type: Some(b"application/json"), user_id: Some(b"h1"), correlation_id: None });
    }

    #[test]
    fn deliver_parses() {
        let mut w = Writer::new();
        w.method(2, method::BASIC_DELIVER, |w| {
            w.shortstr(b"ctag").longlong(77).bit(true).shortstr(b"amq.topic").shortstr(b"tunbus.v1.1-2-3-4.5");
        });
        let (f, _) = parse_frame(&w.buf, 4096).unwrap().unwrap();
        let (id, a) = method_of(f.payload).unwrap();
        assert_eq!(id, method::BASIC_DELIVER);
        let d = Deliver::parse(a).unwrap();
        assert_eq!(d, Deliver { delivery_tag: 77, routing_key: b"tunbus.v1.1-2-3-4.5" });
    }

    #[test]
    fn frames_are_checked() {
        let mut w = Writer::new();
        w.method(0, method::CONNECTION_CLOSE_OK, |_| {});
        let good = w.buf.clone();
        for cut in 0..good.len() {
            assert_eq!(parse_frame(&good[..cut], 4096), Ok(None), "cut at {cut}");
        }
        let mut bad = good.clone();
        *bad.last_mut().unwrap() = 0;
        assert_eq!(parse_frame(&bad, 4096), Err(Error::BadFrameEnd));
        assert_eq!(parse_frame(&good, 3), Err(Error::FrameTooLarge { size: 4, max: 3 }));
    }

    proptest! {
        #[test]
        fn parsing_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(Some((f, _))) = parse_frame(&bytes, 1 << 16) {
                if let Ok((_, a)) = method_of(f.payload) {
                    let _ = Deliver::parse(a);
                }
                let _ = content_body_size(f.payload);
                let _ = method_of(f.payload).map(|(_, a)| Close::parse(a));
                let _ = method_of(f.payload).map(|(_, a)| Tune::parse(a));
            }
        }
    }
}
