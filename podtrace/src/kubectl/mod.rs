//! `kubectl podtrace …`: the podtrace binary installed as `kubectl-podtrace` (or run as
//! `podtrace kubectl …`). It reads the kubeconfig as kubectl does, finds the pod and `--dst`
//! through the API server, finds the agents of the nodes involved (the DaemonSet's pods of
//! deploy/), reaches each through the API server's port-forward, and runs the same
//! `follow`/`capture`/`topo`/`verify eni` as the local commands through them: same output,
//! JSON, pcapng and exit codes. `deploy`/`undeploy` install and remove the agents.
//!
//! - [`api`]: the kubeconfig, lookups, the agents, the port-forward streams.
//! - [`deploy`]: the embedded manifests, applied and removed.
//! - [`demo`]: `podtrace demo --kubernetes`.
pub mod api;
pub mod demo;
pub mod deploy;

use std::{collections::BTreeSet, ffi::OsString, process::ExitCode};

use anyhow::{bail, Result};
use clap::Parser;

use crate::{
    capture::CaptureArgs,
    cli::{PodArgs, RemoteArgs},
    follow::FollowArgs,
    remote::{AgentsConfig, Credentials},
    topology::cmd::TopoArgs,
    verify::VerifyCommand,
};
use api::{Cluster, KubeArgs};

#[derive(Parser)]
#[command(
    name = "kubectl podtrace",
    bin_name = "kubectl podtrace",
    version,
    about = "podtrace through the Kubernetes API: follow, capture, topo and verify a pod's packets on every node of its path, through podtrace's node agents (kubectl podtrace deploy)"
)]
struct KubectlCli {
    #[command(flatten)]
    kube: KubeArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Resolve a pod's network path on its node (and --dst's node).
    Topo(TopoArgs),
    /// Follow a pod's packets to and from --dst hop by hop, on every node of the path.
    /// Exit 0 when the expected path is confirmed, 1 otherwise.
    Follow(FollowArgs),
    /// Capture the pod's packets on every hop (both nodes with --dst) to pcapng/pcap files.
    Capture(CaptureArgs),
    /// Checks with a verdict (exit 0 pass, 1 fail, 2 error).
    #[command(subcommand)]
    Verify(VerifyCommand),
    /// Install (or update) the node agents: namespace podtrace, its ServiceAccount, token
    /// and Roles, DaemonSet podtrace-agent; waits until every node's agent is ready.
    Deploy(deploy::DeployArgs),
    /// Remove what `deploy` installed.
    Undeploy(deploy::UndeployArgs),
}

/// Whether this process runs as the kubectl plugin (its name is `kubectl-podtrace…`).
pub fn invoked_as_plugin(argv0: &std::ffi::OsStr) -> bool {
    std::path::Path::new(argv0)
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("kubectl-podtrace"))
}

/// What kubectl's flags mean here but podtrace's parser would take otherwise: `--container
/// NAME` (a container of the pod, not a runtime's container id) and `--dst` (a pod or a
/// Service as well as an address). Taken out of `args` before they are parsed.
#[derive(Debug, Default, PartialEq, Eq)]
struct Taken {
    container: Option<String>,
    dst: Option<String>,
}

const PLACEHOLDER_DST: &str = "0.0.0.0";

fn take_flags(args: Vec<OsString>) -> Result<(Vec<OsString>, Taken)> {
    let mut out = Vec::with_capacity(args.len());
    let mut taken = Taken::default();
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy().into_owned();
        if s == "--" {
            out.push(a);
            out.extend(it.by_ref());
            break;
        }
        let (flag, inline) = match s.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (s.clone(), None),
        };
        let value = |it: &mut std::vec::IntoIter<OsString>| -> Result<String> {
            match &inline {
                Some(v) => Ok(v.clone()),
                None => match it.next() {
                    Some(v) => Ok(v.to_string_lossy().into_owned()),
                    None => bail!("{flag} needs a value"),
                },
            }
        };
        match flag.as_str() {
            "--container" => taken.container = Some(value(&mut it)?),
            "--dst" => {
                let v = value(&mut it)?;
                out.push("--dst".into());
                // An address goes through; a name is resolved through the API first.
                if v.parse::<std::net::Ipv4Addr>().is_ok() {
                    out.push(v.into());
                } else {
                    out.push(PLACEHOLDER_DST.into());
                    taken.dst = Some(v);
                }
            }
            _ => out.push(a),
        }
    }
    Ok((out, taken))
}

/// The command line: the local commands' flags that name things on a node (a pid, a
/// namespace path, a runtime socket, a lab, agents' addresses) are refused here, and hidden;
/// POD, --dst and --container say what they mean here.
fn command() -> clap::Command {
    use clap::CommandFactory as _;
    const NODE_ONLY: [&str; 10] = [
        "pid",
        "netns",
        "runtime_endpoint",
        "lab",
        "agents",
        "agents_config",
        "agent_ca",
        "agent_cert",
        "agent_key",
        "agent_token_file",
    ];
    let adjust = |mut c: clap::Command| {
        for a in NODE_ONLY.iter().chain(&["no_agents"]) {
            c = c.mut_arg(*a, |a| a.hide(true));
        }
        c = c.mut_arg("container", |a| {
            a.value_name("NAME")
                .help("A container of POD, by name (its id from the API finds it on the node)")
        });
        c.mut_arg("dst", |a| {
            a.value_name("IP|POD|svc/NAME").help(
                "An address, a pod (NAME, NAMESPACE/NAME, pod/NAME) or a Service (svc/NAME, svc/NAMESPACE/NAME: its cluster IP)",
            )
        })
    };
    KubectlCli::command()
        .mut_subcommand("topo", |c| {
            adjust(c).mut_arg("pod", |a| {
                a.help("NAME or NAMESPACE/NAME, found through the API server")
            })
        })
        .mut_subcommand("follow", |c| {
            adjust(c).mut_arg("pod", |a| {
                a.help("NAME or NAMESPACE/NAME, found through the API server")
            })
        })
        .mut_subcommand("capture", |c| {
            adjust(c).mut_arg("words", |a| {
                a.help("POD (NAME or NAMESPACE/NAME, found through the API server) then an optional filter expression in tcpdump's language (host, src, dst, net, port, tcp, udp, icmp, and, or, not, parentheses)")
            })
        })
        .mut_subcommand("verify", |v| {
            v.mut_subcommand("eni", |c| {
                adjust(c).mut_arg("pod", |a| {
                    a.help("NAME or NAMESPACE/NAME, found through the API server")
                })
            })
        })
}

/// clap's error as one line (a line ending in `:` with the next one).
fn first_line(text: &str) -> String {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines
        .next()
        .unwrap_or("invalid arguments")
        .trim_start_matches("error: ")
        .to_owned();
    match (first.ends_with(':'), lines.next()) {
        (true, Some(next)) => format!("{first} {next}"),
        _ => first,
    }
}

/// Runs `kubectl podtrace ARGS…` (`args[0]` is the program's name).
pub fn main(args: Vec<OsString>) -> ExitCode {
    let (args, taken) = match take_flags(args) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("kubectl podtrace: {e:#}");
            return ExitCode::from(2);
        }
    };
    let parsed = command()
        .try_get_matches_from(args)
        .and_then(|m| <KubectlCli as clap::FromArgMatches>::from_arg_matches(&m));
    let cli = match parsed {
        Ok(c) => c,
        Err(e) if e.use_stderr() => {
            eprintln!("kubectl podtrace: {}", first_line(&e.to_string()));
            return ExitCode::from(2);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    match run(cli, taken) {
        Ok(code) => code,
        Err(e) => {
            if !crate::crash::panicked() {
                eprintln!("kubectl podtrace: {e:#}");
            }
            ExitCode::from(2)
        }
    }
}

fn run(cli: KubectlCli, taken: Taken) -> Result<ExitCode> {
    let cluster = Cluster::connect(&cli.kube)?;
    match cli.command {
        Command::Deploy(a) => deploy::deploy(&cluster, &a),
        Command::Undeploy(a) => deploy::undeploy(&cluster, &a),
        Command::Topo(mut a) => {
            let (dst, named) = prepare(&cluster, &mut a.pod, &mut a.remote, &taken, a.dst)?;
            a.dst = dst;
            end(cluster, named, crate::topology::cmd::run(a))
        }
        Command::Follow(mut a) => {
            let (dst, named) = prepare(&cluster, &mut a.pod, &mut a.remote, &taken, Some(a.dst))?;
            a.dst = dst.expect("follow has --dst");
            crate::signals::install()?;
            end(cluster, named, crate::follow::run(a))
        }
        Command::Capture(mut a) => {
            let mut pod = PodArgs {
                pod: None,
                pid: a.pid,
                netns: a.netns.clone(),
                container: a.container.clone(),
                runtime_endpoint: a.runtime_endpoint.clone(),
                lab: a.lab.clone(),
            };
            // POD is the first word (the rest is the filter expression).
            if !a.words.is_empty() {
                pod.pod = Some(a.words.remove(0));
            }
            let (dst, named) = prepare(&cluster, &mut pod, &mut a.remote, &taken, a.dst)?;
            a.dst = dst;
            // Back as capture takes it: by container id, or POD then the expression.
            a.container = pod.container.clone();
            if a.container.is_none() {
                a.words.insert(0, pod.pod.clone().unwrap_or_default());
            }
            crate::signals::install()?;
            end(cluster, named, crate::capture::run(a))
        }
        Command::Verify(VerifyCommand::Eni(mut a)) => {
            let (dst, named) = prepare(&cluster, &mut a.pod, &mut a.remote, &taken, Some(a.dst))?;
            a.dst = dst.expect("verify has --dst");
            crate::signals::install()?;
            end(cluster, named, crate::verify::run(VerifyCommand::Eni(a)))
        }
    }
}

/// The command's result, the cluster's connections closed after it (its runtime is dropped
/// here, outside any other). The agents were asked for a container id: errors name the pod.
fn end(cluster: Cluster, named: Named, r: Result<ExitCode>) -> Result<ExitCode> {
    drop(cluster);
    r.map_err(|e| renamed(e, &named))
}

/// `container ID` in an error becomes `pod NAMESPACE/POD (container SHORT-ID)`.
fn renamed(e: anyhow::Error, named: &Named) -> anyhow::Error {
    let Some((id, pod)) = named else { return e };
    let short = &id[..id.len().min(12)];
    anyhow::anyhow!(
        "{}",
        format!("{e:#}").replace(
            &format!("container {id}"),
            &format!("pod {pod} (container {short})")
        )
    )
}

/// (container id, NAMESPACE/POD) when the agents look the pod up by a container id.
type Named = Option<(String, String)>;

/// Resolves POD and --dst through the API, finds the agents of the nodes involved, and hands
/// them to the command as its agents (reached through port-forward, with the agents' token).
/// Returns --dst as an address.
fn prepare(
    cluster: &Cluster,
    pod: &mut PodArgs,
    remote: &mut RemoteArgs,
    taken: &Taken,
    dst: Option<std::net::Ipv4Addr>,
) -> Result<(Option<std::net::Ipv4Addr>, Named)> {
    // What only makes sense on a node: not here.
    if pod.pid.is_some() || pod.netns.is_some() {
        bail!("kubectl podtrace names the pod as POD or NAMESPACE/POD (-n), not --pid or --netns (those are a node's: run podtrace on the node)");
    }
    if pod.runtime_endpoint.is_some() || pod.lab.is_some() {
        bail!("kubectl podtrace finds pods through the API server: --runtime-endpoint and --lab are for podtrace on a node");
    }
    if remote.agents.is_some()
        || remote.agents_config.is_some()
        || remote.agent_ca.is_some()
        || remote.agent_cert.is_some()
        || remote.agent_token_file.is_some()
        || remote.no_agents
    {
        bail!("kubectl podtrace reaches the DaemonSet's agents through the API server: --agents, --agents-config, --agent-* and --no-agents are for podtrace");
    }
    let Some(name) = pod.pod.clone() else {
        bail!("name a pod: POD or NAMESPACE/POD (-n NAMESPACE)");
    };
    let kpod = cluster.pod(&name)?;
    if kpod.host_network {
        bail!(
            "pod {}/{} uses its node's network (hostNetwork): its packets are the node's; name a pod with a network of its own",
            kpod.namespace,
            kpod.name
        );
    }
    // The agents find the pod through their node's runtime by a container's id (the API
    // knows them; a name can match a deleted pod's sandbox the runtime still has, or a pod
    // of the same name that replaced it): --container NAME's, else the first running one's;
    // by its name when none has started yet.
    let id = match &taken.container {
        Some(c) => Some(kpod.container_id(c)?),
        None => kpod.containers.iter().find_map(|(_, id)| id.clone()),
    };
    let named = id
        .clone()
        .map(|id| (id, format!("{}/{}", kpod.namespace, kpod.name)));
    match id {
        Some(id) => {
            pod.pod = None;
            pod.container = Some(id);
        }
        None => {
            pod.pod = Some(format!("{}/{}", kpod.namespace, kpod.name));
            pod.container = None;
        }
    }
    let dst = match (&taken.dst, dst) {
        (Some(s), _) => Some(cluster.dst(s)?),
        (None, Some(ip)) => Some(api::Dst {
            ip,
            shown: ip.to_string(),
            pod: None,
        }),
        (None, None) => None,
    };
    let mut nodes: BTreeSet<String> = BTreeSet::from([kpod.node.clone()]);
    if let Some(d) = &dst {
        let dpod = match &d.pod {
            Some(p) => Some(p.clone()),
            None => cluster.pod_with_ip(d.ip)?,
        };
        if let Some(p) = dpod.filter(|p| !p.host_network) {
            nodes.insert(p.node);
        }
    }
    // The pod's node first (the front end's session is its).
    let mut order: Vec<String> = vec![kpod.node.clone()];
    order.extend(nodes.into_iter().filter(|n| *n != kpod.node));
    let agents = cluster.agents(&order)?;
    let token = cluster.agent_token()?;
    cluster.check_port_forward(&agents)?;
    remote.given = Some(AgentsConfig {
        agents: agents.iter().map(|a| a.spec()).collect(),
        credentials: Credentials {
            token: Some(token),
            ..Default::default()
        },
        dialer: Some(cluster.dialer()),
    });
    Ok((dst.map(|d| d.ip), named))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn kubectl_flags_are_taken_before_parsing() {
        let (rest, t) = take_flags(v(&[
            "kubectl-podtrace",
            "follow",
            "client",
            "--dst",
            "default/server",
            "--container=main",
            "-c",
            "4",
        ]))
        .unwrap();
        assert_eq!(
            rest,
            v(&[
                "kubectl-podtrace",
                "follow",
                "client",
                "--dst",
                "0.0.0.0",
                "-c",
                "4"
            ])
        );
        assert_eq!(
            t,
            Taken {
                container: Some("main".into()),
                dst: Some("default/server".into())
            }
        );
        // An address goes through as it is.
        let (rest, t) = take_flags(v(&["k", "follow", "p", "--dst=10.244.1.5"])).unwrap();
        assert_eq!(rest, v(&["k", "follow", "p", "--dst", "10.244.1.5"]));
        assert_eq!(t, Taken::default());
        // After `--` nothing is taken (capture's expression).
        let (rest, _) = take_flags(v(&["k", "capture", "p", "--", "--dst"])).unwrap();
        assert_eq!(rest, v(&["k", "capture", "p", "--", "--dst"]));
        assert!(take_flags(v(&["k", "follow", "p", "--dst"])).is_err());
    }

    #[test]
    fn errors_name_the_pod_not_the_container_id() {
        let id = "7250d5b7e7a8c3bc51d565b5532ea9c9ff8cb87fe54c27a97afd51dc5c6e3ec6";
        let e = anyhow::anyhow!(
            "container {id} not found (node-a: gone; node-b: container {id} not found)"
        );
        let named = Some((id.to_owned(), "default/client".to_owned()));
        assert_eq!(
            renamed(e, &named).to_string(),
            "pod default/client (container 7250d5b7e7a8) not found (node-a: gone; node-b: pod default/client (container 7250d5b7e7a8) not found)"
        );
        assert_eq!(renamed(anyhow::anyhow!("x"), &None).to_string(), "x");
    }

    #[test]
    fn plugin_names() {
        assert!(invoked_as_plugin(
            "/usr/local/bin/kubectl-podtrace".as_ref()
        ));
        assert!(invoked_as_plugin("kubectl-podtrace".as_ref()));
        assert!(!invoked_as_plugin("/usr/bin/podtrace".as_ref()));
    }

    #[test]
    fn the_command_line_parses() {
        use clap::CommandFactory as _;
        KubectlCli::command().debug_assert();
        command().debug_assert();
        let c = KubectlCli::try_parse_from([
            "kubectl podtrace",
            "follow",
            "client",
            "-n",
            "web",
            "--context",
            "prod",
            "--dst",
            "10.0.0.1",
            "--json",
        ])
        .unwrap();
        assert_eq!(c.kube.namespace.as_deref(), Some("web"));
        assert_eq!(c.kube.context.as_deref(), Some("prod"));
        assert!(matches!(c.command, Command::Follow(_)));
    }
}
