//! Finding a pod: by name (the lab's registry first, then the container runtime's CRI socket,
//! see [`crate::cri`]), by `--container ID` (CRI), by `--pid`, or by `--netns PATH|NAME`. The
//! result says which network namespace is the pod's and, when known, which is its node's.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    cri::{self, Client, CriPod, Endpoints},
    lab::registry,
};

/// How the user named the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodRef {
    /// `NAME` or `NAMESPACE/NAME`.
    Name {
        namespace: Option<String>,
        name: String,
    },
    Pid(u32),
    /// A path, or a name in /run/netns.
    Netns(String),
    /// `--container ID`: a container (or pod sandbox) ID or a unique prefix of one, found
    /// through CRI.
    Container(String),
}

impl PodRef {
    /// Parses the positional `POD` (`NAME` or `NAMESPACE/NAME`).
    pub fn parse_name(s: &str) -> Result<Self> {
        let (namespace, name) = match s.split_once('/') {
            Some((ns, name)) => (Some(ns.to_owned()), name.to_owned()),
            None => (None, s.to_owned()),
        };
        if name.is_empty() || namespace.as_deref() == Some("") || name.contains('/') {
            bail!("invalid pod name {s:?} (expected NAME or NAMESPACE/NAME)");
        }
        Ok(Self::Name { namespace, name })
    }
}

/// Where a pod's network lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodLocation {
    pub name: String,
    pub namespace: String,
    pub netns: PathBuf,
    /// The node's name (a lab node, or this machine's hostname).
    pub node: String,
    /// The node's namespace; `None` when it is not known yet (found from the veth peer).
    pub node_netns: Option<PathBuf>,
    /// Where the pod was found: `lab:PREFIX`, `cri:unix:///SOCKET`, `pid`, `netns`.
    pub source: String,
}

/// Finds a pod. `lab` picks a lab by prefix when several are up. `runtime_endpoint` (as
/// crictl's `--runtime-endpoint`) sends the lookup to that CRI socket only; without it a name
/// is looked up in the labs first, then in the container runtimes whose sockets are found
/// (`$CONTAINER_RUNTIME_ENDPOINT`, else [`cri::DEFAULT_ENDPOINTS`]).
pub fn locate(
    pod: &PodRef,
    lab: Option<&str>,
    runtime_endpoint: Option<&str>,
) -> Result<PodLocation> {
    match pod {
        PodRef::Name { namespace, name } if runtime_endpoint.is_some() => {
            let eps = cri::discover(runtime_endpoint)?;
            cri_by_name(&eps, namespace.as_deref(), name, None)
        }
        PodRef::Container(id) => {
            let eps = cri::discover(runtime_endpoint)?;
            cri_by_container(&eps, id)
        }
        PodRef::Name { namespace, name } => {
            let labs = match lab {
                Some(prefix) => vec![registry::select(Some(prefix))?],
                None => registry::load_all()?,
            };
            let mut found = Vec::new();
            for reg in &labs {
                if let Some(p) = reg.pod(name) {
                    if namespace.as_deref().is_none_or(|ns| ns == p.namespace) {
                        found.push((reg.prefix.clone(), p.clone()));
                    }
                }
            }
            match found.len() {
                0 => {
                    let searched = if labs.is_empty() {
                        "no lab is up".to_owned()
                    } else {
                        format!(
                            "not in lab(s) {}",
                            labs.iter()
                                .map(|r| r.prefix.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    };
                    let eps = cri::discover(None)?;
                    cri_by_name(&eps, namespace.as_deref(), name, Some(&searched))
                }
                1 => {
                    let (prefix, p) = found.remove(0);
                    if !p.netns.exists() {
                        bail!(
                            "pod {} is in the lab registry but its network namespace {} is gone",
                            p.name,
                            p.netns.display()
                        );
                    }
                    Ok(PodLocation {
                        name: p.name,
                        namespace: p.namespace,
                        netns: p.netns,
                        node: p.node,
                        node_netns: Some(p.node_netns),
                        source: format!("lab:{prefix}"),
                    })
                }
                _ => bail!(
                    "pod {name} exists in several labs ({}); pick one with --lab PREFIX",
                    found
                        .iter()
                        .map(|(p, _)| p.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        }
        PodRef::Pid(pid) => {
            let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
            if !Path::new(&format!("/proc/{pid}")).exists() {
                bail!("no process with pid {pid}");
            }
            let netns = crate::netns::resolve(path.to_str().unwrap_or_default())
                .with_context(|| format!("network namespace of pid {pid}"))?;
            let name = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|s| format!("pid-{pid}-{}", s.trim()))
                .unwrap_or_else(|_| format!("pid-{pid}"));
            Ok(unnamed(name, netns, "pid", lab))
        }
        PodRef::Netns(spec) => {
            let netns = crate::netns::resolve(spec)?;
            let name = netns
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| spec.clone());
            Ok(unnamed(name, netns, "netns", lab))
        }
    }
}

/// What to look for in a runtime.
enum CriSearch<'a> {
    Name {
        namespace: Option<&'a str>,
        name: &'a str,
    },
    Id(&'a str),
}

/// Searches every endpoint. An explicit endpoint's failure is the error; with discovered
/// sockets a failing runtime is reported only when nothing was found elsewhere. Returns the
/// matches and what was searched without result (for "not found" messages).
fn search_runtimes(
    eps: &Endpoints,
    what: &str,
    search: &CriSearch<'_>,
) -> Result<(Vec<CriPod>, Vec<String>)> {
    let mut found = Vec::new();
    let mut searched = Vec::new();
    for ep in eps.list() {
        let result = cri::block_on(async {
            let mut client = Client::connect(&ep).await?;
            let pods = match *search {
                CriSearch::Name { namespace, name } => {
                    cri::pods_named(&mut client, namespace, name).await?
                }
                CriSearch::Id(prefix) => cri::by_id_prefix(&mut client, prefix).await?,
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

/// A pod by name through CRI. `lab_note` says what the labs gave, when they were searched.
fn cri_by_name(
    eps: &Endpoints,
    namespace: Option<&str>,
    name: &str,
    lab_note: Option<&str>,
) -> Result<PodLocation> {
    let shown = match namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_owned(),
    };
    let mut searched: Vec<String> = lab_note.map(str::to_owned).into_iter().collect();
    if eps.list().is_empty() {
        searched.push(format!(
            "no container runtime socket at {} (name one with --runtime-endpoint)",
            cri::default_paths()
        ));
        bail!("pod {shown} not found ({})", searched.join("; "));
    }
    let (mut found, more) = search_runtimes(
        eps,
        &format!("pod {shown}"),
        &CriSearch::Name { namespace, name },
    )?;
    searched.extend(more);
    match found.len() {
        0 => bail!("pod {shown} not found ({})", searched.join("; ")),
        1 => cri_location(found.remove(0)),
        n => bail!(
            "pod {shown} matches {n} pods: {}; name one as NAMESPACE/NAME or with --container ID",
            found
                .iter()
                .map(|p| format!("{} in {}", p.describe(), p.endpoint))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// A pod by `--container ID` (a container's or a pod sandbox's ID, or a prefix of one).
fn cri_by_container(eps: &Endpoints, id: &str) -> Result<PodLocation> {
    if id.is_empty() {
        bail!("--container needs an ID (or a prefix of one)");
    }
    if eps.list().is_empty() {
        bail!(
            "container {id}: no container runtime socket at {} (name one with --runtime-endpoint)",
            cri::default_paths()
        );
    }
    let what = format!("container or pod sandbox with an ID starting {id:?}");
    let (mut found, searched) = search_runtimes(eps, &what, &CriSearch::Id(id))?;
    match found.len() {
        0 => bail!("container {id} not found ({})", searched.join("; ")),
        1 => cri_location(found.remove(0)),
        n => bail!(
            "container ID {id:?} is ambiguous: {n} match: {}; give more of the ID",
            found
                .iter()
                .map(CriPod::describe)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Where a CRI pod's network is. The node's namespace is the runtime's (its socket's peer
/// pid): a lab node's when the runtime runs inside one, else this machine's.
fn cri_location(p: CriPod) -> Result<PodLocation> {
    let netns = p.network_namespace()?;
    let netns = crate::netns::resolve(&netns.to_string_lossy())
        .with_context(|| format!("pod {}'s network namespace", p.display_name()))?;
    cri::remember(&p.endpoint);
    let (node, node_netns) = cri_node(&p);
    Ok(PodLocation {
        source: format!("cri:{}", p.endpoint),
        name: p.name,
        namespace: p.namespace,
        netns,
        node,
        node_netns,
    })
}

/// The node of a CRI pod: (name, namespace).
fn cri_node(p: &CriPod) -> (String, Option<PathBuf>) {
    let Some(runtime_ns) = p.runtime_netns() else {
        // The runtime is in a pid namespace podtrace cannot see: find the node from the veth.
        return (hostname(), None);
    };
    if let Some((name, path)) = lab_node(&runtime_ns) {
        return (name, Some(path));
    }
    let root = PathBuf::from("/proc/1/ns/net");
    let ino = |p: &Path| crate::netns::inode_of(p).ok();
    if ino(&root).is_some() && ino(&root) == ino(&runtime_ns) {
        return (hostname(), Some(root));
    }
    (hostname(), Some(runtime_ns))
}

/// A pod given by pid or netns: if the namespace is a lab pod's, use the lab's names.
fn unnamed(name: String, netns: PathBuf, source: &str, lab: Option<&str>) -> PodLocation {
    let ino = crate::netns::inode_of(&netns).ok();
    let labs = match lab {
        Some(prefix) => registry::select(Some(prefix)).into_iter().collect(),
        None => registry::load_all().unwrap_or_default(),
    };
    for reg in labs {
        for p in &reg.pods {
            if ino.is_some() && crate::netns::inode_of(&p.netns).ok() == ino {
                return PodLocation {
                    name: p.name.clone(),
                    namespace: p.namespace.clone(),
                    netns,
                    node: p.node.clone(),
                    node_netns: Some(p.node_netns.clone()),
                    source: source.to_owned(),
                };
            }
        }
    }
    PodLocation {
        name,
        namespace: "-".to_owned(),
        netns,
        node: hostname(),
        node_netns: None,
        source: source.to_owned(),
    }
}

pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "node".to_owned())
}

/// A lab pod (in any lab that is up, or the chosen one) with this IP, or else a pod with this
/// IP in the container runtime the source pod was found through (CRI): the destination side of
/// a path podtrace can observe too.
pub fn lab_pod_by_ip(ip: Ipv4Addr, lab: Option<&str>) -> Option<PodLocation> {
    let labs = match lab {
        Some(prefix) => registry::select(Some(prefix)).into_iter().collect(),
        None => registry::load_all().unwrap_or_default(),
    };
    let in_lab = labs.into_iter().find_map(|reg| {
        reg.pods.iter().find(|p| p.ip == ip).map(|p| PodLocation {
            name: p.name.clone(),
            namespace: p.namespace.clone(),
            netns: p.netns.clone(),
            node: p.node.clone(),
            node_netns: Some(p.node_netns.clone()),
            source: format!("lab:{}", reg.prefix),
        })
    });
    in_lab.or_else(|| cri_pod_by_ip(ip))
}

/// The pod with this IP in the runtime a pod of this run was found through.
fn cri_pod_by_ip(ip: Ipv4Addr) -> Option<PodLocation> {
    let ep = cri::used_endpoint()?;
    let pod = cri::block_on(async {
        let mut client = Client::connect(&ep).await?;
        cri::pod_with_ip(&mut client, ip).await
    })
    .map_err(|e| log::debug!("looking up {ip} in {ep}: {e:#}"))
    .ok()??;
    cri_location(pod).ok()
}

/// The name of the node whose namespace is `ns` in a lab, if any.
pub fn lab_node_name(ns: &Path) -> Option<String> {
    lab_node(ns).map(|(name, _)| name)
}

/// The lab node (or host) whose namespace is `ns`: its name and its namespace's path.
pub fn lab_node(ns: &Path) -> Option<(String, PathBuf)> {
    let ino = crate::netns::inode_of(ns).ok()?;
    registry::load_all().ok()?.into_iter().find_map(|reg| {
        reg.nodes
            .iter()
            .chain(reg.hosts.iter())
            .find(|n| crate::netns::inode_of(&n.netns).ok() == Some(ino))
            .map(|n| (n.name.clone(), n.netns.clone()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pod_names() {
        assert_eq!(
            PodRef::parse_name("pod-a1").unwrap(),
            PodRef::Name {
                namespace: None,
                name: "pod-a1".into()
            }
        );
        assert_eq!(
            PodRef::parse_name("kube-system/coredns-1").unwrap(),
            PodRef::Name {
                namespace: Some("kube-system".into()),
                name: "coredns-1".into()
            }
        );
        assert!(PodRef::parse_name("a/b/c").is_err());
        assert!(PodRef::parse_name("/x").is_err());
        assert!(PodRef::parse_name("x/").is_err());
    }
}
