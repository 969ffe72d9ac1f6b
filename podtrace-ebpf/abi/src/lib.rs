//! The ABI between podtrace's eBPF programs and its userspace: map keys/values and the event
//! record, all `#[repr(C)]` and free of padding holes the verifier or userspace could trip on.
//!
//! Byte order: IPv4 addresses are kept exactly as they are on the wire (network order, read as
//! a native `u32`), so `u32::from_ne_bytes(ip.octets())` in userspace gives the value to store.
//! Ports are host order.
#![no_std]

/// Where flannel's VXLAN carries pod traffic (Linux's default is 4789; flannel uses 8472).
pub const DEFAULT_VXLAN_PORT: u16 = 8472;

/// Event kinds.
pub const KIND_TC: u8 = 1;
pub const KIND_DROP: u8 = 2;
pub const KIND_FIB: u8 = 3;
pub const KIND_XMIT: u8 = 4;

/// tc hook direction.
pub const DIR_INGRESS: u8 = 0;
pub const DIR_EGRESS: u8 = 1;

/// `Filter::flags`: the filter is configured (without it every program stays silent).
pub const FILTER_ENABLED: u8 = 1;
/// `Filter::flags`: emit an event for every matched packet (not only count it).
pub const FILTER_EMIT: u8 = 2;
/// `Filter::flags`: tc events carry the packet's bytes (up to `Filter::snaplen`).
pub const FILTER_CAPTURE: u8 = 4;
/// `Filter::flags`: also trace the translated forms of the conversation that `NAT_FLOWS`
/// lists (a Service's backends, the node's masquerade addresses).
pub const FILTER_NAT: u8 = 8;
/// `Filter::flags` (with `FILTER_CAPTURE`): a packet whose whole record finds no room in the
/// ring buffer is cut to its first [`CUT_BYTES`] (its headers, VXLAN's inner ones included)
/// rather than lost, and counted in `CNT_CUT`.
pub const FILTER_CUT: u8 = 16;

/// What a packet cut for want of room keeps (see `FILTER_CUT`).
pub const CUT_BYTES: u32 = 128;

/// VXLAN UDP ports the filter looks inside: `Filter::vxlan_port` and `Filter::vxlan_more`.
pub const MAX_VXLAN_PORTS: usize = 8;

/// Entries of `NAT_FLOWS`.
pub const MAX_NAT_FLOWS: u32 = 1024;

/// The most packet bytes one event carries (a GSO packet is cut here, its length kept).
pub const MAX_SNAPLEN: u32 = 65536;

/// `Counters` slots (a per-CPU array of u64).
/// Packets the hop probes looked at: counted in count-only sessions (`FILTER_EMIT` off)
/// only, to keep a map update off every packet of the machine otherwise.
pub const CNT_TC_SEEN: u32 = 0;
pub const CNT_TC_MATCHED: u32 = 1;
pub const CNT_DROP_MATCHED: u32 = 2;
pub const CNT_FIB_MATCHED: u32 = 3;
pub const CNT_XMIT_MATCHED: u32 = 4;
/// Events that did not fit in the ring buffer (lost before userspace could read them).
pub const CNT_LOST: u32 = 5;
/// Packets cut to `CUT_BYTES` because their whole record found no room (`FILTER_CUT`).
pub const CNT_CUT: u32 = 6;
pub const CNT_SLOTS: u32 = 8;

/// Per-hop packet counters (`HOP_STATS`, per-CPU, keyed by hop id; kept in count-only
/// sessions, `FILTER_EMIT` off: a session with events counts from them).
pub const MAX_HOPS: u32 = 256;

/// What to trace: packets between `addr_a` and `addr_b` (either direction), optionally
/// narrowed to one protocol and one port. Applies to the inner packet of a VXLAN frame.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// The pod's address (network order); 0 matches any.
    pub addr_a: u32,
    /// The peer's address (network order); 0 matches any.
    pub addr_b: u32,
    /// Source or destination port (host order); 0 matches any.
    pub port: u16,
    /// IP protocol number; 0 matches any.
    pub proto: u8,
    /// `FILTER_*` bits.
    pub flags: u8,
    /// UDP destination port of VXLAN on the underlay (host order).
    pub vxlan_port: u16,
    pub _pad: u16,
    /// Packet bytes per event with `FILTER_CAPTURE` (≤ `MAX_SNAPLEN`).
    pub snaplen: u32,
    /// More VXLAN ports (host order; 0: unused), for paths with VXLAN devices on several
    /// ports.
    pub vxlan_more: [u16; MAX_VXLAN_PORTS - 1],
    pub _pad2: u16,
    /// Wake the reader once this many bytes wait in the ring buffer (0: at every event).
    /// Below it events are submitted without a wake-up: the reader polls on a short timer,
    /// and a burst costs one wake-up instead of one per packet.
    pub wake_bytes: u32,
    /// A capture expression's necessary conditions (`PreFilter`), checked on the packet
    /// (the inner one in VXLAN) after the conversation matched; a count of 0 is no condition.
    /// The protocol is one of `x_protos`.
    pub x_nprotos: u8,
    /// The source or destination address is in one of `x_nets`.
    pub x_nnets: u8,
    /// The source or destination port is one of `x_ports`.
    pub x_nports: u8,
    pub _pad3: u8,
    pub x_protos: [u8; MAX_X_PROTOS],
    pub x_nets: [XNet; MAX_X_NETS],
    pub x_ports: [u16; MAX_X_PORTS],
}

/// At most this many protocols, networks and ports of a capture expression are checked in
/// the kernel (an expression with more is checked in userspace only).
pub const MAX_X_PROTOS: usize = 4;
pub const MAX_X_NETS: usize = 4;
pub const MAX_X_PORTS: usize = 8;

/// A network of a capture expression: address and mask, network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XNet {
    pub addr: u32,
    pub mask: u32,
}

/// `RECENT` key: a source and destination address (network order) the hop probes saw a
/// traced packet between. A route lookup of a forwarded packet carries no protocol or ports,
/// so with a protocol or port in the filter, its lookups are reported only for address pairs
/// whose traced packets were seen (the idle cost of a filter that rejects everything).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AddrPair {
    pub saddr: u32,
    pub daddr: u32,
}

/// A translated form of the traced conversation (`NAT_FLOWS` key): packets from `addr_a` to
/// `addr_b` port `port_b`, and back. `port_b` 0: any port (and ICMP).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NatKey {
    /// Network order.
    pub addr_a: u32,
    pub addr_b: u32,
    /// Host order.
    pub port_b: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// `Event::reason` of a drop on a kernel whose `kfree_skb` reports no reason (before 5.17).
pub const REASON_UNREPORTED: u32 = u32::MAX;

/// Identity of a hop as the tc programs see it: the interface and its network namespace.
/// Namespaces are identified by their inode number (`net->ns.inum`, what `stat` of
/// /proc/PID/ns/net or /run/netns/NAME gives), which every kernel has; the netns cookie needs
/// 5.14 from userspace and is generated lazily before 5.12.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HopKey {
    pub netns_ino: u64,
    pub ifindex: u32,
    pub _pad: u32,
}

/// Kernel structure offsets for the tracing programs, read by userspace from the running
/// kernel's BTF (so one object works across kernel builds without CO-RE).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub skb_head: u32,
    pub skb_len: u32,
    pub skb_network_header: u32,
    pub skb_dev: u32,
    pub dev_ifindex: u32,
    pub dev_nd_net: u32,
    /// `struct net.ns.inum`: the namespace's inode number.
    pub net_ns_inum: u32,
    pub flowi4_saddr: u32,
    pub flowi4_daddr: u32,
    pub flowi4_proto: u32,
    /// `flowi4.uli`: for TCP/UDP, the destination then the source port (network order).
    pub flowi4_ports: u32,
    pub nhc_dev: u32,
    pub nhc_gw: u32,
    /// kretprobe on `fib_table_lookup`: `struct fib_table.tb_id`, `struct fib_result.nhc`.
    pub fib_table_id: u32,
    pub fib_result_nhc: u32,
    /// `SKB_NOT_DROPPED_YET` and `SKB_CONSUMED` on this kernel (not drops), or
    /// `REASON_UNREPORTED` when it has no such value.
    pub reason_not_dropped: u32,
    pub reason_consumed: u32,
    /// Non-zero once userspace filled the offsets in.
    pub valid: u32,
    pub _pad: u32,
}

/// Nested `fib_table_lookup` calls one CPU can have in flight (a softirq lookup interrupting
/// a process-context one): the kprobe pushes its arguments on a per-CPU stack of this depth
/// (`FIB_STASH`, one frame per entry, `FIB_DEPTH` counting), the kretprobe pops them.
pub const FIB_STACK_DEPTH: u32 = 8;

/// The packet a probe saw, reduced to what correlation needs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowInfo {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// 1 when the packet was found inside VXLAN (then `outer_*` are the VTEPs).
    pub encap: u8,
    /// IPv4 identification field.
    pub ip_id: u16,
    /// IPv4 total length (of the inner packet when encapsulated).
    pub ip_len: u16,
    /// TCP flags, or the ICMP type.
    pub flags: u8,
    pub _pad: u8,
    /// TCP sequence number, or ICMP (id << 16 | sequence).
    pub seq: u32,
    pub outer_saddr: u32,
    pub outer_daddr: u32,
    /// ICMP: the code.
    pub icmp_code: u8,
    /// ICMP errors (destination unreachable, time exceeded, parameter problem) about the
    /// traced conversation: the protocol, addresses and ports of the packet the error quotes
    /// (an ICMP echo's identifier as both ports; 0 otherwise).
    pub err_proto: u8,
    pub _pad2: u16,
    pub err_saddr: u32,
    pub err_daddr: u32,
    pub err_sport: u16,
    pub err_dport: u16,
}

/// One record in the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_ns()`: monotonic, the same clock in every namespace.
    pub ts_ns: u64,
    /// The namespace's inode number (see [`HopKey`]); 0 when unknown.
    pub netns_ino: u64,
    pub kind: u8,
    pub dir: u8,
    pub _pad: u16,
    /// The hop id userspace gave this (netns, ifindex), or `u32::MAX` when unknown.
    pub hop_id: u32,
    pub ifindex: u32,
    /// `skb->len` at the probe.
    pub skb_len: u32,
    /// Packet bytes that follow this header in the ring buffer record (capture mode).
    pub cap_len: u32,
    /// Drop reason (`enum skb_drop_reason`, or `REASON_UNREPORTED`) for drops; FIB lookup
    /// error for FIB events.
    pub reason: u32,
    /// FIB: table id; xmit: return code.
    pub aux: u32,
    /// FIB: output ifindex.
    pub aux2: u32,
    /// FIB: gateway (network order).
    pub aux3: u32,
    pub _pad2: u32,
    pub flow: FlowInfo,
    pub _pad3: u32,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data, `#[repr(C)]`, every bit pattern is valid.
    unsafe impl aya::Pod for super::Filter {}
    unsafe impl aya::Pod for super::HopKey {}
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::NatKey {}
    unsafe impl aya::Pod for super::AddrPair {}
}
