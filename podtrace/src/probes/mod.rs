//! podtrace's eBPF programs from userspace: load the embedded object, configure its filter,
//! attach the tc hop probes on interfaces in any namespace and the kernel tracing probes, and
//! read what they counted and emitted.
//!
//! Attachment rules: tc programs go through TCX links (kernel ≥ 6.6) placed first in the
//! chain, so a CNI's own programs keep running after ours; older kernels (or
//! `PODTRACE_TC=clsact`) get a clsact filter that runs first too ([`clsact`] has the rules). Both are detached when [`Probes`] is
//! dropped (TCX links die with their fd, even on SIGKILL; clsact filters are removed
//! explicitly inside their namespace, by the owner's guard process when it was killed, or by
//! a later run when both were).
//!
//! Kernel floor: 5.8 (the BPF ring buffer), with BTF (`/sys/kernel/btf/vmlinux`,
//! CONFIG_DEBUG_INFO_BTF: tp_btf programs and the structure offsets the tracing programs
//! read). [`Probes::load`] checks both first and says in one line what is missing.
pub mod btf;
pub mod clsact;
pub mod hooks;
pub mod idle;
pub mod nat;
pub mod rcu;

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, ProgramArray, RingBuf},
    programs::{
        links::{Link as _, LinkOrder},
        tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcAttachType},
        BtfTracePoint, KProbe, SchedClassifier,
    },
    util::KernelVersion,
    Ebpf, EbpfLoader,
};
use podtrace_abi::{
    Event, Filter, HopKey, KernelOffsets, CNT_SLOTS, DEFAULT_VXLAN_PORT, DIR_EGRESS, DIR_INGRESS,
    FILTER_CAPTURE, FILTER_EMIT, FILTER_ENABLED, MAX_SNAPLEN, REASON_UNREPORTED,
};

use crate::netns;

/// The eBPF object built by build.rs from ../podtrace-ebpf.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/podtrace-ebpf"));

/// The event ring buffer when only packet headers travel (4 MiB).
pub const DEFAULT_RING_BYTES: u32 = 4 << 20;
/// The event ring buffer for capture sessions whose records carry whole packets (8 MiB: 128
/// records of a 64 KiB GSO packet, thousands of MTU-sized ones). Under sustained overload
/// its size does not change the loss (the reader's pace does: 16 and 32 MiB lost as much in
/// `cargo xtask bench`), and it costs twice its size in resident memory (the kernel maps its
/// pages twice). Headers only (`-s` ≤ 2048) use [`DEFAULT_RING_BYTES`].
pub const CAPTURE_RING_BYTES: u32 = 8 << 20;

/// The event ring buffer for a session that captures `snaplen` bytes of each packet (`None`:
/// no packet bytes).
pub fn ring_bytes(snaplen: Option<u32>) -> u32 {
    match snaplen {
        Some(s) if s == 0 || s > 2048 => CAPTURE_RING_BYTES,
        _ => DEFAULT_RING_BYTES,
    }
}

/// The kernel's monotonic clock, `bpf_ktime_get_ns`'s: the probes' timestamps.
pub fn monotonic_ns() -> u64 {
    let ts =
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// The oldest kernel podtrace runs on: the BPF ring buffer came in 5.8.
pub const MIN_KERNEL: (u32, u32) = (5, 8);

/// How a tc hop probe is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TcMode {
    /// A TCX link (kernel ≥ 6.6), first in the interface's chain.
    Tcx,
    /// A clsact qdisc filter through netlink (older kernels).
    Clsact,
}

impl TcMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TcMode::Tcx => "tcx",
            TcMode::Clsact => "clsact",
        }
    }
}

/// Whether this kernel has TCX (6.6).
pub fn tcx_supported() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

/// The mechanism a session uses unless a hook says otherwise (see [`choose_tc_mode`]).
pub fn tc_mode() -> TcMode {
    choose_tc_mode(&[]).unwrap_or(TcMode::Clsact)
}

/// How a session's hop probes are attached: TCX links on a kernel with TCX (6.6), placed
/// first in each interface's chain, else clsact filters. `PODTRACE_TC=tcx` or `clsact`
/// chooses.
///
/// TCX because the kernel runs its programs without the classifier layer: 20 do-nothing
/// clsact filters (a 10-hop path) cost ~6 % of the lab's throughput on the bench machine,
/// 20 do-nothing TCX links nothing measurable. And a killed podtrace's links go with its
/// files. But each link waits for an RCU grace period under the RTNL lock, made and closed:
/// quick only with the grace periods expedited ([`rcu`]). Where podtrace cannot ask for
/// that (a read-only `/sys`), clsact filters, quick to place, unless a hook already runs
/// TCX programs (Cilium ≥ 1.15 attaches there): the kernel runs TCX programs before any
/// clsact filter, and one of them may redirect or drop the packet, so podtrace goes first
/// in that chain too. A clsact filter outlives a killed owner: the guard process removes
/// it ([`clsact`]). Creating or deleting the clsact qdisc changes nothing else a packet
/// sees (a NAT test once suggested otherwise: it raced the kernel's link-watch, see
/// `a_backend_that_refuses_and_backends_that_are_down`).
pub fn choose_tc_mode(targets: &[HopTarget]) -> Result<TcMode> {
    match std::env::var("PODTRACE_TC").as_deref() {
        Ok("tcx") if !tcx_supported() => {
            bail!("PODTRACE_TC=tcx: this kernel has no TCX (6.6 or newer)")
        }
        Ok("tcx") => return Ok(TcMode::Tcx),
        Ok("clsact") => return Ok(TcMode::Clsact),
        Ok(other) => bail!("PODTRACE_TC={other}: use tcx or clsact"),
        Err(_) if !tcx_supported() => return Ok(TcMode::Clsact),
        Err(_) if rcu::can_expedite() => return Ok(TcMode::Tcx),
        Err(_) => {}
    }
    let mut namespaces: Vec<Option<&Path>> = Vec::new();
    for t in targets {
        if !namespaces.contains(&t.netns.as_deref()) {
            namespaces.push(t.netns.as_deref());
        }
    }
    for ns in namespaces {
        let names: Vec<&str> = targets
            .iter()
            .filter(|t| t.netns.as_deref() == ns)
            .map(|t| t.ifname.as_str())
            .collect();
        let busy = netns::run_in(ns, || {
            Ok(names.iter().any(|n| {
                [TcAttachType::Ingress, TcAttachType::Egress]
                    .into_iter()
                    .any(|t| SchedClassifier::query_tcx(n, t).is_ok_and(|(_, p)| !p.is_empty()))
            }))
        })?;
        if busy {
            return Ok(TcMode::Tcx);
        }
    }
    Ok(TcMode::Clsact)
}

/// An interface to put hop probes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HopTarget {
    /// The interface's namespace; `None` for the caller's own.
    pub netns: Option<PathBuf>,
    pub ifname: String,
    /// The id events and counters carry for this hop (< `podtrace_abi::MAX_HOPS`).
    pub hop_id: u32,
}

/// Packets a hop's probes matched, per direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HopCounts {
    pub ingress: u64,
    pub egress: u64,
}

/// Global counters (`CNT_*` in podtrace-abi), cumulative.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    /// Packets the hop probes looked at.
    pub tc_seen: u64,
    /// Packets of the traced conversation the hop probes saw.
    pub tc_matched: u64,
    pub drops_matched: u64,
    pub fib_matched: u64,
    pub xmit_matched: u64,
    /// Events that found the ring buffer full.
    pub lost: u64,
    /// Packets cut to their first `CUT_BYTES` because their whole record found the ring
    /// buffer full (captures that cut on overload): in the files, as headers.
    #[serde(default)]
    pub cut: u64,
}

/// What to trace, in userspace terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilterSpec {
    pub a: Option<Ipv4Addr>,
    pub b: Option<Ipv4Addr>,
    pub proto: Option<u8>,
    pub port: Option<u16>,
    /// Emit an event per matched packet (otherwise only count).
    pub emit: bool,
    pub vxlan_port: u16,
    /// More VXLAN ports (0: unused).
    pub vxlan_more: [u16; podtrace_abi::MAX_VXLAN_PORTS - 1],
    /// Also trace the translated forms of the conversation in `NAT_FLOWS` ([`nat`]).
    pub nat: bool,
    /// Capture mode: tc events carry up to this many packet bytes.
    pub snaplen: Option<u32>,
    /// Capture mode: a packet whose record finds no room in the ring buffer is cut to its
    /// first `CUT_BYTES` rather than lost (`FILTER_CUT`).
    pub cut: bool,
    /// Wake the reader once this many bytes wait in the ring buffer (0: at every event).
    pub wake_bytes: u32,
    /// A capture expression's necessary conditions, checked in the kernel.
    pub expression: KernelExpr,
}

/// What of a capture expression the kernel checks: the packet's protocol is one of
/// `protos`, an address is in one of `nets`, a port is one of `ports` (an empty list: no
/// condition). Built from the expression's `PreFilter`; a list longer than the kernel holds
/// is left to userspace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KernelExpr {
    pub nprotos: u8,
    pub protos: [u8; podtrace_abi::MAX_X_PROTOS],
    pub nnets: u8,
    /// (address, mask), host order.
    pub nets: [(u32, u32); podtrace_abi::MAX_X_NETS],
    pub nports: u8,
    pub ports: [u16; podtrace_abi::MAX_X_PORTS],
}

impl KernelExpr {
    /// From an expression's necessary conditions; each list the kernel cannot hold whole is
    /// dropped (no condition on it in the kernel).
    pub fn new(protos: &[u8], nets: &[(Ipv4Addr, u32)], ports: &[u16]) -> Self {
        let mut k = KernelExpr::default();
        let nets: Vec<(u32, u32)> = nets
            .iter()
            .map(|(addr, mask)| (u32::from(*addr) & mask, *mask))
            .collect();
        if !protos.is_empty() && protos.len() <= k.protos.len() {
            k.protos[..protos.len()].copy_from_slice(protos);
            k.nprotos = protos.len() as u8;
        }
        if !nets.is_empty() && nets.len() <= k.nets.len() {
            k.nets[..nets.len()].copy_from_slice(&nets);
            k.nnets = nets.len() as u8;
        }
        if !ports.is_empty() && ports.len() <= k.ports.len() {
            k.ports[..ports.len()].copy_from_slice(ports);
            k.nports = ports.len() as u8;
        }
        k
    }

    /// Whether the kernel checks anything.
    pub fn is_empty(&self) -> bool {
        self.nprotos == 0 && self.nnets == 0 && self.nports == 0
    }
}

impl Default for FilterSpec {
    fn default() -> Self {
        Self {
            a: None,
            b: None,
            proto: None,
            port: None,
            emit: true,
            vxlan_port: DEFAULT_VXLAN_PORT,
            vxlan_more: [0; podtrace_abi::MAX_VXLAN_PORTS - 1],
            nat: false,
            snaplen: None,
            cut: false,
            wake_bytes: 0,
            expression: KernelExpr::default(),
        }
    }
}

impl FilterSpec {
    fn to_abi(self) -> Filter {
        let addr = |a: Option<Ipv4Addr>| a.map(|a| u32::from_ne_bytes(a.octets())).unwrap_or(0);
        Filter {
            addr_a: addr(self.a),
            addr_b: addr(self.b),
            port: self.port.unwrap_or(0),
            proto: self.proto.unwrap_or(0),
            flags: FILTER_ENABLED
                | if self.emit { FILTER_EMIT } else { 0 }
                | if self.snaplen.is_some() {
                    FILTER_CAPTURE
                } else {
                    0
                }
                | if self.nat {
                    podtrace_abi::FILTER_NAT
                } else {
                    0
                }
                | if self.cut && self.snaplen.is_some() {
                    podtrace_abi::FILTER_CUT
                } else {
                    0
                },
            vxlan_port: self.vxlan_port,
            _pad: 0,
            snaplen: self.snaplen.unwrap_or(0).min(MAX_SNAPLEN),
            vxlan_more: self.vxlan_more,
            _pad2: 0,
            wake_bytes: self.wake_bytes,
            x_nprotos: self.expression.nprotos,
            x_nnets: self.expression.nnets,
            x_nports: self.expression.nports,
            _pad3: 0,
            x_protos: self.expression.protos,
            x_nets: self.expression.nets.map(|(addr, mask)| podtrace_abi::XNet {
                // Network order, as the packet's addresses are read.
                addr: (addr & mask).to_be(),
                mask: mask.to_be(),
            }),
            x_ports: self.expression.ports,
        }
    }
}

/// What a drop's reason is called when the kernel reports none (before 5.17).
pub const UNREPORTED: &str = "unreported";

/// Names of the kernel's drop reasons (`enum skb_drop_reason`), read from BTF.
#[derive(Debug, Default, Clone)]
pub struct DropReasons(HashMap<u32, String>);

impl DropReasons {
    pub fn from_btf(btf: &btf::Btf) -> Self {
        let mut map = HashMap::new();
        for (name, value) in btf.enum_values("skb_drop_reason").unwrap_or_default() {
            let short = name
                .strip_prefix("SKB_DROP_REASON_")
                .or_else(|| name.strip_prefix("SKB_"))
                .unwrap_or(&name);
            map.insert(value as u32, short.to_owned());
        }
        map.insert(REASON_UNREPORTED, UNREPORTED.to_owned());
        Self(map)
    }

    /// `NETFILTER_DROP` for the kernel's value of `SKB_DROP_REASON_NETFILTER_DROP`;
    /// [`UNREPORTED`] on a kernel that gives no reason.
    pub fn name(&self, reason: u32) -> String {
        if reason == REASON_UNREPORTED {
            return UNREPORTED.to_owned();
        }
        self.0
            .get(&reason)
            .cloned()
            .unwrap_or_else(|| format!("reason {reason}"))
    }

    /// Every reason: (value, name).
    pub fn all(&self) -> impl Iterator<Item = (u32, &str)> {
        self.0.iter().map(|(v, n)| (*v, n.as_str()))
    }

    /// The kernel's value for a reason name (without the `SKB_DROP_REASON_` prefix).
    pub fn value(&self, name: &str) -> Option<u32> {
        self.0.iter().find(|(_, n)| *n == name).map(|(v, _)| *v)
    }
}

/// The stubs attached to each interface, one copy per namespace (their `NETNS_INO`).
const PROG_INGRESS: &str = "hop_ingress";
const PROG_EGRESS: &str = "hop_egress";

/// The hop program the stubs hand every packet to (loaded once, with the session's
/// `CAPTURE_MODE`), in `HOP_WORK`'s only slot.
const WORK_PROGRAM: &str = "track";

/// The maps every copy of the object shares with the primary one.
const SHARED_MAPS: [&str; 13] = [
    "FILTER",
    "HOPS",
    "HOP_STATS",
    "COUNTERS",
    "OFFSETS",
    "EVENTS",
    "RECENT",
    "HOP_LAST",
    "FIB_STASH",
    "FIB_DEPTH",
    "NAT_FLOWS",
    "HOP_WORK",
    "HOP_HANDOFF",
];

/// Where bpffs is (or gets) mounted; pins live there only while a copy loads.
const BPFFS: &str = "/sys/fs/bpf";

/// The hop stubs for one network namespace: a copy of the object whose `NETNS_INO` is that
/// namespace's, sharing the primary object's maps.
struct NsPrograms {
    netns: Option<PathBuf>,
    ino: u64,
    bpf: Ebpf,
}

struct NlAttachment {
    ns_index: usize,
    link: NsLink,
    owned: clsact::OwnedFilter,
}

/// A clsact filter's link, detached only from inside its namespace: aya would detach a
/// dropped link by interface index and priority in whatever namespace the dropping thread is
/// in, so a link dropped anywhere else is forgotten instead (the filter stays recorded).
struct NsLink(Option<SchedClassifierLink>);

impl NsLink {
    /// Detaches the filter; call inside its namespace.
    fn detach(mut self) -> Result<()> {
        match self.0.take() {
            Some(l) => Ok(l.detach()?),
            None => Ok(()),
        }
    }
}

impl Drop for NsLink {
    fn drop(&mut self) {
        if let Some(l) = self.0.take() {
            std::mem::forget(l);
        }
    }
}

/// Attaches both hop programs of one interface, from a thread inside its namespace. clsact
/// filters are pushed to `attached` as they are placed.
fn attach_one(
    p: &mut NsPrograms,
    mode: TcMode,
    t: &HopTarget,
    ifindex: u32,
    ino: u64,
    attached: &mut Vec<(NsLink, clsact::OwnedFilter)>,
) -> Result<()> {
    let ifname = t.ifname.as_str();
    let qdisc_created = match mode {
        TcMode::Tcx => false,
        TcMode::Clsact => clsact::add_clsact(ifname).with_context(|| where_(t))?,
    };
    for (name, attach_type, ingress) in [
        (PROG_INGRESS, TcAttachType::Ingress, true),
        (PROG_EGRESS, TcAttachType::Egress, false),
    ] {
        let options = match mode {
            TcMode::Tcx => TcAttachOptions::TcxOrder(LinkOrder::first()),
            TcMode::Clsact => {
                // On a qdisc podtrace just added there is nothing to look at.
                let existing = if qdisc_created {
                    Vec::new()
                } else {
                    clsact::list_filters(None, ifindex, ingress)
                        .with_context(|| format!("listing the tc filters of {}", where_(t)))?
                };
                let (priority, warning) = clsact::choose_priority(&existing);
                if let Some(w) = warning {
                    eprintln!("podtrace: {}: {w}", where_(t));
                }
                TcAttachOptions::Netlink(NlOptions {
                    priority,
                    ..NlOptions::default()
                })
            }
        };
        let prog: &mut SchedClassifier = p
            .bpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("eBPF program {name} missing"))?
            .try_into()?;
        let prog_id = prog.info()?.id();
        let id = prog
            .attach_with_options(ifname, attach_type, options)
            .with_context(|| format!("attaching {name} to {}", where_(t)))?;
        if mode == TcMode::Clsact {
            let link = NsLink(Some(prog.take_link(id)?));
            let nl = link.0.as_ref().map(|l| (l.priority(), l.handle()));
            let (priority, handle) = match nl {
                Some((Ok(p), Ok(h))) => (p, u32::from(h)),
                _ => bail!("attached {name} to {} but aya lost its filter", where_(t)),
            };
            attached.push((
                link,
                clsact::OwnedFilter {
                    netns: t.netns.clone(),
                    netns_ino: ino,
                    ifname: ifname.to_owned(),
                    ifindex,
                    ingress,
                    priority,
                    handle,
                    prog_id,
                    program: name.to_owned(),
                    qdisc_created,
                },
            ));
        }
    }
    Ok(())
}

/// The identity podtrace gives a network namespace: its inode number, the `net->ns.inum` the
/// tracing programs read (`None`: podtrace's own namespace).
pub fn netns_id(ns: Option<&Path>) -> Result<u64> {
    netns::inode_of(ns.unwrap_or(Path::new("/proc/self/ns/net")))
}

/// The loaded programs and maps. Dropping it detaches everything.
pub struct Probes {
    /// Owns the maps and the tracing programs.
    bpf: Ebpf,
    /// One copy of the stubs per namespace with hops in it.
    per_ns: Vec<NsPrograms>,
    /// The hop program the stubs hand packets to (loaded with the first namespace's stubs).
    work: Option<Ebpf>,
    reasons: DropReasons,
    nl_links: Vec<NlAttachment>,
    /// The clsact filters this process owns, as recorded under /run/podtrace/tc.
    clsact_state: clsact::State,
    /// How the hop probes were attached (once one was).
    tc_mode: Option<TcMode>,
    hops: Vec<HopTarget>,
    /// The kernel's BTF, parsed once (every copy of the programs and the tp_btf probes
    /// need it; parsing it is ~17 ms), until [`Probes::settle`].
    btf: Option<aya::Btf>,
    /// What the kernel offers for the kernel-side evidence, from the same BTF.
    facts: hooks::KernelFacts,
    /// The kernel-side probes to verify while the hop probes load ([`Probes::prepare_kernel_hooks`]).
    hook_plan: Option<(Option<hooks::Mechanism>, Vec<hooks::Evidence>)>,
    /// The hop programs carry packet bytes and check a capture expression (from the filter
    /// set before the first hop is attached: the copies are loaded with it).
    capture: bool,
    /// Evidence whose tp_btf hooks go while the conversation is idle ([`idle`]).
    idle_detach: Vec<hooks::Evidence>,
    /// Those hooks, attached by podtrace itself, until [`Probes::take_idle_hooks`].
    idle_hooks: Vec<idle::Hook>,
}

/// Makes `EbpfLoader::new()` cheap on the calling thread, which must be a thread of
/// podtrace's own that ends after loading: aya's constructor parses the kernel's BTF
/// (/sys/kernel/btf/vmlinux, ~25 ms and tens of MiB) every time, although podtrace hands each
/// loader the copy it parsed once. The thread gets a mount namespace of its own (its
/// filesystem attributes unshared first, as the kernel requires) in which that file reads as
/// empty, so aya's parse fails at once and is ignored. Nothing outside the thread sees it. If
/// it cannot be done, loading is only slower.
fn cheap_loaders_on_this_thread() {
    use nix::{
        mount::{mount, MsFlags},
        sched::{unshare, CloneFlags},
    };
    let done = unshare(CloneFlags::CLONE_FS | CloneFlags::CLONE_NEWNS).is_ok()
        && mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .is_ok()
        && mount(
            Some("/dev/null"),
            "/sys/kernel/btf/vmlinux",
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .is_ok();
    log::debug!("cheap eBPF loaders on this thread: {done}");
}

/// Loads (verifies) the programs of the first choice for each kind of kernel-side evidence,
/// so that attaching them later is quick. A failure is left for the attach to report.
fn preload_kernel_hooks(
    bpf: &mut Ebpf,
    btf: &aya::Btf,
    facts: &hooks::KernelFacts,
    forced: Option<hooks::Mechanism>,
    wanted: &[hooks::Evidence],
) {
    for evidence in wanted {
        let (variants, _) = hooks::plan(facts, *evidence, forced);
        let Some(v) = variants.first() else { continue };
        for (name, target) in v.programs {
            let Some(prog) = bpf.program_mut(name) else {
                continue;
            };
            let _ = match v.mechanism {
                hooks::Mechanism::TpBtf => <&mut BtfTracePoint>::try_from(prog)
                    .ok()
                    .filter(|p| p.fd().is_err())
                    .map(|p| p.load(target, btf).is_ok()),
                hooks::Mechanism::Kprobe => <&mut KProbe>::try_from(prog)
                    .ok()
                    .filter(|p| p.fd().is_err())
                    .map(|p| p.load().is_ok()),
            };
        }
    }
}

/// Loaders (the hop program, a namespace's stubs) at work at the same time, at most.
const MAX_LOADERS: usize = 4;

/// A loader of the object whose shared maps come from their pins in `dir`.
fn copy_loader(dir: &Path) -> EbpfLoader<'static> {
    let mut loader = EbpfLoader::new();
    // No CO-RE relocations in the object: no kernel BTF needed.
    loader.btf(None);
    for name in SHARED_MAPS {
        loader.map_pin_path(name, dir.join(name));
    }
    loader
}

/// Loads the classifiers `names` of `loader`'s copy of the object.
fn load_classifiers(mut loader: EbpfLoader<'_>, names: &[&str]) -> Result<Ebpf> {
    let mut bpf = loader
        .load(EBPF_OBJECT)
        .context("loading podtrace's tc programs")?;
    for name in names {
        let prog: &mut SchedClassifier = bpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("eBPF program {name} missing from the object"))?
            .try_into()?;
        prog.load().with_context(|| format!("loading {name}"))?;
    }
    Ok(bpf)
}

/// Loads one namespace's copy of the hop stubs: its `NETNS_INO`, the shared maps from their
/// pins in `dir`. A stub is a few instructions: the verifier is through with it at once.
fn load_copy(ns: Option<&Path>, dir: &Path) -> Result<NsPrograms> {
    let ino = netns_id(ns)?;
    let mut loader = copy_loader(dir);
    loader.override_global("NETNS_INO", &ino, true);
    let bpf = load_classifiers(loader, &[PROG_INGRESS, PROG_EGRESS])?;
    Ok(NsPrograms {
        netns: ns.map(Path::to_path_buf),
        ino,
        bpf,
    })
}

/// Loads the hop program (with the session's `CAPTURE_MODE`), the shared maps from their pins
/// in `dir`: most of the verifier's work when a session starts, done once.
fn load_work(dir: &Path, capture: bool) -> Result<Ebpf> {
    let mode = u8::from(capture);
    let mut loader = copy_loader(dir);
    loader.override_global("CAPTURE_MODE", &mode, true);
    load_classifiers(loader, &[WORK_PROGRAM]).context("the hop program")
}

/// Reads the offsets the tracing programs need from the kernel's BTF. A member this kernel
/// names differently fails in one line naming it.
fn kernel_offsets(btf: &btf::Btf) -> Result<KernelOffsets> {
    let reason = |name: &str| {
        btf.enum_values("skb_drop_reason")
            .ok()
            .and_then(|v| v.into_iter().find(|(n, _)| n == name))
            .map(|(_, v)| v as u32)
            .unwrap_or(REASON_UNREPORTED)
    };
    kernel_offsets_inner(btf)
        .map(|mut o| {
            o.reason_not_dropped = reason("SKB_NOT_DROPPED_YET");
            o.reason_consumed = reason("SKB_CONSUMED");
            o
        })
        .map_err(|e| {
            anyhow!(
                "podtrace cannot read this kernel ({}): {e:#}",
                kernel_release()
            )
        })
}

fn kernel_offsets_inner(btf: &btf::Btf) -> Result<KernelOffsets> {
    Ok(KernelOffsets {
        skb_head: btf.member_offset("sk_buff", "head")?,
        skb_len: btf.member_offset("sk_buff", "len")?,
        skb_network_header: btf.member_offset("sk_buff", "network_header")?,
        skb_dev: btf.member_offset("sk_buff", "dev")?,
        dev_ifindex: btf.member_offset("net_device", "ifindex")?,
        dev_nd_net: btf.member_offset("net_device", "nd_net")?,
        net_ns_inum: btf.member_offset("net", "ns")? + btf.member_offset("ns_common", "inum")?,
        flowi4_saddr: btf.member_offset("flowi4", "saddr")?,
        flowi4_daddr: btf.member_offset("flowi4", "daddr")?,
        flowi4_proto: btf.member_offset("flowi4", "__fl_common")?
            + btf.member_offset("flowi_common", "flowic_proto")?,
        flowi4_ports: btf.member_offset("flowi4", "uli")?,
        nhc_dev: btf.member_offset("fib_nh_common", "nhc_dev")?,
        nhc_gw: btf.member_offset("fib_nh_common", "nhc_gw")?,
        fib_table_id: btf.member_offset("fib_table", "tb_id")?,
        fib_result_nhc: btf.member_offset("fib_result", "nhc")?,
        reason_not_dropped: REASON_UNREPORTED,
        reason_consumed: REASON_UNREPORTED,
        valid: 1,
        _pad: 0,
    })
}

/// `uname -r`.
fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "?".into())
}

/// (major, minor) of a kernel release string.
fn release_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// What the kernel lacks for podtrace, in one line; `None` when it has everything.
pub fn kernel_floor_problem(release: &str, btf_present: bool) -> Option<String> {
    let (maj, min) = MIN_KERNEL;
    if let Some(v) = release_version(release) {
        if v < MIN_KERNEL {
            return Some(format!(
                "kernel {release} is too old: podtrace needs {maj}.{min} or newer (the BPF ring buffer) with BTF"
            ));
        }
    }
    if !btf_present {
        return Some(format!(
            "kernel {release} has no BTF (/sys/kernel/btf/vmlinux is missing): podtrace needs a kernel built with CONFIG_DEBUG_INFO_BTF"
        ));
    }
    None
}

fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid struct. Kernels ≥ 5.11 account BPF memory to the
    // cgroup and ignore this; older ones need it.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
}

impl Probes {
    /// Loads the embedded eBPF object (nothing is attached yet; the filter is off).
    pub fn load() -> Result<Self> {
        Self::load_with_ring(DEFAULT_RING_BYTES)
    }

    /// As [`Probes::load`], with an event ring buffer of `ring_bytes` (a power of two, at
    /// least a page). Capture sessions want a large one: their records carry whole packets.
    pub fn load_with_ring(ring_bytes: u32) -> Result<Self> {
        if !ring_bytes.is_power_of_two() || ring_bytes < 4096 {
            bail!("the event ring buffer size must be a power of two of at least 4096 bytes");
        }
        if EBPF_OBJECT.is_empty() {
            bail!("this podtrace was built without its eBPF programs (PODTRACE_SKIP_EBPF); rebuild without it");
        }
        if let Some(problem) = kernel_floor_problem(
            &kernel_release(),
            Path::new("/sys/kernel/btf/vmlinux").exists(),
        ) {
            bail!("{problem}");
        }
        raise_memlock();
        // clsact filters of a podtrace that was killed (kernels without TCX).
        match clsact::cleanup_stale() {
            Ok(Some(line)) => eprintln!("podtrace: {line}"),
            Ok(None) => {}
            Err(e) => eprintln!("podtrace: cleaning up after a killed podtrace: {e:#}"),
        }
        // The RCU knob of a podtrace killed while it made or closed TCX links.
        if let Some(line) = rcu::recover() {
            eprintln!("podtrace: {line}");
        }
        // aya's parse of the kernel's BTF and the object's load beside podtrace's own parse
        // (offsets, drop reasons, what the kernel offers): each takes tens of milliseconds.
        // The object needs no kernel BTF to load (it has no CO-RE relocations: the offsets
        // come from podtrace's own parse, in OFFSETS), so it loads while aya parses the BTF
        // the tp_btf probes need.
        // Loading is when a session's memory peaks (the kernel's BTF, parsed twice): what
        // start-up mapped of the binary goes first.
        crate::resident::unmap_clean_file_pages();
        // Read once: both parses work from the same bytes (5–6 MiB, not twice that).
        let vmlinux = btf::read_sys_fs()?;
        let (loaded, abtf, own) = std::thread::scope(|s| {
            let loader = s.spawn(|| -> Result<Ebpf> {
                cheap_loaders_on_this_thread();
                EbpfLoader::new()
                    .btf(None)
                    .map_max_entries("EVENTS", ring_bytes)
                    .load(EBPF_OBJECT)
                    .context("loading podtrace's eBPF object")
            });
            let abtf = s.spawn(|| {
                aya::Btf::parse(&vmlinux, aya::Endianness::default())
                    .context("parsing the kernel's BTF")
            });
            let own = (|| -> Result<_> {
                let kbtf = btf::Btf::parse(&vmlinux)?;
                let offsets = kernel_offsets(&kbtf)?;
                Ok((
                    offsets,
                    DropReasons::from_btf(&kbtf),
                    hooks::KernelFacts::detect(&kbtf),
                ))
            })();
            let loaded = loader
                .join()
                .unwrap_or_else(|_| Err(anyhow!("loading the eBPF object panicked")));
            let abtf = abtf
                .join()
                .unwrap_or_else(|_| Err(anyhow!("parsing the kernel's BTF panicked")));
            (loaded, abtf, own)
        });
        let (offsets, reasons, facts) = own?;
        let bpf = loaded?;
        let abtf = abtf?;
        let mut probes = Self {
            bpf,
            per_ns: Vec::new(),
            work: None,
            reasons,
            nl_links: Vec::new(),
            clsact_state: clsact::State::new(),
            tc_mode: None,
            hops: Vec::new(),
            btf: Some(abtf),
            facts,
            hook_plan: None,
            capture: false,
            idle_detach: Vec::new(),
            idle_hooks: Vec::new(),
        };
        let mut off: Array<_, KernelOffsets> = Array::try_from(probes.map_mut("OFFSETS")?)?;
        off.set(0, offsets, 0)?;
        Ok(probes)
    }

    /// Loads the hop program (the first time) and the copies of the stubs for namespaces that
    /// have none yet, in parallel (the verifier's work on the hop program dominates), and puts
    /// the hop program where the stubs find it.
    fn load_ns_programs(&mut self, namespaces: &[Option<PathBuf>]) -> Result<()> {
        let mut wanted: Vec<&Option<PathBuf>> = Vec::new();
        for ns in namespaces {
            if !self.per_ns.iter().any(|p| &p.netns == ns) && !wanted.contains(&ns) {
                wanted.push(ns);
            }
        }
        if wanted.is_empty() {
            return Ok(());
        }
        ensure_bpffs()?;
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = Path::new(BPFFS).join(format!(
            "podtrace-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // The copies share every map with the first load through pins that exist only while
        // they load; the fds keep the maps alive afterwards.
        let pinned = SHARED_MAPS.iter().try_for_each(|name| -> Result<()> {
            let path = dir.join(name);
            self.map(name)?
                .pin(&path)
                .with_context(|| format!("pinning {name} at {}", path.display()))
        });
        // Job 0 is the hop program when it is not loaded yet (the longest: first), the others
        // one namespace's stubs each.
        let need_work = self.work.is_none();
        let jobs = usize::from(need_work) + wanted.len();
        // As many loaders as CPUs, at most 4 (the verifier is CPU-bound; each loader holds a
        // parsed copy of the object while it works).
        let hook_plan = self.hook_plan.take();
        let main_bpf = &mut self.bpf;
        let facts = &self.facts;
        let loaded: Result<(Option<Ebpf>, Vec<NsPrograms>)> = pinned.and_then(|()| {
            let btf = self.btf.as_ref();
            let dir = &dir;
            let capture = self.capture;
            let next = std::sync::atomic::AtomicUsize::new(0);
            let work: std::sync::Mutex<Option<Result<Ebpf>>> = std::sync::Mutex::new(None);
            let slots: Vec<std::sync::Mutex<Option<Result<NsPrograms>>>> =
                wanted.iter().map(|_| std::sync::Mutex::new(None)).collect();
            let workers = std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .min(MAX_LOADERS)
                .min(jobs);
            std::thread::scope(|s| {
                // The kernel-side probes the session will want are verified meanwhile.
                if let (Some((forced, wanted)), Some(btf)) = (hook_plan, btf) {
                    s.spawn(move || preload_kernel_hooks(main_bpf, btf, facts, forced, &wanted));
                }
                for _ in 0..workers {
                    s.spawn(|| {
                        cheap_loaders_on_this_thread();
                        loop {
                            let mut i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            if need_work {
                                if i == 0 {
                                    let r = load_work(dir, capture);
                                    if let Ok(mut slot) = work.lock() {
                                        *slot = Some(r);
                                    }
                                    continue;
                                }
                                i -= 1;
                            }
                            let Some(ns) = wanted.get(i) else { break };
                            let r = load_copy(ns.as_deref(), dir).with_context(|| match ns {
                                Some(p) => format!("network namespace {}", p.display()),
                                None => "this network namespace".to_owned(),
                            });
                            if let Ok(mut slot) = slots[i].lock() {
                                *slot = Some(r);
                            }
                        }
                    });
                }
            });
            fn lost<T>() -> Result<T> {
                Err(anyhow!("a program loader thread failed"))
            }
            let work = if need_work {
                Some(work.into_inner().ok().flatten().unwrap_or_else(lost)?)
            } else {
                None
            };
            let copies = slots
                .into_iter()
                .map(|m| m.into_inner().ok().flatten().unwrap_or_else(lost))
                .collect::<Result<Vec<_>>>()?;
            Ok((work, copies))
        });
        let _ = std::fs::remove_dir_all(&dir);
        let (work, copies) = loaded?;
        if let Some(mut work) = work {
            // Before any stub is attached: a stub whose slot is empty lets packets through
            // unseen.
            let mut slots = ProgramArray::try_from(self.map_mut("HOP_WORK")?)?;
            let prog: &mut SchedClassifier = work
                .program_mut(WORK_PROGRAM)
                .ok_or_else(|| anyhow!("eBPF program {WORK_PROGRAM} missing"))?
                .try_into()?;
            slots
                .set(0, prog.fd()?, 0)
                .context("handing the hop program to the hop stubs")?;
            self.work = Some(work);
        }
        self.per_ns.extend(copies);
        Ok(())
    }

    /// Puts the hop probes on every target (see [`Probes::attach_hop`]): the copies of the
    /// programs for new namespaces load in parallel, and each namespace's attachments are
    /// made from a thread of its own. How: [`choose_tc_mode`].
    pub fn attach_hops(&mut self, targets: &[HopTarget]) -> Result<TcMode> {
        if let Some(t) = targets.iter().find(|t| t.hop_id >= podtrace_abi::MAX_HOPS) {
            bail!("hop id {} out of range", t.hop_id);
        }
        let mode = match self.tc_mode {
            // One session, one mechanism.
            Some(m) => m,
            None => choose_tc_mode(targets)?,
        };
        let namespaces: Vec<Option<PathBuf>> = targets.iter().map(|t| t.netns.clone()).collect();
        self.load_ns_programs(&namespaces)?;
        // Interfaces by name inside their namespaces, and the hop ids the probes report.
        let mut by_ns: Vec<(usize, Vec<(&HopTarget, u32)>)> = Vec::new();
        for t in targets {
            let i = self
                .per_ns
                .iter()
                .position(|p| p.netns == t.netns)
                .ok_or_else(|| anyhow!("no programs for {}", where_(t)))?;
            match by_ns.iter_mut().find(|(j, _)| *j == i) {
                Some((_, list)) => list.push((t, 0)),
                None => by_ns.push((i, vec![(t, 0)])),
            }
        }
        for (i, list) in &mut by_ns {
            let ns = self.per_ns[*i].netns.clone();
            let ino = self.per_ns[*i].ino;
            let names: Vec<String> = list.iter().map(|(t, _)| t.ifname.clone()).collect();
            let ifindexes = netns::run_in(ns.as_deref(), || {
                names
                    .iter()
                    .map(|n| {
                        nix::net::if_::if_nametoindex(n.as_str())
                            .with_context(|| format!("interface {n} not found"))
                    })
                    .collect::<Result<Vec<u32>>>()
            })
            .with_context(|| where_(list[0].0))?;
            let mut hops: BpfHashMap<_, HopKey, u32> = BpfHashMap::try_from(self.map_mut("HOPS")?)?;
            for ((t, slot), ifindex) in list.iter_mut().zip(ifindexes) {
                *slot = ifindex;
                hops.insert(
                    HopKey {
                        netns_ino: ino,
                        ifindex,
                        _pad: 0,
                    },
                    t.hop_id,
                    0,
                )?;
            }
        }
        crate::signals::check()?;
        // clsact: every filter is recorded (and the guard started) before any is attached.
        let mut planned: Vec<clsact::OwnedFilter> = Vec::new();
        if mode == TcMode::Clsact {
            for (i, list) in &by_ns {
                let p = &mut self.per_ns[*i];
                for (t, ifindex) in list {
                    for (name, ingress) in [(PROG_INGRESS, true), (PROG_EGRESS, false)] {
                        let prog: &mut SchedClassifier = p
                            .bpf
                            .program_mut(name)
                            .ok_or_else(|| anyhow!("eBPF program {name} missing"))?
                            .try_into()?;
                        planned.push(clsact::OwnedFilter {
                            netns: t.netns.clone(),
                            netns_ino: p.ino,
                            ifname: t.ifname.clone(),
                            ifindex: *ifindex,
                            ingress,
                            priority: 0,
                            handle: 0,
                            prog_id: prog.info()?.id(),
                            program: name.to_owned(),
                            qdisc_created: false,
                        });
                    }
                }
            }
            self.clsact_state.add(&planned)?;
        }
        type Job<'a, 'b> = (&'a mut NsPrograms, Vec<(&'b HopTarget, u32)>);
        let jobs: Vec<Job> = self
            .per_ns
            .iter_mut()
            .enumerate()
            .filter_map(|(i, p)| {
                let list = by_ns.iter().find(|(j, _)| *j == i)?.1.clone();
                Some((p, list))
            })
            .collect();
        type Attached = Vec<(NsLink, clsact::OwnedFilter)>;
        // Each TCX link waits for an RCU grace period, under the RTNL lock.
        let expedited = (mode == TcMode::Tcx).then(rcu::expedite);
        let results: Vec<(Attached, Result<()>)> = std::thread::scope(|s| {
            let workers: Vec<_> = jobs
                .into_iter()
                .map(|(p, list)| {
                    s.spawn(move || -> (Attached, Result<()>) {
                        let ns = p.netns.clone();
                        let ino = p.ino;
                        let mut attached: Attached = Vec::new();
                        let result = netns::run_in(ns.as_deref(), || {
                            for (t, ifindex) in &list {
                                attach_one(p, mode, t, *ifindex, ino, &mut attached)?;
                            }
                            Ok(())
                        });
                        (attached, result)
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| {
                    w.join().unwrap_or_else(|_| {
                        (Vec::new(), Err(anyhow!("an attaching thread panicked")))
                    })
                })
                .collect()
        });
        drop(expedited);
        let mut first_err = None;
        let mut placed = Vec::new();
        for (attached, result) in results {
            for (link, owned) in attached {
                let ns_index = self
                    .per_ns
                    .iter()
                    .position(|p| p.netns == owned.netns)
                    .unwrap_or(0);
                placed.push(owned.clone());
                self.nl_links.push(NlAttachment {
                    ns_index,
                    link,
                    owned,
                });
            }
            if let Err(e) = result {
                first_err.get_or_insert(e);
            }
        }
        if mode == TcMode::Clsact {
            // What was placed, with its priority and handle; what was not, forgotten.
            self.clsact_state.update(&planned, &placed);
        }
        self.tc_mode = Some(mode);
        if let Some(e) = first_err {
            return Err(e);
        }
        self.hops.extend(targets.iter().cloned());
        Ok(mode)
    }

    fn map_mut(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.bpf
            .map_mut(name)
            .ok_or_else(|| anyhow!("eBPF map {name} missing from the object"))
    }

    fn map(&self, name: &str) -> Result<&aya::maps::Map> {
        self.bpf
            .map(name)
            .ok_or_else(|| anyhow!("eBPF map {name} missing from the object"))
    }

    /// Says which kernel-side probes [`Probes::attach_kernel_hooks`] will be asked for, so
    /// that they are verified while the hop probes load (on other CPUs).
    pub fn prepare_kernel_hooks(
        &mut self,
        forced: Option<hooks::Mechanism>,
        wanted: &[hooks::Evidence],
    ) {
        self.hook_plan = Some((forced, wanted.to_vec()));
    }

    /// Chooses how the hop probes will be attached, instead of [`choose_tc_mode`]; only
    /// before the first one.
    pub fn set_tc_mode(&mut self, mode: TcMode) -> Result<()> {
        if mode == TcMode::Tcx && !tcx_supported() {
            bail!("this kernel has no TCX (6.6 or newer)");
        }
        match self.tc_mode {
            Some(m) if m != mode => {
                bail!("the hop probes are attached with {} already", m.as_str())
            }
            _ => {
                self.tc_mode = Some(mode);
                Ok(())
            }
        }
    }

    /// How the hop probes are attached (`None` before the first one).
    pub fn tc_mode(&self) -> Option<TcMode> {
        self.tc_mode
    }

    /// The drop reason names of the running kernel.
    pub fn drop_reasons(&self) -> &DropReasons {
        &self.reasons
    }

    /// Sets (or replaces) what the programs trace. Until called, every program stays silent.
    /// Whether the hop probes capture packets (a snap length) is fixed by the filter set
    /// before the first hop is attached.
    pub fn set_filter(&mut self, spec: FilterSpec) -> Result<()> {
        if self.per_ns.is_empty() {
            self.capture = spec.snaplen.is_some();
        } else if spec.snaplen.is_some() && !self.capture {
            bail!("the hop probes were loaded without capture: set a snap length before attaching");
        }
        let mut filter: Array<_, Filter> = Array::try_from(self.map_mut("FILTER")?)?;
        filter.set(0, spec.to_abi(), 0)?;
        Ok(())
    }

    /// Puts the ingress and egress hop probes on an interface. The interface is found by name
    /// inside its namespace; a missing one is an error naming it.
    pub fn attach_hop(&mut self, target: &HopTarget) -> Result<TcMode> {
        self.attach_hops(std::slice::from_ref(target))
    }

    /// Once everything is attached: lets go of what only loading needed (the kernel's
    /// parsed BTF, tens of MiB) and hands the freed memory back to the system (the loader
    /// threads' allocator arenas keep it otherwise). Kernel-side probes cannot be loaded
    /// afterwards (hop probes still can).
    pub fn settle(&mut self) -> Option<std::thread::JoinHandle<()>> {
        // Off the start's critical path (freeing the parsed BTF and trimming take
        // milliseconds).
        let btf = self.btf.take();
        std::thread::Builder::new()
            .name("podtrace-trim".into())
            .spawn(move || {
                drop(btf);
                crate::resident::settle();
            })
            .ok()
    }

    /// The hops attached so far.
    pub fn hops(&self) -> &[HopTarget] {
        &self.hops
    }

    /// Attaches the kernel-side evidence probes (drops, FIB lookups, device transmit): for
    /// each, the BTF tracepoint when the kernel has it, else the kprobe flavour (or only the
    /// `forced` mechanism). Says what was attached; fails only when no drop probe could be
    /// attached at all.
    pub fn attach_kernel_hooks(
        &mut self,
        forced: Option<hooks::Mechanism>,
        wanted: &[hooks::Evidence],
    ) -> Result<Vec<hooks::HookReport>> {
        let mut reports = Vec::new();
        for evidence in wanted.iter().copied() {
            let (variants, notes) = hooks::plan(&self.facts, evidence, forced);
            let mut report = hooks::HookReport {
                evidence,
                mechanism: None,
                attached: None,
                drop_reason: None,
                notes,
                idle_detach: false,
            };
            for v in &variants {
                let own = self.idle_detach.contains(&evidence);
                match self.attach_variant(v, own) {
                    Ok(()) => {
                        report.idle_detach = own && v.mechanism == hooks::Mechanism::TpBtf;
                        report.mechanism = Some(v.mechanism);
                        report.attached = Some(v.describe());
                        if evidence == hooks::Evidence::Drop {
                            report.drop_reason = Some(v.drop_reason);
                        }
                        break;
                    }
                    Err(e) => report.notes.push(format!("{}: {e:#}", v.describe())),
                }
            }
            if evidence == hooks::Evidence::Drop && report.attached.is_none() {
                bail!(
                    "no drop probe could be attached: {}",
                    report.notes.join("; ")
                );
            }
            reports.push(report);
        }
        Ok(reports)
    }

    /// Has [`Probes::attach_kernel_hooks`] attach these kinds of evidence, where it uses their
    /// tracepoints, so that they can go while the conversation is idle: see [`idle`] and
    /// [`Probes::take_idle_hooks`].
    pub fn detach_when_idle(&mut self, evidence: &[hooks::Evidence]) {
        self.idle_detach = evidence.to_vec();
    }

    /// The hooks [`Probes::detach_when_idle`] asked for, with what says when the
    /// conversation is idle (`None`: no such hook was attached through a tracepoint).
    pub fn take_idle_hooks(&mut self) -> Result<Option<idle::IdleHooks>> {
        if self.idle_hooks.is_empty() {
            return Ok(None);
        }
        let fd = match self.map("HOP_LAST")? {
            aya::maps::Map::Array(m) => m.fd().as_fd().try_clone_to_owned(),
            _ => bail!("eBPF map HOP_LAST is not an array"),
        }
        .context("duplicating the HOP_LAST map's fd")?;
        let data = MapData::from_fd(fd).context("opening the HOP_LAST map")?;
        let hop_last = Array::try_from(aya::maps::Map::Array(data))?;
        Ok(Some(idle::IdleHooks::new(
            std::mem::take(&mut self.idle_hooks),
            hop_last,
            idle::IDLE_AFTER,
        )))
    }

    /// Loads and attaches the programs of one variant (all or nothing). `own`: a tp_btf
    /// program's link is made here and kept in `idle_hooks`, not by aya.
    fn attach_variant(&mut self, v: &hooks::Variant, own: bool) -> Result<()> {
        match v.mechanism {
            hooks::Mechanism::TpBtf => {
                let (name, tracepoint) = v.programs[0];
                let prog: &mut BtfTracePoint = self
                    .bpf
                    .program_mut(name)
                    .ok_or_else(|| anyhow!("eBPF program {name} missing"))?
                    .try_into()?;
                let btf = self.btf.as_ref().ok_or_else(|| anyhow!("probes settled"))?;
                if prog.fd().is_err() {
                    prog.load(tracepoint, btf)
                        .with_context(|| format!("loading tp_btf {tracepoint}"))?;
                }
                if own {
                    let fd = prog
                        .fd()?
                        .as_fd()
                        .try_clone_to_owned()
                        .context("duplicating a program's fd")?;
                    let link = idle::raw_tracepoint_open(fd.as_fd())
                        .with_context(|| format!("attaching tp_btf {tracepoint}"))?;
                    self.idle_hooks.push(idle::Hook {
                        tracepoint,
                        prog: fd,
                        link: Some(link),
                    });
                    return Ok(());
                }
                prog.attach()
                    .with_context(|| format!("attaching tp_btf {tracepoint}"))?;
                Ok(())
            }
            hooks::Mechanism::Kprobe => {
                let mut links = Vec::new();
                for (name, function) in v.programs {
                    let result = (|| -> Result<()> {
                        let prog: &mut KProbe = self
                            .bpf
                            .program_mut(name)
                            .ok_or_else(|| anyhow!("eBPF program {name} missing"))?
                            .try_into()?;
                        if prog.fd().is_err() {
                            prog.load()
                                .with_context(|| format!("loading kprobe {name}"))?;
                        }
                        let link = prog
                            .attach(function, 0)
                            .with_context(|| format!("attaching a kprobe to {function}"))?;
                        links.push((*name, link));
                        Ok(())
                    })();
                    if let Err(e) = result {
                        // All or nothing: detach the half that attached.
                        for (name, link) in links {
                            if let Some(Ok(p)) =
                                self.bpf.program_mut(name).map(<&mut KProbe>::try_from)
                            {
                                let _ = p.detach(link);
                            }
                        }
                        return Err(e);
                    }
                }
                Ok(())
            }
        }
    }

    /// Attaches only the drop probe (tests and tools that need nothing else), as
    /// [`Probes::attach_kernel_hooks`] would choose it.
    pub fn attach_drops(&mut self) -> Result<()> {
        self.attach_kernel_hooks(None, &[hooks::Evidence::Drop])
            .map(|_| ())
    }

    /// Packets the hop's probes matched so far.
    pub fn hop_counts(&self, hop_id: u32) -> Result<HopCounts> {
        let stats: PerCpuArray<_, u64> = PerCpuArray::try_from(self.map("HOP_STATS")?)?;
        let sum = |dir: u8| -> Result<u64> {
            Ok(stats
                .get(&(hop_id * 2 + dir as u32), 0)?
                .iter()
                .sum::<u64>())
        };
        Ok(HopCounts {
            ingress: sum(DIR_INGRESS)?,
            egress: sum(DIR_EGRESS)?,
        })
    }

    /// The global counters.
    pub fn counters(&self) -> Result<Counters> {
        read_counters(&PerCpuArray::try_from(self.map("COUNTERS")?)?)
    }

    /// A handle on the counters another thread can read while the probes stay here.
    pub fn counter_reader(&self) -> Result<CounterReader> {
        let fd = match self.map("COUNTERS")? {
            aya::maps::Map::PerCpuArray(m) => m.fd().as_fd().try_clone_to_owned(),
            _ => bail!("eBPF map COUNTERS is not a per-CPU array"),
        }
        .context("duplicating the counters map's fd")?;
        let data = MapData::from_fd(fd).context("opening the counters map")?;
        Ok(CounterReader(PerCpuArray::try_from(
            aya::maps::Map::PerCpuArray(data),
        )?))
    }

    /// Takes the event ring buffer (once); read it with [`read_event`].
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        Ok(RingBuf::try_from(self.take_events_map()?)?)
    }

    /// Takes the event ring buffer's map (once) without mapping it into memory yet: make it a
    /// `RingBuf` where it will be read. The kernel fills it from the moment the probes run.
    pub fn take_events_map(&mut self) -> Result<aya::maps::Map> {
        self.bpf
            .take_map("EVENTS")
            .ok_or_else(|| anyhow!("the event ring buffer was taken already"))
    }
}

/// The counters map, readable from any thread.
pub struct CounterReader(PerCpuArray<MapData, u64>);

impl CounterReader {
    pub fn read(&self) -> Result<Counters> {
        read_counters(&self.0)
    }
}

fn read_counters<T: std::borrow::Borrow<MapData>>(cnt: &PerCpuArray<T, u64>) -> Result<Counters> {
    let mut v = [0u64; CNT_SLOTS as usize];
    for (i, slot) in v.iter_mut().enumerate() {
        *slot = cnt.get(&(i as u32), 0)?.iter().sum();
    }
    Ok(Counters {
        tc_seen: v[podtrace_abi::CNT_TC_SEEN as usize],
        tc_matched: v[podtrace_abi::CNT_TC_MATCHED as usize],
        drops_matched: v[podtrace_abi::CNT_DROP_MATCHED as usize],
        fib_matched: v[podtrace_abi::CNT_FIB_MATCHED as usize],
        xmit_matched: v[podtrace_abi::CNT_XMIT_MATCHED as usize],
        lost: v[podtrace_abi::CNT_LOST as usize],
        cut: v[podtrace_abi::CNT_CUT as usize],
    })
}

/// Decodes one ring buffer record.
pub fn read_event(bytes: &[u8]) -> Option<Event> {
    if bytes.len() < std::mem::size_of::<Event>() {
        return None;
    }
    // SAFETY: length checked; Event is plain old data, read unaligned.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) })
}

/// Mounts bpffs on /sys/fs/bpf unless one is there (as bpftool does).
fn ensure_bpffs() -> Result<()> {
    // `f_type` is i64 with glibc, u64 with musl.
    const BPF_FS_MAGIC: u64 = 0xcafe_4a11;
    if nix::sys::statfs::statfs(BPFFS).is_ok_and(|s| s.filesystem_type().0 as u64 == BPF_FS_MAGIC) {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        Some("mode=0700"),
    )
    .with_context(|| format!("mounting bpffs on {BPFFS}"))
}

fn where_(t: &HopTarget) -> String {
    t.place()
}

impl HopTarget {
    /// The interface and its namespace, as errors name them.
    pub fn place(&self) -> String {
        match &self.netns {
            Some(ns) => format!("{} in {}", self.ifname, ns.display()),
            None => self.ifname.clone(),
        }
    }
}

impl Drop for Probes {
    fn drop(&mut self) {
        // clsact filters outlive us unless removed, and must be removed from inside their
        // namespace (netlink acts on the caller's namespace): one thread per namespace, then
        // the clsact qdiscs podtrace added, unless something else is on them now.
        let mut by_ns: Vec<(Option<PathBuf>, Vec<NlAttachment>)> = Vec::new();
        for att in std::mem::take(&mut self.nl_links) {
            let ns = self.per_ns.get(att.ns_index).and_then(|p| p.netns.clone());
            match by_ns.iter_mut().find(|(n, _)| *n == ns) {
                Some((_, list)) => list.push(att),
                None => by_ns.push((ns, vec![att])),
            }
        }
        let removed: Vec<clsact::OwnedFilter> = std::thread::scope(|s| {
            let workers: Vec<_> = by_ns
                .into_iter()
                .map(|(ns, list)| {
                    s.spawn(move || {
                        let mut removed = Vec::new();
                        let mut qdiscs: Vec<u32> = Vec::new();
                        for att in list {
                            let owned = att.owned;
                            if netns::run_in(ns.as_deref(), move || att.link.detach()).is_ok() {
                                if owned.qdisc_created && !qdiscs.contains(&owned.ifindex) {
                                    qdiscs.push(owned.ifindex);
                                }
                                removed.push(owned);
                            }
                        }
                        for ifindex in qdiscs {
                            let _ = clsact::remove_qdisc_if_unused(ns.as_deref(), ifindex);
                        }
                        removed
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap_or_default())
                .collect()
        });
        self.clsact_state.remove(&removed);
        // Closing a TCX link waits for an RCU grace period too.
        let copies = std::mem::take(&mut self.per_ns);
        let expedited =
            (self.tc_mode == Some(TcMode::Tcx) && !copies.is_empty()).then(rcu::expedite);
        drop(copies);
        drop(expedited);
        drop(self.work.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_packets_get_the_larger_ring() {
        assert_eq!(ring_bytes(None), DEFAULT_RING_BYTES);
        assert_eq!(ring_bytes(Some(128)), DEFAULT_RING_BYTES);
        assert_eq!(ring_bytes(Some(2048)), DEFAULT_RING_BYTES);
        assert_eq!(ring_bytes(Some(2049)), CAPTURE_RING_BYTES);
        assert_eq!(ring_bytes(Some(MAX_SNAPLEN)), CAPTURE_RING_BYTES);
        assert_eq!(ring_bytes(Some(0)), CAPTURE_RING_BYTES);
    }

    #[test]
    fn the_kernel_floor_is_said_in_one_line() {
        let old = kernel_floor_problem("4.19.0-27-cloud-amd64", false).unwrap();
        assert!(old.contains("4.19.0-27-cloud-amd64 is too old"), "{old}");
        assert!(old.contains("5.8"), "{old}");
        assert!(!old.contains('\n'));
        let no_btf = kernel_floor_problem("5.10.0-46-cloud-amd64", false).unwrap();
        assert!(no_btf.contains("no BTF"), "{no_btf}");
        assert!(no_btf.contains("CONFIG_DEBUG_INFO_BTF"), "{no_btf}");
        assert_eq!(kernel_floor_problem("5.8.0", true), None);
        assert_eq!(
            kernel_floor_problem("6.12.118+deb13-cloud-amd64", true),
            None
        );
        // A release podtrace cannot parse is judged by BTF alone.
        assert_eq!(kernel_floor_problem("weird", true), None);
    }

    fn kernel_part(expr: &str) -> KernelExpr {
        let f = crate::pcap::CaptureFilter::parse(expr).unwrap();
        crate::capture::kernel_expression(&f.prefilter())
    }

    #[test]
    fn the_kernel_checks_what_an_expression_needs() {
        let k = kernel_part("udp and port 7002");
        assert_eq!((k.nprotos, k.protos[0]), (1, 17));
        assert_eq!((k.nports, k.ports[0]), (1, 7002));
        assert_eq!(k.nnets, 0);
        // Networks go to the kernel masked, in network order.
        let k = kernel_part("net 10.244.1.0/24 or host 10.0.0.1");
        assert_eq!(k.nnets, 2);
        let abi = FilterSpec {
            expression: k,
            ..FilterSpec::default()
        }
        .to_abi();
        let nets: Vec<(Ipv4Addr, Ipv4Addr)> = abi.x_nets[..2]
            .iter()
            .map(|n| {
                (
                    Ipv4Addr::from(u32::from_be(n.addr)),
                    Ipv4Addr::from(u32::from_be(n.mask)),
                )
            })
            .collect();
        assert!(nets.contains(&(
            "10.244.1.0".parse().unwrap(),
            "255.255.255.0".parse().unwrap()
        )));
        assert!(nets.contains(&(
            "10.0.0.1".parse().unwrap(),
            "255.255.255.255".parse().unwrap()
        )));
        // What promises nothing leaves the kernel without a condition.
        assert!(kernel_part("not icmp").is_empty());
        assert!(kernel_part("icmp or host 10.0.0.1").is_empty());
        // "port" alone: TCP or UDP.
        let k = kernel_part("port 53");
        assert_eq!(&k.protos[..k.nprotos as usize], &[6, 17]);
        // Lists longer than the kernel holds are left to userspace, the rest still checked.
        let many = (1..=9)
            .map(|p| format!("port {p}"))
            .collect::<Vec<_>>()
            .join(" or ");
        let k = kernel_part(&format!("tcp and ({many})"));
        assert_eq!((k.nports, k.nprotos), (0, 1));
    }

    /// The loaders get no kernel BTF ([`load_copy`], [`Probes::load_with_ring`]): the object
    /// must have no CO-RE relocations (its `.BTF.ext` says how many bytes of them it holds).
    #[test]
    fn the_object_has_no_core_relocations() {
        let data = EBPF_OBJECT;
        if data.is_empty() {
            return; // built with PODTRACE_SKIP_EBPF
        }
        let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]) as usize;
        let u32_at = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().unwrap()) as usize;
        let u64_at = |o: usize| u64::from_le_bytes(data[o..o + 8].try_into().unwrap()) as usize;
        let (shoff, shentsize, shnum, shstrndx) =
            (u64_at(0x28), u16_at(0x3a), u16_at(0x3c), u16_at(0x3e));
        let section = |i: usize| {
            let h = shoff + i * shentsize;
            (u32_at(h), u64_at(h + 0x18), u64_at(h + 0x20))
        };
        let (_, names, _) = section(shstrndx);
        let ext = (0..shnum)
            .map(section)
            .find(|(name, _, _)| data[names + name..].starts_with(b".BTF.ext\0"))
            .expect("a .BTF.ext section");
        let at = ext.1;
        let hdr_len = u32_at(at + 4);
        assert!(hdr_len >= 32, "no CO-RE fields in this .BTF.ext header");
        // btf_ext_header: magic, version, flags, hdr_len, func_info off/len, line_info
        // off/len, core_relo_off, core_relo_len.
        assert_eq!(
            u32_at(at + 28),
            0,
            "CO-RE relocations: give the loaders the kernel's BTF"
        );
    }

    /// A map a copy of the stubs did not share would be a private, empty one of its own: a
    /// stub with its own `HOP_WORK` would let every packet through unseen, one with its own
    /// `FILTER` would never match.
    #[test]
    fn the_copies_share_every_map_of_the_object() {
        if EBPF_OBJECT.is_empty() {
            return; // built with PODTRACE_SKIP_EBPF
        }
        let obj = aya_obj::Object::parse(EBPF_OBJECT).expect("podtrace's eBPF object parses");
        for name in obj.maps.keys() {
            // The global data of each copy is its own (`NETNS_INO`, `CAPTURE_MODE`).
            if name.starts_with('.') {
                continue;
            }
            assert!(
                SHARED_MAPS.contains(&name.as_str()),
                "map {name} is not in SHARED_MAPS"
            );
        }
        for name in SHARED_MAPS {
            assert!(obj.maps.contains_key(name), "no map {name} in the object");
        }
        for name in [PROG_INGRESS, PROG_EGRESS, WORK_PROGRAM] {
            assert!(obj.programs.contains_key(name), "no program {name}");
        }
    }

    #[test]
    fn unreported_drops_have_a_name() {
        let reasons = DropReasons::default();
        assert_eq!(reasons.name(REASON_UNREPORTED), UNREPORTED);
        assert_eq!(reasons.name(7), "reason 7");
    }
}
