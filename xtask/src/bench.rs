//! `cargo xtask bench`: podtrace's speed, data-path overhead and memory, measured against
//! tcpdump on the lab (never by timed assertions in tests).
//!
//! 1. Attach latency: `podtrace follow pod-a1 --dst 10.244.1.5 --json` from start to its
//!    ready line, split into process start / resolve / load / attach ([`attach`]).
//! 2. Data-path overhead: iperf3 TCP pod-a1 → pod-b1 with nothing, an idle `follow`, `podtrace
//!    capture` on every hop, and one tcpdump per hop ([`overhead`]).
//! 3. Lossless capture rate: a stepped UDP rate sweep for podtrace and tcpdump ([`sweep`]).
//! 4. Peak RSS of the capturing processes (from all of the above).
//!
//! It brings up its own lab (prefix `pb-`), and tears it down and stops every process it
//! started whatever happens (guards; Ctrl-C only sets a flag the waits check). Results go to
//! `bench/results/latest.json` and `bench/results/latest.md`, and the table to stdout.
mod attach;
mod capture;
mod lab;
mod machine;
mod overhead;
mod proc;
mod report;
mod sweep;
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
    /// Attach-latency runs (after one warm-up run).
    #[arg(long, default_value_t = 7)]
    attach_runs: usize,
    /// iperf3 runs per overhead configuration.
    #[arg(long, default_value_t = 3)]
    tcp_runs: usize,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 10)]
    tcp_seconds: u32,
    /// Seconds of traffic per step of the lossless-rate sweep.
    #[arg(long, default_value_t = 3.0)]
    step_seconds: f64,
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

pub fn run(args: BenchArgs) -> Result<()> {
    match args.helper {
        Some(Helper::UdpSend {
            dst,
            port,
            rate,
            seconds,
            size,
        }) => return udp::send(dst, port, rate, seconds, size),
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
    if args.attach_runs == 0 || args.tcp_runs == 0 || args.tcp_seconds == 0 {
        bail!("--attach-runs, --tcp-runs and --tcp-seconds must be at least 1");
    }
    if !(args.step_seconds > 0.0 && args.step_seconds.is_finite()) {
        bail!("--step-seconds must be positive");
    }
    crate::setup::run()?;
    let commit_before = machine::head_commit();
    crate::run("cargo", &["build", "--release", "--package", "podtrace"])?;
    let podtrace = crate::root().join("target/release/podtrace");
    let xtask = std::env::current_exe().context("locating the xtask binary")?;
    let out_dir = args
        .out
        .clone()
        .unwrap_or_else(|| crate::root().join("bench/results"));

    let started = Instant::now();
    proc::install_signal_handlers();
    let mut machine = machine::Machine::describe(&podtrace);
    if machine.commit != commit_before {
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

    let attach = attach::measure(&ctx, args.attach_runs)?;
    let overhead = overhead::measure(&ctx, args.tcp_runs, args.tcp_seconds)?;
    let sweep = sweep::measure(&ctx, args.step_seconds)?;
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
        overhead,
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
