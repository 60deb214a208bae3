#![no_main]
// Body: tunbus::fuzzing::v1_decode (replayed on stable by tests/corpus.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| tunbus::fuzzing::v1_decode(data));
