#![no_main]
// Body: tunbus::fuzzing::ioppytest_json (replayed on stable by tests/corpus.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| tunbus::fuzzing::ioppytest_json(data));
