//! An agent's node: the network namespaces it may read and trace — its node's own, and those
//! of the pods whose veth peers into it. Nothing else: a plan or a lookup that names another
//! node's namespace is refused.
use std::{
    fs::File,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};

/// The node an agent serves.
#[derive(Debug, Clone)]
pub struct NodeBoundary {
    /// The node's network namespace (the agent's own by default).
    pub netns: PathBuf,
    ino: u64,
}

impl NodeBoundary {
    pub fn new(netns: PathBuf) -> Result<Self> {
        let ino = crate::netns::inode_of(&netns)
            .with_context(|| format!("the node's network namespace {}", netns.display()))?;
        Ok(Self { netns, ino })
    }

    /// Whether `ns` is the node's namespace or one of its pods' (a namespace with a veth whose
    /// peer is in the node's namespace, by NSID).
    pub fn contains(&self, ns: &Path) -> Result<bool> {
        let ino = crate::netns::inode_of(ns)?;
        if ino == self.ino {
            return Ok(true);
        }
        let node =
            File::open(&self.netns).with_context(|| format!("opening {}", self.netns.display()))?;
        crate::netlink::run(Some(ns), |nl| {
            let Some(nsid) = nl.nsid_of(&node)? else {
                return Ok(false);
            };
            Ok(nl
                .links()?
                .iter()
                .any(|l| l.kind == "veth" && l.link_netnsid == Some(nsid)))
        })
    }

    /// Fails unless `ns` is this node's (see [`NodeBoundary::contains`]).
    pub fn check(&self, ns: &Path, what: &str, node: &str) -> Result<()> {
        if !self.contains(ns).unwrap_or(false) {
            bail!(
                "{what} ({}) is not on node {node}: this agent serves only its node and its pods",
                ns.display()
            );
        }
        Ok(())
    }
}
