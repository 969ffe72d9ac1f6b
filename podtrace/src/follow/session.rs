//! A tracing session: the probes attached on every hop of a plan plus the kernel hooks, and the
//! decoding of their events into [`Observation`]s with human names. `follow`, `capture` and
//! `verify` all run one.
use std::{
    collections::HashMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use podtrace_abi::{Event, KIND_DROP, KIND_FIB, KIND_TC, KIND_XMIT};

use super::{
    correlate::{Observation, Seen},
    plan::{Hook, Plan},
};
use crate::{
    probes::{hooks::HookReport, read_event, FilterSpec, HopTarget, Probes},
    topology::{read, Topology},
};

/// Names for what the kernel reports by number: namespaces by inode number, interfaces by
/// (namespace, ifindex).
#[derive(Debug, Default, Clone)]
pub struct NameBook {
    owners: HashMap<u64, String>,
    ifnames: HashMap<(u64, u32), String>,
}

impl NameBook {
    pub fn owner(&self, cookie: u64) -> String {
        self.owners
            .get(&cookie)
            .cloned()
            .unwrap_or_else(|| format!("netns#{cookie}"))
    }

    /// `OWNER/IFNAME`.
    /// Whether the namespace is one of the session's (the same addresses can exist in other
    /// namespaces: a second lab, a test's own pair).
    pub fn knows(&self, cookie: u64) -> bool {
        self.owners.contains_key(&cookie)
    }

    pub fn interface(&self, cookie: u64, ifindex: u32) -> String {
        let ifname = self
            .ifnames
            .get(&(cookie, ifindex))
            .cloned()
            .unwrap_or_else(|| format!("if{ifindex}"));
        format!("{}/{ifname}", self.owner(cookie))
    }
}

/// Timings of the start-up, for the benchmark.
#[derive(Debug, Default, Clone, Copy)]
pub struct StartTimes {
    pub load_ms: f64,
    pub attach_ms: f64,
}

pub struct Session {
    pub probes: Probes,
    pub plan: Plan,
    pub names: NameBook,
    pub hooks: Vec<HookReport>,
    /// Taken by the event loop while it runs.
    pub ring: Option<RingBuf<MapData>>,
    pub times: StartTimes,
}

/// The options a session is started with.
#[derive(Debug, Clone, Default)]
pub struct SessionOptions {
    pub proto: Option<u8>,
    pub port: Option<u16>,
    /// Capture packet bytes (snap length).
    pub snaplen: Option<u32>,
    /// Kernel-side evidence to attach (`None`: all of it).
    pub evidence: Option<Vec<crate::probes::hooks::Evidence>>,
    /// `--hooks`: use only this mechanism for the kernel-side evidence.
    pub hooks: Option<crate::probes::hooks::Mechanism>,
}

impl Session {
    /// Loads the programs, sets the filter pod ↔ `peer`, attaches the hop probes on every hop
    /// of `plan` and the kernel hooks.
    pub fn start(
        plan: Plan,
        pod_ip: Ipv4Addr,
        peer: Option<Ipv4Addr>,
        opts: &SessionOptions,
    ) -> Result<Self> {
        let t0 = Instant::now();
        let mut probes = match opts.snaplen {
            Some(_) => Probes::load_with_ring(crate::probes::CAPTURE_RING_BYTES)?,
            None => Probes::load()?,
        };
        let load_ms = t0.elapsed().as_secs_f64() * 1e3;
        let t1 = Instant::now();
        probes.set_filter(FilterSpec {
            a: Some(pod_ip),
            b: peer,
            proto: opts.proto,
            port: opts.port,
            emit: true,
            snaplen: opts.snaplen,
            ..FilterSpec::default()
        })?;
        let mut names = NameBook::default();
        let mut seen_ns: HashMap<String, u64> = HashMap::new();
        for hop in &plan.hops {
            probes
                .attach_hop(&HopTarget {
                    netns: hop.netns_path.clone(),
                    ifname: hop.ifname.clone(),
                    hop_id: hop.id,
                })
                .with_context(|| format!("attaching to {}", hop.name))?;
            if !seen_ns.contains_key(&hop.netns) {
                let cookie = crate::probes::netns_id(hop.netns_path.as_deref())?;
                seen_ns.insert(hop.netns.clone(), cookie);
                names.owners.insert(cookie, hop.owner.clone());
                let links = read::in_netns(hop.netns_path.as_deref(), |h| async move {
                    Ok(read::snapshot(&h).await?.links)
                })?;
                for l in links {
                    names.ifnames.insert((cookie, l.index), l.name);
                }
            }
        }
        let wanted = opts
            .evidence
            .clone()
            .unwrap_or_else(|| crate::probes::hooks::Evidence::ALL.to_vec());
        let hooks = probes.attach_kernel_hooks(opts.hooks, &wanted)?;
        let ring = probes.take_events()?;
        let attach_ms = t1.elapsed().as_secs_f64() * 1e3;
        Ok(Self {
            probes,
            plan,
            names,
            hooks,
            ring: Some(ring),
            times: StartTimes { load_ms, attach_ms },
        })
    }

    /// The namespaces whose disappearance ends the run (the pod's).
    pub fn hooks_line(&self) -> String {
        let tc = match self.probes.tc_mode() {
            Some(crate::probes::TcMode::Tcx) => "tc via tcx",
            Some(crate::probes::TcMode::Clsact) => "tc via clsact",
            None => "tc: none",
        };
        std::iter::once(tc.to_owned())
            .chain(self.hooks.iter().map(HookReport::summary))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// How the hop probes are attached, for the JSON ready line (`tcx` or `clsact`).
    pub fn tc_mode(&self) -> Option<crate::probes::TcMode> {
        self.probes.tc_mode()
    }

    /// Decodes one ring buffer record: the observation and, in capture mode, the packet bytes.
    pub fn decode<'a>(&self, bytes: &'a [u8]) -> Option<(Event, Observation, &'a [u8])> {
        let ev = read_event(bytes)?;
        let data_start = std::mem::size_of::<Event>();
        let data = bytes
            .get(data_start..data_start + ev.cap_len as usize)
            .unwrap_or_default();
        let hop =
            (ev.hop_id != u32::MAX && self.plan.hop(ev.hop_id).is_some()).then_some(ev.hop_id);
        // Kernel-wide probes see every namespace: keep what happened in the session's.
        if ev.kind != KIND_TC && !self.names.knows(ev.netns_ino) {
            return None;
        }
        let location = self.names.interface(ev.netns_ino, ev.ifindex);
        let seen = match ev.kind {
            KIND_TC => Seen::Tc {
                hop: hop?,
                hook: if ev.dir == podtrace_abi::DIR_INGRESS {
                    Hook::Ingress
                } else {
                    Hook::Egress
                },
            },
            KIND_DROP => Seen::Drop {
                hop,
                location: if ev.ifindex == 0 {
                    self.names.owner(ev.netns_ino)
                } else {
                    location
                },
                netns_cookie: ev.netns_ino,
                reason: self.probes.drop_reasons().name(ev.reason),
            },
            KIND_FIB => Seen::Fib {
                location: self.names.owner(ev.netns_ino),
                table: ev.aux,
                oif: if ev.aux2 == 0 {
                    "-".into()
                } else {
                    self.names
                        .interface(ev.netns_ino, ev.aux2)
                        .rsplit('/')
                        .next()
                        .unwrap_or_default()
                        .to_owned()
                },
                gateway: (ev.aux3 != 0).then(|| Ipv4Addr::from(ev.aux3.to_ne_bytes()).to_string()),
                err: ev.reason as i32,
            },
            KIND_XMIT => Seen::Xmit { hop, location },
            _ => return None,
        };
        Some((
            ev,
            Observation {
                ts_ns: ev.ts_ns,
                flow: ev.flow,
                skb_len: ev.skb_len,
                seen,
            },
            data,
        ))
    }
}

/// The monotonic clock the eBPF programs stamp events with.
pub fn monotonic_ns() -> u64 {
    let ts =
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// Whether the namespace file a run depends on is still there.
pub fn netns_alive(path: &Path) -> bool {
    path.exists()
}

/// The uplinks of every node on the plan's path (interfaces with an IPv4 address that are not
/// bridges or loopback) and its VXLAN devices: where a pod's traffic can leave the node.
pub fn node_uplinks(topo: &Topology) -> Result<Vec<crate::topology::Hop>> {
    let mut out = Vec::new();
    let mut done: Vec<String> = Vec::new();
    for h in topo.hops.iter().filter(|h| h.owner == h.node) {
        if done.contains(&h.netns) {
            continue;
        }
        done.push(h.netns.clone());
        let ns: Option<PathBuf> = h.netns_path.clone();
        let snap = read::in_netns(ns.as_deref(), |hd| async move { read::snapshot(&hd).await })?;
        for l in &snap.links {
            if l.name == "lo" || l.kind == "bridge" {
                continue;
            }
            if l.kind != "vxlan" && snap.addrs_of(l.index).next().is_none() {
                continue;
            }
            let mut hop = h.clone();
            hop.role = if l.kind == "vxlan" { "vxlan" } else { "uplink" }.into();
            hop.name = format!("{}/{}", h.node, l.name);
            hop.ifname = l.name.clone();
            hop.ifindex = l.index;
            hop.mac = l
                .mac
                .as_ref()
                .map(|m| crate::topology::snapshot::mac_string(m));
            hop.mtu = l.mtu;
            hop.master = None;
            hop.kind = l.kind.clone();
            hop.addresses = snap
                .addrs_of(l.index)
                .map(|a| format!("{}/{}", a.ip, a.prefix))
                .collect();
            hop.vni = None;
            hop.vtep = None;
            hop.port = None;
            hop.uplink = Some(
                if Some(&l.name) == topo.primary.as_ref() && h.node == topo.pod.node {
                    "primary".into()
                } else {
                    "other".into()
                },
            );
            out.push(hop);
        }
    }
    Ok(out)
}
