//! `kubectl podtrace deploy` / `undeploy`: the manifests of deploy/ (embedded in the binary)
//! applied with server-side apply, the agents waited for; and removed again.
use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::Namespace, rbac::v1::ClusterRole};
use kube::{
    api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams},
    Api,
};
use serde_json::Value;

use super::api::{api_error, Cluster, DAEMONSET, NAMESPACE};
use crate::parse::parse_duration;

/// deploy/, in the order `kubectl apply -f deploy/` takes it.
pub const MANIFESTS: [(&str, &str); 3] = [
    (
        "00-namespace.yaml",
        include_str!("../../../deploy/00-namespace.yaml"),
    ),
    ("10-rbac.yaml", include_str!("../../../deploy/10-rbac.yaml")),
    (
        "20-daemonset.yaml",
        include_str!("../../../deploy/20-daemonset.yaml"),
    ),
];

/// The image the manifests name.
pub const DEFAULT_IMAGE: &str = concat!("localhost/podtrace:", env!("CARGO_PKG_VERSION"));

/// Who applies (server-side apply's field manager).
const MANAGER: &str = "kubectl-podtrace";

#[derive(clap::Args, Debug, Clone)]
pub struct DeployArgs {
    /// The agents' image.
    #[arg(long, value_name = "IMAGE", default_value = DEFAULT_IMAGE)]
    pub image: String,
    /// How long to wait for every node's agent to be ready (0: do not wait).
    #[arg(long, value_name = "DUR", default_value = "120s", value_parser = parse_wait)]
    pub timeout: Duration,
    /// Print the manifests (with --image) instead of applying them.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(clap::Args, Debug, Clone)]
pub struct UndeployArgs {
    /// How long to wait for the agents to stop (0: do not wait).
    #[arg(long, value_name = "DUR", default_value = "120s", value_parser = parse_wait)]
    pub timeout: Duration,
}

fn parse_wait(s: &str) -> std::result::Result<Duration, String> {
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    parse_duration(s)
}

/// The objects of deploy/, the DaemonSet's image set to `image`.
pub fn objects(image: &str) -> Result<Vec<Value>> {
    if image.trim().is_empty() || image.contains(char::is_whitespace) {
        bail!("--image {image:?} is not an image reference");
    }
    let mut out = Vec::new();
    for (file, text) in MANIFESTS {
        let docs: Vec<Value> =
            serde_saphyr::from_multiple(text).map_err(|e| anyhow!("deploy/{file}: {e}"))?;
        for mut d in docs.into_iter().filter(|d| !d.is_null()) {
            if d["kind"] == "DaemonSet" {
                let containers = d["spec"]["template"]["spec"]["containers"]
                    .as_array_mut()
                    .ok_or_else(|| anyhow!("deploy/{file}: a DaemonSet without containers"))?;
                for c in containers {
                    c["image"] = Value::String(image.to_owned());
                }
            }
            out.push(d);
        }
    }
    Ok(out)
}

fn gvk(obj: &Value) -> Result<GroupVersionKind> {
    let api_version = obj["apiVersion"]
        .as_str()
        .ok_or_else(|| anyhow!("an object without apiVersion"))?;
    let kind = obj["kind"]
        .as_str()
        .ok_or_else(|| anyhow!("an object without kind"))?;
    let (group, version) = match api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version),
    };
    Ok(GroupVersionKind::gvk(group, version, kind))
}

pub fn deploy(cluster: &Cluster, args: &DeployArgs) -> Result<ExitCode> {
    let objects = objects(&args.image)?;
    if args.dry_run {
        for o in &objects {
            println!("---\n{}", serde_json::to_string_pretty(o)?);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let params = PatchParams::apply(MANAGER).force();
    for obj in &objects {
        let gvk = gvk(obj)?;
        let ar = ApiResource::from_gvk(&gvk);
        let name = obj["metadata"]["name"]
            .as_str()
            .ok_or_else(|| anyhow!("a {} without a name", gvk.kind))?;
        let api: Api<DynamicObject> = match obj["metadata"]["namespace"].as_str() {
            Some(ns) => Api::namespaced_with(cluster.client.clone(), ns, &ar),
            None => Api::all_with(cluster.client.clone(), &ar),
        };
        let shown = match obj["metadata"]["namespace"].as_str() {
            Some(ns) => format!("{} {ns}/{name}", gvk.kind.to_lowercase()),
            None => format!("{} {name}", gvk.kind.to_lowercase()),
        };
        cluster
            .rt
            .block_on(api.patch(name, &params, &Patch::Apply(obj)))
            .map_err(|e| api_error(&e, &format!("apply {shown}"), &cluster.server))?;
        println!("{shown} applied");
    }
    if args.timeout.is_zero() {
        return Ok(ExitCode::SUCCESS);
    }
    wait_ready(cluster, args.timeout)?;
    Ok(ExitCode::SUCCESS)
}

/// Waits until the DaemonSet's pods run the current template and are ready on every node it
/// schedules to; then names them.
fn wait_ready(cluster: &Cluster, timeout: Duration) -> Result<()> {
    let api: Api<DaemonSet> = Api::namespaced(cluster.client.clone(), NAMESPACE);
    let started = Instant::now();
    let mut last = String::new();
    loop {
        let ds = cluster
            .rt
            .block_on(api.get(DAEMONSET))
            .map_err(|e| api_error(&e, "get the agents' DaemonSet", &cluster.server))?;
        let generation = ds.metadata.generation.unwrap_or(0);
        if let Some(s) = &ds.status {
            let observed = s.observed_generation.unwrap_or(0) >= generation;
            let want = s.desired_number_scheduled;
            let updated = s.updated_number_scheduled.unwrap_or(0);
            last = format!(
                "{} of {want} agents ready, {updated} up to date",
                s.number_ready
            );
            if observed && want > 0 && s.number_ready == want && updated == want {
                let nodes = cluster.agents_on_nodes()?;
                println!(
                    "podtrace agents ready on {} node{} ({:.0} s): {}",
                    nodes.len(),
                    if nodes.len() == 1 { "" } else { "s" },
                    started.elapsed().as_secs_f64(),
                    nodes
                        .iter()
                        .map(|(n, p)| format!("{n} ({p})"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                return Ok(());
            }
        }
        if started.elapsed() > timeout {
            bail!(
                "the agents were not ready within {:?} ({last}): see `kubectl -n {NAMESPACE} get pods -o wide` and `kubectl -n {NAMESPACE} describe daemonset {DAEMONSET}`",
                timeout
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

pub fn undeploy(cluster: &Cluster, args: &UndeployArgs) -> Result<ExitCode> {
    let namespaces: Api<Namespace> = Api::all(cluster.client.clone());
    let roles: Api<ClusterRole> = Api::all(cluster.client.clone());
    let dp = DeleteParams::foreground();
    let mut removed = false;
    for (what, r) in [
        (
            format!("namespace {NAMESPACE}"),
            cluster
                .rt
                .block_on(namespaces.delete(NAMESPACE, &dp))
                .map(|_| ()),
        ),
        (
            "clusterrole podtrace-user".to_owned(),
            cluster
                .rt
                .block_on(roles.delete("podtrace-user", &dp))
                .map(|_| ()),
        ),
    ] {
        match r {
            Ok(()) => {
                removed = true;
                println!("{what} deleted");
            }
            Err(e) if super::api::status_code(&e) == Some(404) => {}
            Err(e) => return Err(api_error(&e, &format!("delete {what}"), &cluster.server)),
        }
    }
    if !removed {
        println!("podtrace is not deployed here: nothing to remove");
        return Ok(ExitCode::SUCCESS);
    }
    if args.timeout.is_zero() {
        return Ok(ExitCode::SUCCESS);
    }
    // The agents detach their probes on SIGTERM; the namespace goes when they have.
    let started = Instant::now();
    loop {
        let ns = cluster
            .rt
            .block_on(namespaces.get_opt(NAMESPACE))
            .map_err(|e| api_error(&e, "get namespace podtrace", &cluster.server))?;
        if ns.is_none() {
            println!(
                "podtrace removed ({:.0} s)",
                started.elapsed().as_secs_f64()
            );
            return Ok(ExitCode::SUCCESS);
        }
        if started.elapsed() > args.timeout {
            bail!(
                "namespace {NAMESPACE} is still terminating after {:?}: see `kubectl -n {NAMESPACE} get pods`",
                args.timeout
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

impl Cluster {
    /// (node, agent pod) of every agent pod that is scheduled.
    pub fn agents_on_nodes(&self) -> Result<Vec<(String, String)>> {
        let api: Api<k8s_openapi::api::core::v1::Pod> =
            Api::namespaced(self.client.clone(), NAMESPACE);
        let list = self
            .rt
            .block_on(api.list(&kube::api::ListParams::default().labels(super::api::AGENT_LABEL)))
            .map_err(|e| api_error(&e, "list the agents", &self.server))
            .context("after deploying")?;
        let mut out: Vec<(String, String)> = list
            .items
            .iter()
            .filter_map(|p| {
                Some((
                    p.spec.as_ref()?.node_name.clone()?,
                    p.metadata.name.clone()?,
                ))
            })
            .collect();
        out.sort();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manifests_parse_and_take_the_image() {
        let objs = objects("registry.example/podtrace:1.2").unwrap();
        let kinds: Vec<&str> = objs.iter().map(|o| o["kind"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "Namespace",
                "ServiceAccount",
                "Secret",
                "ClusterRole",
                "Role",
                "DaemonSet"
            ]
        );
        let ds = objs.iter().find(|o| o["kind"] == "DaemonSet").unwrap();
        let pod = &ds["spec"]["template"]["spec"];
        assert_eq!(
            pod["containers"][0]["image"],
            "registry.example/podtrace:1.2"
        );
        assert_eq!(pod["hostNetwork"], true);
        assert_eq!(pod["hostPID"], true);
        assert_eq!(pod["tolerations"][0]["operator"], "Exists");
        let sc = &pod["containers"][0]["securityContext"];
        assert_eq!(sc["privileged"], false);
        assert_eq!(sc["capabilities"]["drop"][0], "ALL");
        let mut caps: Vec<&str> = sc["capabilities"]["add"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        caps.sort();
        assert_eq!(caps, ["NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"]);
        // The agent listens on loopback, with the token, on the port the annotation names.
        let args: Vec<&str> = pod["containers"][0]["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let port = ds["spec"]["template"]["metadata"]["annotations"]
            [super::super::api::PORT_ANNOTATION]
            .as_str()
            .unwrap();
        assert!(
            args.contains(&format!("tcp:127.0.0.1:{port}").as_str()),
            "{args:?}"
        );
        assert!(args.contains(&"--token-file"));
        // Every object is in the namespace, or cluster-wide on purpose.
        for o in &objs {
            let ns = o["metadata"]["namespace"].as_str();
            match o["kind"].as_str().unwrap() {
                "Namespace" | "ClusterRole" => assert_eq!(ns, None),
                _ => assert_eq!(ns, Some(NAMESPACE)),
            }
        }
        assert!(objects("").is_err());
        assert!(objects("a b").is_err());
    }
}
