//! The agent's protocol messages and payloads (podtrace_tests::fuzzing::agent::check).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| podtrace_tests::fuzzing::agent::check(data));
