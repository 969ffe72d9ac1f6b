//! podtrace on a two-node cluster laid out as kind lays one out: each node a network namespace
//! of this machine with its own containerd in a mount namespace of its own, pods made through
//! CRI on both nodes, and interface indexes that collide across the nodes.
//!
//! The layout (built here, torn down by Drop guards also when the test fails):
//! - `{P}fabric`: a bridge `br0` (10.31.0.254/24) standing in for kind's docker network;
//! - `{P}node-a`, `{P}node-b`: each with `eth0` on the fabric (10.31.0.1, 10.31.0.2), a default
//!   route through the fabric, and a plain route to the other node's pod CIDR through the
//!   other node (as kindnet routes pod networks), pod CIDRs as in the k8s lab: node-a
//!   10.244.0.0/24, node-b 10.244.1.0/24, bridge `cni0` made by the CNI bridge plugin;
//! - a containerd per node, started with `nsenter --net=` the node and `unshare --mount`
//!   (propagation slave) with per-node `/run` and `/var/lib` (for `/run/containerd` and
//!   `/var/lib/cni`) and
//!   `netns_mounts_under_state_dir = true`: the pod netns paths it reports exist only in its
//!   mount namespace, so podtrace must enter the pods through their sandbox pids. node-b's
//!   containerd also has a UTS namespace whose hostname is its node name and a PID namespace
//!   of its own (it is its pid 1), as a kind node container has: the pids it reports are not
//!   this machine's. node-a's shares the machine's hostname and pids, and gets a kubelet
//!   stand-in later (a process named `kubelet` with `--hostname-override`);
//! - pods: `default/client` (with a container `app`) on node-a; `default/server` and
//!   `default/doomed` on node-b. Each node's first pod veth has the same ifindex as the
//!   other's, and so do the pods' eth0s.
//!
//! Only one test in this file builds the layout: its pod CIDRs are fixed.
use std::{
    fs,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use podtrace::cri;
use podtrace_tests::{
    assert_one_line_error,
    containerd::{Containerd, NodeSpec},
    in_netns, json_lines, json_of, podtrace, roles, run_ok, unique_prefix, Killed, Netns, Running,
};
use serde_json::Value;

/// A kind-style two-node layout. Fields drop in order: runtimes first, then namespaces.
struct TwoNodes {
    /// The node name node-b's containerd has as its hostname.
    b_name: String,
    b: Containerd,
    a: Containerd,
    node_b: Netns,
    node_a: Netns,
    _fabric: Netns,
}

fn ino(p: &Path) -> u64 {
    fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .ino()
}

impl TwoNodes {
    fn up(prefix: &str) -> Self {
        podtrace_tests::require_root();
        let fabric = Netns::new(&format!("{prefix}fabric"));
        let node_a = Netns::new(&format!("{prefix}node-a"));
        let node_b = Netns::new(&format!("{prefix}node-b"));
        fabric.ip(&["link", "add", "br0", "type", "bridge"]);
        fabric.ip(&["addr", "add", "10.31.0.254/24", "dev", "br0"]);
        fabric.ip(&["link", "set", "br0", "up"]);
        for (node, port, ip, other_ip, other_cidr) in [
            (
                &node_a,
                "ul-a",
                "10.31.0.1/24",
                "10.31.0.2",
                "10.244.1.0/24",
            ),
            (
                &node_b,
                "ul-b",
                "10.31.0.2/24",
                "10.31.0.1",
                "10.244.0.0/24",
            ),
        ] {
            fabric.ip(&[
                "link",
                "add",
                port,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                node.name(),
            ]);
            fabric.ip(&["link", "set", port, "master", "br0", "up"]);
            node.ip(&["addr", "add", ip, "dev", "eth0"]);
            node.ip(&["link", "set", "eth0", "up"]);
            node.ip(&["route", "add", "default", "via", "10.31.0.254"]);
            node.ip(&["route", "add", other_cidr, "via", other_ip, "dev", "eth0"]);
            node.exec_ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        }
        let tag = prefix.trim_end_matches('-');
        let b_name = format!("{tag}-worker2");
        let a = Containerd::start(
            &format!("{tag}-a"),
            NodeSpec {
                netns: node_a.path().to_path_buf(),
                bridge: "cni0".into(),
                subnet: "10.244.0.0/24".into(),
                own_mounts: true,
                hostname: None,
                own_pids: false,
            },
        );
        let b = Containerd::start(
            &format!("{tag}-b"),
            NodeSpec {
                netns: node_b.path().to_path_buf(),
                bridge: "cni0".into(),
                subnet: "10.244.1.0/24".into(),
                own_mounts: true,
                hostname: Some(b_name.clone()),
                own_pids: true,
            },
        );
        Self {
            b_name,
            b,
            a,
            node_b,
            node_a,
            _fabric: fabric,
        }
    }
}

/// `ip -o link show DEV` in a namespace: (ifindex, peer ifindex).
fn indexes(netns: &Path, dev: &str) -> (u32, u32) {
    let out = in_netns(netns, &["ip", "-o", "link", "show", dev]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // "4: veth1234@if2: <...>"
    let (index, rest) = text.split_once(": ").unwrap_or_else(|| panic!("{text}"));
    let peer = rest
        .split(':')
        .next()
        .and_then(|n| n.split_once("@if"))
        .map(|(_, p)| p.parse().unwrap())
        .unwrap_or_else(|| panic!("{text}"));
    (index.trim().parse().unwrap(), peer)
}

/// A stand-in for a kubelet in a node's network namespace: a process named `kubelet` whose
/// command line carries `--hostname-override`, as podtrace reads a kubelet's (a real kubelet
/// would also start managing, and garbage-collecting, the runtime's pods).
fn kubelet_stand_in(dir: &Path, netns: &Path, node_name: &str, sock: &Path) -> Killed {
    let script = dir.join("kubelet");
    fs::write(&script, "#!/bin/sh\nread -r _\n").unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    let child = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .arg(&script)
        .arg(format!(
            "--container-runtime-endpoint=unix://{}",
            sock.display()
        ))
        .args(["--hostname-override", node_name])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    podtrace_tests::wait_until(10, "the kubelet stand-in to run", || {
        fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "kubelet")
    });
    Killed(child)
}

/// A ping from inside a pod (entered through its sandbox's pid here).
fn ping_from(pid: u32, dst: &str, count: u32) -> std::process::Output {
    in_netns(
        &PathBuf::from(format!("/proc/{pid}/ns/net")),
        &[
            "ping",
            "-c",
            &count.to_string(),
            "-i",
            "0.2",
            "-W",
            "2",
            dst,
        ],
    )
}

fn observed(summary: &Value) -> Vec<String> {
    summary["observed_path"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            format!(
                "{} {}",
                h["name"].as_str().unwrap(),
                h["hook"].as_str().unwrap()
            )
        })
        .collect()
}

fn summary_of(lines: &[String], stderr: &str) -> Value {
    json_lines(lines)
        .into_iter()
        .find(|o| o["type"] == "summary")
        .unwrap_or_else(|| panic!("no summary: {lines:?} {stderr}"))
}

/// `podtrace ARGS` with no `$CONTAINER_RUNTIME_ENDPOINT`: runtimes are found by podtrace.
fn podtrace_discovering(args: &[&str]) -> std::process::Output {
    Command::new(podtrace_tests::podtrace_bin())
        .args(args)
        .env_remove(cri::ENDPOINT_ENV)
        .output()
        .expect("running podtrace")
}

/// The hop names of a `topo --json`.
fn hop_names(topo: &Value) -> Vec<String> {
    topo["hops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn pods_on_kind_style_nodes_are_found_by_namespace_identity() {
    let prefix = unique_prefix("kind");
    let tag = prefix.trim_end_matches('-').to_owned();
    let mut n = TwoNodes::up(&prefix);
    let (url_a, url_b) = (n.a.url(), n.b.url());
    let client = n.a.run_pod("default", "client");
    let app = n.a.run_container(&client, "app");
    let server = n.b.run_pod("default", "server");
    let doomed = n.b.run_pod("default", "doomed");
    assert!(client.ip.starts_with("10.244.0."), "{client:?}");
    assert!(server.ip.starts_with("10.244.1."), "{server:?}");
    let client_pid = n.a.host_pid(&client);
    let server_pid = n.b.host_pid(&server);
    let a_name = n.node_a.name().to_owned();
    let b_name = n.b_name.clone();

    // What podtrace meets. The runtime's netns paths are network namespaces only in
    // containerd's mount namespace:
    for sb in [&client, &server] {
        let out = in_netns(&sb.netns, &["true"]);
        assert!(
            !out.status.success(),
            "{} is visible here",
            sb.netns.display()
        );
    }
    // node-b's runtime reports pids of its own PID namespace:
    assert_ne!(server.pid, server_pid);
    // each node's first pod veth has the same ifindex as the other's, peering with the same
    // pod ifindex:
    let client_ns = PathBuf::from(format!("/proc/{client_pid}/ns/net"));
    let server_ns = PathBuf::from(format!("/proc/{server_pid}/ns/net"));
    let (client_eth0, client_peer) = indexes(&client_ns, "eth0");
    let (server_eth0, server_peer) = indexes(&server_ns, "eth0");
    assert_eq!(
        (client_eth0, client_peer),
        (server_eth0, server_peer),
        "the pods' interface indexes do not collide: the test's premise is gone"
    );
    assert_eq!(
        ino(&PathBuf::from(format!("/proc/{}/ns/net", n.a.pid()))),
        ino(n.node_a.path())
    );
    assert_eq!(
        ino(&PathBuf::from(format!("/proc/{}/ns/net", n.b.pid()))),
        ino(n.node_b.path())
    );

    // topo by name through node-a's runtime: entered through the sandbox's pid, the node side
    // found by namespace identity, the node named by its namespace's name (no kubelet there
    // yet, and the runtime has the machine's hostname).
    let topo = json_of(
        &podtrace(&["topo", "client", "--runtime-endpoint", &url_a, "--json"]),
        "topo client",
    );
    assert_eq!(topo["pod"]["name"], "client");
    assert_eq!(topo["pod"]["namespace"], "default");
    assert_eq!(topo["pod"]["ip"], client.ip.as_str());
    assert_eq!(topo["pod"]["source"], format!("cri:{url_a}"));
    assert_eq!(topo["pod"]["netns"], client_ns.display().to_string());
    assert_eq!(topo["pod"]["node"], a_name.as_str());
    assert_eq!(
        ino(Path::new(topo["pod"]["node_netns"].as_str().unwrap())),
        ino(n.node_a.path())
    );
    assert_eq!(topo["cni"], "bridge", "{topo:#}");
    let evidence: Vec<&str> = topo["evidence"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert_eq!(
        evidence[0],
        format!(
            "pod namespace entered through the sandbox's pid {}: the runtime's path {} is not a network namespace here (the runtime has a mount namespace of its own)",
            client.pid,
            client.netns.display()
        )
    );
    assert!(
        evidence[1].starts_with(&format!(
            "node {a_name} named by the node namespace's name in /run/netns"
        )),
        "{evidence:?}"
    );
    let hops = roles(&topo);
    assert_eq!(hops[0], ("pod-eth0".into(), "eth0".into()));
    assert_eq!(hops[1].0, "host-veth");
    assert_eq!(hops[2], ("bridge".into(), "cni0".into()));
    assert_eq!(topo["hops"][1]["ifindex"], client_peer);
    let client_veth = hops[1].1.clone();

    // A kubelet in node-a's namespace names node-a from now on (lowercased, as a kubelet
    // registers it).
    let _kubelet = kubelet_stand_in(
        &n.a.dir,
        n.node_a.path(),
        &format!("{}-Worker", tag.to_uppercase()),
        &n.a.sock,
    );
    let a_name = format!("{tag}-worker");
    let topo = json_of(
        &podtrace(&[
            "topo",
            "default/client",
            "--runtime-endpoint",
            &url_a,
            "--json",
        ]),
        "topo default/client",
    );
    assert_eq!(topo["pod"]["node"], a_name.as_str());
    assert!(
        topo["evidence"][1]
            .as_str()
            .unwrap()
            .contains(&format!("runs with --hostname-override {a_name}")),
        "{topo:#}"
    );
    assert_eq!(hop_names(&topo)[1], format!("{a_name}/{client_veth}"));

    // By name with no endpoint: podtrace finds both runtimes by their processes, and the
    // server in node-b's, whose node is named by its runtime's hostname (a node container's)
    // and whose pids are translated out of its PID namespace.
    let topo = json_of(
        &podtrace_discovering(&["topo", "server", "--json"]),
        "topo server (runtimes discovered)",
    );
    assert_eq!(topo["pod"]["source"], format!("cri:{url_b}"));
    assert_eq!(topo["pod"]["node"], b_name.as_str());
    assert_eq!(topo["pod"]["netns"], server_ns.display().to_string());
    assert!(
        topo["pod"]["entered_by"]
            .as_str()
            .unwrap()
            .starts_with(&format!(
            "through the sandbox's pid {} in the runtime's PID namespace, pid {server_pid} here:",
            server.pid
        )),
        "{topo:#}"
    );
    assert!(
        topo["evidence"][1]
            .as_str()
            .unwrap()
            .contains("in a UTS namespace of its own"),
        "{topo:#}"
    );
    let server_veth = roles(&topo)[1].1.clone();
    // The two host veths share an ifindex; each was found in its own node.
    assert_eq!(topo["hops"][1]["ifindex"], client_peer);
    assert_eq!(
        ino(Path::new(topo["pod"]["node_netns"].as_str().unwrap())),
        ino(n.node_b.path())
    );

    // --pid (the pause process, as ps shows it here): named through the runtime that has it.
    let by_pid = json_of(
        &podtrace_discovering(&["topo", "--pid", &server_pid.to_string(), "--json"]),
        "topo --pid",
    );
    assert_eq!(by_pid["pod"]["name"], "server");
    assert_eq!(by_pid["pod"]["namespace"], "default");
    assert_eq!(by_pid["pod"]["source"], "pid");
    assert_eq!(by_pid["pod"]["node"], b_name.as_str());
    assert_eq!(hop_names(&by_pid)[1], format!("{b_name}/{server_veth}"));
    assert_eq!(
        by_pid["evidence"][0],
        format!("pod namespace entered through pid {server_pid} (/proc/{server_pid}/ns/net)")
    );

    // --netns, a path podtrace can open.
    let by_netns = json_of(
        &podtrace_discovering(&["topo", "--netns", client_ns.to_str().unwrap(), "--json"]),
        "topo --netns",
    );
    assert_eq!(by_netns["pod"]["name"], "client");
    assert_eq!(by_netns["pod"]["node"], a_name.as_str());
    assert_eq!(hop_names(&by_netns)[1], format!("{a_name}/{client_veth}"));

    // --container, through the runtime named and through the runtimes found.
    for out in [
        podtrace(&[
            "topo",
            "--container",
            &app[..10],
            "--runtime-endpoint",
            &url_a,
            "--json",
        ]),
        podtrace_discovering(&["topo", "--container", &app[..10], "--json"]),
    ] {
        let t = json_of(&out, "topo --container");
        assert_eq!(t["pod"]["name"], "client");
        assert_eq!(t["pod"]["node"], a_name.as_str());
        assert_eq!(roles(&t)[1].1, client_veth);
    }

    // The path from client to server: out of node-a's eth0 by the route to node-b's pod CIDR,
    // into node-b by its eth0, down its bridge to the server.
    let path = json_of(
        &podtrace(&[
            "topo",
            "client",
            "--dst",
            &server.ip,
            "--runtime-endpoint",
            &url_a,
            "--json",
        ]),
        "topo client --dst server",
    );
    assert_eq!(path["route"]["gateway"], "10.31.0.2", "{path:#}");
    assert_eq!(path["route"]["oif"], "eth0");
    assert_eq!(
        hop_names(&path),
        [
            "client/eth0".to_owned(),
            format!("{a_name}/{client_veth}"),
            format!("{a_name}/cni0"),
            format!("{a_name}/eth0"),
            format!("{b_name}/eth0"),
            format!("{b_name}/cni0"),
            format!("{b_name}/{server_veth}"),
            "server/eth0".to_owned(),
        ]
    );

    // follow across the nodes, the destination found through node-b's runtime: confirmed.
    let run = Running::start(&[
        "follow",
        "client",
        "--dst",
        &server.ip,
        "--json",
        "-c",
        "6",
        "--runtime-endpoint",
        &url_a,
    ]);
    let ping = ping_from(client_pid, &server.ip, 3);
    assert!(ping.status.success(), "ping client → server: {ping:?}");
    let (code, lines, stderr) = run.wait(30);
    let summary = summary_of(&lines, &stderr);
    assert_eq!(summary["verdict"], "confirmed", "{summary:#}");
    assert_eq!(code, Some(0));
    assert_eq!(
        observed(&summary),
        [
            "client/eth0 egress".to_owned(),
            format!("{a_name}/{client_veth} ingress"),
            format!("{a_name}/cni0 ingress"),
            format!("{a_name}/eth0 egress"),
            format!("{b_name}/eth0 ingress"),
            format!("{b_name}/cni0 egress"),
            format!("{b_name}/{server_veth} egress"),
            "server/eth0 ingress".to_owned(),
        ]
    );

    // follow by --pid, the other way: the server's replies... and its own pings.
    let run = Running::start(&[
        "follow",
        "--pid",
        &server_pid.to_string(),
        "--dst",
        &client.ip,
        "--json",
        "-c",
        "4",
    ]);
    let ping = ping_from(server_pid, &client.ip, 2);
    assert!(ping.status.success(), "ping server → client: {ping:?}");
    let (code, lines, stderr) = run.wait(30);
    let summary = summary_of(&lines, &stderr);
    assert_eq!(summary["verdict"], "confirmed", "{summary:#}");
    assert_eq!(code, Some(0));
    assert_eq!(observed(&summary)[0], "server/eth0 egress");
    assert_eq!(
        observed(&summary)[3],
        format!("{b_name}/eth0 egress"),
        "{summary:#}"
    );

    // capture by --netns: the server's side of the client's pings.
    let pcap = n.a.dir.join("server.pcapng");
    let run = Running::start(&[
        "capture",
        "--netns",
        server_ns.to_str().unwrap(),
        "--dst",
        &client.ip,
        "icmp",
        "-w",
        pcap.to_str().unwrap(),
        "-c",
        "4",
    ]);
    let ping = ping_from(client_pid, &server.ip, 2);
    assert!(ping.status.success(), "{ping:?}");
    let (code, _, stderr) = run.wait(30);
    assert_eq!(code, Some(0), "capture: {stderr}");
    let read = run_ok("tcpdump", &["-n", "-r", pcap.to_str().unwrap(), "icmp"]);
    let packets = String::from_utf8_lossy(&read.stdout);
    assert_eq!(packets.lines().count(), 4, "{packets}");
    assert!(
        packets
            .lines()
            .all(|l| l.contains(&client.ip) && l.contains(&server.ip)),
        "{packets}"
    );

    // capture by --container through the runtimes found.
    let pcap = n.a.dir.join("client.pcapng");
    let run = Running::start(&[
        "capture",
        "--container",
        &app[..12],
        "icmp",
        "-w",
        pcap.to_str().unwrap(),
        "-c",
        "2",
    ]);
    let ping = ping_from(client_pid, &server.ip, 1);
    assert!(ping.status.success(), "{ping:?}");
    let (code, _, stderr) = run.wait(30);
    assert_eq!(code, Some(0), "capture --container: {stderr}");
    let read = run_ok("tcpdump", &["-n", "-r", pcap.to_str().unwrap(), "icmp"]);
    let packets = String::from_utf8_lossy(&read.stdout);
    assert_eq!(packets.lines().count(), 2, "{packets}\n{stderr}");

    // verify eni is for ENI pods: a clear refusal, by name and by pid.
    let out = podtrace(&[
        "verify",
        "eni",
        "client",
        "--dst",
        &server.ip,
        "--runtime-endpoint",
        &url_a,
    ]);
    assert_one_line_error(&out, &["client", "not on an ENI", "bridge"]);
    let out = podtrace_discovering(&[
        "verify",
        "eni",
        "--pid",
        &server_pid.to_string(),
        "--dst",
        &client.ip,
    ]);
    assert_one_line_error(&out, &["server", "not on an ENI"]);

    // The same pod name on both nodes: with the runtimes found, both are named and the
    // command refuses; the runtime named picks one.
    let twin_a = n.a.run_pod("default", "twin");
    let twin_b = n.b.run_pod("default", "twin");
    let out = podtrace_discovering(&["topo", "twin"]);
    assert_one_line_error(
        &out,
        &[
            "matches 2 pods",
            &twin_a.id[..12],
            &twin_b.id[..12],
            &url_a,
            &url_b,
        ],
    );
    let twin = json_of(
        &podtrace(&["topo", "twin", "--runtime-endpoint", &url_b, "--json"]),
        "topo twin on node-b",
    );
    assert_eq!(twin["pod"]["ip"], twin_b.ip.as_str());
    assert_eq!(twin["pod"]["node"], b_name.as_str());

    // A sandbox stopped between its lookup and the opening of its namespace: looked up while
    // ready, stopped, then opened.
    let ep_b = n.b.endpoint();
    let mut found = cri::block_on(async move {
        let mut c = cri::Client::connect(&ep_b).await?;
        cri::pods_named(&mut c, Some("default"), "doomed").await
    })
    .unwrap();
    assert_eq!(found.len(), 1);
    let stale = found.remove(0);
    assert_eq!(stale.state, "ready");
    n.b.stop_pod(&doomed.id);
    let e = podtrace::pods::cri::sandbox_netns(&stale).unwrap_err();
    let msg = format!("{e:#}");
    assert!(!msg.contains('\n'), "{msg}");
    assert!(
        msg.starts_with(&format!(
            "pod default/doomed (sandbox {}) stopped while podtrace was looking it up: its process {} is gone",
            &doomed.id[..12],
            doomed.pid
        )),
        "{msg}"
    );
    // Looked up after it stopped: not ready.
    let out = podtrace(&["topo", "doomed", "--runtime-endpoint", &url_b]);
    assert_one_line_error(&out, &["default/doomed", "is not ready"]);

    let dirs = [n.a.dir.clone(), n.b.dir.clone()];
    drop(_kubelet);
    drop(n);
    for d in dirs {
        assert!(!d.exists(), "{} left behind", d.display());
    }
    assert!(!podtrace::netns::path_of(&format!("{prefix}node-a")).exists());
}
