//! Generates the node agent's gRPC code from proto/, and builds podtrace's eBPF programs (../podtrace-ebpf) for the BPF target with the nightly
//! toolchain and bpf-linker (aya-build), and leaves the object in OUT_DIR for
//! `include_bytes_aligned!`.
//!
//! `PODTRACE_SKIP_EBPF=1` skips that build (for lint- or doc-only runs on a machine without the
//! eBPF toolchain): the binary then carries no programs and says so when asked to load them.
use std::{env, fs, path::PathBuf};

use anyhow::{anyhow, Context as _};

const SKIP: &str = "PODTRACE_SKIP_EBPF";

fn main() -> anyhow::Result<()> {
    // The node agent's gRPC API (protoc: Debian's protobuf-compiler, installed by setup).
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .compile_protos(&["proto/podtrace/agent/v1/agent.proto"], &["proto"])
        .context("compiling proto/podtrace/agent/v1/agent.proto (needs protoc)")?;
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
    share_ebpf_target_dir(&manifest_dir, &out_dir)?;
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

/// aya-build builds the eBPF crate in `OUT_DIR/aya-build/target/podtrace-ebpf`, and OUT_DIR
/// changes with every change to podtrace's dependencies or build script: each time the eBPF
/// crate and `core` (build-std) were rebuilt from nothing (minutes). That directory is made a
/// link to one kept in the workspace's target directory, so every build of podtrace (debug,
/// release, the static musl one) shares one cargo cache for the eBPF object.
fn share_ebpf_target_dir(
    manifest_dir: &std::path::Path,
    out_dir: &std::path::Path,
) -> anyhow::Result<()> {
    let target = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir.join("../target"));
    let shared = target.join("ebpf");
    let per_build = out_dir.join("aya-build").join("target");
    fs::create_dir_all(&per_build).with_context(|| format!("creating {}", per_build.display()))?;
    let link = per_build.join("podtrace-ebpf");
    // A build from before the link existed: its cache becomes the shared one.
    if link.is_dir() && !link.is_symlink() && !shared.exists() {
        fs::rename(&link, &shared)
            .with_context(|| format!("moving {} to {}", link.display(), shared.display()))?;
    }
    fs::create_dir_all(&shared).with_context(|| format!("creating {}", shared.display()))?;
    if fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink(&shared, &link)
            .with_context(|| format!("linking {} to {}", link.display(), shared.display()))?;
    }
    Ok(())
}
