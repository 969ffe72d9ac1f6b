//! Packet parsing shared by the tc and the tracing programs: IPv4 + TCP/UDP/ICMP, and the
//! packet inside VXLAN. Reads go through [`Reader`], so the same code serves `skb_load_bytes`
//! (tc) and `probe_read_kernel` (tracepoints, from `skb->head + network_header`).
//!
//! Every program runs on every packet of its device (the tracing ones on every packet of the
//! machine), so rejecting is the hot path: one read of the IPv4 header decides for most
//! packets; only UDP to the VXLAN port costs a second look before it is turned away.
use podtrace_abi::{Filter, FlowInfo};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const VXLAN_HLEN: usize = 8;
const UDP_HLEN: usize = 8;

pub trait Reader {
    fn load<T: Copy>(&self, offset: usize) -> Option<T>;
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

/// Parses the Ethernet frame at `offset` (tc programs: offset 0) if it carries a traced packet.
#[inline(always)]
pub fn parse_eth<R: Reader>(r: &R, offset: usize, f: &Filter) -> Option<FlowInfo> {
    let ethertype: [u8; 2] = r.load(offset + 12)?;
    if be16(ethertype) != ETH_P_IP {
        return None;
    }
    parse_ipv4(r, offset + ETH_HLEN, f)
}

/// Parses the IPv4 packet at `l3` if it (or, for VXLAN, the packet inside it) belongs to the
/// traced conversation; the inner packet's flow comes with `encap = 1` and the outer
/// addresses.
#[inline(always)]
pub fn parse_ipv4<R: Reader>(r: &R, l3: usize, f: &Filter) -> Option<FlowInfo> {
    let ip: Ipv4Hdr = r.load(l3)?;
    if ip.vihl >> 4 != 4 {
        return None;
    }
    if addrs_match(f, ip.saddr, ip.daddr) {
        return finish(r, l3, &ip, f);
    }
    // Not ours on the outside: only VXLAN can still carry ours.
    if ip.proto != IPPROTO_UDP || f.vxlan_port == 0 || be16(ip.frag) & 0x1fff != 0 {
        return None;
    }
    let l4 = l3 + ((ip.vihl & 0x0f) as usize) * 4;
    let udp: L4Hdr = r.load(l4)?;
    if be16(udp.b) != f.vxlan_port {
        return None;
    }
    let inner_eth = l4 + UDP_HLEN + VXLAN_HLEN;
    let ethertype: [u8; 2] = r.load(inner_eth + 12)?;
    if be16(ethertype) != ETH_P_IP {
        return None;
    }
    let inner_l3 = inner_eth + ETH_HLEN;
    let inner: Ipv4Hdr = r.load(inner_l3)?;
    if inner.vihl >> 4 != 4 || !addrs_match(f, inner.saddr, inner.daddr) {
        return None;
    }
    let mut flow = finish(r, inner_l3, &inner, f)?;
    flow.encap = 1;
    flow.outer_saddr = ip.saddr;
    flow.outer_daddr = ip.daddr;
    Some(flow)
}

/// The flow of a packet whose addresses matched: protocol and port checks, L4 fields.
#[inline(always)]
fn finish<R: Reader>(r: &R, l3: usize, ip: &Ipv4Hdr, f: &Filter) -> Option<FlowInfo> {
    if f.proto != 0 && ip.proto != f.proto {
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
                let h: L4Hdr = r.load(l3 + ihl)?;
                flow.sport = be16(h.a);
                flow.dport = be16(h.b);
                flow.seq = u32::from_be_bytes(h.c);
                flow.flags = r.load::<u8>(l3 + ihl + 13)?;
            }
            IPPROTO_UDP => {
                let h: L4Hdr = r.load(l3 + ihl)?;
                flow.sport = be16(h.a);
                flow.dport = be16(h.b);
            }
            IPPROTO_ICMP => {
                let h: L4Hdr = r.load(l3 + ihl)?;
                flow.flags = h.a[0];
                flow.seq = u32::from_be_bytes(h.c);
            }
            _ => {}
        }
    }
    if f.port != 0 && flow.sport != f.port && flow.dport != f.port {
        return None;
    }
    Some(flow)
}
