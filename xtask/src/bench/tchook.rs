//! The floors under the idle `follow` figures: tc's hooks on every hop with a program that
//! does nothing, through the mechanism podtrace uses, without podtrace's work.
//! - [`NoopLinks`]: TCX links to a program that returns `TCX_NEXT` (kernels with TCX, where
//!   podtrace uses TCX links).
//! - [`NoopFilters`]: clsact filters with a classic BPF program that returns 0, through
//!   cls_bpf (podtrace's clsact filters' path).
//!
//! What the idle configurations lose beyond their floor is podtrace's programs and its kernel
//! hooks; what the floor loses, no probe of every hop through that mechanism can win back.
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::time::Duration;

use anyhow::{bail, Result};

use super::{
    lab::{Hop, Lab},
    proc::last_lines,
};

/// The filters' priority (podtrace's own are not attached while these are).
const PREF: &str = "49151";

/// Filters that do nothing, on both directions of every hop; `Drop` removes them, and the
/// clsact qdiscs it added.
pub struct NoopFilters<'a> {
    lab: &'a Lab,
    /// (hop, whether this added the hop's clsact qdisc), for what was set up so far.
    done: Vec<(Hop, bool)>,
}

/// Runs `tc ARGS...` in the namespace of `hop`'s owner; its stdout.
fn tc(lab: &Lab, hop: &Hop, args: &[&str]) -> Result<String> {
    let mut cmd = vec!["tc".to_owned()];
    cmd.extend(args.iter().map(|a| a.to_string()));
    let mut p = lab.spawn_in("tc", &hop.owner, &cmd)?;
    let exit = p.wait(Duration::from_secs(10))?;
    if exit.code != Some(0) {
        bail!(
            "`tc {}` in {} failed ({}): {}",
            args.join(" "),
            hop.owner,
            exit.describe(),
            last_lines(&p.text(super::proc::Stream::Err), 3)
        );
    }
    Ok(p.text(super::proc::Stream::Out))
}

impl<'a> NoopFilters<'a> {
    pub fn attach(lab: &'a Lab, hops: &[Hop]) -> Result<NoopFilters<'a>> {
        let mut this = NoopFilters {
            lab,
            done: Vec::new(),
        };
        for hop in hops {
            let dev = hop.ifname.as_str();
            let had = tc(lab, hop, &["qdisc", "show", "dev", dev])?.contains("clsact");
            if !had {
                tc(lab, hop, &["qdisc", "add", "dev", dev, "clsact"])?;
            }
            this.done.push((hop.clone(), !had));
            for dir in ["ingress", "egress"] {
                tc(
                    lab,
                    hop,
                    &[
                        "filter",
                        "add",
                        "dev",
                        dev,
                        dir,
                        "pref",
                        PREF,
                        "bpf",
                        "bytecode",
                        "1,6 0 0 0,",
                    ],
                )?;
            }
        }
        Ok(this)
    }
}

impl Drop for NoopFilters<'_> {
    fn drop(&mut self) {
        for (hop, added_qdisc) in self.done.drain(..).rev() {
            let dev = hop.ifname.as_str();
            let result = if added_qdisc {
                tc(self.lab, &hop, &["qdisc", "del", "dev", dev, "clsact"]).map(drop)
            } else {
                ["ingress", "egress"].into_iter().try_for_each(|dir| {
                    tc(
                        self.lab,
                        &hop,
                        &["filter", "del", "dev", dev, dir, "pref", PREF],
                    )
                    .map(drop)
                })
            };
            if let Err(e) = result {
                eprintln!(
                    "bench: removing the do-nothing filters of {}: {e:#}",
                    hop.name
                );
            }
        }
    }
}

/// Whether the kernel has TCX (6.6 and newer).
pub fn kernel_has_tcx() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major, minor) >= (6, 6)
}

/// TCX links to a program that does nothing, on both directions of every hop; dropping it
/// closes them (each close waits for an RCU grace period: a few hundred ms for 10 hops).
pub struct NoopLinks {
    _links: Vec<OwnedFd>,
    _prog: OwnedFd,
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;

/// `union bpf_attr` for `BPF_PROG_LOAD`, the fields up to `expected_attach_type`.
#[repr(C)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    rest: [u8; 56],
}

/// `union bpf_attr` for `BPF_LINK_CREATE` with the TCX fields.
#[repr(C)]
struct LinkCreate {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    relative_fd: u32,
    pad: u32,
    expected_revision: u64,
    rest: [u8; 96],
}

/// The `bpf(2)` system call; the new file descriptor.
fn bpf<T>(cmd: libc::c_long, attr: &T, what: &str) -> Result<OwnedFd> {
    // SAFETY: `attr` is a `union bpf_attr` of the size given, alive for the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if fd < 0 {
        bail!("{what}: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a new file descriptor the kernel just gave this process.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A tc program of two instructions: `r0 = -1 (TCX_NEXT); exit`.
fn load_noop() -> Result<OwnedFd> {
    let insns: [u64; 2] = [0xffff_ffff_0000_00b7, 0x95];
    let license = c"GPL";
    let mut name = [0u8; 16];
    name[..11].copy_from_slice(b"bench_noop\0");
    let attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_SCHED_CLS,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: name,
        prog_ifindex: 0,
        expected_attach_type: 0,
        rest: [0; 56],
    };
    bpf(BPF_PROG_LOAD, &attr, "loading a do-nothing tc program")
}

impl NoopLinks {
    pub fn attach(lab: &Lab, hops: &[Hop]) -> Result<NoopLinks> {
        let prog = load_noop()?;
        let mut links = Vec::new();
        for hop in hops {
            let ns = format!("/run/netns/{}{}", lab.prefix, hop.owner);
            let prog_fd = prog.as_raw_fd() as u32;
            let ifname = hop.ifname.clone();
            // setns on a thread of its own: the links outlive it, the namespace change does not.
            let made = std::thread::spawn(move || -> Result<Vec<OwnedFd>> {
                let f = std::fs::File::open(&ns).map_err(|e| anyhow::anyhow!("{ns}: {e}"))?;
                // SAFETY: setns on a namespace file this thread holds open.
                if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!("entering {ns}: {}", std::io::Error::last_os_error());
                }
                let c = std::ffi::CString::new(ifname.as_str())?;
                // SAFETY: a NUL-terminated name.
                let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
                if ifindex == 0 {
                    bail!("{ifname} not found in {ns}");
                }
                [BPF_TCX_INGRESS, BPF_TCX_EGRESS]
                    .into_iter()
                    .map(|attach_type| {
                        let attr = LinkCreate {
                            prog_fd,
                            target_ifindex: ifindex,
                            attach_type,
                            flags: 0,
                            relative_fd: 0,
                            pad: 0,
                            expected_revision: 0,
                            rest: [0; 96],
                        };
                        bpf(
                            BPF_LINK_CREATE,
                            &attr,
                            &format!("a TCX link on {ifname} in {ns}"),
                        )
                    })
                    .collect()
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the TCX linking thread panicked"))??;
            links.extend(made);
        }
        Ok(NoopLinks {
            _links: links,
            _prog: prog,
        })
    }
}
