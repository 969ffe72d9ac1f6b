//! Attach latency: wall time from starting `podtrace follow POD --dst IP --json` to its
//! `{"type":"ready"}` line (every hop of both nodes probed), split with the timings the ready
//! line carries; and the stop, from SIGINT to the process's exit (probes detached). On a
//! kernel with TCX (where podtrace uses TCX links), a few more runs with clsact filters
//! (`PODTRACE_TC=clsact`) for comparison.
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

use super::{
    median,
    proc::{self, Stream},
    Ctx, Stat, DST_IP, POD,
};

/// One start-up, in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Run {
    /// Spawn → ready line read.
    pub total: f64,
    /// Process start: exec, loading, argument parsing, and the pipe (total − ready_ms).
    pub process: f64,
    /// Locating the pod and resolving its path (namespaces, links, routes of both nodes).
    pub resolve: f64,
    /// Loading the eBPF object (BTF offsets, maps, tracing programs).
    pub load: f64,
    /// Loading the hop program and a stub per namespace, attaching the tc probes on every
    /// hop, naming the interfaces, attaching the kernel hooks.
    pub attach: f64,
    /// The rest inside podtrace before the line (the ready line itself).
    pub other: f64,
    /// SIGINT → the process exited (its probes detached, its summary printed).
    pub stop: f64,
}

impl Run {
    const FIELDS: [&'static str; 7] = [
        "total", "process", "resolve", "load", "attach", "other", "stop",
    ];

    fn get(&self, f: &str) -> f64 {
        match f {
            "total" => self.total,
            "process" => self.process,
            "resolve" => self.resolve,
            "load" => self.load,
            "attach" => self.attach,
            "stop" => self.stop,
            _ => self.other,
        }
    }

    fn to_json(self) -> Value {
        let mut m = serde_json::Map::new();
        for f in Self::FIELDS {
            m.insert(format!("{f}_ms"), json!(round2(self.get(f))));
        }
        Value::Object(m)
    }
}

pub struct Attach {
    pub runs: Vec<Run>,
    /// The same with clsact filters (`PODTRACE_TC=clsact`), on kernels that have TCX.
    pub clsact_runs: Vec<Run>,
    pub hops: usize,
    pub hop_names: Vec<String>,
    pub kernel_hooks: Vec<String>,
}

impl Attach {
    pub fn median(&self, f: &str) -> f64 {
        median(&self.runs.iter().map(|r| r.get(f)).collect::<Vec<_>>())
    }

    pub fn max(&self, f: &str) -> f64 {
        self.runs.iter().map(|r| r.get(f)).fold(0.0, f64::max)
    }

    pub fn min(&self, f: &str) -> f64 {
        self.stat(f).map_or(0.0, |s| s.min)
    }

    pub fn stat(&self, f: &str) -> Option<Stat> {
        Stat::of(&self.runs.iter().map(|r| r.get(f)).collect::<Vec<_>>())
    }

    /// A figure of the TCX runs.
    pub fn clsact_stat(&self, f: &str) -> Option<Stat> {
        Stat::of(
            &self
                .clsact_runs
                .iter()
                .map(|r| r.get(f))
                .collect::<Vec<_>>(),
        )
    }

    pub fn to_json(&self) -> Value {
        let stat = |pick: &dyn Fn(&str) -> f64| {
            let mut m = serde_json::Map::new();
            for f in Run::FIELDS {
                m.insert(format!("{f}_ms"), json!(round2(pick(f))));
            }
            Value::Object(m)
        };
        json!({
            "command": format!("podtrace follow {POD} --dst {DST_IP} --json"),
            "runs": self.runs.iter().map(|r| r.to_json()).collect::<Vec<_>>(),
            "min": stat(&|f| self.min(f)),
            "median": stat(&|f| self.median(f)),
            "max": stat(&|f| self.max(f)),
            "hops": self.hops,
            "hop_names": self.hop_names,
            "kernel_hooks": self.kernel_hooks,
            "warmup_runs_discarded": 1,
            "clsact": (!self.clsact_runs.is_empty()).then(|| json!({
                "env": "PODTRACE_TC=clsact",
                "runs": self.clsact_runs.iter().map(|r| r.to_json()).collect::<Vec<_>>(),
            })),
        })
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn one(ctx: &Ctx, env: &[(&str, &str)]) -> Result<(Run, Value)> {
    let mut p = ctx.lab.spawn_podtrace_env(
        "podtrace follow",
        &["follow", POD, "--dst", DST_IP, "--json"],
        env,
    )?;
    let line = p.wait_line(
        Stream::Out,
        |l| l.contains("\"type\":\"ready\""),
        Duration::from_secs(60),
    )?;
    let total = line.at.duration_since(p.started).as_secs_f64() * 1e3;
    let ready: Value = serde_json::from_str(&line.text).context("parsing the ready line")?;
    let ms = |k: &str| -> Result<f64> {
        ready[k]
            .as_f64()
            .with_context(|| format!("the ready line has no {k}: {}", line.text))
    };
    let (load, attach, resolve, ready_ms) = (
        ms("load_ms")?,
        ms("attach_ms")?,
        ms("resolve_ms")?,
        ms("ready_ms")?,
    );
    let stopping = Instant::now();
    let exit = p.stop(Duration::from_secs(30))?;
    let stop = stopping.elapsed().as_secs_f64() * 1e3;
    // 1: no packet seen (the path is idle) — expected here.
    if !matches!(exit.code, Some(0 | 1)) {
        bail!("podtrace follow ended with {}", exit.describe());
    }
    Ok((
        Run {
            total,
            process: total - ready_ms,
            resolve,
            load,
            attach,
            other: ready_ms - resolve - load - attach,
            stop,
        },
        ready,
    ))
}

/// Runs with TCX links, after the others.
const CLSACT_RUNS: usize = 3;

pub fn measure(ctx: &Ctx, runs: usize) -> Result<Attach> {
    eprintln!("bench: attach latency, 1 warm-up + {runs} runs");
    let mut out = Attach {
        runs: Vec::new(),
        clsact_runs: Vec::new(),
        hops: 0,
        hop_names: Vec::new(),
        kernel_hooks: Vec::new(),
    };
    for i in 0..=runs {
        let (run, ready) = one(ctx, &[])?;
        if i == 0 {
            // A cold start (page cache, first BTF parse) is not what the median is about.
            eprintln!("bench:   warm-up {:.0} ms", run.total);
        } else {
            eprintln!(
                "bench:   run {i}: {:.0} ms (process {:.1}, resolve {:.1}, load {:.1}, attach {:.1})",
                run.total, run.process, run.resolve, run.load, run.attach
            );
            out.runs.push(run);
        }
        let hops = ready["hops"].as_array().cloned().unwrap_or_default();
        out.hops = hops.len();
        out.hop_names = hops
            .iter()
            .filter_map(|h| h["name"].as_str().map(str::to_owned))
            .collect();
        out.kernel_hooks = ready["kernel_hooks"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|h| h["attached"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        proc::sleep(Duration::from_millis(200))?;
    }
    if super::tchook::kernel_has_tcx() {
        for i in 1..=CLSACT_RUNS {
            let (run, _) = one(ctx, &[("PODTRACE_TC", "clsact")])?;
            eprintln!(
                "bench:   clsact run {i}: {:.0} ms (attach {:.1}), stop {:.0} ms",
                run.total, run.attach, run.stop
            );
            out.clsact_runs.push(run);
            proc::sleep(Duration::from_millis(200))?;
        }
    }
    Ok(out)
}
