//! Pods given by a process (`--pid`) or by their namespace (`--netns PATH|NAME`).
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

use super::{hostname, Lookup, PodLocation, PodRef, Resolver};

/// `--pid PID`: the namespace of `/proc/PID/ns/net`.
pub struct ByPid;

/// `--netns PATH|NAME`: that namespace file (a name is looked up in /run/netns).
pub struct ByNetns;

fn unnamed(name: String, netns: PathBuf, source: &str, entered_by: String) -> PodLocation {
    PodLocation {
        name,
        namespace: "-".to_owned(),
        netns,
        node: hostname(),
        node_netns: None,
        source: source.to_owned(),
        entered_by: Some(entered_by),
        node_named_by: None,
    }
}

/// `pid-PID-COMM`, the name of a pod known only by a process.
fn pid_name(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| format!("pid-{pid}-{}", s.trim()))
        .unwrap_or_else(|_| format!("pid-{pid}"))
}

/// The pid in a `/proc/PID/ns/net` path (`/proc/PID/task/TID/ns/net` too).
pub fn pid_of_ns_path(p: &Path) -> Option<u32> {
    let rest = p.strip_prefix("/proc").ok()?;
    let mut parts = rest.iter().map(|c| c.to_str());
    let pid = parts.next()??.parse().ok()?;
    let tail: Vec<&str> = parts.collect::<Option<_>>()?;
    match tail.as_slice() {
        ["ns", "net"] | ["task", _, "ns", "net"] => Some(pid),
        _ => None,
    }
}

impl Resolver for ByPid {
    fn find(&self, pod: &PodRef) -> Result<Lookup> {
        let PodRef::Pid(pid) = pod else {
            return Ok(Lookup::NotMine);
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            bail!("no process with pid {pid}");
        }
        let path = format!("/proc/{pid}/ns/net");
        let netns = crate::netns::resolve(&path).with_context(|| {
            if Path::new(&format!("/proc/{pid}")).exists() {
                format!("network namespace of pid {pid}")
            } else {
                format!("pid {pid} exited while podtrace was looking it up")
            }
        })?;
        Ok(Lookup::Found(unnamed(
            pid_name(*pid),
            netns,
            "pid",
            format!("through pid {pid} ({path})"),
        )))
    }
}

impl Resolver for ByNetns {
    fn find(&self, pod: &PodRef) -> Result<Lookup> {
        let PodRef::Netns(spec) = pod else {
            return Ok(Lookup::NotMine);
        };
        let netns = crate::netns::resolve(spec)?;
        let name = match pid_of_ns_path(&netns) {
            Some(pid) => pid_name(pid),
            None => netns
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| spec.clone()),
        };
        let how = format!("through the namespace file {}", netns.display());
        Ok(Lookup::Found(unnamed(name, netns, "netns", how)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pids_in_namespace_paths() {
        assert_eq!(pid_of_ns_path(Path::new("/proc/4242/ns/net")), Some(4242));
        assert_eq!(
            pid_of_ns_path(Path::new("/proc/4242/task/4243/ns/net")),
            Some(4242)
        );
        assert_eq!(pid_of_ns_path(Path::new("/proc/self/ns/net")), None);
        assert_eq!(pid_of_ns_path(Path::new("/proc/4242/ns/uts")), None);
        assert_eq!(pid_of_ns_path(Path::new("/run/netns/pod-a1")), None);
    }
}
