//! Packet parsing shared by the tc and the tracing programs: IPv4 + TCP/UDP/ICMP, and the
//! packet inside VXLAN. Reads go through [`Reader`], so the same code serves the tc programs
//! (the frame's headers straight from the skb's linear data, `skb_load_bytes` otherwise) and
//! the tracing ones (`probe_read_kernel`, from `skb->head + network_header`).
//!
//! Every program runs on every packet of its device (the tracing ones on every packet of the
//! machine), so rejecting is the hot path: one read of the IPv4 header (with the EtherType
//! before it in the tc programs) decides for most packets; UDP costs a second read (is it to
//! a VXLAN port?), and VXLAN a look at the packet inside before it is turned away. With `FILTER_NAT` a packet outside the conversation
//! also costs the `NAT_FLOWS` lookups (its translated forms: a Service's backends, masquerade
//! addresses), and an ICMP error a look at the header it quotes (an error about the
//! conversation, sent from another address).
use aya_ebpf::{macros::map, maps::HashMap};
use podtrace_abi::{
    Filter, FlowInfo, NatKey, FILTER_NAT, MAX_NAT_FLOWS, MAX_VXLAN_PORTS, MAX_X_NETS, MAX_X_PORTS,
    MAX_X_PROTOS,
};

/// The translated forms of the traced conversation, filled by userspace (from the Service
/// model before traffic flows, from conntrack as connections appear). Declared here rather
/// than with the other maps: only the packet filter uses it.
#[map]
pub static NAT_FLOWS: HashMap<NatKey, u8> = HashMap::with_max_entries(MAX_NAT_FLOWS, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const VXLAN_HLEN: usize = 8;
const UDP_HLEN: usize = 8;

/// Reads headers header by header: the IPv4 header, then its L4 header when the filter needs
/// it. (Reading both in one go saves a read per packet the filter looks into, but the
/// fallbacks it needs, for short packets and IP options, double the paths the verifier walks,
/// and verifying the programs is most of a session's start.)
pub trait Reader {
    fn load<T: Copy>(&self, offset: usize) -> Option<T>;

    /// A read of the headers every packet costs (a frame's EtherType and IPv4 header, the
    /// first bytes of its L4 header), where a reader may have a cheaper way; [`Reader::load`]
    /// otherwise.
    #[inline(always)]
    fn load_frame<T: Copy>(&self, offset: usize) -> Option<T> {
        self.load(offset)
    }
}

/// The fixed part of an IPv4 header, as on the wire.
#[derive(Clone, Copy)]
#[repr(C)]
struct Ipv4Hdr {
    vihl: u8,
    tos: u8,
    tot_len: [u8; 2],
    id: [u8; 2],
    frag: [u8; 2],
    ttl: u8,
    proto: u8,
    csum: [u8; 2],
    saddr: u32,
    daddr: u32,
}

/// The first 8 bytes of a TCP/UDP/ICMP header.
#[derive(Clone, Copy)]
#[repr(C)]
struct L4Hdr {
    a: [u8; 2],
    b: [u8; 2],
    c: [u8; 4],
}

/// An Ethernet frame from the last 2 bytes of its source address on, to the end of its IPv4
/// header (without options): what the tc programs read first, in one read.
#[derive(Clone, Copy)]
#[repr(C)]
struct EthIp {
    _mac: [u8; 2],
    ethertype: [u8; 2],
    ip: Ipv4Hdr,
}

const _: () = assert!(core::mem::size_of::<EthIp>() == 24 && core::mem::offset_of!(EthIp, ip) == 4);

/// The IPv4 header of a packet; its L4 header is read on demand.
struct Head {
    ip: Ipv4Hdr,
}

impl Head {
    /// Reads the IPv4 header at `l3`.
    #[inline(always)]
    fn load<R: Reader>(r: &R, l3: usize) -> Option<Head> {
        Some(Head { ip: r.load(l3)? })
    }

    /// Where the L4 header of the packet at `l3` starts.
    #[inline(always)]
    fn l4_at(&self, l3: usize) -> usize {
        l3 + ((self.ip.vihl & 0x0f) as usize) * 4
    }

    /// The first 8 bytes of the L4 header of the packet at `l3`.
    #[inline(always)]
    fn l4<R: Reader>(&self, r: &R, l3: usize) -> Option<L4Hdr> {
        r.load_frame(self.l4_at(l3))
    }

    /// The TCP flags of the packet at `l3`.
    #[inline(always)]
    fn tcp_flags<R: Reader>(&self, r: &R, l3: usize) -> Option<u8> {
        r.load(self.l4_at(l3) + 13)
    }
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// Whether the addresses belong to the traced conversation (either direction).
#[inline(always)]
fn addrs_match(f: &Filter, saddr: u32, daddr: u32) -> bool {
    let fwd = (f.addr_a == 0 || saddr == f.addr_a) && (f.addr_b == 0 || daddr == f.addr_b);
    let rev = (f.addr_a == 0 || daddr == f.addr_a) && (f.addr_b == 0 || saddr == f.addr_b);
    fwd || rev
}

#[inline(always)]
fn nat_hit(addr_a: u32, addr_b: u32, port_b: u16, proto: u8) -> bool {
    let key = NatKey {
        addr_a,
        addr_b,
        port_b,
        proto,
        _pad: 0,
    };
    // SAFETY: the value is not read.
    unsafe { NAT_FLOWS.get(&key) }.is_some()
}

/// Whether `saddr:sport → daddr:dport` is a translated form of the conversation (either
/// direction): a `NAT_FLOWS` entry with that port, or with port 0 (any).
#[inline(always)]
pub fn nat_match(f: &Filter, saddr: u32, daddr: u32, proto: u8, sport: u16, dport: u16) -> bool {
    if f.flags & FILTER_NAT == 0 {
        return false;
    }
    if proto != IPPROTO_ICMP
        && (nat_hit(saddr, daddr, dport, proto) || nat_hit(daddr, saddr, sport, proto))
    {
        return true;
    }
    nat_hit(saddr, daddr, 0, proto) || nat_hit(daddr, saddr, 0, proto)
}

/// Whether a route lookup for `saddr → daddr` (`ports`: TCP/UDP source and destination, when
/// the lookup carried them) is for the conversation or one of its translated forms.
#[inline(always)]
pub fn fib_match(f: &Filter, saddr: u32, daddr: u32, proto: u8, ports: Option<(u16, u16)>) -> bool {
    let proto_ok = f.proto == 0 || proto == 0 || proto == f.proto;
    let port_ok = match ports {
        Some((s, d)) => f.port == 0 || s == f.port || d == f.port,
        None => true,
    };
    if addrs_match(f, saddr, daddr) && proto_ok && port_ok {
        return true;
    }
    let (s, d) = ports.unwrap_or((0, 0));
    nat_match(f, saddr, daddr, proto, s, d)
}

/// Whether UDP destination port `port` is one of the path's VXLAN ports.
#[inline(always)]
fn vxlan_port(f: &Filter, port: u16) -> bool {
    if port == 0 {
        return false;
    }
    if port == f.vxlan_port {
        return true;
    }
    let mut i = 0;
    while i < MAX_VXLAN_PORTS - 1 {
        if f.vxlan_more[i] == port {
            return true;
        }
        i += 1;
    }
    false
}

/// Reads the Ethernet frame at `offset` from its EtherType on: `Some` head for IPv4.
#[inline(always)]
fn eth_head<R: Reader>(r: &R, offset: usize) -> Option<Head> {
    // The EtherType and the IPv4 header in one read: a frame too short for both carries no
    // IPv4 packet.
    let e: EthIp = r.load_frame(offset + 10)?;
    if be16(e.ethertype) != ETH_P_IP {
        return None;
    }
    Some(Head { ip: e.ip })
}

/// Parses the Ethernet frame at `offset` (tc programs: offset 0) if it carries a traced packet.
#[inline(always)]
pub fn parse_eth<R: Reader>(r: &R, offset: usize, f: &Filter) -> Option<FlowInfo> {
    let head = eth_head(r, offset)?;
    parse_head(r, offset + ETH_HLEN, &head, f)
}

/// Parses the IPv4 packet at `l3` if it (or, for VXLAN, the packet inside it) belongs to the
/// traced conversation; the inner packet's flow comes with `encap = 1` and the outer
/// addresses.
#[inline(always)]
pub fn parse_ipv4<R: Reader>(r: &R, l3: usize, f: &Filter) -> Option<FlowInfo> {
    let head = Head::load(r, l3)?;
    parse_head(r, l3, &head, f)
}

#[inline(always)]
fn parse_head<R: Reader>(r: &R, l3: usize, head: &Head, f: &Filter) -> Option<FlowInfo> {
    let ip = &head.ip;
    if ip.vihl >> 4 != 4 {
        return None;
    }
    if let Some(flow) = classify(r, l3, head, f) {
        return Some(flow);
    }
    // Not ours on the outside: only VXLAN can still carry ours.
    if ip.proto != IPPROTO_UDP || be16(ip.frag) & 0x1fff != 0 {
        return None;
    }
    let udp = head.l4(r, l3)?;
    if !vxlan_port(f, be16(udp.b)) {
        return None;
    }
    let l4 = head.l4_at(l3);
    let inner_eth = l4 + UDP_HLEN + VXLAN_HLEN;
    let inner = eth_head(r, inner_eth)?;
    if inner.ip.vihl >> 4 != 4 {
        return None;
    }
    let mut flow = classify(r, inner_eth + ETH_HLEN, &inner, f)?;
    flow.encap = 1;
    flow.outer_saddr = ip.saddr;
    flow.outer_daddr = ip.daddr;
    Some(flow)
}

/// The flow of the IPv4 packet at `l3` if it is of the conversation: by its addresses (and
/// the filter's protocol and port), as a translated form of it (`NAT_FLOWS`), or as an ICMP
/// error about it.
#[inline(always)]
fn classify<R: Reader>(r: &R, l3: usize, head: &Head, f: &Filter) -> Option<FlowInfo> {
    let ip = &head.ip;
    if addrs_match(f, ip.saddr, ip.daddr) {
        if let Some(flow) = finish(r, l3, head, f, true) {
            return Some(flow);
        }
    }
    if be16(ip.frag) & 0x1fff != 0 {
        return None;
    }
    if f.flags & FILTER_NAT != 0 {
        let (sport, dport) = match ip.proto {
            IPPROTO_TCP | IPPROTO_UDP => {
                let h = head.l4(r, l3)?;
                (be16(h.a), be16(h.b))
            }
            _ => (0, 0),
        };
        if nat_match(f, ip.saddr, ip.daddr, ip.proto, sport, dport) {
            // The translated form has the backend's port, not the filter's.
            return finish(r, l3, head, f, false);
        }
    }
    if ip.proto != IPPROTO_ICMP {
        return None;
    }
    // An ICMP error whose quoted packet is of the conversation (a REJECT's port
    // unreachable, a router's net unreachable): sent from an address of its own.
    let h = head.l4(r, l3)?;
    let l4 = head.l4_at(l3);
    if !matches!(h.a[0], 3 | 11 | 12) {
        return None;
    }
    let mut q = FlowInfo::default();
    quoted(r, l4 + 8, &mut q)?;
    let ours = addrs_match(f, q.err_saddr, q.err_daddr)
        && (f.proto == 0 || q.err_proto == f.proto)
        && (f.port == 0 || q.err_sport == f.port || q.err_dport == f.port);
    if !ours
        && !nat_match(
            f,
            q.err_saddr,
            q.err_daddr,
            q.err_proto,
            q.err_sport,
            q.err_dport,
        )
    {
        return None;
    }
    finish(r, l3, head, f, false)
}

/// Reads the header an ICMP error quotes (at `q`) into `flow.err_*`.
#[inline(always)]
fn quoted<R: Reader>(r: &R, q: usize, flow: &mut FlowInfo) -> Option<()> {
    let qip: Ipv4Hdr = r.load(q)?;
    if qip.vihl >> 4 != 4 {
        return None;
    }
    flow.err_proto = qip.proto;
    flow.err_saddr = qip.saddr;
    flow.err_daddr = qip.daddr;
    if be16(qip.frag) & 0x1fff == 0 {
        match qip.proto {
            IPPROTO_TCP | IPPROTO_UDP => {
                let qh: L4Hdr = r.load(q + ((qip.vihl & 0x0f) as usize) * 4)?;
                flow.err_sport = be16(qh.a);
                flow.err_dport = be16(qh.b);
            }
            IPPROTO_ICMP => {
                // An echo's identifier, which conntrack and podtrace use as its ports.
                let qh: L4Hdr = r.load(q + ((qip.vihl & 0x0f) as usize) * 4)?;
                let id = u16::from_be_bytes([qh.c[0], qh.c[1]]);
                flow.err_sport = id;
                flow.err_dport = id;
            }
            _ => {}
        }
    }
    Some(())
}

/// The flow of a packet whose addresses matched: protocol and (with `check_port`) port
/// checks, L4 fields. Translated forms and ICMP errors skip the checks (their protocol and
/// port are the translation's, or the error's).
#[inline(always)]
fn finish<R: Reader>(
    r: &R,
    l3: usize,
    head: &Head,
    f: &Filter,
    check_port: bool,
) -> Option<FlowInfo> {
    let ip = &head.ip;
    if check_port && f.proto != 0 && ip.proto != f.proto {
        return None;
    }
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return None;
    }
    let mut flow = FlowInfo {
        ip_len: be16(ip.tot_len),
        ip_id: be16(ip.id),
        proto: ip.proto,
        saddr: ip.saddr,
        daddr: ip.daddr,
        ..FlowInfo::default()
    };
    // Later fragments carry no L4 header.
    if be16(ip.frag) & 0x1fff == 0 {
        match ip.proto {
            IPPROTO_TCP => {
                let h = head.l4(r, l3)?;
                flow.sport = be16(h.a);
                flow.dport = be16(h.b);
                if check_port && f.port != 0 && flow.sport != f.port && flow.dport != f.port {
                    return None;
                }
                flow.seq = u32::from_be_bytes(h.c);
                flow.flags = head.tcp_flags(r, l3)?;
            }
            IPPROTO_UDP => {
                let h = head.l4(r, l3)?;
                flow.sport = be16(h.a);
                flow.dport = be16(h.b);
            }
            IPPROTO_ICMP => {
                let h = head.l4(r, l3)?;
                flow.flags = h.a[0];
                flow.icmp_code = h.a[1];
                flow.seq = u32::from_be_bytes(h.c);
                if matches!(h.a[0], 3 | 11 | 12) {
                    // Best effort: an error too short to quote a header is still one.
                    let _ = quoted(r, l3 + ihl + 8, &mut flow);
                }
            }
            _ => {}
        }
    }
    if check_port && f.port != 0 && flow.sport != f.port && flow.dport != f.port {
        return None;
    }
    Some(flow)
}

/// The capture expression's necessary conditions (`Filter::x_*`): protocol, networks,
/// ports, on the packet the hop probes parsed (the inner one in VXLAN, as userspace's filter
/// sees it). What they cannot decide is left to userspace, which applies the whole
/// expression. Only the hop probes apply it: a drop of the conversation stops a capture
/// (`--stop-on drop`) whatever the expression.
#[inline(always)]
pub fn expression_may_match(f: &Filter, flow: &FlowInfo) -> bool {
    if f.x_nprotos != 0 {
        let mut ok = false;
        let mut i = 0;
        while i < MAX_X_PROTOS {
            if i < f.x_nprotos as usize && f.x_protos[i] == flow.proto {
                ok = true;
            }
            i += 1;
        }
        if !ok {
            return false;
        }
    }
    if f.x_nnets != 0 {
        let mut ok = false;
        let mut i = 0;
        while i < MAX_X_NETS {
            let n = f.x_nets[i];
            if i < f.x_nnets as usize
                && (flow.saddr & n.mask == n.addr || flow.daddr & n.mask == n.addr)
            {
                ok = true;
            }
            i += 1;
        }
        if !ok {
            return false;
        }
    }
    if f.x_nports != 0 {
        if flow.proto != IPPROTO_TCP && flow.proto != IPPROTO_UDP {
            return false;
        }
        let mut ok = false;
        let mut i = 0;
        while i < MAX_X_PORTS {
            if i < f.x_nports as usize && (f.x_ports[i] == flow.sport || f.x_ports[i] == flow.dport)
            {
                ok = true;
            }
            i += 1;
        }
        if !ok {
            return false;
        }
    }
    true
}
