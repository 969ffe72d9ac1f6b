//! tc hop probes as filters on a clsact qdisc: the default (see `choose_tc_mode`), and the
//! only way before 6.6 (no TCX). A clsact filter is put in place at once, while every TCX
//! link waits for an RCU grace period under the RTNL lock, ~15 ms each here, one after
//! another. Unlike TCX links they live on when their owner dies, so each owner has a guard
//! process (below).
//!
//! The rules podtrace keeps there:
//! - Its filters run before the ones already there: priority 1, the first the kernel runs. A
//!   cls_bpf filter that was at priority 1 already (Cilium's and Calico's are) shares it, and
//!   a filter added to a cls_bpf list goes to its head, so ours still runs first; ours always
//!   hands the packet on (`TC_ACT_UNSPEC`), so theirs runs next, unchanged. Only a
//!   non-bpf filter holding priority 1 makes that impossible, and podtrace then says so.
//! - It deletes a clsact qdisc only if it created it and nothing else is attached to it.
//! - It removes exactly its own filters (by priority, handle and program id) on exit.
//! - It records them in /run/podtrace/tc/PID-N.json before it attaches them, for as long as
//!   they exist.
//! - A guard, podtrace itself run as `podtrace __clsact-guard` in a process group of its own,
//!   waits on a pipe from its owner: when the owner dies without saying goodbye (SIGKILL, a
//!   crash), the guard removes what the owner left, says so on stderr, and exits. Only when
//!   both are killed at once (a whole cgroup) do filters outlive them, until the next podtrace
//!   removes them and says so.
use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, Context as _, Result};
use futures::TryStreamExt as _;
use rtnetlink::packet_route::tc::{TcAttribute, TcFilterBpfOption, TcHandle, TcMessage, TcOption};
use serde::{Deserialize, Serialize};

use crate::netns;

/// Where the owned-filter records live.
pub const STATE_DIR: &str = "/run/podtrace/tc";

/// The priority podtrace's filters take.
pub const PRIORITY: u16 = 1;

/// `htons(ETH_P_ALL)`, as tcm_info's low half carries it.
const ETH_P_ALL_BE: u16 = 0x0300;

/// A filter on a clsact hook, as a dump shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterInfo {
    pub priority: u16,
    /// tcm_info's protocol half (network order).
    pub protocol: u16,
    pub handle: u32,
    pub kind: String,
    pub bpf_name: Option<String>,
    pub bpf_id: Option<u32>,
}

/// One filter podtrace attached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnedFilter {
    /// The namespace file (`None`: podtrace's own namespace).
    pub netns: Option<PathBuf>,
    /// Its inode: a namespace file reused for another namespace is not touched.
    pub netns_ino: u64,
    pub ifname: String,
    pub ifindex: u32,
    pub ingress: bool,
    pub priority: u16,
    pub handle: u32,
    pub prog_id: u32,
    pub program: String,
    /// podtrace created the interface's clsact qdisc (removed once nothing is on it).
    pub qdisc_created: bool,
}

impl OwnedFilter {
    fn where_(&self) -> String {
        match &self.netns {
            Some(ns) => format!(
                "{}/{}",
                ns.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                self.ifname
            ),
            None => self.ifname.clone(),
        }
    }
}

/// The priority for podtrace's filter given those on the hook, and a warning when it cannot
/// run first.
pub fn choose_priority(existing: &[FilterInfo]) -> (u16, Option<String>) {
    let blockers: Vec<&FilterInfo> = existing
        .iter()
        .filter(|f| f.priority == PRIORITY && (f.kind != "bpf" || f.protocol != ETH_P_ALL_BE))
        .collect();
    match blockers.first() {
        None => (PRIORITY, None),
        Some(b) => {
            let taken: Vec<u16> = existing.iter().map(|f| f.priority).collect();
            let free = (PRIORITY + 1..=u16::MAX)
                .find(|p| !taken.contains(p))
                .unwrap_or(u16::MAX);
            (
                free,
                Some(format!(
                    "a {} filter holds priority {PRIORITY}, so it runs before podtrace's (priority {free})",
                    b.kind
                )),
            )
        }
    }
}

/// Runs `f` with an rtnetlink handle inside the namespace.
fn with_nl<T: Send>(
    ns: Option<&Path>,
    f: impl FnOnce(rtnetlink::Handle) -> futures::future::BoxFuture<'static, Result<T>> + Send,
) -> Result<T> {
    netns::run_in(ns, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building a netlink runtime")?;
        rt.block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
            let task = tokio::spawn(conn);
            let result = f(handle).await;
            task.abort();
            result
        })
    })
}

fn parse_filter(m: &TcMessage) -> Option<FilterInfo> {
    let handle: u32 = m.header.handle.into();
    if handle == 0 {
        // The per-priority head a dump lists before the filters.
        return None;
    }
    let mut f = FilterInfo {
        priority: (m.header.info >> 16) as u16,
        protocol: (m.header.info & 0xffff) as u16,
        handle,
        kind: String::new(),
        bpf_name: None,
        bpf_id: None,
    };
    for a in &m.attributes {
        match a {
            TcAttribute::Kind(k) => f.kind = k.clone(),
            TcAttribute::Options(opts) => {
                for o in opts {
                    if let TcOption::Bpf(b) = o {
                        match b {
                            TcFilterBpfOption::ProgName(n) => f.bpf_name = Some(n.clone()),
                            TcFilterBpfOption::ProgId(i) => f.bpf_id = Some(*i),
                            _ => {}
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Some(f)
}

/// The filters on one clsact hook of an interface.
pub fn list_filters(ns: Option<&Path>, ifindex: u32, ingress: bool) -> Result<Vec<FilterInfo>> {
    with_nl(ns, move |handle| {
        Box::pin(async move {
            let mut req = handle.traffic_filter(ifindex as i32).get();
            req = if ingress { req.ingress() } else { req.egress() };
            let msgs: Vec<TcMessage> = req.execute().try_collect().await.or_else(|e| match e {
                // No clsact qdisc: no filters.
                rtnetlink::Error::NetlinkError(ref m)
                    if m.code.is_some_and(|c| {
                        let c = -c.get();
                        c == libc::EINVAL || c == libc::ENOENT
                    }) =>
                {
                    Ok(Vec::new())
                }
                e => Err(e),
            })?;
            Ok(msgs.iter().filter_map(parse_filter).collect())
        })
    })
}

/// Whether the interface has a clsact qdisc.
pub fn has_clsact(ns: Option<&Path>, ifindex: u32) -> Result<bool> {
    with_nl(ns, move |handle| {
        Box::pin(async move {
            let h = handle;
            let msgs: Vec<TcMessage> = h.qdisc().get().execute().try_collect().await?;
            Ok(msgs.iter().any(|m| {
                m.header.index == ifindex as i32
                    && m.attributes
                        .iter()
                        .any(|a| matches!(a, TcAttribute::Kind(k) if k == "clsact"))
            }))
        })
    })
}

/// Adds a clsact qdisc to an interface of the calling thread's namespace; `Ok(false)` when
/// one is there already.
pub fn add_clsact(ifname: &str) -> Result<bool> {
    match aya::programs::tc::qdisc_add_clsact(ifname) {
        Ok(()) => Ok(true),
        Err(aya::programs::tc::TcError::NetlinkError(e))
            if e.raw_os_error() == Some(libc::EEXIST) =>
        {
            Ok(false)
        }
        Err(e) => Err(anyhow!("adding a clsact qdisc to {ifname}: {e}")),
    }
}

/// Deletes the interface's clsact qdisc.
fn delete_clsact(ns: Option<&Path>, ifindex: u32) -> Result<()> {
    with_nl(ns, move |handle| {
        Box::pin(async move {
            let h = handle;
            let mut req = h.qdisc().del(ifindex as i32);
            req.message_mut().header.handle = TcHandle::from(0xffff_0000u32);
            req.message_mut().header.parent = TcHandle::from(0xffff_fff1u32);
            req.execute().await?;
            Ok(())
        })
    })
}

/// Deletes one filter by priority and handle.
fn delete_filter(
    ns: Option<&Path>,
    ifindex: u32,
    ingress: bool,
    priority: u16,
    handle: u32,
) -> Result<()> {
    use rtnetlink::{
        packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_REQUEST},
        packet_route::RouteNetlinkMessage,
    };
    with_nl(ns, move |mut h| {
        Box::pin(async move {
            let mut m = TcMessage::with_index(ifindex as i32);
            m.header.parent = TcHandle::from(if ingress {
                0xffff_fff2u32
            } else {
                0xffff_fff3u32
            });
            m.header.handle = TcHandle::from(handle);
            m.header.info = ((priority as u32) << 16) | ETH_P_ALL_BE as u32;
            let mut req = NetlinkMessage::from(RouteNetlinkMessage::DelTrafficFilter(m));
            req.header.flags = NLM_F_REQUEST | NLM_F_ACK;
            let mut resp = h.request(req)?;
            while let Some(msg) = futures::StreamExt::next(&mut resp).await {
                if let NetlinkPayload::Error(e) = msg.payload {
                    if e.code.is_some() {
                        return Err(anyhow!("deleting tc filter {priority}:{handle:#x}: {e}"));
                    }
                }
            }
            Ok(())
        })
    })
}

/// Removes the clsact qdisc podtrace created on an interface once nothing is attached to it
/// (a filter someone added meanwhile keeps it).
pub fn remove_qdisc_if_unused(ns: Option<&Path>, ifindex: u32) -> Result<bool> {
    if !has_clsact(ns, ifindex)? {
        return Ok(false);
    }
    if !list_filters(ns, ifindex, true)?.is_empty() || !list_filters(ns, ifindex, false)?.is_empty()
    {
        return Ok(false);
    }
    delete_clsact(ns, ifindex)?;
    Ok(true)
}

/// The start time of a process (clock ticks since boot, /proc/PID/stat field 22): a pid
/// reused by another process has another.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the process that started at `start` still runs: a zombie (or one on its way out,
/// its files closed) does not.
fn alive(pid: u32, start: u64) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some(rest) = stat.rfind(')').and_then(|i| stat.get(i + 2..)) else {
        return false;
    };
    let mut fields = rest.split_whitespace();
    let state = fields.next().unwrap_or("X");
    let started: Option<u64> = fields.nth(18).and_then(|t| t.parse().ok());
    started == Some(start) && !matches!(state, "Z" | "X" | "x")
}

#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    pid: u32,
    start_time: u64,
    filters: Vec<OwnedFilter>,
}

/// One owner's record of the filters it owns (a process may hold several: an agent has one
/// per session), and its guard.
pub struct State {
    path: PathBuf,
    file: StateFile,
    guard: Option<Guard>,
}

impl State {
    pub fn new() -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self {
            path: Path::new(STATE_DIR).join(format!("{pid}-{n}.json")),
            file: StateFile {
                pid,
                start_time: start_time(pid).unwrap_or(0),
                filters: Vec::new(),
            },
            guard: None,
        }
    }

    /// Where the record is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn save(&self) -> Result<()> {
        if self.file.filters.is_empty() {
            match fs::remove_file(&self.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).context(self.path.display().to_string())
                }
                _ => return Ok(()),
            }
        }
        fs::create_dir_all(STATE_DIR).with_context(|| format!("creating {STATE_DIR}"))?;
        let tmp = self.path.with_extension("tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(&self.file)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &self.path).with_context(|| format!("writing {}", self.path.display()))
    }

    /// Records filters about to be attached (handle 0 until known: the program id and name
    /// identify them), and starts the guard on the first.
    pub fn add(&mut self, filters: &[OwnedFilter]) -> Result<()> {
        self.file.filters.extend_from_slice(filters);
        self.save()?;
        if self.guard.is_none() && !self.file.filters.is_empty() {
            self.guard = Guard::spawn();
        }
        Ok(())
    }

    /// Replaces records: what was attached (with its handle) or not attached after all.
    pub fn update(&mut self, old: &[OwnedFilter], new: &[OwnedFilter]) {
        self.file.filters.retain(|x| !old.contains(x));
        self.file.filters.extend_from_slice(new);
        let _ = self.save();
    }

    /// Forgets filters that were removed.
    pub fn remove(&mut self, gone: &[OwnedFilter]) {
        self.file.filters.retain(|x| !gone.contains(x));
        let _ = self.save();
    }
}

impl Drop for State {
    fn drop(&mut self) {
        // Whatever could not be removed stays recorded for a later run; the guard is told
        // goodbye (it must not clean up after a living owner) and reaped.
        if let Some(g) = self.guard.take() {
            g.dismiss();
        }
    }
}

/// Whether this process may start guards: it is the podtrace binary (`main` says so), not a
/// program using the library, which cannot be re-executed as a guard.
static GUARDS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The argument that makes podtrace a guard.
pub const GUARD_ARG: &str = "__clsact-guard";

/// Called by podtrace's `main`: owners of clsact filters get a guard process.
pub fn enable_guards() {
    GUARDS.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// The owner's end of a guard.
struct Guard {
    child: std::process::Child,
}

impl Guard {
    /// podtrace again, as a guard of this process. `None` (and a line on stderr) when it
    /// cannot start: the filters are still removed on exit, and by a later run after SIGKILL.
    fn spawn() -> Option<Guard> {
        use std::os::unix::process::CommandExt as _;
        if !GUARDS.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let pid = std::process::id();
        let spawned = std::process::Command::new("/proc/self/exe")
            .arg0("podtrace")
            .arg(GUARD_ARG)
            .arg(pid.to_string())
            .arg(start_time(pid).unwrap_or(0).to_string())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            // Out of the terminal's foreground group: Ctrl-C is for the owner alone.
            .process_group(0)
            .spawn();
        match spawned {
            Ok(child) => Some(Guard { child }),
            Err(e) => {
                eprintln!("podtrace: no guard for the tc filters ({e}): after a SIGKILL, the next podtrace removes them");
                None
            }
        }
    }

    /// Tells the guard the owner is done (its filters are removed or recorded), and reaps it.
    fn dismiss(mut self) {
        use std::io::Write as _;
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = stdin.write_all(b"bye\n");
        }
        let _ = self.child.wait();
    }
}

/// The guard's side (`podtrace __clsact-guard PID START`): waits for its owner's goodbye;
/// when the pipe closes without one, waits for the owner to be gone, removes what it left
/// and says so. Exit code 0 either way.
pub fn guard_main(args: &[std::ffi::OsString]) -> std::process::ExitCode {
    use std::io::Read as _;
    // SAFETY: setting signal dispositions to SIG_IGN before any thread starts.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let arg = |i: usize| -> Option<u64> { args.get(i)?.to_str()?.parse().ok() };
    let (Some(pid), Some(start)) = (arg(0), arg(1)) else {
        eprintln!("podtrace: {GUARD_ARG} PID START");
        return std::process::ExitCode::from(2);
    };
    let mut said = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut said);
    if said.starts_with(b"bye") {
        return std::process::ExitCode::SUCCESS;
    }
    // The pipe closes as the owner's files do, before it is a zombie: wait for that.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while alive(pid as u32, start) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    match cleanup_stale() {
        Ok(Some(line)) => eprintln!("podtrace: {line}"),
        Ok(None) => {}
        Err(e) => eprintln!("podtrace: cleaning up after podtrace pid {pid}: {e:#}"),
    }
    std::process::ExitCode::SUCCESS
}

impl Default for State {
    fn default() -> Self {
        Self::new()
    }
}

/// Removes the filters a podtrace that is no longer running left behind (and the clsact
/// qdiscs it created, when nothing else is on them). Returns one line saying what was done,
/// or `None` when there was nothing.
pub fn cleanup_stale() -> Result<Option<String>> {
    let Ok(dir) = fs::read_dir(STATE_DIR) else {
        return Ok(None);
    };
    let me = std::process::id();
    let mut removed = 0usize;
    let mut places: Vec<String> = Vec::new();
    let mut owners: Vec<u32> = Vec::new();
    for entry in dir.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let Ok(text) = fs::read_to_string(&path) else {
            continue;
        };
        let Ok(state) = serde_json::from_str::<StateFile>(&text) else {
            continue;
        };
        if state.pid == me || alive(state.pid, state.start_time) {
            continue;
        }
        // Claim it: one cleaner per file, even with several podtraces starting at once.
        let claimed = path.with_extension(format!("claimed-{me}"));
        if fs::rename(&path, &claimed).is_err() {
            continue;
        }
        let mut qdiscs: Vec<(Option<PathBuf>, u32)> = Vec::new();
        for f in &state.filters {
            let ns = f.netns.as_deref();
            // The namespace must still be the one the filter was put in.
            let ino = match ns {
                Some(p) => netns::inode_of(p).ok(),
                None => netns::inode_of(Path::new("/proc/self/ns/net")).ok(),
            };
            if ino != Some(f.netns_ino) {
                continue;
            }
            let Ok(list) = list_filters(ns, f.ifindex, f.ingress) else {
                continue;
            };
            // Recorded before it was attached (handle 0): the program id and name find it.
            let ours = list.iter().find(|x| {
                (f.handle == 0 || (x.priority == f.priority && x.handle == f.handle))
                    && x.bpf_name.as_deref() == Some(f.program.as_str())
                    && x.bpf_id == Some(f.prog_id)
            });
            if ours.is_some_and(|x| {
                delete_filter(ns, f.ifindex, f.ingress, x.priority, x.handle).is_ok()
            }) {
                removed += 1;
                let w = f.where_();
                if !places.contains(&w) {
                    places.push(w);
                }
            }
            if f.qdisc_created && !qdiscs.contains(&(f.netns.clone(), f.ifindex)) {
                qdiscs.push((f.netns.clone(), f.ifindex));
            }
        }
        for (ns, ifindex) in qdiscs {
            let _ = remove_qdisc_if_unused(ns.as_deref(), ifindex);
        }
        let _ = fs::remove_file(&claimed);
        owners.push(state.pid);
    }
    if owners.is_empty() {
        return Ok(None);
    }
    let pids: Vec<String> = owners.iter().map(|p| p.to_string()).collect();
    Ok(Some(format!(
        "removed {removed} tc filter(s) that podtrace pid {} left behind when it was killed{}",
        pids.join(", "),
        if places.is_empty() {
            String::new()
        } else {
            format!(" (on {})", places.join(", "))
        }
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(priority: u16, kind: &str, protocol: u16) -> FilterInfo {
        FilterInfo {
            priority,
            protocol,
            handle: 1,
            kind: kind.into(),
            bpf_name: None,
            bpf_id: None,
        }
    }

    #[test]
    fn first_on_an_empty_hook() {
        assert_eq!(choose_priority(&[]), (1, None));
    }

    #[test]
    fn shares_priority_one_with_a_cni_bpf_filter() {
        // cls_bpf inserts at the head of its list: ours runs before theirs.
        assert_eq!(choose_priority(&[f(1, "bpf", ETH_P_ALL_BE)]), (1, None));
        assert_eq!(
            choose_priority(&[f(1, "bpf", ETH_P_ALL_BE), f(49152, "u32", 8)]),
            (1, None)
        );
    }

    #[test]
    fn a_foreign_filter_at_priority_one_is_named() {
        let (p, warn) = choose_priority(&[f(1, "matchall", ETH_P_ALL_BE), f(2, "bpf", 0x0008)]);
        assert_eq!(p, 3);
        assert!(warn.unwrap().contains("matchall"));
    }

    #[test]
    fn start_time_of_this_process() {
        let me = std::process::id();
        let t = start_time(me).unwrap();
        assert!(alive(me, t));
        assert!(!alive(me, t + 1), "another process with a reused pid");
        assert!(start_time(u32::MAX).is_none());
        assert!(!alive(u32::MAX, 0));
    }

    #[test]
    fn a_zombie_is_not_alive() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let t = start_time(pid).unwrap();
        // Not reaped yet: a zombie once it has exited.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while alive(pid, t) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!alive(pid, t));
        assert!(start_time(pid).is_some(), "still listed until reaped");
        child.wait().unwrap();
    }
}
