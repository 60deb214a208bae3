#![no_main]
// Body: tunbus::fuzzing::amqp_session (replayed on stable by tests/corpus.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| tunbus::fuzzing::amqp_session(data));
