//! Unit tests on ctnetlink answers captured from the lab (testdata/node-a-dump.hex) and on
//! malformed bytes derived from them.
use std::net::{IpAddr, Ipv4Addr};

use super::{
    msg::{self, Status, Tuple},
    nfgen,
    nlattr::{self, AttrError, Writer},
    split_messages,
};

fn captured() -> Vec<Vec<u8>> {
    include_str!("testdata/node-a-dump.hex")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            (0..l.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&l[i..i + 2], 16).unwrap())
                .collect()
        })
        .collect()
}

fn entry_of(bytes: &[u8]) -> msg::Entry {
    let (msgs, bad) = split_messages(bytes);
    assert_eq!(bad, None);
    assert_eq!(msgs.len(), 1);
    let m = msgs[0];
    // IPCTNL_MSG_CT_NEW of NFNL_SUBSYS_CTNETLINK, a dump part (NLM_F_MULTI).
    assert_eq!(m.kind, 0x0100);
    assert_eq!(m.flags & 2, 2);
    let (family, _, attrs) = nfgen(m.payload).unwrap();
    msg::decode_entry(family, attrs)
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

#[test]
fn masqueraded_ping_to_ext() {
    let e = entry_of(&captured()[0]);
    assert_eq!(e.family, 2);
    let o = e.orig.unwrap();
    let r = e.reply.unwrap();
    assert_eq!(
        (o.src, o.dst, o.proto),
        (v4(10, 244, 0, 9), v4(10, 30, 180, 1), 1)
    );
    assert_eq!(
        (o.icmp_type, o.icmp_code, o.icmp_id),
        (Some(8), Some(0), Some(0x30f0))
    );
    // The reply is an echo reply from ext to the node's underlay address.
    assert_eq!((r.src, r.dst), (v4(10, 30, 180, 1), v4(10, 30, 180, 56)));
    assert_eq!(r.icmp_type, Some(0));
    assert!(e.status.has(Status::SRC_NAT) && e.status.has(Status::SRC_NAT_DONE));
    assert!(!e.status.has(Status::DST_NAT));
    assert!(e.status.has(Status::SEEN_REPLY) && e.status.has(Status::CONFIRMED));
    assert_eq!(e.snat_to(), Some((v4(10, 30, 180, 56), None)));
    assert_eq!(e.dnat_to(), None);
    assert_eq!(e.mark, Some(0));
    assert_eq!(e.zone, None);
    assert!(e.timeout.is_some() && e.id.is_some());
    assert_eq!(e.malformed, None);
    assert_eq!(
        o.to_string(),
        "icmp 10.244.0.9 → 10.30.180.1 id 12528 type 8"
    );
}

#[test]
fn service_connection_dnat_to_a_backend() {
    let e = entry_of(&captured()[1]);
    let o = e.orig.unwrap();
    assert_eq!(
        o,
        Tuple::ports(
            6,
            Ipv4Addr::new(10, 244, 0, 7),
            43570,
            Ipv4Addr::new(10, 96, 0, 10),
            80
        )
    );
    assert_eq!(e.dnat_to(), Some((v4(10, 244, 1, 5), Some(8080))));
    assert_eq!(e.snat_to(), None);
    assert!(e.status.has(Status::DST_NAT) && e.status.has(Status::ASSURED));
    assert_eq!(
        e.status.names(),
        [
            "SEEN_REPLY",
            "ASSURED",
            "CONFIRMED",
            "DST_NAT",
            "SRC_NAT_DONE",
            "DST_NAT_DONE"
        ]
    );
    assert_eq!(e.tcp_state.map(msg::tcp_state_name), Some("TIME_WAIT"));
}

#[test]
fn masquerade_with_a_new_source_port() {
    let e = entry_of(&captured()[2]);
    assert_eq!(e.snat_to(), Some((v4(10, 30, 180, 56), Some(34737))));
    assert_eq!(e.orig.unwrap().sport, Some(36622));
}

#[test]
fn per_cpu_statistics() {
    let bytes = captured();
    let (msgs, _) = split_messages(&bytes[3]);
    assert_eq!(msgs[0].kind, 0x0104);
    let (_, cpu, attrs) = nfgen(msgs[0].payload).unwrap();
    let s = msg::decode_cpu_stats(cpu, attrs);
    assert_eq!(s, msg::CpuStats::default());
    // Every counter lands in its field.
    let mut w = Writer::default();
    for (kind, v) in [
        (2u16, 1u32),
        (4, 2),
        (8, 3),
        (9, 4),
        (10, 5),
        (11, 6),
        (12, 7),
        (13, 8),
        (14, 9),
        (15, 10),
    ] {
        w.put(kind, &v.to_be_bytes());
    }
    let s = msg::decode_cpu_stats(3, &w.buf);
    assert_eq!(
        (
            s.cpu,
            s.found,
            s.invalid,
            s.insert,
            s.insert_failed,
            s.drop,
            s.early_drop
        ),
        (3, 1, 2, 3, 4, 5, 6)
    );
    assert_eq!(
        (s.error, s.search_restart, s.clash_resolve, s.chain_toolong),
        (7, 8, 9, 10)
    );
    let mut total = s;
    total.add(&s);
    assert_eq!(total.invalid, 4);
    let mut w = Writer::default();
    w.put(1, &12u32.to_be_bytes());
    w.put(2, &262144u32.to_be_bytes());
    assert_eq!(
        msg::decode_table_stats(&w.buf),
        msg::TableStats {
            entries: Some(12),
            max_entries: Some(262144)
        }
    );
}

#[test]
fn an_encoded_tuple_decodes_back() {
    for t in [
        Tuple::ports(
            6,
            Ipv4Addr::new(10, 244, 0, 9),
            40000,
            Ipv4Addr::new(10, 96, 0, 10),
            80,
        ),
        Tuple::icmp_echo(
            Ipv4Addr::new(10, 244, 0, 9),
            Ipv4Addr::new(10, 30, 180, 1),
            7,
        ),
    ] {
        let mut w = Writer::default();
        msg::encode_tuple(&mut w, msg::CTA_TUPLE_ORIG, &t);
        let e = msg::decode_entry(2, &w.buf);
        assert_eq!(e.orig, Some(t));
        assert_eq!(e.malformed, None);
    }
}

#[test]
fn attributes_reject_bad_lengths() {
    assert_eq!(
        nlattr::attrs(&[1, 0]).collect::<Vec<_>>(),
        [Err(AttrError::ShortHeader { at: 0 })]
    );
    // nla_len 2 (< header) and 200 (> buffer).
    assert_eq!(
        nlattr::attrs(&[2, 0, 1, 0]).collect::<Vec<_>>(),
        [Err(AttrError::BadLength { at: 0, len: 2 })]
    );
    assert_eq!(nlattr::attrs(&[200, 0, 1, 0, 0, 0, 0, 0]).count(), 1);
    // A last attribute without its padding is still read.
    let a: Vec<_> = nlattr::attrs(&[5, 0, 1, 0, 7]).collect();
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].unwrap().u8(), Some(7));
    assert_eq!(nlattr::align(usize::MAX), usize::MAX & !3);
    // A malformed nested tuple is reported, the entry is still returned.
    let mut w = Writer::default();
    w.put(msg::CTA_TUPLE_ORIG | nlattr::NLA_F_NESTED, &[9, 0, 1, 0]);
    w.put(msg::CTA_MARK, &5u32.to_be_bytes());
    let e = msg::decode_entry(2, &w.buf);
    assert!(e.malformed.is_some());
    assert_eq!(e.orig, None);
    assert_eq!(e.mark, Some(5));
}

#[test]
fn netlink_messages_split_and_stop_at_garbage() {
    let all: Vec<u8> = captured().concat();
    let (msgs, bad) = split_messages(&all);
    assert_eq!(msgs.len(), 4);
    assert_eq!(bad, None);
    let mut cut = all.clone();
    cut.truncate(all.len() - 3);
    let (msgs, bad) = split_messages(&cut);
    assert_eq!(msgs.len(), 3);
    assert!(bad.unwrap().contains("claims"));
    let (msgs, bad) = split_messages(&[0u8; 15]);
    assert!(msgs.is_empty() && bad.is_some());
}

/// xorshift64: a deterministic stream of pseudo-random numbers.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Decodes `bytes` every way podtrace does; must not panic whatever they are.
fn decode_everything(bytes: &[u8]) {
    let (msgs, _) = split_messages(bytes);
    for m in msgs {
        if let Some((family, cpu, attrs)) = nfgen(m.payload) {
            let e = msg::decode_entry(family, attrs);
            let _ = (e.dnat_to(), e.snat_to(), e.status.names());
            if let Some(o) = e.orig {
                let _ = o.to_string();
            }
            let _ = msg::decode_cpu_stats(cpu, attrs);
            let _ = msg::decode_table_stats(attrs);
        }
    }
    let _ = msg::decode_entry(2, bytes);
}

#[test]
fn malformed_bytes_never_panic() {
    let samples = captured();
    for s in &samples {
        for len in 0..=s.len() {
            decode_everything(&s[..len]);
        }
    }
    let mut rng = Rng(0x9e3779b97f4a7c15);
    for round in 0..20_000 {
        let mut b = samples[round % samples.len()].clone();
        for _ in 0..1 + rng.next() % 8 {
            let i = (rng.next() as usize) % b.len();
            b[i] = rng.next() as u8;
        }
        decode_everything(&b);
        decode_everything(&b[16.min(b.len())..]);
    }
    for _ in 0..2_000 {
        let len = (rng.next() % 300) as usize;
        let b: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        decode_everything(&b);
    }
}
