//! Frames built from fuzz input (Ethernet, VLAN tags, IPv4 with options and fragments,
//! TCP/UDP/ICMP, VXLAN carrying another frame), and what `parse_ethernet_with` must make of
//! them: for a well-formed frame, exactly the fields it was built with (an oracle computed
//! from the description, not from the bytes); for anything else (raw bytes, a cut frame, a
//! lying total length), at least no panic.

use std::net::Ipv4Addr;

use arbitrary::Arbitrary;
use podtrace::pcap::packet::{Ipv4Summary, Ports, VxlanOuter, IPPROTO_TCP, IPPROTO_UDP};
use podtrace::pcap::{parse_ethernet_with, PacketSummary, ParseOptions};

const ETHERTYPE_IPV4: u16 = 0x0800;
const TPID_8021Q: u16 = 0x8100;
const TPID_8021AD: u16 = 0x88a8;
/// The parser looks through at most this many VXLAN layers.
const MAX_VXLAN_DEPTH: usize = 2;

/// An Ethernet frame.
#[derive(Arbitrary, Debug, Clone)]
pub struct Frame {
    pub vlans: Vlans,
    pub l3: L3,
}

/// VLAN tags between the MAC addresses and the EtherType. The parser skips up to two.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Vlans {
    None,
    Dot1q(u16),
    QinQ(u16, u16),
    /// Three tags: one more than the parser looks through.
    Three,
}

#[derive(Arbitrary, Debug, Clone)]
pub enum L3 {
    Ipv4(Box<Ipv4>),
    /// Another EtherType (never IPv4 or a VLAN tag) and its payload.
    Other {
        ethertype: u16,
        payload: Vec<u8>,
    },
}

#[derive(Arbitrary, Debug, Clone)]
pub struct Ipv4 {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    /// 32-bit words of IP options (taken modulo 11: IHL 5 to 15).
    pub option_words: u8,
    /// Fragment offset (13 bits) and flags (3 bits), as on the wire.
    pub frag: u16,
    pub total_len: TotalLen,
    pub quirk: HeaderQuirk,
    pub l4: L4,
    /// Bytes after the IP packet (Ethernet padding), outside its total length.
    pub padding: u8,
}

/// What the IP header's total length field says.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum TotalLen {
    /// The true length.
    Exact,
    /// 0: unknown, as in IPv4 BIG TCP GSO packets.
    Zero,
    /// Some other value (less or more than the truth).
    Lie(u16),
}

/// A header the parser must refuse.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum HeaderQuirk {
    None,
    /// A version other than 4.
    Version(u8),
    /// An IHL below 5 words.
    ShortIhl(u8),
}

#[derive(Arbitrary, Debug, Clone)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        payload: Vec<u8>,
    },
    Udp {
        sport: u16,
        dport: u16,
        payload: UdpPayload,
    },
    Icmp(Vec<u8>),
    /// Any protocol number (6 and 17 too) with raw bytes.
    Other {
        protocol: u8,
        payload: Vec<u8>,
    },
}

#[derive(Arbitrary, Debug, Clone)]
pub enum UdpPayload {
    Raw(Vec<u8>),
    Vxlan {
        flags: u8,
        vni: u32,
        inner: Box<Frame>,
    },
}

/// Builds the bytes of a frame.
pub fn build(f: &Frame) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x0b, 0x02, 0, 0, 0, 0, 0x0a]);
    match f.vlans {
        Vlans::None => {}
        Vlans::Dot1q(tci) => tag(&mut out, TPID_8021Q, tci),
        Vlans::QinQ(outer, inner) => {
            tag(&mut out, TPID_8021AD, outer);
            tag(&mut out, TPID_8021Q, inner);
        }
        Vlans::Three => {
            for _ in 0..3 {
                tag(&mut out, TPID_8021Q, 1);
            }
        }
    }
    match &f.l3 {
        L3::Other { ethertype, payload } => {
            out.extend_from_slice(&other_ethertype(*ethertype).to_be_bytes());
            out.extend_from_slice(payload);
        }
        L3::Ipv4(ip) => {
            out.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
            build_ipv4(ip, &mut out);
        }
    }
    out
}

fn tag(out: &mut Vec<u8>, tpid: u16, tci: u16) {
    out.extend_from_slice(&tpid.to_be_bytes());
    out.extend_from_slice(&tci.to_be_bytes());
}

/// An EtherType that is neither IPv4 nor a VLAN tag.
fn other_ethertype(t: u16) -> u16 {
    match t {
        ETHERTYPE_IPV4 | TPID_8021Q | TPID_8021AD => 0x86dd,
        t => t,
    }
}

fn ihl_words(ip: &Ipv4) -> u8 {
    5 + ip.option_words % 11
}

fn protocol(l4: &L4) -> u8 {
    match l4 {
        L4::Tcp { .. } => IPPROTO_TCP,
        L4::Udp { .. } => IPPROTO_UDP,
        L4::Icmp(_) => 1,
        L4::Other { protocol, .. } => *protocol,
    }
}

fn build_l4(l4: &L4) -> Vec<u8> {
    let mut b = Vec::new();
    match l4 {
        L4::Tcp {
            sport,
            dport,
            payload,
        } => {
            b.extend_from_slice(&sport.to_be_bytes());
            b.extend_from_slice(&dport.to_be_bytes());
            b.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
            b.extend_from_slice(payload);
        }
        L4::Udp {
            sport,
            dport,
            payload,
        } => {
            let body = match payload {
                UdpPayload::Raw(p) => p.clone(),
                UdpPayload::Vxlan { flags, vni, inner } => {
                    let mut v = vec![*flags, 0, 0, 0];
                    v.extend_from_slice(&(vni << 8).to_be_bytes());
                    v.extend_from_slice(&build(inner));
                    v
                }
            };
            b.extend_from_slice(&sport.to_be_bytes());
            b.extend_from_slice(&dport.to_be_bytes());
            let len = u16::try_from(8 + body.len()).unwrap_or(u16::MAX);
            b.extend_from_slice(&len.to_be_bytes());
            b.extend_from_slice(&[0, 0]);
            b.extend_from_slice(&body);
        }
        L4::Icmp(p) | L4::Other { payload: p, .. } => b.extend_from_slice(p),
    }
    b
}

fn build_ipv4(ip: &Ipv4, out: &mut Vec<u8>) {
    let ihl = ihl_words(ip);
    let l4 = build_l4(&ip.l4);
    let true_len = usize::from(ihl) * 4 + l4.len();
    let total = match ip.total_len {
        TotalLen::Exact => u16::try_from(true_len).unwrap_or(u16::MAX),
        TotalLen::Zero => 0,
        TotalLen::Lie(n) => n,
    };
    let ver_ihl = match ip.quirk {
        HeaderQuirk::None => 0x40 | ihl,
        HeaderQuirk::Version(v) => {
            let v = if v & 0x0f == 4 { 6 } else { v & 0x0f };
            (v << 4) | ihl
        }
        HeaderQuirk::ShortIhl(n) => 0x40 | (n % 5),
    };
    out.push(ver_ihl);
    out.push(0);
    out.extend_from_slice(&total.to_be_bytes());
    out.extend_from_slice(&[0x12, 0x34]);
    out.extend_from_slice(&ip.frag.to_be_bytes());
    out.extend_from_slice(&[64, protocol(&ip.l4), 0, 0]);
    out.extend_from_slice(&ip.src);
    out.extend_from_slice(&ip.dst);
    // Options: NOPs (1) then end of list (0) would be usual; any bytes must do.
    out.extend(std::iter::repeat_n(1u8, usize::from(ihl - 5) * 4));
    out.extend_from_slice(&l4);
    out.extend(std::iter::repeat_n(0xa5u8, usize::from(ip.padding)));
}

/// What the parser must return for a built frame, or `None` where the description does not
/// decide it (a lying total length, raw bytes that may look like VXLAN). `trailing`: bytes
/// after the frame that the parser sees too (an outer packet's padding).
pub fn expected(
    f: &Frame,
    opts: &ParseOptions,
    depth: usize,
    trailing: usize,
) -> Option<PacketSummary> {
    let none = PacketSummary::default();
    if matches!(f.vlans, Vlans::Three) {
        return Some(none);
    }
    let ip = match &f.l3 {
        L3::Other { .. } => return Some(none),
        L3::Ipv4(ip) => ip,
    };
    if !matches!(ip.quirk, HeaderQuirk::None) {
        return Some(none);
    }
    let l4 = build_l4(&ip.l4);
    // Bytes after the segment that the parser counts as L4: the padding (and whatever
    // follows the frame) when the total length is unknown, none when it is true.
    let beyond = match ip.total_len {
        TotalLen::Exact if usize::from(ihl_words(ip)) * 4 + l4.len() > usize::from(u16::MAX) => {
            return None
        }
        TotalLen::Exact => 0,
        TotalLen::Zero => usize::from(ip.padding) + trailing,
        TotalLen::Lie(_) => return None,
    };
    let protocol = protocol(&ip.l4);
    let mut summary = PacketSummary::ipv4(Ipv4Addr::from(ip.src), Ipv4Addr::from(ip.dst), protocol);
    if ip.frag & 0x1fff != 0 || !(protocol == IPPROTO_TCP || protocol == IPPROTO_UDP) {
        return Some(summary);
    }
    let avail = l4.len() + beyond;
    if avail < 4 {
        return Some(summary);
    }
    let (sport, dport) = match &ip.l4 {
        L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport, .. } => (*sport, *dport),
        L4::Other { payload, .. } if payload.len() >= 4 => (
            u16::from_be_bytes([payload[0], payload[1]]),
            u16::from_be_bytes([payload[2], payload[3]]),
        ),
        // Ports made partly of padding: not described.
        _ => return None,
    };
    summary.ip = Some(Ipv4Summary {
        ports: Some(Ports {
            src: sport,
            dst: dport,
        }),
        ..summary.ip.expect("set above")
    });
    let looks_into = protocol == IPPROTO_UDP
        && depth < MAX_VXLAN_DEPTH
        && opts.vxlan_ports.contains(&dport)
        && avail >= 16 + 14;
    if !looks_into {
        return Some(summary);
    }
    match &ip.l4 {
        L4::Udp {
            payload: UdpPayload::Vxlan { flags, vni, inner },
            ..
        } => {
            if flags & 0x08 == 0 {
                return Some(summary);
            }
            let mut inner_summary = expected(inner, opts, depth + 1, beyond)?;
            if inner_summary.vxlan.is_none() {
                inner_summary.vxlan = Some(VxlanOuter {
                    src: Ipv4Addr::from(ip.src),
                    dst: Ipv4Addr::from(ip.dst),
                    port: dport,
                    vni: vni & 0x00ff_ffff,
                });
            }
            Some(inner_summary)
        }
        L4::Udp {
            payload: UdpPayload::Raw(p),
            ..
        } if p.first().is_some_and(|flags| flags & 0x08 == 0) => Some(summary),
        // Raw bytes to a VXLAN port with the I flag: whatever they hold.
        _ => None,
    }
}

/// The `packet` target's input.
#[derive(Arbitrary, Debug)]
pub enum PacketInput {
    /// Any bytes, with any VXLAN ports.
    Raw {
        vxlan_ports: Vec<u16>,
        bytes: Vec<u8>,
    },
    /// A described frame, whole (checked against the oracle) or cut after `cut` bytes.
    Built {
        vxlan_ports: Vxlan,
        frame: Frame,
        cut: Option<u16>,
    },
}

/// Which UDP ports carry VXLAN for the parser.
#[derive(Arbitrary, Debug, Clone)]
pub enum Vxlan {
    /// The default: flannel's 8472.
    Default,
    /// 8472 and IANA's 4789.
    Both,
    None,
    Ports(Vec<u16>),
}

impl Vxlan {
    pub fn options(&self) -> ParseOptions {
        match self {
            Vxlan::Default => ParseOptions::default(),
            Vxlan::Both => ParseOptions {
                vxlan_ports: vec![8472, 4789],
            },
            Vxlan::None => ParseOptions {
                vxlan_ports: Vec::new(),
            },
            Vxlan::Ports(p) => ParseOptions {
                vxlan_ports: p.clone(),
            },
        }
    }
}

/// The `packet` target: no panic on anything; a whole built frame gives its description.
pub fn check(input: &PacketInput) {
    match input {
        PacketInput::Raw { vxlan_ports, bytes } => {
            let opts = ParseOptions {
                vxlan_ports: vxlan_ports.clone(),
            };
            sane(&parse_ethernet_with(bytes, &opts), &opts);
        }
        PacketInput::Built {
            vxlan_ports,
            frame,
            cut,
        } => {
            let opts = vxlan_ports.options();
            let bytes = build(frame);
            match cut {
                Some(n) => {
                    let n = usize::from(*n) % (bytes.len() + 1);
                    sane(&parse_ethernet_with(&bytes[..n], &opts), &opts);
                }
                None => {
                    let got = parse_ethernet_with(&bytes, &opts);
                    sane(&got, &opts);
                    if let Some(want) = expected(frame, &opts, 0, 0) {
                        assert_eq!(got, want, "frame {frame:?}\nbytes {bytes:02x?}");
                    }
                }
            }
        }
    }
}

/// What holds for every summary.
fn sane(s: &PacketSummary, opts: &ParseOptions) {
    if let Some(v) = s.vxlan {
        assert!(opts.vxlan_ports.contains(&v.port), "{s:?}");
        assert!(v.vni <= 0x00ff_ffff, "{s:?}");
    }
}
