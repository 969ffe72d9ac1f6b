//! Generated expressions against generated packets, VXLAN inside included, with an oracle
//! (podtrace_tests::fuzzing::filter::check_match).
#![no_main]
use libfuzzer_sys::fuzz_target;
use podtrace_tests::fuzzing::filter::{check_match, MatchInput};

fuzz_target!(|input: MatchInput| check_match(&input));
