//! Diagnostic: holds N idle AMQP connections open on the local broker for S seconds.
use std::time::Duration;
use tunbus::amqp::conn::Conn;
fn main() {
    let n: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(900);
    let secs: u64 = std::env::args().nth(2).and_then(|s| s.parse().ok()).unwrap_or(30);
    let conns: Vec<Conn> = (0..n)
        .map(|_| Conn::open("amqp://guest:guest@127.0.0.1:5672/%2f", "idle", Some(32768), Duration::from_secs(10)).expect("connect"))
        .collect();
    eprintln!("{} idle connections open", conns.len());
    std::thread::sleep(Duration::from_secs(secs));
}
