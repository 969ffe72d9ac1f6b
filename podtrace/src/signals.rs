//! SIGINT and SIGTERM as a flag: a run that is told to stop ends at once (the event loop
//! waits on [`wake_fd`] too), a long start-up between its steps, and each detaches everything
//! on its way out instead of dying with probes left behind. [`install`] once at start-up.
use std::{
    os::fd::BorrowedFd,
    sync::atomic::{AtomicI32, Ordering},
};

use anyhow::{Context as _, Result};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

static PENDING: AtomicI32 = AtomicI32::new(0);
/// The self-pipe's ends (-1 until [`install`]): the handler writes a byte, the event loop
/// waits for the read end to become readable. Never read from: once a signal came, the pipe
/// stays readable, and [`pending`] says which signal it was.
static WAKE_READ: AtomicI32 = AtomicI32::new(-1);
static WAKE_WRITE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn record(sig: libc::c_int) {
    PENDING.store(sig, Ordering::SeqCst);
    let fd = WAKE_WRITE.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe; errno is the interrupted code's, so it is
        // put back (a full pipe fails with EAGAIN, and a byte is already there then).
        unsafe {
            let errno = *libc::__errno_location();
            libc::write(fd, [1u8].as_ptr().cast(), 1);
            *libc::__errno_location() = errno;
        }
    }
}

/// Turns SIGINT and SIGTERM into [`pending`] (and [`wake_fd`] readable) for the rest of the
/// process.
pub fn install() -> Result<()> {
    if WAKE_READ.load(Ordering::SeqCst) < 0 {
        let mut fds = [-1; 2];
        // SAFETY: pipe2 fills the two fds; they stay open for the process's life.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error()).context("creating the signal pipe");
        }
        WAKE_WRITE.store(fds[1], Ordering::SeqCst);
        WAKE_READ.store(fds[0], Ordering::SeqCst);
    }
    let action = SigAction::new(
        SigHandler::Handler(record),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic and writes a byte to a pipe.
        unsafe { sigaction(sig, &action) }.with_context(|| format!("handling {sig}"))?;
    }
    Ok(())
}

/// A non-blocking fd that becomes readable when SIGINT or SIGTERM comes (`None` before
/// [`install`]).
pub fn wake_fd() -> Option<BorrowedFd<'static>> {
    let fd = WAKE_READ.load(Ordering::SeqCst);
    // SAFETY: the pipe is never closed once created.
    (fd >= 0).then(|| unsafe { BorrowedFd::borrow_raw(fd) })
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
