//! Reads a [`Snapshot`] of a namespace, and asks the kernel's FIB for a route, over
//! rtnetlink. Runs on a thread inside the namespace (see [`in_netns`]).
use std::{future::Future, net::Ipv4Addr, path::Path};

use anyhow::{Context as _, Result};
use futures::TryStreamExt;
use rtnetlink::{
    packet_route::{
        address::AddressAttribute,
        link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo},
        neighbour::{NeighbourAddress, NeighbourAttribute},
        route::{RouteAddress, RouteAttribute, RouteFlags, RouteMessage},
        rule::{RuleAction as NlRuleAction, RuleAttribute, RuleFlags},
        AddressFamily,
    },
    Handle, IpVersion, RouteMessageBuilder,
};

use super::snapshot::{Addr, Fdb, Link, Mac, Neigh, Route, Rule, RuleAction, Snapshot, VxlanInfo};

/// Runs `f` with an rtnetlink handle bound to the namespace at `ns` (`None`: the caller's).
pub fn in_netns<T, F, Fut>(ns: Option<&Path>, f: F) -> Result<T>
where
    T: Send,
    F: FnOnce(Handle) -> Fut + Send,
    Fut: Future<Output = Result<T>>,
{
    crate::netns::run_in(ns, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building a netlink runtime")?;
        rt.block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
            tokio::spawn(conn);
            f(handle).await
        })
    })
}

fn mac_of(bytes: &[u8]) -> Option<Mac> {
    bytes.try_into().ok()
}

fn v4(addr: &RouteAddress) -> Option<Ipv4Addr> {
    match addr {
        RouteAddress::Inet(ip) => Some(*ip),
        _ => None,
    }
}

/// Reads links, IPv4 addresses, routes of every table, IPv4 rules, neighbours and FDB entries.
pub async fn snapshot(handle: &Handle) -> Result<Snapshot> {
    let mut snap = Snapshot::default();

    let mut links = handle.link().get().execute();
    while let Some(msg) = links.try_next().await.context("dumping links")? {
        let mut link = Link {
            index: msg.header.index,
            up: msg.header.flags.contains(LinkFlags::Up),
            ..Link::default()
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Address(a) => link.mac = mac_of(a),
                LinkAttribute::Mtu(m) => link.mtu = *m,
                LinkAttribute::Controller(m) => link.master = Some(*m),
                LinkAttribute::Link(l) => link.link = Some(*l),
                LinkAttribute::LinkNetNsId(id) => link.link_netnsid = Some(*id),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(kind) => {
                                link.kind = match kind {
                                    InfoKind::Veth => "veth".into(),
                                    InfoKind::Bridge => "bridge".into(),
                                    InfoKind::Vxlan => "vxlan".into(),
                                    other => other.to_string(),
                                }
                            }
                            LinkInfo::Data(InfoData::Vxlan(vx)) => {
                                let mut v = VxlanInfo::default();
                                for i in vx {
                                    match i {
                                        InfoVxlan::Id(id) => v.vni = Some(*id),
                                        InfoVxlan::Local(ip) => v.local = Some(*ip),
                                        InfoVxlan::Port(p) => v.port = Some(*p),
                                        InfoVxlan::Link(l) => v.dev = Some(*l),
                                        InfoVxlan::Learning(b) => v.learning = Some(*b),
                                        _ => {}
                                    }
                                }
                                link.vxlan = Some(v);
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        snap.links.push(link);
    }

    let mut addrs = handle.address().get().execute();
    while let Some(msg) = addrs.try_next().await.context("dumping addresses")? {
        for attr in &msg.attributes {
            if let AddressAttribute::Address(std::net::IpAddr::V4(ip)) = attr {
                snap.addrs.push(Addr {
                    index: msg.header.index,
                    ip: *ip,
                    prefix: msg.header.prefix_len,
                });
            }
        }
    }

    let mut routes = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    while let Some(msg) = routes.try_next().await.context("dumping routes")? {
        if let Some(r) = route_of(&msg) {
            snap.routes.push(r);
        }
    }

    let mut rules = handle.rule().get(IpVersion::V4).execute();
    while let Some(msg) = rules.try_next().await.context("dumping rules")? {
        let mut rule = Rule {
            priority: 0,
            src: None,
            dst: None,
            iif: None,
            oif: None,
            fwmark: None,
            tos: msg.header.tos,
            invert: msg.header.flags.contains(RuleFlags::Invert),
            action: RuleAction::Other,
        };
        // Tables above 255 live in FRA_TABLE, not the header byte.
        let mut table = msg.header.table as u32;
        let mut goto = None;
        let (mut mark, mut mask) = (None, None);
        for attr in &msg.attributes {
            match attr {
                RuleAttribute::Priority(p) => rule.priority = *p,
                RuleAttribute::Source(std::net::IpAddr::V4(ip)) => {
                    rule.src = Some((*ip, msg.header.src_len))
                }
                RuleAttribute::Destination(std::net::IpAddr::V4(ip)) => {
                    rule.dst = Some((*ip, msg.header.dst_len))
                }
                RuleAttribute::Iifname(n) => rule.iif = Some(n.clone()),
                RuleAttribute::Oifname(n) => rule.oif = Some(n.clone()),
                RuleAttribute::FwMark(m) => mark = Some(*m),
                RuleAttribute::FwMask(m) => mask = Some(*m),
                RuleAttribute::Table(t) => table = *t,
                RuleAttribute::Goto(g) => goto = Some(*g),
                _ => {}
            }
        }
        if let Some(mark) = mark {
            rule.fwmark = Some((mark, mask.unwrap_or(u32::MAX)));
        }
        rule.action = match msg.header.action {
            NlRuleAction::ToTable => RuleAction::Lookup(table),
            NlRuleAction::Goto => RuleAction::Goto(goto.unwrap_or(0)),
            NlRuleAction::Nop => RuleAction::Nop,
            NlRuleAction::Blackhole => RuleAction::Blackhole,
            NlRuleAction::Unreachable => RuleAction::Unreachable,
            NlRuleAction::Prohibit => RuleAction::Prohibit,
            _ => RuleAction::Other,
        };
        snap.rules.push(rule);
    }

    let mut neighs = handle
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Inet)
        .execute();
    while let Some(msg) = neighs.try_next().await.context("dumping neighbours")? {
        let mut ip = None;
        let mut mac = None;
        for attr in &msg.attributes {
            match attr {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => ip = Some(*a),
                NeighbourAttribute::LinkLayerAddress(l) => mac = mac_of(l),
                _ => {}
            }
        }
        if let Some(ip) = ip {
            snap.neighs.push(Neigh {
                index: msg.header.ifindex,
                ip,
                mac,
                state: u16::from(msg.header.state),
            });
        }
    }

    let mut fdb = handle
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Bridge)
        .execute();
    while let Some(msg) = fdb.try_next().await.context("dumping FDB entries")? {
        let mut entry = Fdb {
            index: msg.header.ifindex,
            mac: [0; 6],
            dst: None,
            master: None,
        };
        let mut have_mac = false;
        for attr in &msg.attributes {
            match attr {
                NeighbourAttribute::LinkLayerAddress(l) => {
                    if let Some(m) = mac_of(l) {
                        entry.mac = m;
                        have_mac = true;
                    }
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => entry.dst = Some(*a),
                // AF_BRIDGE messages carry NDA_DST without a family to parse it by.
                NeighbourAttribute::Destination(NeighbourAddress::Other(b)) if b.len() == 4 => {
                    entry.dst = Some(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
                }
                NeighbourAttribute::Controller(m) => entry.master = Some(*m),
                _ => {}
            }
        }
        if have_mac {
            snap.fdb.push(entry);
        }
    }
    Ok(snap)
}

fn route_of(msg: &RouteMessage) -> Option<Route> {
    if msg.header.address_family != AddressFamily::Inet {
        return None;
    }
    let mut r = Route {
        table: msg.header.table as u32,
        dst: Ipv4Addr::UNSPECIFIED,
        prefix: msg.header.destination_prefix_length,
        gateway: None,
        oif: None,
        prefsrc: None,
        metric: 0,
        kind: u8::from(msg.header.kind),
        scope: u8::from(msg.header.scope),
        onlink: msg.header.flags.contains(RouteFlags::Onlink),
    };
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Destination(a) => r.dst = v4(a)?,
            RouteAttribute::Gateway(a) => r.gateway = v4(a),
            RouteAttribute::Oif(o) => r.oif = Some(*o),
            RouteAttribute::PrefSource(a) => r.prefsrc = v4(a),
            RouteAttribute::Priority(p) => r.metric = *p,
            RouteAttribute::Table(t) => r.table = *t,
            _ => {}
        }
    }
    Some(r)
}

/// The kernel's answer to `ip route get DST [from SRC iif IIF]`: the FIB lookup a packet
/// from SRC arriving on IIF (or generated locally, with no IIF) gets.
pub async fn route_get(
    handle: &Handle,
    dst: Ipv4Addr,
    src: Option<Ipv4Addr>,
    iif: Option<u32>,
) -> Result<Route> {
    let mut b = RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(dst, 32);
    if let Some(src) = src {
        b = b.source_prefix(src, 32);
    }
    if let Some(iif) = iif {
        b = b.input_interface(iif);
    }
    let mut msg = b.build();
    // Without it the kernel reports table main whatever table the lookup used.
    msg.header.flags |= RouteFlags::LookupTable;
    let mut answers = handle.route().get(msg).execute();
    let answer = answers
        .try_next()
        .await
        .with_context(|| format!("the kernel has no route to {dst}"))?
        .with_context(|| format!("the kernel gave no answer for a route to {dst}"))?;
    route_of(&answer).with_context(|| format!("unreadable route answer for {dst}"))
}
