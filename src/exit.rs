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
        // Setting up the interface: a missing namespace, a name taken, a failing `ip`.
        if cause.downcast_ref::<crate::tun::netns::Error>().is_some() || cause.downcast_ref::<crate::tun::Error>().is_some() {
            return Exit::Local;
        }
    }
    Exit::Failure
}

/// The advice after a failure to join the bus (`session`: `--session`, `vhost`: the URL's).
pub fn join_advice(e: &client::Error, session: Option<&str>, vhost: Option<&str>) -> String {
    match e.class() {
        FailureClass::Unreachable => " Is RabbitMQ running there? Check --url (host and port).".into(),
        FailureClass::Permission if e.to_string().contains("ctl.ping") => {
            " The user's permissions predate `agent ping` (its key tunbus.v1.ctl.ping.NAME): run `agent provision` for the session again (docs/security.md).".into()
        }
        FailureClass::Permission if session.is_none() => format!(
            " The broker user lacks a permission tunbus needs (see docs/security.md). A user that `agent provision` made may use only its session's exchange: give --session SESSION{}.",
            vhost.filter(|v| *v != "/").map(|v| format!(" (a provisioned session's vhost is its name: --session {v})")).unwrap_or_default()
        ),
        FailureClass::Permission => " The broker user lacks a permission tunbus needs (see docs/security.md).".into(),
        _ => String::new(),
    }
}

/// An error found in what the command line (or its `--config` file) asked for, after clap
/// parsed it: bad usage (2), unless the chain already knows its code (a file that cannot
/// be read is 9, a TLS setting 4).
pub fn usage(e: anyhow::Error) -> anyhow::Error {
    match code_of(&e) {
        Exit::Failure => Failure::new(Exit::Usage, format!("{e:#}")).into(),
        _ => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_after_clap_are_usage_unless_they_know_their_code() {
        assert_eq!(code_of(&usage(anyhow::anyhow!("--session \"a.b\" must be one topic word"))), Exit::Usage);
        assert_eq!(code_of(&usage(Failure::new(Exit::Local, "cannot read --peers x").into())), Exit::Local);
        let missing = anyhow::Error::from(crate::tun::netns::Error::NoNamespace("ns1".into())).context("setting up interface tb0");
        assert_eq!(code_of(&missing), Exit::Local);
        let ip = crate::tun::netns::Error::Command { command: "ip link set x netns y".into(), stderr: "RTNETLINK answers: File exists".into() };
        assert_eq!(code_of(&anyhow::Error::from(ip)), Exit::Local);
    }
}
