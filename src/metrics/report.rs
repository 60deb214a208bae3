//! Reports: the periodic one-line summary and the final report of an agent.
//!
//! Control plane: a tokio task wakes every `--stats-interval`, sums the per-worker counters,
//! merges the latency histograms (one short lock each), and logs one line with rates and
//! one-way latency percentiles. The final [`Report`] is printed on exit and serialisable
//! to JSON for scripts.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;

use super::{new_histogram, AgentCounters, DropReason, Histograms, SharedHistogram, Snapshot};

/// Latency percentiles in microseconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Percentiles {
    pub samples: u64,
    /// Mean of the samples (same unit as the percentiles).
    pub mean: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

/// An agent's statistics at one moment.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub agent: String,
    pub uptime_s: f64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub tx_batches: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub rx_batches: u64,
    pub reconnects: u64,
    /// Packets the queue management marked CE (ECN) instead of dropping them.
    pub ce_marked: u64,
    /// The largest consumer prefetch a queue grew to for a far broker (0: none grew).
    pub prefetch_grown: u64,
    pub drops: Vec<(String, u64)>,
    /// One-way latency, sender's batch timestamp → our TUN write.
    pub latency: Percentiles,
    /// TUN read burst → batch published.
    pub read_to_publish: Percentiles,
    /// Packets per batch published (the `_us` fields hold counts here).
    pub batch_packets: Percentiles,
    /// Bytes per batch published (the `_us` fields hold bytes here).
    pub batch_bytes: Percentiles,
    /// One turn of a queue worker's loop, waking to waiting again (the loop's lag).
    pub loop_turn: Percentiles,
    /// A serial probe's own counters (frames on its line, malformed SLIP by reason,
    /// outages); absent for other ports.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial: Option<crate::port::serial::SerialStats>,
}

/// One histogram of every queue, merged.
pub fn merged_histogram<'a>(hists: impl IntoIterator<Item = &'a SharedHistogram>) -> hdrhistogram::Histogram<u64> {
    let mut all = new_histogram();
    for h in hists {
        if let Ok(h) = h.lock() {
            let _ = all.add(&*h);
        }
    }
    all
}

/// Percentiles of one histogram of every queue, merged.
pub fn merged<'a>(hists: impl IntoIterator<Item = &'a SharedHistogram>) -> Percentiles {
    let all = merged_histogram(hists);
    if all.is_empty() {
        return Percentiles::default();
    }
    Percentiles {
        samples: all.len(),
        mean: all.mean(),
        p50_us: all.value_at_quantile(0.5),
        p99_us: all.value_at_quantile(0.99),
        p999_us: all.value_at_quantile(0.999),
        max_us: all.max(),
    }
}

pub fn build(agent: &str, uptime: Duration, counters: &AgentCounters, hist: &[Arc<Histograms>]) -> Report {
    let s = Snapshot::of(counters);
    Report {
        agent: agent.to_owned(),
        uptime_s: uptime.as_secs_f64(),
        tx_packets: s.tx_packets,
        tx_bytes: s.tx_bytes,
        tx_batches: s.tx_batches,
        rx_packets: s.rx_packets,
        rx_bytes: s.rx_bytes,
        rx_batches: s.rx_batches,
        reconnects: s.reconnects,
        ce_marked: s.ce_marked,
        prefetch_grown: s.prefetch,
        drops: DropReason::ALL.iter().map(|r| (r.name().to_owned(), s.dropped(*r))).filter(|(_, n)| *n > 0).collect(),
        latency: merged(hist.iter().map(|h| &h.one_way_us)),
        read_to_publish: merged(hist.iter().map(|h| &h.read_to_publish_us)),
        batch_packets: merged(hist.iter().map(|h| &h.batch_packets)),
        batch_bytes: merged(hist.iter().map(|h| &h.batch_bytes)),
        loop_turn: merged(hist.iter().map(|h| &h.loop_turn_us)),
        serial: None,
    }
}

/// Human rate: bits per second with a unit.
pub fn bits_per_s(bytes: u64, over: Duration) -> String {
    let bps = bytes as f64 * 8.0 / over.as_secs_f64().max(1e-9);
    match bps {
        b if b >= 1e9 => format!("{:.2} Gbit/s", b / 1e9),
        b if b >= 1e6 => format!("{:.1} Mbit/s", b / 1e6),
        b => format!("{:.0} kbit/s", b / 1e3),
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let up = Duration::from_secs_f64(self.uptime_s.max(0.0));
        writeln!(f, "agent {} ran {:.1} s", self.agent, self.uptime_s)?;
        writeln!(
            f,
            "  sent     {} packets, {} bytes in {} batches ({} average)",
            self.tx_packets,
            self.tx_bytes,
            self.tx_batches,
            bits_per_s(self.tx_bytes, up)
        )?;
        writeln!(
            f,
            "  received {} packets, {} bytes in {} batches ({} average)",
            self.rx_packets,
            self.rx_bytes,
            self.rx_batches,
            bits_per_s(self.rx_bytes, up)
        )?;
        let l = &self.latency;
        writeln!(f, "  one-way latency p50 {} us, p99 {} us, p99.9 {} us, max {} us ({} samples)", l.p50_us, l.p99_us, l.p999_us, l.max_us, l.samples)?;
        let w = &self.read_to_publish;
        writeln!(f, "  read→publish    p50 {} us, p99 {} us, p99.9 {} us, max {} us", w.p50_us, w.p99_us, w.p999_us, w.max_us)?;
        let (p, b) = (&self.batch_packets, &self.batch_bytes);
        writeln!(f, "  batch size      p50 {} packets / {} bytes, p99 {} packets / {} bytes", p.p50_us, b.p50_us, p.p99_us, b.p99_us)?;
        if self.prefetch_grown > 0 {
            writeln!(f, "  consumer window grew to {} messages (a far broker)", self.prefetch_grown)?;
        }
        write!(f, "  reconnects {}, drops:", self.reconnects)?;
        if self.drops.is_empty() {
            write!(f, " none")?;
        }
        for (reason, n) in &self.drops {
            write!(f, " {reason}={n}")?;
        }
        if let Some(s) = &self.serial {
            write!(
                f,
                "\n  serial probe    {} frames in, {} out; malformed: bad_escape={} too_long={} noise={}; lost: unplugged={} busy={} refused={}; outages {}, reopens {}",
                s.frames_in, s.frames_out, s.bad_escape, s.too_long, s.noise, s.lost_unplugged, s.lost_busy, s.refused_out, s.outages, s.reopens
            )?;
            if s.unheard + s.lost_on_link + s.delayed > 0 {
                write!(f, "\n  radio medium    unheard (no link)={} lost_on_link={} delayed={}", s.unheard, s.lost_on_link, s.delayed)?;
            }
        }
        Ok(())
    }
}

/// The drops between two snapshots by reason, as the stats line shows them:
/// `none`, or `broker_down=12 malformed=1` (the reasons of `DropReason::name`).
pub fn drops_since(now: &Snapshot, before: &Snapshot) -> String {
    let mut out = String::new();
    for r in DropReason::ALL {
        let n = now.dropped(r).saturating_sub(before.dropped(r));
        if n > 0 {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(r.name());
            out.push('=');
            out.push_str(&n.to_string());
        }
    }
    if out.is_empty() {
        out.push_str("none");
    }
    out
}

/// Logs one summary line every `every` until stopped.
pub async fn periodic(agent: String, every: Duration, counters: AgentCounters, hist: Vec<Arc<Histograms>>, mut stop: watch::Receiver<bool>) {
    let mut last = Snapshot::of(&counters);
    let mut last_at = Instant::now();
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let now = Snapshot::of(&counters);
        let dt = last_at.elapsed();
        let pps = |a: u64, b: u64| (a.saturating_sub(b)) as f64 / dt.as_secs_f64().max(1e-9);
        let l = merged(hist.iter().map(|h| &h.one_way_us));
        let w = merged(hist.iter().map(|h| &h.read_to_publish_us));
        let b = merged(hist.iter().map(|h| &h.batch_packets));
        tracing::info!(
            agent = %agent,
            tx = %bits_per_s(now.tx_bytes.saturating_sub(last.tx_bytes), dt),
            tx_pps = pps(now.tx_packets, last.tx_packets) as u64,
            rx = %bits_per_s(now.rx_bytes.saturating_sub(last.rx_bytes), dt),
            rx_pps = pps(now.rx_packets, last.rx_packets) as u64,
            drops = %drops_since(&now, &last),
            one_way_p50_us = l.p50_us,
            one_way_p99_us = l.p99_us,
            publish_p99_us = w.p99_us,
            batch_p50_packets = b.p50_us,
            "stats"
        );
        last = now;
        last_at = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stats_line_names_each_reason() {
        let before = Snapshot::default();
        assert_eq!(drops_since(&before, &before), "none");
        let mut now = Snapshot::default();
        now.drops[DropReason::BrokerDown as usize] = 12;
        now.drops[DropReason::WrongLayer as usize] = 3;
        assert_eq!(drops_since(&now, &before), "broker_down=12 wrong_layer=3");
        assert_eq!(drops_since(&now, &now), "none");
    }
}
