//! `iptables-save` output read for Services (podtrace_tests::fuzzing::iptables::check).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| podtrace_tests::fuzzing::iptables::check(data));
