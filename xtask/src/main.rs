//! `cargo xtask`: the project's tasks.
//!
//! - `setup`: install what a fresh Debian 12 machine lacks to build and test podtrace
//!   (idempotent; a no-op in seconds when everything is there).
//! - `test`: setup, then rustfmt, clippy (-D warnings), and every test, the privileged ones
//!   included (run as root); each fuzz target for a short fixed time; the kernel matrix
//!   (`vmtest`).
//! - `fuzz [--seconds N] [TARGET]`: the cargo-fuzz targets in `fuzz/` (see `fuzz.rs`).
//! - `demo`: setup, build, then run the demo.
//! - `bench`: setup, release build, then the benchmark on its own lab (attach latency,
//!   data-path overhead, lossless capture rate, memory; against tcpdump). Not part of `test`.
//! - `vmtest`: the static podtrace on Debian's 5.10, 6.1 and 6.12 kernels under QEMU (see
//!   `vmtest/mod.rs`); part of `test`.
//! - `k8s up|down`: a real two-node Kubernetes cluster inside a lab (src/k8s/README.md).
//! - `image`: podtrace's OCI image (the static binary), for containerd to import.
use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

mod bench;
mod build;
mod fuzz;
mod image;
mod k8s;
mod setup;
mod vmtest;

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the Debian packages, nightly rust-src and bpf-linker the build and tests need.
    Setup,
    /// Set up, then check formatting and lints, run every test (needs root) and, unless a
    /// test filter is given, the kernel matrix (vmtest).
    Test {
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, build, and run the demo (needs root).
    Demo,
    /// Run the cargo-fuzz targets in fuzz/ (nightly, libFuzzer), each for --seconds N or
    /// until stopped; new inputs go to target/fuzz-corpus/, crashes to fuzz/artifacts/.
    Fuzz(fuzz::FuzzArgs),
    /// Set up, build (release), and benchmark podtrace against tcpdump on a lab (needs root);
    /// writes bench/results/latest.json and latest.md.
    Bench(bench::BenchArgs),
    /// Build the static podtrace and run it on Debian's 5.10, 6.1 and 6.12 cloud kernels
    /// under QEMU: lab, topo, follow (both hook mechanisms), capture, verify eni, clsact.
    Vmtest(vmtest::VmtestArgs),
    /// A real two-node Kubernetes 1.20 cluster inside a lab (needs root and `setup`):
    /// `k8s up` (last line: `export KUBECONFIG=PATH`), `k8s down`.
    K8s(k8s::K8sArgs),
    /// Build podtrace's OCI image (static binary, no Docker): target/image/podtrace.tar.
    Image,
}

fn main() -> ExitCode {
    // In a vmtest guest this binary is /init.
    vmtest::guest_if_pid1();
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::run(),
        Task::Test { args } => test(&args),
        Task::Demo => demo(),
        Task::Fuzz(args) => fuzz::run(args),
        Task::Bench(args) => bench::run(args),
        Task::Vmtest(args) => setup::run().and_then(|()| vmtest::run(args)),
        Task::K8s(args) => k8s::run(args),
        Task::Image => image::run(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (xtask/..).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs a command in the workspace root, streaming its output; fails unless it succeeds.
fn run(program: &str, args: &[&str]) -> Result<()> {
    eprintln!("xtask: $ {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .current_dir(root())
        .status()
        .with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("`{program} {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn test(extra: &[String]) -> Result<()> {
    setup::run()?;
    run("cargo", &["fmt", "--all", "--check"])?;
    run(
        "cargo",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    // The integration tests drive the podtrace binary itself.
    run("cargo", &["build", "--package", "podtrace", "--bins"])?;
    // podtrace's image, which `k8s up` imports into the test clusters' nodes: the DaemonSet
    // of tests/tests/kubectl.rs runs it (warm: a no-op build).
    image::run()?;
    let mut args = vec!["test", "--workspace"];
    if !extra.is_empty() {
        args.push("--");
        args.extend(extra.iter().map(String::as_str));
    }
    run("cargo", &args)?;
    // Each fuzz target for a short, fixed time from the committed seeds: a regression in a
    // parser shows here even when no seed reproduces it.
    fuzz::smoke()?;
    // The kernel matrix (5.10, 6.1, 6.12 under QEMU); a filtered run is a focused one and
    // leaves it out.
    if extra.is_empty() {
        let started = std::time::Instant::now();
        vmtest::run(vmtest::VmtestArgs {
            kernel: "all".into(),
            keep: false,
            only: None,
        })?;
        eprintln!(
            "xtask: vmtest took {:.0} s",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

fn demo() -> Result<()> {
    setup::run()?;
    run("cargo", &["build", "--release", "--package", "podtrace"])?;
    let podtrace = root().join("target/release/podtrace");
    let podtrace = podtrace.to_str().context("non-UTF-8 path")?;
    run(podtrace, &["demo"])
}
