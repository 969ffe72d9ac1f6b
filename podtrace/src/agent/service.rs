//! The agent's gRPC service: node info, resolving pods and addresses on this node, and tracing
//! sessions streamed to the client, each confined to this node and bounded in number, length
//! and bytes.
use std::{
    collections::HashMap,
    net::Ipv4Addr,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, watch, Notify};
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tonic::{Request, Response, Status};

use super::{
    boundary::NodeBoundary,
    wire::{self, pb, Half, API_VERSION, PAYLOAD_FORMAT},
};
use crate::{
    pods::{Chain, PodLocation, PodRef},
    trace::{Engine, Plan, TraceEvent, TraceOptions},
};

/// What a client may make the agent do.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_sessions: u32,
    pub max_duration: Duration,
    /// Packet bytes one session may stream.
    pub max_bytes: u64,
}

/// How the agent finds pods: the same resolver chain the command line builds.
pub type MakeChain = Arc<dyn Fn() -> Chain + Send + Sync>;

/// One running session, as `Stop` and shutdown reach it.
struct SessionCtl {
    stop: Notify,
}

#[derive(Clone)]
pub struct AgentService {
    pub node: String,
    pub boundary: NodeBoundary,
    pub chain: MakeChain,
    pub limits: Limits,
    sessions: Arc<Mutex<HashMap<String, Arc<SessionCtl>>>>,
    shutdown: watch::Receiver<bool>,
}

fn internal(e: anyhow::Error) -> Status {
    Status::internal(format!("{e:#}"))
}

fn invalid(e: anyhow::Error) -> Status {
    Status::invalid_argument(format!("{e:#}"))
}

/// Runs blocking work (netlink, eBPF loading) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("worker failed: {e}")))?
        .map_err(internal)
}

/// This machine's clocks, read together: (monotonic, realtime) in ns. The realtime clock is
/// read on both sides of the monotonic one, three times, and the tightest pair kept, so a
/// thread descheduled between two reads does not skew the pair.
pub fn clocks() -> (u64, u64) {
    let mut best = (u64::MAX, 0, 0);
    for _ in 0..3 {
        let before = crate::pcap::wall_clock_ns();
        let mono = crate::trace::run::monotonic_ns();
        let after = crate::pcap::wall_clock_ns();
        let width = after.saturating_sub(before);
        if width < best.0 {
            best = (width, mono, before + width / 2);
        }
    }
    (best.1, best.2)
}

impl AgentService {
    pub fn new(
        node: String,
        boundary: NodeBoundary,
        chain: MakeChain,
        limits: Limits,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            node,
            boundary,
            chain,
            limits,
            sessions: Arc::new(Mutex::new(HashMap::new())),
            shutdown,
        }
    }

    /// Sessions running now.
    pub fn running(&self) -> usize {
        self.sessions.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// A pod found through the chain, on this node (named by this node), or why not.
    fn local_pod(
        &self,
        chain: &Chain,
        pod: &PodRef,
    ) -> anyhow::Result<Result<PodLocation, String>> {
        let loc = match chain.lookup(pod)? {
            Ok(loc) => loc,
            Err(missing) => return Ok(Err(missing)),
        };
        if !self.boundary.contains(&loc.netns).unwrap_or(false) {
            return Ok(Err(format!(
                "{} is not on node {} (its namespace {} is another node's)",
                pod.shown(),
                self.node,
                loc.netns.display()
            )));
        }
        Ok(Ok(self.on_this_node(loc)))
    }

    /// The pod's node is this agent's: named as the agent is, its namespace this node's
    /// (kept as the resolvers gave it, a lab's `/run/netns/…` say, when they gave one).
    fn on_this_node(&self, mut loc: PodLocation) -> PodLocation {
        loc.node = self.node.clone();
        if loc.node_netns.is_none() {
            loc.node_netns = Some(self.boundary.netns.clone());
        }
        loc
    }

    fn half(&self, topology: crate::topology::Topology) -> Half {
        Half {
            node_snapshot: topology.node_snapshot().map(|s| (*s).clone()),
            pod_ip: topology.pod_ip,
            other_uplinks: topology.other_uplinks.clone(),
            interfaces: topology.interfaces.clone(),
            topology,
        }
    }
}

type TraceStream = Pin<Box<dyn Stream<Item = Result<pb::TraceMessage, Status>> + Send>>;

#[tonic::async_trait]
impl pb::agent_server::Agent for AgentService {
    async fn info(&self, _: Request<pb::InfoRequest>) -> Result<Response<pb::NodeInfo>, Status> {
        let support = crate::probes::hooks::KernelSupport::detect();
        let mut evidence = Vec::new();
        if support.tp_btf {
            evidence.push("tp_btf".to_owned());
        }
        if support.kprobes {
            evidence.push("kprobe".to_owned());
        }
        let (mono, real) = clocks();
        Ok(Response::new(pb::NodeInfo {
            api_version: API_VERSION,
            podtrace_version: env!("CARGO_PKG_VERSION").to_owned(),
            node: self.node.clone(),
            kernel: nix::sys::utsname::uname()
                .map(|u| u.release().to_string_lossy().into_owned())
                .unwrap_or_default(),
            tc_mechanism: crate::probes::tc_mode().as_str().to_owned(),
            evidence_mechanisms: evidence,
            monotonic_ns: mono,
            realtime_ns: real,
            max_sessions: self.limits.max_sessions,
            max_duration_s: self.limits.max_duration.as_secs(),
            max_bytes: self.limits.max_bytes,
            payload_format: PAYLOAD_FORMAT,
        }))
    }

    async fn resolve(
        &self,
        req: Request<pb::ResolveRequest>,
    ) -> Result<Response<pb::ResolveReply>, Status> {
        let req = req.into_inner();
        let ip = |s: &str| -> Result<Option<Ipv4Addr>, Status> {
            match s {
                "" => Ok(None),
                s => s
                    .parse::<Ipv4Addr>()
                    .map(Some)
                    .map_err(|_| Status::invalid_argument(format!("{s:?} is not an IPv4 address"))),
            }
        };
        let dst = ip(&req.dst)?;
        let from = ip(&req.from)?;
        let me = self.clone();
        let reply = blocking(move || {
            let chain = (me.chain)();
            let answer = match req.what {
                Some(pb::resolve_request::What::Pod(name)) => {
                    let pod = PodRef::parse_name(&name)?;
                    me.source_half(&chain, &pod, dst)?
                }
                Some(pb::resolve_request::What::Container(id)) => {
                    me.source_half(&chain, &PodRef::Container(id), dst)?
                }
                Some(pb::resolve_request::What::Ip(ip)) => {
                    let ip: Ipv4Addr = ip
                        .parse()
                        .map_err(|_| anyhow::anyhow!("{ip:?} is not an IPv4 address"))?;
                    match chain.by_ip(ip) {
                        Some(loc) if me.boundary.contains(&loc.netns).unwrap_or(false) => {
                            let t = crate::topology::resolve::inbound(
                                &me.on_this_node(loc),
                                &chain,
                                from,
                            )?;
                            Ok(me.half(t))
                        }
                        _ => Err(format!("no pod with address {ip} on node {}", me.node)),
                    }
                }
                None => anyhow::bail!("a resolve request names nothing"),
            };
            Ok(match answer {
                Ok(half) => pb::ResolveReply {
                    half: Some(wire::encode(&half)?),
                    missing: String::new(),
                },
                Err(missing) => pb::ResolveReply {
                    half: None,
                    missing,
                },
            })
        })
        .await?;
        Ok(Response::new(reply))
    }

    type TraceStream = TraceStream;

    async fn trace(
        &self,
        req: Request<pb::TraceRequest>,
    ) -> Result<Response<Self::TraceStream>, Status> {
        let req = req.into_inner();
        let plan: Plan = wire::decode(req.plan.as_ref(), "plan").map_err(invalid)?;
        let opts: TraceOptions = wire::decode(req.options.as_ref(), "options").map_err(invalid)?;
        plan.validate().map_err(invalid)?;
        if *self.shutdown.borrow() {
            return Err(Status::unavailable("the agent is stopping"));
        }
        // Every namespace of the plan must be this node's.
        let me = self.clone();
        let checked = plan.clone();
        blocking(move || {
            for ns in &checked.namespaces {
                me.boundary
                    .check(&ns.path, &format!("namespace of {}", ns.owner), &me.node)?;
            }
            Ok(())
        })
        .await
        .map_err(|s| Status::permission_denied(s.message().to_owned()))?;
        let duration = match req.duration_ms {
            0 => self.limits.max_duration,
            ms => Duration::from_millis(ms).min(self.limits.max_duration),
        };
        let id = crate::random::random_hex(12).map_err(internal)?;
        let ctl = Arc::new(SessionCtl {
            stop: Notify::new(),
        });
        {
            let mut sessions = self.sessions.lock().map_err(|_| Status::internal("lock"))?;
            if sessions.len() >= self.limits.max_sessions as usize {
                return Err(Status::resource_exhausted(format!(
                    "node {} runs {} sessions already (at most {})",
                    self.node,
                    sessions.len(),
                    self.limits.max_sessions
                )));
            }
            sessions.insert(id.clone(), ctl.clone());
        }
        let started = {
            let plan = plan.clone();
            blocking(move || Engine::start(&plan, &opts)).await
        };
        let (engine, events) = match started {
            Ok(s) => s,
            Err(e) => {
                self.forget(&id);
                return Err(e);
            }
        };
        let (tx, rx) = mpsc::channel::<Result<pb::TraceMessage, Status>>(16);
        let me = self.clone();
        eprintln!(
            "podtrace agent {}: session {id}: {} hops, up to {:?}",
            self.node,
            plan.hops.len(),
            duration
        );
        tokio::spawn(async move {
            let reason = me.stream(engine, events, &id, &ctl, duration, &tx).await;
            eprintln!("podtrace agent {}: session {id} ended: {reason}", me.node);
            me.forget(&id);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn stop(&self, req: Request<pb::StopRequest>) -> Result<Response<pb::StopReply>, Status> {
        let id = req.into_inner().session;
        let ctl = self
            .sessions
            .lock()
            .map_err(|_| Status::internal("lock"))?
            .get(&id)
            .cloned();
        if let Some(c) = &ctl {
            c.stop.notify_one();
        }
        Ok(Response::new(pb::StopReply {
            stopped: ctl.is_some(),
        }))
    }
}

impl AgentService {
    fn forget(&self, id: &str) {
        let last = match self.sessions.lock() {
            Ok(mut s) => s.remove(id).is_some() && s.is_empty(),
            Err(_) => false,
        };
        if last {
            crate::resident::settle();
        }
    }

    /// The source pod's half: its side, and with `dst` the route and the hops up to where the
    /// traffic leaves this node (through to the destination when it is a pod here too).
    fn source_half(
        &self,
        chain: &Chain,
        pod: &PodRef,
        dst: Option<Ipv4Addr>,
    ) -> anyhow::Result<Result<Half, String>> {
        let loc = match self.local_pod(chain, pod)? {
            Ok(l) => l,
            Err(missing) => return Ok(Err(missing)),
        };
        let dest = dst
            .and_then(|d| chain.by_ip(d))
            .filter(|d| self.boundary.contains(&d.netns).unwrap_or(false))
            .map(|d| self.on_this_node(d));
        let t = crate::topology::resolve(&loc, dst, dest.as_ref(), chain)?;
        Ok(Ok(self.half(t)))
    }

    /// Streams one session until it ends; returns why.
    async fn stream(
        &self,
        engine: Engine,
        mut events: crate::trace::Events,
        id: &str,
        ctl: &SessionCtl,
        duration: Duration,
        tx: &mpsc::Sender<Result<pb::TraceMessage, Status>>,
    ) -> String {
        use pb::trace_message::Message;
        let (mono, real) = clocks();
        let ready = wire::encode(&engine.info).map(|started| pb::TraceMessage {
            message: Some(Message::Ready(pb::Ready {
                session: id.to_owned(),
                started: Some(started),
                monotonic_ns: mono,
                realtime_ns: real,
            })),
        });
        let mut reason = match ready {
            Ok(m) => match tx.send(Ok(m)).await {
                Ok(()) => None,
                Err(_) => Some("the client went away".to_owned()),
            },
            Err(e) => Some(format!("error: {e:#}")),
        };
        let deadline = tokio::time::Instant::now() + duration;
        let mut shutdown = self.shutdown.clone();
        let mut bytes = 0u64;
        let started = Instant::now();
        while reason.is_none() {
            tokio::select! {
                batch = events.recv() => match batch {
                    Some(batch) => {
                        bytes += batch_bytes(&batch);
                        match wire::encode(&batch) {
                            Ok(p) => {
                                let m = pb::TraceMessage { message: Some(Message::Events(p)) };
                                if tx.send(Ok(m)).await.is_err() {
                                    reason = Some("the client went away".into());
                                }
                            }
                            Err(e) => reason = Some(format!("error: {e:#}")),
                        }
                        if bytes > self.limits.max_bytes {
                            reason = Some(format!(
                                "limit: {bytes} packet bytes (this agent allows {} per session)",
                                self.limits.max_bytes
                            ));
                        }
                    }
                    None => reason = Some("error: the event reader stopped".into()),
                },
                _ = tx.closed() => reason = Some("the client went away".into()),
                _ = tokio::time::sleep_until(deadline) => reason = Some(format!(
                    "duration ({:.0} s)", started.elapsed().as_secs_f64()
                )),
                _ = ctl.stop.notified() => reason = Some("stopped".into()),
                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => {
                    reason = Some("the agent is stopping".into())
                }
            }
        }
        let reason = reason.unwrap_or_default();
        // Hand over what the kernel still holds (if anyone listens), then detach.
        engine.stop();
        while let Some(batch) = events.recv().await {
            if tx.is_closed() {
                continue;
            }
            if let Ok(p) = wire::encode(&batch) {
                let _ = tx
                    .send(Ok(pb::TraceMessage {
                        message: Some(Message::Events(p)),
                    }))
                    .await;
            }
        }
        let counters = tokio::task::spawn_blocking(move || engine.finish()).await;
        let counters = match counters {
            Ok(Ok(c)) => wire::encode(&c).ok(),
            _ => None,
        };
        let _ = tx
            .send(Ok(pb::TraceMessage {
                message: Some(Message::End(pb::End {
                    reason: reason.clone(),
                    counters,
                })),
            }))
            .await;
        reason
    }
}

/// Packet bytes a batch carries.
fn batch_bytes(batch: &[TraceEvent]) -> u64 {
    batch
        .iter()
        .map(|e| match e {
            TraceEvent::Hop(h) => h.packet.as_ref().map_or(0, |p| p.len() as u64),
            _ => 0,
        })
        .sum()
}

/// The node's own namespace path, for the boundary.
pub fn own_netns() -> PathBuf {
    PathBuf::from(format!("/proc/{}/ns/net", std::process::id()))
}
