//! `podtrace follow POD --dst IP`: prove hop by hop, with real packets, the path a pod's
//! traffic takes; time each hop; say where and why a packet died.
//!
//! - [`plan`]: hops to attach and the expected path, from the topology.
//! - [`session`]: the probes attached and their events decoded.
//! - [`correlate`]: one record per packet across hops, and the verdict.
//! - [`output`]: text and JSON.
pub mod correlate;
pub mod output;
pub mod plan;
pub mod session;

use std::{
    io::{IsTerminal as _, Write as _},
    net::Ipv4Addr,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use tokio::io::unix::AsyncFd;

use crate::cli::{parse_duration, parse_ipv4, parse_proto, PodArgs};
use correlate::{Correlator, PacketRecord};
use session::{Session, SessionOptions};

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
    pub out: crate::capture::OutputArgs,
    #[command(flatten)]
    pub hooks: crate::cli::HookArgs,
}

/// What made a run stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    Count,
    Duration,
    Signal(&'static str),
    /// The pod's namespace went away.
    PodGone(String),
}

/// Ends a run when it returns `Some`.
pub type Tick<'a> = dyn FnMut(&mut Session) -> Result<Option<Stop>> + 'a;
/// Takes one ring buffer record; ends the run when it returns `Some`.
pub type OnEvent<'a> = dyn FnMut(&Session, &[u8]) -> Result<Option<Stop>> + 'a;

/// Runs the event loop: feeds every decoded event to `on_event`, calls `on_tick` every 100 ms,
/// and stops on a signal, `duration`, or when a callback says so.
pub fn run_loop(
    session: &mut Session,
    duration: Option<Duration>,
    watch: Vec<PathBuf>,
    on_event: &mut OnEvent<'_>,
    on_tick: &mut Tick<'_>,
) -> Result<Stop> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the event loop")?;
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sigterm = signal(SignalKind::terminate())?;
        let ring = session
            .ring
            .take()
            .context("the event ring buffer is in use")?;
        // SAFETY: the ring buffer owns its fd and keeps it open until `into_inner` below.
        let mut fd = unsafe { AsyncFd::register(ring) }
            .map_err(|e| anyhow::anyhow!("polling the event ring buffer: {e}"))?;
        let deadline = duration.map(|d| Instant::now() + d);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let result: Result<Stop> = loop {
            tokio::select! {
                guard = fd.readable_mut() => {
                    let mut guard = guard?;
                    let mut stop = None;
                    while let Some(item) = guard.get_inner_mut().next() {
                        let bytes = item.to_vec();
                        drop(item);
                        if let Some(s) = on_event(session, &bytes)? {
                            stop = Some(s);
                            break;
                        }
                    }
                    guard.clear_ready();
                    if let Some(s) = stop { break Ok(s); }
                }
                _ = tick.tick() => {
                    if let Some(gone) = watch.iter().find(|ns| !session::netns_alive(ns)) {
                        break Ok(Stop::PodGone(gone.display().to_string()));
                    }
                    if let Some(s) = on_tick(session)? { break Ok(s); }
                    if deadline.is_some_and(|d| Instant::now() >= d) { break Ok(Stop::Duration); }
                }
                _ = sigint.recv() => break Ok(Stop::Signal("SIGINT")),
                _ = sigterm.recv() => break Ok(Stop::Signal("SIGTERM")),
            }
        };
        let mut ring = fd.into_inner();
        // Whatever is still in the ring buffer belongs to the run.
        while let Some(item) = ring.next() {
            let bytes = item.to_vec();
            drop(item);
            on_event(session, &bytes)?;
        }
        session.ring = Some(ring);
        result
    })
}

pub fn run(args: FollowArgs) -> Result<ExitCode> {
    let entered = Instant::now();
    let loc = args.pod.locate()?;
    let dest = crate::topology::pod::lab_pod_by_ip(args.dst, args.pod.lab.as_deref());
    let topo = crate::topology::resolve(&loc, Some(args.dst), dest.as_ref())?;
    let pod_ip = topo
        .pod_ip
        .ok_or_else(|| anyhow::anyhow!("pod {} has no IPv4 address", loc.name))?;
    let uplinks = session::node_uplinks(&topo)?;
    let plan = plan::build(&topo, uplinks);
    let resolve_ms = entered.elapsed().as_secs_f64() * 1e3;
    let mut session = Session::start(
        plan,
        pod_ip,
        Some(args.dst),
        &SessionOptions {
            proto: args.proto,
            port: args.port,
            snaplen: args.out.write.is_some().then(|| args.out.kernel_snaplen()),
            evidence: None,
            hooks: args.hooks.hooks,
        },
    )?;
    let startup = Startup {
        entered,
        resolve_ms,
    };
    follow_with(&args, &topo, &mut session, pod_ip, &loc.netns, &startup)
}

/// When `run` was entered and how long finding the pod and its path took (for the ready line;
/// the benchmark splits the start-up with them).
struct Startup {
    entered: Instant,
    resolve_ms: f64,
}

fn follow_with(
    args: &FollowArgs,
    topo: &crate::topology::Topology,
    session: &mut Session,
    pod_ip: Ipv4Addr,
    pod_netns: &std::path::Path,
    startup: &Startup,
) -> Result<ExitCode> {
    let json = args.json;
    let plan = session.plan.clone();
    let mut correlator = Correlator::new(plan.clone(), u32::from_ne_bytes(pod_ip.octets()));
    let mut records: Vec<PacketRecord> = Vec::new();
    let stdout = std::io::stdout();
    let live = !json && std::io::stderr().is_terminal();
    let started = Instant::now();

    // The announcement.
    if json {
        let ready = serde_json::json!({
            "type": "ready",
            "pod": topo.pod.name,
            "pod_ip": pod_ip.to_string(),
            "dst": args.dst.to_string(),
            "cni": topo.cni,
            "hops": plan.hops,
            "tc": session.tc_mode(),
            "kernel_hooks": session.hooks,
            "load_ms": session.times.load_ms,
            "attach_ms": session.times.attach_ms,
            // Locating the pod and resolving its path, before loading.
            "resolve_ms": startup.resolve_ms,
            // From entering `follow` to this line (resolve + load + attach + the rest).
            "ready_ms": startup.entered.elapsed().as_secs_f64() * 1e3,
        });
        writeln!(stdout.lock(), "{ready}")?;
    } else {
        println!(
            "following {} ({pod_ip}) ↔ {}: {} hops on {} ({})",
            topo.pod.name,
            args.dst,
            plan.hops.len(),
            {
                let mut nodes: Vec<&str> = plan.hops.iter().map(|h| h.node.as_str()).collect();
                nodes.dedup();
                nodes.sort();
                nodes.dedup();
                nodes.join(", ")
            },
            topo.cni
        );
        println!("hooks: {}", session.hooks_line());
        println!(
            "expected →  {}",
            plan.forward
                .iter()
                .filter_map(|s| plan
                    .hop(s.hop)
                    .map(|h| format!("{} {}", h.name, s.hook.as_str())))
                .collect::<Vec<_>>()
                .join(" > ")
        );
        eprintln!("probes live");
    }
    std::io::stdout().flush()?;

    let count = args.count;
    let emit = |records: &mut Vec<PacketRecord>, done: Vec<PacketRecord>| -> Result<()> {
        let mut out = std::io::stdout().lock();
        for r in done {
            if json {
                writeln!(out, "{}", output::packet_json(&plan, &r))?;
            } else {
                write!(out, "{}", output::packet_text(&plan, &r))?;
            }
            records.push(r);
        }
        out.flush()?;
        Ok(())
    };
    let reached = |records: &Vec<PacketRecord>| count.is_some_and(|c| records.len() as u64 >= c);

    let mut sink = match &args.out.write {
        Some(_) => Some(crate::capture::CaptureSink::create(
            &args.out,
            &plan,
            None,
            None,
            Duration::ZERO,
        )?),
        None => None,
    };
    let sink_cell = std::cell::RefCell::new(&mut sink);
    let records_cell = std::cell::RefCell::new(&mut records);
    let correlator_cell = std::cell::RefCell::new(&mut correlator);
    let stop = run_loop(
        session,
        args.duration,
        vec![pod_netns.to_path_buf()],
        &mut |s, bytes| {
            if let Some((ev, obs, data)) = s.decode(bytes) {
                if let Some(sink) = sink_cell.borrow_mut().as_mut() {
                    sink.on_event(&ev, &obs, data)?;
                }
                if let Some(closed) = correlator_cell.borrow_mut().feed(obs) {
                    emit(&mut records_cell.borrow_mut(), vec![closed])?;
                }
            }
            Ok(None)
        },
        &mut |s| {
            if let Some(sink) = sink_cell.borrow_mut().as_mut() {
                sink.tick()?;
            }
            let done = correlator_cell
                .borrow_mut()
                .flush(session::monotonic_ns(), 300_000_000);
            emit(&mut records_cell.borrow_mut(), done)?;
            if live {
                let c = s.probes.counters().unwrap_or_default();
                eprint!(
                    "\r\x1b[K{} packets, {} hop events, {} lost, {:.0}s",
                    records_cell.borrow().len(),
                    c.tc_matched,
                    c.lost,
                    started.elapsed().as_secs_f64()
                );
            }
            Ok(reached(&records_cell.borrow()).then_some(Stop::Count))
        },
    );
    if live {
        eprint!("\r\x1b[K");
    }
    let lost = session.probes.counters().map(|c| c.lost).unwrap_or(0);
    // Close the capture files whatever stopped us, so they are complete.
    let captured = sink.as_mut().map(|s| s.finish(lost)).transpose();
    let stop = stop?;
    if let Some((stats, files)) = captured.context("closing the capture")? {
        crate::capture::report(&stats, &files, &plan);
    }
    let rest = correlator.finish();
    emit(&mut records, rest)?;
    if let Stop::PodGone(ns) = &stop {
        bail!(
            "pod {}'s network namespace {ns} is gone (deleted while following); stopped",
            topo.pod.name
        );
    }
    let summary = output::summary_json(&plan, &records, &correlator.counts, lost, &session.hooks);
    if json {
        println!("{summary}");
    } else {
        print!("{}", output::summary_text(&plan, &summary));
    }
    Ok(if output::verdict_ok(&records) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
