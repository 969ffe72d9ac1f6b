//! What `kubectl podtrace` asks the API server: the kubeconfig (as kubectl reads it), the pod
//! and the `--dst` named, the agents (the DaemonSet's pods) of the nodes involved, their
//! token, and the port-forward streams that reach them.
use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf, sync::Arc};

use anyhow::{anyhow, bail, Context as _, Result};
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use kube::{
    api::ListParams,
    config::{KubeConfigOptions, Kubeconfig},
    Api, Client, Config,
};

use crate::remote::{connect::Dialed, AgentSpec, Dialer, Endpoint};

/// The namespace, DaemonSet, labels and Secret `deploy/` makes.
pub const NAMESPACE: &str = "podtrace";
pub const DAEMONSET: &str = "podtrace-agent";
pub const AGENT_LABEL: &str = "app.kubernetes.io/name=podtrace-agent";
pub const TOKEN_SECRET: &str = "podtrace-agent-token";
/// The pod annotation naming the agent's loopback port (default [`AGENT_PORT`]).
pub const PORT_ANNOTATION: &str = "podtrace.io/agent-port";
pub const AGENT_PORT: u16 = 7070;

/// The kubeconfig flags, as kubectl takes them.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct KubeArgs {
    /// The kubeconfig file (default: $KUBECONFIG, else ~/.kube/config).
    #[arg(long, global = true, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context (default: its current context).
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    /// The namespace of POD and of a --dst pod or Service (default: the context's, else
    /// `default`).
    #[arg(short = 'n', long, global = true, value_name = "NAMESPACE")]
    pub namespace: Option<String>,
}

/// A connection to the cluster: the client, the namespace names default to, and the runtime
/// the client's connections live on (kept apart from the front end's own).
pub struct Cluster {
    pub rt: tokio::runtime::Runtime,
    pub client: Client,
    pub namespace: String,
    /// The API server, for messages.
    pub server: String,
}

impl Cluster {
    /// Reads the kubeconfig as kubectl does (--kubeconfig, $KUBECONFIG, ~/.kube/config; else
    /// the pod's service account when running in a cluster).
    pub fn connect(args: &KubeArgs) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("starting the API client's runtime")?;
        let opts = KubeConfigOptions {
            context: args.context.clone(),
            ..Default::default()
        };
        let kubeconfig = match &args.kubeconfig {
            Some(p) => Some(Kubeconfig::read_from(p).map_err(|e| {
                anyhow!("reading the kubeconfig {}: {}", p.display(), one_line(&e))
            })?),
            None => match Kubeconfig::from_env() {
                Ok(Some(k)) => Some(k),
                Ok(None) => match home_kubeconfig() {
                    Some(p) => Some(Kubeconfig::read_from(&p).map_err(|e| {
                        anyhow!("reading the kubeconfig {}: {}", p.display(), one_line(&e))
                    })?),
                    None => None,
                },
                Err(e) => bail!("reading the kubeconfig of $KUBECONFIG: {}", one_line(&e)),
            },
        };
        let config = match kubeconfig {
            Some(k) => rt
                .block_on(Config::from_custom_kubeconfig(k, &opts))
                .map_err(|e| anyhow!("the kubeconfig: {}", one_line(&e)))?,
            None => match Config::incluster() {
                Ok(c) if args.context.is_none() => c,
                _ => bail!(
                    "no kubeconfig: pass --kubeconfig FILE, set KUBECONFIG, or create ~/.kube/config (as for kubectl)"
                ),
            },
        };
        let namespace = args
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let server = config.cluster_url.to_string();
        // The client's connection pool and its tasks live on this runtime.
        let client = {
            let _in = rt.enter();
            Client::try_from(config).map_err(|e| anyhow!("the API client: {}", one_line(&e)))?
        };
        Ok(Self {
            rt,
            client,
            namespace,
            server,
        })
    }

    fn pods(&self, ns: &str) -> Api<Pod> {
        Api::namespaced(self.client.clone(), ns)
    }

    /// The pod `NAME` (in the default namespace) or `NAMESPACE/NAME`.
    pub fn pod(&self, name: &str) -> Result<KPod> {
        let (ns, name) = self.split(name, "pod")?;
        let pod = self
            .rt
            .block_on(self.pods(&ns).get_opt(&name))
            .map_err(|e| api_error(&e, &format!("get pod {ns}/{name}"), &self.server))?
            .ok_or_else(|| anyhow!("pod {ns}/{name} not found"))?;
        KPod::of(pod)
    }

    /// `NAME` → (the default namespace, NAME); `NAMESPACE/NAME` as it is.
    fn split(&self, s: &str, what: &str) -> Result<(String, String)> {
        let (ns, name) = match s.split_once('/') {
            Some((ns, name)) => (ns.to_owned(), name.to_owned()),
            None => (self.namespace.clone(), s.to_owned()),
        };
        if ns.is_empty() || name.is_empty() || name.contains('/') {
            bail!("invalid {what} name {s:?} (expected NAME or NAMESPACE/NAME)");
        }
        Ok((ns, name))
    }

    /// `--dst`: an IPv4 address, `svc/NAME`, `svc/NAMESPACE/NAME` (a Service's cluster IP),
    /// `pod/NAME`, `NAME` or `NAMESPACE/NAME` (a pod's IP).
    pub fn dst(&self, s: &str) -> Result<Dst> {
        if let Ok(ip) = s.parse::<Ipv4Addr>() {
            return Ok(Dst {
                ip,
                shown: ip.to_string(),
                pod: None,
            });
        }
        for prefix in ["svc/", "service/", "services/"] {
            if let Some(rest) = s.strip_prefix(prefix) {
                let (ns, name) = self.split(rest, "Service")?;
                let api: Api<Service> = Api::namespaced(self.client.clone(), &ns);
                let svc = self
                    .rt
                    .block_on(api.get_opt(&name))
                    .map_err(|e| api_error(&e, &format!("get service {ns}/{name}"), &self.server))?
                    .ok_or_else(|| anyhow!("--dst: service {ns}/{name} not found"))?;
                let ip = svc
                    .spec
                    .and_then(|s| s.cluster_ip)
                    .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
                    .ok_or_else(|| {
                        anyhow!("--dst: service {ns}/{name} has no IPv4 cluster IP (headless?): name one of its pods")
                    })?;
                return Ok(Dst {
                    ip,
                    shown: format!("service {ns}/{name} ({ip})"),
                    pod: None,
                });
            }
        }
        let name = s
            .strip_prefix("pod/")
            .or_else(|| s.strip_prefix("pods/"))
            .unwrap_or(s);
        let pod = match self.pod(name) {
            Ok(p) => p,
            Err(e) => bail!("--dst: {e:#}"),
        };
        let ip = pod.ip.ok_or_else(|| {
            anyhow!(
                "--dst: pod {}/{} has no IPv4 address yet",
                pod.namespace,
                pod.name
            )
        })?;
        Ok(Dst {
            ip,
            shown: format!("pod {}/{} ({ip})", pod.namespace, pod.name),
            pod: Some(pod),
        })
    }

    /// The pod (not on the host network) whose address is `ip`, if any.
    pub fn pod_with_ip(&self, ip: Ipv4Addr) -> Result<Option<KPod>> {
        let api: Api<Pod> = Api::all(self.client.clone());
        let list = self
            .rt
            .block_on(api.list(&ListParams::default().fields(&format!("status.podIP={ip}"))))
            .map_err(|e| api_error(&e, "list pods (by address)", &self.server))?;
        for p in list.items {
            let hostnet = p
                .spec
                .as_ref()
                .and_then(|s| s.host_network)
                .unwrap_or(false);
            if !hostnet {
                return KPod::of(p).map(Some);
            }
        }
        Ok(None)
    }

    /// The agent of each of `nodes`: its DaemonSet pod there, running and ready. A node
    /// without one is an error naming the node and the fix.
    pub fn agents(&self, nodes: &[String]) -> Result<Vec<AgentPod>> {
        let list = self
            .rt
            .block_on(
                self.pods(NAMESPACE)
                    .list(&ListParams::default().labels(AGENT_LABEL)),
            )
            .map_err(|e| {
                api_error(
                    &e,
                    &format!("list pods in namespace {NAMESPACE} (the agents)"),
                    &self.server,
                )
            })?;
        let mut by_node: BTreeMap<String, Vec<&Pod>> = BTreeMap::new();
        for p in &list.items {
            if let Some(n) = p.spec.as_ref().and_then(|s| s.node_name.clone()) {
                by_node.entry(n).or_default().push(p);
            }
        }
        let mut out = Vec::new();
        for node in nodes {
            let pods = by_node.get(node).cloned().unwrap_or_default();
            let ready = pods.iter().find(|p| ready(p));
            let Some(p) = ready else {
                if list.items.is_empty() {
                    bail!(
                        "node {node} has no podtrace agent: podtrace is not deployed in this cluster (no pod of DaemonSet {NAMESPACE}/{DAEMONSET}); run `kubectl podtrace deploy`"
                    );
                }
                match pods.first() {
                    Some(p) => bail!(
                        "node {node}'s podtrace agent {NAMESPACE}/{} is not ready ({}); see `kubectl -n {NAMESPACE} describe pod {}`, or run `kubectl podtrace deploy` again",
                        name_of(p),
                        state_of(p),
                        name_of(p)
                    ),
                    None => bail!(
                        "node {node} has no podtrace agent (no pod of DaemonSet {NAMESPACE}/{DAEMONSET} there: a nodeSelector, affinity or taint keeps it off?); run `kubectl podtrace deploy` to install or repair it"
                    ),
                }
            };
            let port = p
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(PORT_ANNOTATION))
                .map(|v| {
                    v.parse::<u16>().map_err(|_| {
                        anyhow!(
                            "agent pod {NAMESPACE}/{}: annotation {PORT_ANNOTATION}={v:?} is not a port",
                            name_of(p)
                        )
                    })
                })
                .transpose()?
                .unwrap_or(AGENT_PORT);
            out.push(AgentPod {
                node: node.clone(),
                pod: name_of(p),
                port,
            });
        }
        Ok(out)
    }

    /// The agents' bearer token: the `token` of Secret podtrace/podtrace-agent-token.
    pub fn agent_token(&self) -> Result<String> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), NAMESPACE);
        let what = format!("get secret {NAMESPACE}/{TOKEN_SECRET} (the agents' token)");
        let s = self
            .rt
            .block_on(api.get_opt(TOKEN_SECRET))
            .map_err(|e| api_error(&e, &what, &self.server))?
            .ok_or_else(|| {
                anyhow!("no secret {NAMESPACE}/{TOKEN_SECRET} (the agents' token): run `kubectl podtrace deploy`")
            })?;
        let token = s
            .data
            .as_ref()
            .and_then(|d| d.get("token"))
            .map(|b| String::from_utf8_lossy(&b.0).trim().to_owned())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                anyhow!("secret {NAMESPACE}/{TOKEN_SECRET} has no token yet (the token controller fills it in): try again in a moment")
            })?;
        Ok(token)
    }

    /// Opens (and closes) one port-forward to each agent: names a refusal (RBAC) before the
    /// session starts rather than as an unreachable agent.
    pub fn check_port_forward(&self, agents: &[AgentPod]) -> Result<()> {
        let pods = self.pods(NAMESPACE);
        for a in agents {
            let r = self.rt.block_on(async {
                let pf = pods.portforward(&a.pod, &[a.port]).await?;
                pf.abort();
                Ok::<_, kube::Error>(())
            });
            if let Err(e) = r {
                if status_code(&e) == Some(403) {
                    bail!(
                        "forbidden: you may not create pods/portforward in namespace {NAMESPACE} (RBAC; kubectl podtrace reaches the agents through the API server's port-forward): {}",
                        one_line(&e)
                    );
                }
                bail!(
                    "node {}: port-forward to its agent {NAMESPACE}/{}:{} failed: {}",
                    a.node,
                    a.pod,
                    a.port,
                    one_line(&e)
                );
            }
        }
        Ok(())
    }

    /// Opens a stream to an agent's port through the API server, for each connection the
    /// front end makes.
    pub fn dialer(&self) -> Dialer {
        let client = self.client.clone();
        let handle = self.rt.handle().clone();
        Dialer(Arc::new(move |spec: &AgentSpec| {
            let client = client.clone();
            let handle = handle.clone();
            let target = spec.endpoint.clone();
            Box::pin(async move {
                let Endpoint::PortForward {
                    namespace,
                    pod,
                    port,
                } = target
                else {
                    return Err(std::io::Error::other(format!(
                        "{target} is not a port-forward"
                    )));
                };
                // On the client's runtime: the forwarder's task lives there.
                let opened = handle
                    .spawn(async move {
                        let api: Api<Pod> = Api::namespaced(client, &namespace);
                        let mut pf = api.portforward(&pod, &[port]).await.map_err(|e| {
                            std::io::Error::other(format!(
                                "port-forward to {namespace}/{pod}:{port}: {}",
                                one_line(&e)
                            ))
                        })?;
                        let stream = pf
                            .take_stream(port)
                            .ok_or_else(|| std::io::Error::other("port-forward gave no stream"))?;
                        Ok::<_, std::io::Error>(Forwarded { stream, pf })
                    })
                    .await
                    .map_err(std::io::Error::other)??;
                Ok(Box::new(opened) as Dialed)
            })
        }))
    }
}

/// A port-forward stream; its forwarder ends with it.
struct Forwarded {
    stream: tokio::io::DuplexStream,
    pf: kube::api::Portforwarder,
}

impl Drop for Forwarded {
    fn drop(&mut self) {
        self.pf.abort();
    }
}

impl tokio::io::AsyncRead for Forwarded {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Forwarded {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// A pod as the API server has it.
#[derive(Debug, Clone)]
pub struct KPod {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub ip: Option<Ipv4Addr>,
    pub host_network: bool,
    /// (name, runtime's container id without its `containerd://` scheme) of each container.
    pub containers: Vec<(String, Option<String>)>,
}

impl KPod {
    fn of(p: Pod) -> Result<Self> {
        let namespace = p.metadata.namespace.clone().unwrap_or_default();
        let name = p.metadata.name.clone().unwrap_or_default();
        let spec = p.spec.as_ref();
        let node = spec
            .and_then(|s| s.node_name.clone())
            .ok_or_else(|| anyhow!("pod {namespace}/{name} is not scheduled on a node yet"))?;
        let status = p.status.as_ref();
        let ip = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .map(|i| i.ip.as_str())
            .chain(status.and_then(|s| s.pod_ip.as_deref()))
            .find_map(|s| s.parse::<Ipv4Addr>().ok());
        let ids: BTreeMap<String, String> = status
            .and_then(|s| s.container_statuses.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|c| {
                let id = c.container_id.as_deref()?;
                let id = id.split_once("://").map(|(_, i)| i).unwrap_or(id);
                Some((c.name.clone(), id.to_owned()))
            })
            .collect();
        let containers = spec
            .into_iter()
            .flat_map(|s| s.containers.iter())
            .map(|c| (c.name.clone(), ids.get(&c.name).cloned()))
            .collect();
        Ok(Self {
            namespace,
            name,
            node,
            ip,
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            containers,
        })
    }

    /// The runtime's id of container `name`.
    pub fn container_id(&self, name: &str) -> Result<String> {
        match self.containers.iter().find(|(n, _)| n == name) {
            Some((_, Some(id))) => Ok(id.clone()),
            Some((_, None)) => bail!(
                "container {name} of pod {}/{} has not started yet",
                self.namespace,
                self.name
            ),
            None => bail!(
                "pod {}/{} has no container {name} (it has {})",
                self.namespace,
                self.name,
                self.containers
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

/// `--dst`, resolved.
#[derive(Debug, Clone)]
pub struct Dst {
    pub ip: Ipv4Addr,
    pub shown: String,
    /// The pod it names, when it names one.
    pub pod: Option<KPod>,
}

/// A node's agent pod.
#[derive(Debug, Clone)]
pub struct AgentPod {
    pub node: String,
    pub pod: String,
    pub port: u16,
}

impl AgentPod {
    pub fn spec(&self) -> AgentSpec {
        AgentSpec {
            node: self.node.clone(),
            endpoint: Endpoint::PortForward {
                namespace: NAMESPACE.to_owned(),
                pod: self.pod.clone(),
                port: self.port,
            },
            via_netns: None,
        }
    }
}

fn name_of(p: &Pod) -> String {
    p.metadata.name.clone().unwrap_or_default()
}

/// Running, and its Ready condition true.
fn ready(p: &Pod) -> bool {
    let Some(s) = &p.status else { return false };
    s.phase.as_deref() == Some("Running")
        && p.metadata.deletion_timestamp.is_none()
        && s.conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// A pod's state in a few words: its phase and the first container's waiting reason.
fn state_of(p: &Pod) -> String {
    let Some(s) = &p.status else {
        return "no status".into();
    };
    let mut out = s.phase.clone().unwrap_or_else(|| "Unknown".into());
    if p.metadata.deletion_timestamp.is_some() {
        out.push_str(", terminating");
    }
    for c in s.container_statuses.iter().flatten() {
        if let Some(w) = c.state.as_ref().and_then(|st| st.waiting.as_ref()) {
            out.push_str(&format!(
                ", {}: {}",
                c.name,
                w.reason.clone().unwrap_or_default()
            ));
        } else if !c.ready {
            out.push_str(&format!(", {} not ready", c.name));
        }
    }
    out
}

/// The HTTP status of an API error.
pub fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// An API error as one line: what was asked, and RBAC's refusal named as such.
pub fn api_error(e: &kube::Error, what: &str, server: &str) -> anyhow::Error {
    match status_code(e) {
        Some(403) => anyhow!("forbidden: RBAC does not let you {what}: {}", one_line(e)),
        Some(401) => {
            anyhow!("unauthorized at {server} ({what}): the kubeconfig's credentials were refused")
        }
        _ => match e {
            kube::Error::Api(_) => anyhow!("{what}: {}", one_line(e)),
            _ => anyhow!(
                "{what}: cannot reach the API server {server}: {}",
                one_line(e)
            ),
        },
    }
}

/// An error and its causes on one line.
pub fn one_line(e: &dyn std::error::Error) -> String {
    crate::remote::connect::chain(e).replace('\n', " ")
}

fn home_kubeconfig() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let p = PathBuf::from(home).join(".kube").join("config");
    p.exists().then_some(p)
}
