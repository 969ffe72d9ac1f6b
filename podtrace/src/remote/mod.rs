//! The front end of a session that spans nodes: `podtrace follow|capture|topo|verify eni …
//! --agents NODE=ENDPOINT,…`. It asks each node's agent for its half of the pod's path,
//! stitches the whole path (the same expected path a single process finds in the lab), runs
//! one engine per node, and merges their event streams into one: hop ids and namespaces in the
//! whole plan's terms, timestamps on this machine's clock. What no agent could observe is
//! named, never guessed.
//!
//! - [`connect`]: endpoints, credentials, the connection.
pub mod connect;

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::{
    agent::wire::{self, pb, Half, API_VERSION},
    pods::PodRef,
    topology::{Role, Topology},
    trace::{
        event::Counters,
        plan::{Plan, PlanNamespace, PlannedHop, Step},
        run::Session,
        Events, StartInfo, TraceEvent, TraceOptions,
    },
};
pub use connect::{AgentSpec, Credentials, Dialer, Endpoint};

/// The agents of a session, as a file (`--agents-config`; the lab writes one).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentsConfig {
    pub agents: Vec<AgentSpec>,
    #[serde(default)]
    pub credentials: Credentials,
    /// Opens the streams of port-forward endpoints (`kubectl podtrace`; not in the file).
    #[serde(skip)]
    pub dialer: Option<Dialer>,
}

impl AgentsConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the agents file {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not an agents file", path.display()))
    }
}

/// Parses `NODE=ENDPOINT[,NODE=ENDPOINT…]`.
pub fn parse_agents(s: &str) -> Result<Vec<AgentSpec>> {
    let mut out: Vec<AgentSpec> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (node, ep) = part
            .split_once('=')
            .ok_or_else(|| anyhow!("--agents: {part:?} is not NODE=ENDPOINT"))?;
        if node.is_empty() {
            bail!("--agents: {part:?} names no node");
        }
        if out.iter().any(|a| a.node == node) {
            bail!("--agents: node {node} given twice");
        }
        out.push(AgentSpec {
            node: node.to_owned(),
            endpoint: Endpoint::parse(ep).with_context(|| format!("--agents {node}"))?,
            via_netns: None,
        });
    }
    if out.is_empty() {
        bail!("--agents names no agent");
    }
    Ok(out)
}

/// A connected agent.
pub struct Agent {
    pub node: String,
    pub info: pb::NodeInfo,
    client: connect::Client,
}

/// The agents of a session, and those that could not be reached.
pub struct Fleet {
    rt: tokio::runtime::Runtime,
    pub agents: Vec<Agent>,
    /// (node, why) for every agent not reached.
    pub unreachable: Vec<(String, String)>,
}

/// A status from an agent, on one line.
fn status_line(s: &tonic::Status) -> String {
    let m = s.message().lines().next().unwrap_or("").trim();
    match s.code() {
        tonic::Code::Unauthenticated => format!("refused: {m}"),
        tonic::Code::PermissionDenied => format!("refused: {m}"),
        tonic::Code::Unavailable if m.is_empty() => "unavailable".into(),
        _ if m.is_empty() => format!("{:?}", s.code()),
        _ => m.to_owned(),
    }
}

/// A path stitched from the agents' halves.
pub struct Resolved {
    pub topology: Topology,
    /// Nodes whose part of the path could not be observed, and why.
    pub unobserved: Vec<String>,
}

impl Fleet {
    /// Connects to every agent (in parallel) and checks its API version. An unreachable agent
    /// is noted; a version mismatch is an error.
    pub fn connect(cfg: &AgentsConfig) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the front end's runtime")?;
        let results = rt.block_on(async {
            let tasks: Vec<_> = cfg
                .agents
                .iter()
                .map(|spec| {
                    let spec = spec.clone();
                    let creds = cfg.credentials.clone();
                    let dialer = cfg.dialer.clone();
                    tokio::spawn(async move {
                        let r = async {
                            let mut client =
                                connect::connect(&spec, &creds, dialer.as_ref()).await?;
                            let info = tokio::time::timeout(
                                connect::CONNECT_TIMEOUT,
                                client.info(pb::InfoRequest {}),
                            )
                            .await
                            .map_err(|_| {
                                anyhow!("no answer within {:?}", connect::CONNECT_TIMEOUT)
                            })?
                            .map_err(|s| anyhow!("{}", status_line(&s)))?
                            .into_inner();
                            anyhow::Ok((client, info))
                        }
                        .await;
                        (spec, r)
                    })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await);
            }
            out
        });
        let mut agents = Vec::new();
        let mut unreachable = Vec::new();
        for r in results {
            let (spec, r) = r.map_err(|e| anyhow!("connecting: {e}"))?;
            match r {
                Ok((client, info)) => {
                    if info.api_version != API_VERSION {
                        bail!(
                            "the agent of node {} speaks API v{} (podtrace {}), this podtrace v{API_VERSION} ({}): run the same version on both sides",
                            spec.node,
                            info.api_version,
                            info.podtrace_version,
                            env!("CARGO_PKG_VERSION")
                        );
                    }
                    if info.node != spec.node {
                        log::warn!(
                            "the agent at {} says it is node {}, not {}",
                            spec.endpoint,
                            info.node,
                            spec.node
                        );
                    }
                    agents.push(Agent {
                        node: spec.node.clone(),
                        info,
                        client,
                    })
                }
                Err(e) => unreachable.push((spec.node.clone(), format!("{e:#}"))),
            }
        }
        if agents.is_empty() {
            bail!(
                "no agent reachable: {}",
                unreachable
                    .iter()
                    .map(|(n, e)| format!("{n}: {e}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
        Ok(Self {
            rt,
            agents,
            unreachable,
        })
    }

    /// Asks every agent the same question; (node, answer) each.
    fn ask_all(
        &self,
        req: pb::ResolveRequest,
    ) -> Vec<(String, std::result::Result<pb::ResolveReply, String>)> {
        self.rt.block_on(async {
            let tasks: Vec<_> = self
                .agents
                .iter()
                .map(|a| {
                    let mut c = a.client.clone();
                    let req = req.clone();
                    let node = a.node.clone();
                    tokio::spawn(async move {
                        let r = match tokio::time::timeout(Duration::from_secs(30), c.resolve(req))
                            .await
                        {
                            Ok(Ok(r)) => Ok(r.into_inner()),
                            Ok(Err(s)) => Err(status_line(&s)),
                            Err(_) => Err("no answer within 30 s".into()),
                        };
                        (node, r)
                    })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                if let Ok(r) = t.await {
                    out.push(r);
                }
            }
            out
        })
    }

    /// The one half some agent has; an error naming what each said otherwise.
    fn one_half(
        &self,
        answers: Vec<(String, std::result::Result<pb::ResolveReply, String>)>,
        what: &str,
    ) -> Result<std::result::Result<Half, Vec<String>>> {
        let mut found = Vec::new();
        let mut said = Vec::new();
        for (node, a) in answers {
            match a {
                Ok(r) if r.half.is_some() => {
                    let mut h: Half = wire::decode(r.half.as_ref(), "a node's half of the path")
                        .with_context(|| format!("node {node}'s answer"))?;
                    // A hop's namespace travels as its path's text.
                    for hop in h.topology.hops.iter_mut().chain(h.other_uplinks.iter_mut()) {
                        hop.netns_path = PathBuf::from(&hop.netns);
                    }
                    found.push((node, h));
                }
                Ok(r) => said.push(format!("{node}: {}", r.missing)),
                Err(e) => said.push(format!("{node}: {e}")),
            }
        }
        for (n, e) in &self.unreachable {
            said.push(format!("{n}: no agent ({e})"));
        }
        match found.len() {
            0 => Ok(Err(said)),
            1 => Ok(Ok(found.remove(0).1)),
            _ => bail!(
                "{what} is found by several agents ({}): two nodes claim it",
                found
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// The pod's path towards `dst`, from the agents' halves: the source pod's node gives its
    /// side and route; when the traffic leaves that node, the node of the destination pod
    /// (if an agent has it) gives the way in.
    pub fn resolve(&self, pod: &PodRef, dst: Option<Ipv4Addr>) -> Result<Resolved> {
        let what = match pod {
            PodRef::Name { .. } => pb::resolve_request::What::Pod(match pod {
                PodRef::Name {
                    namespace: Some(ns),
                    name,
                } => format!("{ns}/{name}"),
                PodRef::Name { name, .. } => name.clone(),
                _ => unreachable!(),
            }),
            PodRef::Container(id) => pb::resolve_request::What::Container(id.clone()),
            PodRef::Pid(_) | PodRef::Netns(_) => bail!(
                "through agents a pod is named by NAME, NAMESPACE/NAME or --container: --pid and --netns are one node's"
            ),
        };
        let answers = self.ask_all(pb::ResolveRequest {
            what: Some(what),
            dst: dst.map(|d| d.to_string()).unwrap_or_default(),
            from: String::new(),
        });
        let src = match self.one_half(answers, &pod.shown())? {
            Ok(h) => h,
            Err(said) => bail!("{} not found ({})", pod.shown(), said.join("; ")),
        };
        let mut topology = src.topology;
        topology.pod_ip = src.pod_ip;
        topology.other_uplinks = src.other_uplinks;
        topology.interfaces = src.interfaces;
        if let (Some(snap), Some(veth)) = (
            src.node_snapshot,
            topology.hops.iter().find(|h| h.role == Role::HostVeth),
        ) {
            let path = veth.netns_path.clone();
            topology.namespaces.insert_read_elsewhere(&path, snap);
        }
        let mut unobserved = Vec::new();
        let left_the_node = dst.is_some()
            && topology
                .hops
                .last()
                .is_some_and(|h| matches!(h.role, Role::Uplink | Role::Vxlan));
        if let (true, Some(dst)) = (left_the_node, dst) {
            let answers = self.ask_all(pb::ResolveRequest {
                what: Some(pb::resolve_request::What::Ip(dst.to_string())),
                dst: String::new(),
                from: topology.pod_ip.map(|i| i.to_string()).unwrap_or_default(),
            });
            let last = topology
                .hops
                .last()
                .map(|h| h.name.clone())
                .unwrap_or_default();
            match self.one_half(answers, &format!("address {dst}"))? {
                Ok(d) => {
                    topology.hops.extend(d.topology.hops);
                    topology.other_uplinks.extend(d.other_uplinks);
                    topology.interfaces.extend(d.interfaces);
                }
                Err(_) => {
                    // Not a pod any reachable agent has: the path ends where it leaves the
                    // node — unless an agent we could not reach has it.
                    for (n, e) in &self.unreachable {
                        unobserved.push(format!(
                            "{n}: no agent ({e}) — hops after {last} not observed"
                        ));
                    }
                }
            }
        }
        Ok(Resolved {
            topology,
            unobserved,
        })
    }

    /// Runs one session per node the plan spans; their streams merged into one.
    pub fn trace(
        &self,
        plan: &Plan,
        opts: &TraceOptions,
        duration: Option<Duration>,
    ) -> Result<(RemoteSession, Events, NodeStarts)> {
        let (merged_tx, merged_rx) = mpsc::channel::<Vec<TraceEvent>>(64);
        let shared = Arc::new(Mutex::new(Shared::default()));
        let mut parts = Vec::new();
        for node in plan.nodes() {
            let node = node.to_owned();
            let Some(agent) = self.agents.iter().find(|a| a.node == node) else {
                let why = self
                    .unreachable
                    .iter()
                    .find(|(n, _)| *n == node)
                    .map(|(_, e)| format!("no agent ({e})"))
                    .unwrap_or_else(|| "no agent given for it".into());
                shared
                    .lock()
                    .expect("lock")
                    .lost
                    .push(format!("{node}: {why} — its hops are not observed"));
                continue;
            };
            let (sub, ns_map) = sub_plan(plan, &node);
            parts.push((agent, sub, ns_map));
        }
        if parts.is_empty() {
            bail!("no agent for any node of the path");
        }
        let started = self.rt.block_on(async {
            let tasks: Vec<_> = parts
                .iter()
                .map(|(agent, sub, _)| {
                    let mut c = agent.client.clone();
                    let req = (|| {
                        anyhow::Ok(pb::TraceRequest {
                            plan: Some(wire::encode(sub)?),
                            options: Some(wire::encode(opts)?),
                            duration_ms: duration.map(|d| d.as_millis() as u64).unwrap_or(0),
                        })
                    })();
                    let node = agent.node.clone();
                    tokio::spawn(async move {
                        let r = async {
                            let mut stream = c
                                .trace(req?)
                                .await
                                .map_err(|s| anyhow!("{}", status_line(&s)))?
                                .into_inner();
                            // The first message says every probe is live.
                            let first =
                                tokio::time::timeout(Duration::from_secs(60), stream.message())
                                    .await
                                    .map_err(|_| anyhow!("not ready within 60 s"))?
                                    .map_err(|s| anyhow!("{}", status_line(&s)))?;
                            match first.and_then(|m| m.message) {
                                Some(pb::trace_message::Message::Ready(r)) => Ok((r, stream)),
                                Some(pb::trace_message::Message::End(e)) => {
                                    bail!("ended before it was ready: {}", e.reason)
                                }
                                _ => bail!("its first message was not `ready`"),
                            }
                        }
                        .await;
                        (node, r)
                    })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.map_err(|e| anyhow!("{e}"))?);
            }
            anyhow::Ok(out)
        })?;
        let mut infos = Vec::new();
        let mut streams = Vec::new();
        let mut failed = Vec::new();
        for ((node, r), (agent, _, ns_map)) in started.into_iter().zip(parts.iter()) {
            match r {
                Ok((ready, stream)) => {
                    let info: StartInfo = wire::decode(ready.started.as_ref(), "start info")?;
                    let (fe_mono, fe_real) = crate::agent::service::clocks();
                    // The agent's monotonic clock to this machine's, through both wall clocks.
                    let shift = (ready.realtime_ns as i128 - ready.monotonic_ns as i128)
                        - (fe_real as i128 - fe_mono as i128);
                    infos.push((node.clone(), info));
                    streams.push((
                        agent.client.clone(),
                        node,
                        ready.session,
                        stream,
                        ns_map.clone(),
                        shift,
                    ));
                }
                Err(e) => failed.push(format!("{node}: {e:#}")),
            }
        }
        if !failed.is_empty() {
            // Nothing may stay attached: end the sessions that did start.
            let session = RemoteSession::spawn(&self.rt, streams, merged_tx, shared);
            session.stop();
            let _ = Box::new(session).finish();
            bail!(
                "the session could not start on every node: {}",
                failed.join("; ")
            );
        }
        let session = RemoteSession::spawn(&self.rt, streams, merged_tx, shared);
        Ok((session, merged_rx, infos))
    }

    /// A handle on this fleet's runtime (for the session's tasks).
    pub fn runtime(&self) -> &tokio::runtime::Runtime {
        &self.rt
    }
}

/// What started on each node: (node, start info).
pub type NodeStarts = Vec<(String, StartInfo)>;

/// The part of `plan` on `node`: its hops (ids kept) and namespaces (renumbered); and for each
/// of its namespaces, the index in the whole plan.
pub fn sub_plan(plan: &Plan, node: &str) -> (Plan, Vec<usize>) {
    let mut ns_map: Vec<usize> = Vec::new();
    let mut namespaces: Vec<PlanNamespace> = Vec::new();
    let mut hops: Vec<PlannedHop> = Vec::new();
    for h in plan.hops.iter().filter(|h| h.node == node) {
        let local = match ns_map.iter().position(|g| *g == h.ns) {
            Some(i) => i,
            None => {
                ns_map.push(h.ns);
                namespaces.push(plan.namespaces[h.ns].clone());
                ns_map.len() - 1
            }
        };
        hops.push(PlannedHop {
            ns: local,
            ..h.clone()
        });
    }
    let keep = |steps: &[Step]| -> Vec<Step> {
        steps
            .iter()
            .filter(|s| hops.iter().any(|h| h.id == s.hop))
            .copied()
            .collect()
    };
    let sub = Plan {
        forward: keep(&plan.forward),
        reverse: keep(&plan.reverse),
        namespaces,
        hops,
        // The translated forms stay in the filter; judging them is the front end's.
        filter: plan.filter.clone(),
        nat: None,
    };
    (sub, ns_map)
}

/// What the merging tasks learn.
#[derive(Default)]
struct Shared {
    /// Latest counters per node.
    counters: BTreeMap<String, Counters>,
    /// Nodes lost mid-run or never started, and why.
    lost: Vec<String>,
    /// How each node's session ended.
    ended: Vec<(String, String)>,
}

/// The sessions of one run on several nodes.
pub struct RemoteSession {
    handle: tokio::runtime::Handle,
    stops: Vec<(connect::Client, String)>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    shared: Arc<Mutex<Shared>>,
}

type Stream = tonic::Streaming<pb::TraceMessage>;

/// One node's running session: (client, node, session id, its stream, its namespaces' indexes
/// in the whole plan, its clock's shift onto this machine's).
type NodeStream = (connect::Client, String, String, Stream, Vec<usize>, i128);

impl RemoteSession {
    fn spawn(
        rt: &tokio::runtime::Runtime,
        streams: Vec<NodeStream>,
        merged: mpsc::Sender<Vec<TraceEvent>>,
        shared: Arc<Mutex<Shared>>,
    ) -> Self {
        let mut stops = Vec::new();
        let mut tasks = Vec::new();
        for (client, node, session, stream, ns_map, shift) in streams {
            stops.push((client, session));
            let merged = merged.clone();
            let shared = shared.clone();
            tasks.push(rt.spawn(forward(node, stream, ns_map, shift, merged, shared)));
        }
        Self {
            handle: rt.handle().clone(),
            stops,
            tasks,
            shared,
        }
    }

    /// What could not be observed: nodes without an agent, agents lost mid-run.
    pub fn unobserved(&self) -> Vec<String> {
        self.shared
            .lock()
            .map(|s| s.lost.clone())
            .unwrap_or_default()
    }

    /// How each node's session ended.
    pub fn ended(&self) -> Vec<(String, String)> {
        self.shared
            .lock()
            .map(|s| s.ended.clone())
            .unwrap_or_default()
    }
}

/// One node's stream into the merged one: hop ids as they are, namespaces renumbered to the
/// whole plan's, timestamps moved to this machine's monotonic clock, counters summed.
async fn forward(
    node: String,
    mut stream: Stream,
    ns_map: Vec<usize>,
    shift: i128,
    merged: mpsc::Sender<Vec<TraceEvent>>,
    shared: Arc<Mutex<Shared>>,
) {
    let ts = |t: u64| (t as i128 + shift).max(0) as u64;
    let ns = |i: usize| ns_map.get(i).copied().unwrap_or(usize::MAX);
    loop {
        let msg = match stream.message().await {
            Ok(Some(m)) => m,
            Ok(None) => {
                let mut s = shared.lock().expect("lock");
                if !s.ended.iter().any(|(n, _)| *n == node) {
                    s.lost
                        .push(format!("{node}: the agent's stream ended without a word"));
                }
                return;
            }
            Err(status) => {
                shared.lock().expect("lock").lost.push(format!(
                    "{node}: agent lost mid-run ({}) — its hops are not observed after that",
                    status_line(&status)
                ));
                return;
            }
        };
        match msg.message {
            Some(pb::trace_message::Message::Events(p)) => {
                let batch: Vec<TraceEvent> = match wire::decode(Some(&p), "events") {
                    Ok(b) => b,
                    Err(e) => {
                        shared
                            .lock()
                            .expect("lock")
                            .lost
                            .push(format!("{node}: unreadable events ({e:#})"));
                        return;
                    }
                };
                let mut out = Vec::with_capacity(batch.len());
                for mut ev in batch {
                    match &mut ev {
                        TraceEvent::Hop(h) => h.ts_ns = ts(h.ts_ns),
                        TraceEvent::Drop(d) => {
                            d.ts_ns = ts(d.ts_ns);
                            d.at.ns = ns(d.at.ns);
                        }
                        TraceEvent::Fib(f) => {
                            f.ts_ns = ts(f.ts_ns);
                            f.ns = f.ns.map(ns);
                        }
                        TraceEvent::Xmit(x) => {
                            x.ts_ns = ts(x.ts_ns);
                            x.at.ns = ns(x.at.ns);
                        }
                        TraceEvent::Counters(c) => {
                            let mut s = shared.lock().expect("lock");
                            s.counters.insert(node.clone(), *c);
                            *c = sum(s.counters.values());
                        }
                        TraceEvent::Lost { total } => {
                            let mut s = shared.lock().expect("lock");
                            let mut c = s.counters.get(&node).copied().unwrap_or_default();
                            c.lost = *total;
                            s.counters.insert(node.clone(), c);
                            *total = sum(s.counters.values()).lost;
                        }
                    }
                    out.push(ev);
                }
                if merged.send(out).await.is_err() {
                    return;
                }
            }
            Some(pb::trace_message::Message::End(e)) => {
                let mut s = shared.lock().expect("lock");
                if let Ok(c) = wire::decode::<Counters>(e.counters.as_ref(), "counters") {
                    s.counters.insert(node.clone(), c);
                }
                s.ended.push((node.clone(), e.reason.clone()));
                // Ended by us (stop) or by its duration: complete; anything else cut it short.
                if !(e.reason == "stopped" || e.reason.starts_with("duration")) {
                    s.lost.push(format!(
                        "{node}: its session ended early ({}) — its hops are not observed after that",
                        e.reason
                    ));
                }
                return;
            }
            Some(pb::trace_message::Message::Ready(_)) | None => {}
        }
    }
}

fn sum<'a>(cs: impl Iterator<Item = &'a Counters>) -> Counters {
    cs.fold(Counters::default(), |a, c| Counters {
        tc_seen: a.tc_seen + c.tc_seen,
        tc_matched: a.tc_matched + c.tc_matched,
        drops_matched: a.drops_matched + c.drops_matched,
        fib_matched: a.fib_matched + c.fib_matched,
        xmit_matched: a.xmit_matched + c.xmit_matched,
        lost: a.lost + c.lost,
        cut: a.cut + c.cut,
    })
}

impl Session for RemoteSession {
    fn stop(&self) {
        for (client, session) in &self.stops {
            let mut c = client.clone();
            let session = session.clone();
            self.handle.spawn(async move {
                let _ = c.stop(pb::StopRequest { session }).await;
            });
        }
    }

    fn unobserved(&self) -> Vec<String> {
        RemoteSession::unobserved(self)
    }

    fn finish(self: Box<Self>) -> Result<Counters> {
        let me = *self;
        me.handle.block_on(async {
            for t in me.tasks {
                let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
            }
        });
        let s = me.shared.lock().map_err(|_| anyhow!("lock"))?;
        Ok(sum(s.counters.values()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::plan::tests::{cross_node, plan_of};

    #[test]
    fn agents_flag() {
        let a = parse_agents("node-a=tcp:10.30.180.56:7070, node-b=unix:/run/b.sock").unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!(a[1].endpoint, Endpoint::Unix("/run/b.sock".into()));
        assert!(parse_agents("node-a").is_err());
        assert!(parse_agents("node-a=tcp:1.2.3.4:1,node-a=tcp:1.2.3.4:2").is_err());
        assert!(parse_agents("=tcp:1.2.3.4:1").is_err());
        assert!(parse_agents("").is_err());
    }

    #[test]
    fn a_plan_splits_by_node_keeping_hop_ids() {
        let plan = plan_of(&cross_node());
        let (b, map) = sub_plan(&plan, "node-b");
        assert_eq!(
            b.hops.iter().map(|h| h.id).collect::<Vec<_>>(),
            [5, 6, 7, 8, 9]
        );
        assert!(b.hops.iter().all(|h| h.node == "node-b"));
        // Namespaces renumbered; the map leads back to the whole plan's.
        for h in &b.hops {
            assert_eq!(b.namespaces[h.ns].path, plan.namespaces[map[h.ns]].path);
        }
        assert_eq!(b.forward.len(), 5);
        b.validate().unwrap();
        let (a, _) = sub_plan(&plan, "node-a");
        assert_eq!(a.hops.len(), 5);
    }
}
