//! `podtrace follow POD --dst IP`: prove hop by hop, with real packets, the path a pod's
//! traffic takes; time each hop; say where and why a packet died. A consumer of the tracing
//! engine ([`crate::trace`]): it correlates the events into packets and judges them.
//!
//! - [`correlate`]: one record per packet across hops, in the kernel's order, and the verdict.
//! - [`nat`]: conversations across NAT (a Service's DNAT, a masquerade): conntrack, the
//!   Service model, what NAT leaves unchanged.
//! - [`facts`]: the nodes' state a drop hint names (neighbours, rp_filter, rules, conntrack).
//! - [`output`]: text and JSON.
pub mod clock;
pub mod correlate;
pub mod facts;
pub mod nat;
pub mod output;

use std::{
    io::{IsTerminal as _, Write as _},
    net::Ipv4Addr,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde::Serialize;

use crate::{
    cli::{parse_duration, parse_ipv4, parse_proto, OutputArgs, PodArgs, RemoteArgs},
    front,
    pcap::sink::CaptureSink,
    probes::hooks::HookReport,
    topology::{self, Cni},
    trace::{
        plan::{Plan, PlannedHop},
        run::{drive, monotonic_ns, Consumer, Stop, Until},
        TraceEvent, TraceOptions,
    },
};
use clock::Clocks;
use correlate::{Correlator, PacketRecord};
use facts::LiveFacts;
use nat::{ConntrackSource, CtAnswer, NoConntrack, Tuple};

use crate::{
    conntrack::{msg::tcp_state_name, Conntrack},
    probes::nat::NatFlows,
};

/// The translating node's conntrack table, over ctnetlink.
pub struct LiveConntrack {
    ns: usize,
    node: String,
    path: std::path::PathBuf,
    socket: Option<Conntrack>,
}

impl LiveConntrack {
    pub fn new(plan: &Plan, ns: usize) -> Self {
        let n = &plan.namespaces[ns.min(plan.namespaces.len().saturating_sub(1))];
        Self {
            ns,
            node: n.owner.clone(),
            path: n.path.clone(),
            socket: None,
        }
    }
}

fn ct_tuple(t: &Tuple) -> crate::conntrack::Tuple {
    match t.proto {
        1 => crate::conntrack::Tuple::icmp_echo(t.src, t.dst, t.sport),
        p => crate::conntrack::Tuple::ports(p, t.src, t.sport, t.dst, t.dport),
    }
}

fn our_tuple(t: &crate::conntrack::Tuple) -> Option<Tuple> {
    let v4 = |a: std::net::IpAddr| match a {
        std::net::IpAddr::V4(v) => Some(v),
        _ => None,
    };
    let (sport, dport) = match t.proto {
        1 => (t.icmp_id?, t.icmp_id?),
        _ => (t.sport?, t.dport?),
    };
    Some(Tuple {
        src: v4(t.src)?,
        sport,
        dst: v4(t.dst)?,
        dport,
        proto: t.proto,
    })
}

impl ConntrackSource for LiveConntrack {
    fn get(&mut self, ns: usize, orig: &Tuple) -> Option<CtAnswer> {
        if ns != self.ns {
            return None;
        }
        if self.socket.is_none() {
            self.socket = Conntrack::open(Some(&self.path))
                .map_err(|e| log::debug!("conntrack on {}: {e:#}", self.node))
                .ok();
        }
        let e = self.socket.as_mut()?.get(&ct_tuple(orig)).ok()??;
        Some(CtAnswer {
            node: self.node.clone(),
            orig: e.orig.as_ref().and_then(our_tuple).unwrap_or(*orig),
            reply: our_tuple(e.reply.as_ref()?)?,
            status: e.status.names().into_iter().map(str::to_owned).collect(),
            tcp_state: e.tcp_state.map(|s| tcp_state_name(s).to_owned()),
        })
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct FollowArgs {
    #[command(flatten)]
    pub pod: PodArgs,
    /// The destination whose conversation with the pod is followed.
    #[arg(long, value_name = "IP", value_parser = parse_ipv4)]
    pub dst: Ipv4Addr,
    /// Only this protocol.
    #[arg(long, value_name = "tcp|udp|icmp", value_parser = parse_proto)]
    pub proto: Option<u8>,
    /// Only this port (source or destination).
    #[arg(long, value_name = "N")]
    pub port: Option<u16>,
    /// Stop after COUNT packets (each direction counts).
    #[arg(short = 'c', value_name = "COUNT")]
    pub count: Option<u64>,
    /// Stop after this long (90, 90s, 10m, 1h).
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
    /// Also write the packets to rotating pcapng/pcap files (-w FILE, -C, -G, -W, ...).
    #[command(flatten)]
    pub out: OutputArgs,
    #[command(flatten)]
    pub hooks: crate::cli::HookArgs,
    /// Keep the route lookup and transmit hooks attached while the conversation is idle. By
    /// default they go after 5 s without a packet of it (they run for every packet of the
    /// machine) and come back at its next packet, whose own lookups and transmits they miss.
    #[arg(long)]
    pub keep_hooks: bool,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// `{"type":"ready", ...}`: every probe is attached.
#[derive(Debug, Serialize)]
pub struct Ready<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub pod: &'a str,
    pub pod_ip: String,
    pub dst: String,
    pub cni: Cni,
    pub hops: &'a [PlannedHop],
    /// How the hop probes are attached: `tcx` or `clsact`.
    pub tc: Option<crate::probes::TcMode>,
    pub kernel_hooks: &'a [HookReport],
    pub load_ms: f64,
    pub attach_ms: f64,
    /// Locating the pod and resolving its path, before loading.
    pub resolve_ms: f64,
    /// From entering `follow` to this line (resolve + load + attach + the rest).
    pub ready_ms: f64,
    /// What started on each node.
    pub nodes: Vec<NodeStart>,
    /// Whether the session runs through node agents.
    pub through_agents: bool,
    /// Parts of the path no agent could observe.
    pub unobserved: &'a [String],
}

/// One node's start, in the ready line.
#[derive(Debug, Serialize)]
pub struct NodeStart {
    pub node: String,
    pub kernel_hooks: Vec<HookReport>,
    pub load_ms: f64,
    pub attach_ms: f64,
}

pub fn run(args: FollowArgs) -> Result<ExitCode> {
    let entered = Instant::now();
    front::refuse_destination(args.dst)?;
    let (path, nat_plan) =
        front::resolve_nat(&args.pod, &args.remote, args.dst, args.port, args.proto)?;
    let topo = &path.topo;
    let pod_ip = topo
        .pod_ip
        .ok_or_else(|| anyhow::anyhow!("pod {} has no IPv4 address", topo.pod.name))?;
    front::refuse_directed_broadcast(topo, args.dst)?;
    if pod_ip == args.dst {
        bail!(
            "{} is {}'s own address: its packets to itself never leave it (the kernel delivers them over lo), so there is no path to follow; follow a Service it backs, or another pod",
            args.dst,
            topo.pod.name
        );
    }
    let plan = match nat_plan {
        Some(p) => p,
        None => {
            let mut filter = topology::plan::filter(topo, pod_ip, Some(args.dst));
            filter.proto = args.proto;
            filter.port = args.port;
            topology::plan::build(topo, filter)
        }
    };
    let resolve_ms = entered.elapsed().as_secs_f64() * 1e3;
    // Capture files are checked (and created) before anything is attached.
    let sink = match args.out.sink_options()? {
        Some(o) => Some(CaptureSink::create(&o, &plan, None, None, Duration::ZERO)?),
        None => None,
    };
    // The nodes' conntrack counters before anything is traced: a drop's hint says what
    // moved during the run.
    let facts = LiveFacts::start(&plan);
    let mut started = path.start(
        &plan,
        &TraceOptions {
            snaplen: args.out.write.is_some().then(|| args.out.kernel_snaplen()),
            mechanism: args.hooks.hooks,
            overload: args.out.overload,
            keep_hooks: args.keep_hooks,
            ..TraceOptions::default()
        },
        args.duration,
    )?;
    let hooks = started.info().hooks.clone();
    let (load_ms, attach_ms) = started.times();
    let json = args.json;
    if json {
        let ready = Ready {
            kind: "ready",
            pod: &topo.pod.name,
            pod_ip: pod_ip.to_string(),
            dst: args.dst.to_string(),
            cni: topo.cni,
            hops: &plan.hops,
            tc: started.info().tc,
            kernel_hooks: &hooks,
            load_ms,
            attach_ms,
            resolve_ms,
            ready_ms: entered.elapsed().as_secs_f64() * 1e3,
            nodes: started
                .nodes
                .iter()
                .map(|(n, i)| NodeStart {
                    node: n.clone(),
                    kernel_hooks: i.hooks.clone(),
                    load_ms: i.load_ms,
                    attach_ms: i.attach_ms,
                })
                .collect(),
            through_agents: path.remote(),
            unobserved: &path.unobserved,
        };
        println!("{}", serde_json::to_string(&ready)?);
    } else {
        println!(
            "following {} ({pod_ip}) ↔ {}: {} hops on {} ({}){}",
            topo.pod.name,
            args.dst,
            plan.hops.len(),
            {
                let mut nodes = plan.nodes();
                nodes.sort();
                nodes.join(", ")
            },
            topo.cni,
            if path.remote() {
                ", through their agents"
            } else {
                ""
            }
        );
        println!("kernel evidence: {}", started.hooks_line());
        match &plan.nat {
            Some(nat) => print!("{}", output::nat_plan_text(&plan, nat)),
            None => println!(
                "expected →  {}",
                plan.forward
                    .iter()
                    .filter_map(|s| plan.hop(s.hop).map(|h| format!(
                        "{} {}",
                        h.name,
                        s.hook.as_str()
                    )))
                    .collect::<Vec<_>>()
                    .join(" > ")
            ),
        }
        for u in &path.unobserved {
            println!("not observed: {u}");
        }
        eprintln!("probes live");
    }
    std::io::stdout().flush()?;

    let mut follower = Follower {
        clocks: if path.remote() {
            Clocks::estimated(&topo.pod.node)
        } else {
            Clocks::same(&topo.pod.node)
        },
        correlator: match &plan.nat {
            Some(nat) => Correlator::with_sources(
                plan.clone(),
                Box::new(LiveConntrack::new(&plan, nat.ns)),
                Box::new(facts),
            ),
            None => Correlator::with_sources(plan.clone(), Box::new(NoConntrack), Box::new(facts)),
        },
        nat_flows: started.nat_flows.take(),
        records: Vec::new(),
        json,
        count: args.count,
        sink,
        live: !json && std::io::stderr().is_terminal(),
        started: Instant::now(),
        matched: 0,
        lost: 0,
    };
    let outcome = drive(
        started.session,
        started.events,
        &Until {
            duration: args.duration,
            watch: path.watch.clone(),
        },
        &mut follower,
    )?;
    if follower.live {
        eprint!("\r\x1b[K");
    }
    let lost = outcome.counters.lost;
    // Close the capture files whatever stopped us, so they are complete.
    let captured = follower
        .sink
        .take()
        .map(|mut s| s.finish(lost).map(|r| (r, s.not_matched())))
        .transpose();
    let stop = outcome.stop?;
    if let Some(((stats, files), not_matched)) = captured.context("closing the capture")? {
        crate::pcap::sink::report(&stats, &files, &plan, not_matched);
    }
    let rest = follower.correlator.finish();
    follower.emit(rest)?;
    if let Stop::PodGone(ns) = &stop {
        bail!(
            "pod {}'s network namespace {} is gone (deleted while following); stopped",
            topo.pod.name,
            ns.display()
        );
    }
    let unobserved: Vec<String> = path
        .unobserved
        .iter()
        .chain(&outcome.unobserved)
        .cloned()
        .collect();
    let summary = output::summary(
        &follower.correlator,
        &follower.records,
        lost,
        &hooks,
        &follower.clocks,
        unobserved,
    );
    if json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print!("{}", output::summary_text(&plan, &summary));
    }
    std::io::stdout().flush()?;
    exit_code(&summary, &follower.records)
}

/// 0 when the path is confirmed, 1 when what was seen proves it is not; with parts of the
/// path unobserved, a confirmation covers only what was seen: "cannot say" (2) unless a drop,
/// a detour or a wrong order was seen.
fn exit_code(summary: &output::Summary, records: &[PacketRecord]) -> Result<ExitCode> {
    use correlate::{Fate, Verdict};
    if summary.unobserved.is_empty() {
        return Ok(if summary.verdict == Verdict::Confirmed {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        });
    }
    let proven = records
        .iter()
        .any(|r| matches!(r.fate, Fate::Dropped | Fate::Diverged | Fate::OutOfOrder));
    if proven {
        return Ok(ExitCode::from(1));
    }
    bail!(
        "cannot say whether the path works: {}",
        summary.unobserved.join("; ")
    )
}

/// `follow`'s consumer of the event stream.
struct Follower {
    correlator: Correlator,
    /// Widens the kernel filter to translations conntrack reveals.
    nat_flows: Option<NatFlows>,
    clocks: Clocks,
    records: Vec<PacketRecord>,
    json: bool,
    count: Option<u64>,
    sink: Option<CaptureSink>,
    live: bool,
    started: Instant,
    /// For the live status line.
    matched: u64,
    lost: u64,
}

impl Follower {
    fn plan(&self) -> &Plan {
        self.correlator.plan()
    }

    fn emit(&mut self, done: Vec<PacketRecord>) -> Result<()> {
        if done.is_empty() {
            return Ok(());
        }
        // The clocks learn from the whole batch first: a request and its reply finish
        // together, and the request's cross-node times need the reply's bound.
        for r in &done {
            self.clocks.observe(self.correlator.plan(), r);
        }
        let mut out = std::io::stdout().lock();
        for r in done {
            // `-c COUNT`: what the kernel still held when the count was reached is not shown.
            if self.reached() {
                break;
            }
            if self.json {
                writeln!(
                    out,
                    "{}",
                    serde_json::to_string(&output::packet_json(self.plan(), &r, &self.clocks))?
                )?;
            } else {
                write!(
                    out,
                    "{}",
                    output::packet_text(self.plan(), &r, &self.clocks)
                )?;
            }
            self.records.push(r);
        }
        out.flush()?;
        Ok(())
    }

    /// Gives the kernel filter the translated forms conntrack revealed.
    fn widen(&mut self) {
        let flows = self.correlator.convs.take_new_flows();
        if let Some(n) = self.nat_flows.as_mut() {
            for f in flows {
                if let Err(e) = n.insert(&f) {
                    log::warn!("{e:#}");
                }
            }
        }
    }

    fn reached(&self) -> bool {
        self.count.is_some_and(|c| self.records.len() as u64 >= c)
    }
}

impl Consumer for Follower {
    fn on_events(&mut self, batch: Vec<TraceEvent>) -> Result<Option<Stop>> {
        if self.reached() {
            return Ok(Some(Stop::Count));
        }
        let mut closed = Vec::new();
        for ev in &batch {
            match ev {
                TraceEvent::Counters(c) => {
                    self.matched = c.tc_matched;
                    self.lost = c.lost;
                }
                TraceEvent::Lost { total } => self.lost = *total,
                _ => {}
            }
            if let Some(sink) = self.sink.as_mut() {
                sink.on_event(ev)?;
            }
            closed.extend(self.correlator.feed(ev));
        }
        self.widen();
        self.emit(closed)?;
        Ok(self.reached().then_some(Stop::Count))
    }

    fn on_tick(&mut self) -> Result<Option<Stop>> {
        if let Some(sink) = self.sink.as_mut() {
            sink.tick()?;
        }
        let done = self.correlator.flush(monotonic_ns(), 300_000_000);
        self.widen();
        self.emit(done)?;
        if self.live {
            eprint!(
                "\r\x1b[K{} packets, {} hop events, {} lost, {:.0}s",
                self.records.len(),
                self.matched,
                self.lost,
                self.started.elapsed().as_secs_f64()
            );
        }
        Ok(self.reached().then_some(Stop::Count))
    }
}
