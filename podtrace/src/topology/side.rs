//! One side of a path: a pod and its node. The pod's eth0 and, by *namespace identity*, the
//! node namespace holding the veth peer (the NSID that the pod's namespace gives it, never an
//! ifindex compared across namespaces: ifindexes collide all the time), its host veth, bridge,
//! primary interface and uplinks.
use std::{
    fs::File,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{anyhow, bail, Context as _, Result};

use super::{ns_string, root_netns, Hop, Namespaces, Role, Traversal, Uplink};
use crate::{
    netlink::{mac_string, snapshot::Link, Snapshot, TABLE_MAIN},
    pods::{Chain, PodLocation},
};

/// What one side (a pod and its node) looks like.
pub(super) struct Side {
    pub(super) loc: PodLocation,
    pub(super) node_ns: PathBuf,
    pub(super) pod_snap: Arc<Snapshot>,
    pub(super) node_snap: Arc<Snapshot>,
    pub(super) eth0: Link,
    pub(super) ip: Option<Ipv4Addr>,
    pub(super) host_veth: Link,
}

pub(super) fn hop_of(
    link: &Link,
    snap: &Snapshot,
    role: Role,
    owner: &str,
    node: &str,
    ns: &Path,
) -> Hop {
    Hop {
        role,
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
        direction: Traversal::Both,
        vni: link.vxlan.as_ref().and_then(|v| v.vni),
        vtep: link
            .vxlan
            .as_ref()
            .and_then(|v| v.local)
            .map(|ip| ip.to_string()),
        port: link.vxlan.as_ref().and_then(|v| v.port),
        uplink: None,
        netns_path: ns.to_path_buf(),
    }
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

/// Namespaces where a pod's node could be, one path per namespace: the root namespace, every
/// named one, and those of running processes (a kind-style node is a process tree's network
/// namespace with no name). The pod's own is left out.
fn candidate_node_namespaces(pod_ns: &Path) -> Vec<PathBuf> {
    let mut seen = Vec::new();
    if let Ok(i) = crate::netns::inode_of(pod_ns) {
        seen.push(i);
    }
    let mut out = Vec::new();
    let named = crate::netns::list()
        .unwrap_or_default()
        .into_iter()
        .map(|n| crate::netns::path_of(&n));
    let processes = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .map(|e| e.path().join("ns/net"));
    for p in std::iter::once(root_netns()).chain(named).chain(processes) {
        if let Ok(i) = crate::netns::inode_of(&p) {
            if !seen.contains(&i) {
                seen.push(i);
                out.push(p);
            }
        }
    }
    out
}

/// Which of `candidates` is the namespace the pod's `eth0` peers into: the one whose NSID,
/// as the pod's namespace sees it, is eth0's IFLA_LINK_NETNSID.
fn peer_namespace(pod_ns: &Path, nsid: i32, candidates: Vec<PathBuf>) -> Result<Vec<PathBuf>> {
    crate::netlink::run(Some(pod_ns), |nl| {
        let mut out = Vec::new();
        for c in candidates {
            // A process may exit, a namespace go away: not a candidate then.
            let Ok(file) = File::open(&c) else { continue };
            if nl.nsid_of(&file)? == Some(nsid) {
                out.push(c);
            }
        }
        Ok(out)
    })
}

pub(super) fn resolve_side(
    loc: &PodLocation,
    namespaces: &mut Namespaces,
    chain: &Chain,
) -> Result<Side> {
    if !loc.netns.exists() {
        // Its process exited (a `/proc/PID/ns/net` path) or the runtime removed it since the
        // pod was found.
        bail!(
            "pod {}'s network namespace {} is gone: the pod stopped while podtrace was reading it",
            loc.name,
            loc.netns.display()
        );
    }
    let pod_snap = namespaces.get(&loc.netns).with_context(|| {
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
    let (peer_index, nsid) = match (eth0.kind.as_str(), eth0.link, eth0.link_netnsid) {
        ("veth", Some(peer), Some(nsid)) => (peer, nsid),
        _ => bail!(
            "{} in pod {} is not a veth with a peer in another namespace",
            eth0.name,
            loc.name
        ),
    };
    let mut loc = loc.clone();
    let node_ns = match &loc.node_netns {
        Some(ns) => {
            // Where the pod's finder says the node is; checked all the same.
            if peer_namespace(&loc.netns, nsid, vec![ns.clone()])?.is_empty() {
                bail!(
                    "pod {}'s veth peer is not in node {}'s namespace {}",
                    loc.name,
                    loc.node,
                    ns.display()
                );
            }
            ns.clone()
        }
        None => {
            let mut found =
                peer_namespace(&loc.netns, nsid, candidate_node_namespaces(&loc.netns))?;
            match found.len() {
                1 => {
                    let ns = found.remove(0);
                    if let Some((name, named)) = chain.node_of(&ns) {
                        loc.node = name;
                        loc.node_named_by = None;
                        named
                    } else {
                        // No resolver knows it: named as the cluster would name it, where
                        // that can be known (a kubelet, a node container's hostname).
                        let named = crate::pods::node::name_of(&ns, None);
                        loc.node = named.name;
                        loc.node_named_by = Some(named.how);
                        ns
                    }
                }
                0 => bail!(
                    "the peer of pod {}'s {} (NSID {nsid} in its namespace) is in no network namespace podtrace can see",
                    loc.name,
                    eth0.name
                ),
                // NSIDs are unique per namespace: only the same namespace twice can match.
                _ => bail!(
                    "the peer of pod {}'s {} matches several namespaces ({}); name the pod another way",
                    loc.name,
                    eth0.name,
                    found.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
                ),
            }
        }
    };
    let node_snap = namespaces.get(&node_ns).with_context(|| {
        format!(
            "reading node {}'s namespace {}",
            loc.node,
            node_ns.display()
        )
    })?;
    // The ifindex is the peer's own, in the namespace just identified.
    let host_veth = node_snap
        .link(peer_index)
        .filter(|l| l.kind == "veth")
        .cloned()
        .ok_or_else(|| {
            anyhow!(
                "pod {}'s veth peer (ifindex {peer_index}) is gone from node {}'s namespace",
                loc.name,
                loc.node
            )
        })?;
    loc.node_netns = Some(node_ns.clone());
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
    pub(super) fn pod_hop(&self) -> Hop {
        hop_of(
            &self.eth0,
            &self.pod_snap,
            Role::PodEth0,
            &self.loc.name,
            &self.loc.node,
            &self.loc.netns,
        )
    }

    pub(super) fn node_hop(&self, link: &Link, role: Role) -> Hop {
        hop_of(
            link,
            &self.node_snap,
            role,
            &self.loc.node,
            &self.loc.node,
            &self.node_ns,
        )
    }

    pub(super) fn bridge(&self) -> Option<&Link> {
        self.host_veth
            .master
            .and_then(|m| self.node_snap.link(m))
            .filter(|l| l.kind == "bridge")
    }

    /// The node's primary interface: the main table's default route device.
    pub(super) fn primary(&self) -> Option<&Link> {
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
    /// `from`: the source pod's address; without an overlay, the packets come in by the
    /// interface this node routes back to it (a routed underlay: host-gw, kindnet).
    pub(super) fn inbound_hops(&self, from: Option<Ipv4Addr>) -> Vec<Hop> {
        let mut hops = Vec::new();
        if let Some(ip) = self.ip {
            let has_vxlan = self.node_snap.links.iter().any(|l| l.kind == "vxlan");
            if let (Some(br), Some(from), false) = (self.bridge(), from, has_vxlan) {
                let back =
                    crate::netlink::run(Some(&self.node_ns), |nl| nl.route_get(from, None, None))
                        .map_err(|e| {
                            log::debug!("node {}: route back to {from}: {e:#}", self.loc.node)
                        })
                        .ok();
                if let Some(l) = back
                    .and_then(|r| r.oif)
                    .filter(|i| *i != br.index)
                    .and_then(|i| self.node_snap.link(i))
                {
                    let mut h = self.node_hop(l, Role::Uplink);
                    h.direction = Traversal::Ingress;
                    hops.push(h);
                }
            }
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
                        let mut h = self.node_hop(dev, Role::Uplink);
                        h.direction = Traversal::Ingress;
                        hops.push(h);
                    }
                    hops.push(self.node_hop(vx, Role::Vxlan));
                }
                if let Some(br) = self.bridge() {
                    hops.push(self.node_hop(br, Role::Bridge));
                }
            } else if let Some(r) = self.node_snap.lookup(TABLE_MAIN, ip) {
                if let Some(l) = r.oif.and_then(|i| self.node_snap.link(i)) {
                    hops.push(self.node_hop(l, Role::Uplink));
                }
            }
        }
        hops.push(self.node_hop(&self.host_veth, Role::HostVeth));
        hops.push(self.pod_hop());
        hops
    }

    /// Every interface the node could send the pod's traffic out of: its VXLAN devices and
    /// its NICs with an address (bridges and loopback aside).
    pub(super) fn uplinks(&self, primary: Option<&str>, on_pod_node: bool) -> Vec<Hop> {
        let snap = &self.node_snap;
        snap.links
            .iter()
            .filter(|l| l.name != "lo" && l.kind != "bridge")
            .filter(|l| l.kind == "vxlan" || snap.addrs_of(l.index).next().is_some())
            .map(|l| {
                let mut hop = self.node_hop(
                    l,
                    if l.kind == "vxlan" {
                        Role::Vxlan
                    } else {
                        Role::Uplink
                    },
                );
                hop.vni = None;
                hop.vtep = None;
                hop.port = None;
                hop.master = None;
                hop.uplink = Some(if on_pod_node && Some(l.name.as_str()) == primary {
                    Uplink::Primary
                } else {
                    Uplink::Other
                });
                hop
            })
            .collect()
    }
}
