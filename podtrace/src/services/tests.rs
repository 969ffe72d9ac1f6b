//! Unit tests of the iptables-save parser and the Service model on the shapes kube-proxy
//! 1.21 (legacy), 1.28 (its own restore input) and the lab (iptables-save 1.8.9, nf_tables)
//! produce, and on malformed input.
use std::net::Ipv4Addr;

use super::{
    iptables::{self, split_words, Net},
    kubeproxy::{self, hash16},
    model::{self, comment_name, SnatVerdict},
};
use crate::lab::services as lab;

const LAB: &str = include_str!("testdata/lab-node-a-1.8.9-nft.txt");
const OLD: &str = include_str!("testdata/kube-proxy-1.21-legacy.txt");
const NEW: &str = include_str!("testdata/kube-proxy-1.28-restore.txt");

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

#[test]
fn chain_names_are_kube_proxys() {
    // Values from kube-proxy's own tests and any cluster's `default/kubernetes`.
    assert_eq!(hash16("ns1/svc1:p80tcp"), "XPGD46QRK7WJZT7O");
    assert_eq!(hash16("ns1/svc1:p80tcp10.180.0.1:80"), "SXIVWICOYRO3J4NJ");
    assert_eq!(hash16("default/kubernetes:httpstcp"), "NPX46M4PTMTKRN6Y");
    assert_eq!(hash16("kube-system/kube-dns:dnsudp"), "TCOU7JCQXEZGVUNU");
}

#[test]
fn words_and_quotes() {
    let (w, bad) = split_words(r#"-A X -m comment --comment "a \"b\" \\c" -j Y"#);
    assert_eq!(
        w,
        [
            "-A",
            "X",
            "-m",
            "comment",
            "--comment",
            r#"a "b" \c"#,
            "-j",
            "Y"
        ]
    );
    assert_eq!(bad, None);
    let (w, bad) = split_words(r#"-A X --comment "open"#);
    assert_eq!(w.last().unwrap(), "open");
    assert!(bad.is_some());
    assert_eq!(split_words("  ").0, Vec::<String>::new());
    assert_eq!(split_words(r#"-j """#).0, ["-j", ""]);
}

#[test]
fn networks() {
    assert_eq!(Net::parse("10.244.0.0/16").unwrap().len, 16);
    assert_eq!(Net::parse("10.96.0.10").unwrap().len, 32);
    assert_eq!(Net::parse("10.0.0.0/255.0.0.0").unwrap().len, 8);
    assert!(Net::parse("10.0.0.0/33").is_none());
    assert!(Net::parse("10.0.0.0/255.0.255.0").is_none());
    assert!(Net::parse("nope").is_none());
    let n = Net::parse("0.0.0.0/0").unwrap();
    assert!(n.contains(ip("1.2.3.4")));
    assert!(Net::parse("10.244.0.0/16")
        .unwrap()
        .contains(ip("10.244.9.9")));
    assert!(!Net::parse("10.244.0.0/16")
        .unwrap()
        .contains(ip("10.245.0.1")));
}

#[test]
fn the_labs_rules_as_the_kernel_gives_them_back() {
    let set = iptables::parse(LAB);
    assert_eq!(set.notes, Vec::<String>::new());
    let m = model::from_rules(&set);
    assert_eq!(m.notes, Vec::<String>::new());
    let names: Vec<&str> = m.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "default/web:http",
            "default/web-np:http",
            "default/empty:http"
        ]
    );
    let specs = lab::specs().unwrap();
    let web = &m.services[0];
    assert_eq!(
        (web.cluster_ip, web.port),
        (Some(ip("10.96.0.10")), Some(80))
    );
    assert_eq!(web.protocol, "tcp");
    assert_eq!(web.chain.as_deref(), Some(specs[0].svc_chain().as_str()));
    assert_eq!(web.masquerade_unless_from, Net::parse("10.244.0.0/16"));
    assert_eq!(web.node_ports, Vec::<u16>::new());
    let b: Vec<(Ipv4Addr, Option<u16>, f64, bool)> = web
        .backends
        .iter()
        .map(|b| (b.ip, b.port, b.share, b.hairpin_masq))
        .collect();
    assert_eq!(
        b,
        [
            (ip("10.244.0.7"), Some(8080), 0.5, true),
            (ip("10.244.1.5"), Some(8080), 0.5, true)
        ]
    );
    assert_eq!(web.backends[0].rule_probability, Some(0.5));
    assert_eq!(web.backends[1].rule_probability, None);
    assert_eq!(
        web.backends[1].chain,
        specs[0].sep_chain(ip("10.244.1.5"), 8080)
    );
    assert!(!web.no_endpoints());
    let np = &m.services[1];
    assert_eq!(np.node_ports, [30080]);
    assert_eq!(np.backends.len(), 2);
    let empty = &m.services[2];
    assert!(empty.no_endpoints());
    assert_eq!(
        (empty.cluster_ip, empty.port),
        (Some(ip("10.96.0.12")), Some(80))
    );
    assert_eq!(empty.node_ports, [30081]);
    let rejects: Vec<(&str, &str, Option<&str>)> = empty
        .rejects
        .iter()
        .map(|r| (r.table.as_str(), r.chain.as_str(), r.reject_with.as_deref()))
        .collect();
    assert_eq!(
        rejects,
        [
            ("filter", "KUBE-SERVICES", Some("icmp-port-unreachable")),
            (
                "filter",
                "KUBE-EXTERNAL-SERVICES",
                Some("icmp-port-unreachable")
            )
        ]
    );
    assert_eq!(
        empty.name_parts(),
        (Some("default"), Some("empty"), Some("http"))
    );
    assert_eq!(m.masq_mark.as_deref(), Some("0x4000/0x4000"));

    // Lookups: the VIP, a NodePort on a node address, nothing else.
    let node = [ip("10.30.180.56")];
    assert_eq!(m.lookup(ip("10.96.0.10"), None, &node).len(), 1);
    assert_eq!(m.lookup(ip("10.96.0.10"), Some(80), &node).len(), 1);
    assert!(m.lookup(ip("10.96.0.10"), Some(81), &node).is_empty());
    assert_eq!(
        m.lookup(ip("10.30.180.56"), Some(30080), &node)[0].name,
        "default/web-np:http"
    );
    assert!(m.lookup(ip("10.30.180.56"), None, &node).is_empty());
    assert!(m.lookup(ip("10.244.0.7"), None, &node).is_empty());

    // SNAT: pod traffic to ext is masqueraded by flannel's chain, pod to pod is not.
    match m.snat_for(&set, ip("10.244.0.9"), ip("10.30.180.1")) {
        SnatVerdict::Translated { rule } => {
            assert_eq!(rule.chain, "FLANNEL-POSTRTG");
            assert_eq!(rule.target, "MASQUERADE");
            assert_eq!(rule.src.as_deref(), Some("10.244.0.0/16"));
            assert_eq!(rule.dst.as_deref(), Some("! 224.0.0.0/4"));
            assert!(rule.random_fully);
        }
        v => panic!("{v:?}"),
    }
    assert_eq!(
        m.snat_for(&set, ip("10.244.0.9"), ip("10.244.1.5")),
        SnatVerdict::Unchanged
    );
    assert_eq!(
        m.snat_for(&set, ip("10.30.180.56"), ip("10.30.180.1")),
        SnatVerdict::Unchanged
    );
    // From outside the pod network to a pod: flannel's last rule.
    assert!(matches!(
        m.snat_for(&set, ip("10.30.180.1"), ip("10.244.1.5")),
        SnatVerdict::Translated { .. }
    ));
    assert_eq!(m.snat.len(), 3);
}

#[test]
fn what_the_lab_writes_reads_back_as_what_the_kernel_returns() {
    let specs = lab::specs().unwrap();
    let written = kubeproxy::restore_text(&specs, lab::POD_CIDR);
    let from_input = model::from_rules(&iptables::parse(&written));
    let from_kernel = model::from_rules(&iptables::parse(LAB));
    assert_eq!(from_input.services, from_kernel.services);
}

#[test]
fn kube_proxy_1_21_legacy_shapes() {
    let set = iptables::parse(OLD);
    assert_eq!(set.notes, Vec::<String>::new());
    let m = model::from_rules(&set);
    assert_eq!(m.notes, Vec::<String>::new());
    let by = |n: &str| m.services.iter().find(|s| s.name == n).unwrap();
    let front = by("shop/front:http");
    assert_eq!(
        (front.cluster_ip, front.port),
        (Some(ip("10.100.4.20")), Some(80))
    );
    assert_eq!(front.node_ports, [30443]);
    assert_eq!(front.backends.len(), 3);
    for b in &front.backends {
        assert!((b.share - 1.0 / 3.0).abs() < 1e-6, "{b:?}");
    }
    assert_eq!(front.backends[0].rule_probability, Some(0.33333333349));
    assert_eq!(front.backends[2].ip, ip("10.244.3.30"));
    // The masquerade rule sits in KUBE-SERVICES in these versions, not in the SVC chain.
    assert_eq!(front.masquerade_unless_from, None);
    let local = by("shop/local:http");
    assert_eq!(local.node_ports, [31999]);
    assert_eq!(local.backends[0].ip, ip("10.244.0.5"));
    let dns = by("kube-system/kube-dns:dns");
    assert_eq!(dns.protocol, "udp");
    assert_eq!(dns.chain.as_deref(), Some("KUBE-SVC-TCOU7JCQXEZGVUNU"));
    assert_eq!(dns.backends[0].port, Some(53));
    let api = by("default/kubernetes:https");
    assert_eq!(api.chain.as_deref(), Some("KUBE-SVC-NPX46M4PTMTKRN6Y"));
    assert_eq!(
        (api.backends[0].ip, api.backends[0].port),
        (ip("192.168.49.2"), Some(8443))
    );
    let cart = by("shop/cart");
    assert!(cart.no_endpoints());
    assert_eq!(
        (cart.cluster_ip, cart.port),
        (Some(ip("10.109.33.7")), Some(8080))
    );
    assert_eq!(cart.node_ports, [31500]);
    assert_eq!(cart.name_parts(), (Some("shop"), Some("cart"), None));
    assert_eq!(m.services.len(), 5);
    // ip-masq-agent's rule masquerades pod traffic leaving the pod network.
    assert!(matches!(
        m.snat_for(&set, ip("10.244.1.12"), ip("8.8.8.8")),
        SnatVerdict::Translated { rule } if rule.comment.as_deref() == Some("ip-masq-agent")
    ));
    assert_eq!(
        m.snat_for(&set, ip("10.244.1.12"), ip("10.244.2.7")),
        SnatVerdict::Unchanged
    );
}

#[test]
fn kube_proxy_1_28_restore_input() {
    let set = iptables::parse(NEW);
    assert_eq!(set.notes, Vec::<String>::new());
    let m = model::from_rules(&set);
    let svc1 = m
        .services
        .iter()
        .find(|s| s.name == "ns1/svc1:p80")
        .unwrap();
    assert_eq!(svc1.cluster_ip, Some(ip("172.30.0.41")));
    assert_eq!(svc1.chain.as_deref(), Some("KUBE-SVC-XPGD46QRK7WJZT7O"));
    assert_eq!(svc1.node_ports, [3001]);
    let ext: Vec<(&str, Ipv4Addr, u16)> = svc1
        .external
        .iter()
        .map(|f| (f.kind.as_str(), f.ip, f.port))
        .collect();
    assert_eq!(
        ext,
        [
            ("external IP", ip("192.168.99.11"), 80),
            ("loadbalancer IP", ip("1.2.3.4"), 80)
        ]
    );
    assert_eq!(svc1.masquerade_unless_from, Net::parse("10.0.0.0/8"));
    assert_eq!(
        svc1.backends.iter().map(|b| b.ip).collect::<Vec<_>>(),
        [ip("10.180.0.1"), ip("10.180.2.1")]
    );
    assert_eq!(m.lookup(ip("1.2.3.4"), Some(80), &[]).len(), 1);
    let svc2 = m
        .services
        .iter()
        .find(|s| s.name == "ns2/svc2:p80")
        .unwrap();
    assert!(svc2.no_endpoints());
    assert_eq!(svc2.node_ports, [3002]);
    // REJECT without --reject-with: iptables' default, icmp-port-unreachable.
    assert_eq!(
        svc2.rejects[0].reject_with.as_deref(),
        Some("icmp-port-unreachable")
    );
    assert_eq!(m.masq_mark.as_deref(), Some("0x4000"));
    // A packet kube-proxy did not mark RETURNs from KUBE-POSTROUTING.
    assert_eq!(
        m.snat_for(&set, ip("10.0.0.2"), ip("172.30.0.41")),
        SnatVerdict::Unchanged
    );
}

#[test]
fn comment_names() {
    for (c, n) in [
        ("ns1/svc1:p80 cluster IP", "ns1/svc1:p80"),
        ("ns1/svc1:p80 -> 10.180.0.1:80", "ns1/svc1:p80"),
        ("ns/svc: has no endpoints", "ns/svc"),
        (
            "default/kubernetes-bootcamp-v1: cluster IP",
            "default/kubernetes-bootcamp-v1",
        ),
        (
            "masquerade traffic for ns1/svc1:p80 external destinations",
            "ns1/svc1:p80",
        ),
        ("ns1/svc1:p80", "ns1/svc1:p80"),
        ("", ""),
    ] {
        assert_eq!(comment_name(c), n, "{c:?}");
    }
}

#[test]
fn odd_input_is_noted_not_fatal() {
    let set = iptables::parse(
        "*nat\n:KUBE-SERVICES - [0:0]\n:\n-A\n-X FOO\n-A KUBE-SERVICES -d 999.1.1.1 --dport x \
         -j\n-A KUBE-SERVICES -j KUBE-SVC-NOWHERE\nCOMMIT\n-A ORPHAN -j ACCEPT\n",
    );
    assert_eq!(set.rules.len(), 3);
    assert!(set.notes.len() >= 5, "{:?}", set.notes);
    let m = model::from_rules(&set);
    assert!(m.services.is_empty());
    // Jumps that loop do not hang the chain walk.
    let set = iptables::parse(
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-EXT-A - [0:0]\n:KUBE-EXT-B - [0:0]\n\
         -A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m tcp --dport 1 -j KUBE-EXT-A\n\
         -A KUBE-EXT-A -j KUBE-EXT-B\n-A KUBE-EXT-B -j KUBE-EXT-A\n\
         -A POSTROUTING -j KUBE-EXT-A\n-A KUBE-EXT-A -j POSTROUTING\nCOMMIT\n",
    );
    let m = model::from_rules(&set);
    assert!(m.services.is_empty());
    let _ = m.snat_for(&set, ip("1.1.1.1"), ip("2.2.2.2"));
}

/// xorshift64.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn everything(text: &str) {
    let set = iptables::parse(text);
    let m = model::from_rules(&set);
    for s in &m.services {
        let _ = (s.name_parts(), s.no_endpoints());
    }
    let _ = m.lookup(ip("10.96.0.10"), None, &[ip("10.30.180.56")]);
    let _ = m.snat_for(&set, ip("10.244.0.9"), ip("10.30.180.1"));
}

#[test]
fn malformed_rules_never_panic() {
    for text in [LAB, OLD, NEW] {
        // Every prefix ending at a character boundary.
        for (i, _) in text.char_indices().step_by(7) {
            everything(&text[..i]);
        }
        let words: Vec<&str> = text.split(' ').collect();
        let mut rng = Rng(0x2545f4914f6cdd1d);
        for _ in 0..300 {
            // Words dropped, duplicated, swapped and replaced with odd ones.
            let mut w: Vec<&str> = words.clone();
            for _ in 0..1 + rng.next() % 6 {
                let i = (rng.next() as usize) % w.len();
                match rng.next() % 5 {
                    0 => {
                        w.remove(i);
                    }
                    1 => w.insert(i, w[i]),
                    2 => {
                        let j = (rng.next() as usize) % w.len();
                        w.swap(i, j);
                    }
                    3 => w[i] = ["!", "\"", "-j", "--dport", "-A", "*nat", "\\"][i % 7],
                    _ => w[i] = "",
                }
            }
            everything(&w.join(" "));
        }
        let bytes = text.as_bytes();
        for _ in 0..200 {
            let mut b = bytes.to_vec();
            for _ in 0..8 {
                let i = (rng.next() as usize) % b.len();
                b[i] = rng.next() as u8;
            }
            everything(&String::from_utf8_lossy(&b));
        }
    }
}

#[test]
fn what_a_destination_is_to_the_lab_node_rules() {
    use super::path::{nat_flows, rewrite, Rewrite};
    use crate::trace::nat::NatTarget;
    let set = iptables::parse(LAB);
    let m = model::from_rules(&set);
    let node = [ip("10.30.180.56"), ip("10.244.0.1")];
    let pod = ip("10.244.0.9");
    // A cluster IP from a pod of the cluster CIDR: both backends, no masquerade.
    let Rewrite::Service {
        frontend, targets, ..
    } = rewrite(&m, &set, pod, ip("10.96.0.10"), Some(80), Some(6), &node)
    else {
        panic!("10.96.0.10 is a Service");
    };
    assert_eq!(frontend, "cluster IP");
    let t: Vec<(Ipv4Addr, Option<u16>, bool, bool)> = targets
        .iter()
        .map(|t| (t.ip, t.port, t.masquerade.is_some(), t.hairpin))
        .collect();
    assert_eq!(
        t,
        [
            (ip("10.244.0.7"), Some(8080), false, false),
            (ip("10.244.1.5"), Some(8080), false, false)
        ]
    );
    // The same from pod-a2: it is a backend itself (hairpin, masqueraded).
    let Rewrite::Service { targets, .. } = rewrite(
        &m,
        &set,
        ip("10.244.0.7"),
        ip("10.96.0.10"),
        None,
        None,
        &node,
    ) else {
        panic!("a Service");
    };
    assert!(targets[0].hairpin && targets[0].masquerade.is_some());
    assert!(!targets[1].hairpin && targets[1].masquerade.is_none());
    // A NodePort on the node's own address: masqueraded.
    let Rewrite::Service {
        frontend, targets, ..
    } = rewrite(
        &m,
        &set,
        pod,
        ip("10.30.180.56"),
        Some(30080),
        Some(6),
        &node,
    )
    else {
        panic!("a NodePort");
    };
    assert_eq!(frontend, "nodeport");
    assert!(targets.iter().all(|t| t.masquerade.is_some()));
    // No endpoints: the Service, no target.
    let Rewrite::Service { ports, targets, .. } =
        rewrite(&m, &set, pod, ip("10.96.0.12"), None, None, &node)
    else {
        panic!("a Service");
    };
    assert!(targets.is_empty() && ports[0].no_endpoints());
    // UDP to a TCP Service's address is no Service: routed out like any address outside
    // the pod network, masqueraded. A pod is neither; ext is masqueraded.
    assert!(matches!(
        rewrite(&m, &set, pod, ip("10.96.0.10"), Some(80), Some(17), &node),
        Rewrite::Masquerade { .. }
    ));
    assert_eq!(
        rewrite(&m, &set, pod, ip("10.244.1.5"), None, None, &node),
        Rewrite::None
    );
    assert!(matches!(
        rewrite(&m, &set, pod, ip("10.30.180.1"), None, None, &node),
        Rewrite::Masquerade {
            to_source: None,
            ..
        }
    ));

    // The kernel filter's forms: the pod and the masquerade address with each backend.
    let target = |b: &str, snat: Option<&str>| NatTarget {
        ip: ip(b),
        port: Some(8080),
        chain: None,
        share_ppm: None,
        pod: None,
        node: None,
        snat: snat.map(ip),
        snat_rule: None,
        hairpin: false,
        forward: vec![],
        reverse: vec![],
    };
    let flows = nat_flows(
        pod,
        Some(6),
        &[
            target("10.244.0.7", Some("10.244.0.1")),
            target("10.244.1.5", None),
        ],
    );
    let shown: Vec<String> = flows.iter().map(|f| f.to_string()).collect();
    assert_eq!(
        shown,
        [
            "10.244.0.9 ↔ 10.244.0.7:8080/6",
            "10.244.0.1 ↔ 10.244.0.7:8080/6",
            "10.244.0.9 ↔ 10.244.1.5:8080/6"
        ]
    );
    // Any protocol: ICMP without ports.
    let all = nat_flows(pod, None, &[target("10.244.1.5", None)]);
    assert_eq!(all.len(), 3);
    assert!(all.iter().any(|f| f.proto == 1 && f.port.is_none()));
}

#[test]
fn rules_that_can_drop_a_packet() {
    let set = iptables::parse(LAB);
    let r = model::dropping_rules(&set, ip("10.244.0.9"), ip("10.96.0.12"), 6, 80);
    assert!(
        r.iter()
            .any(|r| r.contains("REJECT") && r.contains("10.96.0.12")),
        "{r:?}"
    );
    let r = model::dropping_rules(&set, ip("10.244.0.9"), ip("10.244.1.5"), 6, 8080);
    assert!(r.iter().all(|r| !r.contains("10.96.0.12")), "{r:?}");
    assert!(r.iter().any(|r| r.contains("INVALID")), "{r:?}");
}
