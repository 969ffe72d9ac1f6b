//! Correlation: the events of the same packet, seen at different hops and in different
//! namespaces (inside VXLAN on the underlay, and before and after a NAT rewrote it), grouped
//! into one record with its timeline; then each record judged against the expected path of
//! its connection (through a Service: the path to the backend it was really translated to),
//! and the run's verdict.
//!
//! A packet is recognised by its conversation ([`super::nat`]: the pod's connection, whatever
//! form NAT gave its addresses and ports), its direction, and what no hop and no NAT changes:
//! the IP id and the TCP sequence number or ICMP id/sequence, and the flags (marks are
//! scrubbed between namespaces, so they cannot be used).
//!
//! The order of a record's hops is the order the kernel saw: by timestamp within a node (one
//! clock), by the expected path across nodes (clocks of different machines cannot be
//! compared). A packet seen at an expected hop before one that should come first is *out of
//! order*, and the verdict says so. Where consecutive hops saw different headers, the record
//! says which node rewrote them, at which netfilter hook, from what to what.
use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

pub use super::nat::Direction;
use super::{
    facts::{Facts, NoFacts},
    nat::{invariant_seq, ConntrackSource, Conversations, NoConntrack, OpenPacket, Tuple},
};
use crate::{
    diagnose::{after_delivery, hint, Evidence, NoRoute},
    netlink::snapshot::table_name,
    trace::{
        event::{DropEvent, FibEvent, Flow, HopEvent, Place, XmitEvent},
        plan::{Hook, Plan, Role, Step},
        TraceEvent,
    },
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HopSeen {
    pub hop: u32,
    pub hook: Hook,
    pub ts_ns: u64,
    pub encap: bool,
    pub len: u32,
    /// The packet's addresses and ports at this hop.
    pub tuple: Tuple,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DropSeen {
    pub hop: Option<u32>,
    pub location: String,
    pub reason: String,
    pub ts_ns: u64,
    pub hint: String,
    #[serde(skip)]
    pub at: Place,
    /// The packet as it was when freed.
    #[serde(skip)]
    pub tuple: Tuple,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FibSeen {
    pub location: String,
    pub table: u32,
    pub oif: String,
    pub gateway: Option<String>,
    pub err: i32,
    pub ts_ns: u64,
    /// The lookup's addresses.
    pub src: String,
    pub dst: String,
    /// The kernel did not say where the lookup ran (it found no route, so no device): placed
    /// where the packet was last seen.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub placed: bool,
    #[serde(skip)]
    pub ns: Option<usize>,
}

impl FibSeen {
    /// `fib node-b: no route to 10.244.0.9 in table main`, `fib node-a: table main → cni0`.
    pub fn text(&self) -> String {
        match self.err {
            0 => format!(
                "fib {}: table {} → {}{}",
                self.location,
                table_name(self.table),
                self.oif,
                self.gateway
                    .as_ref()
                    .map(|g| format!(" via {g}"))
                    .unwrap_or_default()
            ),
            e => format!(
                "fib {}: {} to {} in table {}{}",
                self.location,
                match -e {
                    101 => "no route".to_owned(),
                    113 => "an unreachable route".to_owned(),
                    13 => "a prohibit route".to_owned(),
                    22 => "a blackhole route".to_owned(),
                    n => format!("error {n} looking up a route"),
                },
                self.dst,
                table_name(self.table),
                if self.placed {
                    " (where the packet was last seen)"
                } else {
                    ""
                }
            ),
        }
    }
}

/// A rewrite of the packet's headers between two hops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Translation {
    /// The node that rewrote it.
    pub node: String,
    /// Where, as netfilter runs it (`nat PREROUTING (DNAT)`…).
    pub hook: String,
    /// The hops it was seen at before and after (`node-a/veth1 ingress`).
    pub after: String,
    pub before: String,
    pub from: Tuple,
    pub to: Tuple,
    /// The rule that made it, when the plan knows it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
}

/// How a packet fared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fate {
    /// Every expected hop, in order, nothing else.
    Complete,
    /// Freed by the kernel with a drop reason.
    Dropped,
    /// Seen where it should not be.
    Diverged,
    /// Seen at the expected hops, but not in the expected order.
    OutOfOrder,
    /// Stopped being seen, with no drop reported.
    Vanished,
}

/// A hop seen before one the path puts ahead of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct OutOfOrder {
    /// The step seen too early.
    pub early: Step,
    /// The step it was seen before.
    pub before: Step,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PacketRecord {
    pub id: u64,
    pub direction: Direction,
    #[serde(skip)]
    pub flow: Flow,
    /// In the order the kernel saw them (see the module's docs).
    pub hops: Vec<HopSeen>,
    pub drop: Option<DropSeen>,
    pub fib: Vec<FibSeen>,
    pub xmit: Vec<String>,
    /// Hops it was seen on that its direction's path does not include.
    pub unexpected: Vec<u32>,
    /// Expected steps it was not seen at.
    pub missing: Vec<Step>,
    /// Expected steps seen in the wrong order.
    pub out_of_order: Vec<OutOfOrder>,
    pub fate: Fate,
    /// A drop after delivery that is not a path problem (a raw socket's copy, say).
    pub notes: Vec<String>,
    /// Its conversation (index in [`Correlator::convs`]).
    #[serde(skip)]
    pub conv: usize,
    /// The plan's NAT target its conversation was translated to.
    #[serde(skip)]
    pub target: Option<usize>,
    /// Rewrites seen along the way.
    pub nat: Vec<Translation>,
    /// A reply that reached the pod with the backend's addresses: the translation was not
    /// undone.
    pub untranslated: bool,
    /// The path it was judged against.
    #[serde(skip)]
    pub expected: Vec<Step>,
    /// Copies a bridge flooded to other ports (see the notes).
    #[serde(skip)]
    pub flooded: Vec<Step>,
}

/// (conversation, direction, IP id, TCP sequence or ICMP sequence, flags, ICMP error).
type Key = (usize, Direction, u16, u32, u8, bool);

struct Open {
    rec: PacketRecord,
    last_ts: u64,
}

/// Conversations idle this long are forgotten (a long run's memory stays bounded).
const FORGET_NS: u64 = 120_000_000_000;

/// How long after a packet was last seen a route lookup without a place is still its.
const FIB_PLACE_NS: u64 = 2_000_000;

/// Groups events into packet records.
pub struct Correlator {
    plan: Plan,
    open: HashMap<Key, Open>,
    next_id: u64,
    /// Packets seen per hop (hop events).
    pub counts: BTreeMap<u32, u64>,
    /// FIB lookups no packet took (e.g. before the first hop event).
    pub loose_fib: Vec<FibSeen>,
    /// The pod's conversations and their translations.
    pub convs: Conversations,
    facts: Box<dyn Facts + Send>,
}

impl Correlator {
    pub fn new(plan: Plan) -> Self {
        Self::with_sources(plan, Box::new(NoConntrack), Box::new(NoFacts))
    }

    /// With a conntrack table to ask about translations and the nodes' state for hints.
    pub fn with_sources(
        plan: Plan,
        ct: Box<dyn ConntrackSource + Send>,
        facts: Box<dyn Facts + Send>,
    ) -> Self {
        Self {
            convs: Conversations::new(&plan, ct),
            plan,
            open: HashMap::new(),
            next_id: 1,
            counts: BTreeMap::new(),
            loose_fib: Vec::new(),
            facts,
        }
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    fn open_packets(&self) -> Vec<OpenPacket> {
        self.open
            .values()
            .map(|o| OpenPacket {
                conv: o.rec.conv,
                dir: o.rec.direction,
                proto: o.rec.flow.proto,
                ip_id: o.rec.flow.ip_id,
                seq: invariant_seq(&o.rec.flow),
                flags: o.rec.flow.flags,
                last_ts: o.last_ts,
            })
            .collect()
    }

    /// The conversation, direction and record key of a packet.
    fn resolve(&mut self, f: &Flow, ts: u64) -> Option<Key> {
        let t = if f.is_icmp_error() {
            Tuple::quoted(f)
        } else {
            Some(Tuple::of(f))
        };
        let known = t.is_some_and(|t| self.convs.lookup(&t).is_some());
        let open = if known || self.plan.nat.is_none() {
            Vec::new()
        } else {
            self.open_packets()
        };
        let (c, d) = self.convs.resolve(f, ts, &open)?;
        Some((c, d, f.ip_id, invariant_seq(f), f.flags, f.is_icmp_error()))
    }

    fn record(&mut self, k: Key, f: &Flow, ts: u64) -> &mut Open {
        if !self.open.contains_key(&k) {
            let id = self.next_id;
            self.next_id += 1;
            self.open.insert(
                k,
                Open {
                    rec: PacketRecord {
                        id,
                        direction: k.1,
                        flow: *f,
                        hops: Vec::new(),
                        drop: None,
                        fib: Vec::new(),
                        xmit: Vec::new(),
                        unexpected: Vec::new(),
                        missing: Vec::new(),
                        out_of_order: Vec::new(),
                        fate: Fate::Vanished,
                        notes: Vec::new(),
                        conv: k.0,
                        target: None,
                        nat: Vec::new(),
                        untranslated: false,
                        expected: Vec::new(),
                        flooded: Vec::new(),
                    },
                    last_ts: ts,
                },
            );
        }
        self.open.get_mut(&k).expect("present")
    }

    /// Takes one event. Returns a record that a repeat of the same packet closed early.
    pub fn feed(&mut self, ev: &TraceEvent) -> Option<PacketRecord> {
        match ev {
            TraceEvent::Hop(h) => self.hop(h),
            TraceEvent::Drop(d) => {
                self.drop_seen(d);
                None
            }
            TraceEvent::Fib(f) => {
                self.fib(f);
                None
            }
            TraceEvent::Xmit(x) => {
                self.xmit(x);
                None
            }
            TraceEvent::Lost { .. } | TraceEvent::Counters(_) => None,
        }
    }

    fn hop(&mut self, h: &HopEvent) -> Option<PacketRecord> {
        self.plan.hop(h.hop)?;
        let k = self.resolve(&h.flow, h.ts_ns)?;
        *self.counts.entry(h.hop).or_default() += 1;
        // The same hop and hook twice: a new packet with identical headers.
        let mut closed = None;
        if self.open.get(&k).is_some_and(|o| {
            o.rec
                .hops
                .iter()
                .any(|s| s.hop == h.hop && s.hook == h.hook)
        }) {
            let o = self.open.remove(&k).expect("checked");
            closed = Some(self.finalize(o.rec));
        }
        let o = self.record(k, &h.flow, h.ts_ns);
        o.rec.hops.push(HopSeen {
            hop: h.hop,
            hook: h.hook,
            ts_ns: h.ts_ns,
            encap: h.flow.outer.is_some(),
            len: h.len,
            tuple: Tuple::of(&h.flow),
        });
        o.last_ts = o.last_ts.max(h.ts_ns);
        closed
    }

    fn drop_seen(&mut self, d: &DropEvent) {
        let Some(k) = self.resolve(&d.flow, d.ts_ns) else {
            return;
        };
        let location = self.plan.place_name(d.at.ns, d.at.ifindex);
        let o = self.record(k, &d.flow, d.ts_ns);
        o.rec.drop = Some(DropSeen {
            hop: d.hop,
            location,
            reason: d.reason.to_string(),
            ts_ns: d.ts_ns,
            // Judged when the record is finished, with everything known by then.
            hint: String::new(),
            at: d.at,
            tuple: Tuple::of(&d.flow),
        });
        o.last_ts = o.last_ts.max(d.ts_ns);
    }

    fn xmit(&mut self, x: &XmitEvent) {
        let Some(k) = self.resolve(&x.flow, x.ts_ns) else {
            return;
        };
        let location = self.plan.place_name(x.at.ns, x.at.ifindex);
        if let Some(o) = self.open.get_mut(&k) {
            if !o.rec.xmit.contains(&location) {
                o.rec.xmit.push(location);
            }
            o.last_ts = o.last_ts.max(x.ts_ns);
        }
    }

    fn fib(&mut self, f: &FibEvent) {
        // -EAGAIN is a table without an answer: the rule walk goes on to the next, or, after
        // the last, the lookup has no route. Kept for now; judged with the record.
        let (src, dst) = (f.flow.src, f.flow.dst);
        let node =
            f.ns.and_then(|ns| self.plan.namespaces.get(ns))
                .map(|n| n.node.clone());
        // Route lookups carry no IP id: the latest open packet with these addresses at one
        // of its hops (before or after a translation), seen on the lookup's node when the
        // lookup says which.
        let plan = &self.plan;
        let target = self
            .open
            .iter()
            .filter(|(_, o)| {
                o.rec
                    .hops
                    .iter()
                    .any(|h| h.tuple.src == src && h.tuple.dst == dst)
                    && node.as_ref().is_none_or(|n| {
                        o.rec
                            .hops
                            .iter()
                            .any(|h| plan.hop(h.hop).is_some_and(|p| &p.node == n))
                    })
            })
            .max_by_key(|(_, o)| o.last_ts)
            .map(|(k, _)| *k);
        let (ns, placed) = match f.ns {
            Some(ns) => (Some(ns), false),
            // No route, no device, no namespace: where the packet was last seen just before
            // (its input hop). Nothing of ours just before: not ours (another lab, another
            // pod with the same addresses).
            None => {
                let last = target.and_then(|k| {
                    self.open[&k]
                        .rec
                        .hops
                        .iter()
                        .filter(|h| h.ts_ns <= f.ts_ns && f.ts_ns - h.ts_ns < FIB_PLACE_NS)
                        .max_by_key(|h| h.ts_ns)
                        .and_then(|h| self.plan.hop(h.hop))
                        .map(|h| h.ns)
                });
                match last {
                    Some(ns) => (Some(ns), true),
                    None => return,
                }
            }
        };
        let (location, oif) = match ns {
            Some(ns) => (
                self.plan.owner(ns).to_owned(),
                match f.oif {
                    Some(i) => self
                        .plan
                        .place_name(ns, i)
                        .rsplit('/')
                        .next()
                        .unwrap_or_default()
                        .to_owned(),
                    None => "-".to_owned(),
                },
            ),
            None => ("?".to_owned(), "-".to_owned()),
        };
        let fib = FibSeen {
            location,
            table: f.table,
            oif,
            gateway: f.gateway.map(|g| g.to_string()),
            err: f.err,
            ts_ns: f.ts_ns,
            src: src.to_string(),
            dst: dst.to_string(),
            placed,
            ns,
        };
        let same = |a: &FibSeen| {
            a.location == fib.location
                && a.table == fib.table
                && a.oif == fib.oif
                && a.gateway == fib.gateway
                && a.err == fib.err
                && a.dst == fib.dst
        };
        match target.and_then(|k| self.open.get_mut(&k)) {
            Some(o) if o.rec.fib.iter().any(same) => {}
            Some(o) => o.rec.fib.push(fib),
            None if f.err == -11 => {}
            // Kept for the summary, bounded: at high rates most lookups find no open packet.
            None if self.loose_fib.len() < 256 && !self.loose_fib.iter().any(same) => {
                self.loose_fib.push(fib)
            }
            None => {}
        }
    }

    /// Records idle for `idle_ns` at monotonic time `now_ns`, finished.
    pub fn flush(&mut self, now_ns: u64, idle_ns: u64) -> Vec<PacketRecord> {
        if now_ns != u64::MAX {
            self.convs.retry(now_ns);
            let open: std::collections::HashSet<usize> =
                self.open.values().map(|o| o.rec.conv).collect();
            self.convs.forget_idle(now_ns, FORGET_NS, &open);
        }
        let done: Vec<Key> = self
            .open
            .iter()
            .filter(|(_, o)| now_ns.saturating_sub(o.last_ts) >= idle_ns)
            .map(|(k, _)| *k)
            .collect();
        let opened: Vec<Open> = done
            .into_iter()
            .filter_map(|k| self.open.remove(&k))
            .collect();
        let mut out: Vec<PacketRecord> = opened.into_iter().map(|o| self.finalize(o.rec)).collect();
        out.sort_by_key(|r| r.id);
        out
    }

    /// Every open record, finished; conntrack asked once more about each connection.
    pub fn finish(&mut self) -> Vec<PacketRecord> {
        self.convs.refresh(256);
        self.flush(u64::MAX, 0)
    }

    /// The path a record is judged against: its target's when its connection was translated
    /// to one, else the plan's; an ICMP error from the first place it was seen on.
    fn expected_for(&self, rec: &PacketRecord) -> Vec<Step> {
        let fwd = rec.direction == Direction::Forward;
        let target = rec
            .target
            .and_then(|t| self.plan.nat.as_ref().and_then(|n| n.targets.get(t)));
        let path: &[Step] = match target {
            Some(t) if fwd => &t.forward,
            Some(t) => &t.reverse,
            None => self.plan.path(fwd),
        };
        if rec.flow.is_icmp_error() {
            // An error starts where it is made (a node's REJECT, a router).
            if let Some(first) = path
                .iter()
                .position(|s| rec.hops.iter().any(|h| h.hop == s.hop && h.hook == s.hook))
            {
                return path[first..].to_vec();
            }
        }
        path.to_vec()
    }

    /// Puts a record's hops in the order the kernel saw them: nodes in the order the expected
    /// path visits them (nodes off the path last), each node's hops by timestamp.
    fn order(&self, rec: &mut PacketRecord, expected: &[Step]) {
        let mut node_rank: Vec<&str> = Vec::new();
        for s in expected {
            if let Some(h) = self.plan.hop(s.hop) {
                if !node_rank.contains(&h.node.as_str()) {
                    node_rank.push(&h.node);
                }
            }
        }
        let rank = |hop: u32| -> usize {
            self.plan
                .hop(hop)
                .and_then(|h| node_rank.iter().position(|n| *n == h.node))
                .unwrap_or(usize::MAX)
        };
        rec.hops.sort_by_key(|h| (rank(h.hop), h.ts_ns));
    }

    fn step_name(&self, hop: u32, hook: Hook) -> String {
        self.plan
            .hop(hop)
            .map(|h| format!("{} {}", h.name, hook.as_str()))
            .unwrap_or_else(|| format!("hop {hop} {}", hook.as_str()))
    }

    /// Where consecutive hops saw different headers: which node rewrote what, at which hook.
    fn translations(&self, rec: &PacketRecord) -> Vec<Translation> {
        let mut out = Vec::new();
        let fwd = rec.direction == Direction::Forward;
        let target = rec
            .target
            .and_then(|t| self.plan.nat.as_ref().and_then(|n| n.targets.get(t)));
        for w in rec.hops.windows(2) {
            let (a, b) = (&w[0], &w[1]);
            if a.tuple == b.tuple {
                continue;
            }
            let (ha, hb) = (self.plan.hop(a.hop), self.plan.hop(b.hop));
            let node = match (ha, hb) {
                (Some(x), Some(y)) if x.node == y.node => x.node.clone(),
                (_, Some(y)) => y.node.clone(),
                _ => "?".to_owned(),
            };
            // An ICMP echo's identifier stands for both ports: a masquerade rewrites it as
            // the source port on the way out, as the destination port on the way back.
            let icmp = a.tuple.proto == 1;
            let id_changed = icmp && a.tuple.sport != b.tuple.sport;
            let dnat = a.tuple.dst != b.tuple.dst
                || (!icmp && a.tuple.dport != b.tuple.dport)
                || (id_changed && !fwd);
            let snat = a.tuple.src != b.tuple.src
                || (!icmp && a.tuple.sport != b.tuple.sport)
                || (id_changed && fwd);
            let mut hook = match (fwd, dnat, snat) {
                (true, true, false) => "nat PREROUTING (DNAT)",
                (true, false, true) => "nat POSTROUTING (SNAT)",
                (true, true, true) => "nat PREROUTING (DNAT) and POSTROUTING (SNAT)",
                (false, false, true) => "nat POSTROUTING (the DNAT undone)",
                (false, true, false) => "nat PREROUTING (the SNAT undone)",
                (false, true, true) => "nat PREROUTING and POSTROUTING (both undone)",
                _ => "nat",
            }
            .to_owned();
            let bridged = matches!((ha, hb), (Some(x), Some(y))
                if x.role == Role::HostVeth && y.role == Role::HostVeth && x.node == y.node);
            if bridged {
                hook.push_str(", in the bridge (br_netfilter)");
            }
            let rule = match (fwd, dnat, snat, target) {
                (true, true, _, Some(t)) => {
                    let mut r = match &t.chain {
                        Some(c) => format!("{c} DNAT to {}", t.label()),
                        None => format!("DNAT to {}", t.label()),
                    };
                    if snat {
                        if let Some(why) = &t.snat_rule {
                            r.push_str(&format!("; masquerade: {why}"));
                        }
                    }
                    Some(r)
                }
                (true, false, true, Some(t)) => t.snat_rule.clone(),
                _ => None,
            };
            out.push(Translation {
                node,
                hook,
                after: self.step_name(a.hop, a.hook),
                before: self.step_name(b.hop, b.hook),
                from: a.tuple,
                to: b.tuple,
                rule,
            });
        }
        out
    }

    /// What is known about the place and packet of a drop, for its hint.
    fn evidence(&mut self, rec: &PacketRecord, d: &DropSeen) -> Evidence {
        let mut ev = Evidence::at(&d.location);
        let ns = d.at.ns;
        let t = d.tuple;
        ev.src = Some(t.src);
        ev.dst = Some(t.dst);
        ev.dport = matches!(t.proto, 6 | 17).then_some(t.dport);
        let here: Vec<&FibSeen> = rec
            .fib
            .iter()
            .filter(|f| f.ns == Some(ns) || f.location == ev.owner)
            .collect();
        if let Some(f) = here.iter().find(|f| f.err != 0) {
            ev.no_route = Some(NoRoute {
                dst: f.dst.parse().unwrap_or(t.dst),
                table: table_name(f.table),
                err: f.err,
            });
        }
        let reason = d.reason.as_str();
        match reason {
            "IP_INNOROUTES" | "IP_OUTNOROUTES" => {
                ev.route = self.facts.route(ns, t.dst, None, None).ok();
            }
            "IP_RPFILTER" => {
                let dev = ev.device.clone().unwrap_or_default();
                let get = |f: &mut Box<dyn Facts + Send>, k: &str| {
                    f.sysctl(ns, &format!("net/ipv4/conf/{k}/rp_filter"))
                        .unwrap_or_else(|| "?".into())
                };
                ev.rp_filter = Some((get(&mut self.facts, &dev), get(&mut self.facts, "all")));
                ev.route_back = Some(match self.facts.route(ns, t.src, None, None) {
                    Ok(r) => format!("as {r}"),
                    Err(_) => "nowhere: it has no route back".to_owned(),
                });
            }
            r if r.starts_with("NEIGH_") || r == "NO_TX_TARGET" || r.starts_with("VXLAN") => {
                let nh = here
                    .iter()
                    .find_map(|f| f.gateway.as_ref()?.parse().ok())
                    .unwrap_or(t.dst);
                if let Some(n) = self.facts.neighbour(ns, d.at.ifindex, nh) {
                    let state = match n.mac {
                        Some(m) => format!("{} {m}", n.state),
                        None => n.state,
                    };
                    ev.neighbour = Some((nh, state));
                }
            }
            "NETFILTER_DROP" => {
                ev.rules = self.facts.drop_rules(ns, &t);
                if let Some(c) = self.facts.conntrack_delta(ns) {
                    ev.ct_invalid = c.invalid;
                    ev.ct_drop = c.drop;
                    ev.ct_fill = c.count.zip(c.max);
                }
                if let Some(svc) = self.plan.nat.as_ref().and_then(|n| n.service.as_ref()) {
                    let conv_orig = self.convs.list.get(&rec.conv).map(|c| c.orig);
                    if !svc.rejects.is_empty() && conv_orig.is_some_and(|o| o.dst == svc.ip) {
                        let r = &svc.rejects[0];
                        ev.no_endpoints = Some((
                            svc.name.clone(),
                            format!(
                                "{} {}: {}{}",
                                r.table,
                                r.chain,
                                r.target,
                                r.reject_with
                                    .as_deref()
                                    .map(|w| format!(" {w}"))
                                    .unwrap_or_default()
                            ),
                        ));
                    }
                }
            }
            _ => {}
        }
        ev
    }

    /// The target a record's own headers show it was translated to (its last translated
    /// form), if any: a connection whose first packets died unconfirmed in conntrack may be
    /// translated anew, to another backend, by a retransmission.
    fn seen_target(&self, rec: &PacketRecord) -> Option<usize> {
        let nat = self.plan.nat.as_ref()?;
        let mut tuples: Vec<Tuple> = rec.hops.iter().map(|h| h.tuple).collect();
        if let Some(d) = &rec.drop {
            tuples.push(d.tuple);
        }
        tuples.iter().rev().find_map(|t| {
            let (ip, port) = match rec.direction {
                Direction::Forward => (t.dst, t.dport),
                Direction::Reverse => (t.src, t.sport),
            };
            nat.targets
                .iter()
                .position(|x| x.ip == ip && x.port.is_none_or(|p| p == port) && !x.hairpin)
                .or_else(|| {
                    nat.targets
                        .iter()
                        .position(|x| x.hairpin && x.ip == ip && x.port.is_none_or(|p| p == port))
                })
        })
    }

    fn finalize(&mut self, mut rec: PacketRecord) -> PacketRecord {
        let conv = self.convs.list.get(&rec.conv).cloned();
        rec.target = if rec.flow.is_icmp_error() {
            None
        } else {
            self.seen_target(&rec)
        }
        .or_else(|| conv.as_ref().and_then(|c| c.target));
        let expected = self.expected_for(&rec);
        self.order(&mut rec, &expected);
        let seen = |s: &Step| rec.hops.iter().any(|h| h.hop == s.hop && h.hook == s.hook);
        let mut missing = Vec::new();
        for (i, s) in expected.iter().enumerate() {
            let ok = match s.hook {
                // Crossed if the ports on both sides saw it.
                Hook::Bridged => {
                    i > 0
                        && i + 1 < expected.len()
                        && seen(&expected[i - 1])
                        && seen(&expected[i + 1])
                }
                _ => seen(s),
            };
            if !ok {
                missing.push(*s);
            }
        }
        // A bridge the path crosses at layer 2 may still transmit the frame itself
        // (br_netfilter sends the first frames of a connection it DNATed to a port of the
        // same bridge through the bridge device): that is on the path.
        let mut unexpected: Vec<u32> = rec
            .hops
            .iter()
            .filter(|h| {
                !expected
                    .iter()
                    .any(|s| s.hop == h.hop && (s.hook == h.hook || s.hook == Hook::Bridged))
            })
            .map(|h| h.hop)
            .collect();
        unexpected.dedup();
        // The expected steps in the order they were seen (first sighting each): each must
        // come after the ones before it on the path.
        let mut out_of_order = Vec::new();
        let mut furthest: Option<usize> = None;
        let mut counted: Vec<usize> = Vec::new();
        for h in &rec.hops {
            let Some(pos) = expected
                .iter()
                .position(|s| s.hop == h.hop && s.hook == h.hook)
            else {
                continue;
            };
            if counted.contains(&pos) {
                continue;
            }
            counted.push(pos);
            match furthest {
                Some(f) if pos < f => out_of_order.push(OutOfOrder {
                    early: expected[f],
                    before: expected[pos],
                }),
                _ => furthest = Some(pos),
            }
        }
        rec.nat = self.translations(&rec);
        settle_lookups(&mut rec.fib);
        let reached_end = expected.last().is_some_and(seen);
        // A bridge that does not know the destination's MAC yet floods the frame to every
        // port: the other pods get copies and drop them (OTHERHOST). Delivered all the same.
        let off_path = |h: &&HopSeen| {
            !expected
                .iter()
                .any(|s| s.hop == h.hop && (s.hook == h.hook || s.hook == Hook::Bridged))
        };
        let flood: Vec<u32> = unexpected
            .iter()
            .copied()
            .filter(|hop| {
                rec.hops
                    .iter()
                    .filter(|h| h.hop == *hop)
                    .filter(off_path)
                    .all(|h| {
                        self.plan.hop(h.hop).is_some_and(|p| {
                            (p.role == Role::HostVeth && h.hook == Hook::Egress)
                                || (p.role == Role::PodEth0 && h.hook == Hook::Ingress)
                        })
                    })
            })
            .collect();
        let drop_is_flood = rec.drop.as_ref().is_none_or(|d| d.reason == "OTHERHOST");
        if reached_end && !flood.is_empty() && flood.len() == unexpected.len() && drop_is_flood {
            let copies: Vec<String> = flood
                .iter()
                .filter_map(|h| self.plan.hop(*h).map(|p| p.name.clone()))
                .collect();
            rec.notes.push(format!(
                "the bridge flooded it (it did not know the destination's MAC yet): {} got copies{}",
                copies.join(", "),
                if rec.drop.is_some() {
                    " and dropped them (OTHERHOST)"
                } else {
                    ""
                }
            ));
            rec.drop = None;
            rec.flooded = rec
                .hops
                .iter()
                .filter(|h| flood.contains(&h.hop))
                .filter(off_path)
                .map(|h| Step {
                    hop: h.hop,
                    hook: h.hook,
                })
                .collect();
            unexpected.clear();
        }
        let last = expected.last().and_then(|s| self.plan.hop(s.hop)).cloned();
        // A reply that reached the pod with the backend's addresses: the node did not undo
        // the translation (the pod has no socket for them).
        if let (Some(c), Some(l)) = (&conv, &last) {
            if rec.direction == Direction::Reverse
                && !rec.flow.is_icmp_error()
                && c.translated.is_some_and(|t| t != c.orig)
                && l.role == Role::PodEth0
            {
                if let Some(h) = rec
                    .hops
                    .iter()
                    .rev()
                    .find(|h| h.hop == l.id && h.hook == Hook::Ingress)
                {
                    if h.tuple != c.orig.rev() {
                        rec.untranslated = true;
                    }
                }
            }
            // The pod answering such a reply (a reset) goes straight to the backend.
            if rec.direction == Direction::Forward
                && c.translated.is_some_and(|t| t != c.orig)
                && rec.hops.first().is_some_and(|h| {
                    h.tuple != c.orig
                        && self
                            .plan
                            .hop(h.hop)
                            .is_some_and(|p| p.role == Role::PodEth0)
                })
            {
                rec.notes.push(format!(
                    "{} sent this to {} itself, not to {}: it answers a reply that reached it untranslated",
                    pod_name(&self.plan),
                    rec.hops[0].tuple.dst,
                    c.orig.dst
                ));
            }
        }
        if let Some(d) = &rec.drop {
            let at_destination = reached_end
                && last
                    .as_ref()
                    .is_some_and(|l| d.location.starts_with(&format!("{}/", l.owner)));
            let dest = last
                .as_ref()
                .map(|l| l.owner.as_str())
                .unwrap_or("the destination");
            if at_destination && &*d.reason == crate::probes::UNREPORTED && !rec.untranslated {
                // Before 5.17 the kernel gives no reason: a free after delivery is most often
                // a raw socket's copy (ping's), but a filter in the pod cannot be told apart.
                rec.notes.push(format!(
                    "delivered to {dest}; the kernel then freed it without saying why (this kernel reports no drop reasons): usually a raw socket's copy, as ping's, else a netfilter rule in {dest}"
                ));
                rec.drop = None;
            } else if at_destination && after_delivery(&d.reason) && !rec.untranslated {
                rec.notes.push(format!(
                    "delivered to {dest}; its socket layer then freed it ({}){}",
                    d.reason,
                    if d.reason == "NO_SOCKET" {
                        ": a raw socket took a copy, as ping's does, or nothing listens"
                    } else {
                        ""
                    }
                ));
                rec.drop = None;
            }
        }
        if let Some(mut d) = rec.drop.take() {
            d.hint = if rec.untranslated {
                self.untranslated_hint(&rec, &d, conv.as_ref())
            } else {
                let ev = self.evidence(&rec, &d);
                hint(&d.reason, &ev)
            };
            rec.drop = Some(d);
        }
        rec.fate = if rec.drop.is_some() || rec.untranslated {
            Fate::Dropped
        } else if !unexpected.is_empty() {
            Fate::Diverged
        } else if !out_of_order.is_empty() {
            Fate::OutOfOrder
        } else if missing.is_empty() {
            Fate::Complete
        } else {
            Fate::Vanished
        };
        rec.missing = missing;
        rec.unexpected = unexpected;
        rec.out_of_order = out_of_order;
        rec.expected = expected;
        rec
    }

    fn untranslated_hint(
        &self,
        rec: &PacketRecord,
        d: &DropSeen,
        conv: Option<&super::nat::Conversation>,
    ) -> String {
        let pod = pod_name(&self.plan);
        let node = self
            .plan
            .nat
            .as_ref()
            .map(|n| n.node.as_str())
            .unwrap_or("the node");
        let (got, want) = match (rec.hops.last(), conv) {
            (Some(h), Some(c)) => (
                format!("{}:{}", h.tuple.src, h.tuple.sport),
                format!("{}:{}", c.orig.dst, c.orig.dport),
            ),
            _ => ("the backend".into(), "the Service".into()),
        };
        let why = match self.plan.nat.as_ref().and_then(|n| n.bridge_nf_call_iptables) {
            Some(false) => format!(
                "net.bridge.bridge-nf-call-iptables is 0 on {node}: the reply was bridged between two of its pods without passing netfilter, so conntrack never saw it"
            ),
            _ => format!("the reply did not pass {node}'s netfilter (conntrack never saw it)"),
        };
        format!(
            "the reply reached {pod} from {got} instead of {want}: {node} did not undo the DNAT ({why}); {pod}'s kernel has no socket for it and drops it ({}), then resets the connection",
            d.reason
        )
    }
}

/// Tables that had no answer (`-EAGAIN`) are part of a rule walk: dropped where the node
/// found a route after all; where it found none, they are the lookup that failed (`no route
/// in table …`, the last table tried).
fn settle_lookups(fib: &mut Vec<FibSeen>) {
    let answered: Vec<(String, String)> = fib
        .iter()
        .filter(|f| f.err != -11)
        .map(|f| (f.location.clone(), f.dst.clone()))
        .collect();
    let mut out: Vec<FibSeen> = Vec::new();
    for f in fib.drain(..) {
        if f.err == -11 {
            if answered.contains(&(f.location.clone(), f.dst.clone())) {
                continue;
            }
            // The last table of the walk stands for it.
            out.retain(|o| !(o.err == -101 && o.location == f.location && o.dst == f.dst));
            out.push(FibSeen { err: -101, ..f });
        } else {
            out.push(f);
        }
    }
    *fib = out;
}

/// The pod of the plan (the owner of its first hop).
fn pod_name(plan: &Plan) -> &str {
    plan.hops
        .first()
        .map(|h| h.owner.as_str())
        .unwrap_or("the pod")
}

/// The run's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Confirmed,
    Diverged,
    Dropped,
    NotSeen,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Confirmed => "confirmed",
            Verdict::Diverged => "diverged",
            Verdict::Dropped => "dropped",
            Verdict::NotSeen => "not_seen",
        }
    }
}

/// A drop location and reason, with how many packets died there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DropSummary {
    pub hop: String,
    pub reason: String,
    pub hint: String,
    pub count: u64,
    pub direction: Direction,
}

/// `confirmed` only when every packet went its whole expected path, in order, and nowhere
/// else.
pub fn verdict(records: &[PacketRecord]) -> Verdict {
    if records.is_empty() {
        Verdict::NotSeen
    } else if records.iter().any(|r| r.fate == Fate::Dropped) {
        Verdict::Dropped
    } else if records.iter().any(|r| r.fate != Fate::Complete) {
        Verdict::Diverged
    } else {
        Verdict::Confirmed
    }
}

pub fn drops(records: &[PacketRecord]) -> Vec<DropSummary> {
    let mut out: Vec<DropSummary> = Vec::new();
    for r in records {
        let Some(d) = &r.drop else { continue };
        match out
            .iter_mut()
            .find(|s| s.hop == d.location && s.reason == d.reason && s.direction == r.direction)
        {
            Some(s) => s.count += 1,
            None => out.push(DropSummary {
                hop: d.location.clone(),
                reason: d.reason.clone(),
                hint: d.hint.clone(),
                count: 1,
                direction: r.direction,
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, sync::Arc};

    use super::*;
    use crate::{
        topology::{
            plan::tests::{self as pt, plan_of},
            Role,
        },
        trace::event::Place,
    };

    const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 9);
    const DST: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);

    fn flow(src: Ipv4Addr, dst: Ipv4Addr, id: u16, seq: u32, icmp_type: u8) -> Flow {
        Flow {
            src,
            dst,
            proto: 1,
            ip_id: id,
            seq,
            flags: icmp_type,
            ..Flow::default()
        }
    }

    fn tc(c: &mut Correlator, f: Flow, ts: u64, hop: u32, hook: Hook) -> Option<PacketRecord> {
        c.feed(&TraceEvent::Hop(HopEvent {
            ts_ns: ts,
            hop,
            hook,
            len: 98,
            flow: f,
            packet: None,
        }))
    }

    fn walk(c: &mut Correlator, f: Flow, steps: &[Step], t0: u64) {
        for (i, s) in steps.iter().enumerate() {
            if s.hook != Hook::Bridged {
                tc(c, f, t0 + i as u64 * 1000, s.hop, s.hook);
            }
        }
    }

    /// A drop on hop `at`'s device (`hop`: whether to say it is that hop).
    fn drop_at(c: &mut Correlator, f: Flow, ts: u64, at: u32, hop: bool, reason: &str) {
        let h = c.plan().hop(at).unwrap().clone();
        c.feed(&TraceEvent::Drop(DropEvent {
            ts_ns: ts,
            at: Place {
                ns: h.ns,
                ifindex: h.ifindex,
            },
            hop: hop.then_some(at),
            reason: Arc::from(reason),
            len: 98,
            flow: f,
        }));
    }

    #[test]
    fn a_ping_across_nodes_is_confirmed_both_ways() {
        let plan = plan_of(&pt::cross_node());
        let mut c = Correlator::new(plan.clone());
        walk(&mut c, flow(POD, DST, 1, 7, 8), &plan.forward, 1_000);
        walk(&mut c, flow(DST, POD, 99, 7, 0), &plan.reverse, 50_000);
        let recs = c.finish();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].direction, Direction::Forward);
        assert_eq!(recs[1].direction, Direction::Reverse);
        assert!(recs.iter().all(|r| r.fate == Fate::Complete), "{recs:#?}");
        assert_eq!(recs[0].hops.len(), 10);
        assert_eq!(verdict(&recs), Verdict::Confirmed);
        assert_eq!(c.counts.values().sum::<u64>(), 20);
    }

    #[test]
    fn a_drop_names_its_place_and_reason() {
        let plan = plan_of(&pt::cross_node());
        let mut c = Correlator::new(plan.clone());
        let f = flow(POD, DST, 2, 8, 8);
        walk(&mut c, f, &plan.forward[..3], 0);
        drop_at(&mut c, f, 5_000, 2, true, "NETFILTER_DROP");
        let recs = c.finish();
        assert_eq!(recs[0].fate, Fate::Dropped);
        assert_eq!(verdict(&recs), Verdict::Dropped);
        let d = drops(&recs);
        assert_eq!(d[0].hop, "node-a/cni0");
        assert!(d[0].hint.contains("netfilter"));
        assert_eq!(recs[0].missing.len(), 7);
    }

    #[test]
    fn a_leak_onto_another_uplink_diverges() {
        let t = pt::topo(
            vec![
                pt::hop(Role::PodEth0, "pod-c2", "node-c", "eth0"),
                pt::hop(Role::HostVeth, "node-c", "node-c", "eni1"),
                pt::hop(Role::Uplink, "node-c", "node-c", "eth2"),
            ],
            vec![pt::hop(Role::Uplink, "node-c", "node-c", "eth0")],
        );
        let mut c = Correlator::new(plan_of(&t));
        let f = flow(POD, DST, 3, 1, 8);
        tc(&mut c, f, 1, 0, Hook::Egress);
        tc(&mut c, f, 2, 1, Hook::Ingress);
        tc(&mut c, f, 3, 3, Hook::Egress);
        let recs = c.finish();
        assert_eq!(recs[0].fate, Fate::Diverged);
        assert_eq!(recs[0].unexpected, vec![3]);
        assert_eq!(verdict(&recs), Verdict::Diverged);
    }

    #[test]
    fn same_node_bridge_is_crossed_at_layer_2() {
        let t = pt::topo(
            vec![
                pt::hop(Role::PodEth0, "pod-a1", "node-a", "eth0"),
                pt::hop(Role::HostVeth, "node-a", "node-a", "veth1"),
                pt::hop(Role::Bridge, "node-a", "node-a", "cni0"),
                pt::hop(Role::HostVeth, "node-a", "node-a", "veth2"),
                pt::hop(Role::PodEth0, "pod-a2", "node-a", "eth0"),
            ],
            vec![],
        );
        let plan = plan_of(&t);
        let mut c = Correlator::new(plan.clone());
        walk(&mut c, flow(POD, DST, 4, 1, 8), &plan.forward, 0);
        let recs = c.finish();
        assert_eq!(recs[0].fate, Fate::Complete, "{:?}", recs[0].missing);
    }

    #[test]
    fn benign_no_socket_after_delivery_is_not_a_drop() {
        let plan = plan_of(&pt::cross_node());
        let mut c = Correlator::new(plan.clone());
        let f = flow(DST, POD, 5, 1, 0);
        walk(&mut c, f, &plan.reverse, 0);
        drop_at(&mut c, f, 99_000, 0, false, "NO_SOCKET");
        let recs = c.finish();
        assert_eq!(recs[0].fate, Fate::Complete);
        assert_eq!(recs[0].notes.len(), 1);
        // A netfilter drop in the destination pod is a drop all the same.
        let f = flow(DST, POD, 6, 2, 0);
        walk(&mut c, f, &plan.reverse, 200_000);
        drop_at(&mut c, f, 299_000, 0, false, "NETFILTER_DROP");
        assert_eq!(c.finish()[0].fate, Fate::Dropped);
        // A kernel without drop reasons (< 5.17): after delivery, a note that says so.
        let f = flow(DST, POD, 7, 3, 0);
        walk(&mut c, f, &plan.reverse, 400_000);
        drop_at(&mut c, f, 499_000, 0, false, crate::probes::UNREPORTED);
        let recs = c.finish();
        assert_eq!(recs[0].fate, Fate::Complete);
        assert!(
            recs[0].notes[0].contains("without saying why"),
            "{:?}",
            recs[0].notes
        );
    }

    #[test]
    fn idle_packets_flush_and_repeats_start_new_records() {
        let plan = plan_of(&pt::cross_node());
        let mut c = Correlator::new(plan);
        let f = flow(POD, DST, 6, 1, 8);
        tc(&mut c, f, 1_000, 0, Hook::Egress);
        assert!(c.flush(1_500, 1_000).is_empty());
        let closed = tc(&mut c, f, 2_000, 0, Hook::Egress).expect("repeat closes the first");
        assert_eq!(closed.fate, Fate::Vanished);
        let recs = c.flush(10_000, 1_000);
        assert_eq!(recs.len(), 1);
        assert_eq!(verdict(&[]), Verdict::NotSeen);
    }

    #[test]
    fn fib_lookups_join_the_latest_packet() {
        let plan = plan_of(&pt::cross_node());
        let node_a = plan.hops[1].ns;
        let plan_hop_ifindex = plan.hops[3].ifindex;
        let mut c = Correlator::new(plan);
        let f = flow(POD, DST, 7, 1, 8);
        tc(&mut c, f, 1_000, 0, Hook::Egress);
        c.feed(&TraceEvent::Fib(FibEvent {
            ts_ns: 1_500,
            ns: Some(node_a),
            table: 254,
            oif: Some(plan_hop_ifindex),
            gateway: Some(Ipv4Addr::new(10, 244, 1, 0)),
            err: 0,
            flow: Flow {
                src: POD,
                dst: DST,
                proto: 1,
                ..Flow::default()
            },
        }));
        let recs = c.finish();
        assert_eq!(recs[0].fib.len(), 1);
        assert_eq!(recs[0].fib[0].location, "node-a");
        assert_eq!(recs[0].fib[0].oif, "flannel.1");
        assert!(c.loose_fib.is_empty());
    }

    #[test]
    fn a_hop_seen_before_its_predecessor_is_out_of_order() {
        let plan = plan_of(&pt::cross_node());
        let mut c = Correlator::new(plan.clone());
        let f = flow(POD, DST, 8, 1, 8);
        // node-a's hops with cni0 (step 2) stamped before the veth (step 1).
        let fw = &plan.forward;
        tc(&mut c, f, 100, fw[0].hop, fw[0].hook);
        tc(&mut c, f, 300, fw[1].hop, fw[1].hook);
        tc(&mut c, f, 200, fw[2].hop, fw[2].hook);
        for (i, s) in fw.iter().enumerate().skip(3) {
            tc(&mut c, f, 1_000 + i as u64, s.hop, s.hook);
        }
        let recs = c.finish();
        assert_eq!(recs[0].fate, Fate::OutOfOrder, "{recs:#?}");
        assert_eq!(
            recs[0].out_of_order,
            vec![OutOfOrder {
                early: fw[2],
                before: fw[1]
            }]
        );
        assert!(recs[0].missing.is_empty());
        assert_eq!(verdict(&recs), Verdict::Diverged);
        // The kernel's order is what the record shows.
        let order: Vec<u32> = recs[0].hops.iter().map(|h| h.hop).collect();
        assert_eq!(&order[..3], &[fw[0].hop, fw[2].hop, fw[1].hop]);
    }

    #[test]
    fn across_nodes_the_path_orders_hops_not_the_clocks() {
        // node-b's clock runs behind node-a's: its hops carry earlier timestamps.
        let plan = plan_of(&pt::cross_node());
        let mut c = Correlator::new(plan.clone());
        let f = flow(POD, DST, 9, 1, 8);
        for (i, s) in plan.forward.iter().enumerate() {
            let on_b = plan.hop(s.hop).unwrap().node == "node-b";
            let ts = if on_b { i as u64 } else { 1_000_000 + i as u64 };
            tc(&mut c, f, ts, s.hop, s.hook);
        }
        let recs = c.finish();
        assert_eq!(recs[0].fate, Fate::Complete, "{recs:#?}");
        let order: Vec<u32> = recs[0].hops.iter().map(|h| h.hop).collect();
        let want: Vec<u32> = plan.forward.iter().map(|s| s.hop).collect();
        assert_eq!(order, want);
    }

    // ---- through NAT ----

    use crate::{
        follow::nat::{ConntrackSource, CtAnswer, Learnt, Tuple},
        topology::plan::Builder,
        trace::{
            event::Quoted,
            nat::{NatKind, NatPlan, NatTarget, RejectRule, ServiceInfo},
        },
    };

    const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
    const B1: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
    const A2: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 7);
    const CNI0: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);

    /// pod-a1 → VIP, backends pod-b1 (across nodes) and pod-a2 (same node); `snat`: the
    /// node masquerades connections to both (a NodePort, say) to cni0's address.
    fn service_plan(snat: bool) -> Plan {
        let mut b = Builder::default();
        let cross = pt::cross_node();
        let same = pt::topo(
            vec![
                pt::hop(Role::PodEth0, "pod-a1", "node-a", "eth0"),
                pt::hop(Role::HostVeth, "node-a", "node-a", "veth1"),
                pt::hop(Role::Bridge, "node-a", "node-a", "cni0"),
                pt::hop(Role::HostVeth, "node-a", "node-a", "veth3"),
                pt::hop(Role::PodEth0, "pod-a2", "node-a", "eth0"),
            ],
            vec![],
        );
        let (f1, r1) = b.path(&cross);
        let (f2, r2) = b.path(&same);
        let mut filter = crate::topology::plan::filter(&cross, POD, Some(VIP));
        filter.proto = Some(6);
        let target =
            |ip, pod: &str, node: &str, forward: Vec<Step>, reverse: Vec<Step>| NatTarget {
                ip,
                port: Some(8080),
                chain: Some(format!("KUBE-SEP-{pod}")),
                share_ppm: Some(500_000),
                pod: Some(pod.into()),
                node: Some(node.into()),
                snat: snat.then_some(CNI0),
                snat_rule: snat.then(|| "KUBE-EXT masquerade".to_owned()),
                hairpin: false,
                forward,
                reverse,
            };
        let mut plan = b.finish(f1.clone(), r1.clone(), filter);
        let ns = plan.hops[1].ns;
        plan.nat = Some(NatPlan {
            kind: NatKind::Service,
            node: "node-a".into(),
            ns,
            read_with: "iptables-save".into(),
            service: Some(ServiceInfo {
                name: "default/web:http".into(),
                protocol: "tcp".into(),
                frontend: "cluster IP".into(),
                ip: VIP,
                port: Some(80),
                chain: Some("KUBE-SVC-WEB".into()),
                rejects: vec![],
            }),
            targets: vec![
                target(B1, "pod-b1", "node-b", f1, r1),
                target(A2, "pod-a2", "node-a", f2, r2),
            ],
            notes: vec![],
            bridge_nf_call_iptables: Some(true),
        });
        plan.validate().unwrap();
        plan
    }

    fn tcp(
        src: Ipv4Addr,
        sport: u16,
        dst: Ipv4Addr,
        dport: u16,
        id: u16,
        seq: u32,
        flags: u8,
    ) -> Flow {
        Flow {
            src,
            dst,
            proto: 6,
            sport,
            dport,
            ip_id: id,
            seq,
            flags,
            ..Flow::default()
        }
    }

    fn tuple_of(f: &Flow) -> Tuple {
        Tuple::of(f)
    }

    /// Conntrack answers from a table: original tuple → reply tuple.
    struct Table(Vec<(Tuple, Tuple, Vec<&'static str>)>);

    impl ConntrackSource for Table {
        fn get(&mut self, _: usize, orig: &Tuple) -> Option<CtAnswer> {
            self.0
                .iter()
                .find(|(o, _, _)| o == orig)
                .map(|(o, r, st)| CtAnswer {
                    node: "node-a".into(),
                    orig: *o,
                    reply: *r,
                    status: st.iter().map(|s| s.to_string()).collect(),
                    tcp_state: Some("SYN_SENT".into()),
                })
        }
    }

    fn names(plan: &Plan, r: &PacketRecord) -> Vec<String> {
        r.hops
            .iter()
            .map(|h| format!("{} {}", plan.hop(h.hop).unwrap().name, h.hook.as_str()))
            .collect()
    }

    /// Feeds a forward packet along `steps`, translated to `to` from step `at` on.
    fn walk_nat(c: &mut Correlator, f: Flow, to: Flow, steps: &[Step], at: usize, t0: u64) {
        for (i, s) in steps.iter().enumerate() {
            if s.hook != Hook::Bridged {
                tc(
                    c,
                    if i < at { f } else { to },
                    t0 + i as u64 * 1000,
                    s.hop,
                    s.hook,
                );
            }
        }
    }

    #[test]
    fn packets_that_differ_only_after_translation_are_told_apart_by_conntrack() {
        // Two connections whose first packets carry the same IP id and sequence; node-a
        // masquerades both to cni0's address with the same port and sends one to pod-b1, the
        // other to pod-a2. Only conntrack can say which translated packet is which.
        let plan = service_plan(true);
        let (ta, tb) = (
            plan.nat.as_ref().unwrap().targets[0].clone(),
            plan.nat.as_ref().unwrap().targets[1].clone(),
        );
        let a = tcp(POD, 40000, VIP, 80, 7, 1000, 0x02);
        let b = tcp(POD, 40001, VIP, 80, 7, 1000, 0x02);
        let a_nat = tcp(CNI0, 50000, B1, 8080, 7, 1000, 0x02);
        let b_nat = tcp(CNI0, 50000, A2, 8080, 7, 1000, 0x02);
        let table = Table(vec![
            (
                tuple_of(&a),
                tuple_of(&a_nat).rev(),
                vec!["DST_NAT", "SRC_NAT"],
            ),
            (
                tuple_of(&b),
                tuple_of(&b_nat).rev(),
                vec!["DST_NAT", "SRC_NAT"],
            ),
        ]);
        let mut c = Correlator::with_sources(plan.clone(), Box::new(table), Box::new(NoFacts));
        // Interleaved, as two CPUs would.
        tc(&mut c, a, 1_000, ta.forward[0].hop, Hook::Egress);
        tc(&mut c, b, 1_100, tb.forward[0].hop, Hook::Egress);
        tc(&mut c, a, 2_000, ta.forward[1].hop, Hook::Ingress);
        tc(&mut c, b, 2_100, tb.forward[1].hop, Hook::Ingress);
        walk_nat(&mut c, a, a_nat, &ta.forward[2..], 0, 3_000);
        walk_nat(&mut c, b, b_nat, &tb.forward[2..], 0, 3_100);
        let recs = c.finish();
        assert_eq!(recs.len(), 2, "{recs:#?}");
        for r in &recs {
            assert_eq!(
                r.fate,
                Fate::Complete,
                "{:?} {:?}",
                names(&plan, r),
                r.missing
            );
        }
        let by_sport = |p: u16| recs.iter().find(|r| r.flow.sport == p).unwrap();
        assert_eq!(by_sport(40000).target, Some(0), "a went to pod-b1");
        assert_eq!(by_sport(40001).target, Some(1), "b went to pod-a2");
        // Each record shows its own translation, at node-a, DNAT and SNAT.
        let t = &by_sport(40001).nat[0];
        assert_eq!(t.node, "node-a");
        assert_eq!(
            t.hook,
            "nat PREROUTING (DNAT) and POSTROUTING (SNAT), in the bridge (br_netfilter)"
        );
        assert_eq!(t.to.to_string(), "10.244.0.1:50000 > 10.244.0.7:8080");
        assert!(c
            .convs
            .list
            .values()
            .all(|v| v.learnt == Some(Learnt::Conntrack)));
        assert_eq!(c.convs.ambiguous, 0);

        // Without conntrack the same packets are ambiguous: neither is guessed.
        let mut c = Correlator::new(plan.clone());
        tc(&mut c, a, 1_000, ta.forward[0].hop, Hook::Egress);
        tc(&mut c, b, 1_100, tb.forward[0].hop, Hook::Egress);
        tc(&mut c, a_nat, 3_000, ta.forward[2].hop, Hook::Ingress);
        tc(&mut c, b_nat, 3_100, tb.forward[3].hop, Hook::Egress);
        let recs = c.finish();
        assert_eq!(c.convs.ambiguous, 2);
        assert!(recs.iter().all(|r| r.target.is_none()));
    }

    #[test]
    fn without_conntrack_the_model_and_the_invariants_tie_translations() {
        // No masquerade: the translated packet keeps the pod's port (the model).
        let plan = service_plan(false);
        let ta = plan.nat.as_ref().unwrap().targets[0].clone();
        let a = tcp(POD, 40000, VIP, 80, 9, 5, 0x02);
        let a_nat = tcp(POD, 40000, B1, 8080, 9, 5, 0x02);
        let mut c = Correlator::new(plan.clone());
        walk_nat(&mut c, a, a_nat, &ta.forward, 2, 0);
        // The reply, translated back on node-a.
        let r = tcp(B1, 8080, POD, 40000, 3, 77, 0x12);
        let r_back = tcp(VIP, 80, POD, 40000, 3, 77, 0x12);
        walk_nat(&mut c, r, r_back, &ta.reverse, 7, 50_000);
        let recs = c.finish();
        assert_eq!(recs.len(), 2, "{recs:#?}");
        assert!(
            recs.iter()
                .all(|r| r.fate == Fate::Complete && r.target == Some(0)),
            "{recs:#?}"
        );
        assert_eq!(c.convs.list[&0].learnt, Some(Learnt::Model));
        assert_eq!(recs[1].nat[0].hook, "nat POSTROUTING (the DNAT undone)");
        assert_eq!(recs[1].nat[0].after, "node-a/flannel.1 ingress");

        // Masqueraded to a new port: the IP id and sequence tie it to the one open packet.
        let plan = service_plan(true);
        let ta = plan.nat.as_ref().unwrap().targets[0].clone();
        let mut c = Correlator::new(plan);
        let a = tcp(POD, 40002, VIP, 80, 11, 99, 0x02);
        let a_nat = tcp(CNI0, 61000, B1, 8080, 11, 99, 0x02);
        walk_nat(&mut c, a, a_nat, &ta.forward, 2, 0);
        let recs = c.finish();
        assert_eq!(recs.len(), 1, "{recs:#?}");
        assert_eq!(recs[0].fate, Fate::Complete);
        assert_eq!(c.convs.list[&0].learnt, Some(Learnt::Invariants));
    }

    #[test]
    fn a_reply_not_translated_back_is_dropped_by_the_pod_and_said_so() {
        let mut plan = service_plan(false);
        plan.nat.as_mut().unwrap().bridge_nf_call_iptables = Some(false);
        let tb = plan.nat.as_ref().unwrap().targets[1].clone();
        let a = tcp(POD, 40010, VIP, 80, 1, 10, 0x02);
        let a_nat = tcp(POD, 40010, A2, 8080, 1, 10, 0x02);
        let table = Table(vec![(
            tuple_of(&a),
            tuple_of(&a_nat).rev(),
            vec!["DST_NAT"],
        )]);
        let mut c = Correlator::with_sources(plan.clone(), Box::new(table), Box::new(NoFacts));
        walk_nat(&mut c, a, a_nat, &tb.forward, 2, 0);
        // pod-a2's SYN-ACK crosses the bridge without netfilter: still the backend's.
        let r = tcp(A2, 8080, POD, 40010, 5, 500, 0x12);
        walk(&mut c, r, &tb.reverse, 10_000);
        drop_at(
            &mut c,
            r,
            20_000,
            tb.reverse.last().unwrap().hop,
            false,
            "NO_SOCKET",
        );
        let recs = c.finish();
        let back = recs
            .iter()
            .find(|r| r.direction == Direction::Reverse)
            .unwrap();
        assert!(back.untranslated, "{back:#?}");
        assert_eq!(back.fate, Fate::Dropped);
        let hint = &back.drop.as_ref().unwrap().hint;
        assert!(
            hint.contains("from 10.244.0.7:8080 instead of 10.96.0.10:80"),
            "{hint}"
        );
        assert!(
            hint.contains("bridge-nf-call-iptables is 0 on node-a"),
            "{hint}"
        );
        assert_eq!(verdict(&recs), Verdict::Dropped);
        let faults = crate::follow::output::faults(&c, plan.nat.as_ref().unwrap(), &recs);
        assert!(
            faults.iter().any(|f| f.kind == "nat_not_undone"),
            "{faults:?}"
        );
    }

    #[test]
    fn a_service_without_endpoints_is_rejected_and_the_icmp_error_joins_the_connection() {
        let mut plan = service_plan(false);
        {
            let n = plan.nat.as_mut().unwrap();
            n.targets.clear();
            let s = n.service.as_mut().unwrap();
            s.rejects.push(RejectRule {
                table: "filter".into(),
                chain: "KUBE-SERVICES".into(),
                target: "REJECT".into(),
                reject_with: Some("icmp-port-unreachable".into()),
                comment: Some("default/web:http has no endpoints".into()),
            });
        }
        let mut c = Correlator::new(plan.clone());
        let syn = tcp(POD, 40020, VIP, 80, 1, 1, 0x02);
        walk(&mut c, syn, &plan.forward[..3], 0);
        drop_at(
            &mut c,
            syn,
            4_000,
            plan.forward[2].hop,
            true,
            "NETFILTER_DROP",
        );
        // node-a's port unreachable, from cni0's address, quoting the SYN.
        let err = Flow {
            src: CNI0,
            dst: POD,
            proto: 1,
            flags: 3,
            icmp_code: 3,
            ip_id: 42,
            about: Some(Quoted {
                src: POD,
                dst: VIP,
                proto: 6,
                sport: 40020,
                dport: 80,
            }),
            ..Flow::default()
        };
        let back = &plan.reverse;
        walk(&mut c, err, &back[back.len() - 3..], 6_000);
        let recs = c.finish();
        assert_eq!(recs.len(), 2, "{recs:#?}");
        assert!(recs.iter().all(|r| r.conv == recs[0].conv));
        let e = recs.iter().find(|r| r.flow.is_icmp_error()).unwrap();
        assert_eq!(e.direction, Direction::Reverse);
        assert_eq!(e.fate, Fate::Complete, "{e:#?}");
        let d = recs[0].drop.as_ref().unwrap();
        assert!(
            d.hint.contains("default/web:http has no endpoints"),
            "{}",
            d.hint
        );
        let faults = crate::follow::output::faults(&c, plan.nat.as_ref().unwrap(), &recs);
        let f = faults
            .iter()
            .find(|f| f.kind == "no_endpoints")
            .expect("no_endpoints");
        assert!(
            f.text.contains("ICMP port unreachable from 10.244.0.1"),
            "{}",
            f.text
        );
    }

    #[test]
    fn a_lookup_without_a_route_is_placed_where_the_packet_was_and_names_the_drop() {
        let plan = plan_of(&pt::cross_node());
        let mut c = Correlator::new(plan.clone());
        // A reply from pod-b1 dies on node-b: no route back.
        let f = flow(DST, POD, 3, 9, 0);
        walk(&mut c, f, &plan.reverse[..3], 1_000);
        let fib = |ts, err, table| {
            TraceEvent::Fib(FibEvent {
                ts_ns: ts,
                ns: None,
                table,
                oif: None,
                gateway: None,
                err,
                flow: Flow {
                    src: DST,
                    dst: POD,
                    proto: 1,
                    ..Flow::default()
                },
            })
        };
        // The table had no answer (-EAGAIN); nothing else on node-b.
        c.feed(&fib(3_500, -11, 254));
        drop_at(&mut c, f, 4_000, plan.reverse[2].hop, true, "IP_INNOROUTES");
        // A lookup long after anything of ours was seen is another pod's (another lab's).
        c.feed(&fib(900_000_000, -101, 254));
        let recs = c.finish();
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].fib.len(), 1, "{:?}", recs[0].fib);
        assert_eq!(
            recs[0].fib[0].text(),
            "fib node-b: no route to 10.244.0.9 in table main (where the packet was last seen)"
        );
        let d = recs[0].drop.as_ref().unwrap();
        assert!(
            d.hint
                .contains("node-b has no route to 10.244.0.9 in table main"),
            "{}",
            d.hint
        );
        assert!(c.loose_fib.is_empty(), "{:?}", c.loose_fib);
    }

    #[test]
    fn a_flooded_copy_dropped_by_another_pod_is_not_a_divergence() {
        let plan = service_plan(false);
        let tb = plan.nat.as_ref().unwrap().targets[1].clone();
        let a = tcp(POD, 40030, VIP, 80, 2, 2, 0x02);
        let a_nat = tcp(POD, 40030, A2, 8080, 2, 2, 0x02);
        let mut c = Correlator::new(plan.clone());
        walk_nat(&mut c, a, a_nat, &tb.forward, 2, 0);
        // The bridge floods the frame back to pod-a1's port too, which drops it.
        tc(&mut c, a_nat, 9_000, tb.forward[1].hop, Hook::Egress);
        tc(&mut c, a_nat, 9_500, tb.forward[0].hop, Hook::Ingress);
        drop_at(&mut c, a_nat, 9_900, tb.forward[0].hop, false, "OTHERHOST");
        let recs = c.finish();
        assert_eq!(recs[0].fate, Fate::Complete, "{recs:#?}");
        assert!(recs[0].notes[0].contains("flooded"), "{:?}", recs[0].notes);
    }

    #[test]
    fn idle_conversations_are_forgotten_and_counted() {
        let plan = plan_of(&pt::cross_node());
        let mut c = Correlator::new(plan.clone());
        let f = flow(POD, DST, 1, 1, 8);
        walk(&mut c, f, &plan.forward, 1_000);
        assert_eq!(c.flush(2_000_000_000, 300_000_000).len(), 1);
        assert_eq!(c.convs.list.len(), 1);
        // Two minutes later it is gone, counted; a new packet of it starts anew.
        c.flush(FORGET_NS + 10_000_000_000, 300_000_000);
        assert!(c.convs.list.is_empty());
        assert_eq!(c.convs.forgotten, 1);
        walk(
            &mut c,
            flow(POD, DST, 2, 2, 8),
            &plan.forward,
            FORGET_NS + 20_000_000_000,
        );
        let recs = c.finish();
        assert_eq!(recs[0].fate, Fate::Complete);
        assert_eq!(c.convs.list.len(), 1);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]
            /// Echo requests seen at hops picked, repeated and shuffled at will (a hop
            /// missing, seen twice, out of order), or whole walks of the path with one such
            /// edit: the run is `confirmed` exactly when every packet was seen on its whole
            /// expected path, in order, once.
            #[test]
            fn confirmed_only_for_the_whole_path_in_order(
                picks in proptest::collection::vec(0usize..16, 1..24),
                walks in 0usize..3,
                edit in proptest::option::of((0usize..40, 0u8..3)),
            ) {
                let plan = plan_of(&pt::cross_node());
                let steps: Vec<Step> = plan
                    .forward
                    .iter()
                    .copied()
                    .filter(|s| s.hook != Hook::Bridged)
                    .collect();
                // (step, packet): each walk is a packet of its own (its own IP id).
                let mut seen: Vec<(Step, u16)> = if walks == 0 {
                    picks.iter().map(|&i| (steps[i % steps.len()], 1)).collect()
                } else {
                    (0..walks)
                        .flat_map(|w| steps.iter().map(move |s| (*s, w as u16 + 1)))
                        .collect()
                };
                if let Some((at, op)) = edit {
                    let at = at % seen.len();
                    match op {
                        0 => {
                            seen.remove(at);
                        }
                        1 => seen.insert(at, seen[at]),
                        _ if at + 1 < seen.len() => seen.swap(at, at + 1),
                        _ => {}
                    }
                }
                let mut c = Correlator::new(plan.clone());
                // Records a repeat closed early come back from `feed`; the rest at the end.
                let mut recs = Vec::new();
                for (i, (s, id)) in seen.iter().enumerate() {
                    let f = flow(POD, DST, *id, 7, 8);
                    recs.extend(tc(&mut c, f, 1_000 + i as u64 * 1_000, s.hop, s.hook));
                }
                recs.extend(c.finish());
                let packets: std::collections::BTreeSet<u16> = seen.iter().map(|(_, id)| *id).collect();
                // Within a node in the order seen; across nodes in the path's order (clocks of
                // different machines are not compared: see the module's docs).
                let node = |s: &Step| plan.hop(s.hop).map(|h| h.node.clone()).unwrap_or_default();
                let mut nodes: Vec<String> = Vec::new();
                for s in &steps {
                    if !nodes.contains(&node(s)) {
                        nodes.push(node(s));
                    }
                }
                let whole = !seen.is_empty()
                    && packets.iter().all(|id| {
                        let mut mine: Vec<Step> =
                            seen.iter().filter(|(_, i)| i == id).map(|(s, _)| *s).collect();
                        mine.sort_by_key(|s| nodes.iter().position(|n| *n == node(s)));
                        mine == steps
                    });
                prop_assert_eq!(
                    verdict(&recs) == Verdict::Confirmed,
                    whole,
                    "seen {:?}: {:#?}",
                    seen,
                    recs
                );
            }
        }
    }
}
