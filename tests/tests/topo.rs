//! `podtrace topo` on the lab: the hop chain and the routing decision, read from the kernel,
//! for the flannel and the ENI topologies; the same answers by --pid and --netns; bad input.
use std::{os::unix::fs::MetadataExt as _, process::Command};

use podtrace_tests::Lab;
use serde_json::Value;

fn topo_json(lab: &Lab, args: &[&str]) -> Value {
    let mut full = vec!["topo"];
    full.extend_from_slice(args);
    full.push("--json");
    let out = lab.podtrace(&full);
    assert!(
        out.status.success(),
        "topo {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

fn hop_names(t: &Value) -> Vec<String> {
    t["hops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            format!(
                "{}:{}",
                h["role"].as_str().unwrap(),
                h["name"].as_str().unwrap()
            )
        })
        .collect()
}

fn strip_veth(names: &[String]) -> Vec<String> {
    names
        .iter()
        .map(|n| match n.find("/veth").or_else(|| n.find("/eni")) {
            Some(i) => format!(
                "{}/<{}>",
                &n[..i],
                if n[i..].starts_with("/veth") {
                    "veth"
                } else {
                    "eni"
                }
            ),
            None => n.clone(),
        })
        .collect()
}

#[test]
fn same_node_pods_meet_on_the_bridge() {
    let lab = Lab::up("same", "flannel");
    let t = topo_json(&lab, &["pod-a1", "--dst", "10.244.0.7"]);
    assert_eq!(t["cni"], "flannel-vxlan");
    assert_eq!(t["pod"]["ip"], "10.244.0.9");
    assert_eq!(
        strip_veth(&hop_names(&t)),
        [
            "pod-eth0:pod-a1/eth0",
            "host-veth:node-a/<veth>",
            "bridge:node-a/cni0",
            "host-veth:node-a/<veth>",
            "pod-eth0:pod-a2/eth0",
        ]
    );
    assert_eq!(t["route"]["oif"], "cni0");
    assert_eq!(t["route"]["table"], 254);
    // The host veths are the real peers: their names match the `veth` + 8 hex convention and
    // both are ports of cni0.
    for h in t["hops"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["role"] == "host-veth")
    {
        assert_eq!(h["master"], "cni0");
        assert_eq!(h["ifname"].as_str().unwrap().len(), 12);
    }
}

#[test]
fn cross_node_goes_through_flannel_to_the_remote_vtep() {
    let lab = Lab::up("cros", "flannel");
    let t = topo_json(&lab, &["pod-a1", "--dst", "10.244.1.5"]);
    assert_eq!(t["cni"], "flannel-vxlan");
    assert_eq!(
        strip_veth(&hop_names(&t)),
        [
            "pod-eth0:pod-a1/eth0",
            "host-veth:node-a/<veth>",
            "bridge:node-a/cni0",
            "vxlan:node-a/flannel.1",
            "uplink:node-a/eth0",
            "uplink:node-b/eth0",
            "vxlan:node-b/flannel.1",
            "bridge:node-b/cni0",
            "host-veth:node-b/<veth>",
            "pod-eth0:pod-b1/eth0",
        ]
    );
    let r = &t["route"];
    assert_eq!(r["oif"], "flannel.1");
    assert_eq!(r["gateway"], "10.244.1.0");
    assert_eq!(r["vxlan"]["remote_vtep"], "10.30.180.55");
    assert_eq!(r["vxlan"]["underlay_oif"], "eth0");
    let vx = &t["hops"][3];
    assert_eq!(vx["vni"], 1);
    assert_eq!(vx["port"], 8472);
    assert_eq!(vx["vtep"], "10.30.180.56");
    assert_eq!(vx["mtu"], 1450);
}

#[test]
fn eni_pods_follow_their_rule_and_table() {
    let lab = Lab::up("eni_", "eni");
    for (pod, ip, table, eni) in [
        ("pod-c1", "10.19.16.6", 2, "eth1"),
        ("pod-c2", "10.19.0.32", 3, "eth2"),
    ] {
        let t = topo_json(&lab, &[pod, "--dst", "10.19.0.11"]);
        assert_eq!(t["cni"], "aws-vpc-cni", "{pod}");
        assert_eq!(t["pod"]["ip"], ip);
        let r = &t["route"];
        assert_eq!(r["rule_priority"], 1536, "{pod}");
        assert_eq!(r["rule"], format!("from {ip} lookup {table}"));
        assert_eq!(r["table"], table);
        assert_eq!(r["oif"], eni);
        assert_eq!(t["primary"], "eth0");
        let names = strip_veth(&hop_names(&t));
        assert_eq!(
            names,
            [
                format!("pod-eth0:{pod}/eth0"),
                "host-veth:node-c/<eni>".to_owned(),
                format!("uplink:node-c/{eni}"),
            ]
        );
        let uplink = t["hops"].as_array().unwrap().last().unwrap().clone();
        assert_eq!(uplink["uplink"], "eni");
    }
}

#[test]
fn pid_and_netns_give_the_same_answer() {
    let lab = Lab::up("pid_", "eni");
    let by_name = topo_json(&lab, &["pod-c2", "--dst", "10.19.0.11"]);
    let ns = lab.netns("pod-c2");
    // A process inside the pod's namespace, as a container's would be.
    let mut sleeper = Command::new("ip")
        .args([
            "netns",
            "exec",
            &format!("{}pod-c2", lab.prefix),
            "sleep",
            "30",
        ])
        .spawn()
        .unwrap();
    // Once `ip netns exec` has entered the namespace and exec'd sleep.
    let pid = sleeper.id().to_string();
    let pod_ino = std::fs::metadata(&ns).unwrap().ino();
    podtrace_tests::wait_until(10, "the sleeper to enter pod-c2's namespace", || {
        std::fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| m.ino() == pod_ino)
            && std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "sleep")
    });
    let by_pid = topo_json(&lab, &["--pid", &pid, "--dst", "10.19.0.11"]);
    let by_netns = topo_json(
        &lab,
        &["--netns", ns.to_str().unwrap(), "--dst", "10.19.0.11"],
    );
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    // The pod's own hop names its namespace the way it was reached (/proc/PID/ns/net).
    let without_pod_netns = |t: &Value| {
        let mut hops = t["hops"].clone();
        hops[0]["netns"] = Value::Null;
        hops
    };
    assert_eq!(by_pid["hops"][0]["netns"], format!("/proc/{pid}/ns/net"));
    for other in [&by_pid, &by_netns] {
        assert_eq!(without_pod_netns(other), without_pod_netns(&by_name));
        assert_eq!(other["route"], by_name["route"]);
        assert_eq!(other["cni"], by_name["cni"]);
        assert_eq!(other["pod"]["name"], "pod-c2");
    }
}

#[test]
fn text_output_shows_the_chain_and_the_decision() {
    let lab = Lab::up("text", "all");
    let out = lab.podtrace(&["topo", "pod-c2", "--dst", "10.19.0.11"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("cni: aws-vpc-cni"), "{text}");
    assert!(
        text.contains("rule   1536: from 10.19.0.32 lookup 3"),
        "{text}"
    );
    assert!(text.contains("→ node-c/eth2"), "{text}");
}

fn fails_with(lab: &Lab, args: &[&str], needle: &str) {
    let out = lab.podtrace(args);
    assert_eq!(out.status.code(), Some(2), "{args:?} should exit 2");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains(needle), "{args:?}: {err}");
}

#[test]
fn bad_input_exits_2_with_one_line() {
    let lab = Lab::up("bad_", "all");
    fails_with(&lab, &["topo", "no-such-pod"], "pod no-such-pod not found");
    fails_with(
        &lab,
        &["topo", "pod-a1", "--dst", "10.0.0"],
        "not an IPv4 address",
    );
    fails_with(
        &lab,
        &["topo", "--netns", "/run/netns/podtrace-missing"],
        "not found",
    );
    fails_with(&lab, &["topo", "--pid", "999999999"], "no process with pid");
    // Not root: podtrace says so before touching anything.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(podtrace_tests::podtrace_bin())
        .args(["topo", "pod-a1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("must run as root"));
}

#[test]
fn a_namespace_gone_is_reported() {
    // A pod whose namespace was deleted under the registry.
    let victim = Lab::up("gone", "eni");
    podtrace::netns::delete(&format!("{}pod-c1", victim.prefix)).unwrap();
    let out = victim.podtrace(&["topo", "pod-c1"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is gone"), "{err}");
}
