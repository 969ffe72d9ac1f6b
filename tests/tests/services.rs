//! Services in the lab (kube-proxy iptables mode on both flannel nodes) with real
//! connections: cluster IP to backends on two nodes, hairpin, NodePort from outside, a
//! Service without endpoints, masquerade to a host outside the cluster; what podtrace reads
//! back from the nodes' rules and conntrack tables; `topo --dst VIP`.
use std::{net::Ipv4Addr, time::Duration};

use podtrace::{
    conntrack::{Conntrack, Status, Tuple},
    lab::services as lab_services,
    services::read,
};
use podtrace_tests::{connect, Lab, Server};
use serde_json::Value;

fn backends(lab: &Lab) -> (Server, Server) {
    (
        Server::start(lab.netns("pod-a2"), 8080, "pod-a2"),
        Server::start(lab.netns("pod-b1"), 8080, "pod-b1"),
    )
}

fn v4(s: &str) -> std::net::IpAddr {
    s.parse().unwrap()
}

#[test]
fn lab_status_lists_the_services_and_the_nodes_rules_say_the_same() {
    let lab = Lab::up("svcs", "flannel");
    let out = podtrace_tests::podtrace(&["lab", "status", "--json", "--prefix", &lab.prefix]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    let svcs = v["services"].as_array().unwrap();
    let rows: Vec<(String, String, u64, String, usize)> = svcs
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_owned(),
                s["vip"].as_str().unwrap().to_owned(),
                s["port"].as_u64().unwrap(),
                s["protocol"].as_str().unwrap().to_owned(),
                s["backends"].as_array().unwrap().len(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("web".into(), "10.96.0.10".into(), 80, "tcp".into(), 2),
            ("web-np".into(), "10.96.0.11".into(), 80, "tcp".into(), 2),
            ("empty".into(), "10.96.0.12".into(), 80, "tcp".into(), 0),
        ]
    );
    assert_eq!(svcs[0]["backends"][1]["pod"], "pod-b1");
    assert_eq!(svcs[0]["backends"][1]["ip"], "10.244.1.5");
    assert_eq!(svcs[1]["node_port"], 30080);
    let text = podtrace_tests::podtrace_ok(&["lab", "status", "--prefix", &lab.prefix]);
    assert!(text.contains("default/web"), "{text}");
    assert!(text.contains("10.96.0.10:80/tcp"), "{text}");

    // What each node's kernel holds is what the registry says.
    let specs = lab_services::specs().unwrap();
    for node in ["node-a", "node-b"] {
        let rules = read::read_node(Some(&lab.netns(node))).unwrap();
        let m = &rules.services;
        assert_eq!(m.notes, Vec::<String>::new(), "{node}");
        assert_eq!(m.services.len(), 3, "{node}: {:?}", m.services);
        for (spec, reg) in specs.iter().zip(svcs) {
            let s = m
                .services
                .iter()
                .find(|s| s.name == spec.port_name_string())
                .unwrap_or_else(|| panic!("{node} lacks {}", spec.port_name_string()));
            assert_eq!(s.cluster_ip, Some(spec.cluster_ip));
            assert_eq!(s.port, Some(spec.port));
            assert_eq!(s.node_ports, spec.node_port.into_iter().collect::<Vec<_>>());
            let ips: Vec<String> = s.backends.iter().map(|b| b.ip.to_string()).collect();
            let want: Vec<String> = reg["backends"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b["ip"].as_str().unwrap().to_owned())
                .collect();
            assert_eq!(ips, want, "{node} {}", s.name);
            if spec.endpoints.is_empty() {
                assert!(s.no_endpoints());
                assert!(s.chain.is_none());
            } else {
                assert_eq!(s.chain.as_deref(), reg["chain"].as_str());
                assert_eq!(
                    s.backends.iter().map(|b| b.share).sum::<f64>(),
                    1.0,
                    "{node} {}",
                    s.name
                );
            }
        }
    }
}

#[test]
fn cluster_ip_reaches_both_backends_and_conntrack_shows_the_dnat() {
    let lab = Lab::up("svcc", "flannel");
    let _servers = backends(&lab);
    let pod_a1 = lab.netns("pod-a1");
    let mut ct = Conntrack::open(Some(&lab.netns("node-a"))).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..24 {
        let (local, line) = connect(&pod_a1, Ipv4Addr::new(10, 96, 0, 10), 80).unwrap();
        let (backend, peer) = line.split_once(' ').unwrap();
        // No masquerade between pods: the backend sees pod-a1 itself.
        assert_eq!(peer, local.to_string(), "{line}");
        seen.insert(backend.to_owned());
        // node-a translated the connection to the backend that answered.
        let tuple = Tuple::ports(
            6,
            Ipv4Addr::new(10, 244, 0, 9),
            local.port(),
            Ipv4Addr::new(10, 96, 0, 10),
            80,
        );
        let e = ct
            .get(&tuple)
            .unwrap()
            .unwrap_or_else(|| panic!("node-a has no conntrack entry for {tuple}"));
        let ip = if backend == "pod-a2" {
            "10.244.0.7"
        } else {
            "10.244.1.5"
        };
        assert_eq!(e.dnat_to(), Some((v4(ip), Some(8080))), "{e:?}");
        assert_eq!(e.snat_to(), None);
        assert!(e.status.has(Status::DST_NAT) && e.status.has(Status::SEEN_REPLY));
        assert!(e.orig.is_some() && e.mark == Some(0));
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["pod-a2", "pod-b1"],
        "24 connections all went to one backend"
    );
    // The dump has them too, and node-b tracked the ones it forwarded (already translated).
    let dump = ct.dump().unwrap();
    assert!(dump.malformed.is_empty(), "{:?}", dump.malformed);
    let to_vip = dump
        .entries
        .iter()
        .filter(|e| e.orig.is_some_and(|o| o.dst == v4("10.96.0.10")))
        .count();
    assert!(to_vip >= 24, "{to_vip} entries to the VIP in node-a's dump");
    let b = Conntrack::open(Some(&lab.netns("node-b")))
        .unwrap()
        .dump()
        .unwrap();
    assert!(b.entries.iter().any(|e| e
        .orig
        .is_some_and(|o| o.src == v4("10.244.0.9") && o.dst == v4("10.244.1.5"))
        && e.dnat_to().is_none()));
    // A tuple nothing used is not there.
    let none = Tuple::ports(
        6,
        Ipv4Addr::new(10, 244, 0, 9),
        1,
        Ipv4Addr::new(10, 96, 0, 10),
        80,
    );
    assert_eq!(ct.get(&none).unwrap(), None);
    // The table's fill as netlink and /proc say it.
    let t = ct.table_stats().unwrap();
    let (count, max) = podtrace::conntrack::proc_counts(Some(&lab.netns("node-a"))).unwrap();
    assert_eq!(t.max_entries.map(u64::from), max);
    assert!(t.entries.unwrap() as usize >= to_vip && count.unwrap() as usize >= to_vip);
    let cpus = ct.cpu_stats().unwrap();
    assert!(!cpus.is_empty());
}

#[test]
fn hairpin_nodeport_no_endpoints_and_masquerade() {
    let lab = Lab::up("svch", "flannel");
    let _servers = backends(&lab);
    let ext_server = Server::start(lab.netns("ext"), 9000, "ext");
    let node_a = lab.netns("node-a");
    let mut ct = Conntrack::open(Some(&node_a)).unwrap();

    // Hairpin: pod-a2 to its own Service lands on itself now and then, masqueraded to
    // cni0's address so that the reply goes back through node-a.
    let mut hairpin = None;
    for _ in 0..64 {
        let (local, line) =
            connect(&lab.netns("pod-a2"), Ipv4Addr::new(10, 96, 0, 10), 80).unwrap();
        if line.starts_with("pod-a2 ") {
            hairpin = Some((local, line));
            break;
        }
    }
    let (local, line) = hairpin.expect("64 connections from pod-a2 never reached pod-a2");
    assert!(line.starts_with("pod-a2 10.244.0.1:"), "{line}");
    let e = ct
        .get(&Tuple::ports(
            6,
            Ipv4Addr::new(10, 244, 0, 7),
            local.port(),
            Ipv4Addr::new(10, 96, 0, 10),
            80,
        ))
        .unwrap()
        .expect("hairpin entry");
    assert_eq!(e.dnat_to(), Some((v4("10.244.0.7"), Some(8080))));
    assert_eq!(e.snat_to().map(|s| s.0), Some(v4("10.244.0.1")));
    assert!(e.status.has(Status::SRC_NAT) && e.status.has(Status::DST_NAT));

    // NodePort from outside the cluster: DNAT to a backend, masqueraded.
    let ext = lab.netns("ext");
    let (_, line) = connect(&ext, Ipv4Addr::new(10, 30, 180, 56), 30080).unwrap();
    let peer = line.split_once(' ').unwrap().1;
    assert!(
        peer.starts_with("10.244.0.0:") || peer.starts_with("10.244.0.1:"),
        "a NodePort client on node-a is masqueraded to one of node-a's pod-network addresses: {line}"
    );

    // No endpoints: refused, from a pod (cluster IP) and from outside (NodePort).
    for (ns, ip, port) in [
        (lab.netns("pod-a1"), Ipv4Addr::new(10, 96, 0, 12), 80),
        (ext.clone(), Ipv4Addr::new(10, 30, 180, 55), 30081),
    ] {
        let err = connect(&ns, ip, port).unwrap_err();
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{ip}:{port}: {err}"
        );
    }

    // Masquerade of pod traffic leaving the pod network: ext sees node-a's address, and
    // node-a's conntrack says so.
    let (local, line) = connect(&lab.netns("pod-a1"), Ipv4Addr::new(10, 30, 180, 1), 9000).unwrap();
    assert!(line.starts_with("ext 10.30.180.56:"), "{line}");
    let e = ct
        .get(&Tuple::ports(
            6,
            Ipv4Addr::new(10, 244, 0, 9),
            local.port(),
            Ipv4Addr::new(10, 30, 180, 1),
            9000,
        ))
        .unwrap()
        .expect("masquerade entry");
    assert_eq!(e.snat_to().map(|s| s.0), Some(v4("10.30.180.56")));
    assert!(e.status.has(Status::SRC_NAT) && !e.status.has(Status::DST_NAT));
    drop(ext_server);
}

/// A TCP segment with SYN and FIN set, which conntrack calls invalid.
fn syn_fin(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&1u32.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = 0x03; // FIN | SYN
    t[14..16].copy_from_slice(&1024u16.to_be_bytes());
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&[0, 6, 0, 20]);
    add(&t);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    t[16..18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    t
}

#[test]
fn invalid_packets_are_counted_per_cpu() {
    let lab = Lab::up("svci", "flannel");
    let node_a = lab.netns("node-a");
    let mut ct = Conntrack::open(Some(&node_a)).unwrap();
    let total = |ct: &mut Conntrack| {
        let mut sum = podtrace::conntrack::CpuStats::default();
        for c in ct.cpu_stats().unwrap() {
            sum.add(&c);
        }
        sum
    };
    let before = total(&mut ct);
    let (src, dst) = (Ipv4Addr::new(10, 244, 0, 9), Ipv4Addr::new(10, 244, 1, 5));
    podtrace::netns::run_in(Some(&lab.netns("pod-a1")), || {
        // SAFETY: a raw TCP socket; the kernel adds the IP header.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let seg = syn_fin(src, dst, 40000, 8080);
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst.octets()),
            },
            sin_zero: [0; 8],
        };
        for _ in 0..3 {
            // SAFETY: valid fd, buffer and address.
            let n = unsafe {
                libc::sendto(
                    fd,
                    seg.as_ptr().cast(),
                    seg.len(),
                    0,
                    (&sa as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            assert_eq!(n, seg.len() as isize, "{}", std::io::Error::last_os_error());
        }
        // SAFETY: our fd.
        unsafe { libc::close(fd) };
        Ok(())
    })
    .unwrap();
    // The segments are processed in softirq context, usually before sendto returns; wait
    // for the counter (a deadline, no fixed sleep).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut after = total(&mut ct);
    while after.invalid < before.invalid + 3 && std::time::Instant::now() < deadline {
        std::thread::yield_now();
        after = total(&mut ct);
    }
    assert!(
        after.invalid >= before.invalid + 3,
        "invalid before {} after {}",
        before.invalid,
        after.invalid
    );
}

#[test]
fn topo_says_the_destination_is_a_service() {
    let lab = Lab::up("svct", "flannel");
    let out = lab.podtrace(&["topo", "pod-a1", "--dst", "10.96.0.10", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let s = &v["service"]["services"][0];
    assert_eq!(s["name"], "default/web:http");
    assert_eq!(s["frontend"], "cluster IP");
    assert_eq!(v["service"]["node"], "node-a");
    let b: Vec<(String, String, f64)> = s["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["ip"].as_str().unwrap().to_owned(),
                b["pod"].as_str().unwrap().to_owned(),
                b["share"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        b,
        [
            ("10.244.0.7".into(), "pod-a2".into(), 0.5),
            ("10.244.1.5".into(), "pod-b1".into(), 0.5)
        ]
    );
    // The pod's own hops are there; a route to the VIP is not (the node rewrites it first).
    assert_eq!(v["hops"][0]["name"], "pod-a1/eth0");
    assert!(v["route"].is_null());

    let out = lab.podtrace(&["topo", "pod-a1", "--dst", "10.96.0.12"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("service default/empty:http"), "{text}");
    assert!(text.contains("no endpoints"), "{text}");
    assert!(
        text.contains("KUBE-SERVICES: REJECT icmp-port-unreachable"),
        "{text}"
    );

    // A pod IP is no Service; a host outside the pod network is masqueraded.
    let out = lab.podtrace(&["topo", "pod-a1", "--dst", "10.244.1.5", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v.get("service").is_none() && v.get("snat").is_none(), "{v}");
    let out = lab.podtrace(&["topo", "pod-a1", "--dst", "10.30.180.1", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["snat"]["verdict"], "translated");
    assert_eq!(v["snat"]["rule"]["chain"], "FLANNEL-POSTRTG");
    assert_eq!(v["route"]["oif"], "eth0");
}
