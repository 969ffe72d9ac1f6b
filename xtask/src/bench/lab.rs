//! The benchmark's own lab (torn down whatever happens) and its scratch directory.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

use super::proc::{last_lines, Proc, Stream};

/// A flannel lab brought up with its own prefix; `Drop` brings it down.
pub struct Lab {
    pub podtrace: PathBuf,
    pub prefix: String,
}

/// One interface on the pod's path, as `podtrace topo --json` names it.
#[derive(Debug, Clone)]
pub struct Hop {
    /// `OWNER/IFNAME`.
    pub name: String,
    /// The lab pod or node whose namespace holds the interface (`lab exec` takes it).
    pub owner: String,
    pub ifname: String,
    pub role: String,
}

impl Lab {
    pub fn up(podtrace: &Path, prefix: &str) -> Result<Lab> {
        Self::up_with(podtrace, prefix, &[])
    }

    /// `lab up` with more arguments (`--agents`).
    pub fn up_with(podtrace: &Path, prefix: &str, extra: &[&str]) -> Result<Lab> {
        // The guard exists before anything is created, so a half-built lab goes too.
        let lab = Lab {
            podtrace: podtrace.to_owned(),
            prefix: prefix.to_owned(),
        };
        let mut args = vec!["lab", "up", "--topology", "flannel", "--prefix", prefix];
        args.extend(extra);
        lab.podtrace_ok("lab up", &args, Duration::from_secs(90))?;
        Ok(lab)
    }

    /// `podtrace lab status --json` of this lab.
    pub fn status(&self) -> Result<Value> {
        let out = self.podtrace_ok(
            "lab status",
            &["lab", "status", "--prefix", self.prefix.as_str(), "--json"],
            Duration::from_secs(30),
        )?;
        serde_json::from_str(&out).context("parsing `podtrace lab status --json`")
    }

    /// Runs `podtrace ARGS...` to the end; fails unless it exits 0. Returns its stdout.
    pub fn podtrace_ok(&self, what: &str, args: &[&str], timeout: Duration) -> Result<String> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let mut p = Proc::spawn(what, &self.podtrace, &args)?;
        let exit = p.wait(timeout)?;
        if exit.code != Some(0) {
            bail!(
                "`podtrace {}` failed ({}): {}",
                args.join(" "),
                exit.describe(),
                last_lines(&p.text(Stream::Err), 5)
            );
        }
        Ok(p.text(Stream::Out))
    }

    /// `podtrace ARGS... --lab PREFIX` (the commands that take a pod).
    pub fn pod_args(&self, args: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        v.extend(["--lab".to_owned(), self.prefix.clone()]);
        v
    }

    /// Starts a podtrace command that takes a pod.
    pub fn spawn_podtrace(&self, what: &str, args: &[&str]) -> Result<Proc> {
        self.spawn_podtrace_env(what, args, &[])
    }

    /// [`Lab::spawn_podtrace`] with `env` added to its environment.
    pub fn spawn_podtrace_env(
        &self,
        what: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Proc> {
        Proc::spawn_env(what, &self.podtrace, &self.pod_args(args), env)
    }

    /// Starts `CMD...` inside the namespace of lab pod or node `name`.
    pub fn spawn_in(&self, what: &str, name: &str, cmd: &[String]) -> Result<Proc> {
        let mut args: Vec<String> = ["lab", "exec", name, "--prefix", &self.prefix, "--"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(cmd.iter().cloned());
        Proc::spawn(what, &self.podtrace, &args)
    }

    /// The hops of `pod`'s path to `dst`, from `podtrace topo --json`.
    pub fn path(&self, pod: &str, dst: &str) -> Result<Vec<Hop>> {
        let out = self.podtrace_ok(
            "topo",
            &[
                "topo",
                pod,
                "--dst",
                dst,
                "--json",
                "--lab",
                self.prefix.as_str(),
            ],
            Duration::from_secs(30),
        )?;
        let topo: Value = serde_json::from_str(&out).context("parsing `podtrace topo --json`")?;
        let hops = topo["hops"]
            .as_array()
            .context("`podtrace topo --json` has no hops")?;
        hops.iter()
            .map(|h| {
                let s = |k: &str| -> Result<String> {
                    Ok(h[k]
                        .as_str()
                        .with_context(|| format!("a topo hop without {k}: {h}"))?
                        .to_owned())
                };
                Ok(Hop {
                    name: s("name")?,
                    owner: s("owner")?,
                    ifname: s("ifname")?,
                    role: s("role")?,
                })
            })
            .collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        eprintln!("bench: lab down --prefix {}", self.prefix);
        let status = std::process::Command::new(&self.podtrace)
            .args(["lab", "down", "--prefix", &self.prefix])
            .stdin(std::process::Stdio::null())
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => eprintln!(
                "bench: `podtrace lab down --prefix {}` failed ({s})",
                self.prefix
            ),
            Err(e) => eprintln!("bench: running podtrace lab down: {e}"),
        }
    }
}

/// A scratch directory (on tmpfs: the capture files), removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new() -> Result<Scratch> {
        let base = if Path::new("/dev/shm").is_dir() {
            Path::new("/dev/shm")
        } else {
            Path::new("/tmp")
        };
        let dir = base.join(format!("podtrace-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Scratch(dir))
    }

    /// Empties the directory (between runs).
    pub fn clear(&self) -> Result<()> {
        for e in std::fs::read_dir(&self.0)? {
            let p = e?.path();
            std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
        }
        Ok(())
    }

    pub fn file(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
