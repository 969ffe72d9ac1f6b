//! What the engine reports: typed, decoded events (a hop saw a packet; the kernel dropped one,
//! looked up a route for one, transmitted one; events were lost) and counters. Places are
//! plan references (hop ids, namespace indexes, ifindexes), never names: naming is the
//! consumer's business, through the [`Plan`](super::plan::Plan).
use std::{net::Ipv4Addr, sync::Arc};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::plan::Hook;
pub use crate::probes::Counters;

/// The headers of a packet, as the probes read them (the inner packet of a VXLAN frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Flow {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// IP protocol number.
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    /// IPv4 identification.
    pub ip_id: u16,
    /// IPv4 total length.
    pub ip_len: u16,
    /// TCP flags, or the ICMP type.
    pub flags: u8,
    /// TCP sequence number, or ICMP (id << 16 | sequence).
    pub seq: u32,
    /// The VXLAN tunnel it was carried in: (outer source, outer destination).
    pub outer: Option<(Ipv4Addr, Ipv4Addr)>,
    /// ICMP: the code.
    #[serde(default)]
    pub icmp_code: u8,
    /// An ICMP error: the packet it is about, as the error quotes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub about: Option<Quoted>,
}

/// The header an ICMP error quotes: the packet the error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Quoted {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
}

impl Flow {
    /// Whether this is an ICMP error (destination unreachable, time exceeded, parameter
    /// problem).
    pub fn is_icmp_error(&self) -> bool {
        self.proto == 1 && matches!(self.flags, 3 | 11 | 12)
    }
}

impl Default for Flow {
    fn default() -> Self {
        Self {
            src: Ipv4Addr::UNSPECIFIED,
            dst: Ipv4Addr::UNSPECIFIED,
            proto: 0,
            sport: 0,
            dport: 0,
            ip_id: 0,
            ip_len: 0,
            flags: 0,
            seq: 0,
            outer: None,
            icmp_code: 0,
            about: None,
        }
    }
}

fn ip(raw: u32) -> Ipv4Addr {
    Ipv4Addr::from(raw.to_ne_bytes())
}

impl From<&podtrace_abi::FlowInfo> for Flow {
    fn from(f: &podtrace_abi::FlowInfo) -> Self {
        Self {
            src: ip(f.saddr),
            dst: ip(f.daddr),
            proto: f.proto,
            sport: f.sport,
            dport: f.dport,
            ip_id: f.ip_id,
            ip_len: f.ip_len,
            flags: f.flags,
            seq: f.seq,
            outer: (f.encap != 0).then(|| (ip(f.outer_saddr), ip(f.outer_daddr))),
            icmp_code: f.icmp_code,
            about: (f.proto == 1 && matches!(f.flags, 3 | 11 | 12) && f.err_proto != 0).then(
                || Quoted {
                    src: ip(f.err_saddr),
                    dst: ip(f.err_daddr),
                    proto: f.err_proto,
                    sport: f.err_sport,
                    dport: f.err_dport,
                },
            ),
        }
    }
}

/// A place in a namespace of the plan: an interface, or the namespace itself (`ifindex` 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Place {
    /// Index in the plan's namespaces.
    pub ns: usize,
    pub ifindex: u32,
}

/// A tc hop probe saw a packet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HopEvent {
    pub ts_ns: u64,
    pub hop: u32,
    /// `Ingress` or `Egress`.
    pub hook: Hook,
    /// `skb->len` at the probe.
    pub len: u32,
    pub flow: Flow,
    /// The packet's first bytes (capture sessions), cut to the snap length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packet: Option<Bytes>,
}

/// The kernel freed a traced packet with a drop reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropEvent {
    pub ts_ns: u64,
    /// Where: the device the packet was on (or its namespace).
    pub at: Place,
    /// The hop, when that device is one.
    pub hop: Option<u32>,
    /// The kernel's name for the reason (`NETFILTER_DROP`), without `SKB_DROP_REASON_`.
    pub reason: Arc<str>,
    pub len: u32,
    pub flow: Flow,
}

/// A FIB (route) lookup for the traced conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FibEvent {
    pub ts_ns: u64,
    /// The namespace whose FIB answered, when the answer names a device. A lookup that found
    /// no route names none (the kernel does not say where it looked): the consumer places it
    /// where the packet was last seen.
    pub ns: Option<usize>,
    /// The table looked up.
    pub table: u32,
    /// The output device's ifindex (in `ns`).
    pub oif: Option<u32>,
    pub gateway: Option<Ipv4Addr>,
    /// 0, or the lookup's error (`-EAGAIN`: this table had no answer, the rules go on;
    /// `-ENETUNREACH`: no route).
    pub err: i32,
    /// Addresses and protocol only (route lookups have no IP id).
    pub flow: Flow,
}

/// A device transmitted a traced packet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct XmitEvent {
    pub ts_ns: u64,
    pub at: Place,
    pub hop: Option<u32>,
    pub flow: Flow,
}

/// One event of the stream. (Externally tagged: internally tagged enums do not survive
/// non-human-readable formats such as the agents' MessagePack with addresses inside.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TraceEvent {
    Hop(HopEvent),
    Drop(DropEvent),
    Fib(FibEvent),
    Xmit(XmitEvent),
    /// The kernel lost events since the last report: `total` lost so far.
    Lost {
        total: u64,
    },
    /// The counters, now and then (about once a second) and once at the end.
    Counters(Counters),
}

impl TraceEvent {
    /// The kernel's timestamp (monotonic clock of the machine that ran the engine).
    pub fn ts_ns(&self) -> Option<u64> {
        match self {
            TraceEvent::Hop(e) => Some(e.ts_ns),
            TraceEvent::Drop(e) => Some(e.ts_ns),
            TraceEvent::Fib(e) => Some(e.ts_ns),
            TraceEvent::Xmit(e) => Some(e.ts_ns),
            TraceEvent::Lost { .. } | TraceEvent::Counters(_) => None,
        }
    }

    /// Packet bytes the event carries (capture sessions' hop events).
    pub fn packet_len(&self) -> usize {
        match self {
            TraceEvent::Hop(HopEvent {
                packet: Some(p), ..
            }) => p.len(),
            _ => 0,
        }
    }
}
