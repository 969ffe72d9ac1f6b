//! `podtrace follow` on the lab with real traffic: confirmed paths (same node, across nodes
//! through VXLAN, over an ENI), a netfilter drop pinpointed, other tc programs unharmed,
//! nothing left attached after SIGKILL, and a pod deleted mid-run.
use std::process::Command;

use podtrace_tests::{json_lines, podtrace_bin, wait_until, Killed, Lab, Running};
use serde_json::Value;

fn follow(lab: &Lab, pod: &str, dst: &str, extra: &[&str]) -> Running {
    follow_env(lab, pod, dst, extra, &[])
}

/// [`follow`] with environment variables for podtrace.
fn follow_env(lab: &Lab, pod: &str, dst: &str, extra: &[&str], env: &[(&str, &str)]) -> Running {
    let mut args = vec!["follow", pod, "--dst", dst, "--json", "--lab", &lab.prefix];
    args.extend_from_slice(extra);
    Running::start_with_env(&args, env)
}

fn finish(run: Running) -> (Option<i32>, Vec<Value>, Value) {
    let (code, lines, stderr) = run.wait(30);
    let objs = json_lines(&lines);
    let summary = objs
        .iter()
        .find(|o| o["type"] == "summary")
        .unwrap_or_else(|| panic!("no summary; stdout {lines:?}; stderr {stderr}"))
        .clone();
    (code, objs, summary)
}

fn path(summary: &Value, key: &str) -> Vec<String> {
    summary[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let name = s["name"].as_str().unwrap();
            // Host veth names are random: keep their prefix.
            let name = match name.find("/veth").or_else(|| name.find("/eni")) {
                Some(i) => format!("{}/{}*", &name[..i], &name[i + 1..i + 4]),
                None => name.to_owned(),
            };
            format!("{name} {}", s["hook"].as_str().unwrap())
        })
        .collect()
}

fn ping(lab: &Lab, from: &str, to: &str, count: u32) {
    let out = lab.exec(
        from,
        &["ping", "-c", &count.to_string(), "-i", "0.2", "-W", "2", to],
    );
    assert!(out.status.success(), "ping {from} → {to}: {:?}", out);
}

#[test]
fn same_node_ping_is_confirmed_through_the_bridge() {
    let lab = Lab::up("fsam", "flannel");
    let run = follow(&lab, "pod-a1", "10.244.0.7", &["-c", "6"]);
    ping(&lab, "pod-a1", "10.244.0.7", 3);
    let (code, objs, summary) = finish(run);
    assert_eq!(summary["verdict"], "confirmed", "{summary:#}");
    assert_eq!(code, Some(0));
    assert_eq!(
        path(&summary, "observed_path"),
        [
            "pod-a1/eth0 egress",
            "node-a/vet* ingress",
            "node-a/cni0 bridged",
            "node-a/vet* egress",
            "pod-a2/eth0 ingress",
        ]
    );
    let packets: Vec<&Value> = objs.iter().filter(|o| o["type"] == "packet").collect();
    assert_eq!(packets.len(), 6);
    // Each packet, in the order the kernel saw it, walked its direction's path (the bridge
    // crossed at layer 2 shows no hop of its own), with per-hop timing.
    let expected_back: Vec<String> = path(&summary, "expected_reverse_path")
        .into_iter()
        .filter(|s| !s.ends_with("bridged"))
        .collect();
    let expected_fwd: Vec<String> = path(&summary, "expected_path")
        .into_iter()
        .filter(|s| !s.ends_with("bridged"))
        .collect();
    for p in packets {
        assert_eq!(p["fate"], "complete", "{p:#}");
        let want = if p["direction"] == "forward" {
            &expected_fwd
        } else {
            &expected_back
        };
        assert_eq!(&path(p, "hops"), want, "{p:#}");
        assert!(p["hops"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["ts_ns"].as_u64().unwrap() > 0 && h["delta_ns"].is_i64()));
    }
}

#[test]
fn cross_node_ping_is_confirmed_on_both_nodes() {
    let lab = Lab::up("fcro", "flannel");
    let run = follow(&lab, "pod-a1", "10.244.1.5", &["-c", "4"]);
    ping(&lab, "pod-a1", "10.244.1.5", 2);
    let (code, objs, summary) = finish(run);
    assert_eq!(summary["verdict"], "confirmed", "{summary:#}");
    assert_eq!(code, Some(0));
    let expected = [
        "pod-a1/eth0 egress",
        "node-a/vet* ingress",
        "node-a/cni0 ingress",
        "node-a/flannel.1 egress",
        "node-a/eth0 egress",
        "node-b/eth0 ingress",
        "node-b/flannel.1 ingress",
        "node-b/cni0 egress",
        "node-b/vet* egress",
        "pod-b1/eth0 ingress",
    ];
    assert_eq!(path(&summary, "observed_path"), expected);
    assert_eq!(path(&summary, "expected_path"), expected);
    assert_eq!(summary["interfaces"]["node-a/eth0"], 4);
    assert_eq!(summary["interfaces"]["node-b/flannel.1"], 4);
    // On the underlay the packet was seen inside VXLAN.
    let p = objs.iter().find(|o| o["type"] == "packet").unwrap();
    let underlay = p["hops"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == "node-a/eth0")
        .unwrap();
    assert_eq!(underlay["encap"], "vxlan");
    // The device transmit hook (which looks only while the hop probes see traced packets)
    // saw every packet leave each device that sends it on, in the pods and on both nodes.
    for p in objs.iter().filter(|o| o["type"] == "packet") {
        let xmit: Vec<&str> = p["xmit"]
            .as_array()
            .unwrap_or_else(|| panic!("no xmit: {p:#}"))
            .iter()
            .filter_map(|x| x.as_str())
            .collect();
        let (pod, node, peer) = if p["hops"][0]["name"] == "pod-a1/eth0" {
            ("pod-a1/eth0", "node-a", "node-b")
        } else {
            ("pod-b1/eth0", "node-b", "node-a")
        };
        for dev in [
            pod.to_string(),
            format!("{node}/flannel.1"),
            format!("{node}/eth0"),
            format!("{peer}/cni0"),
        ] {
            assert!(xmit.contains(&dev.as_str()), "{dev} not in {xmit:?}: {p:#}");
        }
    }
    assert_eq!(summary["lost_events"], 0);
}

#[test]
fn cross_node_udp_and_tcp_are_confirmed() {
    let lab = Lab::up("fudp", "flannel");
    // UDP: three datagrams, no reply but pod-b1's port unreachables (each a record of its
    // own, so the run is bounded by time, not by a count).
    let run = follow(
        &lab,
        "pod-a1",
        "10.244.1.5",
        &["--proto", "udp", "--port", "5353", "--duration", "3"],
    );
    let out = lab.exec(
        "pod-a1",
        &[
            "python3",
            "-c",
            "import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nfor i in range(3):\n    s.sendto(b'podtrace',('10.244.1.5',5353)); time.sleep(0.1)",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let (_, objs, summary) = finish(run);
    assert_eq!(summary["packets_forward"], 3, "{summary:#}");
    // Nothing listens: the datagrams reached pod-b1 and died there (no socket), and pod-b1's
    // kernel answered with ICMP port unreachable, an error about the conversation that is
    // followed back with it.
    for p in objs.iter().filter(|o| o["type"] == "packet") {
        if p["flow"]["proto"] == "icmp" {
            assert_eq!(p["direction"], "reverse", "{p:#}");
            assert_eq!(
                (
                    p["flow"]["icmp_type"].as_u64(),
                    p["flow"]["icmp_code"].as_u64()
                ),
                (Some(3), Some(3))
            );
            assert!(
                p["flow"]["about"]
                    .as_str()
                    .unwrap()
                    .ends_with("> 10.244.1.5:5353"),
                "{p:#}"
            );
            continue;
        }
        assert_eq!(p["flow"]["proto"], "udp");
        assert_eq!(p["hops"].as_array().unwrap().len(), 10);
    }

    // TCP: a connection to a listener in pod-b1.
    let listener = Command::new(podtrace_bin())
        .args(["lab", "exec", "pod-b1", "--prefix", &lab.prefix, "--", "python3", "-c",
               "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('0.0.0.0',8080))\ns.listen()\nc,_=s.accept()\nc.recv(100)\nc.close()"])
        .spawn()
        .unwrap();
    let mut listener = Killed(listener);
    wait_until(10, "pod-b1 to listen on 8080", || {
        String::from_utf8_lossy(&lab.exec("pod-b1", &["ss", "-Hltn", "sport = :8080"]).stdout)
            .contains("8080")
    });
    let run = follow(
        &lab,
        "pod-a1",
        "10.244.1.5",
        &["--proto", "tcp", "--port", "8080", "--duration", "3"],
    );
    let out = lab.exec(
        "pod-a1",
        &["python3", "-c", "import socket\ns=socket.create_connection(('10.244.1.5',8080),timeout=3)\ns.sendall(b'hello')\ns.close()"],
    );
    assert!(out.status.success(), "{out:?}");
    let (code, objs, summary) = finish(run);
    let _ = listener.0.wait();
    assert_eq!(summary["verdict"], "confirmed", "{summary:#}");
    assert_eq!(code, Some(0));
    let packets: Vec<&Value> = objs.iter().filter(|o| o["type"] == "packet").collect();
    assert!(
        packets.len() >= 6,
        "a TCP handshake, data and close: {}",
        packets.len()
    );
    assert!(
        packets
            .iter()
            .any(|p| p["flow"]["tcp_flags"].as_u64().unwrap() & 0x02 != 0),
        "a SYN"
    );
}

/// Sends TCP segments of 6000 bytes through eth0 with an AF_PACKET socket and a virtio-net
/// header whose `hdr_len` is 14: past a page, the kernel keeps only those 14 bytes in the
/// skb's linear data and the rest, IPv4 and TCP headers included, in page fragments (as
/// QEMU's or a virtio-user backend's packets arrive). No GSO, no checksum offload: nothing
/// on the way out pulls the headers in. Args: peer, port, count, gateway (for its MAC).
const NONLINEAR_SENDER: &str = r#"
import socket, struct, sys
dst, dport, count, gw = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.connect((dst, dport))
src = u.getsockname()[0]; u.close()
mac = bytes.fromhex(open('/sys/class/net/eth0/address').read().strip().replace(':', ''))
gwmac = [bytes.fromhex(f[3].replace(':', '')) for f in
         (l.split() for l in open('/proc/net/arp').read().splitlines()[1:]) if f[0] == gw][0]
def csum(b):
    if len(b) % 2: b += b'\0'
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    while s >> 16: s = (s & 0xffff) + (s >> 16)
    return s
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.setsockopt(263, 15, 1)  # SOL_PACKET, PACKET_VNET_HDR
s.bind(('eth0', 0))
payload = b'podtrace' * 750
for i in range(count):
    tcp_len = 20 + len(payload)
    ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + tcp_len, 0x1000 + i, 0, 64, 6, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    ip = ip[:10] + struct.pack('!H', 0xffff - csum(ip)) + ip[12:]
    tcp = struct.pack('!HHIIBBHHH', 40000 + i, dport, 1000 * (i + 1), 0, 5 << 4, 0x18, 65535, 0, 0)
    c = csum(socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack('!HH', 6, tcp_len) + tcp + payload)
    tcp = tcp[:16] + struct.pack('!H', 0xffff - c) + tcp[18:]
    # virtio_net_hdr: no flags, no GSO, hdr_len 14.
    s.send(struct.pack('<BBHHHH', 0, 0, 14, 0, 0, 0) + gwmac + mac + b'\x08\x00' + ip + tcp + payload)
"#;

#[test]
fn packets_whose_headers_are_outside_the_linear_data_are_followed() {
    let lab = Lab::up("fnlin", "flannel");
    // Frames of 6 KB: pod-a1's eth0 and its host veth (the receiving end's MTU is what
    // veth checks) take them; node-a fragments them on into the VXLAN.
    let topo: Value = serde_json::from_slice(
        &lab.podtrace(&["topo", "pod-a1", "--dst", "10.244.1.5", "--json"])
            .stdout,
    )
    .unwrap();
    let host_veth = topo["hops"][1]["ifname"].as_str().unwrap().to_owned();
    assert!(host_veth.starts_with("veth"), "{topo:#}");
    for (ns, dev) in [("pod-a1", "eth0"), ("node-a", host_veth.as_str())] {
        let out = lab.exec(ns, &["ip", "link", "set", dev, "mtu", "9000"]);
        assert!(out.status.success(), "{out:?}");
    }
    // The gateway's MAC, for the frames.
    ping(&lab, "pod-a1", "10.244.0.1", 1);

    let run = follow(
        &lab,
        "pod-a1",
        "10.244.1.5",
        &["--proto", "tcp", "--port", "5353", "--duration", "3"],
    );
    let out = lab.exec(
        "pod-a1",
        &[
            "python3",
            "-c",
            NONLINEAR_SENDER,
            "10.244.1.5",
            "5353",
            "2",
            "10.244.0.1",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let (code, objs, summary) = finish(run);
    assert_eq!(summary["verdict"], "confirmed", "{summary:#}");
    assert_eq!(code, Some(0));
    // Both segments, each seen on every hop from pod-a1's eth0 on: the first hops read the
    // headers from the page fragments (the skb's linear data holds only the Ethernet
    // header until node-a's IP layer pulls the IPv4 header in).
    let sent: Vec<&Value> = objs
        .iter()
        .filter(|o| o["type"] == "packet" && o["direction"] == "forward")
        .collect();
    assert_eq!(sent.len(), 2, "{objs:#?}");
    for p in sent {
        assert_eq!(p["fate"], "complete", "{p:#}");
        assert_eq!(p["flow"]["dport"], 5353, "{p:#}");
        let hops = path(p, "hops");
        assert_eq!(
            hops[..3],
            [
                "pod-a1/eth0 egress",
                "node-a/vet* ingress",
                "node-a/cni0 ingress"
            ],
            "{p:#}"
        );
        assert_eq!(hops.last().unwrap(), "pod-b1/eth0 ingress", "{p:#}");
    }
}

#[test]
fn eni_pod_is_confirmed_through_its_eni_and_never_eth0() {
    let lab = Lab::up("feni", "eni");
    let run = follow(&lab, "pod-c2", "10.19.0.11", &["-c", "6"]);
    ping(&lab, "pod-c2", "10.19.0.11", 3);
    let (code, _, summary) = finish(run);
    assert_eq!(summary["verdict"], "confirmed", "{summary:#}");
    assert_eq!(code, Some(0));
    assert_eq!(
        path(&summary, "observed_path"),
        [
            "pod-c2/eth0 egress",
            "node-c/eni* ingress",
            "node-c/eth2 egress"
        ]
    );
    assert_eq!(summary["interfaces"]["node-c/eth2"], 6);
    assert_eq!(summary["interfaces"]["node-c/eth0"], 0);
    assert_eq!(summary["interfaces"]["node-c/eth1"], 0);
}

#[test]
fn a_netfilter_drop_is_pinpointed() {
    let lab = Lab::up("fdrp", "flannel");
    let out = lab.exec(
        "node-a",
        &["iptables", "-I", "FORWARD", "-p", "icmp", "-j", "DROP"],
    );
    assert!(out.status.success(), "{out:?}");
    let run = follow(&lab, "pod-a1", "10.244.1.5", &["-c", "2"]);
    let out = lab.exec(
        "pod-a1",
        &["ping", "-c", "2", "-i", "0.2", "-W", "1", "10.244.1.5"],
    );
    assert!(!out.status.success());
    let (code, objs, summary) = finish(run);
    assert_eq!(summary["verdict"], "dropped", "{summary:#}");
    assert_eq!(code, Some(1));
    let drops = summary["drops"].as_array().unwrap();
    assert_eq!(drops.len(), 1, "{drops:?}");
    assert_eq!(drops[0]["hop"], "node-a/cni0");
    assert_eq!(drops[0]["reason"], "NETFILTER_DROP");
    assert_eq!(drops[0]["count"], 2);
    assert!(drops[0]["hint"].as_str().unwrap().contains("netfilter"));
    let p = objs.iter().find(|o| o["type"] == "packet").unwrap();
    assert_eq!(p["fate"], "dropped");
    assert_eq!(
        p["hops"].as_array().unwrap().len(),
        3,
        "seen up to cni0, then dropped"
    );
}

#[test]
fn a_tc_program_attached_before_keeps_seeing_its_packets() {
    use podtrace::probes::{FilterSpec, HopTarget, Probes};
    let lab = Lab::up("ftcp", "flannel");
    // Another eBPF tc program (a second, independent podtrace probe set) on pod-a1's eth0 and
    // node-a's uplink, attached before follow.
    let mut other = Probes::load().unwrap();
    other
        .set_filter(FilterSpec {
            a: Some("10.244.0.9".parse().unwrap()),
            b: Some("10.244.1.5".parse().unwrap()),
            emit: false,
            ..FilterSpec::default()
        })
        .unwrap();
    for (i, (ns, ifname)) in [("pod-a1", "eth0"), ("node-a", "eth0")]
        .into_iter()
        .enumerate()
    {
        other
            .attach_hop(&HopTarget {
                netns: Some(lab.netns(ns)),
                ifname: ifname.into(),
                hop_id: i as u32,
            })
            .unwrap();
    }
    let counts = |p: &Probes| (p.hop_counts(0).unwrap(), p.hop_counts(1).unwrap());
    let run = follow(&lab, "pod-a1", "10.244.1.5", &["-c", "4"]);
    ping(&lab, "pod-a1", "10.244.1.5", 2);
    let (_, _, summary) = finish(run);
    assert_eq!(summary["verdict"], "confirmed");
    let (pod, uplink) = counts(&other);
    assert_eq!((pod.egress, pod.ingress), (2, 2), "during follow");
    assert_eq!((uplink.egress, uplink.ingress), (2, 2), "during follow");
    // And after follow has gone.
    ping(&lab, "pod-a1", "10.244.1.5", 1);
    let (pod, uplink) = counts(&other);
    assert_eq!((pod.egress, pod.ingress), (3, 3), "after follow");
    assert_eq!((uplink.egress, uplink.ingress), (3, 3), "after follow");
}

/// The tc programs (TCX or clsact) on an interface of a lab namespace, both directions.
fn tc_programs(lab: &Lab, ns: &str, ifname: &str) -> String {
    podtrace_tests::tc_programs_in(&lab.netns(ns), ifname)
}

#[test]
fn nothing_stays_attached_after_sigkill() {
    let lab = Lab::up("fkil", "flannel");
    // clsact filters (the default where TCX links cannot be made quickly, and on kernels
    // without TCX): they outlive their owner, and its guard removes them.
    let run = follow_clsact(&lab);
    assert!(
        tc_programs(&lab, "node-a", "cni0").contains("hop_ingress"),
        "attached while running"
    );
    let pid = run.pid();
    run.signal(nix::sys::signal::Signal::SIGKILL);
    // Its guard (which shares its stderr) removes the filters and says so.
    let said = format!("podtrace pid {pid} left behind when it was killed");
    wait_until(10, "the guard to say it cleaned up", || {
        run.stderr().contains(&said)
    });
    let (code, _, _) = run.wait(10);
    assert_eq!(code, None, "killed by a signal");
    // The guard removes a killed podtrace's clsact filters (TCX links would go as its files close).
    for (ns, ifname) in [
        ("pod-a1", "eth0"),
        ("node-a", "cni0"),
        ("node-a", "flannel.1"),
        ("node-a", "eth0"),
        ("node-b", "eth0"),
        ("pod-b1", "eth0"),
    ] {
        wait_until(
            10,
            &format!("{ns}/{ifname} to lose podtrace's programs"),
            || !tc_programs(&lab, ns, ifname).contains("hop_"),
        );
    }
    // The map pins that carry maps between program copies are gone too.
    let pins: Vec<String> = std::fs::read_dir("/sys/fs/bpf")
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("podtrace-{pid}-")))
                .collect()
        })
        .unwrap_or_default();
    assert!(pins.is_empty(), "{pins:?}");
    // And the record of its filters.
    let records: Vec<String> = std::fs::read_dir(podtrace::probes::clsact::STATE_DIR)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("{pid}-")))
                .collect()
        })
        .unwrap_or_default();
    assert!(records.is_empty(), "{records:?}");
}

/// The ready line's `tc` field.
fn tc_of(run: &mut Running) -> String {
    run.wait_lines(10, |lines| {
        lines.iter().any(|l| l.contains("\"type\":\"ready\""))
    });
    let ready = json_lines(&run.seen)
        .into_iter()
        .find(|o| o["type"] == "ready")
        .unwrap();
    ready["tc"].as_str().unwrap_or_default().to_owned()
}

/// `follow pod-a1 --dst 10.244.1.5` with clsact filters (`PODTRACE_TC=clsact`).
fn follow_clsact(lab: &Lab) -> Running {
    follow_env(
        lab,
        "pod-a1",
        "10.244.1.5",
        &[],
        &[("PODTRACE_TC", "clsact")],
    )
}

/// The kernel's RCU knob, which podtrace sets while it makes or closes TCX links.
fn rcu_knob() -> String {
    std::fs::read_to_string(podtrace::probes::rcu::KNOB)
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// Waits until the RCU knob is "0" again (other tests' sessions set it for milliseconds).
fn rcu_knob_put_back() {
    wait_until(10, "the RCU knob to be 0 again", || rcu_knob() == "0");
    assert!(!std::path::Path::new(podtrace::probes::rcu::RECORD).exists());
}

/// podtrace with `/sys` read-only, as in many containers: in a mount namespace of its own.
fn follow_read_only_sys(lab: &Lab, pod: &str, dst: &str) -> Running {
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["-m", "--propagation", "private", "--", "sh", "-c"])
        .arg(r#"mount -o remount,bind,ro /sys && exec "$@""#)
        .arg("sh")
        .arg(podtrace_tests::podtrace_bin())
        .args(["follow", pod, "--dst", dst, "--json", "--lab", &lab.prefix]);
    Running::spawn(cmd, "follow with a read-only /sys", 30)
}

#[test]
fn tcx_links_by_default_clsact_where_sys_is_read_only_and_sigkill_leaves_nothing() {
    use podtrace::probes::{FilterSpec, HopTarget, Probes, TcMode};
    let lab = Lab::up("ftcx", "flannel");
    if rcu_knob() != "0" {
        eprintln!(
            "skipped: {} is not 0 on this machine",
            podtrace::probes::rcu::KNOB
        );
        return;
    }
    // By default, on a kernel with TCX: TCX links, made with RCU grace periods expedited,
    // and the RCU knob put back as it was.
    let mut run = follow(&lab, "pod-a1", "10.244.1.5", &[]);
    assert_eq!(tc_of(&mut run), "tcx");
    rcu_knob_put_back();
    run.signal(nix::sys::signal::Signal::SIGTERM);
    let _ = finish(run);
    rcu_knob_put_back();
    // PODTRACE_TC=clsact asks for clsact filters.
    let mut run = follow_clsact(&lab);
    assert_eq!(tc_of(&mut run), "clsact");
    run.signal(nix::sys::signal::Signal::SIGTERM);
    let _ = finish(run);
    // With /sys read-only podtrace cannot expedite RCU grace periods: clsact filters, quick
    // to place.
    let mut run = follow_read_only_sys(&lab, "pod-a1", "10.244.1.5");
    assert_eq!(tc_of(&mut run), "clsact");
    run.signal(nix::sys::signal::Signal::SIGTERM);
    let _ = finish(run);
    // Another TCX program already on cni0 (as Cilium's would be): podtrace goes first in
    // that chain, with TCX links, for the whole session.
    let mut other = Probes::load().unwrap();
    other.set_tc_mode(TcMode::Tcx).unwrap();
    other
        .set_filter(FilterSpec {
            emit: false,
            ..FilterSpec::default()
        })
        .unwrap();
    other
        .attach_hop(&HopTarget {
            netns: Some(lab.netns("node-a")),
            ifname: "cni0".into(),
            hop_id: 0,
        })
        .unwrap();
    // With /sys read-only again, but a TCX program on one of the hops.
    let mut run = follow_read_only_sys(&lab, "pod-a1", "10.244.1.5");
    assert_eq!(tc_of(&mut run), "tcx");
    assert_eq!(
        tc_programs(&lab, "node-a", "cni0")
            .matches("hop_ingress")
            .count(),
        2
    );
    assert!(tc_programs(&lab, "pod-a1", "eth0").contains("hop_ingress"));
    // SIGKILL: the kernel closes the links with the process's files.
    run.signal(nix::sys::signal::Signal::SIGKILL);
    let _ = run.wait(10);
    wait_until(10, "the killed podtrace's TCX links to go", || {
        !tc_programs(&lab, "pod-a1", "eth0").contains("hop_")
            && tc_programs(&lab, "node-a", "cni0")
                .matches("hop_ingress")
                .count()
                == 1
    });
    drop(other);
    assert!(!tc_programs(&lab, "node-a", "cni0").contains("hop_"));
}

#[test]
fn sigterm_prints_the_summary() {
    let lab = Lab::up("fsig", "flannel");
    let mut run = follow(&lab, "pod-a1", "10.244.1.5", &[]);
    ping(&lab, "pod-a1", "10.244.1.5", 1);
    // Both packets correlated and printed, then the signal.
    run.wait_lines(10, |lines| {
        lines
            .iter()
            .filter(|l| l.contains("\"type\":\"packet\""))
            .count()
            == 2
    });
    run.signal(nix::sys::signal::Signal::SIGTERM);
    let (code, _, summary) = finish(run);
    assert_eq!(summary["verdict"], "confirmed");
    assert_eq!(summary["packets"], 2);
    assert_eq!(code, Some(0));
}

#[test]
fn a_pod_deleted_mid_run_ends_the_run_with_exit_2() {
    let lab = Lab::up("fdel", "flannel");
    let run = follow(&lab, "pod-a1", "10.244.1.5", &[]);
    podtrace::netns::delete(&format!("{}pod-a1", lab.prefix)).unwrap();
    let (code, _, stderr) = run.wait(10);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("is gone"), "{stderr}");
}

#[test]
fn not_seen_when_nothing_flows() {
    let lab = Lab::up("fnot", "flannel");
    let run = follow(&lab, "pod-a1", "10.244.1.5", &["--duration", "1"]);
    let (code, _, summary) = finish(run);
    assert_eq!(summary["verdict"], "not_seen");
    assert_eq!(code, Some(1));
}

#[test]
fn the_rcu_knob_a_killed_podtrace_left_set_is_put_back() {
    use podtrace::probes::rcu::{KNOB, LOCK, RECORD};
    use std::os::fd::AsRawFd as _;
    let lab = Lab::up("frcu", "flannel");
    if rcu_knob() != "0" {
        eprintln!("skipped: {KNOB} is not 0 on this machine");
        return;
    }
    /// Puts the knob back should the test fail before podtrace does.
    struct PutBack;
    impl Drop for PutBack {
        fn drop(&mut self) {
            if std::fs::read_to_string(RECORD).is_ok() {
                let _ = std::fs::write(KNOB, "0");
                let _ = std::fs::remove_file(RECORD);
            }
        }
    }
    let _put_back = PutBack;
    // What a podtrace killed while it made TCX links leaves: the knob set and the earlier
    // value recorded. Made under the lock, as podtrace makes it (other tests run beside).
    {
        std::fs::create_dir_all("/run/podtrace").unwrap();
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK)
            .unwrap();
        // SAFETY: flock on a file this block owns; released as it closes.
        assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
        std::fs::write(RECORD, "0\n").unwrap();
        std::fs::write(KNOB, "1").unwrap();
    }
    assert_eq!(rcu_knob(), "1");
    // The next podtrace to start puts it back.
    let mut run = follow_clsact(&lab);
    assert_eq!(tc_of(&mut run), "clsact");
    rcu_knob_put_back();
    run.signal(nix::sys::signal::Signal::SIGTERM);
    // It says so, unless another test's podtrace (they run beside) started first and did
    // it: the knob's value above is what the test judges.
    let _ = run.wait(30);
}

/// Raw tracepoint links (the tp_btf hooks) the process holds.
fn raw_tp_links(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    std::fs::read_to_string(e.path())
                        .is_ok_and(|s| s.contains("link_type:\traw_tracepoint"))
                })
                .count()
        })
        .unwrap_or(0)
}

/// The route lookup and transmit hooks (tp_btf links, run for every packet of the machine)
/// go after 5 s without a packet of the conversation and come back with its next one; the
/// packets after that have their lookups and transmits again. The drop hook stays. With
/// `--keep-hooks` nothing goes.
#[test]
fn idle_route_lookup_and_transmit_hooks_go_and_come_back() {
    let lab = Lab::up("fidle", "flannel");
    let run = follow(&lab, "pod-a1", "10.244.1.5", &[]);
    let ready = json_lines(&run.seen)
        .into_iter()
        .find(|o| o["type"] == "ready")
        .expect("a ready line");
    let idle: Vec<&str> = ready["kernel_hooks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["idle_detach"] == true)
        .map(|h| h["evidence"].as_str().unwrap())
        .collect();
    assert_eq!(idle, ["fib", "xmit"], "{ready:#}");
    let pid = run.pid();
    assert_eq!(raw_tp_links(pid), 3, "drops, route lookups, transmits");
    wait_until(20, "the idle hooks to go", || raw_tp_links(pid) == 1);
    ping(&lab, "pod-a1", "10.244.1.5", 4);
    wait_until(5, "the hooks to come back", || raw_tp_links(pid) == 3);
    run.signal(nix::sys::signal::Signal::SIGINT);
    let (code, objs, summary) = finish(run);
    assert_eq!(code, Some(0), "{summary:#}");
    let packets: Vec<&Value> = objs.iter().filter(|o| o["type"] == "packet").collect();
    assert_eq!(packets.len(), 8, "{objs:#?}");
    // The last echo request (0.6 s after the first): its lookups on the way and its
    // transmits out of pod-a1 and node-a are there again.
    let last = packets
        .iter()
        .rfind(|p| p["hops"][0]["name"] == "pod-a1/eth0")
        .unwrap();
    let xmit: Vec<&str> = last["xmit"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|x| x.as_str())
        .collect();
    assert!(
        xmit.contains(&"pod-a1/eth0") && xmit.contains(&"node-a/eth0"),
        "{last:#}"
    );
    assert!(!last["fib"].as_array().unwrap().is_empty(), "{last:#}");

    let run = follow(&lab, "pod-a1", "10.244.1.5", &["--keep-hooks"]);
    std::thread::sleep(std::time::Duration::from_secs(7));
    assert_eq!(raw_tp_links(run.pid()), 3, "--keep-hooks");
    run.signal(nix::sys::signal::Signal::SIGINT);
    let (code, _, summary) = finish(run);
    assert_eq!(summary["verdict"], "not_seen");
    assert_eq!(code, Some(1));
}
