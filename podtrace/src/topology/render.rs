//! `podtrace topo` output: a hop chain a person reads at a glance, then the decision and why;
//! or one JSON object (contract in shared/design.md §2).
use std::fmt::Write as _;

use super::Topology;

/// The text form.
pub fn text(t: &Topology) -> String {
    let mut out = String::new();
    let p = &t.pod;
    let _ = writeln!(
        out,
        "pod {}/{}  ip {}  node {}  ({})",
        p.namespace,
        p.name,
        p.ip.as_deref().unwrap_or("-"),
        p.node,
        p.source
    );
    let _ = writeln!(out, "  pod netns  {}", p.netns);
    let _ = writeln!(out, "  node netns {}", p.node_netns);
    let _ = writeln!(out, "cni: {}", t.cni);
    for e in &t.evidence {
        let _ = writeln!(out, "  - {e}");
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "hops:");
    let width = t.hops.iter().map(|h| h.name.len()).max().unwrap_or(10);
    for (i, h) in t.hops.iter().enumerate() {
        let mut details = format!("if {:<3} mtu {:<5}", h.ifindex, h.mtu);
        if let Some(mac) = &h.mac {
            let _ = write!(details, " {mac}");
        }
        if !h.addresses.is_empty() {
            let _ = write!(details, "  {}", h.addresses.join(" "));
        }
        if let Some(m) = &h.master {
            let _ = write!(details, "  master {m}");
        }
        if let Some(vni) = h.vni {
            let _ = write!(details, "  vni {vni}");
        }
        if let Some(v) = &h.vtep {
            let _ = write!(details, " local {v}");
        }
        if let Some(port) = h.port {
            let _ = write!(details, " dstport {port}");
        }
        if let Some(u) = &h.uplink {
            let _ = write!(details, "  ({u})");
        }
        let arrow = if i == 0 { " " } else { "→" };
        let _ = writeln!(
            out,
            "  {arrow} {:<width$}  {:<9}  {details}",
            h.name, h.role
        );
    }
    if let Some(r) = &t.route {
        let _ = writeln!(out);
        let _ = writeln!(out, "route to {} (from {} iif {}):", r.dst, r.src, r.iif);
        match (r.rule_priority, &r.rule) {
            (Some(prio), Some(rule)) => {
                let _ = writeln!(out, "  rule   {prio}: {rule}");
            }
            _ => {
                let _ = writeln!(out, "  rule   (not determined)");
            }
        }
        let _ = writeln!(out, "  table  {}", r.table_name);
        let _ = writeln!(out, "  route  {}", r.route);
        let _ = writeln!(
            out,
            "  egress {}{}",
            r.oif,
            r.gateway
                .as_ref()
                .map(|g| format!(" via {g}"))
                .unwrap_or_default()
        );
        if let Some(v) = &r.vxlan {
            let _ = writeln!(
                out,
                "  vxlan  {}: next hop {} is {} → FDB sends it to VTEP {}",
                v.device,
                v.next_hop.as_deref().unwrap_or("-"),
                v.next_hop_mac.as_deref().unwrap_or("(no neighbour entry)"),
                v.remote_vtep.as_deref().unwrap_or("(no FDB entry)")
            );
            if let Some(u) = &v.underlay_oif {
                let _ = writeln!(
                    out,
                    "  underlay {} leaves by {}{}",
                    v.remote_vtep.as_deref().unwrap_or("-"),
                    u,
                    v.underlay_gateway
                        .as_ref()
                        .map(|g| format!(" via {g}"))
                        .unwrap_or_default()
                );
            }
        }
        for n in &r.notes {
            let _ = writeln!(out, "  note   {n}");
        }
    }
    if let Some(p) = &t.primary {
        let _ = writeln!(out, "node primary interface: {p}");
    }
    out
}

/// The JSON form: one object.
pub fn json(t: &Topology) -> String {
    serde_json::to_string(t).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}
