#![no_main]
// Body: tunbus::fuzzing::vnet_header (replayed on stable by tests/corpus.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| tunbus::fuzzing::vnet_header(data));
