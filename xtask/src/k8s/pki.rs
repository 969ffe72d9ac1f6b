//! The cluster's credentials, made with openssl on every `k8s up`: a CA, the API server's
//! serving certificate (SANs: the control-plane address, the relay's 127.0.0.1, the
//! `kubernetes` Service names and IP), the service-account key pair, a static token per
//! identity (`--token-auth-file`), and a kubeconfig per client.
use std::{fs, path::Path, process::Command};

use anyhow::{bail, Context as _, Result};

use super::{Layout, API_IP, API_PORT, NODES, SERVICE_IP};

/// An identity of the token file.
pub struct Identity {
    /// Kubeconfig file name and token file uid.
    pub name: &'static str,
    pub user: String,
    pub groups: &'static str,
}

/// Every identity: the admin (system:masters), the controller-manager, the scheduler, and
/// one `system:node:NAME` per node (system:nodes, for the Node authorizer).
pub fn identities() -> Vec<Identity> {
    let mut ids = vec![
        Identity {
            name: "admin",
            user: "admin".into(),
            groups: "system:masters",
        },
        Identity {
            name: "controller-manager",
            user: "system:kube-controller-manager".into(),
            groups: "",
        },
        Identity {
            name: "scheduler",
            user: "system:kube-scheduler".into(),
            groups: "",
        },
    ];
    for n in NODES {
        ids.push(Identity {
            name: n.name,
            user: format!("system:node:{}", n.name),
            groups: "system:nodes",
        });
    }
    ids
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("running openssl (apt-get install openssl)")?;
    if !out.status.success() {
        bail!(
            "openssl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn random_token() -> Result<String> {
    let mut bytes = [0u8; 16];
    let mut f = fs::File::open("/dev/urandom")?;
    std::io::Read::read_exact(&mut f, &mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes `pki/` (ca.crt, ca.key, apiserver.crt, apiserver.key, sa.key, sa.pub,
/// tokens.csv) and the kubeconfigs of the components: `control-plane/NAME.kubeconfig` for the
/// controller-manager and scheduler (127.0.0.1:6443 in the control-plane namespace), and
/// `NODE/kubelet.kubeconfig` (the control-plane address on the underlay). Returns the
/// admin's token, for [`write_admin_kubeconfig`].
pub fn write(l: &Layout) -> Result<String> {
    let pki = l.pki();
    fs::create_dir_all(&pki)?;
    openssl(&pki, &["genrsa", "-out", "ca.key", "2048"])?;
    openssl(
        &pki,
        &[
            "req",
            "-x509",
            "-new",
            "-nodes",
            "-key",
            "ca.key",
            "-subj",
            &format!("/CN=podtrace-test-cluster-{}", l.prefix),
            "-days",
            "3650",
            "-out",
            "ca.crt",
        ],
    )?;
    openssl(&pki, &["genrsa", "-out", "apiserver.key", "2048"])?;
    openssl(
        &pki,
        &[
            "req",
            "-new",
            "-key",
            "apiserver.key",
            "-subj",
            "/CN=kube-apiserver",
            "-out",
            "apiserver.csr",
        ],
    )?;
    let sans = format!(
        "subjectAltName=IP:127.0.0.1,IP:{API_IP},IP:{SERVICE_IP},DNS:localhost,DNS:kubernetes,\
         DNS:kubernetes.default,DNS:kubernetes.default.svc,\
         DNS:kubernetes.default.svc.cluster.local\n\
         extendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n"
    );
    fs::write(pki.join("apiserver.ext"), sans)?;
    openssl(
        &pki,
        &[
            "x509",
            "-req",
            "-in",
            "apiserver.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "3650",
            "-extfile",
            "apiserver.ext",
            "-out",
            "apiserver.crt",
        ],
    )?;
    openssl(&pki, &["genrsa", "-out", "sa.key", "2048"])?;
    openssl(&pki, &["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;

    let mut csv = String::new();
    let mut admin = String::new();
    for id in identities() {
        let token = random_token()?;
        csv.push_str(&format!("{token},{},{}", id.user, id.name));
        if !id.groups.is_empty() {
            csv.push_str(&format!(",\"{}\"", id.groups));
        }
        csv.push('\n');
        let (path, server) = match id.name {
            "admin" => {
                admin = token;
                continue;
            }
            "controller-manager" | "scheduler" => (
                l.cp_dir().join(format!("{}.kubeconfig", id.name)),
                format!("https://127.0.0.1:{API_PORT}"),
            ),
            node => (
                l.node_dir(node).join("kubelet.kubeconfig"),
                format!("https://{API_IP}:{API_PORT}"),
            ),
        };
        fs::write(&path, kubeconfig(l, &server, &id.user, &token))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    fs::write(pki.join("tokens.csv"), csv)?;
    // Private keys and tokens: root only.
    for f in ["ca.key", "apiserver.key", "sa.key", "tokens.csv"] {
        set_mode(&pki.join(f), 0o600)?;
    }
    Ok(admin)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

fn kubeconfig(l: &Layout, server: &str, user: &str, token: &str) -> String {
    let cluster = l.cluster_name();
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: {cluster}
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: {user}
  user:
    token: {token}
contexts:
- name: {cluster}
  context:
    cluster: {cluster}
    user: {user}
    namespace: default
current-context: {cluster}
",
        ca = l.pki().join("ca.crt").display()
    )
}

/// The users' kubeconfig (`kubeconfig`, 0600): the admin, through the relay at
/// 127.0.0.1:`port` in the machine's own namespace.
pub fn write_admin_kubeconfig(l: &Layout, port: u16, token: &str) -> Result<()> {
    let path = l.kubeconfig();
    fs::write(
        &path,
        kubeconfig(l, &format!("https://127.0.0.1:{port}"), "admin", token),
    )?;
    set_mode(&path, 0o600)
}
