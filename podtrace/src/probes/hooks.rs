//! Which kernel hooks give podtrace its kernel-side evidence (drops, FIB lookups, device
//! transmit): kprobes where the kernel has them (production kernels: EKS, Ubuntu), BTF
//! tracepoints otherwise. Decided at run time, per hook, and reported.
use std::path::Path;

use serde::{Deserialize, Serialize};

/// A kind of evidence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Evidence {
    Drop,
    Fib,
    Xmit,
}

impl Evidence {
    pub const ALL: [Evidence; 3] = [Evidence::Drop, Evidence::Fib, Evidence::Xmit];

    /// The tp_btf program and its tracepoint.
    pub fn tracepoint(self) -> (&'static str, &'static str) {
        match self {
            Evidence::Drop => ("drop_kfree_skb", "kfree_skb"),
            Evidence::Fib => ("fib_fib_table_lookup", "fib_table_lookup"),
            Evidence::Xmit => ("xmit_net_dev_start_xmit", "net_dev_start_xmit"),
        }
    }

    /// The kprobe programs, each with the kernel function it goes on (and whether it is a
    /// kretprobe).
    pub fn kprobes(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Evidence::Drop => &[("kp_kfree_skb_reason", "kfree_skb_reason")],
            Evidence::Fib => &[
                ("kp_fib_table_lookup", "fib_table_lookup"),
                ("kp_fib_table_lookup_ret", "fib_table_lookup"),
            ],
            Evidence::Xmit => &[("kp_dev_hard_start_xmit", "dev_hard_start_xmit")],
        }
    }
}

/// The mechanism chosen for one kind of evidence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mechanism {
    Kprobe,
    TpBtf,
}

/// What the running kernel offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelSupport {
    /// The kprobe PMU exists (CONFIG_KPROBES with perf events).
    pub kprobes: bool,
    /// BTF is there for tp_btf programs.
    pub tp_btf: bool,
}

impl KernelSupport {
    /// Reads it off the running kernel.
    pub fn detect() -> Self {
        Self::detect_in(Path::new("/"))
    }

    /// As [`KernelSupport::detect`], under another root (tests).
    pub fn detect_in(root: &Path) -> Self {
        Self {
            kprobes: root
                .join("sys/bus/event_source/devices/kprobe/type")
                .exists(),
            tp_btf: root.join("sys/kernel/btf/vmlinux").exists(),
        }
    }
}

/// The order in which mechanisms are tried for each evidence kind: kprobes first when the
/// kernel has them (they reach kernels whose tracepoints lack BTF), then tp_btf. Empty when
/// neither is available.
pub fn preference(support: KernelSupport, forced: Option<Mechanism>) -> Vec<Mechanism> {
    let available = |m: Mechanism| match m {
        Mechanism::Kprobe => support.kprobes,
        Mechanism::TpBtf => support.tp_btf,
    };
    match forced {
        Some(m) if available(m) => vec![m],
        Some(_) => Vec::new(),
        None => [Mechanism::Kprobe, Mechanism::TpBtf]
            .into_iter()
            .filter(|m| available(*m))
            .collect(),
    }
}

/// What was attached for one evidence kind, or why nothing was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookReport {
    pub evidence: Evidence,
    pub mechanism: Option<Mechanism>,
    /// `kprobe:kfree_skb_reason`, `tp_btf:kfree_skb`.
    pub attached: Option<String>,
    /// Why an earlier choice was passed over, or why nothing could attach.
    pub notes: Vec<String>,
}

impl HookReport {
    pub fn summary(&self) -> String {
        let what = match self.evidence {
            Evidence::Drop => "drops",
            Evidence::Fib => "fib",
            Evidence::Xmit => "xmit",
        };
        match &self.attached {
            Some(a) => format!("{what} via {a}"),
            None => format!("{what}: none ({})", self.notes.join("; ")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kprobes_first_when_the_kernel_has_them() {
        let both = KernelSupport {
            kprobes: true,
            tp_btf: true,
        };
        assert_eq!(
            preference(both, None),
            vec![Mechanism::Kprobe, Mechanism::TpBtf]
        );
    }

    #[test]
    fn tracepoints_when_kprobes_are_missing() {
        let no_kprobes = KernelSupport {
            kprobes: false,
            tp_btf: true,
        };
        assert_eq!(preference(no_kprobes, None), vec![Mechanism::TpBtf]);
        assert_eq!(preference(no_kprobes, Some(Mechanism::Kprobe)), vec![]);
        assert_eq!(
            preference(no_kprobes, Some(Mechanism::TpBtf)),
            vec![Mechanism::TpBtf]
        );
    }

    #[test]
    fn nothing_without_either() {
        let none = KernelSupport {
            kprobes: false,
            tp_btf: false,
        };
        assert!(preference(none, None).is_empty());
    }

    #[test]
    fn detection_reads_sysfs() {
        let dir = std::env::temp_dir().join(format!("podtrace-hooks-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sys/bus/event_source/devices/kprobe")).unwrap();
        std::fs::write(dir.join("sys/bus/event_source/devices/kprobe/type"), "6").unwrap();
        let s = KernelSupport::detect_in(&dir);
        assert!(s.kprobes);
        assert!(!s.tp_btf);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_evidence_has_both_flavours() {
        for e in Evidence::ALL {
            assert!(!e.kprobes().is_empty());
            assert!(!e.tracepoint().0.is_empty());
        }
    }
}
