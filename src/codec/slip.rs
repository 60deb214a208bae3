//! SLIP framing (RFC 1055), as 802.15.4 serial probes speak it: one radio frame per SLIP
//! frame, `END` (0xC0) delimiting frames, `ESC` (0xDB) followed by `ESC_END` (0xDC) or
//! `ESC_ESC` (0xDD) standing for a data byte 0xC0 or 0xDB.
//!
//! Owns the encoder ([`encode`]) and a streaming decoder ([`Decoder`]: bytes in, whole
//! frames out). Pure: no I/O, no clock, no allocation per frame (the decoder's buffer is
//! allocated once, at its maximum). Runs on the thread of the serial port that owns it
//! (a queue worker's), on the hot path of a serial agent.
//!
//! **A leading END is sent.** [`encode`] writes `END, escaped bytes, END`, as RFC 1055
//! advises (the first END flushes whatever line noise the receiver holds) and as the
//! ioppytest stack does: ioppytest-agent's serial consumer (`SerialConsumer.handle_data`, up to 0.2.0)
//! wrote `c0 … c0`, and 0.2.20's listener (`utils/serial_listener.py`) only accepts a frame
//! that *opens* with END: bytes after a closing END that are not END are rubbish to it,
//! so a sender without the leading END loses every frame there.
//!
//! **Decoding** ([`Framing`]): a probe's stream is END-delimited ([`Framing::Delimited`],
//! the default): a frame opens with END and closes with END; the bytes between a closing
//! END and the next END are noise (counted, dropped; that END opens the next frame).
//! [`Framing::Terminated`] is RFC 1055's minimum (only a closing END): bytes after a
//! closing END start the next frame, so noise is only seen before the first END.
//! In both, consecutive ENDs are empty frames (counted, not an error: `END END` is how a
//! sender that also sends a leading END separates frames), the bytes before the first END
//! (attaching in the middle of a frame, at open or after a reset) are noise, and a frame
//! is dropped and counted when an ESC is followed by anything but ESC_END/ESC_ESC
//! ([`Malformed::BadEscape`]; an `ESC END` also closes the broken frame) or when it grows
//! past the decoder's maximum ([`Malformed::TooLong`]); the decoder then skips to the
//! next END, and the next good frame passes.

/// Frame delimiter.
pub const END: u8 = 0xC0;
/// Escape: the next byte is [`ESC_END`] or [`ESC_ESC`].
pub const ESC: u8 = 0xDB;
/// After [`ESC`]: a data byte [`END`].
pub const ESC_END: u8 = 0xDC;
/// After [`ESC`]: a data byte [`ESC`].
pub const ESC_ESC: u8 = 0xDD;

/// The largest IEEE 802.15.4 PSDU (aMaxPhyPacketSize), FCS included.
pub const MAX_PSDU: usize = 127;
/// Default largest frame a [`Decoder`] accepts: a maximal PSDU plus 32 bytes for what a
/// probe may append (RSSI, LQI, a channel, a timestamp), while a runaway stream without
/// END is cut after a few hundred bytes.
pub const DEFAULT_MAX_FRAME: usize = MAX_PSDU + 32;

/// Length of the longest encoding of a `len`-byte frame: every byte escaped, two ENDs.
pub const fn max_encoded_len(len: usize) -> usize {
    len.saturating_mul(2).saturating_add(2)
}

/// Exact length of [`encode`]'s output for `frame`.
pub fn encoded_len(frame: &[u8]) -> usize {
    frame.len() + 2 + frame.iter().filter(|&&b| b == END || b == ESC).count()
}

/// Appends the SLIP encoding of `frame` to `out`: `END`, the bytes with END and ESC
/// escaped, `END`. Reserves at most [`encoded_len`] bytes (nothing when `out` has room).
pub fn encode(frame: &[u8], out: &mut Vec<u8>) {
    out.reserve(encoded_len(frame));
    out.push(END);
    let mut rest = frame;
    while let Some(at) = rest.iter().position(|&b| b == END || b == ESC) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(if rest[at] == END { &[ESC, ESC_END] } else { &[ESC, ESC_ESC] });
        rest = &rest[at + 1..];
    }
    out.extend_from_slice(rest);
    out.push(END);
}

/// How a stream separates frames (see the module header).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Framing {
    /// END before and after every frame (ioppytest's probes and agents, RFC 1055's advice):
    /// bytes between a closing END and the next END are noise.
    #[default]
    Delimited,
    /// Only a closing END (RFC 1055's minimum): bytes after a closing END start a frame.
    Terminated,
}

/// Why input was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Malformed {
    /// An ESC followed by a byte other than ESC_END or ESC_ESC.
    BadEscape,
    /// A frame longer than the decoder's maximum.
    TooLong,
    /// Bytes outside any frame (before the first END; with [`Framing::Delimited`] also
    /// between a closing END and the next END). Counted once per stretch.
    Noise,
}

/// What a [`Decoder`] has seen since it was made (totals; [`Decoder::reset`] keeps them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DecodeStats {
    /// Whole frames handed out.
    pub frames: u64,
    /// Empty frames (END END): not an error.
    pub empty: u64,
    /// Frames dropped for [`Malformed::BadEscape`].
    pub bad_escape: u64,
    /// Frames dropped for [`Malformed::TooLong`].
    pub too_long: u64,
    /// Stretches of [`Malformed::Noise`].
    pub noise: u64,
}

impl DecodeStats {
    /// Everything dropped as malformed (empty frames are not).
    pub fn malformed(&self) -> u64 {
        self.bad_escape + self.too_long + self.noise
    }

    fn count(&mut self, why: Malformed) {
        match why {
            Malformed::BadEscape => self.bad_escape += 1,
            Malformed::TooLong => self.too_long += 1,
            Malformed::Noise => self.noise += 1,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Not synchronised (new, reset): bytes up to the first END are noise; that END opens
    /// a frame.
    Hunt,
    /// After a closing END ([`Framing::Delimited`] only): END opens a frame, anything else
    /// is noise.
    Idle,
    /// Inside a frame (its bytes so far in `buf`, possibly none).
    Frame,
    /// Inside a frame, after an ESC.
    Escape,
    /// Skipping to the next END: a dropped frame, or noise.
    Skip(Malformed),
}

/// A streaming SLIP decoder: feed it bytes in any pieces, get whole frames back.
#[derive(Clone, Debug)]
pub struct Decoder {
    framing: Framing,
    max_frame: usize,
    buf: Vec<u8>,
    /// `buf` holds a frame handed out by the last call: clear it first.
    handed_out: bool,
    state: State,
    stats: DecodeStats,
}

impl Decoder {
    /// A decoder for frames of at most `max_frame` bytes (at least 1), not yet
    /// synchronised. Allocates its frame buffer here, once.
    pub fn new(framing: Framing, max_frame: usize) -> Decoder {
        let max_frame = max_frame.max(1);
        Decoder { framing, max_frame, buf: Vec::with_capacity(max_frame), handed_out: false, state: State::Hunt, stats: DecodeStats::default() }
    }

    /// The largest frame this decoder hands out.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// How it separates frames.
    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// Totals so far.
    pub fn stats(&self) -> DecodeStats {
        self.stats
    }

    /// Forgets a partial frame and waits for the next END (a device reopened: its first
    /// bytes may be the middle of a frame). Keeps the totals.
    pub fn reset(&mut self) {
        self.buf.clear();
        self.handed_out = false;
        self.state = State::Hunt;
    }

    /// Where a closing END leaves the decoder.
    fn after_close(&self) -> State {
        match self.framing {
            Framing::Delimited => State::Idle,
            Framing::Terminated => State::Frame,
        }
    }

    fn drop_frame(&mut self, why: Malformed) {
        self.stats.count(why);
        self.buf.clear();
        self.state = State::Skip(why);
    }

    /// Appends a data byte to the frame, or drops the frame when it is full.
    fn push(&mut self, b: u8) {
        if self.buf.len() < self.max_frame {
            self.buf.push(b);
            self.state = State::Frame;
        } else {
            self.drop_frame(Malformed::TooLong);
        }
    }

    /// Consumes bytes of `input` until a frame is complete or the input is used up.
    /// Returns how many bytes were consumed and the frame, if one completed (valid until
    /// the next call; never empty, never longer than the maximum). Call again with the
    /// rest of the input.
    pub fn decode<'d>(&'d mut self, input: &[u8]) -> (usize, Option<&'d [u8]>) {
        if self.handed_out {
            self.buf.clear();
            self.handed_out = false;
        }
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            i += 1;
            match self.state {
                State::Hunt | State::Idle if b == END => self.state = State::Frame,
                State::Hunt | State::Idle => {
                    self.stats.count(Malformed::Noise);
                    self.state = State::Skip(Malformed::Noise);
                }
                State::Skip(Malformed::Noise) if b == END => self.state = State::Frame,
                State::Skip(_) if b == END => self.state = self.after_close(),
                State::Skip(_) => {
                    // Skip the whole stretch up to the next END at once.
                    i = input[i..].iter().position(|&c| c == END).map_or(input.len(), |at| i + at);
                }
                State::Frame if b == END => {
                    if self.buf.is_empty() {
                        self.stats.empty += 1;
                        continue;
                    }
                    self.stats.frames += 1;
                    self.handed_out = true;
                    self.state = self.after_close();
                    return (i, Some(&self.buf));
                }
                State::Frame if b == ESC => self.state = State::Escape,
                State::Frame => {
                    // Copy the run of plain bytes that follows in one go.
                    let run = input[i..].iter().position(|&c| c == END || c == ESC).unwrap_or(input.len() - i);
                    let room = self.max_frame - self.buf.len();
                    if run < room {
                        self.buf.push(b);
                        self.buf.extend_from_slice(&input[i..i + run]);
                        i += run;
                    } else {
                        self.drop_frame(Malformed::TooLong);
                    }
                }
                State::Escape => match b {
                    ESC_END => self.push(END),
                    ESC_ESC => self.push(ESC),
                    END => {
                        // The frame is broken, and this END closes it.
                        self.stats.count(Malformed::BadEscape);
                        self.buf.clear();
                        self.state = self.after_close();
                    }
                    _ => self.drop_frame(Malformed::BadEscape),
                },
            }
        }
        (i, None)
    }

    /// Decodes all of `input`, calling `f` with each complete frame.
    pub fn decode_all(&mut self, mut input: &[u8], mut f: impl FnMut(&[u8])) {
        while !input.is_empty() {
            let (used, frame) = self.decode(input);
            if let Some(frame) = frame {
                f(frame);
            }
            input = &input[used..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzzing::{slip_reference, SlipReference};
    use proptest::prelude::*;

    fn encoded(frame: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(frame, &mut out);
        out
    }

    fn decode_whole(framing: Framing, max: usize, input: &[u8]) -> (Vec<Vec<u8>>, DecodeStats) {
        let mut d = Decoder::new(framing, max);
        let mut frames = Vec::new();
        d.decode_all(input, |f| frames.push(f.to_vec()));
        (frames, d.stats())
    }

    /// Every way of cutting `input` into two pieces gives the same frames and totals as
    /// decoding it whole.
    fn same_in_two_pieces(framing: Framing, max: usize, input: &[u8]) {
        let whole = decode_whole(framing, max, input);
        for cut in 0..=input.len() {
            let mut d = Decoder::new(framing, max);
            let mut frames = Vec::new();
            d.decode_all(&input[..cut], |f| frames.push(f.to_vec()));
            d.decode_all(&input[cut..], |f| frames.push(f.to_vec()));
            assert_eq!((frames, d.stats()), whole, "cut at {cut} of {input:02x?}");
        }
    }

    #[test]
    fn encoding_escapes_end_and_esc_and_sends_a_leading_end() {
        assert_eq!(encoded(&[]), [END, END]);
        assert_eq!(encoded(&[1, 2, 3]), [END, 1, 2, 3, END]);
        assert_eq!(encoded(&[END]), [END, ESC, ESC_END, END]);
        assert_eq!(encoded(&[ESC]), [END, ESC, ESC_ESC, END]);
        assert_eq!(encoded(&[ESC_END, ESC_ESC]), [END, ESC_END, ESC_ESC, END], "the escape codes alone are data");
        assert_eq!(encoded(&[END, ESC, 7, END]), [END, ESC, ESC_END, ESC, ESC_ESC, 7, ESC, ESC_END, END]);
        let mut out = vec![9];
        encode(&[END], &mut out);
        assert_eq!(out, [9, END, ESC, ESC_END, END], "appends");
    }

    #[test]
    fn every_byte_value_alone_and_every_two_byte_frame_round_trips() {
        for framing in [Framing::Delimited, Framing::Terminated] {
            let mut d = Decoder::new(framing, MAX_PSDU);
            let mut input = Vec::new();
            let mut want = Vec::new();
            for a in 0..=255u8 {
                want.push(vec![a]);
                encode(&[a], &mut input);
                for b in 0..=255u8 {
                    want.push(vec![a, b]);
                    encode(&[a, b], &mut input);
                }
            }
            let mut got = Vec::new();
            d.decode_all(&input, |f| got.push(f.to_vec()));
            assert_eq!(got, want);
            assert_eq!((d.stats().frames, d.stats().malformed()), (want.len() as u64, 0));
            // The encoder's leading END reads as an empty frame when frames need none.
            let empty = if framing == Framing::Terminated { want.len() as u64 - 1 } else { 0 };
            assert_eq!(d.stats().empty, empty, "{framing:?}");
        }
    }

    #[test]
    fn every_byte_after_an_escape() {
        for b in 0..=255u8 {
            let input = [END, 1, ESC, b, 2, END, END, 3, END];
            let (frames, stats) = decode_whole(Framing::Delimited, 16, &input);
            match b {
                ESC_END => assert_eq!(frames, [vec![1, END, 2], vec![3]]),
                ESC_ESC => assert_eq!(frames, [vec![1, ESC, 2], vec![3]]),
                _ => {
                    assert_eq!(frames, [vec![3]], "ESC {b:#04x}: the frame is dropped, the next passes");
                    assert_eq!(stats.bad_escape, 1);
                }
            }
            // `ESC END` closes the broken frame there: the 2 after it is noise.
            let noise = u64::from(b == END);
            assert_eq!((stats.noise, stats.too_long), (noise, 0), "ESC {b:#04x}");
        }
    }

    #[test]
    fn escape_then_end_closes_the_broken_frame() {
        let (frames, stats) = decode_whole(Framing::Delimited, 16, &[END, 1, ESC, END, END, 2, END]);
        assert_eq!(frames, [vec![2]]);
        assert_eq!(stats, DecodeStats { frames: 1, bad_escape: 1, ..DecodeStats::default() });
    }

    #[test]
    fn empty_frames_are_counted_not_errors() {
        let (frames, stats) = decode_whole(Framing::Delimited, 16, &[END, END, END, 1, END, END, END, 2, END]);
        assert_eq!(frames, [vec![1], vec![2]]);
        assert_eq!(stats, DecodeStats { frames: 2, empty: 3, ..DecodeStats::default() });
    }

    #[test]
    fn noise_before_the_first_end_and_between_frames() {
        // Attaching in the middle of a frame, then noise between two frames.
        let input = [7, 8, ESC, END, 1, END, 0x55, 0xaa, END, 2, END];
        let (frames, stats) = decode_whole(Framing::Delimited, 16, &input);
        assert_eq!(frames, [vec![1], vec![2]]);
        assert_eq!(stats, DecodeStats { frames: 2, noise: 2, ..DecodeStats::default() });
        // RFC 1055's minimal framing has no "between": the same bytes are a frame.
        let (frames, stats) = decode_whole(Framing::Terminated, 16, &input);
        assert_eq!(frames, [vec![1], vec![0x55, 0xaa], vec![2]]);
        assert_eq!(stats, DecodeStats { frames: 3, noise: 1, ..DecodeStats::default() });
    }

    #[test]
    fn terminated_framing_takes_frames_without_a_leading_end() {
        let input = [END, 1, 2, END, 3, ESC, ESC_END, END, 4, END];
        let (frames, _) = decode_whole(Framing::Terminated, 16, &input);
        assert_eq!(frames, [vec![1, 2], vec![3, END], vec![4]]);
        // The delimited reading keeps every frame that opens with END.
        let (frames, stats) = decode_whole(Framing::Delimited, 16, &input);
        assert_eq!(frames, [vec![1, 2], vec![4]]);
        assert_eq!(stats.noise, 1);
    }

    #[test]
    fn the_maximum_passes_one_more_byte_is_dropped() {
        for max in [1, 2, MAX_PSDU, DEFAULT_MAX_FRAME] {
            let full: Vec<u8> = (0..max).map(|i| i as u8).collect();
            let mut over = full.clone();
            over.push(END); // escaped: the byte over the limit arrives after an ESC
            let mut over2 = full.clone();
            over2.push(1);
            let mut input = encoded(&over);
            encode(&over2, &mut input);
            encode(&full, &mut input);
            let (frames, stats) = decode_whole(Framing::Delimited, max, &input);
            assert_eq!(frames, [full], "max {max}");
            assert_eq!(stats, DecodeStats { frames: 1, too_long: 2, ..DecodeStats::default() }, "max {max}");
        }
    }

    #[test]
    fn a_runaway_stream_without_end_is_one_drop() {
        let mut input = vec![END];
        input.extend(std::iter::repeat_n(0x11, 10_000));
        input.extend_from_slice(&[END, END, 5, END]);
        let (frames, stats) = decode_whole(Framing::Delimited, DEFAULT_MAX_FRAME, &input);
        assert_eq!(frames, [vec![5]]);
        assert_eq!(stats, DecodeStats { frames: 1, too_long: 1, ..DecodeStats::default() });
    }

    #[test]
    fn reset_drops_a_partial_frame_and_resynchronises() {
        let mut d = Decoder::new(Framing::Delimited, 16);
        assert_eq!(d.decode(&[END, 1, 2]), (3, None));
        d.reset();
        let mut frames = Vec::new();
        d.decode_all(&[3, END, 4, END, END, 5, END], |f| frames.push(f.to_vec()));
        assert_eq!(frames, [vec![4], vec![5]], "after a reset the first END opens, as at start");
        assert_eq!(d.stats().noise, 1);
    }

    #[test]
    fn decode_stops_after_each_frame() {
        let mut d = Decoder::new(Framing::Delimited, 16);
        let input = [END, 1, END, END, 2, END];
        let (used, frame) = d.decode(&input);
        assert_eq!((used, frame), (3, Some(&[1u8][..])));
        let (used2, frame) = d.decode(&input[used..]);
        assert_eq!((used2, frame), (3, Some(&[2u8][..])));
        assert_eq!(d.decode(&[]), (0, None));
    }

    /// Every input of up to 6 bytes over the bytes that matter agrees with the reference
    /// decoder (written independently, `fuzzing::slip_reference`), whole and in two pieces.
    #[test]
    fn exhaustive_small_inputs_agree_with_the_reference() {
        const ALPHABET: [u8; 5] = [END, ESC, ESC_END, ESC_ESC, 0x42];
        let mut n = 0;
        for len in 0..=6u32 {
            for code in 0..ALPHABET.len().pow(len) {
                let mut c = code;
                let input: Vec<u8> = (0..len)
                    .map(|_| {
                        let b = ALPHABET[c % ALPHABET.len()];
                        c /= ALPHABET.len();
                        b
                    })
                    .collect();
                for framing in [Framing::Delimited, Framing::Terminated] {
                    for max in [1, 2, 3] {
                        let SlipReference { frames, stats } = slip_reference(framing, max, &input);
                        assert_eq!(decode_whole(framing, max, &input), (frames, stats), "{framing:?} max {max} {input:02x?}");
                        same_in_two_pieces(framing, max, &input);
                        n += 1;
                    }
                }
            }
        }
        assert!(n > 100_000);
    }

    fn frame_strategy(max: usize) -> impl Strategy<Value = Vec<u8>> {
        // Bias towards the bytes that matter.
        let byte = prop_oneof![Just(END), Just(ESC), Just(ESC_END), Just(ESC_ESC), any::<u8>()];
        proptest::collection::vec(byte, 1..=max)
    }

    proptest! {
        #[test]
        fn prop_roundtrip(frame in frame_strategy(DEFAULT_MAX_FRAME), terminated in any::<bool>()) {
            let framing = if terminated { Framing::Terminated } else { Framing::Delimited };
            let input = encoded(&frame);
            prop_assert_eq!(input.len(), encoded_len(&frame));
            prop_assert!(input.len() <= max_encoded_len(frame.len()));
            let (frames, stats) = decode_whole(framing, DEFAULT_MAX_FRAME, &input);
            prop_assert_eq!(frames, vec![frame]);
            prop_assert_eq!(stats, DecodeStats { frames: 1, ..DecodeStats::default() });
        }

        #[test]
        fn prop_streams_of_frames_in_any_pieces(
            frames in proptest::collection::vec(frame_strategy(MAX_PSDU), 0..20),
            cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..8),
            terminated in any::<bool>(),
        ) {
            let framing = if terminated { Framing::Terminated } else { Framing::Delimited };
            let mut input = Vec::new();
            for f in &frames {
                encode(f, &mut input);
            }
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(input.len() + 1)).collect();
            cuts.push(input.len());
            cuts.sort_unstable();
            let mut d = Decoder::new(framing, MAX_PSDU);
            let mut got = Vec::new();
            let mut at = 0;
            for cut in cuts {
                d.decode_all(&input[at..cut], |f| got.push(f.to_vec()));
                at = cut;
            }
            prop_assert_eq!(got, frames);
            prop_assert_eq!(d.stats().malformed(), 0);
        }

        /// Garbage of each kind between good frames costs the garbage only.
        #[test]
        fn prop_the_next_good_frame_passes(
            frames in proptest::collection::vec(frame_strategy(MAX_PSDU), 1..10),
            kinds in proptest::collection::vec(0u8..3, 1..10),
            noise in proptest::collection::vec(any::<u8>().prop_filter("not END", |b| *b != END), 1..40),
        ) {
            let mut input = Vec::new();
            let mut want = Vec::new();
            let mut drops = DecodeStats::default();
            for (f, kind) in frames.iter().zip(kinds.iter().cycle()) {
                match kind {
                    0 => {
                        input.push(END);
                        input.extend_from_slice(&[1, ESC, 0x42, 2]);
                        input.push(END);
                        drops.bad_escape += 1;
                    }
                    1 => {
                        input.push(END);
                        input.extend(std::iter::repeat_n(0x33, MAX_PSDU + 1));
                        input.push(END);
                        drops.too_long += 1;
                    }
                    _ => {
                        input.extend_from_slice(&noise);
                        drops.noise += 1;
                    }
                }
                encode(f, &mut input);
                want.push(f.clone());
            }
            // In delimited framing, noise right before a frame's opening END is one stretch;
            // the opening END then opens the frame.
            let (got, stats) = decode_whole(Framing::Delimited, MAX_PSDU, &input);
            prop_assert_eq!(got, want);
            prop_assert_eq!((stats.bad_escape, stats.too_long, stats.noise), (drops.bad_escape, drops.too_long, drops.noise));
        }

        #[test]
        fn prop_any_bytes_agree_with_the_reference(
            input in proptest::collection::vec(prop_oneof![Just(END), Just(ESC), Just(ESC_END), Just(ESC_ESC), any::<u8>()], 0..300),
            max in 1usize..40,
            terminated in any::<bool>(),
            cut in any::<proptest::sample::Index>(),
        ) {
            let framing = if terminated { Framing::Terminated } else { Framing::Delimited };
            let SlipReference { frames, stats } = slip_reference(framing, max, &input);
            let whole = decode_whole(framing, max, &input);
            prop_assert!(whole.0.iter().all(|f| !f.is_empty() && f.len() <= max));
            prop_assert_eq!(&whole, &(frames, stats));
            let cut = cut.index(input.len() + 1);
            let mut d = Decoder::new(framing, max);
            let mut got = Vec::new();
            d.decode_all(&input[..cut], |f| got.push(f.to_vec()));
            d.decode_all(&input[cut..], |f| got.push(f.to_vec()));
            prop_assert_eq!((got, d.stats()), whole);
        }

        #[test]
        fn prop_never_panics(input in proptest::collection::vec(any::<u8>(), 0..1024), max in 0usize..300) {
            let mut d = Decoder::new(Framing::Delimited, max);
            let mut n = 0u64;
            d.decode_all(&input, |f| {
                assert!(!f.is_empty() && f.len() <= max.max(1));
                n += 1;
            });
            prop_assert_eq!(d.stats().frames, n);
        }
    }
}
