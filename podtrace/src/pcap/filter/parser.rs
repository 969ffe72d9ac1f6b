//! The parser: tokens to an [`Expr`], with tcpdump's grammar and precedence (see the
//! [module docs](super)), its qualifier rules (`[tcp|udp|icmp|ip] [src|dst] [host|net|port|proto]
//! VALUE`), the repetition of qualifiers for bare values, and the errors for what podtrace
//! does not implement.

use std::net::Ipv4Addr;

use super::error::FilterError;
use super::expr::{Dir, Expr, Ipv4Net, Primitive};
use super::lexer::{TokKind, Token};
use crate::pcap::packet::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};

const SUPPORTED: &str = "supported: host, net, port, src, dst, tcp, udp, icmp, ip, proto, \
                         and/or/not (&&, ||, !) and parentheses";

/// The most primitives an expression may hold. Matching and printing walk the expression
/// recursively, and `a or b or c ...` nests one level per operator, so this bounds their
/// depth (and the work per packet).
pub const MAX_PRIMITIVES: usize = 1000;

/// How deep parentheses and negations may nest. The parser recurses once per level.
pub const MAX_NESTING: usize = 100;

/// Parse a whole token stream: `None` for an empty one (match everything).
pub(super) fn parse(tokens: Vec<Token>) -> Result<Option<Expr>, FilterError> {
    if tokens.is_empty() {
        return Ok(None);
    }
    let mut p = Parser {
        tokens,
        pos: 0,
        last_quals: None,
        nesting: 0,
        primitives: 0,
    };
    let e = p.expr()?;
    if let Some(t) = p.peek() {
        let near = t.text.clone();
        return Err(match t.kind {
            TokKind::RParen => FilterError::invalid(&near, "unbalanced parenthesis"),
            _ => FilterError::invalid(&near, "expected 'and' or 'or' between two primitives"),
        });
    }
    Ok(Some(e))
}

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
    /// Parentheses and negations open around the current token.
    nesting: usize,
    /// Primitives parsed so far.
    primitives: usize,
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

    /// One more level of parentheses or negation, at `tok`.
    fn enter(&mut self, tok: &Token) -> Result<(), FilterError> {
        self.nesting += 1;
        if self.nesting > MAX_NESTING {
            return Err(FilterError::invalid(
                &tok.text,
                format!("parentheses and negations nest more than {MAX_NESTING} deep"),
            ));
        }
        Ok(())
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
            TokKind::Not => {
                self.enter(&tok)?;
                let e = self.term()?;
                self.nesting -= 1;
                Ok(Expr::Not(Box::new(e)))
            }
            TokKind::LParen => {
                self.enter(&tok)?;
                let e = self.expr()?;
                self.nesting -= 1;
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
            TokKind::Word => {
                self.primitives += 1;
                if self.primitives > MAX_PRIMITIVES {
                    return Err(FilterError::invalid(
                        &tok.text,
                        format!(
                            "the expression is too long: more than {MAX_PRIMITIVES} primitives \
                             (use 'net A/LEN' for ranges of hosts)"
                        ),
                    ));
                }
                self.primitive(tok).map(Expr::Prim)
            }
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
