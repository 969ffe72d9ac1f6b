//! Policy routing explained: which rule the kernel's FIB lookup went through for a packet,
//! evaluated the way `fib_rules_lookup` does (priority order; selectors; a lookup that finds
//! no route, or a `throw` route, goes on to the next rule).
use std::net::Ipv4Addr;

use crate::netlink::snapshot::{prefix_contains, Route, Rule, RuleAction, Snapshot, RTN_THROW};

/// What a packet looks like to the rules.
#[derive(Debug, Clone)]
pub struct FlowKey<'a> {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// Input interface name (`lo` for locally generated packets).
    pub iif: &'a str,
    pub fwmark: u32,
}

/// The outcome of the rule walk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision<'s> {
    pub rule: &'s Rule,
    /// The route found (None for blackhole/unreachable/prohibit rules).
    pub route: Option<&'s Route>,
}

fn matches(rule: &Rule, key: &FlowKey<'_>) -> bool {
    let m = rule
        .src
        .is_none_or(|(net, len)| prefix_contains(net, len, key.src))
        && rule
            .dst
            .is_none_or(|(net, len)| prefix_contains(net, len, key.dst))
        && rule.iif.as_deref().is_none_or(|i| i == key.iif)
        && rule
            .fwmark
            .is_none_or(|(mark, mask)| key.fwmark & mask == mark)
        && rule.oif.is_none();
    m != rule.invert
}

/// Walks the rules for `key` and returns the rule whose action produced the result.
pub fn decide<'s>(snap: &'s Snapshot, key: &FlowKey<'_>) -> Option<Decision<'s>> {
    let mut rules: Vec<&Rule> = snap.rules.iter().collect();
    rules.sort_by_key(|r| r.priority);
    let mut i = 0;
    while i < rules.len() {
        let rule = rules[i];
        i += 1;
        if !matches(rule, key) {
            continue;
        }
        match rule.action {
            RuleAction::Lookup(table) => match snap.lookup(table, key.dst) {
                Some(route) if route.kind != RTN_THROW => {
                    return Some(Decision {
                        rule,
                        route: Some(route),
                    })
                }
                _ => continue,
            },
            RuleAction::Goto(target) => {
                i = rules
                    .iter()
                    .position(|r| r.priority >= target)
                    .unwrap_or(rules.len());
            }
            RuleAction::Nop | RuleAction::Other => {}
            RuleAction::Blackhole | RuleAction::Unreachable | RuleAction::Prohibit => {
                return Some(Decision { rule, route: None })
            }
        }
    }
    None
}

/// Rules that send traffic *from* `ip` to a table other than main: the per-pod rules of the
/// AWS VPC CNI (`1536: from POD lookup N`).
pub fn source_rules_for(snap: &Snapshot, ip: Ipv4Addr) -> Vec<&Rule> {
    snap.rules
        .iter()
        .filter(|r| {
            !r.invert
                && r.src.is_some_and(|(net, len)| len > 0 && prefix_contains(net, len, ip))
                && matches!(r.action, RuleAction::Lookup(t) if t != crate::netlink::TABLE_MAIN && t != crate::netlink::TABLE_LOCAL)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::snapshot::{RTN_LOCAL, RTN_UNICAST, TABLE_LOCAL, TABLE_MAIN};

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn rule(priority: u32, src: Option<&str>, dst: Option<&str>, action: RuleAction) -> Rule {
        let pfx = |s: &str| {
            let (a, l) = s.split_once('/').unwrap_or((s, "32"));
            (ip(a), l.parse().unwrap())
        };
        Rule {
            priority,
            src: src.map(pfx),
            dst: dst.map(pfx),
            iif: None,
            oif: None,
            fwmark: None,
            tos: 0,
            invert: false,
            action,
        }
    }

    fn route(table: u32, dst: &str, gw: Option<&str>, oif: u32) -> Route {
        let (a, l) = dst.split_once('/').unwrap();
        Route {
            table,
            dst: ip(a),
            prefix: l.parse().unwrap(),
            gateway: gw.map(ip),
            oif: Some(oif),
            prefsrc: None,
            metric: 0,
            kind: RTN_UNICAST,
            scope: 0,
            onlink: false,
        }
    }

    /// Seed 004's node: eth0 (2) main, eth1 (3) table 2, eth2 (4) table 3, pod-c2 10.19.0.32.
    fn eni_node() -> Snapshot {
        let mut local = route(TABLE_LOCAL, "10.19.0.22/32", None, 2);
        local.kind = RTN_LOCAL;
        Snapshot {
            rules: vec![
                rule(0, None, None, RuleAction::Lookup(TABLE_LOCAL)),
                rule(
                    512,
                    None,
                    Some("10.19.0.32"),
                    RuleAction::Lookup(TABLE_MAIN),
                ),
                rule(1536, Some("10.19.0.32"), None, RuleAction::Lookup(3)),
                rule(1536, Some("10.19.16.6"), None, RuleAction::Lookup(2)),
                rule(32766, None, None, RuleAction::Lookup(TABLE_MAIN)),
                rule(32767, None, None, RuleAction::Lookup(253)),
            ],
            routes: vec![
                local,
                route(TABLE_MAIN, "0.0.0.0/0", Some("10.19.0.1"), 2),
                route(TABLE_MAIN, "10.19.0.0/20", None, 2),
                route(TABLE_MAIN, "10.19.0.32/32", None, 9),
                route(2, "0.0.0.0/0", Some("10.19.16.1"), 3),
                route(3, "0.0.0.0/0", Some("10.19.0.1"), 4),
            ],
            ..Snapshot::default()
        }
    }

    #[test]
    fn pod_traffic_takes_its_eni_table() {
        let snap = eni_node();
        let key = FlowKey {
            src: ip("10.19.0.32"),
            dst: ip("10.19.0.11"),
            iif: "eni0123",
            fwmark: 0,
        };
        let d = decide(&snap, &key).unwrap();
        assert_eq!(d.rule.priority, 1536);
        assert_eq!(d.route.unwrap().table, 3);
        assert_eq!(d.route.unwrap().oif, Some(4));
        assert_eq!(d.rule.selector(), "from 10.19.0.32");
    }

    #[test]
    fn traffic_to_the_pod_uses_main_via_rule_512() {
        let snap = eni_node();
        let key = FlowKey {
            src: ip("10.19.0.11"),
            dst: ip("10.19.0.32"),
            iif: "eth2",
            fwmark: 0,
        };
        let d = decide(&snap, &key).unwrap();
        assert_eq!(d.rule.priority, 512);
        assert_eq!(d.route.unwrap().oif, Some(9));
    }

    #[test]
    fn without_the_pod_rule_egress_falls_to_main_and_eth0() {
        let mut snap = eni_node();
        snap.rules
            .retain(|r| !(r.priority == 1536 && r.src.unwrap().0 == ip("10.19.0.32")));
        let key = FlowKey {
            src: ip("10.19.0.32"),
            dst: ip("10.19.0.11"),
            iif: "eni0123",
            fwmark: 0,
        };
        let d = decide(&snap, &key).unwrap();
        assert_eq!(d.rule.priority, 32766);
        assert_eq!(d.route.unwrap().oif, Some(2));
        assert!(source_rules_for(&snap, ip("10.19.0.32")).is_empty());
        assert_eq!(source_rules_for(&snap, ip("10.19.16.6")).len(), 1);
    }

    #[test]
    fn empty_tables_fall_through_and_goto_jumps() {
        let mut snap = eni_node();
        snap.rules
            .push(rule(100, None, None, RuleAction::Lookup(77)));
        snap.rules
            .push(rule(200, None, None, RuleAction::Goto(32766)));
        let key = FlowKey {
            src: ip("10.19.16.6"),
            dst: ip("8.8.8.8"),
            iif: "eni1",
            fwmark: 0,
        };
        // 77 is empty, 200 jumps over 1536 straight to main.
        assert_eq!(decide(&snap, &key).unwrap().rule.priority, 32766);
    }

    #[test]
    fn inverted_and_blackhole_rules() {
        let mut snap = eni_node();
        let mut r = rule(10, Some("10.0.0.0/8"), None, RuleAction::Blackhole);
        r.invert = true;
        snap.rules.push(r);
        let key = FlowKey {
            src: ip("192.168.1.1"),
            dst: ip("10.19.0.1"),
            iif: "lo",
            fwmark: 0,
        };
        let d = decide(&snap, &key).unwrap();
        assert_eq!(d.rule.priority, 10);
        assert!(d.route.is_none());
        assert_eq!(d.rule.selector(), "not from 10.0.0.0/8");
    }

    #[test]
    fn local_addresses_hit_the_local_table() {
        let snap = eni_node();
        let key = FlowKey {
            src: ip("10.19.0.11"),
            dst: ip("10.19.0.22"),
            iif: "eth0",
            fwmark: 0,
        };
        assert_eq!(decide(&snap, &key).unwrap().rule.priority, 0);
    }
}
