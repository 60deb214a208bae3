//! A Prometheus text endpoint (`--metrics-addr`): `GET /metrics` on a loopback port.
//!
//! Control plane: a tokio task accepts connections, each served by a task of its own (a
//! slow scraper never holds another), and renders on demand (one short lock per histogram
//! per scrape): counters, latency as histograms with fixed buckets (which sum across
//! agents) and as quantile summaries, batch-size summaries, a connected gauge per link and
//! build information. Names follow Prometheus conventions: base units (seconds, bytes),
//! `_total` for counters, labels bounded by the agent name, the queue index and the drop
//! reasons; a serial probe's (or simulated radio's) counters when the port is one. A minimal HTTP/1.0 responder is enough for scrapers and `curl`; it reads one
//! request head and closes. `docs/grafana-dashboard.json` charts these names.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::report::{self, Percentiles};
use super::{AgentCounters, DropReason, Histograms, LinkState, SharedHistogram, Snapshot};

/// Upper bounds (seconds) of the latency histograms' buckets: 50 µs to 1 s, roughly ×2.
pub const LATENCY_BUCKETS_S: [f64; 14] = [50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0];

/// What one scrape reads.
pub struct Sources {
    pub agent: String,
    pub counters: AgentCounters,
    pub hist: Vec<Arc<Histograms>>,
    pub links: Vec<Arc<LinkState>>,
    /// A serial probe's (or simulated radio's) counters, when the agent's port is one.
    pub serial: Option<Arc<crate::port::serial::SerialCounters>>,
}

/// Parses `--metrics-addr`: `HOST:PORT`, or just `PORT` (then 127.0.0.1).
pub fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    text.parse().map_err(|_| format!("--metrics-addr {text:?} is not HOST:PORT or PORT"))
}

/// Renders the exposition text.
pub fn render(src: &Sources) -> String {
    let (agent, hist) = (&src.agent, &src.hist);
    let s = Snapshot::of(&src.counters);
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
    let _ = writeln!(
        out,
        "# HELP tunbus_build_info The running version.\n# TYPE tunbus_build_info gauge\ntunbus_build_info{{{label},version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    let _ = writeln!(out, "# HELP tunbus_link_connected Whether queue k's broker connection is up (1) or not (0).\n# TYPE tunbus_link_connected gauge");
    for (k, l) in src.links.iter().enumerate() {
        let _ = writeln!(out, "tunbus_link_connected{{{label},queue=\"{k}\"}} {}", u8::from(l.node().is_some()));
    }
    let mut histogram = |name: &str, help: &str, hists: &mut dyn Iterator<Item = &SharedHistogram>| {
        let merged = report::merged_histogram(hists);
        let _ = writeln!(out, "# HELP tunbus_{name} {help}\n# TYPE tunbus_{name} histogram");
        for bound in LATENCY_BUCKETS_S {
            // Recorded in whole microseconds: the bucket holds every value up to its bound.
            let count = if merged.is_empty() { 0 } else { merged.count_between(0, (bound * 1e6).round() as u64) };
            let _ = writeln!(out, "tunbus_{name}_bucket{{{label},le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(out, "tunbus_{name}_bucket{{{label},le=\"+Inf\"}} {}", merged.len());
        let _ = writeln!(out, "tunbus_{name}_sum{{{label}}} {}", merged.mean() * merged.len() as f64 * 1e-6);
        let _ = writeln!(out, "tunbus_{name}_count{{{label}}} {}", merged.len());
    };
    histogram("one_way_latency_seconds", "Sender batch timestamp to TUN write, since start.", &mut hist.iter().map(|h| &h.one_way_us));
    histogram("read_to_publish_seconds", "TUN read burst to batch published, since start.", &mut hist.iter().map(|h| &h.read_to_publish_us));
    histogram("loop_turn_seconds", "One turn of a queue worker's loop, waking to waiting again, since start.", &mut hist.iter().map(|h| &h.loop_turn_us));
    let mut summary = |name: &str, help: &str, p: Percentiles, scale: f64| {
        let _ = writeln!(out, "# HELP tunbus_{name} {help}\n# TYPE tunbus_{name} summary");
        for (q, v) in [("0.5", p.p50_us), ("0.99", p.p99_us), ("0.999", p.p999_us)] {
            let _ = writeln!(out, "tunbus_{name}{{{label},quantile=\"{q}\"}} {}", v as f64 * scale);
        }
        let _ = writeln!(out, "tunbus_{name}_sum{{{label}}} {}", p.mean * p.samples as f64 * scale);
        let _ = writeln!(out, "tunbus_{name}_count{{{label}}} {}", p.samples);
    };
    summary(
        "one_way_latency_quantiles_seconds",
        "Sender batch timestamp to TUN write, since start (quantiles).",
        report::merged(hist.iter().map(|h| &h.one_way_us)),
        1e-6,
    );
    summary(
        "read_to_publish_quantiles_seconds",
        "TUN read burst to batch published, since start (quantiles).",
        report::merged(hist.iter().map(|h| &h.read_to_publish_us)),
        1e-6,
    );
    summary(
        "loop_turn_quantiles_seconds",
        "One turn of a queue worker's loop, since start (quantiles; max is the loop's worst stall).",
        report::merged(hist.iter().map(|h| &h.loop_turn_us)),
        1e-6,
    );
    summary("batch_packets", "Packets per published batch, since start.", report::merged(hist.iter().map(|h| &h.batch_packets)), 1.0);
    summary("batch_bytes", "Bytes per published batch, since start.", report::merged(hist.iter().map(|h| &h.batch_bytes)), 1.0);
    if let Some(serial) = &src.serial {
        render_serial(&mut out, &label, &serial.snapshot());
    }
    out
}

/// A serial probe's counters: frames and bytes each way, frames dropped by reason,
/// outages and reopens, and whether the device is open.
fn render_serial(out: &mut String, label: &str, s: &crate::port::serial::SerialStats) {
    let _ =
        writeln!(out, "# HELP tunbus_serial_frames_total Frames read from the probe (in) and taken by it (out).\n# TYPE tunbus_serial_frames_total counter");
    let _ = writeln!(
        out,
        "tunbus_serial_frames_total{{{label},direction=\"in\"}} {}\ntunbus_serial_frames_total{{{label},direction=\"out\"}} {}",
        s.frames_in, s.frames_out
    );
    let _ = writeln!(
        out,
        "# HELP tunbus_serial_bytes_total Frame bytes read from the probe (in) and taken by it (out), unescaped.\n# TYPE tunbus_serial_bytes_total counter"
    );
    let _ = writeln!(
        out,
        "tunbus_serial_bytes_total{{{label},direction=\"in\"}} {}\ntunbus_serial_bytes_total{{{label},direction=\"out\"}} {}",
        s.bytes_in, s.bytes_out
    );
    let _ =
        writeln!(out, "# HELP tunbus_serial_dropped_frames_total Frames dropped at the probe, by reason.\n# TYPE tunbus_serial_dropped_frames_total counter");
    for (reason, n) in [
        ("bad_escape", s.bad_escape),
        ("too_long", s.too_long),
        ("noise", s.noise),
        ("lost_unplugged", s.lost_unplugged),
        ("lost_busy", s.lost_busy),
        ("refused_out", s.refused_out),
        ("unheard", s.unheard),
        ("lost_on_link", s.lost_on_link),
    ] {
        let _ = writeln!(out, "tunbus_serial_dropped_frames_total{{{label},reason=\"{reason}\"}} {n}");
    }
    for (name, help, v) in
        [("serial_outages_total", "Times the probe went away.", s.outages), ("serial_reopens_total", "Times the probe was opened again.", s.reopens)]
    {
        let _ = writeln!(out, "# HELP tunbus_{name} {help}\n# TYPE tunbus_{name} counter\ntunbus_{name}{{{label}}} {v}");
    }
    let _ = writeln!(
        out,
        "# HELP tunbus_serial_connected Whether the probe's device is open (1) or not (0).\n# TYPE tunbus_serial_connected gauge\ntunbus_serial_connected{{{label}}} {}",
        u8::from(s.connected)
    );
}

/// Serves `/metrics` on `listener` until `stop`.
pub async fn serve(listener: TcpListener, sources: Sources, mut stop: watch::Receiver<bool>) {
    let sources = Arc::new(sources);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => return,
        };
        let Ok((mut sock, _)) = accepted else { continue };
        let sources = sources.clone();
        tokio::spawn(async move {
            let mut head = [0u8; 1024];
            let n = match tokio::time::timeout(Duration::from_secs(2), sock.read(&mut head)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let request = String::from_utf8_lossy(&head[..n]);
            let (status, body) = if request.starts_with("GET /metrics") || request.starts_with("GET / ") {
                ("200 OK", render(&sources))
            } else {
                ("404 Not Found", "try GET /metrics\n".to_owned())
            };
            let response =
                format!("HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
            let _ = tokio::time::timeout(Duration::from_secs(2), sock.write_all(response.as_bytes())).await;
        });
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
        let link = Arc::new(LinkState::default());
        link.up(0);
        let serial = Arc::new(crate::port::serial::SerialCounters::default());
        serial.frames_in.store(5, std::sync::atomic::Ordering::Relaxed);
        serial.unheard.store(3, std::sync::atomic::Ordering::Relaxed);
        let text = render(&Sources { agent: "h\"1".into(), counters: c, hist: vec![h], links: vec![link, Arc::default()], serial: Some(serial) });
        assert!(text.contains("tunbus_serial_frames_total{agent=\"h_1\",direction=\"in\"} 5"), "{text}");
        assert!(text.contains("tunbus_serial_dropped_frames_total{agent=\"h_1\",reason=\"unheard\"} 3"), "{text}");
        assert!(text.contains("tunbus_serial_connected{agent=\"h_1\"} 0"), "{text}");
        assert!(text.contains("tunbus_tx_packets_total{agent=\"h_1\"} 7"), "{text}");
        assert!(text.contains("tunbus_dropped_packets_total{agent=\"h_1\",reason=\"malformed\"} 2"), "{text}");
        assert!(text.contains("tunbus_one_way_latency_seconds_count{agent=\"h_1\"} 1"), "{text}");
        // 250 µs: in the 250 µs bucket and above, not in the 100 µs one.
        assert!(text.contains("tunbus_one_way_latency_seconds_bucket{agent=\"h_1\",le=\"0.0001\"} 0"), "{text}");
        assert!(text.contains("tunbus_one_way_latency_seconds_bucket{agent=\"h_1\",le=\"0.00025\"} 1"), "{text}");
        assert!(text.contains("tunbus_one_way_latency_seconds_bucket{agent=\"h_1\",le=\"+Inf\"} 1"), "{text}");
        assert!(text.contains("tunbus_link_connected{agent=\"h_1\",queue=\"0\"} 1"), "{text}");
        assert!(text.contains("tunbus_link_connected{agent=\"h_1\",queue=\"1\"} 0"), "{text}");
        assert!(text.contains("tunbus_build_info{agent=\"h_1\",version=\""), "{text}");
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').expect("name value");
            assert!(name.starts_with("tunbus_"), "{line}");
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }

    /// The dashboard in docs/ is a Grafana dashboard (its schema's required shape) and
    /// charts only names this endpoint serves.
    #[test]
    fn the_grafana_dashboard_loads_and_uses_only_served_names() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/grafana-dashboard.json");
        let d: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).expect("the dashboard")).expect("JSON");
        assert!(d["title"].is_string() && d["uid"].is_string() && d["schemaVersion"].as_u64().is_some_and(|v| v >= 30), "{d}");
        let panels = d["panels"].as_array().expect("panels");
        assert!(panels.len() >= 6);
        let mut ids = std::collections::BTreeSet::new();
        let c = AgentCounters { tx: vec![Arc::default()], rx: vec![Arc::default()] };
        let served = render(&Sources { agent: "h1".into(), counters: c, hist: vec![Histograms::new()], links: vec![Arc::default()], serial: None });
        let names: std::collections::BTreeSet<&str> = served.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split('{').next()).collect();
        let mut used = 0;
        for p in panels {
            assert!(ids.insert(p["id"].as_u64().expect("id")), "duplicate panel id: {p}");
            assert!(p["type"].is_string() && p["title"].is_string(), "{p}");
            for k in ["h", "w", "x", "y"] {
                assert!(p["gridPos"][k].as_u64().is_some(), "gridPos.{k}: {p}");
            }
            let targets = p["targets"].as_array().expect("targets");
            assert!(!targets.is_empty(), "{p}");
            for t in targets {
                assert!(t["refId"].is_string(), "{t}");
                let expr = t["expr"].as_str().expect("expr");
                for (i, _) in expr.match_indices("tunbus_") {
                    let name: String = expr[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                    assert!(names.contains(name.as_str()), "{name} (in {expr:?}) is not served; served: {names:?}");
                    used += 1;
                }
            }
        }
        assert!(used >= 15, "{used} names used");
    }
}
