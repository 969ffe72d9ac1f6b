//! The expression tree of a parsed filter and how it matches a [`PacketSummary`]: primitives
//! (`host`, `net`, `port`, protocols) with their direction, combined with `not`, `and`, `or`.
//! [`Display`](fmt::Display) prints a canonical form that parses back to the same filter.

use std::fmt;
use std::net::Ipv4Addr;

use crate::pcap::packet::{PacketSummary, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};
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
///
/// `and` and `or` associate to the left, so a chain `a or b and c or d` is a left-deep tree
/// as deep as it is long. Everything here walks such a chain in a loop (its left spine) and
/// recurses only into the right-hand sides and negations, whose depth the parser bounds
/// ([`MAX_NESTING`](super::MAX_NESTING)).
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
        // `L and R` is `R and L` (no side effects): test the right-hand side, then go on
        // down the left spine without recursing.
        let mut e = self;
        loop {
            match e {
                Expr::Prim(prim) => return prim.matches(p),
                Expr::Not(inner) => return !inner.matches(p),
                Expr::And(l, r) => {
                    if !r.matches(p) {
                        return false;
                    }
                    e = l;
                }
                Expr::Or(l, r) => {
                    if r.matches(p) {
                        return true;
                    }
                    e = l;
                }
            }
        }
    }

    fn is_binary(&self) -> bool {
        matches!(self, Expr::And(..) | Expr::Or(..))
    }

    /// `(is_and, left, right)` of a binary node.
    fn split(&self) -> Option<(bool, &Expr, &Expr)> {
        match self {
            Expr::And(l, r) => Some((true, l, r)),
            Expr::Or(l, r) => Some((false, l, r)),
            _ => None,
        }
    }

    /// A chain read left to right: its leftmost operand (not `and`/`or`), then each
    /// operator (`true` for `and`) with its right-hand side.
    pub(super) fn chain(&self) -> (&Expr, Vec<(bool, &Expr)>) {
        let mut rest = Vec::new();
        let mut e = self;
        while let Some((is_and, l, r)) = e.split() {
            rest.push((is_and, r));
            e = l;
        }
        rest.reverse();
        (e, rest)
    }
}

impl Expr {
    /// How deep parentheses and negations nest in the printed form (what the parser limits
    /// to [`MAX_NESTING`](super::MAX_NESTING)), with or without the explicit grouping of
    /// mixed chains.
    fn printed_nesting(&self, explicit: bool) -> usize {
        match self {
            Expr::Prim(_) => 0,
            Expr::Not(e) if e.is_binary() => 2 + e.printed_nesting(explicit),
            Expr::Not(e) => 1 + e.printed_nesting(explicit),
            Expr::And(..) | Expr::Or(..) => {
                let (first, rest) = self.chain();
                let mut open = if explicit { changes(&rest) } else { 0 };
                let mut deepest = open + first.printed_nesting(explicit);
                for (i, &(is_and, right)) in rest.iter().enumerate() {
                    if explicit && i > 0 && rest[i - 1].0 != is_and {
                        open -= 1;
                    }
                    let parens = usize::from(needs_parens(is_and, right));
                    deepest = deepest.max(open + parens + right.printed_nesting(explicit));
                }
                deepest
            }
        }
    }

    fn write(&self, f: &mut fmt::Formatter<'_>, explicit: bool) -> fmt::Result {
        match self {
            Expr::Prim(p) => write!(f, "{p}"),
            Expr::Not(e) => {
                f.write_str(if e.is_binary() { "not (" } else { "not " })?;
                e.write(f, explicit)?;
                f.write_str(if e.is_binary() { ")" } else { "" })
            }
            Expr::And(..) | Expr::Or(..) => {
                // Explicit: `((a or b) and c) or d`, a group closing wherever the operator
                // changes. Otherwise `a or b and c or d`, which means the same.
                let (first, rest) = self.chain();
                if explicit {
                    for _ in 0..changes(&rest) {
                        f.write_str("(")?;
                    }
                }
                first.write(f, explicit)?;
                for (i, &(is_and, right)) in rest.iter().enumerate() {
                    if explicit && i > 0 && rest[i - 1].0 != is_and {
                        f.write_str(")")?;
                    }
                    f.write_str(if is_and { " and " } else { " or " })?;
                    if needs_parens(is_and, right) {
                        f.write_str("(")?;
                        right.write(f, explicit)?;
                        f.write_str(")")?;
                    } else {
                        right.write(f, explicit)?;
                    }
                }
                Ok(())
            }
        }
    }
}

/// Operator changes along a chain: the groups its explicit form opens.
fn changes(rest: &[(bool, &Expr)]) -> usize {
    rest.windows(2).filter(|w| w[0].0 != w[1].0).count()
}

/// A right-hand side that is itself a chain of the other operator (`a and (b or c)`) needs
/// its parentheses; one of the same operator does not (`a and b and c`).
fn needs_parens(is_and: bool, right: &Expr) -> bool {
    right
        .split()
        .is_some_and(|(inner_and, ..)| inner_and != is_and)
}

impl fmt::Display for Expr {
    /// A canonical form that parses back to an equivalent expression; parentheses make the
    /// grouping explicit wherever `and` and `or` are mixed, unless that would nest them
    /// deeper than the parser accepts (a long mixed chain), which then is printed with the
    /// parentheses it needs only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let explicit = self.printed_nesting(true) <= super::MAX_NESTING;
        self.write(f, explicit)
    }
}
