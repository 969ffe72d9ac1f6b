//! Each eBPF program's own cost, from the kernel: while run-time statistics are on, the
//! kernel adds every run's duration to the program's `run_time_ns` and counts it in
//! `run_cnt`. The benchmark turns them on only while a podtrace configuration runs (they cost
//! two clock reads per run), reads the counters of the programs the podtrace process holds
//! (its `/proc/PID/fdinfo` `prog_id:` lines, programs and links alike) before and after the
//! traffic, and divides.
//!
//! Turning them on: `BPF_ENABLE_STATS` (an fd that keeps them on while it is open, so the
//! kernel turns them off again however the benchmark ends, SIGKILL included), else
//! `kernel.bpf_stats_enabled=1` with a guard that writes the previous value back (also on
//! an error or Ctrl-C, through `Drop`).
use std::{
    collections::BTreeMap,
    os::fd::{FromRawFd as _, OwnedFd},
};

use anyhow::{bail, Result};
use serde_json::{json, Value};

use super::Stat;

const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_ENABLE_STATS: libc::c_long = 32;
const BPF_STATS_RUN_TIME: u32 = 0;

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> libc::c_long {
    // SAFETY: the attribute buffer is large enough for every command used here and zeroed
    // beyond the fields set; the kernel reads at most `size` bytes of it.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            attr.len() as libc::c_uint,
        )
    }
}

/// Run-time statistics on while this lives.
pub enum StatsGuard {
    /// The `BPF_ENABLE_STATS` fd.
    Fd(#[allow(dead_code)] OwnedFd),
    /// The sysctl was written; this is the value to write back.
    Sysctl(String),
    /// They were already on (the sysctl said 1): nothing to undo.
    AlreadyOn,
}

impl StatsGuard {
    /// How they were turned on.
    pub fn how(&self) -> &'static str {
        match self {
            StatsGuard::Fd(_) => "BPF_ENABLE_STATS",
            StatsGuard::Sysctl(_) => "kernel.bpf_stats_enabled=1, restored after",
            StatsGuard::AlreadyOn => "kernel.bpf_stats_enabled, already 1",
        }
    }

    pub fn enable() -> Result<StatsGuard> {
        let mut attr = [0u8; 128];
        attr[..4].copy_from_slice(&BPF_STATS_RUN_TIME.to_ne_bytes());
        let fd = bpf(BPF_ENABLE_STATS, &mut attr);
        if fd >= 0 {
            // SAFETY: a new fd the kernel just returned, owned by nobody else.
            return Ok(StatsGuard::Fd(unsafe { OwnedFd::from_raw_fd(fd as i32) }));
        }
        let before = std::fs::read_to_string(SYSCTL)
            .map_err(|e| anyhow::anyhow!("reading {SYSCTL}: {e}"))?
            .trim()
            .to_owned();
        if before == "1" {
            return Ok(StatsGuard::AlreadyOn);
        }
        // The guard exists before the write, so that a half-done write is undone too.
        let guard = StatsGuard::Sysctl(before);
        if let Err(e) = std::fs::write(SYSCTL, "1") {
            bail!("turning on {SYSCTL}: {e}");
        }
        Ok(guard)
    }
}

impl Drop for StatsGuard {
    fn drop(&mut self) {
        if let StatsGuard::Sysctl(before) = self {
            if let Err(e) = std::fs::write(SYSCTL, before.as_bytes()) {
                eprintln!("bench: restoring {SYSCTL} to {before}: {e}");
            }
        }
    }
}

/// One program's counters.
#[derive(Debug, Clone)]
pub struct Prog {
    pub name: String,
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

/// The programs a process holds, by id.
pub type Snapshot = BTreeMap<u32, Prog>;

/// The ids of the eBPF programs `pid` holds an fd of (a program's or a link's).
fn prog_ids(pid: i32) -> Vec<u32> {
    let mut ids = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return ids;
    };
    for e in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        for l in text.lines() {
            if let Some(v) = l.strip_prefix("prog_id:") {
                if let Ok(id) = v.trim().parse() {
                    ids.push(id);
                }
            }
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// A field of an fdinfo text.
fn fdinfo_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
}

/// A program's name (from `BPF_OBJ_GET_INFO_BY_FD`, as the kernel keeps it: 15 bytes at
/// most) and its counters (from the fdinfo of the fd opened here).
fn prog(id: u32) -> Option<Prog> {
    let mut attr = [0u8; 128];
    attr[..4].copy_from_slice(&id.to_ne_bytes());
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr);
    if fd < 0 {
        // Gone since the fdinfo was read.
        return None;
    }
    // SAFETY: a new fd the kernel just returned.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    use std::os::fd::AsRawFd as _;
    // struct bpf_prog_info up to and including `name` (offset 64, 16 bytes); the kernel
    // fills no more than the length asked for.
    let mut info = [0u8; 80];
    let mut attr = [0u8; 128];
    attr[..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(info.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
    if bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) < 0 {
        return None;
    }
    let got_id = u32::from_ne_bytes(info[4..8].try_into().ok()?);
    if got_id != id {
        return None;
    }
    let name = &info[64..80];
    let name = String::from_utf8_lossy(&name[..name.iter().position(|b| *b == 0).unwrap_or(16)])
        .into_owned();
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    Some(Prog {
        name,
        run_time_ns: fdinfo_field(&text, "run_time_ns")?,
        run_cnt: fdinfo_field(&text, "run_cnt")?,
    })
}

/// The counters of every program `pid` holds now.
pub fn snapshot(pid: i32) -> Snapshot {
    prog_ids(pid)
        .into_iter()
        .filter_map(|id| Some((id, prog(id)?)))
        .collect()
}

/// The hop program the stubs `hop_ingress` and `hop_egress` tail-call.
const HOP_WORK_PROGRAM: &str = "track";

/// The hook a program belongs to, by its (truncated) name: the tc hop programs, and the
/// kernel hooks as tracepoint or kprobe (see podtrace-ebpf/src/kernel.rs).
pub fn group(name: &str) -> &'static str {
    match name {
        "hop_ingress" => "hop_ingress",
        "hop_egress" => "hop_egress",
        n if n.starts_with("drop_")
            || n.starts_with("kp_kfree_skb")
            || n.starts_with("kp_sk_skb") =>
        {
            "drop"
        }
        n if n.starts_with("fib_") || n.starts_with("kp_fib") => "fib",
        n if n.starts_with("xmit_") || n.starts_with("kp_dev_hard") => "xmit",
        _ => "other",
    }
}

/// What programs of one group did between two snapshots (all their copies together).
#[derive(Debug, Clone, Default)]
pub struct Cost {
    /// The programs' names (truncated as the kernel keeps them).
    pub names: Vec<String>,
    /// Program copies (one per namespace for the hop programs).
    pub copies: usize,
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

impl Cost {
    pub fn ns_per_run(&self) -> Option<f64> {
        (self.run_cnt > 0).then(|| self.run_time_ns as f64 / self.run_cnt as f64)
    }
}

/// Per group: the counters' growth from `before` to `after` (programs in both).
pub fn diff(before: &Snapshot, after: &Snapshot) -> BTreeMap<&'static str, Cost> {
    let mut out: BTreeMap<&'static str, Cost> = BTreeMap::new();
    for (id, a) in after {
        let Some(b) = before.get(id) else { continue };
        // The hop program runs only as a tail call of the stubs, and the kernel counts a tail
        // call's time to the program that made it: the stubs' figures are the hops' whole.
        if a.name == HOP_WORK_PROGRAM {
            continue;
        }
        let c = out.entry(group(&a.name)).or_default();
        if !c.names.contains(&a.name) {
            c.names.push(a.name.clone());
        }
        c.copies += 1;
        c.run_time_ns += a.run_time_ns.saturating_sub(b.run_time_ns);
        c.run_cnt += a.run_cnt.saturating_sub(b.run_cnt);
    }
    out
}

/// The groups in report order.
pub const GROUPS: [&str; 6] = ["hop_ingress", "hop_egress", "drop", "fib", "xmit", "other"];

/// min/median/max of ns per run, runs per second and CPU ms per second over several runs'
/// costs (each with the seconds it covers).
pub fn summarize(runs: &[(&BTreeMap<&'static str, Cost>, f64)]) -> Value {
    let mut m = serde_json::Map::new();
    for g in GROUPS {
        let with_s: Vec<(&Cost, f64)> = runs
            .iter()
            .filter_map(|(r, s)| Some((r.get(g)?, s.max(1e-9))))
            .collect();
        let costs: Vec<&Cost> = with_s.iter().map(|(c, _)| *c).collect();
        if costs.is_empty() {
            continue;
        }
        let ns: Vec<f64> = costs.iter().filter_map(|c| c.ns_per_run()).collect();
        let rate: Vec<f64> = with_s.iter().map(|(c, s)| c.run_cnt as f64 / s).collect();
        let cpu: Vec<f64> = with_s
            .iter()
            .map(|(c, s)| c.run_time_ns as f64 / 1e6 / s)
            .collect();
        let mut names: Vec<String> = costs.iter().flat_map(|c| c.names.clone()).collect();
        names.sort();
        names.dedup();
        m.insert(
            g.to_owned(),
            json!({
                "programs": names,
                "copies": costs.iter().map(|c| c.copies).max(),
                "ns_per_run": Stat::of(&ns).map(|s| s.to_json(1)),
                "runs_per_s": Stat::of(&rate).map(|s| s.to_json(0)),
                "cpu_ms_per_s": Stat::of(&cpu).map(|s| s.to_json(2)),
            }),
        );
    }
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups() {
        for (n, g) in [
            ("hop_ingress", "hop_ingress"),
            ("hop_egress", "hop_egress"),
            ("drop_kfree_skb", "drop"),
            ("drop_kfree_skb_", "drop"),
            ("kp_sk_skb_reaso", "drop"),
            ("kp_kfree_skb_re", "drop"),
            ("kp_kfree_skb", "drop"),
            ("fib_fib_table_l", "fib"),
            ("kp_fib_table_lo", "fib"),
            ("xmit_net_dev_st", "xmit"),
            ("kp_dev_hard_sta", "xmit"),
            ("something", "other"),
        ] {
            assert_eq!(group(n), g, "{n}");
        }
        let text = "pos:\t0\nflags:\t02000002\nprog_type:\t3\nprog_id:\t42\nrun_time_ns:\t1234\nrun_cnt:\t7\n";
        assert_eq!(fdinfo_field(text, "run_time_ns"), Some(1234));
        assert_eq!(fdinfo_field(text, "run_cnt"), Some(7));
        assert_eq!(fdinfo_field(text, "prog_id"), Some(42));
    }

    #[test]
    fn diffs_only_programs_seen_twice_and_leaves_out_the_hop_program() {
        let p = |name: &str, t, c| Prog {
            name: name.into(),
            run_time_ns: t,
            run_cnt: c,
        };
        let before: Snapshot = [
            (1, p("hop_ingress", 100, 1)),
            (2, p("hop_ingress", 0, 0)),
            (4, p("track", 0, 0)),
        ]
        .into_iter()
        .collect();
        let after: Snapshot = [
            (1, p("hop_ingress", 1100, 11)),
            (2, p("hop_ingress", 500, 5)),
            (3, p("fib_fib_table_l", 9, 9)),
            (4, p("track", 0, 0)),
        ]
        .into_iter()
        .collect();
        let d = diff(&before, &after);
        let h = &d["hop_ingress"];
        assert_eq!((h.copies, h.run_time_ns, h.run_cnt), (2, 1500, 15));
        assert_eq!(h.ns_per_run(), Some(100.0));
        assert!(!d.contains_key("fib"));
        // The tail-called hop program is left out (the stubs' figures include it).
        assert!(!d.contains_key("other"));
    }
}
