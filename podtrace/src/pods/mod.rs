//! Finding pods: from how the user names a pod ([`PodRef`]) to where its network lives
//! ([`PodLocation`]), through a chain of [`Resolver`]s — the lab's registry, the container
//! runtime (CRI), a process id, a namespace path. The chain is assembled by the command line
//! ([`crate::cli::PodArgs::resolvers`]); nothing here is global.
pub mod cri;
pub mod node;
pub mod process;

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{bail, Result};

/// How the user named the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodRef {
    /// `NAME` or `NAMESPACE/NAME`.
    Name {
        namespace: Option<String>,
        name: String,
    },
    Pid(u32),
    /// A path, or a name in /run/netns.
    Netns(String),
    /// `--container ID`: a container (or pod sandbox) ID or a unique prefix of one, found
    /// through CRI.
    Container(String),
}

impl PodRef {
    /// Parses the positional `POD` (`NAME` or `NAMESPACE/NAME`).
    pub fn parse_name(s: &str) -> Result<Self> {
        let (namespace, name) = match s.split_once('/') {
            Some((ns, name)) => (Some(ns.to_owned()), name.to_owned()),
            None => (None, s.to_owned()),
        };
        if name.is_empty() || namespace.as_deref() == Some("") || name.contains('/') {
            bail!("invalid pod name {s:?} (expected NAME or NAMESPACE/NAME)");
        }
        Ok(Self::Name { namespace, name })
    }

    /// How the user wrote it, for messages.
    pub fn shown(&self) -> String {
        match self {
            PodRef::Name {
                namespace: Some(ns),
                name,
            } => format!("pod {ns}/{name}"),
            PodRef::Name { name, .. } => format!("pod {name}"),
            PodRef::Pid(p) => format!("pid {p}"),
            PodRef::Netns(n) => format!("network namespace {n}"),
            PodRef::Container(c) => format!("container {c}"),
        }
    }
}

/// Where a pod's network lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodLocation {
    pub name: String,
    pub namespace: String,
    /// The pod's network namespace, as podtrace opens it.
    pub netns: PathBuf,
    /// The node's name (a lab node, the runtime's node, or this machine's hostname).
    pub node: String,
    /// The node's namespace; `None` when it is not known yet (found from the veth peer).
    pub node_netns: Option<PathBuf>,
    /// Where the pod was found: `lab:PREFIX`, `cri:unix:///SOCKET`, `pid`, `netns`.
    pub source: String,
    /// How its namespace was entered (the runtime's path, or the sandbox's pid when that path
    /// is not visible here), for `topo`'s evidence.
    pub entered_by: Option<String>,
    /// Why the node has its name ([`node`]'s rules), when a rule named it.
    pub node_named_by: Option<String>,
}

/// What a resolver made of a pod reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Found(PodLocation),
    /// Searched, not there: what was searched (for the "not found" message).
    Missing(String),
    /// Not a reference this resolver handles.
    NotMine,
}

/// One way of finding pods.
pub trait Resolver {
    /// The pod `pod` names, if this resolver knows it. `Err`: it is here but cannot be used
    /// (its namespace is gone, the name is ambiguous), or the search itself failed.
    fn find(&self, pod: &PodRef) -> Result<Lookup>;

    /// The pod with this address, for the destination of a path (podtrace observes both ends
    /// of a conversation when it can).
    fn by_ip(&self, _ip: Ipv4Addr) -> Option<PodLocation> {
        None
    }

    /// A better name for a pod known only by its namespace (a `--pid` or `--netns` pod).
    fn identify(&self, _netns: &Path) -> Option<PodLocation> {
        None
    }

    /// The node whose namespace is `ns`: (name, its namespace's path).
    fn node_of(&self, _ns: &Path) -> Option<(String, PathBuf)> {
        None
    }
}

/// The resolvers a command consults, in order.
#[derive(Default)]
pub struct Chain {
    resolvers: Vec<Box<dyn Resolver>>,
}

impl Chain {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with(mut self, r: impl Resolver + 'static) -> Self {
        self.resolvers.push(Box::new(r));
        self
    }

    /// Finds a pod: the first resolver that knows it wins; a pod given by pid or namespace is
    /// then named by whoever recognises its namespace.
    pub fn locate(&self, pod: &PodRef) -> Result<PodLocation> {
        match self.lookup(pod)? {
            Ok(loc) => Ok(loc),
            Err(not_found) => bail!("{not_found}"),
        }
    }

    /// As [`Chain::locate`], telling "not found" (`Ok(Err(what was searched))`) from a failure.
    pub fn lookup(&self, pod: &PodRef) -> Result<std::result::Result<PodLocation, String>> {
        let mut searched = Vec::new();
        for r in &self.resolvers {
            match r.find(pod)? {
                Lookup::Found(mut loc) => {
                    if matches!(pod, PodRef::Pid(_) | PodRef::Netns(_)) {
                        if let Some(named) = self.identify(&loc.netns) {
                            loc = PodLocation {
                                netns: loc.netns,
                                source: loc.source,
                                entered_by: loc.entered_by,
                                ..named
                            };
                        }
                    }
                    if let Some((node, ns)) =
                        loc.node_netns.as_deref().and_then(|ns| self.node_of(ns))
                    {
                        loc.node = node;
                        loc.node_netns = Some(ns);
                        loc.node_named_by = None;
                    }
                    return Ok(Ok(loc));
                }
                Lookup::Missing(what) => searched.push(what),
                Lookup::NotMine => {}
            }
        }
        Ok(Err(match searched.as_slice() {
            [] => format!("{} not found: nothing to search", pod.shown()),
            s => format!("{} not found ({})", pod.shown(), s.join("; ")),
        }))
    }

    /// The pod with address `ip` that a resolver knows.
    pub fn by_ip(&self, ip: Ipv4Addr) -> Option<PodLocation> {
        self.resolvers.iter().find_map(|r| r.by_ip(ip))
    }

    fn identify(&self, netns: &Path) -> Option<PodLocation> {
        self.resolvers.iter().find_map(|r| r.identify(netns))
    }

    /// The node whose namespace is `ns`, if a resolver knows it.
    pub fn node_of(&self, ns: &Path) -> Option<(String, PathBuf)> {
        self.resolvers.iter().find_map(|r| r.node_of(ns))
    }
}

/// This machine's name.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "node".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pod_names() {
        assert_eq!(
            PodRef::parse_name("pod-a1").unwrap(),
            PodRef::Name {
                namespace: None,
                name: "pod-a1".into()
            }
        );
        assert_eq!(
            PodRef::parse_name("kube-system/coredns-1").unwrap(),
            PodRef::Name {
                namespace: Some("kube-system".into()),
                name: "coredns-1".into()
            }
        );
        assert!(PodRef::parse_name("a/b/c").is_err());
        assert!(PodRef::parse_name("/x").is_err());
        assert!(PodRef::parse_name("x/").is_err());
    }

    struct Fixed(&'static str, Option<PodLocation>);

    impl Resolver for Fixed {
        fn find(&self, _: &PodRef) -> Result<Lookup> {
            Ok(match &self.1 {
                Some(l) => Lookup::Found(l.clone()),
                None => Lookup::Missing(self.0.into()),
            })
        }
        fn identify(&self, _: &Path) -> Option<PodLocation> {
            // Only the lab names namespaces in these tests.
            self.1.clone().filter(|_| self.0.starts_with("lab"))
        }
    }

    fn loc(name: &str, source: &str) -> PodLocation {
        PodLocation {
            name: name.into(),
            namespace: "default".into(),
            netns: PathBuf::from(format!("/run/netns/{name}")),
            node: "n".into(),
            node_netns: None,
            source: source.into(),
            entered_by: None,
            node_named_by: None,
        }
    }

    #[test]
    fn the_first_resolver_that_knows_wins_and_misses_are_named() {
        let chain = Chain::new()
            .with(Fixed("lab pt-", None))
            .with(Fixed("cri a", Some(loc("web", "cri:a"))));
        assert_eq!(chain.locate(&PodRef::Pid(1)).unwrap().source, "cri:a");
        let none = Chain::new()
            .with(Fixed("lab pt-", None))
            .with(Fixed("cri a", None));
        let e = none
            .locate(&PodRef::parse_name("web").unwrap())
            .unwrap_err();
        assert_eq!(e.to_string(), "pod web not found (lab pt-; cri a)");
    }

    #[test]
    fn a_pid_pod_takes_the_name_its_namespace_has_elsewhere() {
        let chain = Chain::new()
            .with(Fixed("pid", Some(loc("pid-7-sleep", "pid"))))
            .with(Fixed("lab", Some(loc("pod-a1", "lab:pt-"))));
        let l = chain.locate(&PodRef::Pid(7)).unwrap();
        assert_eq!((l.name.as_str(), l.source.as_str()), ("pod-a1", "pid"));
        assert_eq!(l.netns, PathBuf::from("/run/netns/pid-7-sleep"));
    }
}
