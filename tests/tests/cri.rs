//! podtrace on real CRI pods: a private containerd (Debian's containerd, runc and CNI plugins)
//! started inside a lab node's network namespace, two pod sandboxes (and a third with a
//! clashing name) created through CRI, then `topo`, `follow`, `capture` and `verify` finding
//! them by name, by `--container ID` and through `$CONTAINER_RUNTIME_ENDPOINT`, and a ping
//! between two pods confirmed hop by hop.
//!
//! The setup (see ../../shared/cri.md for why each piece is needed):
//! - a lab (`podtrace lab up --topology flannel`), whose pods must still be found first by name;
//! - the node of the CRI pods: a fresh network namespace of this test, `{P}crinode`, holding
//!   nothing but what the runtime makes. containerd runs in it (`nsenter --net=`, not
//!   `ip netns exec`, so that the pod netns files it mounts stay visible), so the CNI bridge
//!   plugin makes its bridge and veths there, never in the root namespace. (Not the lab's
//!   node-a: that node routes the flannel pod networks over VXLAN, so podtrace rightly calls
//!   any bridge there `flannel-vxlan`; a plain bridge CNI node has no such routes.) The CNI
//!   network has its own bridge `cri0` and subnet 10.88.0.0/24;
//! - containerd with its own root, state, sockets, runc root, opt dir, CNI conf and IPAM dirs
//!   under one temporary directory, `restrict_oom_score_adj = true` (root here lacks
//!   CAP_SYS_RESOURCE), and a pod cgroup parent of its own;
//! - a pause image built here (a static C binary waiting for SIGTERM, an OCI layout) and
//!   imported with `ctr`, since no registry is reachable.
//!
//! [`Containerd`]'s Drop removes everything, also when the test fails: sandboxes (through CRI),
//! containerd, leftover shims and pause processes, the pod netns files, mounts, the CNI result
//! cache entries of this network, the cgroups and the directory.
use std::{
    collections::HashMap,
    fs,
    os::unix::net::UnixListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use podtrace::cri::{self, api, Client, Endpoint};
use podtrace_tests::{json_lines, podtrace, run_ok, unique_prefix, Lab, Netns, Running};
use serde_json::Value;

const IMAGE: &str = "podtrace.test/pause:1";
const BRIDGE: &str = "cri0";
const SUBNET: &str = "10.88.0.0/24";
const CNI_RESULTS: &str = "/var/lib/cni/results";

const PAUSE_C: &str = r#"
#include <signal.h>
#include <unistd.h>
static void done(int sig) { (void)sig; _exit(0); }
int main(void) {
    signal(SIGTERM, done);
    signal(SIGINT, done);
    for (;;) pause();
}
"#;

/// A pod sandbox this test made: what the runtime itself said about it (read here from the
/// raw CRI answer, independently of podtrace's parsing).
#[derive(Debug, Clone)]
struct Sandbox {
    id: String,
    netns: PathBuf,
    ip: String,
    config: api::PodSandboxConfig,
}

/// A private containerd in a lab node's namespace; Drop tears everything down.
struct Containerd {
    dir: PathBuf,
    sock: PathBuf,
    child: Option<Child>,
    /// The CNI network's name (unique per test run: its cache entries are found by it).
    network: String,
    cgroup_parent: String,
    sandboxes: Vec<Sandbox>,
    /// Containers made in them.
    containers: Vec<String>,
    made_var_lib_cni: bool,
    made_run_containerd: bool,
}

fn sha256_of(path: &Path) -> String {
    let out = run_ok("sha256sum", &[path.to_str().unwrap()]);
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

/// Writes `bytes` as a content-addressed blob; returns (digest, size).
fn blob(blobs: &Path, bytes: &[u8]) -> (String, usize) {
    let tmp = blobs.join("incoming");
    fs::write(&tmp, bytes).unwrap();
    let hex = sha256_of(&tmp);
    fs::rename(&tmp, blobs.join(&hex)).unwrap();
    (format!("sha256:{hex}"), bytes.len())
}

/// The pause image as an OCI layout tarball, built from source.
fn build_pause_image(dir: &Path) -> PathBuf {
    let work = dir.join("image");
    let rootfs = work.join("rootfs");
    let blobs = work.join("oci/blobs/sha256");
    fs::create_dir_all(&rootfs).unwrap();
    fs::create_dir_all(&blobs).unwrap();
    let src = work.join("pause.c");
    fs::write(&src, PAUSE_C).unwrap();
    let bin = rootfs.join("pause");
    run_ok(
        "gcc",
        &[
            "-static",
            "-Os",
            "-o",
            bin.to_str().unwrap(),
            src.to_str().unwrap(),
        ],
    );
    let layer = work.join("layer.tar");
    run_ok(
        "tar",
        &[
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "-C",
            rootfs.to_str().unwrap(),
            "-cf",
            layer.to_str().unwrap(),
            "pause",
        ],
    );
    let (layer_digest, layer_size) = blob(&blobs, &fs::read(&layer).unwrap());
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let config = serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {"Entrypoint": ["/pause"]},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    let (config_digest, config_size) = blob(&blobs, config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest, "size": layer_size}],
    });
    let (manifest_digest, manifest_size) = blob(&blobs, manifest.to_string().as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": manifest_digest, "size": manifest_size,
                       "platform": {"architecture": arch, "os": "linux"},
                       "annotations": {"io.containerd.image.name": IMAGE,
                                       "org.opencontainers.image.ref.name": "1"}}],
    });
    fs::write(work.join("oci/index.json"), index.to_string()).unwrap();
    fs::write(
        work.join("oci/oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let tarball = work.join("pause.tar");
    run_ok(
        "tar",
        &[
            "-C",
            work.join("oci").to_str().unwrap(),
            "-cf",
            tarball.to_str().unwrap(),
            "oci-layout",
            "index.json",
            "blobs",
        ],
    );
    tarball
}

impl Containerd {
    /// Starts containerd inside the network namespace `node` and imports the pause image.
    /// `prefix` names everything it makes.
    fn start(prefix: &str, node: &Path) -> Self {
        let tag = prefix.trim_end_matches('-').to_owned();
        let dir = PathBuf::from(format!("/tmp/podtrace-cri-{tag}"));
        let _ = fs::remove_dir_all(&dir);
        for sub in ["root", "state", "cni", "ipam", "opt", "runc", "logs"] {
            fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let mut me = Self {
            sock: dir.join("containerd.sock"),
            dir: dir.clone(),
            child: None,
            network: format!("podtrace-{tag}"),
            cgroup_parent: format!("/podtrace-{tag}"),
            sandboxes: Vec::new(),
            containers: Vec::new(),
            made_var_lib_cni: !Path::new("/var/lib/cni").exists(),
            made_run_containerd: !Path::new("/run/containerd").exists(),
        };
        let conflist = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": me.network,
            "plugins": [{
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": SUBNET}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": dir.join("ipam"),
                },
            }],
        });
        fs::write(
            dir.join("cni/10-podtrace.conflist"),
            serde_json::to_string_pretty(&conflist).unwrap(),
        )
        .unwrap();
        let d = dir.display();
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{IMAGE}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{d}/runc"
"#
        );
        let config_path = dir.join("config.toml");
        fs::write(&config_path, config).unwrap();
        let tarball = build_pause_image(&dir);

        let log = fs::File::create(dir.join("containerd.log")).unwrap();
        me.child = Some(
            Command::new("nsenter")
                .arg(format!("--net={}", node.display()))
                .arg("containerd")
                .arg("--config")
                .arg(&config_path)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("starting containerd (apt-get install containerd runc)"),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = me.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("containerd exited ({status}) at start: {}", me.log());
            }
            if me.sock.exists() && cri::block_on(Client::connect(&me.endpoint())).is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not serve CRI within 30s: {}",
                me.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        run_ok(
            "ctr",
            &[
                "-a",
                me.sock.to_str().unwrap(),
                "-n",
                "k8s.io",
                "images",
                "import",
                tarball.to_str().unwrap(),
            ],
        );
        // The CRI plugin learns of the image from containerd's events: wait until it does.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let seen = me
                .call(|c| async move {
                    let r = c
                        .images()
                        .image_status(api::ImageStatusRequest {
                            image: Some(api::ImageSpec {
                                image: IMAGE.into(),
                                ..Default::default()
                            }),
                            verbose: false,
                        })
                        .await?;
                    Ok(r.into_inner().image.is_some())
                })
                .unwrap();
            if seen {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "CRI never saw {IMAGE}: {}",
                me.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        me
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint::from_path(&self.sock)
    }

    /// `unix://SOCK`, as crictl's --runtime-endpoint is written.
    fn url(&self) -> String {
        self.endpoint().to_string()
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// Runs `f` with a fresh CRI connection to this containerd.
    fn call<T, F, Fut>(&self, f: F) -> anyhow::Result<T>
    where
        T: Send,
        F: FnOnce(Client) -> Fut + Send,
        Fut: std::future::Future<Output = anyhow::Result<T>> + Send,
    {
        let ep = self.endpoint();
        cri::block_on(async move { f(Client::connect(&ep).await?).await })
    }

    /// RunPodSandbox, then PodSandboxStatus(verbose) read here.
    fn run_pod(&mut self, namespace: &str, name: &str) -> Sandbox {
        let log_dir = self.dir.join("logs").join(format!("{namespace}_{name}"));
        fs::create_dir_all(&log_dir).unwrap();
        let config = api::PodSandboxConfig {
            metadata: Some(api::PodSandboxMetadata {
                name: name.into(),
                uid: format!("{namespace}-{name}-{}", std::process::id()),
                namespace: namespace.into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: log_dir.display().to_string(),
            labels: HashMap::from([
                (cri::LABEL_POD_NAME.to_owned(), name.to_owned()),
                (cri::LABEL_POD_NAMESPACE.to_owned(), namespace.to_owned()),
            ]),
            linux: Some(api::LinuxPodSandboxConfig {
                cgroup_parent: self.cgroup_parent.clone(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let cfg = config.clone();
        let (id, status) = self
            .call(|mut c| async move {
                let id = c
                    .runtime()
                    .run_pod_sandbox(api::RunPodSandboxRequest {
                        config: Some(cfg),
                        runtime_handler: String::new(),
                    })
                    .await?
                    .into_inner()
                    .pod_sandbox_id;
                let status = c
                    .runtime()
                    .pod_sandbox_status(api::PodSandboxStatusRequest {
                        pod_sandbox_id: id.clone(),
                        verbose: true,
                    })
                    .await?
                    .into_inner();
                Ok((id, status))
            })
            .unwrap_or_else(|e| panic!("RunPodSandbox {namespace}/{name}: {e:#}\n{}", self.log()));
        let info: Value = serde_json::from_str(&status.info["info"]).unwrap();
        let netns = info["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["type"] == "network")
            .and_then(|n| n["path"].as_str())
            .map(PathBuf::from)
            .expect("a network namespace path in the sandbox's runtime spec");
        let ip = status.status.unwrap().network.unwrap().ip;
        let sb = Sandbox {
            id,
            netns,
            ip,
            config,
        };
        self.sandboxes.push(sb.clone());
        sb
    }

    /// A container running the pause image in `pod`; returns its ID.
    fn run_container(&mut self, pod: &Sandbox, name: &str) -> String {
        let (pod_id, sandbox_config) = (pod.id.clone(), pod.config.clone());
        let config = api::ContainerConfig {
            metadata: Some(api::ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(api::ImageSpec {
                image: IMAGE.into(),
                ..Default::default()
            }),
            log_path: format!("{name}.log"),
            linux: Some(api::LinuxContainerConfig::default()),
            ..Default::default()
        };
        let id = self
            .call(|mut c| async move {
                let id = c
                    .runtime()
                    .create_container(api::CreateContainerRequest {
                        pod_sandbox_id: pod_id,
                        config: Some(config),
                        sandbox_config: Some(sandbox_config),
                    })
                    .await?
                    .into_inner()
                    .container_id;
                c.runtime()
                    .start_container(api::StartContainerRequest {
                        container_id: id.clone(),
                    })
                    .await?;
                Ok(id)
            })
            .unwrap_or_else(|e| panic!("CreateContainer {name}: {e:#}\n{}", self.log()));
        self.containers.push(id.clone());
        id
    }

    /// Stops containerd: SIGTERM, then SIGKILL after 10 s.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Removes every sandbox through CRI (containers go with them).
    fn remove_sandboxes(&self) -> anyhow::Result<()> {
        self.call(|mut c| async move {
            for s in c.list_sandboxes().await? {
                c.runtime()
                    .stop_pod_sandbox(api::StopPodSandboxRequest {
                        pod_sandbox_id: s.id.clone(),
                    })
                    .await?;
                c.runtime()
                    .remove_pod_sandbox(api::RemovePodSandboxRequest {
                        pod_sandbox_id: s.id.clone(),
                    })
                    .await?;
            }
            Ok(())
        })
    }

    /// Processes of ours that outlived containerd: its shims (their command line names our
    /// socket) and the pause processes in our cgroups.
    fn kill_leftovers(&self) {
        let sock = self.sock.to_str().unwrap().to_owned();
        let mut killed = Vec::new();
        for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            if args.first().is_some_and(|a| a.contains("containerd-shim"))
                && args.iter().any(|a| a.starts_with(&sock))
            {
                eprintln!("cleanup: killing leftover shim {pid}");
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                killed.push(pid);
            }
        }
        for cg in self.cgroup_dirs() {
            for procs in walk(&cg)
                .into_iter()
                .map(|d| d.join("cgroup.procs"))
                .filter(|p| p.exists())
            {
                for pid in fs::read_to_string(&procs).unwrap_or_default().lines() {
                    if let Ok(pid) = pid.trim().parse::<i32>() {
                        if !killed.contains(&pid) {
                            eprintln!("cleanup: killing leftover pod process {pid}");
                            let _ = nix::sys::signal::kill(
                                nix::unistd::Pid::from_raw(pid),
                                nix::sys::signal::Signal::SIGKILL,
                            );
                            killed.push(pid);
                        }
                    }
                }
            }
        }
        // Wait until they are gone (and reaped), so that their mounts and cgroups can go.
        let deadline = Instant::now() + Duration::from_secs(5);
        while killed
            .iter()
            .any(|p| Path::new(&format!("/proc/{p}")).exists())
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        // The shims' sockets (containerd 1.6: /run/containerd/s/sha256(ADDRESS/NAMESPACE/ID)),
        // which a killed shim cannot remove.
        for id in self
            .sandboxes
            .iter()
            .map(|s| &s.id)
            .chain(self.containers.iter())
        {
            let mut sum = Command::new("sha256sum")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            {
                use std::io::Write as _;
                let mut stdin = sum.stdin.take().unwrap();
                let _ = write!(stdin, "{sock}/k8s.io/{id}");
            }
            let out = sum.wait_with_output().unwrap();
            let hex = String::from_utf8_lossy(&out.stdout)
                .chars()
                .take(64)
                .collect::<String>();
            let shim_sock = Path::new("/run/containerd/s").join(hex);
            if shim_sock.exists() {
                eprintln!("cleanup: removing shim socket {}", shim_sock.display());
                let _ = fs::remove_file(shim_sock);
            }
        }
    }

    /// Our pod cgroup parent in every hierarchy that has it.
    fn cgroup_dirs(&self) -> Vec<PathBuf> {
        let rel = self.cgroup_parent.trim_start_matches('/');
        let mut out = Vec::new();
        for h in fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let d = h.path().join(rel);
            if d.is_dir() {
                out.push(d);
            }
        }
        let unified = Path::new("/sys/fs/cgroup").join(rel);
        if unified.is_dir() && !out.contains(&unified) {
            out.push(unified);
        }
        out
    }
}

/// A directory and every directory under it, deepest last.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        for e in fs::read_dir(&out[i]).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.push(e.path());
            }
        }
        i += 1;
    }
    out
}

/// Mount points at or under `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(dir))
        .collect();
    out.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    out.dedup();
    out
}

fn detach(path: &Path) {
    while mounts_under(path).first().is_some_and(|m| m == path) {
        if nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH).is_err() {
            break;
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let alive = self
            .child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none());
        if alive {
            if let Err(e) = self.remove_sandboxes() {
                eprintln!("cleanup: removing sandboxes through CRI: {e:#}");
            }
        }
        self.stop();
        self.kill_leftovers();
        // What containerd would have removed with the sandboxes.
        for sb in &self.sandboxes {
            // /var/run/netns/… is /run/netns/… in the mount table.
            if let Ok(netns) = fs::canonicalize(&sb.netns) {
                eprintln!("cleanup: removing pod netns {}", netns.display());
                detach(&netns);
                if let Err(e) = fs::remove_file(&netns) {
                    eprintln!("cleanup: removing {}: {e}", netns.display());
                }
            }
        }
        for e in fs::read_dir(CNI_RESULTS).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let ours = name.starts_with(&format!("{}-", self.network))
                || self.sandboxes.iter().any(|s| name.contains(&s.id));
            if ours {
                let _ = fs::remove_file(e.path());
            }
        }
        if self.made_var_lib_cni {
            let _ = fs::remove_dir(CNI_RESULTS);
            let _ = fs::remove_dir("/var/lib/cni");
        }
        if self.made_run_containerd {
            // The shims' socket directory.
            let _ = fs::remove_dir("/run/containerd/s");
            let _ = fs::remove_dir("/run/containerd");
        }
        for m in mounts_under(&self.dir) {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
        for cg in self.cgroup_dirs() {
            let mut dirs = walk(&cg);
            dirs.reverse();
            for d in dirs {
                for _ in 0..50 {
                    if fs::remove_dir(&d).is_ok() || !d.exists() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("cleanup: removing {}: {e}", self.dir.display());
        }
    }
}

/// `podtrace ARGS` with `$CONTAINER_RUNTIME_ENDPOINT` set or cleared.
fn podtrace_env(args: &[&str], endpoint: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(podtrace_tests::podtrace_bin());
    cmd.args(args);
    match endpoint {
        Some(e) => cmd.env(cri::ENDPOINT_ENV, e),
        None => cmd.env_remove(cri::ENDPOINT_ENV),
    };
    cmd.output().expect("running podtrace")
}

fn json_of(out: &std::process::Output, what: &str) -> Value {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{what}: not JSON: {e}"))
}

/// Exit 2 and one line on stderr that contains every `needle`.
fn assert_one_line_error(out: &std::process::Output, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "not one line: {stderr}"
    );
    for n in needles {
        assert!(stderr.contains(n), "{n:?} not in: {stderr}");
    }
    stderr
}

/// `nsenter --net=NETNS CMD...` (containerd's pod netns files are plain bind mounts).
fn in_netns(netns: &Path, cmd: &[&str]) -> std::process::Output {
    Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(cmd)
        .output()
        .unwrap()
}

fn roles(topo: &Value) -> Vec<(String, String)> {
    topo["hops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["role"].as_str().unwrap().to_owned(),
                h["ifname"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn cri_pods_are_found_traced_and_followed() {
    let lab = Lab::up("cri", "flannel");
    let node = Netns::new(&format!("{}crinode", lab.prefix));
    let mut ctr = Containerd::start(&lab.prefix, node.path());
    let containerd_pid = ctr.child.as_ref().unwrap().id();
    let hostname = fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_owned();
    let url = ctr.url();
    let sock = ctr.sock.display().to_string();

    let web = ctr.run_pod("default", "cri-web");
    let db = ctr.run_pod("default", "cri-db");
    let db_staging = ctr.run_pod("staging", "cri-db");
    assert_ne!(web.netns, db.netns);
    for sb in [&web, &db, &db_staging] {
        assert!(sb.netns.exists(), "{sb:?}");
        assert!(sb.ip.starts_with("10.88.0."), "{sb:?}");
    }

    // The CNI plugin ran in the node's namespace: cri0 and the host veths are there, not in
    // the root namespace.
    let ports = String::from_utf8(
        in_netns(node.path(), &["ip", "-o", "link", "show", "master", BRIDGE]).stdout,
    )
    .unwrap();
    assert_eq!(ports.lines().count(), 3, "ports of {BRIDGE}: {ports}");
    assert!(!Path::new(&format!("/sys/class/net/{BRIDGE}")).exists());

    // topo by name through --runtime-endpoint.
    let topo = json_of(
        &podtrace(&["topo", "cri-web", "--runtime-endpoint", &url, "--json"]),
        "topo cri-web",
    );
    assert_eq!(topo["cni"], "bridge", "{topo:#}");
    assert_eq!(topo["pod"]["name"], "cri-web");
    assert_eq!(topo["pod"]["namespace"], "default");
    assert_eq!(topo["pod"]["source"], format!("cri:{url}"));
    assert_eq!(topo["pod"]["ip"], web.ip.as_str());
    assert_eq!(topo["pod"]["netns"], web.netns.display().to_string());
    // The node's namespace is the runtime's (SO_PEERCRED of its socket → containerd's pid),
    // not a lab node's: the node is this machine.
    assert_eq!(topo["pod"]["node"], hostname.as_str());
    assert_eq!(
        topo["pod"]["node_netns"],
        format!("/proc/{containerd_pid}/ns/net")
    );
    let hops = roles(&topo);
    assert_eq!(hops.len(), 3, "{topo:#}");
    assert_eq!(hops[0], ("pod-eth0".to_owned(), "eth0".to_owned()));
    assert_eq!(hops[1].0, "host-veth");
    assert_eq!(hops[2], ("bridge".to_owned(), BRIDGE.to_owned()));
    let web_veth = hops[1].1.clone();
    assert!(
        ports.contains(&format!(": {web_veth}@")),
        "{web_veth} not a port of {BRIDGE}: {ports}"
    );
    // The pod's own view agrees: its eth0's peer index is the host veth's ifindex.
    let iflink =
        String::from_utf8(in_netns(&web.netns, &["ip", "-o", "link", "show", "eth0"]).stdout)
            .unwrap();
    let host_ifindex = topo["hops"][1]["ifindex"].as_u64().unwrap();
    assert!(
        iflink.contains(&format!("eth0@if{host_ifindex}:")),
        "{iflink} vs {host_ifindex}"
    );

    // Text output names the same things.
    let out = podtrace(&["topo", "default/cri-web", "--runtime-endpoint", &sock]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [BRIDGE, web_veth.as_str(), "bridge", web.ip.as_str()] {
        assert!(text.contains(needle), "{needle} not in:\n{text}");
    }

    // Two pods called cri-db: listed, exit 2; NAMESPACE/NAME picks one.
    let out = podtrace(&["topo", "cri-db", "--runtime-endpoint", &url]);
    assert_one_line_error(
        &out,
        &[
            "matches 2 pods",
            "default/cri-db",
            "staging/cri-db",
            &db.id[..12],
            &db_staging.id[..12],
        ],
    );
    let staging = json_of(
        &podtrace(&[
            "topo",
            "staging/cri-db",
            "--runtime-endpoint",
            &url,
            "--json",
        ]),
        "topo staging/cri-db",
    );
    assert_eq!(staging["pod"]["ip"], db_staging.ip.as_str());
    assert_eq!(
        staging["pod"]["netns"],
        db_staging.netns.display().to_string()
    );

    // None: exit 2, saying where it looked.
    let out = podtrace(&["topo", "no-such-pod", "--runtime-endpoint", &url]);
    assert_one_line_error(&out, &["no-such-pod", "not found", &sock, "containerd"]);

    // --container: a real container in cri-web, by a prefix of its ID; a sandbox ID too.
    let sidecar = ctr.run_container(&web, "sidecar");
    let by_container = json_of(
        &podtrace(&[
            "topo",
            "--container",
            &sidecar[..10],
            "--runtime-endpoint",
            &url,
            "--json",
        ]),
        "topo --container",
    );
    assert_eq!(by_container["pod"]["name"], "cri-web");
    assert_eq!(by_container["pod"]["ip"], web.ip.as_str());
    assert_eq!(roles(&by_container)[1].1, web_veth);
    let by_sandbox = json_of(
        &podtrace(&[
            "topo",
            "--container",
            &db_staging.id[..8],
            "--runtime-endpoint",
            &url,
            "--json",
        ]),
        "topo --container SANDBOX",
    );
    assert_eq!(by_sandbox["pod"]["namespace"], "staging");
    let out = podtrace(&[
        "topo",
        "--container",
        "ffffffffffffffffff",
        "--runtime-endpoint",
        &url,
    ]);
    assert_one_line_error(&out, &["ffffffffffffffffff", "not found"]);

    // Found through $CONTAINER_RUNTIME_ENDPOINT: lab pods first, then the runtime.
    let via_env = json_of(
        &podtrace_env(&["topo", "cri-web", "--json"], Some(&url)),
        "topo cri-web with $CONTAINER_RUNTIME_ENDPOINT",
    );
    assert_eq!(via_env["pod"]["source"], format!("cri:{url}"));
    let lab_pod = json_of(
        &podtrace_env(
            &["topo", "pod-a1", "--json", "--lab", &lab.prefix],
            Some(&url),
        ),
        "topo pod-a1 with $CONTAINER_RUNTIME_ENDPOINT",
    );
    assert_eq!(lab_pod["pod"]["source"], format!("lab:{}", lab.prefix));
    assert_eq!(lab_pod["cni"], "flannel-vxlan");

    // follow: a ping from cri-web to default/cri-db, confirmed hop by hop through cri0.
    let run = Running::start(&[
        "follow",
        "cri-web",
        "--dst",
        &db.ip,
        "--json",
        "-c",
        "6",
        "--runtime-endpoint",
        &url,
    ]);
    let ready = json_lines(&run.seen)
        .into_iter()
        .find(|o| o["type"] == "ready")
        .expect("a ready line");
    assert_eq!(ready["cni"], "bridge");
    let ping = in_netns(
        &web.netns,
        &["ping", "-c", "3", "-i", "0.2", "-W", "2", &db.ip],
    );
    assert!(ping.status.success(), "ping cri-web → cri-db: {ping:?}");
    let (code, lines, stderr) = run.wait(30);
    let objs = json_lines(&lines);
    let summary = objs
        .iter()
        .find(|o| o["type"] == "summary")
        .unwrap_or_else(|| panic!("no summary: {lines:?} {stderr}"));
    assert_eq!(summary["verdict"], "confirmed", "{summary:#}");
    assert_eq!(code, Some(0));
    let observed: Vec<String> = summary["observed_path"]
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
        .collect();
    let db_topo = json_of(
        &podtrace(&[
            "topo",
            "default/cri-db",
            "--runtime-endpoint",
            &url,
            "--json",
        ]),
        "topo default/cri-db",
    );
    let db_veth = roles(&db_topo)[1].1.clone();
    assert_eq!(
        observed,
        [
            "cri-web/eth0 egress".to_owned(),
            format!("{hostname}/{web_veth} ingress"),
            format!("{hostname}/{BRIDGE} bridged"),
            format!("{hostname}/{db_veth} egress"),
            "cri-db/eth0 ingress".to_owned(),
        ]
    );
    assert_eq!(
        objs.iter().filter(|o| o["type"] == "packet").count(),
        6,
        "{lines:?}"
    );

    // capture: by --container, every word is the filter.
    let pcap = ctr.dir.join("web.pcapng");
    let run = Running::start(&[
        "capture",
        "--container",
        &sidecar[..12],
        "--runtime-endpoint",
        &url,
        "icmp",
        "-w",
        pcap.to_str().unwrap(),
        "-c",
        "4",
    ]);
    let ping = in_netns(
        &web.netns,
        &["ping", "-c", "4", "-i", "0.2", "-W", "2", &db.ip],
    );
    assert!(ping.status.success(), "{ping:?}");
    let (code, _, stderr) = run.wait(30);
    assert_eq!(code, Some(0), "capture: {stderr}");
    let read = run_ok("tcpdump", &["-n", "-r", pcap.to_str().unwrap(), "icmp"]);
    let packets = String::from_utf8_lossy(&read.stdout);
    assert_eq!(packets.lines().count(), 4, "{packets}");
    assert!(
        packets
            .lines()
            .all(|l| l.contains(&web.ip) && l.contains(&db.ip)),
        "{packets}"
    );

    // verify eni takes a CRI pod too, and says why this one is not an ENI pod.
    let out = podtrace(&[
        "verify",
        "eni",
        "cri-web",
        "--dst",
        &db.ip,
        "--runtime-endpoint",
        &url,
    ]);
    assert_one_line_error(&out, &["cri-web", "not on an ENI", "bridge"]);

    // containerd's ttrpc socket is not CRI; a stopped runtime is named as such.
    let out = podtrace(&[
        "topo",
        "cri-web",
        "--runtime-endpoint",
        &format!("{sock}.ttrpc"),
    ]);
    assert_one_line_error(&out, &["containerd.sock.ttrpc"]);

    ctr.remove_sandboxes().unwrap();
    for sb in [&web, &db, &db_staging] {
        assert!(!sb.netns.exists(), "{} left behind", sb.netns.display());
    }
    ctr.stop();
    let out = podtrace(&["topo", "cri-web", "--runtime-endpoint", &url]);
    assert_one_line_error(&out, &[&sock]);
    let dir = ctr.dir.clone();
    drop(ctr);
    assert!(!dir.exists(), "{} left behind", dir.display());
    let leftovers: Vec<_> = fs::read_dir(CNI_RESULTS)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            [&web, &db, &db_staging]
                .iter()
                .any(|s| e.file_name().to_string_lossy().contains(&s.id))
        })
        .collect();
    assert!(leftovers.is_empty(), "CNI cache left behind: {leftovers:?}");
}

/// Errors that need no runtime: each is one line and exit 2.
#[test]
fn runtime_problems_are_one_clear_line() {
    podtrace_tests::require_root();
    let dir = PathBuf::from(format!("/tmp/podtrace-cri-{}", unique_prefix("err")));
    fs::create_dir_all(&dir).unwrap();
    struct Rm(PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
    let _rm = Rm(dir.clone());

    // No socket there.
    let missing = dir.join("missing.sock");
    let out = podtrace(&[
        "topo",
        "web",
        "--runtime-endpoint",
        missing.to_str().unwrap(),
    ]);
    assert_one_line_error(&out, &["missing.sock", "no such socket"]);

    // A file that is not a socket.
    let file = dir.join("file.sock");
    fs::write(&file, "x").unwrap();
    let out = podtrace(&[
        "topo",
        "--container",
        "abc",
        "--runtime-endpoint",
        file.to_str().unwrap(),
    ]);
    assert_one_line_error(&out, &["file.sock", "not a unix socket"]);

    // A socket nobody listens on any more: the runtime is down.
    let stale = dir.join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let out = podtrace(&["topo", "web", "--runtime-endpoint", stale.to_str().unwrap()]);
    assert_one_line_error(&out, &["stale.sock", "is the runtime running"]);

    // A socket that answers, but not in gRPC (an HTTP/1.1 server).
    let http = dir.join("http.sock");
    let listener = UnixListener::bind(&http).unwrap();
    // Serves every connection (podtrace connects twice) until the test process ends.
    std::thread::spawn(move || {
        use std::io::{Read as _, Write as _};
        for mut conn in listener.incoming().map_while(Result::ok) {
            let mut buf = [0u8; 256];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        }
    });
    let started = Instant::now();
    let out = podtrace(&[
        "topo",
        "web",
        "--runtime-endpoint",
        &format!("unix://{}", http.display()),
    ]);
    assert_one_line_error(&out, &["http.sock", "not a working CRI socket"]);
    assert!(started.elapsed() < Duration::from_secs(15));

    // Not a unix endpoint; flags that do not go together.
    let out = podtrace(&["topo", "web", "--runtime-endpoint", "tcp://127.0.0.1:1"]);
    assert_one_line_error(&out, &["unix sockets only"]);
    let out = podtrace(&["topo", "web", "--container", "abc"]);
    assert_one_line_error(&out, &["--container"]);
}
