//! SIGINT and SIGTERM as a flag: a run that is told to stop ends at its next check (every
//! 100 ms in the event loop, between attachments while starting) and detaches everything on
//! its way out, instead of dying with probes left behind. [`install`] once at start-up.
use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::{Context as _, Result};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

static PENDING: AtomicI32 = AtomicI32::new(0);

extern "C" fn record(sig: libc::c_int) {
    PENDING.store(sig, Ordering::SeqCst);
}

/// Turns SIGINT and SIGTERM into [`pending`] for the rest of the process.
pub fn install() -> Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(record),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(sig, &action) }.with_context(|| format!("handling {sig}"))?;
    }
    Ok(())
}

/// The signal that asked podtrace to stop, if one did.
pub fn pending() -> Option<&'static str> {
    match PENDING.load(Ordering::SeqCst) {
        libc::SIGINT => Some("SIGINT"),
        libc::SIGTERM => Some("SIGTERM"),
        _ => None,
    }
}

/// An error when a signal came (for long start-ups to check between steps).
pub fn check() -> Result<()> {
    match pending() {
        Some(sig) => anyhow::bail!("interrupted by {sig}"),
        None => Ok(()),
    }
}
