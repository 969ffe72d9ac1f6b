//! podtrace: resolve a pod's network path, follow real packets along it with eBPF, capture
//! them to rotating pcap files.
//!
//! Where things live:
//! - [`netns`]: create, enter and delete network namespaces.
//! - [`probes`]: loading and attaching the eBPF programs (tc hops, drop/FIB/xmit tracing).
//! - [`topology`]: finding a pod and resolving its path and routing decision (`topo`).
//! - [`follow`]: following real packets hop by hop, correlation and verdicts (`follow`).
//! - [`capture`]: rotating pcap/pcapng files of every hop (`capture`, `follow -w`).
//! - [`verify`]: `verify eni`, proving ENI traffic bypasses the primary interface.
//! - [`lab`]: the seeds' flannel and ENI topologies rebuilt in network namespaces.
//! - [`pcap`]: pcap/pcapng writing with rotation, and the capture filter language.
//! - [`services`]: Kubernetes Services as kube-proxy's iptables rules implement them on a node.
//! - [`conntrack`]: the kernel's connection tracking table over netlink (NAT translations).
//! - [`cri`]: finding real pods through the container runtime's CRI socket (containerd, CRI-O).
//! - [`kubectl`]: `kubectl podtrace`: the API server, the DaemonSet's agents, deploy/.
//! - [`crash`]: what a panic looks like (one line, exit 2); [`fault`]: panics on demand for
//!   the tests of that.
pub mod agent;
pub mod capture;
pub mod cli;
pub mod conntrack;
pub mod crash;
pub mod cri;
pub mod demo;
pub mod diagnose;
pub mod fault;
pub mod follow;
pub mod front;
pub mod kubectl;
pub mod lab;
pub mod netlink;
pub mod netns;
pub mod parse;
pub mod pcap;
pub mod pods;
pub mod privilege;
pub mod probes;
pub mod random;
pub mod remote;
pub mod resident;
pub mod services;
pub mod signals;
pub mod topology;
pub mod trace;
pub mod verify;
