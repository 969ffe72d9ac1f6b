//! `podtrace agent` and sessions that span nodes, on a lab whose nodes each run an agent
//! (`lab up --agents`: each in its node's namespace, mutual TLS, reached from the underlay):
//! the same path, verdict and counts as the single-process run; capture through agents; an
//! agent killed mid-run; wrong certificates and tokens refused; a plan naming another node's
//! namespace refused; a client that goes away leaves no probe; SIGTERM detaches.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use podtrace::{
    agent::wire::{self, pb},
    remote::{connect, AgentSpec, AgentsConfig, Credentials, Endpoint},
    trace::plan::{FlowFilter, Hook, Plan, PlanNamespace, PlannedHop, Role, Step},
};
use podtrace_tests::{json_lines, podtrace, podtrace_bin, wait_until, Killed, Lab, Running};
use serde_json::Value;

fn follow(lab: &Lab, extra: &[&str]) -> Running {
    let mut args = vec![
        "follow",
        "pod-a1",
        "--dst",
        "10.244.1.5",
        "--json",
        "--lab",
        &lab.prefix,
    ];
    args.extend_from_slice(extra);
    Running::start(&args)
}

fn ping(lab: &Lab, count: u32) {
    let out = lab.exec(
        "pod-a1",
        &[
            "ping",
            "-c",
            &count.to_string(),
            "-i",
            "0.2",
            "-W",
            "2",
            "10.244.1.5",
        ],
    );
    assert!(out.status.success(), "{out:?}");
}

fn summary_of(lines: &[String], stderr: &str) -> Value {
    json_lines(lines)
        .into_iter()
        .find(|o| o["type"] == "summary")
        .unwrap_or_else(|| panic!("no summary; stdout {lines:?}; stderr {stderr}"))
}

fn steps(summary: &Value, key: &str) -> Vec<String> {
    summary[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            format!(
                "{} {}",
                s["name"].as_str().unwrap(),
                s["hook"].as_str().unwrap()
            )
        })
        .collect()
}

/// The tc programs (TCX or clsact) on an interface of a lab namespace, both directions.
fn tc_programs(lab: &Lab, ns: &str, ifname: &str) -> String {
    podtrace_tests::tc_programs_in(&lab.netns(ns), ifname)
}

fn agent_pid(lab: &Lab, node: &str) -> i32 {
    lab.status()["agents"]
        .as_array()
        .expect("agents in lab status")
        .iter()
        .find(|a| a["node"] == node)
        .and_then(|a| a["pid"].as_i64())
        .unwrap_or_else(|| panic!("no agent of {node}")) as i32
}

/// The lab's agents file, with other credentials.
fn config_with(lab: &Lab, creds: impl FnOnce(&mut Credentials)) -> AgentsConfig {
    let mut cfg = AgentsConfig::load(&podtrace::lab::agents::config_path(&lab.prefix)).unwrap();
    creds(&mut cfg.credentials);
    cfg
}

fn write_config(dir: &Path, cfg: &AgentsConfig) -> PathBuf {
    let p = dir.join("agents.json");
    std::fs::write(&p, serde_json::to_string(cfg).unwrap()).unwrap();
    p
}

struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("podtrace-agents-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn cross_node_follow_and_capture_through_agents_match_one_process() {
    let lab = Lab::up_with_agents("agsam", "flannel");
    // At rest an agent has nothing attached.
    for (ns, ifname) in [("node-a", "cni0"), ("node-b", "eth0"), ("pod-a1", "eth0")] {
        assert!(
            !tc_programs(&lab, ns, ifname).contains("hop_"),
            "{ns}/{ifname}"
        );
    }
    let status = lab.status();
    assert_eq!(status["agents"].as_array().unwrap().len(), 2, "{status:#}");
    assert_eq!(status["agents"][0]["endpoint"], "tcp:10.30.180.56:7070");
    let text =
        String::from_utf8(podtrace(&["lab", "status", "--prefix", &lab.prefix]).stdout).unwrap();
    assert!(text.contains("tcp:10.30.180.55:7070"), "{text}");

    // Through the agents (the lab's default), then in one process.
    let mut runs = Vec::new();
    for extra in [&[][..], &["--no-agents"][..]] {
        let mut args = vec!["-c", "4"];
        args.extend_from_slice(extra);
        let run = follow(&lab, &args);
        ping(&lab, 2);
        let (code, lines, stderr) = run.wait(30);
        assert_eq!(code, Some(0), "{stderr}");
        let ready = json_lines(&lines)
            .into_iter()
            .find(|o| o["type"] == "ready")
            .unwrap();
        runs.push((ready, summary_of(&lines, &stderr)));
    }
    let ((ready_agents, agents), (ready_local, local)) = (&runs[0], &runs[1]);
    assert_eq!(ready_agents["through_agents"], true);
    assert_eq!(ready_local["through_agents"], false);
    assert_eq!(ready_agents["nodes"].as_array().unwrap().len(), 2);
    for s in [agents, local] {
        assert_eq!(s["verdict"], "confirmed", "{s:#}");
        assert_eq!(s["packets"], 4);
        assert!(s["unobserved"].as_array().unwrap().is_empty());
    }
    for key in ["expected_path", "observed_path", "observed_reverse_path"] {
        assert_eq!(steps(agents, key), steps(local, key), "{key}");
    }
    assert_eq!(steps(agents, "observed_path").len(), 10);
    assert_eq!(agents["interfaces"], local["interfaces"]);
    // Both directions were seen: node-b's clock is estimated from the packets. The agents
    // share this machine's clock, so what is left after the wall-clock conversion is the
    // conversion's own error (microseconds), far below a millisecond; a broken conversion
    // would leave the machines' boot times apart.
    let b = agents["clocks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["node"] == "node-b")
        .unwrap();
    assert_eq!(b["clock"], "estimated", "{b}");
    assert!(b["offset_ns"].as_i64().unwrap().abs() < 1_000_000, "{b}");
    assert!(b["uncertainty_ns"].as_i64().unwrap() < 1_000_000, "{b}");

    // capture through the agents: one pcapng with an interface per hop of both nodes.
    let dir = Scratch::new("cap");
    let file = dir.0.join("x.pcapng");
    let run = Running::start(&[
        "capture",
        "pod-a1",
        "--dst",
        "10.244.1.5",
        "-w",
        file.to_str().unwrap(),
        "-c",
        "60",
        "--lab",
        &lab.prefix,
    ]);
    ping(&lab, 3);
    let (code, _, stderr) = run.wait(30);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("through their nodes' agents"), "{stderr}");
    let out = Command::new("tshark")
        .args(["-r", file.to_str().unwrap(), "-d", "udp.port==8472,vxlan"])
        .args([
            "-Y",
            "icmp.type == 8",
            "-T",
            "fields",
            "-e",
            "frame.interface_name",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let mut per_hop = std::collections::BTreeMap::<String, usize>::new();
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        *per_hop.entry(l.to_owned()).or_default() += 1;
    }
    assert_eq!(per_hop.len(), 10, "{per_hop:?}");
    assert!(per_hop.values().all(|n| *n == 3), "{per_hop:?}");
    assert!(per_hop.contains_key("node-b/flannel.1"));
}

#[test]
fn an_agent_lost_mid_run_is_named_and_nothing_is_claimed() {
    let lab = Lab::up_with_agents("aglost", "flannel");
    let run = follow(&lab, &["--duration", "20"]);
    ping(&lab, 1);
    // node-b's agent dies: its probes go with it (its TCX links close with its files; clsact
    // filters, where it uses them, its guard removes).
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent_pid(&lab, "node-b")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // And its guard's clean-up to end: deleting the clsact qdiscs the agent created swaps
    // each interface's transmit queue for the kernel's noop qdisc for an instant, and a ping
    // in that instant is lost (the data path's doing, not podtrace's output's).
    wait_until(10, "node-b's probes and clsact qdiscs to go", || {
        !tc_programs(&lab, "node-b", "eth0").contains("hop_")
            && ["node-b", "pod-b1"].iter().all(|ns| {
                let out = lab.exec(ns, &["tc", "qdisc", "show"]);
                out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("clsact")
            })
    });
    ping(&lab, 1);
    run.signal(nix::sys::signal::Signal::SIGTERM);
    let (code, lines, stderr) = run.wait(30);
    let summary = summary_of(&lines, &stderr);
    let unobserved = summary["unobserved"].to_string();
    assert!(
        unobserved.contains("node-b") && unobserved.contains("lost mid-run"),
        "{summary:#}"
    );
    // What was seen before proves nothing wrong, and the rest was not seen: cannot say.
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("cannot say"), "{stderr}");
    // node-a's agent detached when the session ended.
    wait_until(10, "node-a's probes to go", || {
        !tc_programs(&lab, "node-a", "cni0").contains("hop_")
    });
}

#[test]
fn wrong_credentials_are_refused() {
    let lab = Lab::up_with_agents("agauth", "flannel");
    let dir = Scratch::new("auth");
    // A client certificate from another CA.
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(dir.0.join("rogue.pem"), cert.pem()).unwrap();
    std::fs::write(dir.0.join("rogue.key"), key.serialize_pem()).unwrap();
    let rogue = config_with(&lab, |c| {
        c.cert = Some(dir.0.join("rogue.pem"));
        c.key = Some(dir.0.join("rogue.key"));
    });
    let cfg = write_config(&dir.0, &rogue);
    let out = podtrace(&["topo", "pod-a1", "--agents-config", cfg.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("no agent reachable"), "{err}");
    // No client certificate at all.
    let anonymous = write_config(
        &dir.0,
        &config_with(&lab, |c| {
            c.cert = None;
            c.key = None;
        }),
    );
    let out = podtrace(&[
        "topo",
        "pod-a1",
        "--agents-config",
        anonymous.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));

    // A token agent: a wrong token is refused, the right one works.
    let token = dir.0.join("token");
    std::fs::write(&token, "s3cret-token-of-the-lab-0123456789").unwrap();
    let mut agent = Killed(
        Command::new(podtrace_bin())
            .args(["lab", "exec", "node-a", "--prefix", &lab.prefix, "--"])
            .arg(podtrace_bin())
            .args([
                "agent",
                "--node",
                "node-a",
                "--listen",
                "tcp:10.30.180.56:7071",
                "--token-file",
                token.to_str().unwrap(),
                "--lab",
                &lab.prefix,
            ])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let ext = lab.netns("ext");
    wait_until(10, "the token agent to listen", || {
        podtrace::netns::run_in(Some(&ext), || {
            Ok(std::net::TcpStream::connect("10.30.180.56:7071").is_ok())
        })
        .unwrap()
    });
    let spec = AgentsConfig {
        agents: vec![AgentSpec {
            node: "node-a".into(),
            endpoint: Endpoint::Tcp("10.30.180.56:7071".parse().unwrap()),
            via_netns: Some(ext.clone()),
        }],
        credentials: Credentials::default(),
        dialer: None,
    };
    let wrong = dir.0.join("wrong");
    std::fs::write(&wrong, "not-the-token-at-all-0123456789").unwrap();
    for (file, ok) in [(&wrong, false), (&token, true)] {
        let mut s = spec.clone();
        s.credentials.token_file = Some(file.clone());
        let cfg = write_config(&dir.0, &s);
        let out = podtrace(&["topo", "pod-a1", "--agents-config", cfg.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        if ok {
            assert!(out.status.success(), "{err}");
        } else {
            assert_eq!(out.status.code(), Some(2), "{err}");
            assert!(err.contains("wrong or missing token"), "{err}");
        }
    }
    drop(agent.0.stderr.take());

    // TCP without authentication is not served at all.
    let out = podtrace(&["agent", "--listen", "tcp:127.0.0.1:7079"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("needs authentication"), "{err}");
}

#[test]
fn an_agent_refuses_another_nodes_namespaces() {
    let lab = Lab::up_with_agents("agconf", "flannel");
    let cfg = AgentsConfig::load(&podtrace::lab::agents::config_path(&lab.prefix)).unwrap();
    let node_a = cfg
        .agents
        .iter()
        .find(|a| a.node == "node-a")
        .unwrap()
        .clone();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut client = connect::connect(&node_a, &cfg.credentials, None)
            .await
            .unwrap();
        // Resolving pod-b1 on node-a's agent: not there.
        let r = client
            .resolve(pb::ResolveRequest {
                what: Some(pb::resolve_request::What::Pod("pod-b1".into())),
                dst: String::new(),
                from: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.half.is_none());
        assert!(r.missing.contains("not on node node-a"), "{}", r.missing);
        // A plan with node-b's namespace, sent to node-a's agent.
        let node_b = lab.netns("node-b");
        let plan = Plan {
            namespaces: vec![PlanNamespace {
                path: node_b.clone(),
                owner: "node-b".into(),
                node: "node-b".into(),
                interfaces: [(2, "eth0".to_owned())].into(),
            }],
            hops: vec![PlannedHop {
                id: 0,
                name: "node-b/eth0".into(),
                node: "node-b".into(),
                owner: "node-b".into(),
                role: Role::Uplink,
                ifname: "eth0".into(),
                ifindex: 2,
                netns: node_b.display().to_string(),
                ns: 0,
                on_path: true,
            }],
            forward: vec![Step {
                hop: 0,
                hook: Hook::Ingress,
            }],
            reverse: vec![],
            filter: FlowFilter {
                pod: "10.244.1.5".parse().unwrap(),
                peer: None,
                proto: None,
                port: None,
                vxlan_ports: vec![8472],
                nat: Vec::new(),
            },
            nat: None,
        };
        let status = client
            .trace(pb::TraceRequest {
                plan: Some(wire::encode(&plan).unwrap()),
                options: Some(wire::encode(&podtrace::trace::TraceOptions::default()).unwrap()),
                duration_ms: 1000,
            })
            .await
            .map(|_| ())
            .expect_err("refused");
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert!(
            status.message().contains("not on node node-a"),
            "{status:?}"
        );
        // A payload from another version is refused too.
        let status = client
            .trace(pb::TraceRequest {
                plan: Some(pb::Payload {
                    format: 99,
                    data: vec![],
                }),
                options: None,
                duration_ms: 0,
            })
            .await
            .map(|_| ())
            .expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    });
    // Nothing was attached on node-b.
    assert!(!tc_programs(&lab, "node-b", "eth0").contains("hop_"));
}

#[test]
fn a_client_gone_leaves_no_probe_and_sigterm_detaches() {
    let lab = Lab::up_with_agents("aggone", "flannel");
    let run = follow(&lab, &[]);
    assert!(tc_programs(&lab, "node-b", "cni0").contains("hop_ingress"));
    // The front end dies without a word: the agents notice and detach.
    run.signal(nix::sys::signal::Signal::SIGKILL);
    let _ = run.wait(10);
    for (ns, ifname) in [("node-a", "cni0"), ("node-b", "cni0"), ("pod-b1", "eth0")] {
        wait_until(10, &format!("{ns}/{ifname} to lose its probes"), || {
            !tc_programs(&lab, ns, ifname).contains("hop_")
        });
    }
    // SIGTERM to an agent in a session: it ends the session, detaches, exits.
    let run = follow(&lab, &[]);
    assert!(tc_programs(&lab, "node-a", "cni0").contains("hop_ingress"));
    let pid = agent_pid(&lab, "node-a");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    wait_until(20, "node-a's agent to exit", || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z"))
            .unwrap_or(true)
    });
    assert!(!tc_programs(&lab, "node-a", "cni0").contains("hop_"));
    run.signal(nix::sys::signal::Signal::SIGTERM);
    let (_, lines, stderr) = run.wait(30);
    let summary = summary_of(&lines, &stderr);
    assert!(
        summary["unobserved"]
            .to_string()
            .contains("the agent is stopping"),
        "{summary:#}"
    );
}
