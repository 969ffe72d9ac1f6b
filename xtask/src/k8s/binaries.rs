//! Kubernetes v1.20.2's server binaries, built from Debian bookworm's source package (no
//! registry reachable from these machines ships them) and cached, so that only the first
//! `cargo xtask setup` on a machine builds them. See ../../../../shared/kubernetes.md.
//!
//! The build: `apt-get source --download-only` with a scratch APT configuration whose only
//! source is bookworm's `deb-src` on the machine's own Debian mirror, `dpkg-source -x`
//! (Debian's patches applied), then Debian's `golang-go` (1.19) in GOPATH mode (the tree
//! linked at `$GOPATH/src/k8s.io/kubernetes`; module mode fails), `make gen_openapi` (the
//! generated OpenAPI file is not in the tarball), and one `go build` of the four commands.
//! The source tree and Go's cache (≈ 2.5 GB) are removed afterwards.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context as _, Result};

/// The Kubernetes version the cluster runs.
pub const VERSION: &str = "v1.20.2";
/// Debian bookworm's source package of it.
const DEB_SOURCE: &str = "kubernetes";
const DEB_VERSION: &str = "1.20.5+really1.20.2-1.1+deb12u1";
/// The commands built.
pub const COMMANDS: [&str; 4] = [
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
];

/// Everything cached for this Kubernetes version.
pub fn cache_dir() -> PathBuf {
    PathBuf::from(format!("/var/cache/podtrace/k8s-{VERSION}"))
}

/// Where the built binaries live.
pub fn bin_dir() -> PathBuf {
    cache_dir().join("bin")
}

/// The path of one built command.
pub fn bin(command: &str) -> PathBuf {
    bin_dir().join(command)
}

/// Whether every binary is there and says it is [`VERSION`].
pub fn present() -> bool {
    COMMANDS.iter().all(|c| {
        Command::new(bin(c))
            .arg("--version")
            .output()
            .is_ok_and(|o| {
                o.status.success() && String::from_utf8_lossy(&o.stdout).contains(VERSION)
            })
    })
}

/// Builds and caches the binaries unless they are present.
pub fn ensure() -> Result<()> {
    if present() {
        eprintln!(
            "xtask: Kubernetes {VERSION} binaries: present ({})",
            bin_dir().display()
        );
        return Ok(());
    }
    eprintln!(
        "xtask: building Kubernetes {VERSION} from Debian's source package (about 6 minutes \
         on 2 cores, 1.5 GB of memory; once per machine)"
    );
    let started = Instant::now();
    let work = cache_dir().join("build");
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    fs::create_dir_all(&work)?;
    let result = build(&work);
    // The tree and Go's cache are only needed for this build.
    if let Err(e) = fs::remove_dir_all(&work) {
        eprintln!("xtask: warning: removing {}: {e}", work.display());
    }
    result?;
    eprintln!(
        "xtask: Kubernetes {VERSION} built in {:.0} s ({})",
        started.elapsed().as_secs_f64(),
        bin_dir().display()
    );
    Ok(())
}

/// The machine's own Debian mirror (the first `URIs:` / `deb URI` of its APT sources that
/// serves bookworm itself), so that the source comes from where its packages come from.
fn debian_mirror() -> String {
    let mut texts = Vec::new();
    if let Ok(t) = fs::read_to_string("/etc/apt/sources.list") {
        texts.push(t);
    }
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut paths: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        paths.sort();
        for p in paths {
            let name = p.to_string_lossy();
            if name.ends_with(".list") || name.ends_with(".sources") {
                if let Ok(t) = fs::read_to_string(&p) {
                    texts.push(t);
                }
            }
        }
    }
    mirror_in(&texts).unwrap_or_else(|| "http://deb.debian.org/debian".to_owned())
}

/// The first bookworm mirror named in APT source files (deb822 or one-line format).
fn mirror_in(texts: &[String]) -> Option<String> {
    for text in texts {
        // deb822: a stanza with URIs and Suites naming bookworm.
        for stanza in text.split("\n\n") {
            let field = |name: &str| {
                stanza
                    .lines()
                    .find_map(|l| l.strip_prefix(name).map(str::trim).map(str::to_owned))
            };
            if let (Some(uris), Some(suites)) = (field("URIs:"), field("Suites:")) {
                if suites.split_whitespace().any(|s| s == "bookworm") {
                    if let Some(uri) = uris.split_whitespace().next() {
                        return Some(uri.to_owned());
                    }
                }
            }
        }
        // One-line format: deb [opts] URI bookworm components...
        for line in text.lines() {
            let words: Vec<&str> = line
                .split_whitespace()
                .filter(|w| !w.starts_with('['))
                .collect();
            if words.len() >= 3 && words[0] == "deb" && words[2] == "bookworm" {
                return Some(words[1].to_owned());
            }
        }
    }
    None
}

fn build(work: &Path) -> Result<()> {
    // 1. The source package, through a scratch APT configuration (the machine's own sources
    //    have no deb-src, and are left as they are).
    let apt = work.join("apt");
    for d in ["lists/partial", "cache/archives/partial"] {
        fs::create_dir_all(apt.join(d))?;
    }
    let mirror = debian_mirror();
    fs::write(
        apt.join("sources.list"),
        format!(
            "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {mirror} \
             bookworm main\n"
        ),
    )?;
    let apt_opts: Vec<String> = vec![
        format!(
            "-oDir::Etc::SourceList={}",
            apt.join("sources.list").display()
        ),
        "-oDir::Etc::SourceParts=/nonexistent".into(),
        format!("-oDir::State::Lists={}", apt.join("lists").display()),
        format!("-oDir::Cache={}", apt.join("cache").display()),
        "-oDir::Cache::pkgcache=".into(),
        "-oDir::Cache::srcpkgcache=".into(),
        "-q".into(),
    ];
    let mut args: Vec<String> = apt_opts.clone();
    args.push("update".into());
    cmd("apt-get", &args, work, &[])?;
    let src = work.join("src");
    fs::create_dir_all(&src)?;
    let mut args = apt_opts;
    args.extend([
        "source".into(),
        "--download-only".into(),
        format!("{DEB_SOURCE}={DEB_VERSION}"),
    ]);
    cmd("apt-get", &args, &src, &[])?;
    let dsc = fs::read_dir(&src)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "dsc"))
        .context("apt-get source left no .dsc")?;
    let tree = src.join("kubernetes");
    cmd(
        "dpkg-source",
        &[
            "-x".into(),
            dsc.display().to_string(),
            tree.display().to_string(),
        ],
        &src,
        &[],
    )?;

    // 2. GOPATH mode: the tree at $GOPATH/src/k8s.io/kubernetes.
    let gopath = work.join("gopath");
    fs::create_dir_all(gopath.join("src/k8s.io"))?;
    let linked = gopath.join("src/k8s.io/kubernetes");
    std::os::unix::fs::symlink(&tree, &linked)?;
    let env: Vec<(&str, String)> = vec![
        ("GOPATH", gopath.display().to_string()),
        ("GOCACHE", work.join("gocache").display().to_string()),
        ("GO111MODULE", "off".into()),
        ("GOPROXY", "off".into()),
        ("GOFLAGS", String::new()),
        ("CGO_ENABLED", "0".into()),
        // Go and make resolve the working directory through $PWD: keep the GOPATH path.
        ("PWD", linked.display().to_string()),
    ];
    cmd("make", &["gen_openapi".into()], &linked, &env)?;
    let ldflags = [
        "-s",
        "-w",
        &format!("-X k8s.io/kubernetes/vendor/k8s.io/component-base/version.gitVersion={VERSION}"),
        "-X k8s.io/kubernetes/vendor/k8s.io/component-base/version.gitMajor=1",
        "-X k8s.io/kubernetes/vendor/k8s.io/component-base/version.gitMinor=20",
        "-X k8s.io/kubernetes/vendor/k8s.io/component-base/version.gitTreeState=clean",
    ]
    .join(" ");
    let out = work.join("out");
    fs::create_dir_all(&out)?;
    let mut args: Vec<String> = vec![
        "build".into(),
        "-trimpath".into(),
        "-ldflags".into(),
        ldflags,
        "-o".into(),
        format!("{}/", out.display()),
    ];
    args.extend(COMMANDS.iter().map(|c| format!("./cmd/{c}")));
    cmd("go", &args, &linked, &env)?;

    // 3. Into the cache, all or nothing.
    let staging = cache_dir().join("bin.new");
    if staging.exists() {
        fs::remove_dir_all(&staging)?;
    }
    fs::create_dir_all(&staging)?;
    for c in COMMANDS {
        fs::copy(out.join(c), staging.join(c)).with_context(|| format!("go build left no {c}"))?;
    }
    if bin_dir().exists() {
        fs::remove_dir_all(bin_dir())?;
    }
    fs::rename(&staging, bin_dir())?;
    if !present() {
        bail!(
            "the built binaries in {} do not report {VERSION}",
            bin_dir().display()
        );
    }
    Ok(())
}

/// Runs a build step in `dir`, streaming its output.
fn cmd(program: &str, args: &[String], dir: &Path, env: &[(&str, String)]) -> Result<()> {
    eprintln!("xtask: [{}] $ {program} {}", dir.display(), args.join(" "));
    let status = Command::new(program)
        .args(args)
        .current_dir(dir)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .status()
        .with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("`{program} {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::mirror_in;

    #[test]
    fn mirror_from_apt_sources() {
        let deb822 = "Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: \
                      bookworm-security\n\nTypes: deb\n# comment\nURIs: http://mirror.example/debian\n\
                      Suites: bookworm bookworm-updates\nComponents: main\n";
        assert_eq!(
            mirror_in(&[deb822.to_owned()]).as_deref(),
            Some("http://mirror.example/debian")
        );
        let list = "deb [signed-by=/k.gpg] http://ftp.example/debian bookworm main\n";
        assert_eq!(
            mirror_in(&[list.to_owned()]).as_deref(),
            Some("http://ftp.example/debian")
        );
        assert_eq!(
            mirror_in(&["deb http://x/debian bullseye main".to_owned()]),
            None
        );
    }
}
