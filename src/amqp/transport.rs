//! The byte pipe under an AMQP session: a non-blocking TCP socket, plain or wrapped in TLS.
//!
//! Owned by the one thread that owns its connection (a queue worker, or a control thread).
//! Plain TCP keeps the data path's zero-copy `writev`: a published body goes from the
//! batch buffer straight into the socket. TLS (rustls) encrypts into its own buffer, which
//! [`Transport::flush`] drains; its handshake runs inside the first reads and writes, so
//! the caller's loop is the same for both.
//!
//! Socket options through `socket2`: `TCP_NODELAY` (a batch is one message: nothing to
//! gain by waiting), keep-alive probes and `TCP_USER_TIMEOUT` set from the heartbeat, so a
//! path that silently drops everything is noticed by the kernel as well as by the
//! heartbeats ([`Transport::set_liveness`]).

use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};

use super::tls::TlsClient;
use crate::sys;

/// How long a blocking step waits before it looks at the stop flag again.
pub const STOP_POLL: Duration = Duration::from_millis(100);

/// Why bytes could not move.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("the broker closed the connection")]
    Eof,
}

/// A connected socket, plain or TLS.
pub enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

pub struct TlsStream {
    sock: TcpStream,
    tls: rustls::ClientConnection,
}

impl Transport {
    /// Wraps a connected socket; `tls` starts a TLS client on it.
    pub fn new(sock: TcpStream, tls: Option<&TlsClient>) -> Result<Transport, TransportError> {
        sock.set_nonblocking(true)?;
        Ok(match tls {
            None => Transport::Plain(sock),
            Some(t) => {
                let mut conn = rustls::ClientConnection::new(t.config.clone(), t.server_name.clone())?;
                conn.set_buffer_limit(None); // we never write more than one message past what the socket took
                Transport::Tls(Box::new(TlsStream { sock, tls: conn }))
            }
        })
    }

    fn socket(&self) -> &TcpStream {
        match self {
            Transport::Plain(s) => s,
            Transport::Tls(t) => &t.sock,
        }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.socket().as_fd()
    }

    /// Keep-alive and `TCP_USER_TIMEOUT` for a connection with heartbeat `heartbeat`
    /// (zero: heartbeats off; the kernel's probes then watch the path alone). While the
    /// broker blocks us (`user_timeout` false) the user timeout is lifted: a broker that
    /// stops reading during an alarm is alive, only busy.
    pub fn set_liveness(&self, heartbeat: Duration, user_timeout: bool) -> io::Result<()> {
        let sock = SockRef::from(self.socket());
        let idle = if heartbeat.is_zero() { Duration::from_secs(30) } else { heartbeat };
        let probe = (idle / 3).max(Duration::from_secs(1));
        sock.set_tcp_keepalive(&TcpKeepalive::new().with_time(idle).with_interval(probe).with_retries(3))?;
        // TCP_USER_TIMEOUT is Linux's (and Android's): elsewhere keepalive alone watches.
        #[cfg(target_os = "linux")]
        {
            let timeout = if user_timeout { Some((idle * 2).max(Duration::from_secs(5))) } else { None };
            sock.set_tcp_user_timeout(timeout)
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = user_timeout;
            Ok(())
        }
    }

    /// Bytes the kernel holds that the broker has not acknowledged.
    pub fn unsent(&self) -> usize {
        sys::unsent_bytes(self.fd()).unwrap_or(0)
    }

    /// Whether TLS holds encrypted bytes the socket has not taken yet.
    pub fn wants_write(&self) -> bool {
        match self {
            Transport::Plain(_) => false,
            Transport::Tls(t) => t.tls.wants_write(),
        }
    }

    /// Reads what has arrived into `buf`: `Ok(0)` when nothing is there now.
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
        match self {
            Transport::Plain(s) => match s.read(buf) {
                Ok(0) if !buf.is_empty() => Err(TransportError::Eof),
                Ok(n) => Ok(n),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => Ok(0),
                Err(e) => Err(e.into()),
            },
            Transport::Tls(t) => t.read(buf),
        }
    }

    /// Writes as much of `iov` as the socket takes now; returns how much. TLS takes it all
    /// (encrypted into its buffer; [`Transport::flush`] sends it).
    pub fn write(&mut self, iov: &[IoSlice<'_>]) -> Result<usize, TransportError> {
        match self {
            Transport::Plain(s) => match s.write_vectored(iov) {
                Ok(n) => Ok(n),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => Ok(0),
                Err(e) => Err(e.into()),
            },
            Transport::Tls(t) => {
                let mut n = 0;
                for s in iov {
                    t.tls.writer().write_all(s)?;
                    n += s.len();
                }
                t.flush()?;
                Ok(n)
            }
        }
    }

    /// Sends what TLS holds, as far as the socket takes it now.
    pub fn flush(&mut self) -> Result<(), TransportError> {
        match self {
            Transport::Plain(_) => Ok(()),
            Transport::Tls(t) => t.flush(),
        }
    }
}

impl TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
        loop {
            match self.tls.reader().read(buf) {
                Ok(0) if !buf.is_empty() => return Err(TransportError::Eof), // close_notify
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(TransportError::Eof),
                Err(e) => return Err(e.into()),
            }
            match self.tls.read_tls(&mut self.sock) {
                Ok(0) => return Err(TransportError::Eof),
                Ok(_) => {
                    self.tls.process_new_packets()?;
                    if self.tls.wants_write() {
                        self.flush()?; // handshake messages, alerts, key updates
                    }
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => return Ok(0),
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn flush(&mut self) -> Result<(), TransportError> {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.sock) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn liveness_settings_apply_to_a_plain_socket() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let t = Transport::new(s, None).unwrap();
        t.set_liveness(Duration::from_secs(10), true).unwrap();
        t.set_liveness(Duration::from_secs(10), false).unwrap();
        assert!(!t.wants_write());
    }
}
