//! The capture filter: a subset of tcpdump's filter language (pcap-filter(7)), evaluated in
//! userspace against a [`PacketSummary`].
//!
//! # Supported
//!
//! | primitive | matches |
//! |---|---|
//! | `host A`, `src host A`, `dst host A`, `src A`, `dst A`, bare `A` | IPv4 source and/or destination address `A` |
//! | `net N/LEN`, `net N mask M`, `net 10.244` (abbreviated: /8, /16, /24), with `src`/`dst` | address within the network |
//! | `port N`, `src port N`, `dst port N`, `tcp port N`, `udp dst port N` | TCP or UDP port (the protocol only if given) |
//! | `tcp`, `udp`, `icmp`, `ip`, `proto N`, `ip proto N` / `ip proto \tcp` | IP protocol / any IPv4 |
//! | `src or dst ...`, `src and dst ...` | either / both addresses or ports |
//!
//! combined with `and`/`&&`, `or`/`||`, `not`/`!` and parentheses. The words of the command
//! line (`EXPR...`) are joined with spaces first, as tcpdump does.
//!
//! **Precedence is tcpdump's**: `not` binds tightest, while `and` and `or` have *equal*
//! precedence and associate left to right, so `host A or host B and tcp` means
//! `(host A or host B) and tcp`. As in tcpdump, a bare value after `and`/`or` repeats the
//! previous qualifiers: `port 80 or 443` is `port 80 or port 443`, and `not host A and B`
//! is `not host A and host B`.
//!
//! For VXLAN frames the filter sees the **inner** (pod) headers (see
//! [`parse_ethernet`](super::parse_ethernet)), so `host 10.244.1.5` matches that pod's traffic
//! on the underlay too, and `udp port 8472` does not match VXLAN frames.
//!
//! # Not supported
//!
//! Everything else (`portrange`, `ether`, `arp`, `ip6`, `vlan`, `less`/`greater`, byte
//! offsets like `tcp[13]`, host names, port names, ...) is rejected with a
//! [`FilterError`] naming the word, e.g. ``unsupported filter syntax near "portrange": ...``.
//! IPv6 is not supported. Only IPv4 packets can match a primitive (`host` does not match ARP
//! as it does in tcpdump).

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use super::packet::{PacketSummary, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};

const SUPPORTED: &str = "supported: host, net, port, src, dst, tcp, udp, icmp, ip, proto, \
                         and/or/not (&&, ||, !) and parentheses";

/// Which address or port of a packet a primitive looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dir {
    /// Source or destination (the default).
    SrcOrDst,
    /// Source only (`src`).
    Src,
    /// Destination only (`dst`).
    Dst,
    /// Both source and destination (`src and dst`).
    SrcAndDst,
}

impl Dir {
    fn test<T: Copy>(self, src: T, dst: T, f: impl Fn(T) -> bool) -> bool {
        match self {
            Dir::SrcOrDst => f(src) || f(dst),
            Dir::Src => f(src),
            Dir::Dst => f(dst),
            Dir::SrcAndDst => f(src) && f(dst),
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            Dir::SrcOrDst => "",
            Dir::Src => "src ",
            Dir::Dst => "dst ",
            Dir::SrcAndDst => "src and dst ",
        }
    }
}

/// An IPv4 network: an address and a mask (usually a prefix, as from `net A/LEN`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Net {
    addr: Ipv4Addr,
    mask: u32,
}

impl Ipv4Net {
    /// The network `addr/prefix_len`. `None` if `prefix_len > 32` or host bits are set.
    pub fn new(addr: Ipv4Addr, prefix_len: u8) -> Option<Self> {
        if prefix_len > 32 {
            return None;
        }
        Self::with_mask(addr, prefix_mask(prefix_len))
    }

    /// The network `addr mask mask`. `None` if `addr` has bits outside `mask`.
    pub fn with_mask(addr: Ipv4Addr, mask: u32) -> Option<Self> {
        (u32::from(addr) & !mask == 0).then_some(Ipv4Net { addr, mask })
    }

    /// A single host, `addr/32`.
    pub fn host(addr: Ipv4Addr) -> Self {
        Ipv4Net {
            addr,
            mask: u32::MAX,
        }
    }

    /// The network address.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The mask as a 32-bit number (`0xffff0000` for /16).
    pub fn mask(&self) -> u32 {
        self.mask
    }

    /// The prefix length, if the mask is a prefix.
    pub fn prefix_len(&self) -> Option<u8> {
        let ones = self.mask.leading_ones();
        (prefix_mask(ones as u8) == self.mask).then_some(ones as u8)
    }

    /// Whether `a` lies in this network.
    pub fn contains(&self, a: Ipv4Addr) -> bool {
        u32::from(a) & self.mask == u32::from(self.addr)
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.prefix_len() {
            Some(len) => write!(f, "{}/{}", self.addr, len),
            None => write!(f, "{} mask {}", self.addr, Ipv4Addr::from(self.mask)),
        }
    }
}

fn prefix_mask(len: u8) -> u32 {
    match len {
        0 => 0,
        n => u32::MAX << (32 - u32::from(n.min(32))),
    }
}

/// One test of the filter language.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Primitive {
    /// `ip`: any IPv4 packet.
    Ip,
    /// `tcp`, `udp`, `icmp`, `proto N`: the IP protocol number.
    Proto(u8),
    /// `host A` with its direction.
    Host {
        /// Which address(es) to compare.
        dir: Dir,
        /// The address.
        addr: Ipv4Addr,
    },
    /// `net N` with its direction.
    Net {
        /// Which address(es) to compare.
        dir: Dir,
        /// The network.
        net: Ipv4Net,
    },
    /// `port N`, optionally restricted to one protocol (`tcp port N`).
    Port {
        /// Which port(s) to compare.
        dir: Dir,
        /// `Some(6)` / `Some(17)` for `tcp port` / `udp port`; `None`: TCP or UDP.
        proto: Option<u8>,
        /// The port.
        port: u16,
    },
}

impl Primitive {
    fn matches(&self, p: &PacketSummary) -> bool {
        let Some(ip) = p.ip else {
            return false;
        };
        match *self {
            Primitive::Ip => true,
            Primitive::Proto(n) => ip.protocol == n,
            Primitive::Host { dir, addr } => dir.test(ip.src, ip.dst, |a| a == addr),
            Primitive::Net { dir, net } => dir.test(ip.src, ip.dst, |a| net.contains(a)),
            Primitive::Port { dir, proto, port } => {
                let proto_ok = match proto {
                    Some(n) => ip.protocol == n,
                    None => ip.protocol == IPPROTO_TCP || ip.protocol == IPPROTO_UDP,
                };
                proto_ok
                    && ip
                        .ports
                        .is_some_and(|ports| dir.test(ports.src, ports.dst, |x| x == port))
            }
        }
    }
}

fn proto_name(n: u8) -> Option<&'static str> {
    match n {
        IPPROTO_TCP => Some("tcp"),
        IPPROTO_UDP => Some("udp"),
        IPPROTO_ICMP => Some("icmp"),
        _ => None,
    }
}

impl fmt::Display for Primitive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Primitive::Ip => f.write_str("ip"),
            Primitive::Proto(n) => match proto_name(n) {
                Some(name) => f.write_str(name),
                None => write!(f, "ip proto {n}"),
            },
            Primitive::Host { dir, addr } => write!(f, "{}host {}", dir.prefix(), addr),
            Primitive::Net { dir, net } => write!(f, "{}net {}", dir.prefix(), net),
            Primitive::Port { dir, proto, port } => {
                if let Some(name) = proto.and_then(proto_name) {
                    write!(f, "{name} ")?;
                }
                write!(f, "{}port {}", dir.prefix(), port)
            }
        }
    }
}

/// A parsed filter expression.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Expr {
    /// A single test.
    Prim(Primitive),
    /// `not E`.
    Not(Box<Expr>),
    /// `A and B`.
    And(Box<Expr>, Box<Expr>),
    /// `A or B`.
    Or(Box<Expr>, Box<Expr>),
}

impl Expr {
    /// Evaluate against a packet.
    pub fn matches(&self, p: &PacketSummary) -> bool {
        match self {
            Expr::Prim(prim) => prim.matches(p),
            Expr::Not(e) => !e.matches(p),
            Expr::And(a, b) => a.matches(p) && b.matches(p),
            Expr::Or(a, b) => a.matches(p) || b.matches(p),
        }
    }

    fn is_binary(&self) -> bool {
        matches!(self, Expr::And(..) | Expr::Or(..))
    }
}

impl fmt::Display for Expr {
    /// A canonical form that parses back to an equivalent expression; parentheses make the
    /// grouping explicit wherever `and` and `or` are mixed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn side(f: &mut fmt::Formatter<'_>, e: &Expr, parent_is_and: bool) -> fmt::Result {
            let differs = match e {
                Expr::And(..) => !parent_is_and,
                Expr::Or(..) => parent_is_and,
                _ => false,
            };
            if differs {
                write!(f, "({e})")
            } else {
                write!(f, "{e}")
            }
        }
        match self {
            Expr::Prim(p) => write!(f, "{p}"),
            Expr::Not(e) if e.is_binary() => write!(f, "not ({e})"),
            Expr::Not(e) => write!(f, "not {e}"),
            Expr::And(a, b) => {
                side(f, a, true)?;
                f.write_str(" and ")?;
                side(f, b, true)
            }
            Expr::Or(a, b) => {
                side(f, a, false)?;
                f.write_str(" or ")?;
                side(f, b, false)
            }
        }
    }
}

/// Whether a [`FilterError`] is about syntax podtrace does not implement or a malformed
/// expression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterErrorKind {
    /// Valid tcpdump syntax (or a plausible extension) that podtrace does not implement.
    Unsupported,
    /// Not a valid expression (unbalanced parentheses, a missing value, a bad address...).
    Invalid,
}

/// Why a filter expression was rejected. The caller exits with status 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterError {
    kind: FilterErrorKind,
    near: String,
    detail: String,
}

impl FilterError {
    fn unsupported(near: &str, detail: impl Into<String>) -> Self {
        FilterError {
            kind: FilterErrorKind::Unsupported,
            near: near.to_string(),
            detail: detail.into(),
        }
    }

    fn invalid(near: &str, detail: impl Into<String>) -> Self {
        FilterError {
            kind: FilterErrorKind::Invalid,
            near: near.to_string(),
            detail: detail.into(),
        }
    }

    /// Unsupported or invalid.
    pub fn kind(&self) -> FilterErrorKind {
        self.kind
    }

    /// The word of the expression the error is about.
    pub fn near(&self) -> &str {
        &self.near
    }
}

impl fmt::Display for FilterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            FilterErrorKind::Unsupported => "unsupported filter syntax",
            FilterErrorKind::Invalid => "invalid filter expression",
        };
        write!(f, "{what} near {:?}: {}", self.near, self.detail)
    }
}

impl std::error::Error for FilterError {}

/// A capture filter: the parsed expression plus the text it came from.
///
/// An empty expression matches every packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureFilter {
    text: String,
    expr: Option<Expr>,
}

impl CaptureFilter {
    /// A filter that matches everything (no expression given).
    pub fn match_all() -> Self {
        CaptureFilter {
            text: String::new(),
            expr: None,
        }
    }

    /// Parse the expression words of a command line (`EXPR...`), joined with spaces as
    /// tcpdump does, so `["host", "10.0.0.1", "and", "tcp"]` and `["host 10.0.0.1 and tcp"]`
    /// are the same filter.
    pub fn parse_args<I, S>(words: I) -> Result<Self, FilterError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let joined = words
            .into_iter()
            .map(|w| w.as_ref().to_string())
            .collect::<Vec<_>>()
            .join(" ");
        Self::parse(&joined)
    }

    /// Parse one expression string.
    pub fn parse(text: &str) -> Result<Self, FilterError> {
        let tokens = tokenize(text)?;
        let expr = if tokens.is_empty() {
            None
        } else {
            let mut p = Parser {
                tokens,
                pos: 0,
                last_quals: None,
            };
            let e = p.expr()?;
            if let Some(t) = p.peek() {
                let near = t.text.clone();
                return Err(match t.kind {
                    TokKind::RParen => FilterError::invalid(&near, "unbalanced parenthesis"),
                    _ => {
                        FilterError::invalid(&near, "expected 'and' or 'or' between two primitives")
                    }
                });
            }
            Some(e)
        };
        Ok(CaptureFilter {
            text: text.trim().to_string(),
            expr,
        })
    }

    /// Whether the packet passes the filter.
    pub fn matches(&self, p: &PacketSummary) -> bool {
        self.expr.as_ref().is_none_or(|e| e.matches(p))
    }

    /// Whether this filter accepts every packet (no expression).
    pub fn is_match_all(&self) -> bool {
        self.expr.is_none()
    }

    /// The expression as the user wrote it (words joined with spaces); empty for
    /// [`match_all`](Self::match_all). Recorded in pcapng `if_filter`.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The parsed expression, `None` for match-all.
    pub fn expr(&self) -> Option<&Expr> {
        self.expr.as_ref()
    }

    /// Necessary conditions for a match, e.g. for a cheaper first-stage filter in the kernel.
    /// See [`PreFilter`].
    pub fn prefilter(&self) -> PreFilter {
        self.expr
            .as_ref()
            .map(PreFilter::of)
            .unwrap_or_else(PreFilter::unconstrained)
    }
}

impl Default for CaptureFilter {
    fn default() -> Self {
        Self::match_all()
    }
}

impl FromStr for CaptureFilter {
    type Err = FilterError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for CaptureFilter {
    /// The canonical form of the expression (empty for match-all).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.expr {
            Some(e) => write!(f, "{e}"),
            None => Ok(()),
        }
    }
}

/// A conservative summary of what a packet must have to match a filter: every packet the
/// filter accepts satisfies every constraint here (the converse need not hold). A `None`
/// field means "no constraint". Like the filter, it applies to the inner headers of VXLAN
/// frames.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PreFilter {
    /// The IP protocol is one of these.
    pub protocols: Option<BTreeSet<u8>>,
    /// The source or the destination address lies in one of these networks (hosts are /32).
    pub networks: Option<BTreeSet<Ipv4Net>>,
    /// The source or the destination port is one of these.
    pub ports: Option<BTreeSet<u16>>,
}

impl PreFilter {
    /// No constraint at all.
    pub fn unconstrained() -> Self {
        PreFilter::default()
    }

    /// Whether a packet satisfies the constraints (a necessary condition for the filter).
    pub fn may_match(&self, p: &PacketSummary) -> bool {
        let constrained =
            self.protocols.is_some() || self.networks.is_some() || self.ports.is_some();
        let Some(ip) = p.ip else {
            return !constrained;
        };
        if let Some(protos) = &self.protocols {
            if !protos.contains(&ip.protocol) {
                return false;
            }
        }
        if let Some(nets) = &self.networks {
            if !nets
                .iter()
                .any(|n| n.contains(ip.src) || n.contains(ip.dst))
            {
                return false;
            }
        }
        if let Some(ports) = &self.ports {
            match ip.ports {
                Some(pp) if ports.contains(&pp.src) || ports.contains(&pp.dst) => {}
                _ => return false,
            }
        }
        true
    }

    fn of(e: &Expr) -> PreFilter {
        match e {
            Expr::Prim(p) => match *p {
                Primitive::Ip => PreFilter::default(),
                Primitive::Proto(n) => PreFilter {
                    protocols: Some([n].into()),
                    ..Default::default()
                },
                Primitive::Host { addr, .. } => PreFilter {
                    networks: Some([Ipv4Net::host(addr)].into()),
                    ..Default::default()
                },
                Primitive::Net { net, .. } => PreFilter {
                    networks: Some([net].into()),
                    ..Default::default()
                },
                Primitive::Port { proto, port, .. } => PreFilter {
                    protocols: Some(match proto {
                        Some(n) => [n].into(),
                        None => [IPPROTO_TCP, IPPROTO_UDP].into(),
                    }),
                    ports: Some([port].into()),
                    ..Default::default()
                },
            },
            // A negation promises nothing.
            Expr::Not(_) => PreFilter::default(),
            Expr::And(a, b) => {
                let (a, b) = (Self::of(a), Self::of(b));
                PreFilter {
                    // A packet has one protocol: it must be in both sets.
                    protocols: both(a.protocols, b.protocols, |x, y| &x & &y),
                    // Two addresses/ports: "one in A" and "one in B" does not mean "one in
                    // A∩B", so keep either constraint (the tighter one).
                    networks: both(a.networks, b.networks, smaller),
                    ports: both(a.ports, b.ports, smaller),
                }
            }
            Expr::Or(a, b) => {
                let (a, b) = (Self::of(a), Self::of(b));
                PreFilter {
                    protocols: either(a.protocols, b.protocols),
                    networks: either(a.networks, b.networks),
                    ports: either(a.ports, b.ports),
                }
            }
        }
    }
}

fn both<T>(a: Option<T>, b: Option<T>, f: impl FnOnce(T, T) -> T) -> Option<T> {
    match (a, b) {
        (Some(x), Some(y)) => Some(f(x, y)),
        (x, None) => x,
        (None, y) => y,
    }
}

fn either<T: Ord>(a: Option<BTreeSet<T>>, b: Option<BTreeSet<T>>) -> Option<BTreeSet<T>> {
    match (a, b) {
        (Some(mut x), Some(y)) => {
            x.extend(y);
            Some(x)
        }
        _ => None,
    }
}

fn smaller<T>(a: BTreeSet<T>, b: BTreeSet<T>) -> BTreeSet<T> {
    if b.len() < a.len() {
        b
    } else {
        a
    }
}

// ---------------------------------------------------------------------------------------
// Lexer

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokKind {
    LParen,
    RParen,
    Not,
    And,
    Or,
    Word,
}

#[derive(Debug, Clone)]
struct Token {
    kind: TokKind,
    text: String,
}

fn tokenize(s: &str) -> Result<Vec<Token>, FilterError> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let push = |out: &mut Vec<Token>, kind, text: &str| {
        out.push(Token {
            kind,
            text: text.to_string(),
        })
    };
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c == b'(' {
            push(&mut out, TokKind::LParen, "(");
            i += 1;
        } else if c == b')' {
            push(&mut out, TokKind::RParen, ")");
            i += 1;
        } else if c == b'!' && b.get(i + 1) != Some(&b'=') {
            push(&mut out, TokKind::Not, "!");
            i += 1;
        } else if s[i..].starts_with("&&") {
            push(&mut out, TokKind::And, "&&");
            i += 2;
        } else if s[i..].starts_with("||") {
            push(&mut out, TokKind::Or, "||");
            i += 2;
        } else {
            let start = i;
            while i < b.len() {
                let c = b[i];
                if c.is_ascii_whitespace()
                    || c == b'('
                    || c == b')'
                    || s[i..].starts_with("&&")
                    || s[i..].starts_with("||")
                {
                    break;
                }
                i += 1;
            }
            // Only ASCII bytes end a word, so `start..i` is on char boundaries.
            let word = &s[start..i];
            let kind = match word.to_ascii_lowercase().as_str() {
                "and" => TokKind::And,
                "or" => TokKind::Or,
                "not" => TokKind::Not,
                _ => TokKind::Word,
            };
            if kind == TokKind::Word {
                check_word_chars(word)?;
            }
            push(&mut out, kind, word);
        }
    }
    Ok(out)
}

/// Reject operator characters early, with a message about what they are for in tcpdump.
fn check_word_chars(word: &str) -> Result<(), FilterError> {
    if word.contains(['[', ']']) {
        return Err(FilterError::unsupported(
            word,
            "byte-offset expressions like tcp[13] are not supported",
        ));
    }
    if word.contains(['=', '<', '>', '+', '*', '&', '|', '^', '%']) {
        return Err(FilterError::unsupported(
            word,
            "arithmetic and comparison expressions are not supported",
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Parser

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProtoQual {
    Ip,
    Tcp,
    Udp,
    Icmp,
}

impl ProtoQual {
    fn number(self) -> Option<u8> {
        match self {
            ProtoQual::Ip => None,
            ProtoQual::Tcp => Some(IPPROTO_TCP),
            ProtoQual::Udp => Some(IPPROTO_UDP),
            ProtoQual::Icmp => Some(IPPROTO_ICMP),
        }
    }

    fn name(self) -> &'static str {
        match self {
            ProtoQual::Ip => "ip",
            ProtoQual::Tcp => "tcp",
            ProtoQual::Udp => "udp",
            ProtoQual::Icmp => "icmp",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TypeQual {
    Host,
    Net,
    Port,
    Proto,
}

/// The qualifiers written before a value; repeated for a bare value after `and`/`or`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Quals {
    proto: Option<ProtoQual>,
    dir: Option<Dir>,
    typ: Option<TypeQual>,
}

enum Keyword {
    Proto(ProtoQual),
    Src,
    Dst,
    Type(TypeQual),
    Mask,
}

fn keyword(word: &str) -> Option<Keyword> {
    Some(match word.to_ascii_lowercase().as_str() {
        "ip" => Keyword::Proto(ProtoQual::Ip),
        "tcp" => Keyword::Proto(ProtoQual::Tcp),
        "udp" => Keyword::Proto(ProtoQual::Udp),
        "icmp" => Keyword::Proto(ProtoQual::Icmp),
        "src" => Keyword::Src,
        "dst" => Keyword::Dst,
        "host" => Keyword::Type(TypeQual::Host),
        "net" => Keyword::Type(TypeQual::Net),
        "port" => Keyword::Type(TypeQual::Port),
        "proto" => Keyword::Type(TypeQual::Proto),
        "mask" => Keyword::Mask,
        _ => return None,
    })
}

/// tcpdump keywords podtrace does not implement, with what they do there.
fn unsupported_keyword(word: &str) -> Option<&'static str> {
    Some(match word.to_ascii_lowercase().as_str() {
        "portrange" => "port ranges are not supported; combine ports with 'or'",
        "ether" | "link" | "fddi" | "tr" | "wlan" | "ppp" | "slip" => {
            "link-layer (MAC address) filters are not supported"
        }
        "ip6" | "icmp6" => "IPv6 is not supported",
        "arp" | "rarp" => "ARP is not supported (only IPv4 packets can match)",
        "vlan" | "mpls" | "pppoed" | "pppoes" | "geneve" => {
            "encapsulation filters are not supported (VXLAN is looked into automatically)"
        }
        "less" | "greater" | "len" => "packet length filters are not supported",
        "gateway" => "'gateway' is not supported",
        "broadcast" | "multicast" => "broadcast/multicast filters are not supported",
        "sctp" | "igmp" | "igrp" | "pim" | "vrrp" | "carp" | "ah" | "esp" => {
            "only tcp, udp and icmp are named; use 'ip proto N'"
        }
        "inbound" | "outbound" | "ifname" | "on" | "dir" | "type" | "subtype" | "reason"
        | "rset" | "rnr" | "srnr" | "action" | "rulenum" | "ruleset" | "srcrule" => {
            "interface/direction qualifiers are not supported (podtrace records direction per packet)"
        }
        "decnet" | "iso" | "atalk" | "aarp" | "ipx" | "netbeui" | "stp" | "lat" | "moprc"
        | "mopdl" | "sca" | "llc" | "clnp" | "esis" | "isis" | "l1" | "l2" | "iih" | "lsp"
        | "snp" | "csnp" | "psnp" | "radio" => "this protocol is not supported",
        "ra" | "ta" | "addr1" | "addr2" | "addr3" | "addr4" | "bssid" => {
            "802.11 qualifiers are not supported"
        }
        "protochain" => "'protochain' is not supported; use 'ip proto N'",
        _ => return None,
    })
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
    /// Qualifiers of the last primitive that had a value, for bare values (`port 1 or 2`).
    last_quals: Option<Quals>,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn peek_kind(&self, ahead: usize) -> Option<TokKind> {
        self.tokens.get(self.pos + ahead).map(|t| t.kind)
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.pos).cloned();
        if t.is_some() {
            self.pos += 1;
        }
        t
    }

    /// Text of the previous token, for "missing value" errors at the end of input.
    fn prev_text(&self) -> String {
        self.pos
            .checked_sub(1)
            .and_then(|i| self.tokens.get(i))
            .map(|t| t.text.clone())
            .unwrap_or_default()
    }

    /// expr := term (('and' | 'or') term)*, left-associative with equal precedence.
    fn expr(&mut self) -> Result<Expr, FilterError> {
        let mut left = self.term()?;
        loop {
            match self.peek_kind(0) {
                Some(TokKind::And) => {
                    self.pos += 1;
                    let right = self.term()?;
                    left = Expr::And(Box::new(left), Box::new(right));
                }
                Some(TokKind::Or) => {
                    self.pos += 1;
                    let right = self.term()?;
                    left = Expr::Or(Box::new(left), Box::new(right));
                }
                _ => return Ok(left),
            }
        }
    }

    /// term := ('not' | '!') term | '(' expr ')' | primitive
    fn term(&mut self) -> Result<Expr, FilterError> {
        let Some(tok) = self.next() else {
            let prev = self.prev_text();
            return Err(FilterError::invalid(
                &prev,
                format!("expression ends after {prev:?}; a primitive is missing"),
            ));
        };
        match tok.kind {
            TokKind::Not => Ok(Expr::Not(Box::new(self.term()?))),
            TokKind::LParen => {
                let e = self.expr()?;
                match self.next() {
                    Some(t) if t.kind == TokKind::RParen => Ok(e),
                    Some(t) => Err(FilterError::invalid(&t.text, "expected 'and', 'or' or ')'")),
                    None => Err(FilterError::invalid(
                        "(",
                        "unbalanced parenthesis: missing ')'",
                    )),
                }
            }
            TokKind::RParen => Err(FilterError::invalid(
                ")",
                "unexpected ')': a primitive is missing",
            )),
            TokKind::And | TokKind::Or => Err(FilterError::invalid(
                &tok.text,
                format!("{:?} needs a primitive on its left", tok.text),
            )),
            TokKind::Word => self.primitive(tok).map(Expr::Prim),
        }
    }

    fn primitive(&mut self, first: Token) -> Result<Primitive, FilterError> {
        let mut quals = Quals {
            proto: None,
            dir: None,
            typ: None,
        };
        let mut tok = first;

        match keyword(&tok.text) {
            None => {
                // A bare value: repeat the previous qualifiers (tcpdump's abbreviation).
                if let Some(why) = unsupported_keyword(&tok.text) {
                    return Err(FilterError::unsupported(
                        &tok.text,
                        format!("{why}; {SUPPORTED}"),
                    ));
                }
                let q = self.last_quals.unwrap_or(quals);
                return self.value(q, &tok, true);
            }
            Some(Keyword::Mask) => {
                return Err(FilterError::invalid(
                    &tok.text,
                    "'mask' must follow 'net ADDRESS'",
                ));
            }
            Some(Keyword::Proto(p)) => {
                quals.proto = Some(p);
                // Alone (`tcp`, `ip`), or qualifying what follows (`tcp port 80`).
                let qualifies = self
                    .peek()
                    .filter(|t| t.kind == TokKind::Word)
                    .and_then(|t| keyword(&t.text))
                    .is_some_and(|k| matches!(k, Keyword::Src | Keyword::Dst | Keyword::Type(_)));
                if !qualifies {
                    return Ok(match p.number() {
                        Some(n) => Primitive::Proto(n),
                        None => Primitive::Ip,
                    });
                }
                tok = self.next().expect("peeked");
            }
            Some(_) => {}
        }

        if let Some(k @ (Keyword::Src | Keyword::Dst)) = keyword(&tok.text) {
            let first_src = matches!(k, Keyword::Src);
            quals.dir = Some(if first_src { Dir::Src } else { Dir::Dst });
            // `src or dst`, `dst or src`, `src and dst`, `dst and src`.
            let combo = matches!(self.peek_kind(0), Some(TokKind::And | TokKind::Or))
                && self.tokens.get(self.pos + 1).is_some_and(|t| {
                    t.kind == TokKind::Word
                        && matches!(
                            (first_src, keyword(&t.text)),
                            (true, Some(Keyword::Dst)) | (false, Some(Keyword::Src))
                        )
                });
            if combo {
                let op = self.next().expect("peeked");
                self.next();
                quals.dir = Some(if op.kind == TokKind::Or {
                    Dir::SrcOrDst
                } else {
                    Dir::SrcAndDst
                });
            }
            tok = self.value_token(&tok)?;
        }

        if let Some(Keyword::Type(t)) = keyword(&tok.text) {
            quals.typ = Some(t);
            tok = self.value_token(&tok)?;
        }

        match keyword(&tok.text) {
            // `proto tcp`: tcpdump wants `proto \tcp`; the unescaped name is accepted too.
            Some(Keyword::Proto(_)) if quals.typ == Some(TypeQual::Proto) => {
                self.value(quals, &tok, false)
            }
            Some(Keyword::Proto(_) | Keyword::Src | Keyword::Dst) => Err(FilterError::invalid(
                &tok.text,
                "qualifiers are out of order; tcpdump's order is [tcp|udp|icmp|ip] [src|dst] [host|net|port|proto] VALUE",
            )),
            Some(_) => Err(FilterError::invalid(
                &tok.text,
                format!("expected a value, found the keyword {:?}", tok.text),
            )),
            None => self.value(quals, &tok, false),
        }
    }

    /// The token after a qualifier, which must be a word.
    fn value_token(&mut self, qualifier: &Token) -> Result<Token, FilterError> {
        match self.next() {
            Some(t) if t.kind == TokKind::Word => {
                if let Some(why) = unsupported_keyword(&t.text) {
                    return Err(FilterError::unsupported(
                        &t.text,
                        format!("{why}; {SUPPORTED}"),
                    ));
                }
                Ok(t)
            }
            _ => Err(FilterError::invalid(
                &qualifier.text,
                format!("a value is missing after {:?}", qualifier.text),
            )),
        }
    }

    /// Build the primitive for `quals VALUE`.
    fn value(&mut self, quals: Quals, tok: &Token, bare: bool) -> Result<Primitive, FilterError> {
        let word = tok.text.as_str();
        let dir = quals.dir.unwrap_or(Dir::SrcOrDst);
        let typ = match quals.typ {
            Some(t) => t,
            None if word.contains('/') => TypeQual::Net,
            None if parse_full_ipv4(word).is_some() => TypeQual::Host,
            None => {
                return Err(classify_bad_value(word).unwrap_or_else(|| {
                    if bare && word.bytes().all(|c| c.is_ascii_digit()) {
                        FilterError::invalid(
                            word,
                            "a bare number needs a qualifier: write 'port N' or 'proto N'",
                        )
                    } else {
                        FilterError::unsupported(word, format!("unknown word; {SUPPORTED}"))
                    }
                }))
            }
        };
        if let Some(p) = quals.proto {
            let ok = match typ {
                TypeQual::Host | TypeQual::Net => p == ProtoQual::Ip,
                TypeQual::Port => matches!(p, ProtoQual::Tcp | ProtoQual::Udp),
                TypeQual::Proto => p == ProtoQual::Ip,
            };
            if !ok {
                return Err(FilterError::invalid(
                    p.name(),
                    format!("'{}' cannot qualify '{}'", p.name(), type_name(typ)),
                ));
            }
        }
        if typ == TypeQual::Proto && quals.dir.is_some() {
            return Err(FilterError::invalid(
                word,
                "'src'/'dst' cannot qualify 'proto'",
            ));
        }
        let prim = match typ {
            TypeQual::Host => {
                if word.contains('/') {
                    return Err(FilterError::invalid(
                        word,
                        "mask syntax is for networks only: write 'net A/LEN'",
                    ));
                }
                let addr = parse_full_ipv4(word).ok_or_else(|| {
                    classify_bad_value(word)
                        .unwrap_or_else(|| FilterError::invalid(word, "not an IPv4 address"))
                })?;
                Primitive::Host { dir, addr }
            }
            TypeQual::Net => Primitive::Net {
                dir,
                net: self.net(word)?,
            },
            TypeQual::Port => {
                let port = word.parse::<u16>().map_err(|_| {
                    if word.bytes().all(|c| c.is_ascii_digit()) {
                        FilterError::invalid(word, "port out of range (0-65535)")
                    } else if word.contains('-') {
                        FilterError::unsupported(word, "port ranges are not supported")
                    } else {
                        FilterError::unsupported(
                            word,
                            "port names are not supported; give the port number",
                        )
                    }
                })?;
                Primitive::Port {
                    dir,
                    proto: quals.proto.and_then(ProtoQual::number),
                    port,
                }
            }
            TypeQual::Proto => Primitive::Proto(parse_proto(word)?),
        };
        self.last_quals = Some(quals);
        Ok(prim)
    }

    /// `net A/LEN`, `net A mask M`, or an abbreviated network `net 10.244`.
    fn net(&mut self, word: &str) -> Result<Ipv4Net, FilterError> {
        let bad_bits = || FilterError::invalid(word, format!("non-network bits set in {word:?}"));
        if let Some((addr, len)) = word.split_once('/') {
            let (a, _) = parse_partial_ipv4(addr)
                .ok_or_else(|| FilterError::invalid(word, "not an IPv4 network"))?;
            let len: u8 = len
                .parse()
                .ok()
                .filter(|l| *l <= 32)
                .ok_or_else(|| FilterError::invalid(word, "prefix length must be 0-32"))?;
            return Ipv4Net::new(a, len).ok_or_else(bad_bits);
        }
        let (a, octets) = parse_partial_ipv4(word).ok_or_else(|| {
            classify_bad_value(word)
                .unwrap_or_else(|| FilterError::invalid(word, "not an IPv4 network"))
        })?;
        let is_mask = self.peek().is_some_and(|t| {
            t.kind == TokKind::Word && matches!(keyword(&t.text), Some(Keyword::Mask))
        });
        if is_mask {
            let mask_tok = self.next().expect("peeked");
            let m = self.value_token(&mask_tok)?;
            let mask = parse_full_ipv4(&m.text)
                .ok_or_else(|| FilterError::invalid(&m.text, "mask must be a dotted IPv4 mask"))?;
            return Ipv4Net::with_mask(a, u32::from(mask)).ok_or_else(bad_bits);
        }
        // As in libpcap: 10 -> /8, 10.244 -> /16, 10.244.1 -> /24, a full address -> /32.
        Ipv4Net::new(a, 8 * octets).ok_or_else(bad_bits)
    }
}

fn type_name(t: TypeQual) -> &'static str {
    match t {
        TypeQual::Host => "host",
        TypeQual::Net => "net",
        TypeQual::Port => "port",
        TypeQual::Proto => "proto",
    }
}

fn parse_full_ipv4(s: &str) -> Option<Ipv4Addr> {
    match parse_partial_ipv4(s) {
        Some((a, 4)) => Some(a),
        _ => None,
    }
}

/// 1 to 4 dotted decimal octets; returns the address (missing octets 0) and the count.
fn parse_partial_ipv4(s: &str) -> Option<(Ipv4Addr, u8)> {
    let mut octets = [0u8; 4];
    let mut n = 0u8;
    for part in s.split('.') {
        if n == 4 || part.is_empty() || part.len() > 3 || !part.bytes().all(|c| c.is_ascii_digit())
        {
            return None;
        }
        octets[usize::from(n)] = part.parse().ok()?;
        n += 1;
    }
    Some((Ipv4Addr::from(octets), n))
}

fn parse_proto(word: &str) -> Result<u8, FilterError> {
    let w = word.strip_prefix('\\').unwrap_or(word);
    match w.to_ascii_lowercase().as_str() {
        "tcp" => Ok(IPPROTO_TCP),
        "udp" => Ok(IPPROTO_UDP),
        "icmp" => Ok(IPPROTO_ICMP),
        _ => w.parse::<u8>().map_err(|_| {
            if w.bytes().all(|c| c.is_ascii_digit()) {
                FilterError::invalid(word, "protocol number out of range (0-255)")
            } else {
                FilterError::unsupported(
                    word,
                    "only tcp, udp, icmp or a protocol number can follow 'proto'",
                )
            }
        }),
    }
}

/// Recognise values that are well-formed in tcpdump but unsupported here.
fn classify_bad_value(word: &str) -> Option<FilterError> {
    if word.contains(':') {
        return Some(FilterError::unsupported(
            word,
            "IPv6 and MAC addresses are not supported",
        ));
    }
    let looks_like_name = word.bytes().any(|c| c.is_ascii_alphabetic())
        && word
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'-' || c == b'_');
    if looks_like_name && word.contains('.') {
        return Some(FilterError::unsupported(
            word,
            "host names are not resolved; give an IPv4 address",
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn f(s: &str) -> CaptureFilter {
        CaptureFilter::parse(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    fn tcp(src: &str, sp: u16, dst: &str, dp: u16) -> PacketSummary {
        PacketSummary::ipv4(ip(src), ip(dst), IPPROTO_TCP).with_ports(sp, dp)
    }

    fn udp(src: &str, sp: u16, dst: &str, dp: u16) -> PacketSummary {
        PacketSummary::ipv4(ip(src), ip(dst), IPPROTO_UDP).with_ports(sp, dp)
    }

    fn icmp(src: &str, dst: &str) -> PacketSummary {
        PacketSummary::ipv4(ip(src), ip(dst), IPPROTO_ICMP)
    }

    fn err(s: &str) -> FilterError {
        match CaptureFilter::parse(s) {
            Ok(flt) => panic!("{s:?} parsed as {flt}"),
            Err(e) => e,
        }
    }

    #[test]
    fn host_and_directions() {
        let p = tcp("10.244.0.9", 40000, "10.244.1.5", 80);
        for yes in [
            "host 10.244.1.5",
            "host 10.244.0.9",
            "src host 10.244.0.9",
            "dst host 10.244.1.5",
            "src 10.244.0.9",
            "dst 10.244.1.5",
            "10.244.1.5",
            "src or dst host 10.244.0.9",
            "dst or src 10.244.1.5",
            "ip host 10.244.1.5",
            "ip src 10.244.0.9",
        ] {
            assert!(f(yes).matches(&p), "{yes}");
        }
        for no in [
            "host 10.244.1.6",
            "src host 10.244.1.5",
            "dst host 10.244.0.9",
            "src 10.244.1.5",
            "dst 10.244.0.9",
            "src and dst host 10.244.0.9",
        ] {
            assert!(!f(no).matches(&p), "{no}");
        }
        assert!(f("src and dst host 10.0.0.1").matches(&icmp("10.0.0.1", "10.0.0.1")));
        assert!(f("dst and src 10.0.0.1").matches(&icmp("10.0.0.1", "10.0.0.1")));
    }

    #[test]
    fn nets() {
        let p = icmp("10.244.0.9", "10.19.16.6");
        for yes in [
            "net 10.244.0.0/16",
            "src net 10.244.0.0/24",
            "dst net 10.19.16.0/20",
            "net 10.244",
            "net 10",
            "net 10.19.16",
            "net 10.244.0.0 mask 255.255.0.0",
            "net 10.244.0.9/32",
            "net 10.244.0.9",
            "net 0.0.0.0/0",
            "src 10.244.0.0/16",
        ] {
            assert!(f(yes).matches(&p), "{yes}");
        }
        for no in [
            "net 10.245.0.0/16",
            "dst net 10.244.0.0/16",
            "src net 10.19.0.0/16",
            "net 10.19.0.0/20",
            "src and dst net 10.244.0.0/16",
        ] {
            assert!(!f(no).matches(&p), "{no}");
        }
        assert!(f("src and dst net 10.0.0.0/8").matches(&p));
        let e = err("net 10.244.1.5/16");
        assert_eq!(
            e.to_string(),
            r#"invalid filter expression near "10.244.1.5/16": non-network bits set in "10.244.1.5/16""#
        );
        assert_eq!(err("net 10.0.0.0/33").near(), "10.0.0.0/33");
        assert_eq!(
            err("net 10.244.1.5 mask 255.255.0.0").kind(),
            FilterErrorKind::Invalid
        );
        assert_eq!(err("host 10.0.0.0/8").kind(), FilterErrorKind::Invalid);
        assert_eq!(err("net 10.0.0.0 mask").near(), "mask");
    }

    #[test]
    fn ports_and_protocols() {
        let t = tcp("10.0.0.1", 40000, "10.0.0.2", 80);
        let u = udp("10.0.0.1", 53, "10.0.0.2", 33000);
        let i = icmp("10.0.0.1", "10.0.0.2");
        let cases: &[(&str, [bool; 3])] = &[
            ("port 80", [true, false, false]),
            ("port 53", [false, true, false]),
            ("src port 40000", [true, false, false]),
            ("dst port 40000", [false, false, false]),
            ("dst port 80", [true, false, false]),
            ("src port 53", [false, true, false]),
            ("tcp port 80", [true, false, false]),
            ("udp port 80", [false, false, false]),
            ("udp src port 53", [false, true, false]),
            ("src or dst port 33000", [false, true, false]),
            ("tcp", [true, false, false]),
            ("udp", [false, true, false]),
            ("icmp", [false, false, true]),
            ("ip", [true, true, true]),
            ("proto 17", [false, true, false]),
            ("ip proto 1", [false, false, true]),
            ("ip proto \\tcp", [true, false, false]),
            ("proto icmp", [false, false, true]),
            ("not ip", [false, false, false]),
        ];
        for (expr, want) in cases {
            let got = [
                f(expr).matches(&t),
                f(expr).matches(&u),
                f(expr).matches(&i),
            ];
            assert_eq!(&got, want, "{expr}");
        }
        // A TCP summary without ports (a later fragment) matches no port primitive.
        let frag = PacketSummary::ipv4(ip("10.0.0.1"), ip("10.0.0.2"), IPPROTO_TCP);
        assert!(!f("port 80").matches(&frag));
        assert!(f("tcp").matches(&frag));
    }

    #[test]
    fn non_ip_matches_nothing_but_negations() {
        let arp = PacketSummary::default();
        assert!(!f("host 10.0.0.1").matches(&arp));
        assert!(!f("ip").matches(&arp));
        assert!(!f("port 80").matches(&arp));
        assert!(f("not ip").matches(&arp));
        assert!(f("not tcp").matches(&arp));
        assert!(CaptureFilter::match_all().matches(&arp));
        assert!(f("").matches(&arp));
        assert!(f("  ").is_match_all());
    }

    #[test]
    fn operators_and_spellings() {
        let p = tcp("10.0.0.1", 1234, "10.0.0.2", 80);
        assert!(f("tcp and port 80").matches(&p));
        assert!(f("tcp && port 80").matches(&p));
        assert!(f("tcp&&port 80").matches(&p));
        assert!(!f("udp and port 80").matches(&p));
        assert!(f("udp or port 80").matches(&p));
        assert!(f("udp || port 80").matches(&p));
        assert!(f("udp||tcp").matches(&p));
        assert!(!f("not tcp").matches(&p));
        assert!(!f("! tcp").matches(&p));
        assert!(!f("!tcp").matches(&p));
        assert!(f("!udp").matches(&p));
        assert!(f("not not tcp").matches(&p));
        assert!(f("(tcp)").matches(&p));
        assert!(f("((host 10.0.0.2))and(port 80)").matches(&p));
        assert!(f("TCP AND PORT 80").matches(&p));
    }

    #[test]
    fn precedence_is_tcpdumps() {
        // and/or: equal precedence, left to right.
        let e = f("host 10.0.0.1 or host 10.0.0.2 and tcp");
        assert_eq!(e.to_string(), "(host 10.0.0.1 or host 10.0.0.2) and tcp");
        let u = udp("10.0.0.1", 1, "10.0.0.9", 2);
        // Under C-like precedence this would match (host 10.0.0.1 alone is true).
        assert!(!e.matches(&u));
        assert!(e.matches(&tcp("10.0.0.1", 1, "10.0.0.9", 2)));

        let e = f("tcp and host 10.0.0.1 or udp");
        assert_eq!(e.to_string(), "(tcp and host 10.0.0.1) or udp");
        assert!(e.matches(&udp("10.9.9.9", 1, "10.9.9.8", 2)));

        // not binds tighter than and/or.
        let e = f("not tcp and port 53");
        assert!(e.matches(&udp("10.0.0.1", 53, "10.0.0.2", 9)));
        assert!(!e.matches(&tcp("10.0.0.1", 53, "10.0.0.2", 9)));
        let e = f("not tcp or udp");
        assert_eq!(e.to_string(), "not tcp or udp");
        assert!(e.matches(&icmp("10.0.0.1", "10.0.0.2")));
        // Parentheses override.
        let e = f("not (tcp or udp)");
        assert!(e.matches(&icmp("10.0.0.1", "10.0.0.2")));
        assert!(!e.matches(&udp("10.0.0.1", 1, "10.0.0.2", 2)));
        let e = f("host 10.0.0.1 or (host 10.0.0.2 and tcp)");
        assert!(e.matches(&u));
    }

    #[test]
    fn bare_values_repeat_previous_qualifiers() {
        let e = f("port 80 or 443");
        assert_eq!(e.to_string(), "port 80 or port 443");
        assert!(e.matches(&tcp("10.0.0.1", 1, "10.0.0.2", 443)));
        let e = f("tcp dst port 21 or 20 or 53");
        assert_eq!(
            e.to_string(),
            "tcp dst port 21 or tcp dst port 20 or tcp dst port 53"
        );
        // pcap-filter(7): `not host vs and ace` is `not host vs and host ace`.
        let e = f("not host 10.0.0.1 and 10.0.0.2");
        assert_eq!(e.to_string(), "not host 10.0.0.1 and host 10.0.0.2");
        assert!(e.matches(&icmp("10.0.0.3", "10.0.0.2")));
        assert!(!e.matches(&icmp("10.0.0.1", "10.0.0.2")));
        let e = f("src net 10.244.0.0/16 or 10.19.0.0/16");
        assert_eq!(
            e.to_string(),
            "src net 10.244.0.0/16 or src net 10.19.0.0/16"
        );
        // A bare address with no previous qualifier is a host.
        assert_eq!(f("tcp and 10.0.0.1").to_string(), "tcp and host 10.0.0.1");
        assert_eq!(err("tcp or 80").kind(), FilterErrorKind::Invalid);
        // Inherited `host` with a bare CIDR is the same mistake as `host A/LEN`.
        assert_eq!(err("host 10.0.0.1 or 10.0.0.0/8").near(), "10.0.0.0/8");
    }

    #[test]
    fn args_are_joined_with_spaces() {
        let a = CaptureFilter::parse_args(["host", "10.244.1.5", "and", "(tcp", "or", "icmp)"])
            .unwrap();
        let b = CaptureFilter::parse_args(["host 10.244.1.5 and (tcp or icmp)"]).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.text(), "host 10.244.1.5 and (tcp or icmp)");
        assert!(CaptureFilter::parse_args(Vec::<String>::new())
            .unwrap()
            .is_match_all());
    }

    #[test]
    fn vxlan_inner_headers_are_matched() {
        use crate::pcap::packet::{parse_ethernet, testpkt};
        let inner = testpkt::ipv4_frame(
            ip("10.244.0.9"),
            ip("10.244.1.5"),
            IPPROTO_TCP,
            &testpkt::tcp(40000, 8080),
        );
        let frame = testpkt::vxlan_frame(ip("10.30.180.56"), ip("10.30.180.55"), 1, &inner);
        let s = parse_ethernet(&frame);
        assert!(f("host 10.244.1.5").matches(&s));
        assert!(f("src 10.244.0.9 and tcp dst port 8080").matches(&s));
        assert!(f("net 10.244.0.0/16").matches(&s));
        // The outer headers are not what the filter sees.
        assert!(!f("host 10.30.180.55").matches(&s));
        assert!(!f("udp port 8472").matches(&s));
        assert!(!f("udp").matches(&s));
    }

    #[test]
    fn unsupported_syntax_names_the_word() {
        let cases = [
            ("portrange 8000-8080", "portrange"),
            ("tcp and portrange 1-2", "portrange"),
            ("ether host 02:00:00:00:00:01", "ether"),
            ("arp", "arp"),
            ("ip6", "ip6"),
            ("vlan 100", "vlan"),
            ("less 100", "less"),
            ("host example.com", "example.com"),
            ("host fe80::1", "fe80::1"),
            ("port http", "http"),
            ("port 1-100", "1-100"),
            ("tcp[13] & 2 != 0", "tcp[13]"),
            ("ip[0]&0xf>5", "ip[0]&0xf>5"),
            ("len<=100", "len<=100"),
            ("sctp", "sctp"),
            ("ip proto gre", "gre"),
            ("frobnicate", "frobnicate"),
            ("host 10.0.0.1 and inbound", "inbound"),
            ("src portrange 1-2", "portrange"),
        ];
        for (expr, near) in cases {
            let e = err(expr);
            assert_eq!(e.kind(), FilterErrorKind::Unsupported, "{expr}: {e}");
            assert_eq!(e.near(), near, "{expr}: {e}");
            assert!(
                e.to_string()
                    .starts_with(&format!("unsupported filter syntax near \"{near}\": ")),
                "{e}"
            );
        }
    }

    #[test]
    fn malformed_expressions_are_invalid() {
        let cases = [
            ("(tcp", "("),
            ("tcp)", ")"),
            ("()", ")"),
            ("tcp and", "and"),
            ("and tcp", "and"),
            ("not", "not"),
            ("host", "host"),
            ("src", "src"),
            ("dst port", "port"),
            ("port 70000", "70000"),
            ("host 10.0.0", "10.0.0"),
            ("host 10.0.0.256", "10.0.0.256"),
            ("tcp host 10.0.0.1", "tcp"),
            ("icmp port 1", "icmp"),
            ("ip port 1", "ip"),
            ("src proto 6", "6"),
            ("proto 300", "300"),
            ("tcp udp", "udp"),
            ("host 10.0.0.1 10.0.0.2", "10.0.0.2"),
            ("host port 80", "port"),
            ("port src 80", "src"),
            ("80", "80"),
            ("mask 255.0.0.0", "mask"),
        ];
        for (expr, near) in cases {
            let e = err(expr);
            assert_eq!(e.kind(), FilterErrorKind::Invalid, "{expr}: {e}");
            assert_eq!(e.near(), near, "{expr}: {e}");
        }
    }

    fn sample_packets() -> Vec<PacketSummary> {
        let addrs = ["10.244.0.9", "10.244.1.5", "10.19.0.32", "10.0.0.1"];
        let mut v = vec![PacketSummary::default()];
        for s in addrs {
            for d in addrs {
                v.push(icmp(s, d));
                for (sp, dp) in [(80, 40000), (40000, 53), (53, 80), (443, 443)] {
                    v.push(tcp(s, sp, d, dp));
                    v.push(udp(s, sp, d, dp));
                }
                v.push(PacketSummary::ipv4(ip(s), ip(d), 47));
            }
        }
        v
    }

    const EXPRS: &[&str] = &[
        "host 10.244.1.5",
        "src 10.244.0.9 and dst port 80",
        "net 10.244.0.0/16 and not port 53",
        "tcp or udp and port 53",
        "not (host 10.0.0.1 or icmp) and port 443",
        "src net 10.19 or dst net 10.244.1 and udp",
        "ip proto 47 or tcp port 80 or 53",
        "not not icmp",
        "(host 10.244.0.9 and (port 80 or port 443)) or (icmp and not dst 10.0.0.1)",
        "src and dst port 443",
        "udp dst port 53 && !src host 10.0.0.1",
        "ip",
    ];

    #[test]
    fn display_round_trips() {
        let packets = sample_packets();
        for expr in EXPRS {
            let a = f(expr);
            let b = f(&a.to_string());
            assert_eq!(a.to_string(), b.to_string(), "{expr}");
            for p in &packets {
                assert_eq!(a.matches(p), b.matches(p), "{expr} vs {b} on {p:?}");
            }
        }
    }

    #[test]
    fn prefilter_is_sound_and_useful() {
        let packets = sample_packets();
        for expr in EXPRS {
            let flt = f(expr);
            let pre = flt.prefilter();
            for p in &packets {
                if flt.matches(p) {
                    assert!(pre.may_match(p), "{expr}: prefilter rejects matching {p:?}");
                }
            }
        }
        let pre = f("host 10.244.1.5 and tcp port 80").prefilter();
        assert_eq!(pre.protocols, Some([IPPROTO_TCP].into()));
        assert_eq!(pre.ports, Some([80].into()));
        assert_eq!(pre.networks, Some([Ipv4Net::host(ip("10.244.1.5"))].into()));
        let pre = f("port 53 or port 80").prefilter();
        assert_eq!(pre.ports, Some([53, 80].into()));
        assert_eq!(pre.protocols, Some([IPPROTO_TCP, IPPROTO_UDP].into()));
        let pre = f("port 53 or icmp").prefilter();
        assert_eq!(pre.ports, None);
        assert_eq!(
            pre.protocols,
            Some([IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP].into())
        );
        assert_eq!(f("not tcp").prefilter(), PreFilter::unconstrained());
        assert_eq!(
            f("tcp and udp").prefilter().protocols,
            Some(BTreeSet::new())
        );
        assert!(CaptureFilter::match_all()
            .prefilter()
            .may_match(&PacketSummary::default()));
        assert!(!f("tcp").prefilter().may_match(&PacketSummary::default()));
    }

    #[test]
    fn ipv4_net_helpers() {
        let n = Ipv4Net::new(ip("10.244.0.0"), 16).unwrap();
        assert_eq!(n.prefix_len(), Some(16));
        assert!(n.contains(ip("10.244.255.1")));
        assert!(!n.contains(ip("10.245.0.1")));
        assert_eq!(n.to_string(), "10.244.0.0/16");
        assert_eq!(Ipv4Net::new(ip("10.244.0.1"), 16), None);
        let odd = Ipv4Net::with_mask(ip("10.0.0.1"), 0xff00_00ff).unwrap();
        assert_eq!(odd.prefix_len(), None);
        assert_eq!(odd.to_string(), "10.0.0.1 mask 255.0.0.255");
        assert!(odd.contains(ip("10.9.9.1")));
        assert_eq!(
            Ipv4Net::new(ip("0.0.0.0"), 0).unwrap().to_string(),
            "0.0.0.0/0"
        );
    }
}
