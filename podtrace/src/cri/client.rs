//! A CRI client: gRPC (tonic, the `k8s-cri` crate's generated `runtime.v1` client) over the
//! runtime's unix socket, plus the peer credentials of that socket (the runtime's pid).
//!
//! Every failure is turned into one line that names the endpoint: no socket, nothing
//! listening (the runtime is down), a socket that does not speak gRPC or does not serve CRI v1.
use std::{
    collections::HashMap,
    fmt,
    io::ErrorKind,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{anyhow, bail, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1 as api;
use serde_json::Value;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Uri};

use api::{image_service_client::ImageServiceClient, runtime_service_client::RuntimeServiceClient};

/// How long connecting to the socket may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one CRI call may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the first call (`Version`) may take: a socket that is not CRI often never answers.
const VERSION_TIMEOUT: Duration = Duration::from_secs(5);

/// A CRI endpoint: a unix socket, written `unix:///run/containerd/containerd.sock` or as a
/// plain path (crictl accepts both).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    path: PathBuf,
}

impl Endpoint {
    /// Parses `unix:///PATH`, `unix://PATH` or `/PATH`. Other schemes (tcp://, npipe://) are
    /// refused: CRI runtimes on Linux listen on unix sockets.
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        let path = if let Some(rest) = s.strip_prefix("unix://") {
            rest
        } else if let Some((scheme, _)) = s.split_once("://") {
            bail!("runtime endpoint {s:?}: podtrace talks CRI over unix sockets only (unix:///PATH), not {scheme}://");
        } else {
            s
        };
        if path.is_empty() {
            bail!("runtime endpoint {s:?} names no socket (expected unix:///PATH or a path)");
        }
        let path = PathBuf::from(path);
        if !path.is_absolute() {
            bail!("runtime endpoint {s:?}: the socket path must be absolute");
        }
        Ok(Self { path })
    }

    pub fn from_path(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unix://{}", self.path.display())
    }
}

/// What the runtime says about itself (CRI `Version`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeVersion {
    /// `containerd`, `cri-o`, …
    pub name: String,
    pub version: String,
    /// The CRI API version it serves (`v1`).
    pub api_version: String,
}

/// What a verbose status's `info` says about the process behind a sandbox or container:
/// containerd puts `{"pid":N,"runtimeSpec":{...}}` under the key `info`, CRI-O too; a runtime
/// that spreads the keys over the map is read the same way.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessInfo {
    pub pid: Option<u32>,
    /// `runtimeSpec.linux.namespaces[type=network].path`.
    pub netns: Option<PathBuf>,
}

impl ProcessInfo {
    pub fn from_info(info: &HashMap<String, String>) -> Self {
        let mut doc = serde_json::Map::new();
        for (k, v) in info {
            match serde_json::from_str::<Value>(v) {
                Ok(Value::Object(m)) if k == "info" => doc.extend(m),
                Ok(v) => {
                    doc.insert(k.clone(), v);
                }
                Err(_) => {
                    doc.insert(k.clone(), Value::String(v.clone()));
                }
            }
        }
        let pid = doc
            .get("pid")
            .and_then(|p| p.as_u64().or_else(|| p.as_str()?.parse().ok()))
            .filter(|p| *p > 0)
            .and_then(|p| u32::try_from(p).ok());
        let netns = doc
            .get("runtimeSpec")
            .and_then(|s| s.pointer("/linux/namespaces"))
            .and_then(Value::as_array)
            .and_then(|nss| {
                nss.iter()
                    .find(|ns| ns.get("type").and_then(Value::as_str) == Some("network"))
            })
            .and_then(|ns| ns.get("path").and_then(Value::as_str))
            .filter(|p| !p.is_empty())
            .map(PathBuf::from);
        Self { pid, netns }
    }
}

/// A connected CRI runtime.
pub struct Client {
    endpoint: Endpoint,
    channel: Channel,
    runtime: RuntimeServiceClient<Channel>,
    version: RuntimeVersion,
    peer_pid: Option<u32>,
}

impl Client {
    /// Connects to `endpoint` and checks that it serves CRI v1 (a `Version` call).
    pub async fn connect(endpoint: &Endpoint) -> Result<Self> {
        let path = endpoint.path.clone();
        {
            use std::os::unix::fs::FileTypeExt as _;
            if let Ok(meta) = std::fs::metadata(&path) {
                if !meta.file_type().is_socket() {
                    bail!("container runtime {endpoint}: not a unix socket");
                }
            }
        }
        // A first plain connection: the clearest errors (no socket, nobody listening) and the
        // runtime's pid from the socket's peer credentials (SO_PEERCRED).
        let probe = match tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(&path)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => bail!("{}", connect_error(endpoint, &e)),
            Err(_) => bail!(
                "container runtime {endpoint}: connecting took longer than {}s",
                CONNECT_TIMEOUT.as_secs()
            ),
        };
        let peer_pid = probe
            .peer_cred()
            .ok()
            .and_then(|c| c.pid())
            .filter(|p| *p > 0)
            .and_then(|p| u32::try_from(p).ok());
        drop(probe);

        let channel =
            tonic::transport::Endpoint::from_static("http://cri.sock")
                .connect_timeout(CONNECT_TIMEOUT)
                .timeout(REQUEST_TIMEOUT)
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                    }
                }))
                .await
                .map_err(|e| {
                    anyhow!(
                        "container runtime {endpoint}: no gRPC connection: {}",
                        error_chain(&e)
                    )
                })?;
        let mut runtime = RuntimeServiceClient::new(channel.clone());
        let version = match tokio::time::timeout(
            VERSION_TIMEOUT,
            runtime.version(api::VersionRequest {
                version: "v1".into(),
            }),
        )
        .await
        {
            Err(_) => bail!(
                "{endpoint} is not a working CRI socket: no answer to a CRI Version request within {}s",
                VERSION_TIMEOUT.as_secs()
            ),
            Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => bail!(
                "{endpoint} speaks gRPC but does not serve CRI v1 (runtime.v1.RuntimeService): {}",
                one_line(status.message())
            ),
            Ok(Err(status)) => bail!(
                "{endpoint} is not a working CRI socket: Version failed: {}",
                status_line(&status)
            ),
            Ok(Ok(r)) => r.into_inner(),
        };
        Ok(Self {
            endpoint: endpoint.clone(),
            channel,
            runtime,
            version: RuntimeVersion {
                name: version.runtime_name,
                version: version.runtime_version,
                api_version: version.runtime_api_version,
            },
            peer_pid,
        })
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    pub fn version(&self) -> &RuntimeVersion {
        &self.version
    }

    /// The pid of the process that owns the socket (the runtime), from SO_PEERCRED; `None`
    /// when it lives in a pid namespace podtrace cannot see.
    pub fn peer_pid(&self) -> Option<u32> {
        self.peer_pid
    }

    /// The generated CRI client, for calls this module does not wrap.
    pub fn runtime(&mut self) -> &mut RuntimeServiceClient<Channel> {
        &mut self.runtime
    }

    /// The runtime's image service, on the same connection.
    pub fn images(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(self.channel.clone())
    }

    /// Every pod sandbox the runtime knows (ready or not).
    pub async fn list_sandboxes(&mut self) -> Result<Vec<api::PodSandbox>> {
        let r = self
            .runtime
            .list_pod_sandbox(api::ListPodSandboxRequest { filter: None })
            .await
            .map_err(|s| self.call_error("ListPodSandbox", &s))?;
        Ok(r.into_inner().items)
    }

    /// A sandbox's status, verbose, and what its `info` says about its process.
    pub async fn sandbox_status(
        &mut self,
        id: &str,
    ) -> Result<(api::PodSandboxStatus, ProcessInfo)> {
        let r = self
            .runtime
            .pod_sandbox_status(api::PodSandboxStatusRequest {
                pod_sandbox_id: id.to_owned(),
                verbose: true,
            })
            .await
            .map_err(|s| self.call_error("PodSandboxStatus", &s))?
            .into_inner();
        let status = r
            .status
            .ok_or_else(|| anyhow!("{}: PodSandboxStatus({id}) has no status", self.endpoint))?;
        Ok((status, ProcessInfo::from_info(&r.info)))
    }

    /// Every container the runtime knows (running or not).
    pub async fn list_containers(&mut self) -> Result<Vec<api::Container>> {
        let r = self
            .runtime
            .list_containers(api::ListContainersRequest { filter: None })
            .await
            .map_err(|s| self.call_error("ListContainers", &s))?;
        Ok(r.into_inner().containers)
    }

    /// A container's status, verbose, and what its `info` says about its process.
    pub async fn container_status(
        &mut self,
        id: &str,
    ) -> Result<(api::ContainerStatus, ProcessInfo)> {
        let r = self
            .runtime
            .container_status(api::ContainerStatusRequest {
                container_id: id.to_owned(),
                verbose: true,
            })
            .await
            .map_err(|s| self.call_error("ContainerStatus", &s))?
            .into_inner();
        let status = r
            .status
            .ok_or_else(|| anyhow!("{}: ContainerStatus({id}) has no status", self.endpoint))?;
        Ok((status, ProcessInfo::from_info(&r.info)))
    }

    fn call_error(&self, call: &str, status: &tonic::Status) -> anyhow::Error {
        anyhow!(
            "container runtime {}: {call} failed: {}",
            self.endpoint,
            status_line(status)
        )
    }
}

fn connect_error(endpoint: &Endpoint, e: &std::io::Error) -> String {
    match e.kind() {
        ErrorKind::NotFound => format!("container runtime {endpoint}: no such socket"),
        ErrorKind::ConnectionRefused => format!(
            "container runtime {endpoint}: nothing listens on the socket (is the runtime running?)"
        ),
        ErrorKind::PermissionDenied => {
            format!("container runtime {endpoint}: permission denied")
        }
        _ if e.raw_os_error() == Some(libc::ENOTSOCK) => {
            format!("container runtime {endpoint}: not a unix socket")
        }
        _ => format!("container runtime {endpoint}: {e}"),
    }
}

/// `CODE: message[: cause]`, on one line.
fn status_line(status: &tonic::Status) -> String {
    use std::error::Error as _;
    let mut msg = one_line(status.message());
    if let Some(src) = status.source() {
        let cause = error_chain(src);
        if cause.starts_with(&msg) {
            msg = cause;
        } else if !msg.contains(&cause) {
            msg = if msg.is_empty() {
                cause
            } else {
                format!("{msg}: {cause}")
            };
        }
    }
    if msg.is_empty() {
        format!("{:?}", status.code())
    } else {
        format!("{:?}: {msg}", status.code())
    }
}

/// An error and its sources, `: `-joined, on one line.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = s.source();
    }
    one_line(&parts.join(": "))
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_as_crictl_writes_them() {
        assert_eq!(
            Endpoint::parse("unix:///run/containerd/containerd.sock")
                .unwrap()
                .path(),
            Path::new("/run/containerd/containerd.sock")
        );
        assert_eq!(
            Endpoint::parse("/var/run/crio/crio.sock").unwrap().path(),
            Path::new("/var/run/crio/crio.sock")
        );
        assert_eq!(
            Endpoint::parse("/var/run/crio/crio.sock")
                .unwrap()
                .to_string(),
            "unix:///var/run/crio/crio.sock"
        );
        assert!(Endpoint::parse("tcp://10.0.0.1:1234").is_err());
        assert!(Endpoint::parse("unix://").is_err());
        assert!(Endpoint::parse("relative.sock").is_err());
    }

    #[test]
    fn containerd_info_gives_pid_and_netns() {
        let info = HashMap::from([(
            "info".to_owned(),
            r#"{"pid":4242,"runtimeSpec":{"linux":{"namespaces":[{"type":"pid"},
               {"type":"network","path":"/var/run/netns/cni-1234"},{"type":"ipc"}]}}}"#
                .to_owned(),
        )]);
        assert_eq!(
            ProcessInfo::from_info(&info),
            ProcessInfo {
                pid: Some(4242),
                netns: Some(PathBuf::from("/var/run/netns/cni-1234")),
            }
        );
    }

    #[test]
    fn spread_info_keys_are_read_too() {
        let info = HashMap::from([
            ("pid".to_owned(), "77".to_owned()),
            (
                "runtimeSpec".to_owned(),
                r#"{"linux":{"namespaces":[{"type":"network"}]}}"#.to_owned(),
            ),
        ]);
        assert_eq!(
            ProcessInfo::from_info(&info),
            ProcessInfo {
                pid: Some(77),
                netns: None
            }
        );
        assert_eq!(
            ProcessInfo::from_info(&HashMap::new()),
            ProcessInfo::default()
        );
    }
}
