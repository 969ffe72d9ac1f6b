//! Lossless capture rate: a stepped sweep of paced UDP datagram rates pod → pod. A step is
//! lossless when the tool reports nothing lost and every datagram sent is in the capture on
//! every hop (the tools filter on the datagrams' port, inside VXLAN too, so each hop's count
//! must equal the number sent).
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use serde_json::{json, Value};

use super::{
    capture::{self, Report, Tool},
    proc::{self, Stream},
    Ctx, DST_IP, PEER, POD,
};

pub const PORT: u16 = 9999;
/// UDP payload bytes (a 106-byte frame on the pod hops, 156 on the underlay).
pub const PAYLOAD: usize = 64;
/// Rates tried before bisecting (datagrams per second).
const LADDER: [u64; 9] = [
    5_000, 10_000, 20_000, 40_000, 80_000, 160_000, 320_000, 640_000, 1_280_000,
];
/// Sending threads: one per CPU of the bench machine (2). The path's per-datagram work runs
/// in the sending CPU's softirq, so one sender keeps one CPU busy and leaves the other to the
/// tool: the path slowed down before either tool lost anything. With a sender per CPU the
/// path carries about twice as much and the tools' consumers compete with it, as they
/// would on a busy node.
pub const SENDERS: usize = 2;
/// Bisection steps between the last lossless and the first lossy rate.
const BISECT: usize = 2;

#[derive(Debug, Clone)]
pub struct Step {
    /// 0: as fast as the sender can.
    pub target_pps: u64,
    pub sent: u64,
    pub seconds: f64,
    pub received: u64,
    pub report: Option<Report>,
    pub lossless: bool,
}

impl Step {
    pub fn achieved_pps(&self) -> f64 {
        self.sent as f64 / self.seconds.max(1e-9)
    }

    /// Hops whose count is not the number sent.
    fn short_hops(&self) -> Vec<String> {
        self.report
            .as_ref()
            .map(|r| {
                r.per_hop
                    .iter()
                    .filter(|(_, n)| *n != self.sent)
                    .map(|(h, n)| format!("{h}={n}"))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn to_json(&self) -> Value {
        let mut v = json!({
            "target_pps": self.target_pps,
            "achieved_pps": self.achieved_pps().round(),
            "sent": self.sent,
            "seconds": (self.seconds * 1000.0).round() / 1000.0,
            "received": self.received,
            "lossless": self.lossless,
        });
        if let Some(r) = &self.report {
            v["capture"] = r.to_json();
        }
        v
    }
}

pub struct ToolSweep {
    pub tool: Tool,
    pub steps: Vec<Step>,
    /// Every step was lossless up to what the sender could do under this tool's load.
    pub sender_bound: bool,
}

impl ToolSweep {
    /// The best lossless step.
    pub fn best(&self) -> Option<&Step> {
        self.steps
            .iter()
            .filter(|s| s.lossless)
            .max_by(|a, b| a.achieved_pps().total_cmp(&b.achieved_pps()))
    }

    /// The lowest rate that lost something.
    pub fn first_lossy(&self) -> Option<&Step> {
        self.steps
            .iter()
            .filter(|s| !s.lossless)
            .min_by(|a, b| a.achieved_pps().total_cmp(&b.achieved_pps()))
    }

    pub fn peak_rss_kb(&self) -> u64 {
        self.steps
            .iter()
            .filter_map(|s| s.report.as_ref().map(|r| r.rss_kb))
            .max()
            .unwrap_or(0)
    }

    fn to_json(&self) -> Value {
        json!({
            "tool": self.tool.name(),
            "max_lossless_pps": self.best().map(|s| s.achieved_pps().round()),
            "first_lossy_pps": self.first_lossy().map(|s| s.achieved_pps().round()),
            "sender_bound": self.sender_bound,
            "peak_rss_kb": self.peak_rss_kb(),
            "steps": self.steps.iter().map(Step::to_json).collect::<Vec<_>>(),
        })
    }
}

pub struct Sweep {
    pub seconds: f64,
    /// The path with nothing attached, the sender as fast as it can: before the tools' sweeps
    /// and after them (the machine's load drifts).
    pub ceiling: Vec<Step>,
    pub tools: Vec<ToolSweep>,
}

impl Sweep {
    /// The best of the ceiling samples.
    pub fn ceiling_pps(&self) -> f64 {
        self.ceiling
            .iter()
            .map(Step::achieved_pps)
            .fold(0.0, f64::max)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "from": POD, "to": PEER, "dst": DST_IP,
            "udp_payload_bytes": PAYLOAD,
            "step_seconds": self.seconds,
            "criterion": "tool reports 0 lost/dropped and every hop's capture holds every datagram sent",
            "podtrace_command": format!("podtrace capture {POD} udp dst port {PORT} --dst {DST_IP} -w F -C 100 -W 3"),
            "tcpdump_command": format!("tcpdump -i IF -w F -s 0 -C 100 -W 3 '{}' (one per hop)", capture::tcpdump_udp_filter(PORT)),
            "ceiling_pps": self.ceiling_pps().round(),
            "ceiling_samples": self.ceiling.iter().map(Step::to_json).collect::<Vec<_>>(),
            "tools": self.tools.iter().map(ToolSweep::to_json).collect::<Vec<_>>(),
        })
    }
}

/// One step: receiver, capture, paced sender; then the capture's report.
fn step(ctx: &Ctx, tool: Option<Tool>, rate: u64, seconds: f64) -> Result<Step> {
    ctx.scratch.clear()?;
    let xtask = ctx.xtask.display().to_string();
    let planned = if rate == 0 {
        0
    } else {
        (rate as f64 * seconds).round() as u64
    };
    let mut recv = ctx.lab.spawn_in(
        "udp receiver",
        PEER,
        &[
            xtask.clone(),
            "bench".into(),
            "udp-recv".into(),
            "--port".into(),
            PORT.to_string(),
            "--expect".into(),
            planned.to_string(),
            "--max".into(),
            (seconds * 3.0 + 30.0).to_string(),
        ],
    )?;
    recv.wait_line(
        Stream::Out,
        |l| l.contains("listening"),
        Duration::from_secs(10),
    )?;
    let running = match tool {
        Some(t) => Some(capture::start(ctx, t, Some(PORT), None)?),
        None => None,
    };
    proc::sleep(Duration::from_millis(200))?;
    let mut send = ctx.lab.spawn_in(
        "udp sender",
        POD,
        &[
            xtask,
            "bench".into(),
            "udp-send".into(),
            "--dst".into(),
            DST_IP.into(),
            "--port".into(),
            PORT.to_string(),
            "--rate".into(),
            rate.to_string(),
            "--seconds".into(),
            seconds.to_string(),
            "--size".into(),
            PAYLOAD.to_string(),
            "--threads".into(),
            SENDERS.to_string(),
        ],
    )?;
    let exit = send.wait(Duration::from_secs_f64(seconds * 2.0 + 30.0))?;
    let sent_at = Instant::now();
    let out: Value = serde_json::from_str(&send.text(Stream::Out)).with_context(|| {
        format!(
            "udp sender ({}): {}",
            exit.describe(),
            send.text(Stream::Err)
        )
    })?;
    let sent = out["sent"].as_u64().context("sender: sent")?;
    let secs = out["seconds"].as_f64().context("sender: seconds")?;
    recv.wait(Duration::from_secs_f64(seconds * 3.0 + 40.0))?;
    let received = recv
        .lines()
        .iter()
        .filter(|l| l.stream == Stream::Out)
        .find_map(|l| serde_json::from_str::<Value>(&l.text).ok()?["received"].as_u64())
        .context("udp receiver printed no count")?;
    // tcpdump (TPACKET_V3) hands over a partly filled block after up to 1 s: let both tools
    // take in the last datagrams before they are stopped.
    let drain = Duration::from_millis(1500).saturating_sub(sent_at.elapsed());
    proc::sleep(drain)?;
    let report = match running {
        Some(r) => Some(r.stop()?),
        None => None,
    };
    let lossless = report
        .as_ref()
        .is_some_and(|r| r.lost == 0 && r.per_hop.len() == ctx.hops.len())
        && report
            .as_ref()
            .is_some_and(|r| r.per_hop.iter().all(|(_, n)| *n == sent));
    Ok(Step {
        target_pps: rate,
        sent,
        seconds: secs,
        received,
        report,
        lossless,
    })
}

fn log(tool: &str, s: &Step) {
    let r = s.report.as_ref();
    let short = s.short_hops();
    eprintln!(
        "bench:   {tool:<8} {:>9} pps sent {:>8} recv {:>8} {}{}{}",
        s.achieved_pps().round(),
        s.sent,
        s.received,
        match r {
            Some(r) => format!("captured {} lost {} ", r.captured, r.lost),
            None => String::new(),
        },
        if r.is_some() {
            if s.lossless {
                "lossless"
            } else {
                "LOSS"
            }
        } else {
            ""
        },
        if short.is_empty() || s.lossless {
            String::new()
        } else {
            format!(" (short: {})", short.join(" "))
        }
    );
}

fn sweep_tool(ctx: &Ctx, tool: Tool, seconds: f64, ceiling: f64) -> Result<ToolSweep> {
    let mut out = ToolSweep {
        tool,
        steps: Vec::new(),
        sender_bound: false,
    };
    let mut good: Option<u64> = None;
    let mut bad: Option<u64> = None;
    for &rate in LADDER.iter().filter(|r| (**r as f64) < ceiling * 0.9) {
        let s = step(ctx, Some(tool), rate, seconds)?;
        log(tool.name(), &s);
        let lossless = s.lossless;
        let behind = s.achieved_pps() < rate as f64 * 0.9;
        out.steps.push(s);
        if !lossless {
            bad = Some(rate);
            break;
        }
        good = Some(rate);
        if behind {
            // The sender cannot go faster beside this tool: no higher rate to try.
            out.sender_bound = true;
            break;
        }
    }
    if bad.is_none() && !out.sender_bound {
        // Lossless at every ladder rate below the ceiling: try the sender flat out.
        let s = step(ctx, Some(tool), 0, seconds)?;
        log(tool.name(), &s);
        if s.lossless {
            out.sender_bound = true;
        } else {
            bad = Some(s.achieved_pps() as u64);
        }
        out.steps.push(s);
    }
    if let Some(mut hi) = bad {
        let mut lo = good.unwrap_or(0);
        for _ in 0..BISECT {
            let mid = if lo == 0 {
                hi / 2
            } else {
                ((lo as f64 * hi as f64).sqrt() / 1000.0).round() as u64 * 1000
            };
            if mid <= lo || mid >= hi {
                break;
            }
            let s = step(ctx, Some(tool), mid, seconds)?;
            log(tool.name(), &s);
            if s.lossless {
                lo = mid;
            } else {
                hi = mid;
            }
            out.steps.push(s);
        }
    }
    Ok(out)
}

pub fn measure(ctx: &Ctx, seconds: f64) -> Result<Sweep> {
    eprintln!(
        "bench: lossless capture rate, UDP {PAYLOAD}-byte datagrams {POD} → {PEER} from {SENDERS} senders, {seconds} s steps"
    );
    let ceiling_step = || -> Result<Step> {
        let s = step(ctx, None, 0, seconds)?;
        eprintln!(
            "bench:   path ceiling (nothing attached, senders flat out): {:.0} pps sent, {} received",
            s.achieved_pps(),
            s.received
        );
        Ok(s)
    };
    let mut ceiling = vec![ceiling_step()?];
    let top = ceiling[0].achieved_pps();
    let mut tools = Vec::new();
    for tool in [Tool::Podtrace, Tool::Tcpdump] {
        tools.push(sweep_tool(ctx, tool, seconds, top)?);
    }
    ceiling.push(ceiling_step()?);
    Ok(Sweep {
        seconds,
        ceiling,
        tools,
    })
}
