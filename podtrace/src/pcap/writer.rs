//! [`CaptureWriter`]: pcapng / pcap files with rotation. See the [module docs](super).

use std::borrow::Cow;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use byteorder::{ByteOrder, NativeEndian};
use pcap_file::pcap::PcapHeader;
use pcap_file::pcapng::blocks::interface_description::{
    InterfaceDescriptionBlock, InterfaceDescriptionOption,
};
use pcap_file::pcapng::blocks::section_header::{SectionHeaderBlock, SectionHeaderOption};
use pcap_file::pcapng::{Block, RawBlock};
use pcap_file::{DataLink, Endianness, TsResolution};

use super::error::CaptureError;
use super::rotate::{FileNamer, NameTimeZone, RotationPolicy};

/// tcpdump's default snap length, also used for `-s 0`, and the longest record Wireshark and
/// libpcap read: the writer never uses a larger one.
pub const DEFAULT_SNAPLEN: u32 = 262_144;

/// Encoded records are collected up to this many bytes before a `write(2)`.
const BUFFER_BYTES: usize = 64 * 1024;

/// A packet at least this long goes to the file straight from the caller's bytes (one
/// `writev(2)` of the record's head, the packet and the record's tail) rather than through the
/// buffer: copying it would cost more than the system call it saves. Whole-packet captures of
/// GSO traffic are made of such packets (up to 64 KiB each).
const WRITE_THROUGH_BYTES: usize = BUFFER_BYTES / 4;

/// pcapng block type of the Interface Statistics Block.
const ISB_TYPE: u32 = 0x0000_0005;

/// Longest string put in a pcapng option (the length field is 16 bits; keep well below).
const MAX_OPTION_STRING: usize = 4096;

/// pcapng `if_tsresol` value for nanoseconds (10^-9).
const TSRESOL_NANOS: u8 = 9;

/// File format of a capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CaptureFormat {
    /// pcapng: one interface per hop, packet direction and loss counts recorded.
    #[default]
    PcapNg,
    /// Classic pcap (nanosecond timestamps): all hops mixed in one stream, no direction,
    /// no loss counts. See the [module docs](super#classic-pcap-and-hops).
    Pcap,
}

impl FromStr for CaptureFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "pcapng" => Ok(CaptureFormat::PcapNg),
            "pcap" => Ok(CaptureFormat::Pcap),
            other => Err(format!(
                "unknown capture format {other:?} (expected pcapng or pcap)"
            )),
        }
    }
}

impl std::fmt::Display for CaptureFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CaptureFormat::PcapNg => "pcapng",
            CaptureFormat::Pcap => "pcap",
        })
    }
}

/// Direction of a packet relative to the hop's interface (pcapng `epb_flags` bits 0-1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Received by the interface (ingress); `epb_flags` = 1.
    Inbound,
    /// Sent by the interface (egress); `epb_flags` = 2.
    Outbound,
    /// Not known; no `epb_flags` option is written.
    Unknown,
}

impl Direction {
    fn epb_flags(self) -> Option<u32> {
        match self {
            Direction::Inbound => Some(1),
            Direction::Outbound => Some(2),
            Direction::Unknown => None,
        }
    }
}

/// A packet record's bytes before and after the packet's: a pcapng Enhanced Packet Block
/// (interface, nanosecond timestamp, lengths; padding; the direction in `epb_flags`; the
/// block's length again) or a classic pcap record header (nanosecond timestamps), as
/// pcap-file writes them (a unit test holds them to its bytes).
struct RecordFrame {
    head: [u8; 28],
    head_len: usize,
    tail: [u8; 20],
    tail_len: usize,
    packet_len: usize,
}

impl RecordFrame {
    /// `None`: a classic pcap timestamp past 2106.
    fn new(
        format: CaptureFormat,
        hop: usize,
        direction: Direction,
        ts_ns: u64,
        orig_len: u32,
        captured: usize,
    ) -> Option<Self> {
        let mut f = RecordFrame {
            head: [0; 28],
            head_len: 0,
            tail: [0; 20],
            tail_len: 0,
            packet_len: captured,
        };
        match format {
            CaptureFormat::PcapNg => {
                let pad = (4 - captured % 4) % 4;
                let flags = direction.epb_flags();
                let opts = if flags.is_some() { 12 } else { 0 };
                let block_len = (12 + 20 + captured + pad + opts) as u32;
                f.put_head(&[
                    ENHANCED_PACKET_BLOCK,
                    block_len,
                    hop as u32,
                    (ts_ns >> 32) as u32,
                    ts_ns as u32,
                    captured as u32,
                    orig_len,
                ]);
                f.tail_len = pad;
                if let Some(flags) = flags {
                    // epb_flags (code 2, 4 bytes), then opt_endofopt.
                    NativeEndian::write_u16(&mut f.tail[pad..], 2);
                    NativeEndian::write_u16(&mut f.tail[pad + 2..], 4);
                    NativeEndian::write_u32(&mut f.tail[pad + 4..], flags);
                    f.tail_len += 12;
                }
                NativeEndian::write_u32(&mut f.tail[f.tail_len..], block_len);
                f.tail_len += 4;
            }
            CaptureFormat::Pcap => {
                let secs = u32::try_from(ts_ns / 1_000_000_000).ok()?;
                f.put_head(&[
                    secs,
                    (ts_ns % 1_000_000_000) as u32,
                    captured as u32,
                    orig_len,
                ]);
            }
        }
        Some(f)
    }

    /// The head: these words, in the file's byte order.
    fn put_head(&mut self, words: &[u32]) {
        for (i, w) in words.iter().enumerate() {
            NativeEndian::write_u32(&mut self.head[i * 4..], *w);
        }
        self.head_len = words.len() * 4;
    }

    fn head(&self) -> &[u8] {
        &self.head[..self.head_len]
    }

    fn tail(&self) -> &[u8] {
        &self.tail[..self.tail_len]
    }

    /// The whole record's length.
    fn len(&self) -> usize {
        self.head_len + self.packet_len + self.tail_len
    }
}

/// The pcapng block type of an Enhanced Packet Block.
const ENHANCED_PACKET_BLOCK: u32 = 6;

/// One hop of the capture: an interface in a network namespace. Becomes one pcapng
/// Interface Description Block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HopDesc {
    /// `OWNER/IFNAME`, e.g. `node-a/veth1a2b3c4d` (pcapng `if_name`).
    pub name: String,
    /// The interface index in its namespace.
    pub ifindex: Option<u32>,
    /// The network namespace (a path such as `/run/netns/pt-node-a`, or a name).
    pub netns: Option<String>,
    /// Free text (role, hook...), stored as the IDB's comment.
    pub comment: Option<String>,
}

impl HopDesc {
    /// A hop named `owner/ifname`.
    pub fn new(owner: &str, ifname: &str) -> Self {
        HopDesc {
            name: format!("{owner}/{ifname}"),
            ifindex: None,
            netns: None,
            comment: None,
        }
    }

    /// Set the interface index.
    pub fn with_ifindex(mut self, ifindex: u32) -> Self {
        self.ifindex = Some(ifindex);
        self
    }

    /// Set the network namespace.
    pub fn with_netns(mut self, netns: impl Into<String>) -> Self {
        self.netns = Some(netns.into());
        self
    }

    /// Set the comment.
    pub fn with_comment(mut self, comment: impl Into<String>) -> Self {
        self.comment = Some(comment.into());
        self
    }

    /// The pcapng `if_description`: `ifindex=7 netns=/run/netns/pt-node-a`.
    pub fn description(&self) -> String {
        let mut parts = Vec::new();
        if let Some(i) = self.ifindex {
            parts.push(format!("ifindex={i}"));
        }
        if let Some(ns) = &self.netns {
            parts.push(format!("netns={ns}"));
        }
        parts.join(" ")
    }
}

/// Less common settings of a [`CaptureWriter`].
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// The capture filter text, recorded as each interface's pcapng `if_filter`.
    pub filter: Option<String>,
    /// Time zone of strftime conversions in file names (default: local, as tcpdump).
    pub name_time_zone: NameTimeZone,
    /// The wall clock in nanoseconds since the epoch: when the capture starts (first
    /// interval, first file name) and ends (statistics at [`finish`](CaptureWriter::finish)).
    /// Packet timestamps always come from the caller. Replaceable for tests.
    pub clock: fn() -> u64,
    /// Application name in the pcapng section header.
    pub application: String,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            filter: None,
            name_time_zone: NameTimeZone::Local,
            clock: wall_clock_ns,
            application: format!("podtrace {}", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// Nanoseconds since the Unix epoch from the system clock.
pub fn wall_clock_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos().min(u128::from(u64::MAX)) as u64)
        .unwrap_or(0)
}

/// What a capture wrote. From [`CaptureWriter::stats`] at any time, or
/// [`CaptureWriter::finish`] at the end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Files completed and closed (including ones the `-W` ring deleted later).
    pub files_written: u64,
    /// Files deleted by the `-W` ring.
    pub files_deleted: u64,
    /// Packets written (in files completed or still open).
    pub packets_written: u64,
    /// Of those, packets cut to the snap length.
    pub packets_truncated: u64,
    /// Of those, packets the kernel cut to their first bytes because its ring buffer had no
    /// room for them whole ([`CaptureWriter::note_kernel_cut`]).
    pub packets_cut_for_room: u64,
    /// Bytes of all files written, headers and trailers included (deleted ones too).
    pub bytes_written: u64,
    /// Packets reported lost before reaching the writer ([`CaptureWriter::add_lost`] and
    /// [`CaptureWriter::add_lost_unattributed`]).
    pub lost: u64,
    /// Packets written per hop, by hop index.
    pub packets_per_hop: Vec<u64>,
}

/// One encoded record (a packet, a header block...) in the output buffer.
#[derive(Debug, Clone, Copy)]
struct Record {
    /// End offset in `OpenFile::buf`.
    end: usize,
    /// The hop, when the record is a packet.
    packet_of: Option<usize>,
}

/// The file currently being written.
#[derive(Debug)]
struct OpenFile {
    path: PathBuf,
    stem: Vec<u8>,
    file: File,
    /// Encoded records not yet handed to the kernel.
    buf: Vec<u8>,
    records: Vec<Record>,
    /// Bytes in the file: whole records only.
    on_disk: u64,
    /// Bytes of the header (section header and interfaces / pcap header).
    header_len: u64,
    /// pcapng: interfaces described in this file (hops `0..interfaces`).
    interfaces: usize,
    packets: u64,
    packets_per_hop: Vec<u64>,
    lost_per_hop: Vec<u64>,
    /// Packets of each hop cut for want of room in the kernel's ring buffer.
    cut_per_hop: Vec<u64>,
    lost_unattributed: u64,
    /// Start of the interval this file covers (pcapng `isb_starttime`).
    start_ns: u64,
    /// Latest packet timestamp in the file.
    last_ns: u64,
}

impl OpenFile {
    fn len(&self) -> u64 {
        self.on_disk + self.buf.len() as u64
    }

    /// No packets and no loss recorded: nothing worth keeping.
    fn is_blank(&self) -> bool {
        self.packets == 0
            && self.lost_unattributed == 0
            && self.lost_per_hop.iter().all(|n| *n == 0)
    }

    fn push(&mut self, bytes: &[u8], packet_of: Option<usize>) {
        self.push_parts(&[bytes], packet_of);
    }

    /// Appends one record made of `parts`.
    fn push_parts(&mut self, parts: &[&[u8]], packet_of: Option<usize>) {
        for part in parts {
            self.buf.extend_from_slice(part);
        }
        self.records.push(Record {
            end: self.buf.len(),
            packet_of,
        });
        if let Some(hop) = packet_of {
            self.packets += 1;
            self.packets_per_hop[hop] += 1;
        }
    }

    /// Hand the buffer to the kernel. On failure the file is cut back to its last complete
    /// record (so it stays readable) and the hops of the packets that did not make it are
    /// returned with the error.
    fn flush(&mut self) -> Result<(), (io::Error, Vec<usize>)> {
        let mut written = 0;
        while written < self.buf.len() {
            match self.file.write(&self.buf[written..]) {
                Ok(0) => {
                    let e = io::Error::new(io::ErrorKind::WriteZero, "write returned 0");
                    return Err((e, self.cut_back(written)));
                }
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err((e, self.cut_back(written))),
            }
        }
        self.on_disk += written as u64;
        self.buf.clear();
        self.records.clear();
        Ok(())
    }

    /// Writes one packet record made of `parts` at once, after the buffered records (see
    /// [`WRITE_THROUGH_BYTES`]). On failure the file is cut back to its last complete record
    /// and the hops of the packets that did not make it (this one included) are returned.
    fn write_through(
        &mut self,
        parts: [&[u8]; 3],
        hop: usize,
    ) -> Result<(), (io::Error, Vec<usize>)> {
        if let Err((e, mut dropped)) = self.flush() {
            dropped.push(hop);
            return Err((e, dropped));
        }
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let mut slices = parts.map(io::IoSlice::new);
        let mut bufs = &mut slices[..];
        let mut written = 0;
        while written < total {
            let e = match self.file.write_vectored(bufs) {
                Ok(0) => io::Error::new(io::ErrorKind::WriteZero, "write returned 0"),
                Ok(n) => {
                    written += n;
                    io::IoSlice::advance_slices(&mut bufs, n);
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => e,
            };
            // The record is cut: back to the file's last whole record.
            let _ = self.file.set_len(self.on_disk);
            return Err((e, vec![hop]));
        }
        self.on_disk += total as u64;
        self.packets += 1;
        self.packets_per_hop[hop] += 1;
        Ok(())
    }

    /// Truncate the file to the last record boundary within the `written` bytes of `buf`
    /// that reached it; forget the rest. Returns the hops of dropped packets.
    fn cut_back(&mut self, written: usize) -> Vec<usize> {
        let keep = self
            .records
            .iter()
            .rev()
            .map(|r| r.end)
            .find(|end| *end <= written)
            .unwrap_or(0);
        let mut dropped = Vec::new();
        for r in self.records.iter().filter(|r| r.end > keep) {
            if let Some(hop) = r.packet_of {
                dropped.push(hop);
                self.packets -= 1;
                self.packets_per_hop[hop] -= 1;
            }
        }
        self.on_disk += keep as u64;
        // Shrinking always succeeds on a full file system; if it does not, the partial
        // record stays at the end, which readers report as a cut-short last packet.
        let _ = self.file.set_len(self.on_disk);
        self.buf.clear();
        self.records.clear();
        dropped
    }
}

/// Writes captured packets to pcapng (default) or pcap files, rotating them by size and/or
/// time and keeping a bounded ring. See the [module docs](super) for the file layout,
/// rotation rules and file safety.
///
/// All I/O is blocking and buffered; from an async loop call it from a blocking task or a
/// dedicated thread, or accept short stalls at rotation (a file is `fsync`ed when closed).
/// After an I/O error the writer stops: every later call returns
/// [`CaptureError::Stopped`], and every file it completed stays intact.
#[derive(Debug)]
pub struct CaptureWriter {
    format: CaptureFormat,
    policy: RotationPolicy,
    snaplen: u32,
    hops: Vec<HopDesc>,
    opts: WriterOptions,
    namer: FileNamer,
    /// Start of the current rotation interval.
    window_start: u64,
    current: Option<OpenFile>,
    /// Files this writer created that still exist, oldest first (the current one last).
    files: Vec<PathBuf>,
    /// Bytes of files already closed.
    closed_bytes: u64,
    stats: Stats,
    /// The first I/O error, after which the writer refuses to continue.
    failed: Option<String>,
    /// Scratch space for encoding one packet or interface record. Rotation encodes its
    /// blocks elsewhere, as it runs while a packet waits here.
    scratch: Vec<u8>,
    /// pcapng: bytes to reserve at the end of each file for its statistics blocks.
    comment_reserve: u64,
    /// Frees the space of files the ring rotated out, off the writing thread.
    reaper: Reaper,
}

/// Deleting a large file costs its blocks' freeing, which happens when its last descriptor
/// closes. The ring unlinks a rotated-out file at once (its name is gone before the next
/// file exists) while holding it open, and a thread of its own closes it.
#[derive(Default, Debug)]
struct Reaper {
    tx: Option<std::sync::mpsc::Sender<File>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Reaper {
    /// Unlinks `path`; the freeing of its blocks happens on the reaper thread.
    fn delete(&mut self, path: &Path) -> io::Result<()> {
        // Opening can fail (permissions changed under us): then unlink synchronously.
        let held = File::open(path).ok();
        fs::remove_file(path)?;
        let Some(file) = held else { return Ok(()) };
        if self.tx.is_none() {
            let (tx, rx) = std::sync::mpsc::channel::<File>();
            let thread = std::thread::Builder::new()
                .name("podtrace-reaper".into())
                .spawn(move || rx.into_iter().for_each(drop));
            match thread {
                Ok(t) => {
                    self.tx = Some(tx);
                    self.thread = Some(t);
                }
                Err(_) => return Ok(()), // `file` closes here.
            }
        }
        if let Some(tx) = &self.tx {
            let _ = tx.send(file);
        }
        Ok(())
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl CaptureWriter {
    /// Create the first capture file and write its header.
    ///
    /// `path` is the `-w` argument (a strftime pattern with `-G`); `snaplen` 0 or above
    /// [`DEFAULT_SNAPLEN`] (the most readers accept) means [`DEFAULT_SNAPLEN`]. Hops may be added later with [`add_hop`](Self::add_hop).
    pub fn create(
        path: impl Into<PathBuf>,
        format: CaptureFormat,
        policy: RotationPolicy,
        snaplen: u32,
        hops: Vec<HopDesc>,
    ) -> Result<Self, CaptureError> {
        Self::create_with(
            path,
            format,
            policy,
            snaplen,
            hops,
            WriterOptions::default(),
        )
    }

    /// [`create`](Self::create) with [`WriterOptions`].
    pub fn create_with(
        path: impl Into<PathBuf>,
        format: CaptureFormat,
        policy: RotationPolicy,
        snaplen: u32,
        hops: Vec<HopDesc>,
        opts: WriterOptions,
    ) -> Result<Self, CaptureError> {
        let path = path.into();
        policy.validate()?;
        FileNamer::check(&path, &policy)?;
        // tcpdump's rule too: Wireshark and libpcap refuse records longer than 262144 bytes.
        let snaplen = if snaplen == 0 || snaplen > DEFAULT_SNAPLEN {
            DEFAULT_SNAPLEN
        } else {
            snaplen
        };
        let start = (opts.clock)();
        let comment_reserve = option_len(lost_comment(u64::MAX).len()) as u64;
        let mut w = CaptureWriter {
            format,
            namer: FileNamer::new(&path, &policy, opts.name_time_zone),
            policy,
            snaplen,
            stats: Stats {
                packets_per_hop: vec![0; hops.len()],
                ..Stats::default()
            },
            hops,
            opts,
            window_start: start,
            current: None,
            files: Vec::new(),
            closed_bytes: 0,
            failed: None,
            scratch: Vec::with_capacity(2048),
            comment_reserve,
            reaper: Reaper::default(),
        };
        w.open_next(start)?;
        Ok(w)
    }

    /// The file format.
    pub fn format(&self) -> CaptureFormat {
        self.format
    }

    /// The rotation policy.
    pub fn policy(&self) -> &RotationPolicy {
        &self.policy
    }

    /// The effective snap length.
    pub fn snaplen(&self) -> u32 {
        self.snaplen
    }

    /// The hops, by index.
    pub fn hops(&self) -> &[HopDesc] {
        &self.hops
    }

    /// Files this writer created that still exist, oldest first; the last is the file
    /// being written (or the last one closed).
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// The file being written, if any.
    pub fn current_file(&self) -> Option<&Path> {
        self.current.as_ref().map(|f| f.path.as_path())
    }

    /// Statistics so far.
    pub fn stats(&self) -> Stats {
        let mut s = self.stats.clone();
        s.bytes_written = self.closed_bytes + self.current.as_ref().map_or(0, OpenFile::len);
        s
    }

    /// Add a hop; returns its index. In pcapng its interface is described in the current
    /// file right away (and at the start of every later file).
    pub fn add_hop(&mut self, hop: HopDesc) -> Result<usize, CaptureError> {
        self.check_usable()?;
        let index = self.hops.len();
        self.hops.push(hop);
        self.stats.packets_per_hop.push(0);
        if let Some(cur) = self.current.as_mut() {
            cur.packets_per_hop.push(0);
            cur.lost_per_hop.push(0);
            cur.cut_per_hop.push(0);
        }
        if self.format == CaptureFormat::PcapNg {
            self.scratch.clear();
            encode_idb(
                &mut self.scratch,
                &self.hops[index],
                self.snaplen,
                &self.opts,
            );
            let need = self.scratch.len() as u64;
            if self.exceeds_limit(need) {
                // The new file's header will describe the new interface.
                let now = (self.opts.clock)();
                return self.rotate(now, false).map(|_| index);
            }
            let cur = self.current.as_mut().expect("checked by check_usable");
            cur.interfaces += 1;
            cur.push(&self.scratch, None);
        }
        Ok(index)
    }

    /// Write one packet seen at hop `hop`.
    ///
    /// `ts_ns` is the wall-clock time in nanoseconds since the epoch; `orig_len` the
    /// packet's length on the wire (raised to `data.len()` if smaller); `data` the frame
    /// from its Ethernet header, cut here to the snap length. Rotates first if the policy
    /// says so.
    pub fn write(
        &mut self,
        hop: usize,
        direction: Direction,
        ts_ns: u64,
        orig_len: u32,
        data: &[u8],
    ) -> Result<(), CaptureError> {
        self.check_usable()?;
        if hop >= self.hops.len() {
            return Err(CaptureError::UnknownHop {
                index: hop,
                hops: self.hops.len(),
            });
        }
        let captured = data.len().min(self.snaplen as usize);
        let data_len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let orig_len = orig_len.max(data_len);
        let frame = &data[..captured];
        // The record's bytes around the packet's; the packet goes into the file's buffer
        // straight from `data` (one copy, not two), or a large one into the file.
        let Some(record) = RecordFrame::new(self.format, hop, direction, ts_ns, orig_len, captured)
        else {
            return Err(CaptureError::Encode {
                path: self
                    .current
                    .as_ref()
                    .map(|c| c.path.clone())
                    .unwrap_or_default(),
                detail: "the timestamp does not fit the classic pcap format (after 2106)".into(),
            });
        };
        self.rotate_if_due(ts_ns)?;
        if self.exceeds_limit(record.len() as u64) {
            self.rotate(ts_ns, false)?;
        }
        let cur = self.current.as_mut().expect("checked by check_usable");
        let parts = [record.head(), frame, record.tail()];
        let through = frame.len() >= WRITE_THROUGH_BYTES;
        if !through {
            cur.push_parts(&parts, Some(hop));
        }
        cur.last_ns = cur.last_ns.max(ts_ns);
        self.stats.packets_written += 1;
        self.stats.packets_per_hop[hop] += 1;
        if captured < data.len() {
            self.stats.packets_truncated += 1;
        }
        if through {
            if let Err((e, dropped)) = cur.write_through(parts, hop) {
                return Err(self.fail_current(e, dropped, "write"));
            }
        } else if cur.buf.len() >= BUFFER_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    /// Record that the packet just written for hop `hop` was cut in the kernel: to the snap
    /// length, or (`for_room`) to its first bytes because the kernel's ring buffer had no room
    /// for it whole. pcapng states the latter per interface, in a comment of the file's
    /// statistics block; the record itself keeps the packet's original length either way.
    pub fn note_kernel_cut(&mut self, hop: usize, for_room: bool) {
        if !for_room {
            self.stats.packets_truncated += 1;
            return;
        }
        self.stats.packets_cut_for_room += 1;
        if let Some(c) = self
            .current
            .as_mut()
            .and_then(|cur| cur.cut_per_hop.get_mut(hop))
        {
            *c += 1;
        }
    }

    /// Record `n` packets of hop `hop` lost before reaching the writer (e.g. dropped by a
    /// full ring buffer). pcapng stores them in the hop's `isb_ifdrop` when the file is
    /// closed; classic pcap cannot store them (see [`Stats::lost`]).
    pub fn add_lost(&mut self, hop: usize, n: u64) -> Result<(), CaptureError> {
        if hop >= self.hops.len() {
            return Err(CaptureError::UnknownHop {
                index: hop,
                hops: self.hops.len(),
            });
        }
        // Counts from the kernel, summed: saturate rather than wrap (or panic).
        self.stats.lost = self.stats.lost.saturating_add(n);
        if let Some(cur) = self.current.as_mut() {
            cur.lost_per_hop[hop] = cur.lost_per_hop[hop].saturating_add(n);
        }
        Ok(())
    }

    /// Record `n` packets lost before reaching the writer that cannot be attributed to one
    /// hop (e.g. a perf buffer's lost-samples count). pcapng stores them as a comment on the
    /// first interface's statistics block.
    pub fn add_lost_unattributed(&mut self, n: u64) {
        self.stats.lost = self.stats.lost.saturating_add(n);
        if let Some(cur) = self.current.as_mut() {
            cur.lost_unattributed = cur.lost_unattributed.saturating_add(n);
        }
    }

    /// Apply time rotation (`-G`) at wall-clock time `now_ns` without a packet, so an idle
    /// capture still completes its file on time. Call it periodically (e.g. every second).
    pub fn tick(&mut self, now_ns: u64) -> Result<(), CaptureError> {
        self.check_usable()?;
        self.rotate_if_due(now_ns)
    }

    /// Hand buffered packets to the kernel (no `fsync`), e.g. so a reader can see them.
    pub fn flush(&mut self) -> Result<(), CaptureError> {
        self.check_usable()?;
        let cur = self.current.as_mut().expect("checked by check_usable");
        match cur.flush() {
            Ok(()) => Ok(()),
            Err((e, dropped)) => Err(self.fail_current(e, dropped, "write")),
        }
    }

    /// Complete the last file (statistics blocks, flush, `fsync`) and return the totals.
    ///
    /// A last file with no packets and no loss is deleted, unless it is the only file.
    pub fn finish(mut self) -> Result<Stats, CaptureError> {
        self.check_usable()?;
        let now = (self.opts.clock)();
        let cur = self.current.take().expect("checked by check_usable");
        if cur.is_blank() && self.files.len() > 1 {
            self.discard(cur)?;
        } else {
            let end = now.max(cur.last_ns);
            self.close(cur, end)?;
        }
        Ok(self.stats())
    }

    // -----------------------------------------------------------------------------------

    fn check_usable(&self) -> Result<(), CaptureError> {
        match (&self.failed, &self.current) {
            (Some(e), _) => Err(CaptureError::Stopped {
                first_error: e.clone(),
            }),
            (None, None) => Err(CaptureError::Stopped {
                first_error: "no capture file is open".to_string(),
            }),
            (None, Some(_)) => Ok(()),
        }
    }

    /// Bytes reserved at the end of a pcapng file for its statistics blocks.
    fn trailer_reserve(&self) -> u64 {
        match self.format {
            CaptureFormat::Pcap => 0,
            CaptureFormat::PcapNg if self.hops.is_empty() => 0,
            CaptureFormat::PcapNg => {
                self.hops.len() as u64 * (ISB_FIXED_LEN + cut_comment_reserve())
                    + self.comment_reserve
            }
        }
    }

    /// Whether adding `n` bytes would take a file with packets past `-C`.
    fn exceeds_limit(&self, n: u64) -> bool {
        let (Some(limit), Some(cur)) = (self.policy.max_file_bytes(), self.current.as_ref()) else {
            return false;
        };
        cur.packets > 0 && cur.len() + n + self.trailer_reserve() > limit
    }

    fn rotate_if_due(&mut self, now: u64) -> Result<(), CaptureError> {
        let Some(interval) = self.policy.interval() else {
            return Ok(());
        };
        let interval = interval.as_nanos().min(u128::from(u64::MAX)) as u64;
        if now < self.window_start.saturating_add(interval) {
            return Ok(());
        }
        let cur = self.current.as_mut().expect("checked by check_usable");
        if cur.is_blank() && self.namer.stem(now)? == cur.stem {
            // Nothing to complete and the name would not change: keep the file, start the
            // new interval in it.
            self.window_start = now;
            cur.start_ns = now;
            return Ok(());
        }
        self.rotate(now, true)
    }

    /// Complete the current file and start the next. `at` is the rotation time (the end of
    /// one file, the start of the next); with `new_interval` it also starts the next `-G`
    /// interval, otherwise the next file is named after the current interval's start.
    fn rotate(&mut self, at: u64, new_interval: bool) -> Result<(), CaptureError> {
        let cur = self.current.take().expect("rotate needs an open file");
        if new_interval {
            self.window_start = at;
        }
        if cur.is_blank() {
            self.discard(cur)?;
        } else {
            let end = at.max(cur.last_ns);
            self.close(cur, end)?;
        }
        self.open_next(at)
    }

    /// Delete an unused file (no packets, no loss) and give its name back.
    fn discard(&mut self, cur: OpenFile) -> Result<(), CaptureError> {
        let OpenFile {
            path, stem, file, ..
        } = cur;
        drop(file);
        self.files.retain(|p| p != &path);
        self.namer.rollback(&stem);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.fail(CaptureError::io(&path, "delete unused", e))),
        }
    }

    /// Write the trailer, flush, fsync and close.
    fn close(&mut self, mut cur: OpenFile, end_ns: u64) -> Result<(), CaptureError> {
        if self.format == CaptureFormat::PcapNg {
            // Only interfaces described in this file: a hop added just before a rotation
            // is described in the next file only.
            let mut block = Vec::with_capacity(256);
            for hop in 0..cur.interfaces {
                block.clear();
                let lost = (hop == 0 && cur.lost_unattributed > 0)
                    .then(|| lost_comment(cur.lost_unattributed));
                let cut = (cur.cut_per_hop[hop] > 0).then(|| cut_comment(cur.cut_per_hop[hop]));
                let comments: Vec<&str> =
                    lost.iter().chain(cut.iter()).map(|c| c.as_str()).collect();
                encode_isb(
                    &mut block,
                    hop as u32,
                    cur.start_ns,
                    end_ns,
                    cur.lost_per_hop[hop],
                    cur.packets_per_hop[hop],
                    &comments,
                );
                cur.push(&block, None);
            }
        }
        if let Err((e, dropped)) = cur.flush() {
            self.current = Some(cur);
            return Err(self.fail_current(e, dropped, "write"));
        }
        if let Err(e) = cur.file.sync_all() {
            let path = cur.path.clone();
            self.closed_bytes += cur.len();
            return Err(self.fail(CaptureError::io(&path, "sync", e)));
        }
        self.closed_bytes += cur.len();
        self.stats.files_written += 1;
        Ok(())
    }

    /// Create the next file (deleting the oldest if the ring is full) and write its header.
    /// It is named after the interval's start and covers time from `start_ns`.
    fn open_next(&mut self, start_ns: u64) -> Result<(), CaptureError> {
        let (path, stem) = self.namer.next(self.window_start)?;
        if let Some(max) = self.policy.max_files() {
            while self.files.len() >= max as usize {
                let oldest = self.files.remove(0);
                match self.reaper.delete(&oldest) {
                    Ok(()) => self.stats.files_deleted += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(self.fail(CaptureError::io(&oldest, "delete old", e))),
                }
            }
        }
        // A ring name comes round again only once its file is the oldest, deleted above;
        // anything else (a clock step back with a coarse time pattern) is replaced below.
        let before = self.files.len();
        self.files.retain(|p| p != &path);
        self.stats.files_deleted += (before - self.files.len()) as u64;
        let file = create_capture_file(&path).map_err(|e| self.fail(e))?;
        let hops = self.hops.len();
        let mut cur = OpenFile {
            path,
            stem,
            file,
            buf: Vec::with_capacity(BUFFER_BYTES + 4096),
            records: Vec::new(),
            on_disk: 0,
            header_len: 0,
            interfaces: 0,
            packets: 0,
            packets_per_hop: vec![0; hops],
            lost_per_hop: vec![0; hops],
            cut_per_hop: vec![0; hops],
            lost_unattributed: 0,
            start_ns,
            last_ns: 0,
        };
        let mut block = Vec::with_capacity(512);
        match self.format {
            CaptureFormat::PcapNg => {
                let shb = SectionHeaderBlock {
                    endianness: Endianness::native(),
                    major_version: 1,
                    minor_version: 0,
                    section_length: -1,
                    options: vec![SectionHeaderOption::UserApplication(Cow::Owned(
                        clamp_option(&self.opts.application),
                    ))],
                };
                Block::SectionHeader(shb)
                    .write_to::<NativeEndian, _>(&mut block)
                    .expect("writing to a Vec cannot fail");
                cur.push(&block, None);
                for hop in &self.hops {
                    block.clear();
                    encode_idb(&mut block, hop, self.snaplen, &self.opts);
                    cur.push(&block, None);
                }
                cur.interfaces = self.hops.len();
            }
            CaptureFormat::Pcap => {
                let header = PcapHeader {
                    version_major: 2,
                    version_minor: 4,
                    ts_correction: 0,
                    ts_accuracy: 0,
                    snaplen: self.snaplen,
                    datalink: DataLink::ETHERNET,
                    ts_resolution: TsResolution::NanoSecond,
                    endianness: Endianness::native(),
                };
                header
                    .write_to(&mut block)
                    .expect("writing to a Vec cannot fail");
                cur.push(&block, None);
            }
        }
        cur.header_len = cur.buf.len() as u64;
        self.files.push(cur.path.clone());
        // Write the header at once: the file is valid from the start, and a full disk or
        // a permission problem shows up now rather than at the first packet.
        if let Err((e, _)) = cur.flush() {
            return Err(self.fail_header(cur, e));
        }
        self.current = Some(cur);
        Ok(())
    }

    /// Stop the writer with `e`.
    fn fail(&mut self, e: CaptureError) -> CaptureError {
        if self.failed.is_none() {
            self.failed = Some(e.to_string());
        }
        e
    }

    /// The current file could not be written: it has been cut back to whole records;
    /// account for the packets that did not make it and stop.
    fn fail_current(
        &mut self,
        e: io::Error,
        dropped: Vec<usize>,
        action: &'static str,
    ) -> CaptureError {
        let cur = self
            .current
            .take()
            .expect("fail_current needs an open file");
        for hop in dropped {
            self.stats.packets_written -= 1;
            self.stats.packets_per_hop[hop] -= 1;
        }
        if cur.on_disk < cur.header_len {
            return self.fail_header(cur, e);
        }
        self.closed_bytes += cur.on_disk;
        self.stats.files_written += 1;
        let err = CaptureError::io(&cur.path, action, e);
        self.fail(err)
    }

    /// Not even the header of a new file could be written: remove the file.
    fn fail_header(&mut self, cur: OpenFile, e: io::Error) -> CaptureError {
        let path = cur.path.clone();
        drop(cur);
        let _ = fs::remove_file(&path);
        self.files.retain(|p| p != &path);
        let err = match CaptureError::io(&path, "write header of", e) {
            CaptureError::DiskFull { path, source, .. } => CaptureError::DiskFull {
                path,
                source,
                file_kept: false,
            },
            other => other,
        };
        self.fail(err)
    }
}

impl Drop for CaptureWriter {
    /// Best effort: complete the open file if [`finish`](CaptureWriter::finish) was not
    /// called (e.g. on an early return or a panic), so it stays readable.
    fn drop(&mut self) {
        if self.failed.is_none() {
            if let Some(cur) = self.current.take() {
                let end = (self.opts.clock)().max(cur.last_ns);
                let _ = self.close(cur, end);
            }
        }
    }
}

/// Create a capture file: never through a symbolic link, mode 0600, replacing (unlinking)
/// a regular file left by an earlier run rather than writing into it.
fn create_capture_file(path: &Path) -> Result<File, CaptureError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            return Err(CaptureError::Symlink {
                path: path.to_path_buf(),
            })
        }
        Ok(m) if m.is_file() => match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(CaptureError::io(path, "replace existing", e)),
        },
        Ok(_) => {
            return Err(CaptureError::NotAFile {
                path: path.to_path_buf(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(CaptureError::io(path, "inspect", e)),
    }
    // O_EXCL: whatever appeared since the check (a symlink planted in between included)
    // makes this fail instead of being followed or overwritten.
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => CaptureError::Symlink {
                path: path.to_path_buf(),
            },
            Some(libc::EEXIST) => match fs::symlink_metadata(path) {
                Ok(m) if m.file_type().is_symlink() => CaptureError::Symlink {
                    path: path.to_path_buf(),
                },
                _ => CaptureError::io(path, "create (it appeared while being replaced)", e),
            },
            _ => CaptureError::io(path, "create", e),
        })
}

fn clamp_option(s: &str) -> String {
    if s.len() <= MAX_OPTION_STRING {
        return s.to_string();
    }
    let mut end = MAX_OPTION_STRING;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

fn encode_idb(out: &mut Vec<u8>, hop: &HopDesc, snaplen: u32, opts: &WriterOptions) {
    let mut options = vec![InterfaceDescriptionOption::IfName(Cow::Owned(
        clamp_option(&hop.name),
    ))];
    let desc = hop.description();
    if !desc.is_empty() {
        options.push(InterfaceDescriptionOption::IfDescription(Cow::Owned(
            clamp_option(&desc),
        )));
    }
    options.push(InterfaceDescriptionOption::IfTsResol(TSRESOL_NANOS));
    if let Some(filter) = opts.filter.as_deref().filter(|f| !f.is_empty()) {
        // if_filter: a first byte 0 says "libpcap filter string".
        let mut v = vec![0u8];
        v.extend_from_slice(clamp_option(filter).as_bytes());
        options.push(InterfaceDescriptionOption::IfFilter(Cow::Owned(v)));
    }
    if let Some(c) = &hop.comment {
        options.push(InterfaceDescriptionOption::Comment(Cow::Owned(
            clamp_option(c),
        )));
    }
    let idb = InterfaceDescriptionBlock {
        linktype: DataLink::ETHERNET,
        snaplen,
        options,
    };
    Block::InterfaceDescription(idb)
        .write_to::<NativeEndian, _>(out)
        .expect("writing to a Vec cannot fail");
}

fn lost_comment(n: u64) -> String {
    format!(
        "{n} packets were lost before reaching the writer without a known interface; \
         they are not counted in any isb_ifdrop"
    )
}

fn cut_comment(n: u64) -> String {
    format!(
        "{n} packets of this interface were cut to their first {} bytes: the kernel's ring \
         buffer had no room for them whole (the capture could not keep pace)",
        podtrace_abi::CUT_BYTES
    )
}

/// What a hop's statistics block may need for its [`cut_comment`].
fn cut_comment_reserve() -> u64 {
    option_len(cut_comment(u64::MAX).len()) as u64
}

/// Bytes of a pcapng option with a `len`-byte value: header and padding included.
fn option_len(len: usize) -> usize {
    4 + len.div_ceil(4) * 4
}

/// Size of an Interface Statistics Block without a comment: block header (8), interface
/// id (4), timestamp (8), isb_starttime, isb_endtime, isb_ifdrop, isb_usrdeliv (12 each),
/// end of options (4), trailing length (4).
const ISB_FIXED_LEN: u64 = 8 + 4 + 8 + 4 * 12 + 4 + 4;

/// Encode an Interface Statistics Block.
///
/// Written by hand: pcap-file 2.0 writes the ISB timestamp and `isb_starttime` /
/// `isb_endtime` as one 64-bit integer in the section's byte order, while pcapng stores
/// them as two 32-bit words, high word first; on a little-endian machine its blocks carry
/// word-swapped times. The block framing still goes through pcap-file's [`RawBlock`].
fn encode_isb(
    out: &mut Vec<u8>,
    interface_id: u32,
    start_ns: u64,
    end_ns: u64,
    ifdrop: u64,
    usrdeliv: u64,
    comments: &[&str],
) {
    fn u16s(v: &mut Vec<u8>, x: u16) {
        let mut b = [0u8; 2];
        NativeEndian::write_u16(&mut b, x);
        v.extend_from_slice(&b);
    }
    fn u32s(v: &mut Vec<u8>, x: u32) {
        let mut b = [0u8; 4];
        NativeEndian::write_u32(&mut b, x);
        v.extend_from_slice(&b);
    }
    fn u64s(v: &mut Vec<u8>, x: u64) {
        let mut b = [0u8; 8];
        NativeEndian::write_u64(&mut b, x);
        v.extend_from_slice(&b);
    }
    fn ts(v: &mut Vec<u8>, t: u64) {
        u32s(v, (t >> 32) as u32);
        u32s(v, t as u32);
    }
    let mut body = Vec::with_capacity(96);
    u32s(&mut body, interface_id);
    ts(&mut body, end_ns);
    for c in comments {
        let c = clamp_option(c);
        u16s(&mut body, 1); // opt_comment
        u16s(&mut body, c.len() as u16);
        body.extend_from_slice(c.as_bytes());
        body.resize(body.len() + (4 - c.len() % 4) % 4, 0);
    }
    u16s(&mut body, 2); // isb_starttime
    u16s(&mut body, 8);
    ts(&mut body, start_ns);
    u16s(&mut body, 3); // isb_endtime
    u16s(&mut body, 8);
    ts(&mut body, end_ns);
    u16s(&mut body, 5); // isb_ifdrop
    u16s(&mut body, 8);
    u64s(&mut body, ifdrop);
    u16s(&mut body, 8); // isb_usrdeliv
    u16s(&mut body, 8);
    u64s(&mut body, usrdeliv);
    u16s(&mut body, 0); // opt_endofopt
    u16s(&mut body, 0);
    let total = (body.len() + 12) as u32;
    RawBlock {
        type_: ISB_TYPE,
        initial_len: total,
        body: Cow::Owned(body),
        trailer_len: total,
    }
    .write_to::<NativeEndian, _>(out)
    .expect("writing to a Vec cannot fail");
}

#[cfg(test)]
mod tests;
