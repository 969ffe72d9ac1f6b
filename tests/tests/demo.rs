//! `podtrace demo` runs unattended, shows every step, exits 0, and leaves nothing behind.
use podtrace_tests::{podtrace, require_root};

#[test]
fn the_demo_tells_the_whole_story_and_cleans_up() {
    require_root();
    let out = podtrace(&["demo"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in [
        "━━━ 1.",
        "━━━ 2.",
        "━━━ 3.",
        "━━━ 4.",
        "━━━ 5.",
        "━━━ 6.",
        "through their agents",
        "clock of node-b",
        "verdict: CONFIRMED",
        "verdict: DROPPED",
        "NETFILTER_DROP",
        "PASS",
        "FAIL",
        "demo complete",
    ] {
        assert!(text.contains(step), "missing {step:?} in:\n{text}");
    }
    assert_eq!(text.matches("  ✓ ").count(), 8, "{text}");
    let left: Vec<String> = podtrace::netns::list()
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with("ptdemo-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(!std::path::Path::new("/run/podtrace/lab/ptdemo-.json").exists());
}
