//! The capture filter's fuzz checks.
//!
//! * [`check_text`] (`filter_parse`): any text. Parsing never panics; an error is one line;
//!   an accepted filter prints a canonical form that parses back to the same filter
//!   (same matches, same canonical form), and its prefilter never rejects a packet it
//!   matches.
//! * [`check_match`] (`filter_match`): an expression generated from the grammar (every
//!   primitive and spelling, and/or/not, parentheses) rendered as text, and packets built
//!   from fuzz input (VXLAN inside included) or raw bytes. Within the limits the text must
//!   parse, and the filter must match exactly when an independent evaluation of the
//!   generated expression (the oracle here) says so.

use std::net::Ipv4Addr;

use arbitrary::Arbitrary;
use podtrace::pcap::filter::{Expr, Primitive, MAX_NESTING, MAX_PRIMITIVES};
use podtrace::pcap::packet::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};
use podtrace::pcap::{parse_ethernet_with, CaptureFilter, PacketSummary};

use super::packet::{build, Frame, Vxlan};

/// The `filter_parse` target.
pub fn check_text(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let flt = match CaptureFilter::parse(&text) {
        Ok(f) => f,
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "a multi-line error: {msg:?}");
            return;
        }
    };
    let canonical = flt.to_string();
    let again = CaptureFilter::parse(&canonical)
        .unwrap_or_else(|e| panic!("{text:?} printed as {canonical:?}, which fails: {e}"));
    assert_eq!(again.to_string(), canonical, "canonical form of {text:?}");
    let pre = flt.prefilter();
    for p in packets_for(flt.expr()) {
        let m = flt.matches(&p);
        assert_eq!(m, again.matches(&p), "{text:?} vs {canonical:?} on {p:?}");
        assert!(!m || pre.may_match(&p), "{text:?}: prefilter rejects {p:?}");
    }
}

/// Packets that exercise an expression: every address and port it names (and the edges of
/// its networks), in TCP, UDP, ICMP and other packets, and a non-IP one.
pub fn packets_for(expr: Option<&Expr>) -> Vec<PacketSummary> {
    let mut addrs = vec![Ipv4Addr::new(10, 244, 0, 9), Ipv4Addr::new(10, 244, 1, 5)];
    let mut ports = vec![80u16, 53];
    let mut protos = vec![IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP, 47];
    let mut stack: Vec<&Expr> = expr.into_iter().collect();
    while let Some(e) = stack.pop() {
        match e {
            Expr::Prim(p) => match *p {
                Primitive::Host { addr, .. } => addrs.push(addr),
                Primitive::Net { net, .. } => {
                    addrs.push(net.addr());
                    addrs.push(Ipv4Addr::from(u32::from(net.addr()) | !net.mask()));
                }
                Primitive::Port { port, .. } => ports.push(port),
                Primitive::Proto(n) => protos.push(n),
                Primitive::Ip => {}
            },
            Expr::Not(x) => stack.push(x),
            Expr::And(a, b) | Expr::Or(a, b) => {
                stack.push(a);
                stack.push(b);
            }
        }
    }
    addrs.sort();
    addrs.dedup();
    addrs.truncate(6);
    ports.sort();
    ports.dedup();
    ports.truncate(4);
    protos.sort();
    protos.dedup();
    protos.truncate(6);
    let mut out = vec![PacketSummary::default()];
    for &s in &addrs {
        for &d in &addrs {
            for &proto in &protos {
                let base = PacketSummary::ipv4(s, d, proto);
                out.push(base);
                if proto == IPPROTO_TCP || proto == IPPROTO_UDP {
                    for &sp in &ports {
                        for &dp in &ports {
                            out.push(base.with_ports(sp, dp));
                        }
                    }
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Generated expressions

/// An expression of the filter language.
#[derive(Arbitrary, Debug, Clone)]
pub enum GenExpr {
    Prim(GenPrim),
    Not(Box<GenExpr>),
    And(Box<GenExpr>, Box<GenExpr>),
    Or(Box<GenExpr>, Box<GenExpr>),
    /// Explicit parentheses around an expression.
    Paren(Box<GenExpr>),
}

#[derive(Arbitrary, Debug, Clone)]
pub enum GenPrim {
    Ip,
    /// `tcp`, `udp`, `icmp`.
    Named(NamedProto),
    /// `proto N`, `ip proto N`, `ip proto \tcp`, `proto tcp`.
    Proto {
        number: u8,
        spelling: u8,
    },
    Host {
        dir: GenDir,
        addr: [u8; 4],
        spelling: u8,
    },
    Net {
        dir: GenDir,
        addr: [u8; 4],
        len: u8,
        spelling: u8,
    },
    Port {
        proto: Option<PortProto>,
        dir: GenDir,
        port: u16,
    },
}

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq)]
pub enum NamedProto {
    Tcp,
    Udp,
    Icmp,
}

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq)]
pub enum PortProto {
    Tcp,
    Udp,
}

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq)]
pub enum GenDir {
    Any,
    Src,
    Dst,
    SrcOrDst,
    DstOrSrc,
    SrcAndDst,
    DstAndSrc,
}

impl NamedProto {
    fn number(self) -> u8 {
        match self {
            NamedProto::Tcp => IPPROTO_TCP,
            NamedProto::Udp => IPPROTO_UDP,
            NamedProto::Icmp => IPPROTO_ICMP,
        }
    }
    fn name(self) -> &'static str {
        match self {
            NamedProto::Tcp => "tcp",
            NamedProto::Udp => "udp",
            NamedProto::Icmp => "icmp",
        }
    }
}

impl GenDir {
    fn words(self) -> &'static str {
        match self {
            GenDir::Any => "",
            GenDir::Src => "src ",
            GenDir::Dst => "dst ",
            GenDir::SrcOrDst => "src or dst ",
            GenDir::DstOrSrc => "dst or src ",
            GenDir::SrcAndDst => "src and dst ",
            GenDir::DstAndSrc => "dst and src ",
        }
    }

    /// The oracle's direction test.
    fn test<T: Copy>(self, src: T, dst: T, f: impl Fn(T) -> bool) -> bool {
        match self {
            GenDir::Any | GenDir::SrcOrDst | GenDir::DstOrSrc => f(src) || f(dst),
            GenDir::Src => f(src),
            GenDir::Dst => f(dst),
            GenDir::SrcAndDst | GenDir::DstAndSrc => f(src) && f(dst),
        }
    }
}

fn mask(len: u8) -> u32 {
    match len % 33 {
        0 => 0,
        n => u32::MAX << (32 - u32::from(n)),
    }
}

/// How a rendering spells things: bits drawn in turn from the fuzz input's `spelling`.
struct Spelling {
    bits: u64,
}

impl Spelling {
    fn pick(&mut self) -> bool {
        let b = self.bits & 1 == 1;
        self.bits = self.bits.rotate_right(1) ^ 0x9e37_79b9_7f4a_7c15;
        b
    }

    fn kw(&mut self, word: &str) -> String {
        if self.pick() && self.pick() {
            word.to_ascii_uppercase()
        } else {
            word.to_string()
        }
    }
}

/// Renders text; returns it with the parser's nesting depth of it (parentheses and
/// negations) and its number of primitives.
pub fn render(e: &GenExpr, spelling: u64) -> (String, usize, usize) {
    let mut sp = Spelling { bits: spelling };
    let mut out = String::new();
    let (depth, prims) = render_into(e, &mut sp, &mut out);
    (out, depth, prims)
}

fn render_into(e: &GenExpr, sp: &mut Spelling, out: &mut String) -> (usize, usize) {
    match e {
        GenExpr::Prim(p) => {
            out.push_str(&render_prim(p, sp));
            (0, 1)
        }
        GenExpr::Not(x) => {
            out.push_str(if sp.pick() { "!" } else { "not " });
            let binary = matches!(**x, GenExpr::And(..) | GenExpr::Or(..));
            if binary {
                out.push('(');
            }
            let (d, n) = render_into(x, sp, out);
            if binary {
                out.push(')');
            }
            (d + 1 + usize::from(binary), n)
        }
        GenExpr::Paren(x) => {
            out.push_str(if sp.pick() { "(" } else { "( " });
            let (d, n) = render_into(x, sp, out);
            out.push_str(if sp.pick() { ")" } else { " )" });
            (d + 1, n)
        }
        GenExpr::And(a, b) | GenExpr::Or(a, b) => {
            let is_and = matches!(e, GenExpr::And(..));
            // and/or associate to the left with equal precedence: the left side needs no
            // parentheses, a binary right side does.
            let (da, na) = render_into(a, sp, out);
            out.push_str(match (is_and, sp.pick()) {
                (true, true) => " && ",
                (true, false) => " and ",
                (false, true) => " || ",
                (false, false) => " or ",
            });
            let binary = matches!(**b, GenExpr::And(..) | GenExpr::Or(..));
            if binary {
                out.push('(');
            }
            let (db, nb) = render_into(b, sp, out);
            if binary {
                out.push(')');
            }
            (da.max(db + usize::from(binary)), na + nb)
        }
    }
}

fn render_prim(p: &GenPrim, sp: &mut Spelling) -> String {
    match *p {
        GenPrim::Ip => sp.kw("ip"),
        GenPrim::Named(n) => sp.kw(n.name()),
        GenPrim::Proto { number, spelling } => {
            let named = [IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP].contains(&number);
            let value = match (named, spelling % 3) {
                (true, 1) => format!("\\{}", proto_name(number)),
                (true, 2) => proto_name(number).to_string(),
                _ => number.to_string(),
            };
            let ip = if spelling & 4 != 0 { "ip " } else { "" };
            format!("{ip}{} {value}", sp.kw("proto"))
        }
        GenPrim::Host {
            dir,
            addr,
            spelling,
        } => {
            let a = Ipv4Addr::from(addr);
            // `src A` (no type) only with a direction: a bare `A` would take the qualifiers
            // of the primitive before it.
            match (spelling % 3, dir) {
                (1, d) if d != GenDir::Any => format!("{}{a}", d.words()),
                (2, d) => format!("ip {}host {a}", d.words()),
                (_, d) => format!("{}{} {a}", d.words(), sp.kw("host")),
            }
        }
        GenPrim::Net {
            dir,
            addr,
            len,
            spelling,
        } => {
            let len = len % 33;
            let m = mask(len);
            let net = Ipv4Addr::from(u32::from(Ipv4Addr::from(addr)) & m);
            let o = net.octets();
            let value = match (spelling % 3, len) {
                (1, _) => format!("{net} mask {}", Ipv4Addr::from(m)),
                (2, 8) => format!("{}", o[0]),
                (2, 16) => format!("{}.{}", o[0], o[1]),
                (2, 24) => format!("{}.{}.{}", o[0], o[1], o[2]),
                (2, 32) => format!("{net}"),
                _ => format!("{net}/{len}"),
            };
            format!("{}{} {value}", dir.words(), sp.kw("net"))
        }
        GenPrim::Port { proto, dir, port } => {
            let proto = match proto {
                Some(PortProto::Tcp) => "tcp ",
                Some(PortProto::Udp) => "udp ",
                None => "",
            };
            format!("{proto}{}{} {port}", dir.words(), sp.kw("port"))
        }
    }
}

fn proto_name(n: u8) -> &'static str {
    match n {
        IPPROTO_TCP => "tcp",
        IPPROTO_UDP => "udp",
        _ => "icmp",
    }
}

/// The oracle: what tcpdump's language means, evaluated on the generated expression.
pub fn eval(e: &GenExpr, p: &PacketSummary) -> bool {
    match e {
        GenExpr::Prim(prim) => eval_prim(prim, p),
        GenExpr::Not(x) => !eval(x, p),
        GenExpr::Paren(x) => eval(x, p),
        GenExpr::And(a, b) => eval(a, p) && eval(b, p),
        GenExpr::Or(a, b) => eval(a, p) || eval(b, p),
    }
}

fn eval_prim(prim: &GenPrim, p: &PacketSummary) -> bool {
    let Some(ip) = p.ip else {
        return false;
    };
    match *prim {
        GenPrim::Ip => true,
        GenPrim::Named(n) => ip.protocol == n.number(),
        GenPrim::Proto { number, .. } => ip.protocol == number,
        GenPrim::Host { dir, addr, .. } => dir.test(ip.src, ip.dst, |a| a.octets() == addr),
        GenPrim::Net { dir, addr, len, .. } => {
            let m = mask(len);
            let net = u32::from(Ipv4Addr::from(addr)) & m;
            dir.test(ip.src, ip.dst, |a| u32::from(a) & m == net)
        }
        GenPrim::Port { proto, dir, port } => {
            let proto_ok = match proto {
                Some(PortProto::Tcp) => ip.protocol == IPPROTO_TCP,
                Some(PortProto::Udp) => ip.protocol == IPPROTO_UDP,
                None => ip.protocol == IPPROTO_TCP || ip.protocol == IPPROTO_UDP,
            };
            proto_ok
                && ip
                    .ports
                    .is_some_and(|ports| dir.test(ports.src, ports.dst, |x| x == port))
        }
    }
}

/// A packet for the `filter_match` target.
#[derive(Arbitrary, Debug)]
pub enum GenPacket {
    Built(Frame),
    Raw(Vec<u8>),
    /// A summary made directly (as from an eBPF event's tuple).
    Summary {
        src: [u8; 4],
        dst: [u8; 4],
        protocol: u8,
        ports: Option<(u16, u16)>,
    },
}

/// The `filter_match` target's input.
#[derive(Arbitrary, Debug)]
pub struct MatchInput {
    pub expr: GenExpr,
    pub spelling: u64,
    pub vxlan: Vxlan,
    pub packets: Vec<GenPacket>,
}

/// The `filter_match` target.
pub fn check_match(input: &MatchInput) {
    let (text, depth, prims) = render(&input.expr, input.spelling);
    let within = depth <= MAX_NESTING && prims <= MAX_PRIMITIVES;
    let flt = match CaptureFilter::parse(&text) {
        Ok(f) => f,
        Err(e) => {
            assert!(
                !within,
                "{text:?} (depth {depth}, {prims} primitives) fails: {e}"
            );
            return;
        }
    };
    assert!(
        within,
        "{text:?} (depth {depth}, {prims} primitives) was accepted"
    );
    let again = CaptureFilter::parse(&flt.to_string())
        .unwrap_or_else(|e| panic!("{text:?} printed as {flt}, which fails: {e}"));
    let pre = flt.prefilter();
    let opts = input.vxlan.options();
    let mut summaries = packets_for(flt.expr());
    for gp in &input.packets {
        summaries.push(match gp {
            GenPacket::Built(frame) => parse_ethernet_with(&build(frame), &opts),
            GenPacket::Raw(bytes) => parse_ethernet_with(bytes, &opts),
            GenPacket::Summary {
                src,
                dst,
                protocol,
                ports,
            } => {
                let s = PacketSummary::ipv4((*src).into(), (*dst).into(), *protocol);
                match ports {
                    Some((a, b)) => s.with_ports(*a, *b),
                    None => s,
                }
            }
        });
    }
    for p in &summaries {
        let m = flt.matches(p);
        assert_eq!(m, eval(&input.expr, p), "{text:?} on {p:?}");
        assert_eq!(m, again.matches(p), "{text:?} vs {flt} on {p:?}");
        assert!(!m || pre.may_match(p), "{text:?}: prefilter rejects {p:?}");
    }
}
