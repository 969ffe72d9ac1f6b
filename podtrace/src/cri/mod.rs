//! Finding real pods through the container runtime's CRI socket (containerd, CRI-O,
//! cri-dockerd, k3s), as crictl does.
//!
//! - Which socket: `--runtime-endpoint` (or `CONTAINER_RUNTIME_ENDPOINT`, as crictl), else the
//!   usual paths ([`DEFAULT_ENDPOINTS`]) that exist and every runtime process's socket
//!   ([`machine`]: kind nodes, k3s, runtimes in mount namespaces of their own), see
//!   [`discover`].
//! - Which pod: by `NAME` / `NAMESPACE/NAME` (sandbox metadata or the kubelet's
//!   `io.kubernetes.pod.name` / `io.kubernetes.pod.namespace` labels, [`pods_named`]), by a
//!   container or sandbox ID prefix ([`by_id_prefix`]), or by IP ([`pod_with_ip`]).
//! - Where its network is: the verbose status's `info` (`pid`,
//!   `runtimeSpec.linux.namespaces[type=network].path`), see [`ProcessInfo`].
//! - Where the node's network is: the runtime's own namespace, `/proc/PID/ns/net` of the pid
//!   the socket's peer credentials give ([`Client::peer_pid`]); on a real node, the root one.
//!
//! The calls are async (tonic); [`block_on`] runs them from synchronous code:
//!
//! ```no_run
//! use podtrace::cri::{self, Client, Endpoint};
//! let ep = Endpoint::parse("unix:///run/containerd/containerd.sock")?;
//! let pods = cri::block_on(async {
//!     let mut client = Client::connect(&ep).await?;
//!     cri::pods_named(&mut client, Some("default"), "web-0").await
//! })?;
//! for p in pods {
//!     println!("{} {:?} {:?}", p.display_name(), p.netns, p.ip);
//! }
//! # anyhow::Ok(())
//! ```
pub mod client;
pub mod machine;

use std::{future::Future, net::Ipv4Addr, path::PathBuf};

use anyhow::{bail, Context as _, Result};

pub use client::{Client, Endpoint, ProcessInfo, RuntimeVersion};
/// The CRI v1 API (messages and the generated clients), for callers that drive the runtime.
pub use k8s_cri::v1 as api;

/// The sockets searched when no endpoint is given: (runtime, path).
pub const DEFAULT_ENDPOINTS: &[(&str, &str)] = &[
    ("containerd", "/run/containerd/containerd.sock"),
    ("CRI-O", "/var/run/crio/crio.sock"),
    ("cri-dockerd", "/var/run/cri-dockerd.sock"),
    ("k3s", "/run/k3s/containerd/containerd.sock"),
];

/// The environment variable crictl reads the endpoint from.
pub const ENDPOINT_ENV: &str = "CONTAINER_RUNTIME_ENDPOINT";

/// The kubelet's labels on a pod sandbox.
pub const LABEL_POD_NAME: &str = "io.kubernetes.pod.name";
pub const LABEL_POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";

/// Where to look for a runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoints {
    /// `--runtime-endpoint` or `CONTAINER_RUNTIME_ENDPOINT`: that socket only.
    Given(Endpoint),
    /// The default paths that exist on this machine (possibly none).
    Found(Vec<Endpoint>),
}

impl Endpoints {
    pub fn list(&self) -> Vec<Endpoint> {
        match self {
            Self::Given(e) => vec![e.clone()],
            Self::Found(v) => v.clone(),
        }
    }
}

/// Picks the socket(s): `explicit` (the flag), else `CONTAINER_RUNTIME_ENDPOINT`, else every
/// runtime of this machine ([`machine_endpoints`]).
pub fn discover(explicit: Option<&str>) -> Result<Endpoints> {
    if let Some(s) = explicit {
        return Ok(Endpoints::Given(Endpoint::parse(s)?));
    }
    if let Some(s) = std::env::var(ENDPOINT_ENV).ok().filter(|s| !s.is_empty()) {
        return Ok(Endpoints::Given(
            Endpoint::parse(&s).with_context(|| format!("${ENDPOINT_ENV}"))?,
        ));
    }
    Ok(Endpoints::Found(machine_endpoints()))
}

/// Every CRI socket of this machine, each once: the default paths that exist, then the
/// sockets of runtime processes ([`machine::runtime_sockets`]) that are not one of those.
pub fn machine_endpoints() -> Vec<Endpoint> {
    let mut out: Vec<Endpoint> = Vec::new();
    let mut seen = Vec::new();
    let defaults = DEFAULT_ENDPOINTS.iter().map(|(_, p)| PathBuf::from(p));
    let running = machine::runtime_sockets().into_iter().map(|s| s.reachable);
    for path in defaults.chain(running) {
        let Some(id) = machine::socket_id(&path) else {
            continue;
        };
        if !seen.contains(&id) {
            seen.push(id);
            out.push(Endpoint::from_path(path));
        }
    }
    out
}

/// The default paths, for "searched ..." messages.
pub fn default_paths() -> String {
    DEFAULT_ENDPOINTS
        .iter()
        .map(|(_, p)| *p)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A pod sandbox found through CRI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriPod {
    /// The sandbox ID.
    pub id: String,
    pub name: String,
    pub namespace: String,
    pub uid: String,
    /// `ready` or `notready`.
    pub state: String,
    /// The pod's network namespace (`/var/run/netns/cni-…`, or `/proc/PID/ns/net`).
    pub netns: Option<PathBuf>,
    /// The sandbox's (pause) process.
    pub pid: Option<u32>,
    /// Found by `--container`: that container's process (in the same network namespace).
    pub container_pid: Option<u32>,
    /// The pod's IPv4 address as the runtime reports it.
    pub ip: Option<Ipv4Addr>,
    /// `hostNetwork: true`: the pod shares the node's namespace.
    pub host_network: bool,
    /// Found by `--container`: the container's ID and name.
    pub container: Option<(String, String)>,
    /// The runtime it was found through.
    pub endpoint: Endpoint,
    pub runtime: RuntimeVersion,
    /// The runtime's pid (SO_PEERCRED of its socket).
    pub runtime_pid: Option<u32>,
}

impl CriPod {
    /// `NAMESPACE/NAME`.
    pub fn display_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// `NAMESPACE/NAME (pod 0123456789ab, ready)` for lists of candidates.
    pub fn describe(&self) -> String {
        let what = match &self.container {
            Some((id, name)) => format!("container {name} {}", short(id)),
            None => format!("pod {}", short(&self.id)),
        };
        format!("{} ({what}, {})", self.display_name(), self.state)
    }

    /// Fails when the pod has no network of its own to trace: host network, or a sandbox that
    /// is not ready (its network is torn down).
    pub fn check_usable(&self) -> Result<()> {
        if self.host_network {
            bail!(
                "pod {} uses the node's network namespace (hostNetwork): it has no pod interface to trace",
                self.display_name()
            );
        }
        if self.state != "ready" && self.container.is_none() {
            bail!(
                "pod {} (sandbox {}) is not ready: its network is torn down",
                self.display_name(),
                short(&self.id)
            );
        }
        Ok(())
    }

    /// The runtime's network namespace: the node's.
    pub fn runtime_netns(&self) -> Option<PathBuf> {
        let p = PathBuf::from(format!("/proc/{}/ns/net", self.runtime_pid?));
        p.exists().then_some(p)
    }
}

/// A 12-character ID, as crictl prints them.
pub fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

fn state_name(state: i32) -> String {
    match api::PodSandboxState::try_from(state) {
        Ok(api::PodSandboxState::SandboxReady) => "ready".into(),
        Ok(api::PodSandboxState::SandboxNotready) => "notready".into(),
        Err(_) => format!("state {state}"),
    }
}

fn sandbox_names(
    metadata: Option<&api::PodSandboxMetadata>,
    labels: &std::collections::HashMap<String, String>,
) -> (String, String, String) {
    let pick = |meta: Option<&str>, label: &str| {
        meta.filter(|s| !s.is_empty())
            .map(str::to_owned)
            .or_else(|| labels.get(label).cloned())
            .unwrap_or_default()
    };
    (
        pick(metadata.map(|m| m.name.as_str()), LABEL_POD_NAME),
        pick(metadata.map(|m| m.namespace.as_str()), LABEL_POD_NAMESPACE),
        metadata.map(|m| m.uid.clone()).unwrap_or_default(),
    )
}

/// Whether a sandbox is the pod `namespace/name`: by its metadata or the kubelet's labels.
fn matches_name(s: &api::PodSandbox, namespace: Option<&str>, name: &str) -> bool {
    let meta = s.metadata.as_ref();
    let name_ok = meta.is_some_and(|m| m.name == name)
        || s.labels.get(LABEL_POD_NAME).is_some_and(|n| n == name);
    let ns_ok = namespace.is_none_or(|ns| {
        meta.is_some_and(|m| m.namespace == ns)
            || s.labels.get(LABEL_POD_NAMESPACE).is_some_and(|n| n == ns)
    });
    name_ok && ns_ok
}

/// The full description of sandbox `id`.
async fn pod_of(client: &mut Client, id: &str) -> Result<CriPod> {
    let (status, info) = client.sandbox_status(id).await?;
    let (name, namespace, uid) = sandbox_names(status.metadata.as_ref(), &status.labels);
    let network = status.network.as_ref();
    let ip = network
        .into_iter()
        .flat_map(|n| {
            std::iter::once(n.ip.as_str()).chain(n.additional_ips.iter().map(|i| i.ip.as_str()))
        })
        .find_map(|s| s.parse::<Ipv4Addr>().ok());
    let host_network = status
        .linux
        .as_ref()
        .and_then(|l| l.namespaces.as_ref())
        .and_then(|n| n.options.as_ref())
        .is_some_and(|o| o.network == api::NamespaceMode::Node as i32);
    Ok(CriPod {
        id: status.id.clone(),
        name,
        namespace,
        uid,
        state: state_name(status.state),
        netns: info.netns,
        pid: info.pid,
        container_pid: None,
        ip,
        host_network,
        container: None,
        endpoint: client.endpoint().clone(),
        runtime: client.version().clone(),
        runtime_pid: client.peer_pid(),
    })
}

/// The pods called `name` (in `namespace` when given), ready ones only unless none is ready.
pub async fn pods_named(
    client: &mut Client,
    namespace: Option<&str>,
    name: &str,
) -> Result<Vec<CriPod>> {
    let ids: Vec<String> = client
        .list_sandboxes()
        .await?
        .into_iter()
        .filter(|s| matches_name(s, namespace, name))
        .map(|s| s.id)
        .collect();
    let mut pods = Vec::new();
    for id in ids {
        pods.push(pod_of(client, &id).await?);
    }
    prefer_ready(&mut pods);
    Ok(pods)
}

/// Keeps the ready sandboxes when there are any: a restarted pod leaves its old, not-ready
/// sandboxes behind.
fn prefer_ready(pods: &mut Vec<CriPod>) {
    if pods.iter().any(|p| p.state == "ready") {
        pods.retain(|p| p.state == "ready");
    }
}

/// The containers whose ID starts with `prefix` (as crictl accepts), each with its pod; when
/// no container matches, the pod sandboxes whose ID does.
pub async fn by_id_prefix(client: &mut Client, prefix: &str) -> Result<Vec<CriPod>> {
    if prefix.is_empty() {
        bail!("--container needs an ID (or a prefix of one)");
    }
    let containers: Vec<api::Container> = client
        .list_containers()
        .await?
        .into_iter()
        .filter(|c| c.id.starts_with(prefix))
        .collect();
    let mut out = Vec::new();
    for c in containers {
        let (status, info) = client.container_status(&c.id).await?;
        let mut pod = pod_of(client, &c.pod_sandbox_id).await?;
        let cname = status
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let running = status.state == api::ContainerState::ContainerRunning as i32;
        if !running {
            pod.state = api::ContainerState::try_from(status.state)
                .map(|s| {
                    s.as_str_name()
                        .trim_start_matches("CONTAINER_")
                        .to_lowercase()
                })
                .unwrap_or_else(|_| format!("state {}", status.state));
        } else {
            pod.state = "running".into();
        }
        // A CRI container shares its sandbox's network namespace: the sandbox's path and
        // pid are kept, the container's pid is one more way in.
        pod.container_pid = info.pid;
        pod.container = Some((c.id.clone(), cname));
        out.push(pod);
    }
    if out.is_empty() {
        let ids: Vec<String> = client
            .list_sandboxes()
            .await?
            .into_iter()
            .filter(|s| s.id.starts_with(prefix))
            .map(|s| s.id)
            .collect();
        for id in ids {
            out.push(pod_of(client, &id).await?);
        }
    }
    Ok(out)
}

/// The ready pod whose IP is `ip`, if the runtime has one.
pub async fn pod_with_ip(client: &mut Client, ip: Ipv4Addr) -> Result<Option<CriPod>> {
    Ok(ready_pods(client)
        .await?
        .into_iter()
        .find(|p| p.ip == Some(ip) && !p.host_network))
}

/// Every ready pod sandbox of the runtime, described.
pub async fn ready_pods(client: &mut Client) -> Result<Vec<CriPod>> {
    let ready: Vec<String> = client
        .list_sandboxes()
        .await?
        .into_iter()
        .filter(|s| s.state == api::PodSandboxState::SandboxReady as i32)
        .map(|s| s.id)
        .collect();
    let mut out = Vec::new();
    for id in ready {
        out.push(pod_of(client, &id).await?);
    }
    Ok(out)
}

/// Runs a CRI future to completion from synchronous code, on a thread of its own with a
/// current-thread tokio runtime (so it works inside or outside another runtime).
pub fn block_on<T, F>(fut: F) -> Result<T>
where
    F: Future<Output = Result<T>> + Send,
    T: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the CRI client's runtime")?
                .block_on(fut)
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(name: &str, ns: &str, labels: &[(&str, &str)]) -> api::PodSandbox {
        api::PodSandbox {
            id: "0123456789abcdef".into(),
            metadata: Some(api::PodSandboxMetadata {
                name: name.into(),
                uid: "u".into(),
                namespace: ns.into(),
                attempt: 0,
            }),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn names_match_metadata_or_labels() {
        let s = sandbox("web-0", "shop", &[]);
        assert!(matches_name(&s, None, "web-0"));
        assert!(matches_name(&s, Some("shop"), "web-0"));
        assert!(!matches_name(&s, Some("default"), "web-0"));
        assert!(!matches_name(&s, None, "web"));
        let labelled = sandbox(
            "",
            "",
            &[(LABEL_POD_NAME, "api-1"), (LABEL_POD_NAMESPACE, "prod")],
        );
        assert!(matches_name(&labelled, Some("prod"), "api-1"));
        assert!(!matches_name(&labelled, Some("dev"), "api-1"));
        let (name, ns, _) = sandbox_names(labelled.metadata.as_ref(), &labelled.labels);
        assert_eq!((name.as_str(), ns.as_str()), ("api-1", "prod"));
    }

    #[test]
    fn explicit_endpoint_wins() {
        assert_eq!(
            discover(Some("unix:///tmp/x.sock")).unwrap(),
            Endpoints::Given(Endpoint::from_path("/tmp/x.sock"))
        );
        assert!(discover(Some("tcp://1.2.3.4:5")).is_err());
    }

    #[test]
    fn short_ids() {
        assert_eq!(short("0123456789abcdef"), "0123456789ab");
        assert_eq!(short("abc"), "abc");
    }
}
