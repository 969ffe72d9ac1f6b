//! What the VM runs need on the host, kept in a cache directory: QEMU (Debian's package, from
//! bookworm-backports: this image carries qemu-utils 10 from there, which breaks bookworm's
//! qemu-system 7.2), the guests' kernels (Debian's cloud kernels for bullseye, bookworm and
//! trixie, unpacked from their debs, nothing installed into /boot) and busybox (a shell in the
//! guest, for debugging a run by hand).
//!
//! Debian's archive is reached through the mirror this machine's own apt sources name (read
//! from them), with a private apt configuration in the cache so the machine's own lists and
//! sources stay as they are.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{anyhow, bail, Context as _, Result};

/// Where everything lives. `PODTRACE_VM_CACHE` overrides it.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("PODTRACE_VM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/podtrace/vm"))
}

/// One kernel of the matrix.
#[derive(Debug, Clone, Copy)]
pub struct Series {
    /// What `--kernel` takes.
    pub name: &'static str,
    /// The Debian suite whose cloud kernel it is.
    pub suite: &'static str,
    /// The suites searched for it (the security suite carries the newest).
    pub suites: &'static [&'static str],
    /// The kernel package's name starts with this (`linux-image-` + it).
    pub prefix: &'static str,
    /// ...and its name ends with this.
    pub suffix: &'static str,
}

pub const SERIES: [Series; 3] = [
    Series {
        name: "5.10",
        suite: "bullseye",
        suites: &["bullseye", "bullseye-security"],
        prefix: "5.10.",
        suffix: "-cloud-amd64",
    },
    Series {
        name: "6.1",
        suite: "bookworm",
        suites: &["bookworm", "bookworm-updates", "bookworm-security"],
        prefix: "6.1.",
        suffix: "-cloud-amd64",
    },
    Series {
        name: "6.12",
        suite: "trixie",
        suites: &["trixie", "trixie-security"],
        prefix: "6.12.",
        suffix: "+deb13-cloud-amd64",
    },
];

pub fn series(name: &str) -> Result<Series> {
    SERIES
        .iter()
        .find(|s| s.name == name)
        .copied()
        .ok_or_else(|| anyhow!("unknown kernel {name:?} (use 5.10, 6.1, 6.12 or all)"))
}

/// An unpacked kernel: its image and module tree.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub series: Series,
    /// `5.10.0-46-cloud-amd64`.
    pub release: String,
    pub vmlinuz: PathBuf,
    /// `.../lib/modules/RELEASE`.
    pub modules: PathBuf,
}

impl Kernel {
    /// The kernel of `series` in the cache, if setup put one there.
    pub fn cached(series: Series) -> Result<Option<Kernel>> {
        let dir = cache_dir().join("kernels").join(series.name);
        let Ok(boot) = fs::read_dir(dir.join("boot")) else {
            return Ok(None);
        };
        for entry in boot {
            let name = entry?.file_name().to_string_lossy().into_owned();
            let Some(release) = name.strip_prefix("vmlinuz-") else {
                continue;
            };
            let modules = ["lib/modules", "usr/lib/modules"]
                .iter()
                .map(|m| dir.join(m).join(release))
                .find(|p| p.is_dir());
            if let Some(modules) = modules {
                return Ok(Some(Kernel {
                    series,
                    release: release.to_owned(),
                    vmlinuz: dir.join("boot").join(&name),
                    modules,
                }));
            }
        }
        Ok(None)
    }

    pub fn get(series: Series) -> Result<Kernel> {
        Self::cached(series)?.ok_or_else(|| {
            anyhow!(
                "no {} kernel in {}: run `cargo xtask setup`",
                series.name,
                cache_dir().display()
            )
        })
    }
}

/// The QEMU binary, once installed.
pub fn qemu() -> Option<PathBuf> {
    let p = Path::new("/usr/bin/qemu-system-x86_64");
    p.exists().then(|| p.to_path_buf())
}

/// busybox (static), unpacked in the cache.
pub fn busybox() -> PathBuf {
    cache_dir().join("busybox/bin/busybox")
}

/// The machine's Debian mirror and security mirror, from its apt sources.
fn mirrors() -> Result<(String, String)> {
    let mut text = String::new();
    for f in [
        "/etc/apt/sources.list.d/debian.sources",
        "/etc/apt/sources.list",
    ] {
        text.push_str(&fs::read_to_string(f).unwrap_or_default());
        text.push('\n');
    }
    let mut uris: Vec<String> = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("URIs:") {
            uris.extend(rest.split_whitespace().map(str::to_owned));
        } else if let Some(rest) = line.strip_prefix("deb ") {
            // `deb [options] URI suite components`
            let rest = match rest.trim_start().strip_prefix('[') {
                Some(r) => r.split_once(']').map(|(_, r)| r).unwrap_or(""),
                None => rest,
            };
            if let Some(uri) = rest.split_whitespace().next() {
                uris.push(uri.to_owned());
            }
        }
    }
    let main = uris
        .iter()
        .find(|u| u.trim_end_matches('/').ends_with("/debian"))
        .cloned()
        .ok_or_else(|| anyhow!("no Debian mirror in this machine's apt sources"))?;
    let security = uris
        .iter()
        .find(|u| u.trim_end_matches('/').ends_with("/debian-security"))
        .cloned()
        .unwrap_or_else(|| format!("{}-security", main.trim_end_matches('/')));
    Ok((main, security))
}

/// A private apt configuration (sources, lists, archives) under the cache.
struct Apt {
    dir: PathBuf,
}

impl Apt {
    /// `name`: `kernels` (every suite the matrix needs) or `host` (bookworm and its
    /// backports, to install QEMU without pulling newer suites' libraries in).
    fn new(name: &str, suites: &[&str]) -> Result<Self> {
        let (main, security) = mirrors()?;
        let dir = cache_dir().join("apt").join(name);
        fs::create_dir_all(dir.join("lists/partial"))?;
        fs::create_dir_all(dir.join("archives/partial"))?;
        let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
        let mut sources = String::new();
        for suite in suites {
            let uri = if suite.ends_with("-security") {
                &security
            } else {
                &main
            };
            sources.push_str(&format!("deb [signed-by={keyring}] {uri} {suite} main\n"));
        }
        fs::write(dir.join("sources.list"), sources)?;
        Ok(Self { dir })
    }

    fn options(&self) -> Vec<String> {
        let d = self.dir.display();
        vec![
            format!("-oDir::Etc::SourceList={d}/sources.list"),
            "-oDir::Etc::SourceParts=/nonexistent".into(),
            format!("-oDir::State::Lists={d}/lists"),
            format!("-oDir::Cache={d}"),
            // Downloads land in directories _apt cannot write to; root fetches them.
            "-oAPT::Sandbox::User=root".into(),
        ]
    }

    fn run(&self, program: &str, args: &[&str], cwd: Option<&Path>) -> Result<String> {
        let mut cmd = Command::new(program);
        cmd.args(self.options())
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive");
        if let Some(cwd) = cwd {
            cmd.current_dir(cwd);
        }
        eprintln!("xtask: $ {program} (private sources) {}", args.join(" "));
        let out = cmd.output().with_context(|| format!("running {program}"))?;
        if !out.status.success() {
            bail!(
                "{program} {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn update(&self) -> Result<()> {
        self.run("apt-get", &["update", "-q"], None).map(|_| ())
    }
}

/// `cargo xtask setup`'s part for the VM runs: QEMU, the three kernels, busybox. Skips what
/// is there; downloads only what is missing.
pub fn setup() -> Result<()> {
    let started = std::time::Instant::now();
    let mut did = false;
    if qemu().is_none() {
        did = true;
        eprintln!("xtask: installing QEMU (qemu-system-x86 from bookworm-backports)");
        let apt = Apt::new(
            "host",
            &[
                "bookworm",
                "bookworm-updates",
                "bookworm-security",
                "bookworm-backports",
            ],
        )?;
        apt.update()?;
        apt.run(
            "apt-get",
            &[
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "-t",
                "bookworm-backports",
                "qemu-system-x86",
            ],
            None,
        )?;
    } else {
        eprintln!("xtask: QEMU: present");
    }
    let missing: Vec<Series> = SERIES
        .iter()
        .copied()
        .filter(|s| Kernel::cached(*s).ok().flatten().is_none())
        .collect();
    if missing.is_empty() && busybox().exists() {
        eprintln!("xtask: VM kernels (5.10, 6.1, 6.12) and busybox: present");
    } else {
        did = true;
        let mut suites: Vec<&str> = SERIES
            .iter()
            .flat_map(|s| s.suites.iter().copied())
            .collect();
        suites.sort();
        suites.dedup();
        let apt = Apt::new("kernels", &suites)?;
        apt.update()?;
        let debs = cache_dir().join("debs");
        fs::create_dir_all(&debs)?;
        for s in &missing {
            let package = newest_kernel(&apt, s)?;
            eprintln!("xtask: kernel {}: {package}", s.name);
            let deb = download(&apt, &package, &debs)?;
            let dir = cache_dir().join("kernels").join(s.name);
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir)?;
            unpack(&deb, &dir)?;
            fs::remove_file(&deb)?;
            Kernel::get(*s)?;
        }
        if !busybox().exists() {
            let deb = download(&apt, "busybox-static/bookworm", &debs)?;
            let dir = cache_dir().join("busybox");
            fs::create_dir_all(&dir)?;
            unpack(&deb, &dir)?;
            fs::remove_file(&deb)?;
        }
    }
    if did {
        eprintln!(
            "xtask: VM set-up took {:.0} s",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// The newest `linux-image-<prefix>*<suffix>` in the series' suites (by Debian version).
fn newest_kernel(apt: &Apt, s: &Series) -> Result<String> {
    // Every version of the cloud meta-package names the kernel package of its suite.
    let all = apt.run("apt-cache", &["show", "linux-image-cloud-amd64"], None)?;
    let mut best: Option<(String, String)> = None;
    for stanza in all.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
        };
        let (Some(version), Some(depends)) = (field("Version:"), field("Depends:")) else {
            continue;
        };
        let Some(package) = depends
            .split(',')
            .map(|d| d.split_whitespace().next().unwrap_or(""))
            .find(|p| p.starts_with("linux-image-"))
        else {
            continue;
        };
        let release = package.trim_start_matches("linux-image-");
        if !release.starts_with(s.prefix) || !release.ends_with(s.suffix) {
            continue;
        }
        let newer = match &best {
            None => true,
            Some((v, _)) => Command::new("dpkg")
                .args(["--compare-versions", &version, "gt", v])
                .status()
                .is_ok_and(|st| st.success()),
        };
        if newer {
            best = Some((version, package.to_owned()));
        }
    }
    best.map(|(_, p)| p)
        .ok_or_else(|| anyhow!("no {} cloud kernel found in {}", s.name, s.suite))
}

/// Downloads `package` (`name` or `name/suite`) into `dir`; its .deb.
fn download(apt: &Apt, package: &str, dir: &Path) -> Result<PathBuf> {
    let name = package.split('/').next().unwrap_or(package);
    let find = || {
        fs::read_dir(dir).ok().and_then(|d| {
            d.filter_map(|e| e.ok()).map(|e| e.path()).find(|p| {
                p.file_name()
                    .is_some_and(|f| f.to_string_lossy().starts_with(&format!("{name}_")))
                    && p.extension().is_some_and(|e| e == "deb")
            })
        })
    };
    if let Some(p) = find() {
        let _ = fs::remove_file(p);
    }
    apt.run("apt-get", &["download", "-q", package], Some(dir))?;
    find().ok_or_else(|| anyhow!("apt-get download {package} left no .deb"))
}

fn unpack(deb: &Path, dir: &Path) -> Result<()> {
    let status = Command::new("dpkg-deb")
        .arg("-x")
        .arg(deb)
        .arg(dir)
        .status()
        .context("running dpkg-deb")?;
    if !status.success() {
        bail!("dpkg-deb -x {} failed", deb.display());
    }
    Ok(())
}
