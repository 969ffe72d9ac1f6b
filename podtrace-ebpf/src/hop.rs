//! The hop probes: tc programs on every interface of a pod's path.
//!
//! Each interface gets a stub (`hop_ingress`, `hop_egress`) that knows the network namespace
//! it serves and hands the packet, with that namespace and its direction, to the one shared
//! hop program (`track`) by a tail call. tc programs cannot learn their device's namespace
//! themselves (`bpf_get_netns_cookie` answers for the skb's *socket*, which veth keeps across
//! namespaces, and tc programs may not read kernel memory), so userspace loads a stub per
//! namespace, with the namespace as a constant; the hop program, most of what the verifier
//! works through when a session starts, is loaded once.
use aya_ebpf::helpers::generated::bpf_skb_load_bytes;
use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_NO_WAKEUP, BPF_RB_RING_SIZE, TC_ACT_UNSPEC},
    helpers::bpf_ktime_get_ns,
    macros::classifier,
    programs::TcContext,
};
use podtrace_abi::{
    Event, Filter, CNT_CUT, CNT_LOST, CNT_TC_MATCHED, CNT_TC_SEEN, CUT_BYTES, DIR_EGRESS,
    DIR_INGRESS, FILTER_CAPTURE, FILTER_CUT, KIND_TC, MAX_SNAPLEN,
};

use crate::{
    maps::{
        bump, bump_hop, emit, emitting, filter, hop_emitted, hop_id, seen_pair, wake_flags,
        HandOff, EVENTS, HOP_HANDOFF, HOP_WORK,
    },
    packet::{expression_may_match, parse_eth, Reader},
};

/// The inode number of the network namespace this copy of the stubs serves, set by userspace
/// at load time.
#[unsafe(no_mangle)]
static NETNS_INO: u64 = 0;

/// Whether the hop program serves a capture session (packet bytes, the capture expression),
/// set by userspace at load time. A constant of the read-only data, so for the other sessions
/// the verifier sees the capture path as dead code and skips it: it is most of what it would
/// otherwise explore, and verifying is most of the time it takes to start.
#[unsafe(no_mangle)]
static CAPTURE_MODE: u8 = 0;

struct SkbReader<'a>(&'a TcContext);

impl Reader for SkbReader<'_> {
    #[inline(always)]
    fn load<T: Copy>(&self, offset: usize) -> Option<T> {
        self.0.load::<T>(offset).ok()
    }

    /// In the skb's linear data, where a frame's headers nearly always are, with direct packet
    /// access (plain loads after a bounds check the verifier follows) rather than a helper
    /// call; elsewhere with the helper. Both ways end in the same value, where the verifier's
    /// paths meet again.
    #[inline(always)]
    fn load_frame<T: Copy>(&self, offset: usize) -> Option<T> {
        let at = self.0.data() + offset;
        // More than 1 byte: a 1-byte read's check would compile to `at >= data_end`, from
        // which the verifier learns no range.
        const { assert!(core::mem::size_of::<T>() >= 2) };
        if at + core::mem::size_of::<T>() <= self.0.data_end() {
            // SAFETY: within the linear data (checked above, and by the verifier). `T` is a
            // `repr(C)` header of integers and byte arrays; the loads may be unaligned, which
            // the verifier allows on architectures with efficient unaligned access (x86-64,
            // arm64) and refuses at load time elsewhere.
            return Some(unsafe { core::ptr::read(at as *const T) });
        }
        self.load(offset)
    }
}

/// Ingress stub: hands the packet to the hop program ([`track`]) with this copy's namespace.
/// Returns `TC_ACT_UNSPEC` (== `TCX_NEXT`): the packet goes on unchanged to the next program
/// or the default action (so it does too when the hop program is missing).
#[classifier]
pub fn hop_ingress(ctx: TcContext) -> i32 {
    hand_over(&ctx, DIR_INGRESS)
}

/// Egress stub; see [`hop_ingress`].
#[classifier]
pub fn hop_egress(ctx: TcContext) -> i32 {
    hand_over(&ctx, DIR_EGRESS)
}

#[inline(always)]
fn hand_over(ctx: &TcContext, dir: u8) -> i32 {
    if let Some(slot) = HOP_HANDOFF.get_ptr_mut(0) {
        // SAFETY: this CPU's slot (see `HOP_HANDOFF`); a volatile read so the load-time value
        // of the global is used.
        unsafe {
            *slot = HandOff {
                netns_ino: core::ptr::read_volatile(&NETNS_INO),
                dir: dir as u64,
            }
        };
    }
    // SAFETY: on success the hop program's verdict is the packet's and this does not return.
    unsafe { HOP_WORK.tail_call(ctx, 0) };
    TC_ACT_UNSPEC
}

/// The hop program, shared by every namespace's stubs in both directions. Returns
/// `TC_ACT_UNSPEC`.
#[classifier]
pub fn track(ctx: TcContext) -> i32 {
    let Some(&HandOff { netns_ino, dir }) = HOP_HANDOFF.get(0) else {
        return TC_ACT_UNSPEC;
    };
    follow_packet(&ctx, netns_ino, dir as u8);
    TC_ACT_UNSPEC
}

#[inline(always)]
fn follow_packet(ctx: &TcContext, netns_ino: u64, dir: u8) {
    let Some(f) = filter() else { return };
    if !emitting(f) {
        bump(CNT_TC_SEEN);
    }
    let Some(flow) = parse_eth(&SkbReader(ctx), 0, f) else {
        return;
    };
    // SAFETY: a plain read of a global; volatile so the load-time value is used.
    let capture_mode = unsafe { core::ptr::read_volatile(&CAPTURE_MODE) } != 0;
    if capture_mode && !expression_may_match(f, &flow) {
        return;
    }
    bump(CNT_TC_MATCHED);
    // SAFETY: `ctx.skb.skb` is the kernel's `__sk_buff`, readable for the program's lifetime.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let hop = hop_id(netns_ino, ifindex);
    if !emitting(f) {
        bump_hop(hop, dir);
        return;
    }
    // SAFETY: plain helper.
    let now = unsafe { bpf_ktime_get_ns() };
    hop_emitted(now);
    if f.proto != 0 || f.port != 0 {
        seen_pair(flow.saddr, flow.daddr, now);
    }
    let mut ev = Event {
        ts_ns: now,
        netns_ino,
        kind: KIND_TC,
        dir,
        hop_id: hop,
        ifindex,
        skb_len: ctx.len(),
        flow,
        ..Event::default()
    };
    if capture_mode && f.flags & FILTER_CAPTURE != 0 {
        capture(ctx, f, &mut ev);
    } else {
        emit(f, &ev);
    }
}

const HEADER: usize = core::mem::size_of::<Event>();

/// Reserves a record of the event header and `B` packet bytes, loads up to `len` bytes of
/// the packet straight into it (no copy in between) and submits it. False when the ring
/// buffer had no room for it.
#[inline(always)]
fn record<const B: usize>(ctx: &TcContext, f: &Filter, ev: &mut Event, len: u32) -> bool {
    // Bounds the verifier can follow: 1..=B. The volatile read hides what the caller's size
    // class already says about `len`, or LLVM drops the mask as redundant and the verifier,
    // whose view of the branches differs, is left with a length it cannot bound by `B`.
    // SAFETY: a read of a local.
    let len = unsafe { core::ptr::read_volatile(&len) };
    let len = (len.wrapping_sub(1) & (B as u32 - 1)) + 1;
    let Some(mut entry) = EVENTS.reserve_bytes(HEADER + B, 0) else {
        return false;
    };
    ev.cap_len = len;
    let base = entry.as_mut_ptr();
    // SAFETY: the entry holds HEADER + B bytes; the header is written unaligned; the helper
    // checks the packet's bounds and writes at most `len` ≤ B bytes after the header.
    unsafe {
        core::ptr::write_unaligned(base.cast::<Event>(), *ev);
        let data = base.add(HEADER).cast::<core::ffi::c_void>();
        if bpf_skb_load_bytes(ctx.skb.skb as *const _, 0, data, len) != 0 {
            entry.discard(BPF_RB_NO_WAKEUP as u64);
            return true;
        }
    }
    entry.submit(wake_flags(f, (HEADER + B) as u64));
    true
}

/// Emits the event followed by up to the snap length of the packet's bytes, in the smallest
/// record size class that holds them.
///
/// With `FILTER_CUT`, a packet longer than `CUT_BYTES` gets its whole record only while the
/// ring buffer is less than half full; beyond that, and when the whole record finds no room,
/// it keeps its first `CUT_BYTES` (its headers) in a record of the smallest class. The reader
/// writes files and cannot always keep pace with whole packets: half the ring stays for
/// headers, so under such a load every packet is in the files, some of them cut, rather than
/// some whole and the rest lost.
#[inline(always)]
fn capture(ctx: &TcContext, f: &Filter, ev: &mut Event) {
    let mut len = ev.skb_len;
    if len > f.snaplen {
        len = f.snaplen;
    }
    if len > MAX_SNAPLEN {
        len = MAX_SNAPLEN;
    }
    // Headers (`-s 128`) and small frames; small frames inside VXLAN (156 bytes for a 64-byte
    // UDP payload) and other small ones; a frame of a 1500-byte MTU; anything up to 64 KiB
    // (GSO). A record takes its whole class in the ring until it is read: a 156-byte frame
    // in a 2 KiB record left room for a thirteenth as many.
    if len <= CUT_BYTES {
        if !record::<{ CUT_BYTES as usize }>(ctx, f, ev, len) {
            bump(CNT_LOST);
        }
        return;
    }
    let cut = f.flags & FILTER_CUT != 0;
    let whole = !cut || {
        let used = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
        let size = EVENTS.query(BPF_RB_RING_SIZE as u64);
        used + u64::from(len) < size / 2
    };
    if whole {
        let kept = if len <= 256 {
            record::<256>(ctx, f, ev, len)
        } else if len <= 512 {
            record::<512>(ctx, f, ev, len)
        } else if len <= 2048 {
            record::<2048>(ctx, f, ev, len)
        } else {
            record::<{ MAX_SNAPLEN as usize }>(ctx, f, ev, len)
        };
        if kept {
            return;
        }
    }
    if cut && record::<{ CUT_BYTES as usize }>(ctx, f, ev, CUT_BYTES) {
        bump(CNT_CUT);
        return;
    }
    bump(CNT_LOST);
}
