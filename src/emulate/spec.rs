//! A link's emulation, in tc-netem's vocabulary: `delay 20ms 2ms 25% loss 1% duplicate
//! 0.1% reorder 5% rate 100mbit limit 1000 flap 10s 2s`. Pure: parsing and printing.
//!
//! Words, as `tc qdisc … netem` takes them (man tc-netem), plus `flap`:
//! - `delay TIME [JITTER [CORRELATION%]]`: each packet waits TIME ± JITTER (uniform);
//! - `loss [random] P% [CORRELATION%]`, or `loss gemodel P [R [1-H [1-K]]]`: Gilbert–Elliott
//!   (P: good → bad, R: bad → good, 1-H: loss in the bad state, 1-K: loss in the good one);
//! - `duplicate P%`, `reorder P% [CORRELATION%]` (a reordered packet skips the delay);
//! - `rate RATE` (`bit`, `kbit`, `mbit`, `gbit`, or bytes: `bps`, `kbps`, `mbps`, `gbps`);
//! - `limit PACKETS`: most packets held at once (1000 by default, as netem);
//! - `flap UP DOWN`: the link is up for UP, then down for DOWN, from the agent's start.
//!
//! Times take `us`, `ms` or `s` (`1.5ms`); percentages take `%` (`0.5%`). [`Spec`]'s
//! `Display` prints the canonical form, which parses back to the same spec.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Packets held at once when `limit` is not given (netem's default).
pub const DEFAULT_LIMIT: usize = 1000;

/// How packets are lost.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Loss {
    /// Each packet with probability `p` (0..=1); `correlation` ties it to the last draw.
    Random { p: f64, correlation: f64 },
    /// Gilbert–Elliott: `p` good → bad, `r` bad → good, `bad_loss` (1-h) lost in the bad
    /// state, `good_loss` (1-k) lost in the good one.
    GilbertElliott { p: f64, r: f64, bad_loss: f64, good_loss: f64 },
}

/// A whole link emulation. The default is a link that does nothing.
#[derive(Clone, Debug, PartialEq)]
pub struct Spec {
    pub delay: Duration,
    pub jitter: Duration,
    pub delay_correlation: f64,
    pub loss: Option<Loss>,
    pub duplicate: f64,
    pub reorder: f64,
    pub reorder_correlation: f64,
    /// Bits per second.
    pub rate: Option<u64>,
    pub limit: usize,
    /// Up for `.0`, then down for `.1`, repeating.
    pub flap: Option<(Duration, Duration)>,
}

impl Default for Spec {
    fn default() -> Spec {
        Spec {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            delay_correlation: 0.0,
            loss: None,
            duplicate: 0.0,
            reorder: 0.0,
            reorder_correlation: 0.0,
            rate: None,
            limit: DEFAULT_LIMIT,
            flap: None,
        }
    }
}

impl Spec {
    /// Whether packets can be told apart by chance (lost, duplicated, reordered): then a
    /// super-packet is cut into its wire-sized packets first, so each gets its own draw.
    pub fn per_packet(&self) -> bool {
        self.loss.is_some() || self.duplicate > 0.0 || self.reorder > 0.0
    }

    /// A link that drops everything (two lab hosts without a link).
    pub fn unlinked() -> Spec {
        Spec { loss: Some(Loss::Random { p: 1.0, correlation: 0.0 }), ..Spec::default() }
    }
}

/// Why a spec does not parse: the word at fault and what was expected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("emulation {spec:?}: {what} (tc-netem words: delay TIME [JITTER [CORR%]], loss P% | loss gemodel P [R [1-H [1-K]]], duplicate P%, reorder P%, rate RATE, limit N, flap UP DOWN)")]
pub struct SpecError {
    pub spec: String,
    pub what: String,
}

impl FromStr for Spec {
    type Err = SpecError;

    fn from_str(text: &str) -> Result<Spec, SpecError> {
        let err = |what: String| SpecError { spec: text.to_owned(), what };
        let words: Vec<&str> = text.split_whitespace().collect();
        let mut w = Words { words: &words, at: 0 };
        let mut spec = Spec::default();
        while let Some(word) = w.next() {
            match word {
                "delay" => {
                    spec.delay = w.required("delay TIME", TIME, parse_time).map_err(err)?;
                    if let Some(j) = w.optional(parse_time) {
                        spec.jitter = j;
                        spec.delay_correlation = w.optional(parse_percent).unwrap_or(0.0);
                    }
                }
                "loss" => spec.loss = Some(parse_loss(&mut w).map_err(err)?),
                "duplicate" => spec.duplicate = w.required("duplicate PERCENT", PERCENT, parse_percent).map_err(err)?,
                "reorder" => {
                    spec.reorder = w.required("reorder PERCENT", PERCENT, parse_percent).map_err(err)?;
                    spec.reorder_correlation = w.optional(parse_percent).unwrap_or(0.0);
                }
                "rate" => spec.rate = Some(w.required("rate RATE", RATE, parse_rate).map_err(err)?),
                "limit" => {
                    spec.limit =
                        w.required("limit PACKETS", "a number of packets above 0 (1000)", |s| s.parse::<usize>().ok().filter(|n| *n > 0)).map_err(err)?;
                }
                "flap" => {
                    let up = w.required("flap UP DOWN", TIME, parse_time).map_err(err)?;
                    let down = w.required("flap UP DOWN", TIME, parse_time).map_err(err)?;
                    if up.is_zero() {
                        return Err(err("flap: the up time must be more than 0".into()));
                    }
                    spec.flap = Some((up, down));
                }
                other => return Err(err(format!("unknown word {other:?}"))),
            }
        }
        if spec.reorder > 0.0 && spec.delay.is_zero() {
            return Err(err("reorder needs a delay (a reordered packet is one sent without it)".into()));
        }
        Ok(spec)
    }
}

/// The words of a spec and where parsing is.
struct Words<'a> {
    words: &'a [&'a str],
    at: usize,
}

impl<'a> Words<'a> {
    fn next(&mut self) -> Option<&'a str> {
        let w = self.words.get(self.at).copied();
        self.at += 1;
        w
    }

    /// The next word as `parse` reads it, or why not.
    /// The next word, read by `parse`; else says where (`slot`, as `delay TIME`) it
    /// expected `what` and what it found.
    fn required<T>(&mut self, slot: &str, what: &str, parse: impl Fn(&str) -> Option<T>) -> Result<T, String> {
        match self.next() {
            Some(w) => parse(w).ok_or_else(|| format!("{slot}: expected {what}, found {w:?}")),
            None => Err(format!("{slot}: expected {what}, found the end")),
        }
    }

    /// The next word when `parse` reads it (it is consumed only then).
    fn optional<T>(&mut self, parse: impl Fn(&str) -> Option<T>) -> Option<T> {
        let v = parse(self.words.get(self.at)?)?;
        self.at += 1;
        Some(v)
    }
}

/// What a time, a percentage and a rate look like, for the errors.
const TIME: &str = "a time (20ms, 1.5ms, 500us, 2s)";
const PERCENT: &str = "a percentage from 0% to 100% (1%, 0.5%)";
const RATE: &str = "a rate above 0 (100mbit, 1gbit, 64kbit, 10mbps)";

fn parse_loss(w: &mut Words<'_>) -> Result<Loss, String> {
    if w.optional(|s| (s == "gemodel").then_some(())).is_some() {
        let p = w.required("loss gemodel P", PERCENT, parse_percent)?;
        // netem's defaults: R = 1 - P, 1-H = 100 %, 1-K = 0 %.
        let r = w.optional(parse_percent).unwrap_or(1.0 - p);
        let bad_loss = w.optional(parse_percent).unwrap_or(1.0);
        let good_loss = w.optional(parse_percent).unwrap_or(0.0);
        return Ok(Loss::GilbertElliott { p, r, bad_loss, good_loss });
    }
    let _ = w.optional(|s| (s == "random").then_some(()));
    let p = w.required("loss PERCENT", PERCENT, parse_percent)?;
    let correlation = w.optional(parse_percent).unwrap_or(0.0);
    Ok(Loss::Random { p, correlation })
}

/// `20ms`, `1.5ms`, `500us`, `2s`.
pub fn parse_time(s: &str) -> Option<Duration> {
    let (number, scale) = if let Some(n) = s.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else {
        return None;
    };
    let v: f64 = number.parse().ok()?;
    (v.is_finite() && (0.0..=3600.0).contains(&(v * scale))).then(|| Duration::from_secs_f64(v * scale))
}

/// `1%`, `0.5%` → a probability in 0..=1.
pub fn parse_percent(s: &str) -> Option<f64> {
    let v: f64 = s.strip_suffix('%')?.parse().ok()?;
    (v.is_finite() && (0.0..=100.0).contains(&v)).then_some(v / 100.0)
}

/// `100mbit`, `1gbit`, `64kbit`, `8000bit`, or bytes per second: `12mbps` → bits/s.
pub fn parse_rate(s: &str) -> Option<u64> {
    const UNITS: [(&str, f64); 8] = [("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("gbps", 8e9), ("mbps", 8e6), ("kbps", 8e3), ("bit", 1.0), ("bps", 8.0)];
    let (number, scale) = UNITS.iter().find_map(|(unit, scale)| Some((s.strip_suffix(unit)?, *scale)))?;
    let v: f64 = number.parse().ok()?;
    let bits = v * scale;
    (bits.is_finite() && (1.0..=1e12).contains(&bits)).then_some(bits as u64)
}

fn time(d: Duration) -> String {
    let us = d.as_micros();
    if us.is_multiple_of(1_000_000) {
        format!("{}s", us / 1_000_000)
    } else if us.is_multiple_of(1000) {
        format!("{}ms", us / 1000)
    } else {
        format!("{us}us")
    }
}

fn percent(p: f64) -> String {
    format!("{}%", (p * 100.0 * 1e6).round() / 1e6)
}

fn rate(bits: u64) -> String {
    match bits {
        b if b % 1_000_000_000 == 0 => format!("{}gbit", b / 1_000_000_000),
        b if b % 1_000_000 == 0 => format!("{}mbit", b / 1_000_000),
        b if b % 1000 == 0 => format!("{}kbit", b / 1000),
        b => format!("{b}bit"),
    }
}

impl fmt::Display for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut words: Vec<String> = Vec::new();
        if !self.delay.is_zero() || !self.jitter.is_zero() {
            words.push(format!("delay {}", time(self.delay)));
            if !self.jitter.is_zero() {
                words.push(time(self.jitter));
                if self.delay_correlation > 0.0 {
                    words.push(percent(self.delay_correlation));
                }
            }
        }
        match self.loss {
            Some(Loss::Random { p, correlation }) => {
                words.push(format!("loss {}", percent(p)));
                if correlation > 0.0 {
                    words.push(percent(correlation));
                }
            }
            Some(Loss::GilbertElliott { p, r, bad_loss, good_loss }) => {
                words.push(format!("loss gemodel {} {} {} {}", percent(p), percent(r), percent(bad_loss), percent(good_loss)));
            }
            None => {}
        }
        if self.duplicate > 0.0 {
            words.push(format!("duplicate {}", percent(self.duplicate)));
        }
        if self.reorder > 0.0 {
            words.push(format!("reorder {}", percent(self.reorder)));
            if self.reorder_correlation > 0.0 {
                words.push(percent(self.reorder_correlation));
            }
        }
        if let Some(r) = self.rate {
            words.push(format!("rate {}", rate(r)));
        }
        if self.limit != DEFAULT_LIMIT {
            words.push(format!("limit {}", self.limit));
        }
        if let Some((up, down)) = self.flap {
            words.push(format!("flap {} {}", time(up), time(down)));
        }
        if words.is_empty() {
            return f.write_str("delay 0ms");
        }
        f.write_str(&words.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> Spec {
        s.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_issue_examples_parse() {
        let s = spec("delay 20ms 2ms loss 1% rate 100mbit");
        assert_eq!(s.delay, Duration::from_millis(20));
        assert_eq!(s.jitter, Duration::from_millis(2));
        assert_eq!(s.loss, Some(Loss::Random { p: 0.01, correlation: 0.0 }));
        assert_eq!(s.rate, Some(100_000_000));
        let g = spec("delay 50ms loss gemodel 1% 10%");
        assert_eq!(g.loss, Some(Loss::GilbertElliott { p: 0.01, r: 0.1, bad_loss: 1.0, good_loss: 0.0 }));
        assert_eq!(spec("rate 1mbit").rate, Some(1_000_000));
        assert_eq!(spec("delay 0ms"), Spec::default());
    }

    #[test]
    fn every_word() {
        let s = spec("delay 10ms 1ms 25% loss random 2% 50% duplicate 0.5% reorder 5% 10% rate 12mbps limit 50 flap 10s 500ms");
        assert_eq!(s.delay_correlation, 0.25);
        assert_eq!(s.loss, Some(Loss::Random { p: 0.02, correlation: 0.5 }));
        assert_eq!(s.duplicate, 0.005);
        assert_eq!((s.reorder, s.reorder_correlation), (0.05, 0.1));
        assert_eq!(s.rate, Some(96_000_000));
        assert_eq!(s.limit, 50);
        assert_eq!(s.flap, Some((Duration::from_secs(10), Duration::from_millis(500))));
        assert!(s.per_packet());
        assert!(!spec("delay 5ms rate 1gbit").per_packet());
    }

    #[test]
    fn display_parses_back() {
        for text in [
            "delay 20ms 2ms loss 1% rate 100mbit",
            "delay 1500us 250us 10% loss gemodel 1% 10% 70% 0.1% duplicate 1% reorder 5% 50% rate 64kbit limit 10 flap 1s 200ms",
            "rate 1500bit",
            "loss 100%",
            "delay 0ms",
        ] {
            let s = spec(text);
            assert_eq!(spec(&s.to_string()), s, "{text} printed as {s}");
        }
        assert_eq!(spec("delay 20ms 2ms loss 1% rate 100mbit").to_string(), "delay 20ms 2ms loss 1% rate 100mbit");
    }

    #[test]
    fn mistakes_say_which_word() {
        for (text, says) in [
            ("delay", "delay TIME: expected a time (20ms, 1.5ms, 500us, 2s), found the end"),
            ("delay 20", "delay TIME: expected a time (20ms, 1.5ms, 500us, 2s), found \"20\""),
            ("loss 101%", "loss PERCENT: expected a percentage from 0% to 100%"),
            ("loss 1", "found \"1\""),
            ("loss gemodel", "loss gemodel P: expected a percentage"),
            ("rate fast", "rate RATE: expected a rate above 0"),
            ("rate 0bit", "found \"0bit\""),
            ("limit 0", "limit PACKETS: expected a number of packets above 0"),
            ("flap 1s", "flap UP DOWN: expected a time (20ms, 1.5ms, 500us, 2s), found the end"),
            ("flap 0s 1s", "up time"),
            ("jitter 1ms", "unknown word \"jitter\""),
            ("reorder 5%", "needs a delay"),
            ("delay -1ms", "found \"-1ms\""),
            ("delay NaNms", "found \"NaNms\""),
        ] {
            let e = text.parse::<Spec>().expect_err(text).to_string();
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn units() {
        assert_eq!(parse_time("500us"), Some(Duration::from_micros(500)));
        assert_eq!(parse_time("1.5ms"), Some(Duration::from_micros(1500)));
        assert_eq!(parse_time("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_time("2"), None);
        assert_eq!(parse_rate("1gbit"), Some(1_000_000_000));
        assert_eq!(parse_rate("8000bit"), Some(8000));
        assert_eq!(parse_rate("1kbps"), Some(8000));
        assert_eq!(parse_percent("0.1%"), Some(0.001));
    }
}
