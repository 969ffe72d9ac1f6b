//! Writer tests: files are written for real and read back with an independent parser here,
//! with pcap-file's readers, and with `tshark` / `tcpdump` / `capinfos` when installed.

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::*;
use crate::pcap::packet::{testpkt, IPPROTO_UDP};
use crate::pcap::rotate::NameTimeZone;

const SEC: u64 = 1_000_000_000;
/// 2023-11-14 22:13:20 UTC.
const T0: u64 = 1_700_000_000 * SEC;

fn clock_t0() -> u64 {
    T0
}

fn opts() -> WriterOptions {
    WriterOptions {
        clock: clock_t0,
        name_time_zone: NameTimeZone::Utc,
        ..WriterOptions::default()
    }
}

/// A unique directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "podtrace-pcap-{tag}-{}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            wall_clock_ns()
        ));
        fs::create_dir(&p).unwrap();
        TempDir(p)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// File names in the directory, sorted.
    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn hops2() -> Vec<HopDesc> {
    vec![
        HopDesc::new("node-a", "veth1a2b3c4d")
            .with_ifindex(7)
            .with_netns("/run/netns/pt-node-a"),
        HopDesc::new("node-b", "eth0")
            .with_ifindex(2)
            .with_netns("/run/netns/pt-node-b")
            .with_comment("uplink"),
    ]
}

/// An Ethernet/IPv4/UDP frame of exactly `len` bytes whose payload starts with `seq`.
fn pkt(seq: u32, len: usize) -> Vec<u8> {
    assert!(len >= 46);
    let mut payload = seq.to_be_bytes().to_vec();
    payload.resize(len - 42, 0xab);
    let f = testpkt::ipv4_frame(
        "10.244.0.9".parse().unwrap(),
        "10.244.1.5".parse().unwrap(),
        IPPROTO_UDP,
        &testpkt::udp(40000, 5000, &payload),
    );
    assert_eq!(f.len(), len);
    f
}

fn seq_of(data: &[u8]) -> u32 {
    u32::from_be_bytes(data[42..46].try_into().unwrap())
}

// ---------------------------------------------------------------------------------------
// An independent pcapng reader (native byte order, as the writer uses).

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Idb {
    linktype: u16,
    snaplen: u32,
    name: Option<String>,
    description: Option<String>,
    tsresol: Option<u8>,
    filter: Option<Vec<u8>>,
    comment: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Epb {
    iface: u32,
    ts: u64,
    orig_len: u32,
    data: Vec<u8>,
    flags: Option<u32>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Isb {
    iface: u32,
    ts: u64,
    start: Option<u64>,
    end: Option<u64>,
    ifdrop: Option<u64>,
    usrdeliv: Option<u64>,
    comment: Option<String>,
}

#[derive(Debug, Default)]
struct NgFile {
    shbs: usize,
    app: Option<String>,
    idbs: Vec<Idb>,
    epbs: Vec<Epb>,
    isbs: Vec<Isb>,
}

fn u16n(b: &[u8]) -> u16 {
    u16::from_ne_bytes(b[..2].try_into().unwrap())
}
fn u32n(b: &[u8]) -> u32 {
    u32::from_ne_bytes(b[..4].try_into().unwrap())
}
fn u64n(b: &[u8]) -> u64 {
    u64::from_ne_bytes(b[..8].try_into().unwrap())
}
fn ts_hl(b: &[u8]) -> u64 {
    (u64::from(u32n(b)) << 32) | u64::from(u32n(&b[4..]))
}

/// Options as (code, value) until opt_endofopt.
fn options(mut b: &[u8]) -> Vec<(u16, Vec<u8>)> {
    let mut v = Vec::new();
    while b.len() >= 4 {
        let (code, len) = (u16n(b), usize::from(u16n(&b[2..])));
        if code == 0 {
            break;
        }
        v.push((code, b[4..4 + len].to_vec()));
        b = &b[4 + len.div_ceil(4) * 4..];
    }
    v
}

fn text(v: &[u8]) -> String {
    String::from_utf8(v.to_vec()).unwrap()
}

fn read_ng(path: &Path) -> NgFile {
    let bytes = fs::read(path).unwrap();
    let mut f = NgFile::default();
    let mut b = &bytes[..];
    assert_eq!(u32n(b), 0x0A0D_0D0A, "{}: not pcapng", path.display());
    while !b.is_empty() {
        assert!(b.len() >= 12, "{}: trailing garbage", path.display());
        let (typ, len) = (u32n(b), u32n(&b[4..]) as usize);
        assert!(
            len >= 12 && len % 4 == 0 && len <= b.len(),
            "{}: bad block length",
            path.display()
        );
        assert_eq!(
            u32n(&b[len - 4..]),
            len as u32,
            "{}: trailer length",
            path.display()
        );
        let body = &b[8..len - 4];
        match typ {
            0x0A0D_0D0A => {
                assert_eq!(u32n(body), 0x1A2B_3C4D, "byte-order magic");
                assert_eq!((u16n(&body[4..]), u16n(&body[6..])), (1, 0), "version");
                f.shbs += 1;
                for (code, val) in options(&body[16..]) {
                    if code == 4 {
                        f.app = Some(text(&val));
                    }
                }
            }
            1 => {
                let mut idb = Idb {
                    linktype: u16n(body),
                    snaplen: u32n(&body[4..]),
                    ..Idb::default()
                };
                for (code, val) in options(&body[8..]) {
                    match code {
                        1 => idb.comment = Some(text(&val)),
                        2 => idb.name = Some(text(&val)),
                        3 => idb.description = Some(text(&val)),
                        9 => idb.tsresol = Some(val[0]),
                        11 => idb.filter = Some(val),
                        _ => {}
                    }
                }
                f.idbs.push(idb);
            }
            6 => {
                let cap = u32n(&body[12..]) as usize;
                let mut epb = Epb {
                    iface: u32n(body),
                    ts: ts_hl(&body[4..]),
                    orig_len: u32n(&body[16..]),
                    data: body[20..20 + cap].to_vec(),
                    flags: None,
                };
                for (code, val) in options(&body[20 + cap.div_ceil(4) * 4..]) {
                    if code == 2 {
                        epb.flags = Some(u32n(&val));
                    }
                }
                assert!((epb.iface as usize) < f.idbs.len(), "EPB before its IDB");
                f.epbs.push(epb);
            }
            5 => {
                let mut isb = Isb {
                    iface: u32n(body),
                    ts: ts_hl(&body[4..]),
                    ..Isb::default()
                };
                for (code, val) in options(&body[12..]) {
                    match code {
                        1 => {
                            let t = text(&val);
                            isb.comment = Some(match isb.comment.take() {
                                Some(c) => format!("{c}\n{t}"),
                                None => t,
                            });
                        }
                        2 => isb.start = Some(ts_hl(&val)),
                        3 => isb.end = Some(ts_hl(&val)),
                        5 => isb.ifdrop = Some(u64n(&val)),
                        8 => isb.usrdeliv = Some(u64n(&val)),
                        _ => {}
                    }
                }
                assert!((isb.iface as usize) < f.idbs.len(), "ISB before its IDB");
                f.isbs.push(isb);
            }
            other => panic!("unexpected block type {other:#x}"),
        }
        b = &b[len..];
    }
    // pcap-file's reader must accept the file too.
    let mut r = pcap_file::pcapng::PcapNgReader::new(fs::File::open(path).unwrap()).unwrap();
    let mut n = 0;
    while let Some(block) = r.next_block() {
        block.unwrap_or_else(|e| panic!("{}: pcap-file: {e}", path.display()));
        n += 1;
    }
    // (Its constructor consumes the section header.)
    assert_eq!(n + 1, f.shbs + f.idbs.len() + f.epbs.len() + f.isbs.len());
    f
}

fn seqs(path: &Path) -> Vec<u32> {
    read_ng(path).epbs.iter().map(|e| seq_of(&e.data)).collect()
}

// ---------------------------------------------------------------------------------------
// External tools. A missing tool fails the test (`cargo xtask setup` installs tshark, capinfos
// and tcpdump); a tool that runs and fails fails it too. (The `Option`s below are always
// `Some` now; they read as "the tool's answer".)

fn run_tool(tool: &str, args: &[&str]) -> Option<String> {
    match Command::new(tool).args(args).output() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("{tool} is not installed: run `cargo xtask setup`")
        }
        Err(e) => panic!("running {tool}: {e}"),
        Ok(out) => {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{tool} {args:?} failed: {stderr}");
            // tshark warns about running as root; anything else is a complaint about the file.
            for line in stderr.lines() {
                assert!(
                    line.contains("Running as user") || line.starts_with("reading from file"),
                    "{tool} {args:?}: {line}"
                );
            }
            Some(String::from_utf8(out.stdout).unwrap())
        }
    }
}

/// `tshark -r FILE -T fields -e ...`, one Vec per packet.
fn tshark_fields(path: &Path, fields: &[&str]) -> Option<Vec<Vec<String>>> {
    let p = path.to_str().unwrap();
    let mut args = vec!["-r", p, "-T", "fields", "-E", "separator=;"];
    for f in fields {
        args.push("-e");
        args.push(f);
    }
    let out = run_tool("tshark", &args)?;
    Some(
        out.lines()
            .map(|l| l.split(';').map(str::to_string).collect())
            .collect(),
    )
}

/// pcapng block-level fields through tshark's file-format dissector (one line per file).
fn tshark_blocks(path: &Path, fields: &[&str]) -> Option<Vec<String>> {
    let p = path.to_str().unwrap();
    let mut args = vec![
        "-r",
        p,
        "-X",
        "read_format:MIME Files Format",
        "-T",
        "fields",
        "-E",
        "separator=;",
        "-E",
        "aggregator=|",
    ];
    for f in fields {
        args.push("-e");
        args.push(f);
    }
    let out = run_tool("tshark", &args)?;
    Some(out.trim_end().split(';').map(str::to_string).collect())
}

/// Packet count through Wireshark's file reader (`capinfos`, much quicker than tshark).
fn wireshark_count(path: &Path) -> Option<usize> {
    let out = run_tool("capinfos", &["-c", "-M", path.to_str().unwrap()])?;
    let line = out
        .lines()
        .find(|l| l.starts_with("Number of packets:"))
        .unwrap_or_else(|| panic!("capinfos output: {out}"));
    Some(line.rsplit(' ').next().unwrap().parse().unwrap())
}

// ---------------------------------------------------------------------------------------

#[test]
fn pcapng_records_hops_directions_lengths_and_losses() {
    let dir = TempDir::new("ng");
    let path = dir.join("x.pcapng");
    let o = WriterOptions {
        filter: Some("host 10.244.1.5".into()),
        ..opts()
    };
    let mut w = CaptureWriter::create_with(
        &path,
        CaptureFormat::PcapNg,
        RotationPolicy::none(),
        96,
        hops2(),
        o,
    )
    .unwrap();
    w.write(0, Direction::Inbound, T0 + 1, 150, &pkt(0, 150))
        .unwrap();
    w.write(1, Direction::Outbound, T0 + SEC + 2, 80, &pkt(1, 80))
        .unwrap();
    w.write(1, Direction::Unknown, T0 + 2 * SEC + 3, 0, &pkt(2, 80))
        .unwrap();
    // A GSO-style packet: longer on the wire than the bytes handed over.
    w.write(0, Direction::Outbound, T0 + 3 * SEC + 4, 9000, &pkt(3, 80))
        .unwrap();
    w.add_lost(1, 5).unwrap();
    w.add_lost_unattributed(3);
    let stats = w.finish().unwrap();
    assert_eq!(
        stats,
        Stats {
            files_written: 1,
            files_deleted: 0,
            packets_written: 4,
            packets_truncated: 1,
            packets_cut_for_room: 0,
            bytes_written: fs::metadata(&path).unwrap().len(),
            lost: 8,
            packets_per_hop: vec![2, 2],
        }
    );
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let f = read_ng(&path);
    assert_eq!(f.shbs, 1);
    assert_eq!(
        f.app.as_deref(),
        Some(concat!("podtrace ", env!("CARGO_PKG_VERSION")))
    );
    let mut filter = vec![0u8];
    filter.extend_from_slice(b"host 10.244.1.5");
    assert_eq!(
        f.idbs,
        vec![
            Idb {
                linktype: 1,
                snaplen: 96,
                name: Some("node-a/veth1a2b3c4d".into()),
                description: Some("ifindex=7 netns=/run/netns/pt-node-a".into()),
                tsresol: Some(9),
                filter: Some(filter.clone()),
                comment: None,
            },
            Idb {
                linktype: 1,
                snaplen: 96,
                name: Some("node-b/eth0".into()),
                description: Some("ifindex=2 netns=/run/netns/pt-node-b".into()),
                tsresol: Some(9),
                filter: Some(filter),
                comment: Some("uplink".into()),
            },
        ]
    );
    let got: Vec<_> = f
        .epbs
        .iter()
        .map(|e| {
            (
                e.iface,
                e.ts,
                e.orig_len,
                e.data.len(),
                e.flags,
                seq_of(&e.data),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (0, T0 + 1, 150, 96, Some(1), 0),
            (1, T0 + SEC + 2, 80, 80, Some(2), 1),
            (1, T0 + 2 * SEC + 3, 80, 80, None, 2),
            (0, T0 + 3 * SEC + 4, 9000, 80, Some(2), 3),
        ]
    );
    assert_eq!(f.epbs[0].data[..], pkt(0, 150)[..96]);
    let end = T0 + 3 * SEC + 4;
    assert_eq!(f.isbs.len(), 2);
    assert_eq!(
        f.isbs[1],
        Isb {
            iface: 1,
            ts: end,
            start: Some(T0),
            end: Some(end),
            ifdrop: Some(5),
            usrdeliv: Some(2),
            comment: None
        }
    );
    assert_eq!(
        (f.isbs[0].iface, f.isbs[0].ifdrop, f.isbs[0].usrdeliv),
        (0, Some(0), Some(2))
    );
    assert!(f.isbs[0]
        .comment
        .as_deref()
        .unwrap()
        .starts_with("3 packets were lost"));

    if let Some(rows) = tshark_fields(
        &path,
        &[
            "frame.interface_name",
            "frame.interface_description",
            "frame.packet_flags_direction",
            "frame.len",
            "frame.cap_len",
            "frame.time_epoch",
            "ip.dst",
        ],
    ) {
        let want = [
            [
                "node-a/veth1a2b3c4d",
                "ifindex=7 netns=/run/netns/pt-node-a",
                "0x00000001",
                "150",
                "96",
                "1700000000.000000001",
                "10.244.1.5",
            ],
            [
                "node-b/eth0",
                "ifindex=2 netns=/run/netns/pt-node-b",
                "0x00000002",
                "80",
                "80",
                "1700000001.000000002",
                "10.244.1.5",
            ],
            [
                "node-b/eth0",
                "ifindex=2 netns=/run/netns/pt-node-b",
                "",
                "80",
                "80",
                "1700000002.000000003",
                "10.244.1.5",
            ],
            [
                "node-a/veth1a2b3c4d",
                "ifindex=7 netns=/run/netns/pt-node-a",
                "0x00000002",
                "9000",
                "80",
                "1700000003.000000004",
                "10.244.1.5",
            ],
        ];
        assert_eq!(rows, want.map(|r| r.map(str::to_string).to_vec()).to_vec());
    }
    if let Some(v) = tshark_blocks(
        &path,
        &[
            "pcapng.options.option.data.interface.dropped",
            "pcapng.options.option.data.interface.delivered_to_user",
            "pcapng.options.option.data.interface.filter.string",
            "pcapng.no_interfaces",
        ],
    ) {
        assert_eq!(v, ["0|5", "2|2", "host 10.244.1.5|host 10.244.1.5", ""]);
    }
    if let Some(out) = run_tool(
        "tcpdump",
        &["-nn", "-tt", "--nano", "-r", path.to_str().unwrap()],
    ) {
        let stamps: Vec<&str> = out.lines().map(|l| l.split(' ').next().unwrap()).collect();
        assert_eq!(
            stamps,
            [
                "1700000000.000000001",
                "1700000001.000000002",
                "1700000002.000000003",
                "1700000003.000000004"
            ]
        );
    }
}

#[test]
fn large_packets_written_through_keep_their_place_among_buffered_ones() {
    // Small packets go through the buffer, large ones (WRITE_THROUGH_BYTES and more) straight
    // to the file after it: the file must hold them in the order written, whole, with a snap
    // length cutting some of each kind.
    let lens = |seq: u32| match seq % 4 {
        0 => 60,
        1 => WRITE_THROUGH_BYTES,
        2 => 1500,
        _ => 64 * 1024,
    };
    let snaplen = 40_000u32;
    for format in [CaptureFormat::PcapNg, CaptureFormat::Pcap] {
        let dir = TempDir::new("through");
        let path = dir.join("t.cap");
        let mut w = CaptureWriter::create_with(
            &path,
            format,
            RotationPolicy::none(),
            snaplen,
            hops2(),
            opts(),
        )
        .unwrap();
        let sent: Vec<Vec<u8>> = (0..40).map(|seq| pkt(seq, lens(seq))).collect();
        for (seq, p) in sent.iter().enumerate() {
            w.write(seq % 2, Direction::Inbound, T0 + seq as u64, 0, p)
                .unwrap();
        }
        let stats = w.finish().unwrap();
        assert_eq!((stats.packets_written, stats.packets_truncated), (40, 10));
        assert_eq!(stats.bytes_written, fs::metadata(&path).unwrap().len());
        let got: Vec<(Vec<u8>, u32)> = match format {
            CaptureFormat::PcapNg => read_ng(&path)
                .epbs
                .into_iter()
                .map(|e| (e.data, e.orig_len))
                .collect(),
            CaptureFormat::Pcap => {
                let mut r =
                    pcap_file::pcap::PcapReader::new(fs::File::open(&path).unwrap()).unwrap();
                let mut v = Vec::new();
                // Raw: pcap-file's checked reader rejects orig_len > snaplen.
                while let Some(p) = r.next_raw_packet() {
                    let p = p.unwrap();
                    v.push((p.data.into_owned(), p.orig_len));
                }
                v
            }
        };
        assert_eq!(got.len(), sent.len(), "{format:?}");
        for (seq, ((data, orig), p)) in got.iter().zip(&sent).enumerate() {
            let cut = p.len().min(snaplen as usize);
            assert_eq!(data[..], p[..cut], "{format:?} packet {seq}");
            assert_eq!(*orig as usize, p.len(), "{format:?} packet {seq}");
        }
        if let Some(c) = wireshark_count(&path) {
            assert_eq!(c, 40, "{format:?}");
        }
    }
}

#[test]
fn classic_pcap_mixes_hops_with_nanosecond_timestamps() {
    let dir = TempDir::new("pcap");
    let path = dir.join("x.pcap");
    let mut w = CaptureWriter::create_with(
        &path,
        CaptureFormat::Pcap,
        RotationPolicy::none(),
        100,
        hops2(),
        opts(),
    )
    .unwrap();
    w.write(0, Direction::Inbound, T0 + 1, 0, &pkt(0, 60))
        .unwrap();
    w.write(1, Direction::Outbound, T0 + 2, 0, &pkt(1, 60))
        .unwrap();
    w.write(
        0,
        Direction::Outbound,
        T0 + SEC + 999_999_999,
        1500,
        &pkt(2, 300),
    )
    .unwrap();
    w.add_lost(0, 4).unwrap();
    let stats = w.finish().unwrap();
    assert_eq!(
        (stats.packets_written, stats.packets_truncated, stats.lost),
        (3, 1, 4)
    );

    let bytes = fs::read(&path).unwrap();
    assert_eq!(
        u32n(&bytes),
        0xa1b2_3c4d,
        "nanosecond magic in native byte order"
    );
    assert_eq!((u16n(&bytes[4..]), u16n(&bytes[6..])), (2, 4));
    assert_eq!(u32n(&bytes[16..]), 100, "snaplen");
    assert_eq!(u32n(&bytes[20..]), 1, "LINKTYPE_ETHERNET");
    assert_eq!(stats.bytes_written, bytes.len() as u64);
    assert_eq!(bytes.len(), 24 + 3 * 16 + 60 + 60 + 100);

    // Raw packets: pcap-file's checked reader wrongly rejects orig_len > snaplen.
    let mut r = pcap_file::pcap::PcapReader::new(fs::File::open(&path).unwrap()).unwrap();
    assert_eq!(
        r.header().ts_resolution,
        pcap_file::TsResolution::NanoSecond
    );
    let mut got = Vec::new();
    while let Some(p) = r.next_raw_packet() {
        let p = p.unwrap();
        let ts = u64::from(p.ts_sec) * SEC + u64::from(p.ts_frac);
        got.push((ts, p.orig_len, p.data.len(), seq_of(&p.data)));
    }
    assert_eq!(
        got,
        vec![
            (T0 + 1, 60, 60, 0),
            (T0 + 2, 60, 60, 1),
            (T0 + SEC + 999_999_999, 1500, 100, 2)
        ]
    );
    if let Some(out) = run_tool(
        "tcpdump",
        &["-nn", "-tt", "--nano", "-r", path.to_str().unwrap()],
    ) {
        let stamps: Vec<&str> = out.lines().map(|l| l.split(' ').next().unwrap()).collect();
        assert_eq!(
            stamps,
            [
                "1700000000.000000001",
                "1700000000.000000002",
                "1700000001.999999999"
            ]
        );
    }
    if let Some(rows) = tshark_fields(
        &path,
        &["frame.len", "frame.cap_len", "frame.interface_name"],
    ) {
        assert_eq!(
            rows,
            [["60", "60", ""], ["60", "60", ""], ["1500", "100", ""]]
        );
    }
}

/// Header bytes (`stats` right after creation) and the size of one `len`-byte packet record.
fn measure(format: CaptureFormat, hops: usize, len: usize) -> (u64, u64) {
    let dir = TempDir::new("measure");
    let hops = hops2().into_iter().cycle().take(hops).collect();
    let mut w = CaptureWriter::create_with(
        dir.join("m"),
        format,
        RotationPolicy::none(),
        0,
        hops,
        opts(),
    )
    .unwrap();
    let header = w.stats().bytes_written;
    w.write(0, Direction::Inbound, T0, 0, &pkt(0, len)).unwrap();
    let rec = w.stats().bytes_written - header;
    (header, rec)
}

#[test]
fn size_rotation_fills_each_file_up_to_the_limit() {
    let dir = TempDir::new("size");
    let path = dir.join("x.pcapng");
    let limit = 3000;
    let (header, rec) = measure(CaptureFormat::PcapNg, 2, 200);
    let trailer = 2 * ISB_FIXED_LEN;
    let reserve =
        trailer + 2 * cut_comment_reserve() + option_len(lost_comment(u64::MAX).len()) as u64;
    let per_file = (limit - header - reserve) / rec;
    assert!(per_file >= 2, "test sizes: {header} {rec} {reserve}");

    let policy = RotationPolicy::none().with_max_file_bytes(limit);
    let mut w =
        CaptureWriter::create_with(&path, CaptureFormat::PcapNg, policy, 0, hops2(), opts())
            .unwrap();
    let n = 40u32;
    for i in 0..n {
        w.write(
            (i % 2) as usize,
            Direction::Inbound,
            T0 + u64::from(i),
            0,
            &pkt(i, 200),
        )
        .unwrap();
    }
    let files = w.files().to_vec();
    let stats = w.finish().unwrap();
    let nfiles = (u64::from(n)).div_ceil(per_file) as usize;
    let mut want_names = vec!["x.pcapng".to_string()];
    want_names.extend((1..nfiles).map(|i| format!("x.pcapng{i}")));
    assert_eq!(dir.names(), {
        let mut s = want_names.clone();
        s.sort();
        s
    });
    assert_eq!(
        files,
        want_names.iter().map(|s| dir.join(s)).collect::<Vec<_>>()
    );
    assert_eq!(stats.files_written, nfiles as u64);
    assert_eq!(stats.packets_written, u64::from(n));

    let mut all = Vec::new();
    let mut total = 0;
    for (i, p) in files.iter().enumerate() {
        let size = fs::metadata(p).unwrap().len();
        total += size;
        assert!(size <= limit, "{} is {size} bytes", p.display());
        let f = read_ng(p);
        // Every file stands alone: its own section and both interfaces.
        assert_eq!(f.shbs, 1);
        assert_eq!(f.idbs.len(), 2);
        assert_eq!(f.isbs.len(), 2);
        if i + 1 < files.len() {
            assert_eq!(f.epbs.len() as u64, per_file, "{}", p.display());
            assert_eq!(size, header + per_file * rec + trailer);
        }
        all.extend(f.epbs.iter().map(|e| seq_of(&e.data)));
        // tshark is slow to start: full field checks on the first and last files only.
        let tshark = if i == 0 || i + 1 == files.len() {
            tshark_fields(p, &["frame.interface_name"])
        } else {
            wireshark_count(p).map(|c| vec![vec!["node-a/veth1a2b3c4d".to_string()]; c])
        };
        if let Some(rows) = tshark {
            assert_eq!(rows.len(), f.epbs.len());
            assert!(rows
                .iter()
                .all(|r| r[0] == "node-a/veth1a2b3c4d" || r[0] == "node-b/eth0"));
        }
    }
    assert_eq!(all, (0..n).collect::<Vec<_>>());
    assert_eq!(stats.bytes_written, total);
    // A size rotation ends one file and starts the next at the packet that did not fit.
    for pair in files.windows(2) {
        let (a, b) = (read_ng(&pair[0]), read_ng(&pair[1]));
        let first_ts = b.epbs[0].ts;
        assert_eq!(a.isbs[0].end, Some(first_ts));
        assert_eq!(b.isbs[0].start, Some(first_ts));
    }
    assert_eq!(read_ng(&files[0]).isbs[0].start, Some(T0));
}

#[test]
fn size_rotation_in_megabytes_with_a_ring() {
    let dir = TempDir::new("mb");
    let path = dir.join("big.pcap");
    let policy = RotationPolicy::from_flags(Some(1), None, Some(2)).unwrap();
    let mut w =
        CaptureWriter::create_with(&path, CaptureFormat::Pcap, policy, 0, hops2(), opts()).unwrap();
    // 1,400-byte frames: 1,416 bytes per record, 706 per 1 MB file; 1,800 make 3 files.
    let n = 1800u32;
    for i in 0..n {
        w.write(
            0,
            Direction::Inbound,
            T0 + u64::from(i) * 1000,
            0,
            &pkt(i, 1400),
        )
        .unwrap();
    }
    let stats = w.finish().unwrap();
    assert_eq!((stats.files_written, stats.files_deleted), (3, 1));
    // Ring of 2: big.pcap0, big.pcap1, then big.pcap0 again.
    assert_eq!(dir.names(), ["big.pcap0", "big.pcap1"]);
    let per_file = (1_000_000 - 24) / 1416;
    let read = |name: &str| {
        let mut r =
            pcap_file::pcap::PcapReader::new(fs::File::open(dir.join(name)).unwrap()).unwrap();
        let mut v = Vec::new();
        while let Some(p) = r.next_raw_packet() {
            v.push(seq_of(&p.unwrap().data));
        }
        v
    };
    let second = read("big.pcap1");
    let third = read("big.pcap0");
    assert_eq!(second, (per_file..2 * per_file).collect::<Vec<u32>>());
    assert_eq!(third, (2 * per_file..n).collect::<Vec<u32>>());
    let disk: u64 = ["big.pcap0", "big.pcap1"]
        .iter()
        .map(|n| fs::metadata(dir.join(n)).unwrap().len())
        .sum();
    assert!(fs::metadata(dir.join("big.pcap1")).unwrap().len() <= 1_000_000);
    assert!(disk <= policy.disk_bound().unwrap());
    for name in ["big.pcap0", "big.pcap1"] {
        if let Some(c) = wireshark_count(&dir.join(name)) {
            assert_eq!(c, read(name).len());
        }
    }
}

#[test]
fn ring_keeps_the_newest_files() {
    let dir = TempDir::new("ring");
    let path = dir.join("r.pcapng");
    let limit = 1500;
    let policy = RotationPolicy::none()
        .with_max_file_bytes(limit)
        .with_max_files(3);
    let mut w = CaptureWriter::create_with(
        &path,
        CaptureFormat::PcapNg,
        policy,
        0,
        hops2()[..1].to_vec(),
        opts(),
    )
    .unwrap();
    let n = 100u32;
    for i in 0..n {
        w.write(0, Direction::Outbound, T0 + u64::from(i), 0, &pkt(i, 150))
            .unwrap();
        assert!(w.files().len() <= 3);
    }
    let files = w.files().to_vec();
    let stats = w.finish().unwrap();
    assert_eq!(dir.names(), ["r.pcapng0", "r.pcapng1", "r.pcapng2"]);
    assert_eq!(stats.files_deleted, stats.files_written - 3);
    assert!(stats.files_written > 10);
    // files() lists them oldest first; together they hold the newest packets, in order.
    let all: Vec<u32> = files.iter().flat_map(|p| seqs(p)).collect();
    assert_eq!(*all.last().unwrap(), n - 1);
    assert_eq!(all, (n - all.len() as u32..n).collect::<Vec<_>>());
    let disk: u64 = files.iter().map(|p| fs::metadata(p).unwrap().len()).sum();
    assert!(disk <= 3 * limit, "{disk}");
    for p in &files {
        if let Some(c) = wireshark_count(p) {
            assert_eq!(c, seqs(p).len());
        }
    }
}

#[test]
fn time_rotation_follows_packet_timestamps_and_names_files_by_time() {
    let dir = TempDir::new("time");
    let pattern = dir.join("cap-%Y%m%d-%H%M%S.pcapng");
    let policy = RotationPolicy::from_flags(None, Some(Duration::from_secs(60)), None).unwrap();
    let mut w =
        CaptureWriter::create_with(&pattern, CaptureFormat::PcapNg, policy, 0, hops2(), opts())
            .unwrap();
    assert_eq!(
        w.current_file().unwrap(),
        dir.join("cap-20231114-221320.pcapng")
    );
    w.write(0, Direction::Inbound, T0 + SEC, 0, &pkt(0, 60))
        .unwrap();
    w.write(1, Direction::Inbound, T0 + 60 * SEC - 1, 0, &pkt(1, 60))
        .unwrap();
    w.write(0, Direction::Inbound, T0 + 60 * SEC, 0, &pkt(2, 60))
        .unwrap();
    w.write(0, Direction::Inbound, T0 + 200 * SEC, 0, &pkt(3, 60))
        .unwrap();
    w.write(1, Direction::Inbound, T0 + 201 * SEC, 0, &pkt(4, 60))
        .unwrap();
    let stats = w.finish().unwrap();
    assert_eq!(stats.files_written, 3);
    assert_eq!(
        dir.names(),
        [
            "cap-20231114-221320.pcapng",
            "cap-20231114-221420.pcapng",
            "cap-20231114-221640.pcapng"
        ]
    );
    let expect = [
        ("cap-20231114-221320.pcapng", vec![0, 1], T0, T0 + 60 * SEC),
        (
            "cap-20231114-221420.pcapng",
            vec![2],
            T0 + 60 * SEC,
            T0 + 200 * SEC,
        ),
        (
            "cap-20231114-221640.pcapng",
            vec![3, 4],
            T0 + 200 * SEC,
            T0 + 201 * SEC,
        ),
    ];
    for (name, want, start, end) in expect {
        let f = read_ng(&dir.join(name));
        assert_eq!(
            f.epbs.iter().map(|e| seq_of(&e.data)).collect::<Vec<_>>(),
            want,
            "{name}"
        );
        for isb in &f.isbs {
            assert_eq!(
                (isb.start, isb.end, isb.ts),
                (Some(start), Some(end), end),
                "{name}"
            );
        }
        if let Some(c) = wireshark_count(&dir.join(name)) {
            assert_eq!(c, want.len());
        }
    }
}

#[test]
fn time_ring_keeps_the_newest_intervals() {
    let dir = TempDir::new("timering");
    let policy = RotationPolicy::from_flags(None, Some(Duration::from_secs(10)), Some(2)).unwrap();
    let mut w = CaptureWriter::create_with(
        dir.join("t-%s.pcap"),
        CaptureFormat::Pcap,
        policy,
        0,
        hops2(),
        opts(),
    )
    .unwrap();
    for i in 0..5u32 {
        w.write(
            0,
            Direction::Inbound,
            T0 + u64::from(i) * 10 * SEC + 5,
            0,
            &pkt(i, 60),
        )
        .unwrap();
    }
    let stats = w.finish().unwrap();
    assert_eq!((stats.files_written, stats.files_deleted), (5, 3));
    assert_eq!(dir.names(), ["t-1700000030.pcap", "t-1700000040.pcap"]);
}

#[test]
fn size_or_time_whichever_comes_first() {
    let dir = TempDir::new("both");
    let (header, rec) = measure(CaptureFormat::Pcap, 1, 100);
    // Room for exactly 3 packets per file.
    let limit = header + 3 * rec;
    let policy = RotationPolicy::none()
        .with_max_file_bytes(limit)
        .with_interval(Duration::from_secs(60))
        .with_max_files(4);
    let mut w = CaptureWriter::create_with(
        dir.join("c-%H%M."),
        CaptureFormat::Pcap,
        policy,
        0,
        hops2(),
        opts(),
    )
    .unwrap();
    // Minute 22:13 (from T0): 7 packets -> 3 + 3 + 1 by size.
    for i in 0..7u32 {
        w.write(
            0,
            Direction::Inbound,
            T0 + u64::from(i) * SEC,
            0,
            &pkt(i, 100),
        )
        .unwrap();
    }
    // 60 s later: a new interval although the file has room.
    w.write(0, Direction::Inbound, T0 + 60 * SEC, 0, &pkt(7, 100))
        .unwrap();
    w.write(0, Direction::Inbound, T0 + 61 * SEC, 0, &pkt(8, 100))
        .unwrap();
    let stats = w.finish().unwrap();
    assert_eq!((stats.files_written, stats.files_deleted), (4, 0));
    let read = |name: &str| {
        let mut r =
            pcap_file::pcap::PcapReader::new(fs::File::open(dir.join(name)).unwrap()).unwrap();
        let mut v = Vec::new();
        while let Some(p) = r.next_raw_packet() {
            v.push(seq_of(&p.unwrap().data));
        }
        v
    };
    assert_eq!(
        dir.names(),
        ["c-2213.0", "c-2213.1", "c-2213.2", "c-2214.0"]
    );
    assert_eq!(read("c-2213.0"), [0, 1, 2]);
    assert_eq!(read("c-2213.1"), [3, 4, 5]);
    assert_eq!(read("c-2213.2"), [6]);
    assert_eq!(read("c-2214.0"), [7, 8]);
    for n in dir.names() {
        assert!(fs::metadata(dir.join(&n)).unwrap().len() <= limit);
    }
}

#[test]
fn tick_completes_idle_files_on_time_without_piling_up_empty_ones() {
    for pattern in ["idle.pcapng", "idle-%H%M%S.pcapng"] {
        let dir = TempDir::new("tick");
        let policy = RotationPolicy::none().with_interval(Duration::from_secs(60));
        let mut w = CaptureWriter::create_with(
            dir.join(pattern),
            CaptureFormat::PcapNg,
            policy,
            0,
            hops2(),
            opts(),
        )
        .unwrap();
        let first = w.current_file().unwrap().to_path_buf();
        w.write(0, Direction::Inbound, T0 + SEC, 0, &pkt(0, 60))
            .unwrap();
        w.tick(T0 + 59 * SEC).unwrap();
        assert_eq!(w.files(), std::slice::from_ref(&first));
        w.tick(T0 + 61 * SEC).unwrap();
        // The first file is complete and readable while the capture goes on.
        assert_eq!(w.files().len(), 2, "{pattern}");
        let f = read_ng(&first);
        assert_eq!((f.epbs.len(), f.isbs.len()), (1, 2));
        assert_eq!(f.isbs[0].end, Some(T0 + 61 * SEC));
        if let Some(c) = wireshark_count(&first) {
            assert_eq!(c, 1);
        }
        // Idle intervals do not leave empty files behind.
        for k in 2..6 {
            w.tick(T0 + k * 61 * SEC).unwrap();
            assert_eq!(w.files().len(), 2, "{pattern}");
            assert_eq!(dir.names().len(), 2, "{pattern}");
        }
        let stats = w.finish().unwrap();
        assert_eq!(stats.files_written, 1);
        assert_eq!(dir.names(), [first.file_name().unwrap().to_string_lossy()]);
    }
}

#[test]
fn an_idle_file_with_losses_is_kept() {
    let dir = TempDir::new("idlelost");
    let policy = RotationPolicy::none().with_interval(Duration::from_secs(60));
    let mut w = CaptureWriter::create_with(
        dir.join("l"),
        CaptureFormat::PcapNg,
        policy,
        0,
        hops2(),
        opts(),
    )
    .unwrap();
    w.write(0, Direction::Inbound, T0 + SEC, 0, &pkt(0, 60))
        .unwrap();
    w.tick(T0 + 61 * SEC).unwrap();
    w.add_lost(1, 7).unwrap();
    w.tick(T0 + 122 * SEC).unwrap();
    assert_eq!(dir.names(), ["l", "l1", "l2"]);
    let stats = w.finish().unwrap();
    assert_eq!(dir.names(), ["l", "l1"], "the blank last file is deleted");
    assert_eq!(stats.files_written, 2);
    let f = read_ng(&dir.join("l1"));
    assert_eq!(f.epbs.len(), 0);
    assert_eq!(
        f.isbs.iter().map(|i| i.ifdrop).collect::<Vec<_>>(),
        [Some(0), Some(7)]
    );
}

#[test]
fn the_only_file_is_kept_even_without_packets() {
    let dir = TempDir::new("empty");
    for format in [CaptureFormat::PcapNg, CaptureFormat::Pcap] {
        let path = dir.join(&format!("e.{format}"));
        let w =
            CaptureWriter::create_with(&path, format, RotationPolicy::none(), 0, hops2(), opts())
                .unwrap();
        let stats = w.finish().unwrap();
        assert_eq!((stats.files_written, stats.packets_written), (1, 0));
        assert_eq!(stats.bytes_written, fs::metadata(&path).unwrap().len());
        if format == CaptureFormat::PcapNg {
            let f = read_ng(&path);
            assert_eq!((f.idbs.len(), f.epbs.len(), f.isbs.len()), (2, 0, 2));
            assert_eq!(f.idbs[0].snaplen, DEFAULT_SNAPLEN);
        }
        if let Some(c) = wireshark_count(&path) {
            assert_eq!(c, 0);
        }
    }
}

#[test]
fn refuses_symbolic_links() {
    let dir = TempDir::new("symlink");
    let target = dir.join("precious");
    fs::write(&target, b"do not touch").unwrap();
    let link = dir.join("cap.pcapng");
    symlink(&target, &link).unwrap();
    let err = CaptureWriter::create(
        &link,
        CaptureFormat::PcapNg,
        RotationPolicy::none(),
        0,
        hops2(),
    )
    .unwrap_err();
    assert!(
        matches!(&err, CaptureError::Symlink { path } if path == &link),
        "{err:?}"
    );
    assert!(err.to_string().contains("symbolic link"), "{err}");
    assert!(err.to_string().contains(link.to_str().unwrap()), "{err}");
    assert_eq!(fs::read(&target).unwrap(), b"do not touch");

    // A dangling link: the target must not be created.
    let dangling = dir.join("dangling.pcap");
    symlink(dir.join("nowhere"), &dangling).unwrap();
    let err = CaptureWriter::create(
        &dangling,
        CaptureFormat::Pcap,
        RotationPolicy::none(),
        0,
        vec![],
    )
    .unwrap_err();
    assert!(matches!(err, CaptureError::Symlink { .. }), "{err:?}");
    assert!(!dir.join("nowhere").exists());

    // A link at the name of a later file stops the capture at rotation; earlier files stay.
    let path = dir.join("rot.pcapng");
    symlink(&target, dir.join("rot.pcapng1")).unwrap();
    let policy = RotationPolicy::none().with_max_file_bytes(1200);
    let mut w =
        CaptureWriter::create_with(&path, CaptureFormat::PcapNg, policy, 0, hops2(), opts())
            .unwrap();
    let mut written = 0;
    let err = loop {
        match w.write(
            0,
            Direction::Inbound,
            T0 + written,
            0,
            &pkt(written as u32, 100),
        ) {
            Ok(()) => written += 1,
            Err(e) => break e,
        }
    };
    assert!(
        matches!(&err, CaptureError::Symlink { path } if path.ends_with("rot.pcapng1")),
        "{err:?}"
    );
    assert!(matches!(
        w.write(0, Direction::Inbound, T0, 0, &pkt(0, 100)),
        Err(CaptureError::Stopped { .. })
    ));
    assert!(matches!(w.finish(), Err(CaptureError::Stopped { .. })));
    assert_eq!(fs::read(&target).unwrap(), b"do not touch");
    assert_eq!(seqs(&path), (0..written as u32).collect::<Vec<_>>());
    assert_eq!(
        read_ng(&path).isbs.len(),
        2,
        "the rotated file was completed"
    );
}

#[test]
fn replaces_an_earlier_regular_file_and_refuses_other_types() {
    let dir = TempDir::new("replace");
    let path = dir.join("old.pcapng");
    fs::write(&path, b"an earlier capture").unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    let other_link = dir.join("hardlink");
    fs::hard_link(&path, &other_link).unwrap();
    let old_inode = fs::metadata(&path).unwrap().ino();

    let mut w = CaptureWriter::create(
        &path,
        CaptureFormat::PcapNg,
        RotationPolicy::none(),
        0,
        hops2(),
    )
    .unwrap();
    w.write(0, Direction::Inbound, T0, 0, &pkt(0, 60)).unwrap();
    w.finish().unwrap();
    let meta = fs::metadata(&path).unwrap();
    assert_ne!(
        meta.ino(),
        old_inode,
        "a new file, not the old one rewritten"
    );
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(fs::read(&other_link).unwrap(), b"an earlier capture");
    assert_eq!(seqs(&path), [0]);

    let sub = dir.join("adir");
    fs::create_dir(&sub).unwrap();
    let err = CaptureWriter::create(
        &sub,
        CaptureFormat::PcapNg,
        RotationPolicy::none(),
        0,
        vec![],
    )
    .unwrap_err();
    assert!(matches!(err, CaptureError::NotAFile { .. }), "{err:?}");
    let err = CaptureWriter::create(
        dir.join("missing/x"),
        CaptureFormat::PcapNg,
        RotationPolicy::none(),
        0,
        vec![],
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            CaptureError::Io {
                action: "create",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("missing/x"), "{err}");
}

#[test]
fn hops_added_later_are_described_before_use() {
    let dir = TempDir::new("addhop");
    let path = dir.join("h.pcapng");
    let policy = RotationPolicy::none().with_max_file_bytes(2500);
    let mut w = CaptureWriter::create_with(
        &path,
        CaptureFormat::PcapNg,
        policy,
        0,
        hops2()[..1].to_vec(),
        opts(),
    )
    .unwrap();
    w.write(0, Direction::Inbound, T0, 0, &pkt(0, 100)).unwrap();
    assert!(matches!(
        w.write(1, Direction::Inbound, T0, 0, &pkt(1, 100)),
        Err(CaptureError::UnknownHop { index: 1, hops: 1 })
    ));
    let idx = w.add_hop(hops2()[1].clone()).unwrap();
    assert_eq!(idx, 1);
    w.write(1, Direction::Outbound, T0 + 1, 0, &pkt(1, 100))
        .unwrap();
    let mut i = 2;
    while w.files().len() < 2 {
        w.write(
            (i % 2) as usize,
            Direction::Inbound,
            T0 + u64::from(i),
            0,
            &pkt(i, 100),
        )
        .unwrap();
        i += 1;
    }
    // Add a third hop when its interface block no longer fits in the second file (small
    // packets still would): it goes into a new file.
    let third = HopDesc::new("pod-c2", "eth0");
    let mut idb = Vec::new();
    encode_idb(&mut idb, &third, w.snaplen, &w.opts);
    let fits = |w: &CaptureWriter| {
        w.current.as_ref().unwrap().len()
            + idb.len() as u64
            + w.trailer_reserve()
            + ISB_FIXED_LEN
            + cut_comment_reserve()
            <= 2500
    };
    while fits(&w) {
        w.write(0, Direction::Inbound, T0 + u64::from(i), 0, &pkt(i, 60))
            .unwrap();
        i += 1;
    }
    let before = w.files().len();
    assert_eq!(before, 2);
    w.add_hop(third).unwrap();
    assert_eq!(
        w.files().len(),
        before + 1,
        "adding the interface rotated the file"
    );
    w.write(2, Direction::Inbound, T0 + u64::from(i), 0, &pkt(i, 100))
        .unwrap();
    let files = w.files().to_vec();
    w.finish().unwrap();

    let f0 = read_ng(&files[0]);
    assert_eq!(f0.idbs.len(), 2, "the second IDB was added mid-file");
    assert_eq!(f0.isbs.len(), 2);
    let f1 = read_ng(&files[1]);
    assert_eq!(f1.idbs.len(), 2);
    assert_eq!(
        f1.isbs.len(),
        2,
        "no statistics for an interface this file does not describe"
    );
    let f2 = read_ng(&files[2]);
    assert_eq!(
        f2.idbs
            .iter()
            .map(|i| i.name.clone().unwrap())
            .collect::<Vec<_>>(),
        ["node-a/veth1a2b3c4d", "node-b/eth0", "pod-c2/eth0"]
    );
    assert_eq!(f2.epbs.last().unwrap().iface, 2);
    for p in &files {
        if let Some(v) = tshark_blocks(p, &["pcapng.no_interfaces"]) {
            assert_eq!(v, [""], "{}", p.display());
        }
    }
    if let Some(rows) = tshark_fields(&files[2], &["frame.interface_name"]) {
        assert_eq!(rows.last().unwrap()[0], "pod-c2/eth0");
    }
}

#[test]
fn bad_input_is_rejected_without_stopping_the_writer() {
    let dir = TempDir::new("badinput");
    let path = dir.join("b.pcap");
    let mut w = CaptureWriter::create_with(
        &path,
        CaptureFormat::Pcap,
        RotationPolicy::none(),
        0,
        hops2(),
        opts(),
    )
    .unwrap();
    assert!(matches!(
        w.add_lost(9, 1),
        Err(CaptureError::UnknownHop { index: 9, hops: 2 })
    ));
    // Classic pcap stores seconds in 32 bits.
    let late = (u64::from(u32::MAX) + 1) * SEC;
    let err = w
        .write(0, Direction::Inbound, late, 0, &pkt(0, 60))
        .unwrap_err();
    assert!(matches!(err, CaptureError::Encode { .. }), "{err:?}");
    w.write(0, Direction::Inbound, T0, 0, &pkt(1, 60)).unwrap();
    let stats = w.finish().unwrap();
    assert_eq!(stats.packets_written, 1);
    assert_eq!(stats.lost, 0);
}

#[test]
fn invalid_configuration_is_rejected_before_creating_files() {
    let dir = TempDir::new("config");
    let w_only = RotationPolicy::none().with_max_files(3);
    let err =
        CaptureWriter::create(dir.join("a"), CaptureFormat::PcapNg, w_only, 0, vec![]).unwrap_err();
    assert!(matches!(err, CaptureError::InvalidConfig(_)), "{err:?}");
    let g = RotationPolicy::none().with_interval(Duration::from_secs(1));
    let err =
        CaptureWriter::create(dir.join("a-%Q"), CaptureFormat::PcapNg, g, 0, vec![]).unwrap_err();
    assert!(err.to_string().contains("%Q"), "{err}");
    let zero = RotationPolicy::none().with_max_file_bytes(0);
    assert!(CaptureWriter::create(dir.join("a"), CaptureFormat::PcapNg, zero, 0, vec![]).is_err());
    assert!(dir.names().is_empty());
}

#[test]
fn dropping_the_writer_completes_the_file() {
    let dir = TempDir::new("drop");
    let path = dir.join("d.pcapng");
    {
        let mut w = CaptureWriter::create_with(
            &path,
            CaptureFormat::PcapNg,
            RotationPolicy::none(),
            0,
            hops2(),
            opts(),
        )
        .unwrap();
        w.write(1, Direction::Inbound, T0 + 5, 0, &pkt(0, 60))
            .unwrap();
        w.add_lost(0, 2).unwrap();
    }
    let f = read_ng(&path);
    assert_eq!(f.epbs.len(), 1);
    assert_eq!(
        f.isbs.iter().map(|i| i.ifdrop).collect::<Vec<_>>(),
        [Some(2), Some(0)]
    );
}

#[test]
fn flush_makes_packets_visible_while_writing() {
    let dir = TempDir::new("flush");
    let path = dir.join("f.pcapng");
    let mut w = CaptureWriter::create_with(
        &path,
        CaptureFormat::PcapNg,
        RotationPolicy::none(),
        0,
        hops2(),
        opts(),
    )
    .unwrap();
    w.write(0, Direction::Inbound, T0, 0, &pkt(0, 60)).unwrap();
    assert_eq!(seqs(&path), Vec::<u32>::new(), "buffered");
    w.flush().unwrap();
    assert_eq!(seqs(&path), [0]);
    if let Some(c) = wireshark_count(&path) {
        assert_eq!(c, 1);
    }
    w.finish().unwrap();
}

// ---------------------------------------------------------------------------------------
// Disk full, on a tiny tmpfs. Needs root (mount); skipped with a message otherwise.

/// A tmpfs mounted on a fresh directory, unmounted and removed on drop (panics included).
struct TmpfsMount {
    dir: TempDir,
}

impl TmpfsMount {
    fn new(size: &str) -> Result<Self, String> {
        use nix::mount::{mount, MsFlags};
        let dir = TempDir::new("tmpfs");
        mount(
            Some("tmpfs"),
            &dir.0,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some(format!("size={size},mode=0700").as_str()),
        )
        .map_err(|e| format!("mount tmpfs on {}: {e}", dir.0.display()))?;
        Ok(TmpfsMount { dir })
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        use nix::mount::{umount2, MntFlags};
        if umount2(&self.dir.0, MntFlags::empty()).is_err() {
            let _ = umount2(&self.dir.0, MntFlags::MNT_DETACH);
        }
        // TempDir's own Drop removes the (now empty) mount point.
    }
}

fn tmpfs(test: &str) -> TmpfsMount {
    assert!(
        nix::unistd::geteuid().is_root(),
        "{test} mounts a 200 KiB tmpfs: run it as root (cargo xtask test)"
    );
    TmpfsMount::new("200k").unwrap_or_else(|e| panic!("{test}: mounting a tmpfs: {e}"))
}

#[test]
fn disk_full_names_the_file_and_keeps_earlier_files_intact() {
    let mnt = tmpfs("disk_full_names_the_file_and_keeps_earlier_files_intact");
    let files = fill_until_full(&mnt, |_| 1000);

    // With no room at all, not even a header fits: the new file is removed.
    let filler = mnt.dir.join("filler");
    {
        use std::io::Write as _;
        let mut f = fs::File::create(&filler).unwrap();
        let chunk = [0u8; 4096];
        while f.write_all(&chunk).is_ok() {}
    }
    let path2 = mnt.dir.join("nospace.pcap");
    let err = CaptureWriter::create(
        &path2,
        CaptureFormat::Pcap,
        RotationPolicy::none(),
        0,
        hops2(),
    )
    .unwrap_err();
    assert!(
        matches!(&err, CaptureError::DiskFull { file_kept: false, path, .. } if path == &path2),
        "{err:?}"
    );
    assert!(err.to_string().contains("removed"), "{err}");
    assert!(!path2.exists());
    for p in &files {
        let _ = read_ng(p);
    }
}

#[test]
fn disk_full_while_writing_large_packets_through() {
    // Packets of at least WRITE_THROUGH_BYTES skip the buffer: the write that fails is one of
    // them, and the file is still cut back to whole records.
    let mnt = tmpfs("disk_full_while_writing_large_packets_through");
    fill_until_full(&mnt, |seq| match seq % 3 {
        0 => 1000,
        _ => WRITE_THROUGH_BYTES + 1000 * seq as usize % 7000,
    });
    let mnt = tmpfs("disk_full_while_writing_large_packets_through");
    fill_until_full(&mnt, |_| WRITE_THROUGH_BYTES);
}

/// Writes packets of `len_of(seq)` bytes into files of at most 60 000 bytes on `mnt` until
/// the disk is full, then checks what a full disk leaves: the error names the failing file,
/// earlier files are complete, the failing one is cut back to whole packets, and together
/// they hold exactly the packets counted as written, in order. Returns the files.
fn fill_until_full(mnt: &TmpfsMount, len_of: impl Fn(u32) -> usize) -> Vec<PathBuf> {
    let path = mnt.dir.join("full.pcapng");
    let policy = RotationPolicy::none().with_max_file_bytes(60_000);
    let mut w =
        CaptureWriter::create_with(&path, CaptureFormat::PcapNg, policy, 0, hops2(), opts())
            .unwrap();
    let mut sent = 0u32;
    let err = loop {
        match w.write(
            (sent % 2) as usize,
            Direction::Inbound,
            T0 + u64::from(sent),
            0,
            &pkt(sent, len_of(sent)),
        ) {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
        assert!(sent < 1000, "the 200 KiB tmpfs never filled up");
    };
    let files = w.files().to_vec();
    let stats = w.stats();
    assert!(err.is_disk_full(), "{err:?}");
    let msg = err.to_string();
    let failing = match &err {
        CaptureError::DiskFull {
            path,
            file_kept: true,
            ..
        } => path.clone(),
        other => panic!("{other:?}"),
    };
    assert!(
        msg.contains("disk full") && msg.contains(failing.to_str().unwrap()),
        "{msg}"
    );
    assert_eq!(failing, *files.last().unwrap());
    assert!(
        files.len() >= 3,
        "rotated files before the disk filled: {files:?}"
    );

    // Earlier files are complete (trailers included); the failing one is cut back to whole
    // packets and readable; together they hold exactly the packets counted as written.
    let mut all = Vec::new();
    for p in &files {
        let f = read_ng(p);
        if p != &failing {
            assert_eq!(f.isbs.len(), 2, "{} is complete", p.display());
        }
        if let Some(c) = wireshark_count(p) {
            assert_eq!(c, f.epbs.len(), "{}", p.display());
        }
        all.extend(f.epbs.iter().map(|e| seq_of(&e.data)));
    }
    assert_eq!(all, (0..stats.packets_written as u32).collect::<Vec<_>>());
    assert!(stats.packets_written <= u64::from(sent));
    assert_eq!(
        stats.bytes_written,
        files
            .iter()
            .map(|p| fs::metadata(p).unwrap().len())
            .sum::<u64>()
    );

    // The writer has stopped.
    let again = w
        .write(0, Direction::Inbound, T0, 0, &pkt(0, 100))
        .unwrap_err();
    assert!(
        matches!(&again, CaptureError::Stopped { first_error } if first_error.contains("disk full")),
        "{again:?}"
    );
    drop(w);
    files
}

#[test]
fn writer_and_errors_can_move_between_threads() {
    fn send<T: Send>() {}
    fn sync<T: Send + Sync + std::error::Error>() {}
    send::<CaptureWriter>();
    sync::<CaptureError>();
}

// ---------------------------------------------------------------------------------------
// Property tests of the rotation ring (-C, -G, -W together or apart): whatever the packet
// sizes, timestamps and idle gaps, never more than W files, no file above C unless one
// packet alone is, names in the ring's order and contents in time order.

mod ring_props {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Step {
        Packet { len: usize, dt_ms: u64 },
        Tick { dt_ms: u64 },
    }

    fn steps() -> impl Strategy<Value = Vec<Step>> {
        prop::collection::vec(
            prop_oneof![
                4 => (46usize..1600, 0u64..2500).prop_map(|(len, dt_ms)| Step::Packet { len, dt_ms }),
                1 => (0u64..6000).prop_map(|dt_ms| Step::Tick { dt_ms }),
            ],
            1..50,
        )
    }

    /// The packets (their sequence numbers) of a complete file.
    fn seqs_any(path: &Path, format: CaptureFormat) -> Vec<u32> {
        match format {
            CaptureFormat::PcapNg => seqs(path),
            CaptureFormat::Pcap => {
                let mut r =
                    pcap_file::pcap::PcapReader::new(fs::File::open(path).unwrap()).unwrap();
                let mut v = Vec::new();
                while let Some(p) = r.next_raw_packet() {
                    v.push(seq_of(&p.unwrap().data));
                }
                v
            }
        }
    }

    /// The ring index a numbered name ends with (`cap.pcap3` → 3), `None` without a suffix.
    fn ring_index(path: &Path) -> Option<u32> {
        let name = path.file_name().unwrap().to_str().unwrap();
        let digits: String = name
            .chars()
            .rev()
            .take_while(char::is_ascii_digit)
            .collect();
        let digits: String = digits.chars().rev().collect();
        name.strip_suffix(digits.as_str())
            .filter(|stem| stem.ends_with(".pcap"))
            .and_then(|_| digits.parse().ok())
    }

    fn check_files(
        files: &[PathBuf],
        format: CaptureFormat,
        c: Option<u64>,
        w: u32,
        time_names: bool,
        closed: usize,
    ) -> Result<Vec<u32>, TestCaseError> {
        prop_assert!(
            files.len() <= w as usize,
            "{} files, -W {w}: {files:?}",
            files.len()
        );
        let mut all = Vec::new();
        for (i, f) in files.iter().enumerate().take(closed) {
            let s = seqs_any(f, format);
            let size = fs::metadata(f).unwrap().len();
            if let Some(c) = c {
                prop_assert!(
                    size <= c || s.len() <= 1,
                    "{}: {size} bytes > -C {c}",
                    f.display()
                );
            }
            if i > 0 && !time_names && w > 1 {
                let (a, b) = (ring_index(&files[i - 1]), ring_index(f));
                prop_assert_eq!(b, a.map(|a| (a + 1) % w), "{:?}", files);
            }
            all.extend(s);
        }
        if time_names {
            // Named after the start of their interval: in creation order by name, up to
            // the ring counter of size rotations within one interval.
            let stems: Vec<String> = files
                .iter()
                .map(|f| {
                    f.to_string_lossy()
                        .trim_end_matches(|c: char| c.is_ascii_digit())
                        .to_string()
                })
                .collect();
            prop_assert!(stems.windows(2).all(|p| p[0] <= p[1]), "{stems:?}");
        }
        Ok(all)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn never_more_than_w_files_none_above_c_names_in_order(
            pcapng in any::<bool>(),
            c in prop::option::of(300u64..6000),
            g_secs in prop::option::of(1u64..5),
            w in 1u32..6,
            time_names in any::<bool>(),
            steps in steps(),
        ) {
            prop_assume!(c.is_some() || g_secs.is_some());
            let format = if pcapng { CaptureFormat::PcapNg } else { CaptureFormat::Pcap };
            let time_names = time_names && g_secs.is_some();
            let dir = TempDir::new("ringprop");
            let name = if time_names { "cap-%Y%m%d-%H%M%S.pcap" } else { "cap.pcap" };
            let mut policy = RotationPolicy::none().with_max_files(w);
            if let Some(c) = c {
                policy = policy.with_max_file_bytes(c);
            }
            if let Some(g) = g_secs {
                policy = policy.with_interval(Duration::from_secs(g));
            }
            let mut wr = CaptureWriter::create_with(dir.join(name), format, policy, 0, hops2(), opts())
                .unwrap();
            let mut t = T0;
            let mut seq = 0u32;
            for s in &steps {
                match *s {
                    Step::Packet { len, dt_ms } => {
                        t += dt_ms * 1_000_000;
                        wr.write((seq % 2) as usize, Direction::Inbound, t, len as u32, &pkt(seq, len))
                            .unwrap();
                        seq += 1;
                    }
                    Step::Tick { dt_ms } => {
                        t += dt_ms * 1_000_000;
                        wr.tick(t).unwrap();
                    }
                }
                let files = wr.files().to_vec();
                prop_assert_eq!(files.len(), dir.names().len(), "files() is what is on disk");
                // Every file but the current one is complete.
                check_files(&files, format, c, w, time_names, files.len() - 1)?;
            }
            let files = wr.files().to_vec();
            let stats = wr.finish().unwrap();
            let kept: Vec<PathBuf> = files.into_iter().filter(|f| f.exists()).collect();
            prop_assert_eq!(kept.len(), dir.names().len());
            let all = check_files(&kept, format, c, w, time_names, kept.len())?;
            // The newest packets, in order, the last one included. (Not with -W 1: an idle
            // -G interval starts a new, empty file in place of the only one.)
            prop_assert!(all.windows(2).all(|p| p[0] < p[1]), "{all:?}");
            if seq > 0 && w > 1 {
                prop_assert_eq!(all.last().copied(), Some(seq - 1));
            }
            if stats.files_deleted == 0 {
                prop_assert_eq!(all.len() as u32, seq);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Regression tests for what fuzzing the writer found.

/// Loss counts added up past u64 overflowed (a panic in debug builds, a wrap otherwise);
/// they saturate. Found by the `writer` fuzz target (fuzz/corpus/writer/crash-lost-count-overflow).
#[test]
fn regression_lost_counts_saturate() {
    let dir = TempDir::new("lostsat");
    let mut w = CaptureWriter::create_with(
        dir.join("l.pcapng"),
        CaptureFormat::PcapNg,
        RotationPolicy::none(),
        0,
        hops2(),
        opts(),
    )
    .unwrap();
    w.add_lost(0, u64::MAX - 1).unwrap();
    w.add_lost(0, 5).unwrap();
    w.add_lost_unattributed(u64::MAX);
    w.add_lost_unattributed(1);
    let stats = w.finish().unwrap();
    assert_eq!(stats.lost, u64::MAX);
    let f = read_ng(&dir.join("l.pcapng"));
    assert_eq!(f.isbs[0].ifdrop, Some(u64::MAX));
}

/// A snap length above tcpdump's maximum (262144) let packets longer than Wireshark reads
/// into the file ("a record that's too big"): the writer caps it, as tcpdump does.
#[test]
fn regression_snaplen_is_capped_at_the_readers_maximum() {
    for format in [CaptureFormat::PcapNg, CaptureFormat::Pcap] {
        let dir = TempDir::new("bigsnap");
        let path = dir.join("b.pcap");
        let mut w = CaptureWriter::create_with(
            &path,
            format,
            RotationPolicy::none(),
            1 << 30,
            hops2(),
            opts(),
        )
        .unwrap();
        assert_eq!(w.snaplen(), DEFAULT_SNAPLEN);
        let big = vec![0x45u8; 300_000];
        w.write(0, Direction::Inbound, T0, 0, &big).unwrap();
        let stats = w.finish().unwrap();
        assert_eq!(stats.packets_truncated, 1);
        if format == CaptureFormat::PcapNg {
            let f = read_ng(&path);
            assert_eq!(f.idbs[0].snaplen, DEFAULT_SNAPLEN);
            assert_eq!(f.epbs[0].data.len(), DEFAULT_SNAPLEN as usize);
            assert_eq!(f.epbs[0].orig_len, 300_000);
        }
        if let Some(n) = wireshark_count(&path) {
            assert_eq!(n, 1, "{format}");
        }
    }
}

/// The records `write` frames by hand are byte for byte what pcap-file writes: every padding,
/// both directions and none, both formats.
#[test]
fn hand_framed_records_are_pcap_file_s() {
    use pcap_file::pcap::PcapPacket;
    use pcap_file::pcapng::blocks::enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption};
    let ts = T0 + 123_456_789;
    for len in [0usize, 1, 2, 3, 4, 5, 60, 1514, 65_535] {
        let data: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
        for direction in [Direction::Inbound, Direction::Outbound, Direction::Unknown] {
            let f = RecordFrame::new(CaptureFormat::PcapNg, 3, direction, ts, 70_000, len).unwrap();
            let mine = [f.head(), &data, f.tail()].concat();
            assert_eq!(mine.len(), f.len());
            let epb = EnhancedPacketBlock {
                interface_id: 3,
                timestamp: Duration::from_nanos(ts),
                original_len: 70_000,
                data: std::borrow::Cow::Borrowed(&data),
                options: direction
                    .epb_flags()
                    .map(EnhancedPacketOption::Flags)
                    .into_iter()
                    .collect(),
            };
            let mut theirs = Vec::new();
            Block::EnhancedPacket(epb)
                .write_to::<NativeEndian, _>(&mut theirs)
                .unwrap();
            assert_eq!(mine, theirs, "pcapng, {len} bytes, {direction:?}");
        }
        let f =
            RecordFrame::new(CaptureFormat::Pcap, 3, Direction::Inbound, ts, 70_000, len).unwrap();
        let mine = [f.head(), &data, f.tail()].concat();
        let mut theirs = Vec::new();
        PcapPacket::new(Duration::from_nanos(ts), 70_000, &data)
            .write_to::<_, NativeEndian>(&mut theirs, TsResolution::NanoSecond, 65_535)
            .unwrap();
        assert_eq!(mine, theirs, "pcap, {len} bytes");
    }
    // Classic pcap counts seconds in 32 bits.
    assert!(RecordFrame::new(CaptureFormat::Pcap, 0, Direction::Unknown, u64::MAX, 1, 0).is_none());
}

/// Packets the kernel cut for want of room: counted apart from the snap length's, stated per
/// interface in its statistics block (after the unattributed loss on the first), and the
/// trailer's reserve keeps a file with those comments within -C.
#[test]
fn packets_cut_for_room_are_counted_and_stated_per_interface() {
    let dir = TempDir::new("cut");
    let path = dir.join("c.pcapng");
    let limit = 4000;
    let policy = RotationPolicy::none().with_max_file_bytes(limit);
    let mut w =
        CaptureWriter::create_with(&path, CaptureFormat::PcapNg, policy, 0, hops2(), opts())
            .unwrap();
    let cut = podtrace_abi::CUT_BYTES as usize;
    let mut i = 0u32;
    // Packets until the first file is full: every one on hop 1 cut for room, on hop 0 every
    // third cut to the snap length.
    while w.files().len() < 2 {
        let hop = (i % 2) as usize;
        w.write(
            hop,
            Direction::Inbound,
            T0 + u64::from(i),
            1500,
            &pkt(i, cut),
        )
        .unwrap();
        if hop == 1 {
            w.note_kernel_cut(1, true);
        } else if i.is_multiple_of(3) {
            w.note_kernel_cut(0, false);
        }
        i += 1;
    }
    w.add_lost_unattributed(7);
    let files = w.files().to_vec();
    let stats = w.finish().unwrap();
    assert_eq!(stats.packets_written, u64::from(i));
    let on_hop1 = u64::from(i) / 2;
    assert_eq!(stats.packets_cut_for_room, on_hop1);
    assert_eq!(
        stats.packets_truncated,
        (0..i)
            .filter(|n| n.is_multiple_of(2) && n.is_multiple_of(3))
            .count() as u64
    );
    let mut cut_stated = 0;
    for p in &files {
        assert!(fs::metadata(p).unwrap().len() <= limit, "{}", p.display());
        let f = read_ng(p);
        let cut_here = f.epbs.iter().filter(|e| e.iface == 1).count() as u64;
        let c1 = f.isbs[1].comment.as_deref().unwrap_or_default();
        if cut_here == 0 {
            assert_eq!(c1, "");
        } else {
            let want = format!("{cut_here} packets of this interface were cut to their first 128");
            assert!(c1.starts_with(&want), "{c1:?}");
        }
        cut_stated += cut_here;
        // Hop 0's packets were cut to the snap length only: nothing to state.
        let c0 = f.isbs[0].comment.clone().unwrap_or_default();
        assert!(!c0.contains("cut"), "{c0:?}");
    }
    assert_eq!(cut_stated, on_hop1);
    // The loss reported at the end is in the last file's first block.
    let last = read_ng(files.last().unwrap());
    assert!(last.isbs[0]
        .comment
        .as_deref()
        .unwrap()
        .starts_with("7 packets were lost"));
}
