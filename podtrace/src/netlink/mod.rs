//! Netlink (rtnetlink) in any network namespace: the one wrapper every part of podtrace uses
//! to read a namespace's links, addresses, routes, rules, neighbours and FDB entries
//! ([`snapshot::Snapshot`]), to ask the kernel's FIB for a route, to compare namespaces by
//! their NSID, and (for the lab) to build topologies ([`write`]).
//!
//! A netlink socket is bound to the network namespace of the thread that created it, so an
//! [`Nl`] is made on a thread that entered the namespace it acts on: [`run`] (or [`in_ns`])
//! runs a closure on a [`crate::netns::run_in`] thread with a fresh connection. Every request
//! is driven to completion on a current-thread tokio runtime owned by the [`Nl`].
//!
//! ```no_run
//! use std::path::Path;
//! let snap = podtrace::netlink::in_ns(Path::new("/run/netns/pt-node-a"), |nl| nl.snapshot())?;
//! for l in &snap.links {
//!     println!("{} {} {:?}", l.index, l.name, l.kind);
//! }
//! # anyhow::Ok(())
//! ```
pub mod read;
pub mod snapshot;
pub mod write;

use std::{future::Future, path::Path};

use anyhow::{Context as _, Result};
use rtnetlink::Handle;

pub use snapshot::{mac_string, Mac, Snapshot, TABLE_DEFAULT, TABLE_LOCAL, TABLE_MAIN};
pub use write::Route;

/// A netlink connection in the namespace of the thread that made it.
pub struct Nl {
    rt: tokio::runtime::Runtime,
    handle: Handle,
}

/// Runs `f` with a netlink connection inside the namespace at `ns` (`None`: the caller's own).
pub fn run<T: Send>(ns: Option<&Path>, f: impl FnOnce(&Nl) -> Result<T> + Send) -> Result<T> {
    crate::netns::run_in(ns, || {
        let nl = Nl::new()?;
        f(&nl)
    })
}

/// [`run`] in the namespace at `ns`, naming it in errors.
pub fn in_ns<T: Send>(ns: &Path, f: impl FnOnce(&Nl) -> Result<T> + Send) -> Result<T> {
    run(Some(ns), f).with_context(|| format!("in network namespace {}", ns.display()))
}

/// The errno a failed netlink request carried, if any.
fn errno_of(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

impl Nl {
    /// Opens a connection in the calling thread's network namespace.
    pub fn new() -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building a tokio runtime for netlink")?;
        let handle = rt.block_on(async {
            let (conn, handle, _) =
                rtnetlink::new_connection().context("opening a netlink socket")?;
            tokio::spawn(conn);
            anyhow::Ok(handle)
        })?;
        Ok(Self { rt, handle })
    }

    fn block<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }
}
