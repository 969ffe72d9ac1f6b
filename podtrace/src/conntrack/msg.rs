//! ctnetlink messages (`NFNL_SUBSYS_CTNETLINK`): decoding conntrack entries and statistics
//! from the attributes after the `nfgenmsg` header, and encoding the tuple of a get request.
//! Decoding is total: attributes that are missing, too short or unknown leave the field
//! `None`, and a malformed attribute stream is reported in [`Entry::malformed`].
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Serialize;

use super::nlattr::{attrs, Attr, Writer};

// enum ctattr_type (linux/netfilter/nfnetlink_conntrack.h)
pub const CTA_TUPLE_ORIG: u16 = 1;
pub const CTA_TUPLE_REPLY: u16 = 2;
pub const CTA_STATUS: u16 = 3;
pub const CTA_PROTOINFO: u16 = 4;
pub const CTA_TIMEOUT: u16 = 7;
pub const CTA_MARK: u16 = 8;
pub const CTA_COUNTERS_ORIG: u16 = 9;
pub const CTA_COUNTERS_REPLY: u16 = 10;
pub const CTA_USE: u16 = 11;
pub const CTA_ID: u16 = 12;
pub const CTA_ZONE: u16 = 18;
// enum ctattr_tuple
pub const CTA_TUPLE_IP: u16 = 1;
pub const CTA_TUPLE_PROTO: u16 = 2;
pub const CTA_TUPLE_ZONE: u16 = 3;
// enum ctattr_ip
pub const CTA_IP_V4_SRC: u16 = 1;
pub const CTA_IP_V4_DST: u16 = 2;
pub const CTA_IP_V6_SRC: u16 = 3;
pub const CTA_IP_V6_DST: u16 = 4;
// enum ctattr_l4proto
pub const CTA_PROTO_NUM: u16 = 1;
pub const CTA_PROTO_SRC_PORT: u16 = 2;
pub const CTA_PROTO_DST_PORT: u16 = 3;
pub const CTA_PROTO_ICMP_ID: u16 = 4;
pub const CTA_PROTO_ICMP_TYPE: u16 = 5;
pub const CTA_PROTO_ICMP_CODE: u16 = 6;
// enum ctattr_protoinfo / ctattr_protoinfo_tcp
pub const CTA_PROTOINFO_TCP: u16 = 1;
pub const CTA_PROTOINFO_TCP_STATE: u16 = 1;
// enum ctattr_counters
pub const CTA_COUNTERS_PACKETS: u16 = 1;
pub const CTA_COUNTERS_BYTES: u16 = 2;
// enum ctattr_stats_cpu
pub const CTA_STATS_FOUND: u16 = 2;
pub const CTA_STATS_INVALID: u16 = 4;
pub const CTA_STATS_INSERT: u16 = 8;
pub const CTA_STATS_INSERT_FAILED: u16 = 9;
pub const CTA_STATS_DROP: u16 = 10;
pub const CTA_STATS_EARLY_DROP: u16 = 11;
pub const CTA_STATS_ERROR: u16 = 12;
pub const CTA_STATS_SEARCH_RESTART: u16 = 13;
pub const CTA_STATS_CLASH_RESOLVE: u16 = 14;
pub const CTA_STATS_CHAIN_TOOLONG: u16 = 15;
// enum ctattr_stats_global
pub const CTA_STATS_GLOBAL_ENTRIES: u16 = 1;
pub const CTA_STATS_GLOBAL_MAX_ENTRIES: u16 = 2;

/// IPPROTO_ICMP.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Conntrack status bits (enum ip_conntrack_status).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Status(pub u32);

impl Status {
    pub const EXPECTED: u32 = 1 << 0;
    pub const SEEN_REPLY: u32 = 1 << 1;
    pub const ASSURED: u32 = 1 << 2;
    pub const CONFIRMED: u32 = 1 << 3;
    pub const SRC_NAT: u32 = 1 << 4;
    pub const DST_NAT: u32 = 1 << 5;
    pub const SEQ_ADJUST: u32 = 1 << 6;
    pub const SRC_NAT_DONE: u32 = 1 << 7;
    pub const DST_NAT_DONE: u32 = 1 << 8;
    pub const DYING: u32 = 1 << 9;
    pub const FIXED_TIMEOUT: u32 = 1 << 10;
    pub const TEMPLATE: u32 = 1 << 11;
    pub const HELPER: u32 = 1 << 13;
    pub const OFFLOAD: u32 = 1 << 14;
    pub const HW_OFFLOAD: u32 = 1 << 15;

    pub fn has(self, bit: u32) -> bool {
        self.0 & bit != 0
    }

    /// The set bits by name (`SEEN_REPLY`, `ASSURED`, `DST_NAT`…), lowest first.
    pub fn names(self) -> Vec<&'static str> {
        const NAMES: [(u32, &str); 15] = [
            (Status::EXPECTED, "EXPECTED"),
            (Status::SEEN_REPLY, "SEEN_REPLY"),
            (Status::ASSURED, "ASSURED"),
            (Status::CONFIRMED, "CONFIRMED"),
            (Status::SRC_NAT, "SRC_NAT"),
            (Status::DST_NAT, "DST_NAT"),
            (Status::SEQ_ADJUST, "SEQ_ADJUST"),
            (Status::SRC_NAT_DONE, "SRC_NAT_DONE"),
            (Status::DST_NAT_DONE, "DST_NAT_DONE"),
            (Status::DYING, "DYING"),
            (Status::FIXED_TIMEOUT, "FIXED_TIMEOUT"),
            (Status::TEMPLATE, "TEMPLATE"),
            (Status::HELPER, "HELPER"),
            (Status::OFFLOAD, "OFFLOAD"),
            (Status::HW_OFFLOAD, "HW_OFFLOAD"),
        ];
        NAMES
            .iter()
            .filter(|(b, _)| self.has(*b))
            .map(|(_, n)| *n)
            .collect()
    }
}

/// One direction of a connection: addresses, protocol and ports (or ICMP id/type/code).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Tuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol number (6 tcp, 17 udp, 1 icmp).
    pub proto: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sport: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dport: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp_id: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp_type: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp_code: Option<u8>,
    /// A zone given on this direction only (CTA_TUPLE_ZONE).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<u16>,
}

impl Tuple {
    /// A TCP or UDP tuple.
    pub fn ports(proto: u8, src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Tuple {
            src: src.into(),
            dst: dst.into(),
            proto,
            sport: Some(sport),
            dport: Some(dport),
            icmp_id: None,
            icmp_type: None,
            icmp_code: None,
            zone: None,
        }
    }

    /// An ICMP echo request tuple (`type` 8, code 0) with its identifier.
    pub fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr, id: u16) -> Self {
        Tuple {
            src: src.into(),
            dst: dst.into(),
            proto: PROTO_ICMP,
            sport: None,
            dport: None,
            icmp_id: Some(id),
            icmp_type: Some(8),
            icmp_code: Some(0),
            zone: None,
        }
    }
}

impl std::fmt::Display for Tuple {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let proto = match self.proto {
            PROTO_TCP => "tcp".to_owned(),
            PROTO_UDP => "udp".to_owned(),
            PROTO_ICMP => "icmp".to_owned(),
            n => format!("proto {n}"),
        };
        match (self.sport, self.dport, self.icmp_id) {
            (Some(s), Some(d), _) => write!(f, "{proto} {}:{s} → {}:{d}", self.src, self.dst),
            (_, _, Some(id)) => write!(
                f,
                "{proto} {} → {} id {id} type {}",
                self.src,
                self.dst,
                self.icmp_type.unwrap_or(0)
            ),
            _ => write!(f, "{proto} {} → {}", self.src, self.dst),
        }
    }
}

/// Packet and byte counters of one direction (present with `nf_conntrack_acct` on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}

/// One conntrack entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// The layer-3 family of the message (2: IPv4, 10: IPv6).
    pub family: u8,
    /// The direction the connection was opened in, as its first packet was.
    pub orig: Option<Tuple>,
    /// What a reply looks like: its source is the real server (the backend after DNAT),
    /// its destination the client as the server sees it (after SNAT).
    pub reply: Option<Tuple>,
    pub status: Status,
    pub mark: Option<u32>,
    pub zone: Option<u16>,
    /// Seconds until it expires.
    pub timeout: Option<u32>,
    pub id: Option<u32>,
    /// TCP state (enum tcp_conntrack: 1 SYN_SENT … 3 ESTABLISHED … 7 CLOSE).
    pub tcp_state: Option<u8>,
    pub counters_orig: Option<Counters>,
    pub counters_reply: Option<Counters>,
    /// Set when the attribute stream was malformed (what was read before is kept).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub malformed: Option<String>,
}

impl Entry {
    /// The destination the connection was translated to (`reply.src`), when it differs
    /// from the original destination: the backend of a DNATed Service connection.
    pub fn dnat_to(&self) -> Option<(IpAddr, Option<u16>)> {
        let (o, r) = (self.orig?, self.reply?);
        let port = if o.proto == PROTO_ICMP { None } else { r.sport };
        (r.src != o.dst || (port.is_some() && port != o.dport)).then_some((r.src, port))
    }

    /// The source the connection was translated to (`reply.dst`), when it differs from the
    /// original source: the masqueraded address.
    pub fn snat_to(&self) -> Option<(IpAddr, Option<u16>)> {
        let (o, r) = (self.orig?, self.reply?);
        let port = if o.proto == PROTO_ICMP { None } else { r.dport };
        (r.dst != o.src || (port.is_some() && port != o.sport)).then_some((r.dst, port))
    }
}

/// TCP conntrack state names (enum tcp_conntrack).
pub fn tcp_state_name(s: u8) -> &'static str {
    match s {
        0 => "NONE",
        1 => "SYN_SENT",
        2 => "SYN_RECV",
        3 => "ESTABLISHED",
        4 => "FIN_WAIT",
        5 => "CLOSE_WAIT",
        6 => "LAST_ACK",
        7 => "TIME_WAIT",
        8 => "CLOSE",
        9 => "SYN_SENT2",
        _ => "?",
    }
}

fn ip_of(a: &Attr) -> Option<IpAddr> {
    match a.payload.len() {
        4 => <[u8; 4]>::try_from(a.payload)
            .ok()
            .map(|b| Ipv4Addr::from(b).into()),
        16 => <[u8; 16]>::try_from(a.payload)
            .ok()
            .map(|b| Ipv6Addr::from(b).into()),
        _ => None,
    }
}

/// Decodes a CTA_TUPLE_* payload; `None` without both addresses and the protocol.
fn tuple_of(a: &Attr, bad: &mut Option<String>) -> Option<Tuple> {
    let (mut src, mut dst, mut proto) = (None, None, None);
    let mut t = Tuple {
        src: Ipv4Addr::UNSPECIFIED.into(),
        dst: Ipv4Addr::UNSPECIFIED.into(),
        proto: 0,
        sport: None,
        dport: None,
        icmp_id: None,
        icmp_type: None,
        icmp_code: None,
        zone: None,
    };
    for x in a.nested() {
        let x = match x {
            Ok(x) => x,
            Err(e) => {
                bad.get_or_insert(format!("tuple: {e}"));
                break;
            }
        };
        match x.kind {
            CTA_TUPLE_IP => {
                for ip in x.nested() {
                    let Ok(ip) =
                        ip.map_err(|e| bad.get_or_insert(format!("tuple ip: {e}")).clone())
                    else {
                        break;
                    };
                    match ip.kind {
                        CTA_IP_V4_SRC | CTA_IP_V6_SRC => src = ip_of(&ip),
                        CTA_IP_V4_DST | CTA_IP_V6_DST => dst = ip_of(&ip),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for p in x.nested() {
                    let Ok(p) =
                        p.map_err(|e| bad.get_or_insert(format!("tuple proto: {e}")).clone())
                    else {
                        break;
                    };
                    match p.kind {
                        CTA_PROTO_NUM => proto = p.u8(),
                        CTA_PROTO_SRC_PORT => t.sport = p.be16(),
                        CTA_PROTO_DST_PORT => t.dport = p.be16(),
                        CTA_PROTO_ICMP_ID => t.icmp_id = p.be16(),
                        CTA_PROTO_ICMP_TYPE => t.icmp_type = p.u8(),
                        CTA_PROTO_ICMP_CODE => t.icmp_code = p.u8(),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_ZONE => t.zone = x.be16(),
            _ => {}
        }
    }
    t.src = src?;
    t.dst = dst?;
    t.proto = proto?;
    Some(t)
}

fn counters_of(a: &Attr) -> Option<Counters> {
    let (mut packets, mut bytes) = (None, None);
    for c in a.nested().map_while(Result::ok) {
        match c.kind {
            CTA_COUNTERS_PACKETS => packets = c.be64(),
            CTA_COUNTERS_BYTES => bytes = c.be64(),
            _ => {}
        }
    }
    Some(Counters {
        packets: packets?,
        bytes: bytes?,
    })
}

/// Decodes one conntrack entry from the attributes of an IPCTNL_MSG_CT_NEW message (the
/// bytes after the 4-byte nfgenmsg), `family` from that header.
pub fn decode_entry(family: u8, attrs_buf: &[u8]) -> Entry {
    let mut e = Entry {
        family,
        orig: None,
        reply: None,
        status: Status::default(),
        mark: None,
        zone: None,
        timeout: None,
        id: None,
        tcp_state: None,
        counters_orig: None,
        counters_reply: None,
        malformed: None,
    };
    let mut bad = None;
    for a in attrs(attrs_buf) {
        let a = match a {
            Ok(a) => a,
            Err(err) => {
                bad.get_or_insert(err.to_string());
                break;
            }
        };
        match a.kind {
            CTA_TUPLE_ORIG => e.orig = tuple_of(&a, &mut bad),
            CTA_TUPLE_REPLY => e.reply = tuple_of(&a, &mut bad),
            CTA_STATUS => e.status = Status(a.be32().unwrap_or(0)),
            CTA_MARK => e.mark = a.be32(),
            CTA_ZONE => e.zone = a.be16(),
            CTA_TIMEOUT => e.timeout = a.be32(),
            CTA_ID => e.id = a.be32(),
            CTA_PROTOINFO => {
                for p in a.nested().map_while(Result::ok) {
                    if p.kind == CTA_PROTOINFO_TCP {
                        e.tcp_state = p
                            .nested()
                            .map_while(Result::ok)
                            .find(|s| s.kind == CTA_PROTOINFO_TCP_STATE)
                            .and_then(|s| s.u8());
                    }
                }
            }
            CTA_COUNTERS_ORIG => e.counters_orig = counters_of(&a),
            CTA_COUNTERS_REPLY => e.counters_reply = counters_of(&a),
            _ => {}
        }
    }
    e.malformed = bad;
    e
}

/// Per-CPU conntrack statistics (IPCTNL_MSG_CT_GET_STATS_CPU; the same figures as a row
/// of /proc/net/stat/nf_conntrack).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct CpuStats {
    pub cpu: u16,
    pub found: u32,
    /// Packets conntrack could not track (bad headers, out-of-window TCP…): what
    /// `--ctstate INVALID -j DROP` drops.
    pub invalid: u32,
    pub insert: u32,
    /// Entries that could not be inserted (a clash that could not be resolved).
    pub insert_failed: u32,
    /// Packets dropped because a new entry could not be made (table full).
    pub drop: u32,
    /// Entries evicted early to make room (table nearly full).
    pub early_drop: u32,
    pub error: u32,
    pub search_restart: u32,
    pub clash_resolve: u32,
    pub chain_toolong: u32,
}

impl CpuStats {
    /// Adds another CPU's figures (saturating).
    pub fn add(&mut self, o: &CpuStats) {
        self.found = self.found.saturating_add(o.found);
        self.invalid = self.invalid.saturating_add(o.invalid);
        self.insert = self.insert.saturating_add(o.insert);
        self.insert_failed = self.insert_failed.saturating_add(o.insert_failed);
        self.drop = self.drop.saturating_add(o.drop);
        self.early_drop = self.early_drop.saturating_add(o.early_drop);
        self.error = self.error.saturating_add(o.error);
        self.search_restart = self.search_restart.saturating_add(o.search_restart);
        self.clash_resolve = self.clash_resolve.saturating_add(o.clash_resolve);
        self.chain_toolong = self.chain_toolong.saturating_add(o.chain_toolong);
    }
}

/// Decodes a per-CPU statistics message; `cpu` is the nfgenmsg's res_id.
pub fn decode_cpu_stats(cpu: u16, attrs_buf: &[u8]) -> CpuStats {
    let mut s = CpuStats {
        cpu,
        ..CpuStats::default()
    };
    for a in attrs(attrs_buf).map_while(Result::ok) {
        let v = a.be32().unwrap_or(0);
        match a.kind {
            CTA_STATS_FOUND => s.found = v,
            CTA_STATS_INVALID => s.invalid = v,
            CTA_STATS_INSERT => s.insert = v,
            CTA_STATS_INSERT_FAILED => s.insert_failed = v,
            CTA_STATS_DROP => s.drop = v,
            CTA_STATS_EARLY_DROP => s.early_drop = v,
            CTA_STATS_ERROR => s.error = v,
            CTA_STATS_SEARCH_RESTART => s.search_restart = v,
            CTA_STATS_CLASH_RESOLVE => s.clash_resolve = v,
            CTA_STATS_CHAIN_TOOLONG => s.chain_toolong = v,
            _ => {}
        }
    }
    s
}

/// The table's fill (IPCTNL_MSG_CT_GET_STATS): entries in this namespace and the limit
/// (`nf_conntrack_count`, `nf_conntrack_max`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct TableStats {
    pub entries: Option<u32>,
    pub max_entries: Option<u32>,
}

pub fn decode_table_stats(attrs_buf: &[u8]) -> TableStats {
    let mut t = TableStats::default();
    for a in attrs(attrs_buf).map_while(Result::ok) {
        match a.kind {
            CTA_STATS_GLOBAL_ENTRIES => t.entries = a.be32(),
            CTA_STATS_GLOBAL_MAX_ENTRIES => t.max_entries = a.be32(),
            _ => {}
        }
    }
    t
}

/// Writes a tuple as CTA_TUPLE_ORIG (or `which`) for a get request.
pub fn encode_tuple(w: &mut Writer, which: u16, t: &Tuple) {
    w.nest(which, |w| {
        w.nest(CTA_TUPLE_IP, |w| match (t.src, t.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                w.put(CTA_IP_V4_SRC, &s.octets());
                w.put(CTA_IP_V4_DST, &d.octets());
            }
            (s, d) => {
                let v6 = |a: IpAddr| match a {
                    IpAddr::V4(v) => v.to_ipv6_mapped(),
                    IpAddr::V6(v) => v,
                };
                w.put(CTA_IP_V6_SRC, &v6(s).octets());
                w.put(CTA_IP_V6_DST, &v6(d).octets());
            }
        });
        w.nest(CTA_TUPLE_PROTO, |w| {
            w.put(CTA_PROTO_NUM, &[t.proto]);
            if let Some(p) = t.sport {
                w.put(CTA_PROTO_SRC_PORT, &p.to_be_bytes());
            }
            if let Some(p) = t.dport {
                w.put(CTA_PROTO_DST_PORT, &p.to_be_bytes());
            }
            if let Some(id) = t.icmp_id {
                w.put(CTA_PROTO_ICMP_ID, &id.to_be_bytes());
            }
            if let Some(ty) = t.icmp_type {
                w.put(CTA_PROTO_ICMP_TYPE, &[ty]);
            }
            if let Some(c) = t.icmp_code {
                w.put(CTA_PROTO_ICMP_CODE, &[c]);
            }
        });
    });
}
