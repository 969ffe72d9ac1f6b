//! pcap/pcapng writing with rotation, and the capture filter language.
//!
//! Userspace only: `podtrace capture` and `follow -w` feed the engine's packets in through
//! [`sink`]; nothing here touches eBPF or the network.
//!
//! * [`CaptureWriter`] writes pcapng (default) or classic pcap files, rotating them by size
//!   (`-C`), time (`-G`) or both, keeping at most `-W` files ([`RotationPolicy`]; naming
//!   and rotation rules in [`rotate`]).
//! * [`CaptureFilter`] parses and evaluates tcpdump-style filter expressions (the subset in
//!   [`filter`]) against a [`PacketSummary`], which [`parse_ethernet`] builds from a frame,
//!   looking inside VXLAN (UDP 8472).
//!
//! ```no_run
//! use podtrace::pcap::*;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let filter = CaptureFilter::parse_args(["host", "10.244.1.5", "and", "tcp"])?;
//! let policy = RotationPolicy::from_flags(Some(100), Some(std::time::Duration::from_secs(60)), Some(10))?;
//! eprintln!("{}", policy.describe("/tmp/x.pcapng".as_ref()));
//! let hops = vec![HopDesc::new("node-a", "veth1a2b3c4d").with_ifindex(7).with_netns("/run/netns/pt-node-a")];
//! let mut w = CaptureWriter::create("/tmp/x.pcapng", CaptureFormat::PcapNg, policy, 0, hops)?;
//! # let (frame, ts_ns): (Vec<u8>, u64) = (vec![], 0);
//! if filter.matches(&parse_ethernet(&frame)) {
//!     w.write(0, Direction::Outbound, ts_ns, frame.len() as u32, &frame)?;
//! }
//! let stats = w.finish()?;
//! # let _ = stats; Ok(()) }
//! ```
//!
//! # pcapng layout
//!
//! Every file stands alone: a Section Header Block (`shb_userappl` "podtrace VERSION"),
//! then one Interface Description Block per hop, in hop order, so interface *i* is hop *i*
//! in every file. An IDB has linktype ETHERNET, the snap length, `if_name` = the hop name
//! (`node-a/veth1a2b3c4d`), `if_description` = `ifindex=7 netns=/run/netns/pt-node-a`,
//! `if_tsresol` = 9 (nanoseconds), `if_filter` = the filter text if one was given, and the
//! hop's comment. Hops added later ([`CaptureWriter::add_hop`]) get their IDB in the
//! current file when added and in the header of every later file.
//!
//! Each packet is an Enhanced Packet Block on its hop's interface, with the caller's
//! wall-clock timestamp, the original length (kept when the data is cut to the snap length)
//! and the direction in `epb_flags` (inbound = 1, outbound = 2; no flags when unknown).
//!
//! When a file is completed (rotation or [`finish`](CaptureWriter::finish)), one Interface
//! Statistics Block per interface ends it: `isb_starttime` / `isb_endtime` = the interval
//! the file covers, `isb_ifdrop` = packets of that hop reported lost
//! ([`add_lost`](CaptureWriter::add_lost)) while the file was current, `isb_usrdeliv` =
//! that hop's packets in the file. Losses not attributable to a hop
//! ([`add_lost_unattributed`](CaptureWriter::add_lost_unattributed)) are stated in a comment
//! on interface 0's statistics block. `capinfos` and Wireshark's capture file properties
//! show these; the counts are per file, not cumulative.
//!
//! # Classic pcap and hops
//!
//! A classic pcap file has one link type and no per-packet interface, direction or loss
//! fields. podtrace writes **all hops into the same file**, in the order the packets are
//! written, so a packet seen at three hops appears three times, indistinguishable except
//! by timestamp. Use pcapng (the default) to tell hops apart — or, for one clean pcap per
//! hop, create one writer per hop with its own path. Loss counts are only in [`Stats`].
//! Files use the nanosecond magic (`0xa1b23c4d`), native byte order, linktype ETHERNET.
//!
//! # File safety
//!
//! * Files are created with mode 0600 through `open(O_CREAT|O_EXCL|O_NOFOLLOW)`: a symbolic
//!   link at a file's path is never followed; it is an error ([`CaptureError::Symlink`]).
//! * A regular file already at the path (an earlier run's) is **replaced**, like tcpdump's
//!   truncation but by unlinking it and creating a new file, so neither its permissions
//!   nor its other hard links are reused. Anything else at the path (a directory, a FIFO)
//!   is an error. Directories in the path are followed as usual.
//! * Records are buffered and written whole; every file is flushed and `fsync`ed when
//!   completed, so a rotated file is complete and readable the moment the next one
//!   starts. [`CaptureWriter::flush`] hands buffered packets to the kernel on demand.
//! * On a write error the current file is cut back to its last complete record, so it
//!   stays readable, and the writer stops ([`CaptureError::Stopped`] afterwards). A full
//!   disk (`ENOSPC`, `EDQUOT`) is reported as [`CaptureError::DiskFull`] naming the file.
//!   Earlier files are never touched.
//!
//! # Time
//!
//! Packet timestamps are given by the caller (nanoseconds since the epoch) and drive `-G`
//! rotation, so tests need no sleeping; [`CaptureWriter::tick`] rotates an idle capture on
//! time. The writer reads the wall clock ([`WriterOptions::clock`]) only at creation (the
//! first interval and file name) and at [`finish`](CaptureWriter::finish).

pub mod error;
pub mod filter;
pub mod packet;
pub mod rotate;
pub mod sink;
pub mod writer;

pub use error::CaptureError;
pub use filter::{CaptureFilter, FilterError, FilterErrorKind, PreFilter};
pub use packet::{parse_ethernet, parse_ethernet_with, PacketSummary, ParseOptions};
pub use rotate::{NameTimeZone, RotationPolicy};
pub use writer::{
    wall_clock_ns, CaptureFormat, CaptureWriter, Direction, HopDesc, Stats, WriterOptions,
    DEFAULT_SNAPLEN,
};
