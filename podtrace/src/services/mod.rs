//! Kubernetes Services as a node really implements them: kube-proxy's iptables rules read
//! back from the node, as a typed model.
//!
//! - [`iptables`]: a total parser of `iptables-save` output.
//! - [`model`]: kube-proxy's chains → service ports (cluster IP, NodePorts, external IPs),
//!   backends with their probabilities and chains, "has no endpoints" REJECTs; the node's
//!   SNAT rules and whether a packet is masqueraded.
//! - [`read`]: `iptables-save` inside a node's namespace.
//! - [`kubeproxy`]: writing rules as kube-proxy does (the lab programs its nodes with it).
//! - [`topo`]: what `podtrace topo --dst` says when the destination is a Service.
//! - [`path`]: the plan `follow` and `capture` trace through a Service (to each backend) or a
//!   masquerade.
//!
//! IPVS mode and eBPF service load balancers (Cilium, Calico eBPF) program no such rules and
//! are not read.
pub mod iptables;
pub mod kubeproxy;
pub mod model;
pub mod path;
pub mod read;
pub mod topo;

pub use model::{Backend, NodeServices, ServicePort};

#[cfg(test)]
mod tests;
