//! Kernel-side evidence through BTF tracepoints: where and why a traced packet was dropped.
use core::ffi::c_void;

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use podtrace_abi::{Event, KernelOffsets, CNT_DROP_MATCHED, DIR_INGRESS, FILTER_EMIT, KIND_DROP};

use crate::{
    maps::{bump, emit, filter, hop_id, OFFSETS},
    packet::{matches, parse_ipv4, Reader},
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

/// `skb:kfree_skb(skb, location, reason, rx_sk)`.
#[btf_tracepoint(function = "kfree_skb")]
pub fn drop_kfree_skb(ctx: BtfTracePointContext) -> i32 {
    let skb: *const c_void = ctx.arg(0);
    let reason: u32 = ctx.arg(2);
    // SKB_NOT_DROPPED_YET (0) and SKB_CONSUMED (1) are not drops.
    if reason < 2 {
        return 0;
    }
    // SAFETY: every read below is a probe read.
    unsafe { on_drop(skb as *const u8, reason) };
    0
}

#[inline(always)]
unsafe fn on_drop(skb: *const u8, reason: u32) -> Option<()> {
    let f = filter()?;
    let off: &KernelOffsets = OFFSETS.get(0)?;
    if off.valid == 0 {
        return None;
    }
    // SAFETY: probe reads.
    unsafe {
        let head: *const u8 = read_at(skb, off.skb_head)?;
        let nh: u16 = read_at(skb, off.skb_network_header)?;
        if nh == u16::MAX {
            return None;
        }
        let flow = parse_ipv4(&KernelReader(head.wrapping_add(nh as usize)), 0, f.vxlan_port)?;
        if !matches(f, &flow) {
            return None;
        }
        bump(CNT_DROP_MATCHED);
        let (ifindex, netns_cookie) = device_of(skb, off).unwrap_or((0, 0));
        if f.flags & FILTER_EMIT == 0 {
            return Some(());
        }
        let ev = Event {
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
        };
        emit(&ev);
    }
    Some(())
}

/// `(skb->dev->ifindex, dev_net(skb->dev)->net_cookie)`.
#[inline(always)]
unsafe fn device_of(skb: *const u8, off: &KernelOffsets) -> Option<(u32, u64)> {
    // SAFETY: probe reads.
    unsafe {
        let dev: *const u8 = read_at(skb, off.skb_dev)?;
        if dev.is_null() {
            return None;
        }
        let ifindex: u32 = read_at(dev, off.dev_ifindex)?;
        let net: *const u8 = read_at(dev, off.dev_nd_net)?;
        let cookie: u64 = if net.is_null() { 0 } else { read_at(net, off.net_cookie)? };
        Some((ifindex, cookie))
    }
}
