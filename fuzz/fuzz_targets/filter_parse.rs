//! Any text as a capture filter expression (podtrace_tests::fuzzing::filter::check_text).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| podtrace_tests::fuzzing::filter::check_text(data));
