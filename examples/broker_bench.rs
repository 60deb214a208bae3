//! `broker_bench`: what the broker alone can carry, the ceiling under any bus tunnel.
//!
//! Uses the same AMQP client as the agent's data path (`tunbus::amqp::client`): one publishing
//! connection (this thread) and one consuming connection (its own thread) on one exclusive
//! queue, published through the default exchange; transient messages, no confirms,
//! prefetch 256, acks batched with `multiple`. For each message size it publishes as fast as
//! the broker accepts for `--seconds`, keeping a bounded number of bytes in flight (so the
//! queue measures throughput, not memory), and counts what the consumer received.
//!
//! Then the one-hop latency of a 100-byte message, publish → delivery, one message at a
//! time, once back to back and once with a pause between messages (`--latency-gaps`, in ms;
//! the benchmark's ping interval): a broker that has gone idle takes longer to wake, so the
//! limit a ping is compared with must be measured at the ping's own pace. Prints one JSON
//! object on stdout.
//!
//! ```text
//! broker_bench [--url amqp://guest:guest@127.0.0.1:5672/%2f] [--seconds 3]
//!              [--sizes 1536,65536,262144] [--latency-samples 2000] [--latency-gaps 0,10]
//!              [--tls-ca FILE]   (amqps:// URLs: the CA that signed the broker's certificate)
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tunbus::amqp::client::{Client, ConnectOptions, Endpoint, Published};
use tunbus::amqp::session::{Event, QueueOptions};
use tunbus::amqp::wire::{Properties, Value};
use tunbus::sys::{wait_fd, Interest};

const PREFETCH: u16 = 256;
/// Bytes allowed between publisher and consumer: enough to keep both busy, small enough that
/// the broker never pages messages out.
const IN_FLIGHT_BYTES: u64 = 32 * 1024 * 1024;

struct Args {
    url: String,
    seconds: f64,
    sizes: Vec<usize>,
    latency_samples: usize,
    latency_gaps_ms: Vec<u64>,
    /// `x-queue-type` (classic, quorum): quorum queues are durable and replicated, so the
    /// queue is not exclusive and is deleted at the end.
    queue_type: String,
    /// The publisher's node when it differs from the consumer's (`--url`).
    publish_url: Option<String>,
    /// TLS (`amqps://`): the CA of the broker's certificate.
    tls: tunbus::amqp::tls::TlsOptions,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        url: "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned(),
        seconds: 3.0,
        sizes: vec![1536, 64 * 1024, 256 * 1024],
        latency_samples: 2000,
        latency_gaps_ms: vec![0, 10],
        queue_type: "classic".to_owned(),
        publish_url: None,
        tls: Default::default(),
    };
    let list =
        |v: String, flag: &str| -> anyhow::Result<Vec<u64>> { v.split(',').map(|s| s.trim().parse().with_context(|| format!("{flag}: {s:?}"))).collect() };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => args.url = value()?,
            "--seconds" => args.seconds = value()?.parse().context("--seconds")?,
            "--sizes" => args.sizes = list(value()?, "--sizes")?.into_iter().map(|s| s as usize).collect(),
            "--latency-samples" => args.latency_samples = value()?.parse().context("--latency-samples")?,
            "--latency-gaps" => args.latency_gaps_ms = list(value()?, "--latency-gaps")?,
            "--queue-type" => args.queue_type = value()?,
            "--publish-url" => args.publish_url = Some(value()?),
            "--tls-ca" => args.tls.ca = Some(value()?.into()),
            other => bail!(
                "unknown argument {other:?}\nusage: broker_bench [--url URL] [--seconds S] [--sizes A,B,..] \
                 [--latency-samples N] [--latency-gaps MS,MS,..] [--tls-ca FILE]"
            ),
        }
    }
    Ok(args)
}

/// What the consumer thread has received.
struct Progress {
    messages: AtomicU64,
    bytes: AtomicU64,
    /// When the last body frame arrived, in ns since `epoch`.
    arrival_ns: AtomicU64,
    epoch: Instant,
    stop: AtomicBool,
}

/// Consumes until stopped: counts messages and body bytes, acks every half prefetch and
/// whenever nothing more has arrived.
fn consume(mut conn: Client, progress: Arc<Progress>) -> anyhow::Result<()> {
    let mut last_tag = 0u64;
    let mut unacked = 0u16;
    while !progress.stop.load(Ordering::Relaxed) {
        loop {
            let event = conn.next_event(Instant::now())?;
            let Some(Event::Delivery(d)) = event else {
                if event.is_none() {
                    break;
                }
                continue;
            };
            last_tag = d.tag;
            unacked += 1;
            progress.bytes.fetch_add(d.body.len() as u64, Ordering::Relaxed);
            progress.arrival_ns.store(progress.epoch.elapsed().as_nanos() as u64, Ordering::Release);
            progress.messages.fetch_add(1, Ordering::Release);
            if unacked >= PREFETCH / 2 {
                conn.ack_multiple(last_tag);
                unacked = 0;
            }
        }
        if conn.read_some()? == 0 {
            if unacked > 0 {
                conn.ack_multiple(last_tag);
                unacked = 0;
            }
            conn.flush(Instant::now())?;
            let Some((fd, _)) = conn.fd() else { bail!("lost the broker") };
            wait_fd(fd, Interest::Read, Duration::from_millis(100))?;
        }
        conn.tick(Instant::now())?;
    }
    conn.close(Duration::from_millis(500));
    Ok(())
}

/// Publishes one message, waiting while the previous one is still being written.
fn publish_one(conn: &mut Client, queue: &str, body: &[u8]) -> anyhow::Result<()> {
    loop {
        match conn.publish(Instant::now(), "", queue, &Properties::default(), body)? {
            Published::Sent => return Ok(()),
            Published::Busy => {
                conn.wait_writable(Duration::from_secs(2))?;
            }
            Published::Blocked => bail!("the broker blocked publishing (a resource alarm)"),
            Published::Down => bail!("lost the broker"),
        }
    }
}

fn throughput(publish: &mut Client, queue: &str, size: usize, seconds: f64, progress: &Progress) -> anyhow::Result<serde_json::Value> {
    let body = vec![0xA5u8; size];
    let window = (IN_FLIGHT_BYTES / size as u64).clamp(2 * u64::from(PREFETCH), 65_536);
    let base = progress.messages.load(Ordering::Acquire);
    let base_bytes = progress.bytes.load(Ordering::Relaxed);
    let received = || progress.messages.load(Ordering::Acquire) - base;
    let mut published = 0u64;
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    while Instant::now() < deadline {
        while published.saturating_sub(received()) >= window {
            thread::sleep(Duration::from_micros(50));
        }
        publish_one(publish, queue, &body)?;
        published += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let msgs = received();
    let bytes = progress.bytes.load(Ordering::Relaxed) - base_bytes;
    // Let the consumer catch up before the next size, so runs do not overlap.
    let settle = Instant::now();
    while received() < published && settle.elapsed() < Duration::from_secs(5) {
        thread::sleep(Duration::from_millis(1));
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

/// One-hop latency, one message at a time with `gap` between them: publish time to the
/// consumer thread's arrival time (it notes the time itself, so how this thread waits for
/// the arrival does not count).
fn latency(publish: &mut Client, queue: &str, samples: usize, gap: Duration, progress: &Progress) -> anyhow::Result<serde_json::Value> {
    let body = [0x5Au8; 100];
    let mut us = Vec::with_capacity(samples);
    for i in 0..samples + 50 {
        if !gap.is_zero() {
            thread::sleep(gap);
        }
        let t0 = progress.epoch.elapsed().as_nanos() as u64;
        publish_one(publish, queue, &body)?;
        let arrived = loop {
            let at = progress.arrival_ns.load(Ordering::Acquire);
            if at > t0 {
                break at;
            }
            if progress.epoch.elapsed().as_nanos() as u64 - t0 > 2_000_000_000 {
                bail!("a 100-byte message did not arrive within 2 s");
            }
            thread::sleep(Duration::from_micros(100));
        };
        if i >= 50 {
            // the first 50 warm up connections and caches
            us.push((arrived - t0) as f64 / 1e3);
        }
    }
    us.sort_by(f64::total_cmp);
    Ok(serde_json::json!({
        "size_bytes": 100,
        "gap_ms": gap.as_millis() as u64,
        "samples": us.len(),
        "p50_us": percentile(&us, 0.5),
        "p99_us": percentile(&us, 0.99),
        "p999_us": percentile(&us, 0.999),
        "mean_us": us.iter().sum::<f64>() / us.len().max(1) as f64,
    }))
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let queue = format!("tunbus-perf-broker-{}-{}", std::process::id(), tunbus::util::now_ns() % 1_000_000);
    let endpoint = Endpoint::new(args.url.parse()?, &args.tls)?;
    let never = AtomicBool::new(false);
    let mut consumer =
        Client::open(&endpoint, &ConnectOptions::new("broker_bench consumer"), &never).with_context(|| format!("connecting to {}", endpoint.url))?;
    // Exclusive: the queue goes with the consumer's connection, whatever happens.
    let quorum = args.queue_type != "classic";
    let options = QueueOptions { exclusive: !quorum, ..QueueOptions::default() };
    let mut qargs = vec![("x-max-length", Value::I32(i32::MAX))];
    if quorum {
        qargs.push(("x-queue-type", Value::Str(&args.queue_type)));
    }
    if quorum {
        consumer.call(|s| s.queue_declare_durable(&queue, &qargs), &never)?; // quorum queues must be durable
    } else {
        consumer.queue_declare(&queue, options, &qargs, &never)?;
    }
    consumer.basic_qos(PREFETCH, &never)?;
    consumer.basic_consume(&queue, "broker-bench", false, true, &never)?;
    let publish_endpoint = match &args.publish_url {
        Some(u) => Endpoint::new(u.parse()?, &args.tls)?,
        None => endpoint.clone(),
    };
    let mut publish = Client::open(&publish_endpoint, &ConnectOptions::new("broker_bench publisher"), &never)?;
    let progress = Arc::new(Progress {
        messages: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
        arrival_ns: AtomicU64::new(0),
        epoch: Instant::now(),
        stop: AtomicBool::new(false),
    });
    let consumer = {
        let progress = progress.clone();
        thread::spawn(move || consume(consumer, progress))
    };

    let result = (|| {
        let mut runs = Vec::new();
        for &size in &args.sizes {
            runs.push(throughput(&mut publish, &queue, size, args.seconds, &progress)?);
        }
        let mut hops = Vec::new();
        for &gap in &args.latency_gaps_ms {
            hops.push(latency(&mut publish, &queue, args.latency_samples, Duration::from_millis(gap), &progress)?);
        }
        let back_to_back = hops.first().cloned().unwrap_or(serde_json::Value::Null);
        anyhow::Ok(serde_json::json!({
            "client": "tunbus::amqp::client",
            "queue_type": args.queue_type,
            "queue": queue,
            "throughput": runs,
            "one_hop_latency": back_to_back,
            "one_hop_latency_by_gap": hops,
        }))
    })();

    progress.stop.store(true, Ordering::Relaxed);
    if quorum {
        let _ = publish.call(|s| s.queue_delete(&queue), &never);
    }
    publish.close(Duration::from_millis(500));
    let consumed = consumer.join().map_err(|_| anyhow::anyhow!("consumer thread panicked"))?;
    let result = result?;
    consumed?;
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}
