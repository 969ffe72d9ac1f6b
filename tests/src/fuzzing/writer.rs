//! The capture writer fed arbitrary packets, lengths, timestamps, hops (names of any
//! length and script), losses and rotation policies. Whatever happens, every file left on
//! disk must read back: each is parsed here with pcap-file's readers and checked against
//! the format's rules and the rotation policy (`tests/tests/fuzz_corpus.rs` also runs
//! tshark on the outputs of the committed corpus).

use std::cell::Cell;
use std::fs::{self, File};
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arbitrary::Arbitrary;
use pcap_file::pcap::PcapReader;
use pcap_file::pcapng::{Block, PcapNgReader};
use podtrace::pcap::{
    CaptureFormat, CaptureWriter, Direction, HopDesc, NameTimeZone, RotationPolicy, WriterOptions,
};

/// Bytes of packet data one input may write at most (keeps an input under a second).
const DATA_BUDGET: usize = 8 << 20;

/// The longest record Wireshark and libpcap read (Wireshark's WTAP_MAX_PACKET_SIZE_STANDARD).
pub const READER_MAX: u64 = 262_144;

#[derive(Arbitrary, Debug)]
pub struct WriterInput {
    pub pcapng: bool,
    pub snaplen: Snaplen,
    /// `-C` in bytes (`with_max_file_bytes`), tiny ones included.
    pub max_file_bytes: Option<u32>,
    /// `-G` in milliseconds.
    pub interval_ms: Option<u32>,
    /// `-W`.
    pub max_files: Option<u8>,
    pub name: Name,
    pub hops: Vec<Hop>,
    pub filter: Option<String>,
    pub application: Option<String>,
    /// The wall clock at creation.
    pub start_ns: u64,
    pub ops: Vec<Op>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Snaplen {
    /// 0: the default (262144).
    Default,
    Small(u8),
    Medium(u16),
    Any(u32),
}

/// The `-w` file name (in a fresh directory).
#[derive(Arbitrary, Debug)]
pub enum Name {
    Plain,
    /// strftime conversions, as with `-G`.
    Time,
    /// Any text; `/` and NUL are replaced.
    Custom(String),
}

#[derive(Arbitrary, Debug, Clone)]
pub struct Hop {
    pub owner: String,
    pub ifname: String,
    pub ifindex: Option<u32>,
    pub netns: Option<String>,
    pub comment: Option<String>,
}

#[derive(Arbitrary, Debug)]
pub enum Op {
    Write {
        hop: u8,
        direction: u8,
        ts: Ts,
        orig_len: u32,
        len: Len,
        fill: u8,
    },
    AddHop(Hop),
    AddLost {
        hop: u8,
        n: u64,
    },
    AddLostUnattributed(u64),
    Tick(Ts),
    Flush,
    /// Moves the wall clock the writer reads at `finish`.
    SetClock(u64),
}

/// A timestamp relative to the previous one.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Ts {
    Same,
    ForwardMs(u16),
    ForwardSecs(u32),
    BackMs(u16),
    Absolute(u64),
}

/// A packet length: mostly small, sometimes past the default snap length.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Len {
    Small(u8),
    Medium(u16),
    Large(u32),
}

impl Len {
    fn bytes(self) -> usize {
        match self {
            Len::Small(n) => usize::from(n),
            Len::Medium(n) => usize::from(n),
            Len::Large(n) => n as usize % 400_000,
        }
    }
}

impl Ts {
    fn apply(self, t: u64) -> u64 {
        match self {
            Ts::Same => t,
            Ts::ForwardMs(ms) => t.saturating_add(u64::from(ms) * 1_000_000),
            Ts::ForwardSecs(s) => t.saturating_add(u64::from(s) * 1_000_000_000),
            Ts::BackMs(ms) => t.saturating_sub(u64::from(ms) * 1_000_000),
            Ts::Absolute(t) => t,
        }
    }
}

impl Hop {
    fn desc(&self) -> HopDesc {
        let mut h = HopDesc::new(&self.owner, &self.ifname);
        if let Some(i) = self.ifindex {
            h = h.with_ifindex(i);
        }
        if let Some(ns) = &self.netns {
            h = h.with_netns(ns.clone());
        }
        if let Some(c) = &self.comment {
            h = h.with_comment(c.clone());
        }
        h
    }
}

thread_local! {
    static NOW: Cell<u64> = const { Cell::new(0) };
}

fn clock() -> u64 {
    NOW.with(Cell::get)
}

/// A directory for outputs: on tmpfs when there is one.
pub fn scratch_root() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// What one input left behind.
pub struct Outcome {
    /// The directory holding the files (the caller removes it).
    pub dir: PathBuf,
    /// Every file in it, sorted.
    pub files: Vec<PathBuf>,
    /// Packets read back from all of them.
    pub packets: u64,
}

/// The `writer` target: runs the input's operations on a writer in a new directory under
/// `scratch`, then reads back every file left there. Panics on any violated property.
pub fn check(input: &WriterInput, scratch: &Path) -> Outcome {
    static RUN: AtomicU64 = AtomicU64::new(0);
    let dir = scratch.join(format!(
        "podtrace-fuzz-writer-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("creating the scratch directory");
    let name = match &input.name {
        Name::Plain => "cap.pcapng".to_string(),
        Name::Time => "cap-%Y%m%d-%H%M%S.pcap".to_string(),
        Name::Custom(s) => s.replace(['/', '\0'], "_"),
    };
    let path = dir.join(&name);
    let mut policy = RotationPolicy::none();
    if let Some(c) = input.max_file_bytes {
        policy = policy.with_max_file_bytes(u64::from(c));
    }
    if let Some(ms) = input.interval_ms {
        policy = policy.with_interval(Duration::from_millis(u64::from(ms)));
    }
    if let Some(w) = input.max_files {
        policy = policy.with_max_files(u32::from(w));
    }
    let snaplen = match input.snaplen {
        Snaplen::Default => 0,
        Snaplen::Small(n) => u32::from(n),
        Snaplen::Medium(n) => u32::from(n),
        Snaplen::Any(n) => n,
    };
    let format = if input.pcapng {
        CaptureFormat::PcapNg
    } else {
        CaptureFormat::Pcap
    };
    let mut opts = WriterOptions {
        filter: input.filter.clone(),
        name_time_zone: NameTimeZone::Utc,
        clock,
        ..WriterOptions::default()
    };
    if let Some(app) = &input.application {
        opts.application = app.clone();
    }
    NOW.with(|c| c.set(input.start_ns));
    let hops: Vec<HopDesc> = input.hops.iter().map(Hop::desc).collect();
    let writer = CaptureWriter::create_with(&path, format, policy, snaplen, hops, opts);
    let mut w = match writer {
        Ok(w) => w,
        Err(_) => {
            // Refused: nothing may be left behind.
            let left = list(&dir);
            assert!(left.is_empty(), "a refused writer left {left:?}");
            return Outcome {
                dir,
                files: left,
                packets: 0,
            };
        }
    };
    let mut ts = input.start_ns;
    let mut budget = DATA_BUDGET;
    let mut data = Vec::new();
    let mut io_error = false;
    for op in &input.ops {
        let hops = w.hops().len();
        let result = match op {
            Op::Write {
                hop,
                direction,
                ts: step,
                orig_len,
                len,
                fill,
            } => {
                let n = len.bytes();
                if n > budget {
                    continue;
                }
                budget -= n;
                data.clear();
                data.extend((0..n).map(|i| fill.wrapping_add(i as u8)));
                ts = step.apply(ts);
                let dir = match direction % 3 {
                    0 => Direction::Inbound,
                    1 => Direction::Outbound,
                    _ => Direction::Unknown,
                };
                // One index past the end now and then: must be refused.
                let hop = usize::from(*hop) % (hops + 1);
                w.write(hop, dir, ts, *orig_len, &data)
            }
            Op::AddHop(h) => w.add_hop(h.desc()).map(|_| ()),
            Op::AddLost { hop, n } => w.add_lost(usize::from(*hop) % (hops + 1), *n),
            Op::AddLostUnattributed(n) => {
                w.add_lost_unattributed(*n);
                Ok(())
            }
            Op::Tick(step) => {
                ts = step.apply(ts);
                w.tick(ts)
            }
            Op::Flush => w.flush(),
            Op::SetClock(t) => {
                NOW.with(|c| c.set(*t));
                Ok(())
            }
        };
        if let Err(e) = result {
            use podtrace::pcap::CaptureError::*;
            match e {
                UnknownHop { .. } | Encode { .. } | Stopped { .. } => {}
                // A name too long for the file system, and the like.
                _ => io_error = true,
            }
        }
    }
    let written = w.stats().packets_written;
    let finished = w.finish();
    let files = list(&dir);
    let mut packets = 0;
    for f in &files {
        let (n, size) = read_back(f, format);
        packets += n;
        if let Some(limit) = policy.max_file_bytes() {
            assert!(
                size <= limit || n <= 1,
                "{} has {size} bytes, over -C {limit}, with {n} packets",
                f.display()
            );
        }
    }
    if let Some(max) = policy.max_files() {
        assert!(
            files.len() <= max as usize,
            "{} files, over -W {max}: {files:?}",
            files.len()
        );
    }
    assert!(
        packets <= written,
        "{packets} packets read, {written} written"
    );
    if let Ok(stats) = finished {
        if stats.files_deleted == 0 && !io_error {
            assert_eq!(packets, stats.packets_written, "packets read back");
        }
    }
    Outcome {
        dir,
        files,
        packets,
    }
}

fn list(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .expect("listing the scratch directory")
        .map(|e| e.expect("listing the scratch directory").path())
        .collect();
    v.sort();
    v
}

/// Reads a capture file back whole with pcap-file; returns its packets and size.
pub fn read_back(path: &Path, format: CaptureFormat) -> (u64, u64) {
    let size = fs::metadata(path).expect("stat").len();
    let file = BufReader::new(File::open(path).expect("opening a capture file"));
    let mut packets = 0;
    match format {
        CaptureFormat::PcapNg => {
            let mut r = PcapNgReader::new(file)
                .unwrap_or_else(|e| panic!("{}: no section header: {e}", path.display()));
            let mut snaplens: Vec<u32> = Vec::new();
            while let Some(block) = r.next_block() {
                match block.unwrap_or_else(|e| panic!("{}: {e}", path.display())) {
                    Block::InterfaceDescription(idb) => snaplens.push(idb.snaplen),
                    Block::EnhancedPacket(epb) => {
                        let snap = *snaplens.get(epb.interface_id as usize).unwrap_or_else(|| {
                            panic!(
                                "{}: packet on interface {} of {}",
                                path.display(),
                                epb.interface_id,
                                snaplens.len()
                            )
                        });
                        let len = epb.data.len() as u64;
                        assert!(len <= u64::from(epb.original_len), "{}", path.display());
                        assert!(snap == 0 || len <= u64::from(snap), "{}", path.display());
                        assert!(len <= READER_MAX, "{}: a {len}-byte record", path.display());
                        packets += 1;
                    }
                    Block::InterfaceStatistics(isb) => {
                        assert!(
                            (isb.interface_id as usize) < snaplens.len(),
                            "{}: statistics of interface {}",
                            path.display(),
                            isb.interface_id
                        );
                    }
                    Block::SectionHeader(_) => {}
                    other => panic!("{}: unexpected block {other:?}", path.display()),
                }
            }
        }
        CaptureFormat::Pcap => {
            let mut r = PcapReader::new(file)
                .unwrap_or_else(|e| panic!("{}: no pcap header: {e}", path.display()));
            let snaplen = r.header().snaplen;
            while let Some(p) = r.next_raw_packet() {
                let p = p.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert!(p.incl_len <= snaplen, "{}", path.display());
                assert!(p.incl_len <= p.orig_len, "{}", path.display());
                assert!(u64::from(p.incl_len) <= READER_MAX, "{}", path.display());
                packets += 1;
            }
        }
    }
    (packets, size)
}
