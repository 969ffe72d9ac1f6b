//! A total parser of `iptables-save` output (and of the `iptables-restore` input kube-proxy
//! writes, which has the same grammar): tables, chain declarations and `-A` rules with the
//! matches and targets kube-proxy and the CNIs use parsed into fields, everything else kept as
//! text. Input is untrusted (another program's output, a file a user hands in): the parser
//! never panics, never fails; what it does not understand becomes a [`Ruleset::notes`] entry
//! or stays in [`Rule::other`].
use std::net::Ipv4Addr;

use serde::Serialize;

/// An IPv4 network as iptables prints it (`10.244.0.0/16`; a bare address is a /32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Net {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Net {
    /// Parses `A.B.C.D` or `A.B.C.D/LEN` (LEN 0..=32, or a dotted mask).
    pub fn parse(s: &str) -> Option<Net> {
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: Ipv4Addr = a.parse().ok()?;
        let len = match l {
            None => 32,
            Some(l) => match l.parse::<u8>() {
                Ok(n) if n <= 32 => n,
                Ok(_) => return None,
                Err(_) => {
                    let mask: Ipv4Addr = l.parse().ok()?;
                    let m = u32::from(mask);
                    if m.leading_ones() + m.trailing_zeros() != 32 {
                        return None;
                    }
                    m.leading_ones() as u8
                }
            },
        };
        Some(Net { addr, len })
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.len))
        };
        u32::from(ip) & mask == u32::from(self.addr) & mask
    }
}

impl std::fmt::Display for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// A match that may be negated (`! -s 10.244.0.0/16`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Neg<T> {
    pub negated: bool,
    pub value: T,
}

/// One `-A CHAIN ...` rule.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Rule {
    /// The table it is in (`nat`, `filter`).
    pub table: String,
    pub chain: String,
    /// 1-based line number in the input.
    pub line: usize,
    /// `-s`: a network; `None` with [`Rule::src_text`] set when it did not parse.
    pub src: Option<Neg<Net>>,
    pub dst: Option<Neg<Net>>,
    /// `-p` (lowercase: `tcp`, `udp`, `sctp`, `icmp`, `all`).
    pub proto: Option<Neg<String>>,
    pub in_if: Option<Neg<String>>,
    pub out_if: Option<Neg<String>>,
    /// `--dport`/`--dports`/`--destination-port` (first port of a range or list).
    pub dport: Option<Neg<u16>>,
    pub sport: Option<Neg<u16>>,
    /// `-m comment --comment TEXT` (unquoted).
    pub comment: Option<String>,
    /// `-m statistic --mode random --probability P`.
    pub probability: Option<f64>,
    /// `-m addrtype --dst-type T` / `--src-type T`.
    pub dst_type: Option<Neg<String>>,
    pub src_type: Option<Neg<String>>,
    /// `-m mark --mark V[/M]`.
    pub mark: Option<Neg<String>>,
    /// `-m conntrack --ctstate S` (or `-m state --state S`).
    pub ctstate: Option<Neg<String>>,
    /// Modules loaded with `-m`.
    pub modules: Vec<String>,
    /// `-j TARGET` (or `-g CHAIN`, with [`Rule::goto`]).
    pub target: Option<String>,
    pub goto: bool,
    /// DNAT `--to-destination` as written.
    pub to_destination: Option<String>,
    /// SNAT `--to-source` as written.
    pub to_source: Option<String>,
    /// REJECT `--reject-with`.
    pub reject_with: Option<String>,
    /// MARK `--or-mark`/`--xor-mark`/`--set-xmark`/`--set-mark` as `OPTION VALUE`.
    pub set_mark: Option<String>,
    /// MASQUERADE/SNAT `--random-fully`, `--random`.
    pub random_fully: bool,
    /// Options podtrace does not interpret, as written.
    pub other: Vec<String>,
    /// The whole line as it was.
    pub text: String,
}

impl Rule {
    /// The DNAT destination as address and port (`10.244.1.5:8080`, `10.244.1.5`).
    pub fn dnat_to(&self) -> Option<(Ipv4Addr, Option<u16>)> {
        parse_addr_port(self.to_destination.as_deref()?)
    }

    /// Whether a packet from `src` to `dst` matches the address parts of this rule; `None`
    /// when the rule also has matches this cannot decide (marks, ports, interfaces…).
    pub fn matches_addrs(&self, src: Ipv4Addr, dst: Ipv4Addr) -> Option<bool> {
        let net_ok = |m: &Option<Neg<Net>>, ip: Ipv4Addr| {
            m.as_ref().is_none_or(|n| n.value.contains(ip) != n.negated)
        };
        if !net_ok(&self.src, src) || !net_ok(&self.dst, dst) {
            return Some(false);
        }
        let undecided = self.proto.as_ref().is_some_and(|p| p.value != "all")
            || self.in_if.is_some()
            || self.out_if.is_some()
            || self.dport.is_some()
            || self.sport.is_some()
            || self.probability.is_some()
            || self.dst_type.is_some()
            || self.src_type.is_some()
            || self.mark.is_some()
            || self.ctstate.is_some()
            || !self.other.is_empty();
        if undecided {
            None
        } else {
            Some(true)
        }
    }
}

/// `A.B.C.D[:PORT[-PORT]]` (the first port of a range).
pub fn parse_addr_port(s: &str) -> Option<(Ipv4Addr, Option<u16>)> {
    let s = s.split('-').next().unwrap_or(s);
    match s.split_once(':') {
        Some((a, p)) => Some((a.parse().ok()?, Some(p.parse().ok()?))),
        None => Some((s.parse().ok()?, None)),
    }
}

/// A chain declaration (`:KUBE-SERVICES - [0:0]`, `:PREROUTING ACCEPT [0:0]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Chain {
    pub table: String,
    pub name: String,
    /// The policy of a built-in chain (`ACCEPT`); `None` for a user chain (`-`).
    pub policy: Option<String>,
}

/// Everything one `iptables-save` printed.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Ruleset {
    pub chains: Vec<Chain>,
    pub rules: Vec<Rule>,
    /// Lines that were not understood, as `line N: why`.
    pub notes: Vec<String>,
}

impl Ruleset {
    /// The rules of `table`/`chain`, in order.
    pub fn chain(&self, table: &str, chain: &str) -> Vec<&Rule> {
        self.rules
            .iter()
            .filter(|r| r.table == table && r.chain == chain)
            .collect()
    }

    /// Whether `table` declares `chain`.
    pub fn has_chain(&self, table: &str, chain: &str) -> bool {
        self.chains
            .iter()
            .any(|c| c.table == table && c.name == chain)
    }
}

/// Splits a rule line into words as iptables-restore does: whitespace separates, double
/// quotes group (with `\"` and `\\` escapes inside). An unterminated quote runs to the end of
/// the line (and says so).
pub fn split_words(line: &str) -> (Vec<String>, Option<&'static str>) {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '\\' => match chars.next() {
                    Some(n @ ('"' | '\\')) => cur.push(n),
                    Some(n) => {
                        cur.push('\\');
                        cur.push(n);
                    }
                    None => cur.push('\\'),
                },
                '"' => quoted = false,
                _ => cur.push(c),
            }
            continue;
        }
        match c {
            '"' => {
                quoted = true;
                in_word = true;
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            _ => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    (words, quoted.then_some("unterminated quote"))
}

/// Options that take no argument.
const FLAGS: &[&str] = &[
    "--random-fully",
    "--random",
    "--persistent",
    "-f",
    "--fragment",
    "--rsource",
    "--rdest",
    "--set",
    "--update",
    "--rcheck",
    "--remove",
    "--syn",
    "--log-uid",
    "--log-tcp-sequence",
    "--log-tcp-options",
    "--log-ip-options",
    "--notrack",
    "--limit-iface-in",
    "--limit-iface-out",
];

/// Parses `iptables-save` output. Never fails: unknown lines become notes.
pub fn parse(text: &str) -> Ruleset {
    let mut set = Ruleset::default();
    let mut table = String::new();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(t) = line.strip_prefix('*') {
            table = t.trim().to_owned();
            continue;
        }
        if line == "COMMIT" {
            table.clear();
            continue;
        }
        if let Some(decl) = line.strip_prefix(':') {
            let mut parts = decl.split_whitespace();
            let name = parts.next().unwrap_or("").to_owned();
            if name.is_empty() {
                set.notes
                    .push(format!("line {n}: a chain declaration without a name"));
                continue;
            }
            let policy = parts.next().filter(|p| *p != "-").map(str::to_owned);
            set.chains.push(Chain {
                table: table.clone(),
                name,
                policy,
            });
            continue;
        }
        let (words, warn) = split_words(line);
        if let Some(w) = warn {
            set.notes.push(format!("line {n}: {w}"));
        }
        if words.first().map(String::as_str) != Some("-A") {
            set.notes.push(format!(
                "line {n}: not a rule, chain or table line: {}",
                truncate(line, 80)
            ));
            continue;
        }
        let Some(chain) = words.get(1) else {
            set.notes.push(format!("line {n}: -A without a chain"));
            continue;
        };
        if table.is_empty() {
            set.notes.push(format!(
                "line {n}: a rule outside a table (no *TABLE before it)"
            ));
        }
        let mut rule = Rule {
            table: table.clone(),
            chain: chain.clone(),
            line: n,
            text: line.to_owned(),
            ..Rule::default()
        };
        parse_options(&words[2..], &mut rule, &mut set.notes);
        set.rules.push(rule);
    }
    set
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(max).collect();
        t.push('…');
        t
    }
}

fn neg<T>(negated: bool, value: T) -> Option<Neg<T>> {
    Some(Neg { negated, value })
}

fn port_of(s: &str) -> Option<u16> {
    // `80`, `80:90` (a range), `80,443` (multiport): the first port.
    s.split([':', ',']).next()?.parse().ok()
}

fn parse_options(words: &[String], rule: &mut Rule, notes: &mut Vec<String>) {
    let n = rule.line;
    let mut i = 0;
    let mut negate = false;
    while i < words.len() {
        let w = words[i].as_str();
        if w == "!" {
            negate = true;
            i += 1;
            continue;
        }
        if FLAGS.contains(&w) {
            if w == "--random-fully" || w == "--random" {
                rule.random_fully |= w == "--random-fully";
                if w == "--random" {
                    rule.other.push(w.to_owned());
                }
            } else {
                rule.other.push(w.to_owned());
            }
            negate = false;
            i += 1;
            continue;
        }
        if !w.starts_with('-') {
            notes.push(format!("line {n}: stray word {:?}", truncate(w, 40)));
            i += 1;
            continue;
        }
        let Some(arg) = words.get(i + 1).map(String::as_str) else {
            notes.push(format!("line {n}: option {w} without its value"));
            rule.other.push(w.to_owned());
            break;
        };
        let bad = |notes: &mut Vec<String>, what: &str| {
            notes.push(format!(
                "line {n}: {w} {:?} is not {what}",
                truncate(arg, 40)
            ));
        };
        if w == "--tcp-flags" {
            // Two values: the flags examined and those that must be set.
            rule.other.push(w.to_owned());
            rule.other.extend(words[i + 1..].iter().take(2).cloned());
            negate = false;
            i += 3;
            continue;
        }
        match w {
            "-s" | "--source" | "--src" => match Net::parse(arg) {
                Some(net) => rule.src = neg(negate, net),
                None => bad(notes, "an IPv4 network"),
            },
            "-d" | "--destination" | "--dst" => match Net::parse(arg) {
                Some(net) => rule.dst = neg(negate, net),
                None => bad(notes, "an IPv4 network"),
            },
            "-p" | "--protocol" => rule.proto = neg(negate, arg.to_ascii_lowercase()),
            "-i" | "--in-interface" => rule.in_if = neg(negate, arg.to_owned()),
            "-o" | "--out-interface" => rule.out_if = neg(negate, arg.to_owned()),
            "--dport" | "--dports" | "--destination-port" | "--destination-ports" => {
                match port_of(arg) {
                    Some(p) => rule.dport = neg(negate, p),
                    None => bad(notes, "a port"),
                }
            }
            "--sport" | "--sports" | "--source-port" | "--source-ports" => match port_of(arg) {
                Some(p) => rule.sport = neg(negate, p),
                None => bad(notes, "a port"),
            },
            "-m" | "--match" => rule.modules.push(arg.to_owned()),
            "--comment" => rule.comment = Some(arg.to_owned()),
            "--probability" => match arg.parse::<f64>() {
                Ok(p) if (0.0..=1.0).contains(&p) => rule.probability = Some(p),
                _ => bad(notes, "a probability"),
            },
            "--dst-type" => rule.dst_type = neg(negate, arg.to_owned()),
            "--src-type" => rule.src_type = neg(negate, arg.to_owned()),
            "--mark" => rule.mark = neg(negate, arg.to_owned()),
            "--ctstate" | "--state" => rule.ctstate = neg(negate, arg.to_owned()),
            "-j" | "--jump" => rule.target = Some(arg.to_owned()),
            "-g" | "--goto" => {
                rule.target = Some(arg.to_owned());
                rule.goto = true;
            }
            "--to-destination" => rule.to_destination = Some(arg.to_owned()),
            "--to-source" => rule.to_source = Some(arg.to_owned()),
            "--reject-with" => rule.reject_with = Some(arg.to_owned()),
            "--or-mark" | "--xor-mark" | "--set-xmark" | "--set-mark" | "--and-mark" => {
                rule.set_mark = Some(format!("{w} {arg}"))
            }
            _ => {
                if negate {
                    rule.other.push("!".to_owned());
                }
                rule.other.push(w.to_owned());
                rule.other.push(arg.to_owned());
            }
        }
        negate = false;
        i += 2;
    }
}
