//! Changes to a namespace's network, as netlink requests (no `ip`, no `bridge`): what the
//! lab builds its topologies with. podtrace's tracing commands never call these.
use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr},
    os::fd::AsRawFd,
    path::Path,
};

use anyhow::{bail, Context as _, Result};
use futures::TryStreamExt;
use rtnetlink::{
    packet_route::{
        link::{InfoData, InfoVeth},
        neighbour::{NeighbourFlags, NeighbourState},
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteScope},
        rule::RuleAction,
    },
    LinkBridge, LinkBridgePort, LinkUnspec, LinkVeth, LinkVxlan, RouteMessageBuilder,
};

use super::{errno_of, snapshot::mac_string, Mac, Nl, TABLE_MAIN};

/// A route to add. `table` 254 is main.
#[derive(Debug, Clone)]
pub struct Route {
    pub dst: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
    pub oif: u32,
    pub table: u32,
    pub scope: RouteScope,
    pub onlink: bool,
}

impl Route {
    /// `DST/LEN dev OIF scope link` in main.
    pub fn link(dst: Ipv4Addr, prefix_len: u8, oif: u32) -> Self {
        Self {
            dst,
            prefix_len,
            gateway: None,
            oif,
            table: TABLE_MAIN,
            scope: RouteScope::Link,
            onlink: false,
        }
    }

    /// `DST/LEN via GW dev OIF` in main.
    pub fn via(dst: Ipv4Addr, prefix_len: u8, gateway: Ipv4Addr, oif: u32) -> Self {
        Self {
            dst,
            prefix_len,
            gateway: Some(gateway),
            oif,
            table: TABLE_MAIN,
            scope: RouteScope::Universe,
            onlink: false,
        }
    }

    pub fn table(mut self, table: u32) -> Self {
        self.table = table;
        self
    }

    pub fn onlink(mut self) -> Self {
        self.onlink = true;
        self
    }
}

impl Nl {
    /// Creates a veth pair `name` (here) / `peer` (in the namespace `peer_ns`, or here when
    /// `None`), both with `mtu`; `peer_mac` fixes the peer's MAC. The peer is created straight
    /// in its namespace (IFLA_NET_NS_FD inside the peer's VETH_INFO_PEER message), so it never
    /// appears anywhere else.
    pub fn add_veth(
        &self,
        name: &str,
        peer: &str,
        peer_ns: Option<&Path>,
        mtu: u32,
        peer_mac: Option<Mac>,
    ) -> Result<()> {
        let ns_file = peer_ns
            .map(|p| File::open(p).with_context(|| format!("opening {}", p.display())))
            .transpose()?;
        // rtnetlink's `LinkVeth::new(name, peer)` only gives the peer a name; the peer's
        // namespace (and MTU, MAC) go in the VETH_INFO_PEER link message, so we build that
        // message ourselves and put it in place of the one `LinkVeth` made.
        let mut peer_msg = LinkUnspec::new_with_name(peer).mtu(mtu);
        if let Some(f) = &ns_file {
            peer_msg = peer_msg.setns_by_fd(f.as_raw_fd());
        }
        if let Some(mac) = peer_mac {
            peer_msg = peer_msg.address(mac.to_vec());
        }
        let msg = LinkVeth::new(name, peer)
            .mtu(mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg.build())))
            .build();
        let r = self.block(self.handle.link().add(msg).execute());
        drop(ns_file);
        r.with_context(|| format!("creating veth pair {name}/{peer}"))
    }

    /// Creates a bridge (down; bring it up with [`Nl::set_up`] once configured).
    pub fn add_bridge(&self, name: &str, mtu: Option<u32>) -> Result<u32> {
        let mut b = LinkBridge::new(name).down();
        if let Some(mtu) = mtu {
            b = b.mtu(mtu);
        }
        self.block(self.handle.link().add(b.build()).execute())
            .with_context(|| format!("creating bridge {name}"))?;
        self.index(name)
    }

    /// Creates a VXLAN device as flannel does: `vxlan id VNI local LOCAL dev DEV dstport PORT
    /// nolearning`, with `mtu`.
    pub fn add_vxlan(
        &self,
        name: &str,
        vni: u32,
        local: Ipv4Addr,
        dev: u32,
        port: u16,
        mtu: u32,
    ) -> Result<u32> {
        let msg = LinkVxlan::new(name, vni)
            .local(local)
            .dev(dev)
            .port(port)
            .learning(false)
            .mtu(mtu)
            .build();
        self.block(self.handle.link().add(msg).execute())
            .with_context(|| format!("creating vxlan {name}"))?;
        self.index(name)
    }

    pub fn set_up(&self, index: u32) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).up().build();
        self.block(self.handle.link().set(msg).execute())
            .with_context(|| format!("setting link {index} up"))
    }

    pub fn set_up_by_name(&self, name: &str) -> Result<()> {
        let index = self.index(name)?;
        self.set_up(index)
            .with_context(|| format!("setting {name} up"))
    }

    pub fn set_mtu(&self, index: u32, mtu: u32) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).mtu(mtu).build();
        self.block(self.handle.link().set(msg).execute())
            .with_context(|| format!("setting the MTU of link {index}"))
    }

    /// Enslaves `index` to the bridge `master`.
    pub fn set_master(&self, index: u32, master: u32) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).controller(master).build();
        self.block(self.handle.link().set(msg).execute())
            .with_context(|| format!("enslaving link {index} to {master}"))
    }

    /// `ip link set dev X type bridge_slave hairpin on` (RTM_NEWLINK with
    /// IFLA_INFO_SLAVE_DATA/IFLA_BRPORT_MODE on the existing port).
    pub fn set_hairpin(&self, index: u32) -> Result<()> {
        let msg = LinkBridgePort::new(index).hairpin(true).build();
        self.block(self.handle.link().set_port(msg).execute())
            .with_context(|| format!("turning hairpin on for bridge port {index}"))
    }

    pub fn del_link(&self, index: u32) -> Result<()> {
        match self.block(self.handle.link().del(index).execute()) {
            Ok(()) => Ok(()),
            // Deleting one end of a veth pair takes the other with it.
            Err(e) if errno_of(&e) == Some(libc::ENODEV) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("deleting link {index}")),
        }
    }

    // ---- addresses ------------------------------------------------------------------------

    pub fn add_addr(&self, index: u32, ip: Ipv4Addr, prefix_len: u8) -> Result<()> {
        self.block(
            self.handle
                .address()
                .add(index, IpAddr::V4(ip), prefix_len)
                .execute(),
        )
        .with_context(|| format!("adding {ip}/{prefix_len} to link {index}"))
    }

    // ---- routes and rules -----------------------------------------------------------------

    pub fn add_route(&self, r: &Route) -> Result<()> {
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(r.dst, r.prefix_len)
            .output_interface(r.oif)
            .table_id(r.table)
            .scope(r.scope);
        if let Some(gw) = r.gateway {
            b = b.gateway(gw);
        }
        if r.onlink {
            b = b.onlink();
        }
        self.block(self.handle.route().add(b.build()).execute())
            .with_context(|| {
                format!(
                    "adding route {}/{}{} dev {} table {}",
                    r.dst,
                    r.prefix_len,
                    r.gateway.map(|g| format!(" via {g}")).unwrap_or_default(),
                    r.oif,
                    r.table
                )
            })
    }

    /// IPv4 routes of every table.
    pub fn routes(&self) -> Result<Vec<RouteMessage>> {
        let query = RouteMessageBuilder::<Ipv4Addr>::new().build();
        self.block(self.handle.route().get(query).execute().try_collect())
            .context("listing routes")
    }

    /// Deletes the route to `dst/prefix_len` through link `oif` in `table` (as
    /// `ip route del 10.19.16.0/20 dev eth1 table main` does for the prefix route the kernel
    /// made when the address was added).
    pub fn del_route(&self, dst: Ipv4Addr, prefix_len: u8, oif: u32, table: u32) -> Result<()> {
        let found = self.routes()?.into_iter().find(|m| {
            m.header.destination_prefix_length == prefix_len
                && route_table(m) == table
                && m.attributes.iter().any(|a| {
                    matches!(a, RouteAttribute::Destination(RouteAddress::Inet(d)) if *d == dst)
                })
                && m.attributes
                    .iter()
                    .any(|a| matches!(a, RouteAttribute::Oif(o) if *o == oif))
        });
        let Some(msg) = found else {
            bail!("no route {dst}/{prefix_len} dev {oif} in table {table} to delete");
        };
        self.block(self.handle.route().del(msg).execute())
            .with_context(|| format!("deleting route {dst}/{prefix_len} dev {oif} table {table}"))
    }

    /// `ip rule add [from SRC/LEN] [to DST/LEN] pref PRIORITY lookup TABLE`.
    pub fn add_rule(
        &self,
        priority: u32,
        from: Option<(Ipv4Addr, u8)>,
        to: Option<(Ipv4Addr, u8)>,
        table: u32,
    ) -> Result<()> {
        let mut req = self
            .handle
            .rule()
            .add()
            .v4()
            .priority(priority)
            .table_id(table)
            .action(RuleAction::ToTable);
        if let Some((ip, len)) = from {
            req = req.source_prefix(ip, len);
        }
        if let Some((ip, len)) = to {
            req = req.destination_prefix(ip, len);
        }
        self.block(req.execute()).with_context(|| {
            format!("adding rule {priority}: from {from:?} to {to:?} lookup {table}")
        })
    }

    /// Deletes every IPv4 rule whose selector is `from IP` (what `ip rule del from IP` does,
    /// for each of them); returns how many there were.
    pub fn del_rules_from(&self, ip: Ipv4Addr) -> Result<usize> {
        use rtnetlink::{packet_route::rule::RuleAttribute, IpVersion};
        let rules: Vec<_> = self
            .block(
                self.handle
                    .rule()
                    .get(IpVersion::V4)
                    .execute()
                    .try_collect(),
            )
            .context("listing rules")?;
        let mut n = 0;
        for rule in rules {
            let from_ip = rule
                .attributes
                .iter()
                .any(|a| matches!(a, RuleAttribute::Source(s) if *s == IpAddr::V4(ip)));
            if from_ip {
                self.block(self.handle.rule().del(rule).execute())
                    .with_context(|| format!("deleting a rule from {ip}"))?;
                n += 1;
            }
        }
        Ok(n)
    }

    // ---- neighbours and FDB ---------------------------------------------------------------

    /// `ip neigh add IP lladdr MAC dev INDEX nud permanent`.
    pub fn add_neigh(&self, index: u32, ip: Ipv4Addr, mac: &[u8]) -> Result<()> {
        let req = self
            .handle
            .neighbours()
            .add(index, IpAddr::V4(ip))
            .link_layer_address(mac)
            .state(NeighbourState::Permanent)
            .replace();
        self.block(req.execute()).with_context(|| {
            format!(
                "adding neighbour {ip} lladdr {} dev {index}",
                mac_string(mac)
            )
        })
    }

    /// `bridge fdb append MAC dev VXLAN dst REMOTE self permanent`: an FDB entry on a VXLAN
    /// device sending frames for `mac` to the VTEP at `remote`.
    pub fn add_vxlan_fdb(&self, vxlan: u32, mac: &[u8], remote: Ipv4Addr) -> Result<()> {
        let req = self
            .handle
            .neighbours()
            .add_bridge(vxlan, mac)
            .destination(IpAddr::V4(remote))
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .replace();
        self.block(req.execute())
            .with_context(|| format!("adding fdb {} dev {vxlan} dst {remote}", mac_string(mac)))
    }

    /// `bridge fdb replace MAC dev PORT master static`: the bridge `PORT` is enslaved to
    /// forwards frames for `mac` to `PORT` only (NUD_NOARP: static; NUD_PERMANENT would make
    /// it a local address of the bridge).
    pub fn add_bridge_fdb(&self, port: u32, mac: &[u8]) -> Result<()> {
        let req = self
            .handle
            .neighbours()
            .add_bridge(port, mac)
            .flags(NeighbourFlags::Controller)
            .state(NeighbourState::Noarp)
            .replace();
        self.block(req.execute())
            .with_context(|| format!("adding static fdb {} dev {port} master", mac_string(mac)))
    }
}

/// The table a route message belongs to (RTA_TABLE when present, else the header byte).
pub fn route_table(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(m.header.table as u32)
}
