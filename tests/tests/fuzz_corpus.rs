//! The fuzz targets' committed corpora (`fuzz/corpus/TARGET/`), replayed through the same
//! checks as the fuzzers on stable Rust: every input a fuzzer kept, and every crash it found
//! (saved there as `crash-*`), stays a regression test of the normal suite. The writer's
//! outputs are also read back with tshark, the reader users have. No root needed.
use std::path::{Path, PathBuf};
use std::process::Command;

use podtrace::pcap::CaptureFormat;
use podtrace_tests::fuzzing::{self, writer};

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = fuzzing::corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} is empty", dir.display());
    files
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).unwrap();
            (p, data)
        })
        .collect()
}

fn replay(target: &str) {
    let scratch = writer::scratch_root();
    for (path, data) in corpus(target) {
        eprintln!("{target}: {}", path.display());
        fuzzing::run_target(target, &data, &scratch);
    }
}

#[test]
fn filter_parse_corpus() {
    replay("filter_parse");
}

#[test]
fn filter_match_corpus() {
    replay("filter_match");
}

#[test]
fn packet_corpus() {
    replay("packet");
}

#[test]
fn registry_corpus() {
    replay("registry");
}

#[test]
fn iptables_corpus() {
    replay("iptables");
}

#[test]
fn conntrack_corpus() {
    replay("conntrack");
}

/// The targets xtask runs (fuzz/Cargo.toml's binaries) are the ones the harness knows.
#[test]
fn every_target_has_a_harness_and_seeds() {
    let manifest = std::fs::read_to_string(fuzzing::fuzz_dir().join("Cargo.toml")).unwrap();
    let bins: Vec<&str> = manifest
        .lines()
        .filter_map(|l| l.strip_prefix("name = \""))
        .map(|l| l.trim_end_matches('"'))
        .filter(|n| *n != "podtrace-fuzz")
        .collect();
    assert_eq!(bins, fuzzing::TARGETS);
    for t in fuzzing::TARGETS {
        assert!(!corpus(t).is_empty());
    }
}

/// Removes a writer input's output directory, also when the test fails.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// tshark's packet count of a file; panics unless tshark reads it cleanly.
fn tshark_count(file: &Path) -> u64 {
    let out = Command::new("tshark")
        .args(["-n", "-r"])
        .arg(file)
        .args(["-T", "fields", "-e", "frame.number"])
        .output()
        .expect("running tshark (cargo xtask setup installs it)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let complaint = stderr
        .lines()
        .find(|l| !l.contains("Running as user \"root\""));
    assert!(
        out.status.success() && complaint.is_none(),
        "tshark cannot read {} ({}): {stderr}",
        file.display(),
        out.status
    );
    String::from_utf8_lossy(&out.stdout).lines().count() as u64
}

#[test]
fn writer_corpus_outputs_read_back_with_tshark() {
    let scratch = writer::scratch_root();
    let mut files = 0;
    for (path, data) in corpus("writer") {
        let Some(input) = fuzzing::decode::<writer::WriterInput>(&data) else {
            continue;
        };
        let format = if input.pcapng {
            CaptureFormat::PcapNg
        } else {
            CaptureFormat::Pcap
        };
        let out = writer::check(&input, &scratch);
        let _cleanup = Cleanup(out.dir.clone());
        for f in &out.files {
            let (ours, _) = writer::read_back(f, format);
            assert_eq!(
                tshark_count(f),
                ours,
                "{}: packets in {}",
                path.display(),
                f.display()
            );
            files += 1;
        }
    }
    assert!(files > 0, "the writer corpus produced no capture file");
}
