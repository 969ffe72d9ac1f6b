//! What `follow` prints: one block (or JSON line) per packet, then the summary. The JSON lines
//! are typed structs serialized once (contract: shared/design.md §2); the text is made from
//! the same structs.
use std::{collections::BTreeMap, fmt::Write as _};

use serde::Serialize;

use super::{
    clock::{Clocks, NodeClock, Offset},
    correlate::{
        drops, verdict, Correlator, Direction, DropSeen, DropSummary, Fate, FibSeen, PacketRecord,
        Translation, Verdict,
    },
    nat::Conversation,
};
use crate::{
    probes::hooks::HookReport,
    trace::{
        event::Flow,
        nat::{NatKind, NatPlan, ServiceInfo},
        plan::{Hook, Plan, Role, Step},
    },
};

/// `icmp echo-request 10.244.0.9 > 10.244.1.5 id 7 seq 1`.
pub fn describe(f: &Flow) -> String {
    match f.proto {
        1 => {
            let kind = match f.flags {
                8 => "echo-request".to_owned(),
                0 => "echo-reply".to_owned(),
                3 => "unreachable".to_owned(),
                11 => "time-exceeded".to_owned(),
                t => format!("type {t}"),
            };
            match f.about {
                Some(q) if f.is_icmp_error() => format!(
                    "icmp {} {} > {} about {} {}",
                    icmp_error_name(f.flags, f.icmp_code),
                    f.src,
                    f.dst,
                    match q.proto {
                        6 => "tcp".to_owned(),
                        17 => "udp".to_owned(),
                        1 => "icmp".to_owned(),
                        p => format!("proto {p}"),
                    },
                    super::nat::Tuple::quoted(f)
                        .map(|t| t.to_string())
                        .unwrap_or_default()
                ),
                _ => format!(
                    "icmp {kind} {} > {} id {} seq {}",
                    f.src,
                    f.dst,
                    f.seq >> 16,
                    f.seq & 0xffff
                ),
            }
        }
        6 => {
            let mut flags = String::new();
            for (bit, c) in [
                (0x02, 'S'),
                (0x10, '.'),
                (0x08, 'P'),
                (0x01, 'F'),
                (0x04, 'R'),
            ] {
                if f.flags & bit != 0 {
                    flags.push(c);
                }
            }
            format!(
                "tcp {}:{} > {}:{} [{flags}] seq {}",
                f.src, f.sport, f.dst, f.dport, f.seq
            )
        }
        17 => format!(
            "udp {}:{} > {}:{} len {}",
            f.src, f.sport, f.dst, f.dport, f.ip_len
        ),
        p => format!("proto {p} {} > {}", f.src, f.dst),
    }
}

/// A packet's headers in the JSON line.
#[derive(Debug, Serialize)]
pub struct FlowJson {
    pub src: String,
    pub dst: String,
    pub proto: &'static str,
    pub ip_id: u16,
    pub len: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp_type: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp_id: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp_seq: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sport: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dport: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_seq: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_flags: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp_code: Option<u8>,
    /// An ICMP error: the packet it is about, as it quotes it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub about: Option<String>,
}

impl From<&Flow> for FlowJson {
    fn from(f: &Flow) -> Self {
        let (icmp, tcp, ports) = (f.proto == 1, f.proto == 6, f.proto == 6 || f.proto == 17);
        Self {
            src: f.src.to_string(),
            dst: f.dst.to_string(),
            proto: match f.proto {
                1 => "icmp",
                6 => "tcp",
                17 => "udp",
                _ => "other",
            },
            ip_id: f.ip_id,
            len: f.ip_len,
            icmp_type: icmp.then_some(f.flags),
            icmp_id: icmp.then_some(f.seq >> 16),
            icmp_seq: icmp.then_some(f.seq & 0xffff),
            sport: ports.then_some(f.sport),
            dport: ports.then_some(f.dport),
            tcp_seq: tcp.then_some(f.seq),
            tcp_flags: tcp.then_some(f.flags),
            icmp_code: f.is_icmp_error().then_some(f.icmp_code),
            about: f
                .about
                .filter(|_| f.is_icmp_error())
                .and_then(|_| super::nat::Tuple::quoted(f))
                .map(|t| t.to_string()),
        }
    }
}

/// A step of a path, named.
#[derive(Debug, Serialize)]
pub struct StepJson {
    pub name: Option<String>,
    pub node: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub ifindex: Option<u32>,
    pub role: Option<Role>,
    pub hook: Hook,
}

fn step_json(plan: &Plan, s: &Step) -> StepJson {
    let h = plan.hop(s.hop);
    StepJson {
        name: h.map(|h| h.name.clone()),
        node: h.map(|h| h.node.clone()),
        netns: h.map(|h| h.netns.clone()),
        ifname: h.map(|h| h.ifname.clone()),
        ifindex: h.map(|h| h.ifindex),
        role: h.map(|h| h.role),
        hook: s.hook,
    }
}

/// One hop a packet was seen at, with its timing.
#[derive(Debug, Serialize)]
pub struct HopJson {
    pub name: Option<String>,
    pub node: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub ifindex: Option<u32>,
    pub hook: Hook,
    /// The kernel's timestamp, on this machine's clock (an agent's moved here through the
    /// wall clocks).
    pub ts_ns: u64,
    /// Since the first hop, on the pod's node's clock; `null` when this hop's node's clock
    /// cannot be compared with it (packets seen one way only).
    pub since_first_ns: Option<i64>,
    /// Since the hop before; `null` when not comparable.
    pub delta_ns: Option<i64>,
    /// How well this hop's time compares with the pod's node's, when they are different
    /// machines (± ns).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clock_uncertainty_ns: Option<i64>,
    pub encap: &'static str,
    pub len: u32,
    pub expected: bool,
    /// The packet's addresses and ports at this hop (they change where NAT rewrote them).
    pub tuple: String,
}

/// A step seen before one the path puts ahead of it.
#[derive(Debug, Serialize)]
pub struct OutOfOrderJson {
    pub hop: StepJson,
    pub seen_before: StepJson,
}

/// `{"type":"packet", ...}`.
#[derive(Debug, Serialize)]
pub struct PacketJson<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub id: u64,
    pub direction: Direction,
    pub flow: FlowJson,
    pub summary: String,
    pub fate: Fate,
    pub hops: Vec<HopJson>,
    pub drop: &'a Option<DropSeen>,
    pub fib: &'a [FibSeen],
    pub xmit: &'a [String],
    pub missing: Vec<StepJson>,
    pub out_of_order: Vec<OutOfOrderJson>,
    pub notes: &'a [String],
    /// Rewrites of its headers along the way (which node, which hook, from what to what).
    #[serde(skip_serializing_if = "<[Translation]>::is_empty")]
    pub nat: &'a [Translation],
    /// The Service backend (or masquerade target) its connection was translated to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// A reply that reached the pod still carrying the backend's addresses.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub untranslated: bool,
}

fn arrow(d: Direction) -> &'static str {
    match d {
        Direction::Forward => "→",
        Direction::Reverse => "←",
    }
}

/// Each hop's time on the reference clock (`None`: not comparable), and ± when estimated.
fn timeline(plan: &Plan, r: &PacketRecord, clocks: &Clocks) -> Vec<(Option<i64>, Option<i64>)> {
    r.hops
        .iter()
        .map(|h| {
            let node = plan.hop(h.hop).map(|p| p.node.as_str()).unwrap_or("");
            let u = match clocks.offset(node) {
                Offset::Estimated { uncertainty_ns, .. } => Some(uncertainty_ns),
                _ => None,
            };
            (clocks.to_reference(node, h.ts_ns), u)
        })
        .collect()
}

pub fn packet_json<'a>(plan: &Plan, r: &'a PacketRecord, clocks: &Clocks) -> PacketJson<'a> {
    let times = timeline(plan, r, clocks);
    let t0 = times.first().and_then(|t| t.0);
    let mut prev = t0;
    let hops = r
        .hops
        .iter()
        .zip(&times)
        .map(|(h, (t, u))| {
            let p = plan.hop(h.hop);
            let v = HopJson {
                name: p.map(|p| p.name.clone()),
                node: p.map(|p| p.node.clone()),
                netns: p.map(|p| p.netns.clone()),
                ifname: p.map(|p| p.ifname.clone()),
                ifindex: p.map(|p| p.ifindex),
                hook: h.hook,
                ts_ns: h.ts_ns,
                since_first_ns: t.zip(t0).map(|(t, t0)| t - t0),
                delta_ns: t.zip(prev).map(|(t, p)| t - p),
                clock_uncertainty_ns: *u,
                encap: if h.encap { "vxlan" } else { "none" },
                len: h.len,
                expected: !r.unexpected.contains(&h.hop),
                tuple: h.tuple.to_string(),
            };
            prev = *t;
            v
        })
        .collect();
    PacketJson {
        kind: "packet",
        id: r.id,
        direction: r.direction,
        flow: FlowJson::from(&r.flow),
        summary: describe(&r.flow),
        fate: r.fate,
        hops,
        drop: &r.drop,
        fib: &r.fib,
        xmit: &r.xmit,
        missing: r.missing.iter().map(|s| step_json(plan, s)).collect(),
        out_of_order: r
            .out_of_order
            .iter()
            .map(|o| OutOfOrderJson {
                hop: step_json(plan, &o.early),
                seen_before: step_json(plan, &o.before),
            })
            .collect(),
        notes: &r.notes,
        nat: &r.nat,
        backend: target_label(plan, r.target),
        untranslated: r.untranslated,
    }
}

fn target_label(plan: &Plan, target: Option<usize>) -> Option<String> {
    let t = plan.nat.as_ref()?.targets.get(target?)?;
    Some(t.label())
}

fn step_name(plan: &Plan, s: &Step) -> String {
    plan.hop(s.hop)
        .map(|h| format!("{} {}", h.name, s.hook.as_str()))
        .unwrap_or_else(|| format!("hop {} {}", s.hop, s.hook.as_str()))
}

pub fn packet_text(plan: &Plan, r: &PacketRecord, clocks: &Clocks) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "#{} {} {}",
        r.id,
        arrow(r.direction),
        describe(&r.flow)
    );
    let times = timeline(plan, r, clocks);
    let t0 = times.first().and_then(|t| t.0);
    let mut prev = t0;
    let mut prev_tuple = r.hops.first().map(|h| h.tuple);
    let mut incomparable = false;
    let mut prev_node = "";
    for (h, (t, u)) in r.hops.iter().zip(&times) {
        let name = plan.hop(h.hop).map(|p| p.name.as_str()).unwrap_or("?");
        let node = plan.hop(h.hop).map(|p| p.node.as_str()).unwrap_or("");
        // Within a node the delta is on one clock: exact; across nodes, as good as the
        // estimate of the second node's clock.
        let u = if node != prev_node && !prev_node.is_empty() {
            *u
        } else {
            None
        };
        prev_node = node;
        let mark = if r.unexpected.contains(&h.hop) {
            "  ← not on the expected path"
        } else if r.flooded.contains(&Step {
            hop: h.hop,
            hook: h.hook,
        }) {
            "  (a flooded copy)"
        } else {
            ""
        };
        let rewritten = if prev_tuple != Some(h.tuple) {
            format!("  now {}", h.tuple)
        } else {
            String::new()
        };
        prev_tuple = Some(h.tuple);
        let ms = |ns: i64| format!("{:.3}", ns as f64 / 1e6);
        let (since, delta) = match (t, t0, prev) {
            (Some(t), Some(t0), Some(p)) => (ms(t - t0), format!("+{}", ms(t - p))),
            _ => {
                incomparable = true;
                ("?".to_owned(), "?".to_owned())
            }
        };
        let plus_minus = u.map(|u| format!(" ±{}", ms(u))).unwrap_or_default();
        let _ = writeln!(
            out,
            "    {since:>9} ms  ({delta:>8}{plus_minus})  {:<28} {:<7}{}{}{}",
            name,
            h.hook.as_str(),
            if h.encap { "  [in vxlan]" } else { "" },
            rewritten,
            mark
        );
        prev = *t;
    }
    if incomparable {
        let _ = writeln!(
            out,
            "    (?: this node's clock cannot be compared with {}'s: packets seen one way only)",
            clocks.reference()
        );
    }
    for t in &r.nat {
        let _ = writeln!(
            out,
            "    nat   {} {}: {} → {} (between {} and {}){}",
            t.node,
            t.hook,
            t.from,
            t.to,
            t.after,
            t.before,
            t.rule
                .as_deref()
                .map(|x| format!(" — {x}"))
                .unwrap_or_default()
        );
    }
    for f in &r.fib {
        let _ = writeln!(out, "    {}", f.text());
    }
    if let Some(d) = &r.drop {
        let _ = writeln!(
            out,
            "    DROPPED at {} by the kernel: {} — {}",
            d.location, d.reason, d.hint
        );
    }
    for o in &r.out_of_order {
        let _ = writeln!(
            out,
            "    OUT OF ORDER: {} was seen before {}",
            step_name(plan, &o.early),
            step_name(plan, &o.before)
        );
    }
    for n in &r.notes {
        let _ = writeln!(out, "    note: {n}");
    }
    if r.fate == Fate::Vanished && !r.missing.is_empty() {
        let names: Vec<String> = r
            .missing
            .iter()
            .filter(|s| s.hook != Hook::Bridged)
            .map(|s| step_name(plan, s))
            .collect();
        let _ = writeln!(out, "    not seen at: {}", names.join(", "));
    }
    out
}

/// The last line of `follow --json`.
#[derive(Debug, Serialize)]
pub struct Summary {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub verdict: Verdict,
    /// Through a Service: the path to the backend most connections were translated to.
    pub expected_path: Vec<StepJson>,
    pub expected_reverse_path: Vec<StepJson>,
    /// The steps the packet that went furthest was seen at, in the order it was seen
    /// (expected or not; a bridge crossed at layer 2 where both its ports saw it).
    pub observed_path: Vec<StepJson>,
    pub observed_reverse_path: Vec<StepJson>,
    /// Packets seen per hop.
    pub interfaces: BTreeMap<String, u64>,
    pub drops: Vec<DropSummary>,
    /// Packets seen at expected hops out of the expected order.
    pub out_of_order: u64,
    pub lost_events: u64,
    /// Each node's clock against the pod's node's.
    pub clocks: Vec<NodeClock>,
    /// Parts of the path that could not be observed (a node without an agent, an agent lost
    /// mid-run): then `confirmed` covers the observed part only.
    pub unobserved: Vec<String>,
    pub packets: usize,
    pub packets_forward: usize,
    pub packets_reverse: usize,
    pub kernel_hooks: Vec<HookReport>,
    /// Route lookups that found no route, with no packet of the run to give them to.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub no_route: Vec<String>,
    /// How the path rewrote the conversation (a Service, a masquerade), when it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nat: Option<NatSummary>,
}

/// A Service backend (or the masquerade's destination) and how the run used it.
#[derive(Debug, Serialize)]
pub struct TargetJson {
    pub ip: String,
    pub port: Option<u16>,
    pub pod: Option<String>,
    pub node: Option<String>,
    pub chain: Option<String>,
    /// Its share of new connections (0..1).
    pub share: Option<f64>,
    /// The address the node masquerades connections to it to, and why.
    pub snat: Option<String>,
    pub snat_rule: Option<String>,
    pub hairpin: bool,
    /// Connections of the run translated to it, and their packets.
    pub connections: usize,
    pub packets: usize,
    pub expected_path: Vec<StepJson>,
    pub expected_reverse_path: Vec<StepJson>,
}

/// A fault the run shows (`no_endpoints`, `nat_not_undone`, `backend_refused`, `no_reply`,
/// `not_translated`, `hairpin`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Fault {
    pub kind: &'static str,
    pub text: String,
}

/// `"nat"` of the summary.
#[derive(Debug, Serialize)]
pub struct NatSummary {
    pub kind: NatKind,
    /// The node whose rules rewrite it.
    pub node: String,
    pub read_with: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceInfo>,
    pub targets: Vec<TargetJson>,
    /// The pod's connections (the latest 256): as sent, as translated, the backend,
    /// conntrack's word.
    pub connections: Vec<ConnectionJson>,
    /// Connections of the run in all.
    pub connections_total: u64,
    pub faults: Vec<Fault>,
    pub notes: Vec<String>,
    /// Packets of translated-looking addresses no connection of the pod could be tied to,
    /// and packets that matched several.
    pub unattributed: u64,
    pub ambiguous: u64,
}

/// Connections the summary lists at most.
const MAX_CONNECTIONS: usize = 256;

/// One connection of the pod through the rewrite.
#[derive(Debug, Serialize)]
pub struct ConnectionJson {
    #[serde(flatten)]
    pub conv: Conversation,
    pub backend: Option<String>,
}

/// The observed path of the packet that went furthest in direction `d` (among `records`).
fn observed(plan: &Plan, records: &[&PacketRecord], d: Direction) -> Vec<StepJson> {
    let Some(best) = records
        .iter()
        .filter(|r| r.direction == d && !r.flow.is_icmp_error())
        .max_by_key(|r| (r.hops.len(), std::cmp::Reverse(r.id)))
    else {
        return Vec::new();
    };
    let expected = &best.expected;
    let mut steps: Vec<Step> = Vec::new();
    for h in &best.hops {
        let s = Step {
            hop: h.hop,
            hook: h.hook,
        };
        if best.flooded.contains(&s) {
            continue;
        }
        // A bridge crossed between two ports seen in a row.
        if let (Some(prev), Some(i)) = (steps.last(), expected.iter().position(|e| *e == s)) {
            if i >= 2 && expected[i - 1].hook == Hook::Bridged && expected[i - 2] == *prev {
                steps.push(expected[i - 1]);
            }
        }
        if !steps.contains(&s) {
            steps.push(s);
        }
    }
    steps.iter().map(|s| step_json(plan, s)).collect()
}

/// The target most records went to.
fn chosen(records: &[PacketRecord]) -> Option<usize> {
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    for r in records {
        if let Some(t) = r.target {
            *counts.entry(t).or_default() += 1;
        }
    }
    counts
        .into_iter()
        .max_by_key(|(t, n)| (*n, std::cmp::Reverse(*t)))
        .map(|(t, _)| t)
}

pub fn summary(
    c: &Correlator,
    records: &[PacketRecord],
    lost: u64,
    hooks: &[HookReport],
    clocks: &Clocks,
    unobserved: Vec<String>,
) -> Summary {
    let plan = c.plan();
    let pick = chosen(records);
    let (fwd, rev): (&[Step], &[Step]) = match pick.and_then(|t| plan.nat.as_ref()?.targets.get(t))
    {
        Some(t) => (&t.forward, &t.reverse),
        None => (&plan.forward, &plan.reverse),
    };
    let judged: Vec<&PacketRecord> = records
        .iter()
        .filter(|r| pick.is_none() || r.target == pick)
        .collect();
    Summary {
        kind: "summary",
        verdict: verdict(records),
        expected_path: fwd.iter().map(|s| step_json(plan, s)).collect(),
        expected_reverse_path: rev.iter().map(|s| step_json(plan, s)).collect(),
        observed_path: observed(plan, &judged, Direction::Forward),
        observed_reverse_path: observed(plan, &judged, Direction::Reverse),
        interfaces: plan
            .hops
            .iter()
            .map(|h| (h.name.clone(), c.counts.get(&h.id).copied().unwrap_or(0)))
            .collect(),
        drops: drops(records),
        out_of_order: records
            .iter()
            .filter(|r| r.fate == Fate::OutOfOrder)
            .count() as u64,
        lost_events: lost,
        clocks: clocks.all(&plan.nodes()),
        unobserved,
        packets: records.len(),
        packets_forward: records
            .iter()
            .filter(|r| r.direction == Direction::Forward)
            .count(),
        packets_reverse: records
            .iter()
            .filter(|r| r.direction == Direction::Reverse)
            .count(),
        kernel_hooks: hooks.to_vec(),
        no_route: c
            .loose_fib
            .iter()
            .filter(|f| f.err != 0)
            .map(FibSeen::text)
            .collect(),
        nat: plan.nat.as_ref().map(|n| nat_summary(c, n, records)),
    }
}

fn nat_summary(c: &Correlator, n: &NatPlan, records: &[PacketRecord]) -> NatSummary {
    let plan = c.plan();
    let targets = n
        .targets
        .iter()
        .enumerate()
        .map(|(i, t)| TargetJson {
            ip: t.ip.to_string(),
            port: t.port,
            pod: t.pod.clone(),
            node: t.node.clone(),
            chain: t.chain.clone(),
            share: t.share_ppm.map(|p| f64::from(p) / 1e6),
            snat: t.snat.map(|a| a.to_string()),
            snat_rule: t.snat_rule.clone(),
            hairpin: t.hairpin,
            connections: c
                .convs
                .list
                .values()
                .filter(|v| v.target == Some(i))
                .count(),
            packets: records.iter().filter(|r| r.target == Some(i)).count(),
            expected_path: t.forward.iter().map(|s| step_json(plan, s)).collect(),
            expected_reverse_path: t.reverse.iter().map(|s| step_json(plan, s)).collect(),
        })
        .collect();
    NatSummary {
        kind: n.kind,
        node: n.node.clone(),
        read_with: n.read_with.clone(),
        service: n.service.clone(),
        targets,
        // The latest connections (a long run's many are counted, not listed).
        connections: c
            .convs
            .list
            .values()
            .rev()
            .take(MAX_CONNECTIONS)
            .rev()
            .map(|v| ConnectionJson {
                conv: v.clone(),
                backend: target_label(plan, v.target),
            })
            .collect(),
        connections_total: c.convs.list.len() as u64 + c.convs.forgotten,
        faults: faults(c, n, records),
        notes: n.notes.clone(),
        unattributed: c.convs.unattributed,
        ambiguous: c.convs.ambiguous,
    }
}

/// The faults the run's records and conntrack's answers show.
pub fn faults(c: &Correlator, n: &NatPlan, records: &[PacketRecord]) -> Vec<Fault> {
    let plan = c.plan();
    let pod = plan
        .hops
        .first()
        .map(|h| h.owner.clone())
        .unwrap_or_default();
    let mut out: Vec<Fault> = Vec::new();
    let mut push = |f: Fault| {
        if !out.contains(&f) {
            out.push(f)
        }
    };
    if let Some(svc) = &n.service {
        if n.targets.is_empty() && !records.is_empty() {
            let rule = svc
                .rejects
                .first()
                .map(|r| {
                    format!(
                        "{} {}: {}{}",
                        r.table,
                        r.chain,
                        r.target,
                        r.reject_with
                            .as_deref()
                            .map(|w| format!(" {w}"))
                            .unwrap_or_default()
                    )
                })
                .unwrap_or_else(|| "no backend chain".into());
            let answer = records
                .iter()
                .find(|r| r.flow.is_icmp_error() && r.direction == Direction::Reverse)
                .map(|r| {
                    format!(
                        "; {} answered with ICMP {} from {}",
                        n.node,
                        icmp_error_name(r.flow.flags, r.flow.icmp_code),
                        r.flow.src
                    )
                })
                .unwrap_or_default();
            push(Fault {
                kind: "no_endpoints",
                text: format!(
                    "{} ({}{}/{}) has no endpoints: kube-proxy on {} rejects new connections ({rule}){answer}",
                    svc.name,
                    svc.ip,
                    svc.port.map(|p| format!(":{p}")).unwrap_or_default(),
                    svc.protocol,
                    n.node
                ),
            });
        }
    }
    for r in records {
        let t = r.target.and_then(|t| n.targets.get(t));
        if r.untranslated {
            if let Some(d) = &r.drop {
                push(Fault {
                    kind: "nat_not_undone",
                    text: d.hint.clone(),
                });
            }
        }
        // A backend that answers with a reset or a port unreachable.
        if let Some(t) = t {
            let from_backend = r.hops.first().is_some_and(|h| h.tuple.src == t.ip);
            let rst = r.flow.proto == 6 && r.flow.flags & 0x04 != 0;
            let unreach = r.flow.is_icmp_error() && r.flow.flags == 3 && r.flow.src == t.ip;
            if r.direction == Direction::Reverse && ((from_backend && rst) || unreach) {
                push(Fault {
                    kind: "backend_refused",
                    text: format!(
                        "backend {} refused the connection ({}): nothing listens on port {} there",
                        t.label(),
                        if rst {
                            "TCP reset"
                        } else {
                            "ICMP port unreachable"
                        },
                        t.port.map(|p| p.to_string()).unwrap_or_else(|| "?".into())
                    ),
                });
            }
            if t.hairpin && r.fate == Fate::Complete && r.direction == Direction::Forward {
                push(Fault {
                    kind: "hairpin",
                    text: format!(
                        "{pod} reached itself through the Service — out of its veth and back in (the bridge port's hairpin mode), its source masqueraded to {} so that the reply returns through {}",
                        t.snat.map(|a| a.to_string()).unwrap_or_else(|| "the bridge's address".into()),
                        n.node
                    ),
                });
            }
        }
    }
    for v in c.convs.list.values() {
        let recs: Vec<&PacketRecord> = records.iter().filter(|r| r.conv == v.id).collect();
        if recs.is_empty() {
            continue;
        }
        let replies = recs
            .iter()
            .any(|r| r.direction == Direction::Reverse && !r.flow.is_icmp_error());
        let errors: Vec<String> = recs
            .iter()
            .filter(|r| r.direction == Direction::Reverse && r.flow.is_icmp_error())
            .map(|r| {
                format!(
                    "; ICMP {} from {}",
                    icmp_error_name(r.flow.flags, r.flow.icmp_code),
                    r.hops.first().map(|h| h.tuple.src).unwrap_or(r.flow.src)
                )
            })
            .take(1)
            .collect();
        let translated = v.translated.is_some_and(|t| t != v.orig);
        match v.target.and_then(|t| n.targets.get(t)) {
            Some(t) if !replies => {
                let ct = v
                    .conntrack
                    .as_ref()
                    .map(|a| {
                        format!(
                            "; conntrack on {}: {}{}",
                            a.node,
                            a.tcp_state.clone().unwrap_or_default(),
                            if a.has("SEEN_REPLY") {
                                " (a reply was seen)"
                            } else {
                                ", no SEEN_REPLY: the backend never answered"
                            }
                        )
                    })
                    .unwrap_or_default();
                let died = recs
                    .iter()
                    .find_map(|r| r.drop.as_ref())
                    .map(|d| format!("; dropped at {}: {}", d.location, d.reason))
                    .unwrap_or_default();
                push(Fault {
                    kind: "no_reply",
                    text: format!(
                        "no reply from backend {} for {}{died}{}{ct}",
                        t.label(),
                        v.orig,
                        errors.concat()
                    ),
                });
            }
            None if n.kind == NatKind::Service && !translated && !n.targets.is_empty() => {
                let died = recs
                    .iter()
                    .find_map(|r| r.drop.as_ref())
                    .map(|d| format!(": dropped at {} ({})", d.location, d.reason))
                    .unwrap_or_default();
                push(Fault {
                    kind: "not_translated",
                    text: format!(
                        "{} was never translated to a backend (no conntrack entry on {}, no translated packet seen){died}",
                        v.orig, n.node
                    ),
                });
            }
            _ => {}
        }
    }
    out
}

fn icmp_error_name(t: u8, code: u8) -> String {
    match (t, code) {
        (3, 0) => "net unreachable".into(),
        (3, 1) => "host unreachable".into(),
        (3, 3) => "port unreachable".into(),
        (3, 9) | (3, 10) | (3, 13) => "administratively prohibited".into(),
        (3, c) => format!("destination unreachable (code {c})"),
        (11, _) => "time exceeded".into(),
        (t, c) => format!("type {t} code {c}"),
    }
}

/// What `follow` prints at start about a rewrite: the Service and its backends, the expected
/// path to each.
pub fn nat_plan_text(plan: &Plan, n: &NatPlan) -> String {
    let mut out = String::new();
    match &n.service {
        Some(s) => {
            let _ = writeln!(
                out,
                "service {}: {}{}/{} is its {} (kube-proxy rules on {}, read with {})",
                s.name,
                s.ip,
                s.port.map(|p| format!(":{p}")).unwrap_or_default(),
                s.protocol,
                s.frontend,
                n.node,
                n.read_with
            );
            if n.targets.is_empty() {
                let _ = writeln!(
                    out,
                    "  no endpoints: {} rejects new connections{}",
                    n.node,
                    s.rejects
                        .first()
                        .map(|r| format!(" ({} {}: {})", r.table, r.chain, r.target))
                        .unwrap_or_default()
                );
            }
        }
        None => {
            for note in &n.notes {
                let _ = writeln!(out, "{note}");
            }
        }
    }
    for t in &n.targets {
        let share = t
            .share_ppm
            .map(|p| format!(" {:>5.1}%", f64::from(p) / 1e4))
            .unwrap_or_default();
        let snat = t
            .snat
            .map(|a| format!(", masqueraded to {a}"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  → {}{share}{}{snat}{}",
            t.label(),
            t.chain
                .as_deref()
                .map(|c| format!(" {c}"))
                .unwrap_or_default(),
            if t.hairpin { " (hairpin)" } else { "" }
        );
        let _ = writeln!(
            out,
            "      expected →  {}",
            t.forward
                .iter()
                .filter_map(|s| plan
                    .hop(s.hop)
                    .map(|h| format!("{} {}", h.name, s.hook.as_str())))
                .collect::<Vec<_>>()
                .join(" > ")
        );
    }
    if n.targets.is_empty() {
        let _ = writeln!(
            out,
            "expected →  {}",
            plan.forward
                .iter()
                .filter_map(|s| plan
                    .hop(s.hop)
                    .map(|h| format!("{} {}", h.name, s.hook.as_str())))
                .collect::<Vec<_>>()
                .join(" > ")
        );
    }
    if n.service.is_some() {
        for note in &n.notes {
            let _ = writeln!(out, "  note: {note}");
        }
    }
    out
}

fn path_text(steps: &[StepJson]) -> String {
    steps
        .iter()
        .map(|s| format!("{} {}", s.name.as_deref().unwrap_or("?"), s.hook.as_str()))
        .collect::<Vec<_>>()
        .join(" > ")
}

pub fn summary_text(plan: &Plan, s: &Summary) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nverdict: {}  ({} packets: {} →, {} ←)",
        s.verdict.as_str().to_uppercase(),
        s.packets,
        s.packets_forward,
        s.packets_reverse
    );
    let _ = writeln!(out, "expected →  {}", path_text(&s.expected_path));
    let _ = writeln!(out, "observed →  {}", path_text(&s.observed_path));
    if s.packets_reverse > 0 {
        let _ = writeln!(out, "expected ←  {}", path_text(&s.expected_reverse_path));
        let _ = writeln!(out, "observed ←  {}", path_text(&s.observed_reverse_path));
    }
    let _ = writeln!(out, "packets per interface:");
    for h in &plan.hops {
        let n = s.interfaces.get(&h.name).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "    {:<28} {:>6}{}",
            h.name,
            n,
            if h.on_path {
                ""
            } else {
                "   (watched: not on the path)"
            }
        );
    }
    for d in &s.drops {
        let _ = writeln!(
            out,
            "dropped ×{} at {}: {} — {}",
            d.count, d.hop, d.reason, d.hint
        );
    }
    if s.out_of_order > 0 {
        let _ = writeln!(
            out,
            "out of order: {} packet(s) were seen at a hop before the one the path puts ahead of it",
            s.out_of_order
        );
    }
    for f in &s.no_route {
        let _ = writeln!(out, "{f}");
    }
    if let Some(n) = &s.nat {
        let to = match n.kind {
            NatKind::Service => "backend",
            NatKind::Masquerade => "to",
        };
        for c in &n.connections {
            let _ = writeln!(
                out,
                "connection {}{}{}",
                c.conv.orig,
                match (&c.conv.translated, &c.backend) {
                    (Some(t), Some(b)) if *t != c.conv.orig => format!(" → {t} ({to} {b})"),
                    (Some(t), None) if *t != c.conv.orig => format!(" → {t}"),
                    _ => String::new(),
                },
                c.conv
                    .conntrack
                    .as_ref()
                    .map(|a| format!(
                        "  [conntrack {}: {}{}]",
                        a.node,
                        a.status.join(","),
                        a.tcp_state
                            .as_deref()
                            .map(|t| format!(" {t}"))
                            .unwrap_or_default()
                    ))
                    .unwrap_or_default()
            );
        }
        for f in &n.faults {
            let _ = writeln!(out, "{}: {}", f.kind.replace('_', " "), f.text);
        }
    }
    let _ = writeln!(out, "lost events: {}", s.lost_events);
    for c in &s.clocks {
        match c.offset {
            Offset::Same => {}
            Offset::Estimated {
                offset_ns,
                uncertainty_ns,
            } => {
                let _ = writeln!(
                    out,
                    "clock of {}: {:+.3} ms ±{:.3} ms against {}'s (from the packets both ways)",
                    c.node,
                    offset_ns as f64 / 1e6,
                    uncertainty_ns as f64 / 1e6,
                    s.clocks.first().map(|f| f.node.as_str()).unwrap_or("?")
                );
            }
            Offset::NotComparable => {
                let _ = writeln!(
                    out,
                    "clock of {}: not comparable (packets seen one way only): its cross-node times are not shown",
                    c.node
                );
            }
        }
    }
    for u in &s.unobserved {
        let _ = writeln!(out, "not observed: {u}");
    }
    if s.verdict == Verdict::NotSeen {
        let _ = writeln!(out, "no packet of the conversation was seen on any hop");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        follow::correlate::Correlator,
        topology::plan::tests::{cross_node, plan_of},
        trace::{event::HopEvent, TraceEvent},
    };

    #[test]
    fn the_summary_keeps_its_json_contract() {
        let plan = plan_of(&cross_node());
        let mut c = Correlator::new(plan.clone());
        for (i, s) in plan.forward.iter().enumerate() {
            c.feed(&TraceEvent::Hop(HopEvent {
                ts_ns: i as u64,
                hop: s.hop,
                hook: s.hook,
                len: 84,
                flow: Flow {
                    src: plan.filter.pod,
                    dst: "10.244.1.5".parse().unwrap(),
                    proto: 1,
                    flags: 8,
                    ..Flow::default()
                },
                packet: None,
            }));
        }
        let recs = c.finish();
        let clocks = Clocks::same("node-a");
        let s = summary(&c, &recs, 3, &[], &clocks, Vec::new());
        let v = serde_json::to_value(&s).unwrap();
        for field in [
            "type",
            "verdict",
            "expected_path",
            "observed_path",
            "interfaces",
            "drops",
            "lost_events",
        ] {
            assert!(v.get(field).is_some(), "{field} missing: {v}");
        }
        assert_eq!(v["verdict"], "confirmed");
        assert_eq!(v["lost_events"], 3);
        assert_eq!(v["observed_path"].as_array().unwrap().len(), 10);
        assert_eq!(v["observed_path"][3]["name"], "node-a/flannel.1");
        assert_eq!(v["observed_path"][3]["role"], "vxlan");
        assert_eq!(v["interfaces"]["pod-b1/eth0"], 1);
        let p = serde_json::to_value(packet_json(&plan, &recs[0], &clocks)).unwrap();
        assert_eq!(p["type"], "packet");
        assert_eq!(p["hops"][0]["hook"], "egress");
        assert_eq!(p["flow"]["icmp_type"], 8);
        assert!(p["flow"].get("sport").is_none());
        assert!(summary_text(&plan, &s).contains("verdict: CONFIRMED"));
    }
}
