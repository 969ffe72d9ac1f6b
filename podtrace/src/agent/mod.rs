//! `podtrace agent`: one per node (a DaemonSet pod with the host's network and PID namespaces,
//! or a lab node's process). It serves the versioned gRPC API of
//! proto/podtrace/agent/v1/agent.proto: node info, the node's half of a pod's path, and
//! tracing sessions confined to the node, streamed to a front end that merges the nodes.
//!
//! - [`wire`]: the generated code, the API version, payloads.
//! - [`boundary`]: which namespaces are this node's.
//! - [`service`]: the service itself, its limits and sessions.
//!
//! It only observes: it changes nothing but its own probes. It listens on a unix socket
//! (0600, root) by default; TCP only with authentication (mutual TLS or a token file). A client
//! that goes away ends its session, and SIGTERM detaches everything before the agent exits.
pub mod boundary;
pub mod service;
pub mod wire;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use tokio::sync::watch;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::parse::parse_duration;
use service::{AgentService, Limits};

/// How the agent makes its pod resolvers: (lab prefix, runtime endpoint) → chain.
pub type MakeChain = Arc<dyn Fn(Option<&str>, Option<&str>) -> crate::pods::Chain + Send + Sync>;
use wire::pb::agent_server::AgentServer;

/// Where the agent listens by default.
pub const DEFAULT_SOCKET: &str = "/run/podtrace/agent.sock";

#[derive(clap::Args, Debug, Clone)]
pub struct AgentArgs {
    /// Where to listen: unix:PATH (0600) or tcp:ADDR:PORT (needs --tls-* or --token-file).
    /// Repeat for both. Default: unix:/run/podtrace/agent.sock.
    #[arg(long, value_name = "unix:PATH|tcp:ADDR:PORT")]
    pub listen: Vec<String>,
    /// The node's name, as the cluster calls it (default: $NODE_NAME, else the hostname).
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
    /// TCP with mutual TLS: this agent's certificate (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_client_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The CA clients' certificates must be signed by (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// TCP with a bearer token: the file holding it (clients send `authorization: Bearer …`).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Sessions that may run at once.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub max_sessions: u32,
    /// The longest a session may run.
    #[arg(long, value_name = "DUR", value_parser = parse_duration, default_value = "1h")]
    pub max_duration: Duration,
    /// Packet bytes a session may stream (capture), in MB.
    #[arg(long, value_name = "MB", default_value_t = 1024)]
    pub max_mb: u64,
    /// The container runtime's CRI socket (as crictl's).
    #[arg(long, value_name = "SOCK")]
    pub runtime_endpoint: Option<String>,
    /// Serve this lab's pods (an agent of `podtrace lab up --agents`).
    #[arg(long, value_name = "PREFIX")]
    pub lab: Option<String>,
}

/// A listening address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl Listen {
    /// `unix:PATH` or `tcp:ADDR:PORT`.
    pub fn parse(s: &str) -> Result<Self> {
        if let Some(p) = s.strip_prefix("unix:") {
            let p = p.trim_start_matches("//");
            if !p.starts_with('/') {
                bail!("{s:?}: the socket path must be absolute");
            }
            return Ok(Listen::Unix(PathBuf::from(p)));
        }
        if let Some(a) = s.strip_prefix("tcp:") {
            let a = a.trim_start_matches("//");
            return Ok(Listen::Tcp(a.parse().with_context(|| {
                format!("{s:?}: expected tcp:ADDR:PORT with an IP address")
            })?));
        }
        bail!("{s:?}: expected unix:PATH or tcp:ADDR:PORT")
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
            Listen::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// The node's name: --node, $NODE_NAME (the DaemonSet's downward API), the hostname.
fn node_name(args: &AgentArgs) -> String {
    args.node
        .clone()
        .or_else(|| std::env::var("NODE_NAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(crate::pods::hostname)
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading the {what} {}", path.display()))
}

/// Runs the agent; `make_chain(lab, runtime_endpoint)` gives the resolvers it finds pods with
/// (the command line's: lab registry, CRI, pid, netns).
pub fn run(args: AgentArgs, make_chain: MakeChain) -> Result<ExitCode> {
    crate::resident::one_heap();
    // clsact filters a killed agent (or any podtrace) left together with its guard (a whole
    // container killed): removed now, not at the next session.
    match crate::probes::clsact::cleanup_stale() {
        Ok(Some(line)) => eprintln!("podtrace agent: {line}"),
        Ok(None) => {}
        Err(e) => eprintln!("podtrace agent: cleaning up after a killed podtrace: {e:#}"),
    }
    let listens: Vec<Listen> = if args.listen.is_empty() {
        vec![Listen::Unix(PathBuf::from(DEFAULT_SOCKET))]
    } else {
        args.listen
            .iter()
            .map(|s| Listen::parse(s))
            .collect::<Result<_>>()?
    };
    let tls = match (&args.tls_cert, &args.tls_key, &args.tls_client_ca) {
        (Some(c), Some(k), Some(ca)) => Some(
            ServerTlsConfig::new()
                .identity(Identity::from_pem(
                    read(c, "certificate")?,
                    read(k, "private key")?,
                ))
                .client_ca_root(Certificate::from_pem(read(ca, "client CA")?)),
        ),
        _ => None,
    };
    let token = match &args.token_file {
        Some(p) => {
            let t = String::from_utf8(read(p, "token file")?)
                .with_context(|| format!("{} is not text", p.display()))?
                .trim()
                .to_owned();
            if t.len() < 16 {
                bail!(
                    "the token in {} is too short (at least 16 characters)",
                    p.display()
                );
            }
            Some(t)
        }
        None => None,
    };
    if listens.iter().any(|l| matches!(l, Listen::Tcp(_))) && tls.is_none() && token.is_none() {
        bail!("listening on TCP needs authentication: --tls-cert/--tls-key/--tls-client-ca (mutual TLS) or --token-file");
    }
    let node = node_name(&args);
    let boundary = boundary::NodeBoundary::new(service::own_netns())?;
    let (lab, runtime) = (args.lab.clone(), args.runtime_endpoint.clone());
    let make_chain: service::MakeChain =
        Arc::new(move || make_chain(lab.as_deref(), runtime.as_deref()));
    let limits = Limits {
        max_sessions: args.max_sessions.max(1),
        max_duration: args.max_duration,
        max_bytes: args.max_mb.saturating_mul(1_000_000),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the agent's runtime")?;
    rt.block_on(serve(
        node, boundary, make_chain, limits, listens, tls, token,
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// Checks a bearer token on every call of a TCP listener.
#[derive(Clone)]
struct TokenCheck(Option<Arc<str>>);

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let Some(want) = &self.0 else {
            return Ok(req);
        };
        let got = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        // Constant time in the token's length.
        let same = got.len() == want.len()
            && got
                .bytes()
                .zip(want.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if same {
            Ok(req)
        } else {
            Err(tonic::Status::unauthenticated("wrong or missing token"))
        }
    }
}

async fn serve(
    node: String,
    boundary: boundary::NodeBoundary,
    make_chain: service::MakeChain,
    limits: Limits,
    listens: Vec<Listen>,
    tls: Option<ServerTlsConfig>,
    token: Option<String>,
) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let (stop_tx, stop_rx) = watch::channel(false);
    let svc = AgentService::new(node.clone(), boundary, make_chain, limits, stop_rx.clone());
    let mut servers = Vec::new();
    let mut sockets = Vec::new();
    for l in &listens {
        let mut shutdown = stop_rx.clone();
        let until = async move {
            let _ = shutdown.wait_for(|s| *s).await;
        };
        match l {
            Listen::Unix(path) => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                }
                match std::fs::remove_file(path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(e).with_context(|| format!("removing {}", path.display()))
                    }
                }
                let listener = tokio::net::UnixListener::bind(path)
                    .with_context(|| format!("listening on {}", path.display()))?;
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                    .with_context(|| format!("chmod 0600 {}", path.display()))?;
                sockets.push(path.clone());
                let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
                let server = Server::builder()
                    .add_service(AgentServer::new(svc.clone()))
                    .serve_with_incoming_shutdown(incoming, until);
                servers.push(tokio::spawn(server));
            }
            Listen::Tcp(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("listening on {addr}"))?;
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                let mut builder = Server::builder();
                if let Some(t) = &tls {
                    builder = builder.tls_config(t.clone()).context("configuring TLS")?;
                }
                let check = TokenCheck(token.as_deref().map(Arc::from));
                let server = builder
                    .add_service(AgentServer::with_interceptor(svc.clone(), check))
                    .serve_with_incoming_shutdown(incoming, until);
                servers.push(tokio::spawn(server));
            }
        }
    }
    eprintln!(
        "podtrace agent {} on node {node}: listening on {}",
        env!("CARGO_PKG_VERSION"),
        listens
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    // At rest from here: the servers' tasks have started; what start-up touched can go.
    tokio::spawn(async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        crate::resident::settle();
    });
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let why = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
    };
    eprintln!("podtrace agent on node {node}: {why}: ending every session");
    let _ = stop_tx.send(true);
    // Sessions detach their probes as they end.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while svc.running() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for s in servers {
        let _ = tokio::time::timeout(Duration::from_secs(5), s).await;
    }
    for p in sockets {
        let _ = std::fs::remove_file(p);
    }
    eprintln!("podtrace agent on node {node}: stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(
            Listen::parse("unix:/run/x.sock").unwrap(),
            Listen::Unix("/run/x.sock".into())
        );
        assert_eq!(
            Listen::parse("tcp:10.30.180.56:7070").unwrap(),
            Listen::Tcp("10.30.180.56:7070".parse().unwrap())
        );
        assert!(Listen::parse("unix:relative.sock").is_err());
        assert!(Listen::parse("tcp:node-a:7070").is_err());
        assert!(Listen::parse("http://x").is_err());
    }
}
