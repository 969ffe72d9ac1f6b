//! Kernel-side evidence: where and why a traced packet was dropped (`kfree_skb`), which FIB
//! lookup routed it (`fib_table_lookup`) and which device transmitted it (`net_dev_start_xmit`).
//!
//! Each comes in two flavours, chosen by userspace at run time: BTF tracepoints (tp_btf), and
//! kprobes on the functions behind them (`kfree_skb_reason`, `fib_table_lookup` with its
//! kretprobe, `dev_hard_start_xmit`) for kernels that have kprobes. Both share the code below.
use core::ffi::c_void;

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{btf_tracepoint, kprobe, kretprobe},
    programs::{BtfTracePointContext, ProbeContext, RetProbeContext},
};
use podtrace_abi::{
    Event, FlowInfo, KernelOffsets, CNT_DROP_MATCHED, CNT_FIB_MATCHED, CNT_XMIT_MATCHED,
    DIR_EGRESS, DIR_INGRESS, FILTER_EMIT, KIND_DROP, KIND_FIB, KIND_XMIT,
};

use crate::{
    maps::{bump, emit, filter, hop_id, FIB_STASH, OFFSETS},
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
        let head: *const u8 = read_at(skb, off.skb_head)?;
        let nh: u16 = read_at(skb, off.skb_network_header)?;
        if nh == u16::MAX {
            return None;
        }
        parse_ipv4(&KernelReader(head.wrapping_add(nh as usize)), 0, f)
    }
}

/// `(dev->ifindex, dev_net(dev)->net_cookie)`.
#[inline(always)]
unsafe fn device(dev: *const u8, off: &KernelOffsets) -> Option<(u32, u64)> {
    if dev.is_null() {
        return None;
    }
    // SAFETY: probe reads.
    unsafe {
        let ifindex: u32 = read_at(dev, off.dev_ifindex)?;
        let net: *const u8 = read_at(dev, off.dev_nd_net)?;
        let cookie: u64 = if net.is_null() {
            0
        } else {
            read_at(net, off.net_cookie)?
        };
        Some((ifindex, cookie))
    }
}

// ---- drops ----

/// tp_btf `skb:kfree_skb(skb, location, reason, rx_sk)`.
#[btf_tracepoint(function = "kfree_skb")]
pub fn drop_kfree_skb(ctx: BtfTracePointContext) -> i32 {
    let skb: *const c_void = ctx.arg(0);
    let reason: u32 = ctx.arg(2);
    // SAFETY: every read is a probe read.
    unsafe { on_drop(skb as *const u8, reason) };
    0
}

/// kprobe `kfree_skb_reason(skb, reason)` (kernels with kprobes).
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

#[inline(always)]
unsafe fn on_drop(skb: *const u8, reason: u32) -> Option<()> {
    // SKB_NOT_DROPPED_YET (0) and SKB_CONSUMED (1) are not drops.
    if reason < 2 {
        return None;
    }
    let f = filter()?;
    let off = offsets()?;
    // SAFETY: probe reads.
    unsafe {
        let flow = skb_flow(skb, off, f)?;
        bump(CNT_DROP_MATCHED);
        if f.flags & FILTER_EMIT == 0 {
            return Some(());
        }
        let dev: *const u8 = read_at(skb, off.skb_dev).unwrap_or(core::ptr::null());
        let (ifindex, netns_cookie) = device(dev, off).unwrap_or((0, 0));
        emit(&Event {
            ts_ns: bpf_ktime_get_ns(),
            netns_cookie,
            kind: KIND_DROP,
            dir: DIR_INGRESS,
            hop_id: hop_id(netns_cookie, ifindex),
            ifindex,
            skb_len: read_at(skb, off.skb_len).unwrap_or(0),
            reason,
            flow,
            ..Event::default()
        });
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
    let off = offsets()?;
    // SAFETY: probe reads.
    unsafe {
        let flow = skb_flow(skb, off, f)?;
        bump(CNT_XMIT_MATCHED);
        if f.flags & FILTER_EMIT == 0 {
            return Some(());
        }
        let (ifindex, netns_cookie) = device(dev, off)?;
        emit(&Event {
            ts_ns: bpf_ktime_get_ns(),
            netns_cookie,
            kind: KIND_XMIT,
            dir: DIR_EGRESS,
            hop_id: hop_id(netns_cookie, ifindex),
            ifindex,
            skb_len: read_at(skb, off.skb_len).unwrap_or(0),
            flow,
            ..Event::default()
        });
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

/// kprobe `fib_table_lookup(tb, flp, res, flags)`: stash the arguments for the kretprobe.
#[kprobe]
pub fn kp_fib_table_lookup(ctx: ProbeContext) -> u32 {
    let tb: Option<u64> = ctx.arg(0);
    let flp: Option<u64> = ctx.arg(1);
    let res: Option<u64> = ctx.arg(2);
    if let (Some(tb), Some(flp), Some(res), Some(stash)) = (tb, flp, res, FIB_STASH.get_ptr_mut(0))
    {
        // SAFETY: this CPU's slot.
        unsafe { *stash = [tb, flp, res] };
    }
    0
}

/// kretprobe `fib_table_lookup`: the result is known now.
#[kretprobe]
pub fn kp_fib_table_lookup_ret(ctx: RetProbeContext) -> u32 {
    let err: i64 = ctx.ret();
    let Some(stash) = FIB_STASH.get_ptr_mut(0) else {
        return 0;
    };
    let Some(off) = offsets() else { return 0 };
    // SAFETY: this CPU's slot, then probe reads.
    unsafe {
        let [tb, flp, res] = *stash;
        *stash = [0; 3];
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
        let flow = FlowInfo {
            saddr: read_at(flp, off.flowi4_saddr)?,
            daddr: read_at(flp, off.flowi4_daddr)?,
            proto: read_at(flp, off.flowi4_proto)?,
            ..FlowInfo::default()
        };
        // Route lookups carry no IP id; TCP/UDP ones carry ports.
        let ports = if flow.proto == 6 || flow.proto == 17 {
            read_at::<[u8; 4]>(flp, off.flowi4_ports).map(|p| {
                (
                    u16::from_be_bytes([p[2], p[3]]),
                    u16::from_be_bytes([p[0], p[1]]),
                )
            })
        } else {
            None
        };
        if !crate::packet::fib_match(f, flow.saddr, flow.daddr, flow.proto, ports) {
            return None;
        }
        bump(CNT_FIB_MATCHED);
        if f.flags & FILTER_EMIT == 0 {
            return Some(());
        }
        let (mut oif, mut cookie, mut gw) = (0, 0, 0);
        if !nhc.is_null() {
            let dev: *const u8 = read_at(nhc, off.nhc_dev).unwrap_or(core::ptr::null());
            if let Some((i, c)) = device(dev, off) {
                oif = i;
                cookie = c;
            }
            gw = read_at(nhc, off.nhc_gw).unwrap_or(0);
        }
        emit(&Event {
            ts_ns: bpf_ktime_get_ns(),
            netns_cookie: cookie,
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
        });
    }
    Some(())
}
