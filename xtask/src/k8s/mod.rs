//! The Kubernetes test cluster: `cargo xtask k8s up|down`, and what `cargo xtask setup`
//! prepares for it ([`binaries`], [`images`]). README.md beside this file describes the
//! layout (namespaces, paths, sockets, ports, certificates) for whoever builds on it.
pub mod binaries;
mod cluster;
pub mod images;
mod pki;
mod procs;
mod relay;

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
};

use anyhow::Result;
use clap::{Args, Subcommand};

pub use cluster::{down, up};

/// The default name prefix: the lab's namespaces are `k8s-node-a`, `k8s-control-plane`, …
pub const DEFAULT_PREFIX: &str = "k8s-";
/// Where each cluster's files live: `STATE_ROOT/PREFIX/`.
pub const STATE_ROOT: &str = "/var/lib/podtrace/k8s";
/// The API server's address on the underlay (the lab's `control-plane` host; its
/// `flannel::CONTROL_PLANE_IP`).
pub const API_IP: Ipv4Addr = Ipv4Addr::new(10, 30, 180, 10);
pub const API_PORT: u16 = 6443;
/// Services (no kube-proxy runs: ClusterIPs are allocated but not routed).
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
pub const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);

/// A node of the cluster: one of the lab's flannel nodes.
#[derive(Debug, Clone, Copy)]
pub struct Node {
    pub name: &'static str,
    /// Its underlay address (the lab's).
    pub ip: Ipv4Addr,
    /// Its pod subnet (the lab's flannel subnet; cni0 gets .1).
    pub pod_cidr: &'static str,
}

pub const NODES: [Node; 2] = [
    Node {
        name: "node-a",
        ip: Ipv4Addr::new(10, 30, 180, 56),
        pod_cidr: "10.244.0.0/24",
    },
    Node {
        name: "node-b",
        ip: Ipv4Addr::new(10, 30, 180, 55),
        pod_cidr: "10.244.1.0/24",
    },
];

#[derive(Args)]
pub struct K8sArgs {
    #[command(subcommand)]
    command: K8sCommand,
}

#[derive(Subcommand)]
enum K8sCommand {
    /// Bring up the two-node cluster inside a lab (a stale one with the same prefix is
    /// removed first); the last line printed is `export KUBECONFIG=PATH`.
    Up {
        /// Name prefix of the lab's namespaces, cgroups and state directory.
        #[arg(long, default_value = DEFAULT_PREFIX)]
        prefix: String,
        /// The podtrace binary that builds the lab (default: build target/debug/podtrace).
        #[arg(long)]
        podtrace: Option<PathBuf>,
    },
    /// Remove the cluster: processes, mounts, cgroups, namespaces, files.
    Down {
        #[arg(long, default_value = DEFAULT_PREFIX)]
        prefix: String,
        /// The podtrace binary that removes the lab (default: target/debug/podtrace).
        #[arg(long)]
        podtrace: Option<PathBuf>,
    },
    /// (internal) The API server relay process that `up` starts.
    #[command(hide = true)]
    Relay {
        #[arg(long)]
        port_file: PathBuf,
        #[arg(long)]
        netns: PathBuf,
        #[arg(long)]
        to: SocketAddr,
    },
}

pub fn run(args: K8sArgs) -> Result<()> {
    match args.command {
        K8sCommand::Up { prefix, podtrace } => up(&prefix, podtrace),
        K8sCommand::Down { prefix, podtrace } => down(&prefix, podtrace),
        K8sCommand::Relay {
            port_file,
            netns,
            to,
        } => relay::run(&port_file, &netns, to),
    }
}

/// Where everything of the cluster `prefix` lives.
pub struct Layout {
    pub prefix: String,
    /// `STATE_ROOT/PREFIX`.
    pub state: PathBuf,
}

impl Layout {
    /// The layout of cluster `prefix`: 1 to 32 characters out of A-Z a-z 0-9 - _ . (not
    /// starting with a dot), as the lab's prefixes.
    pub fn new(prefix: &str) -> Result<Self> {
        let ok = !prefix.is_empty()
            && prefix.len() <= 32
            && !prefix.starts_with('.')
            && prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !ok {
            anyhow::bail!(
                "invalid prefix {prefix:?}: 1 to 32 characters out of A-Z a-z 0-9 - _ . (not \
                 starting with a dot)"
            );
        }
        Ok(Self {
            prefix: prefix.to_owned(),
            state: PathBuf::from(STATE_ROOT).join(prefix),
        })
    }

    /// The name of the cluster in kubeconfigs: the prefix without its trailing dashes.
    pub fn cluster_name(&self) -> String {
        let n = self.prefix.trim_end_matches(['-', '_', '.']);
        if n.is_empty() {
            "podtrace".into()
        } else {
            n.into()
        }
    }

    /// The users' (admin) kubeconfig, through the relay.
    pub fn kubeconfig(&self) -> PathBuf {
        self.state.join("kubeconfig")
    }

    pub fn pki(&self) -> PathBuf {
        self.state.join("pki")
    }

    /// etcd's data, the control plane's kubeconfigs and logs.
    pub fn cp_dir(&self) -> PathBuf {
        self.state.join("control-plane")
    }

    /// A node's files (its containerd root, bind-mount sources, configs, logs).
    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.state.join(node)
    }

    /// The directory of the mount-namespace files (a private bind mount of itself).
    pub fn ns_dir(&self) -> PathBuf {
        self.state.join("ns")
    }

    /// A node's mount namespace (nsenter --mount=).
    pub fn mntns(&self, node: &str) -> PathBuf {
        self.ns_dir().join(node)
    }

    /// A lab network namespace: `/run/netns/{prefix}{name}`.
    pub fn netns(&self, name: &str) -> PathBuf {
        PathBuf::from("/run/netns").join(format!("{}{name}", self.prefix))
    }

    /// A node's cgroupRoot: `/{prefix}{node}`.
    pub fn cgroup_root(&self, node: &str) -> String {
        format!("/{}{node}", self.prefix)
    }

    /// A node's containerd socket as seen from the machine's mount namespace (inside the
    /// node it is /run/containerd/containerd.sock).
    pub fn containerd_sock(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("run/containerd/containerd.sock")
    }

    /// The relay writes its port here.
    pub fn relay_port_file(&self) -> PathBuf {
        self.state.join("relay.port")
    }

    /// kubectl's discovery cache for xtask's and the tests' calls (`--cache-dir`).
    pub fn kube_cache(&self) -> PathBuf {
        self.state.join("kube-cache")
    }

    /// A summary for tools and tests (paths, sockets, addresses).
    pub fn cluster_json(&self) -> PathBuf {
        self.state.join("cluster.json")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let l = Layout::new("k8s-").unwrap();
        assert_eq!(l.state, PathBuf::from("/var/lib/podtrace/k8s/k8s-"));
        assert_eq!(l.netns("node-a"), PathBuf::from("/run/netns/k8s-node-a"));
        assert_eq!(l.cgroup_root("node-b"), "/k8s-node-b");
        assert_eq!(l.cluster_name(), "k8s");
        assert_eq!(
            l.containerd_sock("node-a"),
            PathBuf::from("/var/lib/podtrace/k8s/k8s-/node-a/run/containerd/containerd.sock")
        );
        for bad in ["", "..", "../x", "a/b", ".x", "a b", &"x".repeat(33)] {
            assert!(Layout::new(bad).is_err(), "{bad:?} accepted");
        }
    }
}
