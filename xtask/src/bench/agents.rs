//! Node agents, on a lab of their own brought up with `--agents` (prefix: the benchmark's
//! with an `a`, e.g. `pba-`), so that the other measurements run on a lab without them:
//! - the lab's agents, as `lab up --agents` starts them: TCP on each node's underlay address,
//!   mutual TLS, reached from the `ext` host's namespace;
//! - one `podtrace agent --node NODE --listen unix:PATH --lab PREFIX` per node, started here
//!   inside the node's namespace (`lab exec`).
//!
//! Measured: each agent's memory at rest (a second after start, before any session) and the
//! eBPF programs it holds then (none: an agent at rest attaches nothing); the cross-node
//! `follow` through the agents, from process start to its ready line, both ways of reaching
//! them interleaved; and the programs the agents still hold after the sessions ended (none).
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

use super::{
    bpfstats,
    lab::Lab,
    proc::{self, Proc, Stream},
    Ctx, Stat, DST_IP, POD,
};

pub const NODES: [&str; 2] = ["node-a", "node-b"];

/// The lab's own agents (TCP, mutual TLS).
pub const TLS: &str = "tcp+mTLS (lab up --agents)";
/// The agents started here on unix sockets.
pub const UNIX: &str = "unix socket";

/// One agent at rest.
#[derive(Debug, Clone)]
pub struct Rest {
    pub node: String,
    /// [`TLS`] or [`UNIX`].
    pub kind: &'static str,
    /// VmRSS and VmHWM one second after it listened, in kB.
    pub rss_kb: u64,
    pub hwm_kb: u64,
    /// eBPF programs it held then.
    pub programs: usize,
    /// eBPF programs it still held after the follow sessions ended.
    pub programs_after: usize,
    /// VmHWM at the end (the sessions included), in kB.
    pub hwm_end_kb: u64,
    /// VmRSS a second after the sessions ended, in kB.
    pub rss_end_kb: u64,
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

/// The cross-node follow through one kind of agent.
pub struct Variant {
    pub kind: &'static str,
    pub command: String,
    pub starts: Vec<Start>,
}

impl Variant {
    pub fn total(&self) -> Option<Stat> {
        Stat::of(&self.starts.iter().map(|s| s.total).collect::<Vec<_>>())
    }
}

pub struct Agents {
    pub prefix: String,
    pub rest: Vec<Rest>,
    pub variants: Vec<Variant>,
    pub hops: usize,
}

impl Agents {
    pub fn max_rest_rss_kb(&self) -> u64 {
        self.rest.iter().map(|r| r.rss_kb).max().unwrap_or(0)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "lab_prefix": self.prefix,
            "unix_agent_command": "podtrace agent --node NODE --listen unix:PATH --lab PREFIX (in the node's namespace)",
            "at_rest": self.rest.iter().map(|r| json!({
                "node": r.node,
                "kind": r.kind,
                "rss_kb": r.rss_kb,
                "hwm_kb": r.hwm_kb,
                "bpf_programs_held": r.programs,
                "bpf_programs_held_after_sessions": r.programs_after,
                "hwm_kb_after_sessions": r.hwm_end_kb,
                "rss_kb_after_sessions": r.rss_end_kb,
            })).collect::<Vec<_>>(),
            "follow_through_agents": self.variants.iter().map(|v| {
                let per_node = |f: &dyn Fn(&(String, f64, f64)) -> f64, node: &str| {
                    Stat::of(
                        &v.starts
                            .iter()
                            .flat_map(|s| s.nodes.iter().filter(|n| n.0 == node).map(f))
                            .collect::<Vec<_>>(),
                    )
                    .map(|s| s.to_json(2))
                };
                json!({
                    "kind": v.kind,
                    "command": v.command,
                    "hops": self.hops,
                    "runs": v.starts.iter().map(|s| json!({
                        "total_ms": (s.total * 100.0).round() / 100.0,
                        "resolve_ms": (s.resolve * 100.0).round() / 100.0,
                        "nodes": s.nodes.iter().map(|(n, l, a)| json!({"node": n, "load_ms": l, "attach_ms": a})).collect::<Vec<_>>(),
                    })).collect::<Vec<_>>(),
                    "total_ms": v.total().map(|s| s.to_json(2)),
                    "resolve_ms": Stat::of(&v.starts.iter().map(|s| s.resolve).collect::<Vec<_>>()).map(|s| s.to_json(2)),
                    "node_load_ms": NODES.iter().map(|n| (n.to_string(), json!(per_node(&|x| x.1, n)))).collect::<serde_json::Map<_, _>>(),
                    "node_attach_ms": NODES.iter().map(|n| (n.to_string(), json!(per_node(&|x| x.2, n)))).collect::<serde_json::Map<_, _>>(),
                    "warmup_runs_discarded": 1,
                })
            }).collect::<Vec<_>>(),
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

fn start_agent(lab: &Lab, node: &str, sock: &Path) -> Result<Running> {
    let podtrace = lab.podtrace.display().to_string();
    let mut p = lab.spawn_in(
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
            lab.prefix.clone(),
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

/// One follow through agents: `how` is `--agents SPEC` or `--agents-config FILE`.
fn one(lab: &Lab, how: &[&str]) -> Result<(Start, usize)> {
    let mut args = vec!["follow", POD, "--dst", DST_IP, "--json"];
    args.extend(how);
    let mut p = lab.spawn_podtrace("podtrace follow through agents", &args)?;
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

/// The agents lab's prefix: the benchmark's with an `a` before its trailing dash.
pub fn prefix_of(prefix: &str) -> String {
    match prefix.strip_suffix('-') {
        Some(p) => format!("{p}a-"),
        None => format!("{prefix}a"),
    }
}

pub fn measure(ctx: &Ctx, runs: usize) -> Result<Agents> {
    let prefix = prefix_of(&ctx.lab.prefix);
    eprintln!(
        "bench: node agents (lab {prefix} with --agents, and unix-socket agents): at rest, then 1 warm-up + {runs} cross-node follows through each"
    );
    let lab = Lab::up_with(&ctx.lab.podtrace, &prefix, &["--agents"])?;
    let status = lab.status()?;
    let lab_agents: Vec<(String, i32)> = status["agents"]
        .as_array()
        .context("`lab status --json` lists no agents")?
        .iter()
        .filter_map(|a| Some((a["node"].as_str()?.to_owned(), a["pid"].as_i64()? as i32)))
        .collect();
    if lab_agents.len() != NODES.len() {
        bail!(
            "lab {prefix}: {} agents, expected one per node",
            lab_agents.len()
        );
    }
    let dir = SockDir(PathBuf::from(format!(
        "/run/podtrace-bench-{}-agents",
        std::process::id()
    )));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).with_context(|| format!("creating {}", dir.0.display()))?;
    let mut running = Vec::new();
    for node in NODES {
        running.push(start_agent(
            &lab,
            node,
            &dir.0.join(format!("{node}.sock")),
        )?);
    }
    // Every agent, by kind: (node, kind, pid).
    let all: Vec<(String, &'static str, i32)> = lab_agents
        .iter()
        .map(|(n, pid)| (n.clone(), TLS, *pid))
        .chain(running.iter().map(|a| (a.node.clone(), UNIX, a.pid)))
        .collect();
    // At rest: a second after the last one listened.
    proc::sleep(Duration::from_secs(1))?;
    let mut rest: Vec<Rest> = all
        .iter()
        .map(|(node, kind, pid)| Rest {
            node: node.clone(),
            kind,
            rss_kb: status_kb(*pid, "VmRSS:").unwrap_or(0),
            hwm_kb: status_kb(*pid, "VmHWM:").unwrap_or(0),
            programs: bpfstats::snapshot(*pid).len(),
            programs_after: 0,
            hwm_end_kb: 0,
            rss_end_kb: 0,
        })
        .collect();
    for r in &rest {
        eprintln!(
            "bench:   agent of {} ({}) at rest: {:.1} MiB RSS (peak {:.1} MiB), {} eBPF programs held",
            r.node,
            r.kind,
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
    let config = format!("/run/podtrace/lab/{prefix}agents/agents.json");
    let how: [(&'static str, Vec<&str>, String); 2] = [
        (
            TLS,
            vec!["--agents-config", config.as_str()],
            format!("podtrace follow {POD} --dst {DST_IP} --json --agents-config /run/podtrace/lab/{prefix}agents/agents.json"),
        ),
        (
            UNIX,
            vec!["--agents", spec.as_str()],
            format!("podtrace follow {POD} --dst {DST_IP} --json --agents node-a=unix:…,node-b=unix:…"),
        ),
    ];
    let mut variants: Vec<Variant> = how
        .iter()
        .map(|(kind, _, command)| Variant {
            kind,
            command: command.clone(),
            starts: Vec::new(),
        })
        .collect();
    let mut hops = 0;
    // Interleaved: a run through each kind per round; round 0 is the warm-up.
    for i in 0..=runs {
        for ((kind, args, _), v) in how.iter().zip(&mut variants) {
            let (s, h) =
                one(&lab, args).with_context(|| format!("follow through the {kind} agents"))?;
            hops = h;
            if i == 0 {
                eprintln!("bench:   {kind}: warm-up {:.0} ms", s.total);
            } else {
                eprintln!(
                    "bench:   {kind}: run {i}: {:.0} ms (resolve {:.1}; {})",
                    s.total,
                    s.resolve,
                    s.nodes
                        .iter()
                        .map(|(n, l, a)| format!("{n}: load {l:.1} attach {a:.1}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                v.starts.push(s);
            }
            proc::sleep(Duration::from_millis(200))?;
        }
    }
    // The sessions are over: nothing may stay attached (detaching takes a moment: up to 5 s).
    let end = std::time::Instant::now() + Duration::from_secs(5);
    for (r, (_, _, pid)) in rest.iter_mut().zip(&all) {
        loop {
            r.programs_after = bpfstats::snapshot(*pid).len();
            if r.programs_after == 0 || std::time::Instant::now() >= end {
                break;
            }
            proc::sleep(Duration::from_millis(50))?;
        }
        r.hwm_end_kb = status_kb(*pid, "VmHWM:").unwrap_or(0);
    }
    // At rest again: a second after the sessions ended.
    proc::sleep(Duration::from_secs(1))?;
    for (r, (_, _, pid)) in rest.iter_mut().zip(&all) {
        r.rss_end_kb = status_kb(*pid, "VmRSS:").unwrap_or(0);
    }
    for a in running {
        a.stop()?;
    }
    // `lab down` (the guard) stops the lab's agents.
    drop(lab);
    Ok(Agents {
        prefix,
        rest,
        variants,
        hops,
    })
}
