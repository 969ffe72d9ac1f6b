//! The results as JSON (`latest.json`) and as a markdown table (`latest.md`, also printed).
use std::{fmt::Write as _, time::Duration};

use serde_json::{json, Value};

use super::{
    agents::Agents,
    attach::Attach,
    bpfstats,
    capture::Tool,
    count, goals, idlecost,
    lab::Hop,
    machine::Machine,
    overhead::{self, Config, Run},
    sweep::{self, Sweep},
    DST_IP, OTHER_PEER_IP, PEER, POD,
};

pub struct Results {
    pub machine: Machine,
    pub hops: Vec<Hop>,
    pub attach: Attach,
    pub agents: Agents,
    pub overhead: overhead::Results,
    pub idle: idlecost::Results,
    pub sweep: Sweep,
    pub elapsed: Duration,
}

fn mib(kb: u64) -> String {
    format!("{:.1} MiB", kb as f64 / 1024.0)
}

impl Results {
    pub fn to_json(&self) -> Value {
        let m = &self.machine;
        json!({
            "schema": 2,
            "quick": m.quick,
            "date": m.date,
            "elapsed_s": (self.elapsed.as_secs_f64() * 10.0).round() / 10.0,
            "machine": m.to_json(),
            "podtrace": {
                "commit": m.commit,
                "uncommitted_changes": m.dirty,
                "version": m.podtrace_version,
                "binary": m.binary.display().to_string(),
                "work_tree": m.tree.display().to_string(),
                "built_by_bench": m.built,
                "binary_mtime": m.binary_mtime,
            },
            "goals": self.goals().iter().map(goals::Goal::to_json).collect::<Vec<_>>(),
            "tools": {"tcpdump": m.tcpdump, "iperf3": m.iperf3},
            "lab": {
                "topology": "flannel",
                "pod": POD, "peer": PEER, "dst": DST_IP,
                "hops": self.hops.iter().map(|h| json!({"name": h.name, "role": h.role})).collect::<Vec<_>>(),
            },
            "attach_latency": self.attach.to_json(),
            "agents": self.agents.to_json(),
            "overhead": self.overhead.to_json(),
            "idle_cost": self.idle.to_json(),
            "lossless_rate": self.sweep.to_json(),
            "peak_rss_kb": self.memory().iter().map(|(k, _, kb)| (k.to_string(), json!(kb))).collect::<serde_json::Map<_, _>>(),
        })
    }

    pub fn goals(&self) -> Vec<goals::Goal> {
        goals::evaluate(
            &self.attach,
            &self.agents,
            &self.overhead,
            &self.idle,
            &self.sweep,
        )
    }

    /// (key, label, peak RSS in kB) of every measured process kind.
    fn memory(&self) -> Vec<(&'static str, String, u64)> {
        let mut v = Vec::new();
        for (key, c) in [
            ("podtrace_capture_tcp", Config::Capture),
            ("podtrace_capture_headers_tcp", Config::CaptureHeaders),
            ("tcpdump_sum_tcp", Config::Tcpdump),
        ] {
            if let Some((_, _, rss)) = self.overhead.capture_stats(c) {
                v.push((key, c.label(), rss));
            }
        }
        let tcpdump_max = self
            .overhead
            .runs(Config::Tcpdump)
            .iter()
            .filter_map(|r| r.capture.as_ref().map(|c| c.rss_max_kb))
            .max()
            .unwrap_or(0);
        v.push((
            "tcpdump_single_max_tcp",
            "one tcpdump process (the largest)".into(),
            tcpdump_max,
        ));
        for (key, c) in [
            ("podtrace_follow_other_peer", Config::FollowOtherPeer),
            ("podtrace_follow_other_port", Config::FollowOtherPort),
        ] {
            let rss = self
                .overhead
                .follow_runs(c)
                .iter()
                .map(|f| f.rss_kb)
                .max()
                .unwrap_or(0);
            v.push((key, c.label(), rss));
        }
        for r in &self.agents.rest {
            v.push((
                match (r.node.as_str(), r.kind) {
                    ("node-a", super::agents::TLS) => "agent_node_a_tls_at_rest",
                    ("node-b", super::agents::TLS) => "agent_node_b_tls_at_rest",
                    ("node-a", _) => "agent_node_a_unix_at_rest",
                    _ => "agent_node_b_unix_at_rest",
                },
                format!(
                    "agent of {} ({}) at rest (VmRSS; VmHWM {})",
                    r.node,
                    r.kind,
                    mib(r.hwm_kb)
                ),
                r.rss_kb,
            ));
        }
        for t in &self.sweep.tools {
            let key = match t.tool {
                Tool::Podtrace => "podtrace_capture_udp_sweep",
                Tool::Tcpdump => "tcpdump_sum_udp_sweep",
            };
            v.push((
                key,
                format!("{} in the UDP sweep", t.tool.name()),
                t.peak_rss_kb(),
            ));
        }
        v
    }

    pub fn markdown(&self) -> String {
        let m = &self.machine;
        let mut s = String::new();
        let _ = writeln!(s, "# podtrace benchmark\n");
        if m.quick {
            let _ = writeln!(
                s,
                "**`--quick`: a smoke check (fewer and shorter runs), not a measurement.**\n"
            );
        }
        let _ = writeln!(
            s,
            "`cargo xtask bench`, {} ({:.0} s of measurement). Lab: flannel topology, {POD} (node-a) → {PEER} ({DST_IP}, node-b), {} hops: {}.\n",
            m.date,
            self.elapsed.as_secs_f64(),
            self.hops.len(),
            self.hops.iter().map(|h| format!("`{}`", h.name)).collect::<Vec<_>>().join(", ")
        );
        let _ = writeln!(s, "| machine | |\n|---|---|");
        let _ = writeln!(s, "| kernel | {} |", m.kernel);
        let _ = writeln!(s, "| CPU | {} × {} |", m.cores, m.cpu);
        let _ = writeln!(s, "| memory | {:.1} GiB |", m.memory_gib);
        let _ = writeln!(s, "| OS | {} |", m.os);
        let _ = writeln!(
            s,
            "| podtrace | {}, commit {} of {} ({}, binary of {}) |",
            m.podtrace_version,
            m.commit_label(),
            if m.tree.as_os_str().is_empty() {
                "no git work tree".to_owned()
            } else {
                m.tree.display().to_string()
            },
            if m.built {
                "release build by the benchmark".to_owned()
            } else {
                format!("`--podtrace {}`", m.binary.display())
            },
            m.binary_mtime
        );
        let _ = writeln!(s, "| tools | {}; {} |", m.tcpdump, m.iperf3);
        let _ = writeln!(
            s,
            "| load average (1, 5, 15 min) | {} at start, {} at the end (the benchmark's own load included) |\n",
            m.loadavg, m.loadavg_end
        );

        // Goals.
        let _ = writeln!(
            s,
            "## Goals (issue 14; the agent's from issue 15)\n\nFigures are min / **median** / max over the runs; a goal is judged on the median (comparisons with tcpdump round by round, then the median over the rounds), except the idle throughput goals: they are judged on the interval that holds the median of the paired windows (see \"Idle sessions in paired windows\"): met when it lies at or above the goal, not met when below, undecided (–) when it holds the goal.\n\n| figure | goal | measured | |\n|---|---|---|---|"
        );
        for g in self.goals() {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} |",
                g.figure,
                g.goal,
                g.measured,
                g.mark()
            );
        }
        let _ = writeln!(s);

        // Attach latency.
        let a = &self.attach;
        let _ = writeln!(
            s,
            "## Attach latency\n\n`podtrace follow {POD} --dst {DST_IP} --json`: from process start to the `ready` line (probes live on {} hops of both nodes, plus {}); {} runs after a warm-up.\n",
            a.hops,
            a.kernel_hooks.join(", "),
            a.runs.len()
        );
        let _ = writeln!(s, "| phase | min | median | max |\n|---|---:|---:|---:|");
        for (f, label) in [
            ("total", "**total: start → probes live**"),
            (
                "process",
                "process start (exec, arguments; total − ready_ms)",
            ),
            (
                "resolve",
                "resolve (pod, namespaces, links, routes of both nodes)",
            ),
            ("load", "load (BTF, eBPF object, maps)"),
            (
                "attach",
                "attach (the hop program, a stub per namespace, tc on every hop, names, kernel hooks)",
            ),
            ("other", "other (before the ready line)"),
            (
                "stop",
                "**stop: SIGINT → exit** (probes detached, summary printed)",
            ),
        ] {
            let _ = writeln!(
                s,
                "| {label} | {:.1} ms | {:.1} ms | {:.1} ms |",
                a.min(f),
                a.median(f),
                a.max(f)
            );
        }
        if !a.clsact_runs.is_empty() {
            let _ = writeln!(
                s,
                "\nWith clsact filters instead of TCX links (`PODTRACE_TC=clsact`), {} runs. (Each TCX link waits for an RCU grace period under the RTNL lock, made or closed; podtrace has them expedited for those moments.)\n\n| phase | min | median | max |\n|---|---:|---:|---:|",
                a.clsact_runs.len()
            );
            for (f, label) in [
                ("total", "total: start → probes live"),
                ("attach", "attach"),
                ("stop", "stop: SIGINT → exit"),
            ] {
                if let Some(st) = a.clsact_stat(f) {
                    let _ = writeln!(
                        s,
                        "| {label} | {:.1} ms | {:.1} ms | {:.1} ms |",
                        st.min, st.median, st.max
                    );
                }
            }
        }

        // Agents.
        let g = &self.agents;
        let _ = writeln!(
            s,
            "\n## Node agents\n\nOn a lab of their own (`lab up --prefix {} --agents`), so that the other sections run without agents: the lab's agents (\"{}\": TCP with mutual TLS on each node's underlay address, reached from the `ext` host's namespace), and one `podtrace agent --node NODE --listen unix:PATH --lab PREFIX` per node started in the node's namespace (\"{}\"). At rest: VmRSS a second after they listened, before any session; eBPF programs: those the agent holds an fd of (a program's or a link's).\n\n| agent | listening on | RSS at rest | peak RSS at rest | eBPF programs at rest | after the sessions | peak RSS after the sessions | RSS a second after the sessions |\n|---|---|---:|---:|---:|---:|---:|---:|",
            g.prefix,
            super::agents::TLS,
            super::agents::UNIX
        );
        for r in &g.rest {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                r.node,
                r.kind,
                mib(r.rss_kb),
                mib(r.hwm_kb),
                r.programs,
                r.programs_after,
                mib(r.hwm_end_kb),
                mib(r.rss_end_kb)
            );
        }
        let _ = writeln!(
            s,
            "\nCross-node follow through both nodes' agents ({} hops), from process start to the `ready` line; the two kinds interleaved, {} runs each after a warm-up.\n\n| agents | command | start → probes live (min / median / max) |\n|---|---|---:|",
            g.hops,
            g.variants.first().map_or(0, |v| v.starts.len())
        );
        for v in &g.variants {
            let _ = writeln!(
                s,
                "| {} | `{}` | {} |",
                v.kind,
                v.command,
                v.total()
                    .map(|t| t.show(|x| format!("{x:.1} ms")))
                    .unwrap_or_else(|| "–".into())
            );
        }

        // Overhead.
        let o = &self.overhead;
        let _ = writeln!(
            s,
            "\n## Data-path overhead\n\niperf3 TCP {POD} → {PEER}, {} s per run, {} rounds; each round runs every configuration once, in this order, with a baseline run first and after every two configurations (interleaved, so drift hits all alike). Figures: min / **median** / max over the runs; × baseline: each run over the mean of the two baseline runs around it (which cancels a steady drift), then min / median / max. Captured/lost: all hops together (podtrace: \"packets written\" / \"lost before reaching the writer\"; tcpdump: \"packets captured\" / \"dropped by kernel\", summed over its {} processes). Cut: of the packets written, those podtrace's kernel side cut to their first 128 bytes (headers) because its ring buffer had no room for them whole (`--overload cut`, the default; tcpdump has no such mode); the % columns are of all the packets the hops saw (captured + lost). Tool CPU during traffic: user + system seconds of the tool's processes while iperf3 ran (/proc/PID/stat, 10 ms ticks), per 10 s; total: over the tool's whole life, start and stop included (`wait4`). Capture files on tmpfs. The kernel's per-program statistics are off in these runs (they add two clock reads to each program run); the programs' own cost below comes from {} more runs of each podtrace configuration with them on (turned on with {}).\n",
            o.seconds,
            o.rounds,
            self.hops.len(),
            o.stats_runs.iter().map(|(_, r)| r.len()).max().unwrap_or(0),
            o.stats_via.unwrap_or("–")
        );
        let _ = writeln!(
            s,
            "| configuration | Gbit/s | × baseline | captured | lost | lost % | cut to headers | cut % | tool CPU per 10 s of traffic | tool CPU total | peak RSS |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        let dash = || "–".to_owned();
        for c in Config::ALL.into_iter().filter(|c| !o.runs(*c).is_empty()) {
            let show = |x: Option<super::Stat>, f: &dyn Fn(f64) -> String| {
                x.map(|x| x.show(f)).unwrap_or_else(dash)
            };
            let (captured, lost, share, cut, cut_share) = if c.is_capture() || c == Config::Tcpdump
            {
                (
                    show(
                        o.stat(c, |r| r.capture.as_ref().map(|x| x.captured as f64)),
                        &count,
                    ),
                    show(
                        o.stat(c, |r| r.capture.as_ref().map(|x| x.lost as f64)),
                        &count,
                    ),
                    show(o.stat(c, overhead::Results::lost_pct), &|x| {
                        format!("{x:.0} %")
                    }),
                    show(
                        o.stat(c, |r| r.capture.as_ref().map(|x| x.cut as f64)),
                        &count,
                    ),
                    show(o.stat(c, overhead::Results::cut_pct), &|x| {
                        format!("{x:.0} %")
                    }),
                )
            } else if c.is_follow() {
                let runs = o.follow_runs(c);
                let hops = runs.first().map_or(0, |f| f.hops.len());
                let lost: u64 = runs.iter().map(|f| f.lost).sum();
                let packets: u64 = runs.iter().map(|f| f.packets).sum();
                (
                    format!("{packets} packets ({hops} hops probed)"),
                    lost.to_string(),
                    dash(),
                    dash(),
                    dash(),
                )
            } else {
                (dash(), dash(), dash(), dash(), dash())
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {captured} | {lost} | {share} | {cut} | {cut_share} | {} | {} | {} |",
                c.label(),
                show(o.gbps(c), &|x| format!("{x:.2}")),
                if c == Config::Baseline {
                    "1".into()
                } else {
                    show(o.ratio(c), &|x| format!("{x:.3}"))
                },
                show(o.stat(c, Run::cpu_per_10s), &|x| format!("{x:.2} s")),
                show(o.stat(c, Run::total_cpu_s), &|x| format!("{x:.1} s")),
                o.peak_rss_kb(c).map(mib).unwrap_or_else(dash),
            );
        }

        let probed = |c: Config| {
            o.follow_runs(c)
                .first()
                .map(|f| {
                    f.hops
                        .iter()
                        .map(|h| format!("`{h}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default()
        };
        let on_path = o
            .follow_runs(Config::FollowOtherPeer)
            .first()
            .map_or(0, |f| {
                f.hops
                    .iter()
                    .filter(|h| self.hops.iter().any(|p| &p.name == *h))
                    .count()
            });
        let _ = writeln!(
            s,
            "\nIdle `follow`: `--dst {OTHER_PEER_IP}` (pod-a2) probes that path's hops ({}), {on_path} of them on the iperf3 path; `--port 9` keeps {PEER} as the peer, so every hop of the iperf3 path is probed ({}) and the filter rejects every packet. Each session is left idle after its ready line until its route lookup and transmit hooks, which see every packet of the machine, have gone (5 s without a packet of its conversation; they come back with its next packet), as a session left on to wait for a fault is; then the traffic starts. The drop hook stays. The `--keep-hooks` row keeps those two hooks: the cost of having them. podtrace's \"lost\" counts ring-buffer events of every kind (hop packet records and FIB/transmit/drop events), not only packets.",
            probed(Config::FollowOtherPeer),
            probed(Config::FollowOtherPort)
        );
        let _ = writeln!(
            s,
            "\nThe floor under them: \"TCX's hook alone\" puts on both directions of every hop a TCX link to a program that does nothing (returns `TCX_NEXT`), the way podtrace's TCX links run without their work, and no kernel hooks; \"clsact's hook alone\" the same with a clsact filter (classic BPF `ret 0` through cls_bpf). What the idle configurations lose beyond the floor of their mechanism is podtrace's programs and kernel hooks; what the floor loses, no probe of every hop through that mechanism wins back.{}",
            if o.runs(Config::FollowOtherPortClsact).is_empty() {
                " (TCX: this kernel has none; podtrace uses clsact filters.)".to_owned()
            } else {
                " podtrace uses TCX links on this kernel; the `PODTRACE_TC=clsact` row is `--port 9` with clsact filters instead.".to_owned()
            }
        );

        // The programs' own cost.
        let _ = writeln!(
            s,
            "\n## eBPF programs' own cost\n\nFrom the kernel's run-time statistics: for the programs the podtrace process holds (all their copies together), the growth of `run_time_ns` / `run_cnt` over the iperf3 run → ns per run (min / **median** / max over the runs with the statistics on), runs per second (median), and the CPU time the programs took per second of traffic (median; 1000 ms/s = one core; the **all** row: min / median / max). Hooks: hop = the tc programs on the hops; drop = kfree_skb; FIB = fib_table_lookup; xmit = the device transmit hook (tracepoint or kprobe).\n"
        );
        let _ = writeln!(
            s,
            "| configuration | hook | programs (copies) | ns per run | runs/s | CPU ms/s |\n|---|---|---|---:|---:|---:|"
        );
        for c in Config::ALL.into_iter().filter(|c| c.is_podtrace()) {
            for grp in bpfstats::GROUPS {
                let Some(ns) = o.bpf_ns(c, grp) else {
                    let seen = o
                        .stats_runs(c)
                        .iter()
                        .any(|r| r.bpf.as_ref().is_some_and(|b| b.contains_key(grp)));
                    if seen {
                        let _ = writeln!(s, "| {} | {grp} | | never ran | 0 | 0 |", c.key());
                    }
                    continue;
                };
                let (names, copies) = o
                    .stats_runs(c)
                    .iter()
                    .filter_map(|r| r.bpf.as_ref()?.get(grp))
                    .map(|x| (x.names.join(", "), x.copies))
                    .next_back()
                    .unwrap_or_default();
                let _ = writeln!(
                    s,
                    "| {} | {grp} | {names} ({copies}) | {} | {} | {} |",
                    c.key(),
                    ns.show(|x| format!("{x:.0}")),
                    o.bpf_rate(c, grp)
                        .map(|r| count(r.median))
                        .unwrap_or_else(dash),
                    o.bpf_cpu_ms_per_s(c, grp)
                        .map(|r| format!("{:.1}", r.median))
                        .unwrap_or_else(dash)
                );
            }
            if let Some(t) = o.bpf_total_cpu_ms_per_s(c) {
                let _ = writeln!(
                    s,
                    "| {} | **all** | | | | {} |",
                    c.key(),
                    t.show(|x| format!("{x:.1}"))
                );
            }
        }
        s.push_str(&self.idle.markdown());
        // Lossless rate.
        let w = &self.sweep;
        let _ = writeln!(
            s,
            "\n## Lossless capture rate\n\nUDP datagrams ({}-byte payload) {POD} → {PEER} from {} sending threads (sockets) sharing the rate, a thread per CPU (the path's work runs in the sending CPU's softirq: one sender would leave the other CPU to the tool), paced, {} s per step, rates doubling from 5 000/s then bisected. Lossless: the tool reports 0 lost (podtrace) / 0 dropped by kernel (tcpdump) **and** every hop's capture holds every datagram sent. Both tools keep only these datagrams (podtrace: `udp dst port {}` EXPR; tcpdump: `{}`). Path ceiling with nothing attached, senders flat out: **{} datagrams/s** (best of {} samples: {}).\n",
            sweep::PAYLOAD,
            sweep::SENDERS,
            w.seconds,
            sweep::PORT,
            super::capture::tcpdump_udp_filter(sweep::PORT),
            count(w.ceiling_pps()),
            w.ceiling.len(),
            w.ceiling
                .iter()
                .map(|c| format!("{}/s", count(c.achieved_pps())))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let _ = writeln!(
            s,
            "| tool | highest lossless rate | lowest lossy rate | peak RSS |\n|---|---:|---:|---:|"
        );
        for t in &w.tools {
            let best = t
                .best()
                .map(|b| {
                    format!(
                        "{}{} datagrams/s",
                        if t.sender_bound { "≥ " } else { "" },
                        count(b.achieved_pps())
                    )
                })
                .unwrap_or_else(|| "none tried was lossless".into());
            let lossy = t
                .first_lossy()
                .map(|b| format!("{} datagrams/s", count(b.achieved_pps())))
                .unwrap_or_else(|| "–".into());
            let _ = writeln!(
                s,
                "| {} | **{best}** | {lossy} | {} |",
                t.tool.name(),
                mib(t.peak_rss_kb())
            );
        }
        if w.tools.iter().any(|t| t.sender_bound) {
            let _ = writeln!(
                s,
                "\n≥: no loss at any rate tried; the senders could go no faster with the tool attached (the capture's per-packet kernel work runs in the sending CPU's softirq, and the consumer shares the machine's {} cores), so the path slowed down before the capture lost anything.",
                m.cores
            );
        }
        let _ = writeln!(
            s,
            "\n| tool | target/s | sent/s | sent | fewest on a hop | lost | lossless |\n|---|---:|---:|---:|---:|---:|---|"
        );
        for t in &w.tools {
            for st in &t.steps {
                let (min_hop, lost) = st
                    .report
                    .as_ref()
                    .map(|r| (r.per_hop.iter().map(|(_, n)| *n).min().unwrap_or(0), r.lost))
                    .unwrap_or_default();
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} | {} |",
                    t.tool.name(),
                    if st.target_pps == 0 {
                        "flat out".into()
                    } else {
                        count(st.target_pps as f64)
                    },
                    count(st.achieved_pps()),
                    count(st.sent as f64),
                    count(min_hop as f64),
                    count(lost as f64),
                    if st.lossless { "yes" } else { "no" }
                );
            }
        }

        // Memory.
        let _ = writeln!(
            s,
            "\n## Peak RSS\n\npodtrace: `wait4` maxrss and VmHWM; tcpdump: VmHWM of each process `lab exec` started, read before it stops.\n"
        );
        let _ = writeln!(s, "| process | peak RSS |\n|---|---:|");
        for (_, label, kb) in self.memory() {
            let _ = writeln!(s, "| {label} | {} |", mib(kb));
        }
        s
    }
}
