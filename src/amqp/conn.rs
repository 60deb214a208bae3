//! A blocking AMQP 0-9-1 connection for one data link, owned by one thread.
//!
//! Queue worker k owns the connection of link k: it writes each batch into the socket
//! itself and reads deliveries from it itself. No other thread touches it, so a packet
//! crosses no thread hand-off between the TUN and the broker
//! (docs/decisions/0010-own-amqp-data-path.md, 0014). Framing is in [`super::wire`].
//!
//! After the handshake the socket is non-blocking: [`Conn::read_some`] returns what has
//! arrived (the caller waits with `tun::wait_fd` or together with its TUN queue), and
//! [`Conn::publish`] writes a whole message with one `writev`, waiting at most
//! [`SEND_STALL`] for a broker that stopped reading. Heartbeats are off (the broker's socket
//! closes when it goes away, and a stalled broker is caught by [`SEND_STALL`] and TCP
//! keep-alive); one channel (1) per connection.

use std::io::{self, IoSlice, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use lapin::uri::{AMQPScheme, AMQPUri};

use super::wire::{self, method, Close, Frame, Properties, Tune, Value, Writer, FRAME_BODY, FRAME_END, FRAME_HEADER_LEN};
use crate::tun::{wait_fd, Interest};

/// The channel every data connection uses.
pub const CHANNEL: u16 = 1;
/// Longest a publish waits for a broker that does not read before the link gives up on it.
pub const SEND_STALL: Duration = Duration::from_secs(2);
/// Body frames per `writev` (the vector lives on the stack; 2 KiB-frame URLs still work,
/// in several calls).
pub const IOV_FRAMES: usize = 128;
/// Our frame size when the URL and the caller do not lower it (RabbitMQ's default maximum).
pub const DEFAULT_FRAME_MAX: u32 = 128 * 1024;

/// What went wrong with a data connection. Every variant ends the connection; the link
/// counts, logs once and reconnects.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad broker URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("cannot reach the broker at {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("broker connection: {0}")]
    Io(#[from] io::Error),
    #[error("broker sent a bad frame: {0}")]
    Protocol(#[from] wire::Error),
    #[error("the broker closed the connection: {0}")]
    Closed(Close),
    #[error("the broker closed channel 1: {0}")]
    ChannelClosed(Close),
    #[error("the broker sent {got:?} where {expected:?} was due")]
    Unexpected { expected: (u16, u16), got: (u16, u16) },
    #[error("the broker stopped reading for {0:?}")]
    Stalled(Duration),
}

/// One connection with channel 1 open.
pub struct Conn {
    stream: TcpStream,
    frame_max: u32,
    rbuf: Vec<u8>,
    rpos: usize,
    rlen: usize,
    w: Writer,
    /// How long a set-up method waits for its answer.
    setup_timeout: Duration,
}

/// What [`Conn::read_some`] found on the socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadState {
    /// New bytes were read.
    Data,
    /// Nothing is there now.
    Empty,
}

impl Conn {
    /// Connects, authenticates (PLAIN) and opens channel 1. `frame_max` lowers the frame size
    /// (the URL's `frame_max` and the broker's limit lower it further); `name` shows in the
    /// broker's management view.
    pub fn open(url: &str, name: &str, frame_max: Option<u32>, timeout: Duration) -> Result<Conn, Error> {
        let uri: AMQPUri = url.parse().map_err(|reason| Error::BadUrl { url: url.to_owned(), reason })?;
        if uri.scheme != AMQPScheme::AMQP {
            return Err(Error::BadUrl { url: url.to_owned(), reason: "data links speak plain amqp:// only".into() });
        }
        let addr = format!("{}:{}", uri.authority.host, uri.authority.port);
        let stream = connect(&addr, timeout).map_err(|source| Error::Connect { addr: addr.clone(), source })?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let wanted = [frame_max, uri.query.frame_max, Some(DEFAULT_FRAME_MAX)].into_iter().flatten().min().unwrap_or(DEFAULT_FRAME_MAX);
        let mut conn = Conn {
            stream,
            frame_max: wanted.max(wire::FRAME_MIN_SIZE),
            rbuf: Vec::new(),
            rpos: 0,
            rlen: 0,
            w: Writer::new(),
            setup_timeout: timeout,
        };
        // Room for the handshake; grown to the negotiated frame size below.
        conn.rbuf.resize(wire::FRAME_MIN_SIZE as usize * 2, 0);
        conn.handshake(&uri, name)?;
        conn.rbuf.resize(2 * (conn.frame_max as usize + wire::FRAME_OVERHEAD), 0);
        conn.stream.set_read_timeout(None)?;
        conn.stream.set_write_timeout(None)?;
        conn.stream.set_nonblocking(true)?;
        Ok(conn)
    }

    fn handshake(&mut self, uri: &AMQPUri, name: &str) -> Result<(), Error> {
        self.stream.write_all(wire::PROTOCOL_HEADER)?;
        let start = self.expect(0, method::CONNECTION_START)?;
        let mut a = wire::Args::new(&start);
        let (_major, _minor) = (a.octet()?, a.octet()?);
        let _server_properties = a.longstr()?;
        let mechanisms = String::from_utf8_lossy(a.longstr()?).into_owned();
        if !mechanisms.split(' ').any(|m| m == "PLAIN") {
            return Err(Error::BadUrl { url: uri.authority.host.clone(), reason: format!("the broker offers {mechanisms}, not PLAIN") });
        }
        let mut response = Vec::new();
        response.push(0);
        response.extend_from_slice(uri.authority.userinfo.username.as_bytes());
        response.push(0);
        response.extend_from_slice(uri.authority.userinfo.password.as_bytes());
        self.w.clear();
        self.w.method(0, method::CONNECTION_START_OK, |w| {
            w.table(&[
                ("product", Value::Str("tunbus")),
                ("version", Value::Str(env!("CARGO_PKG_VERSION"))),
                ("connection_name", Value::Str(name)),
                ("capabilities", Value::Table(&[])),
            ])
            .shortstr(b"PLAIN")
            .longstr(&response)
            .shortstr(b"en_US");
        });
        self.send()?;
        let tune = Tune::parse(wire::Args::new(&self.expect(0, method::CONNECTION_TUNE)?))?;
        if tune.frame_max != 0 {
            self.frame_max = self.frame_max.min(tune.frame_max);
        }
        let frame_max = self.frame_max;
        let vhost = uri.vhost.clone();
        self.w.clear();
        self.w.method(0, method::CONNECTION_TUNE_OK, |w| {
            w.short(tune.channel_max.clamp(1, 16)).long(frame_max).short(0);
        });
        self.w.method(0, method::CONNECTION_OPEN, |w| {
            w.shortstr(vhost.as_bytes()).shortstr(b"").bit(false);
        });
        self.send()?;
        self.expect(0, method::CONNECTION_OPEN_OK)?;
        self.call(method::CHANNEL_OPEN, method::CHANNEL_OPEN_OK, |w| {
            w.shortstr(b"");
        })?;
        Ok(())
    }

    /// Bytes sent that the broker has not acknowledged yet (0 if the kernel cannot say).
    pub fn unsent(&self) -> usize {
        crate::tun::unsent_bytes(self.stream.as_fd()).unwrap_or(0)
    }

    /// The socket, to wait on together with a TUN queue.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }

    // -----------------------------------------------------------------------------------
    // Synchronous methods (set-up; blocking with the handshake timeout or `SEND_STALL`).

    /// Sends method `id` on channel 1 and waits for `reply`; returns the reply's arguments.
    pub fn call(&mut self, id: (u16, u16), reply: (u16, u16), args: impl FnOnce(&mut Writer)) -> Result<Vec<u8>, Error> {
        self.w.clear();
        self.w.method(CHANNEL, id, args);
        self.send()?;
        self.expect(CHANNEL, reply)
    }

    pub fn exchange_declare(&mut self, exchange: &str) -> Result<(), Error> {
        self.call(method::EXCHANGE_DECLARE, method::EXCHANGE_DECLARE_OK, |w| {
            // passive, durable, auto-delete, internal, no-wait
            w.short(0).shortstr(exchange.as_bytes()).shortstr(b"topic");
            w.bit(false).bit(false).bit(true).bit(false).bit(false).table(&[]);
        })?;
        Ok(())
    }

    /// Declares an exclusive, auto-delete queue bounded to `max_messages` and `max_bytes`
    /// (the broker drops the oldest beyond them).
    pub fn queue_declare(&mut self, queue: &str, max_messages: i32, max_bytes: i64) -> Result<(), Error> {
        self.call(method::QUEUE_DECLARE, method::QUEUE_DECLARE_OK, |w| {
            // passive, durable, exclusive, auto-delete, no-wait
            w.short(0).shortstr(queue.as_bytes());
            w.bit(false).bit(false).bit(true).bit(true).bit(false);
            w.table(&[("x-max-length", Value::I32(max_messages)), ("x-max-length-bytes", Value::I64(max_bytes))]);
        })?;
        Ok(())
    }

    pub fn queue_bind(&mut self, queue: &str, exchange: &str, key: &str) -> Result<(), Error> {
        self.call(method::QUEUE_BIND, method::QUEUE_BIND_OK, |w| {
            w.short(0).shortstr(queue.as_bytes()).shortstr(exchange.as_bytes()).shortstr(key.as_bytes()).bit(false).table(&[]);
        })?;
        Ok(())
    }

    /// Sets the prefetch window and starts an exclusive consumer with manual acks.
    pub fn consume(&mut self, queue: &str, tag: &str, prefetch: u16) -> Result<(), Error> {
        self.call(method::BASIC_QOS, method::BASIC_QOS_OK, |w| {
            w.long(0).short(prefetch).bit(false);
        })?;
        self.call(method::BASIC_CONSUME, method::BASIC_CONSUME_OK, |w| {
            // no-local, no-ack, exclusive, no-wait
            w.short(0).shortstr(queue.as_bytes()).shortstr(tag.as_bytes());
            w.bit(false).bit(false).bit(true).bit(false).table(&[]);
        })?;
        Ok(())
    }

    /// Says goodbye and waits up to `wait` for the broker's answer (an exclusive queue is
    /// deleted with its connection).
    pub fn close(mut self, wait: Duration) {
        self.setup_timeout = wait;
        self.w.clear();
        self.w.method(0, method::CONNECTION_CLOSE, |w| {
            w.short(200).shortstr(b"agent stopping").short(0).short(0);
        });
        if self.send().is_ok() {
            let _ = self.expect(0, method::CONNECTION_CLOSE_OK);
        }
    }

    /// Writes what the writer holds, whole.
    fn send(&mut self) -> Result<(), Error> {
        write_all(&mut self.stream, &mut [IoSlice::new(&self.w.buf)])
    }

    /// Reads frames until method `want` arrives on `channel`; returns its arguments.
    /// Heartbeats and stray content are skipped; a close from the broker is answered and
    /// returned as the error.
    fn expect(&mut self, channel: u16, want: (u16, u16)) -> Result<Vec<u8>, Error> {
        loop {
            while let Some((frame, n)) = wire::parse_frame(&self.rbuf[self.rpos..self.rlen], self.frame_max)? {
                let got = if frame.kind == wire::FRAME_METHOD { Some(wire::method_of(frame.payload)?) } else { None };
                let result = match got {
                    Some((id, a)) if id == want && frame.channel == channel => Some(Ok(a.rest().to_vec())),
                    Some((method::CONNECTION_CLOSE, a)) => Some(Err(Error::Closed(Close::parse(a)?))),
                    Some((method::CHANNEL_CLOSE, a)) => Some(Err(Error::ChannelClosed(Close::parse(a)?))),
                    Some((id, _)) if frame.channel == channel && id.0 != 60 => Some(Err(Error::Unexpected { expected: want, got: id })),
                    _ => None,
                };
                self.rpos += n;
                if let Some(r) = result {
                    if let Err(e) = &r {
                        self.answer_close(e);
                    }
                    return r;
                }
            }
            self.compact();
            match self.stream.read(&mut self.rbuf[self.rlen..]) {
                Ok(0) => return Err(Error::Io(io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => self.rlen += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // After the handshake the socket is non-blocking: wait for the answer.
                    if !wait_fd(self.stream.as_fd(), Interest::Read, self.setup_timeout)? {
                        return Err(Error::Io(io::Error::new(io::ErrorKind::TimedOut, "the broker did not answer")));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Answers the broker's close (best effort: the connection ends either way).
    fn answer_close(&mut self, e: &Error) {
        self.w.clear();
        match e {
            Error::Closed(_) => self.w.method(0, method::CONNECTION_CLOSE_OK, |_| {}),
            Error::ChannelClosed(_) => self.w.method(CHANNEL, method::CHANNEL_CLOSE_OK, |_| {}),
            _ => return,
        };
        let _ = self.stream.write(&self.w.buf);
    }

    // -----------------------------------------------------------------------------------
    // The hot path (non-blocking socket).

    /// Reads what has arrived (non-blocking) behind the frames not yet taken.
    pub fn read_some(&mut self) -> Result<ReadState, Error> {
        self.compact();
        match self.stream.read(&mut self.rbuf[self.rlen..]) {
            Ok(0) => Err(Error::Io(io::Error::new(io::ErrorKind::UnexpectedEof, "the broker closed the socket"))),
            Ok(n) => {
                self.rlen += n;
                Ok(ReadState::Data)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => Ok(ReadState::Empty),
            Err(e) => Err(e.into()),
        }
    }

    /// The next complete frame already read, if any. Call [`Conn::consume_frame`] with its
    /// length once done with it.
    pub fn next_frame(&self) -> Result<Option<(Frame<'_>, usize)>, Error> {
        Ok(wire::parse_frame(&self.rbuf[self.rpos..self.rlen], self.frame_max)?)
    }

    pub fn consume_frame(&mut self, n: usize) {
        self.rpos += n;
    }

    /// Handles a frame that is not data: heartbeats and flow notices are ignored; a close is
    /// answered and returned as the error.
    pub fn control(&mut self, frame: Frame<'_>) -> Result<(), Error> {
        if frame.kind != wire::FRAME_METHOD {
            return Ok(());
        }
        let e = match wire::method_of(frame.payload)? {
            (method::CONNECTION_CLOSE, a) => Error::Closed(Close::parse(a)?),
            (method::CHANNEL_CLOSE, a) => Error::ChannelClosed(Close::parse(a)?),
            _ => return Ok(()),
        };
        self.answer_close(&e);
        Err(e)
    }

    /// Acknowledges every delivery up to `tag`.
    pub fn ack_multiple(&mut self, tag: u64) -> Result<(), Error> {
        let mut frame = [0u8; FRAME_HEADER_LEN + 4 + 8 + 1 + 1];
        frame[..FRAME_HEADER_LEN].copy_from_slice(&wire::frame_header(wire::FRAME_METHOD, CHANNEL, 13));
        frame[7..9].copy_from_slice(&method::BASIC_ACK.0.to_be_bytes());
        frame[9..11].copy_from_slice(&method::BASIC_ACK.1.to_be_bytes());
        frame[11..19].copy_from_slice(&tag.to_be_bytes());
        frame[19] = 1; // multiple
        frame[20] = FRAME_END;
        write_all(&mut self.stream, &mut [IoSlice::new(&frame)])
    }

    /// Publishes `body` to `exchange` under `key`: method, header and body frames written
    /// with `writev` ([`IOV_FRAMES`] body frames per call, so one call for any batch at the
    /// default frame size), the body never copied. No allocation once the writer has grown.
    pub fn publish(&mut self, exchange: &[u8], key: &[u8], props: &Properties<'_>, body: &[u8]) -> Result<(), Error> {
        let chunk = self.frame_max as usize - wire::FRAME_OVERHEAD;
        self.w.clear();
        self.w.publish(CHANNEL, exchange, key, body.len() as u64, props);
        let prefix = self.w.buf.len();
        // Body frame i is framed by separator i (the end octet of frame i-1, then the header
        // of frame i; the first has no end octet) and, after the last, one end octet.
        for (i, part) in body.chunks(chunk).enumerate() {
            if i > 0 {
                self.w.buf.push(FRAME_END);
            }
            self.w.buf.extend_from_slice(&wire::frame_header(FRAME_BODY, CHANNEL, part.len() as u32));
        }
        if body.is_empty() {
            // No body frame: the prefix is the whole message.
            return write_all(&mut self.stream, &mut [IoSlice::new(&self.w.buf[..prefix])]);
        }
        self.w.buf.push(FRAME_END);
        let seps = &self.w.buf;
        let mut at = prefix; // where separator i starts
        let mut parts = body.chunks(chunk).enumerate().peekable();
        while parts.peek().is_some() {
            let mut iov = [IoSlice::new(&[]); 2 * IOV_FRAMES + 1];
            let mut n = 0;
            for (i, part) in parts.by_ref().take(IOV_FRAMES) {
                let (start, len) = if i == 0 { (0, prefix + FRAME_HEADER_LEN) } else { (at, 1 + FRAME_HEADER_LEN) };
                iov[n] = IoSlice::new(&seps[start..start + len]);
                iov[n + 1] = IoSlice::new(part);
                n += 2;
                at = start + len;
            }
            if parts.peek().is_none() {
                iov[n] = IoSlice::new(&seps[at..at + 1]); // the last end octet
                n += 1;
            }
            write_all(&mut self.stream, &mut iov[..n])?;
        }
        Ok(())
    }
}

impl Conn {
    /// Moves unread bytes to the front when the buffer is empty or short of room for a frame.
    fn compact(&mut self) {
        if self.rpos == self.rlen {
            self.rpos = 0;
            self.rlen = 0;
        } else if self.rbuf.len() - self.rlen < self.frame_max as usize + wire::FRAME_OVERHEAD {
            self.rbuf.copy_within(self.rpos..self.rlen, 0);
            self.rlen -= self.rpos;
            self.rpos = 0;
        }
    }
}

/// TCP connect to the first address of `addr` that answers within `timeout`.
fn connect(addr: &str, timeout: Duration) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the host name resolves to no address");
    for a in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Writes all of `iov`, waiting (up to [`SEND_STALL`] without progress) when the socket is
/// full.
fn write_all(stream: &mut TcpStream, mut iov: &mut [IoSlice<'_>]) -> Result<(), Error> {
    let mut stalled_since: Option<Instant> = None;
    while !iov.is_empty() {
        match stream.write_vectored(iov) {
            Ok(0) => return Err(Error::Io(io::ErrorKind::WriteZero.into())),
            Ok(n) => {
                IoSlice::advance_slices(&mut iov, n);
                stalled_since = None;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let since = *stalled_since.get_or_insert_with(Instant::now);
                let left = SEND_STALL.saturating_sub(since.elapsed());
                if left.is_zero() {
                    return Err(Error::Stalled(SEND_STALL));
                }
                wait_fd(stream.as_fd(), Interest::Write, left)?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A connection over a local socket pair, past the handshake, and the peer's end.
    fn pair(frame_max: u32) -> (Conn, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        client.set_nonblocking(true).unwrap();
        let conn = Conn {
            stream: client,
            frame_max,
            rbuf: vec![0; 2 * (frame_max as usize + wire::FRAME_OVERHEAD)],
            rpos: 0,
            rlen: 0,
            w: Writer::new(),
            setup_timeout: Duration::from_secs(1),
        };
        (conn, server)
    }

    /// Reads one published message back: (routing key, body).
    fn read_message(peer: &mut TcpStream, frame_max: u32) -> (Vec<u8>, Vec<u8>) {
        let mut buf = Vec::new();
        let mut frames = Vec::new();
        let mut size = None;
        let mut body = Vec::new();
        let mut key = Vec::new();
        loop {
            while let Some((f, n)) = wire::parse_frame(&buf, frame_max).unwrap() {
                frames.push(f.kind);
                match f.kind {
                    wire::FRAME_METHOD => {
                        let (id, mut a) = wire::method_of(f.payload).unwrap();
                        assert_eq!(id, method::BASIC_PUBLISH);
                        a.short().unwrap();
                        a.shortstr().unwrap();
                        key = a.shortstr().unwrap().to_vec();
                    }
                    wire::FRAME_HEADER => size = Some(wire::content_body_size(f.payload).unwrap() as usize),
                    wire::FRAME_BODY => body.extend_from_slice(f.payload),
                    other => panic!("unexpected frame type {other}"),
                }
                buf.drain(..n);
                if size == Some(body.len()) {
                    assert!(buf.is_empty(), "bytes after the message");
                    return (key, body);
                }
            }
            let mut chunk = [0u8; 65536];
            let n = peer.read(&mut chunk).unwrap();
            assert!(n > 0, "connection closed mid-message after frames {frames:?}");
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    #[test]
    fn publish_frames_any_body_whole_and_in_order() {
        let frame_max = 4096;
        let chunk = frame_max as usize - wire::FRAME_OVERHEAD;
        let (mut conn, mut peer) = pair(frame_max);
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // Empty, one byte, exactly one frame, one more, and more frames than one writev takes.
        for len in [0, 1, chunk, chunk + 1, 3 * chunk + 17, (IOV_FRAMES + 3) * chunk + 5] {
            let body: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            let writer = std::thread::scope(|s| {
                let h = s.spawn(|| conn.publish(b"ex", b"some.key", &Properties::default(), &body));
                let got = read_message(&mut peer, frame_max);
                h.join().unwrap().unwrap();
                got
            });
            assert_eq!(writer.0, b"some.key");
            assert_eq!(writer.1.len(), len);
            assert!(writer.1 == body, "body of {len} bytes arrived changed");
        }
    }
}
