//! Builds shared by the tasks that ship podtrace somewhere else (a VM guest, an OCI image):
//! the release binary linked statically against musl, so it runs on any distribution's
//! userland (Amazon Linux 2, Debian 11–13, a scratch container image) with nothing beside it.
use std::path::PathBuf;

use anyhow::{bail, Result};

/// The Rust target of the static build.
pub const STATIC_TARGET: &str = "x86_64-unknown-linux-musl";

/// Builds `podtrace` (release, static-pie against musl) and returns the binary's path.
pub fn static_podtrace() -> Result<PathBuf> {
    crate::run(
        "cargo",
        &[
            "build",
            "--release",
            "--package",
            "podtrace",
            "--bin",
            "podtrace",
            "--target",
            STATIC_TARGET,
        ],
    )?;
    let bin = crate::root()
        .join("target")
        .join(STATIC_TARGET)
        .join("release/podtrace");
    if !bin.exists() {
        bail!("the static build left no binary at {}", bin.display());
    }
    Ok(bin)
}
