#![no_main]
// Body: tunbus::fuzzing::slip (replayed on stable by tests/corpus.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| tunbus::fuzzing::slip(data));
