//! OCI images built here without Docker or a registry: an image layout (`oci-layout`,
//! `index.json`, `blobs/sha256/…`) in one tar archive, one uncompressed layer, which
//! `ctr -n k8s.io images import` accepts. Each index entry carries the image's full name in
//! `io.containerd.image.name` (what the CRI plugin and kubelet match `image:` against).
//!
//! The cluster's test images, cached beside the Kubernetes binaries by `cargo xtask setup`:
//! - [`PAUSE_IMAGE`]: the sandbox ("pause") image, a static C build of a process that waits
//!   for SIGTERM;
//! - [`BUSYBOX_IMAGE`]: Debian's busybox-static with a link per applet in /bin (sh, nc,
//!   ping, ip, sleep, …).
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use super::binaries;

/// The pod sandbox image of the test cluster (containerd's `sandbox_image`).
pub const PAUSE_IMAGE: &str = "localhost/pause:3.2";
/// The test workload image: busybox with nc and ping.
pub const BUSYBOX_IMAGE: &str = "localhost/busybox:1.35";

const PAUSE_C: &str = r#"
#include <signal.h>
#include <unistd.h>
static void done(int sig) { (void)sig; _exit(0); }
int main(void) {
    signal(SIGTERM, done);
    signal(SIGINT, done);
    for (;;) pause();
}
"#;

/// Where the cached test images live.
pub fn dir() -> PathBuf {
    binaries::cache_dir().join("images")
}

/// The pause image's archive.
pub fn pause_tar() -> PathBuf {
    dir().join("pause.tar")
}

/// The busybox image's archive.
pub fn busybox_tar() -> PathBuf {
    dir().join("busybox.tar")
}

/// Builds the test images unless they are cached.
pub fn ensure_test_images() -> Result<()> {
    if pause_tar().exists() && busybox_tar().exists() {
        eprintln!("xtask: test images: present ({})", dir().display());
        return Ok(());
    }
    eprintln!("xtask: building the test images (pause, busybox)");
    fs::create_dir_all(dir())?;
    let work = dir().join("work");
    if work.exists() {
        fs::remove_dir_all(&work)?;
    }
    let result = build_test_images(&work);
    let _ = fs::remove_dir_all(&work);
    result
}

fn build_test_images(work: &Path) -> Result<()> {
    // pause
    let rootfs = work.join("pause/rootfs");
    fs::create_dir_all(&rootfs)?;
    let src = work.join("pause/pause.c");
    fs::write(&src, PAUSE_C)?;
    run(
        "gcc",
        &[
            "-static",
            "-Os",
            "-s",
            "-o",
            &rootfs.join("pause").display().to_string(),
            &src.display().to_string(),
        ],
    )?;
    let config = serde_json::json!({"Entrypoint": ["/pause"]});
    oci_archive(
        &rootfs,
        &[PAUSE_IMAGE],
        &config,
        &work.join("pause"),
        &pause_tar(),
    )?;

    // busybox
    let busybox = Path::new("/bin/busybox");
    if !busybox.exists() {
        bail!("/bin/busybox is missing (apt-get install busybox-static)");
    }
    let rootfs = work.join("busybox/rootfs");
    let bin = rootfs.join("bin");
    fs::create_dir_all(&bin)?;
    fs::create_dir_all(rootfs.join("tmp"))?;
    fs::create_dir_all(rootfs.join("etc"))?;
    fs::copy(busybox, bin.join("busybox"))?;
    let list = Command::new(busybox)
        .arg("--list")
        .output()
        .context("running busybox --list")?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        std::os::unix::fs::symlink("busybox", bin.join(applet))?;
    }
    fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    fs::write(rootfs.join("etc/group"), "root:x:0:\n")?;
    let config = serde_json::json!({
        "Cmd": ["/bin/sh"],
        "Env": ["PATH=/bin"],
    });
    oci_archive(
        &rootfs,
        &[BUSYBOX_IMAGE],
        &config,
        &work.join("busybox"),
        &busybox_tar(),
    )
}

fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn sha256_hex(path: &Path) -> Result<String> {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .context("running sha256sum")?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text.split_whitespace().next() {
        Some(h) if out.status.success() && h.len() == 64 => Ok(h.to_owned()),
        _ => bail!("sha256sum {} failed", path.display()),
    }
}

/// Moves `file` into `blobs` under its digest; returns (digest, size).
fn blob_from_file(blobs: &Path, file: &Path) -> Result<(String, u64)> {
    let hex = sha256_hex(file)?;
    let size = fs::metadata(file)?.len();
    fs::rename(file, blobs.join(&hex))?;
    Ok((format!("sha256:{hex}"), size))
}

fn blob(blobs: &Path, bytes: &[u8]) -> Result<(String, u64)> {
    let tmp = blobs.join("incoming");
    fs::write(&tmp, bytes)?;
    blob_from_file(blobs, &tmp)
}

/// The image architecture of this machine, in OCI's words.
fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Writes an OCI image archive at `out`: `rootfs` as its one layer (owned by root, files in
/// name order, mtime 0), `config` as the image's `config` (Entrypoint, Cmd, Env, …), one
/// index entry per name in `names` (full names: `localhost/NAME:TAG`). `work` is a scratch
/// directory of the caller's.
pub fn oci_archive(
    rootfs: &Path,
    names: &[&str],
    config: &serde_json::Value,
    work: &Path,
    out: &Path,
) -> Result<()> {
    let layout = work.join("oci");
    if layout.exists() {
        fs::remove_dir_all(&layout)?;
    }
    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    let mut entries: Vec<String> = fs::read_dir(rootfs)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    let layer = blobs.join("layer.tar");
    let mut args = vec![
        "--sort=name".to_owned(),
        "--mtime=@0".into(),
        "--owner=0".into(),
        "--group=0".into(),
        "--numeric-owner".into(),
        "-C".into(),
        rootfs.display().to_string(),
        "-cf".into(),
        layer.display().to_string(),
    ];
    args.extend(entries);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run("tar", &args)?;
    let (layer_digest, layer_size) = blob_from_file(&blobs, &layer)?;
    let image_config = serde_json::json!({
        "architecture": arch(),
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    let (config_digest, config_size) = blob(&blobs, image_config.to_string().as_bytes())?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest, "size": layer_size}],
    });
    let (manifest_digest, manifest_size) = blob(&blobs, manifest.to_string().as_bytes())?;
    let manifests: Vec<serde_json::Value> = names
        .iter()
        .map(|name| {
            let tag = name.rsplit_once(':').map_or("latest", |(_, t)| t);
            serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest, "size": manifest_size,
                "platform": {"architecture": arch(), "os": "linux"},
                "annotations": {"io.containerd.image.name": name,
                                "org.opencontainers.image.ref.name": tag},
            })
        })
        .collect();
    let index = serde_json::json!({"schemaVersion": 2, "manifests": manifests});
    fs::write(layout.join("index.json"), index.to_string())?;
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    if let Some(parent) = out.parent() {
        fs::create_dir_all(parent)?;
    }
    let tmp = out.with_extension("tar.partial");
    run(
        "tar",
        &[
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "-C",
            &layout.display().to_string(),
            "-cf",
            &tmp.display().to_string(),
            "oci-layout",
            "index.json",
            "blobs",
        ],
    )?;
    fs::rename(&tmp, out)?;
    Ok(())
}
