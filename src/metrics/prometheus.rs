//! A Prometheus text endpoint (`--metrics-addr`): `GET /metrics` on a loopback port.
//!
//! Control plane: a tokio task accepts connections and renders counters and histogram
//! summaries on demand (one short lock per histogram per scrape). Names follow Prometheus
//! conventions: base units (seconds, bytes), `_total` for counters, labels bounded by the
//! agent name and the drop reasons. A minimal HTTP/1.0 responder is enough for scrapers and
//! `curl`; it reads one request head and closes.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::report::{self, Percentiles};
use super::{AgentCounters, DropReason, Histograms, Snapshot};

/// Parses `--metrics-addr`: `HOST:PORT`, or just `PORT` (then 127.0.0.1).
pub fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    text.parse().map_err(|_| format!("--metrics-addr {text:?} is not HOST:PORT or PORT"))
}

/// Renders the exposition text.
pub fn render(agent: &str, counters: &AgentCounters, hist: &[Arc<Histograms>]) -> String {
    let s = Snapshot::of(counters);
    let mut out = String::with_capacity(4096);
    let label = format!("agent=\"{}\"", agent.replace(['\\', '"'], "_"));
    let mut counter = |name: &str, help: &str, v: u64| {
        let _ = writeln!(out, "# HELP tunbus_{name} {help}\n# TYPE tunbus_{name} counter\ntunbus_{name}{{{label}}} {v}");
    };
    counter("tx_packets_total", "Packets published to the bus.", s.tx_packets);
    counter("tx_bytes_total", "IP bytes published to the bus.", s.tx_bytes);
    counter("tx_batches_total", "Batches (AMQP messages) published.", s.tx_batches);
    counter("rx_packets_total", "Packets written into the TUN.", s.rx_packets);
    counter("rx_bytes_total", "IP bytes written into the TUN.", s.rx_bytes);
    counter("rx_batches_total", "Batches (AMQP messages) received.", s.rx_batches);
    counter("reconnects_total", "Broker connections re-established.", s.reconnects);
    let _ = writeln!(out, "# HELP tunbus_dropped_packets_total Packets (or messages) dropped, by reason.\n# TYPE tunbus_dropped_packets_total counter");
    for r in DropReason::ALL {
        let _ = writeln!(out, "tunbus_dropped_packets_total{{{label},reason=\"{}\"}} {}", r.name(), s.dropped(r));
    }
    let mut summary = |name: &str, help: &str, p: Percentiles, scale: f64| {
        let _ = writeln!(out, "# HELP tunbus_{name} {help}\n# TYPE tunbus_{name} summary");
        for (q, v) in [("0.5", p.p50_us), ("0.99", p.p99_us), ("0.999", p.p999_us)] {
            let _ = writeln!(out, "tunbus_{name}{{{label},quantile=\"{q}\"}} {}", v as f64 * scale);
        }
        let _ = writeln!(out, "tunbus_{name}_sum{{{label}}} {}", p.mean * p.samples as f64 * scale);
        let _ = writeln!(out, "tunbus_{name}_count{{{label}}} {}", p.samples);
    };
    summary("one_way_latency_seconds", "Sender batch timestamp to TUN write, since start.", report::merged(hist.iter().map(|h| &h.one_way_us)), 1e-6);
    summary("read_to_publish_seconds", "TUN read burst to batch published, since start.", report::merged(hist.iter().map(|h| &h.read_to_publish_us)), 1e-6);
    summary("batch_packets", "Packets per published batch, since start.", report::merged(hist.iter().map(|h| &h.batch_packets)), 1.0);
    summary("batch_bytes", "Bytes per published batch, since start.", report::merged(hist.iter().map(|h| &h.batch_bytes)), 1.0);
    out
}

/// Serves `/metrics` on `listener` until `stop`.
pub async fn serve(listener: TcpListener, agent: String, counters: AgentCounters, hist: Vec<Arc<Histograms>>, mut stop: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => return,
        };
        let Ok((mut sock, _)) = accepted else { continue };
        let mut head = [0u8; 1024];
        let n = match tokio::time::timeout(Duration::from_secs(2), sock.read(&mut head)).await {
            Ok(Ok(n)) => n,
            _ => continue,
        };
        let request = String::from_utf8_lossy(&head[..n]);
        let (status, body) = if request.starts_with("GET /metrics") || request.starts_with("GET / ") {
            ("200 OK", render(&agent, &counters, &hist))
        } else {
            ("404 Not Found", "try GET /metrics\n".to_owned())
        };
        let response = format!(
            "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = tokio::time::timeout(Duration::from_secs(2), sock.write_all(response.as_bytes())).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(parse_addr("9464").unwrap().to_string(), "127.0.0.1:9464");
        assert_eq!(parse_addr("[::1]:9000").unwrap().to_string(), "[::1]:9000");
        assert!(parse_addr("nope").is_err());
    }

    #[test]
    fn exposition_text_is_well_formed() {
        let (tx, rx) = (Arc::new(super::super::TxCounters::default()), Arc::new(super::super::RxCounters::default()));
        tx.sent.message(7, 700);
        rx.record_drop(DropReason::Malformed, 2);
        let c = AgentCounters { tx: vec![tx], rx: vec![rx] };
        let h = Histograms::new();
        h.one_way_us.lock().unwrap().record(250).unwrap();
        let text = render("h\"1", &c, &[h]);
        assert!(text.contains("tunbus_tx_packets_total{agent=\"h_1\"} 7"), "{text}");
        assert!(text.contains("tunbus_dropped_packets_total{agent=\"h_1\",reason=\"malformed\"} 2"), "{text}");
        assert!(text.contains("tunbus_one_way_latency_seconds_count{agent=\"h_1\"} 1"), "{text}");
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').expect("name value");
            assert!(name.starts_with("tunbus_"), "{line}");
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
