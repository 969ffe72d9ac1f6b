//! Finding a pod: by name (the lab's registry; the container runtime in its own module), by
//! `--pid`, or by `--netns PATH|NAME`. The result says which network namespace is the pod's
//! and, when known, which is its node's.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};

use crate::lab::registry;

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
    /// Where the pod was found: `lab:PREFIX`, `pid`, `netns`.
    pub source: String,
}

/// Finds a pod. `lab` picks a lab by prefix when several are up.
pub fn locate(pod: &PodRef, lab: Option<&str>) -> Result<PodLocation> {
    match pod {
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
                    let shown = match namespace {
                        Some(ns) => format!("{ns}/{name}"),
                        None => name.clone(),
                    };
                    let searched = if labs.is_empty() {
                        "no lab is up and no container runtime was searched".to_owned()
                    } else {
                        format!(
                            "searched lab(s) {}",
                            labs.iter()
                                .map(|r| r.prefix.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    };
                    bail!("pod {shown} not found ({searched})")
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

/// A lab pod (in any lab that is up, or the chosen one) with this IP: the destination side of
/// a path podtrace can observe too.
pub fn lab_pod_by_ip(ip: Ipv4Addr, lab: Option<&str>) -> Option<PodLocation> {
    let labs = match lab {
        Some(prefix) => registry::select(Some(prefix)).into_iter().collect(),
        None => registry::load_all().ok()?,
    };
    labs.into_iter().find_map(|reg| {
        reg.pods.iter().find(|p| p.ip == ip).map(|p| PodLocation {
            name: p.name.clone(),
            namespace: p.namespace.clone(),
            netns: p.netns.clone(),
            node: p.node.clone(),
            node_netns: Some(p.node_netns.clone()),
            source: format!("lab:{}", reg.prefix),
        })
    })
}

/// The name of the node whose namespace is `ns` in a lab, if any.
pub fn lab_node_name(ns: &Path) -> Option<String> {
    let ino = crate::netns::inode_of(ns).ok()?;
    registry::load_all().ok()?.into_iter().find_map(|reg| {
        reg.nodes
            .iter()
            .chain(reg.hosts.iter())
            .find(|n| crate::netns::inode_of(&n.netns).ok() == Some(ino))
            .map(|n| n.name.clone())
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
