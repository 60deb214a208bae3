#![no_main]
// Body: tunbus::fuzzing::batcher (replayed on stable by tests/corpus.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| tunbus::fuzzing::batcher(data));
