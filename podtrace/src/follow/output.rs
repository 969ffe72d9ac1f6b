//! What `follow` prints: the ready line, one block (or JSON line) per packet, the summary.
use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr};

use podtrace_abi::FlowInfo;
use serde_json::{json, Value};

use super::{
    correlate::{drops, verdict, Direction, Fate, PacketRecord, Verdict},
    plan::{Hook, Plan, Step},
};

pub fn ip(raw: u32) -> Ipv4Addr {
    Ipv4Addr::from(raw.to_ne_bytes())
}

/// `icmp echo-request 10.244.0.9 > 10.244.1.5 id 7 seq 1`.
pub fn describe(f: &FlowInfo) -> String {
    match f.proto {
        1 => {
            let kind = match f.flags {
                8 => "echo-request".to_owned(),
                0 => "echo-reply".to_owned(),
                3 => "unreachable".to_owned(),
                11 => "time-exceeded".to_owned(),
                t => format!("type {t}"),
            };
            format!(
                "icmp {kind} {} > {} id {} seq {}",
                ip(f.saddr),
                ip(f.daddr),
                f.seq >> 16,
                f.seq & 0xffff
            )
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
                ip(f.saddr),
                f.sport,
                ip(f.daddr),
                f.dport,
                f.seq
            )
        }
        17 => format!(
            "udp {}:{} > {}:{} len {}",
            ip(f.saddr),
            f.sport,
            ip(f.daddr),
            f.dport,
            f.ip_len
        ),
        p => format!("proto {p} {} > {}", ip(f.saddr), ip(f.daddr)),
    }
}

fn flow_json(f: &FlowInfo) -> Value {
    let mut v = json!({
        "src": ip(f.saddr).to_string(),
        "dst": ip(f.daddr).to_string(),
        "proto": match f.proto { 1 => "icmp", 6 => "tcp", 17 => "udp", _ => "other" },
        "ip_id": f.ip_id,
        "len": f.ip_len,
    });
    match f.proto {
        1 => {
            v["icmp_type"] = json!(f.flags);
            v["icmp_id"] = json!(f.seq >> 16);
            v["icmp_seq"] = json!(f.seq & 0xffff);
        }
        6 => {
            v["sport"] = json!(f.sport);
            v["dport"] = json!(f.dport);
            v["tcp_seq"] = json!(f.seq);
            v["tcp_flags"] = json!(f.flags);
        }
        17 => {
            v["sport"] = json!(f.sport);
            v["dport"] = json!(f.dport);
        }
        _ => {}
    }
    v
}

fn step_json(plan: &Plan, s: &Step) -> Value {
    let h = plan.hop(s.hop);
    json!({
        "name": h.map(|h| h.name.clone()),
        "node": h.map(|h| h.node.clone()),
        "netns": h.map(|h| h.netns.clone()),
        "ifname": h.map(|h| h.ifname.clone()),
        "ifindex": h.map(|h| h.ifindex),
        "role": h.map(|h| h.role.clone()),
        "hook": s.hook.as_str(),
    })
}

fn arrow(d: Direction) -> &'static str {
    match d {
        Direction::Forward => "→",
        Direction::Reverse => "←",
    }
}

pub fn packet_json(plan: &Plan, r: &PacketRecord) -> Value {
    let t0 = r.hops.first().map(|h| h.ts_ns).unwrap_or(0);
    let mut prev = t0;
    let hops: Vec<Value> = r
        .hops
        .iter()
        .map(|h| {
            let p = plan.hop(h.hop);
            let v = json!({
                "name": p.map(|p| p.name.clone()),
                "node": p.map(|p| p.node.clone()),
                "netns": p.map(|p| p.netns.clone()),
                "ifname": p.map(|p| p.ifname.clone()),
                "ifindex": p.map(|p| p.ifindex),
                "hook": h.hook.as_str(),
                "ts_ns": h.ts_ns,
                "since_first_ns": h.ts_ns - t0,
                "delta_ns": h.ts_ns - prev,
                "encap": if h.encap { "vxlan" } else { "none" },
                "len": h.len,
                "expected": !r.unexpected.contains(&h.hop),
            });
            prev = h.ts_ns;
            v
        })
        .collect();
    json!({
        "type": "packet",
        "id": r.id,
        "direction": r.direction,
        "flow": flow_json(&r.flow),
        "summary": describe(&r.flow),
        "fate": r.fate,
        "hops": hops,
        "drop": r.drop,
        "fib": r.fib,
        "xmit": r.xmit,
        "missing": r.missing.iter().map(|s| step_json(plan, s)).collect::<Vec<_>>(),
        "notes": r.notes,
    })
}

pub fn packet_text(plan: &Plan, r: &PacketRecord) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "#{} {} {}",
        r.id,
        arrow(r.direction),
        describe(&r.flow)
    );
    let t0 = r.hops.first().map(|h| h.ts_ns).unwrap_or(0);
    let mut prev = t0;
    for h in &r.hops {
        let name = plan.hop(h.hop).map(|p| p.name.as_str()).unwrap_or("?");
        let mark = if r.unexpected.contains(&h.hop) {
            "  ← not on the expected path"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "    {:>9.3} ms  (+{:>7.3})  {:<28} {:<7}{}{}",
            (h.ts_ns - t0) as f64 / 1e6,
            (h.ts_ns - prev) as f64 / 1e6,
            name,
            h.hook.as_str(),
            if h.encap { "  [in vxlan]" } else { "" },
            mark
        );
        prev = h.ts_ns;
    }
    for f in &r.fib {
        let _ = writeln!(
            out,
            "    fib   {}: table {} → {}{}{}",
            f.location,
            crate::topology::snapshot::table_name(f.table),
            f.oif,
            f.gateway
                .as_ref()
                .map(|g| format!(" via {g}"))
                .unwrap_or_default(),
            if f.err != 0 {
                format!(" (error {})", f.err)
            } else {
                String::new()
            }
        );
    }
    if let Some(d) = &r.drop {
        let _ = writeln!(
            out,
            "    DROPPED at {} by the kernel: {} — {}",
            d.location, d.reason, d.hint
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
            .filter_map(|s| {
                plan.hop(s.hop)
                    .map(|h| format!("{} {}", h.name, s.hook.as_str()))
            })
            .collect();
        let _ = writeln!(out, "    not seen at: {}", names.join(", "));
    }
    out
}

/// The summary as JSON (the last line of `follow --json`).
pub fn summary_json(
    plan: &Plan,
    records: &[PacketRecord],
    counts: &BTreeMap<u32, u64>,
    lost: u64,
    hooks: &[crate::probes::hooks::HookReport],
) -> Value {
    // The path of the packet that went furthest in each direction: the expected steps it
    // passed (a bridge crossed at layer 2 counts when its ports saw it), then anywhere else
    // it showed up.
    let observed = |d: Direction| -> Vec<Value> {
        let expected = match d {
            Direction::Forward => &plan.forward,
            Direction::Reverse => &plan.reverse,
        };
        let best = records
            .iter()
            .filter(|r| r.direction == d)
            .max_by_key(|r| (r.hops.len(), std::cmp::Reverse(r.id)));
        let Some(best) = best else { return Vec::new() };
        let mut steps: Vec<Step> = expected
            .iter()
            .filter(|s| !best.missing.contains(s))
            .copied()
            .collect();
        for h in best
            .hops
            .iter()
            .filter(|h| best.unexpected.contains(&h.hop))
        {
            steps.push(Step {
                hop: h.hop,
                hook: h.hook,
            });
        }
        steps.iter().map(|s| step_json(plan, s)).collect()
    };
    let interfaces: serde_json::Map<String, Value> = plan
        .hops
        .iter()
        .map(|h| {
            (
                h.name.clone(),
                json!(counts.get(&h.id).copied().unwrap_or(0)),
            )
        })
        .collect();
    json!({
        "type": "summary",
        "verdict": verdict(records),
        "expected_path": plan.forward.iter().map(|s| step_json(plan, s)).collect::<Vec<_>>(),
        "expected_reverse_path": plan.reverse.iter().map(|s| step_json(plan, s)).collect::<Vec<_>>(),
        "observed_path": observed(Direction::Forward),
        "observed_reverse_path": observed(Direction::Reverse),
        "interfaces": interfaces,
        "drops": drops(records),
        "lost_events": lost,
        "packets": records.len(),
        "packets_forward": records.iter().filter(|r| r.direction == Direction::Forward).count(),
        "packets_reverse": records.iter().filter(|r| r.direction == Direction::Reverse).count(),
        "kernel_hooks": hooks,
    })
}

pub fn summary_text(plan: &Plan, summary: &Value) -> String {
    let mut out = String::new();
    let verdict = summary["verdict"].as_str().unwrap_or("?");
    let _ = writeln!(
        out,
        "\nverdict: {}  ({} packets: {} →, {} ←)",
        verdict.to_uppercase(),
        summary["packets"],
        summary["packets_forward"],
        summary["packets_reverse"]
    );
    let path = |key: &str| -> String {
        summary[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|s| {
                        format!(
                            "{} {}",
                            s["name"].as_str().unwrap_or("?"),
                            s["hook"].as_str().unwrap_or("")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(" > ")
            })
            .unwrap_or_default()
    };
    let _ = writeln!(out, "expected →  {}", path("expected_path"));
    let _ = writeln!(out, "observed →  {}", path("observed_path"));
    if summary["packets_reverse"].as_u64().unwrap_or(0) > 0 {
        let _ = writeln!(out, "expected ←  {}", path("expected_reverse_path"));
        let _ = writeln!(out, "observed ←  {}", path("observed_reverse_path"));
    }
    let _ = writeln!(out, "packets per interface:");
    for h in &plan.hops {
        let n = summary["interfaces"][&h.name].as_u64().unwrap_or(0);
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
    if let Some(drops) = summary["drops"].as_array() {
        for d in drops {
            let _ = writeln!(
                out,
                "dropped ×{} at {}: {} — {}",
                d["count"],
                d["hop"].as_str().unwrap_or("?"),
                d["reason"].as_str().unwrap_or("?"),
                d["hint"].as_str().unwrap_or("")
            );
        }
    }
    let _ = writeln!(out, "lost events: {}", summary["lost_events"]);
    if verdict == "not_seen" {
        let _ = writeln!(out, "no packet of the conversation was seen on any hop");
    }
    out
}

pub fn verdict_ok(records: &[PacketRecord]) -> bool {
    verdict(records) == Verdict::Confirmed
}
