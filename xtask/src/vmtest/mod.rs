//! `cargo xtask vmtest [--kernel 5.10|6.1|6.12|all]`: podtrace on the kernels production
//! nodes run, each booted under QEMU (TCG: this machine has no usable KVM).
//!
//! For each kernel: an initramfs with the static podtrace, the guest agent (this binary, built
//! static, as /init), the host binaries the steps need with their libraries, and the kernel's
//! modules for the lab; QEMU boots it with one vCPU; the agent builds the lab, runs `topo`,
//! `follow` (confirmed and a netfilter drop, once per hook mechanism, which must agree),
//! `capture` (the pcapng comes back over the serial line and is read with tshark here),
//! `verify eni`, clsact coexistence on kernels without TCX, and the BTF-less refusal. The host
//! times every step with its own clock and prints a table per kernel; the full report goes to
//! target/vmtest/report.json.
mod assets;
mod guest;
mod initramfs;

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::{json, Value};

pub use assets::setup;

#[derive(clap::Args, Debug, Clone)]
pub struct VmtestArgs {
    /// Which kernel: 5.10 (bullseye), 6.1 (bookworm), 6.12 (trixie) or all.
    #[arg(long, default_value = "all")]
    pub kernel: String,
    /// Keep each guest's console log and initramfs in target/vmtest/ (they are always kept
    /// when a step fails).
    #[arg(long)]
    pub keep: bool,
    /// Run only the steps whose names start with one of these (comma-separated; the set-up
    /// steps always run). For working on one step; `test` runs them all.
    #[arg(long, value_name = "PREFIXES")]
    pub only: Option<String>,
}

/// Called first thing in main: as PID 1 this binary is the guest agent.
pub fn guest_if_pid1() {
    if std::process::id() == 1 {
        guest::main();
    }
}

/// What the host binaries the guest runs are (and the names they answer to there).
const HOST_BINARIES: &[&str] = &[
    "/usr/bin/ping",
    "/usr/sbin/xtables-legacy-multi",
    "/usr/sbin/tc",
    "/usr/sbin/ip",
    "/usr/bin/nsenter",
];

/// Kernel modules the lab and the steps need (dependencies come along): its devices, tc,
/// and the netfilter pieces kube-proxy's and flannel's rules use (legacy iptables backend).
const MODULES: &[&str] = &[
    "veth",
    "bridge",
    "br_netfilter",
    "vxlan",
    "sch_ingress",
    "cls_bpf",
    "act_gact",
    "ip_tables",
    "iptable_filter",
    "iptable_nat",
    "xt_conntrack",
    "xt_comment",
    "xt_mark",
    "xt_addrtype",
    "xt_statistic",
    "xt_tcpudp",
    "xt_nat",
    "xt_MASQUERADE",
    "ipt_REJECT",
];

/// Per-kernel time limit (host clock): generous for a loaded 2-core machine.
const VM_TIMEOUT: Duration = Duration::from_secs(25 * 60);

pub fn run(args: VmtestArgs) -> Result<()> {
    let wanted: Vec<assets::Series> = if args.kernel == "all" {
        assets::SERIES.to_vec()
    } else {
        args.kernel
            .split(',')
            .map(assets::series)
            .collect::<Result<_>>()?
    };
    let qemu = assets::qemu().ok_or_else(|| anyhow!("QEMU is missing: run `cargo xtask setup`"))?;
    let kernels: Vec<assets::Kernel> = wanted
        .iter()
        .map(|s| assets::Kernel::get(*s))
        .collect::<Result<_>>()?;
    let t_build = Instant::now();
    let podtrace = crate::build::static_podtrace()?;
    let agent = static_agent()?;
    check_static(&podtrace)?;
    check_static(&agent)?;
    let build_s = t_build.elapsed().as_secs_f64();
    let out_dir = crate::root().join("target/vmtest");
    fs::create_dir_all(&out_dir)?;

    let mut reports = Vec::new();
    let mut failed = false;
    for k in &kernels {
        let dir = out_dir.join(k.series.name);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        eprintln!("xtask: vmtest {} ({})", k.series.name, k.release);
        let initrd = dir.join("initramfs.cpio");
        build_initramfs(k, &podtrace, &agent, &initrd)?;
        let report = boot(&qemu, k, &initrd, &dir, args.only.as_deref())?;
        let ok = report.ok();
        failed |= !ok;
        print!("{}", report.table());
        if ok && !args.keep {
            let _ = fs::remove_file(&initrd);
        }
        reports.push(report);
    }
    let total: f64 = reports.iter().map(|r| r.total_s).sum();
    let json = json!({
        "build_s": build_s,
        "vm_total_s": total,
        "kernels": reports.iter().map(Report::json).collect::<Vec<_>>(),
    });
    fs::write(
        out_dir.join("report.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    eprintln!(
        "xtask: vmtest: static builds {build_s:.0} s, VMs {total:.0} s; report in {}",
        out_dir.join("report.json").display()
    );
    if failed {
        bail!(
            "vmtest: some steps failed (console logs in {})",
            out_dir.display()
        );
    }
    Ok(())
}

/// Builds this binary static (musl): the guest's /init.
fn static_agent() -> Result<PathBuf> {
    crate::build::static_build(&["--package", "xtask"])?;
    let bin = crate::root()
        .join("target")
        .join(crate::build::STATIC_TARGET)
        .join("release/xtask");
    if !bin.exists() {
        bail!("no static xtask at {}", bin.display());
    }
    Ok(bin)
}

/// Fails unless the ELF file has no program interpreter (statically linked).
fn check_static(path: &Path) -> Result<()> {
    let elf = fs::read(path)?;
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().expect("8 bytes"));
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" {
        bail!("{} is not an ELF file", path.display());
    }
    let phoff = u64_at(0x20) as usize;
    let phentsize = u16_at(0x36) as usize;
    let phnum = u16_at(0x38) as usize;
    for i in 0..phnum {
        const PT_INTERP: u32 = 3;
        if u32_at(phoff + i * phentsize) == PT_INTERP {
            bail!("{} is dynamically linked", path.display());
        }
    }
    Ok(())
}

fn build_initramfs(k: &assets::Kernel, podtrace: &Path, agent: &Path, out: &Path) -> Result<()> {
    let mut a = initramfs::Archive::default();
    for d in ["dev", "proc", "sys", "run", "tmp", "root", "etc", "var/run"] {
        a.dir(d);
    }
    a.char_dev("/dev/console", 5, 1);
    a.char_dev("/dev/null", 1, 3);
    a.file("/init", fs::read(agent)?, 0o755);
    a.file("/usr/bin/podtrace", fs::read(podtrace)?, 0o755);
    for b in HOST_BINARIES {
        a.host_binary(Path::new(b))
            .with_context(|| format!("adding {b} to the initramfs"))?;
    }
    // iptables (legacy backend: the modules are plain x_tables) and its extensions.
    for name in ["iptables", "iptables-save", "iptables-restore"] {
        a.symlink(&format!("/usr/sbin/{name}"), "xtables-legacy-multi");
    }
    let xtables = Path::new("/usr/lib/x86_64-linux-gnu/xtables");
    for e in fs::read_dir(xtables).context("reading the xtables extensions")? {
        a.host_binary(&e?.path())?;
    }
    let bb = assets::busybox();
    a.file("/bin/busybox", fs::read(&bb)?, 0o755);
    a.symlink("/bin/sh", "busybox");
    a.file(
        "/etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\n".to_vec(),
        0o644,
    );
    a.file("/etc/group", b"root:x:0:\n".to_vec(), 0o644);
    initramfs::add_modules(&mut a, &k.modules, MODULES)?;
    initramfs::write_to(&a, out)
}

/// One step as the host saw it.
#[derive(Debug, Clone)]
struct Step {
    name: String,
    passed: Option<bool>,
    seconds: f64,
    data: Value,
    error: Option<String>,
}

struct Report {
    series: &'static str,
    release: String,
    boot_s: f64,
    total_s: f64,
    steps: Vec<Step>,
    files: BTreeMap<String, Vec<u8>>,
    fatal: Option<String>,
    finished: bool,
}

impl Report {
    fn ok(&self) -> bool {
        self.finished
            && self.fatal.is_none()
            && !self.steps.is_empty()
            && self.steps.iter().all(|s| s.passed == Some(true))
    }

    /// Mechanisms as the follow steps reported them (first run of each kind).
    fn mechanisms(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        for s in &self.steps {
            if let Some(obj) = s.data["mechanisms"].as_object() {
                let forced = s.name.split('[').nth(1).unwrap_or("").trim_end_matches(']');
                for (k, v) in obj {
                    let v = v.as_str().unwrap_or("-").to_owned();
                    let key = if k == "tc" {
                        "tc".to_owned()
                    } else {
                        format!("{k} ({forced})")
                    };
                    m.entry(key).or_insert(v);
                }
            }
        }
        m
    }

    fn table(&self) -> String {
        let mut out = format!(
            "\nkernel {} ({}): {}; boot to agent {:.1} s, total {:.0} s\n",
            self.series,
            self.release,
            if self.ok() { "PASS" } else { "FAIL" },
            self.boot_s,
            self.total_s
        );
        for (k, v) in self.mechanisms() {
            out.push_str(&format!("  mechanism {k:<22} {v}\n"));
        }
        for s in &self.steps {
            out.push_str(&format!(
                "  {:<28} {:<5} {:>6.1} s{}\n",
                s.name,
                match s.passed {
                    Some(true) => "pass",
                    Some(false) => "FAIL",
                    None => "???",
                },
                s.seconds,
                s.error
                    .as_ref()
                    .map(|e| format!("  {e}"))
                    .unwrap_or_default()
            ));
        }
        if let Some(f) = &self.fatal {
            out.push_str(&format!("  fatal: {f}\n"));
        }
        if !self.finished {
            out.push_str("  the guest did not finish\n");
        }
        out
    }

    fn json(&self) -> Value {
        json!({
            "kernel": self.series,
            "release": self.release,
            "ok": self.ok(),
            "boot_s": self.boot_s,
            "total_s": self.total_s,
            "mechanisms": self.mechanisms(),
            "steps": self.steps.iter().map(|s| json!({
                "name": s.name, "passed": s.passed, "seconds": s.seconds,
                "data": s.data, "error": s.error,
            })).collect::<Vec<_>>(),
            "fatal": self.fatal,
        })
    }
}

/// Boots the kernel with the initramfs and collects the agent's report.
fn boot(
    qemu: &Path,
    k: &assets::Kernel,
    initrd: &Path,
    dir: &Path,
    only: Option<&str>,
) -> Result<Report> {
    let console = dir.join("console.log");
    let mut append = "console=ttyS0 panic=-1 loglevel=4 rdinit=/init".to_owned();
    if let Some(only) = only {
        append.push_str(&format!(" podtrace.only={only}"));
    }
    let started = Instant::now();
    let mut child = Command::new(qemu)
        .args(["-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", "1536"])
        .args([
            "-nodefaults",
            "-no-reboot",
            "-display",
            "none",
            "-nic",
            "none",
        ])
        .arg("-kernel")
        .arg(&k.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(&append)
        .arg("-chardev")
        .arg(format!("file,id=con,path={}", console.display()))
        .args(["-serial", "chardev:con"])
        .args([
            "-chardev",
            "stdio,id=rep,signal=off",
            "-serial",
            "chardev:rep",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting QEMU")?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut buf = Vec::new();
        while r.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
            let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
            buf.clear();
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    let mut report = Report {
        series: k.series.name,
        release: k.release.clone(),
        boot_s: 0.0,
        total_s: 0.0,
        steps: Vec::new(),
        files: BTreeMap::new(),
        fatal: None,
        finished: false,
    };
    let mut open: BTreeMap<String, Instant> = BTreeMap::new();
    let mut chunks: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let deadline = started + VM_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (at, line) = match rx.recv_timeout(left) {
            Ok(x) => x,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                report.fatal = Some(format!("timed out after {VM_TIMEOUT:?}"));
                let _ = child.kill();
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let Some(msg) = line
            .find("@pt ")
            .and_then(|i| serde_json::from_str::<Value>(&line[i + 4..]).ok())
        else {
            continue;
        };
        match msg["ev"].as_str().unwrap_or("") {
            "hello" => {
                report.boot_s = at.duration_since(started).as_secs_f64();
                report.release = msg["kernel"].as_str().unwrap_or("?").to_owned();
            }
            "step" => {
                let name = msg["name"].as_str().unwrap_or("?").to_owned();
                match msg["state"].as_str() {
                    Some("start") => {
                        eprintln!("xtask:   [{}] {name} ...", k.series.name);
                        open.insert(name, at);
                    }
                    Some(state) => {
                        let t0 = open.remove(&name).unwrap_or(at);
                        let step = Step {
                            name: name.clone(),
                            passed: Some(state == "pass"),
                            seconds: at.duration_since(t0).as_secs_f64(),
                            data: msg["data"].clone(),
                            error: msg["error"].as_str().map(str::to_owned),
                        };
                        eprintln!(
                            "xtask:   [{}] {name}: {state} ({:.1} s){}",
                            k.series.name,
                            step.seconds,
                            step.error
                                .as_ref()
                                .map(|e| format!(": {e}"))
                                .unwrap_or_default()
                        );
                        report.steps.push(step);
                    }
                    None => {}
                }
            }
            "file" => {
                let hex = msg["hex"].as_str().unwrap_or("");
                let buf = chunks
                    .entry(msg["name"].as_str().unwrap_or("?").to_owned())
                    .or_default();
                buf.extend(
                    (0..hex.len() / 2)
                        .filter_map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()),
                );
            }
            "file-end" => {
                let name = msg["name"].as_str().unwrap_or("?").to_owned();
                let data = chunks.remove(&name).unwrap_or_default();
                if msg["len"].as_u64() != Some(data.len() as u64) {
                    report.fatal = Some(format!("{name}: a file arrived damaged"));
                }
                report.files.insert(name, data);
            }
            "fatal" => report.fatal = msg["error"].as_str().map(str::to_owned),
            "done" => {
                report.finished = true;
            }
            _ => {}
        }
    }
    let status = wait_timeout(&mut child, Duration::from_secs(60))?;
    report.total_s = started.elapsed().as_secs_f64();
    if !report.finished && report.fatal.is_none() {
        report.fatal = Some(format!(
            "QEMU ended ({status}) before the guest finished; see {}",
            console.display()
        ));
    }
    // Host-side checks on what came back.
    if let Some(pcap) = report.files.get("capture.pcapng").cloned() {
        let path = dir.join("capture.pcapng");
        fs::write(&path, &pcap)?;
        let t0 = Instant::now();
        let result = check_capture(&path);
        report.steps.push(Step {
            name: "capture-read-on-host".into(),
            passed: Some(result.is_ok()),
            seconds: t0.elapsed().as_secs_f64(),
            data: result.as_ref().cloned().unwrap_or(Value::Null),
            error: result.err().map(|e| format!("{e:#}")),
        });
    }
    Ok(report)
}

fn wait_timeout(child: &mut std::process::Child, t: Duration) -> Result<std::process::ExitStatus> {
    let deadline = Instant::now() + t;
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(s);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            return Ok(child.wait()?);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Reads the guest's capture with tshark: ICMP both ways, on several hops (pcapng interfaces
/// named OWNER/IFNAME).
fn check_capture(path: &Path) -> Result<Value> {
    let out = Command::new("tshark")
        .arg("-r")
        .arg(path)
        .args([
            "-T",
            "fields",
            "-e",
            "frame.interface_name",
            "-e",
            "icmp.type",
        ])
        .output()
        .context("running tshark")?;
    if !out.status.success() {
        bail!(
            "tshark could not read it: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut interfaces = std::collections::BTreeSet::new();
    let (mut requests, mut replies) = (0, 0);
    for line in text.lines() {
        let mut f = line.split('\t');
        let iface = f.next().unwrap_or("");
        let types = f.next().unwrap_or("");
        interfaces.insert(iface.to_owned());
        // Inside VXLAN tshark lists the inner ICMP type.
        if types.split(',').any(|t| t == "8") {
            requests += 1;
        }
        if types.split(',').any(|t| t == "0") {
            replies += 1;
        }
    }
    if requests == 0 || replies == 0 || !interfaces.contains("pod-a1/eth0") {
        bail!("want echo requests and replies on pod-a1/eth0 and more; got {requests} requests, {replies} replies on {interfaces:?}");
    }
    Ok(
        json!({"packets": text.lines().count(), "requests": requests, "replies": replies,
        "interfaces": interfaces}),
    )
}
