//! The machine and the code the benchmark ran on.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::{json, Value};

fn output(program: &str, args: &[&str]) -> Option<String> {
    output_in(&crate::root(), program, args)
}

fn output_in(dir: &Path, program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The git work tree a podtrace binary lies in (`target/release/podtrace` of a checkout).
pub fn tree_of(binary: &Path) -> Option<PathBuf> {
    binary
        .parent()
        .and_then(|d| output_in(d, "git", &["rev-parse", "--show-toplevel"]))
        .map(PathBuf::from)
}

/// The commit checked out in a work tree.
pub fn head_commit_in(tree: &Path) -> String {
    output_in(tree, "git", &["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into())
}

/// The commit checked out in the binary's work tree (a read-only git query); "unknown" for
/// a binary outside any work tree.
pub fn head_commit(binary: &Path) -> String {
    tree_of(binary).map_or_else(|| "unknown".into(), |t| head_commit_in(&t))
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> String {
    read("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

pub struct Machine {
    pub kernel: String,
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub os: String,
    pub commit: String,
    /// The podtrace binary measured, and the work tree whose commit is reported.
    pub binary: PathBuf,
    pub tree: PathBuf,
    /// Built by the benchmark (else given with --podtrace).
    pub built: bool,
    /// The binary's modification time (UTC), to compare with the commit's.
    pub binary_mtime: String,
    /// A `--quick` smoke check, not a measurement.
    pub quick: bool,
    /// podtrace's sources in the work tree differ from the commit (or HEAD moved while the
    /// benchmark built it).
    pub dirty: bool,
    pub podtrace_version: String,
    pub tcpdump: String,
    pub iperf3: String,
    pub date: String,
    pub loadavg: String,
    /// At the end of the measurements (other work on the machine skews them).
    pub loadavg_end: String,
}

impl Machine {
    pub fn describe(podtrace: &Path, built: bool, quick: bool) -> Machine {
        let tree = tree_of(podtrace).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let field = |name: &str| {
            cpuinfo
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        };
        let cores = cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count();
        let mem_kb: f64 = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0);
        let os = read("/etc/os-release")
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .map(|v| v.trim_matches('"').to_owned())
            .unwrap_or_default();
        let commit = head_commit(podtrace);
        // What the podtrace binary is built from (the benchmark's own files do not count).
        let dirty = (!tree.as_os_str().is_empty())
            .then_some(())
            .and_then(|()| {
                output_in(
                    &tree,
                    "git",
                    &[
                        "--no-optional-locks",
                        "status",
                        "--porcelain",
                        "--",
                        "podtrace",
                        "podtrace-ebpf",
                        "Cargo.toml",
                        "Cargo.lock",
                    ],
                )
            })
            .is_some_and(|s| !s.is_empty());
        let tcpdump_ver = Command::new("tcpdump")
            .arg("--version")
            .output()
            .map(|o| {
                let s = String::from_utf8_lossy(&o.stdout).into_owned()
                    + &String::from_utf8_lossy(&o.stderr);
                s.lines().next().unwrap_or_default().to_owned()
            })
            .unwrap_or_default();
        Machine {
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            cpu: field("model name").unwrap_or_else(|| "unknown".into()),
            cores,
            memory_gib: mem_kb / (1024.0 * 1024.0),
            os,
            commit,
            binary: podtrace.to_owned(),
            tree,
            built,
            binary_mtime: output(
                "date",
                &[
                    "-u",
                    "+%Y-%m-%dT%H:%M:%SZ",
                    "-r",
                    &podtrace.display().to_string(),
                ],
            )
            .unwrap_or_default(),
            quick,
            dirty,
            podtrace_version: podtrace
                .to_str()
                .and_then(|p| output(p, &["--version"]))
                .unwrap_or_default(),
            tcpdump: tcpdump_ver,
            iperf3: output("iperf3", &["--version"])
                .and_then(|s| s.lines().next().map(str::to_owned))
                .unwrap_or_default(),
            date: output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]).unwrap_or_default(),
            loadavg: loadavg(),
            loadavg_end: String::new(),
        }
    }

    pub fn commit_label(&self) -> String {
        format!(
            "{}{}",
            self.commit.get(..12).unwrap_or(&self.commit),
            if self.dirty {
                " (+ uncommitted changes to podtrace)"
            } else {
                ""
            }
        )
    }

    pub fn to_json(&self) -> Value {
        json!({
            "kernel": self.kernel,
            "cpu": self.cpu,
            "cores": self.cores,
            "memory_gib": (self.memory_gib * 10.0).round() / 10.0,
            "os": self.os,
            "loadavg_at_start": self.loadavg,
            "loadavg_at_end": self.loadavg_end,
        })
    }
}
