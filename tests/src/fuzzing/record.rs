//! The userspace decoder of ring-buffer records (`podtrace::trace::decode::Decoder`): any
//! bytes are an event or nothing, never a panic; what decodes is consistent with the record
//! (a packet is exactly the bytes the header promised; places and hops are the session's).

use podtrace::trace::{
    decode::{Arena, Decoder},
    TraceEvent,
};
use podtrace_abi::{Event, KIND_DROP, KIND_FIB, KIND_TC, KIND_XMIT};

/// The session the records are decoded for: two namespaces, hops 0, 1, 2 and 7 (a node's
/// part of a plan keeps sparse ids), two drop reasons.
pub fn decoder() -> Decoder {
    Decoder::new(
        &[0x1111, 0x2222],
        [0, 1, 2, 7],
        [
            (2, "NOT_SPECIFIED".to_owned()),
            (77, "NETFILTER_DROP".to_owned()),
        ],
    )
}

/// The `record` target.
pub fn check(data: &[u8]) {
    let d = decoder();
    // A second record through the same arena, its packet bytes inverted: it shares the
    // first's chunk and must leave the first packet as it was (checked against `data` below).
    let mut arena = Arena::default();
    let Some(ev) = d.decode(data, &mut arena) else {
        return;
    };
    let header = podtrace::trace::decode::HEADER_LEN;
    assert!(
        data.len() >= header,
        "decoded a record shorter than its header"
    );
    let mut other = data.to_vec();
    other[header..].iter_mut().for_each(|b| *b = !*b);
    if let Some(TraceEvent::Hop(b)) = d.decode(&other, &mut arena) {
        if let Some(p) = &b.packet {
            assert_eq!(
                other.get(header..header + p.len()),
                Some(&p[..]),
                "second packet bytes"
            );
        }
    }
    match &ev {
        TraceEvent::Hop(h) => {
            assert!(
                [0, 1, 2, 7].contains(&h.hop),
                "hop {} is not the session's",
                h.hop
            );
            if let Some(p) = &h.packet {
                assert_eq!(&data[header..header + p.len()], &p[..], "packet bytes");
            }
        }
        TraceEvent::Drop(x) => assert!(x.at.ns < 2, "namespace {}", x.at.ns),
        TraceEvent::Xmit(x) => assert!(x.at.ns < 2, "namespace {}", x.at.ns),
        TraceEvent::Fib(f) => assert!(f.ns.is_none_or(|n| n < 2)),
        TraceEvent::Lost { .. } | TraceEvent::Counters(_) => panic!("not a ring-buffer event"),
    }
    // What decodes travels to a front end and back unchanged.
    let p = podtrace::agent::wire::encode(&vec![ev.clone()]).expect("an event encodes");
    let back: Vec<TraceEvent> =
        podtrace::agent::wire::decode(Some(&p), "events").expect("an event decodes");
    assert_eq!(back, vec![ev]);
}

/// The bytes of `ev` followed by `data`. The record starts zeroed and only fields are
/// written into it, so its padding is zeros and the seeds are the same on every build.
fn record(fill: impl FnOnce(&mut Event), data: &[u8]) -> Vec<u8> {
    // SAFETY: Event is plain old data: all zeros is a valid value.
    let mut ev: Event = unsafe { std::mem::zeroed() };
    fill(&mut ev);
    // SAFETY: reading the bytes of a plain-old-data value whose padding is zeroed.
    let mut v = unsafe {
        std::slice::from_raw_parts(
            (&ev as *const Event).cast::<u8>(),
            std::mem::size_of::<Event>(),
        )
    }
    .to_vec();
    v.extend_from_slice(data);
    v
}

/// Seeds: one record of each kind, as the kernel writes them.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let base = |e: &mut Event| {
        e.ts_ns = 1_000;
        e.netns_ino = 0x1111;
        e.hop_id = 1;
        e.ifindex = 2;
        e.skb_len = 98;
        e.flow.saddr = u32::from_ne_bytes([10, 244, 0, 9]);
        e.flow.daddr = u32::from_ne_bytes([10, 244, 1, 5]);
        e.flow.proto = 1;
        e.flow.ip_id = 7;
        e.flow.ip_len = 84;
        e.flow.flags = 8;
        e.flow.seq = 0x1234_0001;
    };
    vec![
        (
            "hop",
            record(
                |e| {
                    base(e);
                    e.kind = KIND_TC;
                },
                &[],
            ),
        ),
        (
            "hop-packet",
            record(
                |e| {
                    base(e);
                    e.kind = KIND_TC;
                    e.cap_len = 14;
                },
                &[0xff; 14],
            ),
        ),
        (
            "drop",
            record(
                |e| {
                    base(e);
                    e.kind = KIND_DROP;
                    e.reason = 77;
                    e.hop_id = u32::MAX;
                },
                &[],
            ),
        ),
        (
            "fib",
            record(
                |e| {
                    base(e);
                    e.kind = KIND_FIB;
                    e.aux = 254;
                    e.aux2 = 4;
                    e.aux3 = u32::from_ne_bytes([10, 244, 1, 0]);
                    e.netns_ino = 0x2222;
                },
                &[],
            ),
        ),
        (
            "xmit",
            record(
                |e| {
                    base(e);
                    e.kind = KIND_XMIT;
                },
                &[],
            ),
        ),
    ]
}
