//! The tracing engine: a [`Plan`] in, a stream of typed events out.
//!
//! [`Engine::start`] loads the eBPF programs, sets the flow filter, attaches the hop probes on
//! every hop of the plan and the kernel-side evidence probes (drops, FIB lookups, device
//! transmit), and starts a reader thread that decodes the ring buffer into [`TraceEvent`]s,
//! sent in batches on the returned [`Events`] channel. [`Engine::stop`] asks the reader to
//! drain what is left and end the stream; [`Engine::finish`] then detaches everything and
//! gives the final counters. That is the whole interface: `follow` correlates the events,
//! `capture` writes their packets, `verify` judges them, and a node agent streams them to a
//! front end on another machine (plan and events are serde types).
//!
//! - [`plan`]: the input (hops, expected paths, flow filter) and options.
//! - [`event`]: the output.
//! - [`decode`]: ring buffer records → events.
//! - [`run`]: the loop most consumers want (signals, duration, the pod's namespace going away).
pub mod decode;
pub mod event;
pub mod nat;
pub mod plan;
pub mod run;

use std::{
    os::fd::AsRawFd as _,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context as _, Result};
use aya::maps::{MapData, RingBuf};
use serde::{Deserialize, Serialize};

use crate::probes::{
    hooks::{Evidence, HookReport},
    idle::IdleHooks,
    nat::NatFlows,
    CounterReader, FilterSpec, HopTarget, Probes,
};
pub use event::{Counters, TraceEvent};
pub use plan::{Overload, Plan, TraceOptions};

/// Batches of events, in the order the kernel produced them.
pub type Events = tokio::sync::mpsc::Receiver<Vec<TraceEvent>>;

/// Batches waiting for the consumer. A consumer that falls behind blocks the reader, the
/// kernel's ring buffer fills and the kernel counts what it could not hand over
/// ([`Counters::lost`], [`TraceEvent::Lost`]): nothing grows without bound.
const QUEUE_BATCHES: usize = 16;
/// Events per batch at most.
const BATCH: usize = 512;
/// Packet bytes per batch at most (capture sessions): with [`QUEUE_BATCHES`], at most 4 MiB
/// of packets wait between the reader and the consumer.
const BATCH_BYTES: usize = 256 << 10;
/// The kernel wakes the reader once this fraction of the ring buffer waits; below it the
/// reader looks every [`POLL`]. Few wake-ups under load, events late by at most one poll.
const WAKE_FRACTION: u32 = 8;
/// How often the reader looks at the ring buffer without a wake-up (events, stop requests).
const POLL: Duration = Duration::from_millis(20);
/// How often the kernel's loss counter is looked at.
const LOSS_EVERY: Duration = Duration::from_millis(100);
/// How often the counters go out on the stream.
const COUNTERS_EVERY: Duration = Duration::from_secs(1);

/// What started: the mechanisms used and how long it took.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartInfo {
    /// How the hop probes are attached: `tcx` (6.6+) or `clsact`.
    pub tc: Option<crate::probes::TcMode>,
    /// The kernel-side evidence probes and how each was attached.
    pub hooks: Vec<HookReport>,
    /// Loading the eBPF object (ms).
    pub load_ms: f64,
    /// Configuring and attaching everything (ms).
    pub attach_ms: f64,
}

impl StartInfo {
    /// `tc via tcx, drops via tp_btf:kfree_skb, fib via …`.
    pub fn hooks_line(&self) -> String {
        let tc = match self.tc {
            Some(crate::probes::TcMode::Tcx) => "tc via tcx",
            Some(crate::probes::TcMode::Clsact) => "tc via clsact",
            None => "tc: none",
        };
        std::iter::once(tc.to_owned())
            .chain(self.hooks.iter().map(HookReport::summary))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A running session. Dropping it without [`Engine::finish`] detaches everything too.
pub struct Engine {
    probes: Option<Probes>,
    /// `NAT_FLOWS`, for [`Engine::nat_flows`].
    nat_flows: Option<NatFlows>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<Result<Counters>>>,
    pub info: StartInfo,
}

impl Engine {
    /// Attaches everything the plan asks for and starts reading. Fails (with everything
    /// detached again) when an interface of the plan is missing or a probe cannot attach.
    pub fn start(plan: &Plan, opts: &TraceOptions) -> Result<(Engine, Events)> {
        plan.validate()?;
        let t0 = Instant::now();
        let ring_bytes = crate::probes::ring_bytes(opts.snaplen);
        let mut probes = Probes::load_with_ring(ring_bytes)?;
        let load_ms = t0.elapsed().as_secs_f64() * 1e3;
        let t1 = Instant::now();
        let f = &plan.filter;
        let (vxlan_port, vxlan_more) = vxlan_ports(&f.vxlan_ports)?;
        probes.set_filter(FilterSpec {
            a: Some(f.pod),
            b: f.peer,
            proto: f.proto,
            port: f.port,
            emit: true,
            vxlan_port,
            vxlan_more,
            nat: !f.nat.is_empty(),
            snaplen: opts.snaplen,
            cut: opts.overload == plan::Overload::Cut
                && opts
                    .snaplen
                    .is_some_and(|s| s == 0 || s > podtrace_abi::CUT_BYTES),
            wake_bytes: ring_bytes / WAKE_FRACTION,
            expression: opts.expression,
        })?;
        let mut nat = probes.nat_flows()?;
        for flow in &f.nat {
            nat.insert(flow)?;
        }
        // Namespaces by inode number (`net->ns.inum`): what the probes report on every kernel.
        let mut cookies = Vec::with_capacity(plan.namespaces.len());
        for ns in &plan.namespaces {
            cookies.push(crate::probes::netns_id(Some(&ns.path)).with_context(|| {
                format!("network namespace {} of {}", ns.path.display(), ns.owner)
            })?);
        }
        let targets: Vec<HopTarget> = plan
            .hops
            .iter()
            .map(|hop| HopTarget {
                netns: Some(plan.namespaces[hop.ns].path.clone()),
                ifname: hop.ifname.clone(),
                hop_id: hop.id,
            })
            .collect();
        probes.prepare_kernel_hooks(opts.mechanism, &opts.evidence);
        if !opts.keep_hooks {
            probes.detach_when_idle(&[Evidence::Fib, Evidence::Xmit]);
        }
        probes.attach_hops(&targets).map_err(|e| {
            // Name the hop as the plan does when the error names its interface.
            match plan
                .hops
                .iter()
                .zip(&targets)
                .find(|(_, t)| format!("{e:#}").contains(&t.place()))
            {
                Some((hop, _)) => e.context(format!("attaching to {}", hop.name)),
                None => e.context("attaching the hop probes"),
            }
        })?;
        crate::signals::check()?;
        let hooks = probes.attach_kernel_hooks(opts.mechanism, &opts.evidence)?;
        let idle = probes.take_idle_hooks()?;
        let settled = probes.settle();
        let tc_mode = probes.tc_mode();
        let decoder = decode::Decoder::new(
            &cookies,
            plan.hops.iter().map(|h| h.id),
            probes.drop_reasons().all().map(|(v, n)| (v, n.to_owned())),
        );
        let ring = probes.take_events_map()?;
        let nat_flows = probes.nat_flows()?;
        let counters = probes.counter_reader()?;
        let attach_ms = t1.elapsed().as_secs_f64() * 1e3;
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE_BATCHES);
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("podtrace-events".into())
                .spawn(move || {
                    // The ring counts twice its size once mapped: map it after the start's
                    // memory is handed back (see `resident`), off the start's path.
                    if let Some(h) = settled {
                        let _ = h.join();
                    }
                    let ring = RingBuf::try_from(ring).context("mapping the event ring")?;
                    read_loop(ring, counters, decoder, idle, tx, stop)
                })
                .context("starting the event reader")?
        };
        Ok((
            Engine {
                probes: Some(probes),
                nat_flows: Some(nat_flows),
                stop,
                reader: Some(reader),
                info: StartInfo {
                    tc: tc_mode,
                    hooks,
                    load_ms,
                    attach_ms,
                },
            },
            rx,
        ))
    }

    /// The handle that widens the kernel filter to more translated forms of the conversation
    /// while the engine runs (conntrack answers: a backend or masquerade address the plan did
    /// not know). Once.
    pub fn nat_flows(&mut self) -> Option<NatFlows> {
        self.nat_flows.take()
    }

    /// Asks the reader to hand over what the kernel still holds and end the stream. Keep
    /// receiving until the stream ends, then call [`Engine::finish`].
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Detaches every probe and returns the final counters. Call it after the stream ended
    /// (or it stops the reader itself, dropping what was not received).
    pub fn finish(mut self) -> Result<Counters> {
        self.stop();
        let counters = match self.reader.take() {
            Some(r) => r
                .join()
                .map_err(|_| anyhow!("the event reader panicked"))??,
            None => Counters::default(),
        };
        drop(self.probes.take());
        Ok(counters)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
        // The probes detach as they drop; the reader ends at its next wake-up.
    }
}

/// The filter's VXLAN ports: the first and the others (every VXLAN device's own port on the
/// path: flannel's 8472, Linux's 4789…).
fn vxlan_ports(ports: &[u16]) -> Result<(u16, [u16; podtrace_abi::MAX_VXLAN_PORTS - 1])> {
    let mut all: Vec<u16> = ports.iter().copied().filter(|p| *p != 0).collect();
    all.sort_unstable();
    all.dedup();
    if all.len() > podtrace_abi::MAX_VXLAN_PORTS {
        anyhow::bail!(
            "plan: {} VXLAN ports ({:?}); the kernel filter looks inside at most {}",
            all.len(),
            all,
            podtrace_abi::MAX_VXLAN_PORTS
        );
    }
    let first = all
        .first()
        .copied()
        .unwrap_or(podtrace_abi::DEFAULT_VXLAN_PORT);
    let mut more = [0u16; podtrace_abi::MAX_VXLAN_PORTS - 1];
    for (slot, p) in more.iter_mut().zip(all.iter().skip(1)) {
        *slot = *p;
    }
    Ok((first, more))
}

/// The reader thread: poll the ring buffer, decode, send batches; report losses and
/// counters; on a stop request drain the ring and end.
fn read_loop(
    mut ring: RingBuf<MapData>,
    counters: CounterReader,
    decoder: decode::Decoder,
    mut idle: Option<IdleHooks>,
    tx: tokio::sync::mpsc::Sender<Vec<TraceEvent>>,
    stop: Arc<AtomicBool>,
) -> Result<Counters> {
    let fd = ring.as_raw_fd();
    let mut lost_reported = 0u64;
    let mut last_counters = Instant::now();
    let mut last_read = Instant::now();
    let mut batch: Vec<TraceEvent> = Vec::with_capacity(BATCH);
    let mut batch_bytes = 0usize;
    let mut arena = decode::Arena::default();
    let send = |batch: &mut Vec<TraceEvent>, batch_bytes: &mut usize| -> bool {
        if batch.is_empty() {
            return true;
        }
        *batch_bytes = 0;
        let full = std::mem::replace(batch, Vec::with_capacity(BATCH));
        tx.blocking_send(full).is_ok()
    };
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        if !stopping {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd; the ring buffer keeps its fd open.
            unsafe { libc::poll(&mut pfd, 1, POLL.as_millis() as libc::c_int) };
        }
        while let Some(item) = ring.next() {
            if let Some(ev) = decoder.decode(&item, &mut arena) {
                batch_bytes += ev.packet_len();
                batch.push(ev);
            }
            drop(item);
            let full = batch.len() >= BATCH || batch_bytes >= BATCH_BYTES;
            if full && !send(&mut batch, &mut batch_bytes) {
                return counters.read();
            }
        }
        if let Some(Err(e)) = idle.as_mut().map(IdleHooks::tick) {
            eprintln!("podtrace: {e:#}; route lookups and transmits are not traced from now on");
            idle = None;
        }
        let now = Instant::now();
        let due = now.duration_since(last_counters) >= COUNTERS_EVERY;
        if due || stopping || now.duration_since(last_read) >= LOSS_EVERY {
            last_read = now;
            let c = counters.read()?;
            if c.lost > lost_reported {
                lost_reported = c.lost;
                batch.push(TraceEvent::Lost { total: c.lost });
            }
            if due || stopping {
                last_counters = now;
                batch.push(TraceEvent::Counters(c));
            }
        }
        if !send(&mut batch, &mut batch_bytes) || stopping {
            return counters.read();
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_vxlan_port_reaches_the_filter() {
        let (first, more) = super::vxlan_ports(&[8472, 4789, 8472, 0]).unwrap();
        assert_eq!(first, 4789);
        assert_eq!(more[0], 8472);
        assert!(more[1..].iter().all(|p| *p == 0));
        let (first, _) = super::vxlan_ports(&[]).unwrap();
        assert_eq!(first, podtrace_abi::DEFAULT_VXLAN_PORT);
        let many: Vec<u16> = (1..=9).collect();
        assert!(super::vxlan_ports(&many).is_err());
    }
}
