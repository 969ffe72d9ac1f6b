//! Network namespaces: create and delete named ones (as `ip netns add/del` does, without
//! running `ip`), and run code inside one.
//!
//! `setns(2)` is per thread, so [`run_in`] runs its closure on a short-lived scoped thread that
//! entered the namespace; the caller's thread never changes namespace. Sockets (netlink
//! included) stay bound to the namespace they were created in.
use std::{
    fs::{self, File, OpenOptions},
    io,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
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
