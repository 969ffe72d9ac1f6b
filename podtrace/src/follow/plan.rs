//! From a topology to what `follow` watches: every hop to attach to (the path's hops and every
//! uplink of the nodes involved, so a bypass or a leak shows), and the path a packet is
//! expected to take in each direction, hook by hook.
use std::path::PathBuf;

use serde::Serialize;

use crate::topology::{Hop, Topology};

/// How a hop sees a packet passing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Hook {
    Ingress,
    Egress,
    /// A bridge forwarding between two of its ports: no hook of the bridge device runs; the
    /// packet is seen leaving one port's peer and entering another.
    Bridged,
}

impl Hook {
    fn flip(self) -> Self {
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

/// An interface podtrace attaches to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedHop {
    pub id: u32,
    pub name: String,
    pub node: String,
    pub owner: String,
    pub role: String,
    pub ifname: String,
    pub ifindex: u32,
    pub netns: String,
    #[serde(skip)]
    pub netns_path: Option<PathBuf>,
    /// On the expected path (false: watched only to catch a leak, e.g. the primary eth0 of an
    /// ENI pod's node).
    pub on_path: bool,
}

/// One step of an expected path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Step {
    pub hop: u32,
    pub hook: Hook,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub hops: Vec<PlannedHop>,
    /// Pod → destination.
    pub forward: Vec<Step>,
    /// Destination → pod (replies).
    pub reverse: Vec<Step>,
}

impl Plan {
    pub fn hop(&self, id: u32) -> Option<&PlannedHop> {
        self.hops.iter().find(|h| h.id == id)
    }
}

/// Which hook of `hop` a packet of the pod going towards the destination passes, given the
/// hop's place in the chain.
fn forward_hook(hops: &[Hop], i: usize) -> Hook {
    let h = &hops[i];
    let next_role = hops.get(i + 1).map(|n| n.role.as_str());
    let prev_role = i.checked_sub(1).map(|p| hops[p].role.as_str());
    match h.role.as_str() {
        // The pod sends; the destination pod receives.
        "pod-eth0" => {
            if i == 0 {
                Hook::Egress
            } else {
                Hook::Ingress
            }
        }
        // The source pod's veth peer receives what the pod sent; the destination's transmits.
        "host-veth" => {
            if prev_role == Some("pod-eth0") {
                Hook::Ingress
            } else {
                Hook::Egress
            }
        }
        "bridge" => match (prev_role, next_role) {
            (Some("host-veth"), Some("host-veth")) => Hook::Bridged,
            // Routed up from a port (source side) or down to a port (destination side).
            (Some("host-veth"), _) => Hook::Ingress,
            _ => Hook::Egress,
        },
        // Encapsulates on the source node, decapsulates on the destination node.
        "vxlan" | "uplink" => {
            if h.node == hops[0].node {
                Hook::Egress
            } else {
                Hook::Ingress
            }
        }
        _ => Hook::Egress,
    }
}

/// Builds the plan. `uplinks` lists, per node involved, its other uplinks (hops not on the
/// path that traffic must not take).
pub fn build(topo: &Topology, extra_uplinks: Vec<Hop>) -> Plan {
    let mut hops = Vec::new();
    let mut forward = Vec::new();
    for (i, h) in topo.hops.iter().enumerate() {
        let id = hops.len() as u32;
        hops.push(planned(h, id, true));
        forward.push(Step {
            hop: id,
            hook: forward_hook(&topo.hops, i),
        });
    }
    for h in extra_uplinks {
        if hops
            .iter()
            .any(|p: &PlannedHop| p.name == h.name && p.netns == h.netns)
        {
            continue;
        }
        let id = hops.len() as u32;
        hops.push(planned(&h, id, false));
    }
    let reverse = forward
        .iter()
        .rev()
        .map(|s| Step {
            hop: s.hop,
            hook: s.hook.flip(),
        })
        .collect();
    Plan {
        hops,
        forward,
        reverse,
    }
}

fn planned(h: &Hop, id: u32, on_path: bool) -> PlannedHop {
    PlannedHop {
        id,
        name: h.name.clone(),
        node: h.node.clone(),
        owner: h.owner.clone(),
        role: h.role.clone(),
        ifname: h.ifname.clone(),
        ifindex: h.ifindex,
        netns: h.netns.clone(),
        netns_path: h.netns_path.clone(),
        on_path,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn hop(role: &str, owner: &str, node: &str, ifname: &str) -> Hop {
        Hop {
            role: role.into(),
            name: format!("{owner}/{ifname}"),
            ifname: ifname.into(),
            ifindex: 2,
            netns: format!("/run/netns/{owner}"),
            node: node.into(),
            owner: owner.into(),
            mac: None,
            mtu: 1500,
            master: None,
            kind: String::new(),
            addresses: vec![],
            direction: "both".into(),
            vni: None,
            vtep: None,
            port: None,
            uplink: None,
            netns_path: None,
        }
    }

    pub fn topo(hops: Vec<Hop>) -> Topology {
        Topology {
            pod: crate::topology::PodInfo {
                name: "p".into(),
                namespace: "default".into(),
                node: "n".into(),
                ip: None,
                netns: String::new(),
                node_netns: String::new(),
                ifname: "eth0".into(),
                mac: None,
                source: "test".into(),
            },
            cni: "x".into(),
            hops,
            route: None,
            primary: None,
            evidence: vec![],
            pod_ip: None,
        }
    }

    fn hooks(plan: &Plan, steps: &[Step]) -> Vec<String> {
        steps
            .iter()
            .map(|s| format!("{} {}", plan.hop(s.hop).unwrap().name, s.hook.as_str()))
            .collect()
    }

    pub fn cross_node() -> Topology {
        topo(vec![
            hop("pod-eth0", "pod-a1", "node-a", "eth0"),
            hop("host-veth", "node-a", "node-a", "veth1"),
            hop("bridge", "node-a", "node-a", "cni0"),
            hop("vxlan", "node-a", "node-a", "flannel.1"),
            hop("uplink", "node-a", "node-a", "eth0"),
            hop("uplink", "node-b", "node-b", "eth0"),
            hop("vxlan", "node-b", "node-b", "flannel.1"),
            hop("bridge", "node-b", "node-b", "cni0"),
            hop("host-veth", "node-b", "node-b", "veth2"),
            hop("pod-eth0", "pod-b1", "node-b", "eth0"),
        ])
    }

    #[test]
    fn cross_node_path_hooks() {
        let plan = build(&cross_node(), vec![]);
        assert_eq!(
            hooks(&plan, &plan.forward),
            [
                "pod-a1/eth0 egress",
                "node-a/veth1 ingress",
                "node-a/cni0 ingress",
                "node-a/flannel.1 egress",
                "node-a/eth0 egress",
                "node-b/eth0 ingress",
                "node-b/flannel.1 ingress",
                "node-b/cni0 egress",
                "node-b/veth2 egress",
                "pod-b1/eth0 ingress",
            ]
        );
        assert_eq!(hooks(&plan, &plan.reverse)[0], "pod-b1/eth0 egress");
        assert_eq!(hooks(&plan, &plan.reverse)[9], "pod-a1/eth0 ingress");
    }

    #[test]
    fn same_node_crosses_the_bridge_at_layer_2() {
        let t = topo(vec![
            hop("pod-eth0", "pod-a1", "node-a", "eth0"),
            hop("host-veth", "node-a", "node-a", "veth1"),
            hop("bridge", "node-a", "node-a", "cni0"),
            hop("host-veth", "node-a", "node-a", "veth2"),
            hop("pod-eth0", "pod-a2", "node-a", "eth0"),
        ]);
        let plan = build(&t, vec![]);
        assert_eq!(
            hooks(&plan, &plan.forward),
            [
                "pod-a1/eth0 egress",
                "node-a/veth1 ingress",
                "node-a/cni0 bridged",
                "node-a/veth2 egress",
                "pod-a2/eth0 ingress",
            ]
        );
    }

    #[test]
    fn eni_path_and_watched_primary() {
        let t = topo(vec![
            hop("pod-eth0", "pod-c2", "node-c", "eth0"),
            hop("host-veth", "node-c", "node-c", "eni1"),
            hop("uplink", "node-c", "node-c", "eth2"),
        ]);
        let plan = build(&t, vec![hop("uplink", "node-c", "node-c", "eth0")]);
        assert_eq!(
            hooks(&plan, &plan.forward),
            [
                "pod-c2/eth0 egress",
                "node-c/eni1 ingress",
                "node-c/eth2 egress"
            ]
        );
        assert_eq!(plan.hops.len(), 4);
        assert!(!plan.hops[3].on_path);
        assert_eq!(
            hooks(&plan, &plan.reverse),
            [
                "node-c/eth2 ingress",
                "node-c/eni1 egress",
                "pod-c2/eth0 ingress"
            ]
        );
    }
}
