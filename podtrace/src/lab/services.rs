//! Services in the flannel cluster, as kube-proxy (iptables mode) programs them on every
//! node, flannel's masquerade of pod traffic leaving the pod network, and a host outside
//! the cluster to reach (design.md §3 and §7; addresses in the README).
//!
//! | Service            | type      | cluster IP     | NodePort | backends                               |
//! |--------------------|-----------|----------------|----------|----------------------------------------|
//! | default/web:http   | ClusterIP | 10.96.0.10:80  | –        | pod-a2 10.244.0.7:8080, pod-b1 10.244.1.5:8080 |
//! | default/web-np:http| NodePort  | 10.96.0.11:80  | 30080    | pod-a2 10.244.0.7:8080, pod-b1 10.244.1.5:8080 |
//! | default/empty:http | NodePort  | 10.96.0.12:80  | 30081    | none: kube-proxy REJECTs                |
//!
//! The host `ext` (10.30.180.1/24) sits on the underlay bridge and is the nodes' default
//! gateway; pods reach it through their node's eth0, masqueraded to the node's address by
//! flannel's `FLANNEL-POSTRTG`. The service network is 10.96.0.0/12, the pod network
//! (kube-proxy's `--cluster-cidr`) 10.244.0.0/16. Nodes have `bridge-nf-call-iptables` on,
//! as kubeadm requires, so that replies between pods on one bridge are un-NATed.
use std::{
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use super::{
    flannel::{self, NodeSpec},
    registry::{LabBackend, LabService},
    Build,
};
use crate::{
    netlink::{in_ns, Route},
    netns::sysctl,
    services::{
        iptables::Net,
        kubeproxy::{self, ServiceSpec},
    },
};

/// The namespaces this part creates (without the prefix).
pub const NETNS: [&str; 1] = ["ext"];

/// The host outside the cluster, on the underlay: the nodes' default gateway.
pub const EXT_IP: Ipv4Addr = Ipv4Addr::new(10, 30, 180, 1);
/// The service network (kube-apiserver's `--service-cluster-ip-range`).
pub const SERVICE_CIDR: Net = Net {
    addr: Ipv4Addr::new(10, 96, 0, 0),
    len: 12,
};
/// The pod network (flannel's network, kube-proxy's `--cluster-cidr`).
pub const POD_CIDR: Net = Net {
    addr: Ipv4Addr::new(10, 244, 0, 0),
    len: 16,
};

/// A lab Service (one TCP port named `http`).
#[derive(Debug, Clone, Copy)]
pub struct ServiceDef {
    pub name: &'static str,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub node_port: Option<u16>,
    /// Backend pods and their target port.
    pub backends: &'static [(&'static str, u16)],
}

pub const SERVICES: [ServiceDef; 3] = [
    ServiceDef {
        name: "web",
        vip: Ipv4Addr::new(10, 96, 0, 10),
        port: 80,
        node_port: None,
        backends: &[("pod-a2", 8080), ("pod-b1", 8080)],
    },
    ServiceDef {
        name: "web-np",
        vip: Ipv4Addr::new(10, 96, 0, 11),
        port: 80,
        node_port: Some(30080),
        backends: &[("pod-a2", 8080), ("pod-b1", 8080)],
    },
    ServiceDef {
        name: "empty",
        vip: Ipv4Addr::new(10, 96, 0, 12),
        port: 80,
        node_port: Some(30081),
        backends: &[],
    },
];

fn pod_spec(name: &str) -> Result<flannel::PodSpec> {
    flannel::PODS
        .into_iter()
        .find(|p| p.name == name)
        .with_context(|| format!("lab service backend {name} is not a flannel pod"))
}

/// The kube-proxy view of the lab's Services.
pub fn specs() -> Result<Vec<ServiceSpec>> {
    SERVICES
        .iter()
        .map(|d| {
            Ok(ServiceSpec {
                namespace: "default".into(),
                name: d.name.into(),
                port_name: "http".into(),
                protocol: "tcp".into(),
                cluster_ip: d.vip,
                port: d.port,
                node_port: d.node_port,
                endpoints: d
                    .backends
                    .iter()
                    .map(|(pod, port)| Ok((pod_spec(pod)?.ip, *port)))
                    .collect::<Result<_>>()?,
            })
        })
        .collect()
}

/// The lab's Services as the registry records them.
pub fn registry_entries() -> Result<Vec<LabService>> {
    let nodes: Vec<String> = flannel::NODES.iter().map(|n| n.name.to_owned()).collect();
    SERVICES
        .iter()
        .zip(specs()?)
        .map(|(d, s)| {
            Ok(LabService {
                name: d.name.into(),
                namespace: "default".into(),
                kind: if d.node_port.is_some() {
                    "NodePort"
                } else {
                    "ClusterIP"
                }
                .into(),
                vip: d.vip,
                port: d.port,
                protocol: s.protocol.clone(),
                port_name: s.port_name.clone(),
                node_port: d.node_port,
                backends: d
                    .backends
                    .iter()
                    .map(|(pod, port)| {
                        let p = pod_spec(pod)?;
                        Ok(LabBackend {
                            pod: p.name.into(),
                            node: p.node.into(),
                            ip: p.ip,
                            port: *port,
                            chain: s.sep_chain(p.ip, *port),
                        })
                    })
                    .collect::<Result<_>>()?,
                chain: (!s.endpoints.is_empty()).then(|| s.svc_chain()),
                nodes: nodes.clone(),
            })
        })
        .collect()
}

/// Feeds `rules` to `iptables-restore --noflush` inside the namespace at `ns`, as kube-proxy
/// does on its node.
pub fn iptables_restore(ns: &Path, rules: &str) -> Result<()> {
    let out = crate::netns::run_in(Some(ns), || {
        let mut child = match Command::new("iptables-restore")
            .arg("--noflush")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "iptables-restore is not installed (Debian: apt-get install iptables; cargo \
                 xtask setup installs it)"
            ),
            Err(e) => return Err(e).context("running iptables-restore"),
        };
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(rules.as_bytes())
                .context("writing to iptables-restore")?;
        }
        child
            .wait_with_output()
            .context("waiting for iptables-restore")
    })?;
    if !out.status.success() {
        bail!(
            "iptables-restore in {} failed ({}): {}",
            ns.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Builds the host `ext`, the nodes' default route to it, and programs every node's
/// Services and masquerade. Runs after [`flannel::build`].
pub(super) fn build(b: &mut Build) -> Result<()> {
    let underlay = b.existing("underlay")?;
    let ext = b.netns("ext", "host")?;
    b.step("ext: underlay link and address")?;
    in_ns(&underlay, |nl| {
        nl.add_veth("ext-eth0", "eth0", Some(&ext), 1500, None)?;
        let idx = nl.index("ext-eth0")?;
        nl.set_master(idx, nl.index(flannel::UNDERLAY_BRIDGE)?)?;
        nl.set_up(idx)
    })?;
    in_ns(&ext, |nl| {
        let eth0 = nl.index("eth0")?;
        nl.add_addr(eth0, EXT_IP, 24)?;
        nl.set_up(eth0)
    })
    .context("setting up ext")?;

    let specs = specs()?;
    let services = kubeproxy::restore_text(&specs, POD_CIDR);
    let nodes: Vec<(NodeSpec, PathBuf)> = flannel::NODES
        .iter()
        .map(|n| Ok((*n, b.existing(n.name)?)))
        .collect::<Result<_>>()?;
    for (node, ns) in &nodes {
        b.step(&format!("{}: default route via ext", node.name))?;
        in_ns(ns, |nl| {
            let eth0 = nl.index("eth0")?;
            nl.add_route(&Route::via(Ipv4Addr::UNSPECIFIED, 0, EXT_IP, eth0))?;
            // Bridged traffic between pods passes iptables (kubeadm's preflight demands
            // it): without it a reply from a same-node backend is not un-DNATed.
            sysctl("net/bridge/bridge-nf-call-iptables", "1")
        })
        .with_context(|| format!("routing {} to ext", node.name))?;
        b.step(&format!("{}: kube-proxy rules (Services)", node.name))?;
        iptables_restore(ns, &services)
            .with_context(|| format!("programming {}'s Services", node.name))?;
        b.step(&format!("{}: flannel masquerade", node.name))?;
        let subnet = Net {
            addr: node.vtep_ip(),
            len: 24,
        };
        iptables_restore(ns, &kubeproxy::flannel_masq_text(POD_CIDR, subnet))
            .with_context(|| format!("programming {}'s masquerade", node.name))?;
    }
    b.services = registry_entries()?;
    Ok(())
}
