//! `podtrace lab`: the seeds' topologies in network namespaces, checked with real packets.
//!
//! Every test builds its own lab under a unique prefix (so tests run side by side, also with
//! other test binaries) and removes it in `Drop`, also when it fails or panics. Packets are
//! captured with tcpdump inside the lab's namespaces (started through podtrace's exec API)
//! and read back with tshark.
use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use podtrace::lab::{self, registry, registry::Registry, Topology};
use podtrace_tests::{require_root, unique_prefix};
use serde_json::Value;

/// A lab that is taken down on drop (also when the test panics).
struct Lab {
    prefix: String,
    reg: Registry,
    tmp: PathBuf,
}

impl Lab {
    fn up(tag: &str, topology: Topology) -> Self {
        require_root();
        let prefix = unique_prefix(tag);
        Self::up_with_prefix(prefix, topology)
    }

    fn up_with_prefix(prefix: String, topology: Topology) -> Self {
        let tmp = std::env::temp_dir().join(format!("podtrace-lab-test-{prefix}"));
        std::fs::create_dir_all(&tmp).unwrap();
        // The guard exists before anything is built: a panic below still cleans up.
        let mut lab = Self {
            prefix: prefix.clone(),
            reg: empty_registry(&prefix),
            tmp,
        };
        lab.reg = lab::up(&prefix, topology)
            .unwrap_or_else(|e| panic!("lab up --prefix {prefix}: {e:#}"));
        lab
    }

    fn netns(&self, name: &str) -> &Path {
        self.reg
            .netns_of(name)
            .unwrap_or_else(|| panic!("{name} is not in lab {}", self.prefix))
    }

    /// Runs `argv` inside `name`'s namespace through podtrace's exec API.
    fn exec(&self, name: &str, argv: &[&str]) -> Output {
        let args: Vec<String> = argv[1..].iter().map(|s| s.to_string()).collect();
        podtrace::netns::command_in(self.netns(name), argv[0], &args)
            .unwrap()
            .output()
            .unwrap_or_else(|e| panic!("running {argv:?} in {name}: {e}"))
    }

    /// Pings `dst` from `name` `count` times; true when every echo got its reply.
    fn ping(&self, name: &str, dst: &str, count: u32) -> bool {
        let count = count.to_string();
        let out = self.exec(
            name,
            &[
                "ping", "-n", "-q", "-c", &count, "-i", "0.1", "-W", "2", dst,
            ],
        );
        if !out.status.success() {
            eprintln!(
                "ping {dst} from {name}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        out.status.success()
    }

    fn capture(&self, name: &str, ifname: &str) -> Capture {
        Capture::start(self, name, ifname)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = lab::down(&self.prefix) {
            eprintln!("cleanup: lab down --prefix {}: {e:#}", self.prefix);
        }
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

fn empty_registry(prefix: &str) -> Registry {
    Registry {
        prefix: prefix.to_owned(),
        topology: String::new(),
        created_unix: 0,
        pods: Vec::new(),
        nodes: Vec::new(),
        hosts: Vec::new(),
        services: Vec::new(),
        agents: Vec::new(),
    }
}

/// tcpdump writing a pcap inside a lab namespace; killed on drop if still running.
struct Capture {
    child: Option<Child>,
    file: PathBuf,
}

impl Capture {
    fn start(lab: &Lab, name: &str, ifname: &str) -> Self {
        let file = lab.tmp.join(format!("{name}-{ifname}-{}.pcap", next_id()));
        let args: Vec<String> = [
            "-i",
            ifname,
            "-n",
            "-U",
            "--immediate-mode",
            "-w",
            file.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut child = podtrace::netns::command_in(lab.netns(name), "tcpdump", &args)
            .unwrap()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting tcpdump");
        // tcpdump says "listening on IF" once the capture is live.
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut seen = String::new();
        loop {
            let mut line = String::new();
            let n = stderr.read_line(&mut line).unwrap_or(0);
            seen.push_str(&line);
            if line.contains("listening on") {
                break;
            }
            if n == 0 {
                let _ = child.kill();
                let _ = child.wait();
                panic!("tcpdump on {name}/{ifname} did not start: {seen}");
            }
        }
        // Keep draining stderr so tcpdump never blocks on it.
        std::thread::spawn(move || {
            let mut sink = String::new();
            while stderr.read_line(&mut sink).unwrap_or(0) > 0 {
                sink.clear();
            }
        });
        Self {
            child: Some(child),
            file,
        }
    }

    /// Stops tcpdump (SIGINT, so it flushes) and returns the pcap.
    fn stop(mut self) -> PathBuf {
        // Packets still on their way to the capture socket.
        std::thread::sleep(Duration::from_millis(300));
        let mut child = self.child.take().unwrap();
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(5);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("tcpdump did not stop on SIGINT");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.file.clone()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn next_id() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Number of packets in `pcap` matching the tshark display filter (UDP 8472 decoded as
/// VXLAN, as flannel uses it).
fn count(pcap: &Path, filter: &str) -> usize {
    let out = Command::new("tshark")
        .args(["-n", "-d", "udp.port==8472,vxlan", "-r"])
        .arg(pcap)
        .args(["-Y", filter, "-T", "fields", "-e", "frame.number"])
        .output()
        .expect("running tshark");
    assert!(
        out.status.success(),
        "tshark -r {} -Y {filter:?} failed: {}",
        pcap.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

/// Runs `ip -j ARGS` (tests only; podtrace itself never runs ip) and parses it.
fn ip_json(args: &[&str]) -> Value {
    let out = Command::new("ip")
        .arg("-j")
        .args(args)
        .output()
        .expect("running ip");
    assert!(
        out.status.success(),
        "ip -j {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Value::Array(Vec::new());
    }
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("ip -j {args:?}: {e}: {text}"))
}

fn is_hex(s: &str) -> bool {
    s.chars()
        .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
}

fn lab_netns_on_disk(prefix: &str) -> Vec<String> {
    podtrace::netns::list()
        .unwrap()
        .into_iter()
        .filter(|n| {
            lab::NETNS_NAMES
                .iter()
                .any(|m| *n == format!("{prefix}{m}"))
        })
        .collect()
}

/// How many namespaces `--topology all` makes: every lab namespace but the `flannel-nodes`
/// topology's control-plane host.
fn all_topology_netns_count() -> usize {
    lab::NETNS_NAMES
        .iter()
        .filter(|n| **n != lab::flannel::CONTROL_PLANE)
        .count()
}

#[test]
fn flannel_nodes_have_flannel_but_no_pods_and_reach_the_control_plane() {
    let l = Lab::up("fnod", Topology::FlannelNodes);
    assert_eq!(l.reg.topology, "flannel-nodes");
    assert!(l.reg.pods.is_empty(), "pods: {:?}", l.reg.pods);
    let on_disk: BTreeSet<String> = lab_netns_on_disk(&l.prefix).into_iter().collect();
    let want: BTreeSet<String> = ["underlay", "node-a", "node-b", "control-plane"]
        .iter()
        .map(|n| format!("{}{n}", l.prefix))
        .collect();
    assert_eq!(on_disk, want);
    for node in ["node-a", "node-b"] {
        let names: Vec<&str> = l
            .reg
            .nodes
            .iter()
            .find(|n| n.name == node)
            .unwrap()
            .interfaces
            .iter()
            .map(|i| i.name.as_str())
            .collect();
        assert_eq!(
            names,
            ["eth0", "flannel.1"],
            "{node}: a CNI plugin makes cni0"
        );
    }
    // The control-plane host on the underlay, with routes to the pod subnets via the nodes.
    assert!(l.ping("control-plane", "10.30.180.56", 1));
    assert!(l.ping("control-plane", "10.30.180.55", 1));
    let routes = String::from_utf8(
        l.exec("control-plane", &["ip", "-4", "route", "show"])
            .stdout,
    )
    .unwrap();
    assert!(
        routes.contains("10.244.0.0/24 via 10.30.180.56 dev eth0"),
        "{routes}"
    );
    assert!(
        routes.contains("10.244.1.0/24 via 10.30.180.55 dev eth0"),
        "{routes}"
    );
    // flanneld's route to the other node's pod subnet is there.
    let routes =
        String::from_utf8(l.exec("node-a", &["ip", "-4", "route", "show"]).stdout).unwrap();
    assert!(
        routes.contains("10.244.1.0/24 via 10.244.1.0 dev flannel.1 proto static onlink"),
        "{routes}"
    );
}

#[test]
fn flannel_pods_talk_through_cni0_and_across_flannel_vxlan() {
    let lab = Lab::up("flan", Topology::Flannel);
    let reg = &lab.reg;

    // The registry describes what was built.
    let pods: Vec<(&str, &str, String)> = reg
        .pods
        .iter()
        .map(|p| (p.name.as_str(), p.node.as_str(), p.ip.to_string()))
        .collect();
    assert_eq!(
        pods,
        [
            ("pod-a1", "node-a", "10.244.0.9".to_owned()),
            ("pod-a2", "node-a", "10.244.0.7".to_owned()),
            ("pod-b1", "node-b", "10.244.1.5".to_owned()),
        ]
    );
    for p in &reg.pods {
        assert_eq!(p.namespace, "default");
        assert_eq!(
            p.netns,
            Path::new("/run/netns").join(format!("{}{}", lab.prefix, p.name))
        );
        assert!(p.netns.exists() && p.node_netns.exists());
        assert!(
            p.host_veth.len() == 12 && p.host_veth.starts_with("veth") && is_hex(&p.host_veth[4..]),
            "host veth {}",
            p.host_veth
        );
        let node = reg.node(&p.node).unwrap();
        let veth = node
            .interfaces
            .iter()
            .find(|i| i.name == p.host_veth)
            .unwrap_or_else(|| panic!("{} not on {}", p.host_veth, p.node));
        assert_eq!(veth.master.as_deref(), Some("cni0"));
        assert_eq!(veth.mtu, 1450);
    }
    for (node, eth0, cni0, vtep) in [
        (
            "node-a",
            "10.30.180.56/24",
            "10.244.0.1/24",
            "10.244.0.0/32",
        ),
        (
            "node-b",
            "10.30.180.55/24",
            "10.244.1.1/24",
            "10.244.1.0/32",
        ),
    ] {
        let n = reg.node(node).unwrap();
        let get = |name: &str| n.interfaces.iter().find(|i| i.name == name).unwrap();
        assert_eq!(get("eth0").addresses, [eth0]);
        assert_eq!(get("cni0").addresses, [cni0]);
        assert_eq!(get("cni0").kind, "bridge");
        assert_eq!(get("flannel.1").addresses, [vtep]);
        assert_eq!(get("flannel.1").kind, "vxlan");
        assert_eq!(get("flannel.1").mtu, 1450);
    }
    // The VXLAN device as flannel makes it, and the pods' routes.
    let ns_a = format!("{}node-a", lab.prefix);
    let vx =
        &ip_json(&["-d", "-n", &ns_a, "link", "show", "flannel.1"])[0]["linkinfo"]["info_data"];
    assert_eq!(vx["id"], 1);
    assert_eq!(vx["port"], 8472);
    assert_eq!(vx["local"], "10.30.180.56");
    assert_eq!(vx["learning"], false);
    let routes = ip_json(&["-n", &ns_a, "route"]);
    assert!(
        routes
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["dst"] == "10.244.1.0/24"
                && r["gateway"] == "10.244.1.0"
                && r["dev"] == "flannel.1"
                && r["flags"].as_array().unwrap().iter().any(|f| f == "onlink")),
        "node-a has no onlink route to node-b's pods: {routes}"
    );
    let pod_routes = ip_json(&["-n", &format!("{}pod-a1", lab.prefix), "route"]);
    for dst in ["default", "10.244.0.0/16"] {
        assert!(
            pod_routes
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["dst"] == dst && r["gateway"] == "10.244.0.1"),
            "pod-a1 has no {dst} via 10.244.0.1: {pod_routes}"
        );
    }

    // Same node: through cni0, never on the underlay.
    let cni0 = lab.capture("node-a", "cni0");
    let eth0 = lab.capture("node-a", "eth0");
    assert!(lab.ping("pod-a1", "10.244.0.7", 3), "pod-a1 -> pod-a2");
    assert!(lab.ping("pod-a2", "10.244.0.9", 2), "pod-a2 -> pod-a1");
    let (cni0, eth0) = (cni0.stop(), eth0.stop());
    assert_eq!(
        count(
            &cni0,
            "icmp.type == 8 && ip.src == 10.244.0.9 && ip.dst == 10.244.0.7"
        ),
        3
    );
    assert_eq!(
        count(
            &cni0,
            "icmp.type == 0 && ip.src == 10.244.0.7 && ip.dst == 10.244.0.9"
        ),
        3
    );
    assert_eq!(count(&eth0, "icmp"), 0, "same-node ICMP on node-a's eth0");

    // Across nodes: pod-a1's ICMP inside VXLAN (VNI 1, UDP 8472) between the underlay IPs.
    let eth0 = lab.capture("node-a", "eth0");
    assert!(lab.ping("pod-a1", "10.244.1.5", 3), "pod-a1 -> pod-b1");
    let eth0 = eth0.stop();
    let outer = "ip.src == 10.30.180.56 && ip.dst == 10.30.180.55 && udp.dstport == 8472";
    let back = "ip.src == 10.30.180.55 && ip.dst == 10.30.180.56 && udp.dstport == 8472";
    assert_eq!(
        count(
            &eth0,
            &format!("{outer} && vxlan.vni == 1 && icmp.type == 8 && ip.src == 10.244.0.9 && ip.dst == 10.244.1.5")
        ),
        3,
        "echo requests in VXLAN on node-a's eth0"
    );
    assert_eq!(
        count(
            &eth0,
            &format!("{back} && vxlan.vni == 1 && icmp.type == 0 && ip.src == 10.244.1.5 && ip.dst == 10.244.0.9")
        ),
        3,
        "echo replies in VXLAN on node-a's eth0"
    );
    assert_eq!(
        count(&eth0, "icmp && !vxlan"),
        0,
        "unencapsulated ICMP on the underlay"
    );
    assert!(lab.ping("pod-b1", "10.244.0.7", 2), "pod-b1 -> pod-a2");
}

#[test]
fn eni_pods_reach_master_and_eth2_not_eth0_carries_master_to_pod_c2() {
    let lab = Lab::up("eni", Topology::Eni);
    let reg = &lab.reg;
    let c1 = reg.pod("pod-c1").unwrap();
    let c2 = reg.pod("default/pod-c2").unwrap();
    assert_eq!(
        (c1.ip.to_string().as_str(), c1.node.as_str()),
        ("10.19.16.6", "node-c")
    );
    assert_eq!(
        (c2.ip.to_string().as_str(), c2.node.as_str()),
        ("10.19.0.32", "node-c")
    );
    assert_eq!((c1.eni.as_deref(), c1.table), (Some("eth1"), Some(2)));
    assert_eq!((c2.eni.as_deref(), c2.table), (Some("eth2"), Some(3)));
    for p in [c1, c2] {
        assert!(
            p.host_veth.len() == 14 && p.host_veth.starts_with("eni") && is_hex(&p.host_veth[3..]),
            "host veth {}",
            p.host_veth
        );
    }
    assert!(reg.node("master").is_some() && reg.node("vpc").is_some());

    // The AWS VPC CNI's policy routing on node-c, as in seed 004.
    let ns_c = format!("{}node-c", lab.prefix);
    let rules = ip_json(&["-n", &ns_c, "rule"]);
    let has_rule = |prio: u64, key: &str, addr: &str, table: &str| {
        rules
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["priority"] == prio && r[key] == addr && r["table"] == table)
    };
    for (addr, table) in [
        ("10.19.16.6", "2"),
        ("10.19.0.32", "3"),
        ("10.19.16.17", "2"),
        ("10.19.0.24", "3"),
    ] {
        assert!(
            has_rule(512, "dst", addr, "main"),
            "512: to {addr} lookup main: {rules}"
        );
        assert!(
            has_rule(1536, "src", addr, table),
            "1536: from {addr} lookup {table}: {rules}"
        );
    }
    for (table, dev, gw) in [("2", "eth1", "10.19.16.1"), ("3", "eth2", "10.19.0.1")] {
        let routes = ip_json(&["-n", &ns_c, "route", "show", "table", table]);
        assert!(
            routes
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["dst"] == "default" && r["gateway"] == gw && r["dev"] == dev),
            "table {table}: {routes}"
        );
    }
    let pod_neigh = ip_json(&["-n", &format!("{}pod-c2", lab.prefix), "neigh"]);
    let host_mac = reg
        .node("node-c")
        .unwrap()
        .interfaces
        .iter()
        .find(|i| i.name == c2.host_veth)
        .unwrap()
        .mac
        .clone();
    assert!(
        pod_neigh
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["dst"] == "169.254.1.1"
                && n["lladdr"] == host_mac.as_str()
                && n["state"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|s| s == "PERMANENT")),
        "pod-c2's 169.254.1.1 is not the host veth's MAC {host_mac}: {pod_neigh}"
    );

    // Both pods and master reach each other.
    assert!(lab.ping("pod-c1", "10.19.0.11", 2), "pod-c1 -> master");
    assert!(lab.ping("master", "10.19.16.6", 2), "master -> pod-c1");
    assert!(lab.ping("pod-c2", "10.19.0.11", 2), "pod-c2 -> master");
    assert!(lab.ping("master", "10.19.0.32", 2), "master -> pod-c2");

    // Seed 004: while master pings pod-c2, node-c's eth2 sees the ICMP, its eth0 does not.
    // Likewise pod-c1's traffic uses eth1 only.
    for (pod, ip, eni) in [
        ("pod-c2", "10.19.0.32", "eth2"),
        ("pod-c1", "10.19.16.6", "eth1"),
    ] {
        let caps: Vec<(&str, Capture)> = ["eth0", "eth1", "eth2"]
            .into_iter()
            .map(|i| (i, lab.capture("node-c", i)))
            .collect();
        assert!(lab.ping("master", ip, 3), "master -> {pod}");
        for (ifname, cap) in caps {
            let pcap = cap.stop();
            let req = count(
                &pcap,
                &format!("icmp.type == 8 && ip.src == 10.19.0.11 && ip.dst == {ip}"),
            );
            let rep = count(
                &pcap,
                &format!("icmp.type == 0 && ip.src == {ip} && ip.dst == 10.19.0.11"),
            );
            let expected = if ifname == eni { 3 } else { 0 };
            assert_eq!(
                (req, rep),
                (expected, expected),
                "master -> {pod}: echo requests/replies on node-c's {ifname}"
            );
            if ifname != eni {
                assert_eq!(count(&pcap, "icmp"), 0, "ICMP on node-c's {ifname}");
            }
        }
    }
}

/// The root namespace's links, addresses, routes and rules, without what changes by itself
/// (statistics, lifetimes, neighbour states).
fn root_snapshot() -> Value {
    let pick = |v: &Value, keys: &[&str]| -> Value {
        let mut out = serde_json::Map::new();
        for k in keys {
            if let Some(x) = v.get(*k) {
                out.insert(k.to_string(), x.clone());
            }
        }
        Value::Object(out)
    };
    let links: Vec<Value> = ip_json(&["link"])
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            pick(
                l,
                &[
                    "ifindex",
                    "ifname",
                    "flags",
                    "mtu",
                    "address",
                    "master",
                    "link",
                    "link_netnsid",
                ],
            )
        })
        .collect();
    let addrs: Vec<Value> = ip_json(&["addr"])
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let infos: Vec<Value> = l["addr_info"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| pick(a, &["family", "local", "prefixlen", "scope"]))
                .collect();
            serde_json::json!({ "ifname": l["ifname"], "addrs": infos })
        })
        .collect();
    let route_keys = [
        "type", "dst", "gateway", "dev", "table", "protocol", "scope", "prefsrc", "metric",
    ];
    let mut routes = Vec::new();
    for fam in ["-4", "-6"] {
        for r in ip_json(&[fam, "route", "show", "table", "all"])
            .as_array()
            .unwrap()
        {
            routes.push(pick(r, &route_keys));
        }
    }
    let rules: Vec<Value> = ["-4", "-6"]
        .iter()
        .flat_map(|fam| ip_json(&[fam, "rule"]).as_array().unwrap().clone())
        .collect();
    // The lab writes sysctls in its namespaces only.
    let mut sysctls = serde_json::Map::new();
    let mut keys = vec!["ipv4/ip_forward".to_owned()];
    for conf in ["all", "default"] {
        for k in [
            "rp_filter",
            "arp_ignore",
            "arp_announce",
            "send_redirects",
            "forwarding",
        ] {
            keys.push(format!("ipv4/conf/{conf}/{k}"));
        }
    }
    for k in keys {
        let v = std::fs::read_to_string(format!("/proc/sys/net/{k}")).unwrap();
        sysctls.insert(k, Value::String(v.trim().to_owned()));
    }
    serde_json::json!({
        "links": links, "addrs": addrs, "routes": routes, "rules": rules, "sysctls": sysctls,
    })
}

#[test]
fn two_labs_side_by_side_leave_the_root_namespace_alone() {
    require_root();
    let before = root_snapshot();
    let (p1, p2) = (unique_prefix("s1"), unique_prefix("s2"));
    let (l1, l2) = std::thread::scope(|s| {
        let a = s.spawn(|| Lab::up_with_prefix(p1.clone(), Topology::All));
        let b = s.spawn(|| Lab::up_with_prefix(p2.clone(), Topology::All));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(
        root_snapshot(),
        before,
        "the root namespace changed while the labs are up"
    );
    for l in [&l1, &l2] {
        assert_eq!(
            lab_netns_on_disk(&l.prefix).len(),
            all_topology_netns_count()
        );
        assert!(
            l.ping("pod-a1", "10.244.1.5", 2),
            "{}: pod-a1 -> pod-b1",
            l.prefix
        );
        assert!(
            l.ping("master", "10.19.0.32", 2),
            "{}: master -> pod-c2",
            l.prefix
        );
        assert_eq!(registry::load(&l.prefix).unwrap().as_ref(), Some(&l.reg));
        assert_eq!(registry::select(Some(&l.prefix)).unwrap(), l.reg);
    }
    // Two labs with the same addresses: each pod is in its own lab's namespace.
    assert_ne!(
        l1.reg.pod("pod-a1").unwrap().netns,
        l2.reg.pod("pod-a1").unwrap().netns
    );
    let all: Vec<String> = registry::load_all()
        .unwrap()
        .into_iter()
        .map(|r| r.prefix)
        .collect();
    assert!(all.contains(&p1) && all.contains(&p2), "load_all: {all:?}");
    let err = registry::select(None).unwrap_err().to_string();
    assert!(
        err.contains("several labs"),
        "select(None) with two labs up: {err}"
    );
    // No lab address is reachable from the root namespace.
    for ip in ["10.244.0.9", "10.19.0.32", "10.30.180.56"] {
        let out = Command::new("ping")
            .args(["-n", "-q", "-c", "1", "-W", "1", ip])
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "{ip} answers from the root namespace"
        );
    }

    // Down (twice: the second finds nothing), while the other lab keeps working.
    assert!(lab::down(&p1).unwrap());
    assert!(!lab::down(&p1).unwrap());
    assert!(
        lab_netns_on_disk(&p1).is_empty(),
        "{:?}",
        lab_netns_on_disk(&p1)
    );
    assert!(registry::load(&p1).unwrap().is_none());
    assert!(!registry::path(&p1).exists());
    assert!(
        l2.ping("pod-a1", "10.244.1.5", 1),
        "pod-a1 of the other lab after down"
    );
    assert!(lab::down(&p2).unwrap());
    assert!(lab_netns_on_disk(&p2).is_empty());
    drop((l1, l2));
    assert_eq!(
        root_snapshot(),
        before,
        "the root namespace changed after lab down"
    );
}

#[test]
fn up_replaces_a_stale_lab_and_a_failure_half_way_leaves_nothing() {
    let first = Lab::up("idem", Topology::Flannel);
    let prefix = first.prefix.clone();
    let old_veths: BTreeSet<String> = first.reg.pods.iter().map(|p| p.host_veth.clone()).collect();

    // A second `up` with the same prefix removes the first lab and builds afresh.
    let mut steps = Vec::new();
    let reg = lab::up_with(&prefix, Topology::All, &mut |s| {
        steps.push(s.to_owned());
        Ok(())
    })
    .unwrap();
    assert_eq!(reg.topology, "all");
    assert_eq!(reg.pods.len(), 5);
    for node in &reg.nodes {
        for i in &node.interfaces {
            assert!(
                !old_veths.contains(&i.name),
                "{} of the stale lab survived",
                i.name
            );
        }
    }
    assert_eq!(lab_netns_on_disk(&prefix).len(), all_topology_netns_count());
    assert!(steps.len() > 10, "steps: {steps:?}");

    // Stopping at the first, a middle and the last step removes everything.
    for stop_at in [0, steps.len() / 3, steps.len() / 2, steps.len() - 1] {
        let mut n = 0;
        let err = lab::up_with(&prefix, Topology::All, &mut |s| {
            n += 1;
            if n - 1 == stop_at {
                anyhow::bail!("injected failure at {s}");
            }
            Ok(())
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("injected failure"), "{err:#}");
        assert!(
            lab_netns_on_disk(&prefix).is_empty(),
            "after a failure at step {stop_at} ({}): {:?}",
            steps[stop_at],
            lab_netns_on_disk(&prefix)
        );
        assert!(registry::load(&prefix).unwrap().is_none());
    }
    drop(first);
    assert!(lab_netns_on_disk(&prefix).is_empty());
}

/// The podtrace binary next to this test binary (target/debug/podtrace).
fn podtrace_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("podtrace");
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build -p podtrace)",
        bin.display()
    );
    bin
}

fn podtrace(args: &[&str]) -> Output {
    Command::new(podtrace_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn cli_up_status_exec_down() {
    require_root();
    let prefix = unique_prefix("cli");
    // Guard first: takes the lab down whatever happens below.
    let guard = Lab {
        prefix: prefix.clone(),
        reg: empty_registry(&prefix),
        tmp: std::env::temp_dir().join(format!("podtrace-lab-test-{prefix}")),
    };
    let p = prefix.as_str();
    let out = podtrace(&["lab", "up", "--topology", "eni", "--prefix", p]);
    assert!(
        out.status.success(),
        "lab up: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = podtrace(&["lab", "status", "--json", "--prefix", p]);
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["up"], true);
    let pods = v["pods"].as_array().unwrap();
    let names: Vec<&str> = pods.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["pod-c1", "pod-c2"]);
    for (pod, ip) in pods.iter().zip(["10.19.16.6", "10.19.0.32"]) {
        assert_eq!(pod["namespace"], "default");
        assert_eq!(pod["node"], "node-c");
        assert_eq!(pod["ip"], ip);
        assert_eq!(
            pod["netns"],
            format!("/run/netns/{p}{}", pod["name"].as_str().unwrap())
        );
    }
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0]["name"], "node-c");
    assert_eq!(nodes[0]["netns"], format!("/run/netns/{p}node-c"));
    let ifs: Vec<&str> = nodes[0]["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    for want in ["eth0", "eth1", "eth2"] {
        assert!(ifs.contains(&want), "node-c interfaces {ifs:?}");
    }

    let out = podtrace(&["lab", "status", "--prefix", p]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("pod-c2") && text.contains("10.19.0.32"),
        "{text}"
    );

    // exec: the command runs in the namespace and its exit code is podtrace's.
    let out = podtrace(&[
        "lab",
        "exec",
        "--prefix",
        p,
        "master",
        "--",
        "ping",
        "-c1",
        "-W2",
        "10.19.0.32",
    ]);
    assert!(out.status.success(), "master -> pod-c2 through lab exec");
    let out = podtrace(&[
        "lab", "exec", "--prefix", p, "pod-c1", "--", "sh", "-c", "exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7));
    let out = podtrace(&[
        "lab",
        "exec",
        "--prefix",
        p,
        "node-c",
        "--",
        "cat",
        "/proc/sys/net/ipv4/ip_forward",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    let out = podtrace(&[
        "lab",
        "exec",
        "--prefix",
        p,
        "default/pod-c2",
        "--",
        "cat",
        "/sys/class/net/eth0/mtu",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "1500",
        "sysfs of the pod"
    );
    // A signal sent to podtrace goes on to the command, whose status podtrace reports.
    let mut child = Command::new(podtrace_bin())
        .args([
            "lab",
            "exec",
            "--prefix",
            p,
            "pod-c1",
            "--",
            "sh",
            "-c",
            "echo ready; exec sleep 30",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    let started = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(128 + 15),
        "exit code of a command ended by SIGTERM"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    // node-a is not part of the eni topology.
    let out = podtrace(&["lab", "exec", "--prefix", p, "node-a", "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("podtrace: no pod, node or host"));

    for _ in 0..2 {
        let out = podtrace(&["lab", "down", "--prefix", p]);
        assert!(out.status.success());
        assert!(lab_netns_on_disk(p).is_empty());
    }
    let out = podtrace(&["lab", "status", "--json", "--prefix", p]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["up"].clone(), v["pods"].clone()),
        (Value::Bool(false), serde_json::json!([]))
    );
    drop(guard);
}
