//! Conversations across NAT: which connection of the pod a packet belongs to, and in which
//! direction, whatever the path did to its addresses and ports.
//!
//! Every 5-tuple seen is mapped to a conversation: the pod's own (pod ↔ destination, as it
//! sent it), and the translated forms of it, learnt from
//! 1. the conntrack table of the translating node ([`ConntrackSource`]: its reply tuple is
//!    the packet as the backend answers it, its inverse the packet as the backend receives
//!    it);
//! 2. the Service model: a backend's address and port with the pod's own source port (no
//!    masquerade keeps the port);
//! 3. what NAT leaves unchanged: a packet with the same protocol, IP id, TCP sequence (or
//!    ICMP id and sequence) and flags as a packet of exactly one open conversation, at an
//!    address the plan says it may be translated to.
//!
//! The first that answers wins; conntrack overrides the other two.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::Ipv4Addr,
};

use serde::Serialize;

use crate::trace::{
    event::Flow,
    nat::NatPlan,
    plan::{NatFlow, Plan},
};

/// A packet's addresses, protocol and ports (ICMP echo: the identifier as both ports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tuple {
    pub src: Ipv4Addr,
    pub sport: u16,
    pub dst: Ipv4Addr,
    pub dport: u16,
    pub proto: u8,
}

impl Tuple {
    pub fn of(f: &Flow) -> Self {
        let (sport, dport) = match f.proto {
            1 => {
                let id = (f.seq >> 16) as u16;
                (id, id)
            }
            _ => (f.sport, f.dport),
        };
        Tuple {
            src: f.src,
            sport,
            dst: f.dst,
            dport,
            proto: f.proto,
        }
    }

    /// The packet an ICMP error quotes.
    pub fn quoted(f: &Flow) -> Option<Self> {
        let q = f.about?;
        Some(Tuple {
            src: q.src,
            sport: q.sport,
            dst: q.dst,
            dport: q.dport,
            proto: q.proto,
        })
    }

    pub fn rev(&self) -> Self {
        Tuple {
            src: self.dst,
            sport: self.dport,
            dst: self.src,
            dport: self.sport,
            proto: self.proto,
        }
    }

    fn has_ports(&self) -> bool {
        matches!(self.proto, 6 | 17 | 132)
    }
}

impl std::fmt::Display for Tuple {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.has_ports() {
            write!(
                f,
                "{}:{} > {}:{}",
                self.src, self.sport, self.dst, self.dport
            )
        } else {
            write!(f, "{} > {}", self.src, self.dst)
        }
    }
}

impl Serialize for Tuple {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What a node's conntrack table says about a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CtAnswer {
    /// The node asked.
    pub node: String,
    /// The connection as its first packet was (the original direction).
    pub orig: Tuple,
    /// What a reply looks like before the node translates it back.
    pub reply: Tuple,
    /// Status bits by name (`SEEN_REPLY`, `ASSURED`, `DST_NAT`, …).
    pub status: Vec<String>,
    /// TCP state (`SYN_SENT`, `ESTABLISHED`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_state: Option<String>,
}

impl CtAnswer {
    pub fn has(&self, bit: &str) -> bool {
        self.status.iter().any(|s| s == bit)
    }
}

/// A conntrack table to ask, by plan namespace (the follow command's is real; tests give
/// fixed answers).
pub trait ConntrackSource {
    /// The entry whose original tuple is `orig`, in plan namespace `ns`.
    fn get(&mut self, ns: usize, orig: &Tuple) -> Option<CtAnswer>;
}

/// No conntrack to ask.
pub struct NoConntrack;

impl ConntrackSource for NoConntrack {
    fn get(&mut self, _: usize, _: &Tuple) -> Option<CtAnswer> {
        None
    }
}

/// Which way a packet goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Forward,
    Reverse,
}

impl Direction {
    pub fn flip(self) -> Self {
        match self {
            Direction::Forward => Direction::Reverse,
            Direction::Reverse => Direction::Forward,
        }
    }
}

/// How a translated form was tied to its conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Learnt {
    Conntrack,
    /// The Service model: a backend with the pod's own source port.
    Model,
    /// IP id, sequence and flags equal to a packet of the conversation.
    Invariants,
}

/// One connection of the pod (or, without NAT, one 5-tuple conversation).
#[derive(Debug, Clone, Serialize)]
pub struct Conversation {
    pub id: usize,
    /// As the pod sent it.
    pub orig: Tuple,
    /// The plan target it was translated to.
    #[serde(skip)]
    pub target: Option<usize>,
    /// As the target receives it, and as it answers.
    pub translated: Option<Tuple>,
    pub reply: Option<Tuple>,
    pub learnt: Option<Learnt>,
    /// The translating node's conntrack entry (the latest answer).
    pub conntrack: Option<CtAnswer>,
    #[serde(skip)]
    pub lookups: u32,
    #[serde(skip)]
    pub first_ts: u64,
    #[serde(skip)]
    pub last_ts: u64,
    /// Packets seen, by direction.
    pub packets_forward: u64,
    pub packets_reverse: u64,
}

/// Conntrack is asked again about a conversation it did not know yet, at most this often …
const RETRY_NS: u64 = 2_000_000;
/// … and this many times.
const MAX_LOOKUPS: u32 = 8;
/// Two packets are the same one (translated) only this close in time.
const SAME_PACKET_NS: u64 = 1_000_000_000;

/// The conversations of a run.
pub struct Conversations {
    pod: Ipv4Addr,
    peer: Option<Ipv4Addr>,
    nat: Option<NatPlan>,
    /// Translated forms the kernel filter already has.
    known_flows: Vec<NatFlow>,
    /// Translated forms learnt from conntrack that the kernel filter lacks.
    new_flows: Vec<NatFlow>,
    /// By id (ids are never reused).
    pub list: BTreeMap<usize, Conversation>,
    next_id: usize,
    /// Conversations forgotten after they went idle (their packets are reported).
    pub forgotten: u64,
    tuples: HashMap<Tuple, (usize, Direction)>,
    ct: Box<dyn ConntrackSource + Send>,
    /// Packets of translated-looking tuples no conversation could be tied to.
    pub unattributed: u64,
    /// Translated packets that matched several conversations by their invariants.
    pub ambiguous: u64,
}

/// A packet still open (for the invariant match): its conversation, direction and
/// invariants.
#[derive(Debug, Clone, Copy)]
pub struct OpenPacket {
    pub conv: usize,
    pub dir: Direction,
    pub proto: u8,
    pub ip_id: u16,
    pub seq: u32,
    pub flags: u8,
    pub last_ts: u64,
}

impl Conversations {
    pub fn new(plan: &Plan, ct: Box<dyn ConntrackSource + Send>) -> Self {
        Self {
            pod: plan.filter.pod,
            peer: plan.filter.peer,
            nat: plan.nat.clone(),
            known_flows: plan.filter.nat.clone(),
            new_flows: Vec::new(),
            list: BTreeMap::new(),
            next_id: 0,
            forgotten: 0,
            tuples: HashMap::new(),
            ct,
            unattributed: 0,
            ambiguous: 0,
        }
    }

    pub fn nat(&self) -> Option<&NatPlan> {
        self.nat.as_ref()
    }

    /// Translated forms learnt since the last call, for the kernel filter.
    pub fn take_new_flows(&mut self) -> Vec<NatFlow> {
        std::mem::take(&mut self.new_flows)
    }

    fn is_own(&self, t: &Tuple) -> Option<Direction> {
        let peer_ok = |ip: Ipv4Addr| self.peer.is_none_or(|p| p == ip);
        if t.src == self.pod && peer_ok(t.dst) {
            Some(Direction::Forward)
        } else if t.dst == self.pod && peer_ok(t.src) {
            Some(Direction::Reverse)
        } else {
            None
        }
    }

    fn bind(&mut self, t: Tuple, conv: usize, dir: Direction) {
        self.tuples.insert(t, (conv, dir));
        self.tuples.insert(t.rev(), (conv, dir.flip()));
    }

    fn create(&mut self, orig: Tuple, ts: u64) -> usize {
        let id = self.next_id;
        self.next_id += 1;
        self.list.insert(
            id,
            Conversation {
                id,
                orig,
                target: None,
                translated: None,
                reply: None,
                learnt: None,
                conntrack: None,
                lookups: 0,
                first_ts: ts,
                last_ts: ts,
                packets_forward: 0,
                packets_reverse: 0,
            },
        );
        self.bind(orig, id, Direction::Forward);
        id
    }

    /// Ties conversation `c` to what conntrack says, now.
    fn ask(&mut self, c: usize, ts: u64) {
        let Some(nat) = &self.nat else { return };
        let ns = nat.ns;
        let Some(conv) = self.list.get_mut(&c) else {
            return;
        };
        conv.lookups += 1;
        conv.last_ts = conv.last_ts.max(ts);
        let orig = conv.orig;
        let Some(answer) = self.ct.get(ns, &orig) else {
            return;
        };
        self.learn(c, answer);
    }

    fn learn(&mut self, c: usize, answer: CtAnswer) {
        let reply = answer.reply;
        let translated = reply.rev();
        let target = self
            .nat
            .as_ref()
            .and_then(|n| n.target(reply.src, reply.has_ports().then_some(reply.sport)));
        let Some(orig) = self.list.get(&c).map(|v| v.orig) else {
            return;
        };
        {
            let conv = self.list.get_mut(&c).expect("present");
            conv.reply = Some(reply);
            conv.translated = Some(translated);
            conv.learnt = Some(Learnt::Conntrack);
            if target.is_some() {
                conv.target = target;
            }
            conv.conntrack = Some(answer);
        }
        if translated != orig {
            self.bind(translated, c, Direction::Forward);
        }
        // The kernel filter must see the translated form: add what the plan did not know
        // (a masquerade address, a backend added since).
        if translated.src != self.pod || target.is_none() {
            let flow = NatFlow {
                a: translated.src,
                b: translated.dst,
                port: translated.has_ports().then_some(translated.dport),
                proto: translated.proto,
            };
            let covered = |f: &NatFlow| {
                f.a == flow.a
                    && f.b == flow.b
                    && f.proto == flow.proto
                    && (f.port.is_none() || f.port == flow.port)
            };
            if self.nat.is_some()
                && !self.known_flows.iter().any(covered)
                && !(translated.src == self.pod && translated.dst == orig.dst)
            {
                self.known_flows.push(flow);
                self.new_flows.push(flow);
            }
        }
    }

    /// The conversation and direction of a packet with headers `f`, seen at `ts`. `open`:
    /// the packets still open, for the invariant match.
    pub fn resolve(
        &mut self,
        f: &Flow,
        ts: u64,
        open: &[OpenPacket],
    ) -> Option<(usize, Direction)> {
        if f.is_icmp_error() {
            // An error travels back towards the sender of the packet it quotes.
            let q = Tuple::quoted(f)?;
            return self
                .resolve_tuple(q, None, ts, open)
                .map(|(c, d)| (c, d.flip()));
        }
        self.resolve_tuple(Tuple::of(f), Some(f), ts, open)
    }

    fn resolve_tuple(
        &mut self,
        t: Tuple,
        f: Option<&Flow>,
        ts: u64,
        open: &[OpenPacket],
    ) -> Option<(usize, Direction)> {
        if let Some(&(c, d)) = self.tuples.get(&t) {
            self.touch(c, d, ts, f.is_some());
            return Some((c, d));
        }
        if let Some(dir) = self.is_own(&t) {
            let orig = match dir {
                Direction::Forward => t,
                Direction::Reverse => t.rev(),
            };
            let c = self.create(orig, ts);
            if self.nat.is_some() && f.is_some() {
                self.ask(c, ts);
            }
            self.touch(c, dir, ts, f.is_some());
            return Some((c, dir));
        }
        self.nat.as_ref()?;
        // Conntrack may know it by now.
        let pending: Vec<usize> = self
            .list
            .values()
            .filter(|c| {
                c.conntrack.is_none()
                    && c.lookups < MAX_LOOKUPS
                    && ts.saturating_sub(c.first_ts) < 10 * SAME_PACKET_NS
            })
            .map(|c| c.id)
            .collect();
        for c in pending {
            self.ask(c, ts);
        }
        if let Some(&(c, d)) = self.tuples.get(&t) {
            self.touch(c, d, ts, f.is_some());
            return Some((c, d));
        }
        let (c, d, how) = self.guess(&t, f, ts, open)?;
        let conv = self.list.get_mut(&c)?;
        let (translated, reply) = match d {
            Direction::Forward => (t, t.rev()),
            Direction::Reverse => (t.rev(), t),
        };
        conv.translated.get_or_insert(translated);
        conv.reply.get_or_insert(reply);
        conv.learnt.get_or_insert(how);
        if conv.target.is_none() {
            conv.target = self.nat.as_ref().and_then(|n| {
                n.target(
                    translated.dst,
                    translated.has_ports().then_some(translated.dport),
                )
            });
        }
        self.bind(t, c, d);
        self.touch(c, d, ts, f.is_some());
        Some((c, d))
    }

    /// A translated form of an open conversation, by the model or by invariants.
    fn guess(
        &mut self,
        t: &Tuple,
        f: Option<&Flow>,
        ts: u64,
        open: &[OpenPacket],
    ) -> Option<(usize, Direction, Learnt)> {
        let nat = self.nat.as_ref()?;
        let port_ok =
            |want: Option<u16>, got: u16| want.is_none() || want == Some(got) || !t.has_ports();
        // Which way `t` goes, by the addresses the plan may translate to.
        let mut candidates: Vec<(usize, Direction, bool)> = Vec::new();
        for conv in self.list.values() {
            if conv.orig.proto != t.proto || ts.saturating_sub(conv.last_ts) > 10 * SAME_PACKET_NS {
                continue;
            }
            for (i, target) in nat.targets.iter().enumerate() {
                if conv.target.is_some_and(|ct| ct != i) {
                    continue;
                }
                let sources = [Some(self.pod), target.snat];
                let fwd = t.dst == target.ip
                    && port_ok(target.port.or(Some(conv.orig.dport)), t.dport)
                    && sources.contains(&Some(t.src));
                let rev = t.src == target.ip
                    && port_ok(target.port.or(Some(conv.orig.dport)), t.sport)
                    && sources.contains(&Some(t.dst));
                if fwd || rev {
                    let dir = if fwd {
                        Direction::Forward
                    } else {
                        Direction::Reverse
                    };
                    // The pod's own port kept: the model says so.
                    let kept = match dir {
                        Direction::Forward => t.src == self.pod && t.sport == conv.orig.sport,
                        Direction::Reverse => t.dst == self.pod && t.dport == conv.orig.sport,
                    };
                    candidates.push((conv.id, dir, kept));
                }
            }
        }
        let kept: Vec<&(usize, Direction, bool)> = candidates.iter().filter(|c| c.2).collect();
        if let [one] = kept.as_slice() {
            return Some((one.0, one.1, Learnt::Model));
        }
        // What NAT leaves unchanged, against the open packets of the candidates.
        let f = f?;
        let same: Vec<&OpenPacket> = open
            .iter()
            .filter(|o| {
                candidates.iter().any(|c| c.0 == o.conv && c.1 == o.dir)
                    && o.proto == f.proto
                    && o.ip_id == f.ip_id
                    && o.seq == invariant_seq(f)
                    && o.flags == f.flags
                    && ts.saturating_sub(o.last_ts) < SAME_PACKET_NS
            })
            .collect();
        let mut convs: Vec<(usize, Direction)> = same.iter().map(|o| (o.conv, o.dir)).collect();
        convs.sort_by_key(|c| c.0);
        convs.dedup();
        match convs.as_slice() {
            [(c, d)] => Some((*c, *d, Learnt::Invariants)),
            [] => {
                self.unattributed += 1;
                None
            }
            _ => {
                self.ambiguous += 1;
                None
            }
        }
    }

    fn touch(&mut self, c: usize, d: Direction, ts: u64, packet: bool) {
        let Some(conv) = self.list.get_mut(&c) else {
            return;
        };
        conv.last_ts = conv.last_ts.max(ts);
        if packet {
            match d {
                Direction::Forward => conv.packets_forward += 1,
                Direction::Reverse => conv.packets_reverse += 1,
            }
        }
    }

    /// Forgets conversations idle for `idle_ns` at `now` that no open packet belongs to
    /// (`open`), so that a long run's memory stays bounded; they are counted.
    pub fn forget_idle(&mut self, now: u64, idle_ns: u64, open: &HashSet<usize>) {
        let old: Vec<usize> = self
            .list
            .values()
            .filter(|c| now.saturating_sub(c.last_ts) >= idle_ns && !open.contains(&c.id))
            .map(|c| c.id)
            .collect();
        if old.is_empty() {
            return;
        }
        for id in &old {
            self.list.remove(id);
        }
        self.tuples.retain(|_, (c, _)| !old.contains(c));
        self.forgotten += old.len() as u64;
    }

    /// The conversation a tuple is known as (no learning).
    pub fn lookup(&self, t: &Tuple) -> Option<(usize, Direction)> {
        self.tuples.get(t).copied()
    }

    /// Asks conntrack once more about every translated conversation (its final state: did
    /// the backend answer, is it established), at most `limit` of them.
    pub fn refresh(&mut self, limit: usize) {
        let Some(ns) = self.nat.as_ref().map(|n| n.ns) else {
            return;
        };
        let ids: Vec<usize> = self.list.keys().rev().take(limit).copied().collect();
        for c in ids {
            let orig = self.list[&c].orig;
            if let Some(a) = self.ct.get(ns, &orig) {
                self.learn(c, a);
            }
        }
    }

    /// Asks conntrack again about conversations it did not know yet (called now and then).
    pub fn retry(&mut self, now: u64) {
        if self.nat.is_none() {
            return;
        }
        let due: Vec<usize> = self
            .list
            .values()
            .filter(|c| {
                c.conntrack.is_none()
                    && c.lookups < MAX_LOOKUPS
                    && now.saturating_sub(c.first_ts) >= RETRY_NS * u64::from(c.lookups)
            })
            .map(|c| c.id)
            .collect();
        for c in due {
            self.ask(c, now);
        }
    }
}

/// The sequence number NAT leaves alone: TCP's, or ICMP echo's sequence without its
/// identifier (a masquerade may rewrite the identifier as it rewrites ports).
pub fn invariant_seq(f: &Flow) -> u32 {
    match f.proto {
        1 => f.seq & 0xffff,
        _ => f.seq,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn tcp(src: &str, sport: u16, dst: &str, dport: u16) -> Tuple {
        Tuple {
            src: src.parse().unwrap(),
            sport,
            dst: dst.parse().unwrap(),
            dport,
            proto: 6,
        }
    }

    #[test]
    fn tuples_print_and_reverse() {
        let t = tcp("10.244.0.9", 40000, "10.96.0.10", 80);
        assert_eq!(t.to_string(), "10.244.0.9:40000 > 10.96.0.10:80");
        assert_eq!(t.rev().rev(), t);
        assert_eq!(t.rev().src.to_string(), "10.96.0.10");
    }
}
