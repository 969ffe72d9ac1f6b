//! Child processes the benchmark starts, and Ctrl-C.
//!
//! Every child runs in its own process group (so a terminal's ^C reaches only the xtask,
//! which then stops its children in order) and gets SIGTERM if the xtask dies
//! (`PR_SET_PDEATHSIG`). Its stdout and stderr are read line by line, each line stamped with
//! the instant it arrived. [`Proc`] reaps with `wait4` to learn the child's peak RSS, and its
//! `Drop` stops the child (SIGINT, then SIGKILL to its whole group) whatever happened.
use std::{
    io::{BufRead as _, BufReader, Read},
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// From now on SIGINT, SIGTERM and SIGHUP only set a flag: the benchmark notices it at its
/// next wait, fails with "interrupted", and its guards stop the children and the lab.
pub fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

/// Fails once a stop signal came.
pub fn check() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps, waking early (with an error) on Ctrl-C.
pub fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        check()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Out,
    Err,
}

#[derive(Debug, Clone)]
pub struct Line {
    pub stream: Stream,
    pub at: Instant,
    pub text: String,
}

/// How a child ended.
#[derive(Debug, Clone, Copy)]
pub struct Exit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// Peak RSS of the child (and of the children it reaped), from `wait4`.
    pub maxrss_kb: u64,
    /// CPU time (user + system) of the child and the children it reaped, in seconds.
    pub cpu_s: f64,
}

impl Exit {
    pub fn describe(&self) -> String {
        match (self.code, self.signal) {
            (Some(c), _) => format!("exit code {c}"),
            (_, Some(s)) => format!("signal {s}"),
            _ => "unknown status".into(),
        }
    }
}

pub struct Proc {
    pub name: String,
    pub pid: i32,
    pub started: Instant,
    lines: Arc<Mutex<Vec<Line>>>,
    /// Readers that reached end of file (2 when both pipes are closed).
    eof: Arc<AtomicUsize>,
    exit: Option<Exit>,
}

impl Proc {
    /// Starts `program args...` (stdin from /dev/null, stdout and stderr read here).
    pub fn spawn(name: &str, program: &Path, args: &[String]) -> Result<Proc> {
        Self::spawn_env(name, program, args, &[])
    }

    /// [`Proc::spawn`] with `env` added to the environment.
    pub fn spawn_env(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Result<Proc> {
        check()?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; nothing is allocated.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0);
                Ok(())
            });
        }
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({})", program.display()))?;
        let pid = child.id() as i32;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let eof = Arc::new(AtomicUsize::new(0));
        let out = child.stdout.take().context("stdout pipe")?;
        let err = child.stderr.take().context("stderr pipe")?;
        // `child` is dropped without waiting: this struct reaps the pid with wait4.
        drop(child);
        for (stream, pipe) in [
            (Stream::Out, Box::new(out) as Box<dyn Read + Send>),
            (Stream::Err, Box::new(err)),
        ] {
            let lines = lines.clone();
            let eof = eof.clone();
            thread::spawn(move || {
                let mut r = BufReader::new(pipe);
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    match r.read_until(b'\n', &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            let at = Instant::now();
                            let text = String::from_utf8_lossy(&buf).trim_end().to_owned();
                            lines.lock().unwrap().push(Line { stream, at, text });
                        }
                    }
                }
                eof.fetch_add(1, Ordering::SeqCst);
            });
        }
        Ok(Proc {
            name: name.to_owned(),
            pid,
            started,
            lines,
            eof,
            exit: None,
        })
    }

    /// Every line read so far.
    pub fn lines(&self) -> Vec<Line> {
        self.lines.lock().unwrap().clone()
    }

    /// The lines of one stream, joined.
    pub fn text(&self, stream: Stream) -> String {
        self.lines()
            .into_iter()
            .filter(|l| l.stream == stream)
            .map(|l| l.text)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The first line of `stream` that satisfies `pred`, waiting up to `timeout` for it.
    pub fn wait_line(
        &mut self,
        stream: Stream,
        pred: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> Result<Line> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(l) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.stream == stream && pred(&l.text))
            {
                return Ok(l.clone());
            }
            check()?;
            if let Some(exit) = self.try_reap() {
                // Let the readers catch up with the last lines before giving up.
                self.drain(Duration::from_millis(500));
                if let Some(l) = self
                    .lines()
                    .into_iter()
                    .find(|l| l.stream == stream && pred(&l.text))
                {
                    return Ok(l);
                }
                bail!(
                    "{} ended ({}) before it was ready: {}",
                    self.name,
                    exit.describe(),
                    last_lines(&self.text(Stream::Err), 5)
                );
            }
            if Instant::now() >= end {
                bail!(
                    "{} not ready after {timeout:?}: {}",
                    self.name,
                    last_lines(&self.text(Stream::Err), 5)
                );
            }
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// Reaps the child if it has ended.
    pub fn try_reap(&mut self) -> Option<Exit> {
        if self.exit.is_none() {
            let mut status = 0;
            // SAFETY: zeroed rusage is a valid out-parameter.
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: plain syscall on our own child's pid with valid out-pointers.
            let r = unsafe { libc::wait4(self.pid, &mut status, libc::WNOHANG, &mut ru) };
            if r == self.pid {
                self.exit = Some(Exit {
                    code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
                    signal: libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
                    maxrss_kb: ru.ru_maxrss.max(0) as u64,
                    cpu_s: [ru.ru_utime, ru.ru_stime]
                        .iter()
                        .map(|t| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6)
                        .sum(),
                });
            } else if r < 0 {
                // ECHILD: reaped elsewhere; nothing more to learn.
                self.exit = Some(Exit {
                    code: None,
                    signal: None,
                    maxrss_kb: 0,
                    cpu_s: 0.0,
                });
            }
        }
        self.exit
    }

    /// Waits up to `timeout` for the child to end (Ctrl-C ends the wait with an error).
    pub fn wait(&mut self, timeout: Duration) -> Result<Exit> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(e) = self.try_reap() {
                self.drain(Duration::from_secs(2));
                return Ok(e);
            }
            check()?;
            if Instant::now() >= end {
                bail!("{} still running after {timeout:?}", self.name);
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits (briefly) until both pipes reached end of file, so every line is in.
    fn drain(&self, timeout: Duration) {
        let end = Instant::now() + timeout;
        while self.eof.load(Ordering::SeqCst) < 2 && Instant::now() < end {
            thread::sleep(Duration::from_millis(2));
        }
    }

    pub fn signal(&self, sig: libc::c_int) {
        if self.exit.is_none() {
            // SAFETY: kill(2) on our own, not yet reaped, child.
            unsafe {
                libc::kill(self.pid, sig);
            }
        }
    }

    /// SIGINT (tcpdump and podtrace then write their reports and close their files), then
    /// waits up to `timeout`; SIGKILL to the group after that.
    pub fn stop(&mut self, timeout: Duration) -> Result<Exit> {
        self.signal(libc::SIGINT);
        self.finish(timeout)
    }

    /// Waits up to `timeout` for a child that was told to stop; SIGKILL to the group after
    /// that. (Not cut short by Ctrl-C: the report it writes is what we wait for.)
    pub fn finish(&mut self, timeout: Duration) -> Result<Exit> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(e) = self.try_reap() {
                self.drain(Duration::from_secs(2));
                return Ok(e);
            }
            if Instant::now() >= end {
                self.kill_group();
                bail!("{} did not stop within {timeout:?} of SIGINT", self.name);
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILL to the child's process group (the child and what it started), then reaps.
    fn kill_group(&mut self) {
        if self.exit.is_some() {
            return;
        }
        // SAFETY: the group is the child's own (process_group(0) at spawn).
        unsafe {
            libc::killpg(self.pid, libc::SIGKILL);
        }
        let end = Instant::now() + Duration::from_secs(5);
        while self.try_reap().is_none() && Instant::now() < end {
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// The peak RSS (VmHWM) of the child so far, in kB.
    pub fn vm_hwm_kb(&self) -> Option<u64> {
        vm_hwm_kb(self.pid)
    }

    /// The pids of the child's own children (`lab exec` runs its command as one).
    pub fn children(&self) -> Vec<i32> {
        std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.pid))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.try_reap().is_some() {
            return;
        }
        self.signal(libc::SIGINT);
        let end = Instant::now() + Duration::from_secs(3);
        while self.try_reap().is_none() && Instant::now() < end {
            thread::sleep(Duration::from_millis(5));
        }
        if self.exit.is_none() {
            eprintln!("bench: {} ignored SIGINT; killing it", self.name);
        }
        // The whole group: the child and anything it started (`lab exec`'s command).
        self.kill_group();
    }
}

/// `VmHWM` of a process, in kB.
pub fn vm_hwm_kb(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    lines[start..].join(" | ")
}

/// CPU seconds (user + system, all threads) a running process used so far.
pub fn cpu_s(pid: i32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name (which may hold spaces): state is field 3, utime
    // and stime fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some((utime + stime) / hz)
}
