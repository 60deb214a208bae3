#![no_main]
// Body: tunbus::fuzzing::topology (replayed on stable by tests/corpus.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| tunbus::fuzzing::topology(data));
