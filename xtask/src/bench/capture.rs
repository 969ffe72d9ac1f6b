//! Starting and stopping the capturing tools on every hop, and reading their end-of-run
//! reports: `podtrace capture` (one process, all hops) and tcpdump (one process per hop
//! interface, each inside the hop's namespace).
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

use super::{
    proc::{last_lines, Proc, Stream},
    Ctx, DST_IP, POD,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    Podtrace,
    Tcpdump,
}

impl Tool {
    pub fn name(self) -> &'static str {
        match self {
            Tool::Podtrace => "podtrace",
            Tool::Tcpdump => "tcpdump",
        }
    }
}

/// A capture under way.
pub struct Running {
    tool: Tool,
    /// podtrace: one process; tcpdump: one per hop, named by the hop.
    procs: Vec<(String, Proc)>,
}

/// What a capture reported at its end.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Packets written to files, all hops together.
    pub captured: u64,
    /// podtrace: events lost before reaching the writer; tcpdump: "dropped by kernel", summed.
    pub lost: u64,
    /// podtrace: of `captured`, packets the kernel cut to their first 128 bytes for want of
    /// room in its ring buffer (`--overload cut`); tcpdump: 0.
    pub cut: u64,
    /// Packets per hop (podtrace's report; tcpdump's "packets captured" per process).
    pub per_hop: Vec<(String, u64)>,
    /// podtrace: its peak RSS; tcpdump: the sum of the processes' peak RSS.
    pub rss_kb: u64,
    /// tcpdump: the largest single process's peak RSS (podtrace: its own).
    pub rss_max_kb: u64,
    /// CPU seconds (user + system) the tool's processes used, start-up included.
    pub cpu_s: f64,
}

impl Report {
    pub fn to_json(&self) -> Value {
        json!({
            "captured": self.captured,
            "lost": self.lost,
            "cut": self.cut,
            "per_hop": self.per_hop.iter().map(|(h, n)| json!({"hop": h, "packets": n})).collect::<Vec<_>>(),
            "rss_kb": self.rss_kb,
            "rss_max_kb": self.rss_max_kb,
            "cpu_s": (self.cpu_s * 1000.0).round() / 1000.0,
        })
    }
}

/// The tcpdump filter that keeps the sweep's datagrams (UDP to `port`), also inside VXLAN
/// (outer UDP 8472; the inner UDP destination port sits 52 bytes into the outer UDP header).
pub fn tcpdump_udp_filter(port: u16) -> String {
    format!("(udp dst port {port}) or (udp dst port 8472 and udp[52:2] = {port})")
}

/// Starts `tool` on every hop of the pod's path and waits until it captures. `filter`: only
/// UDP to that port (podtrace's EXPR, tcpdump's BPF filter); `None`: every packet.
/// `snaplen`: podtrace's `-s` (bytes kept of each packet; `None`: whole packets).
pub fn start(ctx: &Ctx, tool: Tool, filter: Option<u16>, snaplen: Option<u32>) -> Result<Running> {
    match tool {
        Tool::Podtrace => {
            let file = ctx.scratch.file("podtrace.pcapng");
            let mut args = vec!["capture", POD];
            let port = filter.map(|p| p.to_string());
            if let Some(p) = &port {
                args.extend(["udp", "dst", "port", p.as_str()]);
            }
            args.extend(["--dst", DST_IP]);
            let snap = snaplen.map(|n| n.to_string());
            if let Some(n) = &snap {
                args.extend(["-s", n.as_str()]);
            }
            args.extend(["-w", &file, "-C", "100", "-W", "3"]);
            let mut p = ctx.lab.spawn_podtrace("podtrace capture", &args)?;
            p.wait_line(Stream::Err, |l| l == "probes live", Duration::from_secs(60))?;
            Ok(Running {
                tool,
                procs: vec![("all".into(), p)],
            })
        }
        Tool::Tcpdump => {
            let mut procs = Vec::new();
            for (i, hop) in ctx.hops.iter().enumerate() {
                let file = ctx
                    .scratch
                    .file(&format!("tcpdump-{i}-{}.pcap", hop.name.replace('/', "-")));
                // As a user would, plus the same ring of files as podtrace's (-C 100 -W 3) and
                // -Z root so that the rotated files can be created in the scratch directory.
                let mut cmd: Vec<String> = [
                    "tcpdump",
                    "-i",
                    &hop.ifname,
                    "-w",
                    &file,
                    "-s",
                    "0",
                    "-C",
                    "100",
                    "-W",
                    "3",
                    "-Z",
                    "root",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                if let Some(port) = filter {
                    cmd.push(tcpdump_udp_filter(port));
                }
                let p = ctx
                    .lab
                    .spawn_in(&format!("tcpdump on {}", hop.name), &hop.owner, &cmd)?;
                procs.push((hop.name.clone(), p));
            }
            for (_, p) in &mut procs {
                p.wait_line(
                    Stream::Err,
                    |l| l.contains("listening on"),
                    Duration::from_secs(30),
                )?;
            }
            Ok(Running { tool, procs })
        }
    }
}

impl Running {
    /// The capturing processes: podtrace's, or the tcpdumps (what `lab exec` started).
    pub fn pids(&self) -> Vec<i32> {
        match self.tool {
            Tool::Podtrace => self.procs.iter().map(|(_, p)| p.pid).collect(),
            Tool::Tcpdump => self.procs.iter().flat_map(|(_, p)| p.children()).collect(),
        }
    }

    /// Peak RSS so far: podtrace's, or the tcpdumps' (the commands `lab exec` started) summed.
    fn rss_now(&self) -> (u64, u64) {
        let mut sum = 0;
        let mut max = 0;
        for (_, p) in &self.procs {
            let kb = match self.tool {
                Tool::Podtrace => p.vm_hwm_kb(),
                Tool::Tcpdump => p
                    .children()
                    .into_iter()
                    .filter_map(super::proc::vm_hwm_kb)
                    .max(),
            }
            .unwrap_or(0);
            sum += kb;
            max = max.max(kb);
        }
        (sum, max)
    }

    /// Stops the capture (SIGINT, as ^C) and reads the reports.
    pub fn stop(mut self) -> Result<Report> {
        let (mut rss, mut rss_max) = self.rss_now();
        for (_, p) in &self.procs {
            p.signal(libc::SIGINT);
        }
        let mut report = Report::default();
        for (hop, p) in &mut self.procs {
            let exit = p.finish(Duration::from_secs(60))?;
            // tcpdump: `lab exec`'s figures include the tcpdump it waited for.
            report.cpu_s += exit.cpu_s;
            let err = p.text(Stream::Err);
            if exit.code != Some(0) {
                bail!(
                    "{} ended with {}: {}",
                    p.name,
                    exit.describe(),
                    last_lines(&err, 5)
                );
            }
            match self.tool {
                Tool::Podtrace => {
                    parse_podtrace_report(&err, &mut report)
                        .with_context(|| format!("reading podtrace's report: {err}"))?;
                    // wait4's peak RSS covers the whole run, the report's writing included.
                    rss = rss.max(exit.maxrss_kb);
                    rss_max = rss;
                }
                Tool::Tcpdump => {
                    let captured = tcpdump_count(&err, "packets captured")
                        .with_context(|| format!("{}: no \"packets captured\": {err}", p.name))?;
                    let dropped = tcpdump_count(&err, "packets dropped by kernel")
                        .with_context(|| format!("{}: no \"dropped by kernel\": {err}", p.name))?;
                    report.captured += captured;
                    report.lost += dropped;
                    report.per_hop.push((hop.clone(), captured));
                }
            }
        }
        report.rss_kb = rss;
        report.rss_max_kb = rss_max;
        Ok(report)
    }
}

/// `N packets written (T cut to the snap length[, C cut to their first 128 bytes for want of
/// room …]), L lost before reaching the writer`, then one line per hop (`    NAME   COUNT`)
/// until `... file(s) kept`.
fn parse_podtrace_report(err: &str, report: &mut Report) -> Result<()> {
    let mut lines = err.lines().skip_while(|l| !l.contains("packets written ("));
    let head = lines.next().context("no \"packets written\" line")?;
    let words: Vec<&str> = head.split_whitespace().collect();
    report.captured = words
        .first()
        .and_then(|w| w.parse().ok())
        .context("packets written")?;
    let lost_at = words
        .iter()
        .position(|w| *w == "lost")
        .context("no \"lost\"")?;
    report.lost = words
        .get(lost_at.wrapping_sub(1))
        .and_then(|w| w.parse().ok())
        .context("lost count")?;
    report.cut = match head.find(" cut to their first") {
        Some(at) => head[..at]
            .rsplit([' ', ','])
            .find(|w| !w.is_empty())
            .and_then(|w| w.parse().ok())
            .context("cut count")?,
        None => 0,
    };
    for l in lines {
        if !l.starts_with("    ") || l.contains("file(s) kept") {
            break;
        }
        let mut parts = l.split_whitespace();
        if let (Some(name), Some(n), None) = (parts.next(), parts.next(), parts.next()) {
            if let Ok(n) = n.parse() {
                report.per_hop.push((name.to_owned(), n));
            }
        }
    }
    Ok(())
}

/// tcpdump's `N packets captured` (or other `what`) at exit.
fn tcpdump_count(err: &str, what: &str) -> Option<u64> {
    err.lines()
        .find_map(|l| l.trim().strip_suffix(what))
        .and_then(|n| n.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports() {
        let err = "podtrace: rotate ...\nprobes live\n71460 packets written (0 truncated), 654538 lost before reaching the writer\n    pod-a1/eth0                  8310\n    node-a/veth43aab310          7924\n3 file(s) kept (18 older ones rotated out):\n    /dev/shm/pbx/c.pcapng0\n";
        let mut r = Report::default();
        parse_podtrace_report(err, &mut r).unwrap();
        assert_eq!((r.captured, r.lost, r.cut), (71460, 654538, 0));
        let cut = "1324580 packets written (0 cut to the snap length, 835513 cut to their first 128 bytes for want of room in the kernel's ring buffer), 0 lost before reaching the writer\n";
        let mut c = Report::default();
        parse_podtrace_report(cut, &mut c).unwrap();
        assert_eq!((c.captured, c.lost, c.cut), (1324580, 0, 835513));
        assert_eq!(
            r.per_hop,
            vec![
                ("pod-a1/eth0".to_owned(), 8310),
                ("node-a/veth43aab310".to_owned(), 7924)
            ]
        );
        let t = "listening on eth0, link-type EN10MB (Ethernet), snapshot length 262144 bytes\n12 packets captured\n14 packets received by filter\n2 packets dropped by kernel";
        assert_eq!(tcpdump_count(t, "packets captured"), Some(12));
        assert_eq!(tcpdump_count(t, "packets dropped by kernel"), Some(2));
    }
}
