//! `podtrace verify eni POD --dst IP`: seed 004's experiment as one command. It proves, with
//! the pod's real packets, that traffic of a pod on a secondary ENI enters and leaves by that
//! ENI and never by the node's primary interface, and that the node's FIB lookups for it used
//! the ENI's route table. Exit 0 pass, 1 fail, 2 error.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    process::{ExitCode, Stdio},
    time::Duration,
};

use anyhow::{anyhow, bail, Result};
use serde::Serialize;

use crate::{
    cli::{parse_duration, parse_ipv4, PodArgs, RemoteArgs},
    front,
    netlink::{
        snapshot::{table_name, RuleAction, Snapshot},
        TABLE_DEFAULT, TABLE_LOCAL, TABLE_MAIN,
    },
    topology::{self, rules, Role, Topology},
    trace::{
        plan::{Plan, PlannedHop},
        run::{drive, Consumer, Stop, Until},
        TraceEvent, TraceOptions,
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
    #[command(flatten)]
    pub remote: RemoteArgs,
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
fn eni_tables(snap: &Snapshot, primary: &str) -> Vec<(u32, String)> {
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
    let path = front::resolve(&args.pod, &args.remote, Some(args.dst))?;
    // The probe pings from inside the pod: only where its namespace is on this machine (an
    // agent only observes; it sends nothing).
    let pod_netns = path.watch.first().cloned();
    if args.probe && pod_netns.is_none() {
        bail!("--probe sends pings from inside the pod, which is on another machine here: send traffic yourself, or run verify on the pod's node");
    }
    let topo = &path.topo;
    let pod_ip = topo
        .pod_ip
        .ok_or_else(|| anyhow!("pod {} has no IPv4 address", topo.pod.name))?;
    if topo.hops.iter().any(|h| h.role == Role::Bridge) {
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
    // The node as topology read it: nothing is read twice.
    let snap = topo
        .node_snapshot()
        .ok_or_else(|| anyhow!("node {}'s namespace was not read", topo.pod.node))?;
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
                RuleAction::Lookup(t) => Some(t),
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
    let plan = topology::plan::build(topo, topology::plan::filter(topo, pod_ip, Some(args.dst)));
    let started = path.start(
        &plan,
        &TraceOptions {
            mechanism: args.hooks.hooks,
            // The verdict rests on the node's route lookups, whenever the traffic comes.
            keep_hooks: true,
            ..TraceOptions::default()
        },
        Some(args.duration),
    )?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&ReadyJson {
                kind: "ready",
                pod: &topo.pod.name,
                dst: args.dst.to_string(),
                hops: &plan.hops,
                tc: started.info().tc,
                kernel_hooks: &started.info().hooks,
            })?
        );
    } else {
        eprintln!("hooks: {}", started.hooks_line());
        eprintln!("probes live");
    }
    let mut prober = if args.probe {
        // A few echoes from inside the pod (the ping runs in its namespace).
        let ping = crate::netns::command_in(
            pod_netns.as_deref().expect("checked above"),
            "ping",
            &[
                "-c".into(),
                "3".into(),
                "-i".into(),
                "0.2".into(),
                "-W".into(),
                "1".into(),
                "-q".into(),
                args.dst.to_string(),
            ],
        )?
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| anyhow!("starting the probe ping in pod {}: {e}", topo.pod.name))?;
        Some(ping)
    } else {
        None
    };
    let mut watch = Watch::new(&plan, pod_ip, topo.pod.node.clone());
    let outcome = drive(
        started.session,
        started.events,
        &Until {
            duration: Some(args.duration),
            watch: path.watch.clone(),
        },
        &mut watch,
    );
    if let Some(p) = prober.as_mut() {
        let _ = p.kill();
        let _ = p.wait();
    }
    if let Stop::PodGone(ns) = outcome?.stop? {
        bail!(
            "pod {}'s network namespace {} is gone",
            topo.pod.name,
            ns.display()
        );
    }
    let report = judge(
        topo,
        &primary,
        &tables,
        &choice,
        pod_ip,
        watch.counts,
        &watch.by_dir,
        watch.fib_tables,
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

/// `{"type":"ready", ...}` of `verify eni --json`.
#[derive(Serialize)]
struct ReadyJson<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    pod: &'a str,
    dst: String,
    hops: &'a [PlannedHop],
    tc: Option<crate::probes::TcMode>,
    kernel_hooks: &'a [crate::probes::hooks::HookReport],
}

/// What `verify eni` counts while it watches.
struct Watch<'a> {
    plan: &'a Plan,
    pod_ip: Ipv4Addr,
    node: String,
    /// Packets per hop name.
    counts: BTreeMap<String, u64>,
    /// (hop name, "out"/"in") → packets.
    by_dir: BTreeMap<(String, &'static str), u64>,
    /// FIB table → the node's lookups for the pod's egress.
    fib_tables: BTreeMap<String, u64>,
}

impl<'a> Watch<'a> {
    fn new(plan: &'a Plan, pod_ip: Ipv4Addr, node: String) -> Self {
        Self {
            plan,
            pod_ip,
            node,
            counts: plan.hops.iter().map(|h| (h.name.clone(), 0)).collect(),
            by_dir: BTreeMap::new(),
            fib_tables: BTreeMap::new(),
        }
    }
}

impl Consumer for Watch<'_> {
    fn on_events(&mut self, batch: Vec<TraceEvent>) -> Result<Option<Stop>> {
        for ev in &batch {
            match ev {
                TraceEvent::Hop(h) => {
                    if let Some(hop) = self.plan.hop(h.hop) {
                        *self.counts.entry(hop.name.clone()).or_default() += 1;
                        let d = if h.flow.src == self.pod_ip {
                            "out"
                        } else {
                            "in"
                        };
                        *self.by_dir.entry((hop.name.clone(), d)).or_default() += 1;
                    }
                }
                TraceEvent::Fib(f)
                    if f.flow.src == self.pod_ip
                        && f.err == 0
                        && f.ns.is_some_and(|ns| self.plan.owner(ns) == self.node) =>
                {
                    *self.fib_tables.entry(table_name(f.table)).or_default() += 1;
                }
                _ => {}
            }
        }
        Ok(None)
    }
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
