//! `podtrace capture`: the packets the hop probes see on every hop, written to rotating
//! pcapng/pcap files with one interface per hop, for intermittent faults. A consumer of the
//! tracing engine ([`crate::trace`]); the writing itself is [`crate::pcap::sink`], which
//! `follow -w` uses too.
//!
//! Packets are cut in the kernel to the snap length (whole packets by default, up to 64 KiB;
//! a longer GSO packet keeps its original length in the record). The capture filter (EXPR, in
//! tcpdump's language) is applied here on the inner headers of VXLAN-carried packets.
use std::{
    io::IsTerminal as _,
    net::Ipv4Addr,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::{
    cli::{parse_duration, parse_ipv4, OutputArgs, PodArgs, RemoteArgs},
    front,
    pcap::{
        sink::{self, CaptureSink, StopOn},
        CaptureFilter,
    },
    probes::hooks::Evidence,
    topology,
    trace::{
        run::{drive, Consumer, Stop, Until},
        TraceEvent, TraceOptions,
    },
};

#[derive(clap::Args, Debug)]
pub struct CaptureArgs {
    /// POD (NAME or NAMESPACE/NAME) then an optional filter expression in tcpdump's
    /// language (host, src, dst, net, port, tcp, udp, icmp, and, or, not, parentheses).
    /// With --pid, --netns or --container every word is the expression.
    #[arg(value_name = "POD [EXPR...]")]
    pub words: Vec<String>,
    /// The pod by a process in it.
    #[arg(long, value_name = "PID", conflicts_with_all = ["netns", "container"])]
    pub pid: Option<u32>,
    /// The pod by its network namespace (a path or a name in /run/netns).
    #[arg(long, value_name = "PATH|NAME", conflicts_with = "container")]
    pub netns: Option<String>,
    /// The pod by one of its containers, through the container runtime: a container ID or a
    /// unique prefix of one, as crictl takes it (a pod sandbox ID works too).
    #[arg(long, value_name = "ID")]
    pub container: Option<String>,
    /// The container runtime's CRI socket, as crictl's: unix:///PATH or PATH (default:
    /// $CONTAINER_RUNTIME_ENDPOINT, else the usual containerd, CRI-O, cri-dockerd, k3s sockets).
    #[arg(long, value_name = "SOCK", conflicts_with_all = ["pid", "netns"])]
    pub runtime_endpoint: Option<String>,
    /// Which lab, when several are up.
    #[arg(long, value_name = "PREFIX")]
    pub lab: Option<String>,
    /// Only the pod's conversation with this address (and its whole path, remote node too).
    #[arg(long, value_name = "IP", value_parser = parse_ipv4)]
    pub dst: Option<Ipv4Addr>,
    #[command(flatten)]
    pub out: OutputArgs,
    /// Stop after COUNT packets written (a packet seen on 3 hops is 3).
    #[arg(short = 'c', value_name = "COUNT")]
    pub count: Option<u64>,
    /// Stop after this long.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Intermittent mode: on the first drop (or TCP reset) keep capturing for --tail, then
    /// stop, keeping the ring of files that led up to it.
    #[arg(long, value_enum, value_name = "drop|rst")]
    pub stop_on: Option<StopOn>,
    /// How long to keep capturing after the --stop-on event.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "2s")]
    pub tail: Duration,
    #[command(flatten)]
    pub hooks: crate::cli::HookArgs,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// Splits `POD EXPR...` (or just EXPR with --pid/--netns/--container).
fn split_words(args: &CaptureArgs) -> Result<(PodArgs, Vec<String>)> {
    let mut words = args.words.clone();
    let pod = if args.pid.is_some() || args.netns.is_some() || args.container.is_some() {
        None
    } else {
        if words.is_empty() {
            bail!("name a pod: POD, --pid PID, --netns PATH|NAME or --container ID");
        }
        Some(words.remove(0))
    };
    Ok((
        PodArgs {
            pod,
            pid: args.pid,
            netns: args.netns.clone(),
            container: args.container.clone(),
            runtime_endpoint: args.runtime_endpoint.clone(),
            lab: args.lab.clone(),
        },
        words,
    ))
}

/// The part of a capture expression the hop probes check: its necessary protocols, networks
/// and ports (each set the kernel cannot hold whole is left to userspace).
pub fn kernel_expression(pre: &crate::pcap::PreFilter) -> crate::probes::KernelExpr {
    let protos: Vec<u8> = pre.protocols.iter().flatten().copied().collect();
    let nets: Vec<(Ipv4Addr, u32)> = pre
        .networks
        .iter()
        .flatten()
        .map(|n| (n.addr(), n.mask()))
        .collect();
    let ports: Vec<u16> = pre.ports.iter().flatten().copied().collect();
    crate::probes::KernelExpr::new(&protos, &nets, &ports)
}

pub fn run(args: CaptureArgs) -> Result<ExitCode> {
    let (pod_args, expr) = split_words(&args)?;
    let filter = if expr.is_empty() {
        None
    } else {
        Some(CaptureFilter::parse_args(&expr)?)
    };
    // The rotation flags are checked before anything is touched.
    let out = args
        .out
        .sink_options()?
        .ok_or_else(|| anyhow!("capture needs -w FILE"))?;
    // With --dst, the path through whatever the node rewrites it to (a Service's backends,
    // a masquerade): the translated packets are captured too.
    if let Some(dst) = args.dst {
        front::refuse_destination(dst)?;
    }
    let (path, nat_plan) = match args.dst {
        Some(dst) => front::resolve_nat(&pod_args, &args.remote, dst, None, None)?,
        None => (front::resolve(&pod_args, &args.remote, None)?, None),
    };
    let topo = &path.topo;
    let pod_ip = topo
        .pod_ip
        .ok_or_else(|| anyhow!("pod {} has no IPv4 address", topo.pod.name))?;
    if let Some(dst) = args.dst {
        front::refuse_directed_broadcast(topo, dst)?;
    }
    if args.dst == Some(pod_ip) {
        bail!(
            "{pod_ip} is {}'s own address: its packets to itself never leave it (the kernel delivers them over lo), so no hop sees them",
            topo.pod.name
        );
    }
    let plan = match nat_plan {
        Some(p) => p,
        None => topology::plan::build(topo, topology::plan::filter(topo, pod_ip, args.dst)),
    };
    let expression = filter
        .as_ref()
        .map(|f| kernel_expression(&f.prefilter()))
        .unwrap_or_default();
    let sink = CaptureSink::create(&out, &plan, filter, args.stop_on, args.tail)?;
    let started = path.start(
        &plan,
        &TraceOptions {
            snaplen: Some(args.out.kernel_snaplen()),
            // The files need the packets; --stop-on needs drops. FIB lookups and transmits
            // would only load the ring buffer at capture rates.
            evidence: vec![Evidence::Drop],
            mechanism: args.hooks.hooks,
            // What the kernel can check of EXPR: packets that cannot match never leave it.
            expression,
            overload: args.out.overload,
            keep_hooks: false,
        },
        args.duration,
    )?;
    eprintln!(
        "capturing {} ({pod_ip}){} on {} hops{}; kernel evidence: {}",
        topo.pod.name,
        args.dst.map(|d| format!(" ↔ {d}")).unwrap_or_default(),
        plan.hops.len(),
        if path.remote() {
            " through their nodes' agents"
        } else {
            ""
        },
        started.hooks_line()
    );
    if let Some(n) = &plan.nat {
        let to: Vec<String> = n.targets.iter().map(|t| t.label()).collect();
        eprintln!(
            "{} is rewritten on {}: its translated packets are captured too ({})",
            args.dst.map(|d| d.to_string()).unwrap_or_default(),
            n.node,
            if to.is_empty() {
                "no backend: only what reaches the node".to_owned()
            } else {
                to.join(", ")
            }
        );
    }
    for u in &path.unobserved {
        eprintln!("not observed: {u}");
    }
    eprintln!("probes live");
    crate::fault::point_on_thread("capture-attached");
    let mut capture = Capturer {
        sink,
        count: args.count,
        live: std::io::stderr().is_terminal(),
        started: Instant::now(),
        lost: 0,
    };
    let outcome = drive(
        started.session,
        started.events,
        &Until {
            duration: args.duration,
            watch: path.watch.clone(),
        },
        &mut capture,
    )?;
    for u in &outcome.unobserved {
        eprintln!("not observed: {u}");
    }
    if capture.live {
        eprint!("\r\x1b[K");
    }
    // Close the files whatever stopped us, so they are complete.
    let finished = capture.sink.finish(outcome.counters.lost);
    let stop = outcome.stop?;
    let (stats, files) = finished.context("closing the capture")?;
    if let Stop::PodGone(ns) = &stop {
        bail!(
            "pod {}'s network namespace {} is gone (deleted while capturing); {} packets kept in {} file(s)",
            topo.pod.name,
            ns.display(),
            stats.packets_written,
            files.len()
        );
    }
    if let Some((_, what)) = &capture.sink.triggered {
        eprintln!("stopped on {what} (after a {:?} tail)", args.tail);
    }
    sink::report(&stats, &files, &plan, capture.sink.not_matched());
    Ok(ExitCode::SUCCESS)
}

/// `capture`'s consumer of the event stream.
struct Capturer {
    sink: CaptureSink,
    count: Option<u64>,
    live: bool,
    started: Instant,
    lost: u64,
}

impl Consumer for Capturer {
    fn on_events(&mut self, batch: Vec<TraceEvent>) -> Result<Option<Stop>> {
        for ev in &batch {
            if let TraceEvent::Lost { total } = ev {
                self.lost = *total;
            }
            // Checked before writing too: after a stop the engine drains what the kernel still
            // holds into this consumer, and -c COUNT means COUNT packets in the files.
            if self.count.is_some_and(|c| self.sink.written >= c) {
                return Ok(Some(Stop::Count));
            }
            self.sink.on_event(ev)?;
            if self.count.is_some_and(|c| self.sink.written >= c) {
                return Ok(Some(Stop::Count));
            }
        }
        Ok(None)
    }

    fn on_tick(&mut self) -> Result<Option<Stop>> {
        let tail_done = self.sink.tick()?;
        if self.live {
            eprint!(
                "\r\x1b[K{} packets, {} bytes, {} files, {} cut, {} lost, {:.0}s",
                self.sink.written,
                self.sink.bytes,
                self.sink.files().len(),
                self.sink.cut_for_room,
                self.lost,
                self.started.elapsed().as_secs_f64()
            );
        }
        Ok(tail_done.then_some(Stop::Count))
    }
}
