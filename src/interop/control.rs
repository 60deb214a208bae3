//! Control messages of an agent speaking the ioppytest wire.
//!
//! At start it announces `testingtool.component.ready` and, once its interface is up,
//! `fromAgent.<name>.ip.tun.started` with its addressing. It consumes
//! `toAgent.<name>.ip.tun.start`: with `--wait-config` the first one supplies the addresses
//! before the interface exists ([`wait_for_start`]); later ones add addresses to the running
//! interface and are answered with `ip.tun.started` again ([`run`]). A tokio task with its
//! own connection, reconnecting quietly (the data link logs broker loss).

use std::sync::Arc;

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use tokio::sync::watch;

use super::addressing::OldAddressing;
use super::json_properties;
use crate::amqp::stopped;
use crate::codec::ioppytest::{self, ComponentReady, TunStarted, API_VERSION};
use crate::config::AgentConfig;

async fn publish(ch: &Channel, exchange: &str, key: &str, body: &impl serde::Serialize) -> anyhow::Result<()> {
    let bytes = serde_json::to_vec(body)?;
    ch.basic_publish(exchange.into(), key.into(), BasicPublishOptions::default(), &bytes, json_properties()).await?;
    Ok(())
}

async fn announce_ready(ch: &Channel, exchange: &str, name: &str) -> anyhow::Result<()> {
    let ready = ComponentReady {
        _api_version: API_VERSION.to_owned(),
        component: name.to_owned(),
        description: format!("{name} READY to start test suite."),
    };
    publish(ch, exchange, ioppytest::ROUTING_KEY_COMPONENT_READY, &ready).await
}

/// Connection, channel and a consumer of `toAgent.<name>.ip.tun.start`.
async fn open(url: &str, exchange: &str, name: &str, queue_prefix: &str) -> anyhow::Result<(Connection, Channel, Consumer)> {
    let conn = crate::amqp::connect(url, &format!("tunbus {name} ioppytest control"), Some(crate::amqp::CONTROL_FRAME_MAX)).await?;
    let ch = conn.create_channel().await?;
    let queue = format!("{queue_prefix}.ctl");
    ch.queue_declare(queue.as_str().into(), QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() }, FieldTable::default())
        .await?;
    ch.queue_bind(queue.as_str().into(), exchange.into(), ioppytest::routing_key_tun_start(name).as_str().into(), QueueBindOptions::default(), FieldTable::default())
        .await?;
    let consumer = ch
        .basic_consume(queue.as_str().into(), "".into(), BasicConsumeOptions { no_ack: true, exclusive: true, ..Default::default() }, FieldTable::default())
        .await?;
    Ok((conn, ch, consumer))
}

/// Announces readiness and waits for the first `ip.tun.start` that carries addresses.
/// `Ok(None)` when stopped first.
pub async fn wait_for_start(config: &AgentConfig, stop: &mut watch::Receiver<bool>) -> anyhow::Result<Option<OldAddressing>> {
    let (url, exchange, name) = (config.url.as_str(), config.exchange.as_str(), config.name.as_str());
    let (conn, ch, mut consumer) = open(url, exchange, name, &config.queue_prefix()).await?;
    announce_ready(&ch, exchange, name).await?;
    tracing::info!(agent = name, key = %ioppytest::routing_key_tun_start(name), "waiting for the configuration");
    let found = loop {
        let delivery = tokio::select! {
            d = consumer.next() => d,
            _ = stopped(stop) => break None,
        };
        let Some(Ok(d)) = delivery else { anyhow::bail!("the broker closed the configuration queue") };
        match serde_json::from_slice::<TunStarted>(&d.data) {
            Ok(t) => {
                let a = OldAddressing::from_started(&t);
                if a.is_empty() {
                    tracing::warn!(agent = name, "ip.tun.start without addresses; still waiting");
                } else {
                    break Some(a);
                }
            }
            Err(e) => tracing::warn!(agent = name, error = %e, "ip.tun.start is not valid JSON; still waiting"),
        }
    };
    let _ = conn.close(200, "configured".into()).await;
    Ok(found)
}

/// Announces `ip.tun.started` (and readiness) and serves later `ip.tun.start` messages.
pub async fn run(config: Arc<AgentConfig>, mut stop: watch::Receiver<bool>) {
    let mut addressing = config.old_addressing.clone();
    let mut attempt = 0u32;
    loop {
        let served = tokio::select! {
            r = serve(&config, &mut addressing) => r,
            _ = stopped(&mut stop) => return,
        };
        if let Err(error) = served {
            tracing::debug!(agent = %config.name, %error, "ioppytest control connection failed");
        }
        let delay = crate::amqp::backoff(attempt, crate::worker::now_ns());
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stopped(&mut stop) => return,
        }
    }
}

async fn serve(config: &AgentConfig, addressing: &mut OldAddressing) -> anyhow::Result<()> {
    let (exchange, name) = (config.exchange.as_str(), config.name.as_str());
    let (_conn, ch, mut consumer) = open(&config.url, exchange, name, &config.queue_prefix()).await?;
    let started_key = ioppytest::routing_key_tun_started(name);
    announce_ready(&ch, exchange, name).await?;
    publish(&ch, exchange, &started_key, &addressing.to_started(name)).await?;
    while let Some(d) = consumer.next().await {
        let d = d?;
        let Ok(t) = serde_json::from_slice::<TunStarted>(&d.data) else {
            tracing::warn!(agent = name, "ignoring an ip.tun.start that is not valid JSON");
            continue;
        };
        let wanted = OldAddressing::from_started(&t);
        for p in wanted.prefixes() {
            if !config.addrs.iter().any(|c| c.addr == p.addr) && !addressing.prefixes().iter().any(|c| c.addr == p.addr) {
                match crate::tun::netns::add_address(config.netns.as_deref(), &config.ifname, &p) {
                    Ok(()) => tracing::info!(agent = name, address = %p, "address added by ip.tun.start"),
                    Err(e) => tracing::warn!(agent = name, error = %e, "cannot add address from ip.tun.start"),
                }
            }
        }
        if !wanted.is_empty() {
            *addressing = wanted;
        }
        publish(&ch, exchange, &started_key, &addressing.to_started(name)).await?;
    }
    anyhow::bail!("the broker cancelled the control consumer")
}
