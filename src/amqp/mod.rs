//! Everything that talks to the broker: connections, topology, the per-queue links, presence.
//!
//! Two kinds of connection. The data path uses our own ([`wire`]: AMQP framing, pure;
//! [`conn`]: a blocking connection owned by one thread): each TUN queue has one connection,
//! owned by its queue worker, carrying both directions ([`link`]), so queues never contend
//! on a socket and no packet waits for another thread; queue 0's also carries the agent's
//! presence ([`presence`]). Control (the name check, `agent peers`, and the ioppytest
//! control messages and router elsewhere) uses lapin on the agent's tokio runtime, where
//! convenience matters more than microseconds. Reconnection is ours: a link that loses the
//! broker drops and counts what it cannot send, retries with jittered exponential backoff,
//! and re-declares its queue and bindings.

pub mod conn;
pub mod link;
pub mod presence;
pub mod wire;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

/// Longest wait for the TCP + AMQP handshake before a retry.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Frame size for control connections (name check, `agent peers`, ioppytest control): they
/// carry small JSON only. lapin keeps two ring buffers of 32 frames per connection, so
/// the frame size sets its memory: 2 × 32 × 8 KiB = 512 KiB instead of 8 MiB at the
/// broker's default 128 KiB.
pub const CONTROL_FRAME_MAX: u32 = 8192;

/// Opens a connection named after its role (shown in the management UI). `frame_max`
/// bounds the negotiated frame size (`None`: the broker's, 128 KiB on RabbitMQ).
pub async fn connect(url: &str, connection_name: &str, frame_max: Option<u32>) -> Result<Connection, lapin::Error> {
    let props = ConnectionProperties::default().with_connection_name(connection_name.into());
    let mut uri: lapin::uri::AMQPUri = url
        .parse()
        .map_err(|e: String| lapin::Error::from(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    if let Some(f) = frame_max {
        uri.query.frame_max = Some(uri.query.frame_max.map_or(f, |given| given.min(f)));
    }
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect_uri(uri, props)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "connecting to the broker timed out").into()),
    }
}

/// Declares `exchange` as a transient topic exchange, unless it is a predeclared `amq.*` one.
/// Auto-delete: it vanishes with the last binding, so a finished session leaves nothing.
pub async fn declare_exchange(channel: &Channel, exchange: &str) -> Result<(), lapin::Error> {
    if exchange.starts_with("amq.") {
        return Ok(());
    }
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions { durable: false, auto_delete: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
}

/// Whether the broker refused because another connection holds the resource exclusively.
pub fn is_resource_locked(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p) if matches!(p.kind(), AMQPErrorKind::Soft(AMQPSoftError::RESOURCELOCKED)))
}

/// Whether queue `queue` exists already (another agent of the same name holds it).
/// `Err` when the broker cannot be asked; the caller then starts anyway and retries.
pub async fn queue_in_use(url: &str, queue: &str) -> Result<bool, lapin::Error> {
    let conn = connect(url, "tunbus name check", Some(CONTROL_FRAME_MAX)).await?;
    let ch = conn.create_channel().await?;
    let declared = ch
        .queue_declare(queue.into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
        .await;
    let _ = conn.close(200, "checked".into()).await;
    match declared {
        Ok(_) => Ok(true),
        Err(e) if is_resource_locked(&e) => Ok(true),
        Err(_) => Ok(false), // 404: nobody has it
    }
}

/// Resolves when the stop flag is (or becomes) true, or its sender is gone.
pub async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Jittered exponential backoff: 100 ms doubling to 1 s, each ±50 %, so that hundreds of
/// agents do not reconnect in lockstep, and traffic is back within ~1.5 s of the broker.
pub fn backoff(attempt: u32, jitter_seed: u64) -> Duration {
    let base_ms = 100u64.saturating_mul(1 << attempt.min(4)).min(1000);
    // splitmix64 step: cheap, deterministic per seed, good enough to spread retries
    let mut z = jitter_seed.wrapping_add(0x9E37_79B9_7F4A_7C15).wrapping_mul(u64::from(attempt) + 1);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let jitter = z % (base_ms + 1); // 0..=base
    Duration::from_millis(base_ms / 2 + jitter)
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
    fn backoff_grows_is_bounded_and_jittered() {
        for seed in 0..100 {
            for attempt in 0..20 {
                let d = backoff(attempt, seed);
                assert!(d <= Duration::from_millis(1500), "{d:?}");
                assert!(d >= Duration::from_millis(50), "{d:?}");
            }
        }
        let spread: std::collections::HashSet<_> = (0..50).map(|s| backoff(5, s)).collect();
        assert!(spread.len() > 10, "jitter should spread retries");
    }
}
