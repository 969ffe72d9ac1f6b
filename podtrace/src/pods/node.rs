//! Naming a node by its network namespace, as the cluster names it where that is knowable.
//!
//! Several nodes may share one machine (kind's node containers, a test's node namespaces), so
//! "this machine's hostname" names a node only when the node is the machine. In order:
//! 1. a kubelet running in the node's network namespace: its `--hostname-override`, else its
//!    hostname (in its UTS namespace), lowercased — what a kubelet registers as its node name;
//! 2. a container runtime in that namespace whose UTS namespace is not podtrace's: its
//!    hostname (a kind node container's hostname is its node name);
//! 3. the machine's hostname, when the namespace is the machine's own (root) one;
//! 4. the namespace's name in /run/netns (`ip netns`);
//! 5. `netns-INODE`: the namespace's inode number, stable while the namespace lives (what
//!    `lsns -t net` and `/proc/PID/ns/net` show).
//!
//! [`choose`] applies the rules to [`Facts`]; [`name_of`] gathers the facts from /proc.
use std::{
    fs::{self, File},
    os::unix::fs::MetadataExt as _,
    path::Path,
};

use nix::sched::{setns, CloneFlags};

use crate::cri::machine::RUNTIME_COMMS;

/// A node's name and the rule that gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeName {
    pub name: String,
    /// Why this name, for `topo`'s evidence.
    pub how: String,
}

/// A kubelet found in the node's namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Kubelet {
    pub pid: u32,
    pub hostname_override: Option<String>,
    /// Its hostname (its UTS namespace's).
    pub hostname: Option<String>,
}

/// A container runtime found in the node's namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Runtime {
    pub pid: u32,
    pub comm: String,
    /// Its hostname, when its UTS namespace is not podtrace's.
    pub own_hostname: Option<String>,
}

/// What is known about a node's network namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    pub inode: u64,
    pub kubelet: Option<Kubelet>,
    pub runtime: Option<Runtime>,
    /// The machine's own (root) namespace.
    pub is_root: bool,
    pub machine_hostname: String,
    /// Its name in /run/netns.
    pub netns_name: Option<String>,
}

/// `--hostname-override NAME` or `--hostname-override=NAME` (one dash too, as Go's flag
/// package takes) in a kubelet's command line.
pub fn hostname_override(args: &[String]) -> Option<String> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let flag = a.trim_start_matches('-');
        if flag.len() == a.len() || a.len() - flag.len() > 2 {
            continue;
        }
        if let Some(v) = flag.strip_prefix("hostname-override=") {
            return Some(v.to_owned()).filter(|v| !v.is_empty());
        }
        if flag == "hostname-override" {
            return it.next().cloned().filter(|v| !v.is_empty());
        }
    }
    None
}

/// Applies the rules of this module's documentation.
pub fn choose(f: &Facts) -> NodeName {
    let clean = |s: &str| s.trim().to_lowercase();
    if let Some(k) = &f.kubelet {
        if let Some(h) = k.hostname_override.as_deref().map(clean) {
            return NodeName {
                how: format!(
                    "the kubelet (pid {}) in the node's network namespace runs with --hostname-override {h}",
                    k.pid
                ),
                name: h,
            };
        }
        if let Some(h) = k.hostname.as_deref().map(clean).filter(|h| !h.is_empty()) {
            return NodeName {
                how: format!(
                    "the hostname of the kubelet (pid {}) in the node's network namespace",
                    k.pid
                ),
                name: h,
            };
        }
    }
    if let Some(r) = &f.runtime {
        if let Some(h) = r
            .own_hostname
            .as_deref()
            .map(clean)
            .filter(|h| !h.is_empty())
        {
            return NodeName {
                how: format!(
                    "the hostname of {} (pid {}), the node's runtime, in a UTS namespace of its own (a node container)",
                    r.comm, r.pid
                ),
                name: h,
            };
        }
    }
    if f.is_root {
        return NodeName {
            name: f.machine_hostname.clone(),
            how: "this machine's hostname (the node is the machine's own network namespace)".into(),
        };
    }
    if let Some(n) = &f.netns_name {
        return NodeName {
            name: n.clone(),
            how: format!(
                "the node namespace's name in /run/netns (no kubelet there, and {})",
                match &f.runtime {
                    Some(r) => format!(
                        "its runtime {} (pid {}) has the machine's hostname",
                        r.comm, r.pid
                    ),
                    None => "no runtime process".into(),
                }
            ),
        };
    }
    NodeName {
        name: format!("netns-{}", f.inode),
        how: format!(
            "the node namespace's inode {} (no kubelet, no runtime hostname of its own, no name in /run/netns)",
            f.inode
        ),
    }
}

/// The hostname of process `pid`'s UTS namespace (read on a thread that entered it).
fn uts_hostname(pid: u32) -> Option<String> {
    let uts = File::open(format!("/proc/{pid}/ns/uts")).ok()?;
    std::thread::scope(|s| {
        s.spawn(|| {
            setns(&uts, CloneFlags::CLONE_NEWUTS).ok()?;
            nix::unistd::gethostname().ok()?.into_string().ok()
        })
        .join()
        .ok()
        .flatten()
    })
}

fn inode(path: &str) -> Option<u64> {
    fs::metadata(path).ok().map(|m| m.ino())
}

fn cmdline(pid: u32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// Gathers the facts about the namespace at `ns` from /proc. `runtime_pid`: the runtime the
/// pod was found through, when known (else any runtime process in the namespace).
pub fn facts(ns: &Path, runtime_pid: Option<u32>) -> Facts {
    let ino = fs::metadata(ns).map(|m| m.ino()).unwrap_or(0);
    let mut f = Facts {
        inode: ino,
        is_root: inode("/proc/1/ns/net") == Some(ino),
        machine_hostname: super::hostname(),
        ..Facts::default()
    };
    let own_uts = inode("/proc/self/ns/uts");
    let mut runtimes = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(comm) = fs::read_to_string(e.path().join("comm")) else {
            continue;
        };
        let comm = comm.trim();
        let is_kubelet = comm == "kubelet";
        if !is_kubelet && !RUNTIME_COMMS.contains(&comm) {
            continue;
        }
        if inode(&format!("/proc/{pid}/ns/net")) != Some(ino) {
            continue;
        }
        if is_kubelet {
            if f.kubelet.is_none() {
                f.kubelet = Some(Kubelet {
                    pid,
                    hostname_override: hostname_override(&cmdline(pid)),
                    hostname: uts_hostname(pid),
                });
            }
        } else {
            runtimes.push((pid, comm.to_owned()));
        }
    }
    let runtime = runtime_pid
        .and_then(|p| {
            fs::read_to_string(format!("/proc/{p}/comm"))
                .ok()
                .map(|c| (p, c.trim().to_owned()))
        })
        .or_else(|| runtimes.into_iter().next());
    f.runtime = runtime.map(|(pid, comm)| Runtime {
        own_hostname: (inode(&format!("/proc/{pid}/ns/uts")) != own_uts)
            .then(|| uts_hostname(pid))
            .flatten(),
        pid,
        comm,
    });
    f.netns_name = crate::netns::list()
        .unwrap_or_default()
        .into_iter()
        .find(|n| fs::metadata(crate::netns::path_of(n)).is_ok_and(|m| m.ino() == ino));
    f
}

/// The name of the node whose network namespace is `ns`.
pub fn name_of(ns: &Path, runtime_pid: Option<u32>) -> NodeName {
    choose(&facts(ns, runtime_pid))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn hostname_override_in_every_spelling() {
        for cmd in [
            "/usr/bin/kubelet --hostname-override=Kind-Worker --v=2",
            "/usr/bin/kubelet --v=2 --hostname-override kind-worker",
            "kubelet -hostname-override=kind-worker",
        ] {
            assert_eq!(
                hostname_override(&args(cmd)).map(|h| h.to_lowercase()),
                Some("kind-worker".into()),
                "{cmd}"
            );
        }
        for cmd in [
            "kubelet --node-ip=10.0.0.1",
            "kubelet --hostname-override",
            "kubelet --hostname-override=",
            "kubelet ---hostname-override=x",
            "kubelet hostname-override=x",
        ] {
            assert_eq!(hostname_override(&args(cmd)), None, "{cmd}");
        }
    }

    fn base() -> Facts {
        Facts {
            inode: 4026532999,
            machine_hostname: "vm".into(),
            ..Facts::default()
        }
    }

    #[test]
    fn a_kubelet_names_its_node() {
        let mut f = base();
        f.netns_name = Some("node-a".into());
        f.runtime = Some(Runtime {
            pid: 7,
            comm: "containerd".into(),
            own_hostname: Some("ctr-host".into()),
        });
        f.kubelet = Some(Kubelet {
            pid: 9,
            hostname_override: Some("Worker-A".into()),
            hostname: Some("vm".into()),
        });
        let n = choose(&f);
        assert_eq!(n.name, "worker-a");
        assert!(n.how.contains("--hostname-override"), "{}", n.how);
        f.kubelet.as_mut().unwrap().hostname_override = None;
        assert_eq!(choose(&f).name, "vm");
        // On the machine's own namespace too: the kubelet's name, not the hostname.
        f.is_root = true;
        f.kubelet.as_mut().unwrap().hostname_override = Some("ip-10-0-1-2.ec2.internal".into());
        assert_eq!(choose(&f).name, "ip-10-0-1-2.ec2.internal");
    }

    #[test]
    fn a_node_container_is_named_by_its_runtimes_hostname() {
        let mut f = base();
        f.netns_name = Some("node-b".into());
        f.runtime = Some(Runtime {
            pid: 7,
            comm: "containerd".into(),
            own_hostname: Some("kind-worker2".into()),
        });
        let n = choose(&f);
        assert_eq!(n.name, "kind-worker2");
        assert!(n.how.contains("UTS namespace of its own"), "{}", n.how);
    }

    #[test]
    fn otherwise_the_machine_the_namespace_name_or_its_inode() {
        let mut f = base();
        f.runtime = Some(Runtime {
            pid: 7,
            comm: "containerd".into(),
            own_hostname: None,
        });
        f.is_root = true;
        assert_eq!(choose(&f).name, "vm");
        f.is_root = false;
        f.netns_name = Some("t1-node-a".into());
        let n = choose(&f);
        assert_eq!(n.name, "t1-node-a");
        assert!(n.how.contains("containerd (pid 7)"), "{}", n.how);
        f.netns_name = None;
        assert_eq!(choose(&f).name, "netns-4026532999");
    }
}
