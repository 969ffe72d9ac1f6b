//! The hop probes: tc programs on every interface of a pod's path.
use aya_ebpf::helpers::generated::bpf_skb_load_bytes;
use aya_ebpf::{
    bindings::TC_ACT_UNSPEC, helpers::bpf_ktime_get_ns, macros::classifier, programs::TcContext,
};
use podtrace_abi::{
    CaptureBuf, Event, CNT_LOST, CNT_TC_MATCHED, CNT_TC_SEEN, DIR_EGRESS, DIR_INGRESS,
    FILTER_CAPTURE, FILTER_EMIT, KIND_TC, MAX_SNAPLEN,
};

use crate::{
    maps::{bump, bump_hop, emit, filter, hop_id, CAPTURE_SCRATCH, EVENTS},
    packet::{parse_eth, Reader},
};

/// The inode number of the network namespace this copy of the program serves, set by
/// userspace at load time. tc programs cannot learn their device's namespace themselves
/// (`bpf_get_netns_cookie` answers for the skb's *socket*, which veth keeps across namespaces,
/// and tc programs may not read kernel memory), so userspace loads one copy per namespace and
/// the copies share every map.
#[unsafe(no_mangle)]
static NETNS_INO: u64 = 0;

struct SkbReader<'a>(&'a TcContext);

impl Reader for SkbReader<'_> {
    #[inline(always)]
    fn load<T: Copy>(&self, offset: usize) -> Option<T> {
        self.0.load::<T>(offset).ok()
    }
}

/// Ingress hook. Returns `TC_ACT_UNSPEC` (== `TCX_NEXT`): the packet goes on unchanged to the
/// next program or the default action.
#[classifier]
pub fn hop_ingress(ctx: TcContext) -> i32 {
    track(&ctx, DIR_INGRESS);
    TC_ACT_UNSPEC
}

/// Egress hook; see [`hop_ingress`].
#[classifier]
pub fn hop_egress(ctx: TcContext) -> i32 {
    track(&ctx, DIR_EGRESS);
    TC_ACT_UNSPEC
}

#[inline(always)]
fn track(ctx: &TcContext, dir: u8) {
    bump(CNT_TC_SEEN);
    let Some(f) = filter() else { return };
    let Some(flow) = parse_eth(&SkbReader(ctx), 0, f) else {
        return;
    };
    bump(CNT_TC_MATCHED);
    // SAFETY: a plain read of a global; volatile so the load-time value is used.
    let netns_ino = unsafe { core::ptr::read_volatile(&NETNS_INO) };
    // SAFETY: `ctx.skb.skb` is the kernel's `__sk_buff`, readable for the program's lifetime.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let hop = hop_id(netns_ino, ifindex);
    bump_hop(hop, dir);
    if f.flags & FILTER_EMIT == 0 {
        return;
    }
    let mut ev = Event {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        netns_ino,
        kind: KIND_TC,
        dir,
        hop_id: hop,
        ifindex,
        skb_len: ctx.len(),
        flow,
        ..Event::default()
    };
    if f.flags & FILTER_CAPTURE != 0 {
        capture(ctx, &mut ev, f.snaplen);
    } else {
        emit(&ev);
    }
}

/// Emits the event followed by up to `snaplen` bytes of the packet.
#[inline(always)]
fn capture(ctx: &TcContext, ev: &mut Event, snaplen: u32) {
    // SAFETY: plain helper; tc programs do not migrate between CPUs while they run.
    let cpu = unsafe { aya_ebpf::helpers::generated::bpf_get_smp_processor_id() };
    let Some(buf) = CAPTURE_SCRATCH.get_ptr_mut(cpu) else {
        return;
    };
    let buf: *mut CaptureBuf = buf;
    let mut len = ev.skb_len;
    if len > snaplen {
        len = snaplen;
    }
    if len > MAX_SNAPLEN {
        len = MAX_SNAPLEN;
    }
    // Bounds the verifier can follow: 1..=MAX_SNAPLEN.
    let len = (len.wrapping_sub(1) & (MAX_SNAPLEN - 1)) + 1;
    // SAFETY: `buf` is this CPU's scratch; `data` holds MAX_SNAPLEN bytes; the helpers check
    // the packet bounds themselves.
    unsafe {
        let data = core::ptr::addr_of_mut!((*buf).data) as *mut core::ffi::c_void;
        if bpf_skb_load_bytes(ctx.skb.skb as *const _, 0, data, len) != 0 {
            return;
        }
        ev.cap_len = len;
        (*buf).event = *ev;
        let total = core::mem::size_of::<Event>() + len as usize;
        let record = core::slice::from_raw_parts(buf as *const u8, total);
        if EVENTS.output::<[u8]>(record, 0).is_err() {
            bump(CNT_LOST);
        }
    }
}
