//! The kernel's connection tracking table of a network namespace, read over netlink
//! (ctnetlink: `NETLINK_NETFILTER`, subsystem `NFNL_SUBSYS_CTNETLINK`), as `conntrack -L`
//! and `conntrack -G` do, without the conntrack tool:
//!
//! - [`Conntrack::dump`]: every entry (IPCTNL_MSG_CT_GET with NLM_F_DUMP);
//! - [`Conntrack::get`]: the entry of one original-direction tuple (IPCTNL_MSG_CT_GET);
//! - [`Conntrack::cpu_stats`]: per-CPU counters (invalid, drop, insert_failed, early_drop…;
//!   IPCTNL_MSG_CT_GET_STATS_CPU);
//! - [`Conntrack::table_stats`]: entries and the limit (`nf_conntrack_count` and
//!   `nf_conntrack_max`; IPCTNL_MSG_CT_GET_STATS).
//!
//! Each entry has both tuples: the original (as the client sent it) and the reply (as the
//! server answers), so a Service connection shows its DNAT (`reply.src` is the backend) and
//! a masqueraded one its SNAT (`reply.dst` is the node's address); plus status bits
//! (SEEN_REPLY, ASSURED, SRC_NAT, DST_NAT…), mark and zone. [`nlattr`] and [`msg`] are total
//! parsers: malformed bytes give errors or empty fields, never a panic.
//!
//! A netlink socket belongs to the namespace it was opened in: [`Conntrack::open`] opens it
//! on a thread inside the namespace, then it can be used from anywhere.
pub mod msg;
pub mod nlattr;

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use anyhow::{bail, Context as _, Result};

pub use msg::{CpuStats, Entry, Status, TableStats, Tuple};

const NETLINK_NETFILTER: libc::c_int = 12;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_GET_STATS_CPU: u16 = 4;
const IPCTNL_MSG_CT_GET_STATS: u16 = 5;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
/// A dump was interrupted by a change of the table (its content may be inconsistent).
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
const AF_INET: u8 = libc::AF_INET as u8;

/// One netlink message: header fields and payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NlMsg<'a> {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    pub pid: u32,
    pub payload: &'a [u8],
}

/// Splits a datagram into netlink messages. Total: stops at the first malformed header and
/// returns what came before with the error.
pub fn split_messages(buf: &[u8]) -> (Vec<NlMsg<'_>>, Option<String>) {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < buf.len() {
        let rest = &buf[pos..];
        let Some(h) = rest.get(..NLMSG_HDRLEN) else {
            return (out, Some(format!("truncated netlink header at byte {pos}")));
        };
        let len = u32::from_ne_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let Some(payload) = rest.get(NLMSG_HDRLEN..len).filter(|_| len >= NLMSG_HDRLEN) else {
            return (
                out,
                Some(format!("netlink message at byte {pos} claims {len} bytes")),
            );
        };
        out.push(NlMsg {
            kind: u16::from_ne_bytes([h[4], h[5]]),
            flags: u16::from_ne_bytes([h[6], h[7]]),
            seq: u32::from_ne_bytes([h[8], h[9], h[10], h[11]]),
            pid: u32::from_ne_bytes([h[12], h[13], h[14], h[15]]),
            payload,
        });
        pos = pos.saturating_add(nlattr::align(len));
    }
    (out, None)
}

/// The nfgenmsg header of a netfilter message: family, version, res_id (big-endian).
fn nfgen(payload: &[u8]) -> Option<(u8, u16, &[u8])> {
    let h = payload.get(..NFGENMSG_LEN)?;
    Some((
        h[0],
        u16::from_be_bytes([h[2], h[3]]),
        &payload[NFGENMSG_LEN..],
    ))
}

/// Builds a ctnetlink request.
fn request(msg: u16, flags: u16, seq: u32, family: u8, attrs: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDRLEN + NFGENMSG_LEN + attrs.len();
    let mut b = Vec::with_capacity(len);
    b.extend_from_slice(&(len as u32).to_ne_bytes());
    b.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | msg).to_ne_bytes());
    b.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.extend_from_slice(&[family, 0, 0, 0]);
    b.extend_from_slice(attrs);
    b
}

/// What a dump returned.
#[derive(Debug, Clone, Default)]
pub struct Dump {
    pub entries: Vec<Entry>,
    /// The kernel flagged the dump as interrupted by concurrent changes.
    pub interrupted: bool,
    /// Messages that could not be decoded (with why).
    pub malformed: Vec<String>,
}

/// A ctnetlink socket in one network namespace.
pub struct Conntrack {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Conntrack {
    /// Opens a ctnetlink socket in the namespace at `ns` (`None`: podtrace's own).
    pub fn open(ns: Option<&Path>) -> Result<Self> {
        let fd = crate::netns::run_in(ns, || {
            // SAFETY: plain socket(2); the fd is owned below.
            let raw = unsafe {
                libc::socket(
                    libc::AF_NETLINK,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    NETLINK_NETFILTER,
                )
            };
            if raw < 0 {
                return Err(std::io::Error::last_os_error())
                    .context("opening a NETLINK_NETFILTER socket");
            }
            // SAFETY: raw is a fresh fd we own.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: zeroed sockaddr_nl is valid (pid 0: the kernel assigns one).
            let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
            sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
            // SAFETY: valid fd and sockaddr of the right size.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&sa as *const libc::sockaddr_nl).cast(),
                    std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error()).context("binding the netlink socket");
            }
            Ok(fd)
        })
        .with_context(|| match ns {
            Some(p) => format!("conntrack in {}", p.display()),
            None => "conntrack".to_owned(),
        })?;
        Ok(Self {
            fd,
            seq: 0,
            buf: vec![0u8; 256 * 1024],
        })
    }

    fn send(&mut self, req: &[u8]) -> Result<()> {
        // SAFETY: sockaddr_nl for the kernel (pid 0).
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: valid fd, buffer and address.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                req.as_ptr().cast(),
                req.len(),
                0,
                (&sa as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error()).context("sending a ctnetlink request");
        }
        Ok(())
    }

    /// Receives one datagram into the buffer; returns its length.
    fn recv(&mut self) -> Result<usize> {
        loop {
            // SAFETY: valid fd and buffer; MSG_TRUNC makes the kernel return the real length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    libc::MSG_TRUNC,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e).context("receiving a ctnetlink answer");
            }
            let n = n as usize;
            if n > self.buf.len() {
                bail!("a ctnetlink answer of {n} bytes did not fit the buffer");
            }
            return Ok(n);
        }
    }

    /// Sends a request and hands every answer message to `f` until the dump ends (or, for
    /// a non-dump request, the answer and its ack). Returns whether the kernel flagged an
    /// interrupted dump.
    fn transact(
        &mut self,
        msg: u16,
        flags: u16,
        family: u8,
        attrs: &[u8],
        mut f: impl FnMut(&NlMsg) -> Result<()>,
    ) -> Result<bool> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        self.send(&request(msg, flags | NLM_F_ACK, seq, family, attrs))?;
        let mut interrupted = false;
        loop {
            let n = self.recv()?;
            let data = self.buf[..n].to_vec();
            let (msgs, bad) = split_messages(&data);
            for m in msgs.iter().filter(|m| m.seq == seq) {
                interrupted |= m.flags & NLM_F_DUMP_INTR != 0;
                match m.kind {
                    NLMSG_DONE => return Ok(interrupted),
                    NLMSG_ERROR => {
                        let code = m
                            .payload
                            .get(..4)
                            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                            .unwrap_or(-libc::EPROTO);
                        if code == 0 {
                            // The ack that ends a non-dump request.
                            if !dump {
                                return Ok(interrupted);
                            }
                            continue;
                        }
                        return Err(std::io::Error::from_raw_os_error(-code).into());
                    }
                    _ => f(m)?,
                }
            }
            if let Some(b) = bad {
                bail!("malformed ctnetlink answer: {b}");
            }
        }
    }

    /// Every IPv4 conntrack entry of the namespace.
    pub fn dump(&mut self) -> Result<Dump> {
        let mut d = Dump::default();
        let interrupted = self.transact(IPCTNL_MSG_CT_GET, NLM_F_DUMP, AF_INET, &[], |m| {
            if m.kind & 0xff != IPCTNL_MSG_CT_NEW {
                return Ok(());
            }
            match nfgen(m.payload) {
                Some((family, _, attrs)) => {
                    let e = msg::decode_entry(family, attrs);
                    if let Some(why) = &e.malformed {
                        d.malformed.push(why.clone());
                    }
                    d.entries.push(e);
                }
                None => d
                    .malformed
                    .push("a message without its nfgenmsg header".into()),
            }
            Ok(())
        })?;
        d.interrupted = interrupted;
        Ok(d)
    }

    /// The entry whose original-direction tuple is `orig` (`None`: no such entry).
    pub fn get(&mut self, orig: &Tuple) -> Result<Option<Entry>> {
        let mut w = nlattr::Writer::default();
        msg::encode_tuple(&mut w, msg::CTA_TUPLE_ORIG, orig);
        let family = if orig.src.is_ipv4() {
            AF_INET
        } else {
            libc::AF_INET6 as u8
        };
        let mut found = None;
        let r = self.transact(IPCTNL_MSG_CT_GET, 0, family, &w.buf, |m| {
            if let Some((family, _, attrs)) = nfgen(m.payload) {
                found.get_or_insert(msg::decode_entry(family, attrs));
            }
            Ok(())
        });
        match r {
            Ok(_) => Ok(found),
            Err(e)
                if e.downcast_ref::<std::io::Error>()
                    .and_then(std::io::Error::raw_os_error)
                    == Some(libc::ENOENT) =>
            {
                Ok(None)
            }
            Err(e) => Err(e.context(format!("looking up conntrack entry {orig}"))),
        }
    }

    /// The per-CPU conntrack statistics.
    pub fn cpu_stats(&mut self) -> Result<Vec<CpuStats>> {
        let mut out = Vec::new();
        self.transact(IPCTNL_MSG_CT_GET_STATS_CPU, NLM_F_DUMP, 0, &[], |m| {
            if let Some((_, cpu, attrs)) = nfgen(m.payload) {
                out.push(msg::decode_cpu_stats(cpu, attrs));
            }
            Ok(())
        })
        .context("reading conntrack's per-CPU statistics")?;
        Ok(out)
    }

    /// The number of entries of the namespace and the table's limit.
    pub fn table_stats(&mut self) -> Result<TableStats> {
        let mut out = TableStats::default();
        self.transact(IPCTNL_MSG_CT_GET_STATS, 0, 0, &[], |m| {
            if let Some((_, _, attrs)) = nfgen(m.payload) {
                out = msg::decode_table_stats(attrs);
            }
            Ok(())
        })
        .context("reading conntrack's table statistics")?;
        Ok(out)
    }
}

/// `nf_conntrack_count` and `nf_conntrack_max` of the namespace at `ns`, as its
/// /proc/sys/net/netfilter shows them (`None`: conntrack was never used there, so the
/// files are absent).
pub fn proc_counts(ns: Option<&Path>) -> Result<(Option<u64>, Option<u64>)> {
    crate::netns::run_in(ns, || {
        let read = |k: &str| -> Result<Option<u64>> {
            let p = format!("/proc/sys/net/netfilter/{k}");
            match std::fs::read_to_string(&p) {
                Ok(s) => Ok(s.trim().parse().ok()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e).with_context(|| format!("reading {p}")),
            }
        };
        Ok((read("nf_conntrack_count")?, read("nf_conntrack_max")?))
    })
}

#[cfg(test)]
mod tests;
