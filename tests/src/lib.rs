//! Helpers for podtrace's privileged integration tests: network namespaces with Drop guards,
//! unique name prefixes so tests run side by side, and small command runners.
//!
//! Every guard cleans up in `Drop`, so a failing or panicking test leaves nothing behind.
//!
//! [`fuzzing`] is the harness of the fuzz targets in `fuzz/`, shared with the normal suite's
//! replay of their corpora (`tests/fuzz_corpus.rs`).
pub mod containerd;
pub mod fuzzing;

use std::{
    io::{BufRead, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc,
    },
    time::Duration,
};

/// Fails the test at once, with a clear message, unless it runs as root.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "podtrace's integration tests load eBPF programs and create namespaces: run them as root \
         (cargo xtask test)"
    );
}

/// A short name prefix unique to this process and call, e.g. `t4821a-`.
pub fn unique_prefix(tag: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let tag: String = tag
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(4)
        .collect();
    format!("t{}{}{tag}-", std::process::id() % 100_000, n)
}

/// A named network namespace, deleted on drop.
pub struct Netns {
    name: String,
    path: PathBuf,
}

impl Netns {
    /// Creates `/run/netns/{name}`.
    pub fn new(name: &str) -> Self {
        require_root();
        let path = podtrace::netns::create(name)
            .unwrap_or_else(|e| panic!("creating netns {name}: {e:#}"));
        let ns = Self {
            name: name.to_owned(),
            path,
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `ip -n NAME ARGS...` and panics if it fails (test fixtures only; podtrace itself
    /// never runs `ip`).
    pub fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run_ok("ip", &full);
    }

    /// Runs a command inside the namespace and returns its output (whatever its status).
    pub fn exec(&self, cmd: &[&str]) -> Output {
        let mut full = vec!["netns", "exec", self.name.as_str()];
        full.extend_from_slice(cmd);
        Command::new("ip")
            .args(&full)
            .output()
            .unwrap_or_else(|e| panic!("running {cmd:?} in {}: {e}", self.name))
    }

    /// Like [`Netns::exec`], panicking unless the command succeeds.
    pub fn exec_ok(&self, cmd: &[&str]) -> Output {
        let out = self.exec(cmd);
        assert!(
            out.status.success(),
            "{cmd:?} in {} failed: {}{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = podtrace::netns::delete(&self.name) {
            eprintln!("cleanup: deleting netns {}: {e:#}", self.name);
        }
    }
}

/// Two namespaces joined by a veth pair: `a` holds `veth-a` with 10.99.N.1/24 and `b` holds
/// `veth-b` with 10.99.N.2/24. Tests running side by side pick different N, so that probes
/// that see the whole kernel (the drop probe) do not see each other's packets.
pub struct VethPair {
    pub a: Netns,
    pub b: Netns,
    pub a_ip: Ipv4Addr,
    pub b_ip: Ipv4Addr,
}

impl VethPair {
    pub const A_IF: &'static str = "veth-a";
    pub const B_IF: &'static str = "veth-b";

    pub fn new(prefix: &str, subnet: u8) -> Self {
        let a_ip = Ipv4Addr::new(10, 99, subnet, 1);
        let b_ip = Ipv4Addr::new(10, 99, subnet, 2);
        let a = Netns::new(&format!("{prefix}a"));
        let b = Netns::new(&format!("{prefix}b"));
        a.ip(&[
            "link",
            "add",
            Self::A_IF,
            "type",
            "veth",
            "peer",
            "name",
            Self::B_IF,
            "netns",
            b.name(),
        ]);
        a.ip(&["addr", "add", &format!("{a_ip}/24"), "dev", Self::A_IF]);
        b.ip(&["addr", "add", &format!("{b_ip}/24"), "dev", Self::B_IF]);
        a.ip(&["link", "set", Self::A_IF, "up"]);
        b.ip(&["link", "set", Self::B_IF, "up"]);
        Self { a, b, a_ip, b_ip }
    }
}

/// Runs a program and panics unless it succeeds.
pub fn run_ok(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The `podtrace` binary of this build (target/<profile>/podtrace, next to the test's
/// deps/ directory). `cargo xtask test` builds it before running the tests.
pub fn podtrace_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("tests run from target/<profile>/deps");
    let bin = profile_dir.join("podtrace");
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build -p podtrace), or run cargo xtask test",
        bin.display()
    );
    bin
}

/// Runs `podtrace ARGS...` and returns its output (whatever its exit code).
pub fn podtrace(args: &[&str]) -> Output {
    Command::new(podtrace_bin())
        .args(args)
        .output()
        .expect("running podtrace")
}

/// Runs `podtrace ARGS...`, panicking unless it exits 0; returns stdout.
pub fn podtrace_ok(args: &[&str]) -> String {
    let out = podtrace(args);
    assert!(
        out.status.success(),
        "podtrace {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// A lab brought up with `podtrace lab up --prefix P`, torn down on drop.
pub struct Lab {
    pub prefix: String,
}

impl Lab {
    /// `topology`: `flannel`, `eni` or `all`.
    pub fn up(tag: &str, topology: &str) -> Self {
        require_root();
        let lab = Self {
            prefix: unique_prefix(tag),
        };
        podtrace_ok(&["lab", "up", "--topology", topology, "--prefix", &lab.prefix]);
        lab
    }

    /// As [`Lab::up`], with one agent per node (`lab up --agents`).
    pub fn up_with_agents(tag: &str, topology: &str) -> Self {
        require_root();
        let lab = Self {
            prefix: unique_prefix(tag),
        };
        podtrace_ok(&[
            "lab",
            "up",
            "--topology",
            topology,
            "--prefix",
            &lab.prefix,
            "--agents",
        ]);
        lab
    }

    /// `lab status --json`.
    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&podtrace_ok(&[
            "lab",
            "status",
            "--json",
            "--prefix",
            &self.prefix,
        ]))
        .expect("lab status --json")
    }

    /// Runs `podtrace ARGS... --lab PREFIX`.
    pub fn podtrace(&self, args: &[&str]) -> Output {
        let mut full = args.to_vec();
        full.extend(["--lab", &self.prefix]);
        podtrace(&full)
    }

    /// Runs a command in a lab pod, node or host (`podtrace lab exec`).
    pub fn exec(&self, name: &str, cmd: &[&str]) -> Output {
        let mut full = vec!["lab", "exec", name, "--prefix", &self.prefix, "--"];
        full.extend_from_slice(cmd);
        podtrace(&full)
    }

    /// The network namespace path of a lab pod, node or host.
    pub fn netns(&self, name: &str) -> PathBuf {
        podtrace::netns::path_of(&format!("{}{name}", self.prefix))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let out = podtrace(&["lab", "down", "--prefix", &self.prefix]);
        if !out.status.success() {
            eprintln!(
                "cleanup: lab down --prefix {} failed: {}",
                self.prefix,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// A running `podtrace follow|capture|verify ... --json` (or text mode), killed on drop.
pub struct Running {
    pub child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    /// Says (or hangs up) when stderr reached its end of file: all of it is in `stderr`.
    stderr_done: std::sync::mpsc::Receiver<()>,
    /// stdout lines read so far.
    pub seen: Vec<String>,
}

impl Running {
    /// Starts `podtrace ARGS...` and waits (up to 30 s) until it says its probes are live:
    /// a `{"type":"ready"}` line on stdout, or `probes live` on stderr.
    pub fn start(args: &[&str]) -> Self {
        Self::start_with_env(args, &[])
    }

    /// [`Running::start`] with extra environment variables for podtrace.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(podtrace_bin());
        cmd.args(args).envs(env.iter().copied());
        Self::spawn(cmd, &format!("{args:?}"), 30)
    }

    /// [`Running::start`] for any command line that runs podtrace (`kubectl podtrace …`),
    /// waiting up to `secs` for its probes.
    pub fn spawn(mut cmd: Command, args: &str, secs: u64) -> Self {
        use std::io::BufRead as _;
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starting podtrace");
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr_buf = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        {
            let stderr = child.stderr.take().unwrap();
            let buf = stderr_buf.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stderr)
                    .lines()
                    .map_while(Result::ok)
                {
                    if line.contains("probes live") {
                        let _ = ready_tx.send(());
                    }
                    let mut b = buf.lock().unwrap();
                    b.push_str(&line);
                    b.push('\n');
                }
                let _ = done_tx.send(());
            });
        }
        let mut run = Self {
            child,
            lines: rx,
            stderr: stderr_buf,
            stderr_done: done_rx,
            seen: Vec::new(),
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            if ready_rx.try_recv().is_ok() {
                return run;
            }
            match run.lines.recv_timeout(std::time::Duration::from_millis(50)) {
                Ok(line) => {
                    let ready = line.contains("\"type\":\"ready\"");
                    run.seen.push(line);
                    if ready {
                        return run;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    let status = run.child.wait().ok();
                    panic!(
                        "podtrace {args} exited ({status:?}) before its probes were live: {}",
                        run.stderr()
                    );
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "podtrace {args} never said its probes were live: {}",
                run.stderr()
            );
        }
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits (up to `secs`) for the process to exit; returns its exit code and every stdout line.
    pub fn wait(mut self, secs: u64) -> (Option<i32>, Vec<String>, String) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Everything it printed: the readers end at the pipes' end of file. Both, or
                // a loaded machine can leave the last stderr lines unread (a missing error
                // message, not a missing error).
                while let Ok(l) = self.lines.recv_timeout(std::time::Duration::from_secs(5)) {
                    self.seen.push(l);
                }
                let _ = self
                    .stderr_done
                    .recv_timeout(std::time::Duration::from_secs(5));
                let lines = std::mem::take(&mut self.seen);
                return (status.code(), lines, self.stderr());
            }
            while let Ok(l) = self.lines.try_recv() {
                self.seen.push(l);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "podtrace did not exit within {secs}s; stdout so far: {:?}; stderr: {}",
                self.seen,
                self.stderr()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Waits (up to `secs`) until the stdout lines read so far satisfy `done`.
    pub fn wait_lines(&mut self, secs: u64, done: impl Fn(&[String]) -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        while !done(&self.seen) {
            match self
                .lines
                .recv_timeout(std::time::Duration::from_millis(100))
            {
                Ok(l) => self.seen.push(l),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    panic!(
                        "podtrace ended first; stdout: {:?}; stderr: {}",
                        self.seen,
                        self.stderr()
                    )
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "waited {secs}s; stdout so far: {:?}; stderr: {}",
                self.seen,
                self.stderr()
            );
        }
    }

    /// Sends a signal.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The JSON objects among `lines`.
pub fn json_lines(lines: &[String]) -> Vec<serde_json::Value> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The `xtask` binary of this build (target/<profile>/xtask, beside `podtrace`); `cargo xtask`
/// builds it.
pub fn xtask_bin() -> PathBuf {
    let bin = podtrace_bin().with_file_name("xtask");
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build -p xtask), or run cargo xtask test",
        bin.display()
    );
    bin
}

/// A real two-node Kubernetes cluster brought up with `cargo xtask k8s up --prefix P` (see
/// xtask/src/k8s/README.md), removed with `k8s down` on drop, also when the test fails.
/// Needs the binaries `cargo xtask setup` builds.
pub struct K8sCluster {
    pub prefix: String,
    /// The admin kubeconfig (through the relay in the machine's namespace).
    pub kubeconfig: PathBuf,
    /// The cluster's cluster.json: paths, sockets, addresses.
    pub info: serde_json::Value,
    /// How long `k8s up` took.
    pub up_time: std::time::Duration,
}

impl K8sCluster {
    pub fn up(tag: &str) -> Self {
        require_root();
        let mut me = Self {
            prefix: unique_prefix(tag),
            kubeconfig: PathBuf::new(),
            info: serde_json::Value::Null,
            up_time: std::time::Duration::ZERO,
        };
        let started = std::time::Instant::now();
        let out = Command::new(xtask_bin())
            .args(["k8s", "up", "--prefix", &me.prefix, "--podtrace"])
            .arg(podtrace_bin())
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("running xtask k8s up");
        me.up_time = started.elapsed();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "xtask k8s up failed: {stdout}");
        let last = stdout.lines().last().unwrap_or_default();
        let path = last
            .strip_prefix("export KUBECONFIG=")
            .unwrap_or_else(|| panic!("k8s up's last line is not `export KUBECONFIG=`: {last:?}"));
        me.kubeconfig = PathBuf::from(path);
        let json = me.kubeconfig.with_file_name("cluster.json");
        me.info = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        me
    }

    /// Runs `kubectl --kubeconfig K ARGS...` (optionally with `stdin`); its output.
    pub fn kubectl_with(&self, args: &[&str], stdin: Option<&str>) -> Output {
        use std::io::Write as _;
        let mut child = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            // Discovery cache in the cluster's directory (removed with it), not ~/.kube.
            .arg("--cache-dir")
            .arg(self.kubeconfig.with_file_name("kube-cache"))
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("running kubectl");
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).unwrap();
        }
        drop(input);
        child.wait_with_output().unwrap()
    }

    /// `kubectl ARGS...`, panicking unless it succeeds; stdout.
    pub fn kubectl(&self, args: &[&str]) -> String {
        let out = self.kubectl_with(args, None);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// A node's entry of cluster.json (`node-a`, `node-b`).
    pub fn node(&self, name: &str) -> &serde_json::Value {
        self.info["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == name)
            .unwrap_or_else(|| panic!("no node {name} in cluster.json"))
    }

    /// A node's network namespace.
    pub fn node_netns(&self, name: &str) -> PathBuf {
        PathBuf::from(self.node(name)["netns"].as_str().unwrap())
    }

    /// A node's containerd socket, as seen from the machine's mount namespace.
    pub fn containerd_socket(&self, name: &str) -> PathBuf {
        PathBuf::from(self.node(name)["containerd_socket"].as_str().unwrap())
    }
}

impl Drop for K8sCluster {
    fn drop(&mut self) {
        let started = std::time::Instant::now();
        let out = Command::new(xtask_bin())
            .args(["k8s", "down", "--prefix", &self.prefix, "--podtrace"])
            .arg(podtrace_bin())
            .output();
        match out {
            Ok(o) if o.status.success() => eprintln!(
                "k8s down --prefix {} took {:.1} s",
                self.prefix,
                started.elapsed().as_secs_f64()
            ),
            Ok(o) => eprintln!(
                "cleanup: xtask k8s down --prefix {} failed: {}",
                self.prefix,
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("cleanup: running xtask k8s down: {e}"),
        }
    }
}

/// Waits (polling, up to `secs`) until `cond` holds; panics naming `what` otherwise. For
/// conditions with no event to wait on (a socket bound in another namespace, a kernel object
/// released).
pub fn wait_until(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "waited {secs}s for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A child process killed (and reaped) on drop.
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        // SIGTERM first: `podtrace lab exec` passes it on to the command it runs.
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TCP server in a lab namespace answering every connection with `NAME PEER_IP:PORT`;
/// stopped on drop.
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Binds before returning, so connections made after it are accepted.
    pub fn start(netns: PathBuf, port: u16, name: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let name = name.to_owned();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let listener = podtrace::netns::run_in(Some(&netns), || {
                // A socket stays in the namespace it was made in.
                Ok(TcpListener::bind(("0.0.0.0", port))?)
            });
            let listener = match listener {
                Ok(l) => l,
                Err(e) => {
                    let _ = tx.send(Err(format!("{e:#}")));
                    return;
                }
            };
            listener.set_nonblocking(true).unwrap();
            let _ = tx.send(Ok(()));
            while !flag.load(Ordering::SeqCst) {
                let mut fds = libc::pollfd {
                    fd: listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut fds, 1, 100) };
                if let Ok((mut s, peer)) = listener.accept() {
                    let _ = s.set_nonblocking(false);
                    let _ = writeln!(s, "{name} {peer}");
                }
            }
        });
        rx.recv()
            .expect("server thread")
            .unwrap_or_else(|e| panic!("binding port {port}: {e}"));
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects from the namespace to `dst:port`; returns the client's own address and the
/// server's line (`NAME PEER`), or the error.
pub fn connect(netns: &Path, dst: Ipv4Addr, port: u16) -> std::io::Result<(SocketAddr, String)> {
    let r = podtrace::netns::run_in(Some(netns), || {
        let addr = SocketAddr::from((dst, port));
        Ok(TcpStream::connect_timeout(&addr, Duration::from_secs(3)))
    })
    .unwrap();
    let s = r?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let local = s.local_addr()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok((local, line.trim().to_owned()))
}

/// The JSON object a successful `podtrace ... --json` printed; panics otherwise.
pub fn json_of(out: &std::process::Output, what: &str) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{what}: not JSON: {e}"))
}

/// Exit 2 and one line on stderr that contains every `needle`.
pub fn assert_one_line_error(out: &std::process::Output, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "not one line: {stderr}"
    );
    for n in needles {
        assert!(stderr.contains(n), "{n:?} not in: {stderr}");
    }
    stderr
}

/// `nsenter --net=NETNS CMD...` (containerd's pod netns files are plain bind mounts).
pub fn in_netns(netns: &Path, cmd: &[&str]) -> std::process::Output {
    Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(cmd)
        .output()
        .unwrap()
}

/// (role, ifname) of each hop of a `topo --json` answer.
pub fn roles(topo: &serde_json::Value) -> Vec<(String, String)> {
    topo["hops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["role"].as_str().unwrap().to_owned(),
                h["ifname"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// The names of the tc programs on an interface of a namespace, both directions: TCX programs
/// and clsact bpf filters (podtrace's are `hop_ingress` and `hop_egress`, by either means).
pub fn tc_programs_in(netns: &Path, ifname: &str) -> String {
    use aya::programs::{tc::TcAttachType, SchedClassifier};
    let (mut names, ifindex) = podtrace::netns::run_in(Some(netns), || {
        let mut names = Vec::new();
        for t in [TcAttachType::Ingress, TcAttachType::Egress] {
            let (_, progs) = SchedClassifier::query_tcx(ifname, t)?;
            for p in progs {
                names.push(String::from_utf8_lossy(p.name()).into_owned());
            }
        }
        Ok((names, nix::net::if_::if_nametoindex(ifname)?))
    })
    .unwrap_or_else(|e| panic!("{ifname} in {}: {e:#}", netns.display()));
    for ingress in [true, false] {
        let filters = podtrace::probes::clsact::list_filters(Some(netns), ifindex, ingress)
            .unwrap_or_else(|e| panic!("tc filters of {ifname}: {e:#}"));
        names.extend(filters.into_iter().filter_map(|f| f.bpf_name));
    }
    names.join(" ")
}
