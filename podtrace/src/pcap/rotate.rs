//! Rotation policy (`-C`, `-G`, `-W`) and the names of rotated files.
//!
//! # Policy
//!
//! * `-C N`: start a new file when the next packet would make the current one exceed
//!   N × 1,000,000 bytes. Unlike tcpdump (which checks *before* adding the packet, so its
//!   files overshoot by up to one packet), a file never exceeds the limit, trailer blocks
//!   included, unless its header plus one packet alone do.
//! * `-G SECS`: start a new file when a packet's timestamp is SECS or more after the start of
//!   the current file's interval (tcpdump's rule; the new interval starts at that packet).
//!   [`CaptureWriter::tick`](super::CaptureWriter::tick) applies the same rule without a
//!   packet, so an idle capture still closes its file on time.
//! * `-W N`: keep at most N files as a ring: before a new file is created, the oldest files
//!   *this writer created* are deleted so that at most N exist, the new one included. Files
//!   from earlier runs are never deleted (but are replaced when a new file takes their name).
//!   Unlike tcpdump, `-W` works with `-C` and `-G` together, and with `-G` alone it keeps
//!   the newest N files instead of stopping the capture.
//!
//! With `-C` and `-G` together, a new file starts on whichever comes first. Disk use is
//! bounded by N × C (or N × (header + one packet) if a single packet does not fit in C).
//!
//! A file that ends with no packets and no recorded losses (an idle `-G` interval) is
//! deleted instead of being kept, unless it is the capture's only file; an idle interval
//! whose file name would not change simply continues in the same empty file. (Creating
//! the next file makes room in the ring first, so a capture that stays idle after a
//! rotation until it stops ends with N-1 files.)
//!
//! # File names
//!
//! As tcpdump, with a counter suffix where tcpdump would reuse a name:
//!
//! * The *stem* is the `-w` path, expanded with strftime conversions (`%Y %m %d %H %M %S %y
//!   %j %s %F %T %%`, local time by default) at the start of the file's interval — only with
//!   `-G`, and only if the path contains a conversion (otherwise `%` is literal).
//! * Files are *numbered* with `-C`, and with `-G` when the path has no time conversion
//!   (where tcpdump would overwrite the same file every interval). A stem without a time
//!   conversion never changes, so numbering then runs across the whole capture; with a time
//!   conversion it restarts in each interval.
//! * With `-W N` (N > 1), numbered names get the counter modulo N, zero-padded to the width
//!   of N-1: `cap.pcap0` .. `cap.pcap9` for `-W 10`, `cap.pcap00` .. `cap.pcap99` for
//!   `-W 100`. With `-W 1` there is no suffix: the single file is replaced at each rotation.
//! * Without `-W`, the first file of a stem has no suffix and later ones count up:
//!   `cap.pcap`, `cap.pcap1`, `cap.pcap2`, ...
//! * Time-named files that are not numbered (`-G` without `-C`) normally need no suffix;
//!   should two intervals produce the same name (a pattern coarser than the interval, e.g.
//!   `%H` with `-G 60`), the later files get `1`, `2`, ... instead of overwriting the first.

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::error::CaptureError;

/// One megabyte for `-C`, as in tcpdump: 1,000,000 bytes.
pub const MB: u64 = 1_000_000;

/// When to start a new capture file and how many to keep. See the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RotationPolicy {
    max_file_bytes: Option<u64>,
    interval: Option<Duration>,
    max_files: Option<u32>,
}

impl RotationPolicy {
    /// A single file, never rotated.
    pub fn none() -> Self {
        RotationPolicy::default()
    }

    /// The policy of tcpdump's flags: `-C` in millions of bytes, `-G` as a duration
    /// (the CLI parses `60`, `60s`, `10m`), `-W` as a file count.
    pub fn from_flags(
        c_megabytes: Option<u64>,
        g_interval: Option<Duration>,
        w_files: Option<u32>,
    ) -> Result<Self, CaptureError> {
        let max_file_bytes = match c_megabytes {
            Some(0) => return Err(invalid("-C must be at least 1 (million bytes)")),
            Some(c) => Some(
                c.checked_mul(MB)
                    .ok_or_else(|| invalid("-C is too large"))?,
            ),
            None => None,
        };
        let p = RotationPolicy {
            max_file_bytes,
            interval: g_interval,
            max_files: w_files,
        };
        p.validate()?;
        Ok(p)
    }

    /// Rotate when a file would exceed `bytes` (exact bytes; `-C` is in millions).
    pub fn with_max_file_bytes(mut self, bytes: u64) -> Self {
        self.max_file_bytes = Some(bytes);
        self
    }

    /// Rotate every `interval` (`-G`).
    pub fn with_interval(mut self, interval: Duration) -> Self {
        self.interval = Some(interval);
        self
    }

    /// Keep at most `n` files (`-W`).
    pub fn with_max_files(mut self, n: u32) -> Self {
        self.max_files = Some(n);
        self
    }

    /// The size limit per file in bytes (`-C` × 1,000,000).
    pub fn max_file_bytes(&self) -> Option<u64> {
        self.max_file_bytes
    }

    /// The rotation interval (`-G`).
    pub fn interval(&self) -> Option<Duration> {
        self.interval
    }

    /// The ring size (`-W`).
    pub fn max_files(&self) -> Option<u32> {
        self.max_files
    }

    /// Whether files are ever rotated.
    pub fn rotates(&self) -> bool {
        self.max_file_bytes.is_some() || self.interval.is_some()
    }

    /// The most bytes the capture's files can take on disk together, when bounded (`-C` and
    /// `-W`): N × C. (A file exceeds C only if its header and a single packet do.)
    pub fn disk_bound(&self) -> Option<u64> {
        Some(
            self.max_file_bytes?
                .saturating_mul(u64::from(self.max_files?)),
        )
    }

    /// Reject zero sizes, zero intervals, and `-W` without rotation.
    pub fn validate(&self) -> Result<(), CaptureError> {
        if self.max_file_bytes == Some(0) {
            return Err(invalid("the file size limit (-C) must be positive"));
        }
        if self.interval.is_some_and(|d| d.is_zero()) {
            return Err(invalid("the rotation interval (-G) must be positive"));
        }
        if self.max_files == Some(0) {
            return Err(invalid("the number of files (-W) must be at least 1"));
        }
        if self.max_files.is_some() && !self.rotates() {
            return Err(invalid(
                "-W needs -C or -G: without rotation there is only one file",
            ));
        }
        Ok(())
    }

    /// One line describing the effective policy for the capture path `path`, to print at
    /// start, e.g. `rotate every 60 s or when a file would exceed 100 MB, whichever comes
    /// first; keep the newest 10 files as a ring /tmp/x.pcapng0 .. /tmp/x.pcapng9; at most
    /// 1000 MB on disk`.
    pub fn describe(&self, path: &Path) -> String {
        let shown = path.display();
        let size = self.max_file_bytes.map(format_bytes);
        let every = self.interval.map(format_duration);
        let trigger = match (&every, &size) {
            (None, None) => return format!("no rotation: one file {shown}"),
            (None, Some(s)) => format!("rotate when a file would exceed {s}"),
            (Some(g), None) => format!("rotate every {g}"),
            (Some(g), Some(s)) => {
                format!("rotate every {g} or when a file would exceed {s}, whichever comes first")
            }
        };
        let namer = FileNamer::new(path, self, NameTimeZone::Local);
        let naming = match (namer.time_names, namer.numbered, self.max_files) {
            (false, _, Some(1)) => {
                format!("keep only the newest file, {shown}, replaced at each rotation")
            }
            (false, _, Some(n)) => {
                let first = namer.numbered_name(path.as_os_str().as_bytes(), 0);
                let last = namer.numbered_name(path.as_os_str().as_bytes(), u64::from(n) - 1);
                format!(
                    "keep the newest {n} files as a ring {} .. {}",
                    Path::new(&first).display(),
                    Path::new(&last).display()
                )
            }
            (false, _, None) => {
                format!("files {shown}, {shown}1, {shown}2, ... (no limit on their number)")
            }
            (true, numbered, max) => {
                let mut s = format!("files named from the start time of their interval ({shown})");
                if numbered {
                    match max {
                        Some(n) if n > 1 => s.push_str(&format!(
                            " plus a counter 0 .. {} for size rotations within an interval",
                            n - 1
                        )),
                        Some(_) => {}
                        None => s.push_str(
                            " plus a counter 1, 2, ... for size rotations within an interval",
                        ),
                    }
                }
                match max {
                    Some(n) => s.push_str(&format!(", keep the newest {n} (older ones deleted)")),
                    None => s.push_str(", no limit on their number"),
                }
                s
            }
        };
        let mut out = format!("{trigger}; {naming}");
        if let Some(bound) = self.disk_bound() {
            out.push_str(&format!("; at most {} on disk", format_bytes(bound)));
        }
        out
    }
}

fn invalid(msg: &str) -> CaptureError {
    CaptureError::InvalidConfig(msg.to_string())
}

fn format_bytes(b: u64) -> String {
    if b >= MB && b.is_multiple_of(MB) {
        format!("{} MB", b / MB)
    } else {
        format!("{b} bytes")
    }
}

/// Seconds first, as `-G` counts them (a common mix-up is reading `-G 60` as minutes).
fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    if d.subsec_nanos() != 0 {
        format!("{} s", d.as_secs_f64())
    } else if s >= 3600 && s.is_multiple_of(3600) {
        format!("{s} s ({} h)", s / 3600)
    } else if s >= 120 && s.is_multiple_of(60) {
        format!("{s} s ({} min)", s / 60)
    } else {
        format!("{s} s")
    }
}

/// Which clock strftime conversions in file names use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NameTimeZone {
    /// The local time zone (`TZ`, `/etc/localtime`), as tcpdump.
    #[default]
    Local,
    /// UTC.
    Utc,
}

/// Broken-down time for file names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Civil {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    min: u32,
    sec: u32,
    /// Day of the year, 1-366.
    yday: u32,
    /// Seconds since the epoch (for `%s`).
    epoch: i64,
}

fn civil_utc(epoch: i64) -> Civil {
    let days = epoch.div_euclid(86_400);
    let rem = epoch.rem_euclid(86_400) as u32;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    const CUM: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = CUM[month as usize - 1] + day + u32::from(leap && month > 2);
    Civil {
        year,
        month,
        day,
        hour: rem / 3600,
        min: rem % 3600 / 60,
        sec: rem % 60,
        yday,
        epoch,
    }
}

fn civil_local(epoch: i64) -> Result<Civil, CaptureError> {
    let t =
        libc::time_t::try_from(epoch).map_err(|_| invalid("time out of range for a file name"))?;
    // SAFETY: `tm` is plain old data; localtime_r writes it and only reads `t`.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::localtime_r(&t, &mut tm) };
    if r.is_null() {
        return Err(invalid(
            "cannot convert the time to local time for a file name",
        ));
    }
    Ok(Civil {
        year: i64::from(tm.tm_year) + 1900,
        month: (tm.tm_mon + 1) as u32,
        day: tm.tm_mday as u32,
        hour: tm.tm_hour as u32,
        min: tm.tm_min as u32,
        sec: tm.tm_sec as u32,
        yday: (tm.tm_yday + 1) as u32,
        epoch,
    })
}

const CONVERSIONS: &str = "%Y %m %d %H %M %S %y %j %s %F %T %%";

/// Whether `template` has a strftime conversion other than `%%`; errors on unsupported ones.
pub(crate) fn has_time_conversion(template: &[u8]) -> Result<bool, CaptureError> {
    let mut any = false;
    let mut i = 0;
    while i < template.len() {
        if template[i] == b'%' {
            match template.get(i + 1) {
                Some(b'%') => {}
                Some(c) if b"YmdHMSyjsFT".contains(c) => any = true,
                Some(c) => {
                    return Err(invalid(&format!(
                        "unsupported time conversion %{} in the capture file name (supported: {CONVERSIONS})",
                        char::from(*c)
                    )))
                }
                None => {
                    return Err(invalid(&format!(
                        "the capture file name ends with a lone %; write %% for a literal % (conversions: {CONVERSIONS})"
                    )))
                }
            }
            i += 2;
        } else {
            i += 1;
        }
    }
    Ok(any)
}

/// Expand the supported strftime conversions of `template` at `t_ns`.
pub(crate) fn strftime(
    template: &[u8],
    t_ns: u64,
    tz: NameTimeZone,
) -> Result<Vec<u8>, CaptureError> {
    has_time_conversion(template)?;
    let epoch = (t_ns / 1_000_000_000) as i64;
    let c = match tz {
        NameTimeZone::Utc => civil_utc(epoch),
        NameTimeZone::Local => civil_local(epoch)?,
    };
    let mut out = Vec::with_capacity(template.len() + 16);
    let mut i = 0;
    while i < template.len() {
        if template[i] != b'%' {
            out.push(template[i]);
            i += 1;
            continue;
        }
        let s = match template[i + 1] {
            b'%' => "%".to_string(),
            b'Y' => format!("{:04}", c.year),
            b'm' => format!("{:02}", c.month),
            b'd' => format!("{:02}", c.day),
            b'H' => format!("{:02}", c.hour),
            b'M' => format!("{:02}", c.min),
            b'S' => format!("{:02}", c.sec),
            b'y' => format!("{:02}", c.year.rem_euclid(100)),
            b'j' => format!("{:03}", c.yday),
            b's' => c.epoch.to_string(),
            b'F' => format!("{:04}-{:02}-{:02}", c.year, c.month, c.day),
            b'T' => format!("{:02}:{:02}:{:02}", c.hour, c.min, c.sec),
            _ => unreachable!("checked by has_time_conversion"),
        };
        out.extend_from_slice(s.as_bytes());
        i += 2;
    }
    Ok(out)
}

/// Digits of `n - 1`, tcpdump's `getWflagChars`: the zero-padding width of ring suffixes.
fn ring_width(n: u32) -> usize {
    let mut x = n.saturating_sub(1);
    let mut w = 0;
    while x > 0 {
        w += 1;
        x /= 10;
    }
    w
}

/// Produces the name of each new file; see the module docs for the rules.
#[derive(Debug)]
pub(crate) struct FileNamer {
    template: Vec<u8>,
    tz: NameTimeZone,
    /// `-G` is set and the template has a time conversion.
    time_names: bool,
    /// Whether names carry a counter (see module docs).
    numbered: bool,
    ring: Option<u32>,
    /// Files named so far per stem.
    counters: HashMap<Vec<u8>, u64>,
}

impl FileNamer {
    /// Build the namer. Call [`FileNamer::check`] first to reject bad templates.
    pub(crate) fn new(path: &Path, policy: &RotationPolicy, tz: NameTimeZone) -> Self {
        let template = path.as_os_str().as_bytes().to_vec();
        let time_names =
            policy.interval.is_some() && has_time_conversion(&template).unwrap_or(false);
        FileNamer {
            template,
            tz,
            time_names,
            numbered: policy.max_file_bytes.is_some() || !time_names,
            ring: policy.max_files,
            counters: HashMap::new(),
        }
    }

    /// Validate the template for the policy (only `-G` expands conversions).
    pub(crate) fn check(path: &Path, policy: &RotationPolicy) -> Result<(), CaptureError> {
        if path.as_os_str().is_empty() {
            return Err(invalid("the capture file name is empty"));
        }
        if policy.interval.is_some() {
            has_time_conversion(path.as_os_str().as_bytes())?;
        }
        Ok(())
    }

    /// The stem for a file whose interval starts at `t_ns`.
    pub(crate) fn stem(&self, t_ns: u64) -> Result<Vec<u8>, CaptureError> {
        if self.time_names {
            strftime(&self.template, t_ns, self.tz)
        } else {
            Ok(self.template.clone())
        }
    }

    fn numbered_name(&self, stem: &[u8], seq: u64) -> OsString {
        let mut name = stem.to_vec();
        let suffix = match self.ring {
            Some(1) => String::new(),
            Some(n) if self.numbered => {
                format!("{:0width$}", seq % u64::from(n), width = ring_width(n))
            }
            _ if seq == 0 => String::new(),
            _ => seq.to_string(),
        };
        name.extend_from_slice(suffix.as_bytes());
        OsString::from_vec(name)
    }

    /// The next file's path and stem, for an interval starting at `t_ns`.
    pub(crate) fn next(&mut self, t_ns: u64) -> Result<(PathBuf, Vec<u8>), CaptureError> {
        let stem = self.stem(t_ns)?;
        let seq = self.counters.entry(stem.clone()).or_insert(0);
        let n = *seq;
        *seq += 1;
        Ok((PathBuf::from(self.numbered_name(&stem, n)), stem))
    }

    /// Undo the last [`next`](Self::next) for `stem` (its file was discarded unused).
    pub(crate) fn rollback(&mut self, stem: &[u8]) {
        if let Some(n) = self.counters.get_mut(stem) {
            *n = n.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000_000_000_000; // 2023-11-14 22:13:20 UTC

    fn names(path: &str, policy: RotationPolicy, times: &[u64]) -> Vec<String> {
        let mut n = FileNamer::new(Path::new(path), &policy, NameTimeZone::Utc);
        times
            .iter()
            .map(|t| n.next(*t).unwrap().0.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn size_rotation_names_follow_tcpdump() {
        let c = RotationPolicy::none().with_max_file_bytes(1000);
        assert_eq!(
            names("/t/x.pcap", c, &[T0; 4]),
            ["/t/x.pcap", "/t/x.pcap1", "/t/x.pcap2", "/t/x.pcap3"]
        );
        let ring = c.with_max_files(3);
        assert_eq!(
            names("/t/x.pcap", ring, &[T0; 5]),
            [
                "/t/x.pcap0",
                "/t/x.pcap1",
                "/t/x.pcap2",
                "/t/x.pcap0",
                "/t/x.pcap1"
            ]
        );
        let ring10 = c.with_max_files(10);
        let v = names("x", ring10, &[T0; 11]);
        assert_eq!(v[0], "x0");
        assert_eq!(v[9], "x9");
        assert_eq!(v[10], "x0");
        let ring11 = c.with_max_files(11);
        let v = names("x", ring11, &[T0; 12]);
        assert_eq!(
            (v[0].as_str(), v[9].as_str(), v[10].as_str(), v[11].as_str()),
            ("x00", "x09", "x10", "x00")
        );
        let ring100 = c.with_max_files(100);
        assert_eq!(names("x", ring100, &[T0; 1]), ["x00"]);
        let ring101 = c.with_max_files(101);
        assert_eq!(names("x", ring101, &[T0; 1]), ["x000"]);
        let ring1 = c.with_max_files(1);
        assert_eq!(names("x", ring1, &[T0; 3]), ["x", "x", "x"]);
    }

    #[test]
    fn time_rotation_names() {
        let g = RotationPolicy::none().with_interval(Duration::from_secs(60));
        let s = 1_000_000_000;
        // Time pattern, no -C: no suffix.
        assert_eq!(
            names("/t/cap-%Y%m%d-%H%M%S.pcap", g, &[T0, T0 + 60 * s]),
            ["/t/cap-20231114-221320.pcap", "/t/cap-20231114-221420.pcap"]
        );
        // A pattern coarser than the interval: later files get a counter instead of
        // overwriting the first.
        assert_eq!(
            names("c-%H", g, &[T0, T0 + 60 * s, T0 + 120 * s]),
            ["c-22", "c-221", "c-222"]
        );
        // -G without a pattern: numbered like -C (tcpdump would overwrite one file).
        assert_eq!(
            names("c.pcap", g, &[T0, T0 + 60 * s]),
            ["c.pcap", "c.pcap1"]
        );
        assert_eq!(
            names("c.pcap", g.with_max_files(2), &[T0, T0, T0]),
            ["c.pcap0", "c.pcap1", "c.pcap0"]
        );
        // -G with a pattern and -W: names from the time, no suffix.
        assert_eq!(
            names("c-%s", g.with_max_files(5), &[T0, T0 + 60 * s]),
            ["c-1700000000", "c-1700000060"]
        );
        // -G and -C with a pattern: the counter restarts in each interval (tcpdump).
        let gc = g.with_max_file_bytes(1000);
        assert_eq!(
            names("c-%M.", gc, &[T0, T0, T0 + 60 * s]),
            ["c-13.", "c-13.1", "c-14."]
        );
        assert_eq!(
            names("c-%M.", gc.with_max_files(3), &[T0, T0, T0 + 60 * s]),
            ["c-13.0", "c-13.1", "c-14.0"]
        );
        // Without -G, % is literal.
        let c = RotationPolicy::none().with_max_file_bytes(1000);
        assert_eq!(names("c-%H", c, &[T0, T0]), ["c-%H", "c-%H1"]);
    }

    #[test]
    fn rollback_reuses_the_name() {
        let p = RotationPolicy::none()
            .with_max_file_bytes(10)
            .with_max_files(4);
        let mut n = FileNamer::new(Path::new("f"), &p, NameTimeZone::Utc);
        assert_eq!(n.next(T0).unwrap().0, PathBuf::from("f0"));
        let (p1, stem) = n.next(T0).unwrap();
        assert_eq!(p1, PathBuf::from("f1"));
        n.rollback(&stem);
        assert_eq!(n.next(T0).unwrap().0, PathBuf::from("f1"));
    }

    #[test]
    fn strftime_conversions() {
        let t = T0 + 123_456_789;
        let got = strftime(
            b"%Y-%m-%d %H:%M:%S %y %j %s %F %T 100%%",
            t,
            NameTimeZone::Utc,
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(got).unwrap(),
            "2023-11-14 22:13:20 23 318 1700000000 2023-11-14 22:13:20 100%"
        );
        // Leap day and the first day of a year.
        let leap = 951_782_400u64 * 1_000_000_000; // 2000-02-29 00:00:00
        assert_eq!(
            strftime(b"%F %j", leap, NameTimeZone::Utc).unwrap(),
            b"2000-02-29 060"
        );
        let dec31 = 978_220_800u64 * 1_000_000_000; // 2000-12-31
        assert_eq!(
            strftime(b"%F %j", dec31, NameTimeZone::Utc).unwrap(),
            b"2000-12-31 366"
        );
        assert_eq!(
            strftime(b"%F %T", 0, NameTimeZone::Utc).unwrap(),
            b"1970-01-01 00:00:00"
        );
        assert!(strftime(b"%a", T0, NameTimeZone::Utc).is_err());
        assert!(strftime(b"x%", T0, NameTimeZone::Utc).is_err());
        assert!(!has_time_conversion(b"a%%b").unwrap());
        assert!(has_time_conversion(b"a%Hb").unwrap());
    }

    #[test]
    fn civil_utc_matches_a_reference_walk() {
        // Walk day by day from 1970 and compare with a simple calendar.
        let (mut y, mut m, mut d, mut yd) = (1970i64, 1u32, 1u32, 1u32);
        for day in 0..(200 * 366) {
            let c = civil_utc(day * 86_400 + 3661);
            assert_eq!(
                (c.year, c.month, c.day, c.yday, c.hour, c.min, c.sec),
                (y, m, d, yd, 1, 1, 1)
            );
            let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
            let mdays = [
                31,
                if leap { 29 } else { 28 },
                31,
                30,
                31,
                30,
                31,
                31,
                30,
                31,
                30,
                31,
            ][m as usize - 1];
            d += 1;
            yd += 1;
            if d > mdays {
                d = 1;
                m += 1;
                if m > 12 {
                    m = 1;
                    y += 1;
                    yd = 1;
                }
            }
        }
    }

    #[test]
    fn local_time_agrees_with_libc_offset() {
        // Whatever the machine's zone, local = UTC + the zone's offset at that instant.
        let t = T0 / 1_000_000_000;
        let local = civil_local(t as i64).unwrap();
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        let tt = t as libc::time_t;
        unsafe { libc::localtime_r(&tt, &mut tm) };
        let shifted = civil_utc(t as i64 + tm.tm_gmtoff);
        assert_eq!(
            (
                local.year,
                local.month,
                local.day,
                local.hour,
                local.min,
                local.sec
            ),
            (
                shifted.year,
                shifted.month,
                shifted.day,
                shifted.hour,
                shifted.min,
                shifted.sec
            )
        );
    }

    #[test]
    fn flags_validation() {
        assert_eq!(
            RotationPolicy::from_flags(Some(100), None, Some(10))
                .unwrap()
                .max_file_bytes(),
            Some(100_000_000)
        );
        assert!(RotationPolicy::from_flags(Some(0), None, None).is_err());
        assert!(RotationPolicy::from_flags(None, Some(Duration::ZERO), None).is_err());
        assert!(RotationPolicy::from_flags(Some(1), None, Some(0)).is_err());
        let e = RotationPolicy::from_flags(None, None, Some(3)).unwrap_err();
        assert!(e.to_string().contains("-W needs -C or -G"), "{e}");
        assert!(RotationPolicy::from_flags(None, Some(Duration::from_secs(60)), Some(3)).is_ok());
        assert!(RotationPolicy::from_flags(Some(u64::MAX), None, None).is_err());
        assert_eq!(
            RotationPolicy::from_flags(Some(100), None, Some(10))
                .unwrap()
                .disk_bound(),
            Some(1_000_000_000)
        );
        assert_eq!(
            RotationPolicy::from_flags(Some(100), None, None)
                .unwrap()
                .disk_bound(),
            None
        );
        assert!(FileNamer::check(
            Path::new("x-%Q"),
            &RotationPolicy::none().with_interval(Duration::from_secs(1))
        )
        .is_err());
        // Without -G the name is not a pattern.
        assert!(FileNamer::check(Path::new("x-%Q"), &RotationPolicy::none()).is_ok());
        assert!(FileNamer::check(Path::new(""), &RotationPolicy::none()).is_err());
    }

    #[test]
    fn descriptions() {
        let p = Path::new("/tmp/x.pcapng");
        assert_eq!(
            RotationPolicy::none().describe(p),
            "no rotation: one file /tmp/x.pcapng"
        );
        let cgw =
            RotationPolicy::from_flags(Some(100), Some(Duration::from_secs(60)), Some(10)).unwrap();
        assert_eq!(
            cgw.describe(p),
            "rotate every 60 s or when a file would exceed 100 MB, whichever comes first; \
             keep the newest 10 files as a ring /tmp/x.pcapng0 .. /tmp/x.pcapng9; at most 1000 MB on disk"
        );
        let c = RotationPolicy::from_flags(Some(5), None, None).unwrap();
        assert_eq!(
            c.describe(p),
            "rotate when a file would exceed 5 MB; files /tmp/x.pcapng, /tmp/x.pcapng1, \
             /tmp/x.pcapng2, ... (no limit on their number)"
        );
        let g = RotationPolicy::from_flags(None, Some(Duration::from_secs(90)), Some(24)).unwrap();
        assert_eq!(
            g.describe(Path::new("/d/cap-%H%M.pcapng")),
            "rotate every 90 s; files named from the start time of their interval \
             (/d/cap-%H%M.pcapng), keep the newest 24 (older ones deleted)"
        );
        let gc =
            RotationPolicy::from_flags(Some(1), Some(Duration::from_secs(3600)), Some(3)).unwrap();
        assert_eq!(
            gc.describe(Path::new("/d/cap-%H.pcap")),
            "rotate every 3600 s (1 h) or when a file would exceed 1 MB, whichever comes first; files named \
             from the start time of their interval (/d/cap-%H.pcap) plus a counter 0 .. 2 for size \
             rotations within an interval, keep the newest 3 (older ones deleted); at most 3 MB on disk"
        );
        let w1 = RotationPolicy::none()
            .with_max_file_bytes(1500)
            .with_max_files(1);
        assert_eq!(
            w1.describe(p),
            "rotate when a file would exceed 1500 bytes; keep only the newest file, /tmp/x.pcapng, \
             replaced at each rotation; at most 1500 bytes on disk"
        );
    }
}
