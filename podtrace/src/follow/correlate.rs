//! Correlation: the events of the same packet, seen at different hops and in different
//! namespaces (and inside VXLAN on the underlay), grouped into one record with its timeline;
//! then each record judged against the expected path, and the run's verdict.
//!
//! A packet is recognised by what no hop changes: its inner addresses, protocol, ports, IP id
//! and the TCP sequence number or ICMP id/sequence (marks are scrubbed between namespaces, so
//! they cannot be used).
//!
//! The order of a record's hops is the order the kernel saw: by timestamp within a node (one
//! clock), by the expected path across nodes (clocks of different machines cannot be
//! compared). A packet seen at an expected hop before one that should come first is *out of
//! order*, and the verdict says so.
use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::{
    diagnose::{after_delivery, drop_hint},
    trace::{
        event::{DropEvent, FibEvent, Flow, HopEvent, XmitEvent},
        plan::{Hook, Plan, Step},
        TraceEvent,
    },
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Forward,
    Reverse,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HopSeen {
    pub hop: u32,
    pub hook: Hook,
    pub ts_ns: u64,
    pub encap: bool,
    pub len: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DropSeen {
    pub hop: Option<u32>,
    pub location: String,
    pub reason: String,
    pub ts_ns: u64,
    pub hint: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FibSeen {
    pub location: String,
    pub table: u32,
    pub oif: String,
    pub gateway: Option<String>,
    pub err: i32,
    pub ts_ns: u64,
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
}

type Key = (u32, u32, u8, u16, u16, u16, u32, u8);

fn key(f: &Flow) -> Key {
    (
        u32::from(f.src),
        u32::from(f.dst),
        f.proto,
        f.sport,
        f.dport,
        f.ip_id,
        f.seq,
        f.flags,
    )
}

struct Open {
    rec: PacketRecord,
    last_ts: u64,
}

/// Groups events into packet records.
pub struct Correlator {
    plan: Plan,
    open: HashMap<Key, Open>,
    next_id: u64,
    /// Packets seen per hop (hop events).
    pub counts: BTreeMap<u32, u64>,
    /// FIB lookups no packet took (e.g. before the first hop event).
    pub loose_fib: Vec<FibSeen>,
}

impl Correlator {
    pub fn new(plan: Plan) -> Self {
        Self {
            plan,
            open: HashMap::new(),
            next_id: 1,
            counts: BTreeMap::new(),
            loose_fib: Vec::new(),
        }
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    fn direction(&self, f: &Flow) -> Direction {
        if f.src == self.plan.filter.pod {
            Direction::Forward
        } else {
            Direction::Reverse
        }
    }

    fn record(&mut self, f: &Flow, ts: u64) -> &mut Open {
        let k = key(f);
        if !self.open.contains_key(&k) {
            let id = self.next_id;
            self.next_id += 1;
            let direction = self.direction(f);
            self.open.insert(
                k,
                Open {
                    rec: PacketRecord {
                        id,
                        direction,
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
        *self.counts.entry(h.hop).or_default() += 1;
        let k = key(&h.flow);
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
        let o = self.record(&h.flow, h.ts_ns);
        o.rec.hops.push(HopSeen {
            hop: h.hop,
            hook: h.hook,
            ts_ns: h.ts_ns,
            encap: h.flow.outer.is_some(),
            len: h.len,
        });
        o.last_ts = o.last_ts.max(h.ts_ns);
        closed
    }

    fn drop_seen(&mut self, d: &DropEvent) {
        let location = self.plan.place_name(d.at.ns, d.at.ifindex);
        let hint = drop_hint(&d.reason, &location);
        let o = self.record(&d.flow, d.ts_ns);
        o.rec.drop = Some(DropSeen {
            hop: d.hop,
            location,
            reason: d.reason.to_string(),
            ts_ns: d.ts_ns,
            hint,
        });
        o.last_ts = o.last_ts.max(d.ts_ns);
    }

    fn xmit(&mut self, x: &XmitEvent) {
        let location = self.plan.place_name(x.at.ns, x.at.ifindex);
        if let Some(o) = self.open.get_mut(&key(&x.flow)) {
            if !o.rec.xmit.contains(&location) {
                o.rec.xmit.push(location);
            }
            o.last_ts = o.last_ts.max(x.ts_ns);
        }
    }

    fn fib(&mut self, f: &FibEvent) {
        // -EAGAIN: this table had no answer and the rule walk went on; not a decision.
        if f.err == -11 {
            return;
        }
        let (location, oif) = match f.ns {
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
        };
        // Route lookups carry no IP id: give it to the latest open packet between the same
        // addresses.
        let target = self
            .open
            .values_mut()
            .filter(|o| o.rec.flow.src == f.flow.src && o.rec.flow.dst == f.flow.dst)
            .max_by_key(|o| o.last_ts);
        let same = |a: &FibSeen| {
            a.location == fib.location
                && a.table == fib.table
                && a.oif == fib.oif
                && a.gateway == fib.gateway
                && a.err == fib.err
        };
        match target {
            Some(o) if o.rec.fib.iter().any(same) => {}
            Some(o) => o.rec.fib.push(fib),
            // Kept for the summary, bounded: at high rates most lookups find no open packet.
            None if self.loose_fib.len() < 256 && !self.loose_fib.iter().any(same) => {
                self.loose_fib.push(fib)
            }
            None => {}
        }
    }

    /// Records idle for `idle_ns` at monotonic time `now_ns`, finished.
    pub fn flush(&mut self, now_ns: u64, idle_ns: u64) -> Vec<PacketRecord> {
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

    /// Every open record, finished.
    pub fn finish(&mut self) -> Vec<PacketRecord> {
        self.flush(u64::MAX, 0)
    }

    /// Puts a record's hops in the order the kernel saw them: nodes in the order the expected
    /// path visits them (nodes off the path last), each node's hops by timestamp.
    fn order(&self, rec: &mut PacketRecord) {
        let expected = self.plan.path(rec.direction == Direction::Forward);
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

    fn finalize(&self, mut rec: PacketRecord) -> PacketRecord {
        self.order(&mut rec);
        let expected = self.plan.path(rec.direction == Direction::Forward);
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
        let mut unexpected: Vec<u32> = rec
            .hops
            .iter()
            .filter(|h| !expected.iter().any(|s| s.hop == h.hop && s.hook == h.hook))
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
        let reached_end = expected.last().is_some_and(seen);
        if let Some(d) = &rec.drop {
            let last = expected.last().and_then(|s| self.plan.hop(s.hop));
            let at_destination = reached_end
                && last.is_some_and(|l| d.location.starts_with(&format!("{}/", l.owner)));
            let dest = last.map(|l| l.owner.as_str()).unwrap_or("the destination");
            if at_destination && &*d.reason == crate::probes::UNREPORTED {
                // Before 5.17 the kernel gives no reason: a free after delivery is most often
                // a raw socket's copy (ping's), but a filter in the pod cannot be told apart.
                rec.notes.push(format!(
                    "delivered to {dest}; the kernel then freed it without saying why (this kernel reports no drop reasons): usually a raw socket's copy, as ping's, else a netfilter rule in {dest}"
                ));
                rec.drop = None;
            } else if at_destination && after_delivery(&d.reason) {
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
        rec.fate = if rec.drop.is_some() {
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
        rec
    }
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
}
