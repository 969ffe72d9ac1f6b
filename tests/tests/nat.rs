//! `follow` and `capture` through Services and NAT on the lab, with real connections: a
//! cluster IP followed to each backend and back, hairpin, masquerade to a host outside the
//! cluster, a NodePort; the faults named (no endpoints, a backend that refuses or is down, a
//! translation not undone, conntrack's invalid drops); the drop hints' evidence (no route,
//! rp_filter, a missing VXLAN FDB entry); the kernel filter on a VXLAN port other than the
//! first.
use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use podtrace_tests::{connect, json_lines, run_ok, Lab, Running, Server};
use serde_json::Value;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);

fn follow(lab: &Lab, pod: &str, dst: &str, extra: &[&str]) -> Running {
    let mut args = vec!["follow", pod, "--dst", dst, "--json", "--lab", &lab.prefix];
    args.extend_from_slice(extra);
    Running::start(&args)
}

/// Ends a run with SIGTERM (or waits for it to end by itself) and returns its exit code,
/// JSON objects and summary.
fn finish(run: Running, stop: bool) -> (Option<i32>, Vec<Value>, Value) {
    if stop {
        run.signal(nix::sys::signal::Signal::SIGTERM);
    }
    let (code, lines, stderr) = run.wait(60);
    let objs = json_lines(&lines);
    let summary = objs
        .iter()
        .find(|o| o["type"] == "summary")
        .unwrap_or_else(|| panic!("no summary; stdout {lines:?}; stderr {stderr}"))
        .clone();
    (code, objs, summary)
}

fn packets(objs: &[Value]) -> Vec<&Value> {
    objs.iter().filter(|o| o["type"] == "packet").collect()
}

fn hop_tuples(p: &Value) -> Vec<String> {
    p["hops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["tuple"].as_str().unwrap().to_owned())
        .collect()
}

/// Whether every connection from these client ports has closed: after the later of the two
/// FINs, the other side's ACK of it was seen.
fn closed(lines: &[String], ports: &[u16]) -> bool {
    let objs = json_lines(lines);
    ports.iter().all(|port| {
        let needle = format!(":{port}");
        let mine: Vec<(u64, &str, u64)> = packets(&objs)
            .iter()
            .filter(|p| {
                hop_tuples(p)
                    .iter()
                    .any(|t| t.ends_with(&needle) || t.contains(&format!("{needle} ")))
            })
            .filter_map(|p| {
                Some((
                    p["id"].as_u64()?,
                    p["direction"].as_str()?,
                    p["flow"]["tcp_flags"].as_u64()?,
                ))
            })
            .collect();
        let fin = |dir: &str| {
            mine.iter()
                .filter(|(_, d, f)| *d == dir && f & 1 != 0)
                .map(|(id, _, _)| *id)
                .min()
        };
        let (Some(a), Some(b)) = (fin("forward"), fin("reverse")) else {
            return false;
        };
        let (last, dir) = if a > b {
            (a, "forward")
        } else {
            (b, "reverse")
        };
        mine.iter()
            .any(|(id, d, f)| *id > last && *d != dir && f & 0x10 != 0)
    })
}

fn ipv4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn servers(lab: &Lab) -> (Server, Server) {
    (
        Server::start(lab.netns("pod-a2"), 8080, "pod-a2"),
        Server::start(lab.netns("pod-b1"), 8080, "pod-b1"),
    )
}

/// Connects from `ns` until `done` says so (at most `max` times); returns the client ports
/// and the servers' lines.
fn connect_until(
    ns: &Path,
    dst: Ipv4Addr,
    port: u16,
    max: usize,
    mut done: impl FnMut(&[String]) -> bool,
) -> (Vec<u16>, Vec<String>) {
    let (mut ports, mut lines) = (Vec::new(), Vec::new());
    for _ in 0..max {
        let (local, line) = connect(ns, dst, port).expect("connecting");
        ports.push(local.port());
        lines.push(line);
        if done(&lines) {
            break;
        }
    }
    (ports, lines)
}

#[test]
fn a_cluster_ip_is_followed_to_each_backend_and_back() {
    let lab = Lab::up("ncip", "flannel");
    let _servers = servers(&lab);
    let mut run = follow(&lab, "pod-a1", "10.96.0.10", &["--port", "80"]);
    let ready = json_lines(&run.seen);
    // The plan holds both backends' paths.
    let hops: Vec<&str> = ready[0]["hops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap())
        .collect();
    assert!(
        hops.contains(&"pod-a2/eth0") && hops.contains(&"pod-b1/eth0"),
        "{hops:?}"
    );
    let (ports, lines) = connect_until(&lab.netns("pod-a1"), VIP, 80, 32, |l| {
        let who: BTreeSet<&str> = l.iter().filter_map(|x| x.split(' ').next()).collect();
        who.len() == 2
    });
    let who: BTreeSet<&str> = lines.iter().filter_map(|x| x.split(' ').next()).collect();
    assert_eq!(who.len(), 2, "32 connections all went to one backend");
    run.wait_lines(20, |l| closed(l, &ports));
    let (code, objs, summary) = finish(run, true);
    assert_eq!(summary["verdict"], "confirmed", "{summary:#}");
    assert_eq!(code, Some(0));
    let nat = &summary["nat"];
    assert_eq!(nat["kind"], "service");
    assert_eq!(nat["node"], "node-a");
    assert_eq!(nat["service"]["name"], "default/web:http");
    // Each connection: translated on node-a to the backend that answered, as conntrack says.
    let conns = nat["connections"].as_array().unwrap();
    assert_eq!(conns.len(), ports.len(), "{conns:#?}");
    for (c, (port, line)) in conns.iter().zip(ports.iter().zip(&lines)) {
        assert_eq!(c["orig"], format!("10.244.0.9:{port} > 10.96.0.10:80"));
        let backend = if line.starts_with("pod-a2") {
            "10.244.0.7"
        } else {
            "10.244.1.5"
        };
        assert_eq!(
            c["translated"],
            format!("10.244.0.9:{port} > {backend}:8080"),
            "{c:#}"
        );
        assert_eq!(c["learnt"], "conntrack");
        let status: Vec<&str> = c["conntrack"]["status"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        assert!(
            status.contains(&"DST_NAT") && status.contains(&"SEEN_REPLY"),
            "{status:?}"
        );
    }
    for t in nat["targets"].as_array().unwrap() {
        assert!(t["connections"].as_u64().unwrap() >= 1, "{t:#}");
    }
    // Every packet: its whole path, with the rewrite where node-a made it.
    for p in packets(&objs) {
        assert_eq!(p["fate"], "complete", "{p:#}");
        let backend = p["backend"].as_str().unwrap();
        let t = &p["nat"][0];
        assert_eq!(t["node"], "node-a", "{p:#}");
        if p["direction"] == "forward" {
            assert!(
                t["hook"]
                    .as_str()
                    .unwrap()
                    .starts_with("nat PREROUTING (DNAT)"),
                "{t:#}"
            );
            assert!(t["after"].as_str().unwrap().starts_with("node-a/veth"));
            assert!(t["to"].as_str().unwrap().ends_with(":8080"), "{t:#}");
            // It reached the chosen backend's eth0.
            let pod = if backend.contains("pod-a2") {
                "pod-a2/eth0"
            } else {
                "pod-b1/eth0"
            };
            assert!(
                p["hops"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|h| h["name"] == pod && h["hook"] == "ingress"),
                "{p:#}"
            );
        } else {
            assert_eq!(
                t["hook"].as_str().unwrap().split(',').next(),
                Some("nat POSTROUTING (the DNAT undone)")
            );
            assert!(t["to"].as_str().unwrap().starts_with("10.96.0.10:80 > "));
        }
    }
    // The summary's expected path leads to a backend pod.
    let exp = summary["expected_path"].as_array().unwrap();
    let last = exp.last().unwrap()["name"].as_str().unwrap();
    assert!(last == "pod-a2/eth0" || last == "pod-b1/eth0", "{last}");
    assert_eq!(summary["lost_events"], 0);
}

#[test]
fn hairpin_to_itself_and_its_own_address() {
    let lab = Lab::up("nhai", "flannel");
    let _servers = servers(&lab);
    let mut run = follow(&lab, "pod-a2", "10.96.0.10", &["--port", "80"]);
    let (ports, lines) = connect_until(&lab.netns("pod-a2"), VIP, 80, 64, |l| {
        l.last().is_some_and(|x| x.starts_with("pod-a2 "))
    });
    assert!(
        lines.last().unwrap().starts_with("pod-a2 10.244.0.1:"),
        "64 connections never hairpinned: {lines:?}"
    );
    run.wait_lines(20, |l| closed(l, &ports));
    let (code, objs, summary) = finish(run, true);
    assert_eq!(summary["verdict"], "confirmed", "{summary:#}");
    assert_eq!(code, Some(0));
    let faults = summary["nat"]["faults"].as_array().unwrap();
    let hairpin = faults
        .iter()
        .find(|f| f["kind"] == "hairpin")
        .unwrap_or_else(|| panic!("{faults:#?}"));
    assert!(hairpin["text"].as_str().unwrap().contains("10.244.0.1"));
    // The hairpinned SYN: out of pod-a2's veth and back into it, DNATed and masqueraded.
    let port = ports.last().unwrap();
    let syn = packets(&objs)
        .into_iter()
        .find(|p| {
            p["direction"] == "forward"
                && p["flow"]["sport"] == *port
                && p["flow"]["tcp_flags"] == 2
        })
        .expect("the hairpinned SYN");
    let names: Vec<&str> = syn["hops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.first(), Some(&"pod-a2/eth0"));
    assert_eq!(names.last(), Some(&"pod-a2/eth0"));
    let last = hop_tuples(syn).pop().unwrap();
    assert!(
        last.starts_with("10.244.0.1:") && last.ends_with("> 10.244.0.7:8080"),
        "{last}"
    );
    let hooks: Vec<&str> = syn["nat"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["hook"].as_str().unwrap())
        .collect();
    assert!(
        hooks.iter().any(|h| h.contains("DNAT")) && hooks.iter().any(|h| h.contains("SNAT")),
        "{hooks:?}"
    );

    // A pod following its own address: one clear line, exit 2, nothing attached.
    let out = lab.podtrace(&["follow", "pod-a2", "--dst", "10.244.0.7", "-c", "1"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("is pod-a2's own address"), "{err}");

    // Addresses no path leads to: one line each, exit 2, for follow and capture alike.
    for (dst, says) in [
        ("255.255.255.255", "limited broadcast"),
        ("10.244.0.255", "broadcast address of 10.244.0.0/24"),
        ("224.0.0.1", "multicast"),
        ("127.0.0.1", "loopback"),
    ] {
        for cmd in ["follow", "capture"] {
            let mut args = vec![cmd, "pod-a2", "--dst", dst, "-c", "1"];
            if cmd == "capture" {
                args.extend(["-w", "/nonexistent-dir/never.pcapng"]);
            }
            let out = lab.podtrace(&args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{cmd} {dst}: {err}");
            assert_eq!(err.lines().count(), 1, "{cmd} {dst}: {err}");
            assert!(err.contains(says), "{cmd} {dst}: {err}");
        }
    }

    // The pod's node's own address is delivered there, before POSTROUTING: no masquerade.
    let out = lab.podtrace(&["topo", "pod-a2", "--dst", "10.30.180.56", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = lab.podtrace(&[
        "follow",
        "pod-a2",
        "--dst",
        "10.30.180.56",
        "--duration",
        "1",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("masquerade"), "{err}");
}

#[test]
fn masquerade_to_a_host_outside_and_a_nodeport() {
    let lab = Lab::up("nmsq", "flannel");
    let _servers = servers(&lab);
    let _ext = Server::start(lab.netns("ext"), 9000, "ext");
    // TCP and ping to ext: node-a masquerades to its address; the ping's identifier too.
    let mut run = follow(&lab, "pod-a1", "10.30.180.1", &[]);
    let (local, line) = connect(&lab.netns("pod-a1"), ipv4("10.30.180.1"), 9000).unwrap();
    assert!(line.starts_with("ext 10.30.180.56:"), "{line}");
    let out = lab.exec(
        "pod-a1",
        &["ping", "-c", "2", "-i", "0.2", "-W", "2", "10.30.180.1"],
    );
    assert!(out.status.success(), "{out:?}");
    run.wait_lines(20, |l| {
        closed(l, &[local.port()])
            && json_lines(l)
                .iter()
                .filter(|o| o["flow"]["icmp_type"] == 0)
                .count()
                == 2
    });
    let (code, objs, summary) = finish(run, true);
    assert_eq!(summary["verdict"], "confirmed", "{summary:#}");
    assert_eq!(code, Some(0));
    assert_eq!(summary["nat"]["kind"], "masquerade");
    for p in packets(&objs) {
        assert_eq!(p["fate"], "complete", "{p:#}");
        let t = &p["nat"][0];
        if p["direction"] == "forward" {
            assert_eq!(t["hook"], "nat POSTROUTING (SNAT)", "{p:#}");
            assert_eq!(t["before"], "node-a/eth0 egress");
            assert!(
                t["to"].as_str().unwrap().starts_with("10.30.180.56"),
                "{t:#}"
            );
        } else {
            assert_eq!(t["hook"], "nat PREROUTING (the SNAT undone)", "{p:#}");
        }
    }

    // A NodePort on pod-a1's own node: DNAT to a backend and masquerade, both on node-a.
    let mut run = follow(&lab, "pod-a1", "10.30.180.56", &["--port", "30080"]);
    let (ports, _) = connect_until(&lab.netns("pod-a1"), ipv4("10.30.180.56"), 30080, 1, |_| {
        true
    });
    run.wait_lines(20, |l| closed(l, &ports));
    let (_, objs, summary) = finish(run, true);
    assert_eq!(summary["verdict"], "confirmed", "{summary:#}");
    assert_eq!(summary["nat"]["service"]["frontend"], "nodeport");
    let syn = packets(&objs)
        .into_iter()
        .find(|p| p["direction"] == "forward" && p["flow"]["tcp_flags"] == 2)
        .unwrap();
    let hooks: Vec<&str> = syn["nat"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["hook"].as_str().unwrap())
        .collect();
    assert!(
        hooks.iter().any(|h| h.contains("DNAT")) && hooks.iter().any(|h| h.contains("SNAT")),
        "{hooks:?}"
    );
}

#[test]
fn a_service_without_endpoints_is_rejected_and_says_so() {
    let lab = Lab::up("nemp", "flannel");
    let run = follow(&lab, "pod-a1", "10.96.0.12", &["--port", "80", "-c", "2"]);
    let err = connect(&lab.netns("pod-a1"), EMPTY, 80).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    let (code, objs, summary) = finish(run, false);
    assert_eq!(summary["verdict"], "dropped", "{summary:#}");
    assert_eq!(code, Some(1));
    let d = &summary["drops"][0];
    assert_eq!(d["hop"], "node-a/cni0");
    assert_eq!(d["reason"], "NETFILTER_DROP");
    assert!(
        d["hint"]
            .as_str()
            .unwrap()
            .contains("default/empty:http has no endpoints"),
        "{d:#}"
    );
    // node-a's port unreachable reached the pod, as part of the same connection.
    let icmp = packets(&objs)
        .into_iter()
        .find(|p| p["flow"]["proto"] == "icmp")
        .expect("the ICMP error");
    assert_eq!(icmp["flow"]["icmp_type"], 3);
    assert_eq!(icmp["flow"]["icmp_code"], 3);
    assert_eq!(icmp["flow"]["src"], "10.244.0.1");
    assert!(icmp["flow"]["about"]
        .as_str()
        .unwrap()
        .ends_with("> 10.96.0.12:80"));
    let f = summary["nat"]["faults"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["kind"] == "no_endpoints")
        .unwrap_or_else(|| panic!("{summary:#}"))
        .clone();
    let text = f["text"].as_str().unwrap();
    assert!(
        text.contains("KUBE-SERVICES: REJECT icmp-port-unreachable"),
        "{text}"
    );
    assert!(
        text.contains("ICMP port unreachable from 10.244.0.1"),
        "{text}"
    );
}

#[test]
fn a_backend_that_refuses_and_backends_that_are_down() {
    let lab = Lab::up("nbck", "flannel");
    // Nothing listens: the backend resets the connection.
    let mut run = follow(&lab, "pod-a1", "10.96.0.10", &["--port", "80"]);
    let err = connect(&lab.netns("pod-a1"), VIP, 80).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    run.wait_lines(20, |l| {
        json_lines(l).iter().any(|o| {
            o["direction"] == "reverse"
                && o["flow"]["tcp_flags"].as_u64().is_some_and(|f| f & 4 != 0)
        })
    });
    let (_, _, summary) = finish(run, true);
    let faults = summary["nat"]["faults"].as_array().unwrap();
    assert!(
        faults.iter().any(|f| f["kind"] == "backend_refused"
            && f["text"]
                .as_str()
                .unwrap()
                .contains("nothing listens on port 8080")),
        "{faults:#?}"
    );

    // Both backends' interfaces down (and the nodes' neighbour entries for them gone, as
    // they are once they expire): the SYN dies where the node cannot resolve the backend.
    for pod in ["pod-a2", "pod-b1"] {
        let out = lab.exec(pod, &["ip", "link", "set", "eth0", "down"]);
        assert!(out.status.success(), "{out:?}");
    }
    // node-b's bridge has no port left up. The kernel tells the neighbour table that its
    // carrier is gone only when the link-watch work runs (up to a second later), and then
    // throws away what waits there for ARP (QUEUE_PURGE): wait for that before following.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = lab.exec("node-b", &["ip", "-o", "link", "show", "dev", "cni0"]);
        assert!(out.status.success(), "{out:?}");
        if String::from_utf8_lossy(&out.stdout).contains(" state DOWN ") {
            break;
        }
        assert!(Instant::now() < deadline, "node-b/cni0 still up: {out:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    for node in ["node-a", "node-b"] {
        let out = lab.exec(node, &["ip", "neigh", "flush", "dev", "cni0"]);
        assert!(out.status.success(), "{out:?}");
    }
    let run = follow(
        &lab,
        "pod-a1",
        "10.96.0.10",
        &["--port", "80", "--duration", "8"],
    );
    let started = Instant::now();
    let err = podtrace::netns::run_in(Some(&lab.netns("pod-a1")), || {
        Ok(std::net::TcpStream::connect_timeout(
            &(VIP, 80).into(),
            Duration::from_secs(6),
        ))
    })
    .unwrap()
    .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(8), "{err}");
    let (code, _, summary) = finish(run, false);
    assert_eq!(code, Some(1));
    let d = summary["drops"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["reason"] == "NEIGH_FAILED")
        .unwrap_or_else(|| panic!("{summary:#}"))
        .clone();
    // The backend the SYN was translated to is the neighbour that never answered, on its
    // node's bridge. (Each retransmission may be translated anew: conntrack forgets a
    // connection whose first packet died before it was confirmed.)
    let hint = d["hint"].as_str().unwrap();
    let at = d["hop"].as_str().unwrap();
    assert!(
        (at == "node-a/cni0" && hint.contains("no ARP answer for 10.244.0.7 on node-a/cni0"))
            || (at == "node-b/cni0"
                && hint.contains("no ARP answer for 10.244.1.5 on node-b/cni0")),
        "{hint}"
    );
    let faults = summary["nat"]["faults"].as_array().unwrap();
    assert!(
        faults.iter().any(
            |f| f["kind"] == "no_reply" && f["text"].as_str().unwrap().contains("NEIGH_FAILED")
        ),
        "{faults:#?}"
    );
}

#[test]
fn a_translation_not_undone_is_named() {
    let lab = Lab::up("nund", "flannel");
    let _servers = servers(&lab);
    // Without bridge netfilter, a same-node backend's reply crosses cni0 untranslated.
    let out = lab.exec(
        "node-a",
        &["sysctl", "-w", "net.bridge.bridge-nf-call-iptables=0"],
    );
    assert!(out.status.success(), "{out:?}");
    let run = follow(&lab, "pod-a1", "10.96.0.10", &["--port", "80"]);
    let mut failed = None;
    for _ in 0..32 {
        match connect(&lab.netns("pod-a1"), VIP, 80) {
            Ok(_) => {}
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let e = failed.expect("32 connections never went to pod-a2");
    assert!(
        matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionRefused
                | std::io::ErrorKind::TimedOut
                | std::io::ErrorKind::WouldBlock
        ),
        "{e}"
    );
    let mut run = run;
    run.wait_lines(20, |l| {
        json_lines(l).iter().any(|o| o["untranslated"] == true)
    });
    let (code, objs, summary) = finish(run, true);
    assert_eq!(summary["verdict"], "dropped", "{summary:#}");
    assert_eq!(code, Some(1));
    let back = packets(&objs)
        .into_iter()
        .find(|p| p["untranslated"] == true)
        .unwrap();
    assert_eq!(back["drop"]["location"], "pod-a1/eth0");
    assert_eq!(back["drop"]["reason"], "NO_SOCKET");
    let f = summary["nat"]["faults"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["kind"] == "nat_not_undone")
        .unwrap_or_else(|| panic!("{summary:#}"))
        .clone();
    let text = f["text"].as_str().unwrap();
    assert!(
        text.contains("from 10.244.0.7:8080 instead of 10.96.0.10:80"),
        "{text}"
    );
    assert!(
        text.contains("bridge-nf-call-iptables is 0 on node-a"),
        "{text}"
    );
}

/// A TCP segment with SYN and FIN set, which conntrack calls invalid.
fn syn_fin(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&40000u16.to_be_bytes());
    t[2..4].copy_from_slice(&8080u16.to_be_bytes());
    t[4..8].copy_from_slice(&1u32.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = 0x03;
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
fn conntrack_invalid_drops_are_named() {
    let lab = Lab::up("ninv", "flannel");
    let run = follow(&lab, "pod-a1", "10.244.1.5", &["-c", "3"]);
    let (src, dst) = (ipv4("10.244.0.9"), ipv4("10.244.1.5"));
    podtrace::netns::run_in(Some(&lab.netns("pod-a1")), || {
        // SAFETY: a raw TCP socket; the kernel adds the IP header.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP) };
        assert!(fd >= 0, "{}", std::io::Error::last_os_error());
        let seg = syn_fin(src, dst);
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
            assert_eq!(n, seg.len() as isize);
        }
        // SAFETY: our fd.
        unsafe { libc::close(fd) };
        Ok(())
    })
    .unwrap();
    let (code, _, summary) = finish(run, false);
    assert_eq!(code, Some(1));
    let d = &summary["drops"][0];
    assert_eq!(d["hop"], "node-a/cni0");
    assert_eq!(d["reason"], "NETFILTER_DROP");
    let hint = d["hint"].as_str().unwrap();
    assert!(
        hint.contains("conntrack on node-a called it invalid"),
        "{hint}"
    );
    assert!(
        hint.contains("KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP"),
        "{hint}"
    );
}

#[test]
fn no_route_and_rp_filter_name_their_evidence() {
    let lab = Lab::up("nrte", "flannel");
    // node-b loses every way back to node-a's pods.
    for args in [
        &["ip", "route", "del", "10.244.0.0/24"][..],
        &["ip", "route", "del", "default"][..],
    ] {
        let out = lab.exec("node-b", args);
        assert!(out.status.success(), "{out:?}");
    }
    // Loose rp_filter (the lab's default on flannel.1) wants a route back at all.
    let run = follow(&lab, "pod-a1", "10.244.1.5", &["-c", "1"]);
    let _ = lab.exec("pod-a1", &["ping", "-c", "1", "-W", "1", "10.244.1.5"]);
    let (_, _, summary) = finish(run, false);
    let d = &summary["drops"][0];
    assert_eq!(d["hop"], "node-b/flannel.1", "{summary:#}");
    assert_eq!(d["reason"], "IP_RPFILTER");
    let hint = d["hint"].as_str().unwrap();
    assert!(
        hint.contains("net.ipv4.conf.flannel.1.rp_filter=2"),
        "{hint}"
    );
    assert!(hint.contains("no route back"), "{hint}");

    // Without rp_filter the request reaches pod-b1 and its reply finds no route on node-b.
    let out = lab.exec(
        "node-b",
        &[
            "sh",
            "-c",
            "echo 0 > /proc/sys/net/ipv4/conf/flannel.1/rp_filter",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let run = follow(&lab, "pod-a1", "10.244.1.5", &["-c", "3"]);
    let _ = lab.exec("pod-a1", &["ping", "-c", "1", "-W", "1", "10.244.1.5"]);
    let (code, objs, summary) = finish(run, false);
    assert_eq!(code, Some(1));
    let d = summary["drops"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["reason"] == "IP_INNOROUTES")
        .unwrap_or_else(|| panic!("{summary:#}"))
        .clone();
    assert_eq!(d["hop"], "node-b/cni0");
    assert!(
        d["hint"]
            .as_str()
            .unwrap()
            .contains("node-b has no route to 10.244.0.9 in table main"),
        "{d:#}"
    );
    let reply = packets(&objs)
        .into_iter()
        .find(|p| p["direction"] == "reverse" && p["flow"]["icmp_type"] == 0)
        .unwrap();
    let fib = reply["fib"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["err"] == -101)
        .unwrap_or_else(|| panic!("{reply:#}"));
    assert_eq!(fib["location"], "node-b");
    assert_eq!(fib["dst"], "10.244.0.9");
    assert_eq!(fib["table"], 254);
}

#[test]
fn a_missing_vxlan_fdb_entry_is_named() {
    let lab = Lab::up("nfdb", "flannel");
    let out = lab.exec("node-a", &["bridge", "fdb", "show", "dev", "flannel.1"]);
    let fdb = String::from_utf8_lossy(&out.stdout).into_owned();
    let mac = fdb
        .split_whitespace()
        .next()
        .expect("an FDB entry")
        .to_owned();
    let out = lab.exec(
        "node-a",
        &[
            "bridge",
            "fdb",
            "del",
            &mac,
            "dev",
            "flannel.1",
            "dst",
            "10.30.180.55",
            "self",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let run = follow(&lab, "pod-a1", "10.244.1.5", &["-c", "1"]);
    let _ = lab.exec("pod-a1", &["ping", "-c", "1", "-W", "1", "10.244.1.5"]);
    let (_, _, summary) = finish(run, false);
    let d = &summary["drops"][0];
    assert_eq!(d["hop"], "node-a/flannel.1", "{summary:#}");
    let hint = d["hint"].as_str().unwrap();
    assert!(hint.contains("bridge fdb show dev flannel.1"), "{hint}");
    assert!(hint.contains(&mac), "the next hop's MAC: {hint}");
}

#[test]
fn capture_of_a_vip_holds_the_translated_packets() {
    let lab = Lab::up("ncap", "flannel");
    let _servers = servers(&lab);
    let dir = std::env::temp_dir().join(format!("{}nat", lab.prefix));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("vip.pcapng");
    let run = Running::start(&[
        "capture",
        "pod-a1",
        "--dst",
        "10.96.0.10",
        "-w",
        file.to_str().unwrap(),
        "-c",
        "12",
        "--lab",
        &lab.prefix,
    ]);
    let (_, line) = connect(&lab.netns("pod-a1"), VIP, 80).unwrap();
    let (code, _, stderr) = run.wait(30);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("translated packets are captured too"),
        "{stderr}"
    );
    let backend = if line.starts_with("pod-a2") {
        "10.244.0.7"
    } else {
        "10.244.1.5"
    };
    let out = run_ok(
        "tshark",
        &[
            "-r",
            file.to_str().unwrap(),
            "-T",
            "fields",
            "-e",
            "ip.dst",
            "-e",
            "tcp.dstport",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(text.contains("10.96.0.10\t80"), "{text}");
    assert!(
        text.contains(&format!("{backend}\t8080")),
        "no packet to the backend after the rewrite: {text}"
    );
}

/// Recreates a node's flannel.1 on another UDP port, keeping its MAC, address, route,
/// neighbour and FDB entry (test fixture; podtrace itself never runs `ip`).
fn vxlan_on_port(lab: &Lab, node: &str, port: u16, local: &str, remote: &str, net: &str) {
    let show = lab.exec(node, &["ip", "-o", "link", "show", "dev", "flannel.1"]);
    let show = String::from_utf8_lossy(&show.stdout).into_owned();
    let mac = show
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .expect("flannel.1's MAC")
        .to_owned();
    let neigh = lab.exec(node, &["ip", "neigh", "show", "dev", "flannel.1"]);
    let neigh = String::from_utf8_lossy(&neigh.stdout).into_owned();
    let mut words = neigh.split_whitespace();
    let (gw, remote_mac) = (
        words.next().unwrap().to_owned(),
        words.nth(1).unwrap().to_owned(),
    );
    let addr = lab.exec(
        node,
        &["ip", "-4", "-o", "addr", "show", "dev", "flannel.1"],
    );
    let addr = String::from_utf8_lossy(&addr.stdout)
        .split_whitespace()
        .nth(3)
        .unwrap()
        .to_owned();
    let port = port.to_string();
    let steps: Vec<Vec<&str>> = vec![
        vec!["ip", "link", "del", "flannel.1"],
        vec![
            "ip",
            "link",
            "add",
            "flannel.1",
            "address",
            &mac,
            "type",
            "vxlan",
            "id",
            "1",
            "local",
            local,
            "dev",
            "eth0",
            "dstport",
            &port,
            "nolearning",
        ],
        vec!["ip", "link", "set", "flannel.1", "mtu", "1450", "up"],
        vec!["ip", "addr", "add", &addr, "dev", "flannel.1"],
        vec![
            "ip",
            "route",
            "add",
            net,
            "via",
            &gw,
            "dev",
            "flannel.1",
            "onlink",
        ],
        vec![
            "ip",
            "neigh",
            "add",
            &gw,
            "lladdr",
            &remote_mac,
            "dev",
            "flannel.1",
            "nud",
            "permanent",
        ],
        vec![
            "bridge",
            "fdb",
            "add",
            &remote_mac,
            "dev",
            "flannel.1",
            "dst",
            remote,
            "self",
            "permanent",
        ],
    ];
    for s in steps {
        let out = lab.exec(node, &s);
        assert!(out.status.success(), "{s:?} on {node}: {out:?}");
    }
}

#[test]
fn vxlan_on_4789_and_every_port_reaches_the_kernel_filter() {
    use podtrace::probes::{FilterSpec, HopTarget, Probes};
    let lab = Lab::up("nvxl", "flannel");
    // The filter looks inside VXLAN on a port that is not the first it was given.
    let counts = |more: [u16; 7]| {
        let mut p = Probes::load().unwrap();
        p.set_filter(FilterSpec {
            a: Some(ipv4("10.244.0.9")),
            b: Some(ipv4("10.244.1.5")),
            emit: false,
            vxlan_port: 4789,
            vxlan_more: more,
            ..FilterSpec::default()
        })
        .unwrap();
        p.attach_hop(&HopTarget {
            netns: Some(lab.netns("node-a")),
            ifname: "eth0".into(),
            hop_id: 0,
        })
        .unwrap();
        let out = lab.exec(
            "pod-a1",
            &["ping", "-c", "2", "-i", "0.2", "-W", "2", "10.244.1.5"],
        );
        assert!(out.status.success(), "{out:?}");
        p.hop_counts(0).unwrap()
    };
    let seen = counts([8472, 0, 0, 0, 0, 0, 0]);
    assert_eq!(
        (seen.egress, seen.ingress),
        (2, 2),
        "flannel's 8472 as the second port"
    );
    let missed = counts([0; 7]);
    assert_eq!(
        (missed.egress, missed.ingress),
        (0, 0),
        "4789 alone does not see 8472"
    );

    // The lab's VXLAN on Linux's default port: follow reads it from the devices.
    vxlan_on_port(
        &lab,
        "node-a",
        4789,
        "10.30.180.56",
        "10.30.180.55",
        "10.244.1.0/24",
    );
    vxlan_on_port(
        &lab,
        "node-b",
        4789,
        "10.30.180.55",
        "10.30.180.56",
        "10.244.0.0/24",
    );
    let run = follow(&lab, "pod-a1", "10.244.1.5", &["-c", "4"]);
    let out = lab.exec(
        "pod-a1",
        &["ping", "-c", "2", "-i", "0.2", "-W", "2", "10.244.1.5"],
    );
    assert!(out.status.success(), "{out:?}");
    let (code, objs, summary) = finish(run, false);
    assert_eq!(summary["verdict"], "confirmed", "{summary:#}");
    assert_eq!(code, Some(0));
    let p = packets(&objs)[0];
    let underlay = p["hops"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == "node-a/eth0")
        .unwrap();
    assert_eq!(underlay["encap"], "vxlan");
}
