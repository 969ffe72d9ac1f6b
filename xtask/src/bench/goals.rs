//! Issue 14's goals (and issue 15's for the agent), each figure judged met or not from the
//! runs. A figure over several runs is judged on its median; comparisons with tcpdump are
//! made round by round (the podtrace and tcpdump runs of one round share the machine's
//! state), and the median over the rounds is judged, with how many rounds met it.
use serde_json::{json, Value};

use super::{
    agents::Agents,
    attach::Attach,
    capture::Tool,
    idlecost, median_interval,
    overhead::{self, Config, Run},
    sweep::Sweep,
    Stat,
};

pub struct Goal {
    pub figure: String,
    pub goal: String,
    pub measured: String,
    /// None: not measured (or no goal to judge).
    pub met: Option<bool>,
}

impl Goal {
    pub fn to_json(&self) -> Value {
        json!({"figure": self.figure, "goal": self.goal, "measured": self.measured, "met": self.met})
    }

    pub fn mark(&self) -> &'static str {
        match self.met {
            Some(true) => "met",
            Some(false) => "**not met**",
            None => "–",
        }
    }
}

/// Whether podtrace's lossless rate `p` is at least tcpdump's `t`. A tool that lost nothing
/// at any rate the sender reached (`*b`: sender-bound) has a lossless rate of *at least* its
/// figure, so some comparisons cannot be decided (`None`): both sender-bound, or the
/// sender-bound side below the other.
fn lossless_met(p: f64, p_bound: bool, t: f64, t_bound: bool) -> Option<bool> {
    match (p_bound, t_bound) {
        (false, false) => Some(p >= t),
        (true, false) => (p >= t).then_some(true),
        (false, true) => (p < t).then_some(false),
        (true, true) => None,
    }
}

fn ms(x: f64) -> String {
    format!("{x:.0} ms")
}

fn x3(x: f64) -> String {
    format!("{x:.3}×")
}

fn mib(kb: f64) -> String {
    format!("{:.1} MiB", kb / 1024.0)
}

/// A throughput ratio over the runs against its goal: min / median / max, and how many
/// runs met it (on this machine a run's ratio moves by ±5–10 % with the baseline's noise, so
/// a median near the goal is decided by the noise: the count says how near).
fn ratio_vs(ratios: &[f64], goal: f64) -> String {
    match Stat::of(ratios) {
        Some(s) => format!(
            "{} ({} at or above {})",
            s.show(x3),
            rounds(ratios, |x| x >= goal).replace("rounds", "runs"),
            x3(goal)
        ),
        None => "not measured".into(),
    }
}

/// A throughput goal (≥ `goal`× baseline) judged on the paired windows when they are enough
/// for an interval of ≥ 95 % confidence for their median (6 or more): met when it lies at or
/// above the goal, not met when it lies below, undecided (None) when it holds the goal.
/// Otherwise judged on the interleaved runs' median. Both are shown.
fn throughput_goal(runs: &[f64], windows: &[f64], goal: f64) -> (String, Option<bool>) {
    let by_runs = Stat::of(runs).map(|s| s.median >= goal);
    let (Some(s), Some(i)) = (Stat::of(windows), median_interval(windows)) else {
        return (ratio_vs(runs, goal), by_runs);
    };
    let decisive = i.confidence >= 0.95;
    let met = if !decisive {
        by_runs
    } else if i.low >= goal {
        Some(true)
    } else if i.high < goal {
        Some(false)
    } else {
        None
    };
    let note = if !decisive {
        " (too few windows for a 95 % interval: judged on the runs)".to_owned()
    } else if met.is_none() {
        format!(" (undecided: the interval holds {})", x3(goal))
    } else {
        String::new()
    };
    (
        format!(
            "paired windows: {} ({} at or above {}), the median in {}{note}; interleaved runs: {}",
            s.show(x3),
            rounds(windows, |x| x >= goal).replace("rounds", "windows"),
            x3(goal),
            i.show(x3),
            ratio_vs(runs, goal)
        ),
        met,
    )
}

/// `k/n rounds` where `pred` holds.
fn rounds(v: &[f64], pred: impl Fn(f64) -> bool) -> String {
    format!(
        "{}/{} rounds",
        v.iter().filter(|x| pred(**x)).count(),
        v.len()
    )
}

pub fn evaluate(
    attach: &Attach,
    agents: &Agents,
    o: &overhead::Results,
    idle: &idlecost::Results,
    sweep: &Sweep,
) -> Vec<Goal> {
    let mut goals = Vec::new();
    let show = |s: Option<Stat>, f: &dyn Fn(f64) -> String| {
        s.map(|s| s.show(f))
            .unwrap_or_else(|| "not measured".into())
    };

    let total = attach.stat("total");
    goals.push(Goal {
        figure: format!("start → probes live, {}-hop path (median)", attach.hops),
        goal: "≤ 150 ms".into(),
        measured: show(total, &ms),
        met: total.map(|s| s.median <= 150.0),
    });

    for (c, what) in [
        (
            Config::FollowOtherPort,
            "idle `follow`, every hop probed, filter rejects every packet (`--port 9`)",
        ),
        (Config::FollowOtherPeer, "idle `follow`, other peer"),
    ] {
        let cpu = o.stat(c, Run::cpu_per_10s);
        let (measured, met) = throughput_goal(&o.ratios(c), &idle.ratios(c), 0.97);
        goals.push(Goal {
            figure: format!("{what}: throughput"),
            goal: "≥ 0.97× baseline".into(),
            measured,
            met,
        });
        goals.push(Goal {
            figure: format!("{what}: tool CPU per 10 s of traffic"),
            goal: "≤ 0.2 s".into(),
            measured: show(cpu, &|x| format!("{x:.2} s")),
            met: cpu.map(|s| s.median <= 0.2),
        });
        if let Some(extra) = idle.extra(c) {
            let floor = idle
                .floor()
                .and_then(|f| Some((f, idle.extra(f)?)))
                .map(|(f, x)| {
                    format!(
                        "; {} the same way: {}",
                        match f {
                            Config::TcxHookAlone => "TCX's hook alone",
                            _ => "clsact's hook alone",
                        },
                        x.show(|x| format!("{x:+.1} %"))
                    )
                })
                .unwrap_or_default();
            goals.push(Goal {
                figure: format!(
                    "{what}: the machine's CPU per GB, over the baseline windows around it (see \"Idle sessions in paired windows\")"
                ),
                goal: "– (reported)".into(),
                measured: format!("{}{floor}", extra.show(|x| format!("{x:+.1} %"))),
                met: None,
            });
        }
    }

    for (c, what) in [
        (
            Config::TcxHookAlone,
            "for reference: TCX's hook alone on every hop (a TCX program that does nothing, no kernel hooks): throughput",
        ),
        (
            Config::TcHookAlone,
            "for reference: clsact's hook alone on every hop (a clsact filter that does nothing, no kernel hooks): throughput",
        ),
        (
            Config::FollowOtherPortClsact,
            "for reference: idle `follow --port 9` with clsact filters (`PODTRACE_TC=clsact`): throughput",
        ),
        (
            Config::FollowOtherPortKeepHooks,
            "for reference: idle `follow --port 9 --keep-hooks` (route lookup and transmit hooks kept while idle): throughput",
        ),
    ] {
        if !o.runs(c).is_empty() {
            let windows = idle.ratios(c);
            let windows = match (Stat::of(&windows), median_interval(&windows)) {
                (Some(s), Some(i)) => format!(
                    "; paired windows: {}, the median in {}",
                    s.show(x3),
                    i.show(x3)
                ),
                _ => String::new(),
            };
            goals.push(Goal {
                figure: what.into(),
                goal: "– (reported)".into(),
                measured: format!("{}{windows}", show(o.ratio(c), &x3)),
                met: None,
            });
        }
    }

    // capture vs tcpdump, round by round.
    let cap = o.runs(Config::Capture);
    let tcp = o.runs(Config::Tcpdump);
    let lost_below: Vec<f64> = cap
        .iter()
        .zip(tcp)
        .filter_map(|(c, t)| {
            Some(overhead::Results::lost_pct(t)? - overhead::Results::lost_pct(c)?)
        })
        .collect();
    let d = Stat::of(&lost_below);
    let med = |c: Config| {
        o.stat(c, overhead::Results::lost_pct)
            .map_or_else(|| "–".into(), |s| format!("{:.0} %", s.median))
    };
    let cut = o
        .stat(Config::Capture, overhead::Results::cut_pct)
        .filter(|s| s.max > 0.0)
        .map(|s| {
            format!(
                "; podtrace cut {} of the packets to their first 128 bytes (headers) for want of room in its ring buffer (min / median / max), not counted as lost",
                s.show(|x| format!("{x:.0} %"))
            )
        })
        .unwrap_or_default();
    goals.push(Goal {
        figure: "`capture`, whole packets: lost %".into(),
        goal: "below tcpdump's in the same round".into(),
        measured: d
            .map(|s| {
                format!(
                    "podtrace {} vs tcpdump {} (medians); tcpdump's − podtrace's per round: {} points ({}){cut}",
                    med(Config::Capture),
                    med(Config::Tcpdump),
                    s.show(|x| format!("{x:+.1}")),
                    rounds(&lost_below, |x| x > 0.0)
                )
            })
            .unwrap_or_else(|| "not measured".into()),
        met: d.map(|s| s.median > 0.0),
    });
    let whole = |c: Config| {
        let pct = o.stat(c, overhead::Results::whole_pct)?;
        let n = o.stat(c, |r| {
            r.capture
                .as_ref()
                .map(|x| x.captured.saturating_sub(x.cut) as f64)
        })?;
        Some(format!(
            "{:.0} % ({} packets)",
            pct.median,
            super::count(n.median)
        ))
    };
    if let (Some(p), Some(t)) = (whole(Config::Capture), whole(Config::Tcpdump)) {
        goals.push(Goal {
            figure: "`capture`, whole packets: packets in the files whole, of those the hops saw"
                .into(),
            goal: "– (reported)".into(),
            measured: format!("podtrace {p} vs tcpdump {t} (medians)"),
            met: None,
        });
    }
    let times: Vec<f64> = o
        .ratios(Config::Capture)
        .iter()
        .zip(o.ratios(Config::Tcpdump))
        .map(|(c, t)| c / t)
        .collect();
    let t = Stat::of(&times);
    goals.push(Goal {
        figure: "`capture`, whole packets: its × baseline over tcpdump's × baseline".into(),
        goal: "≥ 2 (same round)".into(),
        measured: t
            .map(|s| {
                format!(
                    "{} ({})",
                    s.show(|x| format!("{x:.2}×")),
                    rounds(&times, |x| x >= 2.0)
                )
            })
            .unwrap_or_else(|| "not measured".into()),
        met: t.map(|s| s.median >= 2.0),
    });

    let h = o.ratio(Config::CaptureHeaders);
    goals.push(Goal {
        figure: format!(
            "`capture -s {}` (headers): throughput",
            overhead::HEADERS_SNAPLEN
        ),
        goal: "≥ 0.85× baseline".into(),
        measured: ratio_vs(&o.ratios(Config::CaptureHeaders), 0.85),
        met: h.map(|s| s.median >= 0.85),
    });
    let hl = o.stat(Config::CaptureHeaders, |r| {
        r.capture.as_ref().map(|c| c.lost as f64)
    });
    goals.push(Goal {
        figure: format!("`capture -s {}` (headers): lost", overhead::HEADERS_SNAPLEN),
        goal: "0 in every run".into(),
        measured: show(hl, &|x| format!("{x:.0}")),
        met: hl.map(|s| s.max == 0.0),
    });

    let rss = [Config::Capture, Config::CaptureHeaders]
        .iter()
        .filter_map(|c| o.peak_rss_kb(*c))
        .chain(
            sweep
                .tools
                .iter()
                .filter(|t| t.tool == Tool::Podtrace)
                .map(|t| t.peak_rss_kb()),
        )
        .max();
    goals.push(Goal {
        figure: "peak RSS while capturing (every capture run and the UDP sweep)".into(),
        goal: "≤ 40 MiB".into(),
        measured: rss
            .map(|kb| mib(kb as f64))
            .unwrap_or_else(|| "not measured".into()),
        met: rss.map(|kb| kb as f64 <= 40.0 * 1024.0),
    });

    let best = |tool: Tool| {
        sweep
            .tools
            .iter()
            .find(|t| t.tool == tool)
            .map(|t| (t.best().map_or(0.0, |b| b.achieved_pps()), t.sender_bound))
    };
    let ceiling = sweep.ceiling_pps();
    let pct = |x: f64| {
        if ceiling > 0.0 {
            format!(
                " ({:.0} % of the path's {:.0}/s)",
                100.0 * x / ceiling,
                ceiling
            )
        } else {
            String::new()
        }
    };
    let (p, t) = (best(Tool::Podtrace), best(Tool::Tcpdump));
    goals.push(Goal {
        figure: "lossless small-UDP rate".into(),
        goal: "≥ tcpdump's, against the path ceiling".into(),
        measured: match (p, t) {
            (Some((p, pb)), Some((t, tb))) => format!(
                "podtrace {}{p:.0}/s{}, tcpdump {}{t:.0}/s{}{}",
                if pb { "≥ " } else { "" },
                pct(p),
                if tb { "≥ " } else { "" },
                pct(t),
                if lossless_met(p, pb, t, tb).is_none() {
                    " (undecided: a tool that lost nothing at the fastest rate the sender \
                     reached has a lossless rate of at least that)"
                } else {
                    ""
                }
            ),
            _ => "not measured".into(),
        },
        met: match (p, t) {
            (Some((p, pb)), Some((t, tb))) => lossless_met(p, pb, t, tb),
            _ => None,
        },
    });

    let rest = agents.max_rest_rss_kb();
    let held: usize = agents.rest.iter().map(|r| r.programs).sum();
    let held_after: usize = agents.rest.iter().map(|r| r.programs_after).sum();
    goals.push(Goal {
        figure: "an agent at rest: RSS (the largest)".into(),
        goal: "< 10 MiB".into(),
        measured: mib(rest as f64),
        met: (!agents.rest.is_empty()).then_some((rest as f64) < 10.0 * 1024.0),
    });
    goals.push(Goal {
        figure: "an agent at rest, and after its sessions ended: eBPF programs held".into(),
        goal: "0 (nothing on the data path)".into(),
        measured: format!("{held} at rest, {held_after} after the sessions"),
        met: (!agents.rest.is_empty()).then_some(held == 0 && held_after == 0),
    });
    for v in &agents.variants {
        goals.push(Goal {
            figure: format!(
                "cross-node `follow` through agents ({}): start → probes live, {}-hop path",
                v.kind, agents.hops
            ),
            goal: "– (reported)".into(),
            measured: show(v.total(), &ms),
            met: None,
        });
    }
    goals
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{agents::Rest, attach, capture::Report, sweep::ToolSweep};

    fn run(gbps: f64, captured: Option<(u64, u64)>, cpu: Option<f64>) -> Run {
        Run {
            gbps,
            capture: captured.map(|(captured, lost)| Report {
                captured,
                lost,
                rss_kb: 30 * 1024,
                ..Report::default()
            }),
            steady_cpu_s: cpu,
            window_s: 10.0,
            ..Run::default()
        }
    }

    fn find<'a>(goals: &'a [Goal], prefix: &str) -> &'a Goal {
        goals
            .iter()
            .find(|g| g.figure.starts_with(prefix))
            .unwrap_or_else(|| panic!("no goal {prefix}"))
    }

    #[test]
    fn throughput_goals_are_judged_on_the_interval_of_the_windows_median() {
        let runs = [0.9, 0.95, 1.0];
        // 10 windows: the interval is the 2nd to the 9th smallest.
        let above: Vec<f64> = (0..10).map(|i| 0.96 + 0.005 * i as f64).collect();
        let (text, met) = throughput_goal(&runs, &above, 0.97);
        assert_eq!(met, None, "0.965–1.000 holds 0.97: {text}");
        assert!(text.contains("undecided"), "{text}");
        assert!(
            text.contains("interleaved runs: 0.900× / **0.950×** / 1.000×"),
            "{text}"
        );
        let high: Vec<f64> = above.iter().map(|x| x + 0.02).collect();
        assert_eq!(throughput_goal(&runs, &high, 0.97).1, Some(true));
        let low: Vec<f64> = above.iter().map(|x| x - 0.05).collect();
        assert_eq!(throughput_goal(&runs, &low, 0.97).1, Some(false));
        // Without windows: the runs' median.
        assert_eq!(throughput_goal(&runs, &[], 0.97).1, Some(false));
        assert_eq!(throughput_goal(&runs, &[0.99], 0.95).1, Some(true));
        // Too few windows for a 95 % interval: the runs decide.
        let (text, met) = throughput_goal(&runs, &[0.99, 1.0], 0.97);
        assert_eq!(met, Some(false));
        assert!(text.contains("judged on the runs"), "{text}");
    }

    #[test]
    fn lossless_rates_are_judged_only_where_the_bounds_decide() {
        assert_eq!(lossless_met(42_000.0, false, 40_000.0, false), Some(true));
        assert_eq!(lossless_met(38_000.0, false, 40_000.0, false), Some(false));
        assert_eq!(lossless_met(42_000.0, true, 40_000.0, false), Some(true));
        assert_eq!(lossless_met(38_000.0, true, 40_000.0, false), None);
        assert_eq!(lossless_met(38_000.0, false, 40_000.0, true), Some(false));
        assert_eq!(lossless_met(42_000.0, false, 40_000.0, true), None);
        assert_eq!(lossless_met(42_000.0, true, 43_000.0, true), None);
        assert_eq!(lossless_met(44_000.0, true, 43_000.0, true), None);
    }

    #[test]
    fn judged_round_by_round() {
        // Baselines drift from 10 to 5 Gbit/s: per-round ratios stay 0.98 for the idle
        // follow although its median Gbit/s is well under the baseline's median.
        let mut o = overhead::Results {
            seconds: 10,
            rounds: 3,
            stats_via: None,
            stats_runs: Vec::new(),
            runs: vec![
                (
                    Config::Baseline,
                    vec![
                        run(10.0, None, None),
                        run(5.0, None, None),
                        run(5.0, None, None),
                    ],
                ),
                (
                    Config::FollowOtherPort,
                    vec![
                        run(9.8, None, Some(0.1)),
                        run(4.9, None, Some(0.1)),
                        run(4.9, None, Some(0.5)),
                    ],
                ),
                (
                    Config::Capture,
                    vec![
                        run(5.0, Some((90, 10)), None),
                        run(2.0, Some((50, 50)), None),
                        run(2.5, Some((80, 20)), None),
                    ],
                ),
                (
                    Config::CaptureHeaders,
                    vec![
                        run(9.0, Some((100, 0)), None),
                        run(4.5, Some((100, 1)), None),
                        run(4.5, Some((100, 0)), None),
                    ],
                ),
                (
                    Config::Tcpdump,
                    vec![
                        run(2.0, Some((70, 30)), None),
                        run(1.0, Some((70, 30)), None),
                        run(1.0, Some((70, 30)), None),
                    ],
                ),
            ],
        };
        // Each run next to its round's baseline (as if both baselines around it were alike).
        let bases: Vec<f64> = o.runs(Config::Baseline).iter().map(|r| r.gbps).collect();
        for (c, runs) in &mut o.runs {
            if *c != Config::Baseline {
                for (r, b) in runs.iter_mut().zip(&bases) {
                    r.base_gbps = Some(*b);
                }
            }
        }
        assert_eq!(o.ratios(Config::FollowOtherPort).len(), 3);
        assert!(o
            .ratios(Config::FollowOtherPort)
            .iter()
            .all(|r| (r - 0.98).abs() < 1e-9));
        let a = Attach {
            runs: [100.0, 200.0, 140.0]
                .iter()
                .map(|t| attach::Run {
                    total: *t,
                    ..attach::Run::default()
                })
                .collect(),
            clsact_runs: Vec::new(),
            hops: 10,
            hop_names: Vec::new(),
            kernel_hooks: Vec::new(),
        };
        let ag = Agents {
            prefix: "pba-".into(),
            rest: vec![Rest {
                node: "node-a".into(),
                kind: crate::bench::agents::UNIX,
                rss_kb: 8 * 1024,
                hwm_kb: 8 * 1024,
                programs: 0,
                programs_after: 0,
                hwm_end_kb: 0,
                rss_end_kb: 0,
            }],
            variants: vec![crate::bench::agents::Variant {
                kind: crate::bench::agents::TLS,
                command: String::new(),
                starts: Vec::new(),
            }],
            hops: 10,
        };
        let sw = Sweep {
            seconds: 3.0,
            ceiling: Vec::new(),
            tools: vec![ToolSweep {
                tool: Tool::Podtrace,
                steps: Vec::new(),
                sender_bound: false,
            }],
        };
        let win = |config: Config, busy_s: f64| idlecost::Window {
            config,
            secs: 6.0,
            busy_s,
            steal_s: 0.0,
            bytes: 3_000_000_000,
        };
        let idle = idlecost::Results {
            window_s: 6,
            cycles: 1,
            configs: vec![Config::FollowOtherPort, Config::TcxHookAlone],
            windows: vec![
                win(Config::Baseline, 6.0),
                win(Config::FollowOtherPort, 6.06),
                win(Config::Baseline, 6.0),
                win(Config::TcxHookAlone, 6.03),
                win(Config::Baseline, 6.0),
            ],
        };
        let g = evaluate(&a, &ag, &o, &idle, &sw);
        let per_gb = g
            .iter()
            .find(|g| g.figure.contains("--port 9") && g.figure.contains("CPU per GB"))
            .unwrap();
        assert_eq!(per_gb.met, None);
        assert_eq!(
            per_gb.measured,
            "+1.0 %; TCX's hook alone the same way: +0.5 %"
        );
        assert!(
            !g.iter()
                .any(|g| g.figure.contains("other peer") && g.figure.contains("CPU per GB")),
            "no windows of the other peer"
        );
        assert_eq!(find(&g, "start → probes live").met, Some(true));
        let idle = find(&g, "idle `follow`, every hop");
        assert_eq!(idle.met, Some(true));
        assert!(
            idle.measured.contains("(3/3 runs at or above 0.970×)"),
            "{}",
            idle.measured
        );
        let cpu = g
            .iter()
            .find(|g| g.figure.contains("--port 9") && g.figure.contains("CPU"))
            .unwrap();
        assert_eq!(cpu.met, Some(true), "median 0.1 s per 10 s");
        // Lost: 10 % vs 30 %, 50 % vs 30 %, 20 % vs 30 %: below in 2 of 3 rounds.
        let lost = find(&g, "`capture`, whole packets: lost");
        assert_eq!(lost.met, Some(true));
        assert!(lost.measured.contains("2/3 rounds"), "{}", lost.measured);
        assert!(!lost.measured.contains("cut"), "nothing was cut");
        // Whole: podtrace 90 %, 50 %, 80 % of what the hops saw; tcpdump 70 % each round.
        let whole = find(&g, "`capture`, whole packets: packets in the files whole");
        assert_eq!(whole.met, None);
        assert!(
            whole.measured.starts_with("podtrace 80 % (")
                && whole.measured.contains("tcpdump 70 % ("),
            "{}",
            whole.measured
        );
        // Throughput over tcpdump's: 0.5/0.2, 0.4/0.2, 0.5/0.2 → 2.5, 2, 2.5.
        assert_eq!(find(&g, "`capture`, whole packets: its").met, Some(true));
        // -s 128: 0.9× each round, but one run lost a packet.
        let headers = find(&g, "`capture -s 128` (headers): throughput");
        assert_eq!(headers.met, Some(true));
        assert!(
            headers.measured.contains("(3/3 runs at or above 0.850×)"),
            "{}",
            headers.measured
        );
        assert_eq!(
            find(&g, "`capture -s 128` (headers): lost").met,
            Some(false)
        );
        assert_eq!(find(&g, "peak RSS while capturing").met, Some(true));
        assert_eq!(find(&g, "an agent at rest: RSS").met, Some(true));
        assert_eq!(find(&g, "cross-node").met, None);
    }
}
