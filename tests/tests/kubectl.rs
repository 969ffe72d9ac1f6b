//! `kubectl podtrace` on a real two-node Kubernetes 1.20 cluster (`cargo xtask k8s up`, with
//! podtrace's image from `cargo xtask image` imported into both nodes): the plugin found by
//! kubectl on PATH, the DaemonSet deployed by `kubectl podtrace deploy`, a cross-node follow
//! and capture through both nodes' agents reached through the API server's port-forward, a
//! drop on node-b found with its reason, and the errors a user meets (no such pod, a node
//! without an agent, RBAC without port-forward, no kubeconfig): one line each, exit 2.
//!
//! One cluster for every case (bringing one up takes ~20–30 s); removed on drop, also when
//! the test fails.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use podtrace_tests::{
    assert_one_line_error, in_netns, json_lines, podtrace_bin, unique_prefix, wait_until,
    K8sCluster, Running,
};
use serde_json::Value;

const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: client
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
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  selector: {app: server}
  ports: [{port: 80, targetPort: 8080}]
"#;

/// A directory of the test's own (the plugin's symlink, kubeconfigs, captures), removed on
/// drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        let p = std::env::temp_dir().join(unique_prefix("kubectl"));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `kubectl podtrace …` as a user runs it: podtrace installed as `kubectl-podtrace` on PATH,
/// kubectl finding the plugin.
struct Plugin {
    bin: PathBuf,
    kubeconfig: PathBuf,
}

impl Plugin {
    fn new(dir: &Path, kubeconfig: &Path) -> Self {
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let link = bin.join("kubectl-podtrace");
        if !link.exists() {
            std::os::unix::fs::symlink(podtrace_bin(), &link).unwrap();
        }
        Self {
            bin,
            kubeconfig: kubeconfig.to_owned(),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let path = format!(
            "{}:{}",
            self.bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut c = Command::new("kubectl");
        c.arg("podtrace")
            .args(args)
            .env("PATH", path)
            .env("KUBECONFIG", &self.kubeconfig);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "kubectl podtrace {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// A running follow/capture, once its probes are live on every node.
    fn start(&self, args: &[&str]) -> Running {
        Running::spawn(
            self.command(args),
            &format!("kubectl podtrace {args:?}"),
            90,
        )
    }
}

fn pod_ip(cluster: &K8sCluster, name: &str) -> Ipv4Addr {
    cluster
        .kubectl(&["get", "pod", name, "-o", "jsonpath={.status.podIP}"])
        .trim()
        .parse()
        .unwrap()
}

fn ping(cluster: &K8sCluster, dst: Ipv4Addr, n: u32) -> Output {
    cluster.kubectl_with(
        &[
            "exec",
            "client",
            "--",
            "ping",
            "-c",
            &n.to_string(),
            "-i",
            "0.2",
            "-W",
            "1",
            &dst.to_string(),
        ],
        None,
    )
}

fn summary(lines: &[String], stderr: &str) -> Value {
    json_lines(lines)
        .into_iter()
        .find(|o| o["type"] == "summary")
        .unwrap_or_else(|| panic!("no summary; stdout {lines:?}; stderr {stderr}"))
}

fn names(steps: &Value) -> Vec<String> {
    steps
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Agent pods per node, as the API server has them.
fn agent_nodes(cluster: &K8sCluster) -> Vec<String> {
    let out = cluster.kubectl(&[
        "-n",
        "podtrace",
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/name=podtrace-agent",
        "-o",
        "jsonpath={range .items[*]}{.spec.nodeName} {.status.phase} {.metadata.deletionTimestamp}{\"\\n\"}{end}",
    ]);
    out.lines()
        .map(str::to_owned)
        .filter(|l| !l.trim().is_empty())
        .collect()
}

#[test]
fn kubectl_podtrace_follows_and_captures_across_nodes_through_the_daemonset() {
    let t0 = std::time::Instant::now();
    let cluster = K8sCluster::up("kpt");
    eprintln!("k8s up took {:.1} s", cluster.up_time.as_secs_f64());
    let images = cluster.kubectl(&[
        "get",
        "node",
        "node-a",
        "-o",
        "jsonpath={.status.images[*].names}",
    ]);
    assert!(
        images.contains("localhost/podtrace:0.1.0"),
        "podtrace's image is not in the cluster: run `cargo xtask image` before this test ({images})"
    );
    let scratch = Scratch::new();
    let kp = Plugin::new(&scratch.0, &cluster.kubeconfig);

    let out = cluster.kubectl_with(&["apply", "-f", "-"], Some(PODS));
    assert!(out.status.success(), "{out:?}");
    cluster.kubectl(&[
        "wait",
        "--for=condition=Ready",
        "pod/client",
        "pod/server",
        "--timeout=120s",
    ]);
    let server_ip = pod_ip(&cluster, "server");

    // Before deploy: the node has no agent, and the fix is named.
    let out = kp.run(&["follow", "default/client", "--dst", "default/server"]);
    assert_one_line_error(
        &out,
        &["node-a", "no podtrace agent", "kubectl podtrace deploy"],
    );

    // deploy: the embedded deploy/, and both nodes' agents ready.
    let started = std::time::Instant::now();
    let text = kp.ok(&["deploy"]);
    eprintln!(
        "kubectl podtrace deploy took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        text.contains("daemonset podtrace/podtrace-agent applied"),
        "{text}"
    );
    assert!(text.contains("agents ready on 2 nodes"), "{text}");
    assert!(
        text.contains("node-a (podtrace-agent-") && text.contains("node-b (podtrace-agent-"),
        "{text}"
    );

    // follow client → server (named as a pod): both agents, the whole path, per-hop times.
    let started = std::time::Instant::now();
    let run = kp.start(&[
        "follow",
        "client",
        "-n",
        "default",
        "--dst",
        "pod/server",
        "-c",
        "4",
        "--json",
    ]);
    eprintln!(
        "kubectl podtrace follow: probes live after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let p = ping(&cluster, server_ip, 2);
    assert!(p.status.success(), "{p:?}");
    let (code, lines, stderr) = run.wait(60);
    let s = summary(&lines, &stderr);
    assert_eq!(code, Some(0), "{s:#} {stderr}");
    assert_eq!(s["verdict"], "confirmed", "{s:#}");
    let ready = json_lines(&lines)
        .into_iter()
        .find(|o| o["type"] == "ready")
        .unwrap();
    assert_eq!(ready["through_agents"], true, "{ready}");
    assert_eq!(ready["dst"], server_ip.to_string());
    let mut nodes: Vec<&str> = ready["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node"].as_str().unwrap())
        .collect();
    nodes.sort();
    assert_eq!(nodes, ["node-a", "node-b"], "{ready}");
    // veth → cni0 → flannel.1 → underlay → node-b → server, in that order.
    let observed = names(&s["observed_path"]);
    let at = |n: &str| {
        observed
            .iter()
            .position(|o| o == n)
            .unwrap_or_else(|| panic!("{n} not in the observed path {observed:?}"))
    };
    let veth_a = observed
        .iter()
        .position(|o| o.starts_with("node-a/veth"))
        .unwrap_or_else(|| panic!("no node-a veth in {observed:?}"));
    let veth_b = observed
        .iter()
        .position(|o| o.starts_with("node-b/veth"))
        .unwrap_or_else(|| panic!("no node-b veth in {observed:?}"));
    let order = [
        veth_a,
        at("node-a/cni0"),
        at("node-a/flannel.1"),
        at("node-a/eth0"),
        at("node-b/eth0"),
        at("node-b/flannel.1"),
        at("node-b/cni0"),
        veth_b,
    ];
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{observed:?}");
    assert!(
        observed.first().unwrap().starts_with("client/"),
        "{observed:?}"
    );
    assert!(
        observed.last().unwrap().starts_with("server/"),
        "{observed:?}"
    );
    assert!(s["unobserved"].as_array().unwrap().is_empty(), "{s:#}");
    // Per-hop timing: every packet's hops carry times, in order, across both nodes.
    let packets: Vec<Value> = json_lines(&lines)
        .into_iter()
        .filter(|o| o["type"] == "packet")
        .collect();
    assert_eq!(packets.len(), 4, "{lines:?}");
    for p in &packets {
        let hops = p["hops"].as_array().unwrap();
        assert!(hops.len() >= 10, "{p}");
        let ts: Vec<u64> = hops.iter().map(|h| h["ts_ns"].as_u64().unwrap()).collect();
        assert!(ts.iter().all(|t| *t > 0), "{p}");
        let nodes: std::collections::BTreeSet<&str> =
            hops.iter().map(|h| h["node"].as_str().unwrap()).collect();
        assert!(nodes.contains("node-a") && nodes.contains("node-b"), "{p}");
    }

    // A NetworkPolicy-like DROP on node-b (in node-b's network namespace): found on node-b,
    // with its reason, exit 1.
    let node_b = cluster.node_netns("node-b");
    let rule = [
        "FORWARD",
        "-d",
        &server_ip.to_string(),
        "-p",
        "icmp",
        "-j",
        "DROP",
    ];
    let mut add = vec!["iptables", "-I"];
    add.extend(rule);
    let out = in_netns(&node_b, &add);
    assert!(out.status.success(), "{out:?}");
    let run = kp.start(&[
        "follow",
        "default/client",
        "--dst",
        &server_ip.to_string(),
        "-c",
        "2",
        "--json",
    ]);
    let p = ping(&cluster, server_ip, 2);
    assert!(!p.status.success(), "the ping went through the DROP");
    let (code, lines, stderr) = run.wait(60);
    let mut del = vec!["iptables", "-D"];
    del.extend(rule);
    let out = in_netns(&node_b, &del);
    assert!(out.status.success(), "{out:?}");
    let s = summary(&lines, &stderr);
    assert_eq!(s["verdict"], "dropped", "{s:#}");
    assert_eq!(code, Some(1), "{stderr}");
    let drops = s["drops"].as_array().unwrap();
    assert_eq!(drops.len(), 1, "{drops:?}");
    assert!(
        drops[0]["hop"].as_str().unwrap().starts_with("node-b/"),
        "{drops:?}"
    );
    assert_eq!(drops[0]["reason"], "NETFILTER_DROP", "{drops:?}");
    assert_eq!(drops[0]["count"], 2, "{drops:?}");

    // capture: one pcapng with both nodes' hops.
    let file = scratch.0.join("client.pcapng");
    let run = kp.start(&[
        "capture",
        "default/client",
        "--dst",
        "default/server",
        "-w",
        file.to_str().unwrap(),
        "-c",
        "60",
    ]);
    let p = ping(&cluster, server_ip, 3);
    assert!(p.status.success(), "{p:?}");
    let (code, _, stderr) = run.wait(60);
    assert_eq!(code, Some(0), "{stderr}");
    let out = Command::new("tshark")
        .args(["-r", file.to_str().unwrap(), "-d", "udp.port==8472,vxlan"])
        .args([
            "-Y",
            "icmp.type == 8",
            "-T",
            "fields",
            "-e",
            "frame.interface_name",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut per_hop = std::collections::BTreeMap::<String, usize>::new();
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        *per_hop.entry(l.to_owned()).or_default() += 1;
    }
    for hop in [
        "node-a/cni0",
        "node-a/flannel.1",
        "node-a/eth0",
        "node-b/eth0",
        "node-b/flannel.1",
        "node-b/cni0",
    ] {
        assert_eq!(per_hop.get(hop), Some(&3), "{hop}: {per_hop:?}");
    }
    assert!(per_hop.values().all(|n| *n == 3), "{per_hop:?}");

    // --dst as a Service (its cluster IP), --container by name.
    let vip = cluster
        .kubectl(&["get", "service", "web", "-o", "jsonpath={.spec.clusterIP}"])
        .trim()
        .to_owned();
    // The test cluster has no kube-proxy and its nodes no default route: node-a's kernel has
    // no route to a cluster IP, and says so about the Service's.
    let out = kp.run(&["topo", "client", "--dst", "svc/web"]);
    assert_one_line_error(&out, &[&format!("no route to {vip}")]);
    let out = kp.run(&["topo", "client", "--container", "main", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let topo: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(topo["pod"]["name"], "client", "{topo}");
    let out = kp.run(&["topo", "client", "--container", "nope"]);
    assert_one_line_error(&out, &["pod default/client has no container nope", "main"]);
    let out = kp.run(&["topo", "client", "--dst", "svc/nope"]);
    assert_one_line_error(&out, &["service default/nope not found"]);

    // Errors: one line, exit 2.
    // A pod that does not exist.
    let out = kp.run(&["follow", "default/nope", "--dst", &server_ip.to_string()]);
    assert_one_line_error(&out, &["pod default/nope not found"]);
    // No kubeconfig at all (and not in a cluster).
    let home = scratch.0.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let out = Command::new(podtrace_bin())
        .args(["kubectl", "topo", "default/client"])
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("HOME", &home)
        .output()
        .unwrap();
    assert_one_line_error(&out, &["no kubeconfig", "--kubeconfig"]);
    // A ServiceAccount that may read pods and the token but not port-forward.
    let rbac = r#"
apiVersion: v1
kind: ServiceAccount
metadata: {name: tracer, namespace: default}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: tracer-podtrace-user}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: podtrace-user}
subjects: [{kind: ServiceAccount, name: tracer, namespace: default}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: tracer-no-portforward, namespace: podtrace}
rules:
- {apiGroups: [""], resources: [secrets], resourceNames: [podtrace-agent-token], verbs: [get]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: tracer-no-portforward, namespace: podtrace}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: tracer-no-portforward}
subjects: [{kind: ServiceAccount, name: tracer, namespace: default}]
"#;
    let out = cluster.kubectl_with(&["apply", "-f", "-"], Some(rbac));
    assert!(out.status.success(), "{out:?}");
    let mut secret = String::new();
    wait_until(30, "the tracer ServiceAccount's token", || {
        secret = cluster.kubectl(&[
            "get",
            "serviceaccount",
            "tracer",
            "-o",
            "jsonpath={.secrets[0].name}",
        ]);
        !secret.trim().is_empty()
    });
    let token = cluster.kubectl(&[
        "get",
        "secret",
        secret.trim(),
        "-o",
        "jsonpath={.data.token}",
    ]);
    let token = String::from_utf8(
        Command::new("base64")
            .arg("-d")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write as _;
                c.stdin.take().unwrap().write_all(token.trim().as_bytes())?;
                c.wait_with_output()
            })
            .unwrap()
            .stdout,
    )
    .unwrap();
    let tracer_cfg = scratch.0.join("tracer.kubeconfig");
    std::fs::write(
        &tracer_cfg,
        cluster.kubectl(&["config", "view", "--raw", "--minify"]),
    )
    .unwrap();
    for args in [
        vec![
            "config",
            "set-credentials",
            "tracer",
            "--token",
            token.trim(),
        ],
        vec!["config", "set-context", "--current", "--user", "tracer"],
    ] {
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&tracer_cfg)
            .args(&args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let tracer = Plugin::new(&scratch.0, &tracer_cfg);
    let out = tracer.run(&["follow", "default/client", "--dst", "default/server"]);
    assert_one_line_error(
        &out,
        &["forbidden", "pods/portforward", "namespace podtrace"],
    );

    // The demo of the kubectl flow, on this cluster (the agents are deployed: it leaves them).
    let out = Command::new(podtrace_bin())
        .args(["demo", "--kubernetes", "--kubeconfig"])
        .arg(&cluster.kubeconfig)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("demo done"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("verdict: CONFIRMED"), "{text}");

    // A node without an agent: the DaemonSet kept off node-b.
    let out = cluster.kubectl_with(
        &[
            "-n",
            "podtrace",
            "patch",
            "daemonset",
            "podtrace-agent",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"template":{"spec":{"affinity":{"nodeAffinity":{"requiredDuringSchedulingIgnoredDuringExecution":{"nodeSelectorTerms":[{"matchExpressions":[{"key":"kubernetes.io/hostname","operator":"NotIn","values":["node-b"]}]}]}}}}}}}"#,
        ],
        None,
    );
    assert!(out.status.success(), "{out:?}");
    wait_until(90, "node-b's agent to go and node-a's to run", || {
        let a = agent_nodes(&cluster);
        a.len() == 1 && a[0].trim() == "node-a Running"
    });
    let out = kp.run(&["follow", "default/client", "--dst", "default/server"]);
    assert_one_line_error(
        &out,
        &[
            "node node-b has no podtrace agent",
            "kubectl podtrace deploy",
        ],
    );
    // A --dst that is not a pod of this cluster's nodes needs only the pod's node: topo
    // through node-a's agent.
    let out = kp.run(&["topo", "default/client", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let topo: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        topo["hops"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["role"] == "bridge" && h["ifname"] == "cni0"),
        "{topo}"
    );

    // undeploy: everything goes; the agents with it.
    let text = kp.ok(&["undeploy"]);
    assert!(text.contains("podtrace removed"), "{text}");
    let out = cluster.kubectl_with(&["get", "namespace", "podtrace"], None);
    assert!(!out.status.success());
    let text = kp.ok(&["undeploy"]);
    assert!(text.contains("nothing to remove"), "{text}");
    eprintln!(
        "kubectl podtrace test took {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
