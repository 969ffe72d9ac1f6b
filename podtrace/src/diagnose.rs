//! What the kernel's evidence means for a user: a hint per drop reason, and which reasons are
//! the destination's socket layer freeing a packet the network delivered (not a path problem).
//! Shared by `follow` (verdicts) and `capture` (`--stop-on drop`).

/// What the kernel's drop reason most likely means, in a sentence, for a drop at `location`
/// (`OWNER/IFNAME` or `OWNER`).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_name_the_place() {
        assert!(drop_hint("NETFILTER_DROP", "node-a/cni0").contains("on node-a"));
        assert!(drop_hint("SOMETHING_NEW", "node-b").contains("(SOMETHING_NEW)"));
        assert!(after_delivery("TCP_OLD_DATA"));
        assert!(!after_delivery("NETFILTER_DROP"));
    }
}
