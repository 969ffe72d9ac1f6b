//! Events to files: the packets the engine's hop events carry, written to the rotating
//! pcapng/pcap writer with one interface per hop (`capture`, `follow -w`), plus the
//! `--stop-on` trigger and the end-of-run report.
use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{anyhow, Result};

use super::{
    wall_clock_ns, CaptureFilter, CaptureFormat, CaptureWriter, Direction, HopDesc, RotationPolicy,
    Stats, WriterOptions,
};
use crate::{
    diagnose::after_delivery,
    trace::{
        plan::{Hook, Plan},
        run::monotonic_ns,
        TraceEvent,
    },
};

/// `--stop-on`: stop shortly after the first such event, keeping the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StopOn {
    /// The kernel drops a packet of the conversation.
    Drop,
    /// A TCP reset is seen.
    Rst,
}

/// Where and how to write (from `-w`, `-C`, `-G`, `-W`, `--format`, `-s`).
#[derive(Debug, Clone)]
pub struct SinkOptions {
    pub path: PathBuf,
    pub format: CaptureFormat,
    pub policy: RotationPolicy,
    /// The snap length packets were cut to in the kernel.
    pub snaplen: u32,
}

/// Writes the packets of a session's events.
pub struct CaptureSink {
    writer: Option<CaptureWriter>,
    filter: Option<CaptureFilter>,
    /// Plan hop id (< `MAX_HOPS`) → writer interface index.
    index: Vec<Option<usize>>,
    /// Wall clock minus the kernel's monotonic clock.
    wall_offset: i128,
    pub written: u64,
    pub bytes: u64,
    /// Of `written`, packets the kernel cut to their first bytes for want of room in its ring
    /// buffer (`--overload cut`).
    pub cut_for_room: u64,
    /// The snap length the kernel cut packets to.
    kernel_snaplen: u32,
    /// Packets the kernel handed up that the expression then rejected (what of it the hop
    /// probes could not check).
    pub not_matched: u64,
    stop_on: Option<StopOn>,
    tail: Duration,
    /// When the stop event was seen, and what it was.
    pub triggered: Option<(Instant, String)>,
    /// For naming the place of a drop.
    plan: Plan,
}

impl CaptureSink {
    /// Creates the first file (so a bad path fails before anything is attached) and prints
    /// the effective rotation policy.
    pub fn create(
        out: &SinkOptions,
        plan: &Plan,
        filter: Option<CaptureFilter>,
        stop_on: Option<StopOn>,
        tail: Duration,
    ) -> Result<Self> {
        let (path, policy) = (out.path.clone(), out.policy);
        let hops: Vec<HopDesc> = plan
            .hops
            .iter()
            .map(|h| {
                HopDesc::new(&h.owner, &h.ifname)
                    .with_ifindex(h.ifindex)
                    .with_netns(h.netns.clone())
                    .with_comment(format!(
                        "{} on {}{}",
                        h.role,
                        h.node,
                        if h.on_path {
                            ""
                        } else {
                            " (watched, off the path)"
                        }
                    ))
            })
            .collect();
        let mut index = vec![None; podtrace_abi::MAX_HOPS as usize];
        for (i, h) in plan.hops.iter().enumerate() {
            if let Some(slot) = index.get_mut(h.id as usize) {
                *slot = Some(i);
            }
        }
        eprintln!("podtrace: {}", policy.describe(&path));
        let writer = CaptureWriter::create_with(
            path,
            out.format,
            policy,
            out.snaplen,
            hops,
            WriterOptions {
                filter: filter.as_ref().map(|f| f.text().to_owned()),
                ..WriterOptions::default()
            },
        )?;
        let wall_offset = wall_clock_ns() as i128 - monotonic_ns() as i128;
        Ok(Self {
            writer: Some(writer),
            filter,
            index,
            wall_offset,
            written: 0,
            cut_for_room: 0,
            kernel_snaplen: out.snaplen,
            not_matched: 0,
            bytes: 0,
            stop_on,
            tail,
            triggered: None,
            plan: plan.clone(),
        })
    }

    fn writer(&mut self) -> Result<&mut CaptureWriter> {
        self.writer
            .as_mut()
            .ok_or_else(|| anyhow!("the capture was finished"))
    }

    /// With an expression, the packets it rejected after the kernel handed them up.
    pub fn not_matched(&self) -> Option<u64> {
        self.filter.as_ref().map(|_| self.not_matched)
    }

    /// Takes one event: writes its packet (if it has one and passes the filter) and checks
    /// the stop condition.
    pub fn on_event(&mut self, ev: &TraceEvent) -> Result<()> {
        let h = match ev {
            TraceEvent::Drop(d) => {
                if self.stop_on == Some(StopOn::Drop)
                    && self.triggered.is_none()
                    && !after_delivery(&d.reason)
                {
                    self.triggered = Some((
                        Instant::now(),
                        format!(
                            "drop at {}: {}",
                            self.plan.place_name(d.at.ns, d.at.ifindex),
                            d.reason
                        ),
                    ));
                }
                return Ok(());
            }
            TraceEvent::Hop(h) => h,
            _ => return Ok(()),
        };
        let Some(data) = h.packet.as_deref() else {
            return Ok(());
        };
        if let Some(f) = &self.filter {
            if !f.matches(&super::parse_ethernet(data)) {
                self.not_matched += 1;
                return Ok(());
            }
        }
        if self.stop_on == Some(StopOn::Rst)
            && self.triggered.is_none()
            && h.flow.proto == 6
            && h.flow.flags & 0x04 != 0
        {
            self.triggered = Some((Instant::now(), "TCP reset".into()));
        }
        let Some(&Some(i)) = self.index.get(h.hop as usize) else {
            return Ok(());
        };
        let dir = match h.hook {
            Hook::Ingress => Direction::Inbound,
            Hook::Egress => Direction::Outbound,
            Hook::Bridged => Direction::Unknown,
        };
        let ts = (h.ts_ns as i128 + self.wall_offset).max(0) as u64;
        // The kernel keeps min(length, snap length) bytes of a packet; fewer, and it cut the
        // packet for want of room in its ring buffer (`FILTER_CUT`).
        let kept = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let whole = h.len.min(self.kernel_snaplen);
        let w = self.writer()?;
        w.write(i, dir, ts, h.len, data)?;
        if kept < h.len {
            let for_room = kept < whole;
            w.note_kernel_cut(i, for_room);
            self.cut_for_room += u64::from(for_room);
        }
        self.written += 1;
        self.bytes += data.len() as u64;
        crate::fault::point("capture-packet");
        Ok(())
    }

    /// Time-based rotation while idle; whether the --stop-on tail has passed.
    pub fn tick(&mut self) -> Result<bool> {
        self.writer()?.tick(wall_clock_ns())?;
        Ok(self
            .triggered
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() >= self.tail))
    }

    pub fn files(&self) -> Vec<PathBuf> {
        self.writer
            .as_ref()
            .map(|w| w.files().to_vec())
            .unwrap_or_default()
    }

    /// Records the events lost before they reached us, closes the last file.
    pub fn finish(&mut self, lost: u64) -> Result<(Stats, Vec<PathBuf>)> {
        let mut w = self
            .writer
            .take()
            .ok_or_else(|| anyhow!("the capture was finished"))?;
        if lost > 0 {
            w.add_lost_unattributed(lost);
        }
        let files = w.files().to_vec();
        let stats = w.finish()?;
        Ok((stats, files))
    }
}

/// The end-of-run report (stderr, as tcpdump's).
/// `not_matched`: with an expression, the packets the kernel handed up that it rejected.
pub fn report(stats: &Stats, files: &[PathBuf], plan: &Plan, not_matched: Option<u64>) {
    let cut = if stats.packets_cut_for_room > 0 {
        format!(
            ", {} cut to their first {} bytes for want of room in the kernel's ring buffer",
            stats.packets_cut_for_room,
            podtrace_abi::CUT_BYTES
        )
    } else {
        String::new()
    };
    eprintln!(
        "{} packets written ({} cut to the snap length{cut}), {} lost before reaching the writer{}",
        stats.packets_written,
        stats.packets_truncated,
        stats.lost,
        not_matched
            .map(|n| format!(", {n} seen by the probes but not matching the expression"))
            .unwrap_or_default()
    );
    for (i, h) in plan.hops.iter().enumerate() {
        if let Some(n) = stats.packets_per_hop.get(i) {
            eprintln!("    {:<28} {n}", h.name);
        }
    }
    eprintln!(
        "{} file(s) kept{}:",
        files.len(),
        if stats.files_deleted > 0 {
            format!(" ({} older ones rotated out)", stats.files_deleted)
        } else {
            String::new()
        }
    );
    for f in files {
        eprintln!("    {}", f.display());
    }
}
