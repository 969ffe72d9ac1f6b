//! Pods given by a process (`--pid`) or by their namespace (`--netns PATH|NAME`).
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

use super::{hostname, Lookup, PodLocation, PodRef, Resolver};

/// `--pid PID`: the namespace of `/proc/PID/ns/net`.
pub struct ByPid;

/// `--netns PATH|NAME`: that namespace file (a name is looked up in /run/netns).
pub struct ByNetns;

fn unnamed(name: String, netns: PathBuf, source: &str) -> PodLocation {
    PodLocation {
        name,
        namespace: "-".to_owned(),
        netns,
        node: hostname(),
        node_netns: None,
        source: source.to_owned(),
        entered_by: None,
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
        let netns = crate::netns::resolve(&format!("/proc/{pid}/ns/net"))
            .with_context(|| format!("network namespace of pid {pid}"))?;
        let name = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|s| format!("pid-{pid}-{}", s.trim()))
            .unwrap_or_else(|_| format!("pid-{pid}"));
        Ok(Lookup::Found(unnamed(name, netns, "pid")))
    }
}

impl Resolver for ByNetns {
    fn find(&self, pod: &PodRef) -> Result<Lookup> {
        let PodRef::Netns(spec) = pod else {
            return Ok(Lookup::NotMine);
        };
        let netns = crate::netns::resolve(spec)?;
        let name = netns
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| spec.clone());
        Ok(Lookup::Found(unnamed(name, netns, "netns")))
    }
}
