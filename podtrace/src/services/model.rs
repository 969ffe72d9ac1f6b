//! Services as kube-proxy (iptables mode) programmed them on one node, read back from the
//! node's rules ([`super::iptables`]): each service port's frontends (cluster IP, external
//! and load-balancer IPs, NodePorts), its `KUBE-SVC-…` chain and the `KUBE-SEP-…` backends
//! with their probabilities, or kube-proxy's "has no endpoints" REJECT; and the node's SNAT
//! rules (kube-proxy's hairpin/external MASQUERADE, the CNI's pod masquerade).
//!
//! kube-proxy 1.20–1.30 shapes are understood: `KUBE-SERVICES → KUBE-SVC-X` (and the older
//! `KUBE-MARK-MASQ` rule beside it), `KUBE-NODEPORTS → KUBE-EXT-X → KUBE-SVC-X` (1.24+) or
//! `KUBE-NODEPORTS → KUBE-SVC-X` / `KUBE-XLB-X` (before), `KUBE-SVL-X` for local traffic
//! policy, comments with and without the `-> IP:PORT` backend suffix, probabilities with 10
//! (kube-proxy's) or 11 (iptables-save's) decimals.
use std::{collections::BTreeMap, net::Ipv4Addr};

use serde::Serialize;

use super::iptables::{Net, Rule, Ruleset};

/// A frontend of a service port other than its cluster IP.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Frontend {
    /// `external IP` or `loadbalancer IP`.
    pub kind: String,
    pub ip: Ipv4Addr,
    pub port: u16,
}

/// One backend (endpoint) of a service port.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Backend {
    pub ip: Ipv4Addr,
    /// The DNAT port (`None`: the port is not rewritten).
    pub port: Option<u16>,
    /// Its `KUBE-SEP-…` chain.
    pub chain: String,
    /// The `--probability` of its rule in the service chain (`None` on the last rule).
    pub rule_probability: Option<f64>,
    /// The share of new connections it gets: the rule's probability times what the rules
    /// before it left over.
    pub share: f64,
    /// The endpoint chain marks packets from the backend itself for masquerade (hairpin).
    pub hairpin_masq: bool,
}

/// Why a service port answers with an error instead of a backend.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reject {
    /// `filter` (kube-proxy 1.x), `nat` for very old versions.
    pub table: String,
    /// `KUBE-SERVICES` (cluster/external IPs) or `KUBE-EXTERNAL-SERVICES` (NodePorts, external IPs).
    pub chain: String,
    /// `REJECT` or `DROP`.
    pub target: String,
    /// `icmp-port-unreachable` (kube-proxy's; iptables' default for REJECT too).
    pub reject_with: Option<String>,
    /// The address it catches (`None`: any local address, NodePorts).
    pub ip: Option<Ipv4Addr>,
    pub port: Option<u16>,
    /// kube-proxy's comment (`default/empty:http has no endpoints`).
    pub comment: Option<String>,
}

/// One port of one Service as a node's rules implement it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServicePort {
    /// `NAMESPACE/NAME:PORT` as kube-proxy names it (`NAMESPACE/NAME` for an unnamed port);
    /// empty when no comment said it.
    pub name: String,
    /// `tcp`, `udp`, `sctp`.
    pub protocol: String,
    /// The cluster IP (`None`: only NodePorts or external IPs were found).
    pub cluster_ip: Option<Ipv4Addr>,
    pub port: Option<u16>,
    pub node_ports: Vec<u16>,
    pub external: Vec<Frontend>,
    /// `KUBE-SVC-…` (or `KUBE-SVL-…` when only a local-policy chain exists).
    pub chain: Option<String>,
    /// The cluster IP rule marks packets not from this network for masquerade
    /// (`! -s 10.244.0.0/16 … -j KUBE-MARK-MASQ`: kube-proxy's cluster CIDR).
    pub masquerade_unless_from: Option<Net>,
    pub backends: Vec<Backend>,
    /// kube-proxy's "has no endpoints" rules for this port (empty when it has endpoints).
    pub rejects: Vec<Reject>,
}

impl ServicePort {
    /// `NAMESPACE`, `NAME` and `PORT` of [`ServicePort::name`].
    pub fn name_parts(&self) -> (Option<&str>, Option<&str>, Option<&str>) {
        let Some((ns, rest)) = self.name.split_once('/') else {
            return (
                None,
                (!self.name.is_empty()).then_some(self.name.as_str()),
                None,
            );
        };
        match rest.split_once(':') {
            Some((svc, port)) => (Some(ns), Some(svc), (!port.is_empty()).then_some(port)),
            None => (Some(ns), Some(rest), None),
        }
    }

    /// Whether this port has no backend and answers new connections with an error.
    pub fn no_endpoints(&self) -> bool {
        self.backends.is_empty() && !self.rejects.is_empty()
    }

    /// Whether `ip` (with `port`, when given) is one of its frontends: the cluster IP,
    /// an external or load-balancer IP, or a node address `node_ips` with a NodePort.
    pub fn serves(&self, ip: Ipv4Addr, port: Option<u16>, node_ips: &[Ipv4Addr]) -> bool {
        let port_ok = |p: Option<u16>| port.is_none() || p == port;
        (self.cluster_ip == Some(ip) && port_ok(self.port))
            || self
                .external
                .iter()
                .any(|f| f.ip == ip && port_ok(Some(f.port)))
            || (node_ips.contains(&ip) && port.is_some_and(|p| self.node_ports.contains(&p)))
    }
}

/// A source NAT rule of the node (`MASQUERADE` or `SNAT`) and how a packet gets to it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SnatRule {
    pub chain: String,
    pub target: String,
    pub src: Option<String>,
    pub dst: Option<String>,
    pub out_if: Option<String>,
    pub mark: Option<String>,
    pub to_source: Option<String>,
    pub random_fully: bool,
    pub comment: Option<String>,
    /// The rule as iptables-save printed it.
    pub text: String,
}

/// What the node's rules say about Services and source NAT.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct NodeServices {
    /// Service ports, sorted by cluster IP, port and protocol.
    pub services: Vec<ServicePort>,
    /// The mark `KUBE-MARK-MASQ` sets (`0x4000`).
    pub masq_mark: Option<String>,
    /// Every MASQUERADE/SNAT rule of the nat table, in order.
    pub snat: Vec<SnatRule>,
    /// What was not understood (parser notes, dangling chains).
    pub notes: Vec<String>,
}

/// What [`NodeServices::snat_for`] decided.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum SnatVerdict {
    /// The packet leaves with the address of the outgoing interface (or `to_source`).
    Translated { rule: SnatRule },
    /// No rule rewrites its source.
    Unchanged,
    /// A rule on the way has matches this evaluation does not model (ports, interfaces,
    /// conntrack state…): the answer depends on them.
    Undecided { rule: String },
}

impl NodeServices {
    /// The service ports `ip` (with `port`) is a frontend of; `node_ips` are the node's own
    /// addresses (for NodePorts).
    pub fn lookup(
        &self,
        ip: Ipv4Addr,
        port: Option<u16>,
        node_ips: &[Ipv4Addr],
    ) -> Vec<&ServicePort> {
        self.services
            .iter()
            .filter(|s| s.serves(ip, port, node_ips))
            .collect()
    }

    /// Whether a packet from `src` to `dst` (without a kube-proxy mark) is source-NATed in
    /// the nat table's POSTROUTING, walking jumps into user chains and RETURNs.
    pub fn snat_for(&self, rules: &Ruleset, src: Ipv4Addr, dst: Ipv4Addr) -> SnatVerdict {
        walk_snat(rules, "POSTROUTING", src, dst, 0)
            .map(|r| match r {
                Walk::Nat(rule) => SnatVerdict::Translated {
                    rule: snat_rule(rule),
                },
                Walk::Undecided(rule) => SnatVerdict::Undecided {
                    rule: rule.text.clone(),
                },
            })
            .unwrap_or(SnatVerdict::Unchanged)
    }
}

/// The rules of the non-NAT tables that drop or reject a packet like `src → dst` (`proto`,
/// destination port `dport`), as far as their addresses, protocol and port say: the
/// candidates for a netfilter drop of it (their text, at most four).
pub fn dropping_rules(
    rules: &Ruleset,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    dport: u16,
) -> Vec<String> {
    let name = match proto {
        1 => "icmp",
        6 => "tcp",
        17 => "udp",
        132 => "sctp",
        _ => "",
    };
    let net_ok = |m: &Option<super::iptables::Neg<super::iptables::Net>>, ip: Ipv4Addr| {
        m.as_ref().is_none_or(|n| n.value.contains(ip) != n.negated)
    };
    rules
        .rules
        .iter()
        .filter(|r| r.table != "nat")
        .filter(|r| matches!(r.target.as_deref(), Some("DROP" | "REJECT")))
        .filter(|r| net_ok(&r.src, src) && net_ok(&r.dst, dst))
        .filter(|r| {
            r.proto
                .as_ref()
                .is_none_or(|p| p.value == "all" || (p.value == name) != p.negated)
        })
        .filter(|r| {
            r.dport
                .as_ref()
                .is_none_or(|p| proto == 1 || (p.value == dport) != p.negated)
        })
        .take(4)
        .map(|r| format!("{} {}", r.table, r.text))
        .collect()
}

enum Walk<'a> {
    Nat(&'a Rule),
    Undecided(&'a Rule),
}

/// Whether `-m mark [!] --mark V[/M]` matches a packet with mark 0 (`None`: unparsable).
fn mark_matches_zero(m: &super::iptables::Neg<String>) -> Option<bool> {
    let num = |s: &str| match s.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    };
    let (v, mask) = match m.value.split_once('/') {
        Some((v, mk)) => (num(v)?, num(mk)?),
        None => (num(&m.value)?, u32::MAX),
    };
    Some(((v & mask) == 0) != m.negated)
}

/// Walks `chain` for an unmarked packet from `src` to `dst`: `Some` when a rule NATs it
/// (or might), `None` when the chain returns or ends without.
fn walk_snat<'a>(
    rules: &'a Ruleset,
    chain: &str,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    depth: usize,
) -> Option<Walk<'a>> {
    if depth > 16 {
        return None;
    }
    // A rule before could have ended the walk, depending on what this does not model.
    let mut uncertain: Option<&Rule> = None;
    for r in rules.chain("nat", chain) {
        let Some(target) = r.target.as_deref() else {
            continue;
        };
        let mut bare = r.clone();
        let mark_ok = match r.mark.as_ref() {
            Some(m) => {
                bare.mark = None;
                mark_matches_zero(m)
            }
            None => Some(true),
        };
        let m = match (mark_ok, bare.matches_addrs(src, dst)) {
            (Some(false), _) | (_, Some(false)) => Some(false),
            (Some(true), Some(true)) => Some(true),
            _ => None,
        };
        if m == Some(false) {
            continue;
        }
        let sure = m == Some(true) && uncertain.is_none();
        match target {
            "MASQUERADE" | "SNAT" => {
                return Some(if sure {
                    Walk::Nat(r)
                } else {
                    Walk::Undecided(uncertain.unwrap_or(r))
                });
            }
            "RETURN" | "ACCEPT" | "DROP" => {
                if m == Some(true) {
                    return uncertain.map(Walk::Undecided);
                }
                uncertain.get_or_insert(r);
            }
            t if rules.has_chain("nat", t) => match walk_snat(rules, t, src, dst, depth + 1) {
                Some(Walk::Nat(n)) if sure => return Some(Walk::Nat(n)),
                Some(_) => return Some(Walk::Undecided(uncertain.unwrap_or(r))),
                None if r.goto && m == Some(true) => return uncertain.map(Walk::Undecided),
                None => {}
            },
            _ => {}
        }
    }
    None
}

fn snat_rule(r: &Rule) -> SnatRule {
    let neg = |n: bool| if n { "! " } else { "" };
    SnatRule {
        chain: r.chain.clone(),
        target: r.target.clone().unwrap_or_default(),
        src: r
            .src
            .as_ref()
            .map(|s| format!("{}{}", neg(s.negated), s.value)),
        dst: r
            .dst
            .as_ref()
            .map(|s| format!("{}{}", neg(s.negated), s.value)),
        out_if: r
            .out_if
            .as_ref()
            .map(|s| format!("{}{}", neg(s.negated), s.value)),
        mark: r
            .mark
            .as_ref()
            .map(|s| format!("{}{}", neg(s.negated), s.value)),
        to_source: r.to_source.clone(),
        random_fully: r.random_fully,
        comment: r.comment.clone(),
        text: r.text.clone(),
    }
}

/// Suffixes kube-proxy appends to a service port's name in its comments.
const SUFFIXES: &[&str] = &[
    " cluster IP",
    " external IP",
    " loadbalancer IP",
    " has no local endpoints",
    " has no endpoints",
    " health check node port",
];

/// The service port name in a kube-proxy comment (`ns/svc:port cluster IP` → `ns/svc:port`,
/// `ns/svc:port -> 10.1.2.3:80` → `ns/svc:port`, old `ns/svc: has no endpoints` → `ns/svc`).
pub fn comment_name(comment: &str) -> &str {
    let mut s = comment;
    if let Some((name, _)) = s.split_once(" -> ") {
        s = name;
    }
    for suffix in SUFFIXES {
        if let Some(name) = s.strip_suffix(suffix) {
            s = name;
            break;
        }
    }
    for prefix in [
        "masquerade traffic for ",
        "pod traffic for ",
        "masquerade LOCAL traffic for ",
        "route LOCAL traffic for ",
    ] {
        if let Some(rest) = s.strip_prefix(prefix) {
            s = rest.strip_suffix(" external destinations").unwrap_or(rest);
        }
    }
    // Old kube-proxy writes an unnamed port as `ns/svc:` (`ns/svc: cluster IP`).
    s.trim().trim_end_matches(':')
}

const FRONT_CHAIN_PREFIXES: &[&str] = &[
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-EXT-",
    "KUBE-FW-",
    "KUBE-XLB-",
];

fn is_front_target(t: &str) -> bool {
    FRONT_CHAIN_PREFIXES.iter().any(|p| t.starts_with(p))
}

/// The `KUBE-SVC-…` chain a frontend chain leads to (itself for a service chain): through
/// `KUBE-EXT-`/`KUBE-FW-`/`KUBE-XLB-` chains, preferring `KUBE-SVC-` over `KUBE-SVL-`.
fn service_chain(rules: &Ruleset, chain: &str) -> Option<String> {
    let mut seen = Vec::new();
    let mut todo = vec![chain.to_owned()];
    let mut local = None;
    while let Some(c) = todo.pop() {
        if seen.contains(&c) || seen.len() > 32 {
            continue;
        }
        if !rules.has_chain("nat", &c) {
            seen.push(c);
            continue;
        }
        if c.starts_with("KUBE-SVC-") {
            return Some(c);
        }
        if c.starts_with("KUBE-SVL-") {
            local.get_or_insert(c.clone());
        }
        for r in rules.chain("nat", &c) {
            if let Some(t) = r.target.as_deref().filter(|t| is_front_target(t)) {
                todo.push(t.to_owned());
            }
        }
        seen.push(c);
    }
    local
}

/// Reads kube-proxy's Services (and the node's SNAT rules) from parsed `iptables-save`
/// output of the node's namespace (the `nat` and `filter` tables).
pub fn from_rules(rules: &Ruleset) -> NodeServices {
    let mut out = NodeServices {
        notes: rules.notes.clone(),
        ..NodeServices::default()
    };
    // Service ports by their service chain (or, for ports with no chain, by name).
    let mut by_chain: BTreeMap<String, ServicePort> = BTreeMap::new();
    let blank = |name: String, proto: String| ServicePort {
        name,
        protocol: proto,
        cluster_ip: None,
        port: None,
        node_ports: Vec::new(),
        external: Vec::new(),
        chain: None,
        masquerade_unless_from: None,
        backends: Vec::new(),
        rejects: Vec::new(),
    };
    let proto_of = |r: &Rule| {
        r.proto
            .as_ref()
            .filter(|p| !p.negated)
            .map(|p| p.value.clone())
            .unwrap_or_else(|| "tcp".to_owned())
    };

    // Cluster, external and load-balancer IPs.
    for r in rules.chain("nat", "KUBE-SERVICES") {
        let Some(t) = r.target.as_deref().filter(|t| is_front_target(t)) else {
            continue;
        };
        let Some(svc_chain) = service_chain(rules, t) else {
            out.notes
                .push(format!("line {}: {t} leads to no KUBE-SVC chain", r.line));
            continue;
        };
        let name = r
            .comment
            .as_deref()
            .map(comment_name)
            .unwrap_or("")
            .to_owned();
        let entry = by_chain
            .entry(svc_chain.clone())
            .or_insert_with(|| blank(name.clone(), proto_of(r)));
        if entry.name.is_empty() {
            entry.name = name;
        }
        entry.chain = Some(svc_chain);
        let (Some(dst), Some(port)) = (r.dst.as_ref().filter(|d| !d.negated), r.dport.as_ref())
        else {
            continue;
        };
        let kind = r.comment.as_deref().and_then(|c| {
            ["external IP", "loadbalancer IP"]
                .into_iter()
                .find(|k| c.ends_with(k))
        });
        match kind {
            Some(k) => entry.external.push(Frontend {
                kind: k.to_owned(),
                ip: dst.value.addr,
                port: port.value,
            }),
            None => {
                entry.cluster_ip = Some(dst.value.addr);
                entry.port = Some(port.value);
            }
        }
    }
    // NodePorts.
    for r in rules.chain("nat", "KUBE-NODEPORTS") {
        let Some(t) = r.target.as_deref().filter(|t| is_front_target(t)) else {
            continue;
        };
        let (Some(svc_chain), Some(port)) = (service_chain(rules, t), r.dport.as_ref()) else {
            continue;
        };
        let name = r
            .comment
            .as_deref()
            .map(comment_name)
            .unwrap_or("")
            .to_owned();
        let entry = by_chain
            .entry(svc_chain.clone())
            .or_insert_with(|| blank(name, proto_of(r)));
        entry.chain = Some(svc_chain);
        if !entry.node_ports.contains(&port.value) {
            entry.node_ports.push(port.value);
        }
    }
    // Backends and the masquerade rule of each service chain.
    for sp in by_chain.values_mut() {
        let Some(chain) = sp.chain.clone() else {
            continue;
        };
        let mut left = 1.0f64;
        for r in rules.chain("nat", &chain) {
            let Some(t) = r.target.as_deref() else {
                continue;
            };
            if t == "KUBE-MARK-MASQ" {
                if let Some(src) = r.src.as_ref().filter(|s| s.negated) {
                    sp.masquerade_unless_from = Some(src.value);
                }
                continue;
            }
            if !t.starts_with("KUBE-SEP-") {
                continue;
            }
            let p = r.probability;
            let share = left * p.unwrap_or(1.0);
            left -= share;
            let mut dnat = None;
            let mut hairpin = false;
            for e in rules.chain("nat", t) {
                match e.target.as_deref() {
                    Some("DNAT") => dnat = e.dnat_to(),
                    Some("KUBE-MARK-MASQ") if e.src.as_ref().is_some_and(|s| !s.negated) => {
                        hairpin = true
                    }
                    _ => {}
                }
            }
            match dnat {
                Some((ip, port)) => sp.backends.push(Backend {
                    ip,
                    port,
                    chain: t.to_owned(),
                    rule_probability: p,
                    share,
                    hairpin_masq: hairpin,
                }),
                None => out.notes.push(format!(
                    "line {}: {t} has no DNAT rule (chain of {})",
                    r.line, sp.name
                )),
            }
        }
        if sp.name.is_empty() {
            if let Some(c) = rules
                .chain("nat", &chain)
                .into_iter()
                .find_map(|r| r.comment.as_deref())
            {
                sp.name = comment_name(c).to_owned();
            }
        }
    }
    let mut services: Vec<ServicePort> = by_chain.into_values().collect();

    // kube-proxy's "has no endpoints" rules (filter table; nat in very old versions).
    for table in ["filter", "nat"] {
        for chain in ["KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES"] {
            for r in rules.chain(table, chain) {
                let Some(t) = r
                    .target
                    .as_deref()
                    .filter(|t| matches!(*t, "REJECT" | "DROP"))
                else {
                    continue;
                };
                let name = r
                    .comment
                    .as_deref()
                    .map(comment_name)
                    .unwrap_or("")
                    .to_owned();
                let ip = r.dst.as_ref().filter(|d| !d.negated).map(|d| d.value.addr);
                let port = r.dport.as_ref().map(|p| p.value);
                let reject = Reject {
                    table: table.to_owned(),
                    chain: chain.to_owned(),
                    target: t.to_owned(),
                    reject_with: r
                        .reject_with
                        .clone()
                        .or_else(|| (t == "REJECT").then(|| "icmp-port-unreachable".to_owned())),
                    ip,
                    port,
                    comment: r.comment.clone(),
                };
                let proto = proto_of(r);
                let pos = services.iter().position(|s| {
                    (!name.is_empty() && s.name == name && s.protocol == proto)
                        || (name.is_empty()
                            && ip.is_some()
                            && s.cluster_ip == ip
                            && s.port == port
                            && s.protocol == proto)
                });
                let i = match pos {
                    Some(i) => i,
                    None => {
                        services.push(blank(name.clone(), proto));
                        services.len() - 1
                    }
                };
                let sp = &mut services[i];
                let is_node_port = chain == "KUBE-EXTERNAL-SERVICES"
                    && r.dst_type.as_ref().is_some_and(|d| d.value == "LOCAL");
                match (is_node_port, ip, port) {
                    (true, _, Some(p)) if !sp.node_ports.contains(&p) => sp.node_ports.push(p),
                    // The first address a "has no endpoints" rule catches is the cluster IP
                    // (kube-proxy writes it before the external ones).
                    (false, Some(ip), Some(p))
                        if chain == "KUBE-SERVICES" && sp.cluster_ip.is_none() =>
                    {
                        sp.cluster_ip = Some(ip);
                        sp.port = Some(p);
                    }
                    _ => {}
                }
                sp.rejects.push(reject);
            }
        }
    }
    for sp in &mut services {
        sp.node_ports.sort_unstable();
    }
    services.sort_by(|a, b| {
        (a.cluster_ip, a.port, &a.protocol, &a.name).cmp(&(
            b.cluster_ip,
            b.port,
            &b.protocol,
            &b.name,
        ))
    });
    out.services = services;

    out.masq_mark = rules
        .chain("nat", "KUBE-MARK-MASQ")
        .into_iter()
        .find_map(|r| r.set_mark.as_deref())
        .and_then(|m| m.split_whitespace().nth(1))
        .map(str::to_owned);
    out.snat = rules
        .rules
        .iter()
        .filter(|r| r.table == "nat" && matches!(r.target.as_deref(), Some("MASQUERADE" | "SNAT")))
        .map(snat_rule)
        .collect();
    out
}
