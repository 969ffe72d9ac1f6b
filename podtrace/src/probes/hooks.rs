//! Which kernel hooks give podtrace its kernel-side evidence (drops, FIB lookups, device
//! transmit), decided at run time per hook from the kernel's BTF, and reported.
//!
//! The default is the BTF tracepoint (tp_btf) wherever the kernel has it: it is the cheapest
//! hook (a direct call, no breakpoint or trampoline), it sits exactly where the kernel reports
//! the event, and podtrace needs BTF anyway. kprobes are the fallback for a tracepoint the
//! kernel lacks, and can be forced (`--hooks kprobe`) to check one against the other: both
//! report the same evidence. (Raw tracepoints would add nothing: they need the same
//! tracepoints, and BTF is required for the structure offsets in any case.)
use std::{collections::BTreeSet, path::Path};

use serde::{Deserialize, Serialize};

use super::btf::Btf;

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

    fn label(self) -> &'static str {
        match self {
            Evidence::Drop => "drops",
            Evidence::Fib => "fib",
            Evidence::Xmit => "xmit",
        }
    }
}

/// A hook mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mechanism {
    Kprobe,
    TpBtf,
}

impl Mechanism {
    /// `--hooks kprobe|tracepoint` (`tp_btf` is accepted too).
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "kprobe" | "kprobes" => Ok(Mechanism::Kprobe),
            "tracepoint" | "tracepoints" | "tp_btf" => Ok(Mechanism::TpBtf),
            _ => Err(format!("{s:?} is not one of kprobe, tracepoint")),
        }
    }
}

/// Which mechanisms the running kernel offers at all (what an agent reports about its node).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelSupport {
    /// The kprobe PMU exists (CONFIG_KPROBES with perf events).
    pub kprobes: bool,
    /// BTF is there for tp_btf programs.
    pub tp_btf: bool,
}

impl KernelSupport {
    pub fn detect() -> Self {
        Self {
            kprobes: Path::new("/sys/bus/event_source/devices/kprobe/type").exists(),
            tp_btf: Path::new("/sys/kernel/btf/vmlinux").exists(),
        }
    }
}

/// What the running kernel offers, as far as the hooks go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelFacts {
    /// The kprobe PMU exists (CONFIG_KPROBES with perf events).
    pub kprobes: bool,
    /// Tracepoints with their argument counts (`btf_trace_*` in BTF).
    pub tracepoints: Vec<(String, u32)>,
    /// Kernel functions BTF describes (of those the kprobe flavours may go on).
    pub functions: BTreeSet<String>,
}

/// The kernel functions and tracepoints the hooks may use.
const TRACEPOINTS: [&str; 3] = ["kfree_skb", "fib_table_lookup", "net_dev_start_xmit"];
const FUNCTIONS: [&str; 5] = [
    "sk_skb_reason_drop",
    "kfree_skb_reason",
    "kfree_skb",
    "fib_table_lookup",
    "dev_hard_start_xmit",
];

impl KernelFacts {
    /// Reads them off the running kernel (`btf`: its BTF).
    pub fn detect(btf: &Btf) -> Self {
        Self::from_btf(btf, Path::new("/"))
    }

    /// As [`KernelFacts::detect`], with sysfs under another root (tests).
    pub fn from_btf(btf: &Btf, root: &Path) -> Self {
        Self {
            kprobes: root
                .join("sys/bus/event_source/devices/kprobe/type")
                .exists(),
            tracepoints: TRACEPOINTS
                .iter()
                .filter_map(|t| btf.tracepoint_args(t).map(|n| (t.to_string(), n)))
                .collect(),
            functions: FUNCTIONS
                .iter()
                .filter(|f| btf.function_params(f).is_some())
                .map(|f| f.to_string())
                .collect(),
        }
    }

    fn tracepoint_args(&self, name: &str) -> Option<u32> {
        self.tracepoints
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
    }

    fn has(&self, function: &str) -> bool {
        self.functions.contains(function)
    }
}

/// One way to get one kind of evidence on this kernel: the programs and where they go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variant {
    pub mechanism: Mechanism,
    /// (program name in the object, tracepoint or kernel function).
    pub programs: &'static [(&'static str, &'static str)],
    /// Whether drops come with the kernel's reason.
    pub drop_reason: bool,
}

impl Variant {
    /// `tp_btf:kfree_skb`, `kprobe:kfree_skb_reason`.
    pub fn describe(&self) -> String {
        let kind = match self.mechanism {
            Mechanism::Kprobe => "kprobe",
            Mechanism::TpBtf => "tp_btf",
        };
        format!("{kind}:{}", self.programs[0].1)
    }
}

/// The variant of `mechanism` for `evidence` this kernel supports, or why there is none.
pub fn variant(
    facts: &KernelFacts,
    evidence: Evidence,
    mechanism: Mechanism,
) -> Result<Variant, String> {
    let v = |programs, drop_reason| {
        Ok(Variant {
            mechanism,
            programs,
            drop_reason,
        })
    };
    match (mechanism, evidence) {
        (Mechanism::TpBtf, e) => {
            let tp = match e {
                Evidence::Drop => "kfree_skb",
                Evidence::Fib => "fib_table_lookup",
                Evidence::Xmit => "net_dev_start_xmit",
            };
            let Some(args) = facts.tracepoint_args(tp) else {
                return Err(format!("this kernel has no tracepoint {tp} in its BTF"));
            };
            match (e, args) {
                (Evidence::Drop, a) if a >= 3 => v(&[("drop_kfree_skb", "kfree_skb")], true),
                (Evidence::Drop, 2) => v(&[("drop_kfree_skb_noreason", "kfree_skb")], false),
                (Evidence::Fib, 4) => v(&[("fib_fib_table_lookup", "fib_table_lookup")], false),
                (Evidence::Xmit, 2) => {
                    v(&[("xmit_net_dev_start_xmit", "net_dev_start_xmit")], false)
                }
                (_, a) => Err(format!(
                    "tracepoint {tp} has {a} arguments here, which podtrace does not know"
                )),
            }
        }
        (Mechanism::Kprobe, _) if !facts.kprobes => Err("this kernel has no kprobes".into()),
        (Mechanism::Kprobe, Evidence::Drop) => {
            if facts.has("sk_skb_reason_drop") {
                v(&[("kp_sk_skb_reason_drop", "sk_skb_reason_drop")], true)
            } else if facts.has("kfree_skb_reason") {
                v(&[("kp_kfree_skb_reason", "kfree_skb_reason")], true)
            } else if facts.has("kfree_skb") {
                v(&[("kp_kfree_skb", "kfree_skb")], false)
            } else {
                Err("none of sk_skb_reason_drop, kfree_skb_reason, kfree_skb is in BTF".into())
            }
        }
        (Mechanism::Kprobe, Evidence::Fib) if facts.has("fib_table_lookup") => v(
            &[
                ("kp_fib_table_lookup", "fib_table_lookup"),
                ("kp_fib_table_lookup_ret", "fib_table_lookup"),
            ],
            false,
        ),
        (Mechanism::Kprobe, Evidence::Xmit) if facts.has("dev_hard_start_xmit") => {
            v(&[("kp_dev_hard_start_xmit", "dev_hard_start_xmit")], false)
        }
        (Mechanism::Kprobe, e) => Err(format!(
            "the kernel function for {} is not in BTF",
            e.label()
        )),
    }
}

/// The order in which mechanisms are tried: tp_btf, then kprobes; or only the forced one.
pub fn preference(forced: Option<Mechanism>) -> Vec<Mechanism> {
    match forced {
        Some(m) => vec![m],
        None => vec![Mechanism::TpBtf, Mechanism::Kprobe],
    }
}

/// The variants to try for `evidence`, in order, and the reasons others were passed over.
pub fn plan(
    facts: &KernelFacts,
    evidence: Evidence,
    forced: Option<Mechanism>,
) -> (Vec<Variant>, Vec<String>) {
    let mut out = Vec::new();
    let mut notes = Vec::new();
    for m in preference(forced) {
        match variant(facts, evidence, m) {
            Ok(v) => out.push(v),
            Err(e) => notes.push(e),
        }
    }
    (out, notes)
}

/// What was attached for one evidence kind, or why nothing was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookReport {
    pub evidence: Evidence,
    pub mechanism: Option<Mechanism>,
    /// `kprobe:kfree_skb_reason`, `tp_btf:kfree_skb`.
    pub attached: Option<String>,
    /// Drops only: whether they come with the kernel's drop reason (5.17+).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_reason: Option<bool>,
    /// Why an earlier choice was passed over, or why nothing could attach.
    pub notes: Vec<String>,
    /// Attached only while the conversation is active: detached after
    /// [`super::idle::IDLE_AFTER`] without a packet of it, back at its next one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub idle_detach: bool,
}

impl HookReport {
    pub fn summary(&self) -> String {
        let what = self.evidence.label();
        match &self.attached {
            Some(a) if self.drop_reason == Some(false) => {
                format!("{what} via {a} (this kernel reports no drop reasons: 5.17+ does)")
            }
            Some(a) if self.idle_detach => format!(
                "{what} via {a} (off after {} s without a packet)",
                super::idle::IDLE_AFTER.as_secs()
            ),
            Some(a) => format!("{what} via {a}"),
            None => format!("{what}: none ({})", self.notes.join("; ")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(kprobes: bool, kfree_args: Option<u32>, functions: &[&str]) -> KernelFacts {
        let mut tracepoints = vec![
            ("fib_table_lookup".to_owned(), 4),
            ("net_dev_start_xmit".to_owned(), 2),
        ];
        if let Some(a) = kfree_args {
            tracepoints.push(("kfree_skb".to_owned(), a));
        }
        KernelFacts {
            kprobes,
            tracepoints,
            functions: functions.iter().map(|f| f.to_string()).collect(),
        }
    }

    /// Debian 11's 5.10: kfree_skb(skb, location), kprobes, no kfree_skb_reason.
    fn k510() -> KernelFacts {
        facts(
            true,
            Some(2),
            &["kfree_skb", "fib_table_lookup", "dev_hard_start_xmit"],
        )
    }

    /// 6.1: kfree_skb(skb, location, reason), kfree_skb_reason.
    fn k61() -> KernelFacts {
        facts(
            true,
            Some(3),
            &[
                "kfree_skb_reason",
                "fib_table_lookup",
                "dev_hard_start_xmit",
            ],
        )
    }

    /// 6.12: kfree_skb(skb, location, reason, rx_sk), sk_skb_reason_drop.
    fn k612() -> KernelFacts {
        facts(
            true,
            Some(4),
            &[
                "sk_skb_reason_drop",
                "fib_table_lookup",
                "dev_hard_start_xmit",
            ],
        )
    }

    #[test]
    fn tracepoints_first() {
        for k in [k510(), k61(), k612()] {
            for e in Evidence::ALL {
                let (vs, _) = plan(&k, e, None);
                assert_eq!(vs[0].mechanism, Mechanism::TpBtf, "{e:?}");
                assert_eq!(vs[1].mechanism, Mechanism::Kprobe, "{e:?}");
            }
        }
    }

    #[test]
    fn drop_variants_follow_the_kernel() {
        let tp = |k: &KernelFacts| variant(k, Evidence::Drop, Mechanism::TpBtf).unwrap();
        let kp = |k: &KernelFacts| variant(k, Evidence::Drop, Mechanism::Kprobe).unwrap();
        assert_eq!(tp(&k510()).programs[0].0, "drop_kfree_skb_noreason");
        assert!(!tp(&k510()).drop_reason);
        assert_eq!(tp(&k61()).programs[0].0, "drop_kfree_skb");
        assert!(tp(&k61()).drop_reason);
        assert_eq!(tp(&k612()).programs[0].0, "drop_kfree_skb");
        assert_eq!(kp(&k510()).describe(), "kprobe:kfree_skb");
        assert!(!kp(&k510()).drop_reason);
        assert_eq!(kp(&k61()).describe(), "kprobe:kfree_skb_reason");
        assert_eq!(kp(&k612()).describe(), "kprobe:sk_skb_reason_drop");
        assert!(kp(&k612()).drop_reason);
    }

    #[test]
    fn forcing_gives_only_that_mechanism() {
        let (vs, notes) = plan(&k61(), Evidence::Fib, Some(Mechanism::Kprobe));
        assert_eq!(vs.len(), 1);
        assert_eq!(vs[0].programs.len(), 2, "kprobe and kretprobe");
        assert!(notes.is_empty());
        let no_kprobes = facts(false, Some(4), &["fib_table_lookup"]);
        let (vs, notes) = plan(&no_kprobes, Evidence::Fib, Some(Mechanism::Kprobe));
        assert!(vs.is_empty());
        assert_eq!(notes, vec!["this kernel has no kprobes".to_owned()]);
    }

    #[test]
    fn a_missing_tracepoint_falls_back_to_kprobes() {
        let k = facts(true, None, &["kfree_skb_reason"]);
        let (vs, notes) = plan(&k, Evidence::Drop, None);
        assert_eq!(vs.len(), 1);
        assert_eq!(vs[0].mechanism, Mechanism::Kprobe);
        assert!(notes[0].contains("no tracepoint kfree_skb"), "{notes:?}");
    }

    #[test]
    fn unknown_argument_counts_are_refused() {
        let mut k = facts(false, Some(1), &[]);
        let err = variant(&k, Evidence::Drop, Mechanism::TpBtf).unwrap_err();
        assert!(err.contains("1 arguments"), "{err}");
        k.tracepoints[0].1 = 5;
        let err = variant(&k, Evidence::Fib, Mechanism::TpBtf).unwrap_err();
        assert!(err.contains("5 arguments"), "{err}");
        // kfree_skb has grown arguments after the reason (rx_sk in 6.10): still fine.
        let k = facts(false, Some(5), &[]);
        assert!(
            variant(&k, Evidence::Drop, Mechanism::TpBtf)
                .unwrap()
                .drop_reason
        );
    }

    #[test]
    fn hooks_parse() {
        assert_eq!(Mechanism::parse("kprobe"), Ok(Mechanism::Kprobe));
        assert_eq!(Mechanism::parse("tracepoint"), Ok(Mechanism::TpBtf));
        assert!(Mechanism::parse("fentry").is_err());
    }

    #[test]
    fn detection_reads_the_running_kernel() {
        let Ok(btf) = Btf::from_sys_fs() else {
            eprintln!("no /sys/kernel/btf/vmlinux: skipped");
            return;
        };
        let f = KernelFacts::detect(&btf);
        assert!(f.tracepoint_args("kfree_skb").is_some());
        for e in Evidence::ALL {
            variant(&f, e, Mechanism::TpBtf).unwrap();
        }
    }
}
