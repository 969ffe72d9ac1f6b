//! The maps shared with userspace (names are part of the ABI: userspace looks them up by name).
use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
};
use podtrace_abi::{AddrPair, Filter, HopKey, KernelOffsets, CNT_SLOTS, FIB_STACK_DEPTH, MAX_HOPS};

/// What to trace (index 0).
#[map]
pub static FILTER: Array<Filter> = Array::with_max_entries(1, 0);

/// (netns inode, ifindex) → hop id, written by userspace for every interface it attaches to.
#[map]
pub static HOPS: HashMap<HopKey, u32> = HashMap::with_max_entries(MAX_HOPS, 0);

/// The hop program every namespace's stubs hand their packets to (index 0, set by userspace
/// before any stub is attached).
#[map]
pub static HOP_WORK: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// What a stub hands the hop program with a packet.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct HandOff {
    /// The interface's network namespace (inode number).
    pub netns_ino: u64,
    /// `DIR_INGRESS` or `DIR_EGRESS`.
    pub dir: u64,
}

/// The hand-off of the stub that is tail-calling the hop program (index 0), per CPU. A tc
/// program runs to its end on the CPU it started on, with bottom halves off, so no other hop
/// probe runs on that CPU between the stub's write and the hop program's read.
#[map]
pub static HOP_HANDOFF: PerCpuArray<HandOff> = PerCpuArray::with_max_entries(1, 0);

/// Matched packets per hop and direction: index `hop_id * 2 + dir`.
#[map]
pub static HOP_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_HOPS * 2, 0);

/// `CNT_*` counters.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(CNT_SLOTS, 0);

/// Kernel structure offsets from BTF (index 0), for the tracing programs.
#[map]
pub static OFFSETS: Array<KernelOffsets> = Array::with_max_entries(1, 0);

/// Events to userspace (userspace may resize it at load time).
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(4 * 1024 * 1024, 0);

/// Address pairs the hop probes saw traced packets between, and when (see `AddrPair`).
#[map]
pub static RECENT: LruHashMap<AddrPair, u64> = LruHashMap::with_max_entries(1024, 0);

/// When a hop probe last emitted a traced packet (index 0; 0: never; updated at most once a
/// millisecond). Device transmits matter only for packets a hop probe saw first (a packet's
/// first hop, its pod's eth0 or its node's underlay device, comes before any transmit of
/// it), and so do the route lookups of forwarded packets (the packet arrived through a hop):
/// the transmit and route lookup hooks skip their parsing while no hop probe has emitted
/// lately.
#[map]
pub static HOP_LAST: Array<u64> = Array::with_max_entries(1, 0);

/// How long after a hop probe's last packet the transmit and route lookup hooks keep looking (ns).
pub const HOP_LAST_NS: u64 = 1_000_000_000;

/// Records that a hop probe emitted a traced packet at `now`.
#[inline(always)]
pub fn hop_emitted(now: u64) {
    if let Some(last) = HOP_LAST.get_ptr_mut(0) {
        // SAFETY: plain loads and stores of a u64; any writer's value will do.
        unsafe {
            if now.wrapping_sub(*last) >= 1_000_000 {
                *last = now;
            }
        }
    }
}

/// Whether a hop probe emitted a traced packet lately (see `HOP_LAST`).
#[inline(always)]
pub fn hop_lately() -> bool {
    let last = hop_last();
    if last == 0 {
        return false;
    }
    // SAFETY: plain helper.
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    now.wrapping_sub(last) < HOP_LAST_NS
}

/// `HOP_LAST` (0: no hop probe has emitted yet).
#[inline(always)]
fn hop_last() -> u64 {
    HOP_LAST.get(0).copied().unwrap_or(0)
}

/// How long a pair seen by the hop probes lets its route lookups through (ns).
pub const RECENT_NS: u64 = 1_000_000_000;

/// Per-CPU stack between the fib_table_lookup kprobe and its kretprobe: `(tb, flp, res)` of
/// each call in flight, the innermost at `FIB_DEPTH - 1` (nested calls keep their own
/// frames). Indexed through the map lookup, which checks the bound at run time.
#[map]
pub static FIB_STASH: PerCpuArray<[u64; 3]> = PerCpuArray::with_max_entries(FIB_STACK_DEPTH, 0);

/// Calls of fib_table_lookup in flight on this CPU, those too deep to record included.
#[map]
pub static FIB_DEPTH: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub fn bump(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
pub fn bump_hop(hop_id: u32, dir: u8) {
    if hop_id >= MAX_HOPS {
        return;
    }
    if let Some(slot) = HOP_STATS.get_ptr_mut(hop_id * 2 + dir as u32) {
        // SAFETY: as above.
        unsafe { *slot += 1 };
    }
}

/// Records that the hop probes saw a traced packet from `saddr` to `daddr` now (at most
/// one map update per pair and millisecond).
#[inline(always)]
pub fn seen_pair(saddr: u32, daddr: u32, now: u64) {
    let key = AddrPair { saddr, daddr };
    // SAFETY: the value is a plain u64 copied out at once.
    let fresh = unsafe { RECENT.get(&key) }.is_some_and(|t| now.wrapping_sub(*t) < 1_000_000);
    if !fresh {
        let _ = RECENT.insert(&key, &now, 0);
    }
}

/// Whether the hop probes saw a traced packet from `saddr` to `daddr` lately.
#[inline(always)]
pub fn recent(saddr: u32, daddr: u32) -> bool {
    // A pair is recorded only by a hop probe that emits, which sets `HOP_LAST` first: while
    // none has, `RECENT` is empty and the lookup is skipped.
    if hop_last() == 0 {
        return false;
    }
    let key = AddrPair { saddr, daddr };
    // SAFETY: the value is a plain u64 copied out at once; the clock is read only for a
    // pair that was seen (most lookups miss).
    unsafe { RECENT.get(&key) }.is_some_and(|t| {
        let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
        now.wrapping_sub(*t) < RECENT_NS
    })
}

#[inline(always)]
pub fn filter() -> Option<&'static Filter> {
    let f = FILTER.get(0)?;
    if f.flags & podtrace_abi::FILTER_ENABLED == 0 {
        return None;
    }
    Some(f)
}

/// Whether the session emits events (else it only counts). Read afresh each time: a value
/// kept in a register across the packet parse would split the verifier's walk of the parse
/// in two (one per value it knows), doubling its work at load time.
#[inline(always)]
pub fn emitting(f: &Filter) -> bool {
    // SAFETY: a plain read of the filter's flags.
    unsafe { core::ptr::read_volatile(&f.flags) & podtrace_abi::FILTER_EMIT != 0 }
}

#[inline(always)]
pub fn hop_id(netns_ino: u64, ifindex: u32) -> u32 {
    let key = HopKey {
        netns_ino,
        ifindex,
        _pad: 0,
    };
    // SAFETY: the value is a plain u32 copied out at once.
    match unsafe { HOPS.get(&key) } {
        Some(id) => *id,
        None => u32::MAX,
    }
}

/// The flags to submit a record of `size` bytes with: a wake-up of the reader only when this
/// record makes the waiting bytes cross `wake_bytes` (the reader polls on a short timer
/// meanwhile, and drains the ring whenever it wakes), at once when 0.
///
/// Only on the crossing: while the reader is behind, every record would otherwise ask for a
/// wake-up, and each is an interrupt the kernel sends itself (irq_work), which in a virtual
/// machine exits to the hypervisor. A wake-up missed because the reader was awake is not
/// lost: its poll returns at once while the ring holds data.
#[inline(always)]
pub fn wake_flags(f: &Filter, size: u64) -> u64 {
    if f.wake_bytes == 0 {
        return 0;
    }
    let avail = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    let wake = f.wake_bytes as u64;
    if avail < wake && avail + size >= wake {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

/// Emits an event, or counts it as lost when the ring buffer is full.
#[inline(always)]
pub fn emit(f: &Filter, ev: &podtrace_abi::Event) {
    match EVENTS.reserve::<podtrace_abi::Event>(0) {
        Some(mut entry) => {
            entry.write(*ev);
            entry.submit(wake_flags(
                f,
                core::mem::size_of::<podtrace_abi::Event>() as u64,
            ));
        }
        None => bump(podtrace_abi::CNT_LOST),
    }
}
