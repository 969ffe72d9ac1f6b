//! The lab: the seeds' topologies rebuilt in network namespaces (design.md §3).
//!
//! - `flannel`: node-a and node-b on an underlay bridge, flannel.1 VXLAN (VNI 1, UDP 8472),
//!   cni0, pods pod-a1, pod-a2 (node-a) and pod-b1 (node-b). See [`flannel`].
//!   With it, `ext` (a host outside the cluster, on the underlay) and Services as kube-proxy
//!   programs them on both nodes. See [`services`].
//! - `eni`: node-c with AWS VPC CNI routing (eth0, ENIs eth1 and eth2, tables 2 and 3), pods
//!   pod-c1 and pod-c2, the host `master` and a `vpc` namespace. See [`eni`].
//! - `flannel-nodes`: the flannel cluster's nodes without pods or cni0, plus the host
//!   `control-plane`: the nodes of a real cluster (`cargo xtask k8s up`). See [`flannel`].
//!
//! Every namespace is `/run/netns/{prefix}{name}` (prefix `pt-` by default), e.g.
//! `pt-node-a`, `pt-pod-a1`, `pt-underlay`, `pt-vpc`, `pt-master`. Nothing is connected to
//! the machine's own namespace: every device is created inside a lab namespace (veth peers
//! straight into theirs). `lab up` cleans up a stale lab with the same prefix first and
//! removes everything again when it fails half-way; `lab down` deletes every device and
//! namespace and the registry ([`registry`]), which `lab status` shows and pod lookup reads.
pub mod agents;
pub mod eni;
pub mod exec;
pub mod flannel;
pub mod registry;
pub mod resolver;
pub mod services;

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    io::Write as _,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _, Result};
use clap::{Args, Subcommand, ValueEnum};

use crate::{netlink as nl, netns};
use registry::{LabInterface, LabNode, LabPod, LabService, Registry};

/// The default name prefix.
pub const DEFAULT_PREFIX: &str = "pt-";

/// Every namespace name (without prefix) a lab can have.
pub const NETNS_NAMES: [&str; 13] = [
    "underlay",
    "node-a",
    "node-b",
    "pod-a1",
    "pod-a2",
    "pod-b1",
    "ext",
    "vpc",
    "master",
    "node-c",
    "pod-c1",
    "pod-c2",
    flannel::CONTROL_PLANE,
];

/// The namespace name of lab member `name`: `{prefix}{name}`.
pub fn netns_name(prefix: &str, name: &str) -> String {
    format!("{prefix}{name}")
}

/// Which of the seeds' topologies to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Topology {
    /// node-a and node-b with flannel VXLAN, pods pod-a1, pod-a2, pod-b1.
    Flannel,
    /// node-c with AWS VPC CNI ENIs, pods pod-c1, pod-c2, host master.
    Eni,
    /// Both.
    All,
    /// node-a and node-b with flannel VXLAN but no pods and no cni0 (a CNI plugin makes
    /// them), and the host control-plane on the underlay: for a real cluster's kubelets.
    FlannelNodes,
}

impl Topology {
    pub fn as_str(self) -> &'static str {
        match self {
            Topology::Flannel => "flannel",
            Topology::Eni => "eni",
            Topology::All => "all",
            Topology::FlannelNodes => "flannel-nodes",
        }
    }

    fn flannel(self) -> bool {
        matches!(
            self,
            Topology::Flannel | Topology::All | Topology::FlannelNodes
        )
    }

    fn eni(self) -> bool {
        matches!(self, Topology::Eni | Topology::All)
    }
}

#[derive(Args, Debug)]
pub struct LabArgs {
    #[command(subcommand)]
    pub command: LabCommand,
}

#[derive(Subcommand, Debug)]
pub enum LabCommand {
    /// Build the lab (a stale lab with the same prefix is removed first).
    Up {
        #[arg(long, value_enum, default_value = "all")]
        topology: Topology,
        /// Name prefix of the lab's namespaces (labs with different prefixes coexist).
        #[arg(long, default_value = DEFAULT_PREFIX)]
        prefix: String,
        /// Also start one `podtrace agent` per node, each confined to its node, listening on
        /// the node's address with mutual TLS; the lab's commands then go through them.
        #[arg(long)]
        agents: bool,
    },
    /// Remove the lab: its devices, namespaces and registry.
    Down {
        /// Name prefix of the lab's namespaces (labs with different prefixes coexist).
        #[arg(long, default_value = DEFAULT_PREFIX)]
        prefix: String,
    },
    /// Show the lab's pods, nodes and hosts.
    Status {
        /// Name prefix of the lab's namespaces (labs with different prefixes coexist).
        #[arg(long, default_value = DEFAULT_PREFIX)]
        prefix: String,
        /// One JSON object: {"pods":[...],"nodes":[...],"hosts":[...]}.
        #[arg(long)]
        json: bool,
    },
    /// Run a command in a lab pod's, node's (node-a, node-b, node-c) or host's (master)
    /// network namespace; exits with the command's exit code.
    Exec {
        /// Name prefix of the lab's namespaces (labs with different prefixes coexist).
        #[arg(long, default_value = DEFAULT_PREFIX)]
        prefix: String,
        /// A pod (pod-a1 or default/pod-a1), a node or a host.
        name: String,
        /// The command and its arguments (after `--`).
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "CMD"
        )]
        command: Vec<String>,
    },
}

/// `podtrace lab ...`.
pub fn run(args: LabArgs) -> Result<ExitCode> {
    match args.command {
        LabCommand::Up {
            topology,
            prefix,
            agents,
        } => {
            let _signals = InterruptGuard::install()?;
            let mut reg = up_with(&prefix, topology, &mut |step| {
                log::info!("lab up {prefix}: {step}");
                if INTERRUPTED.load(Ordering::SeqCst) {
                    bail!("interrupted");
                }
                Ok(())
            })?;
            if agents {
                if let Err(e) = start_agents(&mut reg) {
                    let _ = down(&prefix);
                    return Err(e.context("lab up --agents failed (the lab was removed)"));
                }
            }
            emit(&format!(
                "lab {:?} is up ({} topology): {} pods, {} nodes; `podtrace lab status{}` \
                 shows it, `podtrace lab down{}` removes it\n",
                reg.prefix,
                reg.topology,
                reg.pods.len(),
                reg.nodes.len(),
                prefix_flag(&prefix),
                prefix_flag(&prefix),
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Down { prefix } => {
            let _signals = InterruptGuard::install()?;
            if down(&prefix)? {
                emit(&format!("lab {prefix:?} removed\n"))?;
            } else {
                emit(&format!("no lab {prefix:?} was up: nothing to remove\n"))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Status { prefix, json } => {
            validate_prefix(&prefix)?;
            let reg = registry::load(&prefix)?;
            if json {
                let value = match &reg {
                    Some(r) => status_json(r)?,
                    None => serde_json::json!({
                        "prefix": prefix, "pods": [], "nodes": [], "hosts": [], "services": [],
                        "up": false,
                    })
                    .to_string(),
                };
                emit(&format!("{value}\n"))?;
            } else {
                match &reg {
                    Some(r) => emit(&status_text(r))?,
                    None => {
                        let mut text = format!(
                            "no lab {prefix:?} is up (podtrace lab up{})\n",
                            prefix_flag(&prefix)
                        );
                        let others: Vec<String> = registry::load_all()?
                            .into_iter()
                            .map(|r| r.prefix)
                            .collect();
                        if !others.is_empty() {
                            let _ = writeln!(text, "labs that are up: {}", others.join(", "));
                        }
                        emit(&text)?;
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        LabCommand::Exec {
            prefix,
            name,
            command,
        } => {
            validate_prefix(&prefix)?;
            let code = exec::run(&prefix, &name, &command)?;
            Ok(ExitCode::from(code))
        }
    }
}

/// Writes to stdout; a closed pipe (`| head`) is not an error.
fn emit(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(e).context("writing to stdout"),
    }
}

fn prefix_flag(prefix: &str) -> String {
    if prefix == DEFAULT_PREFIX {
        String::new()
    } else {
        format!(" --prefix {prefix}")
    }
}

/// The `lab status --json` line: the registry (fields in its order) plus `"up"`, whether all
/// of its namespaces still exist.
pub fn status_json(reg: &Registry) -> Result<String> {
    #[derive(serde::Serialize)]
    struct Status<'a> {
        #[serde(flatten)]
        registry: &'a Registry,
        up: bool,
    }
    serde_json::to_string(&Status {
        registry: reg,
        up: reg.is_up(),
    })
    .context("serializing the registry")
}

/// The human-readable `lab status`.
pub fn status_text(reg: &Registry) -> String {
    let mut out = String::new();
    let state = if reg.is_up() {
        "up"
    } else {
        "BROKEN: some namespaces are gone (podtrace lab up rebuilds it)"
    };
    let _ = writeln!(
        out,
        "lab {:?} ({} topology): {state}",
        reg.prefix, reg.topology
    );
    let _ = writeln!(out);
    let mut rows = vec![[
        "POD".to_owned(),
        "NAMESPACE".to_owned(),
        "NODE".to_owned(),
        "IP".to_owned(),
        "HOST VETH".to_owned(),
        "NETNS".to_owned(),
    ]];
    for p in &reg.pods {
        rows.push([
            p.name.clone(),
            p.namespace.clone(),
            p.node.clone(),
            p.ip.to_string(),
            p.host_veth.clone(),
            p.netns.display().to_string(),
        ]);
    }
    table(&mut out, &rows);
    let _ = writeln!(out);
    let mut rows = vec![[
        "NODE".to_owned(),
        "ROLE".to_owned(),
        "NETNS".to_owned(),
        "INTERFACES".to_owned(),
    ]];
    for n in reg.nodes.iter().chain(&reg.hosts) {
        let ifs: Vec<String> = n.interfaces.iter().map(interface_summary).collect();
        rows.push([
            n.name.clone(),
            n.role.clone(),
            n.netns.display().to_string(),
            ifs.join(", "),
        ]);
    }
    table(&mut out, &rows);
    if !reg.agents.is_empty() {
        let _ = writeln!(out);
        let mut rows = vec![[
            "AGENT".to_owned(),
            "ENDPOINT".to_owned(),
            "REACHED FROM".to_owned(),
            "PID".to_owned(),
        ]];
        for a in &reg.agents {
            rows.push([
                a.node.clone(),
                a.endpoint.clone(),
                a.via_netns.display().to_string(),
                a.pid.to_string(),
            ]);
        }
        table(&mut out, &rows);
        let _ = writeln!(
            out,
            "(the lab's commands go through these agents; --no-agents runs them in one process; the front end's agents file: {})",
            agents::config_path(&reg.prefix).display()
        );
    }
    if !reg.services.is_empty() {
        let _ = writeln!(out);
        let mut rows = vec![[
            "SERVICE".to_owned(),
            "TYPE".to_owned(),
            "VIP".to_owned(),
            "NODEPORT".to_owned(),
            "BACKENDS".to_owned(),
        ]];
        for s in &reg.services {
            rows.push(service_row(s));
        }
        table(&mut out, &rows);
    }
    out
}

fn service_row(s: &LabService) -> [String; 5] {
    let backends = if s.backends.is_empty() {
        "none (kube-proxy rejects: connection refused)".to_owned()
    } else {
        s.backends
            .iter()
            .map(|b| format!("{}:{} ({})", b.ip, b.port, b.pod))
            .collect::<Vec<_>>()
            .join(", ")
    };
    [
        format!("{}/{}", s.namespace, s.name),
        s.kind.clone(),
        format!("{}:{}/{}", s.vip, s.port, s.protocol),
        s.node_port
            .map(|p| p.to_string())
            .unwrap_or_else(|| "-".to_owned()),
        backends,
    ]
}

fn interface_summary(i: &LabInterface) -> String {
    let mut s = i.name.clone();
    if let Some(m) = &i.master {
        let _ = write!(s, "@{m}");
    }
    for a in &i.addresses {
        let _ = write!(s, " {a}");
    }
    s
}

fn table<const N: usize>(out: &mut String, rows: &[[String; N]]) {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    for row in rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == N {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ");
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
}

/// Checks that a prefix makes sane namespace and file names.
pub fn validate_prefix(prefix: &str) -> Result<()> {
    let ok = !prefix.is_empty()
        && prefix.len() <= 32
        && prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !prefix.starts_with('.');
    if !ok {
        bail!(
            "invalid lab prefix {prefix:?}: 1 to 32 characters out of A-Z a-z 0-9 - _ . \
             (not starting with a dot)"
        );
    }
    Ok(())
}

/// Builds the lab (see [`up_with`]).
pub fn up(prefix: &str, topology: Topology) -> Result<Registry> {
    up_with(prefix, topology, &mut |_| Ok(()))
}

/// Builds the lab `prefix` with `topology`, first removing a lab with the same prefix, and
/// writes its registry. `on_step` is called before each step with its description; an error
/// from it aborts the build (the CLI uses it for ^C). On any failure everything built so far
/// is removed again and the error returned.
pub fn up_with(
    prefix: &str,
    topology: Topology,
    on_step: &mut dyn FnMut(&str) -> Result<()>,
) -> Result<Registry> {
    validate_prefix(prefix)?;
    let _lock = registry::lock()?;
    teardown(prefix).context("removing the stale lab before building")?;
    let mut b = Build {
        prefix,
        on_step,
        pods: Vec::new(),
        members: Vec::new(),
        services: Vec::new(),
    };
    let built = build(&mut b, topology).and_then(|reg| {
        registry::save(&reg)?;
        Ok(reg)
    });
    match built {
        Ok(reg) => Ok(reg),
        Err(e) => {
            if let Err(cleanup) = teardown(prefix) {
                return Err(e.context(format!(
                    "lab up failed, and so did removing what it built ({cleanup:#}): run \
                     `podtrace lab down{}`",
                    prefix_flag(prefix)
                )));
            }
            Err(e.context("lab up failed (everything it built was removed)"))
        }
    }
}

/// Starts the lab's agents (`lab up --agents`) and records them in its registry.
pub fn start_agents(reg: &mut Registry) -> Result<()> {
    let _lock = registry::lock()?;
    reg.agents = agents::start(reg)?;
    registry::save(reg)
}

/// Removes the lab `prefix`: every device in its namespaces, the namespaces, the registry.
/// Returns whether there was anything to remove. Safe to call when nothing is up.
pub fn down(prefix: &str) -> Result<bool> {
    validate_prefix(prefix)?;
    let _lock = registry::lock()?;
    teardown(prefix)
}

/// What one `lab up` builds, handed to the topology modules.
pub(crate) struct Build<'a> {
    prefix: &'a str,
    on_step: &'a mut dyn FnMut(&str) -> Result<()>,
    /// Pods, as the topology modules finish them.
    pub(crate) pods: Vec<LabPod>,
    /// Nodes and hosts: (name, role, netns).
    members: Vec<(String, String, PathBuf)>,
    /// Services, once programmed.
    pub(crate) services: Vec<LabService>,
}

impl Build<'_> {
    /// The namespace of lab member `name`, created earlier in this build.
    pub(crate) fn existing(&self, name: &str) -> Result<PathBuf> {
        let path = netns::path_of(&netns_name(self.prefix, name));
        if !path.exists() {
            bail!("{name} has not been built yet");
        }
        Ok(path)
    }

    /// Announces the next step (and lets `on_step` stop the build).
    pub(crate) fn step(&mut self, what: &str) -> Result<()> {
        (self.on_step)(what).with_context(|| format!("stopped before: {what}"))
    }

    /// Creates the namespace of lab member `name` with `lo` up and the lab's baseline
    /// sysctls, and records it (`role`: `pod`, `node`, `host` or `fabric`).
    pub(crate) fn netns(&mut self, name: &str, role: &str) -> Result<PathBuf> {
        self.step(&format!("namespace {name}"))?;
        let full = netns_name(self.prefix, name);
        let path = netns::create(&full)?;
        nl::in_ns(&path, |nl| {
            nl.set_up_by_name("lo")?;
            // Deterministic reverse-path filtering whatever the machine's defaults (new
            // namespaces inherit them): loose (2) on every device, as on most distributions
            // and on the AWS VPC CNI's eth0; `all` 0 so that the device value counts.
            netns::sysctl("net/ipv4/conf/all/rp_filter", "0")?;
            netns::sysctl("net/ipv4/conf/default/rp_filter", "2")?;
            netns::sysctl("net/ipv4/conf/lo/rp_filter", "2")
        })
        .with_context(|| format!("preparing namespace {full}"))?;
        if role != "pod" {
            self.members
                .push((name.to_owned(), role.to_owned(), path.clone()));
        }
        Ok(path)
    }
}

fn build(b: &mut Build, topology: Topology) -> Result<Registry> {
    if topology.flannel() {
        let pods = topology != Topology::FlannelNodes;
        flannel::build(b, pods).context("building the flannel cluster")?;
        // The lab's Services are backed by the lab's pods (a real cluster has its own).
        if pods {
            services::build(b).context("building the flannel cluster's Services")?;
        }
    }
    if topology.eni() {
        eni::build(b).context("building the ENI node")?;
    }
    b.step("registry")?;
    let mut nodes = Vec::new();
    let mut hosts = Vec::new();
    for (name, role, path) in &b.members {
        let node = LabNode {
            name: name.clone(),
            role: role.clone(),
            netns: path.clone(),
            interfaces: interfaces_of(path)?,
        };
        if role == "node" {
            nodes.push(node);
        } else {
            hosts.push(node);
        }
    }
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    let mut pods = std::mem::take(&mut b.pods);
    pods.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Registry {
        prefix: b.prefix.to_owned(),
        topology: topology.as_str().to_owned(),
        created_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        pods,
        nodes,
        hosts,
        services: std::mem::take(&mut b.services),
        agents: Vec::new(),
    })
}

/// The interfaces of the namespace at `ns` as the registry records them (`lo` left out).
pub fn interfaces_of(ns: &Path) -> Result<Vec<LabInterface>> {
    nl::in_ns(ns, |nl| {
        let snap = nl.snapshot()?;
        let (links, addrs) = (&snap.links, &snap.addrs);
        let mut out = Vec::new();
        for l in links.iter().filter(|l| l.name != "lo") {
            out.push(LabInterface {
                name: l.name.clone(),
                ifindex: l.index,
                kind: l.kind.clone(),
                mac: l.mac.map(|m| nl::mac_string(&m)).unwrap_or_default(),
                mtu: l.mtu,
                addresses: addrs
                    .iter()
                    .filter(|a| a.index == l.index)
                    .map(|a| format!("{}/{}", a.ip, a.prefix))
                    .collect(),
                master: l
                    .master
                    .and_then(|m| links.iter().find(|x| x.index == m).map(|x| x.name.clone())),
            });
        }
        Ok(out)
    })
}

/// Removes every namespace the lab `prefix` may have (the registry's and the fixed names),
/// deleting their devices first (so that a process still running inside one cannot keep
/// the lab's links alive), then the registry. Returns whether anything existed.
fn teardown(prefix: &str) -> Result<bool> {
    let mut names: BTreeSet<String> = NETNS_NAMES.iter().map(|n| netns_name(prefix, n)).collect();
    let reg = registry::load(prefix).ok().flatten();
    // The agents first: they detach their probes as they stop.
    if let Some(r) = &reg {
        agents::stop(prefix, &r.agents);
    }
    let mut found = reg.is_some();
    if let Some(reg) = &reg {
        for p in reg.netns_paths() {
            if p.parent() == Some(Path::new(netns::NETNS_RUN_DIR)) {
                if let Some(n) = p.file_name().and_then(|n| n.to_str()) {
                    if n.starts_with(prefix) {
                        names.insert(n.to_owned());
                    }
                }
            }
        }
    }
    let mut first_err = None;
    for name in &names {
        let path = netns::path_of(name);
        if !path.exists() {
            continue;
        }
        found = true;
        // Best effort: a file that is not (or no longer) a namespace has no devices.
        let _ = nl::in_ns(&path, |nl| {
            for link in nl.links()? {
                if link.name != "lo" {
                    nl.del_link(link.index)?;
                }
            }
            Ok(())
        });
        if let Err(e) = netns::delete(name) {
            first_err.get_or_insert(e.context(format!("deleting namespace {name}")));
        }
    }
    if let Err(e) = registry::remove(prefix) {
        first_err.get_or_insert(e);
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(found),
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// While alive, SIGINT, SIGTERM and SIGHUP only set [`INTERRUPTED`]: `lab up` stops at the
/// next step and removes what it built, `lab down` finishes. Restores the old handlers on
/// drop.
struct InterruptGuard {
    old: Vec<(nix::sys::signal::Signal, nix::sys::signal::SigAction)>,
}

impl InterruptGuard {
    fn install() -> Result<Self> {
        use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
        let action = SigAction::new(
            SigHandler::Handler(on_interrupt),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        let mut old = Vec::new();
        for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
            // SAFETY: the handler only stores to an atomic.
            let prev = unsafe { sigaction(sig, &action) }
                .with_context(|| format!("installing a {sig} handler"))?;
            old.push((sig, prev));
        }
        Ok(Self { old })
    }
}

impl Drop for InterruptGuard {
    fn drop(&mut self) {
        for (sig, prev) in &self.old {
            // SAFETY: restores the disposition saved in install().
            unsafe {
                let _ = nix::sys::signal::sigaction(*sig, prev);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn every_topology_namespace_is_known_to_teardown() {
        let all: BTreeSet<&str> = NETNS_NAMES.iter().copied().collect();
        let built: BTreeSet<&str> = flannel::NETNS
            .iter()
            .chain(&services::NETNS)
            .chain(&eni::NETNS)
            .chain(&[flannel::CONTROL_PLANE])
            .copied()
            .collect();
        assert_eq!(all, built);
        assert_eq!(all.len(), NETNS_NAMES.len(), "duplicates in NETNS_NAMES");
        for p in flannel::PODS {
            assert!(flannel::NETNS.contains(&p.name) && flannel::NETNS.contains(&p.node));
        }
        for p in eni::PODS {
            assert!(eni::NETNS.contains(&p.name));
        }
    }

    #[test]
    fn prefixes() {
        for ok in ["pt-", "t123fl-", "a", "lab_1.x"] {
            validate_prefix(ok).unwrap();
        }
        for bad in ["", "a/b", ".x", "a b", &"x".repeat(33)] {
            assert!(validate_prefix(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(netns_name("pt-", "node-a"), "pt-node-a");
    }

    fn sample() -> Registry {
        Registry {
            prefix: "pt-".into(),
            topology: "eni".into(),
            created_unix: 1,
            pods: vec![LabPod {
                name: "pod-c2".into(),
                namespace: "default".into(),
                node: "node-c".into(),
                ip: Ipv4Addr::new(10, 19, 0, 32),
                netns: "/run/netns/pt-pod-c2".into(),
                node_netns: "/run/netns/pt-node-c".into(),
                ifname: "eth0".into(),
                mac: "02:00:00:00:00:01".into(),
                host_veth: "eni0123456789a".into(),
                cni: "aws-vpc-cni".into(),
                eni: Some("eth2".into()),
                table: Some(3),
            }],
            nodes: vec![LabNode {
                name: "node-c".into(),
                role: "node".into(),
                netns: "/run/netns/pt-node-c".into(),
                interfaces: vec![LabInterface {
                    name: "eth2".into(),
                    ifindex: 4,
                    kind: "veth".into(),
                    mac: "20:90:6f:e2:01:48".into(),
                    mtu: 1500,
                    addresses: vec!["10.19.0.24/20".into()],
                    master: None,
                }],
            }],
            hosts: vec![LabNode {
                name: "master".into(),
                role: "host".into(),
                netns: "/run/netns/pt-master".into(),
                interfaces: vec![],
            }],
            services: services::registry_entries().unwrap(),
            agents: Vec::new(),
        }
    }

    #[test]
    fn registry_lookups() {
        let r = sample();
        assert_eq!(r.pod("pod-c2").unwrap().ip, Ipv4Addr::new(10, 19, 0, 32));
        assert!(r.pod("default/pod-c2").is_some());
        assert!(r.pod("kube-system/pod-c2").is_none());
        assert!(r.pod("node-c").is_none());
        assert_eq!(
            r.netns_of("master"),
            Some(Path::new("/run/netns/pt-master"))
        );
        assert_eq!(
            r.netns_of("node-c"),
            Some(Path::new("/run/netns/pt-node-c"))
        );
        assert_eq!(r.netns_of("nope"), None);
        assert_eq!(r.names(), ["pod-c2", "node-c", "master"]);
    }

    #[test]
    fn status_json_keeps_the_contract() {
        let r = sample();
        let text = status_json(&r).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let pod = &v["pods"][0];
        for k in ["name", "namespace", "node", "ip", "netns"] {
            assert!(pod.get(k).is_some(), "pod field {k} missing: {pod}");
        }
        assert_eq!(pod["ip"], "10.19.0.32");
        assert_eq!(pod["netns"], "/run/netns/pt-pod-c2");
        let node = &v["nodes"][0];
        for k in ["name", "netns", "interfaces"] {
            assert!(node.get(k).is_some(), "node field {k} missing: {node}");
        }
        assert_eq!(node["interfaces"][0]["addresses"][0], "10.19.0.24/20");
        // The namespaces of the sample do not exist.
        assert_eq!(v["up"], false);
        // And it reads back.
        let back: Registry = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
        assert!(status_text(&r).contains("eni0123456789a"));
        let web = &v["services"][0];
        assert_eq!(web["name"], "web");
        assert_eq!(web["type"], "ClusterIP");
        assert_eq!(web["vip"], "10.96.0.10");
        assert_eq!(web["port"], 80);
        assert_eq!(web["protocol"], "tcp");
        assert_eq!(web["backends"][1]["ip"], "10.244.1.5");
        assert_eq!(web["backends"][1]["port"], 8080);
        assert_eq!(web["backends"][1]["pod"], "pod-b1");
        let text = status_text(&r);
        assert!(
            text.contains("default/web-np  NodePort   10.96.0.11:80/tcp  30080")
                && text.contains("10.244.0.7:8080 (pod-a2), 10.244.1.5:8080 (pod-b1)"),
            "{text}"
        );
        assert_eq!(r.service("default/empty").unwrap().backends, []);
    }

    #[test]
    fn registries_without_services_still_load() {
        let mut v: serde_json::Value =
            serde_json::from_str(&status_json(&sample()).unwrap()).unwrap();
        v.as_object_mut().unwrap().remove("services");
        let back: Registry = serde_json::from_value(v).unwrap();
        assert!(back.services.is_empty());
        assert_eq!(back.pods, sample().pods);
    }

    #[test]
    fn exit_codes() {
        use std::os::unix::process::ExitStatusExt;
        let st = |raw| std::process::ExitStatus::from_raw(raw);
        assert_eq!(exec::exit_code(st(7 << 8)), 7);
        assert_eq!(exec::exit_code(st(0)), 0);
        assert_eq!(exec::exit_code(st(libc::SIGTERM)), 143);
    }
}
