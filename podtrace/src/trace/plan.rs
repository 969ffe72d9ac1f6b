//! What the engine is asked to watch: the hops (each interface with its namespace, ifindex,
//! role), the path a packet is expected to take through them in each direction, and the flow
//! filter. A plan is plain data (serde): the front end builds it from the topology, and the
//! node that runs the engine may be another machine.
use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use serde::{Deserialize, Serialize};

pub use super::nat::{NatPlan, NatTarget};
use crate::probes::hooks::{Evidence, Mechanism};
pub use crate::probes::nat::NatFlow;

/// What an interface is on a pod's path (`topo`'s `role`, design.md §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// The pod's own interface.
    PodEth0,
    /// The node-side end of the pod's veth pair.
    HostVeth,
    /// The bridge the host veth is a port of (`cni0`).
    Bridge,
    /// A VXLAN device (`flannel.1`).
    Vxlan,
    /// A node NIC: the primary eth0, an ENI, an underlay.
    Uplink,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::PodEth0 => "pod-eth0",
            Role::HostVeth => "host-veth",
            Role::Bridge => "bridge",
            Role::Vxlan => "vxlan",
            Role::Uplink => "uplink",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a hop sees a packet passing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Hook {
    Ingress,
    Egress,
    /// A bridge forwarding between two of its ports: no hook of the bridge device runs; the
    /// packet is seen leaving one port's peer and entering another.
    Bridged,
}

impl Hook {
    /// The hook a reply passes where the request passed `self`.
    pub fn flip(self) -> Self {
        match self {
            Hook::Ingress => Hook::Egress,
            Hook::Egress => Hook::Ingress,
            Hook::Bridged => Hook::Bridged,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Ingress => "ingress",
            Hook::Egress => "egress",
            Hook::Bridged => "bridged",
        }
    }
}

/// A network namespace the plan has interfaces in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanNamespace {
    /// Where the engine enters it (`/run/netns/pt-node-a`, `/proc/1/ns/net`).
    pub path: PathBuf,
    /// The pod or node it belongs to (the `OWNER` of `OWNER/IFNAME`).
    pub owner: String,
    /// The node it is on.
    pub node: String,
    /// Its interfaces by ifindex, to name places that are not hops (a drop on another device,
    /// a route lookup's output device).
    pub interfaces: BTreeMap<u32, String>,
}

/// An interface the engine attaches to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedHop {
    /// Its id in events (< `podtrace_abi::MAX_HOPS`).
    pub id: u32,
    /// `OWNER/IFNAME`.
    pub name: String,
    pub node: String,
    pub owner: String,
    pub role: Role,
    pub ifname: String,
    pub ifindex: u32,
    /// The namespace, as the user knows it (its path).
    pub netns: String,
    /// Index of its namespace in [`Plan::namespaces`].
    pub ns: usize,
    /// On the expected path (false: watched only to catch a leak, e.g. the primary eth0 of an
    /// ENI pod's node).
    pub on_path: bool,
}

/// One step of an expected path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Step {
    pub hop: u32,
    pub hook: Hook,
}

/// Which packets are traced: those between `pod` and `peer` (either direction; inside VXLAN
/// too), optionally of one protocol and one port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowFilter {
    pub pod: Ipv4Addr,
    /// `None`: every peer.
    pub peer: Option<Ipv4Addr>,
    /// IP protocol number.
    pub proto: Option<u8>,
    /// Source or destination port.
    pub port: Option<u16>,
    /// UDP ports the path's VXLAN devices use (their own, from the topology), where the
    /// pod's packets travel encapsulated.
    pub vxlan_ports: Vec<u16>,
    /// The conversation's translated forms (a Service's backends, masquerade addresses):
    /// traced too, whatever their ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nat: Vec<NatFlow>,
}

/// The engine's input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub namespaces: Vec<PlanNamespace>,
    pub hops: Vec<PlannedHop>,
    /// Pod → destination.
    pub forward: Vec<Step>,
    /// Destination → pod (replies).
    pub reverse: Vec<Step>,
    pub filter: FlowFilter,
    /// When the path rewrites the destination or the source (a Service, a masquerade): what
    /// is rewritten where, and the path to each place the conversation may be translated
    /// to. `forward`/`reverse` are then the path to the first of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<NatPlan>,
}

impl Plan {
    pub fn hop(&self, id: u32) -> Option<&PlannedHop> {
        self.hops
            .get(id as usize)
            .filter(|h| h.id == id)
            .or_else(|| self.hops.iter().find(|h| h.id == id))
    }

    /// The expected path of a direction.
    pub fn path(&self, forward: bool) -> &[Step] {
        if forward {
            &self.forward
        } else {
            &self.reverse
        }
    }

    /// `OWNER/IFNAME` of an interface of namespace `ns` (`OWNER/if7` when it has no name).
    pub fn place_name(&self, ns: usize, ifindex: u32) -> String {
        match self.namespaces.get(ns) {
            Some(n) if ifindex == 0 => n.owner.clone(),
            Some(n) => match n.interfaces.get(&ifindex) {
                Some(name) => format!("{}/{name}", n.owner),
                None => format!("{}/if{ifindex}", n.owner),
            },
            None => format!("netns#{ns}/if{ifindex}"),
        }
    }

    /// The owner (pod or node) of namespace `ns`.
    pub fn owner(&self, ns: usize) -> &str {
        self.namespaces
            .get(ns)
            .map(|n| n.owner.as_str())
            .unwrap_or("?")
    }

    /// The nodes the plan spans, in path order.
    pub fn nodes(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for h in &self.hops {
            if !out.contains(&h.node.as_str()) {
                out.push(&h.node);
            }
        }
        out
    }

    /// Checks what an engine relies on: hop ids unique and in range, namespaces that exist,
    /// path steps on the plan's hops. (A node's part of a plan keeps the whole plan's hop ids,
    /// so they need not be 0, 1, 2, ….)
    pub fn validate(&self) -> anyhow::Result<()> {
        for (i, h) in self.hops.iter().enumerate() {
            if h.id >= podtrace_abi::MAX_HOPS {
                anyhow::bail!(
                    "plan: hop {} has id {} (at most {})",
                    h.name,
                    h.id,
                    podtrace_abi::MAX_HOPS - 1
                );
            }
            if self.hops[..i].iter().any(|o| o.id == h.id) {
                anyhow::bail!("plan: hop id {} is given twice", h.id);
            }
            if h.ns >= self.namespaces.len() {
                anyhow::bail!(
                    "plan: hop {} names namespace #{} of {}",
                    h.name,
                    h.ns,
                    self.namespaces.len()
                );
            }
        }
        let targets = self.nat.iter().flat_map(|n| &n.targets);
        for s in self
            .forward
            .iter()
            .chain(&self.reverse)
            .chain(targets.flat_map(|t| t.forward.iter().chain(&t.reverse)))
        {
            if self.hop(s.hop).is_none() {
                anyhow::bail!(
                    "plan: a path step names hop {}, which the plan does not have",
                    s.hop
                );
            }
        }
        Ok(())
    }
}

/// How the engine runs a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceOptions {
    /// Carry up to this many bytes of each packet the hops see (capture).
    pub snaplen: Option<u32>,
    /// Kernel-side evidence to attach.
    pub evidence: Vec<Evidence>,
    /// Use only this mechanism for the kernel-side evidence.
    pub mechanism: Option<Mechanism>,
    /// A capture expression's conditions the kernel can check (the rest is the consumer's).
    #[serde(default)]
    pub expression: crate::probes::KernelExpr,
    /// What a capture does with a packet whose whole record finds no room in the kernel's
    /// ring buffer.
    #[serde(default)]
    pub overload: Overload,
    /// Keep the route lookup and transmit hooks attached while the conversation is idle
    /// (otherwise they go after `probes::idle::IDLE_AFTER` without a packet of it).
    #[serde(default)]
    pub keep_hooks: bool,
}

/// `--overload`: what a capture does with a packet the kernel's ring buffer has no room for
/// whole (the reader, writing files, cannot keep pace with the packets).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Overload {
    /// Keep its first 128 bytes (its headers, VXLAN's inner ones included), counted as cut:
    /// every packet's headers rather than some whole packets.
    #[default]
    Cut,
    /// Lose it, counted as lost.
    Drop,
}

impl Default for TraceOptions {
    fn default() -> Self {
        Self {
            snaplen: None,
            evidence: Evidence::ALL.to_vec(),
            mechanism: None,
            expression: crate::probes::KernelExpr::default(),
            overload: Overload::default(),
            keep_hooks: false,
        }
    }
}
