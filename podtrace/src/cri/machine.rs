//! The container runtimes running on this machine, found by their processes: each
//! `containerd`, `crio` or `cri-dockerd` process and the unix sockets it listens on.
//!
//! A kind node's containerd (a container of the machine), a k3s agent's, or a runtime that a
//! test started in a mount namespace of its own listens on a socket path that exists only in
//! *its* mount namespace. The kernel lists a network namespace's unix sockets with their
//! bound paths (`/proc/PID/net/unix`), the process's fds say which are its own, and
//! `/proc/PID/root/PATH` reaches the socket from here (unix sockets are connected through the
//! file system, and `/proc/PID/root` is the process's root in its mount namespace). A path
//! that is the same socket from here is used as it is.
//!
//! The pids a runtime reports (a sandbox's, a container's) are in *its* PID namespace: a kind
//! node container has one of its own, so its pid 345 is some other process here.
//! [`pid_here`] translates them through the `NSpid` lines of /proc/PID/status and the
//! namespaces' parents (`NS_GET_PARENT`).
use std::{
    collections::HashSet,
    fs::{self, File},
    os::unix::fs::{FileTypeExt as _, MetadataExt as _},
    path::{Path, PathBuf},
};

/// The process names of CRI runtimes (k3s and RKE2 run a `containerd` child).
pub const RUNTIME_COMMS: &[&str] = &["containerd", "crio", "cri-dockerd"];

/// A runtime process and a CRI socket it listens on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeSocket {
    pub pid: u32,
    /// `containerd`, `crio`, …
    pub comm: String,
    /// The socket's path in the runtime's mount namespace.
    pub bound: PathBuf,
    /// The path podtrace connects to: `bound` when that is the same socket here, else
    /// `/proc/PID/root/` + `bound`.
    pub reachable: PathBuf,
}

/// The listening stream sockets in a `/proc/PID/net/unix` listing: (inode, bound path).
/// Abstract (`@…`) and unbound sockets are left out.
pub fn listening_sockets(listing: &str) -> Vec<(u64, PathBuf)> {
    const ACCEPTCON: u32 = 0x0001_0000;
    const SOCK_STREAM: u32 = 1;
    listing
        .lines()
        .skip(1)
        .filter_map(|line| {
            // Num RefCount Protocol Flags Type St Inode Path
            let f: Vec<&str> = line.split_whitespace().collect();
            let flags = u32::from_str_radix(f.get(3)?, 16).ok()?;
            let kind = u32::from_str_radix(f.get(4)?, 16).ok()?;
            let inode: u64 = f.get(6)?.parse().ok()?;
            let path = f.get(7)?;
            (flags & ACCEPTCON != 0 && kind == SOCK_STREAM && path.starts_with('/'))
                .then(|| (inode, PathBuf::from(path)))
        })
        .collect()
}

/// Whether a runtime's socket is one that may serve CRI: `*.sock`, not containerd's ttrpc or
/// debug sockets.
pub fn may_serve_cri(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.ends_with(".sock") && !name.contains("ttrpc") && !name.contains("debug")
}

/// The socket inodes among a process's fds (`socket:[N]` links).
fn socket_inodes(pid: u32) -> HashSet<u64> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| fs::read_link(e.path()).ok())
        .filter_map(|l| {
            l.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// (device, inode) of a socket file, for telling whether two paths are one socket.
pub fn socket_id(path: &Path) -> Option<(u64, u64)> {
    let m = fs::metadata(path).ok()?;
    m.file_type().is_socket().then(|| (m.dev(), m.ino()))
}

/// The processes whose name is a runtime's: (pid, comm), by pid.
pub fn runtime_processes() -> Vec<(u32, String)> {
    let mut out: Vec<(u32, String)> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let comm = fs::read_to_string(e.path().join("comm")).ok()?;
            let comm = comm.trim();
            RUNTIME_COMMS
                .contains(&comm)
                .then(|| (pid, comm.to_owned()))
        })
        .collect();
    out.sort();
    out
}

/// Every runtime process on this machine and the CRI-looking sockets it listens on.
pub fn runtime_sockets() -> Vec<RuntimeSocket> {
    let mut out = Vec::new();
    for (pid, comm) in runtime_processes() {
        let Ok(listing) = fs::read_to_string(format!("/proc/{pid}/net/unix")) else {
            continue;
        };
        let own = socket_inodes(pid);
        for (inode, bound) in listening_sockets(&listing) {
            if !own.contains(&inode) || !may_serve_cri(&bound) {
                continue;
            }
            let through_root = Path::new(&format!("/proc/{pid}/root"))
                .join(bound.strip_prefix("/").unwrap_or(&bound));
            let Some(theirs) = socket_id(&through_root) else {
                continue;
            };
            let reachable = if socket_id(&bound) == Some(theirs) {
                bound.clone()
            } else {
                through_root
            };
            out.push(RuntimeSocket {
                pid,
                comm: comm.clone(),
                bound,
                reachable,
            });
        }
    }
    out
}

/// The `NSpid:` line of a /proc/PID/status: the process's pid in each PID namespace it is in,
/// from the one of this /proc (podtrace's) inwards.
pub fn parse_nspid(status: &str) -> Option<Vec<u32>> {
    let line = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    let pids: Option<Vec<u32>> = line.split_whitespace().map(|p| p.parse().ok()).collect();
    pids.filter(|p| !p.is_empty())
}

fn nspid(pid: u32) -> Option<Vec<u32>> {
    parse_nspid(&fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// Where a pid a runtime reported is, here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PidHere {
    /// The runtime shares podtrace's PID namespace: the same number.
    Same(u32),
    /// The runtime has a PID namespace of its own (a node container): this process here.
    Translated(u32),
    /// No process has that pid in the runtime's PID namespace (it exited).
    Gone,
    /// The runtime's own processes are not visible here (another PID namespace than
    /// podtrace's or one below it): its pids cannot be trusted.
    Invisible,
}

/// The processes whose pid in PID namespace `level` (0: podtrace's) is `reported`: the
/// candidates' `NSpid` lists, each with the inode of its namespace at that level.
pub fn candidates_at_level(
    level: usize,
    reported: u32,
    processes: impl IntoIterator<Item = (u32, Vec<u32>, Option<u64>)>,
    runtime_ns: u64,
) -> Vec<u32> {
    processes
        .into_iter()
        .filter(|(_, ns_pids, ns_at_level)| {
            ns_pids.get(level) == Some(&reported) && *ns_at_level == Some(runtime_ns)
        })
        .map(|(pid, _, _)| pid)
        .collect()
}

/// The inode of the PID namespace `up` levels above process `pid`'s own.
fn pidns_above(pid: u32, up: usize) -> Option<u64> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    const NS_GET_PARENT: libc::c_ulong = 0xb702; // _IO(0xb7, 0x2)
    let mut fd: OwnedFd = File::open(format!("/proc/{pid}/ns/pid")).ok()?.into();
    for _ in 0..up {
        // SAFETY: ioctl on an fd we own; it returns a new fd (owned below) or -1.
        let parent = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_PARENT as _) };
        if parent < 0 {
            return None;
        }
        // SAFETY: a fresh fd the kernel just returned, owned by nobody else.
        fd = unsafe { OwnedFd::from_raw_fd(parent) };
    }
    let file = File::from(fd);
    file.metadata().ok().map(|m| m.ino())
}

/// Where `reported`, a pid the runtime `runtime_pid` (a pid here, from its socket's peer
/// credentials) reported, is in podtrace's PID namespace.
pub fn pid_here(runtime_pid: Option<u32>, reported: u32) -> PidHere {
    let Some(runtime_pid) = runtime_pid else {
        return PidHere::Invisible;
    };
    let Some(levels) = nspid(runtime_pid) else {
        return PidHere::Invisible;
    };
    let level = levels.len() - 1;
    if level == 0 {
        return if Path::new(&format!("/proc/{reported}")).exists() {
            PidHere::Same(reported)
        } else {
            PidHere::Gone
        };
    }
    let Some(runtime_ns) = pidns_above(runtime_pid, 0) else {
        return PidHere::Invisible;
    };
    let processes = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let ns_pids = nspid(pid)?;
            // Cheap first: only processes with that pid at that level need their namespace.
            if ns_pids.get(level) != Some(&reported) {
                return None;
            }
            let ns = pidns_above(pid, ns_pids.len() - 1 - level);
            Some((pid, ns_pids, ns))
        });
    match candidates_at_level(level, reported, processes, runtime_ns).as_slice() {
        [one] => PidHere::Translated(*one),
        _ => PidHere::Gone,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTING: &str = "\
Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000002 00000000 00010000 0001 01 31337 /tmp/podtrace-cri-x/containerd.sock.ttrpc
0000000000000000: 00000002 00000000 00010000 0001 01 31338 /tmp/podtrace-cri-x/containerd.sock
0000000000000000: 00000003 00000000 00000000 0001 03 31339 /tmp/podtrace-cri-x/containerd.sock
0000000000000000: 00000002 00000000 00010000 0001 01 31340 @/containerd-shim/abc.sock@
0000000000000000: 00000002 00000000 00010000 0005 01 31341 /run/seqpacket.sock
0000000000000000: 00000002 00000000 00000000 0002 01 31342 /run/dgram.sock
0000000000000000: 00000003 00000000 00000000 0001 03 31343
";

    #[test]
    fn only_listening_stream_sockets_with_a_path() {
        assert_eq!(
            listening_sockets(LISTING),
            [
                (
                    31337,
                    PathBuf::from("/tmp/podtrace-cri-x/containerd.sock.ttrpc")
                ),
                (31338, PathBuf::from("/tmp/podtrace-cri-x/containerd.sock")),
            ]
        );
        assert!(listening_sockets("").is_empty());
        assert!(listening_sockets("header only\n").is_empty());
    }

    #[test]
    fn cri_sockets_by_name() {
        for p in [
            "/run/containerd/containerd.sock",
            "/var/run/crio/crio.sock",
            "/run/cri-dockerd.sock",
            "/run/k3s/containerd/containerd.sock",
        ] {
            assert!(may_serve_cri(Path::new(p)), "{p}");
        }
        for p in [
            "/run/containerd/containerd.sock.ttrpc",
            "/run/containerd/debug.sock",
            "/run/containerd/s/0123abcd",
        ] {
            assert!(!may_serve_cri(Path::new(p)), "{p}");
        }
    }

    #[test]
    fn nspid_lines() {
        let status = "Name:\tpause\nTgid:\t5663\nNSpid:\t5663\t17\t1\nPPid:\t1\n";
        assert_eq!(parse_nspid(status), Some(vec![5663, 17, 1]));
        assert_eq!(parse_nspid("NSpid:\t42\n"), Some(vec![42]));
        assert_eq!(parse_nspid("Name:\tx\n"), None);
        assert_eq!(parse_nspid("NSpid:\t\n"), None);
    }

    #[test]
    fn a_node_pid_is_the_process_in_that_nodes_namespace() {
        // Two node containers (PID namespaces 100 and 200), each with a pid 17.
        let procs = vec![
            (5663, vec![5663, 17, 1], Some(100)),
            (5700, vec![5700, 17], Some(200)),
            (17, vec![17], None),
            (5800, vec![5800, 18], Some(100)),
        ];
        assert_eq!(candidates_at_level(1, 17, procs.clone(), 100), [5663]);
        assert_eq!(candidates_at_level(1, 17, procs.clone(), 200), [5700]);
        assert!(candidates_at_level(1, 19, procs, 100).is_empty());
    }
}
