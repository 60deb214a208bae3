//! A minimal HTTP/1.1 client for RabbitMQ's management API: one request per connection,
//! Basic authentication, JSON bodies, over TCP or TLS (rustls). Control plane only.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use crate::amqp::tls::{self, TlsOptions};
use crate::amqp::url::BrokerUrl;

/// Where the API is and who asks.
#[derive(Clone, Debug)]
pub struct Api {
    pub host: String,
    pub port: u16,
    tls: Option<(Arc<rustls::ClientConfig>, rustls::pki_types::ServerName<'static>)>,
    auth: String,
}

/// What went wrong with a request.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot reach the management API at {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("the management API at {0}: {1}")]
    Io(String, std::io::Error),
    #[error("the management API at {0} answered {1} to {2}: {3}")]
    Status(String, u16, String, String),
    #[error("the management API at {0} sent an answer that is not HTTP")]
    Garbled(String),
    #[error("TLS settings for the management API: {0}")]
    Tls(String),
}

impl Api {
    /// The API of `base` (`http://host:port` or `https://…`), logging in as `user`.
    pub fn new(base: &str, user: &str, password: &str, tls_options: &TlsOptions) -> Result<Api, HttpError> {
        let (secure, rest) = match base.strip_prefix("https://") {
            Some(r) => (true, r),
            None => (false, base.strip_prefix("http://").unwrap_or(base)),
        };
        let authority = rest.split('/').next().unwrap_or(rest);
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
                (h.trim_matches(|c| c == '[' || c == ']').to_owned(), p.parse().unwrap_or(15672))
            }
            _ => (authority.to_owned(), if secure { 15671 } else { 15672 }),
        };
        let tls = if secure {
            let url: BrokerUrl = format!("amqps://{authority}/").parse().map_err(|e: crate::amqp::url::UrlError| HttpError::Tls(e.to_string()))?;
            let c = tls::client_for(&url, tls_options).map_err(|e| HttpError::Tls(e.to_string()))?;
            Some((c.config, c.server_name))
        } else {
            None
        };
        Ok(Api { host, port, tls, auth: crate::util::base64(format!("{user}:{password}").as_bytes()) })
    }

    fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Sends one request; returns the status and body. A status of 400 or more is an error
    /// unless `ok_statuses` lists it.
    pub fn request(&self, method: &str, path: &str, body: Option<&str>, ok_statuses: &[u16]) -> Result<(u16, String), HttpError> {
        let (status, _head, body) = self.fetch(method, path, body)?;
        if status >= 400 && !ok_statuses.contains(&status) {
            return Err(HttpError::Status(self.addr(), status, format!("{method} {path}"), body.chars().take(300).collect()));
        }
        Ok((status, body))
    }

    /// The server's clock as its `Date` header says (RFC 9110's IMF-fixdate), from one
    /// `GET path`, whatever its status (a 401 carries the date too).
    pub fn date(&self, path: &str) -> Result<Option<String>, HttpError> {
        let (_, head, _) = self.fetch("GET", path, None)?;
        Ok(head.lines().find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.trim().eq_ignore_ascii_case("date").then(|| value.trim().to_owned())
        }))
    }

    /// Sends one request; returns the status, the head and the body, whatever the status.
    fn fetch(&self, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String, String), HttpError> {
        let addr = self.addr();
        let sock = connect(&addr).map_err(|e| HttpError::Connect(addr.clone(), e))?;
        let _ = sock.set_read_timeout(Some(Duration::from_secs(15)));
        let _ = sock.set_write_timeout(Some(Duration::from_secs(15)));
        let body = body.unwrap_or("");
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Basic {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.auth,
            body.len()
        );
        let mut answer = Vec::new();
        let io = |e| HttpError::Io(addr.clone(), e);
        match &self.tls {
            None => {
                let mut s = sock;
                s.write_all(request.as_bytes()).map_err(io)?;
                s.read_to_end(&mut answer).map_err(io)?;
            }
            Some((config, name)) => {
                let conn = rustls::ClientConnection::new(config.clone(), name.clone()).map_err(|e| HttpError::Tls(e.to_string()))?;
                let mut s = rustls::StreamOwned::new(conn, sock);
                s.write_all(request.as_bytes()).map_err(io)?;
                match s.read_to_end(&mut answer) {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !answer.is_empty() => {} // closed without close_notify
                    Err(e) => return Err(io(e)),
                }
            }
        }
        let text = String::from_utf8_lossy(&answer).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| HttpError::Garbled(addr.clone()))?;
        let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_owned() };
        Ok((status, head.to_owned(), body))
    }
}

/// A TCP connection to `addr` (`host:port`), each address given at most 5 s.
fn connect(addr: &str) -> std::io::Result<TcpStream> {
    use std::net::ToSocketAddrs;
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "the name resolves to no address");
    for a in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, Duration::from_secs(5)) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// The body of a chunked response.
fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

/// Percent-encodes one path segment (vhost and user names): RFC 3986's, as in AMQP URLs.
pub use crate::amqp::url::percent_encode as segment;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_and_chunks() {
        assert_eq!(segment("/"), "%2F");
        assert_eq!(segment("lab.h1"), "lab.h1");
        assert_eq!(dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"), "hello world");
        let a = Api::new("http://127.0.0.1:15999", "u", "p", &TlsOptions::default()).unwrap();
        assert_eq!((a.host.as_str(), a.port), ("127.0.0.1", 15999));
        assert_eq!(Api::new("broker.example", "u", "p", &TlsOptions::default()).unwrap().port, 15672);
    }
}
