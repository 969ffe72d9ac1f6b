//! podtrace on real CRI pods: a private containerd (Debian's containerd, runc and CNI plugins)
//! started inside a lab node's network namespace, two pod sandboxes (and a third with a
//! clashing name) created through CRI, then `topo`, `follow`, `capture` and `verify` finding
//! them by name, by `--container ID` and through `$CONTAINER_RUNTIME_ENDPOINT`, and a ping
//! between two pods confirmed hop by hop.
//!
//! The setup (see ../../shared/cri.md for why each piece is needed, and
//! `podtrace_tests::containerd`):
//! - a lab (`podtrace lab up --topology flannel`), whose pods must still be found first by name;
//! - the node of the CRI pods: a fresh network namespace of this test, `{P}crinode`, holding
//!   nothing but what the runtime makes. containerd runs in it (`nsenter --net=`, not
//!   `ip netns exec`, so that the pod netns files it mounts stay visible), so the CNI bridge
//!   plugin makes its bridge and veths there, never in the root namespace. (Not the lab's
//!   node-a: that node routes the flannel pod networks over VXLAN, so podtrace rightly calls
//!   any bridge there `flannel-vxlan`; a plain bridge CNI node has no such routes.) The CNI
//!   network has its own bridge `cri0` and subnet 10.88.0.0/24;
//! - containerd with its own root, state, sockets, runc root, opt dir, CNI conf and IPAM dirs
//!   under one temporary directory, and a pause image built here
//!   ([`podtrace_tests::containerd::Containerd`], whose Drop removes everything, also when the
//!   test fails).
use std::{
    fs,
    os::unix::net::UnixListener,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use podtrace::cri;
use podtrace_tests::{
    assert_one_line_error,
    containerd::{Containerd, NodeSpec, CNI_RESULTS},
    in_netns, json_lines, json_of, podtrace, roles, run_ok, unique_prefix, Lab, Netns, Running,
};

const BRIDGE: &str = "cri0";
const SUBNET: &str = "10.88.0.0/24";

/// `podtrace ARGS` with `$CONTAINER_RUNTIME_ENDPOINT` set or cleared.
fn podtrace_env(args: &[&str], endpoint: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(podtrace_tests::podtrace_bin());
    cmd.args(args);
    match endpoint {
        Some(e) => cmd.env(cri::ENDPOINT_ENV, e),
        None => cmd.env_remove(cri::ENDPOINT_ENV),
    };
    cmd.output().expect("running podtrace")
}

#[test]
fn cri_pods_are_found_traced_and_followed() {
    let lab = Lab::up("cri", "flannel");
    let node = Netns::new(&format!("{}crinode", lab.prefix));
    let mut ctr = Containerd::start(
        &lab.prefix,
        NodeSpec {
            netns: node.path().to_path_buf(),
            bridge: BRIDGE.into(),
            subnet: SUBNET.into(),
            own_mounts: false,
            hostname: None,
            own_pids: false,
        },
    );
    let containerd_pid = ctr.pid();
    // No kubelet there, and containerd has the machine's hostname: the node is named by its
    // namespace's name in /run/netns.
    let node_name = node.name().to_owned();
    let url = ctr.url();
    let sock = ctr.sock.display().to_string();

    let web = ctr.run_pod("default", "cri-web");
    let db = ctr.run_pod("default", "cri-db");
    let db_staging = ctr.run_pod("staging", "cri-db");
    assert_ne!(web.netns, db.netns);
    for sb in [&web, &db, &db_staging] {
        assert!(sb.netns.exists(), "{sb:?}");
        assert!(sb.ip.starts_with("10.88.0."), "{sb:?}");
    }

    // The CNI plugin ran in the node's namespace: cri0 and the host veths are there, not in
    // the root namespace.
    let ports = String::from_utf8(
        in_netns(node.path(), &["ip", "-o", "link", "show", "master", BRIDGE]).stdout,
    )
    .unwrap();
    assert_eq!(ports.lines().count(), 3, "ports of {BRIDGE}: {ports}");
    assert!(!Path::new(&format!("/sys/class/net/{BRIDGE}")).exists());

    // topo by name through --runtime-endpoint.
    let topo = json_of(
        &podtrace(&["topo", "cri-web", "--runtime-endpoint", &url, "--json"]),
        "topo cri-web",
    );
    assert_eq!(topo["cni"], "bridge", "{topo:#}");
    assert_eq!(topo["pod"]["name"], "cri-web");
    assert_eq!(topo["pod"]["namespace"], "default");
    assert_eq!(topo["pod"]["source"], format!("cri:{url}"));
    assert_eq!(topo["pod"]["ip"], web.ip.as_str());
    assert_eq!(topo["pod"]["netns"], web.netns.display().to_string());
    // The node's namespace is the runtime's (SO_PEERCRED of its socket → containerd's pid),
    // not a lab node's, nor this machine's.
    assert_eq!(topo["pod"]["node"], node_name.as_str());
    assert_eq!(
        topo["pod"]["node_netns"],
        format!("/proc/{containerd_pid}/ns/net")
    );
    let hops = roles(&topo);
    assert_eq!(hops.len(), 3, "{topo:#}");
    assert_eq!(hops[0], ("pod-eth0".to_owned(), "eth0".to_owned()));
    assert_eq!(hops[1].0, "host-veth");
    assert_eq!(hops[2], ("bridge".to_owned(), BRIDGE.to_owned()));
    let web_veth = hops[1].1.clone();
    assert!(
        ports.contains(&format!(": {web_veth}@")),
        "{web_veth} not a port of {BRIDGE}: {ports}"
    );
    // The pod's own view agrees: its eth0's peer index is the host veth's ifindex.
    let iflink =
        String::from_utf8(in_netns(&web.netns, &["ip", "-o", "link", "show", "eth0"]).stdout)
            .unwrap();
    let host_ifindex = topo["hops"][1]["ifindex"].as_u64().unwrap();
    assert!(
        iflink.contains(&format!("eth0@if{host_ifindex}:")),
        "{iflink} vs {host_ifindex}"
    );

    // Text output names the same things.
    let out = podtrace(&["topo", "default/cri-web", "--runtime-endpoint", &sock]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [BRIDGE, web_veth.as_str(), "bridge", web.ip.as_str()] {
        assert!(text.contains(needle), "{needle} not in:\n{text}");
    }

    // Two pods called cri-db: listed, exit 2; NAMESPACE/NAME picks one.
    let out = podtrace(&["topo", "cri-db", "--runtime-endpoint", &url]);
    assert_one_line_error(
        &out,
        &[
            "matches 2 pods",
            "default/cri-db",
            "staging/cri-db",
            &db.id[..12],
            &db_staging.id[..12],
        ],
    );
    let staging = json_of(
        &podtrace(&[
            "topo",
            "staging/cri-db",
            "--runtime-endpoint",
            &url,
            "--json",
        ]),
        "topo staging/cri-db",
    );
    assert_eq!(staging["pod"]["ip"], db_staging.ip.as_str());
    assert_eq!(
        staging["pod"]["netns"],
        db_staging.netns.display().to_string()
    );

    // None: exit 2, saying where it looked.
    let out = podtrace(&["topo", "no-such-pod", "--runtime-endpoint", &url]);
    assert_one_line_error(&out, &["no-such-pod", "not found", &sock, "containerd"]);

    // --container: a real container in cri-web, by a prefix of its ID; a sandbox ID too.
    let sidecar = ctr.run_container(&web, "sidecar");
    let by_container = json_of(
        &podtrace(&[
            "topo",
            "--container",
            &sidecar[..10],
            "--runtime-endpoint",
            &url,
            "--json",
        ]),
        "topo --container",
    );
    assert_eq!(by_container["pod"]["name"], "cri-web");
    assert_eq!(by_container["pod"]["ip"], web.ip.as_str());
    assert_eq!(roles(&by_container)[1].1, web_veth);
    let by_sandbox = json_of(
        &podtrace(&[
            "topo",
            "--container",
            &db_staging.id[..8],
            "--runtime-endpoint",
            &url,
            "--json",
        ]),
        "topo --container SANDBOX",
    );
    assert_eq!(by_sandbox["pod"]["namespace"], "staging");
    let out = podtrace(&[
        "topo",
        "--container",
        "ffffffffffffffffff",
        "--runtime-endpoint",
        &url,
    ]);
    assert_one_line_error(&out, &["ffffffffffffffffff", "not found"]);

    // Found through $CONTAINER_RUNTIME_ENDPOINT: lab pods first, then the runtime.
    let via_env = json_of(
        &podtrace_env(&["topo", "cri-web", "--json"], Some(&url)),
        "topo cri-web with $CONTAINER_RUNTIME_ENDPOINT",
    );
    assert_eq!(via_env["pod"]["source"], format!("cri:{url}"));
    let lab_pod = json_of(
        &podtrace_env(
            &["topo", "pod-a1", "--json", "--lab", &lab.prefix],
            Some(&url),
        ),
        "topo pod-a1 with $CONTAINER_RUNTIME_ENDPOINT",
    );
    assert_eq!(lab_pod["pod"]["source"], format!("lab:{}", lab.prefix));
    assert_eq!(lab_pod["cni"], "flannel-vxlan");

    // follow: a ping from cri-web to default/cri-db, confirmed hop by hop through cri0.
    let run = Running::start(&[
        "follow",
        "cri-web",
        "--dst",
        &db.ip,
        "--json",
        "-c",
        "6",
        "--runtime-endpoint",
        &url,
    ]);
    let ready = json_lines(&run.seen)
        .into_iter()
        .find(|o| o["type"] == "ready")
        .expect("a ready line");
    assert_eq!(ready["cni"], "bridge");
    let ping = in_netns(
        &web.netns,
        &["ping", "-c", "3", "-i", "0.2", "-W", "2", &db.ip],
    );
    assert!(ping.status.success(), "ping cri-web → cri-db: {ping:?}");
    let (code, lines, stderr) = run.wait(30);
    let objs = json_lines(&lines);
    let summary = objs
        .iter()
        .find(|o| o["type"] == "summary")
        .unwrap_or_else(|| panic!("no summary: {lines:?} {stderr}"));
    assert_eq!(summary["verdict"], "confirmed", "{summary:#}");
    assert_eq!(code, Some(0));
    let observed: Vec<String> = summary["observed_path"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            format!(
                "{} {}",
                h["name"].as_str().unwrap(),
                h["hook"].as_str().unwrap()
            )
        })
        .collect();
    let db_topo = json_of(
        &podtrace(&[
            "topo",
            "default/cri-db",
            "--runtime-endpoint",
            &url,
            "--json",
        ]),
        "topo default/cri-db",
    );
    let db_veth = roles(&db_topo)[1].1.clone();
    assert_eq!(
        observed,
        [
            "cri-web/eth0 egress".to_owned(),
            format!("{node_name}/{web_veth} ingress"),
            format!("{node_name}/{BRIDGE} bridged"),
            format!("{node_name}/{db_veth} egress"),
            "cri-db/eth0 ingress".to_owned(),
        ]
    );
    assert_eq!(
        objs.iter().filter(|o| o["type"] == "packet").count(),
        6,
        "{lines:?}"
    );

    // capture: by --container, every word is the filter.
    let pcap = ctr.dir.join("web.pcapng");
    let run = Running::start(&[
        "capture",
        "--container",
        &sidecar[..12],
        "--runtime-endpoint",
        &url,
        "icmp",
        "-w",
        pcap.to_str().unwrap(),
        "-c",
        "4",
    ]);
    let ping = in_netns(
        &web.netns,
        &["ping", "-c", "4", "-i", "0.2", "-W", "2", &db.ip],
    );
    assert!(ping.status.success(), "{ping:?}");
    let (code, _, stderr) = run.wait(30);
    assert_eq!(code, Some(0), "capture: {stderr}");
    let read = run_ok("tcpdump", &["-n", "-r", pcap.to_str().unwrap(), "icmp"]);
    let packets = String::from_utf8_lossy(&read.stdout);
    assert_eq!(packets.lines().count(), 4, "{packets}");
    assert!(
        packets
            .lines()
            .all(|l| l.contains(&web.ip) && l.contains(&db.ip)),
        "{packets}"
    );

    // verify eni takes a CRI pod too, and says why this one is not an ENI pod.
    let out = podtrace(&[
        "verify",
        "eni",
        "cri-web",
        "--dst",
        &db.ip,
        "--runtime-endpoint",
        &url,
    ]);
    assert_one_line_error(&out, &["cri-web", "not on an ENI", "bridge"]);

    // containerd's ttrpc socket is not CRI; a stopped runtime is named as such.
    let out = podtrace(&[
        "topo",
        "cri-web",
        "--runtime-endpoint",
        &format!("{sock}.ttrpc"),
    ]);
    assert_one_line_error(&out, &["containerd.sock.ttrpc"]);

    ctr.remove_sandboxes().unwrap();
    for sb in [&web, &db, &db_staging] {
        assert!(!sb.netns.exists(), "{} left behind", sb.netns.display());
    }
    ctr.stop();
    let out = podtrace(&["topo", "cri-web", "--runtime-endpoint", &url]);
    assert_one_line_error(&out, &[&sock]);
    let dir = ctr.dir.clone();
    drop(ctr);
    assert!(!dir.exists(), "{} left behind", dir.display());
    let leftovers: Vec<_> = fs::read_dir(CNI_RESULTS)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            [&web, &db, &db_staging]
                .iter()
                .any(|s| e.file_name().to_string_lossy().contains(&s.id))
        })
        .collect();
    assert!(leftovers.is_empty(), "CNI cache left behind: {leftovers:?}");
}

/// Errors that need no runtime: each is one line and exit 2.
#[test]
fn runtime_problems_are_one_clear_line() {
    podtrace_tests::require_root();
    let dir = PathBuf::from(format!("/tmp/podtrace-cri-{}", unique_prefix("err")));
    fs::create_dir_all(&dir).unwrap();
    struct Rm(PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
    let _rm = Rm(dir.clone());

    // No socket there.
    let missing = dir.join("missing.sock");
    let out = podtrace(&[
        "topo",
        "web",
        "--runtime-endpoint",
        missing.to_str().unwrap(),
    ]);
    assert_one_line_error(&out, &["missing.sock", "no such socket"]);

    // A file that is not a socket.
    let file = dir.join("file.sock");
    fs::write(&file, "x").unwrap();
    let out = podtrace(&[
        "topo",
        "--container",
        "abc",
        "--runtime-endpoint",
        file.to_str().unwrap(),
    ]);
    assert_one_line_error(&out, &["file.sock", "not a unix socket"]);

    // A socket nobody listens on any more: the runtime is down.
    let stale = dir.join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let out = podtrace(&["topo", "web", "--runtime-endpoint", stale.to_str().unwrap()]);
    assert_one_line_error(&out, &["stale.sock", "is the runtime running"]);

    // A socket that answers, but not in gRPC (an HTTP/1.1 server).
    let http = dir.join("http.sock");
    let listener = UnixListener::bind(&http).unwrap();
    // Serves every connection (podtrace connects twice) until the test process ends.
    std::thread::spawn(move || {
        use std::io::{Read as _, Write as _};
        for mut conn in listener.incoming().map_while(Result::ok) {
            let mut buf = [0u8; 256];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        }
    });
    let started = Instant::now();
    let out = podtrace(&[
        "topo",
        "web",
        "--runtime-endpoint",
        &format!("unix://{}", http.display()),
    ]);
    assert_one_line_error(&out, &["http.sock", "not a working CRI socket"]);
    assert!(started.elapsed() < Duration::from_secs(15));

    // Not a unix endpoint; flags that do not go together.
    let out = podtrace(&["topo", "web", "--runtime-endpoint", "tcp://127.0.0.1:1"]);
    assert_one_line_error(&out, &["unix sockets only"]);
    let out = podtrace(&["topo", "web", "--container", "abc"]);
    assert_one_line_error(&out, &["--container"]);
}
