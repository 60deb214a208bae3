//! Exit codes: one per class of failure, so that scripts and service managers can tell a
//! wrong password from a broker that is down. `main` maps errors to these; `--help` and
//! the README print the same table ([`TABLE`]).

use std::fmt;

use crate::amqp::client::{self, FailureClass};

/// Why `agent` ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    Ok = 0,
    /// Any failure without a code of its own.
    Failure = 1,
    /// A bad flag or argument (clap's own code).
    Usage = 2,
    /// No broker answered (refused, unreachable, or no answer in time).
    Unreachable = 3,
    /// The TLS handshake or the certificate check failed.
    Tls = 4,
    /// The broker refused the login (user, password or client certificate).
    Auth = 5,
    /// The vhost does not exist, or the user may not use it.
    Vhost = 6,
    /// The broker refused an operation this user may not do (declare, bind, publish).
    Permission = 7,
    /// Another live agent already has this name on the bus.
    NameInUse = 8,
    /// Setting up this host failed (interface, namespace, addresses, a file).
    Local = 9,
    /// An internal failure: a worker thread died.
    Internal = 10,
}

/// The table `--help` and the README show.
pub const TABLE: &str = "Exit codes: 0 ok (also after Ctrl-C/SIGTERM), 1 other failure, 2 bad usage, \
3 broker unreachable, 4 TLS handshake or certificate, 5 login refused, 6 vhost unknown or \
forbidden, 7 operation refused by the broker's permissions, 8 name already in use, \
9 local set-up (interface, namespace, file), 10 internal (a worker died).";

impl Exit {
    pub fn code(self) -> u8 {
        self as u8
    }
}

impl From<FailureClass> for Exit {
    fn from(c: FailureClass) -> Exit {
        match c {
            FailureClass::Unreachable => Exit::Unreachable,
            FailureClass::Tls => Exit::Tls,
            FailureClass::Auth => Exit::Auth,
            FailureClass::Vhost => Exit::Vhost,
            FailureClass::Permission => Exit::Permission,
            FailureClass::Locked => Exit::NameInUse,
            FailureClass::Protocol => Exit::Failure,
        }
    }
}

/// An error that knows its exit code. `main` finds it in an `anyhow` chain.
#[derive(Debug)]
pub struct Failure {
    pub exit: Exit,
    pub message: String,
}

impl Failure {
    pub fn new(exit: Exit, message: impl Into<String>) -> Failure {
        Failure { exit, message: message.into() }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

impl From<client::Error> for Failure {
    fn from(e: client::Error) -> Failure {
        Failure { exit: Exit::from(e.class()), message: e.to_string() }
    }
}

/// The exit code for an error: the first [`Failure`] or client error in its chain, else 1.
pub fn code_of(e: &anyhow::Error) -> Exit {
    for cause in e.chain() {
        if let Some(f) = cause.downcast_ref::<Failure>() {
            return f.exit;
        }
        if let Some(c) = cause.downcast_ref::<client::Error>() {
            return Exit::from(c.class());
        }
    }
    Exit::Failure
}
