//! [`PreFilter`]: necessary conditions of a filter (protocols, networks, ports), for a cheaper
//! first stage (e.g. in the kernel) before the full match.

use std::collections::BTreeSet;

use super::expr::{Expr, Ipv4Net, Primitive};
use crate::pcap::packet::{PacketSummary, IPPROTO_TCP, IPPROTO_UDP};

/// A conservative summary of what a packet must have to match a filter: every packet the
/// filter accepts satisfies every constraint here (the converse need not hold). A `None`
/// field means "no constraint". Like the filter, it applies to the inner headers of VXLAN
/// frames.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PreFilter {
    /// The IP protocol is one of these.
    pub protocols: Option<BTreeSet<u8>>,
    /// The source or the destination address lies in one of these networks (hosts are /32).
    pub networks: Option<BTreeSet<Ipv4Net>>,
    /// The source or the destination port is one of these.
    pub ports: Option<BTreeSet<u16>>,
}

impl PreFilter {
    /// No constraint at all.
    pub fn unconstrained() -> Self {
        PreFilter::default()
    }

    /// Whether a packet satisfies the constraints (a necessary condition for the filter).
    pub fn may_match(&self, p: &PacketSummary) -> bool {
        let constrained =
            self.protocols.is_some() || self.networks.is_some() || self.ports.is_some();
        let Some(ip) = p.ip else {
            return !constrained;
        };
        if let Some(protos) = &self.protocols {
            if !protos.contains(&ip.protocol) {
                return false;
            }
        }
        if let Some(nets) = &self.networks {
            if !nets
                .iter()
                .any(|n| n.contains(ip.src) || n.contains(ip.dst))
            {
                return false;
            }
        }
        if let Some(ports) = &self.ports {
            match ip.ports {
                Some(pp) if ports.contains(&pp.src) || ports.contains(&pp.dst) => {}
                _ => return false,
            }
        }
        true
    }

    pub(super) fn of(e: &Expr) -> PreFilter {
        match e {
            Expr::Prim(p) => match *p {
                Primitive::Ip => PreFilter::default(),
                Primitive::Proto(n) => PreFilter {
                    protocols: Some([n].into()),
                    ..Default::default()
                },
                Primitive::Host { addr, .. } => PreFilter {
                    networks: Some([Ipv4Net::host(addr)].into()),
                    ..Default::default()
                },
                Primitive::Net { net, .. } => PreFilter {
                    networks: Some([net].into()),
                    ..Default::default()
                },
                Primitive::Port { proto, port, .. } => PreFilter {
                    protocols: Some(match proto {
                        Some(n) => [n].into(),
                        None => [IPPROTO_TCP, IPPROTO_UDP].into(),
                    }),
                    ports: Some([port].into()),
                    ..Default::default()
                },
            },
            // A negation promises nothing.
            Expr::Not(_) => PreFilter::default(),
            Expr::And(..) | Expr::Or(..) => {
                // Left to right along the chain (no recursion down its left spine).
                let (first, rest) = e.chain();
                let mut acc = Self::of(first);
                for (is_and, right) in rest {
                    let b = Self::of(right);
                    acc = if is_and {
                        PreFilter {
                            // A packet has one protocol: it must be in both sets.
                            protocols: both(acc.protocols, b.protocols, |x, y| &x & &y),
                            // Two addresses/ports: "one in A" and "one in B" does not mean
                            // "one in A∩B", so keep either constraint (the tighter one).
                            networks: both(acc.networks, b.networks, smaller),
                            ports: both(acc.ports, b.ports, smaller),
                        }
                    } else {
                        PreFilter {
                            protocols: either(acc.protocols, b.protocols),
                            networks: either(acc.networks, b.networks),
                            ports: either(acc.ports, b.ports),
                        }
                    };
                }
                acc
            }
        }
    }
}

fn both<T>(a: Option<T>, b: Option<T>, f: impl FnOnce(T, T) -> T) -> Option<T> {
    match (a, b) {
        (Some(x), Some(y)) => Some(f(x, y)),
        (x, None) => x,
        (None, y) => y,
    }
}

fn either<T: Ord>(a: Option<BTreeSet<T>>, b: Option<BTreeSet<T>>) -> Option<BTreeSet<T>> {
    match (a, b) {
        (Some(mut x), Some(y)) => {
            x.extend(y);
            Some(x)
        }
        _ => None,
    }
}

fn smaller<T>(a: BTreeSet<T>, b: BTreeSet<T>) -> BTreeSet<T> {
    if b.len() < a.len() {
        b
    } else {
        a
    }
}
