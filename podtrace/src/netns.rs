//! Network namespaces: create and delete named ones (as `ip netns add/del` does, without
//! running `ip`), run code inside one ([`run_in`]) and start commands inside one
//! ([`command_in`]).
//!
//! `setns(2)` is per thread, so [`run_in`] runs its closure on a short-lived scoped thread that
//! entered the namespace; the caller's thread never changes namespace. Sockets (netlink
//! included) stay bound to the namespace they were created in.
use std::{
    ffi::CString,
    fs::{self, File, OpenOptions},
    io,
    os::{
        fd::{AsRawFd, RawFd},
        unix::{fs::OpenOptionsExt, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{anyhow, bail, Context as _, Result};
use nix::{
    mount::{mount, umount2, MntFlags, MsFlags},
    sched::{setns, unshare, CloneFlags},
};

/// Where named namespaces live (iproute2's convention).
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// The path of a named namespace.
pub fn path_of(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

/// Resolves `NAME` (in /run/netns) or a path to a namespace file, checking that it exists
/// and is a network namespace.
pub fn resolve(name_or_path: &str) -> Result<PathBuf> {
    let path = if name_or_path.contains('/') {
        PathBuf::from(name_or_path)
    } else {
        path_of(name_or_path)
    };
    let file = File::open(&path)
        .with_context(|| format!("network namespace {} not found", path.display()))?;
    // Entering it on a throwaway thread is the only reliable "is this a netns" check.
    std::thread::scope(|s| {
        s.spawn(|| setns(&file, CloneFlags::CLONE_NEWNET))
            .join()
            .map_err(|_| anyhow!("netns check thread panicked"))?
            .with_context(|| format!("{} is not a network namespace", path.display()))
    })?;
    Ok(path)
}

/// Makes /run/netns a shared mount point, as iproute2 does, so that namespaces mounted later
/// are visible to other mount namespaces (containerd's, for instance).
fn prepare_run_dir() -> Result<()> {
    fs::create_dir_all(NETNS_RUN_DIR).with_context(|| format!("creating {NETNS_RUN_DIR}"))?;
    let shared = || {
        mount(
            None::<&str>,
            NETNS_RUN_DIR,
            Some("none"),
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    if shared().is_err() {
        mount(
            Some(NETNS_RUN_DIR),
            NETNS_RUN_DIR,
            Some("none"),
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .with_context(|| format!("bind-mounting {NETNS_RUN_DIR} on itself"))?;
        shared().with_context(|| format!("making {NETNS_RUN_DIR} a shared mount"))?;
    }
    Ok(())
}

/// Creates the named network namespace /run/netns/NAME. Fails if it exists already.
pub fn create(name: &str) -> Result<PathBuf> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        bail!("invalid network namespace name {name:?}");
    }
    prepare_run_dir()?;
    let path = path_of(name);
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    let result = std::thread::scope(|s| {
        s.spawn(|| -> Result<()> {
            unshare(CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET)")?;
            mount(
                Some("/proc/thread-self/ns/net"),
                &path,
                Some("none"),
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .with_context(|| format!("bind-mounting the new namespace on {}", path.display()))
        })
        .join()
        .map_err(|_| anyhow!("netns creation thread panicked"))?
    });
    if let Err(e) = result {
        let _ = fs::remove_file(&path);
        return Err(e);
    }
    Ok(path)
}

/// Deletes a named namespace (unmounts and removes /run/netns/NAME). The namespace itself
/// goes away with its last user; its devices with it. Missing is not an error.
pub fn delete(name: &str) -> Result<()> {
    let path = path_of(name);
    match umount2(&path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(e).with_context(|| format!("unmounting {}", path.display())),
    }
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// Names of the namespaces in /run/netns.
pub fn list() -> Result<Vec<String>> {
    let mut names = Vec::new();
    match fs::read_dir(NETNS_RUN_DIR) {
        Ok(dir) => {
            for entry in dir {
                names.push(entry?.file_name().to_string_lossy().into_owned());
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).context(NETNS_RUN_DIR),
    }
    names.sort();
    Ok(names)
}

/// Runs `f` on a thread inside the namespace at `ns` (`None`: the caller's own namespace).
pub fn run_in<T: Send>(ns: Option<&Path>, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let file = match ns {
        Some(p) => Some(
            File::open(p).with_context(|| format!("network namespace {} is gone", p.display()))?,
        ),
        None => None,
    };
    std::thread::scope(|s| {
        s.spawn(move || {
            crate::fault::point("netns-worker");
            if let Some(file) = &file {
                setns(file, CloneFlags::CLONE_NEWNET).context("setns(CLONE_NEWNET)")?;
            }
            f()
        })
        .join()
        .map_err(|_| anyhow!("namespace worker thread panicked"))?
    })
}

/// The inode number identifying the namespace at `path` (as `ip netns identify` compares).
pub fn inode_of(path: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(fs::metadata(path)
        .with_context(|| format!("network namespace {} not found", path.display()))?
        .ino())
}

/// Writes a sysctl under /proc/sys (`key` as a path, e.g. `net/ipv4/ip_forward`; interface
/// names may contain dots, so no dotted form) and reads it back.
///
/// /proc/sys/net shows the network namespace of the thread that opens the file, so call this
/// on the thread that entered the namespace (inside [`crate::netlink::in_ns`] or
/// [`run_in`]).
pub fn sysctl(key: &str, value: &str) -> Result<()> {
    let path = Path::new("/proc/sys").join(key);
    fs::write(&path, value).with_context(|| format!("writing {value} to {}", path.display()))?;
    let back = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    if back.trim() != value {
        bail!(
            "{} reads {:?} after writing {value:?}",
            path.display(),
            back.trim()
        );
    }
    Ok(())
}

/// Reads a sysctl (see [`sysctl`] about namespaces).
pub fn sysctl_get(key: &str) -> Result<String> {
    let path = Path::new("/proc/sys").join(key);
    match fs::read_to_string(&path) {
        Ok(s) => Ok(s.trim().to_owned()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Err(anyhow!("no sysctl {}", path.display()))
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// A [`Command`] that runs `program args...` inside the network namespace at `netns`.
///
/// The namespace file is opened now (close-on-exec) and kept open by the returned command, so
/// a namespace deleted in between fails the spawn rather than running the command elsewhere.
pub fn command_in(netns: &Path, program: &str, args: &[String]) -> Result<Command> {
    let ns = File::open(netns)
        .with_context(|| format!("network namespace {} not found", netns.display()))?;
    let mut cmd = Command::new(program);
    cmd.args(args);
    enter_in_child(&mut cmd, ns)?;
    Ok(cmd)
}

/// Makes `cmd`'s child process enter the network namespace `ns` before it execs.
pub fn enter_in_child(cmd: &mut Command, ns: File) -> Result<()> {
    // Everything the child touches is prepared here: between fork and exec only
    // async-signal-safe calls are allowed (no allocation).
    let root = CString::new("/")?;
    let sys = CString::new("/sys")?;
    let sysfs = CString::new("sysfs")?;
    // SAFETY: the hook only makes raw syscalls on data prepared above; `ns` moves into the
    // closure, so its fd stays open until the command is dropped.
    unsafe {
        cmd.pre_exec(move || {
            let fd: RawFd = ns.as_raw_fd();
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Best effort, as `ip netns exec`: a private mount namespace (slave, so nothing
            // propagates back to the machine's) with a sysfs of the new network namespace.
            if libc::unshare(libc::CLONE_NEWNS) == 0
                && libc::mount(
                    std::ptr::null(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_SLAVE | libc::MS_REC,
                    std::ptr::null(),
                ) == 0
                && libc::umount2(sys.as_ptr(), libc::MNT_DETACH) == 0
            {
                libc::mount(
                    sysfs.as_ptr(),
                    sys.as_ptr(),
                    sysfs.as_ptr(),
                    0,
                    std::ptr::null(),
                );
            }
            Ok(())
        });
    }
    Ok(())
}
