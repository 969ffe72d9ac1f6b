//! `cargo xtask setup`: make a fresh Debian 12 machine able to build and test podtrace.
//! Says what it installs and skips what is present.
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _, Result};

use crate::run as sh;

/// Debian packages: LLVM 22 for bpf-linker, and the tools the tests and the demo drive.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "iproute2",
    "iptables",
    "iputils-ping",
    "tcpdump",
    "tshark",
    "iperf3",
    // CRI: protoc for the k8s-cri crate's build; a real containerd, runc and the CNI plugins
    // for the CRI tests (tests/tests/cri.rs, which also builds a static pause binary with gcc).
    "protobuf-compiler",
    "containerd",
    "runc",
    "containernetworking-plugins",
    "gcc",
    "libc6-dev",
    // cargo-fuzz's libfuzzer-sys builds libFuzzer (C++).
    "g++",
    // The static (musl) release build: ring (rustls) compiles C with musl-gcc.
    "musl-tools",
    // The Kubernetes test cluster (cargo xtask k8s): Go and the tools that build Kubernetes
    // from Debian's source package, etcd, openssl for its certificates, busybox for its test
    // image. kubectl: see kubectl().
    "golang-go",
    "make",
    "rsync",
    "dpkg-dev",
    "etcd-server",
    "openssl",
    "busybox-static",
];

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

pub fn run() -> Result<()> {
    if !nix_is_root() {
        bail!("setup installs Debian packages and must run as root");
    }
    if !std::path::Path::new("/usr/bin/apt-get").exists()
        || !std::path::Path::new("/etc/debian_version").exists()
    {
        bail!("setup supports Debian with apt-get only (this machine has no apt-get or is not Debian)");
    }
    debian_packages()?;
    nightly()?;
    musl_target()?;
    bpf_linker()?;
    cargo_fuzz()?;
    kubectl()?;
    crate::k8s::binaries::ensure()?;
    crate::k8s::images::ensure_test_images()?;
    crate::vmtest::setup()?;
    eprintln!("xtask: setup complete");
    Ok(())
}

fn nix_is_root() -> bool {
    output("id", &["-u"]).is_some_and(|uid| uid.trim() == "0")
}

fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn installed(package: &str) -> bool {
    output("dpkg-query", &["-W", "-f=${Status}", package])
        .is_some_and(|s| s.contains("install ok installed"))
}

fn debian_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        eprintln!("xtask: Debian packages: all present");
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    sh("apt-get", &["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(&missing);
    let status = Command::new("apt-get")
        .args(&args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get")?;
    if !status.success() {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    Ok(())
}

fn nightly() -> Result<()> {
    let toolchains = output("rustup", &["toolchain", "list"]).context("rustup not found")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        eprintln!("xtask: installing the nightly toolchain (for the eBPF crate)");
        sh(
            "rustup",
            &["toolchain", "install", "nightly", "--profile", "minimal"],
        )?;
    }
    let components = output(
        "rustup",
        &["component", "list", "--installed", "--toolchain", "nightly"],
    )
    .unwrap_or_default();
    if components.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("xtask: nightly rust-src: present");
    } else {
        eprintln!("xtask: installing rust-src for nightly (build-std=core for the BPF target)");
        sh(
            "rustup",
            &["component", "add", "rust-src", "--toolchain", "nightly"],
        )?;
    }
    Ok(())
}

/// The musl target of the stable toolchain: the static release binary (VM guests, the OCI
/// image) is built for it.
fn musl_target() -> Result<()> {
    let target = crate::build::STATIC_TARGET;
    let installed = output("rustup", &["target", "list", "--installed"]).unwrap_or_default();
    if installed.lines().any(|l| l.trim() == target) {
        eprintln!("xtask: rust target {target}: present");
        return Ok(());
    }
    eprintln!("xtask: installing rust target {target} (static release builds)");
    sh("rustup", &["target", "add", target])
}

const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// cargo-fuzz, for the fuzz targets in fuzz/ (`cargo xtask fuzz`, and the short run in
/// `cargo xtask test`). Built from crates.io with the stable toolchain; runs the targets
/// with nightly.
pub fn cargo_fuzz() -> Result<()> {
    if let Some(v) = output("cargo", &["fuzz", "--version"]) {
        eprintln!("xtask: {}: present", v.trim());
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION} (about a minute)");
    sh(
        "cargo",
        &[
            "install",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ_VERSION,
            "--locked",
        ],
    )
}

/// kubectl: the one on PATH when there is one (this machine image has 1.32, which works
/// against the 1.20 server with a skew warning), Debian's `kubernetes-client` (1.20) otherwise.
fn kubectl() -> Result<()> {
    if let Some(v) = output("kubectl", &["version", "--client"]) {
        eprintln!(
            "xtask: kubectl: present ({})",
            v.lines().next().unwrap_or("").trim()
        );
        return Ok(());
    }
    eprintln!("xtask: installing kubectl (Debian's kubernetes-client)");
    let status = Command::new("apt-get")
        .args([
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "kubernetes-client",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get")?;
    if !status.success() {
        bail!("apt-get install kubernetes-client failed");
    }
    Ok(())
}

fn bpf_linker() -> Result<()> {
    if let Some(v) = output("bpf-linker", &["--version"]) {
        if v.contains(BPF_LINKER_VERSION) {
            eprintln!("xtask: bpf-linker {BPF_LINKER_VERSION}: present");
            return Ok(());
        }
        eprintln!(
            "xtask: bpf-linker is {}; installing {BPF_LINKER_VERSION}",
            v.trim()
        );
    } else {
        eprintln!("xtask: installing bpf-linker {BPF_LINKER_VERSION} (llvm-22, about a minute)");
    }
    eprintln!("xtask: $ LLVM_PREFIX={LLVM_PREFIX} cargo install bpf-linker ...");
    let status = Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        // bpf-linker's build script looks for libLLVM under this prefix.
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .status()
        .context("running cargo install")?;
    if !status.success() {
        bail!("cargo install bpf-linker {BPF_LINKER_VERSION} failed");
    }
    Ok(())
}
