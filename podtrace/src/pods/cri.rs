//! Pods through the container runtime's CRI socket (containerd, CRI-O, cri-dockerd, k3s), by
//! name or by container/sandbox ID, in the runtime named or in every runtime of the machine
//! ([`cri::discover`]); the destination of a path by its IP, in the same runtime first, then
//! in the machine's others (another node of a kind-style cluster); the pod behind a `--pid` or
//! `--netns` namespace ([`Resolver::identify`]).
//!
//! The runtime reports each sandbox's network namespace as a path in *its* mount namespace
//! (`/run/netns/cni-…`, or under its state dir), which podtrace may not see: a runtime in a
//! mount namespace of its own (a kind-style node), or podtrace in a DaemonSet container. Then
//! podtrace enters the sandbox through its pid (`/proc/PID/ns/net`, visible with the host's PID
//! namespace; a pid of a runtime with a PID namespace of its own is translated first) and says
//! so ([`sandbox_netns`]). The node is the runtime's network namespace, named by
//! [`super::node`]'s rules.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Mutex,
};

use anyhow::{bail, Result};

use super::{hostname, node, Lookup, PodLocation, PodRef, Resolver};
use crate::cri::{
    self,
    machine::{self, PidHere},
    Client, CriPod, Endpoint, Endpoints,
};

/// Finds pods through CRI.
pub struct CriResolver {
    /// `--runtime-endpoint`, if given.
    explicit: Option<String>,
    /// The runtime the pod of this command was found in: its destination is looked up there.
    used: Mutex<Option<Endpoint>>,
}

impl CriResolver {
    pub fn new(explicit: Option<&str>) -> Self {
        Self {
            explicit: explicit.map(str::to_owned),
            used: Mutex::new(None),
        }
    }

    fn endpoints(&self) -> Result<Endpoints> {
        cri::discover(self.explicit.as_deref())
    }

    /// The pod of this command, found in `p.endpoint`: its destination is looked up there
    /// first.
    fn location(&self, p: CriPod) -> Result<PodLocation> {
        if let Ok(mut u) = self.used.lock() {
            *u = Some(p.endpoint.clone());
        }
        located(p)
    }
}

/// Where a CRI pod's network is, and its node.
fn located(p: CriPod) -> Result<PodLocation> {
    let (netns, entered_by) = sandbox_netns(&p)?;
    let (node, node_netns, node_named_by) = node_of(&p);
    Ok(PodLocation {
        source: format!("cri:{}", p.endpoint),
        name: p.name,
        namespace: p.namespace,
        netns,
        node,
        node_netns,
        entered_by: Some(entered_by),
        node_named_by,
    })
}

/// The ready pods of runtime `ep`, or none (logged) when it cannot be asked.
fn ready_pods(ep: &Endpoint) -> Vec<CriPod> {
    cri::block_on(async {
        let mut client = Client::connect(ep).await?;
        cri::ready_pods(&mut client).await
    })
    .map_err(|e| log::debug!("listing the pods of {ep}: {e:#}"))
    .unwrap_or_default()
}

/// What to look for in a runtime.
enum Search<'a> {
    Name {
        namespace: Option<&'a str>,
        name: &'a str,
    },
    Id(&'a str),
}

impl Resolver for CriResolver {
    fn find(&self, pod: &PodRef) -> Result<Lookup> {
        let (search, what) = match pod {
            PodRef::Name { namespace, name } => (
                Search::Name {
                    namespace: namespace.as_deref(),
                    name,
                },
                pod.shown(),
            ),
            PodRef::Container(id) => {
                if id.is_empty() {
                    bail!("--container needs an ID (or a prefix of one)");
                }
                (
                    Search::Id(id),
                    format!("container or pod sandbox with an ID starting {id:?}"),
                )
            }
            PodRef::Pid(_) | PodRef::Netns(_) => return Ok(Lookup::NotMine),
        };
        let eps = self.endpoints()?;
        if eps.list().is_empty() {
            return Ok(Lookup::Missing(format!(
                "no container runtime found: no socket at {} and no {} process (name one with --runtime-endpoint)",
                cri::default_paths(),
                machine::RUNTIME_COMMS.join(", ")
            )));
        }
        let (mut found, searched) = search_runtimes(&eps, &what, &search)?;
        match found.len() {
            0 => Ok(Lookup::Missing(searched.join("; "))),
            1 => Ok(Lookup::Found(self.location(found.remove(0))?)),
            n => match search {
                Search::Name { .. } => bail!(
                    "{what} matches {n} pods: {}; name one as NAMESPACE/NAME, with --container ID or with --runtime-endpoint",
                    found
                        .iter()
                        .map(|p| format!("{} in {}", p.describe(), p.endpoint))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                Search::Id(id) => bail!(
                    "container ID {id:?} is ambiguous: {n} match: {}; give more of the ID",
                    found
                        .iter()
                        .map(CriPod::describe)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            },
        }
    }

    /// The destination of a CRI pod's path: a pod of the same runtime first, else of another
    /// runtime of this machine (another node of a kind-style cluster) when exactly one has it.
    fn by_ip(&self, ip: Ipv4Addr) -> Option<PodLocation> {
        let with_ip = |ep: &Endpoint| {
            ready_pods(ep)
                .into_iter()
                .filter(|p| p.ip == Some(ip) && !p.host_network)
                .collect::<Vec<_>>()
        };
        let used = self.used.lock().ok()?.clone();
        let Some(used) = used else {
            // No pod of this command was found here first (an agent asked for the address
            // alone: the node at the far end of a path): the runtimes this resolver searches
            // for names, when exactly one pod has it.
            let eps = self.endpoints().ok()?;
            let mut found: Vec<CriPod> = eps.list().iter().flat_map(with_ip).collect();
            return match found.len() {
                1 => located(found.remove(0))
                    .map_err(|e| log::debug!("destination {ip}: {e:#}"))
                    .ok(),
                _ => None,
            };
        };
        if let Some(p) = with_ip(&used).into_iter().next() {
            return located(p)
                .map_err(|e| log::debug!("destination {ip}: {e:#}"))
                .ok();
        }
        let used_id = machine::socket_id(used.path());
        let mut found: Vec<CriPod> = cri::machine_endpoints()
            .iter()
            .filter(|ep| used_id.is_none() || machine::socket_id(ep.path()) != used_id)
            .flat_map(with_ip)
            .collect();
        match found.len() {
            1 => located(found.remove(0))
                .map_err(|e| log::debug!("destination {ip}: {e:#}"))
                .ok(),
            0 => None,
            n => {
                log::debug!(
                    "destination {ip}: {n} pods of other runtimes have it ({}); not observing its side",
                    found
                        .iter()
                        .map(|p| format!("{} in {}", p.display_name(), p.endpoint))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                None
            }
        }
    }

    /// The CRI pod whose network namespace is `netns` (a `--pid` or `--netns` pod), in any
    /// runtime of this machine.
    fn identify(&self, netns: &Path) -> Option<PodLocation> {
        let target = crate::netns::inode_of(netns).ok()?;
        for ep in self.endpoints().ok()?.list() {
            for p in ready_pods(&ep) {
                let Ok((ns, _)) = sandbox_netns(&p) else {
                    continue;
                };
                if crate::netns::inode_of(&ns).ok() == Some(target) {
                    return self.location(p).ok();
                }
            }
        }
        None
    }
}

/// Searches every endpoint. An explicit endpoint's failure is the error; with discovered
/// sockets a failing runtime is reported only when nothing was found elsewhere. Returns the
/// matches and what was searched without result (for "not found" messages).
fn search_runtimes(
    eps: &Endpoints,
    what: &str,
    search: &Search<'_>,
) -> Result<(Vec<CriPod>, Vec<String>)> {
    let mut found = Vec::new();
    let mut searched = Vec::new();
    for ep in eps.list() {
        let result = cri::block_on(async {
            let mut client = Client::connect(&ep).await?;
            let pods = match *search {
                Search::Name { namespace, name } => {
                    cri::pods_named(&mut client, namespace, name).await?
                }
                Search::Id(prefix) => cri::by_id_prefix(&mut client, prefix).await?,
            };
            Ok((pods, client.version().clone()))
        });
        match result {
            Ok((pods, v)) => {
                if pods.is_empty() {
                    searched.push(format!("no {what} in {ep} ({} {})", v.name, v.version));
                }
                found.extend(pods);
            }
            Err(e) if matches!(eps, Endpoints::Given(_)) => return Err(e),
            Err(e) => searched.push(format!("{e:#}")),
        }
    }
    Ok((found, searched))
}

/// The sandbox's network namespace as podtrace can open it, and how it was entered: the
/// runtime's path when that is a network namespace here, else the namespace of the sandbox's
/// process (or, for `--container`, the container's), translated into podtrace's PID namespace
/// when the runtime has one of its own ([`cri::machine::pid_here`]).
///
/// A sandbox that stopped after the runtime reported it (its process gone, its path no longer
/// a namespace) is one clear error.
pub fn sandbox_netns(p: &CriPod) -> Result<(PathBuf, String)> {
    p.check_usable()?;
    let path_problem = match &p.netns {
        Some(path) => match crate::netns::resolve(&path.to_string_lossy()) {
            Ok(ns) => {
                let how = format!("through the runtime's path {}", path.display());
                return Ok((ns, how));
            }
            Err(_) => Some(format!(
                "the runtime's path {} is not a network namespace here (the runtime has a mount namespace of its own)",
                path.display()
            )),
        },
        None => Some("the runtime reports no namespace path".to_owned()),
    };
    let problem = path_problem.unwrap_or_default();
    let container = p.container.as_ref().map(|(_, name)| name.as_str());
    let pids = [
        p.pid.map(|pid| (pid, "the sandbox's pid".to_owned())),
        p.container_pid
            .filter(|c| Some(*c) != p.pid)
            .map(|pid| (pid, format!("container {}'s pid", container.unwrap_or("?")))),
    ];
    let mut gone = Vec::new();
    let mut invisible = Vec::new();
    for (pid, what) in pids.into_iter().flatten() {
        let here = match machine::pid_here(p.runtime_pid, pid) {
            PidHere::Same(h) => (h, format!("{what} {pid}")),
            PidHere::Translated(h) => (
                h,
                format!("{what} {pid} in the runtime's PID namespace, pid {h} here"),
            ),
            PidHere::Gone => {
                gone.push(pid);
                continue;
            }
            PidHere::Invisible => {
                invisible.push(pid);
                continue;
            }
        };
        match crate::netns::resolve(&format!("/proc/{}/ns/net", here.0)) {
            Ok(ns) => return Ok((ns, format!("through {}: {problem}", here.1))),
            // It exited in between.
            Err(_) => gone.push(pid),
        }
    }
    if !gone.is_empty() {
        bail!(
            "pod {} (sandbox {}) stopped while podtrace was looking it up: its process {} is gone and {problem}",
            p.display_name(),
            cri::short(&p.id),
            gone.iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if !invisible.is_empty() {
        bail!(
            "pod {}: {problem}, and the runtime {} runs in a PID namespace podtrace cannot see, so its sandbox pid {} means nothing here: run podtrace in the host's PID namespace (hostPID: true)",
            p.display_name(),
            p.endpoint,
            invisible[0]
        );
    }
    bail!(
        "{} reports no network namespace podtrace can open for pod {} ({problem}; no sandbox pid)",
        p.endpoint,
        p.display_name(),
    )
}

/// The node of a CRI pod: its namespace is the runtime's (its socket's peer pid), named by
/// [`node`]'s rules; [`super::Chain`] renames it when another resolver (the lab) knows it.
fn node_of(p: &CriPod) -> (String, Option<PathBuf>, Option<String>) {
    let Some(runtime_ns) = p.runtime_netns() else {
        // The runtime is in a PID namespace podtrace cannot see: the node is found from the
        // pod's veth.
        return (hostname(), None, None);
    };
    let root = PathBuf::from("/proc/1/ns/net");
    let ino = |p: &Path| crate::netns::inode_of(p).ok();
    let ns = if ino(&root).is_some() && ino(&root) == ino(&runtime_ns) {
        root
    } else {
        runtime_ns
    };
    let named = node::name_of(&ns, p.runtime_pid);
    (named.name, Some(ns), Some(named.how))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cri::{Endpoint, RuntimeVersion};

    fn pod(pid: Option<u32>, netns: Option<&str>) -> CriPod {
        CriPod {
            id: "0123456789abcdef0123".into(),
            name: "doomed".into(),
            namespace: "default".into(),
            uid: "u".into(),
            state: "ready".into(),
            netns: netns.map(PathBuf::from),
            pid,
            container_pid: None,
            ip: None,
            host_network: false,
            container: None,
            endpoint: Endpoint::from_path("/run/x.sock"),
            runtime: RuntimeVersion {
                name: "containerd".into(),
                version: "1.6".into(),
                api_version: "v1".into(),
            },
            // This process stands in for the runtime: same PID namespace.
            runtime_pid: Some(std::process::id()),
        }
    }

    /// A pid that was just used and is gone.
    fn vanished_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    #[test]
    fn a_sandbox_gone_before_its_namespace_was_opened_is_one_clear_line() {
        let pid = vanished_pid();
        let e = sandbox_netns(&pod(Some(pid), Some("/nonexistent/netns/cni-1234"))).unwrap_err();
        let msg = format!("{e:#}");
        assert!(!msg.contains('\n'), "{msg}");
        assert!(
            msg.starts_with("pod default/doomed (sandbox 0123456789ab) stopped while podtrace was looking it up"),
            "{msg}"
        );
        assert!(msg.contains(&format!("its process {pid} is gone")), "{msg}");
        assert!(msg.contains("/nonexistent/netns/cni-1234"), "{msg}");
    }

    #[test]
    fn no_path_and_no_pid_says_so() {
        let msg = format!("{:#}", sandbox_netns(&pod(None, None)).unwrap_err());
        assert!(msg.contains("no sandbox pid"), "{msg}");
        let mut p = pod(Some(1), None);
        p.runtime_pid = None;
        let msg = format!("{:#}", sandbox_netns(&p).unwrap_err());
        assert!(msg.contains("PID namespace podtrace cannot see"), "{msg}");
        let mut p = pod(Some(1), None);
        p.state = "notready".into();
        let msg = format!("{:#}", sandbox_netns(&p).unwrap_err());
        assert!(msg.contains("is not ready"), "{msg}");
    }
}
