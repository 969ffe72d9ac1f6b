//! The first eBPF path end to end: podtrace's tc hop probes and its `skb:kfree_skb` drop probe,
//! loaded and attached by podtrace's library on a veth pair between two fresh namespaces,
//! counting real pings.

use podtrace::probes::{read_event, FilterSpec, HopTarget, Probes};
use podtrace_abi::{DIR_EGRESS, DIR_INGRESS, KIND_DROP, KIND_TC};
use podtrace_tests::{require_root, unique_prefix, VethPair};

const HOP_A: u32 = 0;
const HOP_B: u32 = 1;

fn icmp_between(pair: &VethPair, emit: bool) -> FilterSpec {
    FilterSpec {
        a: Some(pair.a_ip),
        b: Some(pair.b_ip),
        proto: Some(1),
        emit,
        ..FilterSpec::default()
    }
}

/// Hop probes on both ends of the pair and the drop probe; `emit`: events (otherwise the
/// count-only mode, which keeps the per-hop counters).
fn attach(pair: &VethPair, emit: bool) -> Probes {
    let mut probes = Probes::load().expect("loading the eBPF object");
    probes.set_filter(icmp_between(pair, emit)).unwrap();
    for (ns, ifname, hop_id) in [
        (&pair.a, VethPair::A_IF, HOP_A),
        (&pair.b, VethPair::B_IF, HOP_B),
    ] {
        probes
            .attach_hop(&HopTarget {
                netns: Some(ns.path().to_owned()),
                ifname: ifname.to_owned(),
                hop_id,
            })
            .expect("attaching the hop probes");
    }
    probes.attach_drops().expect("attaching the drop probe");
    probes
}

fn ping(pair: &VethPair, count: u32) -> bool {
    let count = count.to_string();
    pair.a
        .exec(&[
            "ping",
            "-c",
            &count,
            "-i",
            "0.05",
            "-W",
            "1",
            "-q",
            &pair.b_ip.to_string(),
        ])
        .status
        .success()
}

#[test]
fn tc_probes_count_pings_on_both_hops() {
    require_root();
    let pair = VethPair::new(&unique_prefix("tc"), 1);
    // Count-only first (what `follow --count-only`-like idle checks use): per-hop counters.
    let mut probes = attach(&pair, false);
    // Traffic that does not match the filter must not be counted: a UDP datagram a → b.
    pair.a
        .exec(&["sh", "-c", &format!("echo x > /dev/udp/{}/9", pair.b_ip)]);
    const N: u32 = 7;
    assert!(ping(&pair, N), "pings over the veth pair failed");

    let a = probes.hop_counts(HOP_A).unwrap();
    let b = probes.hop_counts(HOP_B).unwrap();
    assert_eq!(
        (a.egress, a.ingress),
        (N as u64, N as u64),
        "veth-a: requests out, replies in"
    );
    assert_eq!(
        (b.ingress, b.egress),
        (N as u64, N as u64),
        "veth-b: requests in, replies out"
    );
    let counters = probes.counters().unwrap();
    assert_eq!(counters.tc_matched, 4 * N as u64);
    // (ping's echo replies also show up as NO_SOCKET drops: a raw socket took a copy and
    // no ping socket claimed the original. The drop test checks the drop probe.)
    assert!(
        counters.tc_seen > counters.tc_matched,
        "ARP/UDP were seen but not matched"
    );
    assert_eq!(counters.lost, 0);
    // Count-only emits nothing.
    let mut ring = probes.take_events().unwrap();
    let mut tc = 0;
    while let Some(item) = ring.next() {
        tc += usize::from(read_event(&item).expect("a whole event").kind == KIND_TC);
    }
    assert_eq!(tc, 0, "count-only mode emitted hop events");

    // Then with events: every matched packet reaches userspace as an event, in order along
    // the path; the per-hop counters stay as they were (an event session counts from its
    // events, and keeps a map update off every packet).
    probes.set_filter(icmp_between(&pair, true)).unwrap();
    assert!(ping(&pair, N), "pings over the veth pair failed");
    let mut events = Vec::new();
    while let Some(item) = ring.next() {
        events.push(read_event(&item).expect("a whole event"));
    }
    events.retain(|e| e.kind == KIND_TC);
    assert_eq!(events.len(), 4 * N as usize);
    assert!(events.iter().all(|e| e.flow.proto == 1));
    for (hop, dir) in [
        (HOP_A, DIR_EGRESS),
        (HOP_A, DIR_INGRESS),
        (HOP_B, DIR_INGRESS),
        (HOP_B, DIR_EGRESS),
    ] {
        let n = events
            .iter()
            .filter(|e| e.hop_id == hop && e.dir == dir)
            .count();
        assert_eq!(n, N as usize, "hop {hop} dir {dir}");
    }
    for seq in 1..=N {
        let request = |hop, dir| {
            events
                .iter()
                .find(|e| {
                    e.hop_id == hop
                        && e.dir == dir
                        && e.flow.flags == 8
                        && e.flow.seq & 0xffff == seq
                })
                .unwrap_or_else(|| panic!("echo request {seq} at hop {hop} dir {dir}"))
                .ts_ns
        };
        assert!(request(HOP_A, DIR_EGRESS) <= request(HOP_B, DIR_INGRESS));
    }
    let after = probes.hop_counts(HOP_A).unwrap();
    assert_eq!((after.egress, after.ingress), (N as u64, N as u64));
    assert_eq!(probes.counters().unwrap().tc_matched, 8 * N as u64);
}

#[test]
fn drop_probe_reports_netfilter_drops_with_their_reason() {
    require_root();
    let pair = VethPair::new(&unique_prefix("drop"), 2);
    let mut probes = attach(&pair, true);
    pair.b
        .exec_ok(&["iptables", "-A", "INPUT", "-p", "icmp", "-j", "DROP"]);
    const M: u32 = 5;
    assert!(
        !ping(&pair, M),
        "pings should be dropped by the iptables rule"
    );
    // The probes count as the packets pass: ping has waited for every reply, so the counts
    // are final.

    assert_eq!(probes.counters().unwrap().drops_matched, M as u64);

    let reason = probes
        .drop_reasons()
        .value("NETFILTER_DROP")
        .expect("the kernel names NETFILTER_DROP");
    let mut ring = probes.take_events().unwrap();
    let mut drops = Vec::new();
    let (mut b_in, mut b_out) = (0, 0);
    while let Some(item) = ring.next() {
        let ev = read_event(&item).unwrap();
        if ev.kind == KIND_DROP {
            drops.push(ev);
        } else if ev.kind == KIND_TC && ev.hop_id == HOP_B {
            if ev.dir == DIR_INGRESS {
                b_in += 1;
            } else {
                b_out += 1;
            }
        }
    }
    assert_eq!(
        (b_in, b_out),
        (M, 0),
        "requests reached veth-b, no reply left"
    );
    let names: Vec<String> = drops
        .iter()
        .map(|d| probes.drop_reasons().name(d.reason))
        .collect();
    assert_eq!(drops.len(), M as usize, "drops seen: {names:?}");
    for d in &drops {
        assert_eq!(
            d.reason,
            reason,
            "reason {}",
            probes.drop_reasons().name(d.reason)
        );
        assert_eq!(
            d.hop_id, HOP_B,
            "the drop happened on veth-b's namespace and device"
        );
        assert_eq!(d.flow.flags, 8, "the echo requests were dropped");
    }
}
