//! The fuzz targets' harness: the structured inputs (built from fuzz bytes with `arbitrary`)
//! and the checks each target makes. The targets in `fuzz/fuzz_targets/` are one line each
//! around these functions, and `tests/tests/fuzz_corpus.rs` replays the committed corpora
//! (`fuzz/corpus/TARGET/`) through the same functions on stable Rust, so every input the
//! fuzzers ever kept, crashes included, stays a regression test of the normal suite.
//!
//! | target | function | what |
//! |---|---|---|
//! | `filter_parse` | [`filter::check_text`] | any text as a capture filter expression |
//! | `filter_match` | [`filter::check_match`] | generated expressions against generated packets, with an oracle |
//! | `packet` | [`packet::check`] | frame bytes (raw, or built: VLAN, IPv4, TCP/UDP, VXLAN inside) to a summary |
//! | `writer` | [`writer::check`] | the pcap/pcapng writer fed arbitrary packets, lengths, hops and rotation |
//! | `registry` | [`registry::check`] | the lab registry file |
//! | `iptables` | [`iptables::check`] | `iptables-save` output, read for kube-proxy's Services |
//! | `conntrack` | [`conntrack::check`] | ctnetlink answers (netlink messages, conntrack attributes) |
//! | `record` | [`record::check`] | ring-buffer records, as the kernel hands them to the engine |
//! | `agent` | [`agent::check`] | the agent's protocol: its messages and their payloads |
//!
//! Every check panics on a violated property, as a fuzz target must.

pub mod agent;
pub mod conntrack;
pub mod filter;
pub mod iptables;
pub mod packet;
pub mod record;
pub mod registry;
pub mod writer;

use std::path::{Path, PathBuf};

use arbitrary::{Arbitrary, Unstructured};

/// The fuzz targets, in the order `cargo xtask fuzz` runs them.
pub const TARGETS: &[&str] = &[
    "filter_parse",
    "filter_match",
    "packet",
    "writer",
    "registry",
    "iptables",
    "conntrack",
    "record",
    "agent",
];

/// Decodes fuzz bytes into a structured input exactly as libfuzzer-sys does for
/// `fuzz_target!(|input: T| ...)`: `None` where the target would skip the input.
pub fn decode<'a, T: Arbitrary<'a>>(data: &'a [u8]) -> Option<T> {
    T::arbitrary_take_rest(Unstructured::new(data)).ok()
}

/// Runs the check of `target` on one input (raw fuzz bytes), as its fuzz target does.
/// Writer outputs go to a fresh directory under `scratch`; their paths are returned (empty
/// for the other targets).
pub fn run_target(target: &str, data: &[u8], scratch: &Path) -> Vec<PathBuf> {
    match target {
        "filter_parse" => filter::check_text(data),
        "filter_match" => {
            if let Some(input) = decode(data) {
                filter::check_match(&input);
            }
        }
        "packet" => {
            if let Some(input) = decode(data) {
                packet::check(&input);
            }
        }
        "writer" => {
            if let Some(input) = decode::<writer::WriterInput>(data) {
                return writer::check(&input, scratch).files;
            }
        }
        "registry" => registry::check(data),
        "iptables" => iptables::check(data),
        "conntrack" => conntrack::check(data),
        "record" => record::check(data),
        "agent" => agent::check(data),
        other => panic!("no fuzz target {other:?}; targets: {TARGETS:?}"),
    }
    Vec::new()
}

/// The repository's `fuzz/` directory.
pub fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The committed seed corpus of a target: `fuzz/corpus/TARGET/` in the repository.
pub fn corpus_dir(target: &str) -> PathBuf {
    fuzz_dir().join("corpus").join(target)
}
