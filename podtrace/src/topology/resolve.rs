//! Resolving a pod's path: its side ([`super::side`]), the kernel's own route answer for the
//! destination, and the hops past the node (VXLAN, the underlay, the destination pod's side
//! when podtrace can see it).
use std::{net::Ipv4Addr, path::Path};

use anyhow::{anyhow, bail, Context as _, Result};

use super::{
    classify::{classify, route_string},
    ns_string, rules,
    side::{resolve_side, Side},
    Cni, Hop, Namespaces, PodInfo, Role, RouteDecision, Topology, Traversal, Uplink, VxlanEgress,
};
use crate::{
    netlink::{mac_string, snapshot::table_name},
    pods::{Chain, PodLocation},
};

/// Resolves a pod's topology, and with `dst` the path and routing decision towards it.
/// `dest_pod` is the destination's own location when podtrace can observe it (a lab pod, a
/// pod of the same runtime).
pub fn resolve(
    loc: &PodLocation,
    dst: Option<Ipv4Addr>,
    dest_pod: Option<&PodLocation>,
    chain: &Chain,
) -> Result<Topology> {
    let mut namespaces = Namespaces::default();
    let side = resolve_side(loc, &mut namespaces, chain)?;
    let mut hops = vec![
        side.pod_hop(),
        side.node_hop(&side.host_veth, Role::HostVeth),
    ];
    if let Some(br) = side.bridge() {
        hops.push(side.node_hop(br, Role::Bridge));
    }
    let primary = side.primary().map(|l| l.name.clone());

    let mut decision = None;
    let mut other = None;
    if let (Some(dst), Some(src)) = (dst, side.ip) {
        let (d, more, other_side) = decide(&side, src, dst, dest_pod, &mut namespaces, chain)?;
        hops.extend(more);
        decision = Some(d);
        other = other_side;
    } else if dst.is_some() {
        bail!("pod {} has no IPv4 address on {}", loc.name, side.eth0.name);
    }
    let (cni, mut evidence) = classify(&side, decision.as_ref());
    // Mark uplinks: primary, ENI, or the underlay of an overlay.
    for h in hops.iter_mut().filter(|h| h.role == Role::Uplink) {
        if h.node == side.loc.node {
            h.uplink = Some(if Some(&h.ifname) == primary.as_ref() {
                Uplink::Primary
            } else if cni == Cni::AwsVpcCni {
                Uplink::Eni
            } else {
                Uplink::Underlay
            });
        }
    }
    if let Some(how) = &side.loc.node_named_by {
        evidence.insert(0, format!("node {} named by {how}", side.loc.node));
    }
    if let Some(how) = &side.loc.entered_by {
        evidence.insert(0, format!("pod namespace entered {how}"));
    }
    // What else could carry the pod's traffic off the nodes involved.
    let mut other_uplinks = side.uplinks(primary.as_deref(), true);
    if let Some(o) = &other {
        if o.node_ns != side.node_ns {
            other_uplinks.extend(o.uplinks(None, false));
        }
    }
    Ok(Topology {
        pod: PodInfo {
            name: side.loc.name.clone(),
            namespace: side.loc.namespace.clone(),
            node: side.loc.node.clone(),
            ip: side.ip.map(|i| i.to_string()),
            netns: side.loc.netns.display().to_string(),
            node_netns: ns_string(&side.node_ns),
            ifname: side.eth0.name.clone(),
            mac: side.eth0.mac.as_ref().map(|m| mac_string(m)),
            source: side.loc.source.clone(),
            entered_by: side.loc.entered_by.clone(),
        },
        cni,
        hops,
        route: decision,
        primary,
        evidence,
        pod_ip: side.ip,
        other_uplinks,
        interfaces: namespaces.interface_names(),
        namespaces,
    })
}

/// A destination pod's half of a path that arrives from another node: the hops from its
/// node's uplinks into the pod (what a node agent answers for an address on its node).
/// `from`: the source pod's address (the way in over a routed underlay is the one back to it).
pub fn inbound(loc: &PodLocation, chain: &Chain, from: Option<Ipv4Addr>) -> Result<Topology> {
    let mut namespaces = Namespaces::default();
    let side = resolve_side(loc, &mut namespaces, chain)?;
    let hops = side.inbound_hops(from);
    let (cni, evidence) = classify(&side, None);
    let other_uplinks = side.uplinks(None, false);
    Ok(Topology {
        pod: PodInfo {
            name: side.loc.name.clone(),
            namespace: side.loc.namespace.clone(),
            node: side.loc.node.clone(),
            ip: side.ip.map(|i| i.to_string()),
            netns: side.loc.netns.display().to_string(),
            node_netns: ns_string(&side.node_ns),
            ifname: side.eth0.name.clone(),
            mac: side.eth0.mac.as_ref().map(|m| mac_string(m)),
            source: side.loc.source.clone(),
            entered_by: side.loc.entered_by.clone(),
        },
        cni,
        hops,
        route: None,
        primary: side.primary().map(|l| l.name.clone()),
        evidence,
        pod_ip: side.ip,
        other_uplinks,
        interfaces: namespaces.interface_names(),
        namespaces,
    })
}

/// The routing decision for src → dst as the node sees the pod's packets, the hops past the
/// node's bridge, and the destination's side when it was resolved.
fn decide(
    side: &Side,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    dest_pod: Option<&PodLocation>,
    namespaces: &mut Namespaces,
    chain: &Chain,
) -> Result<(RouteDecision, Vec<Hop>, Option<Side>)> {
    let snap = &side.node_snap;
    // Packets of a bridged pod enter IP on the bridge; of a routed pod, on its veth.
    let iif = side.bridge().unwrap_or(&side.host_veth).clone();
    let kernel = crate::netlink::run(Some(&side.node_ns), |nl| {
        nl.route_get(dst, Some(src), Some(iif.index))
    })
    .with_context(|| {
        format!(
            "asking node {}'s kernel for the route to {dst}",
            side.loc.node
        )
    })?;
    let key = rules::FlowKey {
        src,
        dst,
        iif: &iif.name,
        fwmark: 0,
    };
    let walked = rules::decide(snap, &key);
    let mut notes = Vec::new();
    let (rule_priority, rule) = match &walked {
        Some(d) if d.route.map(|r| r.table) == Some(kernel.table) => (
            Some(d.rule.priority),
            Some(format!("{} {}", d.rule.selector(), d.rule.action_string())),
        ),
        Some(d) => {
            notes.push(format!(
                "the rules point at table {} but the kernel used table {}",
                d.route.map(|r| table_name(r.table)).unwrap_or_default(),
                table_name(kernel.table)
            ));
            (None, None)
        }
        None => (None, None),
    };
    let oif_index = kernel.oif.unwrap_or(0);
    let oif = snap
        .link(oif_index)
        .cloned()
        .ok_or_else(|| anyhow!("the kernel routes {dst} to ifindex {oif_index}, which is gone"))?;
    let entry = walked
        .as_ref()
        .and_then(|d| d.route)
        .filter(|r| r.table == kernel.table)
        .map(|r| route_string(r, snap))
        .unwrap_or_else(|| route_string(&kernel, snap));
    let same_ns = |a: &Path, b: &Path| {
        let ino = |p: &Path| crate::netns::inode_of(p).ok();
        ino(a).is_some() && ino(a) == ino(b)
    };
    let mut hops = Vec::new();
    let mut vxlan = None;
    let mut other = None;
    let gateway = kernel.gateway;
    match oif.kind.as_str() {
        "bridge" => {
            // The destination is on this node's bridge: another pod behind another port.
            if let Some(dp) = dest_pod.filter(|d| {
                d.node_netns
                    .as_deref()
                    .is_some_and(|p| same_ns(p, &side.node_ns))
            }) {
                let o = resolve_side(dp, namespaces, chain)?;
                hops.push(o.node_hop(&o.host_veth, Role::HostVeth));
                hops.push(o.pod_hop());
                other = Some(o);
            } else {
                notes.push(format!("{dst} is on bridge {} (same node)", oif.name));
            }
        }
        "vxlan" => {
            hops.push(side.node_hop(&oif, Role::Vxlan));
            let nh = gateway.unwrap_or(dst);
            let mac = snap
                .neighs
                .iter()
                .find(|n| n.index == oif.index && n.ip == nh)
                .and_then(|n| n.mac);
            let vtep = mac.and_then(|m| {
                snap.fdb
                    .iter()
                    .find(|f| f.index == oif.index && f.mac == m)
                    .and_then(|f| f.dst)
            });
            if mac.is_none() {
                notes.push(format!("no neighbour entry for {nh} on {}", oif.name));
            } else if vtep.is_none() {
                notes.push(format!(
                    "no FDB entry on {} for {}",
                    oif.name,
                    mac_string(&mac.unwrap_or_default())
                ));
            }
            let mut under = VxlanEgress {
                device: oif.name.clone(),
                next_hop: Some(nh.to_string()),
                next_hop_mac: mac.as_ref().map(|m| mac_string(m)),
                remote_vtep: vtep.map(|v| v.to_string()),
                underlay_oif: None,
                underlay_gateway: None,
            };
            if let Some(vtep) = vtep {
                let local = oif.vxlan.as_ref().and_then(|v| v.local);
                let ur =
                    crate::netlink::run(Some(&side.node_ns), |nl| nl.route_get(vtep, local, None))?;
                if let Some(ul) = ur.oif.and_then(|i| snap.link(i)) {
                    under.underlay_oif = Some(ul.name.clone());
                    let mut h = side.node_hop(ul, Role::Uplink);
                    h.direction = Traversal::Egress;
                    hops.push(h);
                }
                under.underlay_gateway = ur.gateway.map(|g| g.to_string());
            }
            vxlan = Some(under);
            if let Some(dp) = dest_pod {
                let o = resolve_side(dp, namespaces, chain)?;
                hops.extend(o.inbound_hops(Some(src)));
                other = Some(o);
            }
        }
        _ => {
            let mut h = side.node_hop(&oif, Role::Uplink);
            h.direction = Traversal::Egress;
            hops.push(h);
            if let Some(dp) = dest_pod {
                let elsewhere = match (&dp.node_netns, &side.loc.node_netns) {
                    (Some(a), Some(b)) => !same_ns(a, b),
                    _ => true,
                };
                if elsewhere {
                    let o = resolve_side(dp, namespaces, chain)?;
                    hops.extend(o.inbound_hops(Some(src)));
                    other = Some(o);
                }
            }
        }
    }
    Ok((
        RouteDecision {
            dst: dst.to_string(),
            src: src.to_string(),
            iif: iif.name.clone(),
            table: kernel.table,
            table_name: table_name(kernel.table),
            rule_priority,
            rule,
            gateway: gateway.map(|g| g.to_string()),
            oif: oif.name.clone(),
            oif_index,
            route: entry,
            vxlan,
            notes,
        },
        hops,
        other,
    ))
}
