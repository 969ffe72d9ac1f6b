//! `podtrace verify eni` on the lab: both ENI pods pass (probing themselves, and with traffic
//! started by master), pod-c2 fails with the cause named once its 1536 rule is gone, and a
//! flannel pod is an error.

use podtrace_tests::{json_lines, Lab, Running};
use serde_json::Value;

fn verify(lab: &Lab, pod: &str, extra: &[&str]) -> (Option<i32>, Value) {
    let mut args = vec![
        "verify",
        "eni",
        pod,
        "--dst",
        "10.19.0.11",
        "--json",
        "--lab",
        &lab.prefix,
    ];
    args.extend_from_slice(extra);
    let run = Running::start(&args);
    let (code, lines, stderr) = run.wait(30);
    let verdict = json_lines(&lines)
        .into_iter()
        .find(|o| o["type"] == "verdict")
        .unwrap_or_else(|| panic!("no verdict: {lines:?} {stderr}"));
    (code, verdict)
}

#[test]
fn eni_pods_pass_with_probe() {
    let lab = Lab::up("veni", "eni");
    for (pod, eni, table) in [("pod-c1", "eth1", 2), ("pod-c2", "eth2", 3)] {
        let (code, v) = verify(&lab, pod, &["--probe"]);
        assert_eq!(v["verdict"], "pass", "{pod}: {v:#}");
        assert_eq!(code, Some(0));
        assert_eq!(v["eni"], eni);
        assert_eq!(v["table"], table);
        assert_eq!(v["rule_priority"], 1536);
        assert_eq!(v["primary"], "eth0");
        assert_eq!(v["counts"][format!("node-c/{eni}")], 6, "{v:#}");
        assert_eq!(v["counts"]["node-c/eth0"], 0);
        assert!(
            v["fib_tables"][table.to_string()].as_u64().unwrap() > 0,
            "{v:#}"
        );
    }
}

#[test]
fn traffic_started_by_master_passes() {
    let lab = Lab::up("vmas", "eni");
    let mut args = vec![
        "verify",
        "eni",
        "pod-c2",
        "--dst",
        "10.19.0.11",
        "--json",
        "--duration",
        "3",
        "--lab",
    ];
    args.push(&lab.prefix);
    let run = Running::start(&args);
    let out = lab.exec("master", &["ping", "-c", "3", "-i", "0.2", "10.19.0.32"]);
    assert!(out.status.success(), "{out:?}");
    let (code, lines, _) = run.wait(30);
    let v = json_lines(&lines)
        .into_iter()
        .find(|o| o["type"] == "verdict")
        .unwrap();
    assert_eq!(v["verdict"], "pass", "{v:#}");
    assert_eq!(code, Some(0));
    assert_eq!(v["counts"]["node-c/eth2"], 6);
    assert_eq!(v["counts"]["node-c/eth0"], 0);
}

#[test]
fn without_its_rule_pod_c2_fails_with_the_cause() {
    let lab = Lab::up("vrul", "eni");
    let ns = format!("{}node-c", lab.prefix);
    let out = std::process::Command::new("ip")
        .args([
            "-n",
            &ns,
            "rule",
            "del",
            "from",
            "10.19.0.32",
            "lookup",
            "3",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let (code, v) = verify(&lab, "pod-c2", &["--probe"]);
    assert_eq!(v["verdict"], "fail", "{v:#}");
    assert_eq!(code, Some(1));
    let causes: Vec<&str> = v["causes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert!(
        causes.contains(&"egress left via eth0: no `from 10.19.0.32` rule selects table 3"),
        "{causes:?}"
    );
    assert_eq!(v["eni"], "eth2", "found from where the replies came in");
    assert!(v["counts"]["node-c/eth0"].as_u64().unwrap() > 0);
}

#[test]
fn a_flannel_pod_is_an_error() {
    let lab = Lab::up("vfla", "flannel");
    let out = lab.podtrace(&["verify", "eni", "pod-a1", "--dst", "10.244.1.5"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not on an ENI"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}
