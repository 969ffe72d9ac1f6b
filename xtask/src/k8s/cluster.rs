//! `k8s up` and `k8s down`.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::{
    binaries, images, pki,
    procs::{self, Daemon},
    Layout, Node, API_IP, API_PORT, NODES, SERVICE_CIDR,
};

/// Directories kubelet 1.20 and containerd use whatever their flags say; each node gets its
/// own (bind-mounted in its mount namespace from `NODE/SOURCE`). The machine only gets the
/// empty mount points, created when missing and left in place (as the kubelet and
/// containerd packages would): removing one that another node's mount namespace binds over
/// would detach that bind (rmdir of a mount point in another mount namespace succeeds). The
/// CRI test removes /run/containerd and /var/lib/cni when it made them: once they exist it
/// never makes them.
const NODE_BINDS: [(&str, &str); 5] = [
    ("kubelet", "/var/lib/kubelet"),
    ("log/pods", "/var/log/pods"),
    ("log/containers", "/var/log/containers"),
    ("run/containerd", "/run/containerd"),
    ("cni", "/var/lib/cni"),
];

fn require_root() -> Result<()> {
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the test cluster needs root (namespaces, mounts, cgroups)");
    }
    Ok(())
}

/// A step logger: elapsed time since `up`/`down` started.
struct Clock(Instant);

impl Clock {
    fn step(&self, what: &str) {
        eprintln!(
            "xtask: k8s: [{:5.1} s] {what}",
            self.0.elapsed().as_secs_f64()
        );
    }
}

/// The podtrace binary that builds and removes the lab.
fn podtrace_bin(given: Option<PathBuf>, build: bool) -> Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p);
    }
    let bin = crate::root().join("target/debug/podtrace");
    if build || !bin.exists() {
        crate::run(
            "cargo",
            &["build", "--package", "podtrace", "--bin", "podtrace"],
        )?;
    }
    Ok(bin)
}

/// `cargo xtask k8s up`.
pub fn up(prefix: &str, podtrace: Option<PathBuf>) -> Result<()> {
    require_root()?;
    Layout::new(prefix)?;
    if !binaries::present() {
        bail!(
            "the Kubernetes {} binaries are not in {}: run `cargo xtask setup` first",
            binaries::VERSION,
            binaries::bin_dir().display()
        );
    }
    images::ensure_test_images()?;
    let l = Layout::new(prefix)?;
    let podtrace = podtrace_bin(podtrace, true)?;
    let clock = Clock(Instant::now());
    if teardown(&l, &podtrace, &clock)? {
        clock.step("removed a stale cluster");
    }
    let mut daemons = Vec::new();
    let result = start(&l, &podtrace, &mut daemons, &clock);
    match result {
        Ok(port) => {
            let mem: u64 = daemons.iter().map(|d| rss_kib(d.child.id())).sum();
            clock.step(&format!(
                "cluster {:?} is up: nodes {} Ready; API server {API_IP}:{API_PORT} in {}, \
                 relayed at 127.0.0.1:{port}; {} MiB RSS; `cargo xtask k8s down{}` removes it",
                l.cluster_name(),
                NODES.map(|n| n.name).join(", "),
                l.netns("control-plane").display(),
                mem / 1024,
                if prefix == super::DEFAULT_PREFIX {
                    String::new()
                } else {
                    format!(" --prefix {prefix}")
                }
            ));
            println!("export KUBECONFIG={}", l.kubeconfig().display());
            Ok(())
        }
        Err(e) => {
            let saved = save_logs(&l);
            let cleanup = teardown(&l, &podtrace, &clock);
            for d in &mut daemons {
                let _ = d.child.wait();
            }
            let logs = match saved {
                Some(dir) => format!("logs kept in {}", dir.display()),
                None => "no logs kept".into(),
            };
            match cleanup {
                Ok(_) => Err(e.context(format!(
                    "k8s up failed (everything it made was removed; {logs})"
                ))),
                Err(c) => Err(e.context(format!(
                    "k8s up failed, and so did removing what it made ({c:#}): run `cargo \
                     xtask k8s down --prefix {prefix}` ({logs})"
                ))),
            }
        }
    }
}

/// `cargo xtask k8s down`.
pub fn down(prefix: &str, podtrace: Option<PathBuf>) -> Result<()> {
    require_root()?;
    let l = Layout::new(prefix)?;
    let podtrace = podtrace_bin(podtrace, false)?;
    let clock = Clock(Instant::now());
    if teardown(&l, &podtrace, &clock)? {
        clock.step(&format!("cluster {:?} removed", l.cluster_name()));
    } else {
        eprintln!(
            "xtask: k8s: no cluster {:?} was up: nothing to remove",
            l.cluster_name()
        );
    }
    Ok(())
}

/// Resident memory of a process, KiB (0 when gone).
fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Copies every *.log of a failed cluster to /tmp/podtrace-k8s-PREFIX-logs/.
fn save_logs(l: &Layout) -> Option<PathBuf> {
    let dest = PathBuf::from(format!("/tmp/podtrace-k8s-{}logs", l.prefix));
    let _ = fs::remove_dir_all(&dest);
    let mut any = false;
    let mut stack = vec![l.state.clone()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = e.path();
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir()
                && !p.starts_with(l.ns_dir())
                && p.file_name().is_some_and(|n| n != "containerd")
            {
                stack.push(p);
            } else if t.is_file() && p.extension().is_some_and(|x| x == "log") {
                let rel = p
                    .strip_prefix(&l.state)
                    .ok()?
                    .to_string_lossy()
                    .replace('/', "_");
                if fs::create_dir_all(&dest).is_ok() && fs::copy(&p, dest.join(rel)).is_ok() {
                    any = true;
                }
            }
        }
    }
    any.then_some(dest)
}

fn nsenter(net: &Path, mnt: Option<&Path>, program: &Path, args: Vec<String>) -> Vec<String> {
    let mut v = vec!["nsenter".to_owned(), format!("--net={}", net.display())];
    if let Some(m) = mnt {
        v.push(format!("--mount={}", m.display()));
    }
    v.push("--".into());
    v.push(program.display().to_string());
    v.extend(args);
    v
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Builds and starts everything; returns the relay's port.
fn start(l: &Layout, podtrace: &Path, daemons: &mut Vec<Daemon>, clock: &Clock) -> Result<u16> {
    // 1. The lab: underlay, node-a and node-b with flannel.1, the control-plane host.
    let out = Command::new(podtrace)
        .args([
            "lab",
            "up",
            "--topology",
            "flannel-nodes",
            "--prefix",
            &l.prefix,
        ])
        .output()
        .with_context(|| format!("running {}", podtrace.display()))?;
    if !out.status.success() {
        bail!(
            "podtrace lab up --topology flannel-nodes failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    clock.step("lab up (underlay, node-a, node-b, flannel.1, control-plane)");

    // 2. Files: credentials, kubeconfigs.
    let cp = l.cp_dir();
    fs::create_dir_all(&cp)?;
    for n in NODES {
        fs::create_dir_all(l.node_dir(n.name))?;
    }
    let admin_token = pki::write(l)?;
    clock.step("certificates, tokens, kubeconfigs");

    // 3. The control plane, in its namespace.
    let cp_net = l.netns("control-plane");
    let pki = l.pki();
    let bin = binaries::bin;
    let etcd_args = vec![
        "--name=cp".into(),
        format!("--data-dir={}", s(&cp.join("etcd"))),
        "--listen-client-urls=http://127.0.0.1:2379".into(),
        "--advertise-client-urls=http://127.0.0.1:2379".into(),
        "--listen-peer-urls=http://127.0.0.1:2380".into(),
        "--initial-advertise-peer-urls=http://127.0.0.1:2380".into(),
        "--initial-cluster=cp=http://127.0.0.1:2380".into(),
    ];
    daemons.push(Daemon::spawn(
        "etcd",
        &nsenter(&cp_net, None, Path::new("/usr/bin/etcd"), etcd_args),
        &cp.join("etcd.log"),
    )?);
    let apiserver_args = vec![
        "--etcd-servers=http://127.0.0.1:2379".into(),
        "--bind-address=0.0.0.0".into(),
        format!("--advertise-address={API_IP}"),
        format!("--secure-port={API_PORT}"),
        "--insecure-port=0".into(),
        format!("--tls-cert-file={}", s(&pki.join("apiserver.crt"))),
        format!("--tls-private-key-file={}", s(&pki.join("apiserver.key"))),
        format!("--client-ca-file={}", s(&pki.join("ca.crt"))),
        format!("--token-auth-file={}", s(&pki.join("tokens.csv"))),
        format!("--cert-dir={}", s(&cp.join("apiserver-certs"))),
        "--authorization-mode=Node,RBAC".into(),
        "--enable-admission-plugins=NodeRestriction".into(),
        "--allow-privileged=true".into(),
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
        format!("--service-account-key-file={}", s(&pki.join("sa.pub"))),
        format!(
            "--service-account-signing-key-file={}",
            s(&pki.join("sa.key"))
        ),
        format!("--service-cluster-ip-range={SERVICE_CIDR}"),
        "--kubelet-preferred-address-types=InternalIP,Hostname".into(),
    ];
    daemons.push(Daemon::spawn(
        "kube-apiserver",
        &nsenter(&cp_net, None, &bin("kube-apiserver"), apiserver_args),
        &cp.join("kube-apiserver.log"),
    )?);
    let cm_kc = s(&cp.join("controller-manager.kubeconfig"));
    let cm_args = vec![
        format!("--kubeconfig={cm_kc}"),
        format!(
            "--service-account-private-key-file={}",
            s(&pki.join("sa.key"))
        ),
        format!("--root-ca-file={}", s(&pki.join("ca.crt"))),
        format!("--cluster-signing-cert-file={}", s(&pki.join("ca.crt"))),
        format!("--cluster-signing-key-file={}", s(&pki.join("ca.key"))),
        "--use-service-account-credentials=true".into(),
        "--leader-elect=false".into(),
        "--port=0".into(),
        "--bind-address=127.0.0.1".into(),
        format!("--cert-dir={}", s(&cp.join("controller-manager-certs"))),
    ];
    daemons.push(Daemon::spawn(
        "kube-controller-manager",
        &nsenter(&cp_net, None, &bin("kube-controller-manager"), cm_args),
        &cp.join("kube-controller-manager.log"),
    )?);
    let sched_kc = s(&cp.join("scheduler.kubeconfig"));
    let sched_args = vec![
        format!("--kubeconfig={sched_kc}"),
        "--leader-elect=false".into(),
        "--port=0".into(),
        "--bind-address=127.0.0.1".into(),
        format!("--cert-dir={}", s(&cp.join("scheduler-certs"))),
    ];
    daemons.push(Daemon::spawn(
        "kube-scheduler",
        &nsenter(&cp_net, None, &bin("kube-scheduler"), sched_args),
        &cp.join("kube-scheduler.log"),
    )?);

    // 4. The relay: 127.0.0.1:PORT here -> the API server in the control-plane namespace.
    let exe = std::env::current_exe().context("locating the xtask binary")?;
    let port_file = l.relay_port_file();
    let _ = fs::remove_file(&port_file);
    daemons.push(Daemon::spawn(
        "relay",
        &[
            s(&exe),
            "k8s".into(),
            "relay".into(),
            format!("--port-file={}", s(&port_file)),
            format!("--netns={}", s(&cp_net)),
            format!("--to={API_IP}:{API_PORT}"),
        ],
        &l.state.join("relay.log"),
    )?);
    wait_for("the relay's port", Duration::from_secs(10), daemons, || {
        Ok(port_file.exists())
    })?;
    let port: u16 = fs::read_to_string(&port_file)?
        .trim()
        .parse()
        .context("the relay's port file")?;
    pki::write_admin_kubeconfig(l, port, &admin_token)?;
    clock.step(&format!(
        "control plane started (etcd, kube-apiserver, kube-controller-manager, \
         kube-scheduler); relay 127.0.0.1:{port}"
    ));

    // 5. The nodes: mount namespace, cgroupRoot, containerd.
    mount_points()?;
    let ns_dir = l.ns_dir();
    fs::create_dir_all(&ns_dir)?;
    procs::run_quiet("mount", &["--bind", &s(&ns_dir), &s(&ns_dir)])?;
    procs::run_quiet("mount", &["--make-private", &s(&ns_dir)])?;
    for n in NODES {
        node_files(l, n)?;
        node_mount_namespace(l, n)?;
        procs::create_cgroup(&l.cgroup_root(n.name))?;
        let dir = l.node_dir(n.name);
        daemons.push(Daemon::spawn(
            &format!("containerd ({})", n.name),
            &nsenter(
                &l.netns(n.name),
                Some(&l.mntns(n.name)),
                Path::new("/usr/bin/containerd"),
                vec!["--config".into(), s(&dir.join("containerd.toml"))],
            ),
            &dir.join("containerd.log"),
        )?);
    }
    for n in NODES {
        let sock = l.containerd_sock(n.name);
        let sock_s = s(&sock);
        wait_for(
            &format!("{}'s containerd", n.name),
            Duration::from_secs(30),
            daemons,
            || {
                Ok(sock.exists()
                    && Command::new("ctr")
                        .args(["--address", &sock_s, "version"])
                        .output()
                        .is_ok_and(|o| o.status.success()))
            },
        )?;
        for tar in image_archives() {
            procs::run_quiet(
                "ctr",
                &[
                    "--address",
                    &sock_s,
                    "-n",
                    "k8s.io",
                    "images",
                    "import",
                    &s(&tar),
                ],
            )
            .with_context(|| format!("importing {} into {}", tar.display(), n.name))?;
        }
    }
    clock.step("containerd on node-a and node-b, images imported");

    // 6. The kubelets.
    for n in NODES {
        let dir = l.node_dir(n.name);
        let args = vec![
            format!("--config={}", s(&dir.join("kubelet.json"))),
            format!("--kubeconfig={}", s(&dir.join("kubelet.kubeconfig"))),
            "--container-runtime=remote".into(),
            "--container-runtime-endpoint=unix:///run/containerd/containerd.sock".into(),
            format!("--hostname-override={}", n.name),
            format!("--node-ip={}", n.ip),
            format!("--pod-infra-container-image={}", images::PAUSE_IMAGE),
            "--v=1".into(),
        ];
        daemons.push(Daemon::spawn(
            &format!("kubelet ({})", n.name),
            &nsenter(
                &l.netns(n.name),
                Some(&l.mntns(n.name)),
                &bin("kubelet"),
                args,
            ),
            &dir.join("kubelet.log"),
        )?);
    }
    clock.step("kubelets started");

    // 7. Ready: the API server, the nodes (with their pod CIDRs), the default service
    //    account (1.20 refuses pods before its token exists).
    wait_for("the API server", Duration::from_secs(60), daemons, || {
        Ok(kubectl(l, &["get", "--raw", "/readyz"]).is_ok_and(|o| o.trim() == "ok"))
    })?;
    clock.step("API server ready");
    let mut patched = Vec::new();
    wait_for("both nodes Ready", Duration::from_secs(90), daemons, || {
        let Ok(text) = kubectl(l, &["get", "nodes", "-o", "json"]) else {
            return Ok(false);
        };
        let v: serde_json::Value = serde_json::from_str(&text).context("kubectl get nodes")?;
        let items = v["items"].as_array().cloned().unwrap_or_default();
        let mut ready = 0;
        for n in NODES {
            let Some(item) = items.iter().find(|i| i["metadata"]["name"] == n.name) else {
                continue;
            };
            if !patched.contains(&n.name) {
                let patch = serde_json::json!({"spec": {"podCIDR": n.pod_cidr,
                                                        "podCIDRs": [n.pod_cidr]}});
                // Retried on the next round when it fails.
                if !item["spec"]["podCIDR"].is_null()
                    || kubectl(
                        l,
                        &[
                            "patch",
                            "node",
                            n.name,
                            "--type=merge",
                            "-p",
                            &patch.to_string(),
                        ],
                    )
                    .is_ok()
                {
                    patched.push(n.name);
                }
            }
            let is_ready = item["status"]["conditions"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            });
            if is_ready {
                ready += 1;
            }
        }
        Ok(ready == NODES.len() && patched.len() == NODES.len())
    })?;
    clock.step("node-a and node-b Ready");
    wait_for(
        "the default service account",
        Duration::from_secs(30),
        daemons,
        || Ok(kubectl(l, &["get", "serviceaccount", "default", "-o", "name"]).is_ok()),
    )?;
    write_cluster_json(l, port)?;
    Ok(port)
}

/// The image archives imported into each node: the test images, and podtrace's image when
/// `cargo xtask image` made one.
fn image_archives() -> Vec<PathBuf> {
    let mut v = vec![images::pause_tar(), images::busybox_tar()];
    let own = crate::image::archive_path();
    if own.exists() {
        v.push(own);
    }
    v
}

/// Runs kubectl with the cluster's admin kubeconfig (and a discovery cache in the state
/// directory, not the user's ~/.kube); its stdout, or an error with stderr.
pub fn kubectl(l: &Layout, args: &[&str]) -> Result<String> {
    let kc = s(&l.kubeconfig());
    let cache = s(&l.kube_cache());
    let mut full = vec!["--kubeconfig", kc.as_str(), "--cache-dir", cache.as_str()];
    full.extend_from_slice(args);
    procs::run_quiet("kubectl", &full)
}

/// Polls `ready` (every 100 ms) until it says yes, failing after `timeout` or as soon as a
/// daemon exits.
fn wait_for(
    what: &str,
    timeout: Duration,
    daemons: &mut [Daemon],
    mut ready: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        for d in daemons.iter_mut() {
            d.check().with_context(|| format!("waiting for {what}"))?;
        }
        if ready()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = daemons
                .iter()
                .map(|d| {
                    format!(
                        "--- {} ({}):\n{}",
                        d.name,
                        d.log.display(),
                        procs::log_tail(&d.log, 5)
                    )
                })
                .collect();
            bail!(
                "{what}: not within {} s\n{}",
                timeout.as_secs(),
                logs.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The machine-side mount points of [`NODE_BINDS`] (never removed: see there).
fn mount_points() -> Result<()> {
    for (_, target) in NODE_BINDS {
        fs::create_dir_all(target).with_context(|| format!("creating {target}"))?;
    }
    Ok(())
}

/// A node's mount namespace, persistent at `ns/NODE`: every mount slave to the machine's
/// (nothing made inside shows outside), the node's own directories bound over
/// [`NODE_BINDS`].
fn node_mount_namespace(l: &Layout, n: Node) -> Result<()> {
    let file = l.mntns(n.name);
    fs::write(&file, "")?;
    let dir = l.node_dir(n.name);
    let mut script = String::from("set -e\n");
    // The copy of ns/ in the new namespace would pin the other nodes' namespaces.
    script.push_str(&format!("umount -l '{}'\n", s(&l.ns_dir())));
    for (src, target) in NODE_BINDS {
        script.push_str(&format!(
            "mount --bind '{}' '{target}'\n",
            s(&dir.join(src))
        ));
    }
    procs::run_quiet(
        "unshare",
        &[
            &format!("--mount={}", s(&file)),
            "--propagation",
            "slave",
            "sh",
            "-c",
            &script,
        ],
    )
    .with_context(|| format!("making {}'s mount namespace", n.name))?;
    Ok(())
}

/// A node's directories and its containerd, CNI and kubelet configurations.
fn node_files(l: &Layout, n: Node) -> Result<()> {
    let dir = l.node_dir(n.name);
    for (src, _) in NODE_BINDS {
        fs::create_dir_all(dir.join(src))?;
    }
    for d in ["containerd", "containerd-opt", "cni-conf"] {
        fs::create_dir_all(dir.join(d))?;
    }
    let d = s(&dir);
    let containerd = format!(
        r#"version = 2
root = "{d}/containerd"
state = "/run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = "/run/containerd/containerd.sock"

[ttrpc]
  address = "/run/containerd/containerd.sock.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/containerd-opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni-conf"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
"#,
        pause = images::PAUSE_IMAGE
    );
    fs::write(dir.join("containerd.toml"), containerd)?;
    // What flannel's CNI plugin hands the bridge plugin (flanneld's subnet for this node).
    let conflist = serde_json::json!({
        "cniVersion": "0.4.0",
        "name": "cbr0",
        "plugins": [{
            "type": "bridge",
            "bridge": "cni0",
            "mtu": 1450,
            "isGateway": true,
            "isDefaultGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": n.pod_cidr}]],
                "routes": [{"dst": "10.244.0.0/16"}],
            },
        }],
    });
    fs::write(
        dir.join("cni-conf/10-flannel.conflist"),
        serde_json::to_string_pretty(&conflist)?,
    )?;
    let kubelet = serde_json::json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": n.ip.to_string(),
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": l.cgroup_root(n.name),
        "failSwapOn": false,
        "evictionHard": {},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        // Test cluster only: the API server reaches kubelets without client certificates.
        "authentication": {"anonymous": {"enabled": true}, "webhook": {"enabled": false}},
        "authorization": {"mode": "AlwaysAllow"},
        "nodeStatusUpdateFrequency": "2s",
        "serializeImagePulls": false,
        "clusterDomain": "cluster.local",
    });
    fs::write(
        dir.join("kubelet.json"),
        serde_json::to_string_pretty(&kubelet)?,
    )?;
    Ok(())
}

fn write_cluster_json(l: &Layout, port: u16) -> Result<()> {
    let nodes: Vec<serde_json::Value> = NODES
        .iter()
        .map(|n| {
            serde_json::json!({
                "name": n.name,
                "ip": n.ip.to_string(),
                "pod_cidr": n.pod_cidr,
                "netns": l.netns(n.name),
                "mntns": l.mntns(n.name),
                "containerd_socket": l.containerd_sock(n.name),
                "containerd_socket_in_node": "/run/containerd/containerd.sock",
                "kubelet": format!("https://{}:10250", n.ip),
                "cgroup_root": l.cgroup_root(n.name),
                "dir": l.node_dir(n.name),
            })
        })
        .collect();
    let v = serde_json::json!({
        "prefix": l.prefix,
        "version": binaries::VERSION,
        "kubeconfig": l.kubeconfig(),
        "relay": format!("127.0.0.1:{port}"),
        "api_server": format!("{API_IP}:{API_PORT}"),
        "control_plane_netns": l.netns("control-plane"),
        "ca": l.pki().join("ca.crt"),
        "nodes": nodes,
    });
    fs::write(l.cluster_json(), serde_json::to_string_pretty(&v)?)?;
    Ok(())
}

/// Removes the cluster `l` whatever state it is in; returns whether anything existed.
fn teardown(l: &Layout, podtrace: &Path, clock: &Clock) -> Result<bool> {
    let lab_up = NODES
        .iter()
        .map(|n| n.name)
        .chain(["control-plane", "underlay"])
        .any(|n| l.netns(n).exists());
    if !l.state.exists() && !lab_up {
        return Ok(false);
    }
    let mut first_err: Option<anyhow::Error> = None;
    // 1. Processes: everything in a node's or the control plane's namespaces (kubelet,
    //    containerd, its shims, the control plane, the relay) and in the nodes' cgroups (the
    //    pods), SIGKILLed by pid until none is left.
    let mut ids = Vec::new();
    for n in NODES {
        ids.extend(procs::ns_id(&l.netns(n.name)));
        if procs::is_mountpoint(&l.mntns(n.name)) {
            ids.extend(procs::ns_id(&l.mntns(n.name)));
        }
    }
    ids.extend(procs::ns_id(&l.netns("control-plane")));
    for round in 0.. {
        let mut pids = procs::pids_in_namespaces(&ids);
        for n in NODES {
            pids.extend(procs::pids_in_cgroup(&l.cgroup_root(n.name)));
        }
        if pids.is_empty() {
            break;
        }
        if round == 5 {
            first_err.get_or_insert(anyhow::anyhow!(
                "processes keep appearing in the cluster's namespaces: {pids:?}"
            ));
            break;
        }
        if let Err(e) = procs::kill_all(&pids) {
            first_err.get_or_insert(e);
        }
    }
    clock.step("processes stopped");
    // 2. The nodes' mount namespaces (their mounts go with them), the cgroups.
    for n in NODES {
        if let Err(e) = procs::unmount_all(&l.mntns(n.name)) {
            first_err.get_or_insert(e);
        }
    }
    if let Err(e) = procs::unmount_all(&l.ns_dir()) {
        first_err.get_or_insert(e);
    }
    for n in NODES {
        if let Err(e) = procs::remove_cgroup(&l.cgroup_root(n.name)) {
            first_err.get_or_insert(e);
        }
    }
    // 3. The lab (nodes, underlay, control-plane host; the pods' namespaces died with their
    //    mounts).
    if lab_up {
        match Command::new(podtrace)
            .args(["lab", "down", "--prefix", &l.prefix])
            .output()
        {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                first_err.get_or_insert(anyhow::anyhow!(
                    "podtrace lab down --prefix {} failed: {}",
                    l.prefix,
                    String::from_utf8_lossy(&o.stderr).trim()
                ));
            }
            Err(e) => {
                first_err.get_or_insert(anyhow::anyhow!("running {}: {e}", podtrace.display()));
            }
        }
    }
    // 4. The files, unless something is still mounted under them.
    if l.state.exists() {
        let state = s(&l.state);
        let mounted = fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.split_whitespace().nth(4))
            .any(|mp| mp == state || mp.starts_with(&format!("{state}/")));
        if mounted {
            first_err.get_or_insert(anyhow::anyhow!("{state} still has mounts: not removed"));
        } else if let Err(e) = fs::remove_dir_all(&l.state) {
            first_err.get_or_insert(anyhow::anyhow!("removing {state}: {e}"));
        }
    }
    // 5. The state root, once no cluster is left (the mount points stay: NODE_BINDS).
    if fs::remove_dir(super::STATE_ROOT).is_ok() {
        if let Some(parent) = Path::new(super::STATE_ROOT).parent() {
            let _ = fs::remove_dir(parent);
        }
    }
    clock.step("mounts, cgroups, lab and files removed");
    match first_err {
        Some(e) => Err(e),
        None => Ok(true),
    }
}
