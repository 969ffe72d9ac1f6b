//! `lab exec`: run a command inside a lab pod's, node's or host's network namespace.
//!
//! The child enters the namespace between fork and exec (a `pre_exec` hook calling
//! `setns(2)`); podtrace itself never changes namespace. Like `ip netns exec`, the child also
//! gets a private mount namespace with a fresh sysfs, so `/sys/class/net` shows the lab
//! namespace's interfaces rather than the machine's.
use std::{
    os::unix::process::ExitStatusExt,
    path::PathBuf,
    process::ExitStatus,
    sync::atomic::{AtomicI32, Ordering},
};

use anyhow::{bail, Context as _, Result};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

use super::registry;

/// The network namespace of `name` (a pod, `default/POD`, a node or a host) in the lab with
/// this prefix.
pub fn target(prefix: &str, name: &str) -> Result<PathBuf> {
    let Some(reg) = registry::load(prefix)? else {
        bail!("no lab with prefix {prefix:?} is up (podtrace lab up --prefix {prefix})");
    };
    match reg.netns_of(name) {
        Some(p) => Ok(p.to_owned()),
        None => bail!(
            "no pod, node or host {name:?} in lab {prefix:?} (it has: {})",
            reg.names().join(", ")
        ),
    }
}

/// The command [`run`] waits for (0: not started yet).
static CHILD: AtomicI32 = AtomicI32::new(0);
/// A signal to pass on that came before the command was started.
static PENDING: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_signal(sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // si_code <= 0: sent by a process (SI_USER, SI_QUEUE, SI_TKILL); the kernel's own
    // (the terminal's ^C: SI_KERNEL) reached the command directly.
    // SAFETY: the kernel passes a valid siginfo with SA_SIGINFO.
    let from_process = info.is_null() || unsafe { (*info).si_code } <= 0;
    let pid = CHILD.load(Ordering::SeqCst);
    if !from_process {
        return;
    }
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe {
            libc::kill(pid, sig);
        }
    } else {
        PENDING.store(sig, Ordering::SeqCst);
    }
}

/// While alive, SIGINT, SIGTERM, SIGHUP and SIGQUIT sent to podtrace are passed on to the
/// command [`run`] waits for (and do not end podtrace).
struct ForwardSignals {
    old: Vec<(Signal, SigAction)>,
}

impl ForwardSignals {
    fn install() -> Result<Self> {
        let action = SigAction::new(
            SigHandler::SigAction(forward_signal),
            SaFlags::SA_SIGINFO | SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        let mut old = Vec::new();
        for sig in [
            Signal::SIGINT,
            Signal::SIGTERM,
            Signal::SIGHUP,
            Signal::SIGQUIT,
        ] {
            // SAFETY: the handler only reads an atomic and calls kill(2).
            let prev = unsafe { sigaction(sig, &action) }
                .with_context(|| format!("installing a {sig} handler"))?;
            old.push((sig, prev));
        }
        Ok(Self { old })
    }
}

impl Drop for ForwardSignals {
    fn drop(&mut self) {
        for (sig, prev) in &self.old {
            // SAFETY: restores the disposition saved in install().
            unsafe {
                let _ = sigaction(*sig, prev);
            }
        }
    }
}

/// The exit code a shell would report for `status`: the code, or 128 + the signal.
pub fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(c), _) => c as u8,
        (None, Some(sig)) => 128u8.wrapping_add(sig as u8),
        (None, None) => 1,
    }
}

/// Runs `argv` inside `name`'s namespace in the lab `prefix`, with the terminal's stdin,
/// stdout and stderr, and returns its exit code ([`exit_code`]).
pub fn run(prefix: &str, name: &str, argv: &[String]) -> Result<u8> {
    let Some((program, args)) = argv.split_first() else {
        bail!("lab exec: no command given (podtrace lab exec NAME -- CMD...)");
    };
    let netns = target(prefix, name)?;
    let mut cmd = crate::netns::command_in(&netns, program, args)?;
    // Signals sent to podtrace with kill(2) go on to the command; those from the terminal
    // (^C, ^\) reach it anyway, as it is in the same process group. podtrace keeps waiting
    // and reports how the command ended.
    let _forward = ForwardSignals::install()?;
    let mut child = cmd
        .spawn()
        .with_context(|| format!("running {program} in {name}"))?;
    CHILD.store(child.id() as i32, Ordering::SeqCst);
    // A signal that came before the command's pid was known is passed on now. (The handler
    // runs on this thread, podtrace's only one here, so it cannot interleave with these
    // two lines.)
    let pending = PENDING.swap(0, Ordering::SeqCst);
    if pending != 0 {
        // SAFETY: plain kill(2) of our own child.
        unsafe {
            libc::kill(child.id() as i32, pending);
        }
    }
    let status = child.wait();
    CHILD.store(0, Ordering::SeqCst);
    let status = status.with_context(|| format!("waiting for {program}"))?;
    Ok(exit_code(status))
}
