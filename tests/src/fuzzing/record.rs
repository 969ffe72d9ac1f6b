//! The userspace decoder of ring-buffer records (`podtrace::trace::decode::Decoder`): any
//! bytes are an event or nothing, never a panic; what decodes is consistent with the record
//! (a packet is exactly the bytes the header promised; places and hops are the session's).

use podtrace::trace::{decode::Decoder, TraceEvent};
use podtrace_abi::{Event, FlowInfo, KIND_DROP, KIND_FIB, KIND_TC, KIND_XMIT};

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
    let Some(ev) = d.decode(data) else { return };
    let header = podtrace::trace::decode::HEADER_LEN;
    assert!(
        data.len() >= header,
        "decoded a record shorter than its header"
    );
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

/// Seeds: one record of each kind, as the kernel writes them.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let flow = FlowInfo {
        saddr: u32::from_ne_bytes([10, 244, 0, 9]),
        daddr: u32::from_ne_bytes([10, 244, 1, 5]),
        proto: 1,
        ip_id: 7,
        ip_len: 84,
        flags: 8,
        seq: 0x1234_0001,
        ..FlowInfo::default()
    };
    let rec = |ev: Event, data: &[u8]| {
        // SAFETY: Event is plain old data.
        let mut v = unsafe {
            std::slice::from_raw_parts(
                (&ev as *const Event).cast::<u8>(),
                std::mem::size_of::<Event>(),
            )
        }
        .to_vec();
        v.extend_from_slice(data);
        v
    };
    let base = Event {
        ts_ns: 1_000,
        netns_cookie: 0x1111,
        hop_id: 1,
        ifindex: 2,
        skb_len: 98,
        flow,
        ..Event::default()
    };
    vec![
        (
            "hop",
            rec(
                Event {
                    kind: KIND_TC,
                    ..base
                },
                &[],
            ),
        ),
        (
            "hop-packet",
            rec(
                Event {
                    kind: KIND_TC,
                    cap_len: 14,
                    ..base
                },
                &[0xff; 14],
            ),
        ),
        (
            "drop",
            rec(
                Event {
                    kind: KIND_DROP,
                    reason: 77,
                    hop_id: u32::MAX,
                    ..base
                },
                &[],
            ),
        ),
        (
            "fib",
            rec(
                Event {
                    kind: KIND_FIB,
                    aux: 254,
                    aux2: 4,
                    aux3: u32::from_ne_bytes([10, 244, 1, 0]),
                    netns_cookie: 0x2222,
                    ..base
                },
                &[],
            ),
        ),
        (
            "xmit",
            rec(
                Event {
                    kind: KIND_XMIT,
                    ..base
                },
                &[],
            ),
        ),
    ]
}
