//! Clocks of different nodes. One process on one machine stamps every hop with one clock; a
//! session through agents gets each node's hops on that node's clock (moved to this machine's
//! through the wall clocks, which NTP keeps within milliseconds). The offset between two nodes
//! is then estimated from the traced packets themselves, as NTP does from its exchanges:
//!
//! A packet leaving the reference node R at `r` and reaching node N at `n` (N's clock) bounds
//! N's offset θ (N's clock minus R's) from above: `θ ≤ n − r`, since the wire takes no negative
//! time. A reply leaving N at `n'` and reaching R at `r'` bounds it from below:
//! `θ ≥ n' − r'`. With both, θ lies in `[lo, hi]`: the estimate is the middle, the
//! uncertainty half the width. With only one direction there is no bound on one side, and a
//! cross-node delta is *not comparable* — said so, never printed wrong.
use std::collections::BTreeMap;

use serde::Serialize;

use super::correlate::PacketRecord;
use crate::trace::plan::Plan;

/// What is known of one node's clock against the reference node's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "clock", rename_all = "snake_case")]
pub enum Offset {
    /// The same clock (the same machine).
    Same,
    /// Offset and uncertainty, in ns (the node's clock minus the reference's).
    Estimated { offset_ns: i64, uncertainty_ns: i64 },
    /// Packets went one way only: no bound on one side.
    NotComparable,
}

/// One node's bounds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Bounds {
    lo: Option<i64>,
    hi: Option<i64>,
}

/// The clocks of a session's nodes.
#[derive(Debug, Clone)]
pub struct Clocks {
    /// The node every offset is against: the pod's.
    reference: String,
    /// `None`: every node shares the reference's clock.
    bounds: Option<BTreeMap<String, Bounds>>,
}

impl Clocks {
    /// One machine, one clock.
    pub fn same(reference: &str) -> Self {
        Self {
            reference: reference.to_owned(),
            bounds: None,
        }
    }

    /// Nodes on different machines: offsets to be estimated.
    pub fn estimated(reference: &str) -> Self {
        Self {
            reference: reference.to_owned(),
            bounds: Some(BTreeMap::new()),
        }
    }

    pub fn reference(&self) -> &str {
        &self.reference
    }

    /// Learns from a finished packet: the last hop on one node, the first on the next.
    pub fn observe(&mut self, plan: &Plan, r: &PacketRecord) {
        let Some(bounds) = self.bounds.as_mut() else {
            return;
        };
        // Hops are in path order across nodes (see correlate): where the node changes, the
        // packet crossed the wire between the two.
        let node = |hop: u32| plan.hop(hop).map(|h| h.node.as_str()).unwrap_or("");
        for w in r.hops.windows(2) {
            let (a, b) = (node(w[0].hop), node(w[1].hop));
            if a == b {
                continue;
            }
            let (ta, tb) = (w[0].ts_ns as i64, w[1].ts_ns as i64);
            // θ_b − θ_a ≤ tb − ta for the direction the packet went.
            if a == self.reference {
                let e = bounds.entry(b.to_owned()).or_default();
                e.hi = Some(e.hi.map_or(tb - ta, |h| h.min(tb - ta)));
            } else if b == self.reference {
                let e = bounds.entry(a.to_owned()).or_default();
                e.lo = Some(e.lo.map_or(ta - tb, |l| l.max(ta - tb)));
            }
        }
    }

    /// What is known of `node`'s clock.
    pub fn offset(&self, node: &str) -> Offset {
        let Some(bounds) = &self.bounds else {
            return Offset::Same;
        };
        if node == self.reference {
            return Offset::Same;
        }
        match bounds.get(node) {
            Some(Bounds {
                lo: Some(lo),
                hi: Some(hi),
            }) => {
                // Asymmetric or drifting paths can cross the bounds: then the estimate is the
                // middle all the same, the uncertainty their distance.
                let (lo, hi) = (*lo.min(hi), *lo.max(hi));
                Offset::Estimated {
                    offset_ns: lo + (hi - lo) / 2,
                    uncertainty_ns: (hi - lo) / 2,
                }
            }
            _ => Offset::NotComparable,
        }
    }

    /// `ts` of `node` on the reference node's clock; `None` when not comparable.
    pub fn to_reference(&self, node: &str, ts: u64) -> Option<i64> {
        match self.offset(node) {
            Offset::Same => Some(ts as i64),
            Offset::Estimated { offset_ns, .. } => Some(ts as i64 - offset_ns),
            Offset::NotComparable => None,
        }
    }

    /// Every node's offset (for the summary).
    pub fn all(&self, nodes: &[&str]) -> Vec<NodeClock> {
        nodes
            .iter()
            .map(|n| NodeClock {
                node: (*n).to_owned(),
                offset: self.offset(n),
            })
            .collect()
    }
}

/// A node's clock in the summary.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeClock {
    pub node: String,
    #[serde(flatten)]
    pub offset: Offset,
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::{
        follow::correlate::{Correlator, Direction},
        topology::plan::tests::{cross_node, plan_of},
        trace::{
            event::{Flow, HopEvent},
            TraceEvent,
        },
    };

    const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 9);
    const DST: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);

    /// A ping and its reply across nodes: node-b's clock is `skew` ahead of node-a's; from the
    /// last hop of one node to the first of the other takes `one_way` (the wire) plus the
    /// 1 µs every hop takes.
    fn exchange(c: &mut Correlator, plan: &Plan, t0: u64, skew: i64, one_way: u64, seq: u32) {
        let stamp = |node: &str, t: u64| -> u64 {
            if node == "node-b" {
                (t as i64 + skew) as u64
            } else {
                t
            }
        };
        let mut feed = |steps: &[crate::trace::plan::Step], flow: Flow, start: u64| {
            let mut t = start;
            let mut prev_node = String::new();
            for s in steps {
                let h = plan.hop(s.hop).unwrap();
                if !prev_node.is_empty() && prev_node != h.node {
                    t += one_way;
                }
                prev_node = h.node.clone();
                c.feed(&TraceEvent::Hop(HopEvent {
                    ts_ns: stamp(&h.node, t),
                    hop: s.hop,
                    hook: s.hook,
                    len: 84,
                    flow,
                    packet: None,
                }));
                t += 1_000;
            }
            t
        };
        let req = Flow {
            src: POD,
            dst: DST,
            proto: 1,
            flags: 8,
            seq,
            ..Flow::default()
        };
        let back = feed(&plan.forward, req, t0);
        let rep = Flow {
            src: DST,
            dst: POD,
            proto: 1,
            flags: 0,
            seq,
            ..Flow::default()
        };
        feed(&plan.reverse, rep, back + 5_000);
    }

    fn run(skew: i64, one_way: u64, both_ways: bool) -> Clocks {
        let plan = plan_of(&cross_node());
        let mut c = Correlator::new(plan.clone());
        let mut clocks = Clocks::estimated("node-a");
        for i in 0..5 {
            exchange(
                &mut c,
                &plan,
                1_000_000_000 + i * 10_000_000,
                skew,
                one_way,
                i as u32,
            );
        }
        for r in c.finish() {
            if both_ways || r.direction == Direction::Forward {
                clocks.observe(&plan, &r);
            }
        }
        clocks
    }

    #[test]
    fn a_skewed_clock_is_estimated_within_the_wire_time() {
        // node-b runs 3.2 ms ahead; 40 µs on the wire each way (41 µs hop to hop).
        let clocks = run(3_200_000, 40_000, true);
        match clocks.offset("node-b") {
            Offset::Estimated {
                offset_ns,
                uncertainty_ns,
            } => {
                assert_eq!(offset_ns, 3_200_000);
                assert_eq!(uncertainty_ns, 41_000);
            }
            o => panic!("{o:?}"),
        }
        assert_eq!(clocks.offset("node-a"), Offset::Same);
        // A hop of node-b moved back onto node-a's clock.
        assert_eq!(clocks.to_reference("node-b", 3_200_500), Some(500));
    }

    #[test]
    fn behind_works_as_ahead() {
        let clocks = run(-7_000_000_000, 25_000, true);
        assert_eq!(
            clocks.offset("node-b"),
            Offset::Estimated {
                offset_ns: -7_000_000_000,
                uncertainty_ns: 26_000
            }
        );
    }

    #[test]
    fn one_direction_is_not_comparable() {
        let clocks = run(3_200_000, 40_000, false);
        assert_eq!(clocks.offset("node-b"), Offset::NotComparable);
        assert_eq!(clocks.to_reference("node-b", 1), None);
    }

    #[test]
    fn one_machine_is_one_clock() {
        let c = Clocks::same("node-a");
        assert_eq!(c.offset("node-b"), Offset::Same);
        assert_eq!(c.to_reference("node-b", 42), Some(42));
    }
}
