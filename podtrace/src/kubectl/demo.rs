//! `podtrace demo --kubernetes`: the kubectl flow on the cluster of the kubeconfig (the test
//! cluster of `cargo xtask k8s up`, or yours): deploy the agents, two pods on two nodes,
//! `kubectl podtrace topo`, `follow` and `capture` across the nodes through the agents, then
//! everything it made removed (the agents only when it deployed them). Every step checks that
//! it showed what it claims; exit 0 only if all did.
use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, Command, ExitCode, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::{
    api::{AttachParams, DeleteParams, ListParams, PostParams},
    Api,
};

use super::api::{api_error, Cluster, KubeArgs, NAMESPACE};

const CLIENT: &str = "podtrace-demo-client";
const SERVER: &str = "podtrace-demo-server";

/// What `podtrace demo --kubernetes` takes.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct KubeDemoArgs {
    #[command(flatten)]
    pub kube: KubeArgs,
    /// The demo pods' image: any with `sh`, `ping` and `sleep` (busybox). The default is the
    /// one `cargo xtask k8s up` imports into its nodes; elsewhere e.g. busybox:1.36.
    #[arg(long, value_name = "IMAGE", default_value = "localhost/busybox:1.35")]
    pub pod_image: String,
    /// The agents' image, when the demo deploys them.
    #[arg(long, value_name = "IMAGE", default_value = super::deploy::DEFAULT_IMAGE)]
    pub agent_image: String,
}

fn me() -> Result<PathBuf> {
    std::env::current_exe().context("locating the podtrace binary")
}

/// `kubectl podtrace ARGS` as this binary runs it, with the demo's kubeconfig flags.
fn kubectl_podtrace(kube: &KubeArgs, args: &[&str]) -> Result<Command> {
    let mut c = Command::new(me()?);
    c.arg("kubectl").args(args);
    if let Some(k) = &kube.kubeconfig {
        c.arg("--kubeconfig").arg(k);
    }
    if let Some(ctx) = &kube.context {
        c.args(["--context", ctx]);
    }
    Ok(c)
}

fn show(args: &[&str]) {
    println!("  $ kubectl podtrace {}", args.join(" "));
}

fn indent(text: &str) {
    for line in text.lines() {
        println!("    {line}");
    }
}

fn check(ok: bool, what: &str) -> Result<()> {
    if ok {
        println!("  ✓ {what}");
        Ok(())
    } else {
        bail!("the demo did not show what it claims: {what}")
    }
}

fn header(n: u32, title: &str) {
    println!();
    println!("━━━ {n}. {title}");
    println!();
}

/// Runs `kubectl podtrace ARGS` to completion: (exit code, stdout, stderr).
fn run_plugin(kube: &KubeArgs, args: &[&str]) -> Result<(i32, String, String)> {
    show(args);
    let out = kubectl_podtrace(kube, args)?
        .output()
        .context("running kubectl podtrace")?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// A `kubectl podtrace` run in the background, once its probes are live.
struct Background {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
}

impl Background {
    fn start(kube: &KubeArgs, args: &[&str]) -> Result<Self> {
        show(args);
        let mut child = kubectl_podtrace(kube, args)?
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting kubectl podtrace")?;
        let pipe = |r: Box<dyn std::io::Read + Send>| {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(r).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            rx
        };
        let stdout = pipe(Box::new(child.stdout.take().expect("piped")));
        let stderr = pipe(Box::new(child.stderr.take().expect("piped")));
        let mut bg = Self {
            child,
            stdout,
            stderr,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match bg.stderr.recv_timeout(Duration::from_millis(50)) {
                Ok(line) if line.contains("probes live") => return Ok(bg),
                Ok(line) => println!("    {line}"),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = bg.child.wait()?;
                    bail!("kubectl podtrace {args:?} ended before its probes were live ({status})");
                }
            }
            if Instant::now() > deadline {
                bail!("kubectl podtrace {args:?} did not attach within 60 s");
            }
        }
    }

    fn finish(mut self, secs: u64) -> Result<(i32, String, String)> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let status = loop {
            if let Some(s) = self.child.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("kubectl podtrace did not finish within {secs} s");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let out: Vec<String> = self.stdout.iter().collect();
        let err: Vec<String> = self.stderr.iter().collect();
        Ok((status.code().unwrap_or(-1), out.join("\n"), err.join("\n")))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the demo made, removed on drop (also on failure).
struct Cleanup<'a> {
    cluster: &'a Cluster,
    namespace: String,
    kube: KubeArgs,
    undeploy: bool,
    scratch: PathBuf,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let pods: Api<Pod> = Api::namespaced(self.cluster.client.clone(), &self.namespace);
        for p in [CLIENT, SERVER] {
            let _ = self
                .cluster
                .rt
                .block_on(pods.delete(p, &DeleteParams::default().grace_period(0)));
        }
        if self.undeploy {
            if let Ok(mut c) = kubectl_podtrace(&self.kube, &["undeploy"]) {
                let _ = c.stdout(Stdio::null()).status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// A demo pod pinned to `node`.
fn pod(name: &str, node: &str, image: &str, command: &str) -> Result<Pod> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "podtrace-demo"}},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 0,
            "containers": [{
                "name": "main",
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "command": ["sh", "-c", command],
            }],
        },
    }))?)
}

/// Waits until pod `name` runs and has an address.
fn wait_running(cluster: &Cluster, api: &Api<Pod>, name: &str) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let p = cluster
            .rt
            .block_on(api.get(name))
            .map_err(|e| api_error(&e, &format!("get pod {name}"), &cluster.server))?;
        let st = p.status.unwrap_or_default();
        if st.phase.as_deref() == Some("Running") {
            if let Some(ip) = st.pod_ip {
                return Ok(ip);
            }
        }
        if Instant::now() > deadline {
            bail!(
                "pod {name} did not run within 120 s ({}): is its image ({}) there? Pass --pod-image",
                st.phase.unwrap_or_default(),
                p.spec
                    .map(|s| s.containers[0].image.clone().unwrap_or_default())
                    .unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

pub fn run(args: KubeDemoArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let cluster = Cluster::connect(&args.kube)?;
    let ns = cluster.namespace.clone();
    println!(
        "podtrace demo --kubernetes: kubectl podtrace on the cluster at {}",
        cluster.server
    );
    println!("(it makes two pods in namespace {ns}, and the agents unless they are deployed; all removed at the end)");

    // Two Ready nodes (one will do: then the path stays on it).
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    let list = cluster
        .rt
        .block_on(nodes.list(&ListParams::default()))
        .map_err(|e| api_error(&e, "list nodes", &cluster.server))?;
    let mut ready: Vec<String> = list
        .items
        .iter()
        .filter(|n| {
            n.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    ready.sort();
    let (node_c, node_s) = match ready.as_slice() {
        [] => bail!("no Ready node in the cluster"),
        [one] => (one.clone(), one.clone()),
        [a, b, ..] => (a.clone(), b.clone()),
    };
    let namespaces: Api<Namespace> = Api::all(cluster.client.clone());
    let deployed = cluster
        .rt
        .block_on(namespaces.get_opt(NAMESPACE))
        .map_err(|e| api_error(&e, "get namespace podtrace", &cluster.server))?
        .is_some();
    let scratch = std::env::temp_dir().join(format!("podtrace-kdemo-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let _cleanup = Cleanup {
        cluster: &cluster,
        namespace: ns.clone(),
        kube: args.kube.clone(),
        undeploy: !deployed,
        scratch: scratch.clone(),
    };

    header(
        1,
        "Deploy the agents: a DaemonSet, reached through the API server",
    );
    if deployed {
        println!("  (namespace {NAMESPACE} exists: the agents are deployed already; the demo leaves them)");
    }
    let (code, out, err) = run_plugin(&args.kube, &["deploy", "--image", &args.agent_image])?;
    indent(&out);
    check(
        code == 0 && out.contains("agents ready"),
        &format!("every node's agent is ready{}", first_line(&err)),
    )?;

    header(2, "Two pods on two nodes");
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &ns);
    for p in [CLIENT, SERVER] {
        let _ = cluster
            .rt
            .block_on(pods.delete(p, &DeleteParams::default().grace_period(0)));
    }
    let create = |p: Pod| {
        cluster
            .rt
            .block_on(pods.create(&PostParams::default(), &p))
            .map_err(|e| api_error(&e, "create a demo pod", &cluster.server))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    // A pod of the same name may still be going.
    loop {
        match create(pod(SERVER, &node_s, &args.pod_image, "sleep 3600")?) {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline && format!("{e}").contains("already exists") => {
                std::thread::sleep(Duration::from_millis(500))
            }
            Err(e) => return Err(e),
        }
    }
    let server_ip = wait_running(&cluster, &pods, SERVER)?;
    loop {
        match create(pod(CLIENT, &node_c, &args.pod_image, "sleep 3600")?) {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline && format!("{e}").contains("already exists") => {
                std::thread::sleep(Duration::from_millis(500))
            }
            Err(e) => return Err(e),
        }
    }
    let client_ip = wait_running(&cluster, &pods, CLIENT)?;
    println!("    {CLIENT} {client_ip} on {node_c}, {SERVER} {server_ip} on {node_s}");
    // Traffic once the probes are live: pings from inside the client (exec through the API).
    let ping = |n: u32| -> Result<()> {
        println!("  $ kubectl exec {CLIENT} -- ping -c {n} {server_ip}");
        cluster.rt.block_on(async {
            let p = pods
                .exec(
                    CLIENT,
                    [
                        "ping",
                        "-c",
                        &n.to_string(),
                        "-i",
                        "0.2",
                        "-W",
                        "1",
                        server_ip.as_str(),
                    ],
                    &AttachParams::default().stdout(true).stderr(false),
                )
                .await
                .map_err(|e| api_error(&e, &format!("exec in pod {CLIENT}"), &cluster.server))?;
            let mut p = p;
            if let Some(mut out) = p.stdout() {
                let mut sink = Vec::new();
                let _ = tokio::io::AsyncReadExt::read_to_end(&mut out, &mut sink).await;
            }
            p.join()
                .await
                .map_err(|e| anyhow!("exec in pod {CLIENT}: {e}"))
        })
    };

    header(
        3,
        "topo: the pod found through the API, its path from both nodes' agents",
    );
    let client = format!("{ns}/{CLIENT}");
    let server = format!("pod/{SERVER}");
    let (code, out, err) = run_plugin(&args.kube, &["topo", &client, "--dst", &server, "-n", &ns])?;
    indent(&out);
    check(
        code == 0 && out.contains(&format!("{node_s}/")),
        &format!("the path reaches {node_s}{}", first_line(&err)),
    )?;

    header(4, "follow: real packets, hop by hop, on both nodes");
    let bg = Background::start(
        &args.kube,
        &["follow", &client, "--dst", &server, "-n", &ns, "-c", "4"],
    )?;
    ping(2)?;
    let (code, out, err) = bg.finish(60)?;
    indent(&out);
    check(
        code == 0 && out.contains("verdict: CONFIRMED"),
        &format!("the path is confirmed end to end{}", first_line(&err)),
    )?;

    header(5, "capture: one pcapng with every hop of both nodes");
    let file = scratch.join("demo.pcapng");
    let file_s = file.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
    let bg = Background::start(
        &args.kube,
        &[
            "capture", &client, "--dst", &server, "-n", &ns, "-w", file_s, "-c", "40",
        ],
    )?;
    ping(2)?;
    let (code, out, err) = bg.finish(60)?;
    indent(&out);
    indent(&err);
    let size = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    check(
        code == 0 && size > 0,
        &format!("{file_s}: {size} bytes (open it with wireshark: one interface per hop)"),
    )?;

    header(6, "Clean up");
    println!(
        "  the demo pods go{}",
        if deployed {
            ""
        } else {
            ", and `kubectl podtrace undeploy` removes the agents"
        }
    );
    println!(
        "\ndemo done in {:.0} s: kubectl podtrace deploy | topo | follow | capture | undeploy",
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

fn first_line(stderr: &str) -> String {
    match stderr.lines().find(|l| l.contains("kubectl podtrace:")) {
        Some(l) => format!(" ({l})"),
        None => String::new(),
    }
}
