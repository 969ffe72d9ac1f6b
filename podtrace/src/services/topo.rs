//! What `podtrace topo POD --dst IP` adds when the node's rules rewrite the destination or
//! the source: a Service frontend (cluster IP, external or load-balancer IP) with its
//! backends, or "no endpoints" and the REJECT; or the masquerade of the pod's traffic. Read
//! from the node's own rules ([`super::read`]).
use std::{fmt::Write as _, net::Ipv4Addr, path::Path};

use serde::Serialize;

use super::{
    model::{Reject, SnatVerdict},
    read,
};

/// A backend as `topo` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BackendView {
    pub ip: Ipv4Addr,
    pub port: Option<u16>,
    /// Share of new connections (0..1).
    pub share: f64,
    pub chain: String,
    /// The lab pod with this address, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// One service port the destination is a frontend of.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServiceView {
    /// `default/web:http`.
    pub name: String,
    pub protocol: String,
    /// `cluster IP`, `external IP` or `loadbalancer IP`.
    pub frontend: String,
    pub ip: Ipv4Addr,
    pub port: Option<u16>,
    pub node_ports: Vec<u16>,
    pub chain: Option<String>,
    pub backends: Vec<BackendView>,
    /// kube-proxy's rules for a port without endpoints.
    pub rejects: Vec<Reject>,
}

/// The destination is a Service: what the pod's node does with it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServiceAnswer {
    /// The node whose rules were read.
    pub node: String,
    /// The program that printed them (`iptables-save`).
    pub read_with: String,
    pub services: Vec<ServiceView>,
}

/// Whether `dst` is a Service frontend in the rules of the node at `node_ns` (`None`:
/// podtrace's own namespace, the node of a real cluster). `None` when it is not, or when the
/// rules cannot be read (no iptables-save: topo goes on without).
pub fn lookup(
    node_ns: Option<&Path>,
    node: &str,
    dst: Ipv4Addr,
    pods: &crate::pods::Chain,
) -> Option<ServiceAnswer> {
    let rules = match read::read_node(node_ns) {
        Ok(r) => r,
        Err(e) => {
            log::debug!("reading {node}'s Services: {e:#}");
            return None;
        }
    };
    let services: Vec<ServiceView> = rules
        .services
        .lookup(dst, None, &[])
        .into_iter()
        .map(|s| {
            let frontend = s
                .external
                .iter()
                .find(|f| f.ip == dst)
                .map(|f| (f.kind.clone(), Some(f.port)))
                .unwrap_or_else(|| ("cluster IP".to_owned(), s.port));
            ServiceView {
                name: s.name.clone(),
                protocol: s.protocol.clone(),
                frontend: frontend.0,
                ip: dst,
                port: frontend.1,
                node_ports: s.node_ports.clone(),
                chain: s.chain.clone(),
                backends: s
                    .backends
                    .iter()
                    .map(|b| {
                        let pod = pods.by_ip(b.ip);
                        BackendView {
                            ip: b.ip,
                            port: b.port,
                            share: b.share,
                            chain: b.chain.clone(),
                            node: pod.as_ref().map(|p| p.node.clone()),
                            pod: pod.map(|p| p.name),
                        }
                    })
                    .collect(),
                rejects: s.rejects.clone(),
            }
        })
        .collect();
    (!services.is_empty()).then(|| ServiceAnswer {
        node: node.to_owned(),
        read_with: rules.program,
        services,
    })
}

/// How the pod's node rewrites the source of `src` → `dst` on the way out, when it does.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SnatAnswer {
    pub node: String,
    #[serde(flatten)]
    pub verdict: SnatVerdict,
}

/// The node's source NAT for `src` → `dst` (`None`: unchanged, or the rules are unreadable).
pub fn snat(
    node_ns: Option<&Path>,
    node: &str,
    src: Ipv4Addr,
    dst: Ipv4Addr,
) -> Option<SnatAnswer> {
    let rules = read::read_node(node_ns).ok()?;
    match rules.services.snat_for(&rules.ruleset, src, dst) {
        SnatVerdict::Unchanged => None,
        verdict => Some(SnatAnswer {
            node: node.to_owned(),
            verdict,
        }),
    }
}

/// The text `topo` prints for a Service destination.
pub fn service_text(a: &ServiceAnswer) -> String {
    let mut out = String::new();
    for s in &a.services {
        let port = s.port.map(|p| format!(":{p}")).unwrap_or_default();
        let _ = writeln!(
            out,
            "service {}  {}{port}/{} is its {} (kube-proxy iptables rules on {}, read with {})",
            s.name, s.ip, s.protocol, s.frontend, a.node, a.read_with
        );
        if let Some(c) = &s.chain {
            let _ = writeln!(out, "  chain  {c}");
        }
        if !s.node_ports.is_empty() {
            let ports: Vec<String> = s.node_ports.iter().map(u16::to_string).collect();
            let _ = writeln!(out, "  nodeport {} on every node address", ports.join(", "));
        }
        if s.backends.is_empty() {
            let _ = writeln!(
                out,
                "  no endpoints: new connections are rejected (the client sees connection \
                 refused):"
            );
            for r in &s.rejects {
                let _ = writeln!(
                    out,
                    "    {} {}: {}{}{}",
                    r.table,
                    r.chain,
                    r.target,
                    r.reject_with
                        .as_deref()
                        .map(|w| format!(" {w}"))
                        .unwrap_or_default(),
                    r.port.map(|p| format!(" (port {p})")).unwrap_or_default()
                );
            }
        } else {
            let _ = writeln!(out, "  backends (DNAT on {}):", a.node);
            for b in &s.backends {
                let port = b.port.map(|p| format!(":{p}")).unwrap_or_default();
                let who = match (&b.pod, &b.node) {
                    (Some(p), Some(n)) => format!("  {p} on {n}"),
                    _ => String::new(),
                };
                let _ = writeln!(
                    out,
                    "    {}{port}  {:>5.1}%  {}{who}",
                    b.ip,
                    b.share * 100.0,
                    b.chain
                );
            }
        }
    }
    out
}

/// The line `topo` prints for a masqueraded destination.
pub fn snat_text(a: &SnatAnswer, src: Ipv4Addr, dst: Ipv4Addr) -> String {
    match &a.verdict {
        SnatVerdict::Translated { rule } => format!(
            "snat   {} rewrites the source of {src} → {dst} ({} {}{}): {}\n",
            a.node,
            rule.chain,
            rule.target,
            rule.to_source
                .as_deref()
                .map(|t| format!(" to {t}"))
                .unwrap_or_else(|| " to the outgoing interface's address".to_owned()),
            rule.text
        ),
        SnatVerdict::Undecided { rule } => format!(
            "snat   {} may rewrite the source of {src} → {dst}, depending on: {rule}\n",
            a.node
        ),
        SnatVerdict::Unchanged => String::new(),
    }
}
