//! Pods through the container runtime's CRI socket (containerd, CRI-O, cri-dockerd, k3s), by
//! name or by container/sandbox ID; the destination of a path by its IP in the same runtime.
//!
//! The runtime reports each sandbox's network namespace as a path in *its* mount namespace
//! (`/run/netns/cni-…`, or under its state dir), which podtrace may not see: a runtime in a
//! mount namespace of its own (a kind-style node), or podtrace in a DaemonSet container. Then
//! podtrace enters the sandbox through its pid (`/proc/PID/ns/net`, visible with the host's PID
//! namespace) and says so.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Mutex,
};

use anyhow::{bail, Result};

use super::{hostname, Lookup, PodLocation, PodRef, Resolver};
use crate::cri::{self, Client, CriPod, Endpoint, Endpoints};

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

    fn location(&self, p: CriPod) -> Result<PodLocation> {
        let (netns, entered_by) = sandbox_netns(&p)?;
        if let Ok(mut u) = self.used.lock() {
            *u = Some(p.endpoint.clone());
        }
        let (node, node_netns) = node_of(&p);
        Ok(PodLocation {
            source: format!("cri:{}", p.endpoint),
            name: p.name,
            namespace: p.namespace,
            netns,
            node,
            node_netns,
            entered_by,
        })
    }
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
                "no container runtime socket at {} (name one with --runtime-endpoint)",
                cri::default_paths()
            )));
        }
        let (mut found, searched) = search_runtimes(&eps, &what, &search)?;
        match found.len() {
            0 => Ok(Lookup::Missing(searched.join("; "))),
            1 => Ok(Lookup::Found(self.location(found.remove(0))?)),
            n => match search {
                Search::Name { .. } => bail!(
                    "{what} matches {n} pods: {}; name one as NAMESPACE/NAME or with --container ID",
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

    fn by_ip(&self, ip: Ipv4Addr) -> Option<PodLocation> {
        let ep = self.used.lock().ok()?.clone()?;
        let pod = cri::block_on(async {
            let mut client = Client::connect(&ep).await?;
            cri::pod_with_ip(&mut client, ip).await
        })
        .map_err(|e| log::debug!("looking up {ip} in {ep}: {e:#}"))
        .ok()??;
        self.location(pod).ok()
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

/// The sandbox's network namespace as podtrace can open it: the runtime's path when it is a
/// network namespace here, else the sandbox process's (`/proc/PID/ns/net`), saying why.
fn sandbox_netns(p: &CriPod) -> Result<(PathBuf, Option<String>)> {
    p.check_usable()?;
    let path_problem = match &p.netns {
        Some(path) => match crate::netns::resolve(&path.to_string_lossy()) {
            Ok(ns) => return Ok((ns, None)),
            Err(e) => Some(format!("{e:#}")),
        },
        None => None,
    };
    let by_pid = p
        .pid
        .map(|pid| (pid, crate::netns::resolve(&format!("/proc/{pid}/ns/net"))));
    match (by_pid, path_problem) {
        (Some((pid, Ok(ns))), problem) => {
            let why = match (&p.netns, problem) {
                (Some(path), Some(_)) => format!(
                    "through the sandbox's pid {pid}: the runtime's path {} is not a network namespace here (the runtime has a mount namespace of its own)",
                    path.display()
                ),
                _ => format!("through the sandbox's pid {pid}: the runtime reports no namespace path"),
            };
            Ok((ns, Some(why)))
        }
        (Some((pid, Err(e))), problem) => bail!(
            "pod {}: {}; its sandbox pid {pid} neither ({e:#}): the sandbox is gone or in a PID namespace podtrace cannot see",
            p.display_name(),
            problem.unwrap_or_else(|| "the runtime reports no namespace path".into())
        ),
        (None, problem) => bail!(
            "{} reports no network namespace podtrace can open for pod {} ({}; no sandbox pid)",
            p.endpoint,
            p.display_name(),
            problem.unwrap_or_else(|| "no namespace path".into())
        ),
    }
}

/// The node of a CRI pod: (name, namespace). The node's namespace is the runtime's (its
/// socket's peer pid); [`super::Chain`] names it when another resolver (the lab) knows it.
fn node_of(p: &CriPod) -> (String, Option<PathBuf>) {
    let Some(runtime_ns) = p.runtime_netns() else {
        // The runtime is in a PID namespace podtrace cannot see: the node is found from the
        // pod's veth.
        return (hostname(), None);
    };
    let root = PathBuf::from("/proc/1/ns/net");
    let ino = |p: &Path| crate::netns::inode_of(p).ok();
    if ino(&root).is_some() && ino(&root) == ino(&runtime_ns) {
        return (hostname(), Some(root));
    }
    (hostname(), Some(runtime_ns))
}
