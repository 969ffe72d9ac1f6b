//! Pod topology resolution: from a pod reference to the hops its traffic takes and the
//! routing decision that picks them, read from the kernel over netlink.
//!
//! - [`pod`]: finding the pod and its node's namespace.
//! - [`read`]: netlink reads ([`snapshot::Snapshot`]) and the kernel's own FIB answer.
//! - [`rules`]: which policy rule a lookup went through.
//! - [`render`]: the text and JSON output of `podtrace topo`.
//!
//! The CNI shape is decided from evidence (bridge masters, VXLAN devices and their FDB,
//! per-pod source rules), never from interface names.
pub mod cmd;
pub mod pod;
pub mod read;
pub mod render;
pub mod rules;
pub mod snapshot;

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde::Serialize;

use pod::PodLocation;
use snapshot::{mac_string, table_name, Link, Route, Snapshot, TABLE_MAIN};

/// One interface on the path.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Hop {
    /// `pod-eth0`, `host-veth`, `bridge`, `vxlan`, `uplink`.
    pub role: String,
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
    /// Which way traffic of the pod crosses it: `egress`, `ingress` or `both`.
    pub direction: String,
    /// VXLAN devices: VNI, local VTEP, UDP port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vni: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vtep: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Uplinks: `primary` (the node's main default route) or `eni` (a secondary NIC chosen by
    /// policy routing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uplink: Option<String>,
    /// The namespace as a path, for attaching probes (not serialized: `netns` has it).
    #[serde(skip)]
    pub netns_path: Option<PathBuf>,
}

/// The VXLAN part of a decision.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct VxlanEgress {
    pub device: String,
    pub next_hop: Option<String>,
    pub next_hop_mac: Option<String>,
    pub remote_vtep: Option<String>,
    pub underlay_oif: Option<String>,
    pub underlay_gateway: Option<String>,
}

/// How the kernel routes the pod's packets to `dst`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
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

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
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
}

/// `podtrace topo`'s answer.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Topology {
    pub pod: PodInfo,
    /// `flannel-vxlan`, `bridge`, `aws-vpc-cni`, `unknown`.
    pub cni: String,
    pub hops: Vec<Hop>,
    pub route: Option<RouteDecision>,
    /// The node's primary interface (its main-table default route).
    pub primary: Option<String>,
    /// Evidence the CNI shape was decided from.
    pub evidence: Vec<String>,
    #[serde(skip)]
    pub pod_ip: Option<Ipv4Addr>,
}

/// What one side (a pod and its node) looks like.
struct Side {
    loc: PodLocation,
    node_ns: Option<PathBuf>,
    pod_snap: Snapshot,
    node_snap: Snapshot,
    eth0: Link,
    ip: Option<Ipv4Addr>,
    host_veth: Link,
}

fn ns_string(ns: Option<&Path>) -> String {
    ns.map(|p| p.display().to_string())
        .unwrap_or_else(|| "/proc/1/ns/net".to_owned())
}

fn hop_of(
    link: &Link,
    snap: &Snapshot,
    role: &str,
    owner: &str,
    node: &str,
    ns: Option<&Path>,
) -> Hop {
    Hop {
        role: role.to_owned(),
        name: format!("{owner}/{}", link.name),
        ifname: link.name.clone(),
        ifindex: link.index,
        netns: ns_string(ns),
        node: node.to_owned(),
        owner: owner.to_owned(),
        mac: link.mac.as_ref().map(|m| mac_string(m)),
        mtu: link.mtu,
        master: link.master.map(|m| snap.name_of(m)),
        kind: link.kind.clone(),
        addresses: snap
            .addrs_of(link.index)
            .map(|a| format!("{}/{}", a.ip, a.prefix))
            .collect(),
        direction: "both".to_owned(),
        vni: link.vxlan.as_ref().and_then(|v| v.vni),
        vtep: link
            .vxlan
            .as_ref()
            .and_then(|v| v.local)
            .map(|ip| ip.to_string()),
        port: link.vxlan.as_ref().and_then(|v| v.port),
        uplink: None,
        netns_path: Some(
            ns.map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("/proc/1/ns/net")),
        ),
    }
}

fn snapshot_of(ns: Option<&Path>) -> Result<Snapshot> {
    read::in_netns(ns, |h| async move { read::snapshot(&h).await })
}

/// The pod's interface: `eth0`, else its only veth with an IPv4 address.
fn pod_interface(snap: &Snapshot) -> Result<Link> {
    if let Some(l) = snap.link_by_name("eth0") {
        return Ok(l.clone());
    }
    let candidates: Vec<&Link> = snap
        .links
        .iter()
        .filter(|l| l.kind == "veth" && snap.addrs_of(l.index).next().is_some())
        .collect();
    match candidates.as_slice() {
        [one] => Ok((*one).clone()),
        [] => bail!("the pod's namespace has no eth0 and no veth with an address"),
        _ => bail!("the pod's namespace has several veths and no eth0"),
    }
}

/// Namespaces where a pod's node could be: the root namespace and every named one.
fn candidate_node_namespaces(pod_ns: &Path) -> Vec<Option<PathBuf>> {
    let pod_ino = crate::netns::inode_of(pod_ns).ok();
    let mut out = vec![None];
    for name in crate::netns::list().unwrap_or_default() {
        let p = crate::netns::path_of(&name);
        if crate::netns::inode_of(&p).ok() != pod_ino {
            out.push(Some(p));
        }
    }
    out
}

fn resolve_side(loc: &PodLocation) -> Result<Side> {
    let pod_snap = snapshot_of(Some(&loc.netns)).with_context(|| {
        format!(
            "reading pod {}'s namespace {}",
            loc.name,
            loc.netns.display()
        )
    })?;
    let eth0 = pod_interface(&pod_snap)?;
    let ip = pod_snap
        .addrs_of(eth0.index)
        .map(|a| a.ip)
        .find(|ip| !ip.is_loopback() && !ip.is_link_local());
    let peer_index = eth0
        .link
        .filter(|_| eth0.link_netnsid.is_some() && eth0.kind == "veth")
        .ok_or_else(|| {
            anyhow!(
                "{} in pod {} is not a veth with a peer in another namespace",
                eth0.name,
                loc.name
            )
        })?;
    let is_peer = |snap: &Snapshot| {
        snap.link(peer_index)
            .filter(|l| l.kind == "veth" && l.link == Some(eth0.index) && l.link_netnsid.is_some())
            .cloned()
    };
    let (node_ns, node_snap, host_veth) = match &loc.node_netns {
        Some(ns) => {
            let snap = snapshot_of(Some(ns)).with_context(|| {
                format!("reading node {}'s namespace {}", loc.node, ns.display())
            })?;
            let veth = is_peer(&snap).ok_or_else(|| {
                anyhow!(
                    "pod {}'s veth peer (ifindex {peer_index}) is not in node {}'s namespace",
                    loc.name,
                    loc.node
                )
            })?;
            (Some(ns.clone()), snap, veth)
        }
        None => {
            let mut found = Vec::new();
            for ns in candidate_node_namespaces(&loc.netns) {
                if let Ok(snap) = snapshot_of(ns.as_deref()) {
                    if let Some(veth) = is_peer(&snap) {
                        found.push((ns, snap, veth));
                    }
                }
            }
            match found.len() {
                1 => found.remove(0),
                0 => bail!(
                    "the peer of pod {}'s {} (ifindex {peer_index}) is in no namespace podtrace can see",
                    loc.name,
                    eth0.name
                ),
                _ => bail!(
                    "the peer of pod {}'s {} matches in several namespaces; name the pod another way",
                    loc.name,
                    eth0.name
                ),
            }
        }
    };
    let mut loc = loc.clone();
    if loc.node_netns.is_none() {
        if let Some(name) = node_ns.as_deref().and_then(pod::lab_node_name) {
            loc.node = name;
        }
    }
    Ok(Side {
        loc,
        node_ns,
        pod_snap,
        node_snap,
        eth0,
        ip,
        host_veth,
    })
}

impl Side {
    fn pod_hop(&self) -> Hop {
        hop_of(
            &self.eth0,
            &self.pod_snap,
            "pod-eth0",
            &self.loc.name,
            &self.loc.node,
            Some(&self.loc.netns),
        )
    }

    fn node_hop(&self, link: &Link, role: &str) -> Hop {
        hop_of(
            link,
            &self.node_snap,
            role,
            &self.loc.node,
            &self.loc.node,
            self.node_ns.as_deref(),
        )
    }

    fn bridge(&self) -> Option<&Link> {
        self.host_veth
            .master
            .and_then(|m| self.node_snap.link(m))
            .filter(|l| l.kind == "bridge")
    }

    /// The node's primary interface: the main table's default route device.
    fn primary(&self) -> Option<&Link> {
        self.node_snap
            .routes
            .iter()
            .filter(|r| r.table == TABLE_MAIN && r.prefix == 0)
            .min_by_key(|r| r.metric)
            .and_then(|r| r.oif)
            .and_then(|i| self.node_snap.link(i))
    }

    /// Hops from the node's uplinks into this pod, for a destination pod on another node:
    /// uplink → vxlan → bridge → host veth → pod eth0, as this node's routing delivers it.
    fn inbound_hops(&self, remote_vtep_peer: Option<Ipv4Addr>) -> Vec<Hop> {
        let mut hops = Vec::new();
        if let Some(ip) = self.ip {
            if self.bridge().is_some() {
                // The VXLAN device that would decapsulate: the one whose VTEP is local here.
                if let Some(vx) = self.node_snap.links.iter().find(|l| l.kind == "vxlan") {
                    if let Some(dev) = vx
                        .vxlan
                        .as_ref()
                        .and_then(|v| v.dev)
                        .or_else(|| {
                            let local = vx.vxlan.as_ref()?.local?;
                            self.node_snap.owner_of(local).map(|l| l.index)
                        })
                        .and_then(|i| self.node_snap.link(i))
                    {
                        let mut h = self.node_hop(dev, "uplink");
                        h.direction = "ingress".into();
                        hops.push(h);
                    }
                    hops.push(self.node_hop(vx, "vxlan"));
                }
                if let Some(br) = self.bridge() {
                    hops.push(self.node_hop(br, "bridge"));
                }
            } else if let Some(r) = self
                .node_snap
                .lookup(TABLE_MAIN, remote_vtep_peer.unwrap_or(ip))
            {
                if let Some(l) = r.oif.and_then(|i| self.node_snap.link(i)) {
                    hops.push(self.node_hop(l, "uplink"));
                }
            }
        }
        hops.push(self.node_hop(&self.host_veth, "host-veth"));
        hops.push(self.pod_hop());
        hops
    }
}

fn route_string(r: &Route, snap: &Snapshot) -> String {
    let mut s = if r.prefix == 0 {
        "default".to_owned()
    } else {
        format!("{}/{}", r.dst, r.prefix)
    };
    if let Some(gw) = r.gateway {
        s += &format!(" via {gw}");
    }
    if let Some(oif) = r.oif {
        s += &format!(" dev {}", snap.name_of(oif));
    }
    if r.onlink {
        s += " onlink";
    }
    if r.table != TABLE_MAIN {
        s += &format!(" table {}", table_name(r.table));
    }
    s
}

/// Decides the CNI shape from what the node shows.
fn classify(side: &Side, decision: Option<&RouteDecision>) -> (String, Vec<String>) {
    let mut evidence = Vec::new();
    if let Some(br) = side.bridge() {
        evidence.push(format!(
            "host veth {} is a port of bridge {}",
            side.host_veth.name, br.name
        ));
        let vxlan_routes: Vec<&Route> = side
            .node_snap
            .routes
            .iter()
            .filter(|r| {
                r.oif
                    .and_then(|i| side.node_snap.link(i))
                    .is_some_and(|l| l.kind == "vxlan")
                    && r.prefix > 0
            })
            .collect();
        if let Some(r) = vxlan_routes.first() {
            evidence.push(format!(
                "pod networks are routed over VXLAN ({})",
                route_string(r, &side.node_snap)
            ));
            return ("flannel-vxlan".into(), evidence);
        }
        if decision.is_some_and(|d| d.vxlan.is_some()) {
            return ("flannel-vxlan".into(), evidence);
        }
        return ("bridge".into(), evidence);
    }
    if let Some(ip) = side.ip {
        let src_rules = rules::source_rules_for(&side.node_snap, ip);
        let host_route = side
            .node_snap
            .routes
            .iter()
            .find(|r| r.prefix == 32 && r.dst == ip && r.oif == Some(side.host_veth.index));
        if let Some(hr) = host_route {
            evidence.push(format!(
                "routed veth: {}",
                route_string(hr, &side.node_snap)
            ));
        }
        for r in &src_rules {
            evidence.push(format!(
                "per-pod rule {}: {} {}",
                r.priority,
                r.selector(),
                r.action_string()
            ));
        }
        if host_route.is_some() && !src_rules.is_empty() {
            return ("aws-vpc-cni".into(), evidence);
        }
        if host_route.is_some() {
            // A routed veth without per-pod tables: the AWS VPC CNI for a pod on the primary
            // ENI looks like this too, as do Calico and Cilium; say what we saw.
            evidence.push("no per-pod source rule: traffic uses the main table".into());
        }
    }
    ("unknown".into(), evidence)
}

/// Resolves a pod's topology, and with `dst` the path and routing decision towards it.
/// `dest_pod` is the destination's own location when podtrace can observe it (a lab pod).
pub fn resolve(
    loc: &PodLocation,
    dst: Option<Ipv4Addr>,
    dest_pod: Option<&PodLocation>,
) -> Result<Topology> {
    let side = resolve_side(loc)?;
    let mut hops = vec![side.pod_hop(), side.node_hop(&side.host_veth, "host-veth")];
    if let Some(br) = side.bridge() {
        hops.push(side.node_hop(br, "bridge"));
    }
    let primary = side.primary().map(|l| l.name.clone());

    let mut decision = None;
    if let (Some(dst), Some(src)) = (dst, side.ip) {
        let (d, more) = decide(&side, src, dst, dest_pod)?;
        hops.extend(more);
        decision = Some(d);
    } else if dst.is_some() {
        bail!("pod {} has no IPv4 address on {}", loc.name, side.eth0.name);
    }
    // Mark uplinks: primary or ENI.
    for h in hops.iter_mut().filter(|h| h.role == "uplink") {
        if h.node == side.loc.node {
            h.uplink = Some(if Some(&h.ifname) == primary.as_ref() {
                "primary".into()
            } else {
                "eni".into()
            });
        }
    }
    let (cni, evidence) = classify(&side, decision.as_ref());
    if cni != "aws-vpc-cni" {
        for h in hops.iter_mut().filter(|h| h.role == "uplink") {
            if h.uplink.as_deref() == Some("eni") {
                h.uplink = Some("underlay".into());
            }
        }
    }
    Ok(Topology {
        pod: PodInfo {
            name: side.loc.name.clone(),
            namespace: side.loc.namespace.clone(),
            node: side.loc.node.clone(),
            ip: side.ip.map(|i| i.to_string()),
            netns: side.loc.netns.display().to_string(),
            node_netns: ns_string(side.node_ns.as_deref()),
            ifname: side.eth0.name.clone(),
            mac: side.eth0.mac.as_ref().map(|m| mac_string(m)),
            source: side.loc.source.clone(),
        },
        cni,
        hops,
        route: decision,
        primary,
        evidence,
        pod_ip: side.ip,
    })
}

/// The routing decision for src → dst as the node sees the pod's packets, and the hops past
/// the node's bridge.
fn decide(
    side: &Side,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    dest_pod: Option<&PodLocation>,
) -> Result<(RouteDecision, Vec<Hop>)> {
    let snap = &side.node_snap;
    // Packets of a bridged pod enter IP on the bridge; of a routed pod, on its veth.
    let iif = side.bridge().unwrap_or(&side.host_veth).clone();
    let kernel = read::in_netns(side.node_ns.as_deref(), |h| async move {
        read::route_get(&h, dst, Some(src), Some(iif.index)).await
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
    let mut hops = Vec::new();
    let mut vxlan = None;
    let gateway = kernel.gateway;
    match oif.kind.as_str() {
        "bridge" => {
            // The destination is on this node's bridge: another pod behind another port.
            if let Some(dp) = dest_pod.filter(|d| {
                d.node_netns
                    .as_ref()
                    .and_then(|p| crate::netns::inode_of(p).ok())
                    == side
                        .node_ns
                        .as_deref()
                        .and_then(|p| crate::netns::inode_of(p).ok())
            }) {
                let other = resolve_side(dp)?;
                hops.push(other.node_hop(&other.host_veth, "host-veth"));
                hops.push(other.pod_hop());
            } else {
                notes.push(format!("{dst} is on bridge {} (same node)", oif.name));
            }
        }
        "vxlan" => {
            hops.push(side.node_hop(&oif, "vxlan"));
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
                let ur = read::in_netns(side.node_ns.as_deref(), |h| async move {
                    read::route_get(&h, vtep, local, None).await
                })?;
                if let Some(ul) = ur.oif.and_then(|i| snap.link(i)) {
                    under.underlay_oif = Some(ul.name.clone());
                    let mut h = side.node_hop(ul, "uplink");
                    h.direction = "egress".into();
                    hops.push(h);
                }
                under.underlay_gateway = ur.gateway.map(|g| g.to_string());
            }
            vxlan = Some(under);
            if let Some(dp) = dest_pod {
                let other = resolve_side(dp)?;
                hops.extend(other.inbound_hops(None));
            }
        }
        _ => {
            let mut h = side.node_hop(&oif, "uplink");
            h.direction = "egress".into();
            hops.push(h);
            if let Some(dp) = dest_pod {
                if dp.node_netns != side.loc.node_netns {
                    let other = resolve_side(dp)?;
                    hops.extend(other.inbound_hops(None));
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
    ))
}
