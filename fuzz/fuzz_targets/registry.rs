//! The lab registry file (podtrace_tests::fuzzing::registry::check).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| podtrace_tests::fuzzing::registry::check(data));
