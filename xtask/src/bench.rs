//! `cargo xtask bench`: podtrace's speed, data-path overhead and memory, measured against
//! tcpdump on the lab (never by timed assertions in tests), against issue 14's goals.
//!
//! 1. Attach latency: `podtrace follow pod-a1 --dst 10.244.1.5 --json` from start to its
//!    ready line, split into process start / resolve / load / attach ([`attach`]).
//! 2. Node agents: one `podtrace agent` per lab node at rest (RSS, eBPF programs held), and
//!    the cross-node `follow` through them, start → live ([`agents`]).
//! 3. Data-path overhead: iperf3 TCP pod-a1 → pod-b1 with nothing, two idle `follow`s,
//!    `podtrace capture` on every hop (whole packets and `-s 128`), and one tcpdump per hop,
//!    in interleaved rounds; each run's ratio against the baselines around it; then the
//!    kernel's own cost of each podtrace program, from more runs with its statistics on
//!    (they slow every program run) ([`overhead`], [`bpfstats`]).
//! 4. Idle sessions in paired windows: the two idle `follow`s and the TCX floor take turns
//!    with nothing attached beside one iperf3 flow, in many short windows; their throughput
//!    and CPU per GB over the baseline windows around them, and the interval of the median,
//!    on which the idle throughput goals are judged ([`idlecost`]).
//! 5. Lossless capture rate: a stepped UDP rate sweep for podtrace and tcpdump ([`sweep`]).
//! 6. Peak RSS of the capturing processes (from all of the above), and the goals met or not
//!    ([`goals`]).
//!
//! Every figure over runs is given as min / median / max. `--quick` is a smoke check (2 runs,
//! 3 s); `--podtrace PATH` benches a given binary (its commit: the git work tree it lies in).
//!
//! It brings up its own lab (prefix `pb-`), and tears it down and stops every process it
//! started whatever happens (guards; Ctrl-C only sets a flag the waits check). Results go to
//! `bench/results/latest.json` and `bench/results/latest.md`, and the table to stdout.
mod agents;
mod attach;
mod bpfstats;
mod capture;
mod goals;
mod idlecost;
mod lab;
mod machine;
mod overhead;
mod proc;
mod report;
mod sweep;
mod tchook;
mod udp;

use std::{net::Ipv4Addr, path::PathBuf, time::Instant};

use anyhow::{bail, Context as _, Result};
use clap::Subcommand;

use lab::{Hop, Lab, Scratch};

/// The pod whose path is measured, its peer and the peer's address (the lab's flannel pods).
pub const POD: &str = "pod-a1";
pub const PEER: &str = "pod-b1";
pub const DST_IP: &str = "10.244.1.5";
/// pod-a2: a destination `follow` filters on while the traffic goes to pod-b1.
pub const OTHER_PEER_IP: &str = "10.244.0.7";

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    helper: Option<Helper>,
    /// A smoke check, not a measurement: 2 runs of everything, 3 s iperf3 runs, 1 s sweep
    /// steps (the figures below still override it).
    #[arg(long)]
    quick: bool,
    /// Bench this podtrace binary instead of building one (its commit is the one of the git
    /// work tree it lies in).
    #[arg(long, value_name = "PATH")]
    podtrace: Option<PathBuf>,
    /// Attach-latency runs (after one warm-up run) [default: 7; --quick: 2].
    #[arg(long)]
    attach_runs: Option<usize>,
    /// Rounds of the overhead configurations (one run of each per round, interleaved)
    /// [default: 5; --quick: 2].
    #[arg(long)]
    tcp_runs: Option<usize>,
    /// Seconds per iperf3 run [default: 10; --quick: 3].
    #[arg(long)]
    tcp_seconds: Option<u32>,
    /// Cycles of the paired windows (each: the idle `follow --port 9`, the TCX floor and the
    /// idle `follow` of another peer, each after a baseline window) [default: 20; --quick: 2].
    #[arg(long)]
    idle_cycles: Option<usize>,
    /// Seconds per paired window [default: 5; --quick: 2].
    #[arg(long)]
    idle_seconds: Option<u32>,
    /// Seconds of traffic per step of the lossless-rate sweep [default: 3; --quick: 1].
    #[arg(long)]
    step_seconds: Option<f64>,
    /// Cross-node `follow` starts through the agents [default: 7; --quick: 2].
    #[arg(long)]
    agent_runs: Option<usize>,
    /// The benchmark lab's prefix.
    #[arg(long, default_value = "pb-")]
    prefix: String,
    /// Where latest.json and latest.md go (default: bench/results).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

/// The sweep's traffic ends, run inside lab pods by the benchmark itself.
#[derive(Subcommand, Debug)]
enum Helper {
    /// (internal) Send paced UDP datagrams.
    #[command(hide = true)]
    UdpSend {
        #[arg(long)]
        dst: Ipv4Addr,
        #[arg(long)]
        port: u16,
        /// Datagrams per second (0: flat out).
        #[arg(long)]
        rate: u64,
        #[arg(long)]
        seconds: f64,
        /// Payload bytes.
        #[arg(long)]
        size: usize,
        /// Sending threads (sockets), the rate shared among them.
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// (internal) Count UDP datagrams.
    #[command(hide = true)]
    UdpRecv {
        #[arg(long)]
        port: u16,
        /// Stop once this many arrived (0: no target).
        #[arg(long, default_value_t = 0)]
        expect: u64,
        /// Stop this many seconds after the last datagram.
        #[arg(long, default_value_t = 1.0)]
        idle: f64,
        /// Stop after this many seconds in any case.
        #[arg(long, default_value_t = 120.0)]
        max: f64,
    },
}

/// What every measurement uses.
pub struct Ctx {
    pub lab: Lab,
    pub scratch: Scratch,
    /// The pod's path to DST_IP, as `podtrace topo` resolves it.
    pub hops: Vec<Hop>,
    /// This program, run in the pods for the sweep's traffic.
    pub xtask: PathBuf,
}

/// min / median / max of a figure over runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stat {
    pub min: f64,
    pub median: f64,
    pub max: f64,
    pub n: usize,
}

impl Stat {
    /// Over the finite values; `None` when there are none.
    pub fn of(v: &[f64]) -> Option<Stat> {
        let v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        Some(Stat {
            min: v.iter().copied().fold(f64::INFINITY, f64::min),
            median: median(&v),
            max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            n: v.len(),
        })
    }

    /// `{"min","median","max","n"}`, rounded to `digits` decimals.
    pub fn to_json(self, digits: i32) -> serde_json::Value {
        let r = |x: f64| {
            let k = 10f64.powi(digits);
            (x * k).round() / k
        };
        serde_json::json!({"min": r(self.min), "median": r(self.median), "max": r(self.max), "n": self.n})
    }

    /// `min / median / max`, each formatted by `f` (one value when they are all equal).
    pub fn show(self, f: impl Fn(f64) -> String) -> String {
        let (a, b, c) = (f(self.min), f(self.median), f(self.max));
        if a == c {
            b
        } else {
            format!("{a} / **{b}** / {c}")
        }
    }
}

/// The median (mean of the middle two for an even count); 0 for none.
pub fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// An interval that holds a median with the confidence given.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    pub low: f64,
    pub high: f64,
    /// The probability that the interval holds the true median (0..1).
    pub confidence: f64,
}

impl Interval {
    /// `low–high (C %)`.
    pub fn show(self, f: impl Fn(f64) -> String) -> String {
        format!(
            "{}–{} ({:.1} %)",
            f(self.low),
            f(self.high),
            (self.confidence * 1000.0).floor() / 10.0
        )
    }
}

/// The distribution-free interval for the median of the finite values of `v` (order
/// statistics): from the k-th smallest to the k-th largest, k the largest for which the
/// chance that fewer than k of n samples fall below the median, 2⁻ⁿ·Σ_{i<k} C(n, i), is at most
/// 2.5 % (so the confidence is at least 95 %), and k = 1 (the range, a lower confidence) for
/// fewer than 6 samples. None for fewer than 2.
pub fn median_interval(v: &[f64]) -> Option<Interval> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    let n = v.len();
    if n < 2 {
        return None;
    }
    v.sort_by(f64::total_cmp);
    // tail[k] = P(Binomial(n, ½) < k).
    let mut tail = vec![0.0f64];
    let mut c = 1.0f64; // C(n, i)
    let half_n = 0.5f64.powi(n as i32);
    for i in 0..n {
        tail.push(tail[i] + c * half_n);
        c = c * (n - i) as f64 / (i + 1) as f64;
    }
    let k = (1..=n / 2).rev().find(|k| tail[*k] <= 0.025).unwrap_or(1);
    Some(Interval {
        low: v[k - 1],
        high: v[n - k],
        confidence: 1.0 - 2.0 * tail[k],
    })
}

pub fn run(args: BenchArgs) -> Result<()> {
    match args.helper {
        Some(Helper::UdpSend {
            dst,
            port,
            rate,
            seconds,
            size,
            threads,
        }) => return udp::send(dst, port, rate, seconds, size, threads),
        Some(Helper::UdpRecv {
            port,
            expect,
            idle,
            max,
        }) => return udp::recv(port, expect, idle, max),
        None => {}
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark attaches eBPF programs and builds a lab: run it as root");
    }
    let q = args.quick;
    let attach_runs = args.attach_runs.unwrap_or(if q { 2 } else { 7 });
    let tcp_runs = args.tcp_runs.unwrap_or(if q { 2 } else { 5 });
    let tcp_seconds = args.tcp_seconds.unwrap_or(if q { 3 } else { 10 });
    let step_seconds = args.step_seconds.unwrap_or(if q { 1.0 } else { 3.0 });
    let agent_runs = args.agent_runs.unwrap_or(if q { 2 } else { 7 });
    let idle_cycles = args.idle_cycles.unwrap_or(if q { 2 } else { 20 });
    let idle_seconds = args.idle_seconds.unwrap_or(if q { 2 } else { 5 });
    if [
        attach_runs,
        tcp_runs,
        tcp_seconds as usize,
        agent_runs,
        idle_cycles,
        idle_seconds as usize,
    ]
    .contains(&0)
    {
        bail!("--attach-runs, --tcp-runs, --tcp-seconds, --agent-runs, --idle-cycles and --idle-seconds must be at least 1");
    }
    if !(step_seconds > 0.0 && step_seconds.is_finite()) {
        bail!("--step-seconds must be positive");
    }
    // The full setup (k8s binaries, images, the VM kernels…) only when the tools the
    // benchmark runs are missing.
    if ["iperf3", "tcpdump"].iter().any(|t| {
        !std::process::Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }) {
        crate::setup::run()?;
    }
    // The commit a build starts from (HEAD may move while it builds).
    let commit_before = machine::head_commit_in(&crate::root());
    let (podtrace, built) = match &args.podtrace {
        Some(p) => (
            std::fs::canonicalize(p).with_context(|| format!("--podtrace {}", p.display()))?,
            false,
        ),
        None => {
            crate::run("cargo", &["build", "--release", "--package", "podtrace"])?;
            (crate::root().join("target/release/podtrace"), true)
        }
    };
    let xtask = std::env::current_exe().context("locating the xtask binary")?;
    let out_dir = args
        .out
        .clone()
        .unwrap_or_else(|| crate::root().join("bench/results"));

    let started = Instant::now();
    proc::install_signal_handlers();
    let mut machine = machine::Machine::describe(&podtrace, built, args.quick);
    if built && machine.commit != commit_before {
        eprintln!(
            "bench: HEAD moved while podtrace was built; the binary may not match either commit"
        );
        machine.dirty = true;
    }
    eprintln!(
        "bench: {} · {} × {} · kernel {} · podtrace {}",
        machine.os,
        machine.cores,
        machine.cpu,
        machine.kernel,
        machine.commit_label()
    );
    let scratch = Scratch::new()?;
    eprintln!("bench: lab up --prefix {}", args.prefix);
    let lab = Lab::up(&podtrace, &args.prefix)?;
    let hops = lab.path(POD, DST_IP)?;
    eprintln!(
        "bench: {POD} → {DST_IP}: {} hops: {}",
        hops.len(),
        hops.iter()
            .map(|h| h.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let ctx = Ctx {
        lab,
        scratch,
        hops,
        xtask,
    };

    let attach = attach::measure(&ctx, attach_runs)?;
    let agents = agents::measure(&ctx, agent_runs)?;
    // The programs' own cost: two more runs of each podtrace configuration (one in --quick).
    let stats_runs = if q { 1 } else { 2 };
    let overhead = overhead::measure(&ctx, tcp_runs, stats_runs, tcp_seconds)?;
    let idle = idlecost::measure(&ctx, idle_cycles, idle_seconds)?;
    let sweep = sweep::measure(&ctx, step_seconds)?;
    let hops = ctx.hops.clone();
    let loadavg_end = machine::loadavg();
    // The lab goes down, the scratch files go.
    drop(ctx);
    let elapsed = started.elapsed();
    machine.loadavg_end = loadavg_end;

    let results = report::Results {
        machine,
        hops,
        attach,
        agents,
        overhead,
        idle,
        sweep,
        elapsed,
    };
    let md = results.markdown();
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let json_path = out_dir.join("latest.json");
    let md_path = out_dir.join("latest.md");
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&results.to_json())? + "\n",
    )
    .with_context(|| format!("writing {}", json_path.display()))?;
    std::fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
    println!("{md}");
    eprintln!(
        "bench: done in {:.0} s; wrote {} and {}",
        elapsed.as_secs_f64(),
        json_path.display(),
        md_path.display()
    );
    Ok(())
}

/// `1234567` → `1 234 567`.
pub fn count(x: f64) -> String {
    let n = x.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats() {
        assert_eq!(Stat::of(&[]), None);
        assert_eq!(Stat::of(&[f64::NAN]), None);
        let s = Stat::of(&[3.0, 1.0, f64::INFINITY, 2.0, 10.0]).unwrap();
        assert_eq!((s.min, s.median, s.max, s.n), (1.0, 2.5, 10.0, 4));
        assert_eq!(s.show(|x| format!("{x:.1}")), "1.0 / **2.5** / 10.0");
        let one = Stat::of(&[0.0, 0.0]).unwrap();
        assert_eq!(one.show(|x| format!("{x:.0}")), "0");
        assert_eq!(s.to_json(0)["median"], serde_json::json!(3.0));
    }

    #[test]
    fn median_intervals_from_order_statistics() {
        assert_eq!(median_interval(&[1.0]), None);
        // 5 samples: the range, which holds the median with 1 − 2/32.
        let i = median_interval(&[5.0, 1.0, 3.0, 2.0, 4.0]).unwrap();
        assert_eq!((i.low, i.high), (1.0, 5.0));
        assert!((i.confidence - 0.9375).abs() < 1e-12);
        // 10 samples: P(B(10, ½) < 2) = 11/1024 ≤ 2.5 % < P(< 3) = 56/1024: the 2nd and 9th.
        let v: Vec<f64> = (1..=10).map(f64::from).rev().collect();
        let i = median_interval(&v).unwrap();
        assert_eq!((i.low, i.high), (2.0, 9.0));
        assert!((i.confidence - (1.0 - 22.0 / 1024.0)).abs() < 1e-12);
        // 20 samples: P(B(20, ½) < 6) = 21700/2^20 ≈ 2.07 %: the 6th and 15th.
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        let i = median_interval(&v).unwrap();
        assert_eq!((i.low, i.high), (6.0, 15.0));
        assert!(i.confidence >= 0.95);
        assert_eq!(i.show(|x| format!("{x:.0}")), "6–15 (95.8 %)");
    }
}
