//! What a drop hint can name besides the kernel's reason: the state of the node where the
//! packet died, read when the drop is judged — its neighbour entry for the next hop, its
//! rp_filter settings and route back, its netfilter rules that can drop the packet, its
//! conntrack counters since the run started. [`Facts`] is the interface (the correlator asks
//! it); [`LiveFacts`] reads the plan's namespaces over netlink, `iptables-save`, ctnetlink and
//! /proc/sys.
use std::{collections::HashMap, net::Ipv4Addr, path::PathBuf};

use crate::{
    conntrack::{Conntrack, CpuStats},
    netlink::snapshot::table_name,
    services::{iptables::Ruleset, read},
    trace::plan::Plan,
};

use super::nat::Tuple;

/// A neighbour (ARP) entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighFact {
    /// `FAILED`, `INCOMPLETE`, `REACHABLE`, `STALE`, `PERMANENT`… or `none` (no entry).
    pub state: String,
    pub mac: Option<String>,
}

/// Conntrack counters that moved since the run started, and the table's fill.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CtDelta {
    pub invalid: u64,
    pub drop: u64,
    pub insert_failed: u64,
    pub early_drop: u64,
    pub count: Option<u64>,
    pub max: Option<u64>,
}

/// The state of the plan's namespaces (by index).
pub trait Facts {
    fn neighbour(&mut self, ns: usize, ifindex: u32, ip: Ipv4Addr) -> Option<NeighFact>;
    /// A sysctl (`net/ipv4/conf/cni0/rp_filter`).
    fn sysctl(&mut self, ns: usize, key: &str) -> Option<String>;
    /// The kernel's route for `dst` (from `src`, in on `iif`), `ip route` style; `Err`: the
    /// kernel's answer when there is none.
    fn route(
        &mut self,
        ns: usize,
        dst: Ipv4Addr,
        src: Option<Ipv4Addr>,
        iif: Option<u32>,
    ) -> Result<String, String>;
    /// Filter-table rules that drop or reject packets like `t` (their text).
    fn drop_rules(&mut self, ns: usize, t: &Tuple) -> Vec<String>;
    /// Conntrack counters since the run started.
    fn conntrack_delta(&mut self, ns: usize) -> Option<CtDelta>;
}

/// Knows nothing (tests, and runs that must not touch the nodes).
pub struct NoFacts;

impl Facts for NoFacts {
    fn neighbour(&mut self, _: usize, _: u32, _: Ipv4Addr) -> Option<NeighFact> {
        None
    }
    fn sysctl(&mut self, _: usize, _: &str) -> Option<String> {
        None
    }
    fn route(
        &mut self,
        _: usize,
        _: Ipv4Addr,
        _: Option<Ipv4Addr>,
        _: Option<u32>,
    ) -> Result<String, String> {
        Err("unknown".into())
    }
    fn drop_rules(&mut self, _: usize, _: &Tuple) -> Vec<String> {
        Vec::new()
    }
    fn conntrack_delta(&mut self, _: usize) -> Option<CtDelta> {
        None
    }
}

/// NUD_* state bits, named as `ip neigh` does.
pub fn nud_name(state: u16) -> &'static str {
    match state {
        0x01 => "INCOMPLETE",
        0x02 => "REACHABLE",
        0x04 => "STALE",
        0x08 => "DELAY",
        0x10 => "PROBE",
        0x20 => "FAILED",
        0x40 => "NOARP",
        0x80 => "PERMANENT",
        0 => "NONE",
        _ => "?",
    }
}

/// The plan's namespaces, read when asked.
pub struct LiveFacts {
    paths: Vec<PathBuf>,
    rules: HashMap<usize, Option<Ruleset>>,
    baseline: HashMap<usize, CpuStats>,
}

fn ct_total(ns: &std::path::Path) -> Option<CpuStats> {
    let mut ct = Conntrack::open(Some(ns)).ok()?;
    let mut sum = CpuStats::default();
    for c in ct.cpu_stats().ok()? {
        sum.add(&c);
    }
    Some(sum)
}

impl LiveFacts {
    /// Takes the conntrack counters of the plan's node namespaces now (the baseline of
    /// [`Facts::conntrack_delta`]).
    pub fn start(plan: &Plan) -> Self {
        let paths: Vec<PathBuf> = plan.namespaces.iter().map(|n| n.path.clone()).collect();
        let mut baseline = HashMap::new();
        for (i, n) in plan.namespaces.iter().enumerate() {
            if n.owner == n.node {
                if let Some(s) = ct_total(&n.path) {
                    baseline.insert(i, s);
                }
            }
        }
        Self {
            paths,
            rules: HashMap::new(),
            baseline,
        }
    }
}

impl Facts for LiveFacts {
    fn neighbour(&mut self, ns: usize, ifindex: u32, ip: Ipv4Addr) -> Option<NeighFact> {
        let path = self.paths.get(ns)?;
        let snap = crate::netlink::run(Some(path), |nl| nl.snapshot()).ok()?;
        Some(
            match snap
                .neighs
                .iter()
                .find(|n| n.ip == ip && (ifindex == 0 || n.index == ifindex))
            {
                Some(n) => NeighFact {
                    state: nud_name(n.state).to_owned(),
                    mac: n.mac.map(|m| crate::netlink::mac_string(&m)),
                },
                None => NeighFact {
                    state: "none".to_owned(),
                    mac: None,
                },
            },
        )
    }

    fn sysctl(&mut self, ns: usize, key: &str) -> Option<String> {
        let path = self.paths.get(ns)?;
        let key = key.to_owned();
        crate::netns::run_in(Some(path), move || Ok(crate::netns::sysctl_get(&key).ok()))
            .ok()
            .flatten()
    }

    fn route(
        &mut self,
        ns: usize,
        dst: Ipv4Addr,
        src: Option<Ipv4Addr>,
        iif: Option<u32>,
    ) -> Result<String, String> {
        let path = self.paths.get(ns).ok_or("unknown namespace")?;
        crate::netlink::run(Some(path), |nl| {
            let r = nl.route_get(dst, src, iif)?;
            let snap = nl.snapshot()?;
            let via = r.gateway.map(|g| format!(" via {g}")).unwrap_or_default();
            let dev = r
                .oif
                .map(|i| format!(" dev {}", snap.name_of(i)))
                .unwrap_or_default();
            Ok(format!("{dst}{via}{dev} (table {})", table_name(r.table)))
        })
        .map_err(|e| {
            let text = format!("{e:#}");
            if text.contains("os error 101") || text.contains("unreachable") {
                format!("no route to {dst}")
            } else {
                text
            }
        })
    }

    fn drop_rules(&mut self, ns: usize, t: &Tuple) -> Vec<String> {
        let Some(path) = self.paths.get(ns).cloned() else {
            return Vec::new();
        };
        let rules = self
            .rules
            .entry(ns)
            .or_insert_with(|| read::read_node(Some(&path)).ok().map(|r| r.ruleset));
        match rules {
            Some(r) => crate::services::model::dropping_rules(r, t.src, t.dst, t.proto, t.dport),
            None => Vec::new(),
        }
    }

    fn conntrack_delta(&mut self, ns: usize) -> Option<CtDelta> {
        let path = self.paths.get(ns)?;
        let base = self.baseline.get(&ns)?;
        let now = ct_total(path)?;
        let (count, max) = crate::conntrack::proc_counts(Some(path)).unwrap_or((None, None));
        let d = |a: u32, b: u32| u64::from(a.saturating_sub(b));
        Some(CtDelta {
            invalid: d(now.invalid, base.invalid),
            drop: d(now.drop, base.drop),
            insert_failed: d(now.insert_failed, base.insert_failed),
            early_drop: d(now.early_drop, base.early_drop),
            count,
            max,
        })
    }
}
