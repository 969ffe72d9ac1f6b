//! A panic inside podtrace, on the main thread or another one, made on purpose with
//! `PODTRACE_FAULT` (podtrace/src/fault.rs): the user sees one line saying it is an internal
//! error and how to report it, podtrace exits with status 2, nothing stays attached, and the
//! capture file written so far is complete (tshark reads it).
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use podtrace_tests::{podtrace_bin, Lab, Running};

/// Whatever the test runner's environment says (RUST_BACKTRACE=1 is common).
const NO_BACKTRACE: (&str, &str) = ("RUST_BACKTRACE", "0");

/// Removes a scratch directory on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(tag: &str) -> Scratch {
    let p = std::env::temp_dir().join(format!("podtrace-rel-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    Scratch(p)
}

/// The tc programs (TCX or clsact) on an interface of a lab namespace, both directions.
fn tc_programs(lab: &Lab, ns: &str, ifname: &str) -> String {
    podtrace_tests::tc_programs_in(&lab.netns(ns), ifname)
}

fn nothing_attached(lab: &Lab) {
    for (ns, ifname) in [
        ("pod-a1", "eth0"),
        ("node-a", "cni0"),
        ("node-a", "flannel.1"),
        ("node-a", "eth0"),
        ("node-b", "eth0"),
        ("pod-b1", "eth0"),
    ] {
        let progs = tc_programs(lab, ns, ifname);
        assert!(!progs.contains("hop_"), "{ns}/{ifname} still has: {progs}");
    }
}

/// The one line of an internal error, and nothing of Rust's own panic report.
fn one_internal_error(stderr: &str, fault: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("internal error"))
        .collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    let line = lines[0];
    assert!(
        line.starts_with("podtrace: internal error (a bug in podtrace): ")
            && line.contains(&format!("injected fault at {fault}"))
            && line.contains("RUST_BACKTRACE=1"),
        "{line}"
    );
    for noise in ["panicked at", "stack backtrace", "note: run with"] {
        assert!(!stderr.contains(noise), "{stderr}");
    }
    line.to_string()
}

fn tshark_packets(file: &Path) -> usize {
    let out = Command::new("tshark")
        .arg("-r")
        .arg(file)
        .args(["-T", "fields", "-e", "frame.number"])
        .output()
        .expect("tshark");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("appears to be") && !stderr.contains("cut short"),
        "tshark {}: {stderr}",
        file.display()
    );
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// Runs podtrace to its end with one extra environment variable; (status, stderr).
fn run_with(env: &[(&str, &str)], args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(podtrace_bin())
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("running podtrace");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_panic_is_one_line_exit_2_probes_detached_files_complete() {
    let lab = Lab::up("rpan", "flannel");
    let dir = scratch("panic");

    // On the main thread, while capturing: after the 5th packet written.
    let file = dir.0.join("main.pcapng");
    let run = Running::start_with_env(
        &[
            "capture",
            "pod-a1",
            "--dst",
            "10.244.1.5",
            "-w",
            file.to_str().unwrap(),
            "--lab",
            &lab.prefix,
        ],
        &[("PODTRACE_FAULT", "capture-packet:5"), NO_BACKTRACE],
    );
    let pid = run.pid();
    lab.exec("pod-a1", &["ping", "-c", "3", "-i", "0.2", "10.244.1.5"]);
    let (code, _, stderr) = run.wait(20);
    assert_eq!(code, Some(2), "{stderr}");
    let line = one_internal_error(&stderr, "capture-packet");
    assert!(!line.contains("thread"), "on the main thread: {line}");
    assert_eq!(
        tshark_packets(&file),
        5,
        "the packets written before the panic"
    );
    nothing_attached(&lab);
    let pins: Vec<String> = std::fs::read_dir("/sys/fs/bpf")
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("podtrace-{pid}-")))
                .collect()
        })
        .unwrap_or_default();
    assert!(pins.is_empty(), "{pins:?}");

    // On another thread, with every probe attached; carried to the main thread.
    let file = dir.0.join("thread.pcapng");
    let (code, stderr) = run_with(
        &[("PODTRACE_FAULT", "capture-attached"), NO_BACKTRACE],
        &[
            "capture",
            "pod-a1",
            "-w",
            file.to_str().unwrap(),
            "--lab",
            &lab.prefix,
        ],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("probes live"), "{stderr}");
    let line = one_internal_error(&stderr, "capture-attached");
    assert!(line.contains("(thread fault-capture-attached)"), "{line}");
    assert_eq!(tshark_packets(&file), 0, "a complete, empty capture");
    nothing_attached(&lab);

    // In a namespace worker, whose owner turns the panic into an error: still one line.
    let (code, stderr) = run_with(
        &[("PODTRACE_FAULT", "netns-worker"), NO_BACKTRACE],
        &["topo", "pod-a1", "--lab", &lab.prefix],
    );
    assert_eq!(code, Some(2), "{stderr}");
    let line = one_internal_error(&stderr, "netns-worker");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(line.contains("worker thread"), "{line}");

    // RUST_BACKTRACE=1 adds Rust's own report, backtrace included.
    let (code, stderr) = run_with(
        &[("PODTRACE_FAULT", "netns-worker"), ("RUST_BACKTRACE", "1")],
        &["topo", "pod-a1", "--lab", &lab.prefix],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("stack backtrace"), "{stderr}");
}
