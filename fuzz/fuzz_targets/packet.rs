#![no_main]
// Body: tunbus::fuzzing::packet_views (replayed on stable by tests/corpus.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| tunbus::fuzzing::packet_views(data));
