//! The part of a plan that says how the path rewrites the conversation: a Service's DNAT to
//! one of its backends (kube-proxy's rules on the pod's node), or a node's masquerade of the
//! pod's source. Plain data, as the rest of the plan: the front end builds it from the node's
//! rules ([`crate::services::path`]); the consumer judges each connection against the path
//! to the target it was really translated to.
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::plan::Step;

/// What rewrites the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NatKind {
    /// The destination is a Service frontend: DNAT to a backend (and masquerade where
    /// kube-proxy marks it).
    Service,
    /// The destination is reached through a source NAT of the pod's address.
    Masquerade,
}

/// A rule that answers instead of a backend (kube-proxy's "has no endpoints").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectRule {
    pub table: String,
    pub chain: String,
    /// `REJECT` or `DROP`.
    pub target: String,
    pub reject_with: Option<String>,
    pub comment: Option<String>,
}

/// The Service the destination is a frontend of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    /// `default/web:http`.
    pub name: String,
    /// `tcp`, `udp`.
    pub protocol: String,
    /// `cluster IP`, `nodeport`, `external IP`, `loadbalancer IP`.
    pub frontend: String,
    pub ip: Ipv4Addr,
    pub port: Option<u16>,
    /// Its `KUBE-SVC-…` chain.
    pub chain: Option<String>,
    /// Non-empty when it has no endpoints: what answers instead.
    pub rejects: Vec<RejectRule>,
}

/// Where the conversation may be translated to, and the path there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatTarget {
    /// A Service backend; for a masquerade, the destination itself.
    pub ip: Ipv4Addr,
    /// The backend port (`None`: unchanged).
    pub port: Option<u16>,
    /// Its `KUBE-SEP-…` chain.
    pub chain: Option<String>,
    /// Its share of new connections, in parts per million.
    pub share_ppm: Option<u32>,
    /// The pod at that address, when podtrace can see it, and its node.
    pub pod: Option<String>,
    pub node: Option<String>,
    /// The source the node gives the translated packets (masquerade), when it rewrites it.
    pub snat: Option<Ipv4Addr>,
    /// Why the source is rewritten (the rule or mark).
    pub snat_rule: Option<String>,
    /// The backend is the pod itself: the packet comes back out of the port it went in
    /// (the bridge's hairpin mode), masqueraded so that the reply returns through the node.
    pub hairpin: bool,
    /// The path to it and back.
    pub forward: Vec<Step>,
    pub reverse: Vec<Step>,
}

impl NatTarget {
    /// `10.244.1.5:8080 (pod-b1)`.
    pub fn label(&self) -> String {
        let port = self.port.map(|p| format!(":{p}")).unwrap_or_default();
        match &self.pod {
            Some(p) => format!("{}{port} ({p})", self.ip),
            None => format!("{}{port}", self.ip),
        }
    }
}

/// How the path rewrites the conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatPlan {
    pub kind: NatKind,
    /// The node whose rules rewrite the pod's packets, and its namespace in the plan (its
    /// conntrack table holds the translations).
    pub node: String,
    pub ns: usize,
    /// The rules were read with (`iptables-save`).
    pub read_with: String,
    pub service: Option<ServiceInfo>,
    pub targets: Vec<NatTarget>,
    /// What the node's state says about the rewrite (sysctls, hairpin mode…), one line each.
    pub notes: Vec<String>,
    /// `net.bridge.bridge-nf-call-iptables` on the node (`None`: no bridge netfilter).
    pub bridge_nf_call_iptables: Option<bool>,
}

impl NatPlan {
    /// The target with this address and port (a port of `None` on either side matches).
    pub fn target(&self, ip: Ipv4Addr, port: Option<u16>) -> Option<usize> {
        self.targets
            .iter()
            .position(|t| t.ip == ip && (t.port.is_none() || port.is_none() || t.port == port))
    }
}
