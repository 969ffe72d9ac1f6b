//! `podtrace verify eni POD --dst IP`: seed 004's experiment as one command. It proves, with
//! the pod's real packets, that traffic of a pod on a secondary ENI enters and leaves by that
//! ENI and never by the node's primary interface, and that the node's FIB lookups for it used
//! the ENI's route table. Exit 0 pass, 1 fail, 2 error.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    process::{Command, ExitCode, Stdio},
    time::Duration,
};

use anyhow::{anyhow, bail, Result};
use serde::Serialize;

use crate::{
    cli::{parse_duration, parse_ipv4, PodArgs},
    follow::{
        correlate::Seen,
        plan::{self, Hook},
        run_loop,
        session::{self, Session, SessionOptions},
        Stop,
    },
    topology::{
        rules,
        snapshot::{table_name, TABLE_DEFAULT, TABLE_LOCAL, TABLE_MAIN},
        Topology,
    },
};

#[derive(clap::Subcommand, Debug)]
pub enum VerifyCommand {
    /// Prove that a pod on a secondary ENI sends and receives through that ENI, never through
    /// the node's primary interface.
    Eni(EniArgs),
}

#[derive(clap::Args, Debug)]
pub struct EniArgs {
    #[command(flatten)]
    pub pod: PodArgs,
    /// The peer whose traffic with the pod is observed.
    #[arg(long, value_name = "IP", value_parser = parse_ipv4)]
    pub dst: Ipv4Addr,
    /// Also send a few ICMP echoes from inside the pod to --dst.
    #[arg(long)]
    pub probe: bool,
    #[command(flatten)]
    pub hooks: crate::cli::HookArgs,
    /// How long to observe.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "3s")]
    pub duration: Duration,
    /// One JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: VerifyCommand) -> Result<ExitCode> {
    match cmd {
        VerifyCommand::Eni(args) => eni(args),
    }
}

/// The verdict object (contract: shared/design.md §2).
#[derive(Debug, Serialize)]
pub struct EniReport {
    /// Always `verdict` (tells this line from the `ready` line in --json mode).
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub verdict: String,
    pub pod: String,
    pub pod_ip: String,
    pub eni: Option<String>,
    pub primary: String,
    pub table: Option<u32>,
    pub rule_priority: Option<u32>,
    pub counts: BTreeMap<String, u64>,
    pub evidence: Vec<String>,
    pub causes: Vec<String>,
    pub fib_tables: BTreeMap<String, u64>,
}

/// The ENI a pod's policy routing sends its traffic to: its `from POD` rule, that rule's table,
/// and the table's device.
struct EniChoice {
    rule_priority: Option<u32>,
    table: Option<u32>,
    device: Option<String>,
}

/// Tables of secondary ENIs: (table, device of its default route, the ENI's own rule).
fn eni_tables(snap: &crate::topology::snapshot::Snapshot, primary: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for r in &snap.routes {
        if r.prefix == 0 && ![TABLE_MAIN, TABLE_LOCAL, TABLE_DEFAULT].contains(&r.table) {
            if let Some(dev) = r.oif.map(|i| snap.name_of(i)) {
                if dev != primary && !out.iter().any(|(t, _)| *t == r.table) {
                    out.push((r.table, dev));
                }
            }
        }
    }
    out
}

fn eni(args: EniArgs) -> Result<ExitCode> {
    let loc = args.pod.locate()?;
    let topo = crate::topology::resolve(&loc, Some(args.dst), None)?;
    let pod_ip = topo
        .pod_ip
        .ok_or_else(|| anyhow!("pod {} has no IPv4 address", loc.name))?;
    if topo.hops.iter().any(|h| h.role == "bridge") {
        bail!(
            "pod {} is not on an ENI: its CNI is {} (a bridge, not routed ENI veths); verify eni is for the AWS VPC CNI and its copies",
            topo.pod.name,
            topo.cni
        );
    }
    let primary = topo.primary.clone().ok_or_else(|| {
        anyhow!(
            "node {} has no default route: no primary interface",
            topo.pod.node
        )
    })?;
    let node_ns = topo
        .hops
        .iter()
        .find(|h| h.role == "host-veth")
        .and_then(|h| h.netns_path.clone());
    let snap = crate::topology::read::in_netns(node_ns.as_deref(), |h| async move {
        crate::topology::read::snapshot(&h).await
    })?;
    let tables = eni_tables(&snap, &primary);
    if tables.is_empty() {
        bail!(
            "pod {} is not on a secondary ENI: node {} has no ENI route tables (its traffic uses the primary interface {primary})",
            topo.pod.name,
            topo.pod.node
        );
    }
    let src_rules = rules::source_rules_for(&snap, pod_ip);
    let choice = match src_rules.first() {
        Some(rule) => {
            let table = match rule.action {
                crate::topology::snapshot::RuleAction::Lookup(t) => Some(t),
                _ => None,
            };
            EniChoice {
                rule_priority: Some(rule.priority),
                table,
                device: table.and_then(|t| {
                    tables
                        .iter()
                        .find(|(tt, _)| *tt == t)
                        .map(|(_, d)| d.clone())
                }),
            }
        }
        None => EniChoice {
            rule_priority: None,
            table: None,
            device: None,
        },
    };

    // Watch every uplink of the node, the pod's side, and the kernel's FIB.
    let uplinks = session::node_uplinks(&topo)?;
    let plan = plan::build(&topo, uplinks);
    let mut session = Session::start(
        plan,
        pod_ip,
        Some(args.dst),
        &SessionOptions {
            hooks: args.hooks.hooks,
            ..SessionOptions::default()
        },
    )?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"type": "ready", "pod": topo.pod.name, "dst": args.dst.to_string(),
                "hops": session.plan.hops, "tc": session.tc_mode(), "kernel_hooks": session.hooks})
        );
    } else {
        eprintln!("hooks: {}", session.hooks_line());
        eprintln!("probes live");
    }
    let mut prober = if args.probe {
        Some(
            Command::new("nsenter")
                .arg(format!("--net={}", loc.netns.display()))
                .args(["ping", "-c", "3", "-i", "0.2", "-W", "1", "-q"])
                .arg(args.dst.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| anyhow!("starting the probe ping in pod {}: {e}", topo.pod.name))?,
        )
    } else {
        None
    };

    // (hop name, direction "out"/"in") → packets; FIB table → lookups for the pod's egress.
    let mut counts: BTreeMap<String, u64> = session
        .plan
        .hops
        .iter()
        .map(|h| (h.name.clone(), 0))
        .collect();
    let mut by_dir: BTreeMap<(String, &'static str), u64> = BTreeMap::new();
    let mut fib_tables: BTreeMap<String, u64> = BTreeMap::new();
    let pod_raw = u32::from_ne_bytes(pod_ip.octets());
    let node_name = topo.pod.node.clone();
    let stop = run_loop(
        &mut session,
        Some(args.duration),
        vec![loc.netns.clone()],
        &mut |s, bytes| {
            let Some((_, obs, _)) = s.decode(bytes) else {
                return Ok(None);
            };
            let outbound = obs.flow.saddr == pod_raw;
            match &obs.seen {
                Seen::Tc { hop, hook } => {
                    if let Some(h) = s.plan.hop(*hop) {
                        *counts.entry(h.name.clone()).or_default() += 1;
                        let d = match (outbound, hook) {
                            (true, _) => "out",
                            (false, Hook::Ingress | Hook::Egress | Hook::Bridged) => "in",
                        };
                        *by_dir.entry((h.name.clone(), d)).or_default() += 1;
                    }
                }
                Seen::Fib {
                    location,
                    table,
                    err,
                    ..
                } if outbound && *err == 0 && *location == node_name => {
                    *fib_tables.entry(table_name(*table)).or_default() += 1;
                }
                _ => {}
            }
            Ok(None)
        },
        &mut |_| Ok(None),
    )?;
    if let Some(p) = prober.as_mut() {
        let _ = p.kill();
        let _ = p.wait();
    }
    if let Stop::PodGone(ns) = stop {
        bail!("pod {}'s network namespace {ns} is gone", topo.pod.name);
    }
    let report = judge(
        &topo, &primary, &tables, &choice, pod_ip, counts, &by_dir, fib_tables,
    );
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_text(&report);
    }
    Ok(if report.verdict == "pass" {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[allow(clippy::too_many_arguments)]
fn judge(
    topo: &Topology,
    primary: &str,
    tables: &[(u32, String)],
    choice: &EniChoice,
    pod_ip: Ipv4Addr,
    counts: BTreeMap<String, u64>,
    by_dir: &BTreeMap<(String, &'static str), u64>,
    fib_tables: BTreeMap<String, u64>,
) -> EniReport {
    let node = &topo.pod.node;
    let at = |ifname: &str, d: &'static str| {
        by_dir
            .get(&(format!("{node}/{ifname}"), d))
            .copied()
            .unwrap_or(0)
    };
    let mut evidence = Vec::new();
    let mut causes = Vec::new();
    // Which ENI: the pod's rule says; without one, where its inbound traffic arrived tells
    // (the VPC delivers a secondary IP to the ENI that owns it).
    let inbound_eni = tables
        .iter()
        .map(|(_, d)| d)
        .filter(|d| at(d, "in") > 0)
        .max_by_key(|d| at(d, "in"))
        .cloned();
    let eni = choice.device.clone().or(inbound_eni.clone());
    let table = choice.table.or_else(|| {
        eni.as_ref()
            .and_then(|e| tables.iter().find(|(_, d)| d == e).map(|(t, _)| *t))
    });
    match (&choice.rule_priority, &choice.table) {
        (Some(p), Some(t)) => evidence.push(format!(
            "rule {p}: from {pod_ip} lookup {t} → {}",
            eni.as_deref().unwrap_or("?")
        )),
        _ => evidence.push(format!("no `from {pod_ip}` rule on {node}")),
    }
    let (out_p, in_p) = (at(primary, "out"), at(primary, "in"));
    let (out_e, in_e) = eni
        .as_deref()
        .map(|e| (at(e, "out"), at(e, "in")))
        .unwrap_or((0, 0));
    if let Some(e) = &eni {
        evidence.push(format!("{node}/{e}: {out_e} packets out, {in_e} in"));
    }
    evidence.push(format!(
        "{node}/{primary} (primary): {out_p} packets out, {in_p} in"
    ));
    if !fib_tables.is_empty() {
        evidence.push(format!(
            "{node}'s FIB lookups for the pod's packets used table(s): {}",
            fib_tables
                .iter()
                .map(|(t, n)| format!("{t} ×{n}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let seen_any = counts.values().any(|n| *n > 0);
    if !seen_any {
        causes.push(format!(
            "no packet between {pod_ip} and the destination was seen (send traffic, or use --probe)"
        ));
    }
    if out_p > 0 {
        causes.push(match (choice.rule_priority, table) {
            (None, Some(t)) => {
                format!("egress left via {primary}: no `from {pod_ip}` rule selects table {t}")
            }
            (None, None) => {
                format!("egress left via {primary}: no `from {pod_ip}` rule selects an ENI table")
            }
            (Some(p), _) => format!(
                "egress left via {primary} although rule {p} selects table {}",
                table.map(table_name).unwrap_or_default()
            ),
        });
    }
    if in_p > 0 {
        causes.push(format!("replies arrived on {primary}"));
    }
    if seen_any && eni.is_some() && out_e == 0 && out_p == 0 {
        causes.push(format!(
            "no egress seen on {}",
            eni.as_deref().unwrap_or_default()
        ));
    }
    if seen_any && eni.is_some() && in_e == 0 && in_p == 0 {
        causes.push(format!(
            "no inbound packet seen on {}",
            eni.as_deref().unwrap_or_default()
        ));
    }
    if let Some(t) = table {
        let want = table_name(t);
        let others: Vec<&String> = fib_tables
            .keys()
            .filter(|k| **k != want && *k != "local")
            .collect();
        if out_e > 0 && !fib_tables.contains_key(&want) {
            causes.push(format!("the FIB lookups did not use table {want}"));
        } else if !others.is_empty() && out_p > 0 {
            causes.push(format!(
                "the FIB lookups used table {} instead of {want}",
                others
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    if eni.is_none() && seen_any {
        causes.push("which ENI the pod belongs to is unknown: no rule names it and no inbound packet arrived on an ENI".into());
    }
    EniReport {
        kind: "verdict",
        verdict: if causes.is_empty() { "pass" } else { "fail" }.into(),
        pod: topo.pod.name.clone(),
        pod_ip: pod_ip.to_string(),
        eni,
        primary: primary.to_owned(),
        table,
        rule_priority: choice.rule_priority,
        counts,
        evidence,
        causes,
        fib_tables,
    }
}

fn print_text(r: &EniReport) {
    println!(
        "verify eni {} ({}): {}",
        r.pod,
        r.pod_ip,
        r.verdict.to_uppercase()
    );
    println!(
        "  eni {}  table {}  rule {}  primary {}",
        r.eni.as_deref().unwrap_or("?"),
        r.table.map(table_name).unwrap_or_else(|| "?".into()),
        r.rule_priority
            .map(|p| p.to_string())
            .unwrap_or_else(|| "none".into()),
        r.primary
    );
    for e in &r.evidence {
        println!("  - {e}");
    }
    for c in &r.causes {
        println!("  ✗ {c}");
    }
    println!("  packets per interface:");
    for (h, n) in &r.counts {
        println!("      {h:<28} {n}");
    }
}
