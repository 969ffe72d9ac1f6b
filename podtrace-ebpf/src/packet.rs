//! Packet parsing shared by the tc and the tracing programs: IPv4 + TCP/UDP/ICMP, and the
//! packet inside VXLAN. Reads go through [`Reader`], so the same code serves `skb_load_bytes`
//! (tc) and `probe_read_kernel` (tracepoints, from `skb->head + network_header`).
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

    #[inline(always)]
    fn be16(&self, offset: usize) -> Option<u16> {
        self.load::<u16>(offset).map(u16::from_be)
    }

    #[inline(always)]
    fn be32(&self, offset: usize) -> Option<u32> {
        self.load::<u32>(offset).map(u32::from_be)
    }
}

/// Parses the Ethernet frame at `offset` (tc programs: offset 0).
#[inline(always)]
pub fn parse_eth<R: Reader>(r: &R, offset: usize, vxlan_port: u16) -> Option<FlowInfo> {
    if r.be16(offset + 12)? != ETH_P_IP {
        return None;
    }
    parse_ipv4(r, offset + ETH_HLEN, vxlan_port)
}

/// Parses the IPv4 packet at `l3`; a VXLAN packet yields the inner packet's flow with
/// `encap = 1` and the outer addresses.
#[inline(always)]
pub fn parse_ipv4<R: Reader>(r: &R, l3: usize, vxlan_port: u16) -> Option<FlowInfo> {
    let mut flow = parse_plain(r, l3)?;
    if flow.proto == IPPROTO_UDP && flow.dport == vxlan_port && vxlan_port != 0 {
        let ihl = ((r.load::<u8>(l3)? & 0x0f) as usize) * 4;
        let inner_eth = l3 + ihl + UDP_HLEN + VXLAN_HLEN;
        if r.be16(inner_eth + 12)? != ETH_P_IP {
            return None;
        }
        let outer_saddr = flow.saddr;
        let outer_daddr = flow.daddr;
        flow = parse_plain(r, inner_eth + ETH_HLEN)?;
        flow.encap = 1;
        flow.outer_saddr = outer_saddr;
        flow.outer_daddr = outer_daddr;
    }
    Some(flow)
}

#[inline(always)]
fn parse_plain<R: Reader>(r: &R, l3: usize) -> Option<FlowInfo> {
    let vihl = r.load::<u8>(l3)?;
    if vihl >> 4 != 4 {
        return None;
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return None;
    }
    let mut flow = FlowInfo {
        ip_len: r.be16(l3 + 2)?,
        ip_id: r.be16(l3 + 4)?,
        proto: r.load::<u8>(l3 + 9)?,
        saddr: r.load::<u32>(l3 + 12)?,
        daddr: r.load::<u32>(l3 + 16)?,
        ..FlowInfo::default()
    };
    // Later fragments carry no L4 header.
    if r.be16(l3 + 6)? & 0x1fff != 0 {
        return Some(flow);
    }
    let l4 = l3 + ihl;
    match flow.proto {
        IPPROTO_TCP => {
            flow.sport = r.be16(l4)?;
            flow.dport = r.be16(l4 + 2)?;
            flow.seq = r.be32(l4 + 4)?;
            flow.flags = r.load::<u8>(l4 + 13)?;
        }
        IPPROTO_UDP => {
            flow.sport = r.be16(l4)?;
            flow.dport = r.be16(l4 + 2)?;
        }
        IPPROTO_ICMP => {
            flow.flags = r.load::<u8>(l4)?;
            flow.seq = r.be32(l4 + 4)?;
        }
        _ => {}
    }
    Some(flow)
}

/// Does the (inner) packet belong to the traced conversation?
#[inline(always)]
pub fn matches(f: &Filter, flow: &FlowInfo) -> bool {
    let fwd =
        (f.addr_a == 0 || flow.saddr == f.addr_a) && (f.addr_b == 0 || flow.daddr == f.addr_b);
    let rev =
        (f.addr_a == 0 || flow.daddr == f.addr_a) && (f.addr_b == 0 || flow.saddr == f.addr_b);
    (fwd || rev)
        && (f.proto == 0 || flow.proto == f.proto)
        && (f.port == 0 || flow.sport == f.port || flow.dport == f.port)
}
