//! A small summary of a captured frame (addresses, protocol, ports) for the capture filter,
//! and a parser that builds it from Ethernet bytes, looking inside VXLAN.
//!
//! On a flannel underlay a pod's packet travels as UDP to port 8472 wrapping the pod's own
//! Ethernet frame. tcpdump's `host 10.244.1.5` would not match such a frame; podtrace's
//! filter should, so [`parse_ethernet`] summarises the *inner* headers of VXLAN frames and
//! keeps the outer ones in [`PacketSummary::vxlan`] for information.

use std::net::Ipv4Addr;

/// The VXLAN UDP port flannel uses (the Linux kernel's historical default).
pub const FLANNEL_VXLAN_PORT: u16 = 8472;
/// The IANA-assigned VXLAN UDP port.
pub const IANA_VXLAN_PORT: u16 = 4789;

/// IP protocol number of ICMP.
pub const IPPROTO_ICMP: u8 = 1;
/// IP protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_VLAN: u16 = 0x8100;
const ETHERTYPE_QINQ: u16 = 0x88a8;
const ETH_HLEN: usize = 14;
const UDP_HLEN: usize = 8;
const VXLAN_HLEN: usize = 8;
/// The VXLAN "I" flag: the VNI field is valid (RFC 7348).
const VXLAN_FLAG_I: u8 = 0x08;
/// VXLAN inside VXLAN is legal but unusual; look through at most this many layers.
const MAX_VXLAN_DEPTH: usize = 2;

/// Source and destination port of a TCP or UDP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ports {
    /// Source port.
    pub src: u16,
    /// Destination port.
    pub dst: u16,
}

/// The IPv4 part of a packet summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Summary {
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// IP protocol number ([`IPPROTO_TCP`], [`IPPROTO_UDP`], [`IPPROTO_ICMP`], ...).
    pub protocol: u8,
    /// TCP/UDP ports; `None` for other protocols, for fragments after the first and when
    /// the frame was cut before the ports.
    pub ports: Option<Ports>,
}

/// The outer headers of a VXLAN-encapsulated frame whose inner headers a summary describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VxlanOuter {
    /// Outer (underlay) source address.
    pub src: Ipv4Addr,
    /// Outer (underlay) destination address.
    pub dst: Ipv4Addr,
    /// The UDP destination port that identified the frame as VXLAN.
    pub port: u16,
    /// The 24-bit VXLAN network identifier.
    pub vni: u32,
}

/// What the capture filter looks at in a packet.
///
/// For a VXLAN frame the summary describes the **inner** (pod) packet and `vxlan` holds the
/// outer headers; the filter evaluates the inner headers only. Build one with
/// [`parse_ethernet`] from frame bytes, or directly (e.g. from an eBPF event's tuple) with
/// [`PacketSummary::ipv4`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PacketSummary {
    /// The IPv4 header (inner header for VXLAN); `None` when the frame is not IPv4 (ARP,
    /// IPv6, ...) or too short to tell.
    pub ip: Option<Ipv4Summary>,
    /// Set when `ip` was taken from inside a VXLAN frame.
    pub vxlan: Option<VxlanOuter>,
}

impl PacketSummary {
    /// A summary of an IPv4 packet without ports (ICMP, or TCP/UDP when the ports are unknown).
    pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8) -> Self {
        PacketSummary {
            ip: Some(Ipv4Summary {
                src,
                dst,
                protocol,
                ports: None,
            }),
            vxlan: None,
        }
    }

    /// The same summary with TCP/UDP ports set (no effect on a non-IPv4 summary).
    pub fn with_ports(mut self, src: u16, dst: u16) -> Self {
        if let Some(ip) = self.ip.as_mut() {
            ip.ports = Some(Ports { src, dst });
        }
        self
    }
}

/// How [`parse_ethernet_with`] recognises VXLAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseOptions {
    /// UDP destination ports carrying VXLAN; frames to these ports are summarised by their
    /// inner headers. Default: `[8472]` (flannel). Empty: never look inside.
    pub vxlan_ports: Vec<u16>,
}

impl Default for ParseOptions {
    fn default() -> Self {
        ParseOptions {
            vxlan_ports: vec![FLANNEL_VXLAN_PORT],
        }
    }
}

/// Summarise an Ethernet frame, looking inside VXLAN on UDP port 8472.
///
/// Never fails: what cannot be parsed (a short frame, a non-IPv4 payload) is simply absent
/// from the summary. 802.1Q / 802.1ad VLAN tags are skipped.
pub fn parse_ethernet(frame: &[u8]) -> PacketSummary {
    parse_ethernet_with(frame, &ParseOptions::default())
}

/// [`parse_ethernet`] with explicit options.
pub fn parse_ethernet_with(frame: &[u8], opts: &ParseOptions) -> PacketSummary {
    parse_layer(frame, opts, 0)
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn ipv4_at(b: &[u8], at: usize) -> Option<Ipv4Addr> {
    let s = b.get(at..at + 4)?;
    Some(Ipv4Addr::new(s[0], s[1], s[2], s[3]))
}

fn parse_layer(frame: &[u8], opts: &ParseOptions, depth: usize) -> PacketSummary {
    let none = PacketSummary::default();
    let Some(mut ethertype) = be16(frame, 12) else {
        return none;
    };
    let mut off = ETH_HLEN;
    // Up to two VLAN tags (802.1ad outer + 802.1Q inner).
    for _ in 0..2 {
        if ethertype != ETHERTYPE_VLAN && ethertype != ETHERTYPE_QINQ {
            break;
        }
        match be16(frame, off + 2) {
            Some(t) => ethertype = t,
            None => return none,
        }
        off += 4;
    }
    if ethertype != ETHERTYPE_IPV4 {
        return none;
    }
    let ip = &frame[off..];
    let Some(&ver_ihl) = ip.first() else {
        return none;
    };
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    if ver_ihl >> 4 != 4 || ihl < 20 || ip.len() < 20 {
        return none;
    }
    let (Some(src), Some(dst)) = (ipv4_at(ip, 12), ipv4_at(ip, 16)) else {
        return none;
    };
    let protocol = ip[9];
    let frag_offset = be16(ip, 6).map(|v| v & 0x1fff).unwrap_or(0);
    let mut summary = PacketSummary::ipv4(src, dst, protocol);
    if frag_offset != 0 || !(protocol == IPPROTO_TCP || protocol == IPPROTO_UDP) {
        return summary;
    }
    // Ports must lie within the IP header's stated total length as well as the frame.
    // A total length of 0 means "unknown" (IPv4 BIG TCP GSO packets): trust the frame.
    let total_len = be16(ip, 2).map(usize::from).unwrap_or(0);
    let l4_end = if total_len == 0 {
        ip.len()
    } else {
        ip.len().min(total_len.max(ihl))
    };
    let l4 = match ip.get(ihl..l4_end) {
        Some(l4) => l4,
        None => return summary,
    };
    let (Some(sport), Some(dport)) = (be16(l4, 0), be16(l4, 2)) else {
        return summary;
    };
    summary = summary.with_ports(sport, dport);

    if protocol == IPPROTO_UDP && depth < MAX_VXLAN_DEPTH && opts.vxlan_ports.contains(&dport) {
        if let Some(vx) = l4.get(UDP_HLEN..UDP_HLEN + VXLAN_HLEN) {
            if vx[0] & VXLAN_FLAG_I != 0 {
                let vni = u32::from_be_bytes([0, vx[4], vx[5], vx[6]]);
                let inner_frame = &l4[UDP_HLEN + VXLAN_HLEN..];
                // Too short to hold an Ethernet header: not a VXLAN frame we can look into.
                if inner_frame.len() >= ETH_HLEN {
                    let mut inner = parse_layer(inner_frame, opts, depth + 1);
                    // Keep the innermost tunnel's outer headers if VXLAN is nested.
                    if inner.vxlan.is_none() {
                        inner.vxlan = Some(VxlanOuter {
                            src,
                            dst,
                            port: dport,
                            vni,
                        });
                    }
                    return inner;
                }
            }
        }
    }
    summary
}

#[cfg(test)]
pub(crate) mod testpkt {
    //! Frame builders shared by the pcap module's tests.
    use super::*;

    pub const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
    pub const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];

    /// An Ethernet + IPv4 frame around `l4` (checksum left 0, as offloaded veth traffic often is).
    pub fn ipv4_frame(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, l4: &[u8]) -> Vec<u8> {
        let mut f = Vec::with_capacity(34 + l4.len());
        f.extend_from_slice(&MAC_B);
        f.extend_from_slice(&MAC_A);
        f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let total = (20 + l4.len()) as u16;
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, protocol, 0, 0]);
        f.extend_from_slice(&src.octets());
        f.extend_from_slice(&dst.octets());
        f.extend_from_slice(l4);
        f
    }

    pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut u = Vec::new();
        u.extend_from_slice(&sport.to_be_bytes());
        u.extend_from_slice(&dport.to_be_bytes());
        u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        u.extend_from_slice(&[0, 0]);
        u.extend_from_slice(payload);
        u
    }

    pub fn tcp(sport: u16, dport: u16) -> Vec<u8> {
        let mut t = Vec::new();
        t.extend_from_slice(&sport.to_be_bytes());
        t.extend_from_slice(&dport.to_be_bytes());
        t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
        t
    }

    pub fn icmp_echo() -> Vec<u8> {
        vec![8, 0, 0, 0, 0, 1, 0, 1, b'p', b'i', b'n', b'g']
    }

    /// The frame flannel puts on the underlay for `inner`.
    pub fn vxlan_frame(
        outer_src: Ipv4Addr,
        outer_dst: Ipv4Addr,
        vni: u32,
        inner: &[u8],
    ) -> Vec<u8> {
        vxlan_frame_port(outer_src, outer_dst, FLANNEL_VXLAN_PORT, vni, inner)
    }

    pub fn vxlan_frame_port(
        outer_src: Ipv4Addr,
        outer_dst: Ipv4Addr,
        port: u16,
        vni: u32,
        inner: &[u8],
    ) -> Vec<u8> {
        let mut vx = vec![VXLAN_FLAG_I, 0, 0, 0];
        vx.extend_from_slice(&(vni << 8).to_be_bytes());
        vx.extend_from_slice(inner);
        ipv4_frame(outer_src, outer_dst, IPPROTO_UDP, &udp(40000, port, &vx))
    }
}

#[cfg(test)]
mod tests {
    use super::testpkt::*;
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn tcp_frame_summary() {
        let f = ipv4_frame(
            ip("10.244.0.9"),
            ip("10.244.1.5"),
            IPPROTO_TCP,
            &tcp(41000, 80),
        );
        assert_eq!(
            parse_ethernet(&f),
            PacketSummary::ipv4(ip("10.244.0.9"), ip("10.244.1.5"), IPPROTO_TCP)
                .with_ports(41000, 80)
        );
    }

    #[test]
    fn icmp_has_no_ports() {
        let f = ipv4_frame(
            ip("10.19.0.11"),
            ip("10.19.0.32"),
            IPPROTO_ICMP,
            &icmp_echo(),
        );
        let s = parse_ethernet(&f);
        assert_eq!(s.ip.unwrap().protocol, IPPROTO_ICMP);
        assert_eq!(s.ip.unwrap().ports, None);
    }

    #[test]
    fn vxlan_inner_headers_are_summarised() {
        let inner = ipv4_frame(
            ip("10.244.0.9"),
            ip("10.244.1.5"),
            IPPROTO_UDP,
            &udp(5353, 53, b"q"),
        );
        let f = vxlan_frame(ip("10.30.180.56"), ip("10.30.180.55"), 1, &inner);
        let s = parse_ethernet(&f);
        let i = s.ip.unwrap();
        assert_eq!(
            (i.src, i.dst, i.protocol),
            (ip("10.244.0.9"), ip("10.244.1.5"), IPPROTO_UDP)
        );
        assert_eq!(i.ports, Some(Ports { src: 5353, dst: 53 }));
        assert_eq!(
            s.vxlan,
            Some(VxlanOuter {
                src: ip("10.30.180.56"),
                dst: ip("10.30.180.55"),
                port: 8472,
                vni: 1
            })
        );
    }

    #[test]
    fn vxlan_port_is_configurable() {
        let inner = ipv4_frame(
            ip("10.244.0.9"),
            ip("10.244.1.5"),
            IPPROTO_ICMP,
            &icmp_echo(),
        );
        let f = vxlan_frame_port(ip("10.30.180.56"), ip("10.30.180.55"), 4789, 7, &inner);
        // Default options: 4789 is plain UDP.
        let outer = parse_ethernet(&f);
        assert_eq!(outer.ip.unwrap().src, ip("10.30.180.56"));
        assert_eq!(outer.vxlan, None);
        let opts = ParseOptions {
            vxlan_ports: vec![IANA_VXLAN_PORT],
        };
        let s = parse_ethernet_with(&f, &opts);
        assert_eq!(s.ip.unwrap().dst, ip("10.244.1.5"));
        assert_eq!(s.vxlan.unwrap().vni, 7);
        // And 8472 is not looked into when only 4789 is configured.
        let f8472 = vxlan_frame(ip("10.30.180.56"), ip("10.30.180.55"), 1, &inner);
        assert_eq!(parse_ethernet_with(&f8472, &opts).vxlan, None);
    }

    #[test]
    fn vxlan_without_i_flag_is_plain_udp() {
        let inner = ipv4_frame(
            ip("10.244.0.9"),
            ip("10.244.1.5"),
            IPPROTO_ICMP,
            &icmp_echo(),
        );
        let mut f = vxlan_frame(ip("10.30.180.56"), ip("10.30.180.55"), 1, &inner);
        // Flags byte sits right after eth(14) + ip(20) + udp(8).
        f[42] = 0;
        let s = parse_ethernet(&f);
        assert_eq!(s.vxlan, None);
        assert_eq!(
            s.ip.unwrap().ports,
            Some(Ports {
                src: 40000,
                dst: 8472
            })
        );
    }

    #[test]
    fn vxlan_carrying_arp_has_no_ip() {
        let mut arp = Vec::new();
        arp.extend_from_slice(&MAC_B);
        arp.extend_from_slice(&MAC_A);
        arp.extend_from_slice(&0x0806u16.to_be_bytes());
        arp.extend_from_slice(&[0u8; 28]);
        let f = vxlan_frame(ip("10.30.180.56"), ip("10.30.180.55"), 1, &arp);
        let s = parse_ethernet(&f);
        assert_eq!(s.ip, None);
        assert_eq!(s.vxlan.unwrap().vni, 1);
    }

    #[test]
    fn vlan_tags_are_skipped() {
        let plain = ipv4_frame(ip("1.2.3.4"), ip("5.6.7.8"), IPPROTO_TCP, &tcp(1, 2));
        let mut tagged = plain[..12].to_vec();
        tagged.extend_from_slice(&[0x88, 0xa8, 0, 10, 0x81, 0x00, 0, 20]);
        tagged.extend_from_slice(&plain[12..]);
        assert_eq!(parse_ethernet(&tagged), parse_ethernet(&plain));
        assert!(parse_ethernet(&plain).ip.is_some());
    }

    #[test]
    fn truncated_and_odd_frames_degrade_gracefully() {
        let f = ipv4_frame(ip("1.2.3.4"), ip("5.6.7.8"), IPPROTO_TCP, &tcp(1000, 2000));
        // Every prefix parses without panicking; ports appear only once they are present.
        for n in 0..f.len() {
            let s = parse_ethernet(&f[..n]);
            if n < 34 {
                assert_eq!(s.ip, None, "prefix {n}");
            } else if n < 38 {
                assert_eq!(s.ip.unwrap().ports, None, "prefix {n}");
            } else {
                assert_eq!(
                    s.ip.unwrap().ports,
                    Some(Ports {
                        src: 1000,
                        dst: 2000
                    })
                );
            }
        }
        // Not IPv4.
        let mut v6 = f.clone();
        v6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
        assert_eq!(parse_ethernet(&v6), PacketSummary::default());
        // Bad IHL.
        let mut bad = f.clone();
        bad[14] = 0x44;
        assert_eq!(parse_ethernet(&bad).ip, None);
    }

    #[test]
    fn later_fragments_have_no_ports_and_are_not_unwrapped() {
        let inner = ipv4_frame(
            ip("10.244.0.9"),
            ip("10.244.1.5"),
            IPPROTO_ICMP,
            &icmp_echo(),
        );
        let mut f = vxlan_frame(ip("10.30.180.56"), ip("10.30.180.55"), 1, &inner);
        // Fragment offset 185 (×8 bytes).
        f[20..22].copy_from_slice(&185u16.to_be_bytes());
        let s = parse_ethernet(&f);
        assert_eq!(s.vxlan, None);
        assert_eq!(s.ip.unwrap().ports, None);
        assert_eq!(s.ip.unwrap().src, ip("10.30.180.56"));
    }

    #[test]
    fn ports_beyond_ip_total_length_are_ignored() {
        // A frame padded to the Ethernet minimum: the IP total length says 20 bytes, so
        // the padding must not be read as ports.
        let mut f = ipv4_frame(ip("1.2.3.4"), ip("5.6.7.8"), IPPROTO_UDP, &[]);
        f.extend_from_slice(&[0xaa; 26]);
        assert_eq!(parse_ethernet(&f).ip.unwrap().ports, None);
    }
}
