//! Presence: who is on the bus. Control plane, never on the data path.
//!
//! An agent publishes a [`Hello`] on `tunbus.v1.ctl.hello.<name>` when it starts, every
//! [`HELLO_EVERY`], and whenever someone publishes `tunbus.v1.ctl.probe`; it publishes
//! `tunbus.v1.ctl.bye.<name>` when it stops. Queue worker 0 does this on its data
//! connection ([`Announcements`]; its queue also binds the probe key), so presence costs
//! no connection of its own (decision 0014). `agent peers` ([`discover`], lapin) probes
//! and collects the answers.
//! One tokio task per agent with its own small connection; it retries quietly when the
//! broker is away (the data links log that).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};
use serde::{Deserialize, Serialize};

use crate::route::{RoutingKey, BYE_PATTERN, CTL_PROBE, HELLO_PATTERN};

pub const HELLO_EVERY: Duration = Duration::from_secs(5);

/// What an agent says about itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub name: String,
    #[serde(default)]
    pub session: Option<String>,
    pub addresses: Vec<String>,
    pub queues: usize,
    /// Wire format spoken: "v1" (native) or "ioppytest".
    pub wire: String,
    pub started_unix_ms: u64,
    #[serde(default)]
    pub interface: String,
    #[serde(default)]
    pub netns: Option<String>,
    #[serde(default)]
    pub version: String,
    /// Set on the goodbye message.
    #[serde(default)]
    pub leaving: bool,
}

/// The hello and bye of one agent, serialised once at start, with their keys: queue worker
/// 0 publishes them on its own connection, so presence costs no connection of its own.
#[derive(Clone, Debug)]
pub struct Announcements {
    pub hello_key: String,
    pub hello: Vec<u8>,
    pub bye_key: String,
    pub bye: Vec<u8>,
}

impl Announcements {
    pub fn new(hello: &Hello) -> anyhow::Result<Announcements> {
        let word = |k: Option<RoutingKey>| k.map(|k| k.as_str().to_owned()).ok_or_else(|| anyhow::anyhow!("agent name {:?} is not a topic word", hello.name));
        Ok(Announcements {
            hello_key: word(RoutingKey::hello(&hello.name))?,
            hello: serde_json::to_vec(hello)?,
            bye_key: word(RoutingKey::bye(&hello.name))?,
            bye: serde_json::to_vec(&Hello { leaving: true, ..hello.clone() })?,
        })
    }
}

async fn publish_json(ch: &Channel, exchange: &str, key: &str, body: &impl Serialize) -> anyhow::Result<()> {
    let bytes = serde_json::to_vec(body)?;
    ch.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions::default(),
        &bytes,
        BasicProperties::default().with_content_type("application/json".into()),
    )
    .await?;
    Ok(())
}

/// One agent as `agent peers` saw it.
#[derive(Clone, Debug)]
pub struct Peer {
    pub hello: Hello,
    pub heard: Instant,
}

/// Probes the bus and collects hellos for `wait`. Agents that said goodbye are left out.
pub async fn discover(url: &str, exchange: &str, wait: Duration) -> anyhow::Result<Vec<Peer>> {
    let conn = super::connect(url, "tunbus peers", Some(super::CONTROL_FRAME_MAX))
        .await
        .with_context(|| "cannot reach the broker (is RabbitMQ running? see --url)")?;
    let ch = conn.create_channel().await?;
    super::declare_exchange(&ch, exchange).await?;
    let q = ch
        .queue_declare("".into(), QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() }, FieldTable::default())
        .await?;
    for pattern in [HELLO_PATTERN, BYE_PATTERN] {
        ch.queue_bind(q.name().clone(), exchange.into(), pattern.into(), QueueBindOptions::default(), FieldTable::default())
            .await?;
    }
    let mut consumer = ch
        .basic_consume(q.name().clone(), "".into(), BasicConsumeOptions { no_ack: true, exclusive: true, ..Default::default() }, FieldTable::default())
        .await?;
    publish_json(&ch, exchange, CTL_PROBE, &serde_json::json!({ "from": "agent peers" })).await?;
    let mut seen: BTreeMap<String, Peer> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let d = tokio::select! {
            d = consumer.next() => d,
            _ = tokio::time::sleep_until(deadline) => break,
        };
        let Some(Ok(d)) = d else { break };
        let Ok(hello) = serde_json::from_slice::<Hello>(&d.data) else { continue };
        if hello.leaving {
            seen.remove(&hello.name);
        } else {
            seen.insert(hello.name.clone(), Peer { hello, heard: Instant::now() });
        }
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(seen.into_values().collect())
}
