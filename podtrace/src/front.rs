//! Where a command's path is resolved and its session runs: in this process (the pod's node
//! is this machine, or the lab is), or through the node agents of the nodes involved
//! (`--agents`, a lab with agents). `topo`, `follow`, `capture` and `verify` call these and
//! do not care which.
use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use anyhow::Result;

use crate::{
    cli::PodArgs,
    cli::RemoteArgs,
    remote::Fleet,
    topology::{self, Topology},
    trace::{run::Session, Engine, Events, Plan, StartInfo, TraceOptions},
};

/// A resolved path, and how to trace it.
pub struct Resolved {
    pub topo: Topology,
    /// Namespaces whose disappearance ends a run (the pod's, when it is local).
    pub watch: Vec<PathBuf>,
    /// Parts of the path no agent could observe.
    pub unobserved: Vec<String>,
    fleet: Option<Fleet>,
}

/// Finds the pod and resolves its path towards `dst` through what the pod's node rewrites it
/// to (a Service's backends, a masquerade: [`crate::services::path`]), with the plan for it;
/// `None` for the plan when the node rewrites nothing (or the path is resolved through
/// agents, which do not read the nodes' rules yet): then the plain path applies.
pub fn resolve_nat(
    pod: &PodArgs,
    remote: &RemoteArgs,
    dst: Ipv4Addr,
    port: Option<u16>,
    proto: Option<u8>,
) -> Result<(Resolved, Option<Plan>)> {
    if remote.config(pod.lab.as_deref())?.is_none() {
        let chain = pod.resolvers();
        let loc = pod.locate(&chain)?;
        if let Some(p) = crate::services::path::plan(&loc, dst, port, proto, &chain)? {
            return Ok((
                Resolved {
                    topo: p.topo,
                    watch: vec![loc.netns],
                    unobserved: Vec::new(),
                    fleet: None,
                },
                Some(p.plan),
            ));
        }
    }
    Ok((resolve(pod, remote, Some(dst))?, None))
}

/// Finds the pod and resolves its path towards `dst`, here or through agents.
pub fn resolve(pod: &PodArgs, remote: &RemoteArgs, dst: Option<Ipv4Addr>) -> Result<Resolved> {
    if let Some(cfg) = remote.config(pod.lab.as_deref())? {
        let fleet = Fleet::connect(&cfg)?;
        let r = fleet.resolve(&pod.pod_ref()?, dst)?;
        return Ok(Resolved {
            topo: r.topology,
            watch: Vec::new(),
            unobserved: r.unobserved,
            fleet: Some(fleet),
        });
    }
    let chain = pod.resolvers();
    let loc = pod.locate(&chain)?;
    let dest = dst.and_then(|ip| chain.by_ip(ip));
    let topo = topology::resolve(&loc, dst, dest.as_ref(), &chain)?;
    Ok(Resolved {
        topo,
        watch: vec![loc.netns],
        unobserved: Vec::new(),
        fleet: None,
    })
}

/// A started session.
pub struct Started {
    pub session: Box<dyn Session>,
    pub events: Events,
    /// What started on each node (one entry when local).
    pub nodes: Vec<(String, StartInfo)>,
    /// Widens the kernel filter to translated forms learnt while the session runs (local
    /// sessions).
    pub nat_flows: Option<crate::probes::nat::NatFlows>,
}

impl Started {
    /// The first node's start (the pod's node), for the one-line summaries.
    pub fn info(&self) -> &StartInfo {
        &self.nodes[0].1
    }

    /// The slowest node's load and attach times.
    pub fn times(&self) -> (f64, f64) {
        self.nodes.iter().fold((0.0, 0.0), |(l, a), (_, i)| {
            (l.max(i.load_ms), a.max(i.attach_ms))
        })
    }

    /// `drops via …` per node when they differ.
    pub fn hooks_line(&self) -> String {
        let first = self.info().hooks_line();
        if self.nodes.iter().all(|(_, i)| i.hooks_line() == first) {
            first
        } else {
            self.nodes
                .iter()
                .map(|(n, i)| format!("{n}: {}", i.hooks_line()))
                .collect::<Vec<_>>()
                .join("; ")
        }
    }
}

impl Resolved {
    /// Whether the session runs through agents.
    pub fn remote(&self) -> bool {
        self.fleet.is_some()
    }

    /// Starts the session for `plan` (`duration` bounds the agents' sessions too).
    pub fn start(
        &self,
        plan: &Plan,
        opts: &TraceOptions,
        duration: Option<Duration>,
    ) -> Result<Started> {
        match &self.fleet {
            Some(fleet) => {
                // The agents' own clocks end their sessions a little after ours does.
                let bound = duration.map(|d| d + Duration::from_secs(5));
                let (session, events, nodes) = fleet.trace(plan, opts, bound)?;
                Ok(Started {
                    session: Box::new(session),
                    events,
                    nodes,
                    nat_flows: None,
                })
            }
            None => {
                let (mut engine, events) = Engine::start(plan, opts)?;
                let info = engine.info.clone();
                let nat_flows = engine.nat_flows();
                Ok(Started {
                    session: Box::new(engine),
                    events,
                    nodes: vec![(self.topo.pod.node.clone(), info)],
                    nat_flows,
                })
            }
        }
    }
}

/// Destinations no path leads to, refused before anything is resolved or attached (one line,
/// exit 2): the unspecified address, loopback, the limited broadcast address, multicast.
pub fn refuse_destination(dst: Ipv4Addr) -> Result<()> {
    let why = if dst.is_unspecified() {
        "the unspecified address"
    } else if dst.is_loopback() {
        "a loopback address (a pod's packets to it never leave the pod)"
    } else if dst.is_broadcast() {
        "the limited broadcast address (it is delivered on the pod's own link, not routed)"
    } else if dst.is_multicast() {
        "a multicast address (podtrace follows unicast paths)"
    } else {
        return Ok(());
    };
    anyhow::bail!(
        "--dst {dst} is {why}: there is no path to follow; give the unicast address of a pod, a Service or a host"
    )
}

/// A `--dst` that is the broadcast address of a subnet of the pod or of its node (a directed
/// broadcast is delivered on that link, never along a path): one line, exit 2.
pub fn refuse_directed_broadcast(topo: &crate::topology::Topology, dst: Ipv4Addr) -> Result<()> {
    for ns in [&topo.pod.netns, &topo.pod.node_netns] {
        let Some(snap) = topo.namespaces.cached(std::path::Path::new(ns)) else {
            continue;
        };
        for a in &snap.addrs {
            if a.prefix == 0 || a.prefix >= 31 {
                continue;
            }
            let mask = u32::MAX << (32 - u32::from(a.prefix));
            let bcast = (u32::from(a.ip) & mask) | !mask;
            if u32::from(dst) == bcast {
                anyhow::bail!(
                    "--dst {dst} is the broadcast address of {}/{} (on {}): a broadcast is delivered on that link, not along a path; give the unicast address of a pod, a Service or a host",
                    Ipv4Addr::from(u32::from(a.ip) & mask),
                    a.prefix,
                    if ns == &topo.pod.netns { topo.pod.name.as_str() } else { topo.pod.node.as_str() }
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_without_a_path_are_refused_in_one_line() {
        for (dst, says) in [
            ("0.0.0.0", "unspecified"),
            ("127.0.0.1", "loopback"),
            ("255.255.255.255", "limited broadcast"),
            ("224.0.0.1", "multicast"),
        ] {
            let e = refuse_destination(dst.parse().unwrap()).unwrap_err();
            let line = format!("{e:#}");
            assert!(line.contains(says) && !line.contains('\n'), "{line}");
        }
        for ok in ["10.244.1.5", "10.96.0.10", "192.0.2.1"] {
            refuse_destination(ok.parse().unwrap()).unwrap();
        }
    }
}
