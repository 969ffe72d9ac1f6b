//! Writing Services as kube-proxy (iptables mode, 1.28–1.30) writes them: the
//! `iptables-restore` input with kube-proxy's chains, chain names, comments, rule order and
//! probabilities, and flannel's pod masquerade. The lab programs its nodes with this, so
//! podtrace's reader ([`super::model`]) is checked against what the kernel gives back.
use std::{fmt::Write as _, net::Ipv4Addr};

use sha2::{Digest, Sha256};

use super::iptables::Net;

/// kube-proxy's masquerade mark (`--iptables-masquerade-bit` 14).
pub const MASQ_MARK: &str = "0x4000";

/// One port of one Service and its ready endpoints, as kube-proxy sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSpec {
    pub namespace: String,
    pub name: String,
    /// The port's name (`http`); empty for an unnamed port.
    pub port_name: String,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub node_port: Option<u16>,
    /// Ready endpoints: address and target port.
    pub endpoints: Vec<(Ipv4Addr, u16)>,
}

impl ServiceSpec {
    /// `NAMESPACE/NAME:PORT` (kube-proxy's ServicePortName).
    pub fn port_name_string(&self) -> String {
        if self.port_name.is_empty() {
            format!("{}/{}", self.namespace, self.name)
        } else {
            format!("{}/{}:{}", self.namespace, self.name, self.port_name)
        }
    }

    /// `KUBE-SVC-…`.
    pub fn svc_chain(&self) -> String {
        format!(
            "KUBE-SVC-{}",
            hash16(&format!("{}{}", self.port_name_string(), self.protocol))
        )
    }

    /// `KUBE-EXT-…` (same hash as the service chain).
    pub fn ext_chain(&self) -> String {
        format!(
            "KUBE-EXT-{}",
            hash16(&format!("{}{}", self.port_name_string(), self.protocol))
        )
    }

    /// `KUBE-SEP-…` of an endpoint (`IP:PORT`).
    pub fn sep_chain(&self, ip: Ipv4Addr, port: u16) -> String {
        format!(
            "KUBE-SEP-{}",
            hash16(&format!(
                "{}{}{ip}:{port}",
                self.port_name_string(),
                self.protocol
            ))
        )
    }
}

/// The first 16 characters of the base32 (RFC 4648, upper case) encoding of SHA-256(`s`):
/// how kube-proxy names its per-service and per-endpoint chains.
pub fn hash16(s: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let digest = Sha256::digest(s.as_bytes());
    // 16 characters are 80 bits: the first 10 bytes.
    let mut bits: u128 = 0;
    for b in &digest[..10] {
        bits = (bits << 8) | u128::from(*b);
    }
    (0..16)
        .map(|i| ALPHABET[((bits >> (75 - 5 * i)) & 31) as usize] as char)
        .collect()
}

/// The `iptables-restore --noflush` input that programs `services` on a node as kube-proxy
/// does (its `filter` and `nat` tables, with the jumps from the built-in chains that
/// kube-proxy adds separately); `cluster_cidr` is kube-proxy's `--cluster-cidr` (traffic to a
/// cluster IP from outside it is masqueraded).
pub fn restore_text(services: &[ServiceSpec], cluster_cidr: Net) -> String {
    let mut f = String::new();
    let mut n = String::new();
    // filter
    let _ = writeln!(f, "*filter");
    for c in [
        "KUBE-NODEPORTS",
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-PROXY-FIREWALL",
    ] {
        let _ = writeln!(f, ":{c} - [0:0]");
    }
    for line in [
        r#"-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES"#,
        r#"-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD"#,
        r#"-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#,
        r#"-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES"#,
        r#"-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#,
    ] {
        let _ = writeln!(f, "{line}");
    }
    for s in services.iter().filter(|s| s.endpoints.is_empty()) {
        let name = s.port_name_string();
        let p = &s.protocol;
        let _ = writeln!(
            f,
            "-A KUBE-SERVICES -m comment --comment \"{name} has no endpoints\" -m {p} -p {p} \
             -d {} --dport {} -j REJECT",
            s.cluster_ip, s.port
        );
        if let Some(np) = s.node_port {
            let _ = writeln!(
                f,
                "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"{name} has no endpoints\" \
                 -m addrtype --dst-type LOCAL -m {p} -p {p} --dport {np} -j REJECT"
            );
        }
    }
    let _ = writeln!(f, "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP");
    let _ = writeln!(
        f,
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark \
         {MASQ_MARK}/{MASQ_MARK} -j ACCEPT"
    );
    let _ = writeln!(
        f,
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m \
         conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    );
    let _ = writeln!(f, "COMMIT");

    // nat
    let _ = writeln!(n, "*nat");
    let mut chains = vec![
        "KUBE-NODEPORTS".to_owned(),
        "KUBE-SERVICES".to_owned(),
        "KUBE-MARK-MASQ".to_owned(),
        "KUBE-POSTROUTING".to_owned(),
    ];
    for s in services.iter().filter(|s| !s.endpoints.is_empty()) {
        if s.node_port.is_some() {
            chains.push(s.ext_chain());
        }
        chains.push(s.svc_chain());
        for (ip, port) in &s.endpoints {
            chains.push(s.sep_chain(*ip, *port));
        }
    }
    for c in &chains {
        let _ = writeln!(n, ":{c} - [0:0]");
    }
    for line in [
        r#"-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#,
        r#"-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#,
        r#"-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING"#,
    ] {
        let _ = writeln!(n, "{line}");
    }
    let with_eps: Vec<&ServiceSpec> = services
        .iter()
        .filter(|s| !s.endpoints.is_empty())
        .collect();
    for s in &with_eps {
        let name = s.port_name_string();
        let p = &s.protocol;
        if let Some(np) = s.node_port {
            let _ = writeln!(
                n,
                "-A KUBE-NODEPORTS -m comment --comment {name} -m {p} -p {p} --dport {np} -j {}",
                s.ext_chain()
            );
        }
        let _ = writeln!(
            n,
            "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" -m {p} -p {p} -d {} \
             --dport {} -j {}",
            s.cluster_ip,
            s.port,
            s.svc_chain()
        );
    }
    let _ = writeln!(
        n,
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must \
         be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
    );
    for s in with_eps.iter().filter(|s| s.node_port.is_some()) {
        let name = s.port_name_string();
        let _ = writeln!(
            n,
            "-A {} -m comment --comment \"masquerade traffic for {name} external \
             destinations\" -j KUBE-MARK-MASQ",
            s.ext_chain()
        );
        let _ = writeln!(n, "-A {} -j {}", s.ext_chain(), s.svc_chain());
    }
    let _ = writeln!(n, "-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}");
    let _ = writeln!(
        n,
        "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN"
    );
    let _ = writeln!(n, "-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}");
    let _ = writeln!(
        n,
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring \
         SNAT\" -j MASQUERADE --random-fully"
    );
    for s in &with_eps {
        let name = s.port_name_string();
        let p = &s.protocol;
        for (ip, port) in &s.endpoints {
            let sep = s.sep_chain(*ip, *port);
            let _ = writeln!(
                n,
                "-A {sep} -m comment --comment {name} -s {ip} -j KUBE-MARK-MASQ"
            );
            let _ = writeln!(
                n,
                "-A {sep} -m comment --comment {name} -m {p} -p {p} -j DNAT --to-destination \
                 {ip}:{port}"
            );
        }
        let svc = s.svc_chain();
        let _ = writeln!(
            n,
            "-A {svc} -m comment --comment \"{name} cluster IP\" -m {p} -p {p} -d {} --dport {} \
             ! -s {cluster_cidr} -j KUBE-MARK-MASQ",
            s.cluster_ip, s.port
        );
        let count = s.endpoints.len();
        for (i, (ip, port)) in s.endpoints.iter().enumerate() {
            let prob = if i + 1 < count {
                format!(
                    " -m statistic --mode random --probability {:.10}",
                    1.0 / (count - i) as f64
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                n,
                "-A {svc} -m comment --comment \"{name} -> {ip}:{port}\"{prob} -j {}",
                s.sep_chain(*ip, *port)
            );
        }
    }
    let _ = writeln!(n, "COMMIT");
    f + &n
}

/// flannel's masquerade of pod traffic leaving the pod network (its `FLANNEL-POSTRTG`
/// chain, as flanneld 0.2x writes it with `--ip-masq`): `pod_cidr` is the cluster's pod
/// network, `node_subnet` this node's share of it.
pub fn flannel_masq_text(pod_cidr: Net, node_subnet: Net) -> String {
    let c = "-m comment --comment \"flanneld masq\"";
    let mut t = String::new();
    let _ = writeln!(t, "*nat");
    let _ = writeln!(t, ":FLANNEL-POSTRTG - [0:0]");
    let _ = writeln!(t, "-A POSTROUTING {c} -j FLANNEL-POSTRTG");
    let _ = writeln!(
        t,
        "-A FLANNEL-POSTRTG -m mark --mark {MASQ_MARK}/{MASQ_MARK} {c} -j RETURN"
    );
    let _ = writeln!(
        t,
        "-A FLANNEL-POSTRTG -s {node_subnet} -d {pod_cidr} {c} -j RETURN"
    );
    let _ = writeln!(
        t,
        "-A FLANNEL-POSTRTG -s {pod_cidr} -d {node_subnet} {c} -j RETURN"
    );
    let _ = writeln!(
        t,
        "-A FLANNEL-POSTRTG ! -s {pod_cidr} -d {node_subnet} {c} -j RETURN"
    );
    let _ = writeln!(
        t,
        "-A FLANNEL-POSTRTG -s {pod_cidr} ! -d 224.0.0.0/4 {c} -j MASQUERADE --random-fully"
    );
    let _ = writeln!(
        t,
        "-A FLANNEL-POSTRTG ! -s {pod_cidr} -d {pod_cidr} {c} -j MASQUERADE --random-fully"
    );
    let _ = writeln!(t, "COMMIT");
    let _ = writeln!(t, "*filter");
    let _ = writeln!(t, ":FLANNEL-FWD - [0:0]");
    let _ = writeln!(
        t,
        "-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD"
    );
    let _ = writeln!(
        t,
        "-A FLANNEL-FWD -s {pod_cidr} -m comment --comment \"flanneld forward\" -j ACCEPT"
    );
    let _ = writeln!(
        t,
        "-A FLANNEL-FWD -d {pod_cidr} -m comment --comment \"flanneld forward\" -j ACCEPT"
    );
    let _ = writeln!(t, "COMMIT");
    t
}
