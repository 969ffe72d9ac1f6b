//! Correlation: the events of the same packet, seen at different hops and in different
//! namespaces (and inside VXLAN on the underlay), grouped into one record with its timeline;
//! then the run's verdict from the records and the expected path.
//!
//! A packet is recognised by what no hop changes: its inner addresses, protocol, ports, IP id
//! and the TCP sequence number or ICMP id/sequence (marks are scrubbed between namespaces, so
//! they cannot be used).
use std::collections::{BTreeMap, HashMap};

use podtrace_abi::FlowInfo;
use serde::Serialize;

use super::plan::{Hook, Plan, Step};

/// What one probe saw.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    /// A tc hook on a planned hop.
    Tc { hop: u32, hook: Hook },
    /// The kernel freed the packet with a drop reason. `hop` when it happened on a planned hop's
    /// device; `location` names the place either way.
    Drop {
        hop: Option<u32>,
        location: String,
        netns_cookie: u64,
        reason: String,
    },
    /// A route lookup for the conversation.
    Fib {
        location: String,
        table: u32,
        oif: String,
        gateway: Option<String>,
        err: i32,
    },
    /// A device transmitted it (`hop` when it is a planned hop).
    Xmit { hop: Option<u32>, location: String },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub ts_ns: u64,
    pub flow: FlowInfo,
    pub skb_len: u32,
    pub seen: Seen,
}

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
    /// Every expected hop, nothing else.
    Complete,
    /// Freed by the kernel with a drop reason.
    Dropped,
    /// Seen where it should not be.
    Diverged,
    /// Stopped being seen, with no drop reported.
    Vanished,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PacketRecord {
    pub id: u64,
    pub direction: Direction,
    #[serde(skip)]
    pub flow: FlowInfo,
    pub hops: Vec<HopSeen>,
    pub drop: Option<DropSeen>,
    pub fib: Vec<FibSeen>,
    pub xmit: Vec<String>,
    /// Hops it was seen on that its direction's path does not include.
    pub unexpected: Vec<u32>,
    /// Expected steps it was not seen at.
    pub missing: Vec<Step>,
    pub fate: Fate,
    /// A drop after delivery that is not a path problem (a raw socket's copy, say).
    pub notes: Vec<String>,
}

type Key = (u32, u32, u8, u16, u16, u16, u32, u8);

fn key(f: &FlowInfo) -> Key {
    (
        f.saddr, f.daddr, f.proto, f.sport, f.dport, f.ip_id, f.seq, f.flags,
    )
}

struct Open {
    rec: PacketRecord,
    last_ts: u64,
}

/// What the kernel's drop reason most likely means, in a sentence.
pub fn drop_hint(reason: &str, location: &str) -> String {
    let owner = location.split('/').next().unwrap_or(location);
    match reason {
        "NETFILTER_DROP" => format!(
            "a netfilter rule (iptables/nftables) on {owner} dropped it: check its FORWARD/INPUT/OUTPUT chains"
        ),
        "IP_NOROUTE" | "NO_ROUTE" => format!("{owner} has no route for it"),
        "IP_RPFILTER" => format!(
            "rp_filter on {owner}: the source is not routed back through the interface it came in on"
        ),
        "NEIGH_FAILED" | "NEIGH_QUEUEFULL" | "NEIGH_DEAD" => {
            format!("neighbour (ARP) resolution failed on {owner}")
        }
        r if r.starts_with("VXLAN") => format!(
            "VXLAN on {owner} could not forward it: no FDB entry (remote VTEP) for the next hop's MAC"
        ),
        "TC_INGRESS" | "TC_EGRESS" => format!("a tc program on {owner} dropped it"),
        "PKT_TOO_SMALL" | "PKT_TOO_BIG" | "IP_OUTNOROUTES" => {
            format!("{owner} could not send it ({reason})")
        }
        "OTHERHOST" => format!("{owner} got a frame for another host's MAC"),
        "IP_INHDR" | "IP_CSUM" => format!("a malformed IP header reached {owner}"),
        "NO_SOCKET" => format!("no socket on {owner} accepted it"),
        "QDISC_DROP" | "FQ_DROP" => format!("a queue on {owner} was full"),
        crate::probes::UNREPORTED => format!(
            "the kernel dropped it on {owner}; this kernel does not say why (drop reasons came in 5.17): check netfilter rules, routes and neighbours there"
        ),
        other => format!("the kernel dropped it on {owner} ({other})"),
    }
}

/// Reasons the destination's socket layer gives for freeing a packet the network delivered:
/// not a path problem (a netfilter drop in the destination pod still is one).
pub fn after_delivery(reason: &str) -> bool {
    reason.starts_with("TCP_")
        || reason.starts_with("SOCKET_")
        || matches!(
            reason,
            "NO_SOCKET" | "NOT_SPECIFIED" | "QUEUE_PURGE" | "PROTO_MEM" | "UDP_CSUM"
        )
}

/// Groups observations into packet records.
pub struct Correlator {
    plan: Plan,
    /// The pod's address (network order, as in [`FlowInfo`]).
    pod_ip: u32,
    open: HashMap<Key, Open>,
    next_id: u64,
    /// Packets seen per hop (tc events).
    pub counts: BTreeMap<u32, u64>,
    /// FIB lookups no packet took (e.g. before the first hop event).
    pub loose_fib: Vec<FibSeen>,
}

impl Correlator {
    pub fn new(plan: Plan, pod_ip: u32) -> Self {
        Self {
            plan,
            pod_ip,
            open: HashMap::new(),
            next_id: 1,
            counts: BTreeMap::new(),
            loose_fib: Vec::new(),
        }
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    fn direction(&self, f: &FlowInfo) -> Direction {
        if f.saddr == self.pod_ip {
            Direction::Forward
        } else {
            Direction::Reverse
        }
    }

    fn open_record(&mut self, f: &FlowInfo, ts: u64) -> &mut Open {
        let id = self.next_id;
        self.next_id += 1;
        let direction = self.direction(f);
        let k = key(f);
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
                    fate: Fate::Vanished,
                    notes: Vec::new(),
                },
                last_ts: ts,
            },
        );
        self.open.get_mut(&k).expect("just inserted")
    }

    /// Takes one observation. Returns a record that a repeat of the same packet closed early.
    pub fn feed(&mut self, obs: Observation) -> Option<PacketRecord> {
        let k = key(&obs.flow);
        let mut closed = None;
        match obs.seen {
            Seen::Tc { hop, hook } => {
                *self.counts.entry(hop).or_default() += 1;
                // The same hop and hook twice: a new packet with identical headers.
                if self
                    .open
                    .get(&k)
                    .is_some_and(|o| o.rec.hops.iter().any(|h| h.hop == hop && h.hook == hook))
                {
                    let o = self.open.remove(&k).expect("checked");
                    closed = Some(self.finalize(o.rec));
                }
                let plan_hop_known = self.plan.hop(hop).is_some();
                let o = match self.open.contains_key(&k) {
                    true => self.open.get_mut(&k).expect("checked"),
                    false => self.open_record(&obs.flow, obs.ts_ns),
                };
                if plan_hop_known {
                    o.rec.hops.push(HopSeen {
                        hop,
                        hook,
                        ts_ns: obs.ts_ns,
                        encap: obs.flow.encap != 0,
                        len: obs.skb_len,
                    });
                }
                o.last_ts = o.last_ts.max(obs.ts_ns);
            }
            Seen::Drop {
                hop,
                location,
                reason,
                ..
            } => {
                let o = match self.open.contains_key(&k) {
                    true => self.open.get_mut(&k).expect("checked"),
                    false => self.open_record(&obs.flow, obs.ts_ns),
                };
                let hint = drop_hint(&reason, &location);
                o.rec.drop = Some(DropSeen {
                    hop,
                    location,
                    reason,
                    ts_ns: obs.ts_ns,
                    hint,
                });
                o.last_ts = o.last_ts.max(obs.ts_ns);
            }
            Seen::Xmit { location, .. } => {
                if let Some(o) = self.open.get_mut(&k) {
                    if !o.rec.xmit.contains(&location) {
                        o.rec.xmit.push(location);
                    }
                    o.last_ts = o.last_ts.max(obs.ts_ns);
                }
            }
            Seen::Fib {
                location,
                table,
                oif,
                gateway,
                err,
            } => {
                // -EAGAIN: this table had no answer and the rule walk went on; not a decision.
                if err == -11 {
                    return closed;
                }
                let fib = FibSeen {
                    location,
                    table,
                    oif,
                    gateway,
                    err,
                    ts_ns: obs.ts_ns,
                };
                // Route lookups carry no IP id: give it to the latest open packet between the
                // same addresses.
                let target = self
                    .open
                    .values_mut()
                    .filter(|o| {
                        o.rec.flow.saddr == obs.flow.saddr && o.rec.flow.daddr == obs.flow.daddr
                    })
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
                    // Kept for the summary, bounded: at high rates most lookups find no
                    // open packet.
                    None if self.loose_fib.len() < 256 && !self.loose_fib.iter().any(same) => {
                        self.loose_fib.push(fib)
                    }
                    None => {}
                }
            }
        }
        closed
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

    fn finalize(&self, mut rec: PacketRecord) -> PacketRecord {
        rec.hops.sort_by_key(|h| h.ts_ns);
        let expected = match rec.direction {
            Direction::Forward => &self.plan.forward,
            Direction::Reverse => &self.plan.reverse,
        };
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
        let reached_end = expected.last().is_some_and(seen);
        if let Some(d) = &rec.drop {
            let last = expected.last().and_then(|s| self.plan.hop(s.hop));
            let at_destination = reached_end
                && last.is_some_and(|l| d.location.starts_with(&format!("{}/", l.owner)));
            let dest = last.map(|l| l.owner.as_str()).unwrap_or("the destination");
            if at_destination && d.reason == crate::probes::UNREPORTED {
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
        } else if missing.is_empty() {
            Fate::Complete
        } else {
            Fate::Vanished
        };
        rec.missing = missing;
        rec.unexpected = unexpected;
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

/// A drop location and reason, with how many packets died there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DropSummary {
    pub hop: String,
    pub reason: String,
    pub hint: String,
    pub count: u64,
    pub direction: Direction,
}

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
    use super::*;
    use crate::follow::plan::{build, tests as pt};

    const POD: u32 = 0x0900_f40a; // 10.244.0.9 in network order on little endian
    const DST: u32 = 0x0501_f40a;

    fn flow(src: u32, dst: u32, id: u16, seq: u32, icmp_type: u8) -> FlowInfo {
        FlowInfo {
            saddr: src,
            daddr: dst,
            proto: 1,
            ip_id: id,
            seq,
            flags: icmp_type,
            ..FlowInfo::default()
        }
    }

    fn tc(c: &mut Correlator, f: FlowInfo, ts: u64, hop: u32, hook: Hook) -> Option<PacketRecord> {
        c.feed(Observation {
            ts_ns: ts,
            flow: f,
            skb_len: 98,
            seen: Seen::Tc { hop, hook },
        })
    }

    fn walk(c: &mut Correlator, f: FlowInfo, steps: &[Step], t0: u64) {
        for (i, s) in steps.iter().enumerate() {
            if s.hook != Hook::Bridged {
                tc(c, f, t0 + i as u64 * 1000, s.hop, s.hook);
            }
        }
    }

    #[test]
    fn a_ping_across_nodes_is_confirmed_both_ways() {
        let plan = build(&pt::cross_node(), vec![]);
        let mut c = Correlator::new(plan.clone(), POD);
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
        let plan = build(&pt::cross_node(), vec![]);
        let mut c = Correlator::new(plan.clone(), POD);
        let f = flow(POD, DST, 2, 8, 8);
        walk(&mut c, f, &plan.forward[..3], 0);
        c.feed(Observation {
            ts_ns: 5_000,
            flow: f,
            skb_len: 98,
            seen: Seen::Drop {
                hop: Some(2),
                location: "node-a/cni0".into(),
                netns_cookie: 1,
                reason: "NETFILTER_DROP".into(),
            },
        });
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
        let t = pt::topo(vec![
            pt::hop("pod-eth0", "pod-c2", "node-c", "eth0"),
            pt::hop("host-veth", "node-c", "node-c", "eni1"),
            pt::hop("uplink", "node-c", "node-c", "eth2"),
        ]);
        let plan = build(&t, vec![pt::hop("uplink", "node-c", "node-c", "eth0")]);
        let mut c = Correlator::new(plan, POD);
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
        let t = pt::topo(vec![
            pt::hop("pod-eth0", "pod-a1", "node-a", "eth0"),
            pt::hop("host-veth", "node-a", "node-a", "veth1"),
            pt::hop("bridge", "node-a", "node-a", "cni0"),
            pt::hop("host-veth", "node-a", "node-a", "veth2"),
            pt::hop("pod-eth0", "pod-a2", "node-a", "eth0"),
        ]);
        let plan = build(&t, vec![]);
        let mut c = Correlator::new(plan.clone(), POD);
        walk(&mut c, flow(POD, DST, 4, 1, 8), &plan.forward, 0);
        let recs = c.finish();
        assert_eq!(recs[0].fate, Fate::Complete, "{:?}", recs[0].missing);
    }

    #[test]
    fn benign_no_socket_after_delivery_is_not_a_drop() {
        let plan = build(&pt::cross_node(), vec![]);
        let mut c = Correlator::new(plan.clone(), POD);
        let f = flow(DST, POD, 5, 1, 0);
        walk(&mut c, f, &plan.reverse, 0);
        c.feed(Observation {
            ts_ns: 99_000,
            flow: f,
            skb_len: 98,
            seen: Seen::Drop {
                hop: None,
                location: "pod-a1/eth0".into(),
                netns_cookie: 1,
                reason: "NO_SOCKET".into(),
            },
        });
        let recs = c.finish();
        assert_eq!(recs[0].fate, Fate::Complete);
        assert_eq!(recs[0].notes.len(), 1);
        // A netfilter drop in the destination pod is a drop all the same.
        let f = flow(DST, POD, 6, 2, 0);
        walk(&mut c, f, &plan.reverse, 200_000);
        c.feed(Observation {
            ts_ns: 299_000,
            flow: f,
            skb_len: 98,
            seen: Seen::Drop {
                hop: None,
                location: "pod-a1/eth0".into(),
                netns_cookie: 1,
                reason: "NETFILTER_DROP".into(),
            },
        });
        assert_eq!(c.finish()[0].fate, Fate::Dropped);
        // A kernel without drop reasons (< 5.17): after delivery, a note that says so.
        let f = flow(DST, POD, 7, 3, 0);
        walk(&mut c, f, &plan.reverse, 400_000);
        c.feed(Observation {
            ts_ns: 499_000,
            flow: f,
            skb_len: 98,
            seen: Seen::Drop {
                hop: None,
                location: "pod-a1/eth0".into(),
                netns_cookie: 1,
                reason: crate::probes::UNREPORTED.into(),
            },
        });
        let recs = c.finish();
        assert_eq!(recs[0].fate, Fate::Complete);
        assert!(recs[0].notes[0].contains("without saying why"), "{:?}", recs[0].notes);
    }

    #[test]
    fn idle_packets_flush_and_repeats_start_new_records() {
        let plan = build(&pt::cross_node(), vec![]);
        let mut c = Correlator::new(plan, POD);
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
        let plan = build(&pt::cross_node(), vec![]);
        let mut c = Correlator::new(plan, POD);
        let f = flow(POD, DST, 7, 1, 8);
        tc(&mut c, f, 1_000, 0, Hook::Egress);
        c.feed(Observation {
            ts_ns: 1_500,
            flow: FlowInfo {
                saddr: POD,
                daddr: DST,
                proto: 1,
                ..FlowInfo::default()
            },
            skb_len: 0,
            seen: Seen::Fib {
                location: "node-a".into(),
                table: 254,
                oif: "flannel.1".into(),
                gateway: Some("10.244.1.0".into()),
                err: 0,
            },
        });
        let recs = c.finish();
        assert_eq!(recs[0].fib.len(), 1);
        assert!(c.loose_fib.is_empty());
    }
}
