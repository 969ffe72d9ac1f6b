//! ctnetlink answers (podtrace_tests::fuzzing::conntrack::check).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| podtrace_tests::fuzzing::conntrack::check(data));
