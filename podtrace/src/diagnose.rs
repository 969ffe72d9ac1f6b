//! What the kernel's evidence means for a user: a hint per drop reason naming the concrete
//! thing to check on the node where the packet died (from the evidence at hand: the route
//! lookup that failed, the neighbour entry, the rp_filter settings and the route back, the
//! netfilter rules, conntrack's counters, a Service without endpoints), and which reasons are
//! the destination's socket layer freeing a packet the network delivered (not a path
//! problem). Shared by `follow` (verdicts) and `capture` (`--stop-on drop`).
use std::net::Ipv4Addr;

/// A route lookup that found no route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoRoute {
    pub dst: Ipv4Addr,
    /// The table looked up, by name (`main`, `2`).
    pub table: String,
    /// The lookup's error (`-ENETUNREACH`…).
    pub err: i32,
}

/// The state of the node where a packet died, as far as it is known.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Evidence {
    /// The pod or node where it died.
    pub owner: String,
    /// The device it was on (`cni0`), when known.
    pub device: Option<String>,
    /// The packet as it was when freed.
    pub src: Option<Ipv4Addr>,
    pub dst: Option<Ipv4Addr>,
    pub dport: Option<u16>,
    /// A lookup on that node that found no route.
    pub no_route: Option<NoRoute>,
    /// The route the node has for the destination now (`ip route get`), or why none.
    pub route: Option<String>,
    /// The next hop resolved on the device, and its neighbour entry's state (`FAILED`,
    /// `INCOMPLETE`, `none`…).
    pub neighbour: Option<(Ipv4Addr, String)>,
    /// rp_filter: the device's and `all`'s settings, and the route back to the source.
    pub rp_filter: Option<(String, String)>,
    pub route_back: Option<String>,
    /// Netfilter rules on that node that drop packets like it.
    pub rules: Vec<String>,
    /// Conntrack on that node during the run: invalid packets, drops for a full table, and
    /// the table's fill.
    pub ct_invalid: u64,
    pub ct_drop: u64,
    pub ct_fill: Option<(u64, u64)>,
    /// The packet was for a Service without endpoints: its name and the rule that rejects.
    pub no_endpoints: Option<(String, String)>,
}

impl Evidence {
    /// Evidence that knows only the place (`OWNER/IFNAME` or `OWNER`).
    pub fn at(location: &str) -> Self {
        let (owner, device) = match location.split_once('/') {
            Some((o, d)) => (o.to_owned(), Some(d.to_owned())),
            None => (location.to_owned(), None),
        };
        Evidence {
            owner,
            device,
            ..Evidence::default()
        }
    }

    fn place(&self) -> String {
        match &self.device {
            Some(d) => format!("{}/{d}", self.owner),
            None => self.owner.clone(),
        }
    }

    fn dst_text(&self) -> String {
        self.dst
            .map(|d| d.to_string())
            .unwrap_or_else(|| "the destination".to_owned())
    }
}

/// What the kernel's drop reason most likely means, in a sentence, for a drop at `location`
/// (`OWNER/IFNAME` or `OWNER`) with nothing else known.
pub fn drop_hint(reason: &str, location: &str) -> String {
    hint(reason, &Evidence::at(location))
}

fn errno_text(err: i32) -> &'static str {
    match -err {
        101 => "no route",
        113 => "an unreachable route",
        13 => "a prohibit route",
        22 => "a blackhole route",
        _ => "no usable route",
    }
}

/// The hint for a drop with `reason` given what is known about its place.
pub fn hint(reason: &str, ev: &Evidence) -> String {
    let owner = ev.owner.as_str();
    let place = ev.place();
    match reason {
        "NETFILTER_DROP" => {
            if let Some((svc, rule)) = &ev.no_endpoints {
                return format!(
                    "kube-proxy on {owner} rejects it: {svc} has no endpoints ({rule}); the client gets connection refused — check the Service's selector and that its pods are ready"
                );
            }
            if ev.ct_drop > 0 {
                let fill = ev
                    .ct_fill
                    .map(|(c, m)| format!(" ({c} of {m} entries)"))
                    .unwrap_or_default();
                return format!(
                    "the conntrack table on {owner} is full{fill}: {} new connection(s) dropped during the run — raise net.netfilter.nf_conntrack_max or find what fills it",
                    ev.ct_drop
                );
            }
            let invalid: Vec<&String> = ev.rules.iter().filter(|r| r.contains("INVALID")).collect();
            if ev.ct_invalid > 0 && !invalid.is_empty() {
                return format!(
                    "conntrack on {owner} called it invalid ({} invalid packet(s) during the run: out of window, bad flags, or a reply with no connection) and this rule drops those: {}",
                    ev.ct_invalid, invalid[0]
                );
            }
            let specific: Vec<&String> =
                ev.rules.iter().filter(|r| !r.contains("INVALID")).collect();
            match specific.as_slice() {
                [] => format!(
                    "a netfilter rule (iptables/nftables) on {owner} dropped it: check its FORWARD/INPUT/OUTPUT chains"
                ),
                rules => format!(
                    "a netfilter rule on {owner} dropped it: {}",
                    rules
                        .iter()
                        .map(|r| format!("`{r}`"))
                        .collect::<Vec<_>>()
                        .join(" or ")
                ),
            }
        }
        "IP_INNOROUTES" | "IP_OUTNOROUTES" => {
            let dst = ev.dst_text();
            match &ev.no_route {
                Some(n) => format!(
                    "{owner} has {} to {} in table {}: add the route to {}'s network there (the lookup found nothing{})",
                    errno_text(n.err),
                    n.dst,
                    n.table,
                    n.dst,
                    ev.route
                        .as_deref()
                        .map(|r| format!("; now: {r}"))
                        .unwrap_or_default()
                ),
                None => format!(
                    "{owner} has no route to {dst}{}: check `ip route get {dst}` there",
                    ev.route
                        .as_deref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                ),
            }
        }
        "IP_RPFILTER" => {
            let src = ev
                .src
                .map(|s| s.to_string())
                .unwrap_or_else(|| "the source".to_owned());
            let dev = ev.device.as_deref().unwrap_or("the interface");
            let sysctl = match &ev.rp_filter {
                Some((d, a)) => format!(
                    "net.ipv4.conf.{dev}.rp_filter={d}, net.ipv4.conf.all.rp_filter={a} (the higher applies)"
                ),
                None => format!("net.ipv4.conf.{dev}.rp_filter"),
            };
            format!(
                "rp_filter on {owner}: {src} came in on {dev} but {owner} routes {src} back {}: {sysctl}",
                ev.route_back
                    .as_deref()
                    .unwrap_or("through another interface")
            )
        }
        "NEIGH_FAILED" | "NEIGH_QUEUEFULL" | "NEIGH_DEAD" | "NEIGH_CREATEFAIL"
        | "NEIGH_HH_FILLFAIL" => {
            let (ip, state) = match &ev.neighbour {
                Some((ip, s)) => (ip.to_string(), s.clone()),
                None => (ev.dst_text(), "unknown".to_owned()),
            };
            let what = match reason {
                "NEIGH_QUEUEFULL" => "too many packets queued while resolving it",
                "NEIGH_DEAD" => "the neighbour entry was being removed",
                _ => "no ARP answer",
            };
            format!(
                "{what} for {ip} on {place}: its neighbour entry is {state} (`ip neigh show {ip}` on {owner}) — is the host at {ip} up, its interface, its pod?"
            )
        }
        // On a hop (not in the destination's socket layer, see `after_delivery`): the packet
        // waited in a queue the kernel threw away whole, most often its next hop's ARP queue,
        // flushed when the interface lost its carrier or went down or its neighbours were
        // flushed (a carrier change reaches the neighbour table up to a second late).
        "QUEUE_PURGE" => {
            let nh = match &ev.neighbour {
                Some((ip, s)) => format!(" (next hop {ip}, neighbour {s})"),
                None => String::new(),
            };
            format!(
                "it waited on {place}, most likely for an ARP answer{nh}, and the kernel threw the queue away: the interface lost its carrier or went down (every port of a bridge down?), or its neighbour entries were flushed — check `ip link show` and `ip neigh` on {owner}"
            )
        }
        "NO_TX_TARGET" | "VXLAN_VNI_NOT_FOUND" | "VXLAN_INVALID_HDR" | "VXLAN_ENTRY_EXISTS" => {
            let nh = ev
                .neighbour
                .as_ref()
                .map(|(ip, s)| format!(" (next hop {ip}, neighbour {s})"))
                .unwrap_or_default();
            format!(
                "VXLAN on {place} could not send it: no FDB entry (remote VTEP) for the next hop's MAC{nh} — check `bridge fdb show dev {}` on {owner}",
                ev.device.as_deref().unwrap_or("flannel.1")
            )
        }
        r if r.starts_with("VXLAN") => format!(
            "VXLAN on {place} dropped it ({r}): check the device's VNI and port against the other nodes'"
        ),
        "BRIDGE_INGRESS_STP_STATE" => format!(
            "the bridge port {place} is not forwarding (down, or blocked): check `ip link show` and the bridge's ports on {owner}"
        ),
        "TC_INGRESS" | "TC_EGRESS" => format!(
            "a tc program on {place} dropped it: list them with `tc filter show dev {} {}` on {owner}",
            ev.device.as_deref().unwrap_or("DEV"),
            if reason == "TC_INGRESS" { "ingress" } else { "egress" }
        ),
        "PKT_TOO_BIG" => format!("it is larger than {place}'s MTU and may not be fragmented"),
        "PKT_TOO_SMALL" | "IP_INHDR" | "IP_CSUM" | "HDR_TRUNC" => {
            format!("a malformed or truncated header reached {place} ({reason})")
        }
        "OTHERHOST" => format!(
            "{place} got a frame for another host's MAC and dropped it: a bridge flooded it, knowing no port for the destination's MAC (is the port of {} down, its pod gone?), or the sender has a stale neighbour entry for it",
            ev.dst_text()
        ),
        "NO_SOCKET" => format!(
            "no socket on {owner} accepts it: nothing listens on {}{}",
            ev.dst_text(),
            ev.dport.map(|p| format!(":{p}")).unwrap_or_default()
        ),
        "QDISC_DROP" | "FQ_DROP" | "QDISC_OVERLIMIT" | "QDISC_CONGESTED" => {
            format!("a queue on {place} was full")
        }
        "IP_INADDRERRORS" | "IP_INVALID_SOURCE" | "IP_LOCAL_SOURCE" | "IP_INVALID_DEST" => {
            format!("{owner} refused its addresses ({reason}): a martian or spoofed source?")
        }
        crate::probes::UNREPORTED => format!(
            "the kernel dropped it on {place}; this kernel does not say why (drop reasons came in 5.17): check netfilter rules, routes and neighbours on {owner}"
        ),
        other => format!("the kernel dropped it on {place} ({other})"),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn hints_name_the_place() {
        assert!(drop_hint("NETFILTER_DROP", "node-a/cni0").contains("on node-a"));
        assert!(drop_hint("SOMETHING_NEW", "node-b").contains("(SOMETHING_NEW)"));
        assert!(after_delivery("TCP_OLD_DATA"));
        assert!(!after_delivery("NETFILTER_DROP"));
    }

    #[test]
    fn no_route_names_the_route_and_the_table() {
        let mut ev = Evidence::at("node-b/cni0");
        ev.dst = Some(ip("10.244.0.9"));
        ev.no_route = Some(NoRoute {
            dst: ip("10.244.0.9"),
            table: "main".into(),
            err: -101,
        });
        let h = hint("IP_INNOROUTES", &ev);
        assert!(
            h.contains("node-b has no route to 10.244.0.9 in table main"),
            "{h}"
        );
        // Without the lookup, the route the node has now.
        let mut ev = Evidence::at("node-b/cni0");
        ev.dst = Some(ip("10.244.0.9"));
        ev.route = Some("unreachable".into());
        assert!(hint("IP_INNOROUTES", &ev).contains("ip route get 10.244.0.9"));
    }

    #[test]
    fn neighbour_rp_filter_and_vxlan_hints_name_their_evidence() {
        let mut ev = Evidence::at("node-b/cni0");
        ev.neighbour = Some((ip("10.244.1.5"), "FAILED".into()));
        let h = hint("NEIGH_FAILED", &ev);
        assert!(
            h.contains("10.244.1.5 on node-b/cni0") && h.contains("FAILED"),
            "{h}"
        );

        let mut ev = Evidence::at("node-b/flannel.1");
        ev.src = Some(ip("10.244.0.9"));
        ev.rp_filter = Some(("1".into(), "0".into()));
        ev.route_back = Some("as 10.244.0.9 via 10.30.180.1 dev eth0 (table main)".into());
        let h = hint("IP_RPFILTER", &ev);
        assert!(h.contains("net.ipv4.conf.flannel.1.rp_filter=1"), "{h}");
        assert!(h.contains("dev eth0"), "{h}");

        let mut ev = Evidence::at("node-b/cni0");
        ev.neighbour = Some((ip("10.244.1.5"), "INCOMPLETE".into()));
        let h = hint("QUEUE_PURGE", &ev);
        assert!(
            h.contains("on node-b/cni0")
                && h.contains("next hop 10.244.1.5")
                && h.contains("carrier"),
            "{h}"
        );

        let h = hint("NO_TX_TARGET", &Evidence::at("node-a/flannel.1"));
        assert!(h.contains("bridge fdb show dev flannel.1"), "{h}");
    }

    #[test]
    fn netfilter_hints_prefer_the_concrete_cause() {
        let mut ev = Evidence::at("node-a/cni0");
        ev.rules = vec![
            "filter -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP".into(),
            "filter -A FORWARD -p icmp -j DROP".into(),
        ];
        // No invalid packets counted: the specific rule.
        let h = hint("NETFILTER_DROP", &ev);
        assert!(h.contains("-A FORWARD -p icmp -j DROP"), "{h}");
        assert!(!h.contains("INVALID"), "{h}");
        // Invalid packets counted: conntrack's verdict and its rule.
        ev.ct_invalid = 3;
        let h = hint("NETFILTER_DROP", &ev);
        assert!(
            h.contains("3 invalid") && h.contains("ctstate INVALID"),
            "{h}"
        );
        // A full table beats both.
        ev.ct_drop = 2;
        ev.ct_fill = Some((100, 100));
        assert!(hint("NETFILTER_DROP", &ev).contains("full (100 of 100 entries)"));
        // A Service without endpoints.
        let mut ev = Evidence::at("node-a/cni0");
        ev.no_endpoints = Some((
            "default/empty:http".into(),
            "filter KUBE-SERVICES REJECT icmp-port-unreachable".into(),
        ));
        assert!(hint("NETFILTER_DROP", &ev).contains("default/empty:http has no endpoints"));
    }
}
