//! `podtrace capture` and `follow -w`: the hop programs' packet bytes written to rotating
//! pcapng/pcap files, one interface per hop, for intermittent faults.
//!
//! Packets are cut in the kernel to the snap length (whole packets by default, up to 64 KiB;
//! a longer GSO packet keeps its original length in the record). The capture filter (EXPR, in
//! tcpdump's language) is applied here on the inner headers of VXLAN-carried packets.
use std::{
    collections::HashMap,
    io::IsTerminal as _,
    net::Ipv4Addr,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use podtrace_abi::{Event, KIND_DROP, KIND_TC, MAX_SNAPLEN};

use crate::{
    cli::{parse_duration, parse_ipv4, PodArgs},
    follow::{
        correlate::{after_delivery, Observation, Seen},
        plan::{self, Hook, Plan},
        run_loop,
        session::{self, Session, SessionOptions},
        Stop,
    },
    pcap::{
        wall_clock_ns, CaptureFilter, CaptureFormat, CaptureWriter, Direction, HopDesc,
        RotationPolicy, Stats, WriterOptions,
    },
};

/// Output flags shared by `capture` and `follow -w`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct OutputArgs {
    /// Write packets to FILE (pcapng unless --format pcap).
    #[arg(short = 'w', value_name = "FILE")]
    pub write: Option<PathBuf>,
    /// Rotate when a file would exceed MB million bytes.
    #[arg(short = 'C', value_name = "MB", requires = "write")]
    pub file_size: Option<u64>,
    /// Rotate every DUR (90, 90s, 10m, 1h); FILE may hold strftime patterns.
    #[arg(short = 'G', value_name = "DUR", value_parser = parse_duration, requires = "write")]
    pub rotate_every: Option<Duration>,
    /// Keep at most N files, as a ring (the oldest is overwritten).
    #[arg(short = 'W', value_name = "N", requires = "write")]
    pub file_count: Option<u32>,
    /// pcapng (default: one interface per hop, direction per packet) or pcap.
    #[arg(
        long,
        value_name = "pcapng|pcap",
        default_value = "pcapng",
        requires = "write"
    )]
    pub format: CaptureFormat,
    /// Bytes of each packet to keep (0 or unset: whole packets, up to 65536).
    #[arg(short = 's', value_name = "SNAPLEN", requires = "write")]
    pub snaplen: Option<u32>,
}

impl OutputArgs {
    /// The snap length the kernel applies.
    pub fn kernel_snaplen(&self) -> u32 {
        match self.snaplen {
            None | Some(0) => MAX_SNAPLEN,
            Some(n) => n.min(MAX_SNAPLEN),
        }
    }
}

/// `--stop-on`: stop shortly after the first such event, keeping the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StopOn {
    /// The kernel drops a packet of the conversation.
    Drop,
    /// A TCP reset is seen.
    Rst,
}

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
}

/// Writes the packets of a session's events.
pub struct CaptureSink {
    writer: Option<CaptureWriter>,
    filter: Option<CaptureFilter>,
    /// Plan hop id → writer interface index.
    index: HashMap<u32, usize>,
    /// Wall clock minus the kernel's monotonic clock.
    wall_offset: i128,
    pub written: u64,
    pub bytes: u64,
    stop_on: Option<StopOn>,
    tail: Duration,
    /// When the stop event was seen, and what it was.
    pub triggered: Option<(Instant, String)>,
}

impl CaptureSink {
    pub fn create(
        out: &OutputArgs,
        plan: &Plan,
        filter: Option<CaptureFilter>,
        stop_on: Option<StopOn>,
        tail: Duration,
    ) -> Result<Self> {
        let path = out
            .write
            .clone()
            .ok_or_else(|| anyhow!("-w FILE is required"))?;
        let policy = RotationPolicy::from_flags(out.file_size, out.rotate_every, out.file_count)?;
        let hops: Vec<HopDesc> = plan
            .hops
            .iter()
            .map(|h| {
                HopDesc::new(&h.owner, &h.ifname)
                    .with_ifindex(h.ifindex)
                    .with_netns(h.netns.clone())
                    .with_comment(format!(
                        "{} on {}{}",
                        h.role,
                        h.node,
                        if h.on_path {
                            ""
                        } else {
                            " (watched, off the path)"
                        }
                    ))
            })
            .collect();
        let index = plan
            .hops
            .iter()
            .enumerate()
            .map(|(i, h)| (h.id, i))
            .collect();
        eprintln!("podtrace: {}", policy.describe(&path));
        let writer = CaptureWriter::create_with(
            path,
            out.format,
            policy,
            out.kernel_snaplen(),
            hops,
            WriterOptions {
                filter: filter.as_ref().map(|f| f.text().to_owned()),
                ..WriterOptions::default()
            },
        )?;
        let wall_offset = wall_clock_ns() as i128 - session::monotonic_ns() as i128;
        Ok(Self {
            writer: Some(writer),
            filter,
            index,
            wall_offset,
            written: 0,
            bytes: 0,
            stop_on,
            tail,
            triggered: None,
        })
    }

    fn writer(&mut self) -> Result<&mut CaptureWriter> {
        self.writer
            .as_mut()
            .ok_or_else(|| anyhow!("the capture was finished"))
    }

    /// Takes one decoded event: writes its packet (if it has one and passes the filter) and
    /// checks the stop condition.
    pub fn on_event(&mut self, ev: &Event, obs: &Observation, data: &[u8]) -> Result<()> {
        if ev.kind == KIND_DROP {
            if let (
                Some(StopOn::Drop),
                None,
                Seen::Drop {
                    location, reason, ..
                },
            ) = (self.stop_on, &self.triggered, &obs.seen)
            {
                if !after_delivery(reason) {
                    self.triggered =
                        Some((Instant::now(), format!("drop at {location}: {reason}")));
                }
            }
            return Ok(());
        }
        if ev.kind != KIND_TC || data.is_empty() {
            return Ok(());
        }
        let Seen::Tc { hop, hook } = obs.seen else {
            return Ok(());
        };
        if let Some(f) = &self.filter {
            if !f.matches(&crate::pcap::parse_ethernet(data)) {
                return Ok(());
            }
        }
        if self.stop_on == Some(StopOn::Rst)
            && self.triggered.is_none()
            && ev.flow.proto == 6
            && ev.flow.flags & 0x04 != 0
        {
            self.triggered = Some((Instant::now(), "TCP reset".into()));
        }
        let Some(&i) = self.index.get(&hop) else {
            return Ok(());
        };
        let dir = match hook {
            Hook::Ingress => Direction::Inbound,
            Hook::Egress => Direction::Outbound,
            Hook::Bridged => Direction::Unknown,
        };
        let ts = (ev.ts_ns as i128 + self.wall_offset).max(0) as u64;
        self.writer()?.write(i, dir, ts, ev.skb_len, data)?;
        self.written += 1;
        self.bytes += data.len() as u64;
        Ok(())
    }

    /// Time-based rotation while idle; whether the --stop-on tail has passed.
    pub fn tick(&mut self) -> Result<bool> {
        self.writer()?.tick(wall_clock_ns())?;
        Ok(self
            .triggered
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() >= self.tail))
    }

    pub fn files(&self) -> Vec<PathBuf> {
        self.writer
            .as_ref()
            .map(|w| w.files().to_vec())
            .unwrap_or_default()
    }

    /// Records the events lost before they reached us, closes the last file.
    pub fn finish(&mut self, lost: u64) -> Result<(Stats, Vec<PathBuf>)> {
        let mut w = self
            .writer
            .take()
            .ok_or_else(|| anyhow!("the capture was finished"))?;
        if lost > 0 {
            w.add_lost_unattributed(lost);
        }
        let files = w.files().to_vec();
        let stats = w.finish()?;
        Ok((stats, files))
    }
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

pub fn run(args: CaptureArgs) -> Result<ExitCode> {
    if args.out.write.is_none() {
        bail!("capture needs -w FILE");
    }
    let (pod_args, expr) = split_words(&args)?;
    let filter = if expr.is_empty() {
        None
    } else {
        Some(CaptureFilter::parse_args(&expr)?)
    };
    // Validate the rotation flags before touching anything.
    RotationPolicy::from_flags(
        args.out.file_size,
        args.out.rotate_every,
        args.out.file_count,
    )?;
    let loc = pod_args.locate()?;
    let dest = args
        .dst
        .and_then(|ip| crate::topology::pod::lab_pod_by_ip(ip, args.lab.as_deref()));
    let topo = crate::topology::resolve(&loc, args.dst, dest.as_ref())?;
    let pod_ip = topo
        .pod_ip
        .ok_or_else(|| anyhow!("pod {} has no IPv4 address", loc.name))?;
    let uplinks = session::node_uplinks(&topo)?;
    let plan = plan::build(&topo, uplinks);
    let mut sink = CaptureSink::create(&args.out, &plan, filter, args.stop_on, args.tail)?;
    let mut session = Session::start(
        plan,
        pod_ip,
        args.dst,
        &SessionOptions {
            snaplen: Some(args.out.kernel_snaplen()),
            // The files need the packets; --stop-on needs drops. FIB lookups and transmits
            // would only load the ring buffer at capture rates.
            evidence: Some(vec![crate::probes::hooks::Evidence::Drop]),
            hooks: args.hooks.hooks,
            ..SessionOptions::default()
        },
    )?;
    eprintln!(
        "capturing {} ({pod_ip}){} on {} hops; hooks: {}",
        topo.pod.name,
        args.dst.map(|d| format!(" ↔ {d}")).unwrap_or_default(),
        session.plan.hops.len(),
        session.hooks_line()
    );
    eprintln!("probes live");
    let live = std::io::stderr().is_terminal();
    let started = Instant::now();
    let count = args.count;
    let sink_cell = std::cell::RefCell::new(&mut sink);
    let stop = run_loop(
        &mut session,
        args.duration,
        vec![loc.netns.clone()],
        &mut |s, bytes| {
            if let Some((ev, obs, data)) = s.decode(bytes) {
                let mut sink = sink_cell.borrow_mut();
                sink.on_event(&ev, &obs, data)?;
                if count.is_some_and(|c| sink.written >= c) {
                    return Ok(Some(Stop::Count));
                }
            }
            Ok(None)
        },
        &mut |s| {
            let mut sink = sink_cell.borrow_mut();
            let tail_done = sink.tick()?;
            if live {
                let lost = s.probes.counters().map(|c| c.lost).unwrap_or(0);
                eprint!(
                    "\r\x1b[K{} packets, {} bytes, {} files, {} lost, {:.0}s",
                    sink.written,
                    sink.bytes,
                    sink.files().len(),
                    lost,
                    started.elapsed().as_secs_f64()
                );
            }
            Ok(tail_done.then_some(Stop::Count))
        },
    );
    if live {
        eprint!("\r\x1b[K");
    }
    let lost = session.probes.counters().map(|c| c.lost).unwrap_or(0);
    // Close the files whatever stopped us, so they are complete.
    let finished = sink.finish(lost);
    let stop = stop?;
    let (stats, files) = finished.context("closing the capture")?;
    if let Stop::PodGone(ns) = &stop {
        bail!(
            "pod {}'s network namespace {ns} is gone (deleted while capturing); {} packets kept in {} file(s)",
            topo.pod.name,
            stats.packets_written,
            files.len()
        );
    }
    if let Some((_, what)) = &sink.triggered {
        eprintln!("stopped on {what} (after a {:?} tail)", args.tail);
    }
    report(&stats, &files, &session.plan);
    Ok(ExitCode::SUCCESS)
}

/// The end-of-run report (stderr, as tcpdump's).
pub fn report(stats: &Stats, files: &[PathBuf], plan: &Plan) {
    eprintln!(
        "{} packets written ({} truncated), {} lost before reaching the writer",
        stats.packets_written, stats.packets_truncated, stats.lost
    );
    for (i, h) in plan.hops.iter().enumerate() {
        if let Some(n) = stats.packets_per_hop.get(i) {
            eprintln!("    {:<28} {n}", h.name);
        }
    }
    eprintln!(
        "{} file(s) kept{}:",
        files.len(),
        if stats.files_deleted > 0 {
            format!(" ({} older ones rotated out)", stats.files_deleted)
        } else {
            String::new()
        }
    );
    for f in files {
        eprintln!("    {}", f.display());
    }
}
