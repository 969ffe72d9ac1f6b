//! Data-path overhead: iperf3 TCP pod → pod throughput with nothing attached, with `follow`
//! attached but filtering everything out, with `podtrace capture` writing every packet on
//! every hop (whole, and the first 128 bytes: `-s 128`), and with one tcpdump per hop
//! interface writing whole packets. Runs are interleaved (one of each configuration per
//! round, [`round_order`]): baselines between every two configurations, and each run's
//! ratio is taken against the mean of the two baselines around it, so that the machine's
//! drift (a 2-core VM's throughput wanders by several % within a minute) cancels to first
//! order. During the podtrace configurations the
//! kernel's per-program run-time statistics are on and read before and after the traffic
//! ([`bpfstats`]); the tool's CPU during the traffic is read from /proc.
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

use super::{
    bpfstats,
    capture::{self, Report, Tool},
    median,
    proc::{self, Proc, Stream},
    tchook, Ctx, Stat, DST_IP, OTHER_PEER_IP, PEER, POD,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Config {
    Baseline,
    /// `follow POD --dst OTHER`: probes on the other path's hops, the filter rejects all.
    FollowOtherPeer,
    /// `follow POD --dst PEER --port 9`: probes on all 10 hops, the filter rejects all.
    FollowOtherPort,
    /// The same with clsact filters instead of TCX links (`PODTRACE_TC=clsact`; kernels with
    /// TCX only, where podtrace uses TCX links). Reported, not a goal.
    FollowOtherPortClsact,
    /// The same with the route lookup and transmit hooks kept while idle (`--keep-hooks`).
    /// Reported, not a goal.
    FollowOtherPortKeepHooks,
    /// A TCX program that does nothing on both directions of every hop ([`tchook`]): the
    /// floor of the idle configurations (kernels with TCX).
    TcxHookAlone,
    /// A clsact filter that does nothing on both directions of every hop ([`tchook`]): the
    /// floor of the idle configurations with clsact filters.
    TcHookAlone,
    Capture,
    /// `capture -s 128`: headers only.
    CaptureHeaders,
    Tcpdump,
}

/// The snap length of the headers-only capture.
pub const HEADERS_SNAPLEN: u32 = 128;

impl Config {
    pub fn is_capture(self) -> bool {
        matches!(self, Config::Capture | Config::CaptureHeaders)
    }

    pub const ALL: [Config; 10] = [
        Config::Baseline,
        Config::FollowOtherPeer,
        Config::FollowOtherPort,
        Config::FollowOtherPortClsact,
        Config::FollowOtherPortKeepHooks,
        Config::TcxHookAlone,
        Config::TcHookAlone,
        Config::Capture,
        Config::CaptureHeaders,
        Config::Tcpdump,
    ];

    /// A podtrace configuration (its programs' kernel cost is read).
    pub fn is_podtrace(self) -> bool {
        !matches!(
            self,
            Config::Baseline | Config::Tcpdump | Config::TcHookAlone | Config::TcxHookAlone
        )
    }

    /// An idle `follow` configuration.
    pub fn is_follow(self) -> bool {
        matches!(
            self,
            Config::FollowOtherPeer
                | Config::FollowOtherPort
                | Config::FollowOtherPortClsact
                | Config::FollowOtherPortKeepHooks
        )
    }

    /// Whether this machine can run the configuration.
    pub fn runs_here(self) -> bool {
        !matches!(self, Config::FollowOtherPortClsact | Config::TcxHookAlone)
            || tchook::kernel_has_tcx()
    }

    pub fn key(self) -> &'static str {
        match self {
            Config::Baseline => "baseline",
            Config::FollowOtherPeer => "follow_idle_other_peer",
            Config::FollowOtherPort => "follow_idle_other_port",
            Config::FollowOtherPortClsact => "follow_idle_other_port_clsact",
            Config::FollowOtherPortKeepHooks => "follow_idle_other_port_keep_hooks",
            Config::TcxHookAlone => "tcx_hook_alone",
            Config::TcHookAlone => "tc_hook_alone",
            Config::Capture => "podtrace_capture",
            Config::CaptureHeaders => "podtrace_capture_headers",
            Config::Tcpdump => "tcpdump",
        }
    }

    pub fn label(self) -> String {
        match self {
            Config::Baseline => "baseline (nothing attached)".into(),
            Config::FollowOtherPeer => {
                format!("podtrace follow {POD} --dst {OTHER_PEER_IP} (idle: other peer)")
            }
            Config::FollowOtherPort => {
                format!("podtrace follow {POD} --dst {DST_IP} --port 9 (idle: all hops)")
            }
            Config::FollowOtherPortClsact => format!(
                "PODTRACE_TC=clsact podtrace follow {POD} --dst {DST_IP} --port 9 (idle: all hops, clsact filters)"
            ),
            Config::FollowOtherPortKeepHooks => format!(
                "podtrace follow {POD} --dst {DST_IP} --port 9 --keep-hooks (idle: all hops, route lookup and transmit hooks kept)"
            ),
            Config::TcxHookAlone => {
                "a TCX program that does nothing, on both directions of every hop (TCX's hook alone)"
                    .into()
            }
            Config::TcHookAlone => {
                "a clsact filter that does nothing, on both directions of every hop (clsact's hook alone)"
                    .into()
            }
            Config::Capture => {
                format!("podtrace capture {POD} --dst {DST_IP} -w F -C 100 -W 3 (all hops)")
            }
            Config::CaptureHeaders => format!(
                "podtrace capture {POD} --dst {DST_IP} -s {HEADERS_SNAPLEN} -w F -C 100 -W 3 (all hops, headers)"
            ),
            Config::Tcpdump => "tcpdump -i IF -w F -s 0 -C 100 -W 3, one per hop".into(),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Run {
    pub gbps: f64,
    pub retransmits: u64,
    /// The capture's report (capture configurations).
    pub capture: Option<Report>,
    /// The idle `follow` configurations.
    pub follow: Option<FollowRun>,
    /// CPU seconds the tool's processes used during the iperf3 run itself (from
    /// /proc/PID/stat: start and stop excluded), and the run's wall seconds.
    pub steady_cpu_s: Option<f64>,
    pub window_s: f64,
    /// podtrace configurations: its programs' kernel cost during the iperf3 run, by hook.
    pub bpf: Option<BTreeMap<&'static str, bpfstats::Cost>>,
    /// The mean throughput of the two baseline runs around this one (not for baselines).
    pub base_gbps: Option<f64>,
}

impl Run {
    /// This run's throughput over the baselines around it.
    pub fn ratio(&self) -> Option<f64> {
        self.base_gbps.map(|b| self.gbps / b)
    }

    /// Tool CPU seconds per 10 s of traffic (steady state).
    pub fn cpu_per_10s(&self) -> Option<f64> {
        self.steady_cpu_s
            .map(|c| c * 10.0 / self.window_s.max(1e-9))
    }

    /// The tool's CPU over its whole life (start and stop included), from wait4.
    pub fn total_cpu_s(&self) -> Option<f64> {
        self.capture
            .as_ref()
            .map(|c| c.cpu_s)
            .or(self.follow.as_ref().map(|f| f.cpu_s))
    }

    pub fn rss_kb(&self) -> Option<u64> {
        self.capture
            .as_ref()
            .map(|c| c.rss_kb)
            .or(self.follow.as_ref().map(|f| f.rss_kb))
    }
}

/// What an idle `follow` reported.
#[derive(Debug, Clone, Default)]
pub struct FollowRun {
    /// The hops it probed (its ready line).
    pub hops: Vec<String>,
    /// Packets it printed (0 when the filter rejects everything).
    pub packets: u64,
    /// Events lost (its summary).
    pub lost: u64,
    pub rss_kb: u64,
    pub cpu_s: f64,
}

pub struct Results {
    pub seconds: u32,
    /// Rounds of every configuration (each with several baseline runs).
    pub rounds: usize,
    /// How the kernel's run-time statistics were turned on.
    pub stats_via: Option<&'static str>,
    /// The interleaved rounds, the kernel's statistics off.
    pub runs: Vec<(Config, Vec<Run>)>,
    /// The podtrace configurations again, the kernel's statistics on: where the programs' own
    /// cost comes from (the statistics slow every program run, so the throughput figures
    /// come from `runs`).
    pub stats_runs: Vec<(Config, Vec<Run>)>,
}

impl Results {
    pub fn runs(&self, c: Config) -> &[Run] {
        of(&self.runs, c)
    }

    /// The runs with the kernel's statistics on.
    pub fn stats_runs(&self, c: Config) -> &[Run] {
        of(&self.stats_runs, c)
    }

    /// A figure of the runs with the kernel's statistics on: min/median/max.
    fn bpf_stat(&self, c: Config, f: impl Fn(&Run) -> Option<f64>) -> Option<Stat> {
        Stat::of(&self.stats_runs(c).iter().filter_map(f).collect::<Vec<_>>())
    }

    pub fn gbps(&self, c: Config) -> Option<Stat> {
        Stat::of(&self.runs(c).iter().map(|r| r.gbps).collect::<Vec<_>>())
    }

    /// Each run's throughput over the baselines around it, round by round.
    pub fn ratios(&self, c: Config) -> Vec<f64> {
        self.runs(c).iter().filter_map(Run::ratio).collect()
    }

    pub fn ratio(&self, c: Config) -> Option<Stat> {
        Stat::of(&self.ratios(c))
    }

    /// A per-run figure's min/median/max.
    pub fn stat(&self, c: Config, f: impl Fn(&Run) -> Option<f64>) -> Option<Stat> {
        Stat::of(&self.runs(c).iter().filter_map(f).collect::<Vec<_>>())
    }

    /// Of the packets the hops saw (written + lost), the share kept whole (written, not cut
    /// for want of room), in %.
    pub fn whole_pct(r: &Run) -> Option<f64> {
        r.capture.as_ref().map(|c| {
            100.0 * c.captured.saturating_sub(c.cut) as f64
                / ((c.captured + c.lost) as f64).max(1.0)
        })
    }

    /// Of the packets the hops saw (written + lost), the share cut for want of room, in %.
    pub fn cut_pct(r: &Run) -> Option<f64> {
        r.capture
            .as_ref()
            .map(|c| 100.0 * c.cut as f64 / ((c.captured + c.lost) as f64).max(1.0))
    }

    /// Lost share (%) of a capture run: lost / (captured + lost).
    pub fn lost_pct(r: &Run) -> Option<f64> {
        r.capture
            .as_ref()
            .map(|c| 100.0 * c.lost as f64 / ((c.captured + c.lost) as f64).max(1.0))
    }

    /// Peak RSS of the tool over the runs (max), in kB.
    pub fn peak_rss_kb(&self, c: Config) -> Option<u64> {
        self.runs(c).iter().filter_map(Run::rss_kb).max()
    }

    /// Median captured and lost over the runs, and the peak RSS (max over the runs).
    pub fn capture_stats(&self, c: Config) -> Option<(f64, f64, u64)> {
        let reps: Vec<&Report> = self
            .runs(c)
            .iter()
            .filter_map(|r| r.capture.as_ref())
            .collect();
        if reps.is_empty() {
            return None;
        }
        Some((
            median(&reps.iter().map(|r| r.captured as f64).collect::<Vec<_>>()),
            median(&reps.iter().map(|r| r.lost as f64).collect::<Vec<_>>()),
            reps.iter().map(|r| r.rss_kb).max().unwrap_or(0),
        ))
    }

    /// The idle `follow` runs of a configuration.
    pub fn follow_runs(&self, c: Config) -> Vec<&FollowRun> {
        self.runs(c)
            .iter()
            .filter_map(|r| r.follow.as_ref())
            .collect()
    }

    /// ns per run of a hook's programs, over the runs.
    pub fn bpf_ns(&self, c: Config, group: &str) -> Option<Stat> {
        self.bpf_stat(c, |r| r.bpf.as_ref()?.get(group)?.ns_per_run())
    }

    /// CPU time of a hook's programs (all copies) per second of traffic, in ms, over the runs.
    pub fn bpf_cpu_ms_per_s(&self, c: Config, group: &str) -> Option<Stat> {
        self.bpf_stat(c, |r| {
            Some(r.bpf.as_ref()?.get(group)?.run_time_ns as f64 / 1e6 / r.window_s.max(1e-9))
        })
    }

    /// CPU time of all its programs per second of traffic, in ms, over the runs.
    pub fn bpf_total_cpu_ms_per_s(&self, c: Config) -> Option<Stat> {
        self.bpf_stat(c, |r| {
            let b = r.bpf.as_ref()?;
            Some(b.values().map(|x| x.run_time_ns as f64).sum::<f64>() / 1e6 / r.window_s.max(1e-9))
        })
    }

    /// Runs per second of a hook's programs, over the runs.
    pub fn bpf_rate(&self, c: Config, group: &str) -> Option<Stat> {
        self.bpf_stat(c, |r| {
            Some(r.bpf.as_ref()?.get(group)?.run_cnt as f64 / r.window_s.max(1e-9))
        })
    }

    pub fn to_json(&self) -> Value {
        let configs: Vec<Value> = self
            .runs
            .iter()
            .map(|(c, runs)| {
                let st = |x: Option<Stat>, d: i32| x.map(|s| s.to_json(d));
                let mut v = json!({
                    "config": c.key(),
                    "command": c.label(),
                    "gbps": st(self.gbps(*c), 3),
                    "ratio_of_baseline": st(self.ratio(*c), 3),
                    "runs": runs.iter().map(|r| {
                        let mut o = json!({
                            "gbps": round3(r.gbps),
                            "ratio_of_baseline": r.ratio().map(round3),
                            "retransmits": r.retransmits,
                            "window_s": round3(r.window_s),
                        });
                        if let Some(cpu) = r.steady_cpu_s {
                            o["tool_cpu_s_during_traffic"] = json!(round3(cpu));
                        }
                        if let Some(rep) = &r.capture {
                            o["capture"] = rep.to_json();
                        }
                        if let Some(f) = &r.follow {
                            o["follow"] = json!({"hops": f.hops, "packets": f.packets, "lost_events": f.lost, "rss_kb": f.rss_kb, "cpu_s": (f.cpu_s * 1000.0).round() / 1000.0});
                        }
                        if let Some(b) = &r.bpf {
                            o["bpf"] = b.iter().map(|(g, c)| (g.to_string(), json!({
                                "programs": c.names, "copies": c.copies,
                                "run_time_ns": c.run_time_ns, "run_cnt": c.run_cnt,
                                "ns_per_run": c.ns_per_run().map(|x| (x * 10.0).round() / 10.0),
                            }))).collect::<serde_json::Map<_, _>>().into();
                        }
                        o
                    }).collect::<Vec<_>>(),
                });
                if c.is_capture() || *c == Config::Tcpdump {
                    v["captured"] = json!(st(self.stat(*c, |r| r.capture.as_ref().map(|x| x.captured as f64)), 0));
                    v["lost"] = json!(st(self.stat(*c, |r| r.capture.as_ref().map(|x| x.lost as f64)), 0));
                    v["lost_pct"] = json!(st(self.stat(*c, Self::lost_pct), 2));
                }
                if let Some(rss) = self.peak_rss_kb(*c) {
                    v["peak_rss_kb"] = json!(rss);
                    v["rss_kb"] = json!(st(self.stat(*c, |r| r.rss_kb().map(|x| x as f64)), 0));
                }
                v["tool_cpu_s_total"] = json!(st(self.stat(*c, Run::total_cpu_s), 3));
                v["tool_cpu_s_per_10s_of_traffic"] = json!(st(self.stat(*c, Run::cpu_per_10s), 3));
                let bpf_runs: Vec<_> = self
                    .stats_runs(*c)
                    .iter()
                    .filter_map(|r| Some((r.bpf.as_ref()?, r.window_s)))
                    .collect();
                if !bpf_runs.is_empty() {
                    v["bpf_programs"] = bpfstats::summarize(&bpf_runs);
                    v["bpf_programs_cpu_ms_per_s"] = json!(st(self.bpf_total_cpu_ms_per_s(*c), 2));
                }
                v
            })
            .collect();
        json!({
            "tool": "iperf3 TCP",
            "from": POD, "to": PEER, "dst": DST_IP,
            "seconds": self.seconds,
            "rounds": self.rounds,
            "stats_rounds": self.stats_runs.iter().map(|(_, r)| r.len()).max().unwrap_or(0),
            "stats_runs": self.stats_runs.iter().map(|(c, runs)| (c.key().to_string(), runs.iter().map(|r| json!({
                "gbps": (r.gbps * 1000.0).round() / 1000.0,
                "window_s": round3(r.window_s),
                "bpf": r.bpf.as_ref().map(|b| b.iter().map(|(g, c)| (g.to_string(), json!({
                    "programs": c.names, "copies": c.copies,
                    "run_time_ns": c.run_time_ns, "run_cnt": c.run_cnt,
                    "ns_per_run": c.ns_per_run().map(|x| (x * 10.0).round() / 10.0),
                }))).collect::<serde_json::Map<_, _>>()),
            })).collect::<Vec<_>>().into())).collect::<serde_json::Map<_, _>>(),
            "bpf_stats_via": self.stats_via,
            "ratios": "each run over the mean of the two baseline runs around it (a round: a baseline, then the configurations two at a time, each two followed by a baseline), then min/median/max",
            "configs": configs,
        })
    }
}

/// A configuration's runs in a list of them.
fn of(list: &[(Config, Vec<Run>)], c: Config) -> &[Run] {
    list.iter()
        .find(|(k, _)| *k == c)
        .map(|(_, r)| r.as_slice())
        .unwrap_or_default()
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// What runs beside iperf3 in one configuration.
pub enum Attached<'a> {
    Nothing,
    Follow(Proc),
    Capture(capture::Running),
    Filters(tchook::NoopFilters<'a>),
    Links(tchook::NoopLinks),
}

pub fn attach(ctx: &Ctx, c: Config) -> Result<Attached<'_>> {
    let follow = |dst: &str, extra: &[&str], env: &[(&str, &str)]| -> Result<Attached> {
        let mut args = vec!["follow", POD, "--dst", dst, "--json"];
        args.extend(extra);
        let mut p = ctx.lab.spawn_podtrace_env("podtrace follow", &args, env)?;
        p.wait_line(
            Stream::Out,
            |l| l.contains("\"type\":\"ready\""),
            Duration::from_secs(60),
        )?;
        settle_idle(&p)?;
        Ok(Attached::Follow(p))
    };
    Ok(match c {
        Config::Baseline => Attached::Nothing,
        Config::FollowOtherPeer => follow(OTHER_PEER_IP, &[], &[])?,
        Config::FollowOtherPort => follow(DST_IP, &["--port", "9"], &[])?,
        Config::FollowOtherPortClsact => {
            follow(DST_IP, &["--port", "9"], &[("PODTRACE_TC", "clsact")])?
        }
        Config::FollowOtherPortKeepHooks => follow(DST_IP, &["--port", "9", "--keep-hooks"], &[])?,
        Config::TcxHookAlone => Attached::Links(tchook::NoopLinks::attach(&ctx.lab, &ctx.hops)?),
        Config::TcHookAlone => Attached::Filters(tchook::NoopFilters::attach(&ctx.lab, &ctx.hops)?),
        Config::Capture => Attached::Capture(capture::start(ctx, Tool::Podtrace, None, None)?),
        Config::CaptureHeaders => Attached::Capture(capture::start(
            ctx,
            Tool::Podtrace,
            None,
            Some(HEADERS_SNAPLEN),
        )?),
        Config::Tcpdump => Attached::Capture(capture::start(ctx, Tool::Tcpdump, None, None)?),
    })
}

/// An idle session as it is left on: waits until the kernel hooks that go while the
/// conversation is idle (the ready line's `idle_detach` ones) have gone, as the process's
/// raw tracepoint links say.
fn settle_idle(p: &Proc) -> Result<()> {
    let out = p.text(Stream::Out);
    let ready: Value = out
        .lines()
        .find(|l| l.contains("\"type\":\"ready\""))
        .and_then(|l| serde_json::from_str(l).ok())
        .context("no ready line")?;
    let idle = ready["kernel_hooks"]
        .as_array()
        .map_or(0, |h| h.iter().filter(|h| h["idle_detach"] == true).count());
    if idle == 0 {
        return Ok(());
    }
    let links = || raw_tracepoint_links(p.pid);
    let at_start = links();
    let deadline = Instant::now() + Duration::from_secs(20);
    while links() + idle > at_start {
        if Instant::now() > deadline {
            bail!("podtrace follow kept its idle hooks for 20 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Raw tracepoint links (tp_btf hooks) the process holds.
fn raw_tracepoint_links(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    std::fs::read_to_string(e.path())
                        .is_ok_and(|s| s.contains("link_type:\traw_tracepoint"))
                })
                .count()
        })
        .unwrap_or(0)
}

impl Attached<'_> {
    /// The tool's processes.
    fn pids(&self) -> Vec<i32> {
        match self {
            Attached::Nothing | Attached::Filters(_) | Attached::Links(_) => Vec::new(),
            Attached::Follow(p) => vec![p.pid],
            Attached::Capture(c) => c.pids(),
        }
    }
}

/// Stops what was attached; fills the run's capture or follow figures.
pub fn detach(a: Attached, run: &mut Run) -> Result<()> {
    match a {
        Attached::Nothing => {}
        Attached::Filters(f) => drop(f),
        Attached::Links(l) => drop(l),
        Attached::Capture(c) => run.capture = Some(c.stop()?),
        Attached::Follow(mut p) => {
            let hwm = p.vm_hwm_kb().unwrap_or(0);
            let exit = p.stop(Duration::from_secs(30))?;
            if !matches!(exit.code, Some(0 | 1)) {
                bail!(
                    "podtrace follow ended with {}: {}",
                    exit.describe(),
                    proc::last_lines(&p.text(Stream::Err), 5)
                );
            }
            let out = p.text(Stream::Out);
            let ready: Value = out
                .lines()
                .next()
                .and_then(|l| serde_json::from_str(l).ok())
                .unwrap_or_default();
            let hops = ready["hops"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|h| h["name"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            let packets = out
                .lines()
                .filter(|l| l.contains("\"type\":\"packet\""))
                .count() as u64;
            let summary: Value = out
                .lines()
                .rfind(|l| l.contains("\"type\":\"summary\""))
                .and_then(|l| serde_json::from_str(l).ok())
                .context("podtrace follow printed no summary")?;
            let lost = summary["lost_events"].as_u64().unwrap_or(0);
            run.follow = Some(FollowRun {
                hops,
                packets,
                lost,
                rss_kb: hwm.max(exit.maxrss_kb),
                cpu_s: exit.cpu_s,
            });
        }
    }
    Ok(())
}

/// One iperf3 client run from the pod; (Gbit/s received, retransmits).
fn iperf(ctx: &Ctx, seconds: u32) -> Result<(f64, u64)> {
    let mut last_err = None;
    for _attempt in 0..2 {
        let mut p = ctx.lab.spawn_in(
            "iperf3 client",
            POD,
            &[
                "iperf3".into(),
                "-c".into(),
                DST_IP.into(),
                "-t".into(),
                seconds.to_string(),
                "-J".into(),
            ],
        )?;
        let exit = p.wait(Duration::from_secs(seconds as u64 + 30))?;
        let out = p.text(Stream::Out);
        let v: Value = serde_json::from_str(&out).unwrap_or_default();
        if exit.code == Some(0) {
            if let Some(bps) = v["end"]["sum_received"]["bits_per_second"].as_f64() {
                let retr = v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
                return Ok((bps / 1e9, retr));
            }
        }
        last_err = Some(format!(
            "iperf3 client {}: {} {}",
            exit.describe(),
            v["error"].as_str().unwrap_or_default(),
            proc::last_lines(&p.text(Stream::Err), 3)
        ));
        // "the server is busy": the previous test is still closing.
        proc::sleep(Duration::from_secs(1))?;
    }
    bail!("{}", last_err.unwrap_or_default())
}

/// The iperf3 server in the peer pod, listening (it stops when dropped).
pub fn iperf_server(ctx: &Ctx) -> Result<Proc> {
    let mut server = ctx.lab.spawn_in(
        "iperf3 server",
        PEER,
        &[
            "iperf3".into(),
            "-s".into(),
            "-B".into(),
            DST_IP.into(),
            // Unbuffered, so that "Server listening" arrives when it is printed.
            "--forceflush".into(),
        ],
    )?;
    server.wait_line(
        Stream::Out,
        |l| l.contains("Server listening"),
        Duration::from_secs(10),
    )?;
    Ok(server)
}

pub fn measure(ctx: &Ctx, rounds: usize, stats_rounds: usize, seconds: u32) -> Result<Results> {
    eprintln!("bench: data-path overhead, iperf3 TCP {POD} → {PEER}, {rounds} × {seconds} s per configuration");
    let server = iperf_server(ctx)?;
    let mut results = Results {
        seconds,
        rounds,
        stats_via: None,
        runs: Config::ALL
            .iter()
            .filter(|c| c.runs_here())
            .map(|c| (*c, Vec::new()))
            .collect(),
        stats_runs: Vec::new(),
    };
    let configs: Vec<Config> = Config::ALL
        .into_iter()
        .filter(|c| c.runs_here() && *c != Config::Baseline)
        .collect();
    for round in 1..=rounds {
        // The runs since the last baseline, waiting for the one after them.
        let mut waiting: Vec<(Config, Run)> = Vec::new();
        let mut before: Option<f64> = None;
        for c in round_order(&configs) {
            let label = format!("round {round}");
            let (run, _) = one_run(ctx, c, seconds, false, &label, before)?;
            if c == Config::Baseline {
                let after = run.gbps;
                for (k, mut r) in waiting.drain(..) {
                    r.base_gbps = before.map(|b| (b + after) / 2.0);
                    if let Some(x) = r.ratio() {
                        eprintln!(
                            "bench:   {label} {:<26} {x:.3}× the baselines around it",
                            k.key()
                        );
                    }
                    push(&mut results.runs, k, r);
                }
                before = Some(after);
                push(&mut results.runs, Config::Baseline, run);
            } else {
                waiting.push((c, run));
            }
        }
    }
    // The programs' own cost, from runs of their own: the statistics slow every program run.
    for round in 1..=stats_rounds {
        for c in Config::ALL
            .into_iter()
            .filter(|c| c.is_podtrace() && c.runs_here())
        {
            let (run, via) = one_run(ctx, c, seconds, true, &format!("stats {round}"), None)?;
            results.stats_via = via;
            match results.stats_runs.iter_mut().find(|(k, _)| *k == c) {
                Some((_, runs)) => runs.push(run),
                None => results.stats_runs.push((c, vec![run])),
            }
        }
    }
    ctx.scratch.clear()?;
    drop(server);
    Ok(results)
}

/// One round's order: a baseline, then the configurations two at a time, each two followed
/// by a baseline. Every run has a baseline next to it and one on its other side at most one
/// run further.
pub fn round_order(configs: &[Config]) -> Vec<Config> {
    let mut order = vec![Config::Baseline];
    for two in configs.chunks(2) {
        order.extend_from_slice(two);
        order.push(Config::Baseline);
    }
    order
}

fn push(runs: &mut Vec<(Config, Vec<Run>)>, c: Config, run: Run) {
    match runs.iter_mut().find(|(k, _)| *k == c) {
        Some((_, list)) => list.push(run),
        None => runs.push((c, vec![run])),
    }
}

/// One configuration's iperf3 run: attach the tool, run the traffic (with the kernel's
/// per-program statistics on when `stats`), detach, and say how it went (`label`: the round;
/// `base`: the baseline before it, for the ratio shown), and how the statistics were turned on.
fn one_run(
    ctx: &Ctx,
    c: Config,
    seconds: u32,
    stats: bool,
    label: &str,
    base: Option<f64>,
) -> Result<(Run, Option<&'static str>)> {
    ctx.scratch.clear()?;
    let attached = attach(ctx, c).with_context(|| format!("starting {}", c.key()))?;
    // Let the tools settle after their start.
    proc::sleep(Duration::from_millis(300))?;
    let pids = attached.pids();
    let cpu = |pids: &[i32]| pids.iter().filter_map(|p| proc::cpu_s(*p)).sum::<f64>();
    let guard = if stats {
        Some(bpfstats::StatsGuard::enable()?)
    } else {
        None
    };
    let via = guard.as_ref().map(|g| g.how());
    let bpf_before = guard
        .as_ref()
        .and(pids.first())
        .map(|p| bpfstats::snapshot(*p));
    let cpu_before = cpu(&pids);
    let t0 = Instant::now();
    let (gbps, retransmits) = iperf(ctx, seconds)?;
    let window_s = t0.elapsed().as_secs_f64();
    let cpu_after = cpu(&pids);
    let bpf = bpf_before
        .zip(pids.first())
        .map(|(b, p)| bpfstats::diff(&b, &bpfstats::snapshot(*p)));
    drop(guard);
    let mut run = Run {
        gbps,
        retransmits,
        steady_cpu_s: (!pids.is_empty()).then_some(cpu_after - cpu_before),
        window_s,
        bpf,
        ..Run::default()
    };
    detach(attached, &mut run).with_context(|| format!("stopping {}", c.key()))?;
    let extra = match (&run.capture, &run.follow) {
        (Some(r), _) => format!(
            ", captured {} lost {}, rss {} MiB, cpu {:.1} s",
            r.captured,
            r.lost,
            r.rss_kb / 1024,
            r.cpu_s
        ),
        (_, Some(f)) => format!(
            ", {} hops probed, {} packets, {} lost, rss {} MiB",
            f.hops.len(),
            f.packets,
            f.lost,
            f.rss_kb / 1024
        ),
        _ => String::new(),
    };
    eprintln!(
        "bench:   {label} {:<26} {:6.2} Gbit/s{}{extra}{}{}",
        c.key(),
        gbps,
        base.filter(|_| c != Config::Baseline)
            .map(|b| format!(" ({:.3}× the baseline before it)", run.gbps / b))
            .unwrap_or_default(),
        run.cpu_per_10s()
            .map(|x| format!(", {x:.2} s CPU per 10 s of traffic"))
            .unwrap_or_default(),
        run.bpf
            .as_ref()
            .map(|b| b
                .iter()
                .map(|(g, c)| format!(
                    " {g} {}",
                    c.ns_per_run()
                        .map(|x| format!("{x:.0} ns×{}", c.run_cnt))
                        .unwrap_or_else(|| "0 runs".into())
                ))
                .collect::<Vec<_>>()
                .join(","))
            .map(|s| format!(";{s}"))
            .unwrap_or_default()
    );
    Ok((run, via))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_run_has_a_baseline_on_each_side() {
        let configs: Vec<Config> = Config::ALL
            .into_iter()
            .filter(|c| *c != Config::Baseline)
            .collect();
        for n in 1..=configs.len() {
            let order = round_order(&configs[..n]);
            assert_eq!(order.first(), Some(&Config::Baseline));
            assert_eq!(order.last(), Some(&Config::Baseline));
            // Each configuration once.
            for c in &configs[..n] {
                assert_eq!(order.iter().filter(|k| *k == c).count(), 1, "{c:?}");
            }
            // At most two runs between baselines.
            let mut since = 0;
            for k in &order {
                if *k == Config::Baseline {
                    since = 0;
                } else {
                    since += 1;
                    assert!(since <= 2, "{order:?}");
                }
            }
            assert_eq!(
                order.iter().filter(|k| **k == Config::Baseline).count(),
                n.div_ceil(2) + 1
            );
        }
    }

    #[test]
    fn a_run_is_judged_against_the_baselines_around_it() {
        let run = Run {
            gbps: 9.0,
            base_gbps: Some((10.0 + 8.0) / 2.0),
            ..Run::default()
        };
        assert_eq!(run.ratio(), Some(1.0));
        assert_eq!(Run::default().ratio(), None);
    }
}
