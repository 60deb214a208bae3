//! Diagnostic: holds N idle AMQP connections open on the local broker for S seconds.
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use tunbus::amqp::client::{Client, ConnectOptions, Endpoint};

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(900);
    let secs: u64 = std::env::args().nth(2).and_then(|s| s.parse().ok()).unwrap_or(30);
    let endpoint = Endpoint::plain("amqp://guest:guest@127.0.0.1:5672/%2f".parse()?);
    let mut opts = ConnectOptions::new("idle");
    opts.frame_max = Some(32768);
    opts.timeout = Some(Duration::from_secs(10));
    opts.heartbeat = Duration::ZERO; // nobody ticks these connections
    let never = AtomicBool::new(false);
    let conns = (0..n).map(|_| Client::open(&endpoint, &opts, &never)).collect::<Result<Vec<_>, _>>()?;
    eprintln!("{} idle connections open", conns.len());
    std::thread::sleep(Duration::from_secs(secs));
    Ok(())
}
