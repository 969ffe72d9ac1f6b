//! `cargo xtask fuzz [--seconds N] [TARGET]`: the cargo-fuzz targets in `fuzz/` (libFuzzer,
//! the nightly toolchain), and the short run of each that `cargo xtask test` makes.
//!
//! The targets are the `[[bin]]`s of `fuzz/Cargo.toml`; their checks live in
//! `tests/src/fuzzing/`. Seeds are `fuzz/corpus/TARGET/` (committed, small). A run writes
//! what it finds to a working corpus, never to the committed one: `target/fuzz-corpus/TARGET/`
//! (kept between `cargo xtask fuzz` runs) or a fresh directory (`cargo xtask test`). A crash
//! is saved by libFuzzer in `fuzz/artifacts/TARGET/` (ignored by git).
//!
//! No sanitizer: the code under test is safe Rust, which ASan would slow down for nothing;
//! debug assertions and overflow checks are on (`-a`), so an arithmetic overflow is a crash.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::root;

/// Seconds per target in `cargo xtask test`.
pub const SMOKE_SECONDS: u64 = 15;

#[derive(clap::Args)]
pub struct FuzzArgs {
    /// How long to fuzz each target (default: until stopped with Ctrl-C, or a crash).
    #[arg(long, value_name = "N")]
    seconds: Option<u64>,
    /// One target (default: all of them, one after the other).
    #[arg(value_name = "TARGET")]
    target: Option<String>,
}

/// The targets: the binaries of fuzz/Cargo.toml, in their order there.
pub fn targets() -> Result<Vec<String>> {
    let manifest = root().join("fuzz/Cargo.toml");
    let text = std::fs::read_to_string(&manifest)
        .with_context(|| format!("reading {}", manifest.display()))?;
    let mut out = Vec::new();
    let mut in_bin = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        } else if let (true, Some(v)) = (in_bin, line.strip_prefix("name")) {
            let name = v
                .trim_start()
                .trim_start_matches('=')
                .trim()
                .trim_matches('"');
            out.push(name.to_string());
        }
    }
    if out.is_empty() {
        bail!("{} declares no fuzz target", manifest.display());
    }
    Ok(out)
}

pub fn run(args: FuzzArgs) -> Result<()> {
    crate::setup::cargo_fuzz()?;
    let all = targets()?;
    let chosen = match &args.target {
        Some(t) if all.contains(t) => vec![t.clone()],
        Some(t) => bail!("no fuzz target {t:?}; the targets are {}", all.join(", ")),
        None => all,
    };
    build()?;
    for t in &chosen {
        let work = root().join("target/fuzz-corpus").join(t);
        std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
        fuzz_one(t, &work, args.seconds)?;
    }
    Ok(())
}

/// Every target for [`SMOKE_SECONDS`], from the committed seeds, into a throwaway corpus.
pub fn smoke() -> Result<()> {
    crate::setup::cargo_fuzz()?;
    build()?;
    let targets = targets()?;
    let scratch = root().join("target/fuzz-smoke");
    let _ = std::fs::remove_dir_all(&scratch);
    for t in &targets {
        let work = scratch.join(t);
        std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
        fuzz_one(t, &work, Some(SMOKE_SECONDS))?;
    }
    let _ = std::fs::remove_dir_all(&scratch);
    eprintln!(
        "xtask: fuzzed {} targets for {SMOKE_SECONDS} s each: no crash",
        targets.len()
    );
    Ok(())
}

/// `cargo +nightly fuzz` with the environment the targets need: podtrace's build script
/// skips the eBPF object (the targets never load it, and the fuzz flags must not reach
/// the BPF build).
fn cargo_fuzz() -> Command {
    let mut c = Command::new("cargo");
    c.args(["+nightly", "fuzz"])
        .current_dir(root())
        .env("PODTRACE_SKIP_EBPF", "1");
    c
}

const FLAGS: &[&str] = &["--sanitizer", "none", "--debug-assertions"];

fn build() -> Result<()> {
    let mut c = cargo_fuzz();
    c.arg("build").args(FLAGS);
    eprintln!("xtask: $ cargo +nightly fuzz build {}", FLAGS.join(" "));
    let status = c.status().context("running cargo fuzz")?;
    if !status.success() {
        bail!("building the fuzz targets failed ({status})");
    }
    Ok(())
}

fn fuzz_one(target: &str, work: &Path, seconds: Option<u64>) -> Result<()> {
    let seeds = root().join("fuzz/corpus").join(target);
    let mut c = cargo_fuzz();
    c.args(["run", target]).args(FLAGS).arg(work).arg(&seeds);
    c.arg("--");
    if let Some(s) = seconds {
        c.arg(format!("-max_total_time={s}"));
    }
    let dict = root().join("fuzz/dict").join(format!("{target}.dict"));
    if dict.exists() {
        c.arg(format!("-dict={}", dict.display()));
    }
    // One slow input (10 s) or a runaway allocation is a finding too.
    c.args(["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1"]);
    eprintln!(
        "xtask: fuzzing {target}{} (seeds {}, corpus {})",
        seconds.map(|s| format!(" for {s} s")).unwrap_or_default(),
        rel(&seeds).display(),
        rel(work).display()
    );
    let status = c.status().context("running cargo fuzz")?;
    if !status.success() {
        bail!(
            "fuzz target {target} failed ({status}): the input is in fuzz/artifacts/{target}/. \
             Reproduce with `cargo +nightly fuzz run {target} -s none -a fuzz/artifacts/{target}/FILE`; \
             once fixed, add the input to fuzz/corpus/{target}/ (the normal suite replays it) and a \
             named regression test beside the code"
        );
    }
    Ok(())
}

fn rel(p: &Path) -> PathBuf {
    p.strip_prefix(root())
        .map(Path::to_path_buf)
        .unwrap_or_else(|_| p.to_path_buf())
}
