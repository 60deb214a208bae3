//! Everything that talks to the broker, on one AMQP client of our own.
//!
//! - [`url`] (pure): broker URLs as RabbitMQ's URI spec writes them, printed without
//!   their passwords.
//! - [`wire`] (pure): AMQP 0-9-1 framing and the methods tunbus uses.
//! - [`session`] (pure): the protocol state machine of one connection, bytes and time in,
//!   events and bytes out (handshake, tune, heartbeats, reassembly, blocked, close).
//! - [`transport`]: the socket under it, plain TCP or TLS ([`tls`]: rustls settings).
//! - [`client`]: a session on a transport, owned by one thread: non-blocking for the data
//!   path, with blocking helpers (deadlines, a stop flag) for set-up and control.
//! - [`presence`]: hellos, byes, probes and `agent peers`.
//! - [`ping`]: `agent ping`'s probes and an agent's answer to them.
//!
//! One client for every connection tunbus opens (decision 0015): data links, presence,
//! `agent peers`, the ioppytest control wire and `agent route` share TLS, login, liveness
//! and error classes. Reconnection is ours (`worker::link`): a link that loses the broker drops and counts
//! what it cannot send, retries with capped, fully jittered exponential backoff
//! ([`backoff`]), and re-declares its queue and bindings.

pub mod client;
pub mod connection;
pub mod error;
pub mod ping;
pub mod presence;
pub mod session;
pub mod tls;
pub mod transport;
pub mod url;
pub mod wire;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::codec::ioppytest;
use crate::util::splitmix64;

/// Frame size for control connections (name check, `agent peers`, ioppytest control):
/// they carry small JSON only, so their read buffers stay small.
pub const CONTROL_FRAME_MAX: u32 = 8192;

/// The AMQP properties of every ioppytest message tunbus publishes (packets and control):
/// the Python receivers want them as they set them (the values: `codec::ioppytest`).
pub const IOPPYTEST_PROPERTIES: wire::Properties<'static> = wire::Properties {
    content_type: Some(ioppytest::CONTENT_TYPE),
    content_encoding: Some(ioppytest::CONTENT_ENCODING),
    empty_headers: ioppytest::EMPTY_HEADERS,
    delivery_mode: Some(ioppytest::DELIVERY_MODE),
    user_id: None,
    correlation_id: None,
};

/// Longest wait between reconnection attempts.
pub const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// First backoff ceiling; doubles per failed attempt up to [`BACKOFF_CAP`].
pub const BACKOFF_BASE: Duration = Duration::from_millis(100);

/// Capped exponential backoff with full jitter: a delay drawn evenly from zero to a ceiling
/// that doubles per failed attempt from [`BACKOFF_BASE`] up to [`BACKOFF_CAP`] (AWS's "full
/// jitter"), so that a thousand agents that lost their broker together do not come back
/// together. The ceiling is also held to half the outage so far (`outage`, at least the
/// base): failures against a closed port are instant, and without that bound a broker back
/// after a 6 s restart would find agents that had doubled their way to 13 s waits. Agents
/// that lost the broker together still spread their return over half the outage's length
/// (docs/decisions/0016-liveness.md).
pub fn backoff(attempt: u32, jitter_seed: u64, outage: Duration) -> Duration {
    let base = BACKOFF_BASE.as_millis() as u64;
    let doubling = base.saturating_mul(1u64 << attempt.min(20));
    let by_outage = (outage.as_millis() as u64 / 2).max(base);
    let ceiling_ms = doubling.min(by_outage).min(BACKOFF_CAP.as_millis() as u64);
    let draw = splitmix64(jitter_seed ^ splitmix64(u64::from(attempt)));
    Duration::from_millis(draw % (ceiling_ms + 1))
}

/// The retry schedule of one connection: [`backoff`] with its attempt count and the start
/// of the outage.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    attempt: u32,
    seed: u64,
    since: Option<Instant>,
}

impl Backoff {
    pub fn new(seed: u64) -> Backoff {
        Backoff { attempt: 0, seed, since: None }
    }

    /// An attempt failed at `now`: how long to wait before the next one.
    pub fn failed(&mut self, now: Instant) -> Duration {
        let outage = now.saturating_duration_since(*self.since.get_or_insert(now));
        let d = backoff(self.attempt, self.seed, outage);
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    /// Connected: the next outage starts afresh.
    pub fn reset(&mut self) {
        self.attempt = 0;
        self.since = None;
    }
}

/// Batched acknowledgements: `multiple` acks every `every` deliveries, or whenever the
/// consumer has nothing more ready (the caller asks with [`AckBatcher::take`]).
#[derive(Debug)]
pub struct AckBatcher {
    every: u32,
    since: u32,
    last: Option<u64>,
}

impl AckBatcher {
    /// Acks at least every half prefetch, so the broker never stalls on a full window.
    pub fn for_prefetch(prefetch: u16) -> AckBatcher {
        AckBatcher { every: (u32::from(prefetch) / 2).max(1), since: 0, last: None }
    }

    /// The consumer's prefetch changed: ack at least every half of the new one.
    pub fn set_prefetch(&mut self, prefetch: u16) {
        self.every = (u32::from(prefetch) / 2).max(1);
    }

    /// Notes a delivery; returns the tag to ack (with `multiple`) when the batch is full.
    pub fn delivered(&mut self, tag: u64) -> Option<u64> {
        self.last = Some(tag);
        self.since += 1;
        if self.since >= self.every {
            self.take()
        } else {
            None
        }
    }

    /// The tag to ack now (everything delivered so far), if any.
    pub fn take(&mut self) -> Option<u64> {
        self.since = 0;
        self.last.take()
    }
}

/// Broker reachability shared by all links of one agent, so that losing and regaining the
/// broker is logged once, not once per queue.
#[derive(Debug, Default)]
pub struct BrokerState {
    down: AtomicUsize,
}

impl BrokerState {
    /// A link lost its connection (or failed to make its first one).
    pub fn link_down(&self, agent: &str, error: &dyn std::fmt::Display) {
        if self.down.fetch_add(1, Ordering::AcqRel) == 0 {
            tracing::warn!(agent, %error, "lost the broker; dropping and counting traffic, reconnecting");
        }
    }

    /// A link that was down is connected again.
    pub fn link_up(&self, agent: &str) {
        if self.down.fetch_sub(1, Ordering::AcqRel) == 1 {
            tracing::info!(agent, "broker is back; traffic flows again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_are_batched() {
        let mut a = AckBatcher::for_prefetch(6);
        assert_eq!(a.delivered(1), None);
        assert_eq!(a.delivered(2), None);
        assert_eq!(a.delivered(3), Some(3));
        assert_eq!(a.take(), None);
        assert_eq!(a.delivered(4), None);
        assert_eq!(a.take(), Some(4));
        let mut one = AckBatcher::for_prefetch(1);
        assert_eq!(one.delivered(9), Some(9));
    }

    #[test]
    fn backoff_is_capped_and_fully_jittered() {
        let long = Duration::from_secs(3600);
        for seed in 0..200 {
            for attempt in 0..40 {
                let d = backoff(attempt, seed, long);
                let ceiling = (BACKOFF_BASE * 2u32.saturating_pow(attempt.min(20))).min(BACKOFF_CAP);
                assert!(d <= ceiling, "attempt {attempt}: {d:?} > {ceiling:?}");
                assert!(backoff(attempt, seed, Duration::from_secs(6)) <= Duration::from_secs(3), "held to half a short outage");
            }
        }
        // Late attempts spread over the whole range up to the cap: 1,000 agents do not
        // come back in one burst.
        let late: Vec<Duration> = (0..1000).map(|s| backoff(12, s, long)).collect();
        let under_3s = late.iter().filter(|d| **d < Duration::from_secs(3)).count();
        assert!((50..200).contains(&under_3s), "about a tenth should fall in the first tenth: {under_3s}");
        assert!(late.iter().any(|d| *d > Duration::from_secs(27)));
        assert!(backoff(0, 7, long) <= BACKOFF_BASE);
        assert!(backoff(9, 7, Duration::ZERO) <= BACKOFF_BASE, "a fresh outage starts small");
    }
}
