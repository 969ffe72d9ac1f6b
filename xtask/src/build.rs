//! Builds shared by the tasks that ship podtrace somewhere else (a VM guest, an OCI image):
//! the release binary linked statically against musl, so it runs on any distribution's
//! userland (Amazon Linux 2, Debian 11–13, a scratch container image) with nothing beside it.
use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context as _, Result};

/// The Rust target of the static build.
pub const STATIC_TARGET: &str = "x86_64-unknown-linux-musl";

/// The C compiler for the musl target's C code (ring, under rustls): Debian's musl-tools
/// has `musl-gcc`, not the `x86_64-linux-musl-gcc` cc-rs looks for by default.
const MUSL_CC_VAR: &str = "CC_x86_64_unknown_linux_musl";

/// `cargo build --release --target musl ARGS...` with the musl C compiler set.
pub fn static_build(args: &[&str]) -> Result<()> {
    let mut all = vec!["build", "--release", "--target", STATIC_TARGET];
    all.extend_from_slice(args);
    eprintln!("xtask: $ cargo {}", all.join(" "));
    let mut cmd = Command::new("cargo");
    cmd.args(&all).current_dir(crate::root());
    if std::env::var_os(MUSL_CC_VAR).is_none() {
        cmd.env(MUSL_CC_VAR, "musl-gcc");
    }
    let status = cmd.status().context("running cargo")?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", all.join(" "));
    }
    Ok(())
}

/// Builds `podtrace` (release, static-pie against musl) and returns the binary's path.
pub fn static_podtrace() -> Result<PathBuf> {
    static_build(&["--package", "podtrace", "--bin", "podtrace"])?;
    let bin = crate::root()
        .join("target")
        .join(STATIC_TARGET)
        .join("release/podtrace");
    if !bin.exists() {
        bail!("the static build left no binary at {}", bin.display());
    }
    Ok(bin)
}
