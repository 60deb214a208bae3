//! `broker_bench`: what the broker alone can carry, the ceiling under any bus tunnel.
//!
//! One publisher connection and one consumer connection on one transient queue (published
//! through the default exchange), the same lapin settings as a tunbus link: transient
//! messages, no confirms, prefetch 256, acks batched with `multiple`. For each message size
//! it publishes as fast as the broker accepts for `--seconds`, keeping at most a bounded
//! number of messages in flight (so the queue measures throughput, not memory), and counts
//! what the consumer received. Then it measures the one-hop latency of a 100-byte message,
//! publish → delivery, one message at a time. Prints one JSON object on stdout.
//!
//! ```text
//! broker_bench [--url amqp://guest:guest@127.0.0.1:5672/%2f] [--seconds 3]
//!              [--sizes 1536,65536,262144] [--latency-samples 2000]
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueDeclareOptions,
    QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::Notify;

const PREFETCH: u16 = 256;
/// Bytes allowed between publisher and consumer: enough to keep both busy, small enough that
/// the broker never pages messages out.
const IN_FLIGHT_BYTES: u64 = 32 * 1024 * 1024;

struct Args {
    url: String,
    seconds: f64,
    sizes: Vec<usize>,
    latency_samples: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        url: "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned(),
        seconds: 3.0,
        sizes: vec![1536, 64 * 1024, 256 * 1024],
        latency_samples: 2000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => args.url = value()?,
            "--seconds" => args.seconds = value()?.parse().context("--seconds")?,
            "--sizes" => {
                args.sizes = value()?.split(',').map(|s| s.trim().parse()).collect::<Result<_, _>>().context("--sizes")?
            }
            "--latency-samples" => args.latency_samples = value()?.parse().context("--latency-samples")?,
            other => bail!(
                "unknown argument {other:?}\nusage: broker_bench [--url URL] [--seconds S] [--sizes A,B,..] [--latency-samples N]"
            ),
        }
    }
    Ok(args)
}

async fn connect(url: &str, name: &str) -> anyhow::Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(url, props).await.with_context(|| format!("connecting to {url}"))
}

/// Shared between the publisher and the consumer task.
#[derive(Default)]
struct Progress {
    received: AtomicU64,
    received_bytes: AtomicU64,
    consumed: Notify,
    /// Latency mode: the consumer reports each arrival through this.
    arrived: Notify,
    latency_mode: AtomicBool,
}

async fn consume(channel: Channel, queue: String, progress: Arc<Progress>) -> anyhow::Result<()> {
    channel.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(queue.as_str().into(), "broker-bench".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    let mut since_ack = 0u16;
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery?;
        progress.received_bytes.fetch_add(delivery.data.len() as u64, Ordering::Relaxed);
        progress.received.fetch_add(1, Ordering::Release);
        since_ack += 1;
        let latency = progress.latency_mode.load(Ordering::Relaxed);
        if latency {
            progress.arrived.notify_one();
        } else {
            progress.consumed.notify_one();
        }
        if latency || since_ack >= PREFETCH / 2 {
            channel.basic_ack(delivery.delivery_tag, BasicAckOptions { multiple: true }).await?;
            since_ack = 0;
        }
    }
    Ok(())
}

async fn throughput(publish: &Channel, queue: &str, size: usize, seconds: f64, progress: &Progress) -> anyhow::Result<serde_json::Value> {
    let body = vec![0xA5u8; size];
    let window = (IN_FLIGHT_BYTES / size as u64).clamp(2 * u64::from(PREFETCH), 65_536);
    let base = progress.received.load(Ordering::Acquire);
    let base_bytes = progress.received_bytes.load(Ordering::Relaxed);
    let mut published = 0u64;
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    while Instant::now() < deadline {
        while published.saturating_sub(progress.received.load(Ordering::Acquire) - base) >= window {
            let _ = tokio::time::timeout(Duration::from_millis(10), progress.consumed.notified()).await;
        }
        publish
            .basic_publish("".into(), queue.into(), BasicPublishOptions::default(), &body, BasicProperties::default())
            .await?;
        published += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let msgs = progress.received.load(Ordering::Acquire) - base;
    let bytes = progress.received_bytes.load(Ordering::Relaxed) - base_bytes;
    // Let the consumer catch up before the next size, so runs do not overlap.
    let settle = Instant::now();
    while progress.received.load(Ordering::Acquire) - base < published && settle.elapsed() < Duration::from_secs(5) {
        let _ = tokio::time::timeout(Duration::from_millis(10), progress.consumed.notified()).await;
    }
    Ok(serde_json::json!({
        "size_bytes": size,
        "seconds": elapsed,
        "published": published,
        "received": msgs,
        "msg_per_s": msgs as f64 / elapsed,
        "gbit_per_s": bytes as f64 * 8.0 / elapsed / 1e9,
    }))
}

fn percentile(sorted_us: &[f64], q: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted_us.len() as f64 - 1.0) * q).round() as usize;
    sorted_us[i.min(sorted_us.len() - 1)]
}

async fn latency(publish: &Channel, queue: &str, samples: usize, progress: &Progress) -> anyhow::Result<serde_json::Value> {
    progress.latency_mode.store(true, Ordering::Relaxed);
    let body = [0x5Au8; 100];
    let mut us = Vec::with_capacity(samples);
    for i in 0..samples + 50 {
        let before = progress.received.load(Ordering::Acquire);
        let t0 = Instant::now();
        publish
            .basic_publish("".into(), queue.into(), BasicPublishOptions::default(), &body, BasicProperties::default())
            .await?;
        while progress.received.load(Ordering::Acquire) == before {
            if tokio::time::timeout(Duration::from_secs(2), progress.arrived.notified()).await.is_err() {
                bail!("a 100-byte message did not arrive within 2 s");
            }
        }
        if i >= 50 {
            // the first 50 warm up connections and caches
            us.push(t0.elapsed().as_secs_f64() * 1e6);
        }
    }
    us.sort_by(f64::total_cmp);
    Ok(serde_json::json!({
        "size_bytes": 100,
        "samples": us.len(),
        "p50_us": percentile(&us, 0.5),
        "p99_us": percentile(&us, 0.99),
        "p999_us": percentile(&us, 0.999),
        "mean_us": us.iter().sum::<f64>() / us.len().max(1) as f64,
    }))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let queue = format!("tunbus-perf-broker-{}-{}", std::process::id(), tunbus::worker::now_ns() % 1_000_000);
    let pub_conn = connect(&args.url, "broker_bench publisher").await?;
    let sub_conn = connect(&args.url, "broker_bench consumer").await?;
    let publish = pub_conn.create_channel().await?;
    let consume_ch = sub_conn.create_channel().await?;
    consume_ch
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions { auto_delete: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    let progress = Arc::new(Progress::default());
    let consumer = tokio::spawn(consume(consume_ch.clone(), queue.clone(), progress.clone()));

    let result = async {
        let mut runs = Vec::new();
        for &size in &args.sizes {
            runs.push(throughput(&publish, &queue, size, args.seconds, &progress).await?);
        }
        let lat = latency(&publish, &queue, args.latency_samples, &progress).await?;
        anyhow::Ok(serde_json::json!({ "queue": queue, "throughput": runs, "one_hop_latency": lat }))
    }
    .await;

    // Always remove the queue, also when a run failed.
    let _ = publish.queue_purge(queue.as_str().into(), QueuePurgeOptions::default()).await;
    let _ = publish.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
    consumer.abort();
    let _ = pub_conn.close(200, "done".into()).await;
    let _ = sub_conn.close(200, "done".into()).await;
    println!("{}", serde_json::to_string(&result?)?);
    Ok(())
}
