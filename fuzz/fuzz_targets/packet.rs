//! Frame bytes, raw or built, to a packet summary (podtrace_tests::fuzzing::packet::check).
#![no_main]
use libfuzzer_sys::fuzz_target;
use podtrace_tests::fuzzing::packet::{check, PacketInput};

fuzz_target!(|input: PacketInput| check(&input));
