//! Reads over rtnetlink: a [`Snapshot`] of the namespace, one link, the kernel's FIB answer
//! for a route, and the NSID another namespace has here.
use std::{fs::File, net::Ipv4Addr, os::fd::AsRawFd as _};

use anyhow::{bail, Context as _, Result};
use futures::TryStreamExt;
use rtnetlink::{
    packet_route::{
        address::AddressAttribute,
        link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
        neighbour::{NeighbourAddress, NeighbourAttribute},
        route::{RouteAddress, RouteAttribute, RouteFlags, RouteMessage},
        rule::{RuleAction as NlRuleAction, RuleAttribute, RuleFlags},
        AddressFamily,
    },
    Handle, IpVersion, RouteMessageBuilder,
};

use super::{
    errno_of,
    snapshot::{Addr, Fdb, Link, Mac, Neigh, Route, Rule, RuleAction, Snapshot, VxlanInfo},
    Nl,
};

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
async fn snapshot(handle: &Handle) -> Result<Snapshot> {
    let mut snap = Snapshot::default();

    let mut links = handle.link().get().execute();
    while let Some(msg) = links.try_next().await.context("dumping links")? {
        snap.links.push(link_of(&msg));
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
async fn route_get(
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

fn link_of(msg: &LinkMessage) -> Link {
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
            LinkAttribute::Controller(m) if *m != 0 => link.master = Some(*m),
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
                                InfoKind::Other(s) => s.clone(),
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
    link
}

impl Nl {
    /// Links, IPv4 addresses, routes of every table, IPv4 rules, neighbours and FDB entries.
    pub fn snapshot(&self) -> Result<Snapshot> {
        self.block(snapshot(&self.handle))
    }

    /// Every link of the namespace.
    pub fn links(&self) -> Result<Vec<Link>> {
        let msgs: Vec<LinkMessage> = self
            .block(self.handle.link().get().execute().try_collect())
            .context("listing links")?;
        Ok(msgs.iter().map(link_of).collect())
    }

    /// The link called `name`.
    pub fn link(&self, name: &str) -> Result<Link> {
        let found = self.block(async {
            self.handle
                .link()
                .get()
                .match_name(name.to_owned())
                .execute()
                .try_next()
                .await
        });
        match found {
            Ok(Some(m)) => Ok(link_of(&m)),
            Ok(None) => bail!("no link {name}"),
            Err(e) if errno_of(&e) == Some(libc::ENODEV) => bail!("no link {name}"),
            Err(e) => Err(e).with_context(|| format!("looking up link {name}")),
        }
    }

    /// The index of the link called `name`.
    pub fn index(&self, name: &str) -> Result<u32> {
        Ok(self.link(name)?.index)
    }

    /// The kernel's answer to `ip route get DST [from SRC iif IIF]` (see [`route_get`]).
    pub fn route_get(
        &self,
        dst: Ipv4Addr,
        src: Option<Ipv4Addr>,
        iif: Option<u32>,
    ) -> Result<Route> {
        self.block(route_get(&self.handle, dst, src, iif))
    }

    /// The NSID the namespace open as `ns` has in this one (RTM_GETNSID with its fd), as a
    /// link's IFLA_LINK_NETNSID names it; `None` when none is assigned (then no link here
    /// points into it).
    pub fn nsid_of(&self, ns: &File) -> Result<Option<i32>> {
        use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
        use rtnetlink::packet_route::{
            nsid::{NsidAttribute, NsidMessage},
            RouteNetlinkMessage,
        };
        let mut msg = NsidMessage::default();
        msg.attributes = vec![NsidAttribute::Fd(ns.as_raw_fd() as u32)];
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetNsId(msg));
        req.header.flags = NLM_F_REQUEST;
        let mut handle = self.handle.clone();
        self.block(async move {
            let mut answers = handle
                .request(req)
                .map_err(|e| anyhow::anyhow!("RTM_GETNSID: {e}"))?;
            while let Some(msg) = futures::StreamExt::next(&mut answers).await {
                match msg.payload {
                    NetlinkPayload::Error(e) => {
                        return Err(anyhow::anyhow!("RTM_GETNSID: {e}"));
                    }
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNsId(m)) => {
                        return Ok(m.attributes.iter().find_map(|a| match a {
                            NsidAttribute::Id(id) if *id >= 0 => Some(*id),
                            _ => None,
                        }));
                    }
                    _ => {}
                }
            }
            Ok(None)
        })
    }
}
