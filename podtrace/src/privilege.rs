//! podtrace loads eBPF programs (CAP_BPF, CAP_PERFMON), changes tc hooks (CAP_NET_ADMIN) and
//! enters namespaces (CAP_SYS_ADMIN): it runs as root.
use anyhow::{bail, Result};

pub fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("must run as root (needs CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN); try sudo");
    }
    Ok(())
}
