//! `podtrace lab up --agents`: one `podtrace agent` per lab node, as on a real cluster where
//! each node is its own machine. Each agent runs inside its node's namespace, confined to that
//! node and its pods, and listens on the node's own address with mutual TLS (a CA, a
//! certificate per node, one for the client, made here); the front end reaches it from a host
//! on the same network (the underlay's `ext`, the ENI subnet's `master`), as a laptop or a
//! port-forward would. The lab's commands then go through the agents by default; `lab down`
//! stops them.
use std::{
    fs,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::unix::{
        fs::{DirBuilderExt as _, OpenOptionsExt as _},
        process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

use super::registry::{self, LabAgent, LabNode, Registry};
use crate::remote::{AgentSpec, AgentsConfig, Credentials, Endpoint};

/// The port lab agents listen on.
pub const PORT: u16 = 7070;

/// Where a lab's agents keep their certificates, logs and the front end's agents file.
pub fn dir(prefix: &str) -> PathBuf {
    Path::new(registry::DIR).join(format!("{prefix}agents"))
}

/// The agents file of a lab (what `--agents-config` takes).
pub fn config_path(prefix: &str) -> PathBuf {
    dir(prefix).join("agents.json")
}

/// The agents of the lab in use (`--lab PREFIX`, else the only lab that is up), when it has
/// any.
pub fn config_of(lab: Option<&str>) -> Result<Option<AgentsConfig>> {
    let reg = match lab {
        Some(p) => registry::load(p)?,
        None => {
            let mut all = registry::load_all()?;
            if all.len() != 1 {
                return Ok(None);
            }
            all.pop()
        }
    };
    let Some(reg) = reg.filter(|r| !r.agents.is_empty()) else {
        return Ok(None);
    };
    Ok(Some(AgentsConfig::load(&config_path(&reg.prefix))?))
}

/// For a node: an address of it on a subnet where a lab host sits, and that host's namespace
/// (where a front end can reach the node from).
fn reachable(node: &LabNode, hosts: &[LabNode]) -> Option<(Ipv4Addr, PathBuf)> {
    let parse = |a: &str| -> Option<(Ipv4Addr, u8)> {
        let (ip, len) = a.split_once('/')?;
        Some((ip.parse().ok()?, len.parse().ok()?))
    };
    for a in node.interfaces.iter().flat_map(|i| &i.addresses) {
        let Some((ip, len)) = parse(a) else { continue };
        for h in hosts.iter().filter(|h| h.role == "host") {
            let shares = h
                .interfaces
                .iter()
                .flat_map(|i| &i.addresses)
                .filter_map(|a| parse(a))
                .any(|(hip, _)| {
                    hip != ip && crate::netlink::snapshot::prefix_contains(ip, len, hip)
                });
            if shares {
                return Some((ip, h.netns.clone()));
            }
        }
    }
    None
}

fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    let _ = fs::remove_file(path);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(data)
        .with_context(|| format!("writing {}", path.display()))
}

/// A CA, a server certificate per node (its name and address), a client certificate.
fn certificates(dir: &Path, nodes: &[(String, Ipv4Addr)]) -> Result<Credentials> {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, SanType,
    };
    let e = |e: rcgen::Error| anyhow!("making the lab's certificates: {e}");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "podtrace lab agents CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().map_err(e)?).map_err(e)?;
    write_private(&dir.join("ca.pem"), ca.pem().as_bytes())?;
    for (node, ip) in nodes {
        let mut p = CertificateParams::new(vec![node.clone()]).map_err(e)?;
        p.subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(*ip)));
        p.distinguished_name
            .push(DnType::CommonName, format!("podtrace agent {node}"));
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().map_err(e)?;
        let cert = p.signed_by(&key, &ca).map_err(e)?;
        write_private(&dir.join(format!("{node}.pem")), cert.pem().as_bytes())?;
        write_private(
            &dir.join(format!("{node}.key")),
            key.serialize_pem().as_bytes(),
        )?;
    }
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    p.distinguished_name
        .push(DnType::CommonName, "podtrace front end");
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().map_err(e)?;
    let cert = p.signed_by(&key, &ca).map_err(e)?;
    write_private(&dir.join("client.pem"), cert.pem().as_bytes())?;
    write_private(&dir.join("client.key"), key.serialize_pem().as_bytes())?;
    Ok(Credentials {
        ca: Some(dir.join("ca.pem")),
        cert: Some(dir.join("client.pem")),
        key: Some(dir.join("client.key")),
        token_file: None,
        token: None,
    })
}

/// Starts one agent per node of `reg`, each in its node's namespace; waits until each accepts
/// connections from its client host; writes the agents file. On failure the agents started
/// are stopped again.
pub fn start(reg: &Registry) -> Result<Vec<LabAgent>> {
    let dir = dir(&reg.prefix);
    let _ = fs::remove_dir_all(&dir);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let mut plan = Vec::new();
    for n in &reg.nodes {
        let (ip, via) = reachable(n, &reg.hosts).ok_or_else(|| {
            anyhow!(
                "node {} shares no subnet with a lab host to reach its agent from",
                n.name
            )
        })?;
        plan.push((n, ip, via));
    }
    let creds = certificates(
        &dir,
        &plan
            .iter()
            .map(|(n, ip, _)| (n.name.clone(), *ip))
            .collect::<Vec<_>>(),
    )?;
    let exe = std::env::current_exe().context("locating the podtrace binary")?;
    let mut started: Vec<LabAgent> = Vec::new();
    let result = (|| -> Result<()> {
        for (n, ip, via) in &plan {
            let addr = SocketAddr::new(IpAddr::V4(*ip), PORT);
            let log = dir.join(format!("{}.log", n.name));
            let out =
                fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
            let args: Vec<String> = vec![
                "agent".into(),
                "--node".into(),
                n.name.clone(),
                "--listen".into(),
                format!("tcp:{addr}"),
                "--tls-cert".into(),
                dir.join(format!("{}.pem", n.name)).display().to_string(),
                "--tls-key".into(),
                dir.join(format!("{}.key", n.name)).display().to_string(),
                "--tls-client-ca".into(),
                dir.join("ca.pem").display().to_string(),
                "--lab".into(),
                reg.prefix.clone(),
            ];
            let exe = exe
                .to_str()
                .ok_or_else(|| anyhow!("non-UTF-8 path of podtrace"))?;
            let mut cmd = crate::netns::command_in(&n.netns, exe, &args)?;
            cmd.stdin(Stdio::null())
                .stdout(out.try_clone()?)
                .stderr(out)
                // Its own process group: a ^C at the terminal of `lab up` does not reach it.
                .process_group(0);
            let child = cmd
                .spawn()
                .with_context(|| format!("starting the agent of {}", n.name))?;
            started.push(LabAgent {
                node: n.name.clone(),
                endpoint: format!("tcp:{addr}"),
                via_netns: via.clone(),
                pid: child.id(),
                log: log.clone(),
            });
            wait_listening(&n.name, via, addr, &log, child.id())?;
        }
        let cfg = AgentsConfig {
            agents: started
                .iter()
                .map(|a| {
                    Ok(AgentSpec {
                        node: a.node.clone(),
                        endpoint: Endpoint::parse(&a.endpoint)?,
                        via_netns: Some(a.via_netns.clone()),
                    })
                })
                .collect::<Result<_>>()?,
            credentials: creds,
            dialer: None,
        };
        write_private(
            &config_path(&reg.prefix),
            serde_json::to_string_pretty(&cfg)?.as_bytes(),
        )?;
        Ok(())
    })();
    if let Err(e) = result {
        stop(&reg.prefix, &started);
        return Err(e);
    }
    Ok(started)
}

/// Waits until the agent accepts TCP connections from its client namespace (or has died).
fn wait_listening(node: &str, via: &Path, addr: SocketAddr, log: &Path, pid: u32) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let up = crate::netns::run_in(Some(via), || {
            Ok(std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())
        })?;
        if up {
            return Ok(());
        }
        if !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid) {
            let text = fs::read_to_string(log).unwrap_or_default();
            bail!(
                "the agent of {node} exited: {}",
                text.lines().last().unwrap_or("(no output)")
            );
        }
        if Instant::now() > deadline {
            bail!("the agent of {node} did not listen on {addr} within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()
                .map(|r| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// Whether `pid` is still a podtrace agent (not a recycled pid).
fn is_agent(pid: u32) -> bool {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
            args.get(1).is_some_and(|a| *a == b"agent")
        })
        .unwrap_or(false)
}

/// Stops the agents (SIGTERM: they detach everything; SIGKILL after 10 s) and removes their
/// directory.
pub fn stop(prefix: &str, agents: &[LabAgent]) {
    use nix::{
        sys::signal::{kill, Signal},
        unistd::Pid,
    };
    let alive: Vec<u32> = agents
        .iter()
        .map(|a| a.pid)
        .filter(|p| is_agent(*p) && !is_zombie(*p))
        .collect();
    for p in &alive {
        let _ = kill(Pid::from_raw(*p as i32), Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for p in &alive {
        while Path::new(&format!("/proc/{p}")).exists() && !is_zombie(*p) {
            if Instant::now() > deadline {
                let _ = kill(Pid::from_raw(*p as i32), Signal::SIGKILL);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Reap it if it was our child (lab up that failed half-way).
        let _ = nix::sys::wait::waitpid(
            Pid::from_raw(*p as i32),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        );
    }
    let _ = fs::remove_dir_all(dir(prefix));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::registry::LabInterface;

    fn node(name: &str, role: &str, addrs: &[&str]) -> LabNode {
        LabNode {
            name: name.into(),
            role: role.into(),
            netns: PathBuf::from(format!("/run/netns/{name}")),
            interfaces: vec![LabInterface {
                name: "eth0".into(),
                ifindex: 2,
                kind: "veth".into(),
                mac: String::new(),
                mtu: 1500,
                addresses: addrs.iter().map(|s| s.to_string()).collect(),
                master: None,
            }],
        }
    }

    #[test]
    fn each_node_is_reached_from_a_host_on_its_subnet() {
        let hosts = [
            node("ext", "host", &["10.30.180.1/24"]),
            node("master", "host", &["10.19.0.11/20"]),
            node("underlay", "fabric", &["10.30.180.200/24"]),
        ];
        let a = node("node-a", "node", &["10.30.180.56/24"]);
        let c = node("node-c", "node", &["10.19.0.22/20", "10.19.16.17/20"]);
        assert_eq!(
            reachable(&a, &hosts),
            Some(("10.30.180.56".parse().unwrap(), "/run/netns/ext".into()))
        );
        assert_eq!(
            reachable(&c, &hosts),
            Some(("10.19.0.22".parse().unwrap(), "/run/netns/master".into()))
        );
        assert_eq!(
            reachable(&node("x", "node", &["192.168.9.9/24"]), &hosts),
            None
        );
    }
}
