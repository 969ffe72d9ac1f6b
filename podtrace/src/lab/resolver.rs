//! The lab as one of the pod resolvers ([`crate::pods::Resolver`]): lab pods by name or IP,
//! names for lab namespaces given by pid or path, and lab nodes by their namespace.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{bail, Result};

use super::registry::{self, LabPod, Registry};
use crate::pods::{Lookup, PodLocation, PodRef, Resolver};

/// Lab pods: those of the lab `--lab PREFIX` names, or of every lab that is up.
pub struct LabResolver {
    prefix: Option<String>,
    /// Whether it finds pods by name (off when a runtime endpoint was named: the lab then
    /// only names its nodes and namespaces).
    by_name: bool,
}

impl LabResolver {
    pub fn new(prefix: Option<&str>) -> Self {
        Self {
            prefix: prefix.map(str::to_owned),
            by_name: true,
        }
    }

    pub fn finding_pods(mut self, by_name: bool) -> Self {
        self.by_name = by_name;
        self
    }

    fn labs(&self) -> Result<Vec<Registry>> {
        match &self.prefix {
            Some(p) => Ok(vec![registry::select(Some(p))?]),
            None => registry::load_all(),
        }
    }

    /// The labs, or none when they cannot be read (for the optional lookups).
    fn labs_quiet(&self) -> Vec<Registry> {
        self.labs().unwrap_or_default()
    }
}

fn location(reg: &Registry, p: &LabPod) -> PodLocation {
    PodLocation {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        netns: p.netns.clone(),
        node: p.node.clone(),
        node_netns: Some(p.node_netns.clone()),
        source: format!("lab:{}", reg.prefix),
        entered_by: None,
        node_named_by: None,
    }
}

fn same_ns(a: &Path, b: &Path) -> bool {
    let ino = |p: &Path| crate::netns::inode_of(p).ok();
    ino(a).is_some() && ino(a) == ino(b)
}

impl Resolver for LabResolver {
    fn find(&self, pod: &PodRef) -> Result<Lookup> {
        let PodRef::Name { namespace, name } = pod else {
            return Ok(Lookup::NotMine);
        };
        if !self.by_name {
            return Ok(Lookup::NotMine);
        }
        let labs = self.labs()?;
        let mut found = Vec::new();
        for reg in &labs {
            if let Some(p) = reg.pod(name) {
                if namespace.as_deref().is_none_or(|ns| ns == p.namespace) {
                    found.push((reg, p));
                }
            }
        }
        match found.as_slice() {
            [] if labs.is_empty() => Ok(Lookup::Missing("no lab is up".into())),
            [] => Ok(Lookup::Missing(format!(
                "not in lab(s) {}",
                labs.iter()
                    .map(|r| r.prefix.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
            [(reg, p)] => {
                if !p.netns.exists() {
                    bail!(
                        "pod {} is in the lab registry but its network namespace {} is gone",
                        p.name,
                        p.netns.display()
                    );
                }
                Ok(Lookup::Found(location(reg, p)))
            }
            _ => bail!(
                "pod {name} exists in several labs ({}); pick one with --lab PREFIX",
                found
                    .iter()
                    .map(|(r, _)| r.prefix.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    fn by_ip(&self, ip: Ipv4Addr) -> Option<PodLocation> {
        self.labs_quiet().iter().find_map(|reg| {
            reg.pods
                .iter()
                .find(|p| p.ip == ip)
                .map(|p| location(reg, p))
        })
    }

    fn identify(&self, netns: &Path) -> Option<PodLocation> {
        self.labs_quiet().iter().find_map(|reg| {
            reg.pods
                .iter()
                .find(|p| same_ns(&p.netns, netns))
                .map(|p| location(reg, p))
        })
    }

    fn node_of(&self, ns: &Path) -> Option<(String, PathBuf)> {
        // Any lab: a runtime inside a lab node serves that node whichever lab was picked.
        registry::load_all().ok()?.iter().find_map(|reg| {
            reg.nodes
                .iter()
                .chain(reg.hosts.iter())
                .find(|n| same_ns(&n.netns, ns))
                .map(|n| (n.name.clone(), n.netns.clone()))
        })
    }
}
