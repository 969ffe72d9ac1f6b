//! Kernel-side evidence: where and why a traced packet was dropped (`kfree_skb`), which FIB
//! lookup routed it (`fib_table_lookup`) and which device transmitted it (`net_dev_start_xmit`).
//!
//! Each comes in two flavours, chosen by userspace at run time from the kernel's BTF: BTF
//! tracepoints (tp_btf), and kprobes on the functions behind them for kernels where a
//! tracepoint is missing or when asked for (`--hooks kprobe`). Both share the code below, so
//! they report the same evidence.
//!
//! Drops: `skb:kfree_skb` has carried the drop reason since 5.17 (`drop_kfree_skb`); before,
//! it has two arguments and no reason (`drop_kfree_skb_noreason`, reason `REASON_UNREPORTED`).
//! The kprobe flavour goes on `sk_skb_reason_drop` (6.10+), `kfree_skb_reason` (5.17+) or
//! `kfree_skb` (older, no reason), whichever the kernel has.
use core::ffi::c_void;

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{btf_tracepoint, kprobe, kretprobe},
    programs::{BtfTracePointContext, ProbeContext, RetProbeContext},
};
use podtrace_abi::{
    Event, FlowInfo, KernelOffsets, CNT_DROP_MATCHED, CNT_FIB_MATCHED, CNT_XMIT_MATCHED,
    DIR_EGRESS, DIR_INGRESS, KIND_DROP, KIND_FIB, KIND_XMIT, REASON_UNREPORTED,
};

use crate::{
    maps::{bump, emit, emitting, filter, hop_id, FIB_DEPTH, FIB_STASH, OFFSETS},
    packet::{parse_ipv4, Reader},
};

/// Reads kernel memory at `base + offset` (the packet's network header as base).
struct KernelReader(*const u8);

impl Reader for KernelReader {
    #[inline(always)]
    fn load<T: Copy>(&self, offset: usize) -> Option<T> {
        // SAFETY: probe reads fail cleanly on bad addresses.
        unsafe { bpf_probe_read_kernel(self.0.wrapping_add(offset) as *const T).ok() }
    }
}

#[inline(always)]
unsafe fn read_at<T: Copy>(base: *const u8, offset: u32) -> Option<T> {
    // SAFETY: probe reads fail cleanly on bad addresses.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize) as *const T).ok() }
}

#[inline(always)]
fn offsets() -> Option<&'static KernelOffsets> {
    let off = OFFSETS.get(0)?;
    (off.valid != 0).then_some(off)
}

/// The flow of the packet in `skb`, if it is one we trace.
#[inline(always)]
unsafe fn skb_flow(
    skb: *const u8,
    off: &KernelOffsets,
    f: &podtrace_abi::Filter,
) -> Option<FlowInfo> {
    // SAFETY: probe reads.
    unsafe {
        // `network_header`, `mac_header`, `tail`, `end`, `head`: one read where the kernel
        // lays them out so (every kernel podtrace supports), two elsewhere.
        let (head, nh) = if off.skb_head == off.skb_network_header + 12 {
            let w: [u8; 20] = read_at(skb, off.skb_network_header)?;
            let head = u64::from_ne_bytes([w[12], w[13], w[14], w[15], w[16], w[17], w[18], w[19]]);
            (head as *const u8, u16::from_ne_bytes([w[0], w[1]]))
        } else {
            let head: *const u8 = read_at(skb, off.skb_head)?;
            (head, read_at::<u16>(skb, off.skb_network_header)?)
        };
        if nh == u16::MAX {
            return None;
        }
        parse_ipv4(&KernelReader(head.wrapping_add(nh as usize)), 0, f)
    }
}

/// `(dev->ifindex, dev_net(dev)->ns.inum)`.
#[inline(always)]
unsafe fn device(dev: *const u8, off: &KernelOffsets) -> Option<(u32, u64)> {
    if dev.is_null() {
        return None;
    }
    // SAFETY: probe reads.
    unsafe {
        let ifindex: u32 = read_at(dev, off.dev_ifindex)?;
        let net: *const u8 = read_at(dev, off.dev_nd_net)?;
        let ino: u32 = if net.is_null() {
            0
        } else {
            read_at(net, off.net_ns_inum)?
        };
        Some((ifindex, ino as u64))
    }
}

// ---- drops ----

/// tp_btf `skb:kfree_skb(skb, location, reason[, rx_sk])` (5.17+).
#[btf_tracepoint(function = "kfree_skb")]
pub fn drop_kfree_skb(ctx: BtfTracePointContext) -> i32 {
    let skb: *const c_void = ctx.arg(0);
    let reason: u32 = ctx.arg(2);
    // SAFETY: every read is a probe read.
    unsafe { on_drop(skb as *const u8, reason) };
    0
}

/// tp_btf `skb:kfree_skb(skb, location)` (before 5.17: no reason; reading a third argument
/// would not pass the verifier there).
#[btf_tracepoint(function = "kfree_skb")]
pub fn drop_kfree_skb_noreason(ctx: BtfTracePointContext) -> i32 {
    let skb: *const c_void = ctx.arg(0);
    // SAFETY: every read is a probe read.
    unsafe { on_drop(skb as *const u8, REASON_UNREPORTED) };
    0
}

/// kprobe `sk_skb_reason_drop(sk, skb, reason)` (6.10+: `kfree_skb_reason` became a wrapper).
#[kprobe]
pub fn kp_sk_skb_reason_drop(ctx: ProbeContext) -> u32 {
    let skb: Option<*const c_void> = ctx.arg(1);
    let reason: Option<u64> = ctx.arg(2);
    if let (Some(skb), Some(reason)) = (skb, reason) {
        // SAFETY: probe reads.
        unsafe { on_drop(skb as *const u8, reason as u32) };
    }
    0
}

/// kprobe `kfree_skb_reason(skb, reason)` (5.17 to 6.9).
#[kprobe]
pub fn kp_kfree_skb_reason(ctx: ProbeContext) -> u32 {
    let skb: Option<*const c_void> = ctx.arg(0);
    let reason: Option<u64> = ctx.arg(1);
    if let (Some(skb), Some(reason)) = (skb, reason) {
        // SAFETY: probe reads.
        unsafe { on_drop(skb as *const u8, reason as u32) };
    }
    0
}

/// kprobe `kfree_skb(skb)` (before 5.17: no reason).
#[kprobe]
pub fn kp_kfree_skb(ctx: ProbeContext) -> u32 {
    if let Some(skb) = ctx.arg::<*const c_void>(0) {
        // SAFETY: probe reads.
        unsafe { on_drop(skb as *const u8, REASON_UNREPORTED) };
    }
    0
}

#[inline(always)]
unsafe fn on_drop(skb: *const u8, reason: u32) -> Option<()> {
    let off = offsets()?;
    // SKB_NOT_DROPPED_YET and SKB_CONSUMED are not drops (their values come from BTF: 6.1
    // has no SKB_CONSUMED and 1 is NOT_SPECIFIED there).
    if reason != REASON_UNREPORTED
        && (reason == off.reason_not_dropped || reason == off.reason_consumed)
    {
        return None;
    }
    let f = filter()?;
    // SAFETY: probe reads.
    unsafe {
        let flow = skb_flow(skb, off, f)?;
        bump(CNT_DROP_MATCHED);
        if !emitting(f) {
            return Some(());
        }
        let dev: *const u8 = read_at(skb, off.skb_dev).unwrap_or(core::ptr::null());
        let (ifindex, netns_ino) = device(dev, off).unwrap_or((0, 0));
        emit(
            f,
            &Event {
                ts_ns: bpf_ktime_get_ns(),
                netns_ino,
                kind: KIND_DROP,
                dir: DIR_INGRESS,
                hop_id: hop_id(netns_ino, ifindex),
                ifindex,
                skb_len: read_at(skb, off.skb_len).unwrap_or(0),
                reason,
                flow,
                ..Event::default()
            },
        );
    }
    Some(())
}

// ---- device transmit ----

/// tp_btf `net:net_dev_start_xmit(skb, dev)`.
#[btf_tracepoint(function = "net_dev_start_xmit")]
pub fn xmit_net_dev_start_xmit(ctx: BtfTracePointContext) -> i32 {
    let skb: *const c_void = ctx.arg(0);
    let dev: *const c_void = ctx.arg(1);
    // SAFETY: probe reads.
    unsafe { on_xmit(skb as *const u8, dev as *const u8) };
    0
}

/// kprobe `dev_hard_start_xmit(first, dev, txq, ret)`.
#[kprobe]
pub fn kp_dev_hard_start_xmit(ctx: ProbeContext) -> u32 {
    let skb: Option<*const c_void> = ctx.arg(0);
    let dev: Option<*const c_void> = ctx.arg(1);
    if let (Some(skb), Some(dev)) = (skb, dev) {
        // SAFETY: probe reads.
        unsafe { on_xmit(skb as *const u8, dev as *const u8) };
    }
    0
}

#[inline(always)]
unsafe fn on_xmit(skb: *const u8, dev: *const u8) -> Option<()> {
    let f = filter()?;
    // An emitting session shows a transmit only with the record a hop probe opened: while
    // no hop probe has emitted lately, no packet here can be one (count-only sessions count
    // every transmit of the conversation).
    if emitting(f) && !crate::maps::hop_lately() {
        return None;
    }
    let off = offsets()?;
    // SAFETY: probe reads.
    unsafe {
        let flow = skb_flow(skb, off, f)?;
        bump(CNT_XMIT_MATCHED);
        if !emitting(f) {
            return Some(());
        }
        let (ifindex, netns_ino) = device(dev, off)?;
        emit(
            f,
            &Event {
                ts_ns: bpf_ktime_get_ns(),
                netns_ino,
                kind: KIND_XMIT,
                dir: DIR_EGRESS,
                hop_id: hop_id(netns_ino, ifindex),
                ifindex,
                skb_len: read_at(skb, off.skb_len).unwrap_or(0),
                flow,
                ..Event::default()
            },
        );
    }
    Some(())
}

// ---- FIB lookups ----

/// tp_btf `fib:fib_table_lookup(tb_id, flp, nhc, err)`.
#[btf_tracepoint(function = "fib_table_lookup")]
pub fn fib_fib_table_lookup(ctx: BtfTracePointContext) -> i32 {
    let tb_id: u32 = ctx.arg(0);
    let flp: *const c_void = ctx.arg(1);
    let nhc: *const c_void = ctx.arg(2);
    let err: i32 = ctx.arg(3);
    // SAFETY: probe reads.
    unsafe { on_fib(tb_id, flp as *const u8, nhc as *const u8, err) };
    0
}

/// kprobe `fib_table_lookup(tb, flp, res, flags)`: push the arguments for the kretprobe.
/// Lookups nest on one CPU (a softirq's inside a process's), so each call gets its own frame.
#[kprobe]
pub fn kp_fib_table_lookup(ctx: ProbeContext) -> u32 {
    let tb: Option<u64> = ctx.arg(0);
    let flp: Option<u64> = ctx.arg(1);
    let res: Option<u64> = ctx.arg(2);
    let Some(depth) = FIB_DEPTH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's slots; programs do not nest on a CPU.
    unsafe {
        let d = *depth;
        // Out of range (too deep): the lookup finds no slot and the frame is not recorded.
        if let Some(frame) = FIB_STASH.get_ptr_mut(d) {
            *frame = [tb.unwrap_or(0), flp.unwrap_or(0), res.unwrap_or(0)];
        }
        // Counted even when too deep to record, so the returns pop the right frames.
        *depth = d.saturating_add(1);
    }
    0
}

/// kretprobe `fib_table_lookup`: the result is known now; pop this call's frame.
#[kretprobe]
pub fn kp_fib_table_lookup_ret(ctx: RetProbeContext) -> u32 {
    let err: i64 = ctx.ret();
    let Some(depth) = FIB_DEPTH.get_ptr_mut(0) else {
        return 0;
    };
    let Some(off) = offsets() else { return 0 };
    // SAFETY: this CPU's slots, then probe reads.
    unsafe {
        let d = *depth;
        if d == 0 {
            // A return whose entry was not seen (attached in between).
            return 0;
        }
        let d = d - 1;
        *depth = d;
        let Some(frame) = FIB_STASH.get_ptr_mut(d) else {
            return 0;
        };
        let [tb, flp, res] = *frame;
        if flp == 0 {
            return 0;
        }
        let tb_id: u32 = read_at(tb as *const u8, off.fib_table_id).unwrap_or(0);
        let nhc: *const u8 = if err == 0 {
            read_at(res as *const u8, off.fib_result_nhc).unwrap_or(core::ptr::null())
        } else {
            core::ptr::null()
        };
        on_fib(tb_id, flp as *const u8, nhc, err as i32);
    }
    0
}

#[inline(always)]
unsafe fn on_fib(tb_id: u32, flp: *const u8, nhc: *const u8, err: i32) -> Option<()> {
    let f = filter()?;
    let off = offsets()?;
    // SAFETY: probe reads.
    unsafe {
        let proto: u8 = read_at(flp, off.flowi4_proto)?;
        // A forwarded packet's lookup (no protocol: `ip_route_input_slow` clears it) comes
        // after the packet passed a hop probe of this node, which emitted it: while no hop
        // probe has emitted lately, none is the conversation's (count-only sessions count
        // every lookup of the conversation). Most lookups on a busy node are forwarded ones,
        // so this spares them the other reads.
        if proto == 0 && emitting(f) && !crate::maps::hop_lately() {
            return None;
        }
        // `saddr`, `daddr` and the ports follow each other in `struct flowi4`: one read.
        let (saddr, daddr, p) = if off.flowi4_daddr == off.flowi4_saddr + 4
            && off.flowi4_ports == off.flowi4_saddr + 8
        {
            let [s, d, p]: [u32; 3] = read_at(flp, off.flowi4_saddr)?;
            (s, d, Some(p.to_ne_bytes()))
        } else {
            let s = read_at(flp, off.flowi4_saddr)?;
            let d = read_at(flp, off.flowi4_daddr)?;
            let p = if proto == 6 || proto == 17 {
                read_at::<[u8; 4]>(flp, off.flowi4_ports)
            } else {
                None
            };
            (s, d, p)
        };
        let flow = FlowInfo {
            saddr,
            daddr,
            proto,
            ..FlowInfo::default()
        };
        // Route lookups carry no IP id; TCP/UDP ones carry ports.
        let ports = match p {
            Some(p) if proto == 6 || proto == 17 => Some((
                u16::from_be_bytes([p[2], p[3]]),
                u16::from_be_bytes([p[0], p[1]]),
            )),
            _ => None,
        };
        if !crate::packet::fib_match(f, flow.saddr, flow.daddr, flow.proto, ports) {
            return None;
        }
        // A forwarded packet's lookup has no protocol and no ports: with a protocol or a
        // port in the filter, only address pairs the hop probes saw traced packets between.
        if flow.proto == 0
            && (f.proto != 0 || f.port != 0)
            && !crate::maps::recent(flow.saddr, flow.daddr)
        {
            return None;
        }
        bump(CNT_FIB_MATCHED);
        if !emitting(f) {
            return Some(());
        }
        let (mut oif, mut netns_ino, mut gw) = (0, 0, 0);
        if !nhc.is_null() {
            let dev: *const u8 = read_at(nhc, off.nhc_dev).unwrap_or(core::ptr::null());
            if let Some((i, n)) = device(dev, off) {
                oif = i;
                netns_ino = n;
            }
            gw = read_at(nhc, off.nhc_gw).unwrap_or(0);
        }
        emit(
            f,
            &Event {
                ts_ns: bpf_ktime_get_ns(),
                netns_ino,
                kind: KIND_FIB,
                dir: DIR_EGRESS,
                hop_id: u32::MAX,
                ifindex: oif,
                reason: err as u32,
                aux: tb_id,
                aux2: oif,
                aux3: gw,
                flow,
                ..Event::default()
            },
        );
    }
    Some(())
}
