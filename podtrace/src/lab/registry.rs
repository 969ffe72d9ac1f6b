//! The lab's registry: which lab pods, nodes and hosts exist and in which network namespaces.
//!
//! `podtrace lab up --prefix P` writes it to `/run/podtrace/lab/P.json`, `lab down` removes
//! it; `lab status --json` prints it. Pod lookup reads it through this module:
//!
//! ```no_run
//! use podtrace::lab::registry;
//! // `--lab P` given: that lab; otherwise the only lab that is up.
//! let lab = registry::select(None)?;
//! let pod = lab.pod("pod-a1").expect("no such lab pod");
//! println!("{} {} on {} in {}", pod.name, pod.ip, pod.node, pod.netns.display());
//! # anyhow::Ok(())
//! ```
//!
//! The JSON form is the contract of `lab status --json`
//! (`{"pods":[{"name","namespace","node","ip","netns"}],"nodes":[{"name","netns","interfaces":[...]}]}`);
//! fields may be added, never renamed.
use std::{
    fs::{self, File},
    io::{ErrorKind, Write as _},
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

/// Where registries live: one `PREFIX.json` per lab.
pub const DIR: &str = "/run/podtrace/lab";

/// One lab: everything `lab up --prefix PREFIX` built.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Registry {
    /// The name prefix of every namespace of this lab (`pt-` by default).
    pub prefix: String,
    /// `flannel`, `eni` or `all`.
    pub topology: String,
    /// When the lab was built (seconds since the epoch).
    pub created_unix: u64,
    /// The lab's pods (Kubernetes namespace `default`).
    pub pods: Vec<LabPod>,
    /// The Kubernetes nodes: `node-a`, `node-b` (flannel), `node-c` (ENI).
    pub nodes: Vec<LabNode>,
    /// Other machines and fabrics: the host `master` (ENI topology), the `underlay` bridge
    /// between flannel nodes and the `vpc` fabric. `lab exec` reaches them too.
    pub hosts: Vec<LabNode>,
    /// Kubernetes Services, programmed by the lab on every flannel node as kube-proxy
    /// (iptables mode) does. Absent in registries written before Services existed.
    #[serde(default)]
    pub services: Vec<LabService>,
    /// Its node agents (`lab up --agents`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<LabAgent>,
}

/// An agent of the lab, as the registry records it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LabAgent {
    pub node: String,
    /// `tcp:ADDR:PORT`.
    pub endpoint: String,
    /// The namespace the front end connects from.
    pub via_netns: PathBuf,
    pub pid: u32,
    /// Its log.
    pub log: PathBuf,
}

/// A Service of the lab (one port), as `lab status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LabService {
    /// `web`.
    pub name: String,
    /// `default`.
    pub namespace: String,
    /// `ClusterIP` or `NodePort`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The cluster IP.
    pub vip: Ipv4Addr,
    pub port: u16,
    /// `tcp`.
    pub protocol: String,
    /// The port's name (`http`).
    pub port_name: String,
    /// The NodePort on every node (`NodePort` Services).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_port: Option<u16>,
    /// Ready endpoints (none: kube-proxy rejects connections).
    pub backends: Vec<LabBackend>,
    /// kube-proxy's `KUBE-SVC-…` chain (none without endpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<String>,
    /// The nodes whose rules implement it.
    pub nodes: Vec<String>,
}

/// An endpoint of a lab Service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LabBackend {
    pub pod: String,
    pub node: String,
    pub ip: Ipv4Addr,
    pub port: u16,
    /// Its `KUBE-SEP-…` chain.
    pub chain: String,
}

/// A lab pod.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LabPod {
    /// Pod name, e.g. `pod-a1`.
    pub name: String,
    /// Kubernetes namespace: always `default`.
    pub namespace: String,
    /// Name of the node the pod runs on (`node-a`).
    pub node: String,
    /// The pod's IP on its `eth0`.
    pub ip: Ipv4Addr,
    /// The pod's network namespace (`/run/netns/pt-pod-a1`).
    pub netns: PathBuf,
    /// The node's network namespace (`/run/netns/pt-node-a`).
    pub node_netns: PathBuf,
    /// The pod-side interface (`eth0`).
    pub ifname: String,
    /// MAC of the pod's `eth0`.
    pub mac: String,
    /// The node-side end of the pod's veth pair (`veth1a2b3c4d`, `eni0123456789a`).
    pub host_veth: String,
    /// How the pod is wired: `flannel-vxlan` or `aws-vpc-cni`.
    pub cni: String,
    /// ENI pods: the node interface their traffic leaves by (`eth1`, `eth2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eni: Option<String>,
    /// ENI pods: the route table of their `from POD` rule (2, 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
}

/// A node (or host) of the lab and its interfaces as they were when the lab came up.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LabNode {
    /// `node-a`, `node-b`, `node-c`, `master`, `underlay`, `vpc`.
    pub name: String,
    /// `node` (a Kubernetes node), `host` (a machine that is not a node: `master`), `fabric`
    /// (what stands in for the network between machines: `underlay`, `vpc`).
    pub role: String,
    /// Its network namespace (`/run/netns/pt-node-a`).
    pub netns: PathBuf,
    /// Its interfaces, `lo` left out.
    pub interfaces: Vec<LabInterface>,
}

/// An interface of a lab node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LabInterface {
    pub name: String,
    pub ifindex: u32,
    /// `veth`, `bridge`, `vxlan`.
    pub kind: String,
    pub mac: String,
    pub mtu: u32,
    /// IPv4 addresses with their prefix length (`10.244.0.1/24`).
    pub addresses: Vec<String>,
    /// The bridge it is enslaved to (`cni0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master: Option<String>,
}

impl Registry {
    /// The pod called `name` (`pod-a1` or `default/pod-a1`).
    pub fn pod(&self, name: &str) -> Option<&LabPod> {
        let (ns, name) = match name.split_once('/') {
            Some((ns, n)) => (Some(ns), n),
            None => (None, name),
        };
        self.pods
            .iter()
            .find(|p| p.name == name && ns.is_none_or(|ns| ns == p.namespace))
    }

    /// The Service called `name` (`web` or `default/web`).
    pub fn service(&self, name: &str) -> Option<&LabService> {
        let (ns, name) = match name.split_once('/') {
            Some((ns, n)) => (Some(ns), n),
            None => (None, name),
        };
        self.services
            .iter()
            .find(|s| s.name == name && ns.is_none_or(|ns| ns == s.namespace))
    }

    /// The node or host called `name` (`node-a`, `master`, `vpc`).
    pub fn node(&self, name: &str) -> Option<&LabNode> {
        self.nodes
            .iter()
            .chain(&self.hosts)
            .find(|n| n.name == name)
    }

    /// The network namespace of the pod, node or host called `name`.
    pub fn netns_of(&self, name: &str) -> Option<&Path> {
        self.pod(name)
            .map(|p| p.netns.as_path())
            .or_else(|| self.node(name).map(|n| n.netns.as_path()))
    }

    /// Names `lab exec` accepts in this lab: pods, then nodes, then hosts.
    pub fn names(&self) -> Vec<&str> {
        self.pods
            .iter()
            .map(|p| p.name.as_str())
            .chain(
                self.nodes
                    .iter()
                    .chain(&self.hosts)
                    .map(|n| n.name.as_str()),
            )
            .collect()
    }

    /// Every network namespace of the lab.
    pub fn netns_paths(&self) -> Vec<&Path> {
        self.pods
            .iter()
            .map(|p| p.netns.as_path())
            .chain(
                self.nodes
                    .iter()
                    .chain(&self.hosts)
                    .map(|n| n.netns.as_path()),
            )
            .collect()
    }

    /// Whether every namespace of the lab still exists.
    pub fn is_up(&self) -> bool {
        self.netns_paths().iter().all(|p| p.exists())
    }
}

/// The registry file of the lab with this prefix.
pub fn path(prefix: &str) -> PathBuf {
    Path::new(DIR).join(format!("{prefix}.json"))
}

/// The lab with this prefix, `None` when no such lab is up.
pub fn load(prefix: &str) -> Result<Option<Registry>> {
    load_file(&path(prefix))
}

fn load_file(path: &Path) -> Result<Option<Registry>> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let reg = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a lab registry", path.display()))?;
    Ok(Some(reg))
}

/// Every lab that is up, sorted by prefix.
pub fn load_all() -> Result<Vec<Registry>> {
    let dir = match fs::read_dir(DIR) {
        Ok(d) => d,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {DIR}")),
    };
    let mut labs = Vec::new();
    for entry in dir {
        let p = entry.with_context(|| format!("reading {DIR}"))?.path();
        let is_registry = p.extension().is_some_and(|e| e == "json")
            && !p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if !is_registry {
            continue;
        }
        // A registry can vanish between read_dir and the read (lab down elsewhere).
        if let Some(reg) = load_file(&p)? {
            labs.push(reg);
        }
    }
    labs.sort_by(|a, b| a.prefix.cmp(&b.prefix));
    Ok(labs)
}

/// The lab `--lab PREFIX` names, or with `None` the only lab that is up (an error when none
/// or several are).
pub fn select(prefix: Option<&str>) -> Result<Registry> {
    if let Some(prefix) = prefix {
        return match load(prefix)? {
            Some(r) => Ok(r),
            None => {
                bail!("no lab with prefix {prefix:?} is up (podtrace lab up --prefix {prefix})")
            }
        };
    }
    let mut labs = load_all()?;
    match labs.len() {
        0 => bail!("no lab is up (podtrace lab up)"),
        1 => Ok(labs.remove(0)),
        _ => bail!(
            "several labs are up ({}): pick one with --lab PREFIX",
            labs.iter()
                .map(|l| l.prefix.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Writes the registry atomically (a temporary file renamed over the old one).
pub(crate) fn save(reg: &Registry) -> Result<()> {
    fs::create_dir_all(DIR).with_context(|| format!("creating {DIR}"))?;
    let target = path(&reg.prefix);
    let tmp = Path::new(DIR).join(format!(".{}.json.tmp", reg.prefix));
    let text = serde_json::to_string_pretty(reg).context("serializing the lab registry")?;
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        fs::rename(&tmp, &target)
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", target.display()));
    }
    Ok(())
}

/// Removes the registry of the lab with this prefix; missing is fine.
pub(crate) fn remove(prefix: &str) -> Result<()> {
    for p in [
        path(prefix),
        Path::new(DIR).join(format!(".{prefix}.json.tmp")),
    ] {
        match fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", p.display())),
        }
    }
    Ok(())
}

/// Serializes `lab up` and `lab down` across processes (and threads: each call opens its own
/// file description): an exclusive flock on the registry directory, released on drop.
pub(crate) fn lock() -> Result<nix::fcntl::Flock<File>> {
    fs::create_dir_all(DIR).with_context(|| format!("creating {DIR}"))?;
    let dir = File::open(DIR).with_context(|| format!("opening {DIR}"))?;
    nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .with_context(|| format!("locking {DIR}"))
}
