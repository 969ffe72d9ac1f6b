//! `podtrace demo`: the seeds' story in two minutes, on the lab, with real traffic and real
//! output. Every step checks that it showed what it claims; the demo exits 0 only if all did,
//! and it leaves nothing behind (its own lab prefix, torn down even on failure).
use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::lab;

const PREFIX: &str = "ptdemo-";

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Keep the lab up at the end (to run the steps by hand).
    #[arg(long)]
    pub keep: bool,
    /// Show the kubectl flow instead, on the cluster of the kubeconfig (`cargo xtask k8s up`'s,
    /// or yours): deploy, two pods on two nodes, topo, follow, capture, clean up.
    #[arg(long)]
    pub kubernetes: bool,
    #[command(flatten)]
    pub kube: crate::kubectl::demo::KubeDemoArgs,
}

/// Tears the demo lab down when dropped (also on failure and panic).
struct LabGuard {
    keep: bool,
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        if !self.keep {
            let _ = lab::down(PREFIX);
        }
    }
}

/// A scratch directory for the capture files, removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn header(n: u32, title: &str, seed: &str) {
    println!();
    println!("━━━ {n}. {title}");
    println!("    ({seed})");
    println!();
}

fn show(cmd: &str) {
    println!("  $ {cmd}");
}

fn indent(text: &str) {
    for line in text.lines() {
        println!("    {line}");
    }
}

fn me() -> Result<PathBuf> {
    std::env::current_exe().context("locating the podtrace binary")
}

/// Runs `podtrace ARGS` to completion; returns (exit code, stdout, stderr).
fn podtrace(args: &[&str]) -> Result<(i32, String, String)> {
    let out = Command::new(me()?)
        .args(args)
        .output()
        .context("running podtrace")?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// A `podtrace` run in the background, started once it said "probes live".
struct Background {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
}

impl Background {
    fn start(args: &[&str]) -> Result<Self> {
        let mut child = Command::new(me()?)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting podtrace")?;
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
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match bg.stderr.recv_timeout(Duration::from_millis(50)) {
                Ok(line) if line.contains("probes live") => return Ok(bg),
                Ok(line) => println!("    {line}"),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = bg.child.wait()?;
                    bail!("podtrace {args:?} ended before its probes were live ({status})");
                }
            }
            if Instant::now() > deadline {
                bail!("podtrace {args:?} did not attach within 30 s");
            }
        }
    }

    /// Waits for the exit; returns (code, stdout, stderr).
    fn finish(mut self, secs: u64) -> Result<(i32, String, String)> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let status = loop {
            if let Some(s) = self.child.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("podtrace did not finish within {secs} s");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // Everything it printed: the readers end at the pipes' end of file.
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

/// Runs a command inside a lab pod or node, quietly; returns whether it succeeded.
fn lab_exec(name: &str, cmd: &[&str]) -> Result<bool> {
    let (code, _, _) = podtrace(&[&["lab", "exec", name, "--prefix", PREFIX, "--"], cmd].concat())?;
    Ok(code == 0)
}

fn check(ok: bool, what: &str) -> Result<()> {
    if ok {
        println!("  ✓ {what}");
        Ok(())
    } else {
        bail!("the demo did not show what it claims: {what}")
    }
}

pub fn run(args: DemoArgs) -> Result<ExitCode> {
    let started = Instant::now();
    println!(
        "podtrace demo: the field notes' problems, solved on a lab built in network namespaces"
    );
    println!("(nothing here touches this machine's own network; the lab is removed at the end)");
    let _ = lab::down(PREFIX);
    let _guard = LabGuard { keep: args.keep };
    show(&format!("podtrace lab up --prefix {PREFIX}"));
    let mut reg = lab::up(PREFIX, lab::Topology::All)?;
    println!("    two flannel nodes (node-a, node-b) with pods pod-a1, pod-a2, pod-b1;");
    println!("    an ENI node (node-c) with pod-c1 on eth1, pod-c2 on eth2; a host 'master'");

    step_topology_and_follow()?;
    step_drop()?;
    step_capture()?;
    step_verify_eni()?;
    step_agents(&mut reg)?;

    header(
        6,
        "Clean up, and how to run it yourself",
        "every step above, by hand",
    );
    if args.keep {
        println!(
            "  the lab stays up (--keep); remove it with: podtrace lab down --prefix {PREFIX}"
        );
    } else {
        show(&format!("podtrace lab down --prefix {PREFIX}"));
        lab::down(PREFIX)?;
        check(
            !crate::netns::list()?.iter().any(|n| n.starts_with(PREFIX)),
            "the lab's namespaces are gone",
        )?;
    }
    println!();
    println!("  podtrace lab up");
    println!("  podtrace topo pod-a1 --dst 10.244.1.5");
    println!("  podtrace follow pod-a1 --dst 10.244.1.5        # and in another shell:");
    println!("  podtrace lab exec pod-a1 -- ping -c 3 10.244.1.5");
    println!("  podtrace capture pod-a1 --dst 10.244.1.5 -w /tmp/pod-a1.pcapng -C 1 -W 3");
    println!("  podtrace verify eni pod-c2 --dst 10.19.0.11 --probe");
    println!("  podtrace lab up --agents      # one agent per node; the commands then use them");
    println!("  podtrace lab down");
    println!();
    println!(
        "demo complete in {:.0} s: every step showed what it claims",
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

fn step_topology_and_follow() -> Result<()> {
    header(
        1,
        "Where does a flannel pod's traffic go? Resolve it, then prove it with real packets",
        "seeds 001-003: nsenter, cat eth0/iflink, hunt the veth, brctl show, flannel.1, tcpdump on every hop",
    );
    show("podtrace topo pod-a1 --dst 10.244.1.5");
    let (code, out, err) = podtrace(&["topo", "pod-a1", "--dst", "10.244.1.5", "--lab", PREFIX])?;
    indent(&out);
    if code != 0 {
        bail!("topo failed: {err}");
    }
    check(
        out.contains("cni: flannel-vxlan") && out.contains("FDB sends it to VTEP 10.30.180.55"),
        "topo found the host veth, cni0, flannel.1 and the remote VTEP from the kernel",
    )?;
    println!();
    show("podtrace follow pod-a1 --dst 10.244.1.5 -c 4   (while pod-a1 pings pod-b1 twice)");
    let bg = Background::start(&[
        "follow",
        "pod-a1",
        "--dst",
        "10.244.1.5",
        "-c",
        "4",
        "--lab",
        PREFIX,
    ])?;
    lab_exec("pod-a1", &["ping", "-c", "2", "-i", "0.2", "10.244.1.5"])?;
    let (code, out, _) = bg.finish(20)?;
    indent(&out);
    check(
        code == 0 && out.contains("verdict: CONFIRMED"),
        "every hop on both nodes saw each packet, in order, with per-hop timing",
    )
}

fn step_drop() -> Result<()> {
    header(
        2,
        "Packets vanish: where, and why?",
        "seeds 001/002: intermittent loss between pods; here a netfilter DROP on node-a",
    );
    show("podtrace lab exec node-a -- iptables -I FORWARD -p icmp -j DROP   (the fault)");
    if !lab_exec(
        "node-a",
        &["iptables", "-I", "FORWARD", "-p", "icmp", "-j", "DROP"],
    )? {
        bail!("could not inject the fault");
    }
    show("podtrace follow pod-a1 --dst 10.244.1.5 -c 2");
    let bg = Background::start(&[
        "follow",
        "pod-a1",
        "--dst",
        "10.244.1.5",
        "-c",
        "2",
        "--lab",
        PREFIX,
    ])?;
    lab_exec(
        "pod-a1",
        &["ping", "-c", "2", "-i", "0.2", "-W", "1", "10.244.1.5"],
    )?;
    let (code, out, _) = bg.finish(20)?;
    let interesting: String = out
        .lines()
        .filter(|l| {
            l.starts_with('#')
                || l.contains("DROPPED")
                || l.starts_with("verdict")
                || l.starts_with("dropped")
                || l.contains(" ms ")
        })
        .collect::<Vec<_>>()
        .join("\n");
    indent(&interesting);
    lab_exec(
        "node-a",
        &["iptables", "-D", "FORWARD", "-p", "icmp", "-j", "DROP"],
    )?;
    check(
        code == 1
            && out.contains("verdict: DROPPED")
            && out.contains("dropped ×2 at node-a/cni0: NETFILTER_DROP"),
        "the drop is pinned to node-a/cni0 with the kernel's reason NETFILTER_DROP",
    )
}

fn tshark_counts(file: &Path) -> Result<Vec<(String, usize)>> {
    let out = Command::new("tshark")
        .args(["-r"])
        .arg(file)
        .args([
            "-d",
            "udp.port==8472,vxlan",
            "-Y",
            "icmp.type == 8",
            "-T",
            "fields",
            "-e",
            "frame.interface_name",
        ])
        .output()
        .context("running tshark (cargo xtask setup installs it)")?;
    if !out.status.success() {
        bail!("tshark could not read {}", file.display());
    }
    let mut counts: Vec<(String, usize)> = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        match counts.iter_mut().find(|(n, _)| n == line) {
            Some((_, c)) => *c += 1,
            None => counts.push((line.to_owned(), 1)),
        }
    }
    Ok(counts)
}

fn step_capture() -> Result<()> {
    header(
        3,
        "Catch an intermittent fault: a rotating capture of every hop at once",
        "seed 001: tcpdump -i eth0 -w file.pcap -W 10 -C 100 -G 60, on one interface at a time",
    );
    let dir = std::env::temp_dir().join(format!("podtrace-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let scratch = Scratch(dir);
    let file = scratch.0.join("pod-a1.pcapng");
    let file_s = file.to_str().ok_or_else(|| anyhow!("non-UTF-8 temp dir"))?;
    show(&format!(
        "podtrace capture pod-a1 --dst 10.244.1.5 -w {file_s} -C 1 -W 3 -c 60"
    ));
    let bg = Background::start(&[
        "capture",
        "pod-a1",
        "--dst",
        "10.244.1.5",
        "-w",
        file_s,
        "-C",
        "1",
        "-W",
        "3",
        "-c",
        "60",
        "--lab",
        PREFIX,
    ])?;
    lab_exec("pod-a1", &["ping", "-c", "3", "-i", "0.2", "10.244.1.5"])?;
    let (code, _, err) = bg.finish(20)?;
    indent(&err);
    if code != 0 {
        bail!("capture failed");
    }
    let files: Vec<PathBuf> = std::fs::read_dir(&scratch.0)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    println!();
    show("tshark -r FILE -Y 'icmp.type == 8' -T fields -e frame.interface_name | sort | uniq -c");
    let mut total = Vec::new();
    for f in &files {
        for (hop, n) in tshark_counts(f)? {
            match total
                .iter_mut()
                .find(|(h, _): &&mut (String, usize)| *h == hop)
            {
                Some((_, c)) => *c += n,
                None => total.push((hop, n)),
            }
        }
    }
    for (hop, n) in &total {
        println!("    {n:>4} {hop}");
    }
    std::io::stdout().flush()?;
    check(
        total.len() == 10 && total.iter().all(|(_, n)| *n == 3),
        "tshark reads 3 echo requests on each of the 10 hop interfaces (one pcapng interface per hop)",
    )
}

/// Runs and shows `podtrace verify eni pod-c2 --dst 10.19.0.11 --probe`.
fn verify_pod_c2() -> Result<(i32, String)> {
    show("podtrace verify eni pod-c2 --dst 10.19.0.11 --probe");
    let (code, out, _) = podtrace(&[
        "verify",
        "eni",
        "pod-c2",
        "--dst",
        "10.19.0.11",
        "--probe",
        "--lab",
        PREFIX,
    ])?;
    indent(&out);
    Ok((code, out))
}

fn step_verify_eni() -> Result<()> {
    header(
        4,
        "Does the ENI pod really bypass eth0?",
        "seeds 000/004: ip rule, ip route show table N, tcpdump on eth0 and eth2 while pinging",
    );
    let (code, out) = verify_pod_c2()?;
    check(
        code == 0 && out.contains("PASS"),
        "pod-c2's traffic used eth2 and table 3 both ways; 0 packets on eth0",
    )?;
    println!();
    let ns = crate::netns::path_of(&format!("{PREFIX}node-c"));
    show("podtrace lab exec node-c -- ip rule del from 10.19.0.32 lookup 3   (the fault)");
    let deleted = crate::netlink::in_ns(&ns, |nl| {
        nl.del_rules_from(std::net::Ipv4Addr::new(10, 19, 0, 32))
    })? > 0;
    if !deleted {
        bail!("pod-c2's rule was not found");
    }
    let (code, out) = verify_pod_c2()?;
    check(
        code == 1
            && out.contains("egress left via eth0: no `from 10.19.0.32` rule selects table 3"),
        "without its rule, the check fails and names the cause",
    )
}

fn step_agents(reg: &mut lab::registry::Registry) -> Result<()> {
    header(
        5,
        "Across machines: one agent per node, one timeline",
        "seeds 001/002: tcpdump on each node by hand, the files lined up by eye",
    );
    show(&format!("podtrace lab up --agents --prefix {PREFIX}   (an agent in each node, mutual TLS, reached from the underlay)"));
    lab::start_agents(reg)?;
    for a in &reg.agents {
        println!("    agent of {:<7} {} (pid {})", a.node, a.endpoint, a.pid);
    }
    println!();
    show(
        "podtrace follow pod-a1 --dst 10.244.1.5 -c 4   (now through node-a's and node-b's agents)",
    );
    let bg = Background::start(&[
        "follow",
        "pod-a1",
        "--dst",
        "10.244.1.5",
        "-c",
        "4",
        "--lab",
        PREFIX,
    ])?;
    lab_exec("pod-a1", &["ping", "-c", "2", "-i", "0.2", "10.244.1.5"])?;
    let (code, out, _) = bg.finish(20)?;
    // The first packet, then the verdict and the clocks.
    let packet = out
        .lines()
        .filter(|l| l.starts_with("following") || l.starts_with('#') || l.contains(" ms "))
        .take(12);
    let verdict = out
        .lines()
        .filter(|l| l.starts_with("verdict") || l.starts_with("clock of"));
    indent(&packet.chain(verdict).collect::<Vec<_>>().join("\n"));
    check(
        code == 0
            && out.contains("through their agents")
            && out.contains("verdict: CONFIRMED")
            && out.contains("clock of node-b"),
        "each node's agent traced its half; the front end merged one timeline, with node-b's clock offset estimated from the packets",
    )
}
