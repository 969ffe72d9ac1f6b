//! Node agents: one `podtrace agent --listen unix:PATH --lab PREFIX` per lab node, each
//! started inside its node's namespace (`lab exec`), as `lab up --agents` does but on unix
//! sockets the benchmark owns. Measured: each agent's memory at rest (after start, before
//! any session) and the eBPF programs it holds then (none: an agent at rest attaches
//! nothing); the cross-node `follow` through both agents, from process start to its ready
//! line; and the programs the agents still hold after the sessions ended (none).
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

use super::{
    bpfstats,
    proc::{self, Proc, Stream},
    Ctx, Stat, DST_IP, POD,
};

pub const NODES: [&str; 2] = ["node-a", "node-b"];

/// One agent at rest.
#[derive(Debug, Clone)]
pub struct Rest {
    pub node: String,
    /// VmRSS and VmHWM one second after it listened, in kB.
    pub rss_kb: u64,
    pub hwm_kb: u64,
    /// eBPF programs it held then.
    pub programs: usize,
    /// eBPF programs it still held after the follow sessions ended.
    pub programs_after: usize,
    /// VmHWM at the end (the sessions included), in kB.
    pub hwm_end_kb: u64,
}

/// A start through the agents, in milliseconds.
#[derive(Debug, Clone, Default)]
pub struct Start {
    /// Spawn → ready line read.
    pub total: f64,
    pub resolve: f64,
    /// Per node: (node, load, attach) as the agents reported them.
    pub nodes: Vec<(String, f64, f64)>,
}

pub struct Agents {
    pub rest: Vec<Rest>,
    pub starts: Vec<Start>,
    pub hops: usize,
    pub command: String,
}

impl Agents {
    pub fn total(&self) -> Option<Stat> {
        Stat::of(&self.starts.iter().map(|s| s.total).collect::<Vec<_>>())
    }

    pub fn max_rest_rss_kb(&self) -> u64 {
        self.rest.iter().map(|r| r.rss_kb).max().unwrap_or(0)
    }

    pub fn to_json(&self) -> Value {
        let per_node = |f: &dyn Fn(&(String, f64, f64)) -> f64, node: &str| {
            Stat::of(
                &self
                    .starts
                    .iter()
                    .flat_map(|s| s.nodes.iter().filter(|n| n.0 == node).map(f))
                    .collect::<Vec<_>>(),
            )
            .map(|s| s.to_json(2))
        };
        json!({
            "agent_command": "podtrace agent --node NODE --listen unix:PATH --lab PREFIX (in the node's namespace)",
            "at_rest": self.rest.iter().map(|r| json!({
                "node": r.node,
                "rss_kb": r.rss_kb,
                "hwm_kb": r.hwm_kb,
                "bpf_programs_held": r.programs,
                "bpf_programs_held_after_sessions": r.programs_after,
                "hwm_kb_after_sessions": r.hwm_end_kb,
            })).collect::<Vec<_>>(),
            "follow_through_agents": {
                "command": self.command,
                "hops": self.hops,
                "runs": self.starts.iter().map(|s| json!({
                    "total_ms": (s.total * 100.0).round() / 100.0,
                    "resolve_ms": (s.resolve * 100.0).round() / 100.0,
                    "nodes": s.nodes.iter().map(|(n, l, a)| json!({"node": n, "load_ms": l, "attach_ms": a})).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
                "total_ms": self.total().map(|s| s.to_json(2)),
                "resolve_ms": Stat::of(&self.starts.iter().map(|s| s.resolve).collect::<Vec<_>>()).map(|s| s.to_json(2)),
                "node_load_ms": NODES.iter().map(|n| (n.to_string(), json!(per_node(&|x| x.1, n)))).collect::<serde_json::Map<_, _>>(),
                "node_attach_ms": NODES.iter().map(|n| (n.to_string(), json!(per_node(&|x| x.2, n)))).collect::<serde_json::Map<_, _>>(),
                "warmup_runs_discarded": 1,
            },
        })
    }
}

/// The agents' sockets; removed on drop.
struct SockDir(PathBuf);

impl Drop for SockDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running agent: `lab exec`'s process and the agent's pid (its child).
struct Running {
    node: String,
    proc: Proc,
    pid: i32,
}

impl Running {
    /// SIGTERM (it ends its sessions and detaches), then waits for `lab exec` to end.
    fn stop(mut self) -> Result<()> {
        // SAFETY: kill(2) on the agent, a child of our own child, still running.
        unsafe {
            libc::kill(self.pid, libc::SIGTERM);
        }
        let exit = self.proc.finish(Duration::from_secs(30))?;
        if !matches!(exit.code, Some(0)) {
            eprintln!(
                "bench:   the agent of {} ended with {}: {}",
                self.node,
                exit.describe(),
                proc::last_lines(&self.proc.text(Stream::Err), 3)
            );
        }
        Ok(())
    }
}

/// Whether `pid` runs `podtrace agent`.
fn is_agent(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| c.split(|b| *b == 0).nth(1) == Some(b"agent".as_slice()))
        .unwrap_or(false)
}

fn status_kb(pid: i32, key: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn start_agent(ctx: &Ctx, node: &str, sock: &Path) -> Result<Running> {
    let podtrace = ctx.lab.podtrace.display().to_string();
    let mut p = ctx.lab.spawn_in(
        &format!("agent of {node}"),
        node,
        &[
            podtrace,
            "agent".into(),
            "--node".into(),
            node.into(),
            "--listen".into(),
            format!("unix:{}", sock.display()),
            "--lab".into(),
            ctx.lab.prefix.clone(),
        ],
    )?;
    p.wait_line(
        Stream::Err,
        |l| l.contains("listening on"),
        Duration::from_secs(30),
    )?;
    // `lab exec` runs the agent as its child (or is the agent, had it exec'd it).
    let pid = std::iter::once(p.pid)
        .chain(p.children())
        .find(|pid| is_agent(*pid))
        .with_context(|| {
            format!("the agent of {node}: no `podtrace agent` process under `lab exec`")
        })?;
    Ok(Running {
        node: node.to_owned(),
        proc: p,
        pid,
    })
}

fn one(ctx: &Ctx, agents: &str) -> Result<(Start, usize)> {
    let mut p = ctx.lab.spawn_podtrace(
        "podtrace follow through agents",
        &["follow", POD, "--dst", DST_IP, "--json", "--agents", agents],
    )?;
    let line = p.wait_line(
        Stream::Out,
        |l| l.contains("\"type\":\"ready\""),
        Duration::from_secs(60),
    )?;
    let total = line.at.duration_since(p.started).as_secs_f64() * 1e3;
    let ready: Value = serde_json::from_str(&line.text).context("parsing the ready line")?;
    if ready["through_agents"] != json!(true) {
        bail!("the follow did not run through the agents: {}", line.text);
    }
    let exit = p.stop(Duration::from_secs(30))?;
    if !matches!(exit.code, Some(0 | 1)) {
        bail!(
            "podtrace follow through agents ended with {}: {}",
            exit.describe(),
            proc::last_lines(&p.text(Stream::Err), 5)
        );
    }
    let nodes = ready["nodes"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|n| {
                    (
                        n["node"].as_str().unwrap_or_default().to_owned(),
                        n["load_ms"].as_f64().unwrap_or(0.0),
                        n["attach_ms"].as_f64().unwrap_or(0.0),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let hops = ready["hops"].as_array().map_or(0, Vec::len);
    Ok((
        Start {
            total,
            resolve: ready["resolve_ms"].as_f64().unwrap_or(0.0),
            nodes,
        },
        hops,
    ))
}

pub fn measure(ctx: &Ctx, runs: usize) -> Result<Agents> {
    eprintln!(
        "bench: node agents: at rest, then 1 warm-up + {runs} cross-node follows through them"
    );
    let dir = SockDir(PathBuf::from(format!(
        "/run/podtrace-bench-{}-agents",
        std::process::id()
    )));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).with_context(|| format!("creating {}", dir.0.display()))?;
    let mut running = Vec::new();
    for node in NODES {
        running.push(start_agent(ctx, node, &dir.0.join(format!("{node}.sock")))?);
    }
    // At rest: a second after the last one listened.
    proc::sleep(Duration::from_secs(1))?;
    let mut rest: Vec<Rest> = running
        .iter()
        .map(|a| Rest {
            node: a.node.clone(),
            rss_kb: status_kb(a.pid, "VmRSS:").unwrap_or(0),
            hwm_kb: status_kb(a.pid, "VmHWM:").unwrap_or(0),
            programs: bpfstats::snapshot(a.pid).len(),
            programs_after: 0,
            hwm_end_kb: 0,
        })
        .collect();
    for r in &rest {
        eprintln!(
            "bench:   agent of {} at rest: {:.1} MiB RSS (peak {:.1} MiB), {} eBPF programs held",
            r.node,
            r.rss_kb as f64 / 1024.0,
            r.hwm_kb as f64 / 1024.0,
            r.programs
        );
    }
    let spec = NODES
        .iter()
        .map(|n| format!("{n}=unix:{}", dir.0.join(format!("{n}.sock")).display()))
        .collect::<Vec<_>>()
        .join(",");
    let mut starts = Vec::new();
    let mut hops = 0;
    for i in 0..=runs {
        let (s, h) = one(ctx, &spec)?;
        hops = h;
        if i == 0 {
            eprintln!("bench:   warm-up {:.0} ms", s.total);
        } else {
            eprintln!(
                "bench:   run {i}: {:.0} ms (resolve {:.1}; {})",
                s.total,
                s.resolve,
                s.nodes
                    .iter()
                    .map(|(n, l, a)| format!("{n}: load {l:.1} attach {a:.1}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            starts.push(s);
        }
        proc::sleep(Duration::from_millis(200))?;
    }
    // The sessions are over: nothing may stay attached.
    proc::sleep(Duration::from_millis(500))?;
    for (r, a) in rest.iter_mut().zip(&running) {
        r.programs_after = bpfstats::snapshot(a.pid).len();
        r.hwm_end_kb = status_kb(a.pid, "VmHWM:").unwrap_or(0);
    }
    for a in running {
        a.stop()?;
    }
    Ok(Agents {
        rest,
        starts,
        hops,
        command: format!(
            "podtrace follow {POD} --dst {DST_IP} --json --agents node-a=unix:…,node-b=unix:…"
        ),
    })
}
