//! Why a connection to the broker failed or ended, and what kind of failure that is (for
//! the agent's exit code and its advice). Shared by the pure connection machine
//! ([`super::connection`]) and its I/O shell ([`super::client`]). Pure.

use std::time::Duration;

use super::session;

/// What kind of failure, for the agent's exit code and its advice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureClass {
    /// Nothing answered (refused, no route, timed out).
    Unreachable,
    /// The TLS handshake or certificate verification failed.
    Tls,
    /// The broker refused the login.
    Auth,
    /// The vhost does not exist or the user may not use it.
    Vhost,
    /// The broker refused an operation (declare, bind, publish) to this user.
    Permission,
    /// Another connection holds the resource (an exclusive queue of the same name).
    Locked,
    /// Anything else: a broken or hostile broker, a lost connection.
    Protocol,
}

/// Why a connection failed or ended.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach the broker at {broker}: {source}")]
    Connect { broker: String, source: std::io::Error },
    #[error("TLS with {broker} failed: {source}{hint}")]
    Tls { broker: String, source: rustls::Error, hint: &'static str },
    #[error("broker {broker}: {source}{hint}")]
    Session { broker: String, source: session::Error, hint: &'static str },
    #[error("broker {broker}: {source}")]
    Io { broker: String, source: std::io::Error },
    #[error("broker {broker} closed the connection{hint}")]
    Eof { broker: String, hint: &'static str },
    #[error("broker {broker} did not answer in time ({during})")]
    Timeout { broker: String, during: &'static str },
    #[error("broker {broker} stopped reading what we send for {:.1} s", .stalled.as_secs_f64())]
    Stalled { broker: String, stalled: Duration },
    #[error("stopped")]
    Stopped,
}

impl Error {
    /// A copy for a second reader (I/O errors keep their kind and message): the connection
    /// machine keeps one, a blocking caller gets the other.
    pub fn duplicate(&self) -> Error {
        let io = |e: &std::io::Error| std::io::Error::new(e.kind(), e.to_string());
        match self {
            Error::Connect { broker, source } => Error::Connect { broker: broker.clone(), source: io(source) },
            Error::Tls { broker, source, hint } => Error::Tls { broker: broker.clone(), source: source.clone(), hint },
            Error::Session { broker, source, hint } => Error::Session { broker: broker.clone(), source: source.clone(), hint },
            Error::Io { broker, source } => Error::Io { broker: broker.clone(), source: io(source) },
            Error::Eof { broker, hint } => Error::Eof { broker: broker.clone(), hint },
            Error::Timeout { broker, during } => Error::Timeout { broker: broker.clone(), during },
            Error::Stalled { broker, stalled } => Error::Stalled { broker: broker.clone(), stalled: *stalled },
            Error::Stopped => Error::Stopped,
        }
    }

    pub fn class(&self) -> FailureClass {
        use session::{Error as S, Phase};
        match self {
            Error::Connect { .. } | Error::Timeout { .. } => FailureClass::Unreachable,
            Error::Tls { .. } => FailureClass::Tls,
            Error::Session { source, .. } => match source {
                S::ConnectionClosed { phase: Phase::Login, .. } | S::NoMechanism { .. } => FailureClass::Auth,
                S::ConnectionClosed { phase: Phase::Open, .. } => FailureClass::Vhost,
                S::ChannelClosed { close, .. } if close.code == 403 => FailureClass::Permission,
                S::ConnectionClosed { close, .. } if close.code == 403 => FailureClass::Permission,
                S::ChannelClosed { close, .. } if close.code == 405 => FailureClass::Locked,
                _ => FailureClass::Protocol,
            },
            _ => FailureClass::Protocol,
        }
    }

    /// The broker's reply code, when it refused something.
    pub fn reply_code(&self) -> Option<u16> {
        match self {
            Error::Session { source: session::Error::ChannelClosed { close, .. } | session::Error::ConnectionClosed { close, .. }, .. } => Some(close.code),
            _ => None,
        }
    }
}

/// Advice for an error; `handshaking`: before the session was open.
pub fn hint_for(e: &session::Error, handshaking: bool) -> &'static str {
    use session::{Error as S, Phase};
    match e {
        S::ConnectionClosed { phase: Phase::Login, .. } => " (check the user name and password in the URL, or the client certificate)",
        S::ConnectionClosed { phase: Phase::Open, .. } => " (check the vhost in the URL, and that the user has permissions on it)",
        S::NoMechanism { .. } => " (EXTERNAL needs RabbitMQ's rabbitmq_auth_mechanism_ssl plugin)",
        S::Frame(_) if handshaking => " (is this a TLS port? use amqps://)",
        _ => "",
    }
}
