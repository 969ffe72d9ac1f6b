//! Kernel hooks that go while the conversation is idle.
//!
//! The route lookup (`fib_table_lookup`) and device transmit (`net_dev_start_xmit`) hooks run
//! for every packet of the machine. Their programs reject a packet at once while no hop probe
//! has emitted lately (`HOP_LAST`), but the kernel's call into them is paid all the same, and
//! on a busy node it is most of what an idle session costs beyond its tc hooks. A session
//! left on for hours waiting for a fault is idle most of that time.
//!
//! So podtrace makes those two hooks' links itself (`BPF_RAW_TRACEPOINT_OPEN` on the loaded
//! tp_btf programs, the call aya makes) and the engine's reader looks at `HOP_LAST` on every
//! pass (at least every 20 ms): the links are closed once no hop probe has emitted for
//! [`IDLE_AFTER`], and made again as soon as one does. They are there from the start, so a
//! session's first packets have all their evidence. The first packet after an idle spell
//! (and any in the ~20 ms it takes to see it) has no route lookup or transmit evidence; drops
//! are always seen (that hook stays). `--keep-hooks` keeps them attached throughout.
//! kprobe-attached hooks (older kernels) stay attached.
use std::{
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use aya::maps::{Array, MapData};

use super::monotonic_ns;

/// How long without a packet from a hop probe before the hooks go.
pub const IDLE_AFTER: Duration = Duration::from_secs(5);

/// `BPF_RAW_TRACEPOINT_OPEN`.
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;

/// `union bpf_attr` for `BPF_RAW_TRACEPOINT_OPEN`: no name (a tp_btf program names its
/// tracepoint at load time), the program.
#[repr(C)]
struct RawTracepointOpen {
    name: u64,
    prog_fd: u32,
    pad: u32,
    cookie: u64,
}

/// Attaches a loaded tp_btf program to its tracepoint; the link goes when the fd is closed.
pub fn raw_tracepoint_open(prog: BorrowedFd<'_>) -> Result<OwnedFd> {
    let attr = RawTracepointOpen {
        name: 0,
        prog_fd: prog.as_raw_fd() as u32,
        pad: 0,
        cookie: 0,
    };
    // SAFETY: `attr` is a `union bpf_attr` prefix of the size given, alive for the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_RAW_TRACEPOINT_OPEN,
            &attr as *const RawTracepointOpen,
            std::mem::size_of::<RawTracepointOpen>() as libc::c_uint,
        )
    };
    if fd < 0 {
        bail!(
            "BPF_RAW_TRACEPOINT_OPEN: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: a new file descriptor the kernel just gave this process.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// One hook: its program and, while attached, its link.
#[derive(Debug)]
pub struct Hook {
    /// The tracepoint, for messages.
    pub tracepoint: &'static str,
    pub prog: OwnedFd,
    pub link: Option<OwnedFd>,
}

/// Whether the hooks should be attached now: the session started, or a hop probe last
/// emitted (`last_ns`, 0: none yet), less than `idle_after` ago (all on the kernel's
/// monotonic clock). The first emission after an idle spell brings them back.
pub fn wanted(last_ns: u64, start_ns: u64, now_ns: u64, idle_after: Duration) -> bool {
    now_ns.saturating_sub(last_ns.max(start_ns)) < idle_after.as_nanos() as u64
}

/// The hooks that go while the conversation is idle, and what says when it is.
pub struct IdleHooks {
    hooks: Vec<Hook>,
    hop_last: Array<MapData, u64>,
    start_ns: u64,
    idle_after: Duration,
}

impl IdleHooks {
    /// `hooks` attached now; `hop_last` the `HOP_LAST` map.
    pub fn new(hooks: Vec<Hook>, hop_last: Array<MapData, u64>, idle_after: Duration) -> Self {
        Self {
            hooks,
            hop_last,
            start_ns: monotonic_ns(),
            idle_after,
        }
    }

    /// Closes or makes the links as the conversation went idle or came back.
    pub fn tick(&mut self) -> Result<()> {
        let last = self.hop_last.get(&0, 0).context("reading HOP_LAST")?;
        let want = wanted(last, self.start_ns, monotonic_ns(), self.idle_after);
        if want == self.hooks.iter().all(|h| h.link.is_some()) {
            return Ok(());
        }
        if want {
            for h in &mut self.hooks {
                if h.link.is_none() {
                    h.link = Some(
                        raw_tracepoint_open(h.prog.as_fd())
                            .with_context(|| format!("attaching tp_btf {} again", h.tracepoint))?,
                    );
                }
            }
            log::debug!("a hop probe emitted: route lookup and transmit hooks attached again");
        } else {
            for h in &mut self.hooks {
                h.link = None;
            }
            log::debug!(
                "no hop probe emitted for {:?}: route lookup and transmit hooks detached",
                self.idle_after
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn hooks_go_after_an_idle_spell_and_come_back_with_the_next_packet() {
        let after = Duration::from_secs(5);
        let start = 100 * S;
        // Attached from the start, through the first 5 s without any packet.
        assert!(wanted(0, start, start + 4 * S, after));
        assert!(!wanted(0, start, start + 5 * S, after));
        // Packets keep them: 5 s from the last one.
        assert!(wanted(start + 10 * S, start, start + 14 * S, after));
        assert!(!wanted(start + 10 * S, start, start + 15 * S, after));
        // Gone; the next packet brings them back, an old one does not.
        assert!(!wanted(start + 10 * S, start, start + 60 * S, after));
        assert!(wanted(
            start + 60 * S,
            start,
            start + 60 * S + 20_000_000,
            after
        ));
        // A clock read before the emission it sees (another CPU's) is not idle.
        assert!(wanted(start + 61 * S, start, start + 60 * S, after));
    }
}
