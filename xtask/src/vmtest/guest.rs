//! The guest agent: the same xtask binary, static, runs as the VM's /init (PID 1). It mounts
//! what podtrace needs, loads the lab's kernel modules, runs every step against the static
//! podtrace and reports over the second serial port (/dev/ttyS1), one `@pt {json}` line per
//! event, to the host, which times the steps with its own clock (the guest's is not to be
//! trusted under emulation). Files (the capture) travel as hex chunks on the same channel.
//! Then it powers the VM off.
use std::{
    collections::BTreeSet,
    ffi::CString,
    fs::{self, File, OpenOptions},
    io::{BufRead as _, BufReader, Write as _},
    os::{fd::AsRawFd as _, unix::process::ExitStatusExt as _},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc::{self, Receiver},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::{json, Value};

pub const PODTRACE: &str = "/usr/bin/podtrace";
/// The lab's prefix in the guest.
const LAB: &str = "pt-";

/// The report channel to the host.
struct Report(File);

impl Report {
    fn open() -> Result<Self> {
        let f = OpenOptions::new()
            .write(true)
            .open("/dev/ttyS1")
            .context("opening /dev/ttyS1")?;
        // Raw: no "\n" → "\r\n", no echo processing.
        // SAFETY: termios calls on a valid fd with a zeroed struct filled by tcgetattr.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(f.as_raw_fd(), &mut t) == 0 {
                libc::cfmakeraw(&mut t);
                libc::tcsetattr(f.as_raw_fd(), libc::TCSANOW, &t);
            }
        }
        Ok(Self(f))
    }

    fn send(&mut self, v: Value) {
        let _ = writeln!(self.0, "@pt {v}");
        let _ = self.0.flush();
    }

    fn file(&mut self, name: &str, data: &[u8]) {
        for (i, chunk) in data.chunks(2048).enumerate() {
            let hex: String = chunk.iter().map(|b| format!("{b:02x}")).collect();
            self.send(json!({"ev": "file", "name": name, "chunk": i, "hex": hex}));
        }
        self.send(json!({"ev": "file-end", "name": name, "len": data.len()}));
    }
}

/// Entry point when the binary is PID 1.
pub fn main() -> ! {
    let _ = early_mounts();
    let result = Report::open().map(|mut r| {
        let mut g = Guest { report: &mut r };
        if let Err(e) = g.run() {
            g.report
                .send(json!({"ev": "fatal", "error": format!("{e:#}")}));
        }
        r.send(json!({"ev": "done"}));
    });
    if let Err(e) = result {
        eprintln!("vmtest guest: {e:#}");
    }
    // SAFETY: plain syscalls; PID 1 powering the machine off.
    unsafe {
        libc::sync();
        libc::reboot(libc::LINUX_REBOOT_CMD_POWER_OFF);
    }
    loop {
        std::thread::park();
    }
}

fn mount(source: &str, target: &str, fstype: &str, data: Option<&str>) -> Result<()> {
    fs::create_dir_all(target)?;
    let c = |s: &str| CString::new(s).expect("no NUL");
    let data = data.map(c);
    // SAFETY: valid C strings for the call's duration.
    let rc = unsafe {
        libc::mount(
            c(source).as_ptr(),
            c(target).as_ptr(),
            c(fstype).as_ptr(),
            0,
            data.as_ref()
                .map_or(std::ptr::null(), |d| d.as_ptr().cast()),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("mounting {target}"));
    }
    Ok(())
}

fn umount(target: &str) -> Result<()> {
    let t = CString::new(target)?;
    // SAFETY: valid C string.
    if unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("unmounting {target}"));
    }
    Ok(())
}

fn early_mounts() -> Result<()> {
    mount("devtmpfs", "/dev", "devtmpfs", None)?;
    mount("proc", "/proc", "proc", None)?;
    mount("sysfs", "/sys", "sysfs", None)?;
    mount("tmpfs", "/run", "tmpfs", Some("mode=0755"))?;
    mount("tmpfs", "/tmp", "tmpfs", None)?;
    let _ = mount("tracefs", "/sys/kernel/tracing", "tracefs", None);
    std::env::set_var("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    std::env::set_var("HOME", "/root");
    Ok(())
}

fn load_modules() -> Result<Vec<String>> {
    let list = fs::read_to_string("/modules.load").unwrap_or_default();
    let mut loaded = Vec::new();
    for path in list.lines().filter(|l| !l.is_empty()) {
        let f = File::open(path).with_context(|| format!("opening {path}"))?;
        let params = CString::new("")?;
        // SAFETY: finit_module with a valid fd and an empty parameter string.
        let rc =
            unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), params.as_ptr(), 0) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(e).with_context(|| format!("loading {path}"));
            }
        }
        loaded.push(
            Path::new(path)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
    }
    Ok(loaded)
}

/// The kernel release, from uname(2).
fn release() -> String {
    // SAFETY: uname fills the struct.
    unsafe {
        let mut u: libc::utsname = std::mem::zeroed();
        libc::uname(&mut u);
        std::ffi::CStr::from_ptr(u.release.as_ptr())
            .to_string_lossy()
            .into_owned()
    }
}

/// (major, minor) of a release string.
fn version(release: &str) -> (u32, u32) {
    let mut it = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse().ok());
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// A finished command.
#[derive(Debug)]
struct Out {
    code: Option<i32>,
    signal: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Out {
    fn ok(&self) -> bool {
        self.code == Some(0)
    }

    fn brief(&self) -> String {
        let mut s = format!("exit {:?}", self.code);
        let tail = |t: &str| -> String {
            let lines: Vec<&str> = t.lines().collect();
            lines[lines.len().saturating_sub(6)..].join(" | ")
        };
        if !self.stderr.trim().is_empty() {
            s.push_str(&format!("; stderr: {}", tail(&self.stderr)));
        }
        if !self.stdout.trim().is_empty() {
            s.push_str(&format!("; stdout: {}", tail(&self.stdout)));
        }
        s
    }
}

/// A command running in the background whose output is read line by line.
struct Bg {
    child: Child,
    lines: Receiver<(bool, String)>,
    stdout: Vec<String>,
    stderr: Vec<String>,
}

impl Bg {
    fn start(program: &str, args: &[&str]) -> Result<Self> {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().expect("piped");
        let err = child.stderr.take().expect("piped");
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send((false, l));
            }
        });
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx2.send((true, l));
            }
        });
        Ok(Self {
            child,
            lines: rx,
            stdout: Vec::new(),
            stderr: Vec::new(),
        })
    }

    fn take(&mut self, (is_err, line): (bool, String)) {
        if is_err {
            self.stderr.push(line);
        } else {
            self.stdout.push(line);
        }
    }

    /// Waits for `probes live` (stderr) or the `{"type":"ready"}` line (stdout); returns the
    /// ready object when there is one.
    fn wait_ready(&mut self, timeout: Duration) -> Result<Option<Value>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((is_err, line)) => {
                    let ready = if is_err {
                        line.contains("probes live").then_some(None)
                    } else {
                        serde_json::from_str::<Value>(&line)
                            .ok()
                            .filter(|v| v["type"] == "ready")
                            .map(Some)
                    };
                    self.take((is_err, line));
                    if let Some(r) = ready {
                        return Ok(r);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    bail!(
                        "not ready within {timeout:?}; stderr: {}",
                        self.stderr.join(" | ")
                    )
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait()?;
                    bail!(
                        "exited ({status}) before it was ready; stderr: {}",
                        self.stderr.join(" | ")
                    )
                }
            }
        }
    }

    fn signal(&self, sig: i32) -> Result<()> {
        // SAFETY: kill(2) on our child's pid.
        if unsafe { libc::kill(self.child.id() as i32, sig) } != 0 {
            return Err(std::io::Error::last_os_error()).context("kill");
        }
        Ok(())
    }

    /// Waits for it to end (killing it after `timeout`) and collects its output.
    fn finish(mut self, timeout: Duration) -> Result<Out> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait()? {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let s = self.child.wait()?;
                while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.take(l);
                }
                bail!(
                    "did not end within {timeout:?} ({s}); stderr: {}",
                    self.stderr.join(" | ")
                );
            }
            // Not synchronisation: a bounded wait for the process's exit.
            if let Ok(l) = self.lines.recv_timeout(Duration::from_millis(50)) {
                self.take(l);
            }
        };
        // The readers end with the pipes.
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.take(l);
        }
        Ok(Out {
            code: status.code(),
            signal: status.signal(),
            stdout: self.stdout.join("\n"),
            stderr: self.stderr.join("\n"),
        })
    }
}

/// Runs a command to its end (at most `timeout`).
fn run(program: &str, args: &[&str], timeout: Duration) -> Result<Out> {
    Bg::start(program, args)?.finish(timeout)
}

fn podtrace(args: &[&str]) -> Result<Out> {
    run(PODTRACE, args, Duration::from_secs(300))
}

/// Runs a command inside a lab member through `podtrace lab exec`.
fn lab_exec(name: &str, cmd: &[&str]) -> Result<Out> {
    let mut args = vec!["lab", "exec", name, "--"];
    args.extend_from_slice(cmd);
    podtrace(&args)
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn summary_of(out: &Out) -> Result<Value> {
    json_lines(&out.stdout)
        .into_iter()
        .find(|v| v["type"] == "summary")
        .ok_or_else(|| anyhow!("no summary line; {}", out.brief()))
}

/// The kernel-side evidence of a follow run, without timestamps, for comparing the kprobe
/// and the tracepoint runs: drops (hop, reason), FIB decisions and transmit devices.
fn evidence(out: &Out) -> Value {
    let mut drops = BTreeSet::new();
    let mut fib = BTreeSet::new();
    let mut xmit = BTreeSet::new();
    for p in json_lines(&out.stdout)
        .into_iter()
        .filter(|v| v["type"] == "packet")
    {
        if let Some(d) = p["drop"].as_object() {
            drops.insert(format!("{} {}", d["location"], d["reason"]));
        }
        for f in p["fib"].as_array().into_iter().flatten() {
            fib.insert(format!(
                "{} table {} oif {} gw {} err {}",
                f["location"], f["table"], f["oif"], f["gateway"], f["err"]
            ));
        }
        for x in p["xmit"].as_array().into_iter().flatten() {
            xmit.insert(x.as_str().unwrap_or_default().to_owned());
        }
    }
    json!({"drops": drops, "fib": fib, "xmit": xmit})
}

/// The mechanisms a ready line names: tc attachment and each kernel hook (or why none).
fn mechanisms(ready: &Value) -> Value {
    let mut m = json!({"tc": ready["tc"]});
    for h in ready["kernel_hooks"].as_array().into_iter().flatten() {
        if let Some(e) = h["evidence"].as_str() {
            m[e] = match h["attached"].as_str() {
                Some(a) => json!(a),
                None => json!(format!(
                    "none ({})",
                    h["notes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|n| n.as_str())
                        .collect::<Vec<_>>()
                        .join("; ")
                )),
            };
        }
    }
    m
}

/// Step names to run (`podtrace.only=a,b` on the kernel command line, for working on one
/// step); the set-up steps always run.
fn selected(name: &str) -> bool {
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let Some(only) = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("podtrace.only="))
    else {
        return true;
    };
    ["modules", "static-binary", "lab-up", "lab-down"].contains(&name)
        || only.split(',').any(|p| name.starts_with(p))
}

struct Guest<'a> {
    report: &'a mut Report,
}

/// Lab addresses (shared/design.md §3).
const POD_B1: &str = "10.244.1.5";
const MASTER: &str = "10.19.0.11";

impl Guest<'_> {
    fn step(&mut self, name: &str, f: impl FnOnce(&mut Self) -> Result<Value>) -> bool {
        if !selected(name) {
            return true;
        }
        self.report
            .send(json!({"ev": "step", "name": name, "state": "start"}));
        match f(self) {
            Ok(data) => {
                self.report
                    .send(json!({"ev": "step", "name": name, "state": "pass", "data": data}));
                true
            }
            Err(e) => {
                self.report
                    .send(json!({"ev": "step", "name": name, "state": "fail",
                    "error": format!("{e:#}")}));
                false
            }
        }
    }

    fn run(&mut self) -> Result<()> {
        let release = release();
        let (major, minor) = version(&release);
        let kprobes = Path::new("/sys/bus/event_source/devices/kprobe/type").exists();
        let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
        self.report.send(json!({"ev": "hello", "kernel": release,
            "btf": btf, "kprobe_pmu": kprobes}));
        self.step("modules", |_| Ok(json!(load_modules()?)));
        let static_ok = self.step("static-binary", |_| {
            let out = podtrace(&["--version"])?;
            if !out.ok() {
                bail!("podtrace --version: {}", out.brief());
            }
            Ok(json!(out.stdout.trim()))
        });
        if !static_ok {
            return Ok(());
        }
        if !self.step("lab-up", |_| {
            let out = run(
                PODTRACE,
                &["lab", "up", "--topology", "all", "--prefix", LAB],
                Duration::from_secs(300),
            )?;
            if !out.ok() {
                bail!("{}", out.brief());
            }
            Ok(Value::Null)
        }) {
            return Ok(());
        }
        self.step("topo", |_| {
            let mut cnis = Vec::new();
            for (pod, dst, want) in [
                ("pod-a1", POD_B1, "flannel-vxlan"),
                ("pod-c1", MASTER, "aws-vpc-cni"),
            ] {
                let out = podtrace(&["topo", pod, "--dst", dst, "--json"])?;
                let v: Value = serde_json::from_str(out.stdout.trim())
                    .map_err(|_| anyhow!("topo {pod}: no JSON; {}", out.brief()))?;
                if !out.ok() || v["cni"] != want {
                    bail!(
                        "topo {pod}: cni {} (want {want}); {}",
                        v["cni"],
                        out.brief()
                    );
                }
                cnis.push(format!("{pod}: {want}"));
            }
            Ok(json!(cnis))
        });

        // Which hook mechanisms this kernel offers: both are run and must agree.
        let mut mechs = vec!["tracepoint"];
        if kprobes {
            mechs.push("kprobe");
        }
        let reason_expected = if (major, minor) >= (5, 17) {
            "NETFILTER_DROP"
        } else {
            "unreported"
        };
        let mut confirmed_ev = Vec::new();
        let mut drop_ev = Vec::new();
        let mut tc_mode = Value::Null;
        for mech in &mechs {
            let mut ev = Value::Null;
            self.step(&format!("follow-confirmed[{mech}]"), |_| {
                let mut bg = Bg::start(
                    PODTRACE,
                    &[
                        "follow", "pod-a1", "--dst", POD_B1, "--proto", "icmp", "-c", "6",
                        "--json", "--hooks", mech,
                    ],
                )?;
                let ready = bg
                    .wait_ready(Duration::from_secs(180))?
                    .ok_or_else(|| anyhow!("no ready object"))?;
                let ping = lab_exec(
                    "pod-a1",
                    &["ping", "-c", "3", "-i", "0.2", "-W", "2", POD_B1],
                )?;
                let out = bg.finish(Duration::from_secs(120))?;
                if !ping.ok() {
                    bail!("ping failed: {}", ping.brief());
                }
                tc_mode = ready["tc"].clone();
                let summary = summary_of(&out)?;
                if summary["verdict"] != "confirmed" || !out.ok() {
                    bail!("verdict {} ({})", summary["verdict"], out.brief());
                }
                ev = evidence(&out);
                Ok(json!({"mechanisms": mechanisms(&ready), "evidence": ev}))
            });
            confirmed_ev.push((mech.to_string(), ev));

            let mut ev = Value::Null;
            self.step(&format!("follow-drop[{mech}]"), |_| {
                let rule = ["-p", "icmp", "-j", "DROP"];
                let add = lab_exec(
                    "node-a",
                    &[
                        "iptables", "-I", "FORWARD", rule[0], rule[1], rule[2], rule[3],
                    ],
                )?;
                if !add.ok() {
                    bail!("iptables -I: {}", add.brief());
                }
                let result = (|| -> Result<Value> {
                    let mut bg = Bg::start(
                        PODTRACE,
                        &[
                            "follow", "pod-a1", "--dst", POD_B1, "--proto", "icmp", "-c", "2",
                            "--json", "--hooks", mech,
                        ],
                    )?;
                    let ready = bg
                        .wait_ready(Duration::from_secs(180))?
                        .ok_or_else(|| anyhow!("no ready object"))?;
                    let ping = lab_exec(
                        "pod-a1",
                        &["ping", "-c", "2", "-i", "0.2", "-W", "1", POD_B1],
                    )?;
                    let out = bg.finish(Duration::from_secs(120))?;
                    if ping.ok() {
                        bail!("ping went through the DROP rule");
                    }
                    let summary = summary_of(&out)?;
                    let drops = summary["drops"].as_array().cloned().unwrap_or_default();
                    if summary["verdict"] != "dropped" || out.code != Some(1) {
                        bail!("verdict {} ({})", summary["verdict"], out.brief());
                    }
                    let d = drops.first().ok_or_else(|| anyhow!("no drop listed"))?;
                    if d["hop"] != "node-a/cni0" || d["reason"] != reason_expected {
                        bail!(
                            "drop at {} reason {} (want node-a/cni0, {reason_expected})",
                            d["hop"],
                            d["reason"]
                        );
                    }
                    ev = evidence(&out);
                    Ok(json!({"mechanisms": mechanisms(&ready), "drop": d, "evidence": ev}))
                })();
                let del = lab_exec(
                    "node-a",
                    &[
                        "iptables", "-D", "FORWARD", rule[0], rule[1], rule[2], rule[3],
                    ],
                )?;
                if !del.ok() {
                    bail!("iptables -D: {}", del.brief());
                }
                result
            });
            drop_ev.push((mech.to_string(), ev));
        }
        if mechs.len() > 1 {
            self.step("hooks-agree", |_| {
                for (what, evs) in [("confirmed", &confirmed_ev), ("drop", &drop_ev)] {
                    let (m0, e0) = &evs[0];
                    for (m, e) in &evs[1..] {
                        if e0.is_null() || e.is_null() {
                            bail!("{what}: a run failed, nothing to compare");
                        }
                        if e0 != e {
                            bail!("{what}: {m0} saw {e0}, {m} saw {e}");
                        }
                    }
                }
                Ok(json!({"confirmed": confirmed_ev[0].1, "drop": drop_ev[0].1}))
            });
        }

        self.step("capture", |g| {
            let file = "/tmp/capture.pcapng";
            let mut bg = Bg::start(
                PODTRACE,
                &["capture", "pod-a1", "--dst", POD_B1, "-w", file, "-c", "12"],
            )?;
            bg.wait_ready(Duration::from_secs(180))?;
            let ping = lab_exec(
                "pod-a1",
                &["ping", "-c", "2", "-i", "0.2", "-W", "2", POD_B1],
            )?;
            let out = bg.finish(Duration::from_secs(120))?;
            if !ping.ok() || !out.ok() {
                bail!("ping: {}; capture: {}", ping.brief(), out.brief());
            }
            let data = fs::read(file).with_context(|| format!("reading {file}"))?;
            g.report.file("capture.pcapng", &data);
            Ok(json!({"bytes": data.len()}))
        });

        self.step("verify-eni", |_| {
            let out = podtrace(&[
                "verify", "eni", "pod-c1", "--dst", MASTER, "--probe", "--json",
            ])?;
            let verdict = json_lines(&out.stdout)
                .into_iter()
                .find(|v| v["type"] == "verdict")
                .ok_or_else(|| anyhow!("no verdict; {}", out.brief()))?;
            if verdict["verdict"] != "pass" || !out.ok() {
                bail!("verdict {}: {}", verdict["verdict"], out.brief());
            }
            Ok(json!({"eni": verdict["eni"], "table": verdict["table"]}))
        });

        if tc_mode == "clsact" {
            self.clsact_steps();
        }

        self.step("no-btf", |_| {
            mount("tmpfs", "/sys/kernel/btf", "tmpfs", None)?;
            let out = podtrace(&["follow", "pod-a1", "--dst", POD_B1, "-c", "1"]);
            umount("/sys/kernel/btf")?;
            let out = out?;
            let lines: Vec<&str> = out.stderr.lines().collect();
            if out.code != Some(2) || lines.len() != 1 || !lines[0].contains("BTF") {
                bail!("want exit 2 and one line naming BTF; {}", out.brief());
            }
            Ok(json!(lines[0]))
        });

        self.step("lab-down", |_| {
            let out = podtrace(&["lab", "down", "--prefix", LAB])?;
            if !out.ok() {
                bail!("{}", out.brief());
            }
            Ok(Value::Null)
        });
        Ok(())
    }

    /// Kernels without TCX: podtrace's clsact filters beside a CNI's, removed on SIGINT and
    /// SIGTERM, and cleaned up by the next run after SIGKILL.
    fn clsact_steps(&mut self) {
        // Every follow above has ended: nothing of podtrace's may be left.
        self.step("clsact-clean-after-runs", |_| {
            let left = podtrace_tc_state()?;
            if !left.is_empty() {
                bail!("left behind: {left:?}");
            }
            Ok(Value::Null)
        });
        let veth = match host_veth("pod-a1") {
            Ok(v) => v,
            Err(e) => {
                self.step("clsact-coexist", |_| Err(e));
                return;
            }
        };
        let node_a = format!("{LAB}node-a");
        // The CNI stand-in: a clsact qdisc of its own and, at priority 1, a cls_bpf program
        // (classic BPF, accepts all) whose action ends classification (`ok`), as a CNI's
        // direct-action program returning TC_ACT_OK does. A filter after it never runs.
        let cni_ok = self.step("clsact-cni-stand-in", |_| {
            tc(&node_a, &["qdisc", "add", "dev", &veth, "clsact"])?;
            tc(
                &node_a,
                &[
                    "filter",
                    "add",
                    "dev",
                    &veth,
                    "ingress",
                    "prio",
                    "1",
                    "handle",
                    "1",
                    "protocol",
                    "all",
                    "bpf",
                    "bytecode",
                    "1,6 0 0 4294967295,",
                    "action",
                    "ok",
                ],
            )?;
            Ok(json!({"dev": veth, "packets": cni_packets(&node_a, &veth)?}))
        });
        if !cni_ok {
            return;
        }
        self.step("clsact-coexist", |_| {
            let before = cni_packets(&node_a, &veth)?;
            let mut bg = Bg::start(
                PODTRACE,
                &[
                    "follow", "pod-a1", "--dst", POD_B1, "--proto", "icmp", "-c", "6", "--json",
                ],
            )?;
            bg.wait_ready(Duration::from_secs(180))?;
            let during = tc_filters(&node_a, &veth, "ingress")?;
            let ping = lab_exec(
                "pod-a1",
                &["ping", "-c", "3", "-i", "0.2", "-W", "2", POD_B1],
            )?;
            let out = bg.finish(Duration::from_secs(120))?;
            let after = cni_packets(&node_a, &veth)?;
            let summary = summary_of(&out)?;
            let ours: Vec<&Value> = during
                .iter()
                .filter(|f| {
                    f["options"]["bpf_name"]
                        .as_str()
                        .is_some_and(|n| n.starts_with("hop_"))
                })
                .collect();
            if ours.len() != 1 || ours[0]["pref"] != 1 {
                bail!("podtrace's filter on {veth} ingress should share priority 1: {during:?}");
            }
            if !ping.ok() || summary["verdict"] != "confirmed" {
                bail!(
                    "verdict {} with the CNI's filter in place ({})",
                    summary["verdict"],
                    out.brief()
                );
            }
            if after < before + 3 {
                bail!(
                    "the CNI's filter ran {} times for 3 echo requests",
                    after - before
                );
            }
            let left = podtrace_tc_state()?;
            if !left.is_empty() {
                bail!("left behind: {left:?}");
            }
            if !has_clsact(&node_a, &veth)? || cni_filter(&node_a, &veth)?.is_none() {
                bail!("the CNI's qdisc or filter on {veth} is gone");
            }
            Ok(json!({"cni_packets": after - before, "shared_priority": 1}))
        });
        for (sig, name) in [(libc::SIGINT, "SIGINT"), (libc::SIGTERM, "SIGTERM")] {
            self.step(&format!("clsact-{name}"), |_| {
                let bg = start_and_wait_follow()?;
                let attached = podtrace_tc_state()?.len();
                if attached == 0 {
                    bail!("no podtrace filters while it runs");
                }
                bg.signal(sig)?;
                let out = bg.finish(Duration::from_secs(120))?;
                if out.signal.is_some() {
                    bail!(
                        "killed by the signal instead of handling it ({})",
                        out.brief()
                    );
                }
                let left = podtrace_tc_state()?;
                if !left.is_empty() {
                    bail!("left behind after {name}: {left:?}");
                }
                if cni_filter(&node_a, &veth)?.is_none() {
                    bail!("the CNI's filter is gone");
                }
                Ok(json!({"filters_while_running": attached}))
            });
        }
        self.step("clsact-SIGKILL-guard", |_| {
            // The guard (podtrace __clsact-guard, a child of its own group) removes what a
            // killed podtrace left, at once.
            let bg = start_and_wait_follow()?;
            let pid = bg.child.id();
            if guard_of(pid).is_none() {
                bail!("no guard process beside podtrace {pid}");
            }
            bg.signal(libc::SIGKILL)?;
            let out = bg.finish(Duration::from_secs(60))?;
            if out.signal != Some(libc::SIGKILL) {
                bail!("not killed: {}", out.brief());
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                let left = podtrace_tc_state()?;
                if left.is_empty() {
                    break;
                }
                if std::time::Instant::now() > deadline {
                    bail!("the guard left: {left:?}");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if cni_filter(&node_a, &veth)?.is_none() {
                bail!("the CNI's filter is gone");
            }
            Ok(Value::Null)
        });
        self.step("clsact-SIGKILL-both-then-clean-up", |_| {
            // Owner and guard killed together (a whole cgroup): the next run cleans up.
            let bg = start_and_wait_follow()?;
            let pid = bg.child.id();
            let guard = guard_of(pid).ok_or_else(|| anyhow!("no guard beside {pid}"))?;
            // SAFETY: plain syscall.
            unsafe { libc::kill(guard as i32, libc::SIGKILL) };
            std::thread::sleep(Duration::from_millis(200));
            bg.signal(libc::SIGKILL)?;
            let out = bg.finish(Duration::from_secs(60))?;
            if out.signal != Some(libc::SIGKILL) {
                bail!("not killed: {}", out.brief());
            }
            let left = podtrace_tc_state()?;
            let record = fs::read_dir("/run/podtrace/tc")?
                .flatten()
                .map(|e| e.path())
                .find(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{pid}-")))
                });
            let Some(record) = record else {
                bail!("a killed podtrace and guard should leave a record ({left:?})");
            };
            if left.len() < 2 {
                bail!("a killed podtrace and guard should leave their filters ({left:?})");
            }
            // The next run cleans up, says so, and works.
            let mut bg = Bg::start(
                PODTRACE,
                &[
                    "follow", "pod-a1", "--dst", POD_B1, "--proto", "icmp", "-c", "6", "--json",
                ],
            )?;
            bg.wait_ready(Duration::from_secs(180))?;
            let ping = lab_exec(
                "pod-a1",
                &["ping", "-c", "3", "-i", "0.2", "-W", "2", POD_B1],
            )?;
            let out = bg.finish(Duration::from_secs(120))?;
            let said = out
                .stderr
                .lines()
                .find(|l| l.contains("left behind") && l.contains(&pid.to_string()))
                .map(str::to_owned)
                .ok_or_else(|| {
                    anyhow!("the next run did not say it cleaned up: {}", out.brief())
                })?;
            let summary = summary_of(&out)?;
            if !ping.ok() || summary["verdict"] != "confirmed" {
                bail!(
                    "verdict {} after the clean-up ({})",
                    summary["verdict"],
                    out.brief()
                );
            }
            let left = podtrace_tc_state()?;
            if !left.is_empty() || record.exists() {
                bail!("still left after the next run: {left:?}");
            }
            if cni_filter(&node_a, &veth)?.is_none() {
                bail!("the CNI's filter is gone");
            }
            Ok(json!({"left_by_kill": left.len(), "message": said}))
        });
        let _ = tc(&node_a, &["qdisc", "del", "dev", &veth, "clsact"]);
    }
}

/// The pid of the clsact guard podtrace `pid` started, if there is one.
fn guard_of(pid: u32) -> Option<u32> {
    fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let child: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = fs::read_to_string(e.path().join("stat")).ok()?;
        let ppid: u32 = stat[stat.rfind(')')? + 2..]
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        let cmdline = fs::read(e.path().join("cmdline")).ok()?;
        (ppid == pid && String::from_utf8_lossy(&cmdline).contains("__clsact-guard"))
            .then_some(child)
    })
}

/// Starts `follow` (without a count) and waits until it is ready.
fn start_and_wait_follow() -> Result<Bg> {
    let mut bg = Bg::start(
        PODTRACE,
        &[
            "follow",
            "pod-a1",
            "--dst",
            POD_B1,
            "--duration",
            "600",
            "--json",
        ],
    )?;
    bg.wait_ready(Duration::from_secs(180))?;
    Ok(bg)
}

/// `tc -n NS ARGS...`, which must succeed; its stdout.
fn tc(ns: &str, args: &[&str]) -> Result<String> {
    let mut a = vec!["-n", ns];
    a.extend_from_slice(args);
    let out = run("/usr/sbin/tc", &a, Duration::from_secs(60))?;
    if !out.ok() {
        bail!("tc {}: {}", a.join(" "), out.brief());
    }
    Ok(out.stdout)
}

/// The filters on a clsact hook (`tc -j filter show`), only the entries with options.
fn tc_filters(ns: &str, dev: &str, hook: &str) -> Result<Vec<Value>> {
    let text = tc(ns, &["-j", "-s", "filter", "show", "dev", dev, hook])?;
    let v: Value = serde_json::from_str(text.trim()).unwrap_or(Value::Array(Vec::new()));
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter(|f| f.get("options").is_some())
        .cloned()
        .collect())
}

fn has_clsact(ns: &str, dev: &str) -> Result<bool> {
    let text = tc(ns, &["-j", "qdisc", "show", "dev", dev])?;
    let v: Value = serde_json::from_str(text.trim()).unwrap_or(Value::Array(Vec::new()));
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .any(|q| q["kind"] == "clsact"))
}

/// The CNI stand-in's filter (priority 1, handle 1, classic bpf).
fn cni_filter(ns: &str, dev: &str) -> Result<Option<Value>> {
    Ok(tc_filters(ns, dev, "ingress")?.into_iter().find(|f| {
        f["pref"] == 1
            && f["options"]["handle"] == "0x1"
            && f["options"]["bpf_name"]
                .as_str()
                .is_none_or(|n| !n.starts_with("hop_"))
    }))
}

/// Packets the CNI stand-in's action has handled.
fn cni_packets(ns: &str, dev: &str) -> Result<u64> {
    let f = cni_filter(ns, dev)?.ok_or_else(|| anyhow!("no CNI filter on {dev}"))?;
    f["options"]["actions"][0]["stats"]["packets"]
        .as_u64()
        .ok_or_else(|| anyhow!("no action statistics in {f}"))
}

/// The host veth of a lab pod, from `topo`.
fn host_veth(pod: &str) -> Result<String> {
    let out = podtrace(&["topo", pod, "--json"])?;
    let v: Value = serde_json::from_str(out.stdout.trim())
        .map_err(|_| anyhow!("topo {pod}: {}", out.brief()))?;
    v["hops"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|h| h["role"] == "host-veth")
        .and_then(|h| h["ifname"].as_str())
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("topo {pod}: no host-veth hop"))
}

/// What podtrace has on tc anywhere in the lab: its filters (`hop_*` programs), the clsact
/// qdiscs on interfaces without any other filter (podtrace's, not removed), and its records
/// under /run/podtrace/tc.
fn podtrace_tc_state() -> Result<Vec<String>> {
    let mut found = Vec::new();
    let mut names: Vec<String> = fs::read_dir("/run/netns")?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(LAB))
        .collect();
    names.sort();
    for ns in &names {
        let links = run(
            "/usr/sbin/ip",
            &["-n", ns, "-j", "link", "show"],
            Duration::from_secs(60),
        )?;
        let links: Value = serde_json::from_str(links.stdout.trim()).unwrap_or(Value::Null);
        for l in links.as_array().into_iter().flatten() {
            let Some(dev) = l["ifname"].as_str() else {
                continue;
            };
            let mut others = 0;
            for hook in ["ingress", "egress"] {
                for f in tc_filters(ns, dev, hook).unwrap_or_default() {
                    if f["options"]["bpf_name"]
                        .as_str()
                        .is_some_and(|n| n.starts_with("hop_"))
                    {
                        found.push(format!("{ns}/{dev} {hook} filter pref {}", f["pref"]));
                    } else {
                        others += 1;
                    }
                }
            }
            if others == 0 && has_clsact(ns, dev).unwrap_or(false) {
                found.push(format!("{ns}/{dev} clsact qdisc"));
            }
        }
    }
    for e in fs::read_dir("/run/podtrace/tc")
        .into_iter()
        .flatten()
        .flatten()
    {
        found.push(format!("record {}", e.path().display()));
    }
    Ok(found)
}
