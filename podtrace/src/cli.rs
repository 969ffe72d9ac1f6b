//! Argument groups shared by the commands that take a pod.
use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use podtrace_abi::MAX_SNAPLEN;

use anyhow::{bail, Result};

use crate::{
    lab::resolver::LabResolver,
    pcap::CaptureFormat,
    pods::{
        cri::CriResolver,
        process::{ByNetns, ByPid},
        Chain, PodLocation, PodRef,
    },
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
    #[arg(short = 'C', value_name = "MB", requires = "write")]
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

/// Parses `--dst` with a clear message.
pub fn parse_ipv4(s: &str) -> Result<Ipv4Addr, String> {
    s.parse::<Ipv4Addr>()
        .map_err(|_| format!("{s:?} is not an IPv4 address"))
}

/// Parses a duration as tcpdump users write it: `90` (seconds), `90s`, `10m`, `1h`, `500ms`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (use 90, 90s, 10m, 1h)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?} is not a duration (use 90, 90s, 10m, 1h)")),
    };
    if !(secs > 0.0 && secs.is_finite()) {
        return Err(format!("{s:?}: a duration must be positive"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

/// `--proto tcp|udp|icmp` → IP protocol number.
pub fn parse_proto(s: &str) -> Result<u8, String> {
    match s {
        "tcp" => Ok(6),
        "udp" => Ok(17),
        "icmp" => Ok(1),
        _ => Err(format!("{s:?} is not one of tcp, udp, icmp")),
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
