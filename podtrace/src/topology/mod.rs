//! Pod topology: from a found pod ([`crate::pods::PodLocation`]) to the hops its traffic takes
//! and the routing decision that picks them, read from the kernel over netlink; and from
//! there to the engine's [`Plan`](crate::trace::Plan).
//!
//! - [`side`]: a pod's side: its eth0, the veth peer found by namespace identity, the bridge.
//! - [`resolve`]: the kernel's route answer and the hops past the node.
//! - [`classify`]: the CNI shape, decided from evidence (bridge masters, VXLAN devices and
//!   their routes, per-pod source rules), never from interface names.
//! - [`rules`]: which policy rule a lookup went through.
//! - [`plan`]: the engine's plan: hops, expected paths, filter.
//! - [`render`] and [`cmd`]: `podtrace topo`.
//!
//! Every namespace is read once per command ([`Namespaces`]).
pub mod classify;
pub mod cmd;
pub mod plan;
pub mod render;
pub mod resolve;
pub mod rules;
pub mod side;

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::netlink::Snapshot;
pub use crate::trace::plan::Role;
pub use resolve::resolve;

/// The CNI shape of a pod's node (`topo`'s `cni`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cni {
    /// A bridge (`cni0`) and a VXLAN overlay to the other nodes' pod networks.
    FlannelVxlan,
    /// A bridge, no overlay.
    Bridge,
    /// Routed veths with per-pod source rules selecting an ENI's table.
    AwsVpcCni,
    Unknown,
}

impl Cni {
    pub fn as_str(self) -> &'static str {
        match self {
            Cni::FlannelVxlan => "flannel-vxlan",
            Cni::Bridge => "bridge",
            Cni::AwsVpcCni => "aws-vpc-cni",
            Cni::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for Cni {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which way the pod's traffic crosses a hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Traversal {
    Egress,
    Ingress,
    Both,
}

/// What kind of node NIC an uplink is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Uplink {
    /// The node's main interface (its main table's default route).
    Primary,
    /// A secondary NIC chosen by policy routing.
    Eni,
    /// The network between nodes an overlay rides on.
    Underlay,
    /// Another NIC of a node on the path (watched for leaks).
    Other,
}

impl Uplink {
    pub fn as_str(self) -> &'static str {
        match self {
            Uplink::Primary => "primary",
            Uplink::Eni => "eni",
            Uplink::Underlay => "underlay",
            Uplink::Other => "other",
        }
    }
}

impl std::fmt::Display for Uplink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One interface on the path.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hop {
    pub role: Role,
    /// `OWNER/IFNAME`: the pod for a pod's interface, the node for a node's.
    pub name: String,
    pub ifname: String,
    pub ifindex: u32,
    /// The namespace path (`/proc/1/ns/net` for the root namespace).
    pub netns: String,
    pub node: String,
    pub owner: String,
    pub mac: Option<String>,
    pub mtu: u32,
    pub master: Option<String>,
    pub kind: String,
    pub addresses: Vec<String>,
    /// Which way traffic of the pod crosses it.
    pub direction: Traversal,
    /// VXLAN devices: VNI, local VTEP, UDP port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vni: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vtep: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uplink: Option<Uplink>,
    /// The namespace, for entering it (`netns` has it as text).
    #[serde(skip)]
    pub netns_path: PathBuf,
}

/// The VXLAN part of a decision.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VxlanEgress {
    pub device: String,
    pub next_hop: Option<String>,
    pub next_hop_mac: Option<String>,
    pub remote_vtep: Option<String>,
    pub underlay_oif: Option<String>,
    pub underlay_gateway: Option<String>,
}

/// How the kernel routes the pod's packets to `dst`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RouteDecision {
    pub dst: String,
    pub src: String,
    /// The input interface of the lookup (the host veth, or the bridge for bridged pods).
    pub iif: String,
    pub table: u32,
    pub table_name: String,
    pub rule_priority: Option<u32>,
    pub rule: Option<String>,
    pub gateway: Option<String>,
    pub oif: String,
    pub oif_index: u32,
    /// The route entry, `ip route` style.
    pub route: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vxlan: Option<VxlanEgress>,
    /// Notes that explain the decision (one line each).
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PodInfo {
    pub name: String,
    pub namespace: String,
    pub node: String,
    pub ip: Option<String>,
    pub netns: String,
    pub node_netns: String,
    pub ifname: String,
    pub mac: Option<String>,
    pub source: String,
    /// How the pod's namespace was entered, when the usual way was not open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entered_by: Option<String>,
}

/// `podtrace topo`'s answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Topology {
    pub pod: PodInfo,
    pub cni: Cni,
    pub hops: Vec<Hop>,
    pub route: Option<RouteDecision>,
    /// The node's primary interface (its main-table default route).
    pub primary: Option<String>,
    /// Evidence the CNI shape was decided from.
    pub evidence: Vec<String>,
    #[serde(skip)]
    pub pod_ip: Option<Ipv4Addr>,
    /// The other uplinks and VXLAN devices of the nodes on the path: where a pod's traffic
    /// could leave a node instead (watched by `follow` so a leak shows).
    #[serde(skip)]
    pub other_uplinks: Vec<Hop>,
    /// Interface names of every namespace involved, by path (for naming places that are not
    /// hops).
    #[serde(skip)]
    pub interfaces: BTreeMap<PathBuf, BTreeMap<u32, String>>,
    /// What was read of every namespace involved.
    #[serde(skip)]
    pub namespaces: Namespaces,
}

impl Topology {
    /// The node-side snapshot of the pod's node.
    pub fn node_snapshot(&self) -> Option<Arc<Snapshot>> {
        let host_veth = self.hops.iter().find(|h| h.role == Role::HostVeth)?;
        self.namespaces.cached(&host_veth.netns_path)
    }
}

/// The namespaces a command reads, each once: their netlink snapshots by namespace identity.
#[derive(Debug, Clone, Default)]
pub struct Namespaces {
    read: Vec<(PathBuf, u64, Arc<Snapshot>)>,
}

impl PartialEq for Namespaces {
    fn eq(&self, other: &Self) -> bool {
        self.read.len() == other.read.len()
            && self
                .read
                .iter()
                .zip(&other.read)
                .all(|(a, b)| a.0 == b.0 && a.1 == b.1)
    }
}

impl Eq for Namespaces {}

impl Namespaces {
    /// The snapshot of the namespace at `path`, read now if it was not yet.
    pub fn get(&mut self, path: &Path) -> Result<Arc<Snapshot>> {
        let ino = crate::netns::inode_of(path)?;
        if let Some((_, _, s)) = self.read.iter().find(|(_, i, _)| *i == ino) {
            return Ok(s.clone());
        }
        let snap = Arc::new(
            crate::netlink::run(Some(path), |nl| nl.snapshot())
                .with_context(|| format!("reading network namespace {}", path.display()))?,
        );
        self.read.push((path.to_path_buf(), ino, snap.clone()));
        Ok(snap)
    }

    /// Interface names (by ifindex) of every namespace read, by path.
    pub fn interface_names(&self) -> BTreeMap<PathBuf, BTreeMap<u32, String>> {
        self.read
            .iter()
            .map(|(p, _, s)| {
                (
                    p.clone(),
                    s.links.iter().map(|l| (l.index, l.name.clone())).collect(),
                )
            })
            .collect()
    }

    /// Records what another machine read of its namespace at `path` (a node agent's answer).
    pub fn insert_read_elsewhere(&mut self, path: &Path, snap: Snapshot) {
        self.read.push((path.to_path_buf(), 0, Arc::new(snap)));
    }

    /// The snapshot of `path` if it was read.
    pub fn cached(&self, path: &Path) -> Option<Arc<Snapshot>> {
        if let Some((_, _, s)) = self.read.iter().find(|(p, _, _)| p == path) {
            return Some(s.clone());
        }
        let ino = crate::netns::inode_of(path).ok()?;
        self.read
            .iter()
            .find(|(_, i, _)| *i == ino)
            .map(|(_, _, s)| s.clone())
    }
}

/// A namespace path as `topo` shows it.
pub fn ns_string(ns: &Path) -> String {
    ns.display().to_string()
}

/// The root namespace (the machine's own).
pub fn root_netns() -> PathBuf {
    PathBuf::from("/proc/1/ns/net")
}
