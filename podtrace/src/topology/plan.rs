//! From a topology to the engine's [`Plan`]: every hop to attach to (the path's hops and every
//! uplink of the nodes involved, so a bypass or a leak shows), the path a packet is expected
//! to take in each direction, hook by hook, and the flow filter.
use std::{collections::BTreeMap, net::Ipv4Addr, path::Path};

use super::{Hop, Role, Topology};
use crate::trace::plan::{FlowFilter, Hook, Plan, PlanNamespace, PlannedHop, Step};

/// Which hook of `hop` a packet of the pod going towards the destination passes, given the
/// hop's place in the chain.
fn forward_hook(hops: &[Hop], i: usize) -> Hook {
    let h = &hops[i];
    let next_role = hops.get(i + 1).map(|n| n.role);
    let prev_role = i.checked_sub(1).map(|p| hops[p].role);
    match h.role {
        // The pod sends; the destination pod receives.
        Role::PodEth0 => {
            if i == 0 {
                Hook::Egress
            } else {
                Hook::Ingress
            }
        }
        // The source pod's veth peer receives what the pod sent; the destination's transmits.
        Role::HostVeth => {
            if prev_role == Some(Role::PodEth0) {
                Hook::Ingress
            } else {
                Hook::Egress
            }
        }
        Role::Bridge => match (prev_role, next_role) {
            (Some(Role::HostVeth), Some(Role::HostVeth)) => Hook::Bridged,
            // Routed up from a port (source side) or down to a port (destination side).
            (Some(Role::HostVeth), _) => Hook::Ingress,
            _ => Hook::Egress,
        },
        // Encapsulates on the source node, decapsulates on the destination node.
        Role::Vxlan | Role::Uplink => {
            if h.node == hops[0].node {
                Hook::Egress
            } else {
                Hook::Ingress
            }
        }
    }
}

/// What the engine traces for this topology: the pod's conversation with `peer`.
pub fn filter(topo: &Topology, pod_ip: Ipv4Addr, peer: Option<Ipv4Addr>) -> FlowFilter {
    let mut vxlan_ports: Vec<u16> = topo
        .hops
        .iter()
        .chain(&topo.other_uplinks)
        .filter_map(|h| h.port)
        .collect();
    if vxlan_ports.is_empty() {
        vxlan_ports.push(podtrace_abi::DEFAULT_VXLAN_PORT);
    }
    vxlan_ports.sort_unstable();
    vxlan_ports.dedup();
    FlowFilter {
        pod: pod_ip,
        peer,
        proto: None,
        port: None,
        vxlan_ports,
        nat: Vec::new(),
    }
}

/// Builds the plan: the topology's hops on the path, then its other uplinks (watched, off the
/// path).
pub fn build(topo: &Topology, filter: FlowFilter) -> Plan {
    let mut b = Builder::default();
    let (forward, reverse) = b.path(topo);
    b.watch(topo);
    b.finish(forward, reverse, filter)
}

/// Assembles a plan from one or more topologies (a Service's paths to each backend): each
/// interface once, by namespace and ifindex, however many paths pass it.
#[derive(Default)]
pub struct Builder {
    namespaces: Vec<PlanNamespace>,
    hops: Vec<PlannedHop>,
}

impl Builder {
    fn ns_index(&mut self, topo: &Topology, h: &Hop) -> usize {
        if let Some(i) = self.namespaces.iter().position(|n| n.path == h.netns_path) {
            self.namespaces[i]
                .interfaces
                .entry(h.ifindex)
                .or_insert_with(|| h.ifname.clone());
            return i;
        }
        let mut interfaces: BTreeMap<u32, String> = topo
            .interfaces
            .get(&h.netns_path)
            .cloned()
            .unwrap_or_default();
        interfaces
            .entry(h.ifindex)
            .or_insert_with(|| h.ifname.clone());
        self.namespaces.push(PlanNamespace {
            path: h.netns_path.clone(),
            owner: h.owner.clone(),
            node: h.node.clone(),
            interfaces,
        });
        self.namespaces.len() - 1
    }

    /// The hop id of `h`, adding it unless its interface is planned already (then it is on
    /// the path if either says so).
    pub fn hop(&mut self, topo: &Topology, h: &Hop, on_path: bool) -> u32 {
        let ns = self.ns_index(topo, h);
        if let Some(p) = self
            .hops
            .iter_mut()
            .find(|p| p.ns == ns && p.ifindex == h.ifindex)
        {
            p.on_path |= on_path;
            return p.id;
        }
        let id = self.hops.len() as u32;
        self.hops.push(planned(h, id, ns, on_path));
        id
    }

    /// The path of `topo`'s hops, forward and back.
    pub fn path(&mut self, topo: &Topology) -> (Vec<Step>, Vec<Step>) {
        let mut forward = Vec::new();
        for (i, h) in topo.hops.iter().enumerate() {
            let hop = self.hop(topo, h, true);
            forward.push(Step {
                hop,
                hook: forward_hook(&topo.hops, i),
            });
        }
        // A hop twice in a row with the same hook is one step (a pod following itself).
        forward.dedup();
        let reverse = reverse_of(&forward);
        (forward, reverse)
    }

    /// Watches `topo`'s other uplinks (off the path).
    pub fn watch(&mut self, topo: &Topology) {
        for h in &topo.other_uplinks {
            self.hop(topo, h, false);
        }
    }

    pub fn finish(self, forward: Vec<Step>, reverse: Vec<Step>, filter: FlowFilter) -> Plan {
        Plan {
            namespaces: self.namespaces,
            hops: self.hops,
            forward,
            reverse,
            filter,
            nat: None,
        }
    }

    /// The namespace index of a path the builder has planned hops in.
    pub fn namespace_of(&self, path: &Path) -> Option<usize> {
        self.namespaces.iter().position(|n| n.path == path)
    }
}

/// The way back: the same steps in reverse, each hook flipped.
pub fn reverse_of(forward: &[Step]) -> Vec<Step> {
    forward
        .iter()
        .rev()
        .map(|s| Step {
            hop: s.hop,
            hook: s.hook.flip(),
        })
        .collect()
}

fn planned(h: &Hop, id: u32, ns: usize, on_path: bool) -> PlannedHop {
    PlannedHop {
        id,
        name: h.name.clone(),
        node: h.node.clone(),
        owner: h.owner.clone(),
        role: h.role,
        ifname: h.ifname.clone(),
        ifindex: h.ifindex,
        netns: h.netns.clone(),
        ns,
        on_path,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::topology::{Cni, Namespaces, PodInfo, Traversal};

    pub fn hop(role: Role, owner: &str, node: &str, ifname: &str) -> Hop {
        Hop {
            role,
            name: format!("{owner}/{ifname}"),
            ifname: ifname.into(),
            // Distinct per name, as in a namespace.
            ifindex: ifname.bytes().map(u32::from).sum(),
            netns: format!("/run/netns/{owner}"),
            node: node.into(),
            owner: owner.into(),
            mac: None,
            mtu: 1500,
            master: None,
            kind: String::new(),
            addresses: vec![],
            direction: Traversal::Both,
            vni: None,
            vtep: None,
            port: None,
            uplink: None,
            netns_path: PathBuf::from(format!("/run/netns/{owner}")),
        }
    }

    pub fn topo(hops: Vec<Hop>, other_uplinks: Vec<Hop>) -> Topology {
        Topology {
            pod: PodInfo {
                name: "p".into(),
                namespace: "default".into(),
                node: "n".into(),
                ip: None,
                netns: String::new(),
                node_netns: String::new(),
                ifname: "eth0".into(),
                mac: None,
                source: "test".into(),
                entered_by: None,
            },
            cni: Cni::Unknown,
            hops,
            route: None,
            primary: None,
            evidence: vec![],
            pod_ip: None,
            other_uplinks,
            interfaces: Default::default(),
            namespaces: Namespaces::default(),
        }
    }

    pub fn plan_of(t: &Topology) -> Plan {
        build(t, filter(t, Ipv4Addr::new(10, 244, 0, 9), None))
    }

    fn hooks(plan: &Plan, steps: &[Step]) -> Vec<String> {
        steps
            .iter()
            .map(|s| format!("{} {}", plan.hop(s.hop).unwrap().name, s.hook.as_str()))
            .collect()
    }

    pub fn cross_node() -> Topology {
        topo(
            vec![
                hop(Role::PodEth0, "pod-a1", "node-a", "eth0"),
                hop(Role::HostVeth, "node-a", "node-a", "veth1"),
                hop(Role::Bridge, "node-a", "node-a", "cni0"),
                hop(Role::Vxlan, "node-a", "node-a", "flannel.1"),
                hop(Role::Uplink, "node-a", "node-a", "eth0"),
                hop(Role::Uplink, "node-b", "node-b", "eth0"),
                hop(Role::Vxlan, "node-b", "node-b", "flannel.1"),
                hop(Role::Bridge, "node-b", "node-b", "cni0"),
                hop(Role::HostVeth, "node-b", "node-b", "veth2"),
                hop(Role::PodEth0, "pod-b1", "node-b", "eth0"),
            ],
            vec![],
        )
    }

    #[test]
    fn cross_node_path_hooks() {
        let plan = plan_of(&cross_node());
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
        // One namespace per owner, hops pointing at theirs.
        assert_eq!(plan.namespaces.len(), 4);
        assert_eq!(plan.namespaces[plan.hops[4].ns].owner, "node-a");
        assert_eq!(plan.filter.vxlan_ports, [podtrace_abi::DEFAULT_VXLAN_PORT]);
        plan.validate().unwrap();
    }

    #[test]
    fn same_node_crosses_the_bridge_at_layer_2() {
        let t = topo(
            vec![
                hop(Role::PodEth0, "pod-a1", "node-a", "eth0"),
                hop(Role::HostVeth, "node-a", "node-a", "veth1"),
                hop(Role::Bridge, "node-a", "node-a", "cni0"),
                hop(Role::HostVeth, "node-a", "node-a", "veth2"),
                hop(Role::PodEth0, "pod-a2", "node-a", "eth0"),
            ],
            vec![],
        );
        let plan = plan_of(&t);
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
        let t = topo(
            vec![
                hop(Role::PodEth0, "pod-c2", "node-c", "eth0"),
                hop(Role::HostVeth, "node-c", "node-c", "eni1"),
                hop(Role::Uplink, "node-c", "node-c", "eth2"),
            ],
            // eth2 again (already on the path: not added twice) and the primary eth0.
            vec![
                hop(Role::Uplink, "node-c", "node-c", "eth2"),
                hop(Role::Uplink, "node-c", "node-c", "eth0"),
            ],
        );
        let plan = plan_of(&t);
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

    #[test]
    fn an_interface_is_planned_once_however_often_paths_pass_it() {
        // A pod following its own address: the route leads back to its own veth and eth0.
        let t = topo(
            vec![
                hop(Role::PodEth0, "pod-a2", "node-a", "eth0"),
                hop(Role::HostVeth, "node-a", "node-a", "veth2"),
                hop(Role::Bridge, "node-a", "node-a", "cni0"),
                hop(Role::HostVeth, "node-a", "node-a", "veth2"),
                hop(Role::PodEth0, "pod-a2", "node-a", "eth0"),
            ],
            vec![hop(Role::Uplink, "node-a", "node-a", "eth0")],
        );
        let plan = plan_of(&t);
        let names: Vec<&str> = plan.hops.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(
            names,
            ["pod-a2/eth0", "node-a/veth2", "node-a/cni0", "node-a/eth0"]
        );
        assert_eq!(
            hooks(&plan, &plan.forward),
            [
                "pod-a2/eth0 egress",
                "node-a/veth2 ingress",
                "node-a/cni0 bridged",
                "node-a/veth2 egress",
                "pod-a2/eth0 ingress",
            ]
        );
        plan.validate().unwrap();
        // Two topologies sharing their first hops.
        let mut b = Builder::default();
        let a = cross_node();
        let (fa, _) = b.path(&a);
        let (fb, _) = b.path(&t);
        assert_eq!(fa[0].hop, 0);
        assert_ne!(fb[0].hop, fa[0].hop, "another pod's eth0");
        let again = b.path(&a).0;
        assert_eq!(again, fa, "the same path planned twice adds nothing");
    }

    #[test]
    fn vxlan_ports_come_from_the_devices() {
        let mut t = cross_node();
        t.hops[3].port = Some(4789);
        t.hops[6].port = Some(4789);
        let plan = plan_of(&t);
        assert_eq!(plan.filter.vxlan_ports, [4789]);
    }
}
