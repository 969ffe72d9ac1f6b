//! A network namespace's state as netlink reports it, in plain types: links, addresses,
//! routes (every table), policy rules, neighbours and VXLAN FDB entries. The resolution logic
//! works on these, so it is unit-tested without a kernel.
use std::net::Ipv4Addr;

/// A MAC address.
pub type Mac = [u8; 6];

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_string(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub const TABLE_LOCAL: u32 = 255;
pub const TABLE_MAIN: u32 = 254;
pub const TABLE_DEFAULT: u32 = 253;

/// A table's name as `ip` prints it.
pub fn table_name(table: u32) -> String {
    match table {
        TABLE_LOCAL => "local".into(),
        TABLE_MAIN => "main".into(),
        TABLE_DEFAULT => "default".into(),
        n => n.to_string(),
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VxlanInfo {
    pub vni: Option<u32>,
    pub local: Option<Ipv4Addr>,
    pub port: Option<u16>,
    /// The underlay device (IFLA_VXLAN_LINK).
    pub dev: Option<u32>,
    pub learning: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `veth`, `bridge`, `vxlan`, … (IFLA_INFO_KIND); empty when the kernel gives none.
    pub kind: String,
    pub mac: Option<Mac>,
    pub mtu: u32,
    /// IFLA_MASTER: the bridge this link is a port of.
    pub master: Option<u32>,
    /// IFLA_LINK: for a veth, the peer's ifindex (in the peer's namespace).
    pub link: Option<u32>,
    /// IFLA_LINK_NETNSID: the peer's namespace, as an id local to this namespace.
    pub link_netnsid: Option<i32>,
    pub up: bool,
    pub vxlan: Option<VxlanInfo>,
}

impl Link {
    /// The MAC address; all zeros for a device without one (`lo`).
    pub fn mac_or_zero(&self) -> Mac {
        self.mac.unwrap_or_default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Addr {
    pub index: u32,
    pub ip: Ipv4Addr,
    pub prefix: u8,
}

/// `rtm_type` values podtrace distinguishes.
pub const RTN_UNICAST: u8 = 1;
pub const RTN_LOCAL: u8 = 2;
pub const RTN_BROADCAST: u8 = 3;
pub const RTN_BLACKHOLE: u8 = 6;
pub const RTN_UNREACHABLE: u8 = 7;
pub const RTN_PROHIBIT: u8 = 8;
pub const RTN_THROW: u8 = 9;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Route {
    pub table: u32,
    pub dst: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    pub prefsrc: Option<Ipv4Addr>,
    pub metric: u32,
    pub kind: u8,
    /// `scope link` (253) and friends.
    pub scope: u8,
    pub onlink: bool,
}

impl Route {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        prefix_contains(self.dst, self.prefix, ip)
    }
}

pub fn prefix_contains(net: Ipv4Addr, prefix: u8, ip: Ipv4Addr) -> bool {
    if prefix == 0 {
        return true;
    }
    let mask = u32::MAX << (32 - prefix.min(32) as u32);
    u32::from(net) & mask == u32::from(ip) & mask
}

/// FIB rule actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RuleAction {
    Lookup(u32),
    Goto(u32),
    Nop,
    Blackhole,
    Unreachable,
    Prohibit,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rule {
    pub priority: u32,
    pub src: Option<(Ipv4Addr, u8)>,
    pub dst: Option<(Ipv4Addr, u8)>,
    pub iif: Option<String>,
    pub oif: Option<String>,
    pub fwmark: Option<(u32, u32)>,
    pub tos: u8,
    pub invert: bool,
    pub action: RuleAction,
}

impl Rule {
    /// The selector as `ip rule` prints it (`from 10.19.0.32`, `from all to 10.19.0.32`).
    pub fn selector(&self) -> String {
        let mut s = match self.src {
            Some((ip, 32)) => format!("from {ip}"),
            Some((ip, len)) => format!("from {ip}/{len}"),
            None => "from all".to_owned(),
        };
        if let Some((ip, len)) = self.dst {
            s += &if len == 32 {
                format!(" to {ip}")
            } else {
                format!(" to {ip}/{len}")
            };
        }
        if let Some(iif) = &self.iif {
            s += &format!(" iif {iif}");
        }
        if let Some(oif) = &self.oif {
            s += &format!(" oif {oif}");
        }
        if let Some((mark, mask)) = self.fwmark {
            s += &format!(" fwmark {mark:#x}/{mask:#x}");
        }
        if self.invert {
            s = format!("not {s}");
        }
        s
    }

    pub fn action_string(&self) -> String {
        match self.action {
            RuleAction::Lookup(t) => format!("lookup {}", table_name(t)),
            RuleAction::Goto(p) => format!("goto {p}"),
            RuleAction::Nop => "nop".into(),
            RuleAction::Blackhole => "blackhole".into(),
            RuleAction::Unreachable => "unreachable".into(),
            RuleAction::Prohibit => "prohibit".into(),
            RuleAction::Other => "?".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Neigh {
    pub index: u32,
    pub ip: Ipv4Addr,
    pub mac: Option<Mac>,
    /// NUD_* bits (0x80 = permanent).
    pub state: u16,
}

/// A bridge/VXLAN forwarding entry (AF_BRIDGE neighbour).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Fdb {
    pub index: u32,
    pub mac: Mac,
    /// For VXLAN: the remote VTEP (NDA_DST).
    pub dst: Option<Ipv4Addr>,
    pub master: Option<u32>,
}

/// Everything podtrace reads from one namespace.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    pub links: Vec<Link>,
    pub addrs: Vec<Addr>,
    pub routes: Vec<Route>,
    pub rules: Vec<Rule>,
    pub neighs: Vec<Neigh>,
    pub fdb: Vec<Fdb>,
}

impl Snapshot {
    pub fn link(&self, index: u32) -> Option<&Link> {
        self.links.iter().find(|l| l.index == index)
    }

    pub fn link_by_name(&self, name: &str) -> Option<&Link> {
        self.links.iter().find(|l| l.name == name)
    }

    pub fn name_of(&self, index: u32) -> String {
        self.link(index)
            .map(|l| l.name.clone())
            .unwrap_or_else(|| format!("if{index}"))
    }

    pub fn addrs_of(&self, index: u32) -> impl Iterator<Item = &Addr> {
        self.addrs.iter().filter(move |a| a.index == index)
    }

    /// Ports of a bridge.
    pub fn ports_of(&self, bridge: u32) -> impl Iterator<Item = &Link> {
        self.links.iter().filter(move |l| l.master == Some(bridge))
    }

    /// Which link holds `ip` as an address.
    pub fn owner_of(&self, ip: Ipv4Addr) -> Option<&Link> {
        let a = self.addrs.iter().find(|a| a.ip == ip)?;
        self.link(a.index)
    }

    /// Longest-prefix match in one table (routes of kind throw/unreachable count too: they
    /// stop or redirect the lookup as in the kernel).
    pub fn lookup(&self, table: u32, dst: Ipv4Addr) -> Option<&Route> {
        self.routes
            .iter()
            .filter(|r| r.table == table && r.contains(dst) && r.kind != RTN_BROADCAST)
            .max_by(|a, b| a.prefix.cmp(&b.prefix).then(b.metric.cmp(&a.metric)))
    }
}
