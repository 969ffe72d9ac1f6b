//! Argument groups shared by the commands that take a pod.
use std::{path::PathBuf, time::Duration};

use podtrace_abi::MAX_SNAPLEN;

use anyhow::{bail, Result};

pub use crate::parse::{parse_duration, parse_file_size, parse_ipv4, parse_proto};
use crate::{
    lab::resolver::LabResolver,
    pcap::CaptureFormat,
    pods::{
        cri::CriResolver,
        process::{ByNetns, ByPid},
        Chain, PodLocation, PodRef,
    },
    remote::{parse_agents, AgentsConfig, Credentials},
};

/// `POD` as every command takes it: `NAME`, `NAMESPACE/NAME`, `--pid PID`, `--netns PATH|NAME`
/// or `--container ID`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct PodArgs {
    /// The pod: NAME or NAMESPACE/NAME (a lab pod, else a pod of the container runtime).
    #[arg(value_name = "POD")]
    pub pod: Option<String>,
    /// The pod by a process in it.
    #[arg(long, value_name = "PID", conflicts_with_all = ["pod", "netns", "container"])]
    pub pid: Option<u32>,
    /// The pod by its network namespace: a path or a name in /run/netns.
    #[arg(long, value_name = "PATH|NAME", conflicts_with_all = ["pod", "pid", "container"])]
    pub netns: Option<String>,
    /// The pod by one of its containers, through the container runtime: a container ID or a
    /// unique prefix of one, as crictl takes it (a pod sandbox ID works too).
    #[arg(long, value_name = "ID", conflicts_with_all = ["pod", "pid", "netns"])]
    pub container: Option<String>,
    /// The container runtime's CRI socket, as crictl's: unix:///PATH or PATH (default:
    /// $CONTAINER_RUNTIME_ENDPOINT, else the containerd, CRI-O, cri-dockerd and k3s sockets
    /// that exist and those of every runtime process, kind nodes' included). Given, POD is
    /// looked up there only (a --dst pod there first, then in the machine's other runtimes).
    #[arg(long, value_name = "SOCK", conflicts_with_all = ["pid", "netns"])]
    pub runtime_endpoint: Option<String>,
    /// Which lab, when several are up (their --prefix).
    #[arg(long, value_name = "PREFIX")]
    pub lab: Option<String>,
}

impl PodArgs {
    pub fn pod_ref(&self) -> Result<PodRef> {
        match (&self.pod, self.pid, &self.netns, &self.container) {
            (Some(name), None, None, None) => PodRef::parse_name(name),
            (None, Some(pid), None, None) => Ok(PodRef::Pid(pid)),
            (None, None, Some(ns), None) => Ok(PodRef::Netns(ns.clone())),
            (None, None, None, Some(id)) => Ok(PodRef::Container(id.clone())),
            (None, None, None, None) => {
                bail!("name a pod: POD, --pid PID, --netns PATH|NAME or --container ID")
            }
            _ => bail!("name the pod one way only: POD, --pid, --netns or --container"),
        }
    }

    /// The resolvers this command looks pods up with: the lab's registry (unless a runtime
    /// endpoint was named: then only that runtime finds pods, the lab only names its nodes),
    /// the container runtime, then pids and namespace paths.
    pub fn resolvers(&self) -> Chain {
        Chain::new()
            .with(
                LabResolver::new(self.lab.as_deref()).finding_pods(self.runtime_endpoint.is_none()),
            )
            .with(CriResolver::new(self.runtime_endpoint.as_deref()))
            .with(ByPid)
            .with(ByNetns)
    }

    /// Finds the pod through `chain` (see [`PodArgs::resolvers`]).
    pub fn locate(&self, chain: &Chain) -> Result<PodLocation> {
        if self.runtime_endpoint.is_some() && (self.pid.is_some() || self.netns.is_some()) {
            bail!("--runtime-endpoint goes with POD or --container, not --pid or --netns");
        }
        chain.locate(&self.pod_ref()?)
    }
}

/// Output flags shared by `capture` and `follow -w`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct OutputArgs {
    /// Write packets to FILE (pcapng unless --format pcap).
    #[arg(short = 'w', value_name = "FILE")]
    pub write: Option<PathBuf>,
    /// Rotate when a file would exceed MB million bytes.
    #[arg(short = 'C', value_name = "MB", value_parser = parse_file_size, requires = "write")]
    pub file_size: Option<u64>,
    /// Rotate every DUR (90, 90s, 10m, 1h); FILE may hold strftime patterns.
    #[arg(short = 'G', value_name = "DUR", value_parser = parse_duration, requires = "write")]
    pub rotate_every: Option<Duration>,
    /// Keep at most N files, as a ring (the oldest is overwritten).
    #[arg(short = 'W', value_name = "N", requires = "write")]
    pub file_count: Option<u32>,
    /// pcapng (default: one interface per hop, direction per packet) or pcap.
    #[arg(
        long,
        value_name = "pcapng|pcap",
        default_value = "pcapng",
        requires = "write"
    )]
    pub format: CaptureFormat,
    /// Bytes of each packet to keep (0 or unset: whole packets, up to 65536).
    #[arg(short = 's', value_name = "SNAPLEN", requires = "write")]
    pub snaplen: Option<u32>,
    /// When packets come faster than the files can take them, the kernel's ring buffer has no
    /// room for a whole packet: cut keeps its first 128 bytes (its headers, counted as cut),
    /// drop loses it (counted as lost).
    #[arg(
        long,
        value_enum,
        value_name = "cut|drop",
        default_value = "cut",
        requires = "write"
    )]
    pub overload: crate::trace::Overload,
}

impl OutputArgs {
    /// Where and how to write, when `-w` was given (the rotation flags checked).
    pub fn sink_options(&self) -> Result<Option<crate::pcap::sink::SinkOptions>> {
        let Some(path) = self.write.clone() else {
            return Ok(None);
        };
        Ok(Some(crate::pcap::sink::SinkOptions {
            path,
            format: self.format,
            policy: crate::pcap::RotationPolicy::from_flags(
                self.file_size,
                self.rotate_every,
                self.file_count,
            )?,
            snaplen: self.kernel_snaplen(),
        }))
    }

    /// The snap length the kernel applies.
    pub fn kernel_snaplen(&self) -> u32 {
        match self.snaplen {
            None | Some(0) => MAX_SNAPLEN,
            Some(n) => n.min(MAX_SNAPLEN),
        }
    }
}

/// `--hooks kprobe|tracepoint`, for the commands that attach kernel hooks.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct HookArgs {
    /// Take the kernel-side evidence (drops, FIB lookups, device transmit) only through this
    /// mechanism: kprobe, or tracepoint (tp_btf). Default: tracepoints, and kprobes where the
    /// kernel lacks a tracepoint.
    #[arg(long, value_name = "kprobe|tracepoint", value_parser = crate::probes::hooks::Mechanism::parse)]
    pub hooks: Option<crate::probes::hooks::Mechanism>,
}

/// How a command reaches agents (flattened into topo, follow, capture, verify).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RemoteArgs {
    /// Run through node agents: NODE=ENDPOINT[,NODE=ENDPOINT…], ENDPOINT being unix:PATH or
    /// tcp:ADDR:PORT. (A lab brought up with --agents is used this way by default.)
    #[arg(long, value_name = "NODE=ENDPOINT,…", conflicts_with = "no_agents")]
    pub agents: Option<String>,
    /// The agents as a JSON file: {"agents":[{"node","endpoint","via_netns"}],"credentials":{…}}.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["agents", "no_agents"])]
    pub agents_config: Option<PathBuf>,
    /// The agents' CA (TLS to TCP endpoints).
    #[arg(long, value_name = "FILE")]
    pub agent_ca: Option<PathBuf>,
    /// This client's certificate (mutual TLS).
    #[arg(long, value_name = "FILE", requires = "agent_key")]
    pub agent_cert: Option<PathBuf>,
    /// This client's key.
    #[arg(long, value_name = "FILE", requires = "agent_cert")]
    pub agent_key: Option<PathBuf>,
    /// The bearer token the agents expect, from a file.
    #[arg(long, value_name = "FILE")]
    pub agent_token_file: Option<PathBuf>,
    /// Trace in this process even when the lab has agents.
    #[arg(long)]
    pub no_agents: bool,
    /// The agents chosen by the caller (`kubectl podtrace`: the DaemonSet's pods, reached
    /// through the API server); not a flag.
    #[arg(skip)]
    pub given: Option<AgentsConfig>,
}

impl RemoteArgs {
    /// The agents to use, if any: --agents / --agents-config, else those of the lab in use
    /// (unless --no-agents).
    pub fn config(&self, lab: Option<&str>) -> Result<Option<AgentsConfig>> {
        if let Some(c) = &self.given {
            return Ok(Some(c.clone()));
        }
        let mut cfg = if let Some(s) = &self.agents {
            AgentsConfig {
                agents: parse_agents(s)?,
                credentials: Credentials::default(),
                dialer: None,
            }
        } else if let Some(p) = &self.agents_config {
            AgentsConfig::load(p)?
        } else if self.no_agents {
            return Ok(None);
        } else {
            match crate::lab::agents::config_of(lab)? {
                Some(c) => c,
                None => return Ok(None),
            }
        };
        let c = &mut cfg.credentials;
        if self.agent_ca.is_some() {
            c.ca = self.agent_ca.clone();
        }
        if self.agent_cert.is_some() {
            c.cert = self.agent_cert.clone();
            c.key = self.agent_key.clone();
        }
        if self.agent_token_file.is_some() {
            c.token_file = self.agent_token_file.clone();
        }
        Ok(Some(cfg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("10x").is_err());
        assert!(parse_duration("abc").is_err());
    }

    #[test]
    fn protocols() {
        assert_eq!(parse_proto("udp").unwrap(), 17);
        assert!(parse_proto("sctp").is_err());
    }
}
