//! Processes, namespaces and cgroups of a cluster, found by identity: a process belongs to a
//! node when its network or mount namespace is that node's (same device and inode as the
//! namespace file), or when it is in the node's cgroups (its pods); to the control plane when
//! its network namespace is the control plane's. Only such processes are signalled, by pid.
use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

/// The (device, inode) identity of a namespace file (/run/netns/X, a mount namespace bind,
/// /proc/PID/ns/net); None when it is missing.
pub fn ns_id(path: &Path) -> Option<(u64, u64)> {
    fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Every pid on the machine.
fn all_pids() -> Vec<i32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// Whether `pid` is gone or a zombie.
fn dead(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state == "Z" || state == "X"),
    }
}

/// The live pids in any of the namespaces `ids` (net or mnt, compared by identity).
pub fn pids_in_namespaces(ids: &[(u64, u64)]) -> BTreeSet<i32> {
    let me = std::process::id() as i32;
    all_pids()
        .into_iter()
        .filter(|&pid| pid != me && !dead(pid))
        .filter(|&pid| {
            ["net", "mnt"].iter().any(|kind| {
                ns_id(Path::new(&format!("/proc/{pid}/ns/{kind}")))
                    .is_some_and(|id| ids.contains(&id))
            })
        })
        .collect()
}

/// The cgroup v1 hierarchies and the unified one (each directory under /sys/fs/cgroup that
/// is a cgroup mount).
pub fn hierarchies() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("cgroup.procs").exists())
        .collect();
    if out.is_empty() && Path::new("/sys/fs/cgroup/cgroup.procs").exists() {
        // Pure cgroup v2.
        out.push(PathBuf::from("/sys/fs/cgroup"));
    }
    out.sort();
    out
}

/// The live pids in the cgroup `root` (e.g. `/k8s-node-a`) and below, in any hierarchy.
pub fn pids_in_cgroup(root: &str) -> BTreeSet<i32> {
    let mut pids = BTreeSet::new();
    for h in hierarchies() {
        let mut stack = vec![h.join(root.trim_start_matches('/'))];
        while let Some(dir) = stack.pop() {
            if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
                pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
            for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
    }
    pids.retain(|&p| !dead(p));
    pids
}

/// SIGKILLs `pids` and waits (up to 10 s) until they are gone.
pub fn kill_all(pids: &BTreeSet<i32>) -> Result<()> {
    for &pid in pids {
        // SAFETY: plain syscall.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|&p| !dead(p)) {
        if Instant::now() > deadline {
            let left: Vec<String> = pids
                .iter()
                .filter(|&&p| !dead(p))
                .map(|p| p.to_string())
                .collect();
            bail!("processes {} survived SIGKILL for 10 s", left.join(", "));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Creates the cgroup `root` in every hierarchy (cpuset.cpus and cpuset.mems copied from the
/// top, as kubelet wants its cgroupRoot ready in each).
pub fn create_cgroup(root: &str) -> Result<()> {
    let rel = root.trim_start_matches('/');
    for h in hierarchies() {
        let dir = h.join(rel);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // cgroup v1's cpuset: a new cgroup starts with no CPUs and no memory nodes.
        for f in ["cpuset.cpus", "cpuset.mems"] {
            let (Ok(top), Ok(own)) = (
                fs::read_to_string(h.join(f)),
                fs::read_to_string(dir.join(f)),
            ) else {
                continue;
            };
            if own.trim().is_empty() && !top.trim().is_empty() {
                fs::write(dir.join(f), top.trim())
                    .with_context(|| format!("writing {}", dir.join(f).display()))?;
            }
        }
    }
    Ok(())
}

/// Removes the cgroup `root` and everything below it in every hierarchy (its processes
/// must be gone). Retries briefly: a cgroup is busy for a moment after its last process died.
pub fn remove_cgroup(root: &str) -> Result<()> {
    let rel = root.trim_start_matches('/');
    let mut first_err = None;
    for h in hierarchies() {
        let top = h.join(rel);
        if !top.exists() {
            continue;
        }
        // Depth first: children before parents.
        let mut dirs = Vec::new();
        let mut stack = vec![top];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
            dirs.push(d);
        }
        for d in dirs.iter().rev() {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) if Instant::now() < deadline => {
                        let _ = e;
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => {
                        first_err.get_or_insert(anyhow::anyhow!("removing {}: {e}", d.display()));
                        break;
                    }
                }
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Whether `path` is a mount point (in this process's mount namespace).
pub fn is_mountpoint(path: &Path) -> bool {
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    text.lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .any(|mp| mp == want)
}

/// Unmounts `path` (lazily) while it is a mount point.
pub fn unmount_all(path: &Path) -> Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    for _ in 0..8 {
        if !is_mountpoint(path) {
            return Ok(());
        }
        // SAFETY: plain syscall with a valid C string.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            bail!(
                "unmounting {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// Runs a command to completion; fails with its stderr unless it succeeds.
pub fn run_quiet(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A daemon of the cluster, started in a session of its own (it outlives `k8s up`), output
/// to its log file.
pub struct Daemon {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `args` (program first) with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, args: &[String], log: &Path) -> Result<Self> {
        use std::os::unix::process::CommandExt as _;
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let mut cmd = Command::new(&args[0]);
        cmd.args(&args[1..])
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({})", args[0]))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
        })
    }

    /// An error when the daemon has exited, with the end of its log.
    pub fn check(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); the end of {}:\n{}",
                self.name,
                self.log.display(),
                log_tail(&self.log, 15)
            );
        }
        Ok(())
    }
}

/// The last `n` lines of a log file.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
