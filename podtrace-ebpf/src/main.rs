//! podtrace's eBPF programs. One data path, as in pwru: filter → track → emit.
//!
//! - `hop_ingress` / `hop_egress` (tc, TCX or clsact): on every interface of the pod's path,
//!   stubs that hand the packet, with their interface's network namespace and direction, to
//!   the shared hop program `track` (a tail call through `HOP_WORK`). It parses the packet
//!   (looking inside VXLAN), applies the `FILTER` (the conversation, its translated forms, a
//!   capture expression's necessary conditions) and emits an [`Event`] to `EVENTS` — with the
//!   packet's bytes loaded straight into the ring buffer in capture sessions —, waking the
//!   reader only once enough waits. No program changes or drops a packet: each hands it on to
//!   the next program (`TC_ACT_UNSPEC` / `TCX_NEXT`).
//! - drops (`skb:kfree_skb`), FIB lookups and device transmits, through tp_btf or kprobes:
//!   the kernel-side evidence about the same packets.
//!
//! Maps and the event layout are in `podtrace-abi`, shared with userspace.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod hop;
#[cfg(target_arch = "bpf")]
mod kernel;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod packet;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

/// Built for the host (clippy, `cargo check --workspace`) this crate is empty; the programs
/// exist only for the BPF target, which podtrace's build.rs builds.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
