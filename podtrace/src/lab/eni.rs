//! The ENI node of seeds 000 and 004: AWS VPC CNI routing on `node-c`, with the seed's
//! addresses, a host `master` in the same subnet as the node's eth0, and a `vpc` namespace
//! standing in for the cloud's network.
//!
//! | node-c | address | route table |
//! |---|---|---|
//! | eth0 (primary)                 | 10.19.0.22/20, default via 10.19.0.1 | main |
//! | eth1 (ENI, other subnet)       | 10.19.16.17/20, gw 10.19.16.1        | 2    |
//! | eth2 (ENI, same subnet as eth0) | 10.19.0.24/20, gw 10.19.0.1          | 3    |
//!
//! Each ENI is set up as the CNI's `setupENINetwork` and seed 004 do: address with the subnet
//! mask, the kernel's subnet route removed from main, table N = `GW dev ethN scope link` +
//! `default via GW dev ethN`, main gets `ENI_IP dev ethN scope link`, a permanent neighbour
//! entry for the ENI's own IP, and rules `512: to ENI_IP lookup main`,
//! `1536: from ENI_IP lookup N`.
//!
//! Pods (pod-c1 10.19.16.6 on eth1, pod-c2 10.19.0.32 on eth2): host veth `eni` + 11 hex,
//! pod eth0 with a /32, `169.254.1.1 dev eth0 scope link`, `default via 169.254.1.1 dev
//! eth0` and a permanent ARP entry 169.254.1.1 → the host veth's MAC; on the node
//! `POD/32 dev eniXXX scope link` and rules `512: to POD lookup main`,
//! `1536: from POD lookup N`.
//!
//! The `vpc` namespace has one bridge per subnet (`br-10.19.0` with the gateway 10.19.0.1/20,
//! `br-10.19.16` with 10.19.16.1/20) and routes between them. Where the cloud knows which ENI
//! owns a secondary IP, the lab has static entries: neighbour entries for the pod IPs (in
//! `vpc`, and on `master` for pod-c2, which shares its subnet) and static FDB entries on the
//! bridges, so that frames go to the ENI that owns the address and are never flooded to the
//! others. node-c answers ARP only on the interface that holds the address (`arp_ignore=1`,
//! `arp_announce=2`), as separate ENIs do.
use std::{net::Ipv4Addr, path::Path};

use anyhow::{Context as _, Result};

use super::{registry::LabPod, Build};
use crate::random::random_hex;
use crate::{
    netlink::{self as nl, in_ns, mac_string, Mac, Nl, Route},
    netns::sysctl,
};

/// An interface of node-c.
#[derive(Debug, Clone, Copy)]
pub struct NicSpec {
    pub name: &'static str,
    pub ip: Ipv4Addr,
    /// The subnet's gateway (the VPC router).
    pub gateway: Ipv4Addr,
    /// Route table of this ENI; `None` for the primary eth0 (main).
    pub table: Option<u32>,
    /// The MAC from seed 004.
    pub mac: Mac,
    /// The VPC bridge (subnet) it is attached to.
    pub subnet_bridge: &'static str,
}

/// A pod on node-c.
#[derive(Debug, Clone, Copy)]
pub struct PodSpec {
    pub name: &'static str,
    pub ip: Ipv4Addr,
    /// The ENI whose secondary IP the pod uses.
    pub eni: &'static str,
}

pub const NODE: &str = "node-c";
pub const MASTER: &str = "master";
pub const MASTER_IP: Ipv4Addr = Ipv4Addr::new(10, 19, 0, 11);
/// The pods' gateway, answered by the host veth through a static ARP entry.
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The subnets' prefix length.
pub const SUBNET_LEN: u8 = 20;

pub const BRIDGE_0: &str = "br-10.19.0";
pub const BRIDGE_16: &str = "br-10.19.16";
const SUBNET_0: Ipv4Addr = Ipv4Addr::new(10, 19, 0, 0);
const SUBNET_16: Ipv4Addr = Ipv4Addr::new(10, 19, 16, 0);
const GW_0: Ipv4Addr = Ipv4Addr::new(10, 19, 0, 1);
const GW_16: Ipv4Addr = Ipv4Addr::new(10, 19, 16, 1);

pub const NICS: [NicSpec; 3] = [
    NicSpec {
        name: "eth0",
        ip: Ipv4Addr::new(10, 19, 0, 22),
        gateway: GW_0,
        table: None,
        mac: [0x52, 0x54, 0x00, 0x9b, 0x34, 0x09],
        subnet_bridge: BRIDGE_0,
    },
    NicSpec {
        name: "eth1",
        ip: Ipv4Addr::new(10, 19, 16, 17),
        gateway: GW_16,
        table: Some(2),
        mac: [0x20, 0x90, 0x6f, 0xff, 0x7b, 0xf1],
        subnet_bridge: BRIDGE_16,
    },
    NicSpec {
        name: "eth2",
        ip: Ipv4Addr::new(10, 19, 0, 24),
        gateway: GW_0,
        table: Some(3),
        mac: [0x20, 0x90, 0x6f, 0xe2, 0x01, 0x48],
        subnet_bridge: BRIDGE_0,
    },
];

pub const PODS: [PodSpec; 2] = [
    PodSpec {
        name: "pod-c1",
        ip: Ipv4Addr::new(10, 19, 16, 6),
        eni: "eth1",
    },
    PodSpec {
        name: "pod-c2",
        ip: Ipv4Addr::new(10, 19, 0, 32),
        eni: "eth2",
    },
];

/// The namespaces this topology creates (without the prefix).
pub const NETNS: [&str; 5] = ["vpc", "master", "node-c", "pod-c1", "pod-c2"];

fn nic(name: &str) -> &'static NicSpec {
    NICS.iter()
        .find(|n| n.name == name)
        .expect("every ENI pod's interface is in NICS")
}

/// Name of the port in `vpc` that leads to `owner`'s interface `ifname`.
fn vpc_port(owner: &str, ifname: &str) -> String {
    format!("{owner}-{ifname}")
}

/// Builds the ENI node, its pods, master and the VPC.
pub(super) fn build(b: &mut Build) -> Result<()> {
    let vpc = b.netns("vpc", "fabric")?;
    b.step("vpc: subnets and router")?;
    in_ns(&vpc, |nl| {
        sysctl("net/ipv4/ip_forward", "1")?;
        // The router must not tell node-c to talk to master directly: it forwards replies
        // from pod-c2 (default via 10.19.0.1 dev eth2) back out of the same subnet.
        sysctl("net/ipv4/conf/all/send_redirects", "0")?;
        sysctl("net/ipv4/conf/default/send_redirects", "0")?;
        for (name, gw) in [(BRIDGE_0, GW_0), (BRIDGE_16, GW_16)] {
            let br = nl.add_bridge(name, None)?;
            nl.add_addr(br, gw, SUBNET_LEN)?;
            nl.set_up(br)?;
            sysctl(&format!("net/ipv4/conf/{name}/send_redirects"), "0")?;
        }
        Ok(())
    })
    .context("setting up the vpc")?;

    let node = b.netns(NODE, "node")?;
    b.step("node-c: sysctls")?;
    in_ns(&node, |_| {
        sysctl("net/ipv4/ip_forward", "1")?;
        // Several interfaces share one L2 subnet (eth0 and eth2): each answers ARP only for
        // its own addresses and announces the address of the interface it sends from, as
        // separate ENIs behave in a VPC.
        sysctl("net/ipv4/conf/all/arp_ignore", "1")?;
        sysctl("net/ipv4/conf/all/arp_announce", "2")?;
        Ok(())
    })?;
    for nic in NICS {
        b.step(&format!("node-c: {} link", nic.name))?;
        let port = vpc_port(NODE, nic.name);
        in_ns(&vpc, |nl| {
            attach_to_subnet(nl, &port, nic.name, &node, nic.mac, nic.subnet_bridge)
        })?;
        b.step(&format!("node-c: {} addresses, routes and rules", nic.name))?;
        in_ns(&node, |nl| setup_nic(nl, &nic))
            .with_context(|| format!("setting up node-c {}", nic.name))?;
    }

    let master = b.netns(MASTER, "host")?;
    b.step("master: eth0")?;
    let master_port = vpc_port(MASTER, "eth0");
    let master_mac = in_ns(&vpc, |nl| {
        // master's MAC: whatever the kernel picks.
        attach_to_subnet(nl, &master_port, "eth0", &master, [0; 6], BRIDGE_0)
    })?;
    in_ns(&master, |nl| {
        let eth0 = nl.index("eth0")?;
        nl.add_addr(eth0, MASTER_IP, SUBNET_LEN)?;
        nl.set_up(eth0)?;
        nl.add_route(&Route::via(Ipv4Addr::UNSPECIFIED, 0, GW_0, eth0))?;
        // pod-c2's IP is in master's subnet; the VPC would answer master's ARP for it with
        // the MAC of the ENI that owns it (eth2).
        for pod in PODS {
            let owner = nic(pod.eni);
            if owner.subnet_bridge == BRIDGE_0 {
                nl.add_neigh(eth0, pod.ip, &owner.mac)?;
            }
        }
        Ok(())
    })
    .context("setting up master")?;

    for pod in PODS {
        let eni = nic(pod.eni);
        let table = eni.table.expect("pods use secondary ENIs");
        let pod_ns = b.netns(pod.name, "pod")?;
        b.step(&format!("{}: veth, routes and rules on node-c", pod.name))?;
        // The AWS VPC CNI names host veths `eni` + 11 hex digits (of a hash of the pod).
        let host_veth = format!("eni{}", random_hex(11)?);
        let host_mac = in_ns(&node, |nl| {
            nl.add_veth(&host_veth, "eth0", Some(&pod_ns), 1500, None)?;
            let host = nl.link(&host_veth)?;
            nl.set_up(host.index)?;
            nl.add_route(&Route::link(pod.ip, 32, host.index))?;
            nl.add_rule(512, None, Some((pod.ip, 32)), nl::TABLE_MAIN)?;
            nl.add_rule(1536, Some((pod.ip, 32)), None, table)?;
            Ok(host.mac_or_zero().to_vec())
        })
        .with_context(|| format!("wiring {} on node-c", pod.name))?;
        b.step(&format!("{}: eth0 and routes", pod.name))?;
        let mac = in_ns(&pod_ns, |nl| {
            let eth0 = nl.link("eth0")?;
            nl.add_addr(eth0.index, pod.ip, 32)?;
            nl.set_up(eth0.index)?;
            nl.add_route(&Route::link(POD_GATEWAY, 32, eth0.index))?;
            nl.add_route(&Route::via(
                Ipv4Addr::UNSPECIFIED,
                0,
                POD_GATEWAY,
                eth0.index,
            ))?;
            nl.add_neigh(eth0.index, POD_GATEWAY, &host_mac)?;
            Ok(mac_string(&eth0.mac_or_zero()))
        })
        .with_context(|| format!("setting up {}", pod.name))?;
        b.pods.push(LabPod {
            name: pod.name.to_owned(),
            namespace: "default".to_owned(),
            node: NODE.to_owned(),
            ip: pod.ip,
            netns: pod_ns,
            node_netns: node.clone(),
            ifname: "eth0".to_owned(),
            mac,
            host_veth,
            cni: "aws-vpc-cni".to_owned(),
            eni: Some(pod.eni.to_owned()),
            table: Some(table),
        });
    }

    b.step("vpc: where each address and MAC lives")?;
    in_ns(&vpc, |nl| {
        // Pod IPs are secondary IPs of an ENI: the router sends them to that ENI's MAC.
        for pod in PODS {
            let owner = nic(pod.eni);
            nl.add_neigh(nl.index(owner.subnet_bridge)?, pod.ip, &owner.mac)?;
        }
        // Each MAC lives behind one port: no flooding of unicast frames to other ENIs.
        for nic in NICS {
            nl.add_bridge_fdb(nl.index(&vpc_port(NODE, nic.name))?, &nic.mac)?;
        }
        nl.add_bridge_fdb(nl.index(&master_port)?, &master_mac)?;
        Ok(())
    })
    .context("filling in the vpc's neighbour and fdb tables")?;
    Ok(())
}

/// In `vpc`: a veth `port` (enslaved to `bridge`) whose peer is `ifname` in the namespace
/// `peer_ns`, with MAC `mac` (all zero: the kernel's choice). Returns the peer's MAC.
fn attach_to_subnet(
    nl: &Nl,
    port: &str,
    ifname: &str,
    peer_ns: &Path,
    mac: Mac,
    bridge: &str,
) -> Result<Vec<u8>> {
    let fixed = (mac != [0; 6]).then_some(mac);
    nl.add_veth(port, ifname, Some(peer_ns), 1500, fixed)?;
    let idx = nl.index(port)?;
    nl.set_master(idx, nl.index(bridge)?)?;
    nl.set_up(idx)?;
    match fixed {
        Some(m) => Ok(m.to_vec()),
        None => in_ns(peer_ns, |peer| {
            Ok(peer.link(ifname)?.mac_or_zero().to_vec())
        }),
    }
}

/// On node-c: addresses, routes, rules and neighbours of one interface.
fn setup_nic(nl: &Nl, nic: &NicSpec) -> Result<()> {
    let idx = nl.index(nic.name)?;
    nl.set_mtu(idx, 1500)?;
    nl.set_up(idx)?;
    nl.add_addr(idx, nic.ip, SUBNET_LEN)?;
    let Some(table) = nic.table else {
        // The primary interface: its subnet route (from the address) and the default route
        // in main.
        return nl.add_route(&Route::via(Ipv4Addr::UNSPECIFIED, 0, nic.gateway, idx));
    };
    let subnet = if nic.subnet_bridge == BRIDGE_0 {
        SUBNET_0
    } else {
        SUBNET_16
    };
    // setupENINetwork: table N reaches the subnet's gateway on this ENI and defaults to it;
    // main loses the subnet route the address brought.
    nl.add_route(&Route::link(nic.gateway, 32, idx).table(table))?;
    nl.add_route(&Route::via(Ipv4Addr::UNSPECIFIED, 0, nic.gateway, idx).table(table))?;
    nl.del_route(subnet, SUBNET_LEN, idx, nl::TABLE_MAIN)?;
    // Seed 004: the ENI's own IP, reachable in main, with rules like a pod's.
    nl.add_route(&Route::link(nic.ip, 32, idx))?;
    nl.add_neigh(idx, nic.ip, &nic.mac)?;
    nl.add_rule(512, None, Some((nic.ip, 32)), nl::TABLE_MAIN)?;
    nl.add_rule(1536, Some((nic.ip, 32)), None, table)?;
    Ok(())
}
