//! Live progress of a lab's bring-up: hosts up / total, rate, ETA.
//!
//! On a terminal one line is redrawn in place (at most 5 times a second); elsewhere (a
//! file, a pipe, journald) a log line every few seconds. Nothing at all with `--quiet`,
//! which turns info logging off. The text itself is a pure function of the counts.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// How often a line is logged when stderr is not a terminal.
pub const LOG_EVERY: Duration = Duration::from_secs(3);
const REDRAW_EVERY: Duration = Duration::from_millis(200);

/// `hosts started 120/300 (40.0/s, ETA 4.5 s)`: `done` of `total` after `elapsed`.
pub fn line(what: &str, done: usize, total: usize, elapsed: Duration) -> String {
    let s = elapsed.as_secs_f64();
    if done == 0 || s <= 0.0 {
        return format!("{what} {done}/{total}");
    }
    let rate = done as f64 / s;
    let left = total.saturating_sub(done) as f64 / rate;
    format!("{what} {done}/{total} ({rate:.1}/s, ETA {left:.1} s)")
}

pub struct Progress {
    what: &'static str,
    total: usize,
    started: Instant,
    last: Option<Instant>,
    terminal: bool,
    shown: bool,
}

impl Progress {
    /// Progress of `total` things since `started` (rates count from then).
    pub fn new(what: &'static str, total: usize, started: Instant) -> Progress {
        let shown = tracing::enabled!(tracing::Level::INFO);
        Progress { what, total, started, last: None, terminal: std::io::stderr().is_terminal(), shown }
    }

    /// `done` of the total are through.
    pub fn update(&mut self, done: usize) {
        if !self.shown {
            return;
        }
        let now = Instant::now();
        let every = if self.terminal { REDRAW_EVERY } else { LOG_EVERY };
        if self.last.is_some_and(|t| now.duration_since(t) < every) && done < self.total {
            return;
        }
        self.last = Some(now);
        let text = line(self.what, done, self.total, now.duration_since(self.started));
        if self.terminal {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K{text}");
            let _ = err.flush();
        } else {
            tracing::info!("{text}");
        }
    }

    /// Ends the line in place (terminal), so the next log line starts on its own.
    pub fn finish(&mut self) {
        if self.shown && self.terminal && self.last.is_some() {
            eprintln!();
        }
        self.last = None;
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if self.last.is_some() {
            self.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_and_eta() {
        assert_eq!(line("hosts started", 0, 300, Duration::ZERO), "hosts started 0/300");
        assert_eq!(line("hosts started", 120, 300, Duration::from_secs(3)), "hosts started 120/300 (40.0/s, ETA 4.5 s)");
        assert_eq!(line("links up", 300, 300, Duration::from_secs(10)), "links up 300/300 (30.0/s, ETA 0.0 s)");
        assert_eq!(line("x", 5, 3, Duration::from_secs(1)), "x 5/3 (5.0/s, ETA 0.0 s)");
    }
}
