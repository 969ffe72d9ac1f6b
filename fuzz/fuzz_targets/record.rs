//! Ring-buffer records into the engine's decoder (podtrace_tests::fuzzing::record::check).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| podtrace_tests::fuzzing::record::check(data));
