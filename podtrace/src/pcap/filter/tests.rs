//! The filter language's tests: what matches what, precedence, errors, printing, the
//! prefilter; and, at the end, regression tests for the crashes fuzzing found.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use super::*;
use crate::pcap::packet::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};

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
    let a =
        CaptureFilter::parse_args(["host", "10.244.1.5", "and", "(tcp", "or", "icmp)"]).unwrap();
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

// ---------------------------------------------------------------------------------------
// Regression tests: inputs that crashed podtrace. Each must fail (or match) cleanly.

/// The lexer sliced the text inside a multi-byte character: a panic (exit 101) for any
/// non-ASCII character in a word, about one random expression in four.
#[test]
fn regression_non_ascii_in_a_word_is_an_error() {
    for (expr, near) in [
        ("ip ipé", "ipé"),
        ("icmp ’&& 255 10.0.0.0/8 255 ", "’"),
        ("1.2.3.4/é 10.0.0.1 ", "1.2.3.4/é"),
        ("host ‘10.0.0.1’", "‘10.0.0.1’"),
        ("tcp\u{a0}port 80", "tcp\u{a0}port"),
        ("port 80 –or port 443", "–or"),
        ("日本", "日本"),
    ] {
        let e = err(expr);
        assert_eq!(e.kind(), FilterErrorKind::Invalid, "{expr}: {e}");
        assert_eq!(e.near(), near, "{expr}: {e}");
        assert!(e.to_string().contains("U+"), "{e}");
    }
    // Non-ASCII text that ends at an operator or a parenthesis, and a lone multi-byte char.
    for expr in ["é&&tcp", "(é)", "é||", "ü", "tcp and (host ’", "!é"] {
        assert!(CaptureFilter::parse(expr).is_err(), "{expr}");
    }
}

/// Parentheses and negations nested deep enough overflowed the parser's stack (abort).
#[test]
fn regression_deep_nesting_is_an_error() {
    let deep = |n: usize| format!("{}tcp{}", "(".repeat(n), ")".repeat(n));
    let ok = f(&deep(MAX_NESTING));
    assert!(ok.matches(&tcp("10.0.0.1", 1, "10.0.0.2", 2)));
    let e = err(&deep(MAX_NESTING + 1));
    assert_eq!((e.kind(), e.near()), (FilterErrorKind::Invalid, "("));
    assert!(e.to_string().contains("nest"), "{e}");
    // What crashed: 100,000 opening parentheses, or as many `not`s.
    assert_eq!(err(&"(".repeat(100_000)).near(), "(");
    assert_eq!(err(&format!("{}tcp", "not ".repeat(100_000))).near(), "not");
    assert_eq!(err(&format!("{}tcp", "!".repeat(100_000))).near(), "!");
    let nots = f(&format!("{}tcp", "not ".repeat(MAX_NESTING)));
    assert!(nots.matches(&tcp("10.0.0.1", 1, "10.0.0.2", 2)));
}

/// `a or b or c ...` nests one level per operator: a long enough chain overflowed the stack
/// of whatever walked it (matching, printing, dropping). Chains are bounded now; the
/// longest allowed works on a test thread's small stack, unoptimised.
#[test]
fn regression_long_chains_are_bounded() {
    let hosts: Vec<String> = (0..MAX_PRIMITIVES)
        .map(|i| format!("host 10.{}.{}.1", i / 256, i % 256))
        .collect();
    let mixed: Vec<String> = (0..MAX_PRIMITIVES)
        .map(|i| format!("port {i} {}", if i % 2 == 0 { "or" } else { "and" }))
        .collect();
    let mixed = format!("{} tcp", mixed.join(" "));
    for text in [hosts.join(" or "), mixed.replacen("port 0 or", "", 1)] {
        let flt = f(&text);
        let p = tcp("10.3.231.1", 999, "10.0.0.2", 2);
        let again = f(&flt.to_string());
        assert_eq!(flt.matches(&p), again.matches(&p));
        let _ = flt.prefilter();
    }
    assert!(f(&hosts.join(" or ")).matches(&icmp("10.3.231.1", "10.9.9.9")));
    let e = err(&format!("{} or tcp", hosts.join(" or ")));
    assert_eq!(e.near(), "tcp");
    assert!(e.to_string().contains("too long"), "{e}");
    // Groups nested as deep as allowed, a mixed chain innermost: the canonical form (explicit
    // grouping only where it fits) parses back to the same filter.
    let mut text = "port 1 or port 2 and port 3 or port 4".to_string();
    for i in 0..MAX_NESTING {
        let op = if i % 2 == 0 { "and" } else { "or" };
        text = format!("host 10.0.0.{} {op} ({text})", i % 250);
    }
    let flt = f(&text);
    let again = f(&flt.to_string());
    for p in sample_packets() {
        assert_eq!(flt.matches(&p), again.matches(&p), "{p:?}");
    }
    // Bare values count too.
    let bare: Vec<String> = (0..=MAX_PRIMITIVES).map(|i| i.to_string()).collect();
    let e = err(&format!("port {}", bare.join(" or ")));
    assert_eq!(e.near(), MAX_PRIMITIVES.to_string());
}

/// A huge word makes a long `near`; the message shows the start of it only.
#[test]
fn long_words_are_shortened_in_messages() {
    let word = "x".repeat(100_000);
    let e = err(&format!("host {word}"));
    assert_eq!(e.near(), word);
    let msg = e.to_string();
    assert!(msg.len() < 400, "{}", msg.len());
    assert!(msg.contains("xxx…"), "{msg}");
}
