//! The floor under the idle `follow` figures: tc's clsact hook on every hop with a filter that
//! does nothing (a classic BPF program that returns 0, through cls_bpf: the path podtrace's
//! clsact filters take, without their work). What the idle configurations lose beyond this
//! is podtrace's programs and its kernel hooks; what this loses, no clsact probe of every hop
//! can win back.
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
