//! Ring buffer records → [`TraceEvent`]s. Pure: a [`Decoder`] holds the tables a session
//! fixed at start (namespace cookies → plan namespaces, the hop count, the kernel's drop
//! reason names) and turns each record's bytes into a typed event, or nothing for a record
//! that is not the session's (the kernel-wide probes see every namespace) or not well formed.
use std::{collections::HashMap, sync::Arc};

use bytes::{Bytes, BytesMut};
use podtrace_abi::{Event, DIR_INGRESS, KIND_DROP, KIND_FIB, KIND_TC, KIND_XMIT};

use super::{
    event::{DropEvent, FibEvent, Flow, HopEvent, Place, TraceEvent, XmitEvent},
    plan::Hook,
};

/// The record header's size; packet bytes follow it in capture sessions.
pub const HEADER_LEN: usize = std::mem::size_of::<Event>();

/// Where the reader copies packet bytes out of the ring: consecutive packets share one
/// allocation of [`Arena::CHUNK`] bytes (a packet larger than that gets one of its own), each
/// handed on as a [`Bytes`] of its own, and the chunk is freed with the last of them. Headers
/// (`-s 128`) are a hundred packets per allocation instead of one each.
#[derive(Debug, Default)]
pub struct Arena {
    buf: BytesMut,
}

impl Arena {
    /// Small enough that a consumer keeping a few packets keeps little else alive.
    pub const CHUNK: usize = 16 << 10;

    /// A copy of `data`.
    pub fn copy(&mut self, data: &[u8]) -> Bytes {
        if self.buf.capacity() - self.buf.len() < data.len() {
            self.buf = BytesMut::with_capacity(data.len().max(Self::CHUNK));
        }
        self.buf.extend_from_slice(data);
        self.buf.split().freeze()
    }
}

/// What a session decodes its records with.
#[derive(Debug, Clone, Default)]
pub struct Decoder {
    /// Kernel namespace identity (inode number) → index in the plan's namespaces, sorted by
    /// identity (a plan has a handful: a binary search, no hashing per record).
    namespaces: Vec<(u64, usize)>,
    /// The session's hop ids (< `MAX_HOPS`), by id.
    hops: Vec<bool>,
    /// Drop reason value → name.
    reasons: HashMap<u32, Arc<str>>,
}

impl Decoder {
    /// `namespaces[i]` is the kernel identity of the plan's namespace `i`; `hops` the plan's
    /// hop ids; `reasons` the drop reason names by value.
    pub fn new(
        namespaces: &[u64],
        hops: impl IntoIterator<Item = u32>,
        reasons: impl IntoIterator<Item = (u32, String)>,
    ) -> Self {
        // A namespace listed twice keeps its last index, as a map built in order would.
        let by_cookie: HashMap<u64, usize> = namespaces
            .iter()
            .enumerate()
            .map(|(i, c)| (*c, i))
            .collect();
        let mut namespaces: Vec<(u64, usize)> = by_cookie.into_iter().collect();
        namespaces.sort_unstable();
        let mut by_id = vec![false; podtrace_abi::MAX_HOPS as usize];
        for id in hops {
            if let Some(slot) = by_id.get_mut(id as usize) {
                *slot = true;
            }
        }
        Self {
            namespaces,
            hops: by_id,
            reasons: reasons
                .into_iter()
                .map(|(v, n)| (v, Arc::from(n)))
                .collect(),
        }
    }

    fn reason(&self, value: u32) -> Arc<str> {
        match self.reasons.get(&value) {
            Some(n) => n.clone(),
            None => Arc::from(format!("reason {value}")),
        }
    }

    fn hop(&self, id: u32) -> Option<u32> {
        self.hops
            .get(id as usize)
            .copied()
            .unwrap_or(false)
            .then_some(id)
    }

    fn namespace(&self, cookie: u64) -> Option<usize> {
        self.namespaces
            .binary_search_by_key(&cookie, |(c, _)| *c)
            .ok()
            .map(|i| self.namespaces[i].1)
    }

    /// One record: the event, or `None` when it is not the session's or is malformed. Packet
    /// bytes are copied out of the record into `arena`.
    pub fn decode(&self, record: &[u8], arena: &mut Arena) -> Option<TraceEvent> {
        let header = record.get(..HEADER_LEN)?;
        // SAFETY: length checked; `Event` is plain old data (every bit pattern is valid),
        // read unaligned.
        let ev: Event = unsafe { std::ptr::read_unaligned(header.as_ptr().cast::<Event>()) };
        let flow = Flow::from(&ev.flow);
        let ns = self.namespace(ev.netns_ino);
        match ev.kind {
            KIND_TC => {
                // A copy of the tc programs serves only the session's namespaces; an id it did
                // not give is not ours.
                let hop = self.hop(ev.hop_id)?;
                let packet = match ev.cap_len {
                    0 => None,
                    n => {
                        let data = record.get(HEADER_LEN..HEADER_LEN.checked_add(n as usize)?)?;
                        Some(arena.copy(data))
                    }
                };
                Some(TraceEvent::Hop(HopEvent {
                    ts_ns: ev.ts_ns,
                    hop,
                    hook: if ev.dir == DIR_INGRESS {
                        Hook::Ingress
                    } else {
                        Hook::Egress
                    },
                    len: ev.skb_len,
                    flow,
                    packet,
                }))
            }
            KIND_DROP => Some(TraceEvent::Drop(DropEvent {
                ts_ns: ev.ts_ns,
                // Kernel-wide: keep what happened in the session's namespaces.
                at: Place {
                    ns: ns?,
                    ifindex: ev.ifindex,
                },
                hop: self.hop(ev.hop_id),
                reason: self.reason(ev.reason),
                len: ev.skb_len,
                flow,
            })),
            KIND_FIB => Some(TraceEvent::Fib(FibEvent {
                ts_ns: ev.ts_ns,
                // A lookup without an answer names no device, hence no namespace (cookie 0):
                // kept, for the consumer to place; one in a namespace not the session's is
                // not ours.
                ns: match ev.netns_ino {
                    0 => None,
                    _ => Some(ns?),
                },
                table: ev.aux,
                oif: (ev.aux2 != 0).then_some(ev.aux2),
                gateway: (ev.aux3 != 0).then(|| std::net::Ipv4Addr::from(ev.aux3.to_ne_bytes())),
                err: ev.reason as i32,
                flow,
            })),
            KIND_XMIT => Some(TraceEvent::Xmit(XmitEvent {
                ts_ns: ev.ts_ns,
                at: Place {
                    ns: ns?,
                    ifindex: ev.ifindex,
                },
                hop: self.hop(ev.hop_id),
                flow,
            })),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ev: Event, data: &[u8]) -> Vec<u8> {
        // SAFETY: Event is plain old data.
        let header =
            unsafe { std::slice::from_raw_parts((&ev as *const Event).cast::<u8>(), HEADER_LEN) };
        let mut v = header.to_vec();
        v.extend_from_slice(data);
        v
    }

    impl Decoder {
        fn decode_one(&self, record: &[u8]) -> Option<TraceEvent> {
            self.decode(record, &mut Arena::default())
        }
    }

    fn decoder() -> Decoder {
        Decoder::new(&[111, 222], [0, 1, 2], [(77, "NETFILTER_DROP".to_owned())])
    }

    #[test]
    fn hop_events_carry_their_packet() {
        let ev = Event {
            kind: KIND_TC,
            dir: podtrace_abi::DIR_EGRESS,
            hop_id: 2,
            netns_ino: 222,
            cap_len: 4,
            skb_len: 98,
            ts_ns: 5,
            ..Event::default()
        };
        let Some(TraceEvent::Hop(h)) = decoder().decode_one(&record(ev, &[1, 2, 3, 4, 9])) else {
            panic!("not a hop event");
        };
        assert_eq!((h.hop, h.hook, h.len), (2, Hook::Egress, 98));
        assert_eq!(h.packet.as_deref(), Some(&[1u8, 2, 3, 4][..]));
    }

    #[test]
    fn packets_sharing_an_arena_chunk_stay_apart() {
        let d = Decoder::new(&[222, 111], [3], []);
        let mut arena = Arena::default();
        let ev = |cap_len, ns| Event {
            kind: KIND_TC,
            hop_id: 3,
            netns_ino: ns,
            cap_len,
            ..Event::default()
        };
        let mut kept = Vec::new();
        // Small packets share chunks; one larger than a chunk gets its own; the chunk fills
        // and the next packet starts another.
        let sizes = [
            100usize,
            128,
            7,
            Arena::CHUNK + 5,
            128,
            Arena::CHUNK - 300,
            128,
            1,
        ];
        for (i, n) in sizes.iter().enumerate() {
            let data = vec![i as u8 + 1; *n];
            let ns = if i % 2 == 0 { 111 } else { 222 };
            let Some(TraceEvent::Hop(h)) = d.decode(&record(ev(*n as u32, ns), &data), &mut arena)
            else {
                panic!("packet {i} not decoded");
            };
            kept.push(h.packet.expect("a packet"));
        }
        for (i, (p, n)) in kept.iter().zip(sizes).enumerate() {
            assert_eq!(p.len(), n, "packet {i}");
            assert!(
                p.iter().all(|b| *b == i as u8 + 1),
                "packet {i} was overwritten"
            );
        }
        // Namespaces given out of order are found by their identity; one listed twice keeps
        // its last index.
        assert_eq!(d.namespace(222), Some(0));
        assert_eq!(d.namespace(111), Some(1));
        assert_eq!(d.namespace(5), None);
        let twice = Decoder::new(&[7, 9, 7], [], []);
        assert_eq!((twice.namespace(7), twice.namespace(9)), (Some(2), Some(1)));
        // Hop ids beyond the table are not the session's.
        assert_eq!(d.hop(podtrace_abi::MAX_HOPS + 1), None);
        assert_eq!(d.hop(3), Some(3));
    }

    #[test]
    fn foreign_and_malformed_records_are_dropped() {
        let d = decoder();
        // A hop id the session did not give.
        let tc = Event {
            kind: KIND_TC,
            hop_id: 9,
            ..Event::default()
        };
        assert!(d.decode_one(&record(tc, &[])).is_none());
        // A drop in a namespace that is not the session's.
        let drop = Event {
            kind: KIND_DROP,
            netns_ino: 5,
            reason: 77,
            ..Event::default()
        };
        assert!(d.decode_one(&record(drop, &[])).is_none());
        // Packet bytes promised but missing; a short header; an unknown kind.
        let cut = Event {
            kind: KIND_TC,
            hop_id: 0,
            cap_len: 100,
            ..Event::default()
        };
        assert!(d.decode_one(&record(cut, &[0; 10])).is_none());
        assert!(d.decode_one(&[0u8; 10]).is_none());
        let odd = Event {
            kind: 200,
            ..Event::default()
        };
        assert!(d.decode_one(&record(odd, &[])).is_none());
    }

    #[test]
    fn drops_are_named_and_placed() {
        let drop = Event {
            kind: KIND_DROP,
            netns_ino: 111,
            ifindex: 4,
            hop_id: u32::MAX,
            reason: 77,
            ..Event::default()
        };
        let Some(TraceEvent::Drop(d)) = decoder().decode_one(&record(drop, &[])) else {
            panic!("not a drop");
        };
        assert_eq!(&*d.reason, "NETFILTER_DROP");
        assert_eq!(d.at, Place { ns: 0, ifindex: 4 });
        assert_eq!(d.hop, None);
        let other = Event { reason: 3, ..drop };
        let Some(TraceEvent::Drop(d)) = decoder().decode_one(&record(other, &[])) else {
            panic!("not a drop");
        };
        assert_eq!(&*d.reason, "reason 3");
    }

    #[test]
    fn a_lookup_without_a_route_is_kept_without_a_namespace() {
        let d = decoder();
        // No route: no output device, so no namespace (cookie 0) and -ENETUNREACH.
        let none = Event {
            kind: KIND_FIB,
            netns_ino: 0,
            reason: (-101i32) as u32,
            aux: 254,
            ..Event::default()
        };
        let Some(TraceEvent::Fib(f)) = d.decode_one(&record(none, &[])) else {
            panic!("a failed lookup was discarded");
        };
        assert_eq!((f.ns, f.err, f.table, f.oif), (None, -101, 254, None));
        // An answer in the session's namespace is placed; one in another namespace is not
        // the session's.
        let here = Event {
            netns_ino: 222,
            aux2: 3,
            reason: 0,
            ..none
        };
        let Some(TraceEvent::Fib(f)) = d.decode_one(&record(here, &[])) else {
            panic!("not a fib event");
        };
        assert_eq!((f.ns, f.oif), (Some(1), Some(3)));
        let elsewhere = Event {
            netns_ino: 999,
            ..here
        };
        assert!(d.decode_one(&record(elsewhere, &[])).is_none());
    }
}
