//! Data-path overhead: iperf3 TCP pod → pod throughput with nothing attached, with `follow`
//! attached but filtering everything out, with `podtrace capture` writing every packet on
//! every hop, and with one tcpdump per hop interface doing the same. Runs are interleaved
//! (one of each configuration per round) so that drift on the machine hits all alike.
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

use super::{
    capture::{self, Report, Tool},
    median,
    proc::{self, Proc, Stream},
    Ctx, DST_IP, OTHER_PEER_IP, PEER, POD,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Config {
    Baseline,
    /// `follow POD --dst OTHER`: probes on the other path's hops, the filter rejects all.
    FollowOtherPeer,
    /// `follow POD --dst PEER --port 9`: probes on all 10 hops, the filter rejects all.
    FollowOtherPort,
    Capture,
    Tcpdump,
}

impl Config {
    pub const ALL: [Config; 5] = [
        Config::Baseline,
        Config::FollowOtherPeer,
        Config::FollowOtherPort,
        Config::Capture,
        Config::Tcpdump,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Config::Baseline => "baseline",
            Config::FollowOtherPeer => "follow_idle_other_peer",
            Config::FollowOtherPort => "follow_idle_other_port",
            Config::Capture => "podtrace_capture",
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
            Config::Capture => {
                format!("podtrace capture {POD} --dst {DST_IP} -w F -C 100 -W 3 (all hops)")
            }
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
    pub runs: Vec<(Config, Vec<Run>)>,
}

impl Results {
    pub fn runs(&self, c: Config) -> &[Run] {
        self.runs
            .iter()
            .find(|(k, _)| *k == c)
            .map(|(_, r)| r.as_slice())
            .unwrap_or_default()
    }

    pub fn median_gbps(&self, c: Config) -> f64 {
        median(&self.runs(c).iter().map(|r| r.gbps).collect::<Vec<_>>())
    }

    pub fn ratio(&self, c: Config) -> f64 {
        self.median_gbps(c) / self.median_gbps(Config::Baseline)
    }

    /// Median CPU seconds the capturing tool used per run.
    pub fn median_cpu_s(&self, c: Config) -> Option<f64> {
        let v: Vec<f64> = self
            .runs(c)
            .iter()
            .filter_map(|r| {
                r.capture
                    .as_ref()
                    .map(|c| c.cpu_s)
                    .or(r.follow.as_ref().map(|f| f.cpu_s))
            })
            .collect();
        (!v.is_empty()).then(|| median(&v))
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

    pub fn to_json(&self) -> Value {
        let configs: Vec<Value> = self
            .runs
            .iter()
            .map(|(c, runs)| {
                let mut v = json!({
                    "config": c.key(),
                    "command": c.label(),
                    "median_gbps": round3(self.median_gbps(*c)),
                    "ratio_of_baseline": round3(self.ratio(*c)),
                    "runs": runs.iter().map(|r| {
                        let mut o = json!({"gbps": round3(r.gbps), "retransmits": r.retransmits});
                        if let Some(rep) = &r.capture {
                            o["capture"] = rep.to_json();
                        }
                        if let Some(f) = &r.follow {
                            o["follow"] = json!({"hops": f.hops, "packets": f.packets, "lost_events": f.lost, "rss_kb": f.rss_kb, "cpu_s": (f.cpu_s * 1000.0).round() / 1000.0});
                        }
                        o
                    }).collect::<Vec<_>>(),
                });
                if let Some((captured, lost, rss)) = self.capture_stats(*c) {
                    v["median_captured"] = json!(captured);
                    v["median_lost"] = json!(lost);
                    v["peak_rss_kb"] = json!(rss);
                }
                if let Some(cpu) = self.median_cpu_s(*c) {
                    v["median_tool_cpu_s"] = json!((cpu * 1000.0).round() / 1000.0);
                }
                v
            })
            .collect();
        json!({
            "tool": "iperf3 TCP",
            "from": POD, "to": PEER, "dst": DST_IP,
            "seconds": self.seconds,
            "configs": configs,
        })
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// What runs beside iperf3 in one configuration.
enum Attached {
    Nothing,
    Follow(Proc),
    Capture(capture::Running),
}

fn attach(ctx: &Ctx, c: Config) -> Result<Attached> {
    let follow = |dst: &str, extra: &[&str]| -> Result<Attached> {
        let mut args = vec!["follow", POD, "--dst", dst, "--json"];
        args.extend(extra);
        let mut p = ctx.lab.spawn_podtrace("podtrace follow", &args)?;
        p.wait_line(
            Stream::Out,
            |l| l.contains("\"type\":\"ready\""),
            Duration::from_secs(60),
        )?;
        Ok(Attached::Follow(p))
    };
    Ok(match c {
        Config::Baseline => Attached::Nothing,
        Config::FollowOtherPeer => follow(OTHER_PEER_IP, &[])?,
        Config::FollowOtherPort => follow(DST_IP, &["--port", "9"])?,
        Config::Capture => Attached::Capture(capture::start(ctx, Tool::Podtrace, None)?),
        Config::Tcpdump => Attached::Capture(capture::start(ctx, Tool::Tcpdump, None)?),
    })
}

/// Stops what was attached; fills the run's capture or follow figures.
fn detach(a: Attached, run: &mut Run) -> Result<()> {
    match a {
        Attached::Nothing => {}
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

pub fn measure(ctx: &Ctx, rounds: usize, seconds: u32) -> Result<Results> {
    eprintln!("bench: data-path overhead, iperf3 TCP {POD} → {PEER}, {rounds} × {seconds} s per configuration");
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
    let mut results = Results {
        seconds,
        runs: Config::ALL.iter().map(|c| (*c, Vec::new())).collect(),
    };
    for round in 1..=rounds {
        for c in Config::ALL {
            ctx.scratch.clear()?;
            let attached = attach(ctx, c).with_context(|| format!("starting {}", c.key()))?;
            // Let the tools settle after their start.
            proc::sleep(Duration::from_millis(300))?;
            let (gbps, retransmits) = iperf(ctx, seconds)?;
            let mut run = Run {
                gbps,
                retransmits,
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
                "bench:   round {round} {:<24} {:6.2} Gbit/s{extra}",
                c.key(),
                gbps
            );
            results
                .runs
                .iter_mut()
                .find(|(k, _)| *k == c)
                .unwrap()
                .1
                .push(run);
        }
    }
    ctx.scratch.clear()?;
    drop(server);
    Ok(results)
}
