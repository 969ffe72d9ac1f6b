//! The translated forms of the traced conversation (`NAT_FLOWS`): what the packet filter
//! matches besides the pod ↔ peer addresses when the path rewrites them (a Service's DNAT to
//! its backends, a node's masquerade). Userspace fills it before traffic flows (from the
//! Service model) and while it flows (from conntrack), through a [`NatFlows`] handle any
//! thread can hold.
use std::{net::Ipv4Addr, os::fd::AsFd as _};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::maps::{HashMap as BpfHashMap, MapData};
use podtrace_abi::NatKey;

use super::Probes;

/// One translated form: packets from `a` to `b`:`port` and back (`port` `None`: any port,
/// and ICMP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct NatFlow {
    pub a: Ipv4Addr,
    pub b: Ipv4Addr,
    pub port: Option<u16>,
    /// IP protocol number.
    pub proto: u8,
}

impl NatFlow {
    pub fn key(&self) -> NatKey {
        NatKey {
            addr_a: u32::from_ne_bytes(self.a.octets()),
            addr_b: u32::from_ne_bytes(self.b.octets()),
            port_b: self.port.unwrap_or(0),
            proto: self.proto,
            _pad: 0,
        }
    }
}

impl std::fmt::Display for NatFlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.port {
            Some(p) => write!(f, "{} ↔ {}:{p}/{}", self.a, self.b, self.proto),
            None => write!(f, "{} ↔ {}/{}", self.a, self.b, self.proto),
        }
    }
}

/// Writes `NAT_FLOWS` while the programs run.
pub struct NatFlows {
    map: BpfHashMap<MapData, NatKey, u8>,
    len: usize,
}

impl NatFlows {
    /// Adds a translated form (once; a full map is an error naming the limit).
    pub fn insert(&mut self, flow: &NatFlow) -> Result<bool> {
        let key = flow.key();
        if self.map.get(&key, 0).is_ok() {
            return Ok(false);
        }
        if self.len >= podtrace_abi::MAX_NAT_FLOWS as usize {
            bail!(
                "{} translated flows traced already (the kernel filter's limit)",
                self.len
            );
        }
        self.map
            .insert(key, 1, 0)
            .with_context(|| format!("adding {flow} to the kernel filter"))?;
        self.len += 1;
        Ok(true)
    }
}

impl Probes {
    /// A handle on `NAT_FLOWS` another thread can write while the probes stay here.
    pub fn nat_flows(&self) -> Result<NatFlows> {
        let fd = match self.map("NAT_FLOWS")? {
            aya::maps::Map::HashMap(m) => m.fd().as_fd().try_clone_to_owned(),
            _ => bail!("eBPF map NAT_FLOWS is not a hash map"),
        }
        .context("duplicating the NAT_FLOWS map's fd")?;
        let data = MapData::from_fd(fd).context("opening the NAT_FLOWS map")?;
        let map = BpfHashMap::try_from(aya::maps::Map::HashMap(data))
            .map_err(|e| anyhow!("NAT_FLOWS: {e}"))?;
        let len = map.keys().count();
        Ok(NatFlows { map, len })
    }
}
