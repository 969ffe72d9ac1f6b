//! Reaching an agent: its endpoint (a unix socket, or TCP with mutual TLS or a token), from
//! this namespace or from another one (the lab's client host on the underlay, as a laptop
//! would be), or through a stream someone else opens (`kubectl podtrace`: the API server's
//! port-forward to the agent's pod), and the client it gives.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _, Result};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tonic::{
    service::interceptor::InterceptedService,
    transport::{Certificate, Channel, ClientTlsConfig, Identity, Uri},
};

use crate::agent::wire::pb::agent_client::AgentClient;

/// How long connecting may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// An agent's address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Endpoint {
    /// `unix:PATH`.
    Unix(PathBuf),
    /// `tcp:ADDR:PORT`.
    Tcp(SocketAddr),
    /// A port of a pod, through the Kubernetes API server's port-forward (`kubectl podtrace`;
    /// the stream comes from the config's [`Dialer`]).
    PortForward {
        namespace: String,
        pod: String,
        port: u16,
    },
}

impl Endpoint {
    /// `unix:PATH` or `tcp:ADDR:PORT` (as `podtrace agent --listen` takes them).
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match crate::agent::Listen::parse(s)? {
            crate::agent::Listen::Unix(p) => Endpoint::Unix(p),
            crate::agent::Listen::Tcp(a) => Endpoint::Tcp(a),
        })
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
            Endpoint::PortForward {
                namespace,
                pod,
                port,
            } => write!(f, "portforward:{namespace}/{pod}:{port}"),
        }
    }
}

/// Anything a connection can run over.
pub trait Duplex: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Duplex for T {}

/// A stream opened by a [`Dialer`].
pub type Dialed = Box<dyn Duplex>;

/// Opens the stream to an agent whose endpoint this process cannot dial itself
/// ([`Endpoint::PortForward`]): one call per connection.
#[derive(Clone)]
#[allow(clippy::type_complexity)]
pub struct Dialer(
    pub  Arc<
        dyn Fn(&AgentSpec) -> futures::future::BoxFuture<'static, std::io::Result<Dialed>>
            + Send
            + Sync,
    >,
);

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Dialer")
    }
}

/// Dialers are code: any two are alike as far as a configuration is concerned.
impl PartialEq for Dialer {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for Dialer {}

/// One node's agent, as the front end is told to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentSpec {
    pub node: String,
    pub endpoint: Endpoint,
    /// Connect from this network namespace (the lab's client host); default: podtrace's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via_netns: Option<PathBuf>,
}

/// How the front end proves who it is, and checks who the agents are.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    /// The CA the agents' certificates are signed by (TLS when given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// The client's certificate and key (mutual TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// A file holding the bearer token the agents expect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// The token itself (`kubectl podtrace` reads it from the cluster; never written out).
    #[serde(skip)]
    pub token: Option<String>,
}

/// Adds the bearer token to every call (nothing when there is none).
#[derive(Clone)]
pub struct Token(Option<Arc<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>>);

impl tonic::service::Interceptor for Token {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert("authorization", (**t).clone());
        }
        Ok(req)
    }
}

/// A connected agent's client.
pub type Client = AgentClient<InterceptedService<Channel, Token>>;

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading the {what} {}", path.display()))
}

/// A TCP stream to `addr` opened from inside the namespace at `netns` (the socket stays in
/// that namespace).
fn tcp_in(netns: &Path, addr: SocketAddr) -> Result<std::net::TcpStream> {
    crate::netns::run_in(Some(netns), || {
        let s = std::net::TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
            .with_context(|| format!("connecting to {addr}"))?;
        s.set_nonblocking(true)?;
        Ok(s)
    })
}

/// Connects to one agent (through `dialer` for a port-forward endpoint). Errors are one line
/// naming the node and the endpoint.
pub async fn connect(
    spec: &AgentSpec,
    creds: &Credentials,
    dialer: Option<&Dialer>,
) -> Result<Client> {
    let node = spec.node.clone();
    let tls = creds.ca.is_some() || creds.cert.is_some();
    let uri = format!(
        "{}://{}",
        if tls { "https" } else { "http" },
        node_host(&node)
    );
    let mut endpoint = tonic::transport::Endpoint::from_shared(uri)
        .map_err(|e| anyhow!("agent of node {node}: {e}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    if tls {
        if !matches!(spec.endpoint, Endpoint::Tcp(_)) {
            bail!(
                "agent of node {node}: TLS is for TCP endpoints, not {}",
                spec.endpoint
            );
        }
        let mut cfg = ClientTlsConfig::new().domain_name(node_host(&node));
        if let Some(ca) = &creds.ca {
            cfg = cfg.ca_certificate(Certificate::from_pem(read(ca, "agents' CA")?));
        }
        match (&creds.cert, &creds.key) {
            (Some(c), Some(k)) => {
                cfg = cfg.identity(Identity::from_pem(
                    read(c, "client certificate")?,
                    read(k, "client key")?,
                ))
            }
            (None, None) => {}
            _ => bail!("a client certificate needs its key, and a key its certificate"),
        }
        endpoint = endpoint
            .tls_config(cfg)
            .with_context(|| format!("agent of node {node}: TLS"))?;
    }
    let target = spec.endpoint.clone();
    let via = spec.via_netns.clone();
    let dial = match (&spec.endpoint, dialer) {
        (Endpoint::PortForward { .. }, Some(d)) => Some((d.clone(), spec.clone())),
        (Endpoint::PortForward { .. }, None) => {
            bail!("agent of node {node}: nothing can open {}", spec.endpoint)
        }
        _ => None,
    };
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let target = target.clone();
            let via = via.clone();
            let dial = dial.clone();
            async move {
                if let Some((d, spec)) = dial {
                    return Ok(TokioIo::new(Io::Dialed((d.0)(&spec).await?)));
                }
                match target {
                    Endpoint::Unix(p) => Ok::<_, std::io::Error>(TokioIo::new(Io::Unix(
                        tokio::net::UnixStream::connect(p).await?,
                    ))),
                    Endpoint::Tcp(addr) => {
                        let s = match via {
                            Some(ns) => {
                                let std = tokio::task::spawn_blocking(move || tcp_in(&ns, addr))
                                    .await
                                    .map_err(std::io::Error::other)?
                                    .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
                                tokio::net::TcpStream::from_std(std)?
                            }
                            None => tokio::net::TcpStream::connect(addr).await?,
                        };
                        s.set_nodelay(true)?;
                        Ok(TokioIo::new(Io::Tcp(s)))
                    }
                    Endpoint::PortForward { .. } => unreachable!("dialed above"),
                }
            }
        }))
        .await
        .map_err(|e| anyhow!("no connection: {}", chain(&e)))?;
    let token = match &creds.token_file {
        None if creds.token.is_some() => Some(Arc::new(
            format!(
                "Bearer {}",
                creds.token.as_deref().unwrap_or_default().trim()
            )
            .parse()
            .map_err(|_| anyhow!("the agents' token is not a valid header"))?,
        )),
        Some(p) => {
            let t = String::from_utf8(read(p, "token file")?)
                .with_context(|| format!("{} is not text", p.display()))?;
            Some(Arc::new(format!("Bearer {}", t.trim()).parse().map_err(
                |_| anyhow!("the token in {} is not a valid header", p.display()),
            )?))
        }
        None => None,
    };
    Ok(AgentClient::with_interceptor(channel, Token(token))
        .max_decoding_message_size(crate::agent::wire::MAX_PAYLOAD + 4096))
}

/// The host name an agent's certificate carries for its node: the node's name.
fn node_host(node: &str) -> String {
    // A node name is a DNS label (or several); anything else cannot be a URI host.
    node.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// An error with its causes, on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        cur = s.source();
    }
    out
}

/// A unix or TCP stream, or one a [`Dialer`] opened.
pub enum Io {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
    Dialed(Dialed),
}

impl tokio::io::AsyncRead for Io {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Unix(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Io::Tcp(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Io::Dialed(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Io {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Unix(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Io::Tcp(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Io::Dialed(s) => std::pin::Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Unix(s) => std::pin::Pin::new(s).poll_flush(cx),
            Io::Tcp(s) => std::pin::Pin::new(s).poll_flush(cx),
            Io::Dialed(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Unix(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Io::Tcp(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Io::Dialed(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}
