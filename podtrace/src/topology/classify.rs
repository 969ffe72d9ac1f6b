//! The CNI shape of a pod's node, decided from what the node shows (bridge masters, VXLAN
//! devices and their routes, routed veths with per-pod source rules), never from names.
use super::{rules, side::Side, Cni, RouteDecision};
use crate::netlink::{
    snapshot::{table_name, Route},
    Snapshot, TABLE_MAIN,
};

/// A route as `ip route` prints it.
pub fn route_string(r: &Route, snap: &Snapshot) -> String {
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
pub(super) fn classify(side: &Side, decision: Option<&RouteDecision>) -> (Cni, Vec<String>) {
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
            return (Cni::FlannelVxlan, evidence);
        }
        if decision.is_some_and(|d| d.vxlan.is_some()) {
            return (Cni::FlannelVxlan, evidence);
        }
        return (Cni::Bridge, evidence);
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
            return (Cni::AwsVpcCni, evidence);
        }
        if host_route.is_some() {
            // A routed veth without per-pod tables: the AWS VPC CNI for a pod on the primary
            // ENI looks like this too, as do Calico and Cilium; say what we saw.
            evidence.push("no per-pod source rule: traffic uses the main table".into());
        }
    }
    (Cni::Unknown, evidence)
}
