//! The wire formats: message bodies (the native format v1, the ioppytest JSON form, its
//! serial side in `ioppytest::serial`), the virtio header that precedes each packet, the
//! cutting of a super-packet into the wire-sized packets it stands for (`segment`:
//! capture and emulation), and SLIP, the framing of 802.15.4 serial probes (`slip`).
//!
//! Pure code: bytes in, frames out. No I/O, no clock, no async, no `unsafe`, so it is
//! unit-tested, property-tested and fuzzed (`fuzz/`, replayed by `tests/corpus.rs`) in
//! isolation. The per-queue worker threads call
//! it on the hot path (batch building on TX, frame decoding on RX); `v1` copies no packet
//! bytes and allocates nothing. The byte-level contract is `docs/wire-format.md`.

pub mod ioppytest;
pub mod segment;
pub mod slip;
pub mod v1;
pub mod vnet;
