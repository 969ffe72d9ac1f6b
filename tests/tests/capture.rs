//! `podtrace capture` (and `follow -w`) on the lab, read back with tshark and tcpdump: packets
//! per hop interface, directions, rotation by size and time with the -W ring, classic pcap, a
//! filter expression, --stop-on drop, and a full disk.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use podtrace_tests::{podtrace, Lab, Running};

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("podtrace-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    fn file(&self, name: &str) -> String {
        self.0.join(name).to_str().unwrap().to_owned()
    }

    fn files(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).output();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `tshark -r FILE -Y FILTER -T fields -e FIELD...`, one line per packet.
fn tshark(file: &Path, filter: &str, fields: &[&str]) -> Vec<String> {
    let mut args = vec![
        "-r".to_owned(),
        file.to_str().unwrap().to_owned(),
        "-d".into(),
        "udp.port==8472,vxlan".into(),
        "-Y".into(),
        filter.into(),
        "-T".into(),
        "fields".into(),
    ];
    for f in fields {
        args.push("-e".into());
        args.push((*f).into());
    }
    let out = Command::new("tshark").args(&args).output().expect("tshark");
    assert!(
        out.status.success(),
        "tshark {file:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn count_by_first_field(lines: &[String]) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for l in lines {
        *m.entry(l.split('\t').next().unwrap().to_owned())
            .or_default() += 1;
    }
    m
}

fn capture(lab: &Lab, args: &[&str]) -> Running {
    let mut full = vec!["capture"];
    full.extend_from_slice(args);
    full.extend(["--lab", &lab.prefix]);
    Running::start(&full)
}

/// `capture pod-a1 udp and port PORT -w FILE EXTRA… --duration 4`.
fn capture_udp_port(lab: &Lab, port: &str, file: &str, extra: &[&str]) -> Running {
    let mut args = vec!["pod-a1", "udp", "and", "port", port, "-w", file];
    args.extend_from_slice(extra);
    args.extend(["--duration", "4"]);
    capture(lab, &args)
}

/// On a lab of its own (`tag`), a capture of `udp and port PORT` on pod-a1 while pod-a1 sends
/// two datagrams of each payload size in `sizes` to pod-b1; once the capture exited 0: the
/// lab, the directory, the file and the capture's stderr.
fn capture_bursts(tag: &str, port: u16, sizes: &[usize]) -> (Lab, Scratch, String, String) {
    let lab = Lab::up(tag, "flannel");
    let dir = Scratch::new(tag);
    let file = dir.file(&format!("{tag}.pcapng"));
    let run = capture_udp_port(&lab, &port.to_string(), &file, &[]);
    for size in sizes {
        udp_burst(&lab, "pod-a1", "10.244.1.5", port, 2, *size);
    }
    let (code, _, stderr) = run.wait(20);
    assert_eq!(code, Some(0), "{stderr}");
    (lab, dir, file, stderr)
}

fn udp_burst(lab: &Lab, from: &str, to: &str, port: u16, count: u32, size: usize) {
    let code = format!(
        "import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nfor i in range({count}):\n    s.sendto(b'x'*{size},('{to}',{port}))\n    time.sleep(0.002)"
    );
    let out = lab.exec(from, &["python3", "-c", &code]);
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn n_pings_give_n_echo_requests_on_every_hop() {
    let lab = Lab::up("cping", "flannel");
    let dir = Scratch::new("cping");
    let file = dir.file("ping.pcapng");
    let run = capture(
        &lab,
        &[
            "pod-a1",
            "--dst",
            "10.244.1.5",
            "-w",
            &file,
            "--duration",
            "4",
        ],
    );
    const N: usize = 5;
    let out = lab.exec("pod-a1", &["ping", "-c", "5", "-i", "0.2", "10.244.1.5"]);
    assert!(out.status.success());
    let (code, _, stderr) = run.wait(20);
    assert_eq!(code, Some(0), "{stderr}");
    let requests = tshark(
        Path::new(&file),
        "icmp.type == 8",
        &["frame.interface_name", "frame.packet_flags_direction"],
    );
    let per_hop = count_by_first_field(&requests);
    let hops: Vec<&str> = per_hop.keys().map(String::as_str).collect();
    assert_eq!(hops.len(), 10, "{per_hop:?}");
    for (hop, n) in &per_hop {
        assert_eq!(*n, N, "{hop}: {per_hop:?}");
    }
    for want in [
        "pod-a1/eth0",
        "node-a/cni0",
        "node-a/flannel.1",
        "node-a/eth0",
        "node-b/eth0",
        "pod-b1/eth0",
    ] {
        assert!(per_hop.contains_key(want), "{want} missing: {per_hop:?}");
    }
    // Directions: the pod sends, the destination pod receives.
    let dir_of = |hop: &str| -> Vec<String> {
        requests
            .iter()
            .filter(|l| l.starts_with(&format!("{hop}\t")))
            .map(|l| l.split('\t').nth(1).unwrap().to_owned())
            .collect()
    };
    assert!(
        dir_of("pod-a1/eth0")
            .iter()
            .all(|d| u32::from_str_radix(d.trim_start_matches("0x"), 16) == Ok(2)),
        "{:?}",
        dir_of("pod-a1/eth0")
    );
    assert!(dir_of("pod-b1/eth0")
        .iter()
        .all(|d| u32::from_str_radix(d.trim_start_matches("0x"), 16) == Ok(1)));
    // The underlay frames are the VXLAN-encapsulated ones.
    let vxlan = tshark(
        Path::new(&file),
        "vxlan && icmp.type == 8",
        &["frame.interface_name"],
    );
    assert_eq!(
        count_by_first_field(&vxlan)
            .keys()
            .cloned()
            .collect::<Vec<_>>(),
        ["node-a/eth0", "node-b/eth0"]
    );
    // The file is private.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn rotation_by_size_keeps_a_ring_of_w_files() {
    let lab = Lab::up("csize", "flannel");
    let dir = Scratch::new("csize");
    let file = dir.file("ring.pcapng");
    let run = capture(
        &lab,
        &[
            "pod-a1",
            "--dst",
            "10.244.1.5",
            "-w",
            &file,
            "-C",
            "1",
            "-W",
            "3",
        ],
    );
    // ~1400-byte datagrams, seen on 10 hops: about 5.6 MB in all.
    udp_burst(&lab, "pod-a1", "10.244.1.5", 7000, 400, 1400);
    // On SIGINT podtrace writes out what the kernel still holds before it closes the ring.
    run.signal(nix::sys::signal::Signal::SIGINT);
    let (code, _, stderr) = run.wait(20);
    assert_eq!(code, Some(0), "{stderr}");
    let files = dir.files();
    assert_eq!(files.len(), 3, "{files:?}");
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["ring.pcapng0", "ring.pcapng1", "ring.pcapng2"]);
    for f in &files {
        let size = std::fs::metadata(f).unwrap().len();
        assert!(size <= 1_000_000, "{f:?} is {size} bytes");
        assert!(
            !tshark(f, "udp.dstport == 7000", &["frame.number"]).is_empty(),
            "{f:?} readable, with packets"
        );
    }
    assert!(stderr.contains("keep the newest 3 files"), "{stderr}");
}

#[test]
fn rotation_by_time_and_by_both() {
    let lab = Lab::up("ctime", "flannel");
    let dir = Scratch::new("ctime");
    let file = dir.file("t.pcapng");
    let run = capture(
        &lab,
        &[
            "pod-a1",
            "--dst",
            "10.244.1.5",
            "-w",
            &file,
            "-G",
            "1",
            "-W",
            "2",
        ],
    );
    // 2.75 s of pings: at least three 1-second intervals, so at least three files, of
    // which the ring keeps the newest two.
    let _ = lab.exec("pod-a1", &["ping", "-c", "12", "-i", "0.25", "10.244.1.5"]);
    run.signal(nix::sys::signal::Signal::SIGTERM);
    let (code, _, stderr) = run.wait(20);
    assert_eq!(code, Some(0), "{stderr}");
    let files = dir.files();
    assert_eq!(files.len(), 2, "a ring of two: {files:?}");
    assert!(stderr.contains("older ones rotated out"), "{stderr}");
    for f in &files {
        assert!(
            !tshark(f, "icmp", &["frame.number"]).is_empty(),
            "{f:?} readable, with packets of its interval"
        );
    }
    // Both: size or time, whichever first.
    let both = dir.file("b.pcapng");
    let run = capture(
        &lab,
        &[
            "pod-a1",
            "--dst",
            "10.244.1.5",
            "-w",
            &both,
            "-C",
            "1",
            "-G",
            "1",
            "-W",
            "4",
        ],
    );
    // About 4.2 MB of UDP in under a second (size rotations), then 3 s of pings, far below
    // a megabyte. The last file of the burst runs at most 1 s into the pings; after it,
    // time rotations make at least two files of pings only.
    udp_burst(&lab, "pod-a1", "10.244.1.5", 7001, 300, 1400);
    let _ = lab.exec("pod-a1", &["ping", "-c", "13", "-i", "0.25", "10.244.1.5"]);
    run.signal(nix::sys::signal::Signal::SIGINT);
    let (code, _, stderr) = run.wait(20);
    assert_eq!(code, Some(0), "{stderr}");
    let files: Vec<PathBuf> = dir
        .files()
        .into_iter()
        .filter(|f| f.to_string_lossy().contains("b.pcapng"))
        .collect();
    assert_eq!(files.len(), 4, "a ring of four: {files:?}");
    assert!(stderr.contains("older ones rotated out"), "{stderr}");
    let mut icmp_only = 0;
    for f in &files {
        assert!(std::fs::metadata(f).unwrap().len() <= 1_000_000);
        let udp = tshark(f, "udp.dstport == 7001 and not icmp", &["frame.number"]);
        let icmp = tshark(f, "icmp.type == 8 or icmp.type == 0", &["frame.number"]);
        assert!(!udp.is_empty() || !icmp.is_empty(), "{f:?} has packets");
        if udp.is_empty() {
            icmp_only += 1;
        }
    }
    assert!(
        icmp_only >= 2,
        "the pings were split by time, not size: {icmp_only} file(s) of pings only"
    );
}

#[test]
fn classic_pcap_and_a_udp_only_expression() {
    let lab = Lab::up("cexpr", "flannel");
    let dir = Scratch::new("cexpr");
    let file = dir.file("udp.pcap");
    let run = capture_udp_port(&lab, "7002", &file, &["--format", "pcap"]);
    let _ = lab.exec("pod-a1", &["ping", "-c", "3", "-i", "0.2", "10.244.1.5"]);
    udp_burst(&lab, "pod-a1", "10.244.1.5", 7002, 5, 100);
    // Same protocol, another port: the kernel's check of the expression's ports rejects it.
    udp_burst(&lab, "pod-a1", "10.244.1.5", 7003, 5, 100);
    let (code, _, stderr) = run.wait(20);
    assert_eq!(code, Some(0), "{stderr}");
    // The hop probes applied the expression's protocol and port: neither the pings nor the
    // datagrams to 7003 reached userspace.
    assert!(
        stderr.contains(", 0 seen by the probes but not matching the expression"),
        "{stderr}"
    );
    // tcpdump reads classic pcap.
    let out = Command::new("tcpdump")
        .args(["-nn", "-r", &file])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("ICMP"), "only UDP: {text}");
    // Without --dst: the pod's side of the path and where traffic can leave its node: pod eth0,
    // host veth, cni0, flannel.1 and node-a/eth0 (inside VXLAN): 5 datagrams on 5 hops.
    let per_hop = count_by_first_field(&tshark(
        Path::new(&file),
        "udp.dstport == 7002",
        &["frame.interface_name"],
    ));
    assert_eq!(per_hop.values().sum::<usize>(), 25, "{text}");
    // An expression the kernel cannot check (a negation promises nothing): the pings reach
    // userspace, which rejects them; the file holds the datagrams alone.
    let file2 = dir.file("not-icmp.pcapng");
    let run = capture(
        &lab,
        &["pod-a1", "not", "icmp", "-w", &file2, "--duration", "4"],
    );
    let _ = lab.exec("pod-a1", &["ping", "-c", "3", "-i", "0.2", "10.244.1.5"]);
    udp_burst(&lab, "pod-a1", "10.244.1.5", 7003, 2, 100);
    let (code, _, stderr) = run.wait(20);
    assert_eq!(code, Some(0), "{stderr}");
    let rejected: u64 = stderr
        .lines()
        .flat_map(|l| l.split(", "))
        .find_map(|part| part.strip_suffix(" seen by the probes but not matching the expression"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no expression count: {stderr}"));
    // 3 requests and 3 replies on (at least) the pod's eth0 and its host veth.
    assert!(rejected >= 12, "{stderr}");
    let frames = count_by_first_field(&tshark(Path::new(&file2), "", &["ip.proto"]));
    assert!(
        !frames.is_empty() && frames.keys().all(|k| k.split(',').all(|p| p == "17")),
        "only UDP (outer and inner through VXLAN): {frames:?}"
    );
    // A filter podtrace cannot evaluate is refused up front.
    let bad = podtrace(&[
        "capture",
        "pod-a1",
        "portrange",
        "1-5",
        "-w",
        &dir.file("no.pcapng"),
        "--lab",
        &lab.prefix,
    ]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("portrange"));
    assert!(!Path::new(&dir.file("no.pcapng")).exists());
}

/// Datagrams of 0, 1, 7 and 8 bytes: shorter than, and exactly as long as, the IPv4 header
/// with the 14 L4 bytes the filter may read (outside and inside VXLAN). A parser that reads
/// more than a packet holds loses them: every one must be seen on every hop.
#[test]
fn short_datagrams_are_seen_on_every_hop() {
    let (_lab, _dir, file, stderr) = capture_bursts("cshort", 7004, &[0, 1, 7, 8]);
    // pod eth0, host veth, cni0, flannel.1 and node-a/eth0 (inside VXLAN): 8 datagrams on 5
    // hops, each of its own length.
    // Inside VXLAN tshark shows the outer and the inner UDP length: count by the inner one.
    let lens: Vec<String> = tshark(Path::new(&file), "udp.dstport == 7004", &["udp.length"])
        .iter()
        .map(|l| l.rsplit(',').next().unwrap_or(l).to_owned())
        .collect();
    let expected: std::collections::BTreeMap<String, usize> = [8, 9, 15, 16]
        .iter()
        .map(|l| (format!("{l}"), 10))
        .collect();
    assert_eq!(count_by_first_field(&lens), expected, "{lens:?}\n{stderr}");
}

/// Frames on both sides of each record size the hop probes reserve (128, 256 and 512 bytes,
/// 2 KiB), on the pod's hops and inside VXLAN (50 bytes more): every one is kept whole on
/// every hop, whichever size it fell into.
#[test]
fn frames_of_every_record_size_are_kept_whole() {
    // UDP payload → frame on the pod's hops (42 bytes of headers) and on the underlay (92).
    let payloads = [86usize, 87, 164, 165, 214, 215, 420, 421, 470, 471, 1000];
    let (_lab, _dir, file, stderr) = capture_bursts("cclass", 7005, &payloads);
    let rows = tshark(
        Path::new(&file),
        "udp.dstport == 7005",
        &["udp.length", "frame.len", "frame.cap_len"],
    );
    let mut per_len = std::collections::BTreeMap::<usize, usize>::new();
    for row in &rows {
        let f: Vec<&str> = row.split('\t').collect();
        assert_eq!(f.len(), 3, "{row}");
        assert_eq!(f[1], f[2], "a frame was cut: {row}");
        // Inside VXLAN: the outer and the inner UDP length; the inner one is the datagram's.
        let inner: usize = f[0].rsplit(',').next().unwrap().parse().unwrap();
        let frame: usize = f[1].parse().unwrap();
        let payload = inner - 8;
        assert!(
            frame == payload + 42 || frame == payload + 92,
            "frame of {frame} bytes for a {payload}-byte payload: {row}"
        );
        *per_len.entry(payload).or_default() += 1;
    }
    // Two datagrams of each size on 5 hops (pod eth0, host veth, cni0, flannel.1, node-a/eth0).
    let expected: std::collections::BTreeMap<usize, usize> =
        payloads.iter().map(|p| (*p, 10)).collect();
    assert_eq!(per_len, expected, "{rows:?}\n{stderr}");
}

/// The number before `what` in the capture's summary line (`N cut to their first ...`).
fn summary_count(stderr: &str, what: &str) -> Option<u64> {
    let line = stderr.lines().find(|l| l.contains("packets written ("))?;
    let at = line.find(what)?;
    line[..at]
        .split([' ', '('])
        .rfind(|w| !w.is_empty())?
        .parse()
        .ok()
}

/// A capture of `udp and port PORT` between pod-a1 and pod-b1 (10 hops) whose writer is held
/// up for 3 s at its first packet (`PODTRACE_STALL`) while pod-a1 sends 1000 datagrams of
/// 1300 bytes: the kernel's ring buffer fills. Returns the directory, the file and stderr.
fn capture_behind(tag: &str, port: u16, extra: &[&str]) -> (Lab, Scratch, String, String) {
    let lab = Lab::up(tag, "flannel");
    let dir = Scratch::new(tag);
    let file = dir.file(&format!("{tag}.pcapng"));
    let port_s = port.to_string();
    let mut args = vec![
        "capture",
        "pod-a1",
        "--dst",
        "10.244.1.5",
        "udp",
        "and",
        "port",
        &port_s,
        "-w",
        &file,
        "--duration",
        "8",
        "--lab",
        &lab.prefix,
    ];
    args.extend_from_slice(extra);
    let run = Running::start_with_env(&args, &[("PODTRACE_STALL", "capture-packet:3000")]);
    let code = format!(
        "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nfor i in range(1000):\n    s.sendto(b'x'*1300,('10.244.1.5',{port}))"
    );
    let out = lab.exec("pod-a1", &["python3", "-c", &code]);
    assert!(out.status.success(), "{out:?}");
    let (code, _, stderr) = run.wait(30);
    assert_eq!(code, Some(0), "{stderr}");
    (lab, dir, file, stderr)
}

/// A writer that falls behind: by default (`--overload cut`) nothing is lost. Every datagram
/// is in the file on every hop of the path; those whose whole record found no room in the
/// kernel's ring buffer are cut to their first 128 bytes, their original length kept and their
/// headers readable (VXLAN's inner ones too); the summary and each interface's statistics
/// block say how many. With `--overload drop` the same burst loses packets, counted.
#[test]
fn a_writer_that_falls_behind_keeps_every_packets_headers() {
    let (_lab, dir, file, stderr) = capture_behind("ccut", 7011, &[]);
    assert_eq!(dir.files().len(), 1, "{stderr}");
    assert_eq!(summary_count(&stderr, "lost before"), Some(0), "{stderr}");
    let cut = summary_count(&stderr, "cut to their first 128 bytes").unwrap_or(0);
    assert!(cut > 0, "the ring never filled: {stderr}");
    let rows = tshark(
        Path::new(&file),
        "udp.dstport == 7011",
        &[
            "frame.interface_name",
            "frame.len",
            "frame.cap_len",
            "udp.length",
        ],
    );
    let per_hop = count_by_first_field(&rows);
    assert_eq!(per_hop.len(), 10, "{per_hop:?}\n{stderr}");
    assert!(
        per_hop.values().all(|n| *n == 1000),
        "{per_hop:?}\n{stderr}"
    );
    let mut cut_rows = 0;
    for row in &rows {
        let f: Vec<&str> = row.split('\t').collect();
        let (len, cap): (u32, u32) = (f[1].parse().unwrap(), f[2].parse().unwrap());
        // The datagram's own UDP header is read from the cut frame too (inside VXLAN).
        assert_eq!(f[3].rsplit(',').next(), Some("1308"), "{row}");
        if cap < len {
            assert_eq!(cap, 128, "{row}");
            cut_rows += 1;
        } else {
            assert!(len == 1342 || len == 1392, "{row}");
        }
    }
    assert_eq!(cut_rows, cut, "{stderr}");
    // The interfaces' statistics blocks state the cut packets, in comments.
    let blocks = std::fs::read(&file).unwrap();
    let stated = String::from_utf8_lossy(&blocks)
        .matches("packets of this interface were cut to their first 128 bytes")
        .count();
    assert!((1..=10).contains(&stated), "{stated} statements");

    let (_lab, _dir, file, stderr) = capture_behind("cdrop", 7012, &["--overload", "drop"]);
    let lost = summary_count(&stderr, "lost before").unwrap();
    assert!(lost > 0, "{stderr}");
    assert!(!stderr.contains("cut to their first"), "{stderr}");
    let rows = tshark(Path::new(&file), "udp.dstport == 7012", &["frame.cap_len"]);
    assert!(rows.len() < 10_000, "{} of 10000 kept", rows.len());
    assert!(rows.iter().all(|c| c != "128"), "a packet was cut");
}

#[test]
fn stop_on_drop_keeps_what_led_to_it() {
    let lab = Lab::up("cstop", "flannel");
    let dir = Scratch::new("cstop");
    let file = dir.file("fault.pcapng");
    let run = capture(
        &lab,
        &[
            "pod-a1",
            "--dst",
            "10.244.1.5",
            "-w",
            &file,
            "-C",
            "1",
            "-W",
            "2",
            "--stop-on",
            "drop",
            "--tail",
            "1s",
        ],
    );
    let ok = lab.exec("pod-a1", &["ping", "-c", "3", "-i", "0.2", "10.244.1.5"]);
    assert!(ok.status.success());
    let out = lab.exec(
        "node-a",
        &["iptables", "-I", "FORWARD", "-p", "icmp", "-j", "DROP"],
    );
    assert!(out.status.success());
    let _ = lab.exec("pod-a1", &["ping", "-c", "1", "-W", "1", "10.244.1.5"]);
    // It stops by itself.
    let (code, _, stderr) = run.wait(20);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("stopped on drop at node-a/cni0: NETFILTER_DROP"),
        "{stderr}"
    );
    let files = dir.files();
    let replies: usize = files
        .iter()
        .map(|f| {
            tshark(
                f,
                "icmp.type == 0 && frame.interface_name == \"pod-a1/eth0\"",
                &["frame.number"],
            )
            .len()
        })
        .sum();
    assert_eq!(replies, 3, "the three answered pings before the fault");
    let requests: usize = files
        .iter()
        .map(|f| {
            tshark(
                f,
                "icmp.type == 8 && frame.interface_name == \"pod-a1/eth0\"",
                &["frame.number"],
            )
            .len()
        })
        .sum();
    assert_eq!(requests, 4, "and the one that was dropped");
}

#[test]
fn a_full_disk_is_exit_2_and_earlier_files_stay_readable() {
    let lab = Lab::up("cfull", "flannel");
    let dir = Scratch::new("cfull");
    let out = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=1600k",
            "tmpfs",
            dir.0.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let file = dir.file("full.pcapng");
    let run = capture(
        &lab,
        &["pod-a1", "--dst", "10.244.1.5", "-w", &file, "-C", "1"],
    );
    udp_burst(&lab, "pod-a1", "10.244.1.5", 7003, 400, 1400);
    let (code, _, stderr) = run.wait(20);
    assert_eq!(code, Some(2), "{stderr}");
    let last = stderr.trim().lines().last().unwrap();
    assert!(
        last.starts_with("podtrace: ") && last.contains("full"),
        "{stderr}"
    );
    let files = dir.files();
    assert!(files.len() >= 2, "{files:?}");
    // The first file was complete when rotated; it is intact.
    assert!(!tshark(&files[0], "udp.dstport == 7003", &["frame.number"]).is_empty());
}

#[test]
fn follow_can_write_the_packets_too() {
    let lab = Lab::up("cfol", "flannel");
    let dir = Scratch::new("cfol");
    let file = dir.file("follow.pcapng");
    let run = Running::start(&[
        "follow",
        "pod-a1",
        "--dst",
        "10.244.1.5",
        "-c",
        "4",
        "-w",
        &file,
        "--json",
        "--lab",
        &lab.prefix,
    ]);
    let out = lab.exec("pod-a1", &["ping", "-c", "2", "-i", "0.2", "10.244.1.5"]);
    assert!(out.status.success());
    let (code, _, stderr) = run.wait(20);
    assert_eq!(code, Some(0), "{stderr}");
    let per_hop =
        count_by_first_field(&tshark(Path::new(&file), "icmp", &["frame.interface_name"]));
    assert_eq!(per_hop.len(), 10, "{per_hop:?}");
    assert!(per_hop.values().all(|n| *n == 4), "{per_hop:?}");
}
