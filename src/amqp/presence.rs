//! Presence: who is on the bus. Control plane, never on the data path.
//!
//! An agent publishes a [`Hello`] on `tunbus.v1.ctl.hello.<name>` when it starts, every
//! [`HELLO_EVERY`], and whenever someone publishes `tunbus.v1.ctl.probe`; it publishes
//! `tunbus.v1.ctl.bye.<name>` when it stops. `agent peers` probes and collects the answers.
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
use tokio::sync::watch;

use super::stopped;
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

/// The hello key of a validated agent name.
fn hello_key(name: &str) -> anyhow::Result<RoutingKey> {
    RoutingKey::hello(name).ok_or_else(|| anyhow::anyhow!("agent name {name:?} is not a topic word"))
}

fn bye_key(name: &str) -> anyhow::Result<RoutingKey> {
    RoutingKey::bye(name).ok_or_else(|| anyhow::anyhow!("agent name {name:?} is not a topic word"))
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

/// Announces `hello` until `stop`, then says goodbye.
pub async fn run(url: String, exchange: String, queue_prefix: String, hello: Hello, mut stop: watch::Receiver<bool>) {
    let mut attempt = 0u32;
    loop {
        let r = serve(&url, &exchange, &queue_prefix, &hello, &mut stop).await;
        match r {
            Ok(()) => return,
            Err(error) => tracing::debug!(agent = %hello.name, %error, "presence connection failed"),
        }
        let delay = super::backoff(attempt, crate::worker::now_ns());
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stopped(&mut stop) => return,
        }
    }
}

async fn serve(url: &str, exchange: &str, queue_prefix: &str, hello: &Hello, stop: &mut watch::Receiver<bool>) -> anyhow::Result<()> {
    let conn = super::connect(url, &format!("tunbus {} presence", hello.name), Some(super::CONTROL_FRAME_MAX)).await?;
    let ch = conn.create_channel().await?;
    super::declare_exchange(&ch, exchange).await?;
    let queue = format!("{queue_prefix}.ctl");
    ch.queue_declare(queue.as_str().into(), QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() }, FieldTable::default())
        .await?;
    ch.queue_bind(queue.as_str().into(), exchange.into(), CTL_PROBE.into(), QueueBindOptions::default(), FieldTable::default())
        .await?;
    let mut probes = ch
        .basic_consume(queue.as_str().into(), "".into(), BasicConsumeOptions { no_ack: true, exclusive: true, ..Default::default() }, FieldTable::default())
        .await?;
    let key = hello_key(&hello.name)?;
    let key = key.as_str();
    publish_json(&ch, exchange, key, hello).await?;
    let mut tick = tokio::time::interval(HELLO_EVERY);
    tick.tick().await; // the first tick is immediate; we just said hello
    loop {
        tokio::select! {
            _ = tick.tick() => publish_json(&ch, exchange, key, hello).await?,
            p = probes.next() => match p {
                Some(Ok(_)) => publish_json(&ch, exchange, key, hello).await?,
                Some(Err(e)) => return Err(e.into()),
                None => anyhow::bail!("probe consumer cancelled"),
            },
            _ = stopped(stop) => {
                let bye = Hello { leaving: true, ..hello.clone() };
                let _ = publish_json(&ch, exchange, bye_key(&hello.name)?.as_str(), &bye).await;
                let _ = ch.queue_delete(queue.as_str().into(), Default::default()).await;
                let _ = conn.close(200, "agent stopping".into()).await;
                return Ok(());
            }
        }
    }
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
