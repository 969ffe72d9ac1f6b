//! The maps shared with userspace (names are part of the ABI: userspace looks them up by name).
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};
use podtrace_abi::{
    CaptureBuf, Filter, HopKey, KernelOffsets, CNT_SLOTS, FIB_STACK_DEPTH, MAX_HOPS,
};

/// What to trace (index 0).
#[map]
pub static FILTER: Array<Filter> = Array::with_max_entries(1, 0);

/// (netns inode, ifindex) → hop id, written by userspace for every interface it attaches to.
#[map]
pub static HOPS: HashMap<HopKey, u32> = HashMap::with_max_entries(MAX_HOPS, 0);

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

/// Scratch where a capture record (event + packet bytes) is assembled, one slot per CPU
/// (a per-CPU map cannot hold 64 KiB values). Userspace sizes it to the possible CPUs.
#[map]
pub static CAPTURE_SCRATCH: Array<CaptureBuf> = Array::with_max_entries(256, 0);

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

#[inline(always)]
pub fn filter() -> Option<&'static Filter> {
    let f = FILTER.get(0)?;
    if f.flags & podtrace_abi::FILTER_ENABLED == 0 {
        return None;
    }
    Some(f)
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

/// Emits an event, or counts it as lost when the ring buffer is full.
#[inline(always)]
pub fn emit(ev: &podtrace_abi::Event) {
    match EVENTS.reserve::<podtrace_abi::Event>(0) {
        Some(mut entry) => {
            entry.write(*ev);
            entry.submit(0);
        }
        None => bump(podtrace_abi::CNT_LOST),
    }
}
