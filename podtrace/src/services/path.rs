//! The path through a rewrite: what `follow` and `capture` trace when the pod's node rewrites
//! the destination (a Service frontend: kube-proxy's DNAT to a backend) or the source (a
//! masquerade of pod traffic leaving the pod network).
//!
//! For a Service, each backend is a possible end of the path: its side is found through the
//! pod resolvers (a lab pod, a pod of the same runtime) and the path to it resolved as for a
//! pod IP (the translated packet is routed like one); a backend that is the pod itself is the
//! hairpin (out of the pod's veth and back into it). The plan then holds every interface of
//! every such path once, each backend's own expected path, and the kernel filter's translated
//! forms: the pod (or the address it is masqueraded to) with each backend address and port.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::Result;

use super::{
    model::{NodeServices, ServicePort, SnatVerdict},
    read,
};
use crate::{
    pods::{Chain, PodLocation},
    topology::{self, plan::Builder, Role, Topology},
    trace::{
        nat::{NatKind, NatPlan, NatTarget, RejectRule, ServiceInfo},
        plan::{FlowFilter, Hook, NatFlow, Plan, Step},
    },
};

/// A backend as the node's rules define it, before its path is known.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetSpec {
    pub ip: Ipv4Addr,
    pub port: Option<u16>,
    pub chain: Option<String>,
    pub share: f64,
    /// Why the node masquerades connections to it (`None`: it does not).
    pub masquerade: Option<String>,
    /// The backend is the pod itself.
    pub hairpin: bool,
}

/// What a destination is to the node's rules.
#[derive(Debug, Clone, PartialEq)]
pub enum Rewrite<'a> {
    /// A Service frontend (one or more service ports: several ports of one VIP when no
    /// port was given).
    Service {
        ports: Vec<&'a ServicePort>,
        frontend: String,
        targets: Vec<TargetSpec>,
    },
    /// A source NAT of the pod's traffic to it.
    Masquerade {
        rule: String,
        to_source: Option<Ipv4Addr>,
    },
    None,
}

fn proto_name(p: u8) -> Option<&'static str> {
    match p {
        6 => Some("tcp"),
        17 => Some("udp"),
        132 => Some("sctp"),
        _ => None,
    }
}

/// What `pod → dst` (`port`, `proto` when given) is to a node's rules; `node_ips` are the
/// node's own addresses (a NodePort on one of them is translated there).
pub fn rewrite<'a>(
    svc: &'a NodeServices,
    ruleset: &super::iptables::Ruleset,
    pod: Ipv4Addr,
    dst: Ipv4Addr,
    port: Option<u16>,
    proto: Option<u8>,
    node_ips: &[Ipv4Addr],
) -> Rewrite<'a> {
    let ports: Vec<&ServicePort> = svc
        .lookup(dst, port, node_ips)
        .into_iter()
        .filter(|s| proto.is_none_or(|p| proto_name(p) == Some(s.protocol.as_str())))
        .collect();
    if !ports.is_empty() {
        let node_port = node_ips.contains(&dst);
        let frontend = if node_port {
            "nodeport".to_owned()
        } else {
            ports[0]
                .external
                .iter()
                .find(|f| f.ip == dst)
                .map(|f| f.kind.clone())
                .unwrap_or_else(|| "cluster IP".to_owned())
        };
        let mut targets = Vec::new();
        for s in &ports {
            // kube-proxy marks for masquerade: traffic to a NodePort or external IP (its
            // KUBE-EXT chain), to a cluster IP from outside the cluster CIDR, and a backend
            // reaching itself (hairpin).
            let svc_masq = if node_port || frontend != "cluster IP" {
                Some("kube-proxy masquerades traffic to a NodePort or external IP (KUBE-EXT → KUBE-MARK-MASQ)".to_owned())
            } else {
                s.masquerade_unless_from
                    .filter(|net| !net.contains(pod))
                    .map(|net| {
                        format!(
                            "{pod} is outside kube-proxy's cluster CIDR {net}: {} marks it for masquerade",
                            s.chain.as_deref().unwrap_or("the service chain")
                        )
                    })
            };
            for b in &s.backends {
                let hairpin = b.ip == pod;
                let masquerade = if hairpin {
                    Some(format!(
                        "hairpin: {} marks the backend's own traffic for masquerade (-s {} -j KUBE-MARK-MASQ), so the reply comes back through the node",
                        b.chain, b.ip
                    ))
                } else {
                    svc_masq.clone()
                };
                targets.push(TargetSpec {
                    ip: b.ip,
                    port: b.port,
                    chain: Some(b.chain.clone()),
                    share: b.share,
                    masquerade,
                    hairpin,
                });
            }
        }
        return Rewrite::Service {
            ports,
            frontend,
            targets,
        };
    }
    match svc.snat_for(ruleset, pod, dst) {
        SnatVerdict::Translated { rule } => Rewrite::Masquerade {
            to_source: rule
                .to_source
                .as_deref()
                .and_then(|t| super::iptables::parse_addr_port(t).map(|(a, _)| a)),
            rule: format!("{} {}: {}", rule.chain, rule.target, rule.text),
        },
        _ => Rewrite::None,
    }
}

/// The kernel filter's translated forms: the pod and, where masqueraded, its masquerade
/// address, each with every target (and its port).
pub fn nat_flows(pod: Ipv4Addr, proto: Option<u8>, targets: &[NatTarget]) -> Vec<NatFlow> {
    let protos: Vec<u8> = match proto {
        Some(p) => vec![p],
        None => vec![6, 17, 1],
    };
    let mut out: Vec<NatFlow> = Vec::new();
    for t in targets {
        for a in std::iter::once(pod).chain(t.snat) {
            for p in &protos {
                let flow = NatFlow {
                    a,
                    b: t.ip,
                    // ICMP has no ports; a masquerade target keeps the user's port.
                    port: if *p == 1 { None } else { t.port },
                    proto: *p,
                };
                if !out.contains(&flow) {
                    out.push(flow);
                }
            }
        }
    }
    out
}

/// The plan for `pod → dst` when the node rewrites it; `None` when it does not (or its rules
/// cannot be read): then the plain plan applies.
pub struct NatPath {
    pub topo: Topology,
    pub plan: Plan,
}

/// The first IPv4 address of the interface `ifname` in a namespace read by `topo`: the
/// source MASQUERADE picks for packets leaving through it.
fn address_of(topo: &Topology, ns: &Path, ifname: &str) -> Option<Ipv4Addr> {
    let snap = topo.namespaces.cached(ns)?;
    let link = snap.link_by_name(ifname)?;
    let ip = snap.addrs_of(link.index).map(|a| a.ip).next();
    ip
}

fn bridge_nf_call_iptables(ns: &Path) -> Option<bool> {
    crate::netns::run_in(Some(ns), || {
        Ok(crate::netns::sysctl_get("net/bridge/bridge-nf-call-iptables").ok())
    })
    .ok()
    .flatten()
    .map(|v| v == "1")
}

/// Builds the plan through the node's rewrite of `dst`, if it rewrites it.
pub fn plan(
    loc: &PodLocation,
    dst: Ipv4Addr,
    port: Option<u16>,
    proto: Option<u8>,
    chain: &Chain,
) -> Result<Option<NatPath>> {
    // The pod's own side, and its node.
    let side = topology::resolve(loc, None, None, chain)?;
    let Some(pod_ip) = side.pod_ip else {
        return Ok(None);
    };
    let node_ns = PathBuf::from(&side.pod.node_netns);
    let rules = match read::read_node(Some(&node_ns)) {
        Ok(r) => r,
        Err(e) => {
            log::debug!("reading {}'s rules: {e:#}", side.pod.node);
            return Ok(None);
        }
    };
    let node_ips: Vec<Ipv4Addr> = side
        .namespaces
        .cached(&node_ns)
        .map(|s| s.addrs.iter().map(|a| a.ip).collect())
        .unwrap_or_default();
    let rw = rewrite(
        &rules.services,
        &rules.ruleset,
        pod_ip,
        dst,
        port,
        proto,
        &node_ips,
    );
    let bnf = bridge_nf_call_iptables(&node_ns);
    let mut notes = Vec::new();
    match rw {
        Rewrite::None => Ok(None),
        // Packets to the node's own addresses are delivered there (PREROUTING → INPUT) and
        // never reach POSTROUTING, where the masquerade rule is.
        Rewrite::Masquerade { .. } if node_ips.contains(&dst) => Ok(None),
        Rewrite::Masquerade { rule, to_source } => {
            let dest = chain.by_ip(dst);
            let topo = topology::resolve(loc, Some(dst), dest.as_ref(), chain)?;
            let mut b = Builder::default();
            let (forward, reverse) = b.path(&topo);
            b.watch(&topo);
            let snat = to_source.or_else(|| {
                topo.route
                    .as_ref()
                    .and_then(|r| address_of(&topo, &node_ns, &r.oif))
            });
            notes.push(format!(
                "{} masquerades {pod_ip} → {dst}: {rule}",
                side.pod.node
            ));
            let target = NatTarget {
                ip: dst,
                port,
                chain: None,
                share_ppm: None,
                pod: dest.as_ref().map(|d| d.name.clone()),
                node: dest.as_ref().map(|d| d.node.clone()),
                snat,
                snat_rule: Some(rule),
                hairpin: false,
                forward: forward.clone(),
                reverse: reverse.clone(),
            };
            let mut filter = topology::plan::filter(&topo, pod_ip, Some(dst));
            filter.proto = proto;
            filter.port = port;
            filter.nat = nat_flows(pod_ip, proto, std::slice::from_ref(&target))
                .into_iter()
                .filter(|f| f.a != pod_ip)
                .collect();
            let ns = b.namespace_of(&node_ns).unwrap_or(0);
            let mut plan = b.finish(forward, reverse, filter);
            plan.nat = Some(NatPlan {
                kind: NatKind::Masquerade,
                node: side.pod.node.clone(),
                ns,
                read_with: rules.program.clone(),
                service: None,
                targets: vec![target],
                notes,
                bridge_nf_call_iptables: bnf,
            });
            Ok(Some(NatPath { topo, plan }))
        }
        Rewrite::Service {
            ports,
            frontend,
            targets: specs,
        } => {
            let s = ports[0];
            let service = ServiceInfo {
                name: s.name.clone(),
                protocol: s.protocol.clone(),
                frontend: frontend.clone(),
                ip: dst,
                port: if frontend == "nodeport" {
                    port
                } else if ports.len() == 1 {
                    s.port
                } else {
                    port
                },
                chain: s.chain.clone(),
                rejects: ports
                    .iter()
                    .flat_map(|p| &p.rejects)
                    .map(|r| RejectRule {
                        table: r.table.clone(),
                        chain: r.chain.clone(),
                        target: r.target.clone(),
                        reject_with: r.reject_with.clone(),
                        comment: r.comment.clone(),
                    })
                    .collect(),
            };
            let mut b = Builder::default();
            // The pod's side first: its hops lead every path.
            let (side_fwd, _) = b.path(&side);
            b.watch(&side);
            let mut targets = Vec::new();
            let mut topos = Vec::new();
            for t in &specs {
                let dest = chain.by_ip(t.ip);
                let (forward, reverse, snat) = if t.hairpin {
                    // Out of the pod's veth and back into it (the bridge's hairpin mode).
                    let veth = side_fwd.get(1).map(|s| s.hop);
                    let bridge = side
                        .hops
                        .iter()
                        .find(|h| h.role == Role::Bridge)
                        .map(|h| (b.hop(&side, h, true), h.clone()));
                    let mut fwd = vec![side_fwd[0]];
                    if let Some(v) = veth {
                        fwd.push(Step {
                            hop: v,
                            hook: Hook::Ingress,
                        });
                        if let Some((id, _)) = &bridge {
                            fwd.push(Step {
                                hop: *id,
                                hook: Hook::Bridged,
                            });
                        }
                        fwd.push(Step {
                            hop: v,
                            hook: Hook::Egress,
                        });
                    }
                    fwd.push(Step {
                        hop: side_fwd[0].hop,
                        hook: Hook::Ingress,
                    });
                    let snat = bridge.as_ref().and_then(|(_, h)| {
                        h.addresses
                            .iter()
                            .find_map(|a| a.split('/').next()?.parse().ok())
                    });
                    (fwd.clone(), fwd, snat)
                } else {
                    let topo = topology::resolve(loc, Some(t.ip), dest.as_ref(), chain)?;
                    let (forward, reverse) = b.path(&topo);
                    b.watch(&topo);
                    let snat = t.masquerade.as_ref().and_then(|_| {
                        topo.route
                            .as_ref()
                            .and_then(|r| address_of(&topo, &node_ns, &r.oif))
                    });
                    topos.push(topo);
                    (forward, reverse, snat)
                };
                targets.push(NatTarget {
                    ip: t.ip,
                    port: t.port,
                    chain: t.chain.clone(),
                    share_ppm: Some((t.share * 1e6).round() as u32),
                    pod: dest.as_ref().map(|d| d.name.clone()),
                    node: dest.as_ref().map(|d| d.node.clone()),
                    snat: if t.masquerade.is_some() { snat } else { None },
                    snat_rule: t.masquerade.clone(),
                    hairpin: t.hairpin,
                    forward,
                    reverse,
                });
            }
            if targets.iter().any(|t| t.hairpin) {
                notes.push(format!(
                    "a backend is {} itself: its packets come back out of its own veth (the bridge port's hairpin mode) masqueraded to the bridge's address",
                    side.pod.name
                ));
            }
            // Without a backend the packet goes where the node routes the frontend, until a
            // rule rejects it.
            let (forward, reverse) = match targets.first() {
                Some(t) => (t.forward.clone(), t.reverse.clone()),
                None => {
                    let topo = topology::resolve(loc, Some(dst), None, chain)?;
                    let p = b.path(&topo);
                    b.watch(&topo);
                    topos.push(topo);
                    p
                }
            };
            let mut filter: FlowFilter = topology::plan::filter(&side, pod_ip, Some(dst));
            for t in &topos {
                filter
                    .vxlan_ports
                    .extend(topology::plan::filter(t, pod_ip, None).vxlan_ports);
            }
            filter.vxlan_ports.sort_unstable();
            filter.vxlan_ports.dedup();
            filter.proto = proto;
            filter.port = port;
            filter.nat = nat_flows(pod_ip, proto.or_else(|| proto_of(&s.protocol)), &targets);
            let ns = b.namespace_of(&node_ns).unwrap_or(0);
            let mut plan = b.finish(forward, reverse, filter);
            if bnf == Some(false) {
                notes.push(format!(
                    "net.bridge.bridge-nf-call-iptables is 0 on {}: replies bridged between its pods skip netfilter, so a same-node backend's reply is not translated back",
                    side.pod.node
                ));
            }
            plan.nat = Some(NatPlan {
                kind: NatKind::Service,
                node: side.pod.node.clone(),
                ns,
                read_with: rules.program.clone(),
                service: Some(service),
                targets,
                notes,
                bridge_nf_call_iptables: bnf,
            });
            Ok(Some(NatPath { topo: side, plan }))
        }
    }
}

fn proto_of(name: &str) -> Option<u8> {
    match name {
        "tcp" => Some(6),
        "udp" => Some(17),
        "sctp" => Some(132),
        _ => None,
    }
}
