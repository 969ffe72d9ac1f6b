//! Argument groups shared by the commands that take a pod.
use std::net::Ipv4Addr;

use anyhow::{bail, Result};

use crate::topology::pod::{locate, PodLocation, PodRef};

/// `POD` as every command takes it: `NAME`, `NAMESPACE/NAME`, `--pid PID` or `--netns PATH|NAME`.
#[derive(clap::Args, Debug, Clone)]
pub struct PodArgs {
    /// The pod: NAME or NAMESPACE/NAME (lab pods by name; see --pid/--netns otherwise).
    #[arg(value_name = "POD")]
    pub pod: Option<String>,
    /// The pod by a process in it.
    #[arg(long, value_name = "PID", conflicts_with_all = ["pod", "netns"])]
    pub pid: Option<u32>,
    /// The pod by its network namespace: a path or a name in /run/netns.
    #[arg(long, value_name = "PATH|NAME", conflicts_with_all = ["pod", "pid"])]
    pub netns: Option<String>,
    /// Which lab, when several are up (their --prefix).
    #[arg(long, value_name = "PREFIX")]
    pub lab: Option<String>,
}

impl PodArgs {
    pub fn pod_ref(&self) -> Result<PodRef> {
        match (&self.pod, self.pid, &self.netns) {
            (Some(name), None, None) => PodRef::parse_name(name),
            (None, Some(pid), None) => Ok(PodRef::Pid(pid)),
            (None, None, Some(ns)) => Ok(PodRef::Netns(ns.clone())),
            (None, None, None) => bail!("name a pod: POD, --pid PID or --netns PATH|NAME"),
            _ => bail!("name the pod one way only: POD, --pid or --netns"),
        }
    }

    pub fn locate(&self) -> Result<PodLocation> {
        locate(&self.pod_ref()?, self.lab.as_deref())
    }
}

/// Parses `--dst` with a clear message.
pub fn parse_ipv4(s: &str) -> Result<Ipv4Addr, String> {
    s.parse::<Ipv4Addr>()
        .map_err(|_| format!("{s:?} is not an IPv4 address"))
}
