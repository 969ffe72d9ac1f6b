//! The pcap/pcapng writer fed arbitrary packets, lengths, hops and rotation; every file it
//! leaves must read back (podtrace_tests::fuzzing::writer::check).
#![no_main]
use libfuzzer_sys::fuzz_target;
use podtrace_tests::fuzzing::writer::{check, scratch_root, WriterInput};

fuzz_target!(|input: WriterInput| {
    let out = check(&input, &scratch_root());
    let _ = std::fs::remove_dir_all(&out.dir);
});
