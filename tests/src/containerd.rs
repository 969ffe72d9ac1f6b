//! A private containerd (Debian's containerd, runc and CNI plugins) for tests that need real
//! CRI pod sandboxes, as ../../shared/cri.md describes: its own root, state, sockets, runc
//! root, opt dir, CNI conf and IPAM dirs under one temporary directory,
//! `restrict_oom_score_adj = true` (root here lacks CAP_SYS_RESOURCE), a pod cgroup parent of
//! its own, and a pause image built here (a static C binary waiting for SIGTERM, an OCI
//! layout) and imported with `ctr`, since no registry is reachable.
//!
//! It runs inside a network namespace of the test (`nsenter --net=`), so the CNI bridge
//! plugin makes its bridge and veths there, never in the root namespace. As a kind-style node
//! ([`NodeSpec::own_mounts`]) it also gets a mount namespace of its own (`unshare --mount`,
//! propagation slave) with per-node directories over `/run` and `/var/lib` (for
//! `/run/containerd` and `/var/lib/cni`: nothing of the machine's is made or touched),
//! and `netns_mounts_under_state_dir = true`: the pod netns paths it reports then exist only
//! in its mount namespace, as on a kind node seen from the host. With
//! [`NodeSpec::hostname`] it gets a UTS namespace with that hostname too, as a node container
//! has.
//!
//! [`Containerd`]'s Drop removes everything, also when the test fails: sandboxes (through CRI),
//! containerd, leftover shims and pause processes, the pod netns files, mounts, the CNI result
//! cache entries of its network, the cgroups and the directory.
use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use podtrace::cri::{self, api, Client, Endpoint};
use serde_json::Value;

use crate::run_ok;

/// The pause image's name.
pub const IMAGE: &str = "podtrace.test/pause:1";
/// The CNI result cache (libcni's) on the machine.
pub const CNI_RESULTS: &str = "/var/lib/cni/results";

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

/// Where and how a containerd runs.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// The node's network namespace (the CNI plugins run there).
    pub netns: PathBuf,
    /// The CNI bridge.
    pub bridge: String,
    /// The pod subnet of this node.
    pub subnet: String,
    /// A mount namespace of its own (a kind-style node): per-node `/run` and `/var/lib`, pod
    /// netns files under the state dir.
    pub own_mounts: bool,
    /// A UTS namespace of its own with this hostname (needs `own_mounts`).
    pub hostname: Option<String>,
    /// A PID namespace of its own, containerd its pid 1 (needs `own_mounts`), as in a kind
    /// node container: the pids it reports are not this machine's.
    pub own_pids: bool,
}

/// A pod sandbox a test made: what the runtime itself said about it (read here from the raw
/// CRI answer, independently of podtrace's parsing).
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub id: String,
    /// The network namespace path the runtime reports (in its own mount namespace).
    pub netns: PathBuf,
    /// The sandbox's (pause) process.
    pub pid: u32,
    pub ip: String,
    pub config: api::PodSandboxConfig,
}

/// A private containerd; Drop tears everything down.
pub struct Containerd {
    pub dir: PathBuf,
    pub sock: PathBuf,
    child: Option<Child>,
    /// The CNI network's name (unique per test run: its cache entries are found by it).
    pub network: String,
    cgroup_parent: String,
    pub spec: NodeSpec,
    pub sandboxes: Vec<Sandbox>,
    /// Containers made in them.
    pub containers: Vec<String>,
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
    /// Starts containerd as `spec` says and imports the pause image. `tag` names everything
    /// it makes (unique per test run).
    pub fn start(tag: &str, spec: NodeSpec) -> Self {
        let tag = tag.trim_end_matches('-').to_owned();
        let dir = PathBuf::from(format!("/tmp/podtrace-cri-{tag}"));
        let _ = fs::remove_dir_all(&dir);
        for sub in [
            "root", "state", "cni", "ipam", "opt", "runc", "logs", "run", "var-lib",
        ] {
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
            made_var_lib_cni: !spec.own_mounts && !Path::new("/var/lib/cni").exists(),
            made_run_containerd: !spec.own_mounts && !Path::new("/run/containerd").exists(),
            spec,
        };
        let conflist = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": me.network,
            "plugins": [{
                "type": "bridge",
                "bridge": me.spec.bridge,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": me.spec.subnet}]],
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
        let under_state = me.spec.own_mounts;
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
  netns_mounts_under_state_dir = {under_state}
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
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", me.spec.netns.display()));
        if me.spec.own_mounts {
            // unshare execs the shell, the shell execs containerd: one pid all along.
            cmd.args(["unshare", "--mount", "--propagation", "slave"]);
            if me.spec.hostname.is_some() {
                cmd.arg("--uts");
            }
            if me.spec.own_pids {
                cmd.args(["--pid", "--fork", "--kill-child", "--mount-proc"]);
            }
            // Its own /run and /var/lib (for /run/containerd and /var/lib/cni), so that
            // nothing of the machine's is made, used or removed: containerd's root, state,
            // runc root and the CNI dirs are all under the directory.
            let mut script =
                format!("set -e; mount --bind {d}/run /run; mount --bind {d}/var-lib /var/lib; ");
            if let Some(h) = &me.spec.hostname {
                script += &format!("hostname {h}; ");
            }
            script += "exec containerd --config \"$0\"";
            cmd.args(["sh", "-c", &script]).arg(&config_path);
        } else {
            assert!(
                me.spec.hostname.is_none() && !me.spec.own_pids,
                "a hostname or PID namespace needs own_mounts"
            );
            cmd.arg("containerd").arg("--config").arg(&config_path);
        }
        me.child = Some(
            cmd.stdin(Stdio::null())
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

    /// containerd's pid (here, in the machine's PID namespace).
    pub fn pid(&self) -> u32 {
        self.try_pid().expect("containerd runs")
    }

    fn try_pid(&self) -> Option<u32> {
        let child = self.child.as_ref()?.id();
        if !self.spec.own_pids {
            return Some(child);
        }
        // `unshare --fork`'s only child.
        fs::read_to_string(format!("/proc/{child}/task/{child}/children"))
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// The pid here of a sandbox's process (the runtime reports it in its own PID namespace):
    /// the process in the sandbox's cgroup.
    pub fn host_pid(&self, sb: &Sandbox) -> u32 {
        if !self.spec.own_pids {
            return sb.pid;
        }
        let procs: Vec<u32> = self
            .cgroup_dirs()
            .iter()
            .flat_map(|d| walk(d))
            .filter(|d| {
                d.file_name()
                    .is_some_and(|n| n.to_string_lossy().contains(&sb.id))
            })
            .flat_map(|d| {
                fs::read_to_string(d.join("cgroup.procs"))
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<u32>>()
            })
            .collect();
        *procs
            .first()
            .unwrap_or_else(|| panic!("no process in sandbox {}'s cgroup", sb.id))
    }

    pub fn endpoint(&self) -> Endpoint {
        Endpoint::from_path(&self.sock)
    }

    /// `unix://SOCK`, as crictl's --runtime-endpoint is written.
    pub fn url(&self) -> String {
        self.endpoint().to_string()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// Runs `f` with a fresh CRI connection to this containerd.
    pub fn call<T, F, Fut>(&self, f: F) -> anyhow::Result<T>
    where
        T: Send,
        F: FnOnce(Client) -> Fut + Send,
        Fut: std::future::Future<Output = anyhow::Result<T>> + Send,
    {
        let ep = self.endpoint();
        cri::block_on(async move { f(Client::connect(&ep).await?).await })
    }

    /// RunPodSandbox, then PodSandboxStatus(verbose) read here.
    pub fn run_pod(&mut self, namespace: &str, name: &str) -> Sandbox {
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
        let pid = info["pid"].as_u64().expect("the sandbox's pid") as u32;
        let ip = status.status.unwrap().network.unwrap().ip;
        let sb = Sandbox {
            id,
            netns,
            pid,
            ip,
            config,
        };
        self.sandboxes.push(sb.clone());
        sb
    }

    /// A container running the pause image in `pod`; returns its ID.
    pub fn run_container(&mut self, pod: &Sandbox, name: &str) -> String {
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

    /// StopPodSandbox: its processes end, its network is torn down; it stays listed.
    pub fn stop_pod(&self, id: &str) {
        let id = id.to_owned();
        self.call(|mut c| async move {
            c.runtime()
                .stop_pod_sandbox(api::StopPodSandboxRequest { pod_sandbox_id: id })
                .await?;
            Ok(())
        })
        .unwrap_or_else(|e| panic!("StopPodSandbox: {e:#}\n{}", self.log()));
    }

    /// Stops containerd: SIGTERM, then SIGKILL after 10 s. (In a PID namespace of its own,
    /// everything in it ends with it.)
    pub fn stop(&mut self) {
        let Some(target) = self.try_pid() else {
            if let Some(mut child) = self.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            return;
        };
        let pid = nix::unistd::Pid::from_raw(target as i32);
        let Some(mut child) = self.child.take() else {
            return;
        };
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
    pub fn remove_sandboxes(&self) -> anyhow::Result<()> {
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
        if self.spec.own_mounts {
            // The shims' sockets were in our own /run/containerd (under the directory).
            return;
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
        // What containerd would have removed with the sandboxes. (In a mount namespace of
        // its own, the netns mounts went with it: only the files are left, in the directory.)
        for sb in &self.sandboxes {
            if self.spec.own_mounts {
                break;
            }
            // /var/run/netns/… is /run/netns/… in the mount table.
            if let Ok(netns) = fs::canonicalize(&sb.netns) {
                eprintln!("cleanup: removing pod netns {}", netns.display());
                detach(&netns);
                if let Err(e) = fs::remove_file(&netns) {
                    eprintln!("cleanup: removing {}: {e}", netns.display());
                }
            }
        }
        if !self.spec.own_mounts {
            for e in fs::read_dir(CNI_RESULTS).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let ours = name.starts_with(&format!("{}-", self.network))
                    || self.sandboxes.iter().any(|s| name.contains(&s.id));
                if ours {
                    let _ = fs::remove_file(e.path());
                }
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
