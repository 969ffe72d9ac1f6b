//! A small synchronous wrapper over rtnetlink for the lab: everything the lab does to links,
//! addresses, routes, rules, neighbours and FDB entries goes through here, as netlink
//! requests (no `ip`, no `bridge`).
//!
//! A netlink socket is bound to the network namespace of the thread that created it, so an
//! [`Nl`] is made on a thread that has entered the namespace it should act on: use [`in_ns`],
//! which runs a closure on a [`crate::netns::run_in`] thread with a fresh connection. Every
//! request is driven to completion on a current-thread tokio runtime owned by the [`Nl`].
use std::{
    fs::{self, File},
    future::Future,
    io::ErrorKind,
    net::{IpAddr, Ipv4Addr},
    os::fd::AsRawFd,
    path::Path,
};

use anyhow::{anyhow, bail, Context as _, Result};
use futures::TryStreamExt;
use rtnetlink::{
    packet_route::{
        address::AddressAttribute,
        link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkInfo, LinkMessage},
        neighbour::{NeighbourFlags, NeighbourState},
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteScope},
        rule::RuleAction,
    },
    Handle, LinkBridge, LinkBridgePort, LinkUnspec, LinkVeth, LinkVxlan, RouteMessageBuilder,
};

/// A MAC address.
pub type Mac = [u8; 6];

pub use crate::topology::snapshot::mac_string;

/// What the lab needs to know about a link in one namespace.
#[derive(Debug, Clone)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `veth`, `bridge`, `vxlan`, … (`IFLA_INFO_KIND`); empty for a device without one (`lo`).
    pub kind: String,
    pub mac: Vec<u8>,
    pub mtu: u32,
    /// Index of the bridge this link is enslaved to.
    pub master: Option<u32>,
}

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
            table: MAIN_TABLE,
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
            table: MAIN_TABLE,
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

/// The main routing table.
pub const MAIN_TABLE: u32 = 254;

/// A netlink connection in the namespace of the thread that made it.
pub struct Nl {
    rt: tokio::runtime::Runtime,
    handle: Handle,
}

/// Runs `f` with a netlink connection inside the namespace at `ns`.
pub fn in_ns<T: Send>(ns: &Path, f: impl FnOnce(&Nl) -> Result<T> + Send) -> Result<T> {
    crate::netns::run_in(Some(ns), || {
        let nl = Nl::new()?;
        f(&nl)
    })
    .with_context(|| format!("in network namespace {}", ns.display()))
}

/// The errno a failed netlink request carried, if any.
fn errno_of(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

impl Nl {
    /// Opens a connection in the calling thread's network namespace.
    pub fn new() -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building a tokio runtime for netlink")?;
        let handle = rt.block_on(async {
            let (conn, handle, _) =
                rtnetlink::new_connection().context("opening a netlink socket")?;
            tokio::spawn(conn);
            anyhow::Ok(handle)
        })?;
        Ok(Self { rt, handle })
    }

    fn block<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    // ---- links ----------------------------------------------------------------------------

    /// Every link in the namespace.
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

    pub fn index(&self, name: &str) -> Result<u32> {
        Ok(self.link(name)?.index)
    }

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

    /// IPv4 addresses as `(link index, address, prefix length)`.
    pub fn addrs(&self) -> Result<Vec<(u32, Ipv4Addr, u8)>> {
        let msgs: Vec<_> = self
            .block(self.handle.address().get().execute().try_collect())
            .context("listing addresses")?;
        let mut out = Vec::new();
        for m in msgs {
            let local = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            });
            let addr = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            });
            if let Some(ip) = local.or(addr) {
                out.push((m.header.index, ip, m.header.prefix_len));
            }
        }
        Ok(out)
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

fn link_of(m: &LinkMessage) -> Link {
    let mut link = Link {
        index: m.header.index,
        name: String::new(),
        kind: String::new(),
        mac: Vec::new(),
        mtu: 0,
        master: None,
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Address(mac) => link.mac = mac.clone(),
            LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
            LinkAttribute::Controller(c) if *c != 0 => link.master = Some(*c),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        link.kind = match k {
                            InfoKind::Other(s) => s.clone(),
                            k => k.to_string(),
                        };
                    }
                }
            }
            _ => {}
        }
    }
    link
}

/// Writes a sysctl under /proc/sys (`key` as a path, e.g. `net/ipv4/ip_forward`; interface
/// names may contain dots, so no dotted form) and reads it back.
///
/// /proc/sys/net shows the network namespace of the thread that opens the file, so call this
/// on the thread that entered the namespace (inside [`in_ns`] or
/// [`crate::netns::run_in`]).
pub fn sysctl(key: &str, value: &str) -> Result<()> {
    let path = Path::new("/proc/sys").join(key);
    fs::write(&path, value).with_context(|| format!("writing {value} to {}", path.display()))?;
    let back = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    if back.trim() != value {
        bail!(
            "{} reads {:?} after writing {value:?}",
            path.display(),
            back.trim()
        );
    }
    Ok(())
}

/// Reads a sysctl (see [`sysctl`] about namespaces).
pub fn sysctl_get(key: &str) -> Result<String> {
    let path = Path::new("/proc/sys").join(key);
    match fs::read_to_string(&path) {
        Ok(s) => Ok(s.trim().to_owned()),
        Err(e) if e.kind() == ErrorKind::NotFound => Err(anyhow!("no sysctl {}", path.display())),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Random bytes from the kernel.
pub fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut buf = [0u8; N];
    let mut filled = 0;
    while filled < N {
        // SAFETY: writes at most N - filled bytes into buf[filled..].
        let n = unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), N - filled, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("getrandom");
        }
        filled += n as usize;
    }
    Ok(buf)
}

/// `len` random lowercase hex digits.
pub fn random_hex(len: usize) -> Result<String> {
    let bytes = random_bytes::<16>()?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    if len > hex.len() {
        bail!("random_hex: at most {} digits", hex.len());
    }
    Ok(hex[..len].to_owned())
}
