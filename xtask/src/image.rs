//! `cargo xtask image`: podtrace's OCI image, without Docker: the static (musl) release
//! binary as `/podtrace` in one layer (plus an empty /tmp), entrypoint `/podtrace`, written
//! as an OCI image-layout archive at `target/image/podtrace.tar` that
//! `ctr -n k8s.io images import` accepts. Named [`IMAGE`] and `localhost/podtrace:latest`
//! (pods use `imagePullPolicy: Never`). `cargo xtask k8s up` imports it into both nodes
//! when it exists.
use std::{fs, path::PathBuf};

use anyhow::Result;

/// The image's name with the workspace version.
pub const IMAGE: &str = concat!("localhost/podtrace:", env!("CARGO_PKG_VERSION"));
/// The same image's `latest` tag.
pub const IMAGE_LATEST: &str = "localhost/podtrace:latest";

/// Where `cargo xtask image` writes the archive.
pub fn archive_path() -> PathBuf {
    crate::root().join("target/image/podtrace.tar")
}

pub fn run() -> Result<()> {
    let bin = crate::build::static_podtrace()?;
    let work = crate::root().join("target/image/work");
    if work.exists() {
        fs::remove_dir_all(&work)?;
    }
    let rootfs = work.join("rootfs");
    fs::create_dir_all(rootfs.join("tmp"))?;
    fs::copy(&bin, rootfs.join("podtrace"))?;
    let config = serde_json::json!({
        "Entrypoint": ["/podtrace"],
        "Env": ["PATH=/"],
        "Labels": {
            "org.opencontainers.image.title": "podtrace",
            "org.opencontainers.image.version": env!("CARGO_PKG_VERSION"),
        },
    });
    crate::k8s::images::oci_archive(
        &rootfs,
        &[IMAGE, IMAGE_LATEST],
        &config,
        &work,
        &archive_path(),
    )?;
    fs::remove_dir_all(&work)?;
    let size = fs::metadata(archive_path())?.len();
    eprintln!(
        "xtask: image {IMAGE} ({IMAGE_LATEST}): {} ({:.1} MB); import with \
         `ctr -n k8s.io images import {}`",
        archive_path().display(),
        size as f64 / 1e6,
        archive_path().display()
    );
    Ok(())
}
