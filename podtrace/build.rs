//! Builds podtrace's eBPF programs (../podtrace-ebpf) for the BPF target with the nightly
//! toolchain and bpf-linker (aya-build), and leaves the object in OUT_DIR for
//! `include_bytes_aligned!`.
//!
//! `PODTRACE_SKIP_EBPF=1` skips that build (for lint- or doc-only runs on a machine without the
//! eBPF toolchain): the binary then carries no programs and says so when asked to load them.
use std::{env, fs, path::PathBuf};

use anyhow::{anyhow, Context as _};

const SKIP: &str = "PODTRACE_SKIP_EBPF";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed={SKIP}");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?);
    let object = out_dir.join("podtrace-ebpf");
    if env::var(SKIP).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        println!("cargo:warning={SKIP} is set: building without the eBPF programs");
        fs::write(&object, b"").context("writing the empty eBPF placeholder")?;
        return Ok(());
    }
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir
        .parent()
        .ok_or_else(|| anyhow!("podtrace/ has no parent directory"))?
        .join("podtrace-ebpf");
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "podtrace-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context(
        "building the eBPF programs failed (needs the nightly toolchain with rust-src and \
         bpf-linker: run `cargo xtask setup`, or set PODTRACE_SKIP_EBPF=1 for lint-only builds)",
    )
}
