//! The flannel-style cluster of seeds 001–003: two nodes on an underlay bridge, VXLAN VNI 1
//! on UDP 8472 between them, the bridge CNI plugin's `cni0` and veths for the pods.
//!
//! | node   | underlay eth0   | cni0          | flannel.1     | pods                                |
//! |--------|-----------------|---------------|---------------|-------------------------------------|
//! | node-a | 10.30.180.56/24 | 10.244.0.1/24 | 10.244.0.0/32 | pod-a1 10.244.0.9, pod-a2 10.244.0.7 |
//! | node-b | 10.30.180.55/24 | 10.244.1.1/24 | 10.244.1.0/32 | pod-b1 10.244.1.5                   |
//!
//! The underlay is the bridge `br0` in the lab's `underlay` namespace; each node's `eth0` is a
//! veth whose peer (`node-a-eth0`) is a port of that bridge.
//!
//! The `flannel-nodes` topology builds the nodes, the underlay and what flanneld makes
//! (flannel.1 with its routes, neighbour and FDB entries) but no pods and no `cni0`: a real
//! cluster's CNI plugin makes those (`cargo xtask k8s up` runs kubelets in node-a and node-b).
//! It adds the host `control-plane` ([`CONTROL_PLANE_IP`]) on the underlay for the API server,
//! with routes to the nodes' pod subnets through the nodes.
use std::{net::Ipv4Addr, path::PathBuf};

use anyhow::{Context as _, Result};

use super::Build;
use crate::random::random_hex;
use crate::{
    netlink::{in_ns, mac_string, Route},
    netns::sysctl,
};

/// The VXLAN network identifier flannel uses.
pub const VNI: u32 = 1;
/// flannel's VXLAN UDP port (the Linux default, not IANA's 4789).
pub const VXLAN_PORT: u16 = 8472;
/// MTU of flannel.1, cni0, the host veths and the pods' eth0 (1500 - 50 bytes of VXLAN).
pub const MTU: u32 = 1450;
/// The underlay bridge (in the `underlay` namespace).
pub const UNDERLAY_BRIDGE: &str = "br0";

/// A flannel node of the lab.
#[derive(Debug, Clone, Copy)]
pub struct NodeSpec {
    pub name: &'static str,
    /// Its underlay address on eth0 (/24).
    pub underlay_ip: Ipv4Addr,
    /// N in its pod subnet 10.244.N.0/24.
    pub subnet: u8,
}

impl NodeSpec {
    /// cni0's address, the pods' gateway: 10.244.N.1.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.subnet, 1)
    }

    /// flannel.1's address, also the node's pod subnet: 10.244.N.0.
    pub fn vtep_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.subnet, 0)
    }
}

/// A flannel pod of the lab.
#[derive(Debug, Clone, Copy)]
pub struct PodSpec {
    pub name: &'static str,
    pub node: &'static str,
    pub ip: Ipv4Addr,
}

pub const NODES: [NodeSpec; 2] = [
    NodeSpec {
        name: "node-a",
        underlay_ip: Ipv4Addr::new(10, 30, 180, 56),
        subnet: 0,
    },
    NodeSpec {
        name: "node-b",
        underlay_ip: Ipv4Addr::new(10, 30, 180, 55),
        subnet: 1,
    },
];

pub const PODS: [PodSpec; 3] = [
    PodSpec {
        name: "pod-a1",
        node: "node-a",
        ip: Ipv4Addr::new(10, 244, 0, 9),
    },
    PodSpec {
        name: "pod-a2",
        node: "node-a",
        ip: Ipv4Addr::new(10, 244, 0, 7),
    },
    PodSpec {
        name: "pod-b1",
        node: "node-b",
        ip: Ipv4Addr::new(10, 244, 1, 5),
    },
];

/// The namespaces this topology creates (without the prefix).
pub const NETNS: [&str; 6] = ["underlay", "node-a", "node-b", "pod-a1", "pod-a2", "pod-b1"];

/// The host of a Kubernetes control plane on the underlay (`flannel-nodes` topology only).
pub const CONTROL_PLANE: &str = "control-plane";
/// Its underlay address (/24, eth0).
pub const CONTROL_PLANE_IP: Ipv4Addr = Ipv4Addr::new(10, 30, 180, 10);

/// Builds the flannel cluster; with `pods` false, no pods and no cni0 but the
/// `control-plane` host (the `flannel-nodes` topology).
pub(super) fn build(b: &mut Build, pods: bool) -> Result<()> {
    let underlay = b.netns("underlay", "fabric")?;
    b.step("underlay bridge")?;
    in_ns(&underlay, |nl| {
        let br = nl.add_bridge(UNDERLAY_BRIDGE, None)?;
        nl.set_up(br)
    })?;

    let mut node_ns: Vec<(NodeSpec, PathBuf)> = Vec::new();
    for node in NODES {
        let ns = b.netns(node.name, "node")?;
        b.step(&format!("{}: underlay link", node.name))?;
        let port = format!("{}-eth0", node.name);
        in_ns(&underlay, |nl| {
            nl.add_veth(&port, "eth0", Some(&ns), 1500, None)?;
            let idx = nl.index(&port)?;
            nl.set_master(idx, nl.index(UNDERLAY_BRIDGE)?)?;
            nl.set_up(idx)
        })?;
        b.step(&format!("{}: eth0, cni0, flannel.1", node.name))?;
        in_ns(&ns, |nl| {
            sysctl("net/ipv4/ip_forward", "1")?;
            let eth0 = nl.index("eth0")?;
            nl.add_addr(eth0, node.underlay_ip, 24)?;
            nl.set_up(eth0)?;
            if pods {
                let cni0 = nl.add_bridge("cni0", Some(MTU))?;
                nl.add_addr(cni0, node.gateway(), 24)?;
                nl.set_up(cni0)?;
            }
            let vxlan = nl.add_vxlan("flannel.1", VNI, node.underlay_ip, eth0, VXLAN_PORT, MTU)?;
            nl.add_addr(vxlan, node.vtep_ip(), 32)?;
            nl.set_up(vxlan)
        })
        .with_context(|| format!("setting up {}", node.name))?;
        node_ns.push((node, ns));
    }

    for pod in PODS.iter().filter(|_| pods) {
        let (node, node_path) = node_ns
            .iter()
            .find(|(n, _)| n.name == pod.node)
            .expect("every flannel pod's node is in NODES");
        let pod_ns = b.netns(pod.name, "pod")?;
        b.step(&format!("{}: veth on {}", pod.name, node.name))?;
        // The bridge CNI plugin names host veths `veth` + 8 hex digits.
        let host_veth = format!("veth{}", random_hex(8)?);
        in_ns(node_path, |nl| {
            nl.add_veth(&host_veth, "eth0", Some(&pod_ns), MTU, None)?;
            let idx = nl.index(&host_veth)?;
            nl.set_master(idx, nl.index("cni0")?)?;
            nl.set_hairpin(idx)?;
            nl.set_up(idx)
        })?;
        b.step(&format!("{}: eth0 and routes", pod.name))?;
        let mac = in_ns(&pod_ns, |nl| {
            let eth0 = nl.link("eth0")?;
            nl.add_addr(eth0.index, pod.ip, 24)?;
            nl.set_up(eth0.index)?;
            nl.add_route(&Route::via(
                Ipv4Addr::new(10, 244, 0, 0),
                16,
                node.gateway(),
                eth0.index,
            ))?;
            nl.add_route(&Route::via(
                Ipv4Addr::UNSPECIFIED,
                0,
                node.gateway(),
                eth0.index,
            ))?;
            Ok(mac_string(&eth0.mac_or_zero()))
        })
        .with_context(|| format!("setting up {}", pod.name))?;
        b.pods.push(super::registry::LabPod {
            name: pod.name.to_owned(),
            namespace: "default".to_owned(),
            node: node.name.to_owned(),
            ip: pod.ip,
            netns: pod_ns,
            node_netns: node_path.clone(),
            ifname: "eth0".to_owned(),
            mac,
            host_veth,
            cni: "flannel-vxlan".to_owned(),
            eni: None,
            table: None,
        });
    }

    // What flanneld does when it learns about another node: per remote node, a route to its
    // pod subnet through flannel.1 (onlink, via the remote VTEP address), a permanent
    // neighbour entry for that address with the remote flannel.1 MAC, and an FDB entry
    // sending that MAC to the remote underlay IP.
    let mut vtep_macs = Vec::new();
    for (node, ns) in &node_ns {
        let mac = in_ns(ns, |nl| Ok(nl.link("flannel.1")?.mac_or_zero().to_vec()))?;
        vtep_macs.push((*node, mac));
    }
    for (node, ns) in &node_ns {
        b.step(&format!(
            "{}: routes, neighbours and fdb to other nodes",
            node.name
        ))?;
        in_ns(ns, |nl| {
            let vxlan = nl.index("flannel.1")?;
            for (remote, mac) in vtep_macs.iter().filter(|(r, _)| r.name != node.name) {
                nl.add_route(&Route::via(remote.vtep_ip(), 24, remote.vtep_ip(), vxlan).onlink())?;
                nl.add_neigh(vxlan, remote.vtep_ip(), mac)?;
                nl.add_vxlan_fdb(vxlan, mac, remote.underlay_ip)?;
            }
            Ok(())
        })
        .with_context(|| format!("wiring {} to the other nodes", node.name))?;
    }
    if !pods {
        control_plane(b, &underlay)?;
    }
    Ok(())
}

/// The `control-plane` host: eth0 on the underlay bridge, and a route to each node's pod
/// subnet through that node (as a cloud VPC's route table does for flannel's host-gw peers).
fn control_plane(b: &mut Build, underlay: &std::path::Path) -> Result<()> {
    let ns = b.netns(CONTROL_PLANE, "host")?;
    b.step("control-plane: underlay link and routes")?;
    // The underlay bridge's port (node ports are `node-a-eth0`; interface names have at most
    // 15 bytes).
    let port = "cplane-eth0";
    in_ns(underlay, |nl| {
        nl.add_veth(port, "eth0", Some(&ns), 1500, None)?;
        let idx = nl.index(port)?;
        nl.set_master(idx, nl.index(UNDERLAY_BRIDGE)?)?;
        nl.set_up(idx)
    })?;
    in_ns(&ns, |nl| {
        let eth0 = nl.index("eth0")?;
        nl.add_addr(eth0, CONTROL_PLANE_IP, 24)?;
        nl.set_up(eth0)?;
        for node in NODES {
            nl.add_route(&Route::via(node.vtep_ip(), 24, node.underlay_ip, eth0))?;
        }
        Ok(())
    })
    .context("setting up the control-plane host")
}
