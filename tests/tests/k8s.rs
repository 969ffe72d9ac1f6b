//! A real Kubernetes 1.20 cluster inside a lab (`cargo xtask k8s up`, xtask/src/k8s/README.md):
//! pods created with kubectl on two nodes get their veths from the bridge CNI plugin, ping
//! each other across nodes through the lab's flannel.1 VXLAN, and podtrace finds a pod by
//! name through its node's containerd and by its sandbox's pid (issue 20's cases: the netns
//! path containerd reports exists only in the node's mount namespace; veth ifindexes collide
//! across nodes).
//!
//! Needs what `cargo xtask setup` installs and builds (Kubernetes binaries, etcd, kubectl,
//! containerd, the CNI plugins, the test images); run as root. The cluster is removed on
//! drop, also when the test fails.
use std::{net::Ipv4Addr, path::Path};

use podtrace_tests::{podtrace, run_ok, K8sCluster};
use serde_json::Value;

const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: client
  labels: {app: client}
spec:
  nodeSelector: {kubernetes.io/hostname: node-a}
  terminationGracePeriodSeconds: 0
  containers:
  - name: main
    image: localhost/busybox:1.35
    imagePullPolicy: Never
    command: ["sleep", "3600"]
---
apiVersion: v1
kind: Pod
metadata:
  name: server
  labels: {app: server}
spec:
  nodeSelector: {kubernetes.io/hostname: node-b}
  terminationGracePeriodSeconds: 0
  containers:
  - name: main
    image: localhost/busybox:1.35
    imagePullPolicy: Never
    command: ["nc", "-ll", "-p", "8080", "-e", "echo", "hello"]
"#;

/// A pod's IP and node, as the API server has them.
fn pod(cluster: &K8sCluster, name: &str) -> (Ipv4Addr, String) {
    let v: Value =
        serde_json::from_str(&cluster.kubectl(&["get", "pod", name, "-o", "json"])).unwrap();
    let ip = v["status"]["podIP"].as_str().unwrap().parse().unwrap();
    (ip, v["spec"]["nodeName"].as_str().unwrap().to_owned())
}

/// The links of a namespace (`ip -j -s link`), by name.
fn links(netns: &Path) -> Vec<Value> {
    let name = netns.file_name().unwrap().to_str().unwrap();
    let out = run_ok("ip", &["-n", name, "-j", "-s", "-d", "link", "show"]);
    serde_json::from_slice(&out.stdout).unwrap()
}

fn link<'a>(links: &'a [Value], name: &str) -> &'a Value {
    links
        .iter()
        .find(|l| l["ifname"] == name)
        .unwrap_or_else(|| panic!("no {name} among {links:?}"))
}

fn counter(l: &Value, dir: &str) -> u64 {
    l["stats64"][dir]["packets"].as_u64().unwrap()
}

/// The host veth the CNI plugin made for the pod with `ip` on `node`: from the plugin's own
/// result cache in the node's /var/lib/cni (the bridge plugin lists the bridge, the host veth
/// and the sandbox's eth0).
fn cni_host_veth(cluster: &K8sCluster, node: &str, ip: Ipv4Addr) -> String {
    let dir = Path::new(cluster.node(node)["dir"].as_str().unwrap()).join("cni/results");
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(e.path()).unwrap()).unwrap();
        let result = &v["result"];
        let has_ip = result["ips"]
            .as_array()
            .is_some_and(|ips| ips.iter().any(|i| i["address"] == format!("{ip}/24")));
        if !has_ip {
            continue;
        }
        let ifs = result["interfaces"].as_array().unwrap();
        let veth = ifs
            .iter()
            .find(|i| i["sandbox"].is_null() && i["name"] != "cni0")
            .unwrap_or_else(|| panic!("no host veth in the CNI result {v}"));
        return veth["name"].as_str().unwrap().to_owned();
    }
    panic!("no CNI result for {ip} in {}", dir.display());
}

#[test]
fn pods_on_two_nodes_ping_through_flannel_and_podtrace_finds_them() {
    let cluster = K8sCluster::up("k8s");
    eprintln!("k8s up took {:.1} s", cluster.up_time.as_secs_f64());

    // kubectl from the machine's own namespace, through the relay.
    let nodes = cluster.kubectl(&["get", "nodes", "-o", "name"]);
    assert_eq!(
        nodes.lines().collect::<Vec<_>>(),
        ["node/node-a", "node/node-b"]
    );

    let out = cluster.kubectl_with(&["apply", "-f", "-"], Some(PODS));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cluster.kubectl(&[
        "wait",
        "--for=condition=Ready",
        "pod/client",
        "pod/server",
        "--timeout=120s",
    ]);
    let (client_ip, client_node) = pod(&cluster, "client");
    let (server_ip, server_node) = pod(&cluster, "server");
    assert_eq!(
        (client_node.as_str(), server_node.as_str()),
        ("node-a", "node-b")
    );
    // Each node's pod CIDR (the CNI configuration's host-local range).
    assert_eq!(client_ip.octets()[..3], [10, 244, 0]);
    assert_eq!(server_ip.octets()[..3], [10, 244, 1]);

    // The veths are the CNI plugin's: named in its result cache, enslaved to the cni0 it
    // made (the lab's flannel-nodes topology has neither), MTU from the CNI configuration.
    for (node, ip) in [("node-a", client_ip), ("node-b", server_ip)] {
        let veth = cni_host_veth(&cluster, node, ip);
        assert!(veth.starts_with("veth"), "{veth}");
        let ls = links(&cluster.node_netns(node));
        let v = link(&ls, &veth);
        assert_eq!(v["master"], "cni0", "{v}");
        assert_eq!(v["mtu"], 1450, "{v}");
        assert_eq!(link(&ls, "cni0")["linkinfo"]["info_kind"], "bridge");
    }

    // A ping across nodes, through flannel.1 on both.
    let a_before = links(&cluster.node_netns("node-a"));
    let b_before = links(&cluster.node_netns("node-b"));
    let ping = cluster.kubectl_with(
        &[
            "exec",
            "client",
            "--",
            "ping",
            "-c",
            "3",
            "-W",
            "2",
            &server_ip.to_string(),
        ],
        None,
    );
    assert!(
        ping.status.success(),
        "ping {server_ip} from client failed: {}{}",
        String::from_utf8_lossy(&ping.stdout),
        String::from_utf8_lossy(&ping.stderr)
    );
    let a_after = links(&cluster.node_netns("node-a"));
    let b_after = links(&cluster.node_netns("node-b"));
    let delta = |before: &[Value], after: &[Value], dir: &str| {
        counter(link(after, "flannel.1"), dir) - counter(link(before, "flannel.1"), dir)
    };
    assert!(
        delta(&a_before, &a_after, "tx") >= 3,
        "node-a flannel.1 sent no pings"
    );
    assert!(
        delta(&b_before, &b_after, "rx") >= 3,
        "node-b flannel.1 received no pings"
    );
    assert!(
        delta(&b_before, &b_after, "tx") >= 3,
        "node-b flannel.1 sent no replies"
    );

    // And TCP to the server's nc.
    let hello = cluster.kubectl(&[
        "exec",
        "client",
        "--",
        "sh",
        "-c",
        &format!("nc {server_ip} 8080 </dev/null"),
    ]);
    assert_eq!(hello.trim(), "hello");

    // podtrace on node-a's pod, found by name through node-a's containerd (CRI): the
    // runtime's netns path exists only in the node's mount namespace, podtrace enters the
    // sandbox through its pid, and the node's namespace through the runtime's.
    let veth = cni_host_veth(&cluster, "node-a", client_ip);
    let sock = cluster.containerd_socket("node-a");
    let endpoint = format!("unix://{}", sock.display());
    let topo = podtrace(&[
        "topo",
        "default/client",
        "--runtime-endpoint",
        &endpoint,
        "--json",
    ]);
    assert!(
        topo.status.success(),
        "podtrace topo default/client --runtime-endpoint {endpoint}: {}",
        String::from_utf8_lossy(&topo.stderr)
    );
    let v: Value = serde_json::from_slice(&topo.stdout).unwrap();
    assert_host_veth(&v, &veth);

    // By the sandbox's pid: the pod's veth peer ifindex exists on both nodes (each node's
    // first pod: host veth ifindex 5, peer 2), so the node side must be found by namespace
    // identity (issue 20; before the engine matched by NSID this failed with "the peer of
    // pod pid-N-pause's eth0 matches in several namespaces").
    let pid = sandbox_pid(&cluster, "node-a", client_ip);
    let topo = podtrace(&["topo", "--pid", &pid.to_string(), "--json"]);
    assert!(
        topo.status.success(),
        "podtrace topo --pid {pid} (client's sandbox): {}",
        String::from_utf8_lossy(&topo.stderr)
    );
    assert_host_veth(&serde_json::from_slice(&topo.stdout).unwrap(), &veth);
}

fn assert_host_veth(topo: &Value, veth: &str) {
    let hops = topo["hops"].as_array().unwrap();
    assert!(
        hops.iter()
            .any(|h| h["role"] == "host-veth" && h["ifname"] == veth),
        "topo did not find {veth}: {topo}"
    );
}

/// The pid of the sandbox (pause) process of the pod with `ip` on `node`: the sandbox id from
/// the CNI result cache's file name (`cbr0-<sandbox>-eth0`), its task's pid from containerd.
fn sandbox_pid(cluster: &K8sCluster, node: &str, ip: Ipv4Addr) -> u32 {
    let dir = Path::new(cluster.node(node)["dir"].as_str().unwrap()).join("cni/results");
    let sandbox = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .find(|e| {
            std::fs::read_to_string(e.path())
                .unwrap()
                .contains(&format!("\"{ip}/24\""))
        })
        .and_then(|e| {
            let name = e.file_name().into_string().ok()?;
            Some(
                name.strip_prefix("cbr0-")?
                    .strip_suffix("-eth0")?
                    .to_owned(),
            )
        })
        .unwrap_or_else(|| panic!("no CNI result for {ip} in {}", dir.display()));
    let sock = cluster.containerd_socket(node);
    let out = run_ok(
        "ctr",
        &[
            "--address",
            sock.to_str().unwrap(),
            "-n",
            "k8s.io",
            "tasks",
            "ls",
        ],
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == sandbox).then(|| w.next()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no task {sandbox} on {node}"))
}
